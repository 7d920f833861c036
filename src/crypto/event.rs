//! What the crypto layer hands to the layers above: plaintext events with trust facts.

use matrix_sdk::deserialized_responses::{DeviceLinkProblem, VerificationLevel, VerificationState};
use ruma::{OwnedDeviceId, OwnedEventId, OwnedRoomId, OwnedUserId};
use serde::Serialize;

/// How far the bot can trust who sent an event.
///
/// Only [`TrustState::Verified`] proves the sender; the others are listed from the least to the
/// most alarming so policy can be written as "at least X".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustState {
    /// The event was not encrypted: nothing is known about the sending device.
    NotEncrypted,
    /// Sent from a device cross-signed by a user identity the bot has verified.
    Verified,
    /// Sent from a device cross-signed by its owner, whose identity the bot has not verified
    /// (the normal case for a bot, which verifies nobody interactively).
    UnverifiedIdentity,
    /// Sent from a device its owner did not cross-sign (e.g. clients without cross-signing).
    UnsignedDevice,
    /// The owner's identity was verified before and has changed since.
    VerificationViolation,
    /// The sending device is unknown (deleted, not fetched yet) or the key came from an insecure
    /// source.
    UnknownDevice,
    /// The key is from an insecure source (backup, forward) and cannot be tied to a device.
    InsecureSource,
    /// The event's `sender` is not the owner of the device that made the room key.
    MismatchedSender,
}

impl TrustState {
    /// Maps matrix-sdk-crypto's verification state.
    pub fn from_verification(state: &VerificationState) -> Self {
        match state {
            VerificationState::Verified => TrustState::Verified,
            VerificationState::Unverified(level) => match level {
                VerificationLevel::UnverifiedIdentity => TrustState::UnverifiedIdentity,
                VerificationLevel::VerificationViolation => TrustState::VerificationViolation,
                VerificationLevel::UnsignedDevice => TrustState::UnsignedDevice,
                VerificationLevel::None(DeviceLinkProblem::MissingDevice) => {
                    TrustState::UnknownDevice
                }
                VerificationLevel::None(DeviceLinkProblem::InsecureSource) => {
                    TrustState::InsecureSource
                }
                VerificationLevel::MismatchedSender => TrustState::MismatchedSender,
            },
        }
    }

    /// Stable snake_case name (logs, notices, metrics labels).
    pub fn as_str(&self) -> &'static str {
        match self {
            TrustState::NotEncrypted => "not_encrypted",
            TrustState::Verified => "verified",
            TrustState::UnverifiedIdentity => "unverified_identity",
            TrustState::UnsignedDevice => "unsigned_device",
            TrustState::VerificationViolation => "verification_violation",
            TrustState::UnknownDevice => "unknown_device",
            TrustState::InsecureSource => "insecure_source",
            TrustState::MismatchedSender => "mismatched_sender",
        }
    }
}

impl std::fmt::Display for TrustState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A room event as the layers above see it: decrypted if it was encrypted. Its Debug form
/// leaves the content out: a plaintext may be a PIN.
#[derive(Clone, PartialEq, Serialize)]
pub struct DecryptedEvent {
    /// Room of the event.
    pub room_id: OwnedRoomId,
    /// Event id.
    pub event_id: OwnedEventId,
    /// Sender from the (outer) event; for encrypted events it matched the room key's owner
    /// unless `verification_state` says [`TrustState::MismatchedSender`].
    pub sender: OwnedUserId,
    /// Device that encrypted the event (`None` for plaintext).
    pub sender_device: Option<OwnedDeviceId>,
    /// Plaintext event type, e.g. `m.room.message`.
    pub event_type: String,
    /// State key for state events.
    pub state_key: Option<String>,
    /// Plaintext content as received (unvalidated JSON).
    pub content: serde_json::Value,
    /// `origin_server_ts` of the event (ms): the homeserver's word, which a hostile homeserver
    /// can set to anything. Judge freshness with [`DecryptedEvent::sent_ms`].
    pub origin_server_ts_ms: u64,
    /// The earliest time (ms) the bot saw a later Megolm message of the same session: the
    /// event was encrypted before then, whatever `origin_server_ts` claims (`None`: no later
    /// message seen yet, or not encrypted).
    pub sent_before_ms: Option<u64>,
    /// Trust in the sender's device.
    pub verification_state: TrustState,
    /// Whether the event arrived encrypted.
    pub was_encrypted: bool,
    /// Whether it was parked first and decrypted when its room key arrived late.
    pub was_parked: bool,
}

impl DecryptedEvent {
    /// When the event was sent, as far as the bot can tell: the homeserver's
    /// `origin_server_ts`, unless the Megolm session proves it older.
    pub fn sent_ms(&self) -> u64 {
        self.sent_before_ms
            .map_or(self.origin_server_ts_ms, |bound| {
                bound.min(self.origin_server_ts_ms)
            })
    }
}

impl std::fmt::Debug for DecryptedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptedEvent")
            .field("room_id", &self.room_id)
            .field("event_id", &self.event_id)
            .field("sender", &self.sender)
            .field("sender_device", &self.sender_device)
            .field("event_type", &self.event_type)
            .field("state_key", &self.state_key)
            .field("content", &"<redacted>")
            .field("origin_server_ts_ms", &self.origin_server_ts_ms)
            .field("sent_before_ms", &self.sent_before_ms)
            .field("verification_state", &self.verification_state)
            .field("was_encrypted", &self.was_encrypted)
            .field("was_parked", &self.was_parked)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_plaintext_out() {
        let event = DecryptedEvent {
            room_id: "!r:localhost".try_into().unwrap(),
            event_id: "$e".try_into().unwrap(),
            sender: "@alice:localhost".try_into().unwrap(),
            sender_device: None,
            event_type: "m.room.message".to_owned(),
            state_key: None,
            content: serde_json::json!({"msgtype": "m.text", "body": "4821"}),
            origin_server_ts_ms: 1,
            sent_before_ms: None,
            verification_state: TrustState::NotEncrypted,
            was_encrypted: false,
            was_parked: false,
        };
        let debug = format!("{event:?} {event:#?}");
        assert!(!debug.contains("4821"), "{debug}");
        assert!(
            debug.contains("$e") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn verification_states_map_one_to_one() {
        let cases = [
            (VerificationState::Verified, TrustState::Verified),
            (
                VerificationState::Unverified(VerificationLevel::UnverifiedIdentity),
                TrustState::UnverifiedIdentity,
            ),
            (
                VerificationState::Unverified(VerificationLevel::UnsignedDevice),
                TrustState::UnsignedDevice,
            ),
            (
                VerificationState::Unverified(VerificationLevel::VerificationViolation),
                TrustState::VerificationViolation,
            ),
            (
                VerificationState::Unverified(VerificationLevel::None(
                    DeviceLinkProblem::MissingDevice,
                )),
                TrustState::UnknownDevice,
            ),
            (
                VerificationState::Unverified(VerificationLevel::None(
                    DeviceLinkProblem::InsecureSource,
                )),
                TrustState::InsecureSource,
            ),
            (
                VerificationState::Unverified(VerificationLevel::MismatchedSender),
                TrustState::MismatchedSender,
            ),
        ];
        for (state, expected) in cases {
            assert_eq!(TrustState::from_verification(&state), expected);
        }
        assert_eq!(TrustState::UnsignedDevice.to_string(), "unsigned_device");
    }
}
