//! Merchant API keys: JWTs with their own audience ([`MERCHANT_AUDIENCE`]), bound to one
//! merchant (`sub` is its id) and carrying [`KeyScope`]s. An admin token is never accepted as
//! a merchant key and a merchant key never as an admin token: each side validates its own
//! audience. Every minted key is also recorded in the merchant store (by its `jti`), which is
//! where revocation lives; a key the store does not know is refused.
//!
//! Expiry is checked against the injected clock, so tests move time.

use std::collections::BTreeSet;
use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::model::MerchantId;
use crate::clock::SharedClock;

/// The audience of every merchant key.
pub const MERCHANT_AUDIENCE: &str = "mxpay-merchant";

/// Longest lifetime of a merchant key, in seconds (two years): a key must be rotated some
/// day, and the store keeps a revoked key's record until then.
pub const KEY_TTL_MAX_S: u64 = 2 * 366 * 24 * 3600;

/// What a merchant key allows. Stable names: they appear in keys and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyScope {
    /// Create and cancel invoices.
    Invoices,
    /// Refund paid invoices.
    Refunds,
    /// Read invoices and refunds.
    Read,
}

impl KeyScope {
    /// Every scope, in a stable order.
    pub const ALL: [KeyScope; 3] = [KeyScope::Invoices, KeyScope::Refunds, KeyScope::Read];

    /// The scope's name as it appears in keys.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyScope::Invoices => "invoices",
            KeyScope::Refunds => "refunds",
            KeyScope::Read => "read",
        }
    }
}

impl fmt::Display for KeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyScope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyScope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                format!("unknown merchant key scope `{s}` (known: invoices, refunds, read)")
            })
    }
}

/// The claims of a merchant key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyClaims {
    /// The merchant the key belongs to.
    pub sub: MerchantId,
    /// Always [`MERCHANT_AUDIENCE`].
    pub aud: String,
    /// What the key allows.
    pub scopes: BTreeSet<KeyScope>,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    /// Key id: how the store knows it and how it is revoked.
    pub jti: String,
}

/// Why a merchant key was refused. Messages never contain the key.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// No `Authorization: Bearer` header.
    #[error("missing merchant API key: send it as `Authorization: Bearer <key>`")]
    Missing,
    /// Not a JWT, a wrong algorithm or a wrong audience (an admin token, say).
    #[error("the merchant API key is malformed or not an mxpay merchant key")]
    Malformed,
    /// The signature does not match.
    #[error("the merchant API key's signature does not match this server's key")]
    BadSignature,
    /// Past its `exp`.
    #[error("the merchant API key has expired")]
    Expired,
    /// Revoked, or never minted by this server.
    #[error("this merchant API key was revoked")]
    Revoked,
    /// Valid, but without the scope the call needs.
    #[error("the merchant API key lacks the `{0}` scope")]
    MissingScope(KeyScope),
    /// Minting needs the private half of the key.
    #[error("this server has no signing key for merchant API keys (only a verification key)")]
    NoSigningKey,
    /// Minting failed inside the JWT library.
    #[error("could not sign the merchant API key")]
    Signing,
}

impl KeyError {
    /// HTTP status and Matrix errcode for the edge.
    pub fn status_and_errcode(&self) -> (u16, &'static str) {
        match self {
            KeyError::Missing => (401, "M_MISSING_TOKEN"),
            KeyError::Malformed
            | KeyError::BadSignature
            | KeyError::Expired
            | KeyError::Revoked => (401, "M_UNKNOWN_TOKEN"),
            KeyError::MissingScope(_) => (403, "M_FORBIDDEN"),
            KeyError::NoSigningKey | KeyError::Signing => (500, "M_UNKNOWN"),
        }
    }

    /// The stable reason code of the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::Missing => "key_missing",
            KeyError::Malformed => "key_malformed",
            KeyError::BadSignature => "key_bad_signature",
            KeyError::Expired => "key_expired",
            KeyError::Revoked => "key_revoked",
            KeyError::MissingScope(_) => "key_missing_scope",
            KeyError::NoSigningKey | KeyError::Signing => "internal",
        }
    }
}

/// Mints and checks merchant keys. Built by whoever holds the key material (the admin side
/// builds it from `admin.token`'s key), so this module needs no admin types.
pub struct KeyAuthority {
    algorithm: Algorithm,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    clock: SharedClock,
}

impl fmt::Debug for KeyAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAuthority")
            .field("algorithm", &self.algorithm)
            .field("can_mint", &self.encoding.is_some())
            .finish_non_exhaustive()
    }
}

