//! Payment requests, durably (sled): each request with its per-payer state, the events that
//! stand for it, and the indexes the bot needs to answer quickly and stay bounded.
//!
//! Trees (keys are ids' UTF-8 bytes; ids never contain NUL):
//! - `requestid_request`: request id (the asking event's id) -> [`Request`], JSON.
//! - `eventid_requestid`: event id -> request id, for every event that stands for a request
//!   (the asking event itself, the bot's notice and typed event in the room, the payer's DM
//!   notice), so a reply or reaction to any of them finds it.
//! - `requestid_eventids`: request id + NUL + event id -> the event's role for the request
//!   (empty, `notice`, `event:<payer>`, `acted`, ...; see [`RequestStore::link_event_as`]):
//!   the reverse, for pruning, and to find the bot's notice to edit.
//! - `payer_open_requestids`: payer + NUL + request id -> empty, while the payer's share is open
//!   or waiting for their PIN.
//! - `requester_open_requestids`: requester + NUL + request id -> empty, while the request is
//!   open.
//! - `expiresat_requestid`: expires_at_ms (BE) + request id -> empty, while the request is
//!   open: the sweep's list of what lapses next.
//! - `settledat_requestid`: settled_ms (BE) + request id -> empty, once the request is over:
//!   kept [`RequestBounds::settled_keep_ms`] to answer late replies ("already paid"), then
//!   pruned.
//!
//! Every change is one atomic write over these trees, made under one lock (checks of the
//! bounds and the write cannot interleave), then flushed and fdatasync'ed
//! ([`crate::sled_open::flush_durably`]) before the call returns. Indexes are derived from the
//! record at the time of the write: a request that lapsed but was not swept yet still counts
//! as open until [`RequestStore::due`] finds it and the caller writes [`Request::expire`]'s
//! result.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use matrix_sdk::ruma::{EventId, OwnedEventId, UserId};

use super::StoreError;
use crate::events::RequestState;
use crate::requests::{Request, RequestId, RequestRefusal, ShareState};

const REQUESTID_REQUEST: &str = "requestid_request";
const EVENTID_REQUESTID: &str = "eventid_requestid";
const REQUESTID_EVENTIDS: &str = "requestid_eventids";
const PAYER_OPEN_REQUESTIDS: &str = "payer_open_requestids";
const REQUESTER_OPEN_REQUESTIDS: &str = "requester_open_requestids";
const EXPIRESAT_REQUESTID: &str = "expiresat_requestid";
const SETTLEDAT_REQUESTID: &str = "settledat_requestid";
/// The role of an event that changed a request ([`RequestStore::update_acted`]).
const ACTED_ROLE: &str = "acted";

/// Bounds of the request store: nobody can grow it without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBounds {
    /// Open requests one requester may have (`too_many_open_requests` beyond).
    pub open_per_requester_max: usize,
    /// Open requests addressed to one payer (`payer_has_too_many_requests` beyond).
    pub open_per_payer_max: usize,
    /// Open requests in all (`requests_full` beyond).
    pub open_total_max: usize,
    /// How long a request that is over is kept (to answer late replies) before pruning.
    pub settled_keep_ms: u64,
    /// Most requests that are over kept in all (the oldest are pruned first beyond it).
    pub settled_total_max: usize,
    /// Most events that may stand for one request (asking event, notices, DM notices).
    pub events_per_request_max: usize,
}

impl Default for RequestBounds {
    fn default() -> Self {
        Self {
            open_per_requester_max: 20,
            open_per_payer_max: 20,
            open_total_max: 10_000,
            settled_keep_ms: 30 * 24 * 3_600_000,
            settled_total_max: 100_000,
            events_per_request_max: 64,
        }
    }
}

/// What [`RequestStore::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Stored.
    Stored,
    /// A request with this id exists already (the asking event handled again): it is
    /// returned, unchanged.
    Exists(Request),
    /// Over a bound: `too_many_open_requests`, `payer_has_too_many_requests` or
    /// `requests_full`. Nothing was written.
    Refused(RequestRefusal),
}

/// What [`RequestStore::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Updated {
    /// Stored.
    Stored,
    /// The stored request is not `before` any more (or is gone): nothing was written; decide
    /// again from the current one.
    Conflict(Option<Request>),
}

/// The request database. Cheap to clone.
#[derive(Clone)]
pub struct RequestStore {
    db: sled::Db,
    /// sled's log file, fdatasync'ed after each flush.
    log: Arc<std::fs::File>,
    requests: sled::Tree,
    event_index: sled::Tree,
    request_events: sled::Tree,
    payer_open: sled::Tree,
    requester_open: sled::Tree,
    expiry: sled::Tree,
    settled: sled::Tree,
    /// Serialises writers: a bound checked and the write that relies on it are one step.
    lock: Arc<parking_lot::Mutex<()>>,
}

