//! Invoices, durably, in the merchant database (`<data_dir>/merchants/`):
//! - `invoiceid_invoice`: invoice id -> [`Invoice`] (JSON)
//! - `merchantid_createdms_invoiceid`: merchant id, 0x00, created_at_ms (8 bytes BE), invoice
//!   id -> nothing: a merchant's invoices in creation order, for cursor paging
//! - `merchantid_invoicecount`: merchant id -> how many invoices it has (u64 BE), the bound
//! - `merchantid_openinvoicecount`: merchant id -> how many of its invoices are open (u64 BE),
//!   for the merchant's cap on open invoices
//! - `requesteventid_invoiceid`: the room request event an invoice stands for -> its id (for
//!   the payment flow, which knows requests by event id)
//! - `eventid_unsentinvoiceevent`: webhook event id -> [`UnsentEvent`] (JSON): an invoice
//!   change stored while the webhook outbox refused its event; sent again until taken. At most
//!   one per invoice state change or refund, so bounded by the invoices.
//!
//! Each write is one sled transaction over these trees, flushed (and fdatasynced) before the
//! call answers.

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

use super::invoice::{Invoice, InvoiceState};
use super::model::MerchantId;
use super::{MerchantError, MerchantStore};

const INVOICE_TREE: &str = "invoiceid_invoice";
const BY_MERCHANT_TREE: &str = "merchantid_createdms_invoiceid";
const COUNT_TREE: &str = "merchantid_invoicecount";
const UNSENT_TREE: &str = "eventid_unsentinvoiceevent";
const OPEN_TREE: &str = "merchantid_openinvoicecount";
const BY_REQUEST_TREE: &str = "requesteventid_invoiceid";

fn count_of(value: Option<sled::IVec>) -> u64 {
    value.map_or(0, |v| {
        let mut bytes = [0u8; 8];
        let len = v.len().min(8);
        bytes[..len].copy_from_slice(&v[..len]);
        u64::from_be_bytes(bytes)
    })
}

/// Whether storing `after` over the stored bytes `before` closes an open invoice.
fn closes(before: Option<&sled::IVec>, after: &Invoice) -> bool {
    after.state != InvoiceState::Open
        && before
            .and_then(|b| serde_json::from_slice::<Invoice>(b).ok())
            .is_some_and(|b| b.state == InvoiceState::Open)
}

/// A webhook event of an invoice change that the outbox did not take yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnsentEvent {
    /// The event's id.
    pub event_id: String,
    /// `invoice.paid`, ...
    pub event_type: String,
    /// The invoice it reports.
    pub invoice_id: String,
}

/// Most invoices one merchant may have stored.
pub const INVOICES_PER_MERCHANT_MAX: u64 = 1_000_000;
/// Largest page of a list call.
pub const INVOICE_PAGE_MAX: usize = 100;
/// Most stored invoices one list call looks at (a status filter skips the others), so a call
/// stays bounded whatever the filter.
pub const INVOICE_SCAN_MAX: usize = 10_000;

/// A page of invoices and where the next one starts.
#[derive(Debug, Clone)]
pub struct InvoicePage {
    /// Invoices, oldest first.
    pub invoices: Vec<Invoice>,
    /// Pass as `cursor` for the next page; `None` at the end.
    pub next: Option<String>,
}

/// The invoice store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InvoiceStore {
    merchants: MerchantStore,
    invoices: sled::Tree,
    by_merchant: sled::Tree,
    counts: sled::Tree,
    open: sled::Tree,
    by_request: sled::Tree,
    unsent: sled::Tree,
}

fn store_err(e: impl std::fmt::Display) -> MerchantError {
    MerchantError::Store(e.to_string())
}

fn index_key(invoice: &Invoice) -> Vec<u8> {
    [
        invoice.merchant_id.as_str().as_bytes(),
        &[0],
        &invoice.created_at_ms.to_be_bytes(),
        invoice.invoice_id.as_bytes(),
    ]
    .concat()
}

