//! Merchants: businesses that take payments in chat. A merchant is a Matrix user (a person or
//! a bot account) registered by the operator, with a wallet of its own in the ledger
//! (`Owner::Merchant`), API keys bound to it, invoices, refunds and webhooks. See
//! `docs/business.md`.
//!
//! Layout: [`model`] the types (ids, secrets, the record), [`key`] merchant API keys (JWTs
//! with their own audience), [`store`] the registry and the keys (`<data_dir>/merchants/`),
//! [`events`] the hook where webhook events are produced.

pub mod api;
pub mod events;
pub mod invoice;
pub mod invoices;
pub mod key;
pub mod model;
pub mod store;

pub use events::{MerchantEvents, NoEvents, WebhookTarget};
pub use key::{KeyAuthority, KeyClaims, KeyError, KeyScope, MERCHANT_AUDIENCE};
pub use model::{Merchant, MerchantId, MerchantLimits, MerchantView, WebhookSecret};
pub use store::MerchantStore;

/// Everything the merchant registry and the merchant API refuse or fail at. Each refusal has
/// a stable snake_case [`MerchantError::reason`]; the HTTP edge maps them to Matrix error
/// JSON; store details are logged, never answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MerchantError {
    /// The merchant key was refused.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A merchant id does not parse.
    #[error("a merchant id is 1 to 64 of a-z, 0-9, `_` and `-`, starting with a letter or digit")]
    InvalidId,
    /// The display name is empty, too long or has control characters.
    #[error("the display name must be 1 to 100 characters without control characters")]
    InvalidDisplayName,
    /// The webhook URL is not an absolute http(s) URL with a host.
    #[error("the webhook URL must be an absolute https (or http) URL without credentials")]
    InvalidWebhookUrl,
    /// The Matrix user id does not parse.
    #[error("`{0}` is not a valid Matrix user ID (@user:server)")]
    InvalidUserId(String),
    /// No merchant with this id.
    #[error("no such merchant")]
    UnknownMerchant,
    /// The merchant is disabled.
    #[error("this merchant is disabled")]
    Disabled,
    /// The id is registered already.
    #[error("a merchant with this id exists already")]
    IdTaken,
    /// The Matrix user is another merchant already.
    #[error("this Matrix user is a merchant already")]
    UserTaken,
    /// [`store::MERCHANTS_MAX`] merchants are registered.
    #[error("too many merchants are registered")]
    TooMany,
    /// [`store::KEYS_PER_MERCHANT_MAX`] keys exist for the merchant.
    #[error("this merchant has too many API keys; revoke old ones")]
    TooManyKeys,
    /// No such key for this merchant.
    #[error("no such key for this merchant")]
    UnknownKey,
    /// An invoice or refund call was refused.
    #[error(transparent)]
    Invoice(#[from] invoice::InvoiceRefusal),
    /// [`invoices::INVOICES_PER_MERCHANT_MAX`] invoices are stored for the merchant.
    #[error("this merchant has too many invoices")]
    TooManyInvoices,
    /// A list cursor that this server did not hand out (or another merchant's).
    #[error("invalid cursor")]
    BadCursor,
    /// The bot cannot post the invoice: not in the room, or the room is not encrypted, or the
    /// payer is not in it (the sentence says which).
    #[error("{1}")]
    Room(&'static str, String),
    /// The request body is not the expected JSON, or too large.
    #[error("invalid request body: {0}")]
    BadJson(String),
    /// The body is above the merchant API's limit.
    #[error("request body too large")]
    TooLarge,
    /// The ledger refused or failed (a refund): the reason names the ledger's code.
    #[error("{1}")]
    Ledger(&'static str, String),
    /// Invoices cannot be posted in this process (the payment flow is not connected).
    #[error("invoices cannot be posted on this server yet")]
    PostingUnavailable,
    /// The merchant's limits given by the operator are not valid (the sentence says why).
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
    /// The merchant's webhook outbox is full (its receiver is behind): nothing was changed;
    /// try again after [`WEBHOOK_BACKLOG_RETRY_AFTER_S`].
    #[error("too many webhook events of this merchant wait to be delivered; try again later")]
    WebhookBacklog,
    /// Too many refused calls (bad or revoked keys, disabled merchants) from this peer or from
    /// all; answered without an audit line of its own (the admin API's limits, shared).
    #[error("too many refused merchant API calls; retry later")]
    LimitExceeded {
        /// How long to wait before a retry, in ms.
        retry_after_ms: u64,
    },
    /// The store failed (the detail is logged, not answered).
    #[error("merchant store failure")]
    Store(String),
}

/// What `Retry-After` says with [`MerchantError::WebhookBacklog`], in seconds.
pub const WEBHOOK_BACKLOG_RETRY_AFTER_S: u64 = 60;

impl MerchantError {
    /// The stable reason code (snake_case).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Key(e) => e.reason(),
            Self::InvalidId => "merchant_id_invalid",
            Self::InvalidDisplayName => "display_name_invalid",
            Self::InvalidWebhookUrl => "webhook_url_invalid",
            Self::InvalidUserId(_) => "user_id_invalid",
            Self::UnknownMerchant => "merchant_unknown",
            Self::Disabled => "merchant_disabled",
            Self::IdTaken => "merchant_id_taken",
            Self::UserTaken => "merchant_user_taken",
            Self::TooMany => "merchants_full",
            Self::TooManyKeys => "merchant_keys_full",
            Self::UnknownKey => "key_unknown",
            Self::Invoice(e) => e.reason(),
            Self::TooManyInvoices => "invoices_full",
            Self::BadCursor => "cursor_invalid",
            Self::Room(reason, _) => reason,
            Self::BadJson(_) => "bad_json",
            Self::TooLarge => "body_too_large",
            Self::Ledger(reason, _) => reason,
            Self::PostingUnavailable => "invoice_posting_unavailable",
            Self::WebhookBacklog => "webhook_backlog",
            Self::LimitExceeded { .. } => "rate_limited",
            Self::InvalidLimits(_) => "limits_invalid",
            Self::Store(_) => "internal",
        }
    }

    /// Whether the caller was refused for who it is (a bad, revoked or out-of-scope key, an
    /// unknown or disabled merchant): these count against the refused-call limits.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Key(_) | Self::UnknownMerchant | Self::Disabled)
    }

    /// HTTP status and Matrix errcode.
    pub fn status_and_errcode(&self) -> (u16, &'static str) {
        match self {
            Self::Key(e) => e.status_and_errcode(),
            Self::InvalidId
            | Self::InvalidDisplayName
            | Self::InvalidWebhookUrl
            | Self::InvalidUserId(_)
            | Self::InvalidLimits(_) => (400, "M_INVALID_PARAM"),
            Self::UnknownMerchant | Self::UnknownKey => (404, "M_NOT_FOUND"),
            Self::Disabled => (403, "M_FORBIDDEN"),
            Self::IdTaken | Self::UserTaken => (409, "M_CONFLICT"),
            Self::TooMany | Self::TooManyKeys => (507, "M_RESOURCE_LIMIT_EXCEEDED"),
            Self::Invoice(e) => e.status_and_errcode(),
            Self::TooManyInvoices => (507, "M_RESOURCE_LIMIT_EXCEEDED"),
            Self::BadCursor => (400, "M_INVALID_PARAM"),
            Self::Room(..) => (403, "M_FORBIDDEN"),
            Self::BadJson(_) => (400, "M_BAD_JSON"),
            Self::TooLarge => (413, "M_TOO_LARGE"),
            Self::Ledger(..) => (409, "ORG.MXPAY_REJECTED"),
            Self::PostingUnavailable | Self::WebhookBacklog => (503, "M_UNAVAILABLE"),
            Self::LimitExceeded { .. } => (429, "M_LIMIT_EXCEEDED"),
            Self::Store(_) => (500, "M_UNKNOWN"),
        }
    }
}

