//! Paying and withdrawing: from the asking event to a pending ledger transfer (or a stored
//! withdrawal challenge) and its challenge in the payer's DM; then, once the PIN was right,
//! the step-up proof and the ledger post. Declines are recorded per event first, so a retried
//! transaction repeats the decision instead of deciding again.

use super::core::after_pin;
use super::core::challenge;
use super::core::refusal::{self, AccountFacts, PayeeFacts, PayerFacts};
use super::core::start::{self, Start};
use super::core::{Decision, EventRef, Outgoing, Record};
use super::memo::{MemoKind, PaymentMemo, RefundMemo};
use super::{
    payment_reference, reason_code, reason_for, reason_from_code, reason_label, refusal_sentence,
    text, PayRequest, Payments, PaymentsError, RefundLink,
};
use crate::crypto::DecryptedEvent;
use crate::events::{ReceiptEventContent, ReceiptReason, ReceiptStatus};
use crate::ledger::{
    LedgerError, Owner, Transfer, TransferError, TransferId, TransferRequest, TransferState,
};
use crate::policy::stepup::StepUpBinding;
use crate::policy::trust;
use crate::store::payments::{Challenge, ChallengeKind, DeclineRecord, EventOutcome};
use crate::store::StoreError;
use ruma::events::relation::Reference;
use ruma::{OwnedUserId, UserId};
use rust_decimal::Decimal;

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
    pub(super) async fn decline(
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
            payee: payee.to_owned(),
            amount: amount.to_string(),
            currency: currency.to_owned(),
        };
        self.metrics.payment("declined", reason_label(reason));
        let mut decision = Decision::none();
        // A rate-limited command is not recorded: a flood of commands must not grow the
        // store. A retried transaction decides such an event again, which is harmless:
        // nothing was started, and whatever it starts later still waits for the PIN.
        if reason != ReceiptReason::RateLimited {
            decision.record.push(Record::OutcomeIfAbsent {
                event_id: event.event_id.clone(),
                outcome: EventOutcome::Declined(record.clone()),
            });
        }
        decision.sends = self.decline_sends(event, &record)?;
        self.apply(decision).await
    }

    /// Sends the declined receipt and sentence of a recorded decision (the same transaction
    /// ids each time, so the homeserver shows them once).
    async fn send_decline(
        &self,
        event: &DecryptedEvent,
        record: &DeclineRecord,
    ) -> Result<(), PaymentsError> {
        let sends = self.decline_sends(event, record)?;
        self.apply(Decision {
            sends,
            ..Decision::none()
        })
        .await
    }

    /// The declined receipt and the sentence of a decline.
    fn decline_sends(
        &self,
        event: &DecryptedEvent,
        record: &DeclineRecord,
    ) -> Result<Vec<Outgoing>, PaymentsError> {
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
            body,
            status: ReceiptStatus::Declined,
            reason: Some(reason_from_code(&record.reason)),
            transfer_id: None,
            payer: event.sender.clone(),
            payee,
            amount,
            currency: record.currency.clone(),
            request_event_id: None,
            merchant: None,
            order_ref: None,
            refund_of: None,
            relates_to: Reference::new(event.event_id.clone()),
        };
        // One message: people read the sentence, bots the typed receipt it carries.
        Ok(vec![Outgoing::event(
            &event.room_id,
            "m.room.message",
            crate::events::notice_carrying(
                "org.mxpay.receipt",
                serde_json::to_value(&receipt).expect("receipt serialises"),
                Some(&event.event_id),
            ),
            "decline-receipt",
            event.event_id.as_str(),
        )])
    }

    /// The payer checks of the refusal table ([`refusal::payer`]); a changed identity also
    /// opens the dialog that accepts it, in the DM.
    async fn check_payer(
        &self,
        event: &DecryptedEvent,
    ) -> Result<Result<(), (ReceiptReason, String)>, PaymentsError> {
        self.check_payer_of(event, false).await
    }

    /// [`Self::check_payer`]; with `plaintext_reaction`, a reaction that arrived unencrypted
    /// in an encrypted room passes the trust step (Matrix clients send reactions unencrypted,
    /// so nothing proves which session sent it): it only opens a challenge naming no session,
    /// which a plain PIN never answers; only a PIN replying to the challenge (naming amount
    /// and payee) from a trusted session of the payer confirms it.
    async fn check_payer_of(
        &self,
        event: &DecryptedEvent,
        plaintext_reaction: bool,
    ) -> Result<Result<(), (ReceiptReason, String)>, PaymentsError> {
        let user = event.sender.as_str();
        let now_ms = self.clock.now_ms();
        let record = self.store.pin(user)?.filter(|r| r.hash.is_some());
        let mut facts = self.facts(event).await?;
        if plaintext_reaction && !facts.was_encrypted && facts.room_encrypted {
            facts.was_encrypted = true;
            facts.trust = Some(crate::policy::trust::SenderTrust::Verified);
        }
        let facts = PayerFacts {
            trust: trust::check(facts, self.trust_settings()),
            has_pin: record.is_some(),
            pin_exposed: self.store.profile(user)?.pin_compromised,
            pin_locked_until_ms: record.and_then(|r| r.locked_until_ms),
        };
        match refusal::payer(&facts, now_ms) {
            Ok(()) => Ok(Ok(())),
            Err(refused) => {
                if refused.ask_to_accept_identity {
                    self.apply(self.accept_identity_decision(event, now_ms)?)
                        .await?;
                }
                Ok(Err((refused.refusal.reason, refused.refusal.sentence)))
            }
        }
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
        if let Some(refused) =
            refusal::too_many_waiting(waiting, self.settings.pending_per_user_max)
        {
            return Ok(Err((refused.reason, refused.sentence)));
        }
        let admitted =
            self.rate
                .lock()
                .expect("rate lock")
                .admit(user, event.event_id.as_str(), now_ms);
        if !admitted {
            let refused = refusal::rate_limited(self.settings.commands_per_minute_max);
            return Ok(Err((refused.reason, refused.sentence)));
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
        plaintext_reaction: bool,
    ) -> Result<Result<(), (ReceiptReason, String)>, PaymentsError> {
        if let Err(refusal) = self.check_payer_of(event, plaintext_reaction).await? {
            return Ok(Err(refusal));
        }
        if let Err(refusal) = self.flood_refusal(event)? {
            return Ok(Err(refusal));
        }
        // Asked of the homeserver only for a payment that passed every check before it.
        let self_or_bot = payee == event.sender || payee == self.bot;
        let may_hold_wallet = self.wallet_holders().allows(payee);
        let joined_room = !self_or_bot
            && may_hold_wallet
            && self
                .messenger
                .memberships(&event.room_id)
                .await?
                .iter()
                .any(|(u, m)| u == payee.as_str() && m == "join");
        let facts = PayeeFacts {
            payer: &event.sender,
            payee,
            bot: &self.bot,
            may_hold_wallet,
            joined_room,
        };
        if let Some(refused) = refusal::payee(facts) {
            return Ok(Err((refused.reason, refused.sentence)));
        }
        if let Err(error) = self.ledger.parse_amount(amount, currency) {
            let refused = refusal::invalid_amount(error);
            return Ok(Err((refused.reason, refused.sentence)));
        }
        Ok(Ok(()))
    }

    /// Reserves the payment `event` asks for in the ledger (a pending transfer whose id comes
    /// from the event's id) for `timeout_ms` (the PIN window; for a payment held for its payee,
    /// also the accept window); `Ok(Err(refusal))` when the amount or the ledger refuses it.
    /// A refund is linked to the payment it returns (`refund`). The transfer carries the
    /// ledger reference of its request, or a refund its original's ([`payment_reference`]).
    #[allow(clippy::too_many_arguments)]
    async fn create_payment(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
        memo: Option<String>,
        request: Option<String>,
        refund: Option<&RefundLink>,
        timeout_ms: u64,
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
        // Before `request` moves into the memo, which names the request too: a retry that
        // computed another request would already differ in its memo.
        let reference = payment_reference(request.as_deref(), refund);
        let memo_bytes = PaymentMemo {
            kind: MemoKind::Pay,
            room: event.room_id.to_string(),
            event: event.event_id.to_string(),
            note: memo,
            request,
            refund: refund.map(|link| RefundMemo {
                of: link.original.0.to_string(),
                receipt: link.receipt.to_string(),
            }),
        }
        .encode();
        let transfer = TransferRequest {
            reference,
            id: TransferId::from_key(event.event_id.as_str()),
            debit: Owner::user(event.sender.as_str()),
            credit: self.payee_owner(payee.as_str())?,
            amount: parsed,
            memo: memo_bytes,
        };
        let created = match refund {
            // Linked to the original, so the ledger caps what is refunded even under races.
            Some(link) => self
                .ledger
                .create_refund_result(transfer, link.original, Some(timeout_ms))
                .await
                .map(|created| created.into_transfer()),
            None => self.ledger.create_pending(transfer, timeout_ms).await,
        };
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
            request,
            refund,
        } = request;
        // A reaction paying a request may come unencrypted (see [`Self::check_payer_of`]).
        let reaction = event.event_type == "m.reaction" && request.is_some();
        let request_id = request.as_ref().map(|(before, _)| before.id.to_string());
        let transfer_id = TransferId::from_key(event.event_id.as_str());
        let mut hold_timeout_ms = None;
        // The transfer made for this event (if any) is what "started" means for a payment.
        // Found, it is carried on with as it was made, never created again: a payment made
        // before ledger references existed (reference 0) is not retried with its request's
        // reference, which the ledger would refuse (`ExistsWithDifferentReference`).
        let existing = self.ledger.transfer(transfer_id).await?;
        let earlier = self.store.outcome(event.event_id.as_str())?;
        let now_ms = self.clock.now_ms();
        match start::decide(
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
                if let Err((reason, sentence)) = self
                    .pay_refusal(event, &payee, amount, &currency, reaction)
                    .await?
                {
                    return self
                        .decline(event, &payee, amount, &currency, reason, &sentence)
                        .await;
                }
                if self.hold_applies(&payee).await? {
                    if !self.held_has_room(&payee)? {
                        return self
                            .decline(
                                event,
                                &payee,
                                amount,
                                &currency,
                                ReceiptReason::TooManyHeld,
                                "too many payments to this person are waiting for them to \
                                 accept; try again once they accepted or declined some",
                            )
                            .await;
                    }
                    // Reserved for the PIN window and then the accept window: the ledger's
                    // own timeout returns it to the payer when the window ends.
                    hold_timeout_ms =
                        Some(self.settings.stepup_timeout_ms + self.settings.accept_window_ms);
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
                .create_payment(
                    event,
                    &payee,
                    amount,
                    &currency,
                    memo.clone(),
                    request_id,
                    refund.as_ref(),
                    hold_timeout_ms.unwrap_or(self.settings.stepup_timeout_ms),
                )
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
        // A reservation longer than the PIN window is one held for its payee (also when this
        // event is handled again: the ledger's record says so, whatever the facts are now).
        let held_return_at_ms = transfer.deadline_ms.filter(|deadline| {
            deadline.saturating_sub(transfer.created_ms) > self.settings.stepup_timeout_ms
        });
        let challenge = Challenge {
            kind: ChallengeKind::Pay,
            transfer_id: transfer.id.0,
            payer: event.sender.clone(),
            payee: payee.to_string(),
            amount_minor: transfer.amount_minor,
            amount: self.show(&currency, transfer.amount_minor),
            currency: currency.clone(),
            room_id: event.room_id.clone(),
            event_id: event.event_id.clone(),
            memo,
            created_ms: transfer.created_ms,
            expires_at_ms: match held_return_at_ms {
                Some(_) => transfer.created_ms + self.settings.stepup_timeout_ms,
                None => transfer
                    .deadline_ms
                    .unwrap_or(transfer.created_ms + self.settings.stepup_timeout_ms),
            },
            device_id: event.sender_device.clone(),
        };
        if let Some(return_at_ms) = held_return_at_ms {
            self.hold(&challenge, return_at_ms).await?;
        }
        let mut decision = challenge::open_payment(
            &Self::event_ref(event),
            challenge,
            &dm,
            &self.bot,
            self.clock.now_ms(),
        );
        if let Some((before, after)) = request {
            // The payer's share is `paying` this transfer once it is reserved (a retry finds
            // the transfer and writes the same).
            decision.store.insert(
                0,
                Record::RequestUpdate {
                    before: Box::new(before),
                    after: Box::new(after),
                    acted_by: None,
                },
            );
        }
        self.apply(decision).await
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
        let decision = start::decide(
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
                    payer: event.sender.clone(),
                    payee: "settlement".to_owned(),
                    amount_minor: parsed.minor(),
                    amount: self.show(&currency, parsed.minor()),
                    currency: currency.clone(),
                    room_id: event.room_id.clone(),
                    event_id: event.event_id.clone(),
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
        let decision =
            challenge::open_withdrawal(&Self::event_ref(event), challenge, &dm, &self.bot, now_ms);
        self.apply(decision).await
    }

    /// The ledger's refusal of a payment of `amount` from `payer` (to `payee`, a user, or the
    /// settlement account when `None`) that can be seen from the accounts as they are
    /// ([`refusal::before_ledger`]).
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
        let payer = self.ledger.account(&account(payer)).await?;
        let payee_frozen_all = match payee {
            Some(payee) => self
                .ledger
                .account(&account(payee))
                .await?
                .is_some_and(|a| a.frozen == Some(crate::ledger::FreezeMode::All)),
            None => false,
        };
        let facts = AccountFacts {
            payer_exists: payer.is_some(),
            payer_frozen: payer.as_ref().is_some_and(|a| a.frozen.is_some()),
            payer_available_minor: payer.as_ref().map_or(0, |a| {
                u128::try_from(a.balances.available_minor()).unwrap_or(0)
            }),
            payee_frozen_all,
        };
        Ok(refusal::before_ledger(facts, amount.minor()))
    }

    /// The PIN was right: mint the step-up proof for exactly this payment, redeem it against
    /// the ledger's own record, move the money; the decision says what the payer is told.
    pub(super) async fn authorise(
        &self,
        ev: &EventRef,
        challenge: &Challenge,
    ) -> Result<Decision, PaymentsError> {
        let transfer_id = TransferId(challenge.transfer_id);
        let payee_owner = match challenge.kind {
            ChallengeKind::Pay => challenge.payee.clone(),
            ChallengeKind::Withdraw => Owner::Settlement.to_string(),
        };
        let binding = StepUpBinding {
            payer: challenge.payer.to_string(),
            payee: payee_owner,
            amount_minor: challenge.amount_minor,
            currency: challenge.currency.clone(),
            transfer_id: transfer_id.0.to_string(),
        };
        let proof = self.stepup.mint(binding)?;
        match challenge.kind {
            ChallengeKind::Pay => {
                let Some(pending) = self.ledger.transfer(transfer_id).await? else {
                    return Ok(after_pin::after_post(
                        ev,
                        challenge,
                        after_pin::PostAnswer::Missing,
                    ));
                };
                // The proof is redeemed against the ledger's own record of the transfer.
                let payee = self.owner_user(&pending.credit.owner)?;
                self.stepup.redeem(
                    &proof,
                    &binding_of(&pending, challenge.payer.as_str(), payee),
                )?;
                // A payment held for its payee stays reserved until they accept it.
                if let Some(decision) = self.held_after_pin(ev, challenge)? {
                    return Ok(decision);
                }
                let answer = self.post_answer(transfer_id).await?;
                Ok(after_pin::after_post(ev, challenge, answer))
            }
            ChallengeKind::Withdraw => {
                let amount = self
                    .ledger
                    .amount_from_minor(challenge.amount_minor, &challenge.currency)
                    .map_err(LedgerError::from)?;
                let binding = StepUpBinding {
                    payer: challenge.payer.to_string(),
                    payee: Owner::Settlement.to_string(),
                    amount_minor: amount.minor(),
                    currency: amount.currency().to_string(),
                    transfer_id: transfer_id.0.to_string(),
                };
                self.stepup.redeem(&proof, &binding)?;
                let memo = PaymentMemo {
                    kind: MemoKind::Withdraw,
                    room: challenge.room_id.to_string(),
                    event: challenge.event_id.to_string(),
                    note: None,
                    request: None,
                    refund: None,
                };
                // As for payments: a withdrawal the wallet cannot cover is refused before the
                // ledger, which would open accounts and journal the refusal.
                let created = match self
                    .refused_before_ledger(challenge.payer.as_str(), None, amount)
                    .await?
                {
                    Some(error) => Err(error),
                    None => match self
                        .ledger
                        .create_pending(
                            TransferRequest {
                                reference: 0,
                                id: transfer_id,
                                debit: Owner::user(challenge.payer.as_str()),
                                credit: Owner::Settlement,
                                amount,
                                memo: memo.encode(),
                            },
                            self.settings.withdrawal_timeout_ms,
                        )
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(LedgerError::Rejected(error)) => Err(error),
                        Err(e) => return Err(e.into()),
                    },
                };
                Ok(after_pin::after_withdrawal(ev, challenge, created))
            }
        }
    }
}

/// The binding the proof was minted for, rebuilt from the ledger's record; `payee_user` is the
/// Matrix user the credited owner stands for (a merchant's wallet stands for its user).
fn binding_of(transfer: &Transfer, payer: &str, payee_user: Option<String>) -> StepUpBinding {
    let payee = payee_user.unwrap_or_else(|| transfer.credit.owner.to_string());
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
