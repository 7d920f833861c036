//! Invoices and their refunds, the pure part: checking a create or refund body, the
//! Stripe-style idempotency rule, the state changes, the refund cap, and which webhook events
//! a change produces. No I/O, no `async`; time is `now_ms`.
//!
//! An invoice is a payment request with a merchant behind it. Its id is derived from the
//! merchant and the idempotency key, so a retried create finds the invoice it made before;
//! a refund's ledger transfer id is derived from the invoice and the refund's idempotency key,
//! so a retried refund never pays twice (the ledger answers `Exists`).

use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::events::{
    invoice_event_id, refund_event_id, INVOICE_CANCELLED, INVOICE_EXPIRED, INVOICE_PAID,
    REFUND_SUCCEEDED,
};
use super::model::MerchantId;
use crate::ledger::{AmountError, Currencies, Transfer, TransferId, TransferState};

/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Longest description, in characters.
pub const DESCRIPTION_CHARS_MAX: usize = 500;
/// Longest order reference, in characters.
pub const ORDER_REF_CHARS_MAX: usize = 200;
/// Longest refund reason, in characters.
pub const REASON_CHARS_MAX: usize = 500;
/// Shortest lifetime of an invoice by default, in seconds (`merchants.invoice_expires_in_s_min`
/// lowers or raises it).
pub const EXPIRES_IN_S_MIN: u64 = 60;
/// See [`EXPIRES_IN_S_MIN`].
pub const EXPIRES_IN_S_MAX: u64 = 30 * 24 * 3600;
/// Lifetime of an invoice without `expires_in_s`, in seconds (one day).
pub const EXPIRES_IN_S_DEFAULT: u64 = 24 * 3600;
/// Most refunds of one invoice.
pub const REFUNDS_PER_INVOICE_MAX: usize = 20;

/// Why an invoice or refund call is refused. Stable snake_case [`InvoiceRefusal::reason`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvoiceRefusal {
    /// `room_id` does not parse.
    #[error("`room_id` is not a valid Matrix room ID")]
    RoomIdInvalid,
    /// `payer` does not parse.
    #[error("`payer` is not a valid Matrix user ID")]
    PayerInvalid,
    /// The amount is not positive, has more decimals than the currency, or is above its
    /// largest transfer.
    #[error("invalid amount: {0}")]
    AmountInvalid(String),
    /// The currency is not configured.
    #[error("unknown currency `{0}`")]
    CurrencyUnknown(String),
    /// The description is empty, too long or has control characters.
    #[error(
        "`description` must be 1 to {DESCRIPTION_CHARS_MAX} characters without control characters"
    )]
    DescriptionInvalid,
    /// The order reference is empty, too long or has control characters.
    #[error(
        "`order_ref` must be 1 to {ORDER_REF_CHARS_MAX} characters without control characters"
    )]
    OrderRefInvalid,
    /// The refund reason is empty, too long or has control characters.
    #[error("`reason` must be 1 to {REASON_CHARS_MAX} characters without control characters")]
    ReasonInvalid,
    /// The idempotency key is empty, too long or has control characters.
    #[error("`idempotency_key` must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes without control characters")]
    IdempotencyKeyInvalid,
    /// `expires_in_s` is out of range.
    #[error("`expires_in_s` must be {min_s} to {EXPIRES_IN_S_MAX}")]
    ExpiryInvalid {
        /// The shortest lifetime allowed here, in seconds.
        min_s: u64,
    },
    /// The idempotency key was used with another body.
    #[error("the idempotency key was already used with a different request")]
    IdempotencyConflict,
    /// No invoice with this id for this merchant.
    #[error("no such invoice")]
    InvoiceUnknown,
    /// A refund of an invoice that is not paid.
    #[error("the invoice is not paid")]
    InvoiceNotPaid,
    /// A refund above what was paid minus earlier refunds.
    #[error("the refund is above what remains of the payment ({remaining})")]
    RefundAboveRemaining {
        /// What remains, in major units with the currency.
        remaining: String,
    },
    /// [`REFUNDS_PER_INVOICE_MAX`] refunds already.
    #[error("this invoice has the most refunds it may have")]
    RefundsFull,
    /// Above the merchant's own largest invoice in this currency.
    #[error("the amount is above this merchant's largest invoice ({max})")]
    AboveMerchantLimit {
        /// The limit, in major units with the currency.
        max: String,
    },
    /// The merchant has as many open invoices as its limit allows.
    #[error("this merchant has {max} open invoices, its limit; wait until some are paid or end")]
    TooManyOpenInvoices {
        /// The limit.
        max: u64,
    },
}

