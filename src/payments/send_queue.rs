//! The send queue: what a decision says goes out here, so a job finishes deciding without
//! waiting for the homeserver.
//!
//! Messages are queued per room and sent in the order they were decided (one message of a
//! room at a time), rooms beside each other, at most [`SendQueuePolicy::workers_max`] sends at
//! once. A message that fails transiently is retried with backoff in its room's queue (the
//! same transaction id each time, so the homeserver shows it once); the worker is free for
//! other rooms while its room waits, so a room whose sends fail holds up only itself. A
//! permanent failure, or a transient one past [`SendQueuePolicy::attempts_max`], is handed to
//! whoever queued the message.
//!
//! Bounds: at most [`SendQueuePolicy::depth_max`] messages queued in all and
//! [`SendQueuePolicy::room_depth_max`] per room. A full queue makes [`SendQueue::enqueue`]
//! wait (the deciding job slows down, and through it the inbox and the homeserver): nothing
//! is dropped.
//!
//! The queue holds nothing durable. Crash safety comes from the inbox: a job's transaction
//! leaves the inbox only once the messages its decisions queued were sent (see
//! [`crate::pipeline::JobTail`]), so after a crash the transaction is handled again, finds its
//! decisions recorded, and queues the same messages with the same transaction ids.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ruma::{OwnedEventId, OwnedRoomId};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::core::Outgoing;
use super::PaymentsError;

/// Bounds and retry rules of the send queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendQueuePolicy {
    /// Messages queued and not yet sent, in all rooms, at most; beyond, queueing waits.
    pub depth_max: usize,
    /// Messages queued for one room, at most; beyond, queueing for that room waits.
    pub room_depth_max: usize,
    /// Sends in flight at the same time (different rooms), at most.
    pub workers_max: usize,
    /// Attempts per message on transient errors, the first included (the inbox worker's
    /// rule for a job).
    pub attempts_max: u32,
    /// First delay between attempts; doubles each time.
    pub backoff_base_ms: u64,
    /// Largest delay between attempts.
    pub backoff_max_ms: u64,
    /// A room's queue with nothing to send for this long ends; the next message starts it.
    pub room_idle_ms: u64,
}

impl Default for SendQueuePolicy {
    fn default() -> Self {
        Self {
            depth_max: 1024,
            room_depth_max: 64,
            workers_max: 8,
            attempts_max: 10,
            backoff_base_ms: 500,
            backoff_max_ms: 60_000,
            room_idle_ms: 30_000,
        }
    }
}

impl SendQueuePolicy {
    /// The wait before attempt `attempt + 1` (doubling, capped).
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        Duration::from_millis(
            self.backoff_base_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }
}

/// Sends one message (and does what must follow its send: remembering its event id).
#[async_trait]
pub trait SendOne: Send + Sync + 'static {
    /// Sends `outgoing` and answers its event id; the same message sent again must use the
    /// same transaction id.
    async fn send_one(&self, outgoing: Outgoing) -> Result<OwnedEventId, PaymentsError>;
}

/// The answer for one queued message: its event id once sent, the error once given up.
pub type Sent = oneshot::Receiver<Result<OwnedEventId, PaymentsError>>;

/// The send queue. Cheap to clone.
#[derive(Clone)]
pub struct SendQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SendQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue")
            .field("policy", &self.inner.policy)
            .field("depth", &self.depth())
            .finish_non_exhaustive()
    }
}

struct Inner {
    policy: SendQueuePolicy,
    sender: Arc<dyn SendOne>,
    /// One permit per message that may be queued, in all rooms.
    depth: Arc<Semaphore>,
    /// One permit per send in flight.
    workers: Semaphore,
    rooms: Mutex<HashMap<OwnedRoomId, Room>>,
    queued: AtomicUsize,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

struct Room {
    queue: mpsc::UnboundedSender<Queued>,
    /// One permit per message that may be queued for this room. Shared with those waiting
    /// for a permit, so the room ends only when nobody is (see [`Inner::run_room`]).
    slots: Arc<Semaphore>,
}

struct Queued {
    outgoing: Outgoing,
    done: oneshot::Sender<Result<OwnedEventId, PaymentsError>>,
    // Held until the message is sent or given up: the bounds count it until then.
    _slot: OwnedSemaphorePermit,
    _depth: OwnedSemaphorePermit,
}

impl SendQueue {
    /// A queue that sends through `sender`. Room workers start with their first message
    /// (inside the runtime) and end when idle.
    pub fn new(
        policy: SendQueuePolicy,
        sender: Arc<dyn SendOne>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        assert!(policy.depth_max > 0 && policy.room_depth_max > 0 && policy.workers_max > 0);
        Self {
            inner: Arc::new(Inner {
                policy,
                sender,
                depth: Arc::new(Semaphore::new(policy.depth_max)),
                workers: Semaphore::new(policy.workers_max),
                rooms: Mutex::new(HashMap::new()),
                queued: AtomicUsize::new(0),
                metrics,
            }),
        }
    }

