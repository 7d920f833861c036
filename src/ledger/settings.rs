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
    /// Largest total a user account may send in any rolling 24 hours, in major units.
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
