//! The admin operations against the ledger, with no HTTP in them: top-ups (API and provider),
//! withdrawal settlement, freezes, reads. [`super::api`] authenticates and audits around them.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::events::{self, Claim, EventStore};
use super::revoked::{RevokedError, RevokedTokens, MINT_CLOCK_SKEW_S};
use super::settings::AdminSettings;
use super::token::{check_times, is_valid_jti, AdminClaims, AdminKey, TokenAuthority, TokenError};
use super::views::{AccountJson, TransferJson};
use super::webhook::{self, WebhookEvent, WebhookSecret};
use super::AdminError;
use crate::audit::AuditLog;
use crate::clock::SharedClock;
use crate::flood::RefusalGate;
use crate::ledger::{
    AccountId, FreezeMode, HistoryCursor, Ledger, LedgerError, Owner, Transfer, TransferError,
    TransferId, TransferKind, TransferRequest,
};
use crate::merchants::{KeyAuthority, MerchantStore};

/// Longest idempotency key or provider event id, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// Longest free-text note on a top-up, in bytes.
pub const NOTE_BYTES_MAX: usize = 512;

/// Default and largest history page.
pub const HISTORY_PAGE_DEFAULT: usize = 50;

/// The audit log's file name in the data directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// The admin database's directory in the data directory: webhook events and revoked tokens.
pub const EVENTS_DIR: &str = "admin";

/// The merchant registry's directory in the data directory (merchants, their keys).
pub const MERCHANTS_DIR: &str = "merchants";

/// A PIN store the admin API can reset PINs in (implemented by the payments layer).
#[async_trait::async_trait]
pub trait PinReset: Send + Sync + 'static {
    /// Forgets `user_id`'s PIN: the user must set a new one before paying again. With
    /// `accept_new_keys`, also records (durably, after the PIN is forgotten) that the operator
    /// confirmed the user's current cross-signing identity, so their next `!pin set` accepts
    /// it, whether or not they had a PIN record. Returns whether the user had a PIN.
    ///
    /// A failure may come after the PIN was forgotten and before the confirmation was
    /// recorded: the caller retries the whole reset (both halves are idempotent).
    async fn reset_pin_with(&self, user_id: &str, accept_new_keys: bool) -> Result<bool, String>;

    /// [`PinReset::reset_pin_with`] without confirming new keys: only the PIN is forgotten.
    async fn reset_pin(&self, user_id: &str) -> Result<bool, String> {
        self.reset_pin_with(user_id, false).await
    }
}

/// What a PIN reset did, as the admin API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinResetResponse {
    /// The user.
    pub user_id: String,
    /// Whether the user had a PIN before the reset.
    pub had_pin: bool,
    /// Whether the reset also confirmed the user's current cross-signing identity: their next
    /// `!pin set` accepts it.
    pub accept_new_keys: bool,
}

/// The admin API's state: the ledger, keys, audit log and provider secrets.
pub struct AdminState {
    pub(crate) ledger: Ledger,
    pub(crate) tokens: TokenAuthority,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) providers: HashMap<String, WebhookSecret>,
    pub(crate) events: EventStore,
    pub(crate) revoked: RevokedTokens,
    pub(crate) token_ttl_max_s: u64,
    pub(crate) clock: SharedClock,
    pub(crate) webhook_tolerance_s: u64,
    pub(crate) pins: std::sync::OnceLock<Arc<dyn PinReset>>,
    pub(crate) webhooks: std::sync::OnceLock<crate::webhooks::WebhookOutbox>,
    pub(crate) refusals: Arc<RefusalGate>,
    pub(crate) merchants: MerchantStore,
    pub(crate) merchant_keys: Arc<KeyAuthority>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut providers: Vec<&String> = self.providers.keys().collect();
        providers.sort();
        f.debug_struct("AdminState")
            .field("tokens", &self.tokens)
            .field("providers", &providers)
            .finish_non_exhaustive()
    }
}

/// A top-up asked for through the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopupRequest {
    /// The wallet owner, a Matrix user ID.
    pub user_id: String,
    /// Amount in major units, as a string (`"12.50"`).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO code of a configured currency.
    pub currency: String,
    /// The caller's key for this top-up: the same key never credits twice.
    pub idempotency_key: String,
    /// Free text kept with the transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A top-up's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopupResponse {
    /// The ledger transfer from the issuer to the user.
    pub transfer: TransferJson,
}

