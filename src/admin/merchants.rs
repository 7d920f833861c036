//! Merchant administration: register, list, show, disable and enable merchants; mint and
//! revoke their API keys (scope `merchants`). The operations here have no HTTP in them; the
//! routes at the end of the file authenticate and audit around them as every admin route does.
//!
//! Merchant API keys are signed with the admin token key under their own audience
//! ([`crate::merchants::MERCHANT_AUDIENCE`]), so neither kind of token is accepted as the other.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

use super::api::{call, parse_json, parse_query, read_body, IdCall};
use super::token::{AdminKey, Scope};
use super::views::AccountJson;
use super::{AdminError, AdminState};
use crate::clock::SharedClock;
use crate::flood::Peer;
use crate::merchants::key::KEY_TTL_MAX_S;
use crate::merchants::store::{KeyRecord, LIST_PAGE_MAX};
use crate::merchants::{
    new_merchant, KeyAuthority, KeyScope, MerchantError, MerchantId, MerchantView, NewMerchant,
};

/// Default lifetime of a merchant key, in seconds (one year).
pub const KEY_TTL_DEFAULT_S: u64 = 365 * 24 * 3600;

/// The merchant key authority for the admin token key: the same key material, its own
/// audience.
pub fn merchant_key_authority(
    key: &AdminKey,
    clock: SharedClock,
) -> Result<KeyAuthority, AdminError> {
    let bad = |what: &str| AdminError::InvalidParam(format!("admin.token: {what}"));
    Ok(match key {
        AdminKey::Hs256 { secret } => KeyAuthority::new(
            Algorithm::HS256,
            Some(EncodingKey::from_secret(secret)),
            DecodingKey::from_secret(secret),
            clock,
        ),
        AdminKey::EdDsa {
            public_pem,
            private_pem,
        } => KeyAuthority::new(
            Algorithm::EdDSA,
            private_pem
                .as_ref()
                .map(|pem| EncodingKey::from_ed_pem(pem))
                .transpose()
                .map_err(|_| bad("the private key is not an Ed25519 PEM key"))?,
            DecodingKey::from_ed_pem(public_pem)
                .map_err(|_| bad("the public key is not an Ed25519 PEM key"))?,
            clock,
        ),
    })
}

/// `POST /merchants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMerchantRequest {
    /// The id to use (default: generated).
    #[serde(default)]
    pub merchant_id: Option<String>,
    /// The merchant's Matrix user.
    pub user_id: String,
    /// Its display name.
    pub display_name: String,
    /// Its webhook URL.
    pub webhook_url: String,
    /// Its own limits (default none).
    #[serde(default)]
    pub limits: Option<crate::merchants::LimitsBody>,
}

/// The answer to `POST /merchants`: the merchant and, this once, its webhook secret. Its Debug
/// form hides the secret.
#[derive(Serialize)]
pub struct CreatedMerchant {
    /// The merchant.
    #[serde(flatten)]
    pub merchant: MerchantView,
    /// The webhook signing secret; never shown again.
    pub webhook_secret: String,
}

/// A merchant with its keys and wallet, as `GET /merchants/{id}` answers.
#[derive(Debug, Serialize)]
pub struct MerchantDetail {
    /// The merchant.
    #[serde(flatten)]
    pub merchant: MerchantView,
    /// Its API keys (never the keys themselves).
    pub keys: Vec<KeyRecord>,
    /// Its wallet's accounts.
    pub accounts: Vec<AccountJson>,
}

/// `POST /merchants/{id}/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// What the key allows (`invoices`, `refunds`, `read`).
    pub scopes: Vec<KeyScope>,
    /// Lifetime in seconds (default one year, at most two).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// A freshly minted merchant key: shown once. Its Debug form hides the key.
#[derive(Serialize)]
pub struct CreatedKey {
    /// The key (a JWT); never shown again.
    pub key: String,
    /// What is stored of it.
    #[serde(flatten)]
    pub record: KeyRecord,
}

impl std::fmt::Debug for CreatedMerchant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedMerchant")
            .field("merchant", &self.merchant)
            .field("webhook_secret", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &"<redacted>")
            .field("record", &self.record)
            .finish()
    }
}

fn merchant_id(text: &str) -> Result<MerchantId, AdminError> {
    Ok(MerchantId::parse(text)?)
}

