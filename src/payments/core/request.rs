//! Requests and split bills (issue 13): what the bot records and says when someone asks for
//! money, pays, declines or cancels a request, and when a request's payment ends. Pure: the
//! shell ([`crate::payments`]'s `requests.rs`) reads the request and the facts, the
//! transitions of [`crate::requests::Request`] decide, and these functions turn the outcome
//! into a [`Decision`].
//!
//! Rules (docs/payments.md, "Asking for money"):
//! - the request is posted readably: an `m.text` that mentions every payer (an `m.notice`
//!   never notifies), one `org.mxpay.payment_request` per payer, and a message mentioning the
//!   payer in their DM; each is linked to the request, so a reply or reaction to any of them
//!   finds it;
//! - amount, currency and payee of a payment come from the request ([`pay_terms`]);
//! - every change edits the notice (`m.replace`) and sends an `org.mxpay.payment_request.status`;
//! - a refusal is recorded for the event before it is said, with a typed receipt.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, UserId};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::decision::{Decision, EventRef, Outgoing, Record};
use crate::events::{
    PaymentRequestEventContent, PaymentRequestStatusEventContent, ReceiptEventContent,
    ReceiptReason, ReceiptStatus, RequestState,
};
use crate::requests::{
    format_minor, text, Audience, PaymentTerms, Reaction, ReplyAction, Request, RequestId,
    RequestRefusal, ShareState,
};
use crate::store::payments::{DeclineRecord, EventOutcome};

/// The role of the bot's readable notice of a request (edited as the request changes).
pub const NOTICE_ROLE: &str = "notice";

/// The role of the bot's typed `org.mxpay.payment_request` for `payer`.
pub fn event_role(payer: &UserId) -> String {
    format!("event:{payer}")
}

/// The role of the payer's DM message about a request.
pub const DM_ROLE: &str = "dm";

/// An `m.text` that notifies the people it mentions (`m.mentions`).
pub fn mention_content(body: &str, mentions: &[&UserId]) -> Value {
    json!({
        "msgtype": "m.text",
        "body": body,
        "m.mentions": {"user_ids": mentions},
    })
}

/// An edit (`m.replace`) of the bot's message `original`, whose text becomes `body`. The edit
/// itself mentions nobody (`m.mentions: {}`), so it does not notify again.
pub fn edit_content(original: &OwnedEventId, body: &str, mentions: &[&UserId]) -> Value {
    json!({
        "msgtype": "m.text",
        "body": format!("* {body}"),
        "m.new_content": mention_content(body, mentions),
        "m.mentions": {},
        "m.relates_to": {"rel_type": "m.replace", "event_id": original},
    })
}

/// The amount of `minor` units shown with the currency's decimals.
fn show(minor: u128, exponent: u32) -> String {
    format_minor(minor, exponent)
}

fn decimal(minor: u128, exponent: u32) -> Decimal {
    show(minor, exponent).parse().unwrap_or_default()
}

/// The payers a request names (none for a request open to everyone).
fn named_payers(request: &Request) -> Vec<&UserId> {
    match &request.audience {
        Audience::Named { shares } => shares.iter().map(|s| &*s.payer).collect(),
        Audience::Everyone { .. } => Vec::new(),
    }
}

/// The text of the bot's notice about `request` as it stands at `now_ms`: what is asked, then
/// one line per payer (✅ paid, ⏳ open, ❌ declined, 🚫 cancelled, ⌛ expired).
pub fn notice_text(request: &Request, exponent: u32, now_ms: u64) -> String {
    let currency = request.currency.as_str();
    let memo = request.memo.as_deref();
    let header = match (&request.audience, request.bill_total_minor) {
        (Audience::Named { shares }, Some(total)) => {
            let plan = crate::requests::SplitPlan {
                currency: request.currency,
                exponent,
                total_minor: total,
                shares: shares
                    .iter()
                    .map(|s| crate::requests::SplitShare {
                        payer: s.payer.clone(),
                        amount_minor: s.amount_minor,
                    })
                    .collect(),
                sender_share_minor: Some(
                    total.saturating_sub(shares.iter().map(|s| s.amount_minor).sum()),
                )
                .filter(|own| *own > 0),
            };
            text::split_notice(
                &request.requester,
                &show(total, exponent),
                currency,
                memo,
                &plan.describe(),
            )
        }
        (Audience::Named { shares }, None) => text::request_notice(
            &request.requester,
            &shares[0].payer,
            &show(shares[0].amount_minor, exponent),
            currency,
            memo,
        ),
        (Audience::Everyone { amount_minor, .. }, _) => text::open_request_notice(
            &request.requester,
            &show(*amount_minor, exponent),
            currency,
            memo,
        ),
    };
    let progress = text::split_progress(request, now_ms, |minor| {
        format!("{} {currency}", show(minor, exponent))
    });
    let status = request.status(now_ms).code();
    if progress.is_empty() {
        format!("{header}\nStatus: {status}")
    } else {
        format!("{header}\n{progress}\nStatus: {status}")
    }
}

