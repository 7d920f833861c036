//! Transfer rows on disk for the sled backend: one immutable *segment* file per spill, in
//! `<ledger dir>/rows/`, because sled's memory grows with every key it is given (a probe: about
//! 450 B per key in pieces of 512, 8 KiB per key in pieces of 16,384, never given back), while
//! rows are written once, in bulk, and never change: a sorted file fits them.
//!
//! Segment format (integers little-endian):
//! ```text
//! "mxpay-rs" | version u8 = 3 | count u32 | accounts u32 | refs u32 |
//! count x (idx u32, offset u64)   sorted by idx (offset into the rows)
//! count x (id u128, idx u32)      sorted by id
//! rows (concatenated, in idx order)
//! accounts x (account u32, start u32, len u32)   sorted by account: where its list is
//! 2 x count x idx u32             each account's list of the rows touching it, ascending,
//!                                 in the directory's order (each row is in two lists)
//! refs x (reference u128, idx u32) the rows with a reference, sorted (the reference index)
//! blake3 [32] of everything before
//! ```
//! Version 1 (before the history lists) has no `accounts` field and no lists; its rows are
//! still read. Version 2 (before references) has no `refs` field and no reference index. A segment is written as `seg-<n>.tmp`, synced, renamed to `seg-<n>` (n counts
//! up), and the directory synced: a power cut leaves it whole (rows and lists) or absent.
//! Lookups binary-search the tables with positioned reads, newest segment first (a row
//! written again, e.g. once a pending transfer ended, is found in its newest segment); a
//! history page binary-searches each segment's directory and the account's list, and reads
//! at most a page of it. In memory: one handle and a few numbers per segment. `verify` reads
//! each segment once, front to back ([`Segments::scan`]), and checks its hash and tables on
//! the way.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;

use super::model::HistoryOrder;
use super::state::HashMap;
use super::storage::{RowEntry, StorageError, TransferRow, TransferRows};

const MAGIC: &[u8; 8] = b"mxpay-rs";
/// 3: the reference index, (reference, idx) of the rows with a reference, after the
/// lists (issue 15: history by reference).
const VERSION: u8 = 3;
/// 2: each account's list of the rows touching it (issue 15: histories on disk); no
/// reference index (written before references existed: their rows have none).
const VERSION_LISTS: u8 = 2;
/// Segments written before the history lists: rows and id index only.
const VERSION_ROWS_ONLY: u8 = 1;
/// magic, version, count (every version); version 2 adds the account count, version 3 the
/// reference count.
const HEADER_V1: u64 = 8 + 1 + 4;
const HEADER_V2: u64 = HEADER_V1 + 4;
const HEADER: u64 = HEADER_V2 + 4;
/// An entry of the reference index: reference u128, idx u32.
const REF_ENTRY: u64 = 16 + 4;
const IDX_ENTRY: u64 = 4 + 8;
const ID_ENTRY: u64 = 16 + 4;
/// An account's entry in a segment's history directory: account, start, len.
const DIR_ENTRY: u64 = 4 + 4 + 4;
/// One entry of a history list: a transfer index.
const LIST_ENTRY: u64 = 4;
/// The directory of the segments, inside the ledger's.
pub const ROWS_DIR: &str = "rows";

struct Segment {
    file: File,
    /// Where the tables start (after the header).
    tables: u64,
    count: u64,
    rows_start: u64,
    rows_end: u64,
    min_idx: u32,
    max_idx: u32,
    /// Accounts in the history directory (0 for a version 1 segment: no lists).
    accounts: u64,
    /// Where the directory starts (= `rows_end`), and the lists after it.
    lists_start: u64,
    /// Entries of the reference index (0 before version 3), where it starts, and the
    /// lowest and highest reference in it (so a reference outside them reads nothing).
    refs: u64,
    refs_start: u64,
    min_ref: u128,
    max_ref: u128,
    /// Positioned reads of this segment since it was opened (see
    /// [`Segments::reads_per_segment`]).
    reads: std::sync::atomic::AtomicU64,
}

/// The layout a segment's header announces, checked against its length.
struct Layout {
    tables: u64,
    count: u64,
    accounts: u64,
    refs: u64,
    rows_start: u64,
    rows_end: u64,
}

impl Layout {
    /// From the first [`HEADER`] bytes (or [`HEADER_V1`] for version 1) of a file of `len`
    /// bytes; `None` if they are not a segment's or do not fit the length.
    fn of(header: &[u8], len: u64) -> Option<Self> {
        if header.len() < HEADER_V1 as usize || &header[..8] != MAGIC {
            return None;
        }
        let count = u64::from(u32::from_le_bytes(header[9..13].try_into().expect("4")));
        let u32_at = |at: usize| -> Option<u64> {
            Some(u64::from(u32::from_le_bytes(
                header.get(at..at + 4)?.try_into().expect("4"),
            )))
        };
        let (tables, accounts, refs) = match header[8] {
            VERSION_ROWS_ONLY => (HEADER_V1, 0, 0),
            VERSION_LISTS => (HEADER_V2, u32_at(13)?, 0),
            VERSION => (HEADER, u32_at(13)?, u32_at(17)?),
            _ => return None,
        };
        let lists = if header[8] == VERSION_ROWS_ONLY {
            0
        } else {
            accounts * DIR_ENTRY + 2 * count * LIST_ENTRY + refs * REF_ENTRY
        };
        let rows_start = tables + count * (IDX_ENTRY + ID_ENTRY);
        if count == 0 || rows_start + lists + 32 > len {
            return None;
        }
        Some(Self {
            tables,
            count,
            accounts,
            refs,
            rows_start,
            rows_end: len - 32 - lists,
        })
    }
}

