//! The wallet ledger: double-entry, two-phase transfers over an embedded store, modelled on
//! TigerBeetle's transfer model.
//!
//! This module knows nothing of Matrix: it speaks accounts (an opaque owner string or a system
//! account, per currency), transfers and integer minor units.
//!
//! Shape: a pure state machine ([`state`]) decides requests into journal events; a single
//! writer thread ([`writer`]) batches concurrent requests, decides them against the state in
//! memory, appends ONE journal record per batch with ONE flush, then answers (group commit).
//! The journal is the only stored truth; balances and indexes are rebuilt from it on open.
//! See `docs/ledger.md`.

pub mod amount;
mod codec;
pub mod journal;
pub mod journal_files;
pub mod model;
#[cfg(test)]
pub(crate) mod powercut;
mod segments;
pub mod settings;
mod state;
pub mod storage;
pub mod time;
mod view;
mod writer;

use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rust_decimal::Decimal;
use tokio::sync::{mpsc, oneshot};

pub use amount::{Amount, AmountError, Currencies, Currency, CurrencyCode};
pub use journal::{CheckpointCheck, ExportedEntry, JournalEntry, JournalExport, JournalTail};
pub use model::{
    AccountId, AccountView, Balances, BatchEntry, BatchOp, CreateResult, FreezeMode, HistoryOrder,
    Owner, Transfer, TransferError, TransferId, TransferKind, TransferRequest, TransferState,
    MEMO_BYTES_MAX, OWNER_BYTES_MAX, PENDING_TIMEOUT_MS_MAX,
};
pub use settings::{CurrencySpec, LedgerSettings};
pub use storage::{RowEntry, SledStorage, Storage, StorageError, TransferRow, TransferRows};
pub use time::{MonotonicClock, SharedMonotonic, SystemMonotonic, CLOCK_SKEW_MS_MAX};

use crate::clock::SharedClock;
use codec::Head;
use state::{Answer, Durable, Op, OpResult, State};
use writer::{Command, Writer};

/// Errors of the ledger. A refused transfer is [`LedgerError::Rejected`] with its stable code.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The transfer (or post, void, refund, freeze) was refused; an operating error.
    #[error("{0}")]
    Rejected(#[from] TransferError),
    /// The amount or currency was refused.
    #[error(transparent)]
    Amount(#[from] AmountError),
    /// The settings are unusable (or contradict the journal).
    #[error("ledger settings: {0}")]
    Settings(String),
    /// The store failed. A failed write stops the ledger (every later call is `Closed` until
    /// it is reopened); a failed read of a transfer's row, or a row that does not decode,
    /// fails only the call that needed it, which changed nothing.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The journal failed verification; `record` is the batch record where it breaks.
    #[error("ledger journal is corrupt at record {record}: {reason}")]
    Corrupt {
        /// Seq of the first bad record.
        record: u64,
        /// What is wrong there.
        reason: String,
    },
    /// An invariant does not hold (found by `verify`).
    #[error("ledger invariant broken: {0}")]
    Invariant(String),
    /// The ledger's writer has stopped (after a storage failure) or the ledger was closed.
    #[error("the ledger is closed")]
    Closed,
}

/// Most reads (`transfer`, `history`, `pending_transfers`, `refunds_of`, `tail_from`) waiting
/// for the writer; callers wait beyond it. Their own queue, so they never wait behind the
/// changes queued (up to [`LedgerOptions::queue_commands_max`]).
pub const READS_QUEUED_MAX: usize = 4_096;

/// The most changes one queued [`Ledger::batch`] command carries (TigerBeetle's batch size).
pub const BATCH_OPS_MAX: usize = 8_190;

/// The most changes one linked chain of [`Ledger::batch_linked`] may hold (and at most
/// [`LedgerOptions::batch_commands_max`]): a chain is written in one journal record, and this
/// many changes at their worst case (4 KiB each: owners of 512 bytes, a memo of 1 KiB, two
/// accounts opened) are one record's target size, 128 KiB. A longer chain is refused whole
/// (`LinkedChainTooLong`).
pub const LINKED_CHAIN_OPS_MAX: usize = 32;

impl LedgerError {
    /// The transfer error code, if this is a rejection.
    pub fn rejection(&self) -> Option<TransferError> {
        match self {
            Self::Rejected(e) => Some(*e),
            _ => None,
        }
    }
}

/// Tuning of the writer; the defaults suit production.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Most requests decided into one journal record (one flush).
    pub batch_commands_max: usize,
    /// Most requests waiting for the writer; callers wait beyond it (backpressure).
    pub queue_commands_max: usize,
    /// How often an idle writer checks the clock for expired pending transfers.
    pub expiry_tick_ms: u64,
    /// How far a reading of the clock may be from what the monotonic clock predicts (from the
    /// last accepted reading) before it is refused as a jump of the system clock; see
    /// [`time`] and [`LedgerAlarms::clock_readings_refused`]. Default [`CLOCK_SKEW_MS_MAX`].
    pub clock_skew_ms_max: u64,
    /// The monotonic clock the clock is checked against; `None` is the system's
    /// ([`SystemMonotonic`]). A test that moves a [`crate::clock::ManualClock`] by more than
    /// `clock_skew_ms_max` at a time passes that same manual clock here, so ledger time
    /// follows it.
    pub monotonic: Option<SharedMonotonic>,
    /// A checkpoint of the state is written once at least this many journal entries were
    /// committed since the last one *and* at least half as many as the checkpoint holds
    /// (transfers, accounts, failures), so that opening replays at most about that many
    /// entries and checkpoints cost O(1) per entry over time. Also written when the ledger is
    /// closed. Default [`CHECKPOINT_ENTRIES_MIN`].
    pub checkpoint_entries_min: u64,
    /// Whether closing the ledger writes a checkpoint (default true). Tests turn it off to
    /// reopen as after a crash, from an older checkpoint and the records after it.
    pub checkpoint_at_close: bool,
}

