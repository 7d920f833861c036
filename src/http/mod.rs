//! The appservice API edge (axum): hs_token check, body limits, Matrix error JSON, and the
//! health, readiness and metrics endpoints. Transactions go to the [`Inbox`] before 200.

pub mod error;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

pub use error::{json_response, EdgeError};

use crate::inbox::{Accepted, Inbox, TXN_ID_MAX_BYTES};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// What the edge needs. Shared by all requests.
#[derive(Debug)]
pub struct EdgeState {
    /// The token the homeserver must present.
    pub hs_token: Secret,
    /// Also accept `?access_token=` (legacy homeservers).
    pub legacy_query_auth: bool,
    /// Largest body accepted, in bytes.
    pub max_body_bytes: u64,
    /// Where transactions go.
    pub inbox: Inbox,
    /// Transactions the inbox may hold unhandled (`appservice.pending_transactions_max`).
    pub pending_transactions_max: usize,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Whether the last homeserver ping succeeded (`/ready`).
    pub ready: Arc<AtomicBool>,
    /// Whether this router serves `/metrics` (false when `metrics.listen` serves it).
    pub metrics_here: bool,
    /// The token `/metrics` asks for (`metrics.bearer_token_file`); `None`: none asked.
    pub metrics_token: Option<Secret>,
}

/// The edge's routes. Unknown paths get 404 `M_UNRECOGNIZED`, known paths with a wrong method
/// 405 `M_UNRECOGNIZED`.
pub fn router(state: Arc<EdgeState>) -> Router {
    let appservice_api = Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn_id}",
            put(put_transaction),
        )
        .route("/_matrix/app/v1/ping", post(post_ping))
        .route("/_matrix/app/v1/users/{user_id}", get(get_user))
        .route("/_matrix/app/v1/rooms/{room_alias}", get(get_room_alias))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_hs_token,
        ));
    let mut router = Router::new()
        .merge(appservice_api)
        .route("/health", get(health))
        .route("/ready", get(ready))
        // mautrix bridges' names for the same probes, which admins' monitoring already knows.
        .route("/_matrix/mau/live", get(health))
        .route("/_matrix/mau/ready", get(ready));
    if state.metrics_here {
        router = router.route("/metrics", get(metrics));
    }
    router
        .fallback(|| async { EdgeError::Unrecognized })
        .method_not_allowed_fallback(|| async { EdgeError::MethodNotAllowed })
        .with_state(state)
}

/// The router of the separate metrics listener (`metrics.listen`): `/metrics` only.
pub fn metrics_router(state: Arc<EdgeState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { EdgeError::Unrecognized })
        .method_not_allowed_fallback(|| async { EdgeError::MethodNotAllowed })
        .with_state(state)
}

/// Whether `presented` equals `expected`, in time independent of where they differ.
fn same_token(presented: &str, expected: &Secret) -> bool {
    // Hash both sides so the comparison takes the same time whatever the lengths.
    let presented = Sha256::digest(presented.as_bytes());
    let expected = Sha256::digest(expected.expose().as_bytes());
    bool::from(presented.ct_eq(&expected))
}

/// Checks the hs_token: `Authorization: Bearer`, or `?access_token=` when legacy auth is on.
async fn require_hs_token(
    State(state): State<Arc<EdgeState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = presented_token(&state, &request) else {
        state.metrics.error("http_auth");
        return EdgeError::MissingToken.into_response();
    };
    if !same_token(&token, &state.hs_token) {
        state.metrics.error("http_auth");
        tracing::warn!(
            path = request.uri().path(),
            "request with a wrong hs_token refused (is the homeserver using an old registration?)"
        );
        return EdgeError::BadToken.into_response();
    }
    next.run(request).await
}

fn presented_token(state: &EdgeState, request: &Request) -> Option<String> {
    if let Some(value) = request.headers().get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    if state.legacy_query_auth {
        let query = request.uri().query()?;
        return url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned());
    }
    None
}

/// Reads the whole body, refusing (413) as soon as it exceeds `max_bytes`: a declared
/// Content-Length over the limit is refused before reading anything.
pub async fn read_body_capped(
    headers: &HeaderMap,
    body: Body,
    max_bytes: u64,
) -> Result<bytes::Bytes, EdgeError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_bytes) {
        return Err(EdgeError::TooLarge);
    }
    let capacity = declared.unwrap_or(0).min(max_bytes) as usize;
    let mut out = bytes::BytesMut::with_capacity(capacity);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| EdgeError::BodyRead)?;
        if (out.len() + chunk.len()) as u64 > max_bytes {
            return Err(EdgeError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

fn empty_ok() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({}))
}

