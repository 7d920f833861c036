//! `mxpay demo`: a first payment, shown end to end, against the `mxpay dev` setup.
//!
//! Two new users with real encrypted clients (matrix-sdk, cross-signed) do what a person does:
//! the payer opens a DM with the bot and sets a PIN, both meet in an encrypted room, the payer
//! says `!pay`, confirms with the PIN in the DM, and the payee sees the receipt. Each step is
//! printed with its latency, then both balances (from the admin API). Exit status 0 only when
//! the payment completed. Starts `mxpay dev` for the time of the demo if it is not running.
//! New users each run, so it can run again and again (each run funds its payer once).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use matrix_sdk::config::SyncSettings;
use matrix_sdk::event_handler::RawEvent;
use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::events::{AnySyncTimelineEvent, InitialStateEvent};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, RoomId};
use matrix_sdk::{Client, Room};
use serde_json::Value;

/// Longest wait for one step (the first encrypted message sets up sessions: a few seconds).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for `mxpay dev` to come up when the demo starts it (a first run installs
/// Synapse).
const DEV_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// What the payer is funded with, and pays.
const FUNDS: &str = "10.00";
const PAYMENT: &str = "1.00";
const CURRENCY: &str = "EUR";
/// The demo payer's PIN (a throwaway user; not one of the most common PINs).
const DEMO_PIN: &str = "4821";

/// `mxpay demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The `mxpay dev` setup (default: `.dev/` in the mxpay repository).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Errors of `mxpay demo`: the step that failed and why.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The dev setup could not be found or started.
    #[error("the dev setup: {0}")]
    Setup(String),
    /// A step did not complete.
    #[error("step \"{step}\" failed: {reason}")]
    Step {
        /// The step.
        step: &'static str,
        /// Why.
        reason: String,
    },
}

fn step_err(step: &'static str) -> impl Fn(String) -> DemoError {
    move |reason| DemoError::Step { step, reason }
}

/// Runs the demo; `Ok` only when the payment completed and the payee saw the receipt.
pub fn run(args: DemoArgs) -> Result<(), DemoError> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => super::dev::default_dir().map_err(|e| DemoError::Setup(e.to_string()))?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let mut started_dev = None;
    let result = runtime.block_on(async {
        let setup = match Setup::read(&dir) {
            Ok(setup) if setup.is_ready().await => setup,
            _ => {
                println!("mxpay dev is not running; starting it for the demo...");
                started_dev = Some(start_dev(&dir)?);
                let setup = Setup::read(&dir)?;
                if !setup.is_ready().await {
                    return Err(DemoError::Setup(
                        "mxpay dev did not become ready".to_owned(),
                    ));
                }
                setup
            }
        };
        demo(&setup).await
    });
    if let Some(mut dev) = started_dev {
        super::dev::stop_child(&mut dev);
    }
    result
}

/// What the demo needs of the dev setup.
struct Setup {
    homeserver_url: String,
    mxpay_url: String,
    shared_secret: String,
    tokens: crate::admin::token::TokenAuthority,
    bot: OwnedUserId,
    store_dir: PathBuf,
}

impl Setup {
    fn read(dir: &Path) -> Result<Self, DemoError> {
        let setup = |e: super::dev::DevError| DemoError::Setup(e.to_string());
        let state = super::dev::read_state(dir).map_err(setup)?;
        let shared_secret =
            super::dev::read_shared_secret(&dir.join("synapse/homeserver.yaml")).map_err(setup)?;
        let key_path = dir.join("mxpay/admin-jwt.key");
        let key = std::fs::read(&key_path)
            .map_err(|e| DemoError::Setup(format!("{}: {e}", key_path.display())))?;
        Ok(Self {
            homeserver_url: format!("http://127.0.0.1:{}", state.homeserver_port),
            mxpay_url: format!("http://127.0.0.1:{}", state.appservice_port),
            shared_secret,
            tokens: super::dev::token_authority(&key).map_err(setup)?,
            bot: super::dev::bot_user_id(),
            store_dir: dir.join("demo"),
        })
    }

    async fn is_ready(&self) -> bool {
        let ready = reqwest::Client::new()
            .get(format!("{}/ready", self.mxpay_url))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        matches!(ready, Ok(r) if r.status().is_success())
    }
}

