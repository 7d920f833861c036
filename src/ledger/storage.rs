//! Where the journal lives. The ledger needs only this small trait, so another backend (e.g.
//! a PostgreSQL-compatible one) can be added without touching callers; sled is the embedded
//! default.
//!
//! sled layout: one tree, `journal`, holding
//! - `b"j" ++ seq (u64 big-endian)` -> where record `seq` is: a [`Location`] (file, offset,
//!   length) in the append-only journal files (`journal_files.rs`), or, for records written
//!   before those files existed, the whole record, and
//! - `b"k"` -> the head (seq and hash of the last record).
//!
//! An append writes the record to the end of the current journal file and fdatasyncs it,
//! then writes its location and the head by one atomic `apply_batch`, one `flush` and one
//! `fdatasync` of sled's log; then the head is copied to the file `mxpay-head` beside sled's
//! files (see `anchor`; a failure of that copy is logged, counted and retried on the next
//! batch, never returned: the batch is durable by then). Records live in files, not sled
//! values, because sled keeps in memory every value it wrote, whatever its cache size.
//! Nothing else is written per commit: balances and the recent transfers are rebuilt in
//! memory from the checkpoint and the journal on open. The rows of ended transfers, with
//! each account's list of them (its history), are written in bulk at checkpoints, as
//! segment files beside sled's (`segments.rs`; not sled keys: sled's memory grows with
//! every key), and read back when asked for.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::journal_files::{JournalFiles, Location, RecordReader, JOURNAL_DIR};

/// Why the storage failed (I/O, or the database could not be opened).
#[derive(Debug, Clone, thiserror::Error)]
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

/// The row of one transfer that has ended, written out of memory (see docs/ledger.md,
/// Memory): its index in journal order, its id, the two accounts it touches, and its bytes
/// (`State::put_row`). A row never changes once written: a transfer's row is written only
/// once it has ended, and what its refunds change is kept beside it. Borrowed from the
/// [`TransferRows`] that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferRow<'a> {
    /// The transfer's index in journal order (the n-th transfer created has index n - 1).
    pub idx: u32,
    /// The transfer's id.
    pub id: u128,
    /// The indexes (in opening order) of its debit and credit accounts: the row is listed in
    /// the history of each ([`Storage::account_history`]).
    pub accounts: [u32; 2],
    /// The encoded row.
    pub bytes: &'a [u8],
    /// The transfer's reference (0: none): the row is in the reference index under it
    /// ([`Storage::transfer_rows_by_reference`]).
    pub reference: u128,
}

/// Rows stored together ([`Storage::put_transfer_rows`]: a spill's), in the order they were
/// pushed: their bytes back to back in one buffer, and beside them each row's index, id,
/// accounts and where its bytes end. Two allocations however many rows: a `Vec` per row was
/// about 500,000 small allocations per spill, made and freed on the checkpoint thread, which
/// kept glibc's heap growing over the first millions of transfers (docs/ledger.md, Memory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferRows {
    bytes: Vec<u8>,
    heads: Vec<RowHead>,
    /// The rows that have a reference, by position, ascending: few rows have one, so it is
    /// not in every row's head.
    references: Vec<(usize, u128)>,
}

/// What a [`TransferRows`] keeps of a row beside its bytes. The id as bytes keeps the
/// entry at 40 bytes (a `u128` would align it to 48).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowHead {
    id_le: [u8; 16],
    end: u64,
    idx: u32,
    accounts: [u32; 2],
}

impl TransferRows {
    /// Room for `rows` rows of `bytes` bytes in all, allocated once.
    pub fn with_capacity(rows: usize, bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            heads: Vec::with_capacity(rows),
            references: Vec::new(),
        }
    }

    /// Adds the row of transfer `idx` (`id`, touching `accounts`, with `reference`, 0 for
    /// none), whose bytes `encode` appends to the buffer it is given (and does nothing else
    /// to it).
    pub fn push_with(
        &mut self,
        idx: u32,
        id: u128,
        accounts: [u32; 2],
        reference: u128,
        encode: impl FnOnce(&mut Vec<u8>),
    ) {
        if reference != 0 {
            self.references.push((self.heads.len(), reference));
        }
        encode(&mut self.bytes);
        self.heads.push(RowHead {
            id_le: id.to_le_bytes(),
            end: self.bytes.len() as u64,
            idx,
            accounts,
        });
    }

    /// Adds `row` (its bytes copied).
    pub fn push(&mut self, row: TransferRow<'_>) {
        self.push_with(row.idx, row.id, row.accounts, row.reference, |out| {
            out.extend_from_slice(row.bytes);
        });
    }

    /// How many rows it holds.
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// The bytes of every row, back to back in the order they were pushed.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The `i`-th row pushed.
    pub fn get(&self, i: usize) -> TransferRow<'_> {
        let head = &self.heads[i];
        let start = i.checked_sub(1).map_or(0, |before| self.heads[before].end);
        TransferRow {
            idx: head.idx,
            id: u128::from_le_bytes(head.id_le),
            accounts: head.accounts,
            bytes: &self.bytes[start as usize..head.end as usize],
            reference: self
                .references
                .binary_search_by_key(&i, |&(at, _)| at)
                .map_or(0, |found| self.references[found].1),
        }
    }

    /// The rows in the order they were pushed.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = TransferRow<'_>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl<'a> FromIterator<TransferRow<'a>> for TransferRows {
    fn from_iter<I: IntoIterator<Item = TransferRow<'a>>>(rows: I) -> Self {
        let mut all = Self::default();
        for row in rows {
            all.push(row);
        }
        all
    }
}

