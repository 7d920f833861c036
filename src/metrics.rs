//! Prometheus metrics (OpenMetrics text at `GET /metrics`).

use std::collections::HashSet;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Most distinct event-type label values; later types are counted as `other`, so a sender
/// inventing types cannot grow the metrics without bound.
pub const EVENT_TYPES_MAX: usize = 64;

/// Labels of `mxpay_transactions_received`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransactionLabels {
    /// `new` or `duplicate`.
    pub outcome: &'static str,
}

/// Labels of `mxpay_events`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The event `type` (or `other` beyond [`EVENT_TYPES_MAX`] distinct types).
    pub event_type: String,
}

/// Labels of `mxpay_errors`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Where: `http_auth`, `http_request`, `inbox`, `handler_transient`, `handler_permanent`,
    /// `send_transient` (a message of the send queue failed and is retried), `send_permanent`
    /// (given up), `homeserver_ping`.
    pub kind: &'static str,
}

/// Labels of `mxpay_payments`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PaymentLabels {
    /// `completed`, `declined`, `expired` or `failed` (an operating error, not a refusal).
    pub outcome: &'static str,
    /// For `declined`: the receipt's reason code (`insufficient_funds`, `pin_locked`, ...,
    /// a fixed set); `none` otherwise.
    pub reason: &'static str,
}

/// Labels of the homeserver request metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The endpoint's name: the ruma request type's path (e.g. `membership::join_room_by_id::v3`)
    /// or a fixed name for hand-built requests (`versions`). Never a raw path with ids in it.
    pub endpoint: &'static str,
}

/// Labels of `mxpay_homeserver_request_errors`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointErrorLabels {
    /// As [`EndpointLabels::endpoint`].
    pub endpoint: &'static str,
    /// `connect`, `timeout`, `status_4xx`, `status_5xx`, `status_429` or `malformed`.
    pub kind: &'static str,
}

/// Labels of `mxpay_webhook_deliveries`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `delivered`, or the failed attempt's reason code (`http_status`, `timeout`,
    /// `connect_failed`, `redirect_not_followed`, `receiver_gone`, `endpoint_unavailable`,
    /// `request_failed`): a fixed set.
    pub outcome: &'static str,
}