/// What a webhook did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookResponse {
    /// The provider's event id.
    pub event_id: String,
    /// `credited`, `settled` or `rejected`.
    pub result: String,
    /// Whether this event id was received before (with the same body); nothing moved again.
    pub replay: bool,
    /// The ledger transfer.
    pub transfer: TransferJson,
}

/// What revoking a token did, as the admin API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// The revoked token id.
    pub jti: String,
    /// Always true: the token is refused from now on.
    pub revoked: bool,
    /// Whether it was revoked before this call (nothing changed then).
    pub already: bool,
    /// When it was (first) revoked, ms since the Unix epoch.
    pub revoked_at_ms: u64,
}

/// The outcome of a settlement call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Paid out: post the pending withdrawal.
    Settle,
    /// Failed at the provider: void it, the funds return to the user.
    Reject,
}

/// Parses a Matrix user ID once, at the edge.
pub fn parse_user_id(user_id: &str) -> Result<ruma::OwnedUserId, AdminError> {
    ruma::UserId::parse(user_id).map_err(|_| AdminError::InvalidUserId(user_id.to_owned()))
}

/// The ledger owner of a user's wallet: the full Matrix user ID.
pub fn user_owner(user_id: &ruma::UserId) -> Owner {
    Owner::user(user_id.as_str())
}

/// The ledger transfer id of an API top-up with `key`.
pub fn api_topup_id(key: &str) -> TransferId {
    TransferId::from_key(&format!("topup:api:{key}"))
}

/// The ledger transfer id of a provider top-up event.
pub fn provider_topup_id(provider: &str, event_id: &str) -> TransferId {
    TransferId::from_key(&format!("topup:{provider}:{event_id}"))
}

/// Parses a transfer id: 32 hex digits.
pub fn parse_transfer_id(text: &str) -> Result<TransferId, AdminError> {
    if text.len() != 32 {
        return Err(AdminError::InvalidParam(format!(
            "`{text}` is not a transfer id (32 hex digits)"
        )));
    }
    u128::from_str_radix(text, 16)
        .ok()
        .filter(|&id| id != 0)
        .map(TransferId)
        .ok_or_else(|| AdminError::InvalidParam(format!("`{text}` is not a transfer id")))
}

