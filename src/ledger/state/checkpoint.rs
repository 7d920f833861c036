//! Checkpoints: the whole [`State`] as of one journal record, so that opening the ledger
//! replays only the records after it instead of the whole journal.
//!
//! Format (integers little-endian, `v` = LEB128 varint):
//! ```text
//! magic "mxpay-cp" | version u8 = 5 | seq u64 | record hash [32] | time_ms u64 |
//! spilled u32 | state... | hash [32]
//! hash = blake3(all bytes before it)
//! ```
//! `seq` and `record hash` name the journal record the state is the replay of (up to and
//! including it), and `time_ms` is that record's time. The ended transfers below `spilled`
//! are not in it: their rows, and the history lists of their accounts, were written to the
//! storage before it (`State::spill`). The state is written in a fixed order (accounts with
//! their daily windows, the held transfers in index order, failures in the order they were
//! recorded, totals, refunds sorted), so the same state always gives the same
//! bytes: `verify` replays the journal to the checkpoint's record and compares bytes. What
//! can be derived from what it holds (the id and account indexes, the deadline index, the
//! reservations of pending refunds, the accounts' history entries of the held transfers) is
//! rebuilt on decode, not stored.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::ledger::state::HashMap;

use super::rows::{IdFilter, SpillPart};
use super::window::Window;
use super::{
    Account, FailedRec, Fingerprint, State, Totals, TransferIdx, TransferRec, FAILURES_KEPT_MAX,
};
use crate::ledger::amount::{Currencies, CurrencyCode};
use crate::ledger::codec::{
    put_account, put_bytes, put_freeze, put_kind, put_kind_linked, put_varint, Head, Reader,
    HASH_LEN,
};
use crate::ledger::model::{Balances, TransferError, TransferId, TransferKind, TransferState};
use crate::ledger::storage::{RowEntry, Storage, StorageError, TransferRows};

const MAGIC: &[u8; 8] = b"mxpay-cp";
/// 6: id filters of 32 bits per id whose bits for an id all lie in one 64-byte block (a
/// version 5 filter read as version 6 could say "not on disk" for an id that is); 5: no
/// account histories (those of the transfers on disk are lists beside their rows,
/// the others are rebuilt from the held transfers); 4: id filters of 24 bits and 10 probes
/// per id (a filter's probes differ from version 3's, so a version 3 filter read as
/// version 4 could say "not on disk" for an id that is); 3: daily windows by minute,
/// recorded failures with their time (issue 15, memory flat in history); 2 held each debit
/// of the last 24 h; 1 held every transfer.
pub(crate) const VERSION: u8 = 6;
/// The format written before issue 15: the whole state, every transfer included.
pub(crate) const VERSION_FULL_STATE: u8 = 1;
/// The format with exact daily windows (a debit of the last 24 h each).
pub(crate) const VERSION_EXACT_WINDOWS: u8 = 2;
/// The format with id filters of 10 bits and 7 probes per id.
pub(crate) const VERSION_SPARSE_FILTERS: u8 = 3;
/// The format with every account's whole history. Its rows on disk (segments of version 1)
/// have no history lists: the full replay after it and the first spill, which writes every
/// ended transfer again with its lists, make the history whole on disk again.
pub(crate) const VERSION_HISTORIES: u8 = 4;
/// The format with id filters whose 10 probes an id spreads over the whole filter.
pub(crate) const VERSION_SCATTERED_FILTERS: u8 = 5;
/// Formats written by earlier versions and no longer decoded: open replays the whole journal
/// instead (and writes the current format soon after); `verify` reports them as old format,
/// not compared.
pub(crate) const VERSIONS_OLD: [u8; 5] = [
    VERSION_FULL_STATE,
    VERSION_EXACT_WINDOWS,
    VERSION_SPARSE_FILTERS,
    VERSION_HISTORIES,
    VERSION_SCATTERED_FILTERS,
];

/// A decoded checkpoint: the state and the journal record it stands for.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    pub state: State,
    /// The record the state includes, last.
    pub head: Head,
    /// That record's ledger time.
    pub time_ms: u64,
}

fn put_u128_opt(out: &mut Vec<u8>, v: Option<u128>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn put_transfer_state(out: &mut Vec<u8>, state: TransferState) {
    match state {
        TransferState::Pending => out.push(0),
        TransferState::Posted { amount_minor } => {
            out.push(1);
            put_varint(out, amount_minor);
        }
        TransferState::Voided => out.push(2),
        TransferState::Expired => out.push(3),
    }
}

fn put_balances(out: &mut Vec<u8>, b: &Balances) {
    put_varint(out, b.debits_pending_minor);
    put_varint(out, b.debits_posted_minor);
    put_varint(out, b.credits_pending_minor);
    put_varint(out, b.credits_posted_minor);
}

/// Reads a row written by [`State::put_row`]: the transfer and, for a pending refund, the id
/// of the transfer it refunds.
pub(super) fn read_row(r: &mut Reader<'_>) -> Result<(TransferRec, Option<TransferId>), String> {
    let opt = |r: &mut Reader<'_>| -> Result<Option<u128>, String> {
        match r.u8()? {
            0 => Ok(None),
            1 => Ok(Some(u128::from_le_bytes(r.array()?))),
            tag => Err(format!("unknown option tag {tag}")),
        }
    };
    let id = r.id()?;
    let kind = r.kind()?;
    // See `put_row_of`: the link's tag also says whether a reference follows.
    let tag = r.u8()?;
    let link = match tag {
        0 | 2 => None,
        1 | 3 => Some(TransferId(u128::from_le_bytes(r.array()?))),
        tag => return Err(format!("unknown link tag {tag}")),
    };
    let reference = match tag {
        2 | 3 => match u128::from_le_bytes(r.array()?) {
            0 => return Err("a reference of 0 written as a reference".to_owned()),
            reference => reference,
        },
        _ => 0,
    };
    let debit = r.varint_u32()?;
    let credit = r.varint_u32()?;
    let amount_minor = r.varint()?;
    let state = match r.u8()? {
        0 => TransferState::Pending,
        1 => TransferState::Posted {
            amount_minor: r.varint()?,
        },
        2 => TransferState::Voided,
        3 => TransferState::Expired,
        tag => return Err(format!("unknown transfer state {tag}")),
    };
    let memo = r.bytes()?.into_boxed_slice();
    let created_ms = u64::try_from(r.varint()?).map_err(|_| "created_ms out of range")?;
    let ended_ms = opt(r)?
        .map(|v| u64::try_from(v).map_err(|_| "ended_ms out of range"))
        .transpose()?;
    let record = TransferRec {
        id,
        kind,
        debit,
        credit,
        amount_minor,
        state,
        memo,
        created_ms,
        ended_ms,
        reference,
    };
    Ok((record, link))
}