/// `PUT /_matrix/app/v1/transactions/{txnId}`: stored durably, then 200 `{}`; a stored id
/// answers `{}` again without being stored or processed twice.
async fn put_transaction(
    State(state): State<Arc<EdgeState>>,
    txn_id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, EdgeError> {
    let Path(txn_id) = txn_id.map_err(|_| EdgeError::InvalidParam("bad transaction id"))?;
    if txn_id.is_empty() || txn_id.len() > TXN_ID_MAX_BYTES {
        return Err(EdgeError::InvalidParam(
            "transaction id must be 1-255 bytes",
        ));
    }
    let raw = read_body_capped(&headers, body, state.max_body_bytes).await?;
    let value: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| EdgeError::NotJson)?;
    let Some(object) = value.as_object() else {
        return Err(EdgeError::BadJson("body must be a JSON object"));
    };
    if !object.get("events").is_some_and(|e| e.is_array()) {
        return Err(EdgeError::BadJson("`events` must be an array"));
    }
    wait_for_inbox_room(&state, &txn_id).await?;
    let accepted = state.inbox.accept(&txn_id, &raw).await.map_err(|error| {
        state.metrics.error("inbox");
        tracing::error!(%txn_id, %error, "cannot store transaction; answering 500 so the homeserver retries");
        EdgeError::Internal
    })?;
    let duplicate = accepted == Accepted::Duplicate;
    state.metrics.transaction_received(duplicate);
    tracing::debug!(%txn_id, duplicate, "transaction stored");
    Ok(empty_ok())
}

/// How long a transaction waits for room in a full inbox before it is answered 503.
pub const INBOX_FULL_WAIT_MS: u64 = 2_000;

/// Back-pressure: while the inbox holds `pending_transactions_max` unhandled transactions, a
/// new one waits (up to [`INBOX_FULL_WAIT_MS`]) and is then refused with 503, so the homeserver
/// slows down instead of mxpay buffering without end. One the inbox holds already (a retry)
/// always goes through: answering it costs nothing.
async fn wait_for_inbox_room(state: &EdgeState, txn_id: &str) -> Result<(), EdgeError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(INBOX_FULL_WAIT_MS);
    loop {
        if state.inbox.depth() < state.pending_transactions_max {
            return Ok(());
        }
        if state.inbox.contains(txn_id).unwrap_or(false) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            state.metrics.error("inbox_full");
            tracing::warn!(%txn_id, depth = state.inbox.depth(), "inbox full; asking the homeserver to send the transaction again later");
            return Err(EdgeError::Busy);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /_matrix/app/v1/ping`: `{}`.
async fn post_ping(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, EdgeError> {
    let raw = read_body_capped(&headers, body, state.max_body_bytes).await?;
    let txn_id = serde_json::from_slice::<serde_json::Value>(&raw)
        .ok()
        .and_then(|v| v.get("transaction_id")?.as_str().map(ToOwned::to_owned));
    tracing::debug!(?txn_id, "pinged by the homeserver");
    Ok(empty_ok())
}

/// `GET /_matrix/app/v1/users/{userId}`: mxpay creates no users on demand.
async fn get_user() -> EdgeError {
    EdgeError::NotFound("mxpay does not create users on demand")
}

/// `GET /_matrix/app/v1/rooms/{roomAlias}`: mxpay creates no rooms on demand.
async fn get_room_alias() -> EdgeError {
    EdgeError::NotFound("mxpay does not create rooms on demand")
}

/// `GET /health`: the process is up.
async fn health() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// `GET /ready`: 200 when the last homeserver ping succeeded, else 503.
async fn ready(State(state): State<Arc<EdgeState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        json_response(StatusCode::OK, &serde_json::json!({ "ready": true }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "ready": false }),
        )
    }
}

/// `GET /metrics`: OpenMetrics text; with `metrics.bearer_token_file`, only for
/// `Authorization: Bearer <token>` (401 without, 403 with a wrong one).
async fn metrics(State(state): State<Arc<EdgeState>>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.metrics_token {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(presented) = presented else {
            state.metrics.error("metrics_auth");
            return EdgeError::MissingMetricsToken.into_response();
        };
        if !same_token(presented, expected) {
            state.metrics.error("metrics_auth");
            return EdgeError::BadMetricsToken.into_response();
        }
    }
    state.metrics.set_inbox_depth(state.inbox.depth());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
