//! One power cut over the ledger and the payment store together (issue 15): the payment flow's
//! durable steps, driven in the order the real code makes them, lose power at one instant in
//! both stores; the process restarts over what survived and the homeserver delivers every
//! event again.
//!
//! What runs is the payment flow of `src/payments` reduced to its durable steps, each made
//! with the real store ([`PaymentStore`]), the real ledger (over the ledger's power-cut
//! [`PowerCutStorage`]) and the real core decisions (`start::decide`,
//! `challenge::open_payment`, `pin_answer::choose_challenge`, `after_pin::*`), applied in
//! `apply.rs`'s order (decision record, ledger, flow state, messages, event done):
//! - `!pay` (`on_pay`): its transfer or recorded decline looked up, `start::decide`, a refusal
//!   before the ledger (the payer's balance) or `create_pending` with the transfer id derived
//!   from the event and the payment memo, then the challenge stored and told;
//! - a PIN answering the challenge (`act_on_dm_pin`, `on_stepup_pin`, `authorise`): the event
//!   done already? the challenge chosen, the attempt counted before the comparison
//!   ([`check_pin_with`]), then the post (or, once the PIN locks, every open payment of the
//!   payer voided with its reason recorded first), the challenge removed, the event done;
//! - `!cancel`: every open payment of the sender voided (reason first), challenges removed;
//! - the outbox: the journal read from the cursor up to the durable head, each receipt told,
//!   then the cursor moved (as `Outbox::run`).
//!
//! The step-up proof (a JWT minted and redeemed in memory) and the messages' transport are
//! left out: neither is durable.
//!
//! The power: [`PowerCut::cut_after_points`] counts the payment store's durable flushes and
//! the ledger storage's writes as one sequence of power points; a run without a cut counts
//! them, and the cut run loses power after a number of points drawn from that count. Every
//! acknowledgement (a message that went out, an event marked done, a receipt, the outbox
//! cursor moved, a PIN result) is recorded as made. After the cut the test checks that
//! everything acknowledged survived as acknowledged (the PIN attempt counter never older than
//! the last one told), that the ledger verifies and money is conserved; then every event is
//! handled again and the outbox drained, and the end state must be the uncut run's: the same
//! transfers in the same states, balances, PIN records byte for byte, event decisions, open
//! challenges, and the same receipts told (a receipt told twice carries the same transaction
//! id: the homeserver shows it once). Nothing acknowledged lost, no event paying twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};

use crate::clock::ManualClock;
use crate::ledger::powercut::{Image, PowerCutStorage};
use crate::ledger::storage::StoredRecord;
use crate::ledger::{
    AccountId, Balances, Currencies, JournalEntry, Ledger, LedgerError, LedgerOptions, Owner,
    RowEntry, Storage, StorageError, TransferId, TransferRequest, TransferRows, TransferState,
};
use crate::outbox::{Deliver, DeliverError, Outbox, OutboxPoke, OutboxPolicy};
use crate::payments::core::after_pin::{self, AfterCompare, PostAnswer};
use crate::payments::core::challenge::{self, Dm};
use crate::payments::core::pin_answer::{self, PinAddress, PinTarget};
use crate::payments::core::refusal::{self, AccountFacts};
use crate::payments::core::start::{self, Start};
use crate::payments::core::{Decision, EventRef, LedgerOp, Record};
use crate::payments::memo::{MemoKind, PaymentMemo};
use crate::payments::pin_attempts::{attempt_of, check_pin_with};
use crate::policy::pin::PinRecord;
use crate::sled_open::powercut::{Power, PowerCut};
use crate::store::payments::{
    Challenge, ChallengeKind, DeclineRecord, EventOutcome, OutboxCursor, PaymentStore,
};

const USERS: [&str; 3] = ["@u0:hs", "@u1:hs", "@u2:hs"];
const BOT: &str = "@mxpay:hs";
const HASH: &str = "$argon2id$stand-in";
const T0_MS: u64 = 1_795_000_000_000;
/// Longer than any run's inputs span (at most 60 inputs, 5 s apart): nothing lapses or
/// expires, so handling an event again later decides as the first time did.
const STEPUP_TIMEOUT_MS: u64 = 600_000;
const FUNDING_MINOR: u128 = 5_000;
const FUNDING_ID_BASE: u128 = 1;
/// Attempts at one input before the test gives up (the homeserver retries for longer). An
/// input makes up to a dozen flushes and an injected sync failure never hits twice in a row,
/// so a few attempts get through; 16 leave a wide margin.
const ATTEMPTS_MAX: usize = 16;

fn user_id(user: usize) -> OwnedUserId {
    USERS[user].try_into().unwrap()
}

fn room() -> OwnedRoomId {
    "!room:hs".try_into().unwrap()
}

fn dm(user: usize) -> OwnedRoomId {
    format!("!dm{user}:hs").try_into().unwrap()
}

fn event_id(key: &str) -> OwnedEventId {
    format!("${key}:hs").try_into().unwrap()
}

fn transfer_of(pay_event: &str) -> TransferId {
    TransferId::from_key(event_id(pay_event).as_str())
}

fn eur() -> crate::ledger::CurrencyCode {
    crate::ledger::CurrencyCode::new("EUR").unwrap()
}

