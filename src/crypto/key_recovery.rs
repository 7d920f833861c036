//! Asking a sender again for a room key the bot never received, as clients do.
//!
//! Synapse 1.163 can skip a to-device message for an appservice user while other users'
//! to-device messages are being written at the same moment (its MSC2409 support moves the
//! appservice's stream position past a message it never read). If that message carried an
//! `m.room_key`, the bot's events of that Megolm session stay parked. The bot recovers:
//!
//! 1. An event parked for [`KEY_REQUEST_AFTER_MS`] makes the bot send an `m.room_key_request`
//!    (a plaintext to-device message, as the spec has it) to the device that created the
//!    session (the event's `device_id`), or to all the sender's devices when the event does not
//!    name it. Repeated at most [`KEY_REQUEST_ATTEMPTS_MAX`] times, [`KEY_REQUEST_INTERVAL_MS`]
//!    apart, until the sender is told (the parked event's notice); at most
//!    [`KEY_REQUESTS_IN_FLIGHT_MAX`] sessions are asked for at once.
//! 2. The sender's client re-shares a session it already shared with the bot's device, as an
//!    Olm-encrypted `m.forwarded_room_key` from the message index it first shared at
//!    (matrix-sdk-crypto: `GossipMachine::should_share_key`; needs its
//!    `automatic-room-key-forwarding` feature, on by default in matrix-sdk).
//! 3. matrix-sdk-crypto 0.18 accepts forwarded keys only from the bot's *own* verified devices
//!    (`GossipMachine::should_accept_forward`) and hands the decrypted event back with its
//!    session key zeroized (`ToDeviceEvents::serialize_zeroized`). So, before the machine sees
//!    a transaction, the bot decrypts the Olm messages of the senders it asked on throw-away
//!    copies of its Olm sessions, read fresh from the store (a *peek*: the stored sessions and
//!    one-time keys are left as they are for the machine). After the machine processed the
//!    transaction, a peeked key is accepted only when
//!    - the machine itself decrypted the same forward (so Olm authenticated it: the recipient
//!      is the bot, the sender's device is known and its ed25519 key is the one in the message);
//!    - the Olm sender's curve25519 key is the forwarded session's own `sender_key` with an
//!      empty forwarding chain: the creator re-sharing its own session;
//!    - the claimed ed25519 key is that device's;
//!    - the key is the session asked for (a Megolm session id is derived from its key);
//!    - the bot asked that user for that session, and does not hold it already.
//! 4. Such a key is stored as an `m.room_key` from that device would be (not marked imported):
//!    that is what it is, and trust in events decrypted with it is then computed as for any
//!    other session (an imported one would show as `insecure_source`).
//!
//! Outstanding requests are kept in memory: after a restart, events still parked are asked for
//! again by the next sweep.

use std::collections::{BTreeMap, BTreeSet};

use matrix_sdk::deserialized_responses::{AlgorithmInfo, ProcessedToDeviceEvent};
use matrix_sdk_crypto::olm::{InboundGroupSession, PickledInboundGroupSession, SenderData};
use matrix_sdk_crypto::types::events::room::encrypted::{
    EncryptedToDeviceEvent, ToDeviceEncryptedEventContent,
};
use matrix_sdk_crypto::types::{EventEncryptionAlgorithm, SigningKey, SigningKeys};
use matrix_sdk_crypto::vodozemac::megolm::{
    ExportedSessionKey, InboundGroupSession as MegolmInbound, SessionConfig,
};
use matrix_sdk_crypto::vodozemac::olm::OlmMessage;
use matrix_sdk_crypto::vodozemac::{Curve25519PublicKey, Ed25519PublicKey};
use ruma::api::client::to_device::send_event_to_device;
use ruma::events::room_key_request::{
    Action, RequestedKeyInfo, ToDeviceRoomKeyRequestEventContent,
};
use ruma::events::{AnyToDeviceEvent, AnyToDeviceEventContent, ToDeviceEventType};
use ruma::serde::Raw;
use ruma::to_device::DeviceIdOrAllDevices;
use ruma::{
    DeviceId, DeviceKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedTransactionId, OwnedUserId,
    RoomId, TransactionId, UserId,
};
use serde_json::Value;

