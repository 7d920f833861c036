//! The admin API: in-process router tests (tower `oneshot`, no socket) against a real ledger
//! on a temp dir with a manual clock, and one end-to-end test that runs the real `mxpay admin`
//! CLI against a real `mxpay serve` over Synapse.
//!
//! Other modules fund wallets with [`admin_yaml`] (an `admin:` config section with a fresh
//! HS256 key) and [`topup`] (a real HTTP top-up against a running mxpay).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use mxpay::admin::token::{AdminKey, Scope, TokenAuthority};
use mxpay::admin::webhook::{self, WebhookSecret};
use mxpay::admin::AdminState;
use mxpay::clock::{Clock as _, ManualClock, SharedClock};
use mxpay::ledger::{
    AccountId, CurrencySpec, FreezeMode, Ledger, LedgerSettings, Owner, TransferId, TransferRequest,
};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tower::ServiceExt as _;

/// The HS256 secret of the in-process tests.
const SECRET: &[u8] = b"admin-test-secret-0123456789abcdef";
/// The webhook secret of provider `acme`.
const ACME_SECRET: &[u8] = b"whsec_acme_test_0123456789abcdefghij";
/// Start of the manual clock: 2026-11-25.
const T0_MS: u64 = 1_795_000_000_000;

#[allow(dead_code)] // for other modules' end-to-end tests
/// An `admin:` config section with a fresh random HS256 key written to `dir/admin-jwt.key`
/// (mode 0600), for tests that run mxpay: append it to `lease.config.extra_yaml`. Returns the
/// YAML and the key, to mint tokens with [`mint`].
pub fn admin_yaml(dir: &Path) -> (String, Vec<u8>) {
    let secret = mxpay::admin::token::random_id().into_bytes();
    let path = dir.join("admin-jwt.key");
    std::fs::write(&path, &secret).expect("write the admin key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let yaml = format!(
        "admin:\n  token:\n    algorithm: HS256\n    secret: {{ file: {} }}\n",
        path.display()
    );
    (yaml, secret)
}

#[allow(dead_code)] // for other modules' end-to-end tests
/// Mints an admin token for `secret` with `scopes`, valid for an hour of real time.
pub fn mint(secret: &[u8], scopes: &[Scope]) -> String {
    let authority = TokenAuthority::new(
        &AdminKey::Hs256 {
            secret: secret.to_vec(),
        },
        Arc::new(mxpay::clock::SystemClock),
    )
    .expect("a 32-byte key");
    authority
        .mint("it", scopes.iter().copied().collect(), 3600)
        .expect("mint")
}

#[allow(dead_code)] // for other modules' end-to-end tests
/// Tops up `user_id` with `amount` (`"12.50"`) of `currency` through the HTTP admin API of
/// the mxpay listening at `base_url` (`http://127.0.0.1:port`). Panics unless it answers 200.
pub async fn topup(base_url: &str, secret: &[u8], user_id: &str, amount: &str, currency: &str) {
    let key = format!("it-{}", mxpay::admin::token::random_id());
    let response = reqwest::Client::new()
        .post(format!("{base_url}/_mxpay/admin/v1/topups"))
        .bearer_auth(mint(secret, &[Scope::Topup]))
        .header("content-type", "application/json")
        .body(
            json!({
                "user_id": user_id, "amount": amount, "currency": currency,
                "idempotency_key": key,
            })
            .to_string(),
        )
        .send()
        .await
        .expect("reach mxpay's admin API");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, 200, "top-up refused: {text}");
}

/// An admin API over a real ledger in a temp dir, driven in-process.
struct Harness {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    ledger: Ledger,
    router: Router,
    tokens: TokenAuthority,
    state: Arc<AdminState>,
}

fn settings() -> LedgerSettings {
    let spec = |code: &str, exponent, max: Option<&str>| CurrencySpec {
        code: code.to_owned(),
        exponent,
        max_transfer: max.map(|m| m.parse().unwrap()),
        max_per_24h: None,
    };
    LedgerSettings {
        currencies: vec![spec("EUR", 2, Some("10000.00")), spec("JPY", 0, None)],
    }
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0_MS);
        let shared: SharedClock = Arc::new(clock.clone());
        let ledger = Ledger::open(dir.path(), &settings(), shared.clone()).unwrap();
        Self::with_ledger(dir, clock, ledger)
    }

    /// The admin API over `ledger`, with its data in `dir`.
    fn with_ledger(dir: tempfile::TempDir, clock: ManualClock, ledger: Ledger) -> Self {
        let shared: SharedClock = Arc::new(clock.clone());
        let key = AdminKey::Hs256 {
            secret: SECRET.to_vec(),
        };
        let state = AdminState::new(
            &key,
            vec![("acme".to_owned(), WebhookSecret::new(ACME_SECRET.to_vec()))],
            300,
            dir.path(),
            ledger.clone(),
            shared.clone(),
        )
        .unwrap();
        let state = Arc::new(state);
        let router = mxpay::admin::router(Some(state.clone()));
        let tokens = TokenAuthority::new(&key, shared).unwrap();
        Self {
            _dir: dir,
            clock,
            ledger,
            router,
            tokens,
            state,
        }
    }

    /// A restart of the admin API: the state (and its admin database) is dropped and opened
    /// again from the same data directory; the ledger stays open.
    fn restart(self) -> Self {
        let Self {
            _dir: dir,
            clock,
            ledger,
            router,
            tokens,
            state,
        } = self;
        drop((router, tokens));
        // The router held the only other reference: the database closes here.
        assert_eq!(Arc::strong_count(&state), 1);
        drop(state);
        Self::with_ledger(dir, clock, ledger)
    }

    fn token(&self, scopes: &[Scope]) -> String {
        let scopes: BTreeSet<Scope> = scopes.iter().copied().collect();
        self.tokens.mint("tester", scopes, 3600).unwrap()
    }

    fn all_scopes(&self) -> String {
        self.token(&Scope::ALL)
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("/_mxpay/admin/v1{path}"));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).unwrap()).await
    }

    async fn topup(
        &self,
        user: &str,
        amount: &str,
        currency: &str,
        key: &str,
    ) -> (StatusCode, Value) {
        let token = self.token(&[Scope::Topup]);
        self.call(
            "POST",
            "/topups",
            Some(&token),
            Some(json!({
                "user_id": user, "amount": amount, "currency": currency, "idempotency_key": key,
            })),
        )
        .await
    }

    async fn webhook(
        &self,
        provider: &str,
        body: &str,
        signature: Option<String>,
    ) -> (StatusCode, Value) {
        let mut request = Request::post(format!("/_mxpay/admin/v1/webhooks/{provider}"))
            .header("content-type", "application/json");
        if let Some(signature) = signature {
            request = request.header(webhook::SIGNATURE_HEADER, signature);
        }
        self.send(request.body(Body::from(body.to_owned())).unwrap())
            .await
    }

    /// `POST /users/{user}/{action}` (freeze, unfreeze) with `token`.
    async fn user_post(
        &self,
        user: &str,
        action: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let path = format!("/users/{}/{action}", enc(user));
        self.call("POST", &path, Some(token), body).await
    }

    /// `POST /withdrawals/{id}/{action}` (settle, reject) with `token`.
    async fn withdrawal_post(&self, id: &str, action: &str, token: &str) -> (StatusCode, Value) {
        let path = format!("/withdrawals/{id}/{action}");
        self.call("POST", &path, Some(token), None).await
    }

    /// `body` to the `acme` webhook, signed with its secret.
    async fn acme_webhook(&self, body: &str) -> (StatusCode, Value) {
        self.webhook("acme", body, Some(self.sign(body))).await
    }

    fn sign(&self, body: &str) -> String {
        webhook::sign(
            &WebhookSecret::new(ACME_SECRET.to_vec()),
            self.clock.now_ms() / 1000,
            body.as_bytes(),
        )
    }

    async fn available(&self, user: &str, currency: &str) -> String {
        let token = self.token(&[Scope::Read]);
        let (status, body) = self
            .call(
                "GET",
                &format!("/users/{}/accounts", enc(user)),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["currency"] == currency)
            .map(|a| a["available"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| "none".to_owned())
    }

    async fn audit(&self) -> Vec<Value> {
        let token = self.token(&[Scope::Audit]);
        let (status, body) = self
            .call("GET", "/audit?limit=500", Some(&token), None)
            .await;
        assert_eq!(status, 200, "{body}");
        body["entries"].as_array().unwrap().clone()
    }
}

fn enc(user: &str) -> String {
    user.replace('@', "%40").replace(':', "%3A")
}

const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";

