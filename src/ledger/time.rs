//! Ledger time: the injected wall clock, checked against a monotonic clock so that a jump of
//! the system clock is neither written into the journal nor able to freeze ledger time.
//!
//! Each reading of the wall clock is compared with what the monotonic clock predicts from the
//! last accepted reading (that reading plus the monotonic time elapsed since):
//!
//! - within `skew_ms_max` of the prediction, the reading is accepted and becomes the new
//!   reference (so NTP's slewing and small steps are followed);
//! - further *ahead* (a forward jump), it is refused: ledger time is the prediction, so the
//!   jump is never written into the journal, never expires pending transfers early, and
//!   leaves nothing to freeze ledger time once the clock is set right again;
//! - further *behind* (a backward step), ledger time is the reading, held at the last journal
//!   record's time as always (it never goes back), and the reference stays where it was, so
//!   a clock set right again is accepted at once.
//!
//! Both kinds are counted and logged (once when the disagreement starts, once when it ends).
//! Ledger time never goes below the time of the last journal record.
//!
//! A forward step larger than the bound is followed only from the next open, which takes the
//! wall clock as it is (a journal cannot tell a forward jump from the time the ledger was
//! closed); until then ledger time runs at the monotonic clock's pace. A clock that does not
//! move at all (a test's manual clock left alone) only falls *behind* the prediction, so
//! ledger time stays with it: no test depends on how long it runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::clock::{Clock, ManualClock, SharedClock};

/// How far a reading of the wall clock may be from the monotonic clock's prediction before
/// it is refused as a jump.
pub const CLOCK_SKEW_MS_MAX: u64 = 60_000;

/// Milliseconds from an arbitrary origin that advance with real time and never jump (the
/// system's monotonic clock), against which the wall clock is checked.
pub trait MonotonicClock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since this clock's origin.
    fn monotonic_ms(&self) -> u64;
}

/// The system's monotonic clock ([`Instant`], `CLOCK_MONOTONIC` on Linux: it does not count
/// time the machine is suspended, so a resume from suspend looks like a forward jump).
#[derive(Debug, Clone, Copy)]
pub struct SystemMonotonic {
    origin: Instant,
}

impl Default for SystemMonotonic {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl MonotonicClock for SystemMonotonic {
    fn monotonic_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A manual clock as the monotonic clock: a test that moves it moves both, so only jumps of a
/// *second* manual clock (the wall clock) are refused.
impl MonotonicClock for ManualClock {
    fn monotonic_ms(&self) -> u64 {
        self.now_ms()
    }
}

/// A shared monotonic clock handle.
pub type SharedMonotonic = Arc<dyn MonotonicClock>;

/// The writer's source of ledger time.
pub(crate) struct LedgerTime {
    clock: SharedClock,
    monotonic: SharedMonotonic,
    skew_ms_max: u64,
    /// The last accepted wall reading and the monotonic time it was taken at.
    reference: Option<(u64, u64)>,
    /// Whether the last reading was refused (to log the start and end of a jump once).
    refusing: bool,
    refused: Arc<AtomicU64>,
}

impl LedgerTime {
    pub fn new(
        clock: SharedClock,
        monotonic: SharedMonotonic,
        skew_ms_max: u64,
        refused: Arc<AtomicU64>,
    ) -> Self {
        Self {
            clock,
            monotonic,
            skew_ms_max,
            reference: None,
            refusing: false,
            refused,
        }
    }

