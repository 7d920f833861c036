//! The ledger's vocabulary: accounts, transfers, and the result codes of a transfer.

use std::fmt;

use super::amount::{Amount, CurrencyCode};

/// The largest memo a transfer may carry, in bytes.
pub const MEMO_BYTES_MAX: usize = 1024;

/// The longest a user owner string may be, in bytes.
pub const OWNER_BYTES_MAX: usize = 512;

/// The longest a pending transfer may wait for its post or void: 30 days.
pub const PENDING_TIMEOUT_MS_MAX: u64 = 30 * 24 * 60 * 60 * 1000;

/// A transfer id chosen by the caller; the same id is the same transfer (idempotency).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u128);

impl TransferId {
    /// A stable id derived from a string key (e.g. an event id or transaction id): the first
    /// 16 bytes of its blake3 hash, so the same key always gives the same id.
    pub fn from_key(key: &str) -> Self {
        let hash = blake3::hash(key.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash.as_bytes()[..16]);
        // Zero is reserved as "no id"; a hash landing on it is astronomically unlikely but
        // must still not produce an invalid id.
        Self(u128::from_be_bytes(bytes).max(1))
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransferId({:032x})", self.0)
    }
}

/// Who owns an account: an opaque user string, or one of the system accounts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A user; the string is opaque to the ledger.
    User(String),
    /// Where money enters the system (deposits, minting); may go negative.
    Issuer,
    /// Money on its way out of or into the system (withdrawals); may go negative.
    Settlement,
    /// Fees collected; may go negative.
    Fees,
    /// A merchant's wallet (invoices paid to it, refunds paid from it); the string is the
    /// merchant id, opaque to the ledger. Like a user's, it never goes negative.
    Merchant(String),
}

impl Owner {
    /// A user owner.
    pub fn user(name: impl Into<String>) -> Self {
        Self::User(name.into())
    }

    /// System accounts may be overdrawn (debits above credits); user accounts never.
    pub fn is_system(&self) -> bool {
        !matches!(self, Self::User(_) | Self::Merchant(_))
    }

    /// A merchant owner.
    pub fn merchant(id: impl Into<String>) -> Self {
        Self::Merchant(id.into())
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(name) => f.write_str(name),
            Self::Issuer => f.write_str("<issuer>"),
            Self::Settlement => f.write_str("<settlement>"),
            Self::Fees => f.write_str("<fees>"),
            Self::Merchant(id) => write!(f, "<merchant:{id}>"),
        }
    }
}

/// An account: one owner, one currency.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId {
    /// Owner.
    pub owner: Owner,
    /// Currency.
    pub currency: CurrencyCode,
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.currency)
    }
}

/// How far an account is frozen. A freeze refuses *new* transfers (create, create pending,
/// refund); a pending transfer created before the freeze can still be posted, voided or
/// expire, whichever of its accounts is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FreezeMode {
    /// No new transfer may take money from the account (it may still receive).
    Debits,
    /// No new transfer may take money from the account or bring money to it.
    All,
}

/// The four balances of an account, in minor units (TigerBeetle's model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Balances {
    /// Reserved by pending transfers out of the account.
    pub debits_pending_minor: u128,
    /// Posted transfers out of the account.
    pub debits_posted_minor: u128,
    /// Reserved by pending transfers into the account.
    pub credits_pending_minor: u128,
    /// Posted transfers into the account.
    pub credits_posted_minor: u128,
}

impl Balances {
    /// What a user may still spend: posted credits minus posted and pending debits
    /// (negative only for system accounts).
    pub fn available_minor(&self) -> i128 {
        self.credits_posted_minor as i128
            - self.debits_posted_minor as i128
            - self.debits_pending_minor as i128
    }
}

/// An account as seen by callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    /// Which account.
    pub id: AccountId,
    /// Its balances.
    pub balances: Balances,
    /// Whether and how it is frozen.
    pub frozen: Option<FreezeMode>,
}

