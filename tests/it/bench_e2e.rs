//! `mxpay bench e2e`, smallest run: its own Synapse and mxpay, 2 payers x 1 payment, the
//! figures printed, exit 0 (every payment completed), its run directory removed. No timing is
//! asserted: this machine's speed is not what the test is about.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{repo_dir, run_dir};

/// The benchmark brings up Synapse (installing it on a first run) and four clients.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn bench_e2e_runs_two_payments_and_prints_the_figures() {
    let parent = run_dir().join("bench-e2e");
    std::fs::create_dir_all(&parent).expect("create the bench parent dir");
    let out_path = parent.with_extension("out");
    let out = std::fs::File::create(&out_path).expect("create the output file");
    // Under the guard: if this test dies, the benchmark gets SIGTERM and stops its servers.
    let mut child = Command::new("bash")
        .arg(repo_dir().join("scripts/synapse.sh"))
        .args(["guard", "--signal", "TERM"])
        .arg(env!("CARGO_BIN_EXE_mxpay"))
        .args(["bench", "e2e", "--payers", "2", "--payments", "1", "--dir"])
        .arg(&parent)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(out.try_clone().expect("clone the output file"))
        .stderr(out)
        .spawn()
        .expect("spawn mxpay bench e2e");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the benchmark") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // Closing the guard's stdin sends SIGTERM: the benchmark stops its servers.
            drop(child.stdin.take());
            let stop_deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < stop_deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let printed = std::fs::read_to_string(&out_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("mxpay bench e2e did not end within {RUN_TIMEOUT:?}; it printed:\n{printed}")
    });
    assert!(
        status.success(),
        "mxpay bench e2e failed ({status}); it printed:\n{printed}"
    );

    assert!(
        printed.contains("payments: 2 of 2 completed, 0 refused, 0 lost"),
        "{printed}"
    );
    for figure in [
        "payments/s",
        "!pay -> challenge",
        "PIN -> posted",
        "posted -> payee sees receipt",
        "PIN -> payee sees receipt",
        "!pay -> payee sees receipt",
        "mxpay's transaction handler busy",
        "CPU seconds: mxpay",
        "peak RSS: mxpay",
    ] {
        assert!(printed.contains(figure), "no {figure:?} in:\n{printed}");
    }
    // The counts come from mxpay's /metrics: a payment makes the bot send (a challenge, a
    // receipt) and Synapse push events, so neither can be zero.
    for prefix in [
        "homeserver requests per payment: ",
        "events per payment (pushed to mxpay in ",
    ] {
        let line = printed
            .lines()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{printed}"));
        let in_all: f64 = line
            .split('(')
            .next_back()
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line:?}"));
        assert!(in_all > 0.0, "{line}");
    }
    // A run that went well leaves no directory behind.
    let left: Vec<_> = std::fs::read_dir(&parent)
        .expect("read the bench parent dir")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
