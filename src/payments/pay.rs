//! Paying and withdrawing: from the asking event to a pending ledger transfer (or a stored
//! withdrawal challenge) and its challenge in the payer's DM; then, once the PIN was right,
//! the step-up proof and the ledger post. Declines are recorded per event first, so a retried
//! transaction repeats the decision instead of deciding again.

use super::dm::Dm;
use super::memo::{MemoKind, PaymentMemo};
use super::{
    reason_code, reason_for, reason_from_code, reason_label, refusal_sentence, text, txn,
    PayRequest, Payments, PaymentsError,
};
use crate::crypto::DecryptedEvent;
use crate::events::{
    ReceiptEventContent, ReceiptReason, ReceiptStatus, StepUpChallengeEventContent,
};
use crate::ledger::{
    LedgerError, Owner, Transfer, TransferError, TransferId, TransferRequest, TransferState,
};
use crate::policy::pin::human_duration;
use crate::policy::stepup::StepUpBinding;
use crate::policy::trust::{self, TrustRefusal};
use crate::store::payments::{Challenge, ChallengeKind, DeclineRecord, EventOutcome};
use crate::store::StoreError;
use ruma::events::relation::Reference;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use rust_decimal::Decimal;

/// What to do with an event asking to start a payment or withdrawal.
#[derive(Debug, PartialEq)]
enum Start {
    /// It was declined before: repeat that decision (a retry after the reply failed).
    Repeat(DeclineRecord),
    /// What it started is still there (the payment's transfer, the withdrawal's open
    /// challenge): carry on with it, never refuse it now, late or not.
    Resume,
    /// It started a withdrawal whose challenge has ended since: it was told then.
    Ended,
    /// It never started anything and reached the bot too late.
    TooLate,
    /// It never started anything and is in time: check it and start.
    Fresh,
}

impl Payments {
    /// Declines a request that reached the bot after the step-up window (see
    /// [`start_decision`]): nothing was started, and the sentence says when it was sent.
    async fn decline_too_late(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
        withdrawal: bool,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        tracing::info!(
            sent_ms = event.sent_ms(),
            was_parked = event.was_parked,
            withdrawal,
            "request arrived too late; declined"
        );
        let sentence = text::too_late(withdrawal, event.sent_ms(), now_ms);
        self.decline(
            event,
            payee,
            amount,
            currency,
            ReceiptReason::TooLate,
            &sentence,
        )
        .await
    }

    /// Declines what `event` asked for: records the decision (the first one recorded for the
    /// event wins), then sends its declined receipt and sentence in the event's room. A retry
    /// after a failed send repeats the recorded decision; it never decides again.
    #[allow(clippy::too_many_arguments)]
    async fn decline(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
        reason: ReceiptReason,
        sentence: &str,
    ) -> Result<(), PaymentsError> {
        let record = DeclineRecord {
            reason: reason_code(reason),
            sentence: sentence.to_owned(),
            payee: payee.to_string(),
            amount: amount.to_string(),
            currency: currency.to_owned(),
        };
        if reason == ReceiptReason::RateLimited {
            // Not recorded: a flood of commands must not grow the store. A retried
            // transaction decides such an event again, which is harmless: nothing was started,
            // and whatever it starts later still waits for the PIN.
            self.metrics.payment("declined", reason_label(reason));
            return self.send_decline(event, &record).await;
        }
        let outcome = EventOutcome::Declined(record.clone());
        match self
            .store
            .put_outcome_if_absent(event.event_id.as_str(), &outcome)
            .await?
        {
            None => {
                self.metrics.payment("declined", reason_label(reason));
                self.send_decline(event, &record).await
            }
            Some(EventOutcome::Declined(earlier)) => self.send_decline(event, &earlier).await,
            Some(other) => {
                // Something started for this event meanwhile (cannot happen: transactions are
                // handled one at a time); never tell "not made" about a started payment.
                tracing::warn!(?other, "not declining an event that started something");
                Ok(())
            }
        }
    }

