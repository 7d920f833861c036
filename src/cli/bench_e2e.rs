//! `mxpay bench e2e`: many people paying at once, end to end, against a real Synapse.
//!
//! Starts its own Synapse (`scripts/synapse.sh run`, installed from PyPI into `.venv/` as for
//! the tests and `mxpay dev`) and `mxpay serve` in a fresh directory, registers N payers and N
//! payees with real matrix-sdk clients (cross-signed, as `mxpay demo` does), funds the payers
//! through the admin API's top-up, lets each payer set a PIN in a DM with the bot, puts payers
//! and payees in encrypted rooms (one per pair, or one shared by everyone), then measures K
//! payments per payer, all payers at once: `!pay` -> the challenge in the payer's DM -> the PIN
//! -> the payee sees the receipt. It prints throughput, per-step latency, homeserver requests
//! and events per payment (from mxpay's `/metrics`), CPU seconds of mxpay and Synapse (from
//! `/proc`) and mxpay's peak RSS. Every wait is bounded: a payment that does not complete in
//! time is counted as lost and listed, and the command exits non-zero when any was lost.
//! Both servers are stopped on every way out (error, Ctrl-C, SIGTERM); both also run under a
//! watcher that stops them if this process dies without cleaning up.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::deserialized_responses::TimelineEventKind;
use matrix_sdk::event_handler::RawEvent;
use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::events::{AnySyncTimelineEvent, InitialStateEvent};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use matrix_sdk::{Client, Room};
use serde_json::Value;

mod merchant;

const SERVER_NAME: &str = "localhost";
const BOT_LOCALPART: &str = "_mxpay";
const CURRENCY: &str = "EUR";
/// Every payer's PIN (throwaway users; not one of the most common PINs).
const PIN: &str = "4821";
/// Longest wait for one set-up step (a first encrypted message sets up sessions).
const SETUP_STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for Synapse to answer (a first run installs it: about 30 s).
const SYNAPSE_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for `mxpay serve` to report ready.
const MXPAY_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a server to stop after it was asked to (then it is killed).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// After the last payment, how long counters may keep moving before they are read anyway.
const SETTLE_MAX: Duration = Duration::from_secs(10);
/// Counters unchanged this long count as settled.
const SETTLE_QUIET: Duration = Duration::from_secs(1);
/// Lost payments listed one by one; the rest are only counted.
const LOST_LISTED_MAX: usize = 20;

/// Where payments happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rooms {
    /// One encrypted room per payer/payee pair (with the bot).
    Pair,
    /// One encrypted room shared by every payer, payee and the bot.
    Shared,
}

/// Parameters of the end-to-end benchmark.
#[derive(Debug, clap::Args)]
pub struct E2eBench {
    /// Payers (and as many payees: payer i pays payee i).
    #[arg(long, default_value_t = 5)]
    pub payers: usize,
    /// Payments each payer makes, one after the other; all payers pay at the same time.
    #[arg(long, default_value_t = 4)]
    pub payments: usize,
    /// One room per payer/payee pair, or one room for everyone.
    #[arg(long, value_enum, default_value_t = Rooms::Pair)]
    pub rooms: Rooms,
    /// A payment not complete (payee saw the receipt) this many seconds after its `!pay` is
    /// counted as lost.
    #[arg(long, default_value_t = 60)]
    pub payment_timeout_s: u64,
    /// Users set up at the same time (registration, cross-signing, PIN, rooms).
    #[arg(long, default_value_t = 8)]
    pub setup_concurrency: usize,
    /// Parent of the run's fresh directory (Synapse's database, mxpay's data, logs);
    /// default: the system temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the run's directory (it is always kept when something failed or was lost).
    #[arg(long)]
    pub keep: bool,
    /// Payees are merchants: each payment is an invoice made through the merchant API, paid
    /// by a `!pay` reply and a PIN, and timed until the signed `invoice.paid` webhook reaches
    /// a receiver on loopback.
    #[arg(long)]
    pub merchant: bool,
}

/// Errors of `mxpay bench e2e`.
#[derive(Debug, thiserror::Error)]
pub enum E2eBenchError {
    /// The parameters make no benchmark.
    #[error("{0}")]
    Usage(&'static str),
    /// A file or directory of the run could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Starting the servers or preparing users and rooms failed (before anything was measured).
    #[error("set-up, {step}: {reason}")]
    Setup {
        /// The step.
        step: &'static str,
        /// Why.
        reason: String,
    },
    /// Ctrl-C or SIGTERM.
    #[error("interrupted; the servers were stopped")]
    Interrupted,
    /// The benchmark ran, but not every payment completed (the figures are printed anyway).
    #[error("{lost} of {attempted} payments did not complete (listed above); run kept in {dir}")]
    Incomplete {
        /// Payments that did not complete.
        lost: usize,
        /// Payments started.
        attempted: usize,
        /// The run's directory (logs).
        dir: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> E2eBenchError + '_ {
    move |source| E2eBenchError::Io {
        path: path.to_owned(),
        source,
    }
}

fn setup_err(step: &'static str) -> impl Fn(String) -> E2eBenchError {
    move |reason| E2eBenchError::Setup { step, reason }
}

/// Runs the benchmark in a fresh directory; the servers it started are stopped on return.
pub fn run(p: E2eBench) -> Result<(), E2eBenchError> {
    if p.payers == 0 || p.payments == 0 || p.setup_concurrency == 0 || p.payment_timeout_s == 0 {
        return Err(E2eBenchError::Usage(
            "--payers, --payments, --setup-concurrency and --payment-timeout-s must be at least 1",
        ));
    }
    let repo =
        super::dev::repo_dir().map_err(|e| setup_err("find the repository")(e.to_string()))?;
    let parent = p.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!(
        "mxpay-bench-e2e-{}-{}",
        std::process::id(),
        random_suffix(6)
    ));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    println!(
        "mxpay bench e2e: {} payers x {} payments, {}, {} build",
        p.payers,
        p.payments,
        match p.rooms {
            Rooms::Pair => "one room per payer/payee pair",
            Rooms::Shared => "one room shared by everyone",
        },
        if cfg!(debug_assertions) {
            "debug (measure with `cargo run --release -- bench e2e`)"
        } else {
            "release"
        }
    );
    println!("run directory: {}", dir.display());
    let result = run_in(&repo, &dir, &p);
    let keep = p.keep || result.is_err();
    if keep {
        println!("kept {} (mxpay.log, synapse/homeserver.log)", dir.display());
    } else if let Err(e) = std::fs::remove_dir_all(&dir) {
        println!("could not delete {}: {e}", dir.display());
    }
    result
}

fn run_in(repo: &Path, dir: &Path, p: &E2eBench) -> Result<(), E2eBenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| setup_err("start the async runtime")(e.to_string()))?;
    let stack = Stack::start(repo, dir)?;
    let result = runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| setup_err("watch for SIGTERM")(e.to_string()))?;
        tokio::select! {
            result = bench(&stack, dir, p) => result,
            _ = tokio::signal::ctrl_c() => Err(E2eBenchError::Interrupted),
            _ = terminate.recv() => Err(E2eBenchError::Interrupted),
        }
    });
    // The clients' sync loops end with the runtime, before their homeserver goes away.
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(stack);
    result
}

