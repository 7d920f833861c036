//! Issue 13: payment requests and split bills over real Synapse with real encrypted clients.
//! bob asks alice (funded, with a PIN and a DM) for money; she pays by replying `!pay` or by
//! reacting ✅; the PIN step-up is the usual one; the receipt names the request, the request's
//! notice is edited as it changes.

use matrix_sdk::ruma::{OwnedRoomId, RoomId};
use serde_json::json;

use super::{
    balance_is, bot_events_match_schemas, metric, open_dm, scene, scene_with_failing_reply,
    send_pin_reply, send_text, set_pin, wait_bot_event, wait_notice, wait_receipt, wait_retries,
    Scene, PIN,
};
use crate::support::{self, SeenEvent, TestClient};

/// The bot's request notice in `room` (an `m.text` mentioning `payer`, so it notifies),
/// containing `part`.
async fn request_notice(
    client: &TestClient,
    room: &RoomId,
    bot: &str,
    payer: &str,
    part: &str,
) -> SeenEvent {
    let notice = wait_notice(client, room, bot, part).await;
    assert_eq!(notice.content()["msgtype"], "m.text", "a request notifies");
    assert!(
        notice.content()["m.mentions"]["user_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| id == payer)),
        "the notice mentions {payer}: {}",
        notice.json
    );
    notice
}

/// Waits for an edit (`m.replace`) of `original` whose new text contains `part`.
pub(crate) async fn wait_edit(
    client: &TestClient,
    room: &RoomId,
    bot: &str,
    original: &str,
    part: &str,
) -> SeenEvent {
    client
        .wait_for_event(&format!("an edit of {original} saying {part:?}"), |e| {
            e.room_id == room
                && e.sender() == bot
                && e.content()["m.relates_to"]["rel_type"] == "m.replace"
                && e.content()["m.relates_to"]["event_id"] == original
                && e.content()["m.new_content"]["body"]
                    .as_str()
                    .is_some_and(|b| b.contains(part))
        })
        .await
}

impl Scene {
    fn alice_id(&self) -> &str {
        self.alice.user.user_id.as_str()
    }
}

/// bob asks alice for 12.00 EUR with `!request`; the bot posts it (a notice mentioning alice,
/// the typed request) and tells alice in her DM; alice replies `!pay` (no amount): the PIN
/// challenge names bob and 12.00 EUR, her PIN pays, the receipt names the request, the
/// notice is edited to paid with a status event; a second `!pay` is refused as paying twice
/// (`request_already_paid`) and nothing more moves. bob refunds part of it: the payment and
/// the refund carry the request's ledger reference (the admin API shows it on each).
#[tokio::test]
async fn a_request_is_paid_by_replying_pay() {
    let s = scene("request-reply", 120_000, "50.00").await;
    let (alice, bob, bot, room, dm) = (&s.alice, &s.bob, s.bot.as_str(), &s.room, &s.dm);
    let ask = send_text(
        bob,
        room,
        &format!("!request {} 12.00 EUR pizza", s.alice_id()),
    )
    .await;
    let notice = request_notice(alice, room, bot, s.alice_id(), "asks").await;
    let body = notice.body().unwrap_or_default();
    assert!(
        body.starts_with(&format!(
            "💸 {} asks {} for 12.00 EUR (pizza).",
            s.bob_id(),
            s.alice_id()
        )),
        "{body}"
    );
    wait_bot_event(alice, room, bot, "org.mxpay.payment_request", |c| {
        c["payer"] == s.alice_id() && c["payee"] == s.bob_id() && c["amount"] == "12.00"
    })
    .await;
    let told = wait_notice(alice, dm, bot, "asks you").await;
    assert_eq!(told.content()["msgtype"], "m.text");
    assert_eq!(
        told.content()["m.mentions"]["user_ids"],
        json!([s.alice_id()])
    );

    // alice pays it by replying `!pay`: the amount and payee come from the request.
    let pay = alice.reply(room, notice.event_id(), "!pay").await;
    wait_notice(
        alice,
        dm,
        bot,
        &format!("Confirm paying 12.00 EUR to {}", s.bob_id()),
    )
    .await;
    send_text(alice, dm, PIN).await;
    let receipt = wait_receipt(bob, room, bot, &pay, "completed", None).await;
    assert_eq!(receipt.content()["request_event_id"], ask.as_str());
    assert_eq!(receipt.content()["amount"], "12.00");
    wait_edit(alice, room, bot, notice.event_id(), "Status: paid").await;
    wait_bot_event(alice, room, bot, "org.mxpay.payment_request.status", |c| {
        c["status"] == "paid" && c["payer_status"] == "paid" && c["paid_count"] == 1
    })
    .await;
    balance_is(alice, dm, bot, "38.00 EUR").await;

    // Paying twice is refused with its code; nothing moves.
    let again = alice.reply(room, notice.event_id(), "!pay").await;
    let refused = wait_receipt(
        alice,
        room,
        bot,
        &again,
        "declined",
        Some("request_already_paid"),
    )
    .await;
    assert!(
        refused
            .body()
            .unwrap_or_default()
            .contains("this request has already been paid"),
        "{}",
        refused.json
    );
    balance_is(alice, dm, bot, "38.00 EUR").await;
    assert!(bot_events_match_schemas(alice, bot) >= 5);

    // bob refunds part of it: the refund and the payment share the request's reference.
    let bob_dm = super::refunds::payee_can_refund(&s).await;
    let (_, refunded) =
        super::refunds::bob_refunds(&s, &bob_dm, receipt.event_id(), "!refund 2.00", "2.00").await;
    let reader = crate::admin::mint(&s.admin_key, &[mxpay::admin::token::Scope::Read]);
    let reference = format!("{:032x}", mxpay::requests::ledger_reference(ask.as_str()));
    for shown in [&receipt, &refunded] {
        // Receipts name transfers in decimal, the admin API in 32 hex digits.
        let decimal = shown.content()["transfer_id"].as_str().unwrap().to_owned();
        let transfer_id = format!("{:032x}", decimal.parse::<u128>().unwrap());
        let response = reqwest::Client::new()
            .get(format!(
                "{}/_mxpay/admin/v1/transfers/{transfer_id}",
                s.mxpay.url
            ))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            body["transfer"]["reference"], reference,
            "the request's reference on {transfer_id}: {body}"
        );
    }
}

