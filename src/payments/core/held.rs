//! Payments the payee accepts (WeChat's accept-or-return; docs/payments.md, "Payments the
//! payee accepts"): what the bot records, moves and says when a held payment is confirmed by
//! its payer, accepted or declined by its payee, or returns by itself. Pure: the shell
//! (`src/payments/held.rs`) reads the held record, the ledger's transfer and the sender's
//! trust; these functions decide.
//!
//! Rules:
//! - a payment is held when the operator's switch is on, or its payee never used mxpay
//!   ([`crate::requests::payee_must_accept`]); it is reserved for the payer's PIN window plus
//!   the accept window, so the ledger's own timeout returns it when the window ends;
//! - the payer's right PIN does not post it: the room gets an `m.text` mentioning the payee
//!   (an `m.notice` never notifies) and a `held` receipt, the payer a note in their DM;
//! - only the payee, from a trusted session, within the window, while it is held, may accept
//!   (post) or decline (void); everyone else is refused with a reason code, nothing moves;
//! - each change edits the held notice (`m.replace`); the money's receipts come from the
//!   outbox, as for every payment;
//! - the same reaction or reply handled again repeats its decision (the ledger posts a
//!   reservation at most once).

use ruma::OwnedEventId;
use serde_json::Value;

use super::decision::{Decision, EventRef, LedgerOp, Outgoing, Record};
use super::request::{edit_content, mention_content};
use crate::events::{ReceiptEventContent, ReceiptReason, ReceiptStatus};
use crate::ledger::TransferId;
use crate::requests::{HeldOutcome, HeldPayment, RequestRefusal};
use crate::store::held::{HeldRecord, HeldState};
use crate::store::payments::{Challenge, DeclineRecord, EventOutcome};

/// What the payee asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldAction {
    /// ✅, 👍 or `!accept`: take the money.
    Accept,
    /// ❌ or `!decline`: send it back.
    Decline,
}

/// Where the ledger's reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    /// Still reserved.
    Pending,
    /// Posted (accepted).
    Posted,
    /// Voided (declined, or never confirmed).
    Voided,
    /// Expired (the window passed).
    Expired,
    /// Not in the ledger.
    Missing,
}

