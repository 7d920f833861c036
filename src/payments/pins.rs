//! PIN-carrying events: where a PIN may be used (only the sender's private DM, encrypted),
//! removing it after reading, and which open challenge a PIN in the DM answers. A PIN seen
//! anywhere else is refused and, where it stays readable, marked exposed.

use super::{payment_span, pinlike, text, txn, Payments, PaymentsError};
use crate::crypto::DecryptedEvent;
use crate::events::ReceiptReason;
use crate::ledger::TransferId;
use crate::policy::pin::{Pin, PinError};
use crate::policy::trust::{self, TrustRefusal};
use crate::store::payments::{Challenge, ChallengeKind, Dialog, EventOutcome, UserProfile};
use ruma::{DeviceId, EventId, RoomId};
use tracing::Instrument as _;

/// How a PIN event says which challenge it answers.
#[derive(Debug, Default)]
struct PinAddress<'a> {
    /// `org.mxpay.stepup.response`'s `challenge_id`.
    challenge_id: Option<&'a str>,
    /// The event a plain PIN replies to (`m.relates_to.m.in_reply_to`), matched against each
    /// challenge's notice in the DM.
    reply_to: Option<&'a str>,
}

/// What a PIN event may confirm.
#[derive(Debug, PartialEq)]
enum PinTarget {
    /// Exactly this challenge.
    One(Challenge),
    /// A plain PIN while several challenges are open: the user must say which.
    Several(Vec<Challenge>),
    /// A plain PIN for the one open challenge, sent from another device than the one that
    /// asked for it (or the asking device is unknown): the user must answer that challenge by
    /// name, having seen its amount and payee (PSD2 dynamic linking).
    OtherDevice(Challenge),
    /// The PIN event is older than the step-up window, or older than every challenge it could
    /// answer (a late-decrypted or replayed PIN never confirms a later payment).
    TooOld,
    /// It names a challenge (by id or by reply) that is not open.
    Unknown,
    /// No challenge is open.
    NotWaiting,
}