/// Refreshes gauges that are read from elsewhere at scrape time (e.g. the parked-event count).
type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// All of mxpay's metrics. Share it behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    transactions_received: Family<TransactionLabels, Counter>,
    events: Family<EventLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    inbox_depth: Gauge,
    inbox_failed_dropped: Counter,
    handler_duration_seconds: Histogram,
    event_types_seen: Mutex<HashSet<String>>,
    payments: Family<PaymentLabels, Counter>,
    pin_failures: Counter,
    pin_lockouts: Counter,
    ledger_batch_commands: Histogram,
    ledger_commit_duration_seconds: Histogram,
    outbox_depth: Gauge,
    outbox_oldest_age_seconds: Gauge,
    send_queue_depth: Gauge,
    send_queue_rooms: Gauge,
    crypto_parked_events: Gauge,
    crypto_replayed_events: Counter,
    homeserver_request_duration_seconds: Family<EndpointLabels, Histogram>,
    homeserver_request_errors: Family<EndpointErrorLabels, Counter>,
    webhook_deliveries: Family<WebhookLabels, Counter>,
    webhooks_pending: Gauge,
    webhooks_failed: Gauge,
    scrape_hooks: Mutex<Vec<ScrapeHook>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mxpay");
        let transactions_received = Family::<TransactionLabels, Counter>::default();
        registry.register(
            "transactions_received",
            "Appservice transactions received, by outcome (new or duplicate id)",
            transactions_received.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Events in processed transactions, by event type",
            events.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("errors", "Errors, by kind", errors.clone());
        let inbox_depth = Gauge::default();
        registry.register(
            "inbox_depth",
            "Transactions stored but not yet processed",
            inbox_depth.clone(),
        );
        let inbox_failed_dropped = Counter::default();
        registry.register(
            "inbox_failed_dropped",
            "Failed transactions deleted after their retention (time or count)",
            inbox_failed_dropped.clone(),
        );
        // 1 ms .. about 16 s.
        let handler_duration_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "handler_duration_seconds",
            "Time the transaction handler took per transaction (each attempt)",
            handler_duration_seconds.clone(),
        );
        let payments = Family::<PaymentLabels, Counter>::default();
        registry.register(
            "payments",
            "Payments and withdrawals that ended, by outcome and (declined) reason",
            payments.clone(),
        );
        let pin_failures = Counter::default();
        registry.register(
            "pin_failures",
            "Wrong PINs entered (step-up confirmations and PIN changes)",
            pin_failures.clone(),
        );
        let pin_lockouts = Counter::default();
        registry.register(
            "pin_lockouts",
            "PINs locked after too many wrong attempts",
            pin_lockouts.clone(),
        );
        // 1 .. 8,192 commands.
        let ledger_batch_commands = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "ledger_batch_commands",
            "Commands (transfers, posts, reads...) decided per ledger batch",
            ledger_batch_commands.clone(),
        );
        // 50 µs .. about 1.6 s.
        let ledger_commit_duration_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "ledger_commit_duration_seconds",
            "Time to write one ledger batch durably (append, flush, fdatasync)",
            ledger_commit_duration_seconds.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Ledger changes read by the outbox and not yet told (up to one pass)",
            outbox_depth.clone(),
        );
        let send_queue_depth = Gauge::default();
        registry.register(
            "send_queue_depth",
            "Messages decided and handed to the send queue, not yet sent (or given up)",
            send_queue_depth.clone(),
        );
        let send_queue_rooms = Gauge::default();
        registry.register(
            "send_queue_rooms",
            "Rooms with messages in the send queue",
            send_queue_rooms.clone(),
        );
        let outbox_oldest_age_seconds = Gauge::default();
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest ledger change the outbox has not told yet (0 when none)",
            outbox_oldest_age_seconds.clone(),
        );
        let crypto_parked_events = Gauge::default();
        registry.register(
            "crypto_parked_events",
            "Encrypted events parked until their room key arrives",
            crypto_parked_events.clone(),
        );
        let crypto_replayed_events = Counter::default();
        registry.register(
            "crypto_replayed_events",
            "Encrypted events ignored because their ciphertext came before under another event id",
            crypto_replayed_events.clone(),
        );
        let homeserver_request_duration_seconds =
            Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
                // 1 ms .. about 33 s.
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            });
        registry.register(
            "homeserver_request_duration_seconds",
            "Time of each homeserver request attempt, by endpoint",
            homeserver_request_duration_seconds.clone(),
        );
        let homeserver_request_errors = Family::<EndpointErrorLabels, Counter>::default();
        registry.register(
            "homeserver_request_errors",
            "Failed homeserver request attempts, by endpoint and kind",
            homeserver_request_errors.clone(),
        );
        let webhook_deliveries = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts to merchants, by outcome",
            webhook_deliveries.clone(),
        );
        let webhooks_pending = Gauge::default();
        registry.register(
            "webhooks_pending",
            "Webhook events waiting for delivery",
            webhooks_pending.clone(),
        );
        let webhooks_failed = Gauge::default();
        registry.register(
            "webhooks_failed",
            "Webhook events given up on and kept (replayable)",
            webhooks_failed.clone(),
        );
        Self {
            registry,
            transactions_received,
            events,
            errors,
            inbox_depth,
            inbox_failed_dropped,
            handler_duration_seconds,
            event_types_seen: Mutex::new(HashSet::new()),
            payments,
            pin_failures,
            pin_lockouts,
            ledger_batch_commands,
            ledger_commit_duration_seconds,
            outbox_depth,
            send_queue_depth,
            send_queue_rooms,
            outbox_oldest_age_seconds,
            crypto_parked_events,
            crypto_replayed_events,
            homeserver_request_duration_seconds,
            homeserver_request_errors,
            webhook_deliveries,
            webhooks_pending,
            webhooks_failed,
            scrape_hooks: Mutex::new(Vec::new()),
        }
    }

    /// Counts a payment (or withdrawal) that ended with `outcome`; `reason` is the declined
    /// receipt's reason code (`none` for other outcomes).
    pub fn payment(&self, outcome: &'static str, reason: &'static str) {
        self.payments
            .get_or_create(&PaymentLabels { outcome, reason })
            .inc();
    }

    /// Counts one replayed encrypted event (ignored).
    pub fn replayed_event(&self) {
        self.crypto_replayed_events.inc();
    }

    /// Counts one wrong PIN.
    pub fn pin_failure(&self) {
        self.pin_failures.inc();
    }

    /// Counts one PIN lockout.
    pub fn pin_lockout(&self) {
        self.pin_lockouts.inc();
    }

    /// Records one durable ledger batch of `commands` that took `duration` to write.
    pub fn ledger_commit(&self, commands: usize, duration: std::time::Duration) {
        self.ledger_batch_commands.observe(commands as f64);
        self.ledger_commit_duration_seconds
            .observe(duration.as_secs_f64());
    }

    /// Sets the outbox's backlog: changes not yet told and the age of the oldest.
    pub fn set_outbox(&self, depth: usize, oldest_age_ms: u64) {
        self.outbox_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.outbox_oldest_age_seconds
            .set(i64::try_from(oldest_age_ms / 1000).unwrap_or(i64::MAX));
    }

    /// Sets the send queue's backlog: messages waiting or being sent, and rooms they are for.
    pub fn set_send_queue(&self, depth: usize, rooms: usize) {
        self.send_queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.send_queue_rooms
            .set(i64::try_from(rooms).unwrap_or(i64::MAX));
    }

    /// Counts one webhook delivery attempt that ended with `outcome`.
    pub fn webhook_delivery(&self, outcome: &'static str) {
        self.webhook_deliveries
            .get_or_create(&WebhookLabels { outcome })
            .inc();
    }

    /// Sets the webhook outbox's pending and failed counts.
    pub fn set_webhooks(&self, pending: usize, failed: usize) {
        self.webhooks_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.webhooks_failed
            .set(i64::try_from(failed).unwrap_or(i64::MAX));
    }

    /// Sets the number of parked (not yet decryptable) events.
    pub fn set_parked_events(&self, count: usize) {
        self.crypto_parked_events
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Records one homeserver request attempt to `endpoint`: its duration and, if it failed,
    /// the error kind (see [`EndpointErrorLabels::kind`]).
    pub fn homeserver_request(
        &self,
        endpoint: &'static str,
        duration: std::time::Duration,
        error_kind: Option<&'static str>,
    ) {
        self.homeserver_request_duration_seconds
            .get_or_create(&EndpointLabels { endpoint })
            .observe(duration.as_secs_f64());
        if let Some(kind) = error_kind {
            self.homeserver_request_errors
                .get_or_create(&EndpointErrorLabels { endpoint, kind })
                .inc();
        }
    }

    /// Runs `hook` before every encoding, to refresh gauges whose value lives elsewhere.
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.scrape_hooks.lock().push(Box::new(hook));
    }

    /// The error kind label for an HTTP status of a failed homeserver request.
    pub fn status_kind(status: u16) -> &'static str {
        match status {
            429 => "status_429",
            500..=599 => "status_5xx",
            _ => "status_4xx",
        }
    }

    /// Counts a received transaction (`duplicate`: its id was seen before).
    pub fn transaction_received(&self, duplicate: bool) {
        let outcome = if duplicate { "duplicate" } else { "new" };
        self.transactions_received
            .get_or_create(&TransactionLabels { outcome })
            .inc();
    }

    /// Counts one event of `event_type`.
    pub fn event(&self, event_type: &str) {
        let label = {
            let mut seen = self.event_types_seen.lock();
            if seen.contains(event_type) {
                event_type.to_owned()
            } else if seen.len() < EVENT_TYPES_MAX && event_type.len() <= 128 {
                seen.insert(event_type.to_owned());
                event_type.to_owned()
            } else {
                "other".to_owned()
            }
        };
        self.events
            .get_or_create(&EventLabels { event_type: label })
            .inc();
    }

    /// Counts an error of `kind` (see [`ErrorLabels::kind`]).
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    /// Sets the number of unprocessed transactions.
    pub fn set_inbox_depth(&self, depth: usize) {
        self.inbox_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Counts failed transactions deleted by their retention.
    pub fn inbox_failed_dropped(&self, count: usize) {
        self.inbox_failed_dropped
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// Records one handler run.
    pub fn handler_duration(&self, duration: std::time::Duration) {
        self.handler_duration_seconds
            .observe(duration.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        for hook in self.scrape_hooks.lock().iter() {
            hook(self);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_and_bounds_event_types() {
        let m = Metrics::new();
        m.transaction_received(false);
        m.transaction_received(true);
        m.event("m.room.message");
        m.event("m.room.message");
        for i in 0..(EVENT_TYPES_MAX + 10) {
            m.event(&format!("x.custom.{i}"));
        }
        m.error("inbox");
        m.set_inbox_depth(3);
        m.handler_duration(std::time::Duration::from_millis(5));
        let text = m.encode();
        assert!(
            text.contains(r#"mxpay_transactions_received_total{outcome="new"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"mxpay_transactions_received_total{outcome="duplicate"} 1"#));
        assert!(text.contains(r#"mxpay_events_total{event_type="m.room.message"} 2"#));
        assert!(
            text.contains(r#"mxpay_events_total{event_type="other"} 11"#),
            "{text}"
        );
        assert!(text.contains(r#"mxpay_errors_total{kind="inbox"} 1"#));
        assert!(text.contains("mxpay_inbox_depth 3"));
        assert!(text.contains("mxpay_handler_duration_seconds_count 1"));
        assert!(text.ends_with("# EOF\n"));
    }

    /// Value of the sample line starting with `prefix` (name and labels), if any.
    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn encodes_payment_ledger_outbox_crypto_and_homeserver_metrics() {
        let m = Metrics::new();
        // Every unlabelled metric is exposed before anything happened (labelled families
        // appear with their first sample).
        let empty = m.encode();
        for name in [
            "mxpay_pin_failures",
            "mxpay_pin_lockouts",
            "mxpay_ledger_batch_commands",
            "mxpay_ledger_commit_duration_seconds",
            "mxpay_outbox_depth",
            "mxpay_outbox_oldest_age_seconds",
            "mxpay_send_queue_depth",
            "mxpay_send_queue_rooms",
            "mxpay_crypto_parked_events",
        ] {
            assert!(
                empty.contains(&format!("# TYPE {name} ")),
                "{name}: {empty}"
            );
        }
        m.payment("completed", "none");
        m.payment("declined", "insufficient_funds");
        m.payment("declined", "insufficient_funds");
        m.pin_failure();
        m.pin_failure();
        m.pin_lockout();
        m.ledger_commit(3, std::time::Duration::from_micros(700));
        m.ledger_commit(1, std::time::Duration::from_micros(90));
        m.set_outbox(2, 4_500);
        let parked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = parked.clone();
        m.on_scrape(move |m| m.set_parked_events(seen.load(std::sync::atomic::Ordering::SeqCst)));
        parked.store(7, std::sync::atomic::Ordering::SeqCst);
        m.homeserver_request(
            "send_message_event::v3",
            std::time::Duration::from_millis(12),
            None,
        );
        m.homeserver_request(
            "send_message_event::v3",
            std::time::Duration::from_millis(30),
            Some(Metrics::status_kind(502)),
        );
        let text = m.encode();
        let at = |prefix: &str| sample(&text, prefix).unwrap_or_else(|| panic!("{prefix}: {text}"));
        assert_eq!(
            at(r#"mxpay_payments_total{outcome="completed",reason="none"}"#),
            1.0
        );
        assert_eq!(
            at(r#"mxpay_payments_total{outcome="declined",reason="insufficient_funds"}"#),
            2.0
        );
        assert_eq!(at("mxpay_pin_failures_total"), 2.0);
        assert_eq!(at("mxpay_pin_lockouts_total"), 1.0);
        assert_eq!(at("mxpay_ledger_batch_commands_count"), 2.0);
        assert_eq!(at("mxpay_ledger_batch_commands_sum"), 4.0);
        assert_eq!(at(r#"mxpay_ledger_batch_commands_bucket{le="1.0"}"#), 1.0);
        assert_eq!(at(r#"mxpay_ledger_batch_commands_bucket{le="4.0"}"#), 2.0);
        assert_eq!(at("mxpay_ledger_commit_duration_seconds_count"), 2.0);
        assert_eq!(
            at(r#"mxpay_ledger_commit_duration_seconds_bucket{le="0.0001"}"#),
            1.0
        );
        assert_eq!(at("mxpay_outbox_depth"), 2.0);
        assert_eq!(at("mxpay_outbox_oldest_age_seconds"), 4.0);
        assert_eq!(
            at("mxpay_crypto_parked_events"),
            7.0,
            "refreshed at scrape time"
        );
        assert_eq!(
            at(
                r#"mxpay_homeserver_request_duration_seconds_count{endpoint="send_message_event::v3"}"#
            ),
            2.0
        );
        assert_eq!(
            at(
                r#"mxpay_homeserver_request_errors_total{endpoint="send_message_event::v3",kind="status_5xx"}"#
            ),
            1.0
        );
        assert_eq!(Metrics::status_kind(429), "status_429");
        assert_eq!(Metrics::status_kind(403), "status_4xx");
        assert!(text.ends_with("# EOF\n"));
    }
}
