//! Behaviour tests of the ledger API (every rejection with its specific error) and the
//! proptest against an independent in-memory auditor.

use std::str::FromStr;
use std::sync::Arc;

use rust_decimal::Decimal;

use super::*;
use crate::clock::{Clock, ManualClock};

const T0_MS: u64 = 1_700_000_000_000;
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

fn settings() -> LedgerSettings {
    let spec = |code: &str, exponent, max: Option<&str>, day: Option<&str>| CurrencySpec {
        code: code.to_owned(),
        exponent,
        max_transfer: max.map(|m| Decimal::from_str(m).unwrap()),
        max_per_24h: day.map(|m| Decimal::from_str(m).unwrap()),
    };
    LedgerSettings {
        currencies: vec![
            spec("EUR", 2, Some("10000.00"), Some("20000.00")),
            spec("JPY", 0, None, None),
            spec("BHD", 3, None, Some("200.000")),
        ],
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    ledger: BlockingLedger,
}

/// Opens a ledger whose clock and monotonic clock are both `clock`: moving it moves ledger
/// time by any amount (no jump to refuse).
fn open_manual(dir: &Path, settings: &LedgerSettings, clock: &ManualClock) -> Ledger {
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        ..LedgerOptions::default()
    };
    Ledger::open_with_options(dir, settings, Arc::new(clock.clone()), options).unwrap()
}

fn open() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let ledger = open_manual(dir.path(), &settings(), &clock);
    Fixture {
        _dir: dir,
        clock,
        ledger: ledger.blocking(),
    }
}

impl Fixture {
    fn amount(&self, value: &str, currency: &str) -> Amount {
        self.ledger
            .ledger()
            .parse_amount(Decimal::from_str(value).unwrap(), currency)
            .unwrap()
    }

    fn request(
        &self,
        id: u128,
        debit: Owner,
        credit: Owner,
        value: &str,
        currency: &str,
    ) -> TransferRequest {
        TransferRequest {
            reference: 0,
            id: TransferId(id),
            debit,
            credit,
            amount: self.amount(value, currency),
            memo: Vec::new(),
        }
    }

    fn send(
        &self,
        id: u128,
        debit: Owner,
        credit: Owner,
        value: &str,
    ) -> Result<Transfer, LedgerError> {
        self.ledger
            .create_transfer(self.request(id, debit, credit, value, "EUR"))
    }

    /// Funds `owner` from the issuer.
    fn fund(&self, id: u128, owner: &str, value: &str) {
        self.send(id, Owner::Issuer, alice_like(owner), value)
            .unwrap();
    }

    fn balances(&self, owner: &str, currency: &str) -> Balances {
        self.ledger
            .account(&AccountId {
                owner: alice_like(owner),
                currency: CurrencyCode::new(currency).unwrap(),
            })
            .unwrap()
            .map(|a| a.balances)
            .unwrap_or_default()
    }

    fn available(&self, owner: &str) -> i128 {
        self.balances(owner, "EUR").available_minor()
    }
}

fn alice_like(name: &str) -> Owner {
    Owner::user(name)
}

fn rejected(result: Result<Transfer, LedgerError>) -> TransferError {
    match result {
        Err(LedgerError::Rejected(e)) => e,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn user(name: &str) -> Owner {
    Owner::user(name)
}

#[test]
fn single_transfer_moves_money_and_system_accounts_may_go_negative() {
    let f = open();
    let t = f.send(1, Owner::Issuer, user("alice"), "100.00").unwrap();
    assert_eq!(
        t.state,
        TransferState::Posted {
            amount_minor: 10_000
        }
    );
    assert_eq!(t.created_ms, T0_MS);
    f.send(2, user("alice"), user("bob"), "30.25").unwrap();
    assert_eq!(f.available("alice"), 6_975);
    assert_eq!(f.available("bob"), 3_025);
    let issuer = f
        .ledger
        .account(&AccountId {
            owner: Owner::Issuer,
            currency: CurrencyCode::new("EUR").unwrap(),
        })
        .unwrap()
        .unwrap();
    assert_eq!(issuer.balances.available_minor(), -10_000);
    f.ledger.verify_with_memory().unwrap();
}

#[test]
fn user_accounts_are_never_overdrawn() {
    let f = open();
    f.fund(1, "alice", "10.00");
    let err = rejected(f.send(2, user("alice"), user("bob"), "10.01"));
    assert_eq!(err, TransferError::InsufficientFunds);
    assert!(err.transient());
    f.send(3, user("alice"), user("bob"), "10.00").unwrap();
    assert_eq!(f.available("alice"), 0);
    assert_eq!(
        rejected(f.send(4, user("carol"), user("bob"), "0.01")),
        TransferError::InsufficientFunds
    );
}

#[test]
fn same_id_same_body_returns_the_original_result() {
    let f = open();
    f.fund(1, "alice", "50.00");
    let first = f.send(2, user("alice"), user("bob"), "20.00").unwrap();
    let again = f.send(2, user("alice"), user("bob"), "20.00").unwrap();
    assert_eq!(first, again);
    assert_eq!(f.available("alice"), 3_000, "a retry moves nothing");
}

#[test]
fn same_id_different_body_is_a_distinct_error() {
    let f = open();
    f.fund(1, "alice", "50.00");
    f.send(2, user("alice"), user("bob"), "20.00").unwrap();
    use TransferError as E;
    assert_eq!(
        rejected(f.send(2, user("alice"), user("bob"), "20.01")),
        E::ExistsWithDifferentAmount
    );
    assert_eq!(
        rejected(f.send(2, user("carol"), user("bob"), "20.00")),
        E::ExistsWithDifferentDebitAccount
    );
    assert_eq!(
        rejected(f.send(2, user("alice"), user("carol"), "20.00")),
        E::ExistsWithDifferentCreditAccount
    );
    let mut memo = f.request(2, user("alice"), user("bob"), "20.00", "EUR");
    memo.memo = b"other".to_vec();
    assert_eq!(
        rejected(f.ledger.create_transfer(memo)),
        E::ExistsWithDifferentMemo
    );
    let pending = f.request(2, user("alice"), user("bob"), "20.00", "EUR");
    assert_eq!(
        rejected(f.ledger.create_pending(pending, 1_000)),
        E::ExistsWithDifferentKind
    );
    let jpy = f.request(2, user("alice"), user("bob"), "20", "JPY");
    assert_eq!(
        rejected(f.ledger.create_transfer(jpy)),
        E::ExistsWithDifferentDebitAccount
    );
    let refund = f.amount("1.00", "EUR");
    assert_eq!(
        rejected(
            f.ledger
                .refund(TransferId(2), TransferId(1), refund, vec![])
        ),
        E::ExistsWithDifferentKind
    );
    // A pending with another timeout.
    f.ledger
        .create_pending(
            f.request(3, user("alice"), user("bob"), "1.00", "EUR"),
            1_000,
        )
        .unwrap();
    assert_eq!(
        rejected(f.ledger.create_pending(
            f.request(3, user("alice"), user("bob"), "1.00", "EUR"),
            2_000
        )),
        E::ExistsWithDifferentTimeout
    );
}

/// Issue 15: idempotency does not depend on the configuration. A transfer committed under
/// one `max_transfer` / `max_per_24h` is answered as the original after a reopen with lower
/// limits; only a *new* id meets the new limits.
#[test]
fn a_retry_after_the_limits_were_lowered_answers_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let ledger = Ledger::open(dir.path(), &settings(), Arc::new(clock.clone()))
        .unwrap()
        .blocking();
    let eur = |value: &str| {
        ledger
            .ledger()
            .parse_amount(Decimal::from_str(value).unwrap(), "EUR")
            .unwrap()
    };
    let request = |id: u128, debit: Owner, credit: Owner, amount: Amount| TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit,
        credit,
        amount,
        memo: b"rent".to_vec(),
    };
    let (big, bigger) = (eur("9000.00"), eur("9000.01"));
    ledger
        .create_transfer(request(1, Owner::Issuer, user("alice"), eur("10000.00")))
        .unwrap();
    let original = ledger
        .create_transfer(request(2, user("alice"), user("bob"), big))
        .unwrap();
    let pending = ledger
        .create_pending(
            request(3, user("alice"), user("bob"), eur("900.00")),
            60_000,
        )
        .unwrap();
    drop(ledger);

    let mut lowered = settings();
    lowered.currencies[0].max_transfer = Some(Decimal::from(100));
    lowered.currencies[0].max_per_24h = Some(Decimal::from(100));
    let ledger = Ledger::open(dir.path(), &lowered, Arc::new(clock.clone()))
        .unwrap()
        .blocking();
    let again = ledger
        .create_transfer(request(2, user("alice"), user("bob"), big))
        .unwrap();
    assert_eq!(again, original, "the retry answers the committed transfer");
    let again = ledger
        .create_pending(
            request(3, user("alice"), user("bob"), eur_of(&pending)),
            60_000,
        )
        .unwrap();
    assert_eq!(again, pending);
    // The same id with another body is still an idempotency conflict, not a limit error.
    assert_eq!(
        rejected(ledger.create_transfer(request(2, user("alice"), user("bob"), bigger))),
        TransferError::ExistsWithDifferentAmount
    );
    // A new id meets the new limit.
    assert_eq!(
        rejected(ledger.create_transfer(request(4, user("alice"), user("bob"), big))),
        TransferError::ExceedsMaxTransfer
    );
    ledger.verify_with_memory().unwrap();
}

/// The amount of a transfer as an [`Amount`] (built past the edge's limit check, as a caller
/// holding the original request would have it).
fn eur_of(t: &Transfer) -> Amount {
    let unlimited = Currencies::from_settings(&LedgerSettings::default()).unwrap();
    unlimited
        .from_minor(t.amount_minor, t.debit.currency.as_str())
        .unwrap()
}

#[test]
fn a_transient_failure_spends_the_id() {
    let f = open();
    let err = rejected(f.send(5, user("alice"), user("bob"), "1.00"));
    assert_eq!(err, TransferError::InsufficientFunds);
    f.fund(1, "alice", "10.00");
    // The retry returns the original failure, not a late success.
    assert_eq!(
        rejected(f.send(5, user("alice"), user("bob"), "1.00")),
        TransferError::InsufficientFunds
    );
    assert_eq!(
        rejected(f.send(5, user("alice"), user("bob"), "2.00")),
        TransferError::ExistsWithDifferentAmount
    );
    f.send(6, user("alice"), user("bob"), "1.00").unwrap();
    assert_eq!(f.available("bob"), 100);
    f.ledger.verify_with_memory().unwrap();
}

/// Issue 15: a refused transfer leaves no account behind, and what it keeps for idempotency
/// answers its retries the same way after a reopen.
#[test]
fn a_refused_transfer_opens_no_account() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let open = || open_manual(dir.path(), &settings(), &clock).blocking();
    let eur = open()
        .ledger()
        .parse_amount(Decimal::from_str("1.00").unwrap(), "EUR")
        .unwrap();
    let request = |memo: &[u8]| TransferRequest {
        reference: 0,
        id: TransferId(7),
        debit: user("carol"),
        credit: user("dave"),
        amount: eur,
        memo: memo.to_vec(),
    };
    let account = |name: &str| AccountId {
        owner: user(name),
        currency: eur.currency(),
    };
    let memo = vec![b'm'; MEMO_BYTES_MAX];
    // Once, then again after a reopen (the failure replayed from the journal).
    for _ in 0..2 {
        let ledger = open();
        assert_eq!(
            rejected(ledger.create_transfer(request(&memo))),
            TransferError::InsufficientFunds
        );
        assert_eq!(ledger.account(&account("carol")).unwrap(), None);
        assert_eq!(ledger.account(&account("dave")).unwrap(), None);
        assert!(ledger.balances(&user("carol")).unwrap().is_empty());
        assert_eq!(ledger.verify_with_memory().unwrap().accounts, 0);
        // The id is spent: the same body answers the same failure, another memo conflicts.
        assert_eq!(
            rejected(ledger.create_transfer(request(b"other"))),
            TransferError::ExistsWithDifferentMemo
        );
        drop(ledger);
    }
    let ledger = open();
    let opened = ledger
        .ledger()
        .export()
        .filter(|e| {
            matches!(
                e.as_ref().unwrap().entry,
                JournalEntry::AccountOpened { .. }
            )
        })
        .count();
    assert_eq!(opened, 0, "the journal opened no account");
    // A transfer that succeeds opens its accounts as before.
    ledger
        .create_transfer(TransferRequest {
            reference: 0,
            id: TransferId(8),
            debit: Owner::Issuer,
            credit: user("carol"),
            amount: eur,
            memo: vec![],
        })
        .unwrap();
    assert!(ledger.account(&account("carol")).unwrap().is_some());
    assert_eq!(ledger.verify_with_memory().unwrap().accounts, 2);
}

/// Issue 15 (memory flat in history): a recorded failure answers retries of its id for a
/// day of ledger time, also after a reopen from a checkpoint that holds it; from then on the
/// id is new again and a request with it is decided afresh (it was kept forever).
#[test]
fn a_recorded_failure_answers_retries_for_a_day_then_the_id_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let open = || open_manual(dir.path(), &settings(), &clock).blocking();
    let ledger = open();
    let eur = ledger
        .ledger()
        .parse_amount(Decimal::from_str("1.00").unwrap(), "EUR")
        .unwrap();
    let request = |id: u128, debit: Owner, memo: &[u8]| TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit,
        credit: user("dave"),
        amount: eur,
        memo: memo.to_vec(),
    };
    assert_eq!(
        rejected(ledger.create_transfer(request(7, user("carol"), b"lunch"))),
        TransferError::InsufficientFunds
    );
    ledger
        .create_transfer(request(8, Owner::Issuer, b""))
        .unwrap();
    clock.advance_ms(DAY_MS - 1);
    block_on(ledger.ledger().checkpoint()).unwrap();
    drop(ledger);
    let ledger = open();
    assert!(ledger.ledger().opened_from_checkpoint().is_some());
    // A day less a millisecond later, after a reopen: the same failure, and a conflict.
    assert_eq!(
        rejected(ledger.create_transfer(request(7, user("carol"), b"lunch"))),
        TransferError::InsufficientFunds
    );
    assert_eq!(
        rejected(ledger.create_transfer(request(7, user("carol"), b"other"))),
        TransferError::ExistsWithDifferentMemo
    );
    ledger
        .create_transfer(request(9, Owner::Issuer, b""))
        .unwrap();
    ledger
        .create_transfer(TransferRequest {
            reference: 0,
            credit: user("carol"),
            ..request(10, Owner::Issuer, b"")
        })
        .unwrap();
    // A day after the failure its id is new: the same request is decided again, and now
    // carol can pay.
    clock.advance_ms(1);
    let created = ledger
        .create_transfer_result(request(7, user("carol"), b"other"))
        .unwrap();
    assert!(!created.exists());
    let carol = AccountId {
        owner: user("carol"),
        currency: eur.currency(),
    };
    let carol = ledger.account(&carol).unwrap().unwrap();
    assert_eq!(carol.balances.available_minor(), 0);
    assert_eq!(ledger.verify_with_memory().unwrap().transfers, 4);
    drop(ledger);
    assert_eq!(open().verify_with_memory().unwrap().transfers, 4);
}

/// Issue 15: a retried create or refund says the transfer already existed (TigerBeetle's
/// `exists`), before and after a reopen, and the first call says it created it.
#[test]
fn a_retried_create_says_it_exists() {
    let f = open();
    let single = f.request(1, Owner::Issuer, user("alice"), "50.00", "EUR");
    let first = f.ledger.create_transfer_result(single.clone()).unwrap();
    assert!(matches!(&first, CreateResult::Created(t) if t.id == TransferId(1)));
    let again = f.ledger.create_transfer_result(single.clone()).unwrap();
    assert_eq!(again, CreateResult::Exists(first.transfer().clone()));
    let pending = f.request(2, user("alice"), user("bob"), "5.00", "EUR");
    assert!(!f
        .ledger
        .create_pending_result(pending.clone(), 60_000)
        .unwrap()
        .exists());
    f.ledger.post(TransferId(2), None).unwrap();
    // The retry answers the transfer as it stands now: posted since.
    let again = f.ledger.create_pending_result(pending, 60_000).unwrap();
    assert!(again.exists());
    assert!(matches!(
        again.transfer().state,
        TransferState::Posted { .. }
    ));
    let one = f.amount("1.00", "EUR");
    let refund = || {
        f.ledger
            .refund_result(TransferId(3), TransferId(2), one, b"r".to_vec())
    };
    assert!(!refund().unwrap().exists());
    assert!(refund().unwrap().exists());
    assert_eq!(f.available("alice"), 4_600, "retries moved nothing");
    // A retry of a failure is still the failure, not `exists`.
    let broke = f.request(4, user("zoe"), user("bob"), "1.00", "EUR");
    for _ in 0..2 {
        assert_eq!(
            rejected(
                f.ledger
                    .create_transfer_result(broke.clone())
                    .map(CreateResult::into_transfer)
            ),
            TransferError::InsufficientFunds
        );
    }
}