impl Payments {
    /// A PIN-carrying event (any shape, see [`pinlike`]): used as an answer only in the
    /// sender's private DM; removed after reading. `Ok(false)` when it is left alone (chat
    /// outside the DM while the bot waits for no PIN from the sender).
    pub(super) async fn on_pin(
        &self,
        event: &DecryptedEvent,
        message: pinlike::PinMessage,
    ) -> Result<bool, PaymentsError> {
        let user = event.sender.as_str();
        let profile = self.store.profile(user)?;
        let mut in_dm = profile.dm_room.as_deref() == Some(event.room_id.as_str());
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
        message: pinlike::PinMessage,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        if self.store.is_done(event.event_id.as_str())? {
            return Ok(());
        }
        // Handled before up to the answer (which then failed to go out): say it again.
        if let Some(EventOutcome::DialogAnswered { reply }) =
            self.store.outcome(event.event_id.as_str())?
        {
            self.reply(event, &reply, "pin-dialog").await?;
            return self.done(event).await;
        }
        let pinlike::PinMessage {
            pin,
            challenge_id,
            reply_to,
            ..
        } = message;
        let Some(pin) = pin else {
            // A step-up response whose `pin` is not 4 digits: nothing to compare, no attempt.
            self.reply(
                event,
                "A PIN is exactly 4 digits. I removed your message and did not use it; send \
                 your PIN again.",
                "pin-malformed",
            )
            .await?;
            return self.done(event).await;
        };
        if !event.was_encrypted {
            self.on_plaintext_dm_pin(event, now_ms).await?;
            return self.done(event).await;
        }
        let facts = self.facts(event).await?;
        let dialog = self.store.dialog(user, now_ms)?;
        match trust::check(facts, self.trust_settings()) {
            Ok(()) => {}
            // The one answer taken from a changed identity: the PIN that accepts it (the
            // device itself is cross-signed by the new identity, or the check says so).
            Err(TrustRefusal::IdentityChanged)
                if matches!(dialog, Some(Dialog::AcceptIdentity { .. })) => {}
            Err(refusal) => {
                if refusal == TrustRefusal::IdentityChanged {
                    self.reply(
                        event,
                        "Your account's security keys changed, so I did not use this PIN for \
                         anything and removed your message.",
                        "pin-identity-changed",
                    )
                    .await?;
                    self.ask_to_accept_identity(event).await?;
                } else {
                    self.reply(event, &refusal.to_string(), "pin-untrusted")
                        .await?;
                }
                return self.done(event).await;
            }
        }
        if let Some(dialog) = dialog {
            self.on_dialog_pin(event, dialog, pin, now_ms).await?;
            return self.done(event).await;
        }
        let addressed = challenge_id.is_some() || reply_to.is_some();
        let mut open = Vec::new();
        for challenge in self.store.challenges(user)? {
            // Lapsed challenges are dropped here (their pending transfers expire in the ledger
            // and the outbox tells about that); one the PIN names is kept so the answer can
            // say it came too late.
            if challenge.expires_at_ms <= now_ms && !addressed {
                self.store.remove_challenge(&challenge).await?;
            } else {
                let notice = self.store.note(challenge.transfer_id)?.dm_event_id;
                open.push((challenge, notice));
            }
        }
        let address = PinAddress {
            challenge_id: challenge_id.as_deref(),
            reply_to: reply_to.as_deref(),
        };
        let target = choose_challenge(
            open,
            &address,
            event.sender_device.as_deref(),
            event.sent_ms(),
            now_ms,
            self.settings.stepup_timeout_ms,
        );
        match target {
            PinTarget::One(challenge) => self.on_stepup_pin(event, challenge, pin, now_ms).await?,
            PinTarget::Several(challenges) => {
                let lines: Vec<String> = challenges
                    .iter()
                    .map(|c| text::challenge_line(&c.amount, &c.currency, &c.payee, &c.room_id))
                    .collect();
                self.reply(event, &text::which_challenge(&lines), "pin-which")
                    .await?
            }
            PinTarget::OtherDevice(challenge) => {
                tracing::info!(
                    transfer = %TransferId(challenge.transfer_id),
                    "a plain PIN from another device than the payment's; not used"
                );
                let what = match challenge.kind {
                    ChallengeKind::Pay => text::challenge_name(
                        &challenge.amount,
                        &challenge.currency,
                        Some(&challenge.payee),
                    ),
                    ChallengeKind::Withdraw => {
                        text::challenge_name(&challenge.amount, &challenge.currency, None)
                    }
                };
                self.reply(
                    event,
                    &text::pin_from_other_device(&what),
                    "pin-other-device",
                )
                .await?
            }
            PinTarget::TooOld => {
                self.reply(
                    event,
                    "This PIN message is older than the step-up window or than the payment \
                     waiting for it, so I did not use it (it counts as no attempt) and removed \
                     it. To confirm, send your PIN again.",
                    "pin-too-old",
                )
                .await?
            }
            PinTarget::Unknown => {
                self.reply(
                    event,
                    "The payment you answered is no longer waiting for a PIN (it was paid, \
                     cancelled or expired), so I did not use your PIN. I removed your message.",
                    "pin-unknown",
                )
                .await?
            }
            PinTarget::NotWaiting => {
                self.reply(
                    event,
                    "I was not waiting for a PIN (no payment is waiting for your confirmation). \
                     I removed your message.",
                    "pin-unexpected",
                )
                .await?
            }
        }
        self.done(event).await
    }

