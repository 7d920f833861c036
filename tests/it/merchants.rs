//! Merchants, their API keys, invoices and refunds, in process: the admin and merchant
//! routers over a real ledger and real sled stores, driven with `tower::ServiceExt::oneshot`.
//! The room side of an invoice (the bot posting it, the customer paying it with a PIN) is
//! stood in for by a recording poster and a ledger transfer to the merchant's account.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use matrix_sdk::ruma::OwnedUserId;
use mxpay::admin::token::{AdminKey, Scope, TokenAuthority};
use mxpay::admin::AdminState;
use mxpay::clock::{ManualClock, SharedClock};
use mxpay::ledger::{
    AccountId, CurrencySpec, Ledger, LedgerSettings, Owner, TransferId, TransferRequest,
};
use mxpay::merchants::api::{InvoicePoster, MerchantApi};
use mxpay::merchants::invoice::Invoice;
use mxpay::merchants::{Merchant, MerchantError, MerchantEvents, MerchantId};
use serde_json::{json, Value};

use crate::support;
use tower::ServiceExt as _;

mod rooms;

const SECRET: &[u8] = b"merchant-test-secret-0123456789abcdef";
const T0_MS: u64 = 1_795_000_000_000;
const BOB: &str = "@bob:example.org";

/// Posts nothing; answers an event id derived from the invoice, and counts calls.
#[derive(Debug, Default)]
struct FakePoster(std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl InvoicePoster for FakePoster {
    async fn post(&self, _: &Merchant, invoice: &Invoice) -> Result<String, MerchantError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(format!("$posted-{}", invoice.invoice_id))
    }
}

/// Records every event emitted.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<(String, String, Value)>>);

impl MerchantEvents for Recorder {
    fn emit(
        &self,
        merchant: &MerchantId,
        event_type: &'static str,
        event_id: &str,
        payload: Value,
    ) -> Result<(), MerchantError> {
        self.0.lock().unwrap().push((
            format!("{merchant} {event_type}"),
            event_id.to_owned(),
            payload,
        ));
        Ok(())
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    ledger: Ledger,
    admin: Router,
    merchant: Router,
    api: Arc<MerchantApi>,
    poster: Arc<FakePoster>,
    events: Arc<Recorder>,
    ops: String,
    audit: Arc<mxpay::audit::AuditLog>,
}

impl Harness {
    fn new() -> Self {
        Self::with_events(None)
    }

    /// [`Harness::new`] with `events` instead of the recorder (which then records nothing).
    fn with_events(events: Option<Arc<dyn MerchantEvents>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock: SharedClock = Arc::new(ManualClock::new(T0_MS));
        let settings = LedgerSettings {
            currencies: vec![CurrencySpec {
                code: "EUR".to_owned(),
                exponent: 2,
                max_transfer: None,
                max_per_24h: None,
            }],
        };
        let ledger = Ledger::open(&dir.path().join("ledger"), &settings, clock.clone()).unwrap();
        let key = AdminKey::Hs256 {
            secret: SECRET.to_vec(),
        };
        let state = Arc::new(
            AdminState::new(
                &key,
                Vec::new(),
                300,
                dir.path(),
                ledger.clone(),
                clock.clone(),
            )
            .unwrap(),
        );
        let audit = state.audit().clone();
        let api = Arc::new(
            MerchantApi::new(
                state.merchants().clone(),
                state.merchant_keys().clone(),
                ledger.clone(),
                clock.clone(),
            )
            .unwrap()
            .with_audit(audit.clone(), state.refusal_gate().clone()),
        );
        let poster = Arc::new(FakePoster::default());
        let recorder = Arc::new(Recorder::default());
        api.set_poster(poster.clone());
        api.set_events(events.unwrap_or_else(|| recorder.clone()));
        let ops = TokenAuthority::new(&key, clock)
            .unwrap()
            .mint("ops", [Scope::Merchants].into_iter().collect(), 3600)
            .unwrap();
        Self {
            _dir: dir,
            ledger,
            admin: mxpay::admin::router(Some(state)),
            merchant: mxpay::merchants::api::routes(Some(api.clone())).0,
            api,
            poster,
            events: recorder,
            ops,
            audit,
        }
    }

    async fn send(
        router: &Router,
        method: &str,
        uri: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        Self::send(
            &self.admin,
            method,
            &format!("/_mxpay/admin/v1{path}"),
            &self.ops,
            body,
        )
        .await
    }

    async fn merchant(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        Self::send(
            &self.merchant,
            method,
            &format!("/_mxpay/merchant/v1{path}"),
            key,
            body,
        )
        .await
    }

    /// Registers merchant `id` (Matrix user `@id:example.org`) and mints it a key with every
    /// scope. Returns the key and its id.
    async fn merchant_with_key(&self, id: &str) -> (String, String) {
        let (status, created) = self
            .admin(
                "POST",
                "/merchants",
                Some(json!({
                    "merchant_id": id, "user_id": format!("@{id}:example.org"),
                    "display_name": format!("{id} shop"), "webhook_url": "https://shop.example/hook",
                })),
            )
            .await;
        assert_eq!(status, 200, "{created}");
        assert!(created["webhook_secret"]
            .as_str()
            .unwrap()
            .starts_with("whsec_"));
        let (status, key) = self
            .admin(
                "POST",
                &format!("/merchants/{id}/keys"),
                Some(json!({ "scopes": ["invoices", "refunds", "read"] })),
            )
            .await;
        assert_eq!(status, 200, "{key}");
        (
            key["key"].as_str().unwrap().to_owned(),
            key["key_id"].as_str().unwrap().to_owned(),
        )
    }

    /// What the customer's payment does in the ledger (funded, then paid to the merchant),
    /// then the payment flow's report that the invoice is paid.
    async fn pay(&self, invoice: &Value, merchant: &str) -> TransferId {
        let eur = |minor| self.ledger.amount_from_minor(minor, "EUR").unwrap();
        self.ledger
            .create_transfer(TransferRequest {
                reference: 0,
                id: TransferId(7),
                debit: Owner::Issuer,
                credit: Owner::user(BOB),
                amount: eur(10_000),
                memo: Vec::new(),
            })
            .await
            .unwrap();
        let paid = TransferId(8);
        self.ledger
            .create_transfer(TransferRequest {
                reference: 0,
                id: paid,
                debit: Owner::user(BOB),
                credit: Owner::merchant(merchant),
                amount: eur(450),
                memo: Vec::new(),
            })
            .await
            .unwrap();
        let bob: OwnedUserId = BOB.try_into().unwrap();
        self.api
            .record_paid(invoice["invoice_id"].as_str().unwrap(), bob, paid)
            .unwrap();
        paid
    }

