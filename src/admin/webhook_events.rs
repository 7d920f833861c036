//! Webhook events to merchants, as the admin API shows them: list (with the failed ones
//! visible), look at one, replay one. The outbox itself is [`crate::webhooks`]; it is handed to
//! the admin state once it is open ([`AdminState::set_webhooks`]).

use serde::{Deserialize, Serialize};

use super::service::AdminState;
use super::AdminError;
use crate::webhooks::{DeliveryRecord, DeliveryState, ListFilter, WebhookError, WebhookOutbox};

/// Default page of `GET /webhook-events`.
pub const WEBHOOK_PAGE_DEFAULT: usize = 100;

/// One webhook event as the admin API answers it. Never holds the merchant's secret or URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEventJson {
    /// The event id (`Mxpay-Event-Id`).
    pub event_id: String,
    /// The merchant it goes to.
    pub merchant_id: String,
    /// `invoice.paid`, `invoice.expired`, `invoice.cancelled` or `refund.succeeded`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Attempts since it was enqueued or last replayed.
    pub attempts: u32,
    /// When it was enqueued, ms.
    pub created_ms: u64,
    /// When the next attempt is due, ms (pending only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at_ms: Option<u64>,
    /// No attempt after this, ms.
    pub retry_until_ms: u64,
    /// When the last attempt ended, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_ms: Option<u64>,
    /// HTTP status of the last answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// Reason code of the last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it was delivered or failed, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Times replayed.
    pub replays: u32,
    /// The body sent (only when one event is asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

impl WebhookEventJson {
    /// The view of `record`, with its body when `with_body`.
    pub fn new(record: &DeliveryRecord, with_body: bool) -> Self {
        Self {
            event_id: record.event_id.clone(),
            merchant_id: record.merchant_id.clone(),
            event_type: record.event_type.as_str().to_owned(),
            state: record.state.as_str().to_owned(),
            attempts: record.attempts,
            created_ms: record.created_ms,
            next_attempt_at_ms: (record.state == DeliveryState::Pending)
                .then_some(record.next_attempt_at_ms),
            retry_until_ms: record.retry_until_ms,
            last_attempt_ms: record.last_attempt_ms,
            last_status: record.last_status,
            last_error: record.last_error.clone(),
            finished_ms: record.finished_ms,
            replays: record.replays,
            body: with_body.then(|| {
                serde_json::from_str(&record.body)
                    .unwrap_or_else(|_| serde_json::Value::String(record.body.clone()))
            }),
        }
    }
}

/// One page of `GET /webhook-events`.
#[derive(Debug, Serialize, Deserialize)]
pub struct WebhookEventsPage {
    /// Events in event-id order.
    pub events: Vec<WebhookEventJson>,
    /// Pass as `after` for the next page; absent at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// What `POST /webhook-events/{event_id}/replay` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayResponse {
    /// The event, now pending.
    pub event: WebhookEventJson,
    /// False when it was pending already (nothing changed).
    pub replayed: bool,
}

/// Parses a `state` filter.
pub fn parse_state(text: &str) -> Result<DeliveryState, AdminError> {
    match text {
        "pending" => Ok(DeliveryState::Pending),
        "delivered" => Ok(DeliveryState::Delivered),
        "failed" => Ok(DeliveryState::Failed),
        other => Err(AdminError::InvalidParam(format!(
            "state `{other}` is not pending, delivered or failed"
        ))),
    }
}

impl From<WebhookError> for AdminError {
    fn from(error: WebhookError) -> Self {
        match error {
            WebhookError::NotFound(_) => AdminError::NotFound(error.to_string()),
            WebhookError::InvalidId { .. } => AdminError::InvalidParam(error.to_string()),
            other => AdminError::internal(other),
        }
    }
}

impl AdminState {
    /// Lets the admin API show and replay webhook events of `outbox` (opened after the admin
    /// API). Only the first call counts; until then these routes answer 501.
    pub fn set_webhooks(&self, outbox: WebhookOutbox) {
        let _ = self.webhooks.set(outbox);
    }

