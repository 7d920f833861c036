//! The request state machine: examples of each rule, and a property test over random sequences
//! of transitions checked against the rules themselves (final states stay final, a payer pays at
//! most once, nothing is paid after a cancel or the expiry unless it was already waiting for a
//! PIN, a refused transition changes nothing).

use std::str::FromStr;

use matrix_sdk::ruma::{owned_event_id, owned_room_id, user_id, OwnedUserId, UserId};
use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;
use crate::events::{PaymentRequestEventContent, RequestState};
use crate::ledger::{Currencies, CurrencySpec, LedgerSettings};

const NOW: u64 = 1_800_000_000_000;

fn currencies() -> Currencies {
    Currencies::from_settings(&LedgerSettings {
        currencies: vec![CurrencySpec {
            code: "EUR".into(),
            exponent: 2,
            max_transfer: None,
            max_per_24h: None,
        }],
    })
    .unwrap()
}

fn user(name: &str) -> OwnedUserId {
    OwnedUserId::try_from(format!("@{name}:s")).unwrap()
}

fn new_request(expires_at_ms: Option<u64>) -> NewRequest<'static> {
    NewRequest {
        id: RequestId(owned_event_id!("$req")),
        room_id: owned_room_id!("!room"),
        requester: user("alice"),
        bot: user_id!("@_mxpay:s"),
        memo: Some("pizza".into()),
        expires_at_ms,
        now_ms: NOW,
    }
}

fn everyone_in_room(_: &UserId) -> bool {
    true
}

fn single(payer: &str) -> Request {
    let amount = currencies().parse(Decimal::new(1200, 2), "EUR").unwrap();
    Request::asking(
        new_request(None),
        user(payer),
        amount,
        &everyone_in_room,
        &RequestLimits::default(),
    )
    .unwrap()
}

fn split(payers: &[&str]) -> Request {
    let shares = SplitShares::Even {
        total: Decimal::from(100),
        people: payers.iter().map(|p| user(p)).collect(),
        with_me: false,
    };
    let plan = plan_split(
        &shares,
        "EUR",
        user_id!("@alice:s"),
        user_id!("@_mxpay:s"),
        &currencies(),
    )
    .unwrap();
    Request::splitting(
        new_request(None),
        &plan,
        &everyone_in_room,
        &RequestLimits::default(),
    )
    .unwrap()
}

fn open_to_everyone(payers_max: u32) -> Request {
    let content = PaymentRequestEventContent {
        body: "@alice:s requests 4.20 EUR".into(),
        payee: user("alice"),
        amount: Decimal::new(420, 2),
        currency: "EUR".into(),
        payer: None,
        memo: Some("coffee".into()),
        expires_at_ms: Some(NOW + 3_600_000),
        order_ref: None,
    };
    let limits = RequestLimits {
        everyone_payers_max: payers_max,
        ..RequestLimits::default()
    };
    Request::from_event(
        new_request(None),
        &content,
        &currencies(),
        &everyone_in_room,
        &limits,
    )
    .unwrap()
}

#[test]
fn a_single_request_is_paid_once_with_the_requests_terms() {
    let request = single("bob");
    assert_eq!(request.expires_at_ms, NOW + REQUEST_EXPIRY_DEFAULT_MS);
    assert_eq!(request.status(NOW), RequestState::Open);
    let bob = user_id!("@bob:s");
    let (paying, terms) = request.start_payment(bob, 11, NOW + 1).unwrap();
    assert_eq!(
        (
            terms.payee.as_str(),
            terms.amount_minor,
            terms.currency.as_str()
        ),
        ("@alice:s", 1200, "EUR")
    );
    assert_eq!(paying.status(NOW + 1), RequestState::Open);
    // The same paying event again: the same answer; another one: refused while it waits.
    assert_eq!(paying.start_payment(bob, 11, NOW + 2).unwrap().0, paying);
    assert_eq!(
        paying.start_payment(bob, 12, NOW + 2).unwrap_err(),
        RequestRefusal::RequestPaymentPending
    );
    let paid = paying.record_paid(bob, 11, NOW + 3).unwrap();
    assert_eq!(paid.status(NOW + 3), RequestState::Paid);
    assert_eq!(
        paid.record_paid(bob, 11, NOW + 4).unwrap(),
        paid,
        "told twice: once"
    );
    assert_eq!(
        paid.start_payment(bob, 13, NOW + 4).unwrap_err(),
        RequestRefusal::RequestAlreadyPaid
    );
    assert_eq!(
        paid.record_paid(bob, 13, NOW + 4),
        Err(NoSuchPayment { transfer_id: 13 })
    );
    assert_eq!(paid.paid_count(), 1);
    assert_eq!(
        paid.cancel(user_id!("@alice:s"), NOW + 5).unwrap_err(),
        RequestRefusal::RequestAlreadyPaid
    );
}

