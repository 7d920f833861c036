//! Linked chains (TigerBeetle's `flags.linked`): the changes of a chain are decided in order
//! against the state, each seeing the effects of those before it, and are undone if one of
//! them fails, so that the chain applies whole or not at all.
//!
//! Undoing keeps the decision path as it is: while a chain is open, [`State::emit`] notes,
//! before each event is applied, what the event is about to change as it was (an undo log of
//! before-images, taken once per thing and chain), and a failed chain puts those back. What
//! the chain only appended (accounts, transfers, history entries) is cut back to the lengths
//! it started from. A chain is at most [`crate::ledger::LINKED_CHAIN_OPS_MAX`] changes, so the
//! log is small; it never holds more than the chain touched.
//!
//! A chain is made of creates (single and pending), posts and voids, and records no failure
//! (a chain that fails leaves nothing behind): its events are `AccountOpened`,
//! `TransferCreated` of a non-refund, and the ends of pending transfers (`PendingPosted`,
//! `PendingVoided`, and `PendingExpired` when a post or void finds its transfer past its
//! deadline). Any other event in a chain is a bug, and crashes.

use super::window::Window;
use super::{
    AccountIdx, Balances, CurrencyCode, Event, FailedRec, HashMap, Op, OpResult, State, Totals,
    TransferError, TransferIdx, TransferKind, TransferRec,
};
use crate::ledger::model::{TransferId, TransferState};
use crate::ledger::storage::StorageError;

/// What a chain changed, as it was before: enough to put the state back as it was.
#[derive(Debug, Clone, Default)]
pub(super) struct ChainUndo {
    /// Accounts and transfers from these indexes on were created by the chain.
    accounts_len: usize,
    transfers_len: usize,
    /// Length of `State::touched` before the chain.
    touched_len: usize,
    /// The running totals before the chain (one entry per currency).
    totals: HashMap<CurrencyCode, Totals>,
    /// Accounts older than the chain that it changed: (index, balances, history length,
    /// daily window), as they were.
    accounts: Vec<(AccountIdx, Balances, usize, Window)>,
    /// Pending transfers older than the chain that it ended, as they were.
    ended: Vec<(TransferIdx, TransferRec)>,
    /// The refund figures of originals whose pending refunds the chain ended, as they were
    /// (`None`: no entry).
    refunded: Vec<(TransferIdx, Option<u128>)>,
    refund_reserved: Vec<(TransferIdx, Option<u128>)>,
    /// Recorded failures forgotten while the chain was applied (by ledger time), in the order
    /// they were forgotten.
    forgotten: Vec<(u64, TransferId, Option<FailedRec>)>,
}

