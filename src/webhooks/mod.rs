//! Webhooks to merchants: events about their invoices and refunds (`invoice.paid`,
//! `invoice.expired`, `invoice.cancelled`, `refund.succeeded`), signed and delivered at least
//! once from a durable outbox. See `docs/webhooks.md` for what a receiver sees.
//!
//! Layout: [`schedule`] is the pure part (the delivery record's states, the retry schedule
//! with backoff and full jitter, the bounds); [`store`] keeps the records in a sled database
//! under `<data_dir>/webhooks/`; [`worker`] sends what is due over HTTP; the merchant
//! registry answers [`WebhookEndpoints`] (where to send, with which secret).
//!
//! Crash safety follows the receipts outbox: the producer derives each event id from its
//! source ([`derive_event_id`]), so feeding the same source again after a crash enqueues
//! nothing twice ([`store::WebhookStore::enqueue`] is idempotent by event id); a delivery
//! attempt is recorded only after its answer, so one cut short by a crash is sent again.
//! Receivers dedupe by `Mxpay-Event-Id`.

pub mod schedule;
pub mod store;
pub mod worker;

#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use schedule::{DeliveryRecord, DeliveryState, WebhookPolicy};
pub use store::{Enqueued, ListFilter, WebhookStore};
pub use worker::{WebhookOutbox, WebhookPoke, WebhookWorker};

/// The signature header on every delivery: `t=<unix seconds>,v1=<hex HMAC-SHA256>` over
/// `"<t>.<body>"` with the merchant's webhook secret.
pub const SIGNATURE_HEADER: &str = "Mxpay-Signature";

/// The event id header on every delivery (also the body's `id`): the receiver's dedupe key.
pub const EVENT_ID_HEADER: &str = "Mxpay-Event-Id";

/// A receiver's default tolerance between the signed timestamp and its clock, seconds.
pub const DEFAULT_TOLERANCE_S: u64 = 300;

/// Longest event id or merchant id, in bytes.
pub const ID_BYTES_MAX: usize = 255;

/// Largest `data` of one event, serialised, in bytes: an invoice's state is far smaller.
pub const DATA_BYTES_MAX: usize = 32 * 1024;

/// Errors of the webhook outbox. Each has a stable reason code ([`WebhookError::code`]);
/// the text never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The event id or merchant id is empty, too long or has control characters.
    #[error("{what} must be 1 to {ID_BYTES_MAX} bytes without control characters")]
    InvalidId {
        /// `event id` or `merchant id`.
        what: &'static str,
    },
    /// The event's data is above [`DATA_BYTES_MAX`] once serialised.
    #[error("the event's data is {len_bytes} bytes; at most {DATA_BYTES_MAX} are allowed")]
    DataTooLarge {
        /// Its size.
        len_bytes: usize,
    },
    /// The merchant has `pending_per_merchant_max` events waiting already.
    #[error("merchant `{merchant_id}` has too many webhook events waiting")]
    MerchantQueueFull {
        /// The merchant.
        merchant_id: String,
    },
    /// The outbox holds `records_max` records and none can be pruned.
    #[error("the webhook outbox is full")]
    QueueFull,
    /// No event with this id (or not one of this merchant's).
    #[error("no webhook event `{0}`")]
    NotFound(String),
    /// A stored record does not decode: the database is corrupt or from another program.
    #[error("corrupt webhook record: {0}")]
    Corrupt(String),
    /// The database failed (the text may name files: for logs, never for clients).
    #[error("webhook store: {0}")]
    Store(#[from] sled::Error),
    /// A blocking task was cancelled (runtime shutting down).
    #[error("webhook store task did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl WebhookError {
    /// Stable snake_case reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidId { .. } => "invalid_id",
            Self::DataTooLarge { .. } => "data_too_large",
            Self::MerchantQueueFull { .. } => "merchant_queue_full",
            Self::QueueFull => "queue_full",
            Self::NotFound(_) => "not_found",
            Self::Corrupt(_) => "store_corrupt",
            Self::Store(_) | Self::Join(_) => "store_failed",
        }
    }

    /// Whether the producer should try again later (the queue drains) rather than give up.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::MerchantQueueFull { .. } | Self::QueueFull | Self::Store(_) | Self::Join(_)
        )
    }
}

