//! `mxpay admin ...`: the admin API from the command line. Every command except
//! `token create` (which only signs) calls the running mxpay's HTTP API (`/_mxpay/admin/v1/...`), so the CLI and
//! scripts see exactly what the API does; `--json` prints the API's answer unchanged.
//!
//! URL: `--url`, else `http://<appservice.listen>` from the config (`-c`). Token: `--token`,
//! else the environment variable `MXPAY_ADMIN_TOKEN`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::admin::token::{AdminClaims, Scope, TokenAuthority};
use crate::admin::ADMIN_PREFIX;
use crate::clock::SystemClock;
use crate::config::Config;

/// Longest wait for one admin API call.
const REQUEST_TIMEOUT_MS: u64 = 120_000;

/// `mxpay admin` and its options, shared by every subcommand. Its Debug form hides the token.
#[derive(Args)]
pub struct AdminArgs {
    /// The mxpay config file (for the URL and, with `token create`, the signing key).
    #[arg(
        short = 'c',
        long = "config",
        default_value = "config.yaml",
        global = true
    )]
    pub config: PathBuf,
    /// Base URL of the running mxpay (default: http://<appservice.listen> from the config).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Admin token (default: the MXPAY_ADMIN_TOKEN environment variable).
    #[arg(long, env = "MXPAY_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

impl std::fmt::Debug for AdminArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminArgs")
            .field("config", &self.config)
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("json", &self.json)
            .field("command", &self.command)
            .finish()
    }
}

