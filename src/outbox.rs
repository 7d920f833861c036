//! The outbox: what the bot must say after the ledger changed (receipts, top-up and
//! withdrawal notices), delivered at least once and, thanks to deterministic transaction ids,
//! shown once.
//!
//! The ledger's journal is the durable record of every change, written in the same commit as
//! the change itself; payment transfers carry in their memo what their receipt needs. The
//! outbox is therefore a durable *cursor* over the journal (stored in the payment store): a
//! task follows the journal up to its durable head, hands each entry after the cursor to a
//! [`Deliver`]er (which sends with transaction ids derived from the transfer id and its new
//! state, so the homeserver deduplicates a re-send), and moves the cursor only after the send
//! was accepted. A crash between "money moved" and "room told" leaves the cursor before the
//! entry: after the restart it is delivered again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::ledger::{ExportedEntry, Ledger, LedgerError};
use crate::store::payments::{OutboxCursor, PaymentStore};
use crate::store::StoreError;

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// The homeserver or a store is unavailable: retried with the same transaction ids.
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying cannot help (the bot left the room, the event is refused): logged, skipped.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// Errors of the outbox loop itself.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The cursor could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tells the world about one journal entry. Must be idempotent: the same entry may be
/// delivered again after a crash, and must then send with the same transaction ids.
#[async_trait]
pub trait Deliver: Send + Sync + 'static {
    /// Delivers `entry`; `Ok(true)` if something was sent.
    async fn deliver(&self, entry: &ExportedEntry) -> Result<bool, DeliverError>;
}

/// Bounds of the outbox loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxPolicy {
    /// Most journal entries read per pass.
    pub entries_per_pass_max: usize,
    /// How often the journal is looked at without a poke (changes made by others: top-ups,
    /// expiries).
    pub poll_ms: u64,
    /// Attempts per entry on transient errors after which each further failure is logged at
    /// error level (something needs an operator). The entry is still retried, at the capped
    /// backoff, until it is delivered or mxpay stops: the cursor never passes an entry that
    /// may still be delivered.
    pub attempts_max: u32,
    /// First delay between attempts; doubles each time.
    pub backoff_base_ms: u64,
    /// Largest delay between attempts.
    pub backoff_max_ms: u64,
}

impl Default for OutboxPolicy {
    fn default() -> Self {
        Self {
            entries_per_pass_max: 512,
            poll_ms: 250,
            attempts_max: 12,
            backoff_base_ms: 250,
            backoff_max_ms: 60_000,
        }
    }
}

/// Wakes the outbox at once (after the payment layer changed the ledger).
#[derive(Debug, Clone, Default)]
pub struct OutboxPoke(Arc<Notify>);

impl OutboxPoke {
    /// Makes the outbox look at the journal now.
    pub fn poke(&self) {
        self.0.notify_one();
    }
}

