//! What a PIN answering a challenge leads to (docs/payments.md, "Pay someone" and "When the
//! bot says no"): a lapsed challenge or an exposed PIN stops before the comparison; a wrong
//! PIN says how many attempts are left; a locked PIN cancels every payment waiting; a right
//! one moves the money, and the ledger's answer to that says what the payer is told.

use super::decision::{Decision, EventRef, LedgerOp, Record};
use super::refusal;
use crate::events::ReceiptReason;
use crate::ledger::{TransferError, TransferId};
use crate::policy::pin::PinError;
use crate::store::payments::{Challenge, ChallengeKind};

/// Before comparing: a lapsed challenge, or a PIN known to others, confirms nothing (and the
/// comparison is not made, so no attempt is counted).
pub fn before_compare(
    event: &EventRef,
    challenge: &Challenge,
    pin_exposed: bool,
    now_ms: u64,
) -> Option<Decision> {
    if challenge.expires_at_ms <= now_ms {
        return Some(
            Decision::say(event.reply(
                "That payment waited too long for your PIN and was cancelled; nothing was \
                 paid. Ask again if you still want to pay.",
                "stepup-late",
            ))
            .then_store(Record::RemoveChallenge(challenge.clone())),
        );
    }
    pin_exposed.then(|| {
        Decision::say(event.reply(
            "Your PIN was exposed (typed in a shared room or sent unencrypted): change it with \
             !pin change before confirming payments.",
            "stepup-compromised",
        ))
    })
}

/// What a PIN comparison for a challenge leads to.
#[derive(Debug, PartialEq)]
pub enum AfterCompare {
    /// The PIN was right: move the money for this challenge.
    Authorise,
    /// It was not: say so (and what else follows).
    Refused(Decision),
}

/// The comparison's result for `challenge`; `open` are all of the payer's open challenges
/// (a locked PIN cancels each).
pub fn after_compare(
    event: &EventRef,
    result: Result<(), PinError>,
    open: &[Challenge],
) -> AfterCompare {
    match result {
        Ok(()) => AfterCompare::Authorise,
        Err(PinError::Wrong { attempts_left }) => {
            AfterCompare::Refused(Decision::say(event.reply(
                format!(
                    "Wrong PIN. {attempts_left} attempt{} left before your PIN locks. Send it \
                     again to confirm.",
                    if attempts_left == 1 { "" } else { "s" }
                ),
                "stepup-wrong",
            )))
        }
        Err(error @ PinError::Locked { .. }) => AfterCompare::Refused(
            cancel_all(open, ReceiptReason::PinLocked).then_send(event.reply(
                format!(
                    "{}. The payment was cancelled.",
                    capitalise(&pin_error_sentence(&error))
                ),
                "stepup-locked",
            )),
        ),
        Err(error) => AfterCompare::Refused(Decision::say(
            event.reply(pin_error_sentence(&error), "stepup-error"),
        )),
    }
}

/// Cancels every challenge in `open`: each payment's reservation is voided (its receipt says
/// `reason`), each withdrawal confirmation dropped.
pub fn cancel_all(open: &[Challenge], reason: ReceiptReason) -> Decision {
    let mut decision = Decision::none();
    for challenge in open {
        if challenge.kind == ChallengeKind::Pay {
            let transfer_id = TransferId(challenge.transfer_id);
            decision.record.push(Record::VoidReason {
                transfer_id,
                reason,
            });
            decision.ledger.push(LedgerOp::Void(transfer_id));
        }
        decision
            .store
            .push(Record::RemoveChallenge(challenge.clone()));
    }
    decision.poke_outbox = true;
    decision
}

/// The ledger's answer to posting a payment whose PIN was right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostAnswer {
    /// Posted: the outbox sends the receipts.
    Posted,
    /// The reservation is gone from the ledger.
    Missing,
    /// It expired before the PIN arrived.
    Expired,
    /// It ended otherwise meanwhile (cancelled, or posted and told already).
    Ended,
    /// Refused for good (a wallet frozen meanwhile, ...).
    Refused(TransferError),
}

