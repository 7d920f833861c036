//! The inbox database: received transactions keyed by id, with an arrival-ordered queue of the
//! ones not yet processed.
//!
//! Trees:
//! - `txnid_seq`: transaction id -> sequence number (u64 big-endian). Kept for every
//!   transaction ever stored: it is what makes a replayed id a no-op, across restarts.
//! - `seq_pending`: sequence number -> entry (id + body), removed once processed.
//! - `seq_failed`: sequence number -> entry, for transactions whose processing failed for good
//!   (kept for an admin to inspect, for a bounded time and count: see
//!   [`InboxStore::prune_failed`]).
//! - `seq_failedms`: sequence number -> when it was moved to `seq_failed` (ms since the epoch,
//!   u64 big-endian). Entries failed before this tree existed have none and count as oldest.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

use super::StoreError;

const TXNID_SEQ: &str = "txnid_seq";
const SEQ_PENDING: &str = "seq_pending";
const SEQ_FAILED: &str = "seq_failed";
const SEQ_FAILEDMS: &str = "seq_failedms";

/// Outcome of [`InboxStore::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Stored now, under this sequence number.
    New(u64),
    /// The key was stored before (under this sequence number); nothing was written.
    Exists(u64),
}

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Arrival order; strictly increasing, also across restarts.
    pub seq: u64,
    /// The key it was stored under (the transaction id).
    pub key: Vec<u8>,
    /// The stored bytes (the raw body).
    pub value: Vec<u8>,
}

/// The inbox database. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct InboxStore {
    db: sled::Db,
    /// sled's log file, fdatasync'ed after each flush.
    log: std::sync::Arc<std::fs::File>,
    txnid_seq: sled::Tree,
    seq_pending: sled::Tree,
    seq_failed: sled::Tree,
    seq_failedms: sled::Tree,
}

impl std::fmt::Debug for InboxStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxStore")
            .field("pending", &self.seq_pending.len())
            .finish_non_exhaustive()
    }
}

