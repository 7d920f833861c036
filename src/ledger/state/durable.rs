//! Reads of the durable state while a record is being decided or written.
//!
//! The writer decides a record's requests into the state in memory before the record is
//! durable, and answers reads while its append (journal write, fdatasync, sled flush) runs.
//! Those reads must not show what a crash could still take back, so while a record is in
//! flight the state keeps what hides it from them: transfers are indexed in creation order,
//! so the record's new transfers are those from its first index on; what it changed of older
//! transfers (a pending transfer it ended, the refund figures of an original it refunded) is
//! kept as it was before, bounded by what one record holds. [`Durable`] answers through that.

use super::{AccountIdx, Event, HashMap, State, TransferIdx, TransferKind};
use crate::ledger::model::{AccountId, HistoryOrder, Owner, Transfer, TransferId, TransferState};
use crate::ledger::storage::StorageError;

/// What the record in flight changed of transfers that were durable before it.
#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight {
    /// The record's new transfers are those from this index on.
    first_transfer: TransferIdx,
    /// The record's new accounts are those from this index on.
    first_account: AccountIdx,
    /// Durable pending transfers the record ended (posted, voided, expired): still pending
    /// to readers until it is durable.
    ended: HashMap<TransferId, TransferIdx>,
    /// Durable transfers whose refund figures the record changed, with the figures before
    /// it: (`refunded_minor`, `refund_pending_minor`).
    refund_figures: HashMap<TransferId, (u128, u128)>,
    /// A change whose previous value could not be kept (a row that could not be read):
    /// reads then wait until the record is durable.
    incomplete: bool,
}

impl State {
    /// Starts a record: from now until [`State::end_record`], [`State::durable`] hides what
    /// is decided.
    pub fn begin_record(&mut self) {
        self.in_flight = Some(InFlight {
            first_transfer: self.transfers.len() as TransferIdx,
            first_account: self.accounts.len() as AccountIdx,
            ..InFlight::default()
        });
    }

    /// The record begun last is durable (or empty): reads see the whole state again.
    pub fn end_record(&mut self) {
        self.in_flight = None;
    }

    /// Whether [`State::durable`] can answer now; if not, a read waits for the record.
    pub fn durable_readable(&self) -> bool {
        self.in_flight.as_ref().is_none_or(|f| !f.incomplete)
    }

    /// The state as of its last durable record (see the module's doc).
    pub fn durable(&self) -> Durable<'_> {
        Durable { state: self }
    }

    /// Called before `event` is applied during a record: keeps what it changes of durable
    /// transfers as it was.
    pub(super) fn note_in_flight(&mut self, event: &Event) {
        let Some(in_flight) = self.in_flight.as_ref() else {
            return;
        };
        let first = in_flight.first_transfer;
        let original = match event {
            Event::PendingPosted { id, .. }
            | Event::PendingVoided { id }
            | Event::PendingExpired { id } => {
                // Pending transfers are in memory: no read of the storage here.
                let Ok(Some(idx)) = self.transfers.try_idx_of(*id) else {
                    self.mark_incomplete();
                    return;
                };
                if idx >= first {
                    return;
                }
                let original = match self.pending_refund_of.get(&idx) {
                    // A pending refund ending changes its original's figures; the original's
                    // row may be on disk (an expiry pins nothing), and a failed read only
                    // makes reads wait for this record.
                    Some(&o) if o < first => match self.transfers.try_get(o) {
                        Ok(t) => Some((o, t.id)),
                        Err(_) => {
                            self.mark_incomplete();
                            None
                        }
                    },
                    _ => None,
                };
                if let Some(f) = self.in_flight.as_mut() {
                    f.ended.insert(*id, idx);
                }
                original
            }
            Event::TransferCreated {
                kind, refund_of, ..
            } => {
                let original = match (kind, refund_of) {
                    (TransferKind::Refund { original }, _) | (_, Some(original)) => *original,
                    _ => return,
                };
                // The decision pinned the original (`State::read_for`).
                match self.transfers.try_idx_of(original) {
                    Ok(Some(o)) if o < first => Some((o, original)),
                    Ok(_) => None,
                    Err(_) => {
                        self.mark_incomplete();
                        None
                    }
                }
            }
            Event::CurrencyDefined { .. }
            | Event::AccountOpened { .. }
            | Event::TransferFailed { .. }
            | Event::AccountFrozen { .. } => None,
        };
        if let Some((o, original)) = original {
            let figures = (
                self.refunded_minor(o),
                self.refund_reserved.get(&o).copied().unwrap_or(0),
            );
            if let Some(f) = self.in_flight.as_mut() {
                f.refund_figures.entry(original).or_insert(figures);
            }
        }
    }

    /// A linked chain that ended transfer `id` was undone: it is pending again, and no
    /// longer among what the record ended. (What the chain kept of refund figures stays: it
    /// holds the durable figures, which the undo put back.)
    pub(super) fn forget_ended_in_flight(&mut self, id: TransferId) {
        if let Some(f) = self.in_flight.as_mut() {
            f.ended.remove(&id);
        }
    }

    fn mark_incomplete(&mut self) {
        if let Some(f) = self.in_flight.as_mut() {
            f.incomplete = true;
        }
    }
}

/// A [`State`] as of its last durable record: what the record in flight created is absent,
/// what it changed is as it was. With no record in flight, the state itself.
#[derive(Clone, Copy)]
pub(crate) struct Durable<'a> {
    state: &'a State,
}