/// Default of [`LedgerOptions::checkpoint_entries_min`]: about 13 MiB of journal, replayed
/// in well under a second.
pub const CHECKPOINT_ENTRIES_MIN: u64 = 500_000;

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            batch_commands_max: 8_190,
            queue_commands_max: 65_536,
            expiry_tick_ms: 100,
            clock_skew_ms_max: CLOCK_SKEW_MS_MAX,
            monotonic: None,
            checkpoint_entries_min: CHECKPOINT_ENTRIES_MIN,
            checkpoint_at_close: true,
        }
    }
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Journal records (committed batches).
    pub records: u64,
    /// Journal entries.
    pub entries: u64,
    /// Accounts.
    pub accounts: usize,
    /// Transfers created.
    pub transfers: usize,
    /// Transfers still pending.
    pub pending: usize,
    /// What was done with the stored checkpoint.
    pub checkpoint: CheckpointCheck,
}

/// One page of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// Transfers, newest first.
    pub transfers: Vec<Transfer>,
    /// Pass to the next call for older transfers; `None` at the end.
    pub next: Option<HistoryCursor>,
}

/// A history query: the transfers touching one owner created within a range of ledger time,
/// in either order, a page at a time (TigerBeetle's `get_account_transfers` with its
/// `AccountFilter`: `timestamp_min`/`timestamp_max`, `limit`, `reversed`). Answered without
/// a scan: ledger time never goes backwards, so the range is a span of transfer indexes
/// found by two binary searches, and each account's history is read within that span only
/// (see `docs/ledger.md`, History queries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Transfers created at or after this ledger time (ms since the epoch); 0: no bound.
    pub created_ms_min: u64,
    /// Transfers created at or before this ledger time; `u64::MAX`: no bound.
    pub created_ms_max: u64,
    /// Newest first (the default) or oldest first.
    pub order: HistoryOrder,
    /// Most transfers in the page, at most [`HISTORY_PAGE_MAX`] (larger values are taken as
    /// it).
    pub limit: usize,
    /// The `next` of the previous page of the same query; `None` for the first page.
    pub cursor: Option<HistoryCursor>,
}

impl HistoryQuery {
    /// Every transfer, newest first, `limit` per page.
    pub fn newest_first(limit: usize) -> Self {
        Self {
            created_ms_min: 0,
            created_ms_max: u64::MAX,
            order: HistoryOrder::NewestFirst,
            limit,
            cursor: None,
        }
    }

    /// Every transfer, oldest first, `limit` per page.
    pub fn oldest_first(limit: usize) -> Self {
        Self {
            order: HistoryOrder::OldestFirst,
            ..Self::newest_first(limit)
        }
    }

    /// This query restricted to transfers created within `min_ms..=max_ms` of ledger time.
    pub fn created_within(self, min_ms: u64, max_ms: u64) -> Self {
        Self {
            created_ms_min: min_ms,
            created_ms_max: max_ms,
            ..self
        }
    }

    /// The same query from `cursor` on (the `next` of its previous page).
    pub fn after(self, cursor: Option<HistoryCursor>) -> Self {
        Self { cursor, ..self }
    }
}

/// Where a history page ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCursor(u64);

impl HistoryCursor {
    /// The cursor as a number, to hand to API clients (e.g. a `from` query parameter).
    pub fn to_raw(self) -> u64 {
        self.0
    }

    /// A cursor from [`HistoryCursor::to_raw`]. Any value is safe: it only bounds the walk.
    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

/// Operating alarms of a running ledger, as counters since it was opened (for metrics); each
/// event is also logged with `tracing::warn!` when it happens. None of them stops the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerAlarms {
    /// Writes of the head anchor (`mxpay-head`) that failed after their batch was durable;
    /// each is retried on the next batch.
    pub anchor_write_failures: u64,
    /// Clock readings more than [`LedgerOptions::clock_skew_ms_max`] away from the time
    /// the monotonic clock predicts from the last accepted reading: ahead (a forward jump,
    /// refused: ledger time followed the monotonic clock) or behind (ledger time held at the
    /// previous batch's time until the clock caught up).
    pub clock_readings_refused: u64,
    /// Opens that could not use the stored checkpoint (torn, altered, or not fitting the
    /// journal) and replayed the whole journal instead; 0 or 1 per open.
    pub checkpoint_fallbacks: u64,
    /// Checkpoints that could not be written (the journal is durable regardless; the next
    /// open replays more); retried at the next threshold.
    pub checkpoint_write_failures: u64,
}

/// Most transfers one history page returns.
pub const HISTORY_PAGE_MAX: usize = 1_000;

/// Called on the writer thread after each durable batch with the number of commands it
/// decided and the time its append + flush + fdatasync took. Must be quick and never block.
pub type CommitObserver = Box<dyn Fn(usize, Duration) + Send + Sync>;

struct Inner {
    observer: Arc<std::sync::OnceLock<CommitObserver>>,
    clock_readings_refused: Arc<std::sync::atomic::AtomicU64>,
    checkpoint_fallbacks: u64,
    checkpoint_write_failures: Arc<std::sync::atomic::AtomicU64>,
    start: journal::Start,
    tx: Option<mpsc::Sender<Command>>,
    /// The writer's queue of durable reads, beside `tx` so that reads never wait behind
    /// queued changes.
    reads_tx: Option<mpsc::Sender<writer::DurableReadFn>>,
    storage: Arc<dyn Storage>,
    currencies: Currencies,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The seq of the last durable record, published by the writer after each append; read
    /// without queueing behind the writer (and its fsync).
    durable_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The balances as of the last durable batch (see `view.rs`).
    view: Arc<parking_lot::RwLock<view::BalanceView>>,
    /// The longest linked chain taken: [`LINKED_CHAIN_OPS_MAX`], or less if one record
    /// takes fewer changes.
    linked_chain_ops_max: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and stop; joining it means
        // the database is released when the last handle is gone (a reopen then works).
        self.tx.take();
        self.reads_tx.take();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

/// A handle on the ledger; cheap to clone, shared by all tasks. Every state-changing call
/// returns only once its effect is durable.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens (or creates) the ledger at `<data_dir>/ledger`, replays and checks its journal,
    /// and starts the writer.
    pub fn open(
        data_dir: &Path,
        settings: &LedgerSettings,
        clock: SharedClock,
    ) -> Result<Ledger, LedgerError> {
        Self::open_with_options(data_dir, settings, clock, LedgerOptions::default())
    }

