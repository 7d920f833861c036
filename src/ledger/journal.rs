//! Reading the journal back: replay into a [`State`] (on open and in `verify`), checking the
//! hash chain as it goes, and the streamed export.

use super::amount::{Currencies, CurrencyCode};
use super::codec::{decode_record, Head, Record, HASH_LEN};
use super::model::{AccountId, FreezeMode, TransferError, TransferId, TransferKind};
use super::state::{ApplyError, Event, State, CHECKPOINT_VERSION, CHECKPOINT_VERSIONS_OLD};
use super::storage::{Storage, StoredRecord};
use super::LedgerError;

/// The result of a replay: the state and where the journal ends.
pub(crate) struct Replayed {
    pub state: State,
    pub head: Head,
    pub last_time_ms: u64,
    pub events: u64,
    /// What was done with the stored checkpoint (a replay for `verify` compares it).
    pub checkpoint: CheckpointCheck,
}

/// What `verify` did with the stored checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointCheck {
    /// No checkpoint within the records read.
    None,
    /// The checkpoint at this record is the replay up to it, byte for byte, and its rows
    /// on disk are the journal's.
    Compared { seq: u64 },
    /// The checkpoint at this record was written by an older version in an older format
    /// (1: a full state, no rows on disk; 2: exact daily windows). Its own hash was checked,
    /// its state not compared:
    /// this version no longer writes that format. The replay still checked the whole chain
    /// and every invariant; the next open replays the journal once and writes the current
    /// format.
    OldFormat { seq: u64, version: u8 },
}

/// Walks stored records in order and checks the chain: consecutive seqs from 1, each record's
/// own hash, each record's `prev_hash`. Errors name the record.
pub(crate) struct ChainReader {
    records: Box<dyn Iterator<Item = StoredRecord> + Send>,
    expected_seq: u64,
    prev_hash: [u8; HASH_LEN],
    pub prev_time_ms: u64,
    /// Stop after this seq (a live ledger's durable head when the read started).
    until_seq: Option<u64>,
}

impl ChainReader {
    pub fn new(storage: &dyn Storage, until_seq: Option<u64>) -> Self {
        Self {
            records: storage.records(1),
            expected_seq: 1,
            prev_hash: [0u8; HASH_LEN],
            prev_time_ms: 0,
            until_seq,
        }
    }

    /// A reader that starts at record `from_seq` (> 1) instead of the first: record
    /// `from_seq - 1` is read and its own hash checked, to chain the next one to it. The chain
    /// before it is not walked again (a ledger checked it when it opened). Reads nothing until
    /// [`ChainReader::follow`].
    pub fn starting_at(storage: &dyn Storage, from_seq: u64) -> Result<Self, LedgerError> {
        let before = from_seq - 1;
        let missing = || Self::corrupt(before, "no such record: the tail cannot start after it");
        let (key_seq, bytes) = storage.records(before).next().ok_or_else(missing)??;
        if key_seq != before {
            return Err(missing());
        }
        let record = decode_record(&bytes).map_err(|e| Self::corrupt(before, e))?;
        if record.seq != before {
            return Err(Self::corrupt(
                before,
                format!("the record stored as {before} is record {}", record.seq),
            ));
        }
        Ok(Self {
            records: Box::new(std::iter::empty()),
            expected_seq: from_seq,
            prev_hash: record.hash,
            prev_time_ms: record.time_ms,
            // Not `Some(0)`, which marks a walk stopped by a broken chain.
            until_seq: Some(before),
        })
    }

    /// Reads every record after those read so far, to the end of the journal.
    pub fn read_to_end(&mut self, storage: &dyn Storage) {
        self.records = storage.records(self.expected_seq);
        self.until_seq = None;
    }

    /// Looks at the store again from the next expected record on, so records appended since
    /// the walk started are read too (the journal tail), and stops after `until_seq`.
    pub fn follow(&mut self, storage: &dyn Storage, until_seq: u64) {
        if self.until_seq == Some(0) && self.expected_seq > 1 {
            // Stopped by a broken chain: stays stopped.
            return;
        }
        self.records = storage.records(self.expected_seq);
        self.until_seq = Some(until_seq);
    }

