//! Picks the bot device's share out of an appservice transaction's E2E extensions.
//!
//! A transaction body carries, besides `events`, unstable fields from MSC2409 (to-device events)
//! and MSC3202 (device list changes, one-time key counts, unused fallback key types). They are
//! addressed to every appservice user and device; only the bot device's part may reach its
//! `OlmMachine` (another device's key counts would make it upload keys for no reason).

use std::collections::BTreeMap;

use ruma::events::AnyToDeviceEvent;
use ruma::serde::Raw;
use ruma::{DeviceId, OneTimeKeyAlgorithm, OwnedUserId, UInt, UserId};
use serde_json::Value;

/// Field names, unstable prefixes first as Synapse sends them; stable names are accepted too.
const TO_DEVICE_KEYS: &[&str] = &["de.sorunome.msc2409.to_device", "to_device"];
const DEVICE_LISTS_KEYS: &[&str] = &["org.matrix.msc3202.device_lists", "device_lists"];
const OTK_COUNT_KEYS: &[&str] = &[
    "org.matrix.msc3202.device_one_time_keys_count",
    "org.matrix.msc3202.device_one_time_key_counts",
    "device_one_time_keys_count",
];
const FALLBACK_KEYS: &[&str] = &[
    "org.matrix.msc3202.device_unused_fallback_key_types",
    "device_unused_fallback_key_types",
];

/// What one transaction holds for the bot's device.
#[derive(Debug, Default)]
pub struct DeviceChanges {
    /// To-device events addressed to the bot's device (or to all its devices).
    pub to_device: Vec<Raw<AnyToDeviceEvent>>,
    /// To-device events for other users or devices, dropped (counted for logs).
    pub to_device_dropped: usize,
    /// Users whose device lists changed.
    pub changed: Vec<OwnedUserId>,
    /// Users the appservice no longer shares a room with.
    pub left: Vec<OwnedUserId>,
    /// The bot device's one-time key counts; `None` if the transaction had none for it.
    pub one_time_key_counts: Option<BTreeMap<OneTimeKeyAlgorithm, UInt>>,
    /// The bot device's unused fallback key types; `None` if absent.
    pub unused_fallback_keys: Option<Vec<OneTimeKeyAlgorithm>>,
    /// Whether the body had any MSC3202 field at all (for the start-up diagnosis).
    pub saw_msc3202: bool,
}

impl DeviceChanges {
    /// Whether there is anything for the `OlmMachine`.
    pub fn is_empty(&self) -> bool {
        self.to_device.is_empty()
            && self.changed.is_empty()
            && self.left.is_empty()
            && self.one_time_key_counts.is_none()
            && self.unused_fallback_keys.is_none()
    }
}

fn first<'a>(body: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| body.get(*k))
}

