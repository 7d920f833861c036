use ruma::{owned_event_id, owned_room_id, OwnedEventId};

use super::super::decision::OutgoingBody;
use super::*;
use crate::payments::core::fixtures;
use crate::store::payments::ChallengeKind;

const WINDOW: u64 = 86_400_000;

fn record(state: HeldState) -> HeldRecord {
    let mut challenge = fixtures::challenge(7, ChallengeKind::Pay, 120_000);
    challenge.payee = "@bob:hs".into();
    let mut record = new_record(&challenge, 120_000 + WINDOW).expect("payee is a user id");
    record.state = state;
    record.notice_event_id = Some(owned_event_id!("$notice"));
    record
}

fn by(user: &str, event: &str) -> EventRef {
    EventRef {
        room_id: owned_room_id!("!room:hs"),
        event_id: OwnedEventId::try_from(event).unwrap(),
        sender: user.try_into().unwrap(),
    }
}

fn facts(event: &EventRef, action: HeldAction, now_ms: u64) -> AnswerFacts<'_> {
    AnswerFacts {
        event,
        action,
        trust: Ok(()),
        reservation: ReservationState::Pending,
        now_ms,
        accept_window_ms: WINDOW,
        frozen: false,
    }
}

fn code(answer: &Answer) -> Option<ReceiptReason> {
    match answer {
        Answer::Refused(reason, _) => Some(*reason),
        Answer::Settle(_) => None,
    }
}

#[test]
fn the_pin_holds_it_and_mentions_the_payee() {
    let record = record(HeldState::AwaitingPin);
    let pin = fixtures::event_in("!dm:hs", "$pin");
    let decision = on_pin(&pin, &record, WINDOW);
    assert!(decision.ledger.is_empty(), "nothing is posted at the PIN");
    assert!(matches!(&decision.store[0], Record::Held(r) if r.state == HeldState::Held));
    assert_eq!(
        decision.store.len(),
        1,
        "the challenge goes once the notice is out"
    );
    assert_eq!(
        decision.purposes(),
        ["held-notice", "held-receipt", "held-payer"]
    );
    let OutgoingBody::Event { content, .. } = &decision.sends[0].body else {
        panic!("the notice is an m.text");
    };
    assert_eq!(content["msgtype"], "m.text");
    assert_eq!(content["m.mentions"]["user_ids"][0], "@bob:hs");
    assert!(content["body"].as_str().unwrap().contains("24 hours"));
    assert_eq!(decision.sends[0].held_notice_of, Some(TransferId(7)));
    let OutgoingBody::Event { content, .. } = &decision.sends[1].body else {
        panic!("a typed receipt");
    };
    assert_eq!(content["status"], "held");
    assert_eq!(decision.sends[2].room_id, owned_room_id!("!dm:hs"));
}

/// The refusal table, in precedence order.
#[test]
fn who_may_answer_and_when() {
    let held = record(HeldState::Held);
    let bob = by("@bob:hs", "$yes");
    let carol = by("@carol:hs", "$c");
    let end = held.return_at_ms;
    let table: Vec<(&HeldRecord, AnswerFacts<'_>, Option<ReceiptReason>)> = vec![
        (&held, facts(&bob, HeldAction::Accept, 0), None),
        (&held, facts(&bob, HeldAction::Decline, end - 1), None),
        (
            &held,
            facts(&carol, HeldAction::Accept, 0),
            Some(ReceiptReason::NotThePayee),
        ),
        (
            &held,
            AnswerFacts {
                trust: Err((ReceiptReason::UntrustedDevice, "untrusted")),
                ..facts(&bob, HeldAction::Accept, 0)
            },
            Some(ReceiptReason::UntrustedDevice),
        ),
        (
            &held,
            AnswerFacts {
                trust: Err((ReceiptReason::UntrustedDevice, "untrusted")),
                ..facts(&carol, HeldAction::Accept, 0)
            },
            Some(ReceiptReason::NotThePayee),
        ),
        (
            &held,
            facts(&bob, HeldAction::Accept, end),
            Some(ReceiptReason::AcceptanceWindowPassed),
        ),
        (
            &held,
            AnswerFacts {
                reservation: ReservationState::Expired,
                ..facts(&bob, HeldAction::Accept, 0)
            },
            Some(ReceiptReason::AcceptanceWindowPassed),
        ),
        (
            &held,
            AnswerFacts {
                reservation: ReservationState::Posted,
                ..facts(&bob, HeldAction::Decline, 0)
            },
            Some(ReceiptReason::PaymentAlreadySettled),
        ),
        (
            &held,
            AnswerFacts {
                frozen: true,
                ..facts(&bob, HeldAction::Accept, 0)
            },
            Some(ReceiptReason::AccountFrozen),
        ),
        (
            &held,
            AnswerFacts {
                frozen: true,
                ..facts(&bob, HeldAction::Decline, 0)
            },
            None,
        ),
    ];
    for (n, (record, facts, expected)) in table.into_iter().enumerate() {
        assert_eq!(code(&answer(record, facts)), expected, "row {n}");
    }
}

