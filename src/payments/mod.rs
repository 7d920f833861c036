//! The payment flow: the one orchestrator from a decrypted event to a ledger change.
//!
//! ```text
//! !pay / org.mxpay.transfer_intent (encrypted room)
//!   -> trust policy (encrypted, cross-signed device) -> payee policy -> amount -> PIN state
//!   -> pending ledger transfer (id from the event id: a replayed event never pays twice)
//!   -> challenge in the payer's private DM
//! PIN in the DM (redacted after reading)
//!   -> attempt recorded, then compared (argon2id + pepper) -> step-up JWT minted and redeemed
//!   -> ledger post -> the outbox tells the room and the DM (receipt + notice)
//! ```
//!
//! Decisions are the policy modules'; this module reads state, calls them in order, and
//! writes the results. Replies to an event are sent with transaction ids derived from the
//! event id, so a transaction handled again after a crash sends nothing twice; what follows a
//! ledger change is sent by the [`crate::outbox`] from the journal.

mod apply;
mod commands;
pub mod core;
mod dialog;
mod dm;
mod held;
pub mod invoices;
pub mod memo;
mod messenger;
mod pay;
pub(crate) mod pin_attempts;
mod pin_messages;
pub mod pin_recognition;
mod refund;
mod requests;
pub mod send_queue;
mod tell;
pub mod text;

use std::sync::Arc;

use async_trait::async_trait;
use ruma::{OwnedTransactionId, OwnedUserId};
use rust_decimal::Decimal;
use serde_json::Value;
use tracing::Instrument as _;

/// The `payments:` config section (it lives with the config).
pub use crate::config::payments as settings;
pub use apply::Faults;
pub use messenger::Messenger;
pub use settings::PaymentsSettings;

use crate::clock::SharedClock;
use crate::command::{self, Command, MEMO_CHARS_MAX};
use crate::crypto::pipeline::EncryptedPipeline;
use crate::crypto::{CryptoError, DecryptedEvent, TrustState};
use crate::events::ReceiptReason;
use crate::homeserver::HomeserverError;
use crate::ledger::{Ledger, LedgerError, TransferError, TransferId};
use crate::outbox::OutboxPoke;
use crate::pipeline::{
    reply_txn_id, InboxTransaction, Ingested, Job, JobTail, Pipeline, PipelineError,
};
use crate::policy::payee::WalletHolders;
use crate::policy::pin::{PinError, PinHasher};
use crate::policy::stepup::{StepUpAuthority, StepUpError};
use crate::policy::trust::{EventFacts, SenderTrust, TrustSettings};
use crate::store::payments::PaymentStore;
use crate::store::StoreError;

/// Test-only fault switch ([`Faults::from_env`], debug builds): when this environment variable
/// names a file that does not exist yet, mxpay creates it and aborts right after a payment was posted in the ledger and before
/// its receipt is sent (to test that the outbox repairs this after a restart). Never set it in
/// production.
pub const FAULT_CRASH_BEFORE_RECEIPT_ENV: &str = "MXPAY_TEST_CRASH_BEFORE_RECEIPT";

/// Test-only fault switch ([`Faults::from_env`]), `<purpose>:<file>`: while `<file>` does not exist, every reply of
/// that purpose (`decline-receipt`, `stepup-wrong`, ...) fails before it is sent as if the
/// homeserver were unreachable (a retryable failure), so tests can check that a retried
/// transaction repeats the decision instead of deciding again. `room:<file>`: every message
/// to the room whose id `<file>` holds fails the same way while it does (a stuck room).
/// Debug builds only.
pub const FAULT_FAIL_REPLY_ENV: &str = "MXPAY_TEST_FAIL_REPLY";

