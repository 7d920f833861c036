//! `mxpay bench ledger`: durable transfers per second with group commit, and the latency of
//! a single durable transfer. A measurement, not a test: run it on a release build.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::clock::SystemClock;
use crate::ledger::{
    BatchOp, CurrencySpec, Ledger, LedgerOptions, LedgerSettings, Owner, SledStorage, Storage,
    TransferId, TransferRequest,
};

/// `mxpay bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ledger throughput (group commit) and single-transfer latency.
    Ledger(LedgerBench),
    /// Many people paying at once through a real Synapse with encrypted clients: payments/s,
    /// per-step latency, homeserver requests and events per payment, CPU and memory.
    E2e(super::bench_e2e::E2eBench),
}

/// Parameters of the ledger benchmark.
#[derive(Debug, Args)]
pub struct LedgerBench {
    /// Transfers in each batched (concurrent) run.
    #[arg(long, default_value_t = 100_000)]
    pub transfers: usize,
    /// Which batched runs: `plain` (1-minor-unit single-phase transfers without a memo: the
    /// figures compared across versions), `realistic` (payment-sized memos, half of the
    /// transfers two-phase: pending, then posted or voided by the same submitter), or `both`
    /// (plain, then realistic on the same ledger, each reported on its own and side by side).
    #[arg(long, value_enum, default_value_t = Mode::Plain)]
    pub mode: Mode,
    /// User accounts the transfers move between.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: usize,
    /// Concurrent submitters in the batched run.
    #[arg(long, default_value_t = 8_192)]
    pub submitters: usize,
    /// Transfers per call in the plain batched run (the realistic run makes one call per
    /// operation, as the payment layer does): 1 makes one `create_transfer` call each;
    /// more sends them in `Ledger::batch` calls of this many (TigerBeetle's benchmark sends
    /// 8,190 a request), `--callers` of them in flight at once.
    #[arg(long, default_value_t = 1)]
    pub call_size: usize,
    /// Batch calls in flight at once when `--call-size` is above 1.
    #[arg(long, default_value_t = 4)]
    pub callers: usize,
    /// Most transfers the writer puts in one journal record (one flush).
    #[arg(long, default_value_t = 8_190)]
    pub batch_max: usize,
    /// Print the RSS each time this many transfers of the batched run are durable (0: only at
    /// the end of each phase). The run is submitted in chunks of this size, each drained
    /// before the next starts, so a 4M run shows the RSS at 1M, 2M, 3M and 4M.
    #[arg(long, default_value_t = 1_000_000)]
    pub rss_every: usize,
    /// Transfers submitted one at a time for the single-transfer latency.
    #[arg(long, default_value_t = 2_000)]
    pub single: usize,
    /// Appends + fdatasync for the disk's fsync floor.
    #[arg(long, default_value_t = 1_000)]
    pub fsyncs: usize,
    /// Directory for the throwaway database (default: a new directory under the system temp
    /// dir). Put it on the disk you mean to measure; it is deleted afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The batched runs of `mxpay bench ledger`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Single-phase transfers of 1 minor unit without a memo.
    Plain,
    /// Payment-sized memos; every other transfer two-phase (pending, then posted or voided).
    Realistic,
    /// Plain, then realistic.
    Both,
}

impl Mode {
    fn runs_plain(self) -> bool {
        matches!(self, Mode::Plain | Mode::Both)
    }

    fn runs_realistic(self) -> bool {
        matches!(self, Mode::Realistic | Mode::Both)
    }
}

/// Transfer ids of each phase start here, far apart, so that no phase reuses another's ids
/// whatever `--transfers` is (the single run's ids once started at 10,000,000, inside the
/// plain run's range from 9M transfers on).
const PLAIN_ID_BASE: u128 = 1_000_000;
const REALISTIC_ID_BASE: u128 = 1 << 48;
const SINGLE_ID_BASE: u128 = 1 << 56;

/// What a realistic transfer's reservation waits for at most: the step-up timeout's default,
/// as a payment waiting for its PIN.
const REALISTIC_PENDING_TIMEOUT_MS: u64 = crate::config::payments::STEPUP_TIMEOUT_MS_DEFAULT;

