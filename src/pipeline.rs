//! What happens to a stored transaction: the [`Pipeline`] trait the inbox worker
//! calls, and the plain pipeline (join on invite, `!help` in plaintext rooms).
//!
//! The crypto layer wraps or replaces [`PlainPipeline`] to decrypt first.

use async_trait::async_trait;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::{OwnedRoomId, OwnedTransactionId, RoomId};
use serde_json::Value;

use crate::homeserver::{HomeserverClient, HomeserverError};
pub use crate::inbox::InboxTransaction;

/// A boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why handling a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Trying again later may work (homeserver unreachable, rate-limited, store busy): the
    /// worker retries with bounded backoff.
    #[error("transient: {0}")]
    Transient(#[source] BoxError),
    /// Trying again cannot work: the worker logs and counts it and moves on.
    #[error("permanent: {0}")]
    Permanent(#[source] BoxError),
}

impl PipelineError {
    /// A transient error from any error value.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self::Transient(error.into())
    }

    /// A permanent error from any error value.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::Permanent(error.into())
    }

    /// Whether the worker should retry.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

impl From<HomeserverError> for PipelineError {
    fn from(error: HomeserverError) -> Self {
        if error.is_transient() {
            Self::transient(error)
        } else {
            Self::permanent(error)
        }
    }
}

/// Processes stored transactions for the inbox worker. Everything may be called again for the
/// same transaction after a transient error or a crash, so effects must be idempotent (send
/// events with transaction ids derived from the input).
///
/// A pipeline either handles a transaction whole ([`Pipeline::handle`], one transaction at a
/// time in arrival order), or splits it ([`Pipeline::ingest`] returns [`Ingested::Jobs`]): the
/// worker then ingests transactions one at a time in arrival order (what must follow the
/// stream's order: the crypto machine's to-device messages and key counts before decryption)
/// and runs the jobs beside each other, one at a time per [`Job::lane`] (a room) and per
/// [`Job::sender`], in arrival order within each.
#[async_trait]
pub trait Pipeline: Send + Sync + 'static {
    /// Handles `txn` whole; `Ok` marks it processed for good.
    async fn handle(&self, txn: &InboxTransaction) -> Result<(), PipelineError>;

    /// The serial part of `txn`, and what is left to do as jobs. By default nothing: the
    /// transaction is handled whole.
    async fn ingest(&self, _txn: &InboxTransaction) -> Result<Ingested, PipelineError> {
        Ok(Ingested::Whole)
    }

    /// Runs one job that [`Pipeline::ingest`] returned: `Ok(Some(tail))` when it decided and
    /// left its messages on their way (see [`JobTail`]).
    async fn run_job(&self, _job: &Job) -> Result<Option<JobTail>, PipelineError> {
        Err(PipelineError::permanent("this pipeline makes no jobs"))
    }
}

/// What is left of a job once it decided: its messages on their way through the send queue,
/// then the event marked handled. The lane runs its next job at once; the job counts as done
/// (and its transaction leaves the inbox) only when the tail finished, so a crash before
/// leaves the transaction to be handled again. An `Err` is a failure for good (the
/// transaction goes to the failed list).
pub type JobTail = futures_util::future::BoxFuture<'static, Result<(), PipelineError>>;

/// What [`Pipeline::ingest`] left to do.
pub enum Ingested {
    /// Handle the transaction whole with [`Pipeline::handle`].
    Whole,
    /// Run these jobs (none: the transaction is done).
    Jobs(Vec<Job>),
}

/// One event's work, run beside other rooms' work.
pub struct Job {
    /// Jobs of one lane (a room) run one at a time, in arrival order.
    pub lane: String,
    /// Jobs of one sender never run at the same time (a PIN dialog is one conversation, across
    /// rooms).
    pub sender: Option<String>,
    /// What the pipeline needs to run it (its own type; see [`Job::payload`]).
    pub payload: Box<dyn std::any::Any + Send + Sync>,
}

impl Job {
    /// The payload as the type the pipeline put in.
    pub fn payload<T: 'static>(&self) -> Option<&T> {
        self.payload.downcast_ref()
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("lane", &self.lane)
            .field("sender", &self.sender)
            .finish_non_exhaustive()
    }
}

/// One line of the `!help` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHelp {
    /// The command as typed, with its arguments, e.g. `!pay <user> <amount> <currency>`.
    pub usage: String,
    /// What it does, one sentence.
    pub summary: String,
}

impl CommandHelp {
    /// A help line.
    pub fn new(usage: impl Into<String>, summary: impl Into<String>) -> Self {
        Self {
            usage: usage.into(),
            summary: summary.into(),
        }
    }
}

/// The commands the plain pipeline knows; later layers append theirs.
pub fn basic_commands() -> Vec<CommandHelp> {
    vec![CommandHelp::new("!help", "show this list of commands")]
}

