//! History queries by time range (issue 15, "for what comes next"): TigerBeetle's
//! `get_account_transfers` with `timestamp_min`/`timestamp_max`, `limit` and `reversed`,
//! answered from an index span found by binary search, never by a scan.

use std::collections::BTreeSet;

use super::*;

/// A storage that counts what history queries read: the rows read by index, and the entries
/// the history lists returned.
struct Counting {
    inner: SledStorage,
    rows_read: parking_lot::Mutex<Vec<u32>>,
    listed_read: parking_lot::Mutex<Vec<u32>>,
    referenced_read: parking_lot::Mutex<Vec<u32>>,
}

impl Counting {
    fn open(dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            inner: SledStorage::open(&dir.join("ledger")).unwrap(),
            rows_read: parking_lot::Mutex::new(Vec::new()),
            listed_read: parking_lot::Mutex::new(Vec::new()),
            referenced_read: parking_lot::Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> (Vec<u32>, Vec<u32>) {
        self.referenced_read.lock().clear();
        (
            std::mem::take(&mut *self.rows_read.lock()),
            std::mem::take(&mut *self.listed_read.lock()),
        )
    }
}

impl Storage for Counting {
    fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError> {
        self.inner.append(seq, record, head)
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
        true
    }
    fn put_checkpoint(&self, bytes: &[u8]) -> Result<(), StorageError> {
        self.inner.put_checkpoint(bytes)
    }
    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.checkpoint()
    }
    fn keeps_transfer_rows(&self) -> bool {
        true
    }
    fn put_transfer_rows(&self, rows: &TransferRows) -> Result<(), StorageError> {
        self.inner.put_transfer_rows(rows)
    }
    fn transfer_row(&self, idx: u32) -> Result<Option<Vec<u8>>, StorageError> {
        self.rows_read.lock().push(idx);
        self.inner.transfer_row(idx)
    }
    fn transfer_row_idx(&self, id: u128) -> Result<Option<u32>, StorageError> {
        self.inner.transfer_row_idx(id)
    }
    fn transfer_row_piece_ends(&self) -> Result<Vec<u32>, StorageError> {
        self.inner.transfer_row_piece_ends()
    }
    fn account_history(
        &self,
        account: u32,
        before: u32,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        let listed = self.inner.account_history(account, before, limit)?;
        self.listed_read.lock().extend(&listed);
        Ok(listed)
    }
    fn account_history_range(
        &self,
        account: u32,
        span: std::ops::Range<u32>,
        order: HistoryOrder,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        let listed = self
            .inner
            .account_history_range(account, span, order, limit)?;
        self.listed_read.lock().extend(&listed);
        Ok(listed)
    }
    fn transfer_rows_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        let found = self.inner.transfer_rows_by_reference(reference, limit)?;
        self.referenced_read.lock().extend(&found);
        Ok(found)
    }

    fn scan_transfer_rows(&self, visit: &mut dyn FnMut(RowEntry<'_>)) -> Result<(), StorageError> {
        self.inner.scan_transfer_rows(visit)
    }
}

fn open_counting(storage: &Arc<Counting>, clock: &ManualClock) -> BlockingLedger {
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        ..LedgerOptions::default()
    };
    let currencies = Currencies::from_settings(&settings()).unwrap();
    Ledger::open_storage(
        storage.clone(),
        currencies,
        Arc::new(clock.clone()),
        options,
    )
    .unwrap()
    .blocking()
}

fn eur(ledger: &BlockingLedger, v: &str) -> Amount {
    ledger
        .ledger()
        .parse_amount(Decimal::from_str(v).unwrap(), "EUR")
        .unwrap()
}

fn pay(ledger: &BlockingLedger, id: u128, debit: &Owner, credit: &Owner) -> Transfer {
    ledger
        .create_transfer(TransferRequest {
            reference: 0,
            id: TransferId(id),
            debit: debit.clone(),
            credit: credit.clone(),
            amount: eur(ledger, "1.00"),
            memo: Vec::new(),
        })
        .unwrap()
}

/// The whole history of `owner`, newest first, through the plain pages.
fn whole_history(ledger: &BlockingLedger, owner: &Owner) -> Vec<Transfer> {
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = ledger.history(owner, cursor, HISTORY_PAGE_MAX).unwrap();
        all.extend(page.transfers);
        cursor = page.next;
        if cursor.is_none() {
            return all;
        }
    }
}

