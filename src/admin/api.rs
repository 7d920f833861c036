//! The admin API's HTTP layer under [`ADMIN_PREFIX`]: bearer-token authentication with scopes,
//! one audit log entry per call (who, what, on what, result), Matrix error JSON.
//!
//! Every handler has the same shape: authenticate, run one [`AdminState`] operation, record
//! the outcome, answer. The route table is built through [`Mount`], which also lists what it
//! mounted, so a test can hold the OpenAPI document against the real router.

use std::future::Future;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::merchants;
use super::service::{AdminState, Settlement, TopupRequest, HISTORY_PAGE_DEFAULT};
use super::token::{authorize, AdminClaims, Scope, TokenError};
use super::views::{AccountJson, TransferJson};
use super::webhook::SIGNATURE_HEADER;
use super::AdminError;
use crate::audit::{AuditEntry, CallLine, AUDIT_PAGE_MAX};
use crate::flood::{Gate, Peer};
use crate::http::json_response;
use crate::ledger::FreezeMode;

/// Where the admin API lives.
pub const ADMIN_PREFIX: &str = "/_mxpay/admin/v1";

/// The OpenAPI document of the admin API (`docs/openapi.json`), served at
/// `GET /_mxpay/admin/v1/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

type Shared = Arc<AdminState>;

/// Largest request body the admin API reads, in bytes; larger bodies get 413 `M_TOO_LARGE`.
pub const ADMIN_BODY_BYTES_MAX: u64 = 64 * 1024;

/// Reads a request body up to [`ADMIN_BODY_BYTES_MAX`].
pub(super) async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, AdminError> {
    crate::http::read_body_capped(headers, body, ADMIN_BODY_BYTES_MAX)
        .await
        .map_err(|e| match e {
            crate::http::EdgeError::TooLarge => AdminError::TooLarge,
            _ => AdminError::BadJson("could not read the request body".to_owned()),
        })
}

/// Builds a router and records every `(method, path)` it mounts.
pub struct Mount<S> {
    router: Router<S>,
    routes: Vec<(&'static str, String)>,
}

impl<S: Clone + Send + Sync + 'static> Mount<S> {
    fn new() -> Self {
        Self {
            router: Router::new(),
            routes: Vec::new(),
        }
    }

    fn add(self, method: &'static str, path: &str, route: MethodRouter<S>) -> Self {
        // A wrong method on a known path gets the same answer as on the appservice edge.
        let route = route.fallback(|| async {
            json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"errcode": "M_UNRECOGNIZED", "error": "method not allowed"}),
            )
        });
        self.add_any(method, path, route)
    }

    /// [`Mount::add`] for a route with several methods on one path (`methods` lists them).
    fn add_methods(self, methods: &[&'static str], path: &str, route: MethodRouter<S>) -> Self {
        let (first, rest) = methods.split_first().expect("at least one method");
        let mut mount = self.add(first, path, route);
        let full = format!("{ADMIN_PREFIX}{path}");
        for method in rest {
            mount.routes.push((method, full.clone()));
        }
        mount
    }

    /// [`Mount::add`] for a route that answers every method itself.
    fn add_any(mut self, method: &'static str, path: &str, route: MethodRouter<S>) -> Self {
        let path = format!("{ADMIN_PREFIX}{path}");
        self.router = self.router.route(&path, route);
        self.routes.push((method, path));
        self
    }
}

/// The admin API router; `None` (admin API off) answers 404 under [`ADMIN_PREFIX`] except for
/// the OpenAPI document.
pub fn router(state: Option<Arc<AdminState>>) -> Router {
    routes(state).0
}

