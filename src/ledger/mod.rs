//! The wallet ledger: double-entry, two-phase transfers over an embedded store.
//!
//! This module knows nothing of Matrix: it speaks accounts, currencies, transfers and
//! integer minor units.

pub mod settings;

pub use settings::{CurrencySpec, LedgerSettings};