/// `mxpay admin <command>`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Admin tokens.
    Token {
        /// What to do.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Credits a user's wallet from the currency's issuer account.
    Topup {
        /// The user, e.g. @alice:example.org.
        user_id: String,
        /// Amount in major units, e.g. 12.50.
        amount: String,
        /// Currency code, e.g. EUR.
        currency: String,
        /// Idempotency key: the same key never credits twice (default: a fresh random key,
        /// printed, so a retry can reuse it).
        #[arg(long)]
        key: Option<String>,
        /// Free text kept with the transfer.
        #[arg(long)]
        note: Option<String>,
    },
    /// Shows a user's accounts and balances.
    Balance {
        /// The user.
        user_id: String,
    },
    /// Shows a user's transfers, newest first.
    History {
        /// The user.
        user_id: String,
        /// Transfers per page.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Cursor from a previous page (`next`).
        #[arg(long)]
        from: Option<u64>,
    },
    /// Freezes a user's wallet: nothing leaves it (`--all`: nothing enters either).
    Freeze {
        /// The user.
        user_id: String,
        /// Also block incoming money.
        #[arg(long)]
        all: bool,
    },
    /// Lifts a freeze.
    Unfreeze {
        /// The user.
        user_id: String,
    },
    /// Lists pending transfers (withdrawals waiting for settlement among them).
    Pending,
    /// Confirms a pending withdrawal: the money leaves for good.
    Settle {
        /// The withdrawal's transfer id (32 hex digits).
        withdrawal_id: String,
    },
    /// Rejects a pending withdrawal: the money returns to the user.
    Reject {
        /// The withdrawal's transfer id (32 hex digits).
        withdrawal_id: String,
    },
    /// Runs the ledger's full verification in the running mxpay.
    Verify,
    /// Writes the ledger journal to stdout as JSON lines.
    Export,
    /// Shows the audit log, newest first.
    Audit {
        /// Entries per page.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Show entries before this sequence number.
        #[arg(long)]
        before: Option<u64>,
    },
    /// Webhook events to merchants: list them, replay one.
    Webhooks {
        /// What to do.
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Resets a user's PIN: they must set a new one before paying.
    PinReset {
        /// The user.
        user_id: String,
        /// Also confirm the user's current security keys (cross-signing identity): their next
        /// `!pin set` accepts them. ONLY after checking out of band that the person themself
        /// reset their keys; otherwise whoever took over the account gets the wallet.
        #[arg(long)]
        accept_new_keys: bool,
    },
    /// Merchants: businesses that take payments in chat (scope `merchants`).
    Merchant {
        /// What to do.
        #[command(subcommand)]
        command: MerchantCommand,
    },
}

/// `mxpay admin merchant <command>`.
#[derive(Debug, Subcommand)]
pub enum MerchantCommand {
    /// Registers a merchant and prints its webhook signing secret (shown this once).
    Create {
        /// The merchant's Matrix user (a person or a bot account), e.g. @cafe:example.org.
        user_id: String,
        /// The name customers see on invoices and receipts.
        #[arg(long)]
        name: String,
        /// Where its webhooks go (https, or http for a local receiver).
        #[arg(long)]
        webhook_url: String,
        /// The merchant id (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Its own limits.
        #[command(flatten)]
        limits: MerchantLimitArgs,
    },
    /// Sets a merchant's own limits (replacing the ones it had).
    Limits {
        /// The merchant id.
        merchant_id: String,
        /// The limits.
        #[command(flatten)]
        limits: MerchantLimitArgs,
    },
    /// Lists merchants.
    List,
    /// Shows a merchant, its API keys and its wallet.
    Show {
        /// The merchant id.
        merchant_id: String,
    },
    /// Disables a merchant: its keys are refused and it cannot invoice.
    Disable {
        /// The merchant id.
        merchant_id: String,
    },
    /// Enables a disabled merchant again.
    Enable {
        /// The merchant id.
        merchant_id: String,
    },
    /// Merchant API keys.
    Key {
        /// What to do.
        #[command(subcommand)]
        command: MerchantKeyCommand,
    },
}

/// A merchant's own limits on the command line.
#[derive(Debug, clap::Args)]
pub struct MerchantLimitArgs {
    /// Largest single invoice, as AMOUNT:CURRENCY (e.g. 500.00:EUR); repeat per currency.
    #[arg(long = "max-invoice", value_name = "AMOUNT:CURRENCY")]
    pub max_invoice: Vec<String>,
    /// Most invoices open at once.
    #[arg(long)]
    pub open_invoices_max: Option<u64>,
}

impl MerchantLimitArgs {
    /// The API's `limits` object (an argument without `:` is sent as is, and refused there).
    fn to_json(&self) -> Value {
        let max_invoice: serde_json::Map<String, Value> = self
            .max_invoice
            .iter()
            .map(|arg| match arg.rsplit_once(':') {
                Some((amount, currency)) => (currency.to_owned(), Value::from(amount)),
                None => (String::new(), Value::from(arg.as_str())),
            })
            .collect();
        serde_json::json!({
            "max_invoice": max_invoice,
            "open_invoices_max": self.open_invoices_max,
        })
    }
}

/// `mxpay admin merchant key <command>`.
#[derive(Debug, Subcommand)]
pub enum MerchantKeyCommand {
    /// Mints an API key for a merchant and prints it (shown this once).
    Create {
        /// The merchant id.
        merchant_id: String,
        /// Scopes (repeat or comma-separate): invoices, refunds, read.
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<crate::merchants::KeyScope>,
        /// Lifetime: seconds, or with a unit: 90s, 15m, 12h, 7d (default 365d).
        #[arg(long, default_value = "365d", value_parser = parse_ttl_s)]
        ttl: u64,
    },
    /// Revokes a merchant API key by its id.
    Revoke {
        /// The merchant id.
        merchant_id: String,
        /// The key's id (`key_id`).
        key_id: String,
    },
}

/// `mxpay admin webhooks <command>`.
#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Lists webhook events in event-id order (scope `read`).
    List {
        /// Only failed events (given up on: 410 Gone, or the retry time ran out).
        #[arg(long, conflicts_with = "state")]
        failed: bool,
        /// Only events in this state: pending, delivered or failed.
        #[arg(long)]
        state: Option<String>,
        /// Only this merchant's events.
        #[arg(long)]
        merchant: Option<String>,
        /// Events per page (at most 500).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Show events after this event id (`next` of a previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Puts a delivered or failed event back to pending with a fresh retry schedule: the
    /// merchant gets it again (scope `webhooks`).
    Replay {
        /// The event id (`evt_...`).
        event_id: String,
    },
}

/// `mxpay admin token <command>`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mints an admin token with the key from the config and prints it on stdout; its id
    /// (jti, to revoke it by) and expiry go to stderr (`--json`: all as one JSON object).
    Create {
        /// Scopes (repeat or comma-separate): topup, read, freeze, settle, pin-reset, audit,
        /// revoke, webhooks.
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<Scope>,
        /// Lifetime: seconds, or with a unit: 90s, 15m, 12h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl_s)]
        ttl: u64,
        /// Who the token is for (recorded in the audit log).
        #[arg(long, default_value = "admin")]
        subject: String,
    },
    /// Revokes an admin token by its id (jti): the running mxpay refuses it from now on.
    /// Needs a token with the `revoke` scope, or the token itself.
    Revoke {
        /// The token's id, as `token create` printed it (or `token_id` in the audit log).
        jti: String,
    },
}

