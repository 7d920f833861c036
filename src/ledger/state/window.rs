//! The rolling 24-hour window of a user account's debits, for the daily limit, in buckets of
//! one minute: at most [`BUCKETS_MAX`] per account however many debits it makes (issue 15:
//! memory flat in history; the exact window kept 16 B per debit of the last 24 h).
//!
//! A debit made in minute `m` (ledger time `m * 60_000 ..= m * 60_000 + 59_999`) counts
//! until ledger time reaches the end of that minute plus 24 h, `(m + 1) * 60_000 + DAY_MS`:
//! between 1 ms and one minute longer than exactly 24 h after it was made. So a limit may
//! refuse up to a minute early, never allow more than the limit in any 24 h.
//!
//! The sum of a window is a function of the journal alone: a bucket holds what its debits
//! count now (a pending debit its reservation; one that ended, what it posted), buckets leave
//! by ledger time only, and pruning changes what is held, never what is counted. So live
//! decisions, a replay and a checkpoint agree, whenever each pruned.

use std::collections::VecDeque;

use super::DAY_MS;

/// Width of a bucket.
pub(super) const BUCKET_MS: u64 = 60_000;

/// Most buckets a window holds: one per minute of the last 24 h, and the minute being made.
pub(crate) const BUCKETS_MAX: usize = (DAY_MS / BUCKET_MS) as usize + 1;

/// The sum of the debits of one minute. The amount is stored as bytes so that a bucket is
/// 20 bytes rather than the 32 a `u128` field's alignment would make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    minute: u32,
    counted_minor: [u8; 16],
}

impl Bucket {
    fn counted_minor(&self) -> u128 {
        u128::from_le_bytes(self.counted_minor)
    }

    fn set_counted_minor(&mut self, minor: u128) {
        self.counted_minor = minor.to_le_bytes();
    }
}

/// The minute of ledger time `ms` (saturating: ledger time stays far below 2^32 minutes,
/// about the year 10,000).
fn minute_of(ms: u64) -> u32 {
    u32::try_from(ms / BUCKET_MS).unwrap_or(u32::MAX)
}

/// Whether the debits of `minute` have left the window at ledger time `now_ms`.
fn has_left(minute: u32, now_ms: u64) -> bool {
    (u64::from(minute) + 1) * BUCKET_MS + DAY_MS <= now_ms
}

/// A user account's debits of the last 24 h, by minute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Window {
    /// Oldest first, one per minute that had a debit, minutes strictly increasing.
    buckets: VecDeque<Bucket>,
    /// The sum of the buckets.
    sum_minor: u128,
}

impl Window {
    /// What the window counts at ledger time `now_ms` (not before the last change): the
    /// debits whose minute has not left. Reads only; pruning happens when debits change.
    pub fn sum_at(&self, now_ms: u64) -> u128 {
        let gone: u128 = self
            .buckets
            .iter()
            .take_while(|b| has_left(b.minute, now_ms))
            .map(Bucket::counted_minor)
            .sum();
        self.sum_minor - gone
    }

    /// Counts a debit of `amount_minor` made at `now_ms` (ledger time never goes back).
    pub fn add(&mut self, now_ms: u64, amount_minor: u128) -> Result<(), String> {
        self.prune(now_ms);
        let minute = minute_of(now_ms);
        let sum = self
            .sum_minor
            .checked_add(amount_minor)
            .ok_or("daily window overflow")?;
        match self.buckets.back_mut() {
            Some(last) if last.minute == minute => {
                last.set_counted_minor(last.counted_minor() + amount_minor);
            }
            Some(last) if last.minute > minute => {
                return Err(format!(
                    "a debit at minute {minute} after one at minute {}",
                    last.minute
                ))
            }
            _ => self.buckets.push_back(Bucket {
                minute,
                counted_minor: amount_minor.to_le_bytes(),
            }),
        }
        self.sum_minor = sum;
        Ok(())
    }

