//! Which Megolm message each event id carried, so a ciphertext delivered again under another
//! event id is recognised as a replay.
//!
//! The homeserver chooses event ids and `origin_server_ts`: whoever can push appservice
//! transactions (its admin, anyone holding the hs_token) can take an old `m.room.encrypted`
//! event, give it a new id and timestamp, and deliver it again. The bot keeps every Megolm
//! session it was given, so the copy decrypts. What the homeserver cannot forge is the
//! message's identity: (room, Megolm session id, message index). The index sits in the
//! ciphertext header, covered by the session's MAC and the sender's signature, so a successful
//! decryption proves it. Each identity is recorded durably with the event id that first
//! carried it, *before* the event is handed up; the same identity under another event id is a
//! replay and is never acted on (mautrix-go's `crypto/decryptmegolm.go` keeps the same
//! session + index -> event id map).
//!
//! The same records give a freshness bound the homeserver cannot move: a message was
//! encrypted before any later message (higher index) of its session, so the earliest time the
//! bot saw one of those bounds when it was sent ([`MessageCheck::Fresh::sent_before_ms`]).
//!
//! Olm (to-device) messages need no such record here: matrix-sdk-crypto stores a hash of each
//! decrypted Olm message (sender key + SHA-256 of the ciphertext) in the crypto store and
//! refuses a replayed one (`OlmError::ReplayedMessage`), and the ratchet has consumed its key.
//!
//! Storage: sled tree `megolmmessage_eventid`, key `room_id 0x00 session_id 0x00 index(u32 BE)`,
//! value `seen_ms(u64 BE) event_id`. Records are kept for [`RETENTION_MS`]; when older ones are
//! pruned, the session's highest pruned index is kept as a floor (tree
//! `megolmsession_floorindex`, key `room_id 0x00 session_id 0x00`), and any message at or below
//! the floor counts as a replay: it was encrypted before a message the bot saw more than the
//! retention ago.

use std::path::Path;

use base64::Engine as _;
use ruma::{EventId, OwnedEventId, RoomId};

/// How long each message identity is kept individually (then only the session's floor).
pub const RETENTION_MS: u64 = 30 * 24 * 3_600_000;

/// Most records one prune pass looks at (a bound on the work of one call: passes resume where
/// the last one stopped, so the whole store is covered over several, never at start-up).
pub const PRUNE_SCAN_MAX: usize = 10_000;

/// Errors of the replay store: local storage problems, never the message's fault.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// sled failed.
    #[error("replay record store: {0}")]
    Store(#[from] sled::Error),
    /// A stored record did not decode (a programming error or disk damage).
    #[error("replay record store holds a malformed record")]
    Corrupt,
}

/// Where one Megolm message sits in its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MegolmMessageId {
    /// The Megolm session id (public: it is in the event's clear content).
    pub session_id: String,
    /// The message's index in its session.
    pub index: u32,
}

impl MegolmMessageId {
    /// Reads the session id and message index of an `m.room.encrypted` event's content
    /// (`m.megolm.v1.aes-sha2`). `None` when the content is not a well-formed Megolm
    /// message: such an event would not decrypt either.
    pub fn from_content(content: &serde_json::Value) -> Option<Self> {
        let session_id = content.get("session_id")?.as_str()?.to_owned();
        let ciphertext = content.get("ciphertext")?.as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(ciphertext.trim_end_matches('='))
            .ok()?;
        let message = vodozemac::megolm::MegolmMessage::from_bytes(&bytes).ok()?;
        Some(Self {
            session_id,
            index: message.message_index(),
        })
    }
}

/// What the records say of a decrypted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageCheck {
    /// First seen under this event id (now recorded), or seen before under this same id (the
    /// homeserver retrying a transaction).
    Fresh {
        /// The earliest time (ms) the bot saw a later message of the same session, if any:
        /// the message was encrypted before then, whatever its `origin_server_ts` says.
        sent_before_ms: Option<u64>,
    },
    /// The same message under another event id: a replay.
    Replay {
        /// The event id that carried it first (`None` when only the session's floor is left).
        first_event_id: Option<OwnedEventId>,
    },
}

/// The durable record of Megolm message identities. Opening the same directory again in one
/// process (the bot's crypto restarted, as tests do) shares the open database: sled holds an
/// exclusive lock for as long as any handle lives.
#[derive(Debug, Clone)]
pub struct ReplayStore {
    handles: std::sync::Arc<Handles>,
}

#[derive(Debug)]
struct Handles {
    db: sled::Db,
    /// sled's log file, fdatasync'ed after each flush: a record must survive a power cut.
    log: std::fs::File,
    tree: sled::Tree,
    floors: sled::Tree,
    /// Where the next prune pass starts (empty: at the beginning).
    prune_from: parking_lot::Mutex<Vec<u8>>,
}