// ---------------------------------------------------------------------------------------------
// The servers.

/// Synapse and `mxpay serve`, each under a watcher script that stops it when our end of its
/// standard input closes (also when this process dies). Dropping the stack stops both.
struct Stack {
    homeserver_url: String,
    mxpay_url: String,
    shared_secret: String,
    tokens: crate::admin::token::TokenAuthority,
    synapse: Watched,
    mxpay: Watched,
}

/// A child run under a watcher (`synapse.sh run` or `synapse.sh guard`), and the PID of the
/// server process itself (for its CPU time and memory).
struct Watched {
    name: &'static str,
    watcher: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
}

impl Watched {
    /// Closes the watcher's standard input (it sends SIGTERM and, for Synapse, SIGKILL after
    /// its own bound), waits a bounded time, then kills the server and the watcher.
    fn stop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.watcher.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{} did not stop within {STOP_TIMEOUT:?}: killing it",
            self.name
        );
        if self.pid != 0 && process_alive(self.pid) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.pid.to_string())
                .status();
        }
        let _ = self.watcher.kill();
        let _ = self.watcher.wait();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // mxpay first: it finishes what it acknowledged while its homeserver still answers.
        self.mxpay.stop();
        self.synapse.stop();
    }
}

impl Stack {
    fn start(repo: &Path, dir: &Path) -> Result<Self, E2eBenchError> {
        let script = repo.join("scripts/synapse.sh");
        let homeserver_port = free_port()?;
        let appservice_port = free_port()?;
        let homeserver_url = format!("http://127.0.0.1:{homeserver_port}");
        let mxpay_url = format!("http://127.0.0.1:{appservice_port}");
        let mxpay_dir = dir.join("mxpay");
        std::fs::create_dir_all(&mxpay_dir).map_err(io_err(&mxpay_dir))?;
        let config_path = mxpay_dir.join("config.yaml");
        let registration_path = mxpay_dir.join("registration.yaml");
        write_file(
            &config_path,
            &bench_config(&homeserver_url, appservice_port),
        )?;
        write_file(&mxpay_dir.join("pepper"), &random_hex_secret())?;
        let admin_key = random_hex_secret();
        write_file(&mxpay_dir.join("admin-jwt.key"), &admin_key)?;
        let exe = std::env::current_exe().map_err(io_err(Path::new("mxpay")))?;
        let status = Command::new(&exe)
            .arg("generate-registration")
            .arg("-c")
            .arg(&config_path)
            .arg("-o")
            .arg(&registration_path)
            .stdout(Stdio::null())
            .status()
            .map_err(io_err(&exe))?;
        if !status.success() {
            return Err(setup_err("write the registration")(format!(
                "mxpay generate-registration: {status}"
            )));
        }

        println!("starting Synapse (a first run installs it into .venv/, about 30 s)...");
        let synapse_dir = dir.join("synapse");
        let synapse = start_synapse(&script, &synapse_dir, homeserver_port, &registration_path)?;
        // From here on, dropping `synapse` would leave it to the watcher; stop it explicitly
        // on every error below.
        let mut synapse = Some(synapse);
        let started = (|| {
            let shared_secret =
                super::dev::read_shared_secret(&synapse_dir.join("homeserver.yaml"))
                    .map_err(|e| setup_err("read Synapse's config")(e.to_string()))?;
            let tokens = super::dev::token_authority(admin_key.as_bytes())
                .map_err(|e| setup_err("admin tokens")(e.to_string()))?;
            let log_path = dir.join("mxpay.log");
            let mxpay = start_mxpay(&script, &exe, &config_path, &log_path)?;
            Ok::<_, E2eBenchError>((shared_secret, tokens, mxpay))
        })();
        let (shared_secret, tokens, mxpay) = match started {
            Ok(started) => started,
            Err(e) => {
                if let Some(mut synapse) = synapse.take() {
                    synapse.stop();
                }
                return Err(e);
            }
        };
        let stack = Self {
            homeserver_url,
            mxpay_url,
            shared_secret,
            tokens,
            synapse: synapse.take().expect("set above"),
            mxpay,
        };
        Ok(stack)
    }

    /// Polls `/ready` (listening, start-up checks and the homeserver ping passed).
    async fn wait_mxpay_ready(&self, log_path: &Path) -> Result<(), E2eBenchError> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + MXPAY_UP_TIMEOUT;
        let url = format!("{}/ready", self.mxpay_url);
        loop {
            let answer = http.get(&url).timeout(Duration::from_secs(2)).send().await;
            if matches!(answer, Ok(r) if r.status().is_success()) {
                return Ok(());
            }
            if !process_alive(self.mxpay.pid) || Instant::now() >= deadline {
                return Err(setup_err("start mxpay serve")(format!(
                    "{url} did not answer within {MXPAY_UP_TIMEOUT:?}; the end of {}:\n{}",
                    log_path.display(),
                    log_tail(log_path, 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `scripts/synapse.sh run`: Synapse as the script's child, stopped when its stdin closes.
fn start_synapse(
    script: &Path,
    dir: &Path,
    port: u16,
    registration: &Path,
) -> Result<Watched, E2eBenchError> {
    let mut watcher = Command::new("bash")
        .arg(script)
        .arg("run")
        .arg(dir)
        .arg("--port")
        .arg(port.to_string())
        .arg("--registration")
        .arg(registration)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io_err(script))?;
    let stdin = watcher.stdin.take();
    let stdout = watcher.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads until the script ends, so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ready ") {
                let _ = tx.send(());
            }
        }
    });
    let mut watched = Watched {
        name: "Synapse",
        watcher,
        stdin,
        pid: 0,
    };
    let deadline = Instant::now() + SYNAPSE_UP_TIMEOUT;
    loop {
        if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
            break;
        }
        let exited = !matches!(watched.watcher.try_wait(), Ok(None));
        if exited || Instant::now() >= deadline {
            watched.stop();
            return Err(setup_err("start Synapse")(format!(
                "not up within {SYNAPSE_UP_TIMEOUT:?} (logs: {})",
                dir.display()
            )));
        }
    }
    let pid_path = dir.join("synapse.pid");
    match std::fs::read_to_string(&pid_path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
    {
        Some(pid) => watched.pid = pid,
        None => {
            watched.stop();
            return Err(setup_err("start Synapse")(format!(
                "no PID in {}",
                pid_path.display()
            )));
        }
    }
    Ok(watched)
}

/// `mxpay serve` under `scripts/synapse.sh guard --signal TERM`; its output goes to `log`.
fn start_mxpay(
    script: &Path,
    exe: &Path,
    config: &Path,
    log: &Path,
) -> Result<Watched, E2eBenchError> {
    let out = std::fs::File::create(log).map_err(io_err(log))?;
    let err = out.try_clone().map_err(io_err(log))?;
    let mut watcher = Command::new("bash")
        .arg(script)
        .args(["guard", "--signal", "TERM"])
        .arg(exe)
        .arg("serve")
        .arg("-c")
        .arg(config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io_err(script))?;
    let stdin = watcher.stdin.take();
    let guard_pid = watcher.id();
    let mut watched = Watched {
        name: "mxpay serve",
        watcher,
        stdin,
        pid: 0,
    };
    // The guard starts mxpay as its child: find it (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(pid) = child_running(guard_pid, exe) {
            watched.pid = pid;
            return Ok(watched);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    watched.stop();
    Err(setup_err("start mxpay serve")(format!(
        "no mxpay process under the guard (log: {})",
        log.display()
    )))
}

/// The PID of a child of `parent` running `exe`.
fn child_running(parent: u32, exe: &Path) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            proc_stat_fields(*pid).is_some_and(|fields| fields.get(1) == Some(&parent.to_string()))
                && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|path| path == exe)
        })
}

