//! `org.mxpay.payment_request.status`: the bot tells where a payment request stands, each time
//! that changes (a payer paid or declined, the requester cancelled, the request lapsed).

use matrix_sdk::ruma::events::macros::EventContent;
use matrix_sdk::ruma::events::relation::Reference;
use matrix_sdk::ruma::OwnedUserId;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Where a request, or one payer's part of it, stands. Stable codes: clients may switch on
/// them. `open` is the only state that changes again; the other four are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Something can still be paid (or a payment waits for the payer's PIN).
    Open,
    /// Paid (for the whole request: by every payer it names).
    Paid,
    /// The payer said no (for the whole request: nothing is open and at least one payer
    /// declined; the others paid).
    Declined,
    /// The requester withdrew it.
    Cancelled,
    /// It lapsed unpaid.
    Expired,
}

impl RequestState {
    /// The code, as sent (`open`, `paid`, ...).
    pub fn code(self) -> &'static str {
        match self {
            RequestState::Open => "open",
            RequestState::Paid => "paid",
            RequestState::Declined => "declined",
            RequestState::Cancelled => "cancelled",
            RequestState::Expired => "expired",
        }
    }
}

/// One update about a request, referencing the request's `org.mxpay.payment_request` event
/// (the requester's own, or the one the bot posted for a `!request` or `!split`).
#[derive(Clone, Debug, Deserialize, Serialize, EventContent)]
#[ruma_event(type = "org.mxpay.payment_request.status", kind = MessageLike)]
pub struct PaymentRequestStatusEventContent {
    /// Fallback text, e.g. "✅ @bob:example.org paid 12.00 EUR to @alice:example.org (pizza).".
    pub body: String,
    /// Where the whole request stands now.
    pub status: RequestState,
    /// The payer this update is about; absent when it is about the whole request (cancelled,
    /// expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<OwnedUserId>,
    /// Where `payer`'s part stands (set exactly when `payer` is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_status: Option<RequestState>,
    /// Who is paid: the requester.
    pub payee: OwnedUserId,
    /// `payer`'s share in major units; without `payer`, the amount each payer was asked for
    /// when all were asked the same, else the total asked.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// The ledger transfer that paid `payer`'s part, as the decimal string of its 128-bit id
    /// (only with `payer_status: paid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    /// How many payers have paid so far.
    pub paid_count: u32,
    /// How many payers the request names (absent for a request open to everyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_count: Option<u32>,
    /// When the request lapses (ms since epoch), as the bot keeps it.
    pub expires_at_ms: u64,
    /// The request's `org.mxpay.payment_request` event.
    #[serde(rename = "m.relates_to")]
    pub relates_to: Reference,
}
