//! `org.mxpay.transfer_intent`: a payer asks to pay someone in this room.

use matrix_sdk::ruma::events::macros::EventContent;
use matrix_sdk::ruma::OwnedUserId;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The typed form of `!pay @bob:example.org 12.50 EUR lunch`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, EventContent)]
#[ruma_event(type = "org.mxpay.transfer_intent", kind = MessageLike)]
pub struct TransferIntentEventContent {
    /// Fallback text for clients that do not know this type.
    pub body: String,
    /// Who is paid.
    pub payee: OwnedUserId,
    /// Amount in major units, e.g. `"12.50"`.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// A note for both sides (at most 140 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
    /// The payment request this pays, if any (its event id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_event_id: Option<matrix_sdk::ruma::OwnedEventId>,
}
