//! The one client for everything the bot sends to the homeserver's client-server API, the
//! crypto device's key uploads, queries, claims and to-device messages included: ruma request
//! types, the AS token, identity assertion (`user_id=`, `device_id=`, or the bot device's own
//! token, see [`Identity`]), per-endpoint metrics and bounded retries.
//!
//! Retry rule: 429 waits what the server asks (`retry_after_ms` or `Retry-After`), 5xx and
//! connection errors back off exponentially, other 4xx fail at once; all within
//! [`RetryPolicy`]'s bounds on attempts and total time.

pub mod admin_register;
pub mod identity;
pub mod retry;
pub mod room_cache;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::client::account::register;
use ruma::api::client::appservice::request_ping;
use ruma::api::client::discovery::get_supported_versions;
use ruma::api::client::membership::{get_member_events, join_room_by_id};
use ruma::api::client::message::send_message_event;
use ruma::api::client::profile::set_profile_field;
use ruma::api::client::redact::redact_event;
use ruma::api::client::state::{get_state_events, send_state_event};
use ruma::api::path_builder::{PathBuilder, SinglePath, VersionHistory};
use ruma::api::{
    IncomingResponse, OutgoingRequest, OutgoingRequestAppserviceExt, SupportedVersions,
};
use ruma::events::room::member::RoomMemberEvent;
use ruma::events::{AnyStateEvent, MessageLikeEventContent};
use ruma::serde::Raw;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, TransactionId, UserId};

pub use identity::{DeviceIdentity, Identity};
pub use retry::RetryPolicy;

use crate::secret::Secret;

/// Errors talking to the homeserver. Display texts never contain tokens.
#[derive(Debug, thiserror::Error)]
pub enum HomeserverError {
    /// No TCP/TLS connection (refused, unknown host, reset).
    #[error("cannot connect to the homeserver at {url}: {reason}")]
    Connect {
        /// The homeserver base URL.
        url: String,
        /// The transport's reason.
        reason: String,
    },
    /// An attempt did not complete within the attempt timeout.
    #[error("the homeserver at {url} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The homeserver base URL.
        url: String,
        /// The attempt timeout.
        timeout_ms: u64,
    },
    /// The homeserver answered with a Matrix error.
    #[error("homeserver answered HTTP {status} {errcode}: {message}")]
    Matrix {
        /// HTTP status.
        status: u16,
        /// Matrix `errcode`, e.g. `M_FORBIDDEN`.
        errcode: String,
        /// Matrix `error` text.
        message: String,
        /// `retry_after_ms` (body) or `Retry-After` (header), when given.
        retry_after_ms: Option<u64>,
    },
    /// The answer is an error without a Matrix error body: probably not a Matrix server.
    #[error(
        "{url} answered HTTP {status} without a Matrix error body: is it a Matrix homeserver?"
    )]
    NotMatrix {
        /// The homeserver base URL.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// A success answer did not have the shape the endpoint promises.
    #[error("unexpected answer from the homeserver: {0}")]
    BadResponse(String),
    /// The request could not be built (a bug, or an identifier ruma refuses).
    #[error("cannot build the request: {0}")]
    Build(String),
    /// Retries ran out; `last` is the last attempt's error.
    #[error("gave up after {attempts} attempts in {elapsed_ms} ms: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed_ms: u64,
        /// The last error.
        last: Box<HomeserverError>,
    },
}

impl HomeserverError {
    /// The Matrix `errcode`, if the homeserver sent one (looks through `GaveUp`).
    pub fn errcode(&self) -> Option<&str> {
        match self {
            Self::Matrix { errcode, .. } => Some(errcode),
            Self::GaveUp { last, .. } => last.errcode(),
            _ => None,
        }
    }

