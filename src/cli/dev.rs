//! `mxpay dev`: a whole local setup in one command, for a newcomer.
//!
//! Installs Synapse into the repo's `.venv/` (via `scripts/synapse.sh`), writes a homeserver,
//! an mxpay config and a registration under `.dev/`, starts Synapse and `mxpay serve`, creates
//! the demo users alice and bob, prints how to log in, and runs until Ctrl-C, then stops both.
//! A second run reuses everything under `.dev/` (same ports, users and passwords);
//! `--reset` starts over.

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
struct DevState {
    homeserver_port: u16,
    appservice_port: u16,
    /// Demo users: localpart and password.
    users: Vec<(String, String)>,
}

const DEMO_USERS: [&str; 2] = ["alice", "bob"];
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
fn repo_dir() -> Result<PathBuf, DevError> {
    let built_from = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [built_from, std::env::current_dir().unwrap_or_default()];
    candidates
        .into_iter()
        .find(|dir| dir.join("scripts/synapse.sh").is_file())
        .ok_or(DevError::ScriptMissing)
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
    }
    // The PIN pepper of the dev setup's payments (`payments.pepper_file: ./pepper`).
    let pepper_path = mxpay_dir.join("pepper");
    if !pepper_path.exists() {
        let mut pepper = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut pepper);
        std::fs::write(&pepper_path, format!("{}\n", hex::encode(pepper)))
            .map_err(io_err(&pepper_path))?;
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
        print_welcome(state, dir, homeserver_url);
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
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        return serde_json::from_str(&text).map_err(|e| DevError::State {
            path: path.clone(),
            reason: e.to_string(),
        });
    }
    let state = DevState {
        homeserver_port: homeserver_port.unwrap_or_else(|| port_or_free(8008)),
        appservice_port: appservice_port.unwrap_or_else(|| port_or_free(29330)),
        users: DEMO_USERS
            .iter()
            .map(|name| ((*name).to_owned(), random_password()))
            .collect(),
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

fn dev_config(homeserver_url: &str, appservice_port: u16) -> String {
    format!(
        "# Written by `mxpay dev` for local development; edit freely (`--reset` rewrites it).\n\
         homeserver:\n  url: {homeserver_url}\n  server_name: {SERVER_NAME}\n\
         appservice:\n  registration: ./registration.yaml\n  id: mxpay\n  bot_localpart: {BOT_LOCALPART}\n  \
         listen: 127.0.0.1:{appservice_port}\n  url: http://127.0.0.1:{appservice_port}\n\
         data_dir: ./data\n\
         payments:\n  enabled: true\n  pepper_file: ./pepper\n\
         logging:\n  level: info\n  format: pretty\n"
    )
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

fn read_shared_secret(config: &Path) -> Result<String, DevError> {
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

fn print_welcome(state: &DevState, dir: &Path, homeserver_url: &str) {
    println!();
    println!("mxpay dev is up. Homeserver: {homeserver_url}  (server name `{SERVER_NAME}`)");
    println!();
    println!("Log in with Element (app.element.io, Element Desktop) or any Matrix client:");
    println!("  choose \"Sign in\" > edit the homeserver > {homeserver_url}");
    for (localpart, password) in &state.users {
        println!("  user @{localpart}:{SERVER_NAME}   password {password}");
    }
    println!();
    println!("Then invite the bot @{BOT_LOCALPART}:{SERVER_NAME} to a room and say `!help`.");
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
fn stop_child(child: &mut Child) {
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