    /// The head of what was read so far.
    pub fn head(&self) -> Head {
        Head {
            seq: self.expected_seq - 1,
            hash: self.prev_hash,
        }
    }

    fn corrupt(record: u64, reason: impl Into<String>) -> LedgerError {
        LedgerError::Corrupt {
            record,
            reason: reason.into(),
        }
    }
}

impl Iterator for ChainReader {
    type Item = Result<Record, LedgerError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.until_seq.is_some_and(|u| self.expected_seq > u) {
            return None;
        }
        let (key_seq, bytes) = match self.records.next()? {
            Ok(item) => item,
            Err(e) => return Some(Err(e.into())),
        };
        let expected = self.expected_seq;
        let result = (|| {
            if key_seq != expected {
                return Err(Self::corrupt(
                    expected,
                    format!(
                        "record {expected} is missing: the journal jumps from record {} to {key_seq} \
                         (dropped or reordered records)",
                        expected - 1
                    ),
                ));
            }
            let record = decode_record(&bytes).map_err(|e| Self::corrupt(expected, e))?;
            if record.seq != expected {
                return Err(Self::corrupt(
                    expected,
                    format!(
                        "the record stored as {expected} is record {} (records moved or reordered)",
                        record.seq
                    ),
                ));
            }
            if record.prev_hash != self.prev_hash {
                return Err(Self::corrupt(
                    expected,
                    format!(
                        "the chain is broken: record {expected} does not follow record {} \
                         (a record before it was replaced or removed)",
                        expected - 1
                    ),
                ));
            }
            if record.time_ms < self.prev_time_ms {
                return Err(Self::corrupt(expected, "time goes backwards"));
            }
            Ok(record)
        })();
        if let Ok(record) = &result {
            self.expected_seq += 1;
            self.prev_hash = record.hash;
            self.prev_time_ms = record.time_ms;
        } else {
            // One error ends the walk: nothing after a break in the chain can be trusted.
            self.until_seq = Some(0);
        }
        Some(result)
    }
}

/// The head anchor, if the backend keeps one.
fn read_anchor(storage: &dyn Storage) -> Result<Option<Head>, LedgerError> {
    match storage.anchor()? {
        Some(bytes) => Ok(Some(Head::decode(&bytes).map_err(|reason| {
            LedgerError::Corrupt {
                record: 0,
                reason: format!("head anchor: {reason}"),
            }
        })?)),
        None => Ok(None),
    }
}

fn anchor_mismatch(seq: u64) -> LedgerError {
    LedgerError::Corrupt {
        record: seq,
        reason: "the record differs from the one written (its hash does not match the head \
                 anchor)"
            .to_owned(),
    }
}

/// Applies every record `reader` yields to `state`, checking each against the anchor as it
/// passes, and (when `checkpoint` is given and its record is among them) that the state after
/// that record is the checkpoint's. Returns (entries applied, time of the last record).
fn apply_records(
    storage: &dyn Storage,
    reader: &mut ChainReader,
    state: &mut State,
    anchor: Option<Head>,
    checkpoint: Option<(Head, &[u8])>,
) -> Result<(u64, Option<u64>), LedgerError> {
    let mut events = 0u64;
    let mut last_time_ms = None;
    for record in reader.by_ref() {
        let record = record?;
        if anchor.is_some_and(|a| a.seq == record.seq && a.hash != record.hash) {
            return Err(anchor_mismatch(record.seq));
        }
        for (i, event) in record.events.iter().enumerate() {
            state
                .apply(event, record.time_ms)
                .map_err(|error| match error {
                    ApplyError::Storage(error) => LedgerError::Storage(error),
                    ApplyError::Broken(reason) => LedgerError::Corrupt {
                        record: record.seq,
                        reason: format!("entry {i}: {reason}"),
                    },
                })?;
        }
        events += record.events.len() as u64;
        last_time_ms = Some(record.time_ms);
        if let Some((head, bytes)) = checkpoint.filter(|(h, _)| h.seq == record.seq) {
            if head.hash != record.hash {
                return Err(LedgerError::Corrupt {
                    record: record.seq,
                    reason: format!(
                        "the checkpoint at record {} is not the replay of the journal up to it",
                        record.seq
                    ),
                });
            }
            if checkpoint_version(bytes) != Some(CHECKPOINT_VERSION) {
                // An older format (checked by `checkpoint_head`): its record's hash matched,
                // its state is not decoded by this version.
                continue;
            }
            let spilled = checkpoint_spilled(bytes);
            let expected = state.encode_checkpoint_at(
                Head {
                    seq: record.seq,
                    hash: record.hash,
                },
                record.time_ms,
                spilled,
            );
            let same = crate::ledger::state::checkpoint_state(&expected)
                == crate::ledger::state::checkpoint_state(bytes);
            if head.hash != record.hash || !same {
                return Err(LedgerError::Corrupt {
                    record: record.seq,
                    reason: format!(
                        "the checkpoint at record {} is not the replay of the journal up to it",
                        record.seq
                    ),
                });
            }
            // The transfers it leaves out are the rows on disk.
            state
                .check_rows(
                    storage,
                    spilled,
                    &crate::ledger::state::checkpoint_filters(bytes),
                )
                .map_err(|reason| LedgerError::Corrupt {
                    record: record.seq,
                    reason: format!("the checkpoint at record {}: {reason}", record.seq),
                })?;
        }
    }
    Ok((events, last_time_ms))
}

