//! The durable log of received appservice transactions, keyed by transaction id.
//!
//! The HTTP edge calls [`Inbox::accept`] and answers the homeserver only after it returns: a
//! transaction that was acknowledged is on disk. A worker takes pending transactions in
//! arrival order ([`Inbox::pending`]) and marks each processed or failed; a transaction id seen
//! once is never stored or processed again, also after a restart.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::store::{InboxStore, Inserted, StoreError, StoredEntry};

/// Longest accepted transaction id, in bytes (ids are path segments; Synapse's are decimal).
pub const TXN_ID_MAX_BYTES: usize = 255;

/// Errors of the inbox.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored body is not JSON (cannot happen for bodies that went through `accept`).
    #[error("stored transaction {seq} is not JSON: {source}")]
    CorruptBody {
        /// Its sequence number.
        seq: u64,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A stored transaction id is not UTF-8.
    #[error("stored transaction {seq} has a non-UTF-8 id")]
    CorruptId {
        /// Its sequence number.
        seq: u64,
    },
}

/// One received transaction, as the handler sees it. Its Debug form leaves the body out: a
/// plaintext event in it may hold a PIN typed in the wrong room.
#[derive(Clone, PartialEq)]
pub struct InboxTransaction {
    /// The homeserver's transaction id.
    pub txn_id: String,
    /// Arrival order, strictly increasing across restarts.
    pub seq: u64,
    /// The whole body as received (`events`, `ephemeral`, and the unstable E2E keys).
    pub body: serde_json::Value,
}

impl std::fmt::Debug for InboxTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let events = self.body["events"].as_array().map_or(0, Vec::len);
        f.debug_struct("InboxTransaction")
            .field("txn_id", &self.txn_id)
            .field("seq", &self.seq)
            .field("events", &events)
            .field("body", &"<redacted>")
            .finish()
    }
}

/// Outcome of [`Inbox::accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Stored for processing under this sequence number.
    New(u64),
    /// This transaction id was stored before; nothing changed.
    Duplicate,
}

/// The inbox. Clones share the database and the wake-up signal.
#[derive(Debug, Clone)]
pub struct Inbox {
    store: InboxStore,
    wake: Arc<Notify>,
}

impl Inbox {
    /// Opens (or creates) the inbox database in `dir` (`<data_dir>/inbox`).
    pub fn open(dir: &Path) -> Result<Self, InboxError> {
        Ok(Self {
            store: InboxStore::open(dir)?,
            wake: Arc::new(Notify::new()),
        })
    }

    /// Stores a transaction's raw JSON body unless the same transaction was stored before.
    /// Returns once the body is flushed to disk. The caller has checked that `body` is a JSON
    /// object.
    ///
    /// "The same" is the id *and* what it carries ([`fingerprint`]): Synapse with SQLite
    /// numbers transactions from 1 again after a restart, so an id alone would make mxpay
    /// drop every new transaction as a duplicate; a retry carries the same events (only their
    /// `unsigned.age` differs), so it is still recognised.
    pub async fn accept(&self, txn_id: &str, body: &[u8]) -> Result<Accepted, InboxError> {
        let key = stored_key(txn_id, body);
        let accepted = match self.store.insert(&key, body).await? {
            Inserted::New(seq) => Accepted::New(seq),
            Inserted::Exists(_) => Accepted::Duplicate,
        };
        if let Accepted::New(_) = accepted {
            self.wake.notify_one();
        }
        Ok(accepted)
    }

    /// Up to `limit` unprocessed transactions after sequence number `after`, oldest first.
    pub fn pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<InboxTransaction>, InboxError> {
        self.store
            .pending(after, limit)?
            .into_iter()
            .map(decode)
            .collect()
    }

    /// Transactions whose processing failed for good (at most `limit`, oldest first).
    pub fn failed(&self, limit: usize) -> Result<Vec<InboxTransaction>, InboxError> {
        self.store.failed(limit)?.into_iter().map(decode).collect()
    }

    /// Marks a transaction processed: it leaves the queue and is never handled again.
    pub async fn mark_processed(&self, seq: u64) -> Result<(), InboxError> {
        Ok(self.store.remove_pending(seq).await?)
    }

    /// Marks a transaction failed for good: it leaves the queue and is kept for inspection.
    pub async fn mark_failed(&self, seq: u64) -> Result<(), InboxError> {
        Ok(self.store.move_to_failed(seq).await?)
    }

    /// Number of unprocessed transactions.
    pub fn depth(&self) -> usize {
        self.store.pending_len()
    }

    /// Whether a transaction with this id was ever accepted.
    pub fn contains(&self, txn_id: &str) -> Result<bool, InboxError> {
        let mut prefix = txn_id.as_bytes().to_vec();
        prefix.push(KEY_SEPARATOR);
        Ok(self.store.contains_prefix(&prefix)? || self.store.contains_key(txn_id.as_bytes())?)
    }

    /// Resolves after the next [`Inbox::accept`] of a new transaction (or at once if one
    /// happened since the last wait).
    pub async fn wait_for_new(&self) {
        self.wake.notified().await;
    }
}

/// Separates the homeserver's transaction id from the fingerprint in a stored key (ids with
/// it cannot come from Synapse: they are path segments of printable characters).
const KEY_SEPARATOR: u8 = 0;