/// Starts `mxpay dev --dir dir` and waits until it printed its welcome.
fn start_dev(dir: &Path) -> Result<Child, DemoError> {
    use std::io::BufRead as _;
    let mxpay = std::env::current_exe().map_err(|e| DemoError::Setup(e.to_string()))?;
    let mut child = Command::new(mxpay)
        .arg("dev")
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| DemoError::Setup(format!("cannot start mxpay dev: {e}")))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("Ctrl-C stops everything") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(DEV_UP_TIMEOUT).is_err() {
        super::dev::stop_child(&mut child);
        return Err(DemoError::Setup(format!(
            "mxpay dev did not come up within {DEV_UP_TIMEOUT:?}"
        )));
    }
    Ok(child)
}

async fn demo(setup: &Setup) -> Result<(), DemoError> {
    let started = Instant::now();
    let suffix = random_suffix();
    let payer = Person::new(setup, &format!("demo_payer_{suffix}")).await?;
    let payee = Person::new(setup, &format!("demo_payee_{suffix}")).await?;
    fund(setup, &payer.user_id).await?;
    report(
        "two users with cross-signed encrypted clients; the payer funded",
        started,
    );

    let t = Instant::now();
    let dm = payer
        .create_room(&setup.bot, &[], RoomPreset::TrustedPrivateChat, true)
        .await
        .map_err(step_err("open a DM with the bot"))?;
    payer
        .wait_membership(&dm, setup.bot.as_str(), "join")
        .await
        .map_err(step_err("open a DM with the bot"))?;
    report("DM with the bot open (the bot joined)", t);

    let t = Instant::now();
    let step = "set a PIN";
    payer.say(&dm, "!pin set").await.map_err(step_err(step))?;
    payer
        .wait_bot_text(&dm, &setup.bot, "Choose a 4-digit PIN")
        .await
        .map_err(step_err(step))?;
    payer.say(&dm, DEMO_PIN).await.map_err(step_err(step))?;
    payer
        .wait_bot_text(&dm, &setup.bot, "Send the same PIN again")
        .await
        .map_err(step_err(step))?;
    payer.say(&dm, DEMO_PIN).await.map_err(step_err(step))?;
    payer
        .wait_bot_text(&dm, &setup.bot, "Your PIN is set")
        .await
        .map_err(step_err(step))?;
    report("PIN set in the DM", t);

    let t = Instant::now();
    let step = "meet in an encrypted room";
    let room = payer
        .create_room(
            &setup.bot,
            &[&payee.user_id],
            RoomPreset::PrivateChat,
            false,
        )
        .await
        .map_err(step_err(step))?;
    payee
        .client
        .join_room_by_id(&room)
        .await
        .map_err(|e| step_err(step)(e.to_string()))?;
    for who in [setup.bot.as_str(), payee.user_id.as_str()] {
        payer
            .wait_membership(&room, who, "join")
            .await
            .map_err(step_err(step))?;
    }
    report("encrypted room with the payee and the bot", t);

    let t = Instant::now();
    let step = "!pay";
    payer
        .say(
            &room,
            &format!("!pay {} {PAYMENT} {CURRENCY} mxpay demo", payee.user_id),
        )
        .await
        .map_err(step_err(step))?;
    payer
        .wait_bot_text(
            &dm,
            &setup.bot,
            &format!("Confirm paying {PAYMENT} {CURRENCY}"),
        )
        .await
        .map_err(step_err(step))?;
    report("!pay -> the PIN challenge in the payer's DM", t);

    let t = Instant::now();
    let step = "confirm with the PIN";
    payer.say(&dm, DEMO_PIN).await.map_err(step_err(step))?;
    payee
        .wait(|room_id, event| {
            room_id == room
                && event["sender"] == setup.bot.as_str()
                && crate::events::carried(event, "org.mxpay.receipt")
                    .is_some_and(|r| r["status"] == "completed")
        })
        .await
        .map_err(step_err(step))?;
    report("PIN -> the payee sees the receipt", t);

    println!(
        "balances: payer {} ({}), payee {} ({})",
        balance(setup, &payer.user_id).await?,
        payer.user_id,
        balance(setup, &payee.user_id).await?,
        payee.user_id
    );
    println!(
        "payment completed: {PAYMENT} {CURRENCY} in {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn report(what: &str, since: Instant) {
    println!(
        "  {:>7.0} ms  {what}",
        since.elapsed().as_secs_f64() * 1_000.0
    );
}

fn random_suffix() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..8)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