#[tokio::test]
async fn topup_by_api_credits_once_per_idempotency_key() {
    let h = Harness::new();
    let (status, body) = h.topup(ALICE, "12.50", "EUR", "order-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["transfer"]["from"], "system:issuer");
    assert_eq!(body["transfer"]["to"], ALICE);
    assert_eq!(body["transfer"]["amount"], "12.50");
    assert_eq!(body["transfer"]["state"], "posted");
    let first_id = body["transfer"]["id"].clone();
    assert_eq!(h.available(ALICE, "EUR").await, "12.50");

    // The same key and request again: the original transfer, no second credit.
    let (status, again) = h.topup(ALICE, "12.50", "EUR", "order-1").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["transfer"]["id"], first_id);
    assert_eq!(h.available(ALICE, "EUR").await, "12.50");

    // The same key with another amount or user is refused, still no credit.
    let (status, conflict) = h.topup(ALICE, "99.00", "EUR", "order-1").await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["errcode"], "ORG.MXPAY_IDEMPOTENCY_CONFLICT");
    let (status, _) = h.topup(BOB, "12.50", "EUR", "order-1").await;
    assert_eq!(status, 409);
    assert_eq!(h.available(ALICE, "EUR").await, "12.50");
    assert_eq!(h.available(BOB, "EUR").await, "none");

    // A new key credits again; the money comes from the issuer, so the ledger still balances.
    let (status, _) = h.topup(ALICE, "0.50", "EUR", "order-2").await;
    assert_eq!(status, 200);
    assert_eq!(h.available(ALICE, "EUR").await, "13.00");
    let issuer = h
        .ledger
        .account(&AccountId {
            owner: Owner::Issuer,
            currency: mxpay::ledger::CurrencyCode::new("EUR").unwrap(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(issuer.balances.available_minor(), -1300);
    let expected = TransferId::from_key("topup:api:order-1").to_string();
    assert_eq!(first_id, expected.as_str());
}

#[tokio::test]
async fn bad_amounts_and_currencies_are_refused_with_clear_errors() {
    let h = Harness::new();
    let cases = [
        ("12.505", "EUR", "EUR has 2 decimal places"),
        ("1.5", "JPY", "JPY has 0 decimal places"),
        ("5", "XYZ", "unknown currency `XYZ`"),
        ("0", "EUR", "greater than zero"),
        ("-3", "EUR", "must not be negative"),
        ("10000.01", "EUR", "above the maximum"),
    ];
    for (i, (amount, currency, message)) in cases.into_iter().enumerate() {
        let (status, body) = h.topup(ALICE, amount, currency, &format!("bad-{i}")).await;
        assert_eq!(status, 400, "{amount} {currency}: {body}");
        assert_eq!(body["errcode"], "M_INVALID_PARAM");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(message), "{amount} {currency}: {error}");
    }
    let token = h.token(&[Scope::Topup]);
    let (status, body) = h
        .call(
            "POST",
            "/topups",
            Some(&token),
            Some(json!({"user_id": "alice", "amount": "1", "currency": "EUR", "idempotency_key": "k"})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("not a valid Matrix user ID"));
    let (status, body) = h
        .call(
            "POST",
            "/topups",
            Some(&token),
            Some(json!({
                "user_id": ALICE, "amount": "1", "currency": "EUR", "idempotency_key": "k",
                "note": "x".repeat(70_000),
            })),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["errcode"].as_str()),
        (413, Some("M_TOO_LARGE"))
    );
    let (status, body) = h
        .call(
            "POST",
            "/topups",
            Some(&token),
            Some(
                json!({"user_id": ALICE, "amount": 1.5, "currency": "EUR", "idempotency_key": "k"}),
            ),
        )
        .await;
    assert_eq!(status, 400, "a JSON number is refused: {body}");
    assert_eq!(body["errcode"], "M_BAD_JSON");
    assert_eq!(h.available(ALICE, "EUR").await, "none");
}

#[tokio::test]
async fn tokens_without_scope_expired_or_from_another_key_are_refused() {
    let h = Harness::new();
    let body =
        json!({"user_id": ALICE, "amount": "1.00", "currency": "EUR", "idempotency_key": "t"});

    let (status, answer) = h.call("POST", "/topups", None, Some(body.clone())).await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN"))
    );

    let read_only = h.token(&[Scope::Read]);
    let (status, answer) = h
        .call("POST", "/topups", Some(&read_only), Some(body.clone()))
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["errcode"], "M_FORBIDDEN");
    assert!(answer["error"].as_str().unwrap().contains("`topup` scope"));

    let other_key = TokenAuthority::new(
        &AdminKey::Hs256 {
            secret: b"another-secret-that-is-long-enough!!".to_vec(),
        },
        Arc::new(h.clock.clone()),
    )
    .unwrap()
    .mint("intruder", Scope::ALL.into_iter().collect(), 3600)
    .unwrap();
    let (status, answer) = h
        .call("POST", "/topups", Some(&other_key), Some(body.clone()))
        .await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
    );

    let short = h
        .tokens
        .mint("tester", [Scope::Topup].into_iter().collect(), 60)
        .unwrap();
    h.clock.advance_ms(60_000);
    let (status, answer) = h
        .call("POST", "/topups", Some(&short), Some(body.clone()))
        .await;
    assert_eq!(status, 401);
    assert!(
        answer["error"].as_str().unwrap().contains("expired"),
        "{answer}"
    );

    let (status, _) = h
        .call("POST", "/topups", Some("not-a-jwt"), Some(body))
        .await;
    assert_eq!(status, 401);
    assert_eq!(h.available(ALICE, "EUR").await, "none");

    // Every refusal is in the audit log, with who asked when the token named someone.
    let audit = h.audit().await;
    let topups: Vec<&Value> = audit.iter().filter(|e| e["action"] == "topup").collect();
    assert_eq!(topups.len(), 5, "{audit:?}");
    let results: Vec<&str> = topups
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        results,
        [
            "M_UNKNOWN_TOKEN",
            "M_UNKNOWN_TOKEN",
            "M_UNKNOWN_TOKEN",
            "M_FORBIDDEN",
            "M_MISSING_TOKEN"
        ]
    );
    assert_eq!(topups[3]["actor"], "tester");
    assert_eq!(topups[4]["actor"], "unauthenticated");
}

#[tokio::test]
async fn signed_webhook_credits_once_and_refuses_tampering_staleness_and_reuse() {
    let h = Harness::new();
    let body = json!({
        "type": "topup.succeeded", "event_id": "evt_1", "user_id": ALICE,
        "amount": "20.00", "currency": "EUR",
    })
    .to_string();
    let signature = h.sign(&body);
    let (status, answer) = h.webhook("acme", &body, Some(signature.clone())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"], "credited");
    assert_eq!(answer["replay"], false);
    assert_eq!(
        answer["transfer"]["id"],
        TransferId::from_key("topup:acme:evt_1")
            .to_string()
            .as_str()
    );
    assert_eq!(h.available(ALICE, "EUR").await, "20.00");

    // The provider retries: the same body answers the original result, nothing moves.
    h.clock.advance_ms(10_000);
    let (status, answer) = h.acme_webhook(&body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["replay"], true);
    assert_eq!(h.available(ALICE, "EUR").await, "20.00");

    // A changed amount under the old signature: bad signature.
    let tampered = body.replace("20.00", "2000.00");
    let (status, answer) = h.webhook("acme", &tampered, Some(signature.clone())).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("signature does not match"));
    // A changed amount signed properly under a used event id: refused as a conflict.
    let (status, answer) = h.acme_webhook(&tampered).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["errcode"], "ORG.MXPAY_EVENT_CONFLICT");
    // Stale: the original signature, ten minutes later.
    h.clock.advance_ms(600_000);
    let (status, answer) = h.webhook("acme", &body, Some(signature)).await;
    assert_eq!(status, 401);
    assert!(
        answer["error"].as_str().unwrap().contains("timestamp"),
        "{answer}"
    );
    // No signature, unknown provider.
    let (status, _) = h.webhook("acme", &body, None).await;
    assert_eq!(status, 401);
    let (status, answer) = h.webhook("other", &body, Some(h.sign(&body))).await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::NOT_FOUND, Some("M_NOT_FOUND"))
    );
    assert_eq!(h.available(ALICE, "EUR").await, "20.00");

    // A bad amount in a correctly signed event is refused before its id is spent.
    let bad = body.replace("evt_1", "evt_2").replace("20.00", "1.001");
    let (status, answer) = h.acme_webhook(&bad).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("EUR has 2 decimal places"));

    let audit = h.audit().await;
    let webhooks: Vec<&Value> = audit
        .iter()
        .filter(|e| e["actor"] == "provider:acme" || e["actor"] == "provider:?")
        .collect();
    assert_eq!(webhooks.len(), 8, "{audit:?}");
    assert_eq!(webhooks.last().unwrap()["action"], "webhook.topup");
}