/// The checks after the last record: the anchor does not lead, the stored head names the last
/// record, and the walk reached `until_seq`.
fn check_end(
    storage: &dyn Storage,
    head: Head,
    anchor: Option<Head>,
    until_seq: Option<u64>,
    check_head: bool,
) -> Result<(), LedgerError> {
    if let Some(a) = anchor.filter(|a| a.seq > head.seq) {
        return Err(LedgerError::Corrupt {
            record: head.seq + 1,
            reason: format!(
                "the journal ends at record {} but record {} was written: records were lost \
                 (cut off, or dropped by sled after damage to its files)",
                head.seq, a.seq
            ),
        });
    }
    if check_head {
        check_stored_head(storage, head)?;
    }
    if let Some(until) = until_seq {
        if head.seq != until {
            return Err(LedgerError::Corrupt {
                record: head.seq + 1,
                reason: format!(
                    "the journal ends at record {} before record {until}",
                    head.seq
                ),
            });
        }
    }
    Ok(())
}

/// Replays the whole journal (or up to `until_seq`) into a fresh state, checks the head, and
/// returns the state. `check_head` is false when reading up to a live ledger's head. The
/// stored checkpoint, if any and within `until_seq`, must be the replay up to its record
/// (`verify` uses this; a torn or altered checkpoint fails it).
pub(crate) fn replay(
    storage: &dyn Storage,
    until_seq: Option<u64>,
    check_head: bool,
) -> Result<Replayed, LedgerError> {
    let mut state = State::new(Currencies::default());
    // A live ledger may have written past `until_seq` since: check the anchor only within.
    let anchor = read_anchor(storage)?.filter(|a| until_seq.is_none_or(|u| a.seq <= u));
    let checkpoint = storage.checkpoint()?;
    let checkpoint = match &checkpoint {
        Some(bytes) => {
            let cp = checkpoint_head(bytes).map_err(|reason| LedgerError::Corrupt {
                record: 0,
                reason: format!("checkpoint: {reason}"),
            })?;
            let version = checkpoint_version(bytes);
            if version != Some(CHECKPOINT_VERSION)
                && !version.is_some_and(|v| CHECKPOINT_VERSIONS_OLD.contains(&v))
            {
                return Err(LedgerError::Corrupt {
                    record: 0,
                    reason: format!(
                        "checkpoint: unknown format version {}",
                        version.map_or_else(|| "(none)".to_owned(), |v| v.to_string())
                    ),
                });
            }
            // A live ledger may write a newer checkpoint than the head this replay stops at.
            until_seq
                .is_none_or(|u| cp.seq <= u)
                .then_some((cp, bytes.as_slice()))
        }
        None => None,
    };
    let mut reader = ChainReader::new(storage, until_seq);
    let (events, last_time_ms) =
        apply_records(storage, &mut reader, &mut state, anchor, checkpoint)?;
    let head = reader.head();
    check_end(storage, head, anchor, until_seq, check_head)?;
    if let Some((cp, _)) = checkpoint.filter(|(cp, _)| cp.seq > head.seq) {
        return Err(LedgerError::Corrupt {
            record: head.seq + 1,
            reason: format!(
                "the journal ends at record {} but the checkpoint stands for record {}: \
                 records were lost",
                head.seq, cp.seq
            ),
        });
    }
    let checkpoint = match checkpoint {
        None => CheckpointCheck::None,
        Some((cp, bytes)) => match checkpoint_version(bytes) {
            Some(CHECKPOINT_VERSION) => CheckpointCheck::Compared { seq: cp.seq },
            version => CheckpointCheck::OldFormat {
                seq: cp.seq,
                version: version.expect("checked above"),
            },
        },
    };
    Ok(Replayed {
        state,
        head,
        last_time_ms: last_time_ms.unwrap_or(0),
        events,
        checkpoint,
    })
}

