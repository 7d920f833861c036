//! The single writer: takes whatever requests are queued (up to a bound), decides them all
//! against the state in memory, writes the batch as ONE journal record with ONE flush, and
//! only then answers. Concurrent callers thereby share a flush (group commit).
//!
//! The record's append runs on a blocking thread; meanwhile the writer answers reads, which
//! come on a queue of their own, from the durable state (`State::durable`, which hides the
//! record in flight), and takes changes from their queue, held in order for the next record.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::codec::{Head, RecordBuilder, COMMAND_BYTES_MAX};
use super::model::TransferId;
use super::state::{CheckpointOutcome, Durable, Event, Op, OpResult, State};
use super::storage::{Storage, StorageError, RECORD_BYTES_TARGET};
use super::LedgerError;

/// The name of the thread that writes a spill's rows and the checkpoint in the background.
pub(crate) const CHECKPOINT_THREAD: &str = "mxpay-ledger-checkpoint";

/// A read of the durable state, on a queue of its own: answered when the writer is idle or
/// writing a record (it never shows that record), or else once the record being decided
/// is gathered; never behind the changes queued.
pub(crate) type DurableReadFn = Box<dyn FnOnce(Durable<'_>, Head) + Send>;

/// A read of the whole state, run on the writer after the record being decided when it
/// arrives is durable.
pub(crate) type ReadFn = Box<dyn FnOnce(&State, Head) + Send>;

/// What callers send to the writer.
pub(crate) enum Command {
    /// A state change.
    Op {
        op: Op,
        reply: oneshot::Sender<Result<OpResult, LedgerError>>,
    },
    /// Many state changes in order, answered together once the last is durable (the batch
    /// API, as TigerBeetle's `create_transfers`): one queue slot and one reply instead of one
    /// per change. They may span more than one journal record.
    Ops(OpsInFlight),
    /// Expire what is due now; answers with the ids this batch expired.
    ExpireDue {
        reply: oneshot::Sender<Result<Vec<TransferId>, LedgerError>>,
    },
    /// A read of the whole state once the record in progress is durable (see [`ReadFn`]).
    Read(ReadFn),
    /// Write a checkpoint after this batch; answers with its record.
    Checkpoint {
        reply: oneshot::Sender<Result<u64, LedgerError>>,
    },
}

/// The changes of a [`Command::Ops`] not decided yet, and the results of those that were.
pub(crate) struct OpsInFlight {
    ops: std::vec::IntoIter<Op>,
    /// By position in the call: whether the change is linked to the next (a linked chain,
    /// see `state/chain.rs`). Empty when the call has no chain. Every chain is closed and at
    /// most `batch_commands_max` long (`Ledger::batch_linked` answers the others itself).
    links: Vec<bool>,
    results: Vec<Result<OpResult, StorageError>>,
    reply: oneshot::Sender<Result<Vec<Result<OpResult, StorageError>>, LedgerError>>,
}

/// What a [`Command::Ops`] is answered with: each change's result, or the failed read of a
/// row that refused that change alone.
pub(crate) type OpsReply =
    oneshot::Sender<Result<Vec<Result<OpResult, StorageError>>, LedgerError>>;

impl OpsInFlight {
    pub fn new(ops: Vec<Op>, reply: OpsReply) -> Self {
        Self::linked(ops, Vec::new(), reply)
    }

    /// A call whose change at position `i` is linked to the next when `links[i]`.
    pub fn linked(ops: Vec<Op>, links: Vec<bool>, reply: OpsReply) -> Self {
        assert!(links.is_empty() || links.len() == ops.len());
        assert!(
            !links.last().is_some_and(|&l| l),
            "a linked chain left open"
        );
        Self {
            results: Vec::with_capacity(ops.len()),
            ops: ops.into_iter(),
            links,
            reply,
        }
    }

    /// How many changes the next decision takes: the whole chain that starts at the next
    /// change, 1 for a change on its own, 0 when all were decided.
    fn next_unit(&self) -> usize {
        let at = self.results.len();
        if self.ops.len() == 0 {
            return 0;
        }
        match self.links.get(at..) {
            Some(rest) if !rest.is_empty() => {
                rest.iter()
                    .position(|&linked| !linked)
                    .expect("chains are closed")
                    + 1
            }
            _ => 1,
        }
    }
}

// Replies live for one batch in one Vec; boxing the large variant would only add allocations.
#[allow(clippy::large_enum_variant)]
enum Reply {
    Op(
        oneshot::Sender<Result<OpResult, LedgerError>>,
        Result<OpResult, StorageError>,
    ),
    Ops(OpsReply, Vec<Result<OpResult, StorageError>>),
    Expired(oneshot::Sender<Result<Vec<TransferId>, LedgerError>>),
    ReadDurable(DurableReadFn),
    Read(ReadFn),
    Checkpoint(oneshot::Sender<Result<u64, LedgerError>>),
}

/// The writer's state; lives on its own thread.
pub(crate) struct Writer {
    /// Told about each durable batch (metrics); unset until someone observes.
    pub observer: Arc<std::sync::OnceLock<super::CommitObserver>>,
    pub state: State,
    pub storage: Arc<dyn Storage>,
    pub time: super::time::LedgerTime,
    pub head: Head,
    pub last_time_ms: u64,
    pub batch_commands_max: usize,
    pub expiry_tick: Duration,
    /// See [`super::LedgerOptions::checkpoint_entries_min`].
    pub checkpoint_entries_min: u64,
    /// See [`super::LedgerOptions::checkpoint_at_close`].
    pub checkpoint_at_close: bool,
    /// Journal entries committed since the last checkpoint (or replayed after it at open).
    pub entries_since_checkpoint: u64,
    /// See [`super::LedgerAlarms::checkpoint_write_failures`].
    pub checkpoint_write_failures: Arc<std::sync::atomic::AtomicU64>,
    /// A spill and checkpoint being written by a background thread (the checkpoint encoded
    /// on this thread after its record was durable, up to the filter of the rows; the rows
    /// encoded, written and synced there, then the checkpoint). At most one at a time, so an
    /// older one never overwrites a newer.
    pub checkpoint_in_flight: Option<std::thread::JoinHandle<CheckpointOutcome>>,
    /// Write the next due checkpoint on this thread: the stored one could not be used at
    /// open, and `verify` must not meet it again once a batch was committed.
    pub checkpoint_sync_next: bool,
    /// Where the seq of the last durable record is published (see `Ledger::durable_seq`).
    pub durable_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The balances readers see (see `view.rs`), updated after each durable batch.
    pub view: Arc<parking_lot::RwLock<super::view::BalanceView>>,
    /// A [`Command::Ops`] whose changes did not all fit in the last record: the next batch
    /// starts with the rest, before anything queued after it.
    pub ops_carried: Option<OpsInFlight>,
    /// Commands taken from the queue while a record was being written, in arrival order:
    /// the next record starts with them (after `ops_carried`).
    pub held: VecDeque<Command>,
    /// The changes in `held` (a batch call counts its changes): taking stops at
    /// `batch_commands_max`, what one record takes, and the queue pushes back as before.
    pub held_changes: usize,
}

impl Writer {
    /// Runs until every handle is dropped or storage fails.
    /// Reads of the durable state come on `reads`, a queue of their own, so that they never
    /// wait behind the changes queued on `rx`.
    pub fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut reads: mpsc::Receiver<DurableReadFn>,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            // The blocking thread that appends the records.
            .thread_name("mxpay-ledger-append")
            .build()
            .expect("a current-thread runtime for the ledger writer");
        runtime.block_on(async move {
            let mut record = RecordBuilder::default();
            loop {
                let first = if self.ops_carried.is_some() || !self.held.is_empty() {
                    // The rest of a batch call, and what was held while the last record was
                    // written, go first, without waiting for the queue.
                    None
                } else {
                    match self.idle(&mut rx, &mut reads).await {
                        Some(first) => first,
                        None => {
                            // Closed cleanly: the state is the journal's, so the next open
                            // starts from here.
                            if self.checkpoint_at_close && self.entries_since_checkpoint > 0 {
                                let _ = self.write_checkpoint();
                            }
                            break;
                        }
                    }
                };
                if let Err(e) = self.commit(first, &mut rx, &mut reads, &mut record).await {
                    tracing::error!(error = %e, "ledger storage failed; the ledger stops");
                    break;
                }
            }
            // Every command still queued, or sent by a caller that already held a permit,
            // is taken out and dropped, which answers its caller `Closed`. Merely dropping
            // the receiver drains only what was queued by then: a command sent a moment
            // later would stay in the channel (the handles keep it open) and its caller
            // would wait forever.
            rx.close();
            while let Some(command) = rx.recv().await {
                drop(command);
            }
            reads.close();
            while let Some(read) = reads.recv().await {
                drop(read);
            }
            // The database is released when this thread ends: no checkpoint write after it.
            self.finish_checkpoint_in_flight();
        });
    }

    /// Waits, answering reads, until a command comes (`Some(Some(_))`), the expiry tick
    /// passes (`Some(None)`: still expire what the clock says is due), or the queue is closed
    /// (`None`).
    async fn idle(
        &mut self,
        rx: &mut mpsc::Receiver<Command>,
        reads: &mut mpsc::Receiver<DurableReadFn>,
    ) -> Option<Option<Command>> {
        let tick = tokio::time::sleep(self.expiry_tick);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                command = rx.recv() => return command.map(Some),
                Some(read) = reads.recv() => read(self.state.durable(), self.head),
                () = &mut tick => return Some(None),
            }
        }
    }

    /// Waits for the checkpoint being written in the background, if any.
    fn finish_checkpoint_in_flight(&mut self) {
        if let Some(handle) = self.checkpoint_in_flight.take() {
            let outcome = handle.join().unwrap_or_else(|_| {
                CheckpointOutcome::RowsFailed(StorageError::Backend(
                    "the checkpoint thread panicked".to_owned(),
                ))
            });
            let _ = self.checkpoint_done(outcome);
        }
    }

    /// Takes in what became of a checkpoint: once its rows are durable the state stops
    /// holding them (freed on a thread of its own: about one allocation per row); if they
    /// are not, it keeps them, and the next checkpoint writes them again.
    fn checkpoint_done(&mut self, outcome: CheckpointOutcome) -> Result<(), StorageError> {
        let (filter, result) = match outcome {
            CheckpointOutcome::Written(filter) => (filter, Ok(())),
            CheckpointOutcome::CheckpointFailed(filter, error) => (filter, Err(error)),
            CheckpointOutcome::RowsFailed(error) => {
                self.checkpoint_failed(&error);
                return Err(error);
            }
        };
        let spilled = self.state.spill_written(filter);
        if !spilled.is_empty() {
            // If the thread cannot start, the closure (and the rows) is dropped right here.
            let _ = std::thread::Builder::new()
                .name("mxpay-ledger-free".to_owned())
                .spawn(move || {
                    drop(spilled);
                });
        }
        if let Err(error) = &result {
            self.checkpoint_failed(error);
        }
        result
    }

    fn checkpoint_failed(&self, error: &StorageError) {
        let failures = self
            .checkpoint_write_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::warn!(%error, failures, "cannot write the ledger's checkpoint; the journal is \
            durable, the next open replays more of it");
    }

    /// Starts writing a checkpoint of the state in the background: the state is encoded
    /// here (it is the replay of the durable journal up to `head`) and the transfers that
    /// ended since the last spill are handed over as they are; encoding and writing their
    /// rows, then the checkpoint, with their fsyncs, run on their own thread so commits do
    /// not wait for them. Skipped while the previous one is still being written (it is
    /// tried again after the next batch).
    fn start_checkpoint(&mut self) {
        if self
            .checkpoint_in_flight
            .as_ref()
            .is_some_and(|h| !h.is_finished())
        {
            return;
        }
        self.finish_checkpoint_in_flight();
        if self.checkpoint_sync_next {
            self.checkpoint_sync_next = false;
            let _ = self.write_checkpoint();
            return;
        }
        if self.head.seq == 0 || !self.storage.keeps_checkpoints() {
            return;
        }
        let job = match self
            .state
            .begin_checkpoint(&self.storage, self.head, self.last_time_ms)
        {
            Ok(job) => job,
            Err(error) => {
                self.checkpoint_failed(&error);
                self.entries_since_checkpoint = 0;
                return;
            }
        };
        let storage = self.storage.clone();
        let spawned = std::thread::Builder::new()
            .name(CHECKPOINT_THREAD.to_owned())
            .spawn(move || job.run(storage.as_ref()));
        match spawned {
            Ok(handle) => {
                self.entries_since_checkpoint = 0;
                self.checkpoint_in_flight = Some(handle);
            }
            // The job is gone with the closure; its rows stay in memory (not durable) and
            // this checkpoint writes them.
            Err(_) => {
                let _ = self.write_checkpoint();
            }
        }
    }

    /// Writes a checkpoint of the state, which is the replay of the durable journal up to
    /// `head`. A failure is logged and counted, never fatal: the journal is durable, and the
    /// next open only replays more of it.
    pub fn write_checkpoint(&mut self) -> Result<u64, LedgerError> {
        self.finish_checkpoint_in_flight();
        if self.head.seq == 0 || !self.storage.keeps_checkpoints() {
            return Ok(self.head.seq);
        }
        // Try again only after as many entries again, whatever happens.
        self.entries_since_checkpoint = 0;
        let job = self
            .state
            .begin_checkpoint(&self.storage, self.head, self.last_time_ms)
            .inspect_err(|error| self.checkpoint_failed(error))?;
        // The rows the checkpoint leaves out are durable before it is written.
        self.checkpoint_done(job.run(self.storage.as_ref()))?;
        Ok(self.head.seq)
    }

    /// Whether enough was committed since the last checkpoint to write one: at least
    /// `checkpoint_entries_min` entries, and at least half the size of the state, so that
    /// the cost of checkpoints stays proportional to what is committed.
    fn checkpoint_due(&self) -> bool {
        let state_size = self.state.checkpoint_items() / 2;
        self.entries_since_checkpoint >= self.checkpoint_entries_min.max(state_size)
    }

    /// Decides `first` and whatever else is queued, up to the batch bounds (commands, and
    /// record bytes measured as the events are encoded), commits them as one record, then
    /// answers them. Durable reads are answered while the record is appended.
    pub async fn commit(
        &mut self,
        first: Option<Command>,
        rx: &mut mpsc::Receiver<Command>,
        reads: &mut mpsc::Receiver<DurableReadFn>,
        record: &mut RecordBuilder,
    ) -> Result<(), LedgerError> {
        // Ledger time never goes backwards, and does not follow a jump of the clock.
        let now_ms = self.time.now_ms(self.last_time_ms);
        let mut events: Vec<Event> = Vec::new();
        record.clear();
        // From here on, what is decided is hidden from durable reads until it is durable.
        self.state.begin_record();
        let expired = self.state.expire_due(now_ms, &mut events);
        let mut replies = Vec::new();
        // Commands and the changes of batch calls decided into this record.
        let mut decided = 0usize;
        let batch_commands_max = self.batch_commands_max;
        let full = |decided: usize, record: &RecordBuilder| {
            decided >= batch_commands_max
                || record.bytes() + COMMAND_BYTES_MAX > RECORD_BYTES_TARGET
        };
        // Whether `changes` more fit in this record, at their worst case as above. A linked
        // chain is never split across records (a power cut between them would keep half of
        // it): one that does not fit waits for the next record, where it comes first and is
        // taken whatever the expiries before it weigh (it is at most `batch_commands_max`
        // changes, and `LINKED_CHAIN_OPS_MAX` at 4 KiB each is one record's target).
        let fits = |changes: usize, decided: usize, record: &RecordBuilder| {
            decided == 0
                || (decided + changes <= batch_commands_max
                    && record.bytes() + changes * COMMAND_BYTES_MAX <= RECORD_BYTES_TARGET)
        };
        let mut next = match self.ops_carried.take() {
            Some(call) => Some(Command::Ops(call)),
            None => self.take_held().or(first),
        };
        while let Some(command) = next {
            match command {
                Command::Op { op, reply } => {
                    let result = self.state.decide(op, now_ms, &mut events);
                    replies.push(Reply::Op(reply, result));
                    decided += 1;
                }
                Command::Ops(mut call) => {
                    loop {
                        let unit = call.next_unit();
                        if unit == 0 || full(decided, record) || !fits(unit, decided, record) {
                            break;
                        }
                        if unit == 1 {
                            let op = call.ops.next().expect("counted by next_unit");
                            call.results
                                .push(self.state.decide(op, now_ms, &mut events));
                        } else {
                            // What was decided before goes into the record first: a chain
                            // that fails takes back its own events only.
                            for event in events.drain(..) {
                                record.push(&event);
                            }
                            let ops = call.ops.by_ref().take(unit);
                            let results = self.state.decide_chain(ops, now_ms, &mut events);
                            call.results.extend(results);
                        }
                        decided += unit;
                        for event in events.drain(..) {
                            record.push(&event);
                        }
                    }
                    if call.ops.len() == 0 {
                        replies.push(Reply::Ops(call.reply, call.results));
                    } else {
                        // Answered once its last change is durable, in a later record.
                        self.ops_carried = Some(call);
                    }
                }
                Command::ExpireDue { reply } => replies.push(Reply::Expired(reply)),
                Command::Read(read) => replies.push(Reply::Read(read)),
                Command::Checkpoint { reply } => replies.push(Reply::Checkpoint(reply)),
            }
            for event in events.drain(..) {
                record.push(&event);
            }
            // Nothing queued after a carried batch call may be decided before its rest.
            next = if full(decided, record) || self.ops_carried.is_some() {
                None
            } else {
                match self.take_held() {
                    Some(command) => Some(command),
                    None => rx.try_recv().ok(),
                }
            };
        }
        for event in events.drain(..) {
            record.push(&event);
        }
        if !record.is_empty() {
            self.state.assert_totals_balance();
            let seq = self.head.seq + 1;
            let (bytes, hash) = record.finish(seq, &self.head.hash, now_ms);
            let head = Head { seq, hash };
            let storage = self.storage.clone();
            let head_bytes = head.encode();
            let append = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let appended = storage.append(seq, &bytes, &head_bytes);
                (appended, started.elapsed())
            });
            let (appended, elapsed) = self
                .hold_while_appending(append, rx, reads, &mut replies)
                .await;
            if let (Ok(()), Some(observe)) = (&appended, self.observer.get()) {
                observe(decided, elapsed);
            }
            if let Err(e) = appended {
                // The state in memory is now ahead of the disk: answer everyone with the
                // error and stop; reopening replays what is durable. Held commands were
                // taken from callers who would otherwise never hear back.
                let error = || LedgerError::Storage(e.to_string().into());
                if let Some(call) = self.ops_carried.take() {
                    let _ = call.reply.send(Err(error()));
                }
                for command in std::mem::take(&mut self.held) {
                    match command {
                        Command::Op { reply, .. } => {
                            let _ = reply.send(Err(error()));
                        }
                        Command::Ops(call) => {
                            let _ = call.reply.send(Err(error()));
                        }
                        Command::ExpireDue { reply } => {
                            let _ = reply.send(Err(error()));
                        }
                        Command::Checkpoint { reply } => {
                            let _ = reply.send(Err(error()));
                        }
                        // Never held: whole-state reads are replies.
                        Command::Read(_) => {}
                    }
                }
                self.held_changes = 0;
                for reply in replies {
                    match reply {
                        Reply::Op(tx, _) => {
                            let _ = tx.send(Err(error()));
                        }
                        Reply::Ops(tx, _) => {
                            let _ = tx.send(Err(error()));
                        }
                        Reply::Expired(tx) => {
                            let _ = tx.send(Err(error()));
                        }
                        Reply::Read(_) | Reply::ReadDurable(_) => {}
                        Reply::Checkpoint(tx) => {
                            let _ = tx.send(Err(error()));
                        }
                    }
                }
                return Err(e.into());
            }
            self.head = head;
            self.durable_seq
                .store(seq, std::sync::atomic::Ordering::Release);
            self.state.end_record();
            // Before the replies: a caller that got its answer reads its own effect.
            self.state.publish(&mut self.view.write());
            self.last_time_ms = now_ms;
            self.entries_since_checkpoint =
                self.entries_since_checkpoint.saturating_add(record.count());
            if self
                .checkpoint_in_flight
                .as_ref()
                .is_some_and(|h| h.is_finished())
            {
                // A written spill is taken in at once: held until the next spill began,
                // its transfers stayed in memory a whole cycle beside the new ones, and the
                // RSS at a point sawed between 0.8x and 1.3x of the first million's.
                self.finish_checkpoint_in_flight();
            }
            if self.checkpoint_due() {
                self.start_checkpoint();
            }
        } else {
            self.state.end_record();
        }
        for reply in replies {
            match reply {
                Reply::Op(tx, result) => {
                    // A row that could not be read fails its op alone: nothing changed.
                    let _ = tx.send(result.map_err(LedgerError::from));
                }
                Reply::Ops(tx, results) => {
                    let _ = tx.send(Ok(results));
                }
                Reply::Expired(tx) => {
                    let _ = tx.send(Ok(expired.clone()));
                }
                Reply::ReadDurable(read) => read(self.state.durable(), self.head),
                Reply::Read(read) => read(&self.state, self.head),
                Reply::Checkpoint(tx) => {
                    let _ = tx.send(self.write_checkpoint());
                }
            }
        }
        Ok(())
    }

    /// The next command held while the last record was written, if any.
    fn take_held(&mut self) -> Option<Command> {
        let command = self.held.pop_front()?;
        self.held_changes -= command_changes(&command);
        Some(command)
    }

    /// Answers a durable read now, or once the record in flight is durable if a change of
    /// it could not be hidden (a row that could not be read).
    fn read_durable(&self, read: DurableReadFn, replies: &mut Vec<Reply>) {
        if self.state.durable_readable() {
            read(self.state.durable(), self.head);
        } else {
            replies.push(Reply::ReadDurable(read));
        }
    }

    /// Waits for the record's append, meanwhile answering durable reads at once and taking
    /// commands from the queue, held for the next record, until as many changes are held as
    /// one record takes.
    async fn hold_while_appending(
        &mut self,
        mut append: tokio::task::JoinHandle<(Result<(), StorageError>, Duration)>,
        rx: &mut mpsc::Receiver<Command>,
        reads: &mut mpsc::Receiver<DurableReadFn>,
        replies: &mut Vec<Reply>,
    ) -> (Result<(), StorageError>, Duration) {
        let mut queue_open = true;
        loop {
            let taking = queue_open && self.held_changes < self.batch_commands_max;
            tokio::select! {
                biased;
                done = &mut append => {
                    return done.unwrap_or_else(|_| {
                        (
                            Err(StorageError::Backend("the journal append panicked".to_owned())),
                            Duration::ZERO,
                        )
                    });
                }
                Some(read) = reads.recv() => self.read_durable(read, replies),
                command = rx.recv(), if taking => match command {
                    // The whole state is the durable one once this record is.
                    Some(Command::Read(read)) => replies.push(Reply::Read(read)),
                    Some(command) => {
                        self.held_changes += command_changes(&command);
                        self.held.push_back(command);
                    }
                    None => queue_open = false,
                },
            }
        }
    }
}

/// How many changes a command brings to a record (a batch call: those not decided yet).
fn command_changes(command: &Command) -> usize {
    match command {
        Command::Ops(call) => call.ops.len(),
        _ => 1,
    }
}
