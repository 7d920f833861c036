//! The transfers of the state: the ones after the last spill and the pending ones in memory,
//! the ended ones before it read back from the storage's rows (see docs/ledger.md, Memory).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{TransferIdx, TransferRec};
use crate::ledger::codec::Reader;
use crate::ledger::model::TransferId;
use crate::ledger::storage::Storage;

/// Every transfer ever created, by index.
#[derive(Clone, Default)]
pub(super) struct Transfers {
    /// Index of the first transfer of `tail`; the ended ones below it are rows on disk.
    pub spilled: TransferIdx,
    /// The transfers from `spilled` on.
    pub tail: Vec<TransferRec>,
    /// Transfers below `spilled` still in memory: pending when they were spilled (a pending
    /// transfer changes, so its row is written only once it has ended, at a later spill).
    pub resident: BTreeMap<TransferIdx, TransferRec>,
    /// Id -> index of the transfers in memory (`tail` and `resident`).
    pub index: HashMap<TransferId, TransferIdx>,
    /// Where the rows below `spilled` are; `None` while nothing was spilled.
    pub disk: Option<Arc<dyn Storage>>,
}

impl std::fmt::Debug for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfers")
            .field("spilled", &self.spilled)
            .field("tail", &self.tail.len())
            .field("resident", &self.resident.len())
            .finish()
    }
}

impl Transfers {
    /// How many transfers were ever created.
    pub fn len(&self) -> usize {
        self.spilled as usize + self.tail.len()
    }

    /// Transfer `idx` (which must exist): from memory, or its row from the storage.
    pub fn get(&self, idx: TransferIdx) -> Cow<'_, TransferRec> {
        if idx >= self.spilled {
            return Cow::Borrowed(&self.tail[(idx - self.spilled) as usize]);
        }
        if let Some(t) = self.resident.get(&idx) {
            return Cow::Borrowed(t);
        }
        Cow::Owned(self.read(idx))
    }

    /// Transfer `idx`, to change it: only a pending transfer changes, and those stay in memory.
    pub fn get_mut(&mut self, idx: TransferIdx) -> &mut TransferRec {
        if idx >= self.spilled {
            return &mut self.tail[(idx - self.spilled) as usize];
        }
        self.resident
            .get_mut(&idx)
            .expect("only pending transfers change, and they stay in memory")
    }

    /// Appends a new transfer.
    pub fn push(&mut self, id: TransferId, record: TransferRec) -> TransferIdx {
        let idx = self.len() as TransferIdx;
        self.tail.push(record);
        self.index.insert(id, idx);
        idx
    }

    /// The index of transfer `id`: memory first, then the rows' id index. An id index entry
    /// at or beyond `spilled` is not this history's (records lost after a checkpoint leave
    /// entries of a spill that was undone), so it is ignored.
    pub fn idx_of(&self, id: TransferId) -> Option<TransferIdx> {
        if let Some(&idx) = self.index.get(&id) {
            return Some(idx);
        }
        let disk = self.disk.as_ref().filter(|_| self.spilled > 0)?;
        let idx = disk
            .transfer_row_idx(id.0)
            .unwrap_or_else(|e| panic!("ledger storage failed reading the id index: {e}"))?;
        (idx < self.spilled && !self.resident.contains_key(&idx)).then_some(idx)
    }

    /// Whether transfer `id` exists in memory (the replay's check of a reused id; decisions
    /// look on disk too, through [`Transfers::idx_of`]).
    pub fn in_memory(&self, id: TransferId) -> bool {
        self.index.contains_key(&id)
    }

    fn read(&self, idx: TransferIdx) -> TransferRec {
        let disk = self
            .disk
            .as_ref()
            .expect("a transfer below the spill point was written to the storage");
        let bytes = disk
            .transfer_row(idx)
            .unwrap_or_else(|e| panic!("ledger storage failed reading transfer {idx}: {e}"))
            .unwrap_or_else(|| panic!("ledger storage lost the row of transfer {idx}"));
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
        };
        let (record, _link) = super::checkpoint::read_row(&mut r)
            .unwrap_or_else(|e| panic!("ledger storage: row of transfer {idx} is corrupt: {e}"));
        record
    }
}
