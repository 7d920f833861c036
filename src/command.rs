//! Text commands (`!pay @bob:example.org 12.50 EUR lunch`) parsed into [`Command`]s. No I/O.
//!
//! Parse errors are sentences for the room: they say what was wrong and show the right form.
//! Whether an amount fits its currency (decimal places, limits) is the ledger's check.

use std::str::FromStr;

use matrix_sdk::ruma::OwnedUserId;
use rust_decimal::Decimal;

/// Longest memo accepted, in characters.
pub const MEMO_CHARS_MAX: usize = 140;

/// A command a person typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `!help`
    Help,
    /// `!balance`
    Balance,
    /// `!history [count]`
    History {
        /// How many entries, newest first.
        count: u32,
    },
    /// `!pin set`
    PinSet,
    /// `!pin change`
    PinChange,
    /// `!cancel`: cancels every payment or withdrawal of the sender still waiting for a PIN.
    Cancel,
    /// `!pay @user:server 12.50 EUR [memo]`
    Pay {
        /// Who is paid.
        payee: OwnedUserId,
        /// Amount in major units, as typed.
        amount: Decimal,
        /// Upper-cased currency code, as typed.
        currency: String,
        /// Free text.
        memo: Option<String>,
    },
    /// `!withdraw 50 EUR`
    Withdraw {
        /// Amount in major units.
        amount: Decimal,
        /// Upper-cased currency code.
        currency: String,
    },
}

/// Default and largest `!history` length.
pub const HISTORY_DEFAULT: u32 = 10;
/// Largest `!history` length.
pub const HISTORY_MAX: u32 = 50;

/// Why a command did not parse. The Display form is the sentence the room gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// `!something` that mxpay does not know.
    #[error("unknown command `!{0}`. Send `!help` for the list of commands.")]
    Unknown(String),
    /// Wrong number or order of words.
    #[error("usage: {0}")]
    Usage(&'static str),
    /// Not a Matrix user ID.
    #[error("`{0}` is not a Matrix user ID; write it in full, like `@bob:example.org`")]
    BadUser(String),
    /// Not a plain decimal amount.
    #[error(
        "`{0}` is not an amount; write it like `12.50` (a dot for decimals, no currency sign)"
    )]
    BadAmount(String),
    /// Not a 3-letter code.
    #[error("`{0}` is not a currency code; write it like `EUR`")]
    BadCurrency(String),
    /// Memo too long.
    #[error("the note is longer than {MEMO_CHARS_MAX} characters")]
    MemoTooLong,
}

const PAY_USAGE: &str =
    "!pay @user:server AMOUNT CURRENCY [note], e.g. `!pay @bob:example.org 12.50 EUR lunch`";
const WITHDRAW_USAGE: &str = "!withdraw AMOUNT CURRENCY, e.g. `!withdraw 50 EUR`";
const PIN_USAGE: &str = "!pin set | !pin change (in your private chat with the bot)";
const HISTORY_USAGE: &str = "!history [count], count from 1 to 50";

/// The help text: every command with its form.
pub fn help_text() -> String {
    [
        "mxpay commands:",
        "• !pay @user:server AMOUNT CURRENCY [note] — pay someone in this room (confirmed with your PIN in your private chat with me)",
        "• !balance — your balances (answered in your private chat with me)",
        "• !history [count] — your latest payments (private chat only)",
        "• !pin set — choose your 4-digit PIN (private chat only)",
        "• !pin change — change it (needs the old PIN)",
        "• !withdraw AMOUNT CURRENCY — cash out to your funding provider",
        "• !cancel — cancel your payments still waiting for your PIN",
        "• !help — this list",
    ]
    .join("\n")
}

/// Parses `text` if it is a command (starts with `!`); `None` for ordinary chat.
pub fn parse(text: &str) -> Option<Result<Command, CommandError>> {
    let text = text.trim();
    let rest = text.strip_prefix('!')?;
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_ascii_lowercase();
    let args: Vec<&str> = words.collect();
    Some(parse_command(&name, &args))
}

fn parse_command(name: &str, args: &[&str]) -> Result<Command, CommandError> {
    match name {
        "help" => Ok(Command::Help),
        "balance" | "bal" => Ok(Command::Balance),
        "cancel" => Ok(Command::Cancel),
        "history" => match args {
            [] => Ok(Command::History {
                count: HISTORY_DEFAULT,
            }),
            [count] => match count.parse::<u32>() {
                Ok(count @ 1..=HISTORY_MAX) => Ok(Command::History { count }),
                _ => Err(CommandError::Usage(HISTORY_USAGE)),
            },
            _ => Err(CommandError::Usage(HISTORY_USAGE)),
        },
        "pin" => match args {
            [sub] if sub.eq_ignore_ascii_case("set") => Ok(Command::PinSet),
            [sub] if sub.eq_ignore_ascii_case("change") => Ok(Command::PinChange),
            _ => Err(CommandError::Usage(PIN_USAGE)),
        },
        "pay" => match args {
            [payee, amount, currency, memo @ ..] => Ok(Command::Pay {
                payee: parse_user(payee)?,
                amount: parse_amount(amount)?,
                currency: parse_currency(currency)?,
                memo: parse_memo(memo)?,
            }),
            _ => Err(CommandError::Usage(PAY_USAGE)),
        },
        "withdraw" => match args {
            [amount, currency] => Ok(Command::Withdraw {
                amount: parse_amount(amount)?,
                currency: parse_currency(currency)?,
            }),
            _ => Err(CommandError::Usage(WITHDRAW_USAGE)),
        },
        other => Err(CommandError::Unknown(other.to_owned())),
    }
}

