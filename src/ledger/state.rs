//! The ledger's state machine, free of I/O: requests are *decided* into journal events, and
//! events are *applied* to the state. Live decisions and the replay of the journal on open go
//! through the same [`State::apply`], so the balances in memory are by construction the replay
//! of the journal; `verify` checks that the stored journal says so too.

use std::collections::{BTreeSet, VecDeque};

use super::amount::{Amount, Currencies, CurrencyCode};
use super::model::{
    AccountId, AccountView, Balances, FreezeMode, HistoryOrder, Owner, Transfer, TransferError,
    TransferId, TransferKind, TransferRequest, TransferState, MEMO_BYTES_MAX, OWNER_BYTES_MAX,
    PENDING_TIMEOUT_MS_MAX,
};
use super::storage::StorageError;

mod chain;
mod checkpoint;
mod durable;
mod rows;
mod window;

use window::Window;

pub(crate) use durable::Durable;

/// The ledger's maps hash with foldhash, seeded at random per process: SipHash (std's
/// default) was about a tenth of the writer's time in `mxpay bench ledger`, and a per-process
/// seed still keeps caller-chosen transfer ids from being aimed at one bucket.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub(crate) use checkpoint::{
    checkpoint_filters, checkpoint_state, CheckpointOutcome, VERSION as CHECKPOINT_VERSION,
    VERSIONS_OLD as CHECKPOINT_VERSIONS_OLD,
};

/// Index of an account in [`State::accounts`], stable across replays (assigned in journal order).
pub(crate) type AccountIdx = u32;
/// Index of a transfer in [`State::transfers`], stable across replays.
pub(crate) type TransferIdx = u32;

/// The rolling window of the daily limit.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// How long a recorded failure answers a retry of its id: after that (in ledger time), a
/// request with the id is decided as a new one (Stripe keeps idempotency keys 24 h too).
pub(crate) const FAILURE_KEPT_MS: u64 = DAY_MS;

/// Most recorded failures kept: beyond it the oldest is forgotten first, so a flood of
/// refused requests cannot grow memory without bound (about 270 B each, see docs/ledger.md).
/// A constant, like the time above: the replay of a journal must forget what the live ledger
/// forgot, whatever the configuration.
pub(crate) const FAILURES_KEPT_MAX: usize = 250_000;

/// Most pending transfers one batch expires (17 journal bytes each).
pub(crate) const EXPIRIES_PER_BATCH_MAX: usize = 4_096;

/// One change of state, as written to the journal. All events of a journal record share the
/// record's timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A currency and its exponent, fixed for the life of the ledger: stored minor units mean
    /// nothing without it, so the journal carries it.
    CurrencyDefined { code: CurrencyCode, exponent: u32 },
    /// A new account; it gets the next [`AccountIdx`].
    AccountOpened { account: AccountId },
    /// A transfer was created (single, pending or refund).
    TransferCreated {
        id: TransferId,
        kind: TransferKind,
        debit: AccountIdx,
        credit: AccountIdx,
        amount_minor: u128,
        memo: Vec<u8>,
        /// For a pending refund: the transfer it refunds (a single-phase refund names it in
        /// its kind, `TransferKind::Refund`); `None` otherwise.
        refund_of: Option<TransferId>,
        /// The caller's reference; 0: none.
        reference: u128,
    },
    /// A pending transfer was posted, for `amount_minor` (at most the reserved amount).
    PendingPosted { id: TransferId, amount_minor: u128 },
    /// A pending transfer was voided by its caller.
    PendingVoided { id: TransferId },
    /// A pending transfer reached its deadline.
    PendingExpired { id: TransferId },
    /// A create or refund failed for a reason that depended on the state (transient): the id
    /// is spent and a retry returns the same failure.
    TransferFailed {
        id: TransferId,
        body: Body,
        error: TransferError,
    },
    /// An account was frozen (`Some`) or unfrozen (`None`).
    AccountFrozen {
        account: AccountIdx,
        mode: Option<FreezeMode>,
    },
}

/// What a create or refund request asked for, compared field by field on a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Body {
    pub kind: TransferKind,
    /// `None` for a refund (its accounts are the original's).
    pub debit: Option<AccountId>,
    pub credit: Option<AccountId>,
    pub currency: CurrencyCode,
    pub amount_minor: u128,
    pub memo: Vec<u8>,
    /// For a pending refund, the transfer it refunds (single-phase refunds: in `kind`).
    pub refund_of: Option<TransferId>,
    /// The caller's reference; 0: none. Not in the fingerprint (a recorded failure does not
    /// keep it): compared only with a transfer that exists.
    pub reference: u128,
}

impl Body {
    /// What idempotency needs of this body: fixed-size, whatever the memo and owner lengths.
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            kind: self.kind,
            debit: self.debit.as_ref().map(account_digest),
            credit: self.credit.as_ref().map(account_digest),
            currency: self.currency,
            amount_minor: self.amount_minor,
            memo: digest(&[&self.memo]),
            refund_of: self.refund_of,
        }
    }
}

/// 128 bits of blake3 over `parts`, each prefixed by its length (so parts cannot run into
/// each other).
fn digest(parts: &[&[u8]]) -> u128 {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    u128::from_le_bytes(bytes)
}

fn account_digest(account: &AccountId) -> u128 {
    let (tag, name): (&[u8], &[u8]) = match &account.owner {
        Owner::User(name) => (b"u", name.as_bytes()),
        Owner::Issuer => (b"i", b""),
        Owner::Settlement => (b"s", b""),
        Owner::Fees => (b"f", b""),
        Owner::Merchant(id) => (b"m", id.as_bytes()),
    };
    digest(&[tag, name, &account.currency.bytes()])
}

/// A create or refund body reduced to what an idempotent retry is compared against: the
/// kind, the amount and the currency as they are, the accounts and the memo as 128-bit
/// digests. A recorded failure keeps only this (about 130 bytes), never the memo or the owner
/// strings, and opens no account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    kind: TransferKind,
    debit: Option<u128>,
    credit: Option<u128>,
    currency: CurrencyCode,
    amount_minor: u128,
    memo: u128,
    refund_of: Option<TransferId>,
}

impl Fingerprint {
    /// The first difference, in precedence order, as an `ExistsWithDifferent*` error.
    fn compare(&self, request: &Fingerprint) -> Result<(), TransferError> {
        use TransferError as E;
        if std::mem::discriminant(&self.kind) != std::mem::discriminant(&request.kind) {
            return Err(E::ExistsWithDifferentKind);
        }
        // A refund asked for by `refund` names no accounts (they are the original's): only
        // accounts named on both sides are compared.
        let differ = |a: Option<u128>, b: Option<u128>| a.zip(b).is_some_and(|(a, b)| a != b);
        if differ(self.debit, request.debit) {
            return Err(E::ExistsWithDifferentDebitAccount);
        }
        if differ(self.credit, request.credit) {
            return Err(E::ExistsWithDifferentCreditAccount);
        }
        if self.currency != request.currency || self.amount_minor != request.amount_minor {
            return Err(E::ExistsWithDifferentAmount);
        }
        match (self.kind, request.kind) {
            (TransferKind::Pending { timeout_ms: a }, TransferKind::Pending { timeout_ms: b })
                if a != b =>
            {
                return Err(E::ExistsWithDifferentTimeout)
            }
            _ => {}
        }
        if self.memo != request.memo {
            return Err(E::ExistsWithDifferentMemo);
        }
        match (self.kind, request.kind) {
            (TransferKind::Refund { original: a }, TransferKind::Refund { original: b })
                if a != b =>
            {
                Err(E::ExistsWithDifferentOriginal)
            }
            _ if self.refund_of != request.refund_of => Err(E::ExistsWithDifferentOriginal),
            _ => Ok(()),
        }
    }
}

/// A request that changes state, as the writer receives it.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// Single-phase (`timeout_ms: None`) or pending transfer; with `refund_of`, a refund of
    /// that transfer whose accounts must be the original's, swapped.
    Create {
        request: TransferRequest,
        timeout_ms: Option<u64>,
        refund_of: Option<TransferId>,
    },
    /// Refund of (part of) a posted transfer.
    Refund {
        id: TransferId,
        original: TransferId,
        amount: Amount,
        memo: Vec<u8>,
    },
    /// Post a pending transfer, in full (`None`) or in part.
    Post {
        pending: TransferId,
        amount: Option<Amount>,
    },
    /// Void a pending transfer.
    Void { pending: TransferId },
    /// Freeze (`Some`) or unfreeze (`None`) an account.
    Freeze {
        account: AccountId,
        mode: Option<FreezeMode>,
    },
}

/// The outcome of one [`Op`].
pub(crate) type OpResult = Result<Option<Answer>, TransferError>;

/// The transfer an operation answers with, and whether the operation found it already done
/// (a retry with the same id and body, or the same post or void again: nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub transfer: Transfer,
    pub exists: bool,
}

