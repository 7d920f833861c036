//! The merchant registry and its API keys, durable in their own sled database
//! (`<data_dir>/merchants/`), flushed (and fdatasynced) before a call answers.
//!
//! Trees, named `key_value`:
//! - `merchantid_merchant`: merchant id -> [`Merchant`] (JSON)
//! - `userid_merchantid`: Matrix user id -> merchant id (one merchant per Matrix user, so a
//!   typed request from that user names exactly one merchant)
//! - `keyid_key`: key id (`jti`) -> [`KeyRecord`] (JSON), revocation included
//! - `merchantid_keyid`: merchant id, 0x00, key id -> nothing (a merchant's keys, counted)

use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

use super::key::{KeyClaims, KeyError, KeyScope};
use super::model::{Merchant, MerchantId};
use super::MerchantError;

const MERCHANT_TREE: &str = "merchantid_merchant";
const USER_TREE: &str = "userid_merchantid";
const KEY_TREE: &str = "keyid_key";
const MERCHANT_KEYS_TREE: &str = "merchantid_keyid";

/// Most merchants registered at once.
pub const MERCHANTS_MAX: usize = 10_000;
/// Most API keys one merchant may have (revoked ones included, until they expire).
pub const KEYS_PER_MERCHANT_MAX: usize = 100;
/// Most merchants one list call returns.
pub const LIST_PAGE_MAX: usize = 500;

/// A minted merchant key, as stored (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key id.
    pub key_id: String,
    /// Whose key it is.
    pub merchant_id: MerchantId,
    /// What it allows.
    pub scopes: Vec<KeyScope>,
    /// Minted at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    /// When it was revoked, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// The merchant registry.
#[derive(Debug, Clone)]
pub struct MerchantStore {
    db: sled::Db,
    log: std::sync::Arc<std::fs::File>,
    merchants: sled::Tree,
    users: sled::Tree,
    keys: sled::Tree,
    merchant_keys: sled::Tree,
}

fn store_err(e: impl std::fmt::Display) -> MerchantError {
    MerchantError::Store(e.to_string())
}