/// Appends the row of transfer `t` (see [`State::put_row`]); `link` is the id of the
/// transfer it refunds if it is a pending refund.
fn put_row_of(out: &mut Vec<u8>, t: &TransferRec, link: Option<u128>) {
    out.extend_from_slice(&t.id.0.to_le_bytes());
    put_kind(out, &t.kind);
    // The link's option tag also says whether a reference follows (2: reference only, 3:
    // link then reference), so a row without a reference is written as before references
    // existed, byte for byte, and older rows and checkpoints still read.
    match (link, t.reference) {
        (link, 0) => put_u128_opt(out, link),
        (None, reference) => {
            out.push(2);
            out.extend_from_slice(&reference.to_le_bytes());
        }
        (Some(link), reference) => {
            out.push(3);
            out.extend_from_slice(&link.to_le_bytes());
            out.extend_from_slice(&reference.to_le_bytes());
        }
    }
    put_varint(out, u128::from(t.debit));
    put_varint(out, u128::from(t.credit));
    put_varint(out, t.amount_minor);
    put_transfer_state(out, t.state);
    put_bytes(out, &t.memo);
    put_varint(out, u128::from(t.created_ms));
    put_u128_opt(out, t.ended_ms.map(u128::from));
}

/// Appends the id filters, their length and the hash to the state part of a checkpoint
/// ([`State::encode_checkpoint_state`]).
fn finish_checkpoint(out: &mut Vec<u8>, filters: &[Arc<IdFilter>]) {
    // Last, with its length: what this ledger happens to have spilled when, which a replay
    // cannot know; `verify` compares what comes before it and checks the filters hold every
    // id on disk.
    let filters_start = out.len();
    put_varint(out, filters.len() as u128);
    for f in filters {
        f.encode(out);
    }
    let filters_len = (out.len() - filters_start) as u64;
    out.extend_from_slice(&filters_len.to_le_bytes());
    let hash = *blake3::hash(out).as_bytes();
    out.extend_from_slice(&hash);
}

/// What a row takes besides its memo, about (a posted transfer between accounts opened
/// early: 45-60 bytes), to size a spill's buffer of rows once.
const ROW_BYTES_BESIDE_MEMO: usize = 64;

/// An iterator that says its length, which it is told (what [`IdFilter::of`] takes).
struct Counted<I> {
    inner: I,
    left: usize,
}

impl<I> Counted<I> {
    fn new(inner: I, len: usize) -> Self {
        Self { inner, left: len }
    }
}

impl<I: Iterator> Iterator for Counted<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let item = self.inner.next()?;
        self.left = self.left.saturating_sub(1);
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<I: Iterator> ExactSizeIterator for Counted<I> {}

/// A checkpoint the writer prepared (`State::begin_checkpoint`) for the checkpoint thread:
/// the rows of the transfers that ended since the last spill, still to be encoded and
/// written, and the checkpoint that relies on them, still to be finished and written after
/// them.
pub(crate) struct CheckpointJob {
    /// The spilled transfers not on disk yet (this spill's, and those of earlier spills whose
    /// write failed).
    parts: Vec<Arc<SpillPart>>,
    /// The checkpoint up to its id filters ([`State::encode_checkpoint_state`]).
    state_bytes: Vec<u8>,
    /// The filters of the rows already on disk.
    filters: Vec<Arc<IdFilter>>,
}

/// What became of a [`CheckpointJob`].
pub(crate) enum CheckpointOutcome {
    /// The rows are durable (their filter, `None` if there were none) and so is the
    /// checkpoint.
    Written(Option<Arc<IdFilter>>),
    /// The rows are durable, the checkpoint is not.
    CheckpointFailed(Option<Arc<IdFilter>>, StorageError),
    /// The rows are not (known to be) durable: neither is the checkpoint, never written.
    RowsFailed(StorageError),
}

impl CheckpointJob {
    /// Encodes and writes the rows (durable on return), then the checkpoint: a power cut
    /// never leaves a checkpoint that names rows not on disk. Runs on the checkpoint thread,
    /// or on the writer's for a synchronous checkpoint.
    pub fn run(self, storage: &dyn Storage) -> CheckpointOutcome {
        let (count, memo_bytes) = self
            .parts
            .iter()
            .flat_map(|part| part.ended())
            .fold((0, 0), |(count, memo_bytes), (_, t)| {
                (count + 1, memo_bytes + t.memo.len())
            });
        // The id filter is built first: it lives on, and allocated after the rows (when
        // they are few enough to come from glibc's heap rather than a mapping of their own)
        // it would sit above them and keep the heap from shrinking once they are freed.
        let ids = self
            .parts
            .iter()
            .flat_map(|part| part.ended().map(|(_, t)| t.id));
        let filter = (count > 0).then(|| Arc::new(IdFilter::of(Counted::new(ids, count))));
        // One buffer for all the rows' bytes, sized once (see `TransferRows`).
        let mut rows =
            TransferRows::with_capacity(count, count * ROW_BYTES_BESIDE_MEMO + memo_bytes);
        for part in &self.parts {
            for (idx, t) in part.ended() {
                let link = part.links.get(&idx).copied();
                rows.push_with(idx, t.id.0, [t.debit, t.credit], t.reference, |out| {
                    put_row_of(out, t, link);
                });
            }
        }
        if !rows.is_empty() {
            if let Err(error) = storage.put_transfer_rows(&rows) {
                return CheckpointOutcome::RowsFailed(error);
            }
        }
        drop(rows);
        let mut bytes = self.state_bytes;
        let mut filters = self.filters;
        filters.extend(filter.clone());
        finish_checkpoint(&mut bytes, &filters);
        match storage.put_checkpoint(&bytes) {
            Ok(()) => CheckpointOutcome::Written(filter),
            Err(error) => CheckpointOutcome::CheckpointFailed(filter, error),
        }
    }
}