/// What [`State::read_for`] found of the transfers an op names: the one it names by id and
/// a refund's original (their indexes, `None` if they do not exist).
#[derive(Debug, Clone, Copy, Default)]
struct Found {
    id: Option<TransferIdx>,
    original: Option<TransferIdx>,
}

#[derive(Debug, Clone)]
struct Account {
    id: AccountId,
    balances: Balances,
    frozen: Option<FreezeMode>,
    /// Transfers touching this account that are held in memory (not durable rows on disk
    /// yet: since the last spill, pending, or in a spill being written), oldest first. The
    /// others are in the history lists on disk ([`State::history`] merges both).
    history: Vec<TransferIdx>,
    /// The debits of a user account in the last 24 h, by minute (empty for system accounts).
    window: Window,
}

#[derive(Debug, Clone)]
struct TransferRec {
    id: TransferId,
    kind: TransferKind,
    debit: AccountIdx,
    credit: AccountIdx,
    amount_minor: u128,
    state: TransferState,
    memo: Box<[u8]>,
    created_ms: u64,
    ended_ms: Option<u64>,
    /// The caller's reference; 0: none.
    reference: u128,
}

impl TransferRec {
    fn deadline_ms(&self) -> Option<u64> {
        match self.kind {
            TransferKind::Pending { timeout_ms } => {
                Some(self.created_ms.saturating_add(timeout_ms))
            }
            _ => None,
        }
    }
}

/// What is kept of a create or refund that failed for a transient reason: no more than an
/// idempotent retry needs to answer the same failure or an `ExistsWithDifferent*`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FailedRec {
    fingerprint: Fingerprint,
    error: TransferError,
    /// Ledger time of the failure: it answers retries until [`FAILURE_KEPT_MS`] after it.
    failed_ms: u64,
}

impl FailedRec {
    fn kept_at(&self, now_ms: u64) -> bool {
        now_ms < self.failed_ms.saturating_add(FAILURE_KEPT_MS)
    }
}

/// Sums over all accounts of one currency; debits must equal credits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    debits_pending: u128,
    debits_posted: u128,
    credits_pending: u128,
    credits_posted: u128,
}

/// Everything the ledger knows, rebuilt from the journal on open.
#[derive(Debug, Clone)]
pub(crate) struct State {
    currencies: Currencies,
    accounts: Vec<Account>,
    account_index: HashMap<AccountId, AccountIdx>,
    /// Every transfer, with its id index: in memory, or written out at a checkpoint.
    transfers: rows::Transfers,
    failed: HashMap<TransferId, FailedRec>,
    /// The ids of `failed` in the order they were recorded, with their time: the oldest is
    /// forgotten first (see [`FAILURE_KEPT_MS`], [`FAILURES_KEPT_MAX`]).
    failed_order: VecDeque<(u64, TransferId)>,
    /// Live pending transfers by deadline.
    deadlines: BTreeSet<(u64, TransferIdx)>,
    totals: HashMap<CurrencyCode, Totals>,
    /// The refunds of each refunded transfer (single-phase and pending), oldest first: the
    /// history of a transfer by reference, without a scan.
    refunds: HashMap<TransferIdx, Vec<TransferIdx>>,
    /// Pending refunds -> the transfer each refunds (single-phase refunds name it in their
    /// kind).
    pending_refund_of: HashMap<TransferIdx, TransferIdx>,
    /// What live pending refunds reserve of each original; counted against its cap until
    /// they are posted (then `refunded`), voided or expire. No zero entries.
    refund_reserved: HashMap<TransferIdx, u128>,
    /// What was refunded of each transfer (single-phase refunds, and what pending refunds
    /// posted). No zero entries. Kept beside the transfers rather than in them, so that a
    /// transfer that has ended never changes again: its row can then be written once and
    /// moved out of memory, and a refund of it changes only this map (see docs/ledger.md,
    /// Memory).
    refunded: HashMap<TransferIdx, u128>,
    /// Accounts whose balances or freeze changed since the last [`State::publish`], kept
    /// only once [`State::track_touched`] was called (not while replaying at open).
    touched: Vec<AccountIdx>,
    track_touched: bool,
    /// A row [`State::apply`] could not read (at replay: live decisions pin what their
    /// events need), so that it fails as a storage error, not as a broken journal.
    apply_read_error: Option<StorageError>,
    /// What the record being decided or written changed, hidden from reads until it is
    /// durable (`state/durable.rs`); `None` between records and at replay.
    in_flight: Option<durable::InFlight>,
    /// While a linked chain is being decided: what it changed, as it was (`state/chain.rs`).
    chain: Option<chain::ChainUndo>,
}

/// Most history entries read from disk at once (a page is at most
/// [`super::HISTORY_PAGE_MAX`]).
const HISTORY_FETCH_MAX: usize = 4_096;

/// One list a history walk merges ([`State::walk_history`]), read in the walk's order: an
/// account's entries in memory, or its lists on disk, read `fetch` entries at a time.
enum HistoryList<'a> {
    Memory {
        account: AccountIdx,
        list: &'a [TransferIdx],
        /// Entries `start..end` are still to come.
        start: usize,
        end: usize,
    },
    Disk {
        account: AccountIdx,
        /// The entries read last, in the walk's order, and the next one to come.
        read: Vec<TransferIdx>,
        pos: usize,
        /// The next read is of entries in this span (it shrinks from the end newest first,
        /// from the start oldest first).
        span: std::ops::Range<TransferIdx>,
        /// Nothing more in `span`.
        done: bool,
    },
}

impl HistoryList<'_> {
    fn account(&self) -> AccountIdx {
        match self {
            Self::Memory { account, .. } | Self::Disk { account, .. } => *account,
        }
    }

    /// The next entry to come in `order`, reading the next ones from disk when needed.
    fn peek(
        &mut self,
        transfers: &rows::Transfers,
        order: HistoryOrder,
        fetch: usize,
    ) -> Result<Option<TransferIdx>, StorageError> {
        match self {
            Self::Memory {
                list, start, end, ..
            } => Ok((*start < *end).then(|| match order {
                HistoryOrder::NewestFirst => list[*end - 1],
                HistoryOrder::OldestFirst => list[*start],
            })),
            Self::Disk {
                account,
                read,
                pos,
                span,
                done,
            } => {
                if *pos == read.len() && !*done {
                    *read = transfers.disk_history_range(*account, span.clone(), order, fetch)?;
                    *pos = 0;
                    *done = read.len() < fetch;
                    if let Some(&last) = read.last() {
                        match order {
                            HistoryOrder::NewestFirst => span.end = last,
                            HistoryOrder::OldestFirst => span.start = last.saturating_add(1),
                        }
                    }
                }
                Ok(read.get(*pos).copied())
            }
        }
    }

    fn advance(&mut self, order: HistoryOrder) {
        match (self, order) {
            (Self::Memory { end, .. }, HistoryOrder::NewestFirst) => *end -= 1,
            (Self::Memory { start, .. }, HistoryOrder::OldestFirst) => *start += 1,
            (Self::Disk { pos, .. }, _) => *pos += 1,
        }
    }
}

/// Why an event does not apply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// It breaks a rule of the ledger: the journal (or the decision) is wrong.
    #[error("{0}")]
    Broken(String),
    /// A row it needs could not be read from the storage.
    #[error(transparent)]
    Storage(StorageError),
}

/// Keeps `error` for [`State::apply`] and describes it for the error path it interrupts.
fn read_failed(slot: &mut Option<StorageError>, error: StorageError) -> String {
    let reason = error.to_string();
    *slot = Some(error);
    reason
}

impl State {
    /// An empty ledger.
    pub fn new(currencies: Currencies) -> Self {
        Self {
            currencies,
            accounts: Vec::new(),
            account_index: HashMap::default(),
            transfers: rows::Transfers::default(),
            failed: HashMap::default(),
            failed_order: VecDeque::new(),
            deadlines: BTreeSet::new(),
            totals: HashMap::default(),
            refunds: HashMap::default(),
            pending_refund_of: HashMap::default(),
            refund_reserved: HashMap::default(),
            refunded: HashMap::default(),
            touched: Vec::new(),
            track_touched: false,
            apply_read_error: None,
            in_flight: None,
            chain: None,
        }
    }

    /// From now on, remember which accounts change, for [`State::publish`].
    pub fn track_touched(&mut self) {
        self.track_touched = true;
    }

    /// Copies into `view` the accounts opened or changed since the last call (all of them
    /// the first time): the writer calls it once a batch is durable.
    pub fn publish(&mut self, view: &mut super::view::BalanceView) {
        view.set_currencies(self.currencies.iter().map(|c| c.code).collect());
        let known = view.len();
        for idx in known..self.accounts.len() {
            view.push(self.account_view(idx as AccountIdx));
        }
        for idx in self.touched.drain(..) {
            if (idx as usize) < known {
                let a = &self.accounts[idx as usize];
                view.update(idx, &a.id, a.balances, a.frozen);
            }
        }
    }

