//! The inbox worker: feeds stored transactions to the [`Pipeline`], oldest first.
//!
//! A pipeline that splits transactions into jobs ([`Ingested::Jobs`]) gets them run beside
//! each other: transactions are *ingested* one at a time in arrival order (the crypto machine's
//! to-device messages and key counts before any decryption), then each job goes to the lane of
//! its room. A lane runs its jobs one at a time in arrival order, and jobs of one sender never
//! run at the same time (their PIN dialog is one conversation, across rooms); different rooms
//! run in parallel, up to [`WorkerPolicy::jobs_running_max`] at once. A job that fails
//! transiently is retried with backoff inside its lane, so a slow or failing room holds up only
//! itself. A transaction leaves the inbox once all its jobs are done (or failed for good);
//! after a crash, the unfinished ones are handled again whole, which every step allows.
//!
//! Bounds: at most [`WorkerPolicy::in_flight_max`] transactions are ingested and not finished;
//! beyond that the worker stops reading the inbox, and the HTTP edge answers the homeserver
//! late once the inbox holds `appservice.pending_transactions_max` (back-pressure, not
//! unbounded memory). Lanes hold only jobs of transactions in flight, and end when idle.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};

use super::wait_or_shutdown;
use crate::inbox::{Inbox, InboxTransaction};
use crate::metrics::Metrics;
use crate::pipeline::{transaction_events, Ingested, Job, JobTail, Pipeline, PipelineError};

/// Bounds of the inbox worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerPolicy {
    /// Transactions read from the inbox per batch.
    pub batch_max: usize,
    /// Attempts per transaction (or per job) on transient errors, the first included; after
    /// the last the transaction is moved to the failed list.
    pub attempts_max: u32,
    /// First delay between attempts; doubles each time.
    pub backoff_base_ms: u64,
    /// Largest delay between attempts.
    pub backoff_max_ms: u64,
    /// How often an idle worker looks at the inbox even without a wake-up.
    pub idle_poll_ms: u64,
    /// Transactions ingested whose jobs are not all done yet, at most.
    pub in_flight_max: usize,
    /// Jobs running at the same time, at most (different rooms and senders).
    pub jobs_running_max: usize,
    /// A lane (room) with nothing to do for this long ends; a new job starts it again.
    pub lane_idle_ms: u64,
}

impl Default for WorkerPolicy {
    fn default() -> Self {
        Self {
            batch_max: 64,
            attempts_max: 10,
            backoff_base_ms: 500,
            backoff_max_ms: 60_000,
            idle_poll_ms: 5_000,
            in_flight_max: 64,
            jobs_running_max: 16,
            lane_idle_ms: 30_000,
        }
    }
}

impl WorkerPolicy {
    /// The wait before attempt `attempt + 1` (doubling, capped).
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << (attempt.saturating_sub(1)).min(20);
        Duration::from_millis(
            self.backoff_base_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }
}

/// Feeds stored transactions to the pipeline, oldest first.
pub(super) struct Worker {
    pub(super) inbox: Inbox,
    pub(super) metrics: Arc<Metrics>,
    pub(super) pipeline: Arc<dyn Pipeline>,
    pub(super) policy: WorkerPolicy,
}

/// A transaction whose jobs are running.
struct InFlight {
    txn_id: String,
    jobs_left: usize,
    failed: bool,
    started: Instant,
}

/// A job finished (`failed`: for good) or was given up at shutdown (not reported).
struct JobDone {
    seq: u64,
    failed: bool,
}

/// How one attempt loop ended.
enum Attempts<T> {
    Done(T),
    /// Failed for good (permanent, or transient past `attempts_max`).
    Failed,
    /// Shutting down: left for the next start.
    Stopped,
}

