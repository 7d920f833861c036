//! Payments the payee accepts, the shell: gathers the facts (the held record, the ledger's
//! reservation, the sender's trust) for [`core::held`] and applies its decisions. The
//! payment itself is started by [`Payments::on_pay`] (held when [`Payments::hold_applies`]),
//! confirmed by the payer's PIN ([`Payments::held_after_pin`] instead of the post), and ends
//! by the payee's answer ([`Payments::on_held_answer`]), the sweep ([`Payments::sweep_held`])
//! or the ledger's own timeout; the outbox tells the money ([`Payments::held_receipt`],
//! [`Payments::held_ended`]).

use ruma::UserId;

use super::core::held::{self as core_held, Answer, AnswerFacts, HeldAction, ReservationState};
use super::core::{Decision, EventRef};
use super::{Payments, PaymentsError};
use crate::crypto::DecryptedEvent;
use crate::events::{ReceiptReason, ReceiptStatus};
use crate::ledger::{Owner, TransferId, TransferState};
use crate::policy::trust;
use crate::store::held::{HeldBounds, HeldInserted, HeldRecord};
use crate::store::payments::{Challenge, EventOutcome};

/// Most due held payments the sweep handles at a time (bounded work per run).
const HELD_SWEEP_SLICE: usize = 8;

impl Payments {
    /// Whether a payment to `payee` waits for them to accept it: the operator's switch, or a
    /// payee who never used mxpay (no PIN, and no wallet that ever had money in or out) while
    /// `payments.hold_for_new_payees` is on.
    pub(super) async fn hold_applies(&self, payee: &UserId) -> Result<bool, PaymentsError> {
        if self.settings.payee_must_accept {
            return Ok(true);
        }
        if !self.settings.hold_for_new_payees {
            return Ok(false);
        }
        let has_pin = self
            .store
            .pin(payee.as_str())?
            .is_some_and(|r| r.hash.is_some());
        let has_wallet = self
            .ledger
            .balances(&Owner::user(payee.as_str()))
            .await?
            .iter()
            .any(|a| {
                let b = &a.balances;
                b.credits_posted_minor > 0
                    || b.debits_posted_minor > 0
                    || b.debits_pending_minor > 0
            });
        Ok(crate::requests::payee_must_accept(
            false,
            has_pin || has_wallet,
        ))
    }

    /// Whether `payee` may get one more held payment (the store's bounds).
    pub(super) fn held_has_room(&self, payee: &UserId) -> Result<bool, PaymentsError> {
        Ok(self.store.held().has_room(payee, HeldBounds::default())?)
    }

    /// Writes down a held payment waiting for its payer's PIN (once; a retry finds it).
    pub(super) async fn hold(
        &self,
        challenge: &Challenge,
        return_at_ms: u64,
    ) -> Result<(), PaymentsError> {
        let Some(record) = core_held::new_record(challenge, return_at_ms) else {
            return Ok(());
        };
        if let HeldInserted::Full = self
            .store
            .held()
            .insert(&record, HeldBounds::default())
            .await?
        {
            // Checked before the reservation was made; filled meanwhile by another payer's
            // payment: this one is paid at the PIN like any other.
            tracing::warn!(transfer = %TransferId(record.transfer_id), "held payments full; not held");
        }
        Ok(())
    }

    /// The payer's PIN was right: for a held payment, the decision that holds it (instead of
    /// the post); `None` for any other payment.
    pub(super) fn held_after_pin(
        &self,
        ev: &EventRef,
        challenge: &Challenge,
    ) -> Result<Option<Decision>, PaymentsError> {
        let Some(record) = self.store.held().get(challenge.transfer_id)? else {
            return Ok(None);
        };
        if !record.state.is_open() {
            return Ok(None);
        }
        tracing::info!(transfer = %TransferId(record.transfer_id), "payment confirmed; held for the payee");
        Ok(Some(core_held::on_pin(
            ev,
            &record,
            self.settings.accept_window_ms,
        )))
    }