fn currencies() -> Currencies {
    Currencies::eur_for_tests()
}

/// One homeserver event (or, `Outbox`, a pass of the outbox).
#[derive(Debug, Clone)]
enum Input {
    /// `!pay` from `payer` to `payee`.
    Pay {
        event: String,
        payer: usize,
        payee: usize,
        amount_minor: u128,
        now_ms: u64,
    },
    /// A PIN in `user`'s DM answering the challenge of `pay_event` (a reply to it).
    Pin {
        event: String,
        user: usize,
        pay_event: String,
        right: bool,
        now_ms: u64,
    },
    /// `!cancel` from `user`.
    Cancel {
        event: String,
        user: usize,
        now_ms: u64,
    },
    /// The outbox tells what the journal holds past its cursor.
    Outbox,
}

/// What the bot told outward, in order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ack {
    PinSet {
        user: usize,
    },
    Funded {
        user: usize,
    },
    /// A `!pay` refused, as told.
    Declined {
        event: String,
        reason: String,
    },
    /// A payment's challenge was told: its reservation is in the ledger.
    ChallengeTold {
        transfer: u128,
    },
    /// A PIN attempt's result; `version` indexes the user's PIN record history.
    Pin {
        user: usize,
        event: String,
        result: String,
        version: usize,
    },
    /// A PIN confirmed a payment and the ledger posted it; its event is marked done.
    Paid {
        transfer: u128,
    },
    Done {
        event: String,
    },
    /// The outbox told a receipt (`what`: topup, posted, voided, expired; a voided one's
    /// reason as the payment store gives it).
    Receipt {
        transfer: u128,
        what: &'static str,
        void_reason: Option<String>,
    },
    Cursor {
        record_seq: u64,
        entry_index: u64,
    },
}

fn random_inputs(rng: &mut StdRng) -> Vec<Input> {
    let count = rng.gen_range(15..60);
    let mut now_ms = T0_MS;
    let mut pays: Vec<(String, usize)> = Vec::new();
    let mut inputs = Vec::with_capacity(count);
    for i in 0..count {
        now_ms += rng.gen_range(0..5_000);
        let input = match rng.gen_range(0..20) {
            0..=6 => {
                let payer = rng.gen_range(0..USERS.len());
                let payee = (payer + rng.gen_range(1..USERS.len())) % USERS.len();
                let event = format!("pay{i}");
                pays.push((event.clone(), payer));
                Input::Pay {
                    event,
                    payer,
                    payee,
                    amount_minor: rng.gen_range(100..3_000),
                    now_ms,
                }
            }
            7..=15 if !pays.is_empty() => {
                // Mostly the latest payments; sometimes one answered already.
                let back = rng.gen_range(0..pays.len().min(3));
                let (pay_event, user) = pays[pays.len() - 1 - back].clone();
                Input::Pin {
                    event: format!("pin{i}"),
                    user,
                    pay_event,
                    right: rng.gen_bool(0.55),
                    now_ms,
                }
            }
            16 => Input::Cancel {
                event: format!("cancel{i}"),
                user: rng.gen_range(0..USERS.len()),
                now_ms,
            },
            _ => Input::Outbox,
        };
        inputs.push(input);
    }
    inputs.push(Input::Outbox);
    inputs
}

/// The ledger's power-cut storage, sharing its power with the payment store's directory:
/// each write is a power point of the [`PowerCut`].
struct SharedPower {
    inner: PowerCutStorage,
    cut: Arc<PowerCut<Ack>>,
    rng: Mutex<StdRng>,
}

impl SharedPower {
    fn dead() -> StorageError {
        StorageError::Backend("power cut".to_owned())
    }

    fn write(
        &self,
        op: impl FnOnce(&PowerCutStorage) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        match self.cut.external_point() {
            Power::On => op(&self.inner),
            Power::GoesNow => {
                // The write in flight reached the disk or not; its caller hears nothing.
                if self.rng.lock().gen_bool(0.5) {
                    let _ = op(&self.inner);
                }
                let _ = self.inner.survivors();
                Err(Self::dead())
            }
            Power::Off => Err(Self::dead()),
        }
    }
}

impl Storage for SharedPower {
    fn append(&self, seq: u64, record: &[u8], head: &[u8]) -> Result<(), StorageError> {
        self.write(|s| s.append(seq, record, head))
    }

    fn head(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.head()
    }

    fn records(&self, from_seq: u64) -> Box<dyn Iterator<Item = StoredRecord> + Send> {
        self.inner.records(from_seq)
    }

    fn anchor(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.anchor()
    }

    fn keeps_checkpoints(&self) -> bool {
        self.inner.keeps_checkpoints()
    }

