//! The bot's one device: created once, remembered in `<data_dir>/device.json`, reused after.
//!
//! Order matters for crash safety: the device id is chosen and written to disk *before* the
//! homeserver is asked to create it, so a crash in between reuses the same id on the next start
//! instead of leaving an orphan device behind (both creation calls are idempotent for a given id).

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::Rng;
use ruma::api::client::device::update_device;
use ruma::api::client::session::login;
use ruma::api::client::uiaa::UserIdentifier;
use ruma::{OwnedDeviceId, OwnedUserId};
use serde::{Deserialize, Serialize};

use super::CryptoError;
use crate::homeserver::{DeviceIdentity, HomeserverClient, Identity};
use crate::secret::Secret;

/// File name of the device record inside the data dir.
pub const DEVICE_FILE: &str = "device.json";
/// File name of the crypto store key inside the data dir (used when no key is given).
pub const STORE_KEY_FILE: &str = "crypto-store.key";
/// Display name the bot's device gets on creation.
pub const DEVICE_DISPLAY_NAME: &str = "mxpay bot";

/// How the device was created, and so how it authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceMode {
    /// `m.login.application_service` login; the device has its own access token.
    AppserviceLogin,
    /// MSC4190: created with `PUT /devices/{id}` and used with the AS token + `device_id=`.
    Msc4190,
}

/// What `device.json` holds.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The bot user.
    pub user_id: OwnedUserId,
    /// The device id.
    pub device_id: OwnedDeviceId,
    /// How it was created.
    pub mode: DeviceMode,
    /// Device access token (appservice login only); `None` until login succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("mode", &self.mode)
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl DeviceRecord {
    /// How the homeserver client addresses the device ([`Identity::BotDevice`]).
    pub fn identity(&self) -> DeviceIdentity {
        match (&self.mode, &self.access_token) {
            (DeviceMode::AppserviceLogin, Some(token)) => DeviceIdentity::AccessToken {
                device_id: self.device_id.clone(),
                token: Secret::new(token.clone()),
            },
            _ => DeviceIdentity::Masquerade {
                device_id: self.device_id.clone(),
            },
        }
    }
}

/// Reads `device.json`; `Ok(None)` if it does not exist.
pub fn load(data_dir: &Path) -> Result<Option<DeviceRecord>, CryptoError> {
    let path = data_dir.join(DEVICE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CryptoError::DeviceFile {
                    path,
                    reason: format!("not a device record: {e}"),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CryptoError::DeviceFile {
            path,
            reason: e.to_string(),
        }),
    }
}

/// Writes `device.json` atomically (temp file, fsync, rename) with owner-only permissions.
pub fn save(data_dir: &Path, record: &DeviceRecord) -> Result<(), CryptoError> {
    let path = data_dir.join(DEVICE_FILE);
    let bytes = serde_json::to_vec_pretty(record).expect("device record serialises");
    write_private(&path, &bytes).map_err(|e| CryptoError::DeviceFile {
        path,
        reason: e.to_string(),
    })
}

/// Writes a secret-holding file: temp file with mode 0600, fsync, rename, fsync the directory.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp: PathBuf = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Directory fsync makes the rename durable; not supported everywhere, so best effort.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Loads the 32-byte store key from `<data_dir>/crypto-store.key`, creating it on first use.
pub fn load_or_create_store_key(data_dir: &Path) -> Result<[u8; 32], CryptoError> {
    let path = data_dir.join(STORE_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => decode_key(&bytes).ok_or_else(|| CryptoError::DeviceFile {
            path,
            reason: "expected 64 hex characters".to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::thread_rng().gen();
            write_private(&path, hex::encode(key).as_bytes()).map_err(|e| {
                CryptoError::DeviceFile {
                    path,
                    reason: e.to_string(),
                }
            })?;
            Ok(key)
        }
        Err(e) => Err(CryptoError::DeviceFile {
            path,
            reason: e.to_string(),
        }),
    }
}

/// Parses a store key written as 64 hex characters (surrounding whitespace allowed).
pub fn decode_key(bytes: &[u8]) -> Option<[u8; 32]> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    let raw = hex::decode(text).ok()?;
    raw.try_into().ok()
}

/// A fresh device id: `MXPAY` + 10 random upper-case letters.
fn new_device_id() -> OwnedDeviceId {
    let mut rng = rand::thread_rng();
    let suffix: String = (0..10)
        .map(|_| char::from(b'A' + rng.gen_range(0..26u8)))
        .collect();
    OwnedDeviceId::from(format!("MXPAY{suffix}"))
}