    /// Remembers the accounts `event` (just applied) changed, when tracking.
    fn note_touched(&mut self, event: &Event) {
        if !self.track_touched {
            return;
        }
        match event {
            Event::TransferCreated { debit, credit, .. } => {
                self.touched.extend([*debit, *credit]);
            }
            Event::PendingPosted { id, .. }
            | Event::PendingVoided { id }
            | Event::PendingExpired { id } => {
                if let Some(idx) = self.transfers.idx_of(*id) {
                    let t = self.transfers.get(idx);
                    self.touched.extend([t.debit, t.credit]);
                }
            }
            Event::AccountFrozen { account, .. } => self.touched.push(*account),
            // New accounts are appended by `publish` itself.
            Event::CurrencyDefined { .. }
            | Event::AccountOpened { .. }
            | Event::TransferFailed { .. } => {}
        }
    }

    /// The currencies the journal defined, with the configured limits.
    pub fn currencies(&self) -> &Currencies {
        &self.currencies
    }

    /// Sets the limits of the currencies (from the config); the exponents come from the
    /// journal and must agree.
    pub fn set_limits(&mut self, configured: &Currencies) {
        self.currencies.set_limits(configured);
    }

    /// Defines a currency now (a config currency the journal does not have yet).
    pub fn define_currency(
        &mut self,
        code: CurrencyCode,
        exponent: u32,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        self.emit(Event::CurrencyDefined { code, exponent }, now_ms, events);
    }

    /// What a checkpoint of this state holds: the transfers in memory, accounts and recorded
    /// failures.
    pub fn checkpoint_items(&self) -> u64 {
        (self.transfers_held() + self.accounts.len() + self.failed.len()) as u64
    }

    /// Number of transfers held in memory: those after the last spill, and the pending ones.
    pub fn transfers_held(&self) -> usize {
        self.transfers.tail.len() + self.transfers.resident.len()
    }

    /// Number of transfers ever created (not counting failures).
    pub fn transfer_count(&self) -> usize {
        self.transfers.len()
    }

    // ----- decisions -----------------------------------------------------------------------

    /// Expires every pending transfer whose deadline is at or before `now_ms`.
    /// At most [`EXPIRIES_PER_BATCH_MAX`] per call, so one journal record stays small; a post
    /// or void of a transfer past its deadline expires it first in any case.
    pub fn expire_due(&mut self, now_ms: u64, events: &mut Vec<Event>) -> Vec<TransferId> {
        let mut expired = Vec::new();
        while let Some(&(deadline_ms, idx)) = self.deadlines.first() {
            if deadline_ms > now_ms || expired.len() >= EXPIRIES_PER_BATCH_MAX {
                break;
            }
            let id = self.transfers.get(idx).id;
            self.emit(Event::PendingExpired { id }, now_ms, events);
            expired.push(id);
        }
        expired
    }