    fn put_checkpoint(&self, bytes: &[u8]) -> Result<(), StorageError> {
        self.write(|s| s.put_checkpoint(bytes))
    }

    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.checkpoint()
    }

    fn keeps_transfer_rows(&self) -> bool {
        self.inner.keeps_transfer_rows()
    }

    fn put_transfer_rows(&self, rows: &TransferRows) -> Result<(), StorageError> {
        self.write(|s| s.put_transfer_rows(rows))
    }

    fn transfer_row(&self, idx: u32) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.transfer_row(idx)
    }

    fn transfer_row_idx(&self, id: u128) -> Result<Option<u32>, StorageError> {
        self.inner.transfer_row_idx(id)
    }

    fn account_history(
        &self,
        account: u32,
        before: u32,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.inner.account_history(account, before, limit)
    }

    fn account_history_range(
        &self,
        account: u32,
        span: std::ops::Range<u32>,
        order: crate::ledger::HistoryOrder,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.inner
            .account_history_range(account, span, order, limit)
    }

    fn transfer_rows_by_reference(
        &self,
        reference: u128,
        limit: usize,
    ) -> Result<Vec<u32>, StorageError> {
        self.inner.transfer_rows_by_reference(reference, limit)
    }

    fn scan_transfer_rows(&self, visit: &mut dyn FnMut(RowEntry<'_>)) -> Result<(), StorageError> {
        self.inner.scan_transfer_rows(visit)
    }
}

fn open_ledger(storage: Arc<dyn Storage>, clock: &ManualClock) -> Result<Ledger, LedgerError> {
    let options = LedgerOptions {
        monotonic: Some(Arc::new(clock.clone())),
        // Every ledger write then happens inside a call the flow waits for: a write from a
        // background thread could land while the payment store is being copied. (Cuts during
        // checkpoints are the ledger's own power-cut test's subject.)
        checkpoint_at_close: false,
        ..LedgerOptions::default()
    };
    Ledger::open_storage(storage, currencies(), Arc::new(clock.clone()), options)
}

/// The running process: its stores, where its acknowledgements go, whether it still has power.
struct World<'a> {
    ledger: Ledger,
    store: PaymentStore,
    clock: ManualClock,
    tell: &'a (dyn Fn(Ack) + Sync),
    dead: &'a (dyn Fn() -> bool + Sync),
    /// Each user's PIN records as written, in order (for "the counter never goes back").
    history: &'a Mutex<HashMap<usize, Vec<Vec<u8>>>>,
}

type Step<T> = Result<T, String>;

