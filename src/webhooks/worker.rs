//! The delivery worker: sends due events to their merchants' endpoints over HTTP, a bounded
//! number at once, and records each answer in the store.
//!
//! Each attempt is its own task with a per-request timeout, and at most
//! `per_merchant_concurrency_max` run for one merchant, so a slow or dead receiver holds a few
//! slots and nothing else: other merchants' deliveries go on, and nothing here is on the
//! payment path (producers only write to the store). Redirects are not followed. Schedules are
//! read from the [`Clock`](crate::clock::Clock), so tests move time instead of sleeping.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use super::schedule::{Attempt, DeliveryRecord, Failure, WebhookPolicy};
use super::store::{Enqueued, ListFilter, Totals, WebhookStore};
use super::{EventType, WebhookEndpoints, WebhookError, EVENT_ID_HEADER, SIGNATURE_HEADER};
use crate::clock::SharedClock;
use crate::metrics::Metrics;

/// How often delivered records past their retention are pruned (clock time).
const HOUSEKEEPING_EVERY_MS: u64 = 60_000;

/// Wakes the worker at once (after an enqueue or a replay).
#[derive(Debug, Clone, Default)]
pub struct WebhookPoke(Arc<Notify>);

impl WebhookPoke {
    /// Makes the worker look for due events now.
    pub fn poke(&self) {
        self.0.notify_one();
    }
}

/// What producers, the admin API and the merchant API hold: the store, the clock and the
/// worker's poke. Every call runs the store on a blocking thread.
#[derive(Clone)]
pub struct WebhookOutbox {
    store: WebhookStore,
    clock: SharedClock,
    poke: WebhookPoke,
}

impl std::fmt::Debug for WebhookOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookOutbox").finish_non_exhaustive()
    }
}

impl WebhookOutbox {
    /// An outbox over `store`, waking the worker through `poke`.
    pub fn new(store: WebhookStore, clock: SharedClock, poke: WebhookPoke) -> Self {
        Self { store, clock, poke }
    }

    /// The store.
    pub fn store(&self) -> &WebhookStore {
        &self.store
    }

    /// Enqueues an event (idempotent by `event_id`, see [`WebhookStore::enqueue`]) and wakes
    /// the worker.
    pub async fn enqueue(
        &self,
        merchant_id: &str,
        event_type: EventType,
        event_id: &str,
        data: serde_json::Value,
    ) -> Result<Enqueued, WebhookError> {
        let store = self.store.clone();
        let (merchant_id, event_id) = (merchant_id.to_owned(), event_id.to_owned());
        let now_ms = self.clock.now_ms();
        let enqueued = tokio::task::spawn_blocking(move || {
            store.enqueue(&merchant_id, event_type, &event_id, data, now_ms)
        })
        .await??;
        if matches!(enqueued, Enqueued::New(_)) {
            self.poke.poke();
        }
        Ok(enqueued)
    }

    /// Replays a delivered or failed event (see [`WebhookStore::replay`]) and wakes the worker.
    pub async fn replay(
        &self,
        event_id: &str,
        merchant_id: Option<&str>,
    ) -> Result<(DeliveryRecord, bool), WebhookError> {
        let store = self.store.clone();
        let event_id = event_id.to_owned();
        let merchant_id = merchant_id.map(str::to_owned);
        let now_ms = self.clock.now_ms();
        let replayed = tokio::task::spawn_blocking(move || {
            store.replay(&event_id, merchant_id.as_deref(), now_ms)
        })
        .await??;
        self.poke.poke();
        Ok(replayed)
    }

    /// One page of records (see [`WebhookStore::list`]).
    pub async fn list(
        &self,
        filter: ListFilter,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, WebhookError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.list(&filter, after.as_deref(), limit)).await?
    }

    /// Wakes the worker (after the clock moved, in tests; after an endpoint changed).
    pub fn poke_worker(&self) {
        self.poke.poke();
    }

    /// Counts by state.
    pub fn totals(&self) -> Totals {
        self.store.totals()
    }
}