/// How long `ms` is, for people ("24 hours", "5 minutes", "30 seconds").
pub fn describe_ms(ms: u64) -> String {
    let (n, unit) = if ms >= 3_600_000 && ms.is_multiple_of(3_600_000) {
        (ms / 3_600_000, "hour")
    } else if ms >= 60_000 && ms.is_multiple_of(60_000) {
        (ms / 60_000, "minute")
    } else {
        (ms.div_ceil(1_000).max(1), "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

fn money(record: &HeldRecord) -> String {
    format!("{} {}", record.amount, record.currency)
}

/// The text of the held notice as `record` stands.
pub fn notice_text(record: &HeldRecord, accept_window_ms: u64) -> String {
    let (payer, payee, money) = (&record.payer, &record.payee, money(record));
    match &record.state {
        HeldState::AwaitingPin | HeldState::Held => format!(
            "💸 {payer} sent {payee} {money}. {payee}: it is yours once you accept it. React ✅ \
             to this message or reply !accept to take it; ❌ or !decline sends it back. Not \
             accepted within {}, it goes back to {payer}.",
            describe_ms(accept_window_ms)
        ),
        HeldState::Accepted { .. } => {
            format!("✅ {payee} accepted {payer}'s payment of {money}.")
        }
        HeldState::Declined { .. } => {
            format!("↩️ {payee} declined {payer}'s payment of {money}; it went back to {payer}.")
        }
        HeldState::Returned | HeldState::Lapsed => format!(
            "⌛ {payee} did not accept {payer}'s payment of {money} in time; it went back to \
             {payer}."
        ),
    }
}

fn receipt(
    record: &HeldRecord,
    body: String,
    status: ReceiptStatus,
    reason: Option<ReceiptReason>,
    relates_to: OwnedEventId,
) -> Value {
    serde_json::to_value(ReceiptEventContent {
        body,
        status,
        reason,
        transfer_id: Some(record.transfer_id.to_string()),
        payer: record.payer.clone(),
        payee: record.payee.clone(),
        amount: record.amount.parse().unwrap_or_default(),
        currency: record.currency.clone(),
        request_event_id: None,
        refund_of: None,
        merchant: None,
        order_ref: None,
        relates_to: ruma::events::relation::Reference::new(relates_to),
    })
    .expect("receipt serialises")
}

/// A new held payment, waiting for its payer's PIN: the record the shell stores before the
/// challenge is opened.
pub fn new_record(challenge: &Challenge, return_at_ms: u64) -> Option<HeldRecord> {
    Some(HeldRecord {
        transfer_id: challenge.transfer_id,
        payer: challenge.payer.clone(),
        payee: challenge.payee.as_str().try_into().ok()?,
        room_id: challenge.room_id.clone(),
        paying_event_id: challenge.event_id.clone(),
        amount_minor: challenge.amount_minor,
        amount: challenge.amount.clone(),
        currency: challenge.currency.clone(),
        pin_deadline_ms: challenge.expires_at_ms,
        return_at_ms,
        notice_event_id: None,
        state: HeldState::AwaitingPin,
    })
}

/// The payer's PIN was right for a held payment (`ev` is the PIN event, in the payer's DM):
/// nothing is posted; the payment is held, the payee is asked in the room (mentioned, so they
/// are notified) with a `held` receipt beside it, and the payer is told in the DM. Handled
/// again (a retry), it writes and says the same (the same transaction ids). The challenge is
/// removed once the notice is sent ([`Outgoing::held_notice_of`]).
pub fn on_pin(ev: &EventRef, record: &HeldRecord, accept_window_ms: u64) -> Decision {
    let mut held = record.clone();
    if held.state == HeldState::AwaitingPin {
        held.state = HeldState::Held;
    }
    let key = TransferId(record.transfer_id).to_string();
    let text = notice_text(&held, accept_window_ms);
    let mut notice = Outgoing::event(
        &record.room_id,
        "m.room.message",
        mention_content(&text, &[&record.payee]),
        "held-notice",
        key.clone(),
    );
    notice.held_notice_of = Some(TransferId(record.transfer_id));
    let body = format!(
        "⏳ {}'s payment of {} to {} is held until {} accepts it.",
        record.payer,
        money(record),
        record.payee,
        record.payee
    );
    let typed = Outgoing::event(
        &record.room_id,
        "org.mxpay.receipt",
        receipt(
            record,
            body,
            ReceiptStatus::Held,
            None,
            record.paying_event_id.clone(),
        ),
        "held-receipt",
        key.clone(),
    );
    // The challenge stays open until the notice is out (the send removes it): a retry after a
    // failed send confirms again and says the same, instead of "not waiting for a PIN".
    let mut decision = Decision::none()
        .then_store(Record::Held(Box::new(held)))
        .then_send(notice)
        .then_send(typed);
    if ev.room_id != record.room_id {
        decision = decision.then_send(Outgoing::notice(
            &ev.room_id,
            format!(
                "⏳ Confirmed: your payment of {} to {} is reserved and waits for them to \
                 accept it. If they decline it, or do not accept it within {}, the money comes \
                 back to you.",
                money(record),
                record.payee,
                describe_ms(accept_window_ms)
            ),
            None,
            "held-payer",
            key,
        ));
    }
    decision
}

/// What the payee's answer leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Post or void it (or, handled again, the same once more).
    Settle(Decision),
    /// Refused with this code; nothing moves.
    Refused(ReceiptReason, String),
}

/// The facts of one answer to a held payment.
#[derive(Debug, Clone, Copy)]
pub struct AnswerFacts<'a> {
    /// The answering reaction or reply.
    pub event: &'a EventRef,
    /// Accept or decline.
    pub action: HeldAction,
    /// The sender's session: `Err((reason, sentence))` when it may not answer (unencrypted
    /// in an encrypted room, a session its owner did not cross-sign, a changed identity).
    pub trust: Result<(), (ReceiptReason, &'a str)>,
    /// Where the ledger's reservation stands.
    pub reservation: ReservationState,
    /// The clock.
    pub now_ms: u64,
    /// The configured accept window (for the notice's text).
    pub accept_window_ms: u64,
    /// The payer's wallet is frozen, or the payee's for all movement: accepting waits (the
    /// ledger would post a reservation made before the freeze).
    pub frozen: bool,
}

fn refused(refusal: RequestRefusal) -> Answer {
    Answer::Refused(
        crate::payments::reason_of_request(refusal),
        refusal.sentence().to_owned(),
    )
}

/// The payee (or someone else) answers `record`. Precedence: the same event handled again
/// repeats its decision; then not the payee; then an untrusted session; then a payment no
/// longer held (window passed, or settled); then a frozen wallet (accepting only); then the
/// window.
pub fn answer(record: &HeldRecord, facts: AnswerFacts<'_>) -> Answer {
    let ev = facts.event;
    let by_this = match &record.state {
        HeldState::Accepted { by } | HeldState::Declined { by } => by == &ev.event_id,
        _ => false,
    };
    if by_this {
        return Answer::Settle(settle(record, facts, &ev.event_id));
    }
    if ev.sender != record.payee {
        return refused(RequestRefusal::NotThePayee);
    }
    if let Err((reason, sentence)) = facts.trust {
        return Answer::Refused(reason, sentence.to_owned());
    }
    let window_passed = matches!(record.state, HeldState::Returned)
        || facts.reservation == ReservationState::Expired;
    if window_passed {
        return refused(RequestRefusal::AcceptanceWindowPassed);
    }
    if record.state != HeldState::Held || facts.reservation != ReservationState::Pending {
        return refused(RequestRefusal::PaymentAlreadySettled);
    }
    if facts.frozen && facts.action == HeldAction::Accept {
        return Answer::Refused(
            ReceiptReason::AccountFrozen,
            "a wallet this payment moves between is frozen; it stays held (declining it still \
             sends it back)"
                .to_owned(),
        );
    }
    let held = HeldPayment {
        transfer_id: record.transfer_id,
        payer: record.payer.clone(),
        payee: record.payee.clone(),
        return_at_ms: record.return_at_ms,
    };
    let outcome = match facts.action {
        HeldAction::Accept => held.accept(&ev.sender, facts.now_ms),
        HeldAction::Decline => held.decline(&ev.sender, facts.now_ms),
    };
    match outcome {
        Ok(_) => Answer::Settle(settle(record, facts, &ev.event_id)),
        Err(refusal) => refused(refusal),
    }
}

fn settle(record: &HeldRecord, facts: AnswerFacts<'_>, by: &OwnedEventId) -> Decision {
    let id = TransferId(record.transfer_id);
    let mut after = record.clone();
    let mut decision = Decision::none();
    let outcome = match &record.state {
        HeldState::Accepted { .. } => HeldOutcome::Post,
        HeldState::Declined { .. } => HeldOutcome::Return,
        _ => match facts.action {
            HeldAction::Accept => HeldOutcome::Post,
            HeldAction::Decline => HeldOutcome::Return,
        },
    };
    match outcome {
        HeldOutcome::Post => {
            after.state = HeldState::Accepted { by: by.clone() };
            decision.record.push(Record::Held(Box::new(after.clone())));
            decision.ledger.push(LedgerOp::Post(id));
        }
        HeldOutcome::Return => {
            after.state = HeldState::Declined { by: by.clone() };
            decision.record.push(Record::Held(Box::new(after.clone())));
            decision.record.push(Record::VoidReason {
                transfer_id: id,
                reason: ReceiptReason::PayeeDeclined,
            });
            decision.ledger.push(LedgerOp::Void(id));
        }
    }
    decision.poke_outbox = true;
    decision
        .sends
        .extend(edit(&after, facts.accept_window_ms, "held-answered"));
    decision.finish(facts.event)
}

/// The edit of the held notice to `record`'s state (none before the notice was sent).
fn edit(record: &HeldRecord, accept_window_ms: u64, purpose: &'static str) -> Option<Outgoing> {
    let notice = record.notice_event_id.as_ref()?;
    let text = notice_text(record, accept_window_ms);
    Some(Outgoing::event(
        &record.room_id,
        "m.room.message",
        edit_content(notice, &text, &[]),
        purpose,
        format!(
            "{}-{}",
            TransferId(record.transfer_id),
            state_word(&record.state)
        ),
    ))
}

fn state_word(state: &HeldState) -> &'static str {
    match state {
        HeldState::AwaitingPin => "awaiting_pin",
        HeldState::Held => "held",
        HeldState::Accepted { .. } => "accepted",
        HeldState::Declined { .. } => "declined",
        HeldState::Returned => "returned",
        HeldState::Lapsed => "lapsed",
    }
}

/// A refused answer: recorded for the event (first wins), then a declined receipt naming the
/// held payment and a sentence, in the event's room.
pub fn refuse(
    ev: &EventRef,
    record: &HeldRecord,
    reason: ReceiptReason,
    sentence: &str,
) -> Decision {
    let declined = DeclineRecord {
        reason: crate::payments::reason_code_of(reason),
        sentence: sentence.to_owned(),
        payee: record.payee.clone(),
        amount: record.amount.clone(),
        currency: record.currency.clone(),
    };
    let mut decision = Decision::none();
    decision.record.push(Record::OutcomeIfAbsent {
        event_id: ev.event_id.clone(),
        outcome: EventOutcome::Declined(declined),
    });
    decision.sends = refusal_sends(ev, record, reason, sentence);
    decision.finish(ev)
}

/// The receipt and sentence of a refused answer (the same transaction ids each time).
pub fn refusal_sends(
    ev: &EventRef,
    record: &HeldRecord,
    reason: ReceiptReason,
    sentence: &str,
) -> Vec<Outgoing> {
    let body = format!("❌ {}: nothing was moved: {sentence}", ev.sender);
    let key = ev.event_id.as_str();
    // One message: people read the sentence, bots the typed receipt it carries.
    vec![Outgoing::event(
        &ev.room_id,
        "m.room.message",
        crate::events::notice_carrying(
            "org.mxpay.receipt",
            receipt(
                record,
                body,
                ReceiptStatus::Declined,
                Some(reason),
                ev.event_id.clone(),
            ),
            Some(&ev.event_id),
        ),
        "held-refusal-receipt",
        key,
    )]
}

/// The sweep: a held payment whose payer never confirmed it within the PIN window is
/// released (`timeout`); one confirmed whose payee was never asked is asked now; one not
/// accepted by `return_at_ms` goes back to the payer (`acceptance_window_passed`; the
/// ledger's own timeout usually did this already).
pub fn sweep(record: &HeldRecord, accept_window_ms: u64, now_ms: u64) -> Option<Decision> {
    if record.state == HeldState::Held
        && record.notice_event_id.is_none()
        && now_ms >= record.pin_deadline_ms
        && now_ms < record.return_at_ms
    {
        // Confirmed, but the payee was never asked (the sends failed and the PIN window,
        // within which the PIN event is retried, passed): ask now, with the same transaction
        // ids (the payer's DM note is left out: the sweep does not know the DM).
        let in_room = EventRef {
            room_id: record.room_id.clone(),
            event_id: record.paying_event_id.clone(),
            sender: record.payer.clone(),
        };
        return Some(on_pin(&in_room, record, accept_window_ms));
    }
    let (state, reason) = match record.state {
        HeldState::AwaitingPin if now_ms >= record.pin_deadline_ms => {
            (HeldState::Lapsed, ReceiptReason::Timeout)
        }
        HeldState::Held if now_ms >= record.return_at_ms => {
            (HeldState::Returned, ReceiptReason::AcceptanceWindowPassed)
        }
        _ => return None,
    };
    let id = TransferId(record.transfer_id);
    let mut after = record.clone();
    after.state = state;
    let mut decision = Decision {
        record: vec![
            Record::Held(Box::new(after.clone())),
            Record::VoidReason {
                transfer_id: id,
                reason,
            },
        ],
        ledger: vec![LedgerOp::Void(id)],
        poke_outbox: true,
        ..Decision::none()
    };
    decision
        .sends
        .extend(edit(&after, accept_window_ms, "held-ended"));
    Some(decision)
}

/// What the outbox says about a held payment whose reservation ended (`how`: `posted`,
/// `voided`, `expired`): status, reason and headline of its receipts. `None`: it ended before
/// the payer's PIN (cancelled, refused): told like any payment.
pub fn ended_receipt(
    record: &HeldRecord,
    how: &str,
) -> Option<(ReceiptStatus, Option<ReceiptReason>, String)> {
    let (payer, payee, money) = (&record.payer, &record.payee, money(record));
    match (&record.state, how) {
        // Cancelled or refused before the PIN: told like any payment, with its reason.
        (HeldState::AwaitingPin, _) => None,
        // Released by the sweep when the PIN window passed: as the ledger's own expiry says it.
        (HeldState::Lapsed, _) => Some((
            ReceiptStatus::Expired,
            Some(ReceiptReason::Timeout),
            format!("⌛ {payer}'s payment of {money} to {payee} expired without a PIN; nothing was paid"),
        )),
        (_, "posted") => Some((
            ReceiptStatus::Completed,
            None,
            format!("✅ {payee} accepted {payer}'s payment: {payer} paid {payee} {money}"),
        )),
        (HeldState::Declined { .. }, _) => Some((
            ReceiptStatus::Declined,
            Some(ReceiptReason::PayeeDeclined),
            format!("↩️ {payee} declined {payer}'s payment of {money}; it is back with {payer}"),
        )),
        _ => Some((
            ReceiptStatus::Expired,
            Some(ReceiptReason::AcceptanceWindowPassed),
            format!(
                "⌛ {payee} did not accept {payer}'s payment of {money} in time; it is back \
                 with {payer}"
            ),
        )),
    }
}

/// After the outbox told the end of a held payment's reservation: the record follows the
/// ledger (a reservation that expired while held was returned) and the notice is edited.
pub fn ended(record: &HeldRecord, how: &str, accept_window_ms: u64) -> Decision {
    let mut after = record.clone();
    after.state = match (&record.state, how) {
        (HeldState::AwaitingPin, _) => HeldState::Lapsed,
        (HeldState::Held, "posted") => return Decision::none(),
        (HeldState::Held, _) => HeldState::Returned,
        // Accepted but the reservation expired first (the window ended as it was accepted).
        (HeldState::Accepted { .. }, "expired") => HeldState::Returned,
        (state, _) => state.clone(),
    };
    let mut decision = Decision::none();
    if after != *record {
        decision.store.push(Record::Held(Box::new(after.clone())));
    }
    if matches!(after.state, HeldState::Returned) {
        decision
            .sends
            .extend(edit(&after, accept_window_ms, "held-ended"));
    }
    decision
}

#[cfg(test)]
mod tests;
