//! The payment layer's own state (sled at `<data_dir>/payments/`): PIN records, each user's
//! private DM with the bot, the PIN dialogs in progress, open step-up challenges, and the
//! outbox cursor. Money is not here: balances and transfers are the ledger's.
//!
//! Trees:
//! - `userid_pin`: user -> [`PinRecord`] (argon2id hash, attempts, lockout), JSON.
//! - `userid_profile`: user -> [`UserProfile`] (DM room, whether the PIN must be changed).
//! - `userid_dialog`: user -> [`Dialog`] (`!pin set` / `!pin change` in progress).
//! - `payer_challenge`: payer + NUL + created_ms (BE) + transfer id (BE) -> [`Challenge`].
//! - `eventid_done`: ids of PIN events already acted on (a re-handled transaction skips them).
//! - `eventid_outcome`: event id -> [`EventOutcome`] (what the bot decided about an event,
//!   recorded before it says so, so a retried transaction repeats the answer instead of deciding
//!   again: a refusal, a started withdrawal, a PIN attempt begun or finished), JSON.
//! - `transferid_note`: transfer id (BE) -> [`TransferNote`] (why it was voided, the DM
//!   challenge event a receipt answers).
//! - `outboxpos_deadletter`: journal record seq (BE) + entry index (BE) -> why the outbox could
//!   not tell about that ledger change (UTF-8), for the operator.
//! - `userid_waitingnotice`: user + NUL + sequence (BE) -> [`WaitingNotice`] (a notice the
//!   outbox could not deliver because the user had no ready DM yet; sent, in order, when one
//!   is), JSON. Bounded per user, in total and in age: [`WaitingNoticeBounds`].
//! - `meta`: `outbox_cursor` -> journal record seq (BE) + entry index (BE).

use std::fmt;
use std::path::Path;

use ruma::{OwnedDeviceId, OwnedEventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, UserId};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::StoreError;
use crate::policy::pin::PinRecord;

const USERID_PIN: &str = "userid_pin";
const USERID_PROFILE: &str = "userid_profile";
const USERID_DIALOG: &str = "userid_dialog";
const PAYER_CHALLENGE: &str = "payer_challenge";
const EVENTID_DONE: &str = "eventid_done";
const EVENTID_OUTCOME: &str = "eventid_outcome";
const TRANSFERID_NOTE: &str = "transferid_note";
const META: &str = "meta";
const USERID_WAITINGNOTICE: &str = "userid_waitingnotice";
const OUTBOXPOS_DEADLETTER: &str = "outboxpos_deadletter";
const OUTBOX_CURSOR: &[u8] = b"outbox_cursor";

/// What the bot knows about one user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProfile {
    /// The user's private, encrypted DM with the bot.
    #[serde(default)]
    pub dm_room: Option<OwnedRoomId>,
    /// The user has joined `dm_room` (a DM the bot created starts with an invite).
    #[serde(default)]
    pub dm_joined: bool,
    /// The PIN was seen where others could read it: payments wait for `!pin change`.
    #[serde(default)]
    pub pin_compromised: bool,
    /// The operator confirmed (out of band, with an admin PIN reset) that the user's current
    /// cross-signing identity is theirs: the next `!pin set` accepts it. Cleared once used.
    #[serde(default)]
    pub accept_new_keys_at_pin_set: bool,
}

/// A `!pin set` or `!pin change` in progress. Holds at most a hash, never a PIN.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Dialog {
    /// Waiting for the new PIN.
    NewPin {
        /// The dialog lapses at this time (ms since epoch).
        expires_at_ms: u64,
        /// Whether this replaces an existing PIN (`!pin change`, old PIN already checked).
        change: bool,
    },
    /// Waiting for the new PIN again; `hash` is the first answer's argon2id hash.
    ConfirmPin {
        /// The dialog lapses at this time.
        expires_at_ms: u64,
        /// argon2id PHC string of the first answer.
        hash: String,
        /// Whether this replaces an existing PIN.
        change: bool,
    },
    /// `!pin change`: waiting for the old PIN.
    OldPin {
        /// The dialog lapses at this time.
        expires_at_ms: u64,
    },
    /// The user's cross-signing identity changed: waiting for their PIN to accept it.
    AcceptIdentity {
        /// The dialog lapses at this time.
        expires_at_ms: u64,
    },
}

impl Dialog {
    /// When the dialog lapses.
    pub fn expires_at_ms(&self) -> u64 {
        match self {
            Dialog::NewPin { expires_at_ms, .. }
            | Dialog::ConfirmPin { expires_at_ms, .. }
            | Dialog::OldPin { expires_at_ms }
            | Dialog::AcceptIdentity { expires_at_ms } => *expires_at_ms,
        }
    }
}

impl fmt::Debug for Dialog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dialog::NewPin { change, .. } => write!(f, "Dialog::NewPin(change={change})"),
            Dialog::ConfirmPin { change, .. } => write!(f, "Dialog::ConfirmPin(change={change})"),
            Dialog::OldPin { .. } => f.write_str("Dialog::OldPin"),
            Dialog::AcceptIdentity { .. } => f.write_str("Dialog::AcceptIdentity"),
        }
    }
}

/// What a challenge authorises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChallengeKind {
    /// A payment to another user; the pending transfer exists already.
    Pay,
    /// A withdrawal to the settlement account; the pending transfer is made after the PIN.
    Withdraw,
}

