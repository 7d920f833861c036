//! The pure part of webhook delivery: a delivery record's states, what an attempt's answer
//! does to it, the retry schedule. No I/O; time is an argument (`now_ms`), and so is the
//! randomness of the jitter, so tests pin both.
//!
//! States: `pending` -> `delivered` (a 2xx) | `failed` (410 Gone at once; any other failure
//! once the retry time is over). `delivered` and `failed` change only by a replay, which puts
//! the record back to `pending` with a fresh schedule.

use serde::{Deserialize, Serialize};

use super::EventType;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its next attempt.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// Given up: the receiver answered 410 Gone, or the retry time is over.
    Failed,
}

impl DeliveryState {
    /// The name in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}

/// One event to deliver and how its delivery went. Never holds a secret: `last_error` is a
/// reason code, not a transport message (which could carry a URL with credentials in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// The event id.
    pub event_id: String,
    /// The merchant it goes to.
    pub merchant_id: String,
    /// What happened.
    pub event_type: EventType,
    /// When it was enqueued, ms since the Unix epoch.
    pub created_ms: u64,
    /// The exact body sent at every attempt.
    pub body: String,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts since it was enqueued or last replayed.
    pub attempts: u32,
    /// When the next attempt is due (meaningful while pending).
    pub next_attempt_at_ms: u64,
    /// No attempt starts after this; a failure at or after it is final.
    pub retry_until_ms: u64,
    /// When the last attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_ms: Option<u64>,
    /// The HTTP status of the last answer, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// The reason code of the last failed attempt ([`Failure::code`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it became delivered or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// How many times it was replayed.
    #[serde(default)]
    pub replays: u32,
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The receiver answered 410 Gone: it wants no more of this event. Final at once.
    Gone,
    /// A 3xx: redirects are not followed (a signed body goes only where the merchant said).
    Redirect(u16),
    /// Any other non-2xx status.
    Status(u16),
    /// No answer within the per-request timeout.
    Timeout,
    /// No connection (refused, DNS, TLS).
    Connect,
    /// Another transport error.
    Request,
    /// The merchant is unknown, disabled or has no webhook URL ([`super::WebhookEndpoints`]).
    EndpointUnavailable,
}

impl Failure {
    /// Stable snake_case reason code (stored as `last_error`, shown by the API).
    pub fn code(self) -> &'static str {
        match self {
            Self::Gone => "receiver_gone",
            Self::Redirect(_) => "redirect_not_followed",
            Self::Status(_) => "http_status",
            Self::Timeout => "timeout",
            Self::Connect => "connect_failed",
            Self::Request => "request_failed",
            Self::EndpointUnavailable => "endpoint_unavailable",
        }
    }

    /// The HTTP status that came with it, if any.
    pub fn status(self) -> Option<u16> {
        match self {
            Self::Gone => Some(410),
            Self::Redirect(s) | Self::Status(s) => Some(s),
            _ => None,
        }
    }

    /// The failure an HTTP status means; `None` for a 2xx (delivered).
    pub fn from_status(status: u16) -> Option<Self> {
        match status {
            200..=299 => None,
            410 => Some(Self::Gone),
            300..=399 => Some(Self::Redirect(status)),
            other => Some(Self::Status(other)),
        }
    }
}

/// What an attempt ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx.
    Delivered(u16),
    /// Anything else.
    Failed(Failure),
}

/// Reason code of a record that failed because its retry time ran out (shown as its
/// `last_error` is the last attempt's; this is the final word, in logs and metrics).
pub const RETRY_TIME_OVER: &str = "retry_time_over";