    /// The HTTP status, if the homeserver answered (looks through `GaveUp`).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Matrix { status, .. } | Self::NotMatrix { status, .. } => Some(*status),
            Self::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }

    /// Whether trying again later may succeed (network, 429, 5xx, retries ran out).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } | Self::GaveUp { .. } => true,
            Self::Matrix { status, .. } | Self::NotMatrix { status, .. } => {
                *status == 429 || *status >= 500
            }
            Self::BadResponse(_) | Self::Build(_) => false,
        }
    }

    /// Whether the homeserver answered with an error that retrying will not fix (a 4xx other
    /// than 429): the request itself was refused, as opposed to not getting through.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Matrix { .. } | Self::NotMatrix { .. }) && !self.is_transient()
    }

    /// Whether this attempt's error is worth another attempt within the same request.
    fn retryable(&self) -> bool {
        match self {
            // The ping endpoint reports on the homeserver -> appservice leg with 502/504:
            // that is an answer, not a homeserver failure.
            Self::Matrix { errcode, .. }
                if matches!(
                    errcode.as_str(),
                    "M_BAD_STATUS" | "M_CONNECTION_FAILED" | "M_CONNECTION_TIMEOUT"
                ) =>
            {
                false
            }
            other => other.is_transient(),
        }
    }
}

/// Path builders whose input can be derived from the homeserver's supported versions.
pub trait PathInput: PathBuilder {
    /// The input for `versions`.
    fn input(versions: &SupportedVersions) -> Self::Input<'_>;
}

impl PathInput for SinglePath {
    fn input(_versions: &SupportedVersions) -> Self::Input<'_> {}
}

impl PathInput for VersionHistory {
    fn input(versions: &SupportedVersions) -> Self::Input<'_> {
        Cow::Borrowed(versions)
    }
}

/// A bounded metric label for a ruma request type: its module path without the crate
/// (`membership::join_room_by_id::v3`). The set is fixed at compile time, and never holds
/// ids, unlike the request's path.
pub fn endpoint_name<R>() -> &'static str {
    let full = std::any::type_name::<R>();
    let full = full.strip_suffix("::Request").unwrap_or(full);
    [
        "ruma_client_api::",
        "ruma_appservice_api::",
        "ruma_common::api::",
    ]
    .iter()
    .find_map(|prefix| full.strip_prefix(prefix))
    .unwrap_or(full)
}

impl HomeserverError {
    /// The `kind` label of `mxpay_homeserver_request_errors` for this error.
    pub fn metric_kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Matrix { status, .. } | Self::NotMatrix { status, .. } => {
                crate::metrics::Metrics::status_kind(*status)
            }
            Self::GaveUp { last, .. } => last.metric_kind(),
            Self::BadResponse(_) | Self::Build(_) => "malformed",
        }
    }
}

/// Construction parameters of a [`HomeserverClient`].
#[derive(Debug, Clone)]
pub struct HomeserverClientConfig {
    /// Client-server API base URL.
    pub base_url: String,
    /// The appservice's `as_token`.
    pub as_token: Secret,
    /// The appservice id (for the ping).
    pub appservice_id: String,
    /// The bot's user ID.
    pub bot_user_id: OwnedUserId,
    /// Retry bounds.
    pub retry: RetryPolicy,
}

/// Homeserver client for the appservice. Cheap to clone.
#[derive(Clone)]
pub struct HomeserverClient {
    http: reqwest::Client,
    base_url: String,
    as_token: Secret,
    appservice_id: String,
    bot_user_id: OwnedUserId,
    retry: RetryPolicy,
    versions: std::sync::Arc<SupportedVersions>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// Rooms' membership and join rule, kept fresh by the transaction stream (shared by clones).
    rooms: std::sync::Arc<room_cache::RoomCache>,
}

impl std::fmt::Debug for HomeserverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HomeserverClient")
            .field("base_url", &self.base_url)
            .field("appservice_id", &self.appservice_id)
            .field("bot_user_id", &self.bot_user_id)
            .finish_non_exhaustive()
    }
}

/// What `GET /_matrix/client/versions` says.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ServerVersions {
    /// Spec versions, e.g. `v1.11`.
    pub versions: Vec<String>,
    /// Unstable features and whether they are on.
    #[serde(default)]
    pub unstable_features: BTreeMap<String, bool>,
}

