//! Opening a step-up challenge and telling the payer where to answer it (docs/payments.md,
//! "Your private chat with the bot" and "Pay someone"): the challenge goes to the payer's
//! private DM, the room where it was asked gets a pointer; `!cancel` ends every open one.

use ruma::{OwnedRoomId, UserId};

use super::after_pin::cancel_all;
use super::decision::{Decision, EventRef, Outgoing, Record};
use crate::events::{ReceiptReason, StepUpChallengeEventContent};
use crate::ledger::TransferId;
use crate::payments::text;
use crate::store::payments::{Challenge, ChallengeKind, Dialog, EventOutcome};

/// Where a user's private DM stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dm {
    /// Joined by both: messages can go there now.
    Ready(OwnedRoomId),
    /// The user is invited and has not joined yet.
    Invited(OwnedRoomId),
}

/// Whether a room is a private DM of `user`: exactly the user and the bot, both joined, nobody
/// else invited, encrypted, and joinable by invite only (a public or knockable room can gain
/// members between two checks). `members` pairs each member with their membership.
pub fn is_private_dm(
    join_rule: Option<&str>,
    members: &[(String, String)],
    encrypted: bool,
    user: &UserId,
    bot: &UserId,
) -> bool {
    if join_rule != Some("invite") || !encrypted {
        return false;
    }
    let present: Vec<&(String, String)> = members
        .iter()
        .filter(|(_, m)| m == "join" || m == "invite")
        .collect();
    present.len() == 2
        && present
            .iter()
            .all(|(u, m)| m == "join" && (u == user.as_str() || u == bot.as_str()))
}

/// Tells the user in the room they asked in where the answer went, when it is not the DM.
pub fn pointer(event: &EventRef, dm: &Dm, purpose: &'static str) -> Option<Outgoing> {
    let (dm_room, text) = match dm {
        Dm::Ready(room) => (
            room,
            format!("{}: I answered in our private chat.", event.sender),
        ),
        Dm::Invited(room) => (
            room,
            format!(
                "{}: I invited you to a private, encrypted chat with me; join it to continue.",
                event.sender
            ),
        ),
    };
    (dm_room != &event.room_id).then(|| {
        Outgoing::notice(
            &event.room_id,
            text,
            Some(&event.event_id),
            purpose,
            event.event_id.as_str(),
        )
    })
}

/// The challenge's message in the DM: one readable notice carrying the typed
/// `org.mxpay.stepup.challenge` (see [`crate::events::notice_carrying`]), whose event id is
/// remembered (a PIN replying to it names this challenge).
pub fn messages(
    dm_room: &OwnedRoomId,
    challenge: &Challenge,
    bot: &UserId,
    now_ms: u64,
) -> Vec<Outgoing> {
    let left_ms = challenge.expires_at_ms.saturating_sub(now_ms);
    let (body, payee) = match challenge.kind {
        ChallengeKind::Pay => (
            text::challenge_body(
                &challenge.amount,
                &challenge.currency,
                &challenge.payee,
                challenge.room_id.as_str(),
                left_ms,
            ),
            <&UserId>::try_from(challenge.payee.as_str())
                .unwrap_or(bot)
                .to_owned(),
        ),
        ChallengeKind::Withdraw => (
            text::withdraw_challenge_body(&challenge.amount, &challenge.currency, left_ms),
            bot.to_owned(),
        ),
    };
    let content = StepUpChallengeEventContent {
        body: body.clone(),
        challenge_id: challenge.challenge_id(),
        payee,
        amount: challenge.amount.parse().unwrap_or_default(),
        currency: challenge.currency.clone(),
        room_id: challenge.room_id.clone(),
        expires_at_ms: challenge.expires_at_ms,
        relates_to: None,
    };
    let key = format!("{}:{}", challenge.challenge_id(), dm_room);
    let mut notice = Outgoing::event(
        dm_room,
        "m.room.message",
        crate::events::notice_carrying(
            "org.mxpay.stepup.challenge",
            serde_json::to_value(&content).expect("challenge serialises"),
            None,
        ),
        "challenge-notice",
        key,
    );
    notice.remember_notice_of = Some(TransferId(challenge.transfer_id));
    vec![notice]
}