#[test]
fn who_may_do_what() {
    let request = single("bob");
    let (alice, carol) = (user_id!("@alice:s"), user_id!("@carol:s"));
    assert_eq!(
        request.start_payment(alice, 1, NOW).unwrap_err(),
        RequestRefusal::RequestFromSelf
    );
    assert_eq!(
        request.start_payment(carol, 1, NOW).unwrap_err(),
        RequestRefusal::NotThePayer
    );
    assert_eq!(
        request.decline(carol, NOW).unwrap_err(),
        RequestRefusal::NotThePayer
    );
    assert_eq!(
        request.decline(alice, NOW).unwrap_err(),
        RequestRefusal::NotThePayer
    );
    assert_eq!(
        request.cancel(user_id!("@bob:s"), NOW).unwrap_err(),
        RequestRefusal::NotTheRequester
    );
}

#[test]
fn creation_is_checked() {
    let amount = currencies().parse(Decimal::ONE, "EUR").unwrap();
    let limits = RequestLimits::default();
    let ask = |payer: &str, new: NewRequest<'static>, is_member: &dyn Fn(&UserId) -> bool| {
        Request::asking(new, user(payer), amount, is_member, &limits)
    };
    assert_eq!(
        ask("alice", new_request(None), &everyone_in_room).unwrap_err(),
        RequestRefusal::RequestFromSelf
    );
    assert_eq!(
        ask("_mxpay", new_request(None), &everyone_in_room).unwrap_err(),
        RequestRefusal::RequestFromBot
    );
    assert_eq!(
        ask("bob", new_request(None), &|u: &UserId| u != "@bob:s").unwrap_err(),
        RequestRefusal::PayerNotInRoom
    );
    assert_eq!(
        ask("bob", new_request(Some(NOW)), &everyone_in_room).unwrap_err(),
        RequestRefusal::RequestExpired
    );
    let far = ask(
        "bob",
        new_request(Some(NOW + 365 * 86_400_000)),
        &everyone_in_room,
    )
    .unwrap();
    assert_eq!(
        far.expires_at_ms,
        NOW + REQUEST_EXPIRY_MAX_MS,
        "brought forward to the maximum"
    );
    let soon = ask("bob", new_request(Some(NOW + 60_000)), &everyone_in_room).unwrap();
    assert_eq!(soon.expires_at_ms, NOW + 60_000);
    let long_memo = NewRequest {
        memo: Some("x".repeat(141)),
        ..new_request(None)
    };
    assert_eq!(
        ask("bob", long_memo, &everyone_in_room).unwrap_err(),
        RequestRefusal::MemoTooLong
    );

    // A client's event: payee must be the sender; amounts are checked by the currency.
    let content = |payee: &str, amount: &str| PaymentRequestEventContent {
        body: "b".into(),
        payee: user(payee),
        amount: Decimal::from_str(amount).unwrap(),
        currency: "EUR".into(),
        payer: Some(user("bob")),
        memo: None,
        expires_at_ms: None,
        order_ref: None,
    };
    let from = |c: &PaymentRequestEventContent| {
        Request::from_event(
            new_request(None),
            c,
            &currencies(),
            &everyone_in_room,
            &limits,
        )
    };
    assert_eq!(
        from(&content("carol", "1")).unwrap_err().code(),
        "request_payee_not_sender"
    );
    assert_eq!(
        from(&content("alice", "12.345")).unwrap_err().code(),
        "invalid_amount"
    );
    assert_eq!(
        from(&content("alice", "0")).unwrap_err().code(),
        "invalid_amount"
    );
    let request = from(&content("alice", "12.5")).unwrap();
    assert_eq!(request.memo, None, "the event's memo, not the NewRequest's");
    assert_eq!(request.payer_count(), Some(1));
}

