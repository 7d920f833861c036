//! Who may start a payment or a withdrawal: the refusal table of docs/payments.md ("When the
//! bot says no"), checked in precedence order. The first refusal that applies is the one the
//! payer is told, with its receipt reason code.

use ruma::UserId;

use crate::events::ReceiptReason;
use crate::ledger::TransferError;
use crate::policy::pin::human_duration;
use crate::policy::trust::TrustRefusal;
use crate::requests::RequestRefusal;

/// A refusal: the receipt's reason code and the sentence the payer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The reason code on the declined receipt.
    pub reason: ReceiptReason,
    /// What the payer is told (after their name).
    pub sentence: String,
}

impl Refusal {
    fn new(reason: ReceiptReason, sentence: impl Into<String>) -> Self {
        Self {
            reason,
            sentence: sentence.into(),
        }
    }
}

/// What the checks of the payer need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayerFacts {
    /// The trust check of the asking event (encrypted, from a cross-signed device, identity
    /// unchanged).
    pub trust: Result<(), TrustRefusal>,
    /// The payer has a PIN.
    pub has_pin: bool,
    /// The payer's PIN was seen where others could read it.
    pub pin_exposed: bool,
    /// The payer's PIN is locked until then (ms since epoch), if it is.
    pub pin_locked_until_ms: Option<u64>,
}

/// A refusal of the payer, and whether their DM should ask them to accept changed keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayerRefusal {
    /// What they are told.
    pub refusal: Refusal,
    /// Their identity changed and they have a PIN that can accept it: ask in the DM.
    pub ask_to_accept_identity: bool,
}

/// The checks that apply to every outgoing payment and withdrawal: trust, then PIN state.
/// A changed identity without a PIN passes the trust step: nothing could confirm the new keys,
/// and the "no PIN" refusal sends the user to `!pin set`, which accepts them.
pub fn payer(facts: &PayerFacts, now_ms: u64) -> Result<(), PayerRefusal> {
    match &facts.trust {
        Ok(()) => {}
        Err(TrustRefusal::IdentityChanged) if !facts.has_pin => {}
        Err(refusal) => {
            return Err(PayerRefusal {
                refusal: Refusal::new(refusal.reason(), refusal.to_string()),
                ask_to_accept_identity: *refusal == TrustRefusal::IdentityChanged,
            })
        }
    }
    let refused = |reason, sentence: String| {
        Err(PayerRefusal {
            refusal: Refusal::new(reason, sentence),
            ask_to_accept_identity: false,
        })
    };
    if !facts.has_pin {
        return refused(
            ReceiptReason::PinNotSet,
            "you have no PIN yet: send !pin set in our private chat first".to_owned(),
        );
    }
    if facts.pin_exposed {
        return refused(
            ReceiptReason::PinLocked,
            "your PIN was exposed; change it with !pin change in our private chat first".to_owned(),
        );
    }
    match facts.pin_locked_until_ms {
        Some(until_ms) if now_ms < until_ms => refused(
            ReceiptReason::PinLocked,
            format!(
                "your PIN is locked after too many wrong attempts; try again in {}",
                human_duration(until_ms - now_ms)
            ),
        ),
        _ => Ok(()),
    }
}

/// At most `pending_max` payments and withdrawals may wait for one user's PIN; `waiting` wait
/// now.
pub fn too_many_waiting(waiting: usize, pending_max: u32) -> Option<Refusal> {
    (waiting >= pending_max as usize).then(|| {
        Refusal::new(
            ReceiptReason::TooManyPending,
            format!(
                "you already have {waiting} payments waiting for your PIN (at most \
                 {pending_max}); confirm them, or send !cancel, first"
            ),
        )
    })
}

/// The refusal of a payment command over the per-minute bound.
pub fn rate_limited(per_minute_max: u32) -> Refusal {
    Refusal::new(
        ReceiptReason::RateLimited,
        format!(
            "you started more than {per_minute_max} payments in the last minute; wait a minute \
             and send it again"
        ),
    )
}

