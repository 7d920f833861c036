//! `mxpay serve -c bad.yaml`: a refused config stops start-up with one sentence naming the key,
//! and a non-zero exit status. Runs the real binary; no homeserver is needed because the config
//! is refused before anything is opened.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `mxpay serve -c <file with yaml>` and returns (success, stderr). Bounded: a binary that
/// did not stop within 60 s is killed and the test fails.
fn serve_with(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxpay"))
        .args(["serve", "-c"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .env_remove("MXPAY_PIN_PEPPER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mxpay binary starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mxpay serve with a bad config did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_stops_serve_naming_section_and_key() {
    let (ok, stderr) = serve_with("appservice:\n  lisen: 0.0.0.0:29330\n");
    assert!(!ok, "mxpay serve accepted an unknown key");
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("appservice: unknown field `lisen`"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
}

#[test]
fn contradicting_limits_stop_serve_naming_the_key() {
    let (ok, stderr) = serve_with(
        "ledger:\n  currencies:\n    - { code: EUR, exponent: 2, max_transfer: \"500.00\", \
         max_per_24h: \"100.00\" }\n",
    );
    assert!(!ok, "mxpay serve accepted max_transfer above max_per_24h");
    assert!(
        stderr.contains("config key `ledger.currencies[0].max_transfer`")
            && stderr.contains("above max_per_24h"),
        "{stderr}"
    );
}
