//! MSC4391 bot commands: clients that support the proposal offer mxpay's commands in their
//! composer (slash commands with typed parameters).
//!
//! - The bot publishes one state event per command, type
//!   `org.matrix.msc4391.command_description`, state key the padded base64 of
//!   SHA-256(command + bot user id), in rooms where it may send state.
//! - A client that invokes one sends an `m.room.message` mentioning the bot and carrying
//!   `org.matrix.msc4391.command: {command, arguments}`; [`invocation_text`] turns it into the
//!   text command it stands for, so it goes through the same parser, policy and PIN step-up as
//!   typed text. Text commands keep working everywhere.
//!
//! The unstable names are used while the proposal is open (mautrix-go and gomuks use the same).

use base64::Engine as _;
use ruma::UserId;
use serde_json::{json, Value};
use sha2::Digest as _;

/// State event type of a command description (unstable prefix of `m.bot.command_description`).
pub const COMMAND_DESCRIPTION_EVENT_TYPE: &str = "org.matrix.msc4391.command_description";

/// Content key of a command invocation (unstable prefix of `m.bot.command`).
pub const COMMAND_INVOCATION_KEY: &str = "org.matrix.msc4391.command";

/// Longest invocation argument taken (a memo is the longest; the parser bounds it again).
const ARGUMENT_LEN_MAX: usize = 1_024;

/// One parameter of a command: its key, its type and whether it may be left out.
struct Parameter {
    key: &'static str,
    schema: Schema,
    description: &'static str,
    optional: bool,
    /// Takes the rest of the line (only the last parameter).
    tail: bool,
}

enum Schema {
    String,
    Integer,
    UserId,
    OneOf(&'static [&'static str]),
}

impl Schema {
    fn to_json(&self) -> Value {
        match self {
            Schema::String => json!({ "schema_type": "primitive", "type": "string" }),
            Schema::Integer => json!({ "schema_type": "primitive", "type": "integer" }),
            Schema::UserId => json!({ "schema_type": "primitive", "type": "user_id" }),
            Schema::OneOf(values) => json!({
                "schema_type": "union",
                "variants": values
                    .iter()
                    .map(|v| json!({ "schema_type": "literal", "literal_type": "string", "value": v }))
                    .collect::<Vec<_>>(),
            }),
        }
    }
}

/// A command the bot describes.
struct Description {
    command: &'static str,
    description: &'static str,
    parameters: &'static [Parameter],
}

const fn required(key: &'static str, schema: Schema, description: &'static str) -> Parameter {
    Parameter {
        key,
        schema,
        description,
        optional: false,
        tail: false,
    }
}

const DESCRIPTIONS: &[Description] = &[
    Description {
        command: "help",
        description: "List mxpay's commands",
        parameters: &[],
    },
    Description {
        command: "pay",
        description: "Pay someone in this room; you confirm with your PIN in your DM with the bot",
        parameters: &[
            required("payee", Schema::UserId, "Who gets the money"),
            required("amount", Schema::String, "Amount, e.g. 12.50"),
            required("currency", Schema::String, "Currency code, e.g. EUR"),
            Parameter {
                key: "memo",
                schema: Schema::String,
                description: "What it is for",
                optional: true,
                tail: true,
            },
        ],
    },
    Description {
        command: "balance",
        description: "Your balances (answered in your DM)",
        parameters: &[],
    },
    Description {
        command: "history",
        description: "Your latest payments (answered in your DM)",
        parameters: &[Parameter {
            key: "count",
            schema: Schema::Integer,
            description: "How many (default 10, at most 50)",
            optional: true,
            tail: false,
        }],
    },
    Description {
        command: "cancel",
        description: "Cancel your payments still waiting for your PIN",
        parameters: &[],
    },
    Description {
        command: "pin",
        description: "Set or change your PIN (in your DM with the bot)",
        parameters: &[required(
            "action",
            Schema::OneOf(&["set", "change"]),
            "set or change",
        )],
    },
    Description {
        command: "request",
        description: "Ask someone in this room for money; they pay with a reply or a ✅",
        parameters: &[
            required("payer", Schema::UserId, "Who is asked to pay"),
            required("amount", Schema::String, "Amount, e.g. 12.00"),
            required("currency", Schema::String, "Currency code, e.g. EUR"),
            Parameter {
                key: "memo",
                schema: Schema::String,
                description: "What it is for",
                optional: true,
                tail: true,
            },
        ],
    },
    Description {
        command: "split",
        description: "Split a bill: ask each person named for their share",
        parameters: &[
            required("amount", Schema::String, "The whole bill, e.g. 100.00"),
            required("currency", Schema::String, "Currency code, e.g. EUR"),
            Parameter {
                key: "people",
                schema: Schema::String,
                description: "The people (@user:server ...), +me to count yourself, then a note",
                optional: false,
                tail: true,
            },
        ],
    },
    Description {
        command: "withdraw",
        description: "Withdraw money to your account with the operator",
        parameters: &[
            required("amount", Schema::String, "Amount, e.g. 20.00"),
            required("currency", Schema::String, "Currency code, e.g. EUR"),
        ],
    },
];

/// The state key of `command`'s description by `bot`: padded base64 of SHA-256(command + bot).
pub fn state_key(command: &str, bot: &UserId) -> String {
    let mut hash = sha2::Sha256::new();
    hash.update(command.as_bytes());
    hash.update(bot.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hash.finalize())
}

