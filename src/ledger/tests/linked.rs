//! Linked chains of `Ledger::batch_linked` (TigerBeetle's `flags.linked`): all or nothing.

use std::collections::BTreeMap;

use super::*;

fn create(f: &Fixture, id: u128, debit: Owner, credit: Owner, value: &str) -> BatchOp {
    BatchOp::Create(f.request(id, debit, credit, value, "EUR"))
}

fn pending(f: &Fixture, id: u128, debit: Owner, credit: Owner, value: &str) -> BatchOp {
    BatchOp::CreatePending {
        request: f.request(id, debit, credit, value, "EUR"),
        timeout_ms: 60_000,
    }
}

fn post(id: u128) -> BatchOp {
    BatchOp::Post {
        pending: TransferId(id),
        amount: None,
    }
}

fn void(id: u128) -> BatchOp {
    BatchOp::Void {
        pending: TransferId(id),
    }
}

/// What each answer was: the transfer id created or found, or the refusal.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Created(u128),
    Exists(u128),
    Refused(TransferError),
}

fn got(results: Vec<Result<CreateResult, LedgerError>>) -> Vec<Got> {
    results
        .into_iter()
        .map(|r| match r {
            Ok(CreateResult::Created(t)) => Got::Created(t.id.0),
            Ok(CreateResult::Exists(t)) => Got::Exists(t.id.0),
            Err(e) => Got::Refused(e.rejection().unwrap_or_else(|| panic!("{e:?}"))),
        })
        .collect()
}

/// Every journal entry naming transfer `id`, and the record it is in.
fn journal_records_of(ledger: &Ledger) -> BTreeMap<u128, Vec<u64>> {
    let mut records: BTreeMap<u128, Vec<u64>> = BTreeMap::new();
    for entry in ledger.export() {
        let entry = entry.unwrap();
        let id = match &entry.entry {
            JournalEntry::TransferCreated { id, .. }
            | JournalEntry::PendingPosted { id, .. }
            | JournalEntry::PendingVoided { id }
            | JournalEntry::PendingExpired { id }
            | JournalEntry::TransferFailed { id, .. } => id.0,
            _ => continue,
        };
        records.entry(id).or_default().push(entry.record_seq);
    }
    records
}

/// Each change sees the ones before it: a pending transfer created, posted, and the money it
/// brought paid on, in one chain.
#[test]
fn a_linked_chain_applies_whole() {
    let f = open();
    f.fund(1, "alice", "10.00");
    let results = f
        .ledger
        .batch_linked(vec![
            pending(&f, 10, user("alice"), user("bob"), "5.00").linked(),
            post(10).linked(),
            create(&f, 11, user("bob"), user("carol"), "5.00").into(),
        ])
        .unwrap();
    assert_eq!(
        got(results),
        vec![Got::Created(10), Got::Created(10), Got::Created(11)]
    );
    assert_eq!(f.available("alice"), 500);
    assert_eq!(f.available("bob"), 0);
    assert_eq!(f.available("carol"), 500);
    f.ledger.verify_with_memory().unwrap();
}