/// Bounds and schedule of webhook delivery. Every field is bounded by [`WebhookPolicy::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookPolicy {
    /// Longest wait for one delivery's answer (connect, send, status line), ms.
    pub timeout_ms: u64,
    /// Deliveries in flight at once, over all merchants.
    pub concurrency_max: usize,
    /// Deliveries in flight at once to one merchant: a slow receiver holds at most this many
    /// of the slots, the rest serve other merchants.
    pub per_merchant_concurrency_max: usize,
    /// The first retry waits between this and twice this; the window doubles per attempt.
    pub backoff_base_ms: u64,
    /// Largest wait between two attempts.
    pub backoff_cap_ms: u64,
    /// How long an event is retried, from its enqueue (or replay), before it is failed.
    pub retry_total_ms: u64,
    /// Delivered records are deleted this long after delivery.
    pub delivered_retention_ms: u64,
    /// Records kept in all (pending, delivered, failed); delivered ones are pruned first
    /// when it is reached, then enqueues are refused (`queue_full`).
    pub records_max: usize,
    /// Pending records per merchant; beyond it enqueues are refused (`merchant_queue_full`).
    pub pending_per_merchant_max: usize,
    /// Failed records kept per merchant; beyond it the oldest failed one is deleted.
    pub failed_per_merchant_max: usize,
    /// How often the worker looks for due records without a poke, ms.
    pub poll_ms: u64,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            concurrency_max: 16,
            per_merchant_concurrency_max: 2,
            backoff_base_ms: 10_000,
            backoff_cap_ms: 6 * 3_600_000,
            retry_total_ms: 3 * 86_400_000,
            delivered_retention_ms: 7 * 86_400_000,
            records_max: 100_000,
            pending_per_merchant_max: 10_000,
            failed_per_merchant_max: 1_000,
            poll_ms: 1_000,
        }
    }
}

/// Hard bounds on the policy (what `check` enforces).
pub mod bounds {
    /// Per-request timeout: 1 s to 60 s.
    pub const TIMEOUT_MS: (u64, u64) = (1_000, 60_000);
    /// Concurrent deliveries: 1 to 256.
    pub const CONCURRENCY: (usize, usize) = (1, 256);
    /// Backoff base: 100 ms to 1 h.
    pub const BACKOFF_BASE_MS: (u64, u64) = (100, 3_600_000);
    /// Backoff cap: up to 1 day.
    pub const BACKOFF_CAP_MS_MAX: u64 = 86_400_000;
    /// Retry time: 1 min to 30 days.
    pub const RETRY_TOTAL_MS: (u64, u64) = (60_000, 30 * 86_400_000);
    /// Delivered retention: 1 min to 90 days.
    pub const RETENTION_MS: (u64, u64) = (60_000, 90 * 86_400_000);
    /// Records in all: 100 to 10 million.
    pub const RECORDS: (usize, usize) = (100, 10_000_000);
    /// Poll interval: 10 ms to 60 s.
    pub const POLL_MS: (u64, u64) = (10, 60_000);
}

impl WebhookPolicy {
    /// Refuses a policy outside [`bounds`]: `(field, reason)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        fn within<T: PartialOrd + std::fmt::Display>(
            name: &'static str,
            value: T,
            (min, max): (T, T),
        ) -> Result<(), (&'static str, String)> {
            if value < min || value > max {
                return Err((name, format!("must be between {min} and {max}")));
            }
            Ok(())
        }
        within("timeout_ms", self.timeout_ms, bounds::TIMEOUT_MS)?;
        within("concurrency_max", self.concurrency_max, bounds::CONCURRENCY)?;
        within(
            "per_merchant_concurrency_max",
            self.per_merchant_concurrency_max,
            (1, self.concurrency_max),
        )?;
        within(
            "backoff_base_ms",
            self.backoff_base_ms,
            bounds::BACKOFF_BASE_MS,
        )?;
        within(
            "backoff_cap_ms",
            self.backoff_cap_ms,
            (self.backoff_base_ms, bounds::BACKOFF_CAP_MS_MAX),
        )?;
        within(
            "retry_total_ms",
            self.retry_total_ms,
            bounds::RETRY_TOTAL_MS,
        )?;
        within(
            "delivered_retention_ms",
            self.delivered_retention_ms,
            bounds::RETENTION_MS,
        )?;
        within("records_max", self.records_max, bounds::RECORDS)?;
        within(
            "pending_per_merchant_max",
            self.pending_per_merchant_max,
            (1, self.records_max),
        )?;
        within(
            "failed_per_merchant_max",
            self.failed_per_merchant_max,
            (1, self.records_max),
        )?;
        within("poll_ms", self.poll_ms, bounds::POLL_MS)?;
        Ok(())
    }

    /// The wait window after the `attempts`-th failed attempt (1 for the first): from
    /// `backoff_base_ms`, doubled per attempt, capped at `backoff_cap_ms`.
    pub fn backoff_window_ms(&self, attempts: u32) -> u64 {
        let doublings = attempts.saturating_sub(1).min(40);
        self.backoff_base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_cap_ms)
    }

    /// The wait after the `attempts`-th failed attempt with full jitter: uniform in
    /// `[backoff_base_ms, window]` as `random` (any u64) picks it. The floor keeps a dead
    /// receiver from being hammered when the jitter draws near zero.
    pub fn backoff_ms(&self, attempts: u32, random: u64) -> u64 {
        let window = self.backoff_window_ms(attempts);
        let span = window - self.backoff_base_ms.min(window);
        self.backoff_base_ms.min(window) + random % (span + 1)
    }
}

