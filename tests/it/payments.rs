//! Payments end to end: the real `mxpay` binary with payments on, real Synapse, real encrypted
//! matrix-sdk clients. PINs in the private DM, `!pay` in an encrypted room, receipts.

use std::path::PathBuf;

use matrix_sdk::ruma::api::client::room::create_room::v3::RoomPreset;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, RoomId};
use serde_json::Value;

use crate::admin::{admin_yaml, topup};
use crate::support::{
    self, MxpayOptions, MxpayProcess, RoomOptions, SeenEvent, SlotKind, SlotLease, TestClient,
};

/// The PIN the tests' users choose.
const PIN: &str = "4821";

/// A slot leased with payments on (a pepper file in the lease dir), the given step-up
/// timeout, and the admin API (for top-ups); returns the lease and the admin key.
async fn payments_lease(label: &str, stepup_timeout_ms: u64) -> (SlotLease, Vec<u8>) {
    let mut lease = support::synapse().lease(SlotKind::Normal, label).await;
    let pepper: PathBuf = lease.dir.join("pepper");
    std::fs::write(&pepper, format!("{}\n", support::random_suffix(48))).expect("write pepper");
    let (admin, admin_key) = admin_yaml(&lease.dir);
    lease.config.extra_yaml = format!(
        "payments:\n  enabled: true\n  pepper_file: {}\n  stepup_timeout_ms: {stepup_timeout_ms}\n{admin}",
        pepper.display()
    );
    lease.write_config();
    (lease, admin_key)
}

async fn send_text(client: &TestClient, room_id: &RoomId, text: &str) -> OwnedEventId {
    client
        .room(room_id)
        .await
        .send(RoomMessageEventContent::text_plain(text))
        .await
        .unwrap_or_else(|e| panic!("{} sending {text:?}: {e}", client.user.user_id))
        .response
        .event_id
}

/// Waits for a bot notice in `room_id` containing `part`.
async fn wait_notice(client: &TestClient, room_id: &RoomId, bot: &str, part: &str) -> SeenEvent {
    client
        .wait_for_message(room_id, bot, |body| body.contains(part))
        .await
}

/// Waits for a bot event of `event_type` in `room_id` matching `check`.
async fn wait_bot_event(
    client: &TestClient,
    room_id: &RoomId,
    bot: &str,
    event_type: &str,
    check: impl Fn(&Value) -> bool,
) -> SeenEvent {
    let what = format!("{event_type} from {bot} in {room_id}");
    client
        .wait_for_event(&what, |e| {
            e.room_id == room_id
                && e.sender() == bot
                && e.event_type() == event_type
                && check(e.content())
        })
        .await
}

/// Waits until `event_id` was redacted in `room_id` (as `client` sees it).
async fn wait_redacted(client: &TestClient, room_id: &RoomId, event_id: &OwnedEventId) {
    let what = format!("the redaction of {event_id}");
    client
        .wait_for_event(&what, |e| {
            e.room_id == room_id
                && e.event_type() == "m.room.redaction"
                && (e.content()["redacts"] == event_id.as_str()
                    || e.json["redacts"] == event_id.as_str())
        })
        .await;
}

/// A private, encrypted DM `client` opens with the bot (trusted_private_chat: the bot gets
/// full power and can redact PINs).
async fn open_dm(client: &TestClient, bot: &str) -> OwnedRoomId {
    let room = client
        .create_room(RoomOptions {
            encrypted: true,
            preset: Some(RoomPreset::TrustedPrivateChat),
            invite: vec![bot.try_into().expect("bot id")],
            is_direct: true,
            ..Default::default()
        })
        .await;
    client
        .wait_for_membership(room.room_id(), bot, "join")
        .await;
    room.room_id().to_owned()
}

/// `!pin set` in the DM, the PIN twice; checks each PIN message is redacted.
async fn set_pin(client: &TestClient, dm: &RoomId, bot: &str) {
    send_text(client, dm, "!pin set").await;
    wait_notice(client, dm, bot, "Choose a 4-digit PIN").await;
    let first = send_text(client, dm, PIN).await;
    wait_notice(client, dm, bot, "Send the same PIN again").await;
    wait_redacted(client, dm, &first).await;
    let second = send_text(client, dm, PIN).await;
    wait_notice(client, dm, bot, "Your PIN is set").await;
    wait_redacted(client, dm, &second).await;
}