    /// Sends the declined receipt and sentence of a recorded decision (the same transaction
    /// ids each time, so the homeserver shows them once).
    async fn send_decline(
        &self,
        event: &DecryptedEvent,
        record: &DeclineRecord,
    ) -> Result<(), PaymentsError> {
        let corrupt = |reason| StoreError::Corrupt {
            tree: "eventid_outcome",
            reason,
        };
        let payee = OwnedUserId::try_from(record.payee.as_str())
            .map_err(|_| corrupt("payee is not a user id"))?;
        let amount: Decimal = record
            .amount
            .parse()
            .map_err(|_| corrupt("amount is not a decimal"))?;
        let body = format!("❌ {}: payment not made: {}", event.sender, record.sentence);
        let receipt = ReceiptEventContent {
            body: body.clone(),
            status: ReceiptStatus::Declined,
            reason: Some(reason_from_code(&record.reason)),
            transfer_id: None,
            payer: event.sender.clone(),
            payee,
            amount,
            currency: record.currency.clone(),
            relates_to: Reference::new(event.event_id.clone()),
        };
        let key = event.event_id.as_str();
        self.fault_before_reply("decline-receipt")?;
        self.messenger
            .send(
                &event.room_id,
                "org.mxpay.receipt",
                serde_json::to_value(&receipt).expect("receipt serialises"),
                txn("decline-receipt", key),
            )
            .await?;
        self.messenger
            .notice(
                &event.room_id,
                &body,
                Some(&event.event_id),
                txn("decline-notice", key),
            )
            .await?;
        Ok(())
    }

    /// Checks that apply to every outgoing payment: trust, PIN state. `Err(sentence)` refuses.
    async fn check_payer(
        &self,
        event: &DecryptedEvent,
    ) -> Result<Result<(), (ReceiptReason, String)>, PaymentsError> {
        let facts = self.facts(event).await?;
        let user = event.sender.as_str();
        let has_pin = self.store.pin(user)?.is_some_and(|r| r.hash.is_some());
        match trust::check(facts, self.trust_settings()) {
            Ok(()) => {}
            // Without a PIN there is nothing to confirm the new keys with: the refusal below
            // sends the user to `!pin set`, which accepts them.
            Err(TrustRefusal::IdentityChanged) if !has_pin => {}
            Err(refusal) => {
                if refusal == TrustRefusal::IdentityChanged {
                    self.ask_to_accept_identity(event).await?;
                }
                return Ok(Err((refusal.reason(), refusal.to_string())));
            }
        }
        let record = self.store.pin(user)?;
        let Some(record) = record.filter(|r| r.hash.is_some()) else {
            return Ok(Err((
                ReceiptReason::PinNotSet,
                "you have no PIN yet: send !pin set in our private chat first".to_owned(),
            )));
        };
        if self.store.profile(user)?.pin_compromised {
            return Ok(Err((
                ReceiptReason::PinLocked,
                "your PIN was exposed; change it with !pin change in our private chat first"
                    .to_owned(),
            )));
        }
        if let Some(until_ms) = record.locked_until_ms {
            let now_ms = self.clock.now_ms();
            if now_ms < until_ms {
                return Ok(Err((
                    ReceiptReason::PinLocked,
                    format!(
                        "your PIN is locked after too many wrong attempts; try again in {}",
                        human_duration(until_ms - now_ms)
                    ),
                )));
            }
        }
        Ok(Ok(()))
    }

    /// The per-user bounds on starting payments and withdrawals: how many may wait for the
    /// PIN at once, and how many payment commands a minute. Checked after the payer's trust
    /// (an untrusted session must not use up its owner's allowance) and before anything that
    /// costs the homeserver or the ledger work.
    fn flood_refusal(
        &self,
        event: &DecryptedEvent,
    ) -> Result<Result<(), (ReceiptReason, String)>, PaymentsError> {
        let user = event.sender.as_str();
        let now_ms = self.clock.now_ms();
        let waiting = self
            .store
            .challenges(user)?
            .iter()
            .filter(|c| c.expires_at_ms > now_ms)
            .count();
        let pending_max = self.settings.pending_per_user_max;
        if waiting >= pending_max as usize {
            return Ok(Err((
                ReceiptReason::TooManyPending,
                format!(
                    "you already have {waiting} payments waiting for your PIN (at most \
                     {pending_max}); confirm them, or send !cancel, first"
                ),
            )));
        }
        let admitted =
            self.rate
                .lock()
                .expect("rate lock")
                .admit(user, event.event_id.as_str(), now_ms);
        if !admitted {
            return Ok(Err((
                ReceiptReason::RateLimited,
                format!(
                    "you started more than {} payments in the last minute; wait a minute and \
                     send it again",
                    self.settings.commands_per_minute_max
                ),
            )));
        }
        Ok(Ok(()))
    }