/// What the checks of the payee need to know.
#[derive(Debug, Clone, Copy)]
pub struct PayeeFacts<'a> {
    /// Who pays.
    pub payer: &'a UserId,
    /// Who would be paid.
    pub payee: &'a UserId,
    /// The bot itself.
    pub bot: &'a UserId,
    /// `payments.wallet_holders` allows the payee a wallet.
    pub may_hold_wallet: bool,
    /// The payee is a joined member of the room the payment was asked in.
    pub joined_room: bool,
}

/// The payee checks: not oneself or the bot, allowed a wallet, in the room.
pub fn payee(facts: PayeeFacts<'_>) -> Option<Refusal> {
    let payee = facts.payee;
    if payee == facts.payer || payee == facts.bot {
        return Some(Refusal::new(
            ReceiptReason::PayeeNotAllowed,
            "you cannot pay yourself or the bot",
        ));
    }
    if !facts.may_hold_wallet {
        return Some(Refusal::new(
            ReceiptReason::PayeeNotAllowed,
            format!("{payee} may not hold a wallet on this service"),
        ));
    }
    if !facts.joined_room {
        return Some(Refusal::new(
            ReceiptReason::PayeeNotAllowed,
            format!("{payee} is not a member of this room"),
        ));
    }
    None
}

/// An amount the ledger cannot take (unknown currency, too many decimals, not positive).
pub fn invalid_amount(error: impl std::fmt::Display) -> Refusal {
    Refusal::new(ReceiptReason::InvalidAmount, error.to_string())
}

/// The refusal for a ledger refusal.
pub fn ledger(error: TransferError) -> Refusal {
    Refusal::new(reason_for(error), ledger_sentence(error))
}

/// The receipt reason for a ledger refusal.
pub fn reason_for(error: TransferError) -> ReceiptReason {
    match error {
        TransferError::InsufficientFunds => ReceiptReason::InsufficientFunds,
        TransferError::ExceedsDailyLimit | TransferError::ExceedsMaxTransfer => {
            ReceiptReason::LimitExceeded
        }
        TransferError::DebitAccountFrozen => ReceiptReason::AccountFrozen,
        TransferError::CreditAccountFrozen => ReceiptReason::PayeeNotAllowed,
        TransferError::CurrencyUnknown => ReceiptReason::InvalidAmount,
        // A refund the ledger refused (a race with another refund of the same payment).
        TransferError::RefundExceedsRemaining => ReceiptReason::RefundAboveRemaining,
        TransferError::OriginalTransferIsRefund => ReceiptReason::RefundOfRefund,
        TransferError::OriginalTransferNotRefundable => ReceiptReason::RefundNotCompleted,
        _ => ReceiptReason::Other,
    }
}

/// The sentence for a ledger refusal.
pub fn ledger_sentence(error: TransferError) -> String {
    match error {
        TransferError::InsufficientFunds => "your balance does not cover this payment".to_owned(),
        TransferError::ExceedsDailyLimit => {
            "this payment would exceed your 24-hour spending limit".to_owned()
        }
        TransferError::ExceedsMaxTransfer => {
            "the amount is above the maximum for one payment".to_owned()
        }
        TransferError::DebitAccountFrozen => "your wallet is frozen".to_owned(),
        TransferError::CreditAccountFrozen => "the payee's wallet is frozen".to_owned(),
        TransferError::RefundExceedsRemaining => RequestRefusal::RefundAboveRemaining.to_string(),
        TransferError::OriginalTransferIsRefund => RequestRefusal::RefundOfRefund.to_string(),
        TransferError::OriginalTransferNotRefundable => {
            RequestRefusal::RefundNotCompleted.to_string()
        }
        other => format!("the payment was refused ({other})"),
    }
}

/// What the ledger would say about a payment, seen from the accounts as they are, so a
/// payment it would refuse is refused without asking it (which would open both accounts and
/// journal the refusal, for every attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountFacts {
    /// The payer's account exists.
    pub payer_exists: bool,
    /// The payer's account is frozen (in any mode).
    pub payer_frozen: bool,
    /// What the payer may spend, in minor units.
    pub payer_available_minor: u128,
    /// The payee's account is frozen for all movement (`None` for a withdrawal).
    pub payee_frozen_all: bool,
}

