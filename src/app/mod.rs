//! Wires the HTTP edge, the inbox worker and the homeserver client together, and runs the
//! start-up checks of `mxpay serve`.
//!
//! Start order: open the inbox, bind and serve the appservice API (the homeserver's ping comes
//! back to it), check the homeserver (reachable, token accepted, bot registered, ping round
//! trip), then mark ready and start the worker that feeds stored transactions to the
//! [`Pipeline`].

pub mod merchant_webhooks;
mod wiring;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::AdminState;
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::homeserver::{HomeserverClient, HomeserverClientConfig, HomeserverError, RetryPolicy};
use crate::http::EdgeState;
use crate::inbox::{Inbox, InboxError};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::registration::{Registration, RegistrationError};

/// Errors starting or running the appservice; each is a sentence for the admin.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The registration file is missing, unreadable or disagrees with the config.
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    /// The inbox database could not be opened.
    #[error("cannot open the inbox in {path}: {source}")]
    Inbox {
        /// The inbox directory.
        path: std::path::PathBuf,
        /// Why.
        source: InboxError,
    },
    /// The data directory could not be created or made private (0700).
    #[error("cannot create data_dir {path} or make it private (mode 0700): {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configured bot user ID is invalid.
    #[error("config: the bot user ID {0} is invalid")]
    BotUserId(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (appservice.listen): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics listen address could not be bound.
    #[error("cannot listen on {addr} (metrics.listen): {source}")]
    MetricsListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics token file is missing, unreadable or not private.
    #[error(transparent)]
    MetricsToken(crate::config::ConfigError),
    /// The appservice API server failed.
    #[error("the appservice API server failed: {0}")]
    Serve(std::io::Error),
    /// The homeserver client could not be built.
    #[error("cannot set up the homeserver client: {0}")]
    Client(HomeserverError),
    /// A start-up check against the homeserver failed.
    #[error("{0}")]
    Startup(String),
    /// The ledger could not be opened.
    #[error("cannot open the ledger in {path}: {source}")]
    Ledger {
        /// The data directory.
        path: std::path::PathBuf,
        /// Why.
        source: crate::ledger::LedgerError,
    },
    /// The admin API could not be set up (a key or secret missing, the audit log unreadable).
    #[error("cannot start the admin API: {0}")]
    Admin(String),
    /// The transaction worker stopped while mxpay was running (a bug); unprocessed
    /// transactions stay in the inbox for the next start.
    #[error("the transaction worker stopped ({0}); unprocessed transactions stay in the inbox")]
    WorkerStopped(String),
}

pub use worker::WorkerPolicy;

/// Start-up pings asked again after a failure to connect.
const PING_RETRIES: usize = 2;

/// How often `serve` pings the homeserver after start to keep `/ready` true to life.
pub const READY_PING_INTERVAL_MS: u64 = 30_000;

/// The assembled appservice: inbox, metrics, readiness, homeserver client.
#[derive(Clone)]
pub struct App {
    config: Arc<Config>,
    registration: Arc<Registration>,
    inbox: Inbox,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    client: HomeserverClient,
    ledger: Ledger,
    clock: SharedClock,
    admin: Option<Arc<AdminState>>,
    merchant_api: Option<Arc<crate::merchants::api::MerchantApi>>,
    metrics_token: Option<crate::secret::Secret>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .field("inbox", &self.inbox)
            .field("ledger", &self.ledger)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Opens the inbox under `config.data_dir` and builds the homeserver client, with the
    /// default [`RetryPolicy`]. Sends nothing.
    pub fn open(config: Config, registration: Registration) -> Result<Self, AppError> {
        Self::open_with(config, registration, RetryPolicy::default())
    }

    /// [`App::open`] with explicit homeserver retry bounds (tests shorten them).
    pub fn open_with(
        config: Config,
        registration: Registration,
        retry: RetryPolicy,
    ) -> Result<Self, AppError> {
        Self::open_with_clock(config, registration, retry, Arc::new(SystemClock))
    }

