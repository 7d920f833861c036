//! End-to-end tests of the appservice spine over a real Synapse and the real `mxpay` binary.

use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::json;

use crate::support::{
    self, metric_value, CuttableProxy, MxpayOptions, MxpayProcess, RoomOptions, SlotKind,
    SlotLease, TestClient,
};

/// The harness itself: two users, an encrypted room, a message from alice decrypts at bob.
/// If this fails, every other end-to-end test is suspect.
#[tokio::test]
async fn harness_smoke_encrypted_message_decrypts_at_bob() {
    let alice = support::client(&support::user("alice").await).await;
    let bob = support::client(&support::user("bob").await).await;

    let room = alice
        .create_room(RoomOptions {
            encrypted: true,
            invite: vec![bob.user.user_id.clone()],
            ..Default::default()
        })
        .await;
    bob.join(room.room_id()).await;
    // Alice must know bob is in the room before she encrypts, or he gets no room key.
    alice
        .wait_for_membership(room.room_id(), bob.user.user_id.as_str(), "join")
        .await;
    assert!(
        alice
            .room(room.room_id())
            .await
            .latest_encryption_state()
            .await
            .expect("encryption state")
            .is_encrypted(),
        "the room was created encrypted"
    );

    room.send(RoomMessageEventContent::text_plain("hello bob, secretly"))
        .await
        .expect("alice sends");

    let seen = bob
        .wait_for_message(room.room_id(), alice.user.user_id.as_str(), |body| {
            body == "hello bob, secretly"
        })
        .await;
    assert!(
        seen.encryption.is_some(),
        "the message reached bob through decryption, not in plaintext: {:?}",
        seen.json
    );

    // The cross-signing helper answers Synapse's user-interactive auth.
    bob.bootstrap_cross_signing().await;
    let status = bob
        .encryption()
        .cross_signing_status()
        .await
        .expect("cross-signing status");
    assert!(
        status.is_complete(),
        "bob has all three cross-signing keys: {status:?}"
    );
}

/// Event type of the probe events tests put into hand-made transactions: the worker counts
/// processed events by type (`mxpay_events_total{event_type=...}`), and nothing else sends it.
const PROBE: &str = "org.mxpay.test.probe";
/// A second probe type: once it is counted, everything queued before it was processed
/// (the worker takes transactions in arrival order).
const SENTINEL: &str = "org.mxpay.test.sentinel";

fn events_series(event_type: &str) -> String {
    format!("mxpay_events_total{{event_type=\"{event_type}\"}}")
}

/// How many events of `event_type` this mxpay process has handled.
async fn handled(mxpay: &MxpayProcess, event_type: &str) -> f64 {
    metric_value(&mxpay.metrics().await, &events_series(event_type)).unwrap_or(0.0)
}

/// Transactions this mxpay process answered as duplicates.
async fn duplicates(mxpay: &MxpayProcess) -> f64 {
    let series = "mxpay_transactions_received_total{outcome=\"duplicate\"}";
    metric_value(&mxpay.metrics().await, series).unwrap_or(0.0)
}

fn probe_transaction(event_type: &str) -> serde_json::Value {
    json!({ "events": [{
        "type": event_type,
        "room_id": "!probe:localhost",
        "sender": "@probe:localhost",
        "event_id": format!("$probe-{}", support::random_suffix(12)),
        "origin_server_ts": 0,
        "content": {},
    }]})
}

/// Puts a sentinel transaction and waits until it was handled: every transaction accepted
/// before it has then been handled too.
async fn drain(mxpay: &MxpayProcess, lease: &SlotLease) {
    let txn_id = format!("sentinel-{}", support::random_suffix(10));
    let before = handled(mxpay, SENTINEL).await;
    let (status, _) = mxpay
        .put_transaction(
            &txn_id,
            &probe_transaction(SENTINEL),
            Some(&lease.spec.hs_token),
        )
        .await;
    assert_eq!(status, 200, "the sentinel transaction is accepted");
    support::eventually("the sentinel transaction to be handled", || async {
        (handled(mxpay, SENTINEL).await > before).then_some(())
    })
    .await;
}

