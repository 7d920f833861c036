//! The one YAML config file. Every field has a doc comment and a default; errors name the key.
//!
//! `docs/config.md` documents every key and `config.example.yaml` shows every key with a
//! comment; a unit test keeps the three in step.

pub mod merchants;
pub mod payments;
pub mod webhooks;

use std::net::SocketAddr;
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

/// Environment variables starting with this override config keys, `__` separating the levels:
/// `MXPAY__HOMESERVER__URL=http://synapse:8008` sets `homeserver.url`. Values are read as YAML
/// scalars (`8008`, `true`, `info`). The double underscore keeps them apart from mxpay's other
/// variables (`MXPAY_ADMIN_TOKEN`, `MXPAY_PIN_PEPPER`, ...).
pub const ENV_OVERRIDE_PREFIX: &str = "MXPAY__";

/// `text` with the overrides among `vars` applied (see [`ENV_OVERRIDE_PREFIX`]); `text`
/// unchanged when there are none. An override naming an unknown key fails later, in parsing,
/// like the same key in the file.
pub fn with_env_overrides(
    text: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<String, ConfigError> {
    let overrides: Vec<(String, String)> = vars
        .filter(|(name, _)| name.starts_with(ENV_OVERRIDE_PREFIX))
        .collect();
    if overrides.is_empty() {
        return Ok(text.to_owned());
    }
    let parse = |message: String| ConfigError::Parse {
        path: PathBuf::new(),
        message,
    };
    let mut root: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| parse(e.to_string()))?;
    if root.is_null() {
        root = serde_yaml_ng::Value::Mapping(Default::default());
    }
    for (name, value) in overrides {
        let path: Vec<String> = name[ENV_OVERRIDE_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(invalid(&name, "an empty key level (three underscores?)"));
        }
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&value)
            .map_err(|e| invalid(&name, format!("not a YAML value: {e}")))?;
        let mut node = &mut root;
        for (depth, key) in path.iter().enumerate() {
            let serde_yaml_ng::Value::Mapping(map) = node else {
                return Err(invalid(
                    &name,
                    format!("`{}` is not a section", path[..depth].join(".")),
                ));
            };
            let key = serde_yaml_ng::Value::String(key.clone());
            if depth + 1 == path.len() {
                map.insert(key, value.clone());
                break;
            }
            node = map
                .entry(key)
                .or_insert_with(|| serde_yaml_ng::Value::Mapping(Default::default()));
        }
    }
    serde_yaml_ng::to_string(&root).map_err(|e| parse(e.to_string()))
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// The whole config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The homeserver mxpay serves.
    #[serde(default)]
    pub homeserver: HomeserverConfig,
    /// How mxpay presents itself as an application service.
    #[serde(default)]
    pub appservice: AppserviceConfig,
    /// Where mxpay keeps its databases (sled ledger and inbox, crypto store). Default `./data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Currencies and limits.
    #[serde(default)]
    pub ledger: LedgerSettings,
    /// Log level and format.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Payments: PIN pepper, step-up timeout, device trust, who may hold a wallet.
    #[serde(default)]
    pub payments: payments::PaymentsSettings,
    /// The admin API: token key, funding providers (`docs/admin-api.md`). Off by default.
    #[serde(default)]
    pub admin: crate::admin::AdminSettings,
    /// Where `/metrics` is served and whether it needs a token.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Delivery of webhooks to merchants: timeout, retry time, backoff, bounds.
    #[serde(default)]
    pub webhooks: webhooks::WebhookSettings,
    /// The operator's rules for merchant invoices.
    #[serde(default)]
    pub merchants: merchants::MerchantSettings,
}

/// `metrics:` section. `/metrics` counts wrong PINs and lockouts per run, which tells whoever
/// reads it when someone is guessing: keep it to the scraper.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A separate address serving `/metrics` only; when set, `appservice.listen` no longer
    /// serves it. Default none: `/metrics` is on `appservice.listen`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// A file holding a token scrapers must send as `Authorization: Bearer <token>` (mode 0600
    /// or stricter, like every secret file). Default none: no token asked.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
}

/// Largest metrics token file read, in bytes.
pub const METRICS_TOKEN_FILE_BYTES_MAX: u64 = 4096;

