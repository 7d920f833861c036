//! Checking a PIN against the stored hash: the attempt is recorded before the (slow, argon2id)
//! comparison and counted once per PIN event, however often the event is handled, and an admin
//! reset landing during the comparison is never undone.

use super::{Payments, PaymentsError};
use crate::policy::pin::{Pin, PinError};
use crate::store::payments::{pin_version_tag, EventOutcome, PaymentStore, PinAttemptResult};
use crate::store::StoreError;
use ruma::EventId;

/// argon2id runs (19 MiB, tens of milliseconds of CPU each) at most this many at a time, one
/// per core: more would only make each slower and pile up memory, while fewer would let PIN
/// checks of different users queue behind each other more than the hardware requires.
fn argon2_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        tokio::sync::Semaphore::new(cores)
    })
}

/// Runs `work` on the blocking pool once one of `permits` is free.
async fn run_bounded<T: Send + 'static>(
    permits: &tokio::sync::Semaphore,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let _permit = permits
        .acquire()
        .await
        .expect("the semaphore is never closed");
    tokio::task::spawn_blocking(work).await
}

impl Payments {
    pub(super) async fn hash(&self, pin: Pin) -> Result<String, PaymentsError> {
        let hasher = self.hasher.clone();
        run_bounded(argon2_permits(), move || hasher.hash(&pin))
            .await?
            .map_err(PaymentsError::Pin)
    }

    pub(super) async fn matches(&self, pin: Pin, hash: String) -> Result<bool, PaymentsError> {
        let hasher = self.hasher.clone();
        run_bounded(argon2_permits(), move || hasher.matches(&pin, &hash))
            .await?
            .map_err(PaymentsError::Pin)
    }

    /// Checks `pin` (from the PIN event `event_id`) against the user's PIN: the attempt is
    /// stored before the comparison, once per event ([`check_pin_with`]).
    pub(super) async fn check_pin(
        &self,
        user: &str,
        event_id: &EventId,
        pin: Pin,
        now_ms: u64,
    ) -> Result<Result<(), PinError>, PaymentsError> {
        // Metrics count only attempts that reached the comparison (not ones refused while locked).
        let compared = std::sync::atomic::AtomicBool::new(false);
        let result = check_pin_with(&self.store, user, event_id.as_str(), now_ms, |hash| {
            compared.store(true, std::sync::atomic::Ordering::Relaxed);
            self.matches(pin, hash)
        })
        .await?;
        if compared.load(std::sync::atomic::Ordering::Relaxed) {
            match &result {
                Err(PinError::Locked { .. }) => {
                    self.metrics.pin_failure();
                    self.metrics.pin_lockout();
                }
                Err(PinError::Wrong { .. }) => self.metrics.pin_failure(),
                _ => {}
            }
        }
        Ok(result)
    }
}

/// Swaps a PIN check tries to record its attempt before giving up (each lost swap means
/// another attempt or a reset moved the record).
const PIN_SWAPS_MAX: usize = 16;

/// A PIN check's result as stored per event.
pub(crate) fn attempt_of(result: &Result<(), PinError>) -> PinAttemptResult {
    match result {
        Ok(()) => PinAttemptResult::Matched,
        Err(PinError::Wrong { attempts_left }) => PinAttemptResult::Wrong {
            attempts_left: *attempts_left,
        },
        Err(PinError::Locked { remaining_ms }) => PinAttemptResult::Locked {
            remaining_ms: *remaining_ms,
        },
        Err(_) => PinAttemptResult::NotSet,
    }
}

/// A stored PIN attempt's result, as the check returned it.
fn result_of(attempt: PinAttemptResult) -> Result<(), PinError> {
    match attempt {
        PinAttemptResult::Matched => Ok(()),
        PinAttemptResult::Wrong { attempts_left } => Err(PinError::Wrong { attempts_left }),
        PinAttemptResult::Locked { remaining_ms } => Err(PinError::Locked { remaining_ms }),
        PinAttemptResult::NotSet => Err(PinError::NotSet),
    }
}