#[test]
fn decline_cancel_and_expiry_are_final() {
    let (alice, bob) = (user_id!("@alice:s"), user_id!("@bob:s"));
    let declined = single("bob").decline(bob, NOW + 1).unwrap();
    assert_eq!(declined.status(NOW + 1), RequestState::Declined);
    assert_eq!(
        declined.start_payment(bob, 1, NOW + 2).unwrap_err(),
        RequestRefusal::RequestDeclined
    );
    assert_eq!(
        declined.decline(bob, NOW + 2).unwrap_err(),
        RequestRefusal::RequestDeclined
    );
    assert_eq!(
        declined.cancel(alice, NOW + 2).unwrap_err(),
        RequestRefusal::RequestDeclined
    );

    let cancelled = single("bob").cancel(alice, NOW + 1).unwrap();
    assert_eq!(cancelled.status(NOW + 1), RequestState::Cancelled);
    assert_eq!(
        cancelled.start_payment(bob, 1, NOW + 2).unwrap_err(),
        RequestRefusal::RequestCancelled
    );
    assert_eq!(
        cancelled.cancel(alice, NOW + 2).unwrap_err(),
        RequestRefusal::RequestCancelled
    );

    let request = single("bob");
    let at = request.expires_at_ms;
    assert!(
        request.start_payment(bob, 1, at - 1).is_ok(),
        "open until the last millisecond"
    );
    assert_eq!(
        request.status(at),
        RequestState::Expired,
        "lapsed before it is written down"
    );
    assert_eq!(
        request.start_payment(bob, 1, at).unwrap_err(),
        RequestRefusal::RequestExpired
    );
    assert_eq!(
        request.cancel(alice, at).unwrap_err(),
        RequestRefusal::RequestExpired
    );
    assert_eq!(request.expire(at - 1), (request.clone(), vec![]));
    let (expired, told) = request.expire(at + 5);
    assert_eq!(told, vec![user("bob")]);
    assert_eq!(
        expired.share_of(bob).unwrap().state,
        ShareState::Expired { at_ms: at }
    );
    assert_eq!(
        expired.expire(at + 10).1,
        Vec::<OwnedUserId>::new(),
        "told once"
    );
}

#[test]
fn a_payment_waiting_for_its_pin_outlives_a_cancel() {
    let (alice, bob) = (user_id!("@alice:s"), user_id!("@bob:s"));
    let (paying, _) = single("bob").start_payment(bob, 5, NOW).unwrap();
    let cancelled = paying.cancel(alice, NOW + 1).unwrap();
    assert_eq!(
        cancelled.status(NOW + 1),
        RequestState::Open,
        "bob's PIN may still come"
    );
    // Completed: paid. Abandoned: cancelled, not open again.
    assert_eq!(
        cancelled
            .record_paid(bob, 5, NOW + 2)
            .unwrap()
            .status(NOW + 2),
        RequestState::Paid
    );
    let abandoned = cancelled.abandon_payment(bob, 5, NOW + 2).unwrap();
    assert_eq!(abandoned.status(NOW + 2), RequestState::Cancelled);
    assert_eq!(
        abandoned.start_payment(bob, 6, NOW + 3).unwrap_err(),
        RequestRefusal::RequestCancelled
    );
    // Without a cancel, an abandoned payment leaves the request open to pay again.
    let reopened = paying.abandon_payment(bob, 5, NOW + 1).unwrap();
    assert_eq!(reopened, single("bob"));
    assert!(reopened.start_payment(bob, 6, NOW + 2).is_ok());
    assert_eq!(
        reopened.abandon_payment(bob, 5, NOW + 2),
        Err(NoSuchPayment { transfer_id: 5 })
    );
    // Abandoned after the expiry: expired.
    let late = paying.expires_at_ms + 1;
    assert_eq!(paying.status(late), RequestState::Open);
    assert_eq!(
        paying.abandon_payment(bob, 5, late).unwrap().status(late),
        RequestState::Expired
    );
    assert_eq!(
        paying.decline(bob, NOW + 1).unwrap_err(),
        RequestRefusal::RequestPaymentPending
    );
}

