//! The pipeline with end-to-end encryption: decrypt first, then act.
//!
//! [`EncryptedPipeline`] wraps the spine's [`PlainPipeline`]: every transaction goes through
//! [`BotCrypto::ingest`] (to-device and device-list data before room events), then each
//! plaintext or decrypted event is acted on. `!help` is answered through [`BotCrypto`], so the
//! answer is encrypted exactly when the room is; everything else a plaintext event asks for
//! (joining on invite) is the basic handler's job.

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{BotCrypto, CryptoError, DecryptedEvent};
use crate::pipeline::{
    basic_commands, help_text, reply_txn_id, CommandHelp, InboxTransaction, Ingested, Job, JobTail,
    Pipeline, PipelineError, PlainPipeline,
};

/// Environment variable holding the crypto store key as 64 hex characters; without it the key
/// is read from (or created in) `<data_dir>/crypto-store.key`.
pub const STORE_KEY_ENV: &str = "MXPAY_CRYPTO_STORE_KEY";
/// How long the start-up self-check waits for the homeserver to deliver to-device events.
pub const DELIVERY_CHECK_TIMEOUT_MS: u64 = 60_000;
/// How often parked events are looked at (tell senders, drop old ones).
pub const SWEEP_INTERVAL_MS: u64 = 5_000;

/// Decrypts each transaction, then handles its events.
pub struct EncryptedPipeline {
    crypto: BotCrypto,
    basic: PlainPipeline,
    commands: Vec<CommandHelp>,
}

impl std::fmt::Debug for EncryptedPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedPipeline")
            .field("crypto", &self.crypto)
            .finish_non_exhaustive()
    }
}

impl EncryptedPipeline {
    /// A pipeline over `crypto`, delegating plaintext housekeeping to `basic`.
    pub fn new(crypto: BotCrypto, basic: PlainPipeline) -> Self {
        Self {
            crypto,
            basic,
            commands: basic_commands(),
        }
    }

    /// Replaces the commands `!help` lists (later layers append theirs).
    pub fn with_commands(mut self, commands: Vec<CommandHelp>) -> Self {
        self.basic = self.basic.with_commands(commands.clone());
        self.commands = commands;
        self
    }

    /// The bot's crypto.
    pub fn crypto(&self) -> &BotCrypto {
        &self.crypto
    }

    /// Ends the handling of `event` with `result`: a late-decrypted (parked) event is removed
    /// from the parked store once handled or failed for good, and kept (to be handed up again)
    /// when the failure may pass. Returns `result`.
    pub fn done_with(
        &self,
        event: &DecryptedEvent,
        result: Result<(), PipelineError>,
    ) -> Result<(), PipelineError> {
        let finished = match &result {
            Ok(()) => true,
            Err(e) => !e.is_transient(),
        };
        if event.was_parked && finished {
            self.crypto
                .forget_parked(&event.event_id)
                .map_err(PipelineError::transient)?;
        }
        result
    }

    /// Acts on one decrypted or plaintext event (`!help`; joins via the basic handler). The
    /// payment layer calls it for the events that are not payment matters.
    pub async fn handle_event(&self, event: &DecryptedEvent) -> Result<(), PipelineError> {
        if is_help(event) || self.is_help_invocation(event) {
            let body = help_text(&self.commands);
            let content = json!({
                "msgtype": "m.notice",
                "body": body,
                "m.relates_to": {"m.in_reply_to": {"event_id": event.event_id}},
            });
            let txn_id = reply_txn_id("help", event.event_id.as_str());
            return match self
                .crypto
                .send_event(&event.room_id, "m.room.message", content, Some(txn_id))
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => classify(e, "answering !help"),
            };
        }
        if !event.was_encrypted {
            let raw = json!({
                "type": event.event_type,
                "room_id": event.room_id,
                "event_id": event.event_id,
                "sender": event.sender,
                "state_key": event.state_key,
                "content": event.content,
            });
            return self.basic.handle_event(&raw).await;
        }
        Ok(())
    }
}

impl EncryptedPipeline {
    /// A client's MSC4391 `help` invocation mentioning the bot.
    fn is_help_invocation(&self, event: &DecryptedEvent) -> bool {
        event.event_type == "m.room.message"
            && crate::events::bot_command::invocation_text(&event.content, self.crypto.user_id())
                .as_deref()
                == Some("!help")
    }
}

