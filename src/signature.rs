//! Signed HTTP bodies, Stripe's scheme: header value `t=<unix seconds>,v1=<lowercase hex>`,
//! where the hex is HMAC-SHA256 under a shared secret over `"<t>.<raw body bytes>"`.
//!
//! Binding the timestamp into the MAC stops a replay of an old body under a fresh timestamp;
//! the receiver's tolerance bounds how long a captured request stays usable. Used both ways:
//! providers sign what they send mxpay (`admin::webhook`), mxpay signs what it sends merchants
//! (`webhooks`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a signature header was refused. Messages never contain the secret or the expected MAC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature header.
    #[error("missing signature header")]
    Missing,
    /// The header is not `t=<seconds>,v1=<hex>`.
    #[error("malformed signature header: expected `t=<unix seconds>,v1=<hex hmac>`")]
    Malformed,
    /// No `v1` MAC matches the body under this secret.
    #[error("the signature does not match")]
    Mismatch,
    /// The signed timestamp is too far from now.
    #[error("the signature's timestamp is {age_s} s away from now (tolerance {tolerance_s} s)")]
    Stale {
        /// Distance from now, seconds.
        age_s: u64,
        /// Allowed distance, seconds.
        tolerance_s: u64,
    },
}

impl SignatureError {
    /// Stable snake_case reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "signature_missing",
            Self::Malformed => "signature_malformed",
            Self::Mismatch => "signature_mismatch",
            Self::Stale { .. } => "signature_stale",
        }
    }
}

/// The header value signing `body` at `timestamp_s` under `secret`.
pub fn sign(secret: &[u8], timestamp_s: u64, body: &[u8]) -> String {
    let mac = mac_for(secret, timestamp_s, body).finalize().into_bytes();
    format!("t={timestamp_s},v1={}", hex::encode(mac))
}

/// Checks `header` against `body` under `secret`, and its timestamp against `now_s` within
/// `tolerance_s` either way. Accepts several `v1=` entries (any one matching suffices), so a
/// sender can sign with an old and a new secret while a secret is being rotated. The MAC is
/// compared in constant time, and before the timestamp, so a stale request with a forged MAC
/// is told apart from a stale genuine one only by whoever holds the secret.
pub fn verify(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now_s: u64,
    tolerance_s: u64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let (timestamp_s, macs) = parse_header(header)?;
    let mac = mac_for(secret, timestamp_s, body);
    let mut matched = false;
    for mac_hex in macs {
        let mac_bytes = hex::decode(mac_hex).map_err(|_| SignatureError::Malformed)?;
        // verify_slice compares in constant time.
        matched |= mac.clone().verify_slice(&mac_bytes).is_ok();
    }
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    let age_s = now_s.abs_diff(timestamp_s);
    if age_s > tolerance_s {
        return Err(SignatureError::Stale { age_s, tolerance_s });
    }
    Ok(())
}

/// Most `v1=` entries read from one header: a bound on the work a hostile header can cause.
const MACS_PER_HEADER_MAX: usize = 8;

fn mac_for(secret: &[u8], timestamp_s: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn parse_header(header: &str) -> Result<(u64, Vec<&str>), SignatureError> {
    let mut timestamp_s = None;
    let mut macs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => {
                timestamp_s = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| SignatureError::Malformed)?,
                )
            }
            Some(("v1", value)) if macs.len() < MACS_PER_HEADER_MAX => macs.push(value),
            Some(("v1", _)) => return Err(SignatureError::Malformed),
            // Other schemes (a future v2) are ignored, as Stripe's receivers do.
            _ => {}
        }
    }
    match timestamp_s {
        Some(t) if !macs.is_empty() => Ok((t, macs)),
        _ => Err(SignatureError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec-0123456789abcdefghijklmnopqrstuv";

    #[test]
    fn a_known_vector() {
        // Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac <SECRET>
        let header = sign(SECRET, 1_700_000_000, b"{}");
        assert_eq!(
            header,
            "t=1700000000,v1=5b9ae4aab0b7efe168525cfd36dfb6947ace8fa1eac0a45dc923d6af8f06ad24"
        );
        verify(SECRET, Some(&header), b"{}", 1_700_000_000, 0).unwrap();
    }

    #[test]
    fn several_macs_one_matching_is_enough() {
        let good = sign(SECRET, 10, b"body");
        let other = sign(b"old-secret", 10, b"body");
        let other_mac = other.split_once(",v1=").unwrap().1;
        let header = format!("{good},v1={other_mac}");
        verify(SECRET, Some(&header), b"body", 10, 300).unwrap();
        let header = format!("t=10,v1={other_mac},v2=ignored");
        assert_eq!(
            verify(SECRET, Some(&header), b"body", 10, 300),
            Err(SignatureError::Mismatch)
        );
        let many = format!("t=10{}", ",v1=00".repeat(MACS_PER_HEADER_MAX + 1));
        assert_eq!(
            verify(SECRET, Some(&many), b"body", 10, 300),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(SignatureError::Missing.code(), "signature_missing");
        assert_eq!(SignatureError::Malformed.code(), "signature_malformed");
        assert_eq!(SignatureError::Mismatch.code(), "signature_mismatch");
        let stale = SignatureError::Stale {
            age_s: 1,
            tolerance_s: 0,
        };
        assert_eq!(stale.code(), "signature_stale");
    }
}
