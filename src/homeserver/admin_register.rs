//! Synapse's shared-secret admin registration (`/_synapse/admin/v1/register`): creates an
//! ordinary (non-admin) user with a password, for `mxpay dev`'s demo users and the test harness.
//!
//! The request carries a fresh nonce from the server and an HMAC-SHA1, keyed with the
//! homeserver's `registration_shared_secret`, over `nonce\0user\0password\0notadmin`.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Longest wait for each of the two requests (nonce, then registration), connecting included.
/// Synapse hashes the password (bcrypt) before it answers, so leave room for a slow machine.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;

/// Errors of one shared-secret registration. Display texts never contain the shared secret,
/// the password or the nonce.
#[derive(Debug, thiserror::Error)]
pub enum AdminRegisterError {
    /// No usable answer: the connection failed, a request took longer than
    /// [`REQUEST_TIMEOUT_MS`], or a body was not JSON.
    #[error("{0}")]
    Transport(String),
    /// The nonce answer had no `nonce`.
    #[error("no registration nonce")]
    NoNonce,
    /// The homeserver refused the registration.
    #[error("registering {localpart}: {status} {message}")]
    Refused {
        /// The localpart that was to be registered.
        localpart: String,
        /// HTTP status.
        status: reqwest::StatusCode,
        /// Matrix `errcode`, empty if the body had none.
        errcode: String,
        /// Matrix `error` text, empty if the body had none.
        message: String,
    },
}

impl AdminRegisterError {
    /// Whether the user already exists (`M_USER_IN_USE`): callers that only need the user to
    /// exist may treat this as success.
    pub fn is_user_in_use(&self) -> bool {
        matches!(self, Self::Refused { errcode, .. } if errcode == "M_USER_IN_USE")
    }
}

/// Registers `@localpart` with `password` as a non-admin user on the Synapse at
/// `homeserver_url` (no trailing slash), proving knowledge of `shared_secret`.
///
/// Succeeds only if the homeserver created the user; an existing user is
/// [`AdminRegisterError::Refused`] with `M_USER_IN_USE` (see
/// [`AdminRegisterError::is_user_in_use`]).
pub async fn register(
    homeserver_url: &str,
    shared_secret: &str,
    localpart: &str,
    password: &str,
) -> Result<(), AdminRegisterError> {
    let transport = |e: reqwest::Error| AdminRegisterError::Transport(e.to_string());
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(REQUEST_TIMEOUT_MS))
        .connect_timeout(std::time::Duration::from_millis(REQUEST_TIMEOUT_MS))
        .build()
        .map_err(transport)?;
    let url = format!("{homeserver_url}/_synapse/admin/v1/register");
    let nonce: serde_json::Value = http
        .get(&url)
        .send()
        .await
        .map_err(transport)?
        .json()
        .await
        .map_err(transport)?;
    let nonce = nonce["nonce"].as_str().ok_or(AdminRegisterError::NoNonce)?;
    let body = serde_json::json!({
        "nonce": nonce,
        "username": localpart,
        "password": password,
        "admin": false,
        "mac": registration_mac(shared_secret, nonce, localpart, password),
    });
    let response = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(transport)?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let error: serde_json::Value = response.json().await.unwrap_or_default();
    let field = |name: &str| error[name].as_str().unwrap_or("").to_owned();
    Err(AdminRegisterError::Refused {
        localpart: localpart.to_owned(),
        status,
        errcode: field("errcode"),
        message: field("error"),
    })
}

/// The hex HMAC-SHA1 Synapse expects for a non-admin user.
fn registration_mac(shared_secret: &str, nonce: &str, localpart: &str, password: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(shared_secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(nonce.as_bytes());
    for part in [localpart, password, "notadmin"] {
        mac.update(b"\0");
        mac.update(part.as_bytes());
    }
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the MAC layout: HMAC-SHA1 over `nonce\0user\0password\0notadmin`, built here from
    /// the joined bytes independently of the incremental updates above.
    #[test]
    fn mac_covers_nonce_user_password_and_notadmin_separated_by_nul() {
        let mut expected = Hmac::<Sha1>::new_from_slice(b"secret").unwrap();
        expected.update(b"n0nce\0alice\0pw\0notadmin");
        assert_eq!(
            registration_mac("secret", "n0nce", "alice", "pw"),
            hex::encode(expected.finalize().into_bytes())
        );
        assert_ne!(
            registration_mac("secret", "n0nce", "alice", "pw"),
            registration_mac("secret", "n0nce", "alice", "pw2")
        );
    }

    #[test]
    fn only_m_user_in_use_counts_as_existing() {
        let refused = |errcode: &str| AdminRegisterError::Refused {
            localpart: "alice".to_owned(),
            status: reqwest::StatusCode::BAD_REQUEST,
            errcode: errcode.to_owned(),
            message: String::new(),
        };
        assert!(refused("M_USER_IN_USE").is_user_in_use());
        assert!(!refused("M_FORBIDDEN").is_user_in_use());
        assert!(!AdminRegisterError::NoNonce.is_user_in_use());
    }
}
