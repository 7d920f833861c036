//! Merchant invoices in rooms: the merchant API's [`InvoicePoster`] (the bot checks the room,
//! then opens a payment request whose requester is the merchant's Matrix user and posts it as
//! any request is posted), and the report back to the merchant API when such a request is
//! paid. Paying it is paying a request; the money goes to the merchant's wallet because the
//! payee is a merchant ([`Payments::payee_owner`]).
//!
//! The request's id is `$` and the invoice id: stable, so a retried create finds the request
//! it opened and posts it again with the same transaction ids (shown once).

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use ruma::{OwnedEventId, UserId};

use super::core::EventRef;
use super::{Payments, PaymentsError};
use crate::events::PaymentRequestEventContent;
use crate::merchants::api::{InvoicePoster, MerchantApi};
use crate::merchants::invoice::Invoice;
use crate::merchants::{Merchant, MerchantError};
use crate::requests::{Request, RequestError, RequestId};
use crate::store::requests::{Inserted, RequestBounds};

/// The request id an invoice is posted under.
pub fn invoice_request_id(invoice_id: &str) -> Option<RequestId> {
    OwnedEventId::try_from(format!("${invoice_id}"))
        .ok()
        .map(RequestId)
}

/// The invoice a request (by its event id) stands for, when it is one: one of the merchant
/// API (`$inv_...`), or a merchant's own typed request recorded as its invoice.
fn invoice_of(api: &MerchantApi, request: &str) -> Result<Option<String>, MerchantError> {
    if let Some(id) = request
        .strip_prefix('$')
        .filter(|id| id.starts_with("inv_"))
    {
        return Ok(Some(id.to_owned()));
    }
    api.invoices().by_request(request)
}

/// Posts invoices through the payment flow (held weakly: the flow owns the merchant API's
/// handle, not the other way round).
#[derive(Debug)]
pub struct InvoicePosting(pub Weak<Payments>);

#[async_trait::async_trait]
impl InvoicePoster for InvoicePosting {
    async fn post(&self, merchant: &Merchant, invoice: &Invoice) -> Result<String, MerchantError> {
        let payments = self.0.upgrade().ok_or(MerchantError::PostingUnavailable)?;
        payments.post_invoice(merchant, invoice).await
    }
}

fn internal(e: impl std::fmt::Display) -> MerchantError {
    MerchantError::Store(e.to_string())
}

impl Payments {
    /// The merchant a typed request's sender is, when it is a registered merchant's Matrix
    /// user (enabled or not).
    pub(super) fn merchant_sending(
        &self,
        sender: &UserId,
    ) -> Result<Option<Merchant>, PaymentsError> {
        match (&self.merchants, self.invoices.get()) {
            (Some(merchants), Some(_)) => merchants
                .by_user(sender.as_str())
                .map_err(PaymentsError::Merchants),
            _ => Ok(None),
        }
    }

    /// Records a merchant's own typed request, stored as `request`, as that merchant's
    /// invoice (idempotent).
    pub(super) fn record_merchant_request(
        &self,
        merchant: &Merchant,
        request: &Request,
        content: &PaymentRequestEventContent,
    ) -> Result<(), PaymentsError> {
        let Some(api) = self.invoices.get() else {
            return Ok(());
        };
        let amount_minor = match &request.audience {
            crate::requests::Audience::Everyone { amount_minor, .. } => *amount_minor,
            crate::requests::Audience::Named { shares } => {
                shares.iter().map(|s| s.amount_minor).sum()
            }
        };
        let description = content.memo.as_deref().unwrap_or(&content.body);
        api.record_request(
            merchant,
            &crate::merchants::invoice::MerchantRequest {
                request_event_id: request.id.0.as_str(),
                room_id: request.room_id.clone(),
                payer: content.payer.clone(),
                amount_minor,
                currency: request.currency.as_str(),
                description,
                order_ref: content.order_ref.as_deref(),
                expires_at_ms: request.expires_at_ms,
            },
        )
        .map_err(PaymentsError::Merchants)?;
        Ok(())
    }

    /// Lets paid invoice requests be reported to the merchant API; only the first call counts.
    pub fn set_invoices(&self, api: Arc<MerchantApi>) {
        let _ = self.invoices.set(api);
    }