/// An open step-up challenge: a payment waiting for the payer's PIN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Pay or withdraw.
    pub kind: ChallengeKind,
    /// The ledger transfer id (pending for `Pay`; to be created for `Withdraw`).
    pub transfer_id: u128,
    /// The paying user.
    pub payer: OwnedUserId,
    /// Who is paid (a user ID; `settlement` for a withdrawal).
    pub payee: String,
    /// Amount in minor units.
    pub amount_minor: u128,
    /// Amount in major units, as shown (`12.50`).
    pub amount: String,
    /// ISO 4217 code.
    pub currency: String,
    /// The room the payment was asked for in.
    pub room_id: OwnedRoomId,
    /// The event that asked for it.
    pub event_id: OwnedEventId,
    /// The note, if any.
    pub memo: Option<String>,
    /// Created at (ms since epoch).
    pub created_ms: u64,
    /// The challenge lapses at this time.
    pub expires_at_ms: u64,
    /// The device (session) of the payer that asked for it. A plain PIN confirms the challenge
    /// only when sent from this device (PSD2 dynamic linking: another session, perhaps a
    /// stolen one, may have asked for it); from any other device the PIN must answer this
    /// challenge by name (a reply to its notice, or its `challenge_id`). `None` in records
    /// written before the field existed (read as "unknown device": only a named answer
    /// confirms them) and for plaintext requests, which never get this far.
    #[serde(default)]
    pub device_id: Option<OwnedDeviceId>,
}

impl Challenge {
    /// The id the challenge is answered with (the transfer id in hex).
    pub fn challenge_id(&self) -> String {
        format!("{:032x}", self.transfer_id)
    }
}

/// Extra facts about a transfer that its receipt needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferNote {
    /// Why the bot voided it (a receipt reason code), if it did.
    #[serde(default)]
    pub void_reason: Option<String>,
    /// The challenge event in the payer's DM.
    #[serde(default)]
    pub dm_event_id: Option<String>,
}

/// A refusal of a payment or withdrawal, as decided (the receipt and the sentence are made
/// from it, the same on every retry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclineRecord {
    /// The receipt reason code (`insufficient_funds`, `too_late`, ...).
    pub reason: String,
    /// The sentence told in the room (no PIN, ever).
    pub sentence: String,
    /// Who would have been paid (the bot for a withdrawal).
    pub payee: OwnedUserId,
    /// Amount in major units, as asked (`12.50`).
    pub amount: String,
    /// Currency code, as asked.
    pub currency: String,
}

/// How a PIN attempt ended, as told to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PinAttemptResult {
    /// The PIN matched.
    Matched,
    /// The PIN did not match.
    Wrong {
        /// Attempts left before the PIN locks.
        attempts_left: u32,
    },
    /// The PIN is (now) locked.
    Locked {
        /// How long the lock lasted from the attempt.
        remaining_ms: u64,
    },
    /// No PIN is set (never, reset, or replaced during the check).
    NotSet,
}

/// What the bot decided about one event (tree `eventid_outcome`), recorded durably before the
/// bot says so: a transaction handled again (a retryable failure, a crash) repeats the recorded
/// answer instead of deciding again with what changed meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum EventOutcome {
    /// A payment or withdrawal the event asked for was refused before anything started.
    Declined(DeclineRecord),
    /// The withdrawal the event asked for was started (its challenge was stored).
    Started,
    /// The event's PIN attempt was counted (the attempt counter went up) but not finished;
    /// `record_version` tags the PIN record the attempt wrote ([`pin_version_tag`]).
    PinBegun {
        /// Tag of the PIN record as the attempt left it.
        record_version: String,
    },
    /// The event's PIN attempt finished.
    PinChecked {
        /// How it ended.
        attempt: PinAttemptResult,
    },
    /// The event was a PIN dialog's answer (`!pin set`, `!pin change`, accepting new keys):
    /// the dialog moved on and `reply` is what the bot says (a sentence, never a PIN).
    DialogAnswered {
        /// The bot's answer.
        reply: String,
    },
}

/// A short tag of a stored PIN record's bytes (a hash: it never holds the argon2 hash itself),
/// to tell whether the record is still the one an attempt wrote.
pub fn pin_version_tag(record_bytes: &[u8]) -> String {
    blake3::hash(record_bytes).to_hex()[..32].to_owned()
}

/// A notice to a user that waits for their private DM to be ready (tree
/// `userid_waitingnotice`). Holds the text and the transaction id it is sent with, so sending
/// it again (after a crash between the send and the removal) shows it once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingNotice {
    /// The transaction id the notice is sent with (deterministic: derived from the ledger
    /// change it tells about, the same the outbox would have used right away).
    pub txn_id: OwnedTransactionId,
    /// The notice text (never a secret: top-up and withdrawal notices only).
    pub body: String,
    /// When it was queued (ms since epoch): it lapses `age_max_ms` later.
    pub queued_ms: u64,
    /// How many notices before this one were dropped (over the per-user bound, or lapsed):
    /// said when this one is sent, so the user knows to look at `!history`.
    #[serde(default)]
    pub earlier_dropped: u32,
}

/// Where a waiting notice is stored: its user and its place in that user's queue (a sled id,
/// increasing across restarts, so the queue keeps the order notices were queued in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NoticeSeq(pub u64);

/// Bounds of the waiting notices: a user who never opens a DM, or a flood of top-ups, must not
/// grow the store without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitingNoticeBounds {
    /// Notices kept per user; over it the oldest is dropped (and counted on the next one).
    pub per_user_max: usize,
    /// Notices kept for all users together; when full (after dropping lapsed ones) a new
    /// notice is not kept (the ledger still has it: `!history`).
    pub total_max: usize,
    /// Age after which a notice lapses (it is dropped and counted on the next one).
    pub age_max_ms: u64,
}