    /// A PIN-carrying event outside the sender's private DM. A step-up response says it holds
    /// a PIN, so it is always refused and removed. A chat message that only looks like a PIN
    /// (`1990`, `2024`) counts as one only while the bot waits for a PIN from its sender (an
    /// open step-up or PIN dialog): then it is refused and removed, otherwise left alone
    /// (`Ok(false)`). It is never compared with the PIN (see docs/security.md: an argon2 per
    /// chat number, and an answer that would tell a session thief whether they guessed it
    /// without counting an attempt). Where the bot cannot remove it, or it was sent
    /// unencrypted, the PIN counts as exposed and is blocked until changed.
    async fn on_pin_outside_dm(
        &self,
        event: &DecryptedEvent,
        message: &pinlike::PinMessage,
        mut profile: UserProfile,
        now_ms: u64,
    ) -> Result<bool, PaymentsError> {
        let user = event.sender.as_str();
        if !message.declared && !self.waiting_for_pin(user, now_ms)? {
            return Ok(false); // just a number in a conversation
        }
        let has_pin = self.store.pin(user)?.is_some_and(|r| r.hash.is_some());
        let redacted = self
            .remove_pin_message(event, message.replaces.as_deref())
            .await?;
        // A PIN left standing, or sent unencrypted (the homeserver keeps a readable copy
        // whatever the redaction removes from clients), is known to others.
        let exposed = message.pin.is_some() && (!redacted || !event.was_encrypted);
        if exposed && has_pin {
            profile.pin_compromised = true;
            self.store.put_profile(user, &profile).await?;
        }
        let how = if redacted {
            "I removed your message, but it was sent unencrypted, so your homeserver kept a \
             readable copy"
        } else {
            "I cannot remove your message here"
        };
        let text = if !exposed && redacted {
            format!(
                "{user}: never send your PIN in a shared room; I removed your message and did \
                 not use it. Send PINs only in our private chat."
            )
        } else if !exposed {
            // A malformed `pin` field is not the PIN itself: nothing to block.
            format!(
                "{user}: never send your PIN in a shared room; I cannot remove your message \
                 here and did not use it. If it holds your PIN, change it with !pin change in \
                 our private chat."
            )
        } else if has_pin {
            format!(
                "{user}: never send your PIN in a shared room. {how}, so treat that PIN as \
                 known to others: it is blocked for payments until you change it with \
                 !pin change in our private chat."
            )
        } else {
            format!(
                "{user}: never send your PIN in a shared room. {how}, so treat those digits as \
                 known to others and do not choose them as your PIN."
            )
        };
        self.messenger
            .notice(
                &event.room_id,
                &text,
                None,
                txn("pin-in-group", event.event_id.as_str()),
            )
            .await?;
        Ok(true)
    }

    /// A PIN sent unencrypted in the DM (a client that ignored the room's encryption): the
    /// homeserver stored it readable, and a redaction does not undo that, so it is never used.
    /// A new PIN being chosen is dropped (the dialog asks for another one); otherwise the
    /// user's PIN counts as exposed and is blocked for payments until changed.
    async fn on_plaintext_dm_pin(
        &self,
        event: &DecryptedEvent,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        const UNENCRYPTED: &str = "This message reached me unencrypted (your client sent it \
            without end-to-end encryption), so your homeserver could read it. I removed it and \
            did not use it.";
        let text = match self.store.dialog(user, now_ms)? {
            Some(Dialog::NewPin { change, .. } | Dialog::ConfirmPin { change, .. }) => {
                let next = Dialog::NewPin {
                    expires_at_ms: now_ms + self.settings.pin_dialog_timeout_ms,
                    change,
                };
                self.store.put_dialog(user, Some(&next)).await?;
                format!(
                    "{UNENCRYPTED} Choose a different 4-digit PIN and send it from a session \
                     that encrypts."
                )
            }
            _ if self.store.pin(user)?.is_some_and(|r| r.hash.is_some()) => {
                let mut profile = self.store.profile(user)?;
                profile.pin_compromised = true;
                self.store.put_profile(user, &profile).await?;
                format!(
                    "{UNENCRYPTED} Treat your PIN as known: it is blocked for payments until \
                     you change it with !pin change, from a session that encrypts."
                )
            }
            _ => UNENCRYPTED.to_owned(),
        };
        tracing::warn!(room_id = %event.room_id, "a PIN arrived unencrypted in the private chat");
        self.reply(event, &text, "pin-plaintext").await
    }