use super::parked::ParkedEvent;
use super::{BotCrypto, CryptoError};
use crate::homeserver::Identity;

/// How long an event waits parked before the bot asks for its room key: the key usually
/// arrives a few milliseconds after the event, in the next transaction.
pub const KEY_REQUEST_AFTER_MS: u64 = 2_000;
/// Least time between two requests for the same session.
pub const KEY_REQUEST_INTERVAL_MS: u64 = 10_000;
/// Most requests for one session (the sender is told after the notice delay anyway).
pub const KEY_REQUEST_ATTEMPTS_MAX: u32 = 3;
/// Most sessions asked for at once; beyond it, events wait for a slot (or their notice).
pub const KEY_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// How long an unanswered request is remembered: a forward arriving later is not accepted.
pub const KEY_REQUEST_TTL_MS: u64 = 10 * 60_000;
/// Most Olm messages peeked at per transaction (each costs a store read and a decryption).
pub const PEEKS_PER_TRANSACTION_MAX: usize = 64;

const MEGOLM_V1: &str = "m.megolm.v1.aes-sha2";
const FORWARDED_ROOM_KEY: &str = "m.forwarded_room_key";

/// A Megolm session of a room.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SessionRef {
    room_id: OwnedRoomId,
    session_id: String,
}

#[derive(Clone, Debug)]
struct Outstanding {
    /// Who was asked (the events' sender): only they may answer.
    sender: OwnedUserId,
    request_id: OwnedTransactionId,
    first_sent_ms: u64,
    last_sent_ms: u64,
    attempts: u32,
}

/// One `m.room_key_request` to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRequest {
    /// Room of the session.
    pub room_id: OwnedRoomId,
    /// The Megolm session asked for.
    pub session_id: String,
    /// The sender of the parked events: the request goes to their devices.
    pub sender: OwnedUserId,
    /// The device that created the session, when the event named it; else all devices.
    pub device_id: Option<OwnedDeviceId>,
    /// The session creator's curve25519 key, when the event gave it (deprecated field).
    pub sender_key: Option<String>,
    /// Same for every repetition of the request for this session.
    pub request_id: OwnedTransactionId,
    /// 1 for the first request, then 2, 3...
    pub attempt: u32,
}

impl KeyRequest {
    /// The to-device messages of this request, sent from `requesting_device_id`.
    pub fn messages(
        &self,
        requesting_device_id: &DeviceId,
    ) -> BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, Raw<AnyToDeviceEventContent>>> {
        #[allow(deprecated)] // `sender_key`: still sent, as the spec says, when known.
        let body = {
            let mut info = RequestedKeyInfo::new(
                MEGOLM_V1.into(),
                self.room_id.clone(),
                self.sender_key.clone().unwrap_or_default(),
                self.session_id.clone(),
            );
            info.sender_key = self.sender_key.clone();
            info
        };
        let content = ToDeviceRoomKeyRequestEventContent::new(
            Action::Request,
            Some(body),
            requesting_device_id.to_owned(),
            self.request_id.clone(),
        );
        let target = match &self.device_id {
            Some(device) => DeviceIdOrAllDevices::DeviceId(device.clone()),
            None => DeviceIdOrAllDevices::AllDevices,
        };
        let raw = Raw::new(&content)
            .expect("a key request serialises")
            .cast_unchecked();
        BTreeMap::from([(self.sender.clone(), BTreeMap::from([(target, raw)]))])
    }
}

/// The bot's outstanding room key requests (decisions only, no I/O).
#[derive(Debug, Default)]
pub struct KeyRequests {
    outstanding: BTreeMap<SessionRef, Outstanding>,
}