/// The format version of a checkpoint whose hash was checked ([`checkpoint_head`]).
fn checkpoint_version(bytes: &[u8]) -> Option<u8> {
    // magic (8) | version (1)
    bytes.get(8).copied()
}

/// The spill point of a checkpoint whose hash was checked ([`checkpoint_head`]).
fn checkpoint_spilled(bytes: &[u8]) -> u32 {
    // magic (8) | version (1) | seq (8) | hash (32) | time_ms (8) | spilled (4)
    bytes
        .get(57..61)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// The record a checkpoint stands for, after checking the checkpoint's own hash.
fn checkpoint_head(bytes: &[u8]) -> Result<Head, String> {
    // Decoding the whole state only to read its header would double verify's memory; the
    // header is fixed-size and the hash covers it.
    let body_len = bytes
        .len()
        .checked_sub(HASH_LEN)
        .ok_or("checkpoint is too short")?;
    if blake3::hash(&bytes[..body_len]).as_bytes() != &bytes[body_len..] {
        return Err("checkpoint hash does not match its content (torn or altered)".into());
    }
    // magic (8) | version (1) | seq (8) | hash (32)
    let header = bytes.get(..49).ok_or("checkpoint is too short")?;
    let mut hash = [0u8; HASH_LEN];
    hash.copy_from_slice(&header[17..49]);
    Ok(Head {
        seq: u64::from_le_bytes(header[9..17].try_into().expect("8 bytes")),
        hash,
    })
}

/// How opening the ledger got its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Start {
    /// From the checkpoint at this record, then the records after it.
    Checkpoint { seq: u64 },
    /// From record 1: no checkpoint was stored.
    FullReplay,
    /// From record 1 because the checkpoint could not be used (the reason).
    FellBack { reason: String },
    /// From record 1 because the checkpoint, at this record, is in the format an older
    /// version wrote (an upgrade, not damage).
    OldFormat { seq: u64 },
}

/// The state for opening the ledger: from the stored checkpoint and the records after it
/// when there is a usable one, from the whole journal otherwise. A checkpoint that is torn,
/// altered, or does not fit the journal (its record is missing or has another hash, or the
/// records after it do not apply) is not trusted: the whole journal is replayed instead, and
/// the reason returned for the caller to log and count. The full replay is the authority; if
/// the journal itself is broken, it fails as it would without a checkpoint.
pub(crate) fn replay_for_open(
    storage_arc: &std::sync::Arc<dyn Storage>,
) -> Result<(Replayed, Start), LedgerError> {
    let storage = storage_arc.as_ref();
    let Some(bytes) = storage.checkpoint()? else {
        return Ok((replay(storage, None, true)?, Start::FullReplay));
    };
    if let Ok(cp) = checkpoint_head(&bytes) {
        if checkpoint_version(&bytes).is_some_and(|v| CHECKPOINT_VERSIONS_OLD.contains(&v)) {
            // `replay` checks its record's hash and that the journal reaches it.
            return Ok((
                replay(storage, None, true)?,
                Start::OldFormat { seq: cp.seq },
            ));
        }
    }
    match replay_after_checkpoint(storage_arc, &bytes) {
        Ok((replayed, seq)) => Ok((replayed, Start::Checkpoint { seq })),
        Err(LedgerError::Corrupt { record, reason }) => {
            let reason = format!("at record {record}: {reason}");
            let replayed = replay_without_checkpoint(storage)?;
            // A whole checkpoint of a record the journal no longer has: acknowledged records
            // were lost (the store dropped its end, with its head), which no fallback may hide.
            if let Ok(cp) = checkpoint_head(&bytes) {
                if cp.seq > replayed.head.seq {
                    return Err(LedgerError::Corrupt {
                        record: replayed.head.seq + 1,
                        reason: format!(
                            "the journal ends at record {} but the checkpoint stands for \
                             record {}: records were lost",
                            replayed.head.seq, cp.seq
                        ),
                    });
                }
            }
            Ok((replayed, Start::FellBack { reason }))
        }
        Err(other) => Err(other),
    }
}