/// Posts a new request: the notice in the room mentioning every payer, the typed request per
/// payer (or none, for a client's own `org.mxpay.payment_request`, which is the typed event),
/// a message mentioning each payer in their DM (`payer_dms`: the payers who have one); each
/// linked to the request. Handled again (the request existed), the same messages go out with
/// the same transaction ids: the homeserver shows them once.
pub fn announce(
    ev: &EventRef,
    request: &Request,
    exponent: u32,
    from_client_event: bool,
    payer_dms: &[(OwnedUserId, OwnedRoomId)],
    now_ms: u64,
) -> Decision {
    let id = &request.id;
    let payers = named_payers(request);
    let mut decision = Decision::none();
    let notice = Outgoing::event(
        &request.room_id,
        "m.room.message",
        mention_content(&notice_text(request, exponent, now_ms), &payers),
        "request-notice",
        id.to_string(),
    )
    .linked_to(id, NOTICE_ROLE);
    decision.sends.push(notice);
    if !from_client_event {
        for share in request.shares() {
            let content = PaymentRequestEventContent {
                body: text::request_notice(
                    &request.requester,
                    &share.payer,
                    &show(share.amount_minor, exponent),
                    request.currency.as_str(),
                    request.memo.as_deref(),
                ),
                payee: request.requester.clone(),
                amount: decimal(share.amount_minor, exponent),
                currency: request.currency.as_str().to_owned(),
                payer: Some(share.payer.clone()),
                memo: request.memo.clone(),
                expires_at_ms: Some(request.expires_at_ms),
                order_ref: None,
            };
            decision.sends.push(
                Outgoing::event(
                    &request.room_id,
                    "org.mxpay.payment_request",
                    serde_json::to_value(&content).expect("request serialises"),
                    "request-event",
                    format!("{id}|{}", share.payer),
                )
                .linked_to(id, &event_role(&share.payer)),
            );
        }
    }
    for (payer, dm) in payer_dms {
        let Some(share) = request.share_of(payer) else {
            continue;
        };
        let body = format!(
            "💸 {} asks you, {payer}, for {} {}{} in room {}. Reply !pay to this message (or \
             to the request in that room) or react ✅ to pay, ❌ to decline.",
            request.requester,
            show(share.amount_minor, exponent),
            request.currency.as_str(),
            request
                .memo
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default(),
            request.room_id,
        );
        decision.sends.push(
            Outgoing::event(
                dm,
                "m.room.message",
                mention_content(&body, &[payer]),
                "request-dm",
                format!("{id}|{payer}"),
            )
            .linked_to(id, DM_ROLE),
        );
    }
    decision.finish(ev)
}

/// What a refused command about a request is answered with: recorded for the event first
/// (the first decision wins, so a retry repeats it), then a declined receipt with the reason
/// and the sentence as a reply. `payee` is the other party (the requester when paying, the
/// person asked when requesting); the receipt's `payer` is the event's sender.
pub fn refuse(
    ev: &EventRef,
    payee: &UserId,
    amount: Decimal,
    currency: &str,
    reason: ReceiptReason,
    sentence: String,
) -> Decision {
    let record = DeclineRecord {
        reason: crate::payments::reason_code_of(reason),
        sentence,
        payee: payee.to_owned(),
        amount: amount.to_string(),
        currency: currency.to_owned(),
    };
    let mut decision = Decision::none();
    decision.record.push(Record::OutcomeIfAbsent {
        event_id: ev.event_id.clone(),
        outcome: EventOutcome::Declined(record.clone()),
    });
    decision.sends = refusal_sends(ev, &record);
    decision.finish(ev)
}

/// A refusal of a request command: "request not made: …" (or the action's words).
pub fn refuse_request(
    ev: &EventRef,
    payee: &UserId,
    amount: Decimal,
    currency: &str,
    refusal: RequestRefusal,
    doing: &str,
) -> Decision {
    refuse(
        ev,
        payee,
        amount,
        currency,
        crate::payments::reason_of_request(refusal),
        format!("{doing}: {}", refusal.sentence()),
    )
}

