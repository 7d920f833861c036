//! mxpay's own Matrix event types, all under the `org.mxpay.*` namespace. One file per type.
//!
//! Every event carries a plain `body` so clients that do not know the type still show
//! something. Amounts are decimal strings in major units (`"12.50"`); the currency's exponent is
//! checked by the ledger on the way in. Schemas and examples: `docs/events.md`.

pub mod bot_command;
pub mod payment_request;
pub mod payment_request_status;
pub mod receipt;
pub mod stepup_challenge;
pub mod stepup_response;
pub mod transfer_intent;

pub use payment_request::PaymentRequestEventContent;
pub use payment_request_status::{PaymentRequestStatusEventContent, RequestState};
pub use receipt::{ReceiptEventContent, ReceiptReason, ReceiptStatus};
pub use stepup_challenge::StepUpChallengeEventContent;
pub use stepup_response::StepUpResponseEventContent;
pub use transfer_intent::TransferIntentEventContent;

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::events::relation::Reference;
    use matrix_sdk::ruma::events::MessageLikeEventContent;
    use matrix_sdk::ruma::{owned_event_id, owned_user_id};
    use rust_decimal::Decimal;

    use super::*;

    #[test]
    fn receipt_serialises_with_reference_and_string_amount() {
        let receipt = ReceiptEventContent {
            body: "paid".into(),
            status: ReceiptStatus::Declined,
            reason: Some(ReceiptReason::InsufficientFunds),
            transfer_id: None,
            payer: owned_user_id!("@alice:localhost"),
            payee: owned_user_id!("@bob:localhost"),
            amount: Decimal::new(1250, 2),
            currency: "EUR".into(),
            relates_to: Reference::new(owned_event_id!("$intent")),
        };
        assert_eq!(receipt.event_type().to_string(), "org.mxpay.receipt");
        let json = serde_json::to_value(&receipt).unwrap();
        assert_eq!(json["amount"], "12.50");
        assert_eq!(json["status"], "declined");
        assert_eq!(json["reason"], "insufficient_funds");
        assert_eq!(json["m.relates_to"]["rel_type"], "m.reference");
        assert_eq!(json["m.relates_to"]["event_id"], "$intent");
    }

    #[test]
    fn transfer_intent_parses_and_keeps_exact_decimals() {
        let json = serde_json::json!({
            "body": "!pay @bob:localhost 12.50 EUR",
            "payee": "@bob:localhost",
            "amount": "12.50",
            "currency": "EUR"
        });
        let intent: TransferIntentEventContent = serde_json::from_value(json).unwrap();
        assert_eq!(intent.amount.to_string(), "12.50");
        assert!(serde_json::from_value::<TransferIntentEventContent>(
            serde_json::json!({"body": "x", "payee": "not-a-user", "amount": "1", "currency": "EUR"})
        )
        .is_err());
    }

    #[test]
    fn stepup_response_debug_hides_the_pin() {
        let response = StepUpResponseEventContent {
            body: "PIN confirmation".into(),
            challenge_id: "c1".into(),
            pin: "4821".into(),
        };
        assert!(!format!("{response:?}").contains("4821"));
    }
}