    /// [`App::open_with`] with the clock the ledger and the admin API use (tests pass a
    /// [`crate::clock::ManualClock`]).
    pub fn open_with_clock(
        config: Config,
        registration: Registration,
        retry: RetryPolicy,
        clock: SharedClock,
    ) -> Result<Self, AppError> {
        // 0700 also when it existed wider: it holds PIN hashes, keys and raw transactions.
        crate::private_fs::make_private_dir(&config.data_dir).map_err(|e| match e {
            crate::private_fs::PrivateFsError::DataDir { path, source } => {
                AppError::DataDir { path, source }
            }
            other => AppError::Startup(other.to_string()),
        })?;
        let inbox_dir = config.inbox_dir();
        let inbox = Inbox::open_with(
            &inbox_dir,
            clock.clone(),
            crate::inbox::FailedRetention::default(),
        )
        .map_err(|source| AppError::Inbox {
            path: inbox_dir,
            source,
        })?;
        let metrics_token = config
            .metrics
            .load_bearer_token()
            .map_err(AppError::MetricsToken)?;
        let bot_user_id = ruma::OwnedUserId::try_from(config.bot_user_id())
            .map_err(|_| AppError::BotUserId(config.bot_user_id()))?;
        let metrics = Arc::new(Metrics::new());
        let client = HomeserverClient::new(HomeserverClientConfig {
            base_url: config.homeserver.url.clone(),
            as_token: registration.as_token.clone(),
            appservice_id: registration.id.clone(),
            bot_user_id,
            retry,
        })
        .map_err(AppError::Client)?
        .with_metrics(metrics.clone());
        let ledger =
            Ledger::open(&config.data_dir, &config.ledger, clock.clone()).map_err(|source| {
                AppError::Ledger {
                    path: config.data_dir.join("ledger"),
                    source,
                }
            })?;
        let observed = metrics.clone();
        ledger.observe_commits(Box::new(move |commands, duration| {
            observed.ledger_commit(commands, duration);
        }));
        let admin = AdminState::open(
            &config.admin,
            &config.data_dir,
            ledger.clone(),
            clock.clone(),
        )
        .map_err(|e| match e {
            crate::admin::AdminError::Internal(detail) => AppError::Admin(detail),
            other => AppError::Admin(other.to_string()),
        })?
        .map(Arc::new);
        // Merchant keys are signed with the admin token key: no admin API, no merchant API.
        let merchant_api = admin
            .as_ref()
            .map(|admin| {
                crate::merchants::api::MerchantApi::new(
                    admin.merchants().clone(),
                    admin.merchant_keys().clone(),
                    ledger.clone(),
                    clock.clone(),
                )
                .map(|api| {
                    Arc::new(
                        api.with_rules(config.merchants.invoice_rules())
                            .with_audit(admin.audit().clone(), admin.refusal_gate().clone()),
                    )
                })
            })
            .transpose()
            .map_err(|e| AppError::Admin(format!("merchant store: {e:?}")))?;
        Ok(Self {
            config: Arc::new(config),
            registration: Arc::new(registration),
            inbox,
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            client,
            ledger,
            clock,
            admin,
            merchant_api,
            metrics_token,
        })
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The registration (holds the tokens).
    pub fn registration(&self) -> &Registration {
        &self.registration
    }

    /// The wallet ledger (opened at `<data_dir>/ledger` with the configured currencies).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The clock the ledger and the admin API run on.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The merchant API's state; `None` when `admin.token` is not configured.
    pub fn merchant_api(&self) -> Option<&Arc<crate::merchants::api::MerchantApi>> {
        self.merchant_api.as_ref()
    }

    /// The admin API's state; `None` when `admin.token` is not configured.
    pub fn admin(&self) -> Option<&Arc<AdminState>> {
        self.admin.as_ref()
    }

    /// The inbox.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The homeserver client (AS token, retries).
    pub fn client(&self) -> &HomeserverClient {
        &self.client
    }

    /// Sets what `/ready` reports.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/ready` reports ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The appservice API router, to serve or to drive in-process with `tower::ServiceExt`.
    pub fn router(&self) -> Router {
        router(self)
    }

    /// The router of the separate metrics listener (`metrics.listen`): `/metrics` only.
    pub fn metrics_router(&self) -> Router {
        crate::http::metrics_router(self.edge_state())
    }

    fn edge_state(&self) -> Arc<EdgeState> {
        Arc::new(EdgeState {
            hs_token: self.registration.hs_token.clone(),
            legacy_query_auth: self.config.appservice.legacy_query_auth,
            max_body_bytes: self.config.appservice.max_body_bytes,
            inbox: self.inbox.clone(),
            pending_transactions_max: self.config.appservice.pending_transactions_max,
            metrics: self.metrics.clone(),
            ready: self.ready.clone(),
            metrics_here: self.config.metrics.listen.is_none(),
            metrics_token: self.metrics_token.clone(),
        })
    }

    /// Starts the worker feeding stored transactions to `handler` until `shutdown` turns true.
    pub fn spawn_worker(
        &self,
        handler: Arc<dyn Pipeline>,
        policy: WorkerPolicy,
        shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let worker = worker::Worker {
            inbox: self.inbox.clone(),
            metrics: self.metrics.clone(),
            pipeline: handler,
            policy,
        };
        tokio::spawn(worker.run(shutdown))
    }

    /// The checks `serve` runs before it reports ready: the homeserver answers as a Matrix
    /// server, accepts the as_token (bot registered), and reaches mxpay back (ping).
    pub async fn check_homeserver(&self) -> Result<(), AppError> {
        let url = &self.config.homeserver.url;
        let registration_path = self.config.appservice.registration.display();
        self.client
            .server_versions()
            .await
            .map_err(|e| AppError::Startup(explain_versions(url, &e)))?;
        self.client.register_bot().await.map_err(|e| {
            AppError::Startup(explain_token(
                &e,
                &registration_path.to_string(),
                self.client.bot_user_id().as_str(),
            ))
        })?;
        let txn_id = ruma::TransactionId::new();
        // The homeserver's own side of a ping can fail once under load (Synapse answered
        // M_CONNECTION_FAILED "AlreadyCalled" after mxpay had answered it): a failure to
        // connect is asked again twice before it stops start-up.
        let mut pinged = self.client.ping(Some(&txn_id)).await;
        for _ in 0..PING_RETRIES {
            match &pinged {
                Err(e)
                    if matches!(
                        e.errcode(),
                        Some("M_CONNECTION_FAILED" | "M_CONNECTION_TIMEOUT")
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    pinged = self.client.ping(Some(&ruma::TransactionId::new())).await;
                }
                _ => break,
            }
        }
        match pinged {
            Ok(duration) => {
                tracing::info!(
                    round_trip_ms = duration.as_millis() as u64,
                    "homeserver reached mxpay (ping)"
                );
                Ok(())
            }
            Err(e) if e.status() == Some(404) && e.errcode() != Some("M_NOT_FOUND") => {
                tracing::warn!(
                    "the homeserver has no appservice ping endpoint (Matrix 1.7); cannot check \
                     that it reaches mxpay at {}",
                    self.config.appservice.url
                );
                Ok(())
            }
            Err(e) => Err(AppError::Startup(explain_ping(
                &e,
                &self.config,
                &registration_path.to_string(),
            ))),
        }
    }
}

/// The appservice API router for `app` (same as [`App::router`]), with the admin API.
pub fn router(app: &App) -> Router {
    let admin = crate::admin::router(app.admin.clone());
    let merchant = crate::merchants::api::routes(app.merchant_api.clone()).0;
    let edge = crate::http::router(app.edge_state());
    edge.merge(admin).merge(merchant)
}

fn explain_versions(url: &str, error: &HomeserverError) -> String {
    match error {
        HomeserverError::Connect { reason, .. } => format!(
            "cannot reach the homeserver at {url} (homeserver.url): {reason}. Is the homeserver \
             running, and is homeserver.url right?"
        ),
        HomeserverError::Timeout { timeout_ms, .. } => format!(
            "the homeserver at {url} (homeserver.url) did not answer within {timeout_ms} ms"
        ),
        HomeserverError::NotMatrix { status, .. } => format!(
            "{url} (homeserver.url) is not a Matrix homeserver: GET /_matrix/client/versions \
             answered HTTP {status} without a version list"
        ),
        other => format!("checking the homeserver at {url} (homeserver.url) failed: {other}"),
    }
}

fn explain_token(error: &HomeserverError, registration: &str, bot: &str) -> String {
    match (error.status(), error.errcode()) {
        (_, Some("M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN")) | (Some(401), _) => format!(
            "the homeserver does not accept the as_token from {registration}: it does not know \
             this appservice. Add the registration file to the homeserver (Synapse: \
             app_service_config_files) and restart the homeserver; if you regenerated the \
             registration, the homeserver still has the old one"
        ),
        (_, Some("M_EXCLUSIVE" | "M_INVALID_USERNAME")) => format!(
            "the homeserver refuses to register the bot {bot}: {error}. The registration's user \
             namespace must match appservice.bot_localpart and homeserver.server_name \
             (regenerate the registration)"
        ),
        (Some(403), _) => format!(
            "the homeserver refused the as_token from {registration} ({error}): it is not an \
             appservice token on this homeserver"
        ),
        _ => format!("registering the bot {bot} failed: {error}"),
    }
}

fn explain_ping(error: &HomeserverError, config: &Config, registration: &str) -> String {
    let id = &config.appservice.id;
    let as_url = &config.appservice.url;
    let message = match error {
        HomeserverError::Matrix { message, .. } => message.as_str(),
        _ => "",
    };
    match (error.status(), error.errcode()) {
        (_, Some("M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN")) | (Some(401), _) => format!(
            "the homeserver does not accept the as_token from {registration}: add the \
             registration to the homeserver and restart it"
        ),
        (_, Some("M_FORBIDDEN")) if message.to_ascii_lowercase().contains("mismatch") => format!(
            "appservice id mismatch: the homeserver knows the as_token under another id than \
             `{id}` (appservice.id); make appservice.id and the registration's id agree, then \
             restart the homeserver"
        ),
        (_, Some("M_FORBIDDEN")) => format!(
            "the homeserver refused the ping: the as_token from {registration} does not belong \
             to appservice `{id}` ({message})"
        ),
        (_, Some("M_NOT_FOUND")) | (Some(404), _) => format!(
            "the homeserver does not know appservice `{id}`: add {registration} to the \
             homeserver and restart it"
        ),
        (_, Some("M_URL_NOT_SET")) => "the homeserver's copy of the registration has no url, so \
             it cannot send events to mxpay: set appservice.url, regenerate the registration and \
             restart the homeserver"
            .to_owned(),
        (_, Some("M_BAD_STATUS")) => format!(
            "the homeserver reached mxpay at {as_url} but mxpay refused it ({message}): the \
             homeserver uses another hs_token than {registration} (restart it after \
             regenerating the registration), or another service answers at that URL"
        ),
        (_, Some("M_CONNECTION_FAILED")) => format!(
            "the homeserver cannot reach mxpay at {as_url} (appservice.url, registration url): \
             {message}. Check that appservice.url points to appservice.listen ({}) from the \
             homeserver's side",
            config.appservice.listen
        ),
        (_, Some("M_CONNECTION_TIMEOUT")) => format!(
            "the homeserver timed out reaching mxpay at {as_url} (appservice.url): check \
             firewalls and that appservice.url points to appservice.listen ({})",
            config.appservice.listen
        ),
        _ => format!("the start-up ping of the homeserver failed: {error}"),
    }
}

/// Sleeps `delay` or until shutdown; true if shutting down.
pub(crate) async fn wait_or_shutdown(
    shutdown: &mut watch::Receiver<bool>,
    delay: Duration,
) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Longest wait for the server and worker to stop after a shutdown signal.
const SHUTDOWN_GRACE_MS: u64 = 10_000;

/// Runs `mxpay serve`: start-up checks, then serves until SIGINT/SIGTERM.
pub async fn serve(config: Config) -> Result<(), AppError> {
    // The pepper (readable, private, long enough) is checked before anything is opened or the
    // homeserver is asked: a secret file open to others stops the start at once.
    if config.payments.enabled {
        config
            .payments
            .load_pepper()
            .map_err(|e| AppError::Startup(e.to_string()))?;
    }
    let registration = Registration::load_for(&config)?;
    let app = App::open(config, registration)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (addr, server) = start_server(&app, shutdown_rx.clone()).await?;
    tracing::info!(listen = %addr, "appservice API listening");
    let metrics_server = match start_metrics_server(&app, shutdown_rx.clone()).await {
        Ok(Some((metrics_addr, metrics_server))) => {
            tracing::info!(listen = %metrics_addr, "/metrics listening");
            Some(metrics_server)
        }
        Ok(None) => {
            if !addr.ip().is_loopback() && app.metrics_token.is_none() {
                tracing::warn!(
                    listen = %addr,
                    "/metrics (PIN failure counts) is served without a token on a \
                     non-loopback address; set metrics.listen or metrics.bearer_token_file"
                );
            }
            None
        }
        Err(error) => {
            let _ = shutdown_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), server).await;
            return Err(error);
        }
    };

    let checked = tokio::select! {
        checked = app.check_homeserver() => checked,
        _ = shutdown_signal() => Ok(()),
    };
    if let Err(error) = checked {
        let _ = shutdown_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), server).await;
        return Err(error);
    }
    // The bot's device and crypto store come up before transactions are handled.
    let handler = match wiring::start(&app, shutdown_rx.clone()).await {
        Ok(handler) => handler,
        Err(error) => {
            let _ = shutdown_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), server).await;
            return Err(error);
        }
    };
    app.set_ready(true);
    let worker = app.spawn_worker(handler, WorkerPolicy::default(), shutdown_rx.clone());
    let pinger = tokio::spawn(ready_pings(app.clone(), shutdown_rx.clone()));
    tracing::info!(bot = %app.client.bot_user_id(), "mxpay is ready");

    // A worker that dies (a panicking handler is a bug) must not leave a process that
    // acknowledges transactions and never handles them: stop, so a supervisor sees it.
    let mut worker = worker;
    let worker_died = tokio::select! {
        _ = shutdown_signal() => None,
        ended = &mut worker => Some(ended),
    };
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
    let _ = tokio::time::timeout(grace, async {
        if worker_died.is_none() {
            let _ = worker.await;
        }
        let _ = pinger.await;
    })
    .await;
    tracing::debug!("worker stopped");
    let served = tokio::time::timeout(grace, server).await;
    if let Some(metrics_server) = metrics_server {
        let _ = tokio::time::timeout(grace, metrics_server).await;
    }
    tracing::debug!("server stopped");
    if let Some(ended) = worker_died {
        let reason = match ended {
            Err(error) if error.is_panic() => "the transaction handler panicked".to_owned(),
            Err(error) => error.to_string(),
            Ok(()) => "it returned".to_owned(),
        };
        tracing::error!(%reason, "the transaction worker stopped");
        return Err(AppError::WorkerStopped(reason));
    }
    match served {
        Ok(Ok(Err(error))) => Err(AppError::Serve(error)),
        _ => Ok(()),
    }
}