impl AdminState {
    /// Registers a merchant.
    pub async fn create_merchant(
        &self,
        request: &CreateMerchantRequest,
    ) -> Result<CreatedMerchant, AdminError> {
        let limits = request
            .limits
            .as_ref()
            .map(|l| l.to_limits(self.ledger.currencies()))
            .transpose()?
            .unwrap_or_default();
        let mut merchant = new_merchant(
            &NewMerchant {
                id: request.merchant_id.as_deref(),
                user_id: &request.user_id,
                display_name: &request.display_name,
                webhook_url: &request.webhook_url,
            },
            self.clock.now_ms(),
        )?;
        merchant.limits = limits;
        let store = self.merchants.clone();
        let stored = merchant.clone();
        blocking(move || store.create(&stored)).await?;
        Ok(CreatedMerchant {
            merchant: MerchantView::from(&merchant),
            webhook_secret: merchant.webhook_secret.expose().to_owned(),
        })
    }

    /// A page of merchants in id order after `after`.
    pub async fn list_merchants(
        &self,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<MerchantView>, AdminError> {
        let after = after.map(merchant_id).transpose()?;
        let store = self.merchants.clone();
        let limit = limit.unwrap_or(100).clamp(1, LIST_PAGE_MAX);
        let merchants = blocking(move || store.list(after.as_ref(), limit)).await?;
        Ok(merchants.iter().map(MerchantView::from).collect())
    }

    /// One merchant, its keys and its wallet.
    pub async fn merchant(&self, id: &str) -> Result<MerchantDetail, AdminError> {
        let id = merchant_id(id)?;
        let store = self.merchants.clone();
        let lookup = id.clone();
        let (merchant, keys) = blocking(move || {
            let merchant = store.get(&lookup)?.ok_or(MerchantError::UnknownMerchant)?;
            Ok((merchant, store.keys_of(&lookup)?))
        })
        .await?;
        let accounts = self.ledger.balances(&id.owner()).await?;
        Ok(MerchantDetail {
            merchant: MerchantView::from(&merchant),
            keys,
            accounts: accounts
                .iter()
                .map(|v| AccountJson::new(self.ledger.currencies(), v))
                .collect(),
        })
    }

    /// Replaces a merchant's own limits.
    pub async fn set_merchant_limits(
        &self,
        id: &str,
        body: &crate::merchants::LimitsBody,
    ) -> Result<MerchantView, AdminError> {
        let id = merchant_id(id)?;
        let limits = body.to_limits(self.ledger.currencies())?;
        let store = self.merchants.clone();
        let merchant = blocking(move || store.set_limits(&id, limits)).await?;
        Ok(MerchantView::from(&merchant))
    }

    /// Turns a merchant off or on.
    pub async fn set_merchant_enabled(
        &self,
        id: &str,
        enabled: bool,
    ) -> Result<MerchantView, AdminError> {
        let id = merchant_id(id)?;
        let store = self.merchants.clone();
        let merchant = blocking(move || store.set_enabled(&id, enabled)).await?;
        Ok(MerchantView::from(&merchant))
    }

    /// Mints an API key for a merchant (recorded before it is handed out).
    pub async fn create_merchant_key(
        &self,
        id: &str,
        request: &CreateKeyRequest,
    ) -> Result<CreatedKey, AdminError> {
        let id = merchant_id(id)?;
        if request.scopes.is_empty() {
            return Err(AdminError::InvalidParam(
                "scopes must name at least one of invoices, refunds, read".to_owned(),
            ));
        }
        let ttl_s = request.ttl_s.unwrap_or(KEY_TTL_DEFAULT_S);
        if ttl_s == 0 || ttl_s > KEY_TTL_MAX_S {
            return Err(AdminError::InvalidParam(format!(
                "ttl_s must be 1 to {KEY_TTL_MAX_S}"
            )));
        }
        let store = self.merchants.clone();
        let lookup = id.clone();
        blocking(move || store.get(&lookup)?.ok_or(MerchantError::UnknownMerchant)).await?;
        let scopes: BTreeSet<KeyScope> = request.scopes.iter().copied().collect();
        let (key, claims) = self
            .merchant_keys
            .mint(&id, scopes, ttl_s)
            .map_err(MerchantError::from)?;
        let store = self.merchants.clone();
        let record = blocking(move || store.record_key(&claims)).await?;
        Ok(CreatedKey { key, record })
    }

    /// Revokes one of a merchant's keys.
    pub async fn revoke_merchant_key(
        &self,
        id: &str,
        key_id: &str,
    ) -> Result<KeyRecord, AdminError> {
        let id = merchant_id(id)?;
        let store = self.merchants.clone();
        let key_id = key_id.to_owned();
        let now_ms = self.clock.now_ms();
        blocking(move || store.revoke_key(&id, &key_id, now_ms)).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MerchantError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AdminError::internal(format!("merchant store task: {e}")))?
        .map_err(AdminError::from)
}

// ---- routes ----

pub(super) async fn post_merchant(
    State(state): State<std::sync::Arc<AdminState>>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let op_state = state.clone();
    let op_headers = headers.clone();
    call(
        &state,
        &peer,
        &headers,
        Scope::Merchants,
        "merchant.create",
        String::new(),
        || async move {
            let body = read_body(&op_headers, body).await?;
            let request: CreateMerchantRequest = parse_json(&body)?;
            op_state.create_merchant(&request).await
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn get_merchants(
    State(state): State<std::sync::Arc<AdminState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let op_state = state.clone();
    call(
        &state,
        &peer,
        &headers,
        Scope::Merchants,
        "merchant.list",
        String::new(),
        || async move {
            let query: ListQuery = parse_query(&uri)?;
            let merchants = op_state
                .list_merchants(query.after.as_deref(), query.limit)
                .await?;
            Ok(serde_json::json!({ "merchants": merchants }))
        },
    )
    .await
}

pub(super) async fn get_merchant(call: IdCall) -> Response {
    call.run(Scope::Merchants, "merchant.show", |state, id| async move {
        state.merchant(&id).await
    })
    .await
}

pub(super) async fn post_disable(call: IdCall) -> Response {
    call.run(
        Scope::Merchants,
        "merchant.disable",
        |state, id| async move { state.set_merchant_enabled(&id, false).await },
    )
    .await
}

pub(super) async fn post_enable(call: IdCall) -> Response {
    call.run(
        Scope::Merchants,
        "merchant.enable",
        |state, id| async move { state.set_merchant_enabled(&id, true).await },
    )
    .await
}

pub(super) async fn post_limits(call: IdCall, body: Body) -> Response {
    let headers = call.headers.clone();
    call.run(
        Scope::Merchants,
        "merchant.limits",
        |state, id| async move {
            let body = read_body(&headers, body).await?;
            let request: crate::merchants::LimitsBody = parse_json(&body)?;
            state.set_merchant_limits(&id, &request).await
        },
    )
    .await
}

pub(super) async fn post_key(call: IdCall, body: Body) -> Response {
    let headers = call.headers.clone();
    call.run(
        Scope::Merchants,
        "merchant.key.create",
        |state, id| async move {
            let body = read_body(&headers, body).await?;
            let request: CreateKeyRequest = parse_json(&body)?;
            state.create_merchant_key(&id, &request).await
        },
    )
    .await
}

pub(super) async fn post_key_revoke(
    State(state): State<std::sync::Arc<AdminState>>,
    Path((id, key_id)): Path<(String, String)>,
    peer: Peer,
    headers: HeaderMap,
) -> Response {
    let op_state = state.clone();
    let target = format!("{id} {key_id}");
    call(
        &state,
        &peer,
        &headers,
        Scope::Merchants,
        "merchant.key.revoke",
        target,
        || async move { op_state.revoke_merchant_key(&id, &key_id).await },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merchants::store::KeyRecord;

    #[test]
    fn answers_that_carry_a_secret_hide_it_in_debug() {
        let key = CreatedKey {
            key: "eyJhbGciOiJIUzI1NiJ9.secret-part".to_owned(),
            record: KeyRecord {
                key_id: "mk_1".to_owned(),
                merchant_id: MerchantId::parse("cafe").unwrap(),
                scopes: vec![KeyScope::Read],
                iat: 1,
                exp: 2,
                revoked_at_ms: None,
            },
        };
        let merchant = CreatedMerchant {
            merchant: MerchantView {
                merchant_id: "cafe".to_owned(),
                user_id: "@cafe:example.org".to_owned(),
                display_name: "Cafe".to_owned(),
                webhook_url: "https://cafe.example/hook".to_owned(),
                enabled: true,
                created_at_ms: 1,
                limits: Default::default(),
            },
            webhook_secret: "whsec_0123456789".to_owned(),
        };
        let debug = format!("{key:?} {key:#?} {merchant:?} {merchant:#?}");
        assert!(!debug.contains("secret-part"), "{debug}");
        assert!(!debug.contains("whsec_0123"), "{debug}");
        assert!(debug.contains("mk_1"));
    }
}