/// The receipt and the sentence of a recorded refusal (the same transaction ids each time).
pub fn refusal_sends(ev: &EventRef, record: &DeclineRecord) -> Vec<Outgoing> {
    let body = format!("❌ {}: {}", ev.sender, record.sentence);
    let receipt = ReceiptEventContent {
        body,
        status: ReceiptStatus::Declined,
        reason: Some(crate::payments::reason_of_code(&record.reason)),
        transfer_id: None,
        payer: ev.sender.clone(),
        payee: record.payee.clone(),
        amount: record.amount.parse().unwrap_or_default(),
        currency: record.currency.clone(),
        request_event_id: None,
        merchant: None,
        order_ref: None,
        refund_of: None,
        relates_to: ruma::events::relation::Reference::new(ev.event_id.clone()),
    };
    let key = ev.event_id.as_str();
    // One message: people read the sentence, bots the typed receipt it carries.
    vec![Outgoing::event(
        &ev.room_id,
        "m.room.message",
        crate::events::notice_carrying(
            "org.mxpay.receipt",
            serde_json::to_value(&receipt).expect("receipt serialises"),
            Some(&ev.event_id),
        ),
        "request-refusal-receipt",
        key,
    )]
}

/// What a reply or reaction to a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pay it (`!pay` reply, ✅/👍, a transfer intent naming it).
    Pay,
    /// Decline it (`!decline` reply, ❌).
    Decline,
    /// Withdraw it (`!cancel` reply, by the requester).
    Cancel,
}

impl Action {
    /// The action of a reply command on a request; `None` for those handled elsewhere
    /// (`!accept`: payments held for their payee; `!refund`: receipts).
    pub fn of_reply(action: ReplyAction) -> Option<Self> {
        match action {
            ReplyAction::Pay => Some(Action::Pay),
            ReplyAction::Decline => Some(Action::Decline),
            ReplyAction::Cancel => Some(Action::Cancel),
            ReplyAction::Accept | ReplyAction::Refund { .. } => None,
        }
    }

    /// The action of a reaction.
    pub fn of_reaction(reaction: Reaction) -> Self {
        match reaction {
            Reaction::Yes => Action::Pay,
            Reaction::No => Action::Decline,
        }
    }
}

/// The terms a payment of `request` by `payer` pays, and the request once it started (the
/// share `paying` with `transfer_id`, the transfer derived from the paying event). `None`
/// request: the message answered is no request the bot knows.
pub fn pay_terms(
    request: Option<&Request>,
    payer: &UserId,
    transfer_id: u128,
    now_ms: u64,
) -> Result<(Request, PaymentTerms), RequestRefusal> {
    let request = request.ok_or(RequestRefusal::ReplyTargetUnknown)?;
    request.start_payment(payer, transfer_id, now_ms)
}

/// The facts a change of a request is told with: the bot's notice to edit (if it was
/// posted) and the typed request event the status references for each payer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    /// The bot's readable notice.
    pub notice: Option<OwnedEventId>,
    /// The typed request event per payer (the bot's), or the client's own request event
    /// (then the request id) for everyone.
    pub events: Vec<(OwnedUserId, OwnedEventId)>,
}

impl Posted {
    fn event_for(&self, request: &Request, payer: Option<&UserId>) -> OwnedEventId {
        payer
            .and_then(|p| self.events.iter().find(|(u, _)| u == p))
            .or(self.events.first())
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| request.id.0.clone())
    }
}

/// How a request changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The payer declined.
    Declined,
    /// The requester cancelled.
    Cancelled,
    /// The payer's payment (ledger transfer) was posted.
    Paid {
        /// The transfer.
        transfer_id: u128,
    },
    /// The payer's payment ended without money moving: the share is open again.
    Abandoned,
    /// The request lapsed.
    Expired,
}

