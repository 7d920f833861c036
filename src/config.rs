//! The one YAML config file. Every field has a doc comment and a default; errors name the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ledger::LedgerSettings;

/// Errors loading or validating the config; each names the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML did not parse or a key is unknown or mistyped.
    #[error("config file {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// serde's message, which names the key and line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the key, e.g. `ledger.currencies[0].exponent`.
        key: String,
        /// Why the value is refused.
        reason: String,
    },
}

/// The whole config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where mxpay keeps its databases (sled ledger and inbox, crypto store). Default `./data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Currencies and limits.
    #[serde(default)]
    pub ledger: LedgerSettings,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges and contradictions.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, currency) in self.ledger.currencies.iter().enumerate() {
            let key = format!("ledger.currencies[{i}]");
            if currency.code.len() != 3 || !currency.code.chars().all(|c| c.is_ascii_uppercase()) {
                return Err(ConfigError::Invalid {
                    key: format!("{key}.code"),
                    reason: format!("`{}` is not a 3-letter upper-case code", currency.code),
                });
            }
            if currency.exponent > 8 {
                return Err(ConfigError::Invalid {
                    key: format!("{key}.exponent"),
                    reason: "must be between 0 and 8".to_owned(),
                });
            }
        }
        Ok(())
    }
}