impl State {
    /// Decides the changes of one linked chain, in order, at `now_ms`: each sees what those
    /// before it did. Either every change applies, or none does and `events` is as it was:
    /// the change that failed answers its own failure (or the storage error that stopped it),
    /// every other change of the chain `LinkedEventFailed`. A chain is applied when every
    /// change of it is new, or answered as a whole retry (each `exists`, nothing changed)
    /// when every change of it was already made; a chain that mixes the two is refused (the
    /// first change that mixes answers `LinkedChainPartlyExists`). A failed chain records
    /// nothing, not even a transient failure.
    pub fn decide_chain(
        &mut self,
        ops: impl IntoIterator<Item = Op>,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Vec<Result<OpResult, StorageError>> {
        assert!(self.chain.is_none(), "linked chains do not nest");
        let events_len = events.len();
        self.chain = Some(ChainUndo {
            accounts_len: self.accounts.len(),
            transfers_len: self.transfers.len(),
            touched_len: self.touched.len(),
            totals: self.totals.clone(),
            ..ChainUndo::default()
        });
        let mut results: Vec<Result<OpResult, StorageError>> = Vec::new();
        let mut broken = false;
        let (mut made, mut found) = (false, false);
        for op in ops {
            if broken {
                results.push(Ok(Err(TransferError::LinkedEventFailed)));
                continue;
            }
            let mut result = self.decide(op, now_ms, events);
            match &result {
                Ok(Ok(Some(answer))) => {
                    if answer.exists {
                        found = true;
                    } else {
                        made = true;
                    }
                    if made && found {
                        result = Ok(Err(TransferError::LinkedChainPartlyExists));
                        broken = true;
                    }
                }
                Ok(Ok(None)) => unreachable!("a chain holds transfer changes only"),
                Ok(Err(_)) | Err(_) => broken = true,
            }
            if broken {
                results.fill(Ok(Err(TransferError::LinkedEventFailed)));
            }
            results.push(result);
        }
        let undo = self.chain.take().expect("set above");
        if broken {
            events.truncate(events_len);
            self.undo_chain(undo);
            self.assert_totals_balance();
        }
        results
    }

    /// Keeps, before `event` is applied inside a chain, what it changes as it was.
    pub(super) fn note_chain(&mut self, event: &Event) {
        let Some(undo) = self.chain.as_ref() else {
            return;
        };
        let (accounts_len, transfers_len) = (undo.accounts_len, undo.transfers_len);
        let (debit, credit) = match event {
            // Cut back to `accounts_len`.
            Event::AccountOpened { .. } => return,
            Event::TransferCreated {
                kind,
                refund_of,
                debit,
                credit,
                ..
            } => {
                assert!(
                    !matches!(kind, TransferKind::Refund { .. }) && refund_of.is_none(),
                    "a linked chain creates no refund: {event:?}"
                );
                (*debit, *credit)
            }
            Event::PendingPosted { id, .. }
            | Event::PendingVoided { id }
            | Event::PendingExpired { id } => {
                // Pending transfers live in memory; the decision pinned it in any case.
                let idx = self
                    .transfers
                    .idx_of(*id)
                    .expect("an end names a known transfer");
                let t = self.transfers.get(idx).into_owned();
                let (debit, credit) = (t.debit, t.credit);
                if (idx as usize) < transfers_len {
                    if let Some(&o) = self.pending_refund_of.get(&idx) {
                        let refunded = self.refunded.get(&o).copied();
                        let reserved = self.refund_reserved.get(&o).copied();
                        let undo = self.chain.as_mut().expect("checked above");
                        if !undo.refunded.iter().any(|&(at, _)| at == o) {
                            undo.refunded.push((o, refunded));
                            undo.refund_reserved.push((o, reserved));
                        }
                    }
                    let undo = self.chain.as_mut().expect("checked above");
                    undo.ended.push((idx, t));
                }
                (debit, credit)
            }
            Event::CurrencyDefined { .. }
            | Event::TransferFailed { .. }
            | Event::AccountFrozen { .. } => {
                panic!("an event a linked chain never makes: {event:?}")
            }
        };
        for idx in [debit, credit] {
            if (idx as usize) >= accounts_len {
                continue;
            }
            let undo = self.chain.as_ref().expect("checked above");
            if undo.accounts.iter().any(|&(at, ..)| at == idx) {
                continue;
            }
            let a = &self.accounts[idx as usize];
            let before = (idx, a.balances, a.history.len(), a.window.clone());
            self.chain
                .as_mut()
                .expect("checked above")
                .accounts
                .push(before);
        }
    }

    /// Keeps a recorded failure forgotten while a chain is applied, to put it back if the
    /// chain fails.
    pub(super) fn note_forgotten(
        &mut self,
        failed_ms: u64,
        id: TransferId,
        rec: Option<FailedRec>,
    ) {
        if let Some(undo) = self.chain.as_mut() {
            undo.forgotten.push((failed_ms, id, rec));
        }
    }

    /// Puts back what a failed chain changed, latest first.
    fn undo_chain(&mut self, undo: ChainUndo) {
        // Transfers the chain created, newest first: their deadlines, their id entries.
        while self.transfers.len() > undo.transfers_len {
            let t = self
                .transfers
                .tail
                .pop()
                .expect("the chain's transfers are in the tail: nothing spills mid-record");
            let idx = self.transfers.len() as TransferIdx;
            if t.state == TransferState::Pending {
                let deadline_ms = t.deadline_ms().expect("pending has a deadline");
                assert!(self.deadlines.remove(&(deadline_ms, idx)));
            }
            assert_eq!(self.transfers.index.remove(&t.id), Some(idx));
            if t.reference != 0 {
                // Its reference entry is the newest of its list (pushed last).
                let list = self
                    .transfers
                    .by_reference
                    .get_mut(&t.reference)
                    .expect("a transfer with a reference is indexed by it");
                assert_eq!(list.pop(), Some(idx));
                if list.is_empty() {
                    self.transfers.by_reference.remove(&t.reference);
                }
            }
        }
        // Pending transfers it ended, as they were: pending again, with their deadline.
        for (idx, before) in undo.ended.into_iter().rev() {
            let deadline_ms = before.deadline_ms().expect("pending has a deadline");
            self.deadlines.insert((deadline_ms, idx));
            self.forget_ended_in_flight(before.id);
            *self.transfers.get_mut(idx) = before;
        }
        for (o, before) in undo.refunded {
            match before {
                Some(v) => self.refunded.insert(o, v),
                None => self.refunded.remove(&o),
            };
        }
        for (o, before) in undo.refund_reserved {
            match before {
                Some(v) => self.refund_reserved.insert(o, v),
                None => self.refund_reserved.remove(&o),
            };
        }
        // Accounts it opened, then the older ones it changed.
        for a in self.accounts.drain(undo.accounts_len..) {
            self.account_index.remove(&a.id);
        }
        for (idx, balances, history_len, window) in undo.accounts {
            let a = &mut self.accounts[idx as usize];
            a.balances = balances;
            a.history.truncate(history_len);
            a.window = window;
        }
        self.totals = undo.totals;
        for (failed_ms, id, rec) in undo.forgotten.into_iter().rev() {
            self.failed_order.push_front((failed_ms, id));
            if let Some(rec) = rec {
                self.failed.insert(id, rec);
            }
        }
        self.touched.truncate(undo.touched_len);
    }
}
