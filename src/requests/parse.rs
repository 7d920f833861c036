//! The text commands of requests, split bills, refunds and accepted transfers, parsed into
//! typed values. No I/O; whether an amount fits its currency is checked later
//! ([`super::split::plan_split`], [`super::state::Request`], [`super::refund::plan_refund`]).
//!
//! Parse errors are [`CommandError`]s, the same sentences `!pay` gets.

use std::str::FromStr;

use matrix_sdk::ruma::{EventId, OwnedEventId, OwnedUserId};
use rust_decimal::Decimal;

use crate::command::{parse_currency, parse_memo, parse_user, CommandError};

/// A command about requests, split bills, refunds or accepting a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestCommand {
    /// `!request @alice:server 12.00 EUR pizza`: the sender asks `payer` for money.
    Request {
        /// Who is asked to pay.
        payer: OwnedUserId,
        /// Amount in major units, as typed.
        amount: Decimal,
        /// Upper-cased currency code, as typed.
        currency: String,
        /// What for.
        memo: Option<String>,
    },
    /// `!split 100.00 EUR @a @b @c dinner` (even, `+me`/`--with-me` counts the sender as a
    /// share) or `!split @a 40 @b 25 EUR taxi` (uneven).
    Split {
        /// Who pays what.
        shares: SplitShares,
        /// Upper-cased currency code, as typed.
        currency: String,
        /// What for.
        memo: Option<String>,
    },
    /// A command sent as a reply (`m.relates_to.m.in_reply_to`) to a request, receipt or
    /// payment notice: what it means depends on what `to` is.
    Reply {
        /// The event replied to.
        to: OwnedEventId,
        /// What the sender wants done with it.
        action: ReplyAction,
    },
}

/// The people of a split and how the bill is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitShares {
    /// `total` shared evenly among `people` (and the sender, with `with_me`).
    Even {
        /// The whole bill in major units, as typed.
        total: Decimal,
        /// Who is asked, in the order typed (the order decides who takes a remainder).
        people: Vec<OwnedUserId>,
        /// `+me` / `--with-me`: the sender is one of the shares (and is asked for nothing).
        with_me: bool,
    },
    /// Each person's share typed out.
    Uneven {
        /// Who pays how much (major units, as typed), in the order typed.
        shares: Vec<(OwnedUserId, Decimal)>,
    },
}

/// What a reply asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyAction {
    /// `!pay` with no arguments: pay the request replied to (amount, currency and payee come
    /// from the request).
    Pay,
    /// `!decline`: decline the request replied to, or a payment held for the sender to accept.
    Decline,
    /// `!cancel`: the requester withdraws the request replied to. When the event replied to
    /// is no request, `!cancel` keeps its ordinary meaning (cancel the payments waiting for
    /// the sender's PIN: `crate::command::Command::Cancel`), so a `!cancel` replying to a
    /// challenge in the DM still works.
    Cancel,
    /// `!accept`: the payee accepts the payment replied to.
    Accept,
    /// `!refund` (all that remains) or `!refund 5.00` (part, in the payment's currency): the
    /// payee refunds the payment whose receipt is replied to.
    Refund {
        /// Major units, as typed; `None`: all that remains.
        amount: Option<Decimal>,
    },
}

/// A reaction's meaning for a request or a payment held for acceptance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// ✅ or 👍: pay the request / accept the payment.
    Yes,
    /// ❌: decline it.
    No,
}

/// Usage of `!request`.
pub const REQUEST_USAGE: &str =
    "!request @user:server AMOUNT CURRENCY [note], e.g. `!request @alice:example.org 12.00 EUR pizza`";
/// Usage of `!split`.
pub const SPLIT_USAGE: &str = "!split AMOUNT CURRENCY @user:server @user:server ... [+me] [note] \
     (even), or !split @user:server AMOUNT @user:server AMOUNT ... CURRENCY [note] (uneven), e.g. \
     `!split 100.00 EUR @a:example.org @b:example.org +me dinner`";
/// Usage of `!refund`.
pub const REFUND_USAGE: &str =
    "reply to the receipt of the payment with !refund (all of it) or !refund AMOUNT (part of it)";
/// Usage of `!decline`.
pub const DECLINE_USAGE: &str = "reply to the request (or the payment) with !decline";
/// Usage of `!accept`.
pub const ACCEPT_USAGE: &str = "reply to the payment's notice with !accept";

