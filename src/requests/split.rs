//! Split bills, computed exactly in minor units.
//!
//! An even split divides the total into `n` shares (the people named, plus the sender with
//! `+me`). When the total does not divide evenly, the remainder of `r` minor units goes one
//! unit each to the **first `r` people named, in the order they were typed**; the sender's own
//! share (with `+me`) never takes any of it (`r < n`, so there are always enough named people).
//! 100.00 EUR among `@a @b @c`: 33.34 from @a, 33.33 from @b and @c.

use std::fmt::Write as _;

use matrix_sdk::ruma::{OwnedUserId, UserId};
use rust_decimal::Decimal;

use super::parse::SplitShares;
use super::reason::{RequestError, RequestRefusal};
use crate::ledger::{AmountError, Currencies, CurrencyCode};

/// Most people one split may name (each gets a request; their notices must stay readable).
pub const SPLIT_PEOPLE_MAX: usize = 25;

/// One person's part of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitShare {
    /// Who is asked.
    pub payer: OwnedUserId,
    /// Their share in minor units (at least 1).
    pub amount_minor: u128,
}

/// A checked split: who is asked for what, exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    /// The currency.
    pub currency: CurrencyCode,
    /// Its decimal places (for formatting).
    pub exponent: u32,
    /// The whole bill in minor units (the sender's own share included).
    pub total_minor: u128,
    /// The named people's shares, in the order typed.
    pub shares: Vec<SplitShare>,
    /// The sender's own share (with `+me`), which nobody is asked for.
    pub sender_share_minor: Option<u128>,
}

/// Checks a split typed by `sender` and computes its shares. Refusals, in this order: nobody or
/// too many named (`split_too_many_people`), someone named twice (`split_duplicate_person`),
/// the sender named (`request_from_self`), the bot named (`request_from_bot`), fewer than two
/// shares (`split_one_person`), an amount the currency does not allow (`invalid_amount`: zero,
/// negative, more decimal places than the currency has, unknown currency, a share above the
/// currency's maximum for one payment), a share below one minor unit
/// (`split_share_below_minor_unit`).
pub fn plan_split(
    shares: &SplitShares,
    currency: &str,
    sender: &UserId,
    bot: &UserId,
    currencies: &Currencies,
) -> Result<SplitPlan, RequestError> {
    let (people, with_me): (Vec<&UserId>, bool) = match shares {
        SplitShares::Even {
            people, with_me, ..
        } => (people.iter().map(|p| &**p).collect(), *with_me),
        SplitShares::Uneven { shares } => (shares.iter().map(|(p, _)| &**p).collect(), false),
    };
    if people.len() > SPLIT_PEOPLE_MAX {
        return Err(RequestRefusal::SplitTooManyPeople.into());
    }
    for (i, person) in people.iter().enumerate() {
        if people[..i].contains(person) {
            return Err(RequestRefusal::SplitDuplicatePerson.into());
        }
    }
    if people.contains(&sender) {
        return Err(RequestRefusal::RequestFromSelf.into());
    }
    if people.contains(&bot) {
        return Err(RequestRefusal::RequestFromBot.into());
    }
    if people.len() + usize::from(with_me) < 2 {
        return Err(RequestRefusal::SplitOnePerson.into());
    }
    let spec = currencies.lookup(currency)?;
    let (code, exponent) = (spec.code, spec.exponent);
    match shares {
        SplitShares::Even { total, people, .. } => {
            let total_minor = exact_minor(*total, code, exponent)?;
            let count = (people.len() + usize::from(with_me)) as u128;
            let (base, remainder) = (total_minor / count, total_minor % count);
            if base == 0 {
                return Err(RequestRefusal::SplitShareBelowMinorUnit.into());
            }
            let shares = people
                .iter()
                .enumerate()
                .map(|(i, payer)| {
                    let amount_minor = base + u128::from((i as u128) < remainder);
                    currencies.from_minor(amount_minor, code.as_str())?;
                    Ok(SplitShare {
                        payer: payer.clone(),
                        amount_minor,
                    })
                })
                .collect::<Result<Vec<_>, AmountError>>()?;
            Ok(SplitPlan {
                currency: code,
                exponent,
                total_minor,
                shares,
                sender_share_minor: with_me.then_some(base),
            })
        }
        SplitShares::Uneven { shares } => {
            let mut planned = Vec::with_capacity(shares.len());
            let mut total_minor: u128 = 0;
            for (payer, amount) in shares {
                let amount_minor = match currencies.parse(*amount, code.as_str()) {
                    Ok(amount) => amount.minor(),
                    Err(AmountError::Zero) => {
                        return Err(RequestRefusal::SplitShareBelowMinorUnit.into())
                    }
                    Err(e) => return Err(e.into()),
                };
                total_minor = total_minor
                    .checked_add(amount_minor)
                    .ok_or(AmountError::TooLarge(*amount))?;
                planned.push(SplitShare {
                    payer: payer.clone(),
                    amount_minor,
                });
            }
            Ok(SplitPlan {
                currency: code,
                exponent,
                total_minor,
                shares: planned,
                sender_share_minor: None,
            })
        }
    }
}