fn user_list(value: Option<&Value>) -> Vec<OwnedUserId> {
    value
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(Value::as_str)
                .filter_map(|s| UserId::parse(s).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Extracts the bot device's share from a raw transaction body. Malformed entries are skipped:
/// a homeserver bug must not stop the rest of the transaction from being processed.
pub fn device_changes(body: &Value, user_id: &UserId, device_id: &DeviceId) -> DeviceChanges {
    let mut changes = DeviceChanges::default();

    if let Some(events) = first(body, TO_DEVICE_KEYS).and_then(Value::as_array) {
        for event in events {
            let to_user = event.get("to_user_id").and_then(Value::as_str);
            let to_device = event.get("to_device_id").and_then(Value::as_str);
            let for_us = to_user == Some(user_id.as_str())
                && matches!(to_device, Some(d) if d == device_id.as_str() || d == "*");
            match Raw::<AnyToDeviceEvent>::from_json_string(event.to_string()) {
                Ok(raw) if for_us => changes.to_device.push(raw),
                _ => changes.to_device_dropped += 1,
            }
        }
    }

    if let Some(lists) = first(body, DEVICE_LISTS_KEYS) {
        changes.saw_msc3202 = true;
        changes.changed = user_list(lists.get("changed"));
        changes.left = user_list(lists.get("left"));
    }

    if let Some(counts) = first(body, OTK_COUNT_KEYS) {
        changes.saw_msc3202 = true;
        if let Some(ours) = counts
            .get(user_id.as_str())
            .and_then(|d| d.get(device_id.as_str()))
        {
            let parsed: BTreeMap<OneTimeKeyAlgorithm, UInt> =
                serde_json::from_value(ours.clone()).unwrap_or_default();
            changes.one_time_key_counts = Some(parsed);
        }
    }

    if let Some(fallback) = first(body, FALLBACK_KEYS) {
        changes.saw_msc3202 = true;
        if let Some(ours) = fallback
            .get(user_id.as_str())
            .and_then(|d| d.get(device_id.as_str()))
        {
            changes.unused_fallback_keys = serde_json::from_value(ours.clone()).ok();
        }
    }

    changes
}

#[cfg(test)]
mod tests {
    use ruma::{device_id, user_id};
    use serde_json::json;

    use super::*;

    #[test]
    fn keeps_only_the_bot_devices_share() {
        let body = json!({
            "events": [],
            "de.sorunome.msc2409.to_device": [
                {"type": "m.room.encrypted", "sender": "@a:hs", "content": {},
                 "to_user_id": "@_mxpay:hs", "to_device_id": "BOTDEV"},
                {"type": "m.room.encrypted", "sender": "@a:hs", "content": {},
                 "to_user_id": "@_mxpay:hs", "to_device_id": "OTHER"},
                {"type": "m.room.encrypted", "sender": "@a:hs", "content": {},
                 "to_user_id": "@_mxpay_puppet:hs", "to_device_id": "BOTDEV"}
            ],
            "org.matrix.msc3202.device_lists": {"changed": ["@a:hs", "not a user"], "left": ["@b:hs"]},
            "org.matrix.msc3202.device_one_time_keys_count": {
                "@_mxpay:hs": {"BOTDEV": {"signed_curve25519": 42}, "OTHER": {"signed_curve25519": 1}}
            },
            "org.matrix.msc3202.device_unused_fallback_key_types": {
                "@_mxpay:hs": {"BOTDEV": ["signed_curve25519"]}
            }
        });
        let changes = device_changes(&body, user_id!("@_mxpay:hs"), device_id!("BOTDEV"));
        assert_eq!(changes.to_device.len(), 1);
        assert_eq!(changes.to_device_dropped, 2);
        assert_eq!(changes.changed, vec![user_id!("@a:hs").to_owned()]);
        assert_eq!(changes.left, vec![user_id!("@b:hs").to_owned()]);
        let counts = changes
            .one_time_key_counts
            .clone()
            .expect("counts for our device");
        assert_eq!(
            counts[&OneTimeKeyAlgorithm::SignedCurve25519],
            UInt::from(42u32)
        );
        assert_eq!(
            changes.unused_fallback_keys,
            Some(vec![OneTimeKeyAlgorithm::SignedCurve25519])
        );
        assert!(changes.saw_msc3202);
        assert!(!changes.is_empty());
    }

    #[test]
    fn alternate_count_field_name_is_read() {
        let body = json!({
            "org.matrix.msc3202.device_one_time_key_counts": {
                "@_mxpay:hs": {"BOTDEV": {"signed_curve25519": 7}}
            }
        });
        let changes = device_changes(&body, user_id!("@_mxpay:hs"), device_id!("BOTDEV"));
        assert_eq!(
            changes.one_time_key_counts.unwrap()[&OneTimeKeyAlgorithm::SignedCurve25519],
            UInt::from(7u32)
        );
    }

    #[test]
    fn plain_transaction_has_nothing_for_the_device() {
        let body = json!({"events": [{"type": "m.room.message"}]});
        let changes = device_changes(&body, user_id!("@_mxpay:hs"), device_id!("BOTDEV"));
        assert!(changes.is_empty());
        assert!(!changes.saw_msc3202);
    }
}
