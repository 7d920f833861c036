//! The user's private DM: finding, checking and creating it. PINs, balances and challenges go
//! only to a room with exactly the user and the bot, encrypted and invite-only, so this step
//! decides which room that is and tells the user where the answer went.

use super::core::challenge;
pub(super) use super::core::challenge::Dm;
use super::{Payments, PaymentsError};
use crate::crypto::DecryptedEvent;
use crate::store::StoreError;
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value;

impl Payments {
    /// Whether `room_id` is a private DM of `user`: exactly the user and the bot, both joined,
    /// nobody else invited, encrypted, and joinable by invite only (a public or knockable room
    /// can gain members between two checks).
    pub(super) async fn is_private_dm(
        &self,
        room_id: &RoomId,
        user: &UserId,
    ) -> Result<bool, PaymentsError> {
        // Asked of the homeserver one at a time, each only when the ones before allow it.
        let join_rule = self.messenger.join_rule(room_id).await?;
        if join_rule.as_deref() != Some("invite") {
            return Ok(false);
        }
        let members = self.messenger.memberships(room_id).await?;
        if !challenge::is_private_dm(join_rule.as_deref(), &members, true, user, &self.bot) {
            return Ok(false);
        }
        let encrypted = self.messenger.crypto.room_is_encrypted(room_id).await?;
        Ok(challenge::is_private_dm(
            join_rule.as_deref(),
            &members,
            encrypted,
            user,
            &self.bot,
        ))
    }

    /// Finds the user's DM (the recorded one if still private; else `current` if it is a
    /// private DM), or creates one and invites the user.
    pub(super) async fn ensure_dm(
        &self,
        user: &UserId,
        current: &RoomId,
    ) -> Result<Dm, PaymentsError> {
        let mut profile = self.store.profile(user.as_str())?;
        if let Some(room) = profile.dm_room.clone() {
            let room_id =
                OwnedRoomId::try_from(room.as_str()).map_err(|_| StoreError::Corrupt {
                    tree: "userid_profile",
                    reason: "dm_room is not a room id",
                })?;
            if self.is_private_dm(&room_id, user).await? {
                if !profile.dm_joined {
                    profile.dm_joined = true;
                    self.store.put_profile(user.as_str(), &profile).await?;
                }
                return Ok(Dm::Ready(room_id));
            }
            if !profile.dm_joined {
                let members = self.messenger.memberships(&room_id).await?;
                let invited = members
                    .iter()
                    .any(|(u, m)| u == user.as_str() && m == "invite");
                let alone = members
                    .iter()
                    .filter(|(_, m)| m == "join" || m == "invite")
                    .all(|(u, _)| u == user.as_str() || u == self.bot.as_str());
                if invited && alone {
                    return Ok(Dm::Invited(room_id));
                }
            }
        }
        if self.is_private_dm(current, user).await? {
            profile.dm_room = Some(current.to_owned());
            profile.dm_joined = true;
            self.store.put_profile(user.as_str(), &profile).await?;
            return Ok(Dm::Ready(current.to_owned()));
        }
        let room_id = self.messenger.create_dm(user).await?;
        tracing::info!(%user, %room_id, "created a private chat");
        profile.dm_room = Some(room_id.clone());
        profile.dm_joined = false;
        self.store.put_profile(user.as_str(), &profile).await?;
        Ok(Dm::Invited(room_id))
    }

    /// The user's DM if it is ready (recorded and joined), without creating one.
    pub(super) fn ready_dm(&self, user: &str) -> Result<Option<OwnedRoomId>, PaymentsError> {
        let profile = self.store.profile(user)?;
        Ok(profile
            .dm_room
            .filter(|_| profile.dm_joined)
            .and_then(|r| OwnedRoomId::try_from(r.as_str()).ok()))
    }

    /// The user wrote (anything, anywhere the bot reads): when notices wait for their DM and
    /// it is ready, or `event`'s room is a private DM of theirs the bot did not know (they
    /// opened it but never wrote there before), the DM is recorded and the notices go out.
    /// The room checks run only while notices wait, so ordinary chat costs a store lookup.
    pub(super) async fn on_activity(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let user = &event.sender;
        // An invite comes from a room the bot is not in yet: nothing there can be checked.
        let membership = event.content.get("membership").and_then(Value::as_str);
        if event.event_type == "m.room.member" && membership != Some("join") {
            return Ok(());
        }
        if !self.store.has_waiting_notices(user)? {
            return Ok(());
        }
        let dm = match self.ready_dm(user.as_str())? {
            Some(dm) => dm,
            None => {
                if !self.is_private_dm(&event.room_id, user).await? {
                    return Ok(());
                }
                let mut profile = self.store.profile(user.as_str())?;
                profile.dm_room = Some(event.room_id.clone());
                profile.dm_joined = true;
                self.store.put_profile(user.as_str(), &profile).await?;
                tracing::info!(%user, room = %event.room_id, "recognised the private chat");
                event.room_id.clone()
            }
        };
        self.send_waiting_notices(user, &dm).await
    }

    /// Tells the user in `room` where the answer went, when it is not the DM.
    pub(super) async fn point_to_dm(
        &self,
        event: &DecryptedEvent,
        dm: &Dm,
        purpose: &'static str,
    ) -> Result<(), PaymentsError> {
        let pointer = challenge::pointer(&Self::event_ref(event), dm, purpose);
        self.apply(super::core::Decision {
            sends: pointer.into_iter().collect(),
            ..super::core::Decision::none()
        })
        .await
    }

    /// A user joined a room: if it is the DM the bot invited them to, say what was waiting.
    pub(super) async fn on_member(&self, event: &DecryptedEvent) -> Result<(), PaymentsError> {
        let joined = event.content.get("membership").and_then(Value::as_str) == Some("join");
        let Some(state_key) = event.state_key.as_deref() else {
            return Ok(());
        };
        if !joined || state_key != event.sender.as_str() {
            return Ok(());
        }
        let user = event.sender.as_str();
        let mut profile = self.store.profile(user)?;
        if profile.dm_room.as_ref() != Some(&event.room_id) || profile.dm_joined {
            return Ok(());
        }
        profile.dm_joined = true;
        self.store.put_profile(user, &profile).await?;
        let now_ms = self.clock.now_ms();
        let decision = challenge::dm_joined(
            &Self::event_ref(event),
            self.store.dialog(user, now_ms)?.as_ref(),
            &self.store.challenges(user)?,
            &self.bot,
            now_ms,
        );
        self.apply(decision).await
    }
}
