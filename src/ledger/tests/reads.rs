//! Reads while a record is being written (issue 15): `transfer`, `history`,
//! `pending_transfers` and `refunds_of` are answered from the durable state as soon as the
//! writer takes them, not after the record in flight (its fsync, or the rest of a batch
//! call), and never show what that record changed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::*;

/// The longest a test waits for an answer it expects; a read that waits for the gate is
/// reported as such instead of hanging the test.
const ANSWER_WAIT_MAX: Duration = Duration::from_secs(15);

/// A storage whose appends wait at a gate the test opens, and may then fail; everything
/// else is `inner`'s ([`GatedStorage`], never closed itself, or [`FlakyRows`] for rows on
/// disk that may fail to read).
struct Gate<S: Storage = GatedStorage> {
    inner: S,
    closed: parking_lot::Mutex<bool>,
    opened: parking_lot::Condvar,
    waiting: AtomicBool,
    fail: AtomicBool,
}

impl Default for Gate {
    fn default() -> Self {
        Self::over(GatedStorage::default())
    }
}

impl<S: Storage> Gate<S> {
    fn over(inner: S) -> Self {
        Self {
            inner,
            closed: parking_lot::Mutex::new(false),
            opened: parking_lot::Condvar::new(),
            waiting: AtomicBool::new(false),
            fail: AtomicBool::new(false),
        }
    }

    fn set_closed(&self, closed: bool) {
        *self.closed.lock() = closed;
        self.opened.notify_all();
    }

    /// Holds the next append until the returned guard is opened or dropped (a failing test
    /// then does not leave the writer waiting).
    fn close(&self) -> Closed<'_, S> {
        self.set_closed(true);
        Closed(self)
    }

    /// Waits (bounded) until an append is held at the gate.
    fn wait_held(&self) {
        for _ in 0..1_500 {
            if self.waiting.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no append reached the gate");
    }
}

impl<S: Storage> Storage for Gate<S> {
    fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError> {
        // Written first, as sled shows a record to readers before its fdatasync.
        self.inner.append(seq, record, head)?;
        let mut closed = self.closed.lock();
        self.waiting.store(*closed, Ordering::SeqCst);
        // Bounded: a test that forgets to open the gate fails instead of hanging.
        for _ in 0..600 {
            if !*closed {
                break;
            }
            self.opened
                .wait_for(&mut closed, Duration::from_millis(100));
        }
        self.waiting.store(false, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::Backend("injected append failure".to_owned()));
        }
        Ok(())
    }
    fn head(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.head()
    }
    fn records(&self, from_seq: u64) -> Box<dyn Iterator<Item = storage::StoredRecord> + Send> {
        self.inner.records(from_seq)
    }
    fn anchor(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.anchor()
    }
    fn keeps_checkpoints(&self) -> bool {
        self.inner.keeps_checkpoints()
    }
    fn put_checkpoint(&self, bytes: &[u8]) -> Result<(), StorageError> {
        self.inner.put_checkpoint(bytes)
    }
    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.checkpoint()
    }
    fn keeps_transfer_rows(&self) -> bool {
        self.inner.keeps_transfer_rows()
    }
    fn put_transfer_rows(&self, rows: &TransferRows) -> Result<(), StorageError> {
        self.inner.put_transfer_rows(rows)
    }
    fn transfer_row(&self, idx: u32) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.transfer_row(idx)
    }
    fn transfer_row_idx(&self, id: u128) -> Result<Option<u32>, StorageError> {
        self.inner.transfer_row_idx(id)
    }
    fn account_history(
        &self,
        account: u32,
        before: u32,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.inner.account_history(account, before, limit)
    }
    fn account_history_range(
        &self,
        account: u32,
        span: std::ops::Range<u32>,
        order: crate::ledger::HistoryOrder,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.inner
            .account_history_range(account, span, order, limit)
    }
    fn transfer_rows_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.inner.transfer_rows_by_reference(reference, limit)
    }

    fn scan_transfer_rows(&self, visit: &mut dyn FnMut(RowEntry<'_>)) -> Result<(), StorageError> {
        self.inner.scan_transfer_rows(visit)
    }
}

