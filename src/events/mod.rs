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
pub use receipt::{ReceiptEventContent, ReceiptMerchant, ReceiptReason, ReceiptStatus, RefundOf};
pub use stepup_challenge::StepUpChallengeEventContent;
pub use stepup_response::StepUpResponseEventContent;
pub use transfer_intent::TransferIntentEventContent;

use matrix_sdk::ruma::EventId;
use serde_json::Value;

/// The content of ONE `m.room.message` (`m.notice`) that says `payload`'s `body` to people and
/// carries `payload` itself under the key `event_type` for bots (the way MSC1767 extensible
/// events and many bots carry typed data), instead of a typed event and a notice saying the
/// same thing (which doubles the homeserver's work and every client's sync).
///
/// `payload` stays whole (its own `body` and `m.relates_to` included), so it is exactly what a
/// typed event of that type would hold and its JSON Schema applies to it. Its `m.relates_to`
/// is also the message's, so the relation is a real one (the homeserver aggregates it); with
/// `reply_to` the relation also carries `m.in_reply_to`, so clients show the message as a reply.
pub fn notice_carrying(event_type: &str, payload: Value, reply_to: Option<&EventId>) -> Value {
    let mut content = serde_json::json!({
        "msgtype": "m.notice",
        "body": payload.get("body").cloned().unwrap_or_default(),
    });
    let mut relates_to = payload.get("m.relates_to").cloned();
    if let Some(event_id) = reply_to {
        let relation = relates_to.get_or_insert_with(|| serde_json::json!({}));
        relation["m.in_reply_to"] = serde_json::json!({ "event_id": event_id });
    }
    if let Some(relates_to) = relates_to {
        content["m.relates_to"] = relates_to;
    }
    content[event_type] = payload;
    content
}

