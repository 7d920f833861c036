//! Why a request, split, refund or acceptance was refused: stable reason codes and the sentence
//! the room gets for each.

use serde::{Deserialize, Serialize};

use crate::ledger::AmountError;

/// A refusal of something about requests, split bills, refunds or payments the payee accepts.
/// Nothing moved. The code (`code()`, also the serde form) is stable: receipts carry it as
/// `reason` and clients may switch on it. The order is the order of precedence in which the
/// checks run where several could apply (who you are first, then the request's state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestRefusal {
    /// The requester named themselves as payer (or in a split).
    RequestFromSelf,
    /// The bot was named as payer.
    RequestFromBot,
    /// A client's `org.mxpay.payment_request` names another `payee` than its sender.
    RequestPayeeNotSender,
    /// A named payer is not joined to the room.
    PayerNotInRoom,
    /// The request's note is longer than a `!pay` note may be (140 characters).
    MemoTooLong,
    /// The message replied to (or reacted to) is no request or payment the bot knows.
    ReplyTargetUnknown,
    /// Someone other than a payer the request names tried to pay or decline it.
    NotThePayer,
    /// Someone other than the requester tried to cancel it.
    NotTheRequester,
    /// This payer already paid it.
    RequestAlreadyPaid,
    /// This payer declined it.
    RequestDeclined,
    /// The requester cancelled it.
    RequestCancelled,
    /// It lapsed.
    RequestExpired,
    /// A payment of it by this payer already waits for their PIN.
    RequestPaymentPending,
    /// A request open to everyone cannot be declined (not paying it is enough).
    RequestOpenToEveryone,
    /// A request open to everyone was paid by as many members as it takes.
    RequestFull,
    /// The requester has as many open requests as allowed.
    TooManyOpenRequests,
    /// The payer already has as many open requests addressed to them as allowed.
    PayerHasTooManyRequests,
    /// The bot holds as many open requests as it keeps in all.
    RequestsFull,
    /// A split with fewer than two shares.
    SplitOnePerson,
    /// A split share would be below one minor unit of the currency.
    SplitShareBelowMinorUnit,
    /// Someone is named twice in a split.
    SplitDuplicatePerson,
    /// A split names more people than allowed.
    SplitTooManyPeople,
    /// Someone other than the payee of the original payment asked to refund it.
    RefundNotPayee,
    /// The refund is more than what remains of the original payment.
    RefundAboveRemaining,
    /// The payment replied to is itself a refund.
    RefundOfRefund,
    /// The original payment was already refunded in full.
    RefundNothingLeft,
    /// The original payment is not completed (waiting for a PIN, cancelled, or held for the
    /// payee to accept).
    RefundNotCompleted,
    /// Someone other than its payee tried to accept or decline a payment held for acceptance.
    NotThePayee,
    /// The window to accept the payment has passed: it goes back to the payer.
    AcceptanceWindowPassed,
    /// The held payment was already accepted, declined or returned.
    PaymentAlreadySettled,
}

impl RequestRefusal {
    /// Every code, in order of precedence.
    pub const ALL: [RequestRefusal; 30] = [
        RequestRefusal::RequestFromSelf,
        RequestRefusal::RequestFromBot,
        RequestRefusal::RequestPayeeNotSender,
        RequestRefusal::PayerNotInRoom,
        RequestRefusal::MemoTooLong,
        RequestRefusal::ReplyTargetUnknown,
        RequestRefusal::NotThePayer,
        RequestRefusal::NotTheRequester,
        RequestRefusal::RequestAlreadyPaid,
        RequestRefusal::RequestDeclined,
        RequestRefusal::RequestCancelled,
        RequestRefusal::RequestExpired,
        RequestRefusal::RequestPaymentPending,
        RequestRefusal::RequestOpenToEveryone,
        RequestRefusal::RequestFull,
        RequestRefusal::TooManyOpenRequests,
        RequestRefusal::PayerHasTooManyRequests,
        RequestRefusal::RequestsFull,
        RequestRefusal::SplitOnePerson,
        RequestRefusal::SplitShareBelowMinorUnit,
        RequestRefusal::SplitDuplicatePerson,
        RequestRefusal::SplitTooManyPeople,
        RequestRefusal::RefundNotPayee,
        RequestRefusal::RefundAboveRemaining,
        RequestRefusal::RefundOfRefund,
        RequestRefusal::RefundNothingLeft,
        RequestRefusal::RefundNotCompleted,
        RequestRefusal::NotThePayee,
        RequestRefusal::AcceptanceWindowPassed,
        RequestRefusal::PaymentAlreadySettled,
    ];

