//! Currencies and amounts: `Decimal` at the edge, integer minor units inside.
//!
//! An amount is checked on the way in and never rounded: `12.505 EUR` is an error because EUR
//! has 2 decimal places.

use std::fmt;

use rust_decimal::Decimal;

use super::settings::LedgerSettings;

/// The largest exponent (decimal places) a currency may have. 10^18 minor units per major unit
/// still leaves room for any `Decimal` mantissa in a `u128`.
pub const EXPONENT_MAX: u32 = 18;

/// Why an amount or a currency was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// The currency code is not configured.
    #[error("unknown currency `{0}`")]
    UnknownCurrency(String),
    /// More decimal places than the currency's minor unit.
    #[error("{code} has {exponent} decimal places; {value} has more")]
    TooManyDecimalPlaces {
        /// Currency code.
        code: CurrencyCode,
        /// Decimal places the currency allows.
        exponent: u32,
        /// The amount as given.
        value: Decimal,
    },
    /// Zero moves nothing and is refused.
    #[error("the amount must be greater than zero")]
    Zero,
    /// Negative amounts are refused (a refund is its own operation).
    #[error("the amount must not be negative, got {0}")]
    Negative(Decimal),
    /// Above the currency's configured `max_transfer`.
    #[error("{value} {code} is above the maximum of {max} {code} for one transfer")]
    AboveMaximum {
        /// Currency code.
        code: CurrencyCode,
        /// The amount as given.
        value: Decimal,
        /// The configured maximum, in major units.
        max: Decimal,
    },
    /// The amount does not fit the ledger's integer range.
    #[error("the amount {0} is too large")]
    TooLarge(Decimal),
}

/// A three-letter upper-case currency code, e.g. `EUR`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CurrencyCode([u8; 3]);

impl CurrencyCode {
    /// Parses a code: exactly three ASCII upper-case letters.
    pub fn new(code: &str) -> Option<Self> {
        let bytes = code.as_bytes();
        if bytes.len() == 3 && bytes.iter().all(u8::is_ascii_uppercase) {
            Some(Self([bytes[0], bytes[1], bytes[2]]))
        } else {
            None
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters are ever stored (checked in `new` and on decode).
        std::str::from_utf8(&self.0).expect("currency code is ASCII")
    }

    /// The three bytes, for encoding.
    pub(crate) fn bytes(&self) -> [u8; 3] {
        self.0
    }

    /// From three stored bytes; `None` if they are not a valid code.
    pub(crate) fn from_bytes(bytes: [u8; 3]) -> Option<Self> {
        bytes
            .iter()
            .all(u8::is_ascii_uppercase)
            .then_some(Self(bytes))
    }
}

impl fmt::Display for CurrencyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CurrencyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_str())
    }
}

/// A positive amount of one currency, in integer minor units (cents for EUR).
///
/// Built only through [`Currencies::parse`] or [`Currencies::from_minor`], so it is always
/// positive and within the currency's `max_transfer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amount {
    currency: CurrencyCode,
    minor: u128,
}

impl Amount {
    /// The currency.
    pub fn currency(&self) -> CurrencyCode {
        self.currency
    }

    /// The amount in minor units.
    pub fn minor(&self) -> u128 {
        self.minor
    }
}

/// One configured currency, with limits in minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency {
    /// Code.
    pub code: CurrencyCode,
    /// Decimal places of the minor unit.
    pub exponent: u32,
    /// Largest single transfer from a user account, minor units.
    pub max_transfer_minor: Option<u128>,
    /// Largest total a user account may send in any rolling 24 hours, minor units (a debit
    /// counts until 24 h after the end of the minute it was made in: see docs/ledger.md).
    pub max_per_24h_minor: Option<u128>,
}

/// The configured currencies: parsing and formatting of amounts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Currencies {
    list: Vec<Currency>,
}

impl Currencies {
    /// Adds a currency without limits; an existing code must have the same exponent.
    pub(crate) fn define(&mut self, code: CurrencyCode, exponent: u32) -> Result<(), String> {
        match self.get(code) {
            Some(c) if c.exponent == exponent => Ok(()),
            Some(c) => Err(format!(
                "currency {code} has {} decimal places, not {exponent}",
                c.exponent
            )),
            None if exponent > EXPONENT_MAX => Err(format!("currency {code}: exponent {exponent}")),
            None => {
                self.list.push(Currency {
                    code,
                    exponent,
                    max_transfer_minor: None,
                    max_per_24h_minor: None,
                });
                Ok(())
            }
        }
    }

