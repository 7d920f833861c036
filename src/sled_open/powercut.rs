//! Simulated power cuts for the sled stores (tests only; issue 15).
//!
//! A [`PowerCut`] watches some store directories. Every time one of them makes its writes
//! durable ([`crate::sled_open::flush_durably`] calls [`durable_flush`]), the flush is a point
//! where a power cut could leave exactly what is on disk now. One such point is picked
//! uniformly at random while the test runs (reservoir sampling: a copy of the directories is
//! taken at flush `n` with probability `1 / (n + 1)`, the state before the first flush being
//! point 0), so a run copies only a handful of times however many flushes it makes.
//!
//! The test records every acknowledgement it makes ([`PowerCut::ack`]: a 200 to the
//! homeserver, a reply telling a PIN attempt's result, an answer to an admin call) in order.
//! The cut falls just before the *next* durable flush after the picked point: every
//! acknowledgement made before that flush completed can only rest on flushes up to the
//! picked one, so it must be in the copy. [`PowerCut::cut`] hands back the acknowledgements
//! made before the cut and the surviving directories (copies, to be opened as the restarted
//! process would). With [`PowerCut::torn_tails`], some writes issued after the picked flush
//! survive too: a random prefix of what sled appended to its log before the next durable
//! flush (a disk that wrote part of its cache), which sled must recover from or ignore.
//!
//! With [`PowerCut::failing_syncs`], some flushes fail before they write (an injected disk
//! error, never twice in a row): the store call returns an error and the test retries it, as
//! the homeserver and the workers do. Half the time the cut is then taken right there, before
//! the failed call's writes reach the log: a retry that answers from what the failed call
//! wrote ("exists already", "decided before") without a flush of its own is caught.
//!
//! With [`PowerCut::cut_after_points`], the cut is not drawn among the flushes but falls at a
//! given *power point*, and storages outside sled count their durable writes as power points
//! too ([`PowerCut::external_point`]): one power for the sled stores and, say, the ledger's
//! storage, so a test can cut both at the same instant (`powercut_tests::payment_flow`).
//! After `k` points complete the power goes: at the next sled flush (which then either fails
//! before it writes, or writes and fails, at random: a failed call's outcome is unknown) or
//! the next external point, whichever comes first; every later flush fails. The sled stores
//! survive as they were after point `k`, the acknowledgements made before the power went all
//! count.
//!
//! Runs: `MXPAY_POWERCUT_RUNS` (default [`DEFAULT_RUNS`]), first seed `MXPAY_POWERCUT_SEED`;
//! a failing run names its seed.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// Runs per power-cut test when `MXPAY_POWERCUT_RUNS` is not set: seconds in all.
pub const DEFAULT_RUNS: u64 = 12;

/// How many runs a power-cut test makes (`MXPAY_POWERCUT_RUNS`, default [`DEFAULT_RUNS`]).
pub fn runs() -> u64 {
    std::env::var("MXPAY_POWERCUT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RUNS)
}

/// The first seed (`MXPAY_POWERCUT_SEED`, else one from the clock, printed).
pub fn first_seed() -> u64 {
    match std::env::var("MXPAY_POWERCUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => seed,
        None => {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            eprintln!("power-cut runs start at MXPAY_POWERCUT_SEED={seed}");
            seed
        }
    }
}

/// Runs `one_run(seed)` for [`runs`] seeds from [`first_seed`]; a failing run's panic names
/// its seed and how to run it alone.
pub fn run_many(name: &str, one_run: impl Fn(u64)) {
    let first = first_seed();
    for i in 0..runs() {
        let seed = first.wrapping_add(i);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| one_run(seed)));
        if let Err(panic) = outcome {
            eprintln!(
                "{name}: power-cut run failed; rerun it with MXPAY_POWERCUT_SEED={seed} \
                 MXPAY_POWERCUT_RUNS=1"
            );
            std::panic::resume_unwind(panic);
        }
    }
}

/// Something that watches durable flushes.
trait Watch: Send + Sync {
    /// Whether to fail this flush's sync (an injected disk error), if the log is watched.
    fn fail_sync(&self, dev: u64, ino: u64) -> bool;
    /// The flush into a watched log is durable; an error: the power went just after it (the
    /// write survives, the call fails).
    fn durable_flush(&self, dev: u64, ino: u64) -> std::io::Result<()>;
}

fn watchers() -> &'static Mutex<Vec<Weak<dyn Watch>>> {
    static WATCHERS: std::sync::OnceLock<Mutex<Vec<Weak<dyn Watch>>>> = std::sync::OnceLock::new();
    WATCHERS.get_or_init(Default::default)
}

fn live_watchers() -> Vec<Arc<dyn Watch>> {
    let mut all = watchers().lock();
    all.retain(|w| w.strong_count() > 0);
    all.iter().filter_map(Weak::upgrade).collect()
}

