//! The `!` commands other than paying: balance, history, `!pin set` / `!pin change` and
//! `!cancel`. Each answers in the sender's private DM; `!pay` and `!withdraw` are handed to
//! [`super::pay`].

use super::dialog::dialog_prompt;
use super::dm::Dm;
use super::memo::PaymentMemo;
use super::{payment_span, text, txn, PayRequest, Payments, PaymentsError};
use crate::command::Command;
use crate::crypto::DecryptedEvent;
use crate::events::ReceiptReason;
use crate::ledger::{Owner, TransferId, TransferState};
use crate::policy::trust::{self, TrustRefusal};
use crate::store::payments::{Challenge, ChallengeKind, Dialog};
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
                if refusal == TrustRefusal::IdentityChanged {
                    self.ask_to_accept_identity(event).await?;
                }
                self.answer(event, &refusal.to_string(), "wallet-refused")
                    .await?;
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
        dm_room: &ruma::RoomId,
        body: &str,
        purpose: &str,
    ) -> Result<(), PaymentsError> {
        let reply_to = (dm_room == event.room_id).then_some(event.event_id.as_ref());
        self.messenger
            .notice(
                dm_room,
                body,
                reply_to,
                txn(purpose, event.event_id.as_str()),
            )
            .await?;
        Ok(())
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
        let facts = self.facts(event).await?;
        let user = event.sender.as_str();
        let record = self.store.pin(user)?;
        let has_pin = record.as_ref().is_some_and(|r| r.hash.is_some());
        match trust::check(facts, self.trust_settings()) {
            Ok(()) => {}
            // `!pin change` without a PIN only gets told to use `!pin set`.
            Err(TrustRefusal::IdentityChanged) if !has_pin && change => {}
            // Without a PIN nothing the user knows can confirm a key change; see
            // `may_accept_keys_without_pin` for when setting the PIN accepts them.
            Err(TrustRefusal::IdentityChanged) if !has_pin => {
                if !self
                    .may_accept_keys_without_pin(user, record.is_some())
                    .await?
                {
                    self.answer(
                        event,
                        "your account's security keys changed since I first saw them, and \
                         you have no PIN to confirm that with. Ask the operator to confirm \
                         your new keys; until then I take no PIN and no payment from you.",
                        "pin-refused",
                    )
                    .await?;
                    return Ok(());
                }
                self.messenger.crypto.accept_identity(&event.sender).await?;
                let mut profile = self.store.profile(user)?;
                if profile.accept_new_keys_at_pin_set {
                    profile.accept_new_keys_at_pin_set = false;
                    self.store.put_profile(user, &profile).await?;
                }
                if let Some(dm) = self.ready_dm(user)? {
                    // Said in the DM, which the account's earlier sessions can read too.
                    self.messenger
                        .notice(
                            &dm,
                            "🔐 I accepted your account's new security keys (your cross-signing \
                             was reset). If you did not do that, tell the operator now.",
                            None,
                            txn("keys-accepted", event.event_id.as_str()),
                        )
                        .await?;
                }
            }
            Err(refusal) => {
                if refusal == TrustRefusal::IdentityChanged {
                    self.ask_to_accept_identity(event).await?;
                }
                self.answer(event, &refusal.to_string(), "pin-refused")
                    .await?;
                return Ok(());
            }
        }
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        self.point_to_dm(event, &dm, "pin-pointer").await?;
        let expires_at_ms = self.clock.now_ms() + self.settings.pin_dialog_timeout_ms;
        let (dialog, message) = match (change, has_pin) {
            (false, true) => (
                None,
                "You already have a PIN. To change it, send !pin change.",
            ),
            (true, false) => (None, "You have no PIN yet. Send !pin set to choose one."),
            (false, false) => {
                let dialog = Dialog::NewPin {
                    expires_at_ms,
                    change: false,
                };
                (Some(dialog), "")
            }
            (true, true) => (Some(Dialog::OldPin { expires_at_ms }), ""),
        };
        if let Some(dialog) = &dialog {
            self.store.put_dialog(user, Some(dialog)).await?;
        }
        if let Dm::Ready(dm_room) = dm {
            let text = match &dialog {
                Some(dialog) => dialog_prompt(dialog),
                None => message,
            };
            self.messenger
                .notice(
                    &dm_room,
                    text,
                    None,
                    txn("pin-prompt", event.event_id.as_str()),
                )
                .await?;
        }
        Ok(())
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

    /// `!cancel`: voids every payment of the sender still waiting for a PIN (and drops their
    /// withdrawal confirmations), then says so in the DM (or, without one, where it was asked).
    async fn on_cancel(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let now_ms = self.clock.now_ms();
        let open: Vec<Challenge> = self
            .store
            .challenges(user)?
            .into_iter()
            .filter(|c| c.expires_at_ms > now_ms)
            .collect();
        self.cancel_challenges(user, ReceiptReason::Other).await?;
        let body = if open.is_empty() {
            "Nothing was waiting for your PIN, so there was nothing to cancel.".to_owned()
        } else {
            let lines: Vec<String> = open
                .iter()
                .map(|c| match c.kind {
                    ChallengeKind::Pay => {
                        text::challenge_line(&c.amount, &c.currency, &c.payee, &c.room_id)
                    }
                    ChallengeKind::Withdraw => {
                        format!("• withdrawal of {}", text::money(&c.amount, &c.currency))
                    }
                })
                .collect();
            format!("Cancelled; nothing of it was paid:\n{}", lines.join("\n"))
        };
        let key = event.event_id.as_str();
        match self.ready_dm(user)? {
            Some(dm) => {
                let reply_to = (dm == event.room_id).then_some(event.event_id.as_ref());
                self.messenger
                    .notice(&dm, &body, reply_to, txn("cancel", key))
                    .await?;
                if dm != event.room_id {
                    self.messenger
                        .notice(
                            &event.room_id,
                            &format!("{}: I answered in our private chat.", event.sender),
                            Some(&event.event_id),
                            txn("cancel-pointer", key),
                        )
                        .await?;
                }
            }
            None => {
                self.messenger
                    .notice(
                        &event.room_id,
                        &body,
                        Some(&event.event_id),
                        txn("cancel", key),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}
