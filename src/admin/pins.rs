//! PIN reset against the payments layer's PIN store: the admin API forgets a user's PIN hash
//! (and any lockout), so the user must set a new PIN (`!pin set`) before paying again.

use super::service::PinReset;
use crate::store::PaymentStore;

/// Swaps a reset tries before giving up (each lost swap means a PIN check moved the record).
const RESET_SWAPS_MAX: usize = 16;

#[async_trait::async_trait]
impl PinReset for PaymentStore {
    async fn reset_pin(&self, user_id: &str) -> Result<bool, String> {
        // Compare-and-swap, so a PIN check running at the same time cannot write the old hash
        // back over the reset (it aborts instead: see `Payments::check_pin`). A swap lost to
        // such a check is tried again on the fresh record; the bound only guards against a
        // livelock, each check moves the record once.
        for _ in 0..RESET_SWAPS_MAX {
            let Some((mut record, version)) =
                self.pin_versioned(user_id).map_err(|e| e.to_string())?
            else {
                // Never set: nothing to forget, and no record to create.
                return Ok(false);
            };
            let had_pin = record.hash.is_some();
            // A reset is a fresh start: the lockout belonged to the forgotten PIN.
            record.hash = None;
            record.failed_in_row = 0;
            record.lockouts = 0;
            record.locked_until_ms = None;
            let swapped = self
                .swap_pin(user_id, &version, &record)
                .await
                .map_err(|e| e.to_string())?;
            if swapped.is_some() {
                return Ok(had_pin);
            }
        }
        Err("the PIN record kept changing; try the reset again".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::pin::{PinError, PinRecord};

    #[tokio::test]
    async fn reset_forgets_the_hash_and_the_lockout_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = PaymentStore::open(dir.path()).unwrap();
            assert_eq!(store.reset_pin("@a:x").await, Ok(false));
            assert!(store.pin("@a:x").unwrap().is_none());
            let mut record = PinRecord::new("$argon2id$v=19$stub".to_owned());
            record.lockouts = 2;
            record.locked_until_ms = Some(u64::MAX);
            store.put_pin("@a:x", &record).await.unwrap();
            assert_eq!(store.reset_pin("@a:x").await, Ok(true));
            assert_eq!(store.reset_pin("@a:x").await, Ok(false));
        }
        // sled's background threads may hold the dropped handle's lock a moment longer.
        let mut attempts_left = 100;
        let store = loop {
            match PaymentStore::open(dir.path()) {
                Ok(store) => break store,
                Err(e) if attempts_left > 1 => {
                    attempts_left -= 1;
                    eprintln!("reopen: {e}; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        let mut record = store.pin("@a:x").unwrap().unwrap();
        assert_eq!(record.hash, None);
        assert_eq!((record.lockouts, record.locked_until_ms), (0, None));
        assert_eq!(record.begin_attempt(0), Err(PinError::NotSet));
    }
}