/// A chain that fails in its middle leaves nothing: not its transfers, not the accounts it
/// opened, not the pending transfer it voided, not a recorded failure; the changes before and
/// after it in the same call apply. Also after a reopen, and `verify` agrees.
#[test]
fn a_failure_in_the_middle_of_a_chain_applies_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        clock: clock.clone(),
        ledger,
    };
    f.fund(1, "alice", "10.00");
    // A pending transfer from before the call, which the chain voids.
    f.ledger
        .create_pending(
            f.request(2, user("alice"), user("dave"), "1.00", "EUR"),
            60_000,
        )
        .unwrap();
    let alice_before = f.balances("alice", "EUR");
    let results = f
        .ledger
        .batch_linked(vec![
            create(&f, 20, user("alice"), user("bob"), "1.00").into(),
            pending(&f, 30, user("alice"), user("bob"), "2.00").linked(),
            void(2).linked(),
            create(&f, 31, user("alice"), user("erin"), "1.00").linked(),
            // Bob has 1.00 (and 2.00 reserved to him): refused.
            create(&f, 32, user("bob"), user("carol"), "100.00").linked(),
            post(30).into(),
            create(&f, 21, user("alice"), user("bob"), "1.00").into(),
        ])
        .unwrap();
    use TransferError as E;
    assert_eq!(
        got(results),
        vec![
            Got::Created(20),
            Got::Refused(E::LinkedEventFailed),
            Got::Refused(E::LinkedEventFailed),
            Got::Refused(E::LinkedEventFailed),
            Got::Refused(E::InsufficientFunds),
            Got::Refused(E::LinkedEventFailed),
            Got::Created(21),
        ]
    );
    let check = |f: &Fixture| {
        let alice = f.balances("alice", "EUR");
        assert_eq!(
            alice.debits_posted_minor,
            alice_before.debits_posted_minor + 200
        );
        assert_eq!(alice.debits_pending_minor, 100, "transfer 2 still reserves");
        assert_eq!(f.available("bob"), 200);
        assert_eq!(f.available("carol"), 0);
        let erin = AccountId {
            owner: user("erin"),
            currency: CurrencyCode::new("EUR").unwrap(),
        };
        assert_eq!(f.ledger.account(&erin).unwrap(), None, "no account opened");
        for id in [30, 31, 32] {
            assert_eq!(f.ledger.transfer(TransferId(id)).unwrap(), None, "{id}");
        }
        let pending: Vec<u128> = f
            .ledger
            .pending_transfers()
            .unwrap()
            .iter()
            .map(|t| t.id.0)
            .collect();
        assert_eq!(pending, vec![2]);
        assert_eq!(
            f.ledger.transfer(TransferId(2)).unwrap().unwrap().state,
            TransferState::Pending
        );
        let history = f.ledger.history(&user("alice"), None, 100).unwrap();
        let ids: Vec<u128> = history.transfers.iter().map(|t| t.id.0).collect();
        assert_eq!(ids, vec![21, 20, 2, 1]);
        let journal = journal_records_of(f.ledger.ledger());
        for id in [30, 31, 32] {
            assert!(!journal.contains_key(&id), "{id} in the journal");
        }
        assert_eq!(journal[&2].len(), 1, "only the creation of transfer 2");
        f.ledger.verify_with_memory().unwrap();
    };
    check(&f);
    let Fixture { ledger, .. } = f;
    drop(ledger);
    let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        clock,
        ledger,
    };
    check(&f);
    f.ledger.verify().unwrap();
    // Nothing was recorded of the failed chain: with the money there, the same chain applies.
    f.fund(3, "bob", "100.00");
    let results = f
        .ledger
        .batch_linked(vec![
            pending(&f, 30, user("alice"), user("bob"), "2.00").linked(),
            void(2).linked(),
            create(&f, 31, user("alice"), user("erin"), "1.00").linked(),
            create(&f, 32, user("bob"), user("carol"), "100.00").linked(),
            post(30).into(),
        ])
        .unwrap();
    assert_eq!(
        got(results),
        vec![
            Got::Created(30),
            Got::Created(2),
            Got::Created(31),
            Got::Created(32),
            Got::Created(30),
        ]
    );
    f.ledger.verify_with_memory().unwrap();
}

