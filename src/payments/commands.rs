//! The `!` commands other than paying: balance, history, `!pin set` / `!pin change` and
//! `!cancel`. Each answers in the sender's private DM; `!pay` and `!withdraw` are handed to
//! [`super::pay`].

use super::core::challenge;
use super::core::dialog::{self, PinCommand, PinCommandFacts};
use super::core::{Decision, Outgoing};
use super::dm::Dm;
use super::memo::PaymentMemo;
use super::{payment_span, text, PayRequest, Payments, PaymentsError};
use crate::command::Command;
use crate::crypto::DecryptedEvent;
use crate::ledger::{Owner, TransferId, TransferState};
use crate::policy::trust::{self, TrustRefusal};
use tracing::Instrument as _;

impl Payments {
    pub(super) async fn on_command(
        &self,
        event: &DecryptedEvent,
        command: Command,
    ) -> Result<(), PaymentsError> {
        // Every wallet command needs the trust paying needs: a balance, a history or a
        // `!cancel` from a session its owner did not cross-sign (a stolen token on a new
        // device), or sent in plaintext, is refused like a payment. `!pin`, `!pay` and
        // `!withdraw` check it themselves (with their own exceptions for a changed identity).
        if matches!(
            command,
            Command::Balance | Command::History { .. } | Command::Cancel
        ) && !self.wallet_trusted(event).await?
        {
            return Ok(());
        }
        match command {
            Command::Help => Ok(()),
            Command::Balance => self.on_balance(event).await,
            Command::History { count } => self.on_history(event, count).await,
            Command::PinSet => self.on_pin_command(event, false).await,
            Command::PinChange => self.on_pin_command(event, true).await,
            Command::Cancel => self.on_cancel(event).await,
            Command::Pay {
                payee,
                amount,
                currency,
                memo,
            } => {
                let request = PayRequest {
                    payee,
                    amount,
                    currency,
                    memo,
                    request: None,
                    refund: None,
                };
                let outcome = self
                    .on_pay(event, request)
                    .instrument(payment_span(TransferId::from_key(event.event_id.as_str())))
                    .await;
                self.count_failure(outcome)
            }
            Command::Withdraw { amount, currency } => {
                let outcome = self
                    .on_withdraw(event, amount, currency)
                    .instrument(payment_span(TransferId::from_key(event.event_id.as_str())))
                    .await;
                self.count_failure(outcome)
            }
        }
    }

    /// Whether `event` may use the sender's wallet (encrypted, from a cross-signed device,
    /// identity not changed: [`trust::check`]); when not, the refusal's sentence was said
    /// where the command was asked and, for a changed identity, the DM asks to accept it.
    async fn wallet_trusted(&self, event: &DecryptedEvent) -> Result<bool, PaymentsError> {
        let facts = self.facts(event).await?;
        match trust::check(facts, self.trust_settings()) {
            Ok(()) => Ok(true),
            Err(refusal) => {
                tracing::info!(
                    reason = super::reason_label(refusal.reason()),
                    "wallet command refused"
                );
                let asked = if refusal == TrustRefusal::IdentityChanged {
                    self.accept_identity_decision(event, self.clock.now_ms())?
                } else {
                    Decision::none()
                };
                let answer = Self::event_ref(event).answer(&refusal.to_string(), "wallet-refused");
                self.apply(asked.then_send(answer)).await?;
                Ok(false)
            }
        }
    }

    async fn on_balance(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        self.point_to_dm(event, &dm, "balance-pointer").await?;
        let Dm::Ready(dm_room) = dm else {
            return Ok(());
        };
        let views = self
            .ledger
            .balances(&Owner::user(event.sender.as_str()))
            .await?;
        let shown: Vec<_> = views
            .into_iter()
            .map(|view| {
                let code = view.id.currency;
                let available = view.balances.available_minor().max(0) as u128;
                let available = format!("{} {code}", self.show(code.as_str(), available));
                let reserved = format!(
                    "{} {code}",
                    self.show(code.as_str(), view.balances.debits_pending_minor)
                );
                (view, available, reserved)
            })
            .collect();
        let body = text::balances(&shown);
        self.answer_in_dm(event, &dm_room, &body, "balance").await
    }

    /// Sends `body` to the user's DM, as a reply to `event` when it was asked there.
    async fn answer_in_dm(
        &self,
        event: &DecryptedEvent,
        dm_room: &ruma::OwnedRoomId,
        body: &str,
        purpose: &'static str,
    ) -> Result<(), PaymentsError> {
        let reply_to = (*dm_room == event.room_id).then_some(&event.event_id);
        self.apply(Decision::say(Outgoing::notice(
            dm_room,
            body,
            reply_to,
            purpose,
            event.event_id.as_str(),
        )))
        .await
    }