#[tokio::test]
async fn freeze_blocks_debits_and_unfreeze_lifts_it() {
    let h = Harness::new();
    h.topup(ALICE, "10.00", "EUR", "f-1").await;
    let token = h.token(&[Scope::Freeze]);
    let (status, body) = h.user_post(ALICE, "freeze", &token, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["frozen"] == "debits"));

    let pay = |id: &str| {
        let (alice, bob) = (Owner::user(ALICE), Owner::user(BOB));
        eur_transfer(&h, id, alice, bob, Decimal::new(100, 2), b"")
    };
    let refused = h.ledger.create_transfer(pay("pay-1")).await.unwrap_err();
    assert_eq!(
        refused.rejection(),
        Some(mxpay::ledger::TransferError::DebitAccountFrozen)
    );
    // Money may still come in under a debit freeze.
    assert_eq!(h.topup(ALICE, "1.00", "EUR", "f-2").await.0, 200);

    let (status, _) = h.user_post(ALICE, "unfreeze", &token, None).await;
    assert_eq!(status, 200);
    h.ledger.create_transfer(pay("pay-2")).await.unwrap();
    assert_eq!(h.available(ALICE, "EUR").await, "10.00");

    // `all` also blocks top-ups; a freeze covers currencies the user never used.
    let (status, body) = h
        .user_post(BOB, "freeze", &token, Some(json!({"mode": "all"})))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = h.topup(BOB, "5", "JPY", "f-3").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["errcode"], "ORG.MXPAY_REJECTED");
    let frozen = h
        .ledger
        .account(&AccountId {
            owner: Owner::user(BOB),
            currency: mxpay::ledger::CurrencyCode::new("JPY").unwrap(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frozen.frozen, Some(FreezeMode::All));
}

#[tokio::test]
async fn every_call_appears_in_the_audit_log() {
    let h = Harness::new();
    let all = h.all_scopes();
    h.topup(ALICE, "3.00", "EUR", "a-1").await;
    let calls = [
        ("GET", format!("/users/{}/accounts", enc(ALICE))),
        ("GET", format!("/users/{}/history", enc(ALICE))),
        ("POST", format!("/users/{}/freeze", enc(ALICE))),
        ("POST", format!("/users/{}/unfreeze", enc(ALICE))),
        ("GET", "/transfers/pending".to_owned()),
        ("POST", "/ledger/verify".to_owned()),
        (
            "POST",
            format!("/withdrawals/{}/settle", "0".repeat(31) + "1"),
        ),
    ];
    for (method, path) in &calls {
        h.call(method, path, Some(&all), None).await;
    }
    let audit = h.audit().await;
    let actions: Vec<&str> = audit
        .iter()
        .rev()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "topup",
            "accounts",
            "history",
            "freeze",
            "unfreeze",
            "pending",
            "ledger.verify",
            "settle"
        ]
    );
    let last = &audit[0];
    assert_eq!(last["result"], "M_NOT_FOUND");
    assert_eq!(last["actor"], "tester");
    assert!(last["token_id"].as_str().is_some_and(|t| t.len() == 32));
    assert_eq!(audit[6]["target"], ALICE);
    assert_eq!(audit[7]["result"], "ok");
    assert!(audit.iter().all(|e| e["at_ms"].as_u64() == Some(T0_MS)));
}

/// A transfer of `amount` EUR, keyed by `key`.
fn eur_transfer(
    h: &Harness,
    key: &str,
    debit: Owner,
    credit: Owner,
    amount: Decimal,
    memo: &[u8],
) -> TransferRequest {
    TransferRequest {
        reference: 0,
        id: TransferId::from_key(key),
        debit,
        credit,
        amount: h.ledger.parse_amount(amount, "EUR").unwrap(),
        memo: memo.to_vec(),
    }
}

/// A pending withdrawal of `amount` EUR from `user`, as the payments layer makes it.
async fn withdrawal(h: &Harness, user: &str, amount: &str, key: &str) -> String {
    let amount: Decimal = amount.parse().unwrap();
    let transfer = h
        .ledger
        .create_pending(
            eur_transfer(
                h,
                key,
                Owner::user(user),
                Owner::Settlement,
                amount,
                br#"{"type":"withdrawal"}"#,
            ),
            24 * 3600 * 1000,
        )
        .await
        .unwrap();
    transfer.id.to_string()
}

#[tokio::test]
async fn withdrawals_settle_or_reject_by_api_and_by_webhook() {
    let h = Harness::new();
    h.topup(ALICE, "100.00", "EUR", "w-0").await;
    let w1 = withdrawal(&h, ALICE, "30.00", "w-1").await;
    let w2 = withdrawal(&h, ALICE, "20.00", "w-2").await;
    let w3 = withdrawal(&h, ALICE, "10.00", "w-3").await;
    let w4 = withdrawal(&h, ALICE, "5.00", "w-4").await;
    assert_eq!(h.available(ALICE, "EUR").await, "35.00");

    let read = h.token(&[Scope::Read]);
    let (status, pending) = h.call("GET", "/transfers/pending", Some(&read), None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = pending["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4);
    for w in [&w1, &w2, &w3, &w4] {
        assert!(ids.contains(&w.as_str()));
    }

    let settle = h.token(&[Scope::Settle]);
    let (status, body) = h.withdrawal_post(&w1, "settle", &settle).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["transfer"]["state"], "posted");
    // Settling again answers the same; rejecting a settled one is refused.
    let (status, _) = h.withdrawal_post(&w1, "settle", &settle).await;
    assert_eq!(status, 200);
    let (status, body) = h.withdrawal_post(&w1, "reject", &settle).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["errcode"], "ORG.MXPAY_REJECTED");

    let (status, body) = h.withdrawal_post(&w2, "reject", &settle).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["transfer"]["state"], "voided");
    assert_eq!(h.available(ALICE, "EUR").await, "55.00");

    // The provider settles w3 and rejects w4; retries change nothing; a used event id with
    // another withdrawal is refused.
    let settled = json!({"type": "withdrawal.settled", "event_id": "evt_w3", "withdrawal_id": w3})
        .to_string();
    let (status, body) = h.acme_webhook(&settled).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["result"].as_str(), body["replay"].as_bool()),
        (Some("settled"), Some(false))
    );
    let (status, body) = h.acme_webhook(&settled).await;
    assert_eq!(
        (status.as_u16(), body["replay"].as_bool()),
        (200, Some(true))
    );
    let rejected = json!({"type": "withdrawal.rejected", "event_id": "evt_w4", "withdrawal_id": w4, "reason": "closed account"}).to_string();
    let (status, body) = h.acme_webhook(&rejected).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["transfer"]["state"], "voided");
    let reused = json!({"type": "withdrawal.settled", "event_id": "evt_w3", "withdrawal_id": w4})
        .to_string();
    let (status, body) = h.acme_webhook(&reused).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(h.available(ALICE, "EUR").await, "60.00");

    // Only withdrawals can be settled: not a payment between users, not unknown ids.
    let payment = h
        .ledger
        .create_pending(
            eur_transfer(
                &h,
                "p-1",
                Owner::user(ALICE),
                Owner::user(BOB),
                Decimal::ONE,
                b"",
            ),
            60_000,
        )
        .await
        .unwrap();
    let (status, body) = h
        .withdrawal_post(&payment.id.to_string(), "settle", &settle)
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = h
        .call("POST", "/withdrawals/xyz/settle", Some(&settle), None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errcode"], "M_INVALID_PARAM");
    let (status, pending) = h.call("GET", "/transfers/pending", Some(&read), None).await;
    assert_eq!(status, 200);
    assert_eq!(pending["transfers"].as_array().unwrap().len(), 1);
}

/// A withdrawal confirmed before the wallet was frozen is still settled (by the API and by
/// the provider) or rejected: a freeze stops new movements, not payouts already made. New
/// withdrawals from the frozen wallet are refused.
#[tokio::test]
async fn a_frozen_wallet_s_pending_withdrawals_can_still_be_settled() {
    let h = Harness::new();
    h.topup(ALICE, "100.00", "EUR", "fw-0").await;
    let w1 = withdrawal(&h, ALICE, "30.00", "fw-1").await;
    let w2 = withdrawal(&h, ALICE, "20.00", "fw-2").await;
    let w3 = withdrawal(&h, ALICE, "10.00", "fw-3").await;
    let freeze = h.token(&[Scope::Freeze]);
    let (status, body) = h
        .user_post(ALICE, "freeze", &freeze, Some(json!({"mode": "all"})))
        .await;
    assert_eq!(status, 200, "{body}");

    let settle = h.token(&[Scope::Settle]);
    let (status, body) = h.withdrawal_post(&w1, "settle", &settle).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["transfer"]["state"], "posted");
    let settled = json!({"type": "withdrawal.settled", "event_id": "evt_fw2", "withdrawal_id": w2})
        .to_string();
    let (status, body) = h.acme_webhook(&settled).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["transfer"]["state"], "posted");
    let (status, body) = h.withdrawal_post(&w3, "reject", &settle).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["transfer"]["state"], "voided");
    assert_eq!(h.available(ALICE, "EUR").await, "50.00");

    // Still frozen: a new withdrawal (or top-up, under `all`) is refused.
    let refused = h
        .ledger
        .create_pending(
            eur_transfer(
                &h,
                "fw-4",
                Owner::user(ALICE),
                Owner::Settlement,
                Decimal::ONE,
                b"",
            ),
            60_000,
        )
        .await
        .unwrap_err();
    assert_eq!(
        refused.rejection(),
        Some(mxpay::ledger::TransferError::DebitAccountFrozen)
    );
    let (status, body) = h.topup(ALICE, "1.00", "EUR", "fw-5").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(h.available(ALICE, "EUR").await, "50.00");
}

/// A provider secret shorter than 32 bytes is refused when the admin state is built, with
/// the provider named and the secret not shown.
#[tokio::test]
async fn a_short_provider_secret_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let clock: SharedClock = Arc::new(ManualClock::new(T0_MS));
    let ledger = Ledger::open(dir.path(), &settings(), clock.clone()).unwrap();
    let short = b"whsec_short_0123456789abcdefghi";
    assert_eq!(short.len(), 31);
    let err = AdminState::new(
        &AdminKey::Hs256 {
            secret: SECRET.to_vec(),
        },
        vec![("acme".to_owned(), WebhookSecret::new(short.to_vec()))],
        300,
        dir.path(),
        ledger,
        clock,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("acme") && err.contains("32"), "{err}");
    assert!(!err.contains("whsec"), "{err}");
}

