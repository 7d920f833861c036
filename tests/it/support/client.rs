//! Test users and real matrix-sdk clients that record what they see.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use matrix_sdk::config::SyncSettings;
use matrix_sdk::deserialized_responses::EncryptionInfo;
use matrix_sdk::event_handler::RawEvent;
use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::{AnySyncTimelineEvent, InitialStateEvent};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use matrix_sdk::{Client, Room};

use super::synapse::SERVER_NAME;
use super::{random_suffix, run_dir, synapse, timeout};

/// A registered user: `<name>_<random>` on the test homeserver.
#[derive(Clone)]
pub struct TestUser {
    /// The localpart, e.g. `alice_k3j9x2ab`.
    pub localpart: String,
    /// The full user ID.
    pub user_id: OwnedUserId,
    /// The password (random per user).
    pub password: String,
}

impl fmt::Debug for TestUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestUser")
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

/// Registers a new user named `<name>_<random suffix>` with Synapse's shared-secret admin API.
pub async fn user(name: &str) -> TestUser {
    let synapse = synapse();
    let localpart = format!("{name}_{}", random_suffix(8));
    let password = random_suffix(24);
    // The product's own registration (as `mxpay dev` uses it), but strict: an existing user
    // (`M_USER_IN_USE`) fails the test too, since every test user is new.
    mxpay::homeserver::admin_register::register(
        &synapse.url,
        synapse.registration_shared_secret(),
        &localpart,
        &password,
    )
    .await
    .expect("Synapse registers the test user");

    let user_id = UserId::parse(format!("@{localpart}:{SERVER_NAME}")).expect("valid user ID");
    TestUser {
        localpart,
        user_id,
        password,
    }
}

/// A timeline event a client saw (decrypted if it could be).
#[derive(Debug, Clone)]
pub struct SeenEvent {
    /// The room it was in.
    pub room_id: OwnedRoomId,
    /// The event's JSON as the client handed it out (decrypted for encrypted events it could
    /// decrypt, `m.room.encrypted` otherwise).
    pub json: serde_json::Value,
    /// Set for events that arrived encrypted and were decrypted.
    pub encryption: Option<EncryptionInfo>,
}

impl SeenEvent {
    /// `type`.
    pub fn event_type(&self) -> &str {
        self.json["type"].as_str().unwrap_or_default()
    }

    /// `sender`.
    pub fn sender(&self) -> &str {
        self.json["sender"].as_str().unwrap_or_default()
    }

    /// `content`.
    pub fn content(&self) -> &serde_json::Value {
        &self.json["content"]
    }

    /// `content.body`, if any.
    pub fn body(&self) -> Option<&str> {
        self.json["content"]["body"].as_str()
    }

    /// `content.msgtype`, if any.
    pub fn msgtype(&self) -> Option<&str> {
        self.json["content"]["msgtype"].as_str()
    }

    /// `state_key`, for state events.
    pub fn state_key(&self) -> Option<&str> {
        self.json["state_key"].as_str()
    }

    /// `event_id`.
    pub fn event_id(&self) -> &str {
        self.json["event_id"].as_str().unwrap_or_default()
    }
}

/// The typed events (`org.mxpay.*`) an `m.room.message` carries, each as the event it stands
/// for: the message's JSON with the type and content of the payload (so its event id is the
/// message's, the one a reply names).
fn carried_as_typed(json: &serde_json::Value) -> Vec<serde_json::Value> {
    if json["type"] != "m.room.message" {
        return Vec::new();
    }
    let Some(content) = json["content"].as_object() else {
        return Vec::new();
    };
    content
        .keys()
        .filter(|key| key.starts_with("org.mxpay."))
        .filter_map(|key| {
            let payload = mxpay::events::carried(json, key)?;
            let mut typed = json.clone();
            typed["type"] = key.as_str().into();
            typed["content"] = payload.clone();
            Some(typed)
        })
        .collect()
}

#[derive(Default)]
struct EventLog {
    events: Mutex<Vec<SeenEvent>>,
    /// Bumped on every new event; `watch` works across the runtimes tests create.
    changed: Option<tokio::sync::watch::Sender<usize>>,
}

/// Options for [`TestClient::create_room`].
#[derive(Debug, Clone, Default)]
pub struct RoomOptions {
    /// Turn on encryption (`m.room.encryption` in the initial state).
    pub encrypted: bool,
    /// Room preset (Synapse's default: `private_chat`).
    pub preset: Option<RoomPreset>,
    /// Users to invite.
    pub invite: Vec<OwnedUserId>,
    /// Mark as a direct chat.
    pub is_direct: bool,
    /// Room name.
    pub name: Option<String>,
}