/// What kind of transfer this is; fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferKind {
    /// Posted at once.
    Single,
    /// Reserves funds until posted, voided, or expired after `timeout_ms`.
    Pending {
        /// How long the reservation lasts.
        timeout_ms: u64,
    },
    /// Gives back (part of) a posted transfer: debit and credit are the original's, swapped.
    Refund {
        /// The transfer refunded.
        original: TransferId,
    },
}

/// Where a transfer stands. Only `Pending` ever changes, exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferState {
    /// Funds reserved; waits for post, void or expiry.
    Pending,
    /// Money moved; for a posted pending, `amount_minor` may be below the reserved amount.
    Posted {
        /// The amount that moved.
        amount_minor: u128,
    },
    /// A pending transfer released by its caller.
    Voided,
    /// A pending transfer released by the clock.
    Expired,
}

/// The order of a history query's transfers (TigerBeetle's `reversed` flag, the other way
/// round: newest first is the default here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistoryOrder {
    /// Newest (highest transfer index, latest `created_ms`) first.
    #[default]
    NewestFirst,
    /// Oldest first.
    OldestFirst,
}

/// A transfer as seen by callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Caller-chosen id.
    pub id: TransferId,
    /// Kind.
    pub kind: TransferKind,
    /// Account money leaves.
    pub debit: AccountId,
    /// Account money enters.
    pub credit: AccountId,
    /// Amount asked for (reserved, for a pending transfer), minor units.
    pub amount_minor: u128,
    /// Current state.
    pub state: TransferState,
    /// Opaque caller data (at most [`MEMO_BYTES_MAX`] bytes).
    pub memo: Vec<u8>,
    /// Ledger time of creation.
    pub created_ms: u64,
    /// Ledger time it ended (posted/voided/expired), for pending transfers.
    pub ended_ms: Option<u64>,
    /// For a pending transfer: when it expires unless posted or voided.
    pub deadline_ms: Option<u64>,
    /// The caller's reference ([`TransferRequest::reference`]); 0: none.
    pub reference: u128,
    /// Sum of refunds made against this transfer, minor units (single-phase refunds, and
    /// what pending refunds posted).
    pub refunded_minor: u128,
    /// For a refund (single-phase or pending): the transfer it refunds.
    pub refund_of: Option<TransferId>,
    /// What pending refunds of this transfer reserve now; counted against its cap with
    /// `refunded_minor`.
    pub refund_pending_minor: u128,
}

/// One change of a [`crate::ledger::Ledger::batch`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// As [`crate::ledger::Ledger::create_transfer`].
    Create(TransferRequest),
    /// As [`crate::ledger::Ledger::create_pending`].
    CreatePending {
        /// The transfer to reserve.
        request: TransferRequest,
        /// How long it stays pending, at most.
        timeout_ms: u64,
    },
    /// As [`crate::ledger::Ledger::post`].
    Post {
        /// The pending transfer.
        pending: TransferId,
        /// In part (the rest is released), or in full (`None`).
        amount: Option<Amount>,
    },
    /// As [`crate::ledger::Ledger::void`].
    Void {
        /// The pending transfer.
        pending: TransferId,
    },
}

/// One change of a [`crate::ledger::Ledger::batch_linked`] call: a [`BatchOp`], and whether
/// it is linked to the change after it (TigerBeetle's `flags.linked`). A run of changes marked
/// linked, and the first unmarked one after them, form a chain that applies whole or not at
/// all (see docs/ledger.md, Linked chains).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    /// The change.
    pub op: BatchOp,
    /// Whether the chain goes on with the next change of the call.
    pub linked: bool,
}

impl From<BatchOp> for BatchEntry {
    /// A change on its own (or the last of a chain).
    fn from(op: BatchOp) -> Self {
        Self { op, linked: false }
    }
}

impl BatchOp {
    /// This change, linked to the next one of the call.
    pub fn linked(self) -> BatchEntry {
        BatchEntry {
            op: self,
            linked: true,
        }
    }
}

