//! A payment request and its state machine: pure transitions, time passed in as `now_ms`.
//!
//! A request asks one or more named payers (each with their own share and state), or anyone in
//! the room (each member at most once). Per payer:
//!
//! ```text
//! open --start_payment--> paying --record_paid--> paid
//!   |                       \--abandon_payment--> open (or cancelled / expired if the
//!   |                                             request was cancelled or lapsed meanwhile)
//!   +--decline--> declined
//!   +--cancel (by the requester)--> cancelled
//!   +--time reaches expires_at_ms--> expired
//! ```
//!
//! `paid`, `declined`, `cancelled` and `expired` are final: no transition leaves them. A
//! payment already waiting for the payer's PIN (`paying`) is not cut off by a cancel or the
//! expiry: the payer committed to it, and it ends as paid (money moved) or, abandoned, as
//! cancelled / expired. A payer pays at most once: the payment's amount, currency and payee
//! come from the request ([`PaymentTerms`]), never from the answer.
//!
//! Every transition returns a new value and leaves `self` as it was, so a refused transition
//! changes nothing.

use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use super::reason::{RequestError, RequestRefusal};
use super::split::SplitPlan;
use crate::command::MEMO_CHARS_MAX;
use crate::events::{PaymentRequestEventContent, RequestState};
use crate::ledger::{Amount, Currencies, CurrencyCode};

const DAY_MS: u64 = 24 * 3_600_000;
/// How long a request stays open when it does not say (`expires_at_ms` absent): 7 days.
pub const REQUEST_EXPIRY_DEFAULT_MS: u64 = 7 * DAY_MS;
/// The longest a request stays open, whatever it asks for: 30 days.
pub const REQUEST_EXPIRY_MAX_MS: u64 = 30 * DAY_MS;
/// Most members who may pay one request open to everyone.
pub const EVERYONE_PAYERS_MAX: u32 = 1_000;

/// Bounds of requests (defaults: the constants above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// How long a request without `expires_at_ms` stays open.
    pub expiry_default_ms: u64,
    /// The longest a request stays open (a later `expires_at_ms` is brought forward to it).
    pub expiry_max_ms: u64,
    /// Most members who may pay one request open to everyone.
    pub everyone_payers_max: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            expiry_default_ms: REQUEST_EXPIRY_DEFAULT_MS,
            expiry_max_ms: REQUEST_EXPIRY_MAX_MS,
            everyone_payers_max: EVERYONE_PAYERS_MAX,
        }
    }
}

/// A request's id: the event that asked (the `!request` / `!split` message, or the client's
/// `org.mxpay.payment_request`). Other events that stand for it (the bot's notice and typed
/// event) map to it in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub OwnedEventId);

impl RequestId {
    /// The ledger reference ([`crate::ledger::TransferRequest::reference`]) of every payment
    /// of this request and of every refund of those payments: see [`ledger_reference`].
    pub fn ledger_reference(&self) -> u128 {
        ledger_reference(self.0.as_str())
    }
}

/// The ledger reference of the request whose id (the asking event's id) is `request_id`:
/// derived from the id alone, never zero, so a retried or replayed payment, before or after a
/// restart, names the same one (the ledger refuses a retry with another reference,
/// `ExistsWithDifferentReference`). Changing the derivation would split a request's history
/// and refuse retries of its payments: it is pinned by a test.
pub fn ledger_reference(request_id: &str) -> u128 {
    // `request:` keeps it apart from the transfer ids derived from event ids the same way.
    crate::ledger::TransferId::from_key(&format!("request:{request_id}")).0
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// Where one payer's share stands. Stored (externally tagged JSON: `"open"`,
/// `{"paid":{"transfer_id":..,"at_ms":..}}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareState {
    /// Not paid yet.
    Open,
    /// A payment (ledger transfer `transfer_id`) waits for the payer's PIN.
    Paying {
        /// The pending ledger transfer.
        transfer_id: u128,
        /// When the payment started.
        since_ms: u64,
    },
    /// Paid by ledger transfer `transfer_id`. Final.
    Paid {
        /// The posted ledger transfer.
        transfer_id: u128,
        /// When it was recorded.
        at_ms: u64,
    },
    /// The payer declined. Final.
    Declined {
        /// When.
        at_ms: u64,
    },
    /// The requester cancelled while it was open. Final.
    Cancelled {
        /// When.
        at_ms: u64,
    },
    /// It lapsed unpaid. Final.
    Expired {
        /// The request's `expires_at_ms`.
        at_ms: u64,
    },
}

