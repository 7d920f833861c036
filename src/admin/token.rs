//! Admin API bearer tokens: JWTs with scopes, signed with HS256 or EdDSA keys from config.
//!
//! Expiry is checked against the injected [`Clock`](crate::clock::Clock), not the system
//! time, so tests move time instead of sleeping.

use std::collections::BTreeSet;
use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::SharedClock;

/// The audience every admin token carries, so a step-up proof or any other mxpay JWT signed
/// with a shared key can never be used as an admin token.
pub const ADMIN_AUDIENCE: &str = "mxpay-admin";

/// Longest token id (`jti`) accepted, in bytes; mxpay mints 32 hex digits.
pub const JTI_BYTES_MAX: usize = 255;

/// How far a token's `iat` may lie ahead of mxpay's clock, in seconds: room for the minting
/// machine's clock running a little fast, and no more. A token "issued" further ahead would
/// dodge the lifetime bound (see [`check_times`]).
pub const IAT_FUTURE_MAX_S: u64 = 60;

/// Whether `jti` is a usable token id: 1 to [`JTI_BYTES_MAX`] bytes, no control characters.
/// A token without one could not be revoked on its own, so it is refused.
pub fn is_valid_jti(jti: &str) -> bool {
    !jti.is_empty() && jti.len() <= JTI_BYTES_MAX && !jti.chars().any(char::is_control)
}

/// What an admin token allows. Stable names: they appear in tokens and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Credit wallets (top-ups).
    Topup,
    /// Read accounts, balances, history, pending transfers; verify and export the ledger.
    Read,
    /// Freeze and unfreeze accounts.
    Freeze,
    /// Confirm or reject pending withdrawals.
    Settle,
    /// Reset a user's PIN.
    PinReset,
    /// Read the audit log.
    Audit,
    /// Revoke any admin token by its id (a token may always revoke itself, without it).
    Revoke,
    /// Register, show, disable and enable merchants; mint and revoke their API keys.
    Merchants,
    /// Replay webhook events to merchants (reading them needs `read`).
    Webhooks,
}

impl Scope {
    /// Every scope, in a stable order.
    pub const ALL: [Scope; 9] = [
        Scope::Topup,
        Scope::Read,
        Scope::Freeze,
        Scope::Settle,
        Scope::PinReset,
        Scope::Audit,
        Scope::Revoke,
        Scope::Merchants,
        Scope::Webhooks,
    ];

    /// The scope's name as it appears in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Topup => "topup",
            Scope::Read => "read",
            Scope::Freeze => "freeze",
            Scope::Settle => "settle",
            Scope::PinReset => "pin-reset",
            Scope::Audit => "audit",
            Scope::Revoke => "revoke",
            Scope::Merchants => "merchants",
            Scope::Webhooks => "webhooks",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown scope `{s}` (known: {})", names.join(", "))
            })
    }
}

/// The claims of an admin token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminClaims {
    /// Who the token was issued to (free text, e.g. an admin's name); recorded in the audit log.
    pub sub: String,
    /// Always [`ADMIN_AUDIENCE`].
    pub aud: String,
    /// What the token allows.
    pub scopes: BTreeSet<Scope>,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    /// Unique token id, recorded in the audit log and used to revoke the token. Required: a
    /// token without one (or with an empty one) is malformed.
    pub jti: String,
}

