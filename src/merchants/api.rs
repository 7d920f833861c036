//! The merchant API under [`MERCHANT_PREFIX`]: invoices and refunds for a merchant's own
//! systems, authenticated with merchant API keys (never admin tokens). Each handler:
//! authenticate the key (signature, audience, expiry; then the store: known, not revoked,
//! merchant enabled, scope), read a size-capped body, let [`super::invoice`] decide, apply,
//! answer. Errors are Matrix-style JSON with a stable `reason`:
//! `{"errcode": "...", "error": "...", "reason": "..."}`.
//!
//! A key only ever reaches its own merchant's invoices: an invoice of another merchant answers
//! exactly as one that does not exist.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde::Deserialize;

use super::events::MerchantEvents;
use super::invoice::{
    self, Create, CreateInvoiceBody, Invoice, InvoiceRules, InvoiceState, RefundBody, RefundPlan,
};
use super::invoices::InvoiceStore;
use super::key::{bearer, KeyAuthority, KeyScope};
use super::model::Merchant;
use super::{MerchantError, MerchantStore};
use crate::audit::{AuditLog, CallLine};
use crate::clock::SharedClock;
use crate::flood::{Gate, Peer, RefusalGate};
use crate::ledger::{CreateResult, Ledger, LedgerError, Owner, TransferRequest};

/// Where the merchant API lives.
pub const MERCHANT_PREFIX: &str = "/_mxpay/merchant/v1";

/// Largest request body the merchant API reads, in bytes; larger bodies get 413.
pub const MERCHANT_BODY_BYTES_MAX: usize = 16 * 1024;

/// Posts an invoice in its room as the bot: checks that the bot is in the room, the room is
/// encrypted and the payer (if named) is joined, then sends the typed
/// `org.mxpay.payment_request` naming the merchant and the readable notice, with transaction
/// ids derived from the invoice id (a retried create shows them once). Returns the typed
/// event's id. Implemented by the payment flow; refusals are [`MerchantError::Room`].
#[async_trait::async_trait]
pub trait InvoicePoster: Send + Sync + std::fmt::Debug {
    /// Posts `invoice` of `merchant`.
    async fn post(&self, merchant: &Merchant, invoice: &Invoice) -> Result<String, MerchantError>;
}

/// The poster until the payment flow is connected: refuses every invoice, posting nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unconnected;

#[async_trait::async_trait]
impl InvoicePoster for Unconnected {
    async fn post(&self, _: &Merchant, _: &Invoice) -> Result<String, MerchantError> {
        Err(MerchantError::PostingUnavailable)
    }
}

/// What the merchant API works with.
pub struct MerchantApi {
    merchants: MerchantStore,
    invoices: InvoiceStore,
    keys: Arc<KeyAuthority>,
    ledger: Ledger,
    clock: SharedClock,
    /// The operator's rules for new invoices.
    rules: InvoiceRules,
    /// Set once by the wiring when the payment flow exists; until then [`Unconnected`].
    poster: std::sync::OnceLock<Arc<dyn InvoicePoster>>,
    /// Set once by the wiring when webhook delivery exists; until then [`super::NoEvents`].
    events: std::sync::OnceLock<Arc<dyn MerchantEvents>>,
    /// One refund at a time: the cap check and the write of the refund are one step.
    refunds: tokio::sync::Mutex<()>,
    /// The admin API's audit log and refused-call limits, when set ([`MerchantApi::with_audit`]).
    audit: Option<(Arc<AuditLog>, Arc<RefusalGate>)>,
}