impl InvoiceRefusal {
    /// The stable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::RoomIdInvalid => "room_id_invalid",
            Self::PayerInvalid => "payer_invalid",
            Self::AmountInvalid(_) => "amount_invalid",
            Self::CurrencyUnknown(_) => "currency_unknown",
            Self::DescriptionInvalid => "description_invalid",
            Self::OrderRefInvalid => "order_ref_invalid",
            Self::ReasonInvalid => "reason_invalid",
            Self::IdempotencyKeyInvalid => "idempotency_key_invalid",
            Self::ExpiryInvalid { .. } => "expires_in_invalid",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::InvoiceUnknown => "invoice_unknown",
            Self::InvoiceNotPaid => "invoice_not_paid",
            Self::RefundAboveRemaining { .. } => "refund_above_remaining",
            Self::RefundsFull => "refunds_full",
            Self::AboveMerchantLimit { .. } => "invoice_above_merchant_limit",
            Self::TooManyOpenInvoices { .. } => "too_many_open_invoices",
        }
    }

    /// HTTP status and Matrix errcode.
    pub fn status_and_errcode(&self) -> (u16, &'static str) {
        match self {
            Self::IdempotencyConflict => (409, "ORG.MXPAY_IDEMPOTENCY_CONFLICT"),
            Self::InvoiceUnknown => (404, "M_NOT_FOUND"),
            Self::InvoiceNotPaid
            | Self::RefundAboveRemaining { .. }
            | Self::RefundsFull
            | Self::AboveMerchantLimit { .. }
            | Self::TooManyOpenInvoices { .. } => (409, "ORG.MXPAY_REJECTED"),
            _ => (400, "M_INVALID_PARAM"),
        }
    }
}

/// `POST /invoices`, as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateInvoiceBody {
    /// The room the invoice is posted in.
    pub room_id: String,
    /// Who is asked to pay (default: anyone in the room).
    #[serde(default)]
    pub payer: Option<String>,
    /// Amount in major units, as a string (`"4.50"`).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO code of a configured currency.
    pub currency: String,
    /// What is sold, shown to the customer.
    pub description: String,
    /// Lifetime in seconds (default one day).
    #[serde(default)]
    pub expires_in_s: Option<u64>,
    /// The merchant's own order reference, shown on the receipt.
    pub order_ref: String,
    /// The merchant's key for this invoice.
    pub idempotency_key: String,
}

/// `POST /invoices/{id}/refunds`, as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    /// Amount in major units (default: all that remains).
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub amount: Option<Decimal>,
    /// Why, told to the customer.
    pub reason: String,
    /// The merchant's key for this refund.
    pub idempotency_key: String,
}

/// An invoice's state. `open` -> `paid` | `cancelled` | `expired`, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceState {
    /// Waiting for the customer.
    Open,
    /// Paid: the money is in the merchant's wallet.
    Paid,
    /// Cancelled or declined.
    Cancelled,
    /// Lapsed unpaid.
    Expired,
}

impl InvoiceState {
    /// The state's name, as in the API and `?status=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Paid => "paid",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }
}

/// One refund of an invoice, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// The refund's ledger transfer id (32 hex digits).
    pub transfer_id: String,
    /// How much, in minor units.
    pub amount_minor: u128,
    /// Why.
    pub reason: String,
    /// The merchant's key for it.
    pub idempotency_key: String,
    /// When, ms since the Unix epoch.
    pub created_at_ms: u64,
}

/// An invoice, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// `inv_` and 32 hex digits, derived from the merchant and the idempotency key.
    pub invoice_id: String,
    /// Whose invoice.
    pub merchant_id: MerchantId,
    /// Where it was posted.
    pub room_id: OwnedRoomId,
    /// Who was asked (none: anyone in the room).
    pub payer: Option<OwnedUserId>,
    /// How much, in minor units.
    pub amount_minor: u128,
    /// Currency code.
    pub currency: String,
    /// What is sold.
    pub description: String,
    /// The merchant's order reference.
    pub order_ref: String,
    /// The merchant's key for it.
    pub idempotency_key: String,
    /// SHA-256 (hex) of the create body: a retry with another body is a conflict.
    pub body_sha256: String,
    /// Its state.
    pub state: InvoiceState,
    /// When it was made, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// When it lapses unpaid, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// The bot's typed request event in the room, once posted.
    #[serde(default)]
    pub request_event_id: Option<String>,
    /// Who paid (set when paid).
    #[serde(default)]
    pub paid_by: Option<OwnedUserId>,
    /// The paying ledger transfer (32 hex digits, set when paid).
    #[serde(default)]
    pub transfer_id: Option<String>,
    /// When it was paid, cancelled or expired.
    #[serde(default)]
    pub settled_at_ms: Option<u64>,
    /// Its refunds, oldest first.
    #[serde(default)]
    pub refunds: Vec<Refund>,
}

fn text_ok(text: &str, chars_max: usize) -> bool {
    !text.trim().is_empty()
        && text.chars().count() <= chars_max
        && !text.chars().any(char::is_control)
}

fn key_ok(key: &str) -> bool {
    !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_BYTES_MAX && !key.chars().any(char::is_control)
}

fn amount_refusal(e: AmountError, currency: &str) -> InvoiceRefusal {
    match e {
        AmountError::UnknownCurrency(_) => InvoiceRefusal::CurrencyUnknown(currency.to_owned()),
        other => InvoiceRefusal::AmountInvalid(other.to_string()),
    }
}

/// The invoice id for `merchant`'s idempotency key `key`.
pub fn invoice_id(merchant: &MerchantId, key: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mxpay invoice v1");
    for part in [merchant.as_str().as_bytes(), key.as_bytes()] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    format!("inv_{}", hex::encode(&hasher.finalize().as_bytes()[..16]))
}

