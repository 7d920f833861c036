//! Late, retried and replayed requests to pay or withdraw (docs/payments.md, "late
//! requests"): idempotence comes first, then lateness, and only for a request that never
//! started anything.

use crate::store::payments::{DeclineRecord, EventOutcome};

/// What to do with an event asking to start a payment or withdrawal.
#[derive(Debug, PartialEq)]
pub enum Start {
    /// It was declined before: repeat that decision (a retry after the reply failed).
    Repeat(DeclineRecord),
    /// What it started is still there (the payment's transfer, the withdrawal's open
    /// challenge): carry on with it, never refuse it now, late or not.
    Resume,
    /// It started a withdrawal whose challenge has ended since: it was told then.
    Ended,
    /// It never started anything and reached the bot too late.
    TooLate,
    /// It never started anything and is in time: check it and start.
    Fresh,
}

/// Decides how to treat an event asking to start a payment. `earlier` is what was recorded for
/// the event, `started` whether what it started is still there, `sent_ms` when it was sent (at
/// most; see `DecryptedEvent::sent_ms`). A replay of an event that was decided or started is
/// never judged as late; only an event that never started anything is, and it is late once
/// `window_ms` (the step-up timeout) has passed since it was sent: its payer could not confirm
/// it in time anyway, and a request hours old (a room key that arrived late, a delayed
/// delivery) must not move money as if it were new.
pub fn decide(
    earlier: Option<EventOutcome>,
    started: bool,
    sent_ms: u64,
    now_ms: u64,
    window_ms: u64,
) -> Start {
    match earlier {
        Some(EventOutcome::Declined(record)) => Start::Repeat(record),
        _ if started => Start::Resume,
        Some(EventOutcome::Started) => Start::Ended,
        _ if now_ms.saturating_sub(sent_ms) >= window_ms => Start::TooLate,
        _ => Start::Fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock as _, ManualClock};

    fn declined(reason: &str) -> EventOutcome {
        EventOutcome::Declined(DeclineRecord {
            reason: reason.into(),
            sentence: "your balance does not cover this payment".into(),
            payee: "@bob:hs".try_into().unwrap(),
            amount: "5".into(),
            currency: "EUR".into(),
        })
    }

    /// Idempotence first, then staleness, and only for events that started nothing.
    #[test]
    fn late_requests_start_nothing_but_replays_carry_on() {
        let window_ms = 120_000;
        let sent_ms = 1_000_000;
        let clock = ManualClock::new(sent_ms + 5_000);
        let start = |earlier, started| decide(earlier, started, sent_ms, clock.now_ms(), window_ms);
        assert_eq!(start(None, false), Start::Fresh);
        // Two hours later (a room key that arrived late).
        clock.advance_ms(2 * 3_600_000);
        assert_eq!(start(None, false), Start::TooLate);
        // ... but a replay of one that already made its transfer / opened its challenge
        // carries on, and one that was declined repeats that decision.
        assert_eq!(start(None, true), Start::Resume);
        let EventOutcome::Declined(record) = declined("insufficient_funds") else {
            unreachable!()
        };
        assert_eq!(
            start(Some(declined("insufficient_funds")), false),
            Start::Repeat(record.clone())
        );
        assert_eq!(
            start(Some(declined("insufficient_funds")), true),
            Start::Repeat(record),
            "a recorded decision is never made again"
        );
        // A withdrawal that was started and whose challenge has ended: nothing to say.
        assert_eq!(start(Some(EventOutcome::Started), false), Start::Ended);
        assert_eq!(start(Some(EventOutcome::Started), true), Start::Resume);
        // The edge: exactly the window is late (as for PINs).
        clock.set_ms(sent_ms + window_ms - 1);
        assert_eq!(start(None, false), Start::Fresh);
        clock.set_ms(sent_ms + window_ms);
        assert_eq!(start(None, false), Start::TooLate);
    }
}