    /// Takes the limits of every currency `configured` has; others get none.
    pub(crate) fn set_limits(&mut self, configured: &Currencies) {
        for c in &mut self.list {
            let limits = configured.get(c.code);
            c.max_transfer_minor = limits.and_then(|l| l.max_transfer_minor);
            c.max_per_24h_minor = limits.and_then(|l| l.max_per_24h_minor);
        }
    }
    /// EUR (2 decimals) without limits: the currencies of tests that need one and no more.
    #[cfg(test)]
    pub(crate) fn eur_for_tests() -> Self {
        Self::from_settings(&LedgerSettings {
            currencies: vec![crate::ledger::CurrencySpec {
                code: "EUR".to_owned(),
                exponent: 2,
                max_transfer: None,
                max_per_24h: None,
            }],
        })
        .expect("EUR is a valid currency")
    }

    /// Validates the settings: codes, exponents, limits exactly representable and positive.
    pub fn from_settings(settings: &LedgerSettings) -> Result<Self, String> {
        let mut list: Vec<Currency> = Vec::with_capacity(settings.currencies.len());
        for (i, spec) in settings.currencies.iter().enumerate() {
            let code = CurrencyCode::new(&spec.code).ok_or_else(|| {
                format!(
                    "currencies[{i}].code `{}` is not a 3-letter upper-case code",
                    spec.code
                )
            })?;
            if list.iter().any(|c| c.code == code) {
                return Err(format!("currencies[{i}].code `{code}` appears twice"));
            }
            if spec.exponent > EXPONENT_MAX {
                return Err(format!(
                    "currencies[{i}].exponent must be at most {EXPONENT_MAX}"
                ));
            }
            let limit = |value: Option<Decimal>, key: &str| -> Result<Option<u128>, String> {
                value
                    .map(|v| {
                        to_minor(v, code, spec.exponent)
                            .map_err(|e| format!("currencies[{i}].{key}: {e}"))
                    })
                    .transpose()
            };
            list.push(Currency {
                code,
                exponent: spec.exponent,
                max_transfer_minor: limit(spec.max_transfer, "max_transfer")?,
                max_per_24h_minor: limit(spec.max_per_24h, "max_per_24h")?,
            });
        }
        if list.is_empty() {
            return Err("at least one currency must be configured".to_owned());
        }
        Ok(Self { list })
    }

    /// The configured currency with this code.
    pub fn get(&self, code: CurrencyCode) -> Option<&Currency> {
        self.list.iter().find(|c| c.code == code)
    }

    /// The configured currency with this code, by text.
    pub fn lookup(&self, code: &str) -> Result<&Currency, AmountError> {
        CurrencyCode::new(code)
            .and_then(|c| self.get(c))
            .ok_or_else(|| AmountError::UnknownCurrency(code.to_owned()))
    }

    /// All configured currencies.
    pub fn iter(&self) -> impl Iterator<Item = &Currency> {
        self.list.iter()
    }

    /// Checks and converts a decimal amount: positive, no more decimal places than the
    /// currency has, at most `max_transfer`.
    pub fn parse(&self, value: Decimal, code: &str) -> Result<Amount, AmountError> {
        let currency = self.lookup(code)?;
        let minor = to_minor(value, currency.code, currency.exponent)?;
        self.check(currency, minor, value)
    }

    /// Checks an amount already in minor units (positive, at most `max_transfer`).
    pub fn from_minor(&self, minor: u128, code: &str) -> Result<Amount, AmountError> {
        let currency = self.lookup(code)?;
        let value = self.decimal_of(currency, minor)?;
        self.check(currency, minor, value)
    }

    fn check(
        &self,
        currency: &Currency,
        minor: u128,
        value: Decimal,
    ) -> Result<Amount, AmountError> {
        if minor == 0 {
            return Err(AmountError::Zero);
        }
        if let Some(max_minor) = currency.max_transfer_minor {
            if minor > max_minor {
                return Err(AmountError::AboveMaximum {
                    code: currency.code,
                    value,
                    max: self.decimal_of(currency, max_minor)?,
                });
            }
        }
        Ok(Amount {
            currency: currency.code,
            minor,
        })
    }

    fn decimal_of(&self, currency: &Currency, minor: u128) -> Result<Decimal, AmountError> {
        let too_large = || AmountError::TooLarge(Decimal::MAX);
        let mantissa = i128::try_from(minor).map_err(|_| too_large())?;
        Decimal::try_from_i128_with_scale(mantissa, currency.exponent).map_err(|_| too_large())
    }

    /// Minor units back to a decimal with exactly the currency's decimal places
    /// (`1250` EUR -> `12.50`). `None` for an unknown currency or a value beyond `Decimal`.
    pub fn to_decimal(&self, code: CurrencyCode, minor: u128) -> Option<Decimal> {
        let currency = self.get(code)?;
        self.decimal_of(currency, minor).ok()
    }
}