/// The delivery task.
pub struct WebhookWorker {
    store: WebhookStore,
    endpoints: Arc<dyn WebhookEndpoints>,
    clock: SharedClock,
    poke: WebhookPoke,
    http: reqwest::Client,
    metrics: Option<Arc<Metrics>>,
}

/// Builds the HTTP client deliveries use: no redirects (a 3xx is a failed attempt, so a signed
/// body goes only to the URL the merchant registered), the policy's timeout on every request.
pub fn http_client(policy: &WebhookPolicy) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_millis(policy.timeout_ms))
        .connect_timeout(Duration::from_millis(policy.timeout_ms))
        .user_agent(concat!("mxpay-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with these settings builds")
}

impl WebhookWorker {
    /// A worker sending `store`'s due events to the endpoints `endpoints` names.
    pub fn new(
        store: WebhookStore,
        endpoints: Arc<dyn WebhookEndpoints>,
        clock: SharedClock,
        poke: WebhookPoke,
    ) -> Self {
        let http = http_client(store.policy());
        Self {
            store,
            endpoints,
            clock,
            poke,
            http,
            metrics: None,
        }
    }

    /// The same worker, counting attempts and setting the pending and failed gauges.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs until `shutdown` turns true. Attempts still in flight then are dropped: their
    /// records stay pending and are sent again after the next start.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            if let Err(error) = self.run(shutdown).await {
                tracing::error!(%error, "the webhook worker stopped; webhooks wait for the next start");
            }
        })
    }

    fn report(&self) {
        if let Some(metrics) = &self.metrics {
            let totals = self.store.totals();
            metrics.set_webhooks(totals.pending, totals.failed);
        }
    }

    async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), WebhookError> {
        let policy = *self.store.policy();
        let poll = Duration::from_millis(policy.poll_ms);
        let mut tasks: JoinSet<(String, String)> = JoinSet::new();
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut per_merchant: HashMap<String, usize> = HashMap::new();
        let mut next_housekeeping_ms = 0u64;
        while !*shutdown.borrow() {
            let now_ms = self.clock.now_ms();
            if now_ms >= next_housekeeping_ms {
                let store = self.store.clone();
                let before_ms = now_ms.saturating_sub(policy.delivered_retention_ms);
                let pruned = tokio::task::spawn_blocking(move || {
                    store.prune_delivered(before_ms, usize::MAX)
                })
                .await??;
                if pruned > 0 {
                    tracing::debug!(pruned, "pruned delivered webhook events");
                }
                next_housekeeping_ms = now_ms.saturating_add(HOUSEKEEPING_EVERY_MS);
            }
            let free = policy.concurrency_max.saturating_sub(tasks.len());
            if free > 0 {
                let store = self.store.clone();
                let mut busy = per_merchant.clone();
                let skip_ids = in_flight.clone();
                let per_max = policy.per_merchant_concurrency_max;
                let due = tokio::task::spawn_blocking(move || {
                    store.due(now_ms, free, |event_id, merchant_id| {
                        if skip_ids.contains(event_id) {
                            return true;
                        }
                        let n = busy.entry(merchant_id.to_owned()).or_default();
                        if *n >= per_max {
                            return true;
                        }
                        *n += 1;
                        false
                    })
                })
                .await??;
                for record in due {
                    let n = per_merchant.entry(record.merchant_id.clone()).or_default();
                    if *n >= per_max || !in_flight.insert(record.event_id.clone()) {
                        continue;
                    }
                    *n += 1;
                    tasks.spawn(attempt(
                        record,
                        self.store.clone(),
                        self.endpoints.clone(),
                        self.clock.clone(),
                        self.http.clone(),
                        self.metrics.clone(),
                    ));
                }
            }
            self.report();
            tokio::select! {
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done {
                        Ok((event_id, merchant_id)) => {
                            in_flight.remove(&event_id);
                            if let Some(n) = per_merchant.get_mut(&merchant_id) {
                                *n -= 1;
                                if *n == 0 {
                                    per_merchant.remove(&merchant_id);
                                }
                            }
                        }
                        // A panicking attempt is a bug: stop, so it is seen (its record stays
                        // pending and is tried again after a restart).
                        Err(e) => return Err(WebhookError::Join(e)),
                    }
                }
                _ = self.poke.0.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.changed() => {}
            }
        }
        tasks.abort_all();
        Ok(())
    }
}