/// Parses a lifetime: `3600`, `90s`, `15m`, `12h`, `7d`; in seconds, above zero.
pub fn parse_ttl_s(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit_s) = match text.char_indices().last() {
        Some((i, 's')) => (&text[..i], 1),
        Some((i, 'm')) => (&text[..i], 60),
        Some((i, 'h')) => (&text[..i], 3600),
        Some((i, 'd')) => (&text[..i], 86_400),
        _ => (text, 1),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a lifetime like 3600, 90s, 15m, 12h or 7d"))?;
    match value.checked_mul(unit_s) {
        Some(0) => Err("the lifetime must be above zero".to_owned()),
        Some(s) => Ok(s),
        None => Err(format!("`{text}` is too long")),
    }
}

/// Why an admin command failed; each a sentence for the admin.
#[derive(Debug, thiserror::Error)]
pub enum AdminCliError {
    /// No token given.
    #[error("no admin token: pass --token or set MXPAY_ADMIN_TOKEN (mint one with `mxpay admin token create`)")]
    NoToken,
    /// The config could not be loaded or is unusable.
    #[error("{0}")]
    Config(String),
    /// The request could not be made.
    #[error("cannot reach mxpay at {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The API refused the call.
    #[error("{errcode} (HTTP {status}): {error}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Matrix errcode.
        errcode: String,
        /// The API's sentence.
        error: String,
    },
    /// Writing to stdout failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs `mxpay admin ...`.