    /// The refusal of a fresh payment by policy (payer trust and PIN state, payee, membership,
    /// amount), if any; `Ok(Ok(()))` when it may start.
    async fn pay_refusal(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
    ) -> Result<Result<(), (ReceiptReason, String)>, PaymentsError> {
        if let Err(refusal) = self.check_payer(event).await? {
            return Ok(Err(refusal));
        }
        if let Err(refusal) = self.flood_refusal(event)? {
            return Ok(Err(refusal));
        }
        if payee == event.sender || payee == self.bot {
            return Ok(Err((
                ReceiptReason::PayeeNotAllowed,
                "you cannot pay yourself or the bot".to_owned(),
            )));
        }
        if !self.wallet_holders().allows(payee) {
            return Ok(Err((
                ReceiptReason::PayeeNotAllowed,
                format!("{payee} may not hold a wallet on this service"),
            )));
        }
        let members = self.messenger.memberships(&event.room_id).await?;
        if !members
            .iter()
            .any(|(u, m)| u == payee.as_str() && m == "join")
        {
            return Ok(Err((
                ReceiptReason::PayeeNotAllowed,
                format!("{payee} is not a member of this room"),
            )));
        }
        if let Err(error) = self.ledger.parse_amount(amount, currency) {
            return Ok(Err((ReceiptReason::InvalidAmount, error.to_string())));
        }
        Ok(Ok(()))
    }

    /// Reserves the payment `event` asks for in the ledger (a pending transfer whose id comes
    /// from the event's id); `Ok(Err(refusal))` when the amount or the ledger refuses it.
    async fn create_payment(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
        memo: Option<String>,
    ) -> Result<Result<Transfer, (ReceiptReason, String)>, PaymentsError> {
        let parsed = match self.ledger.parse_amount(amount, currency) {
            Ok(parsed) => parsed,
            Err(error) => return Ok(Err((ReceiptReason::InvalidAmount, error.to_string()))),
        };
        // The ledger records a refused transfer (and opens both accounts) to keep its ids
        // idempotent; a payer without the money is refused here instead, so a flood of
        // refused payments opens no account and grows no journal. (The ledger still decides:
        // this only spares it requests it would refuse.)
        if let Some(error) = self
            .refused_before_ledger(event.sender.as_str(), Some(payee.as_str()), parsed)
            .await?
        {
            return Ok(Err((reason_for(error), refusal_sentence(error))));
        }
        let memo_bytes = PaymentMemo {
            kind: MemoKind::Pay,
            room: event.room_id.to_string(),
            event: event.event_id.to_string(),
            note: memo,
        }
        .encode();
        let created = self
            .ledger
            .create_pending(
                TransferRequest {
                    id: TransferId::from_key(event.event_id.as_str()),
                    debit: Owner::user(event.sender.as_str()),
                    credit: Owner::user(payee.as_str()),
                    amount: parsed,
                    memo: memo_bytes,
                },
                self.settings.stepup_timeout_ms,
            )
            .await;
        match created {
            Ok(transfer) => Ok(Ok(transfer)),
            Err(LedgerError::Rejected(error)) => {
                Ok(Err((reason_for(error), refusal_sentence(error))))
            }
            Err(other) => Err(other.into()),
        }
    }