/// One delivery attempt of `record`, then its answer recorded. Returns (event id, merchant id).
async fn attempt(
    record: DeliveryRecord,
    store: WebhookStore,
    endpoints: Arc<dyn WebhookEndpoints>,
    clock: SharedClock,
    http: reqwest::Client,
    metrics: Option<Arc<Metrics>>,
) -> (String, String) {
    let policy = *store.policy();
    let outcome = send(&record, endpoints.as_ref(), clock.as_ref(), &http, &policy).await;
    let label = match outcome {
        Attempt::Delivered(_) => "delivered",
        Attempt::Failed(f) => f.code(),
    };
    if let Some(metrics) = &metrics {
        metrics.webhook_delivery(label);
    }
    let now_ms = clock.now_ms();
    let random: u64 = rand::random();
    let event_id = record.event_id.clone();
    let merchant_id = record.merchant_id.clone();
    let update_store = store.clone();
    let update_id = event_id.clone();
    let updated = tokio::task::spawn_blocking(move || {
        update_store.update(&update_id, |r| {
            r.after_attempt(outcome, now_ms, &policy, random)
        })
    })
    .await;
    match updated {
        Ok(Ok(Some(r))) => match outcome {
            Attempt::Delivered(status) => {
                tracing::debug!(event = %event_id, merchant = %merchant_id, status, "webhook delivered")
            }
            Attempt::Failed(failure) => tracing::warn!(
                event = %event_id,
                merchant = %merchant_id,
                reason = failure.code(),
                status = failure.status(),
                attempts = r.attempts,
                state = r.state.as_str(),
                next_attempt_at_ms = r.next_attempt_at_ms,
                "webhook delivery failed"
            ),
        },
        Ok(Ok(None)) => {}
        // The answer is lost; the record stays pending and the event is sent again.
        Ok(Err(error)) => {
            tracing::error!(event = %event_id, %error, "cannot record a webhook attempt")
        }
        Err(error) => {
            tracing::error!(event = %event_id, %error, "cannot record a webhook attempt")
        }
    }
    (event_id, merchant_id)
}

/// Sends `record` once to its merchant's endpoint and classifies the answer. The response
/// body is never read: only the status counts.
async fn send(
    record: &DeliveryRecord,
    endpoints: &dyn WebhookEndpoints,
    clock: &dyn crate::clock::Clock,
    http: &reqwest::Client,
    policy: &WebhookPolicy,
) -> Attempt {
    let Some(endpoint) = endpoints.endpoint(&record.merchant_id) else {
        return Attempt::Failed(Failure::EndpointUnavailable);
    };
    let timestamp_s = clock.now_ms() / 1_000;
    let signature = super::sign(
        endpoint.secret.expose(),
        timestamp_s,
        record.body.as_bytes(),
    );
    let request = http
        .post(endpoint.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature)
        .header(EVENT_ID_HEADER, &record.event_id)
        .body(record.body.clone())
        .send();
    // The client's timeout bounds the request; this one also bounds anything around it.
    let limit = Duration::from_millis(policy.timeout_ms.saturating_add(1_000));
    match tokio::time::timeout(limit, request).await {
        Err(_) => Attempt::Failed(Failure::Timeout),
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            match Failure::from_status(status) {
                None => Attempt::Delivered(status),
                Some(failure) => Attempt::Failed(failure),
            }
        }
        Ok(Err(e)) if e.is_timeout() => Attempt::Failed(Failure::Timeout),
        Ok(Err(e)) if e.is_connect() => Attempt::Failed(Failure::Connect),
        Ok(Err(_)) => Attempt::Failed(Failure::Request),
    }
}