/// A payment reserved in the ledger waits for its PIN: the challenge is stored, the room is
/// told, the DM gets the challenge (or, while the payer has not joined the DM yet, the room
/// says where to go; the challenge follows when they join).
pub fn open_payment(
    event: &EventRef,
    challenge: Challenge,
    dm: &Dm,
    bot: &UserId,
    now_ms: u64,
) -> Decision {
    let mut decision = Decision::none()
        .then_store(Record::PutChallenge(challenge.clone()))
        .then_send(Outgoing::notice(
            &event.room_id,
            format!(
                "⏳ {}: confirm paying {} to {} with your PIN in our private chat.",
                event.sender,
                text::money(&challenge.amount, &challenge.currency),
                challenge.payee
            ),
            Some(&event.event_id),
            "pay-pending",
            event.event_id.as_str(),
        ));
    match dm {
        Dm::Ready(dm_room) => decision
            .sends
            .extend(messages(dm_room, &challenge, bot, now_ms)),
        Dm::Invited(_) => decision.sends.extend(pointer(event, dm, "pay-pointer")),
    }
    decision
}

/// A withdrawal waits for its PIN (nothing is reserved before the PIN): the challenge is
/// stored, then the event is recorded as started (a crash in between leaves the challenge
/// open, which also counts as started); the DM gets the challenge and the room a pointer.
pub fn open_withdrawal(
    event: &EventRef,
    challenge: Challenge,
    dm: &Dm,
    bot: &UserId,
    now_ms: u64,
) -> Decision {
    let mut decision = Decision::none()
        .then_store(Record::PutChallenge(challenge.clone()))
        .then_store(Record::Outcome {
            event_id: event.event_id.clone(),
            outcome: EventOutcome::Started,
        });
    if let Dm::Ready(dm_room) = dm {
        decision
            .sends
            .extend(messages(dm_room, &challenge, bot, now_ms));
    }
    decision
        .sends
        .extend(pointer(event, dm, "withdraw-pointer"));
    decision
}

/// The user joined the DM the bot invited them to: a welcome, then what waited for it (the
/// open dialog's prompt, each live challenge).
pub fn dm_joined(
    event: &EventRef,
    dialog: Option<&Dialog>,
    challenges: &[Challenge],
    bot: &UserId,
    now_ms: u64,
) -> Decision {
    let room = &event.room_id;
    let key = event.event_id.as_str();
    let mut decision = Decision::say(Outgoing::notice(
        room,
        "Welcome! This is your private chat with mxpay: PINs, balances and payment \
         confirmations happen here. Send !help for the commands.",
        None,
        "dm-welcome",
        key,
    ));
    if let Some(dialog) = dialog {
        decision.sends.push(Outgoing::notice(
            room,
            super::dialog::prompt(dialog),
            None,
            "dm-dialog",
            key,
        ));
    }
    for challenge in challenges.iter().filter(|c| c.expires_at_ms > now_ms) {
        decision
            .sends
            .extend(messages(room, challenge, bot, now_ms));
    }
    decision
}

