//! Wiring: the one place that builds the bot's parts from the config and connects them (crypto
//! device, payment store, ledger, outbox, pipelines). Everything below `app` is built here and
//! knows nothing of `App`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{App, AppError};
use crate::clock::{SharedClock, SystemClock};
use crate::crypto::pipeline::{
    EncryptedPipeline, DELIVERY_CHECK_TIMEOUT_MS, STORE_KEY_ENV, SWEEP_INTERVAL_MS,
};
use crate::crypto::{BotCrypto, CryptoSettings};
use crate::outbox::{Outbox, OutboxPoke, OutboxPolicy};
use crate::payments::{text, Messenger, Payments, PaymentsPipeline};
use crate::pipeline::{basic_commands, Pipeline, PlainPipeline};
use crate::policy::pin::PinHasher;
use crate::store::payments::PaymentStore;
use crate::webhooks::{
    Endpoint, WebhookEndpoints, WebhookOutbox, WebhookPoke, WebhookStore, WebhookWorker,
};

/// The webhook outbox's directory in the data directory.
pub const WEBHOOKS_DIR: &str = "webhooks";

/// Endpoints without the admin API (which holds the merchant registry): there are no
/// merchants, so nothing is enqueued and nothing sent.
fn no_merchants(_merchant_id: &str) -> Option<Endpoint> {
    None
}

/// Opens the webhook outbox (`<data_dir>/webhooks/`), lets the admin API show and replay its
/// events, and spawns the delivery worker (stopping on `shutdown`) sending to the endpoints
/// `endpoints` names. Producers (invoices, refunds) enqueue through the returned outbox.
pub fn start_webhooks(
    app: &App,
    endpoints: Arc<dyn WebhookEndpoints>,
    shutdown: watch::Receiver<bool>,
) -> Result<WebhookOutbox, AppError> {
    let config = app.config();
    let store = WebhookStore::open(
        &config.data_dir.join(WEBHOOKS_DIR),
        config.webhooks.policy(),
    )
    .map_err(|e| AppError::Startup(format!("cannot open the webhook outbox: {e}")))?;
    let poke = WebhookPoke::default();
    let outbox = WebhookOutbox::new(store.clone(), app.clock().clone(), poke.clone());
    if let Some(admin) = app.admin() {
        admin.set_webhooks(outbox.clone());
    }
    if let Some(api) = app.merchant_api() {
        api.set_events(Arc::new(super::merchant_webhooks::OutboxEvents::new(
            store.clone(),
            app.clock().clone(),
            poke.clone(),
        )));
        spawn_unsent_invoice_events(api.clone(), shutdown.clone());
    }
    WebhookWorker::new(store, endpoints, app.clock().clone(), poke)
        .with_metrics(app.metrics().clone())
        .spawn(shutdown);
    Ok(outbox)
}

/// How often invoice events the webhook outbox refused (it was full) are offered again.
const UNSENT_EVENTS_INTERVAL_MS: u64 = 5_000;
/// Most of them offered per round.
const UNSENT_EVENTS_SLICE: usize = 256;

/// Offers the webhook outbox, every few seconds, the invoice events it refused before, until
/// `shutdown`.
fn spawn_unsent_invoice_events(
    api: Arc<crate::merchants::api::MerchantApi>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let interval = Duration::from_millis(UNSENT_EVENTS_INTERVAL_MS);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let api = api.clone();
            match tokio::task::spawn_blocking(move || api.send_unsent(UNSENT_EVENTS_SLICE)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(
                    reason = e.reason(),
                    "could not offer kept invoice events again; later"
                ),
                Err(e) => tracing::warn!(error = %e, "the kept invoice events task failed"),
            }
        }
    });
}

