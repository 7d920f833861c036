//! What a merchant is: its id, Matrix user, display name, webhook URL and signing secret.
//! Parsed once here; the store and the APIs hold these types, never loose strings.

use std::fmt;

use matrix_sdk::ruma::OwnedUserId;
use serde::{Deserialize, Serialize};

use super::MerchantError;

/// Longest merchant id, in bytes.
pub const MERCHANT_ID_BYTES_MAX: usize = 64;
/// Longest display name, in characters.
pub const DISPLAY_NAME_CHARS_MAX: usize = 100;
/// Longest webhook URL, in bytes.
pub const WEBHOOK_URL_BYTES_MAX: usize = 2048;
/// What every generated webhook signing secret starts with, so a leaked one is recognisable.
pub const WEBHOOK_SECRET_PREFIX: &str = "whsec_";

/// A merchant id: 1 to [`MERCHANT_ID_BYTES_MAX`] of `a-z 0-9 _ -`, starting with a letter or
/// digit. It names the merchant's ledger account (`Owner::Merchant`) and appears in keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MerchantId(String);

impl MerchantId {
    /// Parses and checks an id.
    pub fn parse(text: &str) -> Result<Self, MerchantError> {
        let ok = !text.is_empty()
            && text.len() <= MERCHANT_ID_BYTES_MAX
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            && text
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(MerchantError::InvalidId)
        }
    }

    /// A fresh random id (`m_` and 16 hex digits).
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(format!("m_{}", hex::encode(bytes)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The merchant's ledger owner.
    pub fn owner(&self) -> crate::ledger::Owner {
        crate::ledger::Owner::merchant(self.0.clone())
    }
}

impl TryFrom<String> for MerchantId {
    type Error = MerchantError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<MerchantId> for String {
    fn from(id: MerchantId) -> Self {
        id.0
    }
}

impl fmt::Display for MerchantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The secret a merchant's webhooks are signed with. Shown once when the merchant is created;
/// its Debug form and every error say `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// A fresh secret: [`WEBHOOK_SECRET_PREFIX`] and 256 random bits as hex.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(format!("{WEBHOOK_SECRET_PREFIX}{}", hex::encode(bytes)))
    }

    /// The secret itself, for signing and for the one answer that shows it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// Checks a webhook URL: absolute `https` (or `http`, for a receiver on the same machine or
/// a test), with a host, no credentials, at most [`WEBHOOK_URL_BYTES_MAX`] bytes.
pub fn parse_webhook_url(text: &str) -> Result<url::Url, MerchantError> {
    if text.len() > WEBHOOK_URL_BYTES_MAX {
        return Err(MerchantError::InvalidWebhookUrl);
    }
    let url = url::Url::parse(text).map_err(|_| MerchantError::InvalidWebhookUrl)?;
    let ok = matches!(url.scheme(), "https" | "http")
        && url.host().is_some()
        && url.username().is_empty()
        && url.password().is_none();
    if ok {
        Ok(url)
    } else {
        Err(MerchantError::InvalidWebhookUrl)
    }
}

/// Checks a display name: 1 to [`DISPLAY_NAME_CHARS_MAX`] characters, no control characters,
/// not blank.
pub fn check_display_name(text: &str) -> Result<(), MerchantError> {
    let ok = !text.trim().is_empty()
        && text.chars().count() <= DISPLAY_NAME_CHARS_MAX
        && !text.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(MerchantError::InvalidDisplayName)
    }
}

/// A registered merchant, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merchant {
    /// Its id.
    pub id: MerchantId,
    /// The Matrix user who is the merchant (a person or a bot account): typed requests it
    /// sends are honoured as this merchant's invoices.
    pub user_id: OwnedUserId,
    /// The name customers see on invoices and receipts.
    pub display_name: String,
    /// Where its webhooks go.
    pub webhook_url: String,
    /// What its webhooks are signed with.
    pub webhook_secret: WebhookSecret,
    /// A disabled merchant's keys are refused and it cannot invoice; its wallet stays.
    pub enabled: bool,
    /// When it was registered, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Its own limits (set by the operator), on top of the ledger's.
    #[serde(default)]
    pub limits: MerchantLimits,
}

