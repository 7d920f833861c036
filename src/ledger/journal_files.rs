//! Journal records of the sled backend, in append-only files outside sled (issue 15: memory
//! flat in history). sled 0.34 keeps in memory every value it wrote, whatever its cache size
//! (a probe: about 1.1 B of RSS per journal byte), so the records' bytes go to files in
//! `<ledger dir>/journal/`, and sled keeps under each record's key only where they are: a
//! [`Location`] of 21 bytes.
//!
//! A file is named by the seq of its first record (`<seq, 20 decimal digits>.log`) and holds
//! records back to back, nothing else; a new file starts once the next record would take the
//! current one beyond [`JOURNAL_FILE_BYTES`]. An append writes the record at the end of the
//! current file and fdatasyncs it *before* its location is written to sled, so a location in
//! sled always names whole bytes on disk; a crash between the two leaves bytes after the last
//! location (or a file after the last one named), which nothing reads and the first append
//! after the next open cuts off (or removes). Opening and reading change no file: `verify`
//! writes nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::storage::{StorageError, StoredRecord};

/// The directory of the journal files, inside the ledger's.
pub const JOURNAL_DIR: &str = "journal";
/// A file is closed to new records once the next would take it beyond this size, so files
/// stay bounded (a record is at most about 132 KiB).
pub const JOURNAL_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// First byte of a location value. A record stored whole as a sled value (written before
/// the journal files existed) starts with its format version, 1.
pub const LOCATION_TAG: u8 = 0xF1;
/// Size of an encoded [`Location`].
pub const LOCATION_BYTES: usize = 1 + 8 + 8 + 4;

/// Where a record's bytes are: the file (by its first seq), the offset and the length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The seq of the first record of the file, which names it.
    pub file_seq: u64,
    /// Offset of the record in the file.
    pub offset: u64,
    /// Length of the record.
    pub len: u32,
}

