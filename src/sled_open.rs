//! Opening a sled database when the same process may just have dropped a handle to it.
//!
//! sled's background threads keep the directory's file lock for a moment after the last
//! handle is dropped, so a reopen in the same process (a restart of a component, tests) can
//! find it locked. Another process holding the lock is a real error and still ends the wait.

use std::time::Duration;

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
}
