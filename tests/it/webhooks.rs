//! Webhooks to merchants in the real binary: `mxpay serve` opens the webhook outbox and hands
//! it to the admin API, and `mxpay admin webhooks list|replay` talk to it. (Delivery itself is
//! tested in-process against local receivers: `cargo test --lib webhooks`.)

use mxpay::admin::token::Scope;
use serde_json::Value;

use crate::support::{self, MxpayProcess, SlotKind};

/// `mxpay admin -c <config> <args>` with `token`: (success, stdout, stderr).
async fn admin(config: &str, args: &[&str], token: &str) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxpay"));
    command
        .arg("admin")
        .arg("-c")
        .arg(config)
        .args(args)
        .env("MXPAY_ADMIN_TOKEN", token)
        .kill_on_drop(true);
    let output = tokio::time::timeout(support::timeout(), command.output())
        .await
        .unwrap_or_else(|_| panic!("mxpay admin {args:?} did not finish"))
        .expect("run mxpay admin");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn serve_runs_the_webhook_outbox_and_the_cli_lists_and_replays() {
    let mut lease = support::synapse()
        .lease(SlotKind::Normal, "webhooks-cli")
        .await;
    let (yaml, secret) = crate::admin::admin_yaml(&lease.dir);
    lease.config.extra_yaml = yaml;
    lease.write_config();
    let mut mxpay = MxpayProcess::start(&lease).await;
    let config = lease.config_path();
    let config = config.to_str().unwrap();
    let reader = crate::admin::mint(&secret, &[Scope::Read]);
    let operator = crate::admin::mint(&secret, &[Scope::Webhooks]);

    let (ok, out, err) = admin(config, &["--json", "webhooks", "list", "--failed"], &reader).await;
    assert!(ok, "{err}");
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page, serde_json::json!({"events": []}));
    let (ok, out, err) = admin(config, &["webhooks", "list", "--merchant", "cafe"], &reader).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("EVENT_ID"), "{out}");

    let (ok, _, err) = admin(config, &["webhooks", "replay", "evt_nope"], &operator).await;
    assert!(!ok);
    assert!(err.contains("M_NOT_FOUND"), "{err}");
    let (ok, _, err) = admin(config, &["webhooks", "replay", "evt_nope"], &reader).await;
    assert!(!ok);
    assert!(err.contains("M_FORBIDDEN"), "{err}");
    assert!(lease.config.data_dir.join("webhooks").is_dir());
    mxpay.kill().await;
}