impl KeyRequests {
    /// Decides which requests to send now for `parked` (all parked events), and records them.
    /// Forgets requests for sessions no event waits for any more, and expired ones.
    pub fn plan(&mut self, parked: &[ParkedEvent], now_ms: u64) -> Vec<KeyRequest> {
        let waiting: BTreeSet<SessionRef> = parked
            .iter()
            .filter(|p| p.handed_up == 0)
            .filter_map(|p| {
                Some(SessionRef {
                    room_id: p.room_id.clone(),
                    session_id: p.session_id.clone()?,
                })
            })
            .collect();
        self.outstanding.retain(|session, request| {
            waiting.contains(session)
                && now_ms.saturating_sub(request.first_sent_ms) < KEY_REQUEST_TTL_MS
        });

        let mut planned = BTreeSet::new();
        let mut out = Vec::new();
        for event in parked {
            let Some(session_id) = event.session_id.clone() else {
                continue;
            };
            // Decrypted already, or the sender was told: nothing more to ask.
            if event.handed_up > 0 || event.notified {
                continue;
            }
            if now_ms.saturating_sub(event.parked_at_ms) < KEY_REQUEST_AFTER_MS {
                continue;
            }
            let content = event.event.get("content").unwrap_or(&Value::Null);
            if content.get("algorithm").and_then(Value::as_str) != Some(MEGOLM_V1) {
                continue;
            }
            let session = SessionRef {
                room_id: event.room_id.clone(),
                session_id,
            };
            if !planned.insert(session.clone()) {
                continue;
            }
            let attempt = match self.outstanding.get_mut(&session) {
                Some(request) => {
                    if request.sender != event.sender
                        || request.attempts >= KEY_REQUEST_ATTEMPTS_MAX
                        || now_ms.saturating_sub(request.last_sent_ms) < KEY_REQUEST_INTERVAL_MS
                    {
                        continue;
                    }
                    request.attempts += 1;
                    request.last_sent_ms = now_ms;
                    request.attempts
                }
                None => {
                    if self.outstanding.len() >= KEY_REQUESTS_IN_FLIGHT_MAX {
                        continue;
                    }
                    self.outstanding.insert(
                        session.clone(),
                        Outstanding {
                            sender: event.sender.clone(),
                            request_id: TransactionId::new(),
                            first_sent_ms: now_ms,
                            last_sent_ms: now_ms,
                            attempts: 1,
                        },
                    );
                    1
                }
            };
            let request_id = self.outstanding[&session].request_id.clone();
            out.push(KeyRequest {
                room_id: session.room_id,
                session_id: session.session_id,
                sender: event.sender.clone(),
                device_id: content
                    .get("device_id")
                    .and_then(Value::as_str)
                    .map(OwnedDeviceId::from),
                sender_key: content
                    .get("sender_key")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                request_id,
                attempt,
            });
        }
        out
    }

    /// Whether the bot waits for an answer from `sender`.
    pub fn is_asking(&self, sender: &UserId) -> bool {
        self.outstanding.values().any(|r| r.sender == sender)
    }

    /// When the bot first asked `sender` for the session, if it did.
    pub fn asked_at_ms(&self, room_id: &RoomId, session_id: &str, sender: &UserId) -> Option<u64> {
        self.outstanding
            .iter()
            .find(|(s, r)| s.room_id == room_id && s.session_id == session_id && r.sender == sender)
            .map(|(_, r)| r.first_sent_ms)
    }

    /// Forgets the request for a session whose key arrived.
    pub fn answered(&mut self, room_id: &RoomId, session_id: &str) {
        self.outstanding
            .retain(|s, _| !(s.room_id == room_id && s.session_id == session_id));
    }

    /// How many sessions are asked for.
    pub fn len(&self) -> usize {
        self.outstanding.len()
    }

    /// Whether no request is outstanding.
    pub fn is_empty(&self) -> bool {
        self.outstanding.is_empty()
    }
}

/// A forwarded room key read (peeked) from an Olm message before the machine processed it.
pub struct PeekedKey {
    sender: OwnedUserId,
    olm_sender_key: Curve25519PublicKey,
    /// The plaintext `m.forwarded_room_key` content, session key included (secret).
    content: Value,
}

impl std::fmt::Debug for PeekedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeekedKey")
            .field("sender", &self.sender)
            .field("olm_sender_key", &self.olm_sender_key.to_base64())
            .field("content", &"<redacted>")
            .finish()
    }
}

/// What a forwarded room key claims, as read from its content (without the session key).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForwardClaim {
    room_id: OwnedRoomId,
    session_id: String,
    /// The session creator's curve25519 key (`sender_key`).
    creator_key: String,
    claimed_ed25519: String,
    chain_len: usize,
}