impl Worker {
    pub(super) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let idle = Duration::from_millis(self.policy.idle_poll_ms);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let lanes = Arc::new(Lanes {
            lanes: std::sync::Mutex::new(HashMap::new()),
            senders: std::sync::Mutex::new(HashMap::new()),
            running: Arc::new(Semaphore::new(self.policy.jobs_running_max.max(1))),
            pipeline: self.pipeline.clone(),
            metrics: self.metrics.clone(),
            policy: self.policy,
            done: done_tx,
            shutdown: shutdown.clone(),
        });
        let mut in_flight: BTreeMap<u64, InFlight> = BTreeMap::new();
        // The last transaction handed on (ingested, or handled whole): the next read starts
        // after it, so transactions in flight are not read again.
        let mut after: Option<u64> = None;
        while !*shutdown.borrow() {
            while let Ok(done) = done_rx.try_recv() {
                self.job_done(&mut in_flight, done).await;
            }
            let room = self
                .policy
                .in_flight_max
                .max(1)
                .saturating_sub(in_flight.len());
            if room == 0 {
                tokio::select! {
                    Some(done) = done_rx.recv() => self.job_done(&mut in_flight, done).await,
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let batch = match self.inbox.pending(after, self.policy.batch_max.min(room)) {
                Ok(batch) => batch,
                Err(error) => {
                    self.metrics.error("inbox");
                    tracing::error!(%error, "cannot read the inbox");
                    wait_or_shutdown(&mut shutdown, idle).await;
                    continue;
                }
            };
            self.metrics.set_inbox_depth(self.inbox.depth());
            if batch.is_empty() {
                if in_flight.is_empty() {
                    // Idle: failed transactions past their retention go (at most once a
                    // minute: a prune reads every failed entry).
                    match self.inbox.prune_failed_if_due().await {
                        Ok(dropped) => self.failed_dropped(dropped),
                        Err(error) => {
                            self.metrics.error("inbox");
                            tracing::error!(%error, "cannot delete old failed transactions");
                        }
                    }
                }
                tokio::select! {
                    _ = self.inbox.wait_for_new() => {}
                    Some(done) = done_rx.recv() => self.job_done(&mut in_flight, done).await,
                    _ = shutdown.changed() => {}
                    _ = tokio::time::sleep(idle) => {}
                }
                continue;
            }
            for txn in batch {
                if *shutdown.borrow() {
                    return;
                }
                match self
                    .hand_on(&txn, &lanes, &mut in_flight, &mut shutdown)
                    .await
                {
                    Some(()) => after = Some(txn.seq),
                    // Shutdown, or the inbox could not be updated: read again from here.
                    None => break,
                }
            }
        }
    }

    /// Counts the events of a transaction as received.
    fn count_events(&self, txn: &InboxTransaction) {
        for event in transaction_events(&txn.body) {
            if let Some(event_type) = event.get("type").and_then(|t| t.as_str()) {
                self.metrics.event(event_type);
            }
        }
    }

    /// Ingests `txn` (retrying transient failures) and hands its jobs to their lanes, or
    /// handles it whole; `None` when it must be read again (shutdown, or the inbox failed).
    async fn hand_on(
        &self,
        txn: &InboxTransaction,
        lanes: &Arc<Lanes>,
        in_flight: &mut BTreeMap<u64, InFlight>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<()> {
        self.count_events(txn);
        let started = Instant::now();
        let ingested = self
            .attempts(&txn.txn_id, shutdown, || self.pipeline.ingest(txn))
            .await;
        let jobs = match ingested {
            Attempts::Stopped => return None,
            Attempts::Failed => return self.finish(txn.seq, &txn.txn_id, true, started).await,
            Attempts::Done(Ingested::Whole) => {
                let handled = self
                    .attempts(&txn.txn_id, shutdown, || self.pipeline.handle(txn))
                    .await;
                return match handled {
                    Attempts::Stopped => None,
                    Attempts::Done(()) => self.finish(txn.seq, &txn.txn_id, false, started).await,
                    Attempts::Failed => self.finish(txn.seq, &txn.txn_id, true, started).await,
                };
            }
            Attempts::Done(Ingested::Jobs(jobs)) => jobs,
        };
        if jobs.is_empty() {
            return self.finish(txn.seq, &txn.txn_id, false, started).await;
        }
        in_flight.insert(
            txn.seq,
            InFlight {
                txn_id: txn.txn_id.clone(),
                jobs_left: jobs.len(),
                failed: false,
                started,
            },
        );
        for job in jobs {
            lanes.dispatch(LaneItem {
                seq: txn.seq,
                txn_id: txn.txn_id.clone(),
                job,
            });
        }
        Some(())
    }

    /// One job of a transaction in flight finished; the last one finishes the transaction.
    async fn job_done(&self, in_flight: &mut BTreeMap<u64, InFlight>, done: JobDone) {
        let Some(entry) = in_flight.get_mut(&done.seq) else {
            return;
        };
        entry.jobs_left -= 1;
        entry.failed |= done.failed;
        if entry.jobs_left == 0 {
            let entry = in_flight
                .remove(&done.seq)
                .expect("the entry was just found");
            // Not finishing (the inbox failed) leaves it pending for the next start.
            let _ = self
                .finish(done.seq, &entry.txn_id, entry.failed, entry.started)
                .await;
        }
    }

    /// Calls `attempt` until it succeeds, fails for good, or runs out of attempts (waiting
    /// with backoff between), counting and logging each failure.
    async fn attempts<T, F, Fut>(
        &self,
        txn_id: &str,
        shutdown: &mut watch::Receiver<bool>,
        mut attempt: F,
    ) -> Attempts<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, PipelineError>>,
    {
        let mut tries = 0u32;
        loop {
            tries += 1;
            match attempt().await {
                Ok(value) => return Attempts::Done(value),
                Err(error) if !error.is_transient() => {
                    self.metrics.error("handler_permanent");
                    tracing::error!(%txn_id, %error, "transaction failed; moved to the failed list");
                    return Attempts::Failed;
                }
                Err(error) => {
                    self.metrics.error("handler_transient");
                    if tries >= self.policy.attempts_max {
                        tracing::error!(%txn_id, attempt = tries, %error, "transaction still failing; giving up, moved to the failed list");
                        return Attempts::Failed;
                    }
                    let delay = self.policy.backoff(tries);
                    tracing::warn!(%txn_id, attempt = tries, delay_ms = delay.as_millis() as u64, %error, "transaction failed; retrying");
                    if wait_or_shutdown(shutdown, delay).await {
                        return Attempts::Stopped;
                    }
                }
            }
        }
    }

    /// Takes a finished transaction out of the queue (to the failed list if `failed`);
    /// `None` when the inbox could not be updated.
    async fn finish(&self, seq: u64, txn_id: &str, failed: bool, started: Instant) -> Option<()> {
        self.metrics.handler_duration(started.elapsed());
        let marked = if failed {
            self.inbox
                .mark_failed(seq)
                .await
                .map(|dropped| self.failed_dropped(dropped))
        } else {
            self.inbox.mark_processed(seq).await
        };
        match marked {
            Ok(()) => {
                self.metrics.set_inbox_depth(self.inbox.depth());
                Some(())
            }
            Err(error) => {
                self.metrics.error("inbox");
                tracing::error!(%txn_id, %error, "cannot mark transaction done");
                None
            }
        }
    }

    /// Counts and logs failed transactions deleted by their retention (never their content).
    fn failed_dropped(&self, dropped: usize) {
        if dropped > 0 {
            self.metrics.inbox_failed_dropped(dropped);
            tracing::info!(
                dropped,
                kept = self.inbox.failed_len(),
                "deleted failed transactions past their retention (age or count)"
            );
        }
    }
}

/// A job on its way to its lane.
struct LaneItem {
    seq: u64,
    txn_id: String,
    job: Job,
}

/// The lanes (one per room with work) and the per-sender locks.
struct Lanes {
    /// Lane queues by lane key. A lane removes itself, under this lock, only when its queue is
    /// empty, and jobs are queued under the same lock: no job reaches a lane that has ended.
    lanes: std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<LaneItem>>>,
    /// One lock per sender with a job queued or running (dropped when unused).
    senders: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    running: Arc<Semaphore>,
    pipeline: Arc<dyn Pipeline>,
    metrics: Arc<Metrics>,
    policy: WorkerPolicy,
    done: mpsc::UnboundedSender<JobDone>,
    shutdown: watch::Receiver<bool>,
}

impl Lanes {
    /// Queues `item` in its lane, starting the lane if it has none.
    fn dispatch(self: &Arc<Self>, item: LaneItem) {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        let item = match lanes.get(&item.job.lane) {
            Some(queue) => match queue.send(item) {
                Ok(()) => return,
                // The lane stopped (shutdown): start another.
                Err(mpsc::error::SendError(item)) => item,
            },
            None => item,
        };
        let lane = item.job.lane.clone();
        let (queue, jobs) = mpsc::unbounded_channel();
        queue.send(item).expect("a new queue is open");
        lanes.insert(lane.clone(), queue);
        drop(lanes);
        tokio::spawn(self.clone().run_lane(lane, jobs));
    }

    async fn run_lane(self: Arc<Self>, lane: String, mut jobs: mpsc::UnboundedReceiver<LaneItem>) {
        let idle = Duration::from_millis(self.policy.lane_idle_ms);
        loop {
            let item = match tokio::time::timeout(idle, jobs.recv()).await {
                Ok(Some(item)) => item,
                Ok(None) => return,
                Err(_) => {
                    let mut lanes = self.lanes.lock().expect("lanes lock");
                    match jobs.try_recv() {
                        Ok(item) => {
                            drop(lanes);
                            item
                        }
                        Err(_) => {
                            lanes.remove(&lane);
                            return;
                        }
                    }
                }
            };
            match self.run_item(&item).await {
                Some(Ok(Some(tail))) => {
                    // Decided: the lane goes on while the job's messages go out; the job is
                    // done once they did.
                    let done = self.done.clone();
                    let seq = item.seq;
                    let txn_id = item.txn_id.clone();
                    let metrics = self.metrics.clone();
                    tokio::spawn(async move {
                        let failed = match tail.await {
                            Ok(()) => false,
                            Err(error) => {
                                metrics.error("handler_permanent");
                                tracing::error!(%txn_id, %error, "an event's messages could not be sent; its transaction goes to the failed list");
                                true
                            }
                        };
                        let _ = done.send(JobDone { seq, failed });
                    });
                }
                Some(Ok(None)) => {
                    let _ = self.done.send(JobDone {
                        seq: item.seq,
                        failed: false,
                    });
                }
                Some(Err(())) => {
                    let _ = self.done.send(JobDone {
                        seq: item.seq,
                        failed: true,
                    });
                }
                // Shutting down: the transaction stays pending for the next start.
                None => return,
            }
        }
    }

    /// The lock of `sender`'s jobs.
    fn sender_lock(&self, sender: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut senders = self.senders.lock().expect("senders lock");
        // Locks nobody holds or waits for are dropped, so the map stays as small as the
        // number of senders with work.
        senders.retain(|_, lock| Arc::strong_count(lock) > 1);
        senders.entry(sender.to_owned()).or_default().clone()
    }

    /// Runs one job with retries: `Some(Ok(tail))` when it decided (what is left to finish),
    /// `Some(Err(()))` when it failed for good, `None` at shutdown.
    async fn run_item(&self, item: &LaneItem) -> Option<Result<Option<JobTail>, ()>> {
        let mut shutdown = self.shutdown.clone();
        let sender_lock = item.job.sender.as_deref().map(|s| self.sender_lock(s));
        let mut tries = 0u32;
        loop {
            tries += 1;
            let result = {
                let _sender = match &sender_lock {
                    Some(lock) => Some(lock.lock().await),
                    None => None,
                };
                let _running = self
                    .running
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                self.pipeline.run_job(&item.job).await
            };
            match result {
                Ok(tail) => return Some(Ok(tail)),
                Err(error) if !error.is_transient() => {
                    self.metrics.error("handler_permanent");
                    tracing::error!(txn_id = %item.txn_id, lane = %item.job.lane, %error, "event failed; its transaction goes to the failed list");
                    return Some(Err(()));
                }
                Err(error) => {
                    self.metrics.error("handler_transient");
                    if tries >= self.policy.attempts_max {
                        tracing::error!(txn_id = %item.txn_id, lane = %item.job.lane, attempt = tries, %error, "event still failing; giving up, its transaction goes to the failed list");
                        return Some(Err(()));
                    }
                    let delay = self.policy.backoff(tries);
                    tracing::warn!(txn_id = %item.txn_id, lane = %item.job.lane, attempt = tries, delay_ms = delay.as_millis() as u64, %error, "event failed; retrying in its room's lane");
                    if wait_or_shutdown(&mut shutdown, delay).await {
                        return None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::App;
    use crate::config::Config;
    use crate::pipeline::InboxTransaction;
    use crate::registration::Registration;
    use axum::body::Body;
    use axum::http::Request;
    use parking_lot::Mutex;
    use serde_json::{json, Value};
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tower::ServiceExt as _;

    /// A pipeline that splits transactions into one job per event (`room`, `sender`, `n`),
    /// records what ran, and can hold or fail rooms.
    #[derive(Default)]
    struct Staged {
        ran: Mutex<Vec<(String, u64)>>,
        ingested: AtomicUsize,
        /// Jobs of these rooms fail (transiently) while listed.
        failing: Mutex<HashSet<String>>,
        /// While set, every job waits.
        held: AtomicBool,
        running: AtomicUsize,
        running_max: AtomicUsize,
        senders_running: Mutex<HashMap<String, usize>>,
        sender_overlap: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Pipeline for Staged {
        async fn handle(&self, _txn: &InboxTransaction) -> Result<(), PipelineError> {
            unreachable!("this pipeline splits every transaction into jobs")
        }

        async fn ingest(&self, txn: &InboxTransaction) -> Result<Ingested, PipelineError> {
            self.ingested.fetch_add(1, Ordering::SeqCst);
            let body: &Value = &txn.body;
            let jobs = body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| Job {
                    lane: e["room"].as_str().unwrap().to_owned(),
                    sender: e["sender"].as_str().map(ToOwned::to_owned),
                    payload: Box::new((
                        e["room"].as_str().unwrap().to_owned(),
                        e["n"].as_u64().unwrap(),
                        e["sender"].as_str().map(ToOwned::to_owned),
                    )),
                })
                .collect();
            Ok(Ingested::Jobs(jobs))
        }

        async fn run_job(&self, job: &Job) -> Result<Option<JobTail>, PipelineError> {
            let (room, n, sender) = job
                .payload::<(String, u64, Option<String>)>()
                .unwrap()
                .clone();
            while self.held.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if self.failing.lock().contains(&room) {
                return Err(PipelineError::transient("this room's sends fail"));
            }
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.running_max.fetch_max(now, Ordering::SeqCst);
            if let Some(sender) = &sender {
                let mut running = self.senders_running.lock();
                let count = running.entry(sender.clone()).or_default();
                *count += 1;
                if *count > 1 {
                    self.sender_overlap.store(true, Ordering::SeqCst);
                }
            }
            // Different lengths, so a lane that did not wait for its previous job would
            // overtake it.
            tokio::time::sleep(Duration::from_millis((n * 7) % 5 + 1)).await;
            if let Some(sender) = &sender {
                *self.senders_running.lock().get_mut(sender).unwrap() -= 1;
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.ran.lock().push((room, n));
            Ok(None)
        }
    }

    fn policy() -> WorkerPolicy {
        WorkerPolicy {
            batch_max: 8,
            attempts_max: 1_000,
            backoff_base_ms: 1,
            backoff_max_ms: 5,
            idle_poll_ms: 50,
            in_flight_max: 64,
            jobs_running_max: 16,
            lane_idle_ms: 20,
        }
    }

    fn app(dir: &std::path::Path, pending_max: usize) -> App {
        let mut config = Config {
            data_dir: dir.to_owned(),
            ..Config::default()
        };
        config.appservice.pending_transactions_max = pending_max;
        App::open(config.clone(), Registration::generate(&config)).unwrap()
    }

    async fn put(app: &App, id: &str, events: Value) -> u16 {
        let response = app
            .router()
            .oneshot(
                Request::put(format!("/_matrix/app/v1/transactions/{id}"))
                    .header(
                        "authorization",
                        format!("Bearer {}", app.registration().hs_token.expose()),
                    )
                    .body(Body::from(json!({ "events": events }).to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        response.status().as_u16()
    }

    /// Polls `done` every 10 ms for up to 20 s (generous for slow machines).
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn(app: &App, staged: &Arc<Staged>, policy: WorkerPolicy) -> watch::Sender<bool> {
        let (stop, stopped) = watch::channel(false);
        app.spawn_worker(staged.clone(), policy, stopped);
        stop
    }

    /// A room whose sends keep failing (retried in its lane) holds up only itself: a later
    /// transaction of another room is handled and leaves the inbox meanwhile.
    #[tokio::test]
    async fn a_stuck_room_does_not_hold_up_other_rooms() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path(), 100);
        let staged = Arc::new(Staged::default());
        staged.failing.lock().insert("!stuck".to_owned());
        put(
            &app,
            "a",
            json!([{"room": "!stuck", "n": 1, "sender": "@a"}]),
        )
        .await;
        put(
            &app,
            "b",
            json!([{"room": "!fine", "n": 1, "sender": "@b"}]),
        )
        .await;
        let _stop = spawn(&app, &staged, policy());
        eventually("the other room's payment", || {
            staged.ran.lock().contains(&("!fine".to_owned(), 1))
        })
        .await;
        eventually("the other room's transaction done", || {
            app.inbox().depth() == 1
        })
        .await;
        assert!(staged.ran.lock().iter().all(|(room, _)| room != "!stuck"));
        staged.failing.lock().clear();
        eventually("the stuck room recovered", || app.inbox().depth() == 0).await;
        assert_eq!(staged.ran.lock().len(), 2);
    }

    /// Under concurrency, each room's events run in arrival order, one sender's jobs never run
    /// at the same time, and different rooms do run at the same time.
    #[tokio::test]
    async fn rooms_run_in_parallel_each_in_order_and_one_sender_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path(), 1_000);
        let rooms = 6u64;
        let txns = 25u64;
        for t in 0..txns {
            let events: Vec<Value> = (0..rooms)
                .map(|r| match r {
                    // Rooms 0 and 1 share a sender; rooms 3 to 5 have none, so only their
                    // lanes keep them in order.
                    0..=2 => {
                        json!({"room": format!("!r{r}"), "n": t, "sender": format!("@s{}", r / 2)})
                    }
                    _ => json!({"room": format!("!r{r}"), "n": t}),
                })
                .collect();
            assert_eq!(put(&app, &format!("t{t}"), Value::Array(events)).await, 200);
        }
        let staged = Arc::new(Staged::default());
        let _stop = spawn(&app, &staged, policy());
        eventually("every event", || {
            staged.ran.lock().len() == (rooms * txns) as usize
        })
        .await;
        eventually("every transaction done", || app.inbox().depth() == 0).await;
        let ran = staged.ran.lock().clone();
        for r in 0..rooms {
            let order: Vec<u64> = ran
                .iter()
                .filter(|(room, _)| *room == format!("!r{r}"))
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(order, (0..txns).collect::<Vec<_>>(), "room {r} in order");
        }
        assert!(
            !staged.sender_overlap.load(Ordering::SeqCst),
            "one sender's jobs ran at the same time"
        );
        assert!(
            staged.running_max.load(Ordering::SeqCst) >= 2,
            "rooms never ran at the same time"
        );
        assert!(
            staged.running_max.load(Ordering::SeqCst) <= 5,
            "rooms 0 and 1 share a sender"
        );
    }

    /// Back-pressure: with every job held, the worker ingests at most `in_flight_max`
    /// transactions, and once the inbox holds `pending_transactions_max` the homeserver is
    /// answered 503 `M_LIMIT_EXCEEDED` (after a short wait) instead of being buffered; a
    /// transaction the inbox holds already still gets 200. Released, everything is handled.
    #[tokio::test]
    async fn a_flood_of_transactions_meets_back_pressure() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path(), 6);
        let staged = Arc::new(Staged::default());
        staged.held.store(true, Ordering::SeqCst);
        let _stop = spawn(
            &app,
            &staged,
            WorkerPolicy {
                in_flight_max: 2,
                ..policy()
            },
        );
        for t in 0..6 {
            let events = json!([{"room": format!("!r{t}"), "n": t}]);
            assert_eq!(put(&app, &format!("t{t}"), events).await, 200);
        }
        eventually("two in flight", || {
            staged.ingested.load(Ordering::SeqCst) == 2
        })
        .await;
        let refused = put(&app, "t6", json!([{"room": "!r6", "n": 6}])).await;
        assert_eq!(refused, 503, "a full inbox answers late, then 503");
        assert_eq!(app.inbox().depth(), 6, "nothing more was buffered");
        assert_eq!(
            put(&app, "t0", json!([{"room": "!r0", "n": 0}])).await,
            200,
            "a retry of a held transaction"
        );
        assert_eq!(
            staged.ingested.load(Ordering::SeqCst),
            2,
            "the worker read no further than in_flight_max"
        );
        assert!(app
            .metrics()
            .encode()
            .contains(r#"mxpay_errors_total{kind="inbox_full"} 1"#));
        staged.held.store(false, Ordering::SeqCst);
        eventually("all handled", || app.inbox().depth() == 0).await;
        assert_eq!(put(&app, "t6", json!([{"room": "!r6", "n": 6}])).await, 200);
        eventually("the late one too", || staged.ran.lock().len() == 7).await;
    }
}