impl Default for WaitingNoticeBounds {
    fn default() -> Self {
        Self {
            per_user_max: 32,
            total_max: 10_000,
            age_max_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

/// What [`PaymentStore::queue_notice`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// The notice waits (or was waiting already: the same transaction id is kept once).
    Waiting,
    /// The store holds `total_max` notices: this one was not kept.
    Full,
}

/// Where the outbox stands in the ledger journal: everything up to and including entry
/// `entry_index` of record `record_seq` has been told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutboxCursor {
    /// Journal record.
    pub record_seq: u64,
    /// Entry within the record (0-based); with `record_seq == 0`, nothing was told yet.
    pub entry_index: u64,
}

/// The payment state database. Cheap to clone.
#[derive(Clone)]
pub struct PaymentStore {
    db: sled::Db,
    /// sled's log file, fdatasync'ed after each flush.
    log: std::sync::Arc<std::fs::File>,
    pins: sled::Tree,
    profiles: sled::Tree,
    dialogs: sled::Tree,
    challenges: sled::Tree,
    done: sled::Tree,
    outcomes: sled::Tree,
    notes: sled::Tree,
    meta: sled::Tree,
    dead_letters: sled::Tree,
    waiting_notices: sled::Tree,
    /// Serialises changes to `waiting_notices` (the outbox queues, event handling sends and
    /// removes): each change reads a user's queue, then rewrites it.
    notices_lock: std::sync::Arc<parking_lot::Mutex<()>>,
    /// Payment requests, in this database (their trees share its flushes).
    requests: super::requests::RequestStore,
    /// Which payment each completed-payment receipt is about (for `!refund`).
    receipts: super::receipts::ReceiptStore,
    /// Payments held for their payee to accept, in this database.
    held: super::held::HeldStore,
}

impl fmt::Debug for PaymentStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaymentStore").finish_non_exhaustive()
    }
}

fn get_json<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|_| StoreError::Corrupt {
                tree: name,
                reason: "value is not the expected JSON",
            }),
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store values serialise")
}

fn challenge_key(payer: &str, created_ms: u64, transfer_id: u128) -> Vec<u8> {
    let mut key = payer.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&created_ms.to_be_bytes());
    key.extend_from_slice(&transfer_id.to_be_bytes());
    key
}

fn user_prefix(user: &str) -> Vec<u8> {
    let mut key = user.as_bytes().to_vec();
    key.push(0);
    key
}