/// Why a token was refused or could not be made. Messages never contain the token or key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    #[error("missing admin token: send it as `Authorization: Bearer <token>`")]
    Missing,
    /// Not a JWT, a wrong algorithm, or a wrong audience.
    #[error("the admin token is malformed or not an mxpay admin token")]
    Malformed,
    /// The signature does not match the configured key.
    #[error("the admin token's signature does not match this server's key")]
    BadSignature,
    /// Past its `exp`.
    #[error("the admin token has expired")]
    Expired,
    /// Its `iat` lies more than [`IAT_FUTURE_MAX_S`] ahead of mxpay's clock.
    #[error("the admin token is issued in the future (check the minting machine's clock)")]
    IssuedInFuture,
    /// Its lifetime (`exp - iat`) is longer than `admin.token_ttl_max_s` allows, or it expires
    /// later than that lifetime from now (plus [`IAT_FUTURE_MAX_S`]).
    #[error(
        "the admin token's lifetime is longer than this server allows (admin.token_ttl_max_s)"
    )]
    LifetimeTooLong,
    /// Its id was revoked (`POST /tokens/{jti}/revoke`).
    #[error("this admin token was revoked")]
    Revoked,
    /// Valid, but without the scope the call needs.
    #[error("the admin token lacks the `{0}` scope")]
    MissingScope(Scope),
    /// Minting needs the private half of the key, which this server was not given.
    #[error("this server has no signing key for admin tokens (only a verification key)")]
    NoSigningKey,
    /// Minting failed inside the JWT library.
    #[error("could not sign the admin token")]
    Signing,
}

impl TokenError {
    /// HTTP status and Matrix errcode for the edge.
    pub fn status_and_errcode(&self) -> (u16, &'static str) {
        match self {
            TokenError::Missing => (401, "M_MISSING_TOKEN"),
            TokenError::Malformed
            | TokenError::BadSignature
            | TokenError::Expired
            | TokenError::IssuedInFuture
            | TokenError::LifetimeTooLong
            | TokenError::Revoked => (401, "M_UNKNOWN_TOKEN"),
            TokenError::MissingScope(_) => (403, "M_FORBIDDEN"),
            TokenError::NoSigningKey | TokenError::Signing => (500, "M_UNKNOWN"),
        }
    }
}

/// Key material for admin tokens.
pub enum AdminKey {
    /// A shared secret (HS256). Both mints and verifies.
    Hs256 {
        /// The secret bytes; at least 32.
        secret: Vec<u8>,
    },
    /// Ed25519 (EdDSA): verify with the public key; mint only where the private key is given.
    EdDsa {
        /// PEM of the public key.
        public_pem: Vec<u8>,
        /// PEM of the private key, if this process may mint tokens.
        private_pem: Option<Vec<u8>>,
    },
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminKey::Hs256 { .. } => f.write_str("AdminKey::Hs256(<redacted>)"),
            AdminKey::EdDsa { private_pem, .. } => write!(
                f,
                "AdminKey::EdDsa {{ private: {} }}",
                if private_pem.is_some() {
                    "<redacted>"
                } else {
                    "none"
                }
            ),
        }
    }
}

/// Why key material was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An HS256 secret shorter than 32 bytes.
    #[error("the HS256 secret must be at least 32 bytes long (it is {0})")]
    SecretTooShort(usize),
    /// A PEM that is not an Ed25519 key.
    #[error("the {0} is not an Ed25519 PEM key")]
    BadPem(&'static str),
}

/// Mints and verifies admin tokens.
pub struct TokenAuthority {
    algorithm: Algorithm,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    clock: SharedClock,
}

impl fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenAuthority")
            .field("algorithm", &self.algorithm)
            .field("can_mint", &self.encoding.is_some())
            .finish_non_exhaustive()
    }
}

impl TokenAuthority {
    /// Builds an authority from key material.
    pub fn new(key: &AdminKey, clock: SharedClock) -> Result<Self, KeyError> {
        let (algorithm, encoding, decoding) = match key {
            AdminKey::Hs256 { secret } => {
                if secret.len() < 32 {
                    return Err(KeyError::SecretTooShort(secret.len()));
                }
                (
                    Algorithm::HS256,
                    Some(EncodingKey::from_secret(secret)),
                    DecodingKey::from_secret(secret),
                )
            }
            AdminKey::EdDsa {
                public_pem,
                private_pem,
            } => {
                let decoding = DecodingKey::from_ed_pem(public_pem)
                    .map_err(|_| KeyError::BadPem("public key"))?;
                let encoding = match private_pem {
                    Some(pem) => Some(
                        EncodingKey::from_ed_pem(pem)
                            .map_err(|_| KeyError::BadPem("private key"))?,
                    ),
                    None => None,
                };
                (Algorithm::EdDSA, encoding, decoding)
            }
        };
        Ok(Self {
            algorithm,
            encoding,
            decoding,
            clock,
        })
    }