/// Starts the bot for `app`: with payments when `payments.enabled`, else the encrypted pipeline
/// alone. Spawns the outbox (stopping on `shutdown`).
pub async fn start(
    app: &App,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<dyn Pipeline>, AppError> {
    let config = app.config();
    let endpoints: Arc<dyn WebhookEndpoints> = match app.admin() {
        Some(admin) => Arc::new(super::merchant_webhooks::RegistryEndpoints(
            admin.merchants().clone(),
        )),
        None => Arc::new(no_merchants),
    };
    start_webhooks(app, endpoints, shutdown.clone())?;
    if !config.payments.enabled {
        return start_encrypted_pipeline(app, shutdown).await;
    }
    let pepper = config
        .payments
        .load_pepper()
        .map_err(|e| AppError::Startup(e.to_string()))?;
    // The App opened the ledger (the admin API shares it) and owns the clock.
    let clock: SharedClock = app.clock().clone();
    let ledger = app.ledger().clone();
    let store_dir = config.data_dir.join("payments");
    let store = PaymentStore::open(&store_dir)
        .map_err(|e| AppError::Startup(format!("cannot open the payment store: {e}")))?;
    if let Some(admin) = app.admin() {
        admin.set_pin_reset(Arc::new(store.clone()));
    }
    let crypto = start_crypto(app, shutdown.clone()).await?;
    let mut commands = basic_commands();
    commands.extend(text::payment_commands());
    let encrypted =
        EncryptedPipeline::new(crypto.clone(), PlainPipeline::new(app.client().clone()))
            .with_commands(commands);
    let mut stepup_key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut stepup_key);
    let poke = OutboxPoke::default();
    let payments = Arc::new(
        Payments::new(
            Messenger::new(crypto, app.client().clone()),
            ledger.clone(),
            store.clone(),
            PinHasher::new(pepper),
            config.payments.clone(),
            clock,
            poke.clone(),
            &stepup_key,
        )
        .with_metrics(app.metrics().clone())
        .with_merchants_of(app.admin().map(|admin| admin.merchants().clone()))
        // Test faults (debug builds only) are injected where the flow applies its effects.
        .with_faults(crate::payments::Faults::from_env()),
    );
    // Invoices of the merchant API are posted and paid through the payment flow.
    if let Some(api) = app.merchant_api() {
        api.set_poster(Arc::new(crate::payments::invoices::InvoicePosting(
            Arc::downgrade(&payments),
        )));
        payments.set_invoices(api.clone());
    }
    Outbox::new(
        ledger,
        store,
        payments.clone(),
        OutboxPolicy::default(),
        poke,
    )
    .with_metrics(app.metrics().clone())
    .spawn(shutdown.clone());
    spawn_held_sweep(payments.clone(), shutdown);
    tracing::info!("payments enabled");
    Ok(Arc::new(PaymentsPipeline::new(encrypted, payments)))
}

/// How often held payments are checked for a passed PIN or accept window, and requests for
/// their expiry, when no event comes.
const HELD_SWEEP_INTERVAL_MS: u64 = 1_000;

/// Ends held payments whose PIN or accept window passed, and writes down lapsed requests
/// (a merchant's invoice among them: its `invoice.expired` must not wait for someone to talk
/// in the room), also when no event arrives (each handled event sweeps too), until
/// `shutdown`.
fn spawn_held_sweep(payments: Arc<Payments>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let interval = Duration::from_millis(HELD_SWEEP_INTERVAL_MS);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            if let Err(e) = payments.sweep_held().await {
                tracing::warn!(error = %e, "could not end the held payments that are due; later");
            }
            if let Err(e) = payments.sweep_requests().await {
                tracing::warn!(error = %e, "could not write down lapsed payment requests; later");
            }
        }
    });
}

/// Starts the bot's crypto for `app` and returns the pipeline the worker should use. Spawns the
/// start-up delivery self-check and the parked-event sweep, both stopping on `shutdown`.
pub async fn start_encrypted_pipeline(
    app: &App,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<dyn Pipeline>, AppError> {
    let crypto = start_crypto(app, shutdown).await?;
    let basic = PlainPipeline::new(app.client().clone());
    Ok(Arc::new(EncryptedPipeline::new(crypto, basic)))
}

/// Starts the bot's crypto for `app` (device, store, start-up self-check and parked-event
/// sweep, both stopping on `shutdown`), for callers that build their own pipeline around it.
pub async fn start_crypto(
    app: &App,
    shutdown: watch::Receiver<bool>,
) -> Result<BotCrypto, AppError> {
    let config = app.config();
    let mut settings = CryptoSettings::new(app.client().clone(), config.data_dir.clone());
    settings.msc4190 = config.appservice.msc4190;
    settings.metrics = Some(app.metrics().clone());
    // The DM holds payment secrets only when payments are on; then, unless unsigned devices
    // may pay, its room keys go to cross-signed devices only.
    settings.share_private_keys_with_unsigned_devices =
        !config.payments.enabled || config.payments.allow_unsigned_devices;
    if let Ok(hex_key) = std::env::var(STORE_KEY_ENV) {
        settings.store_key = Some(
            crate::crypto::device::decode_key(hex_key.as_bytes()).ok_or_else(|| {
                AppError::Startup(format!("{STORE_KEY_ENV} must be 64 hex characters"))
            })?,
        );
    }
    let clock: SharedClock = Arc::new(SystemClock);
    let crypto = BotCrypto::start(settings, clock)
        .await
        .map_err(|e| AppError::Startup(format!("end-to-end encryption: {e}")))?;
    let parked = crypto.parked_counter();
    app.metrics().on_scrape(move |metrics| {
        if let Some(count) = parked() {
            metrics.set_parked_events(count);
        }
    });

    let check = crypto.clone();
    let mut check_shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = check.check_homeserver_delivery(DELIVERY_CHECK_TIMEOUT_MS) => {}
            _ = check_shutdown.wait_for(|stop| *stop) => {}
        }
    });
    let sweeper = crypto.clone();
    let mut sweep_shutdown = shutdown;
    tokio::spawn(async move {
        let interval = Duration::from_millis(SWEEP_INTERVAL_MS);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = sweep_shutdown.wait_for(|stop| *stop) => return,
            }
            if let Err(e) = sweeper.sweep_parked().await {
                tracing::error!(error = %e, "cannot sweep parked events");
            }
        }
    });

    Ok(crypto)
}
