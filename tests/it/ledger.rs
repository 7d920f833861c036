//! Ledger tests that need processes or a real binary: crash recovery under SIGKILL, many
//! concurrent drainers of one account, and `mxpay ledger verify` on tampered copies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mxpay::clock::{ManualClock, SystemClock};
use mxpay::ledger::{
    CurrencySpec, JournalEntry, Ledger, LedgerError, LedgerSettings, Owner, TransferError,
    TransferId, TransferRequest, TransferState,
};
use rand::Rng;
use rust_decimal::Decimal;

fn settings() -> LedgerSettings {
    LedgerSettings {
        currencies: vec![CurrencySpec {
            code: "EUR".to_owned(),
            exponent: 2,
            max_transfer: None,
            max_per_24h: None,
        }],
    }
}

fn user(i: u64) -> Owner {
    Owner::user(format!("@crash{i}:example.org"))
}

// ----- crash recovery --------------------------------------------------------------------

const CHILD_DIR_ENV: &str = "MXPAY_CRASH_CHILD_DIR";
const CHILD_ITER_ENV: &str = "MXPAY_CRASH_CHILD_ITER";
/// Concurrent submitters in the child, so kills land in the middle of batches.
const CHILD_TASKS: u64 = 32;
/// The child stops by itself after this long if nobody kills it.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

/// Transfer ids of a child run: iteration in the high bits, task and sequence below.
fn child_id(iter: u64, task: u64, seq: u64, leg: u64) -> TransferId {
    TransferId(
        (u128::from(iter) << 64)
            | (u128::from(task) << 40)
            | (u128::from(seq) << 2)
            | u128::from(leg),
    )
}

