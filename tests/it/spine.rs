//! End-to-end tests of the appservice spine over a real Synapse and the real `mxpay` binary.

use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;

use crate::support::{self, RoomOptions};

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
}