    /// [`Ledger::open`] with writer tuning.
    pub fn open_with_options(
        data_dir: &Path,
        settings: &LedgerSettings,
        clock: SharedClock,
        options: LedgerOptions,
    ) -> Result<Ledger, LedgerError> {
        let currencies = Currencies::from_settings(settings).map_err(LedgerError::Settings)?;
        let path = data_dir.join("ledger");
        std::fs::create_dir_all(&path)
            .map_err(|e| StorageError::Backend(format!("cannot create {}: {e}", path.display())))?;
        let storage: Arc<dyn Storage> = Arc::new(SledStorage::open(&path)?);
        Self::open_storage(storage, currencies, clock, options)
    }

    /// Opens a ledger over any [`Storage`].
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        currencies: Currencies,
        clock: SharedClock,
        options: LedgerOptions,
    ) -> Result<Ledger, LedgerError> {
        let (replayed, start) = journal::replay_for_open(&storage)?;
        if let journal::Start::OldFormat { seq } = &start {
            tracing::info!(
                checkpoint_seq = seq,
                "the ledger's checkpoint is in an older version's format; replayed the whole \
                 journal instead (a checkpoint in the current format is written soon)"
            );
        }
        if let journal::Start::FellBack { reason } = &start {
            tracing::warn!(
                %reason,
                "the ledger's checkpoint cannot be used; replayed the whole journal instead \
                 (a new checkpoint is written soon)"
            );
        }
        let mut state = replayed.state;
        // Exponents are data (they give minor units their meaning) and come from the journal;
        // a config currency the journal lacks is defined now, durably.
        for c in currencies.iter() {
            if let Some(known) = state.currencies().get(c.code) {
                if known.exponent != c.exponent {
                    return Err(LedgerError::Settings(format!(
                        "currency {} has {} decimal places in the journal but {} in the config; \
                         the exponent of a currency in use cannot change",
                        c.code, known.exponent, c.exponent
                    )));
                }
            }
        }
        let observer: Arc<std::sync::OnceLock<CommitObserver>> = Arc::default();
        let clock_readings_refused: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let checkpoint_write_failures: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let monotonic = options
            .monotonic
            .unwrap_or_else(|| Arc::new(SystemMonotonic::default()));
        let mut writer = Writer {
            observer: observer.clone(),
            state: State::new(Currencies::default()),
            storage: storage.clone(),
            time: time::LedgerTime::new(
                clock,
                monotonic,
                options.clock_skew_ms_max,
                clock_readings_refused.clone(),
            ),
            head: replayed.head,
            last_time_ms: replayed.last_time_ms,
            batch_commands_max: options.batch_commands_max.max(1),
            expiry_tick: Duration::from_millis(options.expiry_tick_ms.max(1)),
            checkpoint_entries_min: options.checkpoint_entries_min,
            checkpoint_at_close: options.checkpoint_at_close,
            // A full replay (or a bad checkpoint) is worth a checkpoint at the first chance.
            entries_since_checkpoint: match start {
                journal::Start::Checkpoint { .. } => replayed.events,
                _ => u64::MAX / 2,
            },
            checkpoint_write_failures: checkpoint_write_failures.clone(),
            checkpoint_in_flight: None,
            checkpoint_sync_next: !matches!(start, journal::Start::Checkpoint { .. }),
            durable_seq: Arc::new(std::sync::atomic::AtomicU64::new(replayed.head.seq)),
            view: Arc::default(),
            ops_carried: None,
            held: std::collections::VecDeque::new(),
            held_changes: 0,
        };
        let now_ms = writer.time.now_ms(writer.last_time_ms);
        let mut events = Vec::new();
        for c in currencies.iter() {
            if state.currencies().get(c.code).is_none() {
                state.define_currency(c.code, c.exponent, now_ms, &mut events);
            }
        }
        state.set_limits(&currencies);
        writer.state = state;
        if !events.is_empty() {
            writer.append_now(&events, now_ms)?;
        }
        let durable_seq = writer.durable_seq.clone();
        writer.state.track_touched();
        writer.state.publish(&mut writer.view.write());
        let view = writer.view.clone();
        let (tx, rx) = mpsc::channel(options.queue_commands_max.max(1));
        let (reads_tx, reads_rx) = mpsc::channel(READS_QUEUED_MAX);
        let handle = std::thread::Builder::new()
            .name("mxpay-ledger-writer".to_owned())
            .spawn(move || writer.run(rx, reads_rx))
            .map_err(|e| StorageError::Backend(format!("cannot start the ledger writer: {e}")))?;
        Ok(Ledger {
            inner: Arc::new(Inner {
                observer,
                clock_readings_refused,
                checkpoint_fallbacks: u64::from(matches!(start, journal::Start::FellBack { .. })),
                checkpoint_write_failures,
                start,
                tx: Some(tx),
                reads_tx: Some(reads_tx),
                storage,
                currencies,
                writer: Mutex::new(Some(handle)),
                durable_seq,
                view,
                linked_chain_ops_max: LINKED_CHAIN_OPS_MAX.min(options.batch_commands_max.max(1)),
            }),
        })
    }

    /// Installs `observer`, told about every later durable batch (for metrics). Only the
    /// first observer of a ledger is kept; returns whether this one was installed.
    pub fn observe_commits(&self, observer: CommitObserver) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// The alarms raised since the ledger was opened.
    pub fn alarms(&self) -> LedgerAlarms {
        LedgerAlarms {
            anchor_write_failures: self.inner.storage.anchor_write_failures(),
            clock_readings_refused: self
                .inner
                .clock_readings_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            checkpoint_fallbacks: self.inner.checkpoint_fallbacks,
            checkpoint_write_failures: self
                .inner
                .checkpoint_write_failures
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The record whose checkpoint this ledger was opened from (`None`: it replayed the whole
    /// journal, having no usable checkpoint).
    pub fn opened_from_checkpoint(&self) -> Option<u64> {
        match self.inner.start {
            journal::Start::Checkpoint { seq } => Some(seq),
            _ => None,
        }
    }

    /// Writes a checkpoint of the durable state now (the writer also does when enough was
    /// committed since the last, and at close); returns the record it stands for (0 for an
    /// empty journal, which has none).
    pub async fn checkpoint(&self) -> Result<u64, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Checkpoint { reply }).await?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// The configured currencies.
    pub fn currencies(&self) -> &Currencies {
        &self.inner.currencies
    }

    /// Checks and converts an amount (`12.50`, `"EUR"`); never rounds.
    pub fn parse_amount(&self, value: Decimal, currency: &str) -> Result<Amount, AmountError> {
        self.inner.currencies.parse(value, currency)
    }

    /// Checks an amount given in minor units.
    pub fn amount_from_minor(&self, minor: u128, currency: &str) -> Result<Amount, AmountError> {
        self.inner.currencies.from_minor(minor, currency)
    }

    /// Minor units back to a decimal with the currency's decimal places (`1250` -> `12.50`).
    pub fn to_decimal(&self, currency: CurrencyCode, minor: u128) -> Option<Decimal> {
        self.inner.currencies.to_decimal(currency, minor)
    }

    async fn send(&self, command: Command) -> Result<(), LedgerError> {
        let tx = self.inner.tx.as_ref().ok_or(LedgerError::Closed)?;
        tx.send(command).await.map_err(|_| LedgerError::Closed)
    }

    async fn op(&self, op: Op) -> Result<Option<Answer>, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Op { op, reply }).await?;
        let result: OpResult = rx.await.map_err(|_| LedgerError::Closed)??;
        Ok(result?)
    }

    async fn transfer_op(&self, op: Op) -> Result<Answer, LedgerError> {
        Ok(self
            .op(op)
            .await?
            .expect("transfer operations answer with the transfer"))
    }

    async fn create_op(&self, op: Op) -> Result<CreateResult, LedgerError> {
        let answer = self.transfer_op(op).await?;
        Ok(if answer.exists {
            CreateResult::Exists(answer.transfer)
        } else {
            CreateResult::Created(answer.transfer)
        })
    }

    /// Reads the whole state once the record being decided when the read reaches the writer
    /// is durable (for `verify_with_memory` and tests, which compare all of it).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State, Head) -> T + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (reply, rx) = oneshot::channel();
        let read = Box::new(move |state: &State, head: Head| {
            let _ = reply.send(f(state, head));
        });
        self.send(Command::Read(read)).await?;
        rx.await.map_err(|_| LedgerError::Closed)
    }

    /// Reads the durable state (`head` is the last durable record), sent on the writer's
    /// queue of reads: answered at once when the writer is idle or writing a record (which
    /// it never shows), else once the record it is deciding is gathered; never after the
    /// changes queued, nor after a record's fsync.
    async fn read_durable<T: Send + 'static>(
        &self,
        f: impl FnOnce(Durable<'_>, Head) -> T + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (reply, rx) = oneshot::channel();
        let read = Box::new(move |state: Durable<'_>, head: Head| {
            let _ = reply.send(f(state, head));
        });
        let tx = self.inner.reads_tx.as_ref().ok_or(LedgerError::Closed)?;
        tx.send(read).await.map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)
    }

    /// Moves money at once. Retrying the same request returns the same result.
    pub async fn create_transfer(&self, request: TransferRequest) -> Result<Transfer, LedgerError> {
        Ok(self.create_transfer_result(request).await?.into_transfer())
    }

    /// [`Ledger::create_transfer`], saying whether the transfer was created by this call or
    /// already existed (a retry, TigerBeetle's `exists`).
    pub async fn create_transfer_result(
        &self,
        request: TransferRequest,
    ) -> Result<CreateResult, LedgerError> {
        self.create_op(Op::Create {
            request,
            timeout_ms: None,
            refund_of: None,
        })
        .await
    }

    /// Reserves money until [`Ledger::post`], [`Ledger::void`], or `timeout_ms` passes.
    pub async fn create_pending(
        &self,
        request: TransferRequest,
        timeout_ms: u64,
    ) -> Result<Transfer, LedgerError> {
        Ok(self
            .create_pending_result(request, timeout_ms)
            .await?
            .into_transfer())
    }

    /// [`Ledger::create_pending`], saying whether the transfer was created by this call or
    /// already existed.
    pub async fn create_pending_result(
        &self,
        request: TransferRequest,
        timeout_ms: u64,
    ) -> Result<CreateResult, LedgerError> {
        self.create_op(Op::Create {
            request,
            timeout_ms: Some(timeout_ms),
            refund_of: None,
        })
        .await
    }

    /// Many creates, posts and voids in one call, decided in order, as TigerBeetle's
    /// `create_transfers`: each gets the result its single call would give
    /// ([`CreateResult::Exists`] for a retry, or a post or void that was already done;
    /// [`LedgerError::Rejected`] for a refusal, [`LedgerError::Storage`] if a row it needed
    /// could not be read), and a refused one does not stop the others. It returns once every change is durable. The
    /// writer takes the whole call as one queued command (at most [`BATCH_OPS_MAX`] changes;
    /// a longer call is sent as several, in order), so a caller with thousands of transfers
    /// pays for one queue slot and one wake-up instead of one each. A storage failure part
    /// way answers the whole call with the error: as for a single call, the outcome of each
    /// change is then unknown, and retrying with the same ids is safe. For changes that must
    /// apply together (several legs of one payment), see [`Ledger::batch_linked`].
    pub async fn batch(
        &self,
        ops: Vec<BatchOp>,
    ) -> Result<Vec<Result<CreateResult, LedgerError>>, LedgerError> {
        let mut ops = ops.into_iter().map(batch_op);
        let mut calls = Vec::new();
        loop {
            let chunk: Vec<Op> = ops.by_ref().take(BATCH_OPS_MAX).collect();
            if chunk.is_empty() {
                break;
            }
            let (reply, rx) = oneshot::channel();
            self.send(Command::Ops(writer::OpsInFlight::new(chunk, reply)))
                .await?;
            calls.push(rx);
        }
        let mut outcomes = Vec::new();
        for rx in calls {
            let results = rx.await.map_err(|_| LedgerError::Closed)??;
            outcomes.extend(results.into_iter().map(batch_answer));
        }
        Ok(outcomes)
    }

    /// [`Ledger::batch`] with linked chains (TigerBeetle's `flags.linked`): a run of entries
    /// marked `linked` and the first unmarked one after them form a chain, decided in order
    /// (each change sees those before it) and applied whole or not at all, in one journal
    /// record. When a change of a chain fails, it answers its own failure and every other
    /// change of the chain `LinkedEventFailed`; nothing of the chain is applied or recorded.
    /// A chain left open by the call's last entry answers `LinkedEventChainOpen` (that entry)
    /// and `LinkedEventFailed` (the others); one longer than [`LINKED_CHAIN_OPS_MAX`] answers
    /// `LinkedChainTooLong` for each change. A retry of a chain that was applied answers
    /// `Exists` for each change; a chain that mixes changes already made with new ones is
    /// refused (`LinkedChainPartlyExists`). Changes outside chains behave as in `batch`.
    pub async fn batch_linked(
        &self,
        entries: Vec<BatchEntry>,
    ) -> Result<Vec<Result<CreateResult, LedgerError>>, LedgerError> {
        if !entries.iter().any(|e| e.linked) {
            return self
                .batch(entries.into_iter().map(|e| e.op).collect())
                .await;
        }
        let total = entries.len();
        // Each entry's answer, by position: given here for chains refused whole, by the writer
        // for the others.
        let mut answers: Vec<Option<Result<CreateResult, LedgerError>>> =
            (0..total).map(|_| None).collect();
        // The changes sent to the writer, in order, as calls of at most BATCH_OPS_MAX changes
        // that never split a chain: (positions, ops, links).
        let mut chunks: Vec<(Vec<usize>, Vec<Op>, Vec<bool>)> = Vec::new();
        let mut entries = entries.into_iter().enumerate().peekable();
        while let Some((first, entry)) = entries.next() {
            let mut unit = vec![(first, entry)];
            while unit.last().is_some_and(|(_, e)| e.linked) {
                match entries.next() {
                    Some(next) => unit.push(next),
                    None => break,
                }
            }
            let refused = if unit.last().is_some_and(|(_, e)| e.linked) {
                Some(TransferError::LinkedEventChainOpen)
            } else if unit.len() > self.inner.linked_chain_ops_max {
                Some(TransferError::LinkedChainTooLong)
            } else {
                None
            };
            if let Some(error) = refused {
                let last = unit.len() - 1;
                for (i, (at, _)) in unit.iter().enumerate() {
                    let error = match error {
                        TransferError::LinkedEventChainOpen if i < last => {
                            TransferError::LinkedEventFailed
                        }
                        error => error,
                    };
                    answers[*at] = Some(Err(LedgerError::Rejected(error)));
                }
                continue;
            }
            let starts_new = chunks
                .last()
                .is_none_or(|(_, ops, _)| ops.len() + unit.len() > BATCH_OPS_MAX);
            if starts_new {
                chunks.push((Vec::new(), Vec::new(), Vec::new()));
            }
            let (positions, ops, links) = chunks.last_mut().expect("pushed above");
            for (at, entry) in unit {
                positions.push(at);
                links.push(entry.linked);
                ops.push(batch_op(entry.op));
            }
        }
        let mut calls = Vec::new();
        for (positions, ops, links) in chunks {
            let (reply, rx) = oneshot::channel();
            let links = if links.iter().any(|&l| l) {
                links
            } else {
                Vec::new()
            };
            self.send(Command::Ops(writer::OpsInFlight::linked(ops, links, reply)))
                .await?;
            calls.push((positions, rx));
        }
        for (positions, rx) in calls {
            let results = rx.await.map_err(|_| LedgerError::Closed)??;
            for (at, result) in positions.into_iter().zip(results) {
                answers[at] = Some(batch_answer(result));
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every entry is answered"))
            .collect())
    }

    /// Posts a pending transfer, in full (`None`) or in part (the rest is released).
    /// Posting again with the same amount returns the same result.
    pub async fn post(
        &self,
        pending: TransferId,
        amount: Option<Amount>,
    ) -> Result<Transfer, LedgerError> {
        Ok(self
            .transfer_op(Op::Post { pending, amount })
            .await?
            .transfer)
    }

    /// Releases a pending transfer. Voiding again returns the same result.
    pub async fn void(&self, pending: TransferId) -> Result<Transfer, LedgerError> {
        Ok(self.transfer_op(Op::Void { pending }).await?.transfer)
    }

    /// Refunds (part of) a posted transfer as a new transfer `id` in the opposite direction;
    /// refunds never exceed what remains unrefunded.
    pub async fn refund(
        &self,
        id: TransferId,
        original: TransferId,
        amount: Amount,
        memo: Vec<u8>,
    ) -> Result<Transfer, LedgerError> {
        Ok(self
            .refund_result(id, original, amount, memo)
            .await?
            .into_transfer())
    }

    /// [`Ledger::refund`], saying whether the refund was made by this call or already
    /// existed.
    pub async fn refund_result(
        &self,
        id: TransferId,
        original: TransferId,
        amount: Amount,
        memo: Vec<u8>,
    ) -> Result<CreateResult, LedgerError> {
        self.create_op(Op::Refund {
            id,
            original,
            amount,
            memo,
        })
        .await
    }

    /// A refund of `refund_of` named by its accounts, single-phase (`timeout_ms: None`) or
    /// pending (then posted, voided or expiring like any pending transfer, e.g. around the
    /// payee's PIN step-up). `request.debit` and `request.credit` must be the original's
    /// credit and debit (`RefundAccountsMismatch`), in its currency. The original must be
    /// posted and not itself a refund, and its posted refunds plus what its live pending
    /// refunds reserve plus this one must not exceed what it posted (`RefundExceedsRemaining`;
    /// exactly that much is accepted). A pending refund reserves its amount of the cap at
    /// once; voided or expired, it gives it back; posted (in full or in part), what it
    /// posted counts as refunded. Refunds are not held to the currency's `max_transfer`.
    /// Idempotent like any create: the same id with the same body (and original) answers
    /// `Exists`.
    pub async fn create_refund_result(
        &self,
        request: TransferRequest,
        refund_of: TransferId,
        timeout_ms: Option<u64>,
    ) -> Result<CreateResult, LedgerError> {
        self.create_op(Op::Create {
            request,
            timeout_ms,
            refund_of: Some(refund_of),
        })
        .await
    }

    /// The refunds of a transfer (single-phase and pending, in any state), oldest first;
    /// empty if it has none or is unknown. Looked up by reference, not by a scan. As of the
    /// last durable record, like [`Ledger::transfer`].
    pub async fn refunds_of(&self, original: TransferId) -> Result<Vec<Transfer>, LedgerError> {
        Ok(self
            .read_durable(move |state, _| state.refunds_of(original))
            .await??)
    }

    /// Expires pending transfers whose deadline passed; returns those this call expired (the
    /// writer also expires them by itself when idle).
    pub async fn expire_due(&self) -> Result<Vec<TransferId>, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ExpireDue { reply }).await?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Freezes an account: no new transfers out of it (`Debits`), or none out of or into it
    /// (`All`). Pending transfers created before the freeze can still be posted, voided or
    /// expire, on either side: their money was reserved when they were admitted.
    pub async fn freeze(&self, account: AccountId, mode: FreezeMode) -> Result<(), LedgerError> {
        self.op(Op::Freeze {
            account,
            mode: Some(mode),
        })
        .await
        .map(|_| ())
    }

    /// Lifts a freeze.
    pub async fn unfreeze(&self, account: AccountId) -> Result<(), LedgerError> {
        self.op(Op::Freeze {
            account,
            mode: None,
        })
        .await
        .map(|_| ())
    }

    /// The accounts of `owner`, one per currency it ever used, as of the last durable batch:
    /// answered at once, not queued behind the batch being written.
    pub async fn balances(&self, owner: &Owner) -> Result<Vec<AccountView>, LedgerError> {
        Ok(self.inner.view.read().balances(owner))
    }

    /// One account; `None` if never used.
    pub async fn account(&self, account: &AccountId) -> Result<Option<AccountView>, LedgerError> {
        Ok(self.inner.view.read().account(account))
    }

    /// A transfer by id, as of the last durable record; not queued behind a record's fsync
    /// (see `docs/ledger.md`, How it works).
    pub async fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, LedgerError> {
        Ok(self
            .read_durable(move |state, _| state.transfer(id))
            .await??)
    }

    /// Transfers touching `owner`, newest first, `limit` (at most [`HISTORY_PAGE_MAX`]) per
    /// page; pass the returned cursor for the next page. As of the last durable record, like
    /// [`Ledger::transfer`].
    pub async fn history(
        &self,
        owner: &Owner,
        cursor: Option<HistoryCursor>,
        limit: usize,
    ) -> Result<HistoryPage, LedgerError> {
        let owner = owner.clone();
        let limit = limit.min(HISTORY_PAGE_MAX);
        let (transfers, next) = self
            .read_durable(move |state, _| state.history(&owner, cursor.map(|c| c.0), limit))
            .await??;
        Ok(HistoryPage {
            transfers,
            next: next.map(HistoryCursor),
        })
    }

    /// The transfers created with `reference` ([`TransferRequest::reference`], not 0),
    /// oldest first, at most `limit` (at most [`HISTORY_PAGE_MAX`]), as of the last durable
    /// record like [`Ledger::transfer`] (TigerBeetle's `query_transfers` by `user_data_128`).
    /// From an index, never a scan: in memory for the transfers held there, and for those
    /// on disk a sorted reference index in each segment, searched only where its lowest and
    /// highest reference span `reference`. Reference 0 (none) finds nothing.
    pub async fn transfers_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<Transfer>, LedgerError> {
        let limit = limit.min(HISTORY_PAGE_MAX);
        Ok(self
            .read_durable(move |state, _| state.transfers_by_reference(reference, limit))
            .await??)
    }

    /// A page of the transfers touching `owner` that `query` selects (a range of ledger
    /// time, an order, a page size and a cursor), as of the last durable record like
    /// [`Ledger::transfer`]. Reads no row and no history list outside the time range but
    /// the few rows of the two binary searches that find it (see [`HistoryQuery`]).
    pub async fn history_query(
        &self,
        owner: &Owner,
        query: HistoryQuery,
    ) -> Result<HistoryPage, LedgerError> {
        let owner = owner.clone();
        let limit = query.limit.min(HISTORY_PAGE_MAX);
        let (transfers, next) = self
            .read_durable(move |state, _| {
                state.history_query(
                    &owner,
                    query.created_ms_min..=query.created_ms_max,
                    query.order,
                    query.cursor.map(|c| c.0),
                    limit,
                )
            })
            .await??;
        Ok(HistoryPage {
            transfers,
            next: next.map(HistoryCursor),
        })
    }

    /// Every transfer still pending, oldest deadline first, as of the last durable record,
    /// like [`Ledger::transfer`].
    pub async fn pending_transfers(&self) -> Result<Vec<Transfer>, LedgerError> {
        Ok(self
            .read_durable(|state, _| state.pending_transfers())
            .await??)
    }

    /// Replays the durable journal from record 1 (checking its hash chain, the head anchor,
    /// and the last checkpoint byte for byte at its record) and checks every invariant on the
    /// replay. It reads the store only, never the writer's state: payments go on meanwhile.
    /// The state in memory is compared through the checkpoint, which the writer encodes from
    /// it; see [`Ledger::verify_with_memory`] for a comparison up to now.
    pub async fn verify(&self) -> Result<VerifyReport, LedgerError> {
        let durable = self.durable_seq_now();
        let replayed = journal::replay(self.inner.storage.as_ref(), Some(durable), false)?;
        replayed
            .state
            .check_invariants()
            .map_err(LedgerError::Invariant)?;
        Ok(report(&replayed.state, &replayed))
    }

    /// [`Ledger::verify`], and the state in memory compared with the replay in every part
    /// (daily windows, histories and deadlines included). The writer copies its state for
    /// this, which holds up every payment for as long as the copy takes: for tests and
    /// maintenance windows, not for a busy ledger.
    pub async fn verify_with_memory(&self) -> Result<VerifyReport, LedgerError> {
        let view = self.inner.view.clone();
        let (state, head, view_agrees) = self
            .read(move |state, head| {
                // Read after the batch it came in was published: the view is the state.
                let view_agrees = view.read().all() == state.accounts().as_slice();
                (state.clone(), head, view_agrees)
            })
            .await?;
        if !view_agrees {
            return Err(LedgerError::Invariant(
                "the balances readers see differ from the state in memory".into(),
            ));
        }
        state.check_invariants().map_err(LedgerError::Invariant)?;
        let replayed = journal::replay(self.inner.storage.as_ref(), Some(head.seq), false)?;
        if replayed.head != head {
            return Err(LedgerError::Corrupt {
                record: head.seq,
                reason: "the journal's last record differs from the one the ledger wrote".into(),
            });
        }
        if let Some(diff) = state.full_diff(&replayed.state, replayed.last_time_ms) {
            return Err(LedgerError::Invariant(format!(
                "memory differs from the journal: {diff}"
            )));
        }
        Ok(report(&state, &replayed))
    }

    /// Streams the durable journal, entry by entry, checking the hash chain as it goes. It
    /// stops at the record that was durable when it started: sled shows a batch's record to
    /// readers before the writer's fsync makes it durable, and an export must never show what
    /// a power cut could still undo.
    pub fn export(&self) -> JournalExport {
        JournalExport::new(self.inner.storage.as_ref(), Some(self.durable_seq_now()))
    }

    /// Follows the journal from its first record as it grows (for the payment layer's outbox,
    /// which tells rooms about state changes). Read it up to [`Ledger::durable_seq`].
    pub fn tail(&self) -> JournalTail {
        JournalTail::new(self.inner.storage.clone())
    }

    /// Like [`Ledger::tail`], but the first entries read are those of record `from_seq` (the
    /// record holding an outbox cursor), so a restart does not read the whole journal again
    /// before reaching it. Records before `from_seq` are not chain-checked again (opening the
    /// ledger did that); `from_seq` 0 or 1 is [`Ledger::tail`]. Refused (`Corrupt`) when
    /// record `from_seq - 1` is not durable or not readable.
    pub async fn tail_from(&self, from_seq: u64) -> Result<JournalTail, LedgerError> {
        let (accounts, head_seq) = self
            .read_durable(|state, head| (state.account_ids(), head.seq))
            .await?;
        if from_seq > head_seq.saturating_add(1) {
            return Err(LedgerError::Corrupt {
                record: from_seq - 1,
                reason: format!(
                    "the tail cannot start at record {from_seq}: the journal ends at record {head_seq}"
                ),
            });
        }
        // One record read, like the reads `JournalTail::read_until` does on the caller's task.
        JournalTail::starting_at(self.inner.storage.clone(), from_seq, accounts)
    }

    /// The seq of the last journal record that is durable (0 when none is). Answered at
    /// once, not after the batch being written.
    pub async fn durable_seq(&self) -> Result<u64, LedgerError> {
        Ok(self.durable_seq_now())
    }

    fn durable_seq_now(&self) -> u64 {
        self.inner
            .durable_seq
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// A synchronous face of this ledger for the CLI, the bench and tests.
    pub fn blocking(&self) -> BlockingLedger {
        BlockingLedger(self.clone())
    }

    /// Stops the writer after what is queued and waits for it, if this is the last handle.
    pub async fn close(self) {
        drop(self);
    }
}