    /// Mints a token for `subject` with `scopes`, valid for `ttl_s` seconds from now.
    pub fn mint(
        &self,
        subject: &str,
        scopes: BTreeSet<Scope>,
        ttl_s: u64,
    ) -> Result<String, TokenError> {
        self.mint_with_claims(subject, scopes, ttl_s)
            .map(|(token, _)| token)
    }

    /// [`TokenAuthority::mint`], also returning the claims (the `jti` to revoke it by).
    pub fn mint_with_claims(
        &self,
        subject: &str,
        scopes: BTreeSet<Scope>,
        ttl_s: u64,
    ) -> Result<(String, AdminClaims), TokenError> {
        let encoding = self.encoding.as_ref().ok_or(TokenError::NoSigningKey)?;
        let iat = self.clock.now_ms() / 1000;
        let claims = AdminClaims {
            sub: subject.to_owned(),
            aud: ADMIN_AUDIENCE.to_owned(),
            scopes,
            iat,
            exp: iat.saturating_add(ttl_s),
            jti: random_id(),
        };
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &claims, encoding)
            .map_err(|_| TokenError::Signing)?;
        Ok((token, claims))
    }

    /// Verifies `token` and that it carries `required`. Returns its claims.
    pub fn verify(&self, token: &str, required: Scope) -> Result<AdminClaims, TokenError> {
        let claims = self.authenticate(token)?;
        authorize(&claims, required)?;
        Ok(claims)
    }

    /// Verifies `token`'s signature, audience, expiry and that it carries a usable `jti`, not
    /// its scopes nor whether it was revoked (the admin state knows that). Returns its claims,
    /// so a refusal for a missing scope can still name who asked.
    pub fn authenticate(&self, token: &str) -> Result<AdminClaims, TokenError> {
        let mut validation = Validation::new(self.algorithm);
        // Expiry is checked below against the injected clock.
        validation.validate_exp = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.set_audience(&[ADMIN_AUDIENCE]);
        let data = jsonwebtoken::decode::<AdminClaims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            })?;
        let claims = data.claims;
        if !is_valid_jti(&claims.jti) {
            return Err(TokenError::Malformed);
        }
        if self.clock.now_ms() / 1000 >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Checks a token's times against `now_s` (mxpay's clock, seconds since the Unix epoch) and the
/// longest lifetime the server accepts (`admin.token_ttl_max_s`). Refuses `iat > exp`
/// (malformed), `iat` more than [`IAT_FUTURE_MAX_S`] ahead, `exp - iat` above the lifetime,
/// and `exp` later than `now_s + token_ttl_max_s + IAT_FUTURE_MAX_S`.
///
/// Why all of them: the lifetime bound alone read `exp - iat`, which a far-future `iat` makes
/// small (`iat = now + 13 years, exp = now + 10 years` passed). With these checks every accepted
/// token expires within `token_ttl_max_s + IAT_FUTURE_MAX_S` of the moment it is used, which is
/// what lets a revocation be forgotten safely (see [`super::revoked`]). Expiry itself
/// (`now_s >= exp`) is checked by [`TokenAuthority::authenticate`].
pub fn check_times(
    claims: &AdminClaims,
    now_s: u64,
    token_ttl_max_s: u64,
) -> Result<(), TokenError> {
    if claims.iat > claims.exp {
        return Err(TokenError::Malformed);
    }
    if claims.iat > now_s.saturating_add(IAT_FUTURE_MAX_S) {
        return Err(TokenError::IssuedInFuture);
    }
    let exp_max_s = now_s
        .saturating_add(token_ttl_max_s)
        .saturating_add(IAT_FUTURE_MAX_S);
    if claims.exp - claims.iat > token_ttl_max_s || claims.exp > exp_max_s {
        return Err(TokenError::LifetimeTooLong);
    }
    Ok(())
}

