//! Issue 13: payments the payee accepts (WeChat's accept-or-return), over real Synapse with
//! real encrypted clients. alice (funded, with a PIN and a DM) pays; her PIN holds the money
//! instead of paying it; the payee accepts (✅ or `!accept`), declines (❌ or `!decline`), or
//! the money goes back to alice by itself after the window. Balances come from the admin API.

use matrix_sdk::ruma::{OwnedEventId, RoomId};
use mxpay::admin::token::Scope;
use serde_json::{json, Value};

use super::{
    bot_events_match_schemas, scene_configured, send_text, wait_notice, wait_receipt, wait_retries,
    Scene, PIN,
};
use crate::support::{self, MxpayOptions, SeenEvent, TestClient};

/// `text` as a reply to `to`.
async fn reply(client: &TestClient, room: &RoomId, to: &str, text: &str) -> OwnedEventId {
    client
        .room(room)
        .await
        .send_raw(
            "m.room.message",
            json!({"msgtype": "m.text", "body": text, "m.relates_to": {"m.in_reply_to": {"event_id": to}}}),
        )
        .await
        .unwrap_or_else(|e| panic!("{} replying: {e}", client.user.user_id))
        .response
        .event_id
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

/// What `user` may spend in EUR, from the admin API (`none` without an account).
async fn available(s: &Scene, user: &str) -> String {
    let token = crate::admin::mint(&s.admin_key, &[Scope::Read]);
    let url = format!(
        "{}/_mxpay/admin/v1/users/{}/accounts",
        s.mxpay.url,
        user.replace('@', "%40").replace(':', "%3A")
    );
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("reach mxpay's admin API");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    body["accounts"]
        .as_array()
        .and_then(|accounts| accounts.iter().find(|a| a["currency"] == "EUR"))
        .map(|a| a["available"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|| "none".to_owned())
}

/// A scene whose mxpay has these `payments:` keys.
async fn accept_scene(label: &str, stepup_timeout_ms: u64, payments_yaml: &str) -> Scene {
    scene_configured(label, stepup_timeout_ms, "50.00", payments_yaml, |_| {
        MxpayOptions::default()
    })
    .await
}

/// A new user in the scene's room; cross-signed when `cross_signed`.
async fn member(s: &Scene, name: &str, cross_signed: bool) -> TestClient {
    let client = support::client(&support::user(name).await).await;
    if cross_signed {
        client.bootstrap_cross_signing().await;
    }
    s.bring_into_room(&client).await;
    client
}

/// alice pays `payee` `amount` EUR in the room and confirms with her PIN; waits for the
/// `held` receipt, the notice asking the payee (an `m.text` mentioning them) and her own
/// note in the DM. Returns the paying event and the notice.
async fn alice_pays_and_it_is_held(
    s: &Scene,
    payee: &TestClient,
    amount: &str,
) -> (OwnedEventId, SeenEvent) {
    let (alice, bot, room) = (&s.alice, s.bot.as_str(), &s.room);
    let payee_id = payee.user.user_id.as_str();
    let pay = send_text(alice, room, &format!("!pay {payee_id} {amount} EUR")).await;
    wait_notice(alice, &s.dm, bot, &format!("Confirm paying {amount} EUR")).await;
    send_text(alice, &s.dm, PIN).await;
    wait_receipt(payee, room, bot, &pay, "held", None).await;
    let notice = payee
        .wait_for_event("the held notice", |e| {
            e.room_id == *room
                && e.sender() == bot
                && e.content()["msgtype"] == "m.text"
                && e.body().is_some_and(|b| {
                    b.contains("it is yours once you accept it") && b.contains(amount)
                })
                && e.content()["m.relates_to"]["rel_type"] != "m.replace"
        })
        .await;
    assert_eq!(
        notice.content()["m.mentions"]["user_ids"],
        json!([payee_id]),
        "the payee is mentioned, so they are notified"
    );
    wait_notice(alice, &s.dm, bot, "waits for them to accept it").await;
    (pay, notice)
}

/// Waits for an edit of `original` whose new text contains `part`.
async fn wait_edit(client: &TestClient, room: &RoomId, bot: &str, original: &str, part: &str) {
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
        .await;
}

/// With `payee_must_accept: true`, alice's payment to dave (cross-signed) is held at her PIN:
/// she is debited, dave is not credited. carol's ✅ on the notice is refused (`not_the_payee`),
/// dave's ✅ posts it (completed receipt, the notice edited to accepted, dave credited), and
/// a second 👍 of his is refused (`payment_already_settled`); nothing more moves.
#[tokio::test]
async fn a_held_payment_is_accepted_by_reacting_and_others_cannot() {
    let s = accept_scene("accept-react", 120_000, "  payee_must_accept: true\n").await;
    let (bot, room) = (s.bot.as_str(), &s.room);
    let dave = member(&s, "dave", true).await;
    let carol = member(&s, "carol", false).await;
    let dave_id = dave.user.user_id.as_str();
    let (pay, notice) = alice_pays_and_it_is_held(&s, &dave, "5.00").await;
    assert_eq!(available(&s, s.alice.user.user_id.as_str()).await, "45.00");
    assert!(
        matches!(available(&s, dave_id).await.as_str(), "none" | "0.00"),
        "nothing is paid before dave accepts"
    );

    let stranger = react(&carol, room, notice.event_id(), "✅").await;
    wait_receipt(
        &carol,
        room,
        bot,
        &stranger,
        "declined",
        Some("not_the_payee"),
    )
    .await;
    assert!(matches!(
        available(&s, dave_id).await.as_str(),
        "none" | "0.00"
    ));

    let yes = react(&dave, room, notice.event_id(), "✅").await;
    let receipt = wait_receipt(&dave, room, bot, &pay, "completed", None).await;
    assert_eq!(receipt.content()["payee"], dave_id);
    wait_edit(&dave, room, bot, notice.event_id(), "accepted").await;
    assert_eq!(available(&s, dave_id).await, "5.00");

    // The same ✅ delivered again by the homeserver (a new transaction) pays nothing more. The
    // 👍 below is handled after it (one lane per room, in arrival order).
    let again = super::raw_event(&dave, room, &yes).await;
    super::deliver(&s, vec![again]).await;

    let twice = react(&dave, room, notice.event_id(), "👍").await;
    wait_receipt(
        &dave,
        room,
        bot,
        &twice,
        "declined",
        Some("payment_already_settled"),
    )
    .await;
    assert_eq!(available(&s, dave_id).await, "5.00");
    assert_eq!(available(&s, s.alice.user.user_id.as_str()).await, "45.00");
    let completed = super::receipts_for(&dave, room, &pay)
        .into_iter()
        .filter(|r| r["status"] == "completed")
        .count();
    assert_eq!(completed, 1, "paid and told once");
    // The held, completed and refused receipts match their schema.
    assert!(bot_events_match_schemas(&dave, bot) >= 4);
}

/// With `payee_must_accept: true`: dave accepts one payment by replying `!accept` and
/// declines another by replying `!decline`: the first is paid, the second goes back to alice
/// (a declined receipt with `payee_declined`), and the notices say so.
#[tokio::test]
async fn a_held_payment_is_accepted_by_reply_and_another_declined() {
    let s = accept_scene("accept-reply", 120_000, "  payee_must_accept: true\n").await;
    let (bot, room) = (s.bot.as_str(), &s.room);
    let dave = member(&s, "dave", true).await;
    let dave_id = dave.user.user_id.as_str();
    let alice_id = s.alice.user.user_id.as_str();

    let (pay, notice) = alice_pays_and_it_is_held(&s, &dave, "7.00").await;
    reply(&dave, room, notice.event_id(), "!accept").await;
    wait_receipt(&dave, room, bot, &pay, "completed", None).await;
    wait_edit(&dave, room, bot, notice.event_id(), "accepted").await;
    assert_eq!(available(&s, dave_id).await, "7.00");

    let (pay, notice) = alice_pays_and_it_is_held(&s, &dave, "3.00").await;
    assert_eq!(available(&s, alice_id).await, "40.00");
    reply(&dave, room, notice.event_id(), "!decline").await;
    wait_receipt(
        &s.alice,
        room,
        bot,
        &pay,
        "declined",
        Some("payee_declined"),
    )
    .await;
    wait_edit(&dave, room, bot, notice.event_id(), "declined").await;
    assert_eq!(available(&s, alice_id).await, "43.00");
    assert_eq!(available(&s, dave_id).await, "7.00");
}

/// With the switch off (the default), a payment to bob, who never used mxpay, is held all the
/// same. bob's `!accept` from a session he did not cross-sign is refused (`untrusted_device`);
/// the accept window is short here (`accept_window_ms: 1000`, counted from the end of the
/// 30 s PIN window), so the payment then goes back to alice by itself: an `expired` receipt
/// with `acceptance_window_passed`, the notice edited, alice's money back.
#[tokio::test]
async fn a_payment_to_a_new_user_is_held_and_returns_by_itself() {
    let s = accept_scene("accept-return", 30_000, "  accept_window_ms: 1000\n").await;
    let (bot, room) = (s.bot.as_str(), &s.room);
    let alice_id = s.alice.user.user_id.as_str();
    let (pay, notice) = alice_pays_and_it_is_held(&s, &s.bob, "5.00").await;
    assert_eq!(available(&s, alice_id).await, "45.00");

    let untrusted = reply(&s.bob, room, notice.event_id(), "!accept").await;
    wait_receipt(
        &s.bob,
        room,
        bot,
        &untrusted,
        "declined",
        Some("untrusted_device"),
    )
    .await;

    wait_receipt(
        &s.alice,
        room,
        bot,
        &pay,
        "expired",
        Some("acceptance_window_passed"),
    )
    .await;
    wait_edit(&s.bob, room, bot, notice.event_id(), "did not accept").await;
    assert_eq!(available(&s, alice_id).await, "50.00");
    assert!(matches!(
        available(&s, s.bob.user.user_id.as_str()).await.as_str(),
        "none" | "0.00"
    ));
}

/// The held notice fails to go out (a test fault, retryable) after alice's right PIN: the PIN
/// event is handled again until it goes out; the payment is held once, not paid, and alice is
/// never told "not waiting for a PIN". Then dave accepts it and is paid once.
#[tokio::test]
async fn a_held_notice_that_failed_is_sent_again_and_the_payment_held_once() {
    let mut gate = std::path::PathBuf::new();
    let s = scene_configured(
        "accept-retry",
        120_000,
        "50.00",
        "  payee_must_accept: true\n",
        |lease| {
            gate = lease.dir.join("let-held-notices-through");
            MxpayOptions {
                env: vec![(
                    mxpay::payments::FAULT_FAIL_REPLY_ENV.to_owned(),
                    format!("held-notice:{}", gate.display()),
                )],
                ..Default::default()
            }
        },
    )
    .await;
    let (bot, room) = (s.bot.as_str(), &s.room);
    let dave = member(&s, "dave", true).await;
    let dave_id = dave.user.user_id.as_str();
    let pay = send_text(&s.alice, room, &format!("!pay {dave_id} 6.00 EUR")).await;
    wait_notice(&s.alice, &s.dm, bot, "Confirm paying 6.00 EUR").await;
    send_text(&s.alice, &s.dm, PIN).await;
    wait_retries(&s.mxpay, 2.0).await;
    assert_eq!(available(&s, s.alice.user.user_id.as_str()).await, "44.00");
    assert!(matches!(
        available(&s, dave_id).await.as_str(),
        "none" | "0.00"
    ));
    std::fs::write(&gate, b"go").expect("open the gate");

    wait_receipt(&dave, room, bot, &pay, "held", None).await;
    let notice = wait_notice(&dave, room, bot, "it is yours once you accept it").await;
    wait_notice(&s.alice, &s.dm, bot, "waits for them to accept it").await;
    react(&dave, room, notice.event_id(), "✅").await;
    wait_receipt(&dave, room, bot, &pay, "completed", None).await;
    assert_eq!(available(&s, dave_id).await, "6.00");
    assert_eq!(available(&s, s.alice.user.user_id.as_str()).await, "44.00");
    let told: Vec<String> = s
        .alice
        .seen_events()
        .iter()
        .filter(|e| e.room_id == s.dm && e.sender() == bot)
        .filter_map(|e| e.body().map(str::to_owned))
        .collect();
    assert!(
        !told.iter().any(|b| b.contains("not waiting for a PIN")),
        "{told:?}"
    );
    let held_notices = dave
        .seen_events()
        .iter()
        .filter(|e| {
            e.room_id == *room
                && e.sender() == bot
                && e.body()
                    .is_some_and(|b| b.starts_with("💸") && b.contains("it is yours"))
        })
        .count();
    assert_eq!(held_notices, 1, "the notice is shown once");
}

/// A payment that would be held but gets no PIN is released when the PIN window ends (the
/// sweep: its reservation is longer than the PIN window), told as expired without a PIN, and
/// alice's money is back; a late PIN pays nothing.
#[tokio::test]
async fn an_unconfirmed_held_payment_is_released_when_the_pin_window_ends() {
    let s = accept_scene("accept-nopin", 2_000, "  payee_must_accept: true\n").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let pay = send_text(alice, room, &format!("!pay {} 5 EUR", s.bob_id())).await;
    super::wait_bot_event(alice, dm, bot, "org.mxpay.stepup.challenge", |c| {
        c["amount"] == "5.00"
    })
    .await;
    wait_receipt(alice, room, bot, &pay, "expired", Some("timeout")).await;
    assert_eq!(available(&s, alice.user.user_id.as_str()).await, "50.00");
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "I was not waiting for a PIN").await;
    assert_eq!(available(&s, alice.user.user_id.as_str()).await, "50.00");
    assert!(matches!(
        available(&s, s.bob_id()).await.as_str(),
        "none" | "0.00"
    ));
}