/// A merchant's limits as the operator gives them: the largest invoice per currency in major
/// units (`{"EUR": "500.00"}`) and the cap on open invoices.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    /// Largest single invoice per currency code, in major units as strings.
    #[serde(default)]
    pub max_invoice: std::collections::BTreeMap<String, String>,
    /// Most invoices open at once (1 to 1,000,000); none: no cap of its own.
    #[serde(default)]
    pub open_invoices_max: Option<u64>,
}

impl LimitsBody {
    /// The limits in minor units: each currency configured, each amount positive with no more
    /// decimals than the currency has.
    pub fn to_limits(
        &self,
        currencies: &crate::ledger::Currencies,
    ) -> Result<MerchantLimits, MerchantError> {
        let mut max_invoice_minor = std::collections::BTreeMap::new();
        for (code, amount) in &self.max_invoice {
            let decimal: rust_decimal::Decimal = amount.parse().map_err(|_| {
                MerchantError::InvalidLimits(format!("`{amount}` is not an amount"))
            })?;
            let parsed = currencies
                .parse(decimal, code)
                .map_err(|e| MerchantError::InvalidLimits(format!("{code} {amount}: {e}")))?;
            max_invoice_minor.insert(parsed.currency().to_string(), parsed.minor());
        }
        if let Some(max) = self.open_invoices_max {
            if !(1..=model::OPEN_INVOICES_MAX_MAX).contains(&max) {
                return Err(MerchantError::InvalidLimits(format!(
                    "open_invoices_max must be 1 to {}",
                    model::OPEN_INVOICES_MAX_MAX
                )));
            }
        }
        Ok(MerchantLimits {
            max_invoice_minor,
            open_invoices_max: self.open_invoices_max,
        })
    }
}

