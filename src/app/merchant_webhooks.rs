//! The merchant registry and invoices connected to webhook delivery: merchant events go into
//! the durable webhook outbox, and the delivery worker finds each merchant's URL and secret in
//! the registry at every attempt.

use crate::clock::SharedClock;
use crate::merchants::{MerchantError, MerchantEvents, MerchantId, MerchantStore};
use crate::webhooks::{
    Endpoint, EndpointSecret, EventType, WebhookEndpoints, WebhookError, WebhookPoke, WebhookStore,
};

/// Puts each merchant event in the webhook outbox (idempotent by event id) and wakes the
/// worker.
pub struct OutboxEvents {
    store: WebhookStore,
    clock: SharedClock,
    poke: WebhookPoke,
}

impl OutboxEvents {
    /// Events go into `store` stamped with `clock`'s time; `poke` wakes the delivery worker.
    pub fn new(store: WebhookStore, clock: SharedClock, poke: WebhookPoke) -> Self {
        Self { store, clock, poke }
    }
}

impl std::fmt::Debug for OutboxEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxEvents").finish_non_exhaustive()
    }
}

fn refused(merchant_id: &str, event_id: &str, e: WebhookError) -> MerchantError {
    match e {
        WebhookError::MerchantQueueFull { .. } | WebhookError::QueueFull => {
            MerchantError::WebhookBacklog
        }
        other => {
            tracing::error!(
                merchant = merchant_id,
                event_id,
                error = %other,
                "a merchant event could not be put in the webhook outbox"
            );
            MerchantError::Store(other.to_string())
        }
    }
}

impl MerchantEvents for OutboxEvents {
    /// Writes the event durably before the invoice change it reports is stored (the merchant
    /// API emits first), so a crash in between only repeats the same event id. A short sled
    /// write and flush on the calling thread.
    fn emit(
        &self,
        merchant: &MerchantId,
        event_type: &'static str,
        event_id: &str,
        payload: serde_json::Value,
    ) -> Result<(), MerchantError> {
        let kind = EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == event_type)
            .ok_or_else(|| MerchantError::Store(format!("no webhook type {event_type}")))?;
        let merchant_id = merchant.to_string();
        self.store
            .enqueue(&merchant_id, kind, event_id, payload, self.clock.now_ms())
            .map_err(|e| refused(&merchant_id, event_id, e))?;
        self.poke.poke();
        Ok(())
    }

    fn has_room(&self, merchant: &MerchantId) -> Result<(), MerchantError> {
        let merchant_id = merchant.to_string();
        self.store
            .has_room(&merchant_id)
            .map_err(|e| refused(&merchant_id, "-", e))
    }
}

/// A merchant's endpoint while it is enabled; `None` for an unknown or disabled merchant (the
/// event then waits on its retry schedule: see `webhooks::WebhookEndpoints`).
pub struct RegistryEndpoints(pub MerchantStore);

impl WebhookEndpoints for RegistryEndpoints {
    fn endpoint(&self, merchant_id: &str) -> Option<Endpoint> {
        let id = MerchantId::parse(merchant_id).ok()?;
        let target = match self.0.webhook_target(&id) {
            Ok(target) => target?,
            Err(e) => {
                tracing::warn!(merchant = merchant_id, error = %e, "merchant registry unreadable");
                return None;
            }
        };
        if !target.enabled {
            return None;
        }
        Some(Endpoint {
            url: url::Url::parse(&target.url).ok()?,
            secret: EndpointSecret::new(target.secret.expose().as_bytes().to_vec()),
        })
    }
}