/// A logged-in matrix-sdk client with its own sqlite store, syncing in a background task and
/// recording every timeline event it sees. Derefs to [`Client`].
pub struct TestClient {
    /// The user it is logged in as.
    pub user: TestUser,
    client: Client,
    log: Arc<EventLog>,
    changed: tokio::sync::watch::Receiver<usize>,
    sync_task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for TestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestClient")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Deref for TestClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.sync_task.abort();
    }
}

/// Logs `user` in with a new device and a fresh sqlite store, does one sync (so its device
/// keys are uploaded before anyone needs them), then keeps syncing in the background.
pub async fn client(user: &TestUser) -> TestClient {
    let synapse = synapse();
    let store_dir =
        run_dir()
            .join("clients")
            .join(format!("{}-{}", user.localpart, random_suffix(4)));
    let client = Client::builder()
        .homeserver_url(&synapse.url)
        .sqlite_store(&store_dir, None)
        .build()
        .await
        .expect("build a matrix-sdk client");
    client
        .matrix_auth()
        .login_username(&user.localpart, &user.password)
        .initial_device_display_name("mxpay integration test")
        .send()
        .await
        .unwrap_or_else(|e| panic!("log in as {}: {e}", user.user_id));

    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let log = Arc::new(EventLog {
        events: Mutex::new(Vec::new()),
        changed: Some(tx),
    });
    let handler_log = log.clone();
    client.add_event_handler(
        move |_: Raw<AnySyncTimelineEvent>,
              room: Room,
              raw: RawEvent,
              encryption: Option<EncryptionInfo>| {
            let log = handler_log.clone();
            async move {
                let json = serde_json::from_str(raw.get()).unwrap_or(serde_json::Value::Null);
                let carried = carried_as_typed(&json);
                let seen = SeenEvent {
                    room_id: room.room_id().to_owned(),
                    json,
                    encryption,
                };
                let count = {
                    let mut events = log.events.lock().expect("event log lock");
                    // The typed payloads a message carries are logged after it as the typed
                    // events they stand for, so a test waits for a receipt the way a bot reads
                    // one (`mxpay::events::carried`), whichever form the bot sent.
                    let typed: Vec<SeenEvent> = carried
                        .into_iter()
                        .map(|json| SeenEvent {
                            json,
                            ..seen.clone()
                        })
                        .collect();
                    events.push(seen);
                    events.extend(typed);
                    events.len()
                };
                if let Some(changed) = &log.changed {
                    changed.send_replace(count);
                }
            }
        },
    );

    client
        .sync_once(SyncSettings::default().timeout(Duration::ZERO))
        .await
        .unwrap_or_else(|e| panic!("first sync of {}: {e}", user.user_id));
    let sync_client = client.clone();
    let sync_task = tokio::spawn(async move {
        // Returns only on an error the SDK gives up on; the test then times out waiting and
        // says what it waited for.
        if let Err(e) = sync_client.sync(SyncSettings::default()).await {
            eprintln!("sync of a test client stopped: {e}");
        }
    });

    TestClient {
        user: user.clone(),
        client,
        log,
        changed: rx,
        sync_task,
    }
}

impl TestClient {
    /// The underlying client.
    pub fn inner(&self) -> &Client {
        &self.client
    }

    /// Every timeline event seen so far.
    pub fn seen_events(&self) -> Vec<SeenEvent> {
        self.log.events.lock().expect("event log lock").clone()
    }