/// Pages through `query` and checks every page against the whole history filtered by time:
/// the same transfers in the same pages, and a cursor exactly when more follow.
fn check_query(ledger: &BlockingLedger, owner: &Owner, whole: &[Transfer], query: HistoryQuery) {
    let mut expected: Vec<&Transfer> = whole
        .iter()
        .filter(|t| (query.created_ms_min..=query.created_ms_max).contains(&t.created_ms))
        .collect();
    if query.order == HistoryOrder::OldestFirst {
        expected.reverse();
    }
    let limit = query.limit.min(HISTORY_PAGE_MAX);
    let mut cursor = None;
    for page_no in 0.. {
        let page = ledger.history_query(owner, query.after(cursor)).unwrap();
        let from = (page_no * limit).min(expected.len());
        let want: Vec<&Transfer> = expected[from..(from + limit).min(expected.len())].to_vec();
        let got: Vec<&Transfer> = page.transfers.iter().collect();
        assert_eq!(got, want, "{owner:?} {query:?}, page {page_no}");
        cursor = page.next;
        assert_eq!(
            cursor.is_some(),
            from + limit < expected.len(),
            "{owner:?} {query:?}, page {page_no}: the cursor"
        );
        if cursor.is_none() {
            return;
        }
    }
}

/// Every range between the given times (and open ends, and an empty range), both orders,
/// three page sizes, for each owner.
fn check_ranges(ledger: &BlockingLedger, owners: &[Owner], times: &BTreeSet<u64>) {
    let times: Vec<u64> = times.iter().copied().collect();
    for owner in owners {
        let whole = whole_history(ledger, owner);
        let mut ranges = vec![(0, u64::MAX), (u64::MAX, 0), (T0_MS + 1, T0_MS)];
        for (i, &min) in times.iter().enumerate() {
            ranges.push((min, u64::MAX));
            ranges.push((0, min));
            for &max in &times[i..] {
                ranges.push((min, max));
            }
        }
        for (min, max) in ranges {
            for order in [HistoryOrder::NewestFirst, HistoryOrder::OldestFirst] {
                for limit in [3, 1_000, 5_000] {
                    let query = HistoryQuery {
                        order,
                        ..HistoryQuery::newest_first(limit)
                    }
                    .created_within(min, max);
                    check_query(ledger, owner, &whole, query);
                }
            }
        }
    }
}

/// Issue 15: a history query by time range returns exactly the whole history filtered by
/// `created_ms`, in either order and at any page size, across transfers in memory, three
/// spills (segments on disk), a reopen and the transfers after it. Times repeat (several
/// transfers in one millisecond) and jump; a pending transfer created early is posted after
/// two spills (its row is in a later segment than younger transfers). Ranges: open ends,
/// empty ones, ones inside one segment, in memory, across all, and around exact transfer
/// times (both bounds are inclusive).
#[test]
fn history_queries_by_time_are_the_whole_history_filtered_across_spills_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let owners = [user("alice"), user("bob"), user("carol"), Owner::Issuer];
    let (alice, bob, carol) = (&owners[0], &owners[1], &owners[2]);
    let mut times = BTreeSet::from([T0_MS - 1, T0_MS]);
    let storage = Counting::open(dir.path());
    let ledger = open_counting(&storage, &clock);
    for (id, who) in [(1, alice), (2, bob), (3, carol)] {
        let request = TransferRequest {
            reference: 0,
            id: TransferId(id),
            debit: Owner::Issuer,
            credit: who.clone(),
            amount: eur(&ledger, "500.00"),
            memo: Vec::new(),
        };
        ledger.create_transfer(request).unwrap();
    }
    let early = ledger
        .create_pending(
            TransferRequest {
                reference: 0,
                id: TransferId(9),
                debit: alice.clone(),
                credit: carol.clone(),
                amount: eur(&ledger, "5.00"),
                memo: Vec::new(),
            },
            3_600_000,
        )
        .unwrap();
    let mut next_id = 10;
    let mut run = |ledger: &BlockingLedger, times: &mut BTreeSet<u64>, count: u128| {
        let people = [alice, bob, carol];
        for i in 0..count {
            // 0, 1 or 1,000 ms apart: some share a millisecond.
            clock.advance_ms([0, 1, 1_000][(i % 3) as usize]);
            let (d, c) = (people[(i % 3) as usize], people[((i + 1) % 3) as usize]);
            let t = pay(ledger, next_id, d, c);
            next_id += 1;
            if i % 4 == 1 {
                times.insert(t.created_ms);
            }
        }
        times.insert(clock.now_ms() + 1);
    };
    run(&ledger, &mut times, 12);
    check_ranges(&ledger, &owners, &times);
    for spill in 0..3 {
        block_on(ledger.ledger().checkpoint()).unwrap();
        if spill == 1 {
            ledger.post(early.id, None).unwrap();
        }
        run(&ledger, &mut times, 10);
    }
    check_ranges(&ledger, &owners, &times);
    drop(ledger);
    drop(storage);

    let storage = Counting::open(dir.path());
    let ledger = open_counting(&storage, &clock);
    assert!(ledger.ledger().opened_from_checkpoint().is_some());
    check_ranges(&ledger, &owners, &times);
    run(&ledger, &mut times, 8);
    check_ranges(&ledger, &owners, &times);
    ledger.verify_with_memory().unwrap();
}