/// Parses `text` (a message body, reply fallback already removed: [`strip_reply_fallback`])
/// sent as a reply to `reply_to` (if it is one). `None`: not one of these commands, hand it to
/// [`crate::command::parse`] (`!cancel` and `!pay` that are no replies, and `!pay` with
/// arguments, stay the ordinary commands).
pub fn parse(
    text: &str,
    reply_to: Option<&EventId>,
) -> Option<Result<RequestCommand, CommandError>> {
    let rest = text.trim().strip_prefix('!')?;
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_ascii_lowercase();
    let args: Vec<&str> = words.collect();
    let reply = |action| {
        reply_to.map(|to| {
            Ok(RequestCommand::Reply {
                to: to.to_owned(),
                action,
            })
        })
    };
    match (name.as_str(), args.as_slice()) {
        ("request", args) => Some(parse_request(args)),
        ("split", args) => Some(parse_split(args)),
        ("pay", []) => reply(ReplyAction::Pay),
        ("cancel", []) => reply(ReplyAction::Cancel),
        ("decline", []) => {
            Some(reply(ReplyAction::Decline).unwrap_or(Err(CommandError::Usage(DECLINE_USAGE))))
        }
        ("decline", _) => Some(Err(CommandError::Usage(DECLINE_USAGE))),
        ("accept", []) => {
            Some(reply(ReplyAction::Accept).unwrap_or(Err(CommandError::Usage(ACCEPT_USAGE))))
        }
        ("accept", _) => Some(Err(CommandError::Usage(ACCEPT_USAGE))),
        ("refund", args) => Some(parse_refund(args, reply_to)),
        _ => None,
    }
}

/// The meaning of a reaction key: ✅ and 👍 (any skin tone, with or without the emoji
/// variation selector) say yes, ❌ says no; anything else means nothing.
pub fn parse_reaction(key: &str) -> Option<Reaction> {
    let bare: String = key
        .trim()
        .chars()
        .filter(|c| !matches!(c, '\u{FE0F}' | '\u{1F3FB}'..='\u{1F3FF}'))
        .collect();
    match bare.as_str() {
        "\u{2705}" | "\u{1F44D}" => Some(Reaction::Yes),
        "\u{274C}" => Some(Reaction::No),
        _ => None,
    }
}

/// `body` without a leading reply fallback (one or more lines starting with `> `, then a blank
/// line), as older clients send replies. A quote not followed by a blank line is kept.
pub fn strip_reply_fallback(body: &str) -> &str {
    let mut offset = 0;
    let mut quoted = false;
    for line in body.split_inclusive('\n') {
        let text = line.trim_end_matches(['\n', '\r']);
        if text.starts_with("> ") || text == ">" {
            quoted = true;
            offset += line.len();
        } else if quoted && text.trim().is_empty() {
            return &body[offset + line.len()..];
        } else {
            break;
        }
    }
    body
}

fn parse_request(args: &[&str]) -> Result<RequestCommand, CommandError> {
    match args {
        [payer, amount, currency, memo @ ..] => Ok(RequestCommand::Request {
            payer: parse_user(payer)?,
            amount: parse_amount(amount)?,
            currency: parse_currency(currency)?,
            memo: parse_memo(memo)?,
        }),
        _ => Err(CommandError::Usage(REQUEST_USAGE)),
    }
}

fn is_with_me(word: &str) -> bool {
    word.eq_ignore_ascii_case("+me") || word.eq_ignore_ascii_case("--with-me")
}

fn parse_split(args: &[&str]) -> Result<RequestCommand, CommandError> {
    let Some(first) = args.first() else {
        return Err(CommandError::Usage(SPLIT_USAGE));
    };
    if first.starts_with('@') {
        return parse_uneven_split(args);
    }
    let [total, currency, rest @ ..] = args else {
        return Err(CommandError::Usage(SPLIT_USAGE));
    };
    let total = parse_amount(total)?;
    let currency = parse_currency(currency)?;
    // `+me` may stand anywhere after the currency (people write it first or last).
    let with_me = rest.iter().any(|w| is_with_me(w));
    let rest: Vec<&str> = rest.iter().copied().filter(|w| !is_with_me(w)).collect();
    let named = rest.iter().take_while(|w| w.starts_with('@')).count();
    let people = rest[..named]
        .iter()
        .map(|w| parse_user(w))
        .collect::<Result<Vec<_>, _>>()?;
    if people.is_empty() {
        return Err(CommandError::Usage(SPLIT_USAGE));
    }
    Ok(RequestCommand::Split {
        shares: SplitShares::Even {
            total,
            people,
            with_me,
        },
        currency,
        memo: parse_memo(&rest[named..])?,
    })
}