fn failed(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl World<'_> {
    /// Something was told outward, now, unless the process is gone.
    fn told(&self, ack: Ack) -> Step<()> {
        if (self.dead)() {
            return Err("power cut".to_owned());
        }
        (self.tell)(ack);
        Ok(())
    }

    fn pin_bytes(&self, user: usize) -> Step<Option<Vec<u8>>> {
        Ok(self
            .store
            .pin_versioned(USERS[user])
            .map_err(failed)?
            .map(|(_, bytes)| bytes))
    }

    /// Notes the user's PIN record as it is now; returns its index in the history.
    fn note_pin(&self, user: usize) -> Step<usize> {
        let bytes = self.pin_bytes(user)?.expect("the PIN was set");
        let mut history = self.history.lock();
        let versions = history.entry(user).or_default();
        if versions.last() != Some(&bytes) {
            versions.push(bytes);
        }
        Ok(versions.len() - 1)
    }

    fn ledger_time(&self, now_ms: u64) {
        // Never back: handled again after a restart, an event keeps the clock where it is.
        self.clock
            .set_ms(now_ms.max(crate::clock::Clock::now_ms(&self.clock)));
    }

    /// What starts every process: the outbox's cursor (first start only), PINs, funding.
    async fn start(&self, outbox: &Outbox) -> Step<()> {
        outbox.init_cursor().await.map_err(failed)?;
        for (user, name) in USERS.iter().enumerate() {
            // The PIN dialog's set step, done once (the dialog guards its replay); a PIN found
            // may be the write of an earlier try whose flush failed: durable before it counts.
            if self.store.pin(name).map_err(failed)?.is_none() {
                self.store
                    .put_pin(name, &PinRecord::new(HASH.into()))
                    .await
                    .map_err(failed)?;
            } else {
                self.store.flush().await.map_err(failed)?;
            }
            self.note_pin(user)?;
            self.told(Ack::PinSet { user })?;
        }
        for (user, name) in USERS.iter().enumerate() {
            let request = TransferRequest {
                reference: 0,
                id: TransferId(FUNDING_ID_BASE + user as u128),
                debit: Owner::Issuer,
                credit: Owner::user(*name),
                amount: self
                    .ledger
                    .amount_from_minor(FUNDING_MINOR, "EUR")
                    .map_err(failed)?,
                memo: b"top-up".to_vec(),
            };
            self.ledger
                .create_transfer_result(request)
                .await
                .map_err(failed)?;
            self.told(Ack::Funded { user })?;
        }
        Ok(())
    }

    /// `apply.rs`'s order: the decision, the ledger, the flow's state, the messages, done.
    async fn apply(&self, decision: Decision) -> Step<()> {
        let Decision {
            record,
            ledger,
            store,
            sends,
            poke_outbox: _,
            finish,
        } = decision;
        for write in record {
            self.apply_record(write).await?;
        }
        for op in ledger {
            let result = match op {
                LedgerOp::Void(id) => self.ledger.void(id).await,
                LedgerOp::Post(id) => self.ledger.post(id, None).await,
            };
            match result {
                Ok(_) | Err(LedgerError::Rejected(_)) => {}
                Err(e) => return Err(failed(e)),
            }
        }
        for write in store {
            self.apply_record(write).await?;
        }
        for outgoing in sends {
            if outgoing.purpose == "challenge-notice" {
                if let Some(transfer) = outgoing.remember_notice_of {
                    self.told(Ack::ChallengeTold {
                        transfer: transfer.0,
                    })?;
                }
            }
        }
        if let Some(event) = finish {
            self.store.mark_done(event.as_str()).await.map_err(failed)?;
            self.told(Ack::Done {
                event: event.as_str().to_owned(),
            })?;
        }
        Ok(())
    }

    async fn apply_record(&self, write: Record) -> Step<()> {
        match write {
            Record::OutcomeIfAbsent { event_id, outcome } => self
                .store
                .put_outcome_if_absent(event_id.as_str(), &outcome)
                .await
                .map(|_| ()),
            Record::Outcome { event_id, outcome } => {
                self.store.put_outcome(event_id.as_str(), &outcome).await
            }
            Record::VoidReason {
                transfer_id,
                reason,
            } => {
                self.store
                    .update_note(transfer_id.0, |note| {
                        note.void_reason = Some(crate::payments::reason_code_of(reason))
                    })
                    .await
            }
            Record::PutChallenge(challenge) => self.store.put_challenge(&challenge).await,
            Record::RemoveChallenge(challenge) => self.store.remove_challenge(&challenge).await,
            other => panic!("this flow writes no {other:?}"),
        }
        .map_err(failed)
    }

    async fn handle(&self, input: &Input) -> Step<()> {
        match input {
            Input::Pay {
                event,
                payer,
                payee,
                amount_minor,
                now_ms,
            } => {
                self.on_pay(event, *payer, *payee, *amount_minor, *now_ms)
                    .await
            }
            Input::Pin {
                event,
                user,
                pay_event,
                right,
                now_ms,
            } => self.on_pin(event, *user, pay_event, *right, *now_ms).await,
            Input::Cancel {
                event,
                user,
                now_ms,
            } => {
                let ev = EventRef {
                    room_id: dm(*user),
                    event_id: event_id(event),
                    sender: user_id(*user),
                };
                if self
                    .store
                    .is_done(event_id(event).as_str())
                    .map_err(failed)?
                {
                    return Ok(());
                }
                self.ledger_time(*now_ms);
                let all = self.store.challenges(USERS[*user]).map_err(failed)?;
                let decision = challenge::cancel(&ev, &all, Some(&dm(*user)), *now_ms);
                self.apply(decision.finish(&ev)).await
            }
            Input::Outbox => self.drain_outbox().await,
        }
    }

    /// `on_pay` and `create_payment`.
    async fn on_pay(
        &self,
        event: &str,
        payer: usize,
        payee: usize,
        amount_minor: u128,
        now_ms: u64,
    ) -> Step<()> {
        self.ledger_time(now_ms);
        let ev = EventRef {
            room_id: room(),
            event_id: event_id(event),
            sender: user_id(payer),
        };
        let id = transfer_of(event);
        let existing = self.ledger.transfer(id).await.map_err(failed)?;
        let earlier = self.store.outcome(ev.event_id.as_str()).map_err(failed)?;
        // `decline`: the decision recorded (the first one wins), then told.
        let decline = |reason: &str| Decision {
            record: vec![Record::OutcomeIfAbsent {
                event_id: ev.event_id.clone(),
                outcome: EventOutcome::Declined(DeclineRecord {
                    reason: reason.to_owned(),
                    sentence: "your balance does not cover this payment".to_owned(),
                    payee: user_id(payee),
                    amount: amount_minor.to_string(),
                    currency: "EUR".to_owned(),
                }),
            }],
            ..Decision::none()
        };
        match start::decide(
            earlier,
            existing.is_some(),
            now_ms,
            now_ms,
            STEPUP_TIMEOUT_MS,
        ) {
            Start::Repeat(record) => {
                return self.told(Ack::Declined {
                    event: event.to_owned(),
                    reason: record.reason,
                })
            }
            Start::Fresh => {
                let account = |user: usize| AccountId {
                    owner: Owner::user(USERS[user]),
                    currency: eur(),
                };
                let payer_account = self.ledger.account(&account(payer)).await.map_err(failed)?;
                let facts = AccountFacts {
                    payer_exists: payer_account.is_some(),
                    payer_frozen: false,
                    payer_available_minor: payer_account.as_ref().map_or(0, |a| {
                        u128::try_from(a.balances.available_minor()).unwrap_or(0)
                    }),
                    payee_frozen_all: false,
                };
                if let Some(error) = refusal::before_ledger(facts, amount_minor) {
                    let reason = crate::payments::reason_code_of(refusal::reason_for(error));
                    self.apply(decline(&reason)).await?;
                    return self.told(Ack::Declined {
                        event: event.to_owned(),
                        reason,
                    });
                }
            }
            Start::Resume => {}
            other => panic!("{event}: nothing lapses in this test, got {other:?}"),
        }
        let transfer = match existing {
            Some(transfer) => transfer,
            None => {
                let memo = PaymentMemo {
                    kind: MemoKind::Pay,
                    room: room().to_string(),
                    event: ev.event_id.to_string(),
                    note: Some("lunch".to_owned()),
                    request: None,
                    refund: None,
                }
                .encode();
                let request = TransferRequest {
                    reference: 0,
                    id,
                    debit: Owner::user(USERS[payer]),
                    credit: Owner::user(USERS[payee]),
                    amount: self
                        .ledger
                        .amount_from_minor(amount_minor, "EUR")
                        .map_err(failed)?,
                    memo,
                };
                match self.ledger.create_pending(request, STEPUP_TIMEOUT_MS).await {
                    Ok(transfer) => transfer,
                    Err(LedgerError::Rejected(error)) => {
                        let reason = crate::payments::reason_code_of(refusal::reason_for(error));
                        self.apply(decline(&reason)).await?;
                        return self.told(Ack::Declined {
                            event: event.to_owned(),
                            reason,
                        });
                    }
                    Err(e) => return Err(failed(e)),
                }
            }
        };
        if transfer.state != TransferState::Pending {
            return Ok(()); // a replayed event whose payment ended: told then
        }
        let challenge = Challenge {
            kind: ChallengeKind::Pay,
            transfer_id: transfer.id.0,
            payer: user_id(payer),
            payee: USERS[payee].to_owned(),
            amount_minor: transfer.amount_minor,
            amount: amount_minor.to_string(),
            currency: "EUR".to_owned(),
            room_id: room(),
            event_id: ev.event_id.clone(),
            memo: Some("lunch".to_owned()),
            created_ms: transfer.created_ms,
            expires_at_ms: transfer
                .deadline_ms
                .unwrap_or(transfer.created_ms + STEPUP_TIMEOUT_MS),
            device_id: None,
        };
        let bot: OwnedUserId = BOT.try_into().unwrap();
        let decision = challenge::open_payment(&ev, challenge, &Dm::Ready(dm(payer)), &bot, now_ms);
        self.apply(decision).await
    }

    /// `act_on_dm_pin`, `on_stepup_pin` and `authorise` for a PIN replying to a challenge.
    async fn on_pin(
        &self,
        event: &str,
        user: usize,
        pay_event: &str,
        right: bool,
        now_ms: u64,
    ) -> Step<()> {
        self.ledger_time(now_ms);
        let ev = EventRef {
            room_id: dm(user),
            event_id: event_id(event),
            sender: user_id(user),
        };
        let key = ev.event_id.as_str().to_owned();
        if self.store.is_done(&key).map_err(failed)? {
            return Ok(());
        }
        let mut challenges = Vec::new();
        for challenge in self.store.challenges(USERS[user]).map_err(failed)? {
            let notice = self
                .store
                .note(challenge.transfer_id)
                .map_err(failed)?
                .dm_event_id;
            challenges.push((challenge, notice));
        }
        let (open, lapsed) = pin_answer::sweep_lapsed(challenges, true, now_ms);
        let named = format!("{:032x}", transfer_of(pay_event).0);
        let address = PinAddress {
            challenge_id: Some(&named),
            reply_to: None,
        };
        let target =
            pin_answer::choose_challenge(open, &address, None, now_ms, now_ms, STEPUP_TIMEOUT_MS);
        let swept = Decision {
            store: lapsed,
            ..Decision::none()
        };
        if let Some(answer) = pin_answer::unused_pin_answer(&ev, &target) {
            return self.apply(swept.then_send(answer).finish(&ev)).await;
        }
        self.apply(swept).await?;
        let PinTarget::One(challenge) = target else {
            unreachable!("only One is answered by a comparison")
        };
        if let Some(stopped) = after_pin::before_compare(&ev, &challenge, false, now_ms) {
            return self.apply(stopped.finish(&ev)).await;
        }
        let before = self.pin_bytes(user)?;
        let begun = Mutex::new(None);
        let result = check_pin_with(&self.store, USERS[user], &key, now_ms, |hash| {
            assert_eq!(hash, HASH);
            // The record as the attempt's count left it, before the comparison.
            *begun.lock() = self.pin_bytes(user).ok().flatten();
            let _ = self.note_pin(user);
            async move { Ok(right) }
        })
        .await;
        let result = match result {
            Ok(result) => result,
            Err(e) => {
                // The attempt's writes may have reached the disk though the call failed: what
                // they would have written (the count, then the result) are later versions too.
                let mut possible = Vec::new();
                if let Some(bytes) = before {
                    let mut record: PinRecord = serde_json::from_slice(&bytes).unwrap();
                    if record.begin_attempt(now_ms).is_ok() {
                        possible.push(serde_json::to_vec(&record).unwrap());
                    }
                }
                if let Some(bytes) = begun.into_inner() {
                    let mut record: PinRecord = serde_json::from_slice(&bytes).unwrap();
                    let _ = record.finish_attempt(right, now_ms);
                    possible.push(serde_json::to_vec(&record).unwrap());
                }
                self.history
                    .lock()
                    .entry(user)
                    .or_default()
                    .extend(possible);
                return Err(failed(e));
            }
        };
        let version = self.note_pin(user)?;
        self.told(Ack::Pin {
            user,
            event: key.clone(),
            result: format!("{:?}", attempt_of(&result)),
            version,
        })?;
        let open = self.store.challenges(USERS[user]).map_err(failed)?;
        match after_pin::after_compare(&ev, result, &open) {
            AfterCompare::Authorise => {
                let id = TransferId(challenge.transfer_id);
                let answer = match self.ledger.transfer(id).await.map_err(failed)? {
                    None => PostAnswer::Missing,
                    Some(_) => match self.ledger.post(id, None).await {
                        Ok(_) => PostAnswer::Posted,
                        Err(LedgerError::Rejected(error)) => PostAnswer::of_refusal(error),
                        Err(e) => return Err(failed(e)),
                    },
                };
                self.apply(after_pin::after_post(&ev, &challenge, answer).finish(&ev))
                    .await?;
                if answer == PostAnswer::Posted {
                    self.told(Ack::Paid { transfer: id.0 })?;
                }
                Ok(())
            }
            AfterCompare::Refused(decision) => self.apply(decision.finish(&ev)).await,
        }
    }

    /// One outbox pass to the durable head, as `Outbox::run` makes it: each entry past the
    /// cursor told, then the cursor moved past it.
    async fn drain_outbox(&self) -> Step<()> {
        let Some(mut cursor) = self.store.outbox_cursor().map_err(failed)? else {
            return Err("the outbox has no cursor".to_owned());
        };
        let mut tail = self
            .ledger
            .tail_from(cursor.record_seq)
            .await
            .map_err(failed)?;
        let mut at = OutboxCursor {
            record_seq: 0,
            entry_index: 0,
        };
        loop {
            let until = self.ledger.durable_seq().await.map_err(failed)?;
            let entries = tail.read_until(until, 512).map_err(failed)?;
            if entries.is_empty() {
                return Ok(());
            }
            let mut moved = false;
            for entry in entries {
                if entry.record_seq == at.record_seq {
                    at.entry_index += 1;
                } else {
                    at = OutboxCursor {
                        record_seq: entry.record_seq,
                        entry_index: 0,
                    };
                }
                if at <= cursor {
                    continue;
                }
                let sent = self.tell_entry(&entry.entry)?;
                cursor = at;
                moved = true;
                if sent {
                    self.set_cursor(cursor).await?;
                    moved = false;
                }
            }
            if moved {
                self.set_cursor(cursor).await?;
            }
        }
    }

    async fn set_cursor(&self, cursor: OutboxCursor) -> Step<()> {
        self.store.set_outbox_cursor(cursor).await.map_err(failed)?;
        self.told(Ack::Cursor {
            record_seq: cursor.record_seq,
            entry_index: cursor.entry_index,
        })
    }

    /// The receipts `tell.rs` sends for an entry; `Ok(true)` if one went out.
    fn tell_entry(&self, entry: &JournalEntry) -> Step<bool> {
        let (transfer, what) = match entry {
            JournalEntry::TransferCreated { id, debit, .. } if debit.owner == Owner::Issuer => {
                (*id, "topup")
            }
            JournalEntry::PendingPosted { id, .. } => (*id, "posted"),
            JournalEntry::PendingVoided { id } => (*id, "voided"),
            JournalEntry::PendingExpired { id } => (*id, "expired"),
            _ => return Ok(false),
        };
        let void_reason = match what {
            "voided" => self.store.note(transfer.0).map_err(failed)?.void_reason,
            _ => None,
        };
        self.told(Ack::Receipt {
            transfer: transfer.0,
            what,
            void_reason,
        })?;
        Ok(true)
    }
}

