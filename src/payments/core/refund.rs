//! Refunds (issue 13): whether a `!refund` replying to one of the bot's receipts starts a
//! payment back, and what a refusal says. Pure: the shell (`payments/refund.rs`) finds the
//! transfer the receipt tells of and its refunds so far in the ledger; this decides.
//!
//! Rules (docs/payments.md, "Refunds"):
//! - only the payee of a completed payment may refund it, to its payer, in its currency;
//! - `!refund` gives back all that remains, `!refund 5.00` part of it; never more than remains
//!   (refunds waiting for their PIN count as taken: they reserve their part);
//! - a refund cannot be refunded;
//! - a refund is then an ordinary payment with the refunder's PIN step-up, linked to the
//!   original in the ledger, which enforces the cap again when it reserves the money.

use ruma::{OwnedUserId, UserId};
use rust_decimal::Decimal;

use crate::events::ReceiptReason;
use crate::ledger::{Currencies, Owner, Transfer, TransferState};
use crate::requests::{plan_refund, RefundPlan, RefundablePayment, RequestError, RequestRefusal};

/// What a `!refund` leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundStart {
    /// A payment of `amount` (in the original's currency) from the refunder back to the
    /// original payer, linked to the original; confirmed with the refunder's PIN.
    Pay {
        /// What passed the checks.
        plan: RefundPlan,
        /// The amount in major units, as the challenge and receipts show it.
        amount: Decimal,
    },
    /// Nothing moves; the room is told why and gets a declined receipt with `reason`.
    Refuse {
        /// The stable reason code.
        reason: ReceiptReason,
        /// The sentence for the room (a fragment: "payment not made: …" goes before it).
        sentence: String,
        /// Who the receipt names as the one who would have been paid (the original payer when
        /// known, else the refunder).
        payee: OwnedUserId,
        /// The amount the receipt names (as asked, or what remains).
        amount: Decimal,
        /// The currency the receipt names.
        currency: String,
    },
}

/// What the bot knows of the payment a receipt tells of, from its ledger transfer; `None`
/// for a transfer that is not between two users (a top-up, a withdrawal).
pub fn refundable(transfer: &Transfer) -> Option<RefundablePayment> {
    let (Owner::User(payer), Owner::User(payee)) = (&transfer.debit.owner, &transfer.credit.owner)
    else {
        return None;
    };
    let (completed, amount_minor) = match transfer.state {
        TransferState::Posted { amount_minor } => (true, amount_minor),
        _ => (false, transfer.amount_minor),
    };
    Some(RefundablePayment {
        transfer_id: transfer.id.0,
        payer: OwnedUserId::try_from(payer.as_str()).ok()?,
        payee: OwnedUserId::try_from(payee.as_str()).ok()?,
        amount_minor,
        currency: transfer.debit.currency,
        completed,
        refund_of: transfer.refund_of.map(|id| id.0),
        refunded_minor: transfer
            .refunded_minor
            .saturating_add(transfer.refund_pending_minor),
    })
}

/// Decides a `!refund` (`amount: None`: all that remains) by `actor`, replying to a receipt of
/// `original` (`None`: the message replied to is no payment the bot knows).
pub fn decide(
    original: Option<&RefundablePayment>,
    actor: &UserId,
    amount: Option<Decimal>,
    currencies: &Currencies,
) -> RefundStart {
    let Some(original) = original else {
        return refuse(
            RequestRefusal::ReplyTargetUnknown.into(),
            actor.to_owned(),
            amount.unwrap_or_default().abs(),
            // No payment, so no currency of its own: the receipt names the first configured.
            currencies
                .iter()
                .next()
                .map_or_else(|| "EUR".to_owned(), |c| c.code.as_str().to_owned()),
        );
    };
    let exponent = currencies
        .get(original.currency)
        .map_or(2, |currency| currency.exponent);
    let major = |minor: u128| {
        i128::try_from(minor)
            .ok()
            .and_then(|m| Decimal::try_from_i128_with_scale(m, exponent).ok())
            .unwrap_or_default()
    };
    match plan_refund(original, actor, amount, currencies) {
        Ok(plan) => RefundStart::Pay {
            amount: major(plan.amount_minor),
            plan,
        },
        Err(error) => {
            // The one who would have been paid: the original payer (for the payee), else the
            // payee of the payment someone else tried to refund.
            let payee = if actor == original.payee {
                original.payer.clone()
            } else {
                original.payee.clone()
            };
            let remaining = original
                .amount_minor
                .saturating_sub(original.refunded_minor);
            let shown = amount.map_or_else(|| major(remaining), |a| a.abs());
            refuse(error, payee, shown, original.currency.as_str().to_owned())
        }
    }
}

