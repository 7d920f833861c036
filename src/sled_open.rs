//! Opening a sled database when the same process may just have dropped a handle to it.
//!
//! sled's background threads keep the directory's file lock for a moment after the last
//! handle is dropped, so a reopen in the same process (a restart of a component, tests) can
//! find it locked. Another process holding the lock is a real error and still ends the wait.

use std::time::Duration;

/// Simulated power cuts for tests (a hook in [`flush_durably`]).
#[cfg(test)]
pub(crate) mod powercut;

/// Attempts at most (2 s in all): long enough for sled's threads to let go, short enough that a
/// database locked by another mxpay fails start-up promptly.
const LOCK_ATTEMPTS_MAX: u32 = 100;
/// Pause between attempts.
const LOCK_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Opens `config`, waiting (bounded) while the database's lock is still held.
pub fn open_waiting_for_lock(config: &sled::Config) -> sled::Result<sled::Db> {
    let mut attempts_left = LOCK_ATTEMPTS_MAX;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && attempts_left > 1 =>
            {
                attempts_left -= 1;
                std::thread::sleep(LOCK_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

/// sled's log file in the database directory `dir` (`<dir>/db`), opened for
/// [`flush_durably`].
pub fn log_file(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(dir.join("db"))
}

/// Flushes `db` and fdatasyncs its log: sled 0.34 "flushes" with `sync_file_range`, which
/// survives a process crash but neither writes metadata nor empties the disk's write cache,
/// so without the fdatasync a power cut can undo what was "flushed" (a PIN attempt counted,
/// an event decided, a transaction acknowledged). The ledger does the same per batch.
pub fn flush_durably(db: &sled::Db, log: &std::fs::File) -> sled::Result<()> {
    #[cfg(test)]
    crate::sled_open::powercut::before_flush(log)?;
    db.flush()?;
    log.sync_data()?;
    #[cfg(test)]
    crate::sled_open::powercut::durable_flush(log)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_dropped_in_this_process_opens_again() {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path());
        for round in 0..20u32 {
            let db = open_waiting_for_lock(&config).unwrap();
            db.insert(round.to_be_bytes(), &[]).unwrap();
            db.flush().unwrap();
        }
        let db = open_waiting_for_lock(&config).unwrap();
        assert_eq!(db.len(), 20);
    }

    #[test]
    fn the_log_file_is_where_sled_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_waiting_for_lock(&sled::Config::new().path(dir.path())).unwrap();
        let log = log_file(dir.path()).expect("sled's log is <dir>/db");
        let before = log.metadata().unwrap().len();
        db.insert(b"k", vec![7u8; 4096]).unwrap();
        flush_durably(&db, &log).unwrap();
        assert!(
            log.metadata().unwrap().len() > before,
            "the write went to that file"
        );
    }
}
