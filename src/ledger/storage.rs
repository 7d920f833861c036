//! Where the journal lives. The ledger needs only this small trait, so another backend (e.g.
//! a PostgreSQL-compatible one) can be added without touching callers; sled is the embedded
//! default.
//!
//! sled layout: one tree, `journal`, holding
//! - `b"j" ++ seq (u64 big-endian)` -> one encoded record per committed batch, and
//! - `b"h"` -> the head (seq and hash of the last record),
//!
//! both written by one atomic `apply_batch` and one `flush` per batch. Nothing else is stored:
//! balances, transfers and idempotency keys are rebuilt in memory from the journal on open.

use std::path::Path;

/// Why the storage failed (I/O, or the database could not be opened).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The underlying database reported an error.
    #[error("ledger storage: {0}")]
    Backend(String),
}

impl From<String> for StorageError {
    fn from(message: String) -> Self {
        Self::Backend(message)
    }
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

/// A stored record: its seq from the key, and its bytes.
pub type StoredRecord = Result<(u64, Vec<u8>), StorageError>;

/// The journal store: an append-only sequence of records plus a head pointer.
pub trait Storage: Send + Sync + 'static {
    /// Appends record `seq` and sets the head, atomically; returns once both are durable.
    fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError>;

    /// The head as last written, if any record was ever written.
    fn head(&self) -> Result<Option<Vec<u8>>, StorageError>;

    /// Every record with `seq >= from_seq`, in key order, read lazily.
    fn records(&self, from_seq: u64) -> Box<dyn Iterator<Item = StoredRecord> + Send>;
}

const RECORD_PREFIX: u8 = b'j';
const HEAD_KEY: &[u8] = b"h";
/// Name of the one sled tree.
pub const JOURNAL_TREE: &str = "journal";
/// Largest journal record the writer aims for; far below sled's blob threshold
/// (`SEGMENT_BYTES / 4`), since sled writes larger values to blob files it never syncs.
pub const RECORD_BYTES_TARGET: usize = 1024 * 1024;
/// Segment size of the sled log. Fixed for the life of a database (sled refuses another on
/// reopen). A batch record above a quarter of it would be written as a separate blob file
/// (one more file and fsync), so it is large enough for the biggest batch.
const SEGMENT_BYTES: usize = 8 * 1024 * 1024;

/// How often to try for sled's directory lock, and the pause between tries (2 s in all).
const LOCK_ATTEMPTS_MAX: u32 = 200;
const LOCK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// The sled-backed journal store.
pub struct SledStorage {
    // Kept so the database lives as long as the tree.
    _db: sled::Db,
    tree: sled::Tree,
    /// sled's log file, fdatasync'ed after each flush: on Linux sled 0.34 "flushes" with
    /// `sync_file_range`, which neither writes metadata nor flushes the disk's write cache,
    /// so it survives a process crash but not necessarily a power cut.
    log_file: Option<std::fs::File>,
}

impl SledStorage {
    /// Opens (or creates) the sled database at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        Self::open_with(path, true)
    }

    /// Opens the database; `fdatasync: false` trusts sled's own flush alone (faster, safe
    /// against a process crash, not against power loss).
    pub fn open_with(path: &Path, fdatasync: bool) -> Result<Self, StorageError> {
        // sled's own background jobs may hold the previous handle's file lock for a moment
        // after it was dropped (a reopen in the same process): wait a bounded time for it.
        let mut attempts_left = LOCK_ATTEMPTS_MAX;
        let db = loop {
            let opened = sled::Config::new()
                .path(path)
                .segment_size(SEGMENT_BYTES)
                // Every commit flushes explicitly; a background flusher would only add fsyncs.
                .flush_every_ms(None)
                .open();
            match opened {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && attempts_left > 1 =>
                {
                    attempts_left -= 1;
                    std::thread::sleep(LOCK_RETRY_PAUSE);
                }
                other => break other?,
            }
        };
        let tree = db.open_tree(JOURNAL_TREE)?;
        let log_file = if fdatasync {
            let log_path = path.join("db");
            Some(std::fs::File::open(&log_path).map_err(|e| {
                StorageError::Backend(format!("cannot open {}: {e}", log_path.display()))
            })?)
        } else {
            None
        };
        Ok(Self {
            _db: db,
            tree,
            log_file,
        })
    }

    /// The key of record `seq`.
    pub fn record_key(seq: u64) -> [u8; 9] {
        let mut key = [RECORD_PREFIX; 9];
        key[1..].copy_from_slice(&seq.to_be_bytes());
        key
    }
}

impl Storage for SledStorage {
    fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        batch.insert(&Self::record_key(seq), record);
        batch.insert(HEAD_KEY, head);
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        if let Some(file) = &self.log_file {
            file.sync_data()
                .map_err(|e| StorageError::Backend(format!("fdatasync of the journal: {e}")))?;
        }
        Ok(())
    }

    fn head(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tree.get(HEAD_KEY)?.map(|v| v.to_vec()))
    }

    fn records(&self, from_seq: u64) -> Box<dyn Iterator<Item = StoredRecord> + Send> {
        let start = Self::record_key(from_seq).to_vec();
        let end = vec![RECORD_PREFIX + 1];
        Box::new(self.tree.range(start..end).map(|item| {
            let (key, value) = item?;
            let seq = key
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .filter(|_| key.len() == 9)
                .ok_or_else(|| StorageError::Backend(format!("malformed journal key {key:?}")))?;
            Ok((seq, value.to_vec()))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_read_back_in_order_with_head() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SledStorage::open(dir.path()).unwrap();
        assert!(storage.head().unwrap().is_none());
        for seq in [1u64, 2, 300] {
            storage.append(seq, &[seq as u8; 4], b"head").unwrap();
        }
        let got: Vec<u64> = storage.records(2).map(|r| r.unwrap().0).collect();
        assert_eq!(got, vec![2, 300]);
        assert_eq!(storage.head().unwrap().unwrap(), b"head");
    }
}
