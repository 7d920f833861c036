//! The `admin:` config section: the admin token key, the funding providers' webhook secrets,
//! and their bounds.
//!
//! Secrets never sit in the config file itself: each is read from a file or an environment
//! variable ([`SecretSource`]) when the admin API starts, so the config can be shared, logged
//! and checked in without leaking them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::token::AdminKey;
use super::webhook::{WebhookSecret, DEFAULT_TOLERANCE_S};

/// Longest a provider name may be, in bytes.
pub const PROVIDER_NAME_BYTES_MAX: usize = 64;

/// Shortest accepted webhook secret, in bytes (as for the HS256 token key).
pub const WEBHOOK_SECRET_MIN_BYTES: usize = 32;
/// Largest secret file read, in bytes (a PEM key is well below it).
pub const SECRET_FILE_BYTES_MAX: u64 = 64 * 1024;

/// Why the admin settings or their secrets were refused; each names the config key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// A value is not acceptable.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// Why.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// `admin:` section. Without `admin.token` the admin API is off (its routes answer 404).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// The key admin tokens are signed with. Default: none (admin API off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenKeySettings>,
    /// Funding providers allowed to call `POST /_mxpay/admin/v1/webhooks/{name}`.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderSettings>,
    /// Largest distance between a webhook's signed timestamp and now, in seconds. Default 300.
    #[serde(default = "default_tolerance_s")]
    pub webhook_tolerance_s: u64,
    /// Longest lifetime `mxpay admin token create` gives a token, in seconds.
    /// Default 2592000 (30 days).
    #[serde(default = "default_token_ttl_max_s")]
    pub token_ttl_max_s: u64,
    /// Refused admin calls (no valid token, bad webhook signature) answered and audited per
    /// minute from one peer IP (an IPv6 /64), also as a burst; more get 429. Default 20.
    #[serde(default = "default_refused_calls_per_peer_per_min")]
    pub refused_calls_per_peer_per_min: u32,
    /// Refused admin calls answered and audited per minute from all peers together, also as a
    /// burst; more get 429. Default 60.
    #[serde(default = "default_refused_calls_per_min")]
    pub refused_calls_per_min: u32,
}

impl Default for AdminSettings {
    /// The same values as an absent `admin:` section: off.
    fn default() -> Self {
        Self {
            token: None,
            providers: Vec::new(),
            webhook_tolerance_s: default_tolerance_s(),
            token_ttl_max_s: default_token_ttl_max_s(),
            refused_calls_per_peer_per_min: default_refused_calls_per_peer_per_min(),
            refused_calls_per_min: default_refused_calls_per_min(),
        }
    }
}

fn default_tolerance_s() -> u64 {
    DEFAULT_TOLERANCE_S
}

fn default_token_ttl_max_s() -> u64 {
    30 * 24 * 60 * 60
}

fn default_refused_calls_per_peer_per_min() -> u32 {
    20
}

fn default_refused_calls_per_min() -> u32 {
    60
}

/// Largest accepted `admin.refused_calls_per_min` and `..._per_peer_per_min`: above it the
/// audit log of a flood grows faster than an operator reads it.
pub const REFUSED_CALLS_PER_MIN_MAX: u32 = 10_000;

/// Signature algorithm of admin tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenAlgorithm {
    /// HMAC-SHA256 with a shared secret of at least 32 bytes.
    #[serde(rename = "HS256")]
    Hs256,
    /// Ed25519 signatures: the server needs only the public key.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

/// `admin.token`: the key admin tokens are signed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenKeySettings {
    /// `HS256` or `EdDSA`.
    pub algorithm: TokenAlgorithm,
    /// HS256: the shared secret (at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretSource>,
    /// EdDSA: the Ed25519 public key (PEM) that verifies tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<SecretSource>,
    /// EdDSA: the Ed25519 private key (PEM), needed only where tokens are minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<SecretSource>,
}

/// `admin.providers[]`: one funding provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// The provider's name in the webhook URL: lower-case letters, digits, `-`, `_`.
    pub name: String,
    /// The HMAC-SHA256 secret the provider signs webhooks with.
    pub secret: SecretSource,
}

/// Where a secret comes from: exactly one of a file or an environment variable.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file holding the secret; surrounding whitespace (a trailing newline) is trimmed.
    /// Relative paths are resolved against the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// An environment variable holding the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

impl fmt::Debug for SecretSource {
    // Names only where the secret is, never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, &self.env) {
            (Some(file), _) => write!(f, "SecretSource(file {})", file.display()),
            (None, Some(env)) => write!(f, "SecretSource(env {env})"),
            (None, None) => f.write_str("SecretSource(none)"),
        }
    }
}

