//! How often and how long homeserver requests are retried.

use std::time::Duration;

/// Retry bounds for homeserver requests. Every field is a hard limit; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts per request, the first included.
    pub attempts_max: u32,
    /// Delay before the first retry after a 5xx or connection error; doubles each retry.
    pub backoff_base_ms: u64,
    /// Largest single delay between attempts (also caps a 429's `retry_after_ms`).
    pub backoff_max_ms: u64,
    /// Longest time spent on one request, all attempts and delays included; no retry starts
    /// if its delay would end past this.
    pub total_max_ms: u64,
    /// Timeout of one attempt (connect + response).
    pub attempt_timeout_ms: u64,
    /// Timeout of the TCP/TLS connect of one attempt.
    pub connect_timeout_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts_max: 8,
            backoff_base_ms: 250,
            backoff_max_ms: 30_000,
            total_max_ms: 120_000,
            attempt_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
        }
    }
}

impl RetryPolicy {
    /// Bounds of the bot device's end-to-end encryption requests (key uploads, queries and
    /// claims, to-device messages, room-key sharing and the encrypted sends after it): six
    /// attempts, waits doubling from 200 ms to at most 5 s. They run while a transaction is
    /// handled, and the homeserver waits for that answer before it sends the next one, so they
    /// give up sooner than [`RetryPolicy::default`]. The total bound is above what six attempts
    /// and their waits can take, so the attempt count is what stops them.
    pub const CRYPTO_DEVICE: RetryPolicy = RetryPolicy {
        attempts_max: 6,
        backoff_base_ms: 200,
        backoff_max_ms: 5_000,
        // 6 attempts x 30 s + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s of waits = 186.2 s.
        total_max_ms: 190_000,
        attempt_timeout_ms: 30_000,
        connect_timeout_ms: 10_000,
    };

    /// Delay after failed attempt number `attempt` (1-based) when the server gave no hint.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        Duration::from_millis(
            self.backoff_base_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }

    /// Delay the server asked for (429), capped by `backoff_max_ms`.
    pub fn server_delay(&self, asked_ms: u64) -> Duration {
        Duration::from_millis(asked_ms.min(self.backoff_max_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            backoff_base_ms: 100,
            backoff_max_ms: 1_000,
            ..RetryPolicy::default()
        };
        let delays: Vec<u64> = (1..=6).map(|a| p.backoff(a).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(p.backoff(u32::MAX).as_millis(), 1_000);
        assert_eq!(p.server_delay(50).as_millis(), 50);
        assert_eq!(p.server_delay(60_000).as_millis(), 1_000);
    }

    #[test]
    fn crypto_device_bounds_stop_on_attempts_not_time() {
        let p = RetryPolicy::CRYPTO_DEVICE;
        let delays: Vec<u64> = (1..p.attempts_max)
            .map(|a| p.backoff(a).as_millis() as u64)
            .collect();
        assert_eq!(delays, [200, 400, 800, 1_600, 3_200]);
        let worst_ms =
            u64::from(p.attempts_max) * p.attempt_timeout_ms + delays.iter().sum::<u64>();
        assert!(worst_ms <= p.total_max_ms, "{worst_ms}");
        assert_eq!(p.server_delay(60_000).as_millis(), 5_000);
    }
}
