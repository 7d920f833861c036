//! Requests and split bills, the shell: gathers the facts (the request from the store, the
//! room's members, the sender's trust, the currency), lets the request's transitions and
//! [`core::request`] decide, and applies the decision. Paying a request is an ordinary
//! payment ([`Payments::on_pay`]) whose amount, currency and payee come from the request and
//! whose transfer id comes from the paying event; the outbox records it paid
//! ([`Payments::request_payment_ended`]) once the ledger posted it.

use std::collections::HashSet;

use ruma::{EventId, OwnedUserId, UserId};
use rust_decimal::Decimal;
use serde_json::Value;

use super::core::held::HeldAction;
use super::core::request::{self as core_request, Action, Change, Posted};
use super::core::{Decision, EventRef};
use super::{PayRequest, Payments, PaymentsError};
use crate::crypto::DecryptedEvent;
use crate::events::{PaymentRequestEventContent, ReceiptReason};
use crate::ledger::{CurrencyCode, TransferId};
use crate::policy::trust;
use crate::requests::{
    self, NewRequest, ReplyAction, Request, RequestCommand, RequestError, RequestId, RequestLimits,
    RequestRefusal, SplitShares,
};
use crate::store::payments::EventOutcome;
use crate::store::requests::{Inserted, RequestBounds};

/// Most lapsed requests the sweep writes down after one event (bounded work per event).
const EXPIRY_SWEEP_SLICE: usize = 8;

