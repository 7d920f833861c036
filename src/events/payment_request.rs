//! `org.mxpay.payment_request`: a person, business or bot asks to be paid.

use matrix_sdk::ruma::events::macros::EventContent;
use matrix_sdk::ruma::OwnedUserId;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Anyone in the room (or only `payer`, when set) may pay it with a transfer intent that names
/// this event in `request_event_id`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, EventContent)]
#[ruma_event(type = "org.mxpay.payment_request", kind = MessageLike)]
pub struct PaymentRequestEventContent {
    /// Fallback text, e.g. "@shop requests 4.20 EUR: coffee".
    pub body: String,
    /// Who receives the money.
    pub payee: OwnedUserId,
    /// Amount in major units.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// Who is asked to pay; anyone in the room when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<OwnedUserId>,
    /// What for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
    /// The request lapses at this time (ms since epoch), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}