impl ForwardClaim {
    fn from_content(content: &Value) -> Option<Self> {
        let text = |k: &str| content.get(k).and_then(Value::as_str);
        if text("algorithm") != Some(MEGOLM_V1) {
            return None;
        }
        Some(Self {
            room_id: RoomId::parse(text("room_id")?).ok()?,
            session_id: text("session_id")?.to_owned(),
            creator_key: text("sender_key")?.to_owned(),
            claimed_ed25519: text("sender_claimed_ed25519_key")?.to_owned(),
            chain_len: content
                .get("forwarding_curve25519_key_chain")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
        })
    }
}

/// Why a forwarded key was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The bot did not ask this user for this session (or no longer waits for it).
    NotRequested,
    /// The Olm sender is not the device that created the session.
    NotTheCreator,
    /// The key went through other devices first.
    ForwardedFurther,
}

/// The checks on the claim alone: asked for, from its creator, first hand.
fn check_claim(claim: &ForwardClaim, olm_sender_key: &str, asked: bool) -> Result<(), Refusal> {
    if !asked {
        return Err(Refusal::NotRequested);
    }
    if claim.creator_key != olm_sender_key {
        return Err(Refusal::NotTheCreator);
    }
    if claim.chain_len != 0 {
        return Err(Refusal::ForwardedFurther);
    }
    Ok(())
}

impl BotCrypto {
    /// Sends the room key requests that are due for the parked events `parked` (see the module
    /// documentation). A request that fails to send is logged; the next sweep tries again
    /// within the bounds.
    pub(super) async fn request_missing_keys(&self, parked: &[ParkedEvent], now_ms: u64) {
        let requests = self.inner.key_requests.lock().plan(parked, now_ms);
        for request in requests {
            let http = send_event_to_device::v3::Request::new_raw(
                ToDeviceEventType::RoomKeyRequest,
                TransactionId::new(),
                request.messages(self.device_id()),
            );
            match self
                .inner
                .client
                .send(http, Identity::BotDevice(&self.inner.identity))
                .await
            {
                Ok(_) => tracing::info!(
                    room_id = %request.room_id,
                    session_id = %request.session_id,
                    sender = %request.sender,
                    device_id = request.device_id.as_ref().map(|d| d.as_str()).unwrap_or("*"),
                    attempt = request.attempt,
                    "room key missing; asked the sender's device for it"
                ),
                Err(e) => tracing::warn!(
                    room_id = %request.room_id,
                    session_id = %request.session_id,
                    error = %e,
                    "could not send a room key request"
                ),
            }
        }
    }

    /// Reads the forwarded room keys in `to_device` from senders the bot asked, before the
    /// machine processes them (it would keep the key to itself). Decrypts on copies of the
    /// Olm state read from the store; nothing is written.
    pub(super) async fn peek_forwarded_keys(
        &self,
        to_device: &[Raw<AnyToDeviceEvent>],
    ) -> Result<Vec<PeekedKey>, CryptoError> {
        if to_device.is_empty() || self.inner.key_requests.lock().is_empty() {
            return Ok(Vec::new());
        }
        let our_key = self.inner.machine.identity_keys().curve25519;
        let mut peeked = Vec::new();
        let mut tried = 0;
        for raw in to_device {
            if tried >= PEEKS_PER_TRANSACTION_MAX {
                tracing::warn!("too many candidate forwarded room keys in one transaction");
                break;
            }
            let Ok(event) = raw.deserialize_as_unchecked::<EncryptedToDeviceEvent>() else {
                continue;
            };
            if !self.inner.key_requests.lock().is_asking(&event.sender) {
                continue;
            }
            let ToDeviceEncryptedEventContent::OlmV1Curve25519AesSha2(olm) = &event.content else {
                continue;
            };
            if olm.recipient_key != our_key {
                continue;
            }
            tried += 1;
            let Some(plaintext) = self.peek_olm(olm.sender_key, &olm.ciphertext).await? else {
                continue;
            };
            let Ok(plain) = serde_json::from_str::<Value>(&plaintext) else {
                continue;
            };
            if plain.get("type").and_then(Value::as_str) == Some(FORWARDED_ROOM_KEY)
                && plain.get("sender").and_then(Value::as_str) == Some(event.sender.as_str())
            {
                peeked.push(PeekedKey {
                    sender: event.sender.clone(),
                    olm_sender_key: olm.sender_key,
                    content: plain.get("content").cloned().unwrap_or(Value::Null),
                });
            }
        }
        Ok(peeked)
    }

