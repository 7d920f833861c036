//! Encrypted events the bot could not decrypt yet because their room key has not arrived.
//!
//! Each parked event is one small JSON file in `<data_dir>/crypto/parked/`, named by a hash of
//! its event id and written atomically, so a crash never loses or half-writes one and removing
//! one is a single unlink. The set is also held in memory (it is bounded by [`PARKED_MAX`]).
//!
//! An event stays parked after it was decrypted, until the handler above is done with it
//! ([`ParkedStore::remove`] via `BotCrypto::forget_parked`): a retryable failure while handling
//! it, or a crash, must not lose it, and its room key will not arrive a second time to bring it
//! back. Such events ([`ParkedEvent::handed_up`] > 0) are handed up again with every
//! transaction until then, at most [`HANDED_UP_MAX`] times.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

use super::device::write_private;

/// Most events parked at once; beyond it a new undecryptable event is reported at once.
pub const PARKED_MAX: usize = 10_000;

/// Most times a decrypted parked event is handed to the handler without the handler finishing
/// with it; then it is dropped (logged as an error), so one event cannot hold up every later
/// transaction for ever.
pub const HANDED_UP_MAX: u32 = 32;

/// Errors of the parked-event store: all are local I/O problems, never the message's fault.
#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    /// Reading or writing a parked event file failed.
    #[error("parked event store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One parked event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParkedEvent {
    /// Room of the event.
    pub room_id: OwnedRoomId,
    /// The event id.
    pub event_id: OwnedEventId,
    /// Its (claimed) sender.
    pub sender: OwnedUserId,
    /// Megolm session the event needs, if the event said.
    pub session_id: Option<String>,
    /// The whole encrypted event as received.
    pub event: serde_json::Value,
    /// When it was parked (ms since the Unix epoch).
    pub parked_at_ms: u64,
    /// Whether the sender was already told the bot cannot read it.
    #[serde(default)]
    pub notified: bool,
    /// How often it was decrypted and handed to the handler, which has not finished with it
    /// yet (0: not decrypted yet).
    #[serde(default)]
    pub handed_up: u32,
}

/// The parked events of one data dir.
#[derive(Debug)]
pub struct ParkedStore {
    dir: PathBuf,
    events: BTreeMap<OwnedEventId, ParkedEvent>,
}