#[test]
fn request_validation_errors() {
    let f = open();
    f.fund(1, "alice", "10.00");
    use TransferError as E;
    assert_eq!(
        rejected(f.send(0, user("alice"), user("bob"), "1.00")),
        E::IdMustNotBeZero
    );
    assert!(!E::IdMustNotBeZero.transient());
    assert_eq!(
        rejected(f.send(2, user("alice"), user("alice"), "1.00")),
        E::AccountsMustBeDifferent
    );
    assert_eq!(
        rejected(f.send(2, Owner::Fees, Owner::Fees, "1.00")),
        E::AccountsMustBeDifferent
    );
    let mut long = f.request(2, user("alice"), user("bob"), "1.00", "EUR");
    long.memo = vec![b'x'; MEMO_BYTES_MAX + 1];
    assert_eq!(
        rejected(f.ledger.create_transfer(long.clone())),
        E::MemoTooLong
    );
    long.memo.truncate(MEMO_BYTES_MAX);
    f.ledger.create_transfer(long).unwrap();
    assert_eq!(
        rejected(f.send(3, user(""), user("bob"), "1.00")),
        E::OwnerInvalid
    );
    assert_eq!(
        rejected(f.send(
            3,
            user("alice"),
            user(&"x".repeat(OWNER_BYTES_MAX + 1)),
            "1.00"
        )),
        E::OwnerInvalid
    );
    let req = f.request(4, user("alice"), user("bob"), "1.00", "EUR");
    assert_eq!(
        rejected(f.ledger.create_pending(req.clone(), 0)),
        E::TimeoutMustNotBeZero
    );
    assert_eq!(
        rejected(f.ledger.create_pending(req, PENDING_TIMEOUT_MS_MAX + 1)),
        E::TimeoutTooLong
    );
    // Validation failures are not recorded: the id is still free.
    f.send(0x4, user("alice"), user("bob"), "1.00").unwrap();
}

#[test]
fn amounts_from_another_configuration_are_checked_again() {
    let f = open();
    let unlimited = Currencies::from_settings(&LedgerSettings {
        currencies: vec![
            CurrencySpec {
                code: "EUR".into(),
                exponent: 2,
                max_transfer: None,
                max_per_24h: None,
            },
            CurrencySpec {
                code: "USD".into(),
                exponent: 2,
                max_transfer: None,
                max_per_24h: None,
            },
        ],
    })
    .unwrap();
    f.send(1, Owner::Issuer, user("alice"), "10000.00").unwrap();
    f.send(2, Owner::Issuer, user("alice"), "10000.00").unwrap();
    let big = unlimited.from_minor(1_000_001, "EUR").unwrap();
    let req = TransferRequest {
        reference: 0,
        id: TransferId(3),
        debit: user("alice"),
        credit: user("bob"),
        amount: big,
        memo: vec![],
    };
    assert_eq!(
        rejected(f.ledger.create_transfer(req)),
        TransferError::ExceedsMaxTransfer
    );
    let usd = TransferRequest {
        reference: 0,
        id: TransferId(4),
        debit: Owner::Issuer,
        credit: user("bob"),
        amount: unlimited.from_minor(1, "USD").unwrap(),
        memo: vec![],
    };
    assert_eq!(
        rejected(f.ledger.create_transfer(usd)),
        TransferError::CurrencyUnknown
    );
}

#[test]
fn parse_amount_rejects_rounding_and_out_of_range() {
    let f = open();
    let ledger = f.ledger.ledger();
    let err = ledger
        .parse_amount(Decimal::from_str("12.505").unwrap(), "EUR")
        .unwrap_err();
    assert!(
        err.to_string().contains("EUR has 2 decimal places"),
        "{err}"
    );
    assert_eq!(
        ledger.parse_amount(Decimal::ZERO, "EUR"),
        Err(AmountError::Zero)
    );
    assert!(matches!(
        ledger.parse_amount(Decimal::from_str("10000.01").unwrap(), "EUR"),
        Err(AmountError::AboveMaximum { .. })
    ));
    assert_eq!(
        ledger.parse_amount(Decimal::ONE, "USD"),
        Err(AmountError::UnknownCurrency("USD".into()))
    );
    let eur = CurrencyCode::new("EUR").unwrap();
    assert_eq!(ledger.to_decimal(eur, 1_250).unwrap().to_string(), "12.50");
}

#[test]
fn pending_reserves_then_posts_in_full() {
    let f = open();
    f.fund(1, "alice", "100.00");
    let req = f.request(2, user("alice"), user("bob"), "40.00", "EUR");
    let p = f.ledger.create_pending(req, 60_000).unwrap();
    assert_eq!(p.state, TransferState::Pending);
    assert_eq!(p.deadline_ms, Some(T0_MS + 60_000));
    let b = f.balances("alice", "EUR");
    assert_eq!(b.debits_pending_minor, 4_000);
    assert_eq!(b.available_minor(), 6_000);
    assert_eq!(f.balances("bob", "EUR").credits_pending_minor, 4_000);
    assert_eq!(f.available("bob"), 0, "pending credits are not spendable");
    assert_eq!(f.ledger.pending_transfers().unwrap().len(), 1);
    let posted = f.ledger.post(TransferId(2), None).unwrap();
    assert_eq!(
        posted.state,
        TransferState::Posted {
            amount_minor: 4_000
        }
    );
    assert_eq!(f.available("alice"), 6_000);
    assert_eq!(f.available("bob"), 4_000);
    assert!(f.ledger.pending_transfers().unwrap().is_empty());
    // Posting again the same way is idempotent; any other end is refused.
    assert_eq!(f.ledger.post(TransferId(2), None).unwrap(), posted);
    let other = f.amount("1.00", "EUR");
    assert_eq!(
        rejected(f.ledger.post(TransferId(2), Some(other))),
        TransferError::PendingTransferAlreadyPosted
    );
    assert_eq!(
        rejected(f.ledger.void(TransferId(2))),
        TransferError::PendingTransferAlreadyPosted
    );
    f.ledger.verify_with_memory().unwrap();
}

#[test]
fn partial_post_releases_the_rest() {
    let f = open();
    f.fund(1, "alice", "100.00");
    let req = f.request(2, user("alice"), user("bob"), "40.00", "EUR");
    f.ledger.create_pending(req, 60_000).unwrap();
    let part = f.amount("15.00", "EUR");
    let t = f.ledger.post(TransferId(2), Some(part)).unwrap();
    assert_eq!(
        t.state,
        TransferState::Posted {
            amount_minor: 1_500
        }
    );
    assert_eq!(f.available("alice"), 8_500);
    assert_eq!(f.balances("alice", "EUR").debits_pending_minor, 0);
    assert_eq!(f.available("bob"), 1_500);
    assert_eq!(f.ledger.post(TransferId(2), Some(part)).unwrap(), t);
    assert_eq!(
        rejected(f.ledger.post(TransferId(2), None)),
        TransferError::PendingTransferAlreadyPosted
    );
}

#[test]
fn post_errors() {
    let f = open();
    f.fund(1, "alice", "100.00");
    use TransferError as E;
    assert_eq!(
        rejected(f.ledger.post(TransferId(9), None)),
        E::PendingTransferNotFound
    );
    assert_eq!(
        rejected(f.ledger.void(TransferId(9))),
        E::PendingTransferNotFound
    );
    assert_eq!(
        rejected(f.ledger.post(TransferId(1), None)),
        E::PendingTransferNotPending
    );
    assert_eq!(
        rejected(f.ledger.void(TransferId(1))),
        E::PendingTransferNotPending
    );
    let req = f.request(2, user("alice"), user("bob"), "40.00", "EUR");
    f.ledger.create_pending(req, 60_000).unwrap();
    let more = f.amount("40.01", "EUR");
    assert_eq!(
        rejected(f.ledger.post(TransferId(2), Some(more))),
        E::PostAmountExceedsPending
    );
    let yen = f.amount("40", "JPY");
    assert_eq!(
        rejected(f.ledger.post(TransferId(2), Some(yen))),
        E::CurrencyMismatch
    );
    let voided = f.ledger.void(TransferId(2)).unwrap();
    assert_eq!(voided.state, TransferState::Voided);
    assert_eq!(f.ledger.void(TransferId(2)).unwrap(), voided);
    assert_eq!(
        rejected(f.ledger.post(TransferId(2), None)),
        E::PendingTransferAlreadyVoided
    );
    assert_eq!(f.available("alice"), 10_000);
}

#[test]
fn pending_expires_by_the_clock() {
    let f = open();
    f.fund(1, "alice", "100.00");
    let req = f.request(2, user("alice"), user("bob"), "40.00", "EUR");
    f.ledger.create_pending(req, 60_000).unwrap();
    f.clock.advance_ms(59_999);
    assert!(f.ledger.expire_due().unwrap().is_empty());
    assert_eq!(f.available("alice"), 6_000);
    f.clock.advance_ms(1);
    // The writer may expire it on its own idle tick first; either way it is expired now.
    let _ = f.ledger.expire_due().unwrap();
    let t = f.ledger.transfer(TransferId(2)).unwrap().unwrap();
    assert_eq!(t.state, TransferState::Expired);
    assert_eq!(t.ended_ms, Some(T0_MS + 60_000));
    assert_eq!(f.available("alice"), 10_000);
    assert_eq!(
        rejected(f.ledger.post(TransferId(2), None)),
        TransferError::PendingTransferExpired
    );
    assert_eq!(
        rejected(f.ledger.void(TransferId(2))),
        TransferError::PendingTransferExpired
    );
    f.ledger.verify_with_memory().unwrap();
}

#[test]
fn the_writer_expires_pending_transfers_by_itself() {
    let f = open();
    f.fund(1, "alice", "100.00");
    let req = f.request(2, user("alice"), user("bob"), "40.00", "EUR");
    f.ledger.create_pending(req, 1_000).unwrap();
    f.clock.advance_ms(1_000);
    // No call reaches the writer: its idle tick alone must journal the expiry. The export
    // reads the stored journal directly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let expired = f.ledger.ledger().export().any(|e| {
            matches!(e.unwrap().entry, JournalEntry::PendingExpired { id } if id == TransferId(2))
        });
        if expired {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle writer never expired it"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(f.available("alice"), 10_000);
}

#[test]
fn a_post_after_the_deadline_finds_it_expired() {
    let f = open();
    f.fund(1, "alice", "100.00");
    let req = f.request(2, user("alice"), user("bob"), "40.00", "EUR");
    f.ledger.create_pending(req, 1_000).unwrap();
    f.clock.advance_ms(5_000);
    assert_eq!(
        rejected(f.ledger.post(TransferId(2), None)),
        TransferError::PendingTransferExpired
    );
}

#[test]
fn refunds_never_exceed_what_remains() {
    let f = open();
    f.fund(1, "alice", "100.00");
    f.send(2, user("alice"), user("shop"), "30.00").unwrap();
    let r = f
        .ledger
        .refund(
            TransferId(3),
            TransferId(2),
            f.amount("10.00", "EUR"),
            b"sorry".to_vec(),
        )
        .unwrap();
    assert_eq!(
        r.kind,
        TransferKind::Refund {
            original: TransferId(2)
        }
    );
    assert_eq!(r.debit.owner, user("shop"));
    assert_eq!(r.credit.owner, user("alice"));
    assert_eq!(f.available("alice"), 8_000);
    assert_eq!(
        f.ledger
            .transfer(TransferId(2))
            .unwrap()
            .unwrap()
            .refunded_minor,
        1_000
    );
    use TransferError as E;
    let too_much = f.amount("20.01", "EUR");
    assert_eq!(
        rejected(
            f.ledger
                .refund(TransferId(4), TransferId(2), too_much, vec![])
        ),
        E::RefundExceedsRemaining
    );
    f.ledger
        .refund(
            TransferId(5),
            TransferId(2),
            f.amount("20.00", "EUR"),
            vec![],
        )
        .unwrap();
    assert_eq!(f.available("shop"), 0);
    assert_eq!(
        rejected(f.ledger.refund(
            TransferId(6),
            TransferId(2),
            f.amount("0.01", "EUR"),
            vec![]
        )),
        E::RefundExceedsRemaining
    );
    // Same refund id again: the original result; with another original: a distinct error.
    let again = f
        .ledger
        .refund(
            TransferId(3),
            TransferId(2),
            f.amount("10.00", "EUR"),
            b"sorry".to_vec(),
        )
        .unwrap();
    assert_eq!(again.id, r.id);
    assert_eq!(
        rejected(f.ledger.refund(
            TransferId(3),
            TransferId(1),
            f.amount("10.00", "EUR"),
            b"sorry".to_vec()
        )),
        E::ExistsWithDifferentOriginal
    );
    f.ledger.verify_with_memory().unwrap();
}

#[test]
fn refund_errors() {
    let f = open();
    f.fund(1, "alice", "100.00");
    use TransferError as E;
    let one = f.amount("1.00", "EUR");
    assert_eq!(
        rejected(f.ledger.refund(TransferId(2), TransferId(99), one, vec![])),
        E::OriginalTransferNotFound
    );
    f.send(3, user("alice"), user("shop"), "30.00").unwrap();
    f.ledger
        .refund(TransferId(4), TransferId(3), one, vec![])
        .unwrap();
    assert_eq!(
        rejected(f.ledger.refund(TransferId(5), TransferId(4), one, vec![])),
        E::OriginalTransferIsRefund
    );
    f.ledger
        .create_pending(
            f.request(6, user("alice"), user("shop"), "5.00", "EUR"),
            60_000,
        )
        .unwrap();
    assert_eq!(
        rejected(f.ledger.refund(TransferId(7), TransferId(6), one, vec![])),
        E::OriginalTransferNotRefundable
    );
    let yen = f.amount("1", "JPY");
    assert_eq!(
        rejected(f.ledger.refund(TransferId(8), TransferId(3), yen, vec![])),
        E::CurrencyMismatch
    );
    assert_eq!(
        rejected(f.ledger.refund(TransferId(0), TransferId(3), one, vec![])),
        E::IdMustNotBeZero
    );
    assert_eq!(
        rejected(f.ledger.refund(
            TransferId(9),
            TransferId(3),
            one,
            vec![0; MEMO_BYTES_MAX + 1]
        )),
        E::MemoTooLong
    );
    // The payee spent the money: the refund cannot overdraw them.
    f.send(10, user("shop"), user("carol"), "29.00").unwrap();
    assert_eq!(
        rejected(f.ledger.refund(
            TransferId(11),
            TransferId(3),
            f.amount("2.00", "EUR"),
            vec![]
        )),
        E::InsufficientFunds
    );
}

#[test]
fn frozen_accounts() {
    let f = open();
    f.fund(1, "alice", "100.00");
    let eur = CurrencyCode::new("EUR").unwrap();
    let alice = AccountId {
        owner: user("alice"),
        currency: eur,
    };
    f.ledger
        .create_pending(
            f.request(2, user("alice"), user("bob"), "5.00", "EUR"),
            60_000,
        )
        .unwrap();
    f.ledger
        .create_pending(
            f.request(3, user("alice"), user("bob"), "5.00", "EUR"),
            60_000,
        )
        .unwrap();
    f.ledger.freeze(alice.clone(), FreezeMode::Debits).unwrap();
    use TransferError as E;
    assert_eq!(
        rejected(f.send(4, user("alice"), user("bob"), "1.00")),
        E::DebitAccountFrozen
    );
    assert_eq!(
        rejected(f.ledger.create_pending(
            f.request(9, user("alice"), user("bob"), "1.00", "EUR"),
            60_000,
        )),
        E::DebitAccountFrozen
    );
    f.ledger.void(TransferId(3)).unwrap();
    f.fund(5, "alice", "1.00");
    f.ledger.freeze(alice.clone(), FreezeMode::All).unwrap();
    assert_eq!(
        rejected(f.send(6, Owner::Issuer, user("alice"), "1.00")),
        E::CreditAccountFrozen
    );
    assert_eq!(
        f.ledger.account(&alice).unwrap().unwrap().frozen,
        Some(FreezeMode::All)
    );
    f.ledger.unfreeze(alice.clone()).unwrap();
    f.send(7, user("alice"), user("bob"), "1.00").unwrap();
    let bob = AccountId {
        owner: user("bob"),
        currency: eur,
    };
    f.ledger.freeze(bob, FreezeMode::All).unwrap();
    assert_eq!(
        rejected(f.ledger.refund(
            TransferId(8),
            TransferId(7),
            f.amount("1.00", "EUR"),
            vec![]
        )),
        E::DebitAccountFrozen
    );
    f.ledger.verify_with_memory().unwrap();
}

