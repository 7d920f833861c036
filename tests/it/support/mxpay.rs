//! The real `mxpay serve` as a child process on a leased slot.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::{log_tail, repo_dir, timeout, SlotLease};

/// How a test wants mxpay run.
#[derive(Debug, Clone, Default)]
pub struct MxpayOptions {
    /// Extra environment variables (e.g. test-only fault injection switches).
    pub env: Vec<(String, String)>,
    /// Extra arguments after `serve -c <config>` (e.g. `--log-format json`).
    pub serve_args: Vec<String>,
}

/// A running (or exited) `mxpay serve -c <slot config>`.
///
/// It runs under `scripts/synapse.sh guard`, which SIGKILLs it when our end of its standard
/// input closes: on [`MxpayProcess::kill`], on drop, and when this test process dies.
#[derive(Debug)]
pub struct MxpayProcess {
    config_path: PathBuf,
    log_path: PathBuf,
    /// mxpay's base URL (where it listens).
    pub url: String,
    options: MxpayOptions,
    child: Option<(Child, Option<ChildStdin>)>,
    starts: u32,
}

impl MxpayProcess {
    /// Starts mxpay on `slot` and waits until it is ready (`/ready` answers 200: it listens,
    /// its start-up checks and ping passed and its worker runs); panics (with the log's tail)
    /// if it exits first or is not ready within `timeout()`.
    pub async fn start(slot: &SlotLease) -> Self {
        Self::start_with(slot, MxpayOptions::default()).await
    }

    /// [`MxpayProcess::start`] with options.
    pub async fn start_with(slot: &SlotLease, options: MxpayOptions) -> Self {
        let mut process = Self::spawn_with(slot, options);
        process.wait_ready().await;
        process
    }

    /// Spawns mxpay without waiting for it (for tests of start-up failures).
    pub fn spawn_with(slot: &SlotLease, options: MxpayOptions) -> Self {
        let mut process = Self {
            config_path: slot.config_path(),
            log_path: slot.log_path(),
            url: slot.spec.listen_url(),
            options,
            child: None,
            starts: 0,
        };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "mxpay is already running");
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open mxpay.log");
        writeln!(log, "==== mxpay start #{} ====", self.starts).expect("write mxpay.log");
        let log_err = log.try_clone().expect("clone the log handle");
        let mut command = Command::new("bash");
        command
            .arg(repo_dir().join("scripts/synapse.sh"))
            .arg("guard")
            .arg(env!("CARGO_BIN_EXE_mxpay"))
            .arg("serve")
            .arg("-c")
            .arg(&self.config_path)
            .args(&self.options.serve_args)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log_err)
            // Plain text in mxpay.log: readable, and what tests search for.
            .env("NO_COLOR", "1");
        for (key, value) in &self.options.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn mxpay");
        let stdin = child.stdin.take();
        self.child = Some((child, stdin));
    }

    /// Polls `/ready` until it answers 200. (`/health` answers as soon as mxpay listens,
    /// before its start-up checks: too early for a test.)
    pub async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + timeout();
        loop {
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "mxpay exited ({status}) before it was ready; {}:\n{}",
                    self.log_path.display(),
                    log_tail(&self.log_path, 40)
                );
            }
            let health = http
                .get(format!("{}/ready", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if matches!(&health, Ok(response) if response.status().is_success()) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "mxpay was not ready within {:?}; {}:\n{}",
                    timeout(),
                    self.log_path.display(),
                    log_tail(&self.log_path, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status if mxpay has exited (reaps it).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let (child, _) = self.child.as_mut()?;
        let status = child.try_wait().expect("poll mxpay")?;
        self.child = None;
        Some(status)
    }

    /// Waits (bounded) for mxpay to exit by itself; panics if it is still running.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let what = format!("mxpay to exit (log: {})", self.log_path.display());
        super::eventually(&what, || {
            let status = self.try_exit_status();
            async move { status }
        })
        .await
    }

    /// SIGKILLs mxpay (no chance to flush or say goodbye) and reaps it.
    pub async fn kill(&mut self) {
        let Some((mut child, stdin)) = self.child.take() else {
            return;
        };
        // Closing the guard's standard input makes it SIGKILL mxpay and exit.
        drop(stdin);
        let deadline = tokio::time::Instant::now() + timeout();
        loop {
            if child.try_wait().expect("poll mxpay").is_some() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mxpay's guard did not exit within {:?}", timeout());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills mxpay and starts it again on the same config and data dir.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts mxpay again after [`MxpayProcess::kill`] or an exit.
    pub async fn start_again(&mut self) {
        let _ = self.try_exit_status();
        self.spawn();
        self.wait_ready().await;
    }

    /// Everything mxpay wrote so far (all starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Where mxpay's output goes.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    /// mxpay's Prometheus text.
    pub async fn metrics(&self) -> String {
        let response = reqwest::Client::new()
            .get(format!("{}/metrics", self.url))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("GET /metrics");
        assert!(
            response.status().is_success(),
            "GET /metrics: {}",
            response.status()
        );
        response.text().await.expect("read /metrics")
    }

    /// PUTs a transaction straight to mxpay, as the homeserver would; `hs_token` `None` sends
    /// no `Authorization` header. Returns the status and the JSON body (`Null` if none).
    pub async fn put_transaction(
        &self,
        txn_id: &str,
        body: &serde_json::Value,
        hs_token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new()
            .put(format!("{}/_matrix/app/v1/transactions/{txn_id}", self.url))
            .timeout(Duration::from_secs(30))
            .json(body);
        if let Some(token) = hs_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("PUT transaction");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }
}

impl Drop for MxpayProcess {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.child.take() {
            drop(stdin);
            // Bounded: the guard exits as soon as its SIGKILL lands.
            for _ in 0..200 {
                if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of a Prometheus sample: `name` is the series as printed, with labels if any
/// (e.g. `mxpay_transactions_total` or `foo{kind="bar"}`); sums nothing, parses one line.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