/// One entry of the stored rows, as [`Storage::scan_transfer_rows`] visits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowEntry<'a> {
    /// The row of transfer `idx`.
    Row { idx: u32, bytes: &'a [u8] },
    /// An id index entry: transfer `id` has index `idx`.
    Id { id: u128, idx: u32 },
    /// An account history entry: transfer `idx` touches account `account`.
    Listed { account: u32, idx: u32 },
    /// A reference index entry: transfer `idx` has reference `reference`.
    Referenced { reference: u128, idx: u32 },
}

/// Pieces in which the power-cut test storage issues a `put_transfer_rows` (each survives a
/// cut or not on its own), standing for a backend whose row writes are not atomic.
pub const ROWS_PER_BATCH_MAX: usize = 16_384;

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

    /// The head as last written to a place outside the primary store (`None` if the backend
    /// keeps none). It may lag the head after a power cut, never lead it; a journal that ends
    /// before it lost records the store itself did not notice.
    fn anchor(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(None)
    }

    /// How many times copying the head outside the primary store failed after a durable
    /// append (each is retried on the next append); 0 for a backend that keeps no copy.
    fn anchor_write_failures(&self) -> u64 {
        0
    }

    /// Whether this backend keeps checkpoints ([`Storage::put_checkpoint`]); without them
    /// every open replays the whole journal.
    fn keeps_checkpoints(&self) -> bool {
        false
    }

    /// Replaces the stored checkpoint (the state as of one record, see
    /// `state/checkpoint.rs`) by `bytes`, durably and atomically: a reader sees the old one
    /// or the new one whole, never a mix. Called only after the record it names is durable.
    fn put_checkpoint(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let _ = bytes;
        Ok(())
    }

    /// The last checkpoint stored, if any.
    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(None)
    }

    /// Whether this backend keeps transfer rows ([`Storage::put_transfer_rows`]); without
    /// them every transfer stays in memory.
    fn keeps_transfer_rows(&self) -> bool {
        false
    }

    /// Stores `rows`, their id index (id -> index) and their accounts' history lists (each
    /// row listed under both its accounts); returns once all of them are durable. The rows
    /// may come in any order of index (a spill's are ascending unless an earlier spill's
    /// write failed and is written with it); an index that comes twice is the same row.
    /// Called before the checkpoint that relies on them is written, so a checkpoint never
    /// names a row a power cut could take back. Not atomic: a failed call may have stored
    /// some rows, which is harmless (a row never changes, so writing it again writes the
    /// same bytes, and rows beyond the checkpoint are not read).
    fn put_transfer_rows(&self, rows: &TransferRows) -> Result<(), StorageError> {
        let _ = rows;
        Err(StorageError::Backend(
            "this ledger backend keeps no transfer rows".to_owned(),
        ))
    }

    /// The row of the transfer with index `idx`, if stored.
    fn transfer_row(&self, idx: u32) -> Result<Option<Vec<u8>>, StorageError> {
        let _ = idx;
        Ok(None)
    }

    /// The index of the transfer `id`, if its row is stored.
    fn transfer_row_idx(&self, id: u128) -> Result<Option<u32>, StorageError> {
        let _ = id;
        Ok(None)
    }

    /// The indexes of the stored rows listed in the history of `account` that are below
    /// `before`, newest (highest) first, each once, at most `limit`: a page of the account's
    /// history on disk, in work bounded by `limit` (and the number of stored pieces). An
    /// entry whose row was written again later may name a transfer that no longer touches
    /// the account (after records were lost): the caller checks the row. A backend that
    /// keeps rows must provide it (the default lists nothing: histories would miss every
    /// transfer on disk).
    fn account_history(
        &self,
        account: u32,
        before: u32,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        let _ = (account, before, limit);
        Ok(Vec::new())
    }

    /// The indexes of the stored rows listed in the history of `account` within `span`, in
    /// `order`, each once, at most `limit`: [`Storage::account_history`] with a lower bound
    /// and either direction, for history queries by time range (the ledger turns a time
    /// range into an index range: ledger time never goes backwards). Work bounded by
    /// `limit` and the number of stored pieces; a piece whose rows all lie outside `span`
    /// should not be read. The default answers newest first through
    /// [`Storage::account_history`] and refuses oldest first: a backend that keeps rows
    /// must provide it for oldest-first queries.
    fn account_history_range(
        &self,
        account: u32,
        span: std::ops::Range<u32>,
        order: crate::ledger::model::HistoryOrder,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        match order {
            crate::ledger::model::HistoryOrder::NewestFirst => {
                let mut page = self.account_history(account, span.end, limit)?;
                // Newest first: once one is below the span, all after it are.
                page.retain(|&idx| idx >= span.start);
                Ok(page)
            }
            crate::ledger::model::HistoryOrder::OldestFirst => Err(StorageError::Backend(
                "this ledger backend cannot read histories oldest first".to_owned(),
            )),
        }
    }

    /// The indexes of the stored rows whose reference is `reference` (not 0), lowest first,
    /// each once, at most `limit`, from an index (no scan): work bounded by `limit` and the
    /// number of stored pieces; a piece none of whose rows has it should not be read. An
    /// entry whose row was written again later may name a transfer with another reference
    /// (after records were lost): the caller checks the row. A backend that keeps rows must
    /// provide it (the default finds nothing: the transfers on disk would be missed).
    fn transfer_rows_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        let _ = (reference, limit);
        Ok(Vec::new())
    }

    /// The highest row index of each stored piece of rows (e.g. a segment), in any order,
    /// from memory (no read): history queries by time read those rows' times once and
    /// search one piece instead of all. The default lists none (the search then probes
    /// rows across all pieces: correct, only slower).
    fn transfer_row_piece_ends(&self) -> Result<Vec<u32>, StorageError> {
        Ok(Vec::new())
    }

    /// Visits every stored row, id index entry and history list entry, each stored piece
    /// read once and in order, oldest write first; within a piece its rows come before its
    /// history entries. An entry for an index or id already visited replaces it, as
    /// [`Storage::transfer_row`] and [`Storage::transfer_row_idx`] would answer, and the
    /// history entries of a row count from the last piece that wrote it. For `verify`, which
    /// checks every row against the replay in one pass instead of one lookup per transfer. A
    /// backend that keeps rows must provide it; it checks what it can on the way (the sled
    /// backend: each segment's own hash and tables).
    fn scan_transfer_rows(&self, visit: &mut dyn FnMut(RowEntry<'_>)) -> Result<(), StorageError> {
        let _ = visit;
        Ok(())
    }
}