/// The stores open in this process, by directory.
fn open_stores() -> &'static parking_lot::Mutex<
    std::collections::HashMap<std::path::PathBuf, std::sync::Weak<Handles>>,
> {
    static OPEN: std::sync::OnceLock<
        parking_lot::Mutex<std::collections::HashMap<std::path::PathBuf, std::sync::Weak<Handles>>>,
    > = std::sync::OnceLock::new();
    OPEN.get_or_init(Default::default)
}

impl ReplayStore {
    /// Opens (creating) the store in `dir`, or shares it if this process has it open.
    pub fn open(dir: &Path) -> Result<Self, ReplayError> {
        let key = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let mut open = open_stores().lock();
        open.retain(|_, handles| handles.strong_count() > 0);
        if let Some(handles) = open.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(Self { handles });
        }
        let db = crate::sled_open::open_waiting_for_lock(&sled::Config::new().path(dir))?;
        let tree = db.open_tree("megolmmessage_eventid")?;
        let floors = db.open_tree("megolmsession_floorindex")?;
        let log = crate::sled_open::log_file(dir).map_err(sled::Error::Io)?;
        let handles = std::sync::Arc::new(Handles {
            db,
            log,
            tree,
            floors,
            prune_from: parking_lot::Mutex::new(Vec::new()),
        });
        open.insert(key, std::sync::Arc::downgrade(&handles));
        Ok(Self { handles })
    }

    /// Checks `message` of `room_id` against the records and, when it is fresh and new,
    /// records it for `event_id` durably (flushed) before answering.
    pub fn check_and_record(
        &self,
        room_id: &RoomId,
        message: &MegolmMessageId,
        event_id: &EventId,
        now_ms: u64,
    ) -> Result<MessageCheck, ReplayError> {
        let prefix = session_prefix(room_id, &message.session_id);
        if let Some(floor) = self.handles.floors.get(&prefix)? {
            if message.index <= decode_index(&floor)? {
                return Ok(MessageCheck::Replay {
                    first_event_id: None,
                });
            }
        }
        let key = index_key(&prefix, message.index);
        if let Some(value) = self.handles.tree.get(&key)? {
            let (_, first) = decode_value(&value)?;
            // Recorded before, perhaps by a call whose flush failed: the answer rests on the
            // record, so it must be durable.
            crate::sled_open::flush_durably(&self.handles.db, &self.handles.log)?;
            if first.as_str() != event_id.as_str() {
                return Ok(MessageCheck::Replay {
                    first_event_id: Some(first),
                });
            }
        } else {
            self.handles
                .tree
                .insert(&key, encode_value(now_ms, event_id))?;
            crate::sled_open::flush_durably(&self.handles.db, &self.handles.log)?;
        }
        Ok(MessageCheck::Fresh {
            sent_before_ms: self.sent_before_ms(&prefix, message.index)?,
        })
    }

    /// The earliest time a later message of the session was seen. The scan is bounded: later
    /// indexes were mostly seen later, so the first few give the bound.
    fn sent_before_ms(&self, prefix: &[u8], index: u32) -> Result<Option<u64>, ReplayError> {
        const SCAN_MAX: usize = 16;
        if index == u32::MAX {
            return Ok(None);
        }
        let start = index_key(prefix, index + 1);
        let end = index_key(prefix, u32::MAX);
        let mut earliest: Option<u64> = None;
        for entry in self.handles.tree.range(start..=end).take(SCAN_MAX) {
            let (_, value) = entry?;
            let (seen_ms, _) = decode_value(&value)?;
            earliest = Some(earliest.map_or(seen_ms, |e| e.min(seen_ms)));
        }
        Ok(earliest)
    }

    /// Drops individual records seen before `now_ms - RETENTION_MS`, raising each affected
    /// session's floor to the highest index dropped. Looks at most `scan_max` records, from
    /// where the previous pass stopped (wrapping round at the end); returns how many it
    /// dropped. Call it periodically.
    pub fn prune(&self, now_ms: u64, scan_max: usize) -> Result<usize, ReplayError> {
        let cutoff_ms = now_ms.saturating_sub(RETENTION_MS);
        let mut dropped = 0;
        let mut batch = sled::Batch::default();
        let mut floors: std::collections::BTreeMap<Vec<u8>, u32> = Default::default();
        let mut prune_from = self.handles.prune_from.lock();
        let mut next_from = Vec::new();
        for (scanned, entry) in self.handles.tree.range(prune_from.clone()..).enumerate() {
            let (key, value) = entry?;
            if scanned == scan_max {
                next_from = key.to_vec();
                break;
            }
            if key.len() < 4 {
                return Err(ReplayError::Corrupt);
            }
            let (prefix, index) = key.split_at(key.len() - 4);
            let index = decode_index(index)?;
            let (seen_ms, _) = decode_value(&value)?;
            if seen_ms >= cutoff_ms {
                continue;
            }
            let floor = floors.entry(prefix.to_vec()).or_insert(index);
            *floor = (*floor).max(index);
            batch.remove(key);
            dropped += 1;
        }
        *prune_from = next_from;
        if dropped == 0 {
            return Ok(0);
        }
        // Floors first: a crash between the two writes leaves records above a floor (harmless),
        // never a dropped record without its floor.
        for (prefix, index) in floors {
            let old = match self.handles.floors.get(&prefix)? {
                Some(v) => decode_index(&v)?,
                None => 0,
            };
            self.handles
                .floors
                .insert(prefix, &index.max(old).to_be_bytes())?;
        }
        crate::sled_open::flush_durably(&self.handles.db, &self.handles.log)?;
        self.handles.tree.apply_batch(batch)?;
        crate::sled_open::flush_durably(&self.handles.db, &self.handles.log)?;
        Ok(dropped)
    }

    /// How many individual records are held (tests and diagnostics).
    pub fn len(&self) -> usize {
        self.handles.tree.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.handles.tree.is_empty()
    }
}

