//! The orchestrator's last step: applies a [`Decision`] of the [`core`](super::core) in its
//! fixed order (the decision recorded, then the ledger, then the flow's state, then the
//! messages, then the event marked handled) and owns the retry rule: any failure here is
//! returned, the whole transaction is handled again later, and because every step is
//! idempotent (first-wins records, ledger ids from events, transaction ids from events) the
//! retry finishes what was left without doing anything twice.
//!
//! Faults for tests are injected here, where effects are applied ([`Faults`]).

use std::path::PathBuf;

use super::core::{Decision, LedgerOp, Outgoing, OutgoingBody, Record};
use super::send_queue::SendOne;
use super::{txn, Payments, PaymentsError};
use crate::crypto::CryptoError;
use crate::ledger::LedgerError;
use crate::policy::pin::PinRecord;
use crate::store::held::HeldBounds;
use crate::store::requests::{RequestBounds, Updated};
use ruma::OwnedEventId;

/// Test-only faults at the effect layer, set up by the wiring (debug builds only; see
/// [`super::FAULT_FAIL_REPLY_ENV`] and [`super::FAULT_CRASH_BEFORE_RECEIPT_ENV`], how the
/// integration tests reach a spawned mxpay). Production builds always get [`Faults::none`].
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every message of this purpose fails as if the homeserver were unreachable (a
    /// retryable failure) while the file does not exist; purpose `room`: every message to the
    /// room whose id the file holds, while it does.
    pub fail_sends: Option<(String, PathBuf)>,
    /// mxpay aborts right after a payment was posted and before its receipt is sent, once:
    /// the file is created first, so the restarted process runs on.
    pub crash_before_receipt: Option<PathBuf>,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// The faults the environment asks for, in debug builds; none in release builds, so no
    /// environment variable can make a production mxpay abort between a post and its receipt.
    pub fn from_env() -> Self {
        if !cfg!(debug_assertions) {
            return Self::none();
        }
        Self {
            fail_sends: std::env::var(super::FAULT_FAIL_REPLY_ENV)
                .ok()
                .and_then(|v| {
                    let (purpose, file) = v.split_once(':')?;
                    Some((purpose.to_owned(), file.into()))
                }),
            crash_before_receipt: std::env::var_os(super::FAULT_CRASH_BEFORE_RECEIPT_ENV)
                .map(Into::into),
        }
    }

    /// A retryable failure for a message of `purpose` to `room_id`, while its switch says so:
    /// for purpose `room`, every message to the room whose id the file holds (a stuck room).
    pub(super) fn before_send(&self, purpose: &str, room_id: &str) -> Result<(), PaymentsError> {
        let stuck_room = |file: &PathBuf| {
            std::fs::read_to_string(file).is_ok_and(|stuck| stuck.trim() == room_id)
        };
        match &self.fail_sends {
            Some((faulty, file))
                if (faulty == purpose && !file.exists())
                    || (faulty == "room" && stuck_room(file)) =>
            {
                tracing::warn!(purpose, "test fault: failing a message before it is sent");
                Err(
                    CryptoError::Transport(crate::homeserver::HomeserverError::Connect {
                        url: "test fault".to_owned(),
                        reason: "a test fault is set".to_owned(),
                    })
                    .into(),
                )
            }
            _ => Ok(()),
        }
    }
}

