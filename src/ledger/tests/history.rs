//! Account histories on disk (issue 15): a history page merges what is in memory with the
//! lists written beside the rows at each spill, and must be exactly the page of a ledger
//! that keeps every transfer in memory.

use super::*;

/// What a ledger that keeps everything in memory answers: every transfer that succeeded,
/// in creation order, with its two owners.
#[derive(Default)]
struct Model {
    transfers: Vec<(u128, Owner, Owner)>,
}

impl Model {
    fn add(&mut self, t: &Transfer) {
        self.transfers
            .push((t.id.0, t.debit.owner.clone(), t.credit.owner.clone()));
    }

    /// The ids of `owner`'s history, newest first.
    fn history(&self, owner: &Owner) -> Vec<u128> {
        self.transfers
            .iter()
            .rev()
            .filter(|(_, d, c)| d == owner || c == owner)
            .map(|(id, _, _)| *id)
            .collect()
    }
}

/// Pages through `owner`'s history `limit` at a time and checks each page against the
/// model: the same ids in the same pages, and a cursor exactly when more follow.
fn check_pages(ledger: &BlockingLedger, model: &Model, owner: &Owner, limit: usize) {
    let expected = model.history(owner);
    let mut got: Vec<u128> = Vec::new();
    let mut cursor = None;
    for page_no in 0.. {
        let page = ledger.history(owner, cursor, limit).unwrap();
        let ids: Vec<u128> = page.transfers.iter().map(|t| t.id.0).collect();
        let from = page_no * limit;
        let want = &expected[from.min(expected.len())..(from + limit).min(expected.len())];
        assert_eq!(ids, want, "{owner:?}, page {page_no} of {limit}");
        got.extend(ids);
        cursor = page.next;
        assert_eq!(
            cursor.is_some(),
            got.len() < expected.len(),
            "{owner:?}, page {page_no} of {limit}: the cursor"
        );
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(got, expected, "{owner:?}, pages of {limit}");
}

fn check_all(ledger: &BlockingLedger, model: &Model) {
    for owner in [
        user("alice"),
        user("bob"),
        user("carol"),
        Owner::Issuer,
        user("nobody"),
    ] {
        for limit in [1, 2, 3, 5, 8, 1_000] {
            check_pages(ledger, model, &owner, limit);
        }
    }
}

fn history_entries_in_memory(ledger: &BlockingLedger) -> usize {
    block_on(
        ledger
            .ledger()
            .read(|state, _| state.history_entries_in_memory()),
    )
    .unwrap()
}

/// Issue 15 (histories on disk): histories paged across three spills, a reopen and a fourth
/// spill at close: two currencies of one owner (EUR and JPY), a pending transfer created
/// early and posted after two spills (so its row, and its history entries, are in a later
/// segment than transfers created after it), another voided, refunds of transfers on disk
/// (single-phase and pending). Every page, at every page size, is the page of a model that
/// keeps everything; after each spill only the transfers still in memory keep history
/// entries there; `verify_with_memory` compares each account's whole history with the full
/// replay, and `verify` checks the lists on disk.
#[test]
fn history_pages_across_spills_and_a_reopen_are_those_of_everything_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let mut model = Model::default();
    let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
    let amount = |ledger: &BlockingLedger, v: &str, currency: &str| {
        ledger
            .ledger()
            .parse_amount(Decimal::from_str(v).unwrap(), currency)
            .unwrap()
    };
    let request = |ledger: &BlockingLedger, id: u128, debit: &Owner, credit: &Owner, v: &str| {
        let currency = if id % 3 == 2 { "JPY" } else { "EUR" };
        let v = match (currency, v) {
            ("JPY", "500.00") => "5000",
            ("JPY", _) => "7",
            _ => v,
        };
        TransferRequest {
            reference: 0,
            id: TransferId(id),
            debit: debit.clone(),
            credit: credit.clone(),
            amount: amount(ledger, v, currency),
            memo: format!("memo {id}").into_bytes(),
        }
    };
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    // Funds for everyone, in both currencies (ids 1, 2: EUR and JPY, see `request`).
    for (id, who) in [
        (1, &alice),
        (2, &alice),
        (4, &bob),
        (5, &bob),
        (7, &carol),
        (8, &carol),
    ] {
        let t = ledger
            .create_transfer(request(&ledger, id, &Owner::Issuer, who, "500.00"))
            .unwrap();
        model.add(&t);
    }
    let pay = |ledger: &BlockingLedger, model: &mut Model, ids: std::ops::Range<u128>| {
        let people = [&alice, &bob, &carol];
        for id in ids {
            let debit = people[(id % 3) as usize];
            let credit = people[((id + 1 + id / 3) % 3) as usize];
            let credit = if credit == debit {
                people[((id + 2) % 3) as usize]
            } else {
                credit
            };
            let t = ledger
                .create_transfer(request(ledger, id, debit, credit, "1.25"))
                .unwrap();
            model.add(&t);
        }
    };
    // Created early, ended after later spills.
    let early = ledger
        .create_pending(request(&ledger, 10, &alice, &bob, "5.00"), 3_600_000)
        .unwrap();
    model.add(&early);
    let voided = ledger
        .create_pending(request(&ledger, 11, &carol, &alice, "2.00"), 3_600_000)
        .unwrap();
    model.add(&voided);
    pay(&ledger, &mut model, 20..40);
    check_all(&ledger, &model);

    block_on(ledger.ledger().checkpoint()).unwrap();
    assert_eq!(transfers_held(&ledger), 2, "the two pending transfers");
    assert_eq!(history_entries_in_memory(&ledger), 4);
    check_all(&ledger, &model);

    pay(&ledger, &mut model, 40..50);
    // A refund of a transfer on disk (transfer 21: bob -> ..., see `pay`).
    let original = ledger.transfer(TransferId(21)).unwrap().unwrap();
    let refund = ledger
        .refund(
            TransferId(51),
            TransferId(21),
            amount(&ledger, "0.25", "EUR"),
            Vec::new(),
        )
        .unwrap();
    assert_eq!(
        (&refund.debit, &refund.credit),
        (&original.credit, &original.debit)
    );
    model.add(&refund);
    block_on(ledger.ledger().checkpoint()).unwrap();
    check_all(&ledger, &model);

    ledger.post(TransferId(10), None).unwrap();
    ledger.void(TransferId(11)).unwrap();
    pay(&ledger, &mut model, 52..56);
    // A pending refund of a transfer on disk, posted before the next spill.
    let back = TransferRequest {
        reference: 0,
        id: TransferId(57),
        debit: original.credit.owner.clone(),
        credit: original.debit.owner.clone(),
        amount: amount(&ledger, "0.50", "EUR"),
        memo: Vec::new(),
    };
    let pending_refund = ledger
        .create_refund_result(back, TransferId(21), Some(60_000))
        .unwrap();
    model.add(pending_refund.transfer());
    ledger.post(TransferId(57), None).unwrap();
    check_all(&ledger, &model);
    block_on(ledger.ledger().checkpoint()).unwrap();
    assert_eq!(transfers_held(&ledger), 0);
    assert_eq!(history_entries_in_memory(&ledger), 0, "all on disk");
    check_all(&ledger, &model);

    // In memory again: new transfers and a pending one.
    pay(&ledger, &mut model, 60..63);
    let pending = ledger
        .create_pending(request(&ledger, 63, &bob, &carol, "1.00"), 3_600_000)
        .unwrap();
    model.add(&pending);
    check_all(&ledger, &model);
    ledger.verify_with_memory().unwrap();
    drop(ledger);

    // Closed with a checkpoint (a fourth spill); reopened from it.
    let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
    assert!(ledger.ledger().opened_from_checkpoint().is_some());
    assert_eq!(history_entries_in_memory(&ledger), 2, "the pending one");
    check_all(&ledger, &model);
    pay(&ledger, &mut model, 70..73);
    let refund = ledger
        .refund(
            TransferId(73),
            TransferId(40),
            amount(&ledger, "0.25", "EUR"),
            Vec::new(),
        )
        .unwrap();
    model.add(&refund);
    ledger.post(TransferId(63), None).unwrap();
    check_all(&ledger, &model);
    ledger.verify_with_memory().unwrap();
    block_on(ledger.ledger().checkpoint()).unwrap();
    check_all(&ledger, &model);
    ledger.verify_with_memory().unwrap();
    ledger.verify().unwrap();
    drop(ledger);
    verify_dir(dir.path()).unwrap();
}

