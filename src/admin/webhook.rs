//! Funding-provider webhooks: a payment processor confirms a charge (top-up) or a withdrawal
//! settlement. The body is signed with HMAC-SHA256 under a per-provider secret.
//!
//! Signature header (`Mxpay-Signature`): `t=<unix seconds>,v1=<lowercase hex HMAC>`, where the
//! HMAC covers `"<t>.<raw body bytes>"`. Binding the timestamp into the MAC stops an attacker
//! from replaying an old body with a fresh timestamp; the event id inside the body is the
//! idempotency key, so a retried webhook never credits twice.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "Mxpay-Signature";

/// Largest accepted distance between the signed timestamp and now, by default.
pub const DEFAULT_TOLERANCE_S: u64 = 300;

/// Why a webhook was refused. Messages never contain the secret or the expected MAC.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    /// No signature header.
    #[error("missing `{SIGNATURE_HEADER}` header")]
    MissingSignature,
    /// The header is not `t=<seconds>,v1=<hex>`.
    #[error("malformed `{SIGNATURE_HEADER}` header: expected `t=<unix seconds>,v1=<hex hmac>`")]
    MalformedSignature,
    /// The MAC does not match the body under this provider's secret.
    #[error("the webhook signature does not match")]
    BadSignature,
    /// The signed timestamp is too far from now.
    #[error("the webhook timestamp is {age_s} s away from now (tolerance {tolerance_s} s)")]
    Stale {
        /// Distance from now, seconds.
        age_s: u64,
        /// Allowed distance, seconds.
        tolerance_s: u64,
    },
    /// The body is not a webhook event this server understands.
    #[error("the webhook body is not valid: {0}")]
    BadBody(String),
    /// A provider secret is shorter than [`SECRET_BYTES_MIN`] (the secret is not shown).
    #[error("the webhook secret is {len_bytes} bytes long; at least {min_bytes} are required")]
    SecretTooShort {
        /// Length of the refused secret.
        len_bytes: usize,
        /// [`SECRET_BYTES_MIN`].
        min_bytes: usize,
    },
}

/// Shortest accepted provider secret, in bytes: the HMAC-SHA256 output size, so a guessable
/// short secret cannot be what stands between the internet and a top-up.
pub const SECRET_BYTES_MIN: usize = 32;