/// A freeze refuses new transfers only: pending transfers admitted before it are posted,
/// voided or expired whichever side is frozen (a withdrawal paid out before the freeze must
/// be settled, not expire back into the wallet).
#[test]
fn freeze_does_not_block_pending_admitted_before_it() {
    use TransferError as E;
    let f = open();
    f.fund(1, "alice", "100.00");
    f.fund(2, "bob", "10.00");
    let eur = CurrencyCode::new("EUR").unwrap();
    let account = |name: &str| AccountId {
        owner: user(name),
        currency: eur,
    };
    let pending = |id: u128, debit: Owner, credit: Owner, value: &str, timeout_ms: u64| {
        f.ledger
            .create_pending(f.request(id, debit, credit, value, "EUR"), timeout_ms)
            .unwrap()
    };
    // Withdrawals to the settlement account, a payment to bob, and one from bob to alice.
    pending(10, user("alice"), Owner::Settlement, "30.00", 60_000);
    pending(11, user("alice"), Owner::Settlement, "20.00", 60_000);
    pending(12, user("alice"), user("bob"), "5.00", 60_000);
    pending(13, user("bob"), user("alice"), "4.00", 60_000);
    pending(14, user("alice"), Owner::Settlement, "1.00", 1_000);
    f.ledger.freeze(account("alice"), FreezeMode::All).unwrap();
    f.ledger.freeze(account("bob"), FreezeMode::All).unwrap();

    // New movements are refused, out of and into the frozen accounts.
    assert_eq!(
        rejected(f.ledger.create_pending(
            f.request(20, user("alice"), Owner::Settlement, "1.00", "EUR"),
            60_000,
        )),
        E::DebitAccountFrozen
    );
    assert_eq!(
        rejected(f.send(21, Owner::Issuer, user("alice"), "1.00")),
        E::CreditAccountFrozen
    );
    assert_eq!(
        rejected(f.ledger.refund(
            TransferId(22),
            TransferId(2),
            f.amount("1.00", "EUR"),
            vec![]
        )),
        E::DebitAccountFrozen
    );

    // Reservations made before the freeze still end every way a pending transfer can.
    let settled = f.ledger.post(TransferId(10), None).unwrap();
    assert_eq!(settled.state, TransferState::Posted { amount_minor: 3000 });
    let partial = f
        .ledger
        .post(TransferId(11), Some(f.amount("15.00", "EUR")))
        .unwrap();
    assert_eq!(partial.state, TransferState::Posted { amount_minor: 1500 });
    // Both sides frozen (`All`): the credit was admitted before the freeze, so it posts too.
    f.ledger.post(TransferId(12), None).unwrap();
    assert_eq!(
        f.ledger.void(TransferId(13)).unwrap().state,
        TransferState::Voided
    );
    f.clock.advance_ms(1_000);
    assert_eq!(f.ledger.expire_due().unwrap(), vec![TransferId(14)]);
    // Posting again answers the same transfer; the freezes are still in place.
    assert_eq!(f.ledger.post(TransferId(10), None).unwrap(), settled);
    assert_eq!(
        f.ledger.account(&account("alice")).unwrap().unwrap().frozen,
        Some(FreezeMode::All)
    );

    // alice: 100 - 30 - 15 - 5 = 50 posted, nothing reserved; bob: 10 + 5.
    let alice = f.balances("alice", "EUR");
    assert_eq!(alice.debits_pending_minor, 0);
    assert_eq!(f.available("alice"), 5000);
    assert_eq!(f.available("bob"), 1500);
    f.ledger.verify_with_memory().unwrap();
}

/// `tail_from(seq)` reads exactly what the full tail reads from record `seq` on, naming
/// accounts opened before `seq` right, and keeps following the journal as it grows (new
/// accounts included).
#[test]
fn tail_from_reads_what_the_full_tail_reads_from_that_record() {
    let f = open();
    let ledger = f.ledger.ledger().clone();
    f.fund(1, "alice", "100.00");
    f.send(2, user("alice"), user("bob"), "1.00").unwrap();
    f.ledger
        .create_pending(
            f.request(3, user("bob"), user("carol"), "0.50", "EUR"),
            60_000,
        )
        .unwrap();
    f.ledger.post(TransferId(3), None).unwrap();
    f.send(4, user("alice"), user("carol"), "2.00").unwrap();
    let read_all = |tail: &mut JournalTail, until: u64| {
        let mut all = Vec::new();
        loop {
            let page = tail.read_until(until, 3).unwrap();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    };
    let head = block_on(ledger.durable_seq()).unwrap();
    assert!(head >= 5, "{head}");
    let full = read_all(&mut ledger.tail(), head);
    let mut tails = Vec::new();
    for from_seq in 0..=head + 1 {
        let mut tail = block_on(ledger.tail_from(from_seq)).unwrap();
        let expected: Vec<_> = full
            .iter()
            .filter(|e| e.record_seq >= from_seq)
            .cloned()
            .collect();
        assert_eq!(read_all(&mut tail, head), expected, "from {from_seq}");
        tails.push(tail);
    }
    assert!(matches!(
        block_on(ledger.tail_from(head + 2)),
        Err(LedgerError::Corrupt { .. })
    ));

    // The journal grows, opening new accounts (dave, a JPY account): every tail follows.
    f.send(5, user("carol"), user("dave"), "0.25").unwrap();
    f.ledger
        .create_transfer(f.request(6, Owner::Issuer, user("alice"), "7", "JPY"))
        .unwrap();
    f.send(7, user("dave"), user("alice"), "0.10").unwrap();
    let new_head = block_on(ledger.durable_seq()).unwrap();
    let more = read_all(&mut ledger.tail(), new_head)
        .into_iter()
        .filter(|e| e.record_seq > head)
        .collect::<Vec<_>>();
    assert!(more
        .iter()
        .any(|e| matches!(&e.entry, JournalEntry::AccountOpened { account } if account.owner == user("dave"))));
    for (from_seq, tail) in tails.iter_mut().enumerate() {
        assert_eq!(read_all(tail, new_head), more, "from {from_seq}");
    }
}

#[test]
fn rolling_daily_limit() {
    let f = open();
    // BHD: daily limit 200.000.
    let fund = f.request(1, Owner::Issuer, user("alice"), "1000.000", "BHD");
    f.ledger.create_transfer(fund).unwrap();
    let send = |id: u128, value: &str| {
        f.ledger
            .create_transfer(f.request(id, user("alice"), user("bob"), value, "BHD"))
    };
    send(2, "150.000").unwrap();
    assert_eq!(
        rejected(send(3, "50.001")),
        TransferError::ExceedsDailyLimit
    );
    let pend = f.request(4, user("alice"), user("bob"), "50.000", "BHD");
    f.ledger.create_pending(pend, 60_000).unwrap();
    assert_eq!(rejected(send(5, "0.001")), TransferError::ExceedsDailyLimit);
    // A voided reservation gives its allowance back.
    f.ledger.void(TransferId(4)).unwrap();
    send(6, "50.000").unwrap();
    // Debits count until a day after the end of the minute they were made in: up to a
    // minute longer than exactly 24 h, never shorter.
    f.clock.advance_ms(DAY_MS);
    assert_eq!(
        rejected(send(70, "0.001")),
        TransferError::ExceedsDailyLimit
    );
    f.clock.advance_ms(60_000);
    send(7, "200.000").unwrap();
    // The issuer is not limited.
    let big = f.request(8, Owner::Issuer, user("bob"), "5000.000", "BHD");
    f.ledger.create_transfer(big).unwrap();
}

#[test]
fn the_daily_window_is_rebuilt_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let open = || open_manual(dir.path(), &settings(), &clock).blocking();
    let send = |ledger: &BlockingLedger, id: u128, debit: Owner, value: &str| {
        let amount = ledger
            .ledger()
            .parse_amount(Decimal::from_str(value).unwrap(), "BHD")
            .unwrap();
        ledger.create_transfer(TransferRequest {
            reference: 0,
            id: TransferId(id),
            debit,
            credit: user("bob"),
            amount,
            memo: vec![],
        })
    };
    let ledger = open();
    send(&ledger, 1, Owner::Issuer, "1000.000").unwrap();
    send(&ledger, 2, user("alice"), "150.000").ok();
    let fund = ledger
        .ledger()
        .parse_amount(Decimal::from(500), "BHD")
        .unwrap();
    ledger
        .create_transfer(TransferRequest {
            reference: 0,
            id: TransferId(3),
            debit: Owner::Issuer,
            credit: user("alice"),
            amount: fund,
            memo: vec![],
        })
        .unwrap();
    send(&ledger, 4, user("alice"), "150.000").unwrap();
    drop(ledger);
    let ledger = open();
    assert_eq!(
        rejected(send(&ledger, 5, user("alice"), "60.000")),
        TransferError::ExceedsDailyLimit
    );
    clock.advance_ms(DAY_MS + 60_000);
    send(&ledger, 6, user("alice"), "60.000").unwrap();
}

#[test]
fn history_is_newest_first_and_pages() {
    let f = open();
    f.fund(1, "alice", "100.00");
    for id in 2..=6 {
        f.send(id, user("alice"), user("bob"), "1.00").unwrap();
    }
    let jpy = f.request(7, Owner::Issuer, user("alice"), "5", "JPY");
    f.ledger.create_transfer(jpy).unwrap();
    let page = f.ledger.history(&user("alice"), None, 3).unwrap();
    let ids: Vec<u128> = page.transfers.iter().map(|t| t.id.0).collect();
    assert_eq!(ids, vec![7, 6, 5]);
    let page = f.ledger.history(&user("alice"), page.next, 3).unwrap();
    let ids: Vec<u128> = page.transfers.iter().map(|t| t.id.0).collect();
    assert_eq!(ids, vec![4, 3, 2]);
    let page = f.ledger.history(&user("alice"), page.next, 3).unwrap();
    let ids: Vec<u128> = page.transfers.iter().map(|t| t.id.0).collect();
    assert_eq!(ids, vec![1]);
    assert!(page.next.is_none());
    assert_eq!(f.ledger.balances(&user("alice")).unwrap().len(), 2);
    assert!(f
        .ledger
        .history(&user("nobody"), None, 3)
        .unwrap()
        .transfers
        .is_empty());
}

#[test]
fn state_survives_reopen_and_exponents_are_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0_MS));
    {
        let ledger = Ledger::open(dir.path(), &settings(), clock.clone())
            .unwrap()
            .blocking();
        let amount = ledger
            .ledger()
            .parse_amount(Decimal::from(7), "EUR")
            .unwrap();
        ledger
            .create_transfer(TransferRequest {
                reference: 0,
                id: TransferId(1),
                debit: Owner::Issuer,
                credit: user("alice"),
                amount,
                memo: b"m".to_vec(),
            })
            .unwrap();
        ledger
            .create_pending(
                TransferRequest {
                    reference: 0,
                    id: TransferId(2),
                    debit: user("alice"),
                    credit: user("bob"),
                    amount,
                    memo: vec![],
                },
                1_000,
            )
            .unwrap();
    }
    let ledger = Ledger::open(dir.path(), &settings(), clock.clone())
        .unwrap()
        .blocking();
    let t = ledger.transfer(TransferId(1)).unwrap().unwrap();
    assert_eq!(t.memo, b"m");
    assert_eq!(ledger.pending_transfers().unwrap().len(), 1);
    let report = ledger.verify_with_memory().unwrap();
    assert_eq!(report.transfers, 2);
    assert_eq!(report.pending, 1);
    let entries: Vec<_> = ledger.ledger().export().collect::<Result<_, _>>().unwrap();
    assert!(entries.iter().any(|e| matches!(
        &e.entry,
        JournalEntry::TransferCreated { id, .. } if *id == TransferId(2)
    )));
    drop(ledger);
    let mut changed = settings();
    changed.currencies[0].exponent = 3;
    let err = Ledger::open(dir.path(), &changed, clock).unwrap_err();
    assert!(
        err.to_string()
            .contains("EUR has 2 decimal places in the journal"),
        "{err}"
    );
    assert_eq!(verify_dir(dir.path()).unwrap().transfers, 2);
}

/// A storage that shows an appended record to readers at once and holds the append (its
/// "fsync") until the gate opens, as sled does between `apply_batch` and the fdatasync.
#[derive(Default)]
struct GatedStorage {
    records: parking_lot::Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
    head: parking_lot::Mutex<Option<Vec<u8>>>,
    checkpoint: parking_lot::Mutex<Option<Vec<u8>>>,
    closed: parking_lot::Mutex<bool>,
    opened: parking_lot::Condvar,
    waiting: std::sync::atomic::AtomicBool,
}

impl GatedStorage {
    fn set_closed(&self, closed: bool) {
        *self.closed.lock() = closed;
        self.opened.notify_all();
    }
}

impl Storage for GatedStorage {
    fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError> {
        self.records.lock().insert(seq, record.to_vec());
        *self.head.lock() = Some(head.to_vec());
        let mut closed = self.closed.lock();
        self.waiting
            .store(*closed, std::sync::atomic::Ordering::SeqCst);
        // Bounded: a test that forgets to open the gate fails instead of hanging.
        for _ in 0..600 {
            if !*closed {
                break;
            }
            self.opened
                .wait_for(&mut closed, std::time::Duration::from_millis(100));
        }
        self.waiting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn head(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.head.lock().clone())
    }

    fn records(&self, from_seq: u64) -> Box<dyn Iterator<Item = storage::StoredRecord> + Send> {
        let items: Vec<storage::StoredRecord> = self
            .records
            .lock()
            .range(from_seq..)
            .map(|(k, v)| Ok((*k, v.clone())))
            .collect();
        Box::new(items.into_iter())
    }

    fn keeps_checkpoints(&self) -> bool {
        true
    }

    fn put_checkpoint(&self, bytes: &[u8]) -> Result<(), StorageError> {
        *self.checkpoint.lock() = Some(bytes.to_vec());
        Ok(())
    }

    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.checkpoint.lock().clone())
    }
}

