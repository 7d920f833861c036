//! `mxpay dev`, the newcomer's first command, end to end: it brings up its own Synapse and
//! mxpay, the demo users can log in, Ctrl-C (SIGTERM here) stops everything, and a second
//! run reuses the setup.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::{self, free_port, log_tail, repo_dir, run_dir};

/// `mxpay dev` under `scripts/synapse.sh guard --signal TERM`, so that it shuts its Synapse
/// down even if this test process dies.
struct Dev {
    child: Child,
    stdin: Option<ChildStdin>,
    /// What it printed on stdout so far.
    printed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

const UP_TIMEOUT: Duration = Duration::from_secs(300);

fn start_dev(dir: &Path, homeserver_port: u16, appservice_port: u16) -> Dev {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .expect("open the dev log");
    let mut child = Command::new("bash")
        .arg(repo_dir().join("scripts/synapse.sh"))
        .args(["guard", "--signal", "TERM"])
        .arg(env!("CARGO_BIN_EXE_mxpay"))
        .arg("dev")
        .arg("--dir")
        .arg(dir)
        .arg("--homeserver-port")
        .arg(homeserver_port.to_string())
        .arg("--appservice-port")
        .arg(appservice_port.to_string())
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn mxpay dev");
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = printed.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line.clone());
            // The welcome ends with where the setup lives.
            if line.contains("Ctrl-C stops everything") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(UP_TIMEOUT).is_err() {
        let mut dev = Dev {
            child,
            stdin,
            printed,
        };
        dev.stop();
        panic!(
            "mxpay dev did not come up; its log:\n{}",
            log_tail(&dir.with_extension("log"), 40)
        );
    }
    Dev {
        child,
        stdin,
        printed,
    }
}

impl Dev {
    /// The printed line containing `part`.
    fn printed_line(&self, part: &str) -> String {
        let printed = self.printed.lock().unwrap();
        printed
            .iter()
            .find(|line| line.contains(part))
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "mxpay dev printed no line with {part:?}:\n{}",
                    printed.join("\n")
                )
            })
    }

    /// The admin token it printed (`export MXPAY_ADMIN_TOKEN=...`).
    fn admin_token(&self) -> String {
        let line = self.printed_line("export MXPAY_ADMIN_TOKEN=");
        line.split('=').nth(1).expect("a token").trim().to_owned()
    }

    /// Closes the guard's stdin (SIGTERM to `mxpay dev`) and returns whether it exited 0.
    fn stop(&mut self) -> bool {
        drop(self.stdin.take());
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().expect("poll mxpay dev") {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            self.stop();
        }
    }
}

async fn login(homeserver_port: u16, localpart: &str, password: &str) -> u16 {
    reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{homeserver_port}/_matrix/client/v3/login"
        ))
        .json(&json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": localpart },
            "password": password,
        }))
        .send()
        .await
        .expect("POST login")
        .status()
        .as_u16()
}

/// Runs `mxpay demo --dir dir` (bounded); returns what it printed; panics unless it exits 0.
fn run_demo(dir: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxpay"))
        .arg("demo")
        .arg("--dir")
        .arg(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mxpay demo");
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = child.try_wait().expect("poll mxpay demo") {
            let output = child.wait_with_output().expect("demo output");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(status.success(), "mxpay demo failed ({status}):\n{text}");
            return text;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mxpay demo did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The wallet of `localpart` as the admin API shows it (JSON text).
async fn wallet(appservice_port: u16, token: &str, localpart: &str) -> String {
    let response = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{appservice_port}/_mxpay/admin/v1/users/@{localpart}:localhost/accounts"
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET accounts");
    assert_eq!(response.status().as_u16(), 200);
    response.text().await.expect("accounts JSON")
}

fn dev_room(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("dev.json")).expect("read dev.json");
    let state: serde_json::Value = serde_json::from_str(&text).expect("dev.json is JSON");
    state["room_id"]
        .as_str()
        .expect("the demo room in dev.json")
        .to_owned()
}

fn demo_users(dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dir.join("dev.json")).expect("read dev.json");
    let state: serde_json::Value = serde_json::from_str(&text).expect("dev.json is JSON");
    serde_json::from_value(state["users"].clone()).expect("users in dev.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mxpay_dev_comes_up_lets_demo_users_log_in_and_stops_on_signal() {
    let dir = run_dir().join(format!("dev-{}", support::random_suffix(6)));
    let (homeserver_port, appservice_port) = (free_port(), free_port());

    let mut dev = start_dev(&dir, homeserver_port, appservice_port);
    let ready = reqwest::get(format!("http://127.0.0.1:{appservice_port}/ready"))
        .await
        .expect("GET /ready of the dev mxpay");
    assert_eq!(
        ready.status().as_u16(),
        200,
        "the dev mxpay passed its start-up checks"
    );
    let users = demo_users(&dir);
    let names: Vec<&str> = users.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    // Funded through the real top-up path, readable with the printed admin token; the first
    // payment to try and the demo room are printed.
    for name in names {
        assert!(
            wallet(appservice_port, &dev.admin_token(), name)
                .await
                .contains("\"100.00\""),
            "{name} has 100.00 EUR"
        );
    }
    let pay_line = dev.printed_line("!pay @bob:localhost 5.00 EUR");
    let room_line = dev.printed_line("\"mxpay demo\"");
    let room_id = dev_room(&dir);
    assert!(room_line.contains(&room_id), "{room_line}");
    assert!(!pay_line.is_empty());
    for (name, password) in &users {
        assert_eq!(
            login(homeserver_port, name, password).await,
            200,
            "{name} logs in"
        );
    }
    assert_eq!(login(homeserver_port, "alice", "wrong").await, 403);
    let synapse_pid = std::fs::read_to_string(dir.join("synapse/synapse.pid"))
        .expect("Synapse's PID is recorded")
        .trim()
        .to_owned();
    assert!(
        dev.stop(),
        "mxpay dev exits 0 on SIGTERM; log:\n{}",
        log_tail(&dir.with_extension("log"), 30)
    );
    assert!(
        !dir.join("synapse/synapse.pid").exists(),
        "Synapse was stopped"
    );
    assert!(
        !Path::new(&format!("/proc/{synapse_pid}")).exists(),
        "Synapse's process is gone"
    );

    // A second run reuses the setup: same users, same passwords, same room, and funds nobody
    // twice.
    let mut dev = start_dev(&dir, free_port(), free_port());
    assert_eq!(demo_users(&dir), users);
    assert_eq!(dev_room(&dir), room_id);
    let alice = wallet(appservice_port, &dev.admin_token(), "alice").await;
    assert!(
        alice.contains("\"100.00\"") && !alice.contains("200.00"),
        "{alice}"
    );

    // `mxpay demo` against it: two real encrypted clients make a first payment.
    let demo = run_demo(&dir);
    assert!(
        demo.contains("payment completed") && demo.contains("PIN -> the payee sees the receipt"),
        "{demo}"
    );
    let (name, password) = &users[0];
    assert_eq!(
        login(homeserver_port, name, password).await,
        200,
        "same port, same password"
    );
    assert!(dev.stop());
}