/// Errors of the payment flow. Internal: people get sentences, logs get these.
#[derive(Debug, thiserror::Error)]
pub enum PaymentsError {
    /// The payment store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The ledger failed (not a refusal: those are handled).
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Encrypting or sending failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A homeserver request failed.
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
    /// The PIN store is misconfigured (pepper) or a stored hash is unreadable.
    #[error("PIN handling failed: {0}")]
    Pin(PinError),
    /// The step-up proof could not be made or was refused (a bug: it is made for the
    /// transfer it is redeemed for).
    #[error("step-up proof: {0}")]
    StepUp(#[from] StepUpError),
    /// A blocking task failed.
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// A payment request changed between reading and writing it (another event about it was
    /// handled meanwhile): handled again, the event is decided from the current request.
    #[error("the payment request changed meanwhile")]
    RequestChanged,
    /// The merchant registry failed (retried: a store failure may pass).
    #[error("merchant registry: {0}")]
    Merchants(crate::merchants::MerchantError),
    /// The send queue dropped a message without an answer (only when mxpay stops): the
    /// event is handled again at the next start.
    #[error("the send queue stopped")]
    SendQueueStopped,
}

impl PaymentsError {
    /// Whether handling the event again later may work.
    pub fn is_transient(&self) -> bool {
        match self {
            PaymentsError::Store(_)
            | PaymentsError::Join(_)
            | PaymentsError::RequestChanged
            | PaymentsError::SendQueueStopped
            | PaymentsError::Merchants(_) => true,
            PaymentsError::Ledger(e) => matches!(e, LedgerError::Storage(_) | LedgerError::Closed),
            PaymentsError::Crypto(e) => {
                matches!(e, CryptoError::Store(_) | CryptoError::Parked(_)) || e.is_transient()
            }
            PaymentsError::Homeserver(e) => e.is_transient(),
            PaymentsError::Pin(_) | PaymentsError::StepUp(_) => false,
        }
    }
}

fn txn(purpose: &str, key: &str) -> OwnedTransactionId {
    reply_txn_id(purpose, key)
}

fn sender_trust(state: TrustState) -> Option<SenderTrust> {
    match state {
        TrustState::NotEncrypted => None,
        TrustState::Verified => Some(SenderTrust::Verified),
        TrustState::UnverifiedIdentity => Some(SenderTrust::UnverifiedIdentity),
        TrustState::UnsignedDevice => Some(SenderTrust::UnsignedDevice),
        TrustState::VerificationViolation => Some(SenderTrust::VerificationViolation),
        TrustState::UnknownDevice | TrustState::InsecureSource => Some(SenderTrust::UnknownDevice),
        TrustState::MismatchedSender => Some(SenderTrust::MismatchedSender),
    }
}

/// The receipt reason for a ledger refusal.
fn reason_for(error: TransferError) -> ReceiptReason {
    core::refusal::reason_for(error)
}

fn reason_code(reason: ReceiptReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "other".to_owned())
}

/// The span every log line about one payment (or withdrawal) runs in, from the command
/// through policy and the ledger to its receipt: `payment` is the ledger transfer id, which
/// the receipt's `transfer_id` also carries and which is derived from the asking event's id
/// (`TransferId::from_key(event_id)`; the ledger memo names that event).
fn payment_span(id: TransferId) -> tracing::Span {
    tracing::info_span!("payment", payment = %id)
}

