//! `org.mxpay.receipt`: the outcome of a payment step, referencing the event it answers.

use matrix_sdk::ruma::events::macros::EventContent;
use matrix_sdk::ruma::events::relation::Reference;
use matrix_sdk::ruma::{OwnedEventId, OwnedUserId};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// How the payment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    /// Money moved.
    Completed,
    /// The payer or policy said no.
    Declined,
    /// Something went wrong; no money moved.
    Failed,
    /// No PIN in time, or a held payment not accepted in time; the reservation was released.
    Expired,
    /// Confirmed by the payer and reserved, waiting for the payee to accept it (a payment
    /// the payee accepts: `payments.payee_must_accept`, or a payee who never used mxpay).
    Held,
}

/// Why a payment did not complete. Stable codes: clients may switch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptReason {
    /// The payer's balance does not cover the amount.
    InsufficientFunds,
    /// A per-transfer or rolling 24 h limit.
    LimitExceeded,
    /// The payee is not in the room or may not hold a wallet.
    PayeeNotAllowed,
    /// The command came unencrypted or from an encrypted room's plaintext event.
    NotEncrypted,
    /// The sender's device is not cross-signed by its owner.
    UntrustedDevice,
    /// The payer's cross-signing identity changed and they have not confirmed it with their PIN.
    IdentityChanged,
    /// Too many wrong PINs.
    PinLocked,
    /// The payer has not set a PIN.
    PinNotSet,
    /// The account is frozen.
    AccountFrozen,
    /// The currency is unknown or the amount malformed.
    InvalidAmount,
    /// The step-up window passed.
    Timeout,
    /// The request reached the bot only after the step-up window had passed since it was
    /// sent (e.g. its decryption key arrived late): nothing was started.
    TooLate,
    /// The payer already has as many payments and withdrawals waiting for their PIN as
    /// allowed (`payments.pending_per_user_max`): confirm or cancel one first.
    TooManyPending,
    /// The payer started more payment commands in the last minute than allowed
    /// (`payments.commands_per_minute_max`).
    RateLimited,
    /// The codes below are those of requests, split bills, refunds and payments the payee
    /// accepts (the same codes as the request module's `RequestRefusal`).
    /// A request named its own sender as payer (or in a split).
    RequestFromSelf,
    /// A request named the bot as payer.
    RequestFromBot,
    /// A client's payment request names another payee than its sender.
    RequestPayeeNotSender,
    /// A payer named by a request is not joined to the room.
    PayerNotInRoom,
    /// A request's note is longer than 140 characters.
    MemoTooLong,
    /// The message replied to is no request or payment the bot knows.
    ReplyTargetUnknown,
    /// Someone other than a payer the request names tried to pay or decline it.
    NotThePayer,
    /// Someone other than the requester tried to cancel a request.
    NotTheRequester,
    /// The request was already paid by this payer (paying twice).
    RequestAlreadyPaid,
    /// The request was declined.
    RequestDeclined,
    /// The requester cancelled the request.
    RequestCancelled,
    /// The request lapsed.
    RequestExpired,
    /// A payment of the request by this payer already waits for their PIN.
    RequestPaymentPending,
    /// A request open to everyone cannot be declined.
    RequestOpenToEveryone,
    /// A request open to everyone was paid by as many members as it takes.
    RequestFull,
    /// The requester has as many open requests as allowed.
    TooManyOpenRequests,
    /// The payer has as many open requests addressed to them as allowed.
    PayerHasTooManyRequests,
    /// The bot keeps as many open requests as it can.
    RequestsFull,
    /// A split with fewer than two shares.
    SplitOnePerson,
    /// A split share would be less than one minor unit.
    SplitShareBelowMinorUnit,
    /// Someone is named twice in a split.
    SplitDuplicatePerson,
    /// A split names more people than allowed.
    SplitTooManyPeople,
    /// Only the payee of a payment can refund it.
    RefundNotPayee,
    /// The refund is more than what remains of the payment.
    RefundAboveRemaining,
    /// A refund cannot be refunded.
    RefundOfRefund,
    /// The payment was already refunded in full.
    RefundNothingLeft,
    /// Only a completed payment can be refunded.
    RefundNotCompleted,
    /// Only its payee can accept or decline a payment held for acceptance.
    NotThePayee,
    /// The time to accept the payment has passed.
    AcceptanceWindowPassed,
    /// The held payment was already accepted, declined or returned.
    PaymentAlreadySettled,
    /// The payee declined a payment held for them to accept: it went back to the payer.
    PayeeDeclined,
    /// The payee (or the bot in all) already has as many payments waiting to be accepted as
    /// the bot keeps.
    TooManyHeld,
    /// The request's sender is a disabled merchant: it cannot invoice.
    MerchantDisabled,
    /// Anything else; the body says more.
    Other,
}

/// The outcome, with the payment's facts.
#[derive(Clone, Debug, Deserialize, Serialize, EventContent)]
#[ruma_event(type = "org.mxpay.receipt", kind = MessageLike)]
pub struct ReceiptEventContent {
    /// Fallback text, e.g. "✅ @alice paid @bob 12.50 EUR (lunch)".
    pub body: String,
    /// How it ended.
    pub status: ReceiptStatus,
    /// Why, when not completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ReceiptReason>,
    /// The ledger transfer, as a decimal string of its 128-bit id (absent if none was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    /// Who pays.
    pub payer: OwnedUserId,
    /// Who is paid.
    pub payee: OwnedUserId,
    /// Amount in major units.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// The payment request this payment paid (its id: the event that asked), when it paid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_event_id: Option<OwnedEventId>,
    /// The merchant paid, when the payee is a registered merchant's Matrix user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchant: Option<ReceiptMerchant>,
    /// The merchant's order reference, when the payment paid one of its invoices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_ref: Option<String>,
    /// For a refund: the payment it refunds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_of: Option<RefundOf>,
    /// The event this answers.
    #[serde(rename = "m.relates_to")]
    pub relates_to: Reference,
}

/// The merchant a receipt names.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ReceiptMerchant {
    /// The merchant's id.
    pub merchant_id: String,
    /// The name customers see.
    pub display_name: String,
}

/// The payment a refund gives money back from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct RefundOf {
    /// The original ledger transfer, as the decimal string of its 128-bit id.
    pub transfer_id: String,
    /// The bot's receipt of the original payment that the `!refund` replied to.
    pub receipt_event_id: OwnedEventId,
}
