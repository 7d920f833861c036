//! `mxpay bench ledger`: durable transfers per second with group commit, and the latency of
//! a single durable transfer. A measurement, not a test: run it on a release build.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Transfers in the batched (concurrent) run.
    #[arg(long, default_value_t = 100_000)]
    pub transfers: usize,
    /// User accounts the transfers move between.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: usize,
    /// Concurrent submitters in the batched run.
    #[arg(long, default_value_t = 8_192)]
    pub submitters: usize,
    /// Transfers per call in the batched run: 1 makes one `create_transfer` call each;
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
    let user = |i: usize| Owner::user(format!("@bench{i}:example.org"));

    // Fund every account (not measured).
    let started = Instant::now();
    runtime.block_on(drive(p.submitters, accounts, {
        let ledger = ledger.clone();
        move |i| {
            let ledger = ledger.clone();
            let request = TransferRequest {
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

    // Batched: many concurrent submitters, the writer group-commits what is queued.
    print_rss("after funding");
    let base = 1_000_000u128;
    let chunk = if p.rss_every == 0 {
        p.transfers
    } else {
        p.rss_every
    };
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(p.transfers);
    let mut done = 0;
    while done < p.transfers {
        let count = chunk.min(p.transfers - done);
        let offset = done;
        let request = move |i: usize| {
            let from = i % accounts;
            let to = (i * 7_919 + 1 + i / accounts) % accounts;
            let to = if to == from { (to + 1) % accounts } else { to };
            TransferRequest {
                id: TransferId(base + i as u128),
                debit: user(from),
                credit: user(to),
                amount: one,
                memo: Vec::new(),
            }
        };
        if p.call_size > 1 {
            let size = p.call_size;
            let calls = count.div_ceil(size);
            latencies.extend(runtime.block_on(drive(p.callers, calls, {
                let ledger = ledger.clone();
                move |c| {
                    let ledger = ledger.clone();
                    let first = offset + c * size;
                    let ops: Vec<BatchOp> = (first..(first + size).min(offset + count))
                        .map(|i| BatchOp::Create(request(i)))
                        .collect();
                    async move {
                        for result in ledger.batch(ops).await? {
                            result?;
                        }
                        Ok(())
                    }
                }
            }))?);
        } else {
            latencies.extend(runtime.block_on(drive(p.submitters, count, {
                let ledger = ledger.clone();
                move |i| {
                    let ledger = ledger.clone();
                    let request = request(offset + i);
                    async move { ledger.create_transfer(request).await.map(|_| ()) }
                }
            }))?);
        }
        done += count;
        if done < p.transfers {
            print_rss(&format!("at {done} batched transfers"));
        }
    }
    let elapsed = started.elapsed();
    let stats = Stats::of_micros(latencies);
    let callers = if p.call_size > 1 {
        format!(
            "{} callers of batch calls of {} transfers (latency: of a call)",
            p.callers, p.call_size
        )
    } else {
        format!("{} submitters", p.submitters)
    };
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

    print_rss(&format!(
        "at {} batched transfers (end of the batched run)",
        p.transfers
    ));

    // Single: one transfer at a time, each waits for its own flush.
    let blocking = ledger.blocking();
    let base = 10_000_000u128;
    let mut single = Vec::with_capacity(p.single);
    for i in 0..p.single {
        let request = TransferRequest {
            id: TransferId(base + i as u128),
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

/// Prints the RSS now and the peak so far (`VmRSS`, `VmHWM`), tagged with `when`.
fn print_rss(when: &str) {
    if let Some((peak_kib, now_kib)) = rss_kib() {
        println!(
            "memory {when}: RSS {:.0} MiB, peak RSS {:.0} MiB",
            now_kib as f64 / 1024.0,
            peak_kib as f64 / 1024.0
        );
    }
}

/// Peak and current resident set size of this process, KiB (Linux only).
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