/// A plaintext room created by a new user, with the slot's bot invited; returns once the
/// bot has joined (which proves transactions reach mxpay and its handler acts).
async fn room_with_bot(lease: &SlotLease) -> (TestClient, OwnedRoomId) {
    let alice = support::client(&support::user("alice").await).await;
    let bot = lease.spec.bot_user_id();
    let room = alice
        .create_room(RoomOptions {
            invite: vec![UserId::parse(&bot).expect("bot user ID")],
            ..Default::default()
        })
        .await;
    alice
        .wait_for_membership(room.room_id(), &bot, "join")
        .await;
    (alice, room.room_id().to_owned())
}

async fn say(client: &TestClient, room_id: &RoomId, text: &str) {
    client
        .room(room_id)
        .await
        .send(RoomMessageEventContent::text_plain(text))
        .await
        .unwrap_or_else(|e| panic!("sending {text:?}: {e}"));
}

async fn wait_for_bot_notice(client: &TestClient, room_id: &RoomId, lease: &SlotLease) {
    let bot = lease.spec.bot_user_id();
    let what = format!("a notice from {bot} in {room_id}");
    client
        .wait_for_event(&what, |e| {
            e.room_id == room_id
                && e.sender() == bot
                && e.event_type() == "m.room.message"
                && e.msgtype() == Some("m.notice")
        })
        .await;
}

/// The bot joins a room it is invited to, and `!help` there is answered with a notice.
#[tokio::test]
async fn bot_joins_on_invite_and_answers_help() {
    let lease = support::synapse().lease(SlotKind::Normal, "help").await;
    let _mxpay = MxpayProcess::start(&lease).await;
    let (alice, room_id) = room_with_bot(&lease).await;

    say(&alice, &room_id, "!help").await;
    wait_for_bot_notice(&alice, &room_id, &lease).await;
}

/// mxpay's start-up ping passed (it reports ready), and the homeserver reaches mxpay with
/// the hs_token mxpay accepts: a ping asked of Synapse, as an admin would, succeeds.
#[tokio::test]
async fn homeserver_ping_reaches_mxpay() {
    let lease = support::synapse().lease(SlotKind::Normal, "ping").await;
    let mxpay = MxpayProcess::start(&lease).await;
    let ready = reqwest::get(format!("{}/ready", mxpay.url))
        .await
        .expect("GET /ready");
    assert_eq!(ready.status().as_u16(), 200);

    let response = reqwest::Client::new()
        .post(format!(
            "{}/_matrix/client/v1/appservice/{}/ping",
            lease.synapse().url,
            lease.spec.id
        ))
        .bearer_auth(&lease.spec.as_token)
        .json(&json!({ "transaction_id": format!("ping-{}", support::random_suffix(8)) }))
        .send()
        .await
        .expect("POST ping");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 200, "Synapse's ping of mxpay: {body}");
    assert!(body["duration_ms"].is_u64(), "{body}");
}

/// On a registration with `io.element.msc4190: true` (Synapse then refuses appservice login)
/// mxpay still starts, and the bot still joins and answers.
#[tokio::test]
async fn bot_works_with_an_msc4190_registration() {
    let lease = support::synapse().lease(SlotKind::Msc4190, "msc4190").await;
    let registration = std::fs::read_to_string(&lease.spec.registration).expect("registration");
    assert!(
        registration.contains("io.element.msc4190: true"),
        "{registration}"
    );
    let _mxpay = MxpayProcess::start(&lease).await;
    let (alice, room_id) = room_with_bot(&lease).await;
    say(&alice, &room_id, "!help").await;
    wait_for_bot_notice(&alice, &room_id, &lease).await;
}

