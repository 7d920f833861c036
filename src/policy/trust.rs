//! Which events may start or confirm a payment: encrypted ones, from devices their owners
//! cross-signed. Decisions only; the crypto layer supplies the facts.

use serde::{Deserialize, Serialize};

use crate::events::ReceiptReason;

/// How far the sender's device is trusted, as the crypto layer reports it (a mirror of
/// matrix-sdk's `VerificationState`, so policy does not depend on the crypto crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SenderTrust {
    /// The device is cross-signed and the owner's identity is verified by the bot.
    Verified,
    /// The device is cross-signed by its owner; the owner's identity is not verified by us.
    UnverifiedIdentity,
    /// The owner's identity changed since it was first seen (or verified) and the owner has not
    /// confirmed the change.
    VerificationViolation,
    /// The device is not signed by its owner's cross-signing key.
    UnsignedDevice,
    /// The device is not known to the bot.
    UnknownDevice,
    /// The Megolm session's sender key does not belong to the claimed sender.
    MismatchedSender,
}

/// The facts about one incoming event that policy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventFacts {
    /// The event arrived as `m.room.encrypted` and decrypted.
    pub was_encrypted: bool,
    /// The room has encryption enabled.
    pub room_encrypted: bool,
    /// Trust in the sender's device; `None` for plaintext events.
    pub trust: Option<SenderTrust>,
}

/// Deployment choices about trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSettings {
    /// Accept devices their owners did not cross-sign (for users of clients such as
    /// matrix-nio that cannot cross-sign). Default `false`: weaker, so opt-in.
    #[serde(default)]
    pub allow_unsigned_devices: bool,
}

/// Why an event may not move money, with the sentence the user gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustRefusal {
    /// Plaintext command, or a room without encryption.
    #[error("payments are only accepted in end-to-end-encrypted rooms, from encrypted messages. Enable encryption in this room (room settings → Security) and try again.")]
    NotEncrypted,
    /// Device not cross-signed (or unknown, or the sender key mismatches).
    #[error("your device is not verified by your own account. Verify this session from another of your sessions (or set up cross-signing / secure backup in your client), then try again.")]
    UntrustedDevice,
    /// The sender's cross-signing identity is not the one first seen (or the one verified), and
    /// the user has not confirmed the change with their PIN.
    #[error("your account's security keys changed since I first saw them (someone reset your cross-signing), so I take no payments from you until you confirm the change with your PIN in our private chat. If you did not reset them, do not answer there and tell the operator.")]
    IdentityChanged,
}

impl TrustRefusal {
    /// The receipt reason code for this refusal.
    pub fn reason(&self) -> ReceiptReason {
        match self {
            TrustRefusal::NotEncrypted => ReceiptReason::NotEncrypted,
            TrustRefusal::UntrustedDevice => ReceiptReason::UntrustedDevice,
            TrustRefusal::IdentityChanged => ReceiptReason::IdentityChanged,
        }
    }
}

/// Decides whether an event may start or confirm a payment.
pub fn check(facts: EventFacts, settings: TrustSettings) -> Result<(), TrustRefusal> {
    if !facts.was_encrypted || !facts.room_encrypted {
        return Err(TrustRefusal::NotEncrypted);
    }
    match facts.trust {
        Some(SenderTrust::Verified | SenderTrust::UnverifiedIdentity) => Ok(()),
        Some(SenderTrust::UnsignedDevice) if settings.allow_unsigned_devices => Ok(()),
        Some(SenderTrust::VerificationViolation) => Err(TrustRefusal::IdentityChanged),
        Some(
            SenderTrust::UnsignedDevice
            | SenderTrust::UnknownDevice
            | SenderTrust::MismatchedSender,
        )
        | None => Err(TrustRefusal::UntrustedDevice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encrypted(trust: SenderTrust) -> EventFacts {
        EventFacts {
            was_encrypted: true,
            room_encrypted: true,
            trust: Some(trust),
        }
    }

    #[test]
    fn cross_signed_devices_pass() {
        let strict = TrustSettings::default();
        assert_eq!(check(encrypted(SenderTrust::Verified), strict), Ok(()));
        assert_eq!(
            check(encrypted(SenderTrust::UnverifiedIdentity), strict),
            Ok(())
        );
    }

    #[test]
    fn plaintext_is_refused_even_in_an_encrypted_room() {
        let facts = EventFacts {
            was_encrypted: false,
            room_encrypted: true,
            trust: None,
        };
        assert_eq!(
            check(facts, TrustSettings::default()),
            Err(TrustRefusal::NotEncrypted)
        );
        let unencrypted_room = EventFacts {
            room_encrypted: false,
            ..encrypted(SenderTrust::Verified)
        };
        assert_eq!(
            check(unencrypted_room, TrustSettings::default()),
            Err(TrustRefusal::NotEncrypted)
        );
    }

    #[test]
    fn unsigned_unknown_and_mismatched_are_refused_by_default() {
        for trust in [
            SenderTrust::UnsignedDevice,
            SenderTrust::UnknownDevice,
            SenderTrust::MismatchedSender,
        ] {
            assert_eq!(
                check(encrypted(trust), TrustSettings::default()),
                Err(TrustRefusal::UntrustedDevice)
            );
        }
        assert_eq!(
            check(
                encrypted(SenderTrust::VerificationViolation),
                TrustSettings::default()
            ),
            Err(TrustRefusal::IdentityChanged)
        );
        assert_eq!(
            TrustRefusal::IdentityChanged.reason(),
            ReceiptReason::IdentityChanged
        );
    }

    #[test]
    fn the_switch_admits_unsigned_devices_only() {
        let lax = TrustSettings {
            allow_unsigned_devices: true,
        };
        assert_eq!(check(encrypted(SenderTrust::UnsignedDevice), lax), Ok(()));
        assert_eq!(
            check(encrypted(SenderTrust::MismatchedSender), lax),
            Err(TrustRefusal::UntrustedDevice)
        );
    }
}