    /// Decrypts one Olm message on copies of the bot's Olm state (sessions and account as the
    /// store holds them); `None` when no copy can.
    async fn peek_olm(
        &self,
        sender_key: Curve25519PublicKey,
        message: &OlmMessage,
    ) -> Result<Option<String>, CryptoError> {
        // The store behind the machine's caches unpickles a fresh copy on every read.
        let store = &**self.inner.machine.store();
        let sessions = store
            .get_sessions(&sender_key.to_base64())
            .await?
            .unwrap_or_default();
        match message {
            OlmMessage::Normal(_) => {
                for mut session in sessions {
                    if let Ok(plaintext) = session.decrypt(message).await {
                        return Ok(Some(plaintext));
                    }
                }
                Ok(None)
            }
            OlmMessage::PreKey(pre_key) => {
                let session_id = pre_key.session_id();
                if let Some(mut session) =
                    sessions.into_iter().find(|s| s.session_id() == session_id)
                {
                    return Ok(session.decrypt(message).await.ok());
                }
                // A new Olm session (the message that opened it was the one lost): open it on
                // a copy of the account, whose one-time key stays unused in the store.
                let Some(mut account) = store.load_account().await? else {
                    return Ok(None);
                };
                let keys = account.device_keys();
                Ok(account
                    .create_inbound_session(sender_key, keys, pre_key)
                    .ok()
                    .map(|created| created.plaintext))
            }
        }
    }