impl SecretSource {
    /// A secret read from `path`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            file: Some(path.into()),
            env: None,
        }
    }

    /// A secret read from the environment variable `name`.
    pub fn env(name: impl Into<String>) -> Self {
        Self {
            file: None,
            env: Some(name.into()),
        }
    }

    fn validate(&self, key: &str) -> Result<(), SettingsError> {
        match (&self.file, &self.env) {
            (Some(_), Some(_)) => Err(invalid(key, "give either `file` or `env`, not both")),
            (None, None) => Err(invalid(key, "give `file` or `env`")),
            (Some(path), None) if path.as_os_str().is_empty() => {
                Err(invalid(format!("{key}.file"), "must not be empty"))
            }
            (None, Some(name)) if name.is_empty() || name.contains('=') => Err(invalid(
                format!("{key}.env"),
                "must be an environment variable name",
            )),
            _ => Ok(()),
        }
    }

    /// Reads the secret; errors name `key` and where it was looked for, never its value. A
    /// file open to group or others is refused (see [`crate::private_fs`]).
    pub fn load(&self, key: &str) -> Result<Vec<u8>, SettingsError> {
        self.load_checked(key, true)
    }

    /// Reads a public key: like [`SecretSource::load`], but its file may be world-readable.
    pub fn load_public(&self, key: &str) -> Result<Vec<u8>, SettingsError> {
        self.load_checked(key, false)
    }

    fn load_checked(&self, key: &str, private: bool) -> Result<Vec<u8>, SettingsError> {
        self.validate(key)?;
        let raw = if let Some(path) = &self.file {
            let file = std::fs::File::open(path).map_err(|e| {
                invalid(
                    format!("{key}.file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            if private {
                crate::private_fs::check_private_file(&file, path)
                    .map_err(|e| invalid(format!("{key}.file"), e.to_string()))?;
            }
            let mut bytes = Vec::new();
            use std::io::Read as _;
            file.take(SECRET_FILE_BYTES_MAX + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| {
                    invalid(
                        format!("{key}.file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
            if bytes.len() as u64 > SECRET_FILE_BYTES_MAX {
                return Err(invalid(
                    format!("{key}.file"),
                    format!(
                        "{} is larger than {SECRET_FILE_BYTES_MAX} bytes",
                        path.display()
                    ),
                ));
            }
            bytes
        } else {
            let name = self.env.as_deref().unwrap_or_default();
            std::env::var_os(name)
                .ok_or_else(|| {
                    invalid(
                        format!("{key}.env"),
                        format!("the environment variable {name} is not set"),
                    )
                })?
                .into_encoded_bytes()
        };
        // `openssl rand -hex 32 > file` and `echo` add a newline that is not part of the key.
        let trimmed = raw.trim_ascii();
        if trimmed.is_empty() {
            return Err(invalid(key, "the secret is empty"));
        }
        Ok(trimmed.to_vec())
    }

    fn resolve_paths(&mut self, base: &Path) {
        if let Some(path) = &mut self.file {
            if path.is_relative() {
                *path = base.join(&*path).components().collect();
            }
        }
    }
}

impl AdminSettings {
    /// Whether the admin API is on (a token key is configured).
    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Checks what serde cannot; errors name the key (`admin.providers[1].name`).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if let Some(token) = &self.token {
            token.validate()?;
        }
        for (i, provider) in self.providers.iter().enumerate() {
            let key = format!("admin.providers[{i}]");
            let name = &provider.name;
            if name.is_empty()
                || name.len() > PROVIDER_NAME_BYTES_MAX
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                return Err(invalid(
                    format!("{key}.name"),
                    format!(
                        "`{name}` must be 1 to {PROVIDER_NAME_BYTES_MAX} lower-case letters, \
                         digits, `-` or `_`"
                    ),
                ));
            }
            if self.providers[..i].iter().any(|p| &p.name == name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("`{name}` appears twice"),
                ));
            }
            provider.secret.validate(&format!("{key}.secret"))?;
        }
        if self.webhook_tolerance_s == 0 || self.webhook_tolerance_s > 3600 {
            return Err(invalid(
                "admin.webhook_tolerance_s",
                "must be between 1 and 3600 seconds",
            ));
        }
        if self.token_ttl_max_s == 0 {
            return Err(invalid("admin.token_ttl_max_s", "must be above 0"));
        }
        for (key, value) in [
            (
                "admin.refused_calls_per_peer_per_min",
                self.refused_calls_per_peer_per_min,
            ),
            ("admin.refused_calls_per_min", self.refused_calls_per_min),
        ] {
            if value == 0 || value > REFUSED_CALLS_PER_MIN_MAX {
                return Err(invalid(
                    key,
                    format!("must be between 1 and {REFUSED_CALLS_PER_MIN_MAX}"),
                ));
            }
        }
        Ok(())
    }

    /// Makes relative secret file paths absolute against `base` (the config's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(token) = &mut self.token {
            for source in [
                &mut token.secret,
                &mut token.public_key,
                &mut token.private_key,
            ]
            .into_iter()
            .flatten()
            {
                source.resolve_paths(base);
            }
        }
        for provider in &mut self.providers {
            provider.secret.resolve_paths(base);
        }
    }

    /// Reads the token key. `with_private` also reads the EdDSA private key (for minting).
    /// `None` when the admin API is off.
    pub fn load_token_key(&self, with_private: bool) -> Result<Option<AdminKey>, SettingsError> {
        let Some(token) = &self.token else {
            return Ok(None);
        };
        token.validate()?;
        Ok(Some(match token.algorithm {
            TokenAlgorithm::Hs256 => AdminKey::Hs256 {
                secret: token
                    .secret
                    .as_ref()
                    .expect("validated")
                    .load("admin.token.secret")?,
            },
            TokenAlgorithm::EdDsa => AdminKey::EdDsa {
                public_pem: token
                    .public_key
                    .as_ref()
                    .expect("validated")
                    .load_public("admin.token.public_key")?,
                private_pem: match (&token.private_key, with_private) {
                    (Some(source), true) => Some(source.load("admin.token.private_key")?),
                    _ => None,
                },
            },
        }))
    }

    /// Reads every provider's webhook secret, in config order.
    pub fn load_providers(&self) -> Result<Vec<(String, WebhookSecret)>, SettingsError> {
        self.providers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let key = format!("admin.providers[{i}].secret");
                let secret = p.secret.load(&key)?;
                // A short HMAC key can be brute-forced offline from one signed webhook.
                if secret.len() < WEBHOOK_SECRET_MIN_BYTES {
                    return Err(invalid(
                        key,
                        format!(
                            "the webhook secret must be at least {WEBHOOK_SECRET_MIN_BYTES} bytes \
                             long (it is {})",
                            secret.len()
                        ),
                    ));
                }
                Ok((p.name.clone(), WebhookSecret::new(secret)))
            })
            .collect()
    }
}

