//! PIN dialogs, the shell around [`super::core::dialog`]: gathers the dialog's facts, runs
//! the argon2id work the core asks for, and applies its decisions.

use super::core::dialog::{self, DialogFacts, Need, Work};
use super::core::pin_answer;
use super::core::Decision;
use super::{Payments, PaymentsError};
use crate::crypto::{DecryptedEvent, TrustState};
use crate::policy::pin::Pin;
use crate::store::payments::Dialog;

impl Payments {
    /// The decision that opens (or keeps) the dialog accepting the sender's changed identity
    /// with their PIN, and asks in their DM ([`pin_answer::ask_to_accept_identity`]); asked
    /// again on every refused attempt, with the same transaction id per event.
    pub(super) fn accept_identity_decision(
        &self,
        event: &DecryptedEvent,
        now_ms: u64,
    ) -> Result<Decision, PaymentsError> {
        let user = event.sender.as_str();
        Ok(pin_answer::ask_to_accept_identity(
            &event.sender,
            self.has_pin(user)?,
            self.store.dialog(user, now_ms)?.as_ref(),
            self.ready_dm(user)?.as_ref(),
            event.event_id.as_str(),
            now_ms,
            self.settings.pin_dialog_timeout_ms,
        ))
    }

    /// A PIN answering the sender's open dialog.
    pub(super) async fn on_dialog_pin(
        &self,
        event: &DecryptedEvent,
        dialog: Dialog,
        pin: Pin,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let ev = Self::event_ref(event);
        let timeout_ms = self.settings.pin_dialog_timeout_ms;
        let facts = DialogFacts {
            choosable: pin.check_choosable(),
            from_changed_identity: event.verification_state == TrustState::VerificationViolation,
            pin_exposed: self.store.profile(user)?.pin_compromised,
        };
        let work = match dialog::need(&ev, &dialog, facts, now_ms, timeout_ms) {
            Need::Decided(decision) => return self.apply(decision).await,
            Need::Hash => Work::Hashed(self.hash(pin).await?),
            Need::Match(hash) => Work::Matched(self.matches(pin, hash).await?),
            Need::CheckPin => {
                Work::Checked(self.check_pin(user, &event.event_id, pin, now_ms).await?)
            }
        };
        self.apply(dialog::after(&ev, &dialog, work, now_ms, timeout_ms))
            .await
    }
}