/// A deliverer for [`Outbox::init_cursor`] only (the test drains the outbox itself).
struct Unused;

#[async_trait::async_trait]
impl Deliver for Unused {
    async fn deliver(&self, _: &crate::ledger::ExportedEntry) -> Result<bool, DeliverError> {
        unreachable!("the test tells entries itself")
    }
}

fn outbox_of(world: &World<'_>) -> Outbox {
    Outbox::new(
        world.ledger.clone(),
        world.store.clone(),
        Arc::new(Unused),
        OutboxPolicy::default(),
        OutboxPoke::default(),
    )
}

/// Runs the process over `inputs`: start, then each input (retried, as the homeserver
/// retries a transaction, while a failure is not the power going). Stops when the power goes.
async fn run(world: &World<'_>, inputs: &[Input]) {
    let outbox = outbox_of(world);
    let mut steps: Vec<Option<&Input>> = vec![None];
    steps.extend(inputs.iter().map(Some));
    for step in steps {
        let mut last = String::new();
        let mut done = false;
        for _ in 0..ATTEMPTS_MAX {
            let outcome = match step {
                None => world.start(&outbox).await,
                Some(input) => world.handle(input).await,
            };
            match outcome {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(_) if (world.dead)() => return,
                Err(e) => last = e,
            }
        }
        assert!(
            done,
            "{step:?} still failing after {ATTEMPTS_MAX} attempts: {last}"
        );
    }
}