impl fmt::Debug for RequestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestStore").finish_non_exhaustive()
    }
}

fn pair_key(first: &str, second: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(first.len() + 1 + second.len());
    key.extend_from_slice(first.as_bytes());
    key.push(0);
    key.extend_from_slice(second.as_bytes());
    key
}

fn prefix(first: &str) -> Vec<u8> {
    let mut key = first.as_bytes().to_vec();
    key.push(0);
    key
}

fn time_key(at_ms: u64, id: &RequestId) -> Vec<u8> {
    let mut key = at_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.0.as_str().as_bytes());
    key
}

fn id_from_suffix(tree: &'static str, bytes: &[u8]) -> Result<RequestId, StoreError> {
    let corrupt = || StoreError::Corrupt {
        tree,
        reason: "key does not end in an event id",
    };
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt())?;
    OwnedEventId::try_from(text)
        .map(RequestId)
        .map_err(|_| corrupt())
}

fn decode(bytes: &[u8]) -> Result<Request, StoreError> {
    let request: Request = serde_json::from_slice(bytes).map_err(|_| StoreError::Corrupt {
        tree: REQUESTID_REQUEST,
        reason: "value is not a request",
    })?;
    // Read back, a record must still keep the rules every transition keeps.
    request.assert_invariants();
    Ok(request)
}

fn encode(request: &Request) -> Vec<u8> {
    serde_json::to_vec(request).expect("requests serialise")
}

/// When a request that is over became so (the latest of its final states, its cancel, its
/// expiry): the same whenever it is computed from the same record.
fn settled_ms(request: &Request, now_ms: u64) -> u64 {
    let mut at_ms = request.cancelled_ms.unwrap_or(request.created_ms);
    if request.status(now_ms) == RequestState::Expired {
        at_ms = at_ms.max(request.expires_at_ms);
    }
    for share in request.shares() {
        let final_ms = match request.live_state(share, now_ms) {
            ShareState::Paid { at_ms, .. }
            | ShareState::Declined { at_ms }
            | ShareState::Cancelled { at_ms }
            | ShareState::Expired { at_ms } => at_ms,
            ShareState::Open | ShareState::Paying { .. } => 0,
        };
        at_ms = at_ms.max(final_ms);
    }
    at_ms
}

/// The index entries a request has when written at `now_ms`.
struct IndexKeys {
    payer_open: Vec<Vec<u8>>,
    requester_open: Option<Vec<u8>>,
    expiry: Option<Vec<u8>>,
    settled: Option<Vec<u8>>,
}

impl IndexKeys {
    fn of(request: &Request, now_ms: u64) -> Self {
        let id = request.id.0.as_str();
        let open = request.status(now_ms) == RequestState::Open;
        IndexKeys {
            payer_open: request
                .open_payers(now_ms)
                .into_iter()
                .map(|payer| pair_key(payer.as_str(), id))
                .collect(),
            requester_open: open.then(|| pair_key(request.requester.as_str(), id)),
            expiry: open.then(|| time_key(request.expires_at_ms, &request.id)),
            settled: (!open).then(|| time_key(settled_ms(request, now_ms), &request.id)),
        }
    }

    /// Every entry the request could have had, whenever it was written: each payer's, the
    /// requester's, its expiry and its settled time (removing an absent entry does nothing).
    fn any_of(request: &Request) -> Self {
        let id = request.id.0.as_str();
        IndexKeys {
            payer_open: request
                .shares()
                .iter()
                .map(|s| pair_key(s.payer.as_str(), id))
                .collect(),
            requester_open: Some(pair_key(request.requester.as_str(), id)),
            expiry: Some(time_key(request.expires_at_ms, &request.id)),
            // A request over is over for good: its settled time no longer depends on `now`.
            settled: Some(time_key(settled_ms(request, u64::MAX), &request.id)),
        }
    }
}

type Trees<'a> = (
    &'a sled::Tree,
    &'a sled::Tree,
    &'a sled::Tree,
    &'a sled::Tree,
    &'a sled::Tree,
    &'a sled::Tree,
    &'a sled::Tree,
);