impl DeliveryRecord {
    /// A new pending record, due at once.
    pub fn new(
        event_id: String,
        merchant_id: String,
        event_type: EventType,
        body: String,
        now_ms: u64,
        policy: &WebhookPolicy,
    ) -> Self {
        Self {
            event_id,
            merchant_id,
            event_type,
            created_ms: now_ms,
            body,
            state: DeliveryState::Pending,
            attempts: 0,
            next_attempt_at_ms: now_ms,
            retry_until_ms: now_ms.saturating_add(policy.retry_total_ms),
            last_attempt_ms: None,
            last_status: None,
            last_error: None,
            finished_ms: None,
            replays: 0,
        }
    }

    /// Applies an attempt's answer at `now_ms`. Only a pending record has attempts; one that
    /// is not (replayed and answered meanwhile) is left alone and `false` returned.
    pub fn after_attempt(
        &mut self,
        attempt: Attempt,
        now_ms: u64,
        policy: &WebhookPolicy,
        random: u64,
    ) -> bool {
        if self.state != DeliveryState::Pending {
            return false;
        }
        self.attempts = self.attempts.saturating_add(1);
        self.last_attempt_ms = Some(now_ms);
        match attempt {
            Attempt::Delivered(status) => {
                self.last_status = Some(status);
                self.last_error = None;
                self.finish(DeliveryState::Delivered, now_ms);
            }
            Attempt::Failed(failure) => {
                self.last_status = failure.status();
                self.last_error = Some(failure.code().to_owned());
                if failure == Failure::Gone || now_ms >= self.retry_until_ms {
                    self.finish(DeliveryState::Failed, now_ms);
                } else {
                    // The last attempt is made at the deadline, not skipped.
                    let next = now_ms.saturating_add(policy.backoff_ms(self.attempts, random));
                    self.next_attempt_at_ms = next.min(self.retry_until_ms);
                }
            }
        }
        true
    }

    /// Puts a delivered or failed record back to pending, due at once, with a fresh retry
    /// time and attempt count. `false` (nothing changed) for a pending one.
    pub fn replay(&mut self, now_ms: u64, policy: &WebhookPolicy) -> bool {
        if self.state == DeliveryState::Pending {
            return false;
        }
        self.state = DeliveryState::Pending;
        self.attempts = 0;
        self.next_attempt_at_ms = now_ms;
        self.retry_until_ms = now_ms.saturating_add(policy.retry_total_ms);
        self.finished_ms = None;
        self.replays = self.replays.saturating_add(1);
        true
    }