fn parse_uneven_split(args: &[&str]) -> Result<RequestCommand, CommandError> {
    let mut shares = Vec::new();
    let mut rest = args;
    while let [user, amount, tail @ ..] = rest {
        if !user.starts_with('@') {
            break;
        }
        shares.push((parse_user(user)?, parse_amount(amount)?));
        rest = tail;
    }
    match rest {
        [currency, memo @ ..] if !currency.starts_with('@') && !is_with_me(currency) => {
            if memo.iter().any(|w| is_with_me(w)) {
                // The sender's own part is simply not named in an uneven split.
                return Err(CommandError::Usage(SPLIT_USAGE));
            }
            Ok(RequestCommand::Split {
                shares: SplitShares::Uneven { shares },
                currency: parse_currency(currency)?,
                memo: parse_memo(memo)?,
            })
        }
        _ => Err(CommandError::Usage(SPLIT_USAGE)),
    }
}

fn parse_refund(args: &[&str], reply_to: Option<&EventId>) -> Result<RequestCommand, CommandError> {
    let Some(to) = reply_to else {
        return Err(CommandError::Usage(REFUND_USAGE));
    };
    let amount = match args {
        [] => None,
        [amount] => Some(parse_amount(amount)?),
        _ => return Err(CommandError::Usage(REFUND_USAGE)),
    };
    Ok(RequestCommand::Reply {
        to: to.to_owned(),
        action: ReplyAction::Refund { amount },
    })
}

// The word rules are those of `crate::command` (`!pay`): the same input is accepted or refused
// the same way, with the same sentences. Only amounts differ: a negative one is a number the
// currency check refuses (`invalid_amount`, with a typed receipt), not a typo.