/// Called by [`crate::sled_open::flush_durably`] before it flushes `db` into `log` (a sled
/// log file): an error is a flush the disk refused (injected with
/// [`PowerCut::failing_syncs`]), and what was written stays not durable.
pub(crate) fn before_flush(log: &std::fs::File) -> std::io::Result<()> {
    let live = live_watchers();
    if live.is_empty() {
        return Ok(());
    }
    let meta = log.metadata()?;
    if live.iter().any(|w| w.fail_sync(meta.dev(), meta.ino())) {
        return Err(std::io::Error::other("injected: the disk refused the sync"));
    }
    Ok(())
}

/// Called by [`crate::sled_open::flush_durably`] once `log` (a sled log file) is durable; an
/// error is a power cut right after the flush (see [`PowerCut::cut_after_points`]).
pub(crate) fn durable_flush(log: &std::fs::File) -> std::io::Result<()> {
    let live = live_watchers();
    if live.is_empty() {
        return Ok(());
    }
    let Ok(meta) = log.metadata() else {
        return Ok(());
    };
    let mut outcome = Ok(());
    for watch in live {
        if let Err(e) = watch.durable_flush(meta.dev(), meta.ino()) {
            outcome = Err(e);
        }
    }
    outcome
}

/// What [`PowerCut::external_point`] says of a write outside sled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// The power is on: make the write durable.
    On,
    /// The power goes during this write: it may or may not survive, the call fails.
    GoesNow,
    /// The power went before: the write fails and changes nothing.
    Off,
}

/// Retries `op` (as its caller would: the homeserver resends, the worker tries again) while
/// it fails; an injected sync failure never hits the same call twice in a row, so a few
/// attempts suffice.
pub async fn retried<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    mut op: impl FnMut() -> F,
) -> T {
    const ATTEMPTS_MAX: usize = 4;
    let mut last = None;
    for _ in 0..ATTEMPTS_MAX {
        match op().await {
            Ok(value) => return value,
            Err(e) => last = Some(e),
        }
    }
    panic!("still failing after {ATTEMPTS_MAX} attempts: {last:?}");
}

/// What [`PowerCut::cut`] leaves.
#[derive(Debug)]
pub struct Cut<A> {
    /// The acknowledgements made before the cut, in order: each must be found as acknowledged.
    pub acked: Vec<A>,
    /// Which flush point the cut fell after (0: before the first durable flush), and of how
    /// many: for failure messages.
    pub point: u64,
    /// Durable flushes seen in all.
    pub flushes: u64,
}

struct State<A> {
    /// Current directories by name (the live generation).
    names: Vec<String>,
    generation: u64,
    rng: StdRng,
    torn_tails: bool,
    /// Probability that a sync of a watched log fails ([`PowerCut::failing_syncs`]).
    sync_failure_p: f64,
    /// Whether the last sync failed (the next one never does, so retries end).
    failed_last: bool,
    /// Durable flushes of watched directories in this generation.
    flushes: u64,
    /// With [`PowerCut::cut_after_points`]: the power goes after this many power points.
    cut_at: Option<u64>,
    /// Power points (durable flushes and external writes) completed in this generation.
    points: u64,
    /// The power went (deterministic cut only).
    dead: bool,
    /// The flush under way is the one the power goes in, after it wrote.
    dying_after_flush: bool,
    /// The flush point the kept copy was taken at.
    point: u64,
    /// Whether the kept copy is the state at the start of the generation (point 0), which the
    /// generation's directories hold until the first flush.
    snapshot_is_start: bool,
    /// Acknowledgements of this generation, in order.
    acks: Vec<A>,
    /// How many acknowledgements the cut keeps; `None` until the flush after the copy.
    boundary: Option<usize>,
    /// Length of each directory's log at the copy, for torn tails.
    log_lens: Vec<u64>,
    /// Torn tails decided at the flush after the copy: (directory index, bytes of the log
    /// from the copy's log length on).
    tails: Vec<(usize, Vec<u8>)>,
}

struct Inner<A> {
    root: tempfile::TempDir,
    state: Mutex<State<A>>,
}

/// A power-cut simulator over some sled store directories; see the module docs.
pub struct PowerCut<A: Send + 'static> {
    inner: Arc<Inner<A>>,
}

impl<A: Send + 'static> Inner<A> {
    fn dir_of(&self, generation: u64, name: &str) -> PathBuf {
        self.root.path().join(format!("gen{generation}")).join(name)
    }

    fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.root.path().join("snapshot").join(name)
    }
}

impl<A: Send + 'static> Inner<A> {
    fn watches(&self, state: &State<A>, dev: u64, ino: u64) -> bool {
        state.names.iter().any(|name| {
            std::fs::metadata(self.dir_of(state.generation, name).join("db"))
                .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        })
    }
}

