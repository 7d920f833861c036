//! Step-up proofs: after a correct PIN for a challenge, a short-lived, single-use JWT binds the
//! exact payment (payer, payee, amount, currency, transfer id). The code that posts a pending
//! transfer refuses without a valid, unused proof that matches that transfer exactly.
//!
//! The durable single-use guarantee is the ledger's: a pending transfer can be posted once.
//! The in-memory `used` set here makes a second redemption of one proof a distinct, visible
//! error even before the ledger is asked.

use std::collections::HashMap;
use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::clock::SharedClock;

/// The audience of step-up proofs, so an admin token can never pass as one (or the reverse).
pub const STEPUP_AUDIENCE: &str = "mxpay-stepup";

/// Default life of a proof: it is minted and redeemed within one request.
pub const STEPUP_TTL_MS: u64 = 60_000;

/// The payment a proof authorises. Amounts are integer minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepUpBinding {
    /// The paying user.
    pub payer: String,
    /// The receiving account owner.
    pub payee: String,
    /// Amount in minor units.
    pub amount_minor: u128,
    /// ISO 4217 code.
    pub currency: String,
    /// The pending ledger transfer, as a decimal string of its 128-bit id.
    pub transfer_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StepUpClaims {
    aud: String,
    sub: String,
    exp: u64,
    exp_ms: u64,
    jti: String,
    binding: StepUpBinding,
}

/// Why a proof was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepUpError {
    /// Not a proof signed by this server.
    #[error("the payment confirmation is not valid")]
    Invalid,
    /// Past its expiry.
    #[error("the payment confirmation has expired")]
    Expired,
    /// Valid, but for another payment.
    #[error("the payment confirmation is for a different payment")]
    Mismatch,
    /// Already redeemed.
    #[error("the payment confirmation was already used")]
    AlreadyUsed,
    /// Signing failed.
    #[error("could not sign the payment confirmation")]
    Signing,
}

/// Mints and redeems step-up proofs with a server-held HS256 key.
pub struct StepUpAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    clock: SharedClock,
    ttl_ms: u64,
    /// jti -> expiry (ms); pruned as proofs expire, so it stays bounded by the mint rate.
    used: Mutex<HashMap<String, u64>>,
}

impl fmt::Debug for StepUpAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepUpAuthority")
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

impl StepUpAuthority {
    /// An authority with `key` (at least 32 bytes; the process may also generate one at start,
    /// since proofs never outlive a request).
    pub fn new(key: &[u8], clock: SharedClock, ttl_ms: u64) -> Self {
        assert!(key.len() >= 32, "step-up key must be at least 32 bytes");
        Self {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            clock,
            ttl_ms,
            used: Mutex::new(HashMap::new()),
        }
    }

    /// Mints a proof for `binding`. Call only after the PIN check passed.
    pub fn mint(&self, binding: StepUpBinding) -> Result<String, StepUpError> {
        let now_ms = self.clock.now_ms();
        let exp_ms = now_ms + self.ttl_ms;
        let mut jti = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut jti);
        let claims = StepUpClaims {
            aud: STEPUP_AUDIENCE.to_owned(),
            sub: binding.payer.clone(),
            exp: exp_ms.div_ceil(1000),
            exp_ms,
            jti: hex::encode(jti),
            binding,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| StepUpError::Signing)
    }

    /// Redeems `token` for exactly `expected`: valid signature, unexpired, same binding, unused.
    pub fn redeem(&self, token: &str, expected: &StepUpBinding) -> Result<(), StepUpError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.set_audience(&[STEPUP_AUDIENCE]);
        let claims = jsonwebtoken::decode::<StepUpClaims>(token, &self.decoding, &validation)
            .map_err(|_| StepUpError::Invalid)?
            .claims;
        let now_ms = self.clock.now_ms();
        if now_ms >= claims.exp_ms {
            return Err(StepUpError::Expired);
        }
        if &claims.binding != expected {
            return Err(StepUpError::Mismatch);
        }
        let mut used = self.used.lock();
        used.retain(|_, exp_ms| *exp_ms > now_ms);
        if used.insert(claims.jti, claims.exp_ms).is_some() {
            return Err(StepUpError::AlreadyUsed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;

    fn binding() -> StepUpBinding {
        StepUpBinding {
            payer: "@alice:localhost".into(),
            payee: "@bob:localhost".into(),
            amount_minor: 1250,
            currency: "EUR".into(),
            transfer_id: "42".into(),
        }
    }

    fn authority(clock: &ManualClock) -> StepUpAuthority {
        StepUpAuthority::new(&[9u8; 32], Arc::new(clock.clone()), STEPUP_TTL_MS)
    }

    #[test]
    fn proof_redeems_once_for_its_exact_payment() {
        let clock = ManualClock::new(1_000_000);
        let auth = authority(&clock);
        let token = auth.mint(binding()).unwrap();
        assert_eq!(auth.redeem(&token, &binding()), Ok(()));
        assert_eq!(
            auth.redeem(&token, &binding()),
            Err(StepUpError::AlreadyUsed)
        );
    }

    #[test]
    fn every_bound_field_is_checked() {
        let clock = ManualClock::new(1_000_000);
        let auth = authority(&clock);
        let changes: [fn(&mut StepUpBinding); 5] = [
            |b| b.payer = "@mallory:localhost".into(),
            |b| b.payee = "@mallory:localhost".into(),
            |b| b.amount_minor += 1,
            |b| b.currency = "USD".into(),
            |b| b.transfer_id = "43".into(),
        ];
        for change in changes {
            let token = auth.mint(binding()).unwrap();
            let mut other = binding();
            change(&mut other);
            assert_eq!(auth.redeem(&token, &other), Err(StepUpError::Mismatch));
        }
    }

    #[test]
    fn expired_or_foreign_proofs_are_refused() {
        let clock = ManualClock::new(1_000_000);
        let auth = authority(&clock);
        let token = auth.mint(binding()).unwrap();
        clock.advance_ms(STEPUP_TTL_MS);
        assert_eq!(auth.redeem(&token, &binding()), Err(StepUpError::Expired));
        let other = StepUpAuthority::new(&[1u8; 32], Arc::new(clock.clone()), STEPUP_TTL_MS);
        let foreign = other.mint(binding()).unwrap();
        assert_eq!(auth.redeem(&foreign, &binding()), Err(StepUpError::Invalid));
        assert_eq!(auth.redeem("x.y.z", &binding()), Err(StepUpError::Invalid));
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_hides_the_key() {
        let key = b"stepup-key-very-secret-0123456789abcdef";
        let authority = StepUpAuthority::new(
            key,
            std::sync::Arc::new(crate::clock::ManualClock::new(0)),
            60_000,
        );
        let debug = format!("{authority:?} {authority:#?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