/// The ledger transfer id of the refund of `invoice_id` under the idempotency key `key`.
pub fn refund_transfer_id(invoice_id: &str, key: &str) -> TransferId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mxpay invoice refund v1");
    for part in [invoice_id.as_bytes(), key.as_bytes()] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    // Zero is reserved by the ledger.
    TransferId(u128::from_be_bytes(bytes).max(1))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The operator's rules for new invoices (config `merchants:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvoiceRules {
    /// Shortest `expires_in_s` accepted.
    pub expires_in_s_min: u64,
}

impl Default for InvoiceRules {
    fn default() -> Self {
        Self {
            expires_in_s_min: EXPIRES_IN_S_MIN,
        }
    }
}

/// What a create call should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Create {
    /// A new invoice: post it, then store it.
    New(Invoice),
    /// The same key and body as before: answer the invoice as it stands.
    Replay(Invoice),
}

/// Checks a create body and applies the idempotency rule against `existing` (the invoice
/// stored under this merchant's key, if any): same key and same body -> the original; same
/// key, other body -> [`InvoiceRefusal::IdempotencyConflict`].
pub fn decide_create(
    merchant: &MerchantId,
    body: &CreateInvoiceBody,
    existing: Option<Invoice>,
    currencies: &Currencies,
    rules: &InvoiceRules,
    now_ms: u64,
) -> Result<Create, InvoiceRefusal> {
    if !key_ok(&body.idempotency_key) {
        return Err(InvoiceRefusal::IdempotencyKeyInvalid);
    }
    // The parsed body, serialised in field order: the same request always hashes the same,
    // whatever its key order or whitespace.
    let body_sha256 = sha256_hex(&serde_json::to_vec(body).expect("bodies serialise"));
    if let Some(existing) = existing {
        return if existing.body_sha256 == body_sha256 {
            Ok(Create::Replay(existing))
        } else {
            Err(InvoiceRefusal::IdempotencyConflict)
        };
    }
    let room_id = RoomId::parse(&body.room_id).map_err(|_| InvoiceRefusal::RoomIdInvalid)?;
    let payer = body
        .payer
        .as_deref()
        .map(UserId::parse)
        .transpose()
        .map_err(|_| InvoiceRefusal::PayerInvalid)?;
    let amount = currencies
        .parse(body.amount, &body.currency)
        .map_err(|e| amount_refusal(e, &body.currency))?;
    if !text_ok(&body.description, DESCRIPTION_CHARS_MAX) {
        return Err(InvoiceRefusal::DescriptionInvalid);
    }
    if !text_ok(&body.order_ref, ORDER_REF_CHARS_MAX) {
        return Err(InvoiceRefusal::OrderRefInvalid);
    }
    let expires_in_s = body.expires_in_s.unwrap_or(EXPIRES_IN_S_DEFAULT);
    if !(rules.expires_in_s_min..=EXPIRES_IN_S_MAX).contains(&expires_in_s) {
        return Err(InvoiceRefusal::ExpiryInvalid {
            min_s: rules.expires_in_s_min,
        });
    }
    Ok(Create::New(Invoice {
        invoice_id: invoice_id(merchant, &body.idempotency_key),
        merchant_id: merchant.clone(),
        room_id,
        payer,
        amount_minor: amount.minor(),
        currency: amount.currency().to_string(),
        description: body.description.clone(),
        order_ref: body.order_ref.clone(),
        idempotency_key: body.idempotency_key.clone(),
        body_sha256,
        state: InvoiceState::Open,
        created_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(expires_in_s * 1000),
        request_event_id: None,
        paid_by: None,
        transfer_id: None,
        settled_at_ms: None,
        refunds: Vec::new(),
    }))
}

/// Checks a new invoice against its merchant's own `limits`, with `open_now` of its invoices
/// open: the largest invoice of its currency, then the cap on open invoices.
pub fn check_merchant_limits(
    invoice: &Invoice,
    limits: &super::model::MerchantLimits,
    open_now: u64,
    currencies: &Currencies,
) -> Result<(), InvoiceRefusal> {
    if let Some(&max_minor) = limits.max_invoice_minor.get(&invoice.currency) {
        if invoice.amount_minor > max_minor {
            let shown = crate::ledger::CurrencyCode::new(&invoice.currency)
                .and_then(|c| currencies.to_decimal(c, max_minor))
                .map_or_else(|| max_minor.to_string(), |d| d.to_string());
            return Err(InvoiceRefusal::AboveMerchantLimit {
                max: format!("{shown} {}", invoice.currency),
            });
        }
    }
    if let Some(max) = limits.open_invoices_max {
        if open_now >= max {
            return Err(InvoiceRefusal::TooManyOpenInvoices { max });
        }
    }
    Ok(())
}

/// What a merchant's own typed request in a room says, for its invoice record.
#[derive(Debug, Clone)]
pub struct MerchantRequest<'a> {
    /// The request event's id.
    pub request_event_id: &'a str,
    /// Where it was sent.
    pub room_id: OwnedRoomId,
    /// Who is asked (none: anyone in the room).
    pub payer: Option<OwnedUserId>,
    /// How much, in minor units.
    pub amount_minor: u128,
    /// Currency code.
    pub currency: &'a str,
    /// The request's memo, else its body.
    pub description: &'a str,
    /// The event's `order_ref`, if any.
    pub order_ref: Option<&'a str>,
    /// When the request lapses, as the bot keeps it.
    pub expires_at_ms: u64,
}