    /// Messages queued and not yet sent or given up.
    pub fn depth(&self) -> usize {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Queues `outgoing` behind the messages decided before it for its room; waits while the
    /// queue (or the room's share of it) is full. The answer comes once it was sent.
    pub async fn enqueue(&self, outgoing: Outgoing) -> Sent {
        let inner = &self.inner;
        let depth = inner
            .depth
            .clone()
            .acquire_owned()
            .await
            .expect("the send queue's semaphore is never closed");
        let slots = {
            let mut rooms = inner.rooms.lock().expect("send queue lock");
            match rooms.get(&outgoing.room_id) {
                Some(room) => room.slots.clone(),
                None => {
                    let slots = Arc::new(Semaphore::new(inner.policy.room_depth_max));
                    let (queue, jobs) = mpsc::unbounded_channel();
                    rooms.insert(
                        outgoing.room_id.clone(),
                        Room {
                            queue,
                            slots: slots.clone(),
                        },
                    );
                    tokio::spawn(inner.clone().run_room(outgoing.room_id.clone(), jobs));
                    slots
                }
            }
        };
        let slot = slots
            .acquire_owned()
            .await
            .expect("the send queue's semaphore is never closed");
        let (done, sent) = oneshot::channel();
        let item = Queued {
            outgoing,
            done,
            _slot: slot,
            _depth: depth,
        };
        inner.queued.fetch_add(1, Ordering::Relaxed);
        let rooms = inner.rooms.lock().expect("send queue lock");
        // The room's worker removes it, under this lock, only when nothing is queued and
        // nobody waits for a slot (this caller held `slots` while waiting), so it is there.
        let room = rooms
            .get(&item.outgoing.room_id)
            .expect("a room with a waiting sender stays");
        if room.queue.send(item).is_err() {
            unreachable!("a room's worker ends only after removing its room");
        }
        inner.report(rooms.len());
        drop(rooms);
        sent
    }
}

impl Inner {
    fn count(&self, error_kind: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.error(error_kind);
        }
    }

    fn report(&self, rooms: usize) {
        if let Some(metrics) = &self.metrics {
            metrics.set_send_queue(self.queued.load(Ordering::Relaxed), rooms);
        }
    }

    /// Sends the room's messages in order until it has been idle for a while.
    async fn run_room(
        self: Arc<Self>,
        room_id: OwnedRoomId,
        mut jobs: mpsc::UnboundedReceiver<Queued>,
    ) {
        let idle = Duration::from_millis(self.policy.room_idle_ms);
        loop {
            let item = match tokio::time::timeout(idle, jobs.recv()).await {
                Ok(Some(item)) => item,
                Ok(None) => return,
                Err(_) => {
                    let mut rooms = self.rooms.lock().expect("send queue lock");
                    match jobs.try_recv() {
                        Ok(item) => item,
                        Err(_) => {
                            let waiting = rooms
                                .get(&room_id)
                                .is_some_and(|room| Arc::strong_count(&room.slots) > 1);
                            if waiting {
                                // Someone holds a slot or waits for one: their message
                                // comes.
                                continue;
                            }
                            rooms.remove(&room_id);
                            self.report(rooms.len());
                            return;
                        }
                    }
                }
            };
            let Queued {
                outgoing,
                done,
                _slot,
                _depth,
            } = item;
            let result = self.send_with_retries(outgoing).await;
            // Counted out (and its slots freed) before the answer, so whoever waits for it
            // sees the queue without it.
            self.queued.fetch_sub(1, Ordering::Relaxed);
            drop((_slot, _depth));
            let rooms = self.rooms.lock().expect("send queue lock").len();
            self.report(rooms);
            let _ = done.send(result);
        }
    }