/// What a create (single or pending) or a refund did: TigerBeetle's `ok` and `exists`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateResult {
    /// This call created the transfer.
    Created(Transfer),
    /// An earlier call created it, with the same id and the same body: this one is a retry
    /// and changed nothing. The transfer is as it stands now (it may have been posted since).
    Exists(Transfer),
}

impl CreateResult {
    /// The transfer, created now or before.
    pub fn transfer(&self) -> &Transfer {
        match self {
            Self::Created(t) | Self::Exists(t) => t,
        }
    }

    /// The transfer, created now or before.
    pub fn into_transfer(self) -> Transfer {
        match self {
            Self::Created(t) | Self::Exists(t) => t,
        }
    }

    /// Whether it already existed (the call was a retry).
    pub fn exists(&self) -> bool {
        matches!(self, Self::Exists(_))
    }
}

/// A request to move money; the currency comes from the amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    /// Caller-chosen id (not zero); retries must reuse it.
    pub id: TransferId,
    /// Owner of the account money leaves.
    pub debit: Owner,
    /// Owner of the account money enters.
    pub credit: Owner,
    /// How much.
    pub amount: Amount,
    /// Opaque caller data, at most [`MEMO_BYTES_MAX`] bytes.
    pub memo: Vec<u8>,
    /// Caller-chosen reference (TigerBeetle's `user_data_128`), e.g. the payment request or
    /// invoice the transfer settles; 0: none. Journaled with the transfer, not compared on
    /// retries of a recorded failure (see docs/ledger.md); [`crate::ledger::Ledger::transfers_by_reference`]
    /// finds the transfers of one from an index.
    pub reference: u128,
}