/// The end state a run leaves.
#[derive(Debug, PartialEq)]
struct Final {
    transfers: BTreeMap<u128, Option<(TransferState, u128)>>,
    balances: Vec<Balances>,
    pins: Vec<Option<Vec<u8>>>,
    outcomes: BTreeMap<String, Option<EventOutcome>>,
    done: BTreeMap<String, bool>,
    challenges: Vec<Vec<u128>>,
    receipts: BTreeSet<Ack>,
}

async fn final_state(world: &World<'_>, inputs: &[Input], receipts: BTreeSet<Ack>) -> Final {
    let mut transfers = BTreeMap::new();
    for user in 0..USERS.len() {
        let id = FUNDING_ID_BASE + user as u128;
        transfers.insert(id, None);
    }
    let mut outcomes = BTreeMap::new();
    let mut done = BTreeMap::new();
    for input in inputs {
        match input {
            Input::Pay { event, .. } => {
                transfers.insert(transfer_of(event).0, None);
                let id = event_id(event);
                outcomes.insert(event.clone(), world.store.outcome(id.as_str()).unwrap());
            }
            Input::Pin { event, .. } | Input::Cancel { event, .. } => {
                let id = event_id(event);
                outcomes.insert(event.clone(), world.store.outcome(id.as_str()).unwrap());
                done.insert(event.clone(), world.store.is_done(id.as_str()).unwrap());
            }
            Input::Outbox => {}
        }
    }
    for (id, state) in transfers.iter_mut() {
        *state = world
            .ledger
            .transfer(TransferId(*id))
            .await
            .unwrap()
            .map(|t| (t.state, t.amount_minor));
    }
    let mut balances = Vec::new();
    for name in USERS {
        balances.push(user_balances(world, Owner::user(name)).await);
    }
    Final {
        transfers,
        balances,
        pins: (0..USERS.len())
            .map(|u| world.pin_bytes(u).unwrap())
            .collect(),
        outcomes,
        done,
        challenges: (0..USERS.len())
            .map(|u| {
                let mut ids: Vec<u128> = world
                    .store
                    .challenges(USERS[u])
                    .unwrap()
                    .iter()
                    .map(|c| c.transfer_id)
                    .collect();
                ids.sort_unstable();
                ids
            })
            .collect(),
        receipts,
    }
}

