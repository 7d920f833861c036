//! The `payments:` section of the config.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::payee::WalletHolders;
use crate::policy::pin::Pepper;

/// Environment variable that may hold the PIN pepper (at least 32 bytes, e.g. 64 hex
/// characters); it wins over `payments.pepper_file`.
pub const PEPPER_ENV: &str = "MXPAY_PIN_PEPPER";

/// Default time a payer has to confirm with their PIN: 2 minutes.
pub const STEPUP_TIMEOUT_MS_DEFAULT: u64 = 120_000;

/// Longest time a payer may be given to confirm with their PIN: 5 minutes. PSD2's strong
/// customer authentication (RTS 2018/389, art. 4(3)(d)) lets an authentication code live at
/// most 5 minutes; a longer window also widens the time a stolen session can ride on a
/// waiting payment.
pub const STEPUP_TIMEOUT_MS_MAX: u64 = 300_000;

/// Default time the bot waits for a PIN during `!pin set` / `!pin change`: 5 minutes.
pub const PIN_DIALOG_TIMEOUT_MS_DEFAULT: u64 = 300_000;

/// Default time a withdrawal waits for the admin to settle it: 7 days.
pub const WITHDRAWAL_TIMEOUT_MS_DEFAULT: u64 = 7 * 24 * 3_600_000;

/// Default bound on one user's payments and withdrawals waiting for their PIN at once.
pub const PENDING_PER_USER_MAX_DEFAULT: u32 = 5;

/// Default bound on the payment commands (`!pay`, `!withdraw`, transfer intents) one user may
/// start per minute.
pub const COMMANDS_PER_MINUTE_MAX_DEFAULT: u32 = 10;

/// Why the payments settings are unusable. Never contains the pepper.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value is out of range or malformed; names the key.
    #[error("config key `payments.{key}`: {reason}")]
    Invalid {
        /// Key below `payments.`.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// Payments are on but no pepper was given.
    #[error(
        "payments are enabled but no PIN pepper is configured: set `payments.pepper_file` to a \
         file holding at least 32 random bytes (e.g. `openssl rand -hex 32 > pepper`), or the \
         environment variable {PEPPER_ENV}"
    )]
    PepperMissing,
    /// The pepper file could not be read.
    #[error("cannot read the PIN pepper file {path} (payments.pepper_file): {source}")]
    PepperRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The pepper file lets group or others in.
    #[error("the PIN pepper file (payments.pepper_file) is not private: {0}")]
    PepperNotPrivate(crate::private_fs::PrivateFsError),
    /// The pepper is shorter than 32 bytes.
    #[error("the PIN pepper from {0} is shorter than 32 bytes")]
    PepperShort(String),
}

/// `payments:` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentsSettings {
    /// Whether the bot handles payment commands. Default `false`: payments need a pepper.
    #[serde(default)]
    pub enabled: bool,
    /// File holding the PIN pepper (at least 32 bytes; surrounding whitespace is ignored).
    /// Keep it outside `data_dir`. The environment variable `MXPAY_PIN_PEPPER` wins over it.
    #[serde(default)]
    pub pepper_file: Option<PathBuf>,
    /// How long a payer has to confirm a payment with their PIN, in ms; then the reservation
    /// is released. Default 120000.
    #[serde(default = "default_stepup_timeout_ms")]
    pub stepup_timeout_ms: u64,
    /// How long the bot waits for each PIN of `!pin set` / `!pin change`, in ms. Default 300000.
    #[serde(default = "default_pin_dialog_timeout_ms")]
    pub pin_dialog_timeout_ms: u64,
    /// How long a confirmed withdrawal waits for the admin to settle it, in ms; then the money
    /// returns to the wallet. Default 604800000 (7 days).
    #[serde(default = "default_withdrawal_timeout_ms")]
    pub withdrawal_timeout_ms: u64,
    /// Accept payments from devices their owners did not cross-sign (clients without
    /// cross-signing, such as matrix-nio). Default `false`.
    #[serde(default)]
    pub allow_unsigned_devices: bool,
    /// Who may hold a wallet (be paid): `*`, server names, or full user IDs. Default `["*"]`.
    #[serde(default)]
    pub wallet_holders: WalletHolders,
    /// Most payments and withdrawals of one user waiting for their PIN at once; a further one
    /// is declined (`too_many_pending`). Default 5 (1 to 100).
    #[serde(default = "default_pending_per_user_max")]
    pub pending_per_user_max: u32,
    /// Most payment commands (`!pay`, `!withdraw`, transfer intents) one user may start per
    /// minute; further ones are declined (`rate_limited`). Default 10 (1 to 600).
    #[serde(default = "default_commands_per_minute_max")]
    pub commands_per_minute_max: u32,
    /// How long a payment request (`!request`, `!split`, an `org.mxpay.payment_request`
    /// without `expires_at_ms`) stays open before it lapses, in ms. Default 604800000 (7 days;
    /// 1 minute to 30 days).
    #[serde(default = "default_request_expiry_default_ms")]
    pub request_expiry_default_ms: u64,
    /// Whether every confirmed payment waits for its payee to accept it (✅ or `!accept`)
    /// before it is posted; declined or not accepted within `accept_window_ms`, it goes back
    /// to the payer. Default `false`.
    #[serde(default)]
    pub payee_must_accept: bool,
    /// Whether a payment to someone who never used mxpay (no PIN, no wallet) waits for them to
    /// accept it even with `payee_must_accept` off, so money sent to a mistyped or unused
    /// account comes back. Default `true`.
    #[serde(default = "default_true")]
    pub hold_for_new_payees: bool,
    /// How long a held payment waits for its payee, in ms, counted from the end of the
    /// payer's PIN window; then it returns to the payer. Default 86400000 (24 hours; 1 second
    /// to 7 days).
    #[serde(default = "default_accept_window_ms")]
    pub accept_window_ms: u64,
}