impl HomeserverClient {
    /// A client; no request is sent yet.
    pub fn new(config: HomeserverClientConfig) -> Result<Self, HomeserverError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.retry.connect_timeout_ms))
            .timeout(Duration::from_millis(config.retry.attempt_timeout_ms))
            .user_agent(concat!("mxpay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HomeserverError::Build(e.to_string()))?;
        // Versions mxpay's requests are written for; every current homeserver serves them.
        let spec_versions: Vec<String> = (1..=11).map(|minor| format!("v1.{minor}")).collect();
        Ok(Self {
            http,
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            as_token: config.as_token,
            appservice_id: config.appservice_id,
            bot_user_id: config.bot_user_id,
            retry: config.retry,
            versions: std::sync::Arc::new(SupportedVersions::from_parts(
                &spec_versions,
                &BTreeMap::new(),
            )),
            metrics: None,
            rooms: std::sync::Arc::default(),
        })
    }

    /// The same client, recording each request attempt's latency and failures in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The same client (same connection pool, same metrics) with other retry bounds. The
    /// attempt timeout applies per request; the connect timeout stays as built.
    pub fn with_retry(&self, retry: RetryPolicy) -> Self {
        Self {
            retry,
            ..self.clone()
        }
    }

    /// The retry bounds in use.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// The bot's user ID.
    pub fn bot_user_id(&self) -> &UserId {
        &self.bot_user_id
    }

    /// The homeserver base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends a ruma request as `identity`, retrying per the [`RetryPolicy`]: with the AS token
    /// and the identity's assertion parameters, or, for [`Identity::BotDevice`] with a
    /// [`DeviceIdentity::AccessToken`], with the device's own token (where the endpoint needs
    /// one) and no assertion.
    pub async fn send<R>(
        &self,
        request: R,
        identity: Identity<'_>,
    ) -> Result<R::IncomingResponse, HomeserverError>
    where
        R: OutgoingRequest,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
        R::PathBuilder: PathInput,
    {
        let path_input = <R::PathBuilder as PathInput>::input(&self.versions);
        let built = match identity {
            Identity::BotDevice(DeviceIdentity::AccessToken { token, .. }) => request
                .try_into_http_request::<Vec<u8>>(
                    &self.base_url,
                    SendAccessToken::IfRequired(token.expose()),
                    path_input,
                ),
            other => request.try_into_http_request_with_identity::<Vec<u8>>(
                &self.base_url,
                SendAccessToken::Always(self.as_token.expose()),
                other.to_ruma(&self.bot_user_id),
                path_input,
            ),
        };
        let http_request = built.map_err(|e| HomeserverError::Build(e.to_string()))?;
        let response = self.execute(http_request, endpoint_name::<R>()).await?;
        R::IncomingResponse::try_from_http_response(response)
            .map_err(|e| HomeserverError::BadResponse(e.to_string()))
    }

    /// Runs one built request with retries; returns the first success response.
    async fn execute(
        &self,
        request: http::Request<Vec<u8>>,
        endpoint: &'static str,
    ) -> Result<http::Response<Vec<u8>>, HomeserverError> {
        let (parts, body) = request.into_parts();
        let url = parts.uri.to_string();
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut builder = self
                .http
                .request(parts.method.clone(), &url)
                .timeout(Duration::from_millis(self.retry.attempt_timeout_ms));
            for (name, value) in &parts.headers {
                builder = builder.header(name, value);
            }
            let attempt_started = Instant::now();
            let outcome = self.attempt(builder.body(body.clone())).await;
            if let Some(metrics) = &self.metrics {
                let kind = outcome.as_ref().err().map(HomeserverError::metric_kind);
                metrics.homeserver_request(endpoint, attempt_started.elapsed(), kind);
            }
            let error = match outcome {
                Ok(response) => return Ok(response),
                Err(error) => error,
            };
            let elapsed = started.elapsed();
            let delay = match &error {
                HomeserverError::Matrix {
                    status: 429,
                    retry_after_ms: Some(ms),
                    ..
                } => self.retry.server_delay(*ms),
                _ => self.retry.backoff(attempt),
            };
            let in_budget = elapsed + delay <= Duration::from_millis(self.retry.total_max_ms);
            if !error.retryable() {
                return Err(error);
            }
            if attempt >= self.retry.attempts_max || !in_budget {
                return Err(HomeserverError::GaveUp {
                    attempts: attempt,
                    elapsed_ms: elapsed.as_millis() as u64,
                    last: Box::new(error),
                });
            }
            tracing::debug!(
                method = %parts.method,
                path = parts.uri.path(),
                attempt,
                delay_ms = delay.as_millis() as u64,
                %error,
                "homeserver request failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<http::Response<Vec<u8>>, HomeserverError> {
        let response = builder.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e))?;
        if status.is_success() {
            let mut out = http::Response::new(bytes.to_vec());
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            return Ok(out);
        }
        let header_retry_ms = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| secs.saturating_mul(1000));
        #[derive(serde::Deserialize)]
        struct MatrixErrorBody {
            errcode: String,
            #[serde(default)]
            error: String,
            retry_after_ms: Option<u64>,
        }
        match serde_json::from_slice::<MatrixErrorBody>(&bytes) {
            Ok(body) => Err(HomeserverError::Matrix {
                status: status.as_u16(),
                errcode: body.errcode,
                message: body.error,
                retry_after_ms: body.retry_after_ms.or(header_retry_ms),
            }),
            Err(_) if status.as_u16() == 429 => Err(HomeserverError::Matrix {
                status: 429,
                errcode: "M_LIMIT_EXCEEDED".to_owned(),
                message: String::new(),
                retry_after_ms: header_retry_ms,
            }),
            Err(_) => Err(HomeserverError::NotMatrix {
                url: self.base_url.clone(),
                status: status.as_u16(),
            }),
        }
    }

    fn transport_error(&self, error: &reqwest::Error) -> HomeserverError {
        if error.is_timeout() {
            HomeserverError::Timeout {
                url: self.base_url.clone(),
                timeout_ms: self.retry.attempt_timeout_ms,
            }
        } else {
            // The source chain says "connection refused" and the like; the top level only
            // says "error sending request".
            let mut reason = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(inner) = source {
                reason = inner.to_string();
                source = inner.source();
            }
            HomeserverError::Connect {
                url: self.base_url.clone(),
                reason,
            }
        }
    }

    /// `GET /_matrix/client/versions`, once (no retries) and without a token: tells whether a
    /// Matrix homeserver answers at the base URL. Any error answer, or a success that is not a
    /// versions list, is [`HomeserverError::NotMatrix`].
    pub async fn server_versions(&self) -> Result<ServerVersions, HomeserverError> {
        let not_matrix = |status| HomeserverError::NotMatrix {
            url: self.base_url.clone(),
            status,
        };
        let request = get_supported_versions::Request::new()
            .try_into_http_request::<Vec<u8>>(&self.base_url, SendAccessToken::None, ())
            .map_err(|e| HomeserverError::Build(e.to_string()))?;
        let once = self.with_retry(RetryPolicy {
            attempts_max: 1,
            ..self.retry
        });
        let response = match once
            .execute(request, endpoint_name::<get_supported_versions::Request>())
            .await
        {
            Ok(response) => response,
            Err(HomeserverError::GaveUp { last, .. }) => {
                return Err(match *last {
                    HomeserverError::Matrix { status, .. } => not_matrix(status),
                    other => other,
                })
            }
            Err(HomeserverError::Matrix { status, .. }) => return Err(not_matrix(status)),
            Err(other) => return Err(other),
        };
        let status = response.status().as_u16();
        let versions = get_supported_versions::Response::try_from_http_response(response)
            .map_err(|_| not_matrix(status))?;
        Ok(ServerVersions {
            versions: versions.versions,
            unstable_features: versions.unstable_features,
        })
    }

    /// Registers the bot user with the AS token; an existing user (`M_USER_IN_USE`) is fine.
    pub async fn register_bot(&self) -> Result<(), HomeserverError> {
        let mut request = register::v3::Request::new();
        request.username = Some(self.bot_user_id.localpart().to_owned());
        request.inhibit_login = true;
        request.login_type = Some(register::LoginType::ApplicationService);
        match self.send(request, Identity::Appservice).await {
            Ok(_) => {
                tracing::info!(user_id = %self.bot_user_id, "registered the bot user");
                Ok(())
            }
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks the homeserver to ping mxpay (`POST /_matrix/client/v1/appservice/{id}/ping`);
    /// returns the round trip the homeserver measured. Also makes Synapse send queued
    /// transactions at once.
    pub async fn ping(&self, txn_id: Option<&TransactionId>) -> Result<Duration, HomeserverError> {
        let mut request = request_ping::v1::Request::new(self.appservice_id.clone());
        request.transaction_id = txn_id.map(ToOwned::to_owned);
        Ok(self.send(request, Identity::Appservice).await?.duration)
    }

    /// Joins a room as the bot.
    pub async fn join_room(&self, room_id: &RoomId) -> Result<OwnedRoomId, HomeserverError> {
        let request = join_room_by_id::v3::Request::new(room_id.to_owned());
        Ok(self.send(request, Identity::Appservice).await?.room_id)
    }

    /// Sends a message event as the bot. The homeserver deduplicates by `txn_id`, so a retried
    /// send with the same id posts once.
    pub async fn send_message<C: MessageLikeEventContent>(
        &self,
        room_id: &RoomId,
        txn_id: &TransactionId,
        content: &C,
    ) -> Result<OwnedEventId, HomeserverError> {
        let request =
            send_message_event::v3::Request::new(room_id.to_owned(), txn_id.to_owned(), content)
                .map_err(|e| HomeserverError::Build(e.to_string()))?;
        Ok(self.send(request, Identity::Appservice).await?.event_id)
    }

    /// Redacts an event as the bot (needs the room's `redact` power level).
    pub async fn redact(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
        txn_id: &TransactionId,
        reason: Option<&str>,
    ) -> Result<OwnedEventId, HomeserverError> {
        let mut request = redact_event::v3::Request::new(
            room_id.to_owned(),
            event_id.to_owned(),
            txn_id.to_owned(),
        );
        request.reason = reason.map(ToOwned::to_owned);
        Ok(self.send(request, Identity::Appservice).await?.event_id)
    }

    /// Sets the bot's display name.
    pub async fn set_display_name(&self, name: &str) -> Result<(), HomeserverError> {
        let request = set_profile_field::v3::Request::new(
            self.bot_user_id.clone(),
            ruma::profile::ProfileFieldValue::DisplayName(name.to_owned()),
        );
        self.send(request, Identity::Appservice).await?;
        Ok(())
    }

    /// Sets a state event as the bot (needs the room's power level for `event_type`).
    pub async fn send_state(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
        content: &serde_json::Value,
    ) -> Result<OwnedEventId, HomeserverError> {
        let body = Raw::new(content)
            .map_err(|e| HomeserverError::Build(e.to_string()))?
            .cast_unchecked();
        let request = send_state_event::v3::Request::new_raw(
            room_id.to_owned(),
            event_type.into(),
            state_key.to_owned(),
            body,
        );
        Ok(self.send(request, Identity::Appservice).await?.event_id)
    }

    /// The current state events of a room, as the bot sees them.
    pub async fn room_state(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<Raw<AnyStateEvent>>, HomeserverError> {
        let request = get_state_events::v3::Request::new(room_id.to_owned());
        Ok(self.send(request, Identity::Appservice).await?.room_state)
    }

    /// The membership events of a room, as the bot sees them.
    pub async fn room_members(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<Raw<RoomMemberEvent>>, HomeserverError> {
        let request = get_member_events::v3::Request::new(room_id.to_owned());
        Ok(self.send(request, Identity::Appservice).await?.chunk)
    }

    /// Takes in an event the homeserver pushed (a transaction's event, before it is acted on):
    /// membership and join-rule changes keep the room copies fresh
    /// ([`room_cache::RoomCache::observe`]).
    pub fn observe_room_event(&self, event: &serde_json::Value) {
        self.rooms.observe(event);
    }

    /// Each member of a room with their membership (`join`, `invite`, `leave`, ...): asked of
    /// the homeserver once, then kept fresh by the transaction stream.
    pub async fn memberships(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<(String, String)>, HomeserverError> {
        if let Some(members) = self.rooms.members(room_id) {
            return Ok(members);
        }
        let asked = self.rooms.asking(room_id);
        let members: Vec<(String, String)> = self
            .room_members(room_id)
            .await?
            .iter()
            .filter_map(|raw| {
                let v: serde_json::Value = raw.deserialize_as_unchecked().ok()?;
                Some((
                    v.get("state_key")?.as_str()?.to_owned(),
                    v.pointer("/content/membership")?.as_str()?.to_owned(),
                ))
            })
            .collect();
        self.rooms.store_members(room_id, asked, &members);
        Ok(members)
    }

    /// The joined members of a room (see [`Self::memberships`]).
    pub async fn joined_members(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<OwnedUserId>, HomeserverError> {
        Ok(self
            .memberships(room_id)
            .await?
            .into_iter()
            .filter(|(_, membership)| membership == "join")
            .filter_map(|(user, _)| UserId::parse(user).ok())
            .collect())
    }

    /// The room's join rule (`invite`, `public`, `knock`, ...), if it has one: asked of the
    /// homeserver once (that one state event, not the whole state), then kept fresh by the
    /// transaction stream.
    pub async fn join_rule(&self, room_id: &RoomId) -> Result<Option<String>, HomeserverError> {
        use ruma::api::client::state::get_state_event_for_key;
        use ruma::events::StateEventType;
        if let Some(join_rule) = self.rooms.join_rule(room_id) {
            return Ok(join_rule);
        }
        let asked = self.rooms.asking(room_id);
        let request = get_state_event_for_key::v3::Request::new(
            room_id.to_owned(),
            StateEventType::RoomJoinRules,
            String::new(),
        );
        let join_rule = match self.send(request, Identity::Appservice).await {
            Ok(response) => {
                serde_json::from_str::<serde_json::Value>(response.event_or_content.get())
                    .ok()
                    .and_then(|v| {
                        v.get("join_rule")
                            .or_else(|| v.pointer("/content/join_rule"))
                            .and_then(serde_json::Value::as_str)
                            .map(ToOwned::to_owned)
                    })
            }
            Err(e) if e.status() == Some(404) => None,
            Err(e) => return Err(e),
        };
        self.rooms
            .store_join_rule(room_id, asked, join_rule.clone());
        Ok(join_rule)
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_hides_the_as_token() {
        let config = HomeserverClientConfig {
            base_url: "http://127.0.0.1:1".to_owned(),
            as_token: Secret::new("as-token-very-secret"),
            appservice_id: "mxpay".to_owned(),
            bot_user_id: "@_mxpay:localhost".try_into().unwrap(),
            retry: RetryPolicy::default(),
        };
        let client = HomeserverClient::new(config.clone()).unwrap();
        let debug = format!("{config:?} {config:#?} {client:?} {client:#?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }

    #[test]
    fn endpoint_names_are_request_paths_without_ids() {
        assert_eq!(
            endpoint_name::<send_message_event::v3::Request>(),
            "message::send_message_event::v3"
        );
        assert_eq!(
            endpoint_name::<join_room_by_id::v3::Request>(),
            "membership::join_room_by_id::v3"
        );
    }
}

#[cfg(test)]
mod tests;
