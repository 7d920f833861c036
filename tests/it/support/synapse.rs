//! One Synapse per test run, with a pool of appservice slots registered at its start.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::{free_port, log_tail, repo_dir, run_dir};

/// Ordinary slots: tests that run an mxpay lease one each. Cargo runs as many tests at once as
/// the machine has cores, so eight is plenty; a test that finds none free waits for one.
const NORMAL_SLOTS: usize = 8;

/// The pool, in index order: a slot's index is part of its id, bot and directory names.
const POOL: [(SlotKind, usize); 3] = [
    (SlotKind::Normal, NORMAL_SLOTS),
    (SlotKind::UnreachableUrl, 1),
    (SlotKind::Msc4190, 2),
];

/// How long Synapse may take to install (cold: about 30 s) and start (about 3 s).
const SYNAPSE_READY_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a test waits for a free slot of the kind it wants.
const LEASE_TIMEOUT: Duration = Duration::from_secs(900);

/// The server name of the test homeserver.
pub const SERVER_NAME: &str = "localhost";

/// What a slot's registration, as Synapse knows it, is like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// Registration and config agree: mxpay on this slot works.
    Normal,
    /// The registration Synapse loaded sends transactions to a port where nothing listens,
    /// while mxpay listens elsewhere: mxpay's URL is unreachable from the homeserver.
    UnreachableUrl,
    /// Like `Normal`, with `appservice.msc4190: true` (registration `io.element.msc4190`):
    /// Synapse refuses appservice login, the bot's device is made with `PUT /devices/{id}`.
    Msc4190,
}

/// One appservice slot, fixed for the whole run (its registration is loaded by Synapse).
pub struct SlotSpec {
    /// Index in the pool, part of every name below.
    pub index: usize,
    /// What the slot is for.
    pub kind: SlotKind,
    /// Appservice id (`mxpay-test-N`).
    pub id: String,
    /// The bot's localpart (`_mxpay_tN`).
    pub bot_localpart: String,
    /// Where mxpay listens on this slot.
    pub listen_port: u16,
    /// The URL the registration gives Synapse (differs from `listen_port` for
    /// [`SlotKind::UnreachableUrl`]).
    pub url: String,
    /// The slot's directory (registration, one sub-directory per lease).
    pub dir: PathBuf,
    /// The registration file Synapse loaded.
    pub registration: PathBuf,
    /// Token mxpay uses towards the homeserver.
    pub as_token: String,
    /// Token the homeserver uses towards mxpay.
    pub hs_token: String,
}

impl fmt::Debug for SlotSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotSpec")
            .field("index", &self.index)
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("listen_port", &self.listen_port)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl SlotSpec {
    /// The bot's user ID.
    pub fn bot_user_id(&self) -> String {
        format!("@{}:{SERVER_NAME}", self.bot_localpart)
    }

    /// mxpay's own base URL (where it listens, whatever the registration says).
    pub fn listen_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listen_port)
    }
}

/// The test run's homeserver.
pub struct Synapse {
    /// Client-server API base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// Synapse's directory (config, SQLite database, `homeserver.log`).
    pub dir: PathBuf,
    registration_shared_secret: String,
    slots: Vec<SlotSpec>,
    in_use: Mutex<Vec<bool>>,
    lease_counter: AtomicU64,
    /// The script's standard input: it stops Synapse when this closes, which happens when
    /// this process exits (statics are never dropped; the OS closes the pipe).
    _watchdog: Mutex<(Child, ChildStdin)>,
}

impl fmt::Debug for Synapse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Synapse")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The run's Synapse, started on first use. Blocks the calling thread while it starts (each
/// test has its own runtime, so nothing else waits on that thread); concurrent callers wait
/// for the same start. If the start failed, every caller panics with the same reason.
pub fn synapse() -> &'static Synapse {
    static SYNAPSE: OnceLock<Result<Synapse, String>> = OnceLock::new();
    match SYNAPSE.get_or_init(start_synapse) {
        Ok(synapse) => synapse,
        Err(reason) => panic!("the test Synapse is not available: {reason}"),
    }
}