/// A merchant's own limits on what it may invoice. Amounts in minor units of each currency;
/// a currency not named, or no cap, leaves only the ledger's and the store's bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerchantLimits {
    /// Largest single invoice per currency code, in minor units.
    #[serde(default)]
    pub max_invoice_minor: std::collections::BTreeMap<String, u128>,
    /// Most invoices open (posted, neither paid nor ended) at once.
    #[serde(default)]
    pub open_invoices_max: Option<u64>,
}

/// Most open invoices a merchant's cap may name.
pub const OPEN_INVOICES_MAX_MAX: u64 = 1_000_000;

/// A merchant as the APIs show it: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerchantView {
    /// Its id.
    pub merchant_id: String,
    /// Its Matrix user.
    pub user_id: String,
    /// Its display name.
    pub display_name: String,
    /// Its webhook URL.
    pub webhook_url: String,
    /// Whether it may invoice.
    pub enabled: bool,
    /// When it was registered, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Its own limits.
    #[serde(default)]
    pub limits: MerchantLimits,
}

impl From<&Merchant> for MerchantView {
    fn from(m: &Merchant) -> Self {
        Self {
            merchant_id: m.id.to_string(),
            user_id: m.user_id.to_string(),
            display_name: m.display_name.clone(),
            webhook_url: m.webhook_url.clone(),
            enabled: m.enabled,
            created_at_ms: m.created_at_ms,
            limits: m.limits.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchant_ids_are_checked() {
        for good in [
            "cafe",
            "a",
            "m_0123",
            "9-lives",
            &"x".repeat(MERCHANT_ID_BYTES_MAX),
        ] {
            assert!(MerchantId::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Cafe",
            "_cafe",
            "-x",
            "ca fe",
            "café",
            &"x".repeat(MERCHANT_ID_BYTES_MAX + 1),
        ] {
            assert!(MerchantId::parse(bad).is_err(), "{bad}");
        }
        let id = MerchantId::generate();
        assert_eq!(MerchantId::parse(id.as_str()).unwrap(), id);
        assert_eq!(id.owner(), crate::ledger::Owner::merchant(id.as_str()));
        assert!(serde_json::from_str::<MerchantId>("\"Bad\"").is_err());
    }

    #[test]
    fn secrets_are_random_and_never_in_debug() {
        let a = WebhookSecret::generate();
        let b = WebhookSecret::generate();
        assert_ne!(a, b);
        assert!(a.expose().starts_with(WEBHOOK_SECRET_PREFIX));
        assert_eq!(a.expose().len(), WEBHOOK_SECRET_PREFIX.len() + 64);
        let merchant = Merchant {
            limits: MerchantLimits::default(),
            id: MerchantId::parse("cafe").unwrap(),
            user_id: "@cafe:example.org".try_into().unwrap(),
            display_name: "Café".to_owned(),
            webhook_url: "https://cafe.example/hook".to_owned(),
            webhook_secret: a.clone(),
            enabled: true,
            created_at_ms: 1,
        };
        let debug = format!("{merchant:?} {merchant:#?}");
        assert!(!debug.contains(&a.expose()[6..]), "{debug}");
        let view = serde_json::to_string(&MerchantView::from(&merchant)).unwrap();
        assert!(!view.contains(&a.expose()[6..]), "{view}");
    }

    #[test]
    fn webhook_urls_and_names_are_checked() {
        assert!(parse_webhook_url("https://shop.example/hooks/mxpay").is_ok());
        assert!(parse_webhook_url("http://127.0.0.1:9000/hook").is_ok());
        for bad in [
            "shop.example/hook",
            "ftp://shop.example/",
            "https://user:pw@shop.example/",
            "file:///etc/passwd",
        ] {
            assert!(parse_webhook_url(bad).is_err(), "{bad}");
        }
        let long = format!("https://x.example/{}", "a".repeat(WEBHOOK_URL_BYTES_MAX));
        assert!(parse_webhook_url(&long).is_err());
        assert!(check_display_name("Corner Café").is_ok());
        for bad in ["", "   ", "a\nb", &"x".repeat(DISPLAY_NAME_CHARS_MAX + 1)] {
            assert!(check_display_name(bad).is_err(), "{bad:?}");
        }
    }
}
