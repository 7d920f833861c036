//! Sending as the bot: the one place that turns a reply into an (encrypted) room event, a
//! redaction or a membership lookup, so the flow's steps never build homeserver requests.

use super::txn;
use crate::crypto::{BotCrypto, CryptoError};
use crate::homeserver::{HomeserverClient, HomeserverError, Identity};
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

/// Sends as the bot: encrypted where the room is, with the caller's transaction ids.
#[derive(Clone, Debug)]
pub struct Messenger {
    pub(super) crypto: BotCrypto,
    pub(super) client: HomeserverClient,
}

impl Messenger {
    /// A messenger over the bot's crypto and homeserver client.
    pub fn new(crypto: BotCrypto, client: HomeserverClient) -> Self {
        Self { crypto, client }
    }

    /// Sends an event; the same `txn_id` sends once.
    pub async fn send(
        &self,
        room_id: &RoomId,
        event_type: &str,
        content: Value,
        txn_id: OwnedTransactionId,
    ) -> Result<OwnedEventId, CryptoError> {
        self.crypto
            .send_event(room_id, event_type, content, Some(txn_id))
            .await
    }

    /// Sends an `m.notice`, optionally as a reply.
    pub async fn notice(
        &self,
        room_id: &RoomId,
        body: &str,
        reply_to: Option<&EventId>,
        txn_id: OwnedTransactionId,
    ) -> Result<OwnedEventId, CryptoError> {
        let mut content = json!({"msgtype": "m.notice", "body": body});
        if let Some(event_id) = reply_to {
            content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": event_id}});
        }
        self.send(room_id, "m.room.message", content, txn_id).await
    }

    /// Redacts an event; `Ok(false)` when the bot lacks the power to.
    pub async fn redact(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<bool, HomeserverError> {
        let txn_id = txn("redact", event_id.as_str());
        match self
            .client
            .redact(room_id, event_id, &txn_id, Some("PIN removed by mxpay"))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(403) || e.errcode() == Some("M_FORBIDDEN") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The sender of an event in a room the bot is in; `None` when the homeserver does not
    /// show it (unknown, or not visible to the bot).
    pub async fn event_sender(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Option<OwnedUserId>, HomeserverError> {
        use ruma::api::client::room::get_room_event;
        let request = get_room_event::v3::Request::new(room_id.to_owned(), event_id.to_owned());
        match self.client.send(request, Identity::Appservice).await {
            Ok(response) => Ok(response
                .event
                .get_field::<OwnedUserId>("sender")
                .ok()
                .flatten()),
            Err(e) if matches!(e.status(), Some(403 | 404)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Members of a room with their membership (`join`, `invite`, ...).
    pub async fn memberships(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<(String, String)>, HomeserverError> {
        // Asked once per room, then kept fresh by the transaction stream.
        self.client.memberships(room_id).await
    }

    /// The room's join rule (`invite`, `public`, `knock`, ...), if it has one.
    pub async fn join_rule(&self, room_id: &RoomId) -> Result<Option<String>, HomeserverError> {
        // Asked once per room, then kept fresh by the transaction stream.
        self.client.join_rule(room_id).await
    }

    /// Creates an encrypted private chat with `user` (the bot and the user get full power, so
    /// the bot can redact PINs there) and invites them.
    pub async fn create_dm(&self, user: &UserId) -> Result<OwnedRoomId, HomeserverError> {
        use ruma::api::client::room::{create_room, Visibility};
        use ruma::events::room::encryption::RoomEncryptionEventContent;
        use ruma::events::InitialStateEvent;
        let mut request = create_room::v3::Request::new();
        request.preset = Some(create_room::v3::RoomPreset::TrustedPrivateChat);
        request.invite = vec![user.to_owned()];
        request.is_direct = true;
        request.visibility = Visibility::Private;
        request.name = Some("mxpay".to_owned());
        request.topic =
            Some("Your private chat with the mxpay bot: PINs, balances, receipts".into());
        request.initial_state = vec![InitialStateEvent::with_empty_state_key(
            RoomEncryptionEventContent::with_recommended_defaults(),
        )
        .to_raw_any()];
        Ok(self
            .client
            .send(request, Identity::Appservice)
            .await?
            .room_id)
    }
}
