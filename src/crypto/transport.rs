//! Sends ruma client-server requests as the bot's device, with bounded retries.
//!
//! Two identities exist for one request: the appservice itself (AS token, `user_id=` naming the
//! bot) and the bot's *device*. A device is addressed either with its own access token (from
//! appservice login) or, when the homeserver masquerades devices for appservices (MSC4190 and
//! Synapse's `device_id=` parameter), with the AS token plus `user_id=` and `device_id=`. Synapse
//! answers HTTP 500 for `device_id=` without `user_id=`, so the two always travel together.

use std::borrow::Cow;
use std::time::Duration;

use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::path_builder::{PathBuilder, SinglePath, VersionHistory};
use ruma::api::{AppserviceUserIdentity, OutgoingRequest, OutgoingRequestAppserviceExt};
use ruma::api::{IncomingResponse, SupportedVersions};
use ruma::{OwnedDeviceId, OwnedUserId};

/// Retries for one request, counting the first attempt.
const ATTEMPTS_MAX: u32 = 6;
/// First back-off after a 5xx or connection error; doubled each time.
const BACKOFF_FIRST_MS: u64 = 200;
/// Cap on one back-off and on a homeserver's `retry_after_ms`.
const BACKOFF_MAX_MS: u64 = 5_000;
/// Timeout of one HTTP attempt.
const ATTEMPT_TIMEOUT_MS: u64 = 30_000;

/// Errors sending a request to the homeserver.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The homeserver answered with a Matrix error that retrying will not fix.
    #[error("homeserver refused {endpoint}: HTTP {status} {errcode}: {message}")]
    Refused {
        /// The endpoint path template.
        endpoint: &'static str,
        /// HTTP status.
        status: u16,
        /// Matrix `errcode`, or `-` if the body had none.
        errcode: String,
        /// Matrix `error` text.
        message: String,
    },
    /// Every attempt failed with a transient error (5xx, 429, connection).
    #[error("homeserver unavailable for {endpoint} after {attempts} attempts: {last}")]
    Unavailable {
        /// The endpoint path template.
        endpoint: &'static str,
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A request could not be built or a response not parsed (a bug or a non-Matrix server).
    #[error("malformed exchange with {endpoint}: {reason}")]
    Malformed {
        /// The endpoint path template.
        endpoint: &'static str,
        /// What went wrong.
        reason: String,
    },
}

impl TransportError {
    /// Whether a later retry of the whole operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, TransportError::Unavailable { .. })
    }

    /// The Matrix `errcode` of a refusal, if any.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            TransportError::Refused { errcode, .. } => Some(errcode),
            _ => None,
        }
    }
}

/// Who a request is sent as.
#[derive(Clone, Copy, Debug)]
pub enum As<'a> {
    /// The appservice, asserting the bot user (`user_id=`), no device.
    Appservice,
    /// The bot's device.
    Device(&'a DeviceIdentity),
}

/// How the bot's device authenticates.
#[derive(Clone)]
pub enum DeviceIdentity {
    /// Device access token from appservice login.
    AccessToken {
        /// The device id (for logs).
        device_id: OwnedDeviceId,
        /// The token; never printed.
        token: String,
    },
    /// AS token with `user_id=` and `device_id=` (MSC4190 / device masquerading).
    Masquerade {
        /// The device id.
        device_id: OwnedDeviceId,
    },
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceIdentity::AccessToken { device_id, .. } => f
                .debug_struct("AccessToken")
                .field("device_id", device_id)
                .field("token", &"<redacted>")
                .finish(),
            DeviceIdentity::Masquerade { device_id } => f
                .debug_struct("Masquerade")
                .field("device_id", device_id)
                .finish(),
        }
    }
}

/// Picks the path input a ruma endpoint needs: the homeserver's versions, or nothing.
pub trait PathInput: PathBuilder {
    /// The input for this builder.
    fn input(versions: &SupportedVersions) -> Self::Input<'_>;
}

impl PathInput for VersionHistory {
    fn input(versions: &SupportedVersions) -> Self::Input<'_> {
        Cow::Borrowed(versions)
    }
}

impl PathInput for SinglePath {
    fn input(_versions: &SupportedVersions) -> Self::Input<'_> {}
}

