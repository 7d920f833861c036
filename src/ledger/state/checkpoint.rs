//! Checkpoints: the whole [`State`] as of one journal record, so that opening the ledger
//! replays only the records after it instead of the whole journal.
//!
//! Format (integers little-endian, `v` = LEB128 varint):
//! ```text
//! magic "mxpay-cp" | version u8 = 1 | seq u64 | record hash [32] | time_ms u64 |
//! state... | hash [32]
//! hash = blake3(all bytes before it)
//! ```
//! `seq` and `record hash` name the journal record the state is the replay of (up to and
//! including it), and `time_ms` is that record's time. The state is written in a fixed order
//! (accounts and transfers in index order, failures and totals sorted), so the same state
//! always gives the same bytes: `verify` replays the journal to the checkpoint's record and
//! compares bytes. What can be derived (the id and account indexes, the deadline index, each
//! account's history) is rebuilt on decode, not stored.

use std::collections::HashMap;

use super::{
    Account, FailedRec, Fingerprint, State, Totals, TransferIdx, TransferRec, Window, DAY_MS,
};
use crate::ledger::amount::{Currencies, CurrencyCode};
use crate::ledger::codec::{
    put_account, put_bytes, put_freeze, put_kind, put_kind_linked, put_varint, Head, Reader,
    HASH_LEN,
};
use crate::ledger::model::{Balances, TransferError, TransferId, TransferKind, TransferState};

const MAGIC: &[u8; 8] = b"mxpay-cp";
const VERSION: u8 = 1;

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
fn read_row(r: &mut Reader<'_>) -> Result<(TransferRec, Option<TransferId>), String> {
    let opt = |r: &mut Reader<'_>| -> Result<Option<u128>, String> {
        match r.u8()? {
            0 => Ok(None),
            1 => Ok(Some(u128::from_le_bytes(r.array()?))),
            tag => Err(format!("unknown option tag {tag}")),
        }
    };
    let id = r.id()?;
    let kind = r.kind()?;
    let link = opt(r)?.map(TransferId);
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
    };
    Ok((record, link))
}

impl State {
    /// Appends the row of transfer `idx`: everything the transfer is, except what its refunds
    /// did to it (kept beside it, see `State::refunded`). So the row of a transfer that has
    /// ended never changes: it can be written once, out of memory. The checkpoint holds the
    /// same bytes for each transfer, followed by what was refunded of it.
    pub fn put_row(&self, out: &mut Vec<u8>, idx: TransferIdx) {
        let t = &self.transfers[idx as usize];
        out.extend_from_slice(&t.id.0.to_le_bytes());
        put_kind(out, &t.kind);
        let link = self.pending_refund_of.get(&idx);
        put_u128_opt(out, link.map(|&o| self.transfers[o as usize].id.0));
        put_varint(out, u128::from(t.debit));
        put_varint(out, u128::from(t.credit));
        put_varint(out, t.amount_minor);
        put_transfer_state(out, t.state);
        put_bytes(out, &t.memo);
        put_varint(out, u128::from(t.created_ms));
        put_u128_opt(out, t.ended_ms.map(u128::from));
    }

    /// The row of transfer `id` (see [`State::put_row`]) with its index, if it exists.
    #[cfg(test)]
    pub fn row(&self, id: TransferId) -> Option<(TransferIdx, Vec<u8>)> {
        let &idx = self.transfer_index.get(&id)?;
        let mut out = Vec::new();
        self.put_row(&mut out, idx);
        Some((idx, out))
    }

