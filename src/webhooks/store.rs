//! The webhook outbox's records, durable in sled under `<data_dir>/webhooks/`.
//!
//! Two trees, always written together in one transaction and flushed (with fdatasync) before
//! a call returns: `eventid_delivery` (the record, JSON) and `dueatms_eventid` (for pending
//! records only: the big-endian due time then the event id, so the due ones are a prefix
//! scan). Counts per merchant and state are kept in memory, rebuilt on open, and checked
//! against the bounds on every enqueue.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

use super::schedule::{DeliveryRecord, DeliveryState, WebhookPolicy};
use super::{EventBody, EventType, WebhookError, DATA_BYTES_MAX, ID_BYTES_MAX};

/// Tree of records by event id.
const RECORDS_TREE: &str = "eventid_delivery";
/// Tree of pending records by due time.
const DUE_TREE: &str = "dueatms_eventid";

/// Most records returned by one [`WebhookStore::list`] call.
pub const LIST_PAGE_MAX: usize = 500;

/// What [`WebhookStore::enqueue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// A new pending record.
    New(DeliveryRecord),
    /// The event id was enqueued before: nothing changed (the stored record is returned).
    Exists(DeliveryRecord),
}

/// Which records [`WebhookStore::list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this state.
    pub state: Option<DeliveryState>,
    /// Only this merchant's.
    pub merchant_id: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    pending: usize,
    delivered: usize,
    failed: usize,
}

impl Counts {
    fn slot(&mut self, state: DeliveryState) -> &mut usize {
        match state {
            DeliveryState::Pending => &mut self.pending,
            DeliveryState::Delivered => &mut self.delivered,
            DeliveryState::Failed => &mut self.failed,
        }
    }

    fn total(&self) -> usize {
        self.pending + self.delivered + self.failed
    }
}

/// Record counts by state, in all.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Waiting for an attempt.
    pub pending: usize,
    /// Delivered, not yet pruned.
    pub delivered: usize,
    /// Failed, kept for inspection and replay.
    pub failed: usize,
}

/// The webhook outbox store. Clones share the database.
#[derive(Clone)]
pub struct WebhookStore {
    db: sled::Db,
    log: Arc<std::fs::File>,
    records: sled::Tree,
    due: sled::Tree,
    policy: WebhookPolicy,
    /// Counts per merchant; the lock also orders every write, so a count never disagrees with
    /// the trees.
    counts: Arc<Mutex<HashMap<String, Counts>>>,
}

impl std::fmt::Debug for WebhookStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookStore").finish_non_exhaustive()
    }
}

fn check_id(what: &'static str, id: &str) -> Result<(), WebhookError> {
    if id.is_empty() || id.len() > ID_BYTES_MAX || id.chars().any(char::is_control) {
        return Err(WebhookError::InvalidId { what });
    }
    Ok(())
}

/// Due time (8 bytes, big-endian), the merchant id's length (1 byte) and the merchant id, then
/// the event id: the worker skips a busy merchant's records without reading them.
fn due_key(record: &DeliveryRecord) -> Vec<u8> {
    let merchant = record.merchant_id.as_bytes();
    let mut key = Vec::with_capacity(9 + merchant.len() + record.event_id.len());
    key.extend_from_slice(&record.next_attempt_at_ms.to_be_bytes());
    key.push(u8::try_from(merchant.len()).expect("merchant ids are at most 255 bytes"));
    key.extend_from_slice(merchant);
    key.extend_from_slice(record.event_id.as_bytes());
    key
}

/// (merchant id, event id) of a due key.
fn split_due_key(key: &[u8]) -> Option<(&str, &str)> {
    let merchant_len = usize::from(*key.get(8)?);
    let merchant = key.get(9..9 + merchant_len)?;
    let event = key.get(9 + merchant_len..)?;
    Some((
        std::str::from_utf8(merchant).ok()?,
        std::str::from_utf8(event).ok()?,
    ))
}

fn decode(bytes: &[u8]) -> Result<DeliveryRecord, WebhookError> {
    serde_json::from_slice(bytes).map_err(|e| WebhookError::Corrupt(e.to_string()))
}

