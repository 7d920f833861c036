//! Issue 17: the send queue over real Synapse with real encrypted clients. A room whose sends
//! fail holds up only its own messages: payments asked there are still decided (the challenge
//! reaches the payer's DM, the PIN posts the payment), and once the room works again its
//! messages arrive in the order they were decided.

use std::path::PathBuf;

use super::{metric, scene_with, send_text, wait_notice, wait_receipt, wait_retries, PIN};
use crate::support::{MxpayOptions, SeenEvent};

/// The index, in `events`, of the first one `matches` picks; panics naming `what`.
fn position(events: &[SeenEvent], what: &str, matches: impl Fn(&SeenEvent) -> bool) -> usize {
    events
        .iter()
        .position(matches)
        .unwrap_or_else(|| panic!("not seen: {what}"))
}

#[tokio::test]
async fn a_stuck_room_holds_up_only_its_messages_which_arrive_in_decided_order() {
    let mut stuck_file = PathBuf::new();
    let s = scene_with("stuck-room", 120_000, "20.00", |lease| {
        stuck_file = lease.dir.join("stuck-room");
        MxpayOptions {
            env: vec![(
                mxpay::payments::FAULT_FAIL_REPLY_ENV.to_owned(),
                format!("room:{}", stuck_file.display()),
            )],
            ..Default::default()
        }
    })
    .await;
    let (alice, bob, bot, room, dm) = (&s.alice, &s.bob, s.bot.as_str(), &s.room, &s.dm);
    // From here every message of the bot to the payment room fails (retryably). What the bot
    // sent before (set-up) may still reach Bob's sync later: only what the homeserver
    // stamped after this moment counts (Synapse runs on this machine's clock).
    let stuck_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    std::fs::write(&stuck_file, room.as_str()).expect("make the room stuck");
    let in_room_from_bot = |e: &SeenEvent| e.room_id == *room && e.sender() == bot;
    let sent_while_stuck = |e: &SeenEvent| {
        in_room_from_bot(e) && e.json["origin_server_ts"].as_u64().unwrap_or(0) >= stuck_at_ms
    };
    let before = metric(&s.mxpay, r#"mxpay_errors_total{kind="send_transient"}"#).await;

    // A payment to someone not in the room is refused; telling the room so fails.
    let server = alice.user.user_id.server_name().to_owned();
    let refused = send_text(alice, room, &format!("!pay @nobody-here:{server} 1 EUR")).await;
    wait_retries(&s.mxpay, before + 2.0).await;

    // The next payment asked in the same room is decided all the same: its challenge reaches
    // the DM (another room) and the PIN posts it.
    let pay = send_text(alice, room, &format!("!pay {} 2 EUR", s.bob_id())).await;
    wait_notice(alice, dm, bot, "Confirm paying 2.00 EUR").await;
    send_text(alice, dm, PIN).await;
    s.alice_balance_is("18.00 EUR").await;
    let leaked: Vec<_> = bob
        .seen_events()
        .into_iter()
        .filter(|e| sent_while_stuck(e))
        .map(|e| (e.event_type().to_owned(), e.body().map(str::to_owned)))
        .collect();
    assert!(
        leaked.is_empty(),
        "the stuck room got messages from the bot: {leaked:?}"
    );

    // The room works again: what was decided for it arrives, in the order it was decided.
    std::fs::remove_file(&stuck_file).expect("unstick the room");
    wait_receipt(bob, room, bot, &pay, "completed", None).await;
    let seen = bob.seen_events();
    let declined = position(&seen, "the refusal", |e| {
        in_room_from_bot(e)
            && e.event_type() == "org.mxpay.receipt"
            && e.content()["m.relates_to"]["event_id"] == refused.as_str()
    });
    let pending = position(&seen, "the payment's pending notice", |e| {
        in_room_from_bot(e)
            && e.event_type() == "m.room.message"
            && e.content()["m.relates_to"]["m.in_reply_to"]["event_id"] == pay.as_str()
            && e.body().is_some_and(|b| b.contains("confirm paying"))
    });
    let receipt = position(&seen, "the payment's receipt", |e| {
        in_room_from_bot(e)
            && e.event_type() == "org.mxpay.receipt"
            && e.content()["m.relates_to"]["event_id"] == pay.as_str()
    });
    assert!(
        declined < pending && pending < receipt,
        "out of decided order: refusal {declined}, pending {pending}, receipt {receipt}"
    );
}