    /// Takes the peeked keys that pass every check (module documentation) against what the
    /// machine decrypted (`processed`), stores them, and returns their sessions.
    pub(super) async fn accept_forwarded_keys(
        &self,
        processed: &[ProcessedToDeviceEvent],
        peeked: Vec<PeekedKey>,
    ) -> Result<Vec<(OwnedRoomId, String)>, CryptoError> {
        if peeked.is_empty() {
            return Ok(Vec::new());
        }
        let mut recovered = Vec::new();
        for event in processed {
            let ProcessedToDeviceEvent::Decrypted {
                raw,
                encryption_info,
            } = event
            else {
                continue;
            };
            let Ok(plain) = raw.deserialize_as_unchecked::<Value>() else {
                continue;
            };
            if plain.get("type").and_then(Value::as_str) != Some(FORWARDED_ROOM_KEY) {
                continue;
            }
            let AlgorithmInfo::OlmV1Curve25519AesSha2 {
                curve25519_public_key_base64: olm_key,
            } = &encryption_info.algorithm_info
            else {
                continue;
            };
            let Some(claim) = plain.get("content").and_then(ForwardClaim::from_content) else {
                continue;
            };
            let sender = &encryption_info.sender;
            let asked_at_ms = self.inner.key_requests.lock().asked_at_ms(
                &claim.room_id,
                &claim.session_id,
                sender,
            );
            if let Err(refusal) = check_claim(&claim, olm_key, asked_at_ms.is_some()) {
                // A late answer to a request whose key came anyway is normal; the rest is not.
                if refusal == Refusal::NotRequested {
                    tracing::debug!(
                        %sender,
                        room_id = %claim.room_id,
                        session_id = %claim.session_id,
                        "forwarded room key not asked for (any more); not taken"
                    );
                    continue;
                }
                tracing::warn!(
                    %sender,
                    room_id = %claim.room_id,
                    session_id = %claim.session_id,
                    ?refusal,
                    "forwarded room key not taken"
                );
                continue;
            }
            let Some(peek) = peeked.iter().find(|p| {
                &p.sender == sender
                    && p.olm_sender_key.to_base64() == *olm_key
                    && ForwardClaim::from_content(&p.content).as_ref() == Some(&claim)
            }) else {
                tracing::warn!(%sender, session_id = %claim.session_id, "forwarded room key decrypted by the machine but not readable by the bot");
                continue;
            };
            let Some(session) = self
                .session_from_forward(
                    sender,
                    encryption_info.sender_device.as_deref(),
                    &claim,
                    peek,
                )
                .await?
            else {
                continue;
            };
            let store = &**self.inner.machine.store();
            if store
                .get_inbound_group_session(&claim.room_id, &claim.session_id)
                .await?
                .is_none()
            {
                store
                    .save_inbound_group_sessions(vec![session], None)
                    .await?;
            }
            self.inner
                .key_requests
                .lock()
                .answered(&claim.room_id, &claim.session_id);
            let waited_ms = self
                .inner
                .clock
                .now_ms()
                .saturating_sub(asked_at_ms.unwrap_or_default());
            self.inner
                .keys_recovered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                %sender,
                room_id = %claim.room_id,
                session_id = %claim.session_id,
                waited_ms,
                "room key recovered: its creator sent it again when asked"
            );
            recovered.push((claim.room_id, claim.session_id));
        }
        Ok(recovered)
    }

    /// The session of a forward that passed the claim checks, if the device and the key agree
    /// with the claim: the Olm-authenticated device holds the creator's curve25519 key and the
    /// claimed ed25519 key, and the key is the session's.
    async fn session_from_forward(
        &self,
        sender: &UserId,
        sender_device: Option<&DeviceId>,
        claim: &ForwardClaim,
        peek: &PeekedKey,
    ) -> Result<Option<InboundGroupSession>, CryptoError> {
        let refuse = |why: &str| {
            tracing::warn!(%sender, session_id = %claim.session_id, "forwarded room key not taken: {why}");
            Ok(None)
        };
        let Some(device_id) = sender_device else {
            return refuse("the sending device is unknown");
        };
        let Some(device) = self
            .inner
            .machine
            .get_device(sender, device_id, None)
            .await?
        else {
            return refuse("the sending device is unknown");
        };
        let device_curve = device.curve25519_key().map(|k| k.to_base64());
        let device_ed = device.ed25519_key();
        if device_curve.as_deref() != Some(claim.creator_key.as_str())
            || device_ed.map(|k| k.to_base64()).as_deref() != Some(claim.claimed_ed25519.as_str())
        {
            return refuse("the device's keys are not the session creator's");
        }
        let (Some(signing_key), Ok(creator_key)) = (
            device_ed,
            Curve25519PublicKey::from_base64(&claim.creator_key),
        ) else {
            return refuse("malformed keys");
        };
        let Some(session_key) = peek
            .content
            .get("session_key")
            .and_then(Value::as_str)
            .and_then(|k| ExportedSessionKey::from_base64(k).ok())
        else {
            return refuse("malformed session key");
        };
        let megolm = MegolmInbound::import(&session_key, SessionConfig::version_1());
        if megolm.session_id() != claim.session_id {
            return refuse("the key is not the session's");
        }
        Ok(Some(creator_session(
            megolm,
            creator_key,
            signing_key,
            &claim.room_id,
        )?))
    }
}