impl ShareState {
    /// Whether no transition leaves this state.
    pub fn is_final(&self) -> bool {
        !matches!(self, ShareState::Open | ShareState::Paying { .. })
    }

    /// The state as told to the room (a payment waiting for a PIN is still `open`).
    pub fn public(&self) -> RequestState {
        match self {
            ShareState::Open | ShareState::Paying { .. } => RequestState::Open,
            ShareState::Paid { .. } => RequestState::Paid,
            ShareState::Declined { .. } => RequestState::Declined,
            ShareState::Cancelled { .. } => RequestState::Cancelled,
            ShareState::Expired { .. } => RequestState::Expired,
        }
    }
}

/// One payer's part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Who pays it.
    pub payer: OwnedUserId,
    /// How much, in minor units (at least 1).
    pub amount_minor: u128,
    /// Where it stands.
    pub state: ShareState,
}

/// Who is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// The payers named (one for `!request`, several for `!split`), each with a share.
    Named {
        /// In the order named; payers are distinct.
        shares: Vec<Share>,
    },
    /// Anyone in the room, each at most once, `amount_minor` each.
    Everyone {
        /// What each member pays.
        amount_minor: u128,
        /// Most members who may pay.
        payers_max: u32,
        /// The members who paid or are paying (`paid` or `paying` only: an abandoned payment
        /// leaves no share behind).
        shares: Vec<Share>,
    },
}

/// A payment request as the bot keeps it (stored as JSON in `requestid_request`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Its id.
    pub id: RequestId,
    /// The room it was asked in.
    pub room_id: OwnedRoomId,
    /// Who asked, and is paid.
    pub requester: OwnedUserId,
    /// The currency of every share.
    #[serde(with = "currency_code")]
    pub currency: CurrencyCode,
    /// What for.
    pub memo: Option<String>,
    /// When the bot took it.
    pub created_ms: u64,
    /// It lapses at this time.
    pub expires_at_ms: u64,
    /// When the requester cancelled it, if they did.
    pub cancelled_ms: Option<u64>,
    /// For a split: the whole bill in minor units, the sender's own share included.
    pub bill_total_minor: Option<u128>,
    /// Who is asked, and where each stands.
    pub audience: Audience,
}

/// What the payer is to pay, taken from the request (never from the reply that pays it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentTerms {
    /// The request paid.
    pub request_id: RequestId,
    /// Who pays.
    pub payer: OwnedUserId,
    /// Who is paid: the requester.
    pub payee: OwnedUserId,
    /// Minor units.
    pub amount_minor: u128,
    /// The currency.
    pub currency: CurrencyCode,
}

/// [`Request::record_paid`] or [`Request::abandon_payment`] named a payment the request does
/// not have waiting: already recorded (a retry), or not of this request. Not a user's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no payment {transfer_id:032x} is waiting for this request")]
pub struct NoSuchPayment {
    /// The transfer named.
    pub transfer_id: u128,
}

/// The facts every new request starts from.
#[derive(Debug, Clone)]
pub struct NewRequest<'a> {
    /// The event that asks.
    pub id: RequestId,
    /// Its room.
    pub room_id: OwnedRoomId,
    /// Who asks (the event's sender).
    pub requester: OwnedUserId,
    /// The bot, who may not be asked.
    pub bot: &'a UserId,
    /// What for (at most 140 characters).
    pub memo: Option<String>,
    /// When it lapses, as asked (`None`: the default).
    pub expires_at_ms: Option<u64>,
    /// Now.
    pub now_ms: u64,
}

