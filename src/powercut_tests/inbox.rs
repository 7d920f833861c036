//! Power cuts over the inbox: a transaction answered 200 is never lost and never handled twice.
//!
//! The HTTP edge answers the homeserver's `PUT /transactions/{txnId}` with 200 exactly when
//! [`Inbox::accept`] returned (`put_transaction` in `http`), so an accept that returned is the
//! acknowledgement; the worker's [`Inbox::mark_processed`] / [`Inbox::mark_failed`] returning
//! is the inbox's promise that the transaction is never handled again.

use std::collections::{BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::inbox::{Accepted, Inbox};
use crate::sled_open::powercut::{retried, PowerCut};

#[derive(Debug, Clone, PartialEq)]
enum Ack {
    /// Answered 200 (`seq` when stored now).
    Accepted {
        txn_id: String,
        seq: Option<u64>,
    },
    Processed {
        txn_id: String,
    },
    Failed {
        txn_id: String,
    },
}

fn body(txn: usize) -> Vec<u8> {
    serde_json::json!({"events": [{"type": "m.room.message", "event_id": format!("$e{txn}"),
        "room_id": "!r:hs", "sender": "@a:hs", "content": {"msgtype": "m.text", "body": "hi"}}]})
    .to_string()
    .into_bytes()
}

fn txn_of(ack: &Ack) -> &str {
    match ack {
        Ack::Accepted { txn_id, .. } | Ack::Processed { txn_id } | Ack::Failed { txn_id } => txn_id,
    }
}

fn open(dir: &std::path::Path) -> Inbox {
    Inbox::open(dir).unwrap()
}

/// Handles the oldest pending transaction: processed, or (sometimes) failed for good.
async fn handle_one(inbox: &Inbox, fail: bool) -> Option<Ack> {
    let next = inbox.pending(None, 1).unwrap().into_iter().next()?;
    if fail {
        retried(|| inbox.mark_failed(next.seq)).await;
        Some(Ack::Failed {
            txn_id: next.txn_id,
        })
    } else {
        retried(|| inbox.mark_processed(next.seq)).await;
        Some(Ack::Processed {
            txn_id: next.txn_id,
        })
    }
}

fn one_run(seed: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut rng = StdRng::seed_from_u64(seed);
        let cut = PowerCut::<Ack>::new(&["inbox"], seed)
            .torn_tails(rng.gen_bool(0.5))
            .failing_syncs(if rng.gen_bool(0.75) { 0.3 } else { 0.0 });
        let steps = rng.gen_range(10..50);
        let mut sent = 0usize;
        // Transactions the worker took before the cut, told or not.
        let mut handled_live = BTreeSet::new();
        {
            let inbox = open(&cut.dir("inbox"));
            for _ in 0..steps {
                match rng.gen_range(0..10) {
                    0..=4 => {
                        let txn_id = sent.to_string();
                        let body = body(sent);
                        let accepted = retried(|| inbox.accept(&txn_id, &body)).await;
                        sent += 1;
                        // A first attempt whose sync failed was stored: its retry is a duplicate.
                        cut.ack(Ack::Accepted {
                            txn_id,
                            seq: match accepted {
                                Accepted::New(seq) => Some(seq),
                                Accepted::Duplicate => None,
                            },
                        });
                    }
                    5 if sent > 0 => {
                        // The homeserver sends an earlier transaction again.
                        let txn = rng.gen_range(0..sent);
                        let (txn_id, body) = (txn.to_string(), body(txn));
                        let accepted = retried(|| inbox.accept(&txn_id, &body)).await;
                        assert_eq!(accepted, Accepted::Duplicate, "seed {seed}");
                        cut.ack(Ack::Accepted {
                            txn_id: txn.to_string(),
                            seq: None,
                        });
                    }
                    _ => {
                        if let Some(ack) = handle_one(&inbox, rng.gen_bool(0.15)).await {
                            handled_live.insert(txn_of(&ack).to_owned());
                            cut.ack(ack);
                        }
                    }
                }
            }
        }
        let survived = cut.cut();
        let context = format!(
            "seed {seed}: cut after durable flush {} of {}",
            survived.point, survived.flushes
        );
        let inbox = open(&cut.dir("inbox"));
        let pending: Vec<String> = inbox
            .pending(None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|t| t.txn_id)
            .collect();
        let failed: BTreeSet<String> = inbox
            .failed(usize::MAX)
            .unwrap()
            .into_iter()
            .map(|t| t.txn_id)
            .collect();
        let mut state: HashMap<&str, &Ack> = HashMap::new();
        let mut seq_max: Option<u64> = None;
        for ack in &survived.acked {
            match ack {
                Ack::Accepted { txn_id, seq } => {
                    seq_max = seq_max.max(*seq);
                    state.entry(txn_id).or_insert(ack);
                }
                Ack::Processed { txn_id } | Ack::Failed { txn_id } => {
                    state.insert(txn_id, ack);
                }
            }
        }
        for (txn_id, last) in &state {
            let queued = pending.iter().filter(|p| p == txn_id).count();
            assert!(
                inbox.contains(txn_id).unwrap(),
                "{context}: transaction {txn_id}, answered 200, is unknown"
            );
            match last {
                // Taken off the queue only by the worker (its answer may not have got out).
                Ack::Accepted { .. } => assert!(
                    queued == 1 || queued == 0 && handled_live.contains(*txn_id),
                    "{context}: transaction {txn_id}, answered 200, is queued {queued} times"
                ),
                Ack::Processed { .. } => assert_eq!(
                    queued, 0,
                    "{context}: transaction {txn_id}, processed, is queued again"
                ),
                Ack::Failed { .. } => {
                    assert_eq!(queued, 0, "{context}: failed {txn_id} is queued again");
                    assert!(failed.contains(*txn_id), "{context}: failed {txn_id} lost");
                }
            }
        }
        // Nothing is queued twice, and the worker handles the queue without any retry.
        let mut unique = pending.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), pending.len(), "{context}: queued twice");
        let mut handled: Vec<String> = Vec::new();
        while let Some(Ack::Processed { txn_id }) = handle_one(&inbox, false).await {
            handled.push(txn_id);
        }
        // The homeserver retries everything it sent: what was answered 200 is a duplicate,
        // and a transaction stored anew gets a sequence number above every one given before.
        for txn in 0..sent {
            let txn_id = txn.to_string();
            match inbox.accept(&txn_id, &body(txn)).await.unwrap() {
                Accepted::Duplicate => {}
                Accepted::New(seq) => {
                    assert!(
                        !state.contains_key(txn_id.as_str()),
                        "{context}: transaction {txn_id}, answered 200, was stored anew"
                    );
                    assert!(
                        seq_max.is_none_or(|max| seq > max),
                        "{context}: sequence number {seq} given again (had {seq_max:?})"
                    );
                }
            }
        }
        while let Some(Ack::Processed { txn_id }) = handle_one(&inbox, false).await {
            handled.push(txn_id);
        }
        for (txn_id, last) in &state {
            if !matches!(last, Ack::Accepted { .. }) {
                assert!(
                    !handled.iter().any(|h| h == txn_id),
                    "{context}: {txn_id} was handled again after it was marked done"
                );
            }
        }
        for txn in 0..sent {
            let txn_id = txn.to_string();
            let again = handled.iter().filter(|h| **h == txn_id).count();
            assert!(
                again <= 1,
                "{context}: {txn_id} handled {again} times after the cut"
            );
            assert!(
                inbox.contains(&txn_id).unwrap(),
                "{context}: {txn_id} lost for good"
            );
        }
    });
}

#[test]
fn power_cuts_lose_no_transaction_answered_200_and_handle_none_twice() {
    crate::sled_open::powercut::run_many("inbox", one_run);
}