/// Issue 15: export, `durable_seq`, `verify` and balances read up to the durable head, off
/// the writer: none waits behind a batch being written, none shows it.
#[test]
fn reads_off_the_writer_do_not_show_or_wait_for_a_batch_not_yet_durable() {
    let storage = Arc::new(GatedStorage::default());
    let clock = ManualClock::new(T0_MS);
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        ..LedgerOptions::default()
    };
    let ledger = Ledger::open_storage(
        storage.clone(),
        Currencies::from_settings(&settings()).unwrap(),
        Arc::new(clock.clone()),
        options,
    )
    .unwrap()
    .blocking();
    let request = |id: u128| TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit: Owner::Issuer,
        credit: user("alice"),
        amount: ledger
            .ledger()
            .parse_amount(Decimal::from_str("1.00").unwrap(), "EUR")
            .unwrap(),
        memo: Vec::new(),
    };
    ledger.create_transfer(request(1)).unwrap();
    block_on(ledger.ledger().checkpoint()).unwrap();
    assert!(storage.checkpoint.lock().is_some());
    let durable = block_on(ledger.ledger().durable_seq()).unwrap();

    storage.set_closed(true);
    let writer = {
        let ledger = ledger.clone();
        let request = request(2);
        std::thread::spawn(move || ledger.create_transfer(request))
    };
    let mut held = false;
    for _ in 0..600 {
        if storage.waiting.load(std::sync::atomic::Ordering::SeqCst) {
            held = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(held, "the second transfer's append never started");

    // The record of transfer 2 is readable in the store, but not durable yet.
    assert_eq!(block_on(ledger.ledger().durable_seq()).unwrap(), durable);
    let entries: Vec<_> = ledger.ledger().export().collect::<Result<_, _>>().unwrap();
    let shows = |id: u128| {
        entries.iter().any(|e| {
            matches!(&e.entry, JournalEntry::TransferCreated { id: t, .. } if *t == TransferId(id))
        })
    };
    assert!(shows(1));
    assert!(!shows(2), "the export showed a record not yet durable");
    let report = ledger.verify().unwrap();
    assert_eq!((report.records, report.transfers), (durable, 1));
    let alice_minor = || {
        ledger.balances(&user("alice")).unwrap()[0]
            .balances
            .available_minor()
    };
    assert_eq!(alice_minor(), 100, "balances show only what is durable");

    storage.set_closed(false);
    writer.join().unwrap().unwrap();
    assert_eq!(
        block_on(ledger.ledger().durable_seq()).unwrap(),
        durable + 1
    );
    assert_eq!(ledger.verify_with_memory().unwrap().transfers, 2);
    assert_eq!(alice_minor(), 200);
    let entries: Vec<_> = ledger.ledger().export().collect::<Result<_, _>>().unwrap();
    assert!(entries.iter().any(|e| {
        matches!(&e.entry, JournalEntry::TransferCreated { id, .. } if *id == TransferId(2))
    }));
}

// ----- proptest against an independent auditor ------------------------------------------

mod model {
    //! A plain in-memory model of the ledger's rules, written separately from `state.rs`,
    //! that predicts each reply. The ledger must agree on every reply and every balance.

    use std::collections::{HashMap, HashSet};

    use crate::ledger::{FreezeMode, TransferError as E};

    pub type Acct = (usize, usize); // (owner index, currency index)

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Single,
        Pending(u64),
        Refund(u128),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum St {
        Pending,
        Posted(u128),
        Voided,
        Expired,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Bal {
        pub dp: u128,
        pub dpo: u128,
        pub cp: u128,
        pub cpo: u128,
    }

    #[derive(Debug, Clone)]
    pub struct Tr {
        pub kind: Kind,
        pub debit: Acct,
        pub credit: Acct,
        pub amount: u128,
        pub state: St,
        pub deadline: u64,
        pub refunded: u128,
        /// What its live pending refunds reserve.
        pub reserved: u128,
        /// For a pending refund: its original.
        pub refund_of: Option<u128>,
        /// Ledger time it was made at.
        pub created: u64,
    }

    /// What a create asked for: kind, accounts (none for `refund`), currency, amount, the
    /// original of a pending refund.
    type Asked = (Kind, Option<Acct>, Option<Acct>, usize, u128, Option<u128>);

    #[derive(Debug, Clone)]
    pub struct Fail {
        kind: Kind,
        debit: Option<Acct>,
        credit: Option<Acct>,
        cur: usize,
        amount: u128,
        refund_of: Option<u128>,
        error: E,
        /// Ledger time of the failure: it answers retries for a day.
        at: u64,
    }

    #[derive(Default)]
    pub struct Model {
        pub bal: HashMap<Acct, Bal>,
        pub tr: HashMap<u128, Tr>,
        pub failed: HashMap<u128, Fail>,
        pub frozen: HashMap<Acct, FreezeMode>,
        pub now: u64,
        /// Accounts that exist: opened by a transfer that succeeded, or by a freeze. A
        /// refused transfer opens none.
        pub opened: HashSet<Acct>,
        /// Whether the last create or refund answered a transfer that already existed.
        pub exists: bool,
        /// EUR's (currency 0) `max_transfer`, in minor units, for user debits.
        pub max_transfer: Option<u128>,
    }

    /// EUR's (currency 0) `max_per_24h`, in minor units, for user debits.
    pub const EUR_DAILY_MAX: u128 = 100;
    const DAY: u64 = 24 * 60 * 60 * 1000;
    const MINUTE: u64 = 60 * 1000;

    /// Owner 0 is the issuer (may go negative); the others are users.
    fn is_user(a: Acct) -> bool {
        a.0 != 0
    }

    impl Model {
        pub fn expire(&mut self) {
            let now = self.now;
            let due: Vec<u128> = self
                .tr
                .iter()
                .filter(|(_, t)| t.state == St::Pending && t.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                self.end(id, St::Expired);
            }
        }

        fn end(&mut self, id: u128, st: St) {
            let t = self.tr.get_mut(&id).unwrap();
            t.state = st;
            let (d, c, a) = (t.debit, t.credit, t.amount);
            let posted = if let St::Posted(x) = st { x } else { 0 };
            if let Some(o) = t.refund_of {
                let o = self.tr.get_mut(&o).unwrap();
                o.reserved -= a;
                o.refunded += posted;
            }
            let db = self.bal.entry(d).or_default();
            db.dp -= a;
            db.dpo += posted;
            let cb = self.bal.entry(c).or_default();
            cb.cp -= a;
            cb.cpo += posted;
        }

        fn compare(existing: Asked, asked: Asked) -> Result<(), E> {
            let disc = |k: Kind| match k {
                Kind::Single => 0,
                Kind::Pending(_) => 1,
                Kind::Refund(_) => 2,
            };
            if disc(existing.0) != disc(asked.0) {
                return Err(E::ExistsWithDifferentKind);
            }
            // `refund` names no accounts: compared only when both sides name them.
            let differ = |a: Option<Acct>, b: Option<Acct>| a.zip(b).is_some_and(|(a, b)| a != b);
            if differ(existing.1, asked.1) {
                return Err(E::ExistsWithDifferentDebitAccount);
            }
            if differ(existing.2, asked.2) {
                return Err(E::ExistsWithDifferentCreditAccount);
            }
            if existing.3 != asked.3 || existing.4 != asked.4 {
                return Err(E::ExistsWithDifferentAmount);
            }
            match (existing.0, asked.0) {
                (Kind::Pending(a), Kind::Pending(b)) if a != b => {
                    Err(E::ExistsWithDifferentTimeout)
                }
                (Kind::Refund(a), Kind::Refund(b)) if a != b => Err(E::ExistsWithDifferentOriginal),
                _ if existing.5 != asked.5 => Err(E::ExistsWithDifferentOriginal),
                _ => Ok(()),
            }
        }

        fn lookup(&self, id: u128, asked: Asked) -> Option<Result<u128, E>> {
            if let Some(t) = self.tr.get(&id) {
                let existing = (
                    t.kind,
                    Some(t.debit),
                    Some(t.credit),
                    t.debit.1,
                    t.amount,
                    t.refund_of,
                );
                return Some(Self::compare(existing, asked).map(|()| id));
            }
            // A failure answers retries of its id for a day; then the id is new again.
            let f = self.failed.get(&id).filter(|f| self.now < f.at + DAY)?;
            let existing = (f.kind, f.debit, f.credit, f.cur, f.amount, f.refund_of);
            Some(Self::compare(existing, asked).and(Err(f.error)))
        }

        /// The refund checks of `original` in the ledger's precedence: (debit, credit) of
        /// the refund, or the error and whether it is recorded.
        fn refund_checks(
            &self,
            original: u128,
            cur: usize,
            amount: u128,
        ) -> Result<(Acct, Acct), (E, bool)> {
            let Some(o) = self.tr.get(&original) else {
                return Err((E::OriginalTransferNotFound, true));
            };
            if o.debit.1 != cur {
                return Err((E::CurrencyMismatch, false));
            }
            let St::Posted(posted) = o.state else {
                return Err((E::OriginalTransferNotRefundable, true));
            };
            if amount > posted - o.refunded - o.reserved {
                return Err((E::RefundExceedsRemaining, true));
            }
            if matches!(o.kind, Kind::Refund(_)) || o.refund_of.is_some() {
                return Err((E::OriginalTransferIsRefund, true));
            }
            Ok((o.credit, o.debit))
        }

        /// A refund named by its accounts (`create_refund_result`), single-phase or pending.
        #[allow(clippy::too_many_arguments)]
        pub fn linked_refund(
            &mut self,
            id: u128,
            d: Acct,
            c: Acct,
            amount: u128,
            timeout: Option<u64>,
            original: u128,
        ) -> Result<u128, E> {
            self.expire();
            self.exists = false;
            if id == 0 {
                return Err(E::IdMustNotBeZero);
            }
            if d == c {
                return Err(E::AccountsMustBeDifferent);
            }
            let kind = timeout.map_or(Kind::Refund(original), Kind::Pending);
            let link = timeout.map(|_| original);
            if let Some(r) = self.lookup(id, (kind, Some(d), Some(c), d.1, amount, link)) {
                self.exists = r.is_ok();
                return r;
            }
            let fail = |m: &mut Self, e: E| {
                m.failed.insert(
                    id,
                    Fail {
                        kind,
                        debit: Some(d),
                        credit: Some(c),
                        cur: d.1,
                        amount,
                        refund_of: link,
                        error: e,
                        at: m.now,
                    },
                );
                Err(e)
            };
            match self.refund_checks(original, d.1, amount) {
                Err((e, false)) => return Err(e),
                Err((e, true)) => return fail(self, e),
                Ok(accounts) if accounts != (d, c) => return fail(self, E::RefundAccountsMismatch),
                Ok(_) => {}
            }
            if let Err(e) = self.movement(d, c, amount) {
                return fail(self, e);
            }
            let (state, deadline) = match timeout {
                Some(t) => (St::Pending, self.now + t),
                None => (St::Posted(amount), 0),
            };
            let o = self.tr.get_mut(&original).unwrap();
            if timeout.is_some() {
                o.reserved += amount;
                self.bal.entry(d).or_default().dp += amount;
                self.bal.entry(c).or_default().cp += amount;
            } else {
                o.refunded += amount;
                self.bal.entry(d).or_default().dpo += amount;
                self.bal.entry(c).or_default().cpo += amount;
            }
            self.tr.insert(
                id,
                Tr {
                    kind,
                    debit: d,
                    credit: c,
                    amount,
                    state,
                    deadline,
                    refunded: 0,
                    reserved: 0,
                    refund_of: link,
                    created: self.now,
                },
            );
            Ok(id)
        }

        /// What the daily limit counts of `d`'s debits now: each transfer it paid, for what
        /// it reserves or posted, from the minute it was made in until a day after that
        /// minute's end (a limit may refuse up to a minute early, never allow more).
        fn used_today(&self, d: Acct) -> u128 {
            self.tr
                .values()
                .filter(|t| t.debit == d && self.now < (t.created / MINUTE + 1) * MINUTE + DAY)
                .map(|t| match t.state {
                    St::Pending => t.amount,
                    St::Posted(x) => x,
                    St::Voided | St::Expired => 0,
                })
                .sum()
        }

        fn movement(&self, d: Acct, c: Acct, amount: u128) -> Result<(), E> {
            if self.frozen.contains_key(&d) {
                return Err(E::DebitAccountFrozen);
            }
            if self.frozen.get(&c) == Some(&FreezeMode::All) {
                return Err(E::CreditAccountFrozen);
            }
            if is_user(d) && d.1 == 0 && self.used_today(d) + amount > EUR_DAILY_MAX {
                return Err(E::ExceedsDailyLimit);
            }
            let b = self.bal.get(&d).copied().unwrap_or_default();
            if is_user(d) && b.dpo + b.dp + amount > b.cpo {
                return Err(E::InsufficientFunds);
            }
            Ok(())
        }

        #[allow(clippy::too_many_arguments)]
        fn record_fail(
            &mut self,
            id: u128,
            kind: Kind,
            debit: Option<Acct>,
            credit: Option<Acct>,
            cur: usize,
            amount: u128,
            error: E,
        ) -> Result<u128, E> {
            self.failed.insert(
                id,
                Fail {
                    kind,
                    debit,
                    credit,
                    cur,
                    amount,
                    refund_of: None,
                    error,
                    at: self.now,
                },
            );
            Err(error)
        }

        pub fn create(
            &mut self,
            id: u128,
            d: Acct,
            c: Acct,
            amount: u128,
            timeout: Option<u64>,
        ) -> Result<u128, E> {
            self.expire();
            self.exists = false;
            if id == 0 {
                return Err(E::IdMustNotBeZero);
            }
            if d == c {
                return Err(E::AccountsMustBeDifferent);
            }
            let kind = timeout.map_or(Kind::Single, Kind::Pending);
            if let Some(r) = self.lookup(id, (kind, Some(d), Some(c), d.1, amount, None)) {
                self.exists = r.is_ok();
                return r;
            }
            // A limit of the configuration: after the lookup, and never recorded.
            if is_user(d) && d.1 == 0 && self.max_transfer.is_some_and(|max| amount > max) {
                return Err(E::ExceedsMaxTransfer);
            }
            if let Err(e) = self.movement(d, c, amount) {
                return self.record_fail(id, kind, Some(d), Some(c), d.1, amount, e);
            }
            self.opened.extend([d, c]);
            let (state, deadline) = match timeout {
                Some(t) => (St::Pending, self.now + t),
                None => (St::Posted(amount), 0),
            };
            let pending = timeout.is_some();
            let db = self.bal.entry(d).or_default();
            if pending {
                db.dp += amount
            } else {
                db.dpo += amount
            }
            let cb = self.bal.entry(c).or_default();
            if pending {
                cb.cp += amount
            } else {
                cb.cpo += amount
            }
            self.tr.insert(
                id,
                Tr {
                    kind,
                    debit: d,
                    credit: c,
                    amount,
                    state,
                    deadline,
                    refunded: 0,
                    reserved: 0,
                    refund_of: None,
                    created: self.now,
                },
            );
            Ok(id)
        }

        pub fn refund(
            &mut self,
            id: u128,
            original: u128,
            cur: usize,
            amount: u128,
        ) -> Result<u128, E> {
            self.expire();
            self.exists = false;
            if id == 0 {
                return Err(E::IdMustNotBeZero);
            }
            let kind = Kind::Refund(original);
            if let Some(r) = self.lookup(id, (kind, None, None, cur, amount, None)) {
                self.exists = r.is_ok();
                return r;
            }
            let (d, c) = match self.refund_checks(original, cur, amount) {
                Ok(accounts) => accounts,
                Err((e, false)) => return Err(e),
                Err((e, true)) => return self.record_fail(id, kind, None, None, cur, amount, e),
            };
            if let Err(e) = self.movement(d, c, amount) {
                return self.record_fail(id, kind, None, None, cur, amount, e);
            }
            self.bal.entry(d).or_default().dpo += amount;
            self.bal.entry(c).or_default().cpo += amount;
            self.tr.get_mut(&original).unwrap().refunded += amount;
            self.tr.insert(
                id,
                Tr {
                    kind,
                    debit: d,
                    credit: c,
                    amount,
                    state: St::Posted(amount),
                    deadline: 0,
                    refunded: 0,
                    reserved: 0,
                    refund_of: None,
                    created: self.now,
                },
            );
            Ok(id)
        }

        fn pending(&self, id: u128) -> Result<Tr, E> {
            let t = self.tr.get(&id).ok_or(E::PendingTransferNotFound)?;
            match t.kind {
                Kind::Pending(_) => Ok(t.clone()),
                _ => Err(E::PendingTransferNotPending),
            }
        }

        pub fn post(&mut self, id: u128, amount: Option<(usize, u128)>) -> Result<u128, E> {
            self.expire();
            let t = self.pending(id)?;
            if amount.is_some_and(|(cur, _)| cur != t.debit.1) {
                return Err(E::CurrencyMismatch);
            }
            let x = amount.map_or(t.amount, |(_, a)| a);
            match t.state {
                St::Posted(p) if p == x => return Ok(id),
                St::Posted(_) => return Err(E::PendingTransferAlreadyPosted),
                St::Voided => return Err(E::PendingTransferAlreadyVoided),
                St::Expired => return Err(E::PendingTransferExpired),
                St::Pending => {}
            }
            if x > t.amount {
                return Err(E::PostAmountExceedsPending);
            }
            // A freeze refuses new transfers only: a pending admitted before it still posts.
            self.end(id, St::Posted(x));
            Ok(id)
        }

        pub fn void(&mut self, id: u128) -> Result<u128, E> {
            self.expire();
            let t = self.pending(id)?;
            match t.state {
                St::Voided => Ok(id),
                St::Posted(_) => Err(E::PendingTransferAlreadyPosted),
                St::Expired => Err(E::PendingTransferExpired),
                St::Pending => {
                    self.end(id, St::Voided);
                    Ok(id)
                }
            }
        }

        pub fn freeze(&mut self, a: Acct, mode: Option<FreezeMode>) {
            self.expire();
            self.opened.insert(a);
            match mode {
                Some(m) => self.frozen.insert(a, m),
                None => self.frozen.remove(&a),
            };
        }
    }
}

mod auditor {
    use proptest::prelude::*;

    use super::model::{Model, St};
    use super::*;

    const OWNERS: usize = 5;
    const CURRENCIES: [&str; 2] = ["EUR", "JPY"];

    fn owner(i: usize) -> Owner {
        match i {
            0 => Owner::Issuer,
            n => Owner::user(format!("@user{n}:example.org")),
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Create {
            id: u128,
            debit: usize,
            credit: usize,
            cur: usize,
            amount: u128,
            timeout_s: Option<u64>,
        },
        Post {
            id: u128,
            amount: Option<(usize, u128)>,
        },
        Void {
            id: u128,
        },
        Refund {
            id: u128,
            original: u128,
            cur: usize,
            amount: u128,
        },
        Freeze {
            owner: usize,
            cur: usize,
            mode: Option<FreezeMode>,
        },
        Advance {
            ms: u64,
        },
        /// The issuer pays a user, with a fresh id: users get money to spend, so that their
        /// debits meet the daily limit and not only a lack of funds.
        Fund {
            owner: usize,
            cur: usize,
            amount: u128,
        },
        /// A user pays another, with a fresh id (single-phase or pending): debits that
        /// succeed fill the daily window.
        Pay {
            debit: usize,
            credit: usize,
            cur: usize,
            amount: u128,
            timeout_s: Option<u64>,
        },
        /// Advance to this far from the moment the debits of the minute of the last EUR user
        /// debit (or of now) leave the daily window (a day after that minute's end): its
        /// edge, either side (not back: ledger time never goes back).
        AdvanceToWindowEdge {
            offset_ms: i64,
        },
        /// The system clock jumps by more than the allowed skew (ahead, or back), a batch
        /// runs, and the clock is set right: ledger time must not have moved with it.
        Jump {
            ms: u64,
            back: bool,
        },
        /// Reopen with EUR's `max_transfer` set to this (or no limit); the ledger closed
        /// with a checkpoint, or (as after a crash) without one, so that the reopen starts
        /// from an older checkpoint and replays the records after it.
        Reopen {
            max_transfer_minor: Option<u128>,
            checkpoint_at_close: bool,
        },
        /// Write a checkpoint now.
        Checkpoint,
        /// A refund named by its accounts: the original's swapped (`swap`), or the given
        /// owners; single-phase or pending.
        LinkedRefund {
            id: u128,
            original: u128,
            swap: bool,
            debit: usize,
            credit: usize,
            cur: usize,
            amount: u128,
            timeout_s: Option<u64>,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        let id = 0u128..12;
        let who = 0..OWNERS;
        let cur = prop_oneof![4 => Just(0usize), 1 => Just(1usize)];
        let amount = prop_oneof![1u128..50, 50u128..400];
        prop_oneof![
            6 => (id.clone(), who.clone(), who.clone(), cur.clone(), amount.clone(), proptest::option::weighted(0.4, 1u64..4))
                .prop_map(|(id, debit, credit, cur, amount, timeout_s)| Step::Create { id, debit, credit, cur, amount, timeout_s }),
            2 => (id.clone(), proptest::option::of((cur.clone(), amount.clone())))
                .prop_map(|(id, amount)| Step::Post { id, amount }),
            2 => id.clone().prop_map(|id| Step::Void { id }),
            2 => (id.clone(), id.clone(), cur.clone(), amount.clone()).prop_map(|(id, original, cur, amount)| Step::Refund { id, original, cur, amount }),
            1 => (who.clone(), cur.clone(), prop_oneof![Just(None), Just(Some(FreezeMode::Debits)), Just(Some(FreezeMode::All))])
                .prop_map(|(owner, cur, mode)| Step::Freeze { owner, cur, mode }),
            // Mostly short steps; now and then minutes, or about a day (the daily window's
            // edges, and failures forgotten after a day).
            2 => prop_oneof![8 => 0u64..4_000, 1 => 20_000u64..150_000, 1 => DAY_MS - 30_000..DAY_MS + 70_000]
                .prop_map(|ms| Step::Advance { ms }),
            1 => prop_oneof![-2i64..2, -60_000i64..60_000].prop_map(|offset_ms| Step::AdvanceToWindowEdge { offset_ms }),
            2 => (1..OWNERS, cur.clone(), 100u128..1_000).prop_map(|(owner, cur, amount)| Step::Fund { owner, cur, amount }),
            3 => (1..OWNERS, 1..OWNERS, cur.clone(), 1u128..70, proptest::option::weighted(0.3, 1u64..4))
                .prop_map(|(debit, credit, cur, amount, timeout_s)| Step::Pay { debit, credit, cur, amount, timeout_s }),
            1 => (CLOCK_SKEW_MS_MAX + 1..30 * DAY_MS, any::<bool>()).prop_map(|(ms, back)| Step::Jump { ms, back }),
            1 => (proptest::option::of(1u128..200), any::<bool>())
                .prop_map(|(max_transfer_minor, checkpoint_at_close)| Step::Reopen { max_transfer_minor, checkpoint_at_close }),
            1 => Just(Step::Checkpoint),
            3 => (id.clone(), id, prop_oneof![4 => Just(true), 1 => Just(false)], who.clone(), who, cur, amount, proptest::option::of(1u64..4))
                .prop_map(|(id, original, swap, debit, credit, cur, amount, timeout_s)| Step::LinkedRefund { id, original, swap, debit, credit, cur, amount, timeout_s }),
        ]
    }

    /// The currencies, with `max_transfer_minor` as EUR's `max_transfer` (if any).
    fn prop_settings(max_transfer_minor: Option<u128>) -> LedgerSettings {
        LedgerSettings {
            currencies: CURRENCIES
                .iter()
                .enumerate()
                .map(|(i, c)| CurrencySpec {
                    code: (*c).to_owned(),
                    exponent: 2,
                    max_transfer: max_transfer_minor
                        .filter(|_| i == 0)
                        .map(|m| Decimal::from_i128_with_scale(m as i128, 2)),
                    max_per_24h: (i == 0)
                        .then(|| Decimal::from_i128_with_scale(model::EUR_DAILY_MAX as i128, 2)),
                })
                .collect(),
        }
    }

    /// An amount as a caller holding its request has it: not checked against the limits
    /// configured now (the ledger applies them, after the id lookup).
    fn amount(_ledger: &Ledger, cur: usize, minor: u128) -> Amount {
        Currencies::from_settings(&prop_settings(None))
            .unwrap()
            .from_minor(minor, CURRENCIES[cur])
            .unwrap()
    }

    /// Compares a reply with the model's prediction.
    fn check(
        got: Result<Transfer, LedgerError>,
        want: Result<u128, TransferError>,
        model: &Model,
    ) -> Result<(), TestCaseError> {
        match (got, want) {
            (Ok(t), Ok(id)) => {
                prop_assert_eq!(t.id.0, id);
                let m = &model.tr[&id];
                let state = match m.state {
                    St::Pending => TransferState::Pending,
                    St::Posted(x) => TransferState::Posted { amount_minor: x },
                    St::Voided => TransferState::Voided,
                    St::Expired => TransferState::Expired,
                };
                prop_assert_eq!(t.state, state);
                prop_assert_eq!(t.amount_minor, m.amount);
                Ok(())
            }
            (Err(LedgerError::Rejected(e)), Err(w)) => {
                prop_assert_eq!(e, w);
                Ok(())
            }
            (got, want) => Err(TestCaseError::fail(format!(
                "ledger said {got:?}, model {want:?}"
            ))),
        }
    }

    /// [`check`] for a create or refund, which also says whether it already existed.
    fn check_created(
        got: Result<CreateResult, LedgerError>,
        want: Result<u128, TransferError>,
        model: &Model,
    ) -> Result<(), TestCaseError> {
        if let Ok(created) = &got {
            prop_assert_eq!(created.exists(), model.exists, "exists of {:?}", created);
        }
        check(got.map(CreateResult::into_transfer), want, model)
    }

    fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        // The system clock, and the monotonic clock it is checked against: `Advance` moves
        // both, `Jump` only the first.
        let clock = ManualClock::new(T0_MS);
        let monotonic = ManualClock::new(0);
        let open = |max_transfer_minor: Option<u128>, checkpoint_at_close: bool| {
            let options = LedgerOptions {
                monotonic: Some(Arc::new(monotonic.clone())),
                checkpoint_at_close,
                ..LedgerOptions::default()
            };
            let settings = prop_settings(max_transfer_minor);
            Ledger::open_with_options(dir.path(), &settings, Arc::new(clock.clone()), options)
                .unwrap()
        };
        let mut closes_with_checkpoint = true;
        let mut ledger = open(None, closes_with_checkpoint);
        let mut model = Model {
            now: T0_MS,
            ..Model::default()
        };
        for (n, step) in steps.into_iter().enumerate() {
            let b = ledger.blocking();
            // A payment is a create with an id of its own (no collision with other steps').
            let step = match step {
                Step::Pay {
                    debit,
                    credit,
                    cur,
                    amount,
                    timeout_s,
                } => Step::Create {
                    id: 1_000 + n as u128,
                    debit,
                    credit,
                    cur,
                    amount,
                    timeout_s,
                },
                other => other,
            };
            match step {
                Step::Fund {
                    owner: o,
                    cur,
                    amount: a,
                } => {
                    let id = 1_000 + n as u128;
                    let request = TransferRequest {
                        reference: 0,
                        id: TransferId(id),
                        debit: Owner::Issuer,
                        credit: owner(o),
                        amount: amount(&ledger, cur, a),
                        memo: vec![],
                    };
                    let got = b.create_transfer_result(request);
                    let want = model.create(id, (0, cur), (o, cur), a, None);
                    check_created(got, want, &model)?;
                }
                Step::Pay { .. } => unreachable!("made a create above"),
                Step::Create {
                    id,
                    debit,
                    credit,
                    cur,
                    amount: a,
                    timeout_s,
                } => {
                    let request = TransferRequest {
                        reference: 0,
                        id: TransferId(id),
                        debit: owner(debit),
                        credit: owner(credit),
                        amount: amount(&ledger, cur, a),
                        memo: vec![],
                    };
                    let timeout = timeout_s.map(|s| s * 1_000);
                    let got = match timeout {
                        Some(t) => b.create_pending_result(request, t),
                        None => b.create_transfer_result(request),
                    };
                    let want = model.create(id, (debit, cur), (credit, cur), a, timeout);
                    check_created(got, want, &model)?;
                }
                Step::Post { id, amount: a } => {
                    let got = b.post(TransferId(id), a.map(|(c, m)| amount(&ledger, c, m)));
                    let want = model.post(id, a);
                    check(got, want, &model)?;
                }
                Step::Void { id } => {
                    let got = b.void(TransferId(id));
                    check(got, model.void(id), &model)?;
                }
                Step::Refund {
                    id,
                    original,
                    cur,
                    amount: a,
                } => {
                    let got = b.refund_result(
                        TransferId(id),
                        TransferId(original),
                        amount(&ledger, cur, a),
                        vec![],
                    );
                    let want = model.refund(id, original, cur, a);
                    check_created(got, want, &model)?;
                }
                Step::Freeze {
                    owner: o,
                    cur,
                    mode,
                } => {
                    let account = AccountId {
                        owner: owner(o),
                        currency: CurrencyCode::new(CURRENCIES[cur]).unwrap(),
                    };
                    match mode {
                        Some(m) => b.freeze(account, m).unwrap(),
                        None => b.unfreeze(account).unwrap(),
                    }
                    model.freeze((o, cur), mode);
                }
                Step::AdvanceToWindowEdge { offset_ms } => {
                    let last_debit_ms = model
                        .tr
                        .values()
                        .filter(|t| t.debit.0 != 0 && t.debit.1 == 0)
                        .map(|t| t.created)
                        .max()
                        .unwrap_or(model.now);
                    let edge_ms = (last_debit_ms / 60_000 + 1) * 60_000 + DAY_MS;
                    let ms = edge_ms
                        .saturating_add_signed(offset_ms)
                        .saturating_sub(model.now);
                    clock.advance_ms(ms);
                    monotonic.advance_ms(ms);
                    model.now += ms;
                    model.expire();
                    b.expire_due().unwrap();
                }
                Step::Advance { ms } => {
                    clock.advance_ms(ms);
                    monotonic.advance_ms(ms);
                    model.now += ms;
                    model.expire();
                    b.expire_due().unwrap();
                }
                Step::Jump { ms, back } => {
                    let right_ms = clock.now_ms();
                    clock.set_ms(if back { right_ms - ms } else { right_ms + ms });
                    model.expire();
                    b.expire_due().unwrap();
                    clock.set_ms(right_ms);
                }
                Step::Reopen {
                    max_transfer_minor,
                    checkpoint_at_close,
                } => {
                    drop(b);
                    drop(ledger);
                    ledger = open(max_transfer_minor, checkpoint_at_close);
                    // Every checkpoint fits the journal: none is ever discarded.
                    prop_assert_eq!(ledger.alarms().checkpoint_fallbacks, 0);
                    if closes_with_checkpoint {
                        let head = block_on(ledger.durable_seq()).unwrap();
                        prop_assert_eq!(ledger.opened_from_checkpoint(), Some(head));
                    }
                    closes_with_checkpoint = checkpoint_at_close;
                    model.max_transfer = max_transfer_minor;
                }
                Step::Checkpoint => {
                    block_on(ledger.checkpoint()).unwrap();
                }
                Step::LinkedRefund {
                    id,
                    original,
                    swap,
                    debit,
                    credit,
                    cur,
                    amount: a,
                    timeout_s,
                } => {
                    let (d, c) = match model.tr.get(&original) {
                        Some(o) if swap => ((o.credit.0, cur), (o.debit.0, cur)),
                        _ => ((debit, cur), (credit, cur)),
                    };
                    let request = TransferRequest {
                        reference: 0,
                        id: TransferId(id),
                        debit: owner(d.0),
                        credit: owner(c.0),
                        amount: amount(&ledger, cur, a),
                        memo: vec![],
                    };
                    let timeout = timeout_s.map(|s| s * 1_000);
                    let got = b.create_refund_result(request, TransferId(original), timeout);
                    let want = model.linked_refund(id, d, c, a, timeout, original);
                    check_created(got, want, &model)?;
                    // The refunds of the original, by reference.
                    let mut want: Vec<u128> = model
                        .tr
                        .iter()
                        .filter(|(_, t)| {
                            t.refund_of == Some(original) || t.kind == model::Kind::Refund(original)
                        })
                        .map(|(id, _)| *id)
                        .collect();
                    want.sort_unstable();
                    let mut got: Vec<u128> = b
                        .refunds_of(TransferId(original))
                        .unwrap()
                        .iter()
                        .map(|t| t.id.0)
                        .collect();
                    got.sort_unstable();
                    prop_assert_eq!(got, want);
                }
            }
            // After every step: balances equal the model's, and the invariants hold.
            let b = ledger.blocking();
            for o in 0..OWNERS {
                for (c, code) in CURRENCIES.iter().enumerate() {
                    let account = AccountId {
                        owner: owner(o),
                        currency: CurrencyCode::new(code).unwrap(),
                    };
                    let view = b.account(&account).unwrap();
                    prop_assert_eq!(
                        view.is_some(),
                        model.opened.contains(&(o, c)),
                        "account {} {} exists",
                        o,
                        code
                    );
                    let got = view.map(|a| a.balances).unwrap_or_default();
                    let m = model.bal.get(&(o, c)).copied().unwrap_or_default();
                    let want = Balances {
                        debits_pending_minor: m.dp,
                        debits_posted_minor: m.dpo,
                        credits_pending_minor: m.cp,
                        credits_posted_minor: m.cpo,
                    };
                    prop_assert_eq!(got, want, "account {} {}", o, code);
                }
            }
            // History queries by time (issue 15): each owner's transfers created within a
            // range are the model's, in either order, whatever was spilled or reopened.
            let mut times: Vec<u64> = model.tr.values().map(|t| t.created).collect();
            times.sort_unstable();
            times.dedup();
            if let (Some(&first), Some(&last)) = (times.first(), times.last()) {
                let mid = times[times.len() / 2];
                for (min, max) in [(mid, last), (first, mid), (last + 1, u64::MAX)] {
                    for o in 0..OWNERS {
                        let mut want: Vec<u128> = model
                            .tr
                            .iter()
                            .filter(|(_, t)| {
                                (t.debit.0 == o || t.credit.0 == o)
                                    && (min..=max).contains(&t.created)
                            })
                            .map(|(id, _)| *id)
                            .collect();
                        want.sort_unstable();
                        for order in [HistoryOrder::NewestFirst, HistoryOrder::OldestFirst] {
                            let query = HistoryQuery {
                                order,
                                ..HistoryQuery::newest_first(40)
                            }
                            .created_within(min, max);
                            let mut got: Vec<u128> = Vec::new();
                            let mut created: Vec<u64> = Vec::new();
                            let mut cursor = None;
                            for _ in 0..=want.len() {
                                let page = b.history_query(&owner(o), query.after(cursor)).unwrap();
                                got.extend(page.transfers.iter().map(|t| t.id.0));
                                created.extend(page.transfers.iter().map(|t| t.created_ms));
                                cursor = page.next;
                                if cursor.is_none() {
                                    break;
                                }
                            }
                            prop_assert!(cursor.is_none(), "pages never end");
                            if order == HistoryOrder::NewestFirst {
                                created.reverse();
                            }
                            prop_assert!(created.is_sorted(), "{:?}: {:?}", order, created);
                            got.sort_unstable();
                            prop_assert_eq!(
                                &got,
                                &want,
                                "owner {} {:?} {}..={}",
                                o,
                                order,
                                min,
                                max
                            );
                        }
                    }
                }
            }
            let pending = model.tr.values().filter(|t| t.state == St::Pending).count();
            prop_assert_eq!(b.pending_transfers().unwrap().len(), pending);
            b.verify_with_memory()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        Ok(())
    }

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

        #[test]
        fn ledger_agrees_with_the_auditor(steps in proptest::collection::vec(step(), 1..60)) {
            run(steps)?;
        }
    }
}

#[test]
fn commit_observer_sees_each_durable_batch_and_only_the_first_is_kept() {
    let f = open();
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<usize>::new()));
    let record = seen.clone();
    assert!(f
        .ledger
        .ledger()
        .observe_commits(Box::new(move |commands, _duration| record
            .lock()
            .push(commands))));
    assert!(
        !f.ledger.ledger().observe_commits(Box::new(|_, _| {})),
        "a second observer is refused"
    );
    f.fund(1, "@alice:hs", "10.00");
    f.fund(2, "@alice:hs", "5.00");
    // Reads alone write no record, so they are not commits.
    f.balances("@alice:hs", "EUR");
    let seen = seen.lock().clone();
    assert_eq!(seen, vec![1, 1], "one batch per blocking transfer");
}

/// Issue 15: a head anchor that cannot be written (here `/dev/full`, then a directory in its
/// place) does not stop the ledger: every batch is answered, the failures are counted, and
/// once the file can be written again the anchor catches up and verify and reopen pass.
#[test]
fn a_failing_anchor_write_does_not_stop_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = dir.path().join("ledger").join(storage::ANCHOR_FILE);
    std::fs::create_dir_all(anchor.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/dev/full", &anchor).unwrap();
    let clock = ManualClock::new(T0_MS);
    let open = || open_manual(dir.path(), &settings(), &clock).blocking();
    let ledger = open();
    let eur = |value: &str| {
        ledger
            .ledger()
            .parse_amount(Decimal::from_str(value).unwrap(), "EUR")
            .unwrap()
    };
    let send = |id: u128, debit: Owner, credit: Owner, value: &str| {
        ledger.create_transfer(TransferRequest {
            reference: 0,
            id: TransferId(id),
            debit,
            credit,
            amount: eur(value),
            memo: vec![],
        })
    };
    send(1, Owner::Issuer, user("alice"), "10.00").unwrap();
    send(2, user("alice"), user("bob"), "1.00").unwrap();
    let failures = ledger.ledger().alarms().anchor_write_failures;
    assert!(failures >= 2, "{failures}");
    std::fs::remove_file(&anchor).unwrap();
    std::fs::create_dir(&anchor).unwrap();
    send(3, user("alice"), user("bob"), "1.00").unwrap();
    assert_eq!(ledger.ledger().alarms().anchor_write_failures, failures + 1);
    std::fs::remove_dir(&anchor).unwrap();
    send(4, user("alice"), user("bob"), "1.00").unwrap();
    send(5, user("alice"), user("bob"), "1.00").unwrap();
    assert_eq!(ledger.ledger().alarms().anchor_write_failures, failures + 1);
    assert_eq!(ledger.verify_with_memory().unwrap().transfers, 5);
    drop(ledger);
    let ledger = open();
    assert_eq!(ledger.verify_with_memory().unwrap().transfers, 5);
    assert_eq!(ledger.ledger().alarms(), LedgerAlarms::default());
    let bob = AccountId {
        owner: user("bob"),
        currency: CurrencyCode::new("EUR").unwrap(),
    };
    let bob = ledger.account(&bob).unwrap().unwrap();
    assert_eq!(bob.balances.available_minor(), 400);
}

/// Issue 15: a jump of the system clock (a day ahead, then set right again) is neither written
/// into the journal nor freezes ledger time: ledger time follows the monotonic clock while the
/// clock disagrees with it, a pending transfer does not expire early, and the refusal is
/// counted.
#[test]
fn a_clock_jump_is_not_written_and_does_not_freeze_ledger_time() {
    let dir = tempfile::tempdir().unwrap();
    let wall = ManualClock::new(T0_MS);
    let monotonic = ManualClock::new(0);
    let options = LedgerOptions {
        monotonic: Some(Arc::new(monotonic.clone())),
        ..LedgerOptions::default()
    };
    let ledger =
        Ledger::open_with_options(dir.path(), &settings(), Arc::new(wall.clone()), options)
            .unwrap()
            .blocking();
    let eur = |value: &str| {
        ledger
            .ledger()
            .parse_amount(Decimal::from_str(value).unwrap(), "EUR")
            .unwrap()
    };
    let request = |id: u128, debit: Owner, value: &str| TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit,
        credit: user("bob"),
        amount: eur(value),
        memo: vec![],
    };
    ledger
        .create_transfer(request(1, Owner::Issuer, "100.00"))
        .unwrap();
    let pending = ledger
        .create_pending(request(3, Owner::Issuer, "40.00"), 60_000)
        .unwrap();
    assert_eq!(pending.deadline_ms, Some(T0_MS + 60_000));

    // The system clock jumps a day ahead while one second passes.
    monotonic.advance_ms(1_000);
    wall.advance_ms(DAY_MS);
    let t = ledger
        .create_transfer(request(4, Owner::Issuer, "1.00"))
        .unwrap();
    assert_eq!(t.created_ms, T0_MS + 1_000, "ledger time did not jump");
    assert!(ledger.expire_due().unwrap().is_empty());
    assert_eq!(
        ledger.transfer(TransferId(3)).unwrap().unwrap().state,
        TransferState::Pending,
        "the jump did not expire the pending transfer"
    );
    assert!(ledger.ledger().alarms().clock_readings_refused >= 1);

    // Set right again: ledger time goes on from where it was, not frozen at the jump.
    monotonic.advance_ms(1_000);
    wall.set_ms(T0_MS + 2_000);
    let t = ledger
        .create_transfer(request(5, Owner::Issuer, "1.00"))
        .unwrap();
    assert_eq!(t.created_ms, T0_MS + 2_000);
    let refused = ledger.ledger().alarms().clock_readings_refused;
    // Expiry follows ledger time.
    monotonic.advance_ms(58_000);
    wall.advance_ms(58_000);
    // (The idle writer may have expired it first; either way it is expired now.)
    let _ = ledger.expire_due().unwrap();
    let expired = ledger.transfer(TransferId(3)).unwrap().unwrap();
    assert_eq!(expired.state, TransferState::Expired);
    assert_eq!(expired.ended_ms, Some(T0_MS + 60_000));
    assert_eq!(ledger.ledger().alarms().clock_readings_refused, refused);
    let latest_ms = ledger
        .ledger()
        .export()
        .map(|e| e.unwrap().time_ms)
        .max()
        .unwrap();
    assert_eq!(latest_ms, T0_MS + 60_000, "no record carries the jump");
    ledger.verify_with_memory().unwrap();
}