/// Exact conversion of a bill's total to minor units (the same rule as the ledger's: never
/// rounds). The total itself is no payment, so the currency's maximum for one payment applies
/// to each share, not to it.
fn exact_minor(value: Decimal, code: CurrencyCode, exponent: u32) -> Result<u128, AmountError> {
    if value.is_sign_negative() && !value.is_zero() {
        return Err(AmountError::Negative(value));
    }
    let normalized = value.normalize();
    if normalized.scale() > exponent {
        return Err(AmountError::TooManyDecimalPlaces {
            code,
            exponent,
            value,
        });
    }
    let minor = 10u128
        .checked_pow(exponent - normalized.scale())
        .and_then(|factor| normalized.mantissa().unsigned_abs().checked_mul(factor))
        .ok_or(AmountError::TooLarge(value))?;
    if minor == 0 {
        return Err(AmountError::Zero);
    }
    Ok(minor)
}

/// `minor` with exactly `exponent` decimal places (`3334`, 2 -> `33.34`).
pub fn format_minor(minor: u128, exponent: u32) -> String {
    i128::try_from(minor)
        .ok()
        .and_then(|m| Decimal::try_from_i128_with_scale(m, exponent).ok())
        .map(|d| d.to_string())
        .unwrap_or_else(|| format!("{minor}e-{exponent}"))
}