/// The PIN check of the PIN event `event_id` against the store, with the comparison
/// (`matches`: argon2id, slow) passed in. Both writes are compare-and-swap: the attempt is
/// recorded before comparing; the result is written only over the record the attempt wrote.
/// If the record changed meanwhile (an admin reset, a new PIN) the check aborts without
/// writing, so an old hash is never written back: `NotSet` when the PIN is gone or replaced
/// (the attempt was against a PIN that no longer counts).
///
/// One attempt per event, however often the event is handled: each swap also records, in the
/// same atomic write, where the event's attempt stands. Handled again after it finished (its
/// reply failed to send, a crash), the event gets its recorded result: no second count, no
/// second comparison. Handled again after it was counted but before it finished, it is
/// compared without being counted again.
pub(crate) async fn check_pin_with<F, Fut>(
    store: &PaymentStore,
    user: &str,
    event_id: &str,
    now_ms: u64,
    matches: F,
) -> Result<Result<(), PinError>, PaymentsError>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<bool, PaymentsError>>,
{
    let counted_as = match store.outcome(event_id)? {
        Some(EventOutcome::PinChecked { attempt }) => {
            // The result may be the write of an earlier try whose flush failed (or of a
            // concurrent one still flushing): it must be durable before it is told again.
            store.flush().await?;
            return Ok(result_of(attempt));
        }
        Some(EventOutcome::PinBegun { record_version }) => Some(record_version),
        _ => None,
    };
    let finished = |result: &Result<(), PinError>| EventOutcome::PinChecked {
        attempt: attempt_of(result),
    };
    let begun = match counted_as {
        Some(record_version) => match store.pin_versioned(user)? {
            // Still the record this event's attempt wrote: carry on with it.
            Some((record, bytes))
                if pin_version_tag(&bytes) == record_version && record.hash.is_some() =>
            {
                Some((record, bytes))
            }
            _ => {
                tracing::warn!(%user, "the PIN record changed during a check (reset?); the check is void");
                store
                    .put_outcome(event_id, &finished(&Err(PinError::NotSet)))
                    .await?;
                return Ok(Err(PinError::NotSet));
            }
        },
        None => {
            let mut begun = None;
            for _ in 0..PIN_SWAPS_MAX {
                let Some((mut record, version)) = store.pin_versioned(user)? else {
                    store
                        .put_outcome(event_id, &finished(&Err(PinError::NotSet)))
                        .await?;
                    return Ok(Err(PinError::NotSet));
                };
                if let Err(e) = record.begin_attempt(now_ms) {
                    // Locked or not set: refused without counting; the answer is kept so a
                    // retry says the same.
                    let refused = Err(e);
                    store.put_outcome(event_id, &finished(&refused)).await?;
                    return Ok(refused);
                }
                if let Some(written) = store
                    .swap_pin_recording(user, &version, &record, event_id, |record_version| {
                        EventOutcome::PinBegun { record_version }
                    })
                    .await?
                {
                    begun = Some((record, written));
                    break;
                }
            }
            begun
        }
    };
    let Some((mut record, written)) = begun else {
        return Err(StoreError::Corrupt {
            tree: "userid_pin",
            reason: "the PIN record kept changing during a check",
        }
        .into());
    };
    let hash = record.hash.clone().expect("begin_attempt checked the hash");
    let matched = matches(hash).await?;
    let result = record.finish_attempt(matched, now_ms);
    let outcome = finished(&result);
    if store
        .swap_pin_recording(user, &written, &record, event_id, |_| outcome)
        .await?
        .is_none()
    {
        tracing::warn!(%user, "the PIN record changed during a check (reset?); the check is void");
        store
            .put_outcome(event_id, &finished(&Err(PinError::NotSet)))
            .await?;
        return Ok(Err(PinError::NotSet));
    }
    Ok(result)
}

#[cfg(test)]
mod powercut;

#[cfg(test)]
mod tests {