/// The part of a checkpoint a replay reproduces: everything before the id filters.
pub(crate) fn checkpoint_state(bytes: &[u8]) -> &[u8] {
    let end = bytes.len().saturating_sub(HASH_LEN + 8);
    let filters_len = bytes
        .get(end..end + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    &bytes[..end.saturating_sub(usize::try_from(filters_len).unwrap_or(usize::MAX))]
}

/// The id filters of a checkpoint whose hash was checked (empty if they do not decode: the
/// comparison of the state fails first).
pub(crate) fn checkpoint_filters(bytes: &[u8]) -> Vec<IdFilter> {
    let start = checkpoint_state(bytes).len();
    let mut r = Reader { bytes, pos: start };
    let Ok(n) = r.varint() else { return Vec::new() };
    (0..n)
        .map_while(|_| IdFilter::decode(&mut r).ok())
        .collect()
}

impl State {
    /// Appends the row of transfer `idx`: everything the transfer is, except what its refunds
    /// did to it (kept beside it, see `State::refunded`). So the row of a transfer that has
    /// ended never changes: it can be written once, out of memory. The checkpoint holds the
    /// same bytes for each transfer, followed by what was refunded of it.
    pub fn put_row(&self, out: &mut Vec<u8>, idx: TransferIdx) {
        let t = self.transfers.get(idx);
        let link = self.pending_refund_of.get(&idx);
        put_row_of(out, &t, link.map(|&o| self.transfers.get(o).id.0));
    }

    /// The row of transfer `id` (see [`State::put_row`]) with its index, if it exists.
    #[cfg(test)]
    pub fn row(&self, id: TransferId) -> Option<(TransferIdx, Vec<u8>)> {
        let idx = self.transfers.idx_of(id)?;
        let mut out = Vec::new();
        self.put_row(&mut out, idx);
        Some((idx, out))
    }

    /// The checkpoint of this state, the replay of the journal up to record `head` (at
    /// ledger time `time_ms`), with the transfers below its spill point on disk.
    #[cfg(test)]
    pub fn encode_checkpoint(&self, head: Head, time_ms: u64) -> Vec<u8> {
        self.encode_checkpoint_at(head, time_ms, self.transfers.spilled)
    }

    /// The checkpoint as if the ended transfers below `spilled` were rows on disk: it holds
    /// the transfers from `spilled` on and the pending ones below it. A state and the full
    /// replay of its journal give the same bytes for the same `spilled`, whatever each holds
    /// in memory, which is what `verify` compares.
    pub fn encode_checkpoint_at(&self, head: Head, time_ms: u64, spilled: TransferIdx) -> Vec<u8> {
        let mut out = self.encode_checkpoint_state(head, time_ms, spilled);
        finish_checkpoint(&mut out, &self.transfers.filters);
        out
    }

    /// [`State::encode_checkpoint_at`] up to the id filters (see `finish_checkpoint`).
    fn encode_checkpoint_state(&self, head: Head, time_ms: u64, spilled: TransferIdx) -> Vec<u8> {
        let len = self.transfers.len() as TransferIdx;
        let mut out = Vec::with_capacity(64 + (len - spilled.min(len)) as usize * 48);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&head.seq.to_le_bytes());
        out.extend_from_slice(&head.hash);
        out.extend_from_slice(&time_ms.to_le_bytes());
        out.extend_from_slice(&spilled.to_le_bytes());
        let currencies: Vec<_> = self.currencies.iter().collect();
        put_varint(&mut out, currencies.len() as u128);
        for c in currencies {
            out.extend_from_slice(&c.code.bytes());
            put_varint(&mut out, u128::from(c.exponent));
        }
        put_varint(&mut out, self.accounts.len() as u128);
        for a in &self.accounts {
            put_account(&mut out, &a.id);
            put_balances(&mut out, &a.balances);
            put_freeze(&mut out, a.frozen);
            // The minutes still in the window at the record's time, whatever was pruned
            // when: the first minute, then each as the distance from the one before.
            let buckets = a.window.buckets_at(time_ms);
            put_varint(&mut out, buckets.clone().count() as u128);
            let mut prev = 0;
            for (minute, counted_minor) in buckets {
                put_varint(&mut out, u128::from(minute - prev));
                put_varint(&mut out, counted_minor);
                prev = minute;
            }
            // No history: that of the rows on disk is in lists beside them, that of the held
            // transfers is rebuilt from them (O(state) to encode, not O(history)).
        }
        put_varint(&mut out, u128::from(len));
        let mut held: Vec<TransferIdx> = self
            .deadlines
            .iter()
            .map(|&(_, idx)| idx)
            .filter(|&idx| idx < spilled)
            .collect();
        held.sort_unstable();
        held.extend(spilled..len);
        put_varint(&mut out, held.len() as u128);
        for idx in held {
            put_varint(&mut out, u128::from(idx));
            self.put_row(&mut out, idx);
        }
        // In the order they were recorded (the order they are forgotten in), with their time.
        put_varint(&mut out, self.failed_order.len() as u128);
        for (failed_ms, id) in &self.failed_order {
            let f = &self.failed[id];
            let p = &f.fingerprint;
            out.extend_from_slice(&id.0.to_le_bytes());
            put_varint(&mut out, u128::from(*failed_ms));
            put_varint(&mut out, u128::from(f.error.code()));
            put_kind_linked(&mut out, &p.kind, p.refund_of);
            put_u128_opt(&mut out, p.debit);
            put_u128_opt(&mut out, p.credit);
            out.extend_from_slice(&p.currency.bytes());
            put_varint(&mut out, p.amount_minor);
            out.extend_from_slice(&p.memo.to_le_bytes());
        }
        let mut totals: Vec<_> = self.totals.iter().collect();
        totals.sort_unstable_by_key(|(c, _)| c.bytes());
        put_varint(&mut out, totals.len() as u128);
        for (code, t) in totals {
            out.extend_from_slice(&code.bytes());
            put_varint(&mut out, t.debits_pending);
            put_varint(&mut out, t.debits_posted);
            put_varint(&mut out, t.credits_pending);
            put_varint(&mut out, t.credits_posted);
        }
        let mut refunded: Vec<_> = self.refunded.iter().collect();
        refunded.sort_unstable();
        put_varint(&mut out, refunded.len() as u128);
        for (&idx, &minor) in refunded {
            put_varint(&mut out, u128::from(idx));
            put_varint(&mut out, minor);
        }
        let mut refunds: Vec<_> = self.refunds.iter().collect();
        refunds.sort_unstable_by_key(|(o, _)| **o);
        put_varint(&mut out, refunds.len() as u128);
        for (&o, list) in refunds {
            put_varint(&mut out, u128::from(o));
            put_varint(&mut out, list.len() as u128);
            for &idx in list {
                put_varint(&mut out, u128::from(idx));
            }
        }
        let mut links: Vec<_> = self.pending_refund_of.iter().collect();
        links.sort_unstable();
        put_varint(&mut out, links.len() as u128);
        for (&idx, &o) in links {
            put_varint(&mut out, u128::from(idx));
            put_varint(&mut out, u128::from(o));
        }
        out
    }

    /// Decodes a checkpoint, checking its own hash first (a torn or altered checkpoint is an
    /// error, never a wrong state), then rebuilds the derived indexes. The transfers below its
    /// spill point that it does not hold are rows on disk: attach the storage before reading
    /// them.
    pub fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() < MAGIC.len() + 1 + 8 + HASH_LEN + 8 + 4 + HASH_LEN {
            return Err(format!("checkpoint is too short ({} bytes)", bytes.len()));
        }
        let (body, stored_hash) = bytes.split_at(bytes.len() - HASH_LEN);
        if blake3::hash(body).as_bytes() != stored_hash {
            return Err("checkpoint hash does not match its content (torn or altered)".into());
        }
        let mut r = Reader {
            bytes: body,
            pos: 0,
        };
        if r.take(MAGIC.len())? != MAGIC {
            return Err("not a checkpoint (wrong magic)".into());
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(format!("unknown checkpoint version {version}"));
        }
        let seq = r.u64_fixed()?;
        let hash = r.array::<HASH_LEN>()?;
        let time_ms = r.u64_fixed()?;
        let spilled = u32::from_le_bytes(r.array()?);
        let mut currencies = Currencies::default();
        for _ in 0..r.varint()? {
            let code = r.currency()?;
            currencies.define(code, r.varint_u32()?)?;
        }
        let mut state = State::new(currencies);
        let count = |r: &mut Reader<'_>| -> Result<usize, String> {
            let n = usize::try_from(r.varint()?).map_err(|_| "count out of range")?;
            // Every item takes at least one byte: a count beyond the rest is corrupt, and
            // must not reserve memory for it.
            if n > r.bytes.len() - r.pos {
                return Err(format!("count {n} beyond the checkpoint's end"));
            }
            Ok(n)
        };
        let balances = |r: &mut Reader<'_>| -> Result<Balances, String> {
            Ok(Balances {
                debits_pending_minor: r.varint()?,
                debits_posted_minor: r.varint()?,
                credits_pending_minor: r.varint()?,
                credits_posted_minor: r.varint()?,
            })
        };
        let u64v = |r: &mut Reader<'_>| -> Result<u64, String> {
            u64::try_from(r.varint()?).map_err(|_| "u64 out of range".to_owned())
        };
        let opt = |r: &mut Reader<'_>| -> Result<Option<u128>, String> {
            match r.u8()? {
                0 => Ok(None),
                1 => Ok(Some(u128::from_le_bytes(r.array()?))),
                tag => Err(format!("unknown option tag {tag}")),
            }
        };
        let accounts = count(&mut r)?;
        state.accounts.reserve(accounts);
        for _ in 0..accounts {
            let id = r.account()?;
            let balances = balances(&mut r)?;
            let frozen = r.freeze()?;
            let minutes = count(&mut r)?;
            if minutes > super::window::BUCKETS_MAX {
                return Err(format!("a daily window of {minutes} minutes"));
            }
            let mut buckets = Vec::with_capacity(minutes);
            let mut minute: u32 = 0;
            for _ in 0..minutes {
                minute = minute
                    .checked_add(r.varint_u32()?)
                    .ok_or("daily window minute out of range")?;
                buckets.push((minute, r.varint()?));
            }
            let window = Window::from_buckets(buckets)?;
            let idx = state.accounts.len() as u32;
            if state.account_index.insert(id.clone(), idx).is_some() {
                return Err(format!("account {id} appears twice"));
            }
            state.accounts.push(Account {
                id,
                balances,
                frozen,
                history: Vec::new(),
                window,
            });
        }
        let len = r.varint_u32()?;
        if spilled > len {
            return Err(format!("spill point {spilled} beyond {len} transfers"));
        }
        state.transfers.spilled = spilled;
        let held = count(&mut r)?;
        let mut links = Vec::new();
        for _ in 0..held {
            let idx = r.varint_u32()?;
            let (record, link) = read_row(&mut r)?;
            let n = state.accounts.len();
            if record.debit as usize >= n || record.credit as usize >= n {
                return Err(format!("transfer {} names an unknown account", record.id));
            }
            let id = record.id;
            let pending = record.state == TransferState::Pending;
            if pending {
                let deadline_ms = record
                    .deadline_ms()
                    .ok_or_else(|| format!("transfer {id} is pending without a deadline"))?;
                state.deadlines.insert((deadline_ms, idx));
            }
            if link.is_some() && !matches!(record.kind, TransferKind::Pending { .. }) {
                return Err(format!("transfer {id} cannot refund"));
            }
            if link.is_some() {
                links.push((idx, record.amount_minor, pending));
            }
            if idx < spilled {
                if !pending {
                    return Err(format!(
                        "transfer {id} below the spill point is not pending"
                    ));
                }
                if state.transfers.resident.insert(idx, record).is_some() {
                    return Err(format!("transfer {id} appears twice"));
                }
            } else if idx as usize != state.transfers.len() {
                return Err(format!("transfer {id} out of order"));
            } else {
                state.transfers.tail.push(record);
            }
            if state.transfers.index.insert(id, idx).is_some() {
                return Err(format!("transfer {id} appears twice"));
            }
        }
        if state.transfers.len() != len as usize {
            return Err(format!(
                "{} transfers held from the spill point, {len} in all",
                state.transfers.len()
            ));
        }
        // The accounts' history entries in memory: those of the held transfers, in index
        // order (the pending ones below the spill point come first).
        let t = &state.transfers;
        let held = t.resident.iter().map(|(&idx, r)| (idx, r)).chain(
            t.tail
                .iter()
                .enumerate()
                .map(|(i, r)| (spilled + i as TransferIdx, r)),
        );
        let mut by_reference: super::HashMap<u128, Vec<TransferIdx>> = Default::default();
        for (idx, record) in held {
            state.accounts[record.debit as usize].history.push(idx);
            state.accounts[record.credit as usize].history.push(idx);
            if record.reference != 0 {
                by_reference.entry(record.reference).or_default().push(idx);
            }
        }
        state.transfers.by_reference = by_reference;
        let failures = count(&mut r)?;
        if failures > FAILURES_KEPT_MAX {
            return Err(format!("{failures} recorded failures"));
        }
        for _ in 0..failures {
            let id = r.id()?;
            let failed_ms = u64v(&mut r)?;
            if state
                .failed_order
                .back()
                .is_some_and(|&(before_ms, _)| before_ms > failed_ms)
            {
                return Err(format!("failure {id} recorded out of order"));
            }
            let code = u16::try_from(r.varint()?).map_err(|_| "error code out of range")?;
            let error = TransferError::from_code(code)
                .ok_or_else(|| format!("unknown error code {code}"))?;
            let (kind, refund_of) = r.kind_linked()?;
            let fingerprint = Fingerprint {
                kind,
                refund_of,
                debit: opt(&mut r)?,
                credit: opt(&mut r)?,
                currency: r.currency()?,
                amount_minor: r.varint()?,
                memo: u128::from_le_bytes(r.array()?),
            };
            if state.transfers.index.contains_key(&id)
                || state
                    .failed
                    .insert(
                        id,
                        FailedRec {
                            fingerprint,
                            error,
                            failed_ms,
                        },
                    )
                    .is_some()
            {
                return Err(format!("failure {id} appears twice"));
            }
            state.failed_order.push_back((failed_ms, id));
        }
        let mut totals: HashMap<CurrencyCode, Totals> = HashMap::default();
        for _ in 0..count(&mut r)? {
            let code = r.currency()?;
            let t = Totals {
                debits_pending: r.varint()?,
                debits_posted: r.varint()?,
                credits_pending: r.varint()?,
                credits_posted: r.varint()?,
            };
            totals.insert(code, t);
        }
        state.totals = totals;
        let below = |idx: TransferIdx| -> Result<TransferIdx, String> {
            if idx < len {
                Ok(idx)
            } else {
                Err(format!("transfer index {idx} beyond {len} transfers"))
            }
        };
        for _ in 0..count(&mut r)? {
            let idx = below(r.varint_u32()?)?;
            state.refunded.insert(idx, r.varint()?);
        }
        for _ in 0..count(&mut r)? {
            let o = below(r.varint_u32()?)?;
            let n = count(&mut r)?;
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                list.push(below(r.varint_u32()?)?);
            }
            state.refunds.insert(o, list);
        }
        for _ in 0..count(&mut r)? {
            let idx = below(r.varint_u32()?)?;
            state.pending_refund_of.insert(idx, below(r.varint_u32()?)?);
        }
        // What live pending refunds reserve of their originals: every pending transfer is
        // held, so this is rebuilt rather than stored.
        let filters_start = r.pos;
        for _ in 0..count(&mut r)? {
            let filter = IdFilter::decode(&mut r)?;
            state.transfers.filters.push(Arc::new(filter));
        }
        if u64::from_le_bytes(r.array()?) != (r.pos - 8 - filters_start) as u64 {
            return Err("the filters' length does not match".into());
        }
        for (idx, amount_minor, pending) in links {
            let &o = state
                .pending_refund_of
                .get(&idx)
                .ok_or("a pending refund without its link")?;
            if pending {
                *state.refund_reserved.entry(o).or_default() += amount_minor;
            }
        }
        if r.pos != body.len() {
            return Err("trailing bytes after the state".into());
        }
        Ok(Checkpoint {
            state,
            head: Head { seq, hash },
            time_ms,
        })
    }

    /// Prepares a checkpoint of this state, the replay of the journal up to record `head` (at
    /// ledger time `time_ms`), for [`CheckpointJob::run`]: spills (see
    /// [`State::begin_spill`]) and encodes the checkpoint up to its id filters. The job
    /// writes the rows, then the checkpoint; until the rows are durable
    /// ([`State::spill_written`]), lookups read them from memory.
    pub fn begin_checkpoint(
        &mut self,
        storage: &Arc<dyn Storage>,
        head: Head,
        time_ms: u64,
    ) -> Result<CheckpointJob, StorageError> {
        self.begin_spill(storage)?;
        let state_bytes = self.encode_checkpoint_state(head, time_ms, self.transfers.spilled);
        Ok(CheckpointJob {
            parts: self.transfers.unsynced.clone(),
            state_bytes,
            filters: self.transfers.filters.clone(),
        })
    }

    /// Moves every transfer that has ended and is not on disk yet out of the transfers in
    /// memory, into a [`SpillPart`] that stays readable until its rows are durable; keeps in
    /// memory only the pending ones (their rows change until they end). Costs O(pending
    /// transfers + pending refunds) here, not O(transfers spilled): the tail and its id index
    /// are moved, not copied, and the rows are encoded by [`CheckpointJob::run`]. A backend
    /// that keeps no rows keeps every transfer in memory. Fails (changing nothing) only if the
    /// original of an ended pending refund cannot be read: its row names the original's id.
    fn begin_spill(&mut self, storage: &Arc<dyn Storage>) -> Result<(), StorageError> {
        if !storage.keeps_transfer_rows() {
            return Ok(());
        }
        let t = &self.transfers;
        let first = t.spilled;
        let end = t.len() as TransferIdx;
        let resident_ended: Vec<TransferIdx> = t
            .resident
            .iter()
            .filter(|(_, r)| r.state != TransferState::Pending)
            .map(|(&idx, _)| idx)
            .collect();
        if first == end && resident_ended.is_empty() {
            return Ok(());
        }
        let ended = |idx: TransferIdx| {
            if idx >= first {
                t.tail[(idx - first) as usize].state != TransferState::Pending
            } else {
                resident_ended.binary_search(&idx).is_ok()
            }
        };
        // Read first (the originals may be rows on disk), so a failure leaves all as it was.
        let mut links = HashMap::default();
        for (&idx, &o) in &self.pending_refund_of {
            if ended(idx) {
                links.insert(idx, self.transfers.try_get(o)?.id.0);
            }
        }
        let t = &mut self.transfers;
        t.disk = Some(storage.clone());
        let mut resident = BTreeMap::new();
        for idx in resident_ended {
            resident.insert(idx, t.resident.remove(&idx).expect("listed above"));
        }
        let tail = std::mem::take(&mut t.tail);
        // The pending ones stay in memory, where they change; they are few.
        for &(_, idx) in &self.deadlines {
            if idx >= first {
                t.resident.insert(idx, tail[(idx - first) as usize].clone());
            }
        }
        let index = std::mem::take(&mut t.index);
        t.index = t.resident.iter().map(|(&idx, r)| (r.id, idx)).collect();
        // Room for as many transfers as the last spill took, before they come: growing by
        // doubling copied the whole tail and rehashed the whole index on the writer, each
        // time a batch's latency. Pages not written yet cost no memory.
        t.tail.reserve(tail.len());
        t.index.reserve(index.len());
        t.spilled = end;
        t.unsynced.push(Arc::new(SpillPart {
            first,
            tail,
            resident,
            index,
            links,
        }));
        Ok(())
    }

    /// The rows of every spill not durable so far are now (with `filter`, the filter of
    /// their ids): lookups read them from the storage from now on. Returns what memory held
    /// them, for the caller to drop where it costs nothing (freeing about as many
    /// allocations as rows).
    pub fn spill_written(&mut self, filter: Option<Arc<IdFilter>>) -> Vec<Arc<SpillPart>> {
        self.transfers.filters.extend(filter);
        let written = std::mem::take(&mut self.transfers.unsynced);
        if !written.is_empty() {
            // Their history entries are in the lists on disk now: keep only those of the
            // transfers still in memory (after the spill point, or pending below it).
            let t = &self.transfers;
            // Entries below the oldest pending transfer held are dropped without a lookup:
            // on the writer, one map lookup per spilled entry (a million per spill) cost
            // tens of ms whenever a transfer was pending.
            let oldest_resident = t
                .resident
                .keys()
                .next()
                .copied()
                .unwrap_or(TransferIdx::MAX);
            for a in &mut self.accounts {
                let held_before = a.history.len();
                a.history.retain(|&idx| {
                    idx >= t.spilled || (idx >= oldest_resident && t.resident.contains_key(&idx))
                });
                // The capacity stays what the account needed since the last spill: it needs
                // about as much by the next. Shrinking every list to nothing at each spill
                // and growing it back by doubling made tens of thousands of small
                // reallocations per cycle, which fragmented glibc's heap (RSS that grew with
                // history). A busy account that went quiet still gives its memory back.
                if a.history.capacity() > 64 && held_before < a.history.capacity() / 4 {
                    a.history.shrink_to(held_before * 2);
                }
            }
            // Likewise the references of the transfers now on disk (in their segments'
            // reference index).
            let t = &mut self.transfers;
            let (spilled, resident) = (t.spilled, &t.resident);
            t.by_reference.retain(|_, list| {
                list.retain(|idx| *idx >= spilled || resident.contains_key(idx));
                !list.is_empty()
            });
        }
        written
    }

    /// Lets the state read the rows written by earlier spills (after an open).
    pub fn attach_rows(&mut self, storage: &Arc<dyn Storage>) {
        if storage.keeps_transfer_rows() {
            self.transfers.disk = Some(storage.clone());
        }
    }

    /// Checks that every ended transfer below `spilled` is on disk as its row, with its id
    /// index entry, and listed in the history lists of exactly its two accounts (`verify`,
    /// on the full replay, at the checkpoint's record).
    pub fn check_rows(
        &self,
        storage: &dyn Storage,
        spilled: TransferIdx,
        filters: &[IdFilter],
    ) -> Result<(), String> {
        if spilled as usize > self.transfers.len() {
            return Err(format!(
                "the checkpoint's spill point {spilled} is beyond the journal"
            ));
        }
        // What the newest entry on disk says of each transfer below the spill point, as a
        // lookup would find it: nothing yet, the journal's, or something else. One pass over
        // the stored rows (each segment read once, in order), not a lookup per transfer.
        assert_eq!(
            self.transfers.spilled, 0,
            "rows are checked against a replay that holds every transfer"
        );
        const ABSENT: u8 = 0;
        const SAME: u8 = 1;
        const OTHER: u8 = 2;
        let mut row_found = vec![ABSENT; spilled as usize];
        let mut id_found = vec![ABSENT; spilled as usize];
        // The lists naming each transfer, since its row was last written: its debit's
        // (bit 0), its credit's (bit 1), another account's (bit 2).
        const IN_DEBIT: u8 = 1;
        const IN_CREDIT: u8 = 2;
        const IN_OTHER: u8 = 4;
        let mut listed = vec![0u8; spilled as usize];
        // The reference index entries naming each transfer since its row was last written:
        // none, the journal's reference, or another one (or more than one).
        let mut referenced = vec![ABSENT; spilled as usize];
        let mut expected = Vec::new();
        storage
            .scan_transfer_rows(&mut |entry| match entry {
                RowEntry::Row { idx, bytes } if idx < spilled => {
                    expected.clear();
                    self.put_row(&mut expected, idx);
                    row_found[idx as usize] = if bytes == expected.as_slice() {
                        SAME
                    } else {
                        OTHER
                    };
                    listed[idx as usize] = 0;
                    referenced[idx as usize] = ABSENT;
                }
                RowEntry::Referenced { reference, idx } if idx < spilled => {
                    let journal = self.transfers.get(idx).reference;
                    referenced[idx as usize] =
                        if reference == journal && referenced[idx as usize] == ABSENT {
                            SAME
                        } else {
                            OTHER
                        };
                }
                RowEntry::Listed { account, idx } if idx < spilled => {
                    let t = self.transfers.get(idx);
                    listed[idx as usize] |= if account == t.debit {
                        IN_DEBIT
                    } else if account == t.credit {
                        IN_CREDIT
                    } else {
                        IN_OTHER
                    };
                }
                RowEntry::Id { id, idx } => {
                    if let Some(&at) = self.transfers.index.get(&TransferId(id)) {
                        if at < spilled {
                            id_found[at as usize] = if idx == at { SAME } else { OTHER };
                        }
                    }
                }
                RowEntry::Row { .. } | RowEntry::Listed { .. } | RowEntry::Referenced { .. } => {}
            })
            .map_err(|e| e.to_string())?;
        for idx in 0..spilled {
            let t = self.transfers.get(idx);
            if t.state == TransferState::Pending {
                continue;
            }
            if row_found[idx as usize] != SAME || id_found[idx as usize] != SAME {
                return Err(format!(
                    "the row of transfer {} on disk is not the journal's",
                    t.id
                ));
            }
            if !filters.iter().any(|f| f.may_contain(t.id)) {
                return Err(format!(
                    "transfer {} is on disk but its id filter says it is not",
                    t.id
                ));
            }
            let want = if t.reference == 0 { ABSENT } else { SAME };
            if referenced[idx as usize] != want {
                return Err(format!(
                    "transfer {} is not in the reference index on disk under exactly its \
                     reference",
                    t.id
                ));
            }
            if listed[idx as usize] != IN_DEBIT | IN_CREDIT {
                return Err(format!(
                    "transfer {} is not in exactly its two accounts' history lists on disk",
                    t.id
                ));
            }
        }
        Ok(())
    }

    /// The first difference with `other` in anything a checkpoint holds or rebuilds
    /// (accounts with their daily windows as of `time_ms` and their histories, transfers,
    /// failures, totals, deadlines); `None` when both are the same state.
    pub fn full_diff(&self, other: &State, time_ms: u64) -> Option<String> {
        if let Some(diff) = self.diff(other) {
            return Some(diff);
        }
        for (i, a) in self.accounts.iter().enumerate() {
            // Each side's whole history: in memory, and in the lists on disk.
            let i = i as super::AccountIdx;
            match (self.full_history(i), other.full_history(i)) {
                (Ok(mine), Ok(theirs)) if mine == theirs => {}
                (Ok(_), Ok(_)) => return Some(format!("account {}: histories differ", a.id)),
                (Err(e), _) | (_, Err(e)) => {
                    return Some(format!("account {}: history: {e}", a.id))
                }
            }
        }
        if self.deadlines != other.deadlines {
            return Some("deadline indexes differ".into());
        }
        if self.refunds != other.refunds
            || self.pending_refund_of != other.pending_refund_of
            || self.refunded != other.refunded
        {
            return Some("refund indexes differ".into());
        }
        let head = Head {
            seq: 0,
            hash: [0; HASH_LEN],
        };
        let spilled = self.transfers.spilled;
        let mine = self.encode_checkpoint_at(head, time_ms, spilled);
        let theirs = other.encode_checkpoint_at(head, time_ms, spilled);
        if checkpoint_state(&mine) != checkpoint_state(&theirs) {
            return Some("daily windows, totals or currencies differ".into());
        }
        None
    }
}