async fn fund(setup: &Setup, user: &OwnedUserId) -> Result<(), DemoError> {
    super::dev::topup(
        &setup.mxpay_url,
        &setup.tokens,
        user.as_str(),
        FUNDS,
        &format!("mxpay-demo-{user}"),
    )
    .await
    .map_err(step_err("fund the payer"))
}

/// `available` of `user`'s wallet in [`CURRENCY`], from the admin API.
async fn balance(setup: &Setup, user: &OwnedUserId) -> Result<String, DemoError> {
    let step = "read the balances";
    let token = setup
        .tokens
        .mint(
            "mxpay-demo",
            [crate::admin::token::Scope::Read].into_iter().collect(),
            300,
        )
        .map_err(|e| step_err(step)(e.to_string()))?;
    let accounts: Value = reqwest::Client::new()
        .get(format!(
            "{}/_mxpay/admin/v1/users/{user}/accounts",
            setup.mxpay_url
        ))
        .bearer_auth(token)
        .timeout(STEP_TIMEOUT)
        .send()
        .await
        .map_err(|e| step_err(step)(e.to_string()))?
        .json()
        .await
        .map_err(|e| step_err(step)(e.to_string()))?;
    let text = accounts.to_string();
    let available = find_available(&accounts, CURRENCY).unwrap_or(text);
    Ok(format!("{available} {CURRENCY}"))
}

/// The `available` amount of the account in `currency`, wherever the answer lists it.
fn find_available(value: &Value, currency: &str) -> Option<String> {
    match value {
        Value::Object(map) => {
            if map.get("currency").and_then(Value::as_str) == Some(currency) {
                if let Some(available) = map.get("available").and_then(Value::as_str) {
                    return Some(available.to_owned());
                }
            }
            map.values().find_map(|v| find_available(v, currency))
        }
        Value::Array(items) => items.iter().find_map(|v| find_available(v, currency)),
        _ => None,
    }
}

/// A user with a logged-in, cross-signed, syncing matrix-sdk client that records what it sees.
struct Person {
    user_id: OwnedUserId,
    client: Client,
    seen: Arc<Mutex<Vec<(OwnedRoomId, Value)>>>,
    changed: tokio::sync::watch::Receiver<usize>,
    sync_task: tokio::task::JoinHandle<()>,
}

impl Drop for Person {
    fn drop(&mut self) {
        self.sync_task.abort();
    }
}

impl Person {
    async fn new(setup: &Setup, localpart: &str) -> Result<Self, DemoError> {
        let step = "register and log in";
        let err = step_err(step);
        let password = format!("{}{}", random_suffix(), random_suffix());
        crate::homeserver::admin_register::register(
            &setup.homeserver_url,
            &setup.shared_secret,
            localpart,
            &password,
        )
        .await
        .map_err(|e| err(e.to_string()))?;
        let client = Client::builder()
            .homeserver_url(&setup.homeserver_url)
            .sqlite_store(setup.store_dir.join(localpart), None)
            .build()
            .await
            .map_err(|e| err(e.to_string()))?;
        client
            .matrix_auth()
            .login_username(localpart, &password)
            .initial_device_display_name("mxpay demo")
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        let user_id = client
            .user_id()
            .ok_or_else(|| err("no user id".to_owned()))?;
        let user_id = user_id.to_owned();

        let seen: Arc<Mutex<Vec<(OwnedRoomId, Value)>>> = Arc::default();
        let (tx, changed) = tokio::sync::watch::channel(0usize);
        let log = seen.clone();
        client.add_event_handler(
            move |_: Raw<AnySyncTimelineEvent>, room: Room, raw: RawEvent| {
                let log = log.clone();
                let tx = tx.clone();
                async move {
                    let json = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                    let count = {
                        let mut seen = log.lock().expect("lock");
                        seen.push((room.room_id().to_owned(), json));
                        seen.len()
                    };
                    tx.send_replace(count);
                }
            },
        );
        client
            .sync_once(SyncSettings::default().timeout(Duration::ZERO))
            .await
            .map_err(|e| err(e.to_string()))?;
        bootstrap_cross_signing(&client, localpart, &password)
            .await
            .map_err(step_err("set up cross-signing"))?;
        let sync_client = client.clone();
        let sync_task = tokio::spawn(async move {
            let _ = sync_client.sync(SyncSettings::default()).await;
        });
        Ok(Self {
            user_id,
            client,
            seen,
            changed,
            sync_task,
        })
    }

