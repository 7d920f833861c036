//! Power cuts over the payment store (issue 15), driven through the PIN check the payment flow
//! uses ([`check_pin_with`]) and the store calls whose results the bot tells: event decisions,
//! events marked done, the outbox cursor, notices waiting for a DM.
//!
//! Each run works through random inputs, recording every acknowledgement (what the bot would
//! tell) as it makes it, then loses power at a random durable flush
//! ([`crate::sled_open::powercut`]) and restarts over what survived. It checks that everything
//! acknowledged is there as acknowledged (a PIN record never older than the one the last told
//! attempt wrote), then handles every input again, as a homeserver retrying its transactions
//! would, and checks that this counts nothing twice: every PIN attempt ends as it did before
//! the cut, every PIN record ends byte for byte as before, a decision told stays the one told,
//! a notice is queued once.

use super::check_pin_with;
use crate::policy::pin::PinRecord;
use crate::sled_open::powercut::{retried, PowerCut};
use crate::store::payments::{
    DeclineRecord, EventOutcome, OutboxCursor, PaymentStore, PinAttemptResult, WaitingNoticeBounds,
};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use std::collections::HashMap;

const USERS: [&str; 2] = ["@u0:hs", "@u1:hs"];
const HASH: &str = "$argon2id$stand-in";

