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
    /// `homeserver_ping`.
    pub kind: &'static str,
}

/// All of mxpay's metrics. Share it behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    transactions_received: Family<TransactionLabels, Counter>,
    events: Family<EventLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    inbox_depth: Gauge,
    handler_duration_seconds: Histogram,
    event_types_seen: Mutex<HashSet<String>>,
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
        // 1 ms .. about 16 s.
        let handler_duration_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "handler_duration_seconds",
            "Time the transaction handler took per transaction (each attempt)",
            handler_duration_seconds.clone(),
        );
        Self {
            registry,
            transactions_received,
            events,
            errors,
            inbox_depth,
            handler_duration_seconds,
            event_types_seen: Mutex::new(HashSet::new()),
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

    /// Records one handler run.
    pub fn handler_duration(&self, duration: std::time::Duration) {
        self.handler_duration_seconds
            .observe(duration.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
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
}
