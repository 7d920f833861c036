//! The appservice registration file: what the homeserver admin installs, and where mxpay reads
//! its `as_token` and `hs_token` from at start.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
pub use crate::secret::TOKEN_RANDOM_BYTES;

/// Errors reading, writing or checking a registration; each names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The file could not be read.
    #[error("cannot read registration file {path}: {source} (create it with `mxpay generate-registration -c <config>`)")]
    Read {
        /// The registration file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("cannot write registration file {path}: {source}")]
    Write {
        /// The registration file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML did not parse.
    #[error("registration file {path}: {message}")]
    Parse {
        /// The registration file.
        path: PathBuf,
        /// serde's message.
        message: String,
    },
    /// The registration disagrees with the config.
    #[error("registration file {path}: `{field}` is `{found}` but the config says `{expected}` (regenerate the registration or fix the config)")]
    Mismatch {
        /// The registration file.
        path: PathBuf,
        /// The registration field.
        field: &'static str,
        /// What the file holds.
        found: String,
        /// What the config expects.
        expected: String,
    },
    /// A token is unusable (empty, too short or equal to the other one).
    #[error("registration file {path}: `{field}` {reason}")]
    BadToken {
        /// The registration file.
        path: PathBuf,
        /// `as_token` or `hs_token`.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

pub use crate::secret::Secret;

/// One namespace entry (`users`, `aliases` or `rooms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Whether only this appservice may use IDs matching `regex`.
    pub exclusive: bool,
    /// A regular expression over full IDs.
    pub regex: String,
}

/// The namespaces an appservice claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Namespaces {
    /// User IDs.
    #[serde(default)]
    pub users: Vec<Namespace>,
    /// Room aliases.
    #[serde(default)]
    pub aliases: Vec<Namespace>,
    /// Room IDs.
    #[serde(default)]
    pub rooms: Vec<Namespace>,
}

/// An appservice registration, as in the Matrix application service spec plus the E2E
/// extensions mxpay needs. Unknown fields are ignored: the file belongs to the admin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Appservice id.
    pub id: String,
    /// URL the homeserver sends transactions to.
    pub url: Option<String>,
    /// Token mxpay uses towards the homeserver.
    pub as_token: Secret,
    /// Token the homeserver uses towards mxpay.
    pub hs_token: Secret,
    /// Localpart of the bot user.
    pub sender_localpart: String,
    /// Claimed namespaces.
    #[serde(default)]
    pub namespaces: Namespaces,
    /// Whether the homeserver rate-limits the appservice's users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limited: Option<bool>,
    /// Receive ephemeral events and (MSC2409) to-device events in transactions.
    #[serde(default)]
    pub receive_ephemeral: bool,
    /// MSC3202: device lists and one-time-key counts in transactions.
    #[serde(rename = "org.matrix.msc3202", default)]
    pub msc3202: bool,
    /// MSC4190: devices are created with `PUT /devices/{id}` instead of appservice login.
    #[serde(rename = "io.element.msc4190", default)]
    pub msc4190: bool,
}

impl Registration {
    /// A registration for `config` with fresh random tokens.
    pub fn generate(config: &Config) -> Self {
        let localpart = &config.appservice.bot_localpart;
        let server = regex_escape(&config.homeserver.server_name);
        let bot = regex_escape(localpart);
        let mut as_token = Secret::generate();
        let mut hs_token = Secret::generate();
        // Equal tokens from a working OS RNG are impossible in practice; be sure anyway.
        while as_token == hs_token {
            as_token = Secret::generate();
            hs_token = Secret::generate();
        }
        Self {
            id: config.appservice.id.clone(),
            url: Some(config.appservice.url.clone()),
            as_token,
            hs_token,
            sender_localpart: localpart.clone(),
            namespaces: Namespaces {
                users: vec![
                    Namespace {
                        exclusive: true,
                        regex: format!("^@{bot}:{server}$"),
                    },
                    // Reserved for per-user puppets a later version may create.
                    Namespace {
                        exclusive: true,
                        regex: format!("^@{bot}_.*:{server}$"),
                    },
                ],
                aliases: Vec::new(),
                rooms: Vec::new(),
            },
            rate_limited: Some(false),
            receive_ephemeral: true,
            msc3202: true,
            msc4190: config.appservice.msc4190,
        }
    }

    /// The registration as YAML, with a header saying what it is.
    pub fn to_yaml(&self) -> String {
        let body = serde_yaml_ng::to_string(self).expect("registration serialises");
        format!(
            "# mxpay appservice registration, written by `mxpay generate-registration`.\n\
             # Add this file to the homeserver (Synapse: `app_service_config_files`).\n\
             # It holds secrets: keep it readable only by the homeserver and mxpay.\n{body}"
        )
    }