/// A change of `before` into `after` (a transition's result), about `payer` (absent for the
/// whole request), made by the event `acted_by` (a reply or reaction; absent for what the
/// outbox or the sweep saw: then `key` makes the transaction ids). Records it (a conflict
/// with another change makes the whole transaction run again), edits the notice, sends the
/// status event and tells who must know: the requester of a decline, the open payers of a
/// cancel.
#[allow(clippy::too_many_arguments)]
pub fn changed(
    before: &Request,
    after: &Request,
    payer: Option<&UserId>,
    change: Change,
    acted_by: Option<&EventRef>,
    key: &str,
    posted: &Posted,
    exponent: u32,
    now_ms: u64,
) -> Decision {
    let mut decision = Decision::none();
    decision.store.push(Record::RequestUpdate {
        before: Box::new(before.clone()),
        after: Box::new(after.clone()),
        acted_by: acted_by.map(|ev| ev.event_id.clone()),
    });
    let currency = after.currency.as_str();
    let memo = after.memo.as_deref();
    let share = payer.and_then(|p| after.share_of(p));
    let amount_minor = share.map(|s| s.amount_minor).unwrap_or_else(|| {
        after
            .shares()
            .first()
            .map(|s| s.amount_minor)
            .unwrap_or_default()
    });
    let amount = show(amount_minor, exponent);
    let status = after.status(now_ms);
    let (body, payer_status, transfer_id, tell): (String, Option<RequestState>, _, Vec<&UserId>) =
        match change {
            Change::Paid { transfer_id } => (
                text::paid_status(
                    payer.unwrap_or(&after.requester),
                    &after.requester,
                    &amount,
                    currency,
                    memo,
                    after.paid_count(),
                    after.payer_count(),
                ),
                Some(RequestState::Paid),
                Some(transfer_id.to_string()),
                Vec::new(),
            ),
            Change::Declined => (
                text::ended_status(
                    RequestState::Declined,
                    &after.requester,
                    payer,
                    &amount,
                    currency,
                    memo,
                ),
                Some(RequestState::Declined),
                None,
                vec![&*after.requester],
            ),
            Change::Cancelled => (
                text::ended_status(
                    RequestState::Cancelled,
                    &after.requester,
                    single_payer(after),
                    &amount,
                    currency,
                    memo,
                ),
                None,
                None,
                before
                    .shares()
                    .iter()
                    .filter(|s| s.state == ShareState::Open)
                    .map(|s| &*s.payer)
                    .collect(),
            ),
            Change::Expired => (
                text::ended_status(
                    RequestState::Expired,
                    &after.requester,
                    single_payer(after),
                    &amount,
                    currency,
                    memo,
                ),
                None,
                None,
                Vec::new(),
            ),
            Change::Abandoned => {
                // The share is open again (or ended with the request): only the notice shows it.
                push_edit(&mut decision, after, posted, exponent, now_ms, key);
                return decision;
            }
        };
    let status_content = PaymentRequestStatusEventContent {
        body: body.clone(),
        status,
        payer: payer_status.and(payer.map(ToOwned::to_owned)),
        payer_status,
        payee: after.requester.clone(),
        amount: decimal(amount_minor, exponent),
        currency: currency.to_owned(),
        transfer_id,
        paid_count: after.paid_count(),
        payer_count: after.payer_count(),
        expires_at_ms: after.expires_at_ms,
        relates_to: ruma::events::relation::Reference::new(posted.event_for(after, payer)),
    };
    decision.sends.push(Outgoing::event(
        &after.room_id,
        "org.mxpay.payment_request.status",
        serde_json::to_value(&status_content).expect("status serialises"),
        "request-status",
        key,
    ));
    push_edit(&mut decision, after, posted, exponent, now_ms, key);
    if !tell.is_empty() {
        decision.sends.push(Outgoing::event(
            &after.room_id,
            "m.room.message",
            mention_content(&body, &tell),
            "request-tell",
            key,
        ));
    }
    if let Some(ev) = acted_by {
        decision = decision.finish(ev);
    }
    decision
}

fn single_payer(request: &Request) -> Option<&UserId> {
    match &request.audience {
        Audience::Named { shares } if shares.len() == 1 => Some(&shares[0].payer),
        _ => None,
    }
}

fn push_edit(
    decision: &mut Decision,
    request: &Request,
    posted: &Posted,
    exponent: u32,
    now_ms: u64,
    key: &str,
) {
    if let Some(notice) = &posted.notice {
        let payers = named_payers(request);
        decision.sends.push(Outgoing::event(
            &request.room_id,
            "m.room.message",
            edit_content(notice, &notice_text(request, exponent, now_ms), &payers),
            "request-edit",
            key,
        ));
    }
}

/// The request id a payment's memo names, parsed.
pub fn request_id_of(memo_request: Option<&str>) -> Option<RequestId> {
    memo_request
        .and_then(|id| OwnedEventId::try_from(id).ok())
        .map(RequestId)
}

#[cfg(test)]
mod tests;