impl<A: Send + 'static> Watch for Inner<A> {
    fn fail_sync(&self, dev: u64, ino: u64) -> bool {
        let mut state = self.state.lock();
        if state.cut_at.is_some() && self.watches(&state, dev, ino) {
            if state.dead {
                return true;
            }
            if Some(state.points) == state.cut_at {
                // The power goes during this flush: before it writes, or after.
                if state.rng.gen_bool(0.5) {
                    state.dead = true;
                    return true;
                }
                state.dying_after_flush = true;
                return false;
            }
            // An injected disk error is no power point (nothing became durable).
            let p = state.sync_failure_p;
            let fail = p > 0.0 && !state.failed_last && state.rng.gen_bool(p);
            state.failed_last = fail;
            return fail;
        }
        if state.sync_failure_p == 0.0 || !self.watches(&state, dev, ino) {
            return false;
        }
        let p = state.sync_failure_p;
        let fail = !state.failed_last && state.rng.gen_bool(p);
        state.failed_last = fail;
        // A failing disk is where a power cut hurts most: the caller is about to retry, and a
        // retry that answers from what the failed call wrote, without a flush of its own,
        // answers from nothing durable. Half the time the cut falls here (before the failed
        // call's writes reach the log), rather than at a uniformly drawn flush.
        if fail && state.rng.gen_bool(0.5) {
            self.take_snapshot(&mut state);
        }
        fail
    }

    fn durable_flush(&self, dev: u64, ino: u64) -> std::io::Result<()> {
        let mut state = self.state.lock();
        let state = &mut *state;
        if !self.watches(state, dev, ino) {
            return Ok(());
        }
        if let Some(cut_at) = state.cut_at {
            if state.dying_after_flush || state.dead {
                if !state.dead {
                    // What this flush wrote survives; its caller never hears so.
                    self.take_snapshot(state);
                }
                state.dying_after_flush = false;
                state.dead = true;
                return Err(std::io::Error::other("power cut"));
            }
            state.flushes += 1;
            self.point_done(state, cut_at);
            return Ok(());
        }
        if state.boundary.is_none() {
            // The flush after the copy: acknowledgements so far rest on the copy at most.
            state.boundary = Some(state.acks.len());
            if state.torn_tails {
                state.tails.clear();
                for (index, name) in state.names.iter().enumerate() {
                    let log = self.dir_of(state.generation, name).join("db");
                    let Ok(bytes) = std::fs::read(&log) else {
                        continue;
                    };
                    let from = state.log_lens.get(index).copied().unwrap_or(0) as usize;
                    if bytes.len() > from && state.rng.gen_bool(0.5) {
                        let upto = state.rng.gen_range(from..=bytes.len());
                        state.tails.push((index, bytes[from..upto].to_vec()));
                    }
                }
            }
        }
        state.flushes += 1;
        if state.rng.gen_range(0..=state.flushes) == 0 {
            self.take_snapshot(state);
        }
        Ok(())
    }
}