const RECORD_PREFIX: u8 = b'j';
/// After every record key, so the head shares the newest leaf with the newest records
/// instead of adding an update (and rewrites) to the first leaf on every commit.
const HEAD_KEY: &[u8] = b"k";
/// The file beside sled's that holds a copy of the head.
pub const ANCHOR_FILE: &str = "mxpay-head";
/// The file beside sled's that holds the last checkpoint of the state. A file rather than
/// sled values: a checkpoint is one large value written rarely and read once, which sled
/// would split into pages it keeps in its cache, or write as a blob it never syncs.
pub const CHECKPOINT_FILE: &str = "mxpay-checkpoint";
/// Size of an encoded head (seq u64 + blake3 hash).
const ANCHOR_BYTES: usize = 8 + 32;
/// Name of the sled tree of the journal.
pub const JOURNAL_TREE: &str = "journal";
/// Largest journal record the writer aims for. sled keeps values inline in its tree pages
/// (up to 16 entries a leaf, rewritten whole every 10 updates) and writes any message above a
/// quarter of a segment to a separate blob file that it never syncs; records this small keep
/// even a full leaf of them far below that threshold.
pub const RECORD_BYTES_TARGET: usize = 128 * 1024;
/// Segment size of the sled log. Fixed for the life of a database (sled refuses another on
/// reopen); its quarter (4 MiB) is sled's blob threshold.
pub const SEGMENT_BYTES: usize = 16 * 1024 * 1024;

/// sled's page cache for the journal (its default is 1 GiB).
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The sled-backed journal store.
pub struct SledStorage {
    // Kept so the database lives as long as the tree.
    _db: sled::Db,
    tree: sled::Tree,
    /// The rows of ended transfers, in segment files of their own.
    rows: super::segments::Segments,
    /// The journal records' bytes (sled holds where they are). Locked for a whole append:
    /// only the writer appends.
    journal: Mutex<JournalFiles>,
    journal_dir: std::path::PathBuf,
    /// sled's log file, fdatasync'ed after each flush: on Linux sled 0.34 "flushes" with
    /// `sync_file_range`, which neither writes metadata nor flushes the disk's write cache,
    /// so it survives a process crash but not necessarily a power cut.
    log_file: Option<std::fs::File>,
    /// `ANCHOR_FILE`: the head again, outside sled. sled treats a damaged message in its log
    /// as the end of the log and silently drops everything after it, head included; this copy
    /// lets verify notice. Rewritten in place after each durable append, not synced itself
    /// (it may lag after a power cut, which verify accepts; it never leads).
    anchor: Mutex<Anchor>,
    anchor_path: std::path::PathBuf,
    /// Failed writes of the anchor (see [`Storage::anchor_write_failures`]).
    anchor_write_failures: AtomicU64,
}

/// The anchor file as the writer holds it.
struct Anchor {
    /// `None` if the file is missing from a journal that has records (found at open): it is
    /// then never recreated, so that verify keeps saying it is missing.
    file: Option<std::fs::File>,
    /// The last write failed: open the file again (recreating it if it is gone) before the
    /// next write, in case the handle itself is what broke.
    reopen: bool,
}

impl SledStorage {
    /// Positioned reads of each segment of rows so far, oldest first (tests show which
    /// segments a query read).
    #[cfg(test)]
    pub(crate) fn segment_reads(&self) -> Vec<u64> {
        self.rows.reads_per_segment()
    }