fn report(state: &State, replayed: &journal::Replayed) -> VerifyReport {
    VerifyReport {
        records: replayed.head.seq,
        entries: replayed.events,
        checkpoint: replayed.checkpoint,
        accounts: state.accounts().len(),
        transfers: state.transfer_count(),
        pending: state.pending_count(),
    }
}

/// Verifies the ledger at `<data_dir>/ledger` without a config and without writing: replays
/// the journal, checking the hash chain, the head and every invariant. The ledger must not be
/// open elsewhere (sled locks the directory).
pub fn verify_dir(data_dir: &Path) -> Result<VerifyReport, LedgerError> {
    let path = data_dir.join("ledger");
    if !path.join("conf").exists() {
        return Err(
            StorageError::Backend(format!("no ledger database at {}", path.display())).into(),
        );
    }
    let storage = SledStorage::open(&path)?;
    let replayed = journal::replay(&storage, None, true)?;
    replayed
        .state
        .check_invariants()
        .map_err(LedgerError::Invariant)?;
    Ok(report(&replayed.state, &replayed))
}

/// A batch change's answer from the writer's.
fn batch_answer(
    result: Result<state::OpResult, StorageError>,
) -> Result<CreateResult, LedgerError> {
    let answer = result??.expect("transfer operations answer with the transfer");
    Ok(if answer.exists {
        CreateResult::Exists(answer.transfer)
    } else {
        CreateResult::Created(answer.transfer)
    })
}