impl std::fmt::Debug for MerchantApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerchantApi")
            .field("keys", &self.keys)
            .field("poster", &self.poster)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl MerchantApi {
    /// The API over the registry `merchants` (its invoice trees are opened beside it).
    pub fn new(
        merchants: MerchantStore,
        keys: Arc<KeyAuthority>,
        ledger: Ledger,
        clock: SharedClock,
    ) -> Result<Self, MerchantError> {
        Ok(Self {
            invoices: InvoiceStore::open(&merchants)?,
            merchants,
            keys,
            ledger,
            clock,
            rules: InvoiceRules::default(),
            poster: std::sync::OnceLock::new(),
            events: std::sync::OnceLock::new(),
            refunds: tokio::sync::Mutex::new(()),
            audit: None,
        })
    }

    /// Writes an audit line for every call that changes something (invoice created, refund)
    /// and every refused call, into the admin API's hash-chained `audit` log (one log for the
    /// operator to read); refused calls first pass `refusals`, the admin API's limits, so a
    /// flood of bad keys is answered 429 and costs the disk a bounded number of lines.
    pub fn with_audit(mut self, audit: Arc<AuditLog>, refusals: Arc<RefusalGate>) -> Self {
        self.audit = Some((audit, refusals));
        self
    }

    /// The API with the operator's `rules` for new invoices (default [`InvoiceRules::default`]).
    pub fn with_rules(mut self, rules: InvoiceRules) -> Self {
        self.rules = rules;
        self
    }

    /// Connects invoice posting (the payment flow); only the first call counts.
    pub fn set_poster(&self, poster: Arc<dyn InvoicePoster>) {
        let _ = self.poster.set(poster);
    }

    /// Connects webhook delivery; only the first call counts.
    pub fn set_events(&self, events: Arc<dyn MerchantEvents>) {
        let _ = self.events.set(events);
    }

    /// The merchant registry.
    pub fn merchants(&self) -> &MerchantStore {
        &self.merchants
    }

    /// The invoice store (for the payment flow: marking invoices paid, expired, cancelled).
    pub fn invoices(&self) -> &InvoiceStore {
        &self.invoices
    }

    fn authenticate(
        &self,
        headers: &HeaderMap,
        scope: KeyScope,
    ) -> (Caller, Result<Merchant, MerchantError>) {
        let claims = match bearer(headers).and_then(|key| self.keys.authenticate(key)) {
            Ok(claims) => claims,
            Err(e) => return (Caller::unauthenticated(), Err(e.into())),
        };
        // A genuine key refused (revoked, out of scope, merchant disabled) still names its
        // merchant, so the audit log shows who tried.
        let caller = Caller {
            actor: format!("merchant:{}", claims.sub),
            key_id: Some(claims.jti.clone()),
        };
        (caller, self.merchants.check_key(&claims, scope))
    }

    /// Audits the call when it changed something (`audited`) or was refused, then answers.
    /// A refused call over the limits is answered 429 without a line of its own; the next
    /// audited call writes one line counting those first. An audit line that cannot be written
    /// answers 500: the caller retries (every call is idempotent) and the log stays complete.
    async fn finish(
        &self,
        peer: Option<std::net::IpAddr>,
        caller: Caller,
        action: &'static str,
        target: String,
        result: Result<serde_json::Value, MerchantError>,
        audited: bool,
    ) -> Response {
        let Some((audit, refusals)) = &self.audit else {
            return answer(result);
        };
        let suppressed = match &result {
            Err(e) if e.is_refusal() => match refusals.check(peer) {
                Gate::Admit { suppressed_before } => suppressed_before,
                Gate::Limit { retry_after_ms } => {
                    return MerchantError::LimitExceeded { retry_after_ms }.into_response()
                }
            },
            _ if !audited => return answer(result),
            _ => refusals.take_suppressed(),
        };
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.reason().to_owned(),
        };
        let line = CallLine {
            actor: caller.actor,
            token_id: caller.key_id,
            action,
            target,
            result: outcome,
        };
        match audit
            .append_call(self.clock.now_ms(), suppressed, line)
            .await
        {
            Ok(()) => answer(result),
            Err(e) => MerchantError::Store(e).into_response(),
        }
    }

    fn events(&self) -> &dyn MerchantEvents {
        match self.events.get() {
            Some(events) => events.as_ref(),
            None => &super::NoEvents,
        }
    }

    fn emit(
        &self,
        invoice: &Invoice,
        event_type: &'static str,
        event_id: &str,
    ) -> Result<(), MerchantError> {
        // The body's `data` (docs/webhooks.md): the invoice as the merchant API shows it; the
        // event's id and type are the body's own.
        let payload = serde_json::json!({
            "invoice": invoice::view(invoice, self.ledger.currencies()),
        });
        self.events()
            .emit(&invoice.merchant_id, event_type, event_id, payload)
    }

    /// Stores `changed` with the event its change produced. The event goes to the outbox first
    /// (a crash in between re-feeds the same change, which emits the same event id again; the
    /// outbox keeps it once); if the outbox refuses it (full, failing), the change is stored
    /// anyway with the event kept to send later ([`Self::send_unsent`]): what happened (money
    /// moved) is never held back by the merchant's backlog, and its event is never lost.
    fn store_change(
        &self,
        changed: &Invoice,
        event: &invoice::EventOut,
    ) -> Result<(), MerchantError> {
        match self.emit(changed, event.event_type, &event.event_id) {
            Ok(()) => self.invoices.update(changed),
            Err(e) => {
                tracing::warn!(
                    invoice = %changed.invoice_id,
                    event_id = %event.event_id,
                    reason = e.reason(),
                    "the webhook outbox did not take an invoice event; kept to send later"
                );
                self.invoices.update_unsent(
                    changed,
                    &super::invoices::UnsentEvent {
                        event_id: event.event_id.clone(),
                        event_type: event.event_type.to_owned(),
                        invoice_id: changed.invoice_id.clone(),
                    },
                )
            }
        }
    }

    /// Sends again up to `limit` invoice events the outbox refused before (each with the
    /// invoice as it stands now); stops at the first refusal (the backlog is still there).
    /// Returns how many were taken.
    pub fn send_unsent(&self, limit: usize) -> Result<usize, MerchantError> {
        let mut taken = 0;
        for unsent in self.invoices.unsent(limit)? {
            let Some(event_type) = super::events::event_type_of(&unsent.event_type) else {
                tracing::error!(event_id = %unsent.event_id, "an unsent event of no known type; dropped");
                self.invoices.sent(&unsent.event_id)?;
                continue;
            };
            let Some(invoice) = self.invoices.get_any(&unsent.invoice_id)? else {
                self.invoices.sent(&unsent.event_id)?;
                continue;
            };
            match self.emit(&invoice, event_type, &unsent.event_id) {
                Ok(()) => {
                    self.invoices.sent(&unsent.event_id)?;
                    taken += 1;
                }
                Err(MerchantError::WebhookBacklog) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(taken)
    }

    /// The payment flow's report that `invoice_id` was paid by `payer` with the posted ledger
    /// transfer `transfer_id`: records it and emits `invoice.paid`. Idempotent: an invoice
    /// that is not open is returned unchanged and nothing is emitted.
    pub fn record_paid(
        &self,
        invoice_id: &str,
        payer: matrix_sdk::ruma::OwnedUserId,
        transfer_id: crate::ledger::TransferId,
    ) -> Result<Invoice, MerchantError> {
        let invoice = self
            .invoices
            .get_any(invoice_id)?
            .ok_or(invoice::InvoiceRefusal::InvoiceUnknown)?;
        match invoice::mark_paid(&invoice, payer, transfer_id, self.clock.now_ms()) {
            Some((paid, event)) => {
                self.store_change(&paid, &event)?;
                Ok(paid)
            }
            None => Ok(invoice),
        }
    }

    /// The payment flow's report that `invoice_id` ended unpaid (`cancelled`, else expired
    /// once due): records it and emits `invoice.cancelled` or `invoice.expired`. Idempotent.
    pub fn record_ended(
        &self,
        invoice_id: &str,
        cancelled: bool,
    ) -> Result<Invoice, MerchantError> {
        let invoice = self
            .invoices
            .get_any(invoice_id)?
            .ok_or(invoice::InvoiceRefusal::InvoiceUnknown)?;
        match invoice::mark_ended(&invoice, cancelled, self.clock.now_ms()) {
            Some((ended, event)) => {
                self.store_change(&ended, &event)?;
                Ok(ended)
            }
            None => Ok(invoice),
        }
    }

    /// Records a merchant's own typed request in a room as its invoice (idempotent: the same
    /// request event finds the invoice it made). No webhook: `invoice.paid` etc. follow as
    /// for any invoice.
    pub fn record_request(
        &self,
        merchant: &Merchant,
        request: &invoice::MerchantRequest<'_>,
    ) -> Result<Invoice, MerchantError> {
        let invoice = invoice::from_merchant_request(&merchant.id, request, self.clock.now_ms());
        if !self.invoices.insert(&invoice)? {
            if let Some(stored) = self.invoices.get_any(&invoice.invoice_id)? {
                return Ok(stored);
            }
        }
        tracing::info!(invoice = %invoice.invoice_id, merchant = %merchant.id, "a merchant's own request recorded as its invoice");
        Ok(invoice)
    }

    /// Creates (or replays) an invoice.
    pub async fn create_invoice(
        &self,
        merchant: &Merchant,
        body: &CreateInvoiceBody,
    ) -> Result<Invoice, MerchantError> {
        let id = invoice::invoice_id(&merchant.id, &body.idempotency_key);
        let existing = self.invoices.get(&merchant.id, &id)?;
        let now_ms = self.clock.now_ms();
        match invoice::decide_create(
            &merchant.id,
            body,
            existing,
            self.ledger.currencies(),
            &self.rules,
            now_ms,
        )? {
            Create::Replay(invoice) => Ok(invoice),
            Create::New(mut invoice) => {
                // Its paid / expired / cancelled event will need room in the merchant's webhook
                // outbox: refused now, before anything is posted, rather than lost later.
                invoice::check_merchant_limits(
                    &invoice,
                    &merchant.limits,
                    self.invoices.open_count(&merchant.id)?,
                    self.ledger.currencies(),
                )?;
                self.events().has_room(&merchant.id)?;
                let poster: &dyn InvoicePoster = match self.poster.get() {
                    Some(poster) => poster.as_ref(),
                    None => &Unconnected,
                };
                invoice.request_event_id = Some(poster.post(merchant, &invoice).await?);
                if self.invoices.insert(&invoice)? {
                    return Ok(invoice);
                }
                // A concurrent create with the same key stored first: the rule decides again.
                let stored = self.invoices.get(&merchant.id, &id)?;
                match invoice::decide_create(
                    &merchant.id,
                    body,
                    stored,
                    self.ledger.currencies(),
                    &self.rules,
                    now_ms,
                )? {
                    Create::Replay(invoice) | Create::New(invoice) => Ok(invoice),
                }
            }
        }
    }

    /// Refunds (part of) a paid invoice from the merchant's wallet to the payer.
    pub async fn refund(
        &self,
        merchant: &Merchant,
        invoice_id: &str,
        body: &RefundBody,
    ) -> Result<Invoice, MerchantError> {
        let _one_at_a_time = self.refunds.lock().await;
        let invoice = self
            .invoices
            .get(&merchant.id, invoice_id)?
            .ok_or(invoice::InvoiceRefusal::InvoiceUnknown)?;
        let plan = invoice::decide_refund(
            &invoice,
            body,
            self.ledger.currencies(),
            self.clock.now_ms(),
        )?;
        let RefundPlan::New {
            refund,
            transfer_id,
            refund_of,
            payer,
        } = plan
        else {
            return Ok(invoice);
        };
        // `refund.succeeded` will need room: refused before any money moves.
        self.events().has_room(&merchant.id)?;
        let amount = self
            .ledger
            .amount_from_minor(refund.amount_minor, &invoice.currency)
            .map_err(|e| MerchantError::Ledger("amount_invalid", e.to_string()))?;
        // The refund carries its payment's ledger reference (the invoice's request's), so
        // the invoice's transfers are found together. Read from the ledger, never derived
        // again: a payment made before references existed has none, so its refunds have none
        // and a retry of a refund made then names the same (none) as it did.
        let reference = self
            .ledger
            .transfer(refund_of)
            .await
            .map_err(|e| MerchantError::Store(e.to_string()))?
            .map_or(0, |paying| paying.reference);
        let request = TransferRequest {
            reference,
            id: transfer_id,
            debit: merchant.id.owner(),
            credit: Owner::user(payer.as_str()),
            amount,
            // The customer's DM notice reads the reason after ": ".
            memo: memo_of_refund(invoice_id, &invoice.order_ref, &body.reason),
        };
        match self
            .ledger
            .create_refund_result(request, refund_of, None)
            .await
        {
            Ok(CreateResult::Created(_) | CreateResult::Exists(_)) => {}
            Err(LedgerError::Rejected(e)) => {
                return Err(MerchantError::Ledger("refund_rejected", e.to_string()))
            }
            Err(e) => return Err(MerchantError::Store(e.to_string())),
        }
        let (updated, event) = invoice::with_refund(&invoice, refund, transfer_id);
        // Emitted before the refund is recorded: a retry after a crash in between finds the
        // ledger's refund (`Exists`) and emits the same event id again; never lost. The money
        // moved, so an outbox that filled meanwhile keeps the event for later, not the refund.
        self.store_change(&updated, &event)?;
        Ok(updated)
    }
}

impl MerchantApi {
    /// The ledger transfers of `invoice`, oldest first, at most
    /// [`invoice::TRANSFERS_SHOWN_MAX`]: by its ledger reference (an index, never a scan),
    /// and its paying transfer with that one's refunds by id when the reference does not
    /// list them (paid before references existed). As of the ledger's last durable record.
    pub async fn invoice_transfers(
        &self,
        invoice: &Invoice,
    ) -> Result<Vec<crate::ledger::Transfer>, MerchantError> {
        let store = |e: LedgerError| MerchantError::Store(e.to_string());
        let by_reference = match invoice::ledger_reference(invoice) {
            Some(reference) => self
                .ledger
                .transfers_by_reference(reference, invoice::TRANSFERS_SHOWN_MAX)
                .await
                .map_err(store)?,
            None => Vec::new(),
        };
        let (paying, refunds) = match invoice::paying_transfer(invoice) {
            Some(id) if !by_reference.iter().any(|t| t.id == id) => (
                self.ledger.transfer(id).await.map_err(store)?,
                self.ledger.refunds_of(id).await.map_err(store)?,
            ),
            _ => (None, Vec::new()),
        };
        let mut all = invoice::merge_transfers(by_reference, paying, refunds);
        all.truncate(invoice::TRANSFERS_SHOWN_MAX);
        Ok(all)
    }
}

/// The refund's ledger memo: `refund <invoice id> <order ref>: <reason>`, cut to the
/// ledger's bound on a character boundary.
fn memo_of_refund(invoice_id: &str, order_ref: &str, reason: &str) -> Vec<u8> {
    let mut memo = format!("refund {invoice_id} {order_ref}: {reason}");
    let max = crate::ledger::MEMO_BYTES_MAX;
    if memo.len() > max {
        let mut end = max;
        while !memo.is_char_boundary(end) {
            end -= 1;
        }
        memo.truncate(end);
    }
    memo.into_bytes()
}

impl IntoResponse for MerchantError {
    fn into_response(self) -> Response {
        if let Self::Store(detail) = &self {
            tracing::error!(%detail, "merchant API internal error");
        }
        let (status, errcode) = self.status_and_errcode();
        let mut body = serde_json::json!({
            "errcode": errcode,
            "error": self.to_string(),
            "reason": self.reason(),
        });
        if let Self::LimitExceeded { retry_after_ms } = self {
            // The Matrix rate-limit error carries the wait in the body.
            body["retry_after_ms"] = retry_after_ms.into();
        }
        let mut response = json(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &body,
        );
        let retry_after_s = match &self {
            Self::WebhookBacklog => Some(super::WEBHOOK_BACKLOG_RETRY_AFTER_S),
            Self::LimitExceeded { retry_after_ms } => Some(retry_after_ms.div_ceil(1000)),
            _ => None,
        };
        if let Some(retry_after_s) = retry_after_s {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(retry_after_s),
            );
        }
        response
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(value).expect("JSON values serialise"),
    )
        .into_response()
}