struct Closed<'a, S: Storage>(&'a Gate<S>);

impl<S: Storage> Closed<'_, S> {
    fn open(self) {}
}

impl<S: Storage> Drop for Closed<'_, S> {
    fn drop(&mut self) {
        self.0.set_closed(false);
    }
}

fn open_gated<S: Storage>(
    gate: &Arc<Gate<S>>,
    batch_commands_max: usize,
) -> (BlockingLedger, ManualClock) {
    let clock = ManualClock::new(T0_MS);
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        batch_commands_max,
        ..LedgerOptions::default()
    };
    let ledger = Ledger::open_storage(
        gate.clone(),
        Currencies::from_settings(&settings()).unwrap(),
        Arc::new(clock.clone()),
        options,
    )
    .unwrap();
    (ledger.blocking(), clock)
}

fn eur(ledger: &BlockingLedger, value: &str) -> Amount {
    ledger
        .ledger()
        .parse_amount(Decimal::from_str(value).unwrap(), "EUR")
        .unwrap()
}

fn pay(ledger: &BlockingLedger, id: u128, from: Owner, to: &str, value: &str) -> TransferRequest {
    TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit: from,
        credit: user(to),
        amount: eur(ledger, value),
        memo: Vec::new(),
    }
}

/// Runs `read` on a thread of its own and returns its answer, failing the test if it does not
/// come (it waited for the record being written).
fn answers<T: Send + 'static>(what: &str, read: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read());
    });
    rx.recv_timeout(ANSWER_WAIT_MAX).unwrap_or_else(|_| {
        panic!("{what} was not answered while a record was being written: it waited for it")
    })
}

/// What became of a command sent with [`send_op`], [`send_ops`] or [`send_read`].
#[derive(Debug)]
enum Outcome<T> {
    Answered(T),
    /// Dropped unanswered: the writer stopped before it (its caller gets `Closed`).
    Dropped,
    /// Still unanswered after [`ANSWER_WAIT_MAX`].
    Waiting,
}

/// Waits (bounded) for the answer of a queued command.
fn outcome<T>(rx: &mut oneshot::Receiver<T>) -> Outcome<T> {
    let step = Duration::from_millis(5);
    for _ in 0..ANSWER_WAIT_MAX.as_millis() / step.as_millis() {
        match rx.try_recv() {
            Ok(answer) => return Outcome::Answered(answer),
            Err(oneshot::error::TryRecvError::Empty) => std::thread::sleep(step),
            Err(oneshot::error::TryRecvError::Closed) => return Outcome::Dropped,
        }
    }
    Outcome::Waiting
}

/// The answer of a queued command; fails the test if there is none.
fn reply<T: std::fmt::Debug>(mut rx: oneshot::Receiver<T>, what: &str) -> T {
    match outcome(&mut rx) {
        Outcome::Answered(answer) => answer,
        other => panic!("{what}: {other:?}"),
    }
}

/// Queues one change now, in this order with the other commands the test queues.
fn send_op(ledger: &BlockingLedger, op: Op) -> oneshot::Receiver<Result<OpResult, LedgerError>> {
    let (reply, rx) = oneshot::channel();
    block_on(ledger.ledger().send(Command::Op { op, reply })).unwrap();
    rx
}

/// Queues a batch call now.
fn send_ops(
    ledger: &BlockingLedger,
    ops: Vec<Op>,
) -> oneshot::Receiver<Result<Vec<Result<OpResult, StorageError>>, LedgerError>> {
    let (reply, rx) = oneshot::channel();
    let call = writer::OpsInFlight::new(ops, reply);
    block_on(ledger.ledger().send(Command::Ops(call))).unwrap();
    rx
}

type ReadReply = oneshot::Receiver<Result<Option<Transfer>, StorageError>>;