/// [`replay`] of the whole journal, ignoring the checkpoint (which is known to be bad).
fn replay_without_checkpoint(storage: &dyn Storage) -> Result<Replayed, LedgerError> {
    let mut state = State::new(Currencies::default());
    let anchor = read_anchor(storage)?;
    let mut reader = ChainReader::new(storage, None);
    let (events, last_time_ms) = apply_records(storage, &mut reader, &mut state, anchor, None)?;
    let head = reader.head();
    check_end(storage, head, anchor, None, true)?;
    Ok(Replayed {
        state,
        head,
        last_time_ms: last_time_ms.unwrap_or(0),
        events,
        checkpoint: CheckpointCheck::None,
    })
}

/// The checkpoint's state, then the records after it (chained to the checkpoint's record).
fn replay_after_checkpoint(
    storage_arc: &std::sync::Arc<dyn Storage>,
    bytes: &[u8],
) -> Result<(Replayed, u64), LedgerError> {
    let storage = storage_arc.as_ref();
    let corrupt = |record: u64, reason: String| LedgerError::Corrupt { record, reason };
    let checkpoint =
        State::decode_checkpoint(bytes).map_err(|e| corrupt(0, format!("checkpoint: {e}")))?;
    let cp = checkpoint.head;
    if cp.seq == 0 {
        return Err(corrupt(0, "checkpoint of an empty journal".into()));
    }
    let mut state = checkpoint.state;
    // The transfers it leaves out are rows, read as the records after it need them.
    state.attach_rows(storage_arc);
    // Reads record `cp.seq` and checks its own hash; later records chain to it.
    let mut reader = ChainReader::starting_at(storage, cp.seq + 1)?;
    if reader.head() != cp {
        return Err(corrupt(
            cp.seq,
            "the checkpoint does not stand for the journal's record (another hash)".into(),
        ));
    }
    if reader.prev_time_ms != checkpoint.time_ms {
        return Err(corrupt(cp.seq, "the checkpoint has another time".into()));
    }
    let anchor = read_anchor(storage)?;
    if let Some(a) = anchor.filter(|a| a.seq <= cp.seq && a.seq > 0) {
        // Passed before the checkpoint: look at that one record.
        let (key_seq, record) = storage
            .records(a.seq)
            .next()
            .ok_or_else(|| corrupt(a.seq, "the anchor's record is missing".into()))??;
        let record = decode_record(&record).map_err(|e| corrupt(a.seq, e))?;
        if key_seq != a.seq || record.seq != a.seq || record.hash != a.hash {
            return Err(anchor_mismatch(a.seq));
        }
    }
    reader.read_to_end(storage);
    let (events, last_time_ms) = apply_records(storage, &mut reader, &mut state, anchor, None)?;
    let head = reader.head();
    check_end(storage, head, anchor, None, true)?;
    Ok((
        Replayed {
            state,
            head,
            last_time_ms: last_time_ms.unwrap_or(checkpoint.time_ms),
            events,
            // Started from it: what it holds was not compared with a replay.
            checkpoint: CheckpointCheck::None,
        },
        cp.seq,
    ))
}