    /// As [`Harness::pay`], with the paying transfer's id and ledger reference chosen: the
    /// request's reference as the payment flow sets it now, or 0 as it did before
    /// references existed.
    async fn pay_as(
        &self,
        invoice: &Value,
        merchant: &str,
        paid: TransferId,
        reference: u128,
    ) -> TransferId {
        let eur = |minor| self.ledger.amount_from_minor(minor, "EUR").unwrap();
        self.ledger
            .create_transfer(TransferRequest {
                reference: 0,
                id: TransferId(paid.0 + 1_000),
                debit: Owner::Issuer,
                credit: Owner::user(BOB),
                amount: eur(450),
                memo: Vec::new(),
            })
            .await
            .unwrap();
        self.ledger
            .create_transfer(TransferRequest {
                reference,
                id: paid,
                debit: Owner::user(BOB),
                credit: Owner::merchant(merchant),
                amount: eur(450),
                memo: Vec::new(),
            })
            .await
            .unwrap();
        let bob: OwnedUserId = BOB.try_into().unwrap();
        self.api
            .record_paid(invoice["invoice_id"].as_str().unwrap(), bob, paid)
            .unwrap();
        paid
    }

    async fn available(&self, owner: Owner) -> i128 {
        let account = AccountId {
            owner,
            currency: mxpay::ledger::CurrencyCode::new("EUR").unwrap(),
        };
        self.ledger
            .account(&account)
            .await
            .unwrap()
            .map_or(0, |v| v.balances.available_minor())
    }
}

fn invoice_body(key: &str) -> Value {
    json!({
        "room_id": "!shop:example.org", "payer": BOB, "amount": "4.50", "currency": "EUR",
        "description": "Flat white", "order_ref": "order-17", "idempotency_key": key,
    })
}

#[tokio::test]
async fn an_invoice_is_made_paid_and_partly_refunded_but_never_above_what_was_paid() {
    let h = Harness::new();
    let (key, _) = h.merchant_with_key("cafe").await;
    let (status, invoice) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k1")))
        .await;
    assert_eq!(status, 200, "{invoice}");
    assert_eq!(invoice["status"], "open");
    assert_eq!(invoice["amount"], "4.50");
    let id = invoice["invoice_id"].as_str().unwrap().to_owned();
    assert_eq!(invoice["request_event_id"], format!("$posted-{id}"));

    let paid = h.pay(&invoice, "cafe").await;
    let (status, shown) = h
        .merchant("GET", &format!("/invoices/{id}"), &key, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(shown["status"], "paid");
    assert_eq!(shown["paid_by"], BOB);
    assert_eq!(shown["transfer_id"], format!("{:032x}", paid.0));
    assert_eq!(h.available(Owner::merchant("cafe")).await, 450);

    // Partial refund: from the merchant's wallet back to the payer.
    let refund = json!({ "amount": "1.50", "reason": "cold", "idempotency_key": "r1" });
    let (status, after) = h
        .merchant(
            "POST",
            &format!("/invoices/{id}/refunds"),
            &key,
            Some(refund.clone()),
        )
        .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["amount_refunded"], "1.50");
    assert_eq!(h.available(Owner::merchant("cafe")).await, 300);
    assert_eq!(h.available(Owner::user(BOB)).await, 10_000 - 450 + 150);
    // The same refund again (a retry): answered, never paid twice.
    let (status, again) = h
        .merchant(
            "POST",
            &format!("/invoices/{id}/refunds"),
            &key,
            Some(refund),
        )
        .await;
    assert_eq!(
        (status.as_u16(), &again["amount_refunded"]),
        (200, &json!("1.50"))
    );
    assert_eq!(h.available(Owner::user(BOB)).await, 10_000 - 450 + 150);
    // Above what remains: refused with its reason, nothing moves.
    let (status, over) = h
        .merchant(
            "POST",
            &format!("/invoices/{id}/refunds"),
            &key,
            Some(json!({ "amount": "3.01", "reason": "all", "idempotency_key": "r2" })),
        )
        .await;
    assert_eq!(
        (status.as_u16(), over["reason"].as_str()),
        (409, Some("refund_above_remaining")),
        "{over}"
    );
    assert_eq!(h.available(Owner::merchant("cafe")).await, 300);

    let events = h.events.0.lock().unwrap().clone();
    let kinds: Vec<&str> = events.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(kinds, ["cafe invoice.paid", "cafe refund.succeeded"]);
    assert_eq!(events[1].2["invoice"]["amount_refunded"], "1.50");
    // The paid report again (re-fed after a crash): nothing emitted twice.
    h.api
        .record_paid(&id, BOB.try_into().unwrap(), paid)
        .unwrap();
    assert_eq!(h.events.0.lock().unwrap().len(), 2);
}

/// An invoice's payment (made with its request's ledger reference, as the payment flow does)
/// and its refunds share that reference: the ledger lists them together and `GET
/// /invoices/{id}` shows them. An invoice paid before references existed (its payment has
/// none) is refunded as before, its refund with no reference either, also when the refund
/// was made in the ledger before the upgrade and is retried after it; `GET` still lists its
/// transfers (by id).
#[tokio::test]
async fn an_invoices_payment_and_refunds_share_its_reference_and_older_payments_still_refund() {
    let h = Harness::new();
    let (key, _) = h.merchant_with_key("cafe").await;
    let (_, invoice) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k1")))
        .await;
    let id = invoice["invoice_id"].as_str().unwrap().to_owned();
    let reference =
        mxpay::requests::ledger_reference(invoice["request_event_id"].as_str().unwrap());
    let paid = h.pay_as(&invoice, "cafe", TransferId(8), reference).await;
    let refund = json!({ "amount": "1.50", "reason": "cold", "idempotency_key": "r1" });
    let path = format!("/invoices/{id}/refunds");
    let (status, after) = h.merchant("POST", &path, &key, Some(refund.clone())).await;
    assert_eq!(status, 200, "{after}");
    let refund_id = after["refunds"][0]["transfer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = h
        .ledger
        .transfers_by_reference(reference, 10)
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|t| t.id.to_string()).collect::<Vec<_>>(),
        [paid.to_string(), refund_id.clone()],
        "the payment and its refund under the invoice's reference"
    );
    // A retry is answered, never paid twice, and adds nothing under the reference.
    let (status, _) = h.merchant("POST", &path, &key, Some(refund)).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.ledger
            .transfers_by_reference(reference, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    let (status, shown) = h
        .merchant("GET", &format!("/invoices/{id}"), &key, None)
        .await;
    assert_eq!(status, 200, "{shown}");
    let shown = &shown["transfers"];
    assert_eq!(shown.as_array().map(Vec::len), Some(2), "{shown}");
    assert_eq!(
        (&shown[0]["kind"], &shown[0]["status"], &shown[0]["amount"]),
        (&json!("payment"), &json!("posted"), &json!("4.50"))
    );
    assert_eq!(shown[0]["transfer_id"], paid.to_string());
    assert_eq!(
        (
            &shown[1]["kind"],
            &shown[1]["amount"],
            &shown[1]["refund_of"]
        ),
        (&json!("refund"), &json!("1.50"), &json!(paid.to_string()))
    );

    // Paid before references existed: its refund has none, and one the ledger made before
    // the upgrade (a crash before the invoice recorded it) is answered when retried after
    // it, not refused as a retry with another reference.
    let (_, older) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k2")))
        .await;
    let older_id = older["invoice_id"].as_str().unwrap().to_owned();
    let older_paid = h.pay_as(&older, "cafe", TransferId(9), 0).await;
    let before_upgrade = mxpay::merchants::invoice::refund_transfer_id(&older_id, "r1");
    h.ledger
        .create_refund_result(
            TransferRequest {
                reference: 0,
                id: before_upgrade,
                debit: Owner::merchant("cafe"),
                credit: Owner::user(BOB),
                amount: h.ledger.amount_from_minor(100, "EUR").unwrap(),
                memo: format!("refund {older_id} order-17: cold").into_bytes(),
            },
            older_paid,
            None,
        )
        .await
        .unwrap();
    let (status, after) = h
        .merchant(
            "POST",
            &format!("/invoices/{older_id}/refunds"),
            &key,
            Some(json!({ "amount": "1.00", "reason": "cold", "idempotency_key": "r1" })),
        )
        .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["amount_refunded"], "1.00");
    let made = h.ledger.transfer(before_upgrade).await.unwrap().unwrap();
    assert_eq!(made.reference, 0);
    let (status, after) = h
        .merchant(
            "POST",
            &format!("/invoices/{older_id}/refunds"),
            &key,
            Some(json!({ "amount": "0.50", "reason": "late", "idempotency_key": "r2" })),
        )
        .await;
    assert_eq!(
        (status.as_u16(), &after["amount_refunded"]),
        (200, &json!("1.50"))
    );
    let second = after["refunds"][1]["transfer_id"].as_str().unwrap();
    let second = TransferId(u128::from_str_radix(second, 16).unwrap());
    assert_eq!(
        h.ledger.transfer(second).await.unwrap().unwrap().reference,
        0
    );
    let (_, shown) = h
        .merchant("GET", &format!("/invoices/{older_id}"), &key, None)
        .await;
    let kinds: Vec<_> = shown["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["kind"].as_str().unwrap(), t["amount"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("payment", "4.50"), ("refund", "1.00"), ("refund", "0.50")]
    );
}