/// A ledger in `dir` with `clock` as both clocks, writing no checkpoint at close (so a
/// reopen is as after a crash: from the last checkpoint and the records after it).
fn open_no_close_checkpoint(dir: &Path, clock: &ManualClock) -> Ledger {
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        checkpoint_at_close: false,
        ..LedgerOptions::default()
    };
    Ledger::open_with_options(dir, &settings(), Arc::new(clock.clone()), options).unwrap()
}

/// Activity of every kind, ids from `base`: single and pending transfers (posted in full and
/// in part, voided, expired, still pending), refunds, recorded failures, a freeze, and debits
/// in the daily window.
fn activity(ledger: &BlockingLedger, clock: &ManualClock, base: u128) {
    let l = ledger.ledger();
    let eur = |v: &str| {
        l.parse_amount(Decimal::from_str(v).unwrap(), "EUR")
            .unwrap()
    };
    let req = |id: u128, d: Owner, c: Owner, v: &str| TransferRequest {
        reference: 0,
        id: TransferId(base + id),
        debit: d,
        credit: c,
        amount: eur(v),
        memo: format!("memo {id}").into_bytes(),
    };
    ledger
        .create_transfer(req(1, Owner::Issuer, user("alice"), "100.00"))
        .unwrap();
    ledger
        .create_transfer(req(2, user("alice"), user("bob"), "10.00"))
        .unwrap();
    ledger
        .refund(
            TransferId(base + 3),
            TransferId(base + 2),
            eur("4.00"),
            vec![],
        )
        .unwrap();
    for (id, timeout_ms) in [
        (4, 60_000),
        (5, 60_000),
        (6, 60_000),
        (7, 1_000),
        (8, 3_600_000),
    ] {
        ledger
            .create_pending(req(id, user("alice"), user("carol"), "1.50"), timeout_ms)
            .unwrap();
    }
    ledger.post(TransferId(base + 4), None).unwrap();
    ledger
        .post(TransferId(base + 5), Some(eur("0.50")))
        .unwrap();
    ledger.void(TransferId(base + 6)).unwrap();
    // Recorded (transient) failures.
    let _ = ledger.create_transfer(req(9, user("bob"), user("alice"), "999.00"));
    let _ = ledger.refund(
        TransferId(base + 10),
        TransferId(base + 2),
        eur("7.00"),
        vec![],
    );
    let dave = AccountId {
        owner: user("dave"),
        currency: CurrencyCode::new("EUR").unwrap(),
    };
    ledger.freeze(dave, FreezeMode::Debits).unwrap();
    clock.advance_ms(2_000);
    ledger.expire_due().unwrap();
}

