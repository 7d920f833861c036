//! `org.mxpay.payment_request`: a person, business or bot asks to be paid.
//!
//! Sent by a client or bot (the requester), or by mxpay itself when someone types `!request` or
//! `!split` (then the requester is `payee`, not the event's sender). The bot keeps each
//! request's state (open, paid, declined, cancelled, expired) and tells it with
//! `org.mxpay.payment_request.status` events that reference the request event.

use matrix_sdk::ruma::events::macros::EventContent;
use matrix_sdk::ruma::OwnedUserId;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Asks `payer` (or, without one, anyone in the room, each member at most once) to pay
/// `amount` `currency` to `payee`. Paid by replying `!pay` to it, reacting ✅ or 👍, or with a
/// transfer intent naming this event in `request_event_id`; the amount, currency and payee come
/// from here, never from the answer.
///
/// From a client, `payee` must be the event's sender (nobody can ask for money to be paid to
/// someone else). The field set is a wire format: new fields are optional, so events sent by
/// older clients keep parsing.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, EventContent)]
#[ruma_event(type = "org.mxpay.payment_request", kind = MessageLike)]
pub struct PaymentRequestEventContent {
    /// Fallback text, e.g. "@shop requests 4.20 EUR: coffee".
    pub body: String,
    /// Who receives the money: the requester.
    pub payee: OwnedUserId,
    /// Amount in major units (per payer, for a request open to everyone), as a decimal string.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// Who is asked to pay; anyone in the room (each member at most once) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<OwnedUserId>,
    /// What the money is for (the request's description), at most 140 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
    /// The request lapses at this time (ms since epoch); absent: the bot's default (7 days
    /// after it saw the request). The bot never keeps a request open longer than its maximum
    /// (30 days), whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// The merchant's own order reference, at most 200 characters: sent by a registered
    /// merchant's Matrix user, the request is recorded as that merchant's invoice with it
    /// (shown on the receipt and in the merchant API). Ignored from anyone else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_ref: Option<String>,
}

impl PaymentRequestEventContent {
    /// Whether anyone in the room may pay it (no `payer` named).
    pub fn is_open_to_everyone(&self) -> bool {
        self.payer.is_none()
    }
}