impl NewRequest<'_> {
    fn check_payer(
        &self,
        payer: &UserId,
        is_member: &dyn Fn(&UserId) -> bool,
    ) -> Result<(), RequestRefusal> {
        if payer == self.requester {
            return Err(RequestRefusal::RequestFromSelf);
        }
        if payer == self.bot {
            return Err(RequestRefusal::RequestFromBot);
        }
        if !is_member(payer) {
            return Err(RequestRefusal::PayerNotInRoom);
        }
        Ok(())
    }

    fn build(
        self,
        audience: Audience,
        currency: CurrencyCode,
        bill_total_minor: Option<u128>,
        limits: &RequestLimits,
    ) -> Result<Request, RequestRefusal> {
        if self
            .memo
            .as_ref()
            .is_some_and(|m| m.chars().count() > MEMO_CHARS_MAX)
        {
            return Err(RequestRefusal::MemoTooLong);
        }
        let latest_ms = self.now_ms.saturating_add(limits.expiry_max_ms);
        let expires_at_ms = match self.expires_at_ms {
            None => self.now_ms.saturating_add(limits.expiry_default_ms),
            Some(at_ms) if at_ms <= self.now_ms => return Err(RequestRefusal::RequestExpired),
            Some(at_ms) => at_ms.min(latest_ms),
        };
        let request = Request {
            id: self.id,
            room_id: self.room_id,
            requester: self.requester,
            currency,
            memo: self.memo,
            created_ms: self.now_ms,
            expires_at_ms,
            cancelled_ms: None,
            bill_total_minor,
            audience,
        };
        request.assert_invariants();
        Ok(request)
    }
}

impl Request {
    /// `!request @payer AMOUNT CURRENCY`: asks one payer. Refused when the payer is the
    /// requester, the bot, or not in the room (`is_member`), the memo too long, or the expiry
    /// already past.
    pub fn asking(
        new: NewRequest<'_>,
        payer: OwnedUserId,
        amount: Amount,
        is_member: &dyn Fn(&UserId) -> bool,
        limits: &RequestLimits,
    ) -> Result<Request, RequestRefusal> {
        new.check_payer(&payer, is_member)?;
        let shares = vec![Share {
            payer,
            amount_minor: amount.minor(),
            state: ShareState::Open,
        }];
        new.build(Audience::Named { shares }, amount.currency(), None, limits)
    }

    /// `!split`: asks each person of a checked [`SplitPlan`] for their share (the plan already
    /// refused the sender, the bot and duplicates; this checks membership).
    pub fn splitting(
        new: NewRequest<'_>,
        plan: &SplitPlan,
        is_member: &dyn Fn(&UserId) -> bool,
        limits: &RequestLimits,
    ) -> Result<Request, RequestRefusal> {
        for share in &plan.shares {
            new.check_payer(&share.payer, is_member)?;
        }
        let shares = plan
            .shares
            .iter()
            .map(|s| Share {
                payer: s.payer.clone(),
                amount_minor: s.amount_minor,
                state: ShareState::Open,
            })
            .collect();
        new.build(
            Audience::Named { shares },
            plan.currency,
            Some(plan.total_minor),
            limits,
        )
    }

