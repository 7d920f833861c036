//! Whom a request acts as: the appservice, a user in its namespace, or a device.
//!
//! A device is addressed either with its own access token (from appservice login) or, when the
//! homeserver masquerades devices for appservices (MSC4190 and Synapse's `device_id=`
//! parameter), with the AS token plus `user_id=` and `device_id=`. Synapse 1.163 answers
//! HTTP 500 for `device_id=` without `user_id=`, so the two always travel together.

use ruma::api::AppserviceUserIdentity;
use ruma::{DeviceId, OwnedDeviceId, UserId};

use crate::secret::Secret;

/// Whom an appservice request acts as.
#[derive(Debug, Clone, Copy)]
pub enum Identity<'a> {
    /// The appservice's own sender (the bot): no assertion parameters.
    Appservice,
    /// A user in the appservice's namespace (`?user_id=`).
    User(&'a UserId),
    /// A device of a user (`?user_id=&device_id=`; Synapse needs both together).
    Device(&'a UserId, &'a DeviceId),
    /// The bot's own device, as its [`DeviceIdentity`] says: its access token, or the AS
    /// token with `user_id=<bot>&device_id=`.
    BotDevice(&'a DeviceIdentity),
}

impl<'a> Identity<'a> {
    /// The assertion parameters for a request sent with the AS token (`BotDevice` with its own
    /// token is sent without AS token, see [`super::HomeserverClient::send`]).
    pub(super) fn to_ruma(self, bot_user_id: &'a UserId) -> AppserviceUserIdentity<'a> {
        let mut identity = AppserviceUserIdentity::default();
        match self {
            Self::Appservice | Self::BotDevice(DeviceIdentity::AccessToken { .. }) => {}
            Self::User(user) => identity.user_id = Some(user),
            Self::Device(user, device) => {
                identity.user_id = Some(user);
                identity.device_id = Some(device);
            }
            Self::BotDevice(DeviceIdentity::Masquerade { device_id }) => {
                identity.user_id = Some(bot_user_id);
                identity.device_id = Some(device_id);
            }
        }
        identity
    }
}

/// How the bot's device authenticates. `Debug` never shows the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceIdentity {
    /// Device access token from appservice login (`m.login.application_service`).
    AccessToken {
        /// The device id (for logs).
        device_id: OwnedDeviceId,
        /// The device's access token.
        token: Secret,
    },
    /// AS token with `user_id=` and `device_id=` (MSC4190 / device masquerading).
    Masquerade {
        /// The device id.
        device_id: OwnedDeviceId,
    },
}

impl DeviceIdentity {
    /// The device id, however the device authenticates.
    pub fn device_id(&self) -> &DeviceId {
        match self {
            Self::AccessToken { device_id, .. } | Self::Masquerade { device_id } => device_id,
        }
    }
}