/// Returns the bot's device (owned by `client`'s bot user), creating it on the homeserver the
/// first time.
///
/// `msc4190` picks the creation method for a *new* device; an existing record keeps its mode
/// (the device and its keys are what other users trust; switching would orphan them).
pub async fn provision(
    client: &HomeserverClient,
    data_dir: &Path,
    msc4190: bool,
) -> Result<DeviceRecord, CryptoError> {
    let bot_user_id = client.bot_user_id();
    let existing = load(data_dir)?;
    if let Some(record) = &existing {
        if record.user_id != bot_user_id {
            return Err(CryptoError::DeviceFile {
                path: data_dir.join(DEVICE_FILE),
                reason: format!(
                    "belongs to {} but the bot is {bot_user_id}; restore the right data_dir",
                    record.user_id
                ),
            });
        }
        if record.mode == DeviceMode::Msc4190 || record.access_token.is_some() {
            if (record.mode == DeviceMode::Msc4190) != msc4190 {
                tracing::warn!(
                    device_id = %record.device_id,
                    mode = ?record.mode,
                    "appservice.msc4190 changed since the bot's device was created; keeping the device"
                );
            }
            if record.mode == DeviceMode::Msc4190 {
                // Idempotent: recreates the device if an admin deleted it.
                create_msc4190_device(client, &record.device_id).await?;
            }
            return Ok(record.clone());
        }
    }

    client
        .register_bot()
        .await
        .map_err(CryptoError::Provision)?;

    let mode = if msc4190 {
        DeviceMode::Msc4190
    } else {
        DeviceMode::AppserviceLogin
    };
    // Reuse an id chosen before a crash; otherwise choose and persist one before creating it.
    let mut record = match existing {
        Some(r) if r.mode == mode => r,
        _ => DeviceRecord {
            user_id: bot_user_id.to_owned(),
            device_id: new_device_id(),
            mode,
            access_token: None,
        },
    };
    save(data_dir, &record)?;

    match mode {
        DeviceMode::Msc4190 => create_msc4190_device(client, &record.device_id).await?,
        DeviceMode::AppserviceLogin => {
            let identifier = UserIdentifier::from(bot_user_id.to_owned());
            let info = login::v3::ApplicationService::new(identifier);
            let mut request =
                login::v3::Request::new(login::v3::LoginInfo::ApplicationService(info));
            request.device_id = Some(record.device_id.clone());
            request.initial_device_display_name = Some(DEVICE_DISPLAY_NAME.to_owned());
            let response = client
                .send(request, Identity::Appservice)
                .await
                .map_err(CryptoError::Provision)?;
            if response.device_id != record.device_id {
                return Err(CryptoError::Homeserver(format!(
                    "asked for device {} at login, got {}",
                    record.device_id, response.device_id
                )));
            }
            record.access_token = Some(response.access_token);
        }
    }
    save(data_dir, &record)?;
    tracing::info!(device_id = %record.device_id, mode = ?record.mode, "created the bot's device");
    Ok(record)
}

async fn create_msc4190_device(
    client: &HomeserverClient,
    device_id: &OwnedDeviceId,
) -> Result<(), CryptoError> {
    let mut request = update_device::v3::Request::new(device_id.clone());
    request.display_name = Some(DEVICE_DISPLAY_NAME.to_owned());
    client
        .send(request, Identity::Appservice)
        .await
        .map(|_| ())
        .map_err(CryptoError::Provision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_redacts() {
        let dir = tempfile::tempdir().unwrap();
        let record = DeviceRecord {
            user_id: "@_mxpay:hs".try_into().unwrap(),
            device_id: "MXPAYABC".into(),
            mode: DeviceMode::AppserviceLogin,
            access_token: Some("syt_very_secret".to_owned()),
        };
        assert_eq!(load(dir.path()).unwrap(), None);
        save(dir.path(), &record).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(record.clone()));
        assert!(!format!("{record:?}").contains("syt_very_secret"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(DEVICE_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn store_key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_store_key(dir.path()).unwrap();
        let second = load_or_create_store_key(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_eq!(decode_key(b"zz"), None);
        assert_eq!(
            decode_key(format!(" {}\n", hex::encode([7u8; 32])).as_bytes()),
            Some([7; 32])
        );
    }

    #[test]
    fn new_device_ids_look_right() {
        let id = new_device_id();
        assert!(id.as_str().starts_with("MXPAY"));
        assert_eq!(id.as_str().len(), 15);
        assert_ne!(new_device_id(), id);
    }
}
