//! Provider webhook events already received: `(provider, event id) -> SHA-256 of the body`,
//! durable in a sled tree under `<data_dir>/admin/`. [`open_db`] opens that database; other
//! admin trees (the revoked tokens, [`super::revoked`]) live in it too.
//!
//! An event id is claimed (written and flushed) *before* its effect is applied, so a crash in
//! between leaves a claim whose retry (same body) applies the effect again; every effect is
//! idempotent in the ledger, so that never doubles money. A different body under a claimed id
//! is refused.

use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Tree name: what maps to what.
const TREE: &str = "provider_eventid_bodysha256";

/// Errors of the event store.
#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    /// sled failed.
    #[error("webhook event store: {0}")]
    Sled(#[from] sled::Error),
}

/// What [`EventStore::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First time this event id was seen.
    New,
    /// Seen before with the identical body: a provider retry.
    Replay,
    /// Seen before with another body: refuse.
    Conflict,
}

/// The store of received provider events.
#[derive(Debug, Clone)]
pub struct EventStore {
    db: AdminDb,
    tree: sled::Tree,
}

/// The admin database: sled, and its log file to fdatasync after each flush.
#[derive(Debug, Clone)]
pub struct AdminDb {
    db: sled::Db,
    log: std::sync::Arc<std::fs::File>,
}

impl AdminDb {
    /// The sled database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write so far durable, also against a power cut
    /// ([`crate::sled_open::flush_durably`]).
    pub fn flush(&self) -> sled::Result<()> {
        crate::sled_open::flush_durably(&self.db, &self.log)
    }
}

/// Opens (or creates) the admin database in `dir`, waiting (bounded) for a dropped handle of
/// the same process to release its lock.
pub fn open_db(dir: &Path) -> Result<AdminDb, EventStoreError> {
    // Every write flushes explicitly; a background flusher would only add fsyncs.
    let config = sled::Config::new().path(dir).flush_every_ms(None);
    let db = crate::sled_open::open_waiting_for_lock(&config)?;
    let log = crate::sled_open::log_file(dir).map_err(sled::Error::Io)?;
    Ok(AdminDb {
        db,
        log: std::sync::Arc::new(log),
    })
}

impl EventStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, EventStoreError> {
        Self::with_db(&open_db(dir)?)
    }

    /// The store in an admin database opened with [`open_db`].
    pub fn with_db(db: &AdminDb) -> Result<Self, EventStoreError> {
        let tree = db.db().open_tree(TREE)?;
        Ok(Self {
            db: db.clone(),
            tree,
        })
    }

    /// Claims `(provider, event_id)` for `body`, durably.
    pub fn claim(
        &self,
        provider: &str,
        event_id: &str,
        body: &[u8],
    ) -> Result<Claim, EventStoreError> {
        // Length-prefixed so ("a", "b:c") and ("a:b", "c") never share a key.
        let mut key = Vec::with_capacity(provider.len() + event_id.len() + 4);
        key.extend_from_slice(&(provider.len() as u32).to_be_bytes());
        key.extend_from_slice(provider.as_bytes());
        key.extend_from_slice(event_id.as_bytes());
        let digest = Sha256::digest(body);
        match self
            .tree
            .compare_and_swap(&key, None as Option<&[u8]>, Some(digest.as_slice()))?
        {
            Ok(()) => {
                self.db.flush()?;
                Ok(Claim::New)
            }
            Err(existing) => {
                // The claim may be an earlier call's whose flush failed: the answer rests on
                // it, so it must be durable.
                self.db.flush()?;
                if existing.current.as_deref() == Some(digest.as_slice()) {
                    Ok(Claim::Replay)
                } else {
                    Ok(Claim::Conflict)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_survive_reopen_and_tell_replays_from_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EventStore::open(dir.path()).unwrap();
            assert_eq!(store.claim("acme", "evt_1", b"body").unwrap(), Claim::New);
            assert_eq!(
                store.claim("acme", "evt_1", b"body").unwrap(),
                Claim::Replay
            );
            assert_eq!(store.claim("other", "evt_1", b"x").unwrap(), Claim::New);
        }
        let store = EventStore::open(dir.path()).unwrap();
        assert_eq!(
            store.claim("acme", "evt_1", b"body").unwrap(),
            Claim::Replay
        );
        assert_eq!(
            store.claim("acme", "evt_1", b"body2").unwrap(),
            Claim::Conflict
        );
    }
}