    /// One message, retried on transient errors with backoff; no worker is held while
    /// waiting, so other rooms go on.
    async fn send_with_retries(&self, outgoing: Outgoing) -> Result<OwnedEventId, PaymentsError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = {
                let _worker = self
                    .workers
                    .acquire()
                    .await
                    .expect("the send queue's semaphore is never closed");
                self.sender.send_one(outgoing.clone()).await
            };
            match result {
                Ok(event_id) => return Ok(event_id),
                Err(error) if !error.is_transient() => {
                    self.count("send_permanent");
                    tracing::error!(room = %outgoing.room_id, purpose = outgoing.purpose, %error, "a message cannot be sent");
                    return Err(error);
                }
                Err(error) if attempt >= self.policy.attempts_max => {
                    self.count("send_permanent");
                    tracing::error!(room = %outgoing.room_id, purpose = outgoing.purpose, attempt, %error, "a message still fails; giving up");
                    return Err(error);
                }
                Err(error) => {
                    self.count("send_transient");
                    let delay = self.policy.backoff(attempt);
                    tracing::warn!(room = %outgoing.room_id, purpose = outgoing.purpose, attempt, delay_ms = delay.as_millis() as u64, %error, "a message failed; retrying in its room's queue");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::CryptoError;
    use crate::homeserver::HomeserverError;
    use ruma::owned_room_id;
    use std::collections::HashSet;

    /// Records what it sent; fails (transiently) every message of the rooms in `failing`;
    /// holds every send while `held` is set.
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<(OwnedRoomId, String)>>,
        failing: Mutex<HashSet<OwnedRoomId>>,
        held: std::sync::atomic::AtomicBool,
        attempts: AtomicUsize,
    }

    #[async_trait]
    impl SendOne for Recorder {
        async fn send_one(&self, outgoing: Outgoing) -> Result<OwnedEventId, PaymentsError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            while self.held.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if self.failing.lock().unwrap().contains(&outgoing.room_id) {
                return Err(CryptoError::Transport(HomeserverError::Connect {
                    url: "test".into(),
                    reason: "this room's sends fail".into(),
                })
                .into());
            }
            // Different lengths, so sends that overlapped within a room would finish out of
            // order.
            let n: u64 = outgoing.key.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis((n * 7) % 5 + 1)).await;
            self.sent
                .lock()
                .unwrap()
                .push((outgoing.room_id.clone(), outgoing.key.clone()));
            Ok(OwnedEventId::try_from(format!("${}", outgoing.key)).unwrap())
        }
    }

    fn message(room: &OwnedRoomId, n: usize) -> Outgoing {
        Outgoing::notice(room, format!("message {n}"), None, "test", n.to_string())
    }

    fn policy() -> SendQueuePolicy {
        SendQueuePolicy {
            depth_max: 64,
            room_depth_max: 16,
            workers_max: 4,
            attempts_max: 1_000,
            backoff_base_ms: 5,
            backoff_max_ms: 20,
            room_idle_ms: 20,
        }
    }

    async fn eventually(what: &str, done: impl Fn() -> bool) {
        for _ in 0..2_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("not within 10 s: {what}");
    }