    /// Waits (up to `timeout()`) for a timeline event, seen before or after this call, that
    /// matches `predicate`; panics naming `what` and listing recent events otherwise.
    pub async fn wait_for_event(
        &self,
        what: &str,
        predicate: impl Fn(&SeenEvent) -> bool,
    ) -> SeenEvent {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout();
        loop {
            changed.borrow_and_update();
            if let Some(found) = self.seen_events().into_iter().find(|e| predicate(e)) {
                return found;
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero()
                || tokio::time::timeout(remaining, changed.changed())
                    .await
                    .is_err()
            {
                let recent: Vec<String> = self
                    .seen_events()
                    .iter()
                    .rev()
                    .take(15)
                    .map(|e| {
                        format!(
                            "{} {} {} {}",
                            e.room_id,
                            e.event_type(),
                            e.sender(),
                            e.content()
                        )
                    })
                    .collect();
                panic!(
                    "{} did not see {what} within {:?}; latest events first:\n{}",
                    self.user.user_id,
                    timeout(),
                    recent.join("\n")
                );
            }
        }
    }

    /// Waits for an `m.room.message` in `room_id` from `sender` whose body satisfies `body`.
    pub async fn wait_for_message(
        &self,
        room_id: &RoomId,
        sender: &str,
        body: impl Fn(&str) -> bool,
    ) -> SeenEvent {
        let what = format!("a message from {sender} in {room_id}");
        self.wait_for_event(&what, |e| {
            e.room_id == room_id
                && e.event_type() == "m.room.message"
                && e.sender() == sender
                && e.body().is_some_and(&body)
        })
        .await
    }

    /// Waits until the client saw `user_id`'s membership in `room_id` become `membership`.
    pub async fn wait_for_membership(&self, room_id: &RoomId, user_id: &str, membership: &str) {
        let what = format!("{user_id}'s membership `{membership}` in {room_id}");
        self.wait_for_event(&what, |e| {
            e.room_id == room_id
                && e.event_type() == "m.room.member"
                && e.state_key() == Some(user_id)
                && e.content()["membership"] == membership
        })
        .await;
    }

    /// Creates a room.
    pub async fn create_room(&self, options: RoomOptions) -> Room {
        let mut request = CreateRoomRequest::new();
        request.preset = options.preset;
        request.invite = options.invite;
        request.is_direct = options.is_direct;
        request.name = options.name;
        if options.encrypted {
            request.initial_state = vec![InitialStateEvent::with_empty_state_key(
                RoomEncryptionEventContent::with_recommended_defaults(),
            )
            .to_raw_any()];
        }
        self.client
            .create_room(request)
            .await
            .unwrap_or_else(|e| panic!("{} creating a room: {e}", self.user.user_id))
    }

    /// Joins a room (the invite need not have synced yet).
    /// Sends `text` in `room` as a reply to `to` (an `m.text` with `m.in_reply_to`).
    pub async fn reply(
        &self,
        room: &RoomId,
        to: &str,
        text: &str,
    ) -> matrix_sdk::ruma::OwnedEventId {
        let content = serde_json::json!({
            "msgtype": "m.text",
            "body": text,
            "m.relates_to": {"m.in_reply_to": {"event_id": to}},
        });
        self.room(room)
            .await
            .send_raw("m.room.message", content)
            .await
            .unwrap_or_else(|e| panic!("{} replying: {e}", self.user.user_id))
            .response
            .event_id
    }

    /// Reacts to `to` in `room` with `key` (an `m.annotation`).
    pub async fn react(
        &self,
        room: &RoomId,
        to: &str,
        key: &str,
    ) -> matrix_sdk::ruma::OwnedEventId {
        let content = serde_json::json!({
            "m.relates_to": {"rel_type": "m.annotation", "event_id": to, "key": key},
        });
        self.room(room)
            .await
            .send_raw("m.reaction", content)
            .await
            .unwrap_or_else(|e| panic!("{} reacting: {e}", self.user.user_id))
            .response
            .event_id
    }

    pub async fn join(&self, room_id: &RoomId) -> Room {
        self.client
            .join_room_by_id(room_id)
            .await
            .unwrap_or_else(|e| panic!("{} joining {room_id}: {e}", self.user.user_id))
    }

    /// The joined room `room_id`, once the client knows it (bounded wait).
    pub async fn room(&self, room_id: &RoomId) -> Room {
        let what = format!("{} to know room {room_id}", self.user.user_id);
        super::eventually(&what, || async { self.client.get_room(room_id) }).await
    }

    /// Creates and uploads a cross-signing identity. Synapse wants user-interactive auth: the
    /// first call fails with the UIA session, the second carries the password.
    pub async fn bootstrap_cross_signing(&self) {
        let encryption = self.client.encryption();
        let Err(first) = encryption.bootstrap_cross_signing(None).await else {
            return;
        };
        let uiaa_info = first
            .as_uiaa_response()
            .unwrap_or_else(|| panic!("cross-signing bootstrap failed without UIA: {first}"));
        let mut password = uiaa::Password::new(
            uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(
                self.user.localpart.clone(),
            )),
            self.user.password.clone(),
        );
        password.session = uiaa_info.session.clone();
        encryption
            .bootstrap_cross_signing(Some(uiaa::AuthData::Password(password)))
            .await
            .unwrap_or_else(|e| panic!("cross-signing bootstrap with password: {e}"));
    }

    /// Replaces the user's cross-signing identity with a new one (as a client's "reset
    /// cryptographic identity" does, or an attacker who took over the account); this device
    /// is signed by the new identity.
    pub async fn reset_cross_signing(&self) {
        let handle = self
            .client
            .encryption()
            .reset_cross_signing()
            .await
            .unwrap_or_else(|e| panic!("cross-signing reset: {e}"));
        let Some(handle) = handle else {
            return; // no authentication needed
        };
        let session = match handle.auth_type() {
            matrix_sdk::encryption::CrossSigningResetAuthType::Uiaa(info) => info.session.clone(),
            other => panic!("cross-signing reset wants {other:?}, not a password"),
        };
        let mut password = uiaa::Password::new(
            uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(
                self.user.localpart.clone(),
            )),
            self.user.password.clone(),
        );
        password.session = session;
        handle
            .auth(Some(uiaa::AuthData::Password(password)))
            .await
            .unwrap_or_else(|e| panic!("cross-signing reset with password: {e}"));
    }
}