impl RequestStore {
    /// Opens (or creates) a request database of its own in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            path: dir.to_owned(),
            source,
        };
        let db = crate::sled_open::open_waiting_for_lock(&sled::Config::new().path(dir))
            .map_err(open_error)?;
        let log = crate::sled_open::log_file(dir).map_err(|e| open_error(sled::Error::Io(e)))?;
        Self::in_db(db, Arc::new(log))
    }

    /// The request trees inside an already open database (e.g. the payment store's, so a
    /// request and what was decided about an event can share its flushes); `log` is that
    /// database's log file ([`crate::sled_open::log_file`]).
    pub fn in_db(db: sled::Db, log: Arc<std::fs::File>) -> Result<Self, StoreError> {
        Ok(Self {
            requests: db.open_tree(REQUESTID_REQUEST)?,
            event_index: db.open_tree(EVENTID_REQUESTID)?,
            request_events: db.open_tree(REQUESTID_EVENTIDS)?,
            payer_open: db.open_tree(PAYER_OPEN_REQUESTIDS)?,
            requester_open: db.open_tree(REQUESTER_OPEN_REQUESTIDS)?,
            expiry: db.open_tree(EXPIRESAT_REQUESTID)?,
            settled: db.open_tree(SETTLEDAT_REQUESTID)?,
            lock: Default::default(),
            log,
            db,
        })
    }

    /// Makes every write so far durable (also against a power cut).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (db, log) = (self.db.clone(), self.log.clone());
        tokio::task::spawn_blocking(move || crate::sled_open::flush_durably(&db, &log)).await??;
        Ok(())
    }

    fn trees(&self) -> Trees<'_> {
        (
            &self.requests,
            &self.event_index,
            &self.request_events,
            &self.payer_open,
            &self.requester_open,
            &self.expiry,
            &self.settled,
        )
    }

    /// The request with this id.
    pub fn get(&self, id: &RequestId) -> Result<Option<Request>, StoreError> {
        self.requests
            .get(id.0.as_str().as_bytes())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// The request `event_id` stands for (its asking event, or an event linked to it with
    /// [`Self::link_event`]): what a reply or reaction to that event is about.
    pub fn by_event(&self, event_id: &EventId) -> Result<Option<Request>, StoreError> {
        let Some(id) = self.event_index.get(event_id.as_str().as_bytes())? else {
            return Ok(None);
        };
        let id = id_from_suffix(EVENTID_REQUESTID, &id)?;
        self.get(&id)
    }

    fn count_open(
        &self,
        tree: &sled::Tree,
        name: &'static str,
        who: &UserId,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut count = 0;
        for entry in tree.scan_prefix(prefix(who.as_str())) {
            let (key, _) = entry?;
            let id = id_from_suffix(name, &key[who.as_str().len() + 1..])?;
            // A request that lapsed but was not swept yet no longer counts.
            if self
                .get(&id)?
                .is_some_and(|r| r.status(now_ms) == RequestState::Open)
            {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Stores a new request, unless a request with its id exists (then that one is returned) or
    /// it would break a bound (checked in this order: the requester's open requests, each
    /// named payer's, all open requests). Its own id is linked as an event standing for it.
    pub async fn insert(
        &self,
        request: &Request,
        now_ms: u64,
        bounds: RequestBounds,
    ) -> Result<Inserted, StoreError> {
        {
            let _guard = self.lock.lock();
            if let Some(existing) = self.get(&request.id)? {
                drop(_guard);
                // Told as existing: an earlier insert whose flush failed must be durable now.
                self.flush().await?;
                return Ok(Inserted::Exists(existing));
            }
            if self.count_open(
                &self.requester_open,
                REQUESTER_OPEN_REQUESTIDS,
                &request.requester,
                now_ms,
            )? >= bounds.open_per_requester_max
            {
                return Ok(Inserted::Refused(RequestRefusal::TooManyOpenRequests));
            }
            for payer in request.open_payers(now_ms) {
                if self.count_open(&self.payer_open, PAYER_OPEN_REQUESTIDS, payer, now_ms)?
                    >= bounds.open_per_payer_max
                {
                    return Ok(Inserted::Refused(RequestRefusal::PayerHasTooManyRequests));
                }
            }
            if self.expiry.len() >= bounds.open_total_max {
                return Ok(Inserted::Refused(RequestRefusal::RequestsFull));
            }
            let id = request.id.0.as_str();
            let value = encode(request);
            let keys = IndexKeys::of(request, now_ms);
            self.write(|trees| {
                let (requests, events, request_events, ..) = trees;
                requests.insert(id.as_bytes(), value.as_slice())?;
                events.insert(id.as_bytes(), id.as_bytes())?;
                request_events.insert(pair_key(id, id), &[])?;
                Self::put_keys(trees, &keys)
            })?;
        }
        self.flush().await?;
        Ok(Inserted::Stored)
    }

    /// Records that `event_id` (the bot's notice or typed event, a DM notice) stands for the
    /// request `id`, so replies and reactions to it find the request. Linking the same event
    /// again does nothing; beyond [`RequestBounds::events_per_request_max`] links, or for a
    /// request that is gone, nothing is linked and `false` is returned.
    pub async fn link_event(
        &self,
        event_id: &EventId,
        id: &RequestId,
        bounds: RequestBounds,
    ) -> Result<bool, StoreError> {
        self.link_event_as(event_id, id, "", bounds).await
    }

    /// [`Self::link_event`], naming what the event is for the request (`role`, a short ASCII
    /// word such as `notice`, `event:@bob:example.org`): [`Self::linked_as`] finds it again
    /// (e.g. the notice the bot edits as the request changes). Linking an event again keeps
    /// its first role.
    pub async fn link_event_as(
        &self,
        event_id: &EventId,
        id: &RequestId,
        role: &str,
        bounds: RequestBounds,
    ) -> Result<bool, StoreError> {
        {
            let _guard = self.lock.lock();
            if !self.requests.contains_key(id.0.as_str().as_bytes())? {
                return Ok(false);
            }
            let link = pair_key(id.0.as_str(), event_id.as_str());
            if self.request_events.contains_key(&link)? {
                drop(_guard);
                self.flush().await?;
                return Ok(true);
            }
            if self
                .request_events
                .scan_prefix(prefix(id.0.as_str()))
                .count()
                >= bounds.events_per_request_max
            {
                return Ok(false);
            }
            self.write(|(_, events, request_events, ..)| {
                events.insert(event_id.as_str().as_bytes(), id.0.as_str().as_bytes())?;
                request_events.insert(link.as_slice(), role.as_bytes())?;
                Ok(())
            })?;
        }
        self.flush().await?;
        Ok(true)
    }

    /// The event linked to request `id` with `role` ([`Self::link_event_as`]), the first one
    /// if several were.
    pub fn linked_as(
        &self,
        id: &RequestId,
        role: &str,
    ) -> Result<Option<OwnedEventId>, StoreError> {
        let start = prefix(id.0.as_str());
        for entry in self.request_events.scan_prefix(&start) {
            let (key, value) = entry?;
            if value.as_ref() == role.as_bytes() {
                let text =
                    std::str::from_utf8(&key[start.len()..]).map_err(|_| StoreError::Corrupt {
                        tree: REQUESTID_EVENTIDS,
                        reason: "key does not end in an event id",
                    })?;
                return Ok(OwnedEventId::try_from(text).ok());
            }
        }
        Ok(None)
    }

    /// Whether `event_id` already changed a request ([`Self::update_acted`]): handled again
    /// (a retried transaction), it repeats what it said instead of acting again.
    pub fn acted(&self, event_id: &EventId) -> Result<bool, StoreError> {
        let Some(id) = self.event_index.get(event_id.as_str().as_bytes())? else {
            return Ok(false);
        };
        let id = id_from_suffix(EVENTID_REQUESTID, &id)?;
        Ok(self
            .request_events
            .get(pair_key(id.0.as_str(), event_id.as_str()))?
            .is_some_and(|role| role.as_ref() == ACTED_ROLE.as_bytes()))
    }

    /// Replaces `before` (as read) with `after` (what a transition of `before` returned), and
    /// moves the indexes to what `after` is at `now_ms`: off the payer's and requester's open
    /// lists and the expiry list once over, onto the settled list. If the stored request is no
    /// longer `before`, nothing is written and the current one is returned.
    pub async fn update(
        &self,
        before: &Request,
        after: &Request,
        now_ms: u64,
    ) -> Result<Updated, StoreError> {
        self.update_acted(before, after, now_ms, None).await
    }

    /// [`Self::update`], recording in the same write that `acted_by` (the reply or reaction
    /// that made the change) did it: [`Self::acted`] then knows it, and replies to it find the
    /// request. No link is made beyond the request's bound of linked events.
    pub async fn update_acted(
        &self,
        before: &Request,
        after: &Request,
        now_ms: u64,
        acted_by: Option<&EventId>,
    ) -> Result<Updated, StoreError> {
        assert_eq!(before.id, after.id, "an update keeps the request's id");
        {
            let _guard = self.lock.lock();
            let id = after.id.0.as_str();
            let current = self.requests.get(id.as_bytes())?;
            if current.as_deref() != Some(encode(before).as_slice()) {
                drop(_guard);
                // The caller acts on the current request: it must be durable.
                self.flush().await?;
                return Ok(Updated::Conflict(
                    current.map(|bytes| decode(&bytes)).transpose()?,
                ));
            }
            after.assert_invariants();
            let value = encode(after);
            let (old, new) = (IndexKeys::any_of(before), IndexKeys::of(after, now_ms));
            let link = match acted_by {
                Some(event_id)
                    if self.request_events.scan_prefix(prefix(id)).count()
                        < RequestBounds::default().events_per_request_max =>
                {
                    Some((event_id, pair_key(id, event_id.as_str())))
                }
                _ => None,
            };
            self.write(|trees| {
                trees.0.insert(id.as_bytes(), value.as_slice())?;
                if let Some((event_id, link)) = &link {
                    trees
                        .1
                        .insert(event_id.as_str().as_bytes(), id.as_bytes())?;
                    trees.2.insert(link.as_slice(), ACTED_ROLE.as_bytes())?;
                }
                Self::remove_keys(trees, &old)?;
                Self::put_keys(trees, &new)
            })?;
        }
        self.flush().await?;
        Ok(Updated::Stored)
    }

    fn put_keys(
        (_, _, _, payer_open, requester_open, expiry, settled): &Trees2<'_>,
        keys: &IndexKeys,
    ) -> sled::transaction::ConflictableTransactionResult<(), ()> {
        for key in &keys.payer_open {
            payer_open.insert(key.as_slice(), &[])?;
        }
        for (tree, key) in [
            (requester_open, &keys.requester_open),
            (expiry, &keys.expiry),
            (settled, &keys.settled),
        ] {
            if let Some(key) = key {
                tree.insert(key.as_slice(), &[])?;
            }
        }
        Ok(())
    }

    fn remove_keys(
        (_, _, _, payer_open, requester_open, expiry, settled): &Trees2<'_>,
        keys: &IndexKeys,
    ) -> sled::transaction::ConflictableTransactionResult<(), ()> {
        for key in &keys.payer_open {
            payer_open.remove(key.as_slice())?;
        }
        for (tree, key) in [
            (requester_open, &keys.requester_open),
            (expiry, &keys.expiry),
            (settled, &keys.settled),
        ] {
            if let Some(key) = key {
                tree.remove(key.as_slice())?;
            }
        }
        Ok(())
    }

    /// One atomic write over all request trees (not yet flushed).
    fn write(
        &self,
        body: impl Fn(&Trees2<'_>) -> sled::transaction::ConflictableTransactionResult<(), ()>,
    ) -> Result<(), StoreError> {
        use sled::transaction::TransactionError;
        use sled::Transactional as _;
        let result: Result<(), TransactionError<()>> = self.trees().transaction(|trees| {
            let (a, b, c, d, e, f, g) = trees;
            body(&(a, b, c, d, e, f, g))
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => unreachable!("request writes never abort"),
        }
    }

    fn ids_with_prefix(
        &self,
        tree: &sled::Tree,
        name: &'static str,
        who: &UserId,
    ) -> Result<Vec<RequestId>, StoreError> {
        tree.scan_prefix(prefix(who.as_str()))
            .map(|entry| {
                let (key, _) = entry?;
                id_from_suffix(name, &key[who.as_str().len() + 1..])
            })
            .collect()
    }

    /// The requests with a share of `payer` still open or waiting for their PIN (as of the
    /// last write of each), oldest id order.
    pub fn open_for_payer(&self, payer: &UserId) -> Result<Vec<RequestId>, StoreError> {
        self.ids_with_prefix(&self.payer_open, PAYER_OPEN_REQUESTIDS, payer)
    }

    /// The requests of `requester` still open (as of the last write of each).
    pub fn open_by_requester(&self, requester: &UserId) -> Result<Vec<RequestId>, StoreError> {
        self.ids_with_prefix(&self.requester_open, REQUESTER_OPEN_REQUESTIDS, requester)
    }

    /// Up to `limit` open requests whose expiry is at or before `now_ms`, soonest first: the
    /// sweep writes [`Request::expire`]'s result for each (with [`Self::update`]) and tells
    /// their payers. A request kept open by a payment waiting for a PIN stays listed until
    /// that payment ends.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<RequestId>, StoreError> {
        let end = (now_ms.saturating_add(1)).to_be_bytes();
        self.expiry
            .range(..end.as_slice())
            .take(limit)
            .map(|entry| {
                let (key, _) = entry?;
                id_from_suffix(EXPIRESAT_REQUESTID, &key[8..])
            })
            .collect()
    }

    /// Removes up to `limit` requests that are over: those settled `settled_keep_ms` or more
    /// before `now_ms`, and the oldest beyond `settled_total_max`; with them go the events
    /// linked to them. Returns how many were removed (call again while it returns `limit`).
    pub async fn prune_settled(
        &self,
        now_ms: u64,
        bounds: RequestBounds,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        {
            let _guard = self.lock.lock();
            let mut over_count = self.settled.len().saturating_sub(bounds.settled_total_max);
            for entry in self.settled.iter() {
                if removed == limit {
                    break;
                }
                let (key, _) = entry?;
                let settled_ms = u64::from_be_bytes(key[..8].try_into().expect("8-byte time"));
                let lapsed = settled_ms.saturating_add(bounds.settled_keep_ms) <= now_ms;
                if !lapsed && over_count == 0 {
                    break;
                }
                over_count = over_count.saturating_sub(1);
                let id = id_from_suffix(SETTLEDAT_REQUESTID, &key[8..])?;
                let links: Vec<sled::IVec> = self
                    .request_events
                    .scan_prefix(prefix(id.0.as_str()))
                    .keys()
                    .collect::<Result<_, _>>()?;
                let request = self.get(&id)?;
                self.write(|trees| {
                    let (requests, events, request_events, _, _, _, settled) = trees;
                    settled.remove(key.as_ref())?;
                    requests.remove(id.0.as_str().as_bytes())?;
                    for link in &links {
                        request_events.remove(link.as_ref())?;
                        events.remove(&link[id.0.as_str().len() + 1..])?;
                    }
                    if let Some(request) = &request {
                        Self::remove_keys(trees, &IndexKeys::any_of(request))?;
                    }
                    Ok(())
                })?;
                removed += 1;
            }
        }
        if removed > 0 {
            self.flush().await?;
        }
        Ok(removed)
    }
}

type Trees2<'a> = (
    &'a sled::transaction::TransactionalTree,
    &'a sled::transaction::TransactionalTree,
    &'a sled::transaction::TransactionalTree,
    &'a sled::transaction::TransactionalTree,
    &'a sled::transaction::TransactionalTree,
    &'a sled::transaction::TransactionalTree,
    &'a sled::transaction::TransactionalTree,
);

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::{event_id, owned_room_id, user_id, OwnedUserId};
    use rust_decimal::Decimal;

    use super::*;
    use crate::ledger::{Currencies, LedgerSettings};
    use crate::requests::{NewRequest, RequestLimits};

    const NOW: u64 = 1_800_000_000_000;
    const DAY: u64 = 86_400_000;

    fn user(name: &str) -> OwnedUserId {
        OwnedUserId::try_from(format!("@{name}:s")).unwrap()
    }

    /// `requester` asks `payer` for 1.00 EUR; the request's id is `$<id>`.
    fn request(id: &str, requester: &str, payer: &str) -> Request {
        let currencies = Currencies::from_settings(&LedgerSettings::default()).unwrap();
        let new = NewRequest {
            id: RequestId(OwnedEventId::try_from(format!("${id}")).unwrap()),
            room_id: owned_room_id!("!room"),
            requester: user(requester),
            bot: user_id!("@_mxpay:s"),
            memo: None,
            expires_at_ms: None,
            now_ms: NOW,
        };
        let amount = currencies.parse(Decimal::ONE, "EUR").unwrap();
        Request::asking(
            new,
            user(payer),
            amount,
            &|_| true,
            &RequestLimits::default(),
        )
        .unwrap()
    }

    fn ids(list: Vec<RequestId>) -> Vec<String> {
        list.into_iter().map(|id| id.0.to_string()).collect()
    }

    /// The bot finds its notice of a request by role; an event that changed the request is
    /// known as such (a retried reply repeats instead of acting again), in the same write as
    /// the change; a linked notice is no acting event.
    #[tokio::test]
    async fn roles_and_acting_events_are_kept_with_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let bounds = RequestBounds::default();
        let store = RequestStore::open(dir.path()).unwrap();
        let r = request("r1", "alice", "bob");
        store.insert(&r, NOW, bounds).await.unwrap();
        assert_eq!(store.linked_as(&r.id, "notice").unwrap(), None);
        store
            .link_event_as(event_id!("$notice"), &r.id, "notice", bounds)
            .await
            .unwrap();
        store
            .link_event_as(event_id!("$typed"), &r.id, "event:@bob:s", bounds)
            .await
            .unwrap();
        assert_eq!(
            store.linked_as(&r.id, "notice").unwrap().as_deref(),
            Some(event_id!("$notice"))
        );
        assert_eq!(
            store.linked_as(&r.id, "event:@bob:s").unwrap().as_deref(),
            Some(event_id!("$typed"))
        );
        assert!(!store.acted(event_id!("$notice")).unwrap());
        let declined = r.decline(user_id!("@bob:s"), NOW).unwrap();
        assert_eq!(
            store
                .update_acted(&r, &declined, NOW, Some(event_id!("$no")))
                .await
                .unwrap(),
            Updated::Stored
        );
        assert!(store.acted(event_id!("$no")).unwrap());
        assert_eq!(
            store.by_event(event_id!("$no")).unwrap(),
            Some(declined.clone())
        );
        // The same change again (a retry) conflicts: the stored request moved on.
        assert!(matches!(
            store
                .update_acted(&r, &declined, NOW, Some(event_id!("$no")))
                .await
                .unwrap(),
            Updated::Conflict(Some(current)) if current == declined
        ));
    }

    #[tokio::test]
    async fn requests_and_their_events_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let bounds = RequestBounds::default();
        let r = request("r1", "alice", "bob");
        {
            let store = RequestStore::open(dir.path()).unwrap();
            assert_eq!(
                store.insert(&r, NOW, bounds).await.unwrap(),
                Inserted::Stored
            );
            assert_eq!(
                store.insert(&r, NOW, bounds).await.unwrap(),
                Inserted::Exists(r.clone()),
                "the same asking event again"
            );
            assert!(store
                .link_event(event_id!("$notice"), &r.id, bounds)
                .await
                .unwrap());
            assert!(!store
                .link_event(
                    event_id!("$x"),
                    &RequestId(event_id!("$gone").to_owned()),
                    bounds
                )
                .await
                .unwrap());
        }
        let store = RequestStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&r.id).unwrap(), Some(r.clone()));
        assert_eq!(store.by_event(event_id!("$r1")).unwrap(), Some(r.clone()));
        assert_eq!(
            store.by_event(event_id!("$notice")).unwrap(),
            Some(r.clone())
        );
        assert_eq!(store.by_event(event_id!("$x")).unwrap(), None);
        assert_eq!(
            ids(store.open_for_payer(user_id!("@bob:s")).unwrap()),
            vec!["$r1"]
        );
        assert!(store.open_for_payer(user_id!("@bo:s")).unwrap().is_empty());
        assert_eq!(
            ids(store.open_by_requester(user_id!("@alice:s")).unwrap()),
            vec!["$r1"]
        );
    }

    #[tokio::test]
    async fn bounds_per_requester_per_payer_and_in_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = RequestStore::open(dir.path()).unwrap();
        let bounds = RequestBounds {
            open_per_requester_max: 2,
            open_per_payer_max: 3,
            open_total_max: 5,
            ..RequestBounds::default()
        };
        let insert = |r: Request| {
            let store = store.clone();
            async move { store.insert(&r, NOW, bounds).await.unwrap() }
        };
        assert_eq!(
            insert(request("a1", "alice", "bob")).await,
            Inserted::Stored
        );
        assert_eq!(
            insert(request("a2", "alice", "bob")).await,
            Inserted::Stored
        );
        assert_eq!(
            insert(request("a3", "alice", "carol")).await,
            Inserted::Refused(RequestRefusal::TooManyOpenRequests)
        );
        assert_eq!(
            insert(request("c1", "carol", "bob")).await,
            Inserted::Stored
        );
        assert_eq!(
            insert(request("d1", "dave", "bob")).await,
            Inserted::Refused(RequestRefusal::PayerHasTooManyRequests)
        );
        assert_eq!(
            insert(request("d2", "dave", "erin")).await,
            Inserted::Stored
        );
        assert_eq!(
            insert(request("f1", "frank", "erin")).await,
            Inserted::Stored
        );
        assert_eq!(
            insert(request("g1", "gina", "hugo")).await,
            Inserted::Refused(RequestRefusal::RequestsFull)
        );
        assert!(store
            .get(&request("g1", "gina", "hugo").id)
            .unwrap()
            .is_none());
        // A request that lapsed no longer counts against its requester, even before the sweep.
        let later = NOW + 8 * DAY;
        assert_eq!(
            store
                .insert(
                    &request("a4", "alice", "ivan"),
                    later,
                    RequestBounds {
                        open_total_max: 100,
                        ..bounds
                    }
                )
                .await
                .unwrap(),
            Inserted::Stored
        );
    }

    #[tokio::test]
    async fn updates_move_the_indexes_and_refuse_stale_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = RequestStore::open(dir.path()).unwrap();
        let bounds = RequestBounds::default();
        let r = request("r1", "alice", "bob");
        store.insert(&r, NOW, bounds).await.unwrap();
        let bob = user_id!("@bob:s");
        let (paying, _) = r.start_payment(bob, 9, NOW + 1).unwrap();
        assert_eq!(
            store.update(&r, &paying, NOW + 1).await.unwrap(),
            Updated::Stored
        );
        assert_eq!(
            ids(store.open_for_payer(bob).unwrap()),
            vec!["$r1"],
            "paying is open"
        );
        // A decision made from the old record is not written.
        let declined = r.decline(bob, NOW + 2).unwrap();
        assert_eq!(
            store.update(&r, &declined, NOW + 2).await.unwrap(),
            Updated::Conflict(Some(paying.clone()))
        );
        let paid = paying.record_paid(bob, 9, NOW + 3).unwrap();
        assert_eq!(
            store.update(&paying, &paid, NOW + 3).await.unwrap(),
            Updated::Stored
        );
        assert!(store.open_for_payer(bob).unwrap().is_empty());
        assert!(store
            .open_by_requester(user_id!("@alice:s"))
            .unwrap()
            .is_empty());
        assert!(
            store.due(u64::MAX, 10).unwrap().is_empty(),
            "over: no expiry to sweep"
        );
        assert_eq!(store.by_event(event_id!("$r1")).unwrap(), Some(paid));
        assert_eq!(store.settled.len(), 1);
    }

    #[tokio::test]
    async fn the_sweep_finds_what_lapsed_and_prunes_what_is_long_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = RequestStore::open(dir.path()).unwrap();
        let bounds = RequestBounds {
            settled_keep_ms: DAY,
            ..RequestBounds::default()
        };
        let r1 = request("r1", "alice", "bob");
        let r2 = request("r2", "carol", "bob");
        store.insert(&r1, NOW, bounds).await.unwrap();
        store.insert(&r2, NOW, bounds).await.unwrap();
        store
            .link_event(event_id!("$n1"), &r1.id, bounds)
            .await
            .unwrap();
        let at = r1.expires_at_ms;
        assert!(store.due(at - 1, 10).unwrap().is_empty());
        assert_eq!(ids(store.due(at, 10).unwrap()), vec!["$r1", "$r2"]);
        assert_eq!(
            ids(store.due(at, 1).unwrap()),
            vec!["$r1"],
            "bounded slices"
        );
        let (expired, told) = r1.expire(at);
        assert_eq!(told, vec![user("bob")]);
        store.update(&r1, &expired, at).await.unwrap();
        assert_eq!(ids(store.due(at, 10).unwrap()), vec!["$r2"]);
        assert_eq!(
            ids(store.open_for_payer(user_id!("@bob:s")).unwrap()),
            vec!["$r2"]
        );
        // Kept a day after it lapsed, then pruned with its events.
        assert_eq!(
            store.prune_settled(at + DAY - 1, bounds, 10).await.unwrap(),
            0
        );
        assert_eq!(store.prune_settled(at + DAY, bounds, 10).await.unwrap(), 1);
        assert_eq!(store.get(&r1.id).unwrap(), None);
        assert_eq!(store.by_event(event_id!("$n1")).unwrap(), None);
        assert_eq!(store.event_index.len(), 1, "only r2's own event is left");
        assert_eq!(store.request_events.len(), 1);
        assert_eq!(store.settled.len(), 0);
        assert_eq!(store.get(&r2.id).unwrap(), Some(r2.clone()));
        // Beyond the total bound the oldest settled go first, whatever their age.
        let tight = RequestBounds {
            settled_total_max: 0,
            ..bounds
        };
        let cancelled = r2.cancel(user_id!("@carol:s"), NOW + 5).unwrap();
        store.update(&r2, &cancelled, NOW + 5).await.unwrap();
        assert_eq!(store.prune_settled(NOW + 6, tight, 10).await.unwrap(), 1);
        assert_eq!(store.requests.len(), 0);
    }

    /// Tree names and key layouts are a stored format: pinned, so a change is deliberate.
    #[tokio::test]
    async fn stored_layout_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = RequestStore::open(dir.path()).unwrap();
        let r = request("r1", "alice", "bob");
        store
            .insert(&r, NOW, RequestBounds::default())
            .await
            .unwrap();
        let mut names: Vec<String> = store
            .db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| !n.starts_with("__sled"))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "eventid_requestid",
                "expiresat_requestid",
                "payer_open_requestids",
                "requester_open_requestids",
                "requestid_eventids",
                "requestid_request",
                "settledat_requestid"
            ]
        );
        let keys = |tree: &sled::Tree| -> Vec<Vec<u8>> {
            tree.iter().keys().map(|k| k.unwrap().to_vec()).collect()
        };
        assert_eq!(keys(&store.payer_open), vec![b"@bob:s\0$r1".to_vec()]);
        assert_eq!(keys(&store.requester_open), vec![b"@alice:s\0$r1".to_vec()]);
        assert_eq!(keys(&store.request_events), vec![b"$r1\0$r1".to_vec()]);
        let mut expiry = (NOW + 7 * DAY).to_be_bytes().to_vec();
        expiry.extend_from_slice(b"$r1");
        assert_eq!(keys(&store.expiry), vec![expiry]);
        assert_eq!(
            store.event_index.get("$r1").unwrap().unwrap().as_ref(),
            b"$r1"
        );
        assert_eq!(
            String::from_utf8(store.requests.get("$r1").unwrap().unwrap().to_vec()).unwrap(),
            r#"{"id":"$r1","room_id":"!room","requester":"@alice:s","currency":"EUR","memo":null,"created_ms":1800000000000,"expires_at_ms":1800604800000,"cancelled_ms":null,"bill_total_minor":null,"audience":{"named":{"shares":[{"payer":"@bob:s","amount_minor":100,"state":"open"}]}}}"#
        );
        // A record that breaks the rules is refused on read (here: its payer is its requester).
        store
            .requests
            .insert("$bad", r#"{"id":"$bad","room_id":"!room","requester":"@bob:s","currency":"EUR","memo":null,"created_ms":1,"expires_at_ms":2,"cancelled_ms":null,"bill_total_minor":null,"audience":{"named":{"shares":[{"payer":"@bob:s","amount_minor":100,"state":"open"}]}}}"#)
            .unwrap();
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.get(&RequestId(event_id!("$bad").to_owned()))
        }));
        assert!(
            read.is_err(),
            "an impossible record is a crash, not a value"
        );
        store.requests.insert("$junk", "{").unwrap();
        assert!(matches!(
            store.get(&RequestId(event_id!("$junk").to_owned())),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
