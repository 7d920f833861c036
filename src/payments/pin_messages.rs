//! PIN-carrying events, the shell around [`super::core::pin_answer`]: gathers what the
//! decisions need (the sender's DM, dialog, challenges, trust), removes the PIN from the room,
//! runs the PIN comparison the core asks for, and applies the decisions.

use super::core::after_pin::{self, AfterCompare, PostAnswer};
use super::core::pin_answer::{self, OutsideDmFacts, PinAddress, PinTarget};
use super::core::{Decision, EventRef};
use super::{payment_span, pin_recognition, Payments, PaymentsError};
use crate::crypto::DecryptedEvent;
use crate::ledger::{LedgerError, TransferId};
use crate::policy::pin::Pin;
use crate::policy::trust;
use crate::store::payments::{Challenge, EventOutcome, UserProfile};
use ruma::{EventId, RoomId};
use tracing::Instrument as _;

impl Payments {
    /// A PIN-carrying event (any shape, see [`pin_recognition`]): used as an answer only in the
    /// sender's private DM; removed after reading. `Ok(false)` when it is left alone (chat
    /// outside the DM while the bot waits for no PIN from the sender).
    pub(super) async fn on_pin(
        &self,
        event: &DecryptedEvent,
        message: pin_recognition::PinMessage,
    ) -> Result<bool, PaymentsError> {
        let user = event.sender.as_str();
        let profile = self.store.profile(user)?;
        let mut in_dm = profile.dm_room.as_ref() == Some(&event.room_id);
        if in_dm && !self.is_private_dm(&event.room_id, &event.sender).await? {
            // Someone else joined or was invited, or the room became joinable: a PIN here is
            // readable by others, exactly as in a group room.
            tracing::warn!(room_id = %event.room_id, "a PIN in a DM that is no longer private");
            in_dm = false;
        }
        let now_ms = self.clock.now_ms();
        if !in_dm {
            return self
                .on_pin_outside_dm(event, &message, profile, now_ms)
                .await;
        }
        // Read (it is in memory now), then remove it from the room; the redaction runs
        // alongside the check so it does not add to the payment's latency.
        let replaces = message.replaces.clone();
        let redaction = async {
            if !self.remove_pin_message(event, replaces.as_deref()).await? {
                tracing::warn!(room_id = %event.room_id, "cannot redact a PIN in the private chat");
            }
            Ok::<_, PaymentsError>(())
        };
        let (redacted, acted) = tokio::join!(redaction, self.act_on_dm_pin(event, message, now_ms));
        redacted?;
        acted.map(|()| true)
    }