impl KeyAuthority {
    /// An authority from JWT key material.
    pub fn new(
        algorithm: Algorithm,
        encoding: Option<EncodingKey>,
        decoding: DecodingKey,
        clock: SharedClock,
    ) -> Self {
        Self {
            algorithm,
            encoding,
            decoding,
            clock,
        }
    }

    /// Signs a key for `merchant` with `scopes`, valid `ttl_s` seconds (at most
    /// [`KEY_TTL_MAX_S`]). The caller records the claims in the store before handing it out.
    pub fn mint(
        &self,
        merchant: &MerchantId,
        scopes: BTreeSet<KeyScope>,
        ttl_s: u64,
    ) -> Result<(String, KeyClaims), KeyError> {
        let encoding = self.encoding.as_ref().ok_or(KeyError::NoSigningKey)?;
        let iat = self.clock.now_ms() / 1000;
        let claims = KeyClaims {
            sub: merchant.clone(),
            aud: MERCHANT_AUDIENCE.to_owned(),
            scopes,
            iat,
            exp: iat.saturating_add(ttl_s.min(KEY_TTL_MAX_S)),
            jti: random_key_id(),
        };
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &claims, encoding)
            .map_err(|_| KeyError::Signing)?;
        Ok((token, claims))
    }

    /// Checks signature, audience and expiry (not revocation: the store knows that).
    pub fn authenticate(&self, key: &str) -> Result<KeyClaims, KeyError> {
        let mut validation = Validation::new(self.algorithm);
        validation.validate_exp = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.set_audience(&[MERCHANT_AUDIENCE]);
        let claims = jsonwebtoken::decode::<KeyClaims>(key, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => KeyError::BadSignature,
                _ => KeyError::Malformed,
            })?
            .claims;
        if claims.jti.is_empty() || claims.jti.len() > 64 || claims.iat > claims.exp {
            return Err(KeyError::Malformed);
        }
        if self.clock.now_ms() / 1000 >= claims.exp {
            return Err(KeyError::Expired);
        }
        Ok(claims)
    }
}

/// Reads the bearer key of a request's `Authorization` header.
pub fn bearer(headers: &http::HeaderMap) -> Result<&str, KeyError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(KeyError::Missing)?
        .to_str()
        .map_err(|_| KeyError::Malformed)?;
    let (scheme, key) = value.split_once(' ').ok_or(KeyError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(KeyError::Missing);
    }
    Ok(key.trim())
}

fn random_key_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("mk_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn authority(clock: &ManualClock) -> KeyAuthority {
        KeyAuthority::new(
            Algorithm::HS256,
            Some(EncodingKey::from_secret(SECRET)),
            DecodingKey::from_secret(SECRET),
            Arc::new(clock.clone()),
        )
    }

    #[test]
    fn minted_keys_name_their_merchant_and_expire() {
        let clock = ManualClock::new(1_700_000_000_000);
        let auth = authority(&clock);
        let cafe = MerchantId::parse("cafe").unwrap();
        let (key, claims) = auth
            .mint(&cafe, [KeyScope::Invoices].into_iter().collect(), 60)
            .unwrap();
        let back = auth.authenticate(&key).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.sub, cafe);
        clock.advance_ms(60_000);
        assert_eq!(auth.authenticate(&key), Err(KeyError::Expired));
        let (_, long) = auth.mint(&cafe, BTreeSet::new(), u64::MAX).unwrap();
        assert_eq!(long.exp - long.iat, KEY_TTL_MAX_S);
    }

    #[test]
    fn an_admin_token_is_not_a_merchant_key() {
        let clock = ManualClock::new(1_700_000_000_000);
        let admin = crate::admin::token::TokenAuthority::new(
            &crate::admin::token::AdminKey::Hs256 {
                secret: SECRET.to_vec(),
            },
            Arc::new(clock.clone()),
        )
        .unwrap();
        let admin_token = admin
            .mint(
                "cafe",
                crate::admin::token::Scope::ALL.into_iter().collect(),
                60,
            )
            .unwrap();
        assert_eq!(
            authority(&clock).authenticate(&admin_token),
            Err(KeyError::Malformed)
        );
        // And the other way round.
        let (key, _) = authority(&clock)
            .mint(
                &MerchantId::parse("cafe").unwrap(),
                KeyScope::ALL.into_iter().collect(),
                60,
            )
            .unwrap();
        assert_eq!(
            admin.authenticate(&key),
            Err(crate::admin::token::TokenError::Malformed)
        );
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in KeyScope::ALL {
            assert_eq!(scope.as_str().parse::<KeyScope>().unwrap(), scope);
        }
        assert!("admin".parse::<KeyScope>().is_err());
    }
}