impl SplitPlan {
    /// Who pays what, for the notice: people with the same share grouped, in the order typed:
    /// "33.34 from @a:s, 33.33 from @b:s and @c:s". The sender's own share is not in it.
    pub fn describe(&self) -> String {
        let mut groups: Vec<(u128, Vec<&UserId>)> = Vec::new();
        for share in &self.shares {
            match groups.last_mut() {
                Some((amount, people)) if *amount == share.amount_minor => {
                    people.push(&share.payer)
                }
                _ => groups.push((share.amount_minor, vec![&share.payer])),
            }
        }
        let mut text = String::new();
        for (i, (amount, people)) in groups.iter().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            let _ = write!(text, "{} from ", format_minor(*amount, self.exponent));
            for (j, person) in people.iter().enumerate() {
                if j > 0 {
                    text.push_str(if j + 1 == people.len() { " and " } else { ", " });
                }
                text.push_str(person.as_str());
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use matrix_sdk::ruma::{owned_user_id, user_id};

    use super::*;
    use crate::ledger::{CurrencySpec, LedgerSettings};

    fn currencies() -> Currencies {
        let spec = |code: &str, exponent, max: Option<&str>| CurrencySpec {
            code: code.into(),
            exponent,
            max_transfer: max.map(|m| Decimal::from_str(m).unwrap()),
            max_per_24h: None,
        };
        Currencies::from_settings(&LedgerSettings {
            currencies: vec![spec("EUR", 2, Some("1000")), spec("JPY", 0, None)],
        })
        .unwrap()
    }

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn users(names: &[&str]) -> Vec<OwnedUserId> {
        names
            .iter()
            .map(|n| OwnedUserId::try_from(format!("@{n}:s")).unwrap())
            .collect()
    }

    fn even(total: &str, names: &[&str], with_me: bool) -> SplitShares {
        SplitShares::Even {
            total: dec(total),
            people: users(names),
            with_me,
        }
    }

    fn plan(shares: &SplitShares, currency: &str) -> Result<SplitPlan, RequestError> {
        plan_split(
            shares,
            currency,
            user_id!("@me:s"),
            user_id!("@_mxpay:s"),
            &currencies(),
        )
    }

    fn minors(plan: &SplitPlan) -> Vec<u128> {
        plan.shares.iter().map(|s| s.amount_minor).collect()
    }

    #[test]
    fn the_remainder_goes_to_the_first_people_named() {
        let p = plan(&even("100.00", &["a", "b", "c"], false), "EUR").unwrap();
        assert_eq!(minors(&p), vec![3334, 3333, 3333]);
        assert_eq!(p.describe(), "33.34 from @a:s, 33.33 from @b:s and @c:s");
        assert_eq!(p.total_minor, 10_000);
        let p = plan(&even("100.02", &["a", "b", "c", "d"], false), "EUR").unwrap();
        assert_eq!(minors(&p), vec![2501, 2501, 2500, 2500]);
        assert_eq!(
            p.describe(),
            "25.01 from @a:s and @b:s, 25.00 from @c:s and @d:s"
        );
        let p = plan(&even("90", &["a", "b", "c"], false), "EUR").unwrap();
        assert_eq!(p.describe(), "30.00 from @a:s, @b:s and @c:s");
    }

    #[test]
    fn with_me_the_sender_is_a_share_that_never_takes_the_remainder() {
        let p = plan(&even("100.01", &["a", "b", "c"], true), "EUR").unwrap();
        assert_eq!(minors(&p), vec![2501, 2500, 2500]);
        assert_eq!(p.sender_share_minor, Some(2500));
        let p = plan(&even("10", &["a"], true), "JPY").unwrap();
        assert_eq!(minors(&p), vec![5]);
        assert_eq!(p.describe(), "5 from @a:s");
        // r < n, so named people always take the whole remainder.
        let p = plan(&even("0.05", &["a", "b", "c", "d"], true), "EUR").unwrap();
        assert_eq!(minors(&p), vec![1, 1, 1, 1]);
        assert_eq!(p.sender_share_minor, Some(1));
    }

    #[test]
    fn uneven_splits_take_each_share_as_typed() {
        let shares = SplitShares::Uneven {
            shares: vec![
                (owned_user_id!("@a:s"), dec("40")),
                (owned_user_id!("@b:s"), dec("25.5")),
            ],
        };
        let p = plan(&shares, "EUR").unwrap();
        assert_eq!(minors(&p), vec![4000, 2550]);
        assert_eq!(p.total_minor, 6550);
        assert_eq!(p.describe(), "40.00 from @a:s, 25.50 from @b:s");
    }

    #[test]
    fn bad_splits_are_refused_with_their_reason() {
        let refused = |shares: &SplitShares, currency| plan(shares, currency).unwrap_err().code();
        assert_eq!(
            refused(&even("10", &["a"], false), "EUR"),
            "split_one_person"
        );
        assert_eq!(
            refused(&even("10", &["a", "b", "a"], false), "EUR"),
            "split_duplicate_person"
        );
        assert_eq!(
            refused(&even("10", &["a", "me"], false), "EUR"),
            "request_from_self"
        );
        assert_eq!(
            refused(&even("10", &["a", "_mxpay"], false), "EUR"),
            "request_from_bot"
        );
        assert_eq!(
            refused(&even("0.02", &["a", "b", "c"], false), "EUR"),
            "split_share_below_minor_unit"
        );
        assert_eq!(
            refused(&even("2", &["a", "b", "c"], false), "JPY"),
            "split_share_below_minor_unit"
        );
        assert_eq!(
            refused(&even("12.345", &["a", "b"], false), "EUR"),
            "invalid_amount"
        );
        assert_eq!(
            refused(&even("0", &["a", "b"], false), "EUR"),
            "invalid_amount"
        );
        assert_eq!(
            refused(&even("10", &["a", "b"], false), "XYZ"),
            "invalid_amount"
        );
        // The total may exceed the maximum for one payment; a share may not.
        assert!(plan(&even("1500", &["a", "b"], false), "EUR").is_ok());
        assert_eq!(
            refused(&even("2500", &["a", "b"], false), "EUR"),
            "invalid_amount"
        );
        let many: Vec<String> = (0..=SPLIT_PEOPLE_MAX).map(|i| format!("p{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            refused(&even("1000", &many, false), "EUR"),
            "split_too_many_people"
        );
        assert!(RequestRefusal::SplitTooManyPeople
            .sentence()
            .contains(&SPLIT_PEOPLE_MAX.to_string()));
        let uneven = |a: &str| SplitShares::Uneven {
            shares: vec![
                (owned_user_id!("@a:s"), dec(a)),
                (owned_user_id!("@b:s"), dec("1")),
            ],
        };
        assert_eq!(refused(&uneven("0"), "EUR"), "split_share_below_minor_unit");
        assert_eq!(refused(&uneven("0.001"), "EUR"), "invalid_amount");
        assert_eq!(
            refused(
                &SplitShares::Uneven {
                    shares: vec![(owned_user_id!("@a:s"), dec("1"))]
                },
                "EUR"
            ),
            "split_one_person"
        );
    }

    proptest::proptest! {
        /// Whatever the total and the number of people, the shares add up to the total exactly,
        /// differ by at most one minor unit, and the larger ones come first.
        #[test]
        fn even_shares_add_up_exactly(total_minor in 1u128..10_000_000, people in 2usize..=SPLIT_PEOPLE_MAX, with_me: bool) {
            let names: Vec<String> = (0..people).map(|i| format!("p{i}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let total = format_minor(total_minor, 0);
            let shares = even(&total, &names, with_me);
            match plan(&shares, "JPY") {
                Ok(p) => {
                    let sum: u128 = minors(&p).iter().sum::<u128>() + p.sender_share_minor.unwrap_or(0);
                    proptest::prop_assert_eq!(sum, total_minor);
                    let m = minors(&p);
                    proptest::prop_assert!(m.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
                    proptest::prop_assert!(m.iter().all(|&s| s >= 1));
                    if let Some(mine) = p.sender_share_minor {
                        proptest::prop_assert!(m.iter().all(|&s| s >= mine && s - mine <= 1));
                    }
                }
                Err(e) => {
                    proptest::prop_assert_eq!(e.code(), "split_share_below_minor_unit");
                    proptest::prop_assert!(total_minor < (people + usize::from(with_me)) as u128);
                }
            }
        }
    }
}