/// The reason's code as a metric label (a fixed set).
fn reason_label(reason: ReceiptReason) -> &'static str {
    match reason {
        ReceiptReason::InsufficientFunds => "insufficient_funds",
        ReceiptReason::LimitExceeded => "limit_exceeded",
        ReceiptReason::PayeeNotAllowed => "payee_not_allowed",
        ReceiptReason::NotEncrypted => "not_encrypted",
        ReceiptReason::UntrustedDevice => "untrusted_device",
        ReceiptReason::IdentityChanged => "identity_changed",
        ReceiptReason::PinLocked => "pin_locked",
        ReceiptReason::PinNotSet => "pin_not_set",
        ReceiptReason::AccountFrozen => "account_frozen",
        ReceiptReason::InvalidAmount => "invalid_amount",
        ReceiptReason::Timeout => "timeout",
        ReceiptReason::TooLate => "too_late",
        ReceiptReason::TooManyPending => "too_many_pending",
        ReceiptReason::RateLimited => "rate_limited",
        ReceiptReason::RequestFromSelf => "request_from_self",
        ReceiptReason::RequestFromBot => "request_from_bot",
        ReceiptReason::RequestPayeeNotSender => "request_payee_not_sender",
        ReceiptReason::PayerNotInRoom => "payer_not_in_room",
        ReceiptReason::MemoTooLong => "memo_too_long",
        ReceiptReason::ReplyTargetUnknown => "reply_target_unknown",
        ReceiptReason::NotThePayer => "not_the_payer",
        ReceiptReason::NotTheRequester => "not_the_requester",
        ReceiptReason::RequestAlreadyPaid => "request_already_paid",
        ReceiptReason::RequestDeclined => "request_declined",
        ReceiptReason::RequestCancelled => "request_cancelled",
        ReceiptReason::RequestExpired => "request_expired",
        ReceiptReason::RequestPaymentPending => "request_payment_pending",
        ReceiptReason::RequestOpenToEveryone => "request_open_to_everyone",
        ReceiptReason::RequestFull => "request_full",
        ReceiptReason::TooManyOpenRequests => "too_many_open_requests",
        ReceiptReason::PayerHasTooManyRequests => "payer_has_too_many_requests",
        ReceiptReason::RequestsFull => "requests_full",
        ReceiptReason::SplitOnePerson => "split_one_person",
        ReceiptReason::SplitShareBelowMinorUnit => "split_share_below_minor_unit",
        ReceiptReason::SplitDuplicatePerson => "split_duplicate_person",
        ReceiptReason::SplitTooManyPeople => "split_too_many_people",
        ReceiptReason::RefundNotPayee => "refund_not_payee",
        ReceiptReason::RefundAboveRemaining => "refund_above_remaining",
        ReceiptReason::RefundOfRefund => "refund_of_refund",
        ReceiptReason::RefundNothingLeft => "refund_nothing_left",
        ReceiptReason::RefundNotCompleted => "refund_not_completed",
        ReceiptReason::NotThePayee => "not_the_payee",
        ReceiptReason::AcceptanceWindowPassed => "acceptance_window_passed",
        ReceiptReason::PaymentAlreadySettled => "payment_already_settled",
        ReceiptReason::PayeeDeclined => "payee_declined",
        ReceiptReason::TooManyHeld => "too_many_held",
        ReceiptReason::MerchantDisabled => "merchant_disabled",
        ReceiptReason::Other => "other",
    }
}

/// The receipt reason with the same code as a request refusal (every refusal has one).
pub(crate) fn reason_of_request(refusal: crate::requests::RequestRefusal) -> ReceiptReason {
    serde_json::from_value(Value::String(refusal.code().to_owned()))
        .expect("every request refusal code is a receipt reason")
}

/// The stable code of a receipt reason (`insufficient_funds`, `request_already_paid`, ...).
pub(crate) fn reason_code_of(reason: ReceiptReason) -> String {
    reason_code(reason)
}

/// The receipt reason with this code (`other` when none has it).
pub(crate) fn reason_of_code(code: &str) -> ReceiptReason {
    reason_from_code(code)
}

fn reason_from_code(code: &str) -> ReceiptReason {
    serde_json::from_value(Value::String(code.to_owned())).unwrap_or(ReceiptReason::Other)
}

/// The sentence for a ledger refusal.
fn refusal_sentence(error: TransferError) -> String {
    core::refusal::ledger_sentence(error)
}

/// What a payment asks for, from `!pay` or an `org.mxpay.transfer_intent`.
#[derive(Debug, Clone)]
struct PayRequest {
    payee: OwnedUserId,
    amount: Decimal,
    currency: String,
    memo: Option<String>,
    /// The payment request this pays: as read, and with the payer's share `paying` this
    /// payment (written once the payment is reserved).
    request: Option<(crate::requests::Request, crate::requests::Request)>,
    /// The payment this one refunds (then the ledger links the two and caps the refunds).
    refund: Option<RefundLink>,
}

