//! A payment whose room key never reached mxpay, on a stock Synapse with the real binary and
//! real encrypted clients.
//!
//! Synapse 1.163 can skip a to-device message for an appservice user under concurrent
//! to-device traffic (`crypto::core_every_event_is_read_under_concurrent_to_device_load` shows
//! it happening). Here the loss is made certain: a proxy between Synapse and mxpay drops the
//! to-device events of the transactions while alice's `!pay` goes out, so mxpay never gets the
//! room key of her message. mxpay must ask alice's client for it and carry the payment out;
//! and when her client never answers (its answers dropped too), tell her once to send again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use serde_json::Value;

use crate::admin::{admin_yaml, topup};
use crate::payments::{group_room, open_dm, send_text, set_pin, wait_notice, wait_receipt};
use crate::support::{self, MxpayProcess, SlotKind};

const TO_DEVICE: &str = "de.sorunome.msc2409.to_device";

/// What the proxy did.
#[derive(Default)]
struct Seen {
    /// Senders of the to-device events it dropped.
    dropped_from: Vec<String>,
    /// Ids of the room events it passed on.
    events: Vec<String>,
}

struct ProxyState {
    target: String,
    http: reqwest::Client,
    /// While set, transactions reach mxpay without their to-device events.
    dropping: AtomicBool,
    seen: Mutex<Seen>,
}