    /// A client's `org.mxpay.payment_request`, sent by `new.requester`: `payee` must be the
    /// sender; a named `payer` is checked like `!request`'s; without one anyone in the room
    /// may pay (each member once, at most `limits.everyone_payers_max` members). `memo` and
    /// `expires_at_ms` come from the event (whatever `new` says).
    pub fn from_event(
        mut new: NewRequest<'_>,
        content: &PaymentRequestEventContent,
        currencies: &Currencies,
        is_member: &dyn Fn(&UserId) -> bool,
        limits: &RequestLimits,
    ) -> Result<Request, RequestError> {
        if content.payee != new.requester {
            return Err(RequestRefusal::RequestPayeeNotSender.into());
        }
        new.memo = content.memo.clone();
        new.expires_at_ms = content.expires_at_ms;
        let amount = currencies.parse(content.amount, &content.currency)?;
        match &content.payer {
            Some(payer) => Ok(Self::asking(new, payer.clone(), amount, is_member, limits)?),
            None => {
                let audience = Audience::Everyone {
                    amount_minor: amount.minor(),
                    payers_max: limits.everyone_payers_max,
                    shares: Vec::new(),
                };
                Ok(new.build(audience, amount.currency(), None, limits)?)
            }
        }
    }

    /// Every share: the named payers' in the order named, or the members who paid (or are
    /// paying) a request open to everyone.
    pub fn shares(&self) -> &[Share] {
        match &self.audience {
            Audience::Named { shares } | Audience::Everyone { shares, .. } => shares,
        }
    }

    fn shares_mut(&mut self) -> &mut Vec<Share> {
        match &mut self.audience {
            Audience::Named { shares } | Audience::Everyone { shares, .. } => shares,
        }
    }

    /// Whether time has reached the request's expiry.
    pub fn is_past_expiry(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }

    /// A share's state as of `now_ms`: an open share of a lapsed request is expired even
    /// before [`Self::expire`] wrote it down.
    pub fn live_state(&self, share: &Share, now_ms: u64) -> ShareState {
        match share.state {
            ShareState::Open if self.is_past_expiry(now_ms) => ShareState::Expired {
                at_ms: self.expires_at_ms,
            },
            state => state,
        }
    }

    /// The share of `payer`, if the request has one (for a request open to everyone: once
    /// they paid or started paying).
    pub fn share_of(&self, payer: &UserId) -> Option<&Share> {
        self.shares().iter().find(|s| s.payer == payer)
    }

    /// Where the whole request stands at `now_ms`. Named payers: `open` while a share is open
    /// (or paying); then `paid` if every share was paid, else `cancelled` or `expired` if a
    /// share ended so, else `declined`. Open to everyone: `open` until cancelled, lapsed or
    /// paid by `payers_max` members (a payment still waiting for a PIN keeps it `open`).
    pub fn status(&self, now_ms: u64) -> RequestState {
        match &self.audience {
            Audience::Named { shares } => {
                let states: Vec<ShareState> =
                    shares.iter().map(|s| self.live_state(s, now_ms)).collect();
                if states.iter().any(|s| !s.is_final()) {
                    RequestState::Open
                } else if states.iter().all(|s| matches!(s, ShareState::Paid { .. })) {
                    RequestState::Paid
                } else if states
                    .iter()
                    .any(|s| matches!(s, ShareState::Cancelled { .. }))
                {
                    RequestState::Cancelled
                } else if states
                    .iter()
                    .any(|s| matches!(s, ShareState::Expired { .. }))
                {
                    RequestState::Expired
                } else {
                    RequestState::Declined
                }
            }
            Audience::Everyone {
                payers_max, shares, ..
            } => {
                if shares.iter().any(|s| !s.state.is_final()) {
                    RequestState::Open
                } else if self.cancelled_ms.is_some() {
                    RequestState::Cancelled
                } else if shares.len() >= *payers_max as usize {
                    RequestState::Paid
                } else if self.is_past_expiry(now_ms) {
                    RequestState::Expired
                } else {
                    RequestState::Open
                }
            }
        }
    }

    /// The payers whose share is still open or paying at `now_ms` (named payers only: a
    /// request open to everyone is nobody's in particular). The store indexes these.
    pub fn open_payers(&self, now_ms: u64) -> Vec<&UserId> {
        match &self.audience {
            Audience::Named { shares } => shares
                .iter()
                .filter(|s| !self.live_state(s, now_ms).is_final())
                .map(|s| &*s.payer)
                .collect(),
            Audience::Everyone { .. } => Vec::new(),
        }
    }