/// A transaction id seen before is answered 200 but not handled again, also after a restart
/// (the inbox is durable).
#[tokio::test]
async fn replayed_transaction_is_handled_once_also_after_restart() {
    let lease = support::synapse().lease(SlotKind::Normal, "replay").await;
    let mut mxpay = MxpayProcess::start(&lease).await;
    let txn_id = format!("replay-{}", support::random_suffix(10));
    let body = probe_transaction(PROBE);
    let hs_token = Some(lease.spec.hs_token.as_str());

    let (status, answer) = mxpay.put_transaction(&txn_id, &body, hs_token).await;
    assert_eq!((status, answer), (200, json!({})));
    let (status, _) = mxpay.put_transaction(&txn_id, &body, hs_token).await;
    assert_eq!(status, 200, "a replay is acknowledged");
    drain(&mxpay, &lease).await;
    assert_eq!(handled(&mxpay, PROBE).await, 1.0, "handled once");
    assert_eq!(duplicates(&mxpay).await, 1.0, "the replay was seen as one");

    mxpay.restart().await;
    let (status, _) = mxpay.put_transaction(&txn_id, &body, hs_token).await;
    assert_eq!(status, 200, "a replay after restart is acknowledged");
    drain(&mxpay, &lease).await;
    assert_eq!(
        handled(&mxpay, PROBE).await,
        0.0,
        "not handled again after restart"
    );
    assert_eq!(
        duplicates(&mxpay).await,
        1.0,
        "the restarted mxpay knew the id"
    );
}

/// A transaction mxpay acknowledged but had not finished handling when it was SIGKILLed is
/// handled after the restart. Handling is held up by cutting mxpay off from the homeserver
/// (a proxy in between), so the answer to `!help` cannot be sent before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_transaction_is_handled_after_kill_and_restart() {
    let mut lease = support::synapse()
        .lease(SlotKind::Normal, "kill_after_ack")
        .await;
    let homeserver = lease
        .config
        .homeserver_url
        .trim_start_matches("http://")
        .to_owned();
    let proxy = CuttableProxy::start(&homeserver).await;
    lease.config.homeserver_url = proxy.url.clone();
    lease.write_config();
    let mut mxpay = MxpayProcess::start(&lease).await;
    let (alice, room_id) = room_with_bot(&lease).await;

    proxy.cut();
    let help = json!({ "events": [{
        "type": "m.room.message",
        "room_id": room_id,
        "sender": alice.user.user_id,
        "event_id": format!("$help-{}", support::random_suffix(12)),
        "origin_server_ts": 0,
        "content": { "msgtype": "m.text", "body": "!help" },
    }]});
    let txn_id = format!("kill-{}", support::random_suffix(10));
    let (status, _) = mxpay
        .put_transaction(&txn_id, &help, Some(&lease.spec.hs_token))
        .await;
    assert_eq!(status, 200, "acknowledged");
    mxpay.kill().await;

    proxy.restore();
    mxpay.start_again().await;
    wait_for_bot_notice(&alice, &room_id, &lease).await;
}

/// Events sent while mxpay is down wait at the homeserver and arrive after mxpay starts
/// again (Synapse keeps retrying; mxpay's start-up ping makes it retry at once).
#[tokio::test]
async fn events_sent_while_mxpay_is_down_arrive_after_restart() {
    let lease = support::synapse().lease(SlotKind::Normal, "down").await;
    let mut mxpay = MxpayProcess::start(&lease).await;
    let (alice, room_id) = room_with_bot(&lease).await;

    mxpay.kill().await;
    say(&alice, &room_id, "!help").await;
    mxpay.start_again().await;
    wait_for_bot_notice(&alice, &room_id, &lease).await;
}