/// Issue 15: opening from a checkpoint and the records after it gives exactly the state the
/// whole journal gives (live `verify` compares every part of the two, daily windows and
/// histories included), and the next open after a clean close replays nothing.
#[test]
fn reopening_from_a_checkpoint_and_later_records_is_the_full_replay() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let ledger = open_no_close_checkpoint(dir.path(), &clock).blocking();
    activity(&ledger, &clock, 100);
    let seq = block_on(ledger.ledger().checkpoint()).unwrap();
    assert!(seq > 1);
    // After the checkpoint: more of everything, including ends of transfers created before
    // it and a day passing (the daily window prunes).
    ledger.post(TransferId(108), None).unwrap();
    clock.advance_ms(DAY_MS);
    activity(&ledger, &clock, 200);
    let before = (
        ledger.balances(&user("alice")).unwrap(),
        ledger.pending_transfers().unwrap(),
    );
    drop(ledger);

    let opened = open_no_close_checkpoint(dir.path(), &clock);
    assert_eq!(opened.opened_from_checkpoint(), Some(seq));
    assert_eq!(opened.alarms().checkpoint_fallbacks, 0);
    let ledger = opened.blocking();
    drop(opened);
    assert_eq!(
        (
            ledger.balances(&user("alice")).unwrap(),
            ledger.pending_transfers().unwrap()
        ),
        before
    );
    ledger.verify_with_memory().unwrap();
    // The state goes on the same way: a refund of a transfer from before the checkpoint.
    ledger
        .refund(
            TransferId(300),
            TransferId(102),
            ledger.ledger().amount_from_minor(600, "EUR").unwrap(),
            vec![],
        )
        .unwrap();
    assert_eq!(
        rejected(ledger.refund(
            TransferId(301),
            TransferId(102),
            ledger.ledger().amount_from_minor(1, "EUR").unwrap(),
            vec![],
        )),
        TransferError::RefundExceedsRemaining
    );
    ledger.verify_with_memory().unwrap();
    drop(ledger);

    // A clean close checkpoints the head: nothing is replayed.
    let ledger = open_manual(dir.path(), &settings(), &clock);
    let head = block_on(ledger.durable_seq()).unwrap();
    drop(ledger);
    let ledger = open_manual(dir.path(), &settings(), &clock);
    assert_eq!(ledger.opened_from_checkpoint(), Some(head));
    ledger.blocking().verify_with_memory().unwrap();
}

/// Issue 15: a checkpoint that is torn, altered, or from another journal is never trusted:
/// open replays the whole journal instead (and counts it), `verify` names the checkpoint, and
/// the next checkpoint written replaces it.
#[test]
fn a_torn_or_foreign_checkpoint_is_detected_and_the_whole_journal_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let ledger = open_no_close_checkpoint(dir.path(), &clock).blocking();
    activity(&ledger, &clock, 100);
    block_on(ledger.ledger().checkpoint()).unwrap();
    activity(&ledger, &clock, 200);
    let alice = ledger.balances(&user("alice")).unwrap();
    drop(ledger);
    let path = dir.path().join("ledger").join(storage::CHECKPOINT_FILE);
    let good = std::fs::read(&path).unwrap();

    // Another ledger's checkpoint of the same record number and time, whose accounts are
    // the same too (the records after it would apply): well-formed, wrong journal.
    let other = tempfile::tempdir().unwrap();
    let other_clock = ManualClock::new(T0_MS);
    let ledger = open_no_close_checkpoint(other.path(), &other_clock).blocking();
    activity(&ledger, &other_clock, 500);
    let seq = block_on(ledger.ledger().checkpoint()).unwrap();
    drop(ledger);
    let foreign =
        std::fs::read(other.path().join("ledger").join(storage::CHECKPOINT_FILE)).unwrap();
    assert_eq!(&foreign[9..17], &good[9..17], "same record number {seq}");
    assert_eq!(&foreign[49..57], &good[49..57], "same time");

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let cases: [(&str, Vec<u8>); 4] = [
        ("torn", good[..good.len() / 3].to_vec()),
        ("flipped", flipped),
        ("empty", Vec::new()),
        ("foreign", foreign),
    ];
    for (name, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let err = verify_dir(dir.path()).expect_err(name);
        assert!(err.to_string().contains("checkpoint"), "{name}: {err}");
        let ledger = open_no_close_checkpoint(dir.path(), &clock);
        assert_eq!(ledger.opened_from_checkpoint(), None, "{name}");
        assert_eq!(ledger.alarms().checkpoint_fallbacks, 1, "{name}");
        let b = ledger.blocking();
        assert_eq!(b.balances(&user("alice")).unwrap(), alice, "{name}");
        drop(b);
        drop(ledger);
    }
    // The first batch after a fallback writes a good checkpoint again.
    let ledger = open_no_close_checkpoint(dir.path(), &clock).blocking();
    ledger
        .create_transfer(TransferRequest {
            reference: 0,
            id: TransferId(900),
            debit: Owner::Issuer,
            credit: user("erin"),
            amount: ledger.ledger().amount_from_minor(1, "EUR").unwrap(),
            memo: vec![],
        })
        .unwrap();
    ledger.verify_with_memory().unwrap();
    let head = block_on(ledger.ledger().durable_seq()).unwrap();
    drop(ledger);
    verify_dir(dir.path()).unwrap();
    let ledger = open_no_close_checkpoint(dir.path(), &clock);
    assert_eq!(ledger.opened_from_checkpoint(), Some(head));
    assert_eq!(ledger.alarms().checkpoint_fallbacks, 0);
}

/// `verify` replays the whole journal from record 1 and compares the checkpoint with the
/// replay at its record: a checkpoint that is well-formed (its own hash recomputed) but holds
/// another state is caught, and open does not start from it either.
#[test]
fn verify_catches_a_rehashed_checkpoint_with_another_state() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let ledger = open_no_close_checkpoint(dir.path(), &clock).blocking();
    activity(&ledger, &clock, 100);
    block_on(ledger.ledger().checkpoint()).unwrap();
    drop(ledger);
    let path = dir.path().join("ledger").join(storage::CHECKPOINT_FILE);
    let good = std::fs::read(&path).unwrap();
    // The decoded state with one balance changed, encoded again with a valid hash.
    let mut cp = State::decode_checkpoint(&good).unwrap();
    let alice = AccountId {
        owner: user("alice"),
        currency: CurrencyCode::new("EUR").unwrap(),
    };
    cp.state.bump_credit_for_test(&alice, 1);
    let forged = cp.state.encode_checkpoint(cp.head, cp.time_ms);
    std::fs::write(&path, &forged).unwrap();
    let err = verify_dir(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("is not the replay of the journal"),
        "{err}"
    );
}