#[cfg(test)]
impl State {
    /// How many account history entries are held in memory (two per transfer in memory).
    pub fn history_entries_in_memory(&self) -> usize {
        self.accounts.iter().map(|a| a.history.len()).sum()
    }

    /// Adds `minor` to an account's posted credits: a state the journal never produced.
    pub fn bump_credit_for_test(&mut self, account: &crate::ledger::model::AccountId, minor: u128) {
        let idx = self.account_index[account] as usize;
        self.accounts[idx].balances.credits_posted_minor += minor;
    }
}

#[cfg(test)]
mod row_format_tests {
    use super::super::TransferRec;
    use super::{put_row_of, read_row};
    use crate::ledger::codec::Reader;
    use crate::ledger::model::{TransferId, TransferKind, TransferState};

    fn row(link: Option<u128>, reference: u128) -> (TransferRec, Vec<u8>) {
        let t = TransferRec {
            id: TransferId(9),
            // Single: the link's tag is then at byte 17 (id, kind tag).
            kind: TransferKind::Single,
            debit: 3,
            credit: 4,
            amount_minor: 250,
            state: TransferState::Voided,
            memo: b"memo".to_vec().into_boxed_slice(),
            created_ms: 1_700_000_000_000,
            ended_ms: Some(1_700_000_000_500),
            reference,
        };
        let mut out = Vec::new();
        put_row_of(&mut out, &t, link);
        (t, out)
    }

