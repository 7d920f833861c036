//! The JSON shapes the admin API answers with. Amounts are decimal strings in major units with
//! the currency's decimal places (`"12.50"`), never floats; ids are 32 hex digits.

use serde::{Deserialize, Serialize};

use crate::ledger::{
    AccountId, AccountView, Currencies, ExportedEntry, FreezeMode, JournalEntry, Owner, Transfer,
    TransferKind, TransferState,
};

/// An owner as text: a user ID, `merchant:<id>`, or `system:issuer` / `system:settlement` /
/// `system:fees`.
pub fn owner_str(owner: &Owner) -> String {
    match owner {
        Owner::User(name) => name.clone(),
        Owner::Issuer => "system:issuer".to_owned(),
        Owner::Settlement => "system:settlement".to_owned(),
        Owner::Fees => "system:fees".to_owned(),
        Owner::Merchant(id) => format!("merchant:{id}"),
    }
}

fn amount_str(currencies: &Currencies, account: &AccountId, minor: u128) -> String {
    currencies
        .to_decimal(account.currency, minor)
        .map(|d| d.to_string())
        // A currency the journal knows but the config dropped: show minor units, marked.
        .unwrap_or_else(|| format!("{minor} (minor units)"))
}

fn signed_amount_str(currencies: &Currencies, account: &AccountId, minor: i128) -> String {
    let text = amount_str(currencies, account, minor.unsigned_abs());
    if minor < 0 {
        format!("-{text}")
    } else {
        text
    }
}

/// A freeze mode as text.
pub fn freeze_str(mode: FreezeMode) -> &'static str {
    match mode {
        FreezeMode::Debits => "debits",
        FreezeMode::All => "all",
    }
}

/// One account of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountJson {
    /// ISO code.
    pub currency: String,
    /// What the owner may spend: posted credits minus posted and pending debits.
    pub available: String,
    /// Posted credits minus posted debits.
    pub posted: String,
    /// Reserved by pending transfers out of the account.
    pub pending_out: String,
    /// Pending transfers into the account, not yet spendable.
    pub pending_in: String,
    /// `debits`, `all`, or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<String>,
}

impl AccountJson {
    /// From a ledger account view.
    pub fn new(currencies: &Currencies, view: &AccountView) -> Self {
        let b = &view.balances;
        let posted = b.credits_posted_minor as i128 - b.debits_posted_minor as i128;
        Self {
            currency: view.id.currency.to_string(),
            available: signed_amount_str(currencies, &view.id, b.available_minor()),
            posted: signed_amount_str(currencies, &view.id, posted),
            pending_out: amount_str(currencies, &view.id, b.debits_pending_minor),
            pending_in: amount_str(currencies, &view.id, b.credits_pending_minor),
            frozen: view.frozen.map(|m| freeze_str(m).to_owned()),
        }
    }
}

/// A transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferJson {
    /// 32 hex digits.
    pub id: String,
    /// `single`, `pending` or `refund`.
    pub kind: String,
    /// Owner money leaves.
    pub from: String,
    /// Owner money enters.
    pub to: String,
    /// Amount asked for (reserved, for a pending transfer).
    pub amount: String,
    /// ISO code.
    pub currency: String,
    /// `pending`, `posted`, `voided` or `expired`.
    pub state: String,
    /// For a posted pending transfer: the amount that moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posted_amount: Option<String>,
    /// The memo: its JSON if it is JSON, else its text (lossy UTF-8).
    pub memo: serde_json::Value,
    /// Created, ms since the Unix epoch (ledger time).
    pub created_ms: u64,
    /// Ended (posted, voided, expired), for pending transfers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// When a pending transfer expires unless posted or voided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// For a refund: the transfer it refunds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_of: Option<String>,
    /// Refunded so far, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded: Option<String>,
    /// The ledger reference (32 hex digits), if any: the payment request (or invoice) a
    /// payment or its refund belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A memo as JSON: parsed if it is JSON, else a string.
