//! The audit log: every admin call (who, what, when, result), append-only, one JSON object per
//! line in `<data_dir>/audit.jsonl`. Each line carries the hash of the previous one, so a
//! deleted, edited or reordered line is detected by [`AuditLog::verify`].
//!
//! A plain file rather than a database tree: admins can read it, ship it to their log system
//! and back it up with ordinary tools. Each append is flushed (`sync_data`) before the admin
//! call returns.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The audit action of the line that stands for refused calls answered 429 without a line of
/// their own; its target says how many.
pub const REFUSALS_LIMITED_ACTION: &str = "refusals.limited";

/// Largest page [`AuditLog::page`] returns.
pub const AUDIT_PAGE_MAX: usize = 500;

/// Longest text field (actor, token id, action, target, result) an entry keeps as given, in
/// bytes; a longer one keeps its first [`AUDIT_FIELD_KEPT_BYTES`] and a marker with its length
/// and hash ([`bound_field`]). A Matrix user ID or a token id (255 bytes) fits whole.
pub const AUDIT_FIELD_BYTES_MAX: usize = 320;

/// How much of an over-long field is kept, in bytes (cut at a character boundary).
pub const AUDIT_FIELD_KEPT_BYTES: usize = 64;

/// `field` as an entry stores it: whole up to [`AUDIT_FIELD_BYTES_MAX`] bytes; longer, its
/// first [`AUDIT_FIELD_KEPT_BYTES`] then `…[<n> bytes, blake3 <16 hex>]`, so every line has a
/// fixed bound whatever a caller sends, and equal long values can still be told apart.
pub fn bound_field(field: &str) -> std::borrow::Cow<'_, str> {
    if field.len() <= AUDIT_FIELD_BYTES_MAX {
        return field.into();
    }
    let mut cut = AUDIT_FIELD_KEPT_BYTES;
    while !field.is_char_boundary(cut) {
        cut -= 1;
    }
    let hash = blake3::hash(field.as_bytes()).to_hex();
    format!(
        "{}…[{} bytes, blake3 {}]",
        &field[..cut],
        field.len(),
        &hash[..16]
    )
    .into()
}

/// One admin call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Who: the admin token's subject, or `provider:<name>` for webhooks.
    pub actor: String,
    /// The admin token id (`jti`), if a token was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// What: a stable action name, e.g. `topup`, `freeze`, `pin-reset`.
    pub action: String,
    /// On what: a user ID, transfer id or similar. Never a secret. Bounded ([`bound_field`]).
    pub target: String,
    /// `ok`, or the error code.
    pub result: String,
    /// Hex BLAKE3 of the previous line (all zeros for the first).
    pub prev_hash: String,
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading or writing the file failed.
    #[error("audit log I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A line does not parse or its chain is broken.
    #[error("audit log line {line}: {reason}")]
    Corrupt {
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
}

struct Tail {
    file: File,
    seq: u64,
    hash: String,
}

/// An append-only, hash-chained audit log.
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
}

const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn line_hash(line: &str) -> String {
    blake3::hash(line.as_bytes()).to_hex().to_string()
}

/// One audited HTTP call (admin or merchant API), for [`AuditLog::append_call`].
#[derive(Debug, Clone)]
pub struct CallLine {
    /// Who: a token's subject, `merchant:<id>`, or `unauthenticated`.
    pub actor: String,
    /// The token or key id, if a genuine one was shown.
    pub token_id: Option<String>,
    /// What.
    pub action: &'static str,
    /// On what.
    pub target: String,
    /// `ok`, or the error code.
    pub result: String,
}