/// The router and the `(method, path)` list of what it mounts.
pub fn routes(state: Option<Arc<AdminState>>) -> (Router, Vec<(&'static str, String)>) {
    let Some(state) = state else {
        let mount = Mount::<()>::new()
            .add("get", "/openapi.json", get(openapi))
            .add_any(
                "any",
                "/{*rest}",
                axum::routing::any(|| async { AdminError::Disabled }),
            );
        return (mount.router, mount.routes);
    };
    let mount = Mount::<Shared>::new()
        .add("get", "/openapi.json", get(openapi))
        .add("post", "/topups", post(post_topup))
        .add("post", "/webhooks/{provider}", post(post_webhook))
        .add("get", "/users/{user_id}/accounts", get(get_accounts))
        .add("get", "/users/{user_id}/history", get(get_history))
        .add("post", "/users/{user_id}/freeze", post(post_freeze))
        .add("post", "/users/{user_id}/unfreeze", post(post_unfreeze))
        .add("post", "/users/{user_id}/pin-reset", post(post_pin_reset))
        .add("get", "/transfers/pending", get(get_pending))
        .add("get", "/transfers/{transfer_id}", get(get_transfer))
        .add(
            "post",
            "/withdrawals/{withdrawal_id}/settle",
            post(post_settle),
        )
        .add(
            "post",
            "/withdrawals/{withdrawal_id}/reject",
            post(post_reject),
        )
        .add("post", "/ledger/verify", post(post_verify))
        .add("get", "/ledger/export", get(get_export))
        .add("get", "/audit", get(get_audit))
        .add("post", "/tokens/{jti}/revoke", post(post_revoke))
        .add_methods(
            &["post", "get"],
            "/merchants",
            post(merchants::post_merchant).get(merchants::get_merchants),
        )
        .add(
            "get",
            "/merchants/{merchant_id}",
            get(merchants::get_merchant),
        )
        .add(
            "post",
            "/merchants/{merchant_id}/disable",
            post(merchants::post_disable),
        )
        .add(
            "post",
            "/merchants/{merchant_id}/enable",
            post(merchants::post_enable),
        )
        .add(
            "post",
            "/merchants/{merchant_id}/limits",
            post(merchants::post_limits),
        )
        .add(
            "post",
            "/merchants/{merchant_id}/keys",
            post(merchants::post_key),
        )
        .add(
            "post",
            "/merchants/{merchant_id}/keys/{key_id}/revoke",
            post(merchants::post_key_revoke),
        )
        .add("get", "/webhook-events", get(get_webhook_events))
        .add("get", "/webhook-events/{event_id}", get(get_webhook_event))
        .add(
            "post",
            "/webhook-events/{event_id}/replay",
            post(post_webhook_replay),
        );
    let routes = mount.routes;
    (mount.router.with_state(state), routes)
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
    )
        .into_response()
}

/// Who made a call, for the audit log.
struct Caller {
    actor: String,
    token_id: Option<String>,
}

fn bearer(headers: &HeaderMap) -> Result<&str, TokenError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(TokenError::Missing)?
        .to_str()
        .map_err(|_| TokenError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(TokenError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Missing);
    }
    Ok(token.trim())
}

/// Authenticates, then checks the scope; the caller is known even when the scope is missing.
fn authenticate(
    state: &AdminState,
    headers: &HeaderMap,
    scope: Scope,
) -> (Caller, Result<(), AdminError>) {
    authenticate_with(state, headers, |claims| authorize(claims, scope))
}

/// Authenticates (signature, audience, expiry, lifetime, not revoked), then asks `allow`.
/// A token that is genuine but refused (revoked, too long-lived, missing a scope) still names
/// its caller, so the audit log shows who tried.
fn authenticate_with(
    state: &AdminState,
    headers: &HeaderMap,
    allow: impl FnOnce(&AdminClaims) -> Result<(), TokenError>,
) -> (Caller, Result<(), AdminError>) {
    let claims = match bearer(headers).and_then(|t| state.tokens.authenticate(t)) {
        Ok(claims) => claims,
        Err(e) => {
            let caller = Caller {
                actor: "unauthenticated".to_owned(),
                token_id: None,
            };
            return (caller, Err(e.into()));
        }
    };
    let allowed = state
        .check_token(&claims)
        .and_then(|()| allow(&claims).map_err(AdminError::from));
    (
        Caller {
            actor: claims.sub,
            token_id: Some(claims.jti),
        },
        allowed,
    )
}

pub use crate::audit::REFUSALS_LIMITED_ACTION;