/// `!cancel`: voids every payment of the sender still waiting for a PIN and drops their
/// withdrawal confirmations, then says what was cancelled in the DM (or, without one, where
/// it was asked). `all` are every stored challenge of the sender (lapsed ones are dropped
/// too, but only live ones are listed).
pub fn cancel(
    event: &EventRef,
    all: &[Challenge],
    dm: Option<&OwnedRoomId>,
    now_ms: u64,
) -> Decision {
    let live: Vec<&Challenge> = all.iter().filter(|c| c.expires_at_ms > now_ms).collect();
    let body = if live.is_empty() {
        "Nothing was waiting for your PIN, so there was nothing to cancel.".to_owned()
    } else {
        let lines: Vec<String> = live
            .iter()
            .map(|c| match c.kind {
                ChallengeKind::Pay => {
                    text::challenge_line(&c.amount, &c.currency, &c.payee, c.room_id.as_str())
                }
                ChallengeKind::Withdraw => {
                    format!("• withdrawal of {}", text::money(&c.amount, &c.currency))
                }
            })
            .collect();
        format!("Cancelled; nothing of it was paid:\n{}", lines.join("\n"))
    };
    let key = event.event_id.as_str();
    let mut decision = cancel_all(all, ReceiptReason::Other);
    match dm {
        Some(dm) => {
            let reply_to = (dm == &event.room_id).then_some(&event.event_id);
            decision
                .sends
                .push(Outgoing::notice(dm, body, reply_to, "cancel", key));
            if dm != &event.room_id {
                decision.sends.push(Outgoing::notice(
                    &event.room_id,
                    format!("{}: I answered in our private chat.", event.sender),
                    Some(&event.event_id),
                    "cancel-pointer",
                    key,
                ));
            }
        }
        None => decision.sends.push(Outgoing::notice(
            &event.room_id,
            body,
            Some(&event.event_id),
            "cancel",
            key,
        )),
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_event_id, owned_room_id, user_id};

    use crate::payments::core::fixtures::{challenge, event_in};

    fn event(room: &str) -> EventRef {
        event_in(room, "$ask")
    }

    const BOT: &str = "@mxpay:hs";

    #[test]
    fn a_payment_challenge_goes_to_a_ready_dm_and_the_room_is_told() {
        let dm = owned_room_id!("!dm:hs");
        let c = challenge(1, ChallengeKind::Pay, 120_000);
        let decision = open_payment(
            &event("!room:hs"),
            c.clone(),
            &Dm::Ready(dm.clone()),
            user_id!("@mxpay:hs"),
            0,
        );
        assert_eq!(decision.store, [Record::PutChallenge(c.clone())]);
        assert_eq!(decision.purposes(), ["pay-pending", "challenge-notice"]);
        assert_eq!(
            decision.texts()[0],
            "⏳ @alice:hs: confirm paying 12.50 EUR to @bob:hs with your PIN in our private chat."
        );
        // One message: people read its text, bots its typed payload.
        let notice = &decision.sends[1];
        assert_eq!(notice.room_id, dm);
        assert_eq!(notice.remember_notice_of, Some(TransferId(1)));
        let content = notice
            .payload("org.mxpay.stepup.challenge")
            .expect("typed challenge");
        assert_eq!(content["challenge_id"], c.challenge_id());
        assert_eq!(content["amount"], "12.50");
        assert!(
            notice.text().unwrap().contains("within 2 minutes"),
            "{:?}",
            notice.text()
        );
        // Not joined yet: a pointer; the challenge follows the join.
        let invited = open_payment(
            &event("!room:hs"),
            c.clone(),
            &Dm::Invited(dm.clone()),
            user_id!("@mxpay:hs"),
            0,
        );
        assert_eq!(invited.purposes(), ["pay-pending", "pay-pointer"]);
        let joined = dm_joined(
            &event("!dm:hs"),
            None,
            &[c, challenge(2, ChallengeKind::Pay, 10)],
            user_id!("@mxpay:hs"),
            50,
        );
        assert_eq!(
            joined.purposes(),
            ["dm-welcome", "challenge-notice"],
            "only live challenges follow"
        );
    }

    #[test]
    fn a_withdrawal_is_recorded_as_started_after_its_challenge() {
        let dm = owned_room_id!("!dm:hs");
        let c = challenge(3, ChallengeKind::Withdraw, 120_000);
        let decision = open_withdrawal(
            &event("!room:hs"),
            c.clone(),
            &Dm::Ready(dm),
            user_id!("@mxpay:hs"),
            0,
        );
        assert_eq!(
            decision.store,
            [
                Record::PutChallenge(c),
                Record::Outcome {
                    event_id: owned_event_id!("$ask"),
                    outcome: EventOutcome::Started
                }
            ]
        );
        assert_eq!(
            decision.purposes(),
            ["challenge-notice", "withdraw-pointer"]
        );
        let content = decision.sends[0]
            .payload("org.mxpay.stepup.challenge")
            .expect("typed challenge");
        assert_eq!(content["payee"], BOT);
    }

    /// PINs go only to a room with exactly the user and the bot, joined, encrypted, invite-only.
    #[test]
    fn what_counts_as_a_private_dm() {
        let alice = user_id!("@alice:hs");
        let bot = user_id!("@mxpay:hs");
        let m = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(u, m)| (u.to_string(), m.to_string()))
                .collect()
        };
        let two = m(&[("@alice:hs", "join"), ("@mxpay:hs", "join")]);
        assert!(is_private_dm(Some("invite"), &two, true, alice, bot));
        assert!(!is_private_dm(Some("public"), &two, true, alice, bot));
        assert!(!is_private_dm(Some("knock"), &two, true, alice, bot));
        assert!(!is_private_dm(None, &two, true, alice, bot));
        assert!(!is_private_dm(Some("invite"), &two, false, alice, bot));
        let invited = m(&[
            ("@alice:hs", "join"),
            ("@mxpay:hs", "join"),
            ("@eve:hs", "invite"),
        ]);
        assert!(!is_private_dm(Some("invite"), &invited, true, alice, bot));
        let left = m(&[
            ("@alice:hs", "join"),
            ("@mxpay:hs", "join"),
            ("@eve:hs", "leave"),
        ]);
        assert!(is_private_dm(Some("invite"), &left, true, alice, bot));
        let not_joined = m(&[("@alice:hs", "invite"), ("@mxpay:hs", "join")]);
        assert!(!is_private_dm(
            Some("invite"),
            &not_joined,
            true,
            alice,
            bot
        ));
        let other = m(&[("@bob:hs", "join"), ("@mxpay:hs", "join")]);
        assert!(!is_private_dm(Some("invite"), &other, true, alice, bot));
    }

    #[test]
    fn pointers_only_outside_the_dm() {
        let dm = owned_room_id!("!dm:hs");
        assert_eq!(pointer(&event("!dm:hs"), &Dm::Ready(dm.clone()), "p"), None);
        let ready = pointer(&event("!room:hs"), &Dm::Ready(dm.clone()), "p").unwrap();
        assert_eq!(
            ready.text(),
            Some("@alice:hs: I answered in our private chat.")
        );
        let invited = pointer(&event("!room:hs"), &Dm::Invited(dm), "p").unwrap();
        assert!(invited.text().unwrap().contains("join it to continue"));
    }

    #[test]
    fn cancel_voids_payments_drops_withdrawals_and_lists_the_live_ones() {
        let dm = owned_room_id!("!dm:hs");
        let all = [
            challenge(1, ChallengeKind::Pay, 100),
            challenge(2, ChallengeKind::Withdraw, 100),
            challenge(3, ChallengeKind::Pay, 10),
        ];
        let decision = cancel(&event("!room:hs"), &all, Some(&dm), 50);
        assert_eq!(
            decision.ledger.len(),
            2,
            "both payments voided, lapsed one too"
        );
        assert_eq!(decision.store.len(), 3);
        assert_eq!(decision.purposes(), ["cancel", "cancel-pointer"]);
        assert_eq!(
            decision.texts()[0],
            "Cancelled; nothing of it was paid:\n• 12.50 EUR to @bob:hs (asked in room !room:hs)\n• withdrawal of 12.50 EUR"
        );
        let none = cancel(&event("!room:hs"), &[], None, 50);
        assert_eq!(none.purposes(), ["cancel"]);
        assert_eq!(none.sends[0].room_id, owned_room_id!("!room:hs"));
        assert!(none.texts()[0].starts_with("Nothing was waiting"));
    }
}