/// Runs a benchmark.
pub fn run(command: BenchCommand) -> super::anyhow_like::Result {
    match command {
        BenchCommand::Ledger(params) => ledger(params),
        BenchCommand::E2e(params) => super::bench_e2e::run(params).map_err(Into::into),
    }
}

fn ledger(p: LedgerBench) -> super::anyhow_like::Result {
    if p.accounts < 2 || p.transfers == 0 || p.submitters == 0 {
        return Err("need at least 2 accounts, 1 transfer and 1 submitter".into());
    }
    let parent = p.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!("mxpay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, &p);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, p: &LedgerBench) -> super::anyhow_like::Result {
    if cfg!(debug_assertions) {
        println!("note: this is a debug build; measure with `cargo run --release -- bench ledger`");
    }
    println!("database: {}", dir.display());
    let fsync = fsync_floor(dir, p.fsyncs)?;
    if let Some(f) = &fsync {
        println!(
            "fsync floor (append 64 B + fdatasync, {} times): p50 {:.3} ms, p99 {:.3} ms",
            p.fsyncs,
            ms(f.p50),
            ms(f.p99)
        );
    }
    for fdatasync in [false, true] {
        let f = storage_floor(
            &dir.join(format!("storage-{fdatasync}")),
            p.fsyncs,
            fdatasync,
        )?;
        if let Some(f) = f {
            println!(
                "storage floor (sled apply_batch + flush{}, 300 B record, {} times): \
                 p50 {:.3} ms, p99 {:.3} ms",
                if fdatasync { " + fdatasync" } else { "" },
                p.fsyncs,
                ms(f.p50),
                ms(f.p99)
            );
        }
    }
    let settings = LedgerSettings {
        currencies: vec![CurrencySpec {
            code: "EUR".to_owned(),
            exponent: 2,
            max_transfer: None,
            max_per_24h: None,
        }],
    };
    let options = LedgerOptions {
        batch_commands_max: p.batch_max,
        ..LedgerOptions::default()
    };
    let ledger = Ledger::open_with_options(dir, &settings, Arc::new(SystemClock), options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let accounts = p.accounts;
    let one = ledger.amount_from_minor(1, "EUR")?;
    let funding = ledger.amount_from_minor(1_000_000_000, "EUR")?;

    // Fund every account (not measured).
    let started = Instant::now();
    runtime.block_on(drive(p.submitters, accounts, {
        let ledger = ledger.clone();
        move |i| {
            let ledger = ledger.clone();
            let request = TransferRequest {
                reference: 0,
                id: TransferId(1 + i as u128),
                debit: Owner::Issuer,
                credit: user(i),
                amount: funding,
                memo: Vec::new(),
            };
            async move { ledger.create_transfer(request).await.map(|_| ()) }
        }
    }))?;
    println!(
        "funded {accounts} accounts in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    print_rss("after funding");
    let mut runs = Vec::new();
    if p.mode.runs_plain() {
        runs.push(batched_plain(&runtime, &ledger, p)?);
    }
    if p.mode.runs_realistic() {
        runs.push(batched_realistic(&runtime, &ledger, p)?);
    }
    for run in &runs {
        run.print_summary(p);
    }

    // Single: one transfer at a time, each waits for its own flush.
    let blocking = ledger.blocking();
    let mut single = Vec::with_capacity(p.single);
    for i in 0..p.single {
        let request = TransferRequest {
            reference: 0,
            id: TransferId(SINGLE_ID_BASE + i as u128),
            debit: user(i % accounts),
            credit: user((i + 1) % accounts),
            amount: one,
            memo: Vec::new(),
        };
        let started = Instant::now();
        blocking.create_transfer(request)?;
        single.push(started.elapsed());
    }
    let stats = Stats::of(single);
    println!(
        "single: {} durable transfers one at a time: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        p.single,
        ms(stats.p50),
        ms(stats.p99),
        ms(stats.max)
    );

    print_rss("after the single run");
    let started = Instant::now();
    let report = blocking.verify()?;
    println!(
        "verify: {} records, {} transfers, clean, in {:.2} s",
        report.records,
        report.transfers,
        started.elapsed().as_secs_f64()
    );
    print_rss("after verify (which holds its own full replay while it runs)");
    drop(blocking);
    let transfers = report.transfers;
    let started = Instant::now();
    drop(ledger);
    println!(
        "close (writes a checkpoint of the state): {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let options = LedgerOptions {
        batch_commands_max: p.batch_max,
        ..LedgerOptions::default()
    };
    let started = Instant::now();
    let ledger = Ledger::open_with_options(dir, &settings, Arc::new(SystemClock), options)?;
    let reopen = started.elapsed();
    println!(
        "reopen: {transfers} transfers in {:.2} s (from the checkpoint at record {})",
        reopen.as_secs_f64(),
        ledger
            .opened_from_checkpoint()
            .map_or_else(|| "none: full replay".to_owned(), |s| s.to_string())
    );
    print_rss("after the reopen");
    drop(ledger);
    Ok(())
}

/// The owner of bench account `i`.
fn user(i: usize) -> Owner {
    Owner::user(format!("@bench{i}:example.org"))
}

/// The accounts transfer `i` of a batched run moves money between (never the same one).
fn pair(i: usize, accounts: usize) -> (usize, usize) {
    let from = i % accounts;
    let to = (i * 7_919 + 1 + i / accounts) % accounts;
    let to = if to == from { (to + 1) % accounts } else { to };
    (from, to)
}

/// What one batched run measured.
struct Batched {
    mode: &'static str,
    /// How the transfers were submitted: "N submitters" or the batch calls'.
    submitted_by: String,
    transfers: usize,
    /// Durable operations: a single-phase transfer is one, a two-phase one two (create
    /// pending, then post or void).
    operations: usize,
    elapsed: Duration,
    /// Latency of each transfer from its first submission to its last answer, in µs.
    stats: Stats,
}

impl Batched {
    /// One line per mode in the same shape, so that the modes read side by side.
    fn print_summary(&self, p: &LedgerBench) {
        let secs = self.elapsed.as_secs_f64();
        println!(
            "summary {}: {} transfers, {} durable operations, {} accounts, {}, batch max {}: \
             {:.2} s, {:.0} operations/s, {:.0} transfers/s, latency under load p50 {:.2} ms, \
             p99 {:.2} ms",
            self.mode,
            self.transfers,
            self.operations,
            p.accounts,
            self.submitted_by,
            p.batch_max,
            secs,
            self.operations as f64 / secs,
            self.transfers as f64 / secs,
            ms(self.stats.p50),
            ms(self.stats.p99)
        );
    }
}

/// Runs `p.transfers` transfers in chunks of `--rss-every`, each drained before the next (the
/// RSS printed after each, tagged with `what`): `run_chunk(offset, count)` submits transfers
/// `offset..offset + count` and returns the latency of each call it made. Returns the time
/// taken and the latencies' statistics. The bench itself keeps only the 4-byte latency of
/// each call: whatever a transfer needs (ids, owners, memos) is built from its index when it
/// is submitted.
fn run_chunks(
    p: &LedgerBench,
    what: &str,
    mut run_chunk: impl FnMut(usize, usize) -> Result<Vec<u32>, crate::ledger::LedgerError>,
) -> Result<(Duration, Stats), crate::ledger::LedgerError> {
    let chunk = if p.rss_every == 0 {
        p.transfers
    } else {
        p.rss_every
    };
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(p.transfers);
    let mut done = 0;
    let mut points = Vec::new();
    while done < p.transfers {
        let count = chunk.min(p.transfers - done);
        latencies.extend(run_chunk(done, count)?);
        done += count;
        if done < p.transfers {
            if let Some((rss, peak)) = print_rss(&format!("at {done} {what}")) {
                points.push((done, rss, peak));
            }
        }
    }
    let elapsed = started.elapsed();
    // The last point is taken here (the run's own end line is printed by the caller, after
    // its figures), so that the window before it holds the same work as the others.
    if let Some((rss, peak)) = print_rss(&format!("at {done} {what} (end of the run)")) {
        points.push((done, rss, peak));
    }
    print_flatness(what, &points);
    Ok((elapsed, Stats::of_micros(latencies)))
}

/// How the plain run submits its transfers, as its lines say it.
fn submitted_by(p: &LedgerBench) -> String {
    if p.call_size > 1 {
        format!(
            "{} callers of batch calls of {} transfers (latency: of a call)",
            p.callers, p.call_size
        )
    } else {
        format!("{} submitters", p.submitters)
    }
}

/// Plain: single-phase transfers of one minor unit, no memo (the figures compared across
/// versions; keep its output as it is).
fn batched_plain(
    runtime: &tokio::runtime::Runtime,
    ledger: &Ledger,
    p: &LedgerBench,
) -> Result<Batched, Box<dyn std::error::Error + Send + Sync>> {
    let accounts = p.accounts;
    let one = ledger.amount_from_minor(1, "EUR")?;
    let request = move |i: usize| {
        let (from, to) = pair(i, accounts);
        TransferRequest {
            reference: 0,
            id: TransferId(PLAIN_ID_BASE + i as u128),
            debit: user(from),
            credit: user(to),
            amount: one,
            memo: Vec::new(),
        }
    };
    let reads = TransferReads::start(runtime, ledger, accounts);
    let (elapsed, stats) = run_chunks(p, "batched transfers", |offset, count| {
        if p.call_size > 1 {
            let size = p.call_size;
            let calls = count.div_ceil(size);
            runtime.block_on(drive_calls(ledger, p.callers, calls, move |c| {
                let first = offset + c * size;
                (first..(first + size).min(offset + count))
                    .map(|i| BatchOp::Create(request(i)))
                    .collect()
            }))
        } else {
            runtime.block_on(drive(p.submitters, count, {
                let ledger = ledger.clone();
                move |i| {
                    let ledger = ledger.clone();
                    let request = request(offset + i);
                    async move { ledger.create_transfer(request).await.map(|_| ()) }
                }
            }))
        }
    })?;
    let callers = submitted_by(p);
    println!(
        "batched: {} durable transfers, {} accounts, {}, batch max {}: {:.2} s, \
         {:.0} transfers/s (latency under load p50 {:.2} ms, p99 {:.2} ms)",
        p.transfers,
        accounts,
        callers,
        p.batch_max,
        elapsed.as_secs_f64(),
        p.transfers as f64 / elapsed.as_secs_f64(),
        ms(stats.p50),
        ms(stats.p99)
    );
    reads.finish(runtime, "batched")?;
    Ok(Batched {
        mode: "plain",
        submitted_by: callers,
        transfers: p.transfers,
        operations: p.transfers,
        elapsed,
        stats,
    })
}

/// Notes a payer might write (`!pay @bob 12.50 EUR lunch`); some payments have none.
const REALISTIC_NOTES: [Option<&str>; 8] = [
    Some("lunch"),
    Some("coffee and cake"),
    None,
    Some("rent share, December"),
    Some("tickets"),
    None,
    Some("groceries 🍎"),
    Some("thanks for dinner!"),
];

/// Whether realistic transfer `i` is two-phase, and then whether it ends voided (the others
/// are posted): every other transfer is two-phase, one in 20 of those is voided (a payment
/// cancelled at the PIN step).
fn realistic_shape(i: usize) -> (bool, bool) {
    let two_phase = !i.is_multiple_of(2);
    (two_phase, two_phase && (i / 2).is_multiple_of(20))
}

/// The memo the payment layer would write for realistic transfer `i`: a `!pay` in one of
/// 1,000 rooms, its event id, perhaps a note ([`crate::payments::memo::PaymentMemo`], with ids
/// the length of room version 12's: a sigil and 43 characters).
fn realistic_memo(i: usize) -> Vec<u8> {
    use crate::payments::memo::{MemoKind, PaymentMemo};
    PaymentMemo {
        kind: MemoKind::Pay,
        room: format!("!{:A>43}", format!("room{}", i % 1_000)),
        event: format!("${:E>43}", format!("event{i}")),
        note: REALISTIC_NOTES[i % REALISTIC_NOTES.len()].map(str::to_owned),
        request: None,
        refund: None,
    }
    .encode()
}

/// The amount of realistic transfer `i`, minor units: 1.00 to 99.99, varied.
fn realistic_amount_minor(i: usize) -> u128 {
    100 + (i as u128 * 7_919) % 9_900
}

/// Realistic: what the payment layer writes. Each transfer carries a payment-sized memo;
/// every other one is two-phase as a payment with a PIN step-up is (created pending with the
/// step-up timeout, then posted, or voided, by the same submitter once the first answer is
/// durable); its latency covers both phases.
fn batched_realistic(
    runtime: &tokio::runtime::Runtime,
    ledger: &Ledger,
    p: &LedgerBench,
) -> Result<Batched, Box<dyn std::error::Error + Send + Sync>> {
    let accounts = p.accounts;
    let memo_bytes = (0..REALISTIC_NOTES.len() * 2).map(|i| realistic_memo(i).len());
    let (memo_min, memo_max) =
        memo_bytes.fold((usize::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
    let job = {
        let ledger = ledger.clone();
        move |i: usize| {
            let ledger = ledger.clone();
            let (from, to) = pair(i, accounts);
            let id = TransferId(REALISTIC_ID_BASE + i as u128);
            let (two_phase, voided) = realistic_shape(i);
            let amount = ledger.amount_from_minor(realistic_amount_minor(i), "EUR");
            let memo = realistic_memo(i);
            async move {
                let request = TransferRequest {
                    reference: 0,
                    id,
                    debit: user(from),
                    credit: user(to),
                    amount: amount?,
                    memo,
                };
                if !two_phase {
                    return ledger.create_transfer(request).await.map(|_| ());
                }
                ledger
                    .create_pending(request, REALISTIC_PENDING_TIMEOUT_MS)
                    .await?;
                if voided {
                    ledger.void(id).await.map(|_| ())
                } else {
                    ledger.post(id, None).await.map(|_| ())
                }
            }
        }
    };
    // Batch calls: each carries its transfers' creates (single or pending), then the posts
    // and voids of its pending ones, decided after all the creates before them.
    let batch_call = {
        let ledger = ledger.clone();
        move |first: usize, end: usize| {
            let ledger = ledger.clone();
            let mut ops = Vec::with_capacity((end - first) * 3 / 2);
            let mut ends = Vec::new();
            for i in first..end {
                let (from, to) = pair(i, accounts);
                let id = TransferId(REALISTIC_ID_BASE + i as u128);
                let (two_phase, voided) = realistic_shape(i);
                let request = ledger
                    .amount_from_minor(realistic_amount_minor(i), "EUR")
                    .map(|amount| TransferRequest {
                        reference: 0,
                        id,
                        debit: user(from),
                        credit: user(to),
                        amount,
                        memo: realistic_memo(i),
                    });
                ops.push(request.map(|request| {
                    if two_phase {
                        BatchOp::CreatePending {
                            request,
                            timeout_ms: REALISTIC_PENDING_TIMEOUT_MS,
                        }
                    } else {
                        BatchOp::Create(request)
                    }
                }));
                if two_phase {
                    ends.push(if voided {
                        BatchOp::Void { pending: id }
                    } else {
                        BatchOp::Post {
                            pending: id,
                            amount: None,
                        }
                    });
                }
            }
            async move {
                let mut ops = ops.into_iter().collect::<Result<Vec<_>, _>>()?;
                ops.extend(ends);
                for result in ledger.batch(ops).await? {
                    result?;
                }
                Ok(())
            }
        }
    };
    let reads = TransferReads::start(runtime, ledger, accounts);
    let (elapsed, stats) = run_chunks(p, "realistic transfers", |offset, count| {
        if p.call_size > 1 {
            let size = p.call_size;
            let batch_call = batch_call.clone();
            return runtime.block_on(drive(p.callers, count.div_ceil(size), move |c| {
                let first = offset + c * size;
                batch_call(first, (first + size).min(offset + count))
            }));
        }
        let job = job.clone();
        runtime.block_on(drive(p.submitters, count, move |i| job(offset + i)))
    })?;
    let two_phase = (0..p.transfers).filter(|&i| realistic_shape(i).0).count();
    let voided = (0..p.transfers).filter(|&i| realistic_shape(i).1).count();
    let operations = p.transfers + two_phase;
    println!(
        "realistic: {} durable transfers ({} two-phase: {} posted, {} voided; memos {}-{} B), \
         {} durable operations, {} accounts, {}, batch max {}: {:.2} s, \
         {:.0} operations/s, {:.0} transfers/s (latency under load, of a transfer with both \
         phases of a two-phase one, or of a batch call, p50 {:.2} ms, p99 {:.2} ms)",
        p.transfers,
        two_phase,
        two_phase - voided,
        voided,
        memo_min,
        memo_max,
        operations,
        accounts,
        submitted_by(p),
        p.batch_max,
        elapsed.as_secs_f64(),
        operations as f64 / elapsed.as_secs_f64(),
        p.transfers as f64 / elapsed.as_secs_f64(),
        ms(stats.p50),
        ms(stats.p99)
    );
    reads.finish(runtime, "realistic")?;
    Ok(Batched {
        mode: "realistic",
        submitted_by: submitted_by(p),
        transfers: p.transfers,
        operations,
        elapsed,
        stats,
    })
}

/// Most latency samples [`TransferReads`] keeps (4 bytes each).
const READ_SAMPLES_MAX: usize = 1_000_000;

/// Pause between two reads of [`TransferReads`]: a light load beside the batched run, as a
/// `!history` or a receipt lookup would be, not a second benchmark competing with it.
const READ_PAUSE: Duration = Duration::from_millis(1);

/// `transfer` reads by id of durable transfers (the funding ones), one at a time, during a
/// batched run: how long a read waits while batches are decided and written.
struct TransferReads {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<Vec<u32>, crate::ledger::LedgerError>>,
}

impl TransferReads {
    fn start(runtime: &tokio::runtime::Runtime, ledger: &Ledger, accounts: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = runtime.spawn({
            let stop = stop.clone();
            let ledger = ledger.clone();
            async move {
                let mut latencies = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) && latencies.len() < READ_SAMPLES_MAX {
                    let id = TransferId(1 + (i % accounts.max(1)) as u128);
                    let started = Instant::now();
                    let found = ledger.transfer(id).await?;
                    latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    if found.is_none() {
                        return Err(crate::ledger::LedgerError::Invariant(format!(
                            "durable funding transfer {id} not found"
                        )));
                    }
                    i += 1;
                    tokio::time::sleep(READ_PAUSE).await;
                }
                Ok(latencies)
            }
        });
        Self { stop, task }
    }

    /// Stops the reads and prints their latency, tagged with the run's name.
    fn finish(
        self,
        runtime: &tokio::runtime::Runtime,
        run: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = runtime.block_on(self.task)??;
        let count = samples.len();
        let stats = Stats::of_micros(samples);
        println!(
            "reads during the {run} run: {count} `transfer` reads by id of durable transfers, \
             one at a time, {} ms apart: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            READ_PAUSE.as_millis(),
            ms(stats.p50),
            ms(stats.p99),
            ms(stats.max)
        );
        Ok(())
    }
}

/// The highest peak RSS (KiB) seen so far: `VmHWM` itself is reset after each line (see
/// [`print_rss`]), so the process's peak is kept here.
static PEAK_KIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Prints the RSS now, the peak since the last line, and the peak so far, tagged with `when`;
/// returns the first two (KiB). The peak since the last line does not depend on where in the
/// checkpoint cycle the line falls (the RSS now does: transfers since the last spill are in
/// memory), so windows of a run compare with each other.
fn print_rss(when: &str) -> Option<(u64, u64)> {
    let (window_peak_kib, now_kib) = rss_kib()?;
    let peak_kib = PEAK_KIB
        .fetch_max(window_peak_kib, std::sync::atomic::Ordering::Relaxed)
        .max(window_peak_kib);
    let window = if reset_peak_rss() {
        format!(
            ", peak RSS since the last line {:.0} MiB",
            window_peak_kib as f64 / 1024.0
        )
    } else {
        String::new()
    };
    println!(
        "memory {when}: RSS {:.0} MiB{window}, peak RSS {:.0} MiB",
        now_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    );
    Some((now_kib, window_peak_kib))
}

/// Resets `VmHWM` to the RSS now (Linux 4.0 and later: writing 5 to `clear_refs`).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// Peak (since the last [`reset_peak_rss`]) and current resident set size of this process,
/// KiB (Linux only).
fn rss_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// The memory figure: the RSS, and the peak RSS of the window before each point,
/// at each million against the first million (`points`: transfers done, RSS KiB, window peak
/// KiB, one per `--rss-every`).
fn print_flatness(what: &str, points: &[(usize, u64, u64)]) {
    const BASE: usize = 1_000_000;
    let Some(&(_, base_rss, base_peak)) = points.iter().find(|p| p.0 == BASE) else {
        return;
    };
    for &(done, rss, peak) in points.iter().filter(|p| p.0 > BASE && p.0 % BASE == 0) {
        println!(
            "memory flatness, {what}: at {done} against {BASE}: RSS {:.2}x ({:.0} / {:.0} MiB), \
             peak RSS of the window before {:.2}x ({:.0} / {:.0} MiB)",
            rss as f64 / base_rss as f64,
            rss as f64 / 1024.0,
            base_rss as f64 / 1024.0,
            peak as f64 / base_peak as f64,
            peak as f64 / 1024.0,
            base_peak as f64 / 1024.0,
        );
    }
}

/// Runs `count` jobs with `submitters` concurrent tasks; returns each job's latency in µs.
async fn drive<F, Fut>(
    submitters: usize,
    count: usize,
    job: F,
) -> Result<Vec<u32>, crate::ledger::LedgerError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), crate::ledger::LedgerError>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut tasks = Vec::with_capacity(submitters);
    for _ in 0..submitters.min(count) {
        let next = next.clone();
        let job = job.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, crate::ledger::LedgerError>(latencies);
                }
                let started = Instant::now();
                job(i).await?;
                // Microseconds in a u32 (71 minutes at most): 4 bytes a transfer, so the
                // bench's own samples do not weigh on the RSS it reports.
                latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await.expect("bench task panicked")?);
    }
    Ok(all)
}

