//! Transfer rows on disk for the sled backend: one immutable *segment* file per spill, in
//! `<ledger dir>/rows/`, because sled's memory grows with every key it is given (a probe: about
//! 450 B per key in pieces of 512, 8 KiB per key in pieces of 16,384, never given back), while
//! rows are written once, in bulk, and never change: a sorted file fits them.
//!
//! Segment format (integers little-endian):
//! ```text
//! "mxpay-rs" | version u8 = 1 | count u32 |
//! count x (idx u32, offset u64)   sorted by idx (offset into the rows)
//! count x (id u128, idx u32)      sorted by id
//! rows (concatenated, in idx order) | blake3 [32] of everything before
//! ```
//! A segment is written as `seg-<n>.tmp`, synced, renamed to `seg-<n>` (n counts up), and the
//! directory synced: a power cut leaves it whole or absent. Lookups binary-search the tables
//! with positioned reads, newest segment first (a row written again, e.g. once a pending
//! transfer ended, is found in its newest segment). In memory: one handle and a few numbers
//! per segment. `verify` reads each segment once, front to back ([`Segments::scan`]), and
//! checks its hash on the way.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;

use super::storage::{RowEntry, StorageError, TransferRow};

const MAGIC: &[u8; 8] = b"mxpay-rs";
const VERSION: u8 = 1;
const HEADER: u64 = 8 + 1 + 4;
const IDX_ENTRY: u64 = 4 + 8;
const ID_ENTRY: u64 = 16 + 4;
/// The directory of the segments, inside the ledger's.
pub const ROWS_DIR: &str = "rows";

struct Segment {
    file: File,
    count: u64,
    rows_start: u64,
    rows_end: u64,
    min_idx: u32,
    max_idx: u32,
}

/// The segments of one ledger, newest last.
pub(crate) struct Segments {
    dir: PathBuf,
    segments: RwLock<Vec<(u64, Segment)>>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Backend(format!("transfer rows: {what} {}: {e}", path.display()))
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
        let header = read_at(&file, 0, HEADER as usize)?;
        if &header[..8] != MAGIC || header[8] != VERSION {
            return Err(io(
                "not a segment:",
                path,
                std::io::ErrorKind::InvalidData.into(),
            ));
        }
        let count = u64::from(u32::from_le_bytes(header[9..13].try_into().expect("4")));
        let rows_start = HEADER + count * (IDX_ENTRY + ID_ENTRY);
        if count == 0 || rows_start + 32 > len {
            return Err(io(
                "truncated segment",
                path,
                std::io::ErrorKind::InvalidData.into(),
            ));
        }
        let mut segment = Self {
            file,
            count,
            rows_start,
            rows_end: len - 32,
            min_idx: 0,
            max_idx: 0,
        };
        segment.min_idx = segment.idx_entry(0)?.0;
        segment.max_idx = segment.idx_entry(count - 1)?.0;
        Ok(segment)
    }

    fn idx_entry(&self, i: u64) -> Result<(u32, u64), StorageError> {
        let b = read_at(&self.file, HEADER + i * IDX_ENTRY, IDX_ENTRY as usize)?;
        Ok((
            u32::from_le_bytes(b[..4].try_into().expect("4")),
            u64::from_le_bytes(b[4..].try_into().expect("8")),
        ))
    }

    fn id_entry(&self, i: u64) -> Result<(u128, u32), StorageError> {
        let at = HEADER + self.count * IDX_ENTRY + i * ID_ENTRY;
        let b = read_at(&self.file, at, ID_ENTRY as usize)?;
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
                return read_at(&self.file, self.rows_start + offset, len).map(Some);
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

/// Buffer of a segment scan: large reads, one segment at a time.
const SCAN_BUFFER_BYTES: usize = 1 << 20;

/// Visits the id entries, then the rows, of the segment at `path`, reading it once in order;
/// fails if its tables are out of order or its hash does not match (after visiting).
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
    let mut header = [0u8; HEADER as usize];
    r.fill(path, &mut header)?;
    if &header[..8] != MAGIC || header[8] != VERSION {
        return Err(invalid("not a segment"));
    }
    let count = u64::from(u32::from_le_bytes(header[9..13].try_into().expect("4")));
    let rows_start = HEADER + count * (IDX_ENTRY + ID_ENTRY);
    if count == 0 || rows_start + 32 > len {
        return Err(invalid("truncated segment"));
    }
    let rows_len = len - 32 - rows_start;
    // The index table is needed for the rows' lengths, which come after the id table.
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
        })
    }

    /// Writes `rows` as one new segment, durably (file and directory synced).
    pub fn put(&self, rows: &[TransferRow]) -> Result<(), StorageError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut by_idx: Vec<&TransferRow> = rows.iter().collect();
        by_idx.sort_unstable_by_key(|r| r.idx);
        by_idx.dedup_by_key(|r| r.idx);
        let count = u32::try_from(by_idx.len())
            .map_err(|_| StorageError::Backend("too many rows in one segment".into()))?;
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&count.to_le_bytes());
        let mut offset = 0u64;
        for r in &by_idx {
            out.extend_from_slice(&r.idx.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += r.bytes.len() as u64;
        }
        let mut by_id: Vec<(u128, u32)> = by_idx.iter().map(|r| (r.id, r.idx)).collect();
        by_id.sort_unstable();
        for (id, idx) in by_id {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&idx.to_le_bytes());
        }
        for r in &by_idx {
            out.extend_from_slice(&r.bytes);
        }
        let hash = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&hash);
        let mut segments = self.segments.write();
        let n = segments.last().map_or(1, |(n, _)| n + 1);
        let path = self.dir.join(format!("seg-{n:016x}"));
        let tmp = self.dir.join(format!("seg-{n:016x}.tmp"));
        let mut file = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
        std::io::Write::write_all(&mut file, &out).map_err(|e| io("cannot write", &tmp, e))?;
        file.sync_all().map_err(|e| io("cannot sync", &tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot rename to", &path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync", &self.dir, e))?;
        segments.push((n, Segment::open(&path)?));
        Ok(())
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