/// A chain that posts a pending refund and then fails gives the refund back its reservation
/// of the original's cap: the original's refund figures are as before the chain.
#[test]
fn a_failed_chain_puts_back_the_refund_figures_it_changed() {
    let f = open();
    f.fund(1, "alice", "10.00");
    f.send(2, user("alice"), user("bob"), "5.00").unwrap();
    f.ledger
        .create_refund_result(
            f.request(3, user("bob"), user("alice"), "2.00", "EUR"),
            TransferId(2),
            Some(60_000),
        )
        .unwrap();
    let before = f.ledger.transfer(TransferId(2)).unwrap().unwrap();
    assert_eq!(before.refund_pending_minor, 200);
    let results = f
        .ledger
        .batch_linked(vec![
            post(3).linked(),
            create(&f, 10, user("carol"), user("alice"), "1.00").into(),
        ])
        .unwrap();
    assert_eq!(
        got(results),
        vec![
            Got::Refused(TransferError::LinkedEventFailed),
            Got::Refused(TransferError::InsufficientFunds)
        ]
    );
    assert_eq!(f.ledger.transfer(TransferId(2)).unwrap().unwrap(), before);
    assert_eq!(
        f.ledger.transfer(TransferId(3)).unwrap().unwrap().state,
        TransferState::Pending
    );
    // The reservation still counts: 3.00 is left to refund, not 5.00.
    let refund = |id| {
        f.ledger.create_refund_result(
            f.request(id, user("bob"), user("alice"), "3.01", "EUR"),
            TransferId(2),
            None,
        )
    };
    assert_eq!(
        refund(11).unwrap_err().rejection(),
        Some(TransferError::RefundExceedsRemaining)
    );
    f.ledger.verify_with_memory().unwrap();
}

/// A change of a chain whose row on disk cannot be read answers the storage error, the rest
/// of its chain `LinkedEventFailed`; nothing of the chain applies, and once the rows read
/// again the same chain applies as a retry would.
#[test]
fn a_row_that_cannot_be_read_fails_its_chain_whole() {
    let storage = Arc::new(FlakyRows::new());
    let clock = ManualClock::new(T0_MS);
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        ..LedgerOptions::default()
    };
    let currencies = Currencies::from_settings(&settings()).unwrap();
    let ledger = Ledger::open_storage(
        storage.clone(),
        currencies,
        Arc::new(clock.clone()),
        options,
    )
    .unwrap()
    .blocking();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        clock,
        ledger,
    };
    f.fund(1, "alice", "100.00");
    f.send(12, user("alice"), user("bob"), "1.00").unwrap();
    // Transfer 12 goes to disk.
    block_on(f.ledger.ledger().checkpoint()).unwrap();
    let chain = || {
        vec![
            create(&f, 40, user("alice"), user("carol"), "2.00").linked(),
            create(&f, 12, user("alice"), user("bob"), "1.00").into(),
        ]
    };
    storage.set(ROWS_FAIL);
    let results = f.ledger.batch_linked(chain()).unwrap();
    assert_eq!(
        results[0].as_ref().unwrap_err().rejection(),
        Some(TransferError::LinkedEventFailed)
    );
    assert!(
        matches!(&results[1], Err(LedgerError::Storage(_))),
        "{:?}",
        results[1]
    );
    storage.set(ROWS_OK);
    assert_eq!(f.ledger.transfer(TransferId(40)).unwrap(), None);
    assert_eq!(f.available("carol"), 0);
    f.ledger.verify_with_memory().unwrap();
    // Transfer 12 exists and 40 is new: a mix, refused.
    assert_eq!(
        got(f.ledger.batch_linked(chain()).unwrap()),
        vec![
            Got::Refused(TransferError::LinkedEventFailed),
            Got::Refused(TransferError::LinkedChainPartlyExists)
        ]
    );
}

/// The call's last change marked linked leaves its chain open: none of it is decided.
#[test]
fn a_chain_left_open_at_the_end_of_the_call_fails() {
    let f = open();
    f.fund(1, "alice", "10.00");
    let results = f
        .ledger
        .batch_linked(vec![
            create(&f, 10, user("alice"), user("bob"), "1.00").into(),
            create(&f, 11, user("alice"), user("bob"), "1.00").linked(),
            create(&f, 12, user("alice"), user("bob"), "1.00").linked(),
        ])
        .unwrap();
    assert_eq!(
        got(results),
        vec![
            Got::Created(10),
            Got::Refused(TransferError::LinkedEventFailed),
            Got::Refused(TransferError::LinkedEventChainOpen),
        ]
    );
    assert_eq!(f.ledger.transfer(TransferId(11)).unwrap(), None);
    assert_eq!(f.available("bob"), 100);
}

