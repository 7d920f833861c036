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

/// Waits for a receipt from the bot in `room_id` with `status` and (if given) `reason`,
/// answering `answered`.
async fn wait_receipt(
    client: &TestClient,
    room_id: &RoomId,
    bot: &str,
    answered: &OwnedEventId,
    status: &str,
    reason: Option<&str>,
) -> SeenEvent {
    wait_bot_event(client, room_id, bot, "org.mxpay.receipt", |c| {
        c["status"] == status
            && c["m.relates_to"]["event_id"] == answered.as_str()
            && reason.is_none_or(|r| c["reason"] == r)
    })
    .await
}

/// Sends `text` as a plaintext `m.room.message` straight through the client-server API, as
/// a client that ignores the room's encryption would.
async fn send_plaintext(client: &TestClient, room_id: &RoomId, text: &str) -> OwnedEventId {
    let token = client.inner().access_token().expect("logged in");
    let url = format!(
        "{}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/plain-{}",
        support::synapse().url,
        support::random_suffix(12)
    );
    let response: Value = reqwest::Client::new()
        .put(url)
        .bearer_auth(token)
        .json(&serde_json::json!({"msgtype": "m.text", "body": text}))
        .send()
        .await
        .expect("send plaintext")
        .json()
        .await
        .expect("send answer");
    OwnedEventId::try_from(response["event_id"].as_str().expect("event id")).expect("event id")
}

/// A funded, cross-signed payer with a PIN and a DM; a payee; an encrypted room of the two
/// with the bot.
struct Scene {
    lease: SlotLease,
    admin_key: Vec<u8>,
    mxpay: MxpayProcess,
    bot: String,
    alice: TestClient,
    bob: TestClient,
    dm: OwnedRoomId,
    room: OwnedRoomId,
}

async fn scene(label: &str, stepup_timeout_ms: u64, funds: &str) -> Scene {
    let alice_user = support::user("alice").await;
    let bob_user = support::user("bob").await;
    let (lease, admin_key) = payments_lease(label, stepup_timeout_ms).await;
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
        funds,
        "EUR",
    )
    .await;
    wait_notice(&alice, &dm, &bot, "topped up").await;
    let room = group_room(&alice, &bot, &[&bob]).await;
    Scene {
        lease,
        admin_key,
        mxpay,
        bot,
        alice,
        bob,
        dm,
        room,
    }
}

impl Scene {
    fn bob_id(&self) -> &str {
        self.bob.user.user_id.as_str()
    }

    /// `!balance` in alice's DM; waits for the answer naming `expected` (e.g. `20.00 EUR`).
    async fn alice_balance_is(&self, expected: &str) {
        send_text(&self.alice, &self.dm, "!balance").await;
        wait_notice(
            &self.alice,
            &self.dm,
            &self.bot,
            &format!("EUR: {expected}"),
        )
        .await;
    }
}

