//! Telling about ledger changes: the outbox's deliverer. Journal entries become receipts and
//! notices in the payment's room and the payer's DM, sent with transaction ids derived from the
//! transfer, so a retry after a crash shows nothing twice.

use super::core::Outgoing;
use super::memo::{MemoKind, PaymentMemo};
use super::{payment_span, reason_from_code, reason_label, text, txn, Payments, PaymentsError};
use crate::events::{ReceiptEventContent, ReceiptReason, ReceiptStatus, RefundOf};
use crate::ledger::{ExportedEntry, JournalEntry, Owner, TransferId, TransferKind, TransferState};
use crate::outbox::{Deliver, DeliverError};
use crate::store::payments::{Queued, TransferNote, WaitingNoticeBounds};
use crate::store::receipts::RECEIPT_LINKS_MAX;
use async_trait::async_trait;
use ruma::events::relation::Reference;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use tracing::Instrument as _;

impl Payments {
    async fn tell(&self, entry: &ExportedEntry) -> Result<bool, PaymentsError> {
        match &entry.entry {
            JournalEntry::TransferCreated {
                id,
                kind,
                debit,
                credit,
                amount_minor,
                memo,
            } => {
                let amount = format!(
                    "{} {}",
                    self.show(debit.currency.as_str(), *amount_minor),
                    debit.currency
                );
                // Money leaves a merchant's wallet for a user only as a refund of an invoice.
                if let (Owner::Merchant(_), Owner::User(user)) = (&debit.owner, &credit.owner) {
                    let merchant = self
                        .owner_user(&debit.owner)?
                        .unwrap_or_else(|| debit.owner.to_string());
                    let why = String::from_utf8_lossy(memo);
                    let why = why.split_once(": ").map_or("", |(_, reason)| reason);
                    let body = if why.is_empty() {
                        format!("↩️ {merchant} refunded {amount} to your wallet.")
                    } else {
                        format!("↩️ {merchant} refunded {amount} to your wallet ({why}).")
                    };
                    return self.tell_dm(user, &body, *id, "merchant-refund").await;
                }
                if debit.owner == Owner::Issuer {
                    if let Owner::User(user) = &credit.owner {
                        let body = format!("💰 Your wallet was topped up with {amount}.");
                        return self.tell_dm(user, &body, *id, "topup").await;
                    }
                }
                if matches!(kind, TransferKind::Pending { .. }) && credit.owner == Owner::Settlement
                {
                    if let (Owner::User(user), Some(_)) = (&debit.owner, PaymentMemo::decode(memo))
                    {
                        let body = format!(
                            "🏦 Withdrawal of {amount} confirmed: it is reserved in your wallet \
                             and will be paid out when the operator settles it."
                        );
                        return self.tell_dm(user, &body, *id, "withdraw-requested").await;
                    }
                }
                Ok(false)
            }
            JournalEntry::PendingPosted { id, .. } => {
                let span = payment_span(*id);
                self.tell_ended(*id, "posted").instrument(span).await
            }
            JournalEntry::PendingVoided { id } => {
                let span = payment_span(*id);
                self.tell_ended(*id, "voided").instrument(span).await
            }
            JournalEntry::PendingExpired { id } => {
                let span = payment_span(*id);
                self.tell_ended(*id, "expired").instrument(span).await
            }
            _ => Ok(false),
        }
    }

