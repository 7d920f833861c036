//! A hostile homeserver (or anyone holding the hs_token) re-delivers ciphertexts a real client
//! sent, under new event ids and a fresh `origin_server_ts`: no money moves, no challenge opens.

use matrix_sdk::ruma::OwnedEventId;
use serde_json::{json, Value};

use super::{deliver, metric, scene, send_text, wait_receipt, Scene, PIN};
use crate::support;

const REPLAYED: &str = "mxpay_crypto_replayed_events_total";

/// `event_id` as Synapse stored it (the original, even after the bot redacted it), made into
/// a new event: a new id, `origin_server_ts` now, the same ciphertext.
async fn replayed_copy(event_id: &OwnedEventId) -> Value {
    let stored = support::eventually("Synapse to store the event", || async {
        support::synapse().stored_event_json(event_id.as_str())
    })
    .await;
    assert_eq!(stored["type"], "m.room.encrypted", "{stored}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    json!({
        "type": stored["type"],
        "room_id": stored["room_id"],
        "sender": stored["sender"],
        "content": stored["content"],
        "event_id": format!("$replay-{}", support::random_suffix(24)),
        "origin_server_ts": now_ms,
    })
}

/// alice pays bob 5.00 the normal way; returns the `!pay` and the PIN message.
async fn a_payment_made(s: &Scene) -> (OwnedEventId, OwnedEventId) {
    let pay = s.alice_asks_to_pay_bob("5.00").await;
    let pin = send_text(&s.alice, &s.dm, PIN).await;
    wait_receipt(&s.alice, &s.room, &s.bot, &pay, "completed", None).await;
    (pay, pin)
}

fn challenges_for(s: &Scene, amount: &str) -> usize {
    s.alice
        .seen_events()
        .iter()
        .filter(|e| {
            e.room_id == s.dm
                && e.event_type() == "org.mxpay.stepup.challenge"
                && e.content()["amount"] == amount
        })
        .count()
}

#[tokio::test]
async fn a_replayed_payment_and_its_pin_move_no_money_and_open_no_challenge() {
    let s = scene("replay-pay", 120_000, "20.00").await;
    let (pay, pin) = a_payment_made(&s).await;
    s.alice_balance_is("15.00 EUR").await;

    // The old `!pay` and the PIN that confirmed it, again and again, as new events.
    for _ in 0..2 {
        deliver(&s, vec![replayed_copy(&pay).await]).await;
        deliver(&s, vec![replayed_copy(&pin).await]).await;
    }

    // Transactions are handled in order: once `!balance` is answered, the replays were.
    s.alice_balance_is("15.00 EUR").await;
    assert_eq!(metric(&s.mxpay, REPLAYED).await, 4.0);
    assert_eq!(challenges_for(&s, "5.00"), 1, "no new challenge was opened");
    // Logged at WARN (with ids and the Megolm position only: the fields are fixed, and the
    // trace-level leak test in `observability` checks no PIN reaches any log).
    support::eventually("the replays to be logged", || async {
        s.mxpay
            .log()
            .lines()
            .any(|line| line.contains("WARN") && line.contains("(replay); ignored"))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_old_pin_replayed_does_not_confirm_the_payment_waiting_now() {
    let s = scene("replay-pin", 120_000, "20.00").await;
    let (_, old_pin) = a_payment_made(&s).await;

    // alice starts a new payment; before she answers, the old PIN message comes again.
    let waiting = s.alice_asks_to_pay_bob("2.00").await;
    deliver(&s, vec![replayed_copy(&old_pin).await]).await;
    // Handled in order: `!balance` answered means the replayed PIN was handled; the payment
    // still waits (its 2.00 reserved, not paid).
    s.alice_balance_is("13.00 EUR (2.00 EUR reserved)").await;
    assert_eq!(metric(&s.mxpay, REPLAYED).await, 1.0);

    // alice's own PIN confirms it, once.
    send_text(&s.alice, &s.dm, PIN).await;
    wait_receipt(&s.alice, &s.room, &s.bot, &waiting, "completed", None).await;
    s.alice_balance_is("13.00 EUR").await;
    assert_eq!(challenges_for(&s, "2.00"), 1);
}