/// The mxpay config of a run: as `mxpay dev` writes it, with the payment command rate limit
/// raised so that `--payments` above 10 per minute measures payments, not the limit.
fn bench_config(homeserver_url: &str, appservice_port: u16) -> String {
    format!(
        "# Written by `mxpay bench e2e`.\n\
         homeserver:\n  url: {homeserver_url}\n  server_name: {SERVER_NAME}\n\
         appservice:\n  registration: ./registration.yaml\n  id: mxpay\n  bot_localpart: {BOT_LOCALPART}\n  \
         listen: 127.0.0.1:{appservice_port}\n  url: http://127.0.0.1:{appservice_port}\n\
         data_dir: ./data\n\
         payments:\n  enabled: true\n  pepper_file: ./pepper\n  commands_per_minute_max: 600\n  hold_for_new_payees: false\n\
         logging:\n  level: info\n  format: pretty\n\
         admin:\n  token:\n    algorithm: HS256\n    secret: {{ file: ./admin-jwt.key }}\n"
    )
}

fn write_file(path: &Path, text: &str) -> Result<(), E2eBenchError> {
    // The umask (set before any command runs) keeps it owner-only, as mxpay wants secrets.
    std::fs::write(path, text).map_err(io_err(path))
}

fn random_hex_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    format!("{}\n", hex::encode(bytes))
}

fn random_suffix(len: usize) -> String {
    use rand::Rng as _;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

fn free_port() -> Result<u16, E2eBenchError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(io_err(Path::new("127.0.0.1:0")))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// What /proc says about a process.

/// The fields of `/proc/<pid>/stat` after the command name: [0] is the state, [1] the parent.
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &text[text.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

fn process_alive(pid: u32) -> bool {
    pid != 0 && proc_stat_fields(pid).is_some_and(|fields| fields[0] != "Z")
}

/// User + system CPU seconds a process used so far (all its threads).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let fields = proc_stat_fields(pid)?;
    // Fields 14 and 15 of stat(5), counted from the PID as 1: utime and stime in clock ticks.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the running system; no memory is handed over.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Peak resident set size (`VmHWM`) in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// What /metrics says.

/// One scrape of mxpay's `/metrics`: series (name with labels) -> value.
#[derive(Debug, Default, Clone)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let series = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self(series)
    }

    /// Sum of every series of metric `name` (all label values).
    fn sum(&self, name: &str) -> f64 {
        self.by_label(name).values().sum()
    }

    /// Series of metric `name` keyed by their label set (`{...}` or empty).
    fn by_label(&self, name: &str) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .filter_map(|(series, value)| {
                let labels = series.strip_prefix(name)?;
                (labels.is_empty() || labels.starts_with('{')).then(|| (labels.to_owned(), *value))
            })
            .collect()
    }
}

/// Homeserver requests (each attempt): the request-duration histogram's counts.
const REQUESTS: &str = "mxpay_homeserver_request_duration_seconds_count";
const REQUEST_ERRORS: &str = "mxpay_homeserver_request_errors_total";
/// Events in the transactions Synapse pushed, by type.
const EVENTS: &str = "mxpay_events_total";
const TRANSACTIONS: &str = "mxpay_transactions_received_total";
const HANDLER_SECONDS: &str = "mxpay_handler_duration_seconds_sum";
const PARKED: &str = "mxpay_crypto_parked_events";
const PAYMENTS: &str = "mxpay_payments_total";