impl PostAnswer {
    /// The answer for a ledger refusal of the post.
    pub fn of_refusal(error: TransferError) -> Self {
        match error {
            TransferError::PendingTransferExpired => Self::Expired,
            TransferError::PendingTransferAlreadyVoided
            | TransferError::PendingTransferAlreadyPosted
            | TransferError::PendingTransferNotPending
            | TransferError::PendingTransferNotFound => Self::Ended,
            other => Self::Refused(other),
        }
    }
}

/// The ledger lets a reservation made before a freeze be posted (so paid-out withdrawals can
/// settle); a payment still waiting for its PIN is different: a wallet frozen meanwhile stops
/// it before the post.
pub fn frozen_since_asked(payer_frozen: bool, payee_frozen_all: bool) -> Option<TransferError> {
    if payer_frozen {
        Some(TransferError::DebitAccountFrozen)
    } else if payee_frozen_all {
        Some(TransferError::CreditAccountFrozen)
    } else {
        None
    }
}

/// What the payer is told after the post. The challenge stays open until here, so a PIN event
/// handled again after a retryable failure finds it again.
pub fn after_post(event: &EventRef, challenge: &Challenge, answer: PostAnswer) -> Decision {
    let remove = Record::RemoveChallenge(challenge.clone());
    let mut decision = match answer {
        PostAnswer::Posted | PostAnswer::Missing => Decision::none(),
        PostAnswer::Expired => Decision::say(event.reply(
            "Too late: that payment expired before your PIN arrived; nothing was paid.",
            "stepup-expired",
        )),
        PostAnswer::Ended => Decision::say(event.reply(
            "That payment is no longer waiting for a PIN; I did not use yours for anything \
             else.",
            "stepup-ended",
        )),
        PostAnswer::Refused(error) => {
            // Released now, so the receipt says why instead of "expired without a PIN" later.
            let transfer_id = TransferId(challenge.transfer_id);
            Decision {
                record: vec![Record::VoidReason {
                    transfer_id,
                    reason: refusal::reason_for(error),
                }],
                ledger: vec![LedgerOp::Void(transfer_id)],
                ..Decision::none()
            }
            .then_send(event.reply(
                format!(
                    "The payment could not be completed: {}. Nothing was paid and the reserved \
                     amount is back in your wallet.",
                    refusal::ledger_sentence(error)
                ),
                "stepup-refused",
            ))
        }
    };
    decision.store.push(remove);
    decision.poke_outbox = answer != PostAnswer::Missing;
    decision
}

/// What the payer is told after a withdrawal's reservation was asked for (`Err`: refused; a
/// refused create made no transfer, so there is nothing to void).
pub fn after_withdrawal(
    event: &EventRef,
    challenge: &Challenge,
    created: Result<(), TransferError>,
) -> Decision {
    let remove = Record::RemoveChallenge(challenge.clone());
    match created {
        Ok(()) => Decision {
            poke_outbox: true,
            ..Decision::none()
        }
        .then_store(remove),
        Err(error) => Decision::say(event.reply(
            format!(
                "The withdrawal was refused: {}.",
                refusal::ledger_sentence(error)
            ),
            "withdraw-refused",
        ))
        .then_store(remove),
    }
}