/// A retry of a chain that applied answers `Exists` for each change and moves nothing; a
/// chain that mixes a change already made with new ones, or names one change twice, is
/// refused whole.
#[test]
fn a_retried_chain_exists_and_a_partly_existing_one_is_refused() {
    let f = open();
    f.fund(1, "alice", "10.00");
    let chain = || {
        vec![
            create(&f, 10, user("alice"), user("bob"), "1.00").linked(),
            pending(&f, 11, user("alice"), user("bob"), "2.00").linked(),
            post(11).into(),
        ]
    };
    let first = got(f.ledger.batch_linked(chain()).unwrap());
    assert_eq!(
        first,
        vec![Got::Created(10), Got::Created(11), Got::Created(11)]
    );
    let again = got(f.ledger.batch_linked(chain()).unwrap());
    assert_eq!(
        again,
        vec![Got::Exists(10), Got::Exists(11), Got::Exists(11)]
    );
    assert_eq!(f.available("alice"), 700);
    use TransferError as E;
    let mixed = got(f
        .ledger
        .batch_linked(vec![
            create(&f, 10, user("alice"), user("bob"), "1.00").linked(),
            create(&f, 12, user("alice"), user("bob"), "1.00").into(),
        ])
        .unwrap());
    assert_eq!(
        mixed,
        vec![
            Got::Refused(E::LinkedEventFailed),
            Got::Refused(E::LinkedChainPartlyExists)
        ]
    );
    let twice = got(f
        .ledger
        .batch_linked(vec![
            create(&f, 13, user("alice"), user("bob"), "1.00").linked(),
            create(&f, 13, user("alice"), user("bob"), "1.00").into(),
        ])
        .unwrap());
    assert_eq!(
        twice,
        vec![
            Got::Refused(E::LinkedEventFailed),
            Got::Refused(E::LinkedChainPartlyExists)
        ]
    );
    for id in [12, 13] {
        assert_eq!(f.ledger.transfer(TransferId(id)).unwrap(), None);
    }
    assert_eq!(f.available("alice"), 700);
    f.ledger.verify_with_memory().unwrap();
}

/// With records of at most 4 changes, chains of 3 after a single change are each written in
/// one record (the old writer cut the call every 4 changes, splitting them); a chain longer
/// than a record takes is refused whole, and the changes around it apply.
#[test]
fn a_chain_is_never_split_across_journal_records() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        batch_commands_max: 4,
        ..LedgerOptions::default()
    };
    let ledger =
        Ledger::open_with_options(dir.path(), &settings(), Arc::new(clock.clone()), options)
            .unwrap()
            .blocking();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        clock,
        ledger,
    };
    f.fund(1, "alice", "100.00");
    let mut entries = vec![create(&f, 10, user("alice"), user("bob"), "1.00").into()];
    for chain in 0..3u128 {
        let base = 100 + chain * 10;
        entries.push(create(&f, base, user("alice"), user("bob"), "1.00").linked());
        entries.push(create(&f, base + 1, user("bob"), user("carol"), "0.50").linked());
        entries.push(create(&f, base + 2, user("carol"), user("dave"), "0.25").into());
    }
    // Five changes: more than a record of four takes.
    for i in 0..5u128 {
        let op = create(&f, 200 + i, user("alice"), user("erin"), "1.00");
        entries.push(if i < 4 { op.linked() } else { op.into() });
    }
    entries.push(create(&f, 11, user("alice"), user("bob"), "1.00").into());
    let results = got(f.ledger.batch_linked(entries).unwrap());
    assert!(results[..10].iter().all(|g| matches!(g, Got::Created(_))));
    assert!(results[10..15]
        .iter()
        .all(|g| *g == Got::Refused(TransferError::LinkedChainTooLong)));
    assert_eq!(results[15], Got::Created(11));
    let journal = journal_records_of(f.ledger.ledger());
    let mut records = std::collections::BTreeSet::new();
    for chain in 0..3u128 {
        let base = 100 + chain * 10;
        let seqs: Vec<u64> = (base..base + 3)
            .flat_map(|id| journal[&id].clone())
            .collect();
        assert!(
            seqs.iter().all(|&s| s == seqs[0]),
            "chain {chain}: {seqs:?}"
        );
        records.insert(seqs[0]);
    }
    assert_eq!(
        records.len(),
        3,
        "one record each: four changes do not take two"
    );
    assert!((200..205).all(|id| !journal.contains_key(&id)));
    f.ledger.verify_with_memory().unwrap();
}