/// The outbox task.
pub struct Outbox {
    ledger: Ledger,
    store: PaymentStore,
    deliver: Arc<dyn Deliver>,
    policy: OutboxPolicy,
    poke: OutboxPoke,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Outbox {
    /// The same outbox, reporting its backlog (depth, oldest age) in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reports the backlog: `pending` entries not yet told, the oldest at ledger time
    /// `oldest_ms`.
    fn report(&self, pending: usize, oldest_ms: Option<u64>) {
        if let Some(metrics) = &self.metrics {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let age_ms = oldest_ms.map_or(0, |t| now_ms.saturating_sub(t));
            metrics.set_outbox(pending, age_ms);
        }
    }

    /// An outbox over `ledger`, keeping its cursor in `store`, delivering through `deliver`.
    pub fn new(
        ledger: Ledger,
        store: PaymentStore,
        deliver: Arc<dyn Deliver>,
        policy: OutboxPolicy,
        poke: OutboxPoke,
    ) -> Self {
        Self {
            ledger,
            store,
            deliver,
            policy,
            poke,
            metrics: None,
        }
    }

    /// On the very first start there is no cursor: it is set to the journal's durable head,
    /// so a deployment that gains the outbox does not replay its whole history into rooms.
    pub async fn init_cursor(&self) -> Result<OutboxCursor, OutboxError> {
        if let Some(cursor) = self.store.outbox_cursor()? {
            return Ok(cursor);
        }
        let cursor = OutboxCursor {
            record_seq: self.ledger.durable_seq().await?,
            entry_index: u64::MAX,
        };
        self.store.set_outbox_cursor(cursor).await?;
        Ok(cursor)
    }

    /// Runs until `shutdown` turns true.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            if let Err(error) = self.run(shutdown).await {
                tracing::error!(%error, "the outbox stopped; receipts wait for the next start");
            }
        })
    }

    async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), OutboxError> {
        let mut cursor = self.init_cursor().await?;
        // From the cursor's record (its entries up to the cursor are skipped below), not
        // from record 1: a restart reads what is left to tell, not the whole journal.
        let mut tail = self.ledger.tail_from(cursor.record_seq).await?;
        // Position of the last entry read: (record, index within it).
        let mut at = OutboxCursor {
            record_seq: 0,
            entry_index: 0,
        };
        let poll = Duration::from_millis(self.policy.poll_ms);
        while !*shutdown.borrow() {
            let until = self.ledger.durable_seq().await?;
            let entries = tail.read_until(until, self.policy.entries_per_pass_max)?;
            if entries.is_empty() {
                self.report(0, None);
                tokio::select! {
                    _ = self.poke.0.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let mut moved = false;
            let count = entries.len();
            for (done, entry) in entries.into_iter().enumerate() {
                // Entries of this pass not told yet (the ones before the cursor are skipped
                // quickly and count too: they are still to be looked at).
                self.report(count - done, Some(entry.time_ms));
                if entry.record_seq == at.record_seq {
                    at.entry_index += 1;
                } else {
                    at = OutboxCursor {
                        record_seq: entry.record_seq,
                        entry_index: 0,
                    };
                }
                if at <= cursor {
                    continue;
                }
                let Some(sent) = self.deliver_with_retries(&entry, at, &mut shutdown).await? else {
                    // Shutting down: the cursor stays before this entry.
                    self.store.set_outbox_cursor(cursor).await?;
                    return Ok(());
                };
                cursor = at;
                moved = true;
                if sent {
                    self.store.set_outbox_cursor(cursor).await?;
                    moved = false;
                }
            }
            if moved {
                self.store.set_outbox_cursor(cursor).await?;
            }
        }
        Ok(())
    }

    /// `Some(sent)` once delivered or given up; `None` when shutting down.
    /// Delivers `entry` (at journal position `at`): `Ok(None)` when stopped before it was
    /// delivered. Transient failures are retried without a count limit (capped backoff; the
    /// loop ends on shutdown); a permanent failure is recorded as a dead letter and logged.
    async fn deliver_with_retries(
        &self,
        entry: &ExportedEntry,
        at: OutboxCursor,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<bool>, OutboxError> {
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            match self.deliver.deliver(entry).await {
                Ok(sent) => return Ok(Some(sent)),
                Err(DeliverError::Permanent(reason)) => {
                    tracing::error!(record = at.record_seq, entry = at.entry_index, %reason, "cannot tell about a ledger change; recorded as a dead letter");
                    self.store.put_dead_letter(at, &reason).await?;
                    return Ok(Some(false));
                }
                Err(DeliverError::Transient(reason)) => {
                    let delay_ms = self
                        .policy
                        .backoff_base_ms
                        .saturating_mul(1 << (attempt - 1).min(20))
                        .min(self.policy.backoff_max_ms);
                    if attempt >= self.policy.attempts_max {
                        tracing::error!(record = at.record_seq, attempt, delay_ms, %reason, "still cannot tell about a ledger change; retrying (receipts after it wait)");
                    } else {
                        tracing::warn!(record = at.record_seq, attempt, delay_ms, %reason, "telling about a ledger change failed; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
                        _ = shutdown.changed() => return Ok(None),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use parking_lot::Mutex;

    use super::*;
    use crate::clock::SystemClock;
    use crate::ledger::{JournalEntry, LedgerSettings, Owner, TransferId, TransferRequest};

    /// Records what it was asked to deliver; fails the first `fail_first` calls transiently.
    struct Recorder {
        seen: Mutex<Vec<u128>>,
        fail_first: AtomicU32,
        refuse: Option<u128>,
    }

    #[async_trait]
    impl Deliver for Recorder {
        async fn deliver(&self, entry: &ExportedEntry) -> Result<bool, DeliverError> {
            if let JournalEntry::TransferCreated { id, .. } = &entry.entry {
                if self.refuse == Some(id.0) {
                    return Err(DeliverError::Permanent("the room refused it".into()));
                }
                if self
                    .fail_first
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(DeliverError::Transient("homeserver down".into()));
                }
                self.seen.lock().push(id.0);
                return Ok(true);
            }
            Ok(false)
        }
    }

    async fn transfer(ledger: &Ledger, id: u128) {
        ledger
            .create_transfer(TransferRequest {
                reference: 0,
                id: TransferId(id),
                debit: Owner::Issuer,
                credit: Owner::user("@a:hs"),
                amount: ledger
                    .parse_amount(rust_decimal::Decimal::ONE, "EUR")
                    .unwrap(),
                memo: Vec::new(),
            })
            .await
            .unwrap();
    }

    async fn wait_for(recorder: &Recorder, count: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while recorder.seen.lock().len() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "outbox did not deliver"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A payments store and a ledger in `dir`, as `serve` lays them out.
    fn open_store_and_ledger(dir: &std::path::Path) -> (PaymentStore, Ledger) {
        let store = PaymentStore::open(&dir.join("payments")).unwrap();
        let ledger = Ledger::open(dir, &LedgerSettings::default(), Arc::new(SystemClock)).unwrap();
        (store, ledger)
    }

    fn policy() -> OutboxPolicy {
        OutboxPolicy {
            poll_ms: 10,
            backoff_base_ms: 1,
            backoff_max_ms: 5,
            ..OutboxPolicy::default()
        }
    }

    #[tokio::test]
    async fn delivers_each_change_once_across_restarts_and_retries() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ledger) = open_store_and_ledger(dir.path());
        // History before the outbox's first start is not replayed into rooms.
        transfer(&ledger, 1).await;

        let recorder = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            fail_first: AtomicU32::new(2),
            refuse: None,
        });
        let poke = OutboxPoke::default();
        let (stop, stopped) = watch::channel(false);
        let outbox = Outbox::new(
            ledger.clone(),
            store.clone(),
            recorder.clone(),
            policy(),
            poke.clone(),
        );
        outbox.init_cursor().await.unwrap();
        let task = outbox.spawn(stopped);
        transfer(&ledger, 2).await;
        poke.poke();
        transfer(&ledger, 3).await;
        wait_for(&recorder, 2).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(*recorder.seen.lock(), vec![2, 3], "retried, in order, once");

        // Restart: nothing already told is told again; new changes are.
        transfer(&ledger, 4).await;
        let (stop, stopped) = watch::channel(false);
        let task =
            Outbox::new(ledger.clone(), store, recorder.clone(), policy(), poke).spawn(stopped);
        wait_for(&recorder, 3).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(*recorder.seen.lock(), vec![2, 3, 4]);
    }

    /// M3: an outage longer than `attempts_max` attempts no longer skips the receipt, and a
    /// permanently failing entry is recorded as a dead letter (the ones after it still go).
    #[tokio::test]
    async fn a_long_outage_delays_but_never_skips_and_refusals_are_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ledger) = open_store_and_ledger(dir.path());
        let policy = policy();
        let recorder = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            fail_first: AtomicU32::new(policy.attempts_max * 2),
            refuse: Some(6),
        });
        let poke = OutboxPoke::default();
        let (stop, stopped) = watch::channel(false);
        let outbox = Outbox::new(
            ledger.clone(),
            store.clone(),
            recorder.clone(),
            policy,
            poke.clone(),
        );
        outbox.init_cursor().await.unwrap();
        let task = outbox.spawn(stopped);
        transfer(&ledger, 5).await;
        transfer(&ledger, 6).await;
        transfer(&ledger, 7).await;
        poke.poke();
        wait_for(&recorder, 2).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(
            *recorder.seen.lock(),
            vec![5, 7],
            "5 after the outage, 6 refused"
        );
        let dead = store.dead_letters().unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert!(dead[0].1.contains("refused"), "{dead:?}");
    }

    /// Issue 15: a restart reads the journal from the cursor's record on, not from record 1:
    /// with the records before it gone (a checkpoint stands for them), it still delivers.
    #[tokio::test]
    async fn a_restart_reads_the_journal_from_the_cursor_not_from_record_one() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ledger) = open_store_and_ledger(dir.path());
        for id in 1..=3 {
            transfer(&ledger, id).await;
        }
        let poke = OutboxPoke::default();
        let recorder = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            fail_first: AtomicU32::new(0),
            refuse: None,
        });
        let outbox = Outbox::new(
            ledger.clone(),
            store.clone(),
            recorder.clone(),
            policy(),
            poke.clone(),
        );
        let cursor = outbox.init_cursor().await.unwrap();
        assert!(cursor.record_seq >= 4, "{cursor:?}");
        drop(outbox);
        ledger.checkpoint().await.unwrap();
        drop(ledger);
        {
            let db = sled::Config::new()
                .path(dir.path().join("ledger"))
                .segment_size(crate::ledger::storage::SEGMENT_BYTES)
                .open()
                .unwrap();
            let journal = db.open_tree(crate::ledger::storage::JOURNAL_TREE).unwrap();
            for seq in 1..cursor.record_seq - 1 {
                let key = crate::ledger::SledStorage::record_key(seq);
                assert!(journal.remove(key).unwrap().is_some());
            }
            db.flush().unwrap();
        }
        let ledger = Ledger::open(
            dir.path(),
            &LedgerSettings::default(),
            Arc::new(SystemClock),
        )
        .unwrap();
        transfer(&ledger, 4).await;
        let (stop, stopped) = watch::channel(false);
        let task =
            Outbox::new(ledger.clone(), store, recorder.clone(), policy(), poke).spawn(stopped);
        wait_for(&recorder, 1).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(*recorder.seen.lock(), vec![4]);
    }
}