/// The stored head must name the last record: otherwise records were cut off the end.
fn check_stored_head(storage: &dyn Storage, head: Head) -> Result<(), LedgerError> {
    let stored = storage.head()?;
    match stored {
        None if head.seq == 0 => Ok(()),
        None => Err(LedgerError::Corrupt {
            record: head.seq,
            reason: "the journal has records but no head".to_owned(),
        }),
        Some(bytes) => {
            let stored = Head::decode(&bytes).map_err(|reason| LedgerError::Corrupt {
                record: head.seq,
                reason: format!("head: {reason}"),
            })?;
            if stored.seq != head.seq {
                return Err(LedgerError::Corrupt {
                    record: head.seq + 1,
                    reason: format!(
                        "the journal ends at record {} but its head says {} \
                         (records cut off the end)",
                        head.seq, stored.seq
                    ),
                });
            }
            if stored.hash != head.hash {
                return Err(LedgerError::Corrupt {
                    record: head.seq,
                    reason: "the last record is not the one the head names (replaced)".to_owned(),
                });
            }
            Ok(())
        }
    }
}

/// One journal entry as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedEntry {
    /// The record (committed batch) it belongs to.
    pub record_seq: u64,
    /// Ledger time of that batch.
    pub time_ms: u64,
    /// What happened.
    pub entry: JournalEntry,
}

/// A state change, with accounts named rather than indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalEntry {
    /// A currency was defined with its decimal places.
    CurrencyDefined {
        /// Code.
        code: CurrencyCode,
        /// Decimal places.
        exponent: u32,
    },
    /// An account was used for the first time.
    AccountOpened {
        /// The account.
        account: AccountId,
    },
    /// A transfer was created.
    TransferCreated {
        /// Id.
        id: TransferId,
        /// Kind.
        kind: TransferKind,
        /// Debit account.
        debit: AccountId,
        /// Credit account.
        credit: AccountId,
        /// Amount (reserved, if pending), minor units.
        amount_minor: u128,
        /// Caller's memo.
        memo: Vec<u8>,
    },
    /// A pending transfer was posted.
    PendingPosted {
        /// The pending transfer.
        id: TransferId,
        /// Amount posted, minor units.
        amount_minor: u128,
    },
    /// A pending transfer was voided.
    PendingVoided {
        /// The pending transfer.
        id: TransferId,
    },
    /// A pending transfer expired.
    PendingExpired {
        /// The pending transfer.
        id: TransferId,
    },
    /// A create or refund failed transiently; its id is spent.
    TransferFailed {
        /// Id.
        id: TransferId,
        /// Why.
        error: TransferError,
    },
    /// An account was frozen or unfrozen (`None`).
    AccountFrozen {
        /// The account.
        account: AccountId,
        /// New mode.
        mode: Option<FreezeMode>,
    },
}

/// A streamed, chain-checked walk over the journal; see [`super::Ledger::export`].
pub struct JournalExport {
    reader: ChainReader,
    accounts: Vec<AccountId>,
    /// Accounts already in `accounts` (a tail started past record 1) whose opening may still
    /// be read: they keep their index rather than being added again.
    preloaded: std::collections::HashSet<AccountId>,
    current: std::vec::IntoIter<Event>,
    current_seq: u64,
    current_time_ms: u64,
    failed: bool,
}

impl JournalExport {
    pub(crate) fn new(storage: &dyn Storage, until_seq: Option<u64>) -> Self {
        Self {
            reader: ChainReader::new(storage, until_seq),
            accounts: Vec::new(),
            preloaded: std::collections::HashSet::new(),
            current: Vec::new().into_iter(),
            current_seq: 0,
            current_time_ms: 0,
            failed: false,
        }
    }

    fn account(&self, idx: u32) -> Result<AccountId, LedgerError> {
        self.accounts
            .get(idx as usize)
            .cloned()
            .ok_or_else(|| LedgerError::Corrupt {
                record: self.current_seq,
                reason: format!("entry names unknown account {idx}"),
            })
    }

