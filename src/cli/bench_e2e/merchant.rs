//! `mxpay bench e2e --merchant`: each payee is a merchant, each payment an invoice.
//!
//! The payees are registered as merchants through the admin API, with their webhook URL on a
//! receiver this process runs on loopback. Each payment is then what a shop's backend and its
//! customer do: the backend creates the invoice through the merchant API, the customer's
//! client sees the bot's request in the room and answers it with a `!pay` reply, confirms with
//! the PIN in its DM, and the receiver gets the signed `invoice.paid`. The figure issue 14 asks
//! for is the time from the customer's PIN to that webhook's arrival; the signature of every
//! webhook measured is checked, so a figure never counts a delivery a merchant would refuse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use matrix_sdk::ruma::events::relation::{InReplyTo, Reply};
use matrix_sdk::ruma::events::room::message::{Relation, RoomMessageEventContent};
use matrix_sdk::ruma::{EventId, OwnedEventId, RoomId, UserId};
use serde_json::{json, Value};

use super::{
    confirm_with_pin, setup_err, typed, unix_ms, E2eBenchError, Outcome, Pair, Person, Stack,
    Timings, CURRENCY,
};

/// The receiver's path.
const HOOK_PATH: &str = "/hook";
/// How old a webhook's signature timestamp may be: mxpay signs at each attempt, so a first
/// delivery is seconds old at most.
const SIGNATURE_TOLERANCE_S: u64 = 300;
/// Longest wait for one call of the admin or merchant API.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// Lifetime of the admin token that registers the merchants.
const ADMIN_TOKEN_TTL_S: u64 = 600;

/// One `invoice.paid` as it reached the receiver: the first delivery only (a retry would
/// measure the retry policy, not the path).
#[derive(Debug, Clone)]
struct Arrival {
    at: Instant,
    signature: Option<String>,
    body: bytes::Bytes,
}

#[derive(Clone, Default)]
struct Arrivals {
    by_invoice: Arc<Mutex<HashMap<String, Arrival>>>,
    changed: Arc<tokio::sync::Notify>,
}

/// The local webhook receiver; stops when dropped.
pub(super) struct Receiver {
    url: String,
    arrivals: Arrivals,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(arrivals): State<Arrivals>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> StatusCode {
    let at = Instant::now();
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if event["type"] == "invoice.paid" {
        if let Some(invoice_id) = event["data"]["invoice"]["invoice_id"].as_str() {
            let signature = headers
                .get("Mxpay-Signature")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            arrivals
                .by_invoice
                .lock()
                .expect("lock")
                .entry(invoice_id.to_owned())
                .or_insert(Arrival {
                    at,
                    signature,
                    body: body.clone(),
                });
            arrivals.changed.notify_waiters();
        }
    }
    StatusCode::OK
}

impl Receiver {
    pub(super) async fn start() -> Result<Self, E2eBenchError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| setup_err("start the webhook receiver")(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| setup_err("start the webhook receiver")(e.to_string()))?;
        let arrivals = Arrivals::default();
        let router = axum::Router::new()
            .route(HOOK_PATH, axum::routing::post(receive))
            .with_state(arrivals.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self {
            url: format!("http://{addr}{HOOK_PATH}"),
            arrivals,
            task,
        })
    }

