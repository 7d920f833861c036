//! Payments held for their payee to accept, durably (sled, in the payment database).
//!
//! Trees (transfer ids as 16 big-endian bytes):
//! - `transferid_held`: transfer id -> [`HeldRecord`], JSON; kept after it settled (to answer
//!   a late ✅ with "already settled") until pruned.
//! - `eventid_transferid`: the bot's notice of a held payment (the one the payee reacts or
//!   replies to) -> transfer id.
//! - `payee_transferids`: payee + NUL + transfer id -> empty, while the payment is open
//!   (waiting for the payer's PIN, or for the payee): the per-payee bound.
//! - `dueat_transferid`: due time (BE; the PIN deadline until the payee was asked, then the
//!   return time) + transfer id -> empty, while open: the sweep's list of what is due next.
//! - `settledat_transferid`: settled time (BE) + transfer id -> empty, once settled: pruned
//!   after [`HeldBounds::settled_keep_ms`] or beyond [`HeldBounds::settled_total_max`].
//!
//! Every change is one write under one lock, flushed and fdatasync'ed before it returns.

use std::fmt;
use std::sync::Arc;

use matrix_sdk::ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use super::StoreError;

const TRANSFERID_HELD: &str = "transferid_held";
const EVENTID_TRANSFERID: &str = "eventid_transferid";
const PAYEE_TRANSFERIDS: &str = "payee_transferids";
const DUEAT_TRANSFERID: &str = "dueat_transferid";
const SETTLEDAT_TRANSFERID: &str = "settledat_transferid";

/// Bounds of the held-payment store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldBounds {
    /// Open held payments to one payee (`too_many_held` beyond).
    pub open_per_payee_max: usize,
    /// Open held payments in all (`too_many_held` beyond).
    pub open_total_max: usize,
    /// How long a settled one is kept to answer late reactions.
    pub settled_keep_ms: u64,
    /// Most settled ones kept (the oldest pruned first).
    pub settled_total_max: usize,
}

impl Default for HeldBounds {
    fn default() -> Self {
        Self {
            open_per_payee_max: 50,
            open_total_max: 10_000,
            settled_keep_ms: 30 * 24 * 3_600_000,
            settled_total_max: 100_000,
        }
    }
}

/// Where a held payment stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HeldState {
    /// Reserved, waiting for the payer's PIN (then it is held, not posted).
    AwaitingPin,
    /// Confirmed by the payer; waiting for the payee.
    Held,
    /// The payee accepted it with event `by`: posted.
    Accepted {
        /// The accepting reaction or reply.
        by: OwnedEventId,
    },
    /// The payee declined it with event `by`: voided, back with the payer.
    Declined {
        /// The declining reaction or reply.
        by: OwnedEventId,
    },
    /// Not accepted in time: back with the payer.
    Returned,
    /// The payer never confirmed it: released, nothing was held.
    Lapsed,
}

impl HeldState {
    /// Still open (counted against the bounds, in the sweep's list).
    pub fn is_open(&self) -> bool {
        matches!(self, Self::AwaitingPin | Self::Held)
    }
}

/// A payment held for its payee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRecord {
    /// The pending ledger transfer (its id comes from the paying event).
    #[serde(with = "u128_string")]
    pub transfer_id: u128,
    /// Who pays.
    pub payer: OwnedUserId,
    /// Who must accept it.
    pub payee: OwnedUserId,
    /// Where it was asked for (and where the payee is told).
    pub room_id: OwnedRoomId,
    /// The paying event (`!pay`, transfer intent, ...).
    pub paying_event_id: OwnedEventId,
    /// Amount, in minor units.
    #[serde(with = "u128_string")]
    pub amount_minor: u128,
    /// Amount as shown (major units with the currency's decimals).
    pub amount: String,
    /// ISO 4217 code.
    pub currency: String,
    /// Until when the payer may confirm it with their PIN.
    pub pin_deadline_ms: u64,
    /// When it goes back to the payer by itself (the ledger reservation's own deadline).
    pub return_at_ms: u64,
    /// The bot's message the payee answers (once sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice_event_id: Option<OwnedEventId>,
    /// Where it stands.
    pub state: HeldState,
}

