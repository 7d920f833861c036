//! Observability end to end: the whole payment flow with mxpay logging at trace level (pretty
//! and JSON), then no secret in its log and the metrics moved as the flow says.

use std::path::Path;

use serde_json::Value;

use crate::admin::{admin_yaml, mint};
use crate::payments::{
    balance_is, group_room, open_dm, send_text, set_pin, wait_bot_event, wait_notice, wait_receipt,
    PIN,
};
use crate::support::{self, MxpayOptions, MxpayProcess, SlotKind};
use mxpay::admin::token::Scope;

/// A wrong PIN, distinct from [`PIN`].
const WRONG_PIN: &str = "9157";

/// Value of the sample line starting with `prefix` (name and labels); 0 when absent.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(prefix)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Every place `needle` occurs in `log` as a whole token (not inside a longer run of letters,
/// digits or dots), with some context; short numeric secrets (PINs) otherwise match inside
/// ids, hashes and numbers by chance.
fn token_hits(log: &str, needle: &str) -> Vec<String> {
    let bytes = log.as_bytes();
    let boundary = |b: u8| !(b.is_ascii_alphanumeric() || b == b'.');
    log.match_indices(needle)
        .filter(|(at, _)| {
            let before = at.checked_sub(1).map(|i| bytes[i]);
            let after = bytes.get(at + needle.len()).copied();
            before.is_none_or(boundary) && after.is_none_or(boundary)
        })
        .map(|(at, _)| {
            let from = log.floor_char_boundary(at.saturating_sub(120));
            let to = log.ceil_char_boundary((at + needle.len() + 120).min(log.len()));
            log[from..to].to_owned()
        })
        .collect()
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The payment flow with mxpay at `RUST_LOG=trace` in `format`; then the log is searched for
/// every secret of the run, and `/metrics` is checked.
async fn flow_leaks_no_secret(label: &str, json: bool) {
    let alice_user = support::user("alice").await;
    let bob_user = support::user("bob").await;

    let mut lease = support::synapse().lease(SlotKind::Normal, label).await;
    let pepper_path = lease.dir.join("pepper");
    let pepper = support::random_suffix(48);
    support::write_secret(&pepper_path, format!("{pepper}\n"));
    let webhook_secret = support::random_suffix(40);
    let webhook_path = lease.dir.join("acme.secret");
    support::write_secret(&webhook_path, &webhook_secret);
    let (admin, admin_key) = admin_yaml(&lease.dir);
    lease.config.extra_yaml = format!(
        "payments:\n  enabled: true\n  pepper_file: {}\n  stepup_timeout_ms: 120000\n  hold_for_new_payees: false\n{admin}  \
         providers:\n    - name: acme\n      secret: {{ file: {} }}\n",
        pepper_path.display(),
        webhook_path.display()
    );
    lease.write_config();
    let serve_args = if json {
        vec!["--log-format".to_owned(), "json".to_owned()]
    } else {
        Vec::new()
    };
    let mxpay = MxpayProcess::start_with(
        &lease,
        MxpayOptions {
            env: vec![("RUST_LOG".to_owned(), "trace".to_owned())],
            serve_args,
        },
    )
    .await;
    let bot = lease.spec.bot_user_id();
    let http = reqwest::Client::new();

    let alice = support::client(&alice_user).await;
    alice.bootstrap_cross_signing().await;
    let bob = support::client(&bob_user).await;
    let alice_id = alice.user.user_id.as_str().to_owned();
    let bob_id = bob.user.user_id.as_str().to_owned();

    // PIN, then money in: through the admin API and through a signed provider webhook.
    let dm = open_dm(&alice, &bot).await;
    set_pin(&alice, &dm, &bot).await;
    let topup_token = mint(&admin_key, &[Scope::Topup]);
    let response = http
        .post(format!("{}/_mxpay/admin/v1/topups", mxpay.url))
        .bearer_auth(&topup_token)
        .json(&serde_json::json!({
            "user_id": alice_id, "amount": "30.00", "currency": "EUR",
            "idempotency_key": format!("obs-{}", support::random_suffix(8)),
        }))
        .send()
        .await
        .expect("top-up");
    assert_eq!(response.status(), 200);
    wait_notice(&alice, &dm, &bot, "topped up with 30.00 EUR").await;
    let webhook_body = serde_json::json!({
        "type": "topup.succeeded", "event_id": format!("evt_{}", support::random_suffix(8)),
        "user_id": alice_id, "amount": "5.00", "currency": "EUR",
    })
    .to_string();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signature = mxpay::admin::webhook::sign(
        &mxpay::admin::webhook::WebhookSecret::new(webhook_secret.as_bytes().to_vec()),
        now_s,
        webhook_body.as_bytes(),
    );
    let response = http
        .post(format!("{}/_mxpay/admin/v1/webhooks/acme", mxpay.url))
        .header(mxpay::admin::webhook::SIGNATURE_HEADER, signature)
        .header("content-type", "application/json")
        .body(webhook_body)
        .send()
        .await
        .expect("webhook");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    wait_notice(&alice, &dm, &bot, "topped up with 5.00 EUR").await;

    // Pay: a wrong PIN first, then the right one.
    let room = group_room(&alice, &bot, &[&bob]).await;
    let pay = send_text(&alice, &room, &format!("!pay {bob_id} 10 EUR obs")).await;
    wait_notice(&alice, &dm, &bot, "Confirm paying 10.00 EUR").await;
    send_text(&alice, &dm, WRONG_PIN).await;
    wait_notice(&alice, &dm, &bot, "Wrong PIN. 4 attempts left").await;
    send_text(&alice, &dm, PIN).await;
    let receipt = wait_receipt(&bob, &room, &bot, &pay, "completed", None).await;
    let transfer_id = receipt.content()["transfer_id"]
        .as_str()
        .expect("the receipt names its transfer")
        .to_owned();
    // A refusal: more than the balance.
    let too_much = send_text(&alice, &room, &format!("!pay {bob_id} 1000 EUR")).await;
    wait_receipt(
        &alice,
        &room,
        &bot,
        &too_much,
        "declined",
        Some("insufficient_funds"),
    )
    .await;

    // Withdraw, confirmed with the PIN, settled by the operator.
    let withdraw = send_text(&alice, &dm, "!withdraw 5 EUR").await;
    wait_notice(&alice, &dm, &bot, "Confirm withdrawing 5.00 EUR").await;
    send_text(&alice, &dm, PIN).await;
    wait_notice(&alice, &dm, &bot, "Withdrawal of 5.00 EUR confirmed").await;
    let settle_token = mint(&admin_key, &[Scope::Settle]);
    let id = mxpay::ledger::TransferId::from_key(withdraw.as_str());
    let response = http
        .post(format!(
            "{}/_mxpay/admin/v1/withdrawals/{id}/settle",
            mxpay.url
        ))
        .bearer_auth(&settle_token)
        .send()
        .await
        .expect("settle");
    assert_eq!(response.status(), 200);
    wait_notice(
        &alice,
        &dm,
        &bot,
        "Your withdrawal of 5.00 EUR was paid out",
    )
    .await;
    balance_is(&alice, &dm, &bot, "20.00 EUR").await;
    wait_bot_event(&alice, &dm, &bot, "org.mxpay.receipt", |c| {
        c["status"] == "completed" && c["transfer_id"] == transfer_id.as_str()
    })
    .await;

    // ---- metrics ----------------------------------------------------------------------------
    let metrics = mxpay.metrics().await;
    let at = |prefix: &str| sample(&metrics, prefix);
    assert!(
        at(r#"mxpay_payments_total{outcome="completed",reason="none"}"#) >= 2.0,
        "the payment and the withdrawal: {metrics}"
    );
    assert_eq!(
        at(r#"mxpay_payments_total{outcome="declined",reason="insufficient_funds"}"#),
        1.0,
        "{metrics}"
    );
    assert_eq!(at("mxpay_pin_failures_total"), 1.0, "{metrics}");
    assert_eq!(at("mxpay_pin_lockouts_total"), 0.0, "{metrics}");
    assert!(at("mxpay_ledger_batch_commands_count") >= 6.0, "{metrics}");
    assert!(
        at("mxpay_ledger_commit_duration_seconds_count") >= 6.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE mxpay_outbox_depth gauge"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE mxpay_outbox_oldest_age_seconds gauge"));
    assert_eq!(at("mxpay_crypto_parked_events"), 0.0, "{metrics}");
    // Everything was told: the outbox drains to zero (it reports after its next pass).
    let drained = support::eventually("the outbox backlog to reach 0", || async {
        let metrics = mxpay.metrics().await;
        (sample(&metrics, "mxpay_outbox_depth") == 0.0
            && sample(&metrics, "mxpay_outbox_oldest_age_seconds") == 0.0)
            .then_some(())
    });
    drained.await;
    for endpoint in [
        "message::send_message_event::v3",
        "redact::redact_event::v3",
        "keys::upload_keys::v3",
    ] {
        assert!(
            at(&format!(
                "mxpay_homeserver_request_duration_seconds_count{{endpoint=\"{endpoint}\"}}"
            )) >= 1.0,
            "{endpoint}: {metrics}"
        );
    }
    // Bounded labels: no room, event or user id ever becomes a label value.
    for line in metrics.lines().filter(|l| l.contains("endpoint=")) {
        assert!(
            !line.contains('!') && !line.contains('$') && !line.contains('@'),
            "{line}"
        );
    }

    // ---- logs -------------------------------------------------------------------------------
    let log = mxpay.log();
    assert!(
        log.len() > 100_000,
        "trace logging was on ({} bytes)",
        log.len()
    );
    if json {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.starts_with("==== mxpay start"))
            .collect();
        let objects = lines
            .iter()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok())
            .count();
        assert_eq!(objects, lines.len(), "every log line is a JSON object");
        // The payment's span carries its id into the ledger's and the outbox's lines.
        assert!(
            lines.iter().any(|l| l.contains("\"payment\":\"")
                && l.contains(&transfer_id_hex(&transfer_id))),
            "a log line in the payment's span"
        );
    } else {
        assert!(
            log.contains(&format!(
                "payment{{payment={}",
                transfer_id_hex(&transfer_id)
            )),
            "a log line in the payment's span"
        );
    }

    let data = &lease.config.data_dir;
    let device: Value =
        serde_json::from_str(&read_trimmed(&data.join("device.json"))).expect("device.json");
    let mut secrets: Vec<(&str, String)> = vec![
        ("as_token", lease.spec.as_token.clone()),
        ("hs_token", lease.spec.hs_token.clone()),
        (
            "crypto store key",
            read_trimmed(&data.join("crypto-store.key")),
        ),
        (
            "admin JWT secret",
            String::from_utf8(admin_key.clone()).unwrap(),
        ),
        ("admin token (topup)", topup_token),
        ("admin token (settle)", settle_token),
        ("webhook secret", webhook_secret),
        ("PIN pepper", pepper),
        ("alice's password", alice.user.password.clone()),
        ("bob's password", bob.user.password.clone()),
        (
            "alice's access token",
            alice.inner().access_token().expect("logged in"),
        ),
        (
            "bob's access token",
            bob.inner().access_token().expect("logged in"),
        ),
    ];
    secrets.push((
        "bot device access token",
        device_token(&device).expect("device.json holds the device's access token"),
    ));
    for (what, secret) in &secrets {
        assert!(secret.len() >= 8, "{what} is a real secret");
        if let Some(at) = log.find(secret.as_str()) {
            let from = log.floor_char_boundary(at.saturating_sub(300));
            panic!(
                "mxpay's log ({}) holds the {what}: ...{}",
                if json { "json" } else { "pretty" },
                &log[from..(at + secret.len()).min(log.len())]
            );
        }
    }
    for pin in [PIN, WRONG_PIN] {
        let hits = token_hits(&log, pin);
        assert!(hits.is_empty(), "mxpay's log holds a PIN: {hits:#?}");
    }
}

/// The device access token in `device.json`, wherever the file keeps it.
fn device_token(device: &Value) -> Option<String> {
    fn find(value: &Value) -> Option<String> {
        match value {
            Value::Object(map) => map.iter().find_map(|(key, v)| match v {
                Value::String(s) if key.contains("token") => Some(s.clone()),
                other => find(other),
            }),
            Value::Array(items) => items.iter().find_map(find),
            _ => None,
        }
    }
    find(device)
}

/// The transfer id as logs show it (`TransferId`'s Display).
fn transfer_id_hex(receipt_id: &str) -> String {
    let id: u128 = receipt_id.parse().expect("a decimal transfer id");
    mxpay::ledger::TransferId(id).to_string()
}

#[tokio::test]
async fn trace_logs_hold_no_secret_and_metrics_follow_the_flow_pretty() {
    flow_leaks_no_secret("obs-pretty", false).await;
}

#[tokio::test]
async fn trace_logs_hold_no_secret_and_metrics_follow_the_flow_json() {
    flow_leaks_no_secret("obs-json", true).await;
}
