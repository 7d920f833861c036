//! `mxpay dev`: a whole local setup in one command, for a newcomer.
//!
//! Installs Synapse into the repo's `.venv/` (via `scripts/synapse.sh`), writes a homeserver,
//! an mxpay config (payments and the admin API on, with a PIN pepper and an admin key of its
//! own) and a registration under `.dev/`, starts Synapse and `mxpay serve`, creates the demo
//! users alice and bob, funds each with [`DEMO_FUNDS`] through the real top-up path, makes an
//! encrypted room with both and the bot, prints how to log in, the first payment to try and a
//! ready admin token, and runs until Ctrl-C, then stops both.
//! A second run reuses everything under `.dev/` (same ports, users, passwords and room; the
//! top-ups are idempotent, so nobody is funded twice); `--reset` starts over.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::homeserver::admin_register;

/// Errors of `mxpay dev`; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// `scripts/synapse.sh` is in neither the source tree mxpay was built from nor `./`.
    #[error("cannot find scripts/synapse.sh: run `mxpay dev` from the mxpay repository")]
    ScriptMissing,
    /// A file under the setup directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `.dev/dev.json` is not what this version writes.
    #[error("{path} is damaged ({reason}); run `mxpay dev --reset` to start over")]
    State {
        /// The state file.
        path: PathBuf,
        /// Why it did not parse.
        reason: String,
    },
    /// A child command (the Synapse script, `mxpay generate-registration`) failed.
    #[error("`{command}` failed ({status}); its output is above")]
    Child {
        /// What was run.
        command: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// `mxpay serve` did not come up.
    #[error("mxpay serve {0}; its log is above")]
    Serve(String),
    /// Talking to the local Synapse failed.
    #[error("homeserver at {url}: {reason}")]
    Homeserver {
        /// The homeserver URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Funding the demo users through the admin API failed.
    #[error("funding the demo users: {0}")]
    Admin(String),
}

/// `mxpay dev` options.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the setup lives (default: `.dev/` in the mxpay repository).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Delete the setup first (homeserver database, users, mxpay data) and start over.
    #[arg(long)]
    pub reset: bool,
    /// Homeserver port for a new setup (default: 8008 if free, else any free port).
    /// An existing setup keeps its port.
    #[arg(long)]
    pub homeserver_port: Option<u16>,
    /// Appservice port for a new setup (default: 29330 if free, else any free port).
    /// An existing setup keeps its port.
    #[arg(long)]
    pub appservice_port: Option<u16>,
}

/// What a setup keeps between runs (`.dev/dev.json`). Demo passwords only: this file is a
/// local development convenience and is gitignored.
#[derive(Serialize, Deserialize)]
pub(crate) struct DevState {
    pub(crate) homeserver_port: u16,
    pub(crate) appservice_port: u16,
    /// Demo users: localpart and password.
    users: Vec<(String, String)>,
    /// The demo room (alice, bob and the bot), once made.
    #[serde(default)]
    room_id: Option<String>,
}

const DEMO_USERS: [&str; 2] = ["alice", "bob"];
/// What each demo user is funded with, once per setup.
pub const DEMO_FUNDS: &str = "100.00";
const DEMO_CURRENCY: &str = "EUR";
/// Life of the admin token printed at start (the operator mints more with the printed command).
const PRINTED_TOKEN_TTL_S: u64 = 24 * 3_600;
/// Each request of the set-up steps (top-ups, room creation) is bounded.
const SETUP_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const BOT_LOCALPART: &str = "_mxpay";
const SERVER_NAME: &str = "localhost";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const SERVE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The repository: where `scripts/synapse.sh` is, either the source tree this binary was
/// built from or the current directory.
pub(crate) fn repo_dir() -> Result<PathBuf, DevError> {
    let built_from = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [built_from, std::env::current_dir().unwrap_or_default()];
    candidates
        .into_iter()
        .find(|dir| dir.join("scripts/synapse.sh").is_file())
        .ok_or(DevError::ScriptMissing)
}

/// Where the setup lives by default: `.dev/` in the repository.
pub(crate) fn default_dir() -> Result<PathBuf, DevError> {
    Ok(repo_dir()?.join(".dev"))
}