    fn finish(&mut self, state: DeliveryState, now_ms: u64) {
        self.state = state;
        self.finished_ms = Some(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn record(now_ms: u64, policy: &WebhookPolicy) -> DeliveryRecord {
        DeliveryRecord::new(
            "evt_1".into(),
            "cafe".into(),
            EventType::InvoicePaid,
            "{}".into(),
            now_ms,
            policy,
        )
    }

    #[test]
    fn the_default_policy_is_within_bounds() {
        WebhookPolicy::default().check().unwrap();
        let bad = WebhookPolicy {
            timeout_ms: 0,
            ..WebhookPolicy::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "timeout_ms");
        let bad = WebhookPolicy {
            per_merchant_concurrency_max: 17,
            ..WebhookPolicy::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "per_merchant_concurrency_max");
    }

    #[test]
    fn backoff_doubles_from_the_base_and_stops_at_the_cap() {
        let policy = WebhookPolicy::default();
        assert_eq!(policy.backoff_window_ms(1), 10_000);
        assert_eq!(policy.backoff_window_ms(2), 20_000);
        assert_eq!(policy.backoff_window_ms(3), 40_000);
        assert_eq!(policy.backoff_window_ms(30), policy.backoff_cap_ms);
        assert_eq!(policy.backoff_window_ms(u32::MAX), policy.backoff_cap_ms);
        assert_eq!(policy.backoff_ms(1, 0), 10_000);
        assert_eq!(policy.backoff_ms(1, u64::MAX), 10_000);
        assert_eq!(policy.backoff_ms(3, 0), 10_000);
        assert_eq!(policy.backoff_ms(3, 30_000), 40_000);
        assert_eq!(policy.backoff_ms(3, 30_001), 10_000);
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(Failure::from_status(200), None);
        assert_eq!(Failure::from_status(204), None);
        assert_eq!(Failure::from_status(410), Some(Failure::Gone));
        assert_eq!(Failure::from_status(302), Some(Failure::Redirect(302)));
        assert_eq!(Failure::from_status(500), Some(Failure::Status(500)));
        assert_eq!(Failure::from_status(404), Some(Failure::Status(404)));
        assert_eq!(Failure::Redirect(302).code(), "redirect_not_followed");
    }

    #[test]
    fn gone_fails_at_once_and_a_replay_starts_afresh() {
        let policy = WebhookPolicy::default();
        let mut r = record(1_000, &policy);
        assert!(r.after_attempt(Attempt::Failed(Failure::Gone), 2_000, &policy, 7));
        assert_eq!(r.state, DeliveryState::Failed);
        assert_eq!(r.last_status, Some(410));
        assert_eq!(r.last_error.as_deref(), Some("receiver_gone"));
        assert!(!r.after_attempt(Attempt::Delivered(200), 3_000, &policy, 7));
        assert!(r.replay(10_000, &policy));
        assert_eq!(r.state, DeliveryState::Pending);
        assert_eq!((r.attempts, r.replays), (0, 1));
        assert_eq!(r.next_attempt_at_ms, 10_000);
        assert_eq!(r.retry_until_ms, 10_000 + policy.retry_total_ms);
        assert!(!r.replay(11_000, &policy), "a pending record is left alone");
    }

    #[test]
    fn the_last_attempt_is_made_at_the_deadline_then_the_record_fails() {
        let policy = WebhookPolicy::default();
        let mut r = record(0, &policy);
        let mut now = 0;
        let mut attempts = 0;
        while r.state == DeliveryState::Pending {
            assert!(attempts < 1_000, "bounded");
            now = r.next_attempt_at_ms;
            // The jitter draws the longest wait of each window.
            let random = policy.backoff_window_ms(r.attempts + 1) - policy.backoff_base_ms;
            r.after_attempt(Attempt::Failed(Failure::Status(500)), now, &policy, random);
            attempts += 1;
        }
        assert_eq!(r.state, DeliveryState::Failed);
        assert_eq!(
            now, policy.retry_total_ms,
            "the last try is at the deadline"
        );
        assert_eq!(r.last_error.as_deref(), Some("http_status"));
        // 3 days at windows up to 6 h: about 20 attempts.
        assert!((10..40).contains(&attempts), "{attempts}");
    }

    #[test]
    fn with_the_shortest_waits_attempts_are_still_bounded_by_the_base() {
        let policy = WebhookPolicy::default();
        let mut r = record(0, &policy);
        let bound = policy.retry_total_ms / policy.backoff_base_ms + 1;
        let mut attempts = 0;
        while r.state == DeliveryState::Pending {
            assert!(attempts <= bound, "bounded by retry time / base");
            r.after_attempt(
                Attempt::Failed(Failure::Timeout),
                r.next_attempt_at_ms,
                &policy,
                0,
            );
            attempts += 1;
        }
        assert_eq!(attempts, bound);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Answer(Option<u16>, u64, u64),
        Replay(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (
                prop::option::of(prop_oneof![Just(200u16), Just(204), 300u16..600]),
                0u64..100_000_000,
                any::<u64>()
            )
                .prop_map(|(s, dt, r)| Step::Answer(s, dt, r)),
            (0u64..100_000_000).prop_map(Step::Replay),
        ]
    }

    proptest! {
        /// Whatever answers come, in whatever order and at whatever times: a pending record is
        /// due no later than its deadline and no earlier than its last attempt plus the base
        /// (unless the deadline is sooner); it ends only as the answers say; attempts count
        /// each answer to a pending record once; replays are the only way back.
        #[test]
        fn the_state_machine_keeps_its_promises(steps in prop::collection::vec(step(), 1..60)) {
            let policy = WebhookPolicy::default();
            let mut r = record(0, &policy);
            let mut now = 0u64;
            for step in steps {
                let before = r.clone();
                match step {
                    Step::Answer(status, dt, random) => {
                        now = now.max(r.next_attempt_at_ms).saturating_add(dt % 1_000);
                        let attempt = match status {
                            Some(s) => match Failure::from_status(s) {
                                None => Attempt::Delivered(s),
                                Some(f) => Attempt::Failed(f),
                            },
                            None => Attempt::Failed(Failure::Timeout),
                        };
                        let applied = r.after_attempt(attempt, now, &policy, random);
                        prop_assert_eq!(applied, before.state == DeliveryState::Pending);
                        if !applied {
                            prop_assert_eq!(&r, &before);
                            continue;
                        }
                        prop_assert_eq!(r.attempts, before.attempts + 1);
                        match attempt {
                            Attempt::Delivered(_) => prop_assert_eq!(r.state, DeliveryState::Delivered),
                            Attempt::Failed(Failure::Gone) => prop_assert_eq!(r.state, DeliveryState::Failed),
                            Attempt::Failed(_) if now >= r.retry_until_ms => {
                                prop_assert_eq!(r.state, DeliveryState::Failed)
                            }
                            Attempt::Failed(_) => {
                                prop_assert_eq!(r.state, DeliveryState::Pending);
                                prop_assert!(r.next_attempt_at_ms <= r.retry_until_ms);
                                prop_assert!(r.next_attempt_at_ms > now);
                                prop_assert!(
                                    r.next_attempt_at_ms >= (now + policy.backoff_base_ms).min(r.retry_until_ms)
                                );
                                prop_assert!(r.next_attempt_at_ms <= now + policy.backoff_cap_ms);
                            }
                        }
                        prop_assert!(r.last_error.is_none() == matches!(attempt, Attempt::Delivered(_)));
                    }
                    Step::Replay(dt) => {
                        now = now.saturating_add(dt);
                        let replayed = r.replay(now, &policy);
                        prop_assert_eq!(replayed, before.state != DeliveryState::Pending);
                        prop_assert_eq!(r.state, DeliveryState::Pending);
                        if replayed {
                            prop_assert_eq!(r.attempts, 0);
                            prop_assert_eq!(r.next_attempt_at_ms, now);
                            prop_assert_eq!(r.replays, before.replays + 1);
                        }
                    }
                }
                prop_assert_eq!(r.finished_ms.is_some(), r.state != DeliveryState::Pending);
                prop_assert_eq!(&r.body, &before.body);
                prop_assert_eq!(&r.event_id, &before.event_id);
            }
        }
    }
}
