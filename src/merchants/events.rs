//! The seam to webhook delivery: where merchant events are produced, and how the delivery
//! side finds a merchant's webhook URL and secret. Delivery itself (durable outbox, signing,
//! retries) lives elsewhere; this module only says what happened.
//!
//! Event ids are derived from their source (the invoice and what happened to it, or the
//! refund's ledger transfer), so feeding the same facts again after a crash produces the same
//! ids, and an outbox that is idempotent by event id enqueues nothing twice.

use super::model::{MerchantId, WebhookSecret};
use super::{MerchantError, MerchantStore};

/// `invoice.paid`: the customer paid; carries the invoice with its transfer id.
pub const INVOICE_PAID: &str = "invoice.paid";
/// `invoice.expired`: the invoice lapsed unpaid.
pub const INVOICE_EXPIRED: &str = "invoice.expired";
/// `invoice.cancelled`: the invoice was cancelled (by the merchant, or declined).
pub const INVOICE_CANCELLED: &str = "invoice.cancelled";
/// `refund.succeeded`: a refund reached the customer's wallet.
pub const REFUND_SUCCEEDED: &str = "refund.succeeded";

/// Where merchant events go. Implementations must be idempotent by `event_id`.
pub trait MerchantEvents: Send + Sync + std::fmt::Debug {
    /// Hands over one event, durably; `payload` carries the invoice's current state. `Err`
    /// when it was not taken ([`MerchantError::WebhookBacklog`]: the merchant's outbox is
    /// full; [`MerchantError::Store`]: it failed): the caller keeps the event and tries again.
    fn emit(
        &self,
        merchant: &MerchantId,
        event_type: &'static str,
        event_id: &str,
        payload: serde_json::Value,
    ) -> Result<(), MerchantError>;

    /// Whether an event of `merchant` would be taken now (asked before a change that cannot
    /// be undone, such as a refund). Default: always.
    fn has_room(&self, _merchant: &MerchantId) -> Result<(), MerchantError> {
        Ok(())
    }
}

/// The default hook until webhook delivery is connected: logs the event's type and id (never
/// its payload, which may carry customer ids), delivers nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl MerchantEvents for NoEvents {
    fn emit(
        &self,
        merchant: &MerchantId,
        event_type: &'static str,
        event_id: &str,
        _payload: serde_json::Value,
    ) -> Result<(), MerchantError> {
        tracing::debug!(%merchant, event_type, event_id, "merchant event (no webhook delivery connected)");
        Ok(())
    }
}

/// The event type constant named `name`, for events read back from the store.
pub fn event_type_of(name: &str) -> Option<&'static str> {
    [
        INVOICE_PAID,
        INVOICE_EXPIRED,
        INVOICE_CANCELLED,
        REFUND_SUCCEEDED,
    ]
    .into_iter()
    .find(|t| *t == name)
}

/// The deterministic id of an invoice event: `evt_` and 32 hex digits of a hash over the
/// event type and the invoice id (each invoice reaches each final state at most once).
pub fn invoice_event_id(event_type: &str, invoice_id: &str) -> String {
    derived_id(&[event_type.as_bytes(), invoice_id.as_bytes()])
}

/// The deterministic id of a `refund.succeeded` event: from the refund's ledger transfer id.
pub fn refund_event_id(refund_transfer_id: u128) -> String {
    derived_id(&[
        REFUND_SUCCEEDED.as_bytes(),
        &refund_transfer_id.to_be_bytes(),
    ])
}

fn derived_id(parts: &[&[u8]]) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mxpay merchant event v1");
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    format!("evt_{}", hex::encode(&hasher.finalize().as_bytes()[..16]))
}

/// Where one merchant's webhooks go and what signs them.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    /// The webhook URL.
    pub url: String,
    /// The signing secret (Debug redacted).
    pub secret: WebhookSecret,
    /// Whether the merchant is enabled (a disabled merchant's events may be held back).
    pub enabled: bool,
}

impl MerchantStore {
    /// The webhook URL and secret of `merchant`, for the delivery side.
    pub fn webhook_target(
        &self,
        merchant: &MerchantId,
    ) -> Result<Option<WebhookTarget>, MerchantError> {
        Ok(self.get(merchant)?.map(|m| WebhookTarget {
            url: m.webhook_url,
            secret: m.webhook_secret,
            enabled: m.enabled,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        assert_eq!(
            invoice_event_id(INVOICE_PAID, "inv_1"),
            invoice_event_id(INVOICE_PAID, "inv_1")
        );
        assert_ne!(
            invoice_event_id(INVOICE_PAID, "inv_1"),
            invoice_event_id(INVOICE_EXPIRED, "inv_1")
        );
        assert_ne!(
            invoice_event_id(INVOICE_PAID, "inv_1"),
            invoice_event_id(INVOICE_PAID, "inv_2")
        );
        assert_eq!(refund_event_id(7), refund_event_id(7));
        assert_ne!(refund_event_id(7), refund_event_id(8));
        assert!(refund_event_id(7).starts_with("evt_"));
        assert_eq!(refund_event_id(7).len(), 4 + 32);
    }
}
