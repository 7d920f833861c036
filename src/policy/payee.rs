//! Who may hold a wallet: `*`, a whole server (`example.org`), or single users
//! (`@bob:example.org`).

use matrix_sdk::ruma::UserId;
use serde::{Deserialize, Serialize};

/// The `payments.wallet_holders` config list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WalletHolders(pub Vec<String>);

impl Default for WalletHolders {
    fn default() -> Self {
        Self(vec!["*".to_owned()])
    }
}

/// Why a config entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither `*`, a server name, nor a full user ID")]
pub struct BadHolderPattern(pub String);

impl WalletHolders {
    /// Checks every entry's form.
    pub fn validate(&self) -> Result<(), BadHolderPattern> {
        for pattern in &self.0 {
            let ok = pattern == "*"
                || (pattern.starts_with('@') && UserId::parse(pattern.as_str()).is_ok())
                || (!pattern.is_empty()
                    && !pattern.contains(['@', ':', '*', ' '])
                    && (pattern.contains('.') || pattern == "localhost"));
            if !ok {
                return Err(BadHolderPattern(pattern.clone()));
            }
        }
        Ok(())
    }

    /// Whether `user` may hold a wallet.
    pub fn allows(&self, user: &UserId) -> bool {
        self.0.iter().any(|pattern| {
            pattern == "*" || pattern == user.as_str() || pattern == user.server_name().as_str()
        })
    }
}

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::user_id;

    use super::*;

    #[test]
    fn star_domain_and_user_patterns() {
        let bob = user_id!("@bob:example.org");
        let eve = user_id!("@eve:evil.test");
        assert!(WalletHolders::default().allows(eve));
        let domain = WalletHolders(vec!["example.org".into()]);
        assert!(domain.allows(bob) && !domain.allows(eve));
        let single = WalletHolders(vec!["@eve:evil.test".into()]);
        assert!(single.allows(eve) && !single.allows(bob));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["", "@bob", "*.org", "bob:example.org", "some name"] {
            assert!(WalletHolders(vec![bad.into()]).validate().is_err(), "{bad}");
        }
        assert!(
            WalletHolders(vec!["*".into(), "localhost".into(), "@b:x.org".into()])
                .validate()
                .is_ok()
        );
    }
}