/// The writer's op for a batch change.
fn batch_op(op: BatchOp) -> Op {
    match op {
        BatchOp::Create(request) => Op::Create {
            request,
            timeout_ms: None,
            refund_of: None,
        },
        BatchOp::CreatePending {
            request,
            timeout_ms,
        } => Op::Create {
            request,
            timeout_ms: Some(timeout_ms),
            refund_of: None,
        },
        BatchOp::Post { pending, amount } => Op::Post { pending, amount },
        BatchOp::Void { pending } => Op::Void { pending },
    }
}

impl Writer {
    /// Appends events decided outside a batch (currency definitions at open).
    fn append_now(&mut self, events: &[state::Event], now_ms: u64) -> Result<(), LedgerError> {
        let seq = self.head.seq + 1;
        let (record, hash) = codec::encode_record(seq, &self.head.hash, now_ms, events);
        let head = Head { seq, hash };
        self.storage.append(seq, &record, &head.encode())?;
        self.head = head;
        self.durable_seq
            .store(seq, std::sync::atomic::Ordering::Release);
        self.last_time_ms = now_ms;
        self.entries_since_checkpoint = self
            .entries_since_checkpoint
            .saturating_add(events.len() as u64);
        Ok(())
    }
}

/// The same operations as [`Ledger`], blocking the calling thread. Do not use it on an async
/// runtime's worker thread.
#[derive(Clone, Debug)]
pub struct BlockingLedger(Ledger);