impl ParkedStore {
    /// Opens (creating) the store in `dir` and loads what it holds. Unreadable files are
    /// skipped with a warning: one corrupt file must not stop the bot.
    pub fn open(dir: &Path) -> Result<Self, ParkedError> {
        let io = |source| ParkedError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut events = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io)?.take(PARKED_MAX * 2) {
            let path = entry.map_err(io)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<ParkedEvent>(&b).ok())
            {
                Some(parked) => {
                    events.insert(parked.event_id.clone(), parked);
                }
                None => tracing::warn!(path = %path.display(), "skipping unreadable parked event"),
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            events,
        })
    }

    fn path_of(&self, event_id: &OwnedEventId) -> PathBuf {
        let hash = blake3::hash(event_id.as_bytes());
        self.dir.join(format!("{}.json", &hash.to_hex()[..32]))
    }

    /// Parks `event` durably. Returns `false` (and stores nothing) when the store is full.
    pub fn park(&mut self, event: ParkedEvent) -> Result<bool, ParkedError> {
        if !self.events.contains_key(&event.event_id) && self.events.len() >= PARKED_MAX {
            return Ok(false);
        }
        self.write(&event)?;
        self.events.insert(event.event_id.clone(), event);
        Ok(true)
    }

    fn write(&self, event: &ParkedEvent) -> Result<(), ParkedError> {
        let path = self.path_of(&event.event_id);
        let bytes = serde_json::to_vec(event).expect("parked event serialises");
        write_private(&path, &bytes).map_err(|source| ParkedError::Io { path, source })
    }

    /// Removes a parked event (after it was decrypted or given up on).
    pub fn remove(&mut self, event_id: &OwnedEventId) -> Result<(), ParkedError> {
        if self.events.remove(event_id).is_some() {
            let path = self.path_of(event_id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(ParkedError::Io { path, source }),
            }
        }
        Ok(())
    }

    /// Records, durably, that the event was decrypted and handed to the handler once more;
    /// returns how often that happened.
    pub fn mark_handed_up(&mut self, event_id: &OwnedEventId) -> Result<u32, ParkedError> {
        let Some(mut event) = self.events.get(event_id).cloned() else {
            return Ok(0);
        };
        event.handed_up = event.handed_up.saturating_add(1);
        let count = event.handed_up;
        self.write(&event)?;
        self.events.insert(event_id.clone(), event);
        Ok(count)
    }

    /// Decrypted events the handler has not finished with, oldest first.
    pub fn handed_up(&self) -> Vec<ParkedEvent> {
        let mut found: Vec<ParkedEvent> = self
            .events
            .values()
            .filter(|e| e.handed_up > 0)
            .cloned()
            .collect();
        found.sort_by_key(|e| e.parked_at_ms);
        found
    }

    /// Records that the sender was told.
    pub fn mark_notified(&mut self, event_id: &OwnedEventId) -> Result<(), ParkedError> {
        if let Some(mut event) = self.events.get(event_id).cloned() {
            event.notified = true;
            self.write(&event)?;
            self.events.insert(event_id.clone(), event);
        }
        Ok(())
    }

    /// Parked events waiting for one of `sessions` in `room`, oldest first.
    pub fn waiting_for(&self, room_id: &OwnedRoomId, session_id: &str) -> Vec<ParkedEvent> {
        let mut found: Vec<ParkedEvent> = self
            .events
            .values()
            .filter(|e| &e.room_id == room_id && e.session_id.as_deref() == Some(session_id))
            .cloned()
            .collect();
        found.sort_by_key(|e| e.parked_at_ms);
        found
    }

    /// All parked events, oldest first.
    pub fn all(&self) -> Vec<ParkedEvent> {
        let mut all: Vec<ParkedEvent> = self.events.values().cloned().collect();
        all.sort_by_key(|e| e.parked_at_ms);
        all
    }

    /// How many events are parked.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(event_id: &str, session: &str, at_ms: u64) -> ParkedEvent {
        ParkedEvent {
            room_id: "!room:hs".try_into().unwrap(),
            event_id: event_id.try_into().unwrap(),
            sender: "@alice:hs".try_into().unwrap(),
            session_id: Some(session.to_owned()),
            event: serde_json::json!({"type": "m.room.encrypted"}),
            parked_at_ms: at_ms,
            notified: false,
            handed_up: 0,
        }
    }

    #[test]
    fn parked_events_survive_reopen_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ParkedStore::open(dir.path()).unwrap();
        assert!(store.park(sample("$b", "s1", 2)).unwrap());
        assert!(store.park(sample("$a", "s1", 1)).unwrap());
        assert!(store.park(sample("$c", "s2", 3)).unwrap());
        store.mark_notified(&"$c".try_into().unwrap()).unwrap();
        drop(store);

        let mut store = ParkedStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 3);
        let room: OwnedRoomId = "!room:hs".try_into().unwrap();
        let waiting: Vec<_> = store
            .waiting_for(&room, "s1")
            .into_iter()
            .map(|e| e.event_id.to_string())
            .collect();
        assert_eq!(waiting, ["$a", "$b"]);
        assert!(store.all().iter().any(|e| e.event_id == "$c" && e.notified));

        store.remove(&"$a".try_into().unwrap()).unwrap();
        drop(store);
        let store = ParkedStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 2);
        assert!(store
            .waiting_for(&room, "s1")
            .iter()
            .all(|e| e.event_id != "$a"));
    }

    /// A decrypted event stays until it is removed, and is listed (durably) as handed up.
    #[test]
    fn handed_up_events_stay_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ParkedStore::open(dir.path()).unwrap();
        assert!(store.park(sample("$a", "s1", 1)).unwrap());
        assert!(store.park(sample("$b", "s1", 2)).unwrap());
        assert!(store.handed_up().is_empty());
        let a: OwnedEventId = "$a".try_into().unwrap();
        assert_eq!(store.mark_handed_up(&a).unwrap(), 1);
        assert_eq!(store.mark_handed_up(&a).unwrap(), 2);
        assert_eq!(
            store.mark_handed_up(&"$gone".try_into().unwrap()).unwrap(),
            0
        );
        drop(store);
        let mut store = ParkedStore::open(dir.path()).unwrap();
        let handed: Vec<_> = store
            .handed_up()
            .into_iter()
            .map(|e| (e.event_id.to_string(), e.handed_up))
            .collect();
        assert_eq!(handed, [("$a".to_owned(), 2)]);
        store.remove(&a).unwrap();
        assert!(store.handed_up().is_empty());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn corrupt_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk.json"), b"{not json").unwrap();
        let store = ParkedStore::open(dir.path()).unwrap();
        assert!(store.is_empty());
    }
}