/// Writes the audit entry for a finished call, then answers. A call whose audit entry cannot
/// be written answers 500: the caller retries (every write is idempotent) and the log stays
/// complete.
///
/// A refused call first passes the [`flood`](crate::flood) limits: over them it is answered
/// 429 `M_LIMIT_EXCEEDED` and not audited on its own; the next audited call of any kind is
/// preceded by one line counting those, so a flood costs the disk a bounded number of lines a
/// minute.
async fn finish<T: Serialize>(
    state: &AdminState,
    peer: &Peer,
    caller: Caller,
    action: &'static str,
    target: String,
    result: Result<T, AdminError>,
) -> Response {
    let suppressed = match &result {
        Err(e) if e.is_refusal() => match state.refusals.check(peer.0) {
            Gate::Admit { suppressed_before } => suppressed_before,
            Gate::Limit { retry_after_ms } => {
                return AdminError::LimitExceeded { retry_after_ms }.into_response()
            }
        },
        // Any audited call writes the count of what was suppressed before it, so the record
        // is complete as soon as the next call of any kind comes.
        _ => state.refusals.take_suppressed(),
    };
    let outcome = match &result {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.audit_result(),
    };
    let line = CallLine {
        actor: caller.actor,
        token_id: caller.token_id,
        action,
        target,
        result: outcome,
    };
    if let Err(e) = state
        .audit
        .append_call(state.clock.now_ms(), suppressed, line)
        .await
    {
        return AdminError::internal(e).into_response();
    }
    match result {
        Ok(value) => json_response(
            StatusCode::OK,
            &serde_json::to_value(value).expect("admin answers serialise"),
        ),
        Err(e) => e.into_response(),
    }
}

/// Authenticates for `scope`, runs `op`, audits, answers.
pub(super) async fn call<T, F, Fut>(
    state: &AdminState,
    peer: &Peer,
    headers: &HeaderMap,
    scope: Scope,
    action: &'static str,
    target: String,
    op: F,
) -> Response
where
    T: Serialize,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, AdminError>>,
{
    let (caller, allowed) = authenticate(state, headers, scope);
    let result = match allowed {
        Ok(()) => op().await,
        Err(e) => Err(e),
    };
    finish(state, peer, caller, action, target, result).await
}

/// The parts of a call on one path id (a user or a withdrawal): the state, the id, the
/// headers. Handlers on such a path take this instead of the three extractors each.
pub(super) struct IdCall {
    state: Shared,
    id: String,
    pub(super) headers: HeaderMap,
    peer: Peer,
}

impl FromRequestParts<Shared> for IdCall {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let Ok(peer) = Peer::from_request_parts(parts, state).await;
        Ok(Self {
            state: state.clone(),
            id,
            headers: parts.headers.clone(),
            peer,
        })
    }
}

impl IdCall {
    /// [`call`] with the id as the audit target; `op` gets the state and the id.
    pub(super) async fn run<T, F, Fut>(self, scope: Scope, action: &'static str, op: F) -> Response
    where
        T: Serialize,
        F: FnOnce(Shared, String) -> Fut,
        Fut: Future<Output = Result<T, AdminError>>,
    {
        let Self {
            state,
            id,
            headers,
            peer,
        } = self;
        let op_state = state.clone();
        call(&state, &peer, &headers, scope, action, id.clone(), || {
            op(op_state, id)
        })
        .await
    }
}

/// What a route on a user's accounts does before it answers with them.
enum AccountsOp {
    Read,
    /// The request body (with its headers, for the size cap), read only once the caller is
    /// authorised.
    Freeze(HeaderMap, Body),
    Unfreeze,
}

/// The routes that read or change a user's accounts and answer with them.
async fn accounts_call(call: IdCall, op: AccountsOp) -> Response {
    let (scope, action) = match op {
        AccountsOp::Read => (Scope::Read, "accounts"),
        AccountsOp::Freeze(..) => (Scope::Freeze, "freeze"),
        AccountsOp::Unfreeze => (Scope::Freeze, "unfreeze"),
    };
    call.run(scope, action, |state, user_id| async move {
        let accounts = match op {
            AccountsOp::Read => state.accounts(&user_id).await?,
            AccountsOp::Freeze(headers, body) => {
                let body = read_body(&headers, body).await?;
                let mode = freeze_mode(parse_json(&body)?)?;
                state.set_frozen(&user_id, Some(mode)).await?
            }
            AccountsOp::Unfreeze => state.set_frozen(&user_id, None).await?,
        };
        Ok(accounts_answer(user_id, accounts))
    })
    .await
}

/// The answer of the routes that read or change a user's accounts.
fn accounts_answer(user_id: String, accounts: Vec<AccountJson>) -> serde_json::Value {
    serde_json::json!({ "user_id": user_id, "accounts": accounts })
}

/// Parses a request body that must be a JSON object (an empty body is `{}`). serde would also
/// read a struct from an array (`[true]` as `{"accept_new_keys": true}`): refused, so a body
/// means only what its field names say.
pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    let bad = |e: serde_json::Error| AdminError::BadJson(e.to_string());
    if body.is_empty() {
        return serde_json::from_slice(b"{}").map_err(bad);
    }
    // JSON allows only whitespace before the value: an object starts with `{`.
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(AdminError::BadJson(
            "the body must be a JSON object".to_owned(),
        ));
    }
    serde_json::from_slice(body).map_err(bad)
}