#[tokio::test]
async fn idempotency_keys_replay_the_same_body_and_refuse_another() {
    let h = Harness::new();
    let (key, _) = h.merchant_with_key("cafe").await;
    let (_, first) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k1")))
        .await;
    let (status, replay) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k1")))
        .await;
    assert_eq!((status.as_u16(), &replay), (200, &first));
    assert_eq!(
        h.poster.0.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "posted once"
    );
    let mut other = invoice_body("k1");
    other["amount"] = json!("5.00");
    let (status, conflict) = h.merchant("POST", "/invoices", &key, Some(other)).await;
    assert_eq!(
        (status.as_u16(), conflict["reason"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    let (_, page) = h.merchant("GET", "/invoices?status=open", &key, None).await;
    assert_eq!(page["invoices"].as_array().unwrap().len(), 1);
}

/// Every merchant API call that changes something, and every refused call, is a line of the
/// operator's audit log (who: the key's merchant and id; what; on what; the result); reads
/// are not. A flood of bad keys meets the admin API's refused-call limits (shared): 429
/// `rate_limited` without a line of its own, then one line counting them.
#[tokio::test]
async fn merchant_calls_are_audited_and_a_flood_of_bad_keys_is_limited() {
    let h = Harness::new();
    let (key, key_id) = h.merchant_with_key("cafe").await;
    let lines_before = h.audit.page(None, 1000).unwrap().len();
    let (status, invoice) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("a1")))
        .await;
    assert_eq!(status, 200, "{invoice}");
    let id = invoice["invoice_id"].as_str().unwrap().to_owned();
    let (status, _) = h
        .merchant("GET", &format!("/invoices/{id}"), &key, None)
        .await;
    assert_eq!(status, 200);
    let (status, refused) = h
        .merchant(
            "POST",
            &format!("/invoices/{id}/refunds"),
            &key,
            Some(json!({ "amount": "1.00", "reason": "x", "idempotency_key": "r" })),
        )
        .await;
    assert_eq!(status.as_u16(), 409, "{refused}");
    let lines = h.audit.page(None, 1000).unwrap();
    let new: Vec<_> = lines[..lines.len() - lines_before].iter().rev().collect();
    let shown: Vec<(&str, Option<&str>, &str, &str, &str)> = new
        .iter()
        .map(|e| {
            (
                e.actor.as_str(),
                e.token_id.as_deref(),
                e.action.as_str(),
                e.target.as_str(),
                e.result.as_str(),
            )
        })
        .collect();
    let refused_reason = refused["reason"].as_str().unwrap();
    assert_eq!(
        shown,
        vec![
            (
                "merchant:cafe",
                Some(key_id.as_str()),
                "merchant.invoice.create",
                id.as_str(),
                "ok"
            ),
            (
                "merchant:cafe",
                Some(key_id.as_str()),
                "merchant.invoice.refund",
                id.as_str(),
                refused_reason
            ),
        ],
        "the read is not audited"
    );

    // Bad keys: each refusal is audited until the overall limit (60 a minute by default;
    // in process there is no peer address, so only the overall limit applies), then 429.
    let mut limited = None;
    for attempt in 0..100 {
        let (status, body) = h
            .merchant("GET", "/invoices", &format!("not-a-key-{attempt}"), None)
            .await;
        if status.as_u16() == 429 {
            limited = Some((attempt, body));
            break;
        }
        assert_eq!(
            (status.as_u16(), body["reason"].as_str()),
            (401, Some("key_malformed"))
        );
    }
    let (admitted, body) = limited.expect("a flood of bad keys is limited");
    assert_eq!(body["reason"], "rate_limited", "{body}");
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED");
    assert!(
        body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{body}"
    );
    let before_flood = lines_before + 2;
    let lines = h.audit.page(None, 1000).unwrap();
    assert_eq!(
        lines.len(),
        before_flood + admitted,
        "one line per admitted refusal"
    );
    assert!(lines[0].actor == "unauthenticated" && lines[0].result == "key_malformed");
    // The next audited call first writes how many were answered 429 without a line.
    let (status, _) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("a2")))
        .await;
    assert_eq!(status, 200);
    let lines = h.audit.page(None, 2).unwrap();
    assert_eq!(lines[1].action, "refusals.limited");
    assert!(lines[1].target.starts_with("1 refused"), "{:?}", lines[1]);
    assert_eq!(lines[0].action, "merchant.invoice.create");
    // No key or secret is in the log.
    let all = serde_json::to_string(&h.audit.page(None, 1000).unwrap()).unwrap();
    assert!(!all.contains(&key), "the key itself is never written");
}