/// An encrypted room of `owner` with the bot and `others` joined.
async fn group_room(owner: &TestClient, bot: &str, others: &[&TestClient]) -> OwnedRoomId {
    let mut invite = vec![bot.try_into().expect("bot id")];
    invite.extend(others.iter().map(|c| c.user.user_id.clone()));
    let room = owner
        .create_room(RoomOptions {
            encrypted: true,
            invite,
            ..Default::default()
        })
        .await;
    let room_id = room.room_id().to_owned();
    owner.wait_for_membership(&room_id, bot, "join").await;
    for other in others {
        other.join(&room_id).await;
        owner
            .wait_for_membership(&room_id, other.user.user_id.as_str(), "join")
            .await;
    }
    room_id
}

/// Joins the DM the bot invited `client` to, returning its id.
async fn join_bot_dm(client: &TestClient) -> OwnedRoomId {
    let what = format!("{} to be invited to a DM", client.user.user_id);
    let room_id = support::eventually(&what, || async {
        client
            .inner()
            .invited_rooms()
            .first()
            .map(|room| room.room_id().to_owned())
    })
    .await;
    client.join(&room_id).await;
    room_id
}

#[tokio::test]
async fn pay_in_an_encrypted_room_confirmed_with_the_pin_in_the_dm() {
    let alice_user = support::user("alice").await;
    let bob_user = support::user("bob").await;
    let (lease, admin_key) = payments_lease("pay", 120_000).await;
    let mxpay = MxpayProcess::start_with(&lease, MxpayOptions::default()).await;
    let bot = lease.spec.bot_user_id();
    let alice = support::client(&alice_user).await;
    alice.bootstrap_cross_signing().await;
    let bob = support::client(&bob_user).await;

    let dm = open_dm(&alice, &bot).await;
    set_pin(&alice, &dm, &bot).await;
    topup(
        &mxpay.url,
        &admin_key,
        alice.user.user_id.as_str(),
        "100.00",
        "EUR",
    )
    .await;
    wait_notice(&alice, &dm, &bot, "topped up with 100.00 EUR").await;

    let room = group_room(&alice, &bot, &[&bob]).await;
    let bob_id = bob.user.user_id.as_str();
    let pay = send_text(&alice, &room, &format!("!pay {bob_id} 12.50 EUR lunch")).await;

    let challenge = wait_bot_event(&alice, &dm, &bot, "org.mxpay.stepup.challenge", |c| {
        c["amount"] == "12.50" && c["currency"] == "EUR"
    })
    .await;
    assert_eq!(challenge.content()["payee"], bob_id);
    assert_eq!(challenge.content()["room_id"], room.as_str());
    assert!(
        challenge.encryption.is_some(),
        "the challenge is end-to-end encrypted"
    );
    let notice = wait_notice(&alice, &dm, &bot, "Confirm paying 12.50 EUR").await;
    assert!(notice.body().unwrap().contains(room.as_str()));

    let pin_event = send_text(&alice, &dm, PIN).await;
    wait_redacted(&alice, &dm, &pin_event).await;

    for (who, client) in [("alice", &alice), ("bob", &bob)] {
        let receipt = wait_bot_event(client, &room, &bot, "org.mxpay.receipt", |c| {
            c["status"] == "completed"
        })
        .await;
        let content = receipt.content();
        assert_eq!(content["payer"], alice.user.user_id.as_str(), "{who}");
        assert_eq!(content["payee"], bob_id, "{who}");
        assert_eq!(content["amount"], "12.50", "{who}");
        assert_eq!(content["m.relates_to"]["rel_type"], "m.reference");
        assert_eq!(content["m.relates_to"]["event_id"], pay.as_str());
        wait_notice(client, &room, &bot, "paid").await;
    }
    wait_bot_event(&alice, &dm, &bot, "org.mxpay.receipt", |c| {
        c["status"] == "completed"
    })
    .await;

    send_text(&alice, &dm, "!balance").await;
    wait_notice(&alice, &dm, &bot, "EUR: 87.50 EUR").await;

    // Bob has no DM yet: asking in the group room, the bot invites him to one and answers there.
    send_text(&bob, &room, "!balance").await;
    wait_notice(&bob, &room, &bot, "invited you to a private").await;
    let bob_dm = join_bot_dm(&bob).await;
    wait_notice(&bob, &bob_dm, &bot, "Welcome").await;
    send_text(&bob, &bob_dm, "!balance").await;
    wait_notice(&bob, &bob_dm, &bot, "EUR: 12.50 EUR").await;
}