/// Exact conversion of a decimal to minor units; never rounds.
fn to_minor(value: Decimal, code: CurrencyCode, exponent: u32) -> Result<u128, AmountError> {
    if value.is_sign_negative() && !value.is_zero() {
        return Err(AmountError::Negative(value));
    }
    // `12.500` is exactly `12.50`: trailing zeros are not extra precision.
    let normalized = value.normalize();
    if normalized.scale() > exponent {
        return Err(AmountError::TooManyDecimalPlaces {
            code,
            exponent,
            value,
        });
    }
    let mantissa = normalized.mantissa().unsigned_abs();
    10u128
        .checked_pow(exponent - normalized.scale())
        .and_then(|factor| mantissa.checked_mul(factor))
        .ok_or(AmountError::TooLarge(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::settings::CurrencySpec;
    use std::str::FromStr;

    fn currencies() -> Currencies {
        let spec = |code: &str, exponent, max: Option<&str>| CurrencySpec {
            code: code.to_owned(),
            exponent,
            max_transfer: max.map(|m| Decimal::from_str(m).unwrap()),
            max_per_24h: None,
        };
        Currencies::from_settings(&LedgerSettings {
            currencies: vec![
                spec("EUR", 2, Some("10000.00")),
                spec("JPY", 0, None),
                spec("BHD", 3, None),
            ],
        })
        .unwrap()
    }

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn parses_exact_amounts_per_exponent() {
        let c = currencies();
        assert_eq!(c.parse(dec("12.50"), "EUR").unwrap().minor(), 1250);
        assert_eq!(c.parse(dec("12.5"), "EUR").unwrap().minor(), 1250);
        assert_eq!(c.parse(dec("12.500"), "EUR").unwrap().minor(), 1250);
        assert_eq!(c.parse(dec("1500"), "JPY").unwrap().minor(), 1500);
        assert_eq!(c.parse(dec("1.234"), "BHD").unwrap().minor(), 1234);
    }

    #[test]
    fn too_many_decimal_places_is_an_error_not_a_rounding() {
        let err = currencies().parse(dec("12.505"), "EUR").unwrap_err();
        assert!(matches!(
            err,
            AmountError::TooManyDecimalPlaces { exponent: 2, .. }
        ));
        assert!(
            err.to_string().contains("EUR has 2 decimal places"),
            "{err}"
        );
        let err = currencies().parse(dec("0.5"), "JPY").unwrap_err();
        assert!(
            err.to_string().contains("JPY has 0 decimal places"),
            "{err}"
        );
        let err = currencies().parse(dec("1.2345"), "BHD").unwrap_err();
        assert!(
            err.to_string().contains("BHD has 3 decimal places"),
            "{err}"
        );
    }

    #[test]
    fn zero_negative_too_large_unknown_are_errors() {
        let c = currencies();
        assert_eq!(c.parse(dec("0.00"), "EUR"), Err(AmountError::Zero));
        assert_eq!(
            c.parse(dec("-1"), "EUR"),
            Err(AmountError::Negative(dec("-1")))
        );
        assert!(matches!(
            c.parse(dec("10000.01"), "EUR"),
            Err(AmountError::AboveMaximum { .. })
        ));
        assert!(c.parse(dec("10000.00"), "EUR").is_ok());
        assert_eq!(
            c.parse(dec("1"), "XYZ"),
            Err(AmountError::UnknownCurrency("XYZ".to_owned()))
        );
        assert_eq!(
            c.parse(dec("1"), "eur"),
            Err(AmountError::UnknownCurrency("eur".to_owned()))
        );
        assert_eq!(c.from_minor(0, "JPY"), Err(AmountError::Zero));
        assert!(matches!(
            c.from_minor(1_000_001, "EUR"),
            Err(AmountError::AboveMaximum { .. })
        ));
    }

    #[test]
    fn formats_back_with_the_currency_scale() {
        let c = currencies();
        let eur = CurrencyCode::new("EUR").unwrap();
        assert_eq!(c.to_decimal(eur, 1250).unwrap().to_string(), "12.50");
        let jpy = CurrencyCode::new("JPY").unwrap();
        assert_eq!(c.to_decimal(jpy, 7).unwrap().to_string(), "7");
    }

    #[test]
    fn settings_are_validated() {
        let bad = |code: &str, exponent, max: Option<&str>| {
            Currencies::from_settings(&LedgerSettings {
                currencies: vec![CurrencySpec {
                    code: code.to_owned(),
                    exponent,
                    max_transfer: max.map(dec),
                    max_per_24h: None,
                }],
            })
            .unwrap_err()
        };
        assert!(bad("EU", 2, None).contains("3-letter"));
        assert!(bad("EUR", 19, None).contains("exponent"));
        assert!(bad("EUR", 2, Some("1.001")).contains("max_transfer"));
        assert!(Currencies::from_settings(&LedgerSettings { currencies: vec![] }).is_err());
    }
}