fn default_true() -> bool {
    true
}
fn default_accept_window_ms() -> u64 {
    ACCEPT_WINDOW_DEFAULT_MS
}

/// Default of `accept_window_ms`: 24 hours (the requests module's own default; a test in the
/// payment flow keeps them equal).
pub const ACCEPT_WINDOW_DEFAULT_MS: u64 = 24 * 3_600_000;
/// Upper bound of `accept_window_ms`: 7 days.
pub const ACCEPT_WINDOW_MAX_MS: u64 = 7 * 24 * 3_600_000;

fn default_stepup_timeout_ms() -> u64 {
    STEPUP_TIMEOUT_MS_DEFAULT
}
fn default_pin_dialog_timeout_ms() -> u64 {
    PIN_DIALOG_TIMEOUT_MS_DEFAULT
}
fn default_withdrawal_timeout_ms() -> u64 {
    WITHDRAWAL_TIMEOUT_MS_DEFAULT
}
fn default_pending_per_user_max() -> u32 {
    PENDING_PER_USER_MAX_DEFAULT
}
fn default_commands_per_minute_max() -> u32 {
    COMMANDS_PER_MINUTE_MAX_DEFAULT
}
fn default_request_expiry_default_ms() -> u64 {
    REQUEST_EXPIRY_DEFAULT_MS
}

/// Default of `request_expiry_default_ms`: 7 days (the requests module's own default; a test
/// in the payment flow keeps them equal).
pub const REQUEST_EXPIRY_DEFAULT_MS: u64 = 7 * 24 * 3_600_000;
/// Upper bound of `request_expiry_default_ms`: 30 days, the longest a request stays open.
pub const REQUEST_EXPIRY_MAX_MS: u64 = 30 * 24 * 3_600_000;

impl Default for PaymentsSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            pepper_file: None,
            stepup_timeout_ms: STEPUP_TIMEOUT_MS_DEFAULT,
            pin_dialog_timeout_ms: PIN_DIALOG_TIMEOUT_MS_DEFAULT,
            withdrawal_timeout_ms: WITHDRAWAL_TIMEOUT_MS_DEFAULT,
            allow_unsigned_devices: false,
            wallet_holders: WalletHolders::default(),
            pending_per_user_max: PENDING_PER_USER_MAX_DEFAULT,
            commands_per_minute_max: COMMANDS_PER_MINUTE_MAX_DEFAULT,
            request_expiry_default_ms: REQUEST_EXPIRY_DEFAULT_MS,
            payee_must_accept: false,
            hold_for_new_payees: true,
            accept_window_ms: ACCEPT_WINDOW_DEFAULT_MS,
        }
    }
}

