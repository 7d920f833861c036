//! The integration-test harness: one real Synapse per test run, a pool of appservice slots
//! pre-registered with it, the real `mxpay` binary, and real matrix-sdk clients.
//!
//! Modelled on matrix-rust-sdk's `testing/matrix-sdk-integration-testing`: tests create named
//! users with random suffixes ([`user`]), so concurrent tests (cargo runs them on threads) and
//! tests that run in any order never share a user, a room or an appservice slot.
//!
//! - [`synapse`] starts Synapse the first time a test asks (installing it into `.venv/` with
//!   `scripts/synapse.sh` when needed) and keeps it for the rest of the run; the script stops
//!   it when this process exits, however it exits.
//! - [`Synapse::lease`] hands a test an appservice slot of its own (id, bot localpart, port,
//!   tokens, a fresh data dir); [`MxpayProcess`] runs `mxpay serve` on it.
//! - [`user`] and [`client`] give registered users and logged-in, syncing clients; the
//!   clients record every timeline event they see so tests can wait for one.
//!
//! Everything lives under `<target>/tmp/it/run-<time>-<pid>/`: Synapse's database and logs,
//! each slot's config, data dir and `mxpay.log`, each client's store.
#![allow(dead_code, unused_imports)] // Not every test module uses every helper.

mod client;
mod mxpay;
mod proxy;
mod synapse;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use client::{client, user, RoomOptions, SeenEvent, TestClient, TestUser};
pub use mxpay::{metric_value, MxpayOptions, MxpayProcess};
pub use proxy::CuttableProxy;
pub use synapse::{synapse, SlotConfig, SlotKind, SlotLease, SlotSpec, Synapse};

/// How long a test waits for something that should happen (an event, a process to answer)
/// before it fails. Generous: a slow CI machine must not fail a correct test. Override with
/// `MXPAY_IT_TIMEOUT_S`.
pub fn timeout() -> Duration {
    static TIMEOUT: OnceLock<Duration> = OnceLock::new();
    *TIMEOUT.get_or_init(|| {
        let secs = std::env::var("MXPAY_IT_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        Duration::from_secs(secs)
    })
}

/// The repository root (where `scripts/` and `.venv/` are).
pub fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// This test run's directory, created on first use. Directories of earlier runs whose process
/// is gone are removed, except the two newest, so their logs can still be read.
pub fn run_dir() -> &'static Path {
    static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();
    RUN_DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("it");
        std::fs::create_dir_all(&root).expect("create the test run root");
        prune_old_runs(&root);
        let started_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let dir = root.join(format!("run-{started_s}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test run dir");
        dir
    })
}

fn prune_old_runs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut runs: Vec<(u64, u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let mut parts = name.strip_prefix("run-")?.split('-');
            let started_s = parts.next()?.parse().ok()?;
            let pid = parts.next()?.parse().ok()?;
            Some((started_s, pid, e.path()))
        })
        .collect();
    runs.sort();
    let keep_from = runs.len().saturating_sub(2);
    for (_, pid, path) in &runs[..keep_from] {
        // A run whose process still lives (a concurrent `cargo test`) keeps its directory.
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// Writes a secret file (pepper, key) owner-only (0600), as mxpay requires of its secrets.
pub fn write_secret(path: &Path, contents: impl AsRef<[u8]>) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(contents.as_ref())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A random lower-case suffix for names that must not collide across tests and runs.
pub fn random_suffix(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// A free TCP port on 127.0.0.1 for something that will listen on it later, never the same
/// twice in this process.
///
/// It is drawn at random from below the kernel's ephemeral range: ports from that range are
/// also what outgoing connections get, and a test client's connection could take a slot's
/// port between this call and mxpay's bind. Checked free by binding, then released; another
/// process could take it in between, which on a test machine does not happen in practice.
pub fn free_port() -> u16 {
    use rand::Rng;
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = if ephemeral_low > 12_000 {
            rng.gen_range(10_000..ephemeral_low)
        } else {
            0
        };
        let Ok(port) = std::net::TcpListener::bind(("127.0.0.1", port))
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
        else {
            continue;
        };
        if HANDED_OUT.lock().expect("port set lock").insert(port) {
            return port;
        }
    }
    panic!("found no free port in 1000 tries");
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout()` saying
/// what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {:?} waiting for {what}", timeout());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