async fn scrape(http: &reqwest::Client, mxpay_url: &str) -> Result<Scrape, String> {
    let response = http
        .get(format!("{mxpay_url}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("/metrics answered {}", response.status()));
    }
    Ok(Scrape::parse(
        &response.text().await.map_err(|e| e.to_string())?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Users with real clients.

/// A timeline event a client handed out (decrypted when it could), and when.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    at_unix_ms: u64,
    room_id: OwnedRoomId,
    json: Value,
    /// Decrypted after it arrived (its room key came later), as a client's timeline does.
    decrypted_late: bool,
}

/// A user with a logged-in, cross-signed, syncing matrix-sdk client that records what it sees.
struct Person {
    user_id: OwnedUserId,
    client: Client,
    seen: Arc<Mutex<Vec<Seen>>>,
    changed: tokio::sync::watch::Receiver<usize>,
    sync_task: tokio::task::JoinHandle<()>,
}

impl Drop for Person {
    fn drop(&mut self) {
        self.sync_task.abort();
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Most timeline events one sync may return per room. Synapse's default is 10: in a room
/// shared by many payers a client whose sync comes back later than that many events gets a
/// "limited" timeline, and the events before them never reach its event handlers (a client
/// shows a gap it fills by paginating back; these clients do not), so a receipt mxpay did send
/// looked lost.
const SYNC_TIMELINE_LIMIT: u32 = 1000;

/// The clients' long-running sync: a timeline limit large enough that no event is skipped.
fn sync_settings() -> SyncSettings {
    use matrix_sdk::ruma::api::client::filter::{FilterDefinition, RoomEventFilter, RoomFilter};
    let mut timeline = RoomEventFilter::default();
    timeline.limit = Some(SYNC_TIMELINE_LIMIT.into());
    let mut room = RoomFilter::default();
    room.timeline = timeline;
    let mut filter = FilterDefinition::default();
    filter.room = room;
    SyncSettings::default().filter(filter.into())
}

/// How often and how long an event that arrived undecryptable is tried again: clients
/// (Element, Element X) decrypt such events when the room key arrives in a later sync, so a
/// key that is late is not a lost payment; the report counts these separately.
const LATE_DECRYPT_INTERVAL: Duration = Duration::from_millis(500);
const LATE_DECRYPT_TRIES: u32 = 120;

fn record_seen(
    log: &Mutex<Vec<Seen>>,
    changed: &tokio::sync::watch::Sender<usize>,
    room_id: &RoomId,
    json: Value,
    decrypted_late: bool,
) {
    let seen = Seen {
        at: Instant::now(),
        at_unix_ms: unix_ms(SystemTime::now()),
        room_id: room_id.to_owned(),
        json,
        decrypted_late,
    };
    let count = {
        let mut log = log.lock().expect("lock");
        log.push(seen);
        log.len()
    };
    changed.send_replace(count);
}

/// Tries to decrypt an event that arrived undecryptable until its room key is there (bounded);
/// the decrypted event is then recorded as seen now.
async fn decrypt_late(
    room: Room,
    raw: Box<serde_json::value::RawValue>,
    log: Arc<Mutex<Vec<Seen>>>,
    changed: tokio::sync::watch::Sender<usize>,
) {
    let event: Raw<OriginalSyncRoomEncryptedEvent> = Raw::from_json(raw);
    for _ in 0..LATE_DECRYPT_TRIES {
        tokio::time::sleep(LATE_DECRYPT_INTERVAL).await;
        let Ok(decrypted) = room.decrypt_event(&event, None).await else {
            continue;
        };
        if let TimelineEventKind::Decrypted(_) = decrypted.kind {
            let json = serde_json::from_str(decrypted.raw().json().get()).unwrap_or(Value::Null);
            record_seen(&log, &changed, room.room_id(), json, true);
            return;
        }
    }
}

impl Person {
    async fn new(stack: &Stack, localpart: String) -> Result<Self, E2eBenchError> {
        let err = setup_err("register a user with a cross-signed client");
        let password = random_suffix(24);
        crate::homeserver::admin_register::register(
            &stack.homeserver_url,
            &stack.shared_secret,
            &localpart,
            &password,
        )
        .await
        .map_err(|e| err(format!("{localpart}: {e}")))?;
        // In-memory stores: the benchmark's clients live for one run.
        let client = Client::builder()
            .homeserver_url(&stack.homeserver_url)
            .build()
            .await
            .map_err(|e| err(e.to_string()))?;
        client
            .matrix_auth()
            .login_username(&localpart, &password)
            .initial_device_display_name("mxpay bench")
            .send()
            .await
            .map_err(|e| err(format!("{localpart}: {e}")))?;
        let user_id = client
            .user_id()
            .ok_or_else(|| err("no user id after login".to_owned()))?
            .to_owned();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (tx, changed) = tokio::sync::watch::channel(0usize);
        let log = seen.clone();
        client.add_event_handler(
            move |_: Raw<AnySyncTimelineEvent>, room: Room, raw: RawEvent| {
                let log = log.clone();
                let tx = tx.clone();
                async move {
                    let json: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                    let undecrypted = json["type"] == "m.room.encrypted";
                    record_seen(&log, &tx, room.room_id(), json, false);
                    if undecrypted {
                        tokio::spawn(decrypt_late(room, raw.0, log, tx));
                    }
                }
            },
        );
        client
            .sync_once(SyncSettings::default().timeout(Duration::ZERO))
            .await
            .map_err(|e| err(e.to_string()))?;
        super::demo::bootstrap_cross_signing(&client, &localpart, &password)
            .await
            .map_err(|e| err(format!("{localpart}: {e}")))?;
        let sync_client = client.clone();
        let sync_task = tokio::spawn(async move {
            let _ = sync_client.sync(sync_settings()).await;
        });
        Ok(Self {
            user_id,
            client,
            seen,
            changed,
            sync_task,
        })
    }

    /// How many events this client has seen: wait for later ones with [`Person::wait_after`].
    fn cursor(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    /// Waits until `deadline` for an event seen after `cursor` that `predicate` accepts.
    async fn wait_after(
        &self,
        cursor: usize,
        deadline: tokio::time::Instant,
        predicate: impl Fn(&RoomId, &Value) -> bool,
    ) -> Option<Seen> {
        let mut changed = self.changed.clone();
        let mut from = cursor;
        loop {
            changed.borrow_and_update();
            {
                let seen = self.seen.lock().expect("lock");
                if let Some(found) = seen
                    .get(from..)
                    .unwrap_or_default()
                    .iter()
                    .find(|s| predicate(&s.room_id, &s.json))
                {
                    return Some(found.clone());
                }
                from = seen.len().max(from);
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Waits until this client's room state has `user` joined. Read from the state store, not
    /// the timeline: in a room that many joined, an early join reaches a newcomer only in the
    /// sync's `state` section, never as a timeline event.
    async fn wait_membership(
        &self,
        room_id: &RoomId,
        user: &UserId,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        loop {
            if let Some(room) = self.client.get_room(room_id) {
                let member = room.get_member_no_sync(user).await.ok().flatten();
                if member.is_some_and(|m| *m.membership() == MembershipState::Join) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{} never saw {user} join {room_id}", self.user_id));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Events seen since `since` that the client could not decrypt on arrival (still
    /// `m.room.encrypted`), sent by `sender` (`None`: by anyone).
    fn undecrypted_since(&self, since: Instant, sender: Option<&UserId>) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.at >= since && s.json["type"] == "m.room.encrypted")
            .filter(|s| sender.is_none_or(|sender| s.json["sender"] == sender.as_str()))
            .count()
    }

    /// Of those, how many were decrypted later (their room key arrived after them).
    fn decrypted_late_since(&self, since: Instant) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.at >= since && s.decrypted_late)
            .count()
    }

    async fn wait_bot_text(
        &self,
        cursor: usize,
        room_id: &RoomId,
        bot: &UserId,
        part: &str,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + SETUP_STEP_TIMEOUT;
        self.wait_after(cursor, deadline, |room, event| {
            room == room_id
                && event["sender"] == bot.as_str()
                && event["type"] == "m.room.message"
                && event["content"]["body"]
                    .as_str()
                    .is_some_and(|body| body.contains(part))
        })
        .await
        .map(drop)
        .ok_or_else(|| {
            format!(
                "{} got no \"{part}\" from the bot within {SETUP_STEP_TIMEOUT:?}",
                self.user_id
            )
        })
    }

    /// The client's room, once its sync knows it (bounded).
    async fn room(&self, room_id: &RoomId) -> Result<Room, String> {
        let deadline = Instant::now() + SETUP_STEP_TIMEOUT;
        loop {
            if let Some(room) = self.client.get_room(room_id) {
                return Ok(room);
            }
            if Instant::now() >= deadline {
                return Err(format!("{} does not know room {room_id}", self.user_id));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `text` (encrypted: the rooms are) and returns the event's id.
    async fn say(&self, room_id: &RoomId, text: &str) -> Result<OwnedEventId, String> {
        let room = self.room(room_id).await?;
        let sent = room
            .send(RoomMessageEventContent::text_plain(text))
            .await
            .map_err(|e| e.to_string())?;
        Ok(sent.response.event_id)
    }

    async fn create_room(
        &self,
        invite: Vec<OwnedUserId>,
        preset: RoomPreset,
        is_direct: bool,
    ) -> Result<OwnedRoomId, String> {
        let mut request = CreateRoomRequest::new();
        request.preset = Some(preset);
        request.is_direct = is_direct;
        request.invite = invite;
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
}

/// A payer with its DM (PIN set) and the room where it pays its payee.
struct Pair {
    payer: Person,
    payee: Person,
    dm: OwnedRoomId,
    room: OwnedRoomId,
}

/// Registers everyone, funds the payers, sets their PINs and makes the rooms.
async fn prepare(stack: &Stack, p: &E2eBench, bot: &UserId) -> Result<Vec<Pair>, E2eBenchError> {
    let run = random_suffix(6);
    let people: Vec<Result<Person, E2eBenchError>> =
        futures_util::stream::iter((0..2 * p.payers).map(|i| {
            let role = if i < p.payers { "payer" } else { "payee" };
            Person::new(stack, format!("bench_{role}{}_{run}", i % p.payers))
        }))
        .buffered(p.setup_concurrency)
        .collect()
        .await;
    let mut people = people.into_iter().collect::<Result<Vec<_>, _>>()?;
    let payees = people.split_off(p.payers);
    let payers = people;

    // Enough for every payment (1.00 + k cents each) with room to spare.
    let funds = format!("{}.00", 2 * p.payments + 10);
    let funded: Vec<Result<(), String>> = futures_util::stream::iter(payers.iter().map(|payer| {
        let funds = &funds;
        async move {
            let idempotency_key = format!("mxpay-bench-{}", payer.user_id);
            super::dev::topup(
                &stack.mxpay_url,
                &stack.tokens,
                payer.user_id.as_str(),
                funds,
                &idempotency_key,
            )
            .await
        }
    }))
    .buffered(p.setup_concurrency)
    .collect()
    .await;
    for result in funded {
        result.map_err(setup_err("fund the payers (admin API top-up)"))?;
    }

    let dms: Vec<Result<OwnedRoomId, String>> =
        futures_util::stream::iter(payers.iter().map(|payer| set_pin(payer, bot)))
            .buffered(p.setup_concurrency)
            .collect()
            .await;
    let dms = dms
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(setup_err("open a DM with the bot and set a PIN"))?;

    let rooms = payment_rooms(&payers, &payees, p, bot)
        .await
        .map_err(setup_err("make the payment rooms"))?;
    Ok(payers
        .into_iter()
        .zip(payees)
        .zip(dms.into_iter().zip(rooms))
        .map(|((payer, payee), (dm, room))| Pair {
            payer,
            payee,
            dm,
            room,
        })
        .collect())
}

/// Opens the payer's DM with the bot and sets the PIN there, as `mxpay demo` does.
async fn set_pin(payer: &Person, bot: &UserId) -> Result<OwnedRoomId, String> {
    let dm = payer
        .create_room(vec![bot.to_owned()], RoomPreset::TrustedPrivateChat, true)
        .await?;
    payer
        .wait_membership(&dm, bot, tokio::time::Instant::now() + SETUP_STEP_TIMEOUT)
        .await?;
    for (say, answer) in [
        ("!pin set", "Choose a 4-digit PIN"),
        (PIN, "Send the same PIN again"),
        (PIN, "Your PIN is set"),
    ] {
        let cursor = payer.cursor();
        payer.say(&dm, say).await?;
        payer.wait_bot_text(cursor, &dm, bot, answer).await?;
    }
    Ok(dm)
}

/// The room of each pair: its own, or the one shared room. Returns when every payer has
/// seen the bot and its payee join.
async fn payment_rooms(
    payers: &[Person],
    payees: &[Person],
    p: &E2eBench,
    bot: &UserId,
) -> Result<Vec<OwnedRoomId>, String> {
    let rooms: Vec<OwnedRoomId> = match p.rooms {
        Rooms::Pair => {
            let made: Vec<Result<OwnedRoomId, String>> = futures_util::stream::iter(
                payers.iter().zip(payees).map(|(payer, payee)| async move {
                    let room = payer
                        .create_room(
                            vec![bot.to_owned(), payee.user_id.clone()],
                            RoomPreset::PrivateChat,
                            false,
                        )
                        .await?;
                    payee
                        .client
                        .join_room_by_id(&room)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(room)
                }),
            )
            .buffered(p.setup_concurrency)
            .collect()
            .await;
            made.into_iter().collect::<Result<_, _>>()?
        }
        Rooms::Shared => {
            let invite = std::iter::once(bot.to_owned())
                .chain(payers[1..].iter().map(|person| person.user_id.clone()))
                .chain(payees.iter().map(|person| person.user_id.clone()))
                .collect();
            let room = payers[0]
                .create_room(invite, RoomPreset::PrivateChat, false)
                .await?;
            let joined: Vec<Result<(), String>> =
                futures_util::stream::iter(payers[1..].iter().chain(payees).map(|person| {
                    let room = room.clone();
                    async move {
                        person
                            .client
                            .join_room_by_id(&room)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                }))
                .buffered(p.setup_concurrency)
                .collect()
                .await;
            joined.into_iter().collect::<Result<(), _>>()?;
            vec![room; p.payers]
        }
    };
    let deadline = tokio::time::Instant::now() + SETUP_STEP_TIMEOUT;
    let waited: Vec<Result<(), String>> =
        futures_util::stream::iter(payers.iter().zip(payees).zip(&rooms).map(
            |((payer, payee), room)| async move {
                payer.wait_membership(room, bot, deadline).await?;
                payer.wait_membership(room, &payee.user_id, deadline).await
            },
        ))
        .buffer_unordered(p.payers)
        .collect()
        .await;
    waited.into_iter().collect::<Result<(), _>>()?;
    Ok(rooms)
}

// ---------------------------------------------------------------------------------------------
// The measured part.

/// How one payment ended.
#[derive(Debug)]
enum Outcome {
    Completed(Timings),
    /// The bot answered with a receipt that is not `completed` (declined, failed, expired).
    NotCompleted {
        status: String,
        reason: String,
    },
    /// No answer in time, or a request failed.
    Lost {
        step: &'static str,
        why: String,
    },
}

/// The steps of one completed payment.
#[derive(Debug, Clone, Copy)]
struct Timings {
    pay_to_challenge: Duration,
    pin_to_posted: Duration,
    posted_to_payee: Duration,
    pin_to_payee: Duration,
    pay_to_payee: Duration,
    /// When the payee saw the receipt.
    done_at: Instant,
    /// `--merchant`: from the invoice's creation through the API until the payer saw it.
    invoice_to_seen: Option<Duration>,
    /// `--merchant`: from the PIN until the merchant's receiver got `invoice.paid`.
    pin_to_webhook: Option<Duration>,
}

impl Timings {
    /// The names of [`Timings::steps`], as printed.
    const STEPS: [&'static str; 5] = [
        "!pay -> challenge",
        "PIN -> posted",
        "posted -> payee sees receipt",
        "PIN -> payee sees receipt",
        "!pay -> payee sees receipt",
    ];

    /// The names of [`Timings::merchant_steps`], as printed.
    const MERCHANT_STEPS: [&'static str; 2] =
        ["invoice -> payer sees it", "PIN -> invoice.paid webhook"];

    fn merchant_steps(&self) -> [Option<Duration>; 2] {
        [self.invoice_to_seen, self.pin_to_webhook]
    }

    fn steps(&self) -> [Duration; 5] {
        [
            self.pay_to_challenge,
            self.pin_to_posted,
            self.posted_to_payee,
            self.pin_to_payee,
            self.pay_to_payee,
        ]
    }
}

/// `1.00`, `1.01`, ...: each payment of a payer has its own amount, so a late challenge of
/// an earlier payment is never taken for a later one's.
fn amount_of(k: usize) -> String {
    format!("{}.{:02}", 1 + k / 100, k % 100)
}

/// The typed payload of `kind` in `event`: the content of an event of that type, or the
/// content's `kind` key (an event that carries a typed payload beside its readable body).
fn typed<'a>(event: &'a Value, kind: &str) -> Option<&'a Value> {
    if event["type"] == kind {
        Some(&event["content"])
    } else {
        event["content"].get(kind)
    }
}

/// Whether `event` is the bot's receipt answering `pay_event`.
fn is_receipt_of(event: &Value, bot: &UserId, pay_event: &EventId) -> bool {
    let relates = &event["content"]["m.relates_to"];
    event["sender"] == bot.as_str()
        && typed(event, "org.mxpay.receipt").is_some()
        && (relates["event_id"] == pay_event.as_str()
            || relates["m.in_reply_to"]["event_id"] == pay_event.as_str())
}

/// Whether `event` is the bot's PIN challenge for `amount` in `room`.
fn is_challenge_for(event: &Value, bot: &UserId, amount: &str, room: &RoomId) -> bool {
    event["sender"] == bot.as_str()
        && typed(event, "org.mxpay.stepup.challenge")
            .is_some_and(|c| c["amount"] == amount && c["room_id"] == room.as_str())
}

impl Outcome {
    /// The outcome a receipt seen by the payee says: completed, with the steps' times.
    fn completed(receipt: &Seen, pay_at: Instant, pin_at: Instant, pin_at_unix_ms: u64) -> Self {
        let status = typed(&receipt.json, "org.mxpay.receipt").map(|c| &c["status"]);
        if status.is_none_or(|s| s != "completed") {
            return not_completed(&receipt.json);
        }
        // Synapse stamps the receipt when the bot sends it: the payment was posted by then.
        let posted_unix_ms = receipt.json["origin_server_ts"]
            .as_u64()
            .unwrap_or(receipt.at_unix_ms);
        Outcome::Completed(Timings {
            pay_to_challenge: Duration::ZERO,
            pin_to_posted: Duration::from_millis(posted_unix_ms.saturating_sub(pin_at_unix_ms)),
            posted_to_payee: Duration::from_millis(
                receipt.at_unix_ms.saturating_sub(posted_unix_ms),
            ),
            pin_to_payee: receipt.at - pin_at,
            pay_to_payee: receipt.at - pay_at,
            done_at: receipt.at,
            invoice_to_seen: None,
            pin_to_webhook: None,
        })
    }
}

/// A payment's challenge answered: the challenge as seen, and when the PIN was sent.
struct Confirmed {
    challenge: Seen,
    pin_at: Instant,
    pin_at_unix_ms: u64,
}

/// After the payer's `pay_event`: waits for the challenge for `amount` in the payer's DM (or a
/// receipt refusing the payment in the room) and sends the PIN. `Err` is how the payment
/// ended instead.
async fn confirm_with_pin(
    pair: &Pair,
    payer_cursor: usize,
    pay_event: &EventId,
    amount: &str,
    bot: &UserId,
    deadline: tokio::time::Instant,
) -> Result<Confirmed, Outcome> {
    let challenge = pair
        .payer
        .wait_after(payer_cursor, deadline, |room, event| {
            (room == pair.room && is_receipt_of(event, bot, pay_event))
                || (room == pair.dm && is_challenge_for(event, bot, amount, &pair.room))
        })
        .await
        .ok_or_else(|| Outcome::Lost {
            step: "!pay -> challenge",
            why: "no challenge in time".to_owned(),
        })?;
    if challenge.room_id == pair.room {
        return Err(not_completed(&challenge.json));
    }
    let pin_at = Instant::now();
    let pin_at_unix_ms = unix_ms(SystemTime::now());
    pair.payer
        .say(&pair.dm, PIN)
        .await
        .map_err(|why| Outcome::Lost {
            step: "send the PIN",
            why,
        })?;
    Ok(Confirmed {
        challenge,
        pin_at,
        pin_at_unix_ms,
    })
}

impl Confirmed {
    /// Waits for the payee's client to show the receipt answering `pay_event` and says how the
    /// payment ended, with its steps' times from `pay_at` (the `!pay`).
    async fn payee_sees_receipt(
        self,
        pair: &Pair,
        payee_cursor: usize,
        pay_event: &EventId,
        pay_at: Instant,
        bot: &UserId,
        deadline: tokio::time::Instant,
    ) -> Outcome {
        let Some(receipt) = pair
            .payee
            .wait_after(payee_cursor, deadline, |room, event| {
                room == pair.room && is_receipt_of(event, bot, pay_event)
            })
            .await
        else {
            return Outcome::Lost {
                step: "PIN -> payee sees the receipt",
                why: "no receipt in time".to_owned(),
            };
        };
        match Outcome::completed(&receipt, pay_at, self.pin_at, self.pin_at_unix_ms) {
            Outcome::Completed(timings) => Outcome::Completed(Timings {
                pay_to_challenge: self.challenge.at - pay_at,
                ..timings
            }),
            other => other,
        }
    }
}

async fn pay_once(pair: &Pair, k: usize, bot: &UserId, timeout: Duration) -> Outcome {
    let amount = amount_of(k);
    let payer_cursor = pair.payer.cursor();
    let payee_cursor = pair.payee.cursor();
    let pay_at = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let lost = |step, why: String| Outcome::Lost { step, why };
    let pay_event = match pair
        .payer
        .say(
            &pair.room,
            &format!("!pay {} {amount} {CURRENCY} bench {k}", pair.payee.user_id),
        )
        .await
    {
        Ok(event_id) => event_id,
        Err(e) => return lost("send !pay", e),
    };
    let confirmed =
        match confirm_with_pin(pair, payer_cursor, &pay_event, &amount, bot, deadline).await {
            Ok(confirmed) => confirmed,
            Err(outcome) => return outcome,
        };
    confirmed
        .payee_sees_receipt(pair, payee_cursor, &pay_event, pay_at, bot, deadline)
        .await
}

fn not_completed(receipt: &Value) -> Outcome {
    let text = |key: &str| {
        typed(receipt, "org.mxpay.receipt")
            .and_then(|c| c[key].as_str())
            .unwrap_or("")
            .to_owned()
    };
    Outcome::NotCompleted {
        status: text("status"),
        reason: text("reason"),
    }
}

/// Each payer's payments, one after the other; a payment that did not complete is followed
/// by `!cancel` in the DM, so a late challenge cannot wait beside the next one's.
async fn payer_run(
    pair: &Pair,
    shop: Option<Shop<'_>>,
    payments: usize,
    bot: &UserId,
    timeout: Duration,
) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(payments);
    for k in 0..payments {
        let outcome = match &shop {
            None => pay_once(pair, k, bot, timeout).await,
            Some(shop) => {
                merchant::pay_invoice(
                    shop.stack,
                    pair,
                    shop.merchant,
                    shop.receiver,
                    shop.payer_index,
                    k,
                    bot,
                    timeout,
                )
                .await
            }
        };
        if !matches!(outcome, Outcome::Completed(_)) {
            let _ = pair.payer.say(&pair.dm, "!cancel").await;
        }
        outcomes.push(outcome);
    }
    outcomes
}

/// `--merchant`: what a payer's run needs to pay invoices of its payee's shop.
struct Shop<'a> {
    stack: &'a Stack,
    merchant: &'a merchant::Merchant,
    receiver: &'a merchant::Receiver,
    payer_index: usize,
}

/// CPU seconds of the servers and this process, at one moment.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    mxpay: f64,
    synapse: f64,
    bench: f64,
}

impl Cpu {
    fn now(stack: &Stack) -> Self {
        Self {
            mxpay: cpu_seconds(stack.mxpay.pid).unwrap_or(f64::NAN),
            synapse: cpu_seconds(stack.synapse.pid).unwrap_or(f64::NAN),
            bench: cpu_seconds(std::process::id()).unwrap_or(f64::NAN),
        }
    }
}

async fn bench(stack: &Stack, dir: &Path, p: &E2eBench) -> Result<(), E2eBenchError> {
    let bot = UserId::parse(format!("@{BOT_LOCALPART}:{SERVER_NAME}"))
        .map_err(|e| setup_err("the bot's user id")(e.to_string()))?;
    let setup_started = Instant::now();
    stack.wait_mxpay_ready(&dir.join("mxpay.log")).await?;
    let pairs = prepare(stack, p, &bot).await?;
    println!(
        "set-up: {} users with cross-signed clients, payers funded, PINs set, rooms ready in {:.1} s",
        2 * p.payers,
        setup_started.elapsed().as_secs_f64()
    );

    let shops = if p.merchant {
        let receiver = merchant::Receiver::start().await?;
        let payees: Vec<&Person> = pairs.iter().map(|pair| &pair.payee).collect();
        let merchants = merchant::register(stack, &payees, &receiver).await?;
        println!(
            "merchant mode: {} payees registered as merchants, webhooks to a local receiver",
            merchants.len()
        );
        Some((receiver, merchants))
    } else {
        None
    };
    let http = reqwest::Client::new();
    let metrics_err = setup_err("read mxpay's /metrics");
    let before = scrape(&http, &stack.mxpay_url)
        .await
        .map_err(&metrics_err)?;
    let cpu_before = Cpu::now(stack);
    let timeout = Duration::from_secs(p.payment_timeout_s);
    let started = Instant::now();
    let outcomes: Vec<Vec<Outcome>> =
        futures_util::future::join_all(pairs.iter().enumerate().map(|(i, pair)| {
            let shop = shops.as_ref().map(|(receiver, merchants)| Shop {
                stack,
                merchant: &merchants[i],
                receiver,
                payer_index: i,
            });
            payer_run(pair, shop, p.payments, &bot, timeout)
        }))
        .await;
    let elapsed = started.elapsed();
    // Let what the last payments set off (DM receipts, redactions) reach the counters.
    let settle_started = Instant::now();
    let mut after = scrape(&http, &stack.mxpay_url)
        .await
        .map_err(&metrics_err)?;
    let mut quiet_since = Instant::now();
    while settle_started.elapsed() < SETTLE_MAX && quiet_since.elapsed() < SETTLE_QUIET {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let next = scrape(&http, &stack.mxpay_url)
            .await
            .map_err(&metrics_err)?;
        if next.sum(EVENTS) != after.sum(EVENTS) || next.sum(REQUESTS) != after.sum(REQUESTS) {
            quiet_since = Instant::now();
        }
        after = next;
    }
    let cpu_after = Cpu::now(stack);

    let attempted = p.payers * p.payments;
    let undecrypted = pairs
        .iter()
        .map(|pair| {
            pair.payer.undecrypted_since(started, None)
                + pair.payee.undecrypted_since(started, None)
        })
        .sum();
    // The bot's own events are what a lost room key of mxpay's would show in; the rest are
    // the clients' messages to each other.
    let undecrypted_from_bot: usize = pairs
        .iter()
        .map(|pair| {
            pair.payer.undecrypted_since(started, Some(&bot))
                + pair.payee.undecrypted_since(started, Some(&bot))
        })
        .sum();
    let decrypted_late: usize = pairs
        .iter()
        .map(|pair| {
            pair.payer.decrypted_late_since(started) + pair.payee.decrypted_late_since(started)
        })
        .sum();
    let report = Report::new(&outcomes, attempted, started, elapsed, undecrypted);
    report.print(&before, &after, cpu_before, cpu_after, stack);
    println!(
        "of the events the clients could not decrypt on arrival: {undecrypted_from_bot} sent by \
         the bot; decrypted later (room key after the event): {decrypted_late}"
    );
    if report.lost + report.not_completed > 0 {
        return Err(E2eBenchError::Incomplete {
            lost: report.lost + report.not_completed,
            attempted,
            dir: dir.to_owned(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The figures.

struct Report {
    attempted: usize,
    completed: Vec<Timings>,
    not_completed: usize,
    lost: usize,
    /// One line per payment that did not complete (payer index, payment index, what).
    problems: Vec<String>,
    elapsed: Duration,
    /// From the start until the last completed payment's payee saw its receipt.
    elapsed_to_last_completed: Duration,
    /// Events the clients could not decrypt during the measured part.
    undecrypted: usize,
}

impl Report {
    fn new(
        outcomes: &[Vec<Outcome>],
        attempted: usize,
        started: Instant,
        elapsed: Duration,
        undecrypted: usize,
    ) -> Self {
        let mut report = Self {
            attempted,
            completed: Vec::new(),
            not_completed: 0,
            lost: 0,
            problems: Vec::new(),
            elapsed,
            elapsed_to_last_completed: Duration::ZERO,
            undecrypted,
        };
        for (i, payer) in outcomes.iter().enumerate() {
            for (k, outcome) in payer.iter().enumerate() {
                match outcome {
                    Outcome::Completed(timings) => {
                        report.elapsed_to_last_completed = report
                            .elapsed_to_last_completed
                            .max(timings.done_at - started);
                        report.completed.push(*timings);
                    }
                    Outcome::NotCompleted { status, reason } => {
                        report.not_completed += 1;
                        report.problems.push(format!(
                            "payer {i} payment {k}: receipt {status} ({reason})"
                        ));
                    }
                    Outcome::Lost { step, why } => {
                        report.lost += 1;
                        report
                            .problems
                            .push(format!("payer {i} payment {k}: lost at {step}: {why}"));
                    }
                }
            }
        }
        report
    }

    fn print(&self, before: &Scrape, after: &Scrape, cpu0: Cpu, cpu1: Cpu, stack: &Stack) {
        let seconds = self.elapsed.as_secs_f64();
        let attempted = self.attempted as f64;
        // Throughput up to the last completion: waiting out a lost payment's timeout is not
        // work, and would make every lost payment lower the rate of the others.
        let to_last = self.elapsed_to_last_completed.as_secs_f64();
        println!(
            "payments: {} of {} completed, {} refused, {} lost; last completed after {:.2} s: \
             {:.2} payments/s (the run ended after {:.2} s)",
            self.completed.len(),
            self.attempted,
            self.not_completed,
            self.lost,
            to_last,
            if to_last > 0.0 {
                self.completed.len() as f64 / to_last
            } else {
                0.0
            },
            seconds
        );
        println!(
            "events the clients could not decrypt on arrival: {}",
            self.undecrypted
        );
        for line in self.problems.iter().take(LOST_LISTED_MAX) {
            println!("  {line}");
        }
        if self.problems.len() > LOST_LISTED_MAX {
            println!("  ... and {} more", self.problems.len() - LOST_LISTED_MAX);
        }
        println!("latency of completed payments       p50       p95       max");
        for (i, name) in Timings::STEPS.iter().enumerate() {
            let stats = Stats::of(self.completed.iter().map(|t| t.steps()[i]).collect());
            println!(
                "  {name:<32} {:>7.3} s {:>7.3} s {:>7.3} s",
                stats.p50.as_secs_f64(),
                stats.p95.as_secs_f64(),
                stats.max.as_secs_f64()
            );
        }
        for (i, name) in Timings::MERCHANT_STEPS.iter().enumerate() {
            let samples: Vec<Duration> = self
                .completed
                .iter()
                .filter_map(|t| t.merchant_steps()[i])
                .collect();
            if samples.is_empty() {
                continue;
            }
            let stats = Stats::of(samples);
            println!(
                "  {name:<32} {:>7.3} s {:>7.3} s {:>7.3} s",
                stats.p50.as_secs_f64(),
                stats.p95.as_secs_f64(),
                stats.max.as_secs_f64()
            );
        }

        let delta = |name: &str| after.sum(name) - before.sum(name);
        let requests = delta(REQUESTS);
        println!(
            "homeserver requests per payment: {:.1} ({} in all, {} failed)",
            requests / attempted,
            requests,
            delta(REQUEST_ERRORS)
        );
        println!(
            "  by endpoint: {}",
            per_payment(before, after, REQUESTS, attempted, "endpoint")
        );
        let events = delta(EVENTS);
        println!(
            "events per payment (pushed to mxpay in {} transactions): {:.1} ({} in all)",
            delta(TRANSACTIONS),
            events / attempted,
            events
        );
        println!(
            "  by type: {}",
            per_payment(before, after, EVENTS, attempted, "event_type")
        );
        println!(
            "mxpay's transaction handler busy: {:.0}% of the run; parked undecryptable events \
             at the end: {}; payments by outcome: {}",
            100.0 * delta(HANDLER_SECONDS) / seconds,
            after.sum(PARKED),
            per_payment(before, after, PAYMENTS, 1.0, "outcome")
        );
        let mxpay = cpu1.mxpay - cpu0.mxpay;
        let synapse = cpu1.synapse - cpu0.synapse;
        println!(
            "CPU seconds: mxpay {mxpay:.2} ({:.3} per payment), Synapse {synapse:.2} ({:.3} per \
             payment), the benchmark's own clients {:.2}",
            mxpay / attempted,
            synapse / attempted,
            cpu1.bench - cpu0.bench
        );
        let mib = |pid| peak_rss_mib(pid).map_or("?".to_owned(), |m| format!("{m:.0} MiB"));
        println!(
            "peak RSS: mxpay {}, Synapse {}",
            mib(stack.mxpay.pid),
            mib(stack.synapse.pid)
        );
    }
}

/// `name{label="x"}` deltas divided by `per`, largest first: `x 7.0, y 2.5`.
fn per_payment(before: &Scrape, after: &Scrape, name: &str, per: f64, label: &str) -> String {
    let old = before.by_label(name);
    let mut rows: Vec<(String, f64)> = after
        .by_label(name)
        .into_iter()
        .map(|(labels, value)| {
            let delta = value - old.get(&labels).copied().unwrap_or(0.0);
            (label_value(&labels, label), delta / per)
        })
        .filter(|(_, delta)| *delta > 0.0)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    if rows.is_empty() {
        return "none".to_owned();
    }
    rows.iter()
        .map(|(what, value)| format!("{what} {value:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The value of `label` in a `{a="x",b="y"}` label set (all labels when it is not there).
fn label_value(labels: &str, label: &str) -> String {
    let inner = labels.trim_start_matches('{').trim_end_matches('}');
    let pairs: Vec<(&str, &str)> = inner
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect();
    match pairs.iter().find(|(k, _)| *k == label) {
        Some((_, v)) if pairs.len() == 1 => (*v).to_owned(),
        _ => pairs.iter().map(|(_, v)| *v).collect::<Vec<_>>().join("/"),
    }
}

struct Stats {
    p50: Duration,
    p95: Duration,
    max: Duration,
}

impl Stats {
    /// Nearest-rank percentiles; all zero for no samples.
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            if samples.is_empty() {
                return Duration::ZERO;
            }
            let rank = (q * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        Self {
            p50: at(0.50),
            p95: at(0.95),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_and_challenges_are_found_typed_or_carried_in_a_notice() {
        let bot = UserId::parse("@_mxpay:localhost").unwrap();
        let pay = EventId::parse("$pay").unwrap();
        let room = RoomId::parse("!room:localhost").unwrap();
        let typed_receipt = serde_json::json!({
            "type": "org.mxpay.receipt", "sender": "@_mxpay:localhost",
            "content": {"status": "completed", "m.relates_to": {"rel_type": "m.reference", "event_id": "$pay"}},
        });
        let carried_receipt = serde_json::json!({
            "type": "m.room.message", "sender": "@_mxpay:localhost",
            "content": {"msgtype": "m.notice", "body": "Paid",
                "m.relates_to": {"m.in_reply_to": {"event_id": "$pay"}},
                "org.mxpay.receipt": {"status": "completed"}},
        });
        assert!(is_receipt_of(&typed_receipt, &bot, &pay));
        assert!(is_receipt_of(&carried_receipt, &bot, &pay));
        let other = EventId::parse("$other").unwrap();
        assert!(!is_receipt_of(&carried_receipt, &bot, &other));
        let mut forged = carried_receipt.clone();
        forged["sender"] = "@mallory:localhost".into();
        assert!(!is_receipt_of(&forged, &bot, &pay));
        let challenge = serde_json::json!({
            "type": "m.room.message", "sender": "@_mxpay:localhost",
            "content": {"msgtype": "m.notice", "body": "Confirm",
                "org.mxpay.stepup.challenge": {"amount": "1.05", "room_id": "!room:localhost"}},
        });
        assert!(is_challenge_for(&challenge, &bot, "1.05", &room));
        assert!(!is_challenge_for(&challenge, &bot, "1.06", &room));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: u64| Duration::from_millis(v);
        let stats = Stats::of((1..=20).rev().map(ms).collect());
        assert_eq!(stats.p50, ms(10));
        assert_eq!(stats.p95, ms(19));
        assert_eq!(stats.max, ms(20));
        let one = Stats::of(vec![ms(7)]);
        assert_eq!((one.p50, one.p95, one.max), (ms(7), ms(7), ms(7)));
        assert_eq!(Stats::of(Vec::new()).max, Duration::ZERO);
    }

    #[test]
    fn metrics_are_summed_and_split_by_label() {
        let text = "# TYPE mxpay_events counter\n\
                    mxpay_events_total{event_type=\"m.room.encrypted\"} 12\n\
                    mxpay_events_total{event_type=\"m.room.member\"} 3\n\
                    mxpay_events_total_extra 100\n\
                    mxpay_payments_total{outcome=\"completed\",reason=\"none\"} 2\n\
                    # EOF\n";
        let scrape = Scrape::parse(text);
        assert_eq!(scrape.sum(EVENTS), 15.0);
        let empty = Scrape::default();
        assert_eq!(
            per_payment(&empty, &scrape, EVENTS, 3.0, "event_type"),
            "m.room.encrypted 4.0, m.room.member 1.0"
        );
        assert_eq!(
            per_payment(&empty, &scrape, PAYMENTS, 1.0, "outcome"),
            "completed/none 2.0"
        );
    }

    #[test]
    fn each_payment_of_a_payer_has_its_own_amount() {
        assert_eq!(amount_of(0), "1.00");
        assert_eq!(amount_of(7), "1.07");
        assert_eq!(amount_of(123), "2.23");
    }

    #[test]
    fn the_bench_config_is_a_valid_config() {
        let config = crate::config::Config::from_yaml(&bench_config("http://127.0.0.1:1", 2))
            .expect("bench config parses");
        assert!(config.payments.enabled);
        assert_eq!(config.appservice.listen.port(), 2);
    }
}
