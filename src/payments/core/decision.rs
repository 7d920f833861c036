//! What a decision asks for, as plain data: the orchestrator ([`crate::payments::apply`])
//! applies it in a fixed order, so a crash or a retryable failure at any point leaves a state
//! that handling the same event again finishes without deciding twice:
//!
//! 1. [`Decision::record`]: the decision itself (a decline, the reason a reservation is
//!    voided), so a retry repeats it instead of deciding again;
//! 2. [`Decision::ledger`]: money (void a reservation);
//! 3. [`Decision::store`]: the flow's own state (challenges, dialogs, exposure marks);
//! 4. [`Decision::sends`]: what the bot says, each with a transaction id derived from the
//!    event, so a retry shows nothing twice;
//! 5. [`Decision::finish`]: the event is marked handled, only once all of the above is done.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde_json::Value;

use crate::events::ReceiptReason;
use crate::ledger::TransferId;
use crate::requests::{Request, RequestId};
use crate::store::held::HeldRecord;
use crate::store::payments::{Challenge, Dialog, EventOutcome};

/// A write to the payment store (or, for a changed identity, to the crypto store).
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Records what was decided for an event, unless something was recorded already (the
    /// first decision wins; see [`crate::store::payments::PaymentStore::put_outcome_if_absent`]).
    OutcomeIfAbsent {
        /// The deciding event.
        event_id: OwnedEventId,
        /// What was decided.
        outcome: EventOutcome,
    },
    /// Records what an event started (overwriting).
    Outcome {
        /// The event.
        event_id: OwnedEventId,
        /// What it started.
        outcome: EventOutcome,
    },
    /// The receipt of this reservation, once voided, gives `reason`.
    VoidReason {
        /// The reserved transfer.
        transfer_id: TransferId,
        /// Why it is voided.
        reason: ReceiptReason,
    },
    /// Stores an open challenge.
    PutChallenge(Challenge),
    /// Drops a challenge (answered, lapsed, cancelled).
    RemoveChallenge(Challenge),
    /// The user's PIN was seen where others could read it: blocked until changed.
    PinExposed {
        /// Whose PIN.
        user: OwnedUserId,
    },
    /// Opens, moves or ends the user's PIN dialog.
    Dialog {
        /// Whose dialog.
        user: OwnedUserId,
        /// The next step; `None` ends it.
        next: Option<Dialog>,
    },
    /// Moves the PIN dialog on and records the answer with the event, in one write, so a
    /// retried message gets the same answer.
    DialogStep {
        /// Whose dialog.
        user: OwnedUserId,
        /// The next step; `None` ends it.
        next: Option<Dialog>,
        /// The answered PIN event.
        event_id: OwnedEventId,
        /// What the bot answers.
        reply: String,
    },
    /// Sets the user's PIN (the hash of a confirmed new PIN) and clears an exposure mark.
    NewPin {
        /// Whose PIN.
        user: OwnedUserId,
        /// argon2id PHC string.
        hash: String,
    },
    /// The operator's "accept the new keys at the next `!pin set`" was used up.
    KeysAcceptedAtPinSet {
        /// Whose.
        user: OwnedUserId,
    },
    /// Accepts the user's changed cross-signing identity (crypto store).
    AcceptIdentity {
        /// Whose identity.
        user: OwnedUserId,
    },
    /// Replaces a payment request as read (`before`) with a transition's result (`after`),
    /// recording that the event `acted_by` made the change (so a retry repeats what it said
    /// instead of acting again). If the stored request is no longer `before` (another event
    /// changed it meanwhile), applying fails as a retryable error: the transaction runs
    /// again and decides from the current request.
    RequestUpdate {
        /// The request as read.
        before: Box<Request>,
        /// The request after the change.
        after: Box<Request>,
        /// The reply or reaction that made the change.
        acted_by: Option<OwnedEventId>,
    },
    /// Writes a payment held for its payee as it now stands (new, or its state moved on).
    Held(Box<HeldRecord>),
}

/// A ledger operation whose refusal changes nothing the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerOp {
    /// Releases a reservation (a refusal means it ended already).
    Void(TransferId),
    /// Posts a reservation in full (a payment its payee accepted; a refusal means it ended
    /// already, and the outbox tells how).
    Post(TransferId),
}

/// Something the bot sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Where.
    pub room_id: OwnedRoomId,
    /// What.
    pub body: OutgoingBody,
    /// Why, stable per kind of message (`stepup-wrong`, `decline-receipt`, ...): with
    /// [`Self::key`] it makes the transaction id, and tests inject faults by it.
    pub purpose: &'static str,
    /// What the message is about (usually the event it answers).
    pub key: String,
    /// Once sent, its event id is remembered as the DM notice of this challenge's transfer
    /// (a PIN replying to that notice names the challenge).
    pub remember_notice_of: Option<TransferId>,
    /// Once sent, its event id stands for this payment request, in this role (see
    /// [`crate::store::requests::RequestStore::link_event_as`]): replies and reactions to it
    /// find the request, and the bot finds its notice to edit.
    pub link: Option<(RequestId, String)>,
    /// Once sent, its event id is remembered as the notice of this held payment (the
    /// message its payee accepts or declines by reacting or replying).
    pub held_notice_of: Option<TransferId>,
}