impl MetricsConfig {
    /// Reads the bearer token, if one is configured: a private file (see
    /// [`crate::private_fs`]) holding a non-empty token; surrounding whitespace is trimmed.
    pub fn load_bearer_token(&self) -> Result<Option<crate::secret::Secret>, ConfigError> {
        let Some(path) = &self.bearer_token_file else {
            return Ok(None);
        };
        let refused = |reason: String| invalid("metrics.bearer_token_file", reason);
        let cannot_read =
            |e: std::io::Error| refused(format!("cannot read {}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(cannot_read)?;
        crate::private_fs::check_private_file(&file, path).map_err(|e| refused(e.to_string()))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, METRICS_TOKEN_FILE_BYTES_MAX + 1),
            &mut bytes,
        )
        .map_err(cannot_read)?;
        if bytes.len() as u64 > METRICS_TOKEN_FILE_BYTES_MAX {
            return Err(refused(format!(
                "{} is larger than {METRICS_TOKEN_FILE_BYTES_MAX} bytes",
                path.display()
            )));
        }
        let token = std::str::from_utf8(bytes.trim_ascii())
            .map_err(|_| refused(format!("{} does not hold UTF-8 text", path.display())))?;
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(refused(format!(
                "{} must hold one token without spaces",
                path.display()
            )));
        }
        Ok(Some(crate::secret::Secret::new(token)))
    }
}

/// `homeserver:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverConfig {
    /// Base URL of the client-server API mxpay calls. Default `http://127.0.0.1:8008`.
    #[serde(default = "default_homeserver_url")]
    pub url: String,
    /// Domain of user IDs on this homeserver (`@alice:<server_name>`). Default `localhost`.
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

impl Default for HomeserverConfig {
    fn default() -> Self {
        Self {
            url: default_homeserver_url(),
            server_name: default_server_name(),
        }
    }
}

/// `appservice:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceConfig {
    /// The registration file (written by `mxpay generate-registration`, read at start for the
    /// tokens). Default `./appservice.yaml`.
    #[serde(default = "default_registration")]
    pub registration: PathBuf,
    /// Appservice id (registration `id`). Default `mxpay`.
    #[serde(default = "default_id")]
    pub id: String,
    /// Localpart of the bot user (registration `sender_localpart`). Default `_mxpay`.
    #[serde(default = "default_bot_localpart")]
    pub bot_localpart: String,
    /// Address the appservice API binds to. Default `127.0.0.1:29330`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// URL at which the homeserver reaches mxpay (registration `url`).
    /// Default `http://127.0.0.1:29330`.
    #[serde(default = "default_appservice_url")]
    pub url: String,
    /// Also accept the hs_token as `?access_token=` (legacy homeservers). Default `false`.
    #[serde(default)]
    pub legacy_query_auth: bool,
    /// Largest transaction body accepted, in bytes; larger ones get 413. Default 10 MiB.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Create the bot's device with MSC4190 (registration `io.element.msc4190`) instead of
    /// appservice login. Default `false`.
    #[serde(default)]
    pub msc4190: bool,
    /// Transactions received and not yet handled, at most; beyond it a new transaction is
    /// answered late (after a wait, with 503 `M_LIMIT_EXCEEDED` so the homeserver sends it again
    /// later) instead of buffered. Default 10,000; at least 1.
    #[serde(default = "default_pending_transactions_max")]
    pub pending_transactions_max: usize,
}

impl Default for AppserviceConfig {
    fn default() -> Self {
        Self {
            registration: default_registration(),
            id: default_id(),
            bot_localpart: default_bot_localpart(),
            listen: default_listen(),
            url: default_appservice_url(),
            legacy_query_auth: false,
            max_body_bytes: default_max_body_bytes(),
            msc4190: false,
            pending_transactions_max: default_pending_transactions_max(),
        }
    }
}

