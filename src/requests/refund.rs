//! Refunds as pure checks: who may refund which payment, and how much.
//!
//! A refund is a payment from the original payee back to the original payer, confirmed with the
//! payee's PIN, linked to the original transfer. The ledger caps the total refunded at what was
//! paid as well; these checks give the person a sentence before anything is reserved.

use matrix_sdk::ruma::{OwnedUserId, UserId};
use rust_decimal::Decimal;

use super::reason::{RequestError, RequestRefusal};
use crate::ledger::{AmountError, Currencies, CurrencyCode};

/// What the bot knows of the payment a `!refund` replies to (from the ledger and the receipt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundablePayment {
    /// The original ledger transfer.
    pub transfer_id: u128,
    /// Who paid it.
    pub payer: OwnedUserId,
    /// Who was paid (the only one who may refund it).
    pub payee: OwnedUserId,
    /// What was paid, minor units.
    pub amount_minor: u128,
    /// Its currency.
    pub currency: CurrencyCode,
    /// Whether it is completed (posted); not while it waits for a PIN or for the payee to
    /// accept it, nor once voided.
    pub completed: bool,
    /// The transfer this payment refunded, if it is itself a refund.
    pub refund_of: Option<u128>,
    /// How much of it was refunded already (posted refunds, and refunds waiting for the
    /// payee's PIN: they reserve their part), minor units.
    pub refunded_minor: u128,
}

/// A refund that passed the checks: what to ask the ledger for (a payment from `payer` to
/// `payee`, then the payer's PIN step-up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundPlan {
    /// The payment refunded.
    pub original_transfer_id: u128,
    /// Who pays the refund: the original payee.
    pub payer: OwnedUserId,
    /// Who gets it: the original payer.
    pub payee: OwnedUserId,
    /// Minor units.
    pub amount_minor: u128,
    /// The original's currency.
    pub currency: CurrencyCode,
    /// What remains refundable after this refund, minor units.
    pub remaining_after_minor: u128,
}

/// Checks `!refund` (`amount: None`, all that remains) or `!refund 5.00` by `actor` against the
/// payment replied to. The amount is in the original's currency, exact (`5.001` EUR is
/// `invalid_amount`). Refusals in order: `refund_not_payee`, `refund_of_refund`,
/// `refund_not_completed`, `refund_nothing_left`, `invalid_amount`, `refund_above_remaining`.
pub fn plan_refund(
    original: &RefundablePayment,
    actor: &UserId,
    amount: Option<Decimal>,
    currencies: &Currencies,
) -> Result<RefundPlan, RequestError> {
    if actor != original.payee {
        return Err(RequestRefusal::RefundNotPayee.into());
    }
    if original.refund_of.is_some() {
        return Err(RequestRefusal::RefundOfRefund.into());
    }
    if !original.completed {
        return Err(RequestRefusal::RefundNotCompleted.into());
    }
    let remaining_minor = original
        .amount_minor
        .saturating_sub(original.refunded_minor);
    if remaining_minor == 0 {
        return Err(RequestRefusal::RefundNothingLeft.into());
    }
    let amount_minor = match amount {
        None => remaining_minor,
        Some(value) => match currencies.parse(value, original.currency.as_str()) {
            Ok(amount) => amount.minor(),
            // Above the maximum for one payment is above what remains too (the original
            // passed that maximum): say the more useful thing.
            Err(AmountError::AboveMaximum { .. }) => {
                return Err(RequestRefusal::RefundAboveRemaining.into())
            }
            Err(e) => return Err(e.into()),
        },
    };
    if amount_minor > remaining_minor {
        return Err(RequestRefusal::RefundAboveRemaining.into());
    }
    Ok(RefundPlan {
        original_transfer_id: original.transfer_id,
        payer: original.payee.clone(),
        payee: original.payer.clone(),
        amount_minor,
        currency: original.currency,
        remaining_after_minor: remaining_minor - amount_minor,
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use matrix_sdk::ruma::{owned_user_id, user_id};

    use super::*;
    use crate::ledger::{CurrencySpec, LedgerSettings};

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

    fn paid(amount_minor: u128, refunded_minor: u128) -> RefundablePayment {
        RefundablePayment {
            transfer_id: 7,
            payer: owned_user_id!("@alice:s"),
            payee: owned_user_id!("@bob:s"),
            amount_minor,
            currency: CurrencyCode::new("EUR").unwrap(),
            completed: true,
            refund_of: None,
            refunded_minor,
        }
    }

    fn refund(
        original: &RefundablePayment,
        actor: &str,
        amount: Option<&str>,
    ) -> Result<RefundPlan, RequestError> {
        plan_refund(
            original,
            <&UserId>::try_from(actor).unwrap(),
            amount.map(|a| Decimal::from_str(a).unwrap()),
            &currencies(),
        )
    }

    #[test]
    fn partial_then_full_refund_and_no_more() {
        let original = paid(2000, 0);
        let first = refund(&original, "@bob:s", Some("5.00")).unwrap();
        assert_eq!(first.amount_minor, 500);
        assert_eq!(first.remaining_after_minor, 1500);
        assert_eq!(
            (first.payer.as_str(), first.payee.as_str()),
            ("@bob:s", "@alice:s")
        );
        let rest = refund(&paid(2000, 500), "@bob:s", None).unwrap();
        assert_eq!((rest.amount_minor, rest.remaining_after_minor), (1500, 0));
        assert_eq!(
            refund(&paid(2000, 2000), "@bob:s", None)
                .unwrap_err()
                .code(),
            "refund_nothing_left"
        );
        assert_eq!(
            refund(&paid(2000, 500), "@bob:s", Some("15.01"))
                .unwrap_err()
                .code(),
            "refund_above_remaining"
        );
        assert!(refund(&paid(2000, 500), "@bob:s", Some("15.00")).is_ok());
    }

    #[test]
    fn refusals_in_order() {
        let original = paid(2000, 0);
        assert_eq!(
            refund(&original, "@alice:s", None).unwrap_err().code(),
            "refund_not_payee"
        );
        let of_refund = RefundablePayment {
            refund_of: Some(3),
            completed: false,
            ..original.clone()
        };
        assert_eq!(
            refund(&of_refund, "@bob:s", None).unwrap_err().code(),
            "refund_of_refund"
        );
        let pending = RefundablePayment {
            completed: false,
            ..original.clone()
        };
        assert_eq!(
            refund(&pending, "@bob:s", None).unwrap_err().code(),
            "refund_not_completed"
        );
        for bad in ["0", "5.001"] {
            assert_eq!(
                refund(&original, "@bob:s", Some(bad)).unwrap_err().code(),
                "invalid_amount",
                "{bad}"
            );
        }
        assert_eq!(
            refund(&original, "@bob:s", Some("500")).unwrap_err().code(),
            "refund_above_remaining"
        );
        let _ = user_id!("@bob:s");
    }
}