impl BlockingLedger {
    /// The async handle.
    pub fn ledger(&self) -> &Ledger {
        &self.0
    }

    /// See [`Ledger::create_transfer`].
    pub fn create_transfer(&self, request: TransferRequest) -> Result<Transfer, LedgerError> {
        block_on(self.0.create_transfer(request))
    }

    /// See [`Ledger::batch`].
    pub fn batch(
        &self,
        ops: Vec<BatchOp>,
    ) -> Result<Vec<Result<CreateResult, LedgerError>>, LedgerError> {
        block_on(self.0.batch(ops))
    }

    /// See [`Ledger::batch_linked`].
    pub fn batch_linked(
        &self,
        entries: Vec<BatchEntry>,
    ) -> Result<Vec<Result<CreateResult, LedgerError>>, LedgerError> {
        block_on(self.0.batch_linked(entries))
    }

    /// See [`Ledger::create_transfer_result`].
    pub fn create_transfer_result(
        &self,
        request: TransferRequest,
    ) -> Result<CreateResult, LedgerError> {
        block_on(self.0.create_transfer_result(request))
    }

    /// See [`Ledger::create_pending_result`].
    pub fn create_pending_result(
        &self,
        request: TransferRequest,
        timeout_ms: u64,
    ) -> Result<CreateResult, LedgerError> {
        block_on(self.0.create_pending_result(request, timeout_ms))
    }

