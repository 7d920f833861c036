//! What the bot knows of its rooms' membership and join rule, kept fresh by the transaction
//! stream instead of asked of the homeserver for every event.
//!
//! A room is asked about once (members, join rule); after that every `m.room.member` and
//! `m.room.join_rules` event the homeserver pushes to mxpay updates the copy
//! ([`RoomCache::observe`], called while a transaction is ingested, before any of its events is
//! acted on). The homeserver pushes every event of every room the bot is in, so the copy is as
//! fresh as the stream. An answer fetched while the stream changed the room is not stored (a
//! generation counter per room), so an older answer never overwrites a newer event.
//!
//! Bounded: at most [`ROOMS_MAX`] rooms (the least recently used one goes), and rooms with more
//! than [`MEMBERS_MAX`] members are not kept (asked each time).

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;
use ruma::{OwnedRoomId, RoomId};
use serde_json::Value;

/// Rooms kept at most.
pub const ROOMS_MAX: usize = 4_096;
/// Rooms with more members are not kept.
pub const MEMBERS_MAX: usize = 2_000;

#[derive(Debug, Default)]
struct RoomFacts {
    /// Membership by user id (`join`, `invite`, `leave`, ...), once asked.
    members: Option<BTreeMap<String, String>>,
    /// The join rule once asked (`None` inside: the room has none).
    join_rule: Option<Option<String>>,
    /// Bumped by every observed change of the room.
    generation: u64,
    /// When it was last used (a tick of the cache), for eviction.
    used: u64,
}

/// The cache; shared by every clone of the homeserver client.
#[derive(Debug, Default)]
pub struct RoomCache {
    rooms: Mutex<(HashMap<OwnedRoomId, RoomFacts>, u64)>,
}

/// A room's generation when a question to the homeserver started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked(u64);

impl RoomCache {
    /// The room's membership, if known.
    pub fn members(&self, room_id: &RoomId) -> Option<Vec<(String, String)>> {
        let mut guard = self.rooms.lock();
        let (rooms, tick) = &mut *guard;
        *tick += 1;
        let facts = rooms.get_mut(room_id)?;
        facts.used = *tick;
        facts
            .members
            .as_ref()
            .map(|m| m.iter().map(|(u, s)| (u.clone(), s.clone())).collect())
    }

    /// The room's join rule, if known (`Some(None)`: known to have none).
    pub fn join_rule(&self, room_id: &RoomId) -> Option<Option<String>> {
        let mut guard = self.rooms.lock();
        let (rooms, tick) = &mut *guard;
        *tick += 1;
        let facts = rooms.get_mut(room_id)?;
        facts.used = *tick;
        facts.join_rule.clone()
    }

    /// Marks the start of a question about `room_id`.
    pub fn asking(&self, room_id: &RoomId) -> Asked {
        Asked(
            self.rooms
                .lock()
                .0
                .get(room_id)
                .map_or(0, |facts| facts.generation),
        )
    }

    /// Stores the homeserver's answer, unless the stream changed the room since `asked`.
    pub fn store_members(&self, room_id: &RoomId, asked: Asked, members: &[(String, String)]) {
        if members.len() > MEMBERS_MAX {
            return;
        }
        self.update(room_id, asked, |facts| {
            facts.members = Some(members.iter().cloned().collect())
        });
    }

    /// Stores the homeserver's answer, unless the stream changed the room since `asked`.
    pub fn store_join_rule(&self, room_id: &RoomId, asked: Asked, join_rule: Option<String>) {
        self.update(room_id, asked, |facts| facts.join_rule = Some(join_rule));
    }

    fn update(&self, room_id: &RoomId, asked: Asked, set: impl FnOnce(&mut RoomFacts)) {
        let mut guard = self.rooms.lock();
        let (rooms, tick) = &mut *guard;
        *tick += 1;
        let now = *tick;
        let generation = rooms.get(room_id).map_or(0, |facts| facts.generation);
        if generation != asked.0 {
            return; // the stream changed the room meanwhile: the answer may be older
        }
        if !rooms.contains_key(room_id) && rooms.len() >= ROOMS_MAX {
            if let Some(oldest) = rooms
                .iter()
                .min_by_key(|(_, facts)| facts.used)
                .map(|(room, _)| room.clone())
            {
                rooms.remove(&oldest);
            }
        }
        let facts = rooms.entry(room_id.to_owned()).or_default();
        facts.used = now;
        set(facts);
    }