    /// Many users' PIN checks at once run at most one per permit, and all of them run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn argon2_work_runs_at_most_one_per_permit_and_all_of_it_runs() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let permits = Arc::new(tokio::sync::Semaphore::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let (permits, running, most) = (permits.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    super::run_bounded(&permits, move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        // Long enough for the others to pile up behind the permits.
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                        i
                    })
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut done = Vec::new();
        for task in tasks {
            done.push(task.await.unwrap());
        }
        assert_eq!(done, (0..12).collect::<Vec<_>>());
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?}");
        assert!(super::argon2_permits().available_permits() >= 1);
    }

    use super::*;
    use crate::policy::pin::PinRecord;

    /// M4: an admin reset landing while the PIN is being compared is not undone by the check
    /// writing its result (with the old hash) back.
    #[tokio::test]
    async fn a_reset_during_a_pin_check_is_not_undone() {
        use crate::admin::service::PinReset;
        let dir = tempfile::tempdir().unwrap();
        let store = PaymentStore::open(dir.path()).unwrap();
        store
            .put_pin("@a:hs", &PinRecord::new("$argon2id$old".into()))
            .await
            .unwrap();
        let during = store.clone();
        let result = check_pin_with(&store, "@a:hs", "$pin1", 1_000, |hash| async move {
            assert_eq!(hash, "$argon2id$old");
            // The admin reset lands while argon2 runs.
            assert_eq!(during.reset_pin("@a:hs").await, Ok(true));
            Ok(true)
        })
        .await
        .unwrap();
        assert_eq!(result, Err(PinError::NotSet), "the check is void");
        let record = store.pin("@a:hs").unwrap().unwrap();
        assert_eq!(record.hash, None, "the reset stands");
        assert_eq!(record.failed_in_row, 0);

        // Without a race the check records its result as before.
        store
            .put_pin("@a:hs", &PinRecord::new("$argon2id$new".into()))
            .await
            .unwrap();
        let wrong = check_pin_with(&store, "@a:hs", "$pin2", 1_000, |_| async { Ok(false) })
            .await
            .unwrap();
        assert!(matches!(wrong, Err(PinError::Wrong { .. })), "{wrong:?}");
        assert_eq!(store.pin("@a:hs").unwrap().unwrap().failed_in_row, 1);
    }

    async fn store_with_pin() -> (tempfile::TempDir, PaymentStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = PaymentStore::open(dir.path()).unwrap();
        store
            .put_pin("@a:hs", &PinRecord::new("$argon2id$h".into()))
            .await
            .unwrap();
        (dir, store)
    }

    fn failed_in_row(store: &PaymentStore) -> u32 {
        store.pin("@a:hs").unwrap().unwrap().failed_in_row
    }

    /// L2: a wrong PIN whose reply failed, handled again, counts once and is not compared
    /// again; another PIN event is a new attempt.
    #[tokio::test]
    async fn a_pin_event_handled_again_is_not_counted_again() {
        let (_dir, store) = store_with_pin().await;
        let first = check_pin_with(&store, "@a:hs", "$pin", 1_000, |_| async { Ok(false) })
            .await
            .unwrap();
        assert_eq!(first, Err(PinError::Wrong { attempts_left: 4 }));
        assert_eq!(failed_in_row(&store), 1);
        // The transaction is retried (its reply failed): same answer, no argon2, no count.
        for _ in 0..3 {
            let again = check_pin_with(&store, "@a:hs", "$pin", 2_000, |_| async {
                panic!("the PIN was compared again")
            })
            .await
            .unwrap();
            assert_eq!(again, Err(PinError::Wrong { attempts_left: 4 }));
        }
        assert_eq!(failed_in_row(&store), 1, "one event, one attempt");
        let other = check_pin_with(&store, "@a:hs", "$pin-2", 3_000, |_| async { Ok(false) })
            .await
            .unwrap();
        assert_eq!(other, Err(PinError::Wrong { attempts_left: 3 }));
        assert_eq!(failed_in_row(&store), 2);
        // A right PIN replayed after later attempts does not reset them again either.
        let right = check_pin_with(&store, "@a:hs", "$pin-3", 4_000, |_| async { Ok(true) })
            .await
            .unwrap();
        assert_eq!(right, Ok(()));
        assert_eq!(failed_in_row(&store), 0);
    }

    /// L2: an attempt counted but not finished (the comparison failed with a retryable error)
    /// is compared on the retry without being counted a second time.
    #[tokio::test]
    async fn a_pin_attempt_interrupted_after_counting_is_finished_without_counting_again() {
        let (_dir, store) = store_with_pin().await;
        // The comparison fails with a retryable error.
        let interrupt = |_| async {
            Err(PaymentsError::Store(StoreError::Corrupt {
                tree: "test",
                reason: "interrupted",
            }))
        };
        let interrupted = check_pin_with(&store, "@a:hs", "$pin", 1_000, interrupt).await;
        assert!(interrupted.is_err());
        assert_eq!(failed_in_row(&store), 1, "counted before comparing");
        let retried = check_pin_with(&store, "@a:hs", "$pin", 2_000, |_| async { Ok(false) })
            .await
            .unwrap();
        assert_eq!(retried, Err(PinError::Wrong { attempts_left: 4 }));
        assert_eq!(failed_in_row(&store), 1, "not counted twice");

        // Interrupted, then the admin reset the PIN: the retry is void.
        let interrupted = check_pin_with(&store, "@a:hs", "$pin-2", 3_000, interrupt).await;
        assert!(interrupted.is_err());
        {
            use crate::admin::service::PinReset;
            assert_eq!(store.reset_pin("@a:hs").await, Ok(true));
        }
        let retried = check_pin_with(&store, "@a:hs", "$pin-2", 4_000, |_| async {
            panic!("compared against a reset PIN")
        })
        .await
        .unwrap();
        assert_eq!(retried, Err(PinError::NotSet));
    }
}