fn check_key(what: &str, key: &str) -> Result<(), AdminError> {
    if key.is_empty()
        || key.len() > IDEMPOTENCY_KEY_BYTES_MAX
        || key.chars().any(|c| c.is_control())
    {
        return Err(AdminError::InvalidParam(format!(
            "{what} must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

impl AdminState {
    /// Opens the admin API from its config: reads the token key and provider secrets, opens
    /// the audit log (`<data_dir>/audit.jsonl`) and the webhook event store
    /// (`<data_dir>/admin/`). `None` when the admin API is off (no `admin.token`).
    pub fn open(
        settings: &AdminSettings,
        data_dir: &Path,
        ledger: Ledger,
        clock: SharedClock,
    ) -> Result<Option<Self>, AdminError> {
        let Some(key) = settings
            .load_token_key(false)
            .map_err(|e| AdminError::InvalidParam(e.to_string()))?
        else {
            return Ok(None);
        };
        let providers = settings
            .load_providers()
            .map_err(|e| AdminError::InvalidParam(e.to_string()))?;
        Self::new(
            &key,
            providers,
            settings.webhook_tolerance_s,
            data_dir,
            ledger,
            clock,
        )
        .map(|state| {
            Some(
                state
                    .with_token_ttl_max_s(settings.token_ttl_max_s)
                    .with_refused_call_limits(
                        settings.refused_calls_per_peer_per_min,
                        settings.refused_calls_per_min,
                    ),
            )
        })
    }

    /// Builds the state from loaded key material (tests use it directly). Tokens may live up
    /// to the default `admin.token_ttl_max_s`; see [`AdminState::with_token_ttl_max_s`].
    pub fn new(
        key: &AdminKey,
        providers: Vec<(String, WebhookSecret)>,
        webhook_tolerance_s: u64,
        data_dir: &Path,
        ledger: Ledger,
        clock: SharedClock,
    ) -> Result<Self, AdminError> {
        let tokens = TokenAuthority::new(key, clock.clone())
            .map_err(|e| AdminError::InvalidParam(format!("admin.token: {e}")))?;
        // Every way of building the state (config or tests) passes here, so a short provider
        // secret is refused at startup rather than guarding top-ups weakly.
        for (name, secret) in &providers {
            secret
                .check_len()
                .map_err(|e| AdminError::InvalidParam(format!("admin.providers `{name}`: {e}")))?;
        }
        std::fs::create_dir_all(data_dir).map_err(|e| {
            AdminError::internal(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let audit_path = data_dir.join(AUDIT_FILE);
        let audit = AuditLog::open(&audit_path).map_err(|e| {
            AdminError::internal(format!(
                "cannot open the audit log {}: {e}",
                audit_path.display()
            ))
        })?;
        let events_dir = data_dir.join(EVENTS_DIR);
        let cannot_open = |e: &dyn std::fmt::Display| {
            AdminError::internal(format!("cannot open {}: {e}", events_dir.display()))
        };
        let db = events::open_db(&events_dir).map_err(|e| cannot_open(&e))?;
        let events = EventStore::with_db(&db).map_err(|e| cannot_open(&e))?;
        let revoked = RevokedTokens::with_db(&db).map_err(|e| cannot_open(&e))?;
        let merchants_dir = data_dir.join(MERCHANTS_DIR);
        let merchants = MerchantStore::open(&merchants_dir).map_err(|e| {
            AdminError::internal(format!("cannot open {}: {e:?}", merchants_dir.display()))
        })?;
        let merchant_keys = Arc::new(super::merchants::merchant_key_authority(
            key,
            clock.clone(),
        )?);
        let defaults = AdminSettings::default();
        let refusals = Arc::new(refusal_gate(
            defaults.refused_calls_per_peer_per_min,
            defaults.refused_calls_per_min,
            &clock,
        ));
        Ok(Self {
            refusals,
            ledger,
            tokens,
            audit: Arc::new(audit),
            providers: providers.into_iter().collect(),
            events,
            revoked,
            token_ttl_max_s: AdminSettings::default().token_ttl_max_s,
            clock,
            webhook_tolerance_s,
            pins: std::sync::OnceLock::new(),
            merchants,
            merchant_keys,
            webhooks: std::sync::OnceLock::new(),
        })
    }

    /// Sets the longest lifetime (`exp - iat`, seconds) a token may have to be accepted
    /// (`admin.token_ttl_max_s`); revocations are kept that long (plus a clock margin).
    pub fn with_token_ttl_max_s(mut self, token_ttl_max_s: u64) -> Self {
        self.token_ttl_max_s = token_ttl_max_s;
        self
    }

    /// Sets how many refused calls a minute are answered and audited from one peer and from
    /// all (`admin.refused_calls_per_peer_per_min`, `admin.refused_calls_per_min`; 0 counts
    /// as 1); more get 429 without an audit line of their own.
    pub fn with_refused_call_limits(mut self, per_peer_per_min: u32, total_per_min: u32) -> Self {
        self.refusals = Arc::new(refusal_gate(per_peer_per_min, total_per_min, &self.clock));
        self
    }

    /// The checks on an authenticated token that need the server's state: its times
    /// ([`check_times`]: not issued in the future, lifetime and expiry within
    /// `admin.token_ttl_max_s`, which is what makes forgetting old revocations safe), and its id
    /// is not revoked. A store failure refuses the call (500), never lets it pass.
    pub fn check_token(&self, claims: &AdminClaims) -> Result<(), AdminError> {
        check_times(claims, self.clock.now_ms() / 1000, self.token_ttl_max_s)?;
        match self.revoked.is_revoked(&claims.jti) {
            Ok(false) => Ok(()),
            Ok(true) => {
                // A genuine token under a revoked id: keep the revocation until this token
                // expires, whatever the default keep time (a write only when it moves later).
                let exp_ms = claims.exp.saturating_mul(1000);
                if let Err(e) = self.revoked.keep_until(&claims.jti, exp_ms) {
                    return Err(AdminError::internal(e));
                }
                Err(TokenError::Revoked.into())
            }
            Err(e) => Err(AdminError::internal(e)),
        }
    }

    /// Revokes the admin token with id `jti`, durably: every later call with it gets 401
    /// `M_UNKNOWN_TOKEN`, also after a restart. Idempotent. Any id is accepted (mxpay cannot
    /// know every token minted with its key); the entry is forgotten once every token minted
    /// before the revocation has expired.
    pub async fn revoke_token(&self, jti: &str) -> Result<RevokeResponse, AdminError> {
        self.revoke_token_until(jti, None).await
    }

    /// [`AdminState::revoke_token`], keeping the revocation at least until `token_exp_s` (the
    /// revoked token's own `exp`, when mxpay holds that token: a token revoking itself).
    pub async fn revoke_token_until(
        &self,
        jti: &str,
        token_exp_s: Option<u64>,
    ) -> Result<RevokeResponse, AdminError> {
        if !is_valid_jti(jti) {
            return Err(AdminError::InvalidParam(format!(
                "a token id must be 1 to {} bytes without control characters",
                super::token::JTI_BYTES_MAX
            )));
        }
        let now_ms = self.clock.now_ms();
        let keep_ms = self
            .token_ttl_max_s
            .saturating_add(MINT_CLOCK_SKEW_S)
            .saturating_mul(1000);
        let revoked = self.revoked.clone();
        let id = jti.to_owned();
        let done = tokio::task::spawn_blocking(move || {
            let done = revoked.revoke(&id, now_ms, keep_ms)?;
            if let Some(exp_s) = token_exp_s {
                revoked.keep_until(&id, exp_s.saturating_mul(1000))?;
            }
            Ok(done)
        })
        .await
        .map_err(AdminError::internal)?
        .map_err(|e| match e {
            RevokedError::Full => AdminError::RevocationsFull,
            other => AdminError::internal(other),
        })?;
        // The id is not a secret (the token is, and is never logged).
        tracing::info!(jti, already = done.already, "admin token revoked");
        Ok(RevokeResponse {
            jti: jti.to_owned(),
            revoked: true,
            already: done.already,
            revoked_at_ms: done.revocation.revoked_at_ms,
        })
    }

    /// Lets the admin API reset PINs in `pins` (the payments layer's PIN store, opened after
    /// the admin API). Only the first call counts; until then `pin-reset` answers 501.
    pub fn set_pin_reset(&self, pins: Arc<dyn PinReset>) {
        let _ = self.pins.set(pins);
    }

    /// The merchant registry.
    pub fn merchants(&self) -> &MerchantStore {
        &self.merchants
    }

    /// Mints and checks merchant API keys (signed with the admin token key).
    pub fn merchant_keys(&self) -> &Arc<KeyAuthority> {
        &self.merchant_keys
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The token authority (mints and verifies admin tokens).
    pub fn tokens(&self) -> &TokenAuthority {
        &self.tokens
    }

    /// The limits on refused calls, shared with the merchant API: a peer probing keys counts
    /// once against both.
    pub fn refusal_gate(&self) -> &Arc<RefusalGate> {
        &self.refusals
    }

    /// The audit log.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    fn transfer_json(&self, t: &Transfer) -> TransferJson {
        TransferJson::new(self.ledger.currencies(), t)
    }

    /// Credits a user from the currency's issuer account. The same key with the same request
    /// returns the original transfer; with a different request it is refused.
    pub async fn topup(&self, request: &TopupRequest) -> Result<TopupResponse, AdminError> {
        check_key("idempotency_key", &request.idempotency_key)?;
        let user = parse_user_id(&request.user_id)?;
        if request
            .note
            .as_ref()
            .is_some_and(|n| n.len() > NOTE_BYTES_MAX)
        {
            return Err(AdminError::InvalidParam(format!(
                "note must be at most {NOTE_BYTES_MAX} bytes"
            )));
        }
        let amount = self
            .ledger
            .parse_amount(request.amount, &request.currency)?;
        let memo = serde_json::json!({
            "type": "topup",
            "source": "api",
            "ref": request.idempotency_key,
            "note": request.note,
        });
        let transfer = self
            .ledger
            .create_transfer(TransferRequest {
                reference: 0,
                id: api_topup_id(&request.idempotency_key),
                debit: Owner::Issuer,
                credit: user_owner(&user),
                amount,
                memo: memo.to_string().into_bytes(),
            })
            .await?;
        Ok(TopupResponse {
            transfer: self.transfer_json(&transfer),
        })
    }

    /// Handles a signed provider webhook: checks provider, signature and timestamp, claims the
    /// event id (refusing a different body under a used id), then applies it. Returns the
    /// audit target with the answer.
    pub async fn webhook(
        &self,
        provider: &str,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<WebhookResponse, AdminError> {
        let secret = self
            .providers
            .get(provider)
            .ok_or_else(|| AdminError::UnknownProvider(provider.to_owned()))?;
        let now_s = self.clock.now_ms() / 1000;
        let event = webhook::verify(secret, signature, body, now_s, self.webhook_tolerance_s)?;
        let event_id = event.event_id().to_owned();
        check_key("event_id", &event_id)?;
        // Check what can be checked before claiming, so a malformed event does not spend its id.
        if let WebhookEvent::TopupSucceeded {
            user_id,
            amount,
            currency,
            ..
        } = &event
        {
            parse_user_id(user_id)?;
            self.ledger.parse_amount(*amount, currency)?;
        }
        let events = self.events.clone();
        let (p, e, b) = (provider.to_owned(), event_id.clone(), body.to_vec());
        let claim = tokio::task::spawn_blocking(move || events.claim(&p, &e, &b))
            .await
            .map_err(AdminError::internal)?
            .map_err(AdminError::internal)?;
        let replay = match claim {
            Claim::New => false,
            Claim::Replay => true,
            Claim::Conflict => return Err(AdminError::EventConflict(event_id)),
        };
        let (result, transfer) = match event {
            WebhookEvent::TopupSucceeded {
                user_id,
                amount,
                currency,
                ..
            } => {
                let user = parse_user_id(&user_id)?;
                let amount = self.ledger.parse_amount(amount, &currency)?;
                let memo = serde_json::json!({
                    "type": "topup",
                    "source": format!("provider:{provider}"),
                    "ref": event_id,
                });
                let transfer = self
                    .ledger
                    .create_transfer(TransferRequest {
                        reference: 0,
                        id: provider_topup_id(provider, &event_id),
                        debit: Owner::Issuer,
                        credit: user_owner(&user),
                        amount,
                        memo: memo.to_string().into_bytes(),
                    })
                    .await?;
                ("credited", transfer)
            }
            WebhookEvent::WithdrawalSettled { withdrawal_id, .. } => (
                "settled",
                self.settle(&withdrawal_id, Settlement::Settle).await?,
            ),
            WebhookEvent::WithdrawalRejected { withdrawal_id, .. } => (
                "rejected",
                self.settle(&withdrawal_id, Settlement::Reject).await?,
            ),
        };
        Ok(WebhookResponse {
            event_id,
            result: result.to_owned(),
            replay,
            transfer: self.transfer_json(&transfer),
        })
    }

    /// Posts (settle) or voids (reject) a pending withdrawal: a pending transfer from a user
    /// to the settlement account. Repeating the same outcome returns the same transfer.
    pub async fn settle(
        &self,
        withdrawal_id: &str,
        outcome: Settlement,
    ) -> Result<Transfer, AdminError> {
        let id = parse_transfer_id(withdrawal_id)?;
        let not_found = || AdminError::NotFound(format!("no withdrawal with id {withdrawal_id}"));
        let transfer = self.ledger.transfer(id).await?.ok_or_else(not_found)?;
        if !matches!(transfer.kind, TransferKind::Pending { .. })
            || transfer.credit.owner != Owner::Settlement
            || transfer.debit.owner.is_system()
        {
            return Err(not_found());
        }
        // A freeze of the wallet does not stop this: the money was reserved before it (see
        // docs/ledger.md, Freezing).
        let result = match outcome {
            Settlement::Settle => self.ledger.post(id, None).await,
            Settlement::Reject => self.ledger.void(id).await,
        };
        if let (Settlement::Settle, Err(LedgerError::Rejected(error))) = (outcome, &result) {
            // The payout happened outside mxpay but the ledger refused to record it (most
            // likely the withdrawal expired first, returning the money to the wallet): an
            // operator must reconcile by hand.
            tracing::error!(
                withdrawal_id,
                %error,
                "a paid-out withdrawal could not be settled; reconcile it by hand"
            );
        }
        Ok(result?)
    }

    /// The accounts of a user, one per currency used.
    pub async fn accounts(&self, user_id: &str) -> Result<Vec<AccountJson>, AdminError> {
        let user = parse_user_id(user_id)?;
        let views = self.ledger.balances(&user_owner(&user)).await?;
        Ok(views
            .iter()
            .map(|v| AccountJson::new(self.ledger.currencies(), v))
            .collect())
    }

    /// One page of a user's transfers, newest first, and the cursor for older ones.
    pub async fn history(
        &self,
        user_id: &str,
        from: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<TransferJson>, Option<u64>), AdminError> {
        let user = parse_user_id(user_id)?;
        let page = self
            .ledger
            .history(
                &user_owner(&user),
                from.map(HistoryCursor::from_raw),
                limit.clamp(1, crate::ledger::HISTORY_PAGE_MAX),
            )
            .await?;
        Ok((
            page.transfers
                .iter()
                .map(|t| self.transfer_json(t))
                .collect(),
            page.next.map(HistoryCursor::to_raw),
        ))
    }

    /// Freezes (`Some(mode)`) or unfreezes (`None`) every configured currency's account of a
    /// user, so a freeze also covers currencies the user has not used yet.
    pub async fn set_frozen(
        &self,
        user_id: &str,
        mode: Option<FreezeMode>,
    ) -> Result<Vec<AccountJson>, AdminError> {
        let user = parse_user_id(user_id)?;
        let owner = user_owner(&user);
        for currency in self.ledger.currencies().iter() {
            let account = AccountId {
                owner: owner.clone(),
                currency: currency.code,
            };
            match mode {
                Some(mode) => self.ledger.freeze(account, mode).await?,
                None => self.ledger.unfreeze(account).await?,
            }
        }
        self.accounts(user_id).await
    }

    /// Every pending transfer, oldest deadline first.
    pub async fn pending(&self) -> Result<Vec<TransferJson>, AdminError> {
        let pending = self.ledger.pending_transfers().await?;
        Ok(pending.iter().map(|t| self.transfer_json(t)).collect())
    }

    /// One transfer.
    pub async fn transfer(&self, id: &str) -> Result<TransferJson, AdminError> {
        let parsed = parse_transfer_id(id)?;
        let transfer = self
            .ledger
            .transfer(parsed)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("no transfer with id {id}")))?;
        Ok(self.transfer_json(&transfer))
    }

    /// Runs the ledger's full verification. A broken journal or invariant is an answer
    /// (`ok: false` with what is wrong), not an API failure.
    pub async fn verify(&self) -> Result<serde_json::Value, AdminError> {
        match self.ledger.verify().await {
            Ok(r) => Ok(serde_json::json!({
                "ok": true,
                "records": r.records,
                "entries": r.entries,
                "accounts": r.accounts,
                "transfers": r.transfers,
                "pending": r.pending,
            })),
            Err(e @ (LedgerError::Corrupt { .. } | LedgerError::Invariant(_))) => {
                tracing::error!(error = %e, "ledger verification failed");
                Ok(serde_json::json!({ "ok": false, "error": e.to_string() }))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Resets a user's PIN through the payments layer's PIN store; with `accept_new_keys`,
    /// also confirms the user's current cross-signing identity for their next `!pin set`
    /// (only after the operator checked out of band that the person reset it themself).
    pub async fn reset_pin(
        &self,
        user_id: &str,
        accept_new_keys: bool,
    ) -> Result<PinResetResponse, AdminError> {
        let user = parse_user_id(user_id)?;
        let pins = self.pins.get().ok_or(AdminError::PinResetUnavailable)?;
        let had_pin = pins
            .reset_pin_with(user.as_str(), accept_new_keys)
            .await
            .map_err(AdminError::internal)?;
        Ok(PinResetResponse {
            user_id: user_id.to_owned(),
            had_pin,
            accept_new_keys,
        })
    }
}

fn refusal_gate(per_peer_per_min: u32, total_per_min: u32, clock: &SharedClock) -> RefusalGate {
    let at_least_one = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    RefusalGate::new(
        at_least_one(per_peer_per_min),
        at_least_one(total_per_min),
        clock.clone(),
    )
}

impl From<TransferError> for AdminError {
    fn from(e: TransferError) -> Self {
        LedgerError::Rejected(e).into()
    }
}