    /// How many payers paid.
    pub fn paid_count(&self) -> u32 {
        self.shares()
            .iter()
            .filter(|s| matches!(s.state, ShareState::Paid { .. }))
            .count() as u32
    }

    /// How many payers the request names (`None`: open to everyone).
    pub fn payer_count(&self) -> Option<u32> {
        match &self.audience {
            Audience::Named { shares } => Some(shares.len() as u32),
            Audience::Everyone { .. } => None,
        }
    }

    /// `payer` starts paying with ledger transfer `transfer_id` (derived by the caller from the
    /// event that pays: `!pay` reply, reaction or transfer intent). Returns the request with
    /// the share `paying`, and the terms to pay. The same `transfer_id` again is answered the
    /// same (a retried event); refusals in order: `request_from_self`, `not_the_payer`,
    /// `request_already_paid`, `request_declined`, `request_cancelled`, `request_expired`,
    /// `request_payment_pending` (another payment of theirs waits for a PIN), `request_full`.
    pub fn start_payment(
        &self,
        payer: &UserId,
        transfer_id: u128,
        now_ms: u64,
    ) -> Result<(Request, PaymentTerms), RequestRefusal> {
        if payer == self.requester {
            return Err(RequestRefusal::RequestFromSelf);
        }
        let terms = |amount_minor| PaymentTerms {
            request_id: self.id.clone(),
            payer: payer.to_owned(),
            payee: self.requester.clone(),
            amount_minor,
            currency: self.currency,
        };
        let mut next = self.clone();
        match &self.audience {
            Audience::Named { shares } => {
                let index = shares
                    .iter()
                    .position(|s| s.payer == payer)
                    .ok_or(RequestRefusal::NotThePayer)?;
                let share = &shares[index];
                match self.live_state(share, now_ms) {
                    ShareState::Open => {
                        next.shares_mut()[index].state = ShareState::Paying {
                            transfer_id,
                            since_ms: now_ms,
                        };
                    }
                    ShareState::Paying { transfer_id: t, .. } if t == transfer_id => {}
                    other => return Err(refusal_of(other)),
                }
                next.assert_invariants();
                Ok((next, terms(share.amount_minor)))
            }
            Audience::Everyone {
                amount_minor,
                payers_max,
                shares,
            } => {
                if let Some(share) = shares.iter().find(|s| s.payer == payer) {
                    return match share.state {
                        ShareState::Paying { transfer_id: t, .. } if t == transfer_id => {
                            Ok((next, terms(*amount_minor)))
                        }
                        other => Err(refusal_of(other)),
                    };
                }
                if self.cancelled_ms.is_some() {
                    return Err(RequestRefusal::RequestCancelled);
                }
                if self.is_past_expiry(now_ms) {
                    return Err(RequestRefusal::RequestExpired);
                }
                if shares.len() >= *payers_max as usize {
                    return Err(RequestRefusal::RequestFull);
                }
                next.shares_mut().push(Share {
                    payer: payer.to_owned(),
                    amount_minor: *amount_minor,
                    state: ShareState::Paying {
                        transfer_id,
                        since_ms: now_ms,
                    },
                });
                next.assert_invariants();
                Ok((next, terms(*amount_minor)))
            }
        }
    }