/// The invoice record of a merchant's own typed request: its id derived from the merchant and
/// the request event (so handling the event again finds the same invoice), its description
/// and order reference cleaned to the API's bounds (an absent or invalid `order_ref` becomes
/// the event id).
pub fn from_merchant_request(
    merchant: &MerchantId,
    request: &MerchantRequest<'_>,
    now_ms: u64,
) -> Invoice {
    let key = format!("request:{}", request.request_event_id);
    let clean = |text: &str, chars_max: usize| -> String {
        text.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(chars_max)
            .collect::<String>()
            .trim()
            .to_owned()
    };
    let mut description = clean(request.description, DESCRIPTION_CHARS_MAX);
    if description.is_empty() {
        description = "payment request".to_owned();
    }
    let order_ref = request
        .order_ref
        .filter(|r| text_ok(r, ORDER_REF_CHARS_MAX))
        .map_or_else(
            || clean(request.request_event_id, ORDER_REF_CHARS_MAX),
            str::to_owned,
        );
    Invoice {
        invoice_id: invoice_id(merchant, &key),
        merchant_id: merchant.clone(),
        room_id: request.room_id.clone(),
        payer: request.payer.clone(),
        amount_minor: request.amount_minor,
        currency: request.currency.to_owned(),
        description,
        order_ref,
        body_sha256: sha256_hex(key.as_bytes()),
        idempotency_key: key,
        state: InvoiceState::Open,
        created_at_ms: now_ms,
        expires_at_ms: request.expires_at_ms,
        request_event_id: Some(request.request_event_id.to_owned()),
        paid_by: None,
        transfer_id: None,
        settled_at_ms: None,
        refunds: Vec::new(),
    }
}

/// What a refund call should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundPlan {
    /// Move `amount_minor` from the merchant's wallet back to `payer` under `transfer_id`
    /// (linked to the paying transfer), then record `refund` on the invoice.
    New {
        /// The refund to record once the ledger created it.
        refund: Refund,
        /// The ledger transfer id.
        transfer_id: TransferId,
        /// The paying transfer it refunds.
        refund_of: TransferId,
        /// Who gets the money back.
        payer: OwnedUserId,
    },
    /// The same key and the same refund as before: answer it again.
    Replay(Refund),
}

/// What remains refundable of a paid invoice, in minor units.
pub fn remaining_minor(invoice: &Invoice) -> u128 {
    let refunded: u128 = invoice.refunds.iter().map(|r| r.amount_minor).sum();
    invoice.amount_minor.saturating_sub(refunded)
}

/// Checks a refund body against the invoice: paid, within what remains (paid minus earlier
/// refunds), at most [`REFUNDS_PER_INVOICE_MAX`]; a key used before answers its refund again
/// (same amount and reason) or is a conflict.
pub fn decide_refund(
    invoice: &Invoice,
    body: &RefundBody,
    currencies: &Currencies,
    now_ms: u64,
) -> Result<RefundPlan, InvoiceRefusal> {
    if !key_ok(&body.idempotency_key) {
        return Err(InvoiceRefusal::IdempotencyKeyInvalid);
    }
    if !text_ok(&body.reason, REASON_CHARS_MAX) {
        return Err(InvoiceRefusal::ReasonInvalid);
    }
    let amount_minor = match body.amount {
        Some(amount) => Some(
            currencies
                .parse(amount, &invoice.currency)
                .map_err(|e| amount_refusal(e, &invoice.currency))?
                .minor(),
        ),
        None => None,
    };
    if let Some(earlier) = invoice
        .refunds
        .iter()
        .find(|r| r.idempotency_key == body.idempotency_key)
    {
        let same =
            amount_minor.is_none_or(|a| a == earlier.amount_minor) && earlier.reason == body.reason;
        return if same {
            Ok(RefundPlan::Replay(earlier.clone()))
        } else {
            Err(InvoiceRefusal::IdempotencyConflict)
        };
    }
    let (Some(payer), Some(paid)) = (&invoice.paid_by, &invoice.transfer_id) else {
        return Err(InvoiceRefusal::InvoiceNotPaid);
    };
    if invoice.state != InvoiceState::Paid {
        return Err(InvoiceRefusal::InvoiceNotPaid);
    }
    if invoice.refunds.len() >= REFUNDS_PER_INVOICE_MAX {
        return Err(InvoiceRefusal::RefundsFull);
    }
    let remaining = remaining_minor(invoice);
    let amount_minor = amount_minor.unwrap_or(remaining);
    if amount_minor == 0 || amount_minor > remaining {
        let shown = crate::ledger::CurrencyCode::new(&invoice.currency)
            .and_then(|c| currencies.to_decimal(c, remaining))
            .map_or_else(|| remaining.to_string(), |d| d.to_string());
        return Err(InvoiceRefusal::RefundAboveRemaining {
            remaining: format!("{shown} {}", invoice.currency),
        });
    }
    let refund_of = u128::from_str_radix(paid, 16)
        .map(TransferId)
        .map_err(|_| InvoiceRefusal::InvoiceNotPaid)?;
    let transfer_id = refund_transfer_id(&invoice.invoice_id, &body.idempotency_key);
    Ok(RefundPlan::New {
        refund: Refund {
            transfer_id: format!("{:032x}", transfer_id.0),
            amount_minor,
            reason: body.reason.clone(),
            idempotency_key: body.idempotency_key.clone(),
            created_at_ms: now_ms,
        },
        transfer_id,
        refund_of,
        payer: payer.clone(),
    })
}