/// The stored key of a transaction: its id, [`KEY_SEPARATOR`], its [`fingerprint`].
fn stored_key(txn_id: &str, body: &[u8]) -> Vec<u8> {
    let mut key = txn_id.as_bytes().to_vec();
    key.push(KEY_SEPARATOR);
    key.extend_from_slice(fingerprint(body).as_bytes());
    key
}

/// What a transaction carries, independent of when it was sent: the ids of its room events,
/// its to-device and ephemeral events (whole). Leaves out `unsigned` (Synapse recomputes
/// `age` for each attempt) and the key counts (a snapshot, not news).
fn fingerprint(body: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let mut hasher = blake3::Hasher::new();
    for event in value
        .get("events")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        hasher.update(b"e");
        hasher.update(
            event
                .get("event_id")
                .map(|e| e.to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
    }
    for key in [
        "de.sorunome.msc2409.to_device",
        "to_device",
        "ephemeral",
        "de.sorunome.msc2409.ephemeral",
    ] {
        if let Some(list) = value.get(key) {
            hasher.update(key.as_bytes());
            // serde_json's maps are sorted: the same content always prints the same.
            hasher.update(list.to_string().as_bytes());
        }
    }
    hasher.finalize().to_hex()[..32].to_owned()
}

fn decode(entry: StoredEntry) -> Result<InboxTransaction, InboxError> {
    let seq = entry.seq;
    // Keys written before fingerprints were added are the bare id.
    let id_len = entry
        .key
        .iter()
        .position(|b| *b == KEY_SEPARATOR)
        .unwrap_or(entry.key.len());
    let mut key = entry.key;
    key.truncate(id_len);
    let txn_id = String::from_utf8(key).map_err(|_| InboxError::CorruptId { seq })?;
    let body = serde_json::from_slice(&entry.value)
        .map_err(|source| InboxError::CorruptBody { seq, source })?;
    Ok(InboxTransaction { txn_id, seq, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_body_out() {
        let txn = InboxTransaction {
            txn_id: "7".to_owned(),
            seq: 3,
            body: serde_json::json!({"events": [{"type": "m.room.message",
                "content": {"msgtype": "m.text", "body": "4821"}}]}),
        };
        let debug = format!("{txn:?} {txn:#?}");
        assert!(!debug.contains("4821"), "{debug}");
        assert!(debug.contains("events: 1"), "{debug}");
    }

    /// Synapse (SQLite) numbers transactions from 1 again after it restarts: an old id with new
    /// events is a new transaction, not a duplicate to drop.
    #[tokio::test]
    async fn a_reused_id_with_other_events_is_a_new_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        inbox
            .accept("1", br#"{"events":[{"event_id":"$before_restart"}]}"#)
            .await
            .unwrap();
        let again = inbox
            .accept("1", br#"{"events":[{"event_id":"$after_restart"}]}"#)
            .await
            .unwrap();
        assert!(matches!(again, Accepted::New(_)), "{again:?}");
        let to_device = |n: u32| format!(r#"{{"de.sorunome.msc2409.to_device":[{{"n":{n}}}]}}"#);
        assert!(matches!(
            inbox.accept("2", to_device(1).as_bytes()).await.unwrap(),
            Accepted::New(_)
        ));
        assert_eq!(
            inbox.accept("2", to_device(1).as_bytes()).await.unwrap(),
            Accepted::Duplicate
        );
        assert!(matches!(
            inbox.accept("2", to_device(2).as_bytes()).await.unwrap(),
            Accepted::New(_)
        ));
        let pending = inbox.pending(None, 10).unwrap();
        let ids: Vec<&str> = pending.iter().map(|t| t.txn_id.as_str()).collect();
        assert_eq!(ids, ["1", "1", "2", "2"]);
    }

    #[tokio::test]
    async fn accept_dedupes_and_queues_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        let Accepted::New(s1) = inbox
            .accept(
                "1",
                br#"{"events":[{"event_id":"$a","unsigned":{"age":1}}]}"#,
            )
            .await
            .unwrap()
        else {
            panic!("new")
        };
        // The homeserver retrying: the same events, another age.
        assert_eq!(
            inbox
                .accept(
                    "1",
                    br#"{"events":[{"event_id":"$a","unsigned":{"age":900}}]}"#
                )
                .await
                .unwrap(),
            Accepted::Duplicate
        );
        inbox
            .accept("2", br#"{"events":[{"event_id":"$b"}]}"#)
            .await
            .unwrap();
        // The notify permit from the accepts is there: this returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), inbox.wait_for_new())
            .await
            .expect("woken");
        let pending = inbox.pending(None, 10).unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].txn_id, "1");
        assert_eq!(pending[0].seq, s1);
        assert_eq!(
            pending[0].body,
            serde_json::json!({"events": [{"event_id": "$a", "unsigned": {"age": 1}}]})
        );
        assert_eq!(pending[1].txn_id, "2");
        inbox.mark_processed(s1).await.unwrap();
        assert_eq!(inbox.depth(), 1);
        assert!(inbox.contains("1").unwrap());
        inbox.mark_failed(pending[1].seq).await.unwrap();
        assert_eq!(inbox.depth(), 0);
        assert_eq!(inbox.failed(10).unwrap()[0].txn_id, "2");
    }
}
