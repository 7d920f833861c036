//! Where a PIN may be used and which open challenge it answers (docs/payments.md, "Choose a
//! PIN", "What counts as a PIN message" and "Pay someone"): only in the sender's private DM,
//! encrypted, from a trusted session; a plain PIN confirms the one challenge asked from the
//! same device; a PIN older than the challenge or the step-up window confirms nothing.

use ruma::{DeviceId, OwnedRoomId, UserId};

use super::decision::{Decision, EventRef, Outgoing, Record};
use crate::policy::trust::TrustRefusal;
use crate::store::payments::{Challenge, ChallengeKind, Dialog};

use crate::payments::text;

/// How a PIN event says which challenge it answers.
#[derive(Debug, Default)]
pub struct PinAddress<'a> {
    /// `org.mxpay.stepup.response`'s `challenge_id`.
    pub challenge_id: Option<&'a str>,
    /// The event a plain PIN replies to (`m.relates_to.m.in_reply_to`), matched against each
    /// challenge's notice in the DM.
    pub reply_to: Option<&'a str>,
}

/// What a PIN event may confirm.
#[derive(Debug, PartialEq)]
pub enum PinTarget {
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
pub fn choose_challenge(
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

/// Splits the payer's challenges into those a PIN may answer (each with its DM notice's event
/// id) and lapsed ones to drop. Lapsed challenges are dropped (their reservations expire in
/// the ledger and the outbox tells about that), except when the PIN names one (`addressed`):
/// then it is kept so the answer can say it came too late.
pub fn sweep_lapsed(
    challenges: Vec<(Challenge, Option<String>)>,
    addressed: bool,
    now_ms: u64,
) -> (Vec<(Challenge, Option<String>)>, Vec<Record>) {
    let (lapsed, open): (Vec<_>, Vec<_>) = challenges
        .into_iter()
        .partition(|(c, _)| c.expires_at_ms <= now_ms && !addressed);
    let drops = lapsed
        .into_iter()
        .map(|(c, _)| Record::RemoveChallenge(c))
        .collect();
    (open, drops)
}

/// The answer to a PIN that confirms nothing (every target but [`PinTarget::One`]); the PIN
/// was not compared, so it counts as no attempt.
pub fn unused_pin_answer(event: &EventRef, target: &PinTarget) -> Option<Outgoing> {
    let (purpose, body) = match target {
        PinTarget::One(_) => return None,
        PinTarget::Several(challenges) => {
            let lines: Vec<String> = challenges
                .iter()
                .map(|c| text::challenge_line(&c.amount, &c.currency, &c.payee, c.room_id.as_str()))
                .collect();
            ("pin-which", text::which_challenge(&lines))
        }
        PinTarget::OtherDevice(challenge) => {
            let payee = (challenge.kind == ChallengeKind::Pay).then_some(challenge.payee.as_str());
            let what = text::challenge_name(&challenge.amount, &challenge.currency, payee);
            ("pin-other-device", text::pin_from_other_device(&what))
        }
        PinTarget::TooOld => (
            "pin-too-old",
            "This PIN message is older than the step-up window or than the payment waiting for \
             it, so I did not use it (it counts as no attempt) and removed it. To confirm, send \
             your PIN again."
                .to_owned(),
        ),
        PinTarget::Unknown => (
            "pin-unknown",
            "The payment you answered is no longer waiting for a PIN (it was paid, cancelled or \
             expired), so I did not use your PIN. I removed your message."
                .to_owned(),
        ),
        PinTarget::NotWaiting => (
            "pin-unexpected",
            "I was not waiting for a PIN (no payment is waiting for your confirmation). I \
             removed your message."
                .to_owned(),
        ),
    };
    Some(event.reply(body, purpose))
}

/// The answer to a step-up response whose `pin` is not 4 digits: nothing to compare, no
/// attempt.
pub fn malformed_pin(event: &EventRef) -> Decision {
    Decision::say(event.reply(
        "A PIN is exactly 4 digits. I removed your message and did not use it; send your PIN \
         again.",
        "pin-malformed",
    ))
    .finish(event)
}

/// The trust check of a PIN in the DM. `Ok` lets the PIN be used; a changed identity is let
/// through only for the dialog that accepts it.
pub fn pin_trust(
    event: &EventRef,
    trust: &Result<(), TrustRefusal>,
    dialog: Option<&Dialog>,
    accept_identity: impl FnOnce() -> Decision,
) -> Result<(), Decision> {
    match trust {
        Ok(()) => Ok(()),
        // The one answer taken from a changed identity: the PIN that accepts it.
        Err(TrustRefusal::IdentityChanged)
            if matches!(dialog, Some(Dialog::AcceptIdentity { .. })) =>
        {
            Ok(())
        }
        Err(TrustRefusal::IdentityChanged) => {
            let said = Decision::say(event.reply(
                "Your account's security keys changed, so I did not use this PIN for anything \
                 and removed your message.",
                "pin-identity-changed",
            ));
            Err(said.and(accept_identity()).finish(event))
        }
        Err(refusal) => {
            Err(Decision::say(event.reply(refusal.to_string(), "pin-untrusted")).finish(event))
        }
    }
}

/// Opens (or keeps) the dialog that accepts a changed identity with the user's PIN, and asks in
/// their DM. Nothing when they have no PIN (the operator can accept the keys: see `!pin set`).
#[allow(clippy::too_many_arguments)]
pub fn ask_to_accept_identity(
    user: &UserId,
    has_pin: bool,
    open_dialog: Option<&Dialog>,
    dm: Option<&OwnedRoomId>,
    key: &str,
    now_ms: u64,
    dialog_timeout_ms: u64,
) -> Decision {
    if !has_pin {
        return Decision::none();
    }
    let mut decision = Decision::none();
    let dialog = match open_dialog {
        Some(open @ Dialog::AcceptIdentity { .. }) => open.clone(),
        _ => {
            let dialog = Dialog::AcceptIdentity {
                expires_at_ms: now_ms + dialog_timeout_ms,
            };
            decision.store.push(Record::Dialog {
                user: user.to_owned(),
                next: Some(dialog.clone()),
            });
            dialog
        }
    };
    if let Some(dm) = dm {
        decision.sends.push(Outgoing::notice(
            dm,
            super::dialog::prompt(&dialog),
            None,
            "identity-prompt",
            key,
        ));
    }
    decision
}

/// Whether a PIN-like message outside the sender's DM is acted on: a step-up response says it
/// holds a PIN, so always; a chat message that only looks like one (`1990`, `2024`) only while
/// the bot waits for a PIN from its sender.
pub fn outside_dm_acts(declared: bool, waiting_for_pin: bool) -> bool {
    declared || waiting_for_pin
}

/// What a PIN outside the DM leads to, once the bot tried to remove it.
#[derive(Debug, Clone, Copy)]
pub struct OutsideDmFacts<'a> {
    /// The sender.
    pub user: &'a UserId,
    /// The message holds 4 digits (not a malformed `pin` field).
    pub carries_pin: bool,
    /// The sender has a PIN.
    pub has_pin: bool,
    /// The bot removed the message.
    pub redacted: bool,
    /// The message was encrypted.
    pub was_encrypted: bool,
}

/// A PIN outside the sender's DM is never compared (an argon2 per chat number, and an answer
/// that would tell a session thief whether they guessed without counting an attempt). Left
/// standing, or sent unencrypted (the homeserver keeps a readable copy whatever a redaction
/// removes), it counts as known to others, and the sender's PIN is blocked until changed.
pub fn outside_dm(event: &EventRef, facts: OutsideDmFacts<'_>) -> Decision {
    let user = facts.user;
    let exposed = facts.carries_pin && (!facts.redacted || !facts.was_encrypted);
    let how = if facts.redacted {
        "I removed your message, but it was sent unencrypted, so your homeserver kept a \
         readable copy"
    } else {
        "I cannot remove your message here"
    };
    let body = if !exposed && facts.redacted {
        format!(
            "{user}: never send your PIN in a shared room; I removed your message and did not \
             use it. Send PINs only in our private chat."
        )
    } else if !exposed {
        // A malformed `pin` field is not the PIN itself: nothing to block.
        format!(
            "{user}: never send your PIN in a shared room; I cannot remove your message here \
             and did not use it. If it holds your PIN, change it with !pin change in our \
             private chat."
        )
    } else if facts.has_pin {
        format!(
            "{user}: never send your PIN in a shared room. {how}, so treat that PIN as known to \
             others: it is blocked for payments until you change it with !pin change in our \
             private chat."
        )
    } else {
        format!(
            "{user}: never send your PIN in a shared room. {how}, so treat those digits as \
             known to others and do not choose them as your PIN."
        )
    };
    let mut decision = Decision::say(Outgoing::notice(
        &event.room_id,
        body,
        None,
        "pin-in-group",
        event.event_id.as_str(),
    ));
    if exposed && facts.has_pin {
        decision.record.push(Record::PinExposed {
            user: user.to_owned(),
        });
    }
    decision
}

/// A PIN sent unencrypted in the DM (a client that ignored the room's encryption): the
/// homeserver stored it readable, and a redaction does not undo that, so it is never used. A
/// new PIN being chosen is dropped (the dialog asks for another one); otherwise the user's PIN
/// counts as exposed and is blocked for payments until changed.
pub fn plaintext_in_dm(
    event: &EventRef,
    dialog: Option<&Dialog>,
    has_pin: bool,
    now_ms: u64,
    dialog_timeout_ms: u64,
) -> Decision {
    const UNENCRYPTED: &str = "This message reached me unencrypted (your client sent it \
        without end-to-end encryption), so your homeserver could read it. I removed it and did \
        not use it.";
    let mut decision = Decision::none();
    let body = match dialog {
        Some(Dialog::NewPin { change, .. } | Dialog::ConfirmPin { change, .. }) => {
            decision.store.push(Record::Dialog {
                user: event.sender.clone(),
                next: Some(Dialog::NewPin {
                    expires_at_ms: now_ms + dialog_timeout_ms,
                    change: *change,
                }),
            });
            format!(
                "{UNENCRYPTED} Choose a different 4-digit PIN and send it from a session that \
                 encrypts."
            )
        }
        _ if has_pin => {
            decision.record.push(Record::PinExposed {
                user: event.sender.clone(),
            });
            format!(
                "{UNENCRYPTED} Treat your PIN as known: it is blocked for payments until you \
                 change it with !pin change, from a session that encrypts."
            )
        }
        _ => UNENCRYPTED.to_owned(),
    };
    decision
        .then_send(event.reply(body, "pin-plaintext"))
        .finish(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_event_id, owned_room_id, owned_user_id};

    fn open_challenge(id: u128, created_ms: u64) -> (Challenge, Option<String>) {
        let challenge = Challenge {
            kind: ChallengeKind::Pay,
            transfer_id: id,
            payer: "@alice:hs".try_into().unwrap(),
            payee: format!("@payee{id}:hs"),
            amount_minor: 100 * id,
            amount: format!("{id}.00"),
            currency: "EUR".into(),
            room_id: "!room:hs".try_into().unwrap(),
            event_id: format!("$pay{id}").try_into().unwrap(),
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

    fn event() -> EventRef {
        EventRef {
            room_id: owned_room_id!("!dm:hs"),
            event_id: owned_event_id!("$pin"),
            sender: owned_user_id!("@alice:hs"),
        }
    }

    fn exposes(decision: &Decision) -> bool {
        decision
            .record
            .iter()
            .any(|r| matches!(r, Record::PinExposed { .. }))
    }

    /// PINs outside the DM: a chat number is left alone unless a PIN is awaited; a PIN left
    /// readable (not removed, or sent unencrypted) blocks the sender's PIN, if they have one.
    #[test]
    fn pins_outside_the_dm() {
        assert!(
            !outside_dm_acts(false, false),
            "just a number in a conversation"
        );
        assert!(outside_dm_acts(false, true));
        assert!(
            outside_dm_acts(true, false),
            "a step-up response always holds a PIN"
        );
        let alice = owned_user_id!("@alice:hs");
        let facts = |carries_pin, has_pin, redacted, was_encrypted| OutsideDmFacts {
            user: &alice,
            carries_pin,
            has_pin,
            redacted,
            was_encrypted,
        };
        // (facts, blocks the PIN, start of the sentence after the name)
        let table = [
            (facts(true, true, true, true), false, "never send your PIN in a shared room; I removed"),
            (facts(true, true, false, true), true, "never send your PIN in a shared room. I cannot remove"),
            (facts(true, true, true, false), true, "never send your PIN in a shared room. I removed your message, but it was sent unencrypted"),
            (facts(true, false, false, true), false, "never send your PIN in a shared room. I cannot remove your message here, so treat those digits"),
            (facts(false, true, false, true), false, "never send your PIN in a shared room; I cannot remove your message here and did not use it. If it holds"),
        ];
        for (row, (facts, blocks, starts)) in table.into_iter().enumerate() {
            let decision = outside_dm(&event(), facts);
            assert_eq!(exposes(&decision), blocks, "row {row}");
            let text = decision.texts()[0];
            assert!(
                text.starts_with(&format!("@alice:hs: {starts}")),
                "row {row}: {text}"
            );
            assert_eq!(decision.purposes(), ["pin-in-group"]);
        }
    }

    /// A PIN sent unencrypted in the DM is never used: a new PIN being chosen is dropped, an
    /// existing PIN is blocked.
    #[test]
    fn unencrypted_pins_in_the_dm() {
        let choosing = Dialog::NewPin {
            expires_at_ms: 5,
            change: true,
        };
        let dropped = plaintext_in_dm(&event(), Some(&choosing), true, 1_000, 60_000);
        assert!(!exposes(&dropped));
        assert_eq!(
            dropped.store,
            [Record::Dialog {
                user: owned_user_id!("@alice:hs"),
                next: Some(Dialog::NewPin {
                    expires_at_ms: 61_000,
                    change: true
                })
            }]
        );
        assert!(dropped.texts()[0]
            .ends_with("Choose a different 4-digit PIN and send it from a session that encrypts."));
        let blocked = plaintext_in_dm(&event(), None, true, 1_000, 60_000);
        assert!(exposes(&blocked));
        let nothing = plaintext_in_dm(&event(), None, false, 1_000, 60_000);
        assert!(!exposes(&nothing) && nothing.store.is_empty());
        assert_eq!(nothing.finish, Some(owned_event_id!("$pin")));
    }

    /// Identity changes: a PIN from a changed identity is used only by the dialog accepting
    /// it; otherwise it is refused and the dialog is opened (with the prompt in the DM).
    #[test]
    fn pins_from_a_changed_identity() {
        let accept = Dialog::AcceptIdentity { expires_at_ms: 9 };
        assert_eq!(pin_trust(&event(), &Ok(()), None, Decision::none), Ok(()));
        assert_eq!(
            pin_trust(
                &event(),
                &Err(TrustRefusal::IdentityChanged),
                Some(&accept),
                Decision::none
            ),
            Ok(())
        );
        let dm = owned_room_id!("!dm:hs");
        let alice = owned_user_id!("@alice:hs");
        let refused = pin_trust(&event(), &Err(TrustRefusal::IdentityChanged), None, || {
            ask_to_accept_identity(&alice, true, None, Some(&dm), "$pin", 1_000, 60_000)
        })
        .unwrap_err();
        assert_eq!(
            refused.purposes(),
            ["pin-identity-changed", "identity-prompt"]
        );
        assert_eq!(
            refused.store,
            [Record::Dialog {
                user: alice.clone(),
                next: Some(Dialog::AcceptIdentity {
                    expires_at_ms: 61_000
                })
            }]
        );
        // Asked again while open: the same dialog, no new record.
        let again = ask_to_accept_identity(&alice, true, Some(&accept), Some(&dm), "$x", 1, 1);
        assert!(again.store.is_empty());
        assert_eq!(again.purposes(), ["identity-prompt"]);
        // Without a PIN nothing can accept the keys (the operator can).
        assert_eq!(
            ask_to_accept_identity(&alice, false, None, Some(&dm), "$x", 1, 1),
            Decision::none()
        );
        let untrusted = pin_trust(&event(), &Err(TrustRefusal::UntrustedDevice), None, || {
            unreachable!("only a changed identity opens the dialog")
        })
        .unwrap_err();
        assert_eq!(untrusted.purposes(), ["pin-untrusted"]);
    }

    /// Expiry: lapsed challenges are dropped when a plain PIN arrives, kept when a PIN names
    /// one (so the answer can say it came too late).
    #[test]
    fn lapsed_challenges_are_swept_unless_named() {
        let open = || vec![open_challenge(1, 1_000), open_challenge(2, 200_000)];
        let now_ms = 150_000;
        let (kept, dropped) = sweep_lapsed(open(), false, now_ms);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0.transfer_id, 2);
        assert_eq!(dropped, [Record::RemoveChallenge(open()[0].0.clone())]);
        let (kept, dropped) = sweep_lapsed(open(), true, now_ms);
        assert_eq!(kept.len(), 2);
        assert!(dropped.is_empty());
    }

    #[test]
    fn a_pin_that_confirms_nothing_says_why() {
        let purposes: Vec<_> = [
            PinTarget::Several(vec![open_challenge(1, 0).0, open_challenge(2, 0).0]),
            PinTarget::OtherDevice(open_challenge(1, 0).0),
            PinTarget::TooOld,
            PinTarget::Unknown,
            PinTarget::NotWaiting,
        ]
        .iter()
        .map(|t| unused_pin_answer(&event(), t).expect("answered").purpose)
        .collect();
        assert_eq!(
            purposes,
            [
                "pin-which",
                "pin-other-device",
                "pin-too-old",
                "pin-unknown",
                "pin-unexpected"
            ]
        );
        assert_eq!(
            unused_pin_answer(&event(), &PinTarget::One(open_challenge(1, 0).0)),
            None
        );
        assert_eq!(malformed_pin(&event()).purposes(), ["pin-malformed"]);
    }
}