    /// See [`Ledger::refund_result`].
    pub fn refund_result(
        &self,
        id: TransferId,
        original: TransferId,
        amount: Amount,
        memo: Vec<u8>,
    ) -> Result<CreateResult, LedgerError> {
        block_on(self.0.refund_result(id, original, amount, memo))
    }

    /// See [`Ledger::create_refund_result`].
    pub fn create_refund_result(
        &self,
        request: TransferRequest,
        refund_of: TransferId,
        timeout_ms: Option<u64>,
    ) -> Result<CreateResult, LedgerError> {
        block_on(self.0.create_refund_result(request, refund_of, timeout_ms))
    }

    /// See [`Ledger::refunds_of`].
    pub fn refunds_of(&self, original: TransferId) -> Result<Vec<Transfer>, LedgerError> {
        block_on(self.0.refunds_of(original))
    }

    /// See [`Ledger::create_pending`].
    pub fn create_pending(
        &self,
        request: TransferRequest,
        timeout_ms: u64,
    ) -> Result<Transfer, LedgerError> {
        block_on(self.0.create_pending(request, timeout_ms))
    }

    /// See [`Ledger::post`].
    pub fn post(
        &self,
        pending: TransferId,
        amount: Option<Amount>,
    ) -> Result<Transfer, LedgerError> {
        block_on(self.0.post(pending, amount))
    }