/// The setup's state (`dev.json`) of an existing setup in `dir`.
pub(crate) fn read_state(dir: &Path) -> Result<DevState, DevError> {
    let path = dir.join("dev.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| DevError::State {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// The bot of a dev setup.
pub(crate) fn bot_user_id() -> ruma::OwnedUserId {
    ruma::UserId::parse(format!("@{BOT_LOCALPART}:{SERVER_NAME}")).expect("a valid user id")
}

/// Runs `mxpay dev` until Ctrl-C.
pub fn run(args: DevArgs) -> Result<(), DevError> {
    let repo = repo_dir()?;
    let dir = args.dir.unwrap_or_else(|| repo.join(".dev"));
    let script = repo.join("scripts/synapse.sh");
    let synapse_dir = dir.join("synapse");

    if args.reset && dir.exists() {
        // A Synapse still running on the old database must go first.
        if synapse_dir.exists() {
            run_checked(
                Command::new("bash")
                    .arg(&script)
                    .arg("stop")
                    .arg(&synapse_dir),
            )?;
        }
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let state = load_or_create_state(&dir, args.homeserver_port, args.appservice_port)?;

    let mxpay_dir = dir.join("mxpay");
    let config_path = mxpay_dir.join("config.yaml");
    let registration_path = mxpay_dir.join("registration.yaml");
    let homeserver_url = format!("http://127.0.0.1:{}", state.homeserver_port);
    std::fs::create_dir_all(&mxpay_dir).map_err(io_err(&mxpay_dir))?;
    if !config_path.exists() {
        let config = dev_config(&homeserver_url, state.appservice_port);
        std::fs::write(&config_path, config).map_err(io_err(&config_path))?;
    } else {
        // A setup made before the admin API was part of it gets it now.
        let config = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
        if !config.lines().any(|line| line.starts_with("admin:")) {
            std::fs::write(&config_path, format!("{config}{ADMIN_CONFIG}"))
                .map_err(io_err(&config_path))?;
        }
    }
    // The admin API's HS256 key (`admin.token.secret: {file: ./admin-jwt.key}`).
    let admin_key_path = mxpay_dir.join("admin-jwt.key");
    if !admin_key_path.exists() {
        write_secret(&admin_key_path, &random_hex_secret())?;
    }
    // The PIN pepper of the dev setup's payments (`payments.pepper_file: ./pepper`).
    let pepper_path = mxpay_dir.join("pepper");
    if !pepper_path.exists() {
        write_secret(&pepper_path, &random_hex_secret())?;
    }
    // mxpay refuses a pepper others can read; one written by an older `mxpay dev` (before the
    // umask was set) would stop the start.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pepper_path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(&pepper_path))?;
    }
    let mxpay = std::env::current_exe().map_err(io_err(Path::new("mxpay")))?;
    if !registration_path.exists() {
        run_checked(
            Command::new(&mxpay)
                .arg("generate-registration")
                .arg("-c")
                .arg(&config_path)
                .arg("-o")
                .arg(&registration_path)
                // Its advice (add the file to the homeserver) is what we do next.
                .stdout(Stdio::null()),
        )?;
    }

    println!("Starting Synapse (the first run installs it into .venv/, about 30 s)...");
    run_checked(
        Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&synapse_dir)
            .arg("--port")
            .arg(state.homeserver_port.to_string())
            .arg("--registration")
            .arg(&registration_path)
            .stdout(Stdio::null()),
    )?;

    // From here on Synapse runs: stop it whatever happens next.
    let result = serve_until_interrupted(&state, &dir, &mxpay, &config_path, &homeserver_url);
    println!("Stopping Synapse...");
    let stopped = run_checked(
        Command::new("bash")
            .arg(&script)
            .arg("stop")
            .arg(&synapse_dir),
    );
    result.and(stopped)
}

fn serve_until_interrupted(
    state: &DevState,
    dir: &Path,
    mxpay: &Path,
    config_path: &Path,
    homeserver_url: &str,
) -> Result<(), DevError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DevError::Runtime)?;
    let mut serve = Command::new(mxpay)
        .arg("serve")
        .arg("-c")
        .arg(config_path)
        .stdin(Stdio::null())
        .spawn()
        .map_err(io_err(mxpay))?;
    let result = runtime.block_on(async {
        wait_ready(&mut serve, state.appservice_port).await?;
        let shared_secret = read_shared_secret(&dir.join("synapse/homeserver.yaml"))?;
        for (localpart, password) in &state.users {
            register_user(homeserver_url, &shared_secret, localpart, password).await?;
        }
        let admin_key = std::fs::read(dir.join("mxpay/admin-jwt.key"))
            .map_err(io_err(&dir.join("mxpay/admin-jwt.key")))?;
        let tokens = token_authority(&admin_key)?;
        let mxpay_url = format!("http://127.0.0.1:{}", state.appservice_port);
        for (localpart, _) in &state.users {
            fund(&mxpay_url, &tokens, localpart).await?;
        }
        let room_id = demo_room(state, dir, homeserver_url).await?;
        let admin_token = tokens
            .mint(
                "mxpay-dev",
                [
                    crate::admin::token::Scope::Topup,
                    crate::admin::token::Scope::Read,
                ]
                .into_iter()
                .collect(),
                PRINTED_TOKEN_TTL_S,
            )
            .map_err(|e| DevError::Admin(e.to_string()))?;
        print_welcome(
            state,
            dir,
            homeserver_url,
            &room_id,
            &admin_token,
            config_path,
        );
        wait_for_interrupt_or_exit(&mut serve).await
    });
    stop_child(&mut serve);
    result
}