/// Not a test: the child process of `crash_recovery_keeps_every_acknowledged_transfer`.
/// It submits transfers from concurrent tasks and prints one line per acknowledged one.
#[test]
#[ignore = "child process of the crash test; runs only when that test starts it"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let iter: u64 = std::env::var(CHILD_ITER_ENV).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let ledger = Ledger::open(Path::new(&dir), &settings(), Arc::new(SystemClock)).unwrap();
        let deadline = Instant::now() + CHILD_LIFETIME;
        let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        println!("READY");
        let mut tasks = Vec::new();
        for task in 0..CHILD_TASKS {
            let ledger = ledger.clone();
            let stdout = stdout.clone();
            tasks.push(tokio::spawn(async move {
                let ack = |line: String| {
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "{line}").unwrap();
                    out.flush().unwrap();
                };
                let amount = ledger.amount_from_minor(100, "EUR").unwrap();
                let mut seq = 0u64;
                while Instant::now() < deadline {
                    seq += 1;
                    let payer = user(task);
                    // Fund the payer, then pay a neighbour in two phases.
                    let fund = child_id(iter, task, seq, 0);
                    ledger
                        .create_transfer(TransferRequest {
                            reference: 0,
                            id: fund,
                            debit: Owner::Issuer,
                            credit: payer.clone(),
                            amount,
                            memo: vec![],
                        })
                        .await
                        .unwrap();
                    ack(format!("SINGLE {} {}", fund.0, task));
                    let pending = child_id(iter, task, seq, 1);
                    ledger
                        .create_pending(
                            TransferRequest {
                                reference: 0,
                                id: pending,
                                debit: payer,
                                credit: user((task + 1) % CHILD_TASKS),
                                amount,
                                memo: b"crash".to_vec(),
                            },
                            3_600_000,
                        )
                        .await
                        .unwrap();
                    ack(format!("PENDING {} {}", pending.0, task));
                    ledger.post(pending, None).await.unwrap();
                    ack(format!("POSTED {} {}", pending.0, task));
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acked {
    Single,
    Pending,
    Posted,
}

#[test]
fn crash_recovery_keeps_every_acknowledged_transfer() {
    let iterations: u64 = std::env::var("MXPAY_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut acked: HashMap<u128, Acked> = HashMap::new();
    let started = Instant::now();
    for iter in 1..=iterations {
        let mut child = Command::new(&exe)
            .args([
                "ledger::crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_ITER_ENV, iter.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Kill after a random number of acknowledgements (0 = as soon as it is ready).
        let kill_after: usize = rng.gen_range(0..600);
        let mut seen = 0usize;
        let mut ready = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line == "READY" {
                ready = true;
            }
            let mut parts = line.split(' ');
            let kind = match parts.next() {
                Some("SINGLE") => Acked::Single,
                Some("PENDING") => Acked::Pending,
                Some("POSTED") => Acked::Posted,
                _ => {
                    if ready && kill_after == 0 {
                        break;
                    }
                    continue;
                }
            };
            let id: u128 = parts.next().unwrap().parse().unwrap();
            let entry = acked.entry(id).or_insert(kind);
            if kind == Acked::Posted {
                *entry = Acked::Posted;
            }
            seen += 1;
            if seen >= kill_after {
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "iteration {iter}: the child ended by itself: {status}"
        );

        // Reopen: every acknowledged transfer is there, exactly once; verify is clean.
        let ledger = Ledger::open(dir.path(), &settings(), Arc::new(SystemClock)).unwrap();
        let b = ledger.blocking();
        b.verify()
            .unwrap_or_else(|e| panic!("iteration {iter}: verify: {e}"));
        for (&id, &kind) in &acked {
            let t = b.transfer(TransferId(id)).unwrap().unwrap_or_else(|| {
                panic!("iteration {iter}: acknowledged {kind:?} {id:x} is missing")
            });
            match kind {
                Acked::Single => assert_eq!(t.state, TransferState::Posted { amount_minor: 100 }),
                Acked::Pending => assert!(matches!(
                    t.state,
                    TransferState::Pending | TransferState::Posted { amount_minor: 100 }
                )),
                Acked::Posted => assert_eq!(t.state, TransferState::Posted { amount_minor: 100 }),
            }
        }
        let mut created: HashMap<TransferId, u32> = HashMap::new();
        for entry in ledger.export() {
            let entry = entry.unwrap();
            if let JournalEntry::TransferCreated { id, .. } = entry.entry {
                *created.entry(id).or_default() += 1;
                assert!(
                    id.0 >> 64 <= u128::from(iter),
                    "a transfer no child attempted: {id:?}"
                );
            }
        }
        assert!(
            created.values().all(|&n| n == 1),
            "a transfer appears twice"
        );
        for id in acked.keys() {
            assert_eq!(created.get(&TransferId(*id)), Some(&1));
        }
        drop(b);
        drop(ledger);
    }
    eprintln!(
        "crash test: {iterations} kills, {} acknowledged transfers checked, {:.1} s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        !acked.is_empty(),
        "the children acknowledged nothing: the test checked nothing"
    );
}

// ----- concurrency -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_draining_one_account_never_overdraw() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let ledger = Ledger::open(dir.path(), &settings(), Arc::new(clock)).unwrap();
    let alice = Owner::user("@alice:example.org");
    let fund = ledger.parse_amount(Decimal::from(100), "EUR").unwrap();
    ledger
        .create_transfer(TransferRequest {
            reference: 0,
            id: TransferId(1),
            debit: Owner::Issuer,
            credit: alice.clone(),
            amount: fund,
            memo: vec![],
        })
        .await
        .unwrap();
    let price = ledger
        .parse_amount(Decimal::from_str("1.50").unwrap(), "EUR")
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u128 {
        let ledger = ledger.clone();
        let alice = alice.clone();
        tasks.push(tokio::spawn(async move {
            let request = TransferRequest {
                reference: 0,
                id: TransferId(1_000 + i),
                debit: alice,
                credit: Owner::user(format!("@shop{i}:example.org")),
                amount: price,
                memo: vec![],
            };
            // Half pay at once, half reserve: both must respect the same balance.
            if i % 2 == 0 {
                ledger.create_transfer(request).await
            } else {
                ledger.create_pending(request, 60_000).await
            }
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(LedgerError::Rejected(TransferError::InsufficientFunds)) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    // 100.00 / 1.50 = 66 affordable, 1.00 left.
    assert_eq!(ok, 66);
    let balances = ledger.balances(&alice).await.unwrap();
    assert_eq!(balances[0].balances.available_minor(), 100);
    ledger.verify().await.unwrap();
}

// ----- tampering, through the real binary ------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Opens the journal tree of a (copied) ledger directly, as an attacker with the files would;
/// `f` also gets the ledger's directory (the records' bytes are in its journal files).
fn with_journal(data_dir: &Path, f: impl FnOnce(&sled::Tree, &Path)) {
    let db = sled::Config::new()
        .path(data_dir.join("ledger"))
        .segment_size(mxpay::ledger::storage::SEGMENT_BYTES)
        .open()
        .unwrap();
    let tree = db.open_tree("journal").unwrap();
    f(&tree, &data_dir.join("ledger"));
    tree.flush().unwrap();
}

/// Where sled says record `seq`'s bytes are: its journal file and its range in it.
fn record_location(tree: &sled::Tree, ledger_dir: &Path, seq: u64) -> (PathBuf, Range<usize>) {
    use mxpay::ledger::journal_files::{file_path, Location, JOURNAL_DIR};
    let value = tree.get(record_key(seq)).unwrap().unwrap();
    let location = Location::decode(&value).expect("records are in journal files");
    let start = location.offset as usize;
    (
        file_path(&ledger_dir.join(JOURNAL_DIR), location.file_seq),
        start..start + location.len as usize,
    )
}

fn record_key(seq: u64) -> Vec<u8> {
    let mut key = vec![b'j'];
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn verify_cli(data_dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mxpay"))
        .args(["ledger", "verify"])
        .arg(data_dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn verify_names_the_record_that_was_tampered_with() {
    let original = tempfile::tempdir().unwrap();
    {
        let ledger = Ledger::open(
            original.path(),
            &settings(),
            Arc::new(ManualClock::new(1_000)),
        )
        .unwrap()
        .blocking();
        let amount = ledger.ledger().amount_from_minor(500, "EUR").unwrap();
        // Record 1 defines EUR; records 2..=7 hold one transfer each.
        for i in 0..6u64 {
            ledger
                .create_transfer(TransferRequest {
                    reference: 0,
                    id: TransferId(u128::from(i) + 1),
                    debit: Owner::Issuer,
                    credit: user(i),
                    amount,
                    memo: vec![],
                })
                .unwrap();
        }
    }
    // A copy as the ledger left it, before any other open rewrites sled's files.
    let scratch = tempfile::tempdir().unwrap();
    let pristine = scratch.path().join("pristine");
    copy_dir(original.path(), &pristine);
    let (ok, text) = verify_cli(original.path());
    assert!(ok, "{text}");
    assert!(text.contains("ledger OK: 7 records"), "{text}");

    // `at_checkpoint`: the damage reaches record 7, the one the checkpoint written at close
    // stands for. Opening reads no record before the checkpoint's again (verify does).
    let case =
        |name: &str, at_checkpoint: bool, tamper: &dyn Fn(&sled::Tree, &Path), expect: &[&str]| {
            let copy = scratch.path().join(name);
            copy_dir(original.path(), &copy);
            with_journal(&copy, tamper);
            let (ok, text) = verify_cli(&copy);
            assert!(!ok, "{name}: verify passed a tampered journal: {text}");
            for needle in expect {
                assert!(
                    text.contains(needle),
                    "{name}: expected `{needle}` in: {text}"
                );
            }
            // The ledger refuses to open it too when it reads the damage: from the checkpoint,
            // damage to its record or later; replaying the whole journal, any.
            let open = || Ledger::open(&copy, &settings(), Arc::new(ManualClock::new(1_000)));
            if at_checkpoint {
                let err = open().unwrap_err();
                assert!(matches!(err, LedgerError::Corrupt { .. }), "{name}: {err}");
            }
            std::fs::remove_file(
                copy.join("ledger")
                    .join(mxpay::ledger::storage::CHECKPOINT_FILE),
            )
            .unwrap();
            let err = open().unwrap_err();
            assert!(matches!(err, LedgerError::Corrupt { .. }), "{name}: {err}");
        };

    case(
        "flipped-byte",
        false,
        &|tree, ledger_dir| {
            let (file, range) = record_location(tree, ledger_dir, 4);
            let mut bytes = std::fs::read(&file).unwrap();
            bytes[(range.start + range.end) / 2] ^= 0x40;
            std::fs::write(&file, bytes).unwrap();
        },
        &["corrupt at record 4", "altered"],
    );
    case(
        "dropped-record",
        false,
        &|tree, _| {
            tree.remove(record_key(3)).unwrap();
        },
        &["corrupt at record 3", "missing"],
    );
    case(
        "reordered",
        false,
        &|tree, _| {
            let a = tree.get(record_key(5)).unwrap().unwrap();
            let b = tree.get(record_key(6)).unwrap().unwrap();
            tree.insert(record_key(5), b).unwrap();
            tree.insert(record_key(6), a).unwrap();
        },
        &["corrupt at record 5", "reordered"],
    );
    case(
        "truncated",
        true,
        &|tree, _| {
            tree.remove(record_key(7)).unwrap();
        },
        &["ends at record 6", "records were lost"],
    );
    case(
        "replaced-by-an-older-record",
        true,
        &|tree, _| {
            let older = tree.get(record_key(2)).unwrap().unwrap();
            tree.insert(record_key(7), older).unwrap();
        },
        &["corrupt at record 7"],
    );

    // Damage to sled's own file: sled drops the log from the damaged message on, head and
    // all, as if it were a torn write; the head anchor outside sled still notices.
    // Depending on where the damage is, sled either refuses to open ("corrupted data") or
    // treats the damaged message as a torn write and silently drops the log from there on.
    let db_bytes = std::fs::read(pristine.join("ledger/db")).unwrap();
    let used = db_bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    let mut caught = Vec::new();
    for (n, offset) in (0..used).step_by((used / 16).max(1) as usize).enumerate() {
        let copy = scratch.path().join(format!("raw-{n}"));
        copy_dir(&pristine, &copy);
        let path = copy.join("ledger/db");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offset as usize] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let (ok, text) = verify_cli(&copy);
        caught.push((offset, !ok, text));
    }
    // A flip sled's recovery does not depend on leaves the history whole, and verify may then
    // pass; it must never pass a shorter or altered history.
    for (offset, caught, text) in &caught {
        assert!(
            *caught || text.contains("ledger OK: 7 records, 14 entries"),
            "a flipped byte at offset {offset} of sled's file went unnoticed: {text}"
        );
    }
    for (offset, caught, text) in &caught {
        eprintln!("raw flip at {offset}: caught {caught}: {}", text.trim_end());
    }
    assert!(
        caught.iter().filter(|(_, caught, _)| *caught).count() >= caught.len() / 2,
        "most flips must be caught: {caught:?}"
    );
    assert!(
        caught
            .iter()
            .any(|(_, _, text)| text.contains("records were lost")),
        "the head anchor never caught a silently shortened journal: {caught:?}"
    );

    // Damage to the journal files, which hold the records' bytes (sled holds where they
    // are): every byte belongs to a record, so every flip is caught, at that record.
    let mut records = Vec::new();
    let located = scratch.path().join("located");
    copy_dir(&pristine, &located);
    with_journal(&located, |tree, ledger_dir| {
        for seq in 1..=7 {
            records.push((seq, record_location(tree, ledger_dir, seq)));
        }
    });
    let (file, _) = records[0].1.clone();
    let file_name = file.file_name().unwrap().to_owned();
    let journal_bytes = std::fs::read(&file).unwrap();
    assert!(records.iter().all(|(_, (f, _))| *f == file), "{records:?}");
    assert_eq!(
        records[6].1 .1.end,
        journal_bytes.len(),
        "nothing but records"
    );
    for (n, offset) in (0..journal_bytes.len())
        .step_by((journal_bytes.len() / 16).max(1))
        .enumerate()
    {
        let seq = records
            .iter()
            .find(|(_, (_, range))| range.contains(&offset))
            .map(|(seq, _)| *seq)
            .unwrap();
        let copy = scratch.path().join(format!("journal-flip-{n}"));
        copy_dir(&pristine, &copy);
        let path = copy.join("ledger/journal").join(&file_name);
        let mut bytes = journal_bytes.clone();
        bytes[offset] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let (ok, text) = verify_cli(&copy);
        assert!(
            !ok && text.contains(&format!("corrupt at record {seq}:")),
            "a flipped byte at offset {offset} of the journal file (record {seq}): {text}"
        );
    }

    let copy = scratch.path().join("no-anchor");
    copy_dir(original.path(), &copy);
    std::fs::remove_file(
        copy.join("ledger")
            .join(mxpay::ledger::storage::ANCHOR_FILE),
    )
    .unwrap();
    let (ok, text) = verify_cli(&copy);
    assert!(!ok && text.contains("anchor file"), "{text}");

    let (ok, text) = verify_cli(&scratch.path().join("no-such-dir"));
    assert!(!ok && text.contains("no ledger database"), "{text}");
}