/// Random calls with random chains, decided by the state machine itself: money is conserved,
/// and a call leaves the state, the events it journals, and every later decision exactly as
/// the same call without its failed chains would.
mod prop {
    use proptest::prelude::*;

    use super::*;
    use crate::ledger::state::{Event, Op, OpResult, State};

    const WHO: usize = 4;

    fn owner(i: usize) -> Owner {
        match i {
            0 => Owner::Issuer,
            n => Owner::user(format!("u{n}")),
        }
    }

    #[derive(Debug, Clone)]
    enum Change {
        Create {
            id: u128,
            debit: usize,
            credit: usize,
            minor: u128,
            timeout_ms: Option<u64>,
        },
        Post {
            id: u128,
            minor: Option<u128>,
        },
        Void {
            id: u128,
        },
    }

    fn change() -> impl Strategy<Value = Change> {
        let id = 1u128..16;
        prop_oneof![
            5 => (id.clone(), 0..WHO, 0..WHO, 1u128..400, proptest::option::weighted(0.4, 1u64..3_000))
                .prop_map(|(id, debit, credit, minor, timeout_ms)| Change::Create { id, debit, credit, minor, timeout_ms }),
            2 => (id.clone(), proptest::option::of(1u128..300)).prop_map(|(id, minor)| Change::Post { id, minor }),
            1 => id.prop_map(|id| Change::Void { id }),
        ]
    }

    /// A unit of a call: one change, or a chain of 2 to 4.
    fn unit() -> impl Strategy<Value = Vec<Change>> {
        prop_oneof![
            2 => change().prop_map(|c| vec![c]),
            1 => proptest::collection::vec(change(), 2..5),
        ]
    }

    fn op(currencies: &Currencies, change: &Change) -> Op {
        let eur = |minor| currencies.from_minor(minor, "EUR").unwrap();
        match *change {
            Change::Create {
                id,
                debit,
                credit,
                minor,
                timeout_ms,
            } => Op::Create {
                request: TransferRequest {
                    reference: 0,
                    id: TransferId(id),
                    debit: owner(debit),
                    credit: owner(credit),
                    amount: eur(minor),
                    memo: Vec::new(),
                },
                timeout_ms,
                refund_of: None,
            },
            Change::Post { id, minor } => Op::Post {
                pending: TransferId(id),
                amount: minor.map(eur),
            },
            Change::Void { id } => Op::Void {
                pending: TransferId(id),
            },
        }
    }

    type Answers = Vec<Result<OpResult, String>>;

