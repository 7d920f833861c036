//! Issue 13: payment requests and split bills over real Synapse with real encrypted clients.
//! bob asks alice (funded, with a PIN and a DM) for money; she pays by replying `!pay` or by
//! reacting ✅; the PIN step-up is the usual one; the receipt names the request, the request's
//! notice is edited as it changes.

use matrix_sdk::ruma::{OwnedEventId, RoomId};
use serde_json::{json, Value};

use super::{
    balance_is, bot_events_match_schemas, scene, send_pin_reply, send_text, wait_bot_event,
    wait_notice, wait_receipt, Scene, PIN,
};
use crate::support::{SeenEvent, TestClient};

/// Sends `content` as an `m.room.message` (e.g. a reply) and returns its id.
async fn send_message(client: &TestClient, room: &RoomId, content: Value) -> OwnedEventId {
    client
        .room(room)
        .await
        .send_raw("m.room.message", content)
        .await
        .unwrap_or_else(|e| panic!("{} sending a message: {e}", client.user.user_id))
        .response
        .event_id
}

/// `text` as a reply to `to`.
async fn reply(client: &TestClient, room: &RoomId, to: &str, text: &str) -> OwnedEventId {
    send_message(
        client,
        room,
        json!({"msgtype": "m.text", "body": text, "m.relates_to": {"m.in_reply_to": {"event_id": to}}}),
    )
    .await
}

/// Reacts to `to` with `key`.
async fn react(client: &TestClient, room: &RoomId, to: &str, key: &str) -> OwnedEventId {
    client
        .room(room)
        .await
        .send_raw(
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": to, "key": key}}),
        )
        .await
        .unwrap_or_else(|e| panic!("{} reacting: {e}", client.user.user_id))
        .response
        .event_id
}

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
async fn wait_edit(
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
/// (`request_already_paid`) and nothing more moves.
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
    let pay = reply(alice, room, notice.event_id(), "!pay").await;
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
    let again = reply(alice, room, notice.event_id(), "!pay").await;
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
    let own = react(bob, room, notice.event_id(), "✅").await;
    wait_receipt(bob, room, bot, &own, "declined", Some("request_from_self")).await;

    // Reactions travel unencrypted (matrix-sdk and Element do not encrypt them), so nothing
    // says which session reacted: a plain PIN does not confirm it, a PIN replying to the
    // challenge (which names amount and payee) does.
    let yes = react(alice, room, notice.event_id(), "👍").await;
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