    /// Checks the room (the bot joined, encrypted, the payer joined) and opens and posts the
    /// invoice's request. Returns the request's id.
    pub(crate) async fn post_invoice(
        &self,
        merchant: &Merchant,
        invoice: &Invoice,
    ) -> Result<String, MerchantError> {
        let room = &invoice.room_id;
        let not_joined = || {
            MerchantError::Room(
                "room_not_joined",
                "the bot is not in this room: invite it first".to_owned(),
            )
        };
        let joined: HashSet<String> = self
            .messenger
            .memberships(room)
            .await
            .map_err(|_| not_joined())?
            .into_iter()
            .filter(|(_, m)| m == "join")
            .map(|(u, _)| u)
            .collect();
        if !joined.contains(self.bot.as_str()) {
            return Err(not_joined());
        }
        if !self
            .messenger
            .crypto
            .room_is_encrypted(room)
            .await
            .map_err(internal)?
        {
            return Err(MerchantError::Room(
                "room_not_encrypted",
                "the room is not end-to-end encrypted: invoices are posted only in encrypted rooms"
                    .to_owned(),
            ));
        }
        if let Some(payer) = &invoice.payer {
            if !joined.contains(payer.as_str()) {
                return Err(MerchantError::Room(
                    "payer_not_in_room",
                    format!("{payer} is not in the room"),
                ));
            }
        }
        let id = invoice_request_id(&invoice.invoice_id).ok_or_else(|| internal("invoice id"))?;
        let ev = EventRef {
            room_id: room.clone(),
            event_id: id.0.clone(),
            sender: merchant.user_id.clone(),
        };
        let store = self.store.requests();
        if let Some(existing) = store.get(&id).map_err(internal)? {
            self.announce(&ev, &existing, false)
                .await
                .map_err(internal)?;
            return Ok(id.0.to_string());
        }
        let amount = crate::ledger::CurrencyCode::new(&invoice.currency)
            .and_then(|c| self.ledger.to_decimal(c, invoice.amount_minor))
            .ok_or_else(|| internal("invoice currency"))?;
        let memo: String = format!("{} ({})", invoice.description, invoice.order_ref)
            .chars()
            .take(crate::command::MEMO_CHARS_MAX)
            .collect();
        let content = PaymentRequestEventContent {
            body: format!(
                "{} asks for {amount} {}",
                merchant.display_name, invoice.currency
            ),
            payee: merchant.user_id.clone(),
            amount,
            currency: invoice.currency.clone(),
            payer: invoice.payer.clone(),
            memo: Some(memo),
            expires_at_ms: Some(invoice.expires_at_ms),
            order_ref: None,
        };
        let now_ms = self.clock.now_ms();
        let is_member = |user: &UserId| joined.contains(user.as_str());
        let new = crate::requests::NewRequest {
            id,
            room_id: room.clone(),
            requester: merchant.user_id.clone(),
            bot: &self.bot,
            memo: None,
            expires_at_ms: None,
            now_ms,
        };
        // An invoice is paid once: open to the room, the first member to pay it is its payer
        // and everyone after is refused (`request_full`).
        let limits = crate::requests::RequestLimits {
            everyone_payers_max: 1,
            ..self.request_limits()
        };
        let request =
            Request::from_event(new, &content, self.ledger.currencies(), &is_member, &limits)
                .map_err(|e: RequestError| MerchantError::Room("request_refused", e.sentence()))?;
        match store
            .insert(&request, now_ms, RequestBounds::default())
            .await
            .map_err(internal)?
        {
            Inserted::Stored => {}
            Inserted::Exists(_) => {}
            Inserted::Refused(refusal) => {
                return Err(MerchantError::Room(
                    "request_refused",
                    refusal.sentence().to_owned(),
                ))
            }
        }
        self.announce(&ev, &request, false)
            .await
            .map_err(internal)?;
        tracing::info!(request = %request.id, merchant = %merchant.id, "invoice posted");
        Ok(request.id.0.to_string())
    }

    /// A request was paid: when it stands for an invoice, the merchant API records it paid
    /// (idempotent: a retry records nothing twice).
    pub(super) fn invoice_request_paid(
        &self,
        request: &RequestId,
        payer: &UserId,
        transfer_id: crate::ledger::TransferId,
    ) -> Result<(), PaymentsError> {
        let Some(api) = self.invoices.get() else {
            return Ok(());
        };
        let Some(invoice_id) =
            invoice_of(api, request.0.as_str()).map_err(PaymentsError::Merchants)?
        else {
            return Ok(());
        };
        api.record_paid(&invoice_id, payer.to_owned(), transfer_id)
            .map_err(PaymentsError::Merchants)?;
        Ok(())
    }
}

impl Payments {
    /// What a receipt says of the merchant paid: the merchant (when `credit` is a merchant's
    /// wallet) and the order reference (when `request` is one of its invoices).
    pub(super) fn receipt_merchant(
        &self,
        credit: &crate::ledger::Owner,
        request: Option<&str>,
    ) -> Result<(Option<crate::events::ReceiptMerchant>, Option<String>), PaymentsError> {
        let (crate::ledger::Owner::Merchant(id), Some(merchants)) = (credit, &self.merchants)
        else {
            return Ok((None, None));
        };
        let Ok(id) = crate::merchants::MerchantId::parse(id) else {
            return Ok((None, None));
        };
        let merchant = merchants
            .get(&id)
            .map_err(PaymentsError::Merchants)?
            .map(|m| crate::events::ReceiptMerchant {
                merchant_id: m.id.to_string(),
                display_name: m.display_name,
            });
        let order_ref = match (request, self.invoices.get()) {
            (Some(request), Some(api)) => {
                match invoice_of(api, request).map_err(PaymentsError::Merchants)? {
                    Some(invoice_id) => api
                        .invoices()
                        .get_any(&invoice_id)
                        .map_err(PaymentsError::Merchants)?
                        .map(|invoice| invoice.order_ref),
                    None => None,
                }
            }
            _ => None,
        };
        Ok((merchant, order_ref))
    }
}

impl Payments {
    /// A request changed (declined, cancelled, expired): when it stands for an invoice that
    /// ended unpaid, the merchant API records it `cancelled` or `expired` (idempotent).
    pub(super) fn invoice_request_changed(
        &self,
        request: &Request,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        use crate::events::RequestState;
        let Some(api) = self.invoices.get() else {
            return Ok(());
        };
        let Some(invoice_id) =
            invoice_of(api, request.id.0.as_str()).map_err(PaymentsError::Merchants)?
        else {
            return Ok(());
        };
        match request.status(now_ms) {
            RequestState::Declined | RequestState::Cancelled => api.record_ended(&invoice_id, true),
            RequestState::Expired => api.record_ended(&invoice_id, false),
            RequestState::Open | RequestState::Paid => return Ok(()),
        }
        .map_err(PaymentsError::Merchants)?;
        Ok(())
    }
}
