//! Revoked admin tokens: `jti -> revocation`, durable in the admin sled database
//! (`<data_dir>/admin/`, shared with the webhook events of [`super::events`]).
//!
//! A revocation is written and flushed before the revoke call answers, so a revoked token stays
//! refused across a crash or restart. An entry is kept until `forget_at_ms`: the revoking side
//! sets it to the revocation time plus the longest lifetime a token may have
//! (`admin.token_ttl_max_s`) plus [`MINT_CLOCK_SKEW_S`]; any token minted before the revocation
//! has expired by then, so forgetting its id changes nothing. Once mxpay has seen the revoked
//! token itself (it revoked itself, or was presented after its revocation), the entry is kept
//! at least until that token's own `exp` ([`RevokedTokens::keep_until`]). A second tree, ordered by
//! `forget_at_ms`, lets [`RevokedTokens::prune`] find due entries without scanning them all.

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

/// Tree name: token id -> [`Revocation`] (JSON).
const REVOKED_TREE: &str = "jti_revocation";
/// Tree name: `forget_at_ms` (8 bytes, big-endian) followed by the token id -> nothing.
const FORGET_TREE: &str = "forgetatms_jti";

/// Most revocations kept at once; past it, revoking refuses (rotate the key instead).
pub const REVOKED_TOKENS_MAX: usize = 100_000;

/// Most entries one [`RevokedTokens::prune`] call forgets, so a revoke never runs long.
pub const PRUNE_BATCH_MAX: usize = 64;

/// How far ahead of mxpay's clock the clock of a machine minting tokens may run, in seconds:
/// a token's `iat` comes from the minter's clock, so its expiry may lie that much after
/// revocation time + lifetime. Added to how long a revocation is kept.
pub const MINT_CLOCK_SKEW_S: u64 = 3600;

/// Errors of the revoked-token store.
#[derive(Debug, thiserror::Error)]
pub enum RevokedError {
    /// sled failed.
    #[error("revoked token store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored entry does not parse.
    #[error("revoked token store: corrupt entry: {0}")]
    Corrupt(String),
    /// [`REVOKED_TOKENS_MAX`] revocations are kept already.
    #[error("{REVOKED_TOKENS_MAX} admin tokens are revoked already")]
    Full,
}

impl From<TransactionError<RevokedError>> for RevokedError {
    fn from(e: TransactionError<RevokedError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => Self::Sled(e),
        }
    }
}

/// One revoked token, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// When it was revoked, ms since the Unix epoch (mxpay's clock).
    pub revoked_at_ms: u64,
    /// From when the entry may be forgotten: every token with this id has expired by then.
    pub forget_at_ms: u64,
}

/// What [`RevokedTokens::revoke`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// The stored revocation (the first one, if the id was revoked before).
    pub revocation: Revocation,
    /// Whether the id was revoked before this call.
    pub already: bool,
}

/// The set of revoked token ids.
#[derive(Debug, Clone)]
pub struct RevokedTokens {
    db: super::events::AdminDb,
    revoked: sled::Tree,
    forget: sled::Tree,
}

fn forget_key(forget_at_ms: u64, jti: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + jti.len());
    key.extend_from_slice(&forget_at_ms.to_be_bytes());
    key.extend_from_slice(jti.as_bytes());
    key
}

fn decode(bytes: &[u8]) -> Result<Revocation, RevokedError> {
    serde_json::from_slice(bytes).map_err(|e| RevokedError::Corrupt(e.to_string()))
}

impl RevokedTokens {
    /// The store in an admin database opened with [`super::events::open_db`].
    pub fn with_db(db: &super::events::AdminDb) -> Result<Self, RevokedError> {
        Ok(Self {
            db: db.clone(),
            revoked: db.db().open_tree(REVOKED_TREE)?,
            forget: db.db().open_tree(FORGET_TREE)?,
        })
    }

    /// Whether `jti` is revoked.
    pub fn is_revoked(&self, jti: &str) -> Result<bool, RevokedError> {
        Ok(self.revoked.contains_key(jti.as_bytes())?)
    }