    fn convert(&mut self, event: Event) -> Result<JournalEntry, LedgerError> {
        Ok(match event {
            Event::CurrencyDefined { code, exponent } => {
                JournalEntry::CurrencyDefined { code, exponent }
            }
            Event::AccountOpened { account } => {
                if !self.preloaded.remove(&account) {
                    self.accounts.push(account.clone());
                }
                JournalEntry::AccountOpened { account }
            }
            Event::TransferCreated {
                id,
                kind,
                debit,
                credit,
                amount_minor,
                memo,
                // Not exported yet: `Ledger::transfer(id).refund_of` names it.
                refund_of: _,
                // Not exported yet: `Ledger::transfer(id).reference` has it.
                reference: _,
            } => JournalEntry::TransferCreated {
                id,
                kind,
                debit: self.account(debit)?,
                credit: self.account(credit)?,
                amount_minor,
                memo,
            },
            Event::PendingPosted { id, amount_minor } => {
                JournalEntry::PendingPosted { id, amount_minor }
            }
            Event::PendingVoided { id } => JournalEntry::PendingVoided { id },
            Event::PendingExpired { id } => JournalEntry::PendingExpired { id },
            Event::TransferFailed { id, error, .. } => JournalEntry::TransferFailed { id, error },
            Event::AccountFrozen { account, mode } => JournalEntry::AccountFrozen {
                account: self.account(account)?,
                mode,
            },
        })
    }
}

/// Follows the journal as it grows: every entry once, in order, with accounts named. The
/// payment layer's outbox reads state changes through it. See [`super::Ledger::tail`].
pub struct JournalTail {
    storage: std::sync::Arc<dyn Storage>,
    export: JournalExport,
}

impl JournalTail {
    pub(crate) fn new(storage: std::sync::Arc<dyn Storage>) -> Self {
        let export = JournalExport::new(storage.as_ref(), Some(0));
        Self { storage, export }
    }

    /// A tail whose first entries are those of record `from_seq`. `accounts` are the ledger's
    /// accounts in opening order, as of a head at or after `from_seq - 1` (the records skipped
    /// name accounts by index, so the tail needs the table they built).
    pub(crate) fn starting_at(
        storage: std::sync::Arc<dyn Storage>,
        from_seq: u64,
        accounts: Vec<AccountId>,
    ) -> Result<Self, LedgerError> {
        if from_seq <= 1 {
            return Ok(Self::new(storage));
        }
        let mut export = JournalExport::new(storage.as_ref(), Some(0));
        export.reader = ChainReader::starting_at(storage.as_ref(), from_seq)?;
        export.current_seq = from_seq - 1;
        export.preloaded = accounts.iter().cloned().collect();
        export.accounts = accounts;
        Ok(Self { storage, export })
    }

    /// The next entries of records up to `until_seq` (a durable seq from
    /// [`super::Ledger::durable_seq`]), at most `entries_max`; empty when caught up.
    pub fn read_until(
        &mut self,
        until_seq: u64,
        entries_max: usize,
    ) -> Result<Vec<ExportedEntry>, LedgerError> {
        if self.export.failed {
            return Err(LedgerError::Corrupt {
                record: self.export.current_seq,
                reason: "the journal tail stopped at a broken record".to_owned(),
            });
        }
        self.export.reader.follow(self.storage.as_ref(), until_seq);
        let mut out = Vec::new();
        while out.len() < entries_max {
            match self.export.next() {
                Some(entry) => out.push(entry?),
                None => break,
            }
        }
        Ok(out)
    }
}