    /// Decides `units` (chains as chains) into `state`; returns the answers of each unit.
    fn decide(
        state: &mut State,
        currencies: &Currencies,
        units: &[Vec<Change>],
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Vec<Answers> {
        units
            .iter()
            .map(|unit| {
                let ops = unit.iter().map(|c| op(currencies, c));
                let results = if unit.len() == 1 {
                    vec![state.decide(ops.into_iter().next().unwrap(), now_ms, events)]
                } else {
                    state.decide_chain(ops, now_ms, events)
                };
                results
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .collect()
            })
            .collect()
    }

    fn run(
        before: Vec<Vec<Change>>,
        call: Vec<Vec<Change>>,
        after: Vec<Vec<Change>>,
        wait_ms: u64,
    ) -> Result<(), TestCaseError> {
        // A daily limit that funded users reach, so that chains meet it too.
        let spec = CurrencySpec {
            code: "EUR".to_owned(),
            exponent: 2,
            max_transfer: None,
            max_per_24h: Some(Decimal::from_str("6.00").unwrap()),
        };
        let settings = LedgerSettings {
            currencies: vec![spec],
        };
        let currencies = Currencies::from_settings(&settings).unwrap();
        let mut base = State::new(currencies.clone());
        let mut events = Vec::new();
        // Money to spend.
        for (i, who) in (1..WHO).enumerate() {
            let fund = Change::Create {
                id: 1_000 + i as u128,
                debit: 0,
                credit: who,
                minor: 500,
                timeout_ms: None,
            };
            decide(&mut base, &currencies, &[vec![fund]], T0_MS, &mut events);
        }
        decide(&mut base, &currencies, &before, T0_MS, &mut events);
        let now_ms = T0_MS + wait_ms;

        let mut with = base.clone();
        let mut with_events = Vec::new();
        with.begin_record();
        let answers = decide(&mut with, &currencies, &call, now_ms, &mut with_events);
        with.assert_totals_balance();
        prop_assert_eq!(with.check_invariants(), Ok(()));
        let failed = |a: &Answers| a.len() > 1 && a.iter().all(|r| !matches!(r, Ok(Ok(_))));
        for a in &answers {
            // A chain is all or nothing.
            if a.len() > 1 {
                let applied = a.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
                prop_assert!(applied == 0 || applied == a.len(), "{:?}", a);
            }
        }
        let kept: Vec<Vec<Change>> = call
            .iter()
            .zip(&answers)
            .filter(|(_, a)| !failed(a))
            .map(|(u, _)| u.clone())
            .collect();
        let mut without = base.clone();
        let mut without_events = Vec::new();
        without.begin_record();
        let kept_answers = decide(
            &mut without,
            &currencies,
            &kept,
            now_ms,
            &mut without_events,
        );
        let expected: Vec<&Answers> = answers.iter().filter(|a| !failed(a)).collect();
        prop_assert_eq!(kept_answers.iter().collect::<Vec<_>>(), expected);
        prop_assert_eq!(&with_events, &without_events);
        prop_assert_eq!(with.diff(&without), None);
        // What reads of the durable state see while the record is in flight.
        prop_assert_eq!(
            with.durable().pending_transfers().unwrap(),
            without.durable().pending_transfers().unwrap()
        );
        with.end_record();
        without.end_record();
        // What is not compared directly (daily windows, deadlines, recorded failures) shows
        // in later decisions: they must be the same.
        let later_ms = now_ms + 2_000;
        let (mut e1, mut e2) = (Vec::new(), Vec::new());
        let a1 = decide(&mut with, &currencies, &after, later_ms, &mut e1);
        let a2 = decide(&mut without, &currencies, &after, later_ms, &mut e2);
        prop_assert_eq!(a1, a2);
        prop_assert_eq!(e1, e2);
        prop_assert_eq!(with.diff(&without), None);
        prop_assert_eq!(with.check_invariants(), Ok(()));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn a_failed_chain_leaves_the_state_as_the_call_without_it(
            before in proptest::collection::vec(unit(), 0..12),
            call in proptest::collection::vec(unit(), 1..10),
            after in proptest::collection::vec(unit(), 0..8),
            // A day later, the failures recorded before are forgotten by the call's first event.
            wait_ms in prop_oneof![Just(0u64), 0u64..4_000, DAY_MS..DAY_MS + 4_000],
        ) {
            run(before, call, after, wait_ms)?;
        }
    }
}

/// The same through the writer and the journal: random calls of `batch_linked` with chains,
/// over records of a few changes (so that chains meet record boundaries): every chain applies
/// whole or not at all, and `verify` (the replay of the journal equals the state in memory,
/// money is conserved) passes after each call and after a reopen.
mod through_the_writer {
    use proptest::prelude::*;

