//! A small merchant, as a business developer would write one against mxpay's merchant API:
//! it creates an invoice, waits for the signed `invoice.paid` webhook, checks its signature,
//! refunds part of the payment and waits for `refund.succeeded`.
//!
//! It speaks HTTP only (no mxpay code): the API of docs/business.md and the webhooks of
//! docs/webhooks.md. `tests/it/merchants.rs` runs it against a real mxpay and Synapse.
//!
//! ```text
//! cargo run --example merchant -- --api http://127.0.0.1:8009 --key "$MERCHANT_KEY" \
//!     --secret "$WEBHOOK_SECRET" --room '!abc:localhost' --payer @bob:localhost \
//!     --amount 12.00 --currency EUR --refund 2.00 --listen 127.0.0.1:8099
//! ```
//!
//! It prints one line per step (`invoice <id> created`, `paid <id> transfer <transfer>`,
//! `refunded <amount> of <id>`, `refund.succeeded <id>`) and exits 0 when all are done, 1 on
//! any error, 2 when a step does not happen within `--wait-s`.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use clap::Parser;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::mpsc;

/// How old a signature's timestamp may be, seconds (replayed deliveries are refused).
const SIGNATURE_TOLERANCE_S: u64 = 300;
/// The largest webhook body this merchant reads.
const WEBHOOK_BODY_MAX_BYTES: usize = 64 * 1024;

#[derive(Parser)]
struct Args {
    /// mxpay's base URL (the appservice listener).
    #[arg(long)]
    api: String,
    /// The merchant API key (`mxpay admin merchant key create`).
    #[arg(long, env = "MERCHANT_KEY", hide_env_values = true)]
    key: String,
    /// The merchant's webhook signing secret (shown by `mxpay admin merchant create`).
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    secret: String,
    /// The encrypted room to post the invoice in.
    #[arg(long)]
    room: String,
    /// Who is asked to pay (omit: anyone in the room).
    #[arg(long)]
    payer: Option<String>,
    #[arg(long)]
    amount: String,
    #[arg(long)]
    currency: String,
    /// How much to refund once paid.
    #[arg(long)]
    refund: String,
    /// Where this merchant receives webhooks (the merchant's webhook URL points here).
    #[arg(long)]
    listen: SocketAddr,
    /// The order this invoice is for.
    #[arg(long, default_value = "order-1")]
    order_ref: String,
    /// How long each step may take, seconds.
    #[arg(long, default_value_t = 300)]
    wait_s: u64,
}

/// A webhook that passed the signature check.
struct Verified {
    event_type: String,
    data: Value,
}

#[derive(Clone)]
struct Receiver {
    secret: String,
    events: mpsc::Sender<Verified>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let code = match run(&args).await {
        Ok(()) => 0,
        Err(Failure::TimedOut(what)) => {
            eprintln!("merchant: {what} did not happen within {} s", args.wait_s);
            2
        }
        Err(Failure::Error(why)) => {
            eprintln!("merchant: {why}");
            1
        }
    };
    std::process::exit(code);
}

enum Failure {
    TimedOut(&'static str),
    Error(String),
}

fn error(why: impl std::fmt::Display) -> Failure {
    Failure::Error(why.to_string())
}

async fn run(args: &Args) -> Result<(), Failure> {
    let (tx, mut events) = mpsc::channel(16);
    let receiver = Receiver {
        secret: args.secret.clone(),
        events: tx,
    };
    let app = Router::new()
        .route("/webhook", post(webhook))
        .layer(axum::extract::DefaultBodyLimit::max(WEBHOOK_BODY_MAX_BYTES))
        .with_state(receiver);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| error(format!("listen on {}: {e}", args.listen)))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(error)?;
    let api = format!("{}/_mxpay/merchant/v1", args.api.trim_end_matches('/'));
    let wait = Duration::from_secs(args.wait_s);

    let mut invoice = json!({
        "room_id": args.room,
        "amount": args.amount,
        "currency": args.currency,
        "description": "Example order",
        "order_ref": args.order_ref,
        "idempotency_key": format!("invoice-{}", args.order_ref),
    });
    if let Some(payer) = &args.payer {
        invoice["payer"] = json!(payer);
    }
    let created = call(&http, &args.key, &format!("{api}/invoices"), &invoice).await?;
    let invoice_id = created["invoice_id"]
        .as_str()
        .ok_or_else(|| error(format!("no invoice id in {created}")))?
        .to_owned();
    println!("invoice {invoice_id} created");

    let paid = next_event(&mut events, wait, "invoice.paid", &invoice_id).await?;
    println!(
        "paid {invoice_id} transfer {}",
        paid.data["invoice"]["transfer_id"].as_str().unwrap_or("?")
    );

    let refund = json!({
        "amount": args.refund,
        "reason": "requested_by_customer",
        "idempotency_key": format!("refund-{}", args.order_ref),
    });
    call(
        &http,
        &args.key,
        &format!("{api}/invoices/{invoice_id}/refunds"),
        &refund,
    )
    .await?;
    println!("refunded {} of {invoice_id}", args.refund);

    next_event(&mut events, wait, "refund.succeeded", &invoice_id).await?;
    println!("refund.succeeded {invoice_id}");
    Ok(())
}

/// POSTs `body` with the merchant key; a non-2xx answer is an error naming mxpay's errcode.
async fn call(
    http: &reqwest::Client,
    key: &str,
    url: &str,
    body: &Value,
) -> Result<Value, Failure> {
    let response = http
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .map_err(|e| error(format!("POST {url}: {e}")))?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(error(format!("POST {url}: {status} {answer}")));
    }
    Ok(answer)
}

/// Waits for a verified webhook of `event_type` about `invoice_id` (others are skipped:
/// delivery order is not promised).
async fn next_event(
    events: &mut mpsc::Receiver<Verified>,
    wait: Duration,
    event_type: &'static str,
    invoice_id: &str,
) -> Result<Verified, Failure> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| Failure::TimedOut(event_type))?
            .ok_or_else(|| error("the webhook receiver stopped"))?;
        if event.event_type == event_type && event.data["invoice"]["invoice_id"] == invoice_id {
            return Ok(event);
        }
    }
}

/// The webhook endpoint: answers 400 to anything whose signature does not check, 200 to the
/// rest (an event seen twice is answered 200 again: deliveries may repeat).
async fn webhook(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = headers
        .get("Mxpay-Signature")
        .and_then(|value| value.to_str().ok());
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if !signature_ok(receiver.secret.as_bytes(), header, &body, now_s) {
        eprintln!("merchant: refused a webhook with a bad signature");
        return StatusCode::BAD_REQUEST;
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let verified = Verified {
        event_type: event["type"].as_str().unwrap_or_default().to_owned(),
        data: event["data"].clone(),
    };
    let _ = receiver.events.send(verified).await;
    StatusCode::OK
}

/// `Mxpay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`: the MAC must
/// match (compared in constant time) and `t` be within the tolerance of now.
fn signature_ok(secret: &[u8], header: Option<&str>, body: &[u8], now_s: u64) -> bool {
    let Some(header) = header else {
        return false;
    };
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<u64>().ok(),
            Some(("v1", v1)) => signatures.extend(hex::decode(v1).ok()),
            _ => {}
        }
    }
    let Some(t) = timestamp else {
        return false;
    };
    if now_s.abs_diff(t) > SIGNATURE_TOLERANCE_S {
        return false;
    }
    signatures.iter().any(|signature| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
            return false;
        };
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(signature).is_ok()
    })
}