    /// Redacts a PIN-carrying event and, for an edit, the message it edited (if the same
    /// person sent it: an edit naming someone else's message is no licence to remove that).
    /// `Ok(false)` when the event itself could not be removed (no power, or refused for good).
    async fn remove_pin_message(
        &self,
        event: &DecryptedEvent,
        replaces: Option<&EventId>,
    ) -> Result<bool, PaymentsError> {
        let removed = self.redact_or_warn(&event.room_id, &event.event_id).await?;
        if let Some(original) = replaces {
            let sender = match self.messenger.event_sender(&event.room_id, original).await {
                Ok(sender) => sender,
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look up the message a PIN edit replaced");
                    None
                }
            };
            if sender.as_ref() == Some(&event.sender) {
                self.redact_or_warn(&event.room_id, original).await?;
            }
        }
        Ok(removed)
    }

    /// Redacts an event; `Ok(false)` when the bot may not (no power, or refused for good).
    async fn redact_or_warn(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<bool, PaymentsError> {
        match self.messenger.redact(room_id, event_id).await {
            Ok(redacted) => Ok(redacted),
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, %room_id, "cannot redact a PIN message");
                Ok(false)
            }
        }
    }

    /// Whether the bot waits for a PIN from `user`: a payment or withdrawal waiting for its
    /// step-up, or a `!pin set` / `!pin change` dialog, not lapsed.
    fn waiting_for_pin(&self, user: &str, now_ms: u64) -> Result<bool, PaymentsError> {
        if self.store.dialog(user, now_ms)?.is_some() {
            return Ok(true);
        }
        Ok(self
            .store
            .challenges(user)?
            .iter()
            .any(|c| c.expires_at_ms > now_ms))
    }

    async fn act_on_dm_pin(
        &self,
        event: &DecryptedEvent,
        message: pin_recognition::PinMessage,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let ev = Self::event_ref(event);
        if self.store.is_done(event.event_id.as_str())? {
            return Ok(());
        }
        // Handled before up to the answer (which then failed to go out): say it again.
        if let Some(EventOutcome::DialogAnswered { reply }) =
            self.store.outcome(event.event_id.as_str())?
        {
            return self
                .apply(Decision::say(ev.reply(reply, "pin-dialog")).finish(&ev))
                .await;
        }
        let pin_recognition::PinMessage {
            pin,
            challenge_id,
            reply_to,
            ..
        } = message;
        let Some(pin) = pin else {
            return self.apply(pin_answer::malformed_pin(&ev)).await;
        };
        let settings = self.core_settings();
        let dialog = self.store.dialog(user, now_ms)?;
        let has_pin = self.has_pin(user)?;
        if !event.was_encrypted {
            tracing::warn!(room_id = %event.room_id, "a PIN arrived unencrypted in the private chat");
            let decision = pin_answer::plaintext_in_dm(
                &ev,
                dialog.as_ref(),
                has_pin,
                now_ms,
                settings.pin_dialog_timeout_ms,
            );
            return self.apply(decision).await;
        }
        let trust = trust::check(self.facts(event).await?, self.trust_settings());
        let ready_dm = self.ready_dm(user)?;
        let trusted = pin_answer::pin_trust(&ev, &trust, dialog.as_ref(), || {
            pin_answer::ask_to_accept_identity(
                &event.sender,
                has_pin,
                dialog.as_ref(),
                ready_dm.as_ref(),
                event.event_id.as_str(),
                now_ms,
                settings.pin_dialog_timeout_ms,
            )
        });
        if let Err(refused) = trusted {
            return self.apply(refused).await;
        }
        if let Some(dialog) = dialog {
            return self.on_dialog_pin(event, dialog, pin, now_ms).await;
        }
        let addressed = challenge_id.is_some() || reply_to.is_some();
        let mut challenges = Vec::new();
        for challenge in self.store.challenges(user)? {
            let notice = self.store.note(challenge.transfer_id)?.dm_event_id;
            challenges.push((challenge, notice));
        }
        let (open, lapsed) = pin_answer::sweep_lapsed(challenges, addressed, now_ms);
        let address = PinAddress {
            challenge_id: challenge_id.as_deref(),
            reply_to: reply_to.as_deref(),
        };
        let target = pin_answer::choose_challenge(
            open,
            &address,
            event.sender_device.as_deref(),
            event.sent_ms(),
            now_ms,
            settings.stepup_timeout_ms,
        );
        let swept = Decision {
            store: lapsed,
            ..Decision::none()
        };
        if let PinTarget::OtherDevice(challenge) = &target {
            tracing::info!(
                transfer = %TransferId(challenge.transfer_id),
                "a plain PIN from another device than the payment's; not used"
            );
        }
        match pin_answer::unused_pin_answer(&ev, &target) {
            Some(answer) => self.apply(swept.then_send(answer).finish(&ev)).await,
            None => {
                self.apply(swept).await?;
                let PinTarget::One(challenge) = target else {
                    unreachable!("only One is answered by a comparison")
                };
                self.on_stepup_pin(event, &ev, challenge, pin, now_ms).await
            }
        }
    }

    /// Whether `user` has a PIN.
    pub(super) fn has_pin(&self, user: &str) -> Result<bool, PaymentsError> {
        Ok(self.store.pin(user)?.is_some_and(|r| r.hash.is_some()))
    }

    /// A PIN-carrying event outside the sender's private DM ([`pin_answer::outside_dm`]).
    /// `Ok(false)` when it is left alone (a number in a conversation).
    async fn on_pin_outside_dm(
        &self,
        event: &DecryptedEvent,
        message: &pin_recognition::PinMessage,
        _profile: UserProfile,
        now_ms: u64,
    ) -> Result<bool, PaymentsError> {
        let user = event.sender.as_str();
        if !pin_answer::outside_dm_acts(message.declared, self.waiting_for_pin(user, now_ms)?) {
            return Ok(false);
        }
        let has_pin = self.has_pin(user)?;
        let redacted = self
            .remove_pin_message(event, message.replaces.as_deref())
            .await?;
        let facts = OutsideDmFacts {
            user: &event.sender,
            carries_pin: message.pin.is_some(),
            has_pin,
            redacted,
            was_encrypted: event.was_encrypted,
        };
        self.apply(pin_answer::outside_dm(&Self::event_ref(event), facts))
            .await?;
        Ok(true)
    }

    /// A PIN answering `challenge`: compared (the attempt counted first) unless the core stops
    /// it before; a right PIN moves the money.
    async fn on_stepup_pin(
        &self,
        event: &DecryptedEvent,
        ev: &EventRef,
        challenge: Challenge,
        pin: Pin,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let exposed = self.store.profile(user)?.pin_compromised;
        if let Some(stopped) = after_pin::before_compare(ev, &challenge, exposed, now_ms) {
            return self.apply(stopped.finish(ev)).await;
        }
        let span = payment_span(TransferId(challenge.transfer_id));
        let result = self
            .check_pin(user, &event.event_id, pin, now_ms)
            .instrument(span.clone())
            .await?;
        let open = self.store.challenges(user)?;
        match after_pin::after_compare(ev, result, &open) {
            AfterCompare::Authorise => {
                let decision = self.authorise(ev, &challenge).instrument(span).await?;
                self.apply(decision.finish(ev)).await
            }
            AfterCompare::Refused(decision) => self.apply(decision.finish(ev)).await,
        }
    }

    /// The post of a payment whose PIN was right, as the ledger answers it.
    pub(super) async fn post_answer(
        &self,
        transfer_id: TransferId,
    ) -> Result<PostAnswer, PaymentsError> {
        let Some(pending) = self.ledger.transfer(transfer_id).await? else {
            return Ok(PostAnswer::Missing);
        };
        let payer_frozen = self
            .ledger
            .account(&pending.debit)
            .await?
            .is_some_and(|a| a.frozen.is_some());
        let payee_frozen_all = self
            .ledger
            .account(&pending.credit)
            .await?
            .is_some_and(|a| a.frozen == Some(crate::ledger::FreezeMode::All));
        if let Some(error) = after_pin::frozen_since_asked(payer_frozen, payee_frozen_all) {
            return Ok(PostAnswer::Refused(error));
        }
        match self.ledger.post(transfer_id, None).await {
            Ok(_) => {
                tracing::info!(transfer = %transfer_id, "payment confirmed with the PIN and posted");
                Ok(PostAnswer::Posted)
            }
            Err(LedgerError::Rejected(error)) => {
                let answer = PostAnswer::of_refusal(error);
                if let PostAnswer::Refused(error) = answer {
                    tracing::warn!(transfer = %transfer_id, %error, "payment refused by the ledger after the PIN; voided");
                }
                Ok(answer)
            }
            Err(e) => Err(e.into()),
        }
    }
}