pub fn memo_json(memo: &[u8]) -> serde_json::Value {
    if memo.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(memo)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(memo).into_owned()))
}

fn kind_str(kind: TransferKind) -> (&'static str, Option<String>) {
    match kind {
        TransferKind::Single => ("single", None),
        TransferKind::Pending { .. } => ("pending", None),
        TransferKind::Refund { original } => ("refund", Some(original.to_string())),
    }
}

impl TransferJson {
    /// From a ledger transfer.
    pub fn new(currencies: &Currencies, t: &Transfer) -> Self {
        let (state, posted_amount) = match t.state {
            TransferState::Pending => ("pending", None),
            TransferState::Posted { amount_minor } => (
                "posted",
                matches!(t.kind, TransferKind::Pending { .. })
                    .then(|| amount_str(currencies, &t.debit, amount_minor)),
            ),
            TransferState::Voided => ("voided", None),
            TransferState::Expired => ("expired", None),
        };
        let (kind, refund_of) = kind_str(t.kind);
        Self {
            id: t.id.to_string(),
            kind: kind.to_owned(),
            from: owner_str(&t.debit.owner),
            to: owner_str(&t.credit.owner),
            amount: amount_str(currencies, &t.debit, t.amount_minor),
            currency: t.debit.currency.to_string(),
            state: state.to_owned(),
            posted_amount,
            memo: memo_json(&t.memo),
            created_ms: t.created_ms,
            ended_ms: t.ended_ms,
            deadline_ms: t.deadline_ms,
            refund_of,
            refunded: (t.refunded_minor > 0)
                .then(|| amount_str(currencies, &t.debit, t.refunded_minor)),
            reference: (t.reference != 0).then(|| format!("{:032x}", t.reference)),
        }
    }
}

/// One exported journal entry, as one JSON line.
pub fn journal_line(currencies: &Currencies, e: &ExportedEntry) -> serde_json::Value {
    use serde_json::json;
    let account =
        |a: &AccountId| json!({ "owner": owner_str(&a.owner), "currency": a.currency.to_string() });
    let mut line = match &e.entry {
        JournalEntry::CurrencyDefined { code, exponent } => {
            json!({ "type": "currency_defined", "code": code.to_string(), "exponent": exponent })
        }
        JournalEntry::AccountOpened { account: a } => {
            json!({ "type": "account_opened", "account": account(a) })
        }
        JournalEntry::TransferCreated {
            id,
            kind,
            debit,
            credit,
            amount_minor,
            memo,
        } => {
            let (kind, refund_of) = kind_str(*kind);
            json!({
                "type": "transfer_created",
                "id": id.to_string(),
                "kind": kind,
                "refund_of": refund_of,
                "from": account(debit),
                "to": account(credit),
                "amount_minor": amount_minor.to_string(),
                "amount": amount_str(currencies, debit, *amount_minor),
                "memo": memo_json(memo),
            })
        }
        JournalEntry::PendingPosted { id, amount_minor } => json!({
            "type": "pending_posted", "id": id.to_string(), "amount_minor": amount_minor.to_string(),
        }),
        JournalEntry::PendingVoided { id } => {
            json!({ "type": "pending_voided", "id": id.to_string() })
        }
        JournalEntry::PendingExpired { id } => {
            json!({ "type": "pending_expired", "id": id.to_string() })
        }
        JournalEntry::TransferFailed { id, error } => json!({
            "type": "transfer_failed", "id": id.to_string(), "error": format!("{error:?}"), "code": error.code(),
        }),
        JournalEntry::AccountFrozen { account: a, mode } => json!({
            "type": "account_frozen", "account": account(a), "mode": mode.map(freeze_str),
        }),
    };
    line["record_seq"] = json!(e.record_seq);
    line["time_ms"] = json!(e.time_ms);
    line
}