fn load_or_create_state(
    dir: &Path,
    homeserver_port: Option<u16>,
    appservice_port: Option<u16>,
) -> Result<DevState, DevError> {
    let path = dir.join("dev.json");
    if path.exists() {
        return read_state(dir);
    }
    let state = DevState {
        homeserver_port: homeserver_port.unwrap_or_else(|| port_or_free(8008)),
        appservice_port: appservice_port.unwrap_or_else(|| port_or_free(29330)),
        users: DEMO_USERS
            .iter()
            .map(|name| ((*name).to_owned(), random_password()))
            .collect(),
        room_id: None,
    };
    let text = serde_json::to_string_pretty(&state).expect("state serialises");
    std::fs::write(&path, text).map_err(io_err(&path))?;
    Ok(state)
}

/// `preferred` if nothing listens there now, else any free port.
fn port_or_free(preferred: u16) -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or(preferred)
}

fn random_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..16)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// The admin API section of the dev config (the key file is written beside it).
const ADMIN_CONFIG: &str =
    "admin:\n  token:\n    algorithm: HS256\n    secret: { file: ./admin-jwt.key }\n";

fn dev_config(homeserver_url: &str, appservice_port: u16) -> String {
    format!(
        "# Written by `mxpay dev` for local development; edit freely (`--reset` rewrites it).\n\
         homeserver:\n  url: {homeserver_url}\n  server_name: {SERVER_NAME}\n\
         appservice:\n  registration: ./registration.yaml\n  id: mxpay\n  bot_localpart: {BOT_LOCALPART}\n  \
         listen: 127.0.0.1:{appservice_port}\n  url: http://127.0.0.1:{appservice_port}\n\
         data_dir: ./data\n\
         payments:\n  enabled: true\n  pepper_file: ./pepper\n  \
         # `mxpay demo` pays a user who never used mxpay: paid at once, not held for them to\n  \
         # accept (the production default holds such payments; see docs/config.md).\n  \
         hold_for_new_payees: false\n\
         logging:\n  level: info\n  format: pretty\n\
         {ADMIN_CONFIG}"
    )
}

/// 32 random bytes, hex: a pepper or an HS256 key.
fn random_hex_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    format!("{}\n", hex::encode(bytes))
}

/// Writes a secret readable by its owner only (mxpay refuses secrets others can read).
fn write_secret(path: &Path, text: &str) -> Result<(), DevError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(io_err(path))
}

pub(crate) fn token_authority(
    key_file: &[u8],
) -> Result<crate::admin::token::TokenAuthority, DevError> {
    // The config trims surrounding whitespace (the trailing newline) from secret files.
    let key = crate::admin::token::AdminKey::Hs256 {
        secret: key_file.trim_ascii().to_vec(),
    };
    crate::admin::token::TokenAuthority::new(&key, std::sync::Arc::new(crate::clock::SystemClock))
        .map_err(|e| DevError::Admin(e.to_string()))
}

fn http_client() -> Result<reqwest::Client, DevError> {
    reqwest::Client::builder()
        .timeout(SETUP_REQUEST_TIMEOUT)
        .build()
        .map_err(|e| DevError::Admin(e.to_string()))
}

/// Tops `localpart` up with [`DEMO_FUNDS`] through the admin API, once per setup: the
/// idempotency key is fixed, so a re-run gets the first answer and moves nothing.
async fn fund(
    mxpay_url: &str,
    tokens: &crate::admin::token::TokenAuthority,
    localpart: &str,
) -> Result<(), DevError> {
    topup(
        mxpay_url,
        tokens,
        &format!("@{localpart}:{SERVER_NAME}"),
        DEMO_FUNDS,
        &format!("mxpay-dev-welcome-{localpart}"),
    )
    .await
    .map_err(|e| DevError::Admin(format!("top-up of {localpart}: {e}")))
}