/// An inbound session as an `m.room_key` from its creator makes it: creator keys set, sender
/// data to be looked up from the device, not imported.
fn creator_session(
    megolm: MegolmInbound,
    creator_key: Curve25519PublicKey,
    signing_key: Ed25519PublicKey,
    room_id: &RoomId,
) -> Result<InboundGroupSession, CryptoError> {
    let pickle = PickledInboundGroupSession {
        pickle: megolm.pickle(),
        sender_key: creator_key,
        signing_key: SigningKeys::from([(
            DeviceKeyAlgorithm::Ed25519,
            SigningKey::Ed25519(signing_key),
        )]),
        sender_data: SenderData::unknown(),
        forwarder_data: None,
        room_id: room_id.to_owned(),
        imported: false,
        backed_up: false,
        history_visibility: None,
        algorithm: EventEncryptionAlgorithm::MegolmV1AesSha2,
        shared_history: false,
    };
    InboundGroupSession::from_pickle(pickle)
        .map_err(|e| CryptoError::Encrypt(format!("cannot build a recovered room key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parked(event_id: &str, session: &str, at_ms: u64) -> ParkedEvent {
        ParkedEvent {
            room_id: "!room:hs".try_into().unwrap(),
            event_id: event_id.try_into().unwrap(),
            sender: "@alice:hs".try_into().unwrap(),
            session_id: Some(session.to_owned()),
            event: json!({"type": "m.room.encrypted", "content": {
                "algorithm": MEGOLM_V1, "session_id": session,
                "sender_key": "creatorcurve", "device_id": "ALICEDEV", "ciphertext": "x"}}),
            parked_at_ms: at_ms,
            notified: false,
            handed_up: 0,
        }
    }

    #[test]
    fn asks_once_per_session_after_the_wait_and_repeats_within_bounds() {
        let mut requests = KeyRequests::default();
        let events = vec![parked("$a", "s1", 0), parked("$b", "s1", 100)];
        assert!(
            requests.plan(&events, KEY_REQUEST_AFTER_MS - 1).is_empty(),
            "too early"
        );

        let first = requests.plan(&events, KEY_REQUEST_AFTER_MS);
        assert_eq!(first.len(), 1, "one request per session: {first:?}");
        assert_eq!(
            first[0].device_id.as_deref().map(|d| d.as_str()),
            Some("ALICEDEV")
        );
        assert_eq!(first[0].sender_key.as_deref(), Some("creatorcurve"));
        assert_eq!(first[0].attempt, 1);
        assert!(requests.is_asking(&OwnedUserId::try_from("@alice:hs").unwrap()));

        let mut now = KEY_REQUEST_AFTER_MS + KEY_REQUEST_INTERVAL_MS - 1;
        assert!(requests.plan(&events, now).is_empty(), "not again so soon");
        let mut attempts = vec![1];
        for _ in 0..10 {
            now += KEY_REQUEST_INTERVAL_MS;
            for r in requests.plan(&events, now) {
                assert_eq!(r.request_id, first[0].request_id, "same request repeated");
                attempts.push(r.attempt);
            }
        }
        assert_eq!(attempts, (1..=KEY_REQUEST_ATTEMPTS_MAX).collect::<Vec<_>>());
    }

    #[test]
    fn stops_for_told_decrypted_or_gone_events_and_caps_sessions_in_flight() {
        let mut requests = KeyRequests::default();
        let mut told = parked("$t", "s1", 0);
        told.notified = true;
        let mut decrypted = parked("$d", "s2", 0);
        decrypted.handed_up = 1;
        assert!(requests.plan(&[told, decrypted], 60_000).is_empty());

        let many: Vec<ParkedEvent> = (0..KEY_REQUESTS_IN_FLIGHT_MAX + 10)
            .map(|n| parked(&format!("$e{n}"), &format!("s{n}"), 0))
            .collect();
        assert_eq!(
            requests.plan(&many, 60_000).len(),
            KEY_REQUESTS_IN_FLIGHT_MAX
        );
        assert_eq!(requests.len(), KEY_REQUESTS_IN_FLIGHT_MAX);
        // Their events gone (keys arrived), the requests are forgotten and slots free again.
        assert!(requests.plan(&many[..1], 60_001).is_empty());
        assert_eq!(requests.len(), 1);
        requests.answered(&OwnedRoomId::try_from("!room:hs").unwrap(), "s0");
        assert!(requests.is_empty());
    }

    #[test]
    fn a_request_is_forgotten_after_its_ttl() {
        let mut requests = KeyRequests::default();
        let events = vec![parked("$a", "s1", 0)];
        assert_eq!(requests.plan(&events, KEY_REQUEST_AFTER_MS).len(), 1);
        let room: OwnedRoomId = "!room:hs".try_into().unwrap();
        let alice: OwnedUserId = "@alice:hs".try_into().unwrap();
        assert!(requests.asked_at_ms(&room, "s1", &alice).is_some());
        assert!(requests
            .asked_at_ms(&room, "s1", &OwnedUserId::try_from("@mallory:hs").unwrap())
            .is_none());
        // Past the TTL it is dropped; the event, still parked, is asked for anew.
        let later = KEY_REQUEST_AFTER_MS + KEY_REQUEST_TTL_MS;
        let again = requests.plan(&events, later);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempt, 1);
    }

    #[test]
    fn the_request_message_names_the_session_and_the_creating_device() {
        let mut requests = KeyRequests::default();
        let request = requests
            .plan(&[parked("$a", "s1", 0)], KEY_REQUEST_AFTER_MS)
            .remove(0);
        let messages = request.messages("BOTDEVICE".into());
        let alice: OwnedUserId = "@alice:hs".try_into().unwrap();
        let to_alice = &messages[&alice];
        let content: Value = to_alice[&DeviceIdOrAllDevices::DeviceId("ALICEDEV".into())]
            .deserialize_as_unchecked()
            .unwrap();
        assert_eq!(
            content,
            json!({
                "action": "request",
                "body": {"algorithm": MEGOLM_V1, "room_id": "!room:hs",
                         "sender_key": "creatorcurve", "session_id": "s1"},
                "requesting_device_id": "BOTDEVICE",
                "request_id": request.request_id.as_str(),
            })
        );

        // Without a device id in the event: every device of the sender.
        let mut event = parked("$b", "s2", 0);
        event.event["content"]
            .as_object_mut()
            .unwrap()
            .retain(|k, _| k != "device_id" && k != "sender_key");
        let request = requests.plan(&[event], KEY_REQUEST_AFTER_MS).remove(0);
        let messages = request.messages("BOTDEVICE".into());
        let content: Value = messages[&alice][&DeviceIdOrAllDevices::AllDevices]
            .deserialize_as_unchecked()
            .unwrap();
        assert!(content["body"].get("sender_key").is_none(), "{content}");
    }

    fn claim() -> ForwardClaim {
        ForwardClaim::from_content(&json!({
            "algorithm": MEGOLM_V1, "room_id": "!room:hs", "session_id": "s1",
            "sender_key": "creator", "sender_claimed_ed25519_key": "ed",
            "forwarding_curve25519_key_chain": [], "session_key": "secret",
        }))
        .unwrap()
    }

    #[test]
    fn only_an_asked_for_key_from_its_creator_first_hand_is_taken() {
        assert_eq!(check_claim(&claim(), "creator", true), Ok(()));
        assert_eq!(
            check_claim(&claim(), "creator", false),
            Err(Refusal::NotRequested)
        );
        assert_eq!(
            check_claim(&claim(), "someone-else", true),
            Err(Refusal::NotTheCreator)
        );
        let mut chained = claim();
        chained.chain_len = 1;
        assert_eq!(
            check_claim(&chained, "creator", true),
            Err(Refusal::ForwardedFurther)
        );
        assert!(
            ForwardClaim::from_content(&json!({"algorithm": "m.megolm.v2.aes-sha2"})).is_none()
        );
    }

    #[test]
    fn a_recovered_session_is_not_marked_imported_and_keeps_its_creator() {
        let outbound =
            matrix_sdk_crypto::vodozemac::megolm::GroupSession::new(SessionConfig::version_1());
        let mut inbound = MegolmInbound::new(&outbound.session_key(), SessionConfig::version_1());
        let exported = inbound.export_at(0).unwrap();
        let megolm = MegolmInbound::import(&exported, SessionConfig::version_1());
        let creator = Curve25519PublicKey::from_bytes([7; 32]);
        let signing = matrix_sdk_crypto::vodozemac::Ed25519SecretKey::new().public_key();
        let session = creator_session(
            megolm,
            creator,
            signing,
            &OwnedRoomId::try_from("!room:hs").unwrap(),
        )
        .unwrap();
        assert!(!session.has_been_imported());
        assert_eq!(session.sender_key(), creator);
        assert_eq!(session.session_id(), outbound.session_id());
        assert_eq!(session.first_known_index(), 0);
    }

    #[test]
    fn debug_of_a_peeked_key_hides_it() {
        let peek = PeekedKey {
            sender: "@alice:hs".try_into().unwrap(),
            olm_sender_key: Curve25519PublicKey::from_bytes([1; 32]),
            content: json!({"session_key": "very-secret"}),
        };
        assert!(!format!("{peek:?}").contains("very-secret"));
    }
}