/// A provider's signing secret.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    /// Wraps secret bytes without checking them. [`super::AdminState::new`] refuses a secret
    /// shorter than [`SECRET_BYTES_MIN`], so a short one never verifies a webhook; use
    /// [`WebhookSecret::try_new`] to check at construction.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Wraps secret bytes, refusing a secret shorter than [`SECRET_BYTES_MIN`].
    pub fn try_new(bytes: Vec<u8>) -> Result<Self, WebhookError> {
        let secret = Self(bytes);
        secret.check_len()?;
        Ok(secret)
    }

    /// Refuses a secret shorter than [`SECRET_BYTES_MIN`].
    pub fn check_len(&self) -> Result<(), WebhookError> {
        if self.0.len() < SECRET_BYTES_MIN {
            return Err(WebhookError::SecretTooShort {
                len_bytes: self.0.len(),
                min_bytes: SECRET_BYTES_MIN,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// What a provider tells mxpay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum WebhookEvent {
    /// A charge succeeded: credit `user_id`'s wallet.
    #[serde(rename = "topup.succeeded")]
    TopupSucceeded {
        /// The provider's unique event id (idempotency key).
        event_id: String,
        /// The wallet owner, a Matrix user ID.
        user_id: String,
        /// Amount in major units, as a string (`"12.50"`).
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
        /// ISO 4217 code.
        currency: String,
    },
    /// A pending withdrawal was paid out: post it.
    #[serde(rename = "withdrawal.settled")]
    WithdrawalSettled {
        /// The provider's unique event id.
        event_id: String,
        /// The withdrawal's id as mxpay gave it to the provider.
        withdrawal_id: String,
    },
    /// A pending withdrawal failed at the provider: void it, releasing the funds.
    #[serde(rename = "withdrawal.rejected")]
    WithdrawalRejected {
        /// The provider's unique event id.
        event_id: String,
        /// The withdrawal's id as mxpay gave it to the provider.
        withdrawal_id: String,
        /// Why, for the user.
        #[serde(default)]
        reason: Option<String>,
    },
}

impl WebhookEvent {
    /// The provider's event id.
    pub fn event_id(&self) -> &str {
        match self {
            WebhookEvent::TopupSucceeded { event_id, .. }
            | WebhookEvent::WithdrawalSettled { event_id, .. }
            | WebhookEvent::WithdrawalRejected { event_id, .. } => event_id,
        }
    }
}

/// Computes the signature header value for `body` at `timestamp_s` (for providers, tests and
/// the `mxpay admin` CLI).
pub fn sign(secret: &WebhookSecret, timestamp_s: u64, body: &[u8]) -> String {
    crate::signature::sign(&secret.0, timestamp_s, body)
}

/// Checks the signature header against `body` and the time, then parses the event.
pub fn verify(
    secret: &WebhookSecret,
    header: Option<&str>,
    body: &[u8],
    now_s: u64,
    tolerance_s: u64,
) -> Result<WebhookEvent, WebhookError> {
    use crate::signature::SignatureError as S;
    crate::signature::verify(&secret.0, header, body, now_s, tolerance_s).map_err(|e| match e {
        S::Missing => WebhookError::MissingSignature,
        S::Malformed => WebhookError::MalformedSignature,
        S::Mismatch => WebhookError::BadSignature,
        S::Stale { age_s, tolerance_s } => WebhookError::Stale { age_s, tolerance_s },
    })?;
    serde_json::from_slice(body).map_err(|e| WebhookError::BadBody(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> WebhookSecret {
        WebhookSecret::try_new(b"provider-secret-0123456789abcdefghij".to_vec()).unwrap()
    }

    #[test]
    fn secrets_shorter_than_32_bytes_are_refused() {
        let short = b"provider-secret-0123456789abcde".to_vec();
        assert_eq!(short.len(), SECRET_BYTES_MIN - 1);
        let err = WebhookSecret::try_new(short).unwrap_err();
        assert_eq!(
            err,
            WebhookError::SecretTooShort {
                len_bytes: 31,
                min_bytes: 32
            }
        );
        assert!(!err.to_string().contains("provider-secret"), "{err}");
        assert!(WebhookSecret::new(Vec::new()).check_len().is_err());
        WebhookSecret::try_new(vec![b'k'; SECRET_BYTES_MIN]).unwrap();
    }

    const BODY: &[u8] = br#"{"type":"topup.succeeded","event_id":"evt_1","user_id":"@alice:localhost","amount":"12.50","currency":"EUR"}"#;

    #[test]
    fn signed_body_verifies_and_parses() {
        let header = sign(&secret(), 1_000, BODY);
        let event = verify(&secret(), Some(&header), BODY, 1_010, 300).unwrap();
        assert_eq!(event.event_id(), "evt_1");
        assert!(matches!(
            event,
            WebhookEvent::TopupSucceeded { amount, .. } if amount == Decimal::new(1250, 2)
        ));
    }

    #[test]
    fn changed_amount_fails_the_signature() {
        let header = sign(&secret(), 1_000, BODY);
        let tampered = String::from_utf8(BODY.to_vec())
            .unwrap()
            .replace("12.50", "99.50");
        assert_eq!(
            verify(&secret(), Some(&header), tampered.as_bytes(), 1_000, 300),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn other_secret_fails_the_signature() {
        let header = sign(&WebhookSecret::new(b"other".to_vec()), 1_000, BODY);
        assert_eq!(
            verify(&secret(), Some(&header), BODY, 1_000, 300),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn stale_or_future_timestamp_is_refused() {
        let header = sign(&secret(), 1_000, BODY);
        assert_eq!(
            verify(&secret(), Some(&header), BODY, 1_301, 300),
            Err(WebhookError::Stale {
                age_s: 301,
                tolerance_s: 300
            })
        );
        assert!(matches!(
            verify(&secret(), Some(&header), BODY, 600, 300),
            Err(WebhookError::Stale { .. })
        ));
    }

    #[test]
    fn re_signing_an_old_body_with_a_new_timestamp_needs_the_secret() {
        let header = sign(&secret(), 1_000, BODY);
        let mac = header.split_once(",v1=").unwrap().1;
        let forged = format!("t=5000,v1={mac}");
        assert_eq!(
            verify(&secret(), Some(&forged), BODY, 5_000, 300),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn missing_and_malformed_headers() {
        assert_eq!(
            verify(&secret(), None, BODY, 0, 300),
            Err(WebhookError::MissingSignature)
        );
        for bad in ["", "t=abc,v1=00", "v1=00", "t=1", "t=1,v1=zz"] {
            assert_eq!(
                verify(&secret(), Some(bad), BODY, 1, 300),
                Err(WebhookError::MalformedSignature),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_event_type_is_a_body_error() {
        let body = br#"{"type":"topup.exploded","event_id":"e"}"#;
        let header = sign(&secret(), 1, body);
        assert!(matches!(
            verify(&secret(), Some(&header), body, 1, 300),
            Err(WebhookError::BadBody(_))
        ));
        assert!(!format!("{:?}", secret()).contains("provider"));
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_hides_the_webhook_secret() {
        let secret = WebhookSecret::new(b"whsec-very-secret".to_vec());
        let debug = format!("{secret:?} {secret:#?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