/// Credits `user_id` with `amount` EUR through the admin API (a token minted for the call).
pub(crate) async fn topup(
    mxpay_url: &str,
    tokens: &crate::admin::token::TokenAuthority,
    user_id: &str,
    amount: &str,
    idempotency_key: &str,
) -> Result<(), String> {
    let token = tokens
        .mint(
            "mxpay-dev",
            [crate::admin::token::Scope::Topup].into_iter().collect(),
            300,
        )
        .map_err(|e| e.to_string())?;
    let response = reqwest::Client::builder()
        .timeout(SETUP_REQUEST_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?
        .post(format!("{mxpay_url}/_mxpay/admin/v1/topups"))
        .bearer_auth(token)
        .json(&serde_json::json!({
            "user_id": user_id,
            "amount": amount,
            "currency": DEMO_CURRENCY,
            "idempotency_key": idempotency_key,
        }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("{status} {text}"));
    }
    Ok(())
}

/// POSTs `body` (with `token` as bearer, if any) and reads the JSON answer.
async fn post_json(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let mut request = http.post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    response.json().await.map_err(|e| e.to_string())
}

/// The encrypted demo room of alice (creator), bob and the bot; made once, its id kept in
/// `dev.json`.
async fn demo_room(state: &DevState, dir: &Path, homeserver_url: &str) -> Result<String, DevError> {
    if let Some(room_id) = &state.room_id {
        return Ok(room_id.clone());
    }
    let homeserver = |reason: String| DevError::Homeserver {
        url: homeserver_url.to_owned(),
        reason,
    };
    let http = http_client()?;
    let mut tokens = Vec::new();
    for (localpart, password) in &state.users {
        let login = post_json(
            &http,
            &format!("{homeserver_url}/_matrix/client/v3/login"),
            None,
            &serde_json::json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": localpart },
                "password": password,
                "initial_device_display_name": "mxpay dev set-up",
            }),
        )
        .await
        .map_err(homeserver)?;
        let token = login["access_token"]
            .as_str()
            .ok_or_else(|| homeserver(format!("login of {localpart} refused: {login}")))?;
        tokens.push(token.to_owned());
    }
    let invite: Vec<String> = state.users[1..]
        .iter()
        .map(|(localpart, _)| format!("@{localpart}:{SERVER_NAME}"))
        .chain(std::iter::once(format!("@{BOT_LOCALPART}:{SERVER_NAME}")))
        .collect();
    let created = post_json(
        &http,
        &format!("{homeserver_url}/_matrix/client/v3/createRoom"),
        Some(&tokens[0]),
        &serde_json::json!({
            "name": "mxpay demo",
            "preset": "private_chat",
            "invite": invite,
            "initial_state": [{
                "type": "m.room.encryption", "state_key": "",
                "content": { "algorithm": "m.megolm.v1.aes-sha2" },
            }],
        }),
    )
    .await
    .map_err(homeserver)?;
    let room_id = created["room_id"]
        .as_str()
        .ok_or_else(|| homeserver(format!("room not created: {created}")))?
        .to_owned();
    for token in &tokens[1..] {
        let joined = http
            .post(format!(
                "{homeserver_url}/_matrix/client/v3/join/{}",
                url_path(&room_id)
            ))
            .bearer_auth(token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .map_err(|e| homeserver(e.to_string()))?;
        if !joined.status().is_success() {
            return Err(homeserver(format!("join refused: {}", joined.status())));
        }
    }
    // The set-up's own sessions are not needed any more: the people log in with a client.
    for token in &tokens {
        let _ = http
            .post(format!("{homeserver_url}/_matrix/client/v3/logout"))
            .bearer_auth(token)
            .json(&serde_json::json!({}))
            .send()
            .await;
    }
    let mut saved = serde_json::to_value(state).expect("state serialises");
    saved["room_id"] = room_id.clone().into();
    let path = dir.join("dev.json");
    std::fs::write(&path, serde_json::to_string_pretty(&saved).expect("JSON"))
        .map_err(io_err(&path))?;
    Ok(room_id)
}

fn url_path(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

/// Runs a child to completion, its output going to ours.
fn run_checked(command: &mut Command) -> Result<(), DevError> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .map_err(io_err(Path::new(command.get_program())))?;
    if status.success() {
        Ok(())
    } else {
        Err(DevError::Child {
            command: shown,
            status,
        })
    }
}