/// A plain decimal, optionally negative: digits with at most one dot; no exponent, comma or
/// symbol.
fn parse_amount(word: &str) -> Result<Decimal, CommandError> {
    let digits = word.strip_prefix('-').unwrap_or(word);
    let plain = digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1
        && digits.chars().any(|c| c.is_ascii_digit());
    if !plain {
        return Err(CommandError::BadAmount(word.to_owned()));
    }
    Decimal::from_str(word).map_err(|_| CommandError::BadAmount(word.to_owned()))
}

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::{event_id, owned_user_id};

    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn request_parses_like_pay() {
        assert_eq!(
            parse("!request @alice:server 12.00 eur pizza and drinks", None),
            Some(Ok(RequestCommand::Request {
                payer: owned_user_id!("@alice:server"),
                amount: dec("12.00"),
                currency: "EUR".into(),
                memo: Some("pizza and drinks".into()),
            }))
        );
        let cases = [
            (
                "!request alice 12 EUR",
                CommandError::BadUser("alice".into()),
            ),
            (
                "!request @alice:server 12,00 EUR",
                CommandError::BadAmount("12,00".into()),
            ),
            (
                "!request @alice:server --1 EUR",
                CommandError::BadAmount("--1".into()),
            ),
            (
                "!request @alice:server 1 EURO",
                CommandError::BadCurrency("EURO".into()),
            ),
            (
                "!request @alice:server 1",
                CommandError::Usage(REQUEST_USAGE),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text, None), Some(Err(expected)), "{text}");
        }
        let long = format!(
            "!request @a:s 1 EUR {}",
            "x".repeat(crate::command::MEMO_CHARS_MAX + 1)
        );
        assert_eq!(parse(&long, None), Some(Err(CommandError::MemoTooLong)));
        // Over-precise amounts parse here; the currency's exponent refuses them later.
        assert!(matches!(
            parse("!request @a:s 12.345 EUR", None),
            Some(Ok(RequestCommand::Request { .. }))
        ));
    }

    #[test]
    fn even_split_with_and_without_me() {
        let even = |text| match parse(text, None) {
            Some(Ok(RequestCommand::Split {
                shares:
                    SplitShares::Even {
                        total,
                        people,
                        with_me,
                    },
                currency,
                memo,
            })) => (total, people.len(), with_me, currency, memo),
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(
            even("!split 100.00 EUR @a:s @b:s @c:s dinner out"),
            (
                dec("100.00"),
                3,
                false,
                "EUR".into(),
                Some("dinner out".into())
            )
        );
        assert_eq!(
            even("!split 100.00 EUR @a:s @b:s --with-me dinner"),
            (dec("100.00"), 2, true, "EUR".into(), Some("dinner".into()))
        );
        assert_eq!(
            even("!split 100 eur +me @a:s"),
            (dec("100"), 1, true, "EUR".into(), None)
        );
        assert_eq!(
            even("!split 100 EUR @a:s @b:s dinner +ME"),
            (dec("100"), 2, true, "EUR".into(), Some("dinner".into()))
        );
        assert_eq!(
            parse("!split 100 EUR dinner", None),
            Some(Err(CommandError::Usage(SPLIT_USAGE)))
        );
        assert_eq!(
            parse("!split 100 EUR @a:s @bob dinner", None),
            Some(Err(CommandError::BadUser("@bob".into())))
        );
        assert_eq!(
            parse("!split", None),
            Some(Err(CommandError::Usage(SPLIT_USAGE)))
        );
    }

    #[test]
    fn uneven_split() {
        assert_eq!(
            parse("!split @a:s 40 @b:s 25.50 EUR taxi home", None),
            Some(Ok(RequestCommand::Split {
                shares: SplitShares::Uneven {
                    shares: vec![
                        (owned_user_id!("@a:s"), dec("40")),
                        (owned_user_id!("@b:s"), dec("25.50")),
                    ]
                },
                currency: "EUR".into(),
                memo: Some("taxi home".into()),
            }))
        );
        // @b's amount is missing: the currency is taken for it and is no amount.
        assert_eq!(
            parse("!split @a:s 40 @b:s EUR", None),
            Some(Err(CommandError::BadAmount("EUR".into())))
        );
        for text in [
            "!split @a:s 40 @b:s",
            "!split @a:s 40",
            "!split @a:s 40 +me EUR",
            "!split @a:s 40 EUR taxi +me",
        ] {
            assert!(
                matches!(parse(text, None), Some(Err(CommandError::Usage(_)))),
                "{text}: {:?}",
                parse(text, None)
            );
        }
        assert_eq!(
            parse("!split @a:s 4o EUR", None),
            Some(Err(CommandError::BadAmount("4o".into())))
        );
    }

    #[test]
    fn replies() {
        let to = event_id!("$req");
        let reply = |action| {
            Some(Ok(RequestCommand::Reply {
                to: to.to_owned(),
                action,
            }))
        };
        assert_eq!(parse("!pay", Some(to)), reply(ReplyAction::Pay));
        assert_eq!(parse(" !PAY ", Some(to)), reply(ReplyAction::Pay));
        assert_eq!(parse("!decline", Some(to)), reply(ReplyAction::Decline));
        assert_eq!(parse("!cancel", Some(to)), reply(ReplyAction::Cancel));
        assert_eq!(parse("!accept", Some(to)), reply(ReplyAction::Accept));
        assert_eq!(
            parse("!refund", Some(to)),
            reply(ReplyAction::Refund { amount: None })
        );
        assert_eq!(
            parse("!refund 5.00", Some(to)),
            reply(ReplyAction::Refund {
                amount: Some(dec("5.00"))
            })
        );
        assert_eq!(
            parse("!refund 5,00", Some(to)),
            Some(Err(CommandError::BadAmount("5,00".into())))
        );
        assert_eq!(
            parse("!refund 5 EUR", Some(to)),
            Some(Err(CommandError::Usage(REFUND_USAGE)))
        );
    }

    #[test]
    fn without_a_reply_the_old_commands_stay_theirs() {
        // Not ours: the ordinary `!pay` and `!cancel` (and chat) go to `crate::command`.
        assert_eq!(parse("!pay", None), None);
        assert_eq!(parse("!cancel", None), None);
        assert_eq!(parse("!pay @b:s 1 EUR", Some(event_id!("$x"))), None);
        assert_eq!(parse("!cancel all", Some(event_id!("$x"))), None);
        assert_eq!(parse("!balance", None), None);
        assert_eq!(parse("hello", None), None);
        // These only make sense as replies: say how to use them.
        assert_eq!(
            parse("!refund", None),
            Some(Err(CommandError::Usage(REFUND_USAGE)))
        );
        assert_eq!(
            parse("!decline", None),
            Some(Err(CommandError::Usage(DECLINE_USAGE)))
        );
        assert_eq!(
            parse("!accept", None),
            Some(Err(CommandError::Usage(ACCEPT_USAGE)))
        );
        assert_eq!(
            parse("!accept now", Some(event_id!("$x"))),
            Some(Err(CommandError::Usage(ACCEPT_USAGE)))
        );
    }

    #[test]
    fn reactions() {
        for yes in ["✅", "👍", "👍️", "👍🏽", " ✅ "] {
            assert_eq!(parse_reaction(yes), Some(Reaction::Yes), "{yes}");
        }
        assert_eq!(parse_reaction("❌"), Some(Reaction::No));
        for nothing in ["👎", "❤️", "ok", "", "✅✅"] {
            assert_eq!(parse_reaction(nothing), None, "{nothing}");
        }
    }

    #[test]
    fn reply_fallback_is_removed() {
        let body = "> <@alice:s> !request @bob:s 12 EUR\n> pizza\n\n!pay";
        assert_eq!(strip_reply_fallback(body), "!pay");
        assert_eq!(
            parse(strip_reply_fallback(body), Some(event_id!("$r"))),
            Some(Ok(RequestCommand::Reply {
                to: event_id!("$r").to_owned(),
                action: ReplyAction::Pay
            }))
        );
        assert_eq!(
            strip_reply_fallback("> quote\nno blank"),
            "> quote\nno blank"
        );
        assert_eq!(strip_reply_fallback("!pay"), "!pay");
    }
}