fn encode(record: &DeliveryRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("a delivery record serialises")
}

type TxError = TransactionError<WebhookError>;

fn from_tx(error: TxError) -> WebhookError {
    match error {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => WebhookError::Store(e),
    }
}

impl WebhookStore {
    /// Opens (or creates) the store in `dir`, counting what it holds.
    pub fn open(dir: &Path, policy: WebhookPolicy) -> Result<Self, WebhookError> {
        // Every write flushes explicitly; a background flusher would only add fsyncs.
        let config = sled::Config::new().path(dir).flush_every_ms(None);
        let db = crate::sled_open::open_waiting_for_lock(&config)?;
        let log = crate::sled_open::log_file(dir).map_err(sled::Error::Io)?;
        let records = db.open_tree(RECORDS_TREE)?;
        let due = db.open_tree(DUE_TREE)?;
        let mut counts: HashMap<String, Counts> = HashMap::new();
        for item in records.iter() {
            let (_, value) = item?;
            let record = decode(&value)?;
            *counts
                .entry(record.merchant_id.clone())
                .or_default()
                .slot(record.state) += 1;
        }
        Ok(Self {
            db,
            log: Arc::new(log),
            records,
            due,
            policy,
            counts: Arc::new(Mutex::new(counts)),
        })
    }

    /// The policy the store bounds itself by.
    pub fn policy(&self) -> &WebhookPolicy {
        &self.policy
    }

    fn flush(&self) -> Result<(), WebhookError> {
        crate::sled_open::flush_durably(&self.db, &self.log)?;
        Ok(())
    }

    /// Enqueues an event for `merchant_id`, durably, due at once. Idempotent by `event_id`:
    /// an id enqueued before changes nothing (whatever the `data` now), so a producer may feed
    /// its source again after a crash. A pruned delivered record's id is new again: the
    /// retention must be longer than the producer ever re-feeds.
    pub fn enqueue(
        &self,
        merchant_id: &str,
        event_type: EventType,
        event_id: &str,
        data: serde_json::Value,
        now_ms: u64,
    ) -> Result<Enqueued, WebhookError> {
        check_id("event id", event_id)?;
        check_id("merchant id", merchant_id)?;
        let data_len = serde_json::to_vec(&data)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if data_len > DATA_BYTES_MAX {
            return Err(WebhookError::DataTooLarge {
                len_bytes: data_len,
            });
        }
        let mut counts = self.counts.lock();
        if let Some(existing) = self.records.get(event_id.as_bytes())? {
            // Told as queued: an earlier enqueue whose flush failed must be durable now.
            self.flush()?;
            return Ok(Enqueued::Exists(decode(&existing)?));
        }
        let merchant = counts.get(merchant_id).copied().unwrap_or_default();
        if merchant.pending >= self.policy.pending_per_merchant_max {
            return Err(WebhookError::MerchantQueueFull {
                merchant_id: merchant_id.to_owned(),
            });
        }
        let total: usize = counts.values().map(Counts::total).sum();
        if total >= self.policy.records_max {
            drop(counts);
            // Make room from the oldest delivered records, then look again.
            let pruned = self.prune_delivered(u64::MAX, total + 1 - self.policy.records_max)?;
            counts = self.counts.lock();
            let total: usize = counts.values().map(Counts::total).sum();
            if pruned == 0 || total >= self.policy.records_max {
                return Err(WebhookError::QueueFull);
            }
            if let Some(existing) = self.records.get(event_id.as_bytes())? {
                self.flush()?;
                return Ok(Enqueued::Exists(decode(&existing)?));
            }
        }
        let body = EventBody {
            id: event_id.to_owned(),
            event_type,
            created_ms: now_ms,
            data,
        };
        let body = serde_json::to_string(&body).expect("an event body serialises");
        let record = DeliveryRecord::new(
            event_id.to_owned(),
            merchant_id.to_owned(),
            event_type,
            body,
            now_ms,
            &self.policy,
        );
        let value = encode(&record);
        let due = due_key(&record);
        (&self.records, &self.due)
            .transaction(|(records, dues)| {
                records.insert(record.event_id.as_bytes(), value.as_slice())?;
                dues.insert(due.as_slice(), &[])?;
                Ok::<_, ConflictableTransactionError<WebhookError>>(())
            })
            .map_err(from_tx)?;
        self.flush()?;
        counts.entry(merchant_id.to_owned()).or_default().pending += 1;
        Ok(Enqueued::New(record))
    }