impl HeldRecord {
    /// When the sweep looks at it next.
    fn due_ms(&self) -> u64 {
        match self.state {
            HeldState::AwaitingPin => self.pin_deadline_ms,
            // Confirmed but its notice never went out (a crash, a homeserver down): the sweep
            // sends it at the end of the PIN window at the latest.
            HeldState::Held if self.notice_event_id.is_none() => self.pin_deadline_ms,
            _ => self.return_at_ms,
        }
    }
}

mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What [`HeldStore::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldInserted {
    /// Stored.
    Stored,
    /// One with this transfer id exists (the paying event handled again): unchanged.
    Exists(Box<HeldRecord>),
    /// Over a bound: nothing was written.
    Full,
}

/// The held-payment trees. Cheap to clone.
#[derive(Clone)]
pub struct HeldStore {
    db: sled::Db,
    log: Arc<std::fs::File>,
    held: sled::Tree,
    by_notice: sled::Tree,
    by_payee: sled::Tree,
    due: sled::Tree,
    settled: sled::Tree,
    lock: Arc<parking_lot::Mutex<()>>,
}

impl fmt::Debug for HeldStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldStore").finish_non_exhaustive()
    }
}

fn payee_key(payee: &UserId, transfer_id: u128) -> Vec<u8> {
    let mut key = payee.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&transfer_id.to_be_bytes());
    key
}

fn payee_prefix(payee: &UserId) -> Vec<u8> {
    let mut key = payee.as_bytes().to_vec();
    key.push(0);
    key
}

fn time_key(at_ms: u64, transfer_id: u128) -> Vec<u8> {
    let mut key = at_ms.to_be_bytes().to_vec();
    key.extend_from_slice(&transfer_id.to_be_bytes());
    key
}

fn id_of_time_key(key: &[u8]) -> Option<u128> {
    Some(u128::from_be_bytes(key.get(8..24)?.try_into().ok()?))
}

impl HeldStore {
    /// The trees in `db` (the payment database; `log` is its log file).
    pub(super) fn in_db(db: sled::Db, log: Arc<std::fs::File>) -> Result<Self, StoreError> {
        Ok(Self {
            held: db.open_tree(TRANSFERID_HELD)?,
            by_notice: db.open_tree(EVENTID_TRANSFERID)?,
            by_payee: db.open_tree(PAYEE_TRANSFERIDS)?,
            due: db.open_tree(DUEAT_TRANSFERID)?,
            settled: db.open_tree(SETTLEDAT_TRANSFERID)?,
            lock: Default::default(),
            db,
            log,
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (db, log) = (self.db.clone(), self.log.clone());
        tokio::task::spawn_blocking(move || crate::sled_open::flush_durably(&db, &log)).await??;
        Ok(())
    }

    /// The held payment of transfer `transfer_id`, if any.
    pub fn get(&self, transfer_id: u128) -> Result<Option<HeldRecord>, StoreError> {
        match self.held.get(transfer_id.to_be_bytes())? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|_| StoreError::Corrupt {
                        tree: TRANSFERID_HELD,
                        reason: "value is not a held payment",
                    })
            }
        }
    }

    /// The held payment whose notice is `event_id`, if any.
    pub fn by_notice(&self, event_id: &EventId) -> Result<Option<HeldRecord>, StoreError> {
        match self.by_notice.get(event_id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => {
                let id: [u8; 16] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    tree: EVENTID_TRANSFERID,
                    reason: "value is not a transfer id",
                })?;
                self.get(u128::from_be_bytes(id))
            }
        }
    }

    /// Whether one more open held payment to `payee` fits within `bounds`.
    pub fn has_room(&self, payee: &UserId, bounds: HeldBounds) -> Result<bool, StoreError> {
        let per_payee = self
            .by_payee
            .scan_prefix(payee_prefix(payee))
            .take(bounds.open_per_payee_max)
            .count();
        Ok(per_payee < bounds.open_per_payee_max && self.due.len() < bounds.open_total_max)
    }

    /// Stores a new held payment (open), within `bounds`.
    pub async fn insert(
        &self,
        record: &HeldRecord,
        bounds: HeldBounds,
    ) -> Result<HeldInserted, StoreError> {
        debug_assert!(record.state.is_open());
        let inserted = {
            let _guard = self.lock.lock();
            if let Some(existing) = self.get(record.transfer_id)? {
                HeldInserted::Exists(Box::new(existing))
            } else if !self.has_room(&record.payee, bounds)? {
                HeldInserted::Full
            } else {
                self.write(None, record, 0, bounds)?;
                HeldInserted::Stored
            }
        };
        if inserted != HeldInserted::Full {
            // Also for `Exists`: an earlier insert whose flush failed (or is still running)
            // is told as stored now, so it must be durable.
            self.flush().await?;
        }
        Ok(inserted)
    }

    /// Replaces the stored record with `record` (same transfer id), keeping the indexes in
    /// step; `now_ms` dates a settlement. Absent: nothing is written.
    pub async fn update(
        &self,
        record: &HeldRecord,
        now_ms: u64,
        bounds: HeldBounds,
    ) -> Result<(), StoreError> {
        {
            let _guard = self.lock.lock();
            let Some(before) = self.get(record.transfer_id)? else {
                return Ok(());
            };
            // The same record (a retry): written before, maybe without a flush that succeeded.
            if before != *record {
                self.write(Some(&before), record, now_ms, bounds)?;
            }
        }
        self.flush().await
    }

    fn write(
        &self,
        before: Option<&HeldRecord>,
        after: &HeldRecord,
        now_ms: u64,
        bounds: HeldBounds,
    ) -> Result<(), StoreError> {
        let id = after.transfer_id;
        let mut held = sled::Batch::default();
        let mut by_notice = sled::Batch::default();
        let mut by_payee = sled::Batch::default();
        let mut due = sled::Batch::default();
        let mut settled = sled::Batch::default();
        if let Some(before) = before {
            if before.state.is_open() {
                due.remove(time_key(before.due_ms(), id));
            }
        }
        if after.state.is_open() {
            due.insert(time_key(after.due_ms(), id), &[][..]);
            by_payee.insert(payee_key(&after.payee, id), &[][..]);
        } else {
            by_payee.remove(payee_key(&after.payee, id));
            if before.is_none_or(|b| b.state.is_open()) {
                settled.insert(time_key(now_ms, id), &[][..]);
            }
        }
        if let Some(notice) = &after.notice_event_id {
            by_notice.insert(notice.as_bytes(), &id.to_be_bytes()[..]);
        }
        held.insert(
            &id.to_be_bytes()[..],
            serde_json::to_vec(after).expect("held records serialise"),
        );
        // Settled records beyond what is kept go, oldest first (a few per write: bounded work).
        let keep_from = now_ms.saturating_sub(bounds.settled_keep_ms);
        let over = self
            .settled
            .len()
            .saturating_sub(bounds.settled_total_max.saturating_sub(1));
        for (n, entry) in self.settled.iter().take(8).enumerate() {
            let (key, _) = entry?;
            let at = u64::from_be_bytes(key[..8].try_into().unwrap_or([0; 8]));
            if at >= keep_from && n >= over {
                break;
            }
            if let Some(old_id) = id_of_time_key(&key) {
                if let Some(old) = self.get(old_id)? {
                    if let Some(notice) = &old.notice_event_id {
                        by_notice.remove(notice.as_bytes());
                    }
                }
                held.remove(&old_id.to_be_bytes()[..]);
            }
            settled.remove(key);
        }
        use sled::Transactional as _;
        (
            &self.held,
            &self.by_notice,
            &self.by_payee,
            &self.due,
            &self.settled,
        )
            .transaction(|(h, n, p, d, s)| {
                h.apply_batch(&held)?;
                n.apply_batch(&by_notice)?;
                p.apply_batch(&by_payee)?;
                d.apply_batch(&due)?;
                s.apply_batch(&settled)?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => StoreError::Corrupt {
                    tree: TRANSFERID_HELD,
                    reason: "transaction aborted",
                },
            })?;
        Ok(())
    }

    /// Up to `max` open held payments due at or before `now_ms`, earliest first.
    pub fn due(&self, now_ms: u64, max: usize) -> Result<Vec<HeldRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in self
            .due
            .range(..time_key(now_ms.saturating_add(1), 0))
            .take(max)
        {
            let (key, _) = entry?;
            if let Some(record) = id_of_time_key(&key).map(|id| self.get(id)).transpose()? {
                out.extend(record);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::{owned_event_id, owned_room_id, owned_user_id};

    use super::*;

    fn record(id: u128, payee: &str) -> HeldRecord {
        HeldRecord {
            transfer_id: id,
            payer: owned_user_id!("@alice:s"),
            payee: OwnedUserId::try_from(payee).unwrap(),
            room_id: owned_room_id!("!r:s"),
            paying_event_id: owned_event_id!("$pay"),
            amount_minor: 500,
            amount: "5.00".into(),
            currency: "EUR".into(),
            pin_deadline_ms: 100,
            return_at_ms: 1_000,
            notice_event_id: None,
            state: HeldState::AwaitingPin,
        }
    }

    fn store() -> (tempfile::TempDir, HeldStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = Arc::new(crate::sled_open::log_file(dir.path()).unwrap());
        let store = HeldStore::in_db(db, log).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn lifecycle_indexes_and_bounds() {
        let (_dir, store) = store();
        let bounds = HeldBounds {
            open_per_payee_max: 2,
            ..HeldBounds::default()
        };
        let a = record(1, "@bob:s");
        assert_eq!(
            store.insert(&a, bounds).await.unwrap(),
            HeldInserted::Stored
        );
        assert!(matches!(
            store.insert(&a, bounds).await.unwrap(),
            HeldInserted::Exists(_)
        ));
        assert_eq!(
            store.insert(&record(2, "@bob:s"), bounds).await.unwrap(),
            HeldInserted::Stored
        );
        assert_eq!(
            store.insert(&record(3, "@bob:s"), bounds).await.unwrap(),
            HeldInserted::Full
        );
        assert_eq!(
            store.insert(&record(3, "@carol:s"), bounds).await.unwrap(),
            HeldInserted::Stored
        );
        // Due by the PIN deadline while awaiting the PIN, then by the return time.
        assert_eq!(store.due(99, 10).unwrap().len(), 0);
        assert_eq!(store.due(100, 10).unwrap().len(), 3);
        let mut held = a.clone();
        held.state = HeldState::Held;
        held.notice_event_id = Some(owned_event_id!("$notice"));
        store.update(&held, 50, bounds).await.unwrap();
        assert_eq!(store.due(100, 10).unwrap().len(), 2);
        assert_eq!(store.due(1_000, 10).unwrap().len(), 3);
        assert_eq!(
            store.by_notice(&owned_event_id!("$notice")).unwrap(),
            Some(held.clone())
        );
        // Settled: out of the bounds and the sweep, still found by its notice.
        let mut accepted = held.clone();
        accepted.state = HeldState::Accepted {
            by: owned_event_id!("$yes"),
        };
        store.update(&accepted, 60, bounds).await.unwrap();
        assert_eq!(store.due(10_000, 10).unwrap().len(), 2);
        assert_eq!(
            store.insert(&record(4, "@bob:s"), bounds).await.unwrap(),
            HeldInserted::Stored
        );
        assert_eq!(store.get(1).unwrap(), Some(accepted));
    }
}