    async fn on_history(&self, event: &DecryptedEvent, count: u32) -> Result<(), PaymentsError> {
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        self.point_to_dm(event, &dm, "history-pointer").await?;
        let Dm::Ready(dm_room) = dm else {
            return Ok(());
        };
        let me = Owner::user(event.sender.as_str());
        let page = self.ledger.history(&me, None, count as usize).await?;
        let mut body = String::from("Your latest payments, newest first:");
        if page.transfers.is_empty() {
            body = "You have no payments yet.".to_owned();
        }
        for transfer in &page.transfers {
            let code = transfer.debit.currency;
            let amount_minor = match transfer.state {
                TransferState::Posted { amount_minor } => amount_minor,
                _ => transfer.amount_minor,
            };
            let amount = format!("{} {code}", self.show(code.as_str(), amount_minor));
            let outgoing = transfer.debit.owner == me;
            let other = if outgoing {
                &transfer.credit.owner
            } else {
                &transfer.debit.owner
            };
            let other = match other {
                Owner::User(u) => u.clone(),
                Owner::Issuer => "top-up".to_owned(),
                Owner::Settlement => "withdrawal".to_owned(),
                Owner::Fees => "fees".to_owned(),
                Owner::Merchant(id) => format!("merchant {id}"),
            };
            let state = match transfer.state {
                TransferState::Pending => "pending",
                TransferState::Posted { .. } => "completed",
                TransferState::Voided => "cancelled",
                TransferState::Expired => "expired",
            };
            let note = PaymentMemo::decode(&transfer.memo)
                .and_then(|m| m.note)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let sign = if outgoing { "−" } else { "+" };
            body.push_str(&format!(
                "\n• {sign}{amount} {} {other}{note} — {state}",
                if outgoing { "to" } else { "from" }
            ));
        }
        self.answer_in_dm(event, &dm_room, &body, "history").await
    }

    async fn on_pin_command(
        &self,
        event: &DecryptedEvent,
        change: bool,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let now_ms = self.clock.now_ms();
        let ev = Self::event_ref(event);
        let trust = trust::check(self.facts(event).await?, self.trust_settings());
        let record = self.store.pin(user)?;
        let has_pin = record.as_ref().is_some_and(|r| r.hash.is_some());
        // Asked of the ledger only when it decides something.
        let may_accept_keys_without_pin = trust == Err(TrustRefusal::IdentityChanged)
            && !has_pin
            && !change
            && self
                .may_accept_keys_without_pin(user, record.is_some())
                .await?;
        let ready_dm = self.ready_dm(user)?;
        let facts = PinCommandFacts {
            change,
            has_pin,
            trust: &trust,
            may_accept_keys_without_pin,
            ready_dm: ready_dm.as_ref(),
        };
        let ask = || self.accept_identity_decision(event, now_ms);
        let asked = match &trust {
            Err(TrustRefusal::IdentityChanged) if has_pin => ask()?,
            _ => Decision::none(),
        };
        match dialog::pin_command(&ev, facts, || asked) {
            PinCommand::Refused(decision) => return self.apply(decision).await,
            PinCommand::Go(decision) => self.apply(decision).await?,
        }
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        let decision = dialog::open_pin_dialog(
            &ev,
            change,
            has_pin,
            &dm,
            now_ms,
            self.settings.pin_dialog_timeout_ms,
        );
        self.apply(decision).await
    }

    /// Whether `!pin set` may accept a user's changed identity although no PIN confirms it:
    /// when the operator said so (an admin PIN reset with `accept_new_keys`), or when the user
    /// never had a PIN and never had a payment (nothing to take over: a new user who reset
    /// their keys before ever paying). A PIN reset by the operator without that flag, or a
    /// wallet that ever held money, needs the operator: else whoever reset the keys (perhaps
    /// an attacker with the password) would get the wallet by setting a PIN.
    async fn may_accept_keys_without_pin(
        &self,
        user: &str,
        had_pin_record: bool,
    ) -> Result<bool, PaymentsError> {
        if self.store.profile(user)?.accept_new_keys_at_pin_set {
            return Ok(true);
        }
        if had_pin_record {
            return Ok(false);
        }
        let page = self.ledger.history(&Owner::user(user), None, 1).await?;
        Ok(page.transfers.is_empty())
    }

    /// `!cancel` ([`challenge::cancel`]).
    async fn on_cancel(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let decision = challenge::cancel(
            &Self::event_ref(event),
            &self.store.challenges(user)?,
            self.ready_dm(user)?.as_ref(),
            self.clock.now_ms(),
        );
        self.apply(decision).await
    }
}
