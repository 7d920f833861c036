//! Room keys of the private DM reach only devices their owner cross-signed (with
//! `payments.allow_unsigned_devices: false`, the default): a session nobody vouched for reads
//! no challenge and no balance.

use super::{scene, send_text};
use crate::support;

#[tokio::test]
async fn an_unsigned_session_of_the_user_cannot_read_the_bots_dm() {
    let s = scene("dm-keys", 120_000, "20.00").await;
    // A second session of alice's that she never cross-signed (as a stolen password gives).
    let unsigned = support::client(&s.alice.user).await;
    // Its message in the DM reaches mxpay after its device keys changed, so the bot knows the
    // device before it answers below.
    let hello = send_text(&unsigned, &s.dm, "hello from an unsigned session").await;
    s.alice
        .wait_for_event("the unsigned session's message", |e| {
            e.event_id() == hello.as_str()
        })
        .await;

    let asked = send_text(&s.alice, &s.dm, "!balance").await;
    let answer = s
        .alice
        .wait_for_event("the answer to !balance", |e| {
            e.room_id == s.dm
                && e.sender() == s.bot
                && e.content()["m.relates_to"]["m.in_reply_to"]["event_id"] == asked.as_str()
        })
        .await;
    assert!(
        answer.encryption.is_some(),
        "the cross-signed session reads it"
    );

    let seen = unsigned
        .wait_for_event("the bot's answer, as the unsigned session gets it", |e| {
            e.event_id() == answer.event_id()
        })
        .await;
    assert!(
        seen.encryption.is_none() && seen.event_type() == "m.room.encrypted",
        "the unsigned session got the room key: {}",
        seen.json
    );
}