/// Without the right hs_token nothing is accepted, and a refused transaction is not
/// remembered: the same id with the right token is then handled.
#[tokio::test]
async fn forged_or_missing_hs_token_is_refused() {
    let lease = support::synapse().lease(SlotKind::Normal, "hs_token").await;
    let mxpay = MxpayProcess::start(&lease).await;
    let txn_id = format!("forged-{}", support::random_suffix(10));
    let body = probe_transaction(PROBE);

    let (status, answer) = mxpay.put_transaction(&txn_id, &body, None).await;
    assert_eq!(
        (status, &answer["errcode"]),
        (401, &json!("M_UNAUTHORIZED")),
        "{answer}"
    );
    let forged = format!("{}x", lease.spec.hs_token);
    let (status, answer) = mxpay.put_transaction(&txn_id, &body, Some(&forged)).await;
    assert_eq!(
        (status, &answer["errcode"]),
        (403, &json!("M_FORBIDDEN")),
        "{answer}"
    );
    let (status, answer) = mxpay
        .put_transaction(&txn_id, &body, Some(&lease.spec.as_token))
        .await;
    assert_eq!(status, 403, "the as_token is not the hs_token: {answer}");
    // The legacy query parameter is off by default.
    let response = reqwest::Client::new()
        .put(format!(
            "{}/_matrix/app/v1/transactions/{txn_id}?access_token={}",
            mxpay.url, lease.spec.hs_token
        ))
        .json(&body)
        .send()
        .await
        .expect("PUT with a query token");
    assert_eq!(
        response.status().as_u16(),
        401,
        "query tokens are refused by default"
    );

    drain(&mxpay, &lease).await;
    assert_eq!(
        handled(&mxpay, PROBE).await,
        0.0,
        "nothing refused was handled"
    );
    let (status, _) = mxpay
        .put_transaction(&txn_id, &body, Some(&lease.spec.hs_token))
        .await;
    assert_eq!(status, 200);
    drain(&mxpay, &lease).await;
    assert_eq!(
        handled(&mxpay, PROBE).await,
        1.0,
        "the id was not burnt by the refusals"
    );
    assert_eq!(duplicates(&mxpay).await, 0.0);
}

/// Starts mxpay on a misconfigured lease and returns its output once it has exited (it must
/// refuse to run, not limp along).
async fn failed_start(lease: &SlotLease) -> String {
    let mut mxpay = MxpayProcess::spawn_with(lease, MxpayOptions::default());
    let status = mxpay.wait_exit().await;
    assert!(
        !status.success(),
        "mxpay must fail to start; log:\n{}",
        mxpay.log()
    );
    mxpay.log()
}

fn assert_says(log: &str, phrases: &[&str]) {
    for phrase in phrases {
        assert!(
            log.contains(phrase),
            "mxpay's start-up error should mention {phrase:?}; its output:\n{log}"
        );
    }
}

#[tokio::test]
async fn startup_fails_clearly_with_wrong_homeserver_url() {
    let mut lease = support::synapse()
        .lease(SlotKind::Normal, "wrong_hs_url")
        .await;
    let wrong = format!("http://127.0.0.1:{}", support::free_port());
    lease.config.homeserver_url = wrong.clone();
    lease.write_config();
    let log = failed_start(&lease).await;
    assert_says(
        &log,
        &["cannot reach the homeserver", &wrong, "homeserver.url"],
    );
}

#[tokio::test]
async fn startup_fails_clearly_with_wrong_as_token() {
    let mut lease = support::synapse()
        .lease(SlotKind::Normal, "wrong_as_token")
        .await;
    lease.config.registration = lease.registration_variant("wrong-as-token", |registration| {
        registration["as_token"] = format!("wrong-{}", support::random_suffix(32)).into();
    });
    lease.write_config();
    let log = failed_start(&lease).await;
    assert_says(&log, &["does not accept the as_token"]);
}

#[tokio::test]
async fn startup_fails_clearly_when_homeserver_knows_another_appservice_id() {
    let mut lease = support::synapse()
        .lease(SlotKind::Normal, "unknown_id")
        .await;
    let unknown = format!("{}-unknown", lease.spec.id);
    let registration_id = unknown.clone();
    lease.config.registration = lease.registration_variant("unknown-id", move |registration| {
        registration["id"] = registration_id.into();
    });
    lease.config.id = unknown.clone();
    lease.write_config();
    let log = failed_start(&lease).await;
    assert_says(&log, &["appservice id", &unknown, "appservice.id"]);
}

#[tokio::test]
async fn startup_fails_clearly_when_homeserver_cannot_reach_mxpay() {
    let lease = support::synapse()
        .lease(SlotKind::UnreachableUrl, "unreachable")
        .await;
    let log = failed_start(&lease).await;
    assert_says(
        &log,
        &["cannot reach mxpay", &lease.spec.url, "appservice.url"],
    );
}
