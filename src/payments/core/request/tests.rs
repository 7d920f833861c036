//! Table tests of the request decisions, with the clock as a number.

use ruma::{owned_event_id, owned_room_id, user_id, OwnedUserId, UserId};
use rust_decimal::Decimal;

use super::*;
use crate::ledger::{Currencies, CurrencySpec, LedgerSettings};
use crate::payments::core::OutgoingBody;
use crate::requests::{plan_split, NewRequest, RequestLimits, SplitShares};

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

fn new(now_ms: u64) -> NewRequest<'static> {
    NewRequest {
        id: RequestId(owned_event_id!("$req")),
        room_id: owned_room_id!("!room"),
        requester: user("alice"),
        bot: user_id!("@_mxpay:s"),
        memo: Some("pizza".into()),
        expires_at_ms: None,
        now_ms,
    }
}

fn member(_: &UserId) -> bool {
    true
}

fn single() -> Request {
    let amount = currencies().parse(Decimal::new(1200, 2), "EUR").unwrap();
    Request::asking(
        new(NOW),
        user("bob"),
        amount,
        &member,
        &RequestLimits::default(),
    )
    .unwrap()
}

fn split() -> Request {
    let shares = SplitShares::Even {
        total: Decimal::new(10000, 2),
        people: vec![user("a"), user("b"), user("c")],
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
    Request::splitting(new(NOW), &plan, &member, &RequestLimits::default()).unwrap()
}

fn ev(sender: &str, event: &str) -> EventRef {
    EventRef {
        room_id: owned_room_id!("!room"),
        event_id: OwnedEventId::try_from(event).unwrap(),
        sender: user(sender),
    }
}

fn content(out: &Outgoing) -> &Value {
    match &out.body {
        OutgoingBody::Event { content, .. } => content,
        OutgoingBody::Notice { .. } => panic!("a notice"),
    }
}

/// The request is posted so it notifies: an `m.text` mentioning the payer (never an
/// `m.notice`), the typed request, and a DM message mentioning the payer; each linked.
#[test]
fn a_request_is_posted_as_mentions_and_linked() {
    let request = single();
    let dms = [(user("bob"), owned_room_id!("!bobdm"))];
    let decision = announce(&ev("alice", "$req"), &request, 2, false, &dms, NOW);
    assert_eq!(
        decision.purposes(),
        ["request-notice", "request-event", "request-dm"]
    );
    let notice = content(&decision.sends[0]);
    assert_eq!(notice["msgtype"], "m.text");
    assert_eq!(notice["m.mentions"]["user_ids"], json!(["@bob:s"]));
    let body = notice["body"].as_str().unwrap();
    assert!(
        body.starts_with("💸 @alice:s asks @bob:s for 12.00 EUR (pizza)."),
        "{body}"
    );
    assert!(body.contains("⏳ @bob:s 12.00 EUR\nStatus: open"), "{body}");
    let typed = content(&decision.sends[1]);
    assert_eq!(typed["payer"], "@bob:s");
    assert_eq!(typed["payee"], "@alice:s");
    assert_eq!(typed["amount"], "12.00");
    assert_eq!(typed["expires_at_ms"], NOW + 7 * 24 * 3_600_000);
    assert_eq!(decision.sends[2].room_id, owned_room_id!("!bobdm"));
    assert_eq!(
        content(&decision.sends[2])["m.mentions"]["user_ids"],
        json!(["@bob:s"])
    );
    let roles: Vec<_> = decision
        .sends
        .iter()
        .map(|s| s.link.as_ref().unwrap().1.as_str())
        .collect();
    assert_eq!(roles, ["notice", "event:@bob:s", "dm"]);
    assert_eq!(decision.finish, Some(owned_event_id!("$req")));
    // A client's own request event is the typed event: only the notice is posted.
    let from_client = announce(&ev("alice", "$req"), &request, 2, true, &[], NOW);
    assert_eq!(from_client.purposes(), ["request-notice"]);
}

/// The split's summary says who takes the remainder and lists every share.
#[test]
fn a_split_summary_names_the_remainder_and_each_share() {
    let request = split();
    let text = notice_text(&request, 2, NOW);
    assert!(
        text.contains("splits 100.00 EUR (pizza): 33.34 from @a:s, 33.33 from @b:s and @c:s."),
        "{text}"
    );
    assert!(
        text.contains("⏳ @a:s 33.34 EUR\n⏳ @b:s 33.33 EUR\n⏳ @c:s 33.33 EUR\nStatus: open"),
        "{text}"
    );
    let decision = announce(&ev("alice", "$req"), &request, 2, false, &[], NOW);
    assert_eq!(
        decision.purposes(),
        [
            "request-notice",
            "request-event",
            "request-event",
            "request-event"
        ]
    );
    assert_eq!(
        content(&decision.sends[0])["m.mentions"]["user_ids"],
        json!(["@a:s", "@b:s", "@c:s"])
    );
}

/// Who may pay, and what: the table of refusals, in precedence order, with a manual clock.
#[test]
fn paying_a_request_table() {
    let open = single();
    let (paying, terms) = pay_terms(Some(&open), user_id!("@bob:s"), 7, NOW).unwrap();
    assert_eq!(terms.amount_minor, 1200);
    assert_eq!(terms.payee, user("alice"));
    let paid = paying.record_paid(user_id!("@bob:s"), 7, NOW + 1).unwrap();
    let declined = open.decline(user_id!("@bob:s"), NOW).unwrap();
    let cancelled = open.cancel(user_id!("@alice:s"), NOW).unwrap();
    let week = 7 * 24 * 3_600_000;
    type Case<'a> = (
        &'a str,
        Option<&'a Request>,
        &'a str,
        u128,
        u64,
        Option<RequestRefusal>,
    );
    let cases: [Case<'_>; 10] = [
        (
            "unknown target",
            None,
            "@bob:s",
            1,
            NOW,
            Some(RequestRefusal::ReplyTargetUnknown),
        ),
        (
            "the requester",
            Some(&open),
            "@alice:s",
            1,
            NOW,
            Some(RequestRefusal::RequestFromSelf),
        ),
        (
            "someone else",
            Some(&open),
            "@carol:s",
            1,
            NOW,
            Some(RequestRefusal::NotThePayer),
        ),
        ("the payer", Some(&open), "@bob:s", 1, NOW, None),
        (
            "retry of the same payment",
            Some(&paying),
            "@bob:s",
            7,
            NOW,
            None,
        ),
        (
            "a second payment while the first waits",
            Some(&paying),
            "@bob:s",
            8,
            NOW,
            Some(RequestRefusal::RequestPaymentPending),
        ),
        (
            "paying twice",
            Some(&paid),
            "@bob:s",
            9,
            NOW,
            Some(RequestRefusal::RequestAlreadyPaid),
        ),
        (
            "declined",
            Some(&declined),
            "@bob:s",
            1,
            NOW,
            Some(RequestRefusal::RequestDeclined),
        ),
        (
            "cancelled",
            Some(&cancelled),
            "@bob:s",
            1,
            NOW,
            Some(RequestRefusal::RequestCancelled),
        ),
        (
            "lapsed (clock moved a week)",
            Some(&open),
            "@bob:s",
            1,
            NOW + week,
            Some(RequestRefusal::RequestExpired),
        ),
    ];
    for (what, request, payer, transfer, now_ms, expected) in cases {
        let payer = UserId::parse(payer).unwrap();
        let got = pay_terms(request, &payer, transfer, now_ms).err();
        assert_eq!(got, expected, "{what}");
    }
    // A minute before the week is over it still pays.
    assert!(pay_terms(Some(&open), user_id!("@bob:s"), 1, NOW + week - 60_000).is_ok());
}