    /// Tells `user` in their private DM; without a ready DM the notice waits for one (see
    /// [`Self::send_waiting_notices`]), so a top-up to someone who has not written to the bot
    /// yet is told once they do, not dropped.
    async fn tell_dm(
        &self,
        user: &str,
        body: &str,
        id: TransferId,
        what: &str,
    ) -> Result<bool, PaymentsError> {
        let txn_id = txn(&format!("ob-{what}"), &id.to_string());
        let Ok(user_id) = OwnedUserId::try_from(user) else {
            // The ledger names users by their Matrix id; anything else was never a person.
            tracing::warn!(%user, "cannot tell about {what}: the owner is not a user id");
            return Ok(false);
        };
        let Some(dm) = self.ready_dm(user)? else {
            let queued = self
                .store
                .queue_notice(
                    &user_id,
                    txn_id,
                    body,
                    self.clock.now_ms(),
                    WaitingNoticeBounds::default(),
                )
                .await?;
            match queued {
                Queued::Waiting => {
                    tracing::info!(%user, "no private chat yet: the notice about {what} waits for one")
                }
                Queued::Full => tracing::warn!(
                    %user,
                    "no private chat and too many notices waiting: the notice about {what} is \
                     not kept (the user's !history still shows it)"
                ),
            }
            return Ok(false);
        };
        // What waited is older: it goes first, so the DM reads in the ledger's order.
        self.send_waiting_notices(&user_id, &dm).await?;
        self.messenger.notice(&dm, body, None, txn_id).await?;
        Ok(true)
    }

    /// Sends the notices waiting for `user`'s DM into `dm`, oldest first, each removed once
    /// the homeserver took it (a crash in between sends it again with the same transaction
    /// id, which the homeserver shows once).
    pub(super) async fn send_waiting_notices(
        &self,
        user: &UserId,
        dm: &RoomId,
    ) -> Result<(), PaymentsError> {
        if !self.store.has_waiting_notices(user)? {
            return Ok(());
        }
        let waiting = self
            .store
            .waiting_notices(user, self.clock.now_ms(), WaitingNoticeBounds::default())
            .await?;
        let count = waiting.len();
        for (seq, notice) in waiting {
            let body = match notice.earlier_dropped {
                0 => notice.body,
                dropped => format!(
                    "{}\n({dropped} earlier notice(s) could not be kept while you had no \
                     private chat with me; !history shows every payment.)",
                    notice.body
                ),
            };
            self.messenger
                .notice(dm, &body, None, notice.txn_id)
                .await?;
            self.store.remove_waiting_notice(user, seq).await?;
        }
        if count > 0 {
            tracing::info!(%user, %dm, count, "sent the notices that waited for the private chat");
        }
        Ok(())
    }

