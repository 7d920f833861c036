//! Issue 13: refunds over real Synapse with real encrypted clients. alice pays bob; bob (the
//! payee, cross-signed, with a PIN and a DM) replies `!refund` to the bot's receipt of the
//! payment; the refund is a payment from bob back to alice with bob's PIN step-up, linked to
//! the original in the ledger; its receipt names the original, in the room and in alice's DM.

use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, RoomId};

use super::{
    balance_is, bot_events_match_schemas, metric, open_dm, receipts_for, scene,
    scene_with_failing_reply, send_text, set_pin, wait_bot_event, wait_notice, wait_receipt,
    wait_retries, Scene, PIN,
};
use crate::support::SeenEvent;

/// bob gets what a refunder needs: a cross-signed session, a DM with the bot and a PIN.
pub(super) async fn payee_can_refund(s: &Scene) -> OwnedRoomId {
    s.bob.bootstrap_cross_signing().await;
    let dm = open_dm(&s.bob, &s.bot).await;
    set_pin(&s.bob, &dm, &s.bot).await;
    dm
}

/// alice pays bob `amount` EUR; returns the bot's typed receipt of it in the room (as bob
/// sees it) and its notice.
async fn paid_receipt(s: &Scene, amount: &str) -> (SeenEvent, SeenEvent) {
    let pay = s.alice_pays_bob(amount, PIN).await;
    let receipt = wait_receipt(&s.bob, &s.room, &s.bot, &pay, "completed", None).await;
    let notice = wait_notice(
        &s.bob,
        &s.room,
        &s.bot,
        &format!("paid {} {amount} EUR", s.bob.user.user_id),
    )
    .await;
    (receipt, notice)
}

/// bob replies `text` to `to` and confirms the challenge for `amount` EUR to alice with his
/// PIN; returns the `!refund` event once alice saw its completed receipt in the room.
pub(super) async fn bob_refunds(
    s: &Scene,
    bob_dm: &RoomId,
    to: &str,
    text: &str,
    amount: &str,
) -> (OwnedEventId, SeenEvent) {
    let alice_id = s.alice.user.user_id.as_str();
    let refund = s.bob.reply(&s.room, to, text).await;
    wait_notice(
        &s.bob,
        bob_dm,
        &s.bot,
        &format!("Confirm paying {amount} EUR to {alice_id}"),
    )
    .await;
    send_text(&s.bob, bob_dm, PIN).await;
    let receipt = wait_receipt(&s.alice, &s.room, &s.bot, &refund, "completed", None).await;
    (refund, receipt)
}

/// alice pays bob 20.00 EUR; bob refunds 5.00 of it replying to the typed receipt (his PIN
/// confirms it), then the rest (15.00) replying to the receipt's notice; each refund's
/// receipt names the original payment (`refund_of`), in the room and in alice's DM; the
/// balances move both ways; a third `!refund` finds nothing left.
#[tokio::test]
async fn a_partial_refund_then_the_rest_go_back_to_the_payer() {
    let s = scene("refund-partial", 120_000, "50.00").await;
    let bob_dm = payee_can_refund(&s).await;
    let (receipt, notice) = paid_receipt(&s, "20.00").await;
    let original = receipt.content()["transfer_id"]
        .as_str()
        .expect("the receipt names its transfer")
        .to_owned();

    let (_, first) = bob_refunds(&s, &bob_dm, receipt.event_id(), "!refund 5.00", "5.00").await;
    assert_eq!(first.content()["amount"], "5.00");
    assert_eq!(first.content()["payer"], s.bob_id());
    assert_eq!(first.content()["payee"], s.alice.user.user_id.as_str());
    assert_eq!(
        first.content()["refund_of"]["transfer_id"],
        original.as_str()
    );
    assert_eq!(
        first.content()["refund_of"]["receipt_event_id"],
        receipt.event_id()
    );
    // The one paid back is told in her DM.
    wait_bot_event(&s.alice, &s.dm, &s.bot, "org.mxpay.receipt", |c| {
        c["status"] == "completed"
            && c["amount"] == "5.00"
            && c["refund_of"]["transfer_id"] == original.as_str()
    })
    .await;
    wait_notice(
        &s.alice,
        &s.dm,
        &s.bot,
        &format!(
            "refunded 5.00 EUR to {} (of a payment of 20.00 EUR)",
            s.alice.user.user_id
        ),
    )
    .await;
    s.alice_balance_is("35.00 EUR").await;
    balance_is(&s.bob, &bob_dm, &s.bot, "15.00 EUR").await;

    // The rest, replying to the receipt's notice this time.
    let (_, rest) = bob_refunds(&s, &bob_dm, notice.event_id(), "!refund", "15.00").await;
    assert_eq!(rest.content()["amount"], "15.00");
    assert_eq!(
        rest.content()["refund_of"]["transfer_id"],
        original.as_str()
    );
    assert_eq!(
        rest.content()["refund_of"]["receipt_event_id"],
        notice.event_id()
    );
    s.alice_balance_is("50.00 EUR").await;

    let more = s.bob.reply(&s.room, receipt.event_id(), "!refund").await;
    wait_receipt(
        &s.bob,
        &s.room,
        &s.bot,
        &more,
        "declined",
        Some("refund_nothing_left"),
    )
    .await;
    s.alice_balance_is("50.00 EUR").await;
    assert!(bot_events_match_schemas(&s.alice, &s.bot) >= 4);
}