/// Issue 15 (for issue 13's refunds): a refund named by its accounts, single-phase or
/// pending, capped by what the original posted; each refusal has its own code and spends the
/// id; exactly the cap is accepted; the refunds of a transfer are found by reference.
#[test]
fn linked_refunds_are_capped_by_the_original() {
    use TransferError as E;
    let f = open();
    f.fund(1, "alice", "100.00");
    f.send(2, user("alice"), user("shop"), "30.00").unwrap();
    let back = |id: u128, value: &str| f.request(id, user("shop"), user("alice"), value, "EUR");
    let refund = |request: TransferRequest, timeout_ms: Option<u64>| {
        f.ledger
            .create_refund_result(request, TransferId(2), timeout_ms)
            .map(CreateResult::into_transfer)
    };
    // A pending refund (the payee's PIN step-up between reserve and post) reserves its part
    // of the cap at once.
    let pending = refund(back(10, "20.00"), Some(60_000)).unwrap();
    assert_eq!(pending.state, TransferState::Pending);
    assert_eq!(pending.refund_of, Some(TransferId(2)));
    let original = f.ledger.transfer(TransferId(2)).unwrap().unwrap();
    assert_eq!(
        (original.refunded_minor, original.refund_pending_minor),
        (0, 2_000)
    );
    assert_eq!(
        rejected(refund(back(11, "10.01"), None)),
        E::RefundExceedsRemaining
    );
    // The id is spent: the same refund later (with room for it) still fails.
    f.ledger.void(TransferId(10)).unwrap();
    assert_eq!(
        rejected(refund(back(11, "10.01"), None)),
        E::RefundExceedsRemaining
    );
    // Voided, the reservation is given back; posted in part, what it posted is refunded.
    let pending = refund(back(12, "25.00"), Some(60_000)).unwrap();
    assert_eq!(pending.amount_minor, 2_500);
    f.ledger
        .post(TransferId(12), Some(f.amount("5.00", "EUR")))
        .unwrap();
    let original = f.ledger.transfer(TransferId(2)).unwrap().unwrap();
    assert_eq!(
        (original.refunded_minor, original.refund_pending_minor),
        (500, 0)
    );
    // Exactly the rest (30.00 - 5.00) is accepted, then nothing more (by `refund` either).
    let done = refund(back(13, "25.00"), None).unwrap();
    assert_eq!(
        done.kind,
        TransferKind::Refund {
            original: TransferId(2)
        }
    );
    assert_eq!(
        rejected(f.ledger.refund(
            TransferId(14),
            TransferId(2),
            f.amount("5.00", "EUR"),
            vec![]
        )),
        E::RefundExceedsRemaining
    );
    f.ledger
        .refund(
            TransferId(15),
            TransferId(2),
            f.amount("5.00", "EUR"),
            vec![],
        )
        .map(|_| ())
        .expect_err("over the cap");
    assert_eq!(
        f.ledger
            .transfer(TransferId(2))
            .unwrap()
            .unwrap()
            .refunded_minor,
        3_000
    );
    f.send(16, user("alice"), user("shop"), "10.00").unwrap();
    f.ledger
        .refund(
            TransferId(17),
            TransferId(16),
            f.amount("10.00", "EUR"),
            vec![],
        )
        .unwrap();
    assert_eq!(
        f.ledger
            .transfer(TransferId(16))
            .unwrap()
            .unwrap()
            .refunded_minor,
        1_000,
        "exactly what was posted"
    );
    // Retries answer the original, and say so.
    assert!(f
        .ledger
        .create_refund_result(back(13, "25.00"), TransferId(2), None)
        .unwrap()
        .exists());
    assert_eq!(
        rejected(
            f.ledger
                .create_refund_result(back(13, "25.00"), TransferId(16), None)
                .map(CreateResult::into_transfer)
        ),
        E::ExistsWithDifferentOriginal
    );

    // Each refusal, with its code.
    f.send(20, user("alice"), user("shop"), "10.00").unwrap();
    let to20 = |id: u128, d: &str, c: &str, timeout_ms: Option<u64>, original: u128| {
        f.ledger
            .create_refund_result(
                f.request(id, user(d), user(c), "1.00", "EUR"),
                TransferId(original),
                timeout_ms,
            )
            .map(CreateResult::into_transfer)
    };
    assert_eq!(
        rejected(to20(21, "shop", "alice", None, 99)),
        E::OriginalTransferNotFound
    );
    assert_eq!(
        rejected(to20(22, "alice", "shop", None, 20)),
        E::RefundAccountsMismatch,
        "not reversed"
    );
    assert_eq!(
        rejected(to20(23, "shop", "carol", Some(60_000), 20)),
        E::RefundAccountsMismatch,
        "someone else paid back"
    );
    f.ledger
        .create_pending(
            f.request(24, user("alice"), user("shop"), "5.00", "EUR"),
            60_000,
        )
        .unwrap();
    assert_eq!(
        rejected(to20(25, "shop", "alice", None, 24)),
        E::OriginalTransferNotRefundable,
        "pending, not posted"
    );
    f.ledger.void(TransferId(24)).unwrap();
    assert_eq!(
        rejected(to20(26, "shop", "alice", Some(60_000), 24)),
        E::OriginalTransferNotRefundable,
        "voided"
    );
    to20(27, "shop", "alice", Some(60_000), 20).unwrap();
    f.ledger.post(TransferId(27), None).unwrap();
    assert_eq!(
        rejected(to20(28, "alice", "shop", None, 27)),
        E::OriginalTransferIsRefund,
        "a posted pending refund is a refund"
    );
    assert_eq!(
        rejected(to20(29, "alice", "shop", None, 13)),
        E::OriginalTransferIsRefund
    );
    let yen = TransferRequest {
        reference: 0,
        amount: f.amount("1", "JPY"),
        ..f.request(30, user("shop"), user("alice"), "1.00", "EUR")
    };
    assert_eq!(
        rejected(
            f.ledger
                .create_refund_result(yen, TransferId(20), None)
                .map(CreateResult::into_transfer)
        ),
        E::CurrencyMismatch
    );
    // Recorded: a retry of a refused refund answers the same refusal.
    assert_eq!(
        rejected(to20(22, "alice", "shop", None, 20)),
        E::RefundAccountsMismatch
    );

    // By reference: the refunds of a transfer, oldest first, in every state.
    let ids = |original: u128| -> Vec<(u128, TransferState)> {
        f.ledger
            .refunds_of(TransferId(original))
            .unwrap()
            .iter()
            .map(|t| (t.id.0, t.state))
            .collect()
    };
    assert_eq!(
        ids(2),
        vec![
            (10, TransferState::Voided),
            (12, TransferState::Posted { amount_minor: 500 }),
            (
                13,
                TransferState::Posted {
                    amount_minor: 2_500
                }
            ),
        ]
    );
    assert_eq!(
        ids(20),
        vec![(27, TransferState::Posted { amount_minor: 100 })]
    );
    assert!(ids(99).is_empty() && ids(16).len() == 1);
    f.ledger.verify_with_memory().unwrap();
}

/// A pending refund that expires gives its reservation back, also across a reopen from a
/// checkpoint taken while it was pending.
#[test]
fn an_expired_pending_refund_gives_the_cap_back_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let ledger = open_no_close_checkpoint(dir.path(), &clock).blocking();
    let currencies = Currencies::from_settings(&settings()).unwrap();
    let eur = |v: &str| {
        currencies
            .parse(Decimal::from_str(v).unwrap(), "EUR")
            .unwrap()
    };
    let req = |id: u128, d: &str, c: &str, v: &str| TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit: user(d),
        credit: user(c),
        amount: eur(v),
        memo: vec![],
    };
    ledger
        .create_transfer(TransferRequest {
            reference: 0,
            debit: Owner::Issuer,
            ..req(1, "x", "alice", "50.00")
        })
        .unwrap();
    ledger
        .create_transfer(req(2, "alice", "shop", "8.00"))
        .unwrap();
    ledger
        .create_refund_result(req(3, "shop", "alice", "8.00"), TransferId(2), Some(1_000))
        .unwrap();
    block_on(ledger.ledger().checkpoint()).unwrap();
    drop(ledger);
    let opened = open_no_close_checkpoint(dir.path(), &clock);
    assert!(opened.opened_from_checkpoint().is_some());
    let ledger = opened.blocking();
    drop(opened);
    let t = ledger.transfer(TransferId(2)).unwrap().unwrap();
    assert_eq!(t.refund_pending_minor, 800);
    assert_eq!(
        rejected(
            ledger
                .create_refund_result(req(4, "shop", "alice", "0.01"), TransferId(2), None)
                .map(CreateResult::into_transfer)
        ),
        TransferError::RefundExceedsRemaining
    );
    clock.advance_ms(1_000);
    ledger.expire_due().unwrap();
    let t = ledger.transfer(TransferId(2)).unwrap().unwrap();
    assert_eq!((t.refunded_minor, t.refund_pending_minor), (0, 0));
    ledger
        .create_refund_result(req(5, "shop", "alice", "8.00"), TransferId(2), None)
        .unwrap();
    ledger.verify_with_memory().unwrap();
}

/// Checkpoints come by themselves as entries accumulate (written off the writer thread), and
/// the last one written before a crash-like close is where the next open starts.
#[test]
fn checkpoints_are_written_as_entries_accumulate() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        checkpoint_at_close: false,
        checkpoint_entries_min: 10,
        ..LedgerOptions::default()
    };
    let open = || {
        Ledger::open_with_options(
            dir.path(),
            &settings(),
            Arc::new(clock.clone()),
            options.clone(),
        )
        .unwrap()
    };
    let ledger = open().blocking();
    for i in 1..=60u128 {
        ledger
            .create_transfer(TransferRequest {
                reference: 0,
                id: TransferId(i),
                debit: Owner::Issuer,
                credit: user(&format!("u{}", i % 7)),
                amount: ledger.ledger().amount_from_minor(100, "EUR").unwrap(),
                memo: vec![],
            })
            .unwrap();
    }
    let head = block_on(ledger.ledger().durable_seq()).unwrap();
    drop(ledger);
    let ledger = open();
    let from = ledger
        .opened_from_checkpoint()
        .expect("a checkpoint was written");
    assert!(from > head / 2 && from <= head, "from {from}, head {head}");
    assert_eq!(ledger.alarms().checkpoint_fallbacks, 0);
    ledger.blocking().verify_with_memory().unwrap();
}

/// A journal that lost its end together with its head (and whose anchor lags) replays
/// cleanly on its own; a whole checkpoint of a later record is the evidence that records were
/// lost, and open refuses rather than fall back to the shorter history.
#[test]
fn a_checkpoint_beyond_the_journal_is_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let ledger = open_no_close_checkpoint(dir.path(), &clock).blocking();
    activity(&ledger, &clock, 100);
    let head = block_on(ledger.ledger().checkpoint()).unwrap();
    drop(ledger);
    let path = dir.path().join("ledger");
    // sled holds where the record is; its bytes (and hash) are in the journal files.
    let (_, before) = SledStorage::open(&path)
        .unwrap()
        .records(head - 1)
        .next()
        .unwrap()
        .unwrap();
    {
        // sled's threads let go of the lock a moment after the storage above is dropped.
        let db = crate::sled_open::open_waiting_for_lock(
            &sled::Config::new()
                .path(&path)
                .segment_size(storage::SEGMENT_BYTES),
        )
        .unwrap();
        let journal = db.open_tree(storage::JOURNAL_TREE).unwrap();
        journal.remove(SledStorage::record_key(head)).unwrap();
        let mut earlier = (head - 1).to_le_bytes().to_vec();
        earlier.extend_from_slice(&before[before.len() - 32..]);
        journal.insert(b"k", earlier.clone()).unwrap();
        db.flush().unwrap();
        std::fs::write(path.join(storage::ANCHOR_FILE), &earlier).unwrap();
    }
    let err = Ledger::open(dir.path(), &settings(), Arc::new(clock.clone())).unwrap_err();
    assert!(err.to_string().contains("records were lost"), "{err}");
    std::fs::remove_file(path.join(storage::CHECKPOINT_FILE)).unwrap();
    // Without the checkpoint, nothing tells: the shorter journal is consistent.
    Ledger::open(dir.path(), &settings(), Arc::new(clock.clone())).unwrap();
}

/// How many transfers the writer holds in memory now.
fn transfers_held(ledger: &BlockingLedger) -> usize {
    block_on(ledger.ledger().read(|state, _| state.transfers_held())).unwrap()
}

/// Issue 15 (memory flat in history): at a checkpoint the ended transfers are written out of
/// memory; after a reopen every path reads them back from disk: a lookup, an idempotent retry
/// (the same body: `Exists`; another: the difference), a history page spanning transfers on
/// disk and in memory, refunds of a transfer on disk (capped by it, `refunds_of`), and the
/// post of a pending transfer held across the spill. `verify` then checks the rows on disk
/// against the full replay. Before, every transfer stayed in memory (`transfers_held` was all
/// of them).
#[test]
fn transfers_on_disk_answer_lookups_retries_history_and_refunds_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let eur = |l: &BlockingLedger, v: &str| {
        l.ledger()
            .parse_amount(Decimal::from_str(v).unwrap(), "EUR")
            .unwrap()
    };
    let pay = |l: &BlockingLedger, id: u128, v: &str| TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit: user("alice"),
        credit: user("bob"),
        amount: eur(l, v),
        memo: format!("memo {id}").into_bytes(),
    };
    let mut created = Vec::new();
    {
        let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
        let fund = TransferRequest {
            reference: 0,
            id: TransferId(1),
            debit: Owner::Issuer,
            credit: user("alice"),
            amount: eur(&ledger, "1000.00"),
            memo: Vec::new(),
        };
        ledger.create_transfer(fund).unwrap();
        for id in 10..20 {
            created.push(ledger.create_transfer(pay(&ledger, id, "1.00")).unwrap());
        }
        ledger
            .create_pending(pay(&ledger, 30, "5.00"), 3_600_000)
            .unwrap();
        block_on(ledger.ledger().checkpoint()).unwrap();
        assert_eq!(
            transfers_held(&ledger),
            1,
            "only the pending transfer stays"
        );
        // A lookup straight after the spill, before any reopen.
        assert_eq!(
            ledger.transfer(TransferId(12)).unwrap().as_ref(),
            Some(&created[2])
        );
    }
    let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
    assert!(ledger.ledger().opened_from_checkpoint().is_some());
    assert_eq!(transfers_held(&ledger), 1);

    // A lookup and idempotent retries of ids that are only on disk.
    assert_eq!(
        ledger.transfer(TransferId(12)).unwrap().as_ref(),
        Some(&created[2])
    );
    let retry = ledger
        .create_transfer_result(pay(&ledger, 12, "1.00"))
        .unwrap();
    assert!(retry.exists());
    assert_eq!(retry.transfer(), &created[2]);
    assert_eq!(
        rejected(ledger.create_transfer(pay(&ledger, 12, "2.00"))),
        TransferError::ExistsWithDifferentAmount
    );
    assert_eq!(
        rejected(ledger.create_pending(pay(&ledger, 13, "1.00"), 60_000)),
        TransferError::ExistsWithDifferentKind
    );
    assert_eq!(
        rejected(ledger.post(TransferId(14), None)),
        TransferError::PendingTransferNotPending
    );

    // New transfers in memory; a history page spans memory and disk, newest first.
    for id in 40..43 {
        ledger.create_transfer(pay(&ledger, id, "1.00")).unwrap();
    }
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = ledger.history(&user("alice"), cursor, 4).unwrap();
        ids.extend(page.transfers.iter().map(|t| t.id.0));
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    let mut expected: Vec<u128> = [1]
        .into_iter()
        .chain(10..20)
        .chain([30])
        .chain(40..43)
        .collect();
    expected.reverse();
    assert_eq!(ids, expected);

    // Refunds of a transfer on disk are capped by it and listed by reference.
    let refund = ledger
        .refund(
            TransferId(50),
            TransferId(11),
            eur(&ledger, "0.50"),
            Vec::new(),
        )
        .unwrap();
    assert_eq!(refund.refund_of, Some(TransferId(11)));
    let back = |id: u128, v: &str| TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit: user("bob"),
        credit: user("alice"),
        amount: eur(&ledger, v),
        memo: Vec::new(),
    };
    ledger
        .create_refund_result(back(51, "0.50"), TransferId(11), Some(60_000))
        .unwrap();
    assert!(matches!(
        ledger.create_refund_result(back(52, "0.01"), TransferId(11), None),
        Err(LedgerError::Rejected(TransferError::RefundExceedsRemaining))
    ));
    let original = ledger.transfer(TransferId(11)).unwrap().unwrap();
    assert_eq!(
        (original.refunded_minor, original.refund_pending_minor),
        (50, 50)
    );
    let refunds: Vec<u128> = ledger
        .refunds_of(TransferId(11))
        .unwrap()
        .iter()
        .map(|t| t.id.0)
        .collect();
    assert_eq!(refunds, vec![50, 51], "the refused 52 is no refund");

    // The pending transfer held across the spill can still be posted.
    let posted = ledger.post(TransferId(30), None).unwrap();
    assert_eq!(posted.state, TransferState::Posted { amount_minor: 500 });
    block_on(ledger.ledger().checkpoint()).unwrap();
    // Still pending: the linked refund 51; everything else went to disk.
    assert_eq!(transfers_held(&ledger), 1);
    ledger.verify_with_memory().unwrap();
    ledger.verify().unwrap();
    drop(ledger);
    let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
    let original = ledger.transfer(TransferId(11)).unwrap().unwrap();
    assert_eq!(
        (original.refunded_minor, original.refund_pending_minor),
        (50, 50)
    );
    assert_eq!(
        ledger.transfer(TransferId(30)).unwrap().unwrap().state,
        posted.state
    );
    ledger.verify_with_memory().unwrap();
    drop(ledger);
    verify_dir(dir.path()).unwrap();
}