/// Issue 15: a query by time range reads no row and no history list entry outside its
/// range, but the rows its two binary searches probe (at most about log2(n) each, within
/// the segment where each bound lies), and no segment that holds nothing of its range:
/// here a range inside the fourth of six segments, after a reopen (every transfer on disk),
/// once the first query read the last row of each segment (its time, kept in memory).
#[test]
fn a_history_query_by_time_reads_only_its_range_and_the_binary_searches_probes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let (alice, bob) = (user("alice"), user("bob"));
    let storage = Counting::open(dir.path());
    let ledger = open_counting(&storage, &clock);
    let funds = TransferRequest {
        reference: 0,
        id: TransferId(1),
        debit: Owner::Issuer,
        credit: alice.clone(),
        amount: eur(&ledger, "5000.00"),
        memo: Vec::new(),
    };
    ledger.create_transfer(funds).unwrap();
    let mut created = vec![T0_MS];
    for segment in 0..5u128 {
        for i in 0..40u128 {
            clock.advance_ms(1_000);
            let id = 2 + segment * 40 + i;
            created.push(pay(&ledger, id, &alice, &bob).created_ms);
        }
        block_on(ledger.ledger().checkpoint()).unwrap();
    }
    drop(ledger);
    drop(storage);
    let storage = Counting::open(dir.path());
    let ledger = open_counting(&storage, &clock);
    // Transfers 90..=105 (indexes), in the fourth segment (81..=120).
    let (first, last) = (90usize, 105usize);
    let warm = HistoryQuery::newest_first(1).created_within(created[first], created[first]);
    assert_eq!(ledger.history_query(&bob, warm).unwrap().transfers.len(), 1);
    for order in [HistoryOrder::NewestFirst, HistoryOrder::OldestFirst] {
        storage.take();
        let segments_before = storage.inner.segment_reads();
        let query = HistoryQuery {
            order,
            ..HistoryQuery::newest_first(100)
        }
        .created_within(created[first], created[last]);
        let page = ledger.history_query(&bob, query).unwrap();
        let mut ids: Vec<u128> = page.transfers.iter().map(|t| t.id.0).collect();
        if order == HistoryOrder::NewestFirst {
            ids.reverse();
        }
        assert_eq!(
            ids,
            (first as u128 + 1..=last as u128 + 1).collect::<Vec<_>>()
        );
        assert_eq!(page.next, None);
        let (rows, listed) = storage.take();
        let inside = |idx: &u32| (first..=last).contains(&(*idx as usize));
        assert!(
            listed.iter().all(inside),
            "{order:?}: lists read {listed:?}"
        );
        assert_eq!(listed.len(), last - first + 1, "{order:?}");
        let probes = rows.iter().filter(|idx| !inside(idx)).count();
        // Two binary searches within the fourth segment's 40 rows.
        assert!(
            probes <= 2 * 6,
            "{order:?}: {probes} rows read outside the range ({rows:?})"
        );
        assert!(
            rows.iter().all(|&idx| (81..=120).contains(&idx)),
            "{rows:?}"
        );
        let segments_after = storage.inner.segment_reads();
        // The first transfer has a segment of its own (the first checkpoint of a new
        // ledger comes at its first batch), then one per 40.
        assert_eq!(
            storage.transfer_row_piece_ends().unwrap(),
            [0, 40, 80, 120, 160, 200]
        );
        for segment in [0, 1, 2, 4, 5] {
            assert_eq!(
                segments_after[segment],
                segments_before[segment],
                "{order:?}: segment {} was read ({segments_before:?} -> {segments_after:?})",
                segment + 1
            );
        }
    }
    // A range before every transfer, and one after: nothing listed is read.
    for (min, max) in [(0, T0_MS - 1), (clock.now_ms() + 1, u64::MAX)] {
        storage.take();
        let query = HistoryQuery::newest_first(100).created_within(min, max);
        assert!(ledger
            .history_query(&alice, query)
            .unwrap()
            .transfers
            .is_empty());
        let (rows, listed) = storage.take();
        assert!(listed.is_empty(), "{listed:?}");
        assert!(rows.len() <= 2 * 6, "{rows:?}");
    }
}