/// The `!help` text for `commands`.
pub fn help_text(commands: &[CommandHelp]) -> String {
    let mut text = String::from("mxpay commands:");
    for command in commands {
        text.push_str(&format!("\n{} — {}", command.usage, command.summary));
    }
    text
}

/// The event fields the plain pipeline looks at, read from the raw JSON.
#[derive(Debug)]
struct EventView<'a> {
    event_type: &'a str,
    event_id: Option<&'a str>,
    room_id: Option<&'a str>,
    sender: Option<&'a str>,
    state_key: Option<&'a str>,
    content: &'a Value,
}

impl<'a> EventView<'a> {
    fn of(event: &'a Value) -> Option<Self> {
        Some(Self {
            event_type: event.get("type")?.as_str()?,
            event_id: event.get("event_id").and_then(Value::as_str),
            room_id: event.get("room_id").and_then(Value::as_str),
            sender: event.get("sender").and_then(Value::as_str),
            state_key: event.get("state_key").and_then(Value::as_str),
            content: event.get("content").unwrap_or(&Value::Null),
        })
    }
}

/// The `events` array of a transaction body (empty when absent).
pub fn transaction_events(body: &Value) -> &[Value] {
    body.get("events")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Joins rooms the bot is invited to and answers `!help` in plaintext rooms.
#[derive(Debug, Clone)]
pub struct PlainPipeline {
    client: HomeserverClient,
    commands: Vec<CommandHelp>,
}

impl PlainPipeline {
    /// A handler acting through `client`, listing [`basic_commands`] in `!help`.
    pub fn new(client: HomeserverClient) -> Self {
        Self {
            client,
            commands: basic_commands(),
        }
    }

    /// Replaces the commands listed by `!help`.
    pub fn with_commands(mut self, commands: Vec<CommandHelp>) -> Self {
        self.commands = commands;
        self
    }

    /// The homeserver client.
    pub fn client(&self) -> &HomeserverClient {
        &self.client
    }

    /// Handles one event (plaintext JSON, as in a transaction's `events`). Failures the bot
    /// cannot fix by retrying (invite withdrawn, no permission to post) are logged and
    /// swallowed; transient ones are returned so the transaction is retried.
    pub async fn handle_event(&self, event: &Value) -> Result<(), PipelineError> {
        let Some(view) = EventView::of(event) else {
            return Ok(());
        };
        let bot = self.client.bot_user_id().as_str();
        if view.sender == Some(bot) {
            return Ok(());
        }
        let Some(room_id) = view.room_id.and_then(|r| OwnedRoomId::try_from(r).ok()) else {
            return Ok(());
        };
        let result = match view.event_type {
            "m.room.member"
                if view.state_key == Some(bot)
                    && view.content.get("membership").and_then(Value::as_str) == Some("invite") =>
            {
                tracing::info!(%room_id, sender = view.sender, "invited; joining");
                match self.client.join_room(&room_id).await {
                    Ok(_) => {
                        self.publish_commands(&room_id).await;
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }
            "m.room.message" if is_help(view.content) => {
                let txn_id = reply_txn_id("help", view.event_id.unwrap_or_default());
                let content = RoomMessageEventContent::notice_plain(help_text(&self.commands));
                self.client
                    .send_message(&room_id, &txn_id, &content)
                    .await
                    .map(drop)
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => Ok(()),
            Err(error) if error.is_transient() => Err(PipelineError::transient(error)),
            Err(error) => {
                tracing::warn!(%room_id, event_type = view.event_type, %error, "cannot act on event");
                Ok(())
            }
        }
    }
}

impl PlainPipeline {
    /// Describes the bot's commands in `room_id` (MSC4391 state events) where it may send state;
    /// a room that does not let it (the first description refused) is left alone. Never fails:
    /// the text commands work without the descriptions.
    async fn publish_commands(&self, room_id: &RoomId) {
        use crate::events::bot_command::{descriptions, COMMAND_DESCRIPTION_EVENT_TYPE};
        let names: Vec<&str> = self
            .commands
            .iter()
            .filter_map(|c| c.usage.split_whitespace().next())
            .map(|word| word.trim_start_matches('!'))
            .collect();
        for (state_key, content) in descriptions(self.client.bot_user_id(), &names) {
            if let Err(error) = self
                .client
                .send_state(
                    room_id,
                    COMMAND_DESCRIPTION_EVENT_TYPE,
                    &state_key,
                    &content,
                )
                .await
            {
                tracing::debug!(%room_id, %error, "command descriptions not published here");
                return;
            }
        }
        tracing::debug!(%room_id, "command descriptions published");
    }
}

fn is_help(content: &Value) -> bool {
    content.get("msgtype").and_then(Value::as_str) == Some("m.text")
        && content
            .get("body")
            .and_then(Value::as_str)
            .is_some_and(|body| body.trim() == "!help")
}

/// A transaction id for a reply, derived from what it answers, so a retried or replayed
/// transaction sends the reply once (the homeserver deduplicates by transaction id).
pub fn reply_txn_id(purpose: &str, answered_event_id: &str) -> OwnedTransactionId {
    let hash = blake3::hash(answered_event_id.as_bytes());
    format!("mxpay-{purpose}-{}", &hash.to_hex()[..32]).into()
}

#[async_trait]
impl Pipeline for PlainPipeline {
    async fn handle(&self, txn: &InboxTransaction) -> Result<(), PipelineError> {
        for event in transaction_events(&txn.body) {
            self.handle_event(event).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::homeserver::{HomeserverClientConfig, RetryPolicy};
    use crate::secret::Secret;
    use serde_json::json;
    use wiremock::matchers::{body_partial_json, method, path, path_regex};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    fn handler(server: &MockServer) -> PlainPipeline {
        let client = HomeserverClient::new(HomeserverClientConfig {
            base_url: server.uri(),
            as_token: Secret::new("as-token-0123456789abcdef"),
            appservice_id: "mxpay".into(),
            bot_user_id: ruma::owned_user_id!("@_mxpay:localhost"),
            retry: RetryPolicy {
                attempts_max: 2,
                backoff_base_ms: 1,
                ..RetryPolicy::default()
            },
        })
        .unwrap();
        PlainPipeline::new(client).with_commands(vec![
            CommandHelp::new("!help", "show this list of commands"),
            CommandHelp::new("!pay <user> <amount>", "pay someone"),
        ])
    }

    fn txn(events: Value) -> InboxTransaction {
        InboxTransaction {
            txn_id: "1".into(),
            seq: 1,
            body: json!({ "events": events }),
        }
    }

    #[tokio::test]
    async fn joins_on_invite_for_the_bot_only() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/_matrix/client/v3/rooms/!r:localhost/join"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"room_id": "!r:localhost"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let invite = |state_key: &str| {
            json!({"type": "m.room.member", "room_id": "!r:localhost", "sender": "@a:localhost",
                   "state_key": state_key, "event_id": "$1", "content": {"membership": "invite"}})
        };
        handler(&server)
            .handle(&txn(json!([
                invite("@other:localhost"),
                invite("@_mxpay:localhost")
            ])))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn help_gets_a_notice_listing_commands() {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .and(path_regex(
                r"^/_matrix/client/v3/rooms/!r:localhost/send/m\.room\.message/mxpay-help-[0-9a-f]{32}$",
            ))
            .and(body_partial_json(json!({"msgtype": "m.notice"})))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"event_id": "$n"})))
            .expect(1)
            .mount(&server)
            .await;
        let help = json!({"type": "m.room.message", "room_id": "!r:localhost", "sender": "@a:localhost",
                          "event_id": "$h", "content": {"msgtype": "m.text", "body": " !help "}});
        let other = json!({"type": "m.room.message", "room_id": "!r:localhost", "sender": "@a:localhost",
                           "event_id": "$o", "content": {"msgtype": "m.text", "body": "hello"}});
        let own = json!({"type": "m.room.message", "room_id": "!r:localhost", "sender": "@_mxpay:localhost",
                         "event_id": "$b", "content": {"msgtype": "m.text", "body": "!help"}});
        handler(&server)
            .handle(&txn(json!([other, help, own])))
            .await
            .unwrap();
        let requests = server.received_requests().await.unwrap();
        let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
        let text = body["body"].as_str().unwrap();
        assert!(
            text.contains("!help") && text.contains("!pay <user> <amount>"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn transient_failure_is_returned_permanent_is_swallowed() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/_matrix/client/v3/rooms/!busy:localhost/join"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/_matrix/client/v3/rooms/!gone:localhost/join"))
            .respond_with(
                ResponseTemplate::new(403)
                    .set_body_json(json!({"errcode": "M_FORBIDDEN", "error": "no"})),
            )
            .mount(&server)
            .await;
        let invite = |room: &str| {
            json!({"type": "m.room.member", "room_id": room, "sender": "@a:localhost",
                   "state_key": "@_mxpay:localhost", "content": {"membership": "invite"}})
        };
        let h = handler(&server);
        h.handle(&txn(json!([invite("!gone:localhost")])))
            .await
            .unwrap();
        let error = h
            .handle(&txn(json!([invite("!busy:localhost")])))
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error}");
    }

    #[test]
    fn reply_txn_id_is_stable_per_event() {
        assert_eq!(reply_txn_id("help", "$a"), reply_txn_id("help", "$a"));
        assert_ne!(reply_txn_id("help", "$a"), reply_txn_id("help", "$b"));
    }
}