/// HTTP sender for the bot: base URL, AS token, bot user, homeserver versions.
#[derive(Clone)]
pub struct Transport {
    http: reqwest::Client,
    base_url: String,
    as_token: String,
    bot_user_id: OwnedUserId,
    versions: SupportedVersions,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("base_url", &self.base_url)
            .field("bot_user_id", &self.bot_user_id)
            .field("as_token", &"<redacted>")
            .finish()
    }
}

impl Transport {
    /// Builds a sender and asks the homeserver which versions it speaks (bounded retries).
    pub async fn connect(
        base_url: &str,
        as_token: &str,
        bot_user_id: OwnedUserId,
    ) -> Result<Self, TransportError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(ATTEMPT_TIMEOUT_MS))
            .build()
            .map_err(|e| TransportError::Malformed {
                endpoint: "-",
                reason: format!("http client: {e}"),
            })?;
        let mut this = Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            as_token: as_token.to_owned(),
            bot_user_id,
            versions: SupportedVersions {
                versions: Default::default(),
                features: Default::default(),
            },
            metrics: None,
        };
        let response = this
            .send(
                As::Appservice,
                ruma::api::client::discovery::get_supported_versions::Request::new(),
            )
            .await?;
        this.versions =
            SupportedVersions::from_parts(&response.versions, &response.unstable_features);
        Ok(this)
    }

    /// The same transport, recording each request attempt in `metrics` (if given).
    pub fn with_metrics(
        mut self,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Self {
        self.metrics = metrics;
        self
    }

    /// The bot's user id.
    pub fn bot_user_id(&self) -> &OwnedUserId {
        &self.bot_user_id
    }

    /// Sends `request` as `who`, retrying 429/5xx/connection errors with bounded back-off.
    pub async fn send<R>(
        &self,
        who: As<'_>,
        request: R,
    ) -> Result<R::IncomingResponse, TransportError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let endpoint = endpoint_name::<R>();
        let mut last = String::new();
        let mut backoff_ms = BACKOFF_FIRST_MS;
        for attempt in 1..=ATTEMPTS_MAX {
            let http_request = self.build(who, request.clone())?;
            let attempt_started = std::time::Instant::now();
            let outcome = self.http.execute(http_request).await;
            if let Some(metrics) = &self.metrics {
                let kind = match &outcome {
                    Err(e) if e.is_timeout() => Some("timeout"),
                    Err(_) => Some("connect"),
                    Ok(r) if !r.status().is_success() => {
                        Some(crate::metrics::Metrics::status_kind(r.status().as_u16()))
                    }
                    Ok(_) => None,
                };
                metrics.homeserver_request(endpoint, attempt_started.elapsed(), kind);
            }
            let wait_ms = match outcome {
                Err(e) => {
                    last = format!("connection: {e}");
                    backoff_ms
                }
                Ok(response) => {
                    let status = response.status();
                    let body = response
                        .bytes()
                        .await
                        .map_err(|e| TransportError::Unavailable {
                            endpoint,
                            attempts: attempt,
                            last: format!("reading body: {e}"),
                        });
                    let body = match body {
                        Ok(b) => b,
                        Err(e) if attempt < ATTEMPTS_MAX => {
                            last = e.to_string();
                            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                            backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if status.is_success() {
                        let http_response = http::Response::builder()
                            .status(status)
                            .body(body.to_vec())
                            .map_err(|e| TransportError::Malformed {
                                endpoint,
                                reason: e.to_string(),
                            })?;
                        return R::IncomingResponse::try_from_http_response(http_response).map_err(
                            |e| TransportError::Malformed {
                                endpoint,
                                reason: e.to_string(),
                            },
                        );
                    }
                    let error = MatrixErrorBody::parse(&body);
                    if status.as_u16() == 429 {
                        last = format!("HTTP 429 {}", error.errcode);
                        error
                            .retry_after_ms
                            .unwrap_or(backoff_ms)
                            .min(BACKOFF_MAX_MS)
                    } else if status.is_server_error() {
                        last = format!(
                            "HTTP {} {} {}",
                            status.as_u16(),
                            error.errcode,
                            error.message
                        );
                        backoff_ms
                    } else {
                        return Err(TransportError::Refused {
                            endpoint,
                            status: status.as_u16(),
                            errcode: error.errcode,
                            message: error.message,
                        });
                    }
                }
            };
            if attempt < ATTEMPTS_MAX {
                tracing::debug!(endpoint, attempt, wait_ms, reason = %last, "retrying homeserver request");
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
            }
        }
        Err(TransportError::Unavailable {
            endpoint,
            attempts: ATTEMPTS_MAX,
            last,
        })
    }

    fn build<R>(&self, who: As<'_>, request: R) -> Result<reqwest::Request, TransportError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let endpoint = endpoint_name::<R>();
        let path_input = <R::PathBuilder as PathInput>::input(&self.versions);
        let built = match who {
            As::Appservice => request.try_into_http_request_with_identity::<Vec<u8>>(
                &self.base_url,
                SendAccessToken::Appservice(&self.as_token),
                AppserviceUserIdentity::new(&self.bot_user_id),
                path_input,
            ),
            As::Device(DeviceIdentity::AccessToken { token, .. }) => request
                .try_into_http_request::<Vec<u8>>(
                    &self.base_url,
                    SendAccessToken::IfRequired(token),
                    path_input,
                ),
            As::Device(DeviceIdentity::Masquerade { device_id }) => {
                let mut identity = AppserviceUserIdentity::new(&self.bot_user_id);
                identity.device_id = Some(device_id);
                request.try_into_http_request_with_identity::<Vec<u8>>(
                    &self.base_url,
                    SendAccessToken::Appservice(&self.as_token),
                    identity,
                    path_input,
                )
            }
        };
        let built = built.map_err(|e| TransportError::Malformed {
            endpoint,
            reason: e.to_string(),
        })?;
        reqwest::Request::try_from(built).map_err(|e| TransportError::Malformed {
            endpoint,
            reason: e.to_string(),
        })
    }
}

/// The parts of a Matrix error body that decide what to do next.
#[derive(Debug, PartialEq)]
struct MatrixErrorBody {
    errcode: String,
    message: String,
    retry_after_ms: Option<u64>,
}

impl MatrixErrorBody {
    fn parse(body: &[u8]) -> Self {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        Self {
            errcode: text("errcode").unwrap_or_else(|| "-".to_owned()),
            // Keep what the server said short: it ends up in logs and room notices.
            message: text("error")
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect(),
            retry_after_ms: value.get("retry_after_ms").and_then(|v| v.as_u64()),
        }
    }
}

/// Names an endpoint for errors and logs by its ruma module path, e.g. `keys::upload_keys::v3`.
fn endpoint_name<R>() -> &'static str {
    crate::homeserver::endpoint_name::<R>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_parse_keeps_errcode_and_retry() {
        let parsed = MatrixErrorBody::parse(
            br#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":1200}"#,
        );
        assert_eq!(parsed.errcode, "M_LIMIT_EXCEEDED");
        assert_eq!(parsed.message, "slow down");
        assert_eq!(parsed.retry_after_ms, Some(1200));
        let garbage = MatrixErrorBody::parse(b"<html>");
        assert_eq!(garbage.errcode, "-");
        assert_eq!(garbage.retry_after_ms, None);
    }

    #[test]
    fn device_identity_debug_redacts_token() {
        let id = DeviceIdentity::AccessToken {
            device_id: "DEV".into(),
            token: "syt_secret".to_owned(),
        };
        let shown = format!("{id:?}");
        assert!(!shown.contains("syt_secret"), "{shown}");
        assert!(shown.contains("DEV"));
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_hides_the_tokens() {
        let identity = DeviceIdentity::AccessToken {
            device_id: "MXPAYABC".into(),
            token: "syt_device_very_secret".to_owned(),
        };
        let transport = Transport {
            http: reqwest::Client::new(),
            base_url: "http://127.0.0.1:1".to_owned(),
            as_token: "as-token-very-secret".to_owned(),
            bot_user_id: "@_mxpay:localhost".try_into().unwrap(),
            versions: SupportedVersions {
                versions: Default::default(),
                features: Default::default(),
            },
            metrics: None,
        };
        let debug = format!("{identity:?} {identity:#?} {transport:?} {transport:#?}");
        assert!(!debug.contains("very_secret"), "{debug}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
