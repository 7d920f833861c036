//! The payment flow's decisions, without I/O: given the facts the orchestrator gathered (the
//! user's PIN record and open challenges, the room's encryption and membership, the sender's
//! trust, the ledger's answer) and one input (a request to pay, a PIN, the result of a PIN
//! comparison, the ledger's answer to a post), each function returns what to do.
//!
//! Nothing here is `async`, and nothing touches a store, the ledger or the network; time is a
//! `now_ms` argument. The shape is matrix-sdk-crypto's `OlmMachine`: work the core cannot do
//! itself (an argon2id comparison, a ledger reservation, a redaction) is asked for, and its
//! result comes back as the next input. [`Decision`] carries the effects, which
//! [`super::apply`] applies in one fixed order.
//!
//! One file per rule of docs/payments.md:
//! - [`refusal`]: who may start a payment or a withdrawal (the refusal table, in precedence
//!   order);
//! - [`start`]: late, retried and replayed requests;
//! - [`pin_answer`]: where a PIN may be used and which challenge it answers;
//! - [`after_pin`]: what a PIN comparison and the ledger's answer to the post lead to;
//! - [`challenge`]: opening a challenge, where it is told, `!cancel`;
//! - [`dialog`]: choosing and changing a PIN, and accepting changed security keys;
//! - [`refund`]: whether a `!refund` starts a payment back, and its refusals;
//! - [`request`]: payment requests and split bills: posting, paying, declining, cancelling,
//!   and telling each change;
//! - [`held`]: payments the payee accepts: held after the PIN, accepted, declined, returned.

pub mod after_pin;
pub mod challenge;
pub mod decision;
pub mod dialog;
#[cfg(test)]
mod fixtures;
pub mod held;
pub mod pin_answer;
pub mod refund;
pub mod refusal;
pub mod request;
pub mod start;

pub use decision::{Decision, EventRef, LedgerOp, Outgoing, OutgoingBody, Record};
pub use refusal::Refusal;

/// The settings the decisions depend on (a copy of part of `payments:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreSettings {
    /// How long a payment waits for its PIN (`payments.stepup_timeout_ms`).
    pub stepup_timeout_ms: u64,
    /// How long a PIN dialog waits for its next answer (`payments.pin_dialog_timeout_ms`).
    pub pin_dialog_timeout_ms: u64,
    /// Payments and withdrawals one user may have waiting for the PIN at once.
    pub pending_per_user_max: u32,
    /// Payment commands one user may send a minute.
    pub commands_per_minute_max: u32,
}
