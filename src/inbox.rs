//! The durable log of received appservice transactions, keyed by transaction id.
//!
//! The HTTP edge calls [`Inbox::accept`] and answers the homeserver only after it returns: a
//! transaction that was acknowledged is on disk. A worker takes pending transactions in
//! arrival order ([`Inbox::pending`]) and marks each processed or failed; a transaction id seen
//! once is never stored or processed again, also after a restart.
//!
//! A failed transaction is kept for an admin to inspect, but not for ever: its raw body may
//! hold a PIN typed in plain text, so failed transactions are deleted
//! [`FailedRetention::keep_ms`] after they failed, and beyond the newest
//! [`FailedRetention::keep_max`].

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::clock::{SharedClock, SystemClock};
use crate::store::{InboxStore, Inserted, StoreError, StoredEntry};

/// Longest accepted transaction id, in bytes (ids are path segments; Synapse's are decimal).
pub const TXN_ID_MAX_BYTES: usize = 255;

/// Errors of the inbox.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored body is not JSON (cannot happen for bodies that went through `accept`).
    #[error("stored transaction {seq} is not JSON: {source}")]
    CorruptBody {
        /// Its sequence number.
        seq: u64,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A stored transaction id is not UTF-8.
    #[error("stored transaction {seq} has a non-UTF-8 id")]
    CorruptId {
        /// Its sequence number.
        seq: u64,
    },
}

/// One received transaction, as the handler sees it. Its Debug form leaves the body out: a
/// plaintext event in it may hold a PIN typed in the wrong room.
#[derive(Clone, PartialEq)]
pub struct InboxTransaction {
    /// The homeserver's transaction id.
    pub txn_id: String,
    /// Arrival order, strictly increasing across restarts.
    pub seq: u64,
    /// The whole body as received (`events`, `ephemeral`, and the unstable E2E keys).
    pub body: serde_json::Value,
}

impl std::fmt::Debug for InboxTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let events = self.body["events"].as_array().map_or(0, Vec::len);
        f.debug_struct("InboxTransaction")
            .field("txn_id", &self.txn_id)
            .field("seq", &self.seq)
            .field("events", &events)
            .field("body", &"<redacted>")
            .finish()
    }
}

/// How long, and how many, failed transactions are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedRetention {
    /// A failed transaction is deleted this long after it failed.
    pub keep_ms: u64,
    /// At most this many are kept; the oldest go first.
    pub keep_max: usize,
}

impl Default for FailedRetention {
    /// 7 days (time to notice and look) and 1,000 transactions (at 10 MiB each, a bounded
    /// 10 GiB worst case; real ones are a few KiB).
    fn default() -> Self {
        Self {
            keep_ms: 7 * 24 * 3_600_000,
            keep_max: 1_000,
        }
    }
}

/// Least time between two time-based prunes of the failed list by an idle worker
/// ([`Inbox::prune_failed_if_due`]): a prune reads every failed entry, and retention is counted
/// in days.
pub const FAILED_PRUNE_INTERVAL_MS: u64 = 60_000;

/// Outcome of [`Inbox::accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Stored for processing under this sequence number.
    New(u64),
    /// This transaction id was stored before; nothing changed.
    Duplicate,
}

/// The inbox. Clones share the database and the wake-up signal.
#[derive(Clone)]
pub struct Inbox {
    store: InboxStore,
    wake: Arc<Notify>,
    clock: SharedClock,
    retention: FailedRetention,
    /// When the failed list was last pruned (ms since the epoch; 0: not yet).
    pruned_at_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("store", &self.store)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// Opens (or creates) the inbox database in `dir` (`<data_dir>/inbox`), on the system
    /// clock with the default [`FailedRetention`].
    pub fn open(dir: &Path) -> Result<Self, InboxError> {
        Self::open_with(dir, Arc::new(SystemClock), FailedRetention::default())
    }