impl TokenKeySettings {
    fn validate(&self) -> Result<(), SettingsError> {
        match self.algorithm {
            TokenAlgorithm::Hs256 => {
                let secret = self.secret.as_ref().ok_or_else(|| {
                    invalid("admin.token.secret", "HS256 needs a secret (file or env)")
                })?;
                secret.validate("admin.token.secret")?;
                if self.public_key.is_some() || self.private_key.is_some() {
                    return Err(invalid(
                        "admin.token",
                        "HS256 takes `secret`; `public_key`/`private_key` are for EdDSA",
                    ));
                }
            }
            TokenAlgorithm::EdDsa => {
                let public = self.public_key.as_ref().ok_or_else(|| {
                    invalid(
                        "admin.token.public_key",
                        "EdDSA needs the Ed25519 public key (PEM, file or env)",
                    )
                })?;
                public.validate("admin.token.public_key")?;
                if let Some(private) = &self.private_key {
                    private.validate("admin.token.private_key")?;
                }
                if self.secret.is_some() {
                    return Err(invalid(
                        "admin.token.secret",
                        "EdDSA takes `public_key` (and `private_key`), not `secret`",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> AdminSettings {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_are_off_with_bounds() {
        let s = parse("{}");
        assert_eq!(s, AdminSettings::default());
        assert!(!s.enabled());
        assert_eq!(s.webhook_tolerance_s, 300);
        assert_eq!(s.token_ttl_max_s, 2_592_000);
        assert_eq!(
            (s.refused_calls_per_peer_per_min, s.refused_calls_per_min),
            (20, 60)
        );
        s.validate().unwrap();
        assert!(s.load_token_key(true).unwrap().is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("token: {algorithm: HS256}", "admin.token.secret"),
            (
                "token: {algorithm: HS256, secret: {file: a, env: B}}",
                "admin.token.secret",
            ),
            (
                "token: {algorithm: HS256, secret: {}}",
                "admin.token.secret",
            ),
            ("token: {algorithm: EdDSA}", "admin.token.public_key"),
            (
                "token: {algorithm: EdDSA, public_key: {file: p}, secret: {env: X}}",
                "admin.token.secret",
            ),
            (
                "providers: [{name: Acme, secret: {env: X}}]",
                "admin.providers[0].name",
            ),
            (
                "providers: [{name: a, secret: {env: X}}, {name: a, secret: {env: Y}}]",
                "admin.providers[1].name",
            ),
            (
                "providers: [{name: a, secret: {env: ''}}]",
                "admin.providers[0].secret.env",
            ),
            ("webhook_tolerance_s: 0", "admin.webhook_tolerance_s"),
            ("token_ttl_max_s: 0", "admin.token_ttl_max_s"),
            (
                "refused_calls_per_peer_per_min: 0",
                "admin.refused_calls_per_peer_per_min",
            ),
            (
                "refused_calls_per_min: 10001",
                "admin.refused_calls_per_min",
            ),
        ];
        for (yaml, key) in cases {
            let message = parse(yaml).validate().expect_err(yaml).to_string();
            assert!(message.contains(key), "`{yaml}` gave `{message}`");
        }
    }

    #[test]
    fn secrets_load_from_file_or_env_trimmed_and_errors_hide_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("jwt.key"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        set_mode(&dir.path().join("jwt.key"), 0o600);
        let mut s = parse(
            "token: {algorithm: HS256, secret: {file: jwt.key}}\n\
             providers: [{name: acme, secret: {env: MXPAY_TEST_SETTINGS_ACME}}]",
        );
        s.validate().unwrap();
        s.resolve_paths(dir.path());
        assert_eq!(
            s.token.as_ref().unwrap().secret.as_ref().unwrap().file,
            Some(dir.path().join("jwt.key"))
        );
        match s.load_token_key(false).unwrap().unwrap() {
            AdminKey::Hs256 { secret } => assert_eq!(secret, b"0123456789abcdef0123456789abcdef"),
            other => panic!("{other:?}"),
        }
        let err = s.load_providers().unwrap_err().to_string();
        assert!(err.contains("admin.providers[0].secret.env"), "{err}");
        assert!(err.contains("MXPAY_TEST_SETTINGS_ACME"), "{err}");
        std::env::set_var("MXPAY_TEST_SETTINGS_ACME", "whsec-abc");
        let short = s.load_providers().unwrap_err().to_string();
        assert!(
            short.contains("admin.providers[0].secret") && short.contains("at least 32 bytes"),
            "{short}"
        );
        assert!(!short.contains("whsec"), "{short}");
        std::env::set_var(
            "MXPAY_TEST_SETTINGS_ACME",
            "whsec-abc-0123456789abcdef0123456789",
        );
        let providers = s.load_providers().unwrap();
        assert_eq!(providers[0].0, "acme");
        assert!(!format!("{:?}", providers[0].1).contains("whsec"));

        let missing = SecretSource::file(dir.path().join("nope"))
            .load("admin.token.secret")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("admin.token.secret.file"), "{missing}");
        assert!(!format!("{:?}", SecretSource::env("X")).contains("whsec"));
    }

    fn set_mode(path: &Path, mode: u32) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        #[cfg(not(unix))]
        let _ = (path, mode);
    }

    /// As ssh with a private key: a token key file group or others can read is refused with a
    /// sentence naming the key, the file and the fix; a public key may be world-readable.
    #[cfg(unix)]
    #[test]
    fn a_key_file_open_to_others_is_refused_but_a_public_key_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("jwt.key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        set_mode(&key, 0o644);
        let mut s = parse("token: {algorithm: HS256, secret: {file: jwt.key}}");
        s.resolve_paths(dir.path());
        let message = s.load_token_key(false).unwrap_err().to_string();
        assert!(
            message.contains("`admin.token.secret.file`")
                && message.contains(&format!("chmod 600 {}", key.display())),
            "{message}"
        );
        assert!(!message.contains("0123456789abcdef"), "{message}");
        set_mode(&key, 0o600);
        s.load_token_key(false).unwrap();

        let public = dir.path().join("public.pem");
        std::fs::write(&public, "-----BEGIN PUBLIC KEY-----\n").unwrap();
        set_mode(&public, 0o644);
        assert!(SecretSource::file(&public)
            .load_public("admin.token.public_key")
            .is_ok());
        assert!(SecretSource::file(&public)
            .load("admin.token.private_key")
            .is_err());
    }
}
