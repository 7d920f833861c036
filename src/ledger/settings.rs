//! The ledger's part of the YAML config: currencies and limits.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Currencies and per-account limits, read from the `ledger:` section of the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// The currencies wallets may hold. Default: EUR (2 decimal places).
    #[serde(default = "default_currencies")]
    pub currencies: Vec<CurrencySpec>,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        Self {
            currencies: default_currencies(),
        }
    }
}

/// One currency: its ISO 4217 code, how many decimal places it has, and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrencySpec {
    /// ISO 4217 code, e.g. `EUR`.
    pub code: String,
    /// Decimal places of the minor unit: EUR 2, JPY 0, BHD 3.
    pub exponent: u32,
    /// Largest amount of a single transfer, in major units (e.g. `"10000.00"`).
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub max_transfer: Option<Decimal>,
    /// Largest total a user account may send in any rolling 24 hours, in major units (a
    /// debit counts until 24 h after the end of the minute it was made in, so up to a minute
    /// longer: a limit may refuse up to a minute early, never allow more).
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub max_per_24h: Option<Decimal>,
}

fn default_currencies() -> Vec<CurrencySpec> {
    vec![CurrencySpec {
        code: "EUR".to_owned(),
        exponent: 2,
        max_transfer: None,
        max_per_24h: None,
    }]
}

/// Why the `ledger:` settings were refused; names the key (`ledger.currencies[1].max_transfer`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("config key `{key}`: {reason}")]
pub struct SettingsError {
    /// Dotted path of the key.
    pub key: String,
    /// Why the value is refused.
    pub reason: String,
}

/// Largest exponent the config accepts (the ledger itself allows more; 8 covers every ISO 4217
/// currency and common crypto units while keeping minor amounts far from overflow).
pub const CONFIG_EXPONENT_MAX: u32 = 8;

impl LedgerSettings {
    /// Checks codes, exponents and limits; the first problem found is returned, naming its key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let err = |key: String, reason: String| Err(SettingsError { key, reason });
        if self.currencies.is_empty() {
            return err(
                "ledger.currencies".to_owned(),
                "at least one currency must be configured".to_owned(),
            );
        }
        for (i, currency) in self.currencies.iter().enumerate() {
            let key = format!("ledger.currencies[{i}]");
            let code = &currency.code;
            if code.len() != 3 || !code.chars().all(|c| c.is_ascii_uppercase()) {
                return err(
                    format!("{key}.code"),
                    format!("`{code}` is not a 3-letter upper-case code"),
                );
            }
            if self.currencies[..i].iter().any(|c| &c.code == code) {
                return err(format!("{key}.code"), format!("`{code}` appears twice"));
            }
            if currency.exponent > CONFIG_EXPONENT_MAX {
                return err(
                    format!("{key}.exponent"),
                    format!("must be between 0 and {CONFIG_EXPONENT_MAX}"),
                );
            }
            for (name, limit) in [
                ("max_transfer", currency.max_transfer),
                ("max_per_24h", currency.max_per_24h),
            ] {
                let Some(limit) = limit else { continue };
                if limit <= Decimal::ZERO {
                    return err(
                        format!("{key}.{name}"),
                        format!("`{limit}` must be above zero (leave the key out for no limit)"),
                    );
                }
                // Refused, not rounded: a limit the currency cannot express is a typo.
                if limit.normalize().scale() > currency.exponent {
                    return err(
                        format!("{key}.{name}"),
                        format!(
                            "`{limit}` has more decimal places than {code} has ({})",
                            currency.exponent
                        ),
                    );
                }
            }
            if let (Some(single), Some(day)) = (currency.max_transfer, currency.max_per_24h) {
                if single > day {
                    return err(
                        format!("{key}.max_transfer"),
                        format!(
                            "`{single}` is above max_per_24h `{day}`: no transfer could reach it"
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(yaml: &str) -> String {
        let settings: LedgerSettings = serde_yaml_ng::from_str(yaml).expect(yaml);
        settings.validate().expect_err(yaml).to_string()
    }

    #[test]
    fn defaults_are_valid() {
        LedgerSettings::default().validate().unwrap();
    }

    /// One case per rule; each message names the key at fault.
    #[test]
    fn bad_currencies_and_limits_name_their_key() {
        let cases = [
            ("currencies: []", "ledger.currencies`"),
            (
                "currencies: [{code: eur, exponent: 2}]",
                "ledger.currencies[0].code",
            ),
            (
                "currencies: [{code: EUR, exponent: 2}, {code: EUR, exponent: 0}]",
                "ledger.currencies[1].code",
            ),
            (
                "currencies: [{code: EUR, exponent: 9}]",
                "ledger.currencies[0].exponent",
            ),
            (
                "currencies: [{code: EUR, exponent: 2, max_transfer: '0'}]",
                "ledger.currencies[0].max_transfer",
            ),
            (
                "currencies: [{code: EUR, exponent: 2, max_per_24h: '-5.00'}]",
                "ledger.currencies[0].max_per_24h",
            ),
            (
                "currencies: [{code: EUR, exponent: 2, max_transfer: '10.005'}]",
                "ledger.currencies[0].max_transfer",
            ),
            (
                "currencies: [{code: JPY, exponent: 0, max_per_24h: '100.5'}]",
                "ledger.currencies[0].max_per_24h",
            ),
            (
                "currencies: [{code: EUR, exponent: 2, max_transfer: '500', max_per_24h: '100'}]",
                "ledger.currencies[0].max_transfer",
            ),
        ];
        for (yaml, key) in cases {
            let message = err_of(yaml);
            assert!(
                message.contains(key),
                "`{yaml}` gave `{message}`, no `{key}`"
            );
        }
    }

    #[test]
    fn trailing_zeros_within_the_exponent_are_fine() {
        let settings: LedgerSettings = serde_yaml_ng::from_str(
            "currencies: [{code: JPY, exponent: 0, max_transfer: '100.00', max_per_24h: '100'}]",
        )
        .unwrap();
        settings.validate().unwrap();
    }
}