    pub(super) async fn on_pay(
        &self,
        event: &DecryptedEvent,
        request: PayRequest,
    ) -> Result<(), PaymentsError> {
        let PayRequest {
            payee,
            amount,
            currency,
            memo,
        } = request;
        let transfer_id = TransferId::from_key(event.event_id.as_str());
        // The transfer made for this event (if any) is what "started" means for a payment.
        let existing = self.ledger.transfer(transfer_id).await?;
        let earlier = self.store.outcome(event.event_id.as_str())?;
        let now_ms = self.clock.now_ms();
        match start_decision(
            earlier,
            existing.is_some(),
            event.sent_ms(),
            now_ms,
            self.settings.stepup_timeout_ms,
        ) {
            Start::Repeat(record) => return self.send_decline(event, &record).await,
            Start::TooLate => {
                return self
                    .decline_too_late(event, &payee, amount, &currency, false, now_ms)
                    .await
            }
            Start::Fresh => {
                if let Err((reason, sentence)) =
                    self.pay_refusal(event, &payee, amount, &currency).await?
                {
                    return self
                        .decline(event, &payee, amount, &currency, reason, &sentence)
                        .await;
                }
            }
            // A replay of an event whose transfer exists: carry on with that transfer, never
            // refuse it now.
            Start::Resume | Start::Ended => {}
        }
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        let transfer = match existing {
            Some(transfer) => transfer,
            None => match self
                .create_payment(event, &payee, amount, &currency, memo.clone())
                .await?
            {
                Ok(transfer) => transfer,
                Err((reason, sentence)) => {
                    return self
                        .decline(event, &payee, amount, &currency, reason, &sentence)
                        .await
                }
            },
        };
        self.poke.poke();
        if transfer.state != TransferState::Pending {
            // A replayed event whose payment already ended: its receipt was sent then.
            tracing::info!(transfer = %transfer.id, "payment event seen again; already ended");
            return Ok(());
        }
        let challenge = Challenge {
            kind: ChallengeKind::Pay,
            transfer_id: transfer.id.0,
            payer: event.sender.to_string(),
            payee: payee.to_string(),
            amount_minor: transfer.amount_minor,
            amount: self.show(&currency, transfer.amount_minor),
            currency: currency.clone(),
            room_id: event.room_id.to_string(),
            event_id: event.event_id.to_string(),
            memo,
            created_ms: transfer.created_ms,
            expires_at_ms: transfer
                .deadline_ms
                .unwrap_or(transfer.created_ms + self.settings.stepup_timeout_ms),
            device_id: event.sender_device.clone(),
        };
        self.store.put_challenge(&challenge).await?;
        self.messenger
            .notice(
                &event.room_id,
                &format!(
                    "⏳ {}: confirm paying {} to {payee} with your PIN in our private chat.",
                    event.sender,
                    text::money(&challenge.amount, &currency)
                ),
                Some(&event.event_id),
                txn("pay-pending", event.event_id.as_str()),
            )
            .await?;
        match dm {
            Dm::Ready(dm_room) => self.send_challenge(&dm_room, &challenge).await?,
            Dm::Invited(_) => {
                // Sent when the payer joins the DM (on_member).
                self.point_to_dm(event, &dm, "pay-pointer").await?;
            }
        }
        Ok(())
    }