impl AuditLog {
    /// Writes `line` off the async runtime (an append fsyncs), preceded, when `suppressed`
    /// refused calls were answered 429 without a line of their own since the last one, by one
    /// [`REFUSALS_LIMITED_ACTION`] line counting them. The error is a sentence for a 500.
    pub async fn append_call(
        self: &std::sync::Arc<Self>,
        at_ms: u64,
        suppressed: u64,
        line: CallLine,
    ) -> Result<(), String> {
        let audit = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            if suppressed > 0 {
                audit.append(
                    at_ms,
                    "rate-limit",
                    None,
                    REFUSALS_LIMITED_ACTION,
                    &format!("{suppressed} refused calls answered 429 without an entry"),
                    "M_LIMIT_EXCEEDED",
                )?;
            }
            audit.append(
                at_ms,
                &line.actor,
                line.token_id.as_deref(),
                line.action,
                &line.target,
                &line.result,
            )
        })
        .await;
        match written {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("audit log: {e}")),
            Err(e) => Err(format!("audit log task: {e}")),
        }
    }
    /// Opens (or creates) the log at `path`, checking the chain of what is there.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let (seq, hash) = Self::scan(path, |_| {})?;
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_owned(),
            tail: Mutex::new(Tail { file, seq, hash }),
        })
    }

    /// Reads every line, checking the chain; calls `each` on every entry. Returns the last
    /// seq and hash.
    fn scan(path: &Path, mut each: impl FnMut(AuditEntry)) -> Result<(u64, String), AuditError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((0, GENESIS_HASH.to_owned()))
            }
            Err(e) => return Err(e.into()),
        };
        let mut seq = 0;
        let mut hash = GENESIS_HASH.to_owned();
        for line in BufReader::new(file).lines() {
            let line = line?;
            let corrupt = |reason: String| AuditError::Corrupt {
                line: seq + 1,
                reason,
            };
            let entry: AuditEntry =
                serde_json::from_str(&line).map_err(|e| corrupt(e.to_string()))?;
            if entry.seq != seq + 1 {
                return Err(corrupt(format!(
                    "expected seq {}, found {}",
                    seq + 1,
                    entry.seq
                )));
            }
            if entry.prev_hash != hash {
                return Err(corrupt("previous-hash mismatch".to_owned()));
            }
            seq = entry.seq;
            hash = line_hash(&line);
            each(entry);
        }
        Ok((seq, hash))
    }

    /// Appends an entry and flushes it to disk. `seq` and `prev_hash` are filled in here; every
    /// text field is bounded with [`bound_field`].
    pub fn append(
        &self,
        at_ms: u64,
        actor: &str,
        token_id: Option<&str>,
        action: &str,
        target: &str,
        result: &str,
    ) -> Result<AuditEntry, AuditError> {
        let mut tail = self.tail.lock();
        let entry = AuditEntry {
            seq: tail.seq + 1,
            at_ms,
            actor: bound_field(actor).into_owned(),
            token_id: token_id.map(|t| bound_field(t).into_owned()),
            action: bound_field(action).into_owned(),
            target: bound_field(target).into_owned(),
            result: bound_field(result).into_owned(),
            prev_hash: tail.hash.clone(),
        };
        let line = serde_json::to_string(&entry).expect("audit entries serialise");
        tail.file.write_all(line.as_bytes())?;
        tail.file.write_all(b"\n")?;
        tail.file.sync_data()?;
        tail.seq = entry.seq;
        tail.hash = line_hash(&line);
        Ok(entry)
    }

    /// Entries newest first, starting below `before_seq` (exclusive; `None` = from the newest),
    /// at most `limit` (capped at [`AUDIT_PAGE_MAX`]).
    pub fn page(
        &self,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, AuditError> {
        let limit = limit.clamp(1, AUDIT_PAGE_MAX);
        let before_seq = before_seq.unwrap_or(u64::MAX);
        // Hold the lock so the scan sees a whole file, never a half-written last line.
        let _tail = self.tail.lock();
        let mut window = std::collections::VecDeque::with_capacity(limit);
        Self::scan(&self.path, |entry| {
            if entry.seq < before_seq {
                if window.len() == limit {
                    window.pop_front();
                }
                window.push_back(entry);
            }
        })?;
        Ok(window.into_iter().rev().collect())
    }

    /// Checks the whole chain; returns the number of entries.
    pub fn verify(&self) -> Result<u64, AuditError> {
        let _tail = self.tail.lock();
        Ok(Self::scan(&self.path, |_| {})?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_survive_reopen_and_page_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        {
            let log = AuditLog::open(&path).unwrap();
            for i in 0..5 {
                log.append(i, "ops", Some("jti"), "topup", "@a:x", "ok")
                    .unwrap();
            }
        }
        let log = AuditLog::open(&path).unwrap();
        let entry = log.append(9, "ops", None, "freeze", "@a:x", "ok").unwrap();
        assert_eq!(entry.seq, 6);
        let page = log.page(None, 2).unwrap();
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [6, 5]);
        let older = log.page(Some(5), 10).unwrap();
        assert_eq!(
            older.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 3, 2, 1]
        );
        assert_eq!(log.verify().unwrap(), 6);
    }

    #[test]
    fn long_fields_are_cut_with_their_length_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let huge = format!("@{}:example.org", "é".repeat(30 * 1024));
        let other = format!("@{}:example.org", "e".repeat(60 * 1024));
        let whole = "x".repeat(AUDIT_FIELD_BYTES_MAX);
        let entry = log
            .append(1, &huge, Some(&huge), "topup", &other, &whole)
            .unwrap();
        assert_eq!(entry.result, whole);
        assert!(entry.target.starts_with("@eee"), "{}", entry.target);
        assert!(
            entry
                .target
                .contains(&format!("…[{} bytes, blake3 ", other.len())),
            "{}",
            entry.target
        );
        // Cut at a character boundary; different values keep different hashes.
        assert!(entry.actor.starts_with(&format!("@{}…[", "é".repeat(31))));
        assert_ne!(bound_field(&huge), bound_field(&other));
        for field in [&entry.actor, &entry.target] {
            assert!(field.len() <= AUDIT_FIELD_BYTES_MAX, "{field}");
        }
        drop(log);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 1024, "{size} bytes");
        assert_eq!(AuditLog::open(&path).unwrap().verify().unwrap(), 1);
    }

    #[test]
    fn edited_or_deleted_lines_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..3 {
            log.append(i, "ops", None, "topup", "@a:x", "ok").unwrap();
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"result\":\"ok\"", "\"result\":\"no\"", 1);
        std::fs::write(&path, edited).unwrap();
        let err = AuditLog::open(&path).err().unwrap();
        assert!(err.to_string().contains("line 2"), "{err}");

        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        let err = AuditLog::open(&path).err().unwrap();
        assert!(err.to_string().contains("expected seq 2"), "{err}");
    }
}