/// Transfers 1-3, 3.00 EUR each from the issuer to alice, in a ledger at `dir` closed (so
/// their rows are on disk) and verified clean: the start of the tests that alter what is
/// on disk and expect `verify` to notice.
pub(super) fn three_transfers_to_alice_on_disk(dir: &std::path::Path) {
    let clock = ManualClock::new(T0_MS);
    {
        let ledger = open_manual(dir, &settings(), &clock).blocking();
        let eur = ledger
            .ledger()
            .parse_amount(Decimal::from_str("3.00").unwrap(), "EUR")
            .unwrap();
        for id in 1..4 {
            ledger
                .create_transfer(TransferRequest {
                    reference: 0,
                    id: TransferId(id),
                    debit: Owner::Issuer,
                    credit: user("alice"),
                    amount: eur,
                    memo: Vec::new(),
                })
                .unwrap();
        }
    }
    verify_dir(dir).unwrap();
}

/// Issue 15: a row on disk that is not the journal's (altered after it was written) fails
/// `verify`, which checks the rows the checkpoint leaves out against the full replay.
#[test]
fn verify_catches_a_row_on_disk_that_is_not_the_journals() {
    let dir = tempfile::tempdir().unwrap();
    three_transfers_to_alice_on_disk(dir.path());
    {
        let storage = SledStorage::open(&dir.path().join("ledger")).unwrap();
        let mut row = storage.transfer_row(1).unwrap().expect("written at close");
        let last = row.len() - 1;
        row[last] ^= 1;
        storage
            .put_transfer_rows(&TransferRows::from_iter([TransferRow {
                idx: 1,
                id: 2,
                accounts: [0, 1],
                bytes: &row,
                reference: 0,
            }]))
            .unwrap();
    }
    let error = verify_dir(dir.path()).unwrap_err().to_string();
    assert!(error.contains("on disk is not the journal's"), "{error}");
}

/// After an upgrade, before the first reopen: the data directory holds the last checkpoint the
/// previous version wrote (format 1, the whole state, no rows on disk; or format 2, exact
/// daily windows, rows on disk). `verify` checks its hash and its record, reports it as an
/// old format it did not compare, and still checks the whole chain; it never calls it
/// corrupt. Opening replays the journal (no fallback alarm) and the next checkpoint is in
/// the current format.
#[test]
fn verify_and_open_accept_a_checkpoint_in_the_previous_format() {
    for version in [1u8, 2] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0_MS);
        let ledger = open_no_close_checkpoint(dir.path(), &clock).blocking();
        activity(&ledger, &clock, 100);
        block_on(ledger.ledger().checkpoint()).unwrap();
        let alice = ledger.balances(&user("alice")).unwrap();
        drop(ledger);
        let ledger_dir = dir.path().join("ledger");
        let path = ledger_dir.join(storage::CHECKPOINT_FILE);
        let current = std::fs::read(&path).unwrap();
        // magic | version | seq | record hash | time_ms | state | blake3. Its state is never
        // decoded by this version, so only the header is the old writer's byte for byte; the
        // state part is this version's (after the spill point, for format 1).
        let keep = if version == 1 { 57 } else { 61 };
        let mut old = current[..keep].to_vec();
        old[8] = version;
        old.extend_from_slice(crate::ledger::state::checkpoint_state(&current)[61..].as_ref());
        let hash = *blake3::hash(&old).as_bytes();
        old.extend_from_slice(&hash);
        std::fs::write(&path, &old).unwrap();
        if version == 1 {
            std::fs::remove_dir_all(ledger_dir.join(crate::ledger::segments::ROWS_DIR)).unwrap();
        }
        let seq = u64::from_le_bytes(current[9..17].try_into().unwrap());

        let report = verify_dir(dir.path()).unwrap();
        assert_eq!(
            report.checkpoint,
            CheckpointCheck::OldFormat { seq, version }
        );

        // Not an old format: an unknown version with a valid hash is refused.
        let mut unknown = old.clone();
        unknown[8] = 9;
        let n = unknown.len() - 32;
        let hash = *blake3::hash(&unknown[..n]).as_bytes();
        unknown[n..].copy_from_slice(&hash);
        std::fs::write(&path, &unknown).unwrap();
        let err = verify_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unknown format version 9"), "{err}");
        std::fs::write(&path, &old).unwrap();

        let ledger = open_no_close_checkpoint(dir.path(), &clock);
        assert_eq!(ledger.opened_from_checkpoint(), None);
        assert_eq!(ledger.alarms().checkpoint_fallbacks, 0);
        let b = ledger.blocking();
        assert_eq!(b.balances(&user("alice")).unwrap(), alice);
        block_on(b.ledger().checkpoint()).unwrap();
        drop(b);
        drop(ledger);
        assert!(matches!(
            verify_dir(dir.path()).unwrap().checkpoint,
            CheckpointCheck::Compared { .. }
        ));
        let ledger = open_no_close_checkpoint(dir.path(), &clock);
        assert!(ledger.opened_from_checkpoint().is_some());
        assert_eq!(ledger.alarms().checkpoint_fallbacks, 0);
    }
}

/// Issue 15: `verify` reads each segment of rows whole, once, and checks its hash: a segment
/// altered where no lookup reads (here its hash itself) fails verify. (The lookups it used
/// before never read a segment's hash.)
#[test]
fn verify_reads_each_segment_whole_and_checks_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    {
        let ledger = open_manual(dir.path(), &settings(), &clock).blocking();
        activity(&ledger, &clock, 100);
    }
    verify_dir(dir.path()).unwrap();
    let rows = dir
        .path()
        .join("ledger")
        .join(crate::ledger::segments::ROWS_DIR);
    let mut segments: Vec<_> = std::fs::read_dir(&rows)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let segment = segments.last().expect("a segment written at close");
    let mut bytes = std::fs::read(segment).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(segment, &bytes).unwrap();
    let error = verify_dir(dir.path()).unwrap_err().to_string();
    assert!(error.contains("segment hash does not match"), "{error}");
}

/// A storage whose reads of transfer rows fail or return corrupt bytes on demand; everything
/// else (and every write) goes to an in-memory storage that never loses power.
struct FlakyRows {
    inner: crate::ledger::powercut::PowerCutStorage,
    /// [`ROWS_OK`], [`ROWS_FAIL`] or [`ROWS_CORRUPT`].
    mode: std::sync::atomic::AtomicU8,
}

const ROWS_OK: u8 = 0;
const ROWS_FAIL: u8 = 1;
const ROWS_CORRUPT: u8 = 2;

impl FlakyRows {
    fn new() -> Self {
        Self {
            inner: crate::ledger::powercut::PowerCutStorage::new(Default::default(), None, 0),
            mode: std::sync::atomic::AtomicU8::new(ROWS_OK),
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
    }

    fn mode(&self) -> u8 {
        self.mode.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Storage for FlakyRows {
    fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError> {
        self.inner.append(seq, record, head)
    }
    fn head(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.head()
    }
    fn records(&self, from_seq: u64) -> Box<dyn Iterator<Item = storage::StoredRecord> + Send> {
        self.inner.records(from_seq)
    }
    fn anchor(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.anchor()
    }
    fn keeps_checkpoints(&self) -> bool {
        true
    }
    fn put_checkpoint(&self, bytes: &[u8]) -> Result<(), StorageError> {
        self.inner.put_checkpoint(bytes)
    }
    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.checkpoint()
    }
    fn keeps_transfer_rows(&self) -> bool {
        true
    }
    fn put_transfer_rows(&self, rows: &TransferRows) -> Result<(), StorageError> {
        self.inner.put_transfer_rows(rows)
    }
    fn transfer_row(&self, idx: u32) -> Result<Option<Vec<u8>>, StorageError> {
        match self.mode() {
            ROWS_FAIL => Err(StorageError::Backend("injected read failure".into())),
            ROWS_CORRUPT => Ok(self.inner.transfer_row(idx)?.map(|mut row| {
                // A transfer state no row has.
                row.truncate(20);
                row.extend_from_slice(&[0xff; 8]);
                row
            })),
            _ => self.inner.transfer_row(idx),
        }
    }
    fn transfer_row_idx(&self, id: u128) -> Result<Option<u32>, StorageError> {
        match self.mode() {
            ROWS_FAIL => Err(StorageError::Backend("injected read failure".into())),
            _ => self.inner.transfer_row_idx(id),
        }
    }
    fn account_history(
        &self,
        account: u32,
        before: u32,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        match self.mode() {
            ROWS_FAIL => Err(StorageError::Backend("injected read failure".into())),
            _ => self.inner.account_history(account, before, limit),
        }
    }
    fn account_history_range(
        &self,
        account: u32,
        span: std::ops::Range<u32>,
        order: crate::ledger::HistoryOrder,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        match self.mode() {
            ROWS_FAIL => Err(StorageError::Backend("injected read failure".into())),
            _ => self
                .inner
                .account_history_range(account, span, order, limit),
        }
    }
    fn transfer_rows_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        match self.mode() {
            ROWS_FAIL => Err(StorageError::Backend("injected read failure".into())),
            _ => self.inner.transfer_rows_by_reference(reference, limit),
        }
    }

    fn scan_transfer_rows(&self, visit: &mut dyn FnMut(RowEntry<'_>)) -> Result<(), StorageError> {
        self.inner.scan_transfer_rows(visit)
    }
}

fn storage_failure<T: std::fmt::Debug>(result: Result<T, LedgerError>) -> String {
    match result {
        Err(LedgerError::Storage(e)) => e.to_string(),
        other => panic!("expected a storage error, got {other:?}"),
    }
}

/// Issue 15: a row of a transfer on disk that cannot be read (the storage fails, or returns
/// bytes that do not decode) fails the one call that needed it with `LedgerError::Storage`,
/// and nothing of that call is applied; the writer goes on with other transfers, and once
/// the rows read again every call works, the refused ones included, and `verify` is clean.
/// A checkpoint that needs an unreadable row (an ended pending refund names its original)
/// fails and is counted; an open that needs one fails with the error. Before, each of these
/// reads panicked the writer, and every later call was `Closed`.
#[test]
fn a_row_that_cannot_be_read_fails_its_call_alone() {
    let storage = Arc::new(FlakyRows::new());
    let clock = ManualClock::new(T0_MS);
    let open = |storage: &Arc<FlakyRows>| {
        let options = LedgerOptions {
            monotonic: Some(Arc::new(clock.clone())),
            checkpoint_at_close: false,
            ..LedgerOptions::default()
        };
        let currencies = Currencies::from_settings(&settings()).unwrap();
        Ledger::open_storage(
            storage.clone(),
            currencies,
            Arc::new(clock.clone()),
            options,
        )
    };
    let ledger = open(&storage).unwrap().blocking();
    let eur = |v: &str| {
        ledger
            .ledger()
            .parse_amount(Decimal::from_str(v).unwrap(), "EUR")
            .unwrap()
    };
    let pay = |id: u128, debit: &str, credit: &str, v: &str| TransferRequest {
        reference: 0,
        id: TransferId(id),
        debit: user(debit),
        credit: user(credit),
        amount: eur(v),
        memo: Vec::new(),
    };
    let fund = TransferRequest {
        reference: 0,
        debit: Owner::Issuer,
        ..pay(1, "x", "alice", "1000.00")
    };
    ledger.create_transfer(fund).unwrap();
    for id in 10..20 {
        ledger
            .create_transfer(pay(id, "alice", "bob", "1.00"))
            .unwrap();
    }
    ledger
        .create_pending(pay(30, "alice", "bob", "5.00"), 3_600_000)
        .unwrap();
    // A pending refund of a transfer about to go to disk: its answer names the original.
    ledger
        .create_refund_result(
            pay(31, "bob", "alice", "0.50"),
            TransferId(11),
            Some(3_600_000),
        )
        .unwrap();
    block_on(ledger.ledger().checkpoint()).unwrap();
    assert_eq!(
        transfers_held(&ledger),
        2,
        "the pending ones stay in memory"
    );
    let before = ledger.transfer(TransferId(12)).unwrap().unwrap();

    for mode in [ROWS_FAIL, ROWS_CORRUPT] {
        storage.set(mode);
        let error = storage_failure(ledger.transfer(TransferId(12)));
        assert!(error.contains("cannot"), "{error}");
        if mode == ROWS_CORRUPT {
            assert!(error.contains("corrupt"), "{error}");
        }
        storage_failure(ledger.create_transfer(pay(12, "alice", "bob", "1.00")));
        storage_failure(ledger.refund(TransferId(50), TransferId(11), eur("0.50"), Vec::new()));
        storage_failure(ledger.history(&user("alice"), None, 20));
        storage_failure(ledger.pending_transfers());
        storage_failure(ledger.refunds_of(TransferId(11)));
        // The post of a pending refund answers with its original's id, on disk: refused
        // before anything changed.
        storage_failure(ledger.post(TransferId(31), None));
        // The writer goes on: transfers that need no row from disk go through.
        let id = 60 + u128::from(mode);
        ledger
            .create_transfer(pay(id, "alice", "carol", "2.00"))
            .unwrap();
    }
    ledger.post(TransferId(30), None).unwrap();
    storage.set(ROWS_OK);
    assert_eq!(
        ledger
            .transfer(TransferId(31))
            .unwrap()
            .map(|t| (t.state, t.refund_of)),
        Some((TransferState::Pending, Some(TransferId(11)))),
        "the refused post changed nothing"
    );
    assert_eq!(ledger.transfer(TransferId(12)).unwrap().unwrap(), before);
    assert!(ledger
        .create_transfer_result(pay(12, "alice", "bob", "1.00"))
        .unwrap()
        .exists());
    ledger
        .refund(TransferId(50), TransferId(11), eur("0.25"), Vec::new())
        .unwrap();
    ledger.post(TransferId(31), None).unwrap();
    assert_eq!(ledger.refunds_of(TransferId(11)).unwrap().len(), 2);
    assert_eq!(
        ledger
            .history(&user("alice"), None, 50)
            .unwrap()
            .transfers
            .len(),
        16
    );
    ledger.verify_with_memory().unwrap();

    // The next spill writes the ended pending refund, whose row names its original (on
    // disk): that read fails, so does the checkpoint (counted), and nothing moves.
    storage.set(ROWS_FAIL);
    assert!(block_on(ledger.ledger().checkpoint()).is_err());
    assert_eq!(ledger.ledger().alarms().checkpoint_write_failures, 1);
    ledger
        .create_transfer(pay(70, "alice", "carol", "1.00"))
        .unwrap();
    storage.set(ROWS_OK);
    block_on(ledger.ledger().checkpoint()).unwrap();
    assert_eq!(transfers_held(&ledger), 0);
    ledger.verify_with_memory().unwrap();

    // A refund of a transfer on disk after the checkpoint: replaying it reads the original.
    ledger
        .refund(TransferId(71), TransferId(13), eur("0.10"), Vec::new())
        .unwrap();
    drop(ledger);
    storage.set(ROWS_FAIL);
    let error = open(&storage).map(|_| ()).unwrap_err().to_string();
    assert!(error.contains("injected read failure"), "{error}");
    storage.set(ROWS_OK);
    let ledger = open(&storage).unwrap().blocking();
    assert_eq!(
        ledger.transfer(TransferId(71)).unwrap().unwrap().refund_of,
        Some(TransferId(13))
    );
    ledger.verify_with_memory().unwrap();
}

mod batch;
mod history;
mod linked;
mod query;
mod reads;
