//! The bot's end-to-end encryption: one device, one `OlmMachine` over a sqlite store.
//!
//! The `OlmMachine` is sans-I/O; [`BotCrypto`] is the thin shell around it:
//! - transactions from the homeserver come in through [`BotCrypto::ingest`], which feeds the
//!   bot device's to-device events, device-list changes and key counts to the machine *before*
//!   decrypting the transaction's room events;
//! - what the machine wants sent (key uploads, key queries, key claims, to-device messages) goes
//!   out through the bot's one [`HomeserverClient`] as the bot's device
//!   ([`Identity::BotDevice`]), in a bounded loop, with [`RetryPolicy::CRYPTO_DEVICE`];
//! - [`BotCrypto::send_event`] encrypts what the bot says in encrypted rooms.
//!
//! "Cannot decrypt yet" (the room key has not arrived) and "our store failed" are different:
//! the first parks the event durably and retries it when keys arrive (telling the sender after a
//! bounded wait), the second is an error that stops the transaction.

pub mod device;
pub mod event;
pub mod extensions;
pub mod key_recovery;
pub mod parked;
pub mod pipeline;
pub mod replay;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use matrix_sdk::deserialized_responses::UnableToDecryptReason;
use matrix_sdk_crypto::types::events::room::encrypted::EncryptedEvent;
use matrix_sdk_crypto::types::requests::{
    AnyIncomingResponse, AnyOutgoingRequest, OutgoingRequest, ToDeviceRequest,
};
use matrix_sdk_crypto::{
    CollectStrategy, CryptoStoreError, DecryptionSettings, EncryptionSettings,
    EncryptionSyncChanges, OlmMachine, RoomEventDecryptionResult, TrustRequirement, UserIdentity,
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::api::client::keys::{get_keys, upload_signing_keys};
use ruma::api::client::message::send_message_event;
use ruma::api::client::state::get_state_event_for_key;
use ruma::api::client::sync::sync_events::DeviceLists;
use ruma::api::client::to_device::send_event_to_device;
use ruma::events::{
    AnyMessageLikeEventContent, AnyToDeviceEventContent, MessageLikeEventContent, StateEventType,
};
use ruma::serde::Raw;
use ruma::to_device::DeviceIdOrAllDevices;
use ruma::{
    EventId, OwnedEventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, TransactionId,
    UserId,
};
use serde_json::{json, Value};

use crate::clock::SharedClock;
use crate::homeserver::{
    DeviceIdentity, HomeserverClient, HomeserverError, Identity, PathInput, RetryPolicy,
};

pub use device::{DeviceMode, DeviceRecord};
pub use event::{DecryptedEvent, TrustState};
pub use parked::{ParkedError, ParkedEvent};
pub use replay::{MegolmMessageId, MessageCheck, ReplayError, ReplayStore};

/// Rounds of "send what the machine wants, then ask again" per call; each round answers the
/// previous one (upload -> query -> claim), so a handful always suffices.
const OUTGOING_ROUNDS_MAX: usize = 4;
/// Longest time unchanged key counts go without being fed to the machine.
const KEY_COUNTS_REFEED_MS: u64 = 10 * 60_000;
/// To-device event type of the start-up delivery self-check.
pub const SELF_CHECK_EVENT_TYPE: &str = "org.mxpay.e2e_self_check";

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// `device.json` or the store key file is unreadable, corrupt or for another bot.
    #[error("bot device file {path}: {reason}")]
    DeviceFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Registering the bot or creating its device failed.
    #[error("cannot create the bot's device: {0}")]
    Provision(#[source] HomeserverError),
    /// The homeserver answered something that makes no sense.
    #[error("unexpected homeserver answer: {0}")]
    Homeserver(String),
    /// A homeserver request failed (after the client's retries).
    #[error(transparent)]
    Transport(#[from] HomeserverError),
    /// The sqlite crypto store could not be opened (wrong key, other device, corrupt).
    #[error("cannot open the crypto store in {path}: {reason}")]
    StoreOpen {
        /// The store directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The crypto store failed while running: never a message's fault.
    #[error("crypto store failure: {0}")]
    Store(#[from] CryptoStoreError),
    /// Encrypting failed inside the `OlmMachine`.
    #[error("encryption failed: {0}")]
    Encrypt(String),
    /// The parked-event store failed.
    #[error(transparent)]
    Parked(#[from] ParkedError),
    /// The store of Megolm message identities (replay records) failed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

impl CryptoError {
    /// Whether retrying the same transaction later may succeed (homeserver briefly away).
    pub fn is_transient(&self) -> bool {
        matches!(self, CryptoError::Transport(e) if e.is_transient())
    }
}

/// What [`BotCrypto::start`] needs.
#[derive(Clone)]
pub struct CryptoSettings {
    /// The bot's homeserver client; its bot user is the device's owner. The device sends
    /// through it with [`RetryPolicy::CRYPTO_DEVICE`], and its requests are measured in the
    /// client's metrics.
    pub client: HomeserverClient,
    /// The data dir: `device.json`, `crypto/` and the store key live here.
    pub data_dir: PathBuf,
    /// Create a new device with MSC4190 instead of appservice login.
    pub msc4190: bool,
    /// Key of the sqlite store; `None` reads or creates `<data_dir>/crypto-store.key`.
    pub store_key: Option<[u8; 32]>,
    /// How long an undecryptable event waits for its room key before the sender is told.
    pub undecryptable_notice_after_ms: u64,
    /// How long a parked event is kept before it is dropped.
    pub parked_max_age_ms: u64,
    /// Where replayed events are counted (none: not counted). Homeserver requests are measured
    /// by the client.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Whether room keys of a private room (the bot and one person) go to devices their owner
    /// did not cross-sign. Off, such a room's keys reach only cross-signed devices
    /// (matrix-sdk-crypto's identity-based strategy, MSC4153): challenges and balances in the
    /// DM stay off a session nobody vouched for.
    pub share_private_keys_with_unsigned_devices: bool,
}

impl std::fmt::Debug for CryptoSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoSettings")
            .field("client", &self.client)
            .field("data_dir", &self.data_dir)
            .field("msc4190", &self.msc4190)
            .field("store_key", &self.store_key.map(|_| "<redacted>"))
            .field(
                "undecryptable_notice_after_ms",
                &self.undecryptable_notice_after_ms,
            )
            .field("parked_max_age_ms", &self.parked_max_age_ms)
            .field(
                "share_private_keys_with_unsigned_devices",
                &self.share_private_keys_with_unsigned_devices,
            )
            .finish()
    }
}

impl CryptoSettings {
    /// Settings with the default waits: 30 s before telling a sender, 24 h before dropping.
    pub fn new(client: HomeserverClient, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            client,
            data_dir: data_dir.into(),
            msc4190: false,
            store_key: None,
            undecryptable_notice_after_ms: 30_000,
            parked_max_age_ms: 24 * 3_600_000,
            metrics: None,
            share_private_keys_with_unsigned_devices: true,
        }
    }
}

/// What one transaction produced.
#[derive(Debug, Default)]
pub struct Ingested {
    /// Room events in order: first events whose late room key arrived in this transaction, then
    /// this transaction's events (decrypted, or plaintext with `was_encrypted == false`).
    /// Events the bot sent itself are left out.
    pub events: Vec<DecryptedEvent>,
    /// Events parked because their room key is missing.
    pub parked: Vec<OwnedEventId>,
    /// Events that can never be decrypted (malformed, withheld key...); their senders were told.
    pub undecryptable: Vec<OwnedEventId>,
    /// Events whose ciphertext the bot already saw under another event id: replays, dropped.
    pub replayed: Vec<OwnedEventId>,
}

/// What the start-up self-check found about the homeserver's appservice E2E delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryReport {
    /// To-device events (MSC2409) and the bot device's key counts (MSC3202) both arrive.
    Complete,
    /// To-device events arrive but one-time key counts do not: the bot will run out of
    /// one-time keys and new senders will fail to set up sessions.
    MissingKeyCounts,
    /// The self-addressed to-device event never arrived: nobody can share room keys with the bot.
    MissingToDevice,
}

#[derive(Debug, Default)]
struct DeliveryState {
    /// Whether any transaction carried an MSC3202 field.
    saw_msc3202: bool,
    /// Whether a transaction carried key counts for the bot's device.
    saw_own_key_counts: bool,
    /// Nonce of the self-check to-device event we are waiting for.
    self_check_nonce: Option<String>,
    /// Whether that event arrived.
    self_check_seen: bool,
}

struct Inner {
    machine: OlmMachine,
    /// The bot's homeserver client with the device's retry bounds.
    client: HomeserverClient,
    device: DeviceRecord,
    identity: DeviceIdentity,
    settings: CryptoSettings,
    clock: SharedClock,
    decryption: DecryptionSettings,
    parked: parking_lot::Mutex<parked::ParkedStore>,
    /// Which Megolm message each event id carried (replay detection).
    replay: ReplayStore,
    /// One pass over the machine's outgoing requests at a time (key claims must not overlap).
    requests_lock: tokio::sync::Mutex<()>,
    /// Room key sharing and encryption happen one at a time per room (as matrix-sdk does);
    /// rooms proceed in parallel. Locks nobody holds are dropped.
    send_locks: parking_lot::Mutex<HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>>,
    /// Rooms known to be encrypted (encryption is never switched off once on).
    encrypted_rooms: parking_lot::Mutex<HashMap<OwnedRoomId, bool>>,
    delivery: parking_lot::Mutex<DeliveryState>,
    /// Key counts last fed to the machine: a transaction that repeats them (most do) and
    /// carries nothing else is not fed, saving a store write per transaction.
    /// (counts, when fed in ms). Fed again at least every [`KEY_COUNTS_REFEED_MS`] so the
    /// machine's time-based key upkeep (fallback key rotation) still runs.
    last_key_counts: parking_lot::Mutex<Option<(KeyCounts, u64)>>,
    delivery_changed: tokio::sync::Notify,
    /// Room key requests the bot sent for keys that never came (see [`key_recovery`]).
    key_requests: parking_lot::Mutex<key_recovery::KeyRequests>,
    /// Room keys recovered by asking their sender.
    keys_recovered: std::sync::atomic::AtomicU64,
}

/// The bot's crypto: cheap to clone, share it between tasks.
#[derive(Clone)]
pub struct BotCrypto {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BotCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotCrypto")
            .field("user_id", &self.inner.device.user_id)
            .field("device_id", &self.inner.device.device_id)
            .finish()
    }
}

impl BotCrypto {
    /// Provisions (or reuses) the bot's device, opens its store, uploads its keys and sets up
    /// cross-signing. Fails loudly on anything that would leave the bot unable to decrypt.
    pub async fn start(settings: CryptoSettings, clock: SharedClock) -> Result<Self, CryptoError> {
        let client = settings.client.with_retry(RetryPolicy::CRYPTO_DEVICE);
        std::fs::create_dir_all(&settings.data_dir).map_err(|e| CryptoError::DeviceFile {
            path: settings.data_dir.clone(),
            reason: e.to_string(),
        })?;
        let device = device::provision(&client, &settings.data_dir, settings.msc4190).await?;

        let key = match settings.store_key {
            Some(k) => k,
            None => device::load_or_create_store_key(&settings.data_dir)?,
        };
        let store_dir = settings.data_dir.join("crypto");
        let store = SqliteCryptoStore::open_with_key(&store_dir, Some(&key))
            .await
            .map_err(|e| CryptoError::StoreOpen {
                path: store_dir.clone(),
                reason: e.to_string(),
            })?;
        let machine = OlmMachine::with_store(&device.user_id, &device.device_id, store, None)
            .await
            .map_err(|e| CryptoError::StoreOpen {
                path: store_dir.clone(),
                reason: e.to_string(),
            })?;
        // The bot asks senders for lost keys itself (key_recovery); the machine's own requests
        // would go only to the bot's own devices, which have none to give.
        machine.set_room_key_requests_enabled(false);
        let parked = parked::ParkedStore::open(&store_dir.join("parked"))?;
        let replay = ReplayStore::open(&store_dir.join("replay"))?;

        let identity = device.identity();
        let this = Self {
            inner: Arc::new(Inner {
                machine,
                client,
                identity,
                device,
                settings,
                clock,
                // Decrypt from everyone; policy decides what an unverified sender may do, with
                // the trust state in hand.
                decryption: DecryptionSettings {
                    sender_device_trust_requirement: TrustRequirement::Untrusted,
                },
                parked: parking_lot::Mutex::new(parked),
                replay,
                requests_lock: tokio::sync::Mutex::new(()),
                send_locks: parking_lot::Mutex::new(HashMap::new()),
                encrypted_rooms: parking_lot::Mutex::new(HashMap::new()),
                delivery: parking_lot::Mutex::new(DeliveryState::default()),
                last_key_counts: parking_lot::Mutex::new(None),
                delivery_changed: tokio::sync::Notify::new(),
                key_requests: parking_lot::Mutex::new(key_recovery::KeyRequests::default()),
                keys_recovered: std::sync::atomic::AtomicU64::new(0),
            }),
        };
        this.check_server_has_our_keys().await?;
        this.process_outgoing_requests().await?;
        this.bootstrap_cross_signing().await?;
        tracing::info!(
            user_id = %this.inner.device.user_id,
            device_id = %this.inner.device.device_id,
            ed25519 = %this.inner.machine.identity_keys().ed25519,
            parked = this.inner.parked.lock().len(),
            "bot device ready for end-to-end encryption"
        );
        Ok(this)
    }

    /// Refuses to run when the homeserver holds other identity keys for the bot's device than
    /// the store: the store was lost or swapped, clients would refuse the new keys for an old
    /// device id, and the bot would silently read nothing.
    async fn check_server_has_our_keys(&self) -> Result<(), CryptoError> {
        let device = &self.inner.device;
        let mut query = get_keys::v3::Request::new();
        query
            .device_keys
            .insert(device.user_id.clone(), vec![device.device_id.clone()]);
        let response = self
            .inner
            .client
            .send(query, Identity::BotDevice(&self.inner.identity))
            .await?;
        let published = response
            .device_keys
            .get(&device.user_id)
            .and_then(|devices| devices.get(&device.device_id))
            .and_then(|raw| raw.deserialize_as_unchecked::<Value>().ok())
            .and_then(|keys| {
                keys.pointer(&format!("/keys/ed25519:{}", device.device_id))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        let ours = self.ed25519_key();
        match published {
            Some(theirs) if theirs != ours => Err(CryptoError::StoreOpen {
                path: self.inner.settings.data_dir.join("crypto"),
                reason: format!(
                    "the homeserver has other keys for the bot's device {} than this crypto \
                     store: the store was lost or replaced. Stop mxpay, move {} aside and start \
                     again to create a new device (messages encrypted for the old device stay \
                     unreadable)",
                    device.device_id,
                    self.inner
                        .settings
                        .data_dir
                        .join(device::DEVICE_FILE)
                        .display()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The bot's user id.
    pub fn user_id(&self) -> &UserId {
        &self.inner.device.user_id
    }

    /// The bot's device id.
    pub fn device_id(&self) -> &ruma::DeviceId {
        &self.inner.device.device_id
    }

    /// The bot's device ed25519 key (base64), as clients show it for verification.
    pub fn ed25519_key(&self) -> String {
        self.inner.machine.identity_keys().ed25519.to_base64()
    }

    /// The underlying machine (for tests and diagnostics).
    pub fn machine(&self) -> &OlmMachine {
        &self.inner.machine
    }

    /// How many events wait for their room key.
    pub fn parked_count(&self) -> usize {
        self.inner.parked.lock().len()
    }

    /// How many room keys the bot recovered by asking their sender since it started.
    pub fn keys_recovered(&self) -> u64 {
        self.inner
            .keys_recovered
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts parked events without keeping the device alive (for a metrics scrape hook,
    /// which must not form a cycle: the device's homeserver client holds the metrics): `None` once
    /// the device is gone.
    pub fn parked_counter(&self) -> impl Fn() -> Option<usize> + Send + Sync + 'static {
        let inner = Arc::downgrade(&self.inner);
        move || inner.upgrade().map(|inner| inner.parked.lock().len())
    }

    // ----- incoming -------------------------------------------------------------------------

    /// Processes one transaction body: E2E extensions first, then its room events.
    ///
    /// Store failures are errors (the transaction must not be marked processed); homeserver
    /// failures while sending key requests are logged and retried on the next transaction.
    pub async fn ingest(&self, body: &Value) -> Result<Ingested, CryptoError> {
        let inner = &self.inner;
        let started = std::time::Instant::now();
        let changes =
            extensions::device_changes(body, &inner.device.user_id, &inner.device.device_id);
        self.note_delivery(&changes);
        if changes.to_device_dropped > 0 {
            tracing::debug!(
                dropped = changes.to_device_dropped,
                "to-device events for other devices ignored"
            );
        }

        let mut room_keys = Vec::new();
        let counts_now: KeyCounts = (
            changes.one_time_key_counts.clone(),
            changes.unused_fallback_keys.clone(),
        );
        let now_ms = inner.clock.now_ms();
        let only_repeated_counts = changes.to_device.is_empty()
            && changes.changed.is_empty()
            && changes.left.is_empty()
            && inner
                .last_key_counts
                .lock()
                .as_ref()
                .is_some_and(|(counts, fed_ms)| {
                    counts == &counts_now && now_ms.saturating_sub(*fed_ms) < KEY_COUNTS_REFEED_MS
                });
        if !changes.is_empty() && !only_repeated_counts {
            let mut lists = DeviceLists::new();
            lists.changed = changes.changed.clone();
            lists.left = changes.left.clone();
            let counts = changes.one_time_key_counts.clone().unwrap_or_default();
            let sync = EncryptionSyncChanges {
                to_device_events: changes.to_device.clone(),
                changed_devices: &lists,
                one_time_keys_counts: &counts,
                unused_fallback_keys: changes.unused_fallback_keys.as_deref(),
                next_batch_token: None,
            };
            // Forwarded keys the bot asked for must be read before the machine drops them.
            let peeked = self.peek_forwarded_keys(&changes.to_device).await?;
            let (to_device, keys) = inner
                .machine
                .receive_sync_changes(sync, &inner.decryption)
                .await
                .map_err(|e| match e {
                    matrix_sdk_crypto::OlmError::Store(s) => CryptoError::Store(s),
                    other => CryptoError::Encrypt(other.to_string()),
                })?;
            room_keys = keys
                .into_iter()
                .map(|k| (k.room_id, k.session_id))
                .collect();
            room_keys.extend(self.accept_forwarded_keys(&to_device, peeked).await?);
            *inner.last_key_counts.lock() = Some((counts_now, now_ms));
        }

        let events: Vec<&Value> = body
            .get("events")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let fed_at = started.elapsed();
        self.track_from_events(&events).await?;
        self.send_outgoing_logged().await;
        let requests_done_at = started.elapsed();

        let mut out = Ingested::default();
        // Older, parked events first: those decrypted before whose handling did not finish
        // (a retried transaction, a restart), then those whose keys came with this one.
        let mut offered = std::collections::BTreeSet::new();
        let unfinished = inner.parked.lock().handed_up();
        for parked in unfinished {
            offered.insert(parked.event_id.clone());
            if let Some(event) = self.retry_parked(&parked).await? {
                out.events.push(event);
            }
        }
        for (room_id, session_id) in &room_keys {
            let waiting = inner.parked.lock().waiting_for(room_id, session_id);
            for parked in waiting {
                if !offered.insert(parked.event_id.clone()) {
                    continue;
                }
                if let Some(event) = self.retry_parked(&parked).await? {
                    out.events.push(event);
                }
            }
        }
        for event in events {
            match self.decrypt_one(event).await? {
                Decrypted::Event(e) => out.events.push(*e),
                Decrypted::Parked(id) => out.parked.push(id),
                Decrypted::Undecryptable(id) => out.undecryptable.push(id),
                Decrypted::Replayed(id) => out.replayed.push(id),
                Decrypted::Skipped => {}
            }
        }
        tracing::debug!(
            feed_us = fed_at.as_micros() as u64,
            requests_us = (requests_done_at - fed_at).as_micros() as u64,
            decrypt_us = (started.elapsed() - requests_done_at).as_micros() as u64,
            events = out.events.len(),
            "transaction ingested"
        );
        Ok(out)
    }

    fn note_delivery(&self, changes: &extensions::DeviceChanges) {
        let mut delivery = self.inner.delivery.lock();
        let mut changed = false;
        if changes.saw_msc3202 && !delivery.saw_msc3202 {
            delivery.saw_msc3202 = true;
            changed = true;
        }
        if changes.one_time_key_counts.is_some() && !delivery.saw_own_key_counts {
            delivery.saw_own_key_counts = true;
            changed = true;
        }
        if let Some(nonce) = delivery.self_check_nonce.clone() {
            let seen = changes.to_device.iter().any(|raw| {
                let v: Value = raw.deserialize_as_unchecked().unwrap_or_default();
                v.get("type").and_then(Value::as_str) == Some(SELF_CHECK_EVENT_TYPE)
                    && v.pointer("/content/nonce").and_then(Value::as_str) == Some(nonce.as_str())
            });
            if seen && !delivery.self_check_seen {
                delivery.self_check_seen = true;
                changed = true;
            }
        }
        drop(delivery);
        if changed {
            self.inner.delivery_changed.notify_waiters();
        }
    }

    /// Tracks device lists of room members: all members when the bot joins a room, the joiner
    /// when someone joins a room the bot is in. Notes rooms that turn on encryption.
    async fn track_from_events(&self, events: &[&Value]) -> Result<(), CryptoError> {
        let bot = self.inner.device.user_id.as_str();
        let mut users: Vec<OwnedUserId> = Vec::new();
        for event in events {
            // Before any event of the transaction is acted on: membership and join rules as
            // the stream says (state events are never encrypted).
            self.inner.client.observe_room_event(event);
            let kind = event.get("type").and_then(Value::as_str);
            let room_id = event
                .get("room_id")
                .and_then(Value::as_str)
                .and_then(|r| RoomId::parse(r).ok());
            let Some(room_id) = room_id else { continue };
            match kind {
                // Only the room's state turns encryption on: a message-like event of that type
                // (no state key) is just a message anyone may send.
                Some("m.room.encryption")
                    if event.get("state_key").and_then(Value::as_str) == Some("") =>
                {
                    self.inner.encrypted_rooms.lock().insert(room_id, true);
                }
                Some("m.room.member") => {
                    let membership = event.pointer("/content/membership").and_then(Value::as_str);
                    let state_key = event.get("state_key").and_then(Value::as_str);
                    if membership != Some("join") {
                        continue;
                    }
                    match state_key {
                        Some(k) if k == bot => {
                            if let Err(e) = self.track_room(&room_id).await {
                                if matches!(e, CryptoError::Store(_)) {
                                    return Err(e);
                                }
                                tracing::warn!(%room_id, error = %e, "cannot list room members");
                            }
                        }
                        Some(k) => {
                            if let Ok(user) = UserId::parse(k) {
                                users.push(user);
                            }
                        }
                        None => {}
                    }
                }
                _ => {}
            }
        }
        if !users.is_empty() {
            self.inner
                .machine
                .update_tracked_users(user_refs(&users))
                .await?;
        }
        Ok(())
    }

    /// Starts tracking the devices of every joined member of `room_id` (call when the bot
    /// joined) and queries their keys.
    pub async fn track_room(&self, room_id: &RoomId) -> Result<(), CryptoError> {
        let members = self.joined_members(room_id).await?;
        self.inner
            .machine
            .update_tracked_users(user_refs(&members))
            .await?;
        Ok(())
    }

    /// The room's joined members, asked of the homeserver once and then kept fresh by the
    /// transaction stream (see [`crate::homeserver::room_cache`]).
    async fn joined_members(&self, room_id: &RoomId) -> Result<Vec<OwnedUserId>, CryptoError> {
        Ok(self.inner.client.joined_members(room_id).await?)
    }

    async fn decrypt_one(&self, event: &Value) -> Result<Decrypted, CryptoError> {
        let get = |k: &str| event.get(k).and_then(Value::as_str);
        let (Some(room_id), Some(event_id), Some(sender), Some(kind)) =
            (get("room_id"), get("event_id"), get("sender"), get("type"))
        else {
            return Ok(Decrypted::Skipped);
        };
        let (Ok(room_id), Ok(event_id), Ok(sender)) = (
            RoomId::parse(room_id),
            EventId::parse(event_id),
            UserId::parse(sender),
        ) else {
            return Ok(Decrypted::Skipped);
        };
        if sender == self.inner.device.user_id {
            // The bot's own echo: acting on it would make the bot answer itself.
            return Ok(Decrypted::Skipped);
        }
        let origin_server_ts_ms = event
            .get("origin_server_ts")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if kind != "m.room.encrypted" {
            let decrypted = DecryptedEvent {
                room_id,
                event_id,
                sender,
                sender_device: None,
                event_type: kind.to_owned(),
                state_key: get("state_key").map(str::to_owned),
                content: event.get("content").cloned().unwrap_or(Value::Null),
                origin_server_ts_ms,
                sent_before_ms: None,
                verification_state: TrustState::NotEncrypted,
                was_encrypted: false,
                was_parked: false,
            };
            log_event(&decrypted);
            return Ok(Decrypted::Event(Box::new(decrypted)));
        }
        if event.pointer("/content/algorithm").is_none() {
            // Redacted (content stripped): nothing to decrypt and nobody to tell.
            return Ok(Decrypted::Skipped);
        }
        let session_id = event
            .pointer("/content/session_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        match self.try_decrypt(event, &room_id, false).await? {
            Attempt::Ok(decrypted) => Ok(Decrypted::Event(decrypted)),
            Attempt::Replay => Ok(Decrypted::Replayed(event_id)),
            Attempt::MissingKey => {
                let parked = ParkedEvent {
                    room_id: room_id.clone(),
                    event_id: event_id.clone(),
                    sender: sender.clone(),
                    session_id,
                    event: event.clone(),
                    parked_at_ms: self.inner.clock.now_ms(),
                    notified: false,
                    handed_up: 0,
                };
                if self.inner.parked.lock().park(parked)? {
                    tracing::info!(%room_id, %event_id, %sender, "room key missing; event parked");
                    Ok(Decrypted::Parked(event_id))
                } else {
                    tracing::warn!(%room_id, %event_id, "parked-event store full");
                    self.tell_undecryptable(&room_id, &event_id, &sender).await;
                    Ok(Decrypted::Undecryptable(event_id))
                }
            }
            Attempt::Never(reason) => {
                tracing::warn!(%room_id, %event_id, %sender, ?reason, "event cannot be decrypted");
                self.tell_undecryptable(&room_id, &event_id, &sender).await;
                Ok(Decrypted::Undecryptable(event_id))
            }
        }
    }

    async fn try_decrypt(
        &self,
        event: &Value,
        room_id: &RoomId,
        was_parked: bool,
    ) -> Result<Attempt, CryptoError> {
        let raw: Raw<EncryptedEvent> = Raw::from_json_string(event.to_string())
            .map_err(|e| CryptoError::Homeserver(format!("event is not JSON: {e}")))?;
        let result = self
            .inner
            .machine
            .try_decrypt_room_event(&raw, room_id, &self.inner.decryption)
            .await?;
        match result {
            RoomEventDecryptionResult::Decrypted(decrypted) => {
                let Some(sent_before_ms) = self.check_replay(event, room_id)? else {
                    return Ok(Attempt::Replay);
                };
                let plain: Value = decrypted
                    .event
                    .deserialize_as_unchecked()
                    .unwrap_or_default();
                let info = &decrypted.encryption_info;
                let get = |k: &str| event.get(k).and_then(Value::as_str);
                let out = DecryptedEvent {
                    room_id: room_id.to_owned(),
                    event_id: get("event_id")
                        .and_then(|e| EventId::parse(e).ok())
                        .ok_or_else(|| CryptoError::Homeserver("event without id".to_owned()))?,
                    sender: info.sender.clone(),
                    sender_device: info.sender_device.clone(),
                    event_type: plain
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    state_key: None,
                    content: plain.get("content").cloned().unwrap_or(Value::Null),
                    origin_server_ts_ms: event
                        .get("origin_server_ts")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    sent_before_ms,
                    verification_state: self
                        .current_trust(
                            &info.sender,
                            info.sender_device.as_deref(),
                            TrustState::from_verification(&info.verification_state),
                        )
                        .await?,
                    was_encrypted: true,
                    was_parked,
                };
                log_event(&out);
                Ok(Attempt::Ok(Box::new(out)))
            }
            RoomEventDecryptionResult::UnableToDecrypt(info) => {
                if info.reason.is_missing_room_key() {
                    Ok(Attempt::MissingKey)
                } else {
                    Ok(Attempt::Never(info.reason))
                }
            }
        }
    }

    /// Records which Megolm message `event` (just decrypted) carried, durably, before anything
    /// acts on it. `Ok(None)`: the message came before under another event id (or below its
    /// session's pruned floor), a replay: logged without content, counted, never acted on.
    /// `Ok(Some(bound))`: fresh; `bound` is when a later message of its session was first seen.
    fn check_replay(
        &self,
        event: &Value,
        room_id: &RoomId,
    ) -> Result<Option<Option<u64>>, CryptoError> {
        let event_id = event
            .get("event_id")
            .and_then(Value::as_str)
            .and_then(|e| EventId::parse(e).ok())
            .ok_or_else(|| CryptoError::Homeserver("event without id".to_owned()))?;
        let content = event.get("content").unwrap_or(&Value::Null);
        let Some(message) = MegolmMessageId::from_content(content) else {
            // It decrypted, so this cannot happen with a well-formed Megolm message; without
            // its identity the bot cannot tell a replay, so it acts on nothing.
            tracing::error!(%room_id, %event_id, "decrypted event without a readable Megolm index; dropped");
            return Ok(None);
        };
        let check = self.inner.replay.check_and_record(
            room_id,
            &message,
            &event_id,
            self.inner.clock.now_ms(),
        )?;
        match check {
            MessageCheck::Fresh { sent_before_ms } => Ok(Some(sent_before_ms)),
            MessageCheck::Replay { first_event_id } => {
                tracing::warn!(
                    %room_id,
                    %event_id,
                    first_event_id = first_event_id.as_ref().map(|e| e.as_str()).unwrap_or("-"),
                    session_id = %message.session_id,
                    message_index = message.index,
                    "encrypted message delivered again under another event id (replay); ignored"
                );
                if let Some(metrics) = &self.inner.settings.metrics {
                    metrics.replayed_event();
                }
                Ok(None)
            }
        }
    }

    /// Trust in the sender as it stands now. The state a Megolm session carries was fixed when
    /// its key arrived, so a cross-signing reset after that (by the owner on a new device, or by
    /// whoever took over the account) would not show; the current device signature and the
    /// current identity are checked instead. An identity whose master key differs from the one
    /// first seen (pinned) and not yet accepted counts as [`TrustState::VerificationViolation`].
    async fn current_trust(
        &self,
        sender: &UserId,
        device_id: Option<&ruma::DeviceId>,
        from_session: TrustState,
    ) -> Result<TrustState, CryptoError> {
        if !matches!(
            from_session,
            TrustState::Verified
                | TrustState::UnverifiedIdentity
                | TrustState::VerificationViolation
        ) {
            return Ok(from_session);
        }
        let machine = &self.inner.machine;
        if let Some(device_id) = device_id {
            match machine.get_device(sender, device_id, None).await? {
                // Deleted since its room key came: nothing vouches for it now.
                None => return Ok(TrustState::UnknownDevice),
                Some(device) if !device.is_cross_signed_by_owner() => {
                    return Ok(TrustState::UnsignedDevice)
                }
                Some(_) => {}
            }
        }
        Ok(match machine.get_identity(sender, None).await? {
            Some(UserIdentity::Other(identity)) => {
                if identity.identity_needs_user_approval() || identity.has_verification_violation()
                {
                    TrustState::VerificationViolation
                } else if identity.is_verified() {
                    TrustState::Verified
                } else {
                    TrustState::UnverifiedIdentity
                }
            }
            _ => from_session,
        })
    }

    /// Accepts `user`'s current cross-signing identity as theirs from now on (they proved who
    /// they are another way: their PIN). Returns `false` when there was nothing to accept.
    pub async fn accept_identity(&self, user: &UserId) -> Result<bool, CryptoError> {
        let Some(UserIdentity::Other(identity)) =
            self.inner.machine.get_identity(user, None).await?
        else {
            return Ok(false);
        };
        if identity.has_verification_violation() {
            // Withdrawing the old verification also pins the current master key.
            identity.withdraw_verification().await?;
        } else if identity.identity_needs_user_approval() {
            identity.pin_current_master_key().await?;
        } else {
            return Ok(false);
        }
        tracing::info!(%user, "accepted the user's new cross-signing identity");
        Ok(true)
    }

    /// Tries a parked event again. A decrypted one stays parked (marked as handed up) until
    /// the handler is done with it and calls [`BotCrypto::forget_parked`].
    async fn retry_parked(
        &self,
        parked: &ParkedEvent,
    ) -> Result<Option<DecryptedEvent>, CryptoError> {
        match self
            .try_decrypt(&parked.event, &parked.room_id, true)
            .await?
        {
            Attempt::Ok(decrypted) => {
                if parked.handed_up >= parked::HANDED_UP_MAX {
                    tracing::error!(
                        room_id = %parked.room_id,
                        event_id = %parked.event_id,
                        handed_up = parked.handed_up,
                        "giving up on a parked event the handler kept failing on; dropped"
                    );
                    self.inner.parked.lock().remove(&parked.event_id)?;
                    return Ok(None);
                }
                self.inner.parked.lock().mark_handed_up(&parked.event_id)?;
                let waited_ms = self
                    .inner
                    .clock
                    .now_ms()
                    .saturating_sub(parked.parked_at_ms);
                tracing::info!(
                    room_id = %parked.room_id,
                    event_id = %parked.event_id,
                    waited_ms,
                    handed_up = parked.handed_up + 1,
                    "parked event decrypted after its room key arrived"
                );
                Ok(Some(*decrypted))
            }
            Attempt::MissingKey => Ok(None),
            Attempt::Replay => {
                self.inner.parked.lock().remove(&parked.event_id)?;
                Ok(None)
            }
            Attempt::Never(reason) => {
                tracing::warn!(event_id = %parked.event_id, ?reason, "parked event cannot be decrypted");
                self.inner.parked.lock().remove(&parked.event_id)?;
                if !parked.notified {
                    self.tell_undecryptable(&parked.room_id, &parked.event_id, &parked.sender)
                        .await;
                }
                Ok(None)
            }
        }
    }

    /// Removes a parked event once the handler is done with it (handled, or failed for good):
    /// call it for every event with `was_parked` after handling it; until then the event is
    /// handed up again with each transaction. Nothing happens for an event not parked.
    pub fn forget_parked(&self, event_id: &EventId) -> Result<(), CryptoError> {
        self.inner.parked.lock().remove(&event_id.to_owned())?;
        Ok(())
    }

    /// Tells the senders of events parked longer than the configured wait that the bot cannot
    /// read them, drops events parked longer than the maximum age, and prunes a bounded slice
    /// of old replay records. Call it periodically.
    /// Returns how many senders were told.
    pub async fn sweep_parked(&self) -> Result<usize, CryptoError> {
        let now_ms = self.inner.clock.now_ms();
        // The replay records age out here too, a bounded slice per sweep (never at start-up).
        let pruned = self.inner.replay.prune(now_ms, replay::PRUNE_SCAN_MAX)?;
        if pruned > 0 {
            tracing::info!(
                pruned,
                "old replay records pruned to their sessions' floors"
            );
        }
        let all = self.inner.parked.lock().all();
        self.request_missing_keys(&all, now_ms).await;
        let mut told = 0;
        for parked in all {
            let age_ms = now_ms.saturating_sub(parked.parked_at_ms);
            if age_ms >= self.inner.settings.parked_max_age_ms {
                tracing::info!(event_id = %parked.event_id, age_ms, "dropping parked event");
                self.inner.parked.lock().remove(&parked.event_id)?;
            } else if !parked.notified
                && parked.handed_up == 0
                && age_ms >= self.inner.settings.undecryptable_notice_after_ms
            {
                self.tell_undecryptable(&parked.room_id, &parked.event_id, &parked.sender)
                    .await;
                self.inner.parked.lock().mark_notified(&parked.event_id)?;
                told += 1;
            }
        }
        Ok(told)
    }

    /// A notice in the room, as a reply: a person learns their message was not read.
    async fn tell_undecryptable(&self, room_id: &RoomId, event_id: &EventId, sender: &UserId) {
        let body = format!(
            "{sender}: I could not decrypt your message (the encryption keys for it did not \
             reach me). Please send it again; if this keeps happening, check that your \
             client shares keys with unverified devices."
        );
        if let Err(e) = self.send_notice(room_id, &body, Some(event_id), None).await {
            tracing::warn!(%room_id, %event_id, error = %e, "could not tell the sender");
        }
    }

    // ----- outgoing requests ----------------------------------------------------------------

    async fn send_outgoing_logged(&self) {
        if let Err(e) = self.process_outgoing_requests().await {
            tracing::warn!(error = %e, "sending key requests failed; retrying with the next transaction");
        }
    }

    /// Sends what the machine wants sent and feeds the answers back, in a bounded loop.
    /// A refused request is logged and left for the machine to hand out again.
    pub async fn process_outgoing_requests(&self) -> Result<(), CryptoError> {
        let _guard = self.inner.requests_lock.lock().await;
        let machine = &self.inner.machine;
        // Olm sessions with devices that asked for a fresh one ("unwedging").
        if let Some((id, request)) = machine.get_missing_sessions(std::iter::empty()).await? {
            self.send_claim(&id, request).await?;
        }
        for _ in 0..OUTGOING_ROUNDS_MAX {
            let requests = machine.outgoing_requests().await?;
            if requests.is_empty() {
                return Ok(());
            }
            for request in requests {
                self.send_request(&request).await?;
            }
        }
        Ok(())
    }

    async fn send_request(&self, request: &OutgoingRequest) -> Result<(), CryptoError> {
        let inner = &self.inner;
        let device = Identity::BotDevice(&inner.identity);
        let id = request.request_id();
        let result: Result<(), CryptoError> = match request.request() {
            AnyOutgoingRequest::KeysUpload(r) => self.send_and_mark(device, id, r.clone()).await,
            AnyOutgoingRequest::KeysQuery(r) => {
                let mut query = get_keys::v3::Request::new();
                query.device_keys = r.device_keys.clone();
                self.send_and_mark(device, id, query).await
            }
            AnyOutgoingRequest::KeysClaim(r) => self.send_claim(id, r.clone()).await,
            AnyOutgoingRequest::ToDeviceRequest(r) => self.send_to_device(r).await,
            AnyOutgoingRequest::SignatureUpload(r) => {
                self.send_and_mark(device, id, r.clone()).await
            }
            AnyOutgoingRequest::RoomMessage(r) => {
                let content =
                    Raw::new(&*r.content).map_err(|e| CryptoError::Encrypt(e.to_string()))?;
                let request = send_message_event::v3::Request::new_raw(
                    r.room_id.clone(),
                    r.txn_id.clone(),
                    r.content.event_type(),
                    content,
                );
                self.send_and_mark(Identity::Appservice, id, request).await
            }
        };
        match result {
            Err(CryptoError::Transport(e)) if e.is_refusal() => {
                tracing::warn!(error = %e, "homeserver refused a key request");
                Ok(())
            }
            other => other,
        }
    }

    async fn send_claim(
        &self,
        id: &TransactionId,
        request: ruma::api::client::keys::claim_keys::v3::Request,
    ) -> Result<(), CryptoError> {
        self.send_and_mark(Identity::BotDevice(&self.inner.identity), id, request)
            .await
    }

    async fn send_to_device(&self, request: &ToDeviceRequest) -> Result<(), CryptoError> {
        let ruma_request = send_event_to_device::v3::Request::new_raw(
            request.event_type.clone(),
            request.txn_id.clone(),
            request.messages.clone(),
        );
        self.send_and_mark(
            Identity::BotDevice(&self.inner.identity),
            &request.txn_id,
            ruma_request,
        )
        .await
    }

    /// Sends one request the machine handed out, as `who`, and reports the answer back to the
    /// machine under the request's `id` (without that, the machine hands the request out again).
    async fn send_and_mark<R>(
        &self,
        who: Identity<'_>,
        id: &TransactionId,
        request: R,
    ) -> Result<(), CryptoError>
    where
        R: ruma::api::OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: ruma::api::auth_scheme::AuthScheme<
            Input<'a> = ruma::api::auth_scheme::SendAccessToken<'a>,
        >,
        for<'a> &'a R::IncomingResponse: Into<AnyIncomingResponse<'a>>,
    {
        let response = self.inner.client.send(request, who).await?;
        self.inner
            .machine
            .mark_request_as_sent(id, &response)
            .await
            .map_err(olm_err)
    }

    // ----- cross-signing --------------------------------------------------------------------

    /// Creates the bot's cross-signing identity if its store has none, uploads it and signs the
    /// bot's device with it, so clients see the bot's device as signed by its owner.
    ///
    /// The signing keys go up with the AS token: Synapse lets appservices set (and replace)
    /// cross-signing keys without user-interactive auth, which the bot could not complete.
    pub async fn bootstrap_cross_signing(&self) -> Result<(), CryptoError> {
        let machine = &self.inner.machine;
        let status = machine.cross_signing_status().await;
        if status.is_complete() {
            return Ok(());
        }
        let requests = machine.bootstrap_cross_signing(false).await?;
        if let Some(upload) = &requests.upload_keys_req {
            self.send_request(upload).await?;
        }
        let keys = requests.upload_signing_keys_req;
        let mut upload = upload_signing_keys::v3::Request::new();
        upload.master_key = keys.master_key.map(|k| k.to_raw());
        upload.self_signing_key = keys.self_signing_key.map(|k| k.to_raw());
        upload.user_signing_key = keys.user_signing_key.map(|k| k.to_raw());
        let response = self.inner.client.send(upload, Identity::Appservice).await?;
        machine
            .mark_request_as_sent(
                &TransactionId::new(),
                AnyIncomingResponse::SigningKeysUpload(&response),
            )
            .await
            .map_err(olm_err)?;
        let signatures = requests.upload_signatures_req;
        self.send_and_mark(
            Identity::BotDevice(&self.inner.identity),
            &TransactionId::new(),
            signatures,
        )
        .await?;
        tracing::info!("bot cross-signing identity created and its device signed");
        Ok(())
    }

    // ----- sending --------------------------------------------------------------------------

    /// Whether `room_id` is encrypted (asks the homeserver once per room, then remembers).
    pub async fn room_is_encrypted(&self, room_id: &RoomId) -> Result<bool, CryptoError> {
        if let Some(known) = self.inner.encrypted_rooms.lock().get(room_id) {
            if *known {
                return Ok(true);
            }
        }
        let request = get_state_event_for_key::v3::Request::new(
            room_id.to_owned(),
            StateEventType::RoomEncryption,
            String::new(),
        );
        let encrypted = match self.inner.client.send(request, Identity::Appservice).await {
            Ok(_) => true,
            Err(e) if e.errcode() == Some("M_NOT_FOUND") => false,
            Err(e) => return Err(e.into()),
        };
        if encrypted {
            self.inner
                .encrypted_rooms
                .lock()
                .insert(room_id.to_owned(), true);
        }
        Ok(encrypted)
    }

    /// How room keys are shared in a room of `members` joined members (the bot included).
    fn encryption_settings(&self, members: usize) -> EncryptionSettings {
        let private = members <= 2;
        let sharing_strategy =
            if private && !self.inner.settings.share_private_keys_with_unsigned_devices {
                CollectStrategy::IdentityBasedStrategy
            } else {
                CollectStrategy::AllDevices
            };
        EncryptionSettings {
            sharing_strategy,
            ..EncryptionSettings::default()
        }
    }

    /// Sends a message-like event as the bot: encrypted for every joined member's devices in an
    /// encrypted room, plaintext otherwise. `txn_id` makes a retried send idempotent.
    pub async fn send_event(
        &self,
        room_id: &RoomId,
        event_type: &str,
        content: Value,
        txn_id: Option<OwnedTransactionId>,
    ) -> Result<OwnedEventId, CryptoError> {
        let txn_id = txn_id.unwrap_or_else(TransactionId::new);
        let inner = &self.inner;
        let (send_type, send_content) = if self.room_is_encrypted(room_id).await? {
            let room_lock = {
                let mut locks = inner.send_locks.lock();
                locks.retain(|_, lock| Arc::strong_count(lock) > 1);
                locks.entry(room_id.to_owned()).or_default().clone()
            };
            let _guard = room_lock.lock().await;
            let members = self.joined_members(room_id).await?;
            inner
                .machine
                .update_tracked_users(user_refs(&members))
                .await?;
            self.process_outgoing_requests().await?;
            {
                let _requests = inner.requests_lock.lock().await;
                if let Some((id, request)) = inner
                    .machine
                    .get_missing_sessions(user_refs(&members).into_iter())
                    .await?
                {
                    self.send_claim(&id, request).await?;
                }
            }
            let shares = inner
                .machine
                .share_room_key(
                    room_id,
                    user_refs(&members).into_iter(),
                    self.encryption_settings(members.len()),
                )
                .await
                .map_err(|e| match e {
                    matrix_sdk_crypto::OlmError::Store(s) => CryptoError::Store(s),
                    other => CryptoError::Encrypt(other.to_string()),
                })?;
            for share in shares {
                self.send_to_device(&share).await?;
            }
            let raw: Raw<AnyMessageLikeEventContent> = Raw::new(&content)
                .map_err(|e| CryptoError::Encrypt(e.to_string()))?
                .cast_unchecked();
            let encrypted = inner
                .machine
                .encrypt_room_event_raw(room_id, event_type, &raw)
                .await
                .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
            (
                "m.room.encrypted".to_owned(),
                encrypted.content.cast_unchecked(),
            )
        } else {
            let raw: Raw<AnyMessageLikeEventContent> = Raw::new(&content)
                .map_err(|e| CryptoError::Encrypt(e.to_string()))?
                .cast_unchecked();
            (event_type.to_owned(), raw)
        };
        let request = send_message_event::v3::Request::new_raw(
            room_id.to_owned(),
            txn_id,
            send_type.into(),
            send_content,
        );
        let response = inner.client.send(request, Identity::Appservice).await?;
        Ok(response.event_id)
    }

    /// Sends an `m.notice` (optionally as a reply, optionally with HTML).
    pub async fn send_notice(
        &self,
        room_id: &RoomId,
        body: &str,
        reply_to: Option<&EventId>,
        html: Option<&str>,
    ) -> Result<OwnedEventId, CryptoError> {
        let mut content = json!({"msgtype": "m.notice", "body": body});
        if let Some(html) = html {
            content["format"] = json!("org.matrix.custom.html");
            content["formatted_body"] = json!(html);
        }
        if let Some(event_id) = reply_to {
            content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": event_id}});
        }
        self.send_event(room_id, "m.room.message", content, None)
            .await
    }

    // ----- start-up diagnosis ---------------------------------------------------------------

    /// Checks that the homeserver delivers to-device events and key counts to the appservice:
    /// sends a to-device event to the bot's own device and waits (at most `timeout_ms`) for a
    /// transaction to bring it back. Call it once the appservice is listening. Logs the verdict
    /// as an error with the fix when delivery is incomplete.
    pub async fn check_homeserver_delivery(&self, timeout_ms: u64) -> DeliveryReport {
        let nonce = TransactionId::new().to_string();
        self.inner.delivery.lock().self_check_nonce = Some(nonce.clone());
        let mut messages: BTreeMap<
            OwnedUserId,
            BTreeMap<DeviceIdOrAllDevices, Raw<AnyToDeviceEventContent>>,
        > = BTreeMap::new();
        let content = Raw::new(&json!({"nonce": nonce}))
            .expect("json serialises")
            .cast_unchecked();
        messages
            .entry(self.inner.device.user_id.clone())
            .or_default()
            .insert(
                DeviceIdOrAllDevices::DeviceId(self.inner.device.device_id.clone()),
                content,
            );
        let request = send_event_to_device::v3::Request::new_raw(
            SELF_CHECK_EVENT_TYPE.into(),
            TransactionId::new(),
            messages,
        );
        if let Err(e) = self
            .inner
            .client
            .send(request, Identity::BotDevice(&self.inner.identity))
            .await
        {
            tracing::warn!(error = %e, "could not send the E2E delivery self-check");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let notified = self.inner.delivery_changed.notified();
            {
                let d = self.inner.delivery.lock();
                if d.self_check_seen && d.saw_own_key_counts {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let report = {
            let d = self.inner.delivery.lock();
            if !d.self_check_seen {
                DeliveryReport::MissingToDevice
            } else if !d.saw_own_key_counts {
                DeliveryReport::MissingKeyCounts
            } else {
                DeliveryReport::Complete
            }
        };
        match report {
            DeliveryReport::Complete => {
                tracing::info!(
                    "homeserver delivers to-device events and key counts (MSC2409/MSC3202)"
                )
            }
            DeliveryReport::MissingToDevice => tracing::error!(
                timeout_ms,
                "the homeserver did not deliver to-device events to mxpay: nobody can share \
                 room keys with the bot, so it cannot read encrypted rooms. On Synapse set \
                 experimental_features.msc2409_to_device_messages_enabled: true and \
                 msc3202_transaction_extensions: true in homeserver.yaml, and \
                 receive_ephemeral: true plus org.matrix.msc3202: true in the registration"
            ),
            DeliveryReport::MissingKeyCounts => tracing::error!(
                "the homeserver delivers to-device events but not the bot device's one-time key \
                 counts (MSC3202): the bot will run out of one-time keys. On Synapse set \
                 experimental_features.msc3202_transaction_extensions: true and \
                 org.matrix.msc3202: true in the registration"
            ),
        }
        report
    }
}

/// Borrowed user ids as the machine's iterator arguments want them. A named function, not a
/// closure: closures over borrowed ids make the futures above not `Send` (higher-ranked
/// lifetime inference).
fn user_refs(users: &[OwnedUserId]) -> Vec<&UserId> {
    users.iter().map(OwnedUserId::as_ref).collect()
}

fn olm_err(e: matrix_sdk_crypto::OlmError) -> CryptoError {
    match e {
        matrix_sdk_crypto::OlmError::Store(s) => CryptoError::Store(s),
        other => CryptoError::Encrypt(other.to_string()),
    }
}

/// One line per room event reaching the bot, without its content (it may hold a PIN).
fn log_event(event: &DecryptedEvent) {
    tracing::debug!(
        target: "mxpay::crypto::events",
        room_id = %event.room_id,
        event_id = %event.event_id,
        sender = %event.sender,
        sender_device = event.sender_device.as_ref().map(|d| d.as_str()).unwrap_or("-"),
        event_type = %event.event_type,
        verification_state = %event.verification_state,
        was_encrypted = event.was_encrypted,
        was_parked = event.was_parked,
        "room event received"
    );
}

/// One-time key counts and unused fallback key types of the bot's device, as last received.
type KeyCounts = (
    Option<BTreeMap<ruma::OneTimeKeyAlgorithm, ruma::UInt>>,
    Option<Vec<ruma::OneTimeKeyAlgorithm>>,
);

enum Decrypted {
    Event(Box<DecryptedEvent>),
    Parked(OwnedEventId),
    Undecryptable(OwnedEventId),
    Replayed(OwnedEventId),
    Skipped,
}

enum Attempt {
    Ok(Box<DecryptedEvent>),
    /// Decrypted, but the same ciphertext came before under another event id.
    Replay,
    MissingKey,
    Never(UnableToDecryptReason),
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_of_the_settings_hides_the_token_and_the_store_key() {
        let client = HomeserverClient::new(crate::homeserver::HomeserverClientConfig {
            base_url: "http://127.0.0.1:1".to_owned(),
            as_token: crate::secret::Secret::new("as-token-very-secret"),
            appservice_id: "mxpay".to_owned(),
            bot_user_id: "@_mxpay:localhost".try_into().unwrap(),
            retry: RetryPolicy::default(),
        })
        .unwrap();
        let mut settings = CryptoSettings::new(client, "/nonexistent");
        settings.store_key = Some([0xAB; 32]);
        let debug = format!("{settings:?} {settings:#?}");
        assert!(!debug.contains("very-secret"), "{debug}");
        assert!(!debug.to_ascii_lowercase().contains("abab"), "{debug}");
        assert!(!debug.contains("171, 171"), "{debug}");
    }
}