    /// A reaction or reply answering a held payment's notice.
    pub(super) async fn on_held_answer(
        &self,
        event: &DecryptedEvent,
        record: HeldRecord,
        action: HeldAction,
    ) -> Result<(), PaymentsError> {
        if self.store.is_done(event.event_id.as_str())? {
            return Ok(());
        }
        let ev = Self::event_ref(event);
        if let Some(EventOutcome::Declined(declined)) =
            self.store.outcome(event.event_id.as_str())?
        {
            // Refused before (a retried transaction): said again, not decided again.
            let sends = core_held::refusal_sends(
                &ev,
                &record,
                super::reason_of_code(&declined.reason),
                &declined.sentence,
            );
            return self
                .apply(Decision {
                    sends,
                    ..Decision::none()
                })
                .await;
        }
        // Reactions travel unencrypted (matrix-sdk and Element do not encrypt them): the
        // homeserver vouches for their sender only. Accepting or declining moves the money
        // only to where the payer's PIN already sent it or back to the payer, so a reaction
        // counts; an encrypted answer must come from a trusted session.
        let mut facts = self.facts(event).await?;
        if event.event_type == "m.reaction" && !facts.was_encrypted && facts.room_encrypted {
            facts.was_encrypted = true;
            facts.trust = Some(trust::SenderTrust::Verified);
        }
        let trust = trust::check(facts, self.trust_settings())
            .map_err(|refusal| (refusal.reason(), refusal.to_string()));
        let reservation = match self.ledger.transfer(TransferId(record.transfer_id)).await? {
            None => ReservationState::Missing,
            Some(t) => match t.state {
                TransferState::Pending => ReservationState::Pending,
                TransferState::Posted { .. } => ReservationState::Posted,
                TransferState::Voided => ReservationState::Voided,
                TransferState::Expired => ReservationState::Expired,
            },
        };
        let frozen = self.held_wallets_frozen(&record).await?;
        let answer = core_held::answer(
            &record,
            AnswerFacts {
                event: &ev,
                action,
                trust: trust
                    .as_ref()
                    .map(|_| ())
                    .map_err(|(r, s)| (*r, s.as_str())),
                reservation,
                now_ms: self.clock.now_ms(),
                accept_window_ms: self.settings.accept_window_ms,
                frozen,
            },
        );
        match answer {
            Answer::Settle(decision) => {
                tracing::info!(transfer = %TransferId(record.transfer_id), ?action, "held payment answered");
                self.apply(decision).await
            }
            Answer::Refused(reason, sentence) => {
                self.metrics
                    .payment("declined", super::reason_label(reason));
                self.apply(core_held::refuse(&ev, &record, reason, &sentence))
                    .await
            }
        }
    }

    /// Whether the payer's wallet is frozen or the payee's is frozen for all movement.
    async fn held_wallets_frozen(&self, record: &HeldRecord) -> Result<bool, PaymentsError> {
        let Some(currency) = crate::ledger::CurrencyCode::new(&record.currency) else {
            return Ok(false);
        };
        let account = |user: &UserId| crate::ledger::AccountId {
            owner: Owner::user(user.as_str()),
            currency,
        };
        let payer_frozen = self
            .ledger
            .account(&account(&record.payer))
            .await?
            .is_some_and(|a| a.frozen.is_some());
        let payee_frozen_all = self
            .ledger
            .account(&account(&record.payee))
            .await?
            .is_some_and(|a| a.frozen == Some(crate::ledger::FreezeMode::All));
        Ok(super::core::after_pin::frozen_since_asked(payer_frozen, payee_frozen_all).is_some())
    }

    /// Releases held payments whose payer never confirmed them and returns those whose
    /// window passed, a bounded slice at a time (run after each event and on a timer).
    pub async fn sweep_held(&self) -> Result<(), PaymentsError> {
        let now_ms = self.clock.now_ms();
        for record in self.store.held().due(now_ms, HELD_SWEEP_SLICE)? {
            if let Some(decision) =
                core_held::sweep(&record, self.settings.accept_window_ms, now_ms)
            {
                self.apply(decision).await?;
            }
        }
        Ok(())
    }

    /// For the outbox: the status, reason and headline of a held payment's receipts when its
    /// reservation ended (`None`: told like any payment).
    pub(super) fn held_receipt(
        &self,
        id: TransferId,
        how: &str,
    ) -> Result<Option<(ReceiptStatus, Option<ReceiptReason>, String)>, PaymentsError> {
        Ok(self
            .store
            .held()
            .get(id.0)?
            .and_then(|record| core_held::ended_receipt(&record, how)))
    }

    /// For the outbox, after the receipts: the held record follows the ledger and its notice
    /// is edited.
    pub(super) async fn held_ended(&self, id: TransferId, how: &str) -> Result<(), PaymentsError> {
        let Some(record) = self.store.held().get(id.0)? else {
            return Ok(());
        };
        self.apply(core_held::ended(
            &record,
            how,
            self.settings.accept_window_ms,
        ))
        .await
    }
}