/// Queues a durable read of transfer `id` now (what `Ledger::transfer` sends).
fn send_read(ledger: &BlockingLedger, id: u128) -> ReadReply {
    let (reply, rx) = oneshot::channel();
    let read: writer::DurableReadFn = Box::new(move |state, _| {
        let _ = reply.send(state.transfer(TransferId(id)));
    });
    let reads = ledger.ledger().inner.reads_tx.as_ref().unwrap();
    block_on(reads.send(read)).unwrap_or_else(|_| panic!("the writer stopped"));
    rx
}

/// How many changes wait in the writer's queue, not taken yet.
fn queued(ledger: &BlockingLedger) -> usize {
    let tx = ledger.ledger().inner.tx.as_ref().unwrap();
    tx.max_capacity() - tx.capacity()
}

/// Waits (bounded) until `queued` is `count`; whether it got there.
fn queued_becomes(ledger: &BlockingLedger, count: usize) -> bool {
    for _ in 0..1_500 {
        if queued(ledger) == count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn create(request: TransferRequest, timeout_ms: Option<u64>) -> Op {
    Op::Create {
        request,
        timeout_ms,
        refund_of: None,
    }
}

/// Everything a reader can see of the transfers, through the public calls.
#[derive(Debug, PartialEq)]
struct Seen {
    transfers: Vec<Option<Transfer>>,
    history: Vec<HistoryPage>,
    queries: Vec<HistoryPage>,
    pending: Vec<Transfer>,
    refunds: Vec<Transfer>,
}

fn seen(ledger: &BlockingLedger, ids: &[u128], owners: &[&str], refunded: u128) -> Seen {
    Seen {
        transfers: ids
            .iter()
            .map(|&id| ledger.transfer(TransferId(id)).unwrap())
            .collect(),
        // Two pages each: the cursor must not reach into the record in flight either.
        history: owners
            .iter()
            .flat_map(|owner| {
                let first = ledger.history(&user(owner), None, 2).unwrap();
                let second = ledger.history(&user(owner), first.next, 100).unwrap();
                [first, second]
            })
            .collect(),
        // Oldest first (the record in flight would come last), and by time range (its
        // transfers are within it): the span must end below the record in flight too.
        queries: owners
            .iter()
            .flat_map(|owner| {
                let owner = user(owner);
                let first = ledger
                    .history_query(&owner, HistoryQuery::oldest_first(2))
                    .unwrap();
                let second = ledger
                    .history_query(&owner, HistoryQuery::oldest_first(100).after(first.next))
                    .unwrap();
                let timed = HistoryQuery::newest_first(100).created_within(T0_MS, u64::MAX - 1);
                [first, second, ledger.history_query(&owner, timed).unwrap()]
            })
            .collect(),
        pending: ledger.pending_transfers().unwrap(),
        refunds: ledger.refunds_of(TransferId(refunded)).unwrap(),
    }
}

/// (1) While a record's append is held, reads of transfers that were already durable answer.
#[test]
fn reads_of_durable_transfers_answer_while_a_record_is_written() {
    let gate = Arc::new(Gate::default());
    let (ledger, _clock) = open_gated(&gate, 8_190);
    ledger
        .create_transfer(pay(&ledger, 1, Owner::Issuer, "alice", "100.00"))
        .unwrap();
    ledger
        .create_pending(pay(&ledger, 2, user("alice"), "bob", "5.00"), 60_000)
        .unwrap();
    ledger
        .create_transfer(pay(&ledger, 3, user("alice"), "carol", "1.00"))
        .unwrap();
    let ids = [1, 2, 3];
    let before = seen(&ledger, &ids, &["alice", "bob"], 3);

    let closed = gate.close();
    let writing = {
        let ledger = ledger.clone();
        let request = pay(&ledger, 4, user("alice"), "bob", "2.00");
        std::thread::spawn(move || ledger.create_transfer(request))
    };
    gate.wait_held();
    let during = {
        let ledger = ledger.clone();
        answers("transfer, history and pending_transfers", move || {
            seen(&ledger, &ids, &["alice", "bob"], 3)
        })
    };
    assert_eq!(during, before);

    closed.open();
    let created = writing.join().unwrap().unwrap();
    assert_eq!(ledger.transfer(TransferId(4)).unwrap(), Some(created));
}

/// (2) While a record's append is held, what it created is absent and what it ended or
/// refunded reads as before it; once it is durable, everything reads as its replies said.
/// Then the same for an expiry made by the writer's own clock tick.
#[test]
fn reads_never_show_the_record_being_written() {
    let gate = Arc::new(Gate::default());
    let (ledger, clock) = open_gated(&gate, 8_190);
    ledger
        .create_transfer(pay(&ledger, 1, Owner::Issuer, "alice", "100.00"))
        .unwrap();
    // P: pending, posted by the record in flight.
    ledger
        .create_pending(pay(&ledger, 2, user("alice"), "bob", "5.00"), 60_000)
        .unwrap();
    // S: paid; refunded by the record in flight, and its pending refund PR voided by it.
    ledger
        .create_transfer(pay(&ledger, 3, user("alice"), "bob", "10.00"))
        .unwrap();
    ledger
        .create_refund_result(
            pay(&ledger, 4, user("bob"), "alice", "3.00"),
            TransferId(3),
            Some(60_000),
        )
        .unwrap();
    // Q: pending with a short deadline, expired later by the writer's tick.
    ledger
        .create_pending(pay(&ledger, 5, user("alice"), "carol", "1.00"), 1_000)
        .unwrap();
    // X (new account dave) and RF (a refund of S) are created by the record in flight.
    let ids = [1, 2, 3, 4, 5, 10, 11];
    let owners = ["alice", "bob", "dave"];
    let before = seen(&ledger, &ids, &owners, 3);
    assert_eq!(before.transfers[5], None);
    assert_eq!(before.refunds.len(), 1);

    let closed = gate.close();
    let call = send_ops(
        &ledger,
        vec![
            create(pay(&ledger, 10, user("alice"), "dave", "2.00"), None),
            Op::Post {
                pending: TransferId(2),
                amount: None,
            },
            Op::Refund {
                id: TransferId(11),
                original: TransferId(3),
                amount: eur(&ledger, "1.00"),
                memo: Vec::new(),
            },
            Op::Void {
                pending: TransferId(4),
            },
        ],
    );
    gate.wait_held();
    let during = {
        let ledger = ledger.clone();
        answers("reads during the record", move || {
            seen(&ledger, &ids, &owners, 3)
        })
    };
    assert_eq!(during, before, "a read showed a change not yet durable");
    let tail = {
        let ledger = ledger.ledger().clone();
        answers("tail_from", move || {
            let head = block_on(ledger.durable_seq()).unwrap();
            block_on(ledger.tail_from(head + 1)).map(|_| ())
        })
    };
    assert!(tail.is_ok(), "{tail:?}");

    closed.open();
    let results = reply(call, "the batch call");
    let answered: Vec<Transfer> = results
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().unwrap().unwrap().transfer)
        .collect();
    let now = |id: u128| ledger.transfer(TransferId(id)).unwrap().unwrap();
    assert_eq!(now(10), answered[0]);
    assert_eq!(now(2), answered[1]);
    assert!(matches!(now(2).state, TransferState::Posted { .. }));
    assert_eq!(now(11), answered[2]);
    assert_eq!(now(4), answered[3]);
    assert_eq!(now(4).state, TransferState::Voided);
    let s = now(3);
    assert_eq!((s.refunded_minor, s.refund_pending_minor), (100, 0));
    assert_eq!(ledger.refunds_of(TransferId(3)).unwrap().len(), 2);
    let pending: Vec<TransferId> = ledger
        .pending_transfers()
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(pending, [TransferId(5)]);
    let dave = ledger.history(&user("dave"), None, 10).unwrap();
    assert_eq!(dave.transfers, [answered[0].clone()]);

    // The writer's own tick expires Q in a record of its own.
    let closed = gate.close();
    clock.advance_ms(2_000);
    gate.wait_held();
    let (q, pending) = {
        let ledger = ledger.clone();
        answers("reads during the expiry", move || {
            (
                ledger.transfer(TransferId(5)).unwrap().unwrap(),
                ledger.pending_transfers().unwrap(),
            )
        })
    };
    assert_eq!(q.state, TransferState::Pending);
    assert_eq!(pending, [q]);
    closed.open();
    // Answered after the expiry's record is durable (this call's own record comes after it).
    assert_eq!(ledger.expire_due().unwrap(), []);
    assert_eq!(now(5).state, TransferState::Expired);
    assert_eq!(ledger.pending_transfers().unwrap(), []);
    ledger.verify_with_memory().unwrap();
}

/// (3) A read queued behind a batch call that spans several records is answered while the
/// first of them is written, not once the whole call is.
#[test]
fn a_read_behind_a_batch_call_of_several_records_answers_before_the_call_ends() {
    let gate = Arc::new(Gate::default());
    let (ledger, _clock) = open_gated(&gate, 8_190);
    ledger
        .create_transfer(pay(&ledger, 1, Owner::Issuer, "alice", "100.00"))
        .unwrap();
    let durable = ledger.transfer(TransferId(1)).unwrap();

    let closed = gate.close();
    // One command of BATCH_OPS_MAX transfers: more than one record holds (128 KiB).
    let ops: Vec<Op> = (0..BATCH_OPS_MAX as u128)
        .map(|i| create(pay(&ledger, 100 + i, Owner::Issuer, "bob", "0.01"), None))
        .collect();
    let call = send_ops(&ledger, ops);
    // The call's first record is being written, the rest of the call not decided yet.
    gate.wait_held();
    let durable_read = send_read(&ledger, 1);
    let first_of_call = send_read(&ledger, 100);
    let last_of_call = send_read(&ledger, 100 + BATCH_OPS_MAX as u128 - 1);
    let answered = |rx: ReadReply, what: &str| reply(rx, what).unwrap();
    assert_eq!(answered(durable_read, "a durable transfer"), durable);
    assert_eq!(answered(first_of_call, "the call's first transfer"), None);
    assert_eq!(answered(last_of_call, "the call's last transfer"), None);

    closed.open();
    let results = reply(call, "the batch call");
    assert_eq!(results.unwrap().len(), BATCH_OPS_MAX);
    let last = ledger
        .transfer(TransferId(100 + BATCH_OPS_MAX as u128 - 1))
        .unwrap();
    assert!(last.is_some());
}

/// (4) A failed append answers the writes held while it ran with the storage error (they
/// were taken from the queue; their callers would otherwise only learn `Closed`), and holding
/// stops at what one record takes.
#[test]
fn a_failed_append_answers_held_writes_with_the_storage_error() {
    let gate = Arc::new(Gate::default());
    // Two changes per record: the writer holds at most two while an append runs.
    let (ledger, _clock) = open_gated(&gate, 2);
    ledger
        .create_transfer(pay(&ledger, 1, Owner::Issuer, "alice", "100.00"))
        .unwrap();

    let closed = gate.close();
    let first = send_op(
        &ledger,
        create(pay(&ledger, 2, Owner::Issuer, "bob", "1.00"), None),
    );
    gate.wait_held();
    let [held, also_held, beyond] = [3, 4, 5].map(|id| {
        send_op(
            &ledger,
            create(pay(&ledger, id, Owner::Issuer, "bob", "1.00"), None),
        )
    });
    // Two are taken and held, the third stays queued. (Not asserted when it never happens:
    // the old writer held nothing, and this test is about what follows.)
    if queued_becomes(&ledger, 1) {
        // A wait, not a timing: a writer that held more would take it at once.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            queued(&ledger),
            1,
            "the writer took more than one record's changes while an append ran"
        );
    }

    gate.fail.store(true, Ordering::SeqCst);
    closed.open();
    let storage_error = |rx, what: &str| match reply(rx, what) {
        Err(LedgerError::Storage(e)) => assert!(e.to_string().contains("injected"), "{e}"),
        other => panic!("{what}: {other:?}"),
    };
    storage_error(first, "the write whose append failed");
    storage_error(held, "a write held while the append ran");
    storage_error(also_held, "another write held while the append ran");
    // Still in the queue when the writer stopped: dropped, so its caller gets `Closed`, as
    // every later call does.
    let mut beyond = beyond;
    assert!(matches!(outcome(&mut beyond), Outcome::Dropped));
    assert!(matches!(
        ledger.transfer(TransferId(1)),
        Err(LedgerError::Closed)
    ));
}

