//! The `merchants:` section of the config: the operator's rules for merchant invoices
//! (`docs/business.md`).

use serde::{Deserialize, Serialize};

use crate::merchants::invoice::{InvoiceRules, EXPIRES_IN_S_MAX, EXPIRES_IN_S_MIN};

/// Largest `invoice_expires_in_s_min` allowed, in seconds (one hour).
pub const INVOICE_EXPIRES_IN_S_MIN_MAX: u64 = 3600;

/// `merchants:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MerchantSettings {
    /// Shortest `expires_in_s` an invoice may ask, in seconds (1 to 3600; default 60).
    pub invoice_expires_in_s_min: u64,
}

impl Default for MerchantSettings {
    fn default() -> Self {
        Self {
            invoice_expires_in_s_min: EXPIRES_IN_S_MIN,
        }
    }
}

impl MerchantSettings {
    /// The invoice rules these settings make.
    pub fn invoice_rules(&self) -> InvoiceRules {
        InvoiceRules {
            expires_in_s_min: self.invoice_expires_in_s_min,
        }
    }

    /// Refuses values outside the bounds: `(key below merchants., reason)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let max = INVOICE_EXPIRES_IN_S_MIN_MAX.min(EXPIRES_IN_S_MAX);
        if !(1..=max).contains(&self.invoice_expires_in_s_min) {
            return Err((
                "invoice_expires_in_s_min",
                format!("must be between 1 and {max} seconds"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shortest_invoice_lifetime_is_bounded_and_named_in_errors() {
        let config =
            crate::config::Config::from_yaml("merchants: {invoice_expires_in_s_min: 5}").unwrap();
        assert_eq!(config.merchants.invoice_rules().expires_in_s_min, 5);
        for bad in ["0", "3601"] {
            let error = crate::config::Config::from_yaml(&format!(
                "merchants: {{invoice_expires_in_s_min: {bad}}}"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                error.contains("`merchants.invoice_expires_in_s_min`"),
                "{error}"
            );
        }
    }
}