    /// Decides one request at `now_ms`, applies its events and appends them to `events`.
    /// `Err` when a row it needs cannot be read from the storage: then nothing changed and
    /// no event was added (the rows are read before anything changes, see
    /// [`State::read_for`]).
    pub fn decide(
        &mut self,
        op: Op,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<OpResult, StorageError> {
        let decided = match self.read_for(&op) {
            Ok(found) => Ok(self.decide_read(op, found, now_ms, events)),
            Err(error) => Err(error),
        };
        self.transfers.unpin();
        decided
    }

    /// Reads, before anything changes, what deciding `op` needs of the transfers on disk:
    /// the transfer it names by id (idempotency, or the pending transfer to post or void),
    /// a refund's original, and for a pending refund among them the transfer it refunds
    /// (its answer names it). They stay pinned in memory until the decision is made, so
    /// that deciding, applying and answering read nothing more and cannot fail half-way.
    fn read_for(&mut self, op: &Op) -> Result<Found, StorageError> {
        let (id, original) = match op {
            Op::Create {
                request, refund_of, ..
            } => (request.id, *refund_of),
            Op::Refund { id, original, .. } => (*id, Some(*original)),
            Op::Post { pending, .. } | Op::Void { pending } => (*pending, None),
            Op::Freeze { .. } => return Ok(Found::default()),
        };
        let id = self.read_transfer(id)?;
        let original = match original {
            Some(original) => self.read_transfer(original)?,
            None => None,
        };
        Ok(Found { id, original })
    }

    /// The index of transfer `id`, with its row (and the row of the transfer it refunds, if
    /// it is a pending refund) pinned in memory.
    fn read_transfer(&mut self, id: TransferId) -> Result<Option<TransferIdx>, StorageError> {
        if id.0 == 0 {
            // Never stored: refused by the decision.
            return Ok(None);
        }
        let Some(idx) = self.transfers.pin_id(id)? else {
            return Ok(None);
        };
        if let Some(&o) = self.pending_refund_of.get(&idx) {
            self.transfers.pin(o)?;
        }
        Ok(Some(idx))
    }

    /// [`State::decide`] once [`State::read_for`] read what `op` needs (`found`).
    fn decide_read(
        &mut self,
        op: Op,
        found: Found,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> OpResult {
        match op {
            Op::Create {
                request,
                timeout_ms,
                refund_of,
            } => self.decide_create(request, timeout_ms, refund_of, found, now_ms, events),
            Op::Refund {
                id,
                original,
                amount,
                memo,
            } => self.decide_refund(id, original, amount, memo, found, now_ms, events),
            Op::Post { pending, amount } => {
                self.decide_post(pending, amount, found.id, now_ms, events)
            }
            Op::Void { pending } => self.decide_void(pending, found.id, now_ms, events),
            Op::Freeze { account, mode } => {
                self.check_account_id(&account)?;
                let idx = self.open_account(&account, now_ms, events);
                if self.accounts[idx as usize].frozen != mode {
                    self.emit(Event::AccountFrozen { account: idx, mode }, now_ms, events);
                }
                Ok(None)
            }
        }
    }

    fn decide_create(
        &mut self,
        request: TransferRequest,
        timeout_ms: Option<u64>,
        refund_of: Option<TransferId>,
        found: Found,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> OpResult {
        use TransferError as E;
        let currency = request.amount.currency();
        let amount_minor = request.amount.minor();
        let debit = AccountId {
            owner: request.debit,
            currency,
        };
        let credit = AccountId {
            owner: request.credit,
            currency,
        };
        // Request-only checks first: they never depend on the state, so are not recorded.
        if request.id.0 == 0 {
            return Err(E::IdMustNotBeZero);
        }
        if debit == credit {
            return Err(E::AccountsMustBeDifferent);
        }
        if request.memo.len() > MEMO_BYTES_MAX {
            return Err(E::MemoTooLong);
        }
        self.check_account_id(&debit)?;
        self.check_account_id(&credit)?;
        let kind = match (timeout_ms, refund_of) {
            (None, None) => TransferKind::Single,
            (None, Some(original)) => TransferKind::Refund { original },
            (Some(0), _) => return Err(E::TimeoutMustNotBeZero),
            (Some(t), _) if t > PENDING_TIMEOUT_MS_MAX => return Err(E::TimeoutTooLong),
            (Some(timeout_ms), _) => TransferKind::Pending { timeout_ms },
        };
        let pending_refund_of = refund_of.filter(|_| timeout_ms.is_some());
        let body = Body {
            kind,
            debit: Some(debit),
            credit: Some(credit),
            currency,
            amount_minor,
            memo: request.memo,
            refund_of: pending_refund_of,
            reference: request.reference,
        };
        // The body owns the accounts (no copy of their owners for each create).
        let (Some(debit), Some(credit)) = (&body.debit, &body.credit) else {
            unreachable!("set just above")
        };
        if let Some(answer) = self.existing(request.id, found.id, &body, now_ms) {
            return answer;
        }
        if refund_of.is_some() {
            // A refund gives back what its original moved: the original's cap bounds it, and
            // it is not held to the configured `max_transfer` (as `refund` never was).
            let accounts = match self.check_refund(found.original, currency, amount_minor) {
                Ok(accounts) => accounts,
                Err(e) if !e.transient() => return Err(e),
                Err(e) => return self.fail(request.id, body, e, now_ms, events),
            };
            let (debit_idx, credit_idx) = accounts;
            if self.accounts[debit_idx as usize].id != *debit
                || self.accounts[credit_idx as usize].id != *credit
            {
                return self.fail(request.id, body, E::RefundAccountsMismatch, now_ms, events);
            }
            return self.create_refund(request.id, body, accounts, now_ms, events);
        }
        // Limits come from the configuration, which may change between runs: they are checked
        // after the id, so a retry of a committed transfer answers the original whatever the
        // limit is now (TigerBeetle's order: `exists` before any limit).
        self.check_max_transfer(debit, amount_minor)?;
        // Accounts open only with a transfer that succeeds: a refused one leaves no account
        // behind (an account never used is all zeros and not frozen, which is what the checks
        // assume for it).
        let known = (
            self.account_index.get(debit).copied(),
            self.account_index.get(credit).copied(),
        );
        if let Err(error) = self.check_movement(known.0, known.1, debit, amount_minor, now_ms) {
            return self.fail(request.id, body, error, now_ms, events);
        }
        let debit_idx = match known.0 {
            Some(idx) => idx,
            None => self.open_account(debit, now_ms, events),
        };
        let credit_idx = match known.1 {
            Some(idx) => idx,
            None => self.open_account(credit, now_ms, events),
        };
        let idx = self.transfers.len() as TransferIdx;
        self.emit(
            Event::TransferCreated {
                id: request.id,
                kind,
                debit: debit_idx,
                credit: credit_idx,
                amount_minor,
                memo: body.memo,
                refund_of: None,
                reference: body.reference,
            },
            now_ms,
            events,
        );
        debug_assert_eq!(self.transfers.idx_of(request.id), Some(idx));
        self.answer(idx, false)
    }

    /// The refund checks of `original`, in precedence order: it exists (else
    /// `OriginalTransferNotFound`), in this currency (`CurrencyMismatch`, not recorded), is
    /// posted (`OriginalTransferNotRefundable`), has `amount_minor` left once its posted
    /// refunds and the reservations of its pending refunds are counted
    /// (`RefundExceedsRemaining`), and is not itself a refund (`OriginalTransferIsRefund`).
    /// Returns the refund's (debit, credit): the original's (credit, debit). `original` is
    /// the original's index, as [`State::read_for`] found it.
    fn check_refund(
        &self,
        original: Option<TransferIdx>,
        currency: CurrencyCode,
        amount_minor: u128,
    ) -> Result<(AccountIdx, AccountIdx), TransferError> {
        use TransferError as E;
        let idx = original.ok_or(E::OriginalTransferNotFound)?;
        let orig = self.transfers.get(idx);
        if self.accounts[orig.debit as usize].id.currency != currency {
            return Err(E::CurrencyMismatch);
        }
        let TransferState::Posted {
            amount_minor: posted_minor,
        } = orig.state
        else {
            return Err(E::OriginalTransferNotRefundable);
        };
        if amount_minor > self.refundable_minor(idx, posted_minor) {
            return Err(E::RefundExceedsRemaining);
        }
        if self.is_refund(idx) {
            return Err(E::OriginalTransferIsRefund);
        }
        Ok((orig.credit, orig.debit))
    }

    /// What may still be refunded of a transfer that posted `posted_minor`.
    fn refundable_minor(&self, idx: TransferIdx, posted_minor: u128) -> u128 {
        let reserved = self.refund_reserved.get(&idx).copied().unwrap_or(0);
        posted_minor - self.refunded_minor(idx) - reserved
    }

    /// What was refunded of a transfer so far (posted refunds only).
    fn refunded_minor(&self, idx: TransferIdx) -> u128 {
        self.refunded.get(&idx).copied().unwrap_or(0)
    }

    /// Whether the transfer is a refund (single-phase or pending).
    fn is_refund(&self, idx: TransferIdx) -> bool {
        matches!(self.transfers.get(idx).kind, TransferKind::Refund { .. })
            || self.pending_refund_of.contains_key(&idx)
    }

    /// Creates a refund whose original passed [`State::check_refund`]: the movement checks
    /// (freezes, limits, funds) of the payee paying back, then the transfer.
    fn create_refund(
        &mut self,
        id: TransferId,
        body: Body,
        (debit_idx, credit_idx): (AccountIdx, AccountIdx),
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> OpResult {
        let debit = self.accounts[debit_idx as usize].id.clone();
        let known = (Some(debit_idx), Some(credit_idx));
        let amount_minor = body.amount_minor;
        if let Err(error) = self.check_movement(known.0, known.1, &debit, amount_minor, now_ms) {
            return self.fail(id, body, error, now_ms, events);
        }
        self.emit(
            Event::TransferCreated {
                id,
                kind: body.kind,
                debit: debit_idx,
                credit: credit_idx,
                amount_minor,
                memo: body.memo,
                refund_of: body.refund_of,
                reference: body.reference,
            },
            now_ms,
            events,
        );
        self.answer(self.transfers.index[&id], false)
    }

    #[allow(clippy::too_many_arguments)]
    fn decide_refund(
        &mut self,
        id: TransferId,
        original: TransferId,
        amount: Amount,
        memo: Vec<u8>,
        found: Found,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> OpResult {
        use TransferError as E;
        if id.0 == 0 {
            return Err(E::IdMustNotBeZero);
        }
        if memo.len() > MEMO_BYTES_MAX {
            return Err(E::MemoTooLong);
        }
        if self.currencies.get(amount.currency()).is_none() {
            return Err(E::CurrencyUnknown);
        }
        let body = Body {
            kind: TransferKind::Refund { original },
            debit: None,
            credit: None,
            currency: amount.currency(),
            amount_minor: amount.minor(),
            memo,
            refund_of: None,
            reference: 0,
        };
        if let Some(answer) = self.existing(id, found.id, &body, now_ms) {
            return answer;
        }
        match self.check_refund(found.original, amount.currency(), amount.minor()) {
            Ok(accounts) => self.create_refund(id, body, accounts, now_ms, events),
            Err(e) if !e.transient() => Err(e),
            Err(e) => self.fail(id, body, e, now_ms, events),
        }
    }

    fn decide_post(
        &mut self,
        pending: TransferId,
        amount: Option<Amount>,
        found: Option<TransferIdx>,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> OpResult {
        use TransferError as E;
        let idx = self.pending_idx(found)?;
        self.expire_if_due(idx, now_ms, events);
        let t = self.transfers.get(idx);
        let currency = self.accounts[t.debit as usize].id.currency;
        if amount.is_some_and(|a| a.currency() != currency) {
            return Err(E::CurrencyMismatch);
        }
        let post_minor = amount.map_or(t.amount_minor, |a| a.minor());
        match t.state {
            TransferState::Posted { amount_minor } if amount_minor == post_minor => {
                return self.answer(idx, true)
            }
            TransferState::Posted { .. } => return Err(E::PendingTransferAlreadyPosted),
            TransferState::Voided => return Err(E::PendingTransferAlreadyVoided),
            TransferState::Expired => return Err(E::PendingTransferExpired),
            TransferState::Pending => {}
        }
        if post_minor > t.amount_minor {
            return Err(E::PostAmountExceedsPending);
        }
        // No freeze check: a freeze stops new movements, while this one was admitted (and its
        // money reserved) when it was created. A withdrawal paid out before the wallet was
        // frozen must still be settled, or it would expire back into the wallet.
        let debit = &self.accounts[t.debit as usize].balances;
        let credit = &self.accounts[t.credit as usize].balances;
        if debit.debits_posted_minor.checked_add(post_minor).is_none()
            || credit
                .credits_posted_minor
                .checked_add(post_minor)
                .is_none()
        {
            return Err(E::Overflow);
        }
        self.emit(
            Event::PendingPosted {
                id: pending,
                amount_minor: post_minor,
            },
            now_ms,
            events,
        );
        self.answer(idx, false)
    }

    fn decide_void(
        &mut self,
        pending: TransferId,
        found: Option<TransferIdx>,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> OpResult {
        use TransferError as E;
        let idx = self.pending_idx(found)?;
        self.expire_if_due(idx, now_ms, events);
        match self.transfers.get(idx).state {
            TransferState::Voided => return self.answer(idx, true),
            TransferState::Posted { .. } => return Err(E::PendingTransferAlreadyPosted),
            TransferState::Expired => return Err(E::PendingTransferExpired),
            TransferState::Pending => {}
        }
        self.emit(Event::PendingVoided { id: pending }, now_ms, events);
        self.answer(idx, false)
    }

    fn expire_if_due(&mut self, idx: TransferIdx, now_ms: u64, events: &mut Vec<Event>) {
        let t = self.transfers.get(idx);
        if t.state == TransferState::Pending && t.deadline_ms().is_some_and(|d| d <= now_ms) {
            let id = t.id;
            self.emit(Event::PendingExpired { id }, now_ms, events);
        }
    }

    /// The pending transfer `found` (as [`State::read_for`] found it by id).
    fn pending_idx(&self, found: Option<TransferIdx>) -> Result<TransferIdx, TransferError> {
        let idx = found.ok_or(TransferError::PendingTransferNotFound)?;
        match self.transfers.get(idx).kind {
            TransferKind::Pending { .. } => Ok(idx),
            _ => Err(TransferError::PendingTransferNotPending),
        }
    }

    fn check_account_id(&self, account: &AccountId) -> Result<(), TransferError> {
        if let Owner::User(name) | Owner::Merchant(name) = &account.owner {
            if name.is_empty() || name.len() > OWNER_BYTES_MAX {
                return Err(TransferError::OwnerInvalid);
            }
        }
        if self.currencies.get(account.currency).is_none() {
            return Err(TransferError::CurrencyUnknown);
        }
        Ok(())
    }

    fn check_max_transfer(
        &self,
        debit: &AccountId,
        amount_minor: u128,
    ) -> Result<(), TransferError> {
        let currency = self.currencies.get(debit.currency).expect("checked before");
        match currency.max_transfer_minor {
            Some(max) if !debit.owner.is_system() && amount_minor > max => {
                Err(TransferError::ExceedsMaxTransfer)
            }
            _ => Ok(()),
        }
    }

    /// The state-dependent checks of moving `amount_minor` (posted or reserved) out of
    /// `debit` (opened as `debit_idx`, or not yet) into the account `credit_idx` (or one not
    /// yet opened, of the same currency). An account not yet opened is all zeros and not
    /// frozen.
    fn check_movement(
        &self,
        debit_idx: Option<AccountIdx>,
        credit_idx: Option<AccountIdx>,
        debit: &AccountId,
        amount_minor: u128,
        now_ms: u64,
    ) -> Result<(), TransferError> {
        use TransferError as E;
        let currency = debit.currency;
        let daily_max = self
            .currencies
            .get(currency)
            .and_then(|c| c.max_per_24h_minor);
        let frozen = |idx: Option<AccountIdx>| idx.and_then(|i| self.accounts[i as usize].frozen);
        if frozen(debit_idx).is_some() {
            return Err(E::DebitAccountFrozen);
        }
        if frozen(credit_idx) == Some(FreezeMode::All) {
            return Err(E::CreditAccountFrozen);
        }
        let user_debit = !debit.owner.is_system();
        if let (true, Some(max)) = (user_debit, daily_max) {
            let used = debit_idx.map_or(0, |idx| self.accounts[idx as usize].window.sum_at(now_ms));
            if used.saturating_add(amount_minor) > max {
                return Err(E::ExceedsDailyLimit);
            }
        }
        let balances = |idx: Option<AccountIdx>| {
            idx.map_or_else(Balances::default, |i| self.accounts[i as usize].balances)
        };
        let debit = &balances(debit_idx);
        let credit = &balances(credit_idx);
        if user_debit {
            let spent = debit.debits_posted_minor + debit.debits_pending_minor;
            if spent.saturating_add(amount_minor) > debit.credits_posted_minor {
                return Err(E::InsufficientFunds);
            }
        }
        let totals = self.totals.get(&currency).copied().unwrap_or_default();
        let fits = |x: u128| x.checked_add(amount_minor).is_some();
        let all_fit = fits(debit.debits_posted_minor + debit.debits_pending_minor)
            && fits(credit.credits_posted_minor + credit.credits_pending_minor)
            && fits(totals.debits_posted + totals.debits_pending)
            && fits(totals.credits_posted + totals.credits_pending);
        if !all_fit {
            return Err(E::Overflow);
        }
        Ok(())
    }

    /// An earlier transfer (`found`: transfer `id`'s index, as [`State::read_for`] found it)
    /// or recorded failure with this id decides the answer.
    fn existing(
        &self,
        id: TransferId,
        found: Option<TransferIdx>,
        request: &Body,
        now_ms: u64,
    ) -> Option<OpResult> {
        // The request's fingerprint only when the id is taken: a new id (nearly every create)
        // should cost one lookup, not a digest of the whole body.
        if let Some(idx) = found {
            let request_reference = request.reference;
            let request = request.fingerprint();
            let t = self.transfers.get(idx);
            let stored = Body {
                kind: t.kind,
                debit: Some(self.accounts[t.debit as usize].id.clone()),
                credit: Some(self.accounts[t.credit as usize].id.clone()),
                currency: self.accounts[t.debit as usize].id.currency,
                amount_minor: t.amount_minor,
                memo: t.memo.to_vec(),
                refund_of: self
                    .pending_refund_of
                    .get(&idx)
                    .map(|&o| self.transfers.get(o).id),
                reference: t.reference,
            };
            return Some(stored.fingerprint().compare(&request).and_then(|()| {
                if stored.reference != request_reference {
                    return Err(TransferError::ExistsWithDifferentReference);
                }
                self.answer(idx, true)
            }));
        }
        let failed = self.failed.get(&id).filter(|f| f.kept_at(now_ms))?;
        Some(
            failed
                .fingerprint
                .compare(&request.fingerprint())
                .and(Err(failed.error)),
        )
    }

    fn answer(&self, idx: TransferIdx, exists: bool) -> OpResult {
        let transfer = self
            .view(idx)
            .expect("a decision reads the rows its answer shows first (State::read_for)");
        Ok(Some(Answer { transfer, exists }))
    }

    fn fail(
        &mut self,
        id: TransferId,
        body: Body,
        error: TransferError,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> OpResult {
        debug_assert!(error.transient(), "only transient failures are recorded");
        if self.chain.is_some() {
            // A chain that fails leaves nothing behind (`state/chain.rs`).
            return Err(error);
        }
        self.emit(Event::TransferFailed { id, body, error }, now_ms, events);
        Err(error)
    }

    fn open_account(
        &mut self,
        account: &AccountId,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> AccountIdx {
        if let Some(&idx) = self.account_index.get(account) {
            return idx;
        }
        self.emit(
            Event::AccountOpened {
                account: account.clone(),
            },
            now_ms,
            events,
        );
        self.account_index[account]
    }

    /// Applies a freshly decided event: an error here is a bug in `decide`, so crash.
    fn emit(&mut self, event: Event, now_ms: u64, events: &mut Vec<Event>) {
        self.note_chain(&event);
        self.note_in_flight(&event);
        if let Err(reason) = self.apply(&event, now_ms) {
            // A storage error here too: the decision pinned every row its events need.
            panic!("ledger decided an event it cannot apply ({reason}): {event:?}");
        }
        events.push(event);
    }

    // ----- application ---------------------------------------------------------------------

    /// Applies one event at ledger time `now_ms`. Used for live decisions and for replay; an
    /// error means the journal (or the decision) broke a rule, and says which.
    pub fn apply(&mut self, event: &Event, now_ms: u64) -> Result<(), ApplyError> {
        let applied = self.apply_event(event, now_ms);
        if let Some(error) = self.apply_read_error.take() {
            return Err(ApplyError::Storage(error));
        }
        applied.map_err(ApplyError::Broken)?;
        self.note_touched(event);
        Ok(())
    }

    fn apply_event(&mut self, event: &Event, now_ms: u64) -> Result<(), String> {
        self.forget_failures(now_ms);
        match event {
            Event::CurrencyDefined { code, exponent } => {
                self.currencies.define(*code, *exponent)?;
            }
            Event::AccountOpened { account } => {
                if self.account_index.contains_key(account) {
                    return Err(format!("account {account} opened twice"));
                }
                if self.currencies.get(account.currency).is_none() {
                    return Err(format!("account {account} has an unconfigured currency"));
                }
                let idx =
                    AccountIdx::try_from(self.accounts.len()).map_err(|_| "too many accounts")?;
                self.accounts.push(Account {
                    id: account.clone(),
                    balances: Balances::default(),
                    frozen: None,
                    history: Vec::new(),
                    window: Window::default(),
                });
                self.account_index.insert(account.clone(), idx);
            }
            Event::TransferCreated {
                id,
                kind,
                debit,
                credit,
                amount_minor,
                memo,
                refund_of,
                reference,
            } => self.apply_created(
                *id,
                *kind,
                (*debit, *credit),
                *amount_minor,
                memo,
                *refund_of,
                *reference,
                now_ms,
            )?,
            Event::PendingPosted { id, amount_minor } => self.apply_end(
                *id,
                TransferState::Posted {
                    amount_minor: *amount_minor,
                },
                now_ms,
            )?,
            Event::PendingVoided { id } => self.apply_end(*id, TransferState::Voided, now_ms)?,
            Event::PendingExpired { id } => {
                let idx = self
                    .transfers
                    .try_idx_of(*id)
                    .map_err(|e| read_failed(&mut self.apply_read_error, e))?
                    .ok_or("expiry of an unknown transfer")?;
                let deadline = self
                    .transfers
                    .try_get(idx)
                    .map_err(|e| read_failed(&mut self.apply_read_error, e))?
                    .deadline_ms();
                if deadline.is_none_or(|d| d > now_ms) {
                    return Err(format!("transfer {id} expired before its deadline"));
                }
                self.apply_end(*id, TransferState::Expired, now_ms)?
            }
            Event::TransferFailed { id, body, error } => {
                if self.transfers.in_memory(*id) || self.failed.contains_key(id) {
                    return Err(format!(
                        "failure recorded for transfer id {id} already in use"
                    ));
                }
                if !error.transient() {
                    return Err(format!("non-transient failure {error:?} recorded"));
                }
                self.failed.insert(
                    *id,
                    FailedRec {
                        fingerprint: body.fingerprint(),
                        error: *error,
                        failed_ms: now_ms,
                    },
                );
                self.failed_order.push_back((now_ms, *id));
                self.forget_failures(now_ms);
            }
            Event::AccountFrozen { account, mode } => {
                let a = self
                    .accounts
                    .get_mut(*account as usize)
                    .ok_or("freeze of an unknown account")?;
                a.frozen = *mode;
            }
        }
        Ok(())
    }

    /// Forgets the recorded failures no longer kept at `now_ms`: older than
    /// [`FAILURE_KEPT_MS`], or beyond the newest [`FAILURES_KEPT_MAX`]. Part of `apply`, so
    /// a replay forgets exactly what the live ledger forgot.
    fn forget_failures(&mut self, now_ms: u64) {
        while let Some(&(failed_ms, id)) = self.failed_order.front() {
            let expired = now_ms >= failed_ms.saturating_add(FAILURE_KEPT_MS);
            if !expired && self.failed_order.len() <= FAILURES_KEPT_MAX {
                break;
            }
            self.failed_order.pop_front();
            let rec = self.failed.remove(&id);
            self.note_forgotten(failed_ms, id, rec);
        }
        if self.failed.capacity() > 1_024 && self.failed.len() < self.failed.capacity() / 4 {
            self.failed.shrink_to(self.failed.len() * 2);
            self.failed_order.shrink_to(self.failed.len() * 2);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_created(
        &mut self,
        id: TransferId,
        kind: TransferKind,
        (debit, credit): (AccountIdx, AccountIdx),
        amount_minor: u128,
        memo: &[u8],
        refund_of: Option<TransferId>,
        reference: u128,
        now_ms: u64,
    ) -> Result<(), String> {
        if id.0 == 0 || self.transfers.in_memory(id) || self.failed.contains_key(&id) {
            return Err(format!("transfer id {id} is zero or already in use"));
        }
        let n = self.accounts.len();
        if debit as usize >= n || credit as usize >= n || debit == credit {
            return Err(format!("transfer {id} names unknown or identical accounts"));
        }
        let currency = self.accounts[debit as usize].id.currency;
        if self.accounts[credit as usize].id.currency != currency {
            return Err(format!("transfer {id} mixes currencies"));
        }
        if amount_minor == 0 || memo.len() > MEMO_BYTES_MAX {
            return Err(format!(
                "transfer {id} has a zero amount or an oversized memo"
            ));
        }
        let idx = TransferIdx::try_from(self.transfers.len()).map_err(|_| "too many transfers")?;
        let pending = match kind {
            TransferKind::Pending { timeout_ms } => {
                if timeout_ms == 0 {
                    return Err(format!("pending transfer {id} has no timeout"));
                }
                if let Some(original) = refund_of {
                    self.apply_refund_cap(idx, id, original, (debit, credit), amount_minor, true)?;
                }
                true
            }
            TransferKind::Single if refund_of.is_some() => {
                return Err(format!("single transfer {id} names an original"))
            }
            TransferKind::Single => false,
            TransferKind::Refund { original } => {
                if refund_of.is_some() {
                    return Err(format!("refund {id} names its original twice"));
                }
                self.apply_refund_cap(idx, id, original, (debit, credit), amount_minor, false)?;
                false
            }
        };
        {
            let totals = self.totals.entry(currency).or_default();
            let (d, c) = if pending {
                (&mut totals.debits_pending, &mut totals.credits_pending)
            } else {
                (&mut totals.debits_posted, &mut totals.credits_posted)
            };
            *d = d.checked_add(amount_minor).ok_or("total overflow")?;
            *c = c.checked_add(amount_minor).ok_or("total overflow")?;
        }
        let d = &mut self.accounts[debit as usize];
        let field = if pending {
            &mut d.balances.debits_pending_minor
        } else {
            &mut d.balances.debits_posted_minor
        };
        *field = field.checked_add(amount_minor).ok_or("balance overflow")?;
        d.history.push(idx);
        let c = &mut self.accounts[credit as usize];
        let field = if pending {
            &mut c.balances.credits_pending_minor
        } else {
            &mut c.balances.credits_posted_minor
        };
        *field = field.checked_add(amount_minor).ok_or("balance overflow")?;
        c.history.push(idx);
        let record = TransferRec {
            id,
            kind,
            debit,
            credit,
            amount_minor,
            state: if pending {
                TransferState::Pending
            } else {
                TransferState::Posted { amount_minor }
            },
            memo: memo.into(),
            created_ms: now_ms,
            ended_ms: None,
            reference,
        };
        if let Some(deadline_ms) = record.deadline_ms() {
            self.deadlines.insert((deadline_ms, idx));
        }
        self.transfers.push(id, record);
        if self.windowed(debit) {
            self.accounts[debit as usize]
                .window
                .add(now_ms, amount_minor)
                .map_err(|e| format!("transfer {id}: {e}"))?;
        }
        self.check_not_overdrawn(debit)
            .map_err(|e| format!("transfer {id}: {e}"))
    }

    /// Links refund `idx` (`id`) to `original`, checking its cap: the original exists, is
    /// posted, is not itself a refund, has the refund's accounts swapped, and has
    /// `amount_minor` left after its refunds and the reservations of its pending refunds. A
    /// pending refund reserves that much of the original; a single-phase one is refunded.
    fn apply_refund_cap(
        &mut self,
        idx: TransferIdx,
        id: TransferId,
        original: TransferId,
        (debit, credit): (AccountIdx, AccountIdx),
        amount_minor: u128,
        pending: bool,
    ) -> Result<(), String> {
        // Live, the decision pinned the original (State::read_for); at replay it may be a row
        // to read, and a failed read fails the open.
        let o = self
            .transfers
            .try_idx_of(original)
            .map_err(|e| read_failed(&mut self.apply_read_error, e))?
            .ok_or_else(|| format!("refund {id} of unknown transfer {original}"))?;
        let orig = self
            .transfers
            .try_get(o)
            .map_err(|e| read_failed(&mut self.apply_read_error, e))?;
        let posted = match orig.state {
            TransferState::Posted { amount_minor } => Some(amount_minor),
            _ => None,
        };
        let fits = posted.is_some_and(|p| self.refundable_minor(o, p) >= amount_minor);
        let is_refund = matches!(orig.kind, TransferKind::Refund { .. })
            || self.pending_refund_of.contains_key(&o);
        if !fits || is_refund || orig.debit != credit || orig.credit != debit {
            return Err(format!("refund {id} does not fit transfer {original}"));
        }
        if pending {
            *self.refund_reserved.entry(o).or_default() += amount_minor;
            self.pending_refund_of.insert(idx, o);
        } else {
            *self.refunded.entry(o).or_default() += amount_minor;
        }
        self.refunds.entry(o).or_default().push(idx);
        Ok(())
    }

    fn apply_end(&mut self, id: TransferId, end: TransferState, now_ms: u64) -> Result<(), String> {
        let idx = self
            .transfers
            .try_idx_of(id)
            .map_err(|e| read_failed(&mut self.apply_read_error, e))?
            .ok_or_else(|| format!("end of unknown transfer {id}"))?;
        let t = self
            .transfers
            .try_get(idx)
            .map_err(|e| read_failed(&mut self.apply_read_error, e))?;
        if t.state != TransferState::Pending || !matches!(t.kind, TransferKind::Pending { .. }) {
            return Err(format!("transfer {id} ended twice or was never pending"));
        }
        let (reserved, debit, credit, created_ms) =
            (t.amount_minor, t.debit, t.credit, t.created_ms);
        let posted = match end {
            TransferState::Posted { amount_minor }
                if amount_minor == 0 || amount_minor > reserved =>
            {
                return Err(format!("transfer {id} posted outside 1..={reserved}"))
            }
            TransferState::Posted { amount_minor } => amount_minor,
            _ => 0,
        };
        let currency = self.accounts[debit as usize].id.currency;
        let totals = self.totals.entry(currency).or_default();
        totals.debits_pending -= reserved;
        totals.credits_pending -= reserved;
        totals.debits_posted += posted;
        totals.credits_posted += posted;
        let d = &mut self.accounts[debit as usize].balances;
        d.debits_pending_minor -= reserved;
        d.debits_posted_minor += posted;
        let c = &mut self.accounts[credit as usize].balances;
        c.credits_pending_minor -= reserved;
        c.credits_posted_minor += posted;
        let deadline_ms = t.deadline_ms().expect("pending has a deadline");
        let removed = self.deadlines.remove(&(deadline_ms, idx));
        assert!(
            removed,
            "a live pending transfer is always in the deadline index"
        );
        let t = self.transfers.get_mut(idx);
        t.state = end;
        t.ended_ms = Some(now_ms);
        if let Some(&o) = self.pending_refund_of.get(&idx) {
            // A pending refund ends: its reservation of the original's cap becomes what it
            // posted (refunded), or nothing.
            let left = self
                .refund_reserved
                .get_mut(&o)
                .expect("a live pending refund reserves part of its original");
            *left -= reserved;
            if *left == 0 {
                self.refund_reserved.remove(&o);
            }
            if posted > 0 {
                *self.refunded.entry(o).or_default() += posted;
            }
        }
        // Give back the unused part of the reservation to the daily limit, if its minute is
        // still counted. The pending transfer is in memory: no row is read for this.
        if self.windowed(debit) {
            self.accounts[debit as usize]
                .window
                .release(created_ms, reserved - posted, now_ms)
                .map_err(|e| format!("transfer {id}: {e}"))?;
        }
        self.check_not_overdrawn(debit)
    }

    /// Whether the account's debits are counted against a daily limit.
    ///
    /// Every user account keeps its window, limit or not, so the replay of a journal does not
    /// depend on the limits configured at the time (they may change between runs).
    fn windowed(&self, idx: AccountIdx) -> bool {
        !self.accounts[idx as usize].id.owner.is_system()
    }

    fn check_not_overdrawn(&self, idx: AccountIdx) -> Result<(), String> {
        let a = &self.accounts[idx as usize];
        let b = &a.balances;
        if !a.id.owner.is_system()
            && b.debits_posted_minor + b.debits_pending_minor > b.credits_posted_minor
        {
            return Err(format!("user account {} overdrawn: {b:?}", a.id));
        }
        Ok(())
    }

    // ----- reading -------------------------------------------------------------------------

    /// Transfer `idx` as callers see it; `Err` if its row, or the row of the transfer it
    /// refunds, cannot be read.
    fn view(&self, idx: TransferIdx) -> Result<Transfer, StorageError> {
        self.view_of(idx, self.transfers.try_get(idx)?.as_ref())
    }

    /// [`State::view`] of transfer `idx`, already read as `t`.
    fn view_of(&self, idx: TransferIdx, t: &TransferRec) -> Result<Transfer, StorageError> {
        let refund_of = match t.kind {
            TransferKind::Refund { original } => Some(original),
            _ => match self.pending_refund_of.get(&idx) {
                Some(&o) => Some(self.transfers.try_get(o)?.id),
                None => None,
            },
        };
        Ok(Transfer {
            id: t.id,
            kind: t.kind,
            debit: self.accounts[t.debit as usize].id.clone(),
            credit: self.accounts[t.credit as usize].id.clone(),
            amount_minor: t.amount_minor,
            state: t.state,
            memo: t.memo.to_vec(),
            created_ms: t.created_ms,
            ended_ms: t.ended_ms,
            deadline_ms: t.deadline_ms(),
            refunded_minor: self.refunded_minor(idx),
            refund_of,
            refund_pending_minor: self.refund_reserved.get(&idx).copied().unwrap_or(0),
            reference: t.reference,
        })
    }

    /// The refunds of a transfer (single-phase and pending, in any state), oldest first;
    /// empty if it has none or does not exist. An index lookup, not a scan.
    /// `Err` if a row cannot be read from the storage.
    pub fn refunds_of(&self, original: TransferId) -> Result<Vec<Transfer>, StorageError> {
        let Some(list) = self
            .transfers
            .try_idx_of(original)?
            .and_then(|idx| self.refunds.get(&idx))
        else {
            return Ok(Vec::new());
        };
        list.iter().map(|&i| self.view(i)).collect()
    }

    /// The transfers whose reference is `reference` (not 0), oldest first, at most `limit`,
    /// below index `end`: those in memory from their index, those on disk from the
    /// reference index beside their rows (each checked against its row: after lost
    /// records an entry may name a row since written for another transfer). No scan.
    /// `Err` if a row or the index on disk cannot be read.
    pub fn transfers_by_reference(
        &self,
        reference: u128,
        end: TransferIdx,
        limit: usize,
    ) -> Result<Vec<Transfer>, StorageError> {
        if reference == 0 || limit == 0 {
            return Ok(Vec::new());
        }
        let mut found: Vec<TransferIdx> = self
            .transfers
            .by_reference
            .get(&reference)
            .map(|list| list.iter().copied().take(limit).collect())
            .unwrap_or_default();
        found.extend(self.transfers.disk_by_reference(reference, limit)?);
        let len = self.transfers.len() as TransferIdx;
        debug_assert!(
            found.iter().all(|&idx| idx < len),
            "a reference entry names no transfer (a linked chain undone without its entries?)"
        );
        found.retain(|&idx| idx < end.min(len));
        found.sort_unstable();
        found.dedup();
        let mut page = Vec::with_capacity(found.len().min(limit));
        for idx in found {
            if page.len() == limit {
                break;
            }
            let t = self.transfers.try_get(idx)?;
            if t.reference == reference {
                page.push(self.view_of(idx, &t)?);
            }
        }
        Ok(page)
    }

    /// A transfer by id; `Err` if its row cannot be read from the storage.
    pub fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, StorageError> {
        let Some(idx) = self.transfers.try_idx_of(id)? else {
            return Ok(None);
        };
        let transfer = self.view(idx)?;
        // An id index entry of a spill a power cut undid names a row since written again.
        Ok((transfer.id == id).then_some(transfer))
    }

    fn account_view(&self, idx: AccountIdx) -> AccountView {
        let a = &self.accounts[idx as usize];
        AccountView {
            id: a.id.clone(),
            balances: a.balances,
            frozen: a.frozen,
        }
    }

    /// Every account ever used, in opening order.
    pub fn accounts(&self) -> Vec<AccountView> {
        (0..self.accounts.len() as AccountIdx)
            .map(|i| self.account_view(i))
            .collect()
    }

    fn owner_accounts<'a>(&'a self, owner: &'a Owner) -> impl Iterator<Item = AccountIdx> + 'a {
        self.currencies.iter().filter_map(move |c| {
            self.account_index
                .get(&AccountId {
                    owner: owner.clone(),
                    currency: c.code,
                })
                .copied()
        })
    }

    /// Transfers touching `owner`, newest first, strictly older than `before` (a position
    /// from an earlier page), at most `limit`. Returns the page and the cursor for the next;
    /// `Err` if a row of the page, or a history list on disk, cannot be read.
    pub fn history(
        &self,
        owner: &Owner,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Transfer>, Option<u64>), StorageError> {
        let end = before.map_or(TransferIdx::MAX, |b| {
            TransferIdx::try_from(b).unwrap_or(TransferIdx::MAX)
        });
        self.history_span(owner, 0..end, HistoryOrder::NewestFirst, limit)
    }

    /// The transfers created within `created_ms` (inclusive), as an index span: ledger time
    /// never goes backwards, so they are consecutive. Two binary searches by time (see
    /// [`rows::Transfers::first_created_at_or_after`]), none for an open end.
    pub fn span_of_time(
        &self,
        created_ms: std::ops::RangeInclusive<u64>,
    ) -> Result<std::ops::Range<TransferIdx>, StorageError> {
        let len = self.transfers.len() as TransferIdx;
        let (min_ms, max_ms) = (*created_ms.start(), *created_ms.end());
        if min_ms > max_ms {
            return Ok(0..0);
        }
        let start = match min_ms {
            0 => 0,
            ms => self.transfers.first_created_at_or_after(ms)?,
        };
        let end = match max_ms {
            u64::MAX => len,
            ms => self.transfers.first_created_at_or_after(ms + 1)?,
        };
        Ok(start..end.max(start))
    }

    /// Transfers touching `owner` whose indexes are in `span`, in `order`, at most `limit`.
    /// Returns the page and the cursor for the next (the index of its last transfer: the
    /// next page is the span beyond it in `order`); `Err` if a row of the page, or a history
    /// list on disk, cannot be read. Reads no row and no list entry outside `span`.
    pub fn history_span(
        &self,
        owner: &Owner,
        span: std::ops::Range<TransferIdx>,
        order: HistoryOrder,
        limit: usize,
    ) -> Result<(Vec<Transfer>, Option<u64>), StorageError> {
        let accounts: Vec<AccountIdx> = self.owner_accounts(owner).collect();
        let mut page = Vec::new();
        let mut last = None;
        let mut more = false;
        self.walk_history(
            &accounts,
            span,
            order,
            limit.saturating_add(1),
            &mut |idx, t| {
                if page.len() == limit {
                    more = true;
                    return Ok(false);
                }
                page.push(self.view_of(idx, t)?);
                last = Some(u64::from(idx));
                Ok(true)
            },
        )?;
        Ok((page, if more { last } else { None }))
    }

    /// Every transfer touching `account`, oldest first, from memory and disk (`verify`
    /// compares it with a replay's).
    fn full_history(&self, account: AccountIdx) -> Result<Vec<TransferIdx>, StorageError> {
        let mut all = Vec::new();
        self.walk_history(
            &[account],
            0..TransferIdx::MAX,
            // Newest first: every backend that keeps rows reads that way (see
            // `Storage::account_history_range`).
            HistoryOrder::NewestFirst,
            HISTORY_FETCH_MAX,
            &mut |idx, _| {
                all.push(idx);
                Ok(true)
            },
        )?;
        all.reverse();
        Ok(all)
    }

    /// Visits the transfers touching `accounts` in `span`, in `order`, each once, until
    /// `visit` returns `false`: a k-way merge by index of each account's entries in memory
    /// and its lists on disk (read `fetch` at a time). A pending transfer that ended after
    /// later ones were spilled is in a later segment than they are, so the order is the
    /// merge's, not the segments'. An entry on disk is checked against its row (after
    /// records were lost, an index may have been written again for another transfer).
    fn walk_history(
        &self,
        accounts: &[AccountIdx],
        span: std::ops::Range<TransferIdx>,
        order: HistoryOrder,
        fetch: usize,
        visit: &mut dyn FnMut(TransferIdx, &TransferRec) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        let fetch = fetch.clamp(1, HISTORY_FETCH_MAX);
        if span.start >= span.end {
            return Ok(());
        }
        let mut lists: Vec<HistoryList<'_>> = Vec::with_capacity(accounts.len() * 2);
        for &account in accounts {
            let list = self.accounts[account as usize].history.as_slice();
            let start = list.partition_point(|&i| i < span.start);
            let end = list.partition_point(|&i| i < span.end);
            lists.push(HistoryList::Memory {
                account,
                list,
                start,
                end,
            });
            lists.push(HistoryList::Disk {
                account,
                read: Vec::new(),
                pos: 0,
                span: span.clone(),
                done: false,
            });
        }
        let mut emitted: Option<TransferIdx> = None;
        loop {
            let mut next: Option<(usize, TransferIdx)> = None;
            for (k, list) in lists.iter_mut().enumerate() {
                if let Some(idx) = list.peek(&self.transfers, order, fetch)? {
                    let first = match order {
                        HistoryOrder::NewestFirst => next.is_none_or(|(_, n)| idx > n),
                        HistoryOrder::OldestFirst => next.is_none_or(|(_, n)| idx < n),
                    };
                    if first {
                        next = Some((k, idx));
                    }
                }
            }
            let Some((k, idx)) = next else {
                return Ok(());
            };
            lists[k].advance(order);
            if emitted == Some(idx) {
                continue;
            }
            let t = self.transfers.try_get(idx)?;
            let account = lists[k].account();
            if t.debit != account && t.credit != account {
                continue;
            }
            emitted = Some(idx);
            if !visit(idx, &t)? {
                return Ok(());
            }
        }
    }

    /// Every transfer still pending, oldest deadline first; `Err` if the row of a transfer a
    /// pending refund refunds cannot be read from the storage.
    pub fn pending_transfers(&self) -> Result<Vec<Transfer>, StorageError> {
        self.deadlines
            .iter()
            .map(|&(_, idx)| self.view(idx))
            .collect()
    }

    /// How many transfers are pending.
    pub fn pending_count(&self) -> usize {
        self.deadlines.len()
    }

    // ----- invariants ----------------------------------------------------------------------

    /// The cheap check run on every commit: per currency, debits equal credits.
    pub fn assert_totals_balance(&self) {
        for (currency, t) in &self.totals {
            assert!(
                t.debits_posted == t.credits_posted && t.debits_pending == t.credits_pending,
                "{currency}: money is not conserved: {t:?}"
            );
        }
    }

    /// Checks every invariant from scratch; the error says which and where.
    ///
    /// - per currency, debits equal credits (posted and pending);
    /// - no user account is overdrawn;
    /// - every balance equals the sum of the transfers touching the account;
    /// - every pending transfer is in the deadline index and every indexed one is pending;
    /// - refunds never exceed what they refund.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut sums: HashMap<CurrencyCode, Totals> = HashMap::default();
        for a in &self.accounts {
            let b = &a.balances;
            let s = sums.entry(a.id.currency).or_default();
            s.debits_pending += b.debits_pending_minor;
            s.debits_posted += b.debits_posted_minor;
            s.credits_pending += b.credits_pending_minor;
            s.credits_posted += b.credits_posted_minor;
            self.check_not_overdrawn(self.account_index[&a.id])?;
        }
        for (currency, s) in &sums {
            if s.debits_posted != s.credits_posted || s.debits_pending != s.credits_pending {
                return Err(format!("{currency}: debits do not equal credits: {s:?}"));
            }
            let kept = self.totals.get(currency).copied().unwrap_or_default();
            if kept != *s {
                return Err(format!("{currency}: running totals {kept:?} != sums {s:?}"));
            }
        }
        let mut replayed = vec![Balances::default(); self.accounts.len()];
        let mut refunds: HashMap<TransferIdx, u128> = HashMap::default();
        let mut reserved: HashMap<TransferIdx, u128> = HashMap::default();
        let mut pending_count = 0;
        for idx in 0..self.transfers.len() {
            let t = self
                .transfers
                .try_get(idx as TransferIdx)
                .map_err(|e| e.to_string())?;
            let (d, c) = (t.debit as usize, t.credit as usize);
            match t.state {
                TransferState::Pending => {
                    pending_count += 1;
                    let deadline = t
                        .deadline_ms()
                        .ok_or("a pending transfer has no deadline")?;
                    if !self.deadlines.contains(&(deadline, idx as TransferIdx)) {
                        return Err(format!("pending transfer {} is not live", t.id));
                    }
                    replayed[d].debits_pending_minor += t.amount_minor;
                    replayed[c].credits_pending_minor += t.amount_minor;
                }
                TransferState::Posted { amount_minor } => {
                    replayed[d].debits_posted_minor += amount_minor;
                    replayed[c].credits_posted_minor += amount_minor;
                }
                TransferState::Voided | TransferState::Expired => {}
            }
            if let TransferKind::Refund { original } = t.kind {
                let o = self
                    .transfers
                    .try_idx_of(original)
                    .map_err(|e| e.to_string())?
                    .ok_or("a refund of an unknown transfer")?;
                *refunds.entry(o).or_default() += t.amount_minor;
            }
            if let Some(&o) = self.pending_refund_of.get(&(idx as TransferIdx)) {
                match t.state {
                    TransferState::Pending => *reserved.entry(o).or_default() += t.amount_minor,
                    TransferState::Posted { amount_minor } => {
                        *refunds.entry(o).or_default() += amount_minor
                    }
                    TransferState::Voided | TransferState::Expired => {}
                }
            }
        }
        if pending_count != self.deadlines.len() {
            return Err(format!(
                "{} pending transfers but {} live deadlines",
                pending_count,
                self.deadlines.len()
            ));
        }
        for (a, r) in self.accounts.iter().zip(&replayed) {
            if a.balances != *r {
                return Err(format!(
                    "account {}: balances {:?} != sum of its transfers {r:?}",
                    a.id, a.balances
                ));
            }
        }
        for idx in 0..self.transfers.len() {
            let t = self
                .transfers
                .try_get(idx as TransferIdx)
                .map_err(|e| e.to_string())?;
            let refunded = refunds.get(&(idx as TransferIdx)).copied().unwrap_or(0);
            let held = reserved.get(&(idx as TransferIdx)).copied().unwrap_or(0);
            let posted = match t.state {
                TransferState::Posted { amount_minor } => amount_minor,
                _ => 0,
            };
            let kept = self
                .refund_reserved
                .get(&(idx as TransferIdx))
                .copied()
                .unwrap_or(0);
            if self.refunded_minor(idx as TransferIdx) != refunded
                || held != kept
                || refunded + held > posted
            {
                return Err(format!("transfer {}: refunds {refunded} do not fit", t.id));
            }
        }
        Ok(())
    }

    /// The first difference between two states' balances, transfers and failures (a live
    /// state against the replay of its journal).
    pub fn diff(&self, other: &State) -> Option<String> {
        if self.accounts.len() != other.accounts.len() {
            return Some(format!(
                "{} accounts in memory, {} in the journal",
                self.accounts.len(),
                other.accounts.len()
            ));
        }
        for (a, b) in self.accounts.iter().zip(&other.accounts) {
            if a.id != b.id || a.balances != b.balances || a.frozen != b.frozen {
                return Some(format!(
                    "account {}: memory {:?}/{:?}, journal {:?}/{:?}",
                    a.id, a.balances, a.frozen, b.balances, b.frozen
                ));
            }
        }
        if self.transfers.len() != other.transfers.len() || self.failed.len() != other.failed.len()
        {
            return Some(format!(
                "{} transfers ({} failed) in memory, {} ({}) in the journal",
                self.transfers.len(),
                self.failed.len(),
                other.transfers.len(),
                other.failed.len()
            ));
        }
        if self.failed != other.failed {
            return Some("the recorded failures differ".to_owned());
        }
        for i in 0..self.transfers.len() as TransferIdx {
            match (self.view(i), other.view(i)) {
                (Ok(mine), Ok(theirs)) if mine == theirs => {}
                (Ok(mine), Ok(_)) => {
                    return Some(format!("transfer {}: memory and journal differ", mine.id))
                }
                (Err(e), _) | (_, Err(e)) => return Some(format!("transfer #{i}: {e}")),
            }
        }
        None
    }
}