impl<A: Send + 'static> Inner<A> {
    /// A power point completed (deterministic cut): after the last one before the cut, the
    /// directories are what survives.
    fn point_done(&self, state: &mut State<A>, cut_at: u64) {
        state.points += 1;
        if state.points == cut_at {
            self.take_snapshot(state);
        }
    }

    /// Keeps a copy of the directories as they are now: the cut point, unless a later one
    /// replaces it.
    fn take_snapshot(&self, state: &mut State<A>) {
        state.point = state.flushes;
        state.snapshot_is_start = false;
        state.boundary = None;
        state.tails.clear();
        state.log_lens.clear();
        for name in &state.names {
            let from = self.dir_of(state.generation, name);
            let to = self.snapshot_dir(name);
            let _ = std::fs::remove_dir_all(&to);
            copy_dir(&from, &to).expect("copy a store directory");
            state
                .log_lens
                .push(std::fs::metadata(to.join("db")).map_or(0, |m| m.len()));
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            // A file may vanish while sled works (a snapshot replaced): what is gone is gone.
            match std::fs::copy(entry.path(), &target) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

impl<A: Send + 'static> PowerCut<A> {
    /// A simulator for the directories `names` (each a store's own directory), drawing its
    /// cut point from `seed`.
    pub fn new(names: &[&str], seed: u64) -> Self {
        let inner = Arc::new(Inner {
            root: tempfile::tempdir().expect("a temporary directory"),
            state: Mutex::new(State {
                names: names.iter().map(|n| (*n).to_owned()).collect(),
                generation: 0,
                rng: StdRng::seed_from_u64(seed),
                torn_tails: false,
                sync_failure_p: 0.0,
                failed_last: false,
                flushes: 0,
                cut_at: None,
                points: 0,
                dead: false,
                dying_after_flush: false,
                point: 0,
                snapshot_is_start: true,
                acks: Vec::new(),
                boundary: None,
                log_lens: Vec::new(),
                tails: Vec::new(),
            }),
        });
        let watch: Arc<dyn Watch> = inner.clone();
        watchers().lock().push(Arc::downgrade(&watch));
        Self { inner }
    }

    /// Also lets a random prefix of the writes after the cut point survive (see the module
    /// docs).
    pub fn torn_tails(self, on: bool) -> Self {
        self.inner.state.lock().torn_tails = on;
        self
    }

    /// Makes a sync of a watched log fail with probability `p` (never twice in a row): the
    /// call that flushed returns an error, and its caller retries ([`retried`]).
    pub fn failing_syncs(self, p: f64) -> Self {
        self.inner.state.lock().sync_failure_p = p;
        self
    }

    /// Cuts the power after `points` power points instead of at a flush drawn at random (see
    /// the module docs); `u64::MAX`: never, to count the points of a run
    /// ([`Self::points`]).
    pub fn cut_after_points(self, points: u64) -> Self {
        self.inner.state.lock().cut_at = Some(points);
        self
    }

    /// A durable write outside sled (another storage sharing this power) is about to be made:
    /// whether it may be ([`Power`]). Needs [`Self::cut_after_points`].
    pub fn external_point(&self) -> Power {
        let mut state = self.inner.state.lock();
        let state = &mut *state;
        let cut_at = state.cut_at.expect("external points need cut_after_points");
        if state.dead {
            return Power::Off;
        }
        if state.points == cut_at {
            state.dead = true;
            return Power::GoesNow;
        }
        // The sled stores stay as they are until the next point, so a copy taken now, before
        // the external write, is what they hold when the power goes after it.
        self.inner.point_done(state, cut_at);
        Power::On
    }

    /// Whether the power went (deterministic cut).
    pub fn is_dead(&self) -> bool {
        self.inner.state.lock().dead
    }

    /// Power points completed so far in this generation.
    pub fn points(&self) -> u64 {
        self.inner.state.lock().points
    }

    /// The live directory of store `name` (open the store there).
    pub fn dir(&self, name: &str) -> PathBuf {
        let generation = self.inner.state.lock().generation;
        self.inner.dir_of(generation, name)
    }

    /// Records that `ack` was told outward, now.
    pub fn ack(&self, ack: A) {
        self.inner.state.lock().acks.push(ack);
    }

    /// Cuts the power: the next generation's directories ([`Self::dir`]) hold what survived.
    /// Drop the live stores first (their later flushes are no longer watched).
    pub fn cut(&self) -> Cut<A> {
        let mut state = self.inner.state.lock();
        let state = &mut *state;
        if state.cut_at.is_some() && !state.dead {
            // The run ended before its cut point: the power goes now.
            self.inner.take_snapshot(state);
        }
        let keep = state.boundary.unwrap_or(state.acks.len());
        let mut acked = std::mem::take(&mut state.acks);
        acked.truncate(keep);
        let next = state.generation + 1;
        let mut start_lens = Vec::with_capacity(state.names.len());
        for (index, name) in state.names.iter().enumerate() {
            let to = self.inner.dir_of(next, name);
            let from = if state.snapshot_is_start {
                self.inner
                    .dir_of(state.generation, name)
                    .with_extension("start")
            } else {
                self.inner.snapshot_dir(name)
            };
            copy_dir(&from, &to).expect("copy what survived");
            if let Some((_, tail)) = state.tails.iter().find(|(i, _)| *i == index) {
                use std::io::{Seek as _, Write as _};
                let mut log = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(to.join("db"))
                    .expect("open the surviving log");
                let at = state.log_lens.get(index).copied().unwrap_or(0);
                log.seek(std::io::SeekFrom::Start(at)).expect("seek");
                log.write_all(tail).expect("write the torn tail");
            }
            // Point 0 of the next generation: its directories as they start.
            copy_dir(&to, &to.with_extension("start")).expect("keep the start state");
            start_lens.push(std::fs::metadata(to.join("db")).map_or(0, |m| m.len()));
        }
        let cut = Cut {
            acked,
            point: state.point,
            flushes: state.flushes,
        };
        state.generation = next;
        // The restarted process runs on a healthy disk: what it does is checked, not stressed.
        state.sync_failure_p = 0.0;
        state.flushes = 0;
        state.point = 0;
        // The restarted process keeps its power.
        state.cut_at = None;
        state.points = 0;
        state.dead = false;
        state.dying_after_flush = false;
        state.snapshot_is_start = true;
        state.boundary = None;
        state.log_lens = start_lens;
        state.tails.clear();
        cut
    }
}