#[test]
fn a_split_tracks_each_payer() {
    let request = split(&["a", "b", "c"]);
    let amounts: Vec<u128> = ["a", "b", "c"]
        .iter()
        .map(|p| request.share_of(&user(p)).unwrap().amount_minor)
        .collect();
    assert_eq!(amounts, vec![3334, 3333, 3333]);
    assert_eq!(request.bill_total_minor, Some(10_000));
    let (a, b, c) = (user("a"), user("b"), user("c"));
    let (r, terms) = request.start_payment(&a, 1, NOW).unwrap();
    assert_eq!(terms.amount_minor, 3334);
    let r = r.record_paid(&a, 1, NOW).unwrap();
    let r = r.decline(&b, NOW).unwrap();
    assert_eq!(r.status(NOW), RequestState::Open, "c has not answered");
    assert_eq!(r.open_payers(NOW), vec![&*c]);
    let (r, _) = r.start_payment(&c, 2, NOW).unwrap();
    let r = r.record_paid(&c, 2, NOW).unwrap();
    assert_eq!(r.status(NOW), RequestState::Declined, "settled, b declined");
    assert_eq!(
        text::split_progress(&r, NOW, |minor| format_minor(minor, 2)),
        "✅ @a:s 33.34\n❌ @b:s 33.33\n✅ @c:s 33.33"
    );
    assert_eq!(r.paid_count(), 2);
    assert!(r.open_payers(NOW).is_empty());
}

#[test]
fn a_request_open_to_everyone_is_paid_once_per_member() {
    let request = open_to_everyone(2);
    assert_eq!(request.payer_count(), None);
    assert_eq!(request.expires_at_ms, NOW + 3_600_000);
    let (bob, carol, dave) = (user("bob"), user("carol"), user("dave"));
    let (r, terms) = request.start_payment(&bob, 1, NOW).unwrap();
    assert_eq!(terms.amount_minor, 420);
    let r = r.record_paid(&bob, 1, NOW).unwrap();
    assert_eq!(
        r.start_payment(&bob, 2, NOW).unwrap_err(),
        RequestRefusal::RequestAlreadyPaid
    );
    assert_eq!(
        r.decline(&carol, NOW).unwrap_err(),
        RequestRefusal::RequestOpenToEveryone
    );
    let (r2, _) = r.start_payment(&carol, 3, NOW).unwrap();
    // Abandoned: carol may pay again.
    let r3 = r2.abandon_payment(&carol, 3, NOW).unwrap();
    assert_eq!(r3, r);
    let r = r2.record_paid(&carol, 3, NOW).unwrap();
    assert_eq!(r.status(NOW), RequestState::Paid, "full");
    assert_eq!(
        r.start_payment(&dave, 4, NOW).unwrap_err(),
        RequestRefusal::RequestFull
    );
    let lapsed = open_to_everyone(10);
    assert_eq!(lapsed.status(lapsed.expires_at_ms), RequestState::Expired);
    assert_eq!(
        lapsed
            .start_payment(&dave, 4, lapsed.expires_at_ms)
            .unwrap_err(),
        RequestRefusal::RequestExpired
    );
    assert!(lapsed.open_payers(NOW).is_empty());
}