/// One webhook event a change produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventOut {
    /// `invoice.paid`, ...
    pub event_type: &'static str,
    /// Deterministic id (see [`super::events`]).
    pub event_id: String,
}

/// The invoice paid by `payer` with ledger transfer `transfer_id`. Only an open invoice can
/// be paid; paying a settled one changes nothing (`None`).
pub fn mark_paid(
    invoice: &Invoice,
    payer: OwnedUserId,
    transfer_id: TransferId,
    now_ms: u64,
) -> Option<(Invoice, EventOut)> {
    if invoice.state != InvoiceState::Open {
        return None;
    }
    let mut paid = invoice.clone();
    paid.state = InvoiceState::Paid;
    paid.paid_by = Some(payer);
    paid.transfer_id = Some(format!("{:032x}", transfer_id.0));
    paid.settled_at_ms = Some(now_ms);
    let event = EventOut {
        event_type: INVOICE_PAID,
        event_id: invoice_event_id(INVOICE_PAID, &invoice.invoice_id),
    };
    Some((paid, event))
}

/// The invoice ended unpaid: `expired` once `now_ms` passed its expiry, or `cancelled`.
/// Only an open invoice ends; otherwise `None`.
pub fn mark_ended(invoice: &Invoice, cancelled: bool, now_ms: u64) -> Option<(Invoice, EventOut)> {
    if invoice.state != InvoiceState::Open || (!cancelled && now_ms < invoice.expires_at_ms) {
        return None;
    }
    let mut ended = invoice.clone();
    let event_type = if cancelled {
        ended.state = InvoiceState::Cancelled;
        INVOICE_CANCELLED
    } else {
        ended.state = InvoiceState::Expired;
        INVOICE_EXPIRED
    };
    ended.settled_at_ms = Some(now_ms);
    Some((
        ended,
        EventOut {
            event_type,
            event_id: invoice_event_id(event_type, &invoice.invoice_id),
        },
    ))
}

/// The invoice with `refund` recorded, and its `refund.succeeded` event.
pub fn with_refund(
    invoice: &Invoice,
    refund: Refund,
    transfer_id: TransferId,
) -> (Invoice, EventOut) {
    let mut out = invoice.clone();
    out.refunds.push(refund);
    (
        out,
        EventOut {
            event_type: REFUND_SUCCEEDED,
            event_id: refund_event_id(transfer_id.0),
        },
    )
}

/// Most ledger transfers `GET /invoices/{id}` lists: the ledger's largest page.
pub const TRANSFERS_SHOWN_MAX: usize = crate::ledger::HISTORY_PAGE_MAX;

/// The ledger reference of `invoice`'s payments and refunds: its request's
/// ([`crate::requests::ledger_reference`]); `None` before it was posted.
pub fn ledger_reference(invoice: &Invoice) -> Option<u128> {
    invoice
        .request_event_id
        .as_deref()
        .map(crate::requests::ledger_reference)
}

/// The paying transfer's id, when the invoice is paid.
pub fn paying_transfer(invoice: &Invoice) -> Option<TransferId> {
    invoice
        .transfer_id
        .as_deref()
        .and_then(|hex| u128::from_str_radix(hex, 16).ok())
        .map(TransferId)
}

/// An invoice's ledger transfers, oldest first, each once: those found under its reference
/// (payment attempts, the payment, its refunds), with the paying transfer and its refunds
/// found by id when the reference did not list them (a payment made before references
/// existed carries none, and its refunds neither).
pub fn merge_transfers(
    by_reference: Vec<Transfer>,
    paying: Option<Transfer>,
    refunds_of_paying: Vec<Transfer>,
) -> Vec<Transfer> {
    let mut all = by_reference;
    for transfer in paying.into_iter().chain(refunds_of_paying) {
        if !all.iter().any(|t| t.id == transfer.id) {
            all.push(transfer);
        }
    }
    // Stable: transfers of one millisecond keep the ledger's order.
    all.sort_by_key(|t| t.created_ms);
    all
}

/// What `GET /invoices/{id}` shows of each of an invoice's ledger transfers (amounts in
/// major units). Who made a payment attempt is not shown: `paid_by` names the payer.
pub fn transfers_view(transfers: &[Transfer], currencies: &Currencies) -> serde_json::Value {
    serde_json::Value::Array(
        transfers
            .iter()
            .map(|t| {
                let major = |minor: u128| {
                    currencies
                        .to_decimal(t.debit.currency, minor)
                        .map_or_else(|| minor.to_string(), |d| d.to_string())
                };
                let status = match t.state {
                    TransferState::Pending => "pending",
                    TransferState::Posted { .. } => "posted",
                    TransferState::Voided => "voided",
                    TransferState::Expired => "expired",
                };
                let amount_minor = match t.state {
                    TransferState::Posted { amount_minor } => amount_minor,
                    _ => t.amount_minor,
                };
                serde_json::json!({
                    "transfer_id": t.id.to_string(),
                    "kind": if t.refund_of.is_some() { "refund" } else { "payment" },
                    "refund_of": t.refund_of.map(|o| o.to_string()),
                    "status": status,
                    "amount": major(amount_minor),
                    "created_at_ms": t.created_ms,
                    "ended_at_ms": t.ended_ms,
                })
            })
            .collect(),
    )
}