impl PaymentStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = crate::sled_open::open_waiting_for_lock(&sled::Config::new().path(dir)).map_err(
            |source| StoreError::Open {
                path: dir.to_owned(),
                source,
            },
        )?;
        let log =
            std::sync::Arc::new(
                crate::sled_open::log_file(dir).map_err(|e| StoreError::Open {
                    path: dir.to_owned(),
                    source: sled::Error::Io(e),
                })?,
            );
        Ok(Self {
            requests: super::requests::RequestStore::in_db(db.clone(), log.clone())?,
            receipts: super::receipts::ReceiptStore::in_db(db.clone(), log.clone())?,
            held: super::held::HeldStore::in_db(db.clone(), log.clone())?,
            pins: db.open_tree(USERID_PIN)?,
            profiles: db.open_tree(USERID_PROFILE)?,
            dialogs: db.open_tree(USERID_DIALOG)?,
            challenges: db.open_tree(PAYER_CHALLENGE)?,
            done: db.open_tree(EVENTID_DONE)?,
            outcomes: db.open_tree(EVENTID_OUTCOME)?,
            notes: db.open_tree(TRANSFERID_NOTE)?,
            meta: db.open_tree(META)?,
            dead_letters: db.open_tree(OUTBOXPOS_DEADLETTER)?,
            log,
            waiting_notices: db.open_tree(USERID_WAITINGNOTICE)?,
            notices_lock: Default::default(),
            db,
        })
    }

    /// The payment requests kept in this database (`requestid_request`, ...: see
    /// [`super::requests`]).
    pub fn requests(&self) -> &super::requests::RequestStore {
        &self.requests
    }

    /// The links from the bot's receipts to the payments they tell of (see
    /// [`super::receipts`]).
    pub fn receipts(&self) -> &super::receipts::ReceiptStore {
        &self.receipts
    }

    /// The payments held for their payee to accept (`transferid_held`, ...: see
    /// [`super::held`]).
    pub fn held(&self) -> &super::held::HeldStore {
        &self.held
    }

    /// Makes every write so far durable (also against a power cut: see
    /// [`crate::sled_open::flush_durably`]).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (db, log) = (self.db.clone(), self.log.clone());
        tokio::task::spawn_blocking(move || crate::sled_open::flush_durably(&db, &log)).await??;
        Ok(())
    }

    /// The user's PIN record, if a PIN was ever set.
    pub fn pin(&self, user: &str) -> Result<Option<PinRecord>, StoreError> {
        get_json(&self.pins, USERID_PIN, user.as_bytes())
    }

    /// The user's PIN record with its stored bytes: the version [`Self::swap_pin`] compares
    /// against.
    pub fn pin_versioned(&self, user: &str) -> Result<Option<(PinRecord, Vec<u8>)>, StoreError> {
        match self.pins.get(user.as_bytes())? {
            None => Ok(None),
            Some(bytes) => {
                let record = serde_json::from_slice(&bytes).map_err(|_| StoreError::Corrupt {
                    tree: USERID_PIN,
                    reason: "value is not the expected JSON",
                })?;
                Ok(Some((record, bytes.to_vec())))
            }
        }
    }

    /// Replaces the user's PIN record with `new`, durably, only if it is still exactly
    /// `expected` (compare-and-swap): `Some(new version)` when swapped, `None` when the record
    /// changed meanwhile (another attempt, an admin reset), and nothing was written.
    pub async fn swap_pin(
        &self,
        user: &str,
        expected: &[u8],
        new: &PinRecord,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let bytes = to_json(new);
        let swapped = self
            .pins
            .compare_and_swap(user.as_bytes(), Some(expected), Some(bytes.clone()))?
            .is_ok();
        if !swapped {
            return Ok(None);
        }
        self.flush().await?;
        Ok(Some(bytes))
    }

    /// Stores the user's PIN record durably.
    pub async fn put_pin(&self, user: &str, record: &PinRecord) -> Result<(), StoreError> {
        self.pins.insert(user.as_bytes(), to_json(record))?;
        self.flush().await
    }

    /// The user's profile (default when unknown).
    pub fn profile(&self, user: &str) -> Result<UserProfile, StoreError> {
        Ok(get_json(&self.profiles, USERID_PROFILE, user.as_bytes())?.unwrap_or_default())
    }

    /// Stores the user's profile durably.
    pub async fn put_profile(&self, user: &str, profile: &UserProfile) -> Result<(), StoreError> {
        self.profiles.insert(user.as_bytes(), to_json(profile))?;
        self.flush().await
    }

    /// The user whose recorded DM is `room_id`, if any (a scan: DMs are few per deployment
    /// compared to events, and this runs only on membership changes).
    pub fn dm_owner(&self, room_id: &str) -> Result<Option<(String, UserProfile)>, StoreError> {
        for item in self.profiles.iter() {
            let (key, value) = item?;
            let profile: UserProfile =
                serde_json::from_slice(&value).map_err(|_| StoreError::Corrupt {
                    tree: USERID_PROFILE,
                    reason: "value is not the expected JSON",
                })?;
            if profile.dm_room.as_ref().map(|r| r.as_str()) == Some(room_id) {
                let user = String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt {
                    tree: USERID_PROFILE,
                    reason: "key is not UTF-8",
                })?;
                return Ok(Some((user, profile)));
            }
        }
        Ok(None)
    }

    /// The PIN dialog in progress, if any and not lapsed at `now_ms`.
    pub fn dialog(&self, user: &str, now_ms: u64) -> Result<Option<Dialog>, StoreError> {
        let dialog: Option<Dialog> = get_json(&self.dialogs, USERID_DIALOG, user.as_bytes())?;
        Ok(dialog.filter(|d| d.expires_at_ms() > now_ms))
    }

    /// Sets (`Some`) or ends (`None`) the user's PIN dialog, durably.
    pub async fn put_dialog(&self, user: &str, dialog: Option<&Dialog>) -> Result<(), StoreError> {
        match dialog {
            Some(dialog) => self.dialogs.insert(user.as_bytes(), to_json(dialog))?,
            None => self.dialogs.remove(user.as_bytes())?,
        };
        self.flush().await
    }

    /// Records an open challenge durably (the same challenge again is a no-op).
    pub async fn put_challenge(&self, challenge: &Challenge) -> Result<(), StoreError> {
        let key = challenge_key(
            challenge.payer.as_str(),
            challenge.created_ms,
            challenge.transfer_id,
        );
        self.challenges.insert(key, to_json(challenge))?;
        self.flush().await
    }

    /// The payer's open challenges, oldest first.
    pub fn challenges(&self, payer: &str) -> Result<Vec<Challenge>, StoreError> {
        self.challenges
            .scan_prefix(user_prefix(payer))
            .map(|item| {
                let (_, value) = item?;
                serde_json::from_slice(&value).map_err(|_| StoreError::Corrupt {
                    tree: PAYER_CHALLENGE,
                    reason: "value is not the expected JSON",
                })
            })
            .collect()
    }

    /// The challenge for `transfer_id`, if open.
    pub fn challenge(
        &self,
        payer: &str,
        transfer_id: u128,
    ) -> Result<Option<Challenge>, StoreError> {
        Ok(self
            .challenges(payer)?
            .into_iter()
            .find(|c| c.transfer_id == transfer_id))
    }

    /// Closes a challenge durably.
    pub async fn remove_challenge(&self, challenge: &Challenge) -> Result<(), StoreError> {
        self.challenges.remove(challenge_key(
            challenge.payer.as_str(),
            challenge.created_ms,
            challenge.transfer_id,
        ))?;
        self.flush().await
    }

    /// Whether the event was acted on already.
    pub fn is_done(&self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self.done.contains_key(event_id.as_bytes())?)
    }

    /// Marks the event as acted on, durably.
    pub async fn mark_done(&self, event_id: &str) -> Result<(), StoreError> {
        self.done.insert(event_id.as_bytes(), &[])?;
        self.flush().await
    }

    /// What was decided about `event_id`, if anything.
    pub fn outcome(&self, event_id: &str) -> Result<Option<EventOutcome>, StoreError> {
        get_json(&self.outcomes, EVENTID_OUTCOME, event_id.as_bytes())
    }

    /// Records what was decided about `event_id`, durably, unless something was recorded for
    /// it already: `None` when recorded now, else the earlier outcome (the first decision
    /// wins, and the caller repeats it).
    pub async fn put_outcome_if_absent(
        &self,
        event_id: &str,
        outcome: &EventOutcome,
    ) -> Result<Option<EventOutcome>, StoreError> {
        let swapped = self.outcomes.compare_and_swap(
            event_id.as_bytes(),
            None as Option<&[u8]>,
            Some(to_json(outcome)),
        )?;
        match swapped {
            Ok(()) => {
                self.flush().await?;
                Ok(None)
            }
            Err(conflict) => match conflict.current {
                Some(bytes) => {
                    // The earlier decision may not be durable yet (its writer's flush failed,
                    // or is still running): the caller tells it, so make it so first.
                    self.flush().await?;
                    serde_json::from_slice(&bytes)
                        .map(Some)
                        .map_err(|_| StoreError::Corrupt {
                            tree: EVENTID_OUTCOME,
                            reason: "value is not the expected JSON",
                        })
                }
                None => Ok(None),
            },
        }
    }

    /// Records (replacing) what was decided about `event_id`, durably.
    pub async fn put_outcome(
        &self,
        event_id: &str,
        outcome: &EventOutcome,
    ) -> Result<(), StoreError> {
        self.outcomes
            .insert(event_id.as_bytes(), to_json(outcome))?;
        self.flush().await
    }

    /// Moves the user's PIN dialog to `dialog` (`None`: ends it) and records that `event_id`
    /// answered it with `reply`, in one atomic, durable write: the same message handled again
    /// gets the same answer and is never taken as the next step's answer.
    pub async fn put_dialog_step(
        &self,
        user: &str,
        dialog: Option<&Dialog>,
        event_id: &str,
        reply: &str,
    ) -> Result<(), StoreError> {
        use sled::transaction::{ConflictableTransactionResult, TransactionError};
        use sled::Transactional as _;
        let dialog_bytes = dialog.map(to_json);
        let outcome_bytes = to_json(&EventOutcome::DialogAnswered {
            reply: reply.to_owned(),
        });
        let written: Result<(), TransactionError<()>> = (&self.dialogs, &self.outcomes)
            .transaction(
                |(dialogs, outcomes)| -> ConflictableTransactionResult<(), ()> {
                    match &dialog_bytes {
                        Some(bytes) => dialogs.insert(user.as_bytes(), bytes.as_slice())?,
                        None => dialogs.remove(user.as_bytes())?,
                    };
                    outcomes.insert(event_id.as_bytes(), outcome_bytes.as_slice())?;
                    Ok(())
                },
            );
        match written {
            Ok(()) => self.flush().await,
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => unreachable!("the transaction never aborts"),
        }
    }

    /// [`Self::swap_pin`] that also records `outcome` for `event_id`, in one atomic, durable
    /// write: the PIN record and what the attempt of that event did never disagree after a
    /// crash. `outcome` gets the new record's [`pin_version_tag`].
    pub async fn swap_pin_recording(
        &self,
        user: &str,
        expected: &[u8],
        new: &PinRecord,
        event_id: &str,
        outcome: impl FnOnce(String) -> EventOutcome,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        use sled::transaction::{ConflictableTransactionResult, TransactionError};
        use sled::Transactional as _;
        let bytes = to_json(new);
        let outcome_bytes = to_json(&outcome(pin_version_tag(&bytes)));
        let swapped: Result<bool, TransactionError<()>> = (&self.pins, &self.outcomes).transaction(
            |(pins, outcomes)| -> ConflictableTransactionResult<bool, ()> {
                if pins.get(user.as_bytes())?.as_deref() != Some(expected) {
                    return Ok(false);
                }
                pins.insert(user.as_bytes(), bytes.as_slice())?;
                outcomes.insert(event_id.as_bytes(), outcome_bytes.as_slice())?;
                Ok(true)
            },
        );
        match swapped {
            Ok(true) => {
                self.flush().await?;
                Ok(Some(bytes))
            }
            Ok(false) => Ok(None),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => unreachable!("the transaction never aborts"),
        }
    }

    /// The note on a transfer (default when none).
    pub fn note(&self, transfer_id: u128) -> Result<TransferNote, StoreError> {
        Ok(get_json(&self.notes, TRANSFERID_NOTE, &transfer_id.to_be_bytes())?.unwrap_or_default())
    }

    /// Changes the note on a transfer durably.
    pub async fn update_note(
        &self,
        transfer_id: u128,
        change: impl FnOnce(&mut TransferNote),
    ) -> Result<(), StoreError> {
        let mut note = self.note(transfer_id)?;
        change(&mut note);
        self.notes
            .insert(transfer_id.to_be_bytes(), to_json(&note))?;
        self.flush().await
    }

    /// Where the outbox stands; `None` before its first start.
    pub fn outbox_cursor(&self) -> Result<Option<OutboxCursor>, StoreError> {
        match self.meta.get(OUTBOX_CURSOR)? {
            None => Ok(None),
            Some(bytes) if bytes.len() == 16 => {
                let seq = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
                let index = u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes"));
                Ok(Some(OutboxCursor {
                    record_seq: seq,
                    entry_index: index,
                }))
            }
            Some(_) => Err(StoreError::Corrupt {
                tree: META,
                reason: "outbox cursor is not 16 bytes",
            }),
        }
    }

    /// Records, durably, that the outbox gave up on the ledger change at `at` and why (the
    /// reason must hold no secret: it is shown to the operator).
    pub async fn put_dead_letter(&self, at: OutboxCursor, reason: &str) -> Result<(), StoreError> {
        let mut key = at.record_seq.to_be_bytes().to_vec();
        key.extend_from_slice(&at.entry_index.to_be_bytes());
        self.dead_letters.insert(key, reason.as_bytes())?;
        self.flush().await
    }

    /// The outbox's dead letters, oldest first: (position, reason).
    pub fn dead_letters(&self) -> Result<Vec<(OutboxCursor, String)>, StoreError> {
        self.dead_letters
            .iter()
            .map(|item| {
                let (key, value) = item?;
                if key.len() != 16 {
                    return Err(StoreError::Corrupt {
                        tree: OUTBOXPOS_DEADLETTER,
                        reason: "key is not 16 bytes",
                    });
                }
                let cursor = OutboxCursor {
                    record_seq: u64::from_be_bytes(key[..8].try_into().expect("8 bytes")),
                    entry_index: u64::from_be_bytes(key[8..].try_into().expect("8 bytes")),
                };
                Ok((cursor, String::from_utf8_lossy(&value).into_owned()))
            })
            .collect()
    }

    /// The user's waiting notices, oldest first.
    fn notices_of(&self, user: &UserId) -> Result<Vec<(sled::IVec, WaitingNotice)>, StoreError> {
        self.waiting_notices
            .scan_prefix(user_prefix(user.as_str()))
            .map(|item| {
                let (key, value) = item?;
                let notice = serde_json::from_slice(&value).map_err(|_| StoreError::Corrupt {
                    tree: USERID_WAITINGNOTICE,
                    reason: "value is not the expected JSON",
                })?;
                Ok((key, notice))
            })
            .collect()
    }

    /// Whether the user has notices waiting for their DM (cheap: one prefix lookup).
    pub fn has_waiting_notices(&self, user: &UserId) -> Result<bool, StoreError> {
        Ok(self
            .waiting_notices
            .scan_prefix(user_prefix(user.as_str()))
            .next()
            .transpose()?
            .is_some())
    }

    /// Drops the user's lapsed notices and, when `make_room`, the oldest over
    /// `per_user_max - 1`; the count of dropped ones moves onto the oldest kept one (or is
    /// returned when none is kept). Call with `notices_lock` held.
    fn prune_user(
        &self,
        user: &UserId,
        now_ms: u64,
        bounds: WaitingNoticeBounds,
        make_room: bool,
    ) -> Result<u32, StoreError> {
        let mut notices = self.notices_of(user)?;
        let mut dropped = 0u32;
        let mut keep_from = 0;
        for (i, (key, notice)) in notices.iter().enumerate() {
            let over = make_room && notices.len() - i >= bounds.per_user_max;
            let lapsed = now_ms.saturating_sub(notice.queued_ms) >= bounds.age_max_ms;
            if !(over || lapsed) {
                break;
            }
            self.waiting_notices.remove(key)?;
            dropped = dropped
                .saturating_add(notice.earlier_dropped)
                .saturating_add(1);
            keep_from = i + 1;
        }
        if dropped == 0 {
            return Ok(0);
        }
        match notices.get_mut(keep_from) {
            Some((key, first)) => {
                first.earlier_dropped = first.earlier_dropped.saturating_add(dropped);
                self.waiting_notices.insert(&*key, to_json(first))?;
                Ok(0)
            }
            None => Ok(dropped),
        }
    }

    /// Queues a notice for `user` until their DM is ready, durably (see
    /// [`WaitingNoticeBounds`] for what is dropped to stay bounded). The same `txn_id` queued
    /// again (the outbox delivering the same ledger change after a restart) is kept once.
    pub async fn queue_notice(
        &self,
        user: &UserId,
        txn_id: OwnedTransactionId,
        body: &str,
        now_ms: u64,
        bounds: WaitingNoticeBounds,
    ) -> Result<Queued, StoreError> {
        let queued = {
            let _guard = self.notices_lock.lock();
            if self
                .notices_of(user)?
                .iter()
                .any(|(_, n)| n.txn_id == txn_id)
            {
                // Queued before, perhaps without a flush that succeeded: flushed below.
                Queued::Waiting
            } else {
                self.queue_new(user, txn_id, body, now_ms, bounds)?
            }
        };
        self.flush().await?;
        Ok(queued)
    }

    /// The part of [`Self::queue_notice`] for a notice not queued yet (`notices_lock` held).
    fn queue_new(
        &self,
        user: &UserId,
        txn_id: OwnedTransactionId,
        body: &str,
        now_ms: u64,
        bounds: WaitingNoticeBounds,
    ) -> Result<Queued, StoreError> {
        let queued = {
            let carried = self.prune_user(user, now_ms, bounds, true)?;
            // `len` scans the tree: fine, it is bounded by `total_max` and this runs only for
            // notices that could not go out.
            if self.waiting_notices.len() >= bounds.total_max {
                self.prune_all_lapsed(now_ms, bounds)?;
            }
            if self.waiting_notices.len() >= bounds.total_max {
                Queued::Full
            } else {
                let mut key = user_prefix(user.as_str());
                key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
                let notice = WaitingNotice {
                    txn_id,
                    body: body.to_owned(),
                    queued_ms: now_ms,
                    earlier_dropped: carried,
                };
                self.waiting_notices.insert(key, to_json(&notice))?;
                Queued::Waiting
            }
        };
        Ok(queued)
    }

    /// Drops every lapsed notice of every user (bounded by `total_max` entries).
    fn prune_all_lapsed(&self, now_ms: u64, bounds: WaitingNoticeBounds) -> Result<(), StoreError> {
        let mut lapsed = Vec::new();
        for item in self.waiting_notices.iter() {
            let (key, value) = item?;
            let notice: WaitingNotice =
                serde_json::from_slice(&value).map_err(|_| StoreError::Corrupt {
                    tree: USERID_WAITINGNOTICE,
                    reason: "value is not the expected JSON",
                })?;
            if now_ms.saturating_sub(notice.queued_ms) >= bounds.age_max_ms {
                lapsed.push(key);
            }
        }
        for key in lapsed {
            self.waiting_notices.remove(key)?;
        }
        Ok(())
    }

    /// The user's waiting notices, oldest first, after dropping the lapsed ones (their count
    /// moves onto the oldest kept one; with none kept it is lost: the ledger history shows
    /// every change anyway).
    pub async fn waiting_notices(
        &self,
        user: &UserId,
        now_ms: u64,
        bounds: WaitingNoticeBounds,
    ) -> Result<Vec<(NoticeSeq, WaitingNotice)>, StoreError> {
        let notices = {
            let _guard = self.notices_lock.lock();
            self.prune_user(user, now_ms, bounds, false)?;
            self.notices_of(user)?
        };
        self.flush().await?;
        notices
            .into_iter()
            .map(|(key, notice)| {
                let seq = key
                    .len()
                    .checked_sub(8)
                    .and_then(|at| key[at..].try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or(StoreError::Corrupt {
                        tree: USERID_WAITINGNOTICE,
                        reason: "key has no sequence number",
                    })?;
                Ok((NoticeSeq(seq), notice))
            })
            .collect()
    }

    /// Removes a notice once it was sent, durably.
    pub async fn remove_waiting_notice(
        &self,
        user: &UserId,
        seq: NoticeSeq,
    ) -> Result<(), StoreError> {
        let mut key = user_prefix(user.as_str());
        key.extend_from_slice(&seq.0.to_be_bytes());
        {
            let _guard = self.notices_lock.lock();
            self.waiting_notices.remove(key)?;
        }
        self.flush().await
    }

    /// Moves the outbox cursor, durably.
    pub async fn set_outbox_cursor(&self, cursor: OutboxCursor) -> Result<(), StoreError> {
        let mut bytes = cursor.record_seq.to_be_bytes().to_vec();
        bytes.extend_from_slice(&cursor.entry_index.to_be_bytes());
        self.meta.insert(OUTBOX_CURSOR, bytes)?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(payer: &str, created_ms: u64, id: u128) -> Challenge {
        Challenge {
            kind: ChallengeKind::Pay,
            transfer_id: id,
            payer: payer.try_into().unwrap(),
            payee: "@bob:hs".into(),
            amount_minor: 1250,
            amount: "12.50".into(),
            currency: "EUR".into(),
            room_id: "!r:hs".try_into().unwrap(),
            event_id: "$e".try_into().unwrap(),
            memo: None,
            created_ms,
            expires_at_ms: created_ms + 1000,
            device_id: Some("PHONE".into()),
        }
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = PaymentStore::open(dir.path()).unwrap();
            store
                .put_pin("@a:hs", &PinRecord::new("$argon2id$x".into()))
                .await
                .unwrap();
            store
                .put_dialog(
                    "@a:hs",
                    Some(&Dialog::NewPin {
                        expires_at_ms: 100,
                        change: false,
                    }),
                )
                .await
                .unwrap();
            store
                .put_challenge(&challenge("@a:hs", 20, 2))
                .await
                .unwrap();
            store
                .put_challenge(&challenge("@a:hs", 10, 1))
                .await
                .unwrap();
            store
                .put_challenge(&challenge("@ab:hs", 5, 3))
                .await
                .unwrap();
            store
                .set_outbox_cursor(OutboxCursor {
                    record_seq: 7,
                    entry_index: 3,
                })
                .await
                .unwrap();
            let profile = UserProfile {
                dm_room: Some("!dm:hs".try_into().unwrap()),
                dm_joined: true,
                ..UserProfile::default()
            };
            store.put_profile("@a:hs", &profile).await.unwrap();
        }
        let store = PaymentStore::open(dir.path()).unwrap();
        assert!(store.pin("@a:hs").unwrap().is_some());
        assert!(store.dialog("@a:hs", 50).unwrap().is_some());
        assert!(store.dialog("@a:hs", 100).unwrap().is_none(), "lapsed");
        let ids: Vec<u128> = store
            .challenges("@a:hs")
            .unwrap()
            .iter()
            .map(|c| c.transfer_id)
            .collect();
        assert_eq!(ids, vec![1, 2], "oldest first, other users apart");
        assert_eq!(store.outbox_cursor().unwrap().unwrap().record_seq, 7);
        assert_eq!(store.dm_owner("!dm:hs").unwrap().unwrap().0, "@a:hs");
        assert!(store.dm_owner("!other").unwrap().is_none());
    }

    /// The stored encodings are a format: a change here must be deliberate (and migrated).
    #[test]
    fn stored_encodings_are_pinned() {
        let dialog = Dialog::ConfirmPin {
            expires_at_ms: 5,
            hash: "h".into(),
            change: true,
        };
        assert_eq!(
            String::from_utf8(to_json(&dialog)).unwrap(),
            r#"{"step":"confirm_pin","expires_at_ms":5,"hash":"h","change":true}"#
        );
        assert_eq!(
            String::from_utf8(to_json(&challenge("@a:hs", 10, 1))).unwrap(),
            r#"{"kind":"pay","transfer_id":1,"payer":"@a:hs","payee":"@bob:hs","amount_minor":1250,"amount":"12.50","currency":"EUR","room_id":"!r:hs","event_id":"$e","memo":null,"created_ms":10,"expires_at_ms":1010,"device_id":"PHONE"}"#
        );
        // Challenges stored before `device_id` existed still read, with the device unknown.
        let old = r#"{"kind":"pay","transfer_id":1,"payer":"@a:hs","payee":"@bob:hs","amount_minor":1250,"amount":"12.50","currency":"EUR","room_id":"!r:hs","event_id":"$e","memo":null,"created_ms":10,"expires_at_ms":1010}"#;
        let read: Challenge = serde_json::from_str(old).unwrap();
        assert_eq!(read.device_id, None);
        assert_eq!(
            read,
            Challenge {
                device_id: None,
                ..challenge("@a:hs", 10, 1)
            }
        );
        assert_eq!(
            String::from_utf8(to_json(&UserProfile::default())).unwrap(),
            r#"{"dm_room":null,"dm_joined":false,"pin_compromised":false,"accept_new_keys_at_pin_set":false}"#
        );
        assert_eq!(
            String::from_utf8(to_json(&EventOutcome::Declined(DeclineRecord {
                reason: "too_late".into(),
                sentence: "s".into(),
                payee: "@bob:hs".try_into().unwrap(),
                amount: "12.50".into(),
                currency: "EUR".into(),
            })))
            .unwrap(),
            r#"{"outcome":"declined","reason":"too_late","sentence":"s","payee":"@bob:hs","amount":"12.50","currency":"EUR"}"#
        );
        assert_eq!(
            String::from_utf8(to_json(&EventOutcome::PinChecked {
                attempt: PinAttemptResult::Wrong { attempts_left: 4 }
            }))
            .unwrap(),
            r#"{"outcome":"pin_checked","attempt":{"result":"wrong","attempts_left":4}}"#
        );
        assert_eq!(
            String::from_utf8(to_json(&EventOutcome::Started)).unwrap(),
            r#"{"outcome":"started"}"#
        );
        assert_eq!(
            String::from_utf8(to_json(&WaitingNotice {
                txn_id: "mxpay-ob-topup-1".into(),
                body: "b".into(),
                queued_ms: 7,
                earlier_dropped: 2,
            }))
            .unwrap(),
            r#"{"txn_id":"mxpay-ob-topup-1","body":"b","queued_ms":7,"earlier_dropped":2}"#
        );
        assert_eq!(
            String::from_utf8(to_json(&PinRecord::new("h".into()))).unwrap(),
            r#"{"hash":"h","failed_in_row":0,"lockouts":0,"locked_until_ms":null}"#
        );
    }

    /// The first decision recorded for an event wins; a PIN swap and its event's outcome are
    /// written together, and not at all when the record changed.
    #[tokio::test]
    async fn event_outcomes_first_decision_wins_and_pin_swaps_record_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = PaymentStore::open(dir.path()).unwrap();
        assert_eq!(store.outcome("$e").unwrap(), None);
        let declined = |reason: &str| {
            EventOutcome::Declined(DeclineRecord {
                reason: reason.into(),
                sentence: "s".into(),
                payee: "@bob:hs".try_into().unwrap(),
                amount: "1".into(),
                currency: "EUR".into(),
            })
        };
        let first = declined("insufficient_funds");
        assert_eq!(
            store.put_outcome_if_absent("$e", &first).await.unwrap(),
            None
        );
        assert_eq!(
            store
                .put_outcome_if_absent("$e", &declined("limit_exceeded"))
                .await
                .unwrap(),
            Some(first.clone()),
            "the earlier decision is kept and returned"
        );
        assert_eq!(store.outcome("$e").unwrap(), Some(first.clone()));

        store
            .put_pin("@a:hs", &PinRecord::new("h".into()))
            .await
            .unwrap();
        let (mut record, version) = store.pin_versioned("@a:hs").unwrap().unwrap();
        record.failed_in_row = 1;
        let written = store
            .swap_pin_recording("@a:hs", &version, &record, "$pin", |tag| {
                EventOutcome::PinBegun {
                    record_version: tag,
                }
            })
            .await
            .unwrap()
            .expect("swapped");
        assert_eq!(
            store.outcome("$pin").unwrap(),
            Some(EventOutcome::PinBegun {
                record_version: pin_version_tag(&written)
            })
        );
        // Against a stale version: neither the record nor the outcome is written.
        record.failed_in_row = 2;
        let stale = store
            .swap_pin_recording("@a:hs", &version, &record, "$pin-2", |_| {
                EventOutcome::Started
            })
            .await
            .unwrap();
        assert_eq!(stale, None);
        assert_eq!(store.outcome("$pin-2").unwrap(), None);
        assert_eq!(store.pin("@a:hs").unwrap().unwrap().failed_in_row, 1);
        drop(store);
        let store = PaymentStore::open(dir.path()).unwrap();
        assert_eq!(store.outcome("$e").unwrap(), Some(first), "durable");
    }

    /// Waiting notices keep their order per user, are kept once per transaction id, survive a
    /// reopen, and stay within their bounds, counting what was dropped on the next one.
    #[tokio::test]
    async fn waiting_notices_are_ordered_deduplicated_durable_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let a: &UserId = "@a:hs".try_into().unwrap();
        let b: &UserId = "@b:hs".try_into().unwrap();
        let bounds = WaitingNoticeBounds {
            per_user_max: 3,
            total_max: 5,
            age_max_ms: 1_000,
        };
        let txn = |n: u32| OwnedTransactionId::from(format!("t{n}"));
        {
            let store = PaymentStore::open(dir.path()).unwrap();
            for n in 1..=2 {
                let queued = store
                    .queue_notice(a, txn(n), &format!("n{n}"), 10, bounds)
                    .await
                    .unwrap();
                assert_eq!(queued, Queued::Waiting);
            }
            // The same ledger change told again is kept once.
            store
                .queue_notice(a, txn(1), "n1", 20, bounds)
                .await
                .unwrap();
            store
                .queue_notice(b, txn(9), "b", 10, bounds)
                .await
                .unwrap();
            assert!(store.has_waiting_notices(a).unwrap());
            assert!(!store
                .has_waiting_notices("@ab:hs".try_into().unwrap())
                .unwrap());
        }
        let store = PaymentStore::open(dir.path()).unwrap();
        let bodies = |list: Vec<(NoticeSeq, WaitingNotice)>| -> Vec<(String, u32)> {
            list.into_iter()
                .map(|(_, n)| (n.body, n.earlier_dropped))
                .collect()
        };
        let waiting = store.waiting_notices(a, 30, bounds).await.unwrap();
        assert_eq!(
            bodies(waiting.clone()),
            vec![("n1".into(), 0), ("n2".into(), 0)]
        );
        assert_eq!(waiting[0].1.txn_id, txn(1));

        // Over the per-user bound the oldest goes, counted on the oldest kept.
        for n in 3..=4 {
            store
                .queue_notice(a, txn(n), &format!("n{n}"), 40, bounds)
                .await
                .unwrap();
        }
        let waiting = store.waiting_notices(a, 50, bounds).await.unwrap();
        assert_eq!(
            bodies(waiting.clone()),
            vec![("n2".into(), 1), ("n3".into(), 0), ("n4".into(), 0)]
        );
        // In total: 3 of a + 1 of b; one more fits, the next does not.
        store
            .queue_notice(b, txn(10), "b2", 50, bounds)
            .await
            .unwrap();
        assert_eq!(
            store
                .queue_notice(b, txn(11), "b3", 50, bounds)
                .await
                .unwrap(),
            Queued::Full
        );
        // Sent notices are removed; lapsed ones are dropped and counted.
        store.remove_waiting_notice(a, waiting[0].0).await.unwrap();
        let waiting = store.waiting_notices(a, 1_020, bounds).await.unwrap();
        assert_eq!(bodies(waiting), vec![("n3".into(), 0), ("n4".into(), 0)]);
        // b's first notice (queued at 10) lapsed at 1_010: counted on the second.
        let waiting = store.waiting_notices(b, 1_020, bounds).await.unwrap();
        assert_eq!(bodies(waiting), vec![("b2".into(), 1)]);
        // Full again (a: 2, b: 1, c: 2); lapsed notices of others make room.
        let c: &UserId = "@c:hs".try_into().unwrap();
        store
            .queue_notice(c, txn(20), "c1", 1_020, bounds)
            .await
            .unwrap();
        store
            .queue_notice(c, txn(21), "c2", 1_020, bounds)
            .await
            .unwrap();
        let d: &UserId = "@d:hs".try_into().unwrap();
        assert_eq!(
            store
                .queue_notice(d, txn(30), "d1", 1_030, bounds)
                .await
                .unwrap(),
            Queued::Full
        );
        assert_eq!(
            store
                .queue_notice(d, txn(30), "d1", 2_030, bounds)
                .await
                .unwrap(),
            Queued::Waiting
        );
        assert_eq!(
            store.waiting_notices(c, 2_030, bounds).await.unwrap(),
            vec![]
        );
    }

    #[test]
    fn dialog_debug_hides_the_hash() {
        let dialog = Dialog::ConfirmPin {
            expires_at_ms: 1,
            hash: "$argon2id$secret".into(),
            change: false,
        };
        assert!(!format!("{dialog:?}").contains("argon2"));
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_of_a_dialog_hides_the_first_pin_hash() {
        let dialog = Dialog::ConfirmPin {
            expires_at_ms: 1,
            hash: "$argon2id$v=19$hash-very-secret".to_owned(),
            change: false,
        };
        let debug = format!("{dialog:?} {dialog:#?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