/// Upper-cases the first letter.
pub fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The sentence for a PIN error (never names digits).
pub fn pin_error_sentence(error: &PinError) -> String {
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

    use crate::payments::core::fixtures::{challenge, event_in};

    fn event() -> EventRef {
        event_in("!dm:hs", "$pin")
    }

    #[test]
    fn a_lapsed_challenge_or_an_exposed_pin_stops_before_the_comparison() {
        let c = challenge(1, ChallengeKind::Pay, 10_000);
        assert_eq!(before_compare(&event(), &c, false, 9_999), None);
        let late = before_compare(&event(), &c, false, 10_000).expect("lapsed at expiry");
        assert_eq!(late.purposes(), ["stepup-late"]);
        assert_eq!(late.store, [Record::RemoveChallenge(c.clone())]);
        let exposed = before_compare(&event(), &c, true, 1).expect("exposed");
        assert_eq!(exposed.purposes(), ["stepup-compromised"]);
        assert!(
            exposed.store.is_empty(),
            "the challenge stays for a new PIN"
        );
    }

    /// PIN lockout: a wrong PIN tells the attempts left; the locking one cancels every
    /// waiting payment (voided with `pin_locked`) and drops withdrawal confirmations.
    #[test]
    fn wrong_and_locking_pins() {
        let open = [
            challenge(1, ChallengeKind::Pay, 10_000),
            challenge(2, ChallengeKind::Withdraw, 10_000),
        ];
        assert_eq!(
            after_compare(&event(), Ok(()), &open),
            AfterCompare::Authorise
        );
        let AfterCompare::Refused(wrong) =
            after_compare(&event(), Err(PinError::Wrong { attempts_left: 1 }), &open)
        else {
            panic!("a wrong PIN refuses")
        };
        assert_eq!(
            wrong.texts(),
            ["Wrong PIN. 1 attempt left before your PIN locks. Send it again to confirm."]
        );
        assert!(wrong.ledger.is_empty() && wrong.store.is_empty());
        let AfterCompare::Refused(locked) = after_compare(
            &event(),
            Err(PinError::Locked {
                remaining_ms: 300_000,
            }),
            &open,
        ) else {
            panic!("a locked PIN refuses")
        };
        assert_eq!(locked.ledger, [LedgerOp::Void(TransferId(1))]);
        assert_eq!(
            locked.record,
            [Record::VoidReason {
                transfer_id: TransferId(1),
                reason: ReceiptReason::PinLocked
            }]
        );
        assert_eq!(locked.store.len(), 2, "both challenges dropped");
        assert!(locked.poke_outbox);
        assert_eq!(locked.purposes(), ["stepup-locked"]);
        assert!(
            locked.texts()[0].starts_with("PIN locked after too many wrong attempts; try again in 5 minutes. The payment was cancelled."),
            "{}",
            locked.texts()[0]
        );
    }

    /// Expiry and other endings: what the ledger answers to the post decides the answer.
    #[test]
    fn the_ledger_answer_to_the_post_decides_what_is_said() {
        let c = challenge(7, ChallengeKind::Pay, 10_000);
        let table = [
            (PostAnswer::Posted, vec![], false, true),
            (PostAnswer::Missing, vec![], false, false),
            (
                PostAnswer::of_refusal(TransferError::PendingTransferExpired),
                vec!["stepup-expired"],
                false,
                true,
            ),
            (
                PostAnswer::of_refusal(TransferError::PendingTransferAlreadyVoided),
                vec!["stepup-ended"],
                false,
                true,
            ),
            (
                PostAnswer::of_refusal(TransferError::DebitAccountFrozen),
                vec!["stepup-refused"],
                true,
                true,
            ),
        ];
        for (answer, purposes, voids, pokes) in table {
            let decision = after_post(&event(), &c, answer);
            assert_eq!(decision.purposes(), purposes, "{answer:?}");
            assert_eq!(!decision.ledger.is_empty(), voids, "{answer:?}");
            assert_eq!(decision.poke_outbox, pokes, "{answer:?}");
            assert_eq!(
                decision.store,
                [Record::RemoveChallenge(c.clone())],
                "{answer:?}"
            );
        }
        let refused = after_post(
            &event(),
            &c,
            PostAnswer::Refused(TransferError::CreditAccountFrozen),
        );
        assert_eq!(
            refused.record,
            [Record::VoidReason {
                transfer_id: TransferId(7),
                reason: ReceiptReason::PayeeNotAllowed
            }]
        );
        assert!(refused.texts()[0].contains("the payee's wallet is frozen"));
        assert_eq!(
            frozen_since_asked(true, true),
            Some(TransferError::DebitAccountFrozen)
        );
        assert_eq!(
            frozen_since_asked(false, true),
            Some(TransferError::CreditAccountFrozen)
        );
        assert_eq!(frozen_since_asked(false, false), None);
    }

    #[test]
    fn a_refused_withdrawal_says_why_and_voids_nothing() {
        let c = challenge(9, ChallengeKind::Withdraw, 10_000);
        let refused = after_withdrawal(&event(), &c, Err(TransferError::InsufficientFunds));
        assert!(refused.ledger.is_empty());
        assert_eq!(
            refused.texts(),
            ["The withdrawal was refused: your balance does not cover this payment."]
        );
        let made = after_withdrawal(&event(), &c, Ok(()));
        assert!(made.sends.is_empty() && made.poke_outbox);
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
