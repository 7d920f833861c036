//! Merchant invoices over real Synapse with real encrypted clients and a real local webhook
//! receiver: an invoice that lapses, and an invoice open to the whole room.

use reqwest::Method;
use serde_json::{json, Value};

use crate::admin::mint;
use crate::payments::requests::{funded_payer, wait_edit};
use crate::payments::{
    balance_is, scene_configured, send_text, wait_notice, wait_receipt, Scene, PIN,
};
use crate::support::{self, MxpayOptions};
use mxpay::admin::token::Scope;

/// A local webhook receiver on 127.0.0.1: answers 200 to every POST and hands each
/// delivery's `Mxpay-Signature` header and raw body to the test. Stops when dropped.
pub(crate) struct WebhookReceiver {
    /// Where it listens (`http://127.0.0.1:<port>/webhook`).
    pub(crate) url: String,
    deliveries: tokio::sync::mpsc::Receiver<(Option<String>, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebhookReceiver {
    pub(crate) async fn start() -> Self {
        // Bounded: a test expects a handful of deliveries.
        let (sender, deliveries) = tokio::sync::mpsc::channel(64);
        let router = axum::Router::new()
            .route(
                "/webhook",
                axum::routing::post(
                    |axum::extract::State(sender): axum::extract::State<
                        tokio::sync::mpsc::Sender<(Option<String>, Vec<u8>)>,
                    >,
                     headers: axum::http::HeaderMap,
                     body: axum::body::Bytes| async move {
                        let signature = headers
                            .get("Mxpay-Signature")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let _ = sender.try_send((signature, body.to_vec()));
                        axum::http::StatusCode::OK
                    },
                ),
            )
            .with_state(sender);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let url = format!("http://{}/webhook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            url,
            deliveries,
            task,
        }
    }

    /// The next delivery of `event_type` (others are skipped), after checking its signature
    /// under `secret`; returns the body.
    pub(crate) async fn next_of(&mut self, event_type: &str, secret: &str) -> Value {
        let deadline = tokio::time::Instant::now() + support::timeout();
        loop {
            let (signature, body) = tokio::time::timeout_at(deadline, self.deliveries.recv())
                .await
                .unwrap_or_else(|_| panic!("no {event_type} webhook arrived in time"))
                .expect("the receiver runs");
            let now_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            mxpay::webhooks::verify_signature(
                secret.as_bytes(),
                signature.as_deref(),
                &body,
                now_s,
                mxpay::webhooks::DEFAULT_TOLERANCE_S,
            )
            .unwrap_or_else(|e| panic!("a webhook with a bad signature ({e})"));
            let body: Value = serde_json::from_slice(&body).expect("a JSON webhook body");
            if body["type"] == event_type {
                return body;
            }
        }
    }

    /// Whether a delivery of `event_type` is waiting now (without waiting).
    pub(crate) fn has_waiting(&mut self, event_type: &str) -> bool {
        while let Ok((_, body)) = self.deliveries.try_recv() {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if body["type"] == event_type {
                return true;
            }
        }
        false
    }
}

/// The scene's mxpay with merchant `cafe` (bob's Matrix user) sending its webhooks to
/// `receiver`; returns (admin token, merchant key, webhook secret).
async fn cafe(s: &Scene, receiver: &WebhookReceiver) -> (String, String, String) {
    let ops = mint(&s.admin_key, &[Scope::Merchants, Scope::Read]);
    let (status, created) = call(
        Method::POST,
        admin_url(s, "/merchants"),
        &ops,
        Some(json!({
            "merchant_id": "cafe", "user_id": s.bob.user.user_id.to_string(),
            "display_name": "Bob's Cafe", "webhook_url": receiver.url,
        })),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let secret = created["webhook_secret"].as_str().unwrap().to_owned();
    let (status, key) = call(
        Method::POST,
        admin_url(s, "/merchants/cafe/keys"),
        &ops,
        Some(json!({ "scopes": ["invoices", "refunds", "read"] })),
    )
    .await;
    assert_eq!(status, 200, "{key}");
    (ops, key["key"].as_str().unwrap().to_owned(), secret)
}

fn admin_url(s: &Scene, path: &str) -> String {
    format!("{}/_mxpay/admin/v1{path}", s.mxpay.url)
}

fn api_url(s: &Scene, path: &str) -> String {
    format!("{}/_mxpay/merchant/v1{path}", s.mxpay.url)
}

async fn call(method: Method, url: String, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json::<Value>().await.unwrap_or(Value::Null),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The merchant wallet's available EUR, as the admin API shows it ("0.00" with no account).
async fn cafe_available(s: &Scene, ops: &str) -> String {
    let (_, merchant) = call(Method::GET, admin_url(s, "/merchants/cafe"), ops, None).await;
    merchant["accounts"]
        .as_array()
        .and_then(|accounts| accounts.first())
        .and_then(|a| a["available"].as_str())
        .unwrap_or("0.00")
        .to_owned()
}

/// Issue 14: an invoice asking alice with a short `expires_in_s` (the test config lowers
/// `merchants.invoice_expires_in_s_min`) lapses with nobody saying anything in the room: the
/// notice is edited to expired, `GET` says `expired`, the receiver gets a correctly signed
/// `invoice.expired`; alice paying it afterwards is refused as `request_expired` and nothing
/// moves.
#[tokio::test]
async fn an_invoice_that_lapses_is_told_expired_to_the_room_the_api_and_the_webhook() {
    let s = scene_configured(
        "merchant-lapse",
        120_000,
        "100.00",
        "  hold_for_new_payees: false\nmerchants:\n  invoice_expires_in_s_min: 5\n",
        |_| MxpayOptions::default(),
    )
    .await;
    let (alice, bot, dm, room) = (&s.alice, s.bot.as_str(), &s.dm, &s.room);
    let mut receiver = WebhookReceiver::start().await;
    let (ops, key, secret) = cafe(&s, &receiver).await;

    // Far enough ahead for the bot to post it on any machine; the test then waits for that
    // time to pass (it asserts nothing about how long anything took).
    let (status, invoice) = call(
        Method::POST,
        api_url(&s, "/invoices"),
        &key,
        Some(json!({
            "room_id": room.as_str(), "payer": alice.user.user_id.to_string(),
            "amount": "4.50", "currency": "EUR", "description": "Flat white",
            "order_ref": "order-lapse", "idempotency_key": "lapse-1", "expires_in_s": 15,
        })),
    )
    .await;
    assert_eq!(status, 200, "{invoice}");
    let id = invoice["invoice_id"].as_str().unwrap().to_owned();
    let expires_at_ms = invoice["expires_at_ms"].as_u64().unwrap();
    let notice = wait_notice(alice, room, bot, "4.50 EUR").await;

    // Bounded: the expiry is at most 15 s ahead. Nobody writes in the room meanwhile.
    for _ in 0..40 {
        if now_ms() > expires_at_ms + 500 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(now_ms() > expires_at_ms, "the invoice's time has passed");
    wait_edit(alice, room, bot, notice.event_id(), "Status: expired").await;
    let expired = receiver.next_of("invoice.expired", &secret).await;
    assert_eq!(expired["data"]["invoice"]["invoice_id"], id.as_str());
    assert_eq!(expired["data"]["invoice"]["status"], "expired");
    let (_, shown) = call(
        Method::GET,
        api_url(&s, &format!("/invoices/{id}")),
        &key,
        None,
    )
    .await;
    assert_eq!(shown["status"], "expired", "{shown}");

    let late = alice.reply(room, notice.event_id(), "!pay").await;
    wait_receipt(alice, room, bot, &late, "declined", Some("request_expired")).await;
    balance_is(alice, dm, bot, "100.00 EUR").await;
    assert_eq!(cafe_available(&s, &ops).await, "0.00");
    let (_, shown) = call(
        Method::GET,
        api_url(&s, &format!("/invoices/{id}")),
        &key,
        None,
    )
    .await;
    assert_eq!(
        (&shown["status"], &shown["transfer_id"]),
        (&json!("expired"), &Value::Null),
        "{shown}"
    );
}

/// Issue 14: an invoice without `payer` is open to the room: alice pays it with her PIN; `GET`
/// shows her as the payer with the transfer and a signed `invoice.paid` arrives; carol, also
/// in the room, trying to pay it afterwards is refused as `request_full` and nothing moves
/// (the merchant has one payment, carol her money).
#[tokio::test]
async fn an_invoice_open_to_the_room_is_paid_once_by_the_first_member() {
    let s = scene_configured(
        "merchant-open",
        120_000,
        "100.00",
        "  hold_for_new_payees: false\n",
        |_| MxpayOptions::default(),
    )
    .await;
    let (alice, bot, dm, room) = (&s.alice, s.bot.as_str(), &s.dm, &s.room);
    let (carol, carol_dm) = funded_payer(&s, "carol", "10.00").await;
    let mut receiver = WebhookReceiver::start().await;
    let (ops, key, secret) = cafe(&s, &receiver).await;

    let (status, invoice) = call(
        Method::POST,
        api_url(&s, "/invoices"),
        &key,
        Some(json!({
            "room_id": room.as_str(), "amount": "4.50", "currency": "EUR",
            "description": "Flat white", "order_ref": "order-open",
            "idempotency_key": "open-1",
        })),
    )
    .await;
    assert_eq!(status, 200, "{invoice}");
    assert_eq!(invoice["payer"], Value::Null);
    let id = invoice["invoice_id"].as_str().unwrap().to_owned();
    let notice = wait_notice(alice, room, bot, "4.50 EUR").await;

    let pay = alice.reply(room, notice.event_id(), "!pay").await;
    wait_notice(alice, dm, bot, "Confirm paying 4.50 EUR").await;
    send_text(alice, dm, PIN).await;
    let receipt = wait_receipt(alice, room, bot, &pay, "completed", None).await;
    assert_eq!(receipt.content()["order_ref"], "order-open");

    let paid = receiver.next_of("invoice.paid", &secret).await;
    let alice_id = alice.user.user_id.to_string();
    assert_eq!(paid["data"]["invoice"]["invoice_id"], id.as_str());
    assert_eq!(paid["data"]["invoice"]["paid_by"], alice_id.as_str());
    let (_, shown) = call(
        Method::GET,
        api_url(&s, &format!("/invoices/{id}")),
        &key,
        None,
    )
    .await;
    assert_eq!(
        (&shown["status"], &shown["paid_by"]),
        (&json!("paid"), &json!(alice_id)),
        "{shown}"
    );
    let transfer = shown["transfer_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(transfer.len(), 32, "{shown}");
    assert_eq!(paid["data"]["invoice"]["transfer_id"], transfer.as_str());

    // carol, in the room too, tries to pay the same invoice: refused, nothing moves.
    let second = carol.reply(room, notice.event_id(), "!pay").await;
    wait_receipt(&carol, room, bot, &second, "declined", Some("request_full")).await;
    balance_is(&carol, &carol_dm, bot, "10.00 EUR").await;
    balance_is(alice, dm, bot, "95.50 EUR").await;
    assert_eq!(cafe_available(&s, &ops).await, "4.50");
    let (_, shown) = call(
        Method::GET,
        api_url(&s, &format!("/invoices/{id}")),
        &key,
        None,
    )
    .await;
    assert_eq!(
        (&shown["paid_by"], &shown["transfer_id"]),
        (&json!(alice_id), &json!(transfer)),
        "{shown}"
    );
    assert!(
        !receiver.has_waiting("invoice.paid"),
        "one invoice.paid only"
    );
}

/// Issue 14: bob's Matrix user is merchant `cafe`; bob's own encrypted client sends a typed
/// `org.mxpay.payment_request` with an `order_ref`: the bot records it as cafe's invoice
/// (`GET /invoices` lists it with that order_ref); alice pays it with her PIN, the receipt
/// carries the order_ref, the invoice shows paid and a signed `invoice.paid` arrives. Once cafe
/// is disabled, bob's next typed request is refused as `merchant_disabled`, nothing recorded.
#[tokio::test]
async fn a_merchant_bots_own_typed_request_is_its_invoice_and_a_disabled_one_is_refused() {
    let s = scene_configured(
        "merchant-own-request",
        120_000,
        "100.00",
        "  hold_for_new_payees: false\n",
        |_| MxpayOptions::default(),
    )
    .await;
    let (alice, bob, bot, dm, room) = (&s.alice, &s.bob, s.bot.as_str(), &s.dm, &s.room);
    let mut receiver = WebhookReceiver::start().await;
    let (ops, key, secret) = cafe(&s, &receiver).await;
    let bob_id = bob.user.user_id.to_string();
    let alice_id = alice.user.user_id.to_string();

    let sent = bob
        .room(room)
        .await
        .send_raw(
            "org.mxpay.payment_request",
            json!({
                "body": format!("{bob_id} requests 3.00 EUR: two croissants"),
                "payee": bob_id, "payer": alice_id, "amount": "3.00", "currency": "EUR",
                "memo": "two croissants", "order_ref": "bot-order-7",
            }),
        )
        .await
        .expect("send the request");
    let request_event = sent.response.event_id.to_string();
    let notice = wait_notice(alice, room, bot, "3.00 EUR").await;
    let listed = support::eventually("the request to be listed as an invoice", || {
        let url = api_url(&s, "/invoices?status=open");
        let key = key.clone();
        async move {
            let (_, page) = call(Method::GET, url, &key, None).await;
            page["invoices"]
                .as_array()
                .and_then(|list| list.first().cloned())
        }
    })
    .await;
    assert_eq!(
        (
            &listed["order_ref"],
            &listed["request_event_id"],
            &listed["payer"]
        ),
        (
            &json!("bot-order-7"),
            &json!(request_event),
            &json!(alice_id)
        ),
        "{listed}"
    );
    assert_eq!(listed["amount"], "3.00");
    let id = listed["invoice_id"].as_str().unwrap().to_owned();

    let pay = alice.reply(room, notice.event_id(), "!pay").await;
    wait_notice(alice, dm, bot, "Confirm paying 3.00 EUR").await;
    send_text(alice, dm, PIN).await;
    let receipt = wait_receipt(alice, room, bot, &pay, "completed", None).await;
    assert_eq!(receipt.content()["order_ref"], "bot-order-7");
    let paid = receiver.next_of("invoice.paid", &secret).await;
    assert_eq!(paid["data"]["invoice"]["invoice_id"], id.as_str());
    let (_, shown) = call(
        Method::GET,
        api_url(&s, &format!("/invoices/{id}")),
        &key,
        None,
    )
    .await;
    assert_eq!(
        (&shown["status"], &shown["paid_by"]),
        (&json!("paid"), &json!(alice_id)),
        "{shown}"
    );
    assert_eq!(cafe_available(&s, &ops).await, "3.00");

    // Disabled: its next typed request is refused with a reason code, and recorded nowhere.
    let (status, _) = call(
        Method::POST,
        admin_url(&s, "/merchants/cafe/disable"),
        &ops,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let refused = bob
        .room(room)
        .await
        .send_raw(
            "org.mxpay.payment_request",
            json!({
                "body": format!("{bob_id} requests 2.00 EUR"),
                "payee": bob_id, "payer": alice_id, "amount": "2.00", "currency": "EUR",
                "order_ref": "bot-order-8",
            }),
        )
        .await
        .expect("send the request")
        .response
        .event_id;
    wait_receipt(
        bob,
        room,
        bot,
        &refused,
        "declined",
        Some("merchant_disabled"),
    )
    .await;
    // Listing needs an enabled merchant's key: enable again and look.
    let (status, _) = call(
        Method::POST,
        admin_url(&s, "/merchants/cafe/enable"),
        &ops,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (_, page) = call(Method::GET, api_url(&s, "/invoices"), &key, None).await;
    assert_eq!(page["invoices"].as_array().map(Vec::len), Some(1), "{page}");
}