async fn user_balances(world: &World<'_>, owner: Owner) -> Balances {
    world
        .ledger
        .balances(&owner)
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.id.currency == eur())
        .map(|a| a.balances)
        .unwrap_or_default()
}

/// Money is conserved: what the issuer put in is in the users' accounts, posted or reserved.
async fn check_conserved(world: &World<'_>, context: &str) {
    let issuer = user_balances(world, Owner::Issuer).await;
    let mut net_posted: i128 =
        issuer.credits_posted_minor as i128 - issuer.debits_posted_minor as i128;
    let mut net_pending: i128 =
        issuer.credits_pending_minor as i128 - issuer.debits_pending_minor as i128;
    for name in USERS {
        let b = user_balances(world, Owner::user(name)).await;
        net_posted += b.credits_posted_minor as i128 - b.debits_posted_minor as i128;
        net_pending += b.credits_pending_minor as i128 - b.debits_pending_minor as i128;
    }
    assert_eq!(
        (net_posted, net_pending),
        (0, 0),
        "{context}: money not conserved"
    );
    let report = world.ledger.verify().await;
    assert!(
        report.is_ok(),
        "{context}: the ledger does not verify: {report:?}"
    );
}

fn receipts_of(acks: &[Ack]) -> BTreeSet<Ack> {
    acks.iter()
        .filter(|a| matches!(a, Ack::Receipt { .. }))
        .cloned()
        .collect()
}

/// The run without a cut: its end state and how many power points it made.
fn uncut(seed: u64, inputs: &[Input], runtime: &tokio::runtime::Runtime) -> (Final, u64) {
    let cut = Arc::new(PowerCut::<Ack>::new(&["payments"], seed).cut_after_points(u64::MAX));
    let storage = Arc::new(SharedPower {
        inner: PowerCutStorage::new(Image::default(), None, seed),
        cut: cut.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
    });
    let clock = ManualClock::new(T0_MS);
    let acks = Mutex::new(Vec::new());
    let history = Mutex::new(HashMap::new());
    let world = World {
        ledger: open_ledger(storage, &clock).unwrap(),
        store: PaymentStore::open(&cut.dir("payments")).unwrap(),
        clock,
        tell: &|ack| acks.lock().push(ack),
        dead: &|| false,
        history: &history,
    };
    runtime.block_on(async {
        run(&world, inputs).await;
        let receipts = receipts_of(&acks.lock());
        let state = final_state(&world, inputs, receipts).await;
        (state, cut.points())
    })
}