impl Synapse {
    /// The event `event_id` as the homeserver stored it, read from its database: the original
    /// JSON, which Synapse keeps for days after a redaction (`redaction_retention_period`).
    /// What a hostile homeserver admin holds; `None` while the event is not stored yet.
    pub fn stored_event_json(&self, event_id: &str) -> Option<serde_json::Value> {
        const QUERY: &str = "import sqlite3, sys\n\
            db = sqlite3.connect(sys.argv[1], timeout=30)\n\
            row = db.execute('SELECT json FROM event_json WHERE event_id = ?', (sys.argv[2],)).fetchone()\n\
            print(row[0] if row else '')";
        let output = Command::new("python3")
            .arg("-c")
            .arg(QUERY)
            .arg(self.dir.join("homeserver.db"))
            .arg(event_id)
            .output()
            .expect("run python3 to read Synapse's database");
        assert!(
            output.status.success(),
            "reading Synapse's database: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).expect("UTF-8 JSON");
        let text = text.trim();
        (!text.is_empty()).then(|| serde_json::from_str(text).expect("stored event JSON"))
    }
}

fn start_synapse() -> Result<Synapse, String> {
    let dir = run_dir().join("synapse");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let port = free_port();
    let homeserver_url = format!("http://127.0.0.1:{port}");

    let mut slots = Vec::new();
    for (kind, count) in POOL {
        for _ in 0..count {
            slots.push(provision_slot(slots.len(), kind, &homeserver_url)?);
        }
    }

    let script = repo_dir().join("scripts/synapse.sh");
    let stderr_path = dir.join("synapse.sh.err");
    let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
    let mut command = Command::new("bash");
    command
        .arg(&script)
        .arg("run")
        .arg(&dir)
        .arg("--port")
        .arg(port.to_string());
    for slot in &slots {
        command.arg("--registration").arg(&slot.registration);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");

    // The script bounds its own waits; this bound is for a script that hangs anyway.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(SYNAPSE_READY_TIMEOUT).unwrap_or_default();
    if !ready.starts_with("ready ") {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "scripts/synapse.sh run did not report ready; its stderr ({}):\n{}\n\
             Synapse's log ({}):\n{}",
            stderr_path.display(),
            log_tail(&stderr_path, 30),
            dir.join("homeserver.log").display(),
            log_tail(&dir.join("homeserver.log"), 30),
        ));
    }

    let registration_shared_secret = read_shared_secret(&dir.join("homeserver.yaml"))?;
    let in_use = Mutex::new(vec![false; slots.len()]);
    Ok(Synapse {
        url: homeserver_url,
        dir,
        registration_shared_secret,
        slots,
        in_use,
        lease_counter: AtomicU64::new(0),
        _watchdog: Mutex::new((child, stdin)),
    })
}

fn read_shared_secret(config: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(config).map_err(|e| e.to_string())?;
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())?;
    yaml["registration_shared_secret"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "homeserver.yaml has no registration_shared_secret".to_owned())
}