/// `logging:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// A tracing env-filter directive, e.g. `info` or `mxpay=debug,info`. Default `info`.
    /// The `RUST_LOG` environment variable, when set, wins.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `pretty` (human) or `json` (one object per line). Default `pretty`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::default(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    /// The same values as an empty config file.
    fn default() -> Self {
        Self {
            homeserver: HomeserverConfig::default(),
            appservice: AppserviceConfig::default(),
            data_dir: default_data_dir(),
            ledger: LedgerSettings::default(),
            logging: LoggingConfig::default(),
            payments: payments::PaymentsSettings::default(),
            admin: crate::admin::AdminSettings::default(),
            metrics: MetricsConfig::default(),
            webhooks: webhooks::WebhookSettings::default(),
            merchants: merchants::MerchantSettings::default(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_homeserver_url() -> String {
    "http://127.0.0.1:8008".to_owned()
}
fn default_server_name() -> String {
    "localhost".to_owned()
}
fn default_registration() -> PathBuf {
    PathBuf::from("./appservice.yaml")
}
fn default_id() -> String {
    "mxpay".to_owned()
}
fn default_bot_localpart() -> String {
    "_mxpay".to_owned()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 29330))
}
fn default_appservice_url() -> String {
    "http://127.0.0.1:29330".to_owned()
}
fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_pending_transactions_max() -> usize {
    10_000
}
fn default_log_level() -> String {
    "info".to_owned()
}

impl Config {
    /// Reads and validates the config at `path`; relative paths in it (`data_dir`,
    /// `appservice.registration`) are resolved against the directory holding the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let text = with_env_overrides(&text, std::env::vars()).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        let mut config = Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        // Absolute, so messages and a later change of working directory stay unambiguous.
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
        config.resolve_paths(&base);
        Ok(config)
    }

    /// Parses and validates config text; relative paths stay as written.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Makes relative paths absolute-ish by joining them to `base` (the config's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        self.payments.resolve_paths(base);
        self.admin.resolve_paths(base);
        let metrics_token = self.metrics.bearer_token_file.as_mut();
        for path in [&mut self.data_dir, &mut self.appservice.registration]
            .into_iter()
            .chain(metrics_token)
        {
            if path.is_relative() {
                let joined = base.join(&*path);
                // `./data` joined to `/etc/mxpay` reads better as `/etc/mxpay/data`.
                *path = joined.components().collect();
            }
        }
    }

    /// The bot's full user ID, `@<bot_localpart>:<server_name>`.
    pub fn bot_user_id(&self) -> String {
        format!(
            "@{}:{}",
            self.appservice.bot_localpart, self.homeserver.server_name
        )
    }

    /// `<data_dir>/inbox`: the appservice inbox database.
    pub fn inbox_dir(&self) -> PathBuf {
        self.data_dir.join("inbox")
    }

    /// Checks what serde cannot: ranges and contradictions.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_http_url("homeserver.url", &self.homeserver.url)?;
        check_http_url("appservice.url", &self.appservice.url)?;
        let server_name = &self.homeserver.server_name;
        if server_name.is_empty()
            || !server_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        {
            return Err(invalid(
                "homeserver.server_name",
                format!("`{server_name}` is not a valid server name (e.g. `example.org`)"),
            ));
        }
        let id = &self.appservice.id;
        if id.is_empty() || id.len() > 255 || id.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(invalid(
                "appservice.id",
                "must be 1-255 characters, without whitespace or `/`",
            ));
        }
        let localpart = &self.appservice.bot_localpart;
        if localpart.is_empty()
            || !localpart
                .chars()
                .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/' | '+'))
        {
            return Err(invalid(
                "appservice.bot_localpart",
                format!(
                    "`{localpart}` is not a valid user localpart (lower-case letters, digits, \
                     `._=-/+`)"
                ),
            ));
        }
        if ruma::UserId::parse(self.bot_user_id()).is_err() {
            return Err(invalid(
                "appservice.bot_localpart",
                format!("`{}` is not a valid user ID", self.bot_user_id()),
            ));
        }
        if self.appservice.max_body_bytes < 1024 {
            return Err(invalid(
                "appservice.max_body_bytes",
                "must be at least 1024 bytes",
            ));
        }
        if self.appservice.pending_transactions_max == 0 {
            return Err(invalid(
                "appservice.pending_transactions_max",
                "must be at least 1",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self.appservice.registration.as_os_str().is_empty() {
            return Err(invalid("appservice.registration", "must not be empty"));
        }
        if self
            .metrics
            .bearer_token_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("metrics.bearer_token_file", "must not be empty"));
        }
        // Port 0 (tests) picks a free port for each, so the two cannot collide.
        if self.metrics.listen == Some(self.appservice.listen) && self.appservice.listen.port() != 0
        {
            return Err(invalid(
                "metrics.listen",
                "must differ from appservice.listen (leave it out to serve /metrics there)",
            ));
        }
        if let Err(e) = self.logging.level.parse::<tracing_subscriber::EnvFilter>() {
            return Err(invalid(
                "logging.level",
                format!("not a tracing filter directive: {e}"),
            ));
        }
        self.payments.validate().map_err(|e| match e {
            payments::SettingsError::Invalid { key, reason } => {
                invalid(&format!("payments.{key}"), reason)
            }
            other => invalid("payments", other.to_string()),
        })?;
        self.webhooks
            .validate()
            .map_err(|(key, reason)| invalid(&format!("webhooks.{key}"), reason))?;
        self.merchants
            .validate()
            .map_err(|(key, reason)| invalid(&format!("merchants.{key}"), reason))?;
        self.admin.validate().map_err(
            |crate::admin::settings::SettingsError::Invalid { key, reason }| ConfigError::Invalid {
                key,
                reason,
            },
        )?;
        self.ledger.validate().map_err(
            |crate::ledger::settings::SettingsError { key, reason }| ConfigError::Invalid {
                key,
                reason,
            },
        )?;
        Ok(())
    }
}