/// What happened, as the body's `type`. Stable names: receivers switch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// An invoice was paid.
    #[serde(rename = "invoice.paid")]
    InvoicePaid,
    /// An invoice lapsed unpaid.
    #[serde(rename = "invoice.expired")]
    InvoiceExpired,
    /// An invoice was cancelled (by the merchant, or declined by the payer).
    #[serde(rename = "invoice.cancelled")]
    InvoiceCancelled,
    /// A refund reached the payer.
    #[serde(rename = "refund.succeeded")]
    RefundSucceeded,
}

impl EventType {
    /// Every type, in a stable order.
    pub const ALL: [EventType; 4] = [
        EventType::InvoicePaid,
        EventType::InvoiceExpired,
        EventType::InvoiceCancelled,
        EventType::RefundSucceeded,
    ];

    /// The name in bodies and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvoicePaid => "invoice.paid",
            Self::InvoiceExpired => "invoice.expired",
            Self::InvoiceCancelled => "invoice.cancelled",
            Self::RefundSucceeded => "refund.succeeded",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The event id for `event_type` about `source` (an invoice id, a refund id): the same source
/// always gives the same id, so a producer that feeds its source again after a crash enqueues
/// nothing twice. `evt_` and 32 hex digits.
pub fn derive_event_id(event_type: EventType, source: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mxpay webhook event\0");
    hasher.update(event_type.as_str().as_bytes());
    hasher.update(b"\0");
    hasher.update(source.as_bytes());
    let hash = hasher.finalize();
    format!("evt_{}", hex::encode(&hash.as_bytes()[..16]))
}

/// A merchant's webhook secret. Its Debug form is redacted; the bytes leave only to sign.
#[derive(Clone, PartialEq, Eq)]
pub struct EndpointSecret(Vec<u8>);

impl EndpointSecret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The bytes, for signing and verifying.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for EndpointSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EndpointSecret(<redacted>)")
    }
}

/// Where a merchant's events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The receiver's URL (`http` or `https`).
    pub url: url::Url,
    /// The secret the deliveries are signed with.
    pub secret: EndpointSecret,
}

/// The seam to the merchant registry: a merchant's current endpoint, looked up at each
/// attempt (so a changed URL or rotated secret applies to the next attempt).
///
/// `None` (an unknown or disabled merchant, or one without a webhook URL) makes the attempt
/// fail with reason `endpoint_unavailable`: the event keeps waiting on the normal retry
/// schedule, so a merchant re-enabled within the retry time gets it; after that it is
/// `failed`, and can be replayed.
pub trait WebhookEndpoints: Send + Sync + 'static {
    /// `merchant_id`'s endpoint, if it should receive events now.
    fn endpoint(&self, merchant_id: &str) -> Option<Endpoint>;
}

/// Any `Fn(merchant_id) -> Option<Endpoint>` is a [`WebhookEndpoints`] (a closure over the
/// merchant registry, or a fixed map in tests).
impl<F> WebhookEndpoints for F
where
    F: Fn(&str) -> Option<Endpoint> + Send + Sync + 'static,
{
    fn endpoint(&self, merchant_id: &str) -> Option<Endpoint> {
        self(merchant_id)
    }
}

/// The header value signing `body` at `timestamp_s` with `secret` (what mxpay sends).
pub fn sign(secret: &[u8], timestamp_s: u64, body: &[u8]) -> String {
    crate::signature::sign(secret, timestamp_s, body)
}

/// What a receiver runs on each delivery: checks the `Mxpay-Signature` header value against
/// the raw body under the merchant's webhook secret, and that the signed time is within
/// `tolerance_s` of `now_s` (Unix seconds; [`DEFAULT_TOLERANCE_S`] is a good value).
pub fn verify_signature(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now_s: u64,
    tolerance_s: u64,
) -> Result<(), crate::signature::SignatureError> {
    crate::signature::verify(secret, header, body, now_s, tolerance_s)
}

/// The body of a delivery, as sent (`{id, type, created_ms, data}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    /// The event id (as `Mxpay-Event-Id`).
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the event was enqueued, ms since the Unix epoch.
    pub created_ms: u64,
    /// The invoice's (or refund's) state when the event was made, as the producer gave it.
    pub data: serde_json::Value,
}