/// The content of an [`Outgoing`].
#[derive(Debug, Clone, PartialEq)]
pub enum OutgoingBody {
    /// An `m.notice`, optionally a reply.
    Notice {
        /// The text.
        body: String,
        /// The event it replies to.
        reply_to: Option<OwnedEventId>,
    },
    /// A typed event (`org.mxpay.receipt`, ...).
    Event {
        /// Its type.
        event_type: &'static str,
        /// Its content.
        content: Value,
    },
}

impl Outgoing {
    /// A notice in `room_id`.
    pub fn notice(
        room_id: &OwnedRoomId,
        body: impl Into<String>,
        reply_to: Option<&OwnedEventId>,
        purpose: &'static str,
        key: impl Into<String>,
    ) -> Self {
        Self {
            room_id: room_id.clone(),
            body: OutgoingBody::Notice {
                body: body.into(),
                reply_to: reply_to.cloned(),
            },
            purpose,
            key: key.into(),
            remember_notice_of: None,
            link: None,
            held_notice_of: None,
        }
    }

    /// A typed event in `room_id`.
    pub fn event(
        room_id: &OwnedRoomId,
        event_type: &'static str,
        content: Value,
        purpose: &'static str,
        key: impl Into<String>,
    ) -> Self {
        Self {
            room_id: room_id.clone(),
            body: OutgoingBody::Event {
                event_type,
                content,
            },
            purpose,
            key: key.into(),
            remember_notice_of: None,
            link: None,
            held_notice_of: None,
        }
    }

    /// The same message, linked once sent to request `id` in `role`.
    pub fn linked_to(mut self, id: &RequestId, role: &str) -> Self {
        self.link = Some((id.clone(), role.to_owned()));
        self
    }

    /// The message's text, if it is one people read: a notice, or a message carrying a
    /// typed payload (for tests and logs).
    pub fn text(&self) -> Option<&str> {
        match &self.body {
            OutgoingBody::Notice { body, .. } => Some(body),
            OutgoingBody::Event {
                event_type: "m.room.message",
                content,
            } => content["body"].as_str(),
            OutgoingBody::Event { .. } => None,
        }
    }

    /// The typed payload `event_type` it holds: a typed event's content, or what a message
    /// carries under that key (for tests).
    pub fn payload(&self, event_type: &str) -> Option<&Value> {
        match &self.body {
            OutgoingBody::Event {
                event_type: sent_type,
                content,
            } if *sent_type == event_type => Some(content),
            OutgoingBody::Event {
                event_type: "m.room.message",
                content,
            } => content.get(event_type),
            _ => None,
        }
    }
}

/// Effects of one decision, applied in field order (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// The decision itself.
    pub record: Vec<Record>,
    /// Money.
    pub ledger: Vec<LedgerOp>,
    /// The flow's state.
    pub store: Vec<Record>,
    /// What the bot says.
    pub sends: Vec<Outgoing>,
    /// Whether the outbox should look at the journal (a reservation ended).
    pub poke_outbox: bool,
    /// The event handled to the end, marked last (after its answers went out): handled
    /// again, it does nothing.
    pub finish: Option<OwnedEventId>,
}

impl Decision {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Only a message.
    pub fn say(outgoing: Outgoing) -> Self {
        Self {
            sends: vec![outgoing],
            ..Self::default()
        }
    }

    /// The same decision, then `record` in the store step.
    pub fn then_store(mut self, record: Record) -> Self {
        self.store.push(record);
        self
    }

    /// The same decision, marking `event` handled once everything else is done.
    pub fn finish(mut self, event: &EventRef) -> Self {
        self.finish = Some(event.event_id.clone());
        self
    }

    /// The same decision, then `other`'s effects after its own, step by step.
    pub fn and(mut self, other: Decision) -> Self {
        self.record.extend(other.record);
        self.ledger.extend(other.ledger);
        self.store.extend(other.store);
        self.sends.extend(other.sends);
        self.poke_outbox |= other.poke_outbox;
        self.finish = self.finish.or(other.finish);
        self
    }

    /// The same decision, with `outgoing` sent after its other messages.
    pub fn then_send(mut self, outgoing: Outgoing) -> Self {
        self.sends.push(outgoing);
        self
    }

    /// The texts of its notices, in order (for tests).
    pub fn texts(&self) -> Vec<&str> {
        self.sends.iter().filter_map(Outgoing::text).collect()
    }

    /// The purposes of its messages, in order (for tests).
    pub fn purposes(&self) -> Vec<&'static str> {
        self.sends.iter().map(|s| s.purpose).collect()
    }
}

/// The event a decision answers: where answers go and what their transaction ids derive from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    /// Its room.
    pub room_id: OwnedRoomId,
    /// Its id.
    pub event_id: OwnedEventId,
    /// Its sender.
    pub sender: OwnedUserId,
}

impl EventRef {
    /// A notice in the event's room (not a reply: in the DM the PIN it answers is redacted).
    pub fn reply(&self, body: impl Into<String>, purpose: &'static str) -> Outgoing {
        Outgoing::notice(&self.room_id, body, None, purpose, self.event_id.as_str())
    }

    /// A reply to the event, addressed to its sender by name.
    pub fn answer(&self, text: &str, purpose: &'static str) -> Outgoing {
        Outgoing::notice(
            &self.room_id,
            format!("{}: {text}", self.sender),
            Some(&self.event_id),
            purpose,
            self.event_id.as_str(),
        )
    }
}