    async fn on_stepup_pin(
        &self,
        event: &DecryptedEvent,
        challenge: Challenge,
        pin: Pin,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        if challenge.expires_at_ms <= now_ms {
            self.store.remove_challenge(&challenge).await?;
            return self
                .reply(
                    event,
                    "That payment waited too long for your PIN and was cancelled; nothing was \
                     paid. Ask again if you still want to pay.",
                    "stepup-late",
                )
                .await;
        }
        if self.store.profile(user)?.pin_compromised {
            return self
                .reply(
                    event,
                    "Your PIN was exposed (typed in a shared room or sent unencrypted): change \
                     it with !pin change before confirming payments.",
                    "stepup-compromised",
                )
                .await;
        }
        let span = payment_span(TransferId(challenge.transfer_id));
        match self
            .check_pin(user, &event.event_id, pin, now_ms)
            .instrument(span.clone())
            .await?
        {
            Ok(()) => self.authorise(event, &challenge).instrument(span).await,
            Err(PinError::Wrong { attempts_left }) => {
                self.reply(
                    event,
                    &format!(
                        "Wrong PIN. {attempts_left} attempt{} left before your PIN locks. \
                         Send it again to confirm.",
                        if attempts_left == 1 { "" } else { "s" }
                    ),
                    "stepup-wrong",
                )
                .await
            }
            Err(error @ PinError::Locked { .. }) => {
                self.reply(
                    event,
                    &format!(
                        "{}. The payment was cancelled.",
                        capitalise(&pin_error_sentence(&error))
                    ),
                    "stepup-locked",
                )
                .await?;
                self.cancel_challenges(user, ReceiptReason::PinLocked).await
            }
            Err(error) => {
                self.reply(event, &pin_error_sentence(&error), "stepup-error")
                    .await
            }
        }
    }
}