/// Passes every request on to mxpay; strips the to-device events of transactions while
/// `dropping` is set.
async fn pass_on(
    State(state): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let mut body = body.to_vec();
    if uri.path().starts_with("/_matrix/app/v1/transactions/") {
        if let Ok(mut txn) = serde_json::from_slice::<Value>(&body) {
            let mut seen = state.seen.lock().unwrap();
            if let Some(events) = txn["events"].as_array() {
                seen.events.extend(
                    events
                        .iter()
                        .filter_map(|e| e["event_id"].as_str().map(str::to_owned)),
                );
            }
            if state.dropping.load(Ordering::SeqCst) {
                if let Some(Value::Array(dropped)) =
                    txn.as_object_mut().and_then(|t| t.remove(TO_DEVICE))
                {
                    seen.dropped_from.extend(
                        dropped
                            .iter()
                            .filter_map(|e| e["sender"].as_str().map(str::to_owned)),
                    );
                }
                body = serde_json::to_vec(&txn).expect("JSON");
            }
        }
    }
    let mut request = state.http.request(
        method,
        format!(
            "{}{}",
            state.target,
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        ),
    );
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    match request.body(body).send().await {
        Ok(response) => {
            let status = response.status();
            let bytes = response.bytes().await.unwrap_or_default();
            (status, bytes).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

impl ProxyState {
    fn dropped_from(&self, user: &str) -> bool {
        self.seen
            .lock()
            .unwrap()
            .dropped_from
            .iter()
            .any(|s| s == user)
    }

    fn passed_event(&self, event_id: &str) -> bool {
        self.seen
            .lock()
            .unwrap()
            .events
            .iter()
            .any(|e| e == event_id)
    }
}

/// `!pay` from alice in the room, sent while every to-device event for mxpay is dropped, until
/// mxpay got the event and a to-device event of alice's (her room key) was dropped. With
/// `for_good`, dropping goes on (alice's answers to key requests are lost too).
async fn pay_losing_the_key(
    proxy: &ProxyState,
    alice: &support::TestClient,
    room: &matrix_sdk::ruma::RoomId,
    text: &str,
    for_good: bool,
) -> matrix_sdk::ruma::OwnedEventId {
    proxy.seen.lock().unwrap().dropped_from.clear();
    proxy.dropping.store(true, Ordering::SeqCst);
    let pay = send_text(alice, room, text).await;
    let alice_id = alice.user.user_id.to_string();
    support::eventually(
        "the !pay passed on and alice's room key dropped",
        || async {
            (proxy.passed_event(pay.as_str()) && proxy.dropped_from(&alice_id)).then_some(())
        },
    )
    .await;
    if !for_good {
        proxy.dropping.store(false, Ordering::SeqCst);
    }
    pay
}

#[tokio::test]
async fn a_payment_whose_room_key_was_lost_goes_through_after_the_bot_asks_for_it() {
    let alice_user = support::user("alice").await;
    let bob_user = support::user("bob").await;

    // Payments on, admin API for the top-up; mxpay listens behind the proxy.
    let mut lease = support::synapse().lease(SlotKind::Normal, "lost_key").await;
    let pepper = lease.dir.join("pepper");
    support::write_secret(&pepper, format!("{}\n", support::random_suffix(48)));
    let (admin, admin_key) = admin_yaml(&lease.dir);
    lease.config.extra_yaml = format!(
        "payments:\n  enabled: true\n  pepper_file: {}\n  hold_for_new_payees: false\n{admin}",
        pepper.display()
    );
    let mxpay_port = support::free_port();
    lease.config.listen = format!("127.0.0.1:{mxpay_port}");
    lease.write_config();
    let proxy = Arc::new(ProxyState {
        target: format!("http://127.0.0.1:{mxpay_port}"),
        http: reqwest::Client::new(),
        dropping: AtomicBool::new(false),
        seen: Mutex::new(Seen::default()),
    });
    let app = Router::new().fallback(pass_on).with_state(proxy.clone());
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
    let mxpay = MxpayProcess::start(&lease).await;
    let bot = lease.spec.bot_user_id();

    let alice = support::client(&alice_user).await;
    alice.bootstrap_cross_signing().await;
    let bob = support::client(&bob_user).await;
    let dm = open_dm(&alice, &bot).await;
    set_pin(&alice, &dm, &bot).await;
    topup(
        &mxpay.url,
        &admin_key,
        alice.user.user_id.as_str(),
        "50.00",
        "EUR",
    )
    .await;
    wait_notice(&alice, &dm, &bot, "topped up").await;
    let room = group_room(&alice, &bot, &[&bob]).await;

    // The first message in the room carries a new room key: mxpay never gets it.
    let bob_id = bob.user.user_id.to_string();
    let asked = Instant::now();
    let pay = pay_losing_the_key(
        &proxy,
        &alice,
        &room,
        &format!("!pay {bob_id} 2.50 EUR"),
        false,
    )
    .await;
    wait_notice(&alice, &dm, &bot, "Confirm paying 2.50 EUR").await;
    let took = asked.elapsed();
    eprintln!("!pay with a lost room key: challenge {took:?} after sending");
    send_text(&alice, &dm, crate::payments::PIN).await;
    wait_receipt(&bob, &room, &bot, &pay, "completed", None).await;
    let log = std::fs::read_to_string(lease.log_path()).unwrap_or_default();
    assert!(
        log.contains("room key recovered"),
        "mxpay recovered the key by asking (not a late key); log:\n{}",
        support::log_tail(&lease.log_path(), 30)
    );

    // A client that never answers (its answers are lost as well): alice is told, once.
    alice
        .room(&room)
        .await
        .discard_room_key()
        .await
        .expect("alice discards her room key");
    let unread = pay_losing_the_key(
        &proxy,
        &alice,
        &room,
        &format!("!pay {bob_id} 1.00 EUR"),
        true,
    )
    .await;
    let told = alice
        .wait_for_event("the notice that the bot could not read the !pay", |e| {
            e.sender() == bot
                && e.body().is_some_and(|b| b.contains("could not decrypt"))
                && e.content()["m.relates_to"]["m.in_reply_to"]["event_id"] == unread.as_str()
        })
        .await;
    assert!(told.body().unwrap_or_default().contains("send it again"));
    // Two more sweeps: still one notice.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let notices = alice
        .seen_events()
        .iter()
        .filter(|e| e.sender() == bot && e.body().is_some_and(|b| b.contains("could not decrypt")))
        .count();
    assert_eq!(notices, 1, "told once");
    proxy.dropping.store(false, Ordering::SeqCst);
    drop(mxpay);
    server.abort();
}
