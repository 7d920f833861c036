//! The admin API: top-ups, provider webhooks, balances and history, freezes, withdrawal
//! settlement, ledger verify and export, the audit log and token revocation. See
//! `docs/admin-api.md`.
//!
//! Layout: [`settings`] is the `admin:` config section; [`token`], [`webhook`] and [`audit`]
//! are pure building blocks (JWTs, HMAC signatures, the hash-chained log); [`flood`] limits
//! refused calls; [`events`] and
//! [`revoked`] are the sled trees of `<data_dir>/admin/` (webhook events received, revoked
//! token ids); [`service`] holds the operations against the ledger ([`AdminState`]); [`api`]
//! is the thin axum layer that authenticates, calls the service and writes every call to the
//! audit log.

pub mod api;
pub mod events;
pub mod merchants;
pub mod pins;
pub mod revoked;
pub mod service;
pub mod settings;
pub mod token;
pub mod views;
pub mod webhook;
pub mod webhook_events;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub use api::{router, ADMIN_PREFIX};
pub use service::AdminState;
pub use settings::AdminSettings;

use crate::ledger::{AmountError, LedgerError, TransferError};
use crate::merchants::MerchantError;

/// Everything the admin API refuses or fails at. The edge maps each to a status and a Matrix
/// `{"errcode", "error"}` body; internal details are logged, never answered.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Authentication or authorisation failed.
    #[error(transparent)]
    Token(#[from] token::TokenError),
    /// A provider webhook was refused.
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    /// The webhook URL names a provider that is not configured.
    #[error("unknown funding provider `{0}`")]
    UnknownProvider(String),
    /// A provider event id was used before with a different body.
    #[error("event `{0}` was already received with a different body")]
    EventConflict(String),
    /// The amount or currency is not acceptable.
    #[error(transparent)]
    Amount(#[from] AmountError),
    /// A user ID does not parse.
    #[error("`{0}` is not a valid Matrix user ID (@user:server)")]
    InvalidUserId(String),
    /// The request body is above [`api::ADMIN_BODY_BYTES_MAX`].
    #[error("request body too large")]
    TooLarge,
    /// The request body is not the expected JSON.
    #[error("invalid request body: {0}")]
    BadJson(String),
    /// A parameter is not acceptable.
    #[error("{0}")]
    InvalidParam(String),
    /// The idempotency key (or provider event) was used for a different request.
    #[error("the idempotency key was already used for a different request ({0})")]
    IdempotencyConflict(TransferError),
    /// The ledger refused the operation (insufficient funds, frozen account, expired...).
    #[error("{0}")]
    Rejected(TransferError),
    /// Nothing with this id.
    #[error("{0}")]
    NotFound(String),
    /// The admin API is off in this config.
    #[error("the admin API is not enabled (set admin.token in the config)")]
    Disabled,
    /// [`revoked::REVOKED_TOKENS_MAX`] tokens are revoked already.
    #[error("too many admin tokens are revoked already; rotate the admin token key instead")]
    RevocationsFull,
    /// The PIN store is not available in this build or process.
    #[error("PIN reset is not available on this server")]
    PinResetUnavailable,
    /// The webhook outbox is not running in this process.
    #[error("webhook events are not available on this server")]
    WebhooksUnavailable,
    /// Too many refused calls from this peer or from all ([`flood`]); answered without an
    /// audit line of its own.
    #[error("too many refused admin calls; retry later")]
    LimitExceeded {
        /// How long to wait before a retry, in ms.
        retry_after_ms: u64,
    },
    /// A merchant operation was refused (its [`MerchantError::reason`] is the audit result).
    #[error(transparent)]
    Merchant(#[from] MerchantError),
    /// Something failed inside mxpay; details are in the log.
    #[error("internal error; details are in mxpay's log")]
    Internal(String),
}

impl AdminError {
    /// An internal failure: `detail` is logged, the client sees a fixed sentence.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::Internal(detail.to_string())
    }

    /// HTTP status and Matrix errcode.
    pub fn status_and_errcode(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            Self::Token(e) => {
                let (status, errcode) = e.status_and_errcode();
                (
                    S::from_u16(status).unwrap_or(S::INTERNAL_SERVER_ERROR),
                    errcode,
                )
            }
            Self::Webhook(webhook::WebhookError::BadBody(_)) => (S::BAD_REQUEST, "M_BAD_JSON"),
            Self::Webhook(_) => (S::UNAUTHORIZED, "M_UNAUTHORIZED"),
            Self::UnknownProvider(_) => (S::NOT_FOUND, "M_NOT_FOUND"),
            Self::EventConflict(_) => (S::CONFLICT, "ORG.MXPAY_EVENT_CONFLICT"),
            Self::Amount(_) | Self::InvalidUserId(_) | Self::InvalidParam(_) => {
                (S::BAD_REQUEST, "M_INVALID_PARAM")
            }
            Self::BadJson(_) => (S::BAD_REQUEST, "M_BAD_JSON"),
            Self::TooLarge => (S::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            Self::IdempotencyConflict(_) => (S::CONFLICT, "ORG.MXPAY_IDEMPOTENCY_CONFLICT"),
            Self::Rejected(_) => (S::CONFLICT, "ORG.MXPAY_REJECTED"),
            Self::NotFound(_) | Self::Disabled => (S::NOT_FOUND, "M_NOT_FOUND"),
            Self::PinResetUnavailable | Self::WebhooksUnavailable => {
                (S::NOT_IMPLEMENTED, "M_UNRECOGNIZED")
            }
            Self::RevocationsFull => (S::INSUFFICIENT_STORAGE, "M_RESOURCE_LIMIT_EXCEEDED"),
            Self::LimitExceeded { .. } => (S::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
            Self::Merchant(e) => {
                let (status, errcode) = e.status_and_errcode();
                (
                    S::from_u16(status).unwrap_or(S::INTERNAL_SERVER_ERROR),
                    errcode,
                )
            }
            Self::Internal(_) => (S::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        }
    }

    /// Whether the call was refused for who made it (no valid token, a missing scope, a bad
    /// webhook signature or provider): these count against the [`flood`] limits.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Token(_) | Self::UnknownProvider(_) => true,
            Self::Webhook(e) => !matches!(e, webhook::WebhookError::BadBody(_)),
            _ => false,
        }
    }

    /// The short result recorded in the audit log: `ok` is never an error, so this is the
    /// errcode, with the ledger's code name for rejections.
    pub fn audit_result(&self) -> String {
        match self {
            Self::Rejected(e) | Self::IdempotencyConflict(e) => format!("{e:?}"),
            Self::Merchant(e) => e.reason().to_owned(),
            other => other.status_and_errcode().1.to_owned(),
        }
    }
}

impl From<LedgerError> for AdminError {
    fn from(error: LedgerError) -> Self {
        match error {
            LedgerError::Rejected(e) if is_idempotency_conflict(e) => Self::IdempotencyConflict(e),
            LedgerError::Rejected(e) => Self::Rejected(e),
            LedgerError::Amount(e) => Self::Amount(e),
            other => Self::internal(other),
        }
    }
}

fn is_idempotency_conflict(e: TransferError) -> bool {
    use TransferError as E;
    matches!(
        e,
        E::ExistsWithDifferentKind
            | E::ExistsWithDifferentDebitAccount
            | E::ExistsWithDifferentCreditAccount
            | E::ExistsWithDifferentAmount
            | E::ExistsWithDifferentTimeout
            | E::ExistsWithDifferentMemo
            | E::ExistsWithDifferentOriginal
            | E::ExistsWithDifferentReference
    )
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) | Self::Merchant(MerchantError::Store(detail)) = &self {
            tracing::error!(%detail, "admin API internal error");
        }
        let (status, errcode) = self.status_and_errcode();
        let mut body = serde_json::json!({ "errcode": errcode, "error": self.to_string() });
        if let Self::LimitExceeded { retry_after_ms } = self {
            // The Matrix rate-limit error carries the wait in the body.
            body["retry_after_ms"] = retry_after_ms.into();
        }
        crate::http::json_response(status, &body)
    }
}