fn is_help(event: &DecryptedEvent) -> bool {
    event.event_type == "m.room.message"
        && event.content.get("msgtype").and_then(Value::as_str) == Some("m.text")
        && event
            .content
            .get("body")
            .and_then(Value::as_str)
            .is_some_and(|b| b.trim() == "!help")
}

/// Store failures and homeserver outages are retried (the worker bounds it); anything else is
/// logged and the event skipped, so one bad room cannot block the queue.
fn classify(error: CryptoError, what: &str) -> Result<(), PipelineError> {
    match error {
        e @ CryptoError::Store(_) | e @ CryptoError::Parked(_) => Err(PipelineError::transient(e)),
        e if e.is_transient() => Err(PipelineError::transient(e)),
        e => {
            tracing::warn!(error = %e, "{what} failed");
            Ok(())
        }
    }
}

impl EncryptedPipeline {
    /// The serial part of a transaction: the crypto machine takes its to-device messages, key
    /// counts and device lists first, then decrypts its room events (and parked ones whose key
    /// came); each event becomes a job in its room's lane.
    pub async fn ingest_jobs(&self, txn: &InboxTransaction) -> Result<Vec<Job>, PipelineError> {
        let ingested = match self.crypto.ingest(&txn.body).await {
            Ok(ingested) => ingested,
            Err(e) => {
                tracing::error!(txn_id = %txn.txn_id, error = %e, "cannot process the transaction's encryption data");
                return Err(PipelineError::transient(e));
            }
        };
        Ok(ingested.events.into_iter().map(event_job).collect())
    }
}

/// A job for one decrypted (or plaintext) event: in its room's lane, one at a time per sender.
pub fn event_job(event: DecryptedEvent) -> Job {
    Job {
        lane: event.room_id.to_string(),
        sender: Some(event.sender.to_string()),
        payload: Box::new(event),
    }
}

/// The event a job of [`event_job`] carries.
pub fn job_event(job: &Job) -> Result<&DecryptedEvent, PipelineError> {
    job.payload::<DecryptedEvent>()
        .ok_or_else(|| PipelineError::permanent("a job without its event"))
}

#[async_trait]
impl Pipeline for EncryptedPipeline {
    async fn handle(&self, txn: &InboxTransaction) -> Result<(), PipelineError> {
        for job in self.ingest_jobs(txn).await? {
            if let Some(tail) = self.run_job(&job).await? {
                tail.await?;
            }
        }
        Ok(())
    }

    async fn ingest(&self, txn: &InboxTransaction) -> Result<Ingested, PipelineError> {
        Ok(Ingested::Jobs(self.ingest_jobs(txn).await?))
    }

    async fn run_job(&self, job: &Job) -> Result<Option<JobTail>, PipelineError> {
        let event = job_event(job)?;
        let result = self.handle_event(event).await;
        self.done_with(event, result).map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::TrustState;

    fn event(kind: &str, content: Value) -> DecryptedEvent {
        DecryptedEvent {
            room_id: "!r:hs".try_into().unwrap(),
            event_id: "$e".try_into().unwrap(),
            sender: "@a:hs".try_into().unwrap(),
            sender_device: None,
            event_type: kind.to_owned(),
            state_key: None,
            content,
            origin_server_ts_ms: 0,
            sent_before_ms: None,
            verification_state: TrustState::NotEncrypted,
            was_encrypted: false,
            was_parked: false,
        }
    }

    #[test]
    fn help_is_recognised_only_as_text_message() {
        assert!(is_help(&event(
            "m.room.message",
            json!({"msgtype": "m.text", "body": " !help "})
        )));
        assert!(!is_help(&event(
            "m.room.message",
            json!({"msgtype": "m.notice", "body": "!help"})
        )));
        assert!(!is_help(&event("org.mxpay.test", json!({"body": "!help"}))));
    }

    #[test]
    fn classify_retries_store_failures_and_skips_refusals() {
        use crate::homeserver::HomeserverError;
        let refused = CryptoError::Transport(HomeserverError::Matrix {
            status: 403,
            errcode: "M_FORBIDDEN".into(),
            message: "no".into(),
            retry_after_ms: None,
        });
        assert!(classify(refused, "t").is_ok());
        let down = CryptoError::Transport(HomeserverError::GaveUp {
            attempts: 3,
            elapsed_ms: 1_000,
            last: Box::new(HomeserverError::NotMatrix {
                url: "http://127.0.0.1:1".into(),
                status: 503,
            }),
        });
        assert!(classify(down, "t").unwrap_err().is_transient());
    }
}