#[derive(Debug, Clone)]
enum Input {
    /// A PIN event: the user typed the right PIN or not.
    Pin {
        user: usize,
        event_id: String,
        right: bool,
        now_ms: u64,
    },
    /// A payment event refused: the decision is recorded before it is told.
    Decide { event_id: String, reason: u32 },
    /// An event acted on.
    Done { event_id: String },
    /// The outbox told the ledger change at `record_seq`.
    Cursor { record_seq: u64 },
    /// A notice queued for a user's DM.
    Notice {
        user: usize,
        txn_id: String,
        now_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Ack {
    PinSet {
        user: usize,
    },
    Pin {
        user: usize,
        event_id: String,
        result: PinAttemptResult,
        /// Index, in the user's record history, of the record after this attempt.
        version: usize,
    },
    Decided {
        event_id: String,
        outcome: EventOutcome,
    },
    Done {
        event_id: String,
    },
    Cursor {
        record_seq: u64,
    },
    Notice {
        user: usize,
        txn_id: String,
    },
}

fn decline(reason: u32) -> EventOutcome {
    EventOutcome::Declined(DeclineRecord {
        reason: format!("reason_{reason}"),
        sentence: "refused".into(),
        payee: "@payee:hs".try_into().unwrap(),
        amount: "1.00".into(),
        currency: "EUR".into(),
    })
}

fn random_inputs(rng: &mut StdRng) -> Vec<Input> {
    let count = rng.gen_range(12..40);
    let mut now_ms = 1_000_000;
    let mut record_seq = 0;
    (0..count)
        .map(|i| {
            now_ms += rng.gen_range(0..40_000);
            match rng.gen_range(0..10) {
                0..=4 => Input::Pin {
                    user: rng.gen_range(0..USERS.len()),
                    event_id: format!("$pin{i}"),
                    right: rng.gen_bool(0.3),
                    now_ms,
                },
                5 | 6 => Input::Decide {
                    event_id: format!("$pay{i}"),
                    reason: rng.gen_range(0..1000),
                },
                7 => Input::Done {
                    event_id: format!("$done{i}"),
                },
                8 => {
                    record_seq += 1;
                    Input::Cursor { record_seq }
                }
                _ => Input::Notice {
                    user: rng.gen_range(0..USERS.len()),
                    txn_id: format!("notice{i}"),
                    now_ms,
                },
            }
        })
        .collect()
}

/// What one pass over the inputs told, for comparison with a pass after the cut.
#[derive(Debug, Default, PartialEq)]
struct Told {
    pins: Vec<(String, PinAttemptResult)>,
}

fn versioned(store: &PaymentStore, user: usize) -> Option<Vec<u8>> {
    store
        .pin_versioned(USERS[user])
        .unwrap()
        .map(|(_, bytes)| bytes)
}

/// Notes a PIN record written; returns its index in the user's history.
fn note(history: &mut HashMap<usize, Vec<Vec<u8>>>, user: usize, bytes: Vec<u8>) -> usize {
    let versions = history.entry(user).or_default();
    if versions.last() != Some(&bytes) {
        versions.push(bytes);
    }
    versions.len() - 1
}

/// Handles `inputs` in order, telling `tell` each acknowledgement as it is made and noting in
/// `history` each PIN record written, per user.
async fn handle_all(
    store: &PaymentStore,
    inputs: &[Input],
    tell: &mut dyn FnMut(Ack),
    history: &mut HashMap<usize, Vec<Vec<u8>>>,
) -> Told {
    let mut told = Told::default();
    for (user, name) in USERS.iter().enumerate() {
        // The PIN dialog's set step: done once (the dialog guards its replay).
        if store.pin(name).unwrap().is_none() {
            let record = PinRecord::new(HASH.into());
            retried(|| store.put_pin(name, &record)).await;
        }
        note(history, user, versioned(store, user).unwrap());
        tell(Ack::PinSet { user });
    }
    for input in inputs {
        match input {
            Input::Pin {
                user,
                event_id,
                right,
                now_ms,
            } => {
                let begun = std::sync::Mutex::new(None);
                let result = retried(|| {
                    check_pin_with(store, USERS[*user], event_id, *now_ms, |hash| {
                        assert_eq!(hash, HASH);
                        // The record as the attempt's count left it, before the comparison.
                        *begun.lock().unwrap() = versioned(store, *user);
                        async move { Ok(*right) }
                    })
                })
                .await;
                if let Some(bytes) = begun.into_inner().unwrap() {
                    note(history, *user, bytes);
                }
                let version = note(history, *user, versioned(store, *user).unwrap());
                let result = super::attempt_of(&result);
                told.pins.push((event_id.clone(), result));
                tell(Ack::Pin {
                    user: *user,
                    event_id: event_id.clone(),
                    result,
                    version,
                });
            }
            Input::Decide { event_id, reason } => {
                let proposed = decline(*reason);
                let earlier = retried(|| store.put_outcome_if_absent(event_id, &proposed)).await;
                tell(Ack::Decided {
                    event_id: event_id.clone(),
                    outcome: earlier.unwrap_or(proposed),
                });
            }
            Input::Done { event_id } => {
                retried(|| store.mark_done(event_id)).await;
                tell(Ack::Done {
                    event_id: event_id.clone(),
                });
            }
            Input::Cursor { record_seq } => {
                let cursor = OutboxCursor {
                    record_seq: *record_seq,
                    entry_index: 0,
                };
                retried(|| store.set_outbox_cursor(cursor)).await;
                tell(Ack::Cursor {
                    record_seq: *record_seq,
                });
            }
            Input::Notice {
                user,
                txn_id,
                now_ms,
            } => {
                retried(|| {
                    store.queue_notice(
                        USERS[*user].try_into().unwrap(),
                        txn_id.as_str().into(),
                        "a top-up arrived",
                        *now_ms,
                        WaitingNoticeBounds::default(),
                    )
                })
                .await;
                tell(Ack::Notice {
                    user: *user,
                    txn_id: txn_id.clone(),
                });
            }
        }
    }
    told
}

async fn notice_ids(store: &PaymentStore, user: usize) -> Vec<String> {
    store
        .waiting_notices(
            USERS[user].try_into().unwrap(),
            0,
            WaitingNoticeBounds::default(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|(_, n)| n.txn_id.to_string())
        .collect()
}

/// Everything in `acked` is in `store` as acknowledged.
fn check_acknowledged(
    store: &PaymentStore,
    acked: &[Ack],
    history: &HashMap<usize, Vec<Vec<u8>>>,
    notices: &HashMap<usize, Vec<String>>,
) {
    let mut last_version: HashMap<usize, usize> = HashMap::new();
    for ack in acked {
        match ack {
            Ack::PinSet { user } => {
                assert!(store.pin(USERS[*user]).unwrap().is_some(), "{ack:?} lost");
            }
            Ack::Pin {
                user,
                event_id,
                result,
                version,
            } => {
                assert_eq!(
                    store.outcome(event_id).unwrap(),
                    Some(EventOutcome::PinChecked { attempt: *result }),
                    "the told result of {event_id} is not what survived"
                );
                last_version.insert(*user, *version);
            }
            Ack::Decided { event_id, outcome } => {
                assert_eq!(
                    store.outcome(event_id).unwrap().as_ref(),
                    Some(outcome),
                    "the told decision on {event_id} is not what survived"
                );
            }
            Ack::Done { event_id } => {
                assert!(store.is_done(event_id).unwrap(), "{ack:?} lost");
            }
            Ack::Cursor { record_seq } => {
                let cursor = store.outbox_cursor().unwrap();
                assert!(
                    cursor.is_some_and(|c| c.record_seq >= *record_seq),
                    "the outbox cursor went back to {cursor:?} from {record_seq}"
                );
            }
            Ack::Notice { user, txn_id } => {
                assert!(
                    notices[user].contains(txn_id),
                    "the queued notice {txn_id} was lost"
                );
            }
        }
    }
    // A PIN record is never older than the one the last told attempt left: the attempt
    // counter never goes back.
    for (user, acked_version) in last_version {
        let bytes = store.pin_versioned(USERS[user]).unwrap().unwrap().1;
        let found = history[&user].iter().rposition(|v| *v == bytes);
        assert!(
            found.is_some_and(|at| at >= acked_version),
            "{}'s PIN record went back to version {found:?} of {}, before the told {acked_version}",
            USERS[user],
            history[&user].len()
        );
    }
}

fn one_run(seed: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut rng = StdRng::seed_from_u64(seed);
        let inputs = random_inputs(&mut rng);
        let cut = PowerCut::<Ack>::new(&["payments"], seed)
            .torn_tails(rng.gen_bool(0.5))
            .failing_syncs(if rng.gen_bool(0.75) { 0.3 } else { 0.0 });
        let mut history = HashMap::new();
        let (before, final_records) = {
            let store = PaymentStore::open(&cut.dir("payments")).unwrap();
            let told = handle_all(&store, &inputs, &mut |ack| cut.ack(ack), &mut history).await;
            let records: Vec<_> = (0..USERS.len())
                .map(|u| store.pin_versioned(USERS[u]).unwrap().unwrap().1)
                .collect();
            (told, records)
        };
        let survived = cut.cut();
        let context = format!(
            "seed {seed}: cut after durable flush {} of {}",
            survived.point, survived.flushes
        );
        let store = PaymentStore::open(&cut.dir("payments")).unwrap();
        let mut notices = HashMap::new();
        for user in 0..USERS.len() {
            notices.insert(user, notice_ids(&store, user).await);
        }
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_acknowledged(&store, &survived.acked, &history, &notices)
        }));
        if checked.is_err() {
            panic!("{context}: something acknowledged was lost");
        }