    /// Several deciders queue into the same rooms at once (as jobs of different rooms do
    /// into a shared DM): each room gets its messages in the order they were queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_room_gets_its_messages_in_queued_order() {
        let recorder = Arc::new(Recorder::default());
        let queue = SendQueue::new(policy(), recorder.clone(), None);
        let rooms = [owned_room_id!("!a:hs"), owned_room_id!("!b:hs")];
        let mut deciders = Vec::new();
        for decider in 0..4usize {
            let (queue, rooms) = (queue.clone(), rooms.clone());
            deciders.push(tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..25usize {
                    let n = decider * 100 + i;
                    answers.push(queue.enqueue(message(&rooms[i % 2], n)).await);
                }
                answers
            }));
        }
        for decider in deciders {
            for answer in decider.await.unwrap() {
                answer.await.unwrap().unwrap();
            }
        }
        let sent = recorder.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 100, "every message was sent once");
        for room in &rooms {
            for decider in 0..4usize {
                let keys: Vec<usize> = sent
                    .iter()
                    .filter(|(r, _)| r == room)
                    .map(|(_, k)| k.parse().unwrap())
                    .filter(|n: &usize| n / 100 == decider)
                    .collect();
                let mut sorted = keys.clone();
                sorted.sort_unstable();
                assert_eq!(
                    keys, sorted,
                    "{room}: decider {decider}'s messages out of order"
                );
            }
        }
        assert_eq!(queue.depth(), 0);
    }

    /// A room whose sends keep failing is retried in its own queue without holding a worker:
    /// with a single worker, another room's message still goes out, and the stuck room's
    /// follows once its sends work again.
    #[tokio::test]
    async fn a_stuck_room_does_not_delay_another_room() {
        let recorder = Arc::new(Recorder::default());
        let stuck = owned_room_id!("!stuck:hs");
        let other = owned_room_id!("!other:hs");
        recorder.failing.lock().unwrap().insert(stuck.clone());
        let queue = SendQueue::new(
            SendQueuePolicy {
                workers_max: 1,
                ..policy()
            },
            recorder.clone(),
            None,
        );
        let stuck_sent = queue.enqueue(message(&stuck, 1)).await;
        let stuck_later = queue.enqueue(message(&stuck, 2)).await;
        eventually("the stuck room was tried", || {
            recorder.attempts.load(Ordering::SeqCst) >= 2
        })
        .await;
        let other_sent = queue.enqueue(message(&other, 3)).await;
        tokio::time::timeout(Duration::from_secs(10), other_sent)
            .await
            .expect("the other room is not held up by the stuck one")
            .unwrap()
            .unwrap();
        assert_eq!(
            *recorder.sent.lock().unwrap(),
            [(other.clone(), "3".to_owned())]
        );
        recorder.failing.lock().unwrap().clear();
        stuck_sent.await.unwrap().unwrap();
        stuck_later.await.unwrap().unwrap();
        let sent = recorder.sent.lock().unwrap().clone();
        assert_eq!(
            sent[1..],
            [(stuck.clone(), "1".to_owned()), (stuck, "2".to_owned())],
            "the stuck room keeps its order"
        );
    }

    /// A full queue makes the next enqueue wait (back-pressure on the deciding job) instead
    /// of growing or dropping: everything queued is sent once sending resumes.
    #[tokio::test]
    async fn a_full_queue_makes_deciders_wait_and_drops_nothing() {
        let recorder = Arc::new(Recorder::default());
        recorder.held.store(true, Ordering::SeqCst);
        let queue = SendQueue::new(
            SendQueuePolicy {
                depth_max: 4,
                room_depth_max: 4,
                ..policy()
            },
            recorder.clone(),
            None,
        );
        let rooms = [owned_room_id!("!a:hs"), owned_room_id!("!b:hs")];
        let mut answers = Vec::new();
        for n in 0..4 {
            answers.push(queue.enqueue(message(&rooms[n % 2], n)).await);
        }
        assert_eq!(queue.depth(), 4);
        // The fifth waits while the four are not sent.
        let fifth = {
            let queue = queue.clone();
            let room = rooms[0].clone();
            // Queued, then sent: the task ends only after both.
            tokio::spawn(async move { queue.enqueue(message(&room, 4)).await.await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(queue.depth(), 4, "a full queue makes the decider wait");
        recorder.held.store(false, Ordering::SeqCst);
        fifth.await.unwrap().unwrap().unwrap();
        for answer in answers {
            answer.await.unwrap().unwrap();
        }
        assert_eq!(
            recorder.sent.lock().unwrap().len(),
            5,
            "nothing was dropped"
        );
        // A room with nothing to send ends; the next message starts it again.
        eventually("idle rooms end", || {
            queue.inner.rooms.lock().unwrap().is_empty()
        })
        .await;
        queue
            .enqueue(message(&rooms[0], 5))
            .await
            .await
            .unwrap()
            .unwrap();
    }

    /// A permanent failure is handed to whoever queued the message, at once (no retries),
    /// and the room goes on with its next message.
    #[tokio::test]
    async fn a_permanent_failure_is_answered_and_the_room_goes_on() {
        struct Refuses;
        #[async_trait]
        impl SendOne for Refuses {
            async fn send_one(&self, outgoing: Outgoing) -> Result<OwnedEventId, PaymentsError> {
                if outgoing.key == "0" {
                    return Err(PaymentsError::Pin(
                        crate::policy::pin::PinError::NotFourDigits,
                    ));
                }
                Ok(ruma::owned_event_id!("$sent"))
            }
        }
        let queue = SendQueue::new(policy(), Arc::new(Refuses), None);
        let room = owned_room_id!("!a:hs");
        let refused = queue.enqueue(message(&room, 0)).await;
        let next = queue.enqueue(message(&room, 1)).await;
        assert!(refused.await.unwrap().is_err());
        next.await.unwrap().unwrap();
    }
}