    /// The payment `transfer_id` of `payer` was posted: their share is `paid`. Also after a
    /// cancel or the expiry (the payer had committed; money moved). Recording it again is
    /// answered with the request unchanged.
    pub fn record_paid(
        &self,
        payer: &UserId,
        transfer_id: u128,
        now_ms: u64,
    ) -> Result<Request, NoSuchPayment> {
        let index = self
            .shares()
            .iter()
            .position(|s| s.payer == payer)
            .ok_or(NoSuchPayment { transfer_id })?;
        let mut next = self.clone();
        match self.shares()[index].state {
            ShareState::Paying { transfer_id: t, .. } if t == transfer_id => {
                next.shares_mut()[index].state = ShareState::Paid {
                    transfer_id,
                    at_ms: now_ms,
                };
            }
            ShareState::Paid { transfer_id: t, .. } if t == transfer_id => {}
            _ => return Err(NoSuchPayment { transfer_id }),
        }
        next.assert_invariants();
        Ok(next)
    }

    /// The payment `transfer_id` of `payer` ended without money moving (no PIN in time,
    /// `!cancel`, refused by the ledger): the share is open again, or cancelled / expired if
    /// the request was cancelled or lapsed meanwhile; for a request open to everyone the
    /// member's share goes (they may pay again while it is open).
    pub fn abandon_payment(
        &self,
        payer: &UserId,
        transfer_id: u128,
        now_ms: u64,
    ) -> Result<Request, NoSuchPayment> {
        let index = self
            .shares()
            .iter()
            .position(|s| s.payer == payer && matches!(s.state, ShareState::Paying { transfer_id: t, .. } if t == transfer_id))
            .ok_or(NoSuchPayment { transfer_id })?;
        let mut next = self.clone();
        let after = match (self.cancelled_ms, self.is_past_expiry(now_ms)) {
            (Some(at_ms), _) => ShareState::Cancelled { at_ms },
            (None, true) => ShareState::Expired {
                at_ms: self.expires_at_ms,
            },
            (None, false) => ShareState::Open,
        };
        match &mut next.audience {
            Audience::Named { shares } => shares[index].state = after,
            Audience::Everyone { shares, .. } => {
                shares.remove(index);
            }
        }
        next.assert_invariants();
        Ok(next)
    }

    /// `payer` declines (❌ or `!decline`). Refusals in order: `not_the_payer` (also the
    /// requester), `request_open_to_everyone`, then the share's state as for
    /// [`Self::start_payment`] (`request_payment_pending` while their payment waits for a PIN).
    pub fn decline(&self, payer: &UserId, now_ms: u64) -> Result<Request, RequestRefusal> {
        let Audience::Named { shares } = &self.audience else {
            if payer == self.requester {
                return Err(RequestRefusal::NotThePayer);
            }
            return Err(RequestRefusal::RequestOpenToEveryone);
        };
        let index = shares
            .iter()
            .position(|s| s.payer == payer)
            .ok_or(RequestRefusal::NotThePayer)?;
        match self.live_state(&shares[index], now_ms) {
            ShareState::Open => {
                let mut next = self.clone();
                next.shares_mut()[index].state = ShareState::Declined { at_ms: now_ms };
                next.assert_invariants();
                Ok(next)
            }
            other => Err(refusal_of(other)),
        }
    }

    /// The requester withdraws the request (`!cancel` as a reply). Open shares become
    /// `cancelled`; a payment already waiting for a PIN may still complete (the caller may void
    /// it; then [`Self::abandon_payment`] makes it `cancelled`). Refusals in order:
    /// `not_the_requester`, `request_cancelled`, then, when nothing is open any more,
    /// `request_expired`, `request_already_paid` or `request_declined`.
    pub fn cancel(&self, actor: &UserId, now_ms: u64) -> Result<Request, RequestRefusal> {
        if actor != self.requester {
            return Err(RequestRefusal::NotTheRequester);
        }
        if self.cancelled_ms.is_some() {
            return Err(RequestRefusal::RequestCancelled);
        }
        match self.status(now_ms) {
            RequestState::Open => {}
            RequestState::Paid => return Err(RequestRefusal::RequestAlreadyPaid),
            RequestState::Declined => return Err(RequestRefusal::RequestDeclined),
            RequestState::Cancelled => return Err(RequestRefusal::RequestCancelled),
            RequestState::Expired => return Err(RequestRefusal::RequestExpired),
        }
        if self.is_past_expiry(now_ms) {
            // Only a payment waiting for a PIN keeps a lapsed request open.
            return Err(RequestRefusal::RequestExpired);
        }
        let mut next = self.clone();
        next.cancelled_ms = Some(now_ms);
        for share in next.shares_mut() {
            if share.state == ShareState::Open {
                share.state = ShareState::Cancelled { at_ms: now_ms };
            }
        }
        next.assert_invariants();
        Ok(next)
    }