    /// Ledger time now, never below `floor_ms` (the time of the last journal record).
    pub fn now_ms(&mut self, floor_ms: u64) -> u64 {
        let wall_ms = self.clock.now_ms();
        let monotonic_ms = self.monotonic.monotonic_ms();
        let Some((reference_ms, reference_monotonic_ms)) = self.reference else {
            // The first reading (at open) has nothing to be checked against.
            self.reference = Some((wall_ms.max(floor_ms), monotonic_ms));
            return wall_ms.max(floor_ms);
        };
        let predicted_ms =
            reference_ms.saturating_add(monotonic_ms.saturating_sub(reference_monotonic_ms));
        if wall_ms.abs_diff(predicted_ms) <= self.skew_ms_max {
            if self.refusing {
                self.refusing = false;
                tracing::warn!(
                    wall_ms,
                    predicted_ms,
                    "the system clock agrees with the monotonic clock again; ledger time \
                     follows it"
                );
            }
            self.reference = Some((wall_ms, monotonic_ms));
            return wall_ms.max(floor_ms);
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let ahead = wall_ms > predicted_ms;
        if !self.refusing {
            self.refusing = true;
            tracing::warn!(
                wall_ms,
                predicted_ms,
                skew_ms_max = self.skew_ms_max,
                refused,
                "the system clock jumped {}: its reading is more than the allowed skew away \
                 from the monotonic clock's; {}",
                if ahead { "ahead" } else { "back" },
                if ahead {
                    "ledger time follows the monotonic clock and the jump is not written to \
                     the journal"
                } else {
                    "ledger time holds until the clock catches up (it never goes back)"
                }
            );
        }
        if ahead { predicted_ms } else { wall_ms }.max(floor_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0_MS: u64 = 1_700_000_000_000;

    fn time(wall: &ManualClock, monotonic: &ManualClock) -> (LedgerTime, Arc<AtomicU64>) {
        let refused = Arc::new(AtomicU64::new(0));
        let time = LedgerTime::new(
            Arc::new(wall.clone()),
            Arc::new(monotonic.clone()),
            CLOCK_SKEW_MS_MAX,
            refused.clone(),
        );
        (time, refused)
    }

    /// Readings within the bound are followed; a jump ahead is refused (counted) and ledger
    /// time goes on at the monotonic pace; once the clock agrees again it is followed. A step
    /// back is counted, held at the floor, and does not move the reference.
    #[test]
    fn a_jump_ahead_is_refused_and_a_step_back_is_held() {
        let wall = ManualClock::new(T0_MS);
        let monotonic = ManualClock::new(5);
        let (mut time, refused) = time(&wall, &monotonic);
        assert_eq!(time.now_ms(0), T0_MS);
        // Drift within the bound: followed.
        monotonic.advance_ms(1_000);
        wall.advance_ms(1_000 + CLOCK_SKEW_MS_MAX);
        assert_eq!(time.now_ms(0), T0_MS + 1_000 + CLOCK_SKEW_MS_MAX);
        let base = T0_MS + 1_000 + CLOCK_SKEW_MS_MAX;
        // A day forward: refused.
        monotonic.advance_ms(10);
        wall.advance_ms(24 * 3_600_000);
        assert_eq!(time.now_ms(0), base + 10);
        monotonic.advance_ms(10);
        assert_eq!(time.now_ms(0), base + 20);
        assert_eq!(refused.load(Ordering::Relaxed), 2);
        // Set back to the right time: followed again.
        monotonic.advance_ms(10);
        wall.set_ms(base + 30);
        assert_eq!(time.now_ms(0), base + 30);
        // An hour back: counted; ledger time holds at the last record's time.
        monotonic.advance_ms(10);
        wall.set_ms(base - 3_600_000);
        assert_eq!(time.now_ms(base + 30), base + 30);
        assert_eq!(refused.load(Ordering::Relaxed), 3);
        // Set right again: followed at once (the step back did not move the reference).
        monotonic.advance_ms(10);
        wall.set_ms(base + 50);
        assert_eq!(time.now_ms(base + 30), base + 50);
        assert_eq!(refused.load(Ordering::Relaxed), 3);
        // Never below the floor (the last journal record).
        assert_eq!(time.now_ms(base + 500), base + 500);
    }

    /// A wall clock that does not move while real time passes (a test's manual clock left
    /// alone) is followed, however long the test runs; so are its later small advances.
    #[test]
    fn a_clock_left_alone_is_followed_however_long_it_stands() {
        let wall = ManualClock::new(T0_MS);
        let monotonic = ManualClock::new(0);
        let (mut time, _) = time(&wall, &monotonic);
        assert_eq!(time.now_ms(0), T0_MS);
        monotonic.advance_ms(10 * 60_000);
        assert_eq!(time.now_ms(0), T0_MS);
        wall.advance_ms(31_000);
        assert_eq!(time.now_ms(T0_MS), T0_MS + 31_000);
    }
}