    /// The stable code, e.g. `request_already_paid` (the same as the serde form).
    pub fn code(self) -> &'static str {
        match self {
            RequestRefusal::RequestFromSelf => "request_from_self",
            RequestRefusal::RequestFromBot => "request_from_bot",
            RequestRefusal::RequestPayeeNotSender => "request_payee_not_sender",
            RequestRefusal::PayerNotInRoom => "payer_not_in_room",
            RequestRefusal::MemoTooLong => "memo_too_long",
            RequestRefusal::ReplyTargetUnknown => "reply_target_unknown",
            RequestRefusal::NotThePayer => "not_the_payer",
            RequestRefusal::NotTheRequester => "not_the_requester",
            RequestRefusal::RequestAlreadyPaid => "request_already_paid",
            RequestRefusal::RequestDeclined => "request_declined",
            RequestRefusal::RequestCancelled => "request_cancelled",
            RequestRefusal::RequestExpired => "request_expired",
            RequestRefusal::RequestPaymentPending => "request_payment_pending",
            RequestRefusal::RequestOpenToEveryone => "request_open_to_everyone",
            RequestRefusal::RequestFull => "request_full",
            RequestRefusal::TooManyOpenRequests => "too_many_open_requests",
            RequestRefusal::PayerHasTooManyRequests => "payer_has_too_many_requests",
            RequestRefusal::RequestsFull => "requests_full",
            RequestRefusal::SplitOnePerson => "split_one_person",
            RequestRefusal::SplitShareBelowMinorUnit => "split_share_below_minor_unit",
            RequestRefusal::SplitDuplicatePerson => "split_duplicate_person",
            RequestRefusal::SplitTooManyPeople => "split_too_many_people",
            RequestRefusal::RefundNotPayee => "refund_not_payee",
            RequestRefusal::RefundAboveRemaining => "refund_above_remaining",
            RequestRefusal::RefundOfRefund => "refund_of_refund",
            RequestRefusal::RefundNothingLeft => "refund_nothing_left",
            RequestRefusal::RefundNotCompleted => "refund_not_completed",
            RequestRefusal::NotThePayee => "not_the_payee",
            RequestRefusal::AcceptanceWindowPassed => "acceptance_window_passed",
            RequestRefusal::PaymentAlreadySettled => "payment_already_settled",
        }
    }

    /// The refusal with this code, if it is one.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The sentence for the room, in the style of the payment refusals ("❌ @bob: request not
    /// paid: {sentence}"): lower case, no final stop, never a secret.
    pub fn sentence(self) -> &'static str {
        match self {
            RequestRefusal::RequestFromSelf => {
                "you cannot ask yourself for money (to count your own share of a split, add +me)"
            }
            RequestRefusal::RequestFromBot => "I cannot be asked for money; ask a person",
            RequestRefusal::RequestPayeeNotSender => {
                "a request can only ask for money to be paid to the one who sends it"
            }
            RequestRefusal::PayerNotInRoom => {
                "the person you ask is not a member of this room; invite them, or ask in a room you share"
            }
            RequestRefusal::MemoTooLong => "the note is longer than 140 characters",
            RequestRefusal::ReplyTargetUnknown => {
                "I know of no request or payment in the message you answered; reply to my message about it"
            }
            RequestRefusal::NotThePayer => "this request is not addressed to you",
            RequestRefusal::NotTheRequester => {
                "only the person who asked for the money can cancel this request"
            }
            RequestRefusal::RequestAlreadyPaid => "this request has already been paid",
            RequestRefusal::RequestDeclined => "this request was declined",
            RequestRefusal::RequestCancelled => {
                "this request was cancelled by the person who asked for the money"
            }
            RequestRefusal::RequestExpired => "this request has expired",
            RequestRefusal::RequestPaymentPending => {
                "your payment of this request is already waiting for your PIN in our private chat (send !cancel there to start again)"
            }
            RequestRefusal::RequestOpenToEveryone => {
                "this request is open to everyone in the room: there is nothing to decline, just do not pay it"
            }
            RequestRefusal::RequestFull => {
                "this request has been paid by as many people as it can take"
            }
            RequestRefusal::TooManyOpenRequests => {
                "you already have as many open requests as allowed; cancel one (reply !cancel to it) or wait until they are paid"
            }
            RequestRefusal::PayerHasTooManyRequests => {
                "the person you ask already has as many open requests as allowed; try again once they have answered some"
            }
            RequestRefusal::RequestsFull => "I cannot take more requests right now; try again later",
            RequestRefusal::SplitOnePerson => {
                "a split needs at least two shares: name two people, or one and add +me; to ask one person, use !request"
            }
            RequestRefusal::SplitShareBelowMinorUnit => {
                "a share would be less than the smallest unit of the currency"
            }
            RequestRefusal::SplitDuplicatePerson => "someone is named twice in this split",
            RequestRefusal::SplitTooManyPeople => {
                "a split can name at most 25 people"
            }
            RequestRefusal::RefundNotPayee => {
                "only the person who was paid can refund this payment"
            }
            RequestRefusal::RefundAboveRemaining => {
                "the refund is more than what remains of this payment"
            }
            RequestRefusal::RefundOfRefund => {
                "a refund cannot be refunded; pay the person instead"
            }
            RequestRefusal::RefundNothingLeft => "this payment was already refunded in full",
            RequestRefusal::RefundNotCompleted => "only a completed payment can be refunded",
            RequestRefusal::NotThePayee => {
                "this payment is meant for someone else; only its payee can accept or decline it"
            }
            RequestRefusal::AcceptanceWindowPassed => {
                "the time to accept this payment has passed; it goes back to the payer"
            }
            RequestRefusal::PaymentAlreadySettled => {
                "this payment was already accepted, declined or returned"
            }
        }
    }
}