impl Durable<'_> {
    fn first_transfer(&self) -> Option<TransferIdx> {
        self.state.in_flight.as_ref().map(|f| f.first_transfer)
    }

    /// `transfer` as it was before the record in flight changed it.
    fn as_durable(&self, mut transfer: Transfer) -> Transfer {
        let Some(f) = self.state.in_flight.as_ref() else {
            return transfer;
        };
        if f.ended.contains_key(&transfer.id) {
            transfer.state = TransferState::Pending;
            transfer.ended_ms = None;
        }
        if let Some(&(refunded_minor, refund_pending_minor)) = f.refund_figures.get(&transfer.id) {
            transfer.refunded_minor = refunded_minor;
            transfer.refund_pending_minor = refund_pending_minor;
        }
        transfer
    }

    fn visible(&self, idx: TransferIdx) -> bool {
        self.first_transfer().is_none_or(|first| idx < first)
    }

    /// See [`State::transfer`].
    pub fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, StorageError> {
        if self.state.in_flight.is_none() {
            return self.state.transfer(id);
        }
        let Some(idx) = self.state.transfers.try_idx_of(id)? else {
            return Ok(None);
        };
        if !self.visible(idx) {
            return Ok(None);
        }
        let transfer = self.state.view(idx)?;
        // As `State::transfer`: an id index entry of a spill a power cut undid names a row
        // since written again.
        Ok((transfer.id == id).then(|| self.as_durable(transfer)))
    }

    /// See [`State::history`]: history positions are transfer indexes, so the page starts
    /// below the record's first new transfer.
    pub fn history(
        &self,
        owner: &Owner,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Transfer>, Option<u64>), StorageError> {
        let before = match self.first_transfer() {
            Some(first) => Some(before.map_or(u64::from(first), |b| b.min(u64::from(first)))),
            None => before,
        };
        let (page, next) = self.state.history(owner, before, limit)?;
        Ok((page.into_iter().map(|t| self.as_durable(t)).collect(), next))
    }

    /// See [`State::history_span`] and [`State::span_of_time`]: the transfers of `owner`
    /// created within `created_ms` in `order`, from the cursor `after` on (the last index of
    /// the previous page), at most `limit`; the span ends below the record's first new
    /// transfer.
    pub fn history_query(
        &self,
        owner: &Owner,
        created_ms: std::ops::RangeInclusive<u64>,
        order: HistoryOrder,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Transfer>, Option<u64>), StorageError> {
        let mut span = self.state.span_of_time(created_ms)?;
        if let Some(first) = self.first_transfer() {
            span.end = span.end.min(first);
        }
        if let Some(after) = after {
            let after = TransferIdx::try_from(after).unwrap_or(TransferIdx::MAX);
            match order {
                HistoryOrder::NewestFirst => span.end = span.end.min(after),
                HistoryOrder::OldestFirst => span.start = span.start.max(after.saturating_add(1)),
            }
        }
        let (page, next) = self.state.history_span(owner, span, order, limit)?;
        Ok((page.into_iter().map(|t| self.as_durable(t)).collect(), next))
    }

    /// See [`State::transfers_by_reference`]: the record's new transfers are left out.
    pub fn transfers_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<Transfer>, StorageError> {
        let end = self.first_transfer().unwrap_or(TransferIdx::MAX);
        Ok(self
            .state
            .transfers_by_reference(reference, end, limit)?
            .into_iter()
            .map(|t| self.as_durable(t))
            .collect())
    }

    /// See [`State::pending_transfers`]: the record's pending transfers are left out, those
    /// it ended are still in.
    pub fn pending_transfers(&self) -> Result<Vec<Transfer>, StorageError> {
        let Some(f) = self.state.in_flight.as_ref() else {
            return self.state.pending_transfers();
        };
        let mut due: Vec<(u64, TransferIdx)> = self
            .state
            .deadlines
            .iter()
            .filter(|&&(_, idx)| idx < f.first_transfer)
            .copied()
            .collect();
        if !f.ended.is_empty() {
            for &idx in f.ended.values() {
                let t = self.state.transfers.try_get(idx)?;
                due.push((t.deadline_ms().expect("only pending transfers end"), idx));
            }
            due.sort_unstable();
        }
        due.into_iter()
            .map(|(_, idx)| Ok(self.as_durable(self.state.view(idx)?)))
            .collect()
    }

    /// See [`State::refunds_of`].
    pub fn refunds_of(&self, original: TransferId) -> Result<Vec<Transfer>, StorageError> {
        if self.state.in_flight.is_none() {
            return self.state.refunds_of(original);
        }
        let Some(list) = self
            .state
            .transfers
            .try_idx_of(original)?
            .filter(|&idx| self.visible(idx))
            .and_then(|idx| self.state.refunds.get(&idx))
        else {
            return Ok(Vec::new());
        };
        list.iter()
            .filter(|&&idx| self.visible(idx))
            .map(|&idx| Ok(self.as_durable(self.state.view(idx)?)))
            .collect()
    }

    /// The ids of the accounts, in opening order (their [`AccountIdx`]).
    pub fn account_ids(&self) -> Vec<AccountId> {
        let opened = self
            .state
            .in_flight
            .as_ref()
            .map_or(self.state.accounts.len(), |f| f.first_account as usize);
        self.state.accounts[..opened]
            .iter()
            .map(|a| a.id.clone())
            .collect()
    }
}