    /// Opens (or creates) the sled database at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        Self::open_with(path, true)
    }

    /// Opens the database; `fdatasync: false` trusts sled's own flush alone (faster, safe
    /// against a process crash, not against power loss).
    pub fn open_with(path: &Path, fdatasync: bool) -> Result<Self, StorageError> {
        let config = sled::Config::new()
            .path(path)
            .segment_size(SEGMENT_BYTES)
            // Every commit flushes explicitly; a background flusher would only add fsyncs.
            .flush_every_ms(None)
            // The journal is written at its end and read back rarely (open after the
            // checkpoint, the outbox's tail, verify): sled's default 1 GiB page cache would
            // only hold old records in memory as history grows.
            .cache_capacity(CACHE_BYTES);
        let db = crate::sled_open::open_waiting_for_lock(&config)?;
        let tree = db.open_tree(JOURNAL_TREE)?;
        let rows = super::segments::Segments::open(path)?;
        let (last_seq, last) = match tree.scan_prefix([RECORD_PREFIX]).next_back() {
            None => (0, None),
            Some(item) => {
                let (key, value) = item?;
                (Self::key_seq(&key)?, Location::decode(&value))
            }
        };
        let journal = JournalFiles::open(path, last_seq, last, fdatasync)?;
        let anchor_path = path.join(ANCHOR_FILE);
        let io = |what: &str, e: std::io::Error| {
            StorageError::Backend(format!("{what} {}: {e}", anchor_path.display()))
        };
        let anchor_file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&anchor_path)
        {
            Ok(file) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if tree.get(HEAD_KEY)?.is_none() {
                    // A new journal: the anchor starts at "nothing written" (seq 0).
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&anchor_path)
                        .map_err(|e| io("cannot create", e))?;
                    file.write_all_at(&[0u8; ANCHOR_BYTES], 0)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| io("cannot write", e))?;
                    std::fs::File::open(path)
                        .and_then(|dir| dir.sync_all())
                        .map_err(|e| io("cannot sync the directory of", e))?;
                    Some(file)
                } else {
                    None
                }
            }
            Err(e) => return Err(io("cannot open", e)),
        };
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
            rows,
            journal: Mutex::new(journal),
            journal_dir: path.join(JOURNAL_DIR),
            log_file,
            anchor: Mutex::new(Anchor {
                file: anchor_file,
                reopen: false,
            }),
            anchor_path,
            anchor_write_failures: AtomicU64::new(0),
        })
    }

    /// Copies `head` to the anchor file. Called once the record is durable, so a failure is
    /// not the batch's: it is logged and counted, and the next append tries again.
    fn write_anchor(&self, head: &[u8]) {
        let mut anchor = self.anchor.lock();
        if anchor.file.is_none() {
            return;
        }
        let written = (|| {
            if anchor.reopen {
                anchor.file = Some(self.reopen_anchor()?);
                anchor.reopen = false;
            }
            let file = anchor.file.as_ref().expect("checked above");
            file.write_all_at(head, 0)
        })();
        if let Err(error) = written {
            anchor.reopen = true;
            let failures = self.anchor_write_failures.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                path = %self.anchor_path.display(),
                %error,
                failures,
                "cannot write the ledger's head anchor; the batch is durable, the write is \
                 retried on the next batch (until then verify checks against an older head)"
            );
        }
    }

    /// Opens the anchor file again; one that is gone is created and synced, with its
    /// directory, so that a power cut cannot leave a journal without its anchor.
    fn reopen_anchor(&self) -> std::io::Result<std::fs::File> {
        let options = || {
            let mut options = std::fs::OpenOptions::new();
            options.read(true).write(true);
            options
        };
        match options().open(&self.anchor_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = options().create_new(true).open(&self.anchor_path)?;
                file.write_all_at(&[0u8; ANCHOR_BYTES], 0)?;
                file.sync_all()?;
                if let Some(dir) = self.anchor_path.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                Ok(file)
            }
            other => other,
        }
    }

    /// The key of record `seq`.
    pub fn record_key(seq: u64) -> [u8; 9] {
        let mut key = [RECORD_PREFIX; 9];
        key[1..].copy_from_slice(&seq.to_be_bytes());
        key
    }

    /// The seq in a record key.
    fn key_seq(key: &[u8]) -> Result<u64, StorageError> {
        key.get(1..9)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .filter(|_| key.len() == 9)
            .ok_or_else(|| StorageError::Backend(format!("malformed journal key {key:?}")))
    }

    /// Tests: journal files of at most `bytes` (before the record that goes beyond).
    #[cfg(test)]
    fn set_journal_file_bytes_max(&self, bytes: u64) {
        self.journal.lock().set_file_bytes_max(bytes);
    }
}

impl Storage for SledStorage {
    /// The record to its journal file (synced) first, then its location and the head to
    /// sled (synced): a location in sled always names bytes that are on disk.
    fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError> {
        let mut journal = self.journal.lock();
        let location = journal.write(seq, record)?;
        let indexed = (|| {
            let mut batch = sled::Batch::default();
            batch.insert(&Self::record_key(seq), &location.encode());
            batch.insert(HEAD_KEY, head);
            self.tree.apply_batch(batch)?;
            self.tree.flush()?;
            if let Some(file) = &self.log_file {
                file.sync_data().map_err(|e| {
                    StorageError::Backend(format!("fdatasync of the journal index: {e}"))
                })?;
            }
            Ok::<(), StorageError>(())
        })();
        match indexed {
            Ok(()) => journal.written(location),
            Err(e) => {
                journal.poison();
                return Err(e);
            }
        }
        drop(journal);
        self.write_anchor(head);
        Ok(())
    }