    /// See [`Ledger::void`].
    pub fn void(&self, pending: TransferId) -> Result<Transfer, LedgerError> {
        block_on(self.0.void(pending))
    }

    /// See [`Ledger::refund`].
    pub fn refund(
        &self,
        id: TransferId,
        original: TransferId,
        amount: Amount,
        memo: Vec<u8>,
    ) -> Result<Transfer, LedgerError> {
        block_on(self.0.refund(id, original, amount, memo))
    }

    /// See [`Ledger::expire_due`].
    pub fn expire_due(&self) -> Result<Vec<TransferId>, LedgerError> {
        block_on(self.0.expire_due())
    }

    /// See [`Ledger::freeze`].
    pub fn freeze(&self, account: AccountId, mode: FreezeMode) -> Result<(), LedgerError> {
        block_on(self.0.freeze(account, mode))
    }

    /// See [`Ledger::unfreeze`].
    pub fn unfreeze(&self, account: AccountId) -> Result<(), LedgerError> {
        block_on(self.0.unfreeze(account))
    }

    /// See [`Ledger::balances`].
    pub fn balances(&self, owner: &Owner) -> Result<Vec<AccountView>, LedgerError> {
        block_on(self.0.balances(owner))
    }

    /// See [`Ledger::account`].
    pub fn account(&self, account: &AccountId) -> Result<Option<AccountView>, LedgerError> {
        block_on(self.0.account(account))
    }

    /// See [`Ledger::transfer`].
    pub fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, LedgerError> {
        block_on(self.0.transfer(id))
    }

    /// See [`Ledger::history`].
    pub fn history(
        &self,
        owner: &Owner,
        cursor: Option<HistoryCursor>,
        limit: usize,
    ) -> Result<HistoryPage, LedgerError> {
        block_on(self.0.history(owner, cursor, limit))
    }

    /// See [`Ledger::transfers_by_reference`].
    pub fn transfers_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<Transfer>, LedgerError> {
        block_on(self.0.transfers_by_reference(reference, limit))
    }

    /// See [`Ledger::history_query`].
    pub fn history_query(
        &self,
        owner: &Owner,
        query: HistoryQuery,
    ) -> Result<HistoryPage, LedgerError> {
        block_on(self.0.history_query(owner, query))
    }

    /// See [`Ledger::pending_transfers`].
    pub fn pending_transfers(&self) -> Result<Vec<Transfer>, LedgerError> {
        block_on(self.0.pending_transfers())
    }

    /// See [`Ledger::verify`].
    pub fn verify(&self) -> Result<VerifyReport, LedgerError> {
        block_on(self.0.verify())
    }

    /// See [`Ledger::verify_with_memory`].
    pub fn verify_with_memory(&self) -> Result<VerifyReport, LedgerError> {
        block_on(self.0.verify_with_memory())
    }
}

/// Runs a future to completion on this thread. The ledger's futures only wait on tokio
/// channels, which need no runtime, so a parking waker is enough.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests;