    /// A debit made at `created_ms` counts `released_minor` less from `now_ms` on (a pending
    /// transfer ended below its reservation), if its minute is still in the window.
    pub fn release(
        &mut self,
        created_ms: u64,
        released_minor: u128,
        now_ms: u64,
    ) -> Result<(), String> {
        self.prune(now_ms);
        let minute = minute_of(created_ms);
        let Ok(i) = self.buckets.binary_search_by_key(&minute, |b| b.minute) else {
            // Only a minute that has left the window is missing: every user debit adds to
            // its minute's bucket.
            return if has_left(minute, now_ms) {
                Ok(())
            } else {
                Err(format!(
                    "the daily window lost the debits of minute {minute}"
                ))
            };
        };
        let bucket = &mut self.buckets[i];
        let left = bucket
            .counted_minor()
            .checked_sub(released_minor)
            .ok_or("a release of more than the daily window's minute counts")?;
        bucket.set_counted_minor(left);
        self.sum_minor -= released_minor;
        Ok(())
    }

    /// Drops the buckets that have left the window at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        while let Some(first) = self.buckets.front() {
            if !has_left(first.minute, now_ms) {
                break;
            }
            self.sum_minor -= first.counted_minor();
            self.buckets.pop_front();
        }
        // A window that was busy and went quiet gives its memory back.
        if self.buckets.capacity() > 64 && self.buckets.len() < self.buckets.capacity() / 4 {
            self.buckets.shrink_to(self.buckets.len() * 2);
        }
    }

    /// The buckets still in the window at `now_ms`, oldest first: (minute, counted minor).
    pub fn buckets_at(&self, now_ms: u64) -> impl Iterator<Item = (u32, u128)> + Clone + '_ {
        self.buckets
            .iter()
            .skip_while(move |b| has_left(b.minute, now_ms))
            .map(|b| (b.minute, b.counted_minor()))
    }

    /// A window of these buckets (from [`Window::buckets_at`]), minutes strictly increasing.
    pub fn from_buckets(buckets: impl IntoIterator<Item = (u32, u128)>) -> Result<Self, String> {
        let mut window = Self::default();
        for (minute, counted_minor) in buckets {
            if window.buckets.back().is_some_and(|b| b.minute >= minute) {
                return Err(format!("daily window minute {minute} out of order"));
            }
            window.sum_minor = window
                .sum_minor
                .checked_add(counted_minor)
                .ok_or("daily window overflow")?;
            window.buckets.push_back(Bucket {
                minute,
                counted_minor: counted_minor.to_le_bytes(),
            });
        }
        Ok(window)
    }

    /// Number of buckets held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0_MS: u64 = 1_700_000_000_000;

    /// Issue 15: a debit leaves the window no earlier than 24 h after it was made, and no
    /// later than a minute after that, wherever in its minute it was made.
    #[test]
    fn a_debit_leaves_no_earlier_than_a_day_and_at_most_a_minute_later() {
        for offset_ms in [0, 1, 29_999, 59_999, 60_000, 61_234] {
            let made_ms = T0_MS - T0_MS % BUCKET_MS + offset_ms;
            let mut w = Window::default();
            w.add(made_ms, 7).unwrap();
            assert_eq!(w.sum_at(made_ms + DAY_MS - 1), 7, "{offset_ms}");
            assert_eq!(
                w.sum_at(made_ms + DAY_MS),
                7,
                "{offset_ms}: counted at 24 h"
            );
            let leaves_ms = (made_ms / BUCKET_MS + 1) * BUCKET_MS + DAY_MS;
            assert!(leaves_ms - made_ms > DAY_MS && leaves_ms - made_ms <= DAY_MS + BUCKET_MS);
            assert_eq!(w.sum_at(leaves_ms - 1), 7, "{offset_ms}");
            assert_eq!(w.sum_at(leaves_ms), 0, "{offset_ms}");
            // Pruning changes what is held, never what is counted.
            w.prune(leaves_ms - 1);
            assert_eq!((w.len(), w.sum_at(leaves_ms - 1)), (1, 7));
            w.prune(leaves_ms);
            assert_eq!((w.len(), w.sum_at(leaves_ms)), (0, 0));
        }
    }

    /// Issue 15: whatever the debits and the times, the window never counts less than the
    /// exact sum of the debits of the last 24 h (a limit checked against it is never
    /// exceeded), never more than those of the last 24 h and a minute, and holds at most one
    /// bucket per minute of a day.
    #[test]
    fn the_window_counts_at_least_the_exact_day_and_holds_at_most_a_day_of_minutes() {
        let mut w = Window::default();
        let mut debits: VecDeque<(u64, u128)> = VecDeque::new();
        let mut now_ms = T0_MS + 12_345;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..6_000u64 {
            // Steps from 0 to 40 s, and now and then an hour: the window runs full and
            // drains, minutes are skipped or shared.
            now_ms += match next() % 100 {
                0 => 3_600_000,
                n => next() % (n * 400 + 1),
            };
            let amount = u128::from(next() % 1_000 + 1);
            w.add(now_ms, amount).unwrap();
            debits.push_back((now_ms, amount));
            while debits
                .front()
                .is_some_and(|d| d.0 + DAY_MS + BUCKET_MS < now_ms)
            {
                debits.pop_front();
            }
            if i % 7 == 0 {
                w.prune(now_ms);
            }
            let probe_ms = now_ms + next() % (2 * BUCKET_MS);
            let exact: u128 = debits
                .iter()
                .filter(|&&(made, _)| made + DAY_MS > probe_ms)
                .map(|d| d.1)
                .sum();
            let longer: u128 = debits
                .iter()
                .filter(|&&(made, _)| made + DAY_MS + BUCKET_MS > probe_ms)
                .map(|d| d.1)
                .sum();
            let counted = w.sum_at(probe_ms);
            assert!(exact <= counted && counted <= longer, "at step {i}");
            assert!(w.len() <= BUCKETS_MAX, "{} buckets", w.len());
        }
    }

    /// Issue 15: a pending debit that ends below its reservation gives the rest back to its
    /// own minute while that minute is in the window, and nothing once it has left.
    #[test]
    fn an_ended_pending_debit_releases_from_its_own_minute_while_it_is_counted() {
        let start_ms = T0_MS - T0_MS % BUCKET_MS;
        let mut w = Window::default();
        w.add(start_ms + 10, 100).unwrap(); // pending, reserved 100
        w.add(start_ms + BUCKET_MS, 5).unwrap(); // the next minute
        w.release(start_ms + 10, 60, start_ms + 2 * BUCKET_MS)
            .unwrap(); // posted 40
        assert_eq!(w.sum_at(start_ms + 2 * BUCKET_MS), 45);
        // The first minute leaves with what it counts now, the second stays.
        assert_eq!(w.sum_at(start_ms + BUCKET_MS + DAY_MS), 5);
        // A release after its minute left changes nothing (a 30-day pending transfer).
        let mut late = Window::default();
        late.add(start_ms, 100).unwrap();
        late.add(start_ms + DAY_MS, 1).unwrap();
        late.release(start_ms, 100, start_ms + BUCKET_MS + DAY_MS)
            .unwrap();
        assert_eq!(late.sum_at(start_ms + BUCKET_MS + DAY_MS), 1);
        // A release of more than its minute counts, or from a minute that never had a
        // debit and has not left, is a broken journal.
        assert!(w
            .release(start_ms + 10, 41, start_ms + 2 * BUCKET_MS)
            .is_err());
        assert!(w
            .release(start_ms + 3 * BUCKET_MS, 1, start_ms + 3 * BUCKET_MS)
            .is_err());
    }

    /// The held buckets round-trip, and a window rebuilt from those still in it at some time
    /// counts what the original counts from then on.
    #[test]
    fn a_window_rebuilt_from_its_buckets_counts_the_same() {
        let mut w = Window::default();
        for i in 0..100u64 {
            w.add(T0_MS + i * 1_800_000, u128::from(i) + 1).unwrap();
        }
        let at_ms = T0_MS + 100 * 1_800_000;
        let rebuilt = Window::from_buckets(w.buckets_at(at_ms)).unwrap();
        assert_eq!(rebuilt.len(), 48);
        for later_ms in (at_ms..at_ms + 2 * DAY_MS).step_by(600_000) {
            assert_eq!(rebuilt.sum_at(later_ms), w.sum_at(later_ms));
        }
        assert!(Window::from_buckets([(5, 1), (5, 1)]).is_err());
        assert!(Window::from_buckets([(6, 1), (5, 1)]).is_err());
    }
}