        // The homeserver delivers every event again; a decision proposed again differently
        // must not replace the one told.
        let replayed: Vec<Input> = inputs
            .iter()
            .map(|input| match input {
                Input::Decide { event_id, reason } => Input::Decide {
                    event_id: event_id.clone(),
                    reason: reason + 1,
                },
                other => other.clone(),
            })
            .collect();
        let mut told_again = Vec::new();
        let mut again_history = history.clone();
        let after = handle_all(
            &store,
            &replayed,
            &mut |ack| told_again.push(ack),
            &mut again_history,
        )
        .await;
        assert_eq!(
            after, before,
            "{context}: a PIN event handled again ended otherwise (counted twice or lost)"
        );
        for (user, expected) in final_records.iter().enumerate() {
            let bytes = store.pin_versioned(USERS[user]).unwrap().unwrap().1;
            assert_eq!(
                &bytes, expected,
                "{context}: {}'s PIN record differs from the uncut run's",
                USERS[user]
            );
        }
        for ack in &survived.acked {
            if let Ack::Decided { event_id, outcome } = ack {
                let again = told_again.iter().find_map(|a| match a {
                    Ack::Decided {
                        event_id: id,
                        outcome,
                    } if id == event_id => Some(outcome),
                    _ => None,
                });
                assert_eq!(
                    again,
                    Some(outcome),
                    "{context}: {event_id} was decided again"
                );
            }
        }
        for user in 0..USERS.len() {
            let ids = notice_ids(&store, user).await;
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                ids.len(),
                unique.len(),
                "{context}: a notice was queued twice"
            );
        }
    });
}

#[test]
fn power_cuts_lose_no_told_pin_attempt_or_decision_and_count_nothing_twice() {
    crate::sled_open::powercut::run_many("payment store", one_run);
}
