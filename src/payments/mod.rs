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

pub mod memo;
pub mod pinlike;
pub mod settings;
pub mod text;

use std::sync::Arc;

use async_trait::async_trait;
use ruma::events::relation::Reference;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, UserId};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::Instrument as _;

pub use settings::PaymentsSettings;

use crate::app::{App, AppError};
use crate::clock::SharedClock;
use crate::command::{self, Command};
use crate::crypto::handler::CryptoHandler;
use crate::crypto::{BotCrypto, CryptoError, DecryptedEvent, TrustState};
use crate::events::{
    ReceiptEventContent, ReceiptReason, ReceiptStatus, StepUpChallengeEventContent,
};
use crate::handler::{
    basic_commands, reply_txn_id, BasicHandler, HandlerError, InboxTransaction, TransactionHandler,
};
use crate::homeserver::{HomeserverClient, HomeserverError, Identity};
use crate::ledger::{
    ExportedEntry, JournalEntry, Ledger, LedgerError, Owner, Transfer, TransferError, TransferId,
    TransferKind, TransferRequest, TransferState,
};
use crate::outbox::{Deliver, DeliverError, Outbox, OutboxPoke, OutboxPolicy};
use crate::policy::payee::WalletHolders;
use crate::policy::pin::{human_duration, Pin, PinError, PinHasher, PinRecord};
use crate::policy::stepup::{StepUpAuthority, StepUpBinding, StepUpError};
use crate::policy::trust::{self, EventFacts, SenderTrust, TrustRefusal, TrustSettings};
use crate::store::payments::{
    pin_version_tag, Challenge, ChallengeKind, DeclineRecord, Dialog, EventOutcome, PaymentStore,
    PinAttemptResult, TransferNote, UserProfile,
};
use crate::store::StoreError;
use memo::{MemoKind, PaymentMemo};

/// Test-only fault switch: when this environment variable names a file that does not exist
/// yet, mxpay creates it and aborts right after a payment was posted in the ledger and before
/// its receipt is sent (to test that the outbox repairs this after a restart). Never set it in
/// production.
pub const FAULT_CRASH_BEFORE_RECEIPT_ENV: &str = "MXPAY_TEST_CRASH_BEFORE_RECEIPT";

/// Test-only fault switch, `<purpose>:<file>`: while `<file>` does not exist, every reply of
/// that purpose (`decline-receipt`, `stepup-wrong`, ...) fails before it is sent as if the
/// homeserver were unreachable (a retryable failure), so tests can check that a retried
/// transaction repeats the decision instead of deciding again. Debug builds only.
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
}

impl PaymentsError {
    /// Whether handling the event again later may work.
    pub fn is_transient(&self) -> bool {
        match self {
            PaymentsError::Store(_) | PaymentsError::Join(_) => true,
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
    match error {
        TransferError::InsufficientFunds => ReceiptReason::InsufficientFunds,
        TransferError::ExceedsDailyLimit | TransferError::ExceedsMaxTransfer => {
            ReceiptReason::LimitExceeded
        }
        TransferError::DebitAccountFrozen => ReceiptReason::AccountFrozen,
        TransferError::CreditAccountFrozen => ReceiptReason::PayeeNotAllowed,
        TransferError::CurrencyUnknown => ReceiptReason::InvalidAmount,
        _ => ReceiptReason::Other,
    }
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
        ReceiptReason::Other => "other",
    }
}

fn reason_from_code(code: &str) -> ReceiptReason {
    serde_json::from_value(Value::String(code.to_owned())).unwrap_or(ReceiptReason::Other)
}

/// The sentence for a ledger refusal.
fn refusal_sentence(error: TransferError) -> String {
    match error {
        TransferError::InsufficientFunds => "your balance does not cover this payment".to_owned(),
        TransferError::ExceedsDailyLimit => {
            "this payment would exceed your 24-hour spending limit".to_owned()
        }
        TransferError::ExceedsMaxTransfer => {
            "the amount is above the maximum for one payment".to_owned()
        }
        TransferError::DebitAccountFrozen => "your wallet is frozen".to_owned(),
        TransferError::CreditAccountFrozen => "the payee's wallet is frozen".to_owned(),
        other => format!("the payment was refused ({other})"),
    }
}

/// What a payment asks for, from `!pay` or an `org.mxpay.transfer_intent`.
#[derive(Debug, Clone)]
struct PayRequest {
    payee: OwnedUserId,
    amount: Decimal,
    currency: String,
    memo: Option<String>,
}

/// Sends as the bot: encrypted where the room is, with the caller's transaction ids.
#[derive(Clone, Debug)]
pub struct Messenger {
    crypto: BotCrypto,
    client: HomeserverClient,
}

impl Messenger {
    /// A messenger over the bot's crypto and homeserver client.
    pub fn new(crypto: BotCrypto, client: HomeserverClient) -> Self {
        Self { crypto, client }
    }

    /// Sends an event; the same `txn_id` sends once.
    pub async fn send(
        &self,
        room_id: &RoomId,
        event_type: &str,
        content: Value,
        txn_id: OwnedTransactionId,
    ) -> Result<OwnedEventId, CryptoError> {
        self.crypto
            .send_event(room_id, event_type, content, Some(txn_id))
            .await
    }

    /// Sends an `m.notice`, optionally as a reply.
    pub async fn notice(
        &self,
        room_id: &RoomId,
        body: &str,
        reply_to: Option<&EventId>,
        txn_id: OwnedTransactionId,
    ) -> Result<OwnedEventId, CryptoError> {
        let mut content = json!({"msgtype": "m.notice", "body": body});
        if let Some(event_id) = reply_to {
            content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": event_id}});
        }
        self.send(room_id, "m.room.message", content, txn_id).await
    }

