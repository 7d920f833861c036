//! PIN reset against the payments layer's PIN store: the admin API forgets a user's PIN hash
//! (and any lockout), so the user must set a new PIN (`!pin set`) before paying again; on the
//! operator's word it also marks the user's current cross-signing identity as confirmed, for
//! that `!pin set` to accept.

use super::service::PinReset;
use crate::store::PaymentStore;

/// Swaps a reset tries before giving up (each lost swap means a PIN check moved the record).
const RESET_SWAPS_MAX: usize = 16;

impl PaymentStore {
    /// Forgets the user's PIN hash and lockout; whether they had a PIN.
    async fn forget_pin(&self, user_id: &str) -> Result<bool, String> {
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

#[async_trait::async_trait]
impl PinReset for PaymentStore {
    async fn reset_pin_with(&self, user_id: &str, accept_new_keys: bool) -> Result<bool, String> {
        let had_pin = self.forget_pin(user_id).await?;
        // After the PIN is gone, so a confirmation can only be used through a new `!pin set`,
        // never by a PIN known before the reset; also for a user without a PIN record (the
        // operator may confirm keys for someone who never set one). A plain reset withdraws an
        // earlier confirmation not used yet: the operator's latest word counts, and a forgotten
        // confirmation does not wait for a later takeover.
        // A read-modify-write like the payments layer's own profile writes: one of those that
        // read the profile before this write and writes it back after (e.g. while it creates a
        // DM, a few hundred milliseconds) undoes it. Repeat the reset if the user's next
        // `!pin set` does not behave as intended.
        let mut profile = self.profile(user_id).map_err(|e| e.to_string())?;
        if profile.accept_new_keys_at_pin_set != accept_new_keys {
            profile.accept_new_keys_at_pin_set = accept_new_keys;
            self.put_profile(user_id, &profile)
                .await
                .map_err(|e| e.to_string())?;
        }
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
        let store = PaymentStore::open(dir.path()).unwrap();
        let mut record = store.pin("@a:x").unwrap().unwrap();
        assert_eq!(record.hash, None);
        assert_eq!((record.lockouts, record.locked_until_ms), (0, None));
        assert_eq!(record.begin_attempt(0), Err(PinError::NotSet));
    }

    #[tokio::test]
    async fn accepting_new_keys_marks_the_profile_after_the_reset_with_or_without_a_pin() {
        let dir = tempfile::tempdir().unwrap();
        let store = PaymentStore::open(dir.path()).unwrap();
        // A user with a PIN and a DM: the PIN goes, the flag is set, the rest of the profile
        // stays.
        let mut record = PinRecord::new("$argon2id$v=19$stub".to_owned());
        record.failed_in_row = 2;
        store.put_pin("@a:x", &record).await.unwrap();
        let before = crate::store::payments::UserProfile {
            dm_room: Some("!dm:x".try_into().unwrap()),
            dm_joined: true,
            ..Default::default()
        };
        store.put_profile("@a:x", &before).await.unwrap();
        assert_eq!(store.reset_pin_with("@a:x", true).await, Ok(true));
        let record = store.pin("@a:x").unwrap().unwrap();
        assert_eq!((record.hash, record.failed_in_row), (None, 0));
        let after = store.profile("@a:x").unwrap();
        assert!(after.accept_new_keys_at_pin_set);
        assert_eq!(
            crate::store::payments::UserProfile {
                accept_new_keys_at_pin_set: false,
                ..after
            },
            before
        );
        // Repeating it (the operator retries) keeps the flag.
        assert_eq!(store.reset_pin_with("@a:x", true).await, Ok(false));
        assert!(store.profile("@a:x").unwrap().accept_new_keys_at_pin_set);

        // A user who never set a PIN: no PIN record is made, the flag is set all the same.
        assert_eq!(store.reset_pin_with("@b:x", true).await, Ok(false));
        assert!(store.pin("@b:x").unwrap().is_none());
        assert!(store.profile("@b:x").unwrap().accept_new_keys_at_pin_set);

        // Without the flag no confirmation appears, and one set by an earlier confirming reset
        // and not used yet is withdrawn.
        store
            .put_pin("@c:x", &PinRecord::new("$argon2id$v=19$stub".to_owned()))
            .await
            .unwrap();
        assert_eq!(store.reset_pin_with("@c:x", false).await, Ok(true));
        assert_eq!(store.reset_pin("@d:x").await, Ok(false));
        assert_eq!(store.reset_pin("@a:x").await, Ok(false));
        assert!(!store.profile("@c:x").unwrap().accept_new_keys_at_pin_set);
        assert!(!store.profile("@d:x").unwrap().accept_new_keys_at_pin_set);
        assert!(!store.profile("@a:x").unwrap().accept_new_keys_at_pin_set);
    }
}