/// Refusals, each with its sentence and a typed receipt carrying its code, nothing moved:
/// a refund above what remains (after a partial refund), a refund by someone other than the
/// payee (the payer herself), a refund of a refund, a refund replying to a message that is
/// no payment, and an over-precise amount.
#[tokio::test]
async fn refunds_above_what_remains_by_others_and_of_refunds_are_refused() {
    let s = scene("refund-refused", 120_000, "50.00").await;
    let bob_dm = payee_can_refund(&s).await;
    let (receipt, _) = paid_receipt(&s, "20.00").await;
    let (_, refund) = bob_refunds(&s, &bob_dm, receipt.event_id(), "!refund 5.00", "5.00").await;

    let refused = |event: OwnedEventId, code: &'static str| {
        let s = &s;
        async move {
            let seen = wait_receipt(&s.bob, &s.room, &s.bot, &event, "declined", Some(code)).await;
            assert_eq!(seen.content()["reason"], code);
            seen
        }
    };
    let above = s
        .bob
        .reply(&s.room, receipt.event_id(), "!refund 15.01")
        .await;
    let seen = refused(above.clone(), "refund_above_remaining").await;
    assert_eq!(seen.content()["amount"], "15.01");
    wait_notice(
        &s.bob,
        &s.room,
        &s.bot,
        "the refund is more than what remains of this payment",
    )
    .await;

    let by_payer = s.alice.reply(&s.room, receipt.event_id(), "!refund").await;
    refused(by_payer, "refund_not_payee").await;
    wait_notice(
        &s.alice,
        &s.room,
        &s.bot,
        "only the person who was paid can refund this payment",
    )
    .await;

    // alice was paid by the refund: she is its payee, and still may not refund it.
    let of_refund = s
        .alice
        .reply(&s.room, refund.event_id(), "!refund 1.00")
        .await;
    refused(of_refund, "refund_of_refund").await;

    let own_text = send_text(&s.bob, &s.room, "thanks for lunch").await;
    let not_a_payment = s.bob.reply(&s.room, own_text.as_str(), "!refund").await;
    refused(not_a_payment, "reply_target_unknown").await;

    let precise = s
        .bob
        .reply(&s.room, receipt.event_id(), "!refund 1.001")
        .await;
    refused(precise, "invalid_amount").await;

    s.alice_balance_is("35.00 EUR").await;
    balance_is(&s.bob, &bob_dm, &s.bot, "15.00 EUR").await;
    assert!(bot_events_match_schemas(&s.bob, &s.bot) >= 6);
}

/// A `!refund` whose answer failed (the homeserver "down" for the room's "confirm with your
/// PIN" notice) is retried with the same refund, not a second one: once the answer goes
/// through, bob's PIN confirms one refund, the room has one receipt of it, and alice gets back
/// exactly what she paid.
#[tokio::test]
async fn a_refund_retried_after_a_failed_answer_refunds_once() {
    let (s, gate) = scene_with_failing_reply("refund-retry", "pay-pending").await;
    // Open while alice pays; closed for the refund's answer only.
    std::fs::write(&gate, b"").expect("open the gate");
    let bob_dm = payee_can_refund(&s).await;
    let (receipt, _) = paid_receipt(&s, "10.00").await;
    s.alice_balance_is("10.00 EUR").await;
    std::fs::remove_file(&gate).expect("close the gate");
    let before = metric(&s.mxpay, r#"mxpay_errors_total{kind="send_transient"}"#).await;
    let refund = s.bob.reply(&s.room, receipt.event_id(), "!refund").await;
    wait_retries(&s.mxpay, before + 2.0).await;
    std::fs::write(&gate, b"").expect("open the gate again");
    wait_notice(
        &s.bob,
        &bob_dm,
        &s.bot,
        &format!("Confirm paying 10.00 EUR to {}", s.alice.user.user_id),
    )
    .await;
    send_text(&s.bob, &bob_dm, PIN).await;
    wait_receipt(&s.alice, &s.room, &s.bot, &refund, "completed", None).await;
    s.alice_balance_is("20.00 EUR").await;
    balance_is(&s.bob, &bob_dm, &s.bot, "0.00 EUR").await;
    let told = receipts_for(&s.alice, &s.room, &refund);
    assert_eq!(told.len(), 1, "one receipt of the refund: {told:?}");
    assert_eq!(told[0]["status"], "completed");
}
