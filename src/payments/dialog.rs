//! PIN dialogs: choosing and changing a PIN, and accepting a user's changed security keys with
//! their PIN. Each step is recorded with its answer, so a retried message gets the same answer.

use super::pins::pin_error_sentence;
use super::{txn, Payments, PaymentsError};
use crate::crypto::{DecryptedEvent, TrustState};
use crate::policy::pin::{Pin, PinError, PinRecord};
use crate::store::payments::Dialog;

impl Payments {
    /// The sender's cross-signing identity changed: opens (or keeps) the dialog that accepts it
    /// with their PIN and asks in their DM. Re-asked on every refused attempt, with the same
    /// transaction id per event, so a retried transaction does not ask twice.
    pub(super) async fn ask_to_accept_identity(
        &self,
        event: &DecryptedEvent,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        if self.store.pin(user)?.is_none_or(|r| r.hash.is_none()) {
            return Ok(()); // no PIN to confirm with (the operator can: see `!pin set`)
        }
        let now_ms = self.clock.now_ms();
        let dialog = match self.store.dialog(user, now_ms)? {
            Some(open @ Dialog::AcceptIdentity { .. }) => open,
            _ => {
                let dialog = Dialog::AcceptIdentity {
                    expires_at_ms: now_ms + self.settings.pin_dialog_timeout_ms,
                };
                self.store.put_dialog(user, Some(&dialog)).await?;
                dialog
            }
        };
        if let Some(dm) = self.ready_dm(user)? {
            self.messenger
                .notice(
                    &dm,
                    dialog_prompt(&dialog),
                    None,
                    txn("identity-prompt", event.event_id.as_str()),
                )
                .await?;
        }
        Ok(())
    }

    /// Moves the sender's PIN dialog on (or ends it) and answers, recording the answer with the
    /// step so a retried message gets it again (see [`PaymentStore::put_dialog_step`]).
    async fn dialog_step(
        &self,
        event: &DecryptedEvent,
        next: Option<&Dialog>,
        reply: &str,
    ) -> Result<(), PaymentsError> {
        self.store
            .put_dialog_step(event.sender.as_str(), next, event.event_id.as_str(), reply)
            .await?;
        self.reply(event, reply, "pin-dialog").await
    }

    pub(super) async fn on_dialog_pin(
        &self,
        event: &DecryptedEvent,
        dialog: Dialog,
        pin: Pin,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let expires_at_ms = now_ms + self.settings.pin_dialog_timeout_ms;
        match dialog {
            Dialog::NewPin { change, .. } => {
                if let Err(too_easy) = pin.check_choosable() {
                    // The dialog stays open for another PIN.
                    let next = Dialog::NewPin {
                        expires_at_ms,
                        change,
                    };
                    let sentence = pin_error_sentence(&too_easy);
                    return self.dialog_step(event, Some(&next), &sentence).await;
                }
                let hash = self.hash(pin).await?;
                let next = Dialog::ConfirmPin {
                    expires_at_ms,
                    hash,
                    change,
                };
                self.dialog_step(event, Some(&next), dialog_prompt(&next))
                    .await
            }
            Dialog::ConfirmPin { hash, change, .. } => {
                if self.matches(pin, hash.clone()).await? {
                    // Setting the same hash again (a retry after a crash here) is harmless.
                    self.store.put_pin(user, &PinRecord::new(hash)).await?;
                    let mut profile = self.store.profile(user)?;
                    profile.pin_compromised = false;
                    self.store.put_profile(user, &profile).await?;
                    let text = if change {
                        "✅ Your PIN is changed."
                    } else {
                        "✅ Your PIN is set. You can now pay with !pay in encrypted rooms."
                    };
                    self.dialog_step(event, None, text).await
                } else {
                    let next = Dialog::NewPin {
                        expires_at_ms,
                        change,
                    };
                    self.dialog_step(
                        event,
                        Some(&next),
                        "The two PINs differ. Send a new 4-digit PIN.",
                    )
                    .await
                }
            }
            Dialog::AcceptIdentity { .. } => {
                if event.verification_state != TrustState::VerificationViolation {
                    // Not sent from a session of the changed identity: either the keys were
                    // accepted meanwhile (this very message, handled again after a crash), or
                    // it comes from a session the new keys did not sign. Neither may accept
                    // keys, and the PIN is not used for anything else.
                    return self
                        .dialog_step(
                            event,
                            None,
                            "I did not use this PIN: no change of your security keys is waiting \
                             for it from this session. If a payment is waiting for your PIN, \
                             send it again.",
                        )
                        .await;
                }
                if self.store.profile(user)?.pin_compromised {
                    return self
                        .dialog_step(
                            event,
                            None,
                            "Your PIN was exposed, so it cannot confirm new security keys. Ask \
                             the operator to reset your PIN and confirm your new keys.",
                        )
                        .await;
                }
                match self.check_pin(user, &event.event_id, pin, now_ms).await? {
                    Ok(()) => {
                        self.messenger.crypto.accept_identity(&event.sender).await?;
                        self.dialog_step(
                            event,
                            None,
                            "✅ I accept your new security keys. You can pay again; if a payment \
                             is waiting for your PIN, send your PIN once more to confirm it.",
                        )
                        .await
                    }
                    Err(error) => self.dialog_pin_refused(event, error).await,
                }
            }
            Dialog::OldPin { .. } => {
                match self.check_pin(user, &event.event_id, pin, now_ms).await? {
                    Ok(()) => {
                        let next = Dialog::NewPin {
                            expires_at_ms,
                            change: true,
                        };
                        self.dialog_step(event, Some(&next), dialog_prompt(&next))
                            .await
                    }
                    Err(error) => self.dialog_pin_refused(event, error).await,
                }
            }
        }
    }

    /// A PIN dialog's PIN check failed: a locked (or reset) PIN ends the dialog; a wrong one
    /// leaves it open for another try (the attempt itself is recorded by the check).
    async fn dialog_pin_refused(
        &self,
        event: &DecryptedEvent,
        error: PinError,
    ) -> Result<(), PaymentsError> {
        let sentence = pin_error_sentence(&error);
        if matches!(error, PinError::Locked { .. } | PinError::NotSet) {
            self.dialog_step(event, None, &sentence).await
        } else {
            self.reply(event, &sentence, "pin-dialog").await
        }
    }
}

pub(super) fn dialog_prompt(dialog: &Dialog) -> &'static str {
    match dialog {
        Dialog::NewPin { change: false, .. } => {
            "Choose a 4-digit PIN and send it here (only here: this chat is private and \
             encrypted). I delete each PIN message after reading it."
        }
        Dialog::NewPin { change: true, .. } => "Now send your new 4-digit PIN.",
        Dialog::ConfirmPin { .. } => "Send the same PIN again to confirm it.",
        Dialog::OldPin { .. } => "To change your PIN, first send your current PIN.",
        Dialog::AcceptIdentity { .. } => {
            "🔐 Your account's security keys changed (someone reset your cross-signing). If it \
             was you, send your PIN here to confirm; until then I take no payments from you. If \
             it was not you, do not send your PIN: someone else may control your account. Tell \
             the operator."
        }
    }
}