    use super::*;

    /// A create: id, debit and credit (0: the issuer, n: user `un`), amount, pending.
    type Leg = (u128, usize, usize, u128, bool);

    fn entries(f: &Fixture, units: &[Vec<Leg>]) -> Vec<BatchEntry> {
        let mut entries = Vec::new();
        for unit in units {
            for (i, &(id, debit, credit, minor, pending)) in unit.iter().enumerate() {
                let who = |n: usize| match n {
                    0 => Owner::Issuer,
                    n => user(&format!("u{n}")),
                };
                let request = TransferRequest {
                    reference: 0,
                    id: TransferId(id),
                    debit: who(debit),
                    credit: who(credit),
                    amount: f.ledger.ledger().amount_from_minor(minor, "EUR").unwrap(),
                    memo: Vec::new(),
                };
                let op = if pending {
                    BatchOp::CreatePending {
                        request,
                        timeout_ms: 60_000,
                    }
                } else {
                    BatchOp::Create(request)
                };
                entries.push(BatchEntry {
                    op,
                    linked: i + 1 < unit.len(),
                });
            }
        }
        entries
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn chains_apply_whole_and_the_journal_agrees(
            records_max in 2usize..6,
            calls in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::collection::vec((1u128..40, 0usize..4, 1usize..4, 1u128..300, any::<bool>()), 1..4),
                    1..8,
                ),
                1..4,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let clock = ManualClock::new(T0_MS);
            let open = || {
                let options = LedgerOptions {
                    monotonic: Some(Arc::new(clock.clone())),
                    batch_commands_max: records_max,
                    ..LedgerOptions::default()
                };
                Ledger::open_with_options(dir.path(), &settings(), Arc::new(clock.clone()), options)
                    .unwrap()
                    .blocking()
            };
            let f = Fixture { _dir: tempfile::tempdir().unwrap(), clock: clock.clone(), ledger: open() };
            for call in &calls {
                let results = f.ledger.batch_linked(entries(&f, call)).unwrap();
                let mut at = 0;
                for unit in call {
                    let answers = &results[at..at + unit.len()];
                    at += unit.len();
                    let applied = answers.iter().filter(|r| r.is_ok()).count();
                    prop_assert!(applied == 0 || applied == unit.len(), "{:?}", answers);
                    let created = answers.iter().all(|r| matches!(r, Ok(CreateResult::Created(_))));
                    if created && unit.len() > 1 {
                        // In one journal record, never across two.
                        let journal = journal_records_of(f.ledger.ledger());
                        let seqs: Vec<u64> = unit.iter().map(|&(id, ..)| journal[&id][0]).collect();
                        prop_assert!(seqs.iter().all(|&s| s == seqs[0]), "{:?}", seqs);
                    }
                    if unit.len() > records_max.min(LINKED_CHAIN_OPS_MAX) {
                        let too_long = answers.iter().all(|r| {
                            r.as_ref().is_err_and(|e| {
                                e.rejection() == Some(TransferError::LinkedChainTooLong)
                            })
                        });
                        prop_assert!(too_long);
                    }
                }
                f.ledger.verify_with_memory().map_err(|e| TestCaseError::fail(e.to_string()))?;
                clock.advance_ms(1_000);
            }
            let before: Vec<AccountView> = (0..4)
                .flat_map(|n| f.ledger.balances(&match n { 0 => Owner::Issuer, n => user(&format!("u{n}")) }).unwrap())
                .collect();
            drop(f);
            let ledger = open();
            let after: Vec<AccountView> = (0..4)
                .flat_map(|n| ledger.balances(&match n { 0 => Owner::Issuer, n => user(&format!("u{n}")) }).unwrap())
                .collect();
            prop_assert_eq!(before, after);
            ledger.verify().map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
}
