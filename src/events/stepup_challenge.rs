//! `org.mxpay.stepup.challenge`: the bot asks the payer, in their private DM, to confirm a
//! pending payment with their PIN.

use matrix_sdk::ruma::events::macros::EventContent;
use matrix_sdk::ruma::events::relation::Reference;
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Names exactly what the PIN will authorise.
#[derive(Clone, Debug, Deserialize, Serialize, EventContent)]
#[ruma_event(type = "org.mxpay.stepup.challenge", kind = MessageLike)]
pub struct StepUpChallengeEventContent {
    /// Fallback text, e.g. "Confirm paying 12.50 EUR to @bob:example.org ...".
    pub body: String,
    /// Opaque id to answer with.
    pub challenge_id: String,
    /// Who will be paid.
    pub payee: OwnedUserId,
    /// Amount in major units.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// The room the payment was asked for in.
    pub room_id: OwnedRoomId,
    /// After this time (ms since epoch) the payment is voided and the funds released.
    pub expires_at_ms: u64,
    /// The event that asked for the payment (only when it is in this same room).
    #[serde(
        rename = "m.relates_to",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub relates_to: Option<Reference>,
}
