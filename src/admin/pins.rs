//! PIN reset against the payments layer's PIN store: the admin API forgets a user's PIN hash
//! (and any lockout), so the user must set a new PIN (`!pin set`) before paying again.

use super::service::PinReset;
use crate::store::PaymentStore;

#[async_trait::async_trait]
impl PinReset for PaymentStore {
    async fn reset_pin(&self, user_id: &str) -> Result<bool, String> {
        let Some(mut record) = self.pin(user_id).map_err(|e| e.to_string())? else {
            // Never set: nothing to forget, and no record to create.
            return Ok(false);
        };
        let had_pin = record.hash.is_some();
        // A reset is a fresh start: the lockout belonged to the forgotten PIN.
        record.hash = None;
        record.failed_in_row = 0;
        record.lockouts = 0;
        record.locked_until_ms = None;
        self.put_pin(user_id, &record)
            .await
            .map_err(|e| e.to_string())?;
        Ok(had_pin)
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
