//! Requests, split bills, refunds and transfers the payee accepts (issue 13): the parts with no
//! I/O. Parsing of the text commands ([`parse`]), exact split computation ([`split`]), the
//! request state machine ([`state`]), refund rules ([`refund`]), accept-or-return decisions
//! ([`accept`]), and the reason codes with their sentences ([`reason`]).
//!
//! Nothing here sends, stores or reads the clock: callers pass the facts and `now_ms` in and
//! apply what comes back. The durable side is `store::requests` (which depends on this
//! module, never the reverse). Rules for people: `docs/payments.md` (sections 5 and 6); wiring: the payment flow's `core::request`.

pub mod accept;
pub mod parse;
pub mod reason;
pub mod refund;
pub mod split;
pub mod state;
pub mod text;

pub use accept::{payee_must_accept, HeldOutcome, HeldPayment, ACCEPT_WINDOW_DEFAULT_MS};
pub use parse::{
    parse, parse_reaction, strip_reply_fallback, Reaction, ReplyAction, RequestCommand, SplitShares,
};
pub use reason::{RequestError, RequestRefusal};
pub use refund::{plan_refund, RefundPlan, RefundablePayment};
pub use split::{format_minor, plan_split, SplitPlan, SplitShare, SPLIT_PEOPLE_MAX};
pub use state::{
    ledger_reference, Audience, NewRequest, NoSuchPayment, PaymentTerms, Request, RequestId,
    RequestLimits, Share, ShareState, REQUEST_EXPIRY_DEFAULT_MS, REQUEST_EXPIRY_MAX_MS,
};

#[cfg(test)]
mod tests;