/// Why a transfer, post, void, refund or freeze was refused. A stable enum ordered by
/// precedence: when several apply, the one listed first is reported. Discriminants are
/// stored in the journal for failed transfers and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
#[repr(u16)]
pub enum TransferError {
    /// The id 0 is reserved.
    #[error("the transfer id must not be zero")]
    IdMustNotBeZero = 1,
    /// Debit and credit are the same account.
    #[error("debit and credit account must be different")]
    AccountsMustBeDifferent = 2,
    /// The memo is above [`MEMO_BYTES_MAX`].
    #[error("the memo is longer than {MEMO_BYTES_MAX} bytes")]
    MemoTooLong = 3,
    /// A user owner string is empty or above [`OWNER_BYTES_MAX`].
    #[error("an account owner must be 1 to {OWNER_BYTES_MAX} bytes long")]
    OwnerInvalid = 4,
    /// A pending transfer needs a timeout above zero.
    #[error("a pending transfer needs a timeout greater than zero")]
    TimeoutMustNotBeZero = 5,
    /// Timeout above [`PENDING_TIMEOUT_MS_MAX`].
    #[error("the timeout is longer than the allowed maximum")]
    TimeoutTooLong = 6,
    /// The currency is not configured.
    #[error("the currency is not configured")]
    CurrencyUnknown = 7,
    /// Another change of its linked chain failed (see [`BatchEntry`]): this one was undone,
    /// or not decided. Nothing of the chain was applied.
    #[error("another change of its linked chain failed")]
    LinkedEventFailed = 10,
    /// The last change of a batch call is marked linked: its chain has no end, and none of
    /// it was decided (the other changes of the chain answer `LinkedEventFailed`).
    #[error("the linked chain is not closed: the call's last change is marked linked")]
    LinkedEventChainOpen = 11,
    /// The linked chain has more changes than one journal record takes (see
    /// [`crate::ledger::LINKED_CHAIN_OPS_MAX`]): every change of it answers this, none was
    /// decided.
    #[error("the linked chain has more changes than the ledger applies at once")]
    LinkedChainTooLong = 12,
    /// The linked chain mixes changes already made (a retry would answer them `Exists`) with
    /// new ones, or names one change twice: it is not a retry of one chain, which applies
    /// whole or not at all. The first change that mixes answers this, the others of the chain
    /// `LinkedEventFailed`; nothing of the chain was applied.
    #[error("the linked chain mixes changes already made with new ones")]
    LinkedChainPartlyExists = 13,
    /// The id exists as a transfer of another kind.
    #[error("a transfer with this id exists with a different kind")]
    ExistsWithDifferentKind = 20,
    /// The id exists with another debit account.
    #[error("a transfer with this id exists with a different debit account")]
    ExistsWithDifferentDebitAccount = 21,
    /// The id exists with another credit account.
    #[error("a transfer with this id exists with a different credit account")]
    ExistsWithDifferentCreditAccount = 22,
    /// The id exists with another amount or currency.
    #[error("a transfer with this id exists with a different amount")]
    ExistsWithDifferentAmount = 23,
    /// The id exists with another timeout.
    #[error("a transfer with this id exists with a different timeout")]
    ExistsWithDifferentTimeout = 24,
    /// The id exists with another memo.
    #[error("a transfer with this id exists with a different memo")]
    ExistsWithDifferentMemo = 25,
    /// The id exists as a refund of another transfer.
    #[error("a transfer with this id exists refunding a different transfer")]
    ExistsWithDifferentOriginal = 26,
    /// The id exists with another reference ([`TransferRequest::reference`]).
    #[error("a transfer with this id exists with a different reference")]
    ExistsWithDifferentReference = 27,
    /// Above the currency's configured `max_transfer`. A limit of the configuration, which
    /// may change between runs: it comes after the `ExistsWithDifferent*` codes, so a retry
    /// of a committed transfer answers the original even after the limit was lowered. (Code 8
    /// was this error before it moved; it is not reused.)
    #[error("the amount is above the maximum for one transfer")]
    ExceedsMaxTransfer = 30,
    /// Post or void of an unknown id.
    #[error("no pending transfer with this id")]
    PendingTransferNotFound = 40,
    /// Post or void of a transfer that was not created pending.
    #[error("the transfer is not a pending transfer")]
    PendingTransferNotPending = 41,
    /// The pending transfer was already posted (with another amount, or it is being voided).
    #[error("the pending transfer was already posted")]
    PendingTransferAlreadyPosted = 42,
    /// The pending transfer was already voided.
    #[error("the pending transfer was already voided")]
    PendingTransferAlreadyVoided = 43,
    /// The pending transfer expired.
    #[error("the pending transfer expired")]
    PendingTransferExpired = 44,
    /// Post amount above the reserved amount.
    #[error("the amount to post is above the pending amount")]
    PostAmountExceedsPending = 45,
    /// Post amount in another currency than the pending transfer.
    #[error("the amount is in a different currency than the transfer")]
    CurrencyMismatch = 46,
    /// Refund of an unknown transfer.
    #[error("the transfer to refund does not exist")]
    OriginalTransferNotFound = 50,
    /// Refund of a pending, voided or expired transfer. (Until code 53 existed, also of a
    /// refund; such failures recorded then keep this code.)
    #[error("the transfer to refund is not posted")]
    OriginalTransferNotRefundable = 51,
    /// The refund is above what remains unrefunded: what was posted, less the refunds made
    /// and what pending refunds reserve.
    #[error("the refund is above what remains unrefunded")]
    RefundExceedsRemaining = 52,
    /// Refund of a transfer that is itself a refund (single-phase or pending).
    #[error("a refund cannot be refunded")]
    OriginalTransferIsRefund = 53,
    /// A refund named by its accounts whose debit and credit are not the original's credit
    /// and debit.
    #[error("a refund must move money from the original's payee back to its payer")]
    RefundAccountsMismatch = 54,
    /// The debit account is frozen (refused for new transfers and refunds only; posting a
    /// pending transfer is never refused for a freeze).
    #[error("the debit account is frozen")]
    DebitAccountFrozen = 60,
    /// The credit account is frozen for all new movement.
    #[error("the credit account is frozen")]
    CreditAccountFrozen = 61,
    /// The debit account would exceed its rolling 24-hour limit.
    #[error("the debit account would exceed its 24-hour limit")]
    ExceedsDailyLimit = 62,
    /// The debit account cannot afford it.
    #[error("insufficient funds")]
    InsufficientFunds = 63,
    /// A balance would overflow.
    #[error("a balance would overflow")]
    Overflow = 64,
}