    /// The checkpoint of this state, the replay of the journal up to record `head` (at
    /// ledger time `time_ms`).
    pub fn encode_checkpoint(&self, head: Head, time_ms: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.transfers.len() * 48);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&head.seq.to_le_bytes());
        out.extend_from_slice(&head.hash);
        out.extend_from_slice(&time_ms.to_le_bytes());
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
            // As pruned at the record's time: live decisions prune at times the journal does
            // not record, so only the pruned form is the same for a state and its replay.
            let cutoff_ms = a.window.cutoff_ms.max(time_ms.saturating_sub(DAY_MS));
            let kept = a
                .window
                .entries
                .iter()
                .skip_while(|&&(c, _)| c <= cutoff_ms);
            let gone: u128 = a
                .window
                .entries
                .iter()
                .take_while(|&&(c, _)| c <= cutoff_ms)
                .map(|&(_, t)| self.transfers[t as usize].counted_minor())
                .sum();
            put_varint(&mut out, u128::from(cutoff_ms));
            put_varint(&mut out, a.window.sum_minor - gone);
            put_varint(&mut out, kept.clone().count() as u128);
            for &(created_ms, idx) in kept {
                put_varint(&mut out, u128::from(created_ms));
                put_varint(&mut out, u128::from(idx));
            }
        }
        put_varint(&mut out, self.transfers.len() as u128);
        for i in 0..self.transfers.len() as TransferIdx {
            self.put_row(&mut out, i);
            put_varint(&mut out, self.refunded_minor(i));
        }
        let mut failed: Vec<_> = self.failed.iter().collect();
        failed.sort_unstable_by_key(|(id, _)| **id);
        put_varint(&mut out, failed.len() as u128);
        for (id, f) in failed {
            let p = &f.fingerprint;
            out.extend_from_slice(&id.0.to_le_bytes());
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
        let hash = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&hash);
        out
    }

    /// Decodes a checkpoint, checking its own hash first (a torn or altered checkpoint is an
    /// error, never a wrong state), then rebuilds the derived indexes.
    pub fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() < MAGIC.len() + 1 + 8 + HASH_LEN + 8 + HASH_LEN {
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
            let cutoff_ms = u64v(&mut r)?;
            let sum_minor = r.varint()?;
            let entries = count(&mut r)?;
            let mut window = Window {
                entries: std::collections::VecDeque::with_capacity(entries),
                sum_minor,
                cutoff_ms,
            };
            for _ in 0..entries {
                window.entries.push_back((u64v(&mut r)?, r.varint_u32()?));
            }
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
        let transfers = count(&mut r)?;
        state.transfers.reserve(transfers);
        state.transfer_index.reserve(transfers);
        for i in 0..transfers {
            let idx = i as TransferIdx;
            let (record, link) = read_row(&mut r)?;
            let refunded_minor = r.varint()?;
            let TransferRec {
                id,
                kind,
                debit,
                credit,
                amount_minor,
                state: transfer_state,
                ..
            } = record;
            let n = state.accounts.len();
            if debit as usize >= n || credit as usize >= n {
                return Err(format!("transfer {id} names an unknown account"));
            }
            if refunded_minor > 0 {
                state.refunded.insert(idx, refunded_minor);
            }
            if transfer_state == TransferState::Pending {
                let deadline_ms = record
                    .deadline_ms()
                    .ok_or_else(|| format!("transfer {id} is pending without a deadline"))?;
                state.deadlines.insert((deadline_ms, idx));
            }
            let original = match (kind, link) {
                (TransferKind::Refund { original }, None) => Some(original),
                (TransferKind::Pending { .. }, Some(original)) => Some(original),
                (_, None) => None,
                (_, Some(_)) => return Err(format!("transfer {id} cannot refund")),
            };
            if let Some(original) = original {
                let &o = state
                    .transfer_index
                    .get(&original)
                    .ok_or_else(|| format!("refund {id} of unknown transfer {original}"))?;
                state.refunds.entry(o).or_default().push(idx);
                if link.is_some() {
                    state.pending_refund_of.insert(idx, o);
                    if transfer_state == TransferState::Pending {
                        *state.refund_reserved.entry(o).or_default() += amount_minor;
                    }
                }
            }
            state.accounts[debit as usize].history.push(idx);
            state.accounts[credit as usize].history.push(idx);
            if state.transfer_index.insert(id, idx).is_some() {
                return Err(format!("transfer {id} appears twice"));
            }
            state.transfers.push(record);
        }
        for _ in 0..count(&mut r)? {
            let id = r.id()?;
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
            if state.transfer_index.contains_key(&id)
                || state
                    .failed
                    .insert(id, FailedRec { fingerprint, error })
                    .is_some()
            {
                return Err(format!("failure {id} appears twice"));
            }
        }
        let mut totals: HashMap<CurrencyCode, Totals> = HashMap::new();
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
        if r.pos != body.len() {
            return Err("trailing bytes after the state".into());
        }
        // Not stored, so cannot disagree: rebuilt above from the transfers.
        debug_assert!(state
            .deadlines
            .iter()
            .all(|&(_, idx)| { state.transfers[idx as usize].state == TransferState::Pending }));
        Ok(Checkpoint {
            state,
            head: Head { seq, hash },
            time_ms,
        })
    }

    /// The first difference with `other` in anything a checkpoint holds or rebuilds
    /// (accounts with their daily windows as of `time_ms` and their histories, transfers,
    /// failures, totals, deadlines); `None` when both are the same state.
    pub fn full_diff(&self, other: &State, time_ms: u64) -> Option<String> {
        if let Some(diff) = self.diff(other) {
            return Some(diff);
        }
        for (a, b) in self.accounts.iter().zip(&other.accounts) {
            if a.history != b.history {
                return Some(format!("account {}: histories differ", a.id));
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
        if self.encode_checkpoint(head, time_ms) != other.encode_checkpoint(head, time_ms) {
            return Some("daily windows, totals or currencies differ".into());
        }
        None
    }
}

#[cfg(test)]
impl State {
    /// Adds `minor` to an account's posted credits: a state the journal never produced.
    pub fn bump_credit_for_test(&mut self, account: &crate::ledger::model::AccountId, minor: u128) {
        let idx = self.account_index[account] as usize;
        self.accounts[idx].balances.credits_posted_minor += minor;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Op, State};
    use crate::ledger::model::{Owner, TransferId, TransferRequest, TransferState};
    use crate::ledger::{Currencies, CurrencySpec, LedgerSettings};

    /// Issue 15 (memory flat in history): a transfer's row, once it has ended, is what is
    /// written out of memory, so it must never change again; its refunds (single-phase and
    /// pending, posted in part) change only what is kept beside it. Before, the row held
    /// `refunded_minor` and each refund rewrote it.
    #[test]
    fn the_row_of_an_ended_transfer_never_changes_when_it_is_refunded() {
        let currencies = Currencies::from_settings(&LedgerSettings {
            currencies: vec![CurrencySpec {
                code: "EUR".to_owned(),
                exponent: 2,
                max_transfer: None,
                max_per_24h: None,
            }],
        })
        .unwrap();
        let eur = |minor: u128| currencies.from_minor(minor, "EUR").unwrap();
        let mut state = State::new(currencies.clone());
        let mut events = Vec::new();
        let mut now_ms = 1_000;
        let mut run = |state: &mut State, op: Op| {
            now_ms += 1;
            state.decide(op, now_ms, &mut events).unwrap().unwrap()
        };
        let create = |id: u128, debit: Owner, credit: Owner, minor: u128| Op::Create {
            request: TransferRequest {
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
        let original = state.transfer(TransferId(2)).unwrap();
        assert_eq!(original.refunded_minor, 2_500);
        assert_eq!(state.row(TransferId(2)).unwrap(), (idx, row));
        // A retry of the pending refund still answers it (the link is in its own row).
        let again = run(&mut state, pending_refund);
        assert!(again.exists);
        assert_eq!(again.transfer.refund_of, Some(TransferId(2)));
        state.check_invariants().unwrap();
    }
}