pub(super) fn parse_query<T: DeserializeOwned>(uri: &Uri) -> Result<T, AdminError> {
    Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| AdminError::InvalidParam(e.body_text()))
}

async fn post_topup(
    State(state): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Authorised first: a refused call's body is never read, so a flood of large bodies costs
    // neither memory nor audit space (its target stays empty).
    let (caller, allowed) = authenticate(&state, &headers, Scope::Topup);
    if let Err(e) = allowed {
        return finish::<()>(&state, &peer, caller, "topup", String::new(), Err(e)).await;
    }
    let request = match read_body(&headers, body).await {
        Ok(body) => parse_json::<TopupRequest>(&body),
        Err(e) => Err(e),
    };
    let target = request
        .as_ref()
        .map(|r| r.user_id.clone())
        .unwrap_or_default();
    let result = match request {
        Ok(request) => state.topup(&request).await,
        Err(e) => Err(e),
    };
    finish(&state, &peer, caller, "topup", target, result).await
}

async fn post_webhook(
    State(state): State<Shared>,
    Path(provider): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    // An unknown provider is refused before its body is read (the signature needs the body).
    let result = if !state.providers.contains_key(&provider) {
        Err(AdminError::UnknownProvider(provider.clone()))
    } else {
        match read_body(&headers, body).await {
            Ok(body) => state.webhook(&provider, signature, &body).await,
            Err(e) => Err(e),
        }
    };
    let target = match &result {
        Ok(r) => format!("{} {}", r.event_id, r.transfer.id),
        Err(_) => String::new(),
    };
    let action = match &result {
        Ok(r) if r.result == "credited" => "webhook.topup",
        Ok(r) if r.result == "settled" => "webhook.settle",
        Ok(_) => "webhook.reject",
        Err(_) => "webhook",
    };
    // The path is the caller's text: only a configured provider's name goes into the log.
    let actor = if state.providers.contains_key(&provider) {
        format!("provider:{provider}")
    } else {
        "provider:?".to_owned()
    };
    let caller = Caller {
        actor,
        token_id: None,
    };
    finish(&state, &peer, caller, action, target, result).await
}

async fn get_accounts(call: IdCall) -> Response {
    accounts_call(call, AccountsOp::Read).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<usize>,
    from: Option<u64>,
}