    /// The revocation of `jti`, if any.
    pub fn get(&self, jti: &str) -> Result<Option<Revocation>, RevokedError> {
        self.revoked
            .get(jti.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// How many ids are revoked (counts every entry: for tests and the size bound).
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// Whether no id is revoked.
    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }

    /// Revokes `jti` at `now_ms`, kept for `keep_ms`, durably (flushed before returning).
    /// Idempotent: an id revoked before keeps its first revocation and answers `already`.
    /// Forgets up to [`PRUNE_BATCH_MAX`] due entries first.
    pub fn revoke(&self, jti: &str, now_ms: u64, keep_ms: u64) -> Result<Revoked, RevokedError> {
        self.prune(now_ms)?;
        if let Some(revocation) = self.get(jti)? {
            // Perhaps an earlier revoke whose flush failed: told as revoked, so durable now.
            self.db.flush()?;
            return Ok(Revoked {
                revocation,
                already: true,
            });
        }
        if self.len() >= REVOKED_TOKENS_MAX {
            return Err(RevokedError::Full);
        }
        let fresh = Revocation {
            revoked_at_ms: now_ms,
            forget_at_ms: now_ms.saturating_add(keep_ms),
        };
        let value = serde_json::to_vec(&fresh).expect("revocations serialise");
        // In one transaction, so two concurrent revokes of one id agree on who was first.
        let done = (&self.revoked, &self.forget).transaction(|(revoked, forget)| {
            if let Some(existing) = revoked.get(jti.as_bytes())? {
                let revocation = decode(&existing).map_err(ConflictableTransactionError::Abort)?;
                return Ok(Revoked {
                    revocation,
                    already: true,
                });
            }
            revoked.insert(jti.as_bytes(), value.as_slice())?;
            forget.insert(forget_key(fresh.forget_at_ms, jti), &[] as &[u8])?;
            Ok(Revoked {
                revocation: fresh,
                already: false,
            })
        });
        let done = done.map_err(RevokedError::from)?;
        self.db.flush()?;
        Ok(done)
    }

    /// Keeps the revocation of `jti` at least until `until_ms` (the revoked token's own
    /// expiry, once mxpay has seen the token): moves its `forget_at_ms` later, never earlier,
    /// durably. Returns whether anything changed; an id that is not revoked is left alone.
    ///
    /// Why: a revocation by id alone is kept for the longest lifetime a token may have; a token
    /// that lives longer (minted under a larger `admin.token_ttl_max_s`, or by a machine whose
    /// clock runs fast) must not become usable again when its revocation is forgotten.
    pub fn keep_until(&self, jti: &str, until_ms: u64) -> Result<bool, RevokedError> {
        let changed = (&self.revoked, &self.forget)
            .transaction(|(revoked, forget)| {
                let Some(existing) = revoked.get(jti.as_bytes())? else {
                    return Ok(false);
                };
                let mut revocation =
                    decode(&existing).map_err(ConflictableTransactionError::Abort)?;
                if revocation.forget_at_ms >= until_ms {
                    return Ok(false);
                }
                forget.remove(forget_key(revocation.forget_at_ms, jti))?;
                revocation.forget_at_ms = until_ms;
                let value = serde_json::to_vec(&revocation).expect("revocations serialise");
                revoked.insert(jti.as_bytes(), value)?;
                forget.insert(forget_key(until_ms, jti), &[] as &[u8])?;
                Ok(true)
            })
            .map_err(RevokedError::from)?;
        if changed {
            self.db.flush()?;
        }
        Ok(changed)
    }

    /// Forgets up to [`PRUNE_BATCH_MAX`] revocations whose `forget_at_ms` is at or before
    /// `now_ms`, oldest first. Returns how many. Not flushed: an entry that survives a crash is
    /// only forgotten later.
    pub fn prune(&self, now_ms: u64) -> Result<usize, RevokedError> {
        // Every key of a due entry sorts below the first key of `now_ms + 1`.
        let end = now_ms.saturating_add(1).to_be_bytes();
        let mut due = Vec::new();
        for item in self.forget.range(..end.as_slice()).take(PRUNE_BATCH_MAX) {
            let (key, _) = item?;
            due.push(key);
        }
        let forgotten = due.len();
        for key in due {
            let (at, jti) = key.split_at(8);
            let at_ms = u64::from_be_bytes(at.try_into().expect("8 bytes"));
            (&self.revoked, &self.forget)
                .transaction(|(revoked, forget)| {
                    forget.remove(&*key)?;
                    // Only the revocation this index entry belongs to.
                    if let Some(existing) = revoked.get(jti)? {
                        let revocation =
                            decode(&existing).map_err(ConflictableTransactionError::Abort)?;
                        if revocation.forget_at_ms == at_ms {
                            revoked.remove(jti)?;
                        }
                    }
                    Ok(())
                })
                .map_err(RevokedError::from)?;
        }
        Ok(forgotten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0_MS: u64 = 1_795_000_000_000;
    const KEEP_MS: u64 = 3_600_000;

    fn open(dir: &std::path::Path) -> RevokedTokens {
        RevokedTokens::with_db(&super::super::events::open_db(dir).unwrap()).unwrap()
    }

    #[test]
    fn revocations_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            assert!(!store.is_revoked("a").unwrap());
            let first = store.revoke("a", T0_MS, KEEP_MS).unwrap();
            assert!(!first.already);
            assert_eq!(first.revocation.revoked_at_ms, T0_MS);
            assert_eq!(first.revocation.forget_at_ms, T0_MS + KEEP_MS);
        }
        let store = open(dir.path());
        assert!(store.is_revoked("a").unwrap());
        assert!(!store.is_revoked("b").unwrap());
        assert_eq!(store.get("a").unwrap().unwrap().revoked_at_ms, T0_MS);
    }

    #[test]
    fn revoking_twice_keeps_the_first_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let first = store.revoke("a", T0_MS, KEEP_MS).unwrap();
        let second = store.revoke("a", T0_MS + 5_000, KEEP_MS).unwrap();
        assert!(second.already);
        assert_eq!(second.revocation, first.revocation);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn entries_are_forgotten_once_due_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.revoke("old", T0_MS, KEEP_MS).unwrap();
        store.revoke("new", T0_MS + 1_000, KEEP_MS).unwrap();
        assert_eq!(store.prune(T0_MS + KEEP_MS - 1).unwrap(), 0);
        assert!(store.is_revoked("old").unwrap());
        // A revoke prunes what is due first.
        store.revoke("third", T0_MS + KEEP_MS, KEEP_MS).unwrap();
        assert!(!store.is_revoked("old").unwrap());
        assert!(store.is_revoked("new").unwrap());
        assert!(store.is_revoked("third").unwrap());
        assert_eq!(store.prune(T0_MS + KEEP_MS + 1_000).unwrap(), 1);
        assert!(!store.is_revoked("new").unwrap());
        assert_eq!(store.len(), 1);
        // A forgotten id can be revoked again, as new.
        assert!(
            !store
                .revoke("old", T0_MS + KEEP_MS + 2_000, KEEP_MS)
                .unwrap()
                .already
        );
    }

