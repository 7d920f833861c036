//! The batch API (`Ledger::batch`): many changes in one queued command, answered in order.

use super::*;

/// A batch longer than one command and one journal record: creates, a refused overdraft, a
/// retry inside the batch, a pending transfer posted and another voided in the same call.
#[test]
fn a_batch_answers_each_change_as_its_single_call_would_across_records() {
    let f = open();
    f.fund(1, "alice", "100.00");
    let cent = f.amount("0.01", "EUR");
    let mut ops = Vec::new();
    // 20,000 one-cent transfers alice -> bob: more than BATCH_OPS_MAX and several records.
    for i in 0..20_000u128 {
        ops.push(BatchOp::Create(TransferRequest {
            reference: 0,
            id: TransferId(100 + i),
            debit: user("alice"),
            credit: user("bob"),
            amount: cent,
            memo: b"order 42".to_vec(),
        }));
    }
    // Alice has 100.00 - 200.00 sent: the last 10,000 are refused.
    let retry = ops[0].clone();
    ops.push(retry);
    ops.push(BatchOp::CreatePending {
        request: f.request(50_000, user("bob"), user("carol"), "1.00", "EUR"),
        timeout_ms: 60_000,
    });
    ops.push(BatchOp::Post {
        pending: TransferId(50_000),
        amount: None,
    });
    ops.push(BatchOp::CreatePending {
        request: f.request(50_001, user("bob"), user("carol"), "2.00", "EUR"),
        timeout_ms: 60_000,
    });
    ops.push(BatchOp::Void {
        pending: TransferId(50_001),
    });
    ops.push(BatchOp::Void {
        pending: TransferId(50_001),
    });
    let seq_before = f.ledger.ledger().durable_seq_now();
    let results = f.ledger.batch(ops).unwrap();
    assert_eq!(results.len(), 20_006);
    for (i, result) in results[..10_000].iter().enumerate() {
        match result {
            Ok(CreateResult::Created(t)) => assert_eq!(t.id, TransferId(100 + i as u128)),
            other => panic!("transfer {i}: {other:?}"),
        }
    }
    for result in &results[10_000..20_000] {
        let refused = result.as_ref().map(|_| ()).unwrap_err().rejection();
        assert_eq!(refused, Some(TransferError::InsufficientFunds));
    }
    assert!(matches!(&results[20_000], Ok(CreateResult::Exists(t)) if t.id == TransferId(100)));
    assert!(
        matches!(&results[20_001], Ok(CreateResult::Created(t)) if t.state == TransferState::Pending)
    );
    assert!(
        matches!(&results[20_002], Ok(CreateResult::Created(t)) if t.state == TransferState::Posted { amount_minor: 100 })
    );
    assert!(
        matches!(&results[20_004], Ok(CreateResult::Created(t)) if t.state == TransferState::Voided)
    );
    assert!(
        matches!(&results[20_005], Ok(CreateResult::Exists(t)) if t.state == TransferState::Voided)
    );
    assert_eq!(f.available("alice"), 0);
    assert_eq!(f.available("bob"), 10_000 - 100);
    assert_eq!(f.available("carol"), 100);
    // Several journal records: the batch did not squeeze past the record bound.
    let records = f.ledger.ledger().durable_seq_now() - seq_before;
    assert!(records >= 3, "{records} records");
    f.ledger.verify().unwrap();
    // A single call after the batch still works, and sees its effect.
    f.send(60_000, user("bob"), user("alice"), "0.50").unwrap();
    assert_eq!(f.available("alice"), 50);
}

/// Single calls queued while a long batch is being written keep their place: each is decided
/// after the whole batch it queued behind, and gets its own answer.
#[test]
fn single_calls_behind_a_batch_wait_for_all_of_it() {
    let f = open();
    f.fund(1, "alice", "100.00");
    let ledger = f.ledger.ledger().clone();
    let cent = f.amount("0.01", "EUR");
    let ops: Vec<BatchOp> = (0..10_000u128)
        .map(|i| {
            BatchOp::Create(TransferRequest {
                reference: 0,
                id: TransferId(1_000 + i),
                debit: user("alice"),
                credit: user("bob"),
                amount: cent,
                memo: Vec::new(),
            })
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (batch, single) = runtime.block_on(async {
        let batch = ledger.batch(ops);
        // Spends what the batch leaves: refused unless decided after all of the batch.
        let request = f.request(2, user("alice"), user("carol"), "0.01", "EUR");
        let single = ledger.create_transfer(request);
        tokio::join!(batch, single)
    });
    assert!(batch.unwrap().iter().all(Result::is_ok));
    assert_eq!(
        single.unwrap_err().rejection(),
        Some(TransferError::InsufficientFunds)
    );
}