    /// Takes in an event pushed by the homeserver: a membership or join-rule change updates
    /// the room's copy (if kept) and makes answers asked before it stale.
    pub fn observe(&self, event: &Value) {
        let get = |k: &str| event.get(k).and_then(Value::as_str);
        let (Some(kind), Some(state_key), Some(room_id)) =
            (get("type"), get("state_key"), get("room_id"))
        else {
            return;
        };
        if kind != "m.room.member" && kind != "m.room.join_rules" {
            return;
        }
        let Ok(room_id) = RoomId::parse(room_id) else {
            return;
        };
        let mut guard = self.rooms.lock();
        let Some(facts) = guard.0.get_mut(&room_id) else {
            // Not kept: nothing is stale, and the next question asks the homeserver.
            return;
        };
        facts.generation += 1;
        match kind {
            "m.room.member" => {
                let membership = event.pointer("/content/membership").and_then(Value::as_str);
                match (&mut facts.members, membership) {
                    (Some(members), Some(membership)) => {
                        members.insert(state_key.to_owned(), membership.to_owned());
                    }
                    // Unreadable: forget the room's members, ask again next time.
                    (members, _) => *members = None,
                }
            }
            _ => {
                facts.join_rule = Some(
                    event
                        .pointer("/content/join_rule")
                        .and_then(Value::as_str)
                        .map(ToOwned::to_owned),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::room_id;
    use serde_json::json;

    fn member(room: &str, user: &str, membership: &str) -> Value {
        json!({"type": "m.room.member", "room_id": room, "state_key": user,
               "content": {"membership": membership}})
    }

    #[test]
    fn the_stream_keeps_a_kept_room_fresh() {
        let cache = RoomCache::default();
        let room = room_id!("!dm:hs");
        assert_eq!(cache.members(room), None, "never asked");
        let asked = cache.asking(room);
        cache.store_members(room, asked, &[("@a:hs".into(), "join".into())]);
        cache.store_join_rule(room, cache.asking(room), Some("invite".into()));
        cache.observe(&member("!dm:hs", "@eve:hs", "invite"));
        assert_eq!(
            cache.members(room).unwrap(),
            [
                ("@a:hs".to_owned(), "join".to_owned()),
                ("@eve:hs".to_owned(), "invite".to_owned())
            ]
        );
        cache.observe(&json!({"type": "m.room.join_rules", "room_id": "!dm:hs",
                              "state_key": "", "content": {"join_rule": "public"}}));
        assert_eq!(cache.join_rule(room), Some(Some("public".into())));
        // A message with a state-event type but no state key changes nothing.
        cache.observe(&json!({"type": "m.room.member", "room_id": "!dm:hs",
                              "content": {"membership": "leave"}}));
        assert_eq!(cache.members(room).unwrap().len(), 2);
    }

    /// An answer asked before the stream changed the room is older than what the stream said:
    /// it is not stored.
    #[test]
    fn an_answer_older_than_the_stream_is_dropped() {
        let cache = RoomCache::default();
        let room = room_id!("!dm:hs");
        cache.store_members(room, cache.asking(room), &[("@a:hs".into(), "join".into())]);
        let asked = cache.asking(room);
        cache.observe(&member("!dm:hs", "@eve:hs", "join"));
        cache.store_members(room, asked, &[("@a:hs".into(), "join".into())]);
        assert!(cache
            .members(room)
            .unwrap()
            .contains(&("@eve:hs".to_owned(), "join".to_owned())));
    }

    #[test]
    fn bounded_in_rooms_and_members() {
        let cache = RoomCache::default();
        let big: Vec<(String, String)> = (0..=MEMBERS_MAX)
            .map(|i| (format!("@u{i}:hs"), "join".to_owned()))
            .collect();
        let room = room_id!("!big:hs");
        cache.store_members(room, cache.asking(room), &big);
        assert_eq!(cache.members(room), None, "too big to keep");
        for i in 0..=ROOMS_MAX {
            let room = RoomId::parse(format!("!r{i}:hs")).unwrap();
            cache.store_join_rule(&room, cache.asking(&room), None);
        }
        assert_eq!(cache.rooms.lock().0.len(), ROOMS_MAX);
        assert_eq!(
            cache.join_rule(&RoomId::parse("!r0:hs").unwrap()),
            None,
            "the least recently used room went"
        );
    }
}