    async fn create_room(
        &self,
        bot: &OwnedUserId,
        others: &[&OwnedUserId],
        preset: RoomPreset,
        is_direct: bool,
    ) -> Result<OwnedRoomId, String> {
        let mut request = CreateRoomRequest::new();
        request.preset = Some(preset);
        request.is_direct = is_direct;
        request.invite = std::iter::once(bot.clone())
            .chain(others.iter().map(|u| (*u).clone()))
            .collect();
        request.initial_state = vec![InitialStateEvent::with_empty_state_key(
            RoomEncryptionEventContent::with_recommended_defaults(),
        )
        .to_raw_any()];
        let room = self
            .client
            .create_room(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok(room.room_id().to_owned())
    }

    /// Sends `text` in `room_id` (encrypted: the room is).
    async fn say(&self, room_id: &RoomId, text: &str) -> Result<(), String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let room = loop {
            if let Some(room) = self.client.get_room(room_id) {
                break room;
            }
            if Instant::now() >= deadline {
                return Err(format!("the client does not know room {room_id}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        room.send(RoomMessageEventContent::text_plain(text))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Waits (bounded) until an event this client saw matches `predicate`.
    async fn wait(&self, predicate: impl Fn(&RoomId, &Value) -> bool) -> Result<(), String> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            changed.borrow_and_update();
            if self
                .seen
                .lock()
                .expect("lock")
                .iter()
                .any(|(room, event)| predicate(room, event))
            {
                return Ok(());
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero()
                || tokio::time::timeout(remaining, changed.changed())
                    .await
                    .is_err()
            {
                return Err(format!("nothing came within {STEP_TIMEOUT:?}"));
            }
        }
    }

    async fn wait_bot_text(
        &self,
        room_id: &RoomId,
        bot: &OwnedUserId,
        part: &str,
    ) -> Result<(), String> {
        self.wait(|room, event| {
            room == room_id
                && event["sender"] == bot.as_str()
                && event["type"] == "m.room.message"
                && event["content"]["body"]
                    .as_str()
                    .is_some_and(|body| body.contains(part))
        })
        .await
        .map_err(|e| format!("waiting for \"{part}\" from the bot: {e}"))
    }

    async fn wait_membership(
        &self,
        room_id: &RoomId,
        user: &str,
        membership: &str,
    ) -> Result<(), String> {
        self.wait(|room, event| {
            room == room_id
                && event["type"] == "m.room.member"
                && event["state_key"] == user
                && event["content"]["membership"] == membership
        })
        .await
        .map_err(|e| format!("waiting for {user} to {membership}: {e}"))
    }
}

/// Creates and uploads a cross-signing identity; Synapse wants the password (UIA).
pub(crate) async fn bootstrap_cross_signing(
    client: &Client,
    localpart: &str,
    password: &str,
) -> Result<(), String> {
    let encryption = client.encryption();
    let Err(first) = encryption.bootstrap_cross_signing(None).await else {
        return Ok(());
    };
    let info = first
        .as_uiaa_response()
        .ok_or_else(|| format!("cross-signing failed: {first}"))?;
    let mut auth = uiaa::Password::new(
        uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(localpart.to_owned())),
        password.to_owned(),
    );
    auth.session = info.session.clone();
    encryption
        .bootstrap_cross_signing(Some(uiaa::AuthData::Password(auth)))
        .await
        .map_err(|e| format!("cross-signing with the password: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_available_amount_is_found_wherever_the_answer_lists_it() {
        let answer = serde_json::json!({"accounts": [
            {"currency": "USD", "available": "1.00"},
            {"currency": "EUR", "available": "9.00", "posted": "9.00"},
        ]});
        assert_eq!(find_available(&answer, "EUR").as_deref(), Some("9.00"));
        assert_eq!(find_available(&answer, "GBP"), None);
    }
}