/// Checks that authenticated `claims` carry `required`.
pub fn authorize(claims: &AdminClaims, required: Scope) -> Result<(), TokenError> {
    if claims.scopes.contains(&required) {
        Ok(())
    } else {
        Err(TokenError::MissingScope(required))
    }
}

/// 128 random bits as hex, for token ids and generated keys.
pub fn random_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::{Clock as _, ManualClock};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn authority(secret: &[u8], clock: &ManualClock) -> TokenAuthority {
        TokenAuthority::new(
            &AdminKey::Hs256 {
                secret: secret.to_vec(),
            },
            Arc::new(clock.clone()),
        )
        .unwrap()
    }

    #[test]
    fn minted_token_verifies_for_its_scopes_only() {
        let clock = ManualClock::new(1_700_000_000_000);
        let auth = authority(SECRET, &clock);
        let token = auth
            .mint("ops", [Scope::Topup, Scope::Read].into_iter().collect(), 60)
            .unwrap();
        let claims = auth.verify(&token, Scope::Topup).unwrap();
        assert_eq!(claims.sub, "ops");
        assert!(auth.verify(&token, Scope::Read).is_ok());
        assert_eq!(
            auth.verify(&token, Scope::Freeze),
            Err(TokenError::MissingScope(Scope::Freeze))
        );
    }

    #[test]
    fn expired_token_is_refused() {
        let clock = ManualClock::new(1_700_000_000_000);
        let auth = authority(SECRET, &clock);
        let token = auth
            .mint("ops", [Scope::Read].into_iter().collect(), 60)
            .unwrap();
        clock.advance_ms(59_000);
        assert!(auth.verify(&token, Scope::Read).is_ok());
        clock.advance_ms(1_000);
        assert_eq!(auth.verify(&token, Scope::Read), Err(TokenError::Expired));
    }

    #[test]
    fn token_signed_with_another_key_is_refused() {
        let clock = ManualClock::new(1_700_000_000_000);
        let other = authority(b"another secret that is long enough!!", &clock);
        let token = other
            .mint("ops", [Scope::Read].into_iter().collect(), 60)
            .unwrap();
        let auth = authority(SECRET, &clock);
        assert_eq!(
            auth.verify(&token, Scope::Read),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_and_wrong_audience_are_malformed() {
        let clock = ManualClock::new(1_700_000_000_000);
        let auth = authority(SECRET, &clock);
        assert_eq!(
            auth.verify("not.a.jwt", Scope::Read),
            Err(TokenError::Malformed)
        );
        #[derive(Serialize)]
        struct Other {
            sub: &'static str,
            aud: &'static str,
            exp: u64,
            scopes: Vec<Scope>,
        }
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Other {
                sub: "x",
                aud: "mxpay-stepup",
                exp: u64::MAX / 2,
                scopes: vec![Scope::Read],
            },
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(auth.verify(&token, Scope::Read), Err(TokenError::Malformed));
    }

    #[test]
    fn short_secret_is_refused_and_debug_is_redacted() {
        let err = TokenAuthority::new(
            &AdminKey::Hs256 {
                secret: b"short".to_vec(),
            },
            Arc::new(ManualClock::new(0)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("32 bytes"));
        let key = AdminKey::Hs256 {
            secret: SECRET.to_vec(),
        };
        assert!(!format!("{key:?}").contains("0123"));
    }

    /// Test-only Ed25519 keys (generated for these tests, used nowhere else).
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAQLUs+e0ZtGrKj7jkMu1sHqs+56VG4VxZvmlh2WT4kR\n-----END PRIVATE KEY-----\n";
    const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAO5dzs0oomYpbUsAUe6fLh9nIg4tmDYR5RApnWFePERU=\n-----END PUBLIC KEY-----\n";
    const ED_OTHER_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAdK3KunLV45oAvRDlJK2zLhskzbglfcqqCgR9mBSh8L\n-----END PRIVATE KEY-----\n";

    #[test]
    fn eddsa_tokens_verify_with_the_public_key_only() {
        let clock = ManualClock::new(1_700_000_000_000);
        let minter = TokenAuthority::new(
            &AdminKey::EdDsa {
                public_pem: ED_PUBLIC.into(),
                private_pem: Some(ED_PRIVATE.into()),
            },
            Arc::new(clock.clone()),
        )
        .unwrap();
        let verifier = TokenAuthority::new(
            &AdminKey::EdDsa {
                public_pem: ED_PUBLIC.into(),
                private_pem: None,
            },
            Arc::new(clock.clone()),
        )
        .unwrap();
        let token = minter
            .mint("ops", [Scope::Audit].into_iter().collect(), 60)
            .unwrap();
        assert_eq!(verifier.verify(&token, Scope::Audit).unwrap().sub, "ops");
        assert_eq!(
            verifier.mint("ops", BTreeSet::new(), 60),
            Err(TokenError::NoSigningKey)
        );
        // Signed by another Ed25519 key: refused.
        let other = TokenAuthority::new(
            &AdminKey::EdDsa {
                public_pem: ED_PUBLIC.into(),
                private_pem: Some(ED_OTHER_PRIVATE.into()),
            },
            Arc::new(clock.clone()),
        )
        .unwrap()
        .mint("ops", [Scope::Audit].into_iter().collect(), 60)
        .unwrap();
        assert_eq!(
            verifier.verify(&other, Scope::Audit),
            Err(TokenError::BadSignature)
        );
        // An HS256 token made with the public key as its secret (algorithm confusion): refused.
        let confused = authority(ED_PUBLIC.as_bytes(), &clock)
            .mint("ops", [Scope::Audit].into_iter().collect(), 60)
            .unwrap();
        assert!(verifier.verify(&confused, Scope::Audit).is_err());
        assert!(!format!(
            "{:?}",
            AdminKey::EdDsa {
                public_pem: vec![],
                private_pem: Some(ED_PRIVATE.into())
            }
        )
        .contains("MC4C"));
    }

    #[test]
    fn tokens_without_a_usable_jti_are_malformed() {
        let clock = ManualClock::new(1_700_000_000_000);
        let auth = authority(SECRET, &clock);
        let (token, claims) = auth
            .mint_with_claims("ops", [Scope::Read].into_iter().collect(), 60)
            .unwrap();
        assert_eq!(auth.authenticate(&token).unwrap().jti, claims.jti);
        assert!(is_valid_jti(&claims.jti));
        let sign = |claims: &serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let mut value = serde_json::to_value(&claims).unwrap();
        assert!(auth.authenticate(&sign(&value)).is_ok());
        for bad_jti in [
            serde_json::json!(""),
            serde_json::json!("a\nb"),
            serde_json::json!("x".repeat(JTI_BYTES_MAX + 1)),
        ] {
            value["jti"] = bad_jti;
            assert_eq!(
                auth.authenticate(&sign(&value)),
                Err(TokenError::Malformed),
                "{value}"
            );
        }
        value.as_object_mut().unwrap().remove("jti");
        assert_eq!(auth.authenticate(&sign(&value)), Err(TokenError::Malformed));
    }

    #[test]
    fn revoked_and_overlong_tokens_are_unknown_tokens() {
        for error in [TokenError::Revoked, TokenError::LifetimeTooLong] {
            assert_eq!(error.status_and_errcode(), (401, "M_UNKNOWN_TOKEN"));
        }
        assert_eq!(
            TokenError::Revoked.to_string(),
            "this admin token was revoked"
        );
    }

    /// Signs `claims` with [`SECRET`] as they are, whatever their times.
    fn sign_claims(claims: &AdminClaims) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn tokens_issued_in_the_future_or_outliving_the_lifetime_bound_are_refused() {
        const NOW_S: u64 = 1_700_000_000;
        const TTL_MAX_S: u64 = 30 * 24 * 3600;
        const YEAR_S: u64 = 365 * 24 * 3600;
        let clock = ManualClock::new(NOW_S * 1000);
        let auth = authority(SECRET, &clock);
        let claims = |iat: u64, exp: u64| AdminClaims {
            sub: "ops".to_owned(),
            aud: ADMIN_AUDIENCE.to_owned(),
            scopes: [Scope::Read].into_iter().collect(),
            iat,
            exp,
            jti: random_id(),
        };
        let check = |iat: u64, exp: u64| {
            let claims = auth.authenticate(&sign_claims(&claims(iat, exp)))?;
            check_times(&claims, clock.now_ms() / 1000, TTL_MAX_S)
        };
        // The token of the report: issued 13 years ahead, expiring in 10. Its `exp - iat`
        // saturates to 0, which passed the lifetime bound before.
        assert_eq!(
            check(NOW_S + 13 * YEAR_S, NOW_S + 10 * YEAR_S),
            Err(TokenError::Malformed)
        );
        // Issued in the future: a minute of clock skew passes, more does not.
        assert_eq!(check(NOW_S + IAT_FUTURE_MAX_S, NOW_S + 3600), Ok(()));
        assert_eq!(
            check(NOW_S + IAT_FUTURE_MAX_S + 1, NOW_S + 3600),
            Err(TokenError::IssuedInFuture)
        );
        assert_eq!(
            check(NOW_S + 13 * YEAR_S, NOW_S + 13 * YEAR_S + 60),
            Err(TokenError::IssuedInFuture)
        );
        // Lifetime: exactly the bound passes, one second more does not.
        assert_eq!(check(NOW_S, NOW_S + TTL_MAX_S), Ok(()));
        assert_eq!(
            check(NOW_S, NOW_S + TTL_MAX_S + 1),
            Err(TokenError::LifetimeTooLong)
        );
        // The latest expiry: issued at the edge of the skew with the longest lifetime.
        assert_eq!(
            check(
                NOW_S + IAT_FUTURE_MAX_S,
                NOW_S + IAT_FUTURE_MAX_S + TTL_MAX_S
            ),
            Ok(())
        );
        // Even a token whose own times look fine expires no later than that (checked on the
        // claims directly: `authenticate` alone does not know the lifetime bound).
        let far = claims(NOW_S + 10 * YEAR_S, NOW_S + 10 * YEAR_S + 60);
        assert!(auth.authenticate(&sign_claims(&far)).is_ok());
        assert_eq!(
            check_times(&far, NOW_S, TTL_MAX_S),
            Err(TokenError::IssuedInFuture)
        );
        let mut late = claims(NOW_S, NOW_S + TTL_MAX_S);
        late.exp = NOW_S + IAT_FUTURE_MAX_S + TTL_MAX_S + 1;
        assert!(check_times(&late, NOW_S, TTL_MAX_S).is_err());
        // A token issued a little ahead becomes fine as the clock catches up, and expires.
        assert_eq!(
            check(NOW_S + 120, NOW_S + 3600),
            Err(TokenError::IssuedInFuture)
        );
        clock.advance_ms(60_000);
        assert_eq!(check(NOW_S + 120, NOW_S + 3600), Ok(()));
        clock.set_ms((NOW_S + 3600) * 1000);
        assert_eq!(check(NOW_S + 120, NOW_S + 3600), Err(TokenError::Expired));
        assert_eq!(
            TokenError::IssuedInFuture.status_and_errcode(),
            (401, "M_UNKNOWN_TOKEN")
        );
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>().unwrap(), scope);
        }
        assert!("admin".parse::<Scope>().unwrap_err().contains("pin-reset"));
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_of_the_authority_hides_the_key() {
        let authority = TokenAuthority::new(
            &AdminKey::Hs256 {
                secret: b"jwt-key-very-secret-0123456789abcdef".to_vec(),
            },
            std::sync::Arc::new(crate::clock::ManualClock::new(0)),
        )
        .unwrap();
        let debug = format!("{authority:?} {authority:#?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