impl InboxStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: dir.to_owned(),
            source,
        };
        let db = crate::sled_open::open_waiting_for_lock(&sled::Config::new().path(dir))
            .map_err(open_err)?;
        Ok(Self {
            txnid_seq: db.open_tree(TXNID_SEQ).map_err(open_err)?,
            seq_pending: db.open_tree(SEQ_PENDING).map_err(open_err)?,
            seq_failed: db.open_tree(SEQ_FAILED).map_err(open_err)?,
            seq_failedms: db.open_tree(SEQ_FAILEDMS).map_err(open_err)?,
            log: std::sync::Arc::new(
                crate::sled_open::log_file(dir).map_err(|e| open_err(sled::Error::Io(e)))?,
            ),
            db,
        })
    }

    /// Stores `value` under `key` unless `key` was stored before, and returns once the data
    /// is on disk (flushed) in both cases, so an answer sent after this never outruns the disk.
    pub async fn insert(&self, key: &[u8], value: &[u8]) -> Result<Inserted, StoreError> {
        let encoded = encode_entry(key, value);
        let result = (&self.txnid_seq, &self.seq_pending).transaction(|(ids, pending)| {
            if let Some(seq) = ids.get(key)? {
                return Ok(Inserted::Exists(decode_seq(&seq).ok_or(
                    ConflictableTransactionError::Abort(StoreError::Corrupt {
                        tree: TXNID_SEQ,
                        reason: "sequence number is not 8 bytes",
                    }),
                )?));
            }
            let seq = ids.generate_id()?;
            ids.insert(key, &seq.to_be_bytes())?;
            pending.insert(&seq.to_be_bytes(), encoded.as_slice())?;
            Ok(Inserted::New(seq))
        });
        let inserted = match result {
            Ok(inserted) => inserted,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        // Also flush for `Exists`: a concurrent insert of the same key may not be on disk yet.
        self.flush().await?;
        Ok(inserted)
    }

    /// Up to `limit` pending entries with `seq > after`, in arrival order.
    pub fn pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        let start = after.map_or(0, |s| s.saturating_add(1));
        let mut out = Vec::new();
        for item in self.seq_pending.range(start.to_be_bytes()..).take(limit) {
            let (k, v) = item?;
            out.push(decode_stored(SEQ_PENDING, &k, &v)?);
        }
        Ok(out)
    }

    /// Entries whose processing failed for good, oldest first (at most `limit`).
    pub fn failed(&self, limit: usize) -> Result<Vec<StoredEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.seq_failed.iter().take(limit) {
            let (k, v) = item?;
            out.push(decode_stored(SEQ_FAILED, &k, &v)?);
        }
        Ok(out)
    }

    /// Number of pending entries.
    pub fn pending_len(&self) -> usize {
        self.seq_pending.len()
    }

    /// Whether `key` was ever stored.
    pub fn contains_key(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.txnid_seq.contains_key(key)?)
    }

    /// Whether any key starts with `prefix`.
    pub fn contains_prefix(&self, prefix: &[u8]) -> Result<bool, StoreError> {
        Ok(self
            .txnid_seq
            .scan_prefix(prefix)
            .next()
            .transpose()?
            .is_some())
    }

    /// Removes a pending entry (processed); its key stays known. Flushed before returning.
    pub async fn remove_pending(&self, seq: u64) -> Result<(), StoreError> {
        self.seq_pending.remove(seq.to_be_bytes())?;
        self.flush().await
    }

    /// Number of failed entries kept.
    pub fn failed_len(&self) -> usize {
        self.seq_failed.len()
    }

    /// Moves a pending entry to the failed tree, noting `now_ms` as its failure time. Flushed
    /// before returning.
    pub async fn move_to_failed(&self, seq: u64, now_ms: u64) -> Result<(), StoreError> {
        let key = seq.to_be_bytes();
        (&self.seq_pending, &self.seq_failed, &self.seq_failedms)
            .transaction(|(pending, failed, failed_ms)| {
                if let Some(value) = pending.remove(&key)? {
                    failed.insert(&key, value)?;
                    failed_ms.insert(&key, &now_ms.to_be_bytes())?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => e.into(),
            })?;
        self.flush().await
    }

    /// Deletes failed entries that failed at or before `cutoff_ms` (those without a failure
    /// time too), then the oldest beyond the newest `keep_max`. Returns how many were deleted;
    /// flushed before returning when any were. Reads at most every failed entry's time, which
    /// `keep_max` bounds after the first call.
    pub async fn prune_failed(&self, cutoff_ms: u64, keep_max: usize) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        let len = self.seq_failed.len();
        for (index, item) in self.seq_failed.iter().keys().enumerate() {
            let key = item?;
            let failed_ms = match self.seq_failedms.get(&key)? {
                Some(bytes) => decode_seq(&bytes).ok_or(StoreError::Corrupt {
                    tree: SEQ_FAILEDMS,
                    reason: "failure time is not 8 bytes",
                })?,
                None => 0,
            };
            // Oldest first: the first `len - keep_max` are over the count bound.
            if failed_ms <= cutoff_ms || index < len.saturating_sub(keep_max) {
                doomed.push(key);
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut failed = sled::Batch::default();
        let mut failed_ms = sled::Batch::default();
        for key in &doomed {
            failed.remove(key.clone());
            failed_ms.remove(key.clone());
        }
        // Two batches, not a transaction: a crash between them leaves times without entries,
        // which nothing reads (and the next prune of an entry removes its time anyway).
        self.seq_failed.apply_batch(failed)?;
        self.seq_failedms.apply_batch(failed_ms)?;
        self.flush().await?;
        Ok(doomed.len())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        let log = self.log.clone();
        // sled's flush blocks on fsync: keep it off the async workers.
        tokio::task::spawn_blocking(move || crate::sled_open::flush_durably(&db, &log)).await??;
        Ok(())
    }
}

fn encode_entry(key: &[u8], value: &[u8]) -> Vec<u8> {
    let key_len = u32::try_from(key.len()).expect("keys are short");
    let mut out = Vec::with_capacity(4 + key.len() + value.len());
    out.extend_from_slice(&key_len.to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

fn decode_seq(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn decode_stored(tree: &'static str, k: &[u8], v: &[u8]) -> Result<StoredEntry, StoreError> {
    let corrupt = |reason| StoreError::Corrupt { tree, reason };
    let seq = decode_seq(k).ok_or(corrupt("key is not 8 bytes"))?;
    let len_bytes: [u8; 4] = v
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(corrupt("entry shorter than its header"))?;
    let key_len = u32::from_be_bytes(len_bytes) as usize;
    let key = v
        .get(4..4 + key_len)
        .ok_or(corrupt("entry shorter than its key"))?;
    Ok(StoredEntry {
        seq,
        key: key.to_vec(),
        value: v[4 + key_len..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored layout is a format: changing it needs a migration, and this test says so.
    #[test]
    fn entry_encoding_is_pinned() {
        assert_eq!(encode_entry(b"ab", b"{}"), b"\0\0\0\x02ab{}");
        let decoded = decode_stored(SEQ_PENDING, &7u64.to_be_bytes(), b"\0\0\0\x02ab{}").unwrap();
        assert_eq!(
            decoded,
            StoredEntry {
                seq: 7,
                key: b"ab".to_vec(),
                value: b"{}".to_vec()
            }
        );
        assert!(decode_stored(SEQ_PENDING, &7u64.to_be_bytes(), b"\0\0\0\x09ab").is_err());
        assert!(decode_stored(SEQ_PENDING, b"short", b"\0\0\0\0").is_err());
    }

    #[tokio::test]
    async fn insert_dedupes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let seq_a;
        {
            let store = InboxStore::open(dir.path()).unwrap();
            let Inserted::New(a) = store.insert(b"a", b"{1}").await.unwrap() else {
                panic!("first insert is new")
            };
            seq_a = a;
            assert_eq!(
                store.insert(b"a", b"{other}").await.unwrap(),
                Inserted::Exists(a)
            );
            let Inserted::New(b) = store.insert(b"b", b"{2}").await.unwrap() else {
                panic!("second key is new")
            };
            assert!(b > a);
            assert_eq!(store.pending_len(), 2);
            store.remove_pending(a).await.unwrap();
        }
        let store = InboxStore::open(dir.path()).unwrap();
        assert_eq!(
            store.insert(b"a", b"{x}").await.unwrap(),
            Inserted::Exists(seq_a)
        );
        let pending = store.pending(None, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].key, b"b");
        assert_eq!(pending[0].value, b"{2}");
        let Inserted::New(c) = store.insert(b"c", b"").await.unwrap() else {
            panic!("new key")
        };
        assert!(c > pending[0].seq, "sequence keeps growing after reopen");
        assert_eq!(store.pending(Some(pending[0].seq), 10).unwrap()[0].seq, c);
        store.move_to_failed(c, 1_000).await.unwrap();
        assert_eq!(store.failed(10).unwrap()[0].key, b"c");
        assert_eq!(store.pending_len(), 1);
    }

    #[tokio::test]
    async fn failed_entries_are_pruned_by_age_then_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = InboxStore::open(dir.path()).unwrap();
        let mut seqs = Vec::new();
        for (key, failed_ms) in [(b"a", 100), (b"b", 200), (b"c", 300), (b"d", 400)] {
            let Inserted::New(seq) = store.insert(key, b"{}").await.unwrap() else {
                panic!("new key")
            };
            store.move_to_failed(seq, failed_ms).await.unwrap();
            seqs.push(seq);
        }
        assert_eq!(store.prune_failed(99, 10).await.unwrap(), 0, "none older");
        assert_eq!(store.prune_failed(200, 10).await.unwrap(), 2, "a and b");
        let keys: Vec<Vec<u8>> = store
            .failed(10)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, [b"c".to_vec(), b"d".to_vec()]);
        assert_eq!(
            store.prune_failed(0, 1).await.unwrap(),
            1,
            "c: over the count"
        );
        assert_eq!(store.failed(10).unwrap()[0].key, b"d");
        assert_eq!(store.seq_failedms.len(), 1, "times go with their entries");
    }
}