/// A refusal is recorded first (first wins), then a typed receipt with the reason code and
/// the sentence as a reply.
#[test]
fn a_refusal_is_recorded_then_said_with_its_code() {
    let decision = refuse_request(
        &ev("alice", "$ask"),
        user_id!("@alice:s"),
        Decimal::new(1200, 2),
        "EUR",
        RequestRefusal::RequestFromSelf,
        "request not made",
    );
    assert!(matches!(
        &decision.record[..],
        [Record::OutcomeIfAbsent { outcome: EventOutcome::Declined(r), .. }] if r.reason == "request_from_self"
    ));
    let receipt = decision.sends[0]
        .payload("org.mxpay.receipt")
        .expect("a receipt");
    assert_eq!(receipt["reason"], "request_from_self");
    assert_eq!(receipt["status"], "declined");
    assert_eq!(
        decision.texts(),
        ["❌ @alice:s: request not made: you cannot ask yourself for money (to count your own share of a split, add +me)"]
    );
}

/// Each change records the transition, sends a status and edits the notice; a decline tells
/// the requester (a mention), a cancel the payers still open, a payment nobody (its receipt
/// does), an abandoned payment only edits.
#[test]
fn changes_are_recorded_edited_and_told() {
    let open = single();
    let posted = Posted {
        notice: Some(owned_event_id!("$notice")),
        events: vec![(user("bob"), owned_event_id!("$typed"))],
    };
    let declined = open.decline(user_id!("@bob:s"), NOW).unwrap();
    let by = ev("bob", "$no");
    let decision = changed(
        &open,
        &declined,
        Some(user_id!("@bob:s")),
        Change::Declined,
        Some(&by),
        "$no",
        &posted,
        2,
        NOW,
    );
    assert!(
        matches!(&decision.store[..], [Record::RequestUpdate { acted_by: Some(e), .. }] if e == "$no")
    );
    assert_eq!(
        decision.purposes(),
        ["request-status", "request-edit", "request-tell"]
    );
    let status = content(&decision.sends[0]);
    assert_eq!(status["status"], "declined");
    assert_eq!(status["payer_status"], "declined");
    assert_eq!(status["m.relates_to"]["event_id"], "$typed");
    let edit = content(&decision.sends[1]);
    assert_eq!(edit["m.relates_to"]["rel_type"], "m.replace");
    assert_eq!(edit["m.relates_to"]["event_id"], "$notice");
    assert_eq!(edit["m.mentions"], json!({}));
    assert!(edit["m.new_content"]["body"]
        .as_str()
        .unwrap()
        .ends_with("❌ @bob:s 12.00 EUR\nStatus: declined"));
    assert_eq!(
        content(&decision.sends[2])["m.mentions"]["user_ids"],
        json!(["@alice:s"])
    );
    assert_eq!(decision.finish, Some(owned_event_id!("$no")));

    let cancelled = open.cancel(user_id!("@alice:s"), NOW).unwrap();
    let decision = changed(
        &open,
        &cancelled,
        None,
        Change::Cancelled,
        Some(&ev("alice", "$stop")),
        "$stop",
        &posted,
        2,
        NOW,
    );
    assert_eq!(content(&decision.sends[0])["status"], "cancelled");
    assert_eq!(
        content(&decision.sends[2])["m.mentions"]["user_ids"],
        json!(["@bob:s"])
    );

    let (paying, _) = pay_terms(Some(&open), user_id!("@bob:s"), 7, NOW).unwrap();
    let paid = paying.record_paid(user_id!("@bob:s"), 7, NOW).unwrap();
    let decision = changed(
        &paying,
        &paid,
        Some(user_id!("@bob:s")),
        Change::Paid { transfer_id: 7 },
        None,
        "7-posted",
        &posted,
        2,
        NOW,
    );
    assert_eq!(decision.purposes(), ["request-status", "request-edit"]);
    assert_eq!(content(&decision.sends[0])["transfer_id"], "7");
    assert_eq!(content(&decision.sends[0])["paid_count"], 1);
    assert_eq!(decision.finish, None);

    let reopened = paying.abandon_payment(user_id!("@bob:s"), 7, NOW).unwrap();
    let decision = changed(
        &paying,
        &reopened,
        Some(user_id!("@bob:s")),
        Change::Abandoned,
        None,
        "7-voided",
        &posted,
        2,
        NOW,
    );
    assert_eq!(decision.purposes(), ["request-edit"]);
}

/// Reactions and reply commands map to actions; `!accept` and `!refund` are not requests'.
#[test]
fn actions_of_replies_and_reactions() {
    assert_eq!(Action::of_reply(ReplyAction::Pay), Some(Action::Pay));
    assert_eq!(
        Action::of_reply(ReplyAction::Decline),
        Some(Action::Decline)
    );
    assert_eq!(Action::of_reply(ReplyAction::Cancel), Some(Action::Cancel));
    assert_eq!(Action::of_reply(ReplyAction::Accept), None);
    assert_eq!(Action::of_reaction(Reaction::Yes), Action::Pay);
    assert_eq!(Action::of_reaction(Reaction::No), Action::Decline);
}