    /// Redacts an event; `Ok(false)` when the bot lacks the power to.
    pub async fn redact(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<bool, HomeserverError> {
        let txn_id = txn("redact", event_id.as_str());
        match self
            .client
            .redact(room_id, event_id, &txn_id, Some("PIN removed by mxpay"))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(403) || e.errcode() == Some("M_FORBIDDEN") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The sender of an event in a room the bot is in; `None` when the homeserver does not
    /// show it (unknown, or not visible to the bot).
    pub async fn event_sender(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Option<OwnedUserId>, HomeserverError> {
        use ruma::api::client::room::get_room_event;
        let request = get_room_event::v3::Request::new(room_id.to_owned(), event_id.to_owned());
        match self.client.send(request, Identity::Appservice).await {
            Ok(response) => Ok(response
                .event
                .get_field::<OwnedUserId>("sender")
                .ok()
                .flatten()),
            Err(e) if matches!(e.status(), Some(403 | 404)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Members of a room with their membership (`join`, `invite`, ...).
    pub async fn memberships(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<(String, String)>, HomeserverError> {
        let members = self.client.room_members(room_id).await?;
        Ok(members
            .iter()
            .filter_map(|raw| {
                let v: Value = raw.deserialize_as_unchecked().ok()?;
                Some((
                    v.get("state_key")?.as_str()?.to_owned(),
                    v.pointer("/content/membership")?.as_str()?.to_owned(),
                ))
            })
            .collect())
    }

    /// The room's join rule (`invite`, `public`, `knock`, ...), if it has one.
    pub async fn join_rule(&self, room_id: &RoomId) -> Result<Option<String>, HomeserverError> {
        let state = self.client.room_state(room_id).await?;
        Ok(state.iter().find_map(|raw| {
            let v: Value = raw.deserialize_as_unchecked().ok()?;
            if v.get("type")?.as_str()? != "m.room.join_rules" {
                return None;
            }
            Some(v.pointer("/content/join_rule")?.as_str()?.to_owned())
        }))
    }

    /// Creates an encrypted private chat with `user` (the bot and the user get full power, so
    /// the bot can redact PINs there) and invites them.
    pub async fn create_dm(&self, user: &UserId) -> Result<OwnedRoomId, HomeserverError> {
        use ruma::api::client::room::{create_room, Visibility};
        use ruma::events::room::encryption::RoomEncryptionEventContent;
        use ruma::events::InitialStateEvent;
        let mut request = create_room::v3::Request::new();
        request.preset = Some(create_room::v3::RoomPreset::TrustedPrivateChat);
        request.invite = vec![user.to_owned()];
        request.is_direct = true;
        request.visibility = Visibility::Private;
        request.name = Some("mxpay".to_owned());
        request.topic =
            Some("Your private chat with the mxpay bot: PINs, balances, receipts".into());
        request.initial_state = vec![InitialStateEvent::with_empty_state_key(
            RoomEncryptionEventContent::with_recommended_defaults(),
        )
        .to_raw_any()];
        Ok(self
            .client
            .send(request, Identity::Appservice)
            .await?
            .room_id)
    }
}

/// Where a user's private DM stands.
enum Dm {
    /// Joined by both: messages can go there now.
    Ready(OwnedRoomId),
    /// The user is invited and has not joined yet.
    Invited(OwnedRoomId),
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
    fault_crash_before_receipt: Option<std::path::PathBuf>,
    fault_fail_reply: Option<(String, std::path::PathBuf)>,
    metrics: Arc<crate::metrics::Metrics>,
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
            // Test-only fault switch: compiled out of release builds, so no environment
            // variable can make a production mxpay abort between a post and its receipt.
            fault_crash_before_receipt: if cfg!(debug_assertions) {
                std::env::var_os(FAULT_CRASH_BEFORE_RECEIPT_ENV).map(Into::into)
            } else {
                None
            },
            fault_fail_reply: if cfg!(debug_assertions) {
                std::env::var(FAULT_FAIL_REPLY_ENV).ok().and_then(|v| {
                    let (purpose, file) = v.split_once(':')?;
                    Some((purpose.to_owned(), file.into()))
                })
            } else {
                None
            },
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    /// The same service, counting payment outcomes and PIN failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The test-only reply fault ([`FAULT_FAIL_REPLY_ENV`]): a retryable failure for a reply
    /// of `purpose` while the switch's file does not exist.
    fn fault_before_reply(&self, purpose: &str) -> Result<(), PaymentsError> {
        match &self.fault_fail_reply {
            Some((faulty, file)) if faulty == purpose && !file.exists() => {
                tracing::warn!(purpose, "test fault: failing a reply before it is sent");
                Err(
                    CryptoError::Transport(crate::crypto::TransportError::Unavailable {
                        endpoint: "test fault",
                        attempts: 1,
                        last: format!("{FAULT_FAIL_REPLY_ENV} is set"),
                    })
                    .into(),
                )
            }
            _ => Ok(()),
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
    /// matter (the caller's basic handling then runs: joins, `!help`).
    pub async fn handle_event(&self, event: &DecryptedEvent) -> Result<bool, PaymentsError> {
        if event.sender == self.bot {
            return Ok(false);
        }
        match event.event_type.as_str() {
            "m.room.member" => {
                self.on_member(event).await?;
                Ok(false)
            }
            "m.room.message" => {
                let msgtype = event.content.get("msgtype").and_then(Value::as_str);
                let body = event.content.get("body").and_then(Value::as_str);
                if let (Some("m.text"), Some(body)) = (msgtype, body) {
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
                match pinlike::recognise(&event.event_type, &event.content) {
                    Some(message) => self.on_pin(event, message).await,
                    None => Ok(false),
                }
            }
            "org.mxpay.transfer_intent" => {
                match serde_json::from_value::<crate::events::TransferIntentEventContent>(
                    event.content.clone(),
                ) {
                    Ok(intent) => {
                        let request = PayRequest {
                            payee: intent.payee,
                            amount: intent.amount,
                            currency: intent.currency.to_ascii_uppercase(),
                            memo: intent.memo,
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
            "org.mxpay.stepup.response" => {
                match pinlike::recognise(&event.event_type, &event.content) {
                    // Redacted whatever its `pin` holds: a malformed one may be a mistyped PIN.
                    Some(message) => {
                        self.on_pin(event, message).await?;
                    }
                    None => {
                        self.messenger
                            .notice(
                                &event.room_id,
                                "A PIN is exactly 4 digits.",
                                Some(&event.event_id),
                                txn("response-error", event.event_id.as_str()),
                            )
                            .await?;
                    }
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    // ----- private DM ------------------------------------------------------------------------

    /// Whether `room_id` is a private DM of `user`: exactly the user and the bot, both joined,
    /// nobody else invited, encrypted, and joinable by invite only (a public or knockable room
    /// can gain members between two checks).
    async fn is_private_dm(&self, room_id: &RoomId, user: &UserId) -> Result<bool, PaymentsError> {
        if self.messenger.join_rule(room_id).await?.as_deref() != Some("invite") {
            return Ok(false);
        }
        let members = self.messenger.memberships(room_id).await?;
        let present: Vec<&(String, String)> = members
            .iter()
            .filter(|(_, m)| m == "join" || m == "invite")
            .collect();
        let ok = present.len() == 2
            && present
                .iter()
                .all(|(u, m)| m == "join" && (u == user.as_str() || u == self.bot.as_str()));
        if !ok {
            return Ok(false);
        }
        Ok(self.messenger.crypto.room_is_encrypted(room_id).await?)
    }

    /// Finds the user's DM (the recorded one if still private; else `current` if it is a
    /// private DM), or creates one and invites the user.
    async fn ensure_dm(&self, user: &UserId, current: &RoomId) -> Result<Dm, PaymentsError> {
        let mut profile = self.store.profile(user.as_str())?;
        if let Some(room) = profile.dm_room.clone() {
            let room_id =
                OwnedRoomId::try_from(room.as_str()).map_err(|_| StoreError::Corrupt {
                    tree: "userid_profile",
                    reason: "dm_room is not a room id",
                })?;
            if self.is_private_dm(&room_id, user).await? {
                if !profile.dm_joined {
                    profile.dm_joined = true;
                    self.store.put_profile(user.as_str(), &profile).await?;
                }
                return Ok(Dm::Ready(room_id));
            }
            if !profile.dm_joined {
                let members = self.messenger.memberships(&room_id).await?;
                let invited = members
                    .iter()
                    .any(|(u, m)| u == user.as_str() && m == "invite");
                let alone = members
                    .iter()
                    .filter(|(_, m)| m == "join" || m == "invite")
                    .all(|(u, _)| u == user.as_str() || u == self.bot.as_str());
                if invited && alone {
                    return Ok(Dm::Invited(room_id));
                }
            }
        }
        if self.is_private_dm(current, user).await? {
            profile.dm_room = Some(current.to_string());
            profile.dm_joined = true;
            self.store.put_profile(user.as_str(), &profile).await?;
            return Ok(Dm::Ready(current.to_owned()));
        }
        let room_id = self.messenger.create_dm(user).await?;
        tracing::info!(%user, %room_id, "created a private chat");
        profile.dm_room = Some(room_id.to_string());
        profile.dm_joined = false;
        self.store.put_profile(user.as_str(), &profile).await?;
        Ok(Dm::Invited(room_id))
    }

    /// The user's DM if it is ready (recorded and joined), without creating one.
    fn ready_dm(&self, user: &str) -> Result<Option<OwnedRoomId>, PaymentsError> {
        let profile = self.store.profile(user)?;
        Ok(profile
            .dm_room
            .filter(|_| profile.dm_joined)
            .and_then(|r| OwnedRoomId::try_from(r.as_str()).ok()))
    }

    /// Tells the user in `room` where the answer went, when it is not the DM.
    async fn point_to_dm(
        &self,
        event: &DecryptedEvent,
        dm: &Dm,
        purpose: &str,
    ) -> Result<(), PaymentsError> {
        let (dm_room, text) = match dm {
            Dm::Ready(room) => (
                room,
                format!("{}: I answered in our private chat.", event.sender),
            ),
            Dm::Invited(room) => (
                room,
                format!(
                    "{}: I invited you to a private, encrypted chat with me; join it to continue.",
                    event.sender
                ),
            ),
        };
        if dm_room != &event.room_id {
            self.messenger
                .notice(
                    &event.room_id,
                    &text,
                    Some(&event.event_id),
                    txn(purpose, event.event_id.as_str()),
                )
                .await?;
        }
        Ok(())
    }

    /// A user joined a room: if it is the DM the bot invited them to, say what was waiting.
    async fn on_member(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let joined = event.content.get("membership").and_then(Value::as_str) == Some("join");
        let Some(state_key) = event.state_key.as_deref() else {
            return Ok(());
        };
        if !joined || state_key != event.sender.as_str() {
            return Ok(());
        }
        let user = event.sender.as_str();
        let mut profile = self.store.profile(user)?;
        if profile.dm_room.as_deref() != Some(event.room_id.as_str()) || profile.dm_joined {
            return Ok(());
        }
        profile.dm_joined = true;
        self.store.put_profile(user, &profile).await?;
        let now_ms = self.clock.now_ms();
        let room = &event.room_id;
        let key = event.event_id.as_str();
        self.messenger
            .notice(
                room,
                "Welcome! This is your private chat with mxpay: PINs, balances and payment \
                 confirmations happen here. Send !help for the commands.",
                None,
                txn("dm-welcome", key),
            )
            .await?;
        if let Some(dialog) = self.store.dialog(user, now_ms)? {
            self.messenger
                .notice(room, dialog_prompt(&dialog), None, txn("dm-dialog", key))
                .await?;
        }
        for challenge in self.store.challenges(user)? {
            if challenge.expires_at_ms > now_ms {
                self.send_challenge(room, &challenge).await?;
            }
        }
        Ok(())
    }

    // ----- commands --------------------------------------------------------------------------

    async fn on_command(
        &self,
        event: &DecryptedEvent,
        command: Command,
    ) -> Result<(), PaymentsError> {
        match command {
            Command::Help => Ok(()),
            Command::Balance => self.on_balance(event).await,
            Command::History { count } => self.on_history(event, count).await,
            Command::PinSet => self.on_pin_command(event, false).await,
            Command::PinChange => self.on_pin_command(event, true).await,
            Command::Cancel => self.on_cancel(event).await,
            Command::Pay {
                payee,
                amount,
                currency,
                memo,
            } => {
                let request = PayRequest {
                    payee,
                    amount,
                    currency,
                    memo,
                };
                let outcome = self
                    .on_pay(event, request)
                    .instrument(payment_span(TransferId::from_key(event.event_id.as_str())))
                    .await;
                self.count_failure(outcome)
            }
            Command::Withdraw { amount, currency } => {
                let outcome = self
                    .on_withdraw(event, amount, currency)
                    .instrument(payment_span(TransferId::from_key(event.event_id.as_str())))
                    .await;
                self.count_failure(outcome)
            }
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

    async fn on_balance(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        self.point_to_dm(event, &dm, "balance-pointer").await?;
        let Dm::Ready(dm_room) = dm else {
            return Ok(());
        };
        let views = self
            .ledger
            .balances(&Owner::user(event.sender.as_str()))
            .await?;
        let shown: Vec<_> = views
            .into_iter()
            .map(|view| {
                let code = view.id.currency;
                let available = view.balances.available_minor().max(0) as u128;
                let available = format!("{} {code}", self.show(code.as_str(), available));
                let reserved = format!(
                    "{} {code}",
                    self.show(code.as_str(), view.balances.debits_pending_minor)
                );
                (view, available, reserved)
            })
            .collect();
        let body = text::balances(&shown);
        let reply_to = (dm_room == event.room_id).then_some(event.event_id.as_ref());
        self.messenger
            .notice(
                &dm_room,
                &body,
                reply_to,
                txn("balance", event.event_id.as_str()),
            )
            .await?;
        Ok(())
    }

    async fn on_history(&self, event: &DecryptedEvent, count: u32) -> Result<(), PaymentsError> {
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        self.point_to_dm(event, &dm, "history-pointer").await?;
        let Dm::Ready(dm_room) = dm else {
            return Ok(());
        };
        let me = Owner::user(event.sender.as_str());
        let page = self.ledger.history(&me, None, count as usize).await?;
        let mut body = String::from("Your latest payments, newest first:");
        if page.transfers.is_empty() {
            body = "You have no payments yet.".to_owned();
        }
        for transfer in &page.transfers {
            let code = transfer.debit.currency;
            let amount_minor = match transfer.state {
                TransferState::Posted { amount_minor } => amount_minor,
                _ => transfer.amount_minor,
            };
            let amount = format!("{} {code}", self.show(code.as_str(), amount_minor));
            let outgoing = transfer.debit.owner == me;
            let other = if outgoing {
                &transfer.credit.owner
            } else {
                &transfer.debit.owner
            };
            let other = match other {
                Owner::User(u) => u.clone(),
                Owner::Issuer => "top-up".to_owned(),
                Owner::Settlement => "withdrawal".to_owned(),
                Owner::Fees => "fees".to_owned(),
            };
            let state = match transfer.state {
                TransferState::Pending => "pending",
                TransferState::Posted { .. } => "completed",
                TransferState::Voided => "cancelled",
                TransferState::Expired => "expired",
            };
            let note = PaymentMemo::decode(&transfer.memo)
                .and_then(|m| m.note)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let sign = if outgoing { "−" } else { "+" };
            body.push_str(&format!(
                "\n• {sign}{amount} {} {other}{note} — {state}",
                if outgoing { "to" } else { "from" }
            ));
        }
        let reply_to = (dm_room == event.room_id).then_some(event.event_id.as_ref());
        self.messenger
            .notice(
                &dm_room,
                &body,
                reply_to,
                txn("history", event.event_id.as_str()),
            )
            .await?;
        Ok(())
    }

    async fn on_pin_command(
        &self,
        event: &DecryptedEvent,
        change: bool,
    ) -> Result<(), PaymentsError> {
        let facts = self.facts(event).await?;
        let user = event.sender.as_str();
        let record = self.store.pin(user)?;
        let has_pin = record.as_ref().is_some_and(|r| r.hash.is_some());
        match trust::check(facts, self.trust_settings()) {
            Ok(()) => {}
            // `!pin change` without a PIN only gets told to use `!pin set`.
            Err(TrustRefusal::IdentityChanged) if !has_pin && change => {}
            // Without a PIN nothing the user knows can confirm a key change; see
            // `may_accept_keys_without_pin` for when setting the PIN accepts them.
            Err(TrustRefusal::IdentityChanged) if !has_pin => {
                if !self
                    .may_accept_keys_without_pin(user, record.is_some())
                    .await?
                {
                    self.answer(
                        event,
                        "your account's security keys changed since I first saw them, and \
                         you have no PIN to confirm that with. Ask the operator to confirm \
                         your new keys; until then I take no PIN and no payment from you.",
                        "pin-refused",
                    )
                    .await?;
                    return Ok(());
                }
                self.messenger.crypto.accept_identity(&event.sender).await?;
                let mut profile = self.store.profile(user)?;
                if profile.accept_new_keys_at_pin_set {
                    profile.accept_new_keys_at_pin_set = false;
                    self.store.put_profile(user, &profile).await?;
                }
                if let Some(dm) = self.ready_dm(user)? {
                    // Said in the DM, which the account's earlier sessions can read too.
                    self.messenger
                        .notice(
                            &dm,
                            "🔐 I accepted your account's new security keys (your cross-signing \
                             was reset). If you did not do that, tell the operator now.",
                            None,
                            txn("keys-accepted", event.event_id.as_str()),
                        )
                        .await?;
                }
            }
            Err(refusal) => {
                if refusal == TrustRefusal::IdentityChanged {
                    self.ask_to_accept_identity(event).await?;
                }
                self.answer(event, &refusal.to_string(), "pin-refused")
                    .await?;
                return Ok(());
            }
        }
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        self.point_to_dm(event, &dm, "pin-pointer").await?;
        let expires_at_ms = self.clock.now_ms() + self.settings.pin_dialog_timeout_ms;
        let (dialog, message) = match (change, has_pin) {
            (false, true) => (
                None,
                "You already have a PIN. To change it, send !pin change.",
            ),
            (true, false) => (None, "You have no PIN yet. Send !pin set to choose one."),
            (false, false) => {
                let dialog = Dialog::NewPin {
                    expires_at_ms,
                    change: false,
                };
                (Some(dialog), "")
            }
            (true, true) => (Some(Dialog::OldPin { expires_at_ms }), ""),
        };
        if let Some(dialog) = &dialog {
            self.store.put_dialog(user, Some(dialog)).await?;
        }
        if let Dm::Ready(dm_room) = dm {
            let text = match &dialog {
                Some(dialog) => dialog_prompt(dialog),
                None => message,
            };
            self.messenger
                .notice(
                    &dm_room,
                    text,
                    None,
                    txn("pin-prompt", event.event_id.as_str()),
                )
                .await?;
        }
        Ok(())
    }

    // ----- paying ----------------------------------------------------------------------------

    /// Declines what `event` asked for: records the decision (the first one recorded for the
    /// event wins), then sends its declined receipt and sentence in the event's room. A retry
    /// after a failed send repeats the recorded decision; it never decides again.
    #[allow(clippy::too_many_arguments)]
    async fn decline(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
        reason: ReceiptReason,
        sentence: &str,
    ) -> Result<(), PaymentsError> {
        let record = DeclineRecord {
            reason: reason_code(reason),
            sentence: sentence.to_owned(),
            payee: payee.to_string(),
            amount: amount.to_string(),
            currency: currency.to_owned(),
        };
        let outcome = EventOutcome::Declined(record.clone());
        match self
            .store
            .put_outcome_if_absent(event.event_id.as_str(), &outcome)
            .await?
        {
            None => {
                self.metrics.payment("declined", reason_label(reason));
                self.send_decline(event, &record).await
            }
            Some(EventOutcome::Declined(earlier)) => self.send_decline(event, &earlier).await,
            Some(other) => {
                // Something started for this event meanwhile (cannot happen: transactions are
                // handled one at a time); never tell "not made" about a started payment.
                tracing::warn!(?other, "not declining an event that started something");
                Ok(())
            }
        }
    }

    /// Sends the declined receipt and sentence of a recorded decision (the same transaction
    /// ids each time, so the homeserver shows them once).
    async fn send_decline(
        &self,
        event: &DecryptedEvent,
        record: &DeclineRecord,
    ) -> Result<(), PaymentsError> {
        let corrupt = |reason| StoreError::Corrupt {
            tree: "eventid_outcome",
            reason,
        };
        let payee = OwnedUserId::try_from(record.payee.as_str())
            .map_err(|_| corrupt("payee is not a user id"))?;
        let amount: Decimal = record
            .amount
            .parse()
            .map_err(|_| corrupt("amount is not a decimal"))?;
        let body = format!("❌ {}: payment not made: {}", event.sender, record.sentence);
        let receipt = ReceiptEventContent {
            body: body.clone(),
            status: ReceiptStatus::Declined,
            reason: Some(reason_from_code(&record.reason)),
            transfer_id: None,
            payer: event.sender.clone(),
            payee,
            amount,
            currency: record.currency.clone(),
            relates_to: Reference::new(event.event_id.clone()),
        };
        let key = event.event_id.as_str();
        self.fault_before_reply("decline-receipt")?;
        self.messenger
            .send(
                &event.room_id,
                "org.mxpay.receipt",
                serde_json::to_value(&receipt).expect("receipt serialises"),
                txn("decline-receipt", key),
            )
            .await?;
        self.messenger
            .notice(
                &event.room_id,
                &body,
                Some(&event.event_id),
                txn("decline-notice", key),
            )
            .await?;
        Ok(())
    }

    /// Whether `!pin set` may accept a user's changed identity although no PIN confirms it:
    /// when the operator said so (an admin PIN reset with `accept_new_keys`), or when the user
    /// never had a PIN and never had a payment (nothing to take over: a new user who reset
    /// their keys before ever paying). A PIN reset by the operator without that flag, or a
    /// wallet that ever held money, needs the operator: else whoever reset the keys (perhaps
    /// an attacker with the password) would get the wallet by setting a PIN.
    async fn may_accept_keys_without_pin(
        &self,
        user: &str,
        had_pin_record: bool,
    ) -> Result<bool, PaymentsError> {
        if self.store.profile(user)?.accept_new_keys_at_pin_set {
            return Ok(true);
        }
        if had_pin_record {
            return Ok(false);
        }
        let page = self.ledger.history(&Owner::user(user), None, 1).await?;
        Ok(page.transfers.is_empty())
    }

    /// The sender's cross-signing identity changed: opens (or keeps) the dialog that accepts it
    /// with their PIN and asks in their DM. Re-asked on every refused attempt, with the same
    /// transaction id per event, so a retried transaction does not ask twice.
    async fn ask_to_accept_identity(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        if self.store.pin(user)?.is_none_or(|r| r.hash.is_none()) {
            return Ok(()); // no PIN to confirm with (the operator can: see `!pin set`)
        }
        let now_ms = self.clock.now_ms();
        let dialog = match self.store.dialog(user, now_ms)? {
            Some(open @ Dialog::AcceptIdentity { .. }) => open,
            _ => {
                let dialog = Dialog::AcceptIdentity {
                    expires_at_ms: now_ms + self.settings.pin_dialog_timeout_ms,
                };
                self.store.put_dialog(user, Some(&dialog)).await?;
                dialog
            }
        };
        if let Some(dm) = self.ready_dm(user)? {
            self.messenger
                .notice(
                    &dm,
                    dialog_prompt(&dialog),
                    None,
                    txn("identity-prompt", event.event_id.as_str()),
                )
                .await?;
        }
        Ok(())
    }

    /// Checks that apply to every outgoing payment: trust, PIN state. `Err(sentence)` refuses.
    async fn check_payer(
        &self,
        event: &DecryptedEvent,
    ) -> Result<Result<(), (ReceiptReason, String)>, PaymentsError> {
        let facts = self.facts(event).await?;
        let user = event.sender.as_str();
        let has_pin = self.store.pin(user)?.is_some_and(|r| r.hash.is_some());
        match trust::check(facts, self.trust_settings()) {
            Ok(()) => {}
            // Without a PIN there is nothing to confirm the new keys with: the refusal below
            // sends the user to `!pin set`, which accepts them.
            Err(TrustRefusal::IdentityChanged) if !has_pin => {}
            Err(refusal) => {
                if refusal == TrustRefusal::IdentityChanged {
                    self.ask_to_accept_identity(event).await?;
                }
                return Ok(Err((refusal.reason(), refusal.to_string())));
            }
        }
        let record = self.store.pin(user)?;
        let Some(record) = record.filter(|r| r.hash.is_some()) else {
            return Ok(Err((
                ReceiptReason::PinNotSet,
                "you have no PIN yet: send !pin set in our private chat first".to_owned(),
            )));
        };
        if self.store.profile(user)?.pin_compromised {
            return Ok(Err((
                ReceiptReason::PinLocked,
                "your PIN was exposed; change it with !pin change in our private chat first"
                    .to_owned(),
            )));
        }
        if let Some(until_ms) = record.locked_until_ms {
            let now_ms = self.clock.now_ms();
            if now_ms < until_ms {
                return Ok(Err((
                    ReceiptReason::PinLocked,
                    format!(
                        "your PIN is locked after too many wrong attempts; try again in {}",
                        human_duration(until_ms - now_ms)
                    ),
                )));
            }
        }
        Ok(Ok(()))
    }

    /// The refusal of a fresh payment by policy (payer trust and PIN state, payee, membership,
    /// amount), if any; `Ok(Ok(()))` when it may start.
    async fn pay_refusal(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
    ) -> Result<Result<(), (ReceiptReason, String)>, PaymentsError> {
        if let Err(refusal) = self.check_payer(event).await? {
            return Ok(Err(refusal));
        }
        if payee == event.sender || payee == self.bot {
            return Ok(Err((
                ReceiptReason::PayeeNotAllowed,
                "you cannot pay yourself or the bot".to_owned(),
            )));
        }
        if !self.wallet_holders().allows(payee) {
            return Ok(Err((
                ReceiptReason::PayeeNotAllowed,
                format!("{payee} may not hold a wallet on this service"),
            )));
        }
        let members = self.messenger.memberships(&event.room_id).await?;
        if !members
            .iter()
            .any(|(u, m)| u == payee.as_str() && m == "join")
        {
            return Ok(Err((
                ReceiptReason::PayeeNotAllowed,
                format!("{payee} is not a member of this room"),
            )));
        }
        if let Err(error) = self.ledger.parse_amount(amount, currency) {
            return Ok(Err((ReceiptReason::InvalidAmount, error.to_string())));
        }
        Ok(Ok(()))
    }

    /// Reserves the payment `event` asks for in the ledger (a pending transfer whose id comes
    /// from the event's id); `Ok(Err(refusal))` when the amount or the ledger refuses it.
    async fn create_payment(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
        memo: Option<String>,
    ) -> Result<Result<Transfer, (ReceiptReason, String)>, PaymentsError> {
        let parsed = match self.ledger.parse_amount(amount, currency) {
            Ok(parsed) => parsed,
            Err(error) => return Ok(Err((ReceiptReason::InvalidAmount, error.to_string()))),
        };
        let memo_bytes = PaymentMemo {
            kind: MemoKind::Pay,
            room: event.room_id.to_string(),
            event: event.event_id.to_string(),
            note: memo,
        }
        .encode();
        let created = self
            .ledger
            .create_pending(
                TransferRequest {
                    id: TransferId::from_key(event.event_id.as_str()),
                    debit: Owner::user(event.sender.as_str()),
                    credit: Owner::user(payee.as_str()),
                    amount: parsed,
                    memo: memo_bytes,
                },
                self.settings.stepup_timeout_ms,
            )
            .await;
        match created {
            Ok(transfer) => Ok(Ok(transfer)),
            Err(LedgerError::Rejected(error)) => {
                Ok(Err((reason_for(error), refusal_sentence(error))))
            }
            Err(other) => Err(other.into()),
        }
    }

    async fn on_pay(
        &self,
        event: &DecryptedEvent,
        request: PayRequest,
    ) -> Result<(), PaymentsError> {
        let PayRequest {
            payee,
            amount,
            currency,
            memo,
        } = request;
        let transfer_id = TransferId::from_key(event.event_id.as_str());
        // The transfer made for this event (if any) is what "started" means for a payment.
        let existing = self.ledger.transfer(transfer_id).await?;
        let earlier = self.store.outcome(event.event_id.as_str())?;
        let now_ms = self.clock.now_ms();
        match start_decision(
            earlier,
            existing.is_some(),
            event.origin_server_ts_ms,
            now_ms,
            self.settings.stepup_timeout_ms,
        ) {
            Start::Repeat(record) => return self.send_decline(event, &record).await,
            Start::TooLate => {
                tracing::info!(
                    sent_ms = event.origin_server_ts_ms,
                    was_parked = event.was_parked,
                    "payment request arrived too late; declined"
                );
                let sentence = text::too_late(false, event.origin_server_ts_ms, now_ms);
                return self
                    .decline(
                        event,
                        &payee,
                        amount,
                        &currency,
                        ReceiptReason::TooLate,
                        &sentence,
                    )
                    .await;
            }
            Start::Fresh => {
                if let Err((reason, sentence)) =
                    self.pay_refusal(event, &payee, amount, &currency).await?
                {
                    return self
                        .decline(event, &payee, amount, &currency, reason, &sentence)
                        .await;
                }
            }
            // A replay of an event whose transfer exists: carry on with that transfer, never
            // refuse it now.
            Start::Resume | Start::Ended => {}
        }
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        let transfer = match existing {
            Some(transfer) => transfer,
            None => match self
                .create_payment(event, &payee, amount, &currency, memo.clone())
                .await?
            {
                Ok(transfer) => transfer,
                Err((reason, sentence)) => {
                    return self
                        .decline(event, &payee, amount, &currency, reason, &sentence)
                        .await
                }
            },
        };
        self.poke.poke();
        if transfer.state != TransferState::Pending {
            // A replayed event whose payment already ended: its receipt was sent then.
            tracing::info!(transfer = %transfer.id, "payment event seen again; already ended");
            return Ok(());
        }
        let challenge = Challenge {
            kind: ChallengeKind::Pay,
            transfer_id: transfer.id.0,
            payer: event.sender.to_string(),
            payee: payee.to_string(),
            amount_minor: transfer.amount_minor,
            amount: self.show(&currency, transfer.amount_minor),
            currency: currency.clone(),
            room_id: event.room_id.to_string(),
            event_id: event.event_id.to_string(),
            memo,
            created_ms: transfer.created_ms,
            expires_at_ms: transfer
                .deadline_ms
                .unwrap_or(transfer.created_ms + self.settings.stepup_timeout_ms),
        };
        self.store.put_challenge(&challenge).await?;
        self.messenger
            .notice(
                &event.room_id,
                &format!(
                    "⏳ {}: confirm paying {} to {payee} with your PIN in our private chat.",
                    event.sender,
                    text::money(&challenge.amount, &currency)
                ),
                Some(&event.event_id),
                txn("pay-pending", event.event_id.as_str()),
            )
            .await?;
        match dm {
            Dm::Ready(dm_room) => self.send_challenge(&dm_room, &challenge).await?,
            Dm::Invited(_) => {
                // Sent when the payer joins the DM (on_member).
                self.point_to_dm(event, &dm, "pay-pointer").await?;
            }
        }
        Ok(())
    }

    async fn on_withdraw(
        &self,
        event: &DecryptedEvent,
        amount: Decimal,
        currency: String,
    ) -> Result<(), PaymentsError> {
        let bot = self.bot.clone();
        let key = event.event_id.as_str();
        let transfer_id = TransferId::from_key(key);
        if self.ledger.transfer(transfer_id).await?.is_some() {
            return Ok(()); // replayed: the withdrawal was confirmed already
        }
        // A withdrawal "started" when its challenge was stored (the transfer is made only
        // after the PIN): the challenge is open, or the event's outcome says so.
        let open = self.store.challenge(event.sender.as_str(), transfer_id.0)?;
        let earlier = self.store.outcome(key)?;
        let now_ms = self.clock.now_ms();
        let decision = start_decision(
            earlier,
            open.is_some(),
            event.origin_server_ts_ms,
            now_ms,
            self.settings.stepup_timeout_ms,
        );
        let challenge = match (decision, open) {
            (Start::Repeat(record), _) => return self.send_decline(event, &record).await,
            // It was started, and its challenge ended since (confirmed, cancelled, lapsed,
            // refused): it was told then.
            (Start::Ended, _) => return Ok(()),
            (Start::Resume, Some(open)) => open,
            (Start::Resume, None) => unreachable!("resumed without an open challenge"),
            (Start::TooLate, _) => {
                tracing::info!(
                    sent_ms = event.origin_server_ts_ms,
                    was_parked = event.was_parked,
                    "withdrawal request arrived too late; declined"
                );
                let sentence = text::too_late(true, event.origin_server_ts_ms, now_ms);
                return self
                    .decline(
                        event,
                        &bot,
                        amount,
                        &currency,
                        ReceiptReason::TooLate,
                        &sentence,
                    )
                    .await;
            }
            (Start::Fresh, _) => {
                if let Err((reason, sentence)) = self.check_payer(event).await? {
                    return self
                        .decline(event, &bot, amount, &currency, reason, &sentence)
                        .await;
                }
                let parsed = match self.ledger.parse_amount(amount, &currency) {
                    Ok(parsed) => parsed,
                    Err(error) => {
                        return self
                            .decline(
                                event,
                                &bot,
                                amount,
                                &currency,
                                ReceiptReason::InvalidAmount,
                                &error.to_string(),
                            )
                            .await
                    }
                };
                let created_ms = event.origin_server_ts_ms.min(now_ms);
                Challenge {
                    kind: ChallengeKind::Withdraw,
                    transfer_id: transfer_id.0,
                    payer: event.sender.to_string(),
                    payee: "settlement".to_owned(),
                    amount_minor: parsed.minor(),
                    amount: self.show(&currency, parsed.minor()),
                    currency: currency.clone(),
                    room_id: event.room_id.to_string(),
                    event_id: event.event_id.to_string(),
                    memo: None,
                    created_ms,
                    expires_at_ms: created_ms + self.settings.stepup_timeout_ms,
                }
            }
        };
        if challenge.expires_at_ms <= now_ms {
            return Ok(()); // started, then lapsed before this replay: nothing left to ask
        }
        let dm = self.ensure_dm(&event.sender, &event.room_id).await?;
        self.store.put_challenge(&challenge).await?;
        // After the challenge: a crash in between leaves it open, which also counts as started.
        self.store.put_outcome(key, &EventOutcome::Started).await?;
        match &dm {
            Dm::Ready(dm_room) => self.send_challenge(dm_room, &challenge).await?,
            Dm::Invited(_) => {}
        }
        self.point_to_dm(event, &dm, "withdraw-pointer").await?;
        Ok(())
    }

    async fn send_challenge(
        &self,
        dm_room: &RoomId,
        challenge: &Challenge,
    ) -> Result<(), PaymentsError> {
        let now_ms = self.clock.now_ms();
        let left_ms = challenge.expires_at_ms.saturating_sub(now_ms);
        let (body, payee) = match challenge.kind {
            ChallengeKind::Pay => (
                text::challenge_body(
                    &challenge.amount,
                    &challenge.currency,
                    &challenge.payee,
                    &challenge.room_id,
                    left_ms,
                ),
                OwnedUserId::try_from(challenge.payee.as_str())
                    .unwrap_or_else(|_| self.bot.clone()),
            ),
            ChallengeKind::Withdraw => (
                text::withdraw_challenge_body(&challenge.amount, &challenge.currency, left_ms),
                self.bot.clone(),
            ),
        };
        let content = StepUpChallengeEventContent {
            body: body.clone(),
            challenge_id: challenge.challenge_id(),
            payee,
            amount: challenge.amount.parse().unwrap_or_default(),
            currency: challenge.currency.clone(),
            room_id: OwnedRoomId::try_from(challenge.room_id.as_str())
                .unwrap_or_else(|_| dm_room.to_owned()),
            expires_at_ms: challenge.expires_at_ms,
            relates_to: None,
        };
        let key = format!("{}:{}", challenge.challenge_id(), dm_room);
        self.messenger
            .send(
                dm_room,
                "org.mxpay.stepup.challenge",
                serde_json::to_value(&content).expect("challenge serialises"),
                txn("challenge-event", &key),
            )
            .await?;
        let notice_id = self
            .messenger
            .notice(dm_room, &body, None, txn("challenge-notice", &key))
            .await?;
        self.store
            .update_note(challenge.transfer_id, |note| {
                note.dm_event_id = Some(notice_id.to_string())
            })
            .await?;
        Ok(())
    }

    // ----- PINs ------------------------------------------------------------------------------

    /// A PIN-carrying event (any shape, see [`pinlike`]): used as an answer only in the
    /// sender's private DM; removed after reading. `Ok(false)` when it is left alone (chat
    /// outside the DM while the bot waits for no PIN from the sender).
    async fn on_pin(
        &self,
        event: &DecryptedEvent,
        message: pinlike::PinMessage,
    ) -> Result<bool, PaymentsError> {
        let user = event.sender.as_str();
        let profile = self.store.profile(user)?;
        let mut in_dm = profile.dm_room.as_deref() == Some(event.room_id.as_str());
        if in_dm && !self.is_private_dm(&event.room_id, &event.sender).await? {
            // Someone else joined or was invited, or the room became joinable: a PIN here is
            // readable by others, exactly as in a group room.
            tracing::warn!(room_id = %event.room_id, "a PIN in a DM that is no longer private");
            in_dm = false;
        }
        let now_ms = self.clock.now_ms();
        if !in_dm {
            return self
                .on_pin_outside_dm(event, &message, profile, now_ms)
                .await;
        }
        // Read (it is in memory now), then remove it from the room; the redaction runs
        // alongside the check so it does not add to the payment's latency.
        let replaces = message.replaces.clone();
        let redaction = async {
            if !self.remove_pin_message(event, replaces.as_deref()).await? {
                tracing::warn!(room_id = %event.room_id, "cannot redact a PIN in the private chat");
            }
            Ok::<_, PaymentsError>(())
        };
        let (redacted, acted) = tokio::join!(redaction, self.act_on_dm_pin(event, message, now_ms));
        redacted?;
        acted.map(|()| true)
    }

    /// Redacts a PIN-carrying event and, for an edit, the message it edited (if the same
    /// person sent it: an edit naming someone else's message is no licence to remove that).
    /// `Ok(false)` when the event itself could not be removed (no power, or refused for good).
    async fn remove_pin_message(
        &self,
        event: &DecryptedEvent,
        replaces: Option<&EventId>,
    ) -> Result<bool, PaymentsError> {
        let removed = self.redact_or_warn(&event.room_id, &event.event_id).await?;
        if let Some(original) = replaces {
            let sender = match self.messenger.event_sender(&event.room_id, original).await {
                Ok(sender) => sender,
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look up the message a PIN edit replaced");
                    None
                }
            };
            if sender.as_ref() == Some(&event.sender) {
                self.redact_or_warn(&event.room_id, original).await?;
            }
        }
        Ok(removed)
    }

    /// Redacts an event; `Ok(false)` when the bot may not (no power, or refused for good).
    async fn redact_or_warn(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<bool, PaymentsError> {
        match self.messenger.redact(room_id, event_id).await {
            Ok(redacted) => Ok(redacted),
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, %room_id, "cannot redact a PIN message");
                Ok(false)
            }
        }
    }

    /// Whether the bot waits for a PIN from `user`: a payment or withdrawal waiting for its
    /// step-up, or a `!pin set` / `!pin change` dialog, not lapsed.
    fn waiting_for_pin(&self, user: &str, now_ms: u64) -> Result<bool, PaymentsError> {
        if self.store.dialog(user, now_ms)?.is_some() {
            return Ok(true);
        }
        Ok(self
            .store
            .challenges(user)?
            .iter()
            .any(|c| c.expires_at_ms > now_ms))
    }

    async fn act_on_dm_pin(
        &self,
        event: &DecryptedEvent,
        message: pinlike::PinMessage,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        match self.store.outcome(event.event_id.as_str())? {
            _ if self.store.is_done(event.event_id.as_str())? => return Ok(()),
            // Handled before up to the answer (which then failed to go out): say it again.
            Some(EventOutcome::DialogAnswered { reply }) => {
                self.reply(event, &reply, "pin-dialog").await?;
                return self.done(event).await;
            }
            _ => {}
        }
        let pinlike::PinMessage {
            pin,
            challenge_id,
            reply_to,
            ..
        } = message;
        let Some(pin) = pin else {
            // A step-up response whose `pin` is not 4 digits: nothing to compare, no attempt.
            self.reply(
                event,
                "A PIN is exactly 4 digits. I removed your message and did not use it; send \
                 your PIN again.",
                "pin-malformed",
            )
            .await?;
            return self.done(event).await;
        };
        if !event.was_encrypted {
            self.on_plaintext_dm_pin(event, now_ms).await?;
            return self.done(event).await;
        }
        let facts = self.facts(event).await?;
        let dialog = self.store.dialog(user, now_ms)?;
        match trust::check(facts, self.trust_settings()) {
            Ok(()) => {}
            // The one answer taken from a changed identity: the PIN that accepts it (the
            // device itself is cross-signed by the new identity, or the check says so).
            Err(TrustRefusal::IdentityChanged)
                if matches!(dialog, Some(Dialog::AcceptIdentity { .. })) => {}
            Err(refusal) => {
                if refusal == TrustRefusal::IdentityChanged {
                    self.reply(
                        event,
                        "Your account's security keys changed, so I did not use this PIN for \
                         anything and removed your message.",
                        "pin-identity-changed",
                    )
                    .await?;
                    self.ask_to_accept_identity(event).await?;
                } else {
                    self.reply(event, &refusal.to_string(), "pin-untrusted")
                        .await?;
                }
                return self.done(event).await;
            }
        }
        if let Some(dialog) = dialog {
            self.on_dialog_pin(event, dialog, pin, now_ms).await?;
            return self.done(event).await;
        }
        let addressed = challenge_id.is_some() || reply_to.is_some();
        let mut open = Vec::new();
        for challenge in self.store.challenges(user)? {
            // Lapsed challenges are dropped here (their pending transfers expire in the ledger
            // and the outbox tells about that); one the PIN names is kept so the answer can
            // say it came too late.
            if challenge.expires_at_ms <= now_ms && !addressed {
                self.store.remove_challenge(&challenge).await?;
            } else {
                let notice = self.store.note(challenge.transfer_id)?.dm_event_id;
                open.push((challenge, notice));
            }
        }
        let address = PinAddress {
            challenge_id: challenge_id.as_deref(),
            reply_to: reply_to.as_deref(),
        };
        let target = choose_challenge(
            open,
            &address,
            event.origin_server_ts_ms,
            now_ms,
            self.settings.stepup_timeout_ms,
        );
        match target {
            PinTarget::One(challenge) => self.on_stepup_pin(event, challenge, pin, now_ms).await?,
            PinTarget::Several(challenges) => {
                let lines: Vec<String> = challenges
                    .iter()
                    .map(|c| text::challenge_line(&c.amount, &c.currency, &c.payee, &c.room_id))
                    .collect();
                self.reply(event, &text::which_challenge(&lines), "pin-which")
                    .await?
            }
            PinTarget::TooOld => {
                self.reply(
                    event,
                    "This PIN message is older than the step-up window or than the payment \
                     waiting for it, so I did not use it (it counts as no attempt) and removed \
                     it. To confirm, send your PIN again.",
                    "pin-too-old",
                )
                .await?
            }
            PinTarget::Unknown => {
                self.reply(
                    event,
                    "The payment you answered is no longer waiting for a PIN (it was paid, \
                     cancelled or expired), so I did not use your PIN. I removed your message.",
                    "pin-unknown",
                )
                .await?
            }
            PinTarget::NotWaiting => {
                self.reply(
                    event,
                    "I was not waiting for a PIN (no payment is waiting for your confirmation). \
                     I removed your message.",
                    "pin-unexpected",
                )
                .await?
            }
        }
        self.done(event).await
    }

    /// `!cancel`: voids every payment of the sender still waiting for a PIN (and drops their
    /// withdrawal confirmations), then says so in the DM (or, without one, where it was asked).
    async fn on_cancel(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let now_ms = self.clock.now_ms();
        let open: Vec<Challenge> = self
            .store
            .challenges(user)?
            .into_iter()
            .filter(|c| c.expires_at_ms > now_ms)
            .collect();
        self.cancel_challenges(user, ReceiptReason::Other).await?;
        let body = if open.is_empty() {
            "Nothing was waiting for your PIN, so there was nothing to cancel.".to_owned()
        } else {
            let lines: Vec<String> = open
                .iter()
                .map(|c| match c.kind {
                    ChallengeKind::Pay => {
                        text::challenge_line(&c.amount, &c.currency, &c.payee, &c.room_id)
                    }
                    ChallengeKind::Withdraw => {
                        format!("• withdrawal of {}", text::money(&c.amount, &c.currency))
                    }
                })
                .collect();
            format!("Cancelled; nothing of it was paid:\n{}", lines.join("\n"))
        };
        let key = event.event_id.as_str();
        match self.ready_dm(user)? {
            Some(dm) => {
                let reply_to = (dm == event.room_id).then_some(event.event_id.as_ref());
                self.messenger
                    .notice(&dm, &body, reply_to, txn("cancel", key))
                    .await?;
                if dm != event.room_id {
                    self.messenger
                        .notice(
                            &event.room_id,
                            &format!("{}: I answered in our private chat.", event.sender),
                            Some(&event.event_id),
                            txn("cancel-pointer", key),
                        )
                        .await?;
                }
            }
            None => {
                self.messenger
                    .notice(
                        &event.room_id,
                        &body,
                        Some(&event.event_id),
                        txn("cancel", key),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn done(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        self.store.mark_done(event.event_id.as_str()).await?;
        Ok(())
    }

    /// Answers `event` in its room, as a reply addressed to its sender.
    async fn answer(
        &self,
        event: &DecryptedEvent,
        text: &str,
        purpose: &str,
    ) -> Result<(), PaymentsError> {
        self.messenger
            .notice(
                &event.room_id,
                &format!("{}: {text}", event.sender),
                Some(&event.event_id),
                txn(purpose, event.event_id.as_str()),
            )
            .await?;
        Ok(())
    }

    async fn reply(
        &self,
        event: &DecryptedEvent,
        body: &str,
        purpose: &str,
    ) -> Result<(), PaymentsError> {
        self.fault_before_reply(purpose)?;
        self.messenger
            .notice(
                &event.room_id,
                body,
                None,
                txn(purpose, event.event_id.as_str()),
            )
            .await?;
        Ok(())
    }

    /// A PIN-carrying event outside the sender's private DM. A step-up response says it holds
    /// a PIN, so it is always refused and removed. A chat message that only looks like a PIN
    /// (`1990`, `2024`) counts as one only while the bot waits for a PIN from its sender (an
    /// open step-up or PIN dialog): then it is refused and removed, otherwise left alone
    /// (`Ok(false)`). It is never compared with the PIN (see docs/security.md: an argon2 per
    /// chat number, and an answer that would tell a session thief whether they guessed it
    /// without counting an attempt). Where the bot cannot remove it, or it was sent
    /// unencrypted, the PIN counts as exposed and is blocked until changed.
    async fn on_pin_outside_dm(
        &self,
        event: &DecryptedEvent,
        message: &pinlike::PinMessage,
        mut profile: UserProfile,
        now_ms: u64,
    ) -> Result<bool, PaymentsError> {
        let user = event.sender.as_str();
        if !message.declared && !self.waiting_for_pin(user, now_ms)? {
            return Ok(false); // just a number in a conversation
        }
        let has_pin = self.store.pin(user)?.is_some_and(|r| r.hash.is_some());
        let redacted = self
            .remove_pin_message(event, message.replaces.as_deref())
            .await?;
        // A PIN left standing, or sent unencrypted (the homeserver keeps a readable copy
        // whatever the redaction removes from clients), is known to others.
        let exposed = message.pin.is_some() && (!redacted || !event.was_encrypted);
        if exposed && has_pin {
            profile.pin_compromised = true;
            self.store.put_profile(user, &profile).await?;
        }
        let how = if redacted {
            "I removed your message, but it was sent unencrypted, so your homeserver kept a \
             readable copy"
        } else {
            "I cannot remove your message here"
        };
        let text = if !exposed && redacted {
            format!(
                "{user}: never send your PIN in a shared room; I removed your message and did \
                 not use it. Send PINs only in our private chat."
            )
        } else if !exposed {
            // A malformed `pin` field is not the PIN itself: nothing to block.
            format!(
                "{user}: never send your PIN in a shared room; I cannot remove your message \
                 here and did not use it. If it holds your PIN, change it with !pin change in \
                 our private chat."
            )
        } else if has_pin {
            format!(
                "{user}: never send your PIN in a shared room. {how}, so treat that PIN as \
                 known to others: it is blocked for payments until you change it with \
                 !pin change in our private chat."
            )
        } else {
            format!(
                "{user}: never send your PIN in a shared room. {how}, so treat those digits as \
                 known to others and do not choose them as your PIN."
            )
        };
        self.messenger
            .notice(
                &event.room_id,
                &text,
                None,
                txn("pin-in-group", event.event_id.as_str()),
            )
            .await?;
        Ok(true)
    }

    /// A PIN sent unencrypted in the DM (a client that ignored the room's encryption): the
    /// homeserver stored it readable, and a redaction does not undo that, so it is never used.
    /// A new PIN being chosen is dropped (the dialog asks for another one); otherwise the
    /// user's PIN counts as exposed and is blocked for payments until changed.
    async fn on_plaintext_dm_pin(
        &self,
        event: &DecryptedEvent,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        const UNENCRYPTED: &str = "This message reached me unencrypted (your client sent it \
            without end-to-end encryption), so your homeserver could read it. I removed it and \
            did not use it.";
        let text = match self.store.dialog(user, now_ms)? {
            Some(Dialog::NewPin { change, .. } | Dialog::ConfirmPin { change, .. }) => {
                let next = Dialog::NewPin {
                    expires_at_ms: now_ms + self.settings.pin_dialog_timeout_ms,
                    change,
                };
                self.store.put_dialog(user, Some(&next)).await?;
                format!(
                    "{UNENCRYPTED} Choose a different 4-digit PIN and send it from a session \
                     that encrypts."
                )
            }
            _ if self.store.pin(user)?.is_some_and(|r| r.hash.is_some()) => {
                let mut profile = self.store.profile(user)?;
                profile.pin_compromised = true;
                self.store.put_profile(user, &profile).await?;
                format!(
                    "{UNENCRYPTED} Treat your PIN as known: it is blocked for payments until \
                     you change it with !pin change, from a session that encrypts."
                )
            }
            _ => UNENCRYPTED.to_owned(),
        };
        tracing::warn!(room_id = %event.room_id, "a PIN arrived unencrypted in the private chat");
        self.reply(event, &text, "pin-plaintext").await
    }

    async fn hash(&self, pin: Pin) -> Result<String, PaymentsError> {
        let hasher = self.hasher.clone();
        tokio::task::spawn_blocking(move || hasher.hash(&pin))
            .await?
            .map_err(PaymentsError::Pin)
    }

    async fn matches(&self, pin: Pin, hash: String) -> Result<bool, PaymentsError> {
        let hasher = self.hasher.clone();
        tokio::task::spawn_blocking(move || hasher.matches(&pin, &hash))
            .await?
            .map_err(PaymentsError::Pin)
    }

    /// Checks `pin` (from the PIN event `event_id`) against the user's PIN: the attempt is
    /// stored before the comparison, once per event ([`check_pin_with`]).
    async fn check_pin(
        &self,
        user: &str,
        event_id: &EventId,
        pin: Pin,
        now_ms: u64,
    ) -> Result<Result<(), PinError>, PaymentsError> {
        // Metrics count only attempts that reached the comparison (not ones refused while locked).
        let compared = std::sync::atomic::AtomicBool::new(false);
        let result = check_pin_with(&self.store, user, event_id.as_str(), now_ms, |hash| {
            compared.store(true, std::sync::atomic::Ordering::Relaxed);
            self.matches(pin, hash)
        })
        .await?;
        if compared.load(std::sync::atomic::Ordering::Relaxed) {
            match &result {
                Err(PinError::Locked { .. }) => {
                    self.metrics.pin_failure();
                    self.metrics.pin_lockout();
                }
                Err(PinError::Wrong { .. }) => self.metrics.pin_failure(),
                _ => {}
            }
        }
        Ok(result)
    }

    /// Moves the sender's PIN dialog on (or ends it) and answers, recording the answer with the
    /// step so a retried message gets it again (see [`PaymentStore::put_dialog_step`]).
    async fn dialog_step(
        &self,
        event: &DecryptedEvent,
        next: Option<&Dialog>,
        reply: &str,
    ) -> Result<(), PaymentsError> {
        self.store
            .put_dialog_step(event.sender.as_str(), next, event.event_id.as_str(), reply)
            .await?;
        self.reply(event, reply, "pin-dialog").await
    }

    async fn on_dialog_pin(
        &self,
        event: &DecryptedEvent,
        dialog: Dialog,
        pin: Pin,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        let expires_at_ms = now_ms + self.settings.pin_dialog_timeout_ms;
        match dialog {
            Dialog::NewPin { change, .. } => {
                let hash = self.hash(pin).await?;
                let next = Dialog::ConfirmPin {
                    expires_at_ms,
                    hash,
                    change,
                };
                self.dialog_step(event, Some(&next), dialog_prompt(&next))
                    .await
            }
            Dialog::ConfirmPin { hash, change, .. } => {
                if self.matches(pin, hash.clone()).await? {
                    // Setting the same hash again (a retry after a crash here) is harmless.
                    self.store.put_pin(user, &PinRecord::new(hash)).await?;
                    let mut profile = self.store.profile(user)?;
                    profile.pin_compromised = false;
                    self.store.put_profile(user, &profile).await?;
                    let text = if change {
                        "✅ Your PIN is changed."
                    } else {
                        "✅ Your PIN is set. You can now pay with !pay in encrypted rooms."
                    };
                    self.dialog_step(event, None, text).await
                } else {
                    let next = Dialog::NewPin {
                        expires_at_ms,
                        change,
                    };
                    self.dialog_step(
                        event,
                        Some(&next),
                        "The two PINs differ. Send a new 4-digit PIN.",
                    )
                    .await
                }
            }
            Dialog::AcceptIdentity { .. } => {
                if event.verification_state != TrustState::VerificationViolation {
                    // Not sent from a session of the changed identity: either the keys were
                    // accepted meanwhile (this very message, handled again after a crash), or
                    // it comes from a session the new keys did not sign. Neither may accept
                    // keys, and the PIN is not used for anything else.
                    return self
                        .dialog_step(
                            event,
                            None,
                            "I did not use this PIN: no change of your security keys is waiting \
                             for it from this session. If a payment is waiting for your PIN, \
                             send it again.",
                        )
                        .await;
                }
                if self.store.profile(user)?.pin_compromised {
                    return self
                        .dialog_step(
                            event,
                            None,
                            "Your PIN was exposed, so it cannot confirm new security keys. Ask \
                             the operator to reset your PIN and confirm your new keys.",
                        )
                        .await;
                }
                match self.check_pin(user, &event.event_id, pin, now_ms).await? {
                    Ok(()) => {
                        self.messenger.crypto.accept_identity(&event.sender).await?;
                        self.dialog_step(
                            event,
                            None,
                            "✅ I accept your new security keys. You can pay again; if a payment \
                             is waiting for your PIN, send your PIN once more to confirm it.",
                        )
                        .await
                    }
                    Err(error) => self.dialog_pin_refused(event, error).await,
                }
            }
            Dialog::OldPin { .. } => {
                match self.check_pin(user, &event.event_id, pin, now_ms).await? {
                    Ok(()) => {
                        let next = Dialog::NewPin {
                            expires_at_ms,
                            change: true,
                        };
                        self.dialog_step(event, Some(&next), dialog_prompt(&next))
                            .await
                    }
                    Err(error) => self.dialog_pin_refused(event, error).await,
                }
            }
        }
    }

    /// A PIN dialog's PIN check failed: a locked (or reset) PIN ends the dialog; a wrong one
    /// leaves it open for another try (the attempt itself is recorded by the check).
    async fn dialog_pin_refused(
        &self,
        event: &DecryptedEvent,
        error: PinError,
    ) -> Result<(), PaymentsError> {
        let sentence = pin_error_sentence(&error);
        if matches!(error, PinError::Locked { .. } | PinError::NotSet) {
            self.dialog_step(event, None, &sentence).await
        } else {
            self.reply(event, &sentence, "pin-dialog").await
        }
    }

    async fn on_stepup_pin(
        &self,
        event: &DecryptedEvent,
        challenge: Challenge,
        pin: Pin,
        now_ms: u64,
    ) -> Result<(), PaymentsError> {
        let user = event.sender.as_str();
        if challenge.expires_at_ms <= now_ms {
            self.store.remove_challenge(&challenge).await?;
            return self
                .reply(
                    event,
                    "That payment waited too long for your PIN and was cancelled; nothing was \
                     paid. Ask again if you still want to pay.",
                    "stepup-late",
                )
                .await;
        }
        if self.store.profile(user)?.pin_compromised {
            return self
                .reply(
                    event,
                    "Your PIN was exposed (typed in a shared room or sent unencrypted): change \
                     it with !pin change before confirming payments.",
                    "stepup-compromised",
                )
                .await;
        }
        let span = payment_span(TransferId(challenge.transfer_id));
        match self
            .check_pin(user, &event.event_id, pin, now_ms)
            .instrument(span.clone())
            .await?
        {
            Ok(()) => self.authorise(event, &challenge).instrument(span).await,
            Err(PinError::Wrong { attempts_left }) => {
                self.reply(
                    event,
                    &format!(
                        "Wrong PIN. {attempts_left} attempt{} left before your PIN locks. \
                         Send it again to confirm.",
                        if attempts_left == 1 { "" } else { "s" }
                    ),
                    "stepup-wrong",
                )
                .await
            }
            Err(error @ PinError::Locked { .. }) => {
                self.reply(
                    event,
                    &format!(
                        "{}. The payment was cancelled.",
                        capitalise(&pin_error_sentence(&error))
                    ),
                    "stepup-locked",
                )
                .await?;
                self.cancel_challenges(user, ReceiptReason::PinLocked).await
            }
            Err(error) => {
                self.reply(event, &pin_error_sentence(&error), "stepup-error")
                    .await
            }
        }
    }

    /// Voids every open payment of `user` (their receipts say `reason`).
    async fn cancel_challenges(
        &self,
        user: &str,
        reason: ReceiptReason,
    ) -> Result<(), PaymentsError> {
        for challenge in self.store.challenges(user)? {
            if challenge.kind == ChallengeKind::Pay {
                self.store
                    .update_note(challenge.transfer_id, |note| {
                        note.void_reason = Some(reason_code(reason))
                    })
                    .await?;
                match self.ledger.void(TransferId(challenge.transfer_id)).await {
                    Ok(_) | Err(LedgerError::Rejected(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.store.remove_challenge(&challenge).await?;
        }
        self.poke.poke();
        Ok(())
    }

    /// Whether the payer's wallet is frozen, or the payee's is frozen for all movement, as the
    /// ledger says now: a payment waiting for its PIN is refused then.
    async fn frozen_since_asked(
        &self,
        pending: &Transfer,
    ) -> Result<Option<TransferError>, PaymentsError> {
        if let Some(payer) = self.ledger.account(&pending.debit).await? {
            if payer.frozen.is_some() {
                return Ok(Some(TransferError::DebitAccountFrozen));
            }
        }
        if let Some(payee) = self.ledger.account(&pending.credit).await? {
            if payee.frozen == Some(crate::ledger::FreezeMode::All) {
                return Ok(Some(TransferError::CreditAccountFrozen));
            }
        }
        Ok(None)
    }

    /// The PIN was right: mint the step-up proof for exactly this payment, redeem it, move the
    /// money.
    async fn authorise(
        &self,
        event: &DecryptedEvent,
        challenge: &Challenge,
    ) -> Result<(), PaymentsError> {
        let transfer_id = TransferId(challenge.transfer_id);
        let payee_owner = match challenge.kind {
            ChallengeKind::Pay => challenge.payee.clone(),
            ChallengeKind::Withdraw => Owner::Settlement.to_string(),
        };
        let binding = StepUpBinding {
            payer: challenge.payer.clone(),
            payee: payee_owner,
            amount_minor: challenge.amount_minor,
            currency: challenge.currency.clone(),
            transfer_id: transfer_id.0.to_string(),
        };
        let proof = self.stepup.mint(binding)?;
        match challenge.kind {
            ChallengeKind::Pay => {
                let Some(pending) = self.ledger.transfer(transfer_id).await? else {
                    self.store.remove_challenge(challenge).await?;
                    return Ok(());
                };
                // The proof is redeemed against the ledger's own record of the transfer.
                self.stepup
                    .redeem(&proof, &binding_of(&pending, &challenge.payer))?;
                // The challenge stays open until the outcome is final: after a retryable
                // failure the re-handled PIN event finds it again.
                // The ledger lets a reservation made before a freeze be posted (so paid-out
                // withdrawals can settle); a payment still waiting for its PIN is different:
                // a wallet frozen meanwhile stops it here.
                let posted = match self.frozen_since_asked(&pending).await? {
                    Some(error) => Err(LedgerError::Rejected(error)),
                    None => match self.ledger.post(transfer_id, None).await {
                        Err(e @ LedgerError::Rejected(_)) => Err(e),
                        Err(e) => return Err(e.into()),
                        Ok(posted) => Ok(posted),
                    },
                };
                match posted {
                    Ok(_) => {
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        tracing::info!(transfer = %transfer_id, "payment confirmed with the PIN and posted");
                        Ok(())
                    }
                    Err(LedgerError::Rejected(TransferError::PendingTransferExpired)) => {
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        self.reply(
                            event,
                            "Too late: that payment expired before your PIN arrived; nothing \
                             was paid.",
                            "stepup-expired",
                        )
                        .await
                    }
                    Err(LedgerError::Rejected(
                        TransferError::PendingTransferAlreadyVoided
                        | TransferError::PendingTransferAlreadyPosted
                        | TransferError::PendingTransferNotPending
                        | TransferError::PendingTransferNotFound,
                    )) => {
                        // It ended meanwhile (cancelled, or told already): the outbox tells
                        // how; nothing is left to confirm.
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        self.reply(
                            event,
                            "That payment is no longer waiting for a PIN; I did not use yours \
                             for anything else.",
                            "stepup-ended",
                        )
                        .await
                    }
                    Err(LedgerError::Rejected(error)) => {
                        // A final refusal (e.g. a frozen wallet): release the reservation now,
                        // so the receipt says why instead of "expired without a PIN" later.
                        self.store
                            .update_note(challenge.transfer_id, |note| {
                                note.void_reason = Some(reason_code(reason_for(error)))
                            })
                            .await?;
                        match self.ledger.void(transfer_id).await {
                            Ok(_) | Err(LedgerError::Rejected(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        tracing::warn!(transfer = %transfer_id, %error, "payment refused by the ledger after the PIN; voided");
                        self.reply(
                            event,
                            &format!(
                                "The payment could not be completed: {}. Nothing was paid and \
                                 the reserved amount is back in your wallet.",
                                refusal_sentence(error)
                            ),
                            "stepup-refused",
                        )
                        .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            ChallengeKind::Withdraw => {
                let amount = self
                    .ledger
                    .amount_from_minor(challenge.amount_minor, &challenge.currency)
                    .map_err(LedgerError::from)?;
                let binding = StepUpBinding {
                    payer: challenge.payer.clone(),
                    payee: Owner::Settlement.to_string(),
                    amount_minor: amount.minor(),
                    currency: amount.currency().to_string(),
                    transfer_id: transfer_id.0.to_string(),
                };
                self.stepup.redeem(&proof, &binding)?;
                let memo = PaymentMemo {
                    kind: MemoKind::Withdraw,
                    room: challenge.room_id.clone(),
                    event: challenge.event_id.clone(),
                    note: None,
                };
                let created = self
                    .ledger
                    .create_pending(
                        TransferRequest {
                            id: transfer_id,
                            debit: Owner::user(challenge.payer.as_str()),
                            credit: Owner::Settlement,
                            amount,
                            memo: memo.encode(),
                        },
                        self.settings.withdrawal_timeout_ms,
                    )
                    .await;
                match created {
                    Ok(_) => {
                        self.store.remove_challenge(challenge).await?;
                        self.poke.poke();
                        Ok(())
                    }
                    Err(LedgerError::Rejected(error)) => {
                        // A refused create made no transfer: nothing to void.
                        self.store.remove_challenge(challenge).await?;
                        self.reply(
                            event,
                            &format!("The withdrawal was refused: {}.", refusal_sentence(error)),
                            "withdraw-refused",
                        )
                        .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    // ----- telling about ledger changes (the outbox's deliverer) ------------------------------

    async fn tell(&self, entry: &ExportedEntry) -> Result<bool, PaymentsError> {
        match &entry.entry {
            JournalEntry::TransferCreated {
                id,
                kind,
                debit,
                credit,
                amount_minor,
                memo,
            } => {
                let amount = format!(
                    "{} {}",
                    self.show(debit.currency.as_str(), *amount_minor),
                    debit.currency
                );
                if debit.owner == Owner::Issuer {
                    if let Owner::User(user) = &credit.owner {
                        let body = format!("💰 Your wallet was topped up with {amount}.");
                        return self.tell_dm(user, &body, *id, "topup").await;
                    }
                }
                if matches!(kind, TransferKind::Pending { .. }) && credit.owner == Owner::Settlement
                {
                    if let (Owner::User(user), Some(_)) = (&debit.owner, PaymentMemo::decode(memo))
                    {
                        let body = format!(
                            "🏦 Withdrawal of {amount} confirmed: it is reserved in your wallet \
                             and will be paid out when the operator settles it."
                        );
                        return self.tell_dm(user, &body, *id, "withdraw-requested").await;
                    }
                }
                Ok(false)
            }
            JournalEntry::PendingPosted { id, .. } => {
                let span = payment_span(*id);
                self.tell_ended(*id, "posted").instrument(span).await
            }
            JournalEntry::PendingVoided { id } => {
                let span = payment_span(*id);
                self.tell_ended(*id, "voided").instrument(span).await
            }
            JournalEntry::PendingExpired { id } => {
                let span = payment_span(*id);
                self.tell_ended(*id, "expired").instrument(span).await
            }
            _ => Ok(false),
        }
    }

    async fn tell_dm(
        &self,
        user: &str,
        body: &str,
        id: TransferId,
        what: &str,
    ) -> Result<bool, PaymentsError> {
        let Some(dm) = self.ready_dm(user)? else {
            tracing::info!(%user, "no private chat to tell about {what}");
            return Ok(false);
        };
        self.messenger
            .notice(&dm, body, None, txn(&format!("ob-{what}"), &id.to_string()))
            .await?;
        Ok(true)
    }

    async fn tell_ended(&self, id: TransferId, how: &str) -> Result<bool, PaymentsError> {
        let Some(transfer) = self.ledger.transfer(id).await? else {
            return Ok(false);
        };
        let Some(memo) = PaymentMemo::decode(&transfer.memo) else {
            return Ok(false);
        };
        let (Owner::User(payer), code) = (&transfer.debit.owner, transfer.debit.currency) else {
            return Ok(false);
        };
        let amount_minor = match transfer.state {
            TransferState::Posted { amount_minor } => amount_minor,
            _ => transfer.amount_minor,
        };
        let amount_text = self.show(code.as_str(), amount_minor);
        let money = text::money(&amount_text, code.as_str());
        if memo.kind == MemoKind::Withdraw {
            match how {
                "posted" => self.metrics.payment("completed", "none"),
                "expired" => self.metrics.payment("expired", "none"),
                _ => self.metrics.payment("declined", "other"),
            }
            let body = match how {
                "posted" => format!("🏦 Your withdrawal of {money} was paid out."),
                _ => format!("🏦 Your withdrawal of {money} was not paid out; the money is back in your wallet."),
            };
            return self
                .tell_dm(payer, &body, id, &format!("withdraw-{how}"))
                .await;
        }
        let Owner::User(payee) = &transfer.credit.owner else {
            return Ok(false);
        };
        if how == "posted" {
            if let Some(marker) = &self.fault_crash_before_receipt {
                if !marker.exists() {
                    let _ = std::fs::write(marker, b"crashed before a receipt\n");
                    tracing::error!(
                        "test fault: aborting after the ledger post, before the receipt"
                    );
                    std::process::abort();
                }
            }
        }
        // The payment ended: its challenge (if still open) has nothing left to confirm.
        if let Some(challenge) = self.store.challenge(payer, id.0)? {
            self.store.remove_challenge(&challenge).await?;
        }
        let note = self.store.note(id.0)?;
        let (status, reason, headline) = match how {
            "posted" => (ReceiptStatus::Completed, None, format!("✅ {payer} paid {payee} {money}")),
            "expired" => (
                ReceiptStatus::Expired,
                Some(ReceiptReason::Timeout),
                format!("⌛ {payer}'s payment of {money} to {payee} expired without a PIN; nothing was paid"),
            ),
            _ => {
                let reason = note
                    .void_reason
                    .as_deref()
                    .map(reason_from_code)
                    .unwrap_or(ReceiptReason::Other);
                (
                    ReceiptStatus::Declined,
                    Some(reason),
                    format!("❌ {payer}'s payment of {money} to {payee} was cancelled; nothing was paid"),
                )
            }
        };
        let body = match &memo.note {
            Some(n) if how == "posted" => format!("{headline} ({n})."),
            _ => format!("{headline}."),
        };
        let (Ok(payer_id), Ok(payee_id), Ok(room), Ok(event)) = (
            OwnedUserId::try_from(payer.as_str()),
            OwnedUserId::try_from(payee.as_str()),
            OwnedRoomId::try_from(memo.room.as_str()),
            OwnedEventId::try_from(memo.event.as_str()),
        ) else {
            return Ok(false);
        };
        let receipt = |relates_to: OwnedEventId| ReceiptEventContent {
            body: body.clone(),
            status,
            reason,
            transfer_id: Some(id.0.to_string()),
            payer: payer_id.clone(),
            payee: payee_id.clone(),
            amount: amount_text.parse().unwrap_or_default(),
            currency: code.as_str().to_owned(),
            relates_to: Reference::new(relates_to),
        };
        let key = format!("{id}-{how}");
        // The room and the DM are told independently: a room the bot was kicked from must not
        // keep the payer's own receipt from them. A retry re-sends both with the same
        // transaction ids, so what already went is not shown twice.
        let room_told: Result<(), PaymentsError> = async {
            self.messenger
                .send(
                    &room,
                    "org.mxpay.receipt",
                    serde_json::to_value(receipt(event.clone())).expect("receipt serialises"),
                    txn("ob-room-receipt", &key),
                )
                .await?;
            self.messenger
                .notice(&room, &body, Some(&event), txn("ob-room-notice", &key))
                .await?;
            tracing::info!(transfer = %id, outcome = how, %room, "receipt sent to the room");
            match (status, reason) {
                (ReceiptStatus::Completed, _) => self.metrics.payment("completed", "none"),
                (ReceiptStatus::Expired, _) => self.metrics.payment("expired", "none"),
                (_, reason) => self.metrics.payment(
                    "declined",
                    reason_label(reason.unwrap_or(ReceiptReason::Other)),
                ),
            }
            Ok(())
        }
        .await;
        let dm_told: Result<(), PaymentsError> = async {
            if let Some(dm) = self.ready_dm(payer)? {
                if dm != room {
                    let relates_to = note_event(&note).unwrap_or(event.clone());
                    self.messenger
                        .send(
                            &dm,
                            "org.mxpay.receipt",
                            serde_json::to_value(receipt(relates_to)).expect("receipt serialises"),
                            txn("ob-dm-receipt", &key),
                        )
                        .await?;
                    self.messenger
                        .notice(&dm, &body, None, txn("ob-dm-notice", &key))
                        .await?;
                }
            }
            Ok(())
        }
        .await;
        match (room_told, dm_told) {
            (Ok(()), Ok(())) => Ok(true),
            // A retryable failure wins, so the outbox retries (and does not dead-letter).
            (Err(a), Err(b)) if !a.is_transient() && b.is_transient() => Err(b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }
}

/// How a PIN event says which challenge it answers.
#[derive(Debug, Default)]
struct PinAddress<'a> {
    /// `org.mxpay.stepup.response`'s `challenge_id`.
    challenge_id: Option<&'a str>,
    /// The event a plain PIN replies to (`m.relates_to.m.in_reply_to`), matched against each
    /// challenge's notice in the DM.
    reply_to: Option<&'a str>,
}

/// What a PIN event may confirm.
#[derive(Debug, PartialEq)]
enum PinTarget {
    /// Exactly this challenge.
    One(Challenge),
    /// A plain PIN while several challenges are open: the user must say which.
    Several(Vec<Challenge>),
    /// The PIN event is older than the step-up window, or older than every challenge it could
    /// answer (a late-decrypted or replayed PIN never confirms a later payment).
    TooOld,
    /// It names a challenge (by id or by reply) that is not open.
    Unknown,
    /// No challenge is open.
    NotWaiting,
}

/// Decides which challenge a PIN event answers; no I/O. `open` pairs each open challenge
/// (lapsed ones included when the PIN names one) with its DM notice's event id; `sent_ms` is
/// the PIN event's `origin_server_ts`.
///
/// A plain PIN confirms only when exactly one challenge was open when it was sent: with
/// several, guessing (the oldest, say) would pay whoever asked first, so the user is asked.
fn choose_challenge(
    open: Vec<(Challenge, Option<String>)>,
    address: &PinAddress<'_>,
    sent_ms: u64,
    now_ms: u64,
    stepup_timeout_ms: u64,
) -> PinTarget {
    if sent_ms.saturating_add(stepup_timeout_ms) <= now_ms {
        return PinTarget::TooOld;
    }
    let named = if let Some(id) = address.challenge_id {
        Some(open.iter().find(|(c, _)| c.challenge_id() == id))
    } else {
        address.reply_to.map(|reply_to| {
            open.iter()
                .find(|(_, notice)| notice.as_deref() == Some(reply_to))
        })
    };
    if let Some(named) = named {
        return match named.map(|(c, _)| c.clone()) {
            Some(challenge) if challenge.created_ms > sent_ms => PinTarget::TooOld,
            Some(challenge) => PinTarget::One(challenge),
            None => PinTarget::Unknown,
        };
    }
    let live: Vec<Challenge> = open
        .into_iter()
        .map(|(c, _)| c)
        .filter(|c| c.expires_at_ms > now_ms)
        .collect();
    let any_live = !live.is_empty();
    let mut eligible: Vec<Challenge> = live
        .into_iter()
        .filter(|c| c.created_ms <= sent_ms)
        .collect();
    match eligible.len() {
        0 if any_live => PinTarget::TooOld,
        0 => PinTarget::NotWaiting,
        1 => PinTarget::One(eligible.remove(0)),
        _ => PinTarget::Several(eligible),
    }
}

/// What to do with an event asking to start a payment or withdrawal.
#[derive(Debug, PartialEq)]
enum Start {
    /// It was declined before: repeat that decision (a retry after the reply failed).
    Repeat(DeclineRecord),
    /// What it started is still there (the payment's transfer, the withdrawal's open
    /// challenge): carry on with it, never refuse it now, late or not.
    Resume,
    /// It started a withdrawal whose challenge has ended since: it was told then.
    Ended,
    /// It never started anything and reached the bot too late.
    TooLate,
    /// It never started anything and is in time: check it and start.
    Fresh,
}

/// Decides how to treat an event asking to start a payment; no I/O. `earlier` is what was
/// recorded for the event, `started` whether what it started is still there, `sent_ms` its
/// `origin_server_ts`. Idempotence comes first: a replay of an event that was decided or
/// started is never judged as late; only an event that never started anything is, and it is
/// late once `window_ms` (the step-up timeout) has passed since it was sent: its payer could
/// not confirm it in time anyway, and a request hours old (a room key that arrived late, a
/// delayed delivery) must not move money as if it were new.
fn start_decision(
    earlier: Option<EventOutcome>,
    started: bool,
    sent_ms: u64,
    now_ms: u64,
    window_ms: u64,
) -> Start {
    match earlier {
        Some(EventOutcome::Declined(record)) => Start::Repeat(record),
        _ if started => Start::Resume,
        Some(EventOutcome::Started) => Start::Ended,
        _ if now_ms.saturating_sub(sent_ms) >= window_ms => Start::TooLate,
        _ => Start::Fresh,
    }
}

/// Swaps a PIN check tries to record its attempt before giving up (each lost swap means
/// another attempt or a reset moved the record).
const PIN_SWAPS_MAX: usize = 16;

/// A PIN check's result as stored per event.
fn attempt_of(result: &Result<(), PinError>) -> PinAttemptResult {
    match result {
        Ok(()) => PinAttemptResult::Matched,
        Err(PinError::Wrong { attempts_left }) => PinAttemptResult::Wrong {
            attempts_left: *attempts_left,
        },
        Err(PinError::Locked { remaining_ms }) => PinAttemptResult::Locked {
            remaining_ms: *remaining_ms,
        },
        Err(_) => PinAttemptResult::NotSet,
    }
}

/// A stored PIN attempt's result, as the check returned it.
fn result_of(attempt: PinAttemptResult) -> Result<(), PinError> {
    match attempt {
        PinAttemptResult::Matched => Ok(()),
        PinAttemptResult::Wrong { attempts_left } => Err(PinError::Wrong { attempts_left }),
        PinAttemptResult::Locked { remaining_ms } => Err(PinError::Locked { remaining_ms }),
        PinAttemptResult::NotSet => Err(PinError::NotSet),
    }
}

/// The PIN check of the PIN event `event_id` against the store, with the comparison
/// (`matches`: argon2id, slow) passed in. Both writes are compare-and-swap: the attempt is
/// recorded before comparing; the result is written only over the record the attempt wrote.
/// If the record changed meanwhile (an admin reset, a new PIN) the check aborts without
/// writing, so an old hash is never written back: `NotSet` when the PIN is gone or replaced
/// (the attempt was against a PIN that no longer counts).
///
/// One attempt per event, however often the event is handled: each swap also records, in the
/// same atomic write, where the event's attempt stands. Handled again after it finished (its
/// reply failed to send, a crash), the event gets its recorded result: no second count, no
/// second comparison. Handled again after it was counted but before it finished, it is
/// compared without being counted again.
async fn check_pin_with<F, Fut>(
    store: &PaymentStore,
    user: &str,
    event_id: &str,
    now_ms: u64,
    matches: F,
) -> Result<Result<(), PinError>, PaymentsError>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<bool, PaymentsError>>,
{
    let counted_as = match store.outcome(event_id)? {
        Some(EventOutcome::PinChecked { attempt }) => return Ok(result_of(attempt)),
        Some(EventOutcome::PinBegun { record_version }) => Some(record_version),
        _ => None,
    };
    let finished = |result: &Result<(), PinError>| EventOutcome::PinChecked {
        attempt: attempt_of(result),
    };
    let begun = match counted_as {
        Some(record_version) => match store.pin_versioned(user)? {
            // Still the record this event's attempt wrote: carry on with it.
            Some((record, bytes))
                if pin_version_tag(&bytes) == record_version && record.hash.is_some() =>
            {
                Some((record, bytes))
            }
            _ => {
                tracing::warn!(%user, "the PIN record changed during a check (reset?); the check is void");
                store
                    .put_outcome(event_id, &finished(&Err(PinError::NotSet)))
                    .await?;
                return Ok(Err(PinError::NotSet));
            }
        },
        None => {
            let mut begun = None;
            for _ in 0..PIN_SWAPS_MAX {
                let Some((mut record, version)) = store.pin_versioned(user)? else {
                    store
                        .put_outcome(event_id, &finished(&Err(PinError::NotSet)))
                        .await?;
                    return Ok(Err(PinError::NotSet));
                };
                if let Err(e) = record.begin_attempt(now_ms) {
                    // Locked or not set: refused without counting; the answer is kept so a
                    // retry says the same.
                    let refused = Err(e);
                    store.put_outcome(event_id, &finished(&refused)).await?;
                    return Ok(refused);
                }
                if let Some(written) = store
                    .swap_pin_recording(user, &version, &record, event_id, |record_version| {
                        EventOutcome::PinBegun { record_version }
                    })
                    .await?
                {
                    begun = Some((record, written));
                    break;
                }
            }
            begun
        }
    };
    let Some((mut record, written)) = begun else {
        return Err(StoreError::Corrupt {
            tree: "userid_pin",
            reason: "the PIN record kept changing during a check",
        }
        .into());
    };
    let hash = record.hash.clone().expect("begin_attempt checked the hash");
    let matched = matches(hash).await?;
    let result = record.finish_attempt(matched, now_ms);
    let outcome = finished(&result);
    if store
        .swap_pin_recording(user, &written, &record, event_id, |_| outcome)
        .await?
        .is_none()
    {
        tracing::warn!(%user, "the PIN record changed during a check (reset?); the check is void");
        store
            .put_outcome(event_id, &finished(&Err(PinError::NotSet)))
            .await?;
        return Ok(Err(PinError::NotSet));
    }
    Ok(result)
}

fn note_event(note: &TransferNote) -> Option<OwnedEventId> {
    note.dm_event_id
        .as_deref()
        .and_then(|e| OwnedEventId::try_from(e).ok())
}

fn binding_of(transfer: &Transfer, payer: &str) -> StepUpBinding {
    let payee = match &transfer.credit.owner {
        Owner::User(user) => user.clone(),
        other => other.to_string(),
    };
    let payer_owner = match &transfer.debit.owner {
        Owner::User(user) => user.clone(),
        other => other.to_string(),
    };
    debug_assert_eq!(payer_owner, payer);
    StepUpBinding {
        payer: payer_owner,
        payee,
        amount_minor: transfer.amount_minor,
        currency: transfer.debit.currency.to_string(),
        transfer_id: transfer.id.0.to_string(),
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The sentence for a PIN error (never names digits).
fn pin_error_sentence(error: &PinError) -> String {
    match error {
        PinError::Wrong { attempts_left } => format!(
            "Wrong PIN. {attempts_left} attempt{} left before your PIN locks.",
            if *attempts_left == 1 { "" } else { "s" }
        ),
        other => format!("{other}"),
    }
}

fn dialog_prompt(dialog: &Dialog) -> &'static str {
    match dialog {
        Dialog::NewPin { change: false, .. } => {
            "Choose a 4-digit PIN and send it here (only here: this chat is private and \
             encrypted). I delete each PIN message after reading it."
        }
        Dialog::NewPin { change: true, .. } => "Now send your new 4-digit PIN.",
        Dialog::ConfirmPin { .. } => "Send the same PIN again to confirm it.",
        Dialog::OldPin { .. } => "To change your PIN, first send your current PIN.",
        Dialog::AcceptIdentity { .. } => {
            "🔐 Your account's security keys changed (someone reset your cross-signing). If it \
             was you, send your PIN here to confirm; until then I take no payments from you. If \
             it was not you, do not send your PIN: someone else may control your account. Tell \
             the operator."
        }
    }
}

#[async_trait]
impl Deliver for Payments {
    async fn deliver(&self, entry: &ExportedEntry) -> Result<bool, DeliverError> {
        self.tell(entry).await.map_err(|e| {
            if e.is_transient() {
                DeliverError::Transient(e.to_string())
            } else {
                DeliverError::Permanent(e.to_string())
            }
        })
    }
}

/// Decrypts each transaction, hands payment events to [`Payments`], the rest to the crypto
/// handler (joins, `!help`).
pub struct PaymentsHandler {
    crypto: CryptoHandler,
    payments: Arc<Payments>,
}

impl PaymentsHandler {
    /// A handler over `crypto` (which also does the basic handling) and `payments`.
    pub fn new(crypto: CryptoHandler, payments: Arc<Payments>) -> Self {
        Self { crypto, payments }
    }
}

#[async_trait]
impl TransactionHandler for PaymentsHandler {
    async fn handle(&self, txn: &InboxTransaction) -> Result<(), HandlerError> {
        let ingested = match self.crypto.crypto().ingest(&txn.body).await {
            Ok(ingested) => ingested,
            Err(e) => {
                tracing::error!(txn_id = %txn.txn_id, error = %e, "cannot process the transaction's encryption data");
                return Err(HandlerError::transient(e));
            }
        };
        for event in &ingested.events {
            let span = tracing::info_span!("event", event_id = %event.event_id);
            let result = match self.payments.handle_event(event).instrument(span).await {
                Ok(true) => Ok(()),
                Ok(false) => self.crypto.handle_event(event).await,
                Err(e) if e.is_transient() => {
                    tracing::warn!(event_id = %event.event_id, error = %e, "payment handling failed; will retry");
                    Err(HandlerError::transient(e))
                }
                Err(e) => {
                    tracing::error!(event_id = %event.event_id, error = %e, "payment handling failed");
                    Ok(())
                }
            };
            // A late-decrypted event leaves the parked store only once handled.
            self.crypto.done_with(event, result)?;
        }
        Ok(())
    }
}

/// Starts the bot for `app`: with payments when `payments.enabled`, else the crypto handler
/// alone. Spawns the outbox (stopping on `shutdown`).
pub async fn start(
    app: &App,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<dyn TransactionHandler>, AppError> {
    let config = app.config();
    if !config.payments.enabled {
        return crate::crypto::handler::start(app, shutdown).await;
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
    let crypto = crate::crypto::handler::start_crypto(app, shutdown.clone()).await?;
    let mut commands = basic_commands();
    commands.extend(text::payment_commands());
    let crypto_handler =
        CryptoHandler::new(crypto.clone(), BasicHandler::new(app.client().clone()))
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
        .with_metrics(app.metrics().clone()),
    );
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
    Ok(Arc::new(PaymentsHandler::new(crypto_handler, payments)))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn open_challenge(id: u128, created_ms: u64) -> (Challenge, Option<String>) {
        let challenge = Challenge {
            kind: ChallengeKind::Pay,
            transfer_id: id,
            payer: "@alice:hs".into(),
            payee: format!("@payee{id}:hs"),
            amount_minor: 100 * id,
            amount: format!("{id}.00"),
            currency: "EUR".into(),
            room_id: "!room".into(),
            event_id: format!("$pay{id}"),
            memo: None,
            created_ms,
            expires_at_ms: created_ms + 120_000,
        };
        (challenge, Some(format!("$notice{id}")))
    }

    fn chosen(target: PinTarget) -> Option<u128> {
        match target {
            PinTarget::One(c) => Some(c.transfer_id),
            _ => None,
        }
    }

    const TIMEOUT_MS: u64 = 120_000;

    /// H1: a plain PIN with two payments open confirms neither (not the oldest).
    #[test]
    fn a_plain_pin_with_several_open_challenges_confirms_none() {
        let open = vec![open_challenge(1, 1_000), open_challenge(2, 2_000)];
        let target = choose_challenge(open, &PinAddress::default(), 3_000, 3_100, TIMEOUT_MS);
        match target {
            PinTarget::Several(list) => {
                assert_eq!(
                    list.iter().map(|c| c.transfer_id).collect::<Vec<_>>(),
                    [1, 2]
                )
            }
            other => panic!("expected Several, got {other:?}"),
        }
        // With exactly one open, a plain PIN confirms it.
        let one = choose_challenge(
            vec![open_challenge(2, 2_000)],
            &PinAddress::default(),
            3_000,
            3_100,
            TIMEOUT_MS,
        );
        assert_eq!(chosen(one), Some(2));
        assert_eq!(
            choose_challenge(vec![], &PinAddress::default(), 3_000, 3_100, TIMEOUT_MS),
            PinTarget::NotWaiting
        );
    }

    #[test]
    fn a_reply_or_a_challenge_id_picks_that_challenge() {
        let open = || vec![open_challenge(1, 1_000), open_challenge(2, 2_000)];
        let by_reply = PinAddress {
            challenge_id: None,
            reply_to: Some("$notice2"),
        };
        assert_eq!(
            chosen(choose_challenge(
                open(),
                &by_reply,
                3_000,
                3_100,
                TIMEOUT_MS
            )),
            Some(2)
        );
        let id = open_challenge(1, 0).0.challenge_id();
        let by_id = PinAddress {
            challenge_id: Some(&id),
            reply_to: Some("$notice2"),
        };
        assert_eq!(
            chosen(choose_challenge(open(), &by_id, 3_000, 3_100, TIMEOUT_MS)),
            Some(1),
            "challenge_id wins over a reply"
        );
        let gone = PinAddress {
            challenge_id: None,
            reply_to: Some("$notice9"),
        };
        assert_eq!(
            choose_challenge(open(), &gone, 3_000, 3_100, TIMEOUT_MS),
            PinTarget::Unknown
        );
    }

    /// A PIN sent before a challenge existed never confirms it; a PIN older than the step-up
    /// window confirms nothing.
    #[test]
    fn old_pin_events_confirm_nothing_later() {
        // Sent at 1_500: only challenge 1 existed then, so it answers 1 even with 2 open now.
        let open = || vec![open_challenge(1, 1_000), open_challenge(2, 2_000)];
        assert_eq!(
            chosen(choose_challenge(
                open(),
                &PinAddress::default(),
                1_500,
                2_100,
                TIMEOUT_MS
            )),
            Some(1)
        );
        // Sent before both.
        assert_eq!(
            choose_challenge(open(), &PinAddress::default(), 500, 2_100, TIMEOUT_MS),
            PinTarget::TooOld
        );
        // Naming a challenge created after the PIN was sent.
        let by_reply = PinAddress {
            challenge_id: None,
            reply_to: Some("$notice2"),
        };
        assert_eq!(
            choose_challenge(open(), &by_reply, 1_500, 2_100, TIMEOUT_MS),
            PinTarget::TooOld
        );
        // Older than the step-up window (a parked or late-delivered PIN).
        assert_eq!(
            choose_challenge(
                vec![open_challenge(1, 1_000)],
                &PinAddress::default(),
                1_500,
                1_500 + TIMEOUT_MS,
                TIMEOUT_MS
            ),
            PinTarget::TooOld
        );
    }

    /// M4: an admin reset landing while the PIN is being compared is not undone by the check
    /// writing its result (with the old hash) back.
    #[tokio::test]
    async fn a_reset_during_a_pin_check_is_not_undone() {
        use crate::admin::service::PinReset;
        let dir = tempfile::tempdir().unwrap();
        let store = PaymentStore::open(dir.path()).unwrap();
        store
            .put_pin("@a:hs", &PinRecord::new("$argon2id$old".into()))
            .await
            .unwrap();
        let during = store.clone();
        let result = check_pin_with(&store, "@a:hs", "$pin1", 1_000, |hash| async move {
            assert_eq!(hash, "$argon2id$old");
            // The admin reset lands while argon2 runs.
            assert_eq!(during.reset_pin("@a:hs").await, Ok(true));
            Ok(true)
        })
        .await
        .unwrap();
        assert_eq!(result, Err(PinError::NotSet), "the check is void");
        let record = store.pin("@a:hs").unwrap().unwrap();
        assert_eq!(record.hash, None, "the reset stands");
        assert_eq!(record.failed_in_row, 0);

        // Without a race the check records its result as before.
        store
            .put_pin("@a:hs", &PinRecord::new("$argon2id$new".into()))
            .await
            .unwrap();
        let wrong = check_pin_with(&store, "@a:hs", "$pin2", 1_000, |_| async { Ok(false) })
            .await
            .unwrap();
        assert!(matches!(wrong, Err(PinError::Wrong { .. })), "{wrong:?}");
        assert_eq!(store.pin("@a:hs").unwrap().unwrap().failed_in_row, 1);
    }

    async fn store_with_pin() -> (tempfile::TempDir, PaymentStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = PaymentStore::open(dir.path()).unwrap();
        store
            .put_pin("@a:hs", &PinRecord::new("$argon2id$h".into()))
            .await
            .unwrap();
        (dir, store)
    }

    fn failed_in_row(store: &PaymentStore) -> u32 {
        store.pin("@a:hs").unwrap().unwrap().failed_in_row
    }

    /// L2: a wrong PIN whose reply failed, handled again, counts once and is not compared
    /// again; another PIN event is a new attempt.
    #[tokio::test]
    async fn a_pin_event_handled_again_is_not_counted_again() {
        let (_dir, store) = store_with_pin().await;
        let first = check_pin_with(&store, "@a:hs", "$pin", 1_000, |_| async { Ok(false) })
            .await
            .unwrap();
        assert_eq!(first, Err(PinError::Wrong { attempts_left: 4 }));
        assert_eq!(failed_in_row(&store), 1);
        // The transaction is retried (its reply failed): same answer, no argon2, no count.
        for _ in 0..3 {
            let again = check_pin_with(&store, "@a:hs", "$pin", 2_000, |_| async {
                panic!("the PIN was compared again")
            })
            .await
            .unwrap();
            assert_eq!(again, Err(PinError::Wrong { attempts_left: 4 }));
        }
        assert_eq!(failed_in_row(&store), 1, "one event, one attempt");
        let other = check_pin_with(&store, "@a:hs", "$pin-2", 3_000, |_| async { Ok(false) })
            .await
            .unwrap();
        assert_eq!(other, Err(PinError::Wrong { attempts_left: 3 }));
        assert_eq!(failed_in_row(&store), 2);
        // A right PIN replayed after later attempts does not reset them again either.
        let right = check_pin_with(&store, "@a:hs", "$pin-3", 4_000, |_| async { Ok(true) })
            .await
            .unwrap();
        assert_eq!(right, Ok(()));
        assert_eq!(failed_in_row(&store), 0);
    }

    /// L2: an attempt counted but not finished (the comparison failed with a retryable error)
    /// is compared on the retry without being counted a second time.
    #[tokio::test]
    async fn a_pin_attempt_interrupted_after_counting_is_finished_without_counting_again() {
        let (_dir, store) = store_with_pin().await;
        // The comparison fails with a retryable error.
        let interrupt = |_| async {
            Err(PaymentsError::Store(StoreError::Corrupt {
                tree: "test",
                reason: "interrupted",
            }))
        };
        let interrupted = check_pin_with(&store, "@a:hs", "$pin", 1_000, interrupt).await;
        assert!(interrupted.is_err());
        assert_eq!(failed_in_row(&store), 1, "counted before comparing");
        let retried = check_pin_with(&store, "@a:hs", "$pin", 2_000, |_| async { Ok(false) })
            .await
            .unwrap();
        assert_eq!(retried, Err(PinError::Wrong { attempts_left: 4 }));
        assert_eq!(failed_in_row(&store), 1, "not counted twice");

        // Interrupted, then the admin reset the PIN: the retry is void.
        let interrupted = check_pin_with(&store, "@a:hs", "$pin-2", 3_000, interrupt).await;
        assert!(interrupted.is_err());
        {
            use crate::admin::service::PinReset;
            assert_eq!(store.reset_pin("@a:hs").await, Ok(true));
        }
        let retried = check_pin_with(&store, "@a:hs", "$pin-2", 4_000, |_| async {
            panic!("compared against a reset PIN")
        })
        .await
        .unwrap();
        assert_eq!(retried, Err(PinError::NotSet));
    }

    fn declined(reason: &str) -> EventOutcome {
        EventOutcome::Declined(DeclineRecord {
            reason: reason.into(),
            sentence: "your balance does not cover this payment".into(),
            payee: "@bob:hs".into(),
            amount: "5".into(),
            currency: "EUR".into(),
        })
    }

    /// M1 and L1: idempotence first, then staleness, and only for events that started nothing.
    #[test]
    fn late_requests_start_nothing_but_replays_carry_on() {
        let window_ms = 120_000;
        let sent_ms = 1_000_000;
        use crate::clock::Clock as _;
        let clock = crate::clock::ManualClock::new(sent_ms + 5_000);
        let decide =
            |earlier, started| start_decision(earlier, started, sent_ms, clock.now_ms(), window_ms);
        // In time.
        assert_eq!(decide(None, false), Start::Fresh);
        // Two hours later (a room key that arrived late).
        clock.advance_ms(2 * 3_600_000);
        assert_eq!(decide(None, false), Start::TooLate);
        // ... but a replay of one that already made its transfer / opened its challenge
        // carries on, and one that was declined repeats that decision.
        assert_eq!(decide(None, true), Start::Resume);
        let record = match declined("insufficient_funds") {
            EventOutcome::Declined(record) => record,
            _ => unreachable!(),
        };
        assert_eq!(
            decide(Some(declined("insufficient_funds")), false),
            Start::Repeat(record.clone())
        );
        assert_eq!(
            decide(Some(declined("insufficient_funds")), true),
            Start::Repeat(record),
            "a recorded decision is never made again"
        );
        // A withdrawal that was started and whose challenge has ended: nothing to say.
        assert_eq!(decide(Some(EventOutcome::Started), false), Start::Ended);
        assert_eq!(decide(Some(EventOutcome::Started), true), Start::Resume);
        // The edge: exactly the window is late (as for PINs).
        clock.set_ms(sent_ms + window_ms - 1);
        assert_eq!(decide(None, false), Start::Fresh);
        clock.set_ms(sent_ms + window_ms);
        assert_eq!(decide(None, false), Start::TooLate);
        assert_eq!(reason_label(ReceiptReason::TooLate), "too_late");
        assert_eq!(reason_code(ReceiptReason::TooLate), "too_late");
    }

    #[test]
    fn pin_sentences_never_hold_digits_and_say_how_long() {
        let locked = pin_error_sentence(&PinError::Locked {
            remaining_ms: 60_000,
        });
        assert!(locked.contains("60 seconds"), "{locked}");
        assert!(
            pin_error_sentence(&PinError::Wrong { attempts_left: 1 }).contains("1 attempt left")
        );
        assert_eq!(capitalise("pin locked"), "Pin locked");
    }
}