fn refuse(
    error: RequestError,
    payee: OwnedUserId,
    amount: Decimal,
    currency: String,
) -> RefundStart {
    RefundStart::Refuse {
        reason: match &error {
            RequestError::Refused(refusal) => crate::payments::reason_of_request(*refusal),
            RequestError::Amount(_) => ReceiptReason::InvalidAmount,
        },
        sentence: error.sentence(),
        payee,
        amount,
        currency,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use ruma::{owned_user_id, user_id};

    use super::*;
    use crate::ledger::{
        AccountId, CurrencyCode, CurrencySpec, LedgerSettings, TransferId, TransferKind,
    };

    fn currencies() -> Currencies {
        Currencies::from_settings(&LedgerSettings {
            currencies: vec![CurrencySpec {
                code: "EUR".into(),
                exponent: 2,
                max_transfer: Some(Decimal::from(100)),
                max_per_24h: None,
            }],
        })
        .unwrap()
    }

    fn eur() -> CurrencyCode {
        CurrencyCode::new("EUR").unwrap()
    }

    /// alice paid bob 20.00 EUR (transfer 7), `refunded_minor` of it given back so far.
    fn paid(refunded_minor: u128) -> RefundablePayment {
        RefundablePayment {
            transfer_id: 7,
            payer: owned_user_id!("@alice:s"),
            payee: owned_user_id!("@bob:s"),
            amount_minor: 2000,
            currency: eur(),
            completed: true,
            refund_of: None,
            refunded_minor,
        }
    }

    fn transfer(debit: Owner, credit: Owner, state: TransferState) -> Transfer {
        Transfer {
            reference: 0,
            id: TransferId(7),
            kind: TransferKind::Single,
            debit: AccountId {
                owner: debit,
                currency: eur(),
            },
            credit: AccountId {
                owner: credit,
                currency: eur(),
            },
            amount_minor: 2000,
            state,
            memo: Vec::new(),
            created_ms: 1,
            ended_ms: None,
            deadline_ms: None,
            refunded_minor: 300,
            refund_of: None,
            refund_pending_minor: 200,
        }
    }

    type Row = (
        Option<RefundablePayment>,
        &'static str,
        Option<&'static str>,
        &'static str,
        &'static str,
        &'static str,
    );

    /// One row: the payment replied to, who refunds, the amount typed; the outcome (`pay
    /// AMOUNT` or the reason code) and the amount and payee the receipt names.
    #[test]
    fn the_refund_table() {
        let rows: [Row; 12] = [
            (Some(paid(0)), "@bob:s", None, "pay", "20.00", "@alice:s"),
            (
                Some(paid(0)),
                "@bob:s",
                Some("5.00"),
                "pay",
                "5.00",
                "@alice:s",
            ),
            (Some(paid(500)), "@bob:s", None, "pay", "15.00", "@alice:s"),
            (
                Some(paid(500)),
                "@bob:s",
                Some("15.00"),
                "pay",
                "15.00",
                "@alice:s",
            ),
            (
                Some(paid(500)),
                "@bob:s",
                Some("15.01"),
                "refund_above_remaining",
                "15.01",
                "@alice:s",
            ),
            (
                Some(paid(2000)),
                "@bob:s",
                None,
                "refund_nothing_left",
                "0.00",
                "@alice:s",
            ),
            (
                Some(paid(0)),
                "@alice:s",
                None,
                "refund_not_payee",
                "20.00",
                "@bob:s",
            ),
            (
                Some(paid(0)),
                "@carol:s",
                Some("1"),
                "refund_not_payee",
                "1",
                "@bob:s",
            ),
            (
                Some(RefundablePayment {
                    refund_of: Some(3),
                    ..paid(0)
                }),
                "@bob:s",
                None,
                "refund_of_refund",
                "20.00",
                "@alice:s",
            ),
            (
                Some(paid(0)),
                "@bob:s",
                Some("-1"),
                "invalid_amount",
                "1",
                "@alice:s",
            ),
            (
                Some(paid(0)),
                "@bob:s",
                Some("0.001"),
                "invalid_amount",
                "0.001",
                "@alice:s",
            ),
            (
                None,
                "@bob:s",
                Some("2"),
                "reply_target_unknown",
                "2",
                "@bob:s",
            ),
        ];
        for (original, actor, amount, outcome, shown, who) in rows {
            let actor = <&UserId>::try_from(actor).unwrap();
            let typed = amount.map(|a| Decimal::from_str(a).unwrap());
            let row = format!("{actor} {amount:?} on {original:?}");
            match decide(original.as_ref(), actor, typed, &currencies()) {
                RefundStart::Pay { plan, amount } => {
                    assert_eq!(outcome, "pay", "{row}");
                    assert_eq!(amount.to_string(), shown, "{row}");
                    assert_eq!(plan.payee.as_str(), who, "{row}");
                    assert_eq!(plan.payer, actor, "{row}");
                    assert_eq!(plan.original_transfer_id, 7, "{row}");
                }
                RefundStart::Refuse {
                    reason,
                    sentence,
                    payee,
                    amount,
                    ..
                } => {
                    assert_eq!(crate::payments::reason_code_of(reason), outcome, "{row}");
                    assert_eq!(amount.to_string(), shown, "{row}");
                    assert_eq!(payee.as_str(), who, "{row}");
                    assert!(!sentence.is_empty(), "{row}");
                }
            }
        }
    }

    #[test]
    fn a_payment_not_completed_is_not_refunded() {
        let pending = RefundablePayment {
            completed: false,
            ..paid(0)
        };
        let RefundStart::Refuse { reason, .. } =
            decide(Some(&pending), user_id!("@bob:s"), None, &currencies())
        else {
            panic!("refunded a pending payment");
        };
        assert_eq!(reason, ReceiptReason::RefundNotCompleted);
    }

    #[test]
    fn the_ledger_transfer_gives_the_facts() {
        let user = |u: &str| Owner::User(u.to_owned());
        let posted = transfer(
            user("@alice:s"),
            user("@bob:s"),
            TransferState::Posted { amount_minor: 1500 },
        );
        let facts = refundable(&posted).unwrap();
        assert_eq!(
            facts.amount_minor, 1500,
            "what moved, not what was reserved"
        );
        assert_eq!(facts.refunded_minor, 500, "pending refunds count as taken");
        assert!(facts.completed);
        assert_eq!(
            (facts.payer.as_str(), facts.payee.as_str()),
            ("@alice:s", "@bob:s")
        );
        let pending = transfer(user("@alice:s"), user("@bob:s"), TransferState::Pending);
        assert!(!refundable(&pending).unwrap().completed);
        let topup = transfer(Owner::Issuer, user("@bob:s"), TransferState::Pending);
        assert_eq!(refundable(&topup), None);
        let refund = Transfer {
            refund_of: Some(TransferId(3)),
            ..posted
        };
        assert_eq!(refundable(&refund).unwrap().refund_of, Some(3));
    }
}