/// The ledger refusal visible from the accounts, if any.
pub fn before_ledger(accounts: AccountFacts, amount_minor: u128) -> Option<TransferError> {
    if !accounts.payer_exists {
        return Some(TransferError::InsufficientFunds);
    }
    if accounts.payer_frozen {
        return Some(TransferError::DebitAccountFrozen);
    }
    if accounts.payer_available_minor < amount_minor {
        return Some(TransferError::InsufficientFunds);
    }
    if accounts.payee_frozen_all {
        return Some(TransferError::CreditAccountFrozen);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refund the ledger refuses when it reserves the money (another refund of the same
    /// payment took its part first) is told with the refund's own code and sentence.
    #[test]
    fn the_ledgers_refund_refusals_have_the_refund_codes() {
        for (error, refusal) in [
            (
                TransferError::RefundExceedsRemaining,
                RequestRefusal::RefundAboveRemaining,
            ),
            (
                TransferError::OriginalTransferIsRefund,
                RequestRefusal::RefundOfRefund,
            ),
            (
                TransferError::OriginalTransferNotRefundable,
                RequestRefusal::RefundNotCompleted,
            ),
        ] {
            assert_eq!(
                reason_for(error),
                crate::payments::reason_of_request(refusal)
            );
            assert_eq!(ledger_sentence(error), refusal.sentence());
        }
    }

    fn facts() -> PayerFacts {
        PayerFacts {
            trust: Ok(()),
            has_pin: true,
            pin_exposed: false,
            pin_locked_until_ms: None,
        }
    }

    fn refused(facts: &PayerFacts, now_ms: u64) -> Option<(ReceiptReason, bool)> {
        payer(facts, now_ms)
            .err()
            .map(|r| (r.refusal.reason, r.ask_to_accept_identity))
    }

    /// The payer rows of the refusal table, in precedence order: trust first (an untrusted
    /// session learns nothing about the PIN), then no PIN, an exposed PIN, a locked PIN.
    #[test]
    fn payer_refusals_in_precedence_order() {
        use ReceiptReason::*;
        let now_ms = 1_000_000;
        let table: Vec<(PayerFacts, Option<(ReceiptReason, bool)>)> = vec![
            (facts(), None),
            (
                PayerFacts {
                    trust: Err(TrustRefusal::NotEncrypted),
                    has_pin: false,
                    ..facts()
                },
                Some((NotEncrypted, false)),
            ),
            (
                PayerFacts {
                    trust: Err(TrustRefusal::UntrustedDevice),
                    pin_exposed: true,
                    ..facts()
                },
                Some((UntrustedDevice, false)),
            ),
            (
                PayerFacts {
                    trust: Err(TrustRefusal::IdentityChanged),
                    ..facts()
                },
                Some((IdentityChanged, true)),
            ),
            // A changed identity without a PIN: told to set one (which accepts the keys).
            (
                PayerFacts {
                    trust: Err(TrustRefusal::IdentityChanged),
                    has_pin: false,
                    ..facts()
                },
                Some((PinNotSet, false)),
            ),
            (
                PayerFacts {
                    has_pin: false,
                    ..facts()
                },
                Some((PinNotSet, false)),
            ),
            (
                PayerFacts {
                    pin_exposed: true,
                    pin_locked_until_ms: Some(now_ms + 1),
                    ..facts()
                },
                Some((PinLocked, false)),
            ),
            (
                PayerFacts {
                    pin_locked_until_ms: Some(now_ms + 60_000),
                    ..facts()
                },
                Some((PinLocked, false)),
            ),
            // A lock that has lifted.
            (
                PayerFacts {
                    pin_locked_until_ms: Some(now_ms),
                    ..facts()
                },
                None,
            ),
        ];
        for (row, (facts, expected)) in table.iter().enumerate() {
            assert_eq!(refused(facts, now_ms), *expected, "row {row}: {facts:?}");
        }
    }

    #[test]
    fn a_locked_pin_says_how_long_and_an_exposed_one_says_what_to_do() {
        let locked = payer(
            &PayerFacts {
                pin_locked_until_ms: Some(61_000),
                ..facts()
            },
            1_000,
        )
        .unwrap_err();
        assert!(
            locked.refusal.sentence.ends_with("try again in 60 seconds"),
            "{}",
            locked.refusal.sentence
        );
        let exposed = payer(
            &PayerFacts {
                pin_exposed: true,
                ..facts()
            },
            1_000,
        )
        .unwrap_err();
        assert!(exposed.refusal.sentence.contains("!pin change"));
    }

    #[test]
    fn waiting_and_rate_bounds() {
        assert_eq!(too_many_waiting(4, 5), None);
        let refusal = too_many_waiting(5, 5).expect("at the bound");
        assert_eq!(refusal.reason, ReceiptReason::TooManyPending);
        assert!(refusal.sentence.contains("5 payments waiting"));
        assert!(refusal.sentence.contains("!cancel"));
        assert_eq!(rate_limited(10).reason, ReceiptReason::RateLimited);
        assert!(rate_limited(10).sentence.contains("more than 10 payments"));
    }

    /// The payee rows: oneself or the bot, then `wallet_holders`, then membership.
    #[test]
    fn payee_refusals_in_precedence_order() {
        let alice = <&UserId>::try_from("@alice:hs").unwrap();
        let bob = <&UserId>::try_from("@bob:hs").unwrap();
        let bot = <&UserId>::try_from("@mxpay:hs").unwrap();
        let facts = |payee, may_hold_wallet, joined_room| PayeeFacts {
            payer: alice,
            payee,
            bot,
            may_hold_wallet,
            joined_room,
        };
        let sentence = |f| payee(f).map(|r| r.sentence);
        assert_eq!(sentence(facts(bob, true, true)), None);
        assert_eq!(
            sentence(facts(alice, false, false)).as_deref(),
            Some("you cannot pay yourself or the bot")
        );
        assert_eq!(
            sentence(facts(bot, true, true)).as_deref(),
            Some("you cannot pay yourself or the bot")
        );
        assert_eq!(
            sentence(facts(bob, false, false)).as_deref(),
            Some("@bob:hs may not hold a wallet on this service")
        );
        assert_eq!(
            sentence(facts(bob, true, false)).as_deref(),
            Some("@bob:hs is not a member of this room")
        );
        assert!(payee(facts(bob, true, false))
            .is_some_and(|r| r.reason == ReceiptReason::PayeeNotAllowed));
    }

    /// The ledger rows: what the accounts show is refused before the ledger is asked.
    #[test]
    fn ledger_refusals_seen_from_the_accounts() {
        let ok = AccountFacts {
            payer_exists: true,
            payer_frozen: false,
            payer_available_minor: 500,
            payee_frozen_all: false,
        };
        assert_eq!(before_ledger(ok, 500), None);
        assert_eq!(
            before_ledger(ok, 501),
            Some(TransferError::InsufficientFunds)
        );
        assert_eq!(
            before_ledger(
                AccountFacts {
                    payer_exists: false,
                    ..ok
                },
                1
            ),
            Some(TransferError::InsufficientFunds)
        );
        assert_eq!(
            before_ledger(
                AccountFacts {
                    payer_frozen: true,
                    payee_frozen_all: true,
                    ..ok
                },
                1
            ),
            Some(TransferError::DebitAccountFrozen)
        );
        assert_eq!(
            before_ledger(
                AccountFacts {
                    payee_frozen_all: true,
                    ..ok
                },
                1
            ),
            Some(TransferError::CreditAccountFrozen)
        );
        let frozen = ledger(TransferError::CreditAccountFrozen);
        assert_eq!(frozen.reason, ReceiptReason::PayeeNotAllowed);
        assert_eq!(frozen.sentence, "the payee's wallet is frozen");
        assert_eq!(
            ledger(TransferError::ExceedsDailyLimit).reason,
            ReceiptReason::LimitExceeded
        );
    }
}
