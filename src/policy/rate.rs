//! How many payment commands (`!pay`, `!withdraw`, transfer intents) one user may start per
//! minute. Decisions only: the caller passes the time, so tests move it.
//!
//! A sliding window per user holding the ids of the events it admitted, so the same event
//! handled again (a retried transaction) is admitted again without counting twice. Refused
//! events leave nothing behind. Memory is bounded: at most `per_window_max` ids per user and
//! at most [`USERS_TRACKED_MAX`] users; a user whose window is empty is forgotten.

use std::collections::{HashMap, VecDeque};

/// The window: one minute.
pub const WINDOW_MS: u64 = 60_000;

/// Most users tracked at once. When full (after forgetting every user whose window emptied),
/// a new user is refused: that needs this many users each starting payments within a minute,
/// which is a flood in itself.
pub const USERS_TRACKED_MAX: usize = 10_000;

/// Longest event id remembered, in bytes (Matrix caps event ids at 255 bytes).
const EVENT_ID_BYTES_MAX: usize = 255;

/// The per-user command rate.
#[derive(Debug)]
pub struct CommandRate {
    per_window_max: usize,
    users: HashMap<String, VecDeque<(u64, String)>>,
}

impl CommandRate {
    /// At most `per_window_max` commands per user per [`WINDOW_MS`] (at least 1).
    pub fn new(per_window_max: u32) -> Self {
        Self {
            per_window_max: (per_window_max as usize).max(1),
            users: HashMap::new(),
        }
    }

    /// Whether `user` may start the command of `event_id` at `now_ms`; counts it when so. The
    /// same event admitted before (within the window) is admitted again without counting.
    pub fn admit(&mut self, user: &str, event_id: &str, now_ms: u64) -> bool {
        let event_id = &event_id[..floor_char_boundary(event_id, EVENT_ID_BYTES_MAX)];
        if !self.users.contains_key(user) && self.users.len() >= USERS_TRACKED_MAX {
            self.forget_idle(now_ms);
            if self.users.len() >= USERS_TRACKED_MAX {
                return false;
            }
        }
        let window = self.users.entry(user.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|(at_ms, _)| at_ms.saturating_add(WINDOW_MS) <= now_ms)
        {
            window.pop_front();
        }
        if window.iter().any(|(_, id)| id == event_id) {
            return true;
        }
        if window.len() >= self.per_window_max {
            return false;
        }
        window.push_back((now_ms, event_id.to_owned()));
        true
    }

    /// Drops every user whose window has emptied by `now_ms`.
    fn forget_idle(&mut self, now_ms: u64) {
        self.users.retain(|_, window| {
            window
                .back()
                .is_some_and(|(at_ms, _)| at_ms.saturating_add(WINDOW_MS) > now_ms)
        });
    }

    /// How many users are tracked (for tests).
    #[cfg(test)]
    fn users_tracked(&self) -> usize {
        self.users.len()
    }
}

fn floor_char_boundary(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_starts_at_most_the_maximum_per_minute_and_retries_count_once() {
        let mut rate = CommandRate::new(3);
        let t0 = 1_000_000;
        for i in 0..3 {
            assert!(rate.admit("@a:hs", &format!("$e{i}"), t0 + i));
        }
        assert!(
            !rate.admit("@a:hs", "$e3", t0 + 10),
            "the fourth in a minute"
        );
        assert!(rate.admit("@a:hs", "$e1", t0 + 20), "a retried event again");
        assert!(rate.admit("@b:hs", "$f0", t0 + 20), "other users apart");
        // A minute after the first, one slot is free again.
        assert!(!rate.admit("@a:hs", "$e3", t0 + WINDOW_MS - 1));
        assert!(rate.admit("@a:hs", "$e3", t0 + WINDOW_MS));
        assert!(!rate.admit("@a:hs", "$e4", t0 + WINDOW_MS));
    }

    #[test]
    fn memory_stays_bounded() {
        let mut rate = CommandRate::new(2);
        let t0 = 5_000_000;
        for i in 0..USERS_TRACKED_MAX {
            assert!(rate.admit(&format!("@u{i}:hs"), "$e", t0));
        }
        assert!(!rate.admit("@late:hs", "$e", t0 + 1), "full: refused");
        // Once their windows empty, old users are forgotten and new ones admitted.
        assert!(rate.admit("@late:hs", "$e", t0 + WINDOW_MS));
        assert_eq!(rate.users_tracked(), 1);
        // Long event ids are cut (at a char boundary), not stored whole.
        let long = format!("${}", "é".repeat(500));
        assert!(rate.admit("@late:hs", &long, t0 + WINDOW_MS));
        assert!(rate.admit("@late:hs", &long, t0 + WINDOW_MS), "same event");
    }
}