impl MerchantStore {
    /// Opens (or creates) the registry in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MerchantError> {
        let config = sled::Config::new().path(dir).flush_every_ms(None);
        let db = crate::sled_open::open_waiting_for_lock(&config).map_err(store_err)?;
        let log = crate::sled_open::log_file(dir).map_err(store_err)?;
        Ok(Self {
            merchants: db.open_tree(MERCHANT_TREE).map_err(store_err)?,
            users: db.open_tree(USER_TREE).map_err(store_err)?,
            keys: db.open_tree(KEY_TREE).map_err(store_err)?,
            merchant_keys: db.open_tree(MERCHANT_KEYS_TREE).map_err(store_err)?,
            log: std::sync::Arc::new(log),
            db,
        })
    }

    /// The sled database, for other merchant trees (invoices) to live beside these.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), MerchantError> {
        crate::sled_open::flush_durably(&self.db, &self.log).map_err(store_err)
    }

    /// Registers `merchant`. Refuses an id or a Matrix user already registered, and more than
    /// [`MERCHANTS_MAX`] merchants.
    pub fn create(&self, merchant: &Merchant) -> Result<(), MerchantError> {
        if self.merchants.len() >= MERCHANTS_MAX {
            return Err(MerchantError::TooMany);
        }
        let value = serde_json::to_vec(merchant).map_err(store_err)?;
        let id = merchant.id.as_str().as_bytes();
        let user = merchant.user_id.as_str().as_bytes();
        (&self.merchants, &self.users)
            .transaction(|(merchants, users)| {
                if merchants.get(id)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(MerchantError::IdTaken));
                }
                if users.get(user)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(
                        MerchantError::UserTaken,
                    ));
                }
                merchants.insert(id, value.as_slice())?;
                users.insert(user, id)?;
                Ok(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => store_err(e),
            })?;
        self.flush()
    }

    /// The merchant with `id`.
    pub fn get(&self, id: &MerchantId) -> Result<Option<Merchant>, MerchantError> {
        self.merchants
            .get(id.as_str())
            .map_err(store_err)?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(store_err))
            .transpose()
    }

    /// The merchant whose Matrix user is `user_id`.
    pub fn by_user(&self, user_id: &str) -> Result<Option<Merchant>, MerchantError> {
        let Some(id) = self.users.get(user_id).map_err(store_err)? else {
            return Ok(None);
        };
        let id = MerchantId::parse(&String::from_utf8_lossy(&id))?;
        self.get(&id)
    }

    /// Up to `limit` (at most [`LIST_PAGE_MAX`]) merchants in id order, after `after`.
    pub fn list(
        &self,
        after: Option<&MerchantId>,
        limit: usize,
    ) -> Result<Vec<Merchant>, MerchantError> {
        let start: Vec<u8> = match after {
            Some(id) => [id.as_str().as_bytes(), &[0]].concat(),
            None => Vec::new(),
        };
        self.merchants
            .range(start..)
            .take(limit.clamp(1, LIST_PAGE_MAX))
            .map(|entry| {
                let (_, bytes) = entry.map_err(store_err)?;
                serde_json::from_slice(&bytes).map_err(store_err)
            })
            .collect()
    }

    /// Turns a merchant off (or on again). Returns the merchant as it is now.
    pub fn set_enabled(&self, id: &MerchantId, enabled: bool) -> Result<Merchant, MerchantError> {
        let mut merchant = self.get(id)?.ok_or(MerchantError::UnknownMerchant)?;
        if merchant.enabled != enabled {
            merchant.enabled = enabled;
            let value = serde_json::to_vec(&merchant).map_err(store_err)?;
            self.merchants
                .insert(id.as_str(), value)
                .map_err(store_err)?;
        }
        // Also when unchanged: the state told may be an earlier call's whose flush failed.
        self.flush()?;
        Ok(merchant)
    }

    /// Records a minted key (before it is handed out). Refuses past
    /// [`KEYS_PER_MERCHANT_MAX`] keys for one merchant.
    pub fn record_key(&self, claims: &KeyClaims) -> Result<KeyRecord, MerchantError> {
        let prefix = merchant_key_prefix(&claims.sub);
        if self.merchant_keys.scan_prefix(&prefix).count() >= KEYS_PER_MERCHANT_MAX {
            return Err(MerchantError::TooManyKeys);
        }
        let record = KeyRecord {
            key_id: claims.jti.clone(),
            merchant_id: claims.sub.clone(),
            scopes: claims.scopes.iter().copied().collect(),
            iat: claims.iat,
            exp: claims.exp,
            revoked_at_ms: None,
        };
        let value = serde_json::to_vec(&record).map_err(store_err)?;
        let index = [prefix.as_slice(), claims.jti.as_bytes()].concat();
        (&self.keys, &self.merchant_keys)
            .transaction(|(keys, merchant_keys)| {
                keys.insert(claims.jti.as_bytes(), value.as_slice())?;
                merchant_keys.insert(index.as_slice(), &[][..])?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| store_err(format!("{e:?}")))?;
        self.flush()?;
        Ok(record)
    }

    /// A merchant's keys (revoked ones included), oldest id first.
    pub fn keys_of(&self, merchant: &MerchantId) -> Result<Vec<KeyRecord>, MerchantError> {
        let prefix = merchant_key_prefix(merchant);
        let mut out = Vec::new();
        for entry in self.merchant_keys.scan_prefix(&prefix) {
            let (index, _) = entry.map_err(store_err)?;
            if let Some(record) = self.key(&index[prefix.len()..])? {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn key(&self, key_id: &[u8]) -> Result<Option<KeyRecord>, MerchantError> {
        self.keys
            .get(key_id)
            .map_err(store_err)?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(store_err))
            .transpose()
    }

    /// Revokes `merchant`'s key `key_id`; revoking twice keeps the first time.
    pub fn revoke_key(
        &self,
        merchant: &MerchantId,
        key_id: &str,
        now_ms: u64,
    ) -> Result<KeyRecord, MerchantError> {
        let mut record = self
            .key(key_id.as_bytes())?
            .filter(|r| &r.merchant_id == merchant)
            .ok_or(MerchantError::UnknownKey)?;
        if record.revoked_at_ms.is_none() {
            record.revoked_at_ms = Some(now_ms);
            let value = serde_json::to_vec(&record).map_err(store_err)?;
            self.keys.insert(key_id, value).map_err(store_err)?;
        }
        // Also when revoked before: told as revoked, so durable (an earlier flush may have
        // failed).
        self.flush()?;
        Ok(record)
    }

    /// The second half of authenticating a merchant key (the first is its signature,
    /// [`super::key::KeyAuthority::authenticate`]): the key is known and not revoked, its
    /// merchant exists and is enabled, and it carries `scope`. Returns the merchant.
    pub fn check_key(
        &self,
        claims: &KeyClaims,
        scope: KeyScope,
    ) -> Result<Merchant, MerchantError> {
        let record = self
            .key(claims.jti.as_bytes())?
            .ok_or(MerchantError::Key(KeyError::Revoked))?;
        if record.revoked_at_ms.is_some() || record.merchant_id != claims.sub {
            return Err(MerchantError::Key(KeyError::Revoked));
        }
        let merchant = self
            .get(&claims.sub)?
            .ok_or(MerchantError::UnknownMerchant)?;
        if !merchant.enabled {
            return Err(MerchantError::Disabled);
        }
        if !claims.scopes.contains(&scope) {
            return Err(MerchantError::Key(KeyError::MissingScope(scope)));
        }
        Ok(merchant)
    }
}

fn merchant_key_prefix(merchant: &MerchantId) -> Vec<u8> {
    [merchant.as_str().as_bytes(), &[0]].concat()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::merchants::model::WebhookSecret;

    fn merchant(id: &str, user: &str) -> Merchant {
        Merchant {
            id: MerchantId::parse(id).unwrap(),
            user_id: user.try_into().unwrap(),
            display_name: id.to_owned(),
            webhook_url: "https://shop.example/hook".to_owned(),
            webhook_secret: WebhookSecret::generate(),
            enabled: true,
            created_at_ms: 5,
        }
    }

    fn claims(merchant: &str, jti: &str, scopes: &[KeyScope]) -> KeyClaims {
        KeyClaims {
            sub: MerchantId::parse(merchant).unwrap(),
            aud: super::super::key::MERCHANT_AUDIENCE.to_owned(),
            scopes: scopes.iter().copied().collect::<BTreeSet<_>>(),
            iat: 1,
            exp: 2,
            jti: jti.to_owned(),
        }
    }

    #[test]
    fn merchants_are_unique_by_id_and_by_user_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = MerchantStore::open(dir.path()).unwrap();
            store.create(&merchant("cafe", "@cafe:x.org")).unwrap();
            assert!(matches!(
                store.create(&merchant("cafe", "@other:x.org")),
                Err(MerchantError::IdTaken)
            ));
            assert!(matches!(
                store.create(&merchant("shop", "@cafe:x.org")),
                Err(MerchantError::UserTaken)
            ));
            store.create(&merchant("shop", "@shop:x.org")).unwrap();
        }
        let store = MerchantStore::open(dir.path()).unwrap();
        let cafe = MerchantId::parse("cafe").unwrap();
        assert_eq!(store.get(&cafe).unwrap().unwrap().user_id, "@cafe:x.org");
        assert_eq!(
            store.by_user("@shop:x.org").unwrap().unwrap().id.as_str(),
            "shop"
        );
        let ids: Vec<String> = store
            .list(None, 10)
            .unwrap()
            .into_iter()
            .map(|m| m.id.to_string())
            .collect();
        assert_eq!(ids, ["cafe", "shop"]);
        assert_eq!(store.list(Some(&cafe), 10).unwrap().len(), 1);
        assert!(!store.set_enabled(&cafe, false).unwrap().enabled);
        assert!(!store.get(&cafe).unwrap().unwrap().enabled);
    }

    #[test]
    fn keys_are_bound_to_their_merchant_scoped_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let store = MerchantStore::open(dir.path()).unwrap();
        store.create(&merchant("cafe", "@cafe:x.org")).unwrap();
        store.create(&merchant("shop", "@shop:x.org")).unwrap();
        let key = claims("cafe", "k1", &[KeyScope::Invoices]);
        // Never minted here: refused.
        assert!(matches!(
            store.check_key(&key, KeyScope::Invoices),
            Err(MerchantError::Key(KeyError::Revoked))
        ));
        store.record_key(&key).unwrap();
        assert_eq!(
            store
                .check_key(&key, KeyScope::Invoices)
                .unwrap()
                .id
                .as_str(),
            "cafe"
        );
        assert!(matches!(
            store.check_key(&key, KeyScope::Refunds),
            Err(MerchantError::Key(KeyError::MissingScope(
                KeyScope::Refunds
            )))
        ));
        // The same key id presented as another merchant's: refused.
        let forged = claims("shop", "k1", &[KeyScope::Invoices]);
        assert!(store.check_key(&forged, KeyScope::Invoices).is_err());
        // Shop cannot revoke cafe's key.
        let shop = MerchantId::parse("shop").unwrap();
        assert!(matches!(
            store.revoke_key(&shop, "k1", 9),
            Err(MerchantError::UnknownKey)
        ));
        let cafe = MerchantId::parse("cafe").unwrap();
        assert_eq!(
            store.revoke_key(&cafe, "k1", 9).unwrap().revoked_at_ms,
            Some(9)
        );
        assert_eq!(
            store.revoke_key(&cafe, "k1", 10).unwrap().revoked_at_ms,
            Some(9)
        );
        assert!(matches!(
            store.check_key(&key, KeyScope::Invoices),
            Err(MerchantError::Key(KeyError::Revoked))
        ));
        assert_eq!(store.keys_of(&cafe).unwrap().len(), 1);
        // A disabled merchant's fresh key is refused too.
        let key2 = claims("cafe", "k2", &[KeyScope::Read]);
        store.record_key(&key2).unwrap();
        store.set_enabled(&cafe, false).unwrap();
        assert!(matches!(
            store.check_key(&key2, KeyScope::Read),
            Err(MerchantError::Disabled)
        ));
    }

    #[test]
    fn keys_per_merchant_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = MerchantStore::open(dir.path()).unwrap();
        store.create(&merchant("cafe", "@cafe:x.org")).unwrap();
        for i in 0..KEYS_PER_MERCHANT_MAX {
            store
                .record_key(&claims("cafe", &format!("k{i}"), &[KeyScope::Read]))
                .unwrap();
        }
        assert!(matches!(
            store.record_key(&claims("cafe", "one-more", &[KeyScope::Read])),
            Err(MerchantError::TooManyKeys)
        ));
    }
}
