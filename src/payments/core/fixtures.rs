//! Test fixtures shared by the core's table tests.

use ruma::{OwnedRoomId, OwnedUserId};

use super::decision::EventRef;
use crate::store::payments::{Challenge, ChallengeKind};

/// An event of alice's in `room`, with id `event_id`.
pub fn event_in(room: &str, event_id: &str) -> EventRef {
    EventRef {
        room_id: OwnedRoomId::try_from(room).expect("room id"),
        event_id: event_id.try_into().expect("event id"),
        sender: OwnedUserId::try_from("@alice:hs").expect("user id"),
    }
}

/// alice's challenge `id` for 12.50 EUR to bob, asked in `!room:hs` by `$ask`, lapsing at
/// `expires_at_ms`.
pub fn challenge(id: u128, kind: ChallengeKind, expires_at_ms: u64) -> Challenge {
    Challenge {
        kind,
        transfer_id: id,
        payer: "@alice:hs".try_into().expect("user id"),
        payee: "@bob:hs".into(),
        amount_minor: 1250,
        amount: "12.50".into(),
        currency: "EUR".into(),
        room_id: "!room:hs".try_into().expect("room id"),
        event_id: "$ask".try_into().expect("event id"),
        memo: None,
        created_ms: 0,
        expires_at_ms,
        device_id: None,
    }
}