/// The segments of one ledger, newest last.
pub(crate) struct Segments {
    dir: PathBuf,
    segments: RwLock<Vec<(u64, Segment)>>,
    /// Held by [`Segments::put`] while it writes and syncs a segment, so that two writes
    /// never take the same number; `segments` itself is write-locked only to add the
    /// segment once it is durable. Holding that lock through the write and its syncs made
    /// every row and history read wait for them: 300 ms and more of a batch call's latency
    /// in `mxpay bench ledger` whenever an id filter let a new id through during a spill.
    writing: parking_lot::Mutex<()>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Backend(format!("transfer rows: {what} {}: {e}", path.display()))
}

/// How long the header of a segment of `version` is.
fn header_len(version: u8) -> u64 {
    match version {
        VERSION => HEADER,
        VERSION_LISTS => HEADER_V2,
        _ => HEADER_V1,
    }
}

fn read_at(file: &File, pos: u64, len: usize) -> Result<Vec<u8>, StorageError> {
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, pos)
        .map_err(|e| StorageError::Backend(format!("transfer rows: read: {e}")))?;
    Ok(bytes)
}

impl Segment {
    fn open(path: &Path) -> Result<Self, StorageError> {
        let file = File::open(path).map_err(|e| io("cannot open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io("cannot stat", path, e))?
            .len();
        let header = read_at(&file, 0, HEADER_V1 as usize)?;
        let header = match header_len(header[8]) {
            HEADER_V1 => header,
            len => read_at(&file, 0, len as usize)?,
        };
        let layout = Layout::of(&header, len).ok_or_else(|| {
            io(
                "not a whole segment:",
                path,
                std::io::ErrorKind::InvalidData.into(),
            )
        })?;
        let mut segment = Self {
            file,
            tables: layout.tables,
            count: layout.count,
            rows_start: layout.rows_start,
            rows_end: layout.rows_end,
            min_idx: 0,
            max_idx: 0,
            accounts: layout.accounts,
            lists_start: layout.rows_end,
            refs: layout.refs,
            refs_start: layout.rows_end
                + layout.accounts * DIR_ENTRY
                + 2 * layout.count * LIST_ENTRY,
            min_ref: 0,
            max_ref: 0,
            reads: std::sync::atomic::AtomicU64::new(0),
        };
        segment.min_idx = segment.idx_entry(0)?.0;
        segment.max_idx = segment.idx_entry(layout.count - 1)?.0;
        if segment.refs > 0 {
            segment.min_ref = segment.ref_entry(0)?.0;
            segment.max_ref = segment.ref_entry(segment.refs - 1)?.0;
        }
        Ok(segment)
    }

    /// A positioned read of this segment, counted.
    fn read(&self, pos: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        read_at(&self.file, pos, len)
    }

    fn idx_entry(&self, i: u64) -> Result<(u32, u64), StorageError> {
        let b = self.read(self.tables + i * IDX_ENTRY, IDX_ENTRY as usize)?;
        Ok((
            u32::from_le_bytes(b[..4].try_into().expect("4")),
            u64::from_le_bytes(b[4..].try_into().expect("8")),
        ))
    }

    fn ref_entry(&self, i: u64) -> Result<(u128, u32), StorageError> {
        let b = self.read(self.refs_start + i * REF_ENTRY, REF_ENTRY as usize)?;
        Ok((
            u128::from_le_bytes(b[..16].try_into().expect("16")),
            u32::from_le_bytes(b[16..].try_into().expect("4")),
        ))
    }

    /// Up to `limit` indexes of this segment's rows with `reference`, lowest first: nothing
    /// read when it is outside the segment's lowest and highest reference, else a binary
    /// search of the reference index and one read of at most `limit` entries.
    fn by_reference(&self, reference: u128, limit: usize) -> Result<Vec<u32>, StorageError> {
        if self.refs == 0 || limit == 0 || reference < self.min_ref || reference > self.max_ref {
            return Ok(Vec::new());
        }
        let (mut lo, mut hi) = (0, self.refs);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.ref_entry(mid)?.0 < reference {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let take = (self.refs - lo).min(limit as u64);
        let bytes = self.read(
            self.refs_start + lo * REF_ENTRY,
            usize::try_from(take * REF_ENTRY).expect("a page fits in memory"),
        )?;
        Ok(bytes
            .chunks_exact(REF_ENTRY as usize)
            .map(|b| {
                (
                    u128::from_le_bytes(b[..16].try_into().expect("16")),
                    u32::from_le_bytes(b[16..].try_into().expect("4")),
                )
            })
            .take_while(|&(at, _)| at == reference)
            .map(|(_, idx)| idx)
            .collect())
    }

    fn id_entry(&self, i: u64) -> Result<(u128, u32), StorageError> {
        let at = self.tables + self.count * IDX_ENTRY + i * ID_ENTRY;
        let b = self.read(at, ID_ENTRY as usize)?;
        Ok((
            u128::from_le_bytes(b[..16].try_into().expect("16")),
            u32::from_le_bytes(b[16..].try_into().expect("4")),
        ))
    }

    fn row(&self, idx: u32) -> Result<Option<Vec<u8>>, StorageError> {
        if idx < self.min_idx || idx > self.max_idx {
            return Ok(None);
        }
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (at, offset) = self.idx_entry(mid)?;
            if at == idx {
                let end = if mid + 1 < self.count {
                    self.idx_entry(mid + 1)?.1
                } else {
                    self.rows_end - self.rows_start
                };
                if offset > end || self.rows_start + end > self.rows_end {
                    return Err(StorageError::Backend(format!(
                        "transfer rows: segment offsets of row {idx} out of range"
                    )));
                }
                let len = usize::try_from(end - offset).expect("a row fits in memory");
                return self.read(self.rows_start + offset, len).map(Some);
            }
            if at < idx {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(None)
    }

    fn idx_of(&self, id: u128) -> Result<Option<u32>, StorageError> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (at, idx) = self.id_entry(mid)?;
            if at == id {
                return Ok(Some(idx));
            }
            if at < id {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(None)
    }
}

impl Segment {
    fn u32_at(&self, pos: u64) -> Result<u32, StorageError> {
        let b = self.read(pos, 4)?;
        Ok(u32::from_le_bytes(b[..].try_into().expect("4")))
    }

    /// Where the history list of `account` is in this segment (first entry, length), if it
    /// has one: a binary search of the directory.
    fn list_of(&self, account: u32) -> Result<Option<(u64, u64)>, StorageError> {
        let (mut lo, mut hi) = (0, self.accounts);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let b = self.read(self.lists_start + mid * DIR_ENTRY, DIR_ENTRY as usize)?;
            let at = u32::from_le_bytes(b[..4].try_into().expect("4"));
            if at == account {
                let start = u64::from(u32::from_le_bytes(b[4..8].try_into().expect("4")));
                let len = u64::from(u32::from_le_bytes(b[8..].try_into().expect("4")));
                if start + len > 2 * self.count {
                    return Err(StorageError::Backend(format!(
                        "transfer rows: the history list of account {account} is out of range"
                    )));
                }
                return Ok(Some((start, len)));
            }
            if at < account {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(None)
    }

    /// Up to `limit` entries of the history list of `account` in `from..before`, newest
    /// first or oldest first: two binary searches of the list (none for a bound the
    /// segment's rows are all on one side of), then one read of at most `limit` entries. A
    /// segment whose rows all lie outside `from..before` is not read at all.
    fn history(
        &self,
        account: u32,
        span: std::ops::Range<u32>,
        order: HistoryOrder,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        let std::ops::Range {
            start: from,
            end: before,
        } = span;
        if self.accounts == 0
            || limit == 0
            || from >= before
            || self.min_idx >= before
            || self.max_idx < from
        {
            return Ok(Vec::new());
        }
        let Some((start, len)) = self.list_of(account)? else {
            return Ok(Vec::new());
        };
        let entries = self.lists_start + self.accounts * DIR_ENTRY;
        let at = |i: u64| entries + (start + i) * LIST_ENTRY;
        // How many entries are below `bound` (the list is ascending).
        let below = |bound: u32| -> Result<u64, StorageError> {
            if self.max_idx < bound {
                return Ok(len);
            }
            if self.min_idx >= bound {
                return Ok(0);
            }
            let (mut lo, mut hi) = (0, len);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if self.u32_at(at(mid))? < bound {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            Ok(lo)
        };
        let (first, end) = (below(from)?, below(before)?);
        let take = (end - first.min(end)).min(limit as u64);
        let read_from = match order {
            HistoryOrder::NewestFirst => end - take,
            HistoryOrder::OldestFirst => first,
        };
        let bytes = self.read(
            at(read_from),
            usize::try_from(take * LIST_ENTRY).expect("a page fits in memory"),
        )?;
        let listed = bytes
            .chunks_exact(LIST_ENTRY as usize)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")));
        Ok(match order {
            HistoryOrder::NewestFirst => listed.rev().collect(),
            HistoryOrder::OldestFirst => listed.collect(),
        })
    }
}

/// Reads a segment front to back, hashing what it reads.
struct HashingReader {
    file: std::io::BufReader<File>,
    hasher: blake3::Hasher,
}

impl HashingReader {
    fn fill(&mut self, path: &Path, bytes: &mut [u8]) -> Result<(), StorageError> {
        std::io::Read::read_exact(&mut self.file, bytes).map_err(|e| io("cannot read", path, e))?;
        self.hasher.update(bytes);
        Ok(())
    }
}

/// Writes a segment to its file as it is laid out, hashing it on the way, through a buffer
/// of its own: the segment is never assembled in memory (it is as large as its rows, tens
/// of MiB per spill), and the hasher is fed large pieces, not a field at a time.
struct HashingWriter {
    file: File,
    hasher: blake3::Hasher,
    buffer: Vec<u8>,
}

/// The buffer of a [`HashingWriter`].
const WRITE_BUFFER_BYTES: usize = 256 << 10;

impl HashingWriter {
    fn new(file: File) -> Self {
        Self {
            file,
            hasher: blake3::Hasher::new(),
            buffer: Vec::with_capacity(WRITE_BUFFER_BYTES),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.buffer.len() + bytes.len() > WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        if bytes.len() >= WRITE_BUFFER_BYTES {
            self.hasher.update(bytes);
            return std::io::Write::write_all(&mut self.file, bytes);
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.hasher.update(&self.buffer);
        std::io::Write::write_all(&mut self.file, &self.buffer)?;
        self.buffer.clear();
        Ok(())
    }

    /// Writes what is buffered, then the hash of everything written; returns the file.
    fn finish(mut self) -> std::io::Result<File> {
        self.flush()?;
        let hash = *self.hasher.finalize().as_bytes();
        std::io::Write::write_all(&mut self.file, &hash)?;
        Ok(self.file)
    }
}

/// Writes the segment of `rows` (see the module docs), all but its hash, to `out`: each
/// index once, in index order. What it allocates besides the rows it is given: the id
/// table to sort (32 B a row, freed once written), each account's count, and the lists
/// (8 B a row); for rows not given in index order, their order (4 B a row).
fn write_segment(
    out: &mut HashingWriter,
    rows: &TransferRows,
    path: &Path,
) -> Result<(), StorageError> {
    let write = |e| io("cannot write", path, e);
    let ascending = (1..rows.len()).all(|i| rows.get(i - 1).idx < rows.get(i).idx);
    // A spill's rows come in index order; those of a failed spill written with the next
    // one's do not. Sorted stably, the first of an index given twice is kept (the same row).
    let order: Option<Vec<u32>> = (!ascending).then(|| {
        let mut order: Vec<u32> = (0..rows.len() as u32).collect();
        order.sort_by_key(|&i| rows.get(i as usize).idx);
        order.dedup_by_key(|i| rows.get(*i as usize).idx);
        order
    });
    let count = order.as_ref().map_or(rows.len(), Vec::len);
    let row = |i: usize| rows.get(order.as_ref().map_or(i, |order| order[i] as usize));
    let count_u32 = u32::try_from(count)
        .map_err(|_| StorageError::Backend("too many rows in one segment".into()))?;
    // Each account's list is counted first (the header gives the number of accounts), and
    // filled after the rows are written, in index order, so each comes out ascending.
    let mut cursors: HashMap<u32, u32> = HashMap::default();
    for i in 0..count {
        let r = row(i);
        assert_ne!(
            r.accounts[0], r.accounts[1],
            "a transfer touches two accounts"
        );
        for account in r.accounts {
            *cursors.entry(account).or_default() += 1;
        }
    }
    let mut directory: Vec<(u32, u32, u32)> = cursors.iter().map(|(&a, &n)| (a, 0, n)).collect();
    directory.sort_unstable();
    let mut start = 0;
    for (account, at, n) in &mut directory {
        *at = start;
        cursors.insert(*account, start);
        start += *n;
    }
    let references = reference_index((0..count).map(row));
    let references_u32 = u32::try_from(references.len())
        .map_err(|_| StorageError::Backend("too many references in one segment".into()))?;
    out.put(MAGIC).map_err(write)?;
    out.put(&[VERSION]).map_err(write)?;
    out.put(&count_u32.to_le_bytes()).map_err(write)?;
    out.put(&(directory.len() as u32).to_le_bytes())
        .map_err(write)?;
    out.put(&references_u32.to_le_bytes()).map_err(write)?;
    let mut offset = 0u64;
    for i in 0..count {
        let r = row(i);
        out.put(&r.idx.to_le_bytes()).map_err(write)?;
        out.put(&offset.to_le_bytes()).map_err(write)?;
        offset += r.bytes.len() as u64;
    }
    let mut by_id: Vec<(u128, u32)> = (0..count)
        .map(|i| {
            let r = row(i);
            (r.id, r.idx)
        })
        .collect();
    by_id.sort_unstable();
    for (id, idx) in &by_id {
        out.put(&id.to_le_bytes()).map_err(write)?;
        out.put(&idx.to_le_bytes()).map_err(write)?;
    }
    drop(by_id);
    if order.is_none() {
        out.put(rows.bytes()).map_err(write)?;
    } else {
        for i in 0..count {
            out.put(row(i).bytes).map_err(write)?;
        }
    }
    for (account, at, n) in directory {
        out.put(&account.to_le_bytes()).map_err(write)?;
        out.put(&at.to_le_bytes()).map_err(write)?;
        out.put(&n.to_le_bytes()).map_err(write)?;
    }
    let mut lists = vec![0u32; 2 * count];
    for i in 0..count {
        let r = row(i);
        for account in r.accounts {
            let cursor = cursors.get_mut(&account).expect("counted above");
            lists[*cursor as usize] = r.idx;
            *cursor += 1;
        }
    }
    for idx in lists {
        out.put(&idx.to_le_bytes()).map_err(write)?;
    }
    for (reference, idx) in &references {
        out.put(&reference.to_le_bytes()).map_err(write)?;
        out.put(&idx.to_le_bytes()).map_err(write)?;
    }
    Ok(())
}

/// The reference index of a segment's rows: (reference, idx) of each row with a
/// reference, sorted.
fn reference_index<'a>(rows: impl Iterator<Item = TransferRow<'a>>) -> Vec<(u128, u32)> {
    let mut references: Vec<(u128, u32)> = rows
        .filter(|r| r.reference != 0)
        .map(|r| (r.reference, r.idx))
        .collect();
    references.sort_unstable();
    references
}

/// Buffer of a segment scan: large reads, one segment at a time.
const SCAN_BUFFER_BYTES: usize = 1 << 20;

/// Visits the id entries, then the rows, then the history lists of the segment at `path`,
/// reading it once in order; fails if its tables are out of order or its hash does not match
/// (after visiting).
fn scan_segment(path: &Path, visit: &mut dyn FnMut(RowEntry<'_>)) -> Result<(), StorageError> {
    let invalid = |what: &str| {
        io(
            &format!("{what}:"),
            path,
            std::io::ErrorKind::InvalidData.into(),
        )
    };
    let file = File::open(path).map_err(|e| io("cannot open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| io("cannot stat", path, e))?
        .len();
    let mut r = HashingReader {
        file: std::io::BufReader::with_capacity(SCAN_BUFFER_BYTES, file),
        hasher: blake3::Hasher::new(),
    };
    let mut header = vec![0u8; HEADER_V1 as usize];
    r.fill(path, &mut header)?;
    let mut rest = vec![0u8; (header_len(header[8]) - HEADER_V1) as usize];
    r.fill(path, &mut rest)?;
    header.extend_from_slice(&rest);
    let layout = Layout::of(&header, len).ok_or_else(|| invalid("not a whole segment"))?;
    let count = layout.count;
    let rows_len = layout.rows_end - layout.rows_start;
    // The index table is needed for the rows' lengths, which come after the id table, and
    // to check that the history lists name rows of this segment.
    let mut by_idx: Vec<(u32, u64)> = Vec::with_capacity(count as usize);
    let mut entry = [0u8; IDX_ENTRY as usize];
    for _ in 0..count {
        r.fill(path, &mut entry)?;
        let idx = u32::from_le_bytes(entry[..4].try_into().expect("4"));
        let offset = u64::from_le_bytes(entry[4..].try_into().expect("8"));
        match by_idx.last() {
            None if offset != 0 => return Err(invalid("first row not at offset 0")),
            Some(&(before, at)) if idx <= before || offset < at => {
                return Err(invalid("index table out of order"))
            }
            _ if offset > rows_len => return Err(invalid("row offset beyond the rows")),
            _ => by_idx.push((idx, offset)),
        }
    }
    let mut entry = [0u8; ID_ENTRY as usize];
    for _ in 0..count {
        r.fill(path, &mut entry)?;
        visit(RowEntry::Id {
            id: u128::from_le_bytes(entry[..16].try_into().expect("16")),
            idx: u32::from_le_bytes(entry[16..].try_into().expect("4")),
        });
    }
    let mut row = Vec::new();
    for (i, &(idx, offset)) in by_idx.iter().enumerate() {
        let end = by_idx.get(i + 1).map_or(rows_len, |&(_, next)| next);
        row.resize(
            usize::try_from(end - offset).expect("a row fits in memory"),
            0,
        );
        r.fill(path, &mut row)?;
        visit(RowEntry::Row { idx, bytes: &row });
    }
    // The directory: accounts ascending, lists back to back, two entries per row in all.
    let mut directory: Vec<(u32, u64)> = Vec::with_capacity(layout.accounts as usize);
    let mut entry = [0u8; DIR_ENTRY as usize];
    let mut listed = 0u64;
    for _ in 0..layout.accounts {
        r.fill(path, &mut entry)?;
        let account = u32::from_le_bytes(entry[..4].try_into().expect("4"));
        let start = u64::from(u32::from_le_bytes(entry[4..8].try_into().expect("4")));
        let n = u64::from(u32::from_le_bytes(entry[8..].try_into().expect("4")));
        if directory
            .last()
            .is_some_and(|&(before, _)| account <= before)
            || start != listed
            || n == 0
        {
            return Err(invalid("history directory out of order"));
        }
        listed += n;
        directory.push((account, n));
    }
    if layout.accounts > 0 && listed != 2 * count {
        return Err(invalid("history lists do not list every row twice"));
    }
    // Which indexes are this segment's rows: a bit each from the lowest (a binary search of
    // the index table per list entry was most of verify's time in a debug build).
    let low = by_idx.first().map_or(0, |&(idx, _)| idx);
    let high = by_idx.last().map_or(0, |&(idx, _)| idx);
    let words = if layout.accounts > 0 {
        (high - low) / 64 + 1
    } else {
        0
    };
    let mut rows_here = vec![0u64; words as usize];
    if words > 0 {
        for &(idx, _) in &by_idx {
            let bit = idx - low;
            rows_here[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }
    let is_row_here = |idx: u32| {
        idx >= low
            && idx <= high
            && rows_here[((idx - low) / 64) as usize] & (1 << ((idx - low) % 64)) != 0
    };
    let mut entry = [0u8; LIST_ENTRY as usize];
    for (account, n) in directory {
        let mut before = None;
        for _ in 0..n {
            r.fill(path, &mut entry)?;
            let idx = u32::from_le_bytes(entry);
            if before.is_some_and(|b| idx <= b) || !is_row_here(idx) {
                return Err(invalid("a history list out of order or naming another row"));
            }
            before = Some(idx);
            visit(RowEntry::Listed { account, idx });
        }
    }
    // The reference index: sorted, each entry naming a row of this segment.
    let mut entry = [0u8; REF_ENTRY as usize];
    let mut before: Option<(u128, u32)> = None;
    for _ in 0..layout.refs {
        r.fill(path, &mut entry)?;
        let reference = u128::from_le_bytes(entry[..16].try_into().expect("16"));
        let idx = u32::from_le_bytes(entry[16..].try_into().expect("4"));
        if reference == 0
            || before.is_some_and(|b| (reference, idx) <= b)
            || by_idx.binary_search_by_key(&idx, |&(at, _)| at).is_err()
        {
            return Err(invalid(
                "the reference index out of order or naming another row",
            ));
        }
        before = Some((reference, idx));
        visit(RowEntry::Referenced { reference, idx });
    }
    let mut hash = [0u8; 32];
    std::io::Read::read_exact(&mut r.file, &mut hash).map_err(|e| io("cannot read", path, e))?;
    if r.hasher.finalize().as_bytes() != &hash {
        return Err(invalid(
            "segment hash does not match its content (torn or altered)",
        ));
    }
    Ok(())
}

impl Segments {
    /// Visits every entry of every segment, oldest segment first, each read once in order
    /// (see [`super::storage::Storage::scan_transfer_rows`]). Segments written meanwhile are
    /// not visited.
    pub fn scan(&self, visit: &mut dyn FnMut(RowEntry<'_>)) -> Result<(), StorageError> {
        let numbers: Vec<u64> = self.segments.read().iter().map(|(n, _)| *n).collect();
        for n in numbers {
            scan_segment(&self.dir.join(format!("seg-{n:016x}")), visit)?;
        }
        Ok(())
    }

    /// Opens the segments under `ledger_dir` (creating the directory); leftover `.tmp` files
    /// of a write a crash cut short are removed.
    pub fn open(ledger_dir: &Path) -> Result<Self, StorageError> {
        let dir = ledger_dir.join(ROWS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io("cannot create", &dir, e))?;
        let mut segments = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io("cannot list", &dir, e))? {
            let path = entry.map_err(|e| io("cannot list", &dir, e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
                continue;
            }
            let Some(n) = name
                .strip_prefix("seg-")
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            segments.push((n, Segment::open(&path)?));
        }
        segments.sort_unstable_by_key(|(n, _)| *n);
        Ok(Self {
            dir,
            segments: RwLock::new(segments),
            writing: parking_lot::Mutex::new(()),
        })
    }

    /// Writes `rows` as one new segment with their accounts' history lists, durably (file
    /// and directory synced).
    pub fn put(&self, rows: &TransferRows) -> Result<(), StorageError> {
        if rows.is_empty() {
            return Ok(());
        }
        let _writing = self.writing.lock();
        let n = self.segments.read().last().map_or(1, |(n, _)| n + 1);
        let path = self.dir.join(format!("seg-{n:016x}"));
        let tmp = self.dir.join(format!("seg-{n:016x}.tmp"));
        let file = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
        let mut out = HashingWriter::new(file);
        write_segment(&mut out, rows, &tmp)?;
        let file = out.finish().map_err(|e| io("cannot write", &tmp, e))?;
        file.sync_all().map_err(|e| io("cannot sync", &tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot rename to", &path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync", &self.dir, e))?;
        let segment = Segment::open(&path)?;
        self.segments.write().push((n, segment));
        Ok(())
    }

    /// Up to `limit` entries of the history of `account` below `before`, newest first, each
    /// once, from every segment (see [`super::storage::Storage::account_history`]): at most
    /// `limit` entries read from each.
    pub fn history(
        &self,
        account: u32,
        before: u32,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.history_range(account, 0..before, HistoryOrder::NewestFirst, limit)
    }

    /// Up to `limit` entries of the history of `account` in `span`, in `order`, each once,
    /// from every segment (see [`super::storage::Storage::account_history_range`]): at most
    /// `limit` entries read from each, nothing from a segment whose rows are all outside
    /// `span`.
    pub fn history_range(
        &self,
        account: u32,
        span: std::ops::Range<u32>,
        order: HistoryOrder,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        let mut found = Vec::new();
        for (_, segment) in self.segments.read().iter() {
            found.extend(segment.history(account, span.clone(), order, limit)?);
        }
        match order {
            HistoryOrder::NewestFirst => found.sort_unstable_by(|a, b| b.cmp(a)),
            HistoryOrder::OldestFirst => found.sort_unstable(),
        }
        found.dedup();
        found.truncate(limit);
        Ok(found)
    }

    /// The highest transfer index of each segment, oldest segment first (from memory).
    pub fn max_indexes(&self) -> Vec<u32> {
        self.segments
            .read()
            .iter()
            .map(|(_, s)| s.max_idx)
            .collect()
    }

    /// Positioned reads made so far by each segment's lookups and history reads, oldest
    /// segment first (tests show which segments a query read).
    #[cfg(test)]
    pub fn reads_per_segment(&self) -> Vec<u64> {
        self.segments
            .read()
            .iter()
            .map(|(_, s)| s.reads.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Up to `limit` indexes of the rows with `reference`, lowest first, each once, from
    /// every segment (see [`super::storage::Storage::transfer_rows_by_reference`]): nothing
    /// read of a segment whose references do not span it, at most `limit` entries of
    /// another.
    pub fn by_reference(&self, reference: u128, limit: usize) -> Result<Vec<u32>, StorageError> {
        let mut found = Vec::new();
        for (_, segment) in self.segments.read().iter() {
            found.extend(segment.by_reference(reference, limit)?);
        }
        found.sort_unstable();
        found.dedup();
        found.truncate(limit);
        Ok(found)
    }

    /// The row of transfer `idx`, from the newest segment that has it.
    pub fn row(&self, idx: u32) -> Result<Option<Vec<u8>>, StorageError> {
        for (_, segment) in self.segments.read().iter().rev() {
            if let Some(row) = segment.row(idx)? {
                return Ok(Some(row));
            }
        }
        Ok(None)
    }

    /// The index of transfer `id`, from the newest segment that has it.
    pub fn idx_of(&self, id: u128) -> Result<Option<u32>, StorageError> {
        for (_, segment) in self.segments.read().iter().rev() {
            if let Some(idx) = segment.idx_of(id)? {
                return Ok(Some(idx));
            }
        }
        Ok(None)
    }
}

/// Rewrites every segment under `ledger_dir` as version 1 would have written it (no history
/// lists), as a ledger from before the lists has them.
#[cfg(test)]
pub(crate) fn rewrite_as_version_1(ledger_dir: &Path) {
    let dir = ledger_dir.join(ROWS_DIR);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let layout = Layout::of(&bytes[..HEADER as usize], bytes.len() as u64).unwrap();
        assert_eq!(bytes[8], VERSION);
        let mut old = bytes[..HEADER_V1 as usize].to_vec();
        old[8] = VERSION_ROWS_ONLY;
        old.extend_from_slice(&bytes[HEADER as usize..layout.rows_end as usize]);
        let hash = *blake3::hash(&old).as_bytes();
        old.extend_from_slice(&hash);
        std::fs::write(&path, old).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_bytes(idx: u32) -> Vec<u8> {
        vec![idx as u8; 1 + idx as usize % 5]
    }

    /// Rows of the transfers `idx` touching `accounts`, in the order given.
    fn rows(of: impl IntoIterator<Item = (u32, [u32; 2])>) -> TransferRows {
        let mut rows = TransferRows::default();
        for (idx, accounts) in of {
            rows.push(TransferRow {
                idx,
                id: 1_000 + u128::from(idx),
                accounts,
                bytes: &row_bytes(idx),
                reference: 0,
            });
        }
        rows
    }

    /// Issue 15 (histories on disk): each segment lists its rows under both their accounts;
    /// a page reads below its bound, newest first, across segments, each index once (a row
    /// written again in a later segment), and a version 1 segment (no lists) still reads
    /// its rows and lists nothing. The scan visits every list entry once per segment.
    #[test]
    fn history_lists_page_across_segments_and_version_1_segments_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        // Account 7 is in every transfer; 3 and 5 share the others.
        let first = rows((0..10).map(|i| (i, [7, 3 + 2 * (i % 2)])));
        segments.put(&first).unwrap();
        // Transfer 4 written again (as an ended pending transfer would be), and later ones.
        let second = rows(
            [4].into_iter()
                .chain(10..15)
                .map(|i| (i, [3 + 2 * (i % 2), 7])),
        );
        segments.put(&second).unwrap();
        let all: Vec<u32> = (0..15).rev().collect();
        assert_eq!(segments.history(7, 100, 100).unwrap(), all);
        assert_eq!(segments.history(7, 12, 3).unwrap(), vec![11, 10, 9]);
        assert_eq!(segments.history(7, 5, 10).unwrap(), vec![4, 3, 2, 1, 0]);
        assert_eq!(segments.history(7, 0, 10).unwrap(), Vec::<u32>::new());
        assert_eq!(segments.history(3, 100, 4).unwrap(), vec![14, 12, 10, 8]);
        assert_eq!(segments.history(5, 6, 10).unwrap(), vec![5, 3, 1]);
        assert_eq!(segments.history(9, 100, 10).unwrap(), Vec::<u32>::new());

        let mut listed = Vec::new();
        segments
            .scan(&mut |e| {
                if let RowEntry::Listed { account, idx } = e {
                    listed.push((account, idx));
                }
            })
            .unwrap();
        assert_eq!(listed.len(), 2 * (first.len() + second.len()));
        drop(segments);

        rewrite_as_version_1(dir.path());
        let segments = Segments::open(dir.path()).unwrap();
        assert_eq!(segments.row(4).unwrap(), Some(row_bytes(4)));
        assert_eq!(segments.idx_of(1_013).unwrap(), Some(13));
        assert_eq!(segments.history(7, 100, 100).unwrap(), Vec::<u32>::new());
        let mut scanned = 0;
        segments
            .scan(&mut |e| scanned += usize::from(matches!(e, RowEntry::Row { .. })))
            .unwrap();
        assert_eq!(scanned, first.len() + second.len());
        // A new segment after version 1 ones has its lists.
        segments.put(&rows([(20, [7, 3])])).unwrap();
        assert_eq!(segments.history(7, 100, 100).unwrap(), vec![20]);
    }

    /// The segment format is the module docs' byte for byte, whatever order the rows come
    /// in (here out of index order, one of them twice): written from one buffer of rows, as
    /// it is laid out, it is the same file as before (older segments and newer ones read
    /// alike).
    #[test]
    fn segment_format_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        let given = [(2, [1, 0], &[0xAA, 0xBB][..]), (0, [0, 1], &[0xCC][..])];
        let mut rows: TransferRows = given
            .iter()
            .chain(&[(5, [2, 1], &[0xDD, 0xEE, 0xFF][..]), given[1]])
            .map(|&(idx, accounts, bytes)| TransferRow {
                idx,
                id: 1_000 + u128::from(idx),
                accounts,
                bytes,
                reference: 0,
            })
            .collect();
        segments.put(&rows).unwrap();
        let mut expected = b"mxpay-rs".to_vec();
        expected.push(VERSION);
        let u32s = |out: &mut Vec<u8>, values: &[u32]| {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        // Three rows, three accounts, no references.
        u32s(&mut expected, &[3, 3, 0]);
        for (idx, offset) in [(0u32, 0u64), (2, 1), (5, 3)] {
            u32s(&mut expected, &[idx]);
            expected.extend_from_slice(&offset.to_le_bytes());
        }
        for idx in [0u32, 2, 5] {
            expected.extend_from_slice(&(1_000 + u128::from(idx)).to_le_bytes());
            u32s(&mut expected, &[idx]);
        }
        expected.extend_from_slice(&[0xCC, 0xAA, 0xBB, 0xDD, 0xEE, 0xFF]);
        u32s(&mut expected, &[0, 0, 2, 1, 2, 3, 2, 5, 1]);
        u32s(&mut expected, &[0, 2, 0, 2, 5, 5]);
        let hash = *blake3::hash(&expected).as_bytes();
        expected.extend_from_slice(&hash);
        let path = dir.path().join(ROWS_DIR).join(format!("seg-{:016x}", 1));
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        // And in index order, the rows written from the buffer at once: the same bytes.
        rows = [1, 0, 2]
            .into_iter()
            .map(|i| rows.get(i))
            .collect::<TransferRows>();
        segments.put(&rows).unwrap();
        let path = dir.path().join(ROWS_DIR).join(format!("seg-{:016x}", 2));
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    /// Issue 15 (memory flat from the first million): a spill's rows come in one buffer,
    /// and the segment is written from it through a bounded buffer of its own (rows larger
    /// than that buffer go straight through). Rows in index order and out of it read back
    /// identical by index and by id, and the scan visits each once; a flipped byte among
    /// the rows fails the scan.
    #[test]
    fn rows_from_one_buffer_read_back_identical_and_a_flipped_byte_fails_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        let bytes_of = |idx: u32| -> Vec<u8> {
            let len = if idx == 1_500 {
                WRITE_BUFFER_BYTES + 7
            } else {
                1 + idx as usize % 300
            };
            (0..len).map(|i| (i as u32 ^ idx) as u8).collect()
        };
        let mut in_order = TransferRows::default();
        for idx in 0..3_000 {
            in_order.push(TransferRow {
                idx,
                id: u128::from(idx) << 64 | 7,
                accounts: [idx % 10, 10 + idx % 3],
                bytes: &bytes_of(idx),
                reference: 0,
            });
        }
        segments.put(&in_order).unwrap();
        let mut shuffled = TransferRows::default();
        for idx in (3_000..3_400).rev() {
            shuffled.push(TransferRow {
                idx,
                id: u128::from(idx) << 64 | 7,
                accounts: [idx % 10, 10 + idx % 3],
                bytes: &bytes_of(idx),
                reference: 0,
            });
        }
        segments.put(&shuffled).unwrap();
        for idx in [0, 1, 299, 1_500, 2_999, 3_000, 3_201, 3_399] {
            assert_eq!(segments.row(idx).unwrap(), Some(bytes_of(idx)), "row {idx}");
            assert_eq!(
                segments.idx_of(u128::from(idx) << 64 | 7).unwrap(),
                Some(idx)
            );
        }
        let mut seen = Vec::new();
        segments
            .scan(&mut |e| {
                if let RowEntry::Row { idx, bytes } = e {
                    assert_eq!(bytes, bytes_of(idx), "row {idx}");
                    seen.push(idx);
                }
            })
            .unwrap();
        assert_eq!(seen, (0..3_400).collect::<Vec<_>>());
        assert_eq!(
            segments.history(12, 3_400, 3).unwrap(),
            vec![3_398, 3_395, 3_392]
        );
        drop(segments);
        let path = dir.path().join(ROWS_DIR).join(format!("seg-{:016x}", 1));
        let mut bytes = std::fs::read(&path).unwrap();
        let layout = Layout::of(&bytes[..HEADER as usize], bytes.len() as u64).unwrap();
        bytes[layout.rows_start as usize + 1_000] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        let error = segments.scan(&mut |_| {}).unwrap_err().to_string();
        assert!(error.contains("segment hash does not match"), "{error}");
    }

    /// History queries by time range: a span of indexes read in either order, at most
    /// `limit`, each once across segments; a segment whose rows all lie outside the span is
    /// not read at all (its read counter stays put), one whose rows straddle it is.
    #[test]
    fn history_ranges_read_only_the_segments_they_reach_in_either_order() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        for run in 0..3u32 {
            segments
                .put(&rows(
                    (run * 10..run * 10 + 10).map(|i| (i, [7, 3 + 2 * (i % 2)])),
                ))
                .unwrap();
        }
        let before = segments.reads_per_segment();
        let newest = segments
            .history_range(7, 12..18, HistoryOrder::NewestFirst, 100)
            .unwrap();
        assert_eq!(newest, (12..18).rev().collect::<Vec<u32>>());
        let oldest = segments
            .history_range(7, 12..18, HistoryOrder::OldestFirst, 4)
            .unwrap();
        assert_eq!(oldest, vec![12, 13, 14, 15]);
        let after = segments.reads_per_segment();
        assert_eq!(after[0], before[0], "the first segment is below the span");
        assert_eq!(after[2], before[2], "the third segment is above it");
        assert!(after[1] > before[1]);
        // Across segments, both orders (account 3 is in the rows of even index).
        assert_eq!(
            segments
                .history_range(3, 7..25, HistoryOrder::OldestFirst, 100)
                .unwrap(),
            vec![8, 10, 12, 14, 16, 18, 20, 22, 24]
        );
        assert_eq!(
            segments
                .history_range(3, 7..25, HistoryOrder::NewestFirst, 3)
                .unwrap(),
            vec![24, 22, 20]
        );
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 18..12;
        assert!(segments
            .history_range(7, empty, HistoryOrder::OldestFirst, 10)
            .unwrap()
            .is_empty());
        // A row written again by a later segment (an ended pending transfer) is listed once.
        segments.put(&rows([(13, [7, 5])])).unwrap();
        assert_eq!(
            segments
                .history_range(7, 12..15, HistoryOrder::OldestFirst, 100)
                .unwrap(),
            vec![12, 13, 14]
        );
        assert_eq!(segments.history(7, 15, 3).unwrap(), vec![14, 13, 12]);
    }

    /// A flipped byte in the history part of a segment is caught by the scan (its hash).
    #[test]
    fn a_flipped_byte_in_the_history_lists_fails_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        segments.put(&rows((0..4).map(|i| (i, [1, 2])))).unwrap();
        drop(segments);
        let path = dir.path().join(ROWS_DIR).join(format!("seg-{:016x}", 1));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 32 - 5;
        bytes[at] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        let error = segments.scan(&mut |_| {}).unwrap_err().to_string();
        assert!(error.contains("transfer rows"), "{error}");
    }
}