/// Sends `calls` batch calls, `callers` of them in flight at once, built by `build`. Each
/// caller builds its next call while its current one is in flight, as a client that
/// pipelines its requests would: building 8,190 requests (two owners each) is the caller's
/// work, not the ledger's, and with one caller it otherwise ran while the ledger waited.
/// The latency of a call runs from its send to its answer.
async fn drive_calls<B>(
    ledger: &Ledger,
    callers: usize,
    calls: usize,
    build: B,
) -> Result<Vec<u32>, crate::ledger::LedgerError>
where
    B: Fn(usize) -> Vec<BatchOp> + Send + Sync + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let build = Arc::new(build);
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers.min(calls) {
        let (next, build, ledger) = (next.clone(), build.clone(), ledger.clone());
        tasks.push(tokio::spawn(async move {
            let take = || {
                let c = next.fetch_add(1, Ordering::Relaxed);
                (c < calls).then(|| build(c))
            };
            let mut latencies = Vec::new();
            let mut ops = take();
            while let Some(call) = ops {
                let started = Instant::now();
                let in_flight = tokio::spawn({
                    let ledger = ledger.clone();
                    async move { ledger.batch(call).await }
                });
                ops = take();
                let results = in_flight.await.expect("bench call panicked")?;
                latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                for result in results {
                    result?;
                }
            }
            Ok::<_, crate::ledger::LedgerError>(latencies)
        }));
    }
    let mut all = Vec::with_capacity(calls);
    for task in tasks {
        all.extend(task.await.expect("bench task panicked")?);
    }
    Ok(all)
}

struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Stats {
    fn of_micros(mut samples: Vec<u32>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
            Duration::from_micros(samples.get(i).copied().map_or(0, u64::from))
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: Duration::from_micros(samples.last().copied().map_or(0, u64::from)),
        }
    }

    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// The disk's floor for one durable write: append a small record and fdatasync.
fn fsync_floor(dir: &Path, count: usize) -> std::io::Result<Option<Stats>> {
    if count == 0 {
        return Ok(None);
    }
    let path = dir.join("fsync-probe");
    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        file.write_all(&[0u8; 64])?;
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Some(Stats::of(samples)))
}

/// What the journal store alone costs per durable append, without the ledger around it.
fn storage_floor(
    dir: &Path,
    count: usize,
    fdatasync: bool,
) -> Result<Option<Stats>, Box<dyn std::error::Error + Send + Sync>> {
    if count == 0 {
        return Ok(None);
    }
    let storage = SledStorage::open_with(dir, fdatasync)?;
    let record = [7u8; 300];
    let mut samples = Vec::with_capacity(count);
    for seq in 1..=count as u64 {
        let started = Instant::now();
        storage.append(seq, &record, &seq.to_le_bytes())?;
        samples.push(started.elapsed());
    }
    drop(storage);
    std::fs::remove_dir_all(dir)?;
    Ok(Some(Stats::of(samples)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(mode: Mode) -> LedgerBench {
        LedgerBench {
            transfers: 300,
            mode,
            accounts: 20,
            submitters: 16,
            call_size: 1,
            callers: 4,
            batch_max: 64,
            rss_every: 100,
            single: 5,
            fsyncs: 0,
            dir: None,
        }
    }

    /// The plain run in batch calls (`--call-size`) next to the realistic one.
    #[test]
    fn both_modes_run_with_batch_calls() {
        let dir = tempfile::tempdir().unwrap();
        let p = LedgerBench {
            call_size: 64,
            ..small(Mode::Both)
        };
        run_in(dir.path(), &p).unwrap();
    }

    #[test]
    fn realistic_transfers_look_like_payments() {
        let memos: Vec<usize> = (0..1_000).map(|i| realistic_memo(i).len()).collect();
        let (lo, hi) = (memos.iter().min().unwrap(), memos.iter().max().unwrap());
        assert!(
            (64..=192).contains(lo) && (64..=192).contains(hi),
            "{lo}-{hi} B"
        );
        for i in 0..20 {
            let memo = crate::payments::memo::PaymentMemo::decode(&realistic_memo(i));
            assert!(memo.is_some(), "the payment layer reads memo {i} back");
        }
        let two_phase = (0..1_000).filter(|&i| realistic_shape(i).0).count();
        let voided = (0..1_000).filter(|&i| realistic_shape(i).1).count();
        assert_eq!((two_phase, voided), (500, 25));
        assert!((0..1_000).all(|i| (100..10_000).contains(&realistic_amount_minor(i))));
    }

    /// Both modes run to the end on one ledger (verify, close and reopen included), and the
    /// realistic run leaves its transfers posted or voided as it says.
    #[test]
    fn both_modes_run_on_a_small_ledger() {
        let dir = tempfile::tempdir().unwrap();
        run_in(dir.path(), &small(Mode::Both)).unwrap();
        let settings = LedgerSettings {
            currencies: vec![CurrencySpec {
                code: "EUR".to_owned(),
                exponent: 2,
                max_transfer: None,
                max_per_24h: None,
            }],
        };
        let ledger = Ledger::open(dir.path(), &settings, Arc::new(SystemClock)).unwrap();
        let b = ledger.blocking();
        for i in [0usize, 1, 3, 41, 299] {
            let transfer = b
                .transfer(TransferId(REALISTIC_ID_BASE + i as u128))
                .unwrap()
                .unwrap();
            let expected = match realistic_shape(i) {
                (_, true) => "voided",
                (true, false) => "posted (two-phase)",
                (false, false) => "posted (single)",
            };
            let state = match transfer.state {
                crate::ledger::TransferState::Voided => "voided",
                crate::ledger::TransferState::Posted { .. } if transfer.deadline_ms.is_some() => {
                    "posted (two-phase)"
                }
                crate::ledger::TransferState::Posted { .. } => "posted (single)",
                other => panic!("transfer {i} is {other:?}"),
            };
            assert_eq!(state, expected, "realistic transfer {i}");
            assert_eq!(transfer.memo, realistic_memo(i));
        }
        assert_eq!(b.verify().unwrap().transfers, 20 + 300 + 300 + 5);
    }
}