    pub(super) async fn on_withdraw(
        &self,
        event: &DecryptedEvent,
        amount: Decimal,
        currency: String,
    ) -> Result<(), PaymentsError> {
        let bot = self.bot.clone();
        let key = event.event_id.as_str();
        let transfer_id = TransferId::from_key(key);
        if self.ledger.transfer(transfer_id).await?.is_some() {
            return Ok(()); // replayed: the withdrawal was confirmed already
        }
        // A withdrawal "started" when its challenge was stored (the transfer is made only
        // after the PIN): the challenge is open, or the event's outcome says so.
        let open = self.store.challenge(event.sender.as_str(), transfer_id.0)?;
        let earlier = self.store.outcome(key)?;
        let now_ms = self.clock.now_ms();
        let decision = start_decision(
            earlier,
            open.is_some(),
            event.sent_ms(),
            now_ms,
            self.settings.stepup_timeout_ms,
        );
        let challenge = match (decision, open) {
            (Start::Repeat(record), _) => return self.send_decline(event, &record).await,
            // It was started, and its challenge ended since (confirmed, cancelled, lapsed,
            // refused): it was told then.
            (Start::Ended, _) => return Ok(()),
            (Start::Resume, Some(open)) => open,
            (Start::Resume, None) => unreachable!("resumed without an open challenge"),
            (Start::TooLate, _) => {
                return self
                    .decline_too_late(event, &bot, amount, &currency, true, now_ms)
                    .await
            }
            (Start::Fresh, _) => {
                let checked = match self.check_payer(event).await? {
                    Ok(()) => self.flood_refusal(event)?,
                    refused => refused,
                };
                if let Err((reason, sentence)) = checked {
                    return self
                        .decline(event, &bot, amount, &currency, reason, &sentence)
                        .await;
                }
                let parsed = match self.ledger.parse_amount(amount, &currency) {
                    Ok(parsed) => parsed,
                    Err(error) => {
                        return self
                            .decline(
                                event,
                                &bot,
                                amount,
                                &currency,
                                ReceiptReason::InvalidAmount,
                                &error.to_string(),
                            )
                            .await
                    }
                };
                let created_ms = event.sent_ms().min(now_ms);
                Challenge {
                    kind: ChallengeKind::Withdraw,
                    transfer_id: transfer_id.0,
                    payer: event.sender.to_string(),
                    payee: "settlement".to_owned(),
                    amount_minor: parsed.minor(),
                    amount: self.show(&currency, parsed.minor()),
                    currency: currency.clone(),
                    room_id: event.room_id.to_string(),
                    event_id: event.event_id.to_string(),
                    memo: None,
                    created_ms,
                    expires_at_ms: created_ms + self.settings.stepup_timeout_ms,
                    device_id: event.sender_device.clone(),
                }
            }
        };
        if challenge.expires_at_ms <= now_ms {
            return Ok(()); // started, then lapsed before this replay: nothing left to ask
        }
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        self.store.put_challenge(&challenge).await?;
        // After the challenge: a crash in between leaves it open, which also counts as started.
        self.store.put_outcome(key, &EventOutcome::Started).await?;
        match &dm {
            Dm::Ready(dm_room) => self.send_challenge(dm_room, &challenge).await?,
            Dm::Invited(_) => {}
        }
        self.point_to_dm(event, &dm, "withdraw-pointer").await?;
        Ok(())
    }

    pub(super) async fn send_challenge(
        &self,
        dm_room: &RoomId,
        challenge: &Challenge,
    ) -> Result<(), PaymentsError> {
        let now_ms = self.clock.now_ms();
        let left_ms = challenge.expires_at_ms.saturating_sub(now_ms);
        let (body, payee) = match challenge.kind {
            ChallengeKind::Pay => (
                text::challenge_body(
                    &challenge.amount,
                    &challenge.currency,
                    &challenge.payee,
                    &challenge.room_id,
                    left_ms,
                ),
                OwnedUserId::try_from(challenge.payee.as_str())
                    .unwrap_or_else(|_| self.bot.clone()),
            ),
            ChallengeKind::Withdraw => (
                text::withdraw_challenge_body(&challenge.amount, &challenge.currency, left_ms),
                self.bot.clone(),
            ),
        };
        let content = StepUpChallengeEventContent {
            body: body.clone(),
            challenge_id: challenge.challenge_id(),
            payee,
            amount: challenge.amount.parse().unwrap_or_default(),
            currency: challenge.currency.clone(),
            room_id: OwnedRoomId::try_from(challenge.room_id.as_str())
                .unwrap_or_else(|_| dm_room.to_owned()),
            expires_at_ms: challenge.expires_at_ms,
            relates_to: None,
        };
        let key = format!("{}:{}", challenge.challenge_id(), dm_room);
        self.messenger
            .send(
                dm_room,
                "org.mxpay.stepup.challenge",
                serde_json::to_value(&content).expect("challenge serialises"),
                txn("challenge-event", &key),
            )
            .await?;
        let notice_id = self
            .messenger
            .notice(dm_room, &body, None, txn("challenge-notice", &key))
            .await?;
        self.store
            .update_note(challenge.transfer_id, |note| {
                note.dm_event_id = Some(notice_id.to_string())
            })
            .await?;
        Ok(())
    }