#[test]
fn accepting_posts_declining_voids_and_twice_is_refused() {
    let held = record(HeldState::Held);
    let bob = by("@bob:hs", "$yes");
    let Answer::Settle(accept) = answer(&held, facts(&bob, HeldAction::Accept, 5)) else {
        panic!("accepted");
    };
    assert_eq!(accept.ledger, vec![LedgerOp::Post(TransferId(7))]);
    assert!(accept.poke_outbox);
    assert_eq!(accept.finish, Some(owned_event_id!("$yes")));
    let Record::Held(after) = &accept.record[0] else {
        panic!("the record moves first");
    };
    assert_eq!(
        after.state,
        HeldState::Accepted {
            by: owned_event_id!("$yes")
        }
    );
    // The edit of the notice says so.
    let OutgoingBody::Event { content, .. } = &accept.sends[0].body else {
        panic!("an edit");
    };
    assert_eq!(content["m.relates_to"]["rel_type"], "m.replace");
    assert!(content["m.new_content"]["body"]
        .as_str()
        .unwrap()
        .contains("accepted"));

    // The same event again: the same decision (the ledger posts once); another: refused.
    let accepted = (**after).clone();
    assert_eq!(
        answer(
            &accepted,
            AnswerFacts {
                reservation: ReservationState::Posted,
                ..facts(&bob, HeldAction::Accept, 6)
            }
        ),
        Answer::Settle(accept.clone())
    );
    let again = by("@bob:hs", "$again");
    assert_eq!(
        code(&answer(
            &accepted,
            AnswerFacts {
                reservation: ReservationState::Posted,
                ..facts(&again, HeldAction::Accept, 6)
            }
        )),
        Some(ReceiptReason::PaymentAlreadySettled)
    );

    let no = by("@bob:hs", "$no");
    let Answer::Settle(decline) = answer(&held, facts(&no, HeldAction::Decline, 5)) else {
        panic!("declined");
    };
    assert_eq!(decline.ledger, vec![LedgerOp::Void(TransferId(7))]);
    assert!(decline.record.contains(&Record::VoidReason {
        transfer_id: TransferId(7),
        reason: ReceiptReason::PayeeDeclined
    }));
}

#[test]
fn the_sweep_releases_unconfirmed_and_returns_unaccepted() {
    let waiting = record(HeldState::AwaitingPin);
    assert_eq!(sweep(&waiting, WINDOW, waiting.pin_deadline_ms - 1), None);
    let lapsed = sweep(&waiting, WINDOW, waiting.pin_deadline_ms).expect("due");
    assert_eq!(lapsed.ledger, vec![LedgerOp::Void(TransferId(7))]);
    assert!(lapsed.record.contains(&Record::VoidReason {
        transfer_id: TransferId(7),
        reason: ReceiptReason::Timeout
    }));
    // Confirmed but never told (its sends failed until the PIN window passed): told now.
    let mut untold = record(HeldState::Held);
    untold.notice_event_id = None;
    assert_eq!(sweep(&untold, WINDOW, untold.pin_deadline_ms - 1), None);
    let told = sweep(&untold, WINDOW, untold.pin_deadline_ms).expect("due");
    assert!(told.ledger.is_empty());
    assert_eq!(told.purposes(), ["held-notice", "held-receipt"]);
    let held = record(HeldState::Held);
    assert_eq!(sweep(&held, WINDOW, held.pin_deadline_ms), None);
    assert_eq!(sweep(&held, WINDOW, held.return_at_ms - 1), None);
    let returned = sweep(&held, WINDOW, held.return_at_ms).expect("due");
    assert!(returned.record.contains(&Record::VoidReason {
        transfer_id: TransferId(7),
        reason: ReceiptReason::AcceptanceWindowPassed
    }));
    assert_eq!(returned.purposes(), ["held-ended"]);
    let accepted = record(HeldState::Accepted {
        by: owned_event_id!("$yes"),
    });
    assert_eq!(sweep(&accepted, WINDOW, u64::MAX), None);
}

#[test]
fn what_the_outbox_says_when_the_reservation_ends() {
    let held = record(HeldState::Held);
    let (status, reason, _) = ended_receipt(&held, "expired").unwrap();
    assert_eq!(
        (status, reason),
        (
            ReceiptStatus::Expired,
            Some(ReceiptReason::AcceptanceWindowPassed)
        )
    );
    let accepted = record(HeldState::Accepted {
        by: owned_event_id!("$yes"),
    });
    assert_eq!(
        ended_receipt(&accepted, "posted").unwrap().0,
        ReceiptStatus::Completed
    );
    let declined = record(HeldState::Declined {
        by: owned_event_id!("$no"),
    });
    assert_eq!(
        ended_receipt(&declined, "voided").unwrap().1,
        Some(ReceiptReason::PayeeDeclined)
    );
    // Ended before the PIN (cancelled, refused): told like any payment, with its reason.
    assert_eq!(
        ended_receipt(&record(HeldState::AwaitingPin), "voided"),
        None
    );
    // Released by the sweep at the end of the PIN window: told as expired without a PIN.
    let lapsed = ended_receipt(&record(HeldState::Lapsed), "voided").unwrap();
    assert_eq!(
        (lapsed.0, lapsed.1),
        (ReceiptStatus::Expired, Some(ReceiptReason::Timeout))
    );
    // Expired while held: the record says returned and the notice is edited.
    let decision = ended(&held, "expired", WINDOW);
    assert!(matches!(&decision.store[0], Record::Held(r) if r.state == HeldState::Returned));
    assert_eq!(decision.purposes(), ["held-ended"]);
    assert_eq!(ended(&accepted, "posted", WINDOW), Decision::none());
}

#[test]
fn durations_read_well() {
    assert_eq!(describe_ms(86_400_000), "24 hours");
    assert_eq!(describe_ms(60_000), "1 minute");
    assert_eq!(describe_ms(1_500), "2 seconds");
}