fn check_http_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(invalid(
            key,
            format!("`{value}` must be an http:// or https:// URL with a host"),
        )),
        Err(e) => Err(invalid(key, format!("`{value}` is not a URL: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(yaml: &str) -> String {
        Config::from_yaml(yaml).expect_err(yaml).to_string()
    }

    #[test]
    fn empty_config_has_contract_defaults() {
        let c = Config::from_yaml("{}").unwrap();
        assert_eq!(c.homeserver.url, "http://127.0.0.1:8008");
        assert_eq!(c.homeserver.server_name, "localhost");
        assert_eq!(c.appservice.id, "mxpay");
        assert_eq!(c.appservice.bot_localpart, "_mxpay");
        assert_eq!(c.appservice.listen.to_string(), "127.0.0.1:29330");
        assert_eq!(c.appservice.max_body_bytes, 10_485_760);
        assert!(!c.appservice.legacy_query_auth);
        assert!(!c.appservice.msc4190);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.logging.format, LogFormat::Pretty);
        assert_eq!(c.bot_user_id(), "@_mxpay:localhost");
        assert_eq!(c, Config::default(), "Default matches the empty file");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("homeserver: {url: 'ftp://x'}", "homeserver.url"),
            ("homeserver: {url: 'not a url'}", "homeserver.url"),
            ("appservice: {url: 'nope'}", "appservice.url"),
            ("homeserver: {server_name: 'a b'}", "homeserver.server_name"),
            (
                "appservice: {bot_localpart: 'Bot'}",
                "appservice.bot_localpart",
            ),
            ("appservice: {id: ''}", "appservice.id"),
            (
                "appservice: {max_body_bytes: 10}",
                "appservice.max_body_bytes",
            ),
            ("logging: {level: 'a=b=c'}", "logging.level"),
            (
                "ledger: {currencies: [{code: eur, exponent: 2}]}",
                "ledger.currencies[0].code",
            ),
            // serde-level errors: mistyped or unknown keys carry their path in the message.
            ("appservice: {listen: 'nowhere'}", "appservice.listen"),
            (
                "appservice: {max_body_bytes: 'big'}",
                "appservice.max_body_bytes",
            ),
            ("logging: {format: xml}", "logging.format"),
            ("appservice: {lisen: '127.0.0.1:1'}", "lisen"),
        ];
        for (yaml, key) in cases {
            let message = err_of(yaml);
            assert!(
                message.contains(key),
                "`{yaml}` gave `{message}`, no `{key}`"
            );
        }
    }

    /// One case per start-up rule of the issue: the message names the key and says why.
    #[test]
    fn every_rule_names_the_key_and_the_reason() {
        let cases = [
            // Unknown keys, at any depth: serde names the section and the key.
            ("colour: blue", "unknown field `colour`"),
            ("payments: {pepper: x}", "payments: unknown field `pepper`"),
            (
                "ledger: {currencies: [{code: EUR, exponent: 2, limit: '1'}]}",
                "ledger.currencies[0]: unknown field `limit`",
            ),
            // Bad URLs.
            ("homeserver: {url: 'http://'}", "homeserver.url"),
            // A currency without its exponent.
            (
                "ledger: {currencies: [{code: EUR}]}",
                "ledger.currencies[0]: missing field `exponent`",
            ),
            (
                "ledger: {currencies: [{code: EUR, exponent: 2}, {code: EUR, exponent: 2}]}",
                "`ledger.currencies[1].code`: `EUR` appears twice",
            ),
            // Limits that contradict each other or the currency.
            (
                "ledger: {currencies: [{code: EUR, exponent: 2, max_transfer: '50', \
                 max_per_24h: '20'}]}",
                "`ledger.currencies[0].max_transfer`: `50` is above max_per_24h",
            ),
            (
                "ledger: {currencies: [{code: EUR, exponent: 2, max_transfer: '0'}]}",
                "`ledger.currencies[0].max_transfer`: `0` must be above zero",
            ),
            (
                "ledger: {currencies: [{code: EUR, exponent: 2, max_per_24h: '-1'}]}",
                "`ledger.currencies[0].max_per_24h`: `-1` must be above zero",
            ),
            (
                "ledger: {currencies: [{code: EUR, exponent: 2, max_transfer: '0.001'}]}",
                "`ledger.currencies[0].max_transfer`: `0.001` has more decimal places",
            ),
            (
                "ledger: {currencies: []}",
                "`ledger.currencies`: at least one",
            ),
            // Durations and timeouts.
            (
                "payments: {stepup_timeout_ms: 0}",
                "`payments.stepup_timeout_ms`: must be between",
            ),
            // PSD2: an authentication code lives at most 5 minutes.
            (
                "payments: {stepup_timeout_ms: 600000}",
                "`payments.stepup_timeout_ms`: must be between 1000 and 300000",
            ),
            (
                "payments: {pin_dialog_timeout_ms: 99999999}",
                "`payments.pin_dialog_timeout_ms`: must be between",
            ),
            (
                "payments: {withdrawal_timeout_ms: 999999999999}",
                "`payments.withdrawal_timeout_ms`: must be between",
            ),
            (
                "payments: {stepup_timeout_ms: -5}",
                "payments.stepup_timeout_ms: invalid type: integer `-5`",
            ),
            (
                "admin: {webhook_tolerance_s: 7200}",
                "`admin.webhook_tolerance_s`: must be between",
            ),
            ("admin: {token_ttl_max_s: 0}", "`admin.token_ttl_max_s`"),
            // Incomplete admin token settings.
            (
                "admin: {token: {algorithm: EdDSA}}",
                "`admin.token.public_key`: EdDSA needs",
            ),
            (
                "admin: {token: {algorithm: HS256}}",
                "`admin.token.secret`: HS256 needs",
            ),
            (
                "admin: {token: {algorithm: RS256, secret: {env: X}}}",
                "admin.token.algorithm: unknown variant `RS256`",
            ),
            // Providers with duplicate names.
            (
                "admin: {providers: [{name: acme, secret: {env: A}}, \
                 {name: acme, secret: {env: B}}]}",
                "`admin.providers[1].name`: `acme` appears twice",
            ),
            (
                "payments: {wallet_holders: ['not a holder']}",
                "`payments.wallet_holders`",
            ),
        ];
        for (yaml, expected) in cases {
            let message = err_of(yaml);
            assert!(
                message.contains(expected),
                "`{yaml}` gave `{message}`, not `{expected}`"
            );
        }
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "data_dir: ./state\nappservice:\n  registration: reg/appservice.yaml\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.data_dir, dir.path().join("state"));
        assert_eq!(
            c.appservice.registration,
            dir.path().join("reg/appservice.yaml")
        );
        assert_eq!(c.inbox_dir(), dir.path().join("state/inbox"));

        std::fs::write(&path, "data_dir: /var/lib/mxpay\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/mxpay"));
    }

    #[test]
    fn load_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "appservice: {listen: 3}\n").unwrap();
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("config.yaml"), "{message}");
        let missing = Config::load(&dir.path().join("nope.yaml")).unwrap_err();
        assert!(missing.to_string().contains("nope.yaml"));
    }

    #[test]
    fn environment_variables_override_keys_at_any_depth() {
        let vars = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
                .into_iter()
        };
        let text = "homeserver:\n  url: http://a:8008\n  server_name: example.org\n";
        let overridden = with_env_overrides(
            text,
            vars(&[
                ("MXPAY__HOMESERVER__URL", "http://b:8008"),
                ("MXPAY__PAYMENTS__ENABLED", "false"),
                ("MXPAY_ADMIN_TOKEN", "not a config key"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        let config = Config::from_yaml(&overridden).unwrap();
        assert_eq!(config.homeserver.url, "http://b:8008");
        assert_eq!(config.homeserver.server_name, "example.org");
        assert!(!config.payments.enabled);
        // Nothing to override: the text as it was.
        assert_eq!(with_env_overrides(text, vars(&[])).unwrap(), text);
        // An unknown key fails as it would in the file.
        let unknown = with_env_overrides(text, vars(&[("MXPAY__HOMESERVER__NOPE", "1")])).unwrap();
        let error = Config::from_yaml(&unknown).unwrap_err().to_string();
        assert!(error.contains("nope"), "{error}");
        let error = with_env_overrides(text, vars(&[("MXPAY__HOMESERVER__URL__X", "1")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("homeserver.url"), "{error}");
    }

    /// Every key in the example config parses and is documented in docs/config.md.
    #[test]
    fn example_config_parses_and_every_key_is_documented() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let example = std::fs::read_to_string(root.join("config.example.yaml")).unwrap();
        Config::from_yaml(&example).expect("config.example.yaml is valid");
        let docs = std::fs::read_to_string(root.join("docs/config.md")).unwrap();
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&example).unwrap();
        let mut keys = Vec::new();
        collect_keys(&value, "", &mut keys);
        assert!(keys.len() > 15, "too few keys found: {keys:?}");
        for key in keys {
            assert!(
                docs.contains(&format!("`{key}`")),
                "docs/config.md does not document `{key}`"
            );
        }
    }

    /// The reverse direction: every key in docs/config.md's tables is a key of `Config`, every
    /// key of `Config` is documented, and config.example.yaml has every top-level section.
    #[test]
    fn documented_keys_are_exactly_the_config_keys() {
        use crate::admin::settings::{
            ProviderSettings, SecretSource, TokenAlgorithm, TokenKeySettings,
        };
        // Every optional part filled in, so serialising shows every key the code knows.
        let mut full = Config::default();
        full.ledger.currencies[0].max_transfer = Some(rust_decimal::Decimal::ONE);
        full.ledger.currencies[0].max_per_24h = Some(rust_decimal::Decimal::TWO);
        full.payments.pepper_file = Some(PathBuf::from("pepper"));
        full.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 9330)));
        full.metrics.bearer_token_file = Some(PathBuf::from("metrics.token"));
        full.admin.token = Some(TokenKeySettings {
            algorithm: TokenAlgorithm::EdDsa,
            secret: Some(SecretSource::env("A")),
            public_key: Some(SecretSource::env("B")),
            private_key: Some(SecretSource::env("C")),
        });
        full.admin.providers = vec![ProviderSettings {
            name: "acme".to_owned(),
            secret: SecretSource::env("D"),
        }];
        let value = serde_yaml_ng::to_value(&full).unwrap();
        let mut code_keys = Vec::new();
        collect_keys(&value, "", &mut code_keys);
        // A secret source's `file` / `env` are described once, not under every secret key.
        code_keys.retain(|k| !k.ends_with(".file") && !k.ends_with(".env"));

        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let docs = std::fs::read_to_string(root.join("docs/config.md")).unwrap();
        let documented: Vec<String> = docs
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split('`').next())
            .map(str::to_owned)
            .collect();
        assert!(
            documented.len() > 30,
            "too few documented keys: {documented:?}"
        );
        for key in &documented {
            assert!(
                code_keys.contains(key),
                "docs/config.md documents `{key}`, which is not a config key"
            );
        }
        for key in &code_keys {
            assert!(
                documented.contains(key),
                "config key `{key}` is not in docs/config.md's tables"
            );
        }

        let example: serde_yaml_ng::Value = serde_yaml_ng::from_str(
            &std::fs::read_to_string(root.join("config.example.yaml")).unwrap(),
        )
        .unwrap();
        let serde_yaml_ng::Value::Mapping(sections) = &value else {
            panic!("config serialises to a mapping")
        };
        for section in sections.keys() {
            assert!(
                example.get(section).is_some(),
                "config.example.yaml has no `{}` section",
                section.as_str().unwrap_or_default()
            );
        }
    }

    fn collect_keys(value: &serde_yaml_ng::Value, prefix: &str, out: &mut Vec<String>) {
        match value {
            serde_yaml_ng::Value::Mapping(map) => {
                for (k, v) in map {
                    let k = k.as_str().expect("string keys");
                    let key = if prefix.is_empty() {
                        k.to_owned()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.push(key.clone());
                    collect_keys(v, &key, out);
                }
            }
            serde_yaml_ng::Value::Sequence(items) => {
                for item in items {
                    collect_keys(item, &format!("{prefix}[]"), out);
                }
            }
            _ => {}
        }
    }
}