impl PaymentsSettings {
    /// Checks ranges and forms (not the pepper, which is read at start).
    pub fn validate(&self) -> Result<(), SettingsError> {
        let ranges: [(&'static str, u64, u64, u64); 7] = [
            (
                "stepup_timeout_ms",
                self.stepup_timeout_ms,
                1_000,
                STEPUP_TIMEOUT_MS_MAX,
            ),
            (
                "pin_dialog_timeout_ms",
                self.pin_dialog_timeout_ms,
                1_000,
                3_600_000,
            ),
            (
                "withdrawal_timeout_ms",
                self.withdrawal_timeout_ms,
                1_000,
                crate::ledger::PENDING_TIMEOUT_MS_MAX,
            ),
            (
                "pending_per_user_max",
                u64::from(self.pending_per_user_max),
                1,
                100,
            ),
            (
                "commands_per_minute_max",
                u64::from(self.commands_per_minute_max),
                1,
                600,
            ),
            (
                "request_expiry_default_ms",
                self.request_expiry_default_ms,
                60_000,
                REQUEST_EXPIRY_MAX_MS,
            ),
            (
                "accept_window_ms",
                self.accept_window_ms,
                1_000,
                ACCEPT_WINDOW_MAX_MS,
            ),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(SettingsError::Invalid {
                    key,
                    reason: format!("must be between {min} and {max}"),
                });
            }
        }
        self.wallet_holders
            .validate()
            .map_err(|e| SettingsError::Invalid {
                key: "wallet_holders",
                reason: e.to_string(),
            })?;
        if self
            .pepper_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(SettingsError::Invalid {
                key: "pepper_file",
                reason: "must not be empty".to_owned(),
            });
        }
        Ok(())
    }

    /// Resolves a relative `pepper_file` against the config's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(path) = &mut self.pepper_file {
            if path.is_relative() {
                *path = base.join(&*path).components().collect();
            }
        }
    }

    /// Reads the pepper: `MXPAY_PIN_PEPPER` if set, else `pepper_file`.
    pub fn load_pepper(&self) -> Result<Pepper, SettingsError> {
        let (bytes, source) = match std::env::var(PEPPER_ENV) {
            Ok(value) => (value.trim().as_bytes().to_vec(), PEPPER_ENV.to_owned()),
            Err(_) => {
                let path = self
                    .pepper_file
                    .as_ref()
                    .ok_or(SettingsError::PepperMissing)?;
                let read_err = |source| SettingsError::PepperRead {
                    path: path.clone(),
                    source,
                };
                let mut file = std::fs::File::open(path).map_err(read_err)?;
                crate::private_fs::check_private_file(&file, path)
                    .map_err(SettingsError::PepperNotPrivate)?;
                let mut raw = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut raw).map_err(read_err)?;
                (trim_ascii(&raw).to_vec(), path.display().to_string())
            }
        };
        Pepper::new(bytes).map_err(|_| SettingsError::PepperShort(source))
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_ranges() {
        let settings: PaymentsSettings = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!(settings, PaymentsSettings::default());
        assert!(settings.validate().is_ok());
        let short = PaymentsSettings {
            stepup_timeout_ms: 10,
            ..PaymentsSettings::default()
        };
        assert!(short
            .validate()
            .unwrap_err()
            .to_string()
            .contains("payments.stepup_timeout_ms"));
        assert!(serde_yaml_ng::from_str::<PaymentsSettings>("pepper: x").is_err());
        assert_eq!(settings.pending_per_user_max, 5);
        let unbounded = PaymentsSettings {
            pending_per_user_max: 0,
            ..PaymentsSettings::default()
        };
        assert!(unbounded
            .validate()
            .unwrap_err()
            .to_string()
            .contains("payments.pending_per_user_max"));
    }

    #[test]
    fn accept_window_is_bounded() {
        let settings: PaymentsSettings = serde_yaml_ng::from_str("{}").unwrap();
        assert!(!settings.payee_must_accept);
        assert!(settings.hold_for_new_payees);
        assert_eq!(settings.accept_window_ms, 86_400_000);
        for (window, ok) in [(999, false), (1_000, true), (ACCEPT_WINDOW_MAX_MS, true)] {
            let s = PaymentsSettings {
                accept_window_ms: window,
                ..PaymentsSettings::default()
            };
            assert_eq!(s.validate().is_ok(), ok, "{window}");
        }
        let longer = PaymentsSettings {
            accept_window_ms: ACCEPT_WINDOW_MAX_MS + 1,
            ..PaymentsSettings::default()
        };
        assert!(longer
            .validate()
            .unwrap_err()
            .to_string()
            .contains("payments.accept_window_ms"));
    }

    /// PSD2: a PIN confirms a payment within 5 minutes at most.
    #[test]
    fn stepup_timeout_is_at_most_five_minutes() {
        let at_most = PaymentsSettings {
            stepup_timeout_ms: 300_000,
            ..PaymentsSettings::default()
        };
        assert!(at_most.validate().is_ok());
        let longer = PaymentsSettings {
            stepup_timeout_ms: 300_001,
            ..PaymentsSettings::default()
        };
        let message = longer.validate().unwrap_err().to_string();
        assert!(
            message.contains("`payments.stepup_timeout_ms`") && message.contains("300000"),
            "{message}"
        );
    }

    #[test]
    fn pepper_file_is_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pepper");
        let secret = "0123456789abcdef0123456789abcdef0123";
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let settings = PaymentsSettings {
            pepper_file: Some(path.clone()),
            ..PaymentsSettings::default()
        };
        if std::env::var(PEPPER_ENV).is_err() {
            let pepper = settings.load_pepper().unwrap();
            assert!(!format!("{pepper:?}").contains(secret));
            std::fs::write(&path, "short").unwrap();
            let error = settings.load_pepper().unwrap_err().to_string();
            assert!(error.contains("shorter than 32 bytes") && !error.contains("short\""));
        }
        #[cfg(unix)]
        if std::env::var(PEPPER_ENV).is_err() {
            // As ssh with a private key: a pepper file others can read is refused, naming it.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::write(&path, format!("{secret}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let error = settings.load_pepper().unwrap_err().to_string();
            assert!(
                error.contains("payments.pepper_file")
                    && error.contains(&format!("chmod 600 {}", path.display())),
                "{error}"
            );
            assert!(!error.contains(secret), "{error}");
        }
        let missing = PaymentsSettings::default();
        if std::env::var(PEPPER_ENV).is_err() {
            let error = missing.load_pepper().unwrap_err();
            assert!(matches!(error, SettingsError::PepperMissing));
            // The start-up sentence names the key to set and the variable that may replace it.
            let message = error.to_string();
            assert!(message.contains("`payments.pepper_file`") && message.contains(PEPPER_ENV));
        }
    }
}