    /// Issue 15 (history by reference): a row with a reference reads back with it (and its
    /// link to a refunded transfer); a row without one is byte for byte the row written
    /// before references existed (the link's option tag, 0 or 1), so older segments and
    /// checkpoints still read.
    #[test]
    fn a_rows_reference_reads_back_and_rows_without_one_keep_their_bytes() {
        for link in [None, Some(77)] {
            let (_, plain) = row(link, 0);
            let (t, referenced) = row(link, 1 << 100);
            assert_eq!(plain[17], u8::from(link.is_some()), "the old tag");
            assert_eq!(referenced[17], 2 + u8::from(link.is_some()));
            assert_eq!(referenced.len(), plain.len() + 16);
            for (bytes, reference) in [(&plain, 0), (&referenced, 1 << 100)] {
                let mut r = Reader { bytes, pos: 0 };
                let (read, read_link) = read_row(&mut r).unwrap();
                assert_eq!(r.pos, bytes.len());
                assert_eq!(read_link, link.map(TransferId));
                assert_eq!(read.reference, reference);
                assert_eq!(
                    (read.id, read.amount_minor, read.ended_ms),
                    (t.id, 250, t.ended_ms)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Op, State, FAILURES_KEPT_MAX};
    use crate::ledger::codec::{Head, HASH_LEN};
    use crate::ledger::model::{Owner, TransferError, TransferId, TransferRequest, TransferState};
    use crate::ledger::Currencies;

    /// Issue 15 (memory flat in history): beyond [`FAILURES_KEPT_MAX`] recorded failures the
    /// oldest is forgotten (its id is new again), the newer ones still answer retries, and
    /// a checkpoint holds them in the order they are forgotten in (it decodes to a state
    /// that encodes to the same bytes and forgets the same one next). Before, every failure
    /// was kept forever.
    #[test]
    fn beyond_the_cap_the_oldest_failure_is_forgotten_first() {
        let currencies = Currencies::eur_for_tests();
        let one = currencies.from_minor(1, "EUR").unwrap();
        let pay = |id: u128, memo: &[u8]| Op::Create {
            request: TransferRequest {
                reference: 0,
                id: TransferId(id),
                debit: Owner::user("@carol:x"),
                credit: Owner::user("@dave:x"),
                amount: one,
                memo: memo.to_vec(),
            },
            timeout_ms: None,
            refund_of: None,
        };
        let mut state = State::new(currencies);
        let mut events = Vec::new();
        let now_ms = 1_000;
        let cap = FAILURES_KEPT_MAX as u128;
        for id in 1..=cap {
            let refused = state.decide(pay(id, b"a"), now_ms, &mut events).unwrap();
            assert_eq!(refused, Err(TransferError::InsufficientFunds));
        }
        // At the cap: the first is still kept.
        let retry = state.decide(pay(1, b"b"), now_ms, &mut events).unwrap();
        assert_eq!(retry, Err(TransferError::ExistsWithDifferentMemo));
        let head = Head {
            seq: 1,
            hash: [0; HASH_LEN],
        };
        let bytes = state.encode_checkpoint(head, now_ms);
        let mut decoded = State::decode_checkpoint(&bytes).unwrap().state;
        assert_eq!(decoded.encode_checkpoint(head, now_ms), bytes);
        for state in [&mut state, &mut decoded] {
            let refused = state
                .decide(pay(cap + 1, b"a"), now_ms, &mut events)
                .unwrap();
            assert_eq!(refused, Err(TransferError::InsufficientFunds));
            // The first is forgotten: its id is decided afresh (and recorded again).
            let again = state.decide(pay(1, b"b"), now_ms, &mut events).unwrap();
            assert_eq!(again, Err(TransferError::InsufficientFunds));
            let kept = state.decide(pay(3, b"b"), now_ms, &mut events).unwrap();
            assert_eq!(kept, Err(TransferError::ExistsWithDifferentMemo));
            assert_eq!(state.failed.len(), FAILURES_KEPT_MAX);
        }
        assert_eq!(
            decoded.encode_checkpoint(head, now_ms),
            state.encode_checkpoint(head, now_ms)
        );
    }

    /// Issue 15 (memory flat in history): a transfer's row, once it has ended, is what is
    /// written out of memory, so it must never change again; its refunds (single-phase and
    /// pending, posted in part) change only what is kept beside it. Before, the row held
    /// `refunded_minor` and each refund rewrote it.
    #[test]
    fn the_row_of_an_ended_transfer_never_changes_when_it_is_refunded() {
        let currencies = Currencies::eur_for_tests();
        let eur = |minor: u128| currencies.from_minor(minor, "EUR").unwrap();
        let mut state = State::new(currencies.clone());
        let mut events = Vec::new();
        let mut now_ms = 1_000;
        let mut run = |state: &mut State, op: Op| {
            now_ms += 1;
            state
                .decide(op, now_ms, &mut events)
                .unwrap()
                .unwrap()
                .unwrap()
        };
        let create = |id: u128, debit: Owner, credit: Owner, minor: u128| Op::Create {
            request: TransferRequest {
                reference: 0,
                id: TransferId(id),
                debit,
                credit,
                amount: eur(minor),
                memo: b"lunch".to_vec(),
            },
            timeout_ms: None,
            refund_of: None,
        };
        let (alice, bob) = (Owner::user("@alice:x"), Owner::user("@bob:x"));
        run(&mut state, create(1, Owner::Issuer, alice.clone(), 10_000));
        let paid = run(&mut state, create(2, alice.clone(), bob.clone(), 5_000));
        assert_eq!(
            paid.transfer.state,
            TransferState::Posted {
                amount_minor: 5_000
            }
        );
        let (idx, row) = state.row(TransferId(2)).unwrap();

        run(
            &mut state,
            Op::Refund {
                id: TransferId(3),
                original: TransferId(2),
                amount: eur(1_000),
                memo: Vec::new(),
            },
        );
        let pending_refund = match create(4, bob.clone(), alice.clone(), 2_000) {
            Op::Create { request, .. } => Op::Create {
                request,
                timeout_ms: Some(60_000),
                refund_of: Some(TransferId(2)),
            },
            _ => unreachable!(),
        };
        run(&mut state, pending_refund.clone());
        assert_eq!(state.row(TransferId(2)).unwrap(), (idx, row.clone()));
        run(
            &mut state,
            Op::Post {
                pending: TransferId(4),
                amount: Some(eur(1_500)),
            },
        );
        // The refunds moved the original's refunded amount, and only that.
        let original = state.transfer(TransferId(2)).unwrap().unwrap();
        assert_eq!(original.refunded_minor, 2_500);
        assert_eq!(state.row(TransferId(2)).unwrap(), (idx, row));
        // A retry of the pending refund still answers it (the link is in its own row).
        let again = run(&mut state, pending_refund);
        assert!(again.exists);
        assert_eq!(again.transfer.refund_of, Some(TransferId(2)));
        state.check_invariants().unwrap();
    }
}