/// The description events of the commands named in `commands` (names without `!`), as
/// (state key, content), in a fixed order.
pub fn descriptions(bot: &UserId, commands: &[&str]) -> Vec<(String, Value)> {
    DESCRIPTIONS
        .iter()
        .filter(|d| commands.contains(&d.command))
        .map(|d| {
            let parameters: Vec<Value> = d
                .parameters
                .iter()
                .map(|p| {
                    let mut parameter = json!({
                        "key": p.key,
                        "schema": p.schema.to_json(),
                        "description": { "m.text": [{ "body": p.description }] },
                    });
                    if p.optional {
                        parameter["optional"] = true.into();
                    }
                    parameter
                })
                .collect();
            let mut content = json!({
                "command": d.command,
                "parameters": parameters,
                "description": { "m.text": [{ "body": d.description }] },
            });
            if let Some(tail) = d.parameters.iter().find(|p| p.tail) {
                // mautrix's extension: the parameter that takes the rest of the line.
                content["fi.mau.tail_parameter"] = tail.key.into();
            }
            (state_key(d.command, bot), content)
        })
        .collect()
}

/// The text command an MSC4391 invocation in `content` stands for (`!pay @bob:hs 5 EUR memo`),
/// when it names one of mxpay's commands and mentions `bot`; `None` otherwise (then the
/// message's `body` is read as usual). Arguments that do not fit their parameter (whitespace
/// in a single-word one, wrong type, too long) leave them out, so the parser answers with the
/// command's usage.
pub fn invocation_text(content: &Value, bot: &UserId) -> Option<String> {
    let invocation = content.get(COMMAND_INVOCATION_KEY)?;
    let mentions_bot = content
        .pointer("/m.mentions/user_ids")
        .and_then(Value::as_array)
        .is_some_and(|ids| ids.iter().any(|id| id.as_str() == Some(bot.as_str())));
    if !mentions_bot {
        return None;
    }
    let name = invocation.get("command")?.as_str()?;
    let description = DESCRIPTIONS.iter().find(|d| d.command == name)?;
    let arguments = invocation.get("arguments");
    let mut text = format!("!{}", description.command);
    for parameter in description.parameters {
        let Some(value) = arguments.and_then(|a| a.get(parameter.key)) else {
            if parameter.optional {
                continue;
            }
            break;
        };
        let word = match (&parameter.schema, value) {
            (Schema::Integer, Value::Number(n)) => n.to_string(),
            (Schema::Integer, _) => break,
            (_, Value::String(s)) => s.trim().to_owned(),
            _ => break,
        };
        let fits = !word.is_empty()
            && word.len() <= ARGUMENT_LEN_MAX
            && (parameter.tail || !word.contains(char::is_whitespace));
        if !fits {
            break;
        }
        text.push(' ');
        text.push_str(&word);
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::user_id;

    #[test]
    fn state_keys_are_padded_base64_of_the_command_and_the_bot() {
        let key = state_key("pay", user_id!("@_mxpay:example.org"));
        assert_eq!(key.len(), 44);
        assert!(key.ends_with('='));
        assert_ne!(key, state_key("pay", user_id!("@other:example.org")));
        assert_ne!(key, state_key("balance", user_id!("@_mxpay:example.org")));
    }

    #[test]
    fn descriptions_cover_the_named_commands_with_typed_parameters() {
        let bot = user_id!("@_mxpay:example.org");
        let all = descriptions(
            bot,
            &[
                "help", "pay", "balance", "history", "cancel", "pin", "request", "split",
                "withdraw",
            ],
        );
        assert_eq!(all.len(), 9);
        let split = &all[7].1;
        assert_eq!(split["command"], "split");
        assert_eq!(split["fi.mau.tail_parameter"], "people");
        let (key, pay) = &all[1];
        assert_eq!(key, &state_key("pay", bot));
        assert_eq!(pay["command"], "pay");
        assert_eq!(pay["parameters"][0]["schema"]["type"], "user_id");
        assert_eq!(pay["parameters"][3]["optional"], true);
        assert_eq!(pay["fi.mau.tail_parameter"], "memo");
        assert_eq!(descriptions(bot, &["help"]).len(), 1);
    }

    #[test]
    fn invocations_become_the_text_command_they_stand_for() {
        let bot = user_id!("@_mxpay:example.org");
        let invoke = |command: &str, arguments: Value, mention: bool| {
            json!({
                "msgtype": "m.text",
                "body": "/pay whatever the client wrote",
                "m.mentions": { "user_ids": if mention { vec![bot.as_str()] } else { vec![] } },
                COMMAND_INVOCATION_KEY: { "command": command, "arguments": arguments },
            })
        };
        let pay = invoke(
            "pay",
            json!({"payee": "@bob:example.org", "amount": "5.00", "currency": "EUR", "memo": "team lunch"}),
            true,
        );
        assert_eq!(
            invocation_text(&pay, bot).as_deref(),
            Some("!pay @bob:example.org 5.00 EUR team lunch")
        );
        let history = invoke("history", json!({"count": 3}), true);
        assert_eq!(
            invocation_text(&history, bot).as_deref(),
            Some("!history 3")
        );
        let balance = invoke("balance", json!({}), true);
        assert_eq!(invocation_text(&balance, bot).as_deref(), Some("!balance"));
        // A payee with a space, or a missing amount: the usage answer, not a guess.
        let odd = invoke(
            "pay",
            json!({"payee": "@bob:example.org x", "amount": "5"}),
            true,
        );
        assert_eq!(invocation_text(&odd, bot).as_deref(), Some("!pay"));
        // Not mentioning the bot, or not one of its commands: the body as usual.
        assert_eq!(
            invocation_text(&invoke("balance", json!({}), false), bot),
            None
        );
        assert_eq!(invocation_text(&invoke("ban", json!({}), true), bot), None);
        assert_eq!(invocation_text(&json!({"body": "!balance"}), bot), None);
    }
}
