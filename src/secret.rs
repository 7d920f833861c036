//! A secret string (a token): its `Debug` never shows the value.

use base64::Engine as _;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

/// Bytes of randomness in each generated token (256 bits).
pub const TOKEN_RANDOM_BYTES: usize = 32;

/// A secret string (token). Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A fresh url-safe token carrying [`TOKEN_RANDOM_BYTES`] bytes from the OS RNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