    /// [`Inbox::open`] with the clock that dates failures and their retention.
    pub fn open_with(
        dir: &Path,
        clock: SharedClock,
        retention: FailedRetention,
    ) -> Result<Self, InboxError> {
        Ok(Self {
            store: InboxStore::open(dir)?,
            wake: Arc::new(Notify::new()),
            clock,
            retention,
            pruned_at_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// Stores a transaction's raw JSON body unless the same transaction was stored before.
    /// Returns once the body is flushed to disk. The caller has checked that `body` is a JSON
    /// object.
    ///
    /// "The same" is the id *and* what it carries ([`fingerprint`]): Synapse with SQLite
    /// numbers transactions from 1 again after a restart, so an id alone would make mxpay
    /// drop every new transaction as a duplicate; a retry carries the same events (only their
    /// `unsigned.age` differs), so it is still recognised.
    pub async fn accept(&self, txn_id: &str, body: &[u8]) -> Result<Accepted, InboxError> {
        let key = stored_key(txn_id, body);
        let accepted = match self.store.insert(&key, body).await? {
            Inserted::New(seq) => Accepted::New(seq),
            Inserted::Exists(_) => Accepted::Duplicate,
        };
        if let Accepted::New(_) = accepted {
            self.wake.notify_one();
        }
        Ok(accepted)
    }

    /// Up to `limit` unprocessed transactions after sequence number `after`, oldest first.
    pub fn pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<InboxTransaction>, InboxError> {
        self.store
            .pending(after, limit)?
            .into_iter()
            .map(decode)
            .collect()
    }

    /// Transactions whose processing failed for good (at most `limit`, oldest first).
    pub fn failed(&self, limit: usize) -> Result<Vec<InboxTransaction>, InboxError> {
        self.store.failed(limit)?.into_iter().map(decode).collect()
    }

    /// Marks a transaction processed: it leaves the queue and is never handled again.
    pub async fn mark_processed(&self, seq: u64) -> Result<(), InboxError> {
        Ok(self.store.remove_pending(seq).await?)
    }

    /// Marks a transaction failed for good: it leaves the queue and is kept for inspection,
    /// within the [`FailedRetention`]. Returns how many older failed transactions it pushed
    /// out (see [`Inbox::prune_failed`]).
    pub async fn mark_failed(&self, seq: u64) -> Result<usize, InboxError> {
        self.store.move_to_failed(seq, self.clock.now_ms()).await?;
        self.prune_failed().await
    }

    /// [`Inbox::prune_failed`] if the last prune was [`FAILED_PRUNE_INTERVAL_MS`] ago or more
    /// (or never happened); else nothing. For an idle loop.
    pub async fn prune_failed_if_due(&self) -> Result<usize, InboxError> {
        let now_ms = self.clock.now_ms();
        let last_ms = self.pruned_at_ms.load(std::sync::atomic::Ordering::SeqCst);
        if last_ms != 0 && now_ms.saturating_sub(last_ms) < FAILED_PRUNE_INTERVAL_MS {
            return Ok(0);
        }
        self.prune_failed().await
    }

    /// Deletes failed transactions older than [`FailedRetention::keep_ms`] and beyond the
    /// newest [`FailedRetention::keep_max`]; returns how many.
    pub async fn prune_failed(&self) -> Result<usize, InboxError> {
        let now_ms = self.clock.now_ms();
        self.pruned_at_ms
            .store(now_ms.max(1), std::sync::atomic::Ordering::SeqCst);
        let cutoff_ms = now_ms.saturating_sub(self.retention.keep_ms);
        Ok(self
            .store
            .prune_failed(cutoff_ms, self.retention.keep_max)
            .await?)
    }

    /// Number of failed transactions kept.
    pub fn failed_len(&self) -> usize {
        self.store.failed_len()
    }

    /// Number of unprocessed transactions.
    pub fn depth(&self) -> usize {
        self.store.pending_len()
    }

    /// Whether a transaction with this id was ever accepted.
    pub fn contains(&self, txn_id: &str) -> Result<bool, InboxError> {
        let mut prefix = txn_id.as_bytes().to_vec();
        prefix.push(KEY_SEPARATOR);
        Ok(self.store.contains_prefix(&prefix)? || self.store.contains_key(txn_id.as_bytes())?)
    }

    /// Resolves after the next [`Inbox::accept`] of a new transaction (or at once if one
    /// happened since the last wait).
    pub async fn wait_for_new(&self) {
        self.wake.notified().await;
    }
}

/// Separates the homeserver's transaction id from the fingerprint in a stored key (ids with
/// it cannot come from Synapse: they are path segments of printable characters).
const KEY_SEPARATOR: u8 = 0;

/// The stored key of a transaction: its id, [`KEY_SEPARATOR`], its [`fingerprint`].
fn stored_key(txn_id: &str, body: &[u8]) -> Vec<u8> {
    let mut key = txn_id.as_bytes().to_vec();
    key.push(KEY_SEPARATOR);
    key.extend_from_slice(fingerprint(body).as_bytes());
    key
}

/// What a transaction carries, independent of when it was sent: the ids of its room events,
/// its to-device and ephemeral events (whole). Leaves out `unsigned` (Synapse recomputes
/// `age` for each attempt) and the key counts (a snapshot, not news).
fn fingerprint(body: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let mut hasher = blake3::Hasher::new();
    for event in value
        .get("events")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        hasher.update(b"e");
        hasher.update(
            event
                .get("event_id")
                .map(|e| e.to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
    }
    for key in [
        "de.sorunome.msc2409.to_device",
        "to_device",
        "ephemeral",
        "de.sorunome.msc2409.ephemeral",
    ] {
        if let Some(list) = value.get(key) {
            hasher.update(key.as_bytes());
            // serde_json's maps are sorted: the same content always prints the same.
            hasher.update(list.to_string().as_bytes());
        }
    }
    hasher.finalize().to_hex()[..32].to_owned()
}

fn decode(entry: StoredEntry) -> Result<InboxTransaction, InboxError> {
    let seq = entry.seq;
    // Keys written before fingerprints were added are the bare id.
    let id_len = entry
        .key
        .iter()
        .position(|b| *b == KEY_SEPARATOR)
        .unwrap_or(entry.key.len());
    let mut key = entry.key;
    key.truncate(id_len);
    let txn_id = String::from_utf8(key).map_err(|_| InboxError::CorruptId { seq })?;
    let body = serde_json::from_slice(&entry.value)
        .map_err(|source| InboxError::CorruptBody { seq, source })?;
    Ok(InboxTransaction { txn_id, seq, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_body_out() {
        let txn = InboxTransaction {
            txn_id: "7".to_owned(),
            seq: 3,
            body: serde_json::json!({"events": [{"type": "m.room.message",
                "content": {"msgtype": "m.text", "body": "4821"}}]}),
        };
        let debug = format!("{txn:?} {txn:#?}");
        assert!(!debug.contains("4821"), "{debug}");
        assert!(debug.contains("events: 1"), "{debug}");
    }

    /// Synapse (SQLite) numbers transactions from 1 again after it restarts: an old id with new
    /// events is a new transaction, not a duplicate to drop.
    #[tokio::test]
    async fn a_reused_id_with_other_events_is_a_new_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        inbox
            .accept("1", br#"{"events":[{"event_id":"$before_restart"}]}"#)
            .await
            .unwrap();
        let again = inbox
            .accept("1", br#"{"events":[{"event_id":"$after_restart"}]}"#)
            .await
            .unwrap();
        assert!(matches!(again, Accepted::New(_)), "{again:?}");
        let to_device = |n: u32| format!(r#"{{"de.sorunome.msc2409.to_device":[{{"n":{n}}}]}}"#);
        assert!(matches!(
            inbox.accept("2", to_device(1).as_bytes()).await.unwrap(),
            Accepted::New(_)
        ));
        assert_eq!(
            inbox.accept("2", to_device(1).as_bytes()).await.unwrap(),
            Accepted::Duplicate
        );
        assert!(matches!(
            inbox.accept("2", to_device(2).as_bytes()).await.unwrap(),
            Accepted::New(_)
        ));
        let pending = inbox.pending(None, 10).unwrap();
        let ids: Vec<&str> = pending.iter().map(|t| t.txn_id.as_str()).collect();
        assert_eq!(ids, ["1", "1", "2", "2"]);
    }

    #[tokio::test]
    async fn accept_dedupes_and_queues_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        let Accepted::New(s1) = inbox
            .accept(
                "1",
                br#"{"events":[{"event_id":"$a","unsigned":{"age":1}}]}"#,
            )
            .await
            .unwrap()
        else {
            panic!("new")
        };
        // The homeserver retrying: the same events, another age.
        assert_eq!(
            inbox
                .accept(
                    "1",
                    br#"{"events":[{"event_id":"$a","unsigned":{"age":900}}]}"#
                )
                .await
                .unwrap(),
            Accepted::Duplicate
        );
        inbox
            .accept("2", br#"{"events":[{"event_id":"$b"}]}"#)
            .await
            .unwrap();
        // The notify permit from the accepts is there: this returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), inbox.wait_for_new())
            .await
            .expect("woken");
        let pending = inbox.pending(None, 10).unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].txn_id, "1");
        assert_eq!(pending[0].seq, s1);
        assert_eq!(
            pending[0].body,
            serde_json::json!({"events": [{"event_id": "$a", "unsigned": {"age": 1}}]})
        );
        assert_eq!(pending[1].txn_id, "2");
        inbox.mark_processed(s1).await.unwrap();
        assert_eq!(inbox.depth(), 1);
        assert!(inbox.contains("1").unwrap());
        inbox.mark_failed(pending[1].seq).await.unwrap();
        assert_eq!(inbox.depth(), 0);
        assert_eq!(inbox.failed(10).unwrap()[0].txn_id, "2");
    }

    /// Failed transactions (raw bodies that may hold a plaintext PIN) are deleted once older
    /// than the retention and beyond its count; their ids stay known, so a replay is still
    /// a no-op.
    #[tokio::test]
    async fn failed_transactions_are_kept_for_a_bounded_time_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let clock = crate::clock::ManualClock::new(1_000_000);
        let retention = FailedRetention {
            keep_ms: 60_000,
            keep_max: 2,
        };
        let inbox = Inbox::open_with(dir.path(), Arc::new(clock.clone()), retention).unwrap();
        let fail = |id: &'static str| {
            let inbox = inbox.clone();
            async move {
                let Accepted::New(seq) = inbox
                    .accept(id, br#"{"events":[{"content":{"body":"4821"}}]}"#)
                    .await
                    .unwrap()
                else {
                    panic!("new")
                };
                inbox.mark_failed(seq).await.unwrap()
            }
        };
        assert_eq!(fail("1").await, 0);
        clock.advance_ms(10_000);
        assert_eq!(fail("2").await, 0);
        assert_eq!(fail("3").await, 1, "the count bound pushes out the oldest");
        let ids = |inbox: &Inbox| -> Vec<String> {
            inbox
                .failed(10)
                .unwrap()
                .into_iter()
                .map(|t| t.txn_id)
                .collect()
        };
        assert_eq!(ids(&inbox), ["2", "3"]);
        assert_eq!(inbox.prune_failed().await.unwrap(), 0, "not old yet");
        clock.advance_ms(59_999);
        assert_eq!(inbox.prune_failed_if_due().await.unwrap(), 0, "not due yet");
        clock.advance_ms(1);
        assert_eq!(
            inbox.prune_failed_if_due().await.unwrap(),
            2,
            "past the retention, and due"
        );
        assert_eq!(inbox.failed_len(), 0);
        assert!(
            inbox.contains("1").unwrap(),
            "ids stay known: a replay is still a no-op"
        );
        assert_eq!(
            inbox
                .accept("1", br#"{"events":[{"content":{"body":"4821"}}]}"#)
                .await
                .unwrap(),
            Accepted::Duplicate
        );
    }
}