#[tokio::test]
async fn refusals_say_why_in_the_room_with_a_typed_receipt() {
    let s = scene("refusals", 120_000, "20.00").await;
    let (alice, bot, room) = (&s.alice, s.bot.as_str(), &s.room);

    // Plaintext, even in an encrypted room.
    let plain = send_plaintext(alice, room, &format!("!pay {} 1 EUR", s.bob_id())).await;
    wait_receipt(alice, room, bot, &plain, "declined", Some("not_encrypted")).await;
    wait_notice(
        alice,
        room,
        bot,
        "only accepted in end-to-end-encrypted rooms",
    )
    .await;

    // More than the balance.
    let big = send_text(alice, room, &format!("!pay {} 50 EUR", s.bob_id())).await;
    wait_receipt(
        alice,
        room,
        bot,
        &big,
        "declined",
        Some("insufficient_funds"),
    )
    .await;
    wait_notice(alice, room, bot, "does not cover").await;

    // Someone who is not in the room, and someone who does not exist.
    let carol_user = support::user("carol").await;
    let outsider = send_text(alice, room, &format!("!pay {} 1 EUR", carol_user.user_id)).await;
    wait_receipt(
        alice,
        room,
        bot,
        &outsider,
        "declined",
        Some("payee_not_allowed"),
    )
    .await;
    let nobody = send_text(alice, room, "!pay @nobody_at_all:localhost 1 EUR").await;
    wait_receipt(
        alice,
        room,
        bot,
        &nobody,
        "declined",
        Some("payee_not_allowed"),
    )
    .await;
    wait_notice(alice, room, bot, "@nobody_at_all:localhost is not a member").await;

    // Three decimals for a two-decimal currency.
    let precise = send_text(alice, room, &format!("!pay {} 1.005 EUR", s.bob_id())).await;
    wait_receipt(
        alice,
        room,
        bot,
        &precise,
        "declined",
        Some("invalid_amount"),
    )
    .await;

    // A device its owner did not cross-sign.
    let carol = support::client(&carol_user).await;
    alice
        .room(room)
        .await
        .invite_user_by_id(&carol.user.user_id)
        .await
        .expect("invite carol");
    carol.join(room).await;
    alice
        .wait_for_membership(room, carol.user.user_id.as_str(), "join")
        .await;
    let unsigned = send_text(&carol, room, &format!("!pay {} 1 EUR", s.bob_id())).await;
    wait_receipt(
        &carol,
        room,
        bot,
        &unsigned,
        "declined",
        Some("untrusted_device"),
    )
    .await;
    wait_notice(&carol, room, bot, "your device is not verified").await;

    // A PIN typed in the group room, where the bot cannot redact (private_chat preset: the
    // bot has power 0): the PIN counts as exposed and blocks payments until it is changed.
    send_text(alice, room, PIN).await;
    wait_notice(alice, room, bot, "treat that PIN as known to others").await;
    let blocked = send_text(alice, room, &format!("!pay {} 1 EUR", s.bob_id())).await;
    wait_receipt(alice, room, bot, &blocked, "declined", Some("pin_locked")).await;

    // `!pin change` needs the old PIN; then paying works again.
    let dm = &s.dm;
    send_text(alice, dm, "!pin change").await;
    wait_notice(alice, dm, bot, "first send your current PIN").await;
    send_text(alice, dm, "0000").await;
    wait_notice(alice, dm, bot, "Wrong PIN. 4 attempts left").await;
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "Now send your new 4-digit PIN").await;
    send_text(alice, dm, "1357").await;
    wait_notice(alice, dm, bot, "Send the same PIN again").await;
    send_text(alice, dm, "1357").await;
    wait_notice(alice, dm, bot, "Your PIN is changed").await;
    let pay = send_text(alice, room, &format!("!pay {} 2 EUR", s.bob_id())).await;
    wait_notice(alice, dm, bot, "Confirm paying 2.00 EUR").await;
    send_text(alice, dm, "1357").await;
    wait_receipt(&s.bob, room, bot, &pay, "completed", None).await;
    s.alice_balance_is("18.00 EUR").await;
}

#[tokio::test]
async fn five_wrong_pins_lock_the_pin_and_cancel_the_payment() {
    let s = scene("lock", 120_000, "20.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let pay = send_text(alice, room, &format!("!pay {} 5 EUR", s.bob_id())).await;
    wait_notice(alice, dm, bot, "Confirm paying 5.00 EUR").await;
    for left in (1..=4).rev() {
        let wrong = send_text(alice, dm, "0000").await;
        let plural = if left == 1 { "attempt" } else { "attempts" };
        wait_notice(alice, dm, bot, &format!("Wrong PIN. {left} {plural} left")).await;
        wait_redacted(alice, dm, &wrong).await;
    }
    send_text(alice, dm, "0000").await;
    let locked = wait_notice(alice, dm, bot, "locked after too many wrong attempts").await;
    assert!(
        locked.body().unwrap().contains("try again in 60 seconds"),
        "{:?}",
        locked.body()
    );
    wait_receipt(alice, room, bot, &pay, "declined", Some("pin_locked")).await;
    wait_receipt(&s.bob, room, bot, &pay, "declined", Some("pin_locked")).await;
    // The reservation is released, and the right PIN does not help while locked.
    s.alice_balance_is("20.00 EUR").await;
    let again = send_text(alice, room, &format!("!pay {} 5 EUR", s.bob_id())).await;
    wait_receipt(alice, room, bot, &again, "declined", Some("pin_locked")).await;
    wait_notice(alice, room, bot, "try again in").await;
}

#[tokio::test]
async fn an_unconfirmed_payment_expires_and_releases_the_funds() {
    // A short step-up window (the ledger's pending timeout) keeps the test fast.
    let s = scene("expiry", 2_000, "20.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let pay = send_text(alice, room, &format!("!pay {} 5 EUR", s.bob_id())).await;
    wait_bot_event(alice, dm, bot, "org.mxpay.stepup.challenge", |c| {
        c["amount"] == "5.00"
    })
    .await;
    let expired = wait_receipt(alice, room, bot, &pay, "expired", Some("timeout")).await;
    assert!(expired.content()["transfer_id"].is_string());
    wait_bot_event(alice, dm, bot, "org.mxpay.receipt", |c| {
        c["status"] == "expired"
    })
    .await;
    s.alice_balance_is("20.00 EUR").await;
    // A PIN after the expiry pays nothing.
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "I was not waiting for a PIN").await;
    s.alice_balance_is("20.00 EUR").await;
}