pub fn run(args: AdminArgs) -> super::anyhow_like::Result {
    if let AdminCommand::Token {
        command:
            TokenCommand::Create {
                scopes,
                ttl,
                subject,
            },
    } = &args.command
    {
        let (token, claims) = create_token(&args, scopes, *ttl, subject)?;
        if args.json {
            let answer = serde_json::json!({
                "token": token,
                "jti": claims.jti,
                "sub": claims.sub,
                "scopes": claims.scopes,
                "iat": claims.iat,
                "exp": claims.exp,
            });
            println!("{}", serde_json::to_string_pretty(&answer)?);
        } else {
            // stdout holds the token alone, so `$(mxpay admin token create ...)` captures it.
            println!("{token}");
            eprintln!(
                "token id (jti): {}; expires at {} (Unix seconds); \
                 revoke it with `mxpay admin token revoke {}`",
                claims.jti, claims.exp, claims.jti
            );
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(call(&args))?;
    Ok(())
}

fn load_config(args: &AdminArgs) -> Result<Config, AdminCliError> {
    Config::load(&args.config).map_err(|e| AdminCliError::Config(e.to_string()))
}

fn create_token(
    args: &AdminArgs,
    scopes: &[Scope],
    ttl_s: u64,
    subject: &str,
) -> Result<(String, AdminClaims), AdminCliError> {
    let config = load_config(args)?;
    if ttl_s > config.admin.token_ttl_max_s {
        return Err(AdminCliError::Config(format!(
            "--ttl {ttl_s} s is above admin.token_ttl_max_s ({} s)",
            config.admin.token_ttl_max_s
        )));
    }
    let key = config
        .admin
        .load_token_key(true)
        .map_err(|e| AdminCliError::Config(e.to_string()))?
        .ok_or_else(|| {
            AdminCliError::Config(format!(
                "{} has no admin.token: the admin API is off",
                args.config.display()
            ))
        })?;
    let authority = TokenAuthority::new(&key, Arc::new(SystemClock))
        .map_err(|e| AdminCliError::Config(format!("admin.token: {e}")))?;
    let scopes: BTreeSet<Scope> = scopes.iter().copied().collect();
    authority
        .mint_with_claims(subject, scopes, ttl_s)
        .map_err(|e| AdminCliError::Config(e.to_string()))
}

fn base_url(args: &AdminArgs) -> Result<String, AdminCliError> {
    if let Some(url) = &args.url {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let config = load_config(args)?;
    let mut listen = config.appservice.listen;
    // A wildcard listen address is reachable on loopback.
    if listen.ip().is_unspecified() {
        listen.set_ip(if listen.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(format!("http://{listen}"))
}

/// Percent-encodes a path segment (user IDs carry `@` and `:`).
fn segment(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

async fn call(args: &AdminArgs) -> Result<(), AdminCliError> {
    let token = args.token.clone().ok_or(AdminCliError::NoToken)?;
    let base = base_url(args)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
        .build()
        .map_err(|e| AdminCliError::Connect {
            url: base.clone(),
            reason: e.to_string(),
        })?;
    use reqwest::Method;
    use AdminCommand as C;
    let user_path = |user: &str, what: &str| format!("/users/{}/{what}", segment(user));
    let mut generated_key = None;
    let (method, path, body): (Method, String, Option<Value>) = match &args.command {
        C::Token {
            command: TokenCommand::Create { .. },
        } => unreachable!("handled without the API"),
        C::Token {
            command: TokenCommand::Revoke { jti },
        } => (
            Method::POST,
            format!("/tokens/{}/revoke", segment(jti)),
            None,
        ),
        C::Topup {
            user_id,
            amount,
            currency,
            key,
            note,
        } => {
            let key = key.clone().unwrap_or_else(|| {
                let key = format!("cli-{}", crate::admin::token::random_id());
                generated_key = Some(key.clone());
                key
            });
            let body = serde_json::json!({
                "user_id": user_id, "amount": amount, "currency": currency,
                "idempotency_key": key, "note": note,
            });
            (Method::POST, "/topups".to_owned(), Some(body))
        }
        C::Balance { user_id } => (Method::GET, user_path(user_id, "accounts"), None),
        C::History {
            user_id,
            limit,
            from,
        } => {
            let mut path = format!("{}?limit={limit}", user_path(user_id, "history"));
            if let Some(from) = from {
                path.push_str(&format!("&from={from}"));
            }
            (Method::GET, path, None)
        }
        C::Freeze { user_id, all } => (
            Method::POST,
            user_path(user_id, "freeze"),
            Some(serde_json::json!({ "mode": if *all { "all" } else { "debits" } })),
        ),
        C::Unfreeze { user_id } => (Method::POST, user_path(user_id, "unfreeze"), None),
        C::PinReset {
            user_id,
            accept_new_keys,
        } => (
            Method::POST,
            user_path(user_id, "pin-reset"),
            // No body for a plain reset: exactly what older servers understand.
            accept_new_keys.then(|| serde_json::json!({ "accept_new_keys": true })),
        ),
        C::Webhooks {
            command:
                WebhooksCommand::List {
                    failed,
                    state,
                    merchant,
                    limit,
                    after,
                },
        } => {
            let mut path = format!("/webhook-events?limit={limit}");
            let state = if *failed {
                Some("failed")
            } else {
                state.as_deref()
            };
            for (name, value) in [
                ("state", state),
                ("merchant", merchant.as_deref()),
                ("after", after.as_deref()),
            ] {
                if let Some(value) = value {
                    path.push_str(&format!("&{name}={}", segment(value)));
                }
            }
            (Method::GET, path, None)
        }
        C::Webhooks {
            command: WebhooksCommand::Replay { event_id },
        } => (
            Method::POST,
            format!("/webhook-events/{}/replay", segment(event_id)),
            None,
        ),
        C::Pending => (Method::GET, "/transfers/pending".to_owned(), None),
        C::Settle { withdrawal_id } => (
            Method::POST,
            format!("/withdrawals/{}/settle", segment(withdrawal_id)),
            None,
        ),
        C::Reject { withdrawal_id } => (
            Method::POST,
            format!("/withdrawals/{}/reject", segment(withdrawal_id)),
            None,
        ),
        C::Merchant { command } => merchant_call(command),
        C::Verify => (Method::POST, "/ledger/verify".to_owned(), None),
        C::Export => (Method::GET, "/ledger/export".to_owned(), None),
        C::Audit { limit, before } => {
            let mut path = format!("/audit?limit={limit}");
            if let Some(before) = before {
                path.push_str(&format!("&before={before}"));
            }
            (Method::GET, path, None)
        }
    };
    let url = format!("{base}{ADMIN_PREFIX}{path}");
    let mut request = client.request(method, &url).bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let connect = |e: reqwest::Error| AdminCliError::Connect {
        url: base.clone(),
        reason: e.to_string(),
    };
    let mut response = request.send().await.map_err(connect)?;
    let status = response.status().as_u16();
    if matches!(args.command, C::Export) && status == 200 {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        while let Some(chunk) = response.chunk().await.map_err(connect)? {
            out.write_all(&chunk)?;
        }
        out.flush()?;
        return Ok(());
    }
    let text = response.text().await.map_err(connect)?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status != 200 {
        return Err(AdminCliError::Api {
            status,
            errcode: value["errcode"].as_str().unwrap_or("?").to_owned(),
            error: value["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string()),
        });
    }
    if let C::PinReset {
        accept_new_keys: true,
        ..
    } = &args.command
    {
        // A server from before `accept_new_keys` ignores the body: the PIN is reset but the
        // keys are not confirmed, and the operator must know.
        if value["accept_new_keys"] != Value::Bool(true) {
            return Err(AdminCliError::Api {
                status,
                errcode: "KEYS_NOT_ACCEPTED".to_owned(),
                error: "the PIN was reset, but this mxpay did not confirm the new keys \
                        (upgrade it, then run the reset again)"
                    .to_owned(),
            });
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(());
    }
    print!(
        "{}",
        render(&args.command, &value, generated_key.as_deref())
    );
    if matches!(args.command, C::Verify) && value["ok"] != Value::Bool(true) {
        return Err(AdminCliError::Api {
            status,
            errcode: "LEDGER_VERIFY_FAILED".to_owned(),
            error: value["error"].as_str().unwrap_or("?").to_owned(),
        });
    }
    Ok(())
}

fn s(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A plain text table: header row, then rows, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn transfer_rows(transfers: &Value) -> Vec<Vec<String>> {
    transfers
        .as_array()
        .map(|list| {
            list.iter()
                .map(|t| {
                    vec![
                        s(&t["id"]),
                        s(&t["state"]),
                        s(&t["from"]),
                        s(&t["to"]),
                        format!("{} {}", s(&t["amount"]), s(&t["currency"])),
                        s(&t["created_ms"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

const WEBHOOK_HEADER: [&str; 8] = [
    "EVENT_ID",
    "MERCHANT",
    "TYPE",
    "STATE",
    "ATTEMPTS",
    "LAST_STATUS",
    "LAST_ERROR",
    "NEXT_ATTEMPT_MS",
];

fn webhook_row(event: &Value) -> Vec<String> {
    vec![
        s(&event["event_id"]),
        s(&event["merchant_id"]),
        s(&event["type"]),
        s(&event["state"]),
        s(&event["attempts"]),
        s(&event["last_status"]),
        s(&event["last_error"]),
        s(&event["next_attempt_at_ms"]),
    ]
}

const TRANSFER_HEADER: [&str; 6] = ["ID", "STATE", "FROM", "TO", "AMOUNT", "CREATED_MS"];

fn render(command: &AdminCommand, value: &Value, generated_key: Option<&str>) -> String {
    use AdminCommand as C;
    match command {
        C::Topup { .. } => {
            let t = &value["transfer"];
            let mut out = format!(
                "credited {} {} to {} (transfer {}, {})\n",
                s(&t["amount"]),
                s(&t["currency"]),
                s(&t["to"]),
                s(&t["id"]),
                s(&t["state"]),
            );
            if let Some(key) = generated_key {
                out.push_str(&format!(
                    "idempotency key: {key} (reuse it with --key to retry)\n"
                ));
            }
            out
        }
        C::Balance { .. } | C::Freeze { .. } | C::Unfreeze { .. } => {
            let rows: Vec<Vec<String>> = value["accounts"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|a| {
                            vec![
                                s(&a["currency"]),
                                s(&a["available"]),
                                s(&a["posted"]),
                                s(&a["pending_out"]),
                                s(&a["pending_in"]),
                                match s(&a["frozen"]) {
                                    f if f.is_empty() => "no".to_owned(),
                                    f => f,
                                },
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut out = format!("{}\n", s(&value["user_id"]));
            if rows.is_empty() {
                out.push_str("no accounts yet\n");
            } else {
                out.push_str(&table(
                    &[
                        "CURRENCY",
                        "AVAILABLE",
                        "POSTED",
                        "PENDING_OUT",
                        "PENDING_IN",
                        "FROZEN",
                    ],
                    &rows,
                ));
            }
            out
        }
        C::History { .. } => {
            let mut out = table(&TRANSFER_HEADER, &transfer_rows(&value["transfers"]));
            if !value["next"].is_null() {
                out.push_str(&format!("more: --from {}\n", s(&value["next"])));
            }
            out
        }
        C::Pending => table(&TRANSFER_HEADER, &transfer_rows(&value["transfers"])),
        C::Settle { .. } | C::Reject { .. } => {
            let t = &value["transfer"];
            format!(
                "withdrawal {}: {} ({} {} from {})\n",
                s(&t["id"]),
                s(&t["state"]),
                s(&t["amount"]),
                s(&t["currency"]),
                s(&t["from"]),
            )
        }
        C::Verify => {
            if value["ok"] == Value::Bool(true) {
                format!(
                    "ledger OK: {} records, {} entries, {} accounts, {} transfers ({} pending)\n",
                    s(&value["records"]),
                    s(&value["entries"]),
                    s(&value["accounts"]),
                    s(&value["transfers"]),
                    s(&value["pending"]),
                )
            } else {
                format!("ledger verification FAILED: {}\n", s(&value["error"]))
            }
        }
        C::Audit { .. } => {
            let rows: Vec<Vec<String>> = value["entries"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|e| {
                            vec![
                                s(&e["seq"]),
                                s(&e["at_ms"]),
                                s(&e["actor"]),
                                s(&e["action"]),
                                s(&e["target"]),
                                s(&e["result"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut out = table(
                &["SEQ", "AT_MS", "ACTOR", "ACTION", "TARGET", "RESULT"],
                &rows,
            );
            if !value["next"].is_null() {
                out.push_str(&format!("more: --before {}\n", s(&value["next"])));
            }
            out
        }
        C::PinReset { .. } => {
            let mut out = format!(
                "PIN reset for {}; they must set a new PIN before paying\n",
                s(&value["user_id"])
            );
            if value["accept_new_keys"] == Value::Bool(true) {
                out.push_str("their current security keys are accepted when they set it\n");
            }
            out
        }
        C::Token {
            command: TokenCommand::Revoke { .. },
        } => {
            if value["already"] == Value::Bool(true) {
                format!(
                    "token {} was already revoked (at {} ms)\n",
                    s(&value["jti"]),
                    s(&value["revoked_at_ms"])
                )
            } else {
                format!(
                    "token {} revoked (at {} ms); mxpay refuses it from now on\n",
                    s(&value["jti"]),
                    s(&value["revoked_at_ms"])
                )
            }
        }
        C::Merchant { command } => render_merchant(command, value),
        C::Webhooks {
            command: WebhooksCommand::List { .. },
        } => {
            let rows: Vec<Vec<String>> = value["events"]
                .as_array()
                .map(|list| list.iter().map(webhook_row).collect())
                .unwrap_or_default();
            let mut out = table(&WEBHOOK_HEADER, &rows);
            if !value["next"].is_null() {
                out.push_str(&format!("more: --after {}\n", s(&value["next"])));
            }
            out
        }
        C::Webhooks {
            command: WebhooksCommand::Replay { .. },
        } => {
            let event = &value["event"];
            if value["replayed"] == Value::Bool(true) {
                format!(
                    "webhook {} to {} is pending again; it is sent at once\n",
                    s(&event["event_id"]),
                    s(&event["merchant_id"])
                )
            } else {
                format!(
                    "webhook {} to {} was pending already (next attempt at {} ms); nothing changed\n",
                    s(&event["event_id"]),
                    s(&event["merchant_id"]),
                    s(&event["next_attempt_at_ms"])
                )
            }
        }
        C::Token {
            command: TokenCommand::Create { .. },
        }
        | C::Export => String::new(),
    }
}

/// The API call of a `merchant` subcommand.
fn merchant_call(command: &MerchantCommand) -> (reqwest::Method, String, Option<Value>) {
    use reqwest::Method;
    use MerchantCommand as M;
    let at = |id: &str, what: &str| format!("/merchants/{}{what}", segment(id));
    match command {
        M::Create {
            user_id,
            name,
            webhook_url,
            id,
            limits,
        } => (
            Method::POST,
            "/merchants".to_owned(),
            Some(serde_json::json!({
                "merchant_id": id, "user_id": user_id, "display_name": name,
                "webhook_url": webhook_url, "limits": limits.to_json(),
            })),
        ),
        M::Limits {
            merchant_id,
            limits,
        } => (
            Method::POST,
            at(merchant_id, "/limits"),
            Some(limits.to_json()),
        ),
        M::List => (Method::GET, "/merchants".to_owned(), None),
        M::Show { merchant_id } => (Method::GET, at(merchant_id, ""), None),
        M::Disable { merchant_id } => (Method::POST, at(merchant_id, "/disable"), None),
        M::Enable { merchant_id } => (Method::POST, at(merchant_id, "/enable"), None),
        M::Key {
            command:
                MerchantKeyCommand::Create {
                    merchant_id,
                    scopes,
                    ttl,
                },
        } => (
            Method::POST,
            at(merchant_id, "/keys"),
            Some(serde_json::json!({ "scopes": scopes, "ttl_s": ttl })),
        ),
        M::Key {
            command:
                MerchantKeyCommand::Revoke {
                    merchant_id,
                    key_id,
                },
        } => (
            Method::POST,
            at(merchant_id, &format!("/keys/{}/revoke", segment(key_id))),
            None,
        ),
    }
}

fn render_merchant(command: &MerchantCommand, value: &Value) -> String {
    use MerchantCommand as M;
    let row = |m: &Value| {
        vec![
            s(&m["merchant_id"]),
            s(&m["user_id"]),
            s(&m["display_name"]),
            if m["enabled"] == Value::Bool(true) {
                "enabled".to_owned()
            } else {
                "disabled".to_owned()
            },
            s(&m["webhook_url"]),
        ]
    };
    let header = ["MERCHANT", "USER", "NAME", "STATE", "WEBHOOK URL"];
    match command {
        M::Create { .. } => format!(
            "{}webhook signing secret (shown only now): {}\n",
            table(&header, &[row(value)]),
            s(&value["webhook_secret"])
        ),
        M::List => {
            let rows: Vec<Vec<String>> = value["merchants"]
                .as_array()
                .map(|list| list.iter().map(row).collect())
                .unwrap_or_default();
            table(&header, &rows)
        }
        M::Show { .. } => {
            let keys: Vec<Vec<String>> = value["keys"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|k| {
                            vec![
                                s(&k["key_id"]),
                                k["scopes"]
                                    .as_array()
                                    .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                                    .unwrap_or_default(),
                                s(&k["exp"]),
                                if k.get("revoked_at_ms").is_some() {
                                    "revoked".to_owned()
                                } else {
                                    "valid".to_owned()
                                },
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let accounts: Vec<Vec<String>> = value["accounts"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|a| vec![s(&a["currency"]), s(&a["available"])])
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "{}\n{}\n{}",
                table(&header, &[row(value)]),
                table(&["KEY", "SCOPES", "EXPIRES (s)", "STATE"], &keys),
                table(&["CURRENCY", "AVAILABLE"], &accounts)
            )
        }
        M::Disable { .. } | M::Enable { .. } => table(&header, &[row(value)]),
        M::Limits { .. } => {
            let limits = &value["limits"];
            let mut rows: Vec<Vec<String>> = limits["max_invoice_minor"]
                .as_object()
                .map(|map| {
                    map.iter()
                        .map(|(currency, minor)| {
                            vec![format!("max invoice {currency} (minor units)"), s(minor)]
                        })
                        .collect()
                })
                .unwrap_or_default();
            rows.push(vec![
                "open invoices max".to_owned(),
                limits["open_invoices_max"]
                    .as_u64()
                    .map_or_else(|| "none".to_owned(), |n| n.to_string()),
            ]);
            table(&["LIMIT", "VALUE"], &rows)
        }
        M::Key {
            command: MerchantKeyCommand::Create { .. },
        } => format!(
            "{}\nkey id: {} (revoke it by this id)\n",
            s(&value["key"]),
            s(&value["key_id"])
        ),
        M::Key {
            command: MerchantKeyCommand::Revoke { .. },
        } => format!(
            "key {} of merchant {} revoked (at {} ms)\n",
            s(&value["key_id"]),
            s(&value["merchant_id"]),
            s(&value["revoked_at_ms"])
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_token() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from([
            "mxpay",
            "admin",
            "--token",
            "eyJ.secret-admin-token.sig",
            "pending",
        ])
        .expect("parses");
        let debug = format!("{cli:?} {cli:#?}");
        assert!(!debug.contains("secret-admin-token"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn webhooks_list_and_replay_parse() {
        use clap::Parser as _;
        let parse = |args: &[&str]| {
            let cli =
                crate::cli::Cli::try_parse_from(["mxpay", "admin", "webhooks"].iter().chain(args))?;
            let crate::cli::Command::Admin(admin) = cli.command else {
                panic!("not an admin command");
            };
            match admin.command {
                AdminCommand::Webhooks { command } => Ok::<_, clap::Error>(command),
                other => panic!("parsed as {other:?}"),
            }
        };
        assert!(matches!(
            parse(&["list", "--failed", "--merchant", "cafe"]).unwrap(),
            WebhooksCommand::List { failed: true, merchant: Some(m), .. } if m == "cafe"
        ));
        assert!(parse(&["list", "--failed", "--state", "pending"]).is_err());
        assert!(matches!(
            parse(&["replay", "evt_1"]).unwrap(),
            WebhooksCommand::Replay { event_id } if event_id == "evt_1"
        ));
        assert!(parse(&["replay"]).is_err());
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl_s("3600"), Ok(3600));
        assert_eq!(parse_ttl_s("90s"), Ok(90));
        assert_eq!(parse_ttl_s("15m"), Ok(900));
        assert_eq!(parse_ttl_s("12h"), Ok(43_200));
        assert_eq!(parse_ttl_s("7d"), Ok(604_800));
        assert!(parse_ttl_s("0").is_err());
        assert!(parse_ttl_s("1w").is_err());
        assert!(parse_ttl_s("").is_err());
    }

    #[test]
    fn table_pads_columns() {
        let out = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["b".into(), "y".into()],
            ],
        );
        assert_eq!(out, "A          LONGER\nwide cell  x\nb          y\n");
    }

    #[test]
    fn pin_reset_accepts_new_keys_only_with_the_flag() {
        use clap::Parser as _;
        let parse = |extra: &[&str]| {
            let args = ["mxpay", "admin", "pin-reset", "@a:x"];
            let cli = crate::cli::Cli::try_parse_from(args.iter().chain(extra))?;
            let crate::cli::Command::Admin(admin) = cli.command else {
                panic!("not an admin command: {cli:?}");
            };
            match admin.command {
                AdminCommand::PinReset {
                    user_id,
                    accept_new_keys,
                } => Ok::<_, clap::Error>((user_id, accept_new_keys)),
                other => panic!("parsed as {other:?}"),
            }
        };
        assert_eq!(parse(&[]).unwrap(), ("@a:x".to_owned(), false));
        assert_eq!(
            parse(&["--accept-new-keys"]).unwrap(),
            ("@a:x".to_owned(), true)
        );
        assert!(parse(&["--accept-new-keys=false"]).is_err());

        let command = AdminCommand::PinReset {
            user_id: "@a:x".to_owned(),
            accept_new_keys: true,
        };
        let plain =
            serde_json::json!({"user_id": "@a:x", "had_pin": true, "accept_new_keys": false});
        let out = render(&command, &plain, None);
        assert!(out.contains("PIN reset for @a:x"), "{out}");
        assert!(!out.contains("security keys"), "{out}");
        let keys =
            serde_json::json!({"user_id": "@a:x", "had_pin": false, "accept_new_keys": true});
        let out = render(&command, &keys, None);
        assert!(out.contains("security keys are accepted"), "{out}");
    }

    #[test]
    fn token_revoke_parses_and_renders() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from(["mxpay", "admin", "token", "revoke", "ab12"])
            .expect("parses");
        let crate::cli::Command::Admin(admin) = cli.command else {
            panic!("not an admin command: {cli:?}");
        };
        let AdminCommand::Token {
            command: TokenCommand::Revoke { jti },
        } = &admin.command
        else {
            panic!("parsed as {:?}", admin.command);
        };
        assert_eq!(jti, "ab12");
        assert!(crate::cli::Cli::try_parse_from(["mxpay", "admin", "token", "revoke"]).is_err());
        let fresh = serde_json::json!({"jti": "ab12", "revoked": true, "already": false,
            "revoked_at_ms": 5});
        let out = render(&admin.command, &fresh, None);
        assert_eq!(
            out,
            "token ab12 revoked (at 5 ms); mxpay refuses it from now on\n"
        );
        let again = serde_json::json!({"jti": "ab12", "revoked": true, "already": true,
            "revoked_at_ms": 5});
        let out = render(&admin.command, &again, None);
        assert!(out.contains("already revoked"), "{out}");
        // The revoke scope is a scope `token create` accepts.
        assert!(crate::cli::Cli::try_parse_from([
            "mxpay",
            "admin",
            "token",
            "create",
            "--scope",
            "read,revoke"
        ])
        .is_ok());
    }

    #[test]
    fn merchant_commands_call_their_routes() {
        use clap::Parser as _;
        use reqwest::Method;
        let parse = |line: &str| {
            crate::cli::Cli::try_parse_from(["mxpay", "admin"].into_iter().chain(line.split(' ')))
        };
        let call_of = |line: &str| {
            let crate::cli::Command::Admin(admin) = parse(line).unwrap().command else {
                panic!("not an admin command");
            };
            match admin.command {
                AdminCommand::Merchant { command } => merchant_call(&command),
                other => panic!("{other:?}"),
            }
        };
        let (method, path, body) = call_of(
            "merchant create @cafe:example.org --name Cafe --webhook-url https://x.example/h --id cafe",
        );
        assert_eq!((method, path.as_str()), (Method::POST, "/merchants"));
        let body = body.unwrap();
        assert_eq!(body["merchant_id"], "cafe");
        assert_eq!(body["display_name"], "Cafe");
        let (method, path, body) =
            call_of("merchant key create cafe --scope invoices,read --ttl 30d");
        assert_eq!(
            (method, path.as_str()),
            (Method::POST, "/merchants/cafe/keys")
        );
        let body = body.unwrap();
        assert_eq!(body["scopes"], serde_json::json!(["invoices", "read"]));
        assert_eq!(body["ttl_s"], 30 * 24 * 3600);
        let (method, path, _) = call_of("merchant key revoke cafe mk_1");
        assert_eq!(
            (method, path.as_str()),
            (Method::POST, "/merchants/cafe/keys/mk_1/revoke")
        );
        assert_eq!(
            call_of("merchant disable cafe").1,
            "/merchants/cafe/disable"
        );
        assert!(parse("merchant key create cafe --scope admin").is_err());
    }

    #[test]
    fn user_ids_are_percent_encoded() {
        assert_eq!(segment("@alice:example.org"), "%40alice%3Aexample.org");
    }
}
