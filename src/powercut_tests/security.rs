//! Power cuts over the records the security checks answer from: Megolm replay records
//! ([`ReplayStore`]), revoked admin tokens ([`RevokedTokens`]) and claimed provider webhook
//! events ([`EventStore`]). An answer given (a message let through as fresh or refused as a
//! replay, a revoke call answered, a webhook answered new or replay) must still hold after the
//! cut, and every input handled again must get the same answer: a replayed message is never
//! let through, a webhook event is never new twice, a revoked token stays revoked.

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use ruma::{OwnedEventId, OwnedRoomId};

use crate::admin::events::{open_db, Claim, EventStore};
use crate::admin::revoked::RevokedTokens;
use crate::crypto::replay::{MegolmMessageId, MessageCheck, ReplayStore};
use crate::sled_open::powercut::PowerCut;

const T0_MS: u64 = 1_795_000_000_000;
const KEEP_MS: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq)]
enum Input {
    Message {
        session: u32,
        index: u32,
        event_id: OwnedEventId,
    },
    Revoke {
        jti: String,
    },
    Webhook {
        event: u32,
        body: u8,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Message(MessageCheck),
    Revoked,
    Webhook(Claim),
}

struct Stores {
    replay: ReplayStore,
    revoked: RevokedTokens,
    events: EventStore,
}

fn open(cut: &PowerCut<(Input, Answer)>) -> Stores {
    let admin = open_db(&cut.dir("admin")).unwrap();
    Stores {
        replay: ReplayStore::open(&cut.dir("replay")).unwrap(),
        revoked: RevokedTokens::with_db(&admin).unwrap(),
        events: EventStore::with_db(&admin).unwrap(),
    }
}

fn room() -> OwnedRoomId {
    "!room:hs".try_into().unwrap()
}

/// Handles `input` as its caller would: a failed call is retried (bounded).
fn handle(stores: &Stores, input: &Input) -> Answer {
    const ATTEMPTS_MAX: usize = 4;
    let mut last = String::new();
    for _ in 0..ATTEMPTS_MAX {
        let answer = match input {
            Input::Message {
                session,
                index,
                event_id,
            } => stores
                .replay
                .check_and_record(
                    &room(),
                    &MegolmMessageId {
                        session_id: format!("session{session}"),
                        index: *index,
                    },
                    event_id,
                    T0_MS,
                )
                .map(|check| match check {
                    // When a later message was seen varies with what survived: not compared.
                    MessageCheck::Fresh { .. } => Answer::Message(MessageCheck::Fresh {
                        sent_before_ms: None,
                    }),
                    replay => Answer::Message(replay),
                })
                .map_err(|e| e.to_string()),
            Input::Revoke { jti } => stores
                .revoked
                .revoke(jti, T0_MS, KEEP_MS)
                .map(|_| Answer::Revoked)
                .map_err(|e| e.to_string()),
            Input::Webhook { event, body } => stores
                .events
                .claim("acme", &format!("evt_{event}"), &[*body])
                .map(Answer::Webhook)
                .map_err(|e| e.to_string()),
        };
        match answer {
            Ok(answer) => return answer,
            Err(e) => last = e,
        }
    }
    panic!("{input:?} still failing after {ATTEMPTS_MAX} attempts: {last}");
}

/// What `input` must be answered after the cut, given that `told` was answered before it.
fn check_again(input: &Input, told: &Answer, again: &Answer) -> bool {
    match (input, told, again) {
        (Input::Message { .. }, Answer::Message(told), Answer::Message(again)) => told == again,
        (Input::Revoke { .. }, Answer::Revoked, Answer::Revoked) => true,
        // Told new or replay: the claim stands, so the same body is a replay now.
        (Input::Webhook { .. }, Answer::Webhook(Claim::New | Claim::Replay), again) => {
            *again == Answer::Webhook(Claim::Replay)
        }
        (Input::Webhook { .. }, Answer::Webhook(Claim::Conflict), again) => {
            *again == Answer::Webhook(Claim::Conflict)
        }
        _ => false,
    }
}

fn random_inputs(rng: &mut StdRng) -> Vec<Input> {
    (0..rng.gen_range(20..60))
        .map(|i| match rng.gen_range(0..6) {
            0..=2 => Input::Message {
                session: rng.gen_range(0..2),
                index: rng.gen_range(0..6),
                event_id: format!("$m{i}").try_into().unwrap(),
            },
            3 => Input::Revoke {
                jti: format!("jti{}", rng.gen_range(0..5)),
            },
            _ => Input::Webhook {
                event: rng.gen_range(0..5),
                body: rng.gen_range(0..2),
            },
        })
        .collect()
}

fn one_run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let inputs = random_inputs(&mut rng);
    let cut = PowerCut::<(Input, Answer)>::new(&["replay", "admin"], seed)
        .torn_tails(rng.gen_bool(0.5))
        .failing_syncs(if rng.gen_bool(0.75) { 0.3 } else { 0.0 });
    {
        let stores = open(&cut);
        for input in &inputs {
            let answer = handle(&stores, input);
            cut.ack((input.clone(), answer));
        }
    }
    let survived = cut.cut();
    let context = format!(
        "seed {seed}: cut after durable flush {} of {}",
        survived.point, survived.flushes
    );
    let stores = open(&cut);
    // Every answer given still holds.
    for (input, told) in &survived.acked {
        match (input, told) {
            (Input::Revoke { jti }, _) => assert!(
                stores.revoked.is_revoked(jti).unwrap(),
                "{context}: revoked {jti} is usable again"
            ),
            (
                Input::Message { session, index, .. },
                Answer::Message(MessageCheck::Fresh { .. }),
            ) => {
                let Input::Message { event_id, .. } = input else {
                    unreachable!()
                };
                let probe = handle(
                    &stores,
                    &Input::Message {
                        session: *session,
                        index: *index,
                        event_id: "$probe".try_into().unwrap(),
                    },
                );
                assert_eq!(
                    probe,
                    Answer::Message(MessageCheck::Replay {
                        first_event_id: Some(event_id.clone())
                    }),
                    "{context}: a message let through under {event_id} is fresh again"
                );
            }
            _ => {}
        }
    }
    // Everything delivered again: each answer told before is told again.
    for (input, told) in &survived.acked {
        let again = handle(&stores, input);
        assert!(
            check_again(input, told, &again),
            "{context}: {input:?} was answered {told:?}, now {again:?}"
        );
    }
}

#[test]
fn power_cuts_keep_every_replay_record_revocation_and_webhook_claim_told() {
    crate::sled_open::powercut::run_many("security records", one_run);
}