    fn webhooks(&self) -> Result<&WebhookOutbox, AdminError> {
        self.webhooks.get().ok_or(AdminError::WebhooksUnavailable)
    }

    /// A page of webhook events matching `filter`, after the event id `after`.
    pub async fn webhook_events(
        &self,
        filter: ListFilter,
        after: Option<String>,
        limit: usize,
    ) -> Result<WebhookEventsPage, AdminError> {
        let limit = limit.clamp(1, crate::webhooks::store::LIST_PAGE_MAX);
        let records = self.webhooks()?.list(filter, after, limit).await?;
        let next = (records.len() == limit)
            .then(|| records.last().map(|r| r.event_id.clone()))
            .flatten();
        Ok(WebhookEventsPage {
            events: records
                .iter()
                .map(|r| WebhookEventJson::new(r, false))
                .collect(),
            next,
        })
    }

    /// One webhook event, with its body.
    pub async fn webhook_event(&self, event_id: &str) -> Result<WebhookEventJson, AdminError> {
        let outbox = self.webhooks()?.clone();
        let id = event_id.to_owned();
        let record = tokio::task::spawn_blocking(move || outbox.store().get(&id))
            .await
            .map_err(AdminError::internal)??;
        let record = record.ok_or_else(|| WebhookError::NotFound(event_id.to_owned()))?;
        Ok(WebhookEventJson::new(&record, true))
    }

