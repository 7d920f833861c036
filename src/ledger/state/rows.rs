//! The transfers of the state: the ones after the last spill and the pending ones in memory,
//! the ended ones before it read back from the storage's rows (see docs/ledger.md, Memory).

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::ledger::state::HashMap;
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
    /// One filter of the ids of each spill's rows: an id none of them may contain is not on
    /// disk, without a read.
    pub filters: Vec<IdFilter>,
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
        if !self.filters.iter().any(|f| f.may_contain(id)) {
            return None;
        }
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

/// Bits per id of an [`IdFilter`], and the probes per lookup: about 1% false positives.
const FILTER_BITS_PER_ID: usize = 16;
const FILTER_PROBES: u64 = 7;

/// A Bloom filter of the ids of one spill's rows: "not on disk" without a read for almost
/// every new id (each create looks its id up for idempotency). Never a false negative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IdFilter {
    words: Vec<u64>,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser: ids may be sequential, the probes must not be.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl IdFilter {
    /// A filter of `ids`.
    pub fn of(ids: impl ExactSizeIterator<Item = TransferId>) -> Self {
        let bits = (ids.len() * FILTER_BITS_PER_ID).max(64);
        let mut filter = Self {
            words: vec![0; bits.div_ceil(64)],
        };
        for id in ids {
            for bit in filter.probes(id) {
                filter.words[(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        filter
    }

    fn probes(&self, id: TransferId) -> impl Iterator<Item = u64> {
        let bits = self.words.len() as u64 * 64;
        let h1 = mix(id.0 as u64 ^ mix((id.0 >> 64) as u64));
        let h2 = mix(h1 ^ 0x9e37_79b9_7f4a_7c15) | 1;
        (0..FILTER_PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bits)
    }

    /// Whether `id` may be among the filter's ids (`false`: it certainly is not).
    pub fn may_contain(&self, id: TransferId) -> bool {
        self.probes(id)
            .all(|bit| self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// Appends the filter (word count, then the words).
    pub fn encode(&self, out: &mut Vec<u8>) {
        crate::ledger::codec::put_varint(out, self.words.len() as u128);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }

    /// Reads a filter written by [`IdFilter::encode`].
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, String> {
        let n = usize::try_from(r.varint()?).map_err(|_| "filter size out of range")?;
        if n == 0 || n > (r.bytes.len() - r.pos) / 8 {
            return Err(format!("filter of {n} words beyond the checkpoint's end"));
        }
        let mut words = Vec::with_capacity(n);
        for _ in 0..n {
            words.push(u64::from_le_bytes(r.array()?));
        }
        Ok(Self { words })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15: the filter never says "not on disk" for an id it holds (a false negative
    /// would make a retry of a transfer on disk create it again), and says "maybe" for few
    /// others, sequential or not.
    #[test]
    fn the_id_filter_holds_every_id_and_few_others() {
        let ids: Vec<TransferId> = (1..=20_000u128).map(TransferId).collect();
        let filter = IdFilter::of(ids.iter().copied());
        assert!(ids.iter().all(|&id| filter.may_contain(id)));
        let others = (20_001..=120_000u128)
            .map(TransferId)
            .chain((1..=100_000u128).map(|i| TransferId(i << 64)))
            .filter(|&id| filter.may_contain(id))
            .count();
        assert!(
            others < 200_000 * 3 / 100,
            "{others} false positives in 200,000"
        );
        let mut bytes = Vec::new();
        filter.encode(&mut bytes);
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
        };
        assert_eq!(IdFilter::decode(&mut r).unwrap(), filter);
    }
}