impl Location {
    /// `tag 0xF1 | file seq u64 LE | offset u64 LE | length u32 LE`.
    pub fn encode(&self) -> [u8; LOCATION_BYTES] {
        let mut out = [0u8; LOCATION_BYTES];
        out[0] = LOCATION_TAG;
        out[1..9].copy_from_slice(&self.file_seq.to_le_bytes());
        out[9..17].copy_from_slice(&self.offset.to_le_bytes());
        out[17..21].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// The location in a sled value, or `None` if the value is a whole record (older
    /// format: a record is at least 82 bytes and starts with its version, 1).
    pub fn decode(value: &[u8]) -> Option<Self> {
        if value.len() != LOCATION_BYTES || value[0] != LOCATION_TAG {
            return None;
        }
        Some(Self {
            file_seq: u64::from_le_bytes(value[1..9].try_into().expect("8")),
            offset: u64::from_le_bytes(value[9..17].try_into().expect("8")),
            len: u32::from_le_bytes(value[17..21].try_into().expect("4")),
        })
    }

    /// Where the next record of the same file would go.
    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The path of the journal file whose first record is `file_seq`.
pub fn file_path(journal_dir: &Path, file_seq: u64) -> PathBuf {
    journal_dir.join(format!("{file_seq:020}.log"))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Backend(format!("journal: {what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("cannot sync the directory", dir, e))
}

/// The writing end of the journal files. Only the ledger's writer appends.
pub(crate) struct JournalFiles {
    dir: PathBuf,
    fdatasync: bool,
    file_bytes_max: u64,
    /// The file being appended to (its first seq and, once opened, its handle) and where the
    /// next record goes; `None` until a record is written in a file (a new journal, or one
    /// whose last record is a sled value).
    current: Option<(u64, Option<File>)>,
    end: u64,
    /// Files found at open after the last one a location names (a crash before their first
    /// location was written): removed, and the current file cut to `end`, at the first
    /// append, so that opening (and `verify`) writes nothing.
    stale: Vec<PathBuf>,
    tidied: bool,
    /// An append failed part-way: where its bytes went is unknown to sled, so nothing more
    /// is appended by this handle (the ledger's writer stops at a storage error anyway).
    failed: bool,
}

impl JournalFiles {
    /// The journal files of the ledger at `ledger_dir`, whose last record in sled has
    /// `last_seq` (0 if none) and, if it is in a file, `last`.
    pub fn open(
        ledger_dir: &Path,
        last_seq: u64,
        last: Option<Location>,
        fdatasync: bool,
    ) -> Result<Self, StorageError> {
        let dir = ledger_dir.join(JOURNAL_DIR);
        let mut stale = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry.map_err(|e| io("cannot list", &dir, e))?.path();
                    let first_seq = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".log"))
                        .and_then(|n| n.parse::<u64>().ok());
                    if first_seq.is_some_and(|s| s > last_seq) {
                        stale.push(path);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot list", &dir, e)),
        }
        Ok(Self {
            dir,
            fdatasync,
            file_bytes_max: JOURNAL_FILE_BYTES,
            current: last.map(|l| (l.file_seq, None)),
            end: last.map_or(0, |l| l.end()),
            stale,
            tidied: false,
            failed: false,
        })
    }

    /// Tests: a smaller file size, to see files roll over.
    #[cfg(test)]
    pub fn set_file_bytes_max(&mut self, bytes: u64) {
        self.file_bytes_max = bytes;
    }

    /// Writes record `seq` at the end of the journal (durably, unless fdatasync is off) and
    /// returns where it is; [`JournalFiles::written`] must follow once the location is in
    /// sled, or the next append writes over it.
    pub fn write(&mut self, seq: u64, record: &[u8]) -> Result<Location, StorageError> {
        if self.failed {
            return Err(StorageError::Backend(
                "journal: an earlier append failed; reopen the ledger".to_owned(),
            ));
        }
        // Until the record is whole on disk: a failure part-way leaves the file's end unknown.
        self.failed = true;
        if !self.tidied {
            self.tidy()?;
        }
        let len = u32::try_from(record.len())
            .map_err(|_| StorageError::Backend("journal: record too large".to_owned()))?;
        let full = self.end > 0 && self.end + u64::from(len) > self.file_bytes_max;
        if self.current.is_none() || full {
            self.start_file(seq)?;
        }
        let (file_seq, handle) = self.current.as_mut().expect("a current file");
        let file_seq = *file_seq;
        let path = file_path(&self.dir, file_seq);
        if handle.is_none() {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io("cannot open", &path, e))?;
            *handle = Some(file);
        }
        let file = handle.as_ref().expect("opened above");
        file.write_all_at(record, self.end)
            .map_err(|e| io("cannot write", &path, e))?;
        if self.fdatasync {
            file.sync_data().map_err(|e| io("cannot sync", &path, e))?;
        }
        self.failed = false;
        Ok(Location {
            file_seq,
            offset: self.end,
            len,
        })
    }

    /// The location [`JournalFiles::write`] returned is in sled: the next record goes
    /// after it.
    pub fn written(&mut self, location: Location) {
        self.end = location.end();
    }

    /// The location could not be written to sled: whether it is there is unknown.
    pub fn poison(&mut self) {
        self.failed = true;
    }

    /// Cuts what a crash left after the last record sled names, once, before the first
    /// write: the current file's tail, and files after it.
    fn tidy(&mut self) -> Result<(), StorageError> {
        let removed = !self.stale.is_empty();
        for path in std::mem::take(&mut self.stale) {
            std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
            tracing::info!(path = %path.display(), "removed a journal file no record names (a crash cut its first append short)");
        }
        if let Some((file_seq, _)) = self.current {
            let path = file_path(&self.dir, file_seq);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io("cannot open", &path, e))?;
            let len = file
                .metadata()
                .map_err(|e| io("cannot stat", &path, e))?
                .len();
            if len < self.end {
                // Bytes sled names are gone: writing on would leave a hole among records.
                return Err(StorageError::Backend(format!(
                    "journal: {} holds {len} bytes but sled names records up to byte {}: \
                     records were lost",
                    path.display(),
                    self.end
                )));
            }
            if len > self.end {
                file.set_len(self.end)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io("cannot cut the unwritten tail of", &path, e))?;
                tracing::info!(path = %path.display(), bytes = len - self.end, "cut journal bytes no record names (a crash cut an append short)");
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        self.tidied = true;
        Ok(())
    }

    /// Starts the file of record `seq` (replacing a leftover of the same name), with its
    /// name durable in its directory before any location names it.
    fn start_file(&mut self, seq: u64) -> Result<(), StorageError> {
        let parent = self.dir.parent().map(Path::to_path_buf);
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir).map_err(|e| io("cannot create", &self.dir, e))?;
            if let Some(parent) = &parent {
                sync_dir(parent)?;
            }
        }
        let path = file_path(&self.dir, seq);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io("cannot create", &path, e))?;
        sync_dir(&self.dir)?;
        self.current = Some((seq, Some(file)));
        self.end = 0;
        Ok(())
    }
}

/// Reads records through sled's values: a [`Location`] is read from its file, any other value
/// is a whole record (older format).
pub(crate) struct RecordReader<I> {
    pub values: I,
    pub journal_dir: PathBuf,
    /// The file last read, kept open for the next record (they are mostly in the same one).
    pub open: Option<(u64, File)>,
}

impl<I> Iterator for RecordReader<I>
where
    I: Iterator<Item = Result<(u64, Vec<u8>), StorageError>>,
{
    type Item = StoredRecord;

    fn next(&mut self) -> Option<StoredRecord> {
        let (seq, value) = match self.values.next()? {
            Ok(item) => item,
            Err(e) => return Some(Err(e)),
        };
        let Some(location) = Location::decode(&value) else {
            return Some(Ok((seq, value)));
        };
        Some(self.read(seq, location).map(|bytes| (seq, bytes)))
    }
}

impl<I> RecordReader<I> {
    fn read(&mut self, seq: u64, location: Location) -> Result<Vec<u8>, StorageError> {
        let path = file_path(&self.journal_dir, location.file_seq);
        let failed = |e: std::io::Error| {
            StorageError::Backend(format!(
                "journal record {seq}: cannot read {} bytes at {} of {}: {e}",
                location.len,
                location.offset,
                path.display()
            ))
        };
        if self.open.as_ref().map(|(s, _)| *s) != Some(location.file_seq) {
            self.open = None;
            self.open = Some((location.file_seq, File::open(&path).map_err(failed)?));
        }
        let (_, file) = self.open.as_ref().expect("opened above");
        let mut bytes = vec![0u8; location.len as usize];
        file.read_exact_at(&mut bytes, location.offset)
            .map_err(failed)?;
        Ok(bytes)
    }
}