    /// The record of `event_id`.
    pub fn get(&self, event_id: &str) -> Result<Option<DeliveryRecord>, WebhookError> {
        self.records
            .get(event_id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Up to `limit` pending records due at `now_ms`, earliest first, skipping those for which
    /// `skip(event_id, merchant_id)` is true (in flight already, or a merchant at its limit).
    pub fn due(
        &self,
        now_ms: u64,
        limit: usize,
        mut skip: impl FnMut(&str, &str) -> bool,
    ) -> Result<Vec<DeliveryRecord>, WebhookError> {
        let mut out = Vec::new();
        let end = now_ms.saturating_add(1).to_be_bytes();
        for item in self.due.range(..end.as_slice()) {
            if out.len() >= limit {
                break;
            }
            let (key, _) = item?;
            let (merchant_id, event_id) = split_due_key(&key)
                .ok_or_else(|| WebhookError::Corrupt("a due key does not decode".into()))?;
            if skip(event_id, merchant_id) {
                continue;
            }
            let Some(record) = self.get(event_id)? else {
                continue;
            };
            if record.state == DeliveryState::Pending {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Writes `updated` over the stored record of the same id (its due entry follows its
    /// state), unless `change` finds nothing to change. `change` runs under the store's lock
    /// on the stored record, so a replay and an attempt's answer never overwrite each other.
    pub fn update(
        &self,
        event_id: &str,
        change: impl FnOnce(&mut DeliveryRecord) -> bool,
    ) -> Result<Option<DeliveryRecord>, WebhookError> {
        let mut counts = self.counts.lock();
        let Some(before) = self.get(event_id)? else {
            return Ok(None);
        };
        let mut after = before.clone();
        if !change(&mut after) {
            return Ok(Some(after));
        }
        assert_eq!(after.event_id, before.event_id, "a record keeps its id");
        assert_eq!(after.merchant_id, before.merchant_id, "and its merchant");
        let value = encode(&after);
        let old_due = (before.state == DeliveryState::Pending).then(|| due_key(&before));
        let new_due = (after.state == DeliveryState::Pending).then(|| due_key(&after));
        (&self.records, &self.due)
            .transaction(|(records, dues)| {
                records.insert(after.event_id.as_bytes(), value.as_slice())?;
                if let Some(key) = &old_due {
                    dues.remove(key.as_slice())?;
                }
                if let Some(key) = &new_due {
                    dues.insert(key.as_slice(), &[])?;
                }
                Ok::<_, ConflictableTransactionError<WebhookError>>(())
            })
            .map_err(from_tx)?;
        self.flush()?;
        let merchant = counts.entry(after.merchant_id.clone()).or_default();
        *merchant.slot(before.state) -= 1;
        *merchant.slot(after.state) += 1;
        let over_failed = merchant.failed > self.policy.failed_per_merchant_max;
        drop(counts);
        if over_failed && after.state == DeliveryState::Failed {
            self.drop_oldest_failed(&after.merchant_id)?;
        }
        Ok(Some(after))
    }

    /// Deletes `merchant_id`'s oldest failed records beyond `failed_per_merchant_max`.
    fn drop_oldest_failed(&self, merchant_id: &str) -> Result<(), WebhookError> {
        let mut counts = self.counts.lock();
        let failed = counts.get(merchant_id).map_or(0, |c| c.failed);
        let excess = failed.saturating_sub(self.policy.failed_per_merchant_max);
        if excess == 0 {
            return Ok(());
        }
        let mut oldest: Vec<(u64, String)> = Vec::new();
        for item in self.records.iter() {
            let (_, value) = item?;
            let record = decode(&value)?;
            if record.merchant_id == merchant_id && record.state == DeliveryState::Failed {
                oldest.push((record.finished_ms.unwrap_or(0), record.event_id));
            }
        }
        oldest.sort();
        for (_, event_id) in oldest.iter().take(excess) {
            self.records.remove(event_id.as_bytes())?;
            tracing::warn!(merchant = merchant_id, event = %event_id, "deleted a failed webhook event: the merchant has too many failed ones");
        }
        self.flush()?;
        if let Some(c) = counts.get_mut(merchant_id) {
            c.failed -= excess.min(oldest.len());
        }
        Ok(())
    }

    /// Deletes delivered records finished before `before_ms`, oldest first, at most `limit`.
    /// Returns how many went.
    pub fn prune_delivered(&self, before_ms: u64, limit: usize) -> Result<usize, WebhookError> {
        let mut counts = self.counts.lock();
        let mut old: Vec<(u64, String, String)> = Vec::new();
        for item in self.records.iter() {
            let (_, value) = item?;
            let record = decode(&value)?;
            let finished_ms = record.finished_ms.unwrap_or(0);
            if record.state == DeliveryState::Delivered && finished_ms < before_ms {
                old.push((finished_ms, record.event_id, record.merchant_id));
            }
        }
        old.sort();
        old.truncate(limit);
        for (_, event_id, merchant_id) in &old {
            self.records.remove(event_id.as_bytes())?;
            if let Some(c) = counts.get_mut(merchant_id) {
                c.delivered -= 1;
            }
        }
        if !old.is_empty() {
            self.flush()?;
        }
        counts.retain(|_, c| c.total() > 0);
        Ok(old.len())
    }

    /// Puts a delivered or failed record back to pending with a fresh schedule. With
    /// `merchant_id`, only that merchant's record is found (another's is `NotFound`, so a
    /// merchant learns nothing of other merchants' event ids). Returns the record and whether
    /// it changed (a pending one is left as it is).
    pub fn replay(
        &self,
        event_id: &str,
        merchant_id: Option<&str>,
        now_ms: u64,
    ) -> Result<(DeliveryRecord, bool), WebhookError> {
        let not_found = || WebhookError::NotFound(event_id.to_owned());
        let record = self.get(event_id)?.ok_or_else(not_found)?;
        if merchant_id.is_some_and(|m| m != record.merchant_id) {
            return Err(not_found());
        }
        let policy = self.policy;
        let mut changed = false;
        let record = self
            .update(event_id, |r| {
                changed = r.replay(now_ms, &policy);
                changed
            })?
            .ok_or_else(not_found)?;
        Ok((record, changed))
    }

    /// Records matching `filter`, in event-id order, after `after` (the last id of the
    /// previous page), at most `limit` (capped at [`LIST_PAGE_MAX`]).
    pub fn list(
        &self,
        filter: &ListFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, WebhookError> {
        let limit = limit.clamp(1, LIST_PAGE_MAX);
        let mut out = Vec::new();
        let iter = match after {
            Some(after) => {
                let mut start = after.as_bytes().to_vec();
                start.push(0);
                self.records.range(start..)
            }
            None => self.records.iter(),
        };
        for item in iter {
            let (_, value) = item?;
            let record = decode(&value)?;
            if filter.state.is_some_and(|s| s != record.state)
                || filter
                    .merchant_id
                    .as_deref()
                    .is_some_and(|m| m != record.merchant_id)
            {
                continue;
            }
            out.push(record);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Counts in all, by state.
    pub fn totals(&self) -> Totals {
        let counts = self.counts.lock();
        let mut totals = Totals::default();
        for c in counts.values() {
            totals.pending += c.pending;
            totals.delivered += c.delivered;
            totals.failed += c.failed;
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> WebhookPolicy {
        WebhookPolicy {
            records_max: 100,
            pending_per_merchant_max: 3,
            failed_per_merchant_max: 2,
            ..WebhookPolicy::default()
        }
    }

    fn data() -> serde_json::Value {
        serde_json::json!({"invoice": {"id": "inv_1", "status": "paid"}})
    }

    #[test]
    fn enqueue_is_idempotent_by_event_id_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = WebhookStore::open(dir.path(), policy()).unwrap();
            let first = store
                .enqueue("cafe", EventType::InvoicePaid, "evt_1", data(), 1_000)
                .unwrap();
            let Enqueued::New(record) = first else {
                panic!("{first:?}")
            };
            let body: EventBody = serde_json::from_str(&record.body).unwrap();
            assert_eq!(body.id, "evt_1");
            assert_eq!(body.event_type, EventType::InvoicePaid);
            assert_eq!(body.created_ms, 1_000);
            assert_eq!(body.data, data());
            let again = store
                .enqueue(
                    "cafe",
                    EventType::InvoicePaid,
                    "evt_1",
                    serde_json::json!({"other": true}),
                    2_000,
                )
                .unwrap();
            assert_eq!(again, Enqueued::Exists(record));
        }
        let store = WebhookStore::open(dir.path(), policy()).unwrap();
        assert!(matches!(
            store
                .enqueue("cafe", EventType::InvoicePaid, "evt_1", data(), 3_000)
                .unwrap(),
            Enqueued::Exists(_)
        ));
        assert_eq!(store.totals().pending, 1);
        assert_eq!(store.due(999, 10, |_, _| false).unwrap().len(), 0);
        assert_eq!(store.due(1_000, 10, |_, _| false).unwrap().len(), 1);
    }

    #[test]
    fn bounds_per_merchant_and_in_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = WebhookStore::open(dir.path(), policy()).unwrap();
        for i in 0..3 {
            store
                .enqueue("cafe", EventType::InvoicePaid, &format!("e{i}"), data(), 1)
                .unwrap();
        }
        let err = store
            .enqueue("cafe", EventType::InvoicePaid, "e3", data(), 1)
            .unwrap_err();
        assert_eq!(err.code(), "merchant_queue_full");
        assert!(err.is_transient());
        store
            .enqueue("shop", EventType::InvoicePaid, "s0", data(), 1)
            .unwrap();
        let big = serde_json::json!({ "x": "a".repeat(DATA_BYTES_MAX) });
        assert_eq!(
            store
                .enqueue("shop", EventType::InvoicePaid, "s1", big, 1)
                .unwrap_err()
                .code(),
            "data_too_large"
        );
        for bad in ["", "a\nb"] {
            assert_eq!(
                store
                    .enqueue("shop", EventType::InvoicePaid, bad, data(), 1)
                    .unwrap_err()
                    .code(),
                "invalid_id"
            );
        }
    }

    #[test]
    fn a_full_store_prunes_delivered_records_first_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let policy = WebhookPolicy {
            records_max: 100,
            pending_per_merchant_max: 60,
            ..WebhookPolicy::default()
        };
        let store = WebhookStore::open(dir.path(), policy).unwrap();
        for i in 0..100 {
            let merchant = if i < 60 { "m" } else { "n" };
            store
                .enqueue(
                    merchant,
                    EventType::InvoicePaid,
                    &format!("e{i:03}"),
                    data(),
                    1,
                )
                .unwrap();
        }
        assert_eq!(
            store
                .enqueue("n", EventType::InvoicePaid, "x", data(), 1)
                .unwrap_err()
                .code(),
            "queue_full"
        );
        let delivered = super::super::schedule::Attempt::Delivered(200);
        store
            .update("e007", |r| r.after_attempt(delivered, 5, &policy, 0))
            .unwrap();
        store
            .enqueue("n", EventType::InvoicePaid, "x", data(), 6)
            .unwrap();
        assert_eq!(store.get("e007").unwrap(), None, "pruned to make room");
        assert_eq!(store.totals().pending, 100);
    }

    #[test]
    fn failed_records_are_bounded_per_merchant_oldest_deleted() {
        use super::super::schedule::{Attempt, Failure};
        let dir = tempfile::tempdir().unwrap();
        let store = WebhookStore::open(dir.path(), policy()).unwrap();
        let policy = policy();
        for i in 0..3u64 {
            let id = format!("e{i}");
            store
                .enqueue("cafe", EventType::InvoicePaid, &id, data(), i)
                .unwrap();
            store
                .update(&id, |r| {
                    r.after_attempt(Attempt::Failed(Failure::Gone), 10 + i, &policy, 0)
                })
                .unwrap();
        }
        let failed = store
            .list(
                &ListFilter {
                    state: Some(DeliveryState::Failed),
                    merchant_id: Some("cafe".into()),
                },
                None,
                10,
            )
            .unwrap();
        let ids: Vec<&str> = failed.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(ids, ["e1", "e2"], "the oldest failed one went");
        assert_eq!(store.totals().failed, 2);
    }

    #[test]
    fn replay_finds_only_the_merchants_own_and_prune_keeps_recent_ones() {
        use super::super::schedule::Attempt;
        let dir = tempfile::tempdir().unwrap();
        let store = WebhookStore::open(dir.path(), policy()).unwrap();
        let policy = policy();
        store
            .enqueue("cafe", EventType::InvoicePaid, "e1", data(), 1)
            .unwrap();
        store
            .enqueue("cafe", EventType::InvoicePaid, "e2", data(), 1)
            .unwrap();
        for (id, at) in [("e1", 100), ("e2", 200)] {
            store
                .update(id, |r| {
                    r.after_attempt(Attempt::Delivered(200), at, &policy, 0)
                })
                .unwrap();
        }
        assert_eq!(
            store.replay("e1", Some("shop"), 300).unwrap_err().code(),
            "not_found"
        );
        assert_eq!(
            store.replay("nope", None, 300).unwrap_err().code(),
            "not_found"
        );
        let (record, changed) = store.replay("e1", Some("cafe"), 300).unwrap();
        assert!(changed);
        assert_eq!(record.state, DeliveryState::Pending);
        let (_, changed) = store.replay("e1", None, 301).unwrap();
        assert!(!changed, "already pending");
        assert_eq!(store.due(300, 10, |_, _| false).unwrap().len(), 1);
        assert_eq!(store.prune_delivered(150, usize::MAX).unwrap(), 0);
        assert_eq!(store.prune_delivered(250, usize::MAX).unwrap(), 1);
        assert_eq!(store.get("e2").unwrap(), None);
        assert_eq!(
            store.totals(),
            Totals {
                pending: 1,
                delivered: 0,
                failed: 0
            }
        );
        let page = store.list(&ListFilter::default(), Some("e0"), 10).unwrap();
        assert_eq!(page.len(), 1);
        assert!(store
            .list(&ListFilter::default(), Some("e1"), 10)
            .unwrap()
            .is_empty());
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    /// The stored record and the body sent are formats: a change shows here as a diff.
    #[test]
    fn the_stored_record_and_the_body_keep_their_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = WebhookStore::open(dir.path(), WebhookPolicy::default()).unwrap();
        let Enqueued::New(record) = store
            .enqueue(
                "cafe",
                EventType::RefundSucceeded,
                "evt_0123",
                serde_json::json!({"refund": {"id": "re_1", "amount": "1.50"}}),
                1_764_900_000_000,
            )
            .unwrap()
        else {
            panic!("new")
        };
        assert_eq!(
            record.body,
            r#"{"id":"evt_0123","type":"refund.succeeded","created_ms":1764900000000,"data":{"refund":{"amount":"1.50","id":"re_1"}}}"#
        );
        assert_eq!(
            String::from_utf8(encode(&record)).unwrap(),
            r#"{"event_id":"evt_0123","merchant_id":"cafe","event_type":"refund.succeeded","created_ms":1764900000000,"body":"{\"id\":\"evt_0123\",\"type\":\"refund.succeeded\",\"created_ms\":1764900000000,\"data\":{\"refund\":{\"amount\":\"1.50\",\"id\":\"re_1\"}}}","state":"pending","attempts":0,"next_attempt_at_ms":1764900000000,"retry_until_ms":1765159200000,"replays":0}"#
        );
        let record = store.get("evt_0123").unwrap().unwrap();
        assert_eq!(decode(&encode(&record)).unwrap(), record);
    }
}
