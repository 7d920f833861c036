//! The test homeserver itself: every to-device message for an appservice user must arrive in
//! a transaction, also while other users exchange to-device messages at the same time.
//!
//! Synapse 1.163 loses such messages under concurrency (see `scripts/synapse_to_device_fix.py`,
//! which the test homeserver loads to work around it). A lost message is a lost room key: the
//! bot then cannot read the sender's message, which made the encrypted-room tests flaky.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::support::{self, SlotKind};

/// Messages each sender sends; with the Synapse bug about half of them got lost.
const MESSAGES_PER_SENDER: usize = 25;
/// Senders to the appservice user, and as many senders between ordinary users.
const SENDERS: usize = 4;

struct Received {
    hs_token: String,
    tags: Mutex<HashSet<String>>,
}

async fn transaction(
    State(state): State<Arc<Received>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let expected = format!("Bearer {}", state.hs_token);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"errcode": "M_FORBIDDEN"})),
        );
    }
    if let Some(Value::Array(events)) = body.get("de.sorunome.msc2409.to_device") {
        let mut tags = state.tags.lock().unwrap();
        for event in events {
            if let Some(tag) = event["content"]["tag"].as_str() {
                tags.insert(tag.to_owned());
            }
        }
    }
    (StatusCode::OK, Json(json!({})))
}

/// Logs `user` in with a password; returns (access token, device id).
async fn login(http: &reqwest::Client, hs: &str, user: &support::TestUser) -> (String, String) {
    let response: Value = http
        .post(format!("{hs}/_matrix/client/v3/login"))
        .json(&json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user.localpart},
            "password": user.password,
        }))
        .send()
        .await
        .expect("login request")
        .error_for_status()
        .expect("login succeeds")
        .json()
        .await
        .expect("login answer");
    (
        response["access_token"].as_str().expect("token").to_owned(),
        response["device_id"].as_str().expect("device").to_owned(),
    )
}

async fn send_to_device(
    http: &reqwest::Client,
    hs: &str,
    token: &str,
    user_id: &str,
    device_id: &str,
    tag: &str,
) {
    http.put(format!(
        "{hs}/_matrix/client/v3/sendToDevice/org.mxpay.test/{}",
        support::random_suffix(16)
    ))
    .bearer_auth(token)
    .json(&json!({"messages": {user_id: {device_id: {"tag": tag}}}}))
    .timeout(Duration::from_secs(30))
    .send()
    .await
    .expect("sendToDevice request")
    .error_for_status()
    .expect("sendToDevice succeeds");
}

#[tokio::test]
async fn homeserver_delivers_every_to_device_message_under_concurrent_load() {
    let lease = support::synapse()
        .lease(SlotKind::Normal, "to_device_load")
        .await;
    let hs = lease.synapse().url.clone();
    let http = reqwest::Client::new();

    // The test plays the appservice on the slot's port.
    let state = Arc::new(Received {
        hs_token: lease.spec.hs_token.clone(),
        tags: Mutex::new(HashSet::new()),
    });
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(transaction))
        .with_state(state.clone());
    let port = lease.spec.listen_port;
    let listener = support::eventually("the slot's port to be free", || async move {
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // A user in the appservice's namespace (not the bot user: its device list stays as it
    // is for the slot's later tests), with one device made by appservice login.
    let ghost_localpart = format!(
        "{}_td{}",
        lease.spec.bot_localpart,
        support::random_suffix(6)
    );
    let ghost = format!("@{ghost_localpart}:localhost");
    http.post(format!("{hs}/_matrix/client/v3/register"))
        .bearer_auth(&lease.spec.as_token)
        .json(&json!({
            "type": "m.login.application_service",
            "username": ghost_localpart,
            "inhibit_login": true,
        }))
        .send()
        .await
        .expect("register request")
        .error_for_status()
        .expect("appservice registers its user");
    let ghost_device: Value = http
        .post(format!("{hs}/_matrix/client/v3/login"))
        .bearer_auth(&lease.spec.as_token)
        .json(&json!({
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": ghost},
        }))
        .send()
        .await
        .expect("login request")
        .error_for_status()
        .expect("appservice login")
        .json()
        .await
        .expect("login answer");
    let ghost_device = ghost_device["device_id"]
        .as_str()
        .expect("device")
        .to_owned();

    let mut to_ghost = Vec::new();
    let mut between_others = Vec::new();
    for _ in 0..SENDERS {
        let sender = support::user("tdsend").await;
        to_ghost.push(login(&http, &hs, &sender).await.0);
        let sender = support::user("tdother").await;
        let (token, _) = login(&http, &hs, &sender).await;
        let recipient = support::user("tdrecv").await;
        let (_, device) = login(&http, &hs, &recipient).await;
        between_others.push((token, recipient.user_id.to_string(), device));
    }

    let mut tasks = Vec::new();
    let mut sent = HashSet::new();
    for (s, token) in to_ghost.into_iter().enumerate() {
        let tags: Vec<String> = (0..MESSAGES_PER_SENDER)
            .map(|n| format!("{s}-{n}"))
            .collect();
        sent.extend(tags.iter().cloned());
        let (http, hs, ghost, device) = (
            http.clone(),
            hs.clone(),
            ghost.clone(),
            ghost_device.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for tag in tags {
                send_to_device(&http, &hs, &token, &ghost, &device, &tag).await;
            }
        }));
    }
    for (token, user_id, device) in between_others {
        let (http, hs) = (http.clone(), hs.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..MESSAGES_PER_SENDER {
                send_to_device(&http, &hs, &token, &user_id, &device, "unrelated").await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("sender task");
    }

    // Everything was accepted; delivery is asynchronous, so wait (bounded) for all of it. A
    // lost message never comes, hence the explicit failure message instead of `eventually`.
    let deadline = tokio::time::Instant::now() + support::timeout();
    let missing = loop {
        let missing: Vec<String> = {
            let received = state.tags.lock().unwrap();
            let mut m: Vec<String> = sent.difference(&received).cloned().collect();
            m.sort();
            m
        };
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    server.abort();
    assert!(
        missing.is_empty(),
        "{} of {} to-device messages for {ghost} never reached the appservice (first: {:?}); \
         is scripts/synapse_to_device_fix.py loaded by the test homeserver?",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(5)]
    );
}