/// bob asks alice with a client's own `org.mxpay.payment_request`; alice pays it by reacting
/// ✅ to the bot's notice (from her only: bob's own ✅ on it is refused as `request_from_self`),
/// confirms with her PIN; the request is paid once.
#[tokio::test]
async fn a_request_is_paid_by_reacting() {
    let s = scene("request-react", 120_000, "50.00").await;
    let (alice, bob, bot, room, dm) = (&s.alice, &s.bob, s.bot.as_str(), &s.room, &s.dm);
    let ask = bob
        .room(room)
        .await
        .send_raw(
            "org.mxpay.payment_request",
            json!({
                "body": format!("{} requests 4.20 EUR: coffee", s.bob_id()),
                "payee": s.bob_id(),
                "payer": s.alice_id(),
                "amount": "4.20",
                "currency": "EUR",
                "memo": "coffee",
            }),
        )
        .await
        .expect("send the request")
        .response
        .event_id;
    let notice = request_notice(alice, room, bot, s.alice_id(), "for 4.20 EUR (coffee)").await;

    // The requester's own ✅ pays nothing.
    let own = bob.react(room, notice.event_id(), "✅").await;
    wait_receipt(bob, room, bot, &own, "declined", Some("request_from_self")).await;

    // Reactions travel unencrypted (matrix-sdk and Element do not encrypt them), so nothing
    // says which session reacted: a plain PIN does not confirm it, a PIN replying to the
    // challenge (which names amount and payee) does.
    let yes = alice.react(room, notice.event_id(), "👍").await;
    let challenge = wait_notice(
        alice,
        dm,
        bot,
        &format!("Confirm paying 4.20 EUR to {}", s.bob_id()),
    )
    .await;
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "another of your sessions").await;
    send_pin_reply(alice, dm, challenge.event_id()).await;
    let receipt = wait_receipt(bob, room, bot, &yes, "completed", None).await;
    assert_eq!(receipt.content()["request_event_id"], ask.as_str());
    wait_edit(alice, room, bot, notice.event_id(), "Status: paid").await;
    // The status references the client's own request event.
    wait_bot_event(alice, room, bot, "org.mxpay.payment_request.status", |c| {
        c["status"] == "paid" && c["m.relates_to"]["event_id"] == ask.as_str()
    })
    .await;
    balance_is(alice, dm, bot, "45.80 EUR").await;
}