fn referenced(
    ledger: &BlockingLedger,
    id: u128,
    debit: &Owner,
    credit: &Owner,
    reference: u128,
) -> TransferRequest {
    TransferRequest {
        id: TransferId(id),
        debit: debit.clone(),
        credit: credit.clone(),
        amount: eur(ledger, "1.00"),
        memo: Vec::new(),
        reference,
    }
}

fn ids(transfers: &[Transfer]) -> Vec<u128> {
    transfers.iter().map(|t| t.id.0).collect()
}

/// Issue 15 (history by reference, TigerBeetle's `query_transfers` by `user_data_128`):
/// `transfers_by_reference` finds every transfer created with a reference, oldest first,
/// up to its limit, wherever it is: in memory, in segments on disk (several), a pending
/// transfer created before a spill and posted after it (its row in a later segment), a
/// pending refund, after a reopen. A retry with the same reference is `Exists`, with
/// another `ExistsWithDifferentReference`. A reference nobody used reads no row, and
/// nothing at all of a segment whose references do not span it; `verify` checks the index
/// on disk.
#[test]
fn transfers_by_reference_are_found_in_memory_on_disk_and_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let (alice, bob) = (user("alice"), user("bob"));
    let (invoice, request, other) = (1u128 << 90, (1u128 << 90) + 2, 1u128 << 100);
    let storage = Counting::open(dir.path());
    let ledger = open_counting(&storage, &clock);
    let funds = TransferRequest {
        id: TransferId(1),
        debit: Owner::Issuer,
        credit: alice.clone(),
        amount: eur(&ledger, "500.00"),
        memo: Vec::new(),
        reference: 0,
    };
    ledger.create_transfer(funds).unwrap();
    let mut want_invoice = Vec::new();
    let mut want_request = Vec::new();
    // Three spills, each with transfers of both references among others.
    let mut id = 10;
    for spill in 0..3 {
        for i in 0..6 {
            clock.advance_ms(10);
            let reference = [invoice, 0, request, 0, 0, invoice][i];
            ledger
                .create_transfer(referenced(&ledger, id, &alice, &bob, reference))
                .unwrap();
            match reference {
                r if r == invoice => want_invoice.push(id),
                r if r == request => want_request.push(id),
                _ => {}
            }
            id += 1;
        }
        if spill == 0 {
            // Pending across the next spill, posted after it; and a pending refund.
            let pending = referenced(&ledger, 100, &alice, &bob, request);
            ledger.create_pending(pending, 3_600_000).unwrap();
            want_request.push(100);
            let back = referenced(&ledger, 101, &bob, &alice, invoice);
            ledger
                .create_refund_result(back, TransferId(10), Some(3_600_000))
                .unwrap();
            want_invoice.push(101);
        }
        block_on(ledger.ledger().checkpoint()).unwrap();
        if spill == 1 {
            ledger.post(TransferId(100), None).unwrap();
            ledger.post(TransferId(101), None).unwrap();
        }
    }
    // And in memory.
    ledger
        .create_transfer(referenced(&ledger, 200, &bob, &alice, invoice))
        .unwrap();
    want_invoice.push(200);
    // Pending at the close: held in memory across the reopen (in the checkpoint).
    let held = referenced(&ledger, 300, &bob, &alice, invoice);
    ledger.create_pending(held, 3_600_000).unwrap();
    want_invoice.push(300);
    want_invoice.sort_unstable();
    want_request.sort_unstable();
    let check = |ledger: &BlockingLedger| {
        let found = ledger.transfers_by_reference(invoice, 1_000).unwrap();
        // Oldest first: by creation (the pending ones were created early).
        let mut created: Vec<(u64, u128)> = found.iter().map(|t| (t.created_ms, t.id.0)).collect();
        created.sort_unstable();
        assert_eq!(ids(&found), created.iter().map(|c| c.1).collect::<Vec<_>>());
        let mut got = ids(&found);
        got.sort_unstable();
        assert_eq!(got, want_invoice);
        assert!(found.iter().all(|t| t.reference == invoice));
        let mut got = ids(&ledger.transfers_by_reference(request, 1_000).unwrap());
        got.sort_unstable();
        assert_eq!(got, want_request);
        // A limit: the oldest ones.
        let first_three = ledger.transfers_by_reference(invoice, 3).unwrap();
        assert_eq!(ids(&first_three), ids(&found)[..3]);
        assert!(ledger.transfers_by_reference(0, 1_000).unwrap().is_empty());
        assert!(ledger
            .transfers_by_reference(other, 1_000)
            .unwrap()
            .is_empty());
    };
    check(&ledger);
    // Retries: the same reference is the same transfer; another is a different body.
    let retry = ledger
        .create_transfer_result(referenced(&ledger, 10, &alice, &bob, invoice))
        .unwrap();
    assert!(retry.exists());
    for (id, d, c, reference) in [(10, &alice, &bob, request), (200, &bob, &alice, 0)] {
        assert!(matches!(
            ledger.create_transfer(referenced(&ledger, id, d, c, reference)),
            Err(LedgerError::Rejected(
                TransferError::ExistsWithDifferentReference
            ))
        ));
    }
    ledger.verify_with_memory().unwrap();
    drop(ledger);
    drop(storage);

    let storage = Counting::open(dir.path());
    let ledger = open_counting(&storage, &clock);
    assert!(ledger.ledger().opened_from_checkpoint().is_some());
    check(&ledger);
    // A reference nobody used: no row read; above every segment's references, no segment
    // read at all; between them, only the reference indexes that span it.
    for (absent, spanned) in [(other, false), (invoice + 1, true)] {
        storage.take();
        let before = storage.inner.segment_reads();
        assert!(ledger
            .transfers_by_reference(absent, 1_000)
            .unwrap()
            .is_empty());
        let after = storage.inner.segment_reads();
        let (rows, _) = storage.take();
        assert!(rows.is_empty(), "{absent:#x}: rows read {rows:?}");
        assert_eq!(
            before == after,
            !spanned,
            "{absent:#x}: {before:?} -> {after:?}"
        );
    }
    ledger.verify().unwrap();
    ledger.verify_with_memory().unwrap();
}