/// One page of history.
#[derive(Debug, Serialize, Deserialize)]
pub struct HistoryResponse {
    /// The user.
    pub user_id: String,
    /// Transfers, newest first.
    pub transfers: Vec<TransferJson>,
    /// Pass as `from` for older transfers; absent at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

async fn get_history(call: IdCall, uri: Uri) -> Response {
    call.run(Scope::Read, "history", |state, user_id| async move {
        let query: HistoryQuery = parse_query(&uri)?;
        let limit = query.limit.unwrap_or(HISTORY_PAGE_DEFAULT);
        let (transfers, next) = state.history(&user_id, query.from, limit).await?;
        Ok(HistoryResponse {
            user_id,
            transfers,
            next: next.map(|n| n.to_string()),
        })
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeRequest {
    /// `debits` (default: nothing leaves) or `all` (nothing leaves or enters).
    #[serde(default)]
    mode: Option<String>,
}

fn freeze_mode(request: FreezeRequest) -> Result<FreezeMode, AdminError> {
    match request.mode.as_deref() {
        None | Some("debits") => Ok(FreezeMode::Debits),
        Some("all") => Ok(FreezeMode::All),
        Some(other) => Err(AdminError::InvalidParam(format!(
            "mode `{other}` is neither `debits` nor `all`"
        ))),
    }
}

async fn post_freeze(call: IdCall, body: Body) -> Response {
    let headers = call.headers.clone();
    accounts_call(call, AccountsOp::Freeze(headers, body)).await
}

async fn post_unfreeze(call: IdCall) -> Response {
    accounts_call(call, AccountsOp::Unfreeze).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinResetRequest {
    /// Also confirm the user's current cross-signing identity for their next `!pin set`.
    #[serde(default)]
    accept_new_keys: bool,
}

/// The audit action of a PIN reset that also confirms the user's new keys: a separate name, so
/// an auditor finds every confirmation (including refused attempts) by its action alone.
const PIN_RESET_ACCEPTING_KEYS: &str = "pin-reset.accept-new-keys";

async fn post_pin_reset(call: IdCall, body: Body) -> Response {
    let IdCall {
        state,
        id: user_id,
        headers,
        peer,
    } = call;
    let (caller, allowed) = authenticate(&state, &headers, Scope::PinReset);
    // The body names the audit action, so it is read for a genuine token even without the
    // scope (an attempt to confirm new keys shows as such); never for an unauthenticated call
    // (its body is not read at all), whose action is plain `pin-reset`.
    let request = match caller.token_id {
        Some(_) => match read_body(&headers, body).await {
            Ok(body) => Some(parse_json::<PinResetRequest>(&body)),
            Err(e) => Some(Err(e)),
        },
        None => None,
    };
    let action = match &request {
        Some(Ok(PinResetRequest {
            accept_new_keys: true,
        })) => PIN_RESET_ACCEPTING_KEYS,
        _ => "pin-reset",
    };
    let result = match (allowed, request) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(Ok(request))) => state.reset_pin(&user_id, request.accept_new_keys).await,
        (Ok(()), Some(Err(e))) => Err(e),
        (Ok(()), None) => Err(AdminError::internal(
            "an authorised call without a token id",
        )),
    };
    finish(&state, &peer, caller, action, user_id, result).await
}

async fn get_pending(State(state): State<Shared>, peer: Peer, headers: HeaderMap) -> Response {
    call(
        &state,
        &peer,
        &headers,
        Scope::Read,
        "pending",
        String::new(),
        || async { Ok(serde_json::json!({ "transfers": state.pending().await? })) },
    )
    .await
}

async fn get_transfer(call: IdCall) -> Response {
    call.run(Scope::Read, "transfer", |state, transfer_id| async move {
        Ok(serde_json::json!({ "transfer": state.transfer(&transfer_id).await? }))
    })
    .await
}

async fn settle(call: IdCall, outcome: Settlement) -> Response {
    let action = match outcome {
        Settlement::Settle => "settle",
        Settlement::Reject => "reject",
    };
    call.run(Scope::Settle, action, |state, id| async move {
        let transfer = state.settle(&id, outcome).await?;
        Ok(serde_json::json!({
            "transfer": TransferJson::new(state.ledger.currencies(), &transfer),
        }))
    })
    .await
}

async fn post_settle(call: IdCall) -> Response {
    settle(call, Settlement::Settle).await
}

async fn post_reject(call: IdCall) -> Response {
    settle(call, Settlement::Reject).await
}

async fn post_verify(State(state): State<Shared>, peer: Peer, headers: HeaderMap) -> Response {
    call(
        &state,
        &peer,
        &headers,
        Scope::Read,
        "ledger.verify",
        String::new(),
        || async { state.verify().await },
    )
    .await
}

/// Lines buffered between the journal reader and the response body.
const EXPORT_CHANNEL_LINES: usize = 256;

async fn get_export(State(state): State<Shared>, peer: Peer, headers: HeaderMap) -> Response {
    let (caller, allowed) = authenticate(&state, &headers, Scope::Read);
    if let Err(e) = allowed {
        return finish::<()>(
            &state,
            &peer,
            caller,
            "ledger.export",
            String::new(),
            Err(e),
        )
        .await;
    }
    // Audit the start; the stream's own end says whether it completed (a last `error` line).
    let started = finish(
        &state,
        &peer,
        caller,
        "ledger.export",
        String::new(),
        Ok(()),
    )
    .await;
    if started.status() != StatusCode::OK {
        return started;
    }
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(EXPORT_CHANNEL_LINES);
    let ledger = state.ledger.clone();
    // The journal reader blocks on sled; it runs on a blocking thread and stops as soon as
    // the client goes away (the channel closes).
    tokio::task::spawn_blocking(move || {
        let currencies = ledger.currencies().clone();
        for entry in ledger.export() {
            let line = match entry {
                Ok(entry) => super::views::journal_line(&currencies, &entry),
                Err(e) => {
                    tracing::error!(error = %e, "journal export stopped");
                    serde_json::json!({ "error": e.to_string() })
                }
            };
            let mut bytes = serde_json::to_vec(&line).expect("JSON values serialise");
            bytes.push(b'\n');
            if tx.blocking_send(Ok(Bytes::from(bytes))).is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `POST /tokens/{jti}/revoke`: needs the `revoke` scope, except that a token may always
/// revoke itself (that only takes power away).
async fn post_revoke(call: IdCall) -> Response {
    let IdCall {
        state,
        id: jti,
        headers,
        peer,
    } = call;
    // A token revoking itself tells its own expiry: the revocation is kept until then.
    let mut own_exp_s = None;
    let (caller, allowed) = authenticate_with(&state, &headers, |claims| {
        if claims.jti == jti {
            own_exp_s = Some(claims.exp);
            Ok(())
        } else {
            authorize(claims, Scope::Revoke)
        }
    });
    let result = match allowed {
        Ok(()) => state.revoke_token_until(&jti, own_exp_s).await,
        Err(e) => Err(e),
    };
    finish(&state, &peer, caller, "token.revoke", jti, result).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
    before: Option<u64>,
}

/// One page of the audit log.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuditResponse {
    /// Entries, newest first.
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for older entries; absent at the start of the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

async fn get_audit(
    State(state): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    call(
        &state,
        &peer,
        &headers,
        Scope::Audit,
        "audit",
        String::new(),
        || async {
            let query: AuditQuery = parse_query(&uri)?;
            let limit = query.limit.unwrap_or(100).clamp(1, AUDIT_PAGE_MAX);
            let audit = state.audit.clone();
            let entries = tokio::task::spawn_blocking(move || audit.page(query.before, limit))
                .await
                .map_err(AdminError::internal)?
                .map_err(AdminError::internal)?;
            let next = entries
                .last()
                .filter(|e| e.seq > 1 && entries.len() == limit)
                .map(|e| e.seq);
            Ok(AuditResponse { entries, next })
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookEventsQuery {
    state: Option<String>,
    merchant: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn get_webhook_events(
    State(state): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    call(
        &state,
        &peer,
        &headers,
        Scope::Read,
        "webhooks.list",
        String::new(),
        || async {
            let query: WebhookEventsQuery = parse_query(&uri)?;
            let filter = crate::webhooks::ListFilter {
                state: query
                    .state
                    .as_deref()
                    .map(super::webhook_events::parse_state)
                    .transpose()?,
                merchant_id: query.merchant,
            };
            let limit = query
                .limit
                .unwrap_or(super::webhook_events::WEBHOOK_PAGE_DEFAULT);
            state.webhook_events(filter, query.after, limit).await
        },
    )
    .await
}

async fn get_webhook_event(call: IdCall) -> Response {
    call.run(Scope::Read, "webhooks.show", |state, event_id| async move {
        Ok(serde_json::json!({ "event": state.webhook_event(&event_id).await? }))
    })
    .await
}

async fn post_webhook_replay(call: IdCall) -> Response {
    call.run(
        Scope::Webhooks,
        "webhooks.replay",
        |state, event_id| async move { state.replay_webhook_event(&event_id).await },
    )
    .await
}