    /// Voids every open payment of `user` (their receipts say `reason`).
    pub(super) async fn cancel_challenges(
        &self,
        user: &str,
        reason: ReceiptReason,
    ) -> Result<(), PaymentsError> {
        for challenge in self.store.challenges(user)? {
            if challenge.kind == ChallengeKind::Pay {
                self.store
                    .update_note(challenge.transfer_id, |note| {
                        note.void_reason = Some(reason_code(reason))
                    })
                    .await?;
                match self.ledger.void(TransferId(challenge.transfer_id)).await {
                    Ok(_) | Err(LedgerError::Rejected(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.store.remove_challenge(&challenge).await?;
        }
        self.poke.poke();
        Ok(())
    }

    /// The ledger's refusal of a payment of `amount` from `payer` (to `payee`, a user, or the
    /// settlement account when `None`) that can be seen from the accounts as they are (no
    /// account or not enough available, a frozen wallet), without asking the ledger to decide
    /// (which would open both accounts and journal the refusal, for every attempt).
    async fn refused_before_ledger(
        &self,
        payer: &str,
        payee: Option<&str>,
        amount: crate::ledger::Amount,
    ) -> Result<Option<TransferError>, PaymentsError> {
        let account = |owner: &str| crate::ledger::AccountId {
            owner: Owner::user(owner),
            currency: amount.currency(),
        };
        let Some(payer) = self.ledger.account(&account(payer)).await? else {
            return Ok(Some(TransferError::InsufficientFunds));
        };
        if payer.frozen.is_some() {
            return Ok(Some(TransferError::DebitAccountFrozen));
        }
        let available = u128::try_from(payer.balances.available_minor()).unwrap_or(0);
        if available < amount.minor() {
            return Ok(Some(TransferError::InsufficientFunds));
        }
        if let Some(payee) = payee {
            if let Some(payee) = self.ledger.account(&account(payee)).await? {
                if payee.frozen == Some(crate::ledger::FreezeMode::All) {
                    return Ok(Some(TransferError::CreditAccountFrozen));
                }
            }
        }
        Ok(None)
    }

    /// Whether the payer's wallet is frozen, or the payee's is frozen for all movement, as the
    /// ledger says now: a payment waiting for its PIN is refused then.
    async fn frozen_since_asked(
        &self,
        pending: &Transfer,
    ) -> Result<Option<TransferError>, PaymentsError> {
        if let Some(payer) = self.ledger.account(&pending.debit).await? {
            if payer.frozen.is_some() {
                return Ok(Some(TransferError::DebitAccountFrozen));
            }
        }
        if let Some(payee) = self.ledger.account(&pending.credit).await? {
            if payee.frozen == Some(crate::ledger::FreezeMode::All) {
                return Ok(Some(TransferError::CreditAccountFrozen));
            }
        }
        Ok(None)
    }

    /// The PIN was right: mint the step-up proof for exactly this payment, redeem it, move the
    /// money.
    pub(super) async fn authorise(
        &self,
        event: &DecryptedEvent,
        challenge: &Challenge,
    ) -> Result<(), PaymentsError> {
        let transfer_id = TransferId(challenge.transfer_id);
        let payee_owner = match challenge.kind {
            ChallengeKind::Pay => challenge.payee.clone(),
            ChallengeKind::Withdraw => Owner::Settlement.to_string(),
        };
        let binding = StepUpBinding {
            payer: challenge.payer.clone(),
            payee: payee_owner,
            amount_minor: challenge.amount_minor,
            currency: challenge.currency.clone(),
            transfer_id: transfer_id.0.to_string(),
        };
        let proof = self.stepup.mint(binding)?;
        match challenge.kind {
            ChallengeKind::Pay => {
                let Some(pending) = self.ledger.transfer(transfer_id).await? else {
                    self.store.remove_challenge(challenge).await?;
                    return Ok(());
                };
                // The proof is redeemed against the ledger's own record of the transfer.
                self.stepup
                    .redeem(&proof, &binding_of(&pending, &challenge.payer))?;
                // The challenge stays open until the outcome is final: after a retryable
                // failure the re-handled PIN event finds it again.
                // The ledger lets a reservation made before a freeze be posted (so paid-out
                // withdrawals can settle); a payment still waiting for its PIN is different:
                // a wallet frozen meanwhile stops it here.
                let posted = match self.frozen_since_asked(&pending).await? {
                    Some(error) => Err(LedgerError::Rejected(error)),
                    None => match self.ledger.post(transfer_id, None).await {
                        Err(e @ LedgerError::Rejected(_)) => Err(e),
                        Err(e) => return Err(e.into()),
                        Ok(posted) => Ok(posted),
                    },
                };
                match posted {
                    Ok(_) => {
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        tracing::info!(transfer = %transfer_id, "payment confirmed with the PIN and posted");
                        Ok(())
                    }
                    Err(LedgerError::Rejected(TransferError::PendingTransferExpired)) => {
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        self.reply(
                            event,
                            "Too late: that payment expired before your PIN arrived; nothing \
                             was paid.",
                            "stepup-expired",
                        )
                        .await
                    }
                    Err(LedgerError::Rejected(
                        TransferError::PendingTransferAlreadyVoided
                        | TransferError::PendingTransferAlreadyPosted
                        | TransferError::PendingTransferNotPending
                        | TransferError::PendingTransferNotFound,
                    )) => {
                        // It ended meanwhile (cancelled, or told already): the outbox tells
                        // how; nothing is left to confirm.
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        self.reply(
                            event,
                            "That payment is no longer waiting for a PIN; I did not use yours \
                             for anything else.",
                            "stepup-ended",
                        )
                        .await
                    }
                    Err(LedgerError::Rejected(error)) => {
                        // A final refusal (e.g. a frozen wallet): release the reservation now,
                        // so the receipt says why instead of "expired without a PIN" later.
                        self.store
                            .update_note(challenge.transfer_id, |note| {
                                note.void_reason = Some(reason_code(reason_for(error)))
                            })
                            .await?;
                        match self.ledger.void(transfer_id).await {
                            Ok(_) | Err(LedgerError::Rejected(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        tracing::warn!(transfer = %transfer_id, %error, "payment refused by the ledger after the PIN; voided");
                        self.reply(
                            event,
                            &format!(
                                "The payment could not be completed: {}. Nothing was paid and \
                                 the reserved amount is back in your wallet.",
                                refusal_sentence(error)
                            ),
                            "stepup-refused",
                        )
                        .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            ChallengeKind::Withdraw => {
                let amount = self
                    .ledger
                    .amount_from_minor(challenge.amount_minor, &challenge.currency)
                    .map_err(LedgerError::from)?;
                let binding = StepUpBinding {
                    payer: challenge.payer.clone(),
                    payee: Owner::Settlement.to_string(),
                    amount_minor: amount.minor(),
                    currency: amount.currency().to_string(),
                    transfer_id: transfer_id.0.to_string(),
                };
                self.stepup.redeem(&proof, &binding)?;
                let memo = PaymentMemo {
                    kind: MemoKind::Withdraw,
                    room: challenge.room_id.clone(),
                    event: challenge.event_id.clone(),
                    note: None,
                };
                // As for payments: a withdrawal the wallet cannot cover is refused before the
                // ledger, which would open accounts and journal the refusal.
                let created = match self
                    .refused_before_ledger(&challenge.payer, None, amount)
                    .await?
                {
                    Some(error) => Err(LedgerError::Rejected(error)),
                    None => {
                        self.ledger
                            .create_pending(
                                TransferRequest {
                                    id: transfer_id,
                                    debit: Owner::user(challenge.payer.as_str()),
                                    credit: Owner::Settlement,
                                    amount,
                                    memo: memo.encode(),
                                },
                                self.settings.withdrawal_timeout_ms,
                            )
                            .await
                    }
                };
                match created {
                    Ok(_) => {
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        Ok(())
                    }
                    Err(LedgerError::Rejected(error)) => {
                        // A refused create made no transfer: nothing to void.
                        self.store.remove_challenge(challenge).await?;
                        self.reply(
                            event,
                            &format!("The withdrawal was refused: {}.", refusal_sentence(error)),
                            "withdraw-refused",
                        )
                        .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

/// Decides how to treat an event asking to start a payment; no I/O. `earlier` is what was
/// recorded for the event, `started` whether what it started is still there, `sent_ms` its
/// `origin_server_ts`. Idempotence comes first: a replay of an event that was decided or
/// started is never judged as late; only an event that never started anything is, and it is
/// late once `window_ms` (the step-up timeout) has passed since it was sent: its payer could
/// not confirm it in time anyway, and a request hours old (a room key that arrived late, a
/// delayed delivery) must not move money as if it were new.
fn start_decision(
    earlier: Option<EventOutcome>,
    started: bool,
    sent_ms: u64,
    now_ms: u64,
    window_ms: u64,
) -> Start {
    match earlier {
        Some(EventOutcome::Declined(record)) => Start::Repeat(record),
        _ if started => Start::Resume,
        Some(EventOutcome::Started) => Start::Ended,
        _ if now_ms.saturating_sub(sent_ms) >= window_ms => Start::TooLate,
        _ => Start::Fresh,
    }
}

fn binding_of(transfer: &Transfer, payer: &str) -> StepUpBinding {
    let payee = match &transfer.credit.owner {
        Owner::User(user) => user.clone(),
        other => other.to_string(),
    };
    let payer_owner = match &transfer.debit.owner {
        Owner::User(user) => user.clone(),
        other => other.to_string(),
    };
    debug_assert_eq!(payer_owner, payer);
    StepUpBinding {
        payer: payer_owner,
        payee,
        amount_minor: transfer.amount_minor,
        currency: transfer.debit.currency.to_string(),
        transfer_id: transfer.id.0.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declined(reason: &str) -> EventOutcome {
        EventOutcome::Declined(DeclineRecord {
            reason: reason.into(),
            sentence: "your balance does not cover this payment".into(),
            payee: "@bob:hs".into(),
            amount: "5".into(),
            currency: "EUR".into(),
        })
    }

    /// M1 and L1: idempotence first, then staleness, and only for events that started nothing.
    #[test]
    fn late_requests_start_nothing_but_replays_carry_on() {
        let window_ms = 120_000;
        let sent_ms = 1_000_000;
        use crate::clock::Clock as _;
        let clock = crate::clock::ManualClock::new(sent_ms + 5_000);
        let decide =
            |earlier, started| start_decision(earlier, started, sent_ms, clock.now_ms(), window_ms);
        // In time.
        assert_eq!(decide(None, false), Start::Fresh);
        // Two hours later (a room key that arrived late).
        clock.advance_ms(2 * 3_600_000);
        assert_eq!(decide(None, false), Start::TooLate);
        // ... but a replay of one that already made its transfer / opened its challenge
        // carries on, and one that was declined repeats that decision.
        assert_eq!(decide(None, true), Start::Resume);
        let record = match declined("insufficient_funds") {
            EventOutcome::Declined(record) => record,
            _ => unreachable!(),
        };
        assert_eq!(
            decide(Some(declined("insufficient_funds")), false),
            Start::Repeat(record.clone())
        );
        assert_eq!(
            decide(Some(declined("insufficient_funds")), true),
            Start::Repeat(record),
            "a recorded decision is never made again"
        );
        // A withdrawal that was started and whose challenge has ended: nothing to say.
        assert_eq!(decide(Some(EventOutcome::Started), false), Start::Ended);
        assert_eq!(decide(Some(EventOutcome::Started), true), Start::Resume);
        // The edge: exactly the window is late (as for PINs).
        clock.set_ms(sent_ms + window_ms - 1);
        assert_eq!(decide(None, false), Start::Fresh);
        clock.set_ms(sent_ms + window_ms);
        assert_eq!(decide(None, false), Start::TooLate);
        assert_eq!(reason_label(ReceiptReason::TooLate), "too_late");
        assert_eq!(reason_code(ReceiptReason::TooLate), "too_late");
    }
}