/// Issue 15 (history by reference): `verify` checks the reference index on disk against
/// the full replay: a transfer's newest row listed under a reference it does not have
/// (here the row's bytes and lists are the journal's, so only the index is wrong) fails.
#[test]
fn verify_catches_a_reference_index_on_disk_that_is_not_the_journals() {
    let dir = tempfile::tempdir().unwrap();
    three_transfers_to_alice_on_disk(dir.path());
    {
        let storage = SledStorage::open(&dir.path().join("ledger")).unwrap();
        let row = storage.transfer_row(1).unwrap().expect("written at close");
        storage
            .put_transfer_rows(&TransferRows::from_iter([TransferRow {
                idx: 1,
                id: 2,
                accounts: [0, 1],
                bytes: &row,
                reference: 7,
            }]))
            .unwrap();
        assert_eq!(storage.transfer_rows_by_reference(7, 10).unwrap(), vec![1]);
    }
    let error = verify_dir(dir.path()).unwrap_err().to_string();
    assert!(error.contains("reference index"), "{error}");
}

/// Issue 15 (history by reference) with linked chains: a chain that fails takes its
/// transfers back, and their references with them; the transfer that then takes the same
/// index is found by its own reference, once, and the undone one by none.
#[test]
fn a_failed_linked_chain_leaves_no_reference_behind() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let storage = Counting::open(dir.path());
    let ledger = open_counting(&storage, &clock);
    let (alice, bob) = (user("alice"), user("bob"));
    let funds = TransferRequest {
        id: TransferId(1),
        debit: Owner::Issuer,
        credit: alice.clone(),
        amount: eur(&ledger, "5.00"),
        memo: Vec::new(),
        reference: 0,
    };
    ledger.create_transfer(funds).unwrap();
    let too_much = TransferRequest {
        amount: eur(&ledger, "50.00"),
        ..referenced(&ledger, 3, &alice, &bob, 8)
    };
    let results = ledger
        .batch_linked(vec![
            BatchEntry {
                op: BatchOp::Create(referenced(&ledger, 2, &alice, &bob, 7)),
                linked: true,
            },
            BatchOp::Create(too_much).into(),
        ])
        .unwrap();
    assert!(results.iter().all(|r| r.is_err()));
    // Nothing holds the undone transfers' index now: a stale entry would be read there.
    assert!(ledger.transfers_by_reference(7, 10).unwrap().is_empty());
    assert!(ledger.transfers_by_reference(8, 10).unwrap().is_empty());
    ledger
        .create_transfer(referenced(&ledger, 4, &Owner::Issuer, &bob, 9))
        .unwrap();
    assert_eq!(ids(&ledger.transfers_by_reference(9, 10).unwrap()), [4]);
    assert!(ledger.transfers_by_reference(7, 10).unwrap().is_empty());
    ledger
        .create_transfer(referenced(&ledger, 5, &bob, &alice, 7))
        .unwrap();
    assert_eq!(ids(&ledger.transfers_by_reference(7, 10).unwrap()), [5]);
    ledger.verify_with_memory().unwrap();
}