/// Binds `appservice.listen` and serves the router (TCP_NODELAY on every accepted socket) until
/// `shutdown` turns true. Returns the bound address (port 0 in the config picks a free port).
pub async fn start_server(
    app: &App,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<std::io::Result<()>>), AppError> {
    let addr = app.config.appservice.listen;
    bind_and_serve(addr, app.router(), shutdown)
        .await
        .map_err(|source| AppError::Listen { addr, source })
}

/// Binds `metrics.listen`, when set, and serves `/metrics` there until `shutdown` turns true.
/// Returns the bound address (port 0 picks a free port).
pub async fn start_metrics_server(
    app: &App,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<(SocketAddr, JoinHandle<std::io::Result<()>>)>, AppError> {
    let Some(addr) = app.config.metrics.listen else {
        return Ok(None);
    };
    bind_and_serve(addr, app.metrics_router(), shutdown)
        .await
        .map(Some)
        .map_err(|source| AppError::MetricsListen { addr, source })
}

async fn bind_and_serve(
    addr: SocketAddr,
    router: Router,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    use axum::serve::ListenerExt as _;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    // Small answers written in two sends otherwise wait for a delayed ACK (Nagle).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let mut shutdown = shutdown;
    let server = tokio::spawn(async move {
        // With the peer's address: the admin API limits refused calls per peer.
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, service)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await
    });
    Ok((bound, server))
}