async fn wait_ready(serve: &mut Child, port: u16) -> Result<(), DevError> {
    let http = reqwest::Client::new();
    // `/ready`: listening, start-up checks and the homeserver ping passed.
    let url = format!("http://127.0.0.1:{port}/ready");
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = serve.try_wait() {
            return Err(DevError::Serve(format!("exited ({status})")));
        }
        let response = http.get(&url).timeout(Duration::from_secs(2)).send().await;
        if matches!(&response, Ok(r) if r.status().is_success()) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DevError::Serve(format!(
                "did not answer {url} within {READY_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn read_shared_secret(config: &Path) -> Result<String, DevError> {
    let text = std::fs::read_to_string(config).map_err(io_err(config))?;
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| DevError::State {
            path: config.to_owned(),
            reason: e.to_string(),
        })?;
    yaml["registration_shared_secret"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| DevError::State {
            path: config.to_owned(),
            reason: "no registration_shared_secret".to_owned(),
        })
}

/// Registers a user with Synapse's shared-secret admin API; a user that already exists (a
/// re-run) is fine.
async fn register_user(
    homeserver_url: &str,
    shared_secret: &str,
    localpart: &str,
    password: &str,
) -> Result<(), DevError> {
    match admin_register::register(homeserver_url, shared_secret, localpart, password).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_user_in_use() => Ok(()),
        Err(e) => Err(DevError::Homeserver {
            url: homeserver_url.to_owned(),
            reason: e.to_string(),
        }),
    }
}

fn print_welcome(
    state: &DevState,
    dir: &Path,
    homeserver_url: &str,
    room_id: &str,
    admin_token: &str,
    config_path: &Path,
) {
    let bot = format!("@{BOT_LOCALPART}:{SERVER_NAME}");
    let payee = state
        .users
        .get(1)
        .map(|(localpart, _)| format!("@{localpart}:{SERVER_NAME}"))
        .unwrap_or_default();
    println!();
    println!("mxpay dev is up. Homeserver: {homeserver_url}  (server name `{SERVER_NAME}`)");
    println!();
    println!("Log in with Element (app.element.io, Element Desktop) or any Matrix client:");
    println!("  choose \"Sign in\" > edit the homeserver > {homeserver_url}");
    for (localpart, password) in &state.users {
        println!(
            "  user @{localpart}:{SERVER_NAME}   password {password}   wallet: {DEMO_FUNDS} {DEMO_CURRENCY}"
        );
    }
    println!();
    println!("Your first payment:");
    println!("  1. As alice, set up cross-signing when the client offers it (Element does at first login).");
    println!(
        "  2. Start a direct chat with the bot {bot} (it joins and encrypts) and say `!pin set`;"
    );
    println!(
        "     that DM is where the bot asks for your PIN and tells you your balance (`!balance`)."
    );
    println!("  3. In the encrypted room \"mxpay demo\" ({room_id}), where alice, bob and the bot are, say:");
    println!("       !pay {payee} 5.00 {DEMO_CURRENCY} lunch");
    println!("  4. Answer with your PIN in the DM. Both see the receipt in the room.");
    println!();
    println!(
        "Admin API (top-ups, balances) at http://127.0.0.1:{}/_mxpay/admin/v1, token for 24 h:",
        state.appservice_port
    );
    println!("  export MXPAY_ADMIN_TOKEN={admin_token}");
    println!(
        "  more: mxpay admin -c {} token create --scope topup,read",
        config_path.display()
    );
    println!();
    println!(
        "Setup, logs and data: {} (Synapse log: synapse/homeserver.log). Ctrl-C stops everything.",
        dir.display()
    );
}

async fn wait_for_interrupt_or_exit(serve: &mut Child) -> Result<(), DevError> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DevError::Runtime)?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Ok(Some(status)) = serve.try_wait() {
                    return Err(DevError::Serve(format!("exited ({status})")));
                }
            }
        }
    }
}

/// Asks mxpay to stop (Ctrl-C in a terminal already told it: same process group), waits a
/// bounded time, then kills it.
pub(crate) fn stop_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        // std offers only SIGKILL; SIGTERM lets mxpay finish what it acknowledged.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    let deadline = std::time::Instant::now() + SERVE_STOP_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config `mxpay dev` writes is one `mxpay serve` accepts, with the ports it chose.
    #[test]
    fn dev_config_is_a_valid_config() {
        let text = dev_config("http://127.0.0.1:8448", 29999);
        let config = crate::config::Config::from_yaml(&text).expect("dev config parses");
        assert_eq!(config.homeserver.url, "http://127.0.0.1:8448");
        assert_eq!(config.homeserver.server_name, SERVER_NAME);
        assert_eq!(config.appservice.bot_localpart, BOT_LOCALPART);
        assert_eq!(config.appservice.listen.port(), 29999);
        assert_eq!(config.appservice.url, "http://127.0.0.1:29999");
    }

    #[test]
    fn passwords_differ_per_setup() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}