type Shared = Arc<MerchantApi>;

/// Who made a merchant API call, for the audit log.
struct Caller {
    actor: String,
    key_id: Option<String>,
}

impl Caller {
    fn unauthenticated() -> Self {
        Self {
            actor: "unauthenticated".to_owned(),
            key_id: None,
        }
    }
}

/// The audited actions of the merchant API.
const ACTION_INVOICE_CREATE: &str = "merchant.invoice.create";
const ACTION_INVOICE_REFUND: &str = "merchant.invoice.refund";
const ACTION_INVOICE_READ: &str = "merchant.invoice.read";

async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, MerchantError> {
    let bytes = axum::body::to_bytes(body, MERCHANT_BODY_BYTES_MAX)
        .await
        .map_err(|_| MerchantError::TooLarge)?;
    if !bytes.trim_ascii_start().starts_with(b"{") {
        return Err(MerchantError::BadJson(
            "the body must be a JSON object".to_owned(),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| MerchantError::BadJson(e.to_string()))
}

fn answer(result: Result<serde_json::Value, MerchantError>) -> Response {
    match result {
        Ok(value) => json(StatusCode::OK, &value),
        Err(e) => e.into_response(),
    }
}

async fn post_invoice(
    State(api): State<Shared>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (caller, merchant) = api.authenticate(&headers, KeyScope::Invoices);
    let result = async {
        // Authenticated first: a refused call's body is never read.
        let merchant = merchant?;
        let body: CreateInvoiceBody = read_json(body).await?;
        let invoice = api.create_invoice(&merchant, &body).await?;
        Ok(invoice::view(&invoice, api.ledger.currencies()))
    }
    .await;
    let target = target_of(&result);
    api.finish(peer, caller, ACTION_INVOICE_CREATE, target, result, true)
        .await
}

/// The audit target of an answered invoice: its id (empty when there is none).
fn target_of(result: &Result<serde_json::Value, MerchantError>) -> String {
    result
        .as_ref()
        .ok()
        .and_then(|view| view["invoice_id"].as_str())
        .unwrap_or_default()
        .to_owned()
}

async fn get_invoice(
    State(api): State<Shared>,
    Peer(peer): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (caller, merchant) = api.authenticate(&headers, KeyScope::Read);
    let target = id.clone();
    let result = async {
        let merchant = merchant?;
        let invoice = api
            .invoices
            .get(&merchant.id, &id)?
            .ok_or(invoice::InvoiceRefusal::InvoiceUnknown)?;
        let currencies = api.ledger.currencies();
        let mut view = invoice::view(&invoice, currencies);
        // Only here, not in lists or webhooks: one ledger read per transfer shown.
        let transfers = api.invoice_transfers(&invoice).await?;
        view["transfers"] = invoice::transfers_view(&transfers, currencies);
        Ok(view)
    }
    .await;
    api.finish(peer, caller, ACTION_INVOICE_READ, target, result, false)
        .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    since: Option<u64>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn get_invoices(
    State(api): State<Shared>,
    Peer(peer): Peer,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (caller, merchant) = api.authenticate(&headers, KeyScope::Read);
    let result = (|| {
        let merchant = merchant?;
        let Query(query) = query.map_err(|e| MerchantError::BadJson(e.body_text()))?;
        let status = match query.status.as_deref() {
            None => None,
            Some("open") => Some(InvoiceState::Open),
            Some("paid") => Some(InvoiceState::Paid),
            Some("cancelled") => Some(InvoiceState::Cancelled),
            Some("expired") => Some(InvoiceState::Expired),
            Some(_) => return Err(MerchantError::BadJson("unknown status".to_owned())),
        };
        let page = api.invoices.list(
            &merchant.id,
            status,
            query.since,
            query.cursor.as_deref(),
            query.limit.unwrap_or(super::invoices::INVOICE_PAGE_MAX),
        )?;
        let currencies = api.ledger.currencies();
        Ok(serde_json::json!({
            "invoices": page.invoices.iter().map(|i| invoice::view(i, currencies)).collect::<Vec<_>>(),
            "next": page.next,
        }))
    })();
    api.finish(
        peer,
        caller,
        ACTION_INVOICE_READ,
        String::new(),
        result,
        false,
    )
    .await
}

async fn post_refund(
    State(api): State<Shared>,
    Peer(peer): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (caller, merchant) = api.authenticate(&headers, KeyScope::Refunds);
    let target = id.clone();
    let result = async {
        let merchant = merchant?;
        let body: RefundBody = read_json(body).await?;
        let invoice = api.refund(&merchant, &id, &body).await?;
        Ok(invoice::view(&invoice, api.ledger.currencies()))
    }
    .await;
    api.finish(peer, caller, ACTION_INVOICE_REFUND, target, result, true)
        .await
}

fn not_allowed<S: Clone + Send + Sync + 'static>(route: MethodRouter<S>) -> MethodRouter<S> {
    route.fallback(|| async {
        json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"errcode": "M_UNRECOGNIZED", "error": "method not allowed"}),
        )
    })
}