fn session_prefix(room_id: &RoomId, session_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(room_id.as_str().len() + session_id.len() + 2);
    key.extend_from_slice(room_id.as_bytes());
    key.push(0);
    key.extend_from_slice(session_id.as_bytes());
    key.push(0);
    key
}

fn index_key(prefix: &[u8], index: u32) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn decode_index(bytes: &[u8]) -> Result<u32, ReplayError> {
    Ok(u32::from_be_bytes(
        bytes.try_into().map_err(|_| ReplayError::Corrupt)?,
    ))
}

fn encode_value(seen_ms: u64, event_id: &EventId) -> Vec<u8> {
    let mut value = seen_ms.to_be_bytes().to_vec();
    value.extend_from_slice(event_id.as_bytes());
    value
}

fn decode_value(value: &[u8]) -> Result<(u64, OwnedEventId), ReplayError> {
    if value.len() < 8 {
        return Err(ReplayError::Corrupt);
    }
    let (seen, id) = value.split_at(8);
    let seen_ms = u64::from_be_bytes(seen.try_into().map_err(|_| ReplayError::Corrupt)?);
    let id = std::str::from_utf8(id).map_err(|_| ReplayError::Corrupt)?;
    let id = EventId::parse(id).map_err(|_| ReplayError::Corrupt)?;
    Ok((seen_ms, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{event_id, room_id};

    fn message(session: &str, index: u32) -> MegolmMessageId {
        MegolmMessageId {
            session_id: session.to_owned(),
            index,
        }
    }

    #[test]
    fn the_same_message_under_another_event_id_is_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplayStore::open(dir.path()).unwrap();
        let room = room_id!("!room:example.org");
        let first = event_id!("$first");
        let m = message("sess", 7);
        assert_eq!(
            store.check_and_record(room, &m, first, 1_000).unwrap(),
            MessageCheck::Fresh {
                sent_before_ms: None
            }
        );
        // The homeserver retrying the same event: fine.
        assert!(matches!(
            store.check_and_record(room, &m, first, 2_000).unwrap(),
            MessageCheck::Fresh { .. }
        ));
        // The same ciphertext with a new id: a replay, naming the first.
        assert_eq!(
            store
                .check_and_record(room, &m, event_id!("$copy"), 3_000)
                .unwrap(),
            MessageCheck::Replay {
                first_event_id: Some(first.to_owned())
            }
        );
        // Another room, another session or another index is another message.
        for (r, m) in [
            (room_id!("!other:example.org"), message("sess", 7)),
            (room, message("sess2", 7)),
            (room, message("sess", 8)),
        ] {
            assert!(matches!(
                store
                    .check_and_record(r, &m, event_id!("$copy"), 3_000)
                    .unwrap(),
                MessageCheck::Fresh { .. }
            ));
        }
    }

    #[test]
    fn a_second_open_in_the_same_process_shares_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let room = room_id!("!room:example.org");
        let first = ReplayStore::open(dir.path()).unwrap();
        // Still open (a restarted component whose old handle is not dropped yet): no lock error.
        let second = ReplayStore::open(dir.path()).unwrap();
        first
            .check_and_record(room, &message("s", 1), event_id!("$a"), 1)
            .unwrap();
        assert!(matches!(
            second
                .check_and_record(room, &message("s", 1), event_id!("$b"), 2)
                .unwrap(),
            MessageCheck::Replay { .. }
        ));
    }

    #[test]
    fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let room = room_id!("!room:example.org");
        {
            let store = ReplayStore::open(dir.path()).unwrap();
            store
                .check_and_record(room, &message("s", 1), event_id!("$a"), 1)
                .unwrap();
        }
        let store = ReplayStore::open(dir.path()).unwrap();
        assert!(matches!(
            store
                .check_and_record(room, &message("s", 1), event_id!("$b"), 2)
                .unwrap(),
            MessageCheck::Replay { .. }
        ));
    }

    #[test]
    fn a_later_message_seen_bounds_when_an_earlier_one_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplayStore::open(dir.path()).unwrap();
        let room = room_id!("!room:example.org");
        store
            .check_and_record(room, &message("s", 5), event_id!("$five"), 10_000)
            .unwrap();
        store
            .check_and_record(room, &message("s", 9), event_id!("$nine"), 20_000)
            .unwrap();
        // Index 3 shows up only now (withheld by the homeserver): it was sent before 10 s.
        assert_eq!(
            store
                .check_and_record(room, &message("s", 3), event_id!("$three"), 90_000)
                .unwrap(),
            MessageCheck::Fresh {
                sent_before_ms: Some(10_000)
            }
        );
        // Another session says nothing about it.
        assert_eq!(
            store
                .check_and_record(room, &message("t", 3), event_id!("$t3"), 90_000)
                .unwrap(),
            MessageCheck::Fresh {
                sent_before_ms: None
            }
        );
    }

    #[test]
    fn pruned_records_leave_a_floor_that_still_refuses_their_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplayStore::open(dir.path()).unwrap();
        let room = room_id!("!room:example.org");
        for index in 0..4 {
            store
                .check_and_record(room, &message("s", index), event_id!("$old"), 1_000)
                .unwrap();
        }
        let now_ms = 1_000 + RETENTION_MS + 1;
        store
            .check_and_record(room, &message("s", 10), event_id!("$new"), now_ms)
            .unwrap();
        assert_eq!(store.prune(now_ms, PRUNE_SCAN_MAX).unwrap(), 4);
        assert_eq!(store.prune(now_ms, PRUNE_SCAN_MAX).unwrap(), 0);
        // Index 2 (pruned) and 3 (at the floor): replays, whatever the event id.
        for index in [2, 3] {
            assert_eq!(
                store
                    .check_and_record(room, &message("s", index), event_id!("$x"), now_ms)
                    .unwrap(),
                MessageCheck::Replay {
                    first_event_id: None
                }
            );
        }
        // Above the floor: judged by its own record.
        assert!(matches!(
            store
                .check_and_record(room, &message("s", 10), event_id!("$new"), now_ms)
                .unwrap(),
            MessageCheck::Fresh { .. }
        ));
        assert!(matches!(
            store
                .check_and_record(room, &message("s", 11), event_id!("$y"), now_ms)
                .unwrap(),
            MessageCheck::Fresh { .. }
        ));
    }

    #[test]
    fn bounded_passes_resume_and_cover_the_whole_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplayStore::open(dir.path()).unwrap();
        let room = room_id!("!room:example.org");
        for index in 0..10 {
            store
                .check_and_record(room, &message("s", index), event_id!("$old"), 1_000)
                .unwrap();
        }
        let now_ms = 1_000 + RETENTION_MS + 1;
        // Three records a pass: 3 + 3 + 3 + 1, then nothing is left.
        let passes: Vec<usize> = (0..5).map(|_| store.prune(now_ms, 3).unwrap()).collect();
        assert_eq!(passes, [3, 3, 3, 1, 0]);
        assert!(store.is_empty());
    }

    #[test]
    fn the_index_is_read_from_a_real_megolm_ciphertext() {
        use vodozemac::megolm::GroupSession;
        let mut session = GroupSession::new(Default::default());
        let _ = session.encrypt("zero");
        let _ = session.encrypt("one");
        let third = session.encrypt("two");
        let content = serde_json::json!({
            "algorithm": "m.megolm.v1.aes-sha2",
            "session_id": session.session_id(),
            "ciphertext": third.to_base64(),
        });
        assert_eq!(
            MegolmMessageId::from_content(&content),
            Some(MegolmMessageId {
                session_id: session.session_id(),
                index: 2
            })
        );
        let mut broken = content.clone();
        broken["ciphertext"] = "not base64!".into();
        assert_eq!(MegolmMessageId::from_content(&broken), None);
    }
}