    /// Writes the expiry down once time reached it: open shares become `expired` (what
    /// [`Self::live_state`] already shows). Returns the request and the payers whose share
    /// just expired (to tell them); before the expiry, the request unchanged and nobody.
    pub fn expire(&self, now_ms: u64) -> (Request, Vec<OwnedUserId>) {
        let mut next = self.clone();
        let mut expired = Vec::new();
        if self.is_past_expiry(now_ms) {
            let at_ms = self.expires_at_ms;
            for share in next.shares_mut() {
                if share.state == ShareState::Open {
                    share.state = ShareState::Expired { at_ms };
                    expired.push(share.payer.clone());
                }
            }
        }
        next.assert_invariants();
        (next, expired)
    }

    /// Panics if the record breaks a rule no transition may break (a programmer error or a
    /// corrupt record): at least one named payer, payers distinct and never the requester,
    /// shares of at least one minor unit, an open-to-everyone request holds only paid or paying
    /// shares (at most `payers_max`), and a cancelled request has no open share.
    pub fn assert_invariants(&self) {
        let shares = self.shares();
        for (i, share) in shares.iter().enumerate() {
            assert!(share.amount_minor >= 1, "request {}: empty share", self.id);
            assert!(
                share.payer != self.requester,
                "request {}: payer is requester",
                self.id
            );
            assert!(
                shares[..i].iter().all(|s| s.payer != share.payer),
                "request {}: payer twice",
                self.id
            );
            if self.cancelled_ms.is_some() {
                assert!(
                    share.state != ShareState::Open,
                    "request {}: open after cancel",
                    self.id
                );
            }
        }
        match &self.audience {
            Audience::Named { shares } => {
                assert!(!shares.is_empty(), "request {}: nobody asked", self.id)
            }
            Audience::Everyone {
                amount_minor,
                payers_max,
                shares,
            } => {
                assert!(*amount_minor >= 1, "request {}: empty amount", self.id);
                assert!(
                    shares.len() <= *payers_max as usize,
                    "request {}: over full",
                    self.id
                );
                assert!(
                    shares.iter().all(|s| matches!(
                        s.state,
                        ShareState::Paid { .. } | ShareState::Paying { .. }
                    ) && s.amount_minor == *amount_minor),
                    "request {}: bad share of an open request",
                    self.id
                );
            }
        }
    }
}

/// The refusal for acting on a share that is in `state` (not open).
fn refusal_of(state: ShareState) -> RequestRefusal {
    match state {
        ShareState::Paid { .. } => RequestRefusal::RequestAlreadyPaid,
        ShareState::Declined { .. } => RequestRefusal::RequestDeclined,
        ShareState::Cancelled { .. } => RequestRefusal::RequestCancelled,
        ShareState::Expired { .. } => RequestRefusal::RequestExpired,
        ShareState::Paying { .. } => RequestRefusal::RequestPaymentPending,
        ShareState::Open => unreachable!("an open share is not refused"),
    }
}

/// A currency code as its three letters in stored JSON; anything else is refused on read.
mod currency_code {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::ledger::CurrencyCode;

    pub fn serialize<S: Serializer>(code: &CurrencyCode, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(code.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<CurrencyCode, D::Error> {
        let text = String::deserialize(deserializer)?;
        CurrencyCode::new(&text).ok_or_else(|| D::Error::custom("not a 3-letter currency code"))
    }
}