/// The original payment a refund is linked to.
#[derive(Debug, Clone)]
struct RefundLink {
    /// The original transfer.
    original: TransferId,
    /// The original's ledger reference (0: none), which the refund carries too.
    reference: u128,
    /// The bot's receipt of it that the `!refund` replied to.
    receipt: ruma::OwnedEventId,
}

/// The ledger reference of a new payment: a refund carries its original's (read from the
/// ledger, so a payment made before references existed keeps none, and its refunds neither);
/// a payment of a request carries the request's ([`crate::requests::ledger_reference`]);
/// any other payment none (0). Only a payment made for the first time gets one: a retried
/// or replayed event whose transfer exists carries on with that transfer (see
/// [`Payments::on_pay`]), whatever reference it was made with.
fn payment_reference(request_id: Option<&str>, refund: Option<&RefundLink>) -> u128 {
    match (refund, request_id) {
        (Some(link), _) => link.reference,
        (None, Some(request_id)) => crate::requests::ledger_reference(request_id),
        (None, None) => 0,
    }
}

/// The payment service: state, policy and the ledger, driven by decrypted events.
pub struct Payments {
    messenger: Messenger,
    ledger: Ledger,
    store: PaymentStore,
    hasher: PinHasher,
    stepup: StepUpAuthority,
    settings: PaymentsSettings,
    clock: SharedClock,
    poke: OutboxPoke,
    bot: OwnedUserId,
    /// Test-only faults where effects are applied (none unless the wiring sets some).
    faults: Faults,
    metrics: Arc<crate::metrics::Metrics>,
    /// Payment commands per user per minute (`payments.commands_per_minute_max`).
    rate: std::sync::Mutex<crate::policy::rate::CommandRate>,
    /// The merchant registry, when merchants exist on this server: money paid to a merchant's
    /// Matrix user goes to the merchant's wallet.
    merchants: Option<crate::merchants::MerchantStore>,
    /// The merchant API, told when a request that stands for an invoice is paid.
    invoices: std::sync::OnceLock<Arc<crate::merchants::api::MerchantApi>>,
    /// Where decided messages go out (made at first use, once the builder set faults and
    /// metrics).
    sends: std::sync::OnceLock<send_queue::SendQueue>,
    sends_policy: send_queue::SendQueuePolicy,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments")
            .field("bot", &self.bot)
            .finish_non_exhaustive()
    }
}