/// The merchant API router and the `(method, path)` list of what it mounts (for the OpenAPI
/// test). `None` (no admin token key, so no merchant keys): every path answers 404.
pub fn routes(api: Option<Shared>) -> (Router, Vec<(&'static str, String)>) {
    let Some(api) = api else {
        let router = Router::new().route(
            &format!("{MERCHANT_PREFIX}/{{*rest}}"),
            axum::routing::any(|| async {
                json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"errcode": "M_NOT_FOUND", "error": "the merchant API is not enabled (set admin.token in the config)"}),
                )
            }),
        );
        return (
            router,
            vec![("any", format!("{MERCHANT_PREFIX}/{{*rest}}"))],
        );
    };
    let p = |path: &str| format!("{MERCHANT_PREFIX}{path}");
    let routes = vec![
        ("post", p("/invoices")),
        ("get", p("/invoices")),
        ("get", p("/invoices/{invoice_id}")),
        ("post", p("/invoices/{invoice_id}/refunds")),
    ];
    let router = Router::new()
        .route(
            &p("/invoices"),
            not_allowed(post(post_invoice).get(get_invoices)),
        )
        .route(&p("/invoices/{invoice_id}"), not_allowed(get(get_invoice)))
        .route(
            &p("/invoices/{invoice_id}/refunds"),
            not_allowed(post(post_refund)),
        )
        .with_state(api);
    (router, routes)
}