    /// Waits until `deadline` for `invoice_id`'s `invoice.paid`.
    async fn wait_paid(&self, invoice_id: &str, deadline: tokio::time::Instant) -> Option<Arrival> {
        loop {
            // Registered before the look, so an arrival between the two is not missed.
            let changed = self.arrivals.changed.notified();
            if let Some(arrival) = self
                .arrivals
                .by_invoice
                .lock()
                .expect("lock")
                .get(invoice_id)
            {
                return Some(arrival.clone());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }
}

/// A payee registered as a merchant: its id, an API key, and its webhook signing secret.
pub(super) struct Merchant {
    id: String,
    key: String,
    secret: String,
}

async fn call(
    http: &reqwest::Client,
    url: String,
    token: &str,
    body: Value,
) -> Result<Value, String> {
    let response = http
        .post(&url)
        .bearer_auth(token)
        .timeout(API_TIMEOUT)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        Ok(answer)
    } else {
        Err(format!("{url}: {status} {answer}"))
    }
}

/// Registers payee i as merchant `bench<i>` with its webhook at `receiver`, and mints it a
/// key for invoices.
pub(super) async fn register(
    stack: &Stack,
    payees: &[&Person],
    receiver: &Receiver,
) -> Result<Vec<Merchant>, E2eBenchError> {
    let err = setup_err("register the payees as merchants (admin API)");
    let token = stack
        .tokens
        .mint(
            "mxpay-bench",
            [crate::admin::token::Scope::Merchants]
                .into_iter()
                .collect(),
            ADMIN_TOKEN_TTL_S,
        )
        .map_err(|e| err(e.to_string()))?;
    let http = reqwest::Client::new();
    let admin = |path: String| format!("{}/_mxpay/admin/v1{path}", stack.mxpay_url);
    let mut merchants = Vec::with_capacity(payees.len());
    for (i, payee) in payees.iter().enumerate() {
        let id = format!("bench{i}");
        let created = call(
            &http,
            admin("/merchants".to_owned()),
            &token,
            json!({
                "merchant_id": id, "user_id": payee.user_id.as_str(),
                "display_name": format!("Bench shop {i}"), "webhook_url": receiver.url,
            }),
        )
        .await
        .map_err(&err)?;
        let secret = created["webhook_secret"]
            .as_str()
            .ok_or_else(|| err(format!("no webhook_secret in {created}")))?
            .to_owned();
        let minted = call(
            &http,
            admin(format!("/merchants/{id}/keys")),
            &token,
            json!({ "scopes": ["invoices", "read"] }),
        )
        .await
        .map_err(&err)?;
        let key = minted["key"]
            .as_str()
            .ok_or_else(|| err(format!("no key in {minted}")))?
            .to_owned();
        merchants.push(Merchant { id, key, secret });
    }
    Ok(merchants)
}

/// Replies `text` to `to` (encrypted: the rooms are).
async fn reply(
    person: &Person,
    room_id: &RoomId,
    to: &EventId,
    text: &str,
) -> Result<OwnedEventId, String> {
    let room = person.room(room_id).await?;
    let mut content = RoomMessageEventContent::text_plain(text);
    content.relates_to = Some(Relation::Reply(Reply::new(InReplyTo::new(to.to_owned()))));
    let sent = room.send(content).await.map_err(|e| e.to_string())?;
    Ok(sent.response.event_id)
}

/// One invoice of payer `pair.payer` to merchant `merchant`, paid and measured to its webhook.
#[allow(clippy::too_many_arguments)]
pub(super) async fn pay_invoice(
    stack: &Stack,
    pair: &Pair,
    merchant: &Merchant,
    receiver: &Receiver,
    payer_index: usize,
    k: usize,
    bot: &UserId,
    timeout: Duration,
) -> Outcome {
    let amount = super::amount_of(k);
    let lost = |step, why: String| Outcome::Lost { step, why };
    let deadline = tokio::time::Instant::now() + timeout;
    let payer_cursor = pair.payer.cursor();
    let payee_cursor = pair.payee.cursor();
    let http = reqwest::Client::new();
    let invoice_at = Instant::now();
    let invoice = match call(
        &http,
        format!("{}/_mxpay/merchant/v1/invoices", stack.mxpay_url),
        &merchant.key,
        json!({
            "room_id": pair.room.as_str(), "payer": pair.payer.user_id.as_str(),
            "amount": amount, "currency": CURRENCY, "description": format!("bench {k}"),
            "order_ref": format!("bench-{payer_index}-{k}"),
            "idempotency_key": format!("bench-{payer_index}-{k}"),
        }),
    )
    .await
    {
        Ok(invoice) => invoice,
        Err(e) => return lost("create the invoice", e),
    };
    let Some(invoice_id) = invoice["invoice_id"].as_str().map(str::to_owned) else {
        return lost("create the invoice", format!("no invoice_id in {invoice}"));
    };
    // The bot's typed request for this payer and amount (each payment of a payer has its own).
    let payer = pair.payer.user_id.as_str();
    let Some(request) = pair
        .payer
        .wait_after(payer_cursor, deadline, |room, event| {
            room == pair.room
                && event["sender"] == bot.as_str()
                && typed(event, "org.mxpay.payment_request")
                    .is_some_and(|c| c["amount"] == amount.as_str() && c["payer"] == payer)
        })
        .await
    else {
        return lost(
            "invoice -> payer sees it",
            format!("no request for invoice {invoice_id} within {timeout:?}"),
        );
    };
    let Some(request_id) = request.json["event_id"]
        .as_str()
        .and_then(|id| EventId::parse(id).ok())
    else {
        return lost(
            "invoice -> payer sees it",
            "the request has no event id".to_owned(),
        );
    };
    let payer_cursor = pair.payer.cursor();
    let pay_at = Instant::now();
    let pay_event = match reply(&pair.payer, &pair.room, &request_id, "!pay").await {
        Ok(event_id) => event_id,
        Err(e) => return lost("send the !pay reply", e),
    };
    let confirmed =
        match confirm_with_pin(pair, payer_cursor, &pay_event, &amount, bot, deadline).await {
            Ok(confirmed) => confirmed,
            Err(outcome) => return outcome,
        };
    let pin_at = confirmed.pin_at;
    let Some(webhook) = receiver.wait_paid(&invoice_id, deadline).await else {
        return lost(
            "PIN -> invoice.paid webhook",
            format!("no invoice.paid for {invoice_id} within {timeout:?} of the invoice"),
        );
    };
    let now_s = unix_ms(SystemTime::now()) / 1000;
    if let Err(e) = crate::signature::verify(
        merchant.secret.as_bytes(),
        webhook.signature.as_deref(),
        &webhook.body,
        now_s,
        SIGNATURE_TOLERANCE_S,
    ) {
        return lost(
            "check the webhook's signature",
            format!("{} ({e}) for merchant {}", e.code(), merchant.id),
        );
    }
    match confirmed
        .payee_sees_receipt(pair, payee_cursor, &pay_event, pay_at, bot, deadline)
        .await
    {
        Outcome::Completed(timings) => Outcome::Completed(Timings {
            invoice_to_seen: Some(request.at - invoice_at),
            pin_to_webhook: Some(webhook.at - pin_at),
            ..timings
        }),
        other => other,
    }
}