/// (5) Reads have a queue of their own: a read sent after more changes than the writer takes
/// while an append runs is still answered during that append.
#[test]
fn reads_do_not_wait_behind_queued_changes() {
    let gate = Arc::new(Gate::default());
    let (ledger, _clock) = open_gated(&gate, 2);
    ledger
        .create_transfer(pay(&ledger, 1, Owner::Issuer, "alice", "100.00"))
        .unwrap();
    let durable = ledger.transfer(TransferId(1)).unwrap();

    let closed = gate.close();
    let writes: Vec<_> = (2..10)
        .map(|id| {
            send_op(
                &ledger,
                create(pay(&ledger, id, Owner::Issuer, "bob", "1.00"), None),
            )
        })
        .collect();
    gate.wait_held();
    let read = send_read(&ledger, 1);
    assert_eq!(
        reply(read, "a read behind queued changes").unwrap(),
        durable
    );
    assert!(queued(&ledger) > 0, "the changes were all taken");

    closed.open();
    for (i, write) in writes.into_iter().enumerate() {
        let result = reply(write, "a queued change").unwrap();
        assert!(result.is_ok(), "change {i}: {result:?}");
    }
    assert!(ledger.transfer(TransferId(9)).unwrap().is_some());
}

/// If what the record in flight changed of an older transfer cannot be kept (the row of an
/// expiring pending refund's original could not be read, to name it), reads wait for the
/// record instead of showing its change.
#[test]
fn reads_wait_for_the_record_when_its_change_cannot_be_hidden() {
    let gate = Arc::new(Gate::over(FlakyRows::new()));
    let (ledger, clock) = open_gated(&gate, 8_190);
    ledger
        .create_transfer(pay(&ledger, 1, Owner::Issuer, "alice", "100.00"))
        .unwrap();
    ledger
        .create_transfer(pay(&ledger, 2, user("alice"), "bob", "10.00"))
        .unwrap();
    ledger
        .create_refund_result(
            pay(&ledger, 3, user("bob"), "alice", "3.00"),
            TransferId(2),
            Some(1_000),
        )
        .unwrap();
    // Transfer 2 goes to disk; its pending refund stays in memory.
    block_on(ledger.ledger().checkpoint()).unwrap();
    let before = ledger.transfer(TransferId(2)).unwrap().unwrap();
    assert_eq!(before.refund_pending_minor, 300);

    let closed = gate.close();
    gate.inner.set(ROWS_FAIL);
    // The writer's tick expires the refund; naming its original needs the row on disk.
    clock.advance_ms(2_000);
    gate.wait_held();
    gate.inner.set(ROWS_OK);
    let mut read = send_read(&ledger, 2);
    // A wait, not a timing: a read answered now would show the expiry before it is durable.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        matches!(read.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        "a read was answered while a change it would show was in flight"
    );
    closed.open();
    let after = reply(read, "the read after the record").unwrap().unwrap();
    assert_eq!(after.refund_pending_minor, 0);
    assert_eq!(
        ledger.transfer(TransferId(3)).unwrap().unwrap().state,
        TransferState::Expired
    );
    // The next record hides what it changes again: reads answer while it is written.
    let closed = gate.close();
    let write = send_op(
        &ledger,
        create(pay(&ledger, 4, user("alice"), "bob", "1.00"), None),
    );
    gate.wait_held();
    assert_eq!(
        reply(send_read(&ledger, 2), "a read during the next record").unwrap(),
        Some(after)
    );
    closed.open();
    assert!(reply(write, "the write").is_ok());
}
