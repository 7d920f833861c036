//! The `webhooks:` section of the config: how webhooks to merchants are delivered
//! (`docs/webhooks.md`). Every value is bounded ([`crate::webhooks::schedule::bounds`]).

use serde::{Deserialize, Serialize};

use crate::webhooks::WebhookPolicy;

/// `webhooks:`. The defaults are [`WebhookPolicy::default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Longest wait for one delivery's answer, ms (1000 to 60000).
    pub timeout_ms: u64,
    /// How long an event is retried before it is failed, ms (1 minute to 30 days).
    pub retry_total_ms: u64,
    /// Shortest wait between attempts, ms; the jitter window doubles from it per attempt.
    pub backoff_base_ms: u64,
    /// Longest wait between attempts, ms (at most 1 day).
    pub backoff_cap_ms: u64,
    /// Deliveries in flight at once (1 to 256).
    pub concurrency_max: usize,
    /// Deliveries in flight at once to one merchant (1 to `concurrency_max`).
    pub per_merchant_concurrency_max: usize,
    /// How long delivered events are kept, ms.
    pub delivered_retention_ms: u64,
    /// Events kept in all.
    pub records_max: usize,
    /// Events waiting per merchant.
    pub pending_per_merchant_max: usize,
    /// Failed events kept per merchant.
    pub failed_per_merchant_max: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        let p = WebhookPolicy::default();
        Self {
            timeout_ms: p.timeout_ms,
            retry_total_ms: p.retry_total_ms,
            backoff_base_ms: p.backoff_base_ms,
            backoff_cap_ms: p.backoff_cap_ms,
            concurrency_max: p.concurrency_max,
            per_merchant_concurrency_max: p.per_merchant_concurrency_max,
            delivered_retention_ms: p.delivered_retention_ms,
            records_max: p.records_max,
            pending_per_merchant_max: p.pending_per_merchant_max,
            failed_per_merchant_max: p.failed_per_merchant_max,
        }
    }
}

impl WebhookSettings {
    /// The delivery policy these settings make.
    pub fn policy(&self) -> WebhookPolicy {
        WebhookPolicy {
            timeout_ms: self.timeout_ms,
            retry_total_ms: self.retry_total_ms,
            backoff_base_ms: self.backoff_base_ms,
            backoff_cap_ms: self.backoff_cap_ms,
            concurrency_max: self.concurrency_max,
            per_merchant_concurrency_max: self.per_merchant_concurrency_max,
            delivered_retention_ms: self.delivered_retention_ms,
            records_max: self.records_max,
            pending_per_merchant_max: self.pending_per_merchant_max,
            failed_per_merchant_max: self.failed_per_merchant_max,
            ..WebhookPolicy::default()
        }
    }

    /// Refuses values outside the bounds: `(key below webhooks., reason)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.policy().check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_policy_defaults_and_bounds_name_the_key() {
        assert_eq!(
            WebhookSettings::default().policy(),
            WebhookPolicy::default()
        );
        let error = crate::config::Config::from_yaml("webhooks: {timeout_ms: 600000}")
            .unwrap_err()
            .to_string();
        assert!(error.contains("`webhooks.timeout_ms`"), "{error}");
        let error = crate::config::Config::from_yaml("webhooks: {retry_total_ms: 10}")
            .unwrap_err()
            .to_string();
        assert!(error.contains("`webhooks.retry_total_ms`"), "{error}");
        let config =
            crate::config::Config::from_yaml("webhooks: {retry_total_ms: 86400000}").unwrap();
        assert_eq!(config.webhooks.policy().retry_total_ms, 86_400_000);
    }
}