impl std::fmt::Display for RequestRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.sentence())
    }
}

/// Why creating a request or split, or planning a refund, failed: a rule of this module, or an
/// amount the currency does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A rule of requests, splits, refunds or acceptance.
    #[error("{0}")]
    Refused(RequestRefusal),
    /// The amount or currency was refused (zero, negative, too many decimal places, unknown
    /// currency, above the maximum): receipt reason `invalid_amount`.
    #[error("{0}")]
    Amount(AmountError),
}

impl RequestError {
    /// The receipt reason code: the refusal's code, or `invalid_amount`.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::Refused(refusal) => refusal.code(),
            RequestError::Amount(_) => "invalid_amount",
        }
    }

    /// The sentence for the room.
    pub fn sentence(&self) -> String {
        self.to_string()
    }
}

impl From<RequestRefusal> for RequestError {
    fn from(refusal: RequestRefusal) -> Self {
        RequestError::Refused(refusal)
    }
}

impl From<AmountError> for RequestError {
    fn from(error: AmountError) -> Self {
        RequestError::Amount(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_match_serde() {
        let mut seen = std::collections::HashSet::new();
        for refusal in RequestRefusal::ALL {
            let code = refusal.code();
            assert!(seen.insert(code), "{code} twice");
            assert!(
                code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{code}"
            );
            assert_eq!(serde_json::to_value(refusal).unwrap(), code);
            assert_eq!(RequestRefusal::from_code(code), Some(refusal));
        }
        assert_eq!(RequestRefusal::from_code("insufficient_funds"), None);
    }

    #[test]
    fn sentences_are_lower_case_fragments_without_a_final_stop() {
        for refusal in RequestRefusal::ALL {
            let sentence = refusal.sentence();
            let first = sentence.chars().next().unwrap();
            // "I" is the bot speaking; everything else starts lower case like the payment refusals.
            assert!(
                first.is_lowercase() || sentence.starts_with("I "),
                "{sentence}"
            );
            assert!(!sentence.ends_with('.'), "{sentence}");
            assert!(sentence.len() < 200, "{sentence}");
        }
        assert_eq!(
            RequestError::from(RequestRefusal::RequestExpired).sentence(),
            "this request has expired"
        );
        assert_eq!(
            RequestError::from(AmountError::Zero).code(),
            "invalid_amount"
        );
    }

    /// The design page lists every code, so the room's sentences and the docs cannot drift.
    #[test]
    fn every_code_is_documented() {
        let docs = include_str!("../../docs/requests-design.md");
        for refusal in RequestRefusal::ALL {
            assert!(
                docs.contains(&format!("`{}`", refusal.code())),
                "{} is not in docs/requests-design.md",
                refusal.code()
            );
        }
    }

    /// Codes are a public format: pinned, so a rename is a visible, deliberate change.
    #[test]
    fn codes_are_pinned() {
        let codes: Vec<&str> = RequestRefusal::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(
            codes.join(","),
            "request_from_self,request_from_bot,request_payee_not_sender,payer_not_in_room,\
             memo_too_long,reply_target_unknown,not_the_payer,not_the_requester,request_already_paid,\
             request_declined,request_cancelled,request_expired,request_payment_pending,\
             request_open_to_everyone,request_full,too_many_open_requests,\
             payer_has_too_many_requests,requests_full,split_one_person,\
             split_share_below_minor_unit,split_duplicate_person,split_too_many_people,\
             refund_not_payee,refund_above_remaining,refund_of_refund,refund_nothing_left,\
             refund_not_completed,not_the_payee,acceptance_window_passed,payment_already_settled"
        );
    }
}