/// Decides which challenge a PIN event answers; no I/O. `open` pairs each open challenge
/// (lapsed ones included when the PIN names one) with its DM notice's event id; `sent_ms` is
/// the PIN event's `origin_server_ts`.
///
/// A plain PIN confirms only when exactly one challenge was open when it was sent, and only
/// when `pin_device` (the device that sent the PIN) is the device that asked for it: with
/// several, guessing (the oldest, say) would pay whoever asked first; from another device, the
/// PIN's sender may never have seen what it would confirm (someone with another of the
/// payer's sessions can `!cancel` and ask for another payment the moment the payer starts
/// one). In both cases the user is asked to answer the challenge by name. A PIN that names a
/// challenge (a reply to its notice, which shows amount and payee, or its `challenge_id`)
/// confirms exactly that one, from any of the payer's trusted devices.
fn choose_challenge(
    open: Vec<(Challenge, Option<String>)>,
    address: &PinAddress<'_>,
    pin_device: Option<&DeviceId>,
    sent_ms: u64,
    now_ms: u64,
    stepup_timeout_ms: u64,
) -> PinTarget {
    if sent_ms.saturating_add(stepup_timeout_ms) <= now_ms {
        return PinTarget::TooOld;
    }
    let named = if let Some(id) = address.challenge_id {
        Some(open.iter().find(|(c, _)| c.challenge_id() == id))
    } else {
        address.reply_to.map(|reply_to| {
            open.iter()
                .find(|(_, notice)| notice.as_deref() == Some(reply_to))
        })
    };
    if let Some(named) = named {
        return match named.map(|(c, _)| c.clone()) {
            Some(challenge) if challenge.created_ms > sent_ms => PinTarget::TooOld,
            Some(challenge) => PinTarget::One(challenge),
            None => PinTarget::Unknown,
        };
    }
    let live: Vec<Challenge> = open
        .into_iter()
        .map(|(c, _)| c)
        .filter(|c| c.expires_at_ms > now_ms)
        .collect();
    let any_live = !live.is_empty();
    let mut eligible: Vec<Challenge> = live
        .into_iter()
        .filter(|c| c.created_ms <= sent_ms)
        .collect();
    match eligible.len() {
        0 if any_live => PinTarget::TooOld,
        0 => PinTarget::NotWaiting,
        1 => {
            let challenge = eligible.remove(0);
            let same_device = pin_device.is_some() && challenge.device_id.as_deref() == pin_device;
            if same_device {
                PinTarget::One(challenge)
            } else {
                PinTarget::OtherDevice(challenge)
            }
        }
        _ => PinTarget::Several(eligible),
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The sentence for a PIN error (never names digits).
pub(super) fn pin_error_sentence(error: &PinError) -> String {
    match error {
        PinError::Wrong { attempts_left } => format!(
            "Wrong PIN. {attempts_left} attempt{} left before your PIN locks.",
            if *attempts_left == 1 { "" } else { "s" }
        ),
        other => format!("{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_challenge(id: u128, created_ms: u64) -> (Challenge, Option<String>) {
        let challenge = Challenge {
            kind: ChallengeKind::Pay,
            transfer_id: id,
            payer: "@alice:hs".into(),
            payee: format!("@payee{id}:hs"),
            amount_minor: 100 * id,
            amount: format!("{id}.00"),
            currency: "EUR".into(),
            room_id: "!room".into(),
            event_id: format!("$pay{id}"),
            memo: None,
            created_ms,
            expires_at_ms: created_ms + 120_000,
            device_id: Some(PHONE.into()),
        };
        (challenge, Some(format!("$notice{id}")))
    }

    fn chosen(target: PinTarget) -> Option<u128> {
        match target {
            PinTarget::One(c) => Some(c.transfer_id),
            _ => None,
        }
    }

    const TIMEOUT_MS: u64 = 120_000;
    /// The device the test challenges were asked from.
    const PHONE: &str = "PHONE";

    fn phone() -> Option<&'static DeviceId> {
        Some(<&DeviceId>::from(PHONE))
    }

    /// H1: a plain PIN with two payments open confirms neither (not the oldest).
    #[test]
    fn a_plain_pin_with_several_open_challenges_confirms_none() {
        let open = vec![open_challenge(1, 1_000), open_challenge(2, 2_000)];
        let target = choose_challenge(
            open,
            &PinAddress::default(),
            phone(),
            3_000,
            3_100,
            TIMEOUT_MS,
        );
        match target {
            PinTarget::Several(list) => {
                assert_eq!(
                    list.iter().map(|c| c.transfer_id).collect::<Vec<_>>(),
                    [1, 2]
                )
            }
            other => panic!("expected Several, got {other:?}"),
        }
        // With exactly one open, a plain PIN confirms it.
        let one = choose_challenge(
            vec![open_challenge(2, 2_000)],
            &PinAddress::default(),
            phone(),
            3_000,
            3_100,
            TIMEOUT_MS,
        );
        assert_eq!(chosen(one), Some(2));
        assert_eq!(
            choose_challenge(
                vec![],
                &PinAddress::default(),
                phone(),
                3_000,
                3_100,
                TIMEOUT_MS
            ),
            PinTarget::NotWaiting
        );
    }

    #[test]
    fn a_reply_or_a_challenge_id_picks_that_challenge() {
        let open = || vec![open_challenge(1, 1_000), open_challenge(2, 2_000)];
        let by_reply = PinAddress {
            challenge_id: None,
            reply_to: Some("$notice2"),
        };
        assert_eq!(
            chosen(choose_challenge(
                open(),
                &by_reply,
                phone(),
                3_000,
                3_100,
                TIMEOUT_MS
            )),
            Some(2)
        );
        let id = open_challenge(1, 0).0.challenge_id();
        let by_id = PinAddress {
            challenge_id: Some(&id),
            reply_to: Some("$notice2"),
        };
        assert_eq!(
            chosen(choose_challenge(
                open(),
                &by_id,
                phone(),
                3_000,
                3_100,
                TIMEOUT_MS
            )),
            Some(1),
            "challenge_id wins over a reply"
        );
        let gone = PinAddress {
            challenge_id: None,
            reply_to: Some("$notice9"),
        };
        assert_eq!(
            choose_challenge(open(), &gone, phone(), 3_000, 3_100, TIMEOUT_MS),
            PinTarget::Unknown
        );
    }

    /// PSD2 dynamic linking: a plain PIN confirms the one open payment only from the device
    /// that asked for it. From another device (someone with another of alice's sessions
    /// cancelled her payment and asked for their own), or when the asking device is unknown
    /// (a challenge stored before devices were recorded), the PIN must name the challenge; a
    /// reply to its notice then confirms exactly that one, whichever device sends it.
    #[test]
    fn a_plain_pin_confirms_only_a_payment_asked_from_the_same_device() {
        let laptop = Some(<&DeviceId>::from("LAPTOP"));
        let open = || vec![open_challenge(7, 1_000)];
        let plain = PinAddress::default();
        assert_eq!(
            chosen(choose_challenge(
                open(),
                &plain,
                phone(),
                3_000,
                3_100,
                TIMEOUT_MS
            )),
            Some(7)
        );
        match choose_challenge(open(), &plain, laptop, 3_000, 3_100, TIMEOUT_MS) {
            PinTarget::OtherDevice(c) => assert_eq!(c.transfer_id, 7),
            other => panic!("expected OtherDevice, got {other:?}"),
        }
        assert!(matches!(
            choose_challenge(open(), &plain, None, 3_000, 3_100, TIMEOUT_MS),
            PinTarget::OtherDevice(_)
        ));
        let unknown_device = vec![(
            Challenge {
                device_id: None,
                ..open_challenge(7, 1_000).0
            },
            Some("$notice7".to_owned()),
        )];
        assert!(matches!(
            choose_challenge(
                unknown_device.clone(),
                &plain,
                phone(),
                3_000,
                3_100,
                TIMEOUT_MS
            ),
            PinTarget::OtherDevice(_)
        ));
        let by_reply = PinAddress {
            challenge_id: None,
            reply_to: Some("$notice7"),
        };
        assert_eq!(
            chosen(choose_challenge(
                open(),
                &by_reply,
                laptop,
                3_000,
                3_100,
                TIMEOUT_MS
            )),
            Some(7)
        );
        assert_eq!(
            chosen(choose_challenge(
                unknown_device,
                &by_reply,
                phone(),
                3_000,
                3_100,
                TIMEOUT_MS
            )),
            Some(7)
        );
    }

    /// A PIN sent before a challenge existed never confirms it; a PIN older than the step-up
    /// window confirms nothing.
    #[test]
    fn old_pin_events_confirm_nothing_later() {
        // Sent at 1_500: only challenge 1 existed then, so it answers 1 even with 2 open now.
        let open = || vec![open_challenge(1, 1_000), open_challenge(2, 2_000)];
        assert_eq!(
            chosen(choose_challenge(
                open(),
                &PinAddress::default(),
                phone(),
                1_500,
                2_100,
                TIMEOUT_MS
            )),
            Some(1)
        );
        // Sent before both.
        assert_eq!(
            choose_challenge(
                open(),
                &PinAddress::default(),
                phone(),
                500,
                2_100,
                TIMEOUT_MS
            ),
            PinTarget::TooOld
        );
        // Naming a challenge created after the PIN was sent.
        let by_reply = PinAddress {
            challenge_id: None,
            reply_to: Some("$notice2"),
        };
        assert_eq!(
            choose_challenge(open(), &by_reply, phone(), 1_500, 2_100, TIMEOUT_MS),
            PinTarget::TooOld
        );
        // Older than the step-up window (a parked or late-delivered PIN).
        assert_eq!(
            choose_challenge(
                vec![open_challenge(1, 1_000)],
                &PinAddress::default(),
                phone(),
                1_500,
                1_500 + TIMEOUT_MS,
                TIMEOUT_MS
            ),
            PinTarget::TooOld
        );
    }

    #[test]
    fn pin_sentences_never_hold_digits_and_say_how_long() {
        let locked = pin_error_sentence(&PinError::Locked {
            remaining_ms: 60_000,
        });
        assert!(locked.contains("60 seconds"), "{locked}");
        assert!(
            pin_error_sentence(&PinError::Wrong { attempts_left: 1 }).contains("1 attempt left")
        );
        assert_eq!(capitalise("pin locked"), "Pin locked");
    }
}
