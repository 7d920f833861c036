//! Payments end to end: the real `mxpay` binary with payments on, real Synapse, real encrypted
//! matrix-sdk clients. PINs in the private DM, `!pay` in an encrypted room, receipts.

use std::path::PathBuf;

use matrix_sdk::ruma::api::client::room::create_room::v3::RoomPreset;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, RoomId};
use serde_json::Value;

use crate::admin::{admin_yaml, topup};

mod linking;
use crate::support::{
    self, MxpayOptions, MxpayProcess, RoomOptions, SeenEvent, SlotKind, SlotLease, TestClient,
};

/// The PIN the tests' users choose.
pub(crate) const PIN: &str = "4821";

/// A slot leased with payments on (a pepper file in the lease dir), the given step-up
/// timeout, and the admin API (for top-ups); returns the lease and the admin key.
async fn payments_lease(label: &str, stepup_timeout_ms: u64) -> (SlotLease, Vec<u8>) {
    // These tests pay people who never used mxpay; payments held for such payees have their
    // own tests (payments/accept.rs).
    payments_lease_with(label, stepup_timeout_ms, "  hold_for_new_payees: false\n").await
}

/// [`payments_lease`] with more `payments:` keys (`payments_yaml`: indented lines).
async fn payments_lease_with(
    label: &str,
    stepup_timeout_ms: u64,
    payments_yaml: &str,
) -> (SlotLease, Vec<u8>) {
    let mut lease = support::synapse().lease(SlotKind::Normal, label).await;
    let pepper: PathBuf = lease.dir.join("pepper");
    support::write_secret(&pepper, format!("{}\n", support::random_suffix(48)));
    let (admin, admin_key) = admin_yaml(&lease.dir);
    lease.config.extra_yaml = format!(
        "payments:\n  enabled: true\n  pepper_file: {}\n  stepup_timeout_ms: {stepup_timeout_ms}\n{payments_yaml}{admin}",
        pepper.display()
    );
    lease.write_config();
    (lease, admin_key)
}