/// What the operator gives to register a merchant.
#[derive(Debug, Clone)]
pub struct NewMerchant<'a> {
    /// The id to use; `None` generates one.
    pub id: Option<&'a str>,
    /// The merchant's Matrix user.
    pub user_id: &'a str,
    /// Its display name.
    pub display_name: &'a str,
    /// Its webhook URL.
    pub webhook_url: &'a str,
}

/// Checks `new` and builds the merchant record, with a fresh webhook secret.
pub fn new_merchant(new: &NewMerchant<'_>, now_ms: u64) -> Result<Merchant, MerchantError> {
    let id = match new.id {
        Some(id) => MerchantId::parse(id)?,
        None => MerchantId::generate(),
    };
    let user_id = matrix_sdk::ruma::UserId::parse(new.user_id)
        .map_err(|_| MerchantError::InvalidUserId(new.user_id.to_owned()))?;
    model::check_display_name(new.display_name)?;
    let webhook_url = model::parse_webhook_url(new.webhook_url)?;
    Ok(Merchant {
        id,
        user_id,
        display_name: new.display_name.to_owned(),
        webhook_url: webhook_url.to_string(),
        webhook_secret: WebhookSecret::generate(),
        enabled: true,
        created_at_ms: now_ms,
        limits: model::MerchantLimits::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_merchants_are_checked_field_by_field() {
        let good = NewMerchant {
            id: Some("cafe"),
            user_id: "@cafe:example.org",
            display_name: "Corner Café",
            webhook_url: "https://cafe.example/hook",
        };
        let m = new_merchant(&good, 7).unwrap();
        assert_eq!(
            (m.id.as_str(), m.enabled, m.created_at_ms),
            ("cafe", true, 7)
        );
        let cases: [(NewMerchant<'_>, &str); 4] = [
            (
                NewMerchant {
                    id: Some("Cafe"),
                    ..good.clone()
                },
                "merchant_id_invalid",
            ),
            (
                NewMerchant {
                    user_id: "cafe",
                    ..good.clone()
                },
                "user_id_invalid",
            ),
            (
                NewMerchant {
                    display_name: "",
                    ..good.clone()
                },
                "display_name_invalid",
            ),
            (
                NewMerchant {
                    webhook_url: "nope",
                    ..good.clone()
                },
                "webhook_url_invalid",
            ),
        ];
        for (new, reason) in cases {
            assert_eq!(new_merchant(&new, 7).unwrap_err().reason(), reason);
        }
        assert!(new_merchant(&NewMerchant { id: None, ..good }, 7)
            .unwrap()
            .id
            .as_str()
            .starts_with("m_"));
    }

    #[test]
    fn limits_from_the_operator_are_checked_against_the_currencies() {
        let currencies = crate::ledger::Currencies::from_settings(&crate::ledger::LedgerSettings {
            currencies: vec![crate::ledger::CurrencySpec {
                code: "EUR".to_owned(),
                exponent: 2,
                max_transfer: None,
                max_per_24h: None,
            }],
        })
        .unwrap();
        let body = |amount: &str, currency: &str, open: Option<u64>| LimitsBody {
            max_invoice: [(currency.to_owned(), amount.to_owned())].into(),
            open_invoices_max: open,
        };
        let limits = body("500.00", "EUR", Some(10))
            .to_limits(&currencies)
            .unwrap();
        assert_eq!(limits.max_invoice_minor.get("EUR"), Some(&50_000));
        assert_eq!(limits.open_invoices_max, Some(10));
        for bad in [
            body("5.001", "EUR", None),
            body("-1", "EUR", None),
            body("x", "EUR", None),
            body("5", "XXX", None),
            body("5", "EUR", Some(0)),
        ] {
            let error = bad.to_limits(&currencies).unwrap_err();
            assert_eq!(error.reason(), "limits_invalid", "{bad:?}");
        }
    }
}