#[tokio::test]
async fn history_pages_newest_first() {
    let h = Harness::new();
    for i in 1..=5 {
        h.topup(ALICE, &format!("{i}.00"), "EUR", &format!("h-{i}"))
            .await;
    }
    h.topup(BOB, "9.00", "EUR", "h-bob").await;
    let read = h.token(&[Scope::Read]);
    let mut amounts = Vec::new();
    let mut from: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &from {
            Some(from) => format!("/users/{}/history?limit=2&from={from}", enc(ALICE)),
            None => format!("/users/{}/history?limit=2", enc(ALICE)),
        };
        let (status, body) = h.call("GET", &path, Some(&read), None).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        for t in body["transfers"].as_array().unwrap() {
            amounts.push(t["amount"].as_str().unwrap().to_owned());
        }
        match body["next"].as_str() {
            Some(next) => from = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(amounts, ["5.00", "4.00", "3.00", "2.00", "1.00"]);
    assert_eq!(pages, 3);
    let (status, body) = h
        .call(
            "GET",
            &format!("/users/{}/history?limit=x", enc(ALICE)),
            Some(&read),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["errcode"].as_str()),
        (400, Some("M_INVALID_PARAM"))
    );
}

#[tokio::test]
async fn ledger_verify_and_streamed_export() {
    let h = Harness::new();
    // More lines than the export's channel holds, so the stream must flow.
    for i in 0..150 {
        h.topup(
            &format!("@u{i}:example.org"),
            "1.00",
            "EUR",
            &format!("e-{i}"),
        )
        .await;
    }
    let read = h.token(&[Scope::Read]);
    let (status, body) = h.call("POST", "/ledger/verify", Some(&read), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true);
    assert_eq!(body["transfers"], 150);

    let response = h
        .router
        .clone()
        .oneshot(
            Request::get("/_mxpay/admin/v1/ledger/export")
                .header("authorization", format!("Bearer {read}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .unwrap();
    let lines: Vec<Value> = std::str::from_utf8(&bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |t: &str| lines.iter().filter(|l| l["type"] == t).count();
    assert_eq!(count("transfer_created"), 150);
    assert_eq!(count("currency_defined"), 2);
    assert_eq!(count("account_opened"), 151, "150 users and the issuer");
    assert!(lines.iter().all(|l| l.get("error").is_none()));
    let first = lines
        .iter()
        .find(|l| l["type"] == "transfer_created")
        .unwrap();
    assert_eq!(first["from"]["owner"], "system:issuer");
    assert_eq!(first["amount"], "1.00");
    assert_eq!(first["memo"]["source"], "api");
}

#[tokio::test]
async fn openapi_document_covers_every_mounted_route_and_every_route_needs_auth() {
    let doc: Value = serde_json::from_str(mxpay::admin::api::OPENAPI_JSON).unwrap();
    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(doc, on_disk);
    let h = Harness::new();
    let (_, routes) = mxpay::admin::api::routes(Some(Arc::new(
        AdminState::new(
            &AdminKey::Hs256 {
                secret: SECRET.to_vec(),
            },
            Vec::new(),
            300,
            h._dir.path().join("other").as_path(),
            h.ledger.clone(),
            Arc::new(h.clock.clone()),
        )
        .unwrap(),
    )));
    assert!(routes.len() >= 15, "{routes:?}");
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in &routes {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is mounted but not in docs/openapi.json"));
        assert!(
            item.get(*method).is_some(),
            "{method} {path} is mounted but not in docs/openapi.json"
        );
    }
    let mut documented = 0;
    // The merchant API is held against its own router (tests/it/merchants.rs).
    for (path, item) in paths
        .iter()
        .filter(|(path, _)| !path.starts_with("/_mxpay/merchant/"))
    {
        for (method, op) in item.as_object().unwrap() {
            documented += 1;
            assert!(
                routes.iter().any(|(m, p)| m == method && p == path),
                "{method} {path} is documented but not mounted"
            );
            // Everything but the document itself and the webhooks needs a token.
            let concrete = path
                .replace("{user_id}", &enc(ALICE))
                .replace("{transfer_id}", &"1".repeat(32))
                .replace("{withdrawal_id}", &"1".repeat(32))
                .replace("{jti}", "some-token")
                .replace("{merchant_id}", "cafe")
                .replace("{key_id}", "some-key")
                .replace("{provider}", "acme")
                .replace("{event_id}", "evt_x");
            let (status, body) = h
                .call(
                    &method.to_uppercase(),
                    concrete.trim_start_matches("/_mxpay/admin/v1"),
                    None,
                    None,
                )
                .await;
            match op.get("x-mxpay-scope") {
                Some(_) => assert_eq!(
                    (status.as_u16(), body["errcode"].as_str()),
                    (401, Some("M_MISSING_TOKEN")),
                    "{method} {path}"
                ),
                None if path.ends_with("/openapi.json") => {
                    assert_eq!(status, 200);
                    assert_eq!(body, doc);
                }
                None => assert_eq!(status, 401, "{method} {path}: no signature"),
            }
        }
    }
    assert_eq!(documented, routes.len());
    let (status, body) = h.call("GET", "/topups", None, None).await;
    assert_eq!(
        (status.as_u16(), body["errcode"].as_str()),
        (405, Some("M_UNRECOGNIZED"))
    );
}

/// A token's id (`jti`), read from its verified claims.
fn jti_of(h: &Harness, token: &str) -> String {
    h.tokens.authenticate(token).unwrap().jti
}

/// Every token-guarded route mounted, as (method, concrete path under the prefix).
fn guarded_routes(h: &Harness) -> Vec<(String, String)> {
    let (_, routes) = mxpay::admin::api::routes(Some(h.state.clone()));
    routes
        .into_iter()
        .filter(|(_, path)| !path.ends_with("/openapi.json") && !path.contains("/webhooks/"))
        .map(|(method, path)| {
            let path = path
                .trim_start_matches("/_mxpay/admin/v1")
                .replace("{user_id}", &enc(ALICE))
                .replace("{transfer_id}", &"1".repeat(32))
                .replace("{withdrawal_id}", &"1".repeat(32))
                .replace("{jti}", "some-other-token")
                .replace("{merchant_id}", "cafe")
                .replace("{key_id}", "some-key")
                .replace("{event_id}", "evt_x");
            (method.to_uppercase(), path)
        })
        .collect()
}

#[tokio::test]
async fn a_revoked_token_is_refused_on_every_route_also_after_a_restart() {
    let h = Harness::new();
    let victim = h.all_scopes();
    let victim_jti = jti_of(&h, &victim);
    let revoker = h.token(&[Scope::Revoke]);
    let revoker_jti = jti_of(&h, &revoker);
    let bystander = h.all_scopes();
    let (status, body) = h
        .call("GET", "/transfers/pending", Some(&victim), None)
        .await;
    assert_eq!(status, 200, "{body}");

    let revoke_path = format!("/tokens/{victim_jti}/revoke");
    let (status, answer) = h.call("POST", &revoke_path, Some(&revoker), None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"jti": victim_jti, "revoked": true, "already": false, "revoked_at_ms": T0_MS})
    );
    // Idempotent: the second revoke answers 200 and keeps the first time.
    h.clock.advance_ms(1_000);
    let (status, again) = h.call("POST", &revoke_path, Some(&bystander), None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["already"], true);
    assert_eq!(again["revoked_at_ms"], T0_MS);

    let routes = guarded_routes(&h);
    assert!(routes.len() >= 14, "{routes:?}");
    for (method, path) in &routes {
        let (status, answer) = h.call(method, path, Some(&victim), None).await;
        assert_eq!(
            (status.as_u16(), answer["errcode"].as_str()),
            (401, Some("M_UNKNOWN_TOKEN")),
            "{method} {path}: {answer}"
        );
        assert_eq!(answer["error"], "this admin token was revoked");
        // Another token is not affected.
        let (status, answer) = h.call(method, path, Some(&bystander), None).await;
        assert_ne!(status.as_u16(), 401, "{method} {path}: {answer}");
        assert_ne!(status.as_u16(), 403, "{method} {path}: {answer}");
    }

    // The audit log names who revoked what, and who tried with the revoked token.
    let audit = h.audit().await;
    let revokes: Vec<&Value> = audit
        .iter()
        .filter(|e| e["action"] == "token.revoke" && e["result"] == "ok")
        .collect();
    assert!(revokes.len() >= 2, "{audit:?}");
    let first = revokes.last().unwrap();
    assert_eq!(first["target"], victim_jti.as_str());
    assert_eq!(first["token_id"], revoker_jti.as_str());
    let refused: Vec<&Value> = audit
        .iter()
        .filter(|e| e["token_id"] == victim_jti.as_str() && e["result"] == "M_UNKNOWN_TOKEN")
        .collect();
    assert_eq!(refused.len(), routes.len(), "{audit:?}");
    assert!(refused.iter().all(|e| e["actor"] == "tester"));

    // A restart keeps it revoked, and the others working.
    let h = h.restart();
    let (status, answer) = h
        .call("GET", "/transfers/pending", Some(&victim), None)
        .await;
    assert_eq!(
        (status.as_u16(), answer["error"].as_str()),
        (401, Some("this admin token was revoked"))
    );
    let (status, answer) = h
        .call("GET", "/transfers/pending", Some(&bystander), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, again) = h.call("POST", &revoke_path, Some(&revoker), None).await;
    assert_eq!((status.as_u16(), &again["already"]), (200, &json!(true)));
}

#[tokio::test]
async fn a_token_may_revoke_itself_but_others_only_with_the_revoke_scope() {
    let h = Harness::new();
    let reader = h.token(&[Scope::Read]);
    let other = h.token(&[Scope::Read]);
    let other_jti = jti_of(&h, &other);

    // Without the scope, another token's id: forbidden, and nothing is revoked.
    let (status, answer) = h
        .call(
            "POST",
            &format!("/tokens/{other_jti}/revoke"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), answer["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{answer}"
    );
    assert!(answer["error"].as_str().unwrap().contains("`revoke` scope"));
    let (status, _) = h
        .call("GET", "/transfers/pending", Some(&other), None)
        .await;
    assert_eq!(status, 200);

    // Its own id: allowed without the scope; the next call is refused.
    let reader_jti = jti_of(&h, &reader);
    let (status, answer) = h
        .call(
            "POST",
            &format!("/tokens/{reader_jti}/revoke"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["already"], false);
    let (status, answer) = h
        .call(
            "POST",
            &format!("/tokens/{reader_jti}/revoke"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), answer["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );

    // An id that no token could carry is a bad parameter.
    let revoker = h.token(&[Scope::Revoke]);
    let long = "x".repeat(256);
    for bad in ["%0A", long.as_str()] {
        let (status, answer) = h
            .call(
                "POST",
                &format!("/tokens/{bad}/revoke"),
                Some(&revoker),
                None,
            )
            .await;
        assert_eq!(
            (status.as_u16(), answer["errcode"].as_str()),
            (400, Some("M_INVALID_PARAM")),
            "{answer}"
        );
    }
    let (status, _) = h.call("POST", "/tokens/x/revoke", None, None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_token_living_longer_than_token_ttl_max_s_is_refused() {
    let h = Harness::new();
    let dir = tempfile::tempdir().unwrap();
    let state = AdminState::new(
        &AdminKey::Hs256 {
            secret: SECRET.to_vec(),
        },
        Vec::new(),
        300,
        dir.path(),
        h.ledger.clone(),
        Arc::new(h.clock.clone()),
    )
    .unwrap()
    .with_token_ttl_max_s(3600);
    let router = mxpay::admin::router(Some(Arc::new(state)));
    let get = |token: String| {
        Request::get("/_mxpay/admin/v1/transfers/pending")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let read: BTreeSet<Scope> = [Scope::Read].into_iter().collect();
    let within = h.tokens.mint("tester", read.clone(), 3600).unwrap();
    let response = router.clone().oneshot(get(within)).await.unwrap();
    assert_eq!(response.status(), 200);
    let beyond = h.tokens.mint("tester", read, 3601).unwrap();
    let response = router.oneshot(get(beyond)).await.unwrap();
    assert_eq!(response.status(), 401);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["errcode"], "M_UNKNOWN_TOKEN");
    assert!(
        body["error"].as_str().unwrap().contains("token_ttl_max_s"),
        "{body}"
    );
}

/// The admin API over `ledger` with its data in `dir` and `admin.token_ttl_max_s` set.
fn router_with_ttl(dir: &Path, h: &Harness, token_ttl_max_s: u64) -> Router {
    let state = AdminState::new(
        &AdminKey::Hs256 {
            secret: SECRET.to_vec(),
        },
        Vec::new(),
        300,
        dir,
        h.ledger.clone(),
        Arc::new(h.clock.clone()),
    )
    .unwrap()
    .with_token_ttl_max_s(token_ttl_max_s);
    mxpay::admin::router(Some(Arc::new(state)))
}

/// `GET /transfers/pending` with `token` on `router`: the status and the error, if any.
async fn pending_with(router: &Router, token: &str) -> (u16, String) {
    let request = Request::get("/_mxpay/admin/v1/transfers/pending")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    (status, body["error"].as_str().unwrap_or("").to_owned())
}

/// A `read` token with exactly these `iat` and `exp` (seconds), signed with the test key.
fn token_with_times(iat_s: u64, exp_s: u64) -> String {
    let claims = json!({
        "sub": "tester", "aud": "mxpay-admin", "scopes": ["read"],
        "iat": iat_s, "exp": exp_s, "jti": mxpay::admin::token::random_id(),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_issued_in_the_future_or_expiring_beyond_the_lifetime_bound_is_refused() {
    const YEAR_S: u64 = 365 * 24 * 3600;
    let h = Harness::new();
    let now_s = T0_MS / 1000;
    // The default `admin.token_ttl_max_s`: 30 days.
    let router = mxpay::admin::router(Some(h.state.clone()));
    // The report's token: `exp - iat` saturated to 0 and passed the lifetime bound.
    let (status, error) = pending_with(
        &router,
        &token_with_times(now_s + 13 * YEAR_S, now_s + 10 * YEAR_S),
    )
    .await;
    assert_eq!(status, 401, "{error}");
    // Issued two hours ahead with a short lifetime: refused as issued in the future.
    let (status, error) =
        pending_with(&router, &token_with_times(now_s + 7200, now_s + 9000)).await;
    assert_eq!(status, 401, "{error}");
    assert!(error.contains("issued in the future"), "{error}");
    // A minute of clock skew on the minting machine passes.
    let (status, error) = pending_with(&router, &token_with_times(now_s + 60, now_s + 3600)).await;
    assert_eq!(status, 200, "{error}");
}

#[tokio::test]
async fn a_revocation_is_kept_until_the_revoked_token_expires() {
    let h = Harness::new();
    let dir = tempfile::tempdir().unwrap();
    let read: BTreeSet<Scope> = [Scope::Read].into_iter().collect();
    // A token living 3 hours, revoked by id while the server allows 1 hour: kept for 1 hour
    // plus the minting clock margin (1 hour).
    let long = h.tokens.mint("tester", read, 3 * 3600).unwrap();
    let long_jti = jti_of(&h, &long);
    // A fresh revoker each time: the clock moves past an hour below.
    let revoke = |jti: String| {
        Request::post(format!("/_mxpay/admin/v1/tokens/{jti}/revoke"))
            .header(
                "authorization",
                format!("Bearer {}", h.token(&[Scope::Revoke])),
            )
            .body(Body::empty())
            .unwrap()
    };
    {
        let router = router_with_ttl(dir.path(), &h, 3600);
        let response = router.oneshot(revoke(long_jti)).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    // The operator raises `admin.token_ttl_max_s` to a day: the token's lifetime is accepted
    // now, its revocation must still hold for as long as the token lives.
    let router = router_with_ttl(dir.path(), &h, 24 * 3600);
    let (status, error) = pending_with(&router, &long).await;
    assert_eq!(
        (status, error.as_str()),
        (401, "this admin token was revoked")
    );
    // Past the default keep time (2 hours), a revoke prunes what is due.
    h.clock.advance_ms(2 * 3600 * 1000 + 1000);
    let response = router
        .clone()
        .oneshot(revoke("other".to_owned()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, error) = pending_with(&router, &long).await;
    assert_eq!(
        (status, error.as_str()),
        (401, "this admin token was revoked")
    );
    // Once the token has expired, it is refused as expired anyway.
    h.clock.advance_ms(3600 * 1000);
    let (status, error) = pending_with(&router, &long).await;
    assert_eq!(
        (status, error.as_str()),
        (401, "the admin token has expired")
    );
}

#[tokio::test]
async fn admin_api_is_off_without_a_key() {
    let router = mxpay::admin::router(None);
    for (method, path) in [
        ("POST", "/_mxpay/admin/v1/topups"),
        ("GET", "/_mxpay/admin/v1/users/%40a%3Ab/accounts"),
    ] {
        let response = router
            .clone()
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("admin.token"),
            "{body}"
        );
    }
}

/// Runs the real `mxpay admin ...` with `args`; returns (success, stdout, stderr).
async fn cli(args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxpay"));
    command
        .arg("admin")
        .args(args)
        .env_remove("MXPAY_ADMIN_TOKEN");
    if let Some(token) = token {
        command.env("MXPAY_ADMIN_TOKEN", token);
    }
    command.kill_on_drop(true);
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

/// `mxpay admin token create` with `args` after it; the token.
async fn cli_token(config: &str, args: &[&str]) -> String {
    let mut all = vec!["-c", config, "token", "create"];
    all.extend_from_slice(args);
    let (ok, token, err) = cli(&all, None).await;
    assert!(ok, "token create failed: {err}");
    token.trim().to_owned()
}

/// `mxpay admin --json <args>` with `token`, which must succeed; its answer.
async fn cli_json(config: &str, args: &[&str], token: &str) -> Value {
    let mut all = vec!["-c", config, "--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = cli(&all, Some(token)).await;
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} answered {out}: {e}"))
}

/// The CLI test's keyed top-up of 12.50 EUR to `user`; a repeat credits nothing more.
async fn cli_keyed_topup(config: &str, user: &str, token: &str) -> (bool, String, String) {
    let args = [
        "-c",
        config,
        "topup",
        user,
        "12.50",
        "EUR",
        "--key",
        "it-order-1",
    ];
    cli(&args, Some(token)).await
}

/// The `acme` provider's signature of `body` at the current wall-clock second.
fn acme_signature_now(body: &str) -> String {
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    webhook::sign(
        &WebhookSecret::new(ACME_SECRET.to_vec()),
        now_s,
        body.as_bytes(),
    )
}

/// Posts `body` with `signature` to the `acme` webhook of the mxpay at `url`.
async fn post_acme_webhook(url: &str, signature: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/_mxpay/admin/v1/webhooks/acme"))
        .header(webhook::SIGNATURE_HEADER, signature)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The real binary over real Synapse: `mxpay serve` with an `admin:` section (key from a
/// file, provider secret from the environment), driven by the real `mxpay admin` CLI.
#[tokio::test]
async fn cli_against_running_mxpay_shows_balance_after_topup() {
    use crate::support::{self, MxpayOptions, MxpayProcess, SlotKind};
    let mut lease = support::synapse()
        .lease(SlotKind::Normal, "admin-cli")
        .await;
    let (yaml, secret) = admin_yaml(&lease.dir);
    lease.config.extra_yaml = format!(
        "{yaml}  providers:\n    - name: acme\n      secret: {{ env: MXPAY_IT_ACME_SECRET }}\n"
    );
    lease.write_config();
    let mut mxpay = MxpayProcess::start_with(
        &lease,
        MxpayOptions {
            env: vec![(
                "MXPAY_IT_ACME_SECRET".to_owned(),
                String::from_utf8_lossy(ACME_SECRET).into_owned(),
            )],
            ..Default::default()
        },
    )
    .await;
    let alice = support::user("alice").await;
    let alice_id = alice.user_id.to_string();
    let config = lease.config_path();
    let config = config.to_str().unwrap();

    let token = cli_token(
        config,
        &[
            "--scope",
            "topup,read,freeze",
            "--scope",
            "audit",
            "--ttl",
            "10m",
            "--subject",
            "it-ops",
        ],
    )
    .await;
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let (ok, out, err) = cli_keyed_topup(config, &alice_id, &token).await;
    assert!(ok, "topup failed: {err}");
    assert!(out.contains("credited 12.50 EUR"), "{out}");
    // The same key again credits nothing more.
    let (ok, _, err) = cli_keyed_topup(config, &alice_id, &token).await;
    assert!(ok, "{err}");
    // A bad amount is refused with the API's sentence and a failing exit status.
    let (ok, _, err) = cli(
        &["-c", config, "topup", &alice_id, "1.001", "EUR"],
        Some(&token),
    )
    .await;
    assert!(!ok);
    assert!(err.contains("EUR has 2 decimal places"), "{err}");

    // A signed provider webhook over the socket.
    let body = json!({
        "type": "topup.succeeded", "event_id": "it_evt_1", "user_id": alice_id,
        "amount": "7.50", "currency": "EUR",
    })
    .to_string();
    let signature = acme_signature_now(&body);
    for _ in 0..2 {
        let response = post_acme_webhook(&mxpay.url, &signature, &body).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    let (ok, out, err) = cli(&["-c", config, "balance", &alice_id], Some(&token)).await;
    assert!(ok, "balance failed: {err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("EUR"))
        .unwrap_or_else(|| panic!("no EUR row: {out}"));
    assert_eq!(row.split_whitespace().nth(1), Some("20.00"), "{out}");

    let history = cli_json(config, &["history", &alice_id], &token).await;
    let amounts: Vec<&str> = history["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["amount"].as_str().unwrap())
        .collect();
    assert_eq!(amounts, ["7.50", "12.50"]);

    let (ok, out, _) = cli(&["-c", config, "freeze", &alice_id], Some(&token)).await;
    assert!(ok && out.contains("debits"), "{out}");
    let (ok, _, _) = cli(&["-c", config, "unfreeze", &alice_id], Some(&token)).await;
    assert!(ok);
    let (ok, out, err) = cli(&["-c", config, "verify"], Some(&token)).await;
    assert!(ok && out.starts_with("ledger OK"), "{out} {err}");
    let (ok, out, err) = cli(&["-c", config, "export"], Some(&token)).await;
    assert!(ok, "{err}");
    let created: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["type"] == "transfer_created")
        .collect();
    assert_eq!(created.len(), 2, "{out}");
    assert!(created
        .iter()
        .all(|l| l["to"]["owner"] == alice_id.as_str()));

    // Without the scope: refused, and the CLI says why.
    let read_only = cli_token(config, &["--scope", "read"]).await;
    let (ok, _, err) = cli(&["-c", config, "pending"], Some(&read_only)).await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &["-c", config, "topup", &alice_id, "1", "EUR"],
        Some(&read_only),
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("M_FORBIDDEN") && err.contains("topup"),
        "{err}"
    );
    let (ok, _, err) = cli(&["-c", config, "balance", &alice_id], None).await;
    assert!(!ok && err.contains("MXPAY_ADMIN_TOKEN"), "{err}");

    // `token create` names the token's id on stderr; `token revoke` makes the running mxpay
    // refuse it, while other tokens keep working.
    let (ok, leaked, err) = cli(&["-c", config, "token", "create", "--scope", "read"], None).await;
    assert!(ok, "{err}");
    let jti = err
        .split("token id (jti): ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no jti on stderr: {err}"));
    assert_eq!(jti.len(), 32, "{err}");
    let leaked = leaked.trim();
    let (ok, _, err) = cli(&["-c", config, "pending"], Some(leaked)).await;
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["-c", config, "token", "revoke", jti], Some(leaked)).await;
    assert!(
        ok && out.contains(&format!("token {jti} revoked")),
        "{out} {err}"
    );
    let (ok, _, err) = cli(&["-c", config, "pending"], Some(leaked)).await;
    assert!(
        !ok && err.contains("M_UNKNOWN_TOKEN") && err.contains("revoked"),
        "{err}"
    );
    let (ok, _, err) = cli(&["-c", config, "pending"], Some(&read_only)).await;
    assert!(ok, "{err}");

    let (ok, out, err) = cli(&["-c", config, "audit", "--limit", "100"], Some(&token)).await;
    assert!(ok, "{err}");
    for action in [
        "topup",
        "webhook.topup",
        "accounts",
        "history",
        "freeze",
        "unfreeze",
        "ledger.verify",
        "pending",
    ] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().nth(3) == Some(action)),
            "no {action} in the audit log:\n{out}"
        );
    }
    assert!(out.contains("it-ops"), "{out}");

    // After a SIGKILL and restart, the same webhook and the same top-up key credit nothing.
    mxpay.restart().await;
    let signature = acme_signature_now(&body);
    let response = post_acme_webhook(&mxpay.url, &signature, &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["replay"], true, "{answer}");
    let (ok, _, err) = cli_keyed_topup(config, &alice_id, &token).await;
    assert!(ok, "{err}");
    let balance = cli_json(config, &["balance", &alice_id], &token).await;
    assert_eq!(balance["accounts"][0]["available"], "20.00", "{balance}");
    // The audit log's chain survived the kill too (mxpay checks it when it opens the log).
    let (ok, out, err) = cli(&["-c", config, "audit", "--limit", "500"], Some(&token)).await;
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.contains("webhook.topup")), "{out}");
    // The secret never reaches mxpay's log.
    let log = mxpay.log();
    assert!(!log.contains(std::str::from_utf8(&secret).unwrap()));
    assert!(!log.contains(std::str::from_utf8(ACME_SECRET).unwrap()));
}

/// `App` opens the ledger and the admin state from the config and mounts the admin API on the
/// appservice router; a missing secret stops it with the key's name, never the secret.
#[tokio::test]
async fn app_mounts_the_admin_api_from_the_config() {
    use mxpay::app::App;
    use mxpay::config::Config;
    use mxpay::registration::Registration;
    let dir = tempfile::tempdir().unwrap();
    let (yaml, secret) = admin_yaml(dir.path());
    let mut config =
        Config::from_yaml(&format!("data_dir: {}\n{yaml}", dir.path().display())).unwrap();
    config.resolve_paths(dir.path());
    let app = App::open(config.clone(), Registration::generate(&config)).unwrap();
    assert!(app.admin().is_some());
    let topup = |token: String| {
        Request::post("/_mxpay/admin/v1/topups")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(
                json!({"user_id": ALICE, "amount": "4.00", "currency": "EUR", "idempotency_key": "app-1"})
                    .to_string(),
            ))
            .unwrap()
    };
    let response = app
        .router()
        .oneshot(topup(mint(&secret, &[Scope::Topup])))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let balances = app.ledger().balances(&Owner::user(ALICE)).await.unwrap();
    assert_eq!(balances[0].balances.available_minor(), 400);
    // The appservice routes are still there.
    let response = app
        .router()
        .oneshot(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(app);

    std::fs::remove_file(dir.path().join("admin-jwt.key")).unwrap();
    // A fresh data dir: sled's threads may still hold the dropped App's database locks.
    config.data_dir = dir.path().join("again");
    let error = App::open(config.clone(), Registration::generate(&config))
        .unwrap_err()
        .to_string();
    assert!(error.contains("admin.token.secret.file"), "{error}");
    assert!(!error.contains(std::str::from_utf8(&secret).unwrap()));
}

/// Bytes of every file under `dir`, recursively.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[tokio::test]
async fn ten_thousand_refused_calls_grow_the_data_dir_by_less_than_a_mib() {
    const CALLS: u32 = 10_000;
    const GROWTH_BYTES_MAX: u64 = 1 << 20;
    let h = Harness::new();
    let data_dir = h._dir.path().to_owned();
    let before = dir_bytes(&data_dir);
    // The report's flood: top-ups without a valid token, each with a 60 KiB user ID, from
    // many loopback peers. The clock stands still, so the limits never refill.
    let body = axum::body::Bytes::from(
        json!({
            "user_id": format!("@{}:example.org", "a".repeat(60 * 1024)),
            "amount": "1.00", "currency": "EUR", "idempotency_key": "flood",
        })
        .to_string(),
    );
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    let mut limited = None;
    for i in 0..CALLS {
        let mut request =
            Request::post("/_mxpay/admin/v1/topups").header("content-type", "application/json");
        if i % 2 == 0 {
            request = request.header("authorization", "Bearer not-a-jwt");
        }
        let mut request = request.body(Body::from(body.clone())).unwrap();
        let peer = std::net::SocketAddr::from(([127, 0, (i % 7) as u8, (i % 251) as u8], 40_000));
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let response = h.router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        if status == 429 && limited.is_none() {
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            limited = Some(serde_json::from_slice::<Value>(&bytes).unwrap());
        }
        // Checked along the way, so the old behaviour fails in a second, not a disk later.
        if i % 500 == 499 {
            let grown = dir_bytes(&data_dir) - before;
            assert!(
                grown < GROWTH_BYTES_MAX,
                "{grown} bytes after {} calls",
                i + 1
            );
        }
    }
    let grown = dir_bytes(&data_dir) - before;
    assert!(
        grown < GROWTH_BYTES_MAX,
        "{grown} bytes after {CALLS} calls"
    );
    // All refused: answered and audited up to the overall limit (60 a minute), then 429.
    assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), [401, 429]);
    assert_eq!(statuses[&401], 60, "{statuses:?}");
    let limited = limited.unwrap();
    assert_eq!(limited["errcode"], "M_LIMIT_EXCEEDED", "{limited}");
    assert_eq!(limited["retry_after_ms"], 1000, "{limited}");

    // A genuine admin is not limited by the flood; the log holds the audited refusals, and
    // one line counting the suppressed ones before the next audited call.
    let (status, body) = h.topup(ALICE, "1.00", "EUR", "after-flood").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = h.call("POST", "/topups", Some("not-a-jwt"), None).await;
    assert_eq!(status, 429);
    h.clock.advance_ms(1_000);
    let (status, _) = h.call("POST", "/topups", Some("not-a-jwt"), None).await;
    assert_eq!(status, 401);
    let audit = h.audit().await;
    let counts: Vec<(&str, &str)> = audit
        .iter()
        .filter(|e| e["action"] == "refusals.limited")
        .map(|e| (e["target"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(
        counts,
        [
            (
                "1 refused calls answered 429 without an entry",
                "rate-limit"
            ),
            (
                &*format!("{} refused calls answered 429 without an entry", CALLS - 60),
                "rate-limit"
            ),
        ]
    );
    let refused_topups = audit
        .iter()
        .filter(|e| e["action"] == "topup" && e["result"] != "ok")
        .count();
    assert_eq!(refused_topups, 61);
    // A refused call's body is never read: no entry names the flood's user.
    assert!(audit
        .iter()
        .filter(|e| e["action"] == "topup")
        .all(|e| e["target"] == "" || e["target"] == ALICE));
}

/// A request body that records whether anyone polled it.
fn watched_body(polled: &Arc<std::sync::atomic::AtomicBool>) -> Body {
    let polled = polled.clone();
    Body::from_stream(futures_util::stream::once(async move {
        polled.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{}"))
    }))
}

#[tokio::test]
async fn a_refused_call_s_body_is_never_read() {
    let h = Harness::new();
    let user = enc(ALICE);
    for path in [
        "/topups".to_owned(),
        format!("/users/{user}/freeze"),
        format!("/users/{user}/pin-reset"),
        "/webhooks/no-such-provider".to_owned(),
    ] {
        for token in [None, Some("not-a-jwt")] {
            let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut request = Request::post(format!("/_mxpay/admin/v1{path}"));
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            let (status, answer) = h.send(request.body(watched_body(&polled)).unwrap()).await;
            assert!([401, 404].contains(&status.as_u16()), "{path}: {answer}");
            assert!(
                !polled.load(std::sync::atomic::Ordering::SeqCst),
                "{path} {token:?}: the body of a refused call was read"
            );
        }
    }
    // An authorised call reads it.
    let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let request = Request::post(format!("/_mxpay/admin/v1/users/{user}/freeze"))
        .header("authorization", format!("Bearer {}", h.all_scopes()))
        .body(watched_body(&polled))
        .unwrap();
    let (status, answer) = h.send(request).await;
    assert_eq!(status, 200, "{answer}");
    assert!(polled.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test]
async fn refused_calls_are_limited_per_peer_on_the_real_listener() {
    use mxpay::app::App;
    use mxpay::config::Config;
    use mxpay::registration::Registration;
    let dir = tempfile::tempdir().unwrap();
    let (yaml, secret) = admin_yaml(dir.path());
    let mut config = Config::from_yaml(&format!(
        "data_dir: {}
appservice: {{listen: '127.0.0.1:0'}}
{yaml}  \
         refused_calls_per_peer_per_min: 2\n",
        dir.path().display()
    ))
    .unwrap();
    config.resolve_paths(dir.path());
    let app = App::open(config.clone(), Registration::generate(&config)).unwrap();
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (addr, server) = mxpay::app::start_server(&app, shutdown_rx).await.unwrap();
    let url = format!("http://{addr}/_mxpay/admin/v1/transfers/pending");
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = client
            .get(&url)
            .bearer_auth("not-a-jwt")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{body}");
            assert!(body["retry_after_ms"].as_u64().unwrap() > 0, "{body}");
        }
    }
    // Two a minute from this peer (the overall limit is 60): the third is limited.
    assert_eq!(statuses, [401, 401, 429]);
    // A genuine token from the same peer still works.
    let response = client
        .get(&url)
        .bearer_auth(mint(&secret, &[Scope::Read]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = shutdown_tx.send(true);
    let _ = server.await;
}

/// A PIN store that records resets: the user and whether the reset accepted new keys.
#[derive(Default)]
struct FakePins(parking_lot::Mutex<Vec<(String, bool)>>);

#[async_trait::async_trait]
impl mxpay::admin::service::PinReset for FakePins {
    async fn reset_pin_with(&self, user_id: &str, accept_new_keys: bool) -> Result<bool, String> {
        let mut resets = self.0.lock();
        resets.push((user_id.to_owned(), accept_new_keys));
        Ok(resets.len() == 1)
    }
}

#[tokio::test]
async fn pin_reset_needs_its_scope_and_a_pin_store() {
    let h = Harness::new();
    let path = format!("/users/{}/pin-reset", enc(ALICE));
    let token = h.token(&[Scope::PinReset]);
    let (status, body) = h.call("POST", &path, Some(&token), None).await;
    assert_eq!(status, 501, "no PIN store yet: {body}");
    let pins = Arc::new(FakePins::default());
    h.state.set_pin_reset(pins.clone());
    let (status, body) = h
        .call("POST", &path, Some(&h.token(&[Scope::Freeze])), None)
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = h.call("POST", &path, Some(&token), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["had_pin"], true);
    let (status, body) = h
        .call("POST", "/users/alice/pin-reset", Some(&token), None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(*pins.0.lock(), [(ALICE.to_owned(), false)]);
    let audit = h.audit().await;
    let results: Vec<&str> = audit
        .iter()
        .filter(|e| e["action"] == "pin-reset")
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        results,
        ["M_INVALID_PARAM", "ok", "M_FORBIDDEN", "M_UNRECOGNIZED"]
    );
}

/// `{"accept_new_keys": true}` reaches the PIN store, is answered and has its own audit
/// action; an absent body, `{}` and `false` are a plain reset; anything else is refused before
/// anything is reset, and only once the caller is authorised.
#[tokio::test]
async fn pin_reset_accepts_new_keys_only_when_asked() {
    let h = Harness::new();
    let pins = Arc::new(FakePins::default());
    h.state.set_pin_reset(pins.clone());
    let path = format!("/users/{}/pin-reset", enc(ALICE));
    let token = h.token(&[Scope::PinReset]);
    let accept = json!({ "accept_new_keys": true });

    for body in [
        None,
        Some(json!({})),
        Some(json!({ "accept_new_keys": false })),
    ] {
        let (status, answer) = h.call("POST", &path, Some(&token), body.clone()).await;
        assert_eq!(status, 200, "{body:?}: {answer}");
        assert_eq!(answer["accept_new_keys"], false, "{body:?}: {answer}");
        assert_eq!(answer["user_id"], ALICE);
    }
    let (status, answer) = h
        .call("POST", &path, Some(&token), Some(accept.clone()))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({ "user_id": ALICE, "had_pin": false, "accept_new_keys": true })
    );

    for body in [
        json!({ "accept_new_keys": true, "also": 1 }),
        json!({ "accept_new_keys": "yes" }),
        json!({ "accept_new_keys": null }),
        json!(true),
        json!([]),
    ] {
        let (status, answer) = h
            .call("POST", &path, Some(&token), Some(body.clone()))
            .await;
        assert_eq!(
            (status.as_u16(), answer["errcode"].as_str()),
            (400, Some("M_BAD_JSON")),
            "{body}: {answer}"
        );
    }
    // Not JSON at all.
    let request = Request::post(format!("/_mxpay/admin/v1{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Body::from("accept_new_keys"))
        .unwrap();
    let (status, answer) = h.send(request).await;
    assert_eq!(
        (status.as_u16(), answer["errcode"].as_str()),
        (400, Some("M_BAD_JSON")),
        "{answer}"
    );
    // Authorisation comes first, for a good body or a bad one; a genuine token's attempts are
    // audited under the action they asked for. An unauthenticated call's body is never read
    // (issue 11, floods), so it is audited as a plain `pin-reset`.
    let (status, _) = h.call("POST", &path, None, Some(accept.clone())).await;
    assert_eq!(status, 401);
    let freeze = h.token(&[Scope::Freeze]);
    let (status, _) = h.call("POST", &path, Some(&freeze), Some(accept)).await;
    assert_eq!(status, 403);
    let (status, _) = h
        .call("POST", &path, Some(&freeze), Some(json!({ "also": 1 })))
        .await;
    assert_eq!(status, 403);

    assert_eq!(
        *pins.0.lock(),
        [
            (ALICE.to_owned(), false),
            (ALICE.to_owned(), false),
            (ALICE.to_owned(), false),
            (ALICE.to_owned(), true),
        ]
    );
    let audit: Vec<(String, String)> = h
        .audit()
        .await
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("pin-reset"))
        .map(|e| {
            assert_eq!(e["target"], ALICE, "{e}");
            let field = |name: &str| e[name].as_str().unwrap().to_owned();
            (field("action"), field("result"))
        })
        .collect();
    let entry = |action: &str, result: &str| (action.to_owned(), result.to_owned());
    let plain = "pin-reset";
    let keys = "pin-reset.accept-new-keys";
    assert_eq!(
        audit,
        [
            // Newest first.
            entry(plain, "M_FORBIDDEN"),
            entry(keys, "M_FORBIDDEN"),
            entry(plain, "M_MISSING_TOKEN"),
            entry(plain, "M_BAD_JSON"),
            entry(plain, "M_BAD_JSON"),
            entry(plain, "M_BAD_JSON"),
            entry(plain, "M_BAD_JSON"),
            entry(plain, "M_BAD_JSON"),
            entry(plain, "M_BAD_JSON"),
            entry(keys, "ok"),
            entry(plain, "ok"),
            entry(plain, "ok"),
            entry(plain, "ok"),
        ]
    );
}

/// Through the API into the real PIN store: a confirming reset marks the profile of a user
/// who never set a PIN, so their first `!pin set` accepts their keys; a plain one does not.
#[tokio::test]
async fn pin_reset_accepting_new_keys_marks_the_profile_in_the_pin_store() {
    let h = Harness::new();
    let dir = tempfile::tempdir().unwrap();
    let store = mxpay::store::PaymentStore::open(dir.path()).unwrap();
    h.state.set_pin_reset(Arc::new(store.clone()));
    let token = h.token(&[Scope::PinReset]);
    let reset = async |user: &str, body: Option<Value>| {
        let path = format!("/users/{}/pin-reset", enc(user));
        h.call("POST", &path, Some(&token), body).await
    };
    let (status, answer) = reset(BOB, None).await;
    assert_eq!(status, 200, "{answer}");
    assert!(!store.profile(BOB).unwrap().accept_new_keys_at_pin_set);
    let (status, answer) = reset(ALICE, Some(json!({ "accept_new_keys": true }))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["had_pin"], false);
    assert_eq!(answer["accept_new_keys"], true);
    assert!(store.profile(ALICE).unwrap().accept_new_keys_at_pin_set);
    assert!(store.pin(ALICE).unwrap().is_none(), "no PIN record is made");
    assert!(!store.profile(BOB).unwrap().accept_new_keys_at_pin_set);
}

/// Payments and the admin API together over the real binary: alice withdraws with her PIN,
/// the operator sees the pending withdrawal and settles it with `mxpay admin`, alice is told;
/// then an admin PIN reset makes her set a new PIN before she can withdraw again.
#[tokio::test]
async fn withdrawal_settled_and_pin_reset_through_the_cli() {
    use crate::support::{self, MxpayOptions, MxpayProcess, RoomOptions, SlotKind, TestClient};
    use matrix_sdk::ruma::api::client::room::create_room::v3::RoomPreset;
    use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
    use matrix_sdk::ruma::RoomId;

    const PIN: &str = "5937";
    async fn say(client: &TestClient, room: &RoomId, text: &str) {
        client
            .room(room)
            .await
            .send(RoomMessageEventContent::text_plain(text))
            .await
            .unwrap_or_else(|e| panic!("sending {text:?}: {e}"));
    }

    let alice_user = support::user("alice").await;
    let mut lease = support::synapse()
        .lease(SlotKind::Normal, "admin-withdraw")
        .await;
    let pepper = lease.dir.join("pepper");
    support::write_secret(&pepper, support::random_suffix(48));
    let (admin, _) = admin_yaml(&lease.dir);
    lease.config.extra_yaml = format!(
        "payments:\n  enabled: true\n  pepper_file: {}\n  hold_for_new_payees: false\n{admin}",
        pepper.display()
    );
    lease.write_config();
    let _mxpay = MxpayProcess::start_with(&lease, MxpayOptions::default()).await;
    let bot = lease.spec.bot_user_id();
    let config = lease.config_path();
    let config = config.to_str().unwrap();
    let token = cli_token(config, &["--scope", "topup,read,settle,pin-reset"]).await;

    let alice = support::client(&alice_user).await;
    alice.bootstrap_cross_signing().await;
    let alice_id = alice.user.user_id.to_string();
    let dm = alice
        .create_room(RoomOptions {
            encrypted: true,
            preset: Some(RoomPreset::TrustedPrivateChat),
            invite: vec![bot.as_str().try_into().unwrap()],
            is_direct: true,
            ..Default::default()
        })
        .await
        .room_id()
        .to_owned();
    alice.wait_for_membership(&dm, &bot, "join").await;
    say(&alice, &dm, "!pin set").await;
    alice
        .wait_for_message(&dm, &bot, |b| b.contains("Choose a 4-digit PIN"))
        .await;
    say(&alice, &dm, PIN).await;
    alice
        .wait_for_message(&dm, &bot, |b| b.contains("Send the same PIN again"))
        .await;
    say(&alice, &dm, PIN).await;
    alice
        .wait_for_message(&dm, &bot, |b| b.contains("Your PIN is set"))
        .await;

    let (ok, _, err) = cli(
        &["-c", config, "topup", &alice_id, "50.00", "EUR"],
        Some(&token),
    )
    .await;
    assert!(ok, "{err}");
    alice
        .wait_for_message(&dm, &bot, |b| b.contains("topped up with 50.00 EUR"))
        .await;

    say(&alice, &dm, "!withdraw 20 EUR").await;
    alice
        .wait_for_message(&dm, &bot, |b| b.contains("Confirm withdrawing 20.00 EUR"))
        .await;
    say(&alice, &dm, PIN).await;
    alice
        .wait_for_message(&dm, &bot, |b| {
            b.contains("Withdrawal of 20.00 EUR confirmed")
        })
        .await;

    // The operator's view: the withdrawal waits, reserved.
    let pending = cli_json(config, &["pending"], &token).await;
    let withdrawal = pending["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["from"] == alice_id.as_str() && t["to"] == "system:settlement")
        .unwrap_or_else(|| panic!("no pending withdrawal: {pending}"))
        .clone();
    assert_eq!(withdrawal["amount"], "20.00");
    let balance = cli_json(config, &["balance", &alice_id], &token).await;
    assert_eq!(balance["accounts"][0]["available"], "30.00", "{balance}");
    assert_eq!(balance["accounts"][0]["pending_out"], "20.00", "{balance}");

    let id = withdrawal["id"].as_str().unwrap();
    let (ok, out, err) = cli(&["-c", config, "settle", id], Some(&token)).await;
    assert!(ok, "{err}");
    assert!(out.contains("posted"), "{out}");
    alice
        .wait_for_message(&dm, &bot, |b| {
            b.contains("withdrawal of 20.00 EUR was paid out")
        })
        .await;
    let balance = cli_json(config, &["balance", &alice_id], &token).await;
    assert_eq!(balance["accounts"][0]["posted"], "30.00", "{balance}");
    assert_eq!(balance["accounts"][0]["pending_out"], "0.00", "{balance}");

    // After a PIN reset, alice must set a new PIN before money can leave again.
    let (ok, out, err) = cli(&["-c", config, "pin-reset", &alice_id], Some(&token)).await;
    assert!(ok, "{err}");
    assert!(out.contains("must set a new PIN"), "{out}");
    say(&alice, &dm, "!withdraw 5 EUR").await;
    alice
        .wait_for_message(&dm, &bot, |b| b.contains("you have no PIN yet"))
        .await;
    // The operator confirms her keys too: the running mxpay answers that it did.
    let (ok, out, err) = cli(
        &["-c", config, "pin-reset", &alice_id, "--accept-new-keys"],
        Some(&token),
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("security keys are accepted"), "{out}");
}