impl Iterator for JournalExport {
    type Item = Result<ExportedEntry, LedgerError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(event) = self.current.next() {
                let result = self.convert(event).map(|entry| ExportedEntry {
                    record_seq: self.current_seq,
                    time_ms: self.current_time_ms,
                    entry,
                });
                self.failed = result.is_err();
                return Some(result);
            }
            match self.reader.next()? {
                Ok(record) => {
                    self.current_seq = record.seq;
                    self.current_time_ms = record.time_ms;
                    self.current = record.events.into_iter();
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use parking_lot::Mutex;

    use super::*;
    use crate::ledger::codec::encode_record;
    use crate::ledger::storage::StorageError;

    /// A second [`Storage`] backend, in memory: the ledger's replay needs nothing else.
    #[derive(Default)]
    struct MemStorage {
        records: Mutex<BTreeMap<u64, Vec<u8>>>,
        head: Mutex<Option<Vec<u8>>>,
    }

    impl Storage for MemStorage {
        fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError> {
            self.records.lock().insert(seq, record.to_vec());
            *self.head.lock() = Some(head.to_vec());
            Ok(())
        }

        fn head(&self) -> Result<Option<Vec<u8>>, StorageError> {
            Ok(self.head.lock().clone())
        }

        fn records(&self, from_seq: u64) -> Box<dyn Iterator<Item = StoredRecord> + Send> {
            let items: Vec<StoredRecord> = self
                .records
                .lock()
                .range(from_seq..)
                .map(|(k, v)| Ok((*k, v.clone())))
                .collect();
            Box::new(items.into_iter())
        }
    }

    fn eur() -> CurrencyCode {
        CurrencyCode::new("EUR").unwrap()
    }

    /// Record 1 defines EUR and opens two accounts; records 2..=4 each move money.
    fn journal() -> (MemStorage, Vec<Vec<Event>>) {
        let account = |owner| AccountId {
            owner,
            currency: eur(),
        };
        let mut batches = vec![vec![
            Event::CurrencyDefined {
                code: eur(),
                exponent: 2,
            },
            Event::AccountOpened {
                account: account(crate::ledger::Owner::Issuer),
            },
            Event::AccountOpened {
                account: account(crate::ledger::Owner::user("alice")),
            },
        ]];
        for id in 1..=3u128 {
            batches.push(vec![
                Event::TransferCreated {
                    id: TransferId(id * 10),
                    kind: TransferKind::Single,
                    debit: 0,
                    credit: 1,
                    amount_minor: 100,
                    memo: vec![],
                    refund_of: None,
                    reference: 0,
                },
                Event::TransferCreated {
                    id: TransferId(id * 10 + 1),
                    kind: TransferKind::Single,
                    debit: 1,
                    credit: 0,
                    amount_minor: 40,
                    memo: vec![],
                    refund_of: None,
                    reference: 0,
                },
            ]);
        }
        let storage = MemStorage::default();
        let mut prev = [0u8; HASH_LEN];
        for (i, events) in batches.iter().enumerate() {
            let seq = i as u64 + 1;
            let (bytes, hash) = encode_record(seq, &prev, 1_000 + seq, events);
            storage
                .append(seq, &bytes, &Head { seq, hash }.encode())
                .unwrap();
            prev = hash;
        }
        (storage, batches)
    }

    #[test]
    fn replays_a_clean_journal_from_any_backend() {
        let (storage, _) = journal();
        let replayed = replay(&storage, None, true).unwrap();
        assert_eq!(replayed.head.seq, 4);
        assert_eq!(replayed.events, 9);
        assert_eq!(replayed.state.transfer_count(), 6);
        replayed.state.check_invariants().unwrap();
        let exported: Vec<_> = JournalExport::new(&storage, None)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(exported.len(), 9);
        assert!(matches!(
            &exported[3].entry,
            JournalEntry::TransferCreated { credit, .. } if credit.owner == crate::ledger::Owner::user("alice")
        ));
    }

    #[test]
    fn an_entry_dropped_with_a_recomputed_hash_breaks_the_chain_at_the_next_record() {
        let (storage, batches) = journal();
        // Rewrite record 2 without its second entry, with a valid hash of its own.
        let record2 = decode_record(&storage.records.lock()[&2]).unwrap();
        let (forged, _) = encode_record(2, &record2.prev_hash, record2.time_ms, &batches[1][..1]);
        storage.records.lock().insert(2, forged);
        match replay(&storage, None, true) {
            Err(LedgerError::Corrupt { record: 3, reason }) => {
                assert!(reason.contains("chain is broken"), "{reason}")
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("a dropped entry went unnoticed"),
        }
    }

    #[test]
    fn an_entry_that_breaks_a_rule_is_reported_with_its_place() {
        let (storage, batches) = journal();
        // A consistent chain whose last record lets alice overdraw: only replay can tell.
        let mut events = batches[3].clone();
        if let Event::TransferCreated { amount_minor, .. } = &mut events[1] {
            *amount_minor = 1_000;
        }
        let record3 = decode_record(&storage.records.lock()[&3]).unwrap();
        let (bytes, hash) = encode_record(4, &record3.hash, 2_000, &events);
        storage
            .append(4, &bytes, &Head { seq: 4, hash }.encode())
            .unwrap();
        match replay(&storage, None, true) {
            Err(LedgerError::Corrupt { record: 4, reason }) => {
                assert!(
                    reason.contains("entry 1") && reason.contains("overdrawn"),
                    "{reason}"
                )
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("an overdraft in the journal went unnoticed"),
        }
    }
}