impl Payments {
    pub(super) fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            expiry_default_ms: self.settings.request_expiry_default_ms,
            ..RequestLimits::default()
        }
    }

    fn exponent(&self, currency: CurrencyCode) -> u32 {
        self.ledger
            .currencies()
            .get(currency)
            .map_or(2, |c| c.exponent)
    }

    pub(super) fn minor_decimal(&self, currency: CurrencyCode, minor: u128) -> Decimal {
        self.ledger.to_decimal(currency, minor).unwrap_or_default()
    }

    /// The bot's messages about `request` the next change is told with.
    fn posted(&self, request: &Request) -> Result<Posted, PaymentsError> {
        let store = self.store.requests();
        let notice = store.linked_as(&request.id, core_request::NOTICE_ROLE)?;
        let mut events = Vec::new();
        for share in request.shares() {
            if let Some(event) =
                store.linked_as(&request.id, &core_request::event_role(&share.payer))?
            {
                events.push((share.payer.clone(), event));
            }
        }
        Ok(Posted { notice, events })
    }

    /// The members joined to the event's room.
    async fn joined(&self, event: &DecryptedEvent) -> Result<HashSet<String>, PaymentsError> {
        Ok(self
            .messenger
            .memberships(&event.room_id)
            .await?
            .into_iter()
            .filter(|(_, m)| m == "join")
            .map(|(u, _)| u)
            .collect())
    }

    /// What a request needs of its sender: an encrypted message in an encrypted room, from a
    /// session the homeserver cannot have made up (a known device of the sender, whose
    /// identity did not change). A session its owner did not cross-sign may ask: a request
    /// moves nothing, the money it asks for can only go to the account that asks, and the
    /// payer confirms with their own PIN.
    async fn requester_refusal(
        &self,
        event: &DecryptedEvent,
    ) -> Result<Option<(ReceiptReason, String)>, PaymentsError> {
        let settings = trust::TrustSettings {
            allow_unsigned_devices: true,
        };
        match trust::check(self.facts(event).await?, settings) {
            Ok(()) => Ok(None),
            Err(refusal) => Ok(Some((refusal.reason(), refusal.to_string()))),
        }
    }

    /// Applies a refusal of a request command (`doing`: "request not made", ...).
    #[allow(clippy::too_many_arguments)]
    async fn refuse_request(
        &self,
        event: &DecryptedEvent,
        payee: &UserId,
        amount: Decimal,
        currency: &str,
        reason: ReceiptReason,
        sentence: &str,
        doing: &str,
    ) -> Result<(), PaymentsError> {
        self.metrics
            .payment("declined", super::reason_label(reason));
        self.apply(core_request::refuse(
            &Self::event_ref(event),
            payee,
            amount,
            currency,
            reason,
            format!("{doing}: {sentence}"),
        ))
        .await
    }

    /// A refusal recorded earlier for `event`, said again (same transaction ids); `true` when
    /// there was one.
    async fn repeat_refusal(&self, event: &DecryptedEvent) -> Result<bool, PaymentsError> {
        match self.store.outcome(event.event_id.as_str())? {
            Some(EventOutcome::Declined(record)) => {
                let sends = core_request::refusal_sends(&Self::event_ref(event), &record);
                self.apply(Decision {
                    sends,
                    ..Decision::none()
                })
                .await?;
                Ok(true)
            }
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    /// A `!request`, `!split` or reply command. `Ok(false)`: not about a request after all (a
    /// `!cancel` replying to something that is no request keeps its ordinary meaning).
    pub(super) async fn on_request_command(
        &self,
        event: &DecryptedEvent,
        command: RequestCommand,
    ) -> Result<bool, PaymentsError> {
        match command {
            RequestCommand::Reply {
                to,
                action: ReplyAction::Refund { amount },
            } => {
                self.on_refund(event, &to, amount).await?;
                Ok(true)
            }
            RequestCommand::Reply { to, action } => {
                // An answer to a payment held for its payee.
                if let Some(held_action) = held_action_of_reply(&action) {
                    if let Some(record) = self.store.held().by_notice(&to)? {
                        self.on_held_answer(event, record, held_action).await?;
                        return Ok(true);
                    }
                }
                let Some(action) = Action::of_reply(action) else {
                    // `!accept` replying to no held payment the bot knows (`!refund` with its
                    // amount is `RequestCommand::Refund`, above).
                    let text = RequestRefusal::ReplyTargetUnknown.sentence();
                    self.answer(event, text, "request-error").await?;
                    return Ok(true);
                };
                let request = self.store.requests().by_event(&to)?;
                if request.is_none() && action == Action::Cancel {
                    return Ok(false);
                }
                self.act_on_request(event, request, action).await?;
                Ok(true)
            }
            RequestCommand::Request {
                payer,
                amount,
                currency,
                memo,
            } => {
                self.new_request(event, NewAsk::One { payer, amount }, currency, memo)
                    .await?;
                Ok(true)
            }
            RequestCommand::Split {
                shares,
                currency,
                memo,
            } => {
                self.new_request(event, NewAsk::Split(shares), currency, memo)
                    .await?;
                Ok(true)
            }
        }
    }

    /// A client's or bot's `org.mxpay.payment_request`.
    pub(super) async fn on_payment_request_event(
        &self,
        event: &DecryptedEvent,
    ) -> Result<(), PaymentsError> {
        match serde_json::from_value::<PaymentRequestEventContent>(event.content.clone()) {
            Ok(content) => {
                let currency = content.currency.to_ascii_uppercase();
                self.new_request(event, NewAsk::Event(Box::new(content)), currency, None)
                    .await
            }
            Err(_) => {
                self.answer(
                    event,
                    "this org.mxpay.payment_request is malformed (see the event schema in \
                     mxpay's docs/events.md)",
                    "request-error",
                )
                .await
            }
        }
    }

    async fn new_request(
        &self,
        event: &DecryptedEvent,
        ask: NewAsk,
        currency: String,
        memo: Option<String>,
    ) -> Result<(), PaymentsError> {
        if self.store.is_done(event.event_id.as_str())? || self.repeat_refusal(event).await? {
            return Ok(());
        }
        let id = RequestId(event.event_id.clone());
        let ev = Self::event_ref(event);
        let from_client_event = matches!(ask, NewAsk::Event(_));
        // Handled again after the request was stored: post it again (the same transaction ids).
        if let Some(existing) = self.store.requests().get(&id)? {
            // A crash after the request was stored and before its invoice was: record it now.
            if let NewAsk::Event(content) = &ask {
                if let Some(merchant) = self.merchant_sending(&event.sender)? {
                    if merchant.enabled {
                        self.record_merchant_request(&merchant, &existing, content)?;
                    }
                }
            }
            return self.announce(&ev, &existing, from_client_event).await;
        }
        let (other, amount) = ask.refusal_facts(&event.sender);
        let doing = "request not made";
        if let Some((reason, sentence)) = self.requester_refusal(event).await? {
            return self
                .refuse_request(event, &other, amount, &currency, reason, &sentence, doing)
                .await;
        }
        // A merchant's own typed request is its invoice; a disabled merchant cannot invoice.
        let merchant = match &ask {
            NewAsk::Event(_) => self.merchant_sending(&event.sender)?,
            _ => None,
        };
        if merchant.as_ref().is_some_and(|m| !m.enabled) {
            return self
                .refuse_request(
                    event,
                    &other,
                    amount,
                    &currency,
                    ReceiptReason::MerchantDisabled,
                    "this merchant is disabled and cannot ask for payments",
                    doing,
                )
                .await;
        }
        let now_ms = self.clock.now_ms();
        let joined = self.joined(event).await?;
        let is_member = |user: &UserId| joined.contains(user.as_str());
        let new = NewRequest {
            id,
            room_id: event.room_id.clone(),
            requester: event.sender.clone(),
            bot: &self.bot,
            memo,
            expires_at_ms: None,
            now_ms,
        };
        let limits = self.request_limits();
        let currencies = self.ledger.currencies();
        let made: Result<Request, RequestError> = match &ask {
            NewAsk::One { payer, amount } => match currencies.parse(*amount, &currency) {
                Ok(amount) => Request::asking(new, payer.clone(), amount, &is_member, &limits)
                    .map_err(Into::into),
                // Who you are comes first: yourself or the bot is refused whatever the amount.
                Err(error) if *payer != event.sender && *payer != self.bot => Err(error.into()),
                Err(_) => Err(if *payer == event.sender {
                    RequestRefusal::RequestFromSelf
                } else {
                    RequestRefusal::RequestFromBot
                }
                .into()),
            },
            NewAsk::Split(shares) => {
                requests::plan_split(shares, &currency, &event.sender, &self.bot, currencies)
                    .and_then(|plan| {
                        Request::splitting(new, &plan, &is_member, &limits).map_err(Into::into)
                    })
            }
            NewAsk::Event(content) => {
                Request::from_event(new, content, currencies, &is_member, &limits)
            }
        };
        let request = match made {
            Ok(request) => request,
            Err(error) => {
                let reason = match &error {
                    RequestError::Refused(refusal) => crate::payments::reason_of_request(*refusal),
                    RequestError::Amount(_) => ReceiptReason::InvalidAmount,
                };
                return self
                    .refuse_request(
                        event,
                        &other,
                        amount,
                        &currency,
                        reason,
                        &error.sentence(),
                        doing,
                    )
                    .await;
            }
        };
        match self
            .store
            .requests()
            .insert(&request, now_ms, RequestBounds::default())
            .await?
        {
            Inserted::Stored => {}
            Inserted::Exists(existing) => {
                if let (Some(merchant), NewAsk::Event(content)) = (&merchant, &ask) {
                    self.record_merchant_request(merchant, &existing, content)?;
                }
                return self.announce(&ev, &existing, from_client_event).await;
            }
            Inserted::Refused(refusal) => {
                return self
                    .refuse_request(
                        event,
                        &other,
                        amount,
                        &currency,
                        crate::payments::reason_of_request(refusal),
                        refusal.sentence(),
                        doing,
                    )
                    .await
            }
        }
        tracing::info!(request = %request.id, payers = request.shares().len(), "payment request opened");
        if let (Some(merchant), NewAsk::Event(content)) = (&merchant, &ask) {
            self.record_merchant_request(merchant, &request, content)?;
        }
        self.announce(&ev, &request, from_client_event).await
    }

    pub(super) async fn announce(
        &self,
        ev: &EventRef,
        request: &Request,
        from_client_event: bool,
    ) -> Result<(), PaymentsError> {
        let mut payer_dms = Vec::new();
        for share in request.shares() {
            if let Some(dm) = self.ready_dm(share.payer.as_str())? {
                if dm != request.room_id {
                    payer_dms.push((share.payer.clone(), dm));
                }
            }
        }
        let decision = core_request::announce(
            ev,
            request,
            self.exponent(request.currency),
            from_client_event,
            &payer_dms,
            self.clock.now_ms(),
        );
        self.apply(decision).await
    }

    /// A reaction: ✅/👍 pays, ❌ declines the request reacted to. Reactions to anything else,
    /// and other keys, are chat: `Ok(false)`.
    pub(super) async fn on_reaction(&self, event: &DecryptedEvent) -> Result<bool, PaymentsError> {
        let relates = &event.content["m.relates_to"];
        if relates["rel_type"] != "m.annotation" {
            return Ok(false);
        }
        let (Some(target), Some(key)) = (
            relates["event_id"].as_str(),
            relates["key"].as_str().and_then(requests::parse_reaction),
        ) else {
            return Ok(false);
        };
        let Ok(target) = <&EventId>::try_from(target) else {
            return Ok(false);
        };
        if let Some(record) = self.store.held().by_notice(target)? {
            let action = match key {
                requests::Reaction::Yes => HeldAction::Accept,
                requests::Reaction::No => HeldAction::Decline,
            };
            self.on_held_answer(event, record, action).await?;
            return Ok(true);
        }
        let Some(request) = self.store.requests().by_event(target)? else {
            return Ok(false);
        };
        self.act_on_request(event, Some(request), Action::of_reaction(key))
            .await?;
        Ok(true)
    }

    /// A transfer intent naming a request in `request_event_id`: pays the request (its
    /// amount, currency and payee; the intent's own are not used).
    pub(super) async fn on_intent_for_request(
        &self,
        event: &DecryptedEvent,
        request_event_id: &EventId,
    ) -> Result<(), PaymentsError> {
        let request = self.store.requests().by_event(request_event_id)?;
        self.act_on_request(event, request, Action::Pay).await
    }

    async fn act_on_request(
        &self,
        event: &DecryptedEvent,
        request: Option<Request>,
        action: Action,
    ) -> Result<(), PaymentsError> {
        if action == Action::Pay {
            return self.pay_request(event, request).await;
        }
        if self.store.is_done(event.event_id.as_str())? {
            return Ok(());
        }
        let Some(request) = request else {
            return self
                .answer(
                    event,
                    RequestRefusal::ReplyTargetUnknown.sentence(),
                    "request-error",
                )
                .await;
        };
        let now_ms = self.clock.now_ms();
        let ev = Self::event_ref(event);
        let posted = self.posted(&request)?;
        let exponent = self.exponent(request.currency);
        let key = event.event_id.to_string();
        let (change, payer, doing) = match action {
            Action::Decline => (Change::Declined, Some(&*event.sender), "not declined"),
            Action::Cancel => (Change::Cancelled, None, "not cancelled"),
            Action::Pay => unreachable!("paying is handled above"),
        };
        if self.store.requests().acted(&event.event_id)? {
            // Handled before (a retried transaction): say it again from where it stands.
            let decision = core_request::changed(
                &request,
                &request,
                payer,
                change,
                Some(&ev),
                &key,
                &posted,
                exponent,
                now_ms,
            );
            self.apply(decision).await?;
            // A crash after the change and before the invoice heard of it: tell it again.
            return self.invoice_request_changed(&request, now_ms);
        }
        if self.repeat_refusal(event).await? {
            return Ok(());
        }
        let after = match action {
            Action::Decline => request.decline(&event.sender, now_ms),
            _ => request.cancel(&event.sender, now_ms),
        };
        match after {
            Ok(after) => {
                tracing::info!(request = %request.id, ?change, "payment request changed");
                let decision = core_request::changed(
                    &request,
                    &after,
                    payer,
                    change,
                    Some(&ev),
                    &key,
                    &posted,
                    exponent,
                    now_ms,
                );
                self.apply(decision).await?;
                self.invoice_request_changed(&after, now_ms)
            }
            Err(refusal) => {
                let share = request
                    .share_of(&event.sender)
                    .or(request.shares().first())
                    .map_or(0, |s| s.amount_minor);
                let other = counterpart(&request, &event.sender);
                self.refuse_request(
                    event,
                    &other,
                    self.minor_decimal(request.currency, share),
                    request.currency.as_str(),
                    crate::payments::reason_of_request(refusal),
                    refusal.sentence(),
                    doing,
                )
                .await
            }
        }
    }

    /// Pays `request` (amount, currency and payee from it) with the transfer derived from the
    /// paying event: the usual checks, reservation and PIN challenge. Refusals of the request
    /// (not the payer, already paid, declined, ...) are declined payments with the request's
    /// reason code.
    async fn pay_request(
        &self,
        event: &DecryptedEvent,
        request: Option<Request>,
    ) -> Result<(), PaymentsError> {
        let transfer_id = TransferId::from_key(event.event_id.as_str());
        let started = self.store.outcome(event.event_id.as_str())?.is_some()
            || self.ledger.transfer(transfer_id).await?.is_some();
        let now_ms = self.clock.now_ms();
        let Some(request) = request else {
            if started {
                // Decided before: [`Self::on_pay`] repeats it.
                return self.repeat_refusal(event).await.map(|_| ());
            }
            return self
                .answer(
                    event,
                    RequestRefusal::ReplyTargetUnknown.sentence(),
                    "request-error",
                )
                .await;
        };
        let terms = core_request::pay_terms(Some(&request), &event.sender, transfer_id.0, now_ms);
        let share_minor = request
            .share_of(&event.sender)
            .or(request.shares().first())
            .map_or(0, |s| s.amount_minor);
        let pay = |amount_minor, update| PayRequest {
            payee: request.requester.clone(),
            amount: self.minor_decimal(request.currency, amount_minor),
            currency: request.currency.as_str().to_owned(),
            memo: request.memo.clone(),
            request: update,
            refund: None,
        };
        match terms {
            Ok((after, terms)) => {
                let request_pay = pay(terms.amount_minor, Some((request.clone(), after)));
                let outcome = self.on_pay(event, request_pay).await;
                self.count_failure(outcome)
            }
            // Started (or refused) before: carry on with it, never refuse it now.
            Err(_) if started => self.on_pay(event, pay(share_minor, None)).await,
            Err(refusal) => {
                let reason = crate::payments::reason_of_request(refusal);
                let payee = counterpart(&request, &event.sender);
                self.decline(
                    event,
                    &payee,
                    self.minor_decimal(request.currency, share_minor),
                    request.currency.as_str(),
                    reason,
                    refusal.sentence(),
                )
                .await
            }
        }
    }

    /// The outbox saw a payment of request `request_id` end (`how`: `posted`, `voided`,
    /// `expired`): the payer's share is recorded paid (or open again), the notice edited and
    /// a status sent. Recorded already (a retry): told again with the same transaction ids.
    pub(super) async fn request_payment_ended(
        &self,
        request_id: Option<&str>,
        payer: &UserId,
        transfer_id: TransferId,
        how: &str,
    ) -> Result<(), PaymentsError> {
        let Some(id) = core_request::request_id_of(request_id) else {
            return Ok(());
        };
        let Some(before) = self.store.requests().get(&id)? else {
            return Ok(());
        };
        let now_ms = self.clock.now_ms();
        let (after, change) = if how == "posted" {
            match before.record_paid(payer, transfer_id.0, now_ms) {
                Ok(after) => {
                    self.invoice_request_paid(&id, payer, transfer_id)?;
                    (
                        after,
                        Change::Paid {
                            transfer_id: transfer_id.0,
                        },
                    )
                }
                Err(error) => {
                    tracing::warn!(%error, request = %id, "a posted payment is not the request's");
                    return Ok(());
                }
            }
        } else {
            match before.abandon_payment(payer, transfer_id.0, now_ms) {
                Ok(after) => (after, Change::Abandoned),
                // Recorded already.
                Err(_) => return Ok(()),
            }
        };
        let key = format!("{transfer_id}-{how}");
        let decision = core_request::changed(
            &before,
            &after,
            Some(payer),
            change,
            None,
            &key,
            &self.posted(&before)?,
            self.exponent(before.currency),
            now_ms,
        );
        self.apply(decision).await?;
        self.poke.poke();
        Ok(())
    }

    /// Writes down the expiry of up to a slice of lapsed requests and tells each room
    /// (bounded work, run after each handled event; a lapsed request is treated as expired
    /// before this too).
    pub(crate) async fn sweep_requests(&self) -> Result<(), PaymentsError> {
        let now_ms = self.clock.now_ms();
        let store = self.store.requests();
        for id in store.due(now_ms, EXPIRY_SWEEP_SLICE)? {
            let Some(before) = store.get(&id)? else {
                continue;
            };
            let (after, expired) = before.expire(now_ms);
            if expired.is_empty() && after == before {
                continue;
            }
            let decision = core_request::changed(
                &before,
                &after,
                None,
                Change::Expired,
                None,
                &format!("{id}|expired"),
                &self.posted(&before)?,
                self.exponent(before.currency),
                now_ms,
            );
            self.apply(decision).await?;
            self.invoice_request_changed(&after, now_ms)?;
        }
        Ok(())
    }
}

/// What a new request asks, as typed or sent.
enum NewAsk {
    /// `!request @payer AMOUNT CURRENCY`.
    One { payer: OwnedUserId, amount: Decimal },
    /// `!split ...`.
    Split(SplitShares),
    /// A client's `org.mxpay.payment_request`.
    Event(Box<PaymentRequestEventContent>),
}

impl NewAsk {
    /// Who and how much a refusal's receipt names: the person asked (the first of a split,
    /// the sender for a request open to everyone) and the amount asked (a split's total).
    fn refusal_facts(&self, sender: &UserId) -> (OwnedUserId, Decimal) {
        match self {
            NewAsk::One { payer, amount } => (payer.clone(), amount.abs()),
            NewAsk::Split(SplitShares::Even { total, people, .. }) => (
                people.first().cloned().unwrap_or_else(|| sender.to_owned()),
                total.abs(),
            ),
            NewAsk::Split(SplitShares::Uneven { shares }) => (
                shares
                    .first()
                    .map_or_else(|| sender.to_owned(), |(p, _)| p.clone()),
                shares.iter().map(|(_, a)| a.abs()).sum(),
            ),
            NewAsk::Event(content) => (
                content.payer.clone().unwrap_or_else(|| sender.to_owned()),
                content.amount.abs(),
            ),
        }
    }
}

/// The held-payment answer a reply command stands for (`!accept`, `!decline`).
fn held_action_of_reply(action: &requests::ReplyAction) -> Option<HeldAction> {
    match action {
        requests::ReplyAction::Accept => Some(HeldAction::Accept),
        requests::ReplyAction::Decline => Some(HeldAction::Decline),
        _ => None,
    }
}

/// The event replied to by a message's content (`m.relates_to.m.in_reply_to`), if any.
pub(super) fn reply_target(content: &Value) -> Option<ruma::OwnedEventId> {
    content["m.relates_to"]["m.in_reply_to"]["event_id"]
        .as_str()
        .and_then(|e| ruma::OwnedEventId::try_from(e).ok())
}

/// Who a refused answer to `request` names as the other party: the requester, or for the
/// requester themselves, the first payer.
fn counterpart(request: &crate::requests::Request, sender: &UserId) -> OwnedUserId {
    if sender == request.requester {
        request
            .shares()
            .first()
            .map_or(request.requester.clone(), |s| s.payer.clone())
    } else {
        request.requester.clone()
    }
}