impl Payments {
    /// Applies `decision` in its fixed order; see the module documentation.
    pub(super) async fn apply(&self, decision: Decision) -> Result<(), PaymentsError> {
        let Decision {
            record,
            ledger,
            store,
            sends,
            poke_outbox,
            finish,
        } = decision;
        for write in record {
            self.apply_record(write).await?;
        }
        for op in ledger {
            match op {
                LedgerOp::Void(id) => match self.ledger.void(id).await {
                    // Refused: it ended already (posted, voided, expired), as the decision
                    // wanted or told.
                    Ok(_) | Err(LedgerError::Rejected(_)) => {}
                    Err(e) => return Err(e.into()),
                },
                LedgerOp::Post(id) => match self.ledger.post(id, None).await {
                    // Refused: it ended already (a retry after the post, or it expired
                    // meanwhile); the outbox tells what the ledger did.
                    Ok(_) => tracing::info!(transfer = %id, "held payment accepted and posted"),
                    Err(LedgerError::Rejected(error)) => {
                        tracing::info!(transfer = %id, %error, "held payment not posted: it ended already")
                    }
                    Err(e) => return Err(e.into()),
                },
            }
        }
        for write in store {
            self.apply_record(write).await?;
        }
        if poke_outbox {
            self.poke.poke();
        }
        // The messages go to the send queue, in order. One whose event id a later decision
        // may look up by itself (a request's or a held payment's notice) is waited for; the
        // others (a challenge's id is only needed for a reply, which comes after someone saw
        // it) are not.
        let mut sent = Vec::with_capacity(sends.len());
        for outgoing in sends {
            let wait_now = outgoing.link.is_some() || outgoing.held_notice_of.is_some();
            let answer = self.send_queue().enqueue(outgoing).await;
            if wait_now {
                sent_or_error(answer).await?;
            } else {
                sent.push(answer);
            }
        }
        // The event is marked handled only after its messages went out: a crash before leaves
        // it to a retry, which repeats them with the same transaction ids.
        let store = self.store.clone();
        let tail = async move {
            for answer in sent {
                sent_or_error(answer).await?;
            }
            if let Some(event_id) = finish {
                store.mark_done(event_id.as_str()).await?;
            }
            Ok::<(), PaymentsError>(())
        };
        let mut tail = Some(Box::pin(tail) as futures_util::future::BoxFuture<'static, _>);
        let _ = TAILS.try_with(|tails| {
            tails
                .lock()
                .expect("tails lock")
                .push(tail.take().expect("taken once"));
        });
        match tail {
            // Not inside a job: wait here.
            Some(tail) => tail.await,
            None => Ok(()),
        }
    }

    /// Sends `outgoing` through the send queue (after what was queued for its room before)
    /// and waits for it: for senders that need its event id or must know it went out (the
    /// outbox).
    pub(super) async fn send_in_order(
        &self,
        outgoing: Outgoing,
    ) -> Result<OwnedEventId, PaymentsError> {
        sent_or_error(self.send_queue().enqueue(outgoing).await).await
    }

    async fn apply_record(&self, write: Record) -> Result<(), PaymentsError> {
        match write {
            Record::OutcomeIfAbsent { event_id, outcome } => {
                // A decision recorded earlier for the event wins; the callers check for one
                // before deciding (transactions are handled one at a time), so a different one
                // here is worth a warning, never a second decision.
                if let Some(earlier) = self
                    .store
                    .put_outcome_if_absent(event_id.as_str(), &outcome)
                    .await?
                {
                    if earlier != outcome {
                        tracing::warn!(
                            ?earlier,
                            "an event was decided before; the first decision stands"
                        );
                    }
                }
            }
            Record::Outcome { event_id, outcome } => {
                self.store.put_outcome(event_id.as_str(), &outcome).await?
            }
            Record::VoidReason {
                transfer_id,
                reason,
            } => {
                self.store
                    .update_note(transfer_id.0, |note| {
                        note.void_reason = Some(super::reason_code(reason))
                    })
                    .await?
            }
            Record::PutChallenge(challenge) => self.store.put_challenge(&challenge).await?,
            Record::RemoveChallenge(challenge) => self.store.remove_challenge(&challenge).await?,
            Record::PinExposed { user } => {
                let mut profile = self.store.profile(user.as_str())?;
                if !profile.pin_compromised {
                    profile.pin_compromised = true;
                    self.store.put_profile(user.as_str(), &profile).await?;
                }
            }
            Record::Dialog { user, next } => {
                self.store.put_dialog(user.as_str(), next.as_ref()).await?
            }
            Record::DialogStep {
                user,
                next,
                event_id,
                reply,
            } => {
                self.store
                    .put_dialog_step(user.as_str(), next.as_ref(), event_id.as_str(), &reply)
                    .await?
            }
            Record::NewPin { user, hash } => {
                // Setting the same hash again (a retry after a crash here) is harmless.
                self.store
                    .put_pin(user.as_str(), &PinRecord::new(hash))
                    .await?;
                let mut profile = self.store.profile(user.as_str())?;
                if profile.pin_compromised {
                    profile.pin_compromised = false;
                    self.store.put_profile(user.as_str(), &profile).await?;
                }
            }
            Record::KeysAcceptedAtPinSet { user } => {
                let mut profile = self.store.profile(user.as_str())?;
                if profile.accept_new_keys_at_pin_set {
                    profile.accept_new_keys_at_pin_set = false;
                    self.store.put_profile(user.as_str(), &profile).await?;
                }
            }
            Record::AcceptIdentity { user } => {
                self.messenger.crypto.accept_identity(&user).await?;
            }
            Record::RequestUpdate {
                before,
                after,
                acted_by,
            } => {
                let updated = self
                    .store
                    .requests()
                    .update_acted(&before, &after, self.clock.now_ms(), acted_by.as_deref())
                    .await?;
                if let Updated::Conflict(_) = updated {
                    // Another event changed the request since it was read: the whole
                    // transaction runs again and decides from the current request.
                    return Err(PaymentsError::RequestChanged);
                }
            }
            Record::Held(record) => {
                self.store
                    .held()
                    .update(&record, self.clock.now_ms(), HeldBounds::default())
                    .await?
            }
        }
        Ok(())
    }
}

/// What sends one decided message: the send queue's sender (see [`super::send_queue`]).
#[derive(Clone)]
pub(super) struct MessageSender {
    pub(super) faults: Faults,
    pub(super) messenger: super::Messenger,
    pub(super) store: crate::store::payments::PaymentStore,
    pub(super) clock: crate::clock::SharedClock,
}

#[async_trait::async_trait]
impl SendOne for MessageSender {
    /// Sends one message, with its transaction id derived from its purpose and key, then
    /// remembers its event id where the decision asked.
    async fn send_one(&self, outgoing: Outgoing) -> Result<OwnedEventId, PaymentsError> {
        let Outgoing {
            room_id,
            body,
            purpose,
            key,
            remember_notice_of,
            link,
            held_notice_of,
        } = outgoing;
        self.faults.before_send(purpose, room_id.as_str())?;
        let txn_id = txn(purpose, &key);
        let sent = match body {
            OutgoingBody::Notice { body, reply_to } => {
                self.messenger
                    .notice(&room_id, &body, reply_to.as_deref(), txn_id)
                    .await?
            }
            OutgoingBody::Event {
                event_type,
                content,
            } => {
                self.messenger
                    .send(&room_id, event_type, content, txn_id)
                    .await?
            }
        };
        if let Some((id, role)) = link {
            self.store
                .requests()
                .link_event_as(&sent, &id, &role, RequestBounds::default())
                .await?;
        }
        if let Some(transfer_id) = held_notice_of {
            let held = self.store.held();
            if let Some(mut record) = held.get(transfer_id.0)? {
                if record.notice_event_id.is_none() {
                    record.notice_event_id = Some(sent.clone());
                    held.update(&record, self.clock.now_ms(), HeldBounds::default())
                        .await?;
                }
                // The payee was asked: the payer's challenge has nothing left to confirm.
                if let Some(challenge) =
                    self.store.challenge(record.payer.as_str(), transfer_id.0)?
                {
                    self.store.remove_challenge(&challenge).await?;
                }
            }
        }
        if let Some(transfer_id) = remember_notice_of {
            self.store
                .update_note(transfer_id.0, |note| {
                    note.dm_event_id = Some(sent.to_string())
                })
                .await?;
        }
        Ok(sent)
    }
}

/// What a job's decisions left to finish once their messages are sent (each: wait for the
/// messages, then mark the event handled).
type Tails =
    std::sync::Mutex<Vec<futures_util::future::BoxFuture<'static, Result<(), PaymentsError>>>>;

tokio::task_local! {
    /// Set while a job of the inbox worker runs ([`collecting_tails`]): `apply` leaves the end
    /// of each decision here instead of waiting for its messages.
    static TAILS: Tails;
}

/// Runs `job` (a job of the inbox worker); returns its result and what its decisions left to
/// finish once their messages are sent. Outside such a scope (the outbox, sweeps) `apply`
/// waits for its messages itself.
pub(super) async fn collecting_tails<T>(
    job: impl std::future::Future<Output = T>,
) -> (
    T,
    Option<futures_util::future::BoxFuture<'static, Result<(), PaymentsError>>>,
) {
    TAILS
        .scope(Tails::default(), async {
            let result = job.await;
            let tails = TAILS.with(|tails| std::mem::take(&mut *tails.lock().expect("tails lock")));
            let tail = (!tails.is_empty()).then(|| {
                let all: futures_util::future::BoxFuture<'static, _> = Box::pin(async move {
                    for tail in tails {
                        tail.await?;
                    }
                    Ok(())
                });
                all
            });
            (result, tail)
        })
        .await
}

/// The queue's answer for one message: its event id.
pub(super) async fn sent_or_error(
    answer: super::send_queue::Sent,
) -> Result<OwnedEventId, PaymentsError> {
    match answer.await {
        Ok(result) => result,
        // The queue dropped it without answering: only when the runtime stops.
        Err(_) => Err(PaymentsError::SendQueueStopped),
    }
}