/// The `event_type` payload of a received event (`{"type", "content", ...}`): the content of
/// an event of that type (how mxpay sent them before it merged them into its notices, and
/// how clients send theirs), or the key of an `m.room.message` carrying it
/// ([`notice_carrying`]). `None` when the event holds neither.
pub fn carried<'a>(event: &'a Value, event_type: &str) -> Option<&'a Value> {
    let content = event.get("content")?;
    if event.get("type").and_then(Value::as_str) == Some(event_type) {
        return Some(content);
    }
    if event.get("type").and_then(Value::as_str) != Some("m.room.message") {
        return None;
    }
    content
        .get(event_type)
        .filter(|payload| payload.is_object())
}

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::events::relation::Reference;
    use matrix_sdk::ruma::events::MessageLikeEventContent;
    use matrix_sdk::ruma::{owned_event_id, owned_user_id};
    use rust_decimal::Decimal;

    use super::*;

    #[test]
    fn a_notice_carrying_a_receipt_is_one_message_that_bots_read_back() {
        let payload = serde_json::json!({
            "body": "paid",
            "status": "completed",
            "m.relates_to": {"rel_type": "m.reference", "event_id": "$pay"},
        });
        let content = notice_carrying(
            "org.mxpay.receipt",
            payload.clone(),
            Some(&owned_event_id!("$pay")),
        );
        assert_eq!(content["msgtype"], "m.notice");
        assert_eq!(content["body"], "paid");
        assert_eq!(content["m.relates_to"]["rel_type"], "m.reference");
        assert_eq!(content["m.relates_to"]["event_id"], "$pay");
        assert_eq!(content["m.relates_to"]["m.in_reply_to"]["event_id"], "$pay");
        let event = serde_json::json!({"type": "m.room.message", "content": content});
        assert_eq!(carried(&event, "org.mxpay.receipt"), Some(&payload));
        assert_eq!(carried(&event, "org.mxpay.stepup.challenge"), None);
        // The older form, a typed event, reads the same.
        let typed = serde_json::json!({"type": "org.mxpay.receipt", "content": payload});
        assert_eq!(carried(&typed, "org.mxpay.receipt"), Some(&payload));
        // Only a message carries: a key on some other event type is not a payload.
        let other = serde_json::json!({"type": "m.reaction", "content": {"org.mxpay.receipt": {}}});
        assert_eq!(carried(&other, "org.mxpay.receipt"), None);
    }

    #[test]
    fn a_notice_carrying_without_a_relation_has_none() {
        let content = notice_carrying(
            "org.mxpay.stepup.challenge",
            serde_json::json!({"body": "confirm"}),
            None,
        );
        assert!(content.get("m.relates_to").is_none());
        assert_eq!(content["org.mxpay.stepup.challenge"]["body"], "confirm");
    }

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
            request_event_id: None,
            merchant: None,
            order_ref: None,
            refund_of: None,
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

    /// The `content` of every ```json example of `event_type` in docs/events.md, in order.
    fn documented(event_type: &str) -> Vec<serde_json::Value> {
        let docs = include_str!("../../docs/events.md");
        docs.split("```json\n")
            .skip(1)
            .map(|block| block.split("\n```").next().unwrap())
            .map(|json| serde_json::from_str::<serde_json::Value>(json).expect("example is JSON"))
            .filter(|event| event["type"] == event_type)
            .map(|event| event["content"].clone())
            .collect()
    }

    #[test]
    fn payment_requests_serialise_as_documented() {
        let shop = PaymentRequestEventContent {
            body: "@shop:example.org requests 4.20 EUR: coffee".into(),
            payee: owned_user_id!("@shop:example.org"),
            amount: Decimal::new(420, 2),
            currency: "EUR".into(),
            payer: None,
            memo: Some("coffee".into()),
            expires_at_ms: Some(1_795_600_000_000),
            order_ref: None,
        };
        let named = PaymentRequestEventContent {
            body: "💸 @alice:example.org asks @bob:example.org for 12.00 EUR (pizza). Reply !pay or react ✅ to pay, ❌ to decline.".into(),
            payee: owned_user_id!("@alice:example.org"),
            amount: Decimal::new(1200, 2),
            currency: "EUR".into(),
            payer: Some(owned_user_id!("@bob:example.org")),
            memo: Some("pizza".into()),
            expires_at_ms: Some(1_796_204_800_000),
            order_ref: None,
        };
        assert!(shop.is_open_to_everyone() && !named.is_open_to_everyone());
        assert_eq!(shop.event_type().to_string(), "org.mxpay.payment_request");
        let examples = documented("org.mxpay.payment_request");
        assert_eq!(examples.len(), 2);
        for (value, example) in [shop, named].iter().zip(&examples) {
            assert_eq!(&serde_json::to_value(value).unwrap(), example);
            let read: PaymentRequestEventContent = serde_json::from_value(example.clone()).unwrap();
            assert_eq!(&read, value);
        }
        // The amount keeps its decimals exactly; a number is not an amount.
        assert_eq!(examples[1]["amount"], "12.00");
        let mut bad = examples[1].clone();
        bad["amount"] = serde_json::json!(12.0);
        assert!(serde_json::from_value::<PaymentRequestEventContent>(bad).is_err());
    }

    #[test]
    fn request_statuses_serialise_as_documented() {
        let paid_share = PaymentRequestStatusEventContent {
            body: "✅ @bob:example.org paid 33.34 EUR to @alice:example.org (dinner): 1 of 3 paid."
                .into(),
            status: RequestState::Open,
            payer: Some(owned_user_id!("@bob:example.org")),
            payer_status: Some(RequestState::Paid),
            payee: owned_user_id!("@alice:example.org"),
            amount: Decimal::new(3334, 2),
            currency: "EUR".into(),
            transfer_id: Some("126641242915474129283170112371829411359".into()),
            paid_count: 1,
            payer_count: Some(3),
            expires_at_ms: 1_796_204_800_000,
            relates_to: Reference::new(owned_event_id!("$sPlItReQuEsT")),
        };
        let cancelled = PaymentRequestStatusEventContent {
            body: "🚫 @alice:example.org cancelled the request to @bob:example.org for 12.00 EUR (pizza).".into(),
            status: RequestState::Cancelled,
            payer: None,
            payer_status: None,
            payee: owned_user_id!("@alice:example.org"),
            amount: Decimal::new(1200, 2),
            currency: "EUR".into(),
            transfer_id: None,
            paid_count: 0,
            payer_count: Some(1),
            expires_at_ms: 1_796_204_800_000,
            relates_to: Reference::new(owned_event_id!("$rEqUeSt")),
        };
        assert_eq!(
            cancelled.event_type().to_string(),
            "org.mxpay.payment_request.status"
        );
        let examples = documented("org.mxpay.payment_request.status");
        assert_eq!(examples.len(), 2);
        for (value, example) in [paid_share, cancelled].iter().zip(&examples) {
            assert_eq!(&serde_json::to_value(value).unwrap(), example);
            let read: PaymentRequestStatusEventContent =
                serde_json::from_value(example.clone()).unwrap();
            assert_eq!(serde_json::to_value(&read).unwrap(), *example);
        }
        // Every state's code is its serde form, and the schema lists exactly those.
        let schema: serde_json::Value = serde_json::from_str(include_str!(
            "../../docs/schemas/org.mxpay.payment_request.status.json"
        ))
        .unwrap();
        let states = [
            RequestState::Open,
            RequestState::Paid,
            RequestState::Declined,
            RequestState::Cancelled,
            RequestState::Expired,
        ];
        let codes: Vec<serde_json::Value> = states
            .iter()
            .map(|s| {
                assert_eq!(serde_json::to_value(s).unwrap(), s.code());
                serde_json::Value::from(s.code())
            })
            .collect();
        assert_eq!(
            schema["properties"]["status"]["enum"],
            serde_json::Value::from(codes.clone())
        );
        assert_eq!(
            schema["properties"]["payer_status"]["enum"],
            serde_json::Value::from(codes)
        );
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