    /// Puts a delivered or failed event back to pending with a fresh retry schedule.
    pub async fn replay_webhook_event(&self, event_id: &str) -> Result<ReplayResponse, AdminError> {
        let (record, replayed) = self.webhooks()?.replay(event_id, None).await?;
        Ok(ReplayResponse {
            event: WebhookEventJson::new(&record, false),
            replayed,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::Request;
    use serde_json::Value;
    use tower::ServiceExt as _;
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use crate::admin::token::{AdminKey, Scope, TokenAuthority};
    use crate::clock::{SharedClock, SystemClock};
    use crate::ledger::{Ledger, LedgerSettings};
    use crate::webhooks::{
        Endpoint, EndpointSecret, EventType, WebhookEndpoints, WebhookPoke, WebhookPolicy,
        WebhookStore, WebhookWorker,
    };

    use super::*;

    const KEY: &[u8] = b"admin-test-secret-0123456789abcdef";

    struct One(url::Url);

    impl WebhookEndpoints for One {
        fn endpoint(&self, merchant_id: &str) -> Option<Endpoint> {
            (merchant_id == "cafe").then(|| Endpoint {
                url: self.0.clone(),
                secret: EndpointSecret::new(b"whsec_cafe".to_vec()),
            })
        }
    }

    async fn call(router: &axum::Router, method: &str, path: &str, token: &str) -> (u16, Value) {
        let request = Request::builder()
            .method(method)
            .uri(format!("/_mxpay/admin/v1{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn wait_for_state(outbox: &WebhookOutbox, event_id: &str, state: DeliveryState) {
        for _ in 0..3_000 {
            if outbox.store().get(event_id).unwrap().unwrap().state == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{event_id} never became {state:?}");
    }

    /// An operator lists the failed events, sees why, and replays one: the merchant's
    /// receiver gets it again. Without the `webhooks` scope the replay is refused.
    #[tokio::test]
    async fn an_operator_sees_failed_events_and_replays_them() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(410))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        let dir = tempfile::tempdir().unwrap();
        let clock: SharedClock = Arc::new(SystemClock);
        let ledger = Ledger::open(dir.path(), &LedgerSettings::default(), clock.clone()).unwrap();
        let key = AdminKey::Hs256 {
            secret: KEY.to_vec(),
        };
        let state = Arc::new(
            AdminState::new(&key, Vec::new(), 300, dir.path(), ledger, clock.clone()).unwrap(),
        );
        let router = crate::admin::router(Some(state.clone()));
        let tokens = TokenAuthority::new(&key, clock.clone()).unwrap();
        let mint = |scopes: &[Scope]| {
            let scopes: BTreeSet<Scope> = scopes.iter().copied().collect();
            tokens.mint("ops", scopes, 600).unwrap()
        };
        let reader = mint(&[Scope::Read]);
        let operator = mint(&[Scope::Read, Scope::Webhooks]);

        // Before the outbox is handed over: 501.
        let (status, body) = call(&router, "GET", "/webhook-events", &reader).await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (501, Some("M_UNRECOGNIZED"))
        );

        let policy = WebhookPolicy {
            poll_ms: 10,
            ..WebhookPolicy::default()
        };
        let store = WebhookStore::open(&dir.path().join("webhooks"), policy).unwrap();
        let poke = WebhookPoke::default();
        let outbox = WebhookOutbox::new(store.clone(), clock.clone(), poke.clone());
        state.set_webhooks(outbox.clone());
        let url = format!("{}/hook", server.uri()).parse().unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let task = WebhookWorker::new(store, Arc::new(One(url)), clock.clone(), poke)
            .with_metrics(metrics.clone())
            .spawn(stopped);
        outbox
            .enqueue(
                "cafe",
                EventType::InvoicePaid,
                "evt_gone",
                serde_json::json!({"n": 1}),
            )
            .await
            .unwrap();
        wait_for_state(&outbox, "evt_gone", DeliveryState::Failed).await;
        outbox
            .enqueue(
                "cafe",
                EventType::InvoiceExpired,
                "evt_ok",
                serde_json::json!({"n": 2}),
            )
            .await
            .unwrap();
        wait_for_state(&outbox, "evt_ok", DeliveryState::Delivered).await;

        let (status, page) = call(
            &router,
            "GET",
            "/webhook-events?state=failed&merchant=cafe",
            &reader,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{page}");
        assert_eq!(events[0]["event_id"], "evt_gone");
        assert_eq!(events[0]["last_status"], 410);
        assert_eq!(events[0]["last_error"], "receiver_gone");
        assert!(events[0].get("body").is_none());
        assert!(!page.to_string().contains("whsec_cafe"));
        assert!(!page.to_string().contains(&server.uri()));
        let (_, all) = call(&router, "GET", "/webhook-events?limit=1", &reader).await;
        assert_eq!(all["events"].as_array().unwrap().len(), 1);
        assert_eq!(all["next"], "evt_gone");
        let (_, rest) = call(&router, "GET", "/webhook-events?after=evt_gone", &reader).await;
        assert_eq!(rest["events"][0]["event_id"], "evt_ok");
        let (status, _) = call(&router, "GET", "/webhook-events?state=lost", &reader).await;
        assert_eq!(status, 400);

        let (status, one) = call(&router, "GET", "/webhook-events/evt_ok", &reader).await;
        assert_eq!(status, 200);
        assert_eq!(one["event"]["body"]["type"], "invoice.expired");
        assert_eq!(one["event"]["body"]["data"]["n"], 2);
        let (status, _) = call(&router, "GET", "/webhook-events/evt_nope", &reader).await;
        assert_eq!(status, 404);

        let replay = "/webhook-events/evt_gone/replay";
        let (status, body) = call(&router, "POST", replay, &reader).await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (403, Some("M_FORBIDDEN"))
        );
        let (status, body) = call(&router, "POST", replay, &operator).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["replayed"], true);
        assert_eq!(body["event"]["attempts"], 0);
        wait_for_state(&outbox, "evt_gone", DeliveryState::Delivered).await;
        assert_eq!(server.received_requests().await.unwrap().len(), 3);
        let (status, _) = call(
            &router,
            "POST",
            "/webhook-events/evt_nope/replay",
            &operator,
        )
        .await;
        assert_eq!(status, 404);

        let scrape = metrics.encode();
        for line in [
            r#"mxpay_webhook_deliveries_total{outcome="receiver_gone"} 1"#,
            r#"mxpay_webhook_deliveries_total{outcome="delivered"} 2"#,
        ] {
            assert!(scrape.contains(line), "{line} not in {scrape}");
        }
        let audit = state.audit.page(None, 50).unwrap();
        assert!(audit
            .iter()
            .any(|e| e.action == "webhooks.replay" && e.target == "evt_gone" && e.result == "ok"));
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
