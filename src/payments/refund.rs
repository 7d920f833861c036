//! Refunds, the shell: finds the payment a `!refund` replies to (the bot's receipt of it ->
//! its ledger transfer, with what was refunded so far), lets [`core::refund`] decide, and
//! starts the refund as an ordinary payment ([`Payments::on_pay`]) from the refunder back to
//! the original payer, linked to the original in the ledger (which caps the refunds again
//! when it reserves the money). The refund's transfer id comes from the `!refund` event, so a
//! retried or replayed event refunds once.

use ruma::EventId;
use rust_decimal::Decimal;

use super::core::refund::{self as core_refund, RefundStart};
use super::{PayRequest, Payments, PaymentsError, RefundLink};
use crate::crypto::DecryptedEvent;
use crate::ledger::{Owner, TransferId};

impl Payments {
    /// `!refund` (`amount: None`: all that remains) or `!refund 5.00`, replying to `to`.
    pub(super) async fn on_refund(
        &self,
        event: &DecryptedEvent,
        to: &EventId,
        amount: Option<Decimal>,
    ) -> Result<(), PaymentsError> {
        let original = match self.store.receipts().transfer_of(to)? {
            Some(id) => self.ledger.transfer(TransferId(id)).await?,
            None => None,
        };
        let link = original.as_ref().map(|original| RefundLink {
            original: original.id,
            reference: original.reference,
            receipt: to.to_owned(),
        });
        let transfer_id = TransferId::from_key(event.event_id.as_str());
        // Started (or refused) before: carry on with what was decided then, never decide again
        // (the refunds since would refuse it as above what remains).
        if let Some(existing) = self.ledger.transfer(transfer_id).await? {
            let payee = match &existing.credit.owner {
                Owner::User(user) => ruma::OwnedUserId::try_from(user.as_str()).ok(),
                _ => None,
            };
            if let Some(payee) = payee {
                let currency = existing.debit.currency;
                let request = PayRequest {
                    payee,
                    amount: self.minor_decimal(currency, existing.amount_minor),
                    currency: currency.as_str().to_owned(),
                    memo: None,
                    request: None,
                    refund: link,
                };
                return self.on_pay(event, request).await;
            }
            return Ok(());
        }
        let facts = original.as_ref().and_then(core_refund::refundable);
        let decided = core_refund::decide(
            facts.as_ref(),
            &event.sender,
            amount,
            self.ledger.currencies(),
        );
        // A refusal recorded earlier is said again by `on_pay` (`Start::Repeat`) whatever the
        // terms passed here; only a fresh refusal is decided now.
        let earlier = self.store.outcome(event.event_id.as_str())?.is_some();
        match decided {
            RefundStart::Pay { plan, amount } => {
                tracing::info!(
                    original = %TransferId(plan.original_transfer_id),
                    remaining_after_minor = plan.remaining_after_minor,
                    "refund asked"
                );
                let request = PayRequest {
                    payee: plan.payee,
                    amount,
                    currency: plan.currency.as_str().to_owned(),
                    memo: None,
                    request: None,
                    refund: link,
                };
                self.on_pay(event, request).await
            }
            RefundStart::Refuse {
                payee,
                amount,
                currency,
                ..
            } if earlier => {
                let request = PayRequest {
                    payee,
                    amount,
                    currency,
                    memo: None,
                    request: None,
                    refund: None,
                };
                self.on_pay(event, request).await
            }
            RefundStart::Refuse {
                reason,
                sentence,
                payee,
                amount,
                currency,
            } => {
                self.decline(event, &payee, amount, &currency, reason, &sentence)
                    .await
            }
        }
    }
}