    #[test]
    fn one_prune_forgets_at_most_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let count = PRUNE_BATCH_MAX + 3;
        for i in 0..count {
            store.revoke(&format!("t{i}"), T0_MS, KEEP_MS).unwrap();
        }
        let later_ms = T0_MS + KEEP_MS;
        assert_eq!(store.prune(later_ms).unwrap(), PRUNE_BATCH_MAX);
        assert_eq!(store.len(), 3);
        assert_eq!(store.prune(later_ms).unwrap(), 3);
        assert!(store.is_empty());
        assert_eq!(store.prune(later_ms).unwrap(), 0);
    }

    #[test]
    fn a_revocation_kept_until_the_token_s_expiry_outlives_the_default_keep() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let token_exp_ms = T0_MS + 3 * KEEP_MS;
        store.revoke("long", T0_MS, KEEP_MS).unwrap();
        store.revoke("short", T0_MS, KEEP_MS).unwrap();
        assert!(store.keep_until("long", token_exp_ms).unwrap());
        // Never earlier, and an id that is not revoked stays unrevoked.
        assert!(!store.keep_until("long", T0_MS).unwrap());
        assert!(!store.keep_until("never", token_exp_ms).unwrap());
        assert!(!store.is_revoked("never").unwrap());
        assert_eq!(store.prune(token_exp_ms - 1).unwrap(), 1);
        assert!(!store.is_revoked("short").unwrap());
        assert!(store.is_revoked("long").unwrap());
        assert_eq!(
            store.get("long").unwrap().unwrap().forget_at_ms,
            token_exp_ms
        );
        assert_eq!(store.prune(token_exp_ms).unwrap(), 1);
        assert!(store.is_empty());
    }

    #[test]
    fn stored_revocation_format_is_stable() {
        let json = serde_json::to_string(&Revocation {
            revoked_at_ms: 1,
            forget_at_ms: 2,
        })
        .unwrap();
        assert_eq!(json, r#"{"revoked_at_ms":1,"forget_at_ms":2}"#);
    }
}