impl InvoiceStore {
    /// The invoice trees beside the merchant registry.
    pub fn open(merchants: &MerchantStore) -> Result<Self, MerchantError> {
        let db = merchants.db();
        Ok(Self {
            invoices: db.open_tree(INVOICE_TREE).map_err(store_err)?,
            by_merchant: db.open_tree(BY_MERCHANT_TREE).map_err(store_err)?,
            counts: db.open_tree(COUNT_TREE).map_err(store_err)?,
            open: db.open_tree(OPEN_TREE).map_err(store_err)?,
            by_request: db.open_tree(BY_REQUEST_TREE).map_err(store_err)?,
            unsent: db.open_tree(UNSENT_TREE).map_err(store_err)?,
            merchants: merchants.clone(),
        })
    }

    /// The invoice `invoice_id` of `merchant`; another merchant's invoice is `None`, as if it
    /// did not exist.
    pub fn get(
        &self,
        merchant: &MerchantId,
        invoice_id: &str,
    ) -> Result<Option<Invoice>, MerchantError> {
        Ok(self
            .get_any(invoice_id)?
            .filter(|invoice| &invoice.merchant_id == merchant))
    }

    /// The invoice `invoice_id`, whoever's it is (for the payment flow).
    pub fn get_any(&self, invoice_id: &str) -> Result<Option<Invoice>, MerchantError> {
        self.invoices
            .get(invoice_id)
            .map_err(store_err)?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(store_err))
            .transpose()
    }

    /// Stores a new invoice; `Ok(false)` when one with its id exists already (a concurrent
    /// create with the same key won: the caller reads it and applies the idempotency rule).
    pub fn insert(&self, invoice: &Invoice) -> Result<bool, MerchantError> {
        let value = serde_json::to_vec(invoice).map_err(store_err)?;
        let index = index_key(invoice);
        let merchant = invoice.merchant_id.as_str().as_bytes();
        let id = invoice.invoice_id.as_bytes();
        let request = invoice.request_event_id.as_deref().map(str::as_bytes);
        let inserted = (
            &self.invoices,
            &self.by_merchant,
            &self.counts,
            &self.open,
            &self.by_request,
        )
            .transaction(|(invoices, by_merchant, counts, open, by_request)| {
                if invoices.get(id)?.is_some() {
                    return Ok(false);
                }
                let count = counts.get(merchant)?.map_or(0, |v| {
                    let mut bytes = [0u8; 8];
                    bytes.copy_from_slice(&v[..8.min(v.len())]);
                    u64::from_be_bytes(bytes)
                });
                if count >= INVOICES_PER_MERCHANT_MAX {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                invoices.insert(id, value.as_slice())?;
                by_merchant.insert(index.as_slice(), &[][..])?;
                counts.insert(merchant, &(count + 1).to_be_bytes())?;
                if invoice.state == InvoiceState::Open {
                    let open_now = count_of(open.get(merchant)?);
                    open.insert(merchant, &(open_now + 1).to_be_bytes())?;
                }
                if let Some(request) = request {
                    by_request.insert(request, id)?;
                }
                Ok(true)
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => MerchantError::TooManyInvoices,
                TransactionError::Storage(e) => store_err(e),
            })?;
        self.merchants.flush()?;
        Ok(inserted)
    }

    /// Replaces a stored invoice by a changed copy (state, refunds, the posted event).
    pub fn update(&self, invoice: &Invoice) -> Result<(), MerchantError> {
        self.write(invoice, None)
    }

    /// The id of the invoice that the room request event `request_event_id` stands for.
    pub fn by_request(&self, request_event_id: &str) -> Result<Option<String>, MerchantError> {
        Ok(self
            .by_request
            .get(request_event_id.as_bytes())
            .map_err(store_err)?
            .map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    /// How many of `merchant`'s invoices are open.
    pub fn open_count(&self, merchant: &MerchantId) -> Result<u64, MerchantError> {
        Ok(count_of(
            self.open
                .get(merchant.as_str().as_bytes())
                .map_err(store_err)?,
        ))
    }

    /// Stores `invoice` over its stored copy (and `unsent`, if given), counting it out of the
    /// open ones when this closes it: one transaction, flushed.
    fn write(&self, invoice: &Invoice, unsent: Option<&UnsentEvent>) -> Result<(), MerchantError> {
        let value = serde_json::to_vec(invoice).map_err(store_err)?;
        let unsent = unsent
            .map(|u| serde_json::to_vec(u).map(|bytes| (u.event_id.clone(), bytes)))
            .transpose()
            .map_err(store_err)?;
        let merchant = invoice.merchant_id.as_str().as_bytes();
        (&self.invoices, &self.open, &self.unsent)
            .transaction(|(invoices, open, pending)| {
                let before = invoices.insert(invoice.invoice_id.as_bytes(), value.as_slice())?;
                if closes(before.as_ref(), invoice) {
                    let open_now = count_of(open.get(merchant)?);
                    open.insert(merchant, &open_now.saturating_sub(1).to_be_bytes())?;
                }
                if let Some((event_id, bytes)) = &unsent {
                    pending.insert(event_id.as_bytes(), bytes.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => store_err("aborted"),
                TransactionError::Storage(e) => store_err(e),
            })?;
        self.merchants.flush()
    }

    /// Replaces a stored invoice by a changed copy and keeps `event` (its change's webhook
    /// event, which the outbox refused) to send later: one transaction, so the change is never
    /// stored without its event.
    pub fn update_unsent(
        &self,
        invoice: &Invoice,
        event: &UnsentEvent,
    ) -> Result<(), MerchantError> {
        self.write(invoice, Some(event))
    }

    /// Up to `limit` events waiting to be sent again, oldest id order.
    pub fn unsent(&self, limit: usize) -> Result<Vec<UnsentEvent>, MerchantError> {
        self.unsent
            .iter()
            .take(limit)
            .map(|entry| {
                let (_, value) = entry.map_err(store_err)?;
                serde_json::from_slice(&value).map_err(store_err)
            })
            .collect()
    }

    /// How many events wait to be sent again.
    pub fn unsent_len(&self) -> usize {
        self.unsent.len()
    }

    /// The outbox took the event `event_id`: it no longer waits.
    pub fn sent(&self, event_id: &str) -> Result<(), MerchantError> {
        self.unsent.remove(event_id.as_bytes()).map_err(store_err)?;
        self.merchants.flush()
    }

    /// Up to `limit` of `merchant`'s invoices in creation order, created at or after
    /// `since_ms`, after `cursor`, with state `status` if given.
    pub fn list(
        &self,
        merchant: &MerchantId,
        status: Option<InvoiceState>,
        since_ms: Option<u64>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<InvoicePage, MerchantError> {
        let prefix = [merchant.as_str().as_bytes(), &[0]].concat();
        let start = match cursor {
            Some(cursor) => {
                let bytes = hex::decode(cursor).map_err(|_| MerchantError::BadCursor)?;
                if !bytes.starts_with(&prefix) {
                    return Err(MerchantError::BadCursor);
                }
                [bytes.as_slice(), &[0]].concat()
            }
            None => [prefix.as_slice(), &since_ms.unwrap_or(0).to_be_bytes()].concat(),
        };
        let limit = limit.clamp(1, INVOICE_PAGE_MAX);
        let mut invoices = Vec::new();
        let mut last = None;
        for entry in self.by_merchant.range(start..).take(INVOICE_SCAN_MAX) {
            let (key, _) = entry.map_err(store_err)?;
            if !key.starts_with(&prefix) {
                break;
            }
            last = Some(key.to_vec());
            let id = &key[prefix.len() + 8..];
            let Some(invoice) = self.get_any(&String::from_utf8_lossy(id))? else {
                continue;
            };
            if since_ms.is_some_and(|s| invoice.created_at_ms < s) {
                continue;
            }
            if status.is_none_or(|s| s == invoice.state) {
                invoices.push(invoice);
                if invoices.len() == limit {
                    break;
                }
            }
        }
        // A next page when the scan stopped early: a full page, or the scan bound.
        let more = last.as_ref().is_some_and(|last| {
            self.by_merchant
                .range([last.as_slice(), &[0]].concat()..)
                .next()
                .and_then(Result::ok)
                .is_some_and(|(k, _)| k.starts_with(&prefix))
        });
        Ok(InvoicePage {
            invoices,
            next: if more { last.map(hex::encode) } else { None },
        })
    }
}