/// Writes a slot's config and has the real binary generate its registration.
fn provision_slot(index: usize, kind: SlotKind, homeserver_url: &str) -> Result<SlotSpec, String> {
    let dir = run_dir().join(format!("slot-{index}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let listen_port = free_port();
    let url = match kind {
        SlotKind::Normal | SlotKind::Msc4190 => format!("http://127.0.0.1:{listen_port}"),
        // A port that was free a moment ago and that nothing of ours will listen on.
        SlotKind::UnreachableUrl => format!("http://127.0.0.1:{}", free_port()),
    };
    let config = SlotConfig {
        homeserver_url: homeserver_url.to_owned(),
        server_name: SERVER_NAME.to_owned(),
        registration: dir.join("registration.yaml"),
        id: format!("mxpay-test-{index}"),
        bot_localpart: format!("_mxpay_t{index}"),
        listen: format!("127.0.0.1:{listen_port}"),
        url: url.clone(),
        data_dir: dir.join("unused-data"),
        msc4190: kind == SlotKind::Msc4190,
        log_level: "info".to_owned(),
        extra_yaml: String::new(),
    };
    let config_path = dir.join("generate-config.yaml");
    std::fs::write(&config_path, config.to_yaml()).map_err(|e| e.to_string())?;
    let output = Command::new(env!("CARGO_BIN_EXE_mxpay"))
        .arg("generate-registration")
        .arg("-c")
        .arg(&config_path)
        .arg("-o")
        .arg(&config.registration)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run mxpay generate-registration: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "mxpay generate-registration for slot {index} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let text = std::fs::read_to_string(&config.registration).map_err(|e| e.to_string())?;
    let registration: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| format!("registration of slot {index}: {e}"))?;
    let token = |key: &str| {
        registration[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("registration of slot {index} has no {key}"))
    };
    Ok(SlotSpec {
        index,
        kind,
        id: config.id,
        bot_localpart: config.bot_localpart,
        listen_port,
        url,
        dir,
        registration: config.registration,
        as_token: token("as_token")?,
        hs_token: token("hs_token")?,
    })
}

impl Synapse {
    /// The shared secret for `/_synapse/admin/v1/register`.
    pub(crate) fn registration_shared_secret(&self) -> &str {
        &self.registration_shared_secret
    }

    /// Leases a slot of `kind` for the calling test, waiting (bounded) while all are taken.
    /// The lease gets a fresh directory `slot-N/<counter>-<label>/` with a config file and an
    /// empty data dir, so nothing a previous test left behind leaks in (Synapse may still
    /// deliver that test's leftover transactions: assert on your own rooms and events).
    pub async fn lease(&'static self, kind: SlotKind, label: &str) -> SlotLease {
        let deadline = tokio::time::Instant::now() + LEASE_TIMEOUT;
        let index = loop {
            if let Some(index) = self.try_take(kind) {
                break index;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {kind:?} appservice slot became free within {LEASE_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let spec = &self.slots[index];
        let counter = self.lease_counter.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let dir = spec.dir.join(format!("{counter}-{label}"));
        std::fs::create_dir_all(&dir).expect("create the lease dir");
        let lease = SlotLease {
            synapse: self,
            spec,
            config: SlotConfig {
                homeserver_url: self.url.clone(),
                server_name: SERVER_NAME.to_owned(),
                registration: spec.registration.clone(),
                id: spec.id.clone(),
                bot_localpart: spec.bot_localpart.clone(),
                listen: format!("127.0.0.1:{}", spec.listen_port),
                url: spec.url.clone(),
                data_dir: dir.join("data"),
                msc4190: spec.kind == SlotKind::Msc4190,
                log_level: "info,mxpay=debug".to_owned(),
                extra_yaml: String::new(),
            },
            dir,
        };
        lease.write_config();
        lease
    }

    fn try_take(&self, kind: SlotKind) -> Option<usize> {
        let mut in_use = self.in_use.lock().expect("slot table lock");
        let index = self
            .slots
            .iter()
            .position(|slot| slot.kind == kind && !in_use[slot.index])?;
        in_use[index] = true;
        Some(index)
    }
}

/// A slot leased by one test; returned to the pool on drop.
#[derive(Debug)]
pub struct SlotLease {
    synapse: &'static Synapse,
    /// The slot.
    pub spec: &'static SlotSpec,
    /// The config mxpay runs with; change it and call [`SlotLease::write_config`].
    pub config: SlotConfig,
    /// This lease's directory (config, data dir, `mxpay.log`).
    pub dir: PathBuf,
}

impl SlotLease {
    /// Where the config file is.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    /// Where mxpay's output goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("mxpay.log")
    }

    /// Writes `self.config` to [`SlotLease::config_path`].
    pub fn write_config(&self) {
        std::fs::write(self.config_path(), self.config.to_yaml()).expect("write the slot config");
    }

    /// Writes a copy of the slot's registration changed by `edit` into the lease dir and
    /// returns its path (for misconfiguration tests: point `config.registration` at it).
    pub fn registration_variant(
        &self,
        name: &str,
        edit: impl FnOnce(&mut serde_yaml_ng::Value),
    ) -> PathBuf {
        let text = std::fs::read_to_string(&self.spec.registration).expect("read registration");
        let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("parse it");
        edit(&mut yaml);
        let path = self.dir.join(format!("registration-{name}.yaml"));
        std::fs::write(&path, serde_yaml_ng::to_string(&yaml).expect("serialise"))
            .expect("write registration variant");
        path
    }

    /// The homeserver this slot is registered with.
    pub fn synapse(&self) -> &'static Synapse {
        self.synapse
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Ok(mut in_use) = self.synapse.in_use.lock() {
            in_use[self.spec.index] = false;
        }
    }
}

/// An mxpay config (the fields the contract fixes), written as YAML.
#[derive(Debug, Clone)]
pub struct SlotConfig {
    /// `homeserver.url`
    pub homeserver_url: String,
    /// `homeserver.server_name`
    pub server_name: String,
    /// `appservice.registration`
    pub registration: PathBuf,
    /// `appservice.id`
    pub id: String,
    /// `appservice.bot_localpart`
    pub bot_localpart: String,
    /// `appservice.listen`
    pub listen: String,
    /// `appservice.url`
    pub url: String,
    /// `data_dir`
    pub data_dir: PathBuf,
    /// `appservice.msc4190`
    pub msc4190: bool,
    /// `logging.level`
    pub log_level: String,
    /// Further top-level YAML appended verbatim (e.g. a `ledger:` section).
    pub extra_yaml: String,
}

impl SlotConfig {
    /// The config file's text.
    pub fn to_yaml(&self) -> String {
        let value = serde_json::json!({
            "homeserver": {
                "url": self.homeserver_url,
                "server_name": self.server_name,
            },
            "appservice": {
                "registration": self.registration,
                "id": self.id,
                "bot_localpart": self.bot_localpart,
                "listen": self.listen,
                "url": self.url,
                "msc4190": self.msc4190,
            },
            "data_dir": self.data_dir,
            "logging": { "level": self.log_level, "format": "pretty" },
        });
        let mut text = serde_yaml_ng::to_string(&value).expect("serialise the config");
        if !self.extra_yaml.is_empty() {
            text.push_str(&self.extra_yaml);
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        text
    }
}