/// The stored form is a format: pinned, so a change is deliberate (and migrated).
#[test]
fn stored_form_is_pinned() {
    let bob = user("bob");
    let (r, _) = single("bob").start_payment(&bob, 300, NOW + 1).unwrap();
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(
        json,
        r#"{"id":"$req","room_id":"!room","requester":"@alice:s","currency":"EUR","memo":"pizza","created_ms":1800000000000,"expires_at_ms":1800604800000,"cancelled_ms":null,"bill_total_minor":null,"audience":{"named":{"shares":[{"payer":"@bob:s","amount_minor":1200,"state":{"paying":{"transfer_id":300,"since_ms":1800000000001}}}]}}}"#
    );
    assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
    let everyone = open_to_everyone(3)
        .start_payment(&bob, u128::MAX, NOW)
        .unwrap()
        .0;
    let everyone = everyone.record_paid(&bob, u128::MAX, NOW).unwrap();
    let json = serde_json::to_string(&everyone).unwrap();
    assert!(
        json.contains(r#""audience":{"everyone":{"amount_minor":420,"payers_max":3,"shares":[{"payer":"@bob:s","amount_minor":420,"state":{"paid":{"transfer_id":340282366920938463463374607431768211455,"at_ms":1800000000000}}}]}}"#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), everyone);
    // Typed ids and codes on the way in: a bad user id or currency is no request.
    let bad = json.replace("@bob:s", "bob");
    assert!(serde_json::from_str::<Request>(&bad).is_err());
    let bad = json.replace("\"EUR\"", "\"eur\"");
    assert!(serde_json::from_str::<Request>(&bad).is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Start { who: usize, transfer_id: u128 },
    Paid { who: usize, transfer_id: u128 },
    Abandon { who: usize, transfer_id: u128 },
    Decline { who: usize },
    Cancel { who: usize },
    Expire,
    Wait { ms: u64 },
}

/// Who acts: 0 is the requester, 1..=3 may be payers, 4 is a stranger.
const PEOPLE: [&str; 5] = ["alice", "p1", "p2", "p3", "stranger"];

fn op() -> impl Strategy<Value = Op> {
    let who = 0..PEOPLE.len();
    let tid = 1u128..4;
    prop_oneof![
        4 => (who.clone(), tid.clone()).prop_map(|(who, transfer_id)| Op::Start { who, transfer_id }),
        3 => (who.clone(), tid.clone()).prop_map(|(who, transfer_id)| Op::Paid { who, transfer_id }),
        2 => (who.clone(), tid).prop_map(|(who, transfer_id)| Op::Abandon { who, transfer_id }),
        2 => who.clone().prop_map(|who| Op::Decline { who }),
        1 => who.prop_map(|who| Op::Cancel { who }),
        1 => Just(Op::Expire),
        2 => (0u64..3 * 86_400_000).prop_map(|ms| Op::Wait { ms }),
    ]
}

fn request_of(kind: u8, payers_max: u32) -> Request {
    match kind {
        0 => single("p1"),
        1 => split(&["p1", "p2", "p3"]),
        _ => open_to_everyone(payers_max),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn transitions_keep_the_rules(kind in 0u8..3, payers_max in 1u32..4, ops in proptest::collection::vec(op(), 1..40)) {
        let mut request = request_of(kind, payers_max);
        let mut now = NOW;
        // Per payer: the transfers recorded as paying their share.
        let mut paid_by = std::collections::HashMap::<OwnedUserId, std::collections::HashSet<u128>>::new();
        for op in ops {
            let before = request.clone();
            let status_before = before.status(now);
            let next: Option<Request> = match op {
                Op::Start { who, transfer_id } => {
                    let payer = user(PEOPLE[who]);
                    match before.start_payment(&payer, transfer_id, now) {
                        Ok((next, terms)) => {
                            // Only a payer the request asks, while it takes payments, from
                            // the request's own terms.
                            prop_assert!(who != 0);
                            prop_assert_eq!(&terms.payee, &before.requester);
                            prop_assert_eq!(terms.currency, before.currency);
                            let share = next.share_of(&payer).unwrap();
                            prop_assert_eq!(share.amount_minor, terms.amount_minor);
                            let was_paying = matches!(before.share_of(&payer).map(|s| s.state), Some(ShareState::Paying { transfer_id: t, .. }) if t == transfer_id);
                            if !was_paying {
                                prop_assert!(before.cancelled_ms.is_none(), "paid after a cancel");
                                prop_assert!(!before.is_past_expiry(now), "paid after the expiry");
                                prop_assert_eq!(status_before, RequestState::Open);
                            } else {
                                prop_assert_eq!(&next, &before, "a retry changes nothing");
                            }
                            Some(next)
                        }
                        Err(_) => None,
                    }
                }
                Op::Paid { who, transfer_id } => {
                    let payer = user(PEOPLE[who]);
                    match before.record_paid(&payer, transfer_id, now) {
                        Ok(next) => {
                            let was = before.share_of(&payer).unwrap().state;
                            let was_this = matches!(was, ShareState::Paying { transfer_id: t, .. } | ShareState::Paid { transfer_id: t, .. } if t == transfer_id);
                            prop_assert!(was_this, "recorded a payment that was not waiting: {:?}", was);
                            let is_paid = matches!(next.share_of(&payer).unwrap().state, ShareState::Paid { transfer_id: t, .. } if t == transfer_id);
                            prop_assert!(is_paid);
                            paid_by.entry(payer.clone()).or_default().insert(transfer_id);
                            Some(next)
                        }
                        Err(_) => None,
                    }
                }
                Op::Abandon { who, transfer_id } => before.abandon_payment(&user(PEOPLE[who]), transfer_id, now).ok(),
                Op::Decline { who } => before.decline(&user(PEOPLE[who]), now).ok(),
                Op::Cancel { who } => {
                    let result = before.cancel(&user(PEOPLE[who]), now);
                    if result.is_ok() {
                        prop_assert_eq!(who, 0, "only the requester cancels");
                    }
                    result.ok()
                }
                Op::Expire => Some(before.expire(now).0),
                Op::Wait { ms } => {
                    now += ms;
                    None
                }
            };
            if let Some(next) = next {
                next.assert_invariants();
                // No share leaves a final state.
                for share in before.shares() {
                    let live = before.live_state(share, now);
                    if live.is_final() {
                        let after = next.share_of(&share.payer).expect("a final share stays");
                        prop_assert_eq!(next.live_state(after, now).public(), live.public());
                    }
                }
                // A request that was over stays over, as it was.
                if status_before != RequestState::Open {
                    prop_assert_eq!(next.status(now), status_before);
                }
                // Never more paid than asked.
                let paid: u128 = next
                    .shares()
                    .iter()
                    .filter(|s| matches!(s.state, ShareState::Paid { .. }))
                    .map(|s| s.amount_minor)
                    .sum();
                let asked: u128 = match &next.audience {
                    Audience::Named { shares } => shares.iter().map(|s| s.amount_minor).sum(),
                    Audience::Everyone { amount_minor, payers_max, .. } => amount_minor * u128::from(*payers_max),
                };
                prop_assert!(paid <= asked);
                request = next;
            }
            // The stored form reads back as the same request.
            let json = serde_json::to_vec(&request).unwrap();
            prop_assert_eq!(&serde_json::from_slice::<Request>(&json).unwrap(), &request);
        }
        prop_assert!(paid_by.values().all(|ids| ids.len() <= 1), "paid twice: {:?}", paid_by);
    }
}

/// The reference every payment of a request (and every refund of those) carries in the
/// ledger is pinned: a changed derivation would make a retried payment of an older request
/// name another reference, which the ledger refuses (`ExistsWithDifferentReference`), and
/// would split a request's transfers under two references.
#[test]
fn a_requests_ledger_reference_is_derived_from_its_id_alone_and_pinned() {
    let id = RequestId(owned_event_id!("$ask:example.org"));
    assert_eq!(
        format!("{:032x}", id.ledger_reference()),
        "e9e94b691417aa7bb9d084f3ca25e559",
        "the derivation of request references changed"
    );
    // The same id, however it is held, gives the same reference.
    assert_eq!(id.ledger_reference(), ledger_reference("$ask:example.org"));
    assert_eq!(
        RequestId(owned_event_id!("$ask:example.org")).ledger_reference(),
        id.ledger_reference()
    );
    // Never zero (the ledger's "none"), other ids give others, and it is not the transfer id
    // a payment replying with the same event id would get.
    assert_ne!(id.ledger_reference(), 0);
    assert_ne!(id.ledger_reference(), ledger_reference("$ask2:example.org"));
    assert_ne!(
        id.ledger_reference(),
        crate::ledger::TransferId::from_key("$ask:example.org").0
    );
}