    async fn tell_ended(&self, id: TransferId, how: &str) -> Result<bool, PaymentsError> {
        let Some(transfer) = self.ledger.transfer(id).await? else {
            return Ok(false);
        };
        let Some(memo) = PaymentMemo::decode(&transfer.memo) else {
            return Ok(false);
        };
        let (Owner::User(payer), code) = (&transfer.debit.owner, transfer.debit.currency) else {
            return Ok(false);
        };
        let amount_minor = match transfer.state {
            TransferState::Posted { amount_minor } => amount_minor,
            _ => transfer.amount_minor,
        };
        let amount_text = self.show(code.as_str(), amount_minor);
        let money = text::money(&amount_text, code.as_str());
        if memo.kind == MemoKind::Withdraw {
            match how {
                "posted" => self.metrics.payment("completed", "none"),
                "expired" => self.metrics.payment("expired", "none"),
                _ => self.metrics.payment("declined", "other"),
            }
            let body = match how {
                "posted" => format!("🏦 Your withdrawal of {money} was paid out."),
                _ => format!("🏦 Your withdrawal of {money} was not paid out; the money is back in your wallet."),
            };
            return self
                .tell_dm(payer, &body, id, &format!("withdraw-{how}"))
                .await;
        }
        // A merchant's wallet is told as its Matrix user.
        let Some(payee) = self.owner_user(&transfer.credit.owner)? else {
            return Ok(false);
        };
        let payee = &payee;
        if how == "posted" {
            if let Some(marker) = &self.faults.crash_before_receipt {
                if !marker.exists() {
                    let _ = std::fs::write(marker, b"crashed before a receipt\n");
                    tracing::error!(
                        "test fault: aborting after the ledger post, before the receipt"
                    );
                    std::process::abort();
                }
            }
        }
        // The payment ended: its challenge (if still open) has nothing left to confirm.
        if let Some(challenge) = self.store.challenge(payer, id.0)? {
            self.store.remove_challenge(&challenge).await?;
        }
        let note = self.store.note(id.0)?;
        let refund_of = memo.refund.as_ref().and_then(|r| {
            Some(RefundOf {
                transfer_id: r.of.clone(),
                receipt_event_id: OwnedEventId::try_from(r.receipt.as_str()).ok()?,
            })
        });
        // A refund's notice says which payment it gives money back from.
        let refunded = match &refund_of {
            Some(of) => match of.transfer_id.parse::<u128>() {
                Ok(original) => self
                    .ledger
                    .transfer(TransferId(original))
                    .await?
                    .map(|original| {
                        let paid_minor = match original.state {
                            TransferState::Posted { amount_minor } => amount_minor,
                            _ => original.amount_minor,
                        };
                        text::money(&self.show(code.as_str(), paid_minor), code.as_str())
                    }),
                Err(_) => None,
            },
            None => None,
        };
        let held = self.held_receipt(id, how)?;
        let (status, reason, headline) = match how {
            // A payment held for its payee: accepted, declined, or returned.
            _ if held.is_some() => held.expect("checked"),
            "posted" if refund_of.is_some() => (
                ReceiptStatus::Completed,
                None,
                match &refunded {
                    Some(paid) => {
                        format!("↩️ {payer} refunded {money} to {payee} (of a payment of {paid})")
                    }
                    None => format!("↩️ {payer} refunded {money} to {payee}"),
                },
            ),
            "posted" => (ReceiptStatus::Completed, None, format!("✅ {payer} paid {payee} {money}")),
            "expired" => (
                ReceiptStatus::Expired,
                Some(ReceiptReason::Timeout),
                format!("⌛ {payer}'s payment of {money} to {payee} expired without a PIN; nothing was paid"),
            ),
            _ => {
                let reason = note
                    .void_reason
                    .as_deref()
                    .map(reason_from_code)
                    .unwrap_or(ReceiptReason::Other);
                (
                    ReceiptStatus::Declined,
                    Some(reason),
                    format!("❌ {payer}'s payment of {money} to {payee} was cancelled; nothing was paid"),
                )
            }
        };
        let body = match &memo.note {
            Some(n) if how == "posted" => format!("{headline} ({n})."),
            _ => format!("{headline}."),
        };
        let (Ok(payer_id), Ok(payee_id), Ok(room), Ok(event)) = (
            OwnedUserId::try_from(payer.as_str()),
            OwnedUserId::try_from(payee.as_str()),
            OwnedRoomId::try_from(memo.room.as_str()),
            OwnedEventId::try_from(memo.event.as_str()),
        ) else {
            return Ok(false);
        };
        let (merchant, order_ref) =
            self.receipt_merchant(&transfer.credit.owner, memo.request.as_deref())?;
        let receipt = |relates_to: OwnedEventId| ReceiptEventContent {
            body: body.clone(),
            status,
            reason,
            transfer_id: Some(id.0.to_string()),
            payer: payer_id.clone(),
            payee: payee_id.clone(),
            amount: amount_text.parse().unwrap_or_default(),
            currency: code.as_str().to_owned(),
            request_event_id: memo
                .request
                .as_deref()
                .and_then(|r| OwnedEventId::try_from(r).ok()),
            merchant: merchant.clone(),
            order_ref: order_ref.clone(),
            refund_of: refund_of.clone(),
            relates_to: Reference::new(relates_to),
        };
        let key = format!("{id}-{how}");
        // The room and the DM are told independently: a room the bot was kicked from must not
        // keep the payer's own receipt from them. A retry re-sends both with the same
        // transaction ids, so what already went is not shown twice.
        // One message per place: people read its sentence, bots the typed receipt it carries
        // (see `crate::events::notice_carrying`).
        let receipt_message = |relates_to: OwnedEventId, reply_to: Option<&OwnedEventId>| {
            crate::events::notice_carrying(
                "org.mxpay.receipt",
                serde_json::to_value(receipt(relates_to)).expect("receipt serialises"),
                reply_to.map(|e| &**e),
            )
        };
        let room_told: Result<(), PaymentsError> = async {
            // Through the send queue, so the room reads it after what was decided there before.
            let sent = self
                .send_in_order(Outgoing::event(
                    &room,
                    "m.room.message",
                    receipt_message(event.clone(), Some(&event)),
                    "ob-room-receipt",
                    &key,
                ))
                .await?;
            // A completed payment's receipt in the room is where its payee replies `!refund`:
            // it is linked to it (a retry sends with the same transaction id, gets the same
            // event id back, and links it if a crash came first).
            if how == "posted" {
                self.store
                    .receipts()
                    .link(&[&sent], id.0, RECEIPT_LINKS_MAX)
                    .await?;
            }
            tracing::info!(transfer = %id, outcome = how, %room, "receipt sent to the room");
            match (status, reason) {
                (ReceiptStatus::Completed, _) => self.metrics.payment("completed", "none"),
                (ReceiptStatus::Expired, _) => self.metrics.payment("expired", "none"),
                (_, reason) => self.metrics.payment(
                    "declined",
                    reason_label(reason.unwrap_or(ReceiptReason::Other)),
                ),
            }
            Ok(())
        }
        .await;
        let dm_told: Result<(), PaymentsError> = async {
            if let Some(dm) = self.ready_dm(payer)? {
                if dm != room {
                    // It answers the challenge there (or, without one, the paying event).
                    let relates_to = note_event(&note).unwrap_or(event.clone());
                    self.send_in_order(Outgoing::event(
                        &dm,
                        "m.room.message",
                        receipt_message(relates_to, None),
                        "ob-dm-receipt",
                        &key,
                    ))
                    .await?;
                }
            }
            // A refund is told to the one it pays back (the original payer) in their DM too.
            // Nothing of this payment is in that DM and a relation must stay in its room: the
            // carried receipt names the `!refund` event, the message itself relates to nothing.
            if refund_of.is_some() && how == "posted" {
                if let Some(dm) = self.ready_dm(payee)? {
                    if dm != room {
                        let mut content = receipt_message(event.clone(), None);
                        if let Some(map) = content.as_object_mut() {
                            map.remove("m.relates_to");
                        }
                        self.send_in_order(Outgoing::event(
                            &dm,
                            "m.room.message",
                            content,
                            "ob-payee-dm-receipt",
                            &key,
                        ))
                        .await?;
                    }
                }
            }
            Ok(())
        }
        .await;
        // A payment of a request: the request records it (paid, or open again) and the room's
        // notice of it is edited.
        if memo.request.is_some() {
            self.request_payment_ended(memo.request.as_deref(), &payer_id, id, how)
                .await?;
        }
        // A held payment: its record follows the ledger, its notice is edited.
        self.held_ended(id, how).await?;
        match (room_told, dm_told) {
            (Ok(()), Ok(())) => Ok(true),
            // A retryable failure wins, so the outbox retries (and does not dead-letter).
            (Err(a), Err(b)) if !a.is_transient() && b.is_transient() => Err(b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }
}

fn note_event(note: &TransferNote) -> Option<OwnedEventId> {
    note.dm_event_id
        .as_deref()
        .and_then(|e| OwnedEventId::try_from(e).ok())
}

#[async_trait]
impl Deliver for Payments {
    async fn deliver(&self, entry: &ExportedEntry) -> Result<bool, DeliverError> {
        self.tell(entry).await.map_err(|e| {
            if e.is_transient() {
                DeliverError::Transient(e.to_string())
            } else {
                DeliverError::Permanent(e.to_string())
            }
        })
    }
}