/// Everything acknowledged before the cut is there as acknowledged.
async fn check_acknowledged(
    world: &World<'_>,
    acked: &[Ack],
    history: &HashMap<usize, Vec<Vec<u8>>>,
    context: &str,
) {
    let state = |id: u128| async move {
        world
            .ledger
            .transfer(TransferId(id))
            .await
            .unwrap()
            .map(|t| t.state)
    };
    let mut last_version: HashMap<usize, usize> = HashMap::new();
    for ack in acked {
        let kept = match ack {
            Ack::PinSet { user } => world.store.pin(USERS[*user]).unwrap().is_some(),
            Ack::Funded { user } => state(FUNDING_ID_BASE + *user as u128).await.is_some(),
            Ack::Declined { event, reason } => matches!(
                world.store.outcome(event_id(event).as_str()).unwrap(),
                Some(EventOutcome::Declined(record)) if record.reason == *reason
            ),
            Ack::ChallengeTold { transfer } => state(*transfer).await.is_some(),
            Ack::Pin {
                user,
                event,
                result,
                version,
            } => {
                last_version.insert(*user, *version);
                match world.store.outcome(event).unwrap() {
                    Some(EventOutcome::PinChecked { attempt }) => format!("{attempt:?}") == *result,
                    _ => false,
                }
            }
            Ack::Paid { transfer } => {
                matches!(state(*transfer).await, Some(TransferState::Posted { .. }))
            }
            Ack::Done { event } => world.store.is_done(event).unwrap(),
            Ack::Receipt { transfer, what, .. } => matches!(
                (*what, state(*transfer).await),
                ("topup", Some(_))
                    | ("posted", Some(TransferState::Posted { .. }))
                    | ("voided", Some(TransferState::Voided))
                    | ("expired", Some(TransferState::Expired))
            ),
            Ack::Cursor {
                record_seq,
                entry_index,
            } => {
                let told = OutboxCursor {
                    record_seq: *record_seq,
                    entry_index: *entry_index,
                };
                world
                    .store
                    .outbox_cursor()
                    .unwrap()
                    .is_some_and(|c| c >= told)
            }
        };
        assert!(kept, "{context}: acknowledged {ack:?}, lost after the cut");
    }
    // The PIN attempt counter never goes back: each record is at least the last one told.
    for (user, told) in last_version {
        let bytes = world.pin_bytes(user).unwrap().unwrap();
        let found = history[&user].iter().rposition(|v| *v == bytes);
        assert!(
            found.is_some_and(|at| at >= told),
            "{context}: {}'s PIN record went back to version {found:?}, before the told {told}",
            USERS[user]
        );
    }
}

fn one_run(seed: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let inputs = random_inputs(&mut rng);
    let (expected, points) = uncut(seed, &inputs, &runtime);
    let cut_after = rng.gen_range(0..=points);
    let cut = Arc::new(
        PowerCut::<Ack>::new(&["payments"], seed)
            .cut_after_points(cut_after)
            .failing_syncs(if rng.gen_bool(0.5) { 0.1 } else { 0.0 }),
    );
    let storage = Arc::new(SharedPower {
        inner: PowerCutStorage::new(Image::default(), None, seed),
        cut: cut.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed)),
    });
    let history = Mutex::new(HashMap::new());
    let clock = ManualClock::new(T0_MS);
    // Opening a new ledger writes its first record: the power may go there already.
    match open_ledger(storage.clone(), &clock) {
        Ok(ledger) => {
            let world = World {
                ledger,
                store: PaymentStore::open(&cut.dir("payments")).unwrap(),
                clock: clock.clone(),
                tell: &|ack| cut.ack(ack),
                dead: &|| cut.is_dead(),
                history: &history,
            };
            runtime.block_on(run(&world, &inputs));
        }
        Err(e) => assert!(cut.is_dead(), "seed {seed}: the ledger does not open: {e}"),
    }
    let survived = cut.cut();
    let image = storage.inner.survivors();
    let context = format!(
        "seed {seed}: power cut after {cut_after} of {points} power points \
         ({} acknowledgements kept)",
        survived.acked.len()
    );

    // The restart: both stores as the cut left them, the clock where it was.
    let restarted = ManualClock::new(crate::clock::Clock::now_ms(&clock));
    let told_again = Mutex::new(Vec::new());
    let world = World {
        ledger: open_ledger(
            Arc::new(PowerCutStorage::new(image, None, seed)),
            &restarted,
        )
        .unwrap_or_else(|e| panic!("{context}: the ledger does not open after the cut: {e}")),
        store: PaymentStore::open(&cut.dir("payments")).unwrap(),
        clock: restarted,
        tell: &|ack| told_again.lock().push(ack),
        dead: &|| false,
        history: &history,
    };
    runtime.block_on(async {
        let history_now = history.lock().clone();
        check_acknowledged(&world, &survived.acked, &history_now, &context).await;
        check_conserved(&world, &context).await;
        // The homeserver delivers every event again (the whole transactions it was not
        // answered for, and more: events handled to the end must do nothing twice either).
        run(&world, &inputs).await;
        check_conserved(&world, &context).await;
        let mut receipts = receipts_of(&survived.acked);
        receipts.extend(receipts_of(&told_again.lock()));
        let after = final_state(&world, &inputs, receipts).await;
        let differs = |what: &str| format!("{context}: {what} differ from the run without a cut");
        assert_eq!(
            after.transfers,
            expected.transfers,
            "{}",
            differs("transfers")
        );
        assert_eq!(after.balances, expected.balances, "{}", differs("balances"));
        assert_eq!(after.pins, expected.pins, "{}", differs("PIN records"));
        assert_eq!(
            after.outcomes,
            expected.outcomes,
            "{}",
            differs("event decisions")
        );
        assert_eq!(after.done, expected.done, "{}", differs("events done"));
        assert_eq!(
            after.challenges,
            expected.challenges,
            "{}",
            differs("open challenges")
        );
        assert_eq!(
            after.receipts,
            expected.receipts,
            "{}",
            differs("receipts told")
        );
        assert_eq!(after, expected);
    });
}

#[test]
fn power_cuts_over_ledger_and_payment_store_together_lose_no_payment_and_pay_none_twice() {
    crate::sled_open::powercut::run_many("ledger and payment store", one_run);
}