#[tokio::test]
async fn a_key_reaches_only_its_own_merchant_and_admin_tokens_are_no_keys() {
    let h = Harness::new();
    let (a_key, _) = h.merchant_with_key("cafe").await;
    let (b_key, b_key_id) = h.merchant_with_key("shop").await;
    let (_, invoice) = h
        .merchant("POST", "/invoices", &a_key, Some(invoice_body("k1")))
        .await;
    let id = invoice["invoice_id"].as_str().unwrap();
    // B's key on A's invoice: as if it did not exist.
    let (status, body) = h
        .merchant("GET", &format!("/invoices/{id}"), &b_key, None)
        .await;
    assert_eq!(
        (status.as_u16(), body["reason"].as_str()),
        (404, Some("invoice_unknown"))
    );
    let (status, _) = h
        .merchant(
            "POST",
            &format!("/invoices/{id}/refunds"),
            &b_key,
            Some(json!({ "reason": "x", "idempotency_key": "r" })),
        )
        .await;
    assert_eq!(status, 404);
    let (_, page) = h.merchant("GET", "/invoices", &b_key, None).await;
    assert_eq!(page["invoices"], json!([]));
    // The admin token is not a merchant key.
    let (status, body) = h.merchant("GET", "/invoices", &h.ops.clone(), None).await;
    assert_eq!(
        (status.as_u16(), body["reason"].as_str()),
        (401, Some("key_malformed"))
    );
    // A revoked key is refused.
    let (status, _) = h
        .admin(
            "POST",
            &format!("/merchants/shop/keys/{b_key_id}/revoke"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = h.merchant("GET", "/invoices", &b_key, None).await;
    assert_eq!(
        (status.as_u16(), body["reason"].as_str()),
        (401, Some("key_revoked"))
    );
    // A disabled merchant is refused.
    let (status, _) = h.admin("POST", "/merchants/cafe/disable", None).await;
    assert_eq!(status, 200);
    let (status, body) = h
        .merchant("POST", "/invoices", &a_key, Some(invoice_body("k2")))
        .await;
    assert_eq!(
        (status.as_u16(), body["reason"].as_str()),
        (403, Some("merchant_disabled"))
    );
}

#[tokio::test]
async fn bad_invoice_bodies_are_refused_before_anything_is_posted() {
    let h = Harness::new();
    let (key, _) = h.merchant_with_key("cafe").await;
    for (field, value, reason) in [
        ("amount", json!("4.505"), "amount_invalid"),
        ("currency", json!("XXX"), "currency_unknown"),
        ("room_id", json!("shop"), "room_id_invalid"),
        ("payer", json!("bob"), "payer_invalid"),
    ] {
        let mut body = invoice_body(&format!("bad-{field}"));
        body[field] = value;
        let (status, answer) = h.merchant("POST", "/invoices", &key, Some(body)).await;
        assert_eq!(
            (status.as_u16(), answer["reason"].as_str()),
            (400, Some(reason)),
            "{field}"
        );
    }
    let big = json!({ "description": "x".repeat(20_000) });
    let (status, _) = h.merchant("POST", "/invoices", &key, Some(big)).await;
    assert_eq!(status, 413);
    assert_eq!(h.poster.0.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn openapi_document_covers_every_merchant_route_and_each_needs_a_key() {
    let h = Harness::new();
    let doc: Value = serde_json::from_str(mxpay::admin::api::OPENAPI_JSON).unwrap();
    let (_, routes) = mxpay::merchants::api::routes(Some(h.api.clone()));
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in &routes {
        assert!(
            paths.get(path).and_then(|item| item.get(*method)).is_some(),
            "{method} {path} is mounted but not in docs/openapi.json"
        );
    }
    let mut documented = 0;
    for (path, item) in paths
        .iter()
        .filter(|(p, _)| p.starts_with("/_mxpay/merchant/"))
    {
        for (method, op) in item.as_object().unwrap() {
            documented += 1;
            assert!(
                routes.iter().any(|(m, p)| m == method && p == path),
                "{method} {path} is documented but not mounted"
            );
            assert!(op.get("x-mxpay-scope").is_some(), "{method} {path}");
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(path.replace("{invoice_id}", "inv_1"))
                .body(Body::empty())
                .unwrap();
            let response = h.merchant.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path}");
        }
    }
    assert_eq!(documented, routes.len());
}

#[tokio::test]
async fn invoices_are_listed_in_pages_and_a_cursor_serves_only_its_merchant() {
    let h = Harness::new();
    let (a_key, _) = h.merchant_with_key("cafe").await;
    let (b_key, _) = h.merchant_with_key("shop").await;
    for i in 0..3 {
        let (status, _) = h
            .merchant(
                "POST",
                "/invoices",
                &a_key,
                Some(invoice_body(&format!("k{i}"))),
            )
            .await;
        assert_eq!(status, 200);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let path = match &cursor {
            Some(c) => format!("/invoices?limit=2&cursor={c}"),
            None => "/invoices?limit=2".to_owned(),
        };
        let (status, page) = h.merchant("GET", &path, &a_key, None).await;
        assert_eq!(status, 200, "{page}");
        for invoice in page["invoices"].as_array().unwrap() {
            seen.push(invoice["invoice_id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3);
    // A's cursor presented by B: refused, nothing of A's shown.
    let (_, first) = h.merchant("GET", "/invoices?limit=1", &a_key, None).await;
    let a_cursor = first["next"].as_str().unwrap();
    let (status, body) = h
        .merchant("GET", &format!("/invoices?cursor={a_cursor}"), &b_key, None)
        .await;
    assert_eq!(
        (status.as_u16(), body["reason"].as_str()),
        (400, Some("cursor_invalid"))
    );
    let (_, none) = h
        .merchant("GET", "/invoices?status=paid", &a_key, None)
        .await;
    assert_eq!(none["invoices"], json!([]));
}

/// Runs `mxpay admin` with `args` and `token`; (success, stdout, stderr).
async fn admin_cli(args: &[&str], token: &str) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxpay"));
    command
        .arg("admin")
        .args(args)
        .env("MXPAY_ADMIN_TOKEN", token)
        .kill_on_drop(true);
    let output = tokio::time::timeout(crate::support::timeout(), command.output())
        .await
        .unwrap_or_else(|_| panic!("mxpay admin {args:?} did not finish"))
        .expect("run mxpay admin");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The real binary over real Synapse: a merchant registered and keyed with `mxpay admin
/// merchant`, its key accepted by the merchant API of the running mxpay, an admin token and a
/// revoked key refused there.
#[tokio::test]
async fn the_running_mxpay_registers_merchants_and_serves_the_merchant_api() {
    use crate::support::{self, MxpayProcess, SlotKind};
    let mut lease = support::synapse()
        .lease(SlotKind::Normal, "merchant-cli")
        .await;
    let (yaml, secret) = crate::admin::admin_yaml(&lease.dir);
    lease.config.extra_yaml = yaml;
    lease.write_config();
    let mxpay = MxpayProcess::start(&lease).await;
    let config = lease.config_path();
    let config = config.to_str().unwrap();
    let ops = crate::admin::mint(&secret, &[Scope::Merchants]);

    let (ok, out, err) = admin_cli(
        &[
            "-c",
            config,
            "merchant",
            "create",
            "@cafe:localhost",
            "--name",
            "Corner Cafe",
            "--webhook-url",
            "http://127.0.0.1:9/hook",
            "--id",
            "cafe",
        ],
        &ops,
    )
    .await;
    assert!(ok, "merchant create failed: {err}");
    assert!(
        out.contains("webhook signing secret (shown only now): whsec_"),
        "{out}"
    );
    let (ok, out, err) = admin_cli(
        &[
            "-c",
            config,
            "merchant",
            "key",
            "create",
            "cafe",
            "--scope",
            "read,invoices",
        ],
        &ops,
    )
    .await;
    assert!(ok, "key create failed: {err}");
    let key = out.lines().next().unwrap().trim().to_owned();
    let key_id = out
        .lines()
        .find_map(|l| l.strip_prefix("key id: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();

    let client = reqwest::Client::new();
    let get = |token: String| {
        let client = client.clone();
        let url = format!("{}/_mxpay/merchant/v1/invoices", mxpay.url);
        async move {
            let response = client.get(url).bearer_auth(token).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, page) = get(key.clone()).await;
    assert_eq!((status, &page["invoices"]), (200, &json!([])), "{page}");
    let (status, body) = get(ops.clone()).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("key_malformed"))
    );

    let (ok, out, err) = admin_cli(&["-c", config, "merchant", "show", "cafe"], &ops).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("Corner Cafe") && out.contains(&key_id),
        "{out}"
    );
    let (ok, _, err) = admin_cli(
        &["-c", config, "merchant", "key", "revoke", "cafe", &key_id],
        &ops,
    )
    .await;
    assert!(ok, "{err}");
    let (status, body) = get(key).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("key_revoked"))
    );
}

/// Over real Synapse with real encrypted clients: bob's Matrix user is registered as merchant
/// `cafe`; alice pays bob with her PIN; the money lands in the merchant's wallet (not bob's
/// own) and the receipt names bob as the payee.
#[tokio::test]
async fn a_payment_to_a_merchants_matrix_user_goes_to_the_merchant_wallet() {
    use crate::payments::{scene, send_text, wait_bot_event, wait_notice, wait_redacted, PIN};
    let s = scene("merchant-pay", 120_000, "100.00").await;
    let (alice, bob, bot, dm, room) = (&s.alice, &s.bob, &s.bot, &s.dm, &s.room);
    let bob_id = bob.user.user_id.to_string();
    let ops = crate::admin::mint(&s.admin_key, &[Scope::Merchants, Scope::Read]);
    let client = reqwest::Client::new();
    let admin = |path: &str| format!("{}/_mxpay/admin/v1{path}", s.mxpay.url);
    let created = client
        .post(admin("/merchants"))
        .bearer_auth(&ops)
        .json(&json!({
            "merchant_id": "cafe", "user_id": bob_id, "display_name": "Bob's Cafe",
            "webhook_url": "http://127.0.0.1:9/hook",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200, "{}", created.text().await.unwrap());
    wait_notice(alice, dm, bot, "topped up with 100.00 EUR").await;

    send_text(alice, room, &format!("!pay {bob_id} 4.50 EUR flat white")).await;
    wait_notice(alice, dm, bot, "Confirm paying 4.50 EUR").await;
    let pin = send_text(alice, dm, PIN).await;
    wait_redacted(alice, dm, &pin).await;
    let receipt = wait_bot_event(alice, room, bot, "org.mxpay.receipt", |c| {
        c["status"] == "completed"
    })
    .await;
    assert_eq!(receipt.content()["payee"], bob_id.as_str());
    assert_eq!(receipt.content()["amount"], "4.50");

    let get = |path: String| {
        let client = client.clone();
        let ops = ops.clone();
        async move {
            client
                .get(path)
                .bearer_auth(ops)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let merchant = get(admin("/merchants/cafe")).await;
    assert_eq!(merchant["accounts"][0]["available"], "4.50", "{merchant}");
    let bob_accounts = get(admin(&format!(
        "/users/{}/accounts",
        bob_id.replace('@', "%40").replace(':', "%3A")
    )))
    .await;
    assert!(
        bob_accounts["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["available"] == "0.00"),
        "{bob_accounts}"
    );
}

/// Over real Synapse with real encrypted clients: merchant `cafe` (bob's Matrix user) invoices
/// alice through the merchant API; the bot posts it in the encrypted room; alice pays it by
/// replying `!pay` and her PIN; the invoice shows paid with its transfer, the money is in the
/// merchant's wallet; a partial refund goes back to alice, a larger one is refused; an invoice
/// for someone not in the room, or in a room that is not encrypted, is refused.
#[tokio::test]
async fn an_invoice_from_the_api_is_paid_in_the_room_with_a_pin_and_refunded_in_part() {
    use crate::payments::{scene, send_text, wait_notice, wait_receipt, PIN};
    let s = scene("merchant-invoice", 120_000, "100.00").await;
    let (alice, bob, bot, dm, room) = (&s.alice, &s.bob, &s.bot, &s.dm, &s.room);
    let alice_id = alice.user.user_id.to_string();
    let bob_id = bob.user.user_id.to_string();
    let ops = crate::admin::mint(&s.admin_key, &[Scope::Merchants]);
    let client = reqwest::Client::new();
    let call = |method: reqwest::Method, url: String, token: String, body: Option<Value>| {
        let client = client.clone();
        async move {
            let mut request = client.request(method, url).bearer_auth(token);
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
    };
    let admin = |path: &str| format!("{}/_mxpay/admin/v1{path}", s.mxpay.url);
    let api = |path: &str| format!("{}/_mxpay/merchant/v1{path}", s.mxpay.url);
    use reqwest::Method;
    let (status, body) = call(
        Method::POST,
        admin("/merchants"),
        ops.clone(),
        Some(json!({
            "merchant_id": "cafe", "user_id": bob_id, "display_name": "Bob's Cafe",
            "webhook_url": "http://127.0.0.1:9/hook",
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = call(
        Method::POST,
        admin("/merchants/cafe/keys"),
        ops.clone(),
        Some(json!({ "scopes": ["invoices", "refunds", "read"] })),
    )
    .await;
    let key = key["key"].as_str().unwrap().to_owned();
    wait_notice(alice, dm, bot, "topped up with 100.00 EUR").await;

    // Payer not in the room: refused before anything is posted.
    let mut body = json!({
        "room_id": room.as_str(), "payer": alice_id, "amount": "4.50", "currency": "EUR",
        "description": "Flat white", "order_ref": "order-17", "idempotency_key": "inv-1",
    });
    let mut stranger = body.clone();
    stranger["payer"] = json!("@nobody:localhost");
    stranger["idempotency_key"] = json!("inv-stranger");
    let (status, refused) = call(Method::POST, api("/invoices"), key.clone(), Some(stranger)).await;
    assert_eq!(
        (status, refused["reason"].as_str()),
        (403, Some("payer_not_in_room")),
        "{refused}"
    );

    // A room without encryption (the bot joined it): refused.
    let plain = alice
        .create_room(support::RoomOptions {
            encrypted: false,
            invite: vec![bot.as_str().try_into().unwrap()],
            ..Default::default()
        })
        .await
        .room_id()
        .to_owned();
    alice.wait_for_membership(&plain, bot, "join").await;
    let mut unencrypted = body.clone();
    unencrypted["room_id"] = json!(plain.as_str());
    unencrypted["idempotency_key"] = json!("inv-plain");
    let (status, refused) = call(
        Method::POST,
        api("/invoices"),
        key.clone(),
        Some(unencrypted),
    )
    .await;
    assert_eq!(
        (status, refused["reason"].as_str()),
        (403, Some("room_not_encrypted")),
        "{refused}"
    );

    let (status, invoice) = call(
        Method::POST,
        api("/invoices"),
        key.clone(),
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 200, "{invoice}");
    let id = invoice["invoice_id"].as_str().unwrap().to_owned();
    let notice = wait_notice(alice, room, bot, "4.50 EUR").await;
    let pay = alice.reply(room, notice.event_id(), "!pay").await;
    wait_notice(alice, dm, bot, "Confirm paying 4.50 EUR").await;
    send_text(alice, dm, PIN).await;
    let receipt = wait_receipt(alice, room, bot, &pay, "completed", None).await;
    assert_eq!(receipt.content()["payee"], bob_id.as_str());
    assert_eq!(
        receipt.content()["merchant"],
        json!({"merchant_id": "cafe", "display_name": "Bob's Cafe"})
    );
    assert_eq!(receipt.content()["order_ref"], "order-17");
    assert_eq!(receipt.content()["request_event_id"], format!("${id}"));
    // The receipt with its merchant fields matches the published schema.
    assert!(crate::payments::bot_events_match_schemas(alice, bot) >= 1);

    let shown = support::eventually("the invoice to show paid", || {
        let call = &call;
        let url = api(&format!("/invoices/{id}"));
        let key = key.clone();
        async move {
            let (_, shown) = call(Method::GET, url, key, None).await;
            (shown["status"] == "paid").then_some(shown)
        }
    })
    .await;
    assert_eq!(shown["paid_by"], alice_id.as_str());
    assert!(
        shown["transfer_id"].as_str().is_some_and(|t| t.len() == 32),
        "{shown}"
    );

    // Partial refund, then one above what remains.
    let (status, refunded) = call(
        Method::POST,
        api(&format!("/invoices/{id}/refunds")),
        key.clone(),
        Some(json!({ "amount": "1.50", "reason": "cold", "idempotency_key": "r1" })),
    )
    .await;
    assert_eq!(
        (status, &refunded["amount_refunded"]),
        (200, &json!("1.50")),
        "{refunded}"
    );
    // The customer is told in their DM, with the merchant and the reason.
    let told = wait_notice(alice, dm, bot, "refunded 1.50 EUR").await;
    let told = told.body().unwrap_or_default().to_owned();
    assert!(told.contains(&bob_id) && told.contains("(cold)"), "{told}");
    let (status, over) = call(
        Method::POST,
        api(&format!("/invoices/{id}/refunds")),
        key.clone(),
        Some(json!({ "amount": "3.01", "reason": "all", "idempotency_key": "r2" })),
    )
    .await;
    assert_eq!(
        (status, over["reason"].as_str()),
        (409, Some("refund_above_remaining"))
    );
    let (_, merchant) = call(Method::GET, admin("/merchants/cafe"), ops.clone(), None).await;
    assert_eq!(merchant["accounts"][0]["available"], "3.00", "{merchant}");
    // The invoice's ledger transfers, found by its ledger reference: the payment the PIN
    // confirmed (the payment flow gave it the request's reference) and the refund (which
    // took it from the payment); the admin API shows the reference on each.
    let (status, shown) = call(
        Method::GET,
        api(&format!("/invoices/{id}")),
        key.clone(),
        None,
    )
    .await;
    assert_eq!(status, 200, "{shown}");
    let transfers = shown["transfers"].as_array().cloned().unwrap_or_default();
    let listed: Vec<_> = transfers
        .iter()
        .map(|t| {
            (
                t["kind"].as_str().unwrap_or_default(),
                t["status"].as_str().unwrap_or_default(),
                t["amount"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [("payment", "posted", "4.50"), ("refund", "posted", "1.50")],
        "{shown}"
    );
    let reader = crate::admin::mint(&s.admin_key, &[Scope::Read]);
    let reference = format!(
        "{:032x}",
        mxpay::requests::ledger_reference(&format!("${id}"))
    );
    for transfer in &transfers {
        let transfer_id = transfer["transfer_id"].as_str().unwrap();
        let (status, body) = call(
            Method::GET,
            admin(&format!("/transfers/{transfer_id}")),
            reader.clone(),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["transfer"]["reference"], reference, "{body}");
    }

    // The same key and body again: the original invoice, not a second one.
    let (status, replay) = call(
        Method::POST,
        api("/invoices"),
        key.clone(),
        Some(body.clone()),
    )
    .await;
    assert_eq!((status, &replay["invoice_id"]), (200, &json!(id)));
    // A second invoice declined with ❌: cancelled.
    let mut second = body.clone();
    second["amount"] = json!("2.00");
    second["idempotency_key"] = json!("inv-2");
    let (status, declined) = call(Method::POST, api("/invoices"), key.clone(), Some(second)).await;
    assert_eq!(status, 200, "{declined}");
    let declined_id = declined["invoice_id"].as_str().unwrap().to_owned();
    let notice = wait_notice(alice, room, bot, "2.00 EUR").await;
    alice.react(room, notice.event_id(), "❌").await;
    support::eventually("the invoice to show cancelled", || {
        let call = &call;
        let url = api(&format!("/invoices/{declined_id}"));
        let key = key.clone();
        async move {
            let (_, shown) = call(Method::GET, url, key, None).await;
            (shown["status"] == "cancelled").then_some(())
        }
    })
    .await;

    body["amount"] = json!("5.00");
    let (status, conflict) = call(Method::POST, api("/invoices"), key.clone(), Some(body)).await;
    assert_eq!(
        (status, conflict["reason"].as_str()),
        (409, Some("idempotency_conflict"))
    );
}

/// Issue 14: the example merchant (`examples/merchant.rs`, HTTP only, as a business developer
/// writes one) creates an invoice through the API; a customer pays it in the encrypted room
/// with a PIN; mxpay's webhook outbox delivers `invoice.paid` to the example's local receiver,
/// which checks the `Mxpay-Signature` with the secret shown at creation; the example refunds
/// part of it and receives `refund.succeeded`.
#[tokio::test]
async fn the_example_merchant_is_paid_told_by_a_signed_webhook_and_refunds_part() {
    use crate::payments::{scene, send_text, wait_notice, wait_receipt, PIN};
    use tokio::io::AsyncBufReadExt as _;
    let s = scene("merchant-example", 120_000, "100.00").await;
    let (alice, bob, bot, dm, room) = (&s.alice, &s.bob, &s.bot, &s.dm, &s.room);
    let ops = crate::admin::mint(&s.admin_key, &[Scope::Merchants, Scope::Read]);
    let http = reqwest::Client::new();
    let admin = |path: &str| format!("{}/_mxpay/admin/v1{path}", s.mxpay.url);
    let listen_port = support::free_port();
    let created: Value = http
        .post(admin("/merchants"))
        .bearer_auth(&ops)
        .json(&json!({
            "merchant_id": "shop", "user_id": bob.user.user_id.to_string(),
            "display_name": "Bob's Shop",
            "webhook_url": format!("http://127.0.0.1:{listen_port}/webhook"),
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["webhook_secret"].as_str().unwrap().to_owned();
    let key: Value = http
        .post(admin("/merchants/shop/keys"))
        .bearer_auth(&ops)
        .json(&json!({ "scopes": ["invoices", "refunds", "read"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    wait_notice(alice, dm, bot, "topped up with 100.00 EUR").await;

    // `cargo test` builds the examples next to the test binary's directory.
    let example = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join("merchant");
    let mut merchant = tokio::process::Command::new(&example)
        .args(["--api", &s.mxpay.url, "--room", room.as_str()])
        .args(["--payer", alice.user.user_id.as_str()])
        .args(["--amount", "4.50", "--currency", "EUR", "--refund", "1.50"])
        .args(["--listen", &format!("127.0.0.1:{listen_port}")])
        .args(["--order-ref", "order-42", "--wait-s", "240"])
        .env("MERCHANT_KEY", &key)
        .env("WEBHOOK_SECRET", &secret)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", example.display()));
    let mut lines = tokio::io::BufReader::new(merchant.stdout.take().unwrap()).lines();
    async fn next_line(
        lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    ) -> String {
        tokio::time::timeout(support::timeout(), lines.next_line())
            .await
            .expect("the example merchant said nothing in time")
            .unwrap()
            .expect("the example merchant stopped early")
    }
    let first = next_line(&mut lines).await;
    let invoice_id = first
        .strip_prefix("invoice ")
        .and_then(|rest| rest.strip_suffix(" created"))
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_owned();

    let notice = wait_notice(alice, room, bot, "4.50 EUR").await;
    let pay = alice.reply(room, notice.event_id(), "!pay").await;
    wait_notice(alice, dm, bot, "Confirm paying 4.50 EUR").await;
    send_text(alice, dm, PIN).await;
    wait_receipt(alice, room, bot, &pay, "completed", None).await;

    let paid = next_line(&mut lines).await;
    assert!(
        paid.starts_with(&format!("paid {invoice_id} transfer ")),
        "{paid}"
    );
    assert_eq!(
        next_line(&mut lines).await,
        format!("refunded 1.50 of {invoice_id}")
    );
    assert_eq!(
        next_line(&mut lines).await,
        format!("refund.succeeded {invoice_id}")
    );
    let status = tokio::time::timeout(support::timeout(), merchant.wait())
        .await
        .expect("the example merchant did not stop")
        .unwrap();
    assert!(status.success(), "{status}");
    wait_notice(alice, dm, bot, "refunded 1.50 EUR").await;

    // The outbox shows both deliveries as delivered.
    let delivered: Value = http
        .get(admin("/webhook-events?merchant=shop&state=delivered"))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let types: Vec<&str> = delivered["events"]
        .as_array()
        .map(|events| events.iter().filter_map(|e| e["type"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        types.contains(&"invoice.paid") && types.contains(&"refund.succeeded"),
        "{delivered}"
    );
}

/// The merchant's webhook outbox takes one waiting event (`pending_per_merchant_max: 1`, the
/// real outbox): once `invoice.paid` fills it, a new invoice and a refund are refused with 503
/// `webhook_backlog` and `Retry-After`, nothing posted and no money moved; an invoice that ends
/// meanwhile (the payment flow's report) is still recorded, its event kept and handed to the
/// outbox once it drains: nothing lost.
#[tokio::test]
async fn a_full_webhook_outbox_refuses_new_invoices_and_refunds_and_loses_no_event() {
    use mxpay::webhooks::{DeliveryState, WebhookPoke, WebhookPolicy, WebhookStore};
    let dir = tempfile::tempdir().unwrap();
    let store = WebhookStore::open(
        dir.path(),
        WebhookPolicy {
            pending_per_merchant_max: 1,
            ..WebhookPolicy::default()
        },
    )
    .unwrap();
    let outbox = mxpay::app::merchant_webhooks::OutboxEvents::new(
        store.clone(),
        Arc::new(ManualClock::new(T0_MS)),
        WebhookPoke::default(),
    );
    let h = Harness::with_events(Some(Arc::new(outbox)));
    let (key, _) = h.merchant_with_key("cafe").await;
    let (status, paid) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k1")))
        .await;
    assert_eq!(status, StatusCode::OK, "{paid}");
    let (status, ending) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k2")))
        .await;
    assert_eq!(status, StatusCode::OK, "{ending}");
    h.pay(&paid, "cafe").await;
    let paid_id = paid["invoice_id"].as_str().unwrap();
    let paid_event = mxpay::merchants::events::invoice_event_id("invoice.paid", paid_id);
    assert!(
        store.get(&paid_event).unwrap().is_some(),
        "invoice.paid waits"
    );
    let posted = h.poster.0.load(std::sync::atomic::Ordering::SeqCst);

    // Full: a new invoice is refused before it is posted.
    let request = Request::builder()
        .method("POST")
        .uri("/_mxpay/merchant/v1/invoices")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(invoice_body("k3").to_string()))
        .unwrap();
    let response = h.merchant.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("60")
    );
    let body: Value = serde_json::from_slice(
        &axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(body["reason"], "webhook_backlog", "{body}");
    assert_eq!(
        h.poster.0.load(std::sync::atomic::Ordering::SeqCst),
        posted,
        "nothing posted"
    );
    // A refund too, before any money moves.
    let (status, refused) = h
        .merchant(
            "POST",
            &format!("/invoices/{paid_id}/refunds"),
            &key,
            Some(json!({ "amount": "1.00", "reason": "cold", "idempotency_key": "r1" })),
        )
        .await;
    assert_eq!(
        (status, refused["reason"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("webhook_backlog"))
    );
    assert_eq!(h.available(Owner::merchant("cafe")).await, 450);

    // The payment flow's report that the other invoice was declined is never refused: the
    // invoice is cancelled, its event kept.
    let ending_id = ending["invoice_id"].as_str().unwrap();
    let cancelled = h.api.record_ended(ending_id, true).unwrap();
    assert_eq!(cancelled.state.as_str(), "cancelled");
    let (_, shown) = h
        .merchant("GET", &format!("/invoices/{ending_id}"), &key, None)
        .await;
    assert_eq!(shown["status"], "cancelled");
    let cancelled_event =
        mxpay::merchants::events::invoice_event_id("invoice.cancelled", ending_id);
    assert!(store.get(&cancelled_event).unwrap().is_none());
    assert_eq!(h.api.invoices().unsent_len(), 1);
    assert_eq!(h.api.send_unsent(10).unwrap(), 0, "still full");

    // The receiver took invoice.paid: the kept event goes in, once.
    let delivered = |event_id: &str| {
        store
            .update(event_id, |r| {
                r.state = DeliveryState::Delivered;
                r.finished_ms = Some(T0_MS);
                true
            })
            .unwrap()
            .unwrap();
    };
    delivered(&paid_event);
    assert_eq!(h.api.send_unsent(10).unwrap(), 1);
    assert_eq!(h.api.invoices().unsent_len(), 0);
    let record = store.get(&cancelled_event).unwrap().unwrap();
    let data: Value = serde_json::from_str(&record.body).unwrap();
    assert_eq!(data["data"]["invoice"]["status"], "cancelled", "{data}");
    assert_eq!(h.api.send_unsent(10).unwrap(), 0);

    // Drained: the refund goes through.
    delivered(&cancelled_event);
    let (status, refunded) = h
        .merchant(
            "POST",
            &format!("/invoices/{paid_id}/refunds"),
            &key,
            Some(json!({ "amount": "1.00", "reason": "cold", "idempotency_key": "r1" })),
        )
        .await;
    assert_eq!(
        (status, &refunded["amount_refunded"]),
        (StatusCode::OK, &json!("1.00"))
    );
    assert_eq!(h.available(Owner::merchant("cafe")).await, 350);
}

/// A merchant's own limits, set at creation or later through the admin API: an invoice above
/// its largest invoice for the currency is refused (`invoice_above_merchant_limit`), one more
/// than its cap on open invoices too (`too_many_open_invoices`) until one is paid; nothing is
/// posted for a refused invoice; limits that do not fit the currencies are refused
/// (`limits_invalid`).
#[tokio::test]
async fn a_merchants_own_limits_refuse_large_invoices_and_too_many_open_ones() {
    let h = Harness::new();
    let (status, shop) = h
        .admin(
            "POST",
            "/merchants",
            Some(json!({
                "merchant_id": "shop", "user_id": "@shop:example.org", "display_name": "Shop",
                "webhook_url": "https://shop.example/hook",
                "limits": {"max_invoice": {"EUR": "100.00"}, "open_invoices_max": 5},
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shop}");
    assert_eq!(
        shop["limits"],
        json!({"max_invoice_minor": {"EUR": 10_000}, "open_invoices_max": 5})
    );
    let (key, _) = h.merchant_with_key("cafe").await;
    let (status, set) = h
        .admin(
            "POST",
            "/merchants/cafe/limits",
            Some(json!({"max_invoice": {"EUR": "5.00"}, "open_invoices_max": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["limits"]["open_invoices_max"], 2);
    for bad in [
        json!({"max_invoice": {"EUR": "5.001"}}),
        json!({"max_invoice": {"XXX": "5"}}),
        json!({"open_invoices_max": 0}),
    ] {
        let (status, refused) = h
            .admin("POST", "/merchants/cafe/limits", Some(bad.clone()))
            .await;
        // The admin API answers errcode and sentence (the reason is in the audit log).
        assert_eq!(
            (status, refused["errcode"].as_str()),
            (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM")),
            "{bad} -> {refused}"
        );
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("invalid limits")),
            "{refused}"
        );
    }

    let mut large = invoice_body("large");
    large["amount"] = json!("5.01");
    let (status, refused) = h.merchant("POST", "/invoices", &key, Some(large)).await;
    assert_eq!(
        (status, refused["reason"].as_str()),
        (StatusCode::CONFLICT, Some("invoice_above_merchant_limit")),
        "{refused}"
    );
    let (status, first) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k1")))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, second) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k2")))
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let posted = h.poster.0.load(std::sync::atomic::Ordering::SeqCst);
    let (status, refused) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k3")))
        .await;
    assert_eq!(
        (status, refused["reason"].as_str()),
        (StatusCode::CONFLICT, Some("too_many_open_invoices")),
        "{refused}"
    );
    assert_eq!(h.poster.0.load(std::sync::atomic::Ordering::SeqCst), posted);
    // A replay of an existing invoice is no new invoice: answered as before.
    let (status, replay) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k1")))
        .await;
    assert_eq!(
        (status, &replay["invoice_id"]),
        (StatusCode::OK, &first["invoice_id"])
    );
    // One is paid: room for another.
    h.pay(&first, "cafe").await;
    let (status, third) = h
        .merchant("POST", "/invoices", &key, Some(invoice_body("k3")))
        .await;
    assert_eq!(status, StatusCode::OK, "{third}");
}