impl Payments {
    /// A payment service. `stepup_key` signs the step-up proofs (random per process is fine:
    /// a proof never outlives the request that mints it).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        messenger: Messenger,
        ledger: Ledger,
        store: PaymentStore,
        hasher: PinHasher,
        settings: PaymentsSettings,
        clock: SharedClock,
        poke: OutboxPoke,
        stepup_key: &[u8],
    ) -> Self {
        let bot = messenger.client.bot_user_id().to_owned();
        let rate = std::sync::Mutex::new(crate::policy::rate::CommandRate::new(
            settings.commands_per_minute_max,
        ));
        Self {
            stepup: StepUpAuthority::new(
                stepup_key,
                clock.clone(),
                crate::policy::stepup::STEPUP_TTL_MS,
            ),
            messenger,
            ledger,
            store,
            hasher,
            settings,
            clock,
            poke,
            bot,
            faults: Faults::none(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            rate,
            merchants: None,
            invoices: std::sync::OnceLock::new(),
            sends: std::sync::OnceLock::new(),
            sends_policy: send_queue::SendQueuePolicy::default(),
        }
    }

    /// The same service, with other bounds for its send queue.
    pub fn with_send_queue_policy(mut self, policy: send_queue::SendQueuePolicy) -> Self {
        self.sends_policy = policy;
        self
    }

    /// The send queue (started at first use).
    pub(crate) fn send_queue(&self) -> &send_queue::SendQueue {
        self.sends.get_or_init(|| {
            send_queue::SendQueue::new(
                self.sends_policy,
                Arc::new(apply::MessageSender {
                    faults: self.faults.clone(),
                    messenger: self.messenger.clone(),
                    store: self.store.clone(),
                    clock: self.clock.clone(),
                }),
                Some(self.metrics.clone()),
            )
        })
    }

    /// Pays what is paid to a registered merchant's Matrix user into the merchant's wallet.
    pub fn with_merchants(mut self, merchants: crate::merchants::MerchantStore) -> Self {
        self.merchants = Some(merchants);
        self
    }

    /// [`Payments::with_merchants`] when there is a registry (the admin API is on).
    pub fn with_merchants_of(self, merchants: Option<crate::merchants::MerchantStore>) -> Self {
        match merchants {
            Some(merchants) => self.with_merchants(merchants),
            None => self,
        }
    }

    /// The ledger owner money paid to `payee` goes to: the merchant's wallet when `payee` is
    /// a registered merchant's Matrix user, else the user's own.
    pub(crate) fn payee_owner(&self, payee: &str) -> Result<crate::ledger::Owner, PaymentsError> {
        if let Some(merchants) = &self.merchants {
            let merchant = merchants.by_user(payee).map_err(PaymentsError::Merchants)?;
            // Disabled or not: a disabled merchant keeps its wallet, and an invoice it opened
            // before may still be paid (and refunded from that wallet by the operator's choice).
            if let Some(merchant) = merchant {
                return Ok(merchant.id.owner());
            }
        }
        Ok(crate::ledger::Owner::user(payee))
    }

    /// The Matrix user an owner stands for in the room: the user, or a merchant's Matrix user.
    pub(crate) fn owner_user(
        &self,
        owner: &crate::ledger::Owner,
    ) -> Result<Option<String>, PaymentsError> {
        match owner {
            crate::ledger::Owner::User(user) => Ok(Some(user.clone())),
            crate::ledger::Owner::Merchant(id) => {
                let (Some(merchants), Ok(id)) =
                    (&self.merchants, crate::merchants::MerchantId::parse(id))
                else {
                    return Ok(None);
                };
                Ok(merchants
                    .get(&id)
                    .map_err(PaymentsError::Merchants)?
                    .map(|m| m.user_id.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// The same service, counting payment outcomes and PIN failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The same service, with test faults injected where its effects are applied.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// The decisions' settings.
    fn core_settings(&self) -> core::CoreSettings {
        core::CoreSettings {
            stepup_timeout_ms: self.settings.stepup_timeout_ms,
            pin_dialog_timeout_ms: self.settings.pin_dialog_timeout_ms,
            pending_per_user_max: self.settings.pending_per_user_max,
            commands_per_minute_max: self.settings.commands_per_minute_max,
        }
    }

    /// The event as the core's decisions address it.
    fn event_ref(event: &DecryptedEvent) -> core::EventRef {
        core::EventRef {
            room_id: event.room_id.clone(),
            event_id: event.event_id.clone(),
            sender: event.sender.clone(),
        }
    }

    fn trust_settings(&self) -> TrustSettings {
        TrustSettings {
            allow_unsigned_devices: self.settings.allow_unsigned_devices,
        }
    }

    fn wallet_holders(&self) -> &WalletHolders {
        &self.settings.wallet_holders
    }

    fn show(&self, transfer_currency: &str, minor: u128) -> String {
        crate::ledger::CurrencyCode::new(transfer_currency)
            .and_then(|code| self.ledger.to_decimal(code, minor))
            .map(|d| d.to_string())
            .unwrap_or_else(|| minor.to_string())
    }

    async fn facts(&self, event: &DecryptedEvent) -> Result<EventFacts, PaymentsError> {
        let room_encrypted = self
            .messenger
            .crypto
            .room_is_encrypted(&event.room_id)
            .await?;
        Ok(EventFacts {
            was_encrypted: event.was_encrypted,
            room_encrypted,
            trust: sender_trust(event.verification_state),
        })
    }

    /// Handles one decrypted (or plaintext) room event; `Ok(false)` when it is not a payment
    /// matter (the caller's basic handling then runs: joins, `!help`). Afterwards, notices
    /// waiting for the sender's DM go out if the DM is ready now.
    pub async fn handle_event(&self, event: &DecryptedEvent) -> Result<bool, PaymentsError> {
        if event.sender == self.bot {
            return Ok(false);
        }
        let handled = self.handle_user_event(event).await?;
        // Held payments whose PIN or accept window passed end, a bounded slice at a time.
        if let Err(e) = self.sweep_held().await {
            tracing::warn!(error = %e, "could not end the held payments that are due; later");
        }
        // Requests that lapsed are written down and told, a bounded slice at a time.
        if let Err(e) = self.sweep_requests().await {
            if e.is_transient() {
                tracing::warn!(error = %e, "could not write down lapsed payment requests; later");
            } else {
                tracing::error!(error = %e, "could not write down lapsed payment requests");
            }
        }
        // After the event, not before: its handling may be what made the DM ready (a `!balance`
        // there, the join to a DM the bot created), and the welcome goes first.
        match self.on_activity(event).await {
            Err(e) if !e.is_transient() => {
                // Never in the way of the event's own handling (the join to an invite, ...):
                // the notices keep waiting for the next message.
                tracing::warn!(error = %e, "could not send the notices waiting for the DM")
            }
            outcome => outcome?,
        }
        Ok(handled)
    }

    async fn handle_user_event(&self, event: &DecryptedEvent) -> Result<bool, PaymentsError> {
        match event.event_type.as_str() {
            "m.room.member" => {
                self.on_member(event).await?;
                Ok(false)
            }
            "m.room.message" => {
                let msgtype = event.content.get("msgtype").and_then(Value::as_str);
                // A client's MSC4391 invocation stands for the text command it names.
                let invoked =
                    crate::events::bot_command::invocation_text(&event.content, &self.bot);
                let body = invoked
                    .as_deref()
                    .or_else(|| event.content.get("body").and_then(Value::as_str));
                if let (Some("m.text"), Some(body)) = (msgtype, body) {
                    // Requests, split bills and the commands that answer a request come first:
                    // a bare `!pay` replying to a request pays it.
                    let reply_to = requests::reply_target(&event.content);
                    let text = crate::requests::strip_reply_fallback(body);
                    match crate::requests::parse(text, reply_to.as_deref()) {
                        Some(Ok(request_command))
                            if self
                                .on_request_command(event, request_command.clone())
                                .await? =>
                        {
                            return Ok(true);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            self.answer(event, &error.to_string(), "command-error")
                                .await?;
                            return Ok(true);
                        }
                        None => {}
                    }
                    if let Some(parsed) = command::parse(body) {
                        return match parsed {
                            Ok(Command::Help) => Ok(false),
                            Ok(command) => self.on_command(event, command).await.map(|_| true),
                            Err(error) => {
                                self.answer(event, &error.to_string(), "command-error")
                                    .await?;
                                Ok(true)
                            }
                        };
                    }
                }
                // Plain, edited, replying, notice or emote: a PIN in any shape.
                match pin_recognition::recognise(&event.event_type, &event.content) {
                    Some(message) => self.on_pin(event, message).await,
                    None => Ok(false),
                }
            }
            "org.mxpay.transfer_intent" => {
                match serde_json::from_value::<crate::events::TransferIntentEventContent>(
                    event.content.clone(),
                ) {
                    // The same bound as a `!pay` note: the memo is copied into the ledger, the
                    // challenge and the receipts.
                    Ok(intent)
                        if intent
                            .memo
                            .as_deref()
                            .is_some_and(|memo| memo.chars().nth(MEMO_CHARS_MAX).is_some()) =>
                    {
                        self.answer(
                            event,
                            &command::CommandError::MemoTooLong.to_string(),
                            "intent-error",
                        )
                        .await?;
                    }
                    Ok(intent) if intent.request_event_id.is_some() => {
                        let target = intent.request_event_id.expect("checked");
                        let outcome = self
                            .on_intent_for_request(event, &target)
                            .instrument(payment_span(TransferId::from_key(event.event_id.as_str())))
                            .await;
                        self.count_failure(outcome)?;
                    }
                    Ok(intent) => {
                        let request = PayRequest {
                            payee: intent.payee,
                            amount: intent.amount,
                            currency: intent.currency.to_ascii_uppercase(),
                            memo: intent.memo,
                            request: None,
                            refund: None,
                        };
                        let outcome = self
                            .on_pay(event, request)
                            .instrument(payment_span(TransferId::from_key(event.event_id.as_str())))
                            .await;
                        self.count_failure(outcome)?;
                    }
                    Err(_) => {
                        self.answer(
                            event,
                            "this org.mxpay.transfer_intent is malformed (see the event \
                             schema in mxpay's docs/events.md)",
                            "intent-error",
                        )
                        .await?;
                    }
                }
                Ok(true)
            }
            "org.mxpay.payment_request" => {
                self.on_payment_request_event(event).await?;
                Ok(true)
            }
            "m.reaction" => self.on_reaction(event).await,
            "org.mxpay.stepup.response" => {
                match pin_recognition::recognise(&event.event_type, &event.content) {
                    // Redacted whatever its `pin` holds: a malformed one may be a mistyped PIN.
                    Some(message) => {
                        self.on_pin(event, message).await?;
                    }
                    None => {
                        let ev = Self::event_ref(event);
                        let said = core::Outgoing::notice(
                            &ev.room_id,
                            "A PIN is exactly 4 digits.",
                            Some(&ev.event_id),
                            "response-error",
                            ev.event_id.as_str(),
                        );
                        self.apply(core::Decision::say(said)).await?;
                    }
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Counts a payment or withdrawal that failed for an operating reason (not a refusal:
    /// those get a declined receipt and are counted there).
    fn count_failure(&self, outcome: Result<(), PaymentsError>) -> Result<(), PaymentsError> {
        if outcome.is_err() {
            self.metrics.payment("failed", "none");
        }
        outcome
    }

    /// Answers `event` in its room, as a reply addressed to its sender.
    async fn answer(
        &self,
        event: &DecryptedEvent,
        text: &str,
        purpose: &'static str,
    ) -> Result<(), PaymentsError> {
        self.apply(core::Decision::say(
            Self::event_ref(event).answer(text, purpose),
        ))
        .await
    }
}

/// Decrypts each transaction, hands payment events to [`Payments`], the rest to the encrypted
/// pipeline (joins, `!help`).
pub struct PaymentsPipeline {
    crypto: EncryptedPipeline,
    payments: Arc<Payments>,
}

impl PaymentsPipeline {
    /// A pipeline over `crypto` (which also does the basic handling) and `payments`.
    pub fn new(crypto: EncryptedPipeline, payments: Arc<Payments>) -> Self {
        Self { crypto, payments }
    }
}

#[async_trait]
impl Pipeline for PaymentsPipeline {
    async fn handle(&self, txn: &InboxTransaction) -> Result<(), PipelineError> {
        for job in self.crypto.ingest_jobs(txn).await? {
            if let Some(tail) = self.run_job(&job).await? {
                tail.await?;
            }
        }
        Ok(())
    }

    async fn ingest(&self, txn: &InboxTransaction) -> Result<Ingested, PipelineError> {
        Ok(Ingested::Jobs(self.crypto.ingest_jobs(txn).await?))
    }

    async fn run_job(&self, job: &Job) -> Result<Option<JobTail>, PipelineError> {
        let event = crate::crypto::pipeline::job_event(job)?;
        let span = tracing::info_span!("event", event_id = %event.event_id);
        let (handled, tail) =
            apply::collecting_tails(self.payments.handle_event(event).instrument(span)).await;
        let event_id = event.event_id.clone();
        let mut tail = tail.map(|tail| -> JobTail {
            Box::pin(async move {
                match tail.await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_transient() => Err(PipelineError::transient(e)),
                    Err(e) => {
                        tracing::error!(%event_id, error = %e, "a message of this event cannot be sent");
                        Ok(())
                    }
                }
            })
        });
        if event.was_parked {
            // A late-decrypted event leaves the parked store below; its messages must be out
            // by then (nothing else brings it back after a crash).
            if let Some(tail) = tail.take() {
                tail.await?;
            }
        }
        let result = match handled {
            Ok(true) => Ok(()),
            Ok(false) => self.crypto.handle_event(event).await,
            Err(e) if e.is_transient() => {
                tracing::warn!(event_id = %event.event_id, error = %e, "payment handling failed; will retry");
                Err(PipelineError::transient(e))
            }
            Err(e) => {
                tracing::error!(event_id = %event.event_id, error = %e, "payment handling failed");
                Ok(())
            }
        };
        // A late-decrypted event leaves the parked store only once handled.
        self.crypto.done_with(event, result)?;
        Ok(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's payments carry the request's reference and a refund its original's,
    /// so a request's payments and refunds share one; a refund of a payment made without a
    /// reference (before references existed) gets none, so a retry of such a refund made
    /// before an upgrade names the same reference (0) as it did then.
    #[test]
    fn a_payment_of_a_request_and_a_refund_of_it_share_the_requests_reference() {
        let request = "$ask:example.org";
        let paid = payment_reference(Some(request), None);
        assert_eq!(paid, crate::requests::ledger_reference(request));
        assert_ne!(paid, 0);
        // Computed again (a replay, a retry after a restart): the same.
        assert_eq!(payment_reference(Some(request), None), paid);
        let link = |reference| RefundLink {
            original: TransferId(7),
            reference,
            receipt: ruma::owned_event_id!("$receipt:example.org"),
        };
        assert_eq!(payment_reference(None, Some(&link(paid))), paid);
        assert_eq!(payment_reference(None, Some(&link(0))), 0);
        // A plain `!pay` has none.
        assert_eq!(payment_reference(None, None), 0);
    }

    /// The config's request expiry bounds are the requests module's.
    #[test]
    fn request_expiry_bounds_agree() {
        assert_eq!(
            settings::REQUEST_EXPIRY_DEFAULT_MS,
            crate::requests::REQUEST_EXPIRY_DEFAULT_MS
        );
        assert_eq!(
            settings::REQUEST_EXPIRY_MAX_MS,
            crate::requests::REQUEST_EXPIRY_MAX_MS
        );
    }

    /// The config's default accept window is the accept rules' own.
    #[test]
    fn accept_window_defaults_agree() {
        assert_eq!(
            settings::ACCEPT_WINDOW_DEFAULT_MS,
            crate::requests::ACCEPT_WINDOW_DEFAULT_MS
        );
    }

    /// Every request refusal code is a receipt reason with the same code.
    #[test]
    fn request_refusals_are_receipt_reasons() {
        for refusal in crate::requests::RequestRefusal::ALL {
            let reason = reason_of_request(refusal);
            assert_eq!(serde_json::to_value(reason).unwrap(), refusal.code());
            assert_eq!(reason_label(reason), refusal.code());
        }
    }

    #[test]
    fn trust_states_map_to_policy() {
        assert_eq!(sender_trust(TrustState::NotEncrypted), None);
        assert_eq!(
            sender_trust(TrustState::InsecureSource),
            Some(SenderTrust::UnknownDevice)
        );
        assert_eq!(
            reason_from_code(&reason_code(ReceiptReason::PinLocked)),
            ReceiptReason::PinLocked
        );
        assert_eq!(
            reason_for(TransferError::InsufficientFunds),
            ReceiptReason::InsufficientFunds
        );
    }
}
