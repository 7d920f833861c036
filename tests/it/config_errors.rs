//! `mxpay serve -c bad.yaml`: a refused config stops start-up with one sentence naming the key,
//! and a non-zero exit status. Runs the real binary; no homeserver is needed because the config
//! is refused before anything is opened.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `mxpay <args> <config>` without the environment's log level or pepper.
fn mxpay(args: &[&str], config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mxpay"));
    command
        .args(args)
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("MXPAY_PIN_PEPPER")
        .stdin(Stdio::null());
    command
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs `mxpay serve -c <file with yaml>` and returns (success, stderr). Bounded: a binary that
/// did not stop within 60 s is killed and the test fails.
fn serve_with(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    serve_in(dir.path(), yaml)
}

/// [`serve_with`] with the config written as `bad.yaml` in `dir` (next to files it names).
fn serve_in(dir: &Path, yaml: &str) -> (bool, String) {
    let path = dir.join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = mxpay(&["serve", "-c"], &path)
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

/// As ssh with a private key: a PIN pepper file group or others can read stops start-up with
/// one sentence naming the file and the fix, before anything is opened.
#[test]
fn a_pepper_file_others_can_read_stops_serve_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let pepper = dir.path().join("pepper");
    std::fs::write(&pepper, "0123456789abcdef0123456789abcdef0123456789\n").unwrap();
    std::fs::set_permissions(&pepper, std::fs::Permissions::from_mode(0o644)).unwrap();
    let yaml = format!(
        "data_dir: ./data\npayments:\n  enabled: true\n  pepper_file: {}\n",
        pepper.display()
    );
    let (ok, stderr) = serve_in(dir.path(), &yaml);
    assert!(!ok, "mxpay serve accepted a pepper file others can read");
    assert!(
        stderr.contains("payments.pepper_file")
            && stderr.contains(&format!("chmod 600 {}", pepper.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("0123456789abcdef"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "refused before data_dir was touched"
    );
}

/// `data_dir` is narrowed to 0700 at start, and every file and directory `mxpay serve` creates
/// in it (inbox, ledger, audit log) is owner-only; so is the registration `-g` writes. Runs
/// serve against a homeserver that is not there: the data directory is set up before the
/// homeserver is asked.
#[test]
fn serve_keeps_data_dir_0700_and_its_files_0600() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pepper = dir.path().join("pepper");
    std::fs::write(&pepper, "0123456789abcdef0123456789abcdef0123456789\n").unwrap();
    std::fs::set_permissions(&pepper, std::fs::Permissions::from_mode(0o600)).unwrap();
    let admin_key = dir.path().join("admin.key");
    std::fs::write(&admin_key, "admin-key-0123456789abcdef0123456789\n").unwrap();
    std::fs::set_permissions(&admin_key, std::fs::Permissions::from_mode(0o400)).unwrap();
    let listen_port = crate::support::free_port();
    let nobody_port = crate::support::free_port();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "homeserver: {{url: 'http://127.0.0.1:{nobody_port}'}}\n\
             appservice: {{listen: '127.0.0.1:{listen_port}', url: 'http://127.0.0.1:{listen_port}'}}\n\
             data_dir: ./data\n\
             payments: {{enabled: true, pepper_file: ./pepper}}\n\
             admin: {{token: {{algorithm: HS256, secret: {{file: ./admin.key}}}}}}\n"
        ),
    )
    .unwrap();
    let written = mxpay(&["generate-registration", "-c"], &config)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(written.success());
    assert_eq!(mode_of(&dir.path().join("appservice.yaml")), 0o600);

    let mut child = mxpay(&["serve", "-c"], &config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mxpay binary starts");
    // It stops by itself when it finds no homeserver; listening means data_dir is set up too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none()
        && std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err()
    {
        assert!(
            Instant::now() < deadline,
            "mxpay serve neither listened nor stopped in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();

    assert_eq!(mode_of(&data), 0o700, "data_dir is narrowed to 0700");
    let mut seen = 0;
    let mut stack = vec![data.clone()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let path = entry.unwrap().path();
            let mode = mode_of(&path);
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:04o}", path.display());
            seen += 1;
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    for part in ["inbox", "ledger", "audit.jsonl"] {
        assert!(
            std::fs::read_dir(&data).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(part)),
            "no {part} in data_dir: the check looked at too little"
        );
    }
    assert!(seen > 5, "only {seen} entries in data_dir");
}