    fn anchor_write_failures(&self) -> u64 {
        self.anchor_write_failures.load(Ordering::Relaxed)
    }

    fn keeps_checkpoints(&self) -> bool {
        true
    }

    /// Written to `mxpay-checkpoint.tmp`, synced, renamed over `mxpay-checkpoint`, and the
    /// directory synced: a power cut leaves the old checkpoint or the new one.
    fn put_checkpoint(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let dir = self
            .anchor_path
            .parent()
            .expect("the anchor lives in the ledger's directory");
        let path = dir.join(CHECKPOINT_FILE);
        let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        let io = |what: &str, e: std::io::Error| {
            StorageError::Backend(format!("checkpoint: {what} {}: {e}", path.display()))
        };
        let mut file = std::fs::File::create(&tmp).map_err(|e| io("cannot create", e))?;
        std::io::Write::write_all(&mut file, bytes).map_err(|e| io("cannot write", e))?;
        file.sync_all().map_err(|e| io("cannot sync", e))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot rename to", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync the directory of", e))
    }

    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StorageError> {
        let dir = self
            .anchor_path
            .parent()
            .expect("the anchor lives in the ledger's directory");
        let path = dir.join(CHECKPOINT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::Backend(format!(
                "checkpoint: cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    fn keeps_transfer_rows(&self) -> bool {
        true
    }

    /// One segment file, written and synced (see `segments.rs`).
    fn put_transfer_rows(&self, rows: &TransferRows) -> Result<(), StorageError> {
        self.rows.put(rows)
    }

    fn account_history(
        &self,
        account: u32,
        before: u32,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.rows.history(account, before, limit)
    }

    fn account_history_range(
        &self,
        account: u32,
        span: std::ops::Range<u32>,
        order: crate::ledger::model::HistoryOrder,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.rows.history_range(account, span, order, limit)
    }

    fn transfer_row_piece_ends(&self) -> Result<Vec<u32>, StorageError> {
        Ok(self.rows.max_indexes())
    }

    fn transfer_rows_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.rows.by_reference(reference, limit)
    }

    fn transfer_row(&self, idx: u32) -> Result<Option<Vec<u8>>, StorageError> {
        self.rows.row(idx)
    }

    fn transfer_row_idx(&self, id: u128) -> Result<Option<u32>, StorageError> {
        self.rows.idx_of(id)
    }

    /// Each segment file read once, front to back, oldest first (see `segments.rs`).
    fn scan_transfer_rows(&self, visit: &mut dyn FnMut(RowEntry<'_>)) -> Result<(), StorageError> {
        self.rows.scan(visit)
    }

    fn anchor(&self) -> Result<Option<Vec<u8>>, StorageError> {
        let anchor = self.anchor.lock();
        let Some(file) = &anchor.file else {
            return Err(StorageError::Backend(format!(
                "the head anchor file {} is missing although the journal has records",
                self.anchor_path.display()
            )));
        };
        let mut bytes = vec![0u8; ANCHOR_BYTES];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| StorageError::Backend(format!("read of the head anchor: {e}")))?;
        Ok(Some(bytes))
    }

    fn head(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tree.get(HEAD_KEY)?.map(|v| v.to_vec()))
    }

    fn records(&self, from_seq: u64) -> Box<dyn Iterator<Item = StoredRecord> + Send> {
        let start = Self::record_key(from_seq).to_vec();
        let end = vec![RECORD_PREFIX + 1];
        let values = self.tree.range(start..end).map(|item| {
            let (key, value) = item?;
            Ok((Self::key_seq(&key)?, value.to_vec()))
        });
        Box::new(RecordReader {
            values,
            journal_dir: self.journal_dir.clone(),
            open: None,
        })
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

    fn row_bytes(idx: u32) -> Vec<u8> {
        vec![idx as u8; 1 + idx as usize % 40]
    }

    fn row(idx: u32, bytes: &[u8]) -> TransferRow<'_> {
        TransferRow {
            idx,
            id: 1_000 + u128::from(idx) * 7,
            accounts: [idx % 4, 4 + idx % 3],
            bytes,
            reference: 0,
        }
    }

    /// Issue 15 (memory flat in history): rows of ended transfers go to segment files, and
    /// are read back by index and by id after a reopen (a row written again: its newest
    /// copy), and each account's history lists by page; the journal is untouched.
    #[test]
    fn transfer_rows_read_back_by_index_and_id_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let count = ROWS_PER_BATCH_MAX as u32 + 10;
        {
            let storage = SledStorage::open(dir.path()).unwrap();
            assert!(storage.keeps_transfer_rows());
            storage.append(1, b"one", &[1; ANCHOR_BYTES]).unwrap();
            let bytes: Vec<Vec<u8>> = (0..count).map(row_bytes).collect();
            let rows: TransferRows = (0..count).map(|i| row(i, &bytes[i as usize])).collect();
            storage.put_transfer_rows(&rows).unwrap();
            // Written again (a checkpoint retried after a failure): the same bytes.
            storage
                .put_transfer_rows(&rows.iter().take(3).collect())
                .unwrap();
        }
        let storage = SledStorage::open(dir.path()).unwrap();
        for idx in [0, 1, ROWS_PER_BATCH_MAX as u32, count - 1] {
            let bytes = row_bytes(idx);
            let expected = row(idx, &bytes);
            assert_eq!(storage.transfer_row(idx).unwrap(), Some(bytes.clone()));
            assert_eq!(storage.transfer_row_idx(expected.id).unwrap(), Some(idx));
        }
        assert_eq!(storage.transfer_row(count).unwrap(), None);
        assert_eq!(storage.transfer_row_idx(1).unwrap(), None);
        let listed = |account: u32, before: u32| -> Vec<u32> {
            (0..before.min(count))
                .rev()
                .filter(|&i| row(i, &[]).accounts.contains(&account))
                .collect()
        };
        for (account, before, limit) in [(0, count, 5), (5, 40, 100), (2, 3, 10), (6, 0, 3)] {
            let mut expected = listed(account, before);
            expected.truncate(limit);
            let page = storage.account_history(account, before, limit).unwrap();
            assert_eq!(page, expected, "account {account} below {before}");
        }
        let journal: Vec<u64> = storage.records(1).map(|r| r.unwrap().0).collect();
        assert_eq!(journal, vec![1], "rows are not journal records");
        assert_eq!(storage.head().unwrap().unwrap(), [1; ANCHOR_BYTES]);
    }

    /// Issue 15: the anchor is written after the record is durable, so its failure never
    /// fails the append; it is counted and retried (reopening the file) on the next append.
    /// `/dev/full` fails every write with ENOSPC; then a directory stands in the file's place.
    #[test]
    fn a_failing_anchor_write_never_fails_a_durable_append() {
        let dir = tempfile::tempdir().unwrap();
        let anchor = dir.path().join(ANCHOR_FILE);
        std::os::unix::fs::symlink("/dev/full", &anchor).unwrap();
        let storage = SledStorage::open(dir.path()).unwrap();
        let head = |seq: u8| [seq; ANCHOR_BYTES];
        storage.append(1, b"one", &head(1)).unwrap();
        assert_eq!(storage.anchor_write_failures(), 1);
        std::fs::remove_file(&anchor).unwrap();
        std::fs::create_dir(&anchor).unwrap();
        storage.append(2, b"two", &head(2)).unwrap();
        assert_eq!(storage.anchor_write_failures(), 2);
        // Fixed: the next append recreates the file and the anchor catches up.
        std::fs::remove_dir(&anchor).unwrap();
        storage.append(3, b"three", &head(3)).unwrap();
        assert_eq!(storage.anchor_write_failures(), 2);
        assert_eq!(storage.anchor().unwrap().unwrap(), head(3));
        assert_eq!(std::fs::read(&anchor).unwrap(), head(3));
        let got: Vec<u64> = storage.records(1).map(|r| r.unwrap().0).collect();
        assert_eq!(got, vec![1, 2, 3], "every append is in the journal");
        storage.append(4, b"four", &head(4)).unwrap();
        assert_eq!(storage.anchor().unwrap().unwrap(), head(4));
        assert_eq!(storage.anchor_write_failures(), 2);
    }

    /// The bytes of record `seq` in these tests: distinct, of varying length.
    fn record(seq: u64) -> Vec<u8> {
        let mut bytes = seq.to_le_bytes().to_vec();
        bytes.resize(8 + (seq as usize * 37) % 90, seq as u8);
        bytes
    }

    fn all_records(storage: &SledStorage) -> Vec<(u64, Vec<u8>)> {
        storage.records(1).map(|r| r.unwrap()).collect()
    }

    fn journal_files(ledger_dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(ledger_dir.join(JOURNAL_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Issue 15 (memory flat in history): records' bytes go to journal files, sled keeps
    /// where they are; they read back in order after a reopen, across files, and appends go
    /// on after them.
    #[test]
    fn records_in_journal_files_read_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = SledStorage::open(dir.path()).unwrap();
            storage.set_journal_file_bytes_max(200);
            for seq in 1..=20 {
                storage.append(seq, &record(seq), &[seq as u8; 4]).unwrap();
            }
            let value = storage
                .tree
                .get(SledStorage::record_key(7))
                .unwrap()
                .unwrap();
            assert!(Location::decode(&value).is_some(), "sled holds a location");
        }
        let files = journal_files(dir.path());
        assert!(files.len() > 3, "files roll over: {files:?}");
        assert_eq!(files[0], "00000000000000000001.log");
        let storage = SledStorage::open(dir.path()).unwrap();
        let expected: Vec<(u64, Vec<u8>)> = (1..=20).map(|seq| (seq, record(seq))).collect();
        assert_eq!(all_records(&storage), expected);
        for seq in 21..=23 {
            storage.append(seq, &record(seq), &[seq as u8; 4]).unwrap();
        }
        let got: Vec<(u64, Vec<u8>)> = storage.records(19).map(|r| r.unwrap()).collect();
        let expected: Vec<(u64, Vec<u8>)> = (19..=23).map(|seq| (seq, record(seq))).collect();
        assert_eq!(got, expected);
        assert_eq!(storage.head().unwrap().unwrap(), [23; 4]);
        assert_eq!(
            journal_files(dir.path()),
            files,
            "appended to the last file"
        );
    }

    /// A crash after the journal file's write and before sled's: bytes after the last
    /// record sled names, and a whole file after the last one it names. Nothing reads them,
    /// opening changes nothing (verify writes nothing), and the first append cuts them off
    /// and writes where they were.
    #[test]
    fn an_unindexed_tail_of_the_journal_files_is_cut_off_at_the_first_append() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = SledStorage::open(dir.path()).unwrap();
            for seq in 1..=3 {
                storage.append(seq, &record(seq), &[seq as u8; 4]).unwrap();
            }
        }
        let journal = dir.path().join(JOURNAL_DIR);
        let file = journal.join("00000000000000000001.log");
        let whole = std::fs::metadata(&file).unwrap().len();
        let mut torn = std::fs::read(&file).unwrap();
        torn.extend_from_slice(&[0xAB; 300]);
        std::fs::write(&file, &torn).unwrap();
        let stale = journal.join("00000000000000000004.log");
        std::fs::write(&stale, [0xCD; 50]).unwrap();

        let storage = SledStorage::open(dir.path()).unwrap();
        let expected: Vec<(u64, Vec<u8>)> = (1..=3).map(|seq| (seq, record(seq))).collect();
        assert_eq!(all_records(&storage), expected);
        assert_eq!(std::fs::read(&file).unwrap(), torn, "open writes nothing");
        assert!(stale.exists());

        storage.append(4, &record(4), &[4; 4]).unwrap();
        assert!(!stale.exists(), "the file no record names is removed");
        let len = std::fs::metadata(&file).unwrap().len();
        assert_eq!(
            len,
            whole + record(4).len() as u64,
            "record 4 where the torn bytes were"
        );
        drop(storage);
        let storage = SledStorage::open(dir.path()).unwrap();
        let expected: Vec<(u64, Vec<u8>)> = (1..=4).map(|seq| (seq, record(seq))).collect();
        assert_eq!(all_records(&storage), expected);
    }

    /// A journal file shorter than what sled names (records lost from it): the append
    /// fails rather than write after a hole, and keeps failing.
    #[test]
    fn an_append_after_a_journal_file_lost_its_end_fails() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = SledStorage::open(dir.path()).unwrap();
            for seq in 1..=3 {
                storage.append(seq, &record(seq), &[seq as u8; 4]).unwrap();
            }
        }
        let file = dir
            .path()
            .join(JOURNAL_DIR)
            .join("00000000000000000001.log");
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let storage = SledStorage::open(dir.path()).unwrap();
        let error = storage.append(4, &record(4), &[4; 4]).unwrap_err();
        assert!(error.to_string().contains("records were lost"), "{error}");
        assert!(storage.append(4, &record(4), &[4; 4]).is_err());
        assert_eq!(std::fs::metadata(&file).unwrap().len(), len - 5);
        assert_eq!(storage.head().unwrap().unwrap(), [3; 4]);
    }

    /// The sled value of a record is a location, 21 bytes; its format is pinned (a change
    /// would make older ledgers unreadable).
    #[test]
    fn location_format_is_stable() {
        let location = Location {
            file_seq: 0x0102,
            offset: 0x0304,
            len: 0x0506,
        };
        let bytes = location.encode();
        assert_eq!(
            bytes,
            [0xF1, 2, 1, 0, 0, 0, 0, 0, 0, 4, 3, 0, 0, 0, 0, 0, 0, 6, 5, 0, 0]
        );
        assert_eq!(Location::decode(&bytes), Some(location));
        // A record stored whole starts with its version, 1.
        assert_eq!(
            Location::decode(&[1u8; super::super::journal_files::LOCATION_BYTES]),
            None
        );
        assert_eq!(Location::decode(&bytes[..20]), None);
    }

    mod with_a_ledger {
        use super::*;
        use crate::clock::ManualClock;
        use crate::ledger::{
            verify_dir, CurrencySpec, Ledger, LedgerError, LedgerSettings, Owner, TransferId,
            TransferRequest,
        };
        use std::sync::Arc;

        fn settings() -> LedgerSettings {
            LedgerSettings {
                currencies: vec![CurrencySpec {
                    code: "EUR".to_owned(),
                    exponent: 2,
                    max_transfer: None,
                    max_per_24h: None,
                }],
            }
        }

        /// Record 1 defines EUR, then one record per transfer, ids `ids`.
        fn transfers(data_dir: &Path, ids: std::ops::Range<u128>) {
            let ledger = Ledger::open(data_dir, &settings(), Arc::new(ManualClock::new(1_000)))
                .unwrap()
                .blocking();
            let amount = ledger.ledger().amount_from_minor(500, "EUR").unwrap();
            for id in ids {
                ledger
                    .create_transfer(TransferRequest {
                        reference: 0,
                        id: TransferId(id),
                        debit: Owner::Issuer,
                        credit: Owner::user(format!("user{}", id % 3)),
                        amount,
                        memo: vec![],
                    })
                    .unwrap();
            }
            crate::ledger::block_on(ledger.ledger().verify_with_memory()).unwrap();
        }

        /// A ledger written before the journal files existed (every record a sled value)
        /// opens, reads and verifies; new records go to files after them, and the chain is
        /// checked across both.
        #[test]
        fn a_ledger_of_records_in_sled_values_reads_verifies_and_appends() {
            let dir = tempfile::tempdir().unwrap();
            transfers(dir.path(), 1..6);
            let ledger_dir = dir.path().join("ledger");
            // Back to the older layout: each record whole under its key, no journal files.
            let old: Vec<(u64, Vec<u8>)> = {
                let storage = SledStorage::open(&ledger_dir).unwrap();
                all_records(&storage)
            };
            assert_eq!(old.len(), 6);
            {
                let db = sled::Config::new()
                    .path(&ledger_dir)
                    .segment_size(SEGMENT_BYTES)
                    .open()
                    .unwrap();
                let tree = db.open_tree(JOURNAL_TREE).unwrap();
                for (seq, bytes) in &old {
                    tree.insert(SledStorage::record_key(*seq), bytes.as_slice())
                        .unwrap();
                }
                tree.flush().unwrap();
            }
            std::fs::remove_dir_all(ledger_dir.join(JOURNAL_DIR)).unwrap();
            assert_eq!(verify_dir(dir.path()).unwrap().records, 6);

            transfers(dir.path(), 6..9);
            let report = verify_dir(dir.path()).unwrap();
            assert_eq!((report.records, report.transfers), (9, 8));
            let storage = SledStorage::open(&ledger_dir).unwrap();
            let records = all_records(&storage);
            assert_eq!(records[..6], old[..], "the old records read as they were");
            let value = |seq| {
                storage
                    .tree
                    .get(SledStorage::record_key(seq))
                    .unwrap()
                    .unwrap()
            };
            assert_eq!(
                &value(6)[..],
                &old[5].1[..],
                "record 6 is still a sled value"
            );
            assert!(
                Location::decode(&value(7)).is_some(),
                "record 7 is in a file"
            );
            assert_eq!(journal_files(&ledger_dir), ["00000000000000000007.log"]);
            drop(storage);
            // Without the checkpoint, open replays both kinds from record 1.
            std::fs::remove_file(ledger_dir.join(CHECKPOINT_FILE)).unwrap();
            transfers(dir.path(), 9..10);
            assert_eq!(verify_dir(dir.path()).unwrap().records, 10);
        }

        /// A flipped byte anywhere in a journal file is caught by verify (the record's hash,
        /// or its seq), which names the record holding the byte; open refuses it too.
        #[test]
        fn a_flipped_byte_in_a_journal_file_is_caught_by_verify() {
            let dir = tempfile::tempdir().unwrap();
            transfers(dir.path(), 1..4);
            let ledger_dir = dir.path().join("ledger");
            let locations: Vec<(u64, Location)> = {
                let db = sled::Config::new()
                    .path(&ledger_dir)
                    .segment_size(SEGMENT_BYTES)
                    .open()
                    .unwrap();
                let tree = db.open_tree(JOURNAL_TREE).unwrap();
                (1..=4)
                    .map(|seq| {
                        let value = tree.get(SledStorage::record_key(seq)).unwrap().unwrap();
                        (seq, Location::decode(&value).unwrap())
                    })
                    .collect()
            };
            let file = ledger_dir
                .join(JOURNAL_DIR)
                .join("00000000000000000001.log");
            let pristine = std::fs::read(&file).unwrap();
            let checkpoint = std::fs::read(ledger_dir.join(CHECKPOINT_FILE)).unwrap();
            for offset in (0..pristine.len()).step_by(7) {
                let seq = locations
                    .iter()
                    .find(|(_, l)| {
                        (l.offset..l.offset + u64::from(l.len)).contains(&(offset as u64))
                    })
                    .map(|(seq, _)| *seq)
                    .expect("every byte of the file is a record's");
                let mut bytes = pristine.clone();
                bytes[offset] ^= 0x10;
                std::fs::write(&file, &bytes).unwrap();
                let error = verify_dir(dir.path()).unwrap_err();
                assert!(
                    matches!(error, LedgerError::Corrupt { record, .. } if record == seq),
                    "byte {offset} of record {seq}: {error}"
                );
                // Open replays from the checkpoint (record 4), and reads record 4 again.
                std::fs::remove_file(ledger_dir.join(CHECKPOINT_FILE)).unwrap();
                let open = Ledger::open(dir.path(), &settings(), Arc::new(ManualClock::new(1_000)));
                assert!(
                    matches!(open, Err(LedgerError::Corrupt { .. })),
                    "byte {offset}"
                );
                std::fs::write(ledger_dir.join(CHECKPOINT_FILE), &checkpoint).unwrap();
            }
            std::fs::write(&file, &pristine).unwrap();
            assert_eq!(verify_dir(dir.path()).unwrap().records, 4);
        }
    }
}