pub(crate) async fn send_text(client: &TestClient, room_id: &RoomId, text: &str) -> OwnedEventId {
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
pub(crate) async fn wait_notice(
    client: &TestClient,
    room_id: &RoomId,
    bot: &str,
    part: &str,
) -> SeenEvent {
    client
        .wait_for_message(room_id, bot, |body| body.contains(part))
        .await
}

/// `!balance` in `dm`; waits for the answer to *this* request (a reply to it) and checks it
/// names `expected` for EUR.
pub(crate) async fn balance_is(client: &TestClient, dm: &RoomId, bot: &str, expected: &str) {
    let asked = send_text(client, dm, "!balance").await;
    let answer = client
        .wait_for_event("the answer to !balance", |e| {
            e.room_id == dm
                && e.sender() == bot
                && e.content()["m.relates_to"]["m.in_reply_to"]["event_id"] == asked.as_str()
        })
        .await;
    let body = answer.body().unwrap_or_default();
    assert!(
        body.lines()
            .any(|line| line == format!("• EUR: {expected}")),
        "{} expected EUR: {expected}, the bot said: {body}",
        client.user.user_id
    );
}

/// Waits for a bot event of `event_type` in `room_id` matching `check`.
pub(crate) async fn wait_bot_event(
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
pub(crate) async fn wait_redacted(client: &TestClient, room_id: &RoomId, event_id: &OwnedEventId) {
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
pub(crate) async fn open_dm(client: &TestClient, bot: &str) -> OwnedRoomId {
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
pub(crate) async fn set_pin(client: &TestClient, dm: &RoomId, bot: &str) {
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
pub(crate) async fn group_room(
    owner: &TestClient,
    bot: &str,
    others: &[&TestClient],
) -> OwnedRoomId {
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
    let s = scene("pay", 120_000, "100.00").await;
    let (alice, bob, bot, dm, room) = (&s.alice, &s.bob, &s.bot, &s.dm, &s.room);
    // bob asks for his balance below: a wallet command, so from a cross-signed session.
    bob.bootstrap_cross_signing().await;
    wait_notice(alice, dm, bot, "topped up with 100.00 EUR").await;

    let bob_id = bob.user.user_id.as_str();
    let pay = send_text(alice, room, &format!("!pay {bob_id} 12.50 EUR lunch")).await;

    let challenge = wait_bot_event(alice, dm, bot, "org.mxpay.stepup.challenge", |c| {
        c["amount"] == "12.50" && c["currency"] == "EUR"
    })
    .await;
    assert_eq!(challenge.content()["payee"], bob_id);
    assert_eq!(challenge.content()["room_id"], room.as_str());
    assert!(
        challenge.encryption.is_some(),
        "the challenge is end-to-end encrypted"
    );
    let notice = wait_notice(alice, dm, bot, "Confirm paying 12.50 EUR").await;
    assert!(notice.body().unwrap().contains(room.as_str()));

    let pin_event = send_text(alice, dm, PIN).await;
    wait_redacted(alice, dm, &pin_event).await;

    for (who, client) in [("alice", alice), ("bob", bob)] {
        let receipt = wait_bot_event(client, room, bot, "org.mxpay.receipt", |c| {
            c["status"] == "completed"
        })
        .await;
        let content = receipt.content();
        assert_eq!(content["payer"], alice.user.user_id.as_str(), "{who}");
        assert_eq!(content["payee"], bob_id, "{who}");
        assert_eq!(content["amount"], "12.50", "{who}");
        assert_eq!(content["m.relates_to"]["rel_type"], "m.reference");
        assert_eq!(content["m.relates_to"]["event_id"], pay.as_str());
        wait_notice(client, room, bot, "paid").await;
    }
    wait_bot_event(alice, dm, bot, "org.mxpay.receipt", |c| {
        c["status"] == "completed"
    })
    .await;

    balance_is(alice, dm, bot, "87.50 EUR").await;

    // Bob has no DM yet: asking in the group room, the bot invites him to one and answers there.
    send_text(bob, room, "!balance").await;
    wait_notice(bob, room, bot, "invited you to a private").await;
    let bob_dm = join_bot_dm(bob).await;
    wait_notice(bob, &bob_dm, bot, "Welcome").await;
    balance_is(bob, &bob_dm, bot, "12.50 EUR").await;

    // Every org.mxpay.* event the bot sent matches its published schema.
    assert!(
        bot_events_match_schemas(alice, bot) >= 3,
        "challenge, room and DM receipts"
    );
    assert!(bot_events_match_schemas(bob, bot) >= 1);
}

/// Waits for a receipt from the bot in `room_id` with `status` and (if given) `reason`,
/// answering `answered`.
pub(crate) async fn wait_receipt(
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
pub(crate) struct Scene {
    pub(crate) lease: SlotLease,
    pub(crate) admin_key: Vec<u8>,
    pub(crate) mxpay: MxpayProcess,
    pub(crate) bot: String,
    pub(crate) alice: TestClient,
    pub(crate) bob: TestClient,
    pub(crate) dm: OwnedRoomId,
    pub(crate) room: OwnedRoomId,
}

pub(crate) async fn scene(label: &str, stepup_timeout_ms: u64, funds: &str) -> Scene {
    scene_with(label, stepup_timeout_ms, funds, |_| MxpayOptions::default()).await
}

/// [`scene`] with mxpay options made from the lease (e.g. a fault switch naming a file in
/// the lease dir).
async fn scene_with(
    label: &str,
    stepup_timeout_ms: u64,
    funds: &str,
    options: impl FnOnce(&SlotLease) -> MxpayOptions,
) -> Scene {
    scene_configured(
        label,
        stepup_timeout_ms,
        funds,
        "  hold_for_new_payees: false\n",
        options,
    )
    .await
}

/// [`scene_with`] with these `payments:` keys (indented lines) instead of the default ones.
pub(crate) async fn scene_configured(
    label: &str,
    stepup_timeout_ms: u64,
    funds: &str,
    payments_yaml: &str,
    options: impl FnOnce(&SlotLease) -> MxpayOptions,
) -> Scene {
    let alice_user = support::user("alice").await;
    let bob_user = support::user("bob").await;
    let (lease, admin_key) = payments_lease_with(label, stepup_timeout_ms, payments_yaml).await;
    let mxpay = MxpayProcess::start_with(&lease, options(&lease)).await;
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

    /// alice asks in the room to pay bob `amount` EUR (written with its two decimals, as the
    /// challenge shows it) and waits for the challenge in her DM; returns the `!pay` event.
    async fn alice_asks_to_pay_bob(&self, amount: &str) -> OwnedEventId {
        let pay = send_text(
            &self.alice,
            &self.room,
            &format!("!pay {} {amount} EUR", self.bob_id()),
        )
        .await;
        wait_notice(
            &self.alice,
            &self.dm,
            &self.bot,
            &format!("Confirm paying {amount} EUR"),
        )
        .await;
        pay
    }

    /// [`Self::alice_asks_to_pay_bob`], confirmed with `pin`; waits until bob sees the
    /// completed receipt.
    async fn alice_pays_bob(&self, amount: &str, pin: &str) -> OwnedEventId {
        let pay = self.alice_asks_to_pay_bob(amount).await;
        send_text(&self.alice, &self.dm, pin).await;
        wait_receipt(&self.bob, &self.room, &self.bot, &pay, "completed", None).await;
        pay
    }

    /// alice invites `who` into the scene's room; waits until they joined.
    async fn bring_into_room(&self, who: &TestClient) {
        self.alice
            .room(&self.room)
            .await
            .invite_user_by_id(&who.user.user_id)
            .await
            .expect("invite");
        who.join(&self.room).await;
        self.alice
            .wait_for_membership(&self.room, who.user.user_id.as_str(), "join")
            .await;
    }

    /// A new encrypted room of alice, bob and the bot where the bot may redact
    /// (`trusted_private_chat` gives invitees full power), everyone joined.
    async fn redacting_room(&self) -> OwnedRoomId {
        let room = self
            .alice
            .create_room(RoomOptions {
                encrypted: true,
                preset: Some(RoomPreset::TrustedPrivateChat),
                invite: vec![
                    self.bot.as_str().try_into().unwrap(),
                    self.bob.user.user_id.clone(),
                ],
                ..Default::default()
            })
            .await
            .room_id()
            .to_owned();
        self.alice
            .wait_for_membership(&room, &self.bot, "join")
            .await;
        self.bob.join(&room).await;
        self.alice
            .wait_for_membership(&room, self.bob_id(), "join")
            .await;
        room
    }

    /// `!balance` in alice's DM; waits for the answer naming `expected` (e.g. `20.00 EUR`).
    async fn alice_balance_is(&self, expected: &str) {
        balance_is(&self.alice, &self.dm, &self.bot, expected).await;
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
    s.bring_into_room(&carol).await;
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

    // A PIN typed in the group room while a payment waits for it, where the bot cannot
    // redact (private_chat preset: the bot has power 0): the PIN counts as exposed and blocks
    // payments until it is changed. (Four digits while nothing waits are left alone: see
    // `pins_in_other_shapes_are_recognised_and_numbers_in_chat_are_left_alone`.)
    let waiting = send_text(alice, room, &format!("!pay {} 1 EUR", s.bob_id())).await;
    wait_notice(alice, &s.dm, bot, "Confirm paying 1.00 EUR").await;
    send_text(alice, room, PIN).await;
    wait_notice(alice, room, bot, "treat that PIN as known to others").await;
    let blocked = send_text(alice, room, &format!("!pay {} 1 EUR", s.bob_id())).await;
    wait_receipt(alice, room, bot, &blocked, "declined", Some("pin_locked")).await;

    // Where the bot may redact (a trusted_private_chat room gives invitees full power), it
    // removes the PIN and says so.
    let trusted = s.redacting_room().await;
    let exposed = send_text(alice, &trusted, "1111").await;
    wait_notice(
        alice,
        &trusted,
        bot,
        "I removed your message and did not use it",
    )
    .await;
    wait_redacted(&s.bob, &trusted, &exposed).await;

    // `!pin change` needs the old PIN; then paying works again.
    let dm = &s.dm;
    send_text(alice, dm, "!pin change").await;
    wait_notice(alice, dm, bot, "first send your current PIN").await;
    send_text(alice, dm, "0000").await;
    wait_notice(alice, dm, bot, "Wrong PIN. 4 attempts left").await;
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "Now send your new 4-digit PIN").await;
    // A PIN from the blocklist (NIST SP 800-63B) is refused and another one asked for.
    send_text(alice, dm, "9876").await;
    wait_notice(alice, dm, bot, "That PIN is too easy to guess").await;
    send_text(alice, dm, "1357").await;
    wait_notice(alice, dm, bot, "Send the same PIN again").await;
    send_text(alice, dm, "1357").await;
    wait_notice(alice, dm, bot, "Your PIN is changed").await;
    // The payment that waited through all this is cancelled, so the next PIN has one to confirm.
    send_text(alice, dm, "!cancel").await;
    wait_receipt(alice, room, bot, &waiting, "declined", None).await;
    s.alice_pays_bob("2.00", "1357").await;
    s.alice_balance_is("18.00 EUR").await;
    // Declined receipts too match the schema.
    assert!(bot_events_match_schemas(alice, bot) >= 8);
}

#[tokio::test]
async fn a_cross_signing_reset_blocks_payments_until_the_pin_accepts_the_new_keys() {
    let s = scene("identity", 120_000, "20.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    alice.reset_cross_signing().await;

    // The bot hears of the new keys through the homeserver's device-list notice, which may
    // trail alice's next message: a payment the bot still takes (it asks for the PIN) is
    // cancelled and asked again, a bounded number of times.
    let mut refused = None;
    for attempt in 1..=20u32 {
        let amount = format!("1.{attempt:02}");
        let pay = send_text(alice, room, &format!("!pay {} {amount} EUR", s.bob_id())).await;
        let asked = format!("Confirm paying {amount} EUR");
        let seen = alice
            .wait_for_event("the payment's receipt or its PIN challenge", |e| {
                (e.room_id == *room
                    && e.event_type() == "org.mxpay.receipt"
                    && e.content()["m.relates_to"]["event_id"] == pay.as_str())
                    || (e.room_id == *dm
                        && e.sender() == bot
                        && e.body().is_some_and(|b| b.contains(&asked)))
            })
            .await;
        if seen.event_type() == "org.mxpay.receipt" {
            refused = Some(seen);
            break;
        }
        let cancel = send_text(alice, dm, "!cancel").await;
        alice
            .wait_for_event("the answer to !cancel", |e| {
                e.room_id == *dm
                    && e.sender() == bot
                    && e.content()["m.relates_to"]["m.in_reply_to"]["event_id"] == cancel.as_str()
            })
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let refused = refused.expect("the bot never noticed the new cross-signing keys");
    assert_eq!(refused.content()["status"], "declined");
    assert_eq!(refused.content()["reason"], "identity_changed");
    wait_notice(
        alice,
        room,
        bot,
        "security keys changed since I first saw them",
    )
    .await;
    wait_notice(
        alice,
        dm,
        bot,
        "If it was you, send your PIN here to confirm",
    )
    .await;

    // A wrong PIN does not accept the keys and counts as a wrong attempt.
    send_text(alice, dm, "0000").await;
    wait_notice(alice, dm, bot, "Wrong PIN. 4 attempts left").await;
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "I accept your new security keys").await;

    // Paying works again, from the same device under its new identity.
    s.alice_pays_bob("2.00", PIN).await;
    s.alice_balance_is("18.00 EUR").await;
    assert!(bot_events_match_schemas(alice, bot) >= 2);
}

/// Without a PIN, nothing the user knows can confirm changed keys: once their wallet has held
/// money, `!pin set` from the new identity is refused until the operator confirms the keys
/// (a PIN reset with `accept_new_keys`); then setting the PIN accepts them.
#[tokio::test]
async fn without_a_pin_only_the_operator_confirms_the_changed_keys_of_a_funded_wallet() {
    let s = scene("keys-operator", 120_000, "20.00").await;
    let bot = s.bot.as_str();
    let carol_user = support::user("carol").await;
    let carol = support::client(&carol_user).await;
    carol.bootstrap_cross_signing().await;
    let dm = open_dm(&carol, bot).await;
    let carol_id = carol.user.user_id.as_str();
    // A first command makes the room carol's DM with the bot; decrypting it, the bot learns
    // (and pins) her first identity.
    send_text(&carol, &dm, "!balance").await;
    wait_notice(&carol, &dm, bot, "Your wallet is empty").await;
    topup(&s.mxpay.url, &s.admin_key, carol_id, "5.00", "EUR").await;
    wait_notice(&carol, &dm, bot, "topped up").await;
    balance_is(&carol, &dm, bot, "5.00 EUR").await;
    carol.reset_cross_signing().await;

    let prompts = || {
        carol
            .seen_events()
            .iter()
            .filter(|e| {
                e.room_id == dm
                    && e.sender() == bot
                    && e.body().is_some_and(|b| b.contains("Choose a 4-digit PIN"))
            })
            .count()
    };
    // The bot hears of the new keys through the homeserver's device-list notice, which may
    // trail carol's next message: asked again (bounded) until the change shows.
    let mut refused = false;
    for _ in 0..20 {
        let before = prompts();
        let asked = send_text(&carol, &dm, "!pin set").await;
        let answer = carol
            .wait_for_event("the answer to !pin set", |e| {
                (e.room_id == dm
                    && e.sender() == bot
                    && e.content()["m.relates_to"]["m.in_reply_to"]["event_id"] == asked.as_str())
                    || prompts() > before
            })
            .await;
        if answer
            .body()
            .is_some_and(|b| b.contains("Ask the operator"))
        {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(refused, "the bot never noticed carol's new keys");

    let response = reqwest::Client::new()
        .post(format!(
            "{}/_mxpay/admin/v1/users/{}/pin-reset",
            s.mxpay.url,
            carol_id.replace('@', "%40").replace(':', "%3A")
        ))
        .bearer_auth(crate::admin::mint(
            &s.admin_key,
            &[mxpay::admin::token::Scope::PinReset],
        ))
        .header("content-type", "application/json")
        .body(serde_json::json!({"accept_new_keys": true}).to_string())
        .send()
        .await
        .expect("reach the admin API");
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.text().await.unwrap_or_default()
    );
    let before = prompts();
    send_text(&carol, &dm, "!pin set").await;
    wait_notice(
        &carol,
        &dm,
        bot,
        "I accepted your account's new security keys",
    )
    .await;
    carol
        .wait_for_event("the PIN prompt", |_| prompts() > before)
        .await;
}

#[tokio::test]
async fn five_wrong_pins_lock_the_pin_and_cancel_the_payment() {
    // At trace level, so the log check below covers every line mxpay can write.
    let s = scene_with("lock", 120_000, "20.00", |_| MxpayOptions {
        env: vec![("RUST_LOG".to_owned(), "trace".to_owned())],
        ..Default::default()
    })
    .await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let pay = s.alice_asks_to_pay_bob("5.00").await;
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

    // No PIN in the log, as a JSON string, a Debug string or a field value.
    let log = s.mxpay.log();
    assert!(log.len() > 100_000, "trace logging was on");
    for pin in [PIN, "0000"] {
        for form in [
            format!("\"{pin}\""),
            format!("\\\"{pin}\\\""),
            format!("={pin} "),
            format!(": {pin}\n"),
        ] {
            assert!(!log.contains(&form), "the log holds a PIN as {form}");
        }
    }
}

/// Sends `pin` in `dm` as a reply to the bot's notice `notice` (as clients reply).
pub(crate) async fn send_pin_reply(client: &TestClient, dm: &RoomId, notice: &str) -> OwnedEventId {
    let content = serde_json::json!({
        "msgtype": "m.text",
        "body": PIN,
        "m.relates_to": {"m.in_reply_to": {"event_id": notice}},
    });
    client
        .room(dm)
        .await
        .send_raw("m.room.message", content)
        .await
        .unwrap_or_else(|e| panic!("{} sending a PIN reply: {e}", client.user.user_id))
        .response
        .event_id
}

/// H1: with two payments waiting, a plain PIN confirms neither (it used to pay the oldest);
/// the bot lists them, a PIN replying to one's notice pays exactly that one, and `!cancel`
/// voids the other.
#[tokio::test]
async fn a_plain_pin_with_two_payments_waiting_pays_neither_until_one_is_chosen() {
    let s = scene("which", 120_000, "30.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let first = send_text(alice, room, &format!("!pay {} 15 EUR", s.bob_id())).await;
    wait_notice(alice, dm, bot, "Confirm paying 15.00 EUR").await;
    let second = send_text(alice, room, &format!("!pay {} 5 EUR", s.bob_id())).await;
    let second_notice = wait_notice(alice, dm, bot, "Confirm paying 5.00 EUR").await;

    let bare = send_text(alice, dm, PIN).await;
    let which = wait_notice(alice, dm, bot, "Several payments are waiting").await;
    let listed = which.body().unwrap();
    for part in [
        "15.00 EUR",
        "5.00 EUR",
        s.bob_id(),
        room.as_str(),
        "!cancel",
    ] {
        assert!(listed.contains(part), "{listed}");
    }
    wait_redacted(alice, dm, &bare).await;
    // Nothing moved: both amounts are still only reserved.
    s.alice_balance_is("10.00 EUR (20.00 EUR reserved)").await;

    send_pin_reply(alice, dm, second_notice.event_id()).await;
    wait_receipt(alice, room, bot, &second, "completed", None).await;
    wait_receipt(&s.bob, room, bot, &second, "completed", None).await;

    let cancel = send_text(alice, dm, "!cancel").await;
    let told = alice
        .wait_for_event("the answer to !cancel", |e| {
            e.room_id == *dm
                && e.sender() == bot
                && e.content()["m.relates_to"]["m.in_reply_to"]["event_id"] == cancel.as_str()
        })
        .await;
    let body = told.body().unwrap_or_default();
    assert!(
        body.contains("Cancelled") && body.contains("15.00 EUR"),
        "{body}"
    );
    assert_eq!(
        body.lines().filter(|l| l.starts_with('•')).count(),
        1,
        "only the unpaid one: {body}"
    );
    wait_receipt(alice, room, bot, &first, "declined", None).await;
    s.alice_balance_is("25.00 EUR").await;
}

/// M2: a post the ledger refuses after the right PIN (the payee's wallet was frozen in the
/// meantime) voids the payment at once with the real reason; it used to drop the challenge and
/// leave the reservation to "expire without a PIN".
#[tokio::test]
async fn a_payment_refused_after_the_pin_is_voided_with_its_reason() {
    let s = scene("refused-post", 120_000, "20.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let pay = s.alice_asks_to_pay_bob("5.00").await;
    let response = reqwest::Client::new()
        .post(format!(
            "{}/_mxpay/admin/v1/users/{}/freeze",
            s.mxpay.url,
            s.bob_id().replace('@', "%40").replace(':', "%3A")
        ))
        .bearer_auth(crate::admin::mint(
            &s.admin_key,
            &[mxpay::admin::token::Scope::Freeze],
        ))
        .header("content-type", "application/json")
        .body(r#"{"mode":"all"}"#)
        .send()
        .await
        .expect("freeze");
    assert_eq!(response.status(), 200);
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "could not be completed").await;
    wait_receipt(
        alice,
        room,
        bot,
        &pay,
        "declined",
        Some("payee_not_allowed"),
    )
    .await;
    s.alice_balance_is("20.00 EUR").await;
}

/// M3: when the room cannot be told (the bot was kicked after the PIN prompt), the payer
/// still gets the receipt in the DM; it used to be skipped with the room's.
#[tokio::test]
async fn the_dm_receipt_goes_out_even_when_the_room_cannot_be_told() {
    let s = scene("kicked", 120_000, "20.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    s.alice_asks_to_pay_bob("5.00").await;
    let bot_id = matrix_sdk::ruma::OwnedUserId::try_from(bot).expect("bot id");
    alice
        .room(room)
        .await
        .kick_user(&bot_id, Some("test: the room is gone for the bot"))
        .await
        .expect("kick the bot");
    alice.wait_for_membership(room, bot, "leave").await;
    send_text(alice, dm, PIN).await;
    wait_bot_event(alice, dm, bot, "org.mxpay.receipt", |c| {
        c["status"] == "completed"
    })
    .await;
    s.alice_balance_is("15.00 EUR").await;
}

/// M7: a PIN sent in the recorded DM after someone else was invited there is not used (the
/// room is no longer private); it used to confirm the payment.
#[tokio::test]
async fn a_pin_in_a_dm_that_is_no_longer_private_is_not_used() {
    let s = scene("not-private", 120_000, "20.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let pay = s.alice_asks_to_pay_bob("5.00").await;
    alice
        .room(dm)
        .await
        .invite_user_by_id(&s.bob.user.user_id)
        .await
        .expect("invite bob into the DM");
    alice.wait_for_membership(dm, s.bob_id(), "invite").await;
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "never send your PIN in a shared room").await;
    // Not confirmed: the amount is still only reserved (the payment expires or is cancelled).
    send_text(alice, room, "!cancel").await;
    wait_receipt(alice, room, bot, &pay, "declined", None).await;
}

/// L3/L4: a PIN is recognised whatever its shape (a step-up response whose `pin` is not 4
/// digits is still removed; an edit is a PIN answer; a PIN sent unencrypted is never used and
/// counts as exposed), and four digits in a shared room while nothing waits for a PIN are
/// chat, left alone.
#[tokio::test]
async fn pins_in_other_shapes_are_recognised_and_numbers_in_chat_are_left_alone() {
    let s = scene("pinlike", 120_000, "20.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);

    // A shared room where the bot could redact (trusted_private_chat gives invitees full
    // power). A year in the conversation, while no payment or PIN dialog waits, stays.
    let shared = s.redacting_room().await;
    let year = send_text(alice, &shared, "1990").await;
    // The bot handles events in order: once it answered the next message, it has passed the
    // year by (and a redaction of it would have reached alice's client first).
    send_text(alice, &shared, "!balance").await;
    wait_notice(alice, &shared, bot, "I answered in our private chat").await;
    let seen = alice.seen_events();
    assert!(
        !seen.iter().any(|e| e.event_type() == "m.room.redaction"
            && (e.content()["redacts"] == year.as_str() || e.json["redacts"] == year.as_str())),
        "a number in chat was redacted"
    );
    assert!(
        !seen.iter().any(|e| e.room_id == shared
            && e.sender() == bot
            && e.body().is_some_and(|b| b.contains("PIN"))),
        "the bot said something about a PIN"
    );

    // A step-up response whose pin is not 4 digits (a mistyped PIN, maybe) is removed too.
    let pay = send_text(alice, room, &format!("!pay {} 2 EUR", s.bob_id())).await;
    let challenge = wait_bot_event(alice, dm, bot, "org.mxpay.stepup.challenge", |c| {
        c["amount"] == "2.00"
    })
    .await;
    let response = alice
        .room(dm)
        .await
        .send_raw(
            "org.mxpay.stepup.response",
            serde_json::json!({
                "body": "PIN confirmation",
                "challenge_id": challenge.content()["challenge_id"],
                "pin": "12345",
            }),
        )
        .await
        .expect("send the response")
        .response
        .event_id;
    wait_redacted(alice, dm, &response).await;
    wait_notice(alice, dm, bot, "A PIN is exactly 4 digits").await;

    // A PIN sent as an edit of an earlier message confirms the payment; the edit and the
    // message it edited are both removed.
    let draft = send_text(alice, dm, "48").await;
    let edit = alice
        .room(dm)
        .await
        .send_raw(
            "m.room.message",
            serde_json::json!({
                "msgtype": "m.text",
                "body": format!("* {PIN}"),
                "m.new_content": {"msgtype": "m.text", "body": PIN},
                "m.relates_to": {"rel_type": "m.replace", "event_id": draft},
            }),
        )
        .await
        .expect("send the edit")
        .response
        .event_id;
    wait_receipt(&s.bob, room, bot, &pay, "completed", None).await;
    wait_redacted(alice, dm, &edit).await;
    wait_redacted(alice, dm, &draft).await;

    // A PIN sent unencrypted into the DM is not used, and the PIN is blocked until changed.
    s.alice_asks_to_pay_bob("1.00").await;
    let plain = send_plaintext(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "reached me unencrypted").await;
    wait_redacted(alice, dm, &plain).await;
    let blocked = send_text(alice, room, &format!("!pay {} 1 EUR", s.bob_id())).await;
    wait_receipt(alice, room, bot, &blocked, "declined", Some("pin_locked")).await;
    s.alice_balance_is("17.00 EUR (1.00 EUR reserved)").await;
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

#[tokio::test]
async fn transfer_intent_pays_once_even_replayed_and_withdraw_waits_for_settlement() {
    let s = scene("intent", 120_000, "50.00").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);

    // Pay with the typed event instead of text.
    let intent = alice
        .room(room)
        .await
        .send_raw(
            "org.mxpay.transfer_intent",
            serde_json::json!({
                "body": format!("!pay {} 3.00 EUR coffee", s.bob_id()),
                "payee": s.bob_id(), "amount": "3.00", "currency": "EUR", "memo": "coffee",
            }),
        )
        .await
        .expect("send the intent")
        .response
        .event_id;
    wait_notice(alice, dm, bot, "Confirm paying 3.00 EUR").await;
    send_text(alice, dm, PIN).await;
    wait_receipt(&s.bob, room, bot, &intent, "completed", None).await;
    s.alice_balance_is("47.00 EUR").await;

    // The homeserver delivers the same (encrypted) event again in a new transaction.
    let raw = raw_event(alice, room, &intent).await;
    assert_eq!(raw["type"], "m.room.encrypted");
    let replay_txn = format!("replay-{}", support::random_suffix(8));
    let replay_body = serde_json::json!({ "events": [raw] });
    let hs_token = Some(s.lease.spec.hs_token.as_str());
    let (status, _) = s
        .mxpay
        .put_transaction(&replay_txn, &replay_body, hs_token)
        .await;
    assert_eq!(status, 200);
    // And that transaction again (same id): acknowledged, not handled again.
    let (status, _) = s
        .mxpay
        .put_transaction(&replay_txn, &replay_body, hs_token)
        .await;
    assert_eq!(status, 200);
    // Transactions are handled in order: once `!balance` is answered, the replay was handled.
    s.alice_balance_is("47.00 EUR").await;
    let challenges = alice
        .seen_events()
        .iter()
        .filter(|e| {
            e.room_id == *dm
                && e.event_type() == "org.mxpay.stepup.challenge"
                && e.content()["amount"] == "3.00"
        })
        .count();
    assert_eq!(challenges, 1, "the replayed event asked for no second PIN");

    // Withdraw: PIN step-up, then a reservation for the settlement account until the admin
    // settles it.
    let withdraw = send_text(alice, dm, "!withdraw 10 EUR").await;
    wait_notice(alice, dm, bot, "Confirm withdrawing 10.00 EUR").await;
    send_text(alice, dm, PIN).await;
    wait_notice(alice, dm, bot, "Withdrawal of 10.00 EUR confirmed").await;
    s.alice_balance_is("37.00 EUR (10.00 EUR reserved)").await;
    let id = mxpay::ledger::TransferId::from_key(withdraw.as_str());
    let response = reqwest::Client::new()
        .post(format!(
            "{}/_mxpay/admin/v1/withdrawals/{id}/settle",
            s.mxpay.url
        ))
        .bearer_auth(crate::admin::mint(
            &s.admin_key,
            &[mxpay::admin::token::Scope::Settle],
        ))
        .send()
        .await
        .expect("settle");
    assert_eq!(response.status(), 200);
    wait_notice(alice, dm, bot, "Your withdrawal of 10.00 EUR was paid out").await;
    s.alice_balance_is("37.00 EUR").await;
    assert!(
        bot_events_match_schemas(alice, bot) >= 4,
        "two challenges, two receipts"
    );
}

/// The event `event_id` of `room_id` as the homeserver holds it (encrypted if it was).
async fn raw_event(client: &TestClient, room_id: &RoomId, event_id: &OwnedEventId) -> Value {
    let token = client.inner().access_token().expect("logged in");
    reqwest::Client::new()
        .get(format!(
            "{}/_matrix/client/v3/rooms/{room_id}/event/{event_id}",
            support::synapse().url
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("fetch the event")
        .json()
        .await
        .expect("event JSON")
}

/// Delivers `events` to mxpay in a transaction of its own, as the homeserver would.
async fn deliver(s: &Scene, events: Vec<Value>) {
    let txn_id = format!("it-{}", support::random_suffix(10));
    let (status, _) = s
        .mxpay
        .put_transaction(
            &txn_id,
            &serde_json::json!({ "events": events }),
            Some(s.lease.spec.hs_token.as_str()),
        )
        .await;
    assert_eq!(status, 200);
}

/// The bot's receipts in `room_id` (as `client` saw them) answering `event_id`.
fn receipts_for(client: &TestClient, room_id: &RoomId, event_id: &OwnedEventId) -> Vec<Value> {
    client
        .seen_events()
        .iter()
        .filter(|e| {
            e.room_id == room_id
                && e.event_type() == "org.mxpay.receipt"
                && e.content()["m.relates_to"]["event_id"] == event_id.as_str()
        })
        .map(|e| e.content().clone())
        .collect()
}

/// M1: a payment request that reaches the bot after the step-up window (mxpay was down) starts
/// nothing: it is declined with `too_late`, once, however often it is delivered. A late
/// *replay* of a request that did start a payment is not declined. (A request's ciphertext
/// under another event id is a replay and is ignored: see `replay`.)
#[tokio::test]
async fn a_late_payment_request_starts_nothing_and_a_replayed_started_one_is_not_declined() {
    const STEPUP_TIMEOUT_MS: u64 = 10_000;
    let mut s = scene("late", STEPUP_TIMEOUT_MS, "20.00").await;
    let (bot, room) = (s.bot.clone(), s.room.clone());

    // A payment made the normal way.
    let pay = s.alice_asks_to_pay_bob("5.00").await;
    send_text(&s.alice, &s.dm, PIN).await;
    wait_receipt(&s.alice, &room, &bot, &pay, "completed", None).await;
    let raw_pay = raw_event(&s.alice, &room, &pay).await;
    assert_eq!(raw_pay["type"], "m.room.encrypted");
    let hour_ago_ms = raw_pay["origin_server_ts"]
        .as_u64()
        .expect("origin_server_ts")
        - 3_600_000;

    // A request sent while mxpay is down reaches it only after the step-up window.
    s.mxpay.kill().await;
    let late = send_text(&s.alice, &room, &format!("!pay {} 3.00 EUR", s.bob_id())).await;
    tokio::time::sleep(std::time::Duration::from_millis(STEPUP_TIMEOUT_MS + 1_000)).await;
    s.mxpay.start_again().await;
    let alice = &s.alice;
    wait_receipt(alice, &room, &bot, &late, "declined", Some("too_late")).await;
    let notice = wait_notice(alice, &room, &bot, "arrived too late").await;
    let body = notice.body().unwrap_or_default();
    assert!(
        body.contains("seconds ago") && body.contains("nothing was paid"),
        "{body}"
    );
    // Delivered again: the same decision, sent with the same transaction ids (shown once).
    let raw_late = raw_event(alice, &room, &late).await;
    deliver(&s, vec![raw_late]).await;

    // The started payment delivered again, now an hour old: it carries on (it ended: nothing
    // to say), it is not declined as late.
    let mut replay = raw_pay;
    replay["origin_server_ts"] = hour_ago_ms.into();
    deliver(&s, vec![replay]).await;

    // Transactions are handled in order: once `!balance` is answered, all of the above was.
    s.alice_balance_is("15.00 EUR").await;
    let late_receipts = receipts_for(alice, &room, &late);
    assert_eq!(late_receipts.len(), 1, "{late_receipts:?}");
    let pay_receipts = receipts_for(alice, &room, &pay);
    assert_eq!(pay_receipts.len(), 1, "{pay_receipts:?}");
    assert_eq!(pay_receipts[0]["status"], "completed");
    assert!(bot_events_match_schemas(alice, &bot) >= 3);
}

/// The value of `series` in mxpay's metrics (0 when absent).
pub(crate) async fn metric(mxpay: &MxpayProcess, series: &str) -> f64 {
    support::metric_value(&mxpay.metrics().await, series).unwrap_or(0.0)
}

/// Waits until mxpay retried a failed transaction at least `retries` times in all.
pub(crate) async fn wait_retries(mxpay: &MxpayProcess, retries: f64) {
    support::eventually("mxpay to retry the failing transaction", || async {
        (metric(mxpay, r#"mxpay_errors_total{kind="send_transient"}"#).await >= retries)
            .then_some(())
    })
    .await;
}

/// A scene whose replies of `purpose` fail (retryably) until the returned file exists.
async fn scene_with_failing_reply(label: &str, purpose: &str) -> (Scene, PathBuf) {
    let mut gate = PathBuf::new();
    let s = scene_with(label, 120_000, "20.00", |lease| {
        gate = lease.dir.join("let-replies-through");
        MxpayOptions {
            env: vec![(
                mxpay::payments::FAULT_FAIL_REPLY_ENV.to_owned(),
                format!("{purpose}:{}", gate.display()),
            )],
            ..Default::default()
        }
    })
    .await;
    (s, gate)
}

/// L1: a refusal whose reply failed is sent again as decided, not decided again: while the
/// transaction is retried the refusal's reason goes away (the payee joins the room), and the
/// payment is still the refused one. (An amount the balance did not cover would not show it:
/// the ledger keeps a refused transfer id's result.)
#[tokio::test]
async fn a_refusal_whose_reply_failed_is_repeated_not_decided_again() {
    let (s, gate) = scene_with_failing_reply("decline-retry", "decline-receipt").await;
    let (alice, bot, room) = (&s.alice, s.bot.as_str(), &s.room);
    let carol_user = support::user("carol").await;
    let carol = support::client(&carol_user).await;
    let before = metric(&s.mxpay, r#"mxpay_errors_total{kind="send_transient"}"#).await;
    let pay = send_text(alice, room, &format!("!pay {} 5 EUR", carol_user.user_id)).await;
    // Refused (carol is not in the room); telling so fails, and the transaction is retried.
    wait_retries(&s.mxpay, before + 2.0).await;
    // Meanwhile carol joins: the payment would now be allowed.
    s.bring_into_room(&carol).await;
    std::fs::write(&gate, b"").expect("open the gate");
    wait_receipt(
        alice,
        room,
        bot,
        &pay,
        "declined",
        Some("payee_not_allowed"),
    )
    .await;
    wait_notice(alice, room, bot, "is not a member of this room").await;
    // Nothing was reserved or asked for.
    s.alice_balance_is("20.00 EUR").await;
    assert!(
        !alice.seen_events().iter().any(|e| e
            .body()
            .is_some_and(|b| b.contains("Confirm paying 5.00 EUR"))),
        "the retry decided again and started the payment"
    );
    assert_eq!(receipts_for(alice, room, &pay).len(), 1);
}

/// L2: a wrong PIN whose reply failed counts once, however often its transaction is retried.
#[tokio::test]
async fn a_wrong_pin_whose_reply_failed_counts_once() {
    let (s, gate) = scene_with_failing_reply("pin-retry", "stepup-wrong").await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let pay = s.alice_asks_to_pay_bob("5.00").await;
    let before = metric(&s.mxpay, r#"mxpay_errors_total{kind="send_transient"}"#).await;
    send_text(alice, dm, "0000").await;
    wait_retries(&s.mxpay, before + 2.0).await;
    std::fs::write(&gate, b"").expect("open the gate");
    wait_notice(alice, dm, bot, "Wrong PIN. 4 attempts left").await;
    assert_eq!(metric(&s.mxpay, "mxpay_pin_failures_total").await, 1.0);
    // The next wrong PIN is the second attempt, and the right one still pays.
    send_text(alice, dm, "0000").await;
    wait_notice(alice, dm, bot, "Wrong PIN. 3 attempts left").await;
    send_text(alice, dm, PIN).await;
    wait_receipt(alice, room, bot, &pay, "completed", None).await;
    s.alice_balance_is("15.00 EUR").await;
}

/// A PIN-dialog step whose answer failed to go out is answered again as decided: the retried
/// message is not taken as the next step's answer (here: the old PIN of `!pin change` would
/// become the new PIN's first entry).
#[tokio::test]
async fn a_pin_dialog_step_whose_reply_failed_is_not_taken_twice() {
    let mut gate = PathBuf::new();
    let s = scene_with("dialog-retry", 120_000, "20.00", |lease| {
        gate = lease.dir.join("let-replies-through");
        // Open while the scene sets alice's PIN; closed below.
        std::fs::write(&gate, b"").expect("open the gate");
        MxpayOptions {
            env: vec![(
                mxpay::payments::FAULT_FAIL_REPLY_ENV.to_owned(),
                format!("pin-dialog:{}", gate.display()),
            )],
            ..Default::default()
        }
    })
    .await;
    let (alice, bot, dm) = (&s.alice, s.bot.as_str(), &s.dm);
    let confirm_prompts = || {
        alice
            .seen_events()
            .iter()
            .filter(|e| {
                e.room_id == *dm
                    && e.sender() == bot
                    && e.body()
                        .is_some_and(|b| b.contains("Send the same PIN again"))
            })
            .count()
    };
    // Setting the PIN in the scene asked once already.
    let prompts_before = confirm_prompts();
    send_text(alice, dm, "!pin change").await;
    wait_notice(alice, dm, bot, "first send your current PIN").await;
    std::fs::remove_file(&gate).expect("close the gate");
    let before = metric(&s.mxpay, r#"mxpay_errors_total{kind="send_transient"}"#).await;
    send_text(alice, dm, PIN).await;
    wait_retries(&s.mxpay, before + 2.0).await;
    std::fs::write(&gate, b"").expect("open the gate");
    wait_notice(alice, dm, bot, "Now send your new 4-digit PIN").await;
    send_text(alice, dm, "1357").await;
    wait_notice(alice, dm, bot, "Send the same PIN again").await;
    send_text(alice, dm, "1357").await;
    wait_notice(alice, dm, bot, "Your PIN is changed").await;
    assert_eq!(
        confirm_prompts(),
        prompts_before + 1,
        "the old PIN was taken as the new one"
    );
}

#[tokio::test]
async fn a_crash_between_the_ledger_post_and_the_receipt_is_repaired_on_restart() {
    let mut s = scene_with("outbox", 120_000, "20.00", |lease| MxpayOptions {
        env: vec![(
            mxpay::payments::FAULT_CRASH_BEFORE_RECEIPT_ENV.to_owned(),
            lease.dir.join("crashed").display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    let (bot, room, dm) = (s.bot.clone(), s.room.clone(), s.dm.clone());
    let pay = send_text(&s.alice, &room, &format!("!pay {} 4 EUR", s.bob_id())).await;
    wait_notice(&s.alice, &dm, &bot, "Confirm paying 4.00 EUR").await;
    send_text(&s.alice, &dm, PIN).await;

    // The money moved, then mxpay died before telling anyone.
    s.mxpay.wait_exit().await;
    assert!(s.lease.dir.join("crashed").exists(), "the fault fired");
    assert!(
        s.mxpay
            .log()
            .contains("test fault: aborting after the ledger post"),
        "mxpay died at the fault, not elsewhere"
    );
    let receipts = |client: &TestClient, room_id: &RoomId| {
        client
            .seen_events()
            .iter()
            .filter(|e| {
                e.room_id == room_id
                    && e.event_type() == "org.mxpay.receipt"
                    && e.content()["transfer_id"].is_string()
                    && e.content()["status"] == "completed"
            })
            .count()
    };
    assert_eq!(receipts(&s.bob, &room), 0, "no receipt before the restart");

    // After the restart the outbox finds the posted transfer past its cursor and tells.
    s.mxpay.start_again().await;
    wait_receipt(&s.bob, &room, &bot, &pay, "completed", None).await;
    wait_bot_event(&s.alice, &dm, &bot, "org.mxpay.receipt", |c| {
        c["status"] == "completed"
    })
    .await;
    s.alice_balance_is("16.00 EUR").await;
    // Once: a later change is told after this one, and nothing was repeated.
    let second = send_text(&s.alice, &room, &format!("!pay {} 1 EUR", s.bob_id())).await;
    wait_notice(&s.alice, &dm, &bot, "Confirm paying 1.00 EUR").await;
    send_text(&s.alice, &dm, PIN).await;
    wait_receipt(&s.bob, &room, &bot, &second, "completed", None).await;
    support::eventually("the second receipt in the DM", || async {
        (receipts(&s.alice, &dm) >= 2).then_some(())
    })
    .await;
    s.alice_balance_is("15.00 EUR").await;
    assert_eq!(receipts(&s.bob, &room), 2, "each receipt once in the room");
    assert_eq!(receipts(&s.alice, &dm), 2, "each receipt once in the DM");
}

/// A small JSON Schema checker, enough for `docs/schemas/*.json`: `type`, `required`,
/// `properties`, `$ref` to `#/$defs/...`, `enum`, `const`, `pattern`, `maxLength`,
/// `minimum`. Any other validation keyword in a schema fails the test, so a schema cannot
/// silently ask for more than is checked.
mod schema {
    use serde_json::Value;

    const ANNOTATIONS: [&str; 5] = ["$schema", "$id", "title", "description", "$defs"];

    /// The schema of `event_type` from `docs/schemas/`.
    pub fn load(event_type: &str) -> Value {
        let path = crate::support::repo_dir()
            .join("docs/schemas")
            .join(format!("{event_type}.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no schema for {event_type} ({}): {e}", path.display()));
        serde_json::from_str(&text).expect("schema is JSON")
    }

    /// Every violation of `schema` by `value`, as `path: problem`.
    pub fn errors(schema: &Value, value: &Value) -> Vec<String> {
        let mut out = Vec::new();
        check(schema, schema, value, "$", &mut out);
        out
    }

    fn check(root: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
        let Some(rules) = schema.as_object() else {
            panic!("schema at {at} is not an object");
        };
        for (keyword, rule) in rules {
            match keyword.as_str() {
                k if ANNOTATIONS.contains(&k) => {}
                "$ref" => {
                    let name = rule
                        .as_str()
                        .and_then(|r| r.strip_prefix("#/$defs/"))
                        .expect("only #/$defs/ references");
                    check(root, &root["$defs"][name], value, at, out);
                }
                "type" => {
                    let ok = match rule.as_str().expect("one type name") {
                        "object" => value.is_object(),
                        "string" => value.is_string(),
                        "integer" => value.is_u64() || value.is_i64(),
                        "boolean" => value.is_boolean(),
                        "array" => value.is_array(),
                        other => panic!("unsupported type {other}"),
                    };
                    if !ok {
                        out.push(format!("{at}: not of type {rule}"));
                    }
                }
                "required" => {
                    for key in rule.as_array().expect("required is a list") {
                        let key = key.as_str().expect("required names");
                        if value.get(key).is_none() {
                            out.push(format!("{at}: `{key}` is missing"));
                        }
                    }
                }
                "properties" => {
                    for (key, sub) in rule.as_object().expect("properties is an object") {
                        if let Some(child) = value.get(key) {
                            check(root, sub, child, &format!("{at}.{key}"), out);
                        }
                    }
                }
                "enum" => {
                    if !rule.as_array().expect("enum list").contains(value) {
                        out.push(format!("{at}: {value} is not one of {rule}"));
                    }
                }
                "const" => {
                    if value != rule {
                        out.push(format!("{at}: {value} is not {rule}"));
                    }
                }
                "pattern" => {
                    let pattern = regex::Regex::new(rule.as_str().expect("pattern string"))
                        .expect("pattern compiles");
                    if value.as_str().is_some_and(|s| !pattern.is_match(s)) {
                        out.push(format!("{at}: {value} does not match {rule}"));
                    }
                }
                "maxLength" => {
                    let max = rule.as_u64().expect("maxLength number") as usize;
                    if value.as_str().is_some_and(|s| s.chars().count() > max) {
                        out.push(format!("{at}: longer than {max} characters"));
                    }
                }
                "minimum" => {
                    let min = rule.as_i64().expect("integer minimum");
                    if value.as_i64().is_some_and(|v| v < min) {
                        out.push(format!("{at}: below {min}"));
                    }
                }
                other => panic!("schema keyword `{other}` is not supported by this checker"),
            }
        }
    }

    /// Panics unless `content` is valid for `event_type`.
    pub fn assert_valid(event_type: &str, content: &Value) {
        let problems = errors(&load(event_type), content);
        assert!(
            problems.is_empty(),
            "{event_type} content does not match docs/schemas/{event_type}.json: {problems:?}\n{content:#}"
        );
    }
}

/// Checks every `org.mxpay.*` event the bot sent that `client` saw against its schema;
/// returns how many were checked.
pub(crate) fn bot_events_match_schemas(client: &TestClient, bot: &str) -> usize {
    let mut checked = 0;
    for event in client.seen_events() {
        if event.sender() == bot && event.event_type().starts_with("org.mxpay.") {
            schema::assert_valid(event.event_type(), event.content());
            checked += 1;
        }
    }
    checked
}

#[test]
fn schemas_accept_the_rust_types_and_every_example_in_the_docs() {
    use matrix_sdk::ruma::events::relation::Reference;
    use matrix_sdk::ruma::{owned_event_id, owned_room_id, owned_user_id};
    use mxpay::events::*;
    use rust_decimal::Decimal;

    let receipt = ReceiptEventContent {
        body: "✅ paid".into(),
        status: ReceiptStatus::Completed,
        reason: None,
        transfer_id: Some("340282366920938463463374607431768211455".into()),
        payer: owned_user_id!("@alice:example.org"),
        payee: owned_user_id!("@bob:example.org"),
        amount: Decimal::new(1250, 2),
        currency: "EUR".into(),
        request_event_id: Some(owned_event_id!("$request")),
        merchant: None,
        order_ref: None,
        refund_of: Some(RefundOf {
            transfer_id: "7".into(),
            receipt_event_id: owned_event_id!("$receipt"),
        }),
        relates_to: Reference::new(owned_event_id!("$pay")),
    };
    schema::assert_valid(
        "org.mxpay.receipt",
        &serde_json::to_value(&receipt).unwrap(),
    );
    // Every reason code the bot can send is in the schema.
    for reason in [
        ReceiptReason::InsufficientFunds,
        ReceiptReason::LimitExceeded,
        ReceiptReason::PayeeNotAllowed,
        ReceiptReason::NotEncrypted,
        ReceiptReason::UntrustedDevice,
        ReceiptReason::PinLocked,
        ReceiptReason::PinNotSet,
        ReceiptReason::AccountFrozen,
        ReceiptReason::InvalidAmount,
        ReceiptReason::Timeout,
        ReceiptReason::TooLate,
        ReceiptReason::Other,
    ]
    .into_iter()
    .chain(
        mxpay::requests::RequestRefusal::ALL
            .into_iter()
            .map(|r| serde_json::from_value::<ReceiptReason>(r.code().into()).unwrap()),
    ) {
        let declined = ReceiptEventContent {
            status: ReceiptStatus::Declined,
            reason: Some(reason),
            transfer_id: None,
            ..receipt.clone()
        };
        schema::assert_valid(
            "org.mxpay.receipt",
            &serde_json::to_value(&declined).unwrap(),
        );
    }
    let challenge = StepUpChallengeEventContent {
        body: "Confirm".into(),
        challenge_id: format!("{:032x}", 42),
        payee: owned_user_id!("@bob:example.org"),
        amount: Decimal::new(1250, 2),
        currency: "EUR".into(),
        room_id: owned_room_id!("!room"),
        expires_at_ms: 1_795_000_000_000,
        relates_to: None,
    };
    schema::assert_valid(
        "org.mxpay.stepup.challenge",
        &serde_json::to_value(&challenge).unwrap(),
    );
    let response = StepUpResponseEventContent {
        body: "PIN confirmation".into(),
        challenge_id: format!("{:032x}", 42),
        pin: "4821".into(),
    };
    schema::assert_valid(
        "org.mxpay.stepup.response",
        &serde_json::to_value(&response).unwrap(),
    );
    let intent = TransferIntentEventContent {
        body: "!pay".into(),
        payee: owned_user_id!("@bob:example.org"),
        amount: Decimal::new(3, 0),
        currency: "EUR".into(),
        memo: Some("coffee".into()),
        request_event_id: None,
    };
    schema::assert_valid(
        "org.mxpay.transfer_intent",
        &serde_json::to_value(&intent).unwrap(),
    );
    let request = PaymentRequestEventContent {
        body: "@shop requests 4.20 EUR".into(),
        payee: owned_user_id!("@shop:example.org"),
        amount: Decimal::new(420, 2),
        currency: "EUR".into(),
        payer: None,
        memo: None,
        expires_at_ms: None,
        order_ref: Some("order-42".into()),
    };
    schema::assert_valid(
        "org.mxpay.payment_request",
        &serde_json::to_value(&request).unwrap(),
    );

    // The checker can fail: a receipt without status, with a comma amount, a bad reason.
    let mut bad = serde_json::to_value(&receipt).unwrap();
    bad.as_object_mut().unwrap().remove("status");
    bad["amount"] = "12,50".into();
    bad["reason"] = "bored".into();
    bad["m.relates_to"]["rel_type"] = "m.annotation".into();
    let problems = schema::errors(&schema::load("org.mxpay.receipt"), &bad);
    assert_eq!(problems.len(), 4, "{problems:?}");

    // Every ```json example in docs/events.md is a full event of a documented type.
    let docs = std::fs::read_to_string(support::repo_dir().join("docs/events.md")).unwrap();
    let mut examples = 0;
    for block in docs.split("```json\n").skip(1) {
        let json = block.split("\n```").next().unwrap();
        let event: Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("example is not JSON: {e}\n{json}"));
        let event_type = event["type"]
            .as_str()
            .expect("examples are events with a type");
        if event_type == "m.room.message" {
            // A message carrying typed payloads: each is checked against its type's schema.
            let carried: Vec<&String> = event["content"]
                .as_object()
                .expect("content")
                .keys()
                .filter(|k| k.starts_with("org.mxpay."))
                .collect();
            assert!(
                !carried.is_empty(),
                "a message example carries nothing\n{json}"
            );
            for key in carried {
                let payload = mxpay::events::carried(&event, key).expect("carried payload");
                schema::assert_valid(key, payload);
            }
        } else {
            schema::assert_valid(event_type, &event["content"]);
        }
        examples += 1;
    }
    assert!(examples >= 5, "docs/events.md has {examples} examples");
}

/// Measures the time from the payer sending their PIN to the payee's client showing the
/// receipt, over `MXPAY_LATENCY_PAYMENTS` payments (default 20), and prints p50/p95/max.
/// Run: `cargo test --test it -- --ignored payments::pin_to_receipt_latency --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check; run by hand"]
async fn pin_to_receipt_latency() {
    let payments: usize = std::env::var("MXPAY_LATENCY_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut s = scene("latency", 120_000, "1000.00").await;
    // Payments follow each other faster than the default per-user rate allows.
    s.lease.config.extra_yaml = s.lease.config.extra_yaml.replacen(
        "payments:\n",
        "payments:\n  commands_per_minute_max: 600\n",
        1,
    );
    s.lease.write_config();
    s.mxpay.restart().await;
    let (alice, bot, room, dm) = (&s.alice, s.bot.as_str(), &s.room, &s.dm);
    let mut samples_ms = Vec::with_capacity(payments);
    for i in 0..payments {
        let amount = format!("{}.{:02}", 1 + i / 100, i % 100);
        let pay = send_text(alice, room, &format!("!pay {} {amount} EUR", s.bob_id())).await;
        wait_notice(alice, dm, bot, &format!("Confirm paying {amount} EUR")).await;
        let started = std::time::Instant::now();
        send_text(alice, dm, PIN).await;
        wait_receipt(&s.bob, room, bot, &pay, "completed", None).await;
        samples_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| samples_ms[((samples_ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "PIN message -> payee sees the receipt, {} payments: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        samples_ms.len(),
        at(0.5),
        at(0.95),
        samples_ms[samples_ms.len() - 1]
    );
}

mod accept;
mod bot_commands;
mod keys;
mod notices;
mod refunds;
mod replay;
pub(crate) mod requests;
mod send_queue;