/// A user id as typed (`@alice:server`).
pub(crate) fn parse_user(word: &str) -> Result<OwnedUserId, CommandError> {
    OwnedUserId::try_from(word).map_err(|_| CommandError::BadUser(word.to_owned()))
}

/// A plain decimal: digits with at most one dot. No signs, exponents, commas or symbols,
/// so `1e3`, `-5`, `12,50` and `€5` are errors rather than surprises.
fn parse_amount(word: &str) -> Result<Decimal, CommandError> {
    let plain = !word.is_empty()
        && word.chars().all(|c| c.is_ascii_digit() || c == '.')
        && word.matches('.').count() <= 1
        && word.chars().any(|c| c.is_ascii_digit());
    if !plain {
        return Err(CommandError::BadAmount(word.to_owned()));
    }
    Decimal::from_str(word).map_err(|_| CommandError::BadAmount(word.to_owned()))
}

/// A 3-letter currency code, upper-cased.
pub(crate) fn parse_currency(word: &str) -> Result<String, CommandError> {
    if word.len() == 3 && word.chars().all(|c| c.is_ascii_alphabetic()) {
        Ok(word.to_ascii_uppercase())
    } else {
        Err(CommandError::BadCurrency(word.to_owned()))
    }
}

/// The words after the amount as a note, at most [`MEMO_CHARS_MAX`] characters.
pub(crate) fn parse_memo(words: &[&str]) -> Result<Option<String>, CommandError> {
    if words.is_empty() {
        return Ok(None);
    }
    let memo = words.join(" ");
    if memo.chars().count() > MEMO_CHARS_MAX {
        return Err(CommandError::MemoTooLong);
    }
    Ok(Some(memo))
}

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::owned_user_id;

    use super::*;

    #[test]
    fn ordinary_chat_is_not_a_command() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse("1234"), None);
        assert_eq!(parse("!"), None);
    }

    #[test]
    fn pay_parses_payee_amount_currency_and_memo() {
        assert_eq!(
            parse("!pay @bob:example.org 12.50 eur lunch at noon"),
            Some(Ok(Command::Pay {
                payee: owned_user_id!("@bob:example.org"),
                amount: Decimal::new(1250, 2),
                currency: "EUR".into(),
                memo: Some("lunch at noon".into()),
            }))
        );
        assert!(matches!(
            parse("!PAY @bob:example.org 3 JPY"),
            Some(Ok(Command::Pay { memo: None, .. }))
        ));
    }

    #[test]
    fn pay_errors_say_what_was_wrong() {
        let cases = [
            ("!pay bob 12 EUR", CommandError::BadUser("bob".into())),
            (
                "!pay @bob:example.org 12,50 EUR",
                CommandError::BadAmount("12,50".into()),
            ),
            (
                "!pay @bob:example.org -5 EUR",
                CommandError::BadAmount("-5".into()),
            ),
            (
                "!pay @bob:example.org 1e3 EUR",
                CommandError::BadAmount("1e3".into()),
            ),
            (
                "!pay @bob:example.org 5 EURO",
                CommandError::BadCurrency("EURO".into()),
            ),
            ("!pay @bob:example.org 5", CommandError::Usage(PAY_USAGE)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text), Some(Err(expected)), "{text}");
        }
        let long = format!("!pay @bob:example.org 1 EUR {}", "x".repeat(141));
        assert_eq!(parse(&long), Some(Err(CommandError::MemoTooLong)));
        assert!(CommandError::BadAmount("12,50".into())
            .to_string()
            .contains("12.50"));
    }

    #[test]
    fn other_commands() {
        assert_eq!(parse("!help"), Some(Ok(Command::Help)));
        assert_eq!(parse(" !balance "), Some(Ok(Command::Balance)));
        assert_eq!(
            parse("!history"),
            Some(Ok(Command::History {
                count: HISTORY_DEFAULT
            }))
        );
        assert_eq!(parse("!history 5"), Some(Ok(Command::History { count: 5 })));
        assert_eq!(
            parse("!history 500"),
            Some(Err(CommandError::Usage(HISTORY_USAGE)))
        );
        assert_eq!(parse("!pin set"), Some(Ok(Command::PinSet)));
        assert_eq!(parse("!cancel"), Some(Ok(Command::Cancel)));
        assert!(help_text().contains("!cancel"));
        assert_eq!(parse("!pin change"), Some(Ok(Command::PinChange)));
        assert_eq!(parse("!pin"), Some(Err(CommandError::Usage(PIN_USAGE))));
        assert_eq!(
            parse("!withdraw 50 EUR"),
            Some(Ok(Command::Withdraw {
                amount: Decimal::new(50, 0),
                currency: "EUR".into()
            }))
        );
        assert_eq!(
            parse("!teleport"),
            Some(Err(CommandError::Unknown("teleport".into())))
        );
        assert!(help_text().contains("!pay @user:server"));
    }
}