    /// Writes the registration to `path` (mode 0600 on Unix), replacing any file there.
    pub fn write(&self, path: &Path) -> Result<(), RegistrationError> {
        let err = |source| RegistrationError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        // Write beside and rename, so a crash never leaves half a registration behind.
        let tmp = path.with_extension("yaml.tmp");
        {
            use std::io::Write as _;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                options.mode(0o600);
            }
            let mut file = options.open(&tmp).map_err(err)?;
            file.write_all(self.to_yaml().as_bytes()).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Reads a registration file.
    pub fn load(path: &Path) -> Result<Self, RegistrationError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistrationError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|e| RegistrationError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads the registration named by the config and checks it matches the config.
    pub fn load_for(config: &Config) -> Result<Self, RegistrationError> {
        let path = &config.appservice.registration;
        let registration = Self::load(path)?;
        registration.check_against(config, path)?;
        Ok(registration)
    }

    /// Checks the fields the config also holds, and that the tokens are usable.
    pub fn check_against(&self, config: &Config, path: &Path) -> Result<(), RegistrationError> {
        let mismatch = |field, found: &str, expected: &str| RegistrationError::Mismatch {
            path: path.to_owned(),
            field,
            found: found.to_owned(),
            expected: expected.to_owned(),
        };
        if self.id != config.appservice.id {
            return Err(mismatch("id", &self.id, &config.appservice.id));
        }
        if self.sender_localpart != config.appservice.bot_localpart {
            return Err(mismatch(
                "sender_localpart",
                &self.sender_localpart,
                &config.appservice.bot_localpart,
            ));
        }
        for (field, token) in [("as_token", &self.as_token), ("hs_token", &self.hs_token)] {
            if token.expose().len() < 16 {
                return Err(RegistrationError::BadToken {
                    path: path.to_owned(),
                    field,
                    reason: "is shorter than 16 characters",
                });
            }
        }
        if self.as_token == self.hs_token {
            return Err(RegistrationError::BadToken {
                path: path.to_owned(),
                field: "hs_token",
                reason: "must differ from as_token",
            });
        }
        Ok(())
    }
}

/// Escapes regex metacharacters so `server_name` and localparts match literally.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_yaml(
            "homeserver: {server_name: example.org}\nappservice: {id: pay, bot_localpart: _pay.bot, url: 'http://10.0.0.1:29330', msc4190: true}\n",
        )
        .unwrap()
    }

    #[test]
    fn generated_registration_is_valid_yaml_with_required_keys() {
        let registration = Registration::generate(&config());
        let yaml = registration.to_yaml();
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        for key in [
            "id",
            "url",
            "as_token",
            "hs_token",
            "sender_localpart",
            "namespaces",
            "rate_limited",
            "receive_ephemeral",
            "org.matrix.msc3202",
            "io.element.msc4190",
        ] {
            assert!(value.get(key).is_some(), "missing `{key}` in\n{yaml}");
        }
        assert_eq!(value["id"].as_str(), Some("pay"));
        assert_eq!(value["url"].as_str(), Some("http://10.0.0.1:29330"));
        assert_eq!(value["sender_localpart"].as_str(), Some("_pay.bot"));
        assert_eq!(value["rate_limited"].as_bool(), Some(false));
        assert_eq!(value["receive_ephemeral"].as_bool(), Some(true));
        assert_eq!(value["org.matrix.msc3202"].as_bool(), Some(true));
        assert_eq!(value["io.element.msc4190"].as_bool(), Some(true));
        let users = value["namespaces"]["users"].as_sequence().unwrap();
        assert_eq!(users[0]["exclusive"].as_bool(), Some(true));
        assert_eq!(
            users[0]["regex"].as_str(),
            Some(r"^@_pay\.bot:example\.org$")
        );
        assert_eq!(
            users[1]["regex"].as_str(),
            Some(r"^@_pay\.bot_.*:example\.org$")
        );
        // Round trip.
        let back: Registration = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, registration);
        back.check_against(&config(), Path::new("x")).unwrap();
    }

    #[test]
    fn tokens_are_random_url_safe_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let r = Registration::generate(&config());
            for token in [r.as_token.expose(), r.hs_token.expose()] {
                let raw = base64::Engine::decode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    token,
                )
                .expect("url-safe base64");
                assert!(raw.len() >= 32, "token carries {} bytes", raw.len());
                assert!(token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
                assert!(seen.insert(token.to_owned()), "token repeated");
            }
        }
    }

    #[test]
    fn debug_never_shows_tokens() {
        let r = Registration::generate(&config());
        let debug = format!("{r:?}");
        assert!(!debug.contains(r.as_token.expose()));
        assert!(!debug.contains(r.hs_token.expose()));
    }

    #[test]
    fn write_then_load_for_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config();
        c.appservice.registration = dir.path().join("sub/appservice.yaml");
        let r = Registration::generate(&c);
        r.write(&c.appservice.registration).unwrap();
        assert_eq!(Registration::load_for(&c).unwrap(), r);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&c.appservice.registration)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        c.appservice.id = "other".into();
        let message = Registration::load_for(&c).unwrap_err().to_string();
        assert!(
            message.contains("`id`") && message.contains("other"),
            "{message}"
        );
    }

    #[test]
    fn shipped_example_registration_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let r = Registration::load(&root.join("appservice.yaml")).unwrap();
        let c =
            Config::from_yaml(&std::fs::read_to_string(root.join("config.example.yaml")).unwrap())
                .unwrap();
        r.check_against(&c, Path::new("appservice.yaml")).unwrap();
        assert!(r.receive_ephemeral && r.msc3202);
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_hides_the_tokens() {
        let secret = Secret::new("as-token-very-secret");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        let registration = Registration {
            id: "mxpay".to_owned(),
            url: None,
            as_token: Secret::new("as-token-very-secret"),
            hs_token: Secret::new("hs-token-very-secret"),
            sender_localpart: "_mxpay".to_owned(),
            namespaces: Namespaces::default(),
            rate_limited: None,
            receive_ephemeral: true,
            msc3202: true,
            msc4190: false,
        };
        let debug = format!("{registration:?} {registration:#?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