/// A second payer for the scene: cross-signed, with a PIN, a DM and `funds` EUR, joined to the
/// scene's room.
pub(crate) async fn funded_payer(s: &Scene, name: &str, funds: &str) -> (TestClient, OwnedRoomId) {
    let client = support::client(&support::user(name).await).await;
    client.bootstrap_cross_signing().await;
    let dm = open_dm(&client, &s.bot).await;
    set_pin(&client, &dm, &s.bot).await;
    crate::admin::topup(
        &s.mxpay.url,
        &s.admin_key,
        client.user.user_id.as_str(),
        funds,
        "EUR",
    )
    .await;
    wait_notice(&client, &dm, &s.bot, "topped up").await;
    s.bring_into_room(&client).await;
    (client, dm)
}

/// bob splits 0.05 EUR between alice and carol: the summary says who takes the remainder
/// ("0.03 from alice, 0.02 from carol") and mentions both; alice pays her share by replying
/// `!pay` to the summary, carol with a transfer intent naming it (whose own amount and payee
/// are ignored); the summary is edited as each payment arrives, and ends paid.
#[tokio::test]
async fn a_split_with_a_remainder_is_paid_by_two_people_and_the_summary_follows() {
    let s = scene("request-split", 120_000, "10.00").await;
    let (alice, bob, bot, room, dm) = (&s.alice, &s.bob, s.bot.as_str(), &s.room, &s.dm);
    let (carol, carol_dm) = funded_payer(&s, "carol", "10.00").await;
    let carol_id = carol.user.user_id.to_string();
    send_text(
        bob,
        room,
        &format!("!split 0.05 EUR {} {carol_id} dinner", s.alice_id()),
    )
    .await;
    let summary = request_notice(alice, room, bot, s.alice_id(), "splits 0.05 EUR").await;
    let body = summary.body().unwrap_or_default().to_owned();
    assert!(
        body.contains(&format!(
            "splits 0.05 EUR (dinner): 0.03 from {}, 0.02 from {carol_id}.",
            s.alice_id()
        )),
        "{body}"
    );
    assert!(
        summary.content()["m.mentions"]["user_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| id == carol_id.as_str())),
        "{}",
        summary.json
    );

    let alice_pays = alice.reply(room, summary.event_id(), "!pay").await;
    wait_notice(
        alice,
        dm,
        bot,
        &format!("Confirm paying 0.03 EUR to {}", s.bob_id()),
    )
    .await;
    send_text(alice, dm, PIN).await;
    wait_receipt(bob, room, bot, &alice_pays, "completed", None).await;
    wait_edit(
        bob,
        room,
        bot,
        summary.event_id(),
        &format!(
            "✅ {} 0.03 EUR\n⏳ {carol_id} 0.02 EUR\nStatus: open",
            s.alice_id()
        ),
    )
    .await;

    // carol pays with a transfer intent naming the request: its amount and payee are not
    // used, the request's are (0.02 EUR to bob).
    let carol_pays = carol
        .room(room)
        .await
        .send_raw(
            "org.mxpay.transfer_intent",
            json!({
                "body": "paying my share",
                "payee": carol_id,
                "amount": "99.00",
                "currency": "EUR",
                "request_event_id": summary.event_id(),
            }),
        )
        .await
        .expect("send the intent")
        .response
        .event_id;
    wait_notice(
        &carol,
        &carol_dm,
        bot,
        &format!("Confirm paying 0.02 EUR to {}", s.bob_id()),
    )
    .await;
    send_text(&carol, &carol_dm, PIN).await;
    wait_receipt(bob, room, bot, &carol_pays, "completed", None).await;
    wait_edit(
        bob,
        room,
        bot,
        summary.event_id(),
        &format!(
            "✅ {} 0.03 EUR\n✅ {carol_id} 0.02 EUR\nStatus: paid",
            s.alice_id()
        ),
    )
    .await;
    wait_bot_event(bob, room, bot, "org.mxpay.payment_request.status", |c| {
        c["status"] == "paid" && c["paid_count"] == 2 && c["payer_count"] == 2
    })
    .await;
    balance_is(alice, dm, bot, "9.97 EUR").await;
    balance_is(&carol, &carol_dm, bot, "9.98 EUR").await;
    assert!(bot_events_match_schemas(bob, bot) >= 6);
}

/// Bad input, each with its sentence and a typed receipt carrying a stable reason, nothing
/// moved: asking oneself or the bot, zero, negative and over-precise amounts, an unknown
/// currency, a split with one person or a share below one cent; a ✅ from someone the request
/// does not name; declining (the requester is told, mentioned), then paying the declined
/// request; the requester cancelling (`!cancel` as a reply), then paying the cancelled one.
#[tokio::test]
async fn bad_requests_and_answers_are_refused_with_a_reason_and_nothing_moves() {
    let s = scene("request-bad", 120_000, "20.00").await;
    let (alice, bob, bot, room, dm) = (&s.alice, &s.bob, s.bot.as_str(), &s.room, &s.dm);
    let (alice_id, bob_id) = (s.alice_id(), s.bob_id());
    let cases = [
        (
            format!("!request {bob_id} 5 EUR"),
            "request_from_self",
            "you cannot ask yourself for money",
        ),
        (
            format!("!request {bot} 5 EUR"),
            "request_from_bot",
            "I cannot be asked for money",
        ),
        (format!("!request {alice_id} 0 EUR"), "invalid_amount", ""),
        (format!("!request {alice_id} -3 EUR"), "invalid_amount", ""),
        (
            format!("!request {alice_id} 12.345 EUR"),
            "invalid_amount",
            "",
        ),
        (format!("!request {alice_id} 5 XYZ"), "invalid_amount", ""),
        (
            format!("!split 10 EUR {alice_id}"),
            "split_one_person",
            "a split needs at least two shares",
        ),
        (
            format!("!split 0.01 EUR {alice_id} {bot}"),
            "request_from_bot",
            "",
        ),
        (
            format!("!split 0.01 EUR {alice_id} +me"),
            "split_share_below_minor_unit",
            "less than the smallest unit",
        ),
    ];
    for (command, code, sentence) in &cases {
        let asked = send_text(bob, room, command).await;
        let refused = wait_receipt(alice, room, bot, &asked, "declined", Some(code)).await;
        let body = refused.body().unwrap_or_default();
        assert!(
            body.contains("request not made") && body.contains(sentence),
            "{command}: {body}"
        );
    }

    // A ✅ from someone the request does not name pays nothing.
    let carol = support::client(&support::user("carol").await).await;
    s.bring_into_room(&carol).await;
    send_text(bob, room, &format!("!request {alice_id} 3.00 EUR tea")).await;
    let notice = request_notice(alice, room, bot, alice_id, "for 3.00 EUR (tea)").await;
    let stranger = carol.react(room, notice.event_id(), "✅").await;
    wait_receipt(
        alice,
        room,
        bot,
        &stranger,
        "declined",
        Some("not_the_payer"),
    )
    .await;

    // alice declines: bob is told (mentioned); paying it afterwards is refused.
    alice.reply(room, notice.event_id(), "!decline").await;
    let told = wait_notice(bob, room, bot, "declined the request").await;
    assert_eq!(told.content()["m.mentions"]["user_ids"], json!([bob_id]));
    wait_edit(bob, room, bot, notice.event_id(), "Status: declined").await;
    let late = alice.reply(room, notice.event_id(), "!pay").await;
    wait_receipt(
        alice,
        room,
        bot,
        &late,
        "declined",
        Some("request_declined"),
    )
    .await;

    // bob cancels another request; paying it is refused; alice cannot cancel bob's request.
    send_text(bob, room, &format!("!request {alice_id} 4.00 EUR cake")).await;
    let notice = request_notice(alice, room, bot, alice_id, "for 4.00 EUR (cake)").await;
    let not_hers = alice.reply(room, notice.event_id(), "!cancel").await;
    wait_receipt(
        alice,
        room,
        bot,
        &not_hers,
        "declined",
        Some("not_the_requester"),
    )
    .await;
    bob.reply(room, notice.event_id(), "!cancel").await;
    wait_edit(alice, room, bot, notice.event_id(), "Status: cancelled").await;
    let late = alice.react(room, notice.event_id(), "✅").await;
    wait_receipt(
        alice,
        room,
        bot,
        &late,
        "declined",
        Some("request_cancelled"),
    )
    .await;

    balance_is(alice, dm, bot, "20.00 EUR").await;
    assert!(bot_events_match_schemas(alice, bot) >= cases.len());
}

/// A decline whose message to the requester failed is repeated, not decided again: while the
/// transaction is retried the request is already declined (which, decided again, would be
/// refused as `request_declined`); once the message goes through, the requester is told once
/// and the room has one status event.
#[tokio::test]
async fn a_decline_whose_message_failed_is_repeated_not_decided_again() {
    let (s, gate) = scene_with_failing_reply("request-retry", "request-tell").await;
    let (alice, bob, bot, room) = (&s.alice, &s.bob, s.bot.as_str(), &s.room);
    send_text(bob, room, &format!("!request {} 2.00 EUR", s.alice_id())).await;
    let notice = request_notice(alice, room, bot, s.alice_id(), "for 2.00 EUR").await;
    let before = metric(&s.mxpay, r#"mxpay_errors_total{kind="send_transient"}"#).await;
    let no = alice.reply(room, notice.event_id(), "!decline").await;
    wait_retries(&s.mxpay, before + 2.0).await;
    std::fs::write(&gate, b"").expect("open the gate");
    wait_notice(bob, room, bot, "declined the request").await;
    wait_edit(bob, room, bot, notice.event_id(), "Status: declined").await;
    // Told once, one status, and no refusal of the decline by its own retry.
    let told = |e: &SeenEvent| {
        e.room_id == *room
            && e.sender() == bot
            && e.event_type() == "m.room.message"
            && e.body()
                .is_some_and(|b| b.starts_with("❌") && b.contains("declined the request"))
    };
    let statuses =
        |e: &SeenEvent| e.room_id == *room && e.event_type() == "org.mxpay.payment_request.status";
    assert_eq!(bob.seen_events().iter().filter(|e| told(e)).count(), 1);
    assert_eq!(bob.seen_events().iter().filter(|e| statuses(e)).count(), 1);
    assert!(
        super::receipts_for(alice, room, &no).is_empty(),
        "the decline was refused on retry"
    );
}

/// bob asks alice with a client's `org.mxpay.payment_request` that lapses soon
/// (`expires_at_ms`); once its time has passed, the next event the bot handles (a chat line)
/// writes it down: the notice is edited to expired, a status event says so, and alice's
/// `!pay` afterwards is refused as `request_expired`; nothing moves.
#[tokio::test]
async fn a_request_that_lapses_is_edited_to_expired_and_cannot_be_paid() {
    let s = scene("request-lapse", 120_000, "50.00").await;
    let (alice, bob, bot, room, dm) = (&s.alice, &s.bob, s.bot.as_str(), &s.room, &s.dm);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64
    };
    // Far enough ahead for the bot to take the request on any machine; the test then waits
    // for that time to pass (it asserts nothing about how long anything took).
    let expires_at_ms = now_ms() + 20_000;
    bob.room(room)
        .await
        .send_raw(
            "org.mxpay.payment_request",
            json!({
                "body": format!("{} requests 3.00 EUR: tickets", s.bob_id()),
                "payee": s.bob_id(),
                "payer": s.alice_id(),
                "amount": "3.00",
                "currency": "EUR",
                "memo": "tickets",
                "expires_at_ms": expires_at_ms,
            }),
        )
        .await
        .expect("send the request");
    let notice = request_notice(alice, room, bot, s.alice_id(), "asks").await;
    assert!(
        notice.body().unwrap_or_default().ends_with("Status: open"),
        "{}",
        notice.json
    );
    // Bounded: the expiry is at most 20 s ahead.
    for _ in 0..50 {
        if now_ms() > expires_at_ms + 500 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(now_ms() > expires_at_ms, "the request's time has passed");
    send_text(bob, room, "did you see my request?").await;
    wait_edit(alice, room, bot, notice.event_id(), "Status: expired").await;
    wait_bot_event(alice, room, bot, "org.mxpay.payment_request.status", |c| {
        c["status"] == "expired"
    })
    .await;

    let late = alice.reply(room, notice.event_id(), "!pay").await;
    let refused = wait_receipt(alice, room, bot, &late, "declined", Some("request_expired")).await;
    assert!(
        refused
            .body()
            .unwrap_or_default()
            .contains("this request has expired"),
        "{}",
        refused.json
    );
    balance_is(alice, dm, bot, "50.00 EUR").await;
    assert!(bot_events_match_schemas(alice, bot) >= 2);
}

/// bob asks anyone in the room for 2.00 EUR (a client's `org.mxpay.payment_request` without
/// `payer`); alice and carol each pay it by replying `!pay` (each with their own PIN); the
/// notice lists both as paid; alice paying a second time is refused as
/// `request_already_paid`.
#[tokio::test]
async fn an_open_request_is_paid_by_two_members() {
    let s = scene("request-open", 120_000, "50.00").await;
    let (alice, bob, bot, room, dm) = (&s.alice, &s.bob, s.bot.as_str(), &s.room, &s.dm);
    let (carol, carol_dm) = funded_payer(&s, "carol", "10.00").await;
    let carol_id = carol.user.user_id.to_string();
    let ask = bob
        .room(room)
        .await
        .send_raw(
            "org.mxpay.payment_request",
            json!({
                "body": format!("{} requests 2.00 EUR from anyone: club fee", s.bob_id()),
                "payee": s.bob_id(),
                "amount": "2.00",
                "currency": "EUR",
                "memo": "club fee",
            }),
        )
        .await
        .expect("send the request")
        .response
        .event_id;
    let notice = wait_notice(alice, room, bot, "asks anyone here for 2.00 EUR").await;

    let alice_pays = alice.reply(room, notice.event_id(), "!pay").await;
    wait_notice(
        alice,
        dm,
        bot,
        &format!("Confirm paying 2.00 EUR to {}", s.bob_id()),
    )
    .await;
    send_text(alice, dm, PIN).await;
    let receipt = wait_receipt(bob, room, bot, &alice_pays, "completed", None).await;
    assert_eq!(receipt.content()["request_event_id"], ask.as_str());
    wait_edit(
        bob,
        room,
        bot,
        notice.event_id(),
        &format!("✅ {} 2.00 EUR", s.alice_id()),
    )
    .await;

    let carol_pays = carol.reply(room, notice.event_id(), "!pay").await;
    wait_notice(
        &carol,
        &carol_dm,
        bot,
        &format!("Confirm paying 2.00 EUR to {}", s.bob_id()),
    )
    .await;
    send_text(&carol, &carol_dm, PIN).await;
    let receipt = wait_receipt(bob, room, bot, &carol_pays, "completed", None).await;
    assert_eq!(receipt.content()["request_event_id"], ask.as_str());
    wait_edit(
        bob,
        room,
        bot,
        notice.event_id(),
        &format!("✅ {} 2.00 EUR\n✅ {carol_id} 2.00 EUR", s.alice_id()),
    )
    .await;

    let again = alice.reply(room, notice.event_id(), "!pay").await;
    wait_receipt(
        alice,
        room,
        bot,
        &again,
        "declined",
        Some("request_already_paid"),
    )
    .await;
    balance_is(alice, dm, bot, "48.00 EUR").await;
    balance_is(&carol, &carol_dm, bot, "8.00 EUR").await;
    assert!(bot_events_match_schemas(bob, bot) >= 4);
}