/// Pings the homeserver every [`READY_PING_INTERVAL_MS`] and keeps `/ready` in step.
async fn ready_pings(app: App, mut shutdown: watch::Receiver<bool>) {
    let interval = Duration::from_millis(READY_PING_INTERVAL_MS);
    // One attempt per round: /ready should turn false within a round, not after the
    // retries of a normal request.
    let client = app.client.with_retry(RetryPolicy {
        attempts_max: 1,
        ..app.client.retry_policy()
    });
    while !wait_or_shutdown(&mut shutdown, interval).await {
        let ok = match client.ping(None).await {
            Ok(_) => true,
            Err(error) => {
                app.metrics.error("homeserver_ping");
                if app.is_ready() {
                    tracing::warn!(%error, "homeserver ping failed; not ready");
                }
                false
            }
        };
        if ok && !app.is_ready() {
            tracing::info!("homeserver ping works again; ready");
        }
        app.set_ready(ok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::InboxTransaction;
    use crate::pipeline::PipelineError;
    use axum::body::Body;
    use axum::http::Request;
    use parking_lot::Mutex;
    use serde_json::json;
    use std::time::Instant;
    use tower::ServiceExt as _;

    /// Records handled ids; fails per a script keyed by txn id.
    #[derive(Default)]
    struct Recorder {
        handled: Mutex<Vec<String>>,
        transient_failures_left: Mutex<std::collections::HashMap<String, u32>>,
        permanent: Mutex<std::collections::HashSet<String>>,
    }

    #[async_trait::async_trait]
    impl Pipeline for Recorder {
        async fn handle(&self, txn: &InboxTransaction) -> Result<(), PipelineError> {
            if self.permanent.lock().contains(&txn.txn_id) {
                return Err(PipelineError::permanent("bad transaction"));
            }
            if let Some(left) = self.transient_failures_left.lock().get_mut(&txn.txn_id) {
                if *left > 0 {
                    *left -= 1;
                    return Err(PipelineError::transient("busy"));
                }
            }
            self.handled.lock().push(txn.txn_id.clone());
            Ok(())
        }
    }

    fn fast_policy() -> WorkerPolicy {
        WorkerPolicy {
            batch_max: 2,
            attempts_max: 3,
            backoff_base_ms: 1,
            backoff_max_ms: 5,
            idle_poll_ms: 50,
            ..WorkerPolicy::default()
        }
    }

    fn config_in(dir: &std::path::Path) -> Config {
        Config {
            data_dir: dir.to_owned(),
            ..Config::default()
        }
    }

    async fn put(app: &App, id: &str) {
        let response = app
            .router()
            .oneshot(
                Request::put(format!("/_matrix/app/v1/transactions/{id}"))
                    .header(
                        "authorization",
                        format!("Bearer {}", app.registration().hs_token.expose()),
                    )
                    .body(Body::from(
                        json!({"events": [{"type": "m.room.message"}]}).to_string(),
                    ))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    /// Polls `done` every 10 ms for up to 20 s (generous for slow machines).
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn worker_handles_each_transaction_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let app = App::open(config.clone(), Registration::generate(&config)).unwrap();
        for id in ["1", "2", "3"] {
            put(&app, id).await;
        }
        let recorder = Arc::new(Recorder::default());
        let (stop, stopped) = watch::channel(false);
        let worker = app.spawn_worker(recorder.clone(), fast_policy(), stopped);
        eventually("three handled", || recorder.handled.lock().len() == 3).await;
        put(&app, "2").await; // replay: must not be handled again
        put(&app, "4").await;
        eventually("fourth handled", || recorder.handled.lock().len() >= 4).await;
        assert_eq!(*recorder.handled.lock(), ["1", "2", "3", "4"]);
        assert_eq!(app.inbox().depth(), 0);
        assert!(app
            .metrics()
            .encode()
            .contains(r#"mxpay_events_total{event_type="m.room.message"} 4"#));
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), worker)
            .await
            .expect("worker stops on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn transient_errors_are_retried_permanent_ones_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let app = App::open(config.clone(), Registration::generate(&config)).unwrap();
        for id in ["flaky", "bad", "hopeless", "fine"] {
            put(&app, id).await;
        }
        let recorder = Arc::new(Recorder::default());
        recorder
            .transient_failures_left
            .lock()
            .extend([("flaky".to_owned(), 2), ("hopeless".to_owned(), 100)]);
        recorder.permanent.lock().insert("bad".to_owned());
        let (_stop, stopped) = watch::channel(false);
        let _worker = app.spawn_worker(recorder.clone(), fast_policy(), stopped);
        eventually("all done", || app.inbox().depth() == 0).await;
        assert_eq!(*recorder.handled.lock(), ["flaky", "fine"]);
        let failed: Vec<String> = app
            .inbox()
            .failed(10)
            .unwrap()
            .into_iter()
            .map(|t| t.txn_id)
            .collect();
        assert_eq!(failed, ["bad", "hopeless"]);
        let text = app.metrics().encode();
        assert!(
            text.contains(r#"mxpay_errors_total{kind="handler_permanent"} 1"#),
            "{text}"
        );
        // flaky: 2, hopeless: 3 (attempts_max).
        assert!(
            text.contains(r#"mxpay_errors_total{kind="handler_transient"} 5"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn new_app_over_the_same_data_dir_processes_what_was_left() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let registration = Registration::generate(&config);
        {
            let app = App::open(config.clone(), registration.clone()).unwrap();
            put(&app, "a").await;
            put(&app, "b").await;
            // No worker ran: acknowledged but unprocessed, as after a crash.
        }
        let app = App::open(config, registration).unwrap();
        assert_eq!(app.inbox().depth(), 2);
        let recorder = Arc::new(Recorder::default());
        let (_stop, stopped) = watch::channel(false);
        let _worker = app.spawn_worker(recorder.clone(), fast_policy(), stopped);
        eventually("both handled", || recorder.handled.lock().len() == 2).await;
        assert_eq!(*recorder.handled.lock(), ["a", "b"]);
    }

    #[tokio::test]
    async fn server_answers_over_tcp_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        config.appservice.listen = "127.0.0.1:0".parse().unwrap();
        let registration = Registration::generate(&config);
        let app = App::open(config, registration.clone()).unwrap();
        let (stop, stopped) = watch::channel(false);
        let (addr, server) = start_server(&app, stopped).await.unwrap();
        let http = reqwest::Client::new();
        let health = http
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        // Keep-alive connection: several transactions over one socket, each with a body the
        // client can delimit.
        for id in 1..=3 {
            let response = http
                .put(format!("http://{addr}/_matrix/app/v1/transactions/{id}"))
                .bearer_auth(registration.hs_token.expose())
                .body(r#"{"events":[]}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.content_length(), Some(2));
            assert_eq!(response.text().await.unwrap(), "{}");
        }
        assert_eq!(app.inbox().depth(), 3);
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("server stops on shutdown")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn metrics_listen_serves_metrics_over_tcp_apart_from_the_appservice_api() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        config.appservice.listen = "127.0.0.1:0".parse().unwrap();
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        let registration = Registration::generate(&config);
        let app = App::open(config, registration).unwrap();
        let (stop, stopped) = watch::channel(false);
        let (addr, server) = start_server(&app, stopped.clone()).await.unwrap();
        let (metrics_addr, metrics_server) = start_metrics_server(&app, stopped)
            .await
            .unwrap()
            .expect("metrics.listen is set");
        assert_ne!(addr, metrics_addr);
        let http = reqwest::Client::new();
        let get = |addr: SocketAddr| http.get(format!("http://{addr}/metrics")).send();
        let metrics = get(metrics_addr).await.unwrap();
        assert_eq!(metrics.status(), 200);
        assert!(metrics.text().await.unwrap().contains("mxpay_inbox_depth"));
        assert_eq!(get(addr).await.unwrap().status(), 404);
        stop.send(true).unwrap();
        for server in [server, metrics_server] {
            tokio::time::timeout(Duration::from_secs(20), server)
                .await
                .expect("server stops on shutdown")
                .unwrap()
                .unwrap();
        }
    }

    mod startup {
        use super::*;
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};

        fn app_for(dir: &std::path::Path, url: &str) -> App {
            let mut config = config_in(dir);
            config.homeserver.url = url.to_owned();
            let registration = Registration::generate(&config);
            let retry = RetryPolicy {
                attempts_max: 2,
                backoff_base_ms: 1,
                ..RetryPolicy::default()
            };
            App::open_with(config, registration, retry).unwrap()
        }

        async fn homeserver(register: ResponseTemplate, ping: ResponseTemplate) -> MockServer {
            let server = MockServer::start().await;
            Mock::given(method("GET"))
                .and(path("/_matrix/client/versions"))
                .respond_with(
                    ResponseTemplate::new(200).set_body_json(json!({"versions": ["v1.11"]})),
                )
                .mount(&server)
                .await;
            Mock::given(method("POST"))
                .and(path("/_matrix/client/v3/register"))
                .respond_with(register)
                .mount(&server)
                .await;
            Mock::given(method("POST"))
                .and(path("/_matrix/client/v1/appservice/mxpay/ping"))
                .respond_with(ping)
                .mount(&server)
                .await;
            server
        }

        fn error(status: u16, errcode: &str, message: &str) -> ResponseTemplate {
            ResponseTemplate::new(status)
                .set_body_json(json!({"errcode": errcode, "error": message}))
        }

        fn ok_register() -> ResponseTemplate {
            ResponseTemplate::new(200).set_body_json(json!({"user_id": "@_mxpay:localhost"}))
        }

        fn ok_ping() -> ResponseTemplate {
            ResponseTemplate::new(200).set_body_json(json!({"duration_ms": 3}))
        }

        #[tokio::test]
        async fn checks_pass_against_a_working_homeserver() {
            let dir = tempfile::tempdir().unwrap();
            let server = homeserver(error(400, "M_USER_IN_USE", "taken"), ok_ping()).await;
            app_for(dir.path(), &server.uri())
                .check_homeserver()
                .await
                .unwrap();
        }

        #[tokio::test]
        async fn each_misconfiguration_gets_its_sentence() {
            let cases = [
                (
                    error(401, "M_UNKNOWN_TOKEN", "Unrecognised access token"),
                    ok_ping(),
                    "does not accept the as_token",
                ),
                (
                    ok_register(),
                    error(
                        403,
                        "M_FORBIDDEN",
                        "Mismatching application service ID in path",
                    ),
                    "appservice id mismatch",
                ),
                (
                    ok_register(),
                    error(404, "M_NOT_FOUND", "no such appservice"),
                    "does not know appservice `mxpay`",
                ),
                (
                    ok_register(),
                    error(400, "M_URL_NOT_SET", "no url"),
                    "has no url",
                ),
                (
                    ok_register(),
                    error(502, "M_CONNECTION_FAILED", "ConnectError: refused"),
                    "cannot reach mxpay at http://127.0.0.1:29330",
                ),
                (
                    ok_register(),
                    error(504, "M_CONNECTION_TIMEOUT", "timed out"),
                    "timed out reaching mxpay",
                ),
                (
                    ok_register(),
                    error(502, "M_BAD_STATUS", "HTTP 403 Forbidden"),
                    "another hs_token",
                ),
                (
                    error(400, "M_EXCLUSIVE", "not in namespace"),
                    ok_ping(),
                    "user namespace",
                ),
            ];
            for (register, ping, expected) in cases {
                let dir = tempfile::tempdir().unwrap();
                let server = homeserver(register, ping).await;
                let message = app_for(dir.path(), &server.uri())
                    .check_homeserver()
                    .await
                    .unwrap_err()
                    .to_string();
                assert!(
                    message.contains(expected),
                    "expected `{expected}` in: {message}"
                );
                assert!(!message.contains("as_token:"), "{message}");
            }
        }

        #[tokio::test]
        async fn wrong_url_is_named() {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let url = format!("http://127.0.0.1:{port}");
            let message = app_for(dir.path(), &url)
                .check_homeserver()
                .await
                .unwrap_err()
                .to_string();
            assert!(message.contains("cannot reach the homeserver"), "{message}");
            assert!(message.contains(&url), "{message}");

            let not_matrix = MockServer::start().await;
            Mock::given(method("GET"))
                .respond_with(ResponseTemplate::new(404).set_body_string("<html>nope</html>"))
                .mount(&not_matrix)
                .await;
            let message = app_for(dir.path(), &not_matrix.uri())
                .check_homeserver()
                .await
                .unwrap_err()
                .to_string();
            assert!(message.contains("is not a Matrix homeserver"), "{message}");
        }
    }
}