/// Issue 15 (histories on disk), the upgrade: a ledger written before the history lists
/// has segments of version 1 (rows only) and a checkpoint of format 4. `verify` reports the
/// checkpoint as an old format; open replays the whole journal (every history whole in
/// memory), and the first checkpoint writes every ended transfer again in a new segment,
/// with its lists: then only the pending transfer keeps history entries in memory, and
/// after a reopen from that checkpoint the pages are still complete.
#[test]
fn an_old_ledger_gets_its_history_lists_at_the_first_spill_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let mut model = Model::default();
    let eur = |ledger: &BlockingLedger, v: &str| {
        ledger
            .ledger()
            .parse_amount(Decimal::from_str(v).unwrap(), "EUR")
            .unwrap()
    };
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    {
        let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
        let mut pay = |id: u128, debit: &Owner, credit: &Owner, pending: bool| {
            let request = TransferRequest {
                reference: 0,
                id: TransferId(id),
                debit: debit.clone(),
                credit: credit.clone(),
                amount: eur(&ledger, if id < 5 { "100.00" } else { "1.00" }),
                memo: Vec::new(),
            };
            let t = if pending {
                ledger.create_pending(request, 3_600_000).unwrap()
            } else {
                ledger.create_transfer(request).unwrap()
            };
            model.add(&t);
        };
        pay(1, &Owner::Issuer, &alice, false);
        pay(2, &Owner::Issuer, &bob, false);
        pay(10, &alice, &carol, true);
        pay(11, &bob, &alice, true);
        for id in 20..30 {
            pay(id, [&alice, &bob][id as usize % 2], &carol, false);
        }
        block_on(ledger.ledger().checkpoint()).unwrap();
        ledger.post(TransferId(10), None).unwrap();
        for id in 30..35 {
            pay(id, &carol, [&alice, &bob][id as usize % 2], false);
        }
        // Closed with a checkpoint: a second segment, transfer 11 still pending.
    }
    let ledger_dir = dir.path().join("ledger");
    crate::ledger::segments::rewrite_as_version_1(&ledger_dir);
    let path = ledger_dir.join(storage::CHECKPOINT_FILE);
    let mut old = std::fs::read(&path).unwrap();
    old[8] = 4;
    let n = old.len() - 32;
    let hash = *blake3::hash(&old[..n]).as_bytes();
    old[n..].copy_from_slice(&hash);
    std::fs::write(&path, &old).unwrap();
    let seq = u64::from_le_bytes(old[9..17].try_into().unwrap());
    assert_eq!(
        verify_dir(dir.path()).unwrap().checkpoint,
        CheckpointCheck::OldFormat { seq, version: 4 }
    );

    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        checkpoint_at_close: false,
        ..LedgerOptions::default()
    };
    let open = || {
        Ledger::open_with_options(
            dir.path(),
            &settings(),
            Arc::new(clock.clone()),
            options.clone(),
        )
        .unwrap()
        .blocking()
    };
    let ledger = open();
    assert_eq!(ledger.ledger().opened_from_checkpoint(), None);
    assert_eq!(ledger.ledger().alarms().checkpoint_fallbacks, 0);
    check_all(&ledger, &model);
    block_on(ledger.ledger().checkpoint()).unwrap();
    assert_eq!(
        history_entries_in_memory(&ledger),
        2,
        "transfer 11, pending"
    );
    check_all(&ledger, &model);
    ledger.verify().unwrap();
    drop(ledger);

    let ledger = open();
    assert!(ledger.ledger().opened_from_checkpoint().is_some());
    check_all(&ledger, &model);
    ledger.post(TransferId(11), None).unwrap();
    check_all(&ledger, &model);
    ledger.verify_with_memory().unwrap();
    drop(ledger);
    assert_eq!(
        verify_dir(dir.path()).unwrap().checkpoint,
        CheckpointCheck::Compared { seq }
    );
}

/// Issue 15 (histories on disk): `verify` checks the lists on disk against the full
/// replay: a transfer's newest row listed under another account than its own two fails it
/// (here the row's bytes are the journal's, so only the lists are wrong).
#[test]
fn verify_catches_a_history_list_on_disk_that_is_not_the_journals() {
    let dir = tempfile::tempdir().unwrap();
    three_transfers_to_alice_on_disk(dir.path());
    {
        let storage = SledStorage::open(&dir.path().join("ledger")).unwrap();
        let row = storage.transfer_row(1).unwrap().expect("written at close");
        // The issuer's account is 0 and alice's 1 (opened in that order).
        assert_eq!(storage.account_history(1, 10, 10).unwrap(), vec![2, 1, 0]);
        storage
            .put_transfer_rows(&TransferRows::from_iter([TransferRow {
                idx: 1,
                id: 2,
                accounts: [0, 7],
                bytes: &row,
                reference: 0,
            }]))
            .unwrap();
    }
    let error = verify_dir(dir.path()).unwrap_err().to_string();
    assert!(
        error.contains("not in exactly its two accounts' history lists"),
        "{error}"
    );
}
