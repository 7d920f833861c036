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

/// Starts the bot for `app`: with payments when `payments.enabled`, else the encrypted pipeline
/// alone. Spawns the outbox (stopping on `shutdown`).
pub async fn start(
    app: &App,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<dyn Pipeline>, AppError> {
    let config = app.config();
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
    .spawn(shutdown);
    tracing::info!("payments enabled");
    Ok(Arc::new(PaymentsPipeline::new(encrypted, payments)))
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