impl TransferError {
    /// Every code, in precedence order.
    pub const ALL: [TransferError; 37] = [
        Self::IdMustNotBeZero,
        Self::AccountsMustBeDifferent,
        Self::MemoTooLong,
        Self::OwnerInvalid,
        Self::TimeoutMustNotBeZero,
        Self::TimeoutTooLong,
        Self::CurrencyUnknown,
        Self::LinkedEventFailed,
        Self::LinkedEventChainOpen,
        Self::LinkedChainTooLong,
        Self::LinkedChainPartlyExists,
        Self::ExistsWithDifferentKind,
        Self::ExistsWithDifferentDebitAccount,
        Self::ExistsWithDifferentCreditAccount,
        Self::ExistsWithDifferentAmount,
        Self::ExistsWithDifferentTimeout,
        Self::ExistsWithDifferentMemo,
        Self::ExistsWithDifferentOriginal,
        Self::ExistsWithDifferentReference,
        Self::ExceedsMaxTransfer,
        Self::PendingTransferNotFound,
        Self::PendingTransferNotPending,
        Self::PendingTransferAlreadyPosted,
        Self::PendingTransferAlreadyVoided,
        Self::PendingTransferExpired,
        Self::PostAmountExceedsPending,
        Self::CurrencyMismatch,
        Self::OriginalTransferNotFound,
        Self::OriginalTransferNotRefundable,
        Self::RefundExceedsRemaining,
        Self::OriginalTransferIsRefund,
        Self::RefundAccountsMismatch,
        Self::DebitAccountFrozen,
        Self::CreditAccountFrozen,
        Self::ExceedsDailyLimit,
        Self::InsufficientFunds,
        Self::Overflow,
    ];

    /// The stable numeric code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The error for a stored numeric code.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|e| e.code() == code)
    }

    /// Whether the outcome depended on the ledger's state at the time (funds, freezes,
    /// limits, whether a referenced transfer existed yet): a *new* transfer may succeed later.
    /// A transient failure of a create/refund is recorded, so retrying the *same* id returns
    /// the same failure (the id is spent). Non-transient errors are properties of the request
    /// itself and are not recorded.
    pub fn transient(self) -> bool {
        matches!(
            self,
            Self::OriginalTransferNotFound
                | Self::OriginalTransferNotRefundable
                | Self::RefundExceedsRemaining
                | Self::OriginalTransferIsRefund
                | Self::RefundAccountsMismatch
                | Self::DebitAccountFrozen
                | Self::CreditAccountFrozen
                | Self::ExceedsDailyLimit
                | Self::InsufficientFunds
                | Self::Overflow
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_ordered_by_precedence() {
        let distinct = TransferError::ALL;
        for pair in distinct.windows(2) {
            assert!(pair[0] < pair[1], "{:?} !< {:?}", pair[0], pair[1]);
        }
        for e in distinct {
            assert_eq!(TransferError::from_code(e.code()), Some(e));
        }
        assert_eq!(TransferError::from_code(0), None);
        // Retired when `ExceedsMaxTransfer` moved behind the `Exists*` codes; never reused.
        assert_eq!(TransferError::from_code(8), None);
        assert_eq!(TransferError::InsufficientFunds.code(), 63);
    }

    #[test]
    fn transfer_id_from_key_is_stable() {
        let a = TransferId::from_key("$event:example.org");
        assert_eq!(a, TransferId::from_key("$event:example.org"));
        assert_ne!(a, TransferId::from_key("$other:example.org"));
        assert_ne!(a.0, 0);
    }
}