/// An invoice as the merchant API and webhook payloads show it (amounts in major units).
pub fn view(invoice: &Invoice, currencies: &Currencies) -> serde_json::Value {
    let code = crate::ledger::CurrencyCode::new(&invoice.currency);
    let major = |minor: u128| {
        code.and_then(|c| currencies.to_decimal(c, minor))
            .map_or_else(|| minor.to_string(), |d| d.to_string())
    };
    serde_json::json!({
        "invoice_id": invoice.invoice_id,
        "merchant_id": invoice.merchant_id,
        "room_id": invoice.room_id,
        "payer": invoice.payer,
        "amount": major(invoice.amount_minor),
        "currency": invoice.currency,
        "description": invoice.description,
        "order_ref": invoice.order_ref,
        "status": invoice.state.as_str(),
        "created_at_ms": invoice.created_at_ms,
        "expires_at_ms": invoice.expires_at_ms,
        "request_event_id": invoice.request_event_id,
        "paid_by": invoice.paid_by,
        "transfer_id": invoice.transfer_id,
        "settled_at_ms": invoice.settled_at_ms,
        "amount_refunded": major(invoice.amount_minor - remaining_minor(invoice)),
        "refunds": invoice.refunds.iter().map(|r| serde_json::json!({
            "transfer_id": r.transfer_id,
            "amount": major(r.amount_minor),
            "reason": r.reason,
            "created_at_ms": r.created_at_ms,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{CurrencySpec, LedgerSettings};

    const NOW_MS: u64 = 1_700_000_000_000;

    fn currencies() -> Currencies {
        Currencies::from_settings(&LedgerSettings {
            currencies: vec![
                CurrencySpec {
                    code: "EUR".to_owned(),
                    exponent: 2,
                    max_transfer: Some("1000.00".parse().unwrap()),
                    max_per_24h: None,
                },
                CurrencySpec {
                    code: "JPY".to_owned(),
                    exponent: 0,
                    max_transfer: None,
                    max_per_24h: None,
                },
            ],
        })
        .unwrap()
    }

    fn cafe() -> MerchantId {
        MerchantId::parse("cafe").unwrap()
    }

    fn body() -> CreateInvoiceBody {
        CreateInvoiceBody {
            room_id: "!room:example.org".to_owned(),
            payer: Some("@bob:example.org".to_owned()),
            amount: "4.50".parse().unwrap(),
            currency: "EUR".to_owned(),
            description: "Flat white".to_owned(),
            expires_in_s: None,
            order_ref: "order-17".to_owned(),
            idempotency_key: "k1".to_owned(),
        }
    }

    fn created() -> Invoice {
        match decide_create(
            &cafe(),
            &body(),
            None,
            &currencies(),
            &InvoiceRules::default(),
            NOW_MS,
        )
        .unwrap()
        {
            Create::New(invoice) => invoice,
            other => panic!("{other:?}"),
        }
    }

    fn paid() -> Invoice {
        mark_paid(
            &created(),
            "@bob:example.org".try_into().unwrap(),
            TransferId(0xabc),
            NOW_MS + 5,
        )
        .unwrap()
        .0
    }

    fn refund(amount: Option<&str>, key: &str) -> RefundBody {
        RefundBody {
            amount: amount.map(|a| a.parse().unwrap()),
            reason: "cold coffee".to_owned(),
            idempotency_key: key.to_owned(),
        }
    }

    #[test]
    fn a_valid_body_makes_an_open_invoice_in_minor_units() {
        let invoice = created();
        assert_eq!(invoice.amount_minor, 450);
        assert_eq!(invoice.state, InvoiceState::Open);
        assert_eq!(invoice.expires_at_ms, NOW_MS + EXPIRES_IN_S_DEFAULT * 1000);
        assert_eq!(invoice.invoice_id, invoice_id(&cafe(), "k1"));
        assert!(invoice.invoice_id.starts_with("inv_"));
        // Another merchant's key of the same name is another invoice.
        assert_ne!(
            invoice.invoice_id,
            invoice_id(&MerchantId::parse("shop").unwrap(), "k1")
        );
    }

    #[test]
    fn the_same_key_with_the_same_body_replays_and_with_another_conflicts() {
        let invoice = created();
        assert_eq!(
            decide_create(
                &cafe(),
                &body(),
                Some(invoice.clone()),
                &currencies(),
                &InvoiceRules::default(),
                NOW_MS + 1
            ),
            Ok(Create::Replay(invoice.clone()))
        );
        let other = CreateInvoiceBody {
            amount: "5.00".parse().unwrap(),
            ..body()
        };
        assert_eq!(
            decide_create(
                &cafe(),
                &other,
                Some(invoice),
                &currencies(),
                &InvoiceRules::default(),
                NOW_MS + 1
            ),
            Err(InvoiceRefusal::IdempotencyConflict)
        );
    }

    #[test]
    fn bad_bodies_are_refused_with_stable_reasons() {
        let cases: Vec<(CreateInvoiceBody, &str)> = vec![
            (
                CreateInvoiceBody {
                    room_id: "room".into(),
                    ..body()
                },
                "room_id_invalid",
            ),
            (
                CreateInvoiceBody {
                    payer: Some("bob".into()),
                    ..body()
                },
                "payer_invalid",
            ),
            (
                CreateInvoiceBody {
                    amount: "4.505".parse().unwrap(),
                    ..body()
                },
                "amount_invalid",
            ),
            (
                CreateInvoiceBody {
                    amount: "0".parse().unwrap(),
                    ..body()
                },
                "amount_invalid",
            ),
            (
                CreateInvoiceBody {
                    amount: "-1".parse().unwrap(),
                    ..body()
                },
                "amount_invalid",
            ),
            (
                CreateInvoiceBody {
                    amount: "1000.01".parse().unwrap(),
                    ..body()
                },
                "amount_invalid",
            ),
            (
                CreateInvoiceBody {
                    currency: "XXX".into(),
                    ..body()
                },
                "currency_unknown",
            ),
            (
                CreateInvoiceBody {
                    description: " ".into(),
                    ..body()
                },
                "description_invalid",
            ),
            (
                CreateInvoiceBody {
                    order_ref: "a\u{0}".into(),
                    ..body()
                },
                "order_ref_invalid",
            ),
            (
                CreateInvoiceBody {
                    expires_in_s: Some(59),
                    ..body()
                },
                "expires_in_invalid",
            ),
            (
                CreateInvoiceBody {
                    expires_in_s: Some(EXPIRES_IN_S_MAX + 1),
                    ..body()
                },
                "expires_in_invalid",
            ),
            (
                CreateInvoiceBody {
                    idempotency_key: String::new(),
                    ..body()
                },
                "idempotency_key_invalid",
            ),
        ];
        for (bad, reason) in cases {
            let refusal = decide_create(
                &cafe(),
                &bad,
                None,
                &currencies(),
                &InvoiceRules::default(),
                NOW_MS,
            )
            .unwrap_err();
            assert_eq!(refusal.reason(), reason, "{bad:?}");
        }
    }

    #[test]
    fn only_an_open_invoice_is_paid_expired_or_cancelled_once() {
        let open = created();
        assert!(mark_ended(&open, false, open.expires_at_ms - 1).is_none());
        let (expired, event) = mark_ended(&open, false, open.expires_at_ms).unwrap();
        assert_eq!(
            (expired.state, event.event_type),
            (InvoiceState::Expired, INVOICE_EXPIRED)
        );
        assert!(mark_paid(
            &expired,
            "@bob:example.org".try_into().unwrap(),
            TransferId(1),
            NOW_MS
        )
        .is_none());
        let (cancelled, event) = mark_ended(&open, true, NOW_MS).unwrap();
        assert_eq!(
            (cancelled.state, event.event_type),
            (InvoiceState::Cancelled, INVOICE_CANCELLED)
        );
        let (paid, event) = mark_paid(
            &open,
            "@bob:example.org".try_into().unwrap(),
            TransferId(0xabc),
            NOW_MS,
        )
        .unwrap();
        assert_eq!(
            paid.transfer_id.as_deref(),
            Some("00000000000000000000000000000abc")
        );
        // Deterministic: the same change gives the same event id (re-fed after a crash).
        assert_eq!(
            event,
            mark_paid(
                &open,
                "@bob:example.org".try_into().unwrap(),
                TransferId(0xabc),
                NOW_MS + 9
            )
            .unwrap()
            .1
        );
        assert!(mark_ended(&paid, true, NOW_MS).is_none());
    }

    #[test]
    fn refunds_are_capped_by_what_remains_and_replayed_by_key() {
        let c = currencies();
        assert_eq!(
            decide_refund(&created(), &refund(None, "r1"), &c, NOW_MS),
            Err(InvoiceRefusal::InvoiceNotPaid)
        );
        let invoice = paid();
        let RefundPlan::New {
            refund: first,
            transfer_id,
            refund_of,
            payer,
        } = decide_refund(&invoice, &refund(Some("1.50"), "r1"), &c, NOW_MS).unwrap()
        else {
            panic!("a new refund")
        };
        assert_eq!(
            (first.amount_minor, refund_of, payer.as_str()),
            (150, TransferId(0xabc), "@bob:example.org")
        );
        assert_eq!(transfer_id, refund_transfer_id(&invoice.invoice_id, "r1"));
        let (invoice, event) = with_refund(&invoice, first.clone(), transfer_id);
        assert_eq!(event.event_type, REFUND_SUCCEEDED);
        assert_eq!(remaining_minor(&invoice), 300);
        // The same key: the same refund again, never a second one.
        assert_eq!(
            decide_refund(&invoice, &refund(Some("1.50"), "r1"), &c, NOW_MS + 1),
            Ok(RefundPlan::Replay(first))
        );
        assert_eq!(
            decide_refund(&invoice, &refund(Some("1.00"), "r1"), &c, NOW_MS + 1),
            Err(InvoiceRefusal::IdempotencyConflict)
        );
        // Above what remains: refused, naming what remains.
        let above = decide_refund(&invoice, &refund(Some("3.01"), "r2"), &c, NOW_MS).unwrap_err();
        assert_eq!(above.reason(), "refund_above_remaining");
        assert!(above.to_string().contains("3.00 EUR"), "{above}");
        assert_eq!(
            decide_refund(&invoice, &refund(Some("0.001"), "r2"), &c, NOW_MS)
                .unwrap_err()
                .reason(),
            "amount_invalid"
        );
        // No amount: all that remains; then nothing remains.
        let RefundPlan::New {
            refund: rest,
            transfer_id,
            ..
        } = decide_refund(&invoice, &refund(None, "r2"), &c, NOW_MS).unwrap()
        else {
            panic!("a new refund")
        };
        assert_eq!(rest.amount_minor, 300);
        let (invoice, _) = with_refund(&invoice, rest, transfer_id);
        assert_eq!(
            decide_refund(&invoice, &refund(None, "r3"), &c, NOW_MS)
                .unwrap_err()
                .reason(),
            "refund_above_remaining"
        );
        let shown = view(&invoice, &c);
        assert_eq!(shown["amount_refunded"], "4.50");
        assert_eq!(shown["status"], "paid");
        assert_eq!(shown["refunds"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_merchants_own_limits_cap_the_amount_per_currency_and_the_open_invoices() {
        let c = currencies();
        let invoice = created(); // 4.50 EUR
        let mut limits = crate::merchants::MerchantLimits::default();
        assert_eq!(check_merchant_limits(&invoice, &limits, 1_000, &c), Ok(()));
        limits.max_invoice_minor.insert("EUR".to_owned(), 450);
        limits.max_invoice_minor.insert("JPY".to_owned(), 1);
        assert_eq!(check_merchant_limits(&invoice, &limits, 0, &c), Ok(()));
        limits.max_invoice_minor.insert("EUR".to_owned(), 449);
        let above = check_merchant_limits(&invoice, &limits, 0, &c).unwrap_err();
        assert_eq!(above.reason(), "invoice_above_merchant_limit");
        assert!(above.to_string().contains("4.49 EUR"), "{above}");
        limits.max_invoice_minor.clear();
        limits.open_invoices_max = Some(2);
        assert_eq!(check_merchant_limits(&invoice, &limits, 1, &c), Ok(()));
        let full = check_merchant_limits(&invoice, &limits, 2, &c).unwrap_err();
        assert_eq!(
            (full.reason(), full.status_and_errcode().0),
            ("too_many_open_invoices", 409)
        );
    }

    fn transfer(
        id: u128,
        created_ms: u64,
        state: TransferState,
        refund_of: Option<u128>,
    ) -> Transfer {
        use crate::ledger::{AccountId, CurrencyCode, Owner, TransferKind};
        let eur = CurrencyCode::new("EUR").unwrap();
        let (debit, credit) = (Owner::user("@bob:example.org"), Owner::merchant("cafe"));
        let (debit, credit) = match refund_of {
            Some(_) => (credit, debit),
            None => (debit, credit),
        };
        Transfer {
            id: TransferId(id),
            kind: match refund_of {
                Some(original) => TransferKind::Refund {
                    original: TransferId(original),
                },
                None => TransferKind::Pending { timeout_ms: 1_000 },
            },
            debit: AccountId {
                owner: debit,
                currency: eur,
            },
            credit: AccountId {
                owner: credit,
                currency: eur,
            },
            amount_minor: 450,
            state,
            memo: Vec::new(),
            created_ms,
            ended_ms: None,
            deadline_ms: None,
            reference: 0,
            refunded_minor: 0,
            refund_of: refund_of.map(TransferId),
            refund_pending_minor: 0,
        }
    }

    /// An invoice's reference is its request's, as the payment flow sets it on the request's
    /// payments; an invoice not yet posted has none.
    #[test]
    fn an_invoices_ledger_reference_is_its_requests() {
        let mut invoice = created();
        assert_eq!(ledger_reference(&invoice), None);
        invoice.request_event_id = Some(format!("${}", invoice.invoice_id));
        assert_eq!(
            ledger_reference(&invoice),
            Some(crate::requests::ledger_reference(&format!(
                "${}",
                invoice.invoice_id
            )))
        );
    }

    /// Listed by reference, oldest first; a payment made before references existed (and
    /// its refunds) is added by id, each transfer once.
    #[test]
    fn an_invoices_transfers_merge_the_reference_and_an_older_payment_once() {
        let posted = TransferState::Posted { amount_minor: 450 };
        let voided_try = transfer(1, 10, TransferState::Voided, None);
        let paid = transfer(2, 20, posted, None);
        let refund = transfer(3, 30, TransferState::Posted { amount_minor: 150 }, Some(2));
        let all = merge_transfers(
            vec![voided_try.clone(), paid.clone(), refund.clone()],
            Some(paid.clone()),
            vec![refund.clone()],
        );
        assert_eq!(all.iter().map(|t| t.id.0).collect::<Vec<_>>(), [1, 2, 3]);
        // Paid before references: the reference finds nothing, the ids find both.
        let older = merge_transfers(Vec::new(), Some(paid), vec![refund]);
        assert_eq!(older.iter().map(|t| t.id.0).collect::<Vec<_>>(), [2, 3]);
        let shown = transfers_view(&all, &currencies());
        assert_eq!(shown[0]["kind"], "payment");
        assert_eq!(shown[0]["status"], "voided");
        assert_eq!(shown[1]["status"], "posted");
        assert_eq!(shown[1]["amount"], "4.50");
        assert_eq!(shown[2]["kind"], "refund");
        assert_eq!(shown[2]["amount"], "1.50");
        assert_eq!(shown[2]["refund_of"], format!("{:032x}", 2));
        assert_eq!(shown[1]["transfer_id"], format!("{:032x}", 2));
    }
}
