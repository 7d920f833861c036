//! The sentences the bot says. Pure functions, so wording is tested without a homeserver.
//! None of them ever includes a PIN.

use crate::ledger::AccountView;
use crate::pipeline::CommandHelp;
use crate::policy::pin::human_duration;

/// The payment commands for `!help`.
pub fn payment_commands() -> Vec<CommandHelp> {
    vec![
        CommandHelp::new(
            "!pay @user:server AMOUNT CURRENCY [note]",
            "pay someone in this room (encrypted rooms only; you confirm with your PIN in our private chat)",
        ),
        CommandHelp::new(
            "!request @user:server AMOUNT CURRENCY [note]",
            "ask someone in this room for money; they reply !pay or react ✅ to pay (with their PIN), ❌ or !decline to decline; reply !cancel to your request to withdraw it",
        ),
        CommandHelp::new(
            "!split AMOUNT CURRENCY @user:server @user:server ... [+me] [note]",
            "split a bill: each person is asked for an equal share (the remainder to the first named; +me counts your own share); uneven: !split @a:server 40 @b:server 25 EUR [note]",
        ),
        CommandHelp::new(
            "!decline",
            "as a reply to a request: decline it (the requester is told); to a payment waiting for you to accept it (or react ❌): send it back",
        ),
        CommandHelp::new(
            "!accept",
            "as a reply to a payment waiting for you to accept it (or react ✅): take it",
        ),
        CommandHelp::new(
            "!refund [AMOUNT]",
            "as a reply to the receipt of a payment you received: give it back, all that remains or AMOUNT of it (with your PIN)",
        ),
        CommandHelp::new(
            "!balance",
            "your balances (answered in our private chat)",
        ),
        CommandHelp::new(
            "!history [count]",
            "your latest payments (answered in our private chat)",
        ),
        CommandHelp::new("!pin set", "choose your 4-digit PIN (in our private chat)"),
        CommandHelp::new("!pin change", "change your PIN (needs the old one)"),
        CommandHelp::new(
            "!withdraw AMOUNT CURRENCY",
            "cash out to the operator's settlement account (confirmed with your PIN)",
        ),
        CommandHelp::new(
            "!cancel",
            "cancel your payments and withdrawals still waiting for your PIN",
        ),
    ]
}

/// `12.50 EUR`.
pub fn money(amount: &str, currency: &str) -> String {
    format!("{amount} {currency}")
}

/// The readable form of a challenge.
pub fn challenge_body(
    amount: &str,
    currency: &str,
    payee: &str,
    room: &str,
    timeout_ms: u64,
) -> String {
    format!(
        "🔐 Confirm paying {} to {payee} (asked in room {room}): send your 4-digit PIN here \
         within {} (as a reply to this message if several payments wait or you answer from \
         another session than the one you asked from). Send !cancel to cancel it now; if no \
         PIN comes in time, nothing is paid.",
        money(amount, currency),
        human_duration(timeout_ms)
    )
}

/// The readable form of a withdrawal challenge.
pub fn withdraw_challenge_body(amount: &str, currency: &str, timeout_ms: u64) -> String {
    format!(
        "🔐 Confirm withdrawing {} from your wallet: send your 4-digit PIN here \
         within {} (as a reply to this message if several payments wait or you answer from \
         another session than the one you asked from). Send !cancel to cancel it now; if no \
         PIN comes in time, nothing is withdrawn.",
        money(amount, currency),
        human_duration(timeout_ms)
    )
}

/// One line naming an open challenge, for the "which one?" question.
pub fn challenge_line(amount: &str, currency: &str, payee: &str, room: &str) -> String {
    format!(
        "• {} to {payee} (asked in room {room})",
        money(amount, currency)
    )
}

/// How a challenge is named when the user must answer it: `5.00 EUR to @bob:hs`, or, without
/// a payee, `the withdrawal of 5.00 EUR`.
pub fn challenge_name(amount: &str, currency: &str, payee: Option<&str>) -> String {
    match payee {
        Some(payee) => format!("{} to {payee}", money(amount, currency)),
        None => format!("the withdrawal of {}", money(amount, currency)),
    }
}

/// A plain PIN came from another session than the one that asked for the payment waiting
/// (`what`, from [`challenge_name`]): it is not used; the user must answer that challenge by
/// name, after seeing what it confirms.
pub fn pin_from_other_device(what: &str) -> String {
    format!(
        "This PIN came from another of your sessions than the one that asked for the payment          waiting, so I did not use it (it was not checked and counts as no attempt) and          removed it. To confirm, reply to the challenge for {what} with your PIN. If you did          not ask for it, send !cancel."
    )
}

/// Several challenges are open and a PIN did not say which one it confirms.
pub fn which_challenge(lines: &[String]) -> String {
    format!(
        "Several payments are waiting for your PIN, so I did not use this one (it was not \
         checked and counts as no attempt):\n{}\nReply to the confirmation message of the \
         payment you mean with your PIN, or send !cancel to cancel all of them.",
        lines.join("\n")
    )
}

/// Why a `!pay` / transfer intent (or, with `withdrawal`, a `!withdraw`) that reached the bot
/// too late started nothing. `sent_ms` is the event's `origin_server_ts`; times are UTC (the
/// bot does not know the user's time zone).
pub fn too_late(withdrawal: bool, sent_ms: u64, now_ms: u64) -> String {
    let age_ms = now_ms.saturating_sub(sent_ms);
    let (what, nothing, again) = if withdrawal {
        ("withdrawal request", "nothing was withdrawn", "withdraw")
    } else {
        ("payment request", "nothing was paid", "pay")
    };
    format!(
        "this {what} arrived too late (sent {}, over {} ago); {nothing}. Send it again if you \
         still want to {again}.",
        utc_time(sent_ms, age_ms >= DAY_MS),
        age_floor(age_ms)
    )
}

const DAY_MS: u64 = 24 * 3_600_000;

/// `HH:MM UTC`, with the date first (`YYYY-MM-DD HH:MM UTC`) when `with_date`.
fn utc_time(at_ms: u64, with_date: bool) -> String {
    let minutes = at_ms / 60_000;
    let (hour, minute) = ((minutes / 60) % 24, minutes % 60);
    if !with_date {
        return format!("{hour:02}:{minute:02} UTC");
    }
    let (year, month, day) = civil_date(at_ms / DAY_MS);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02} UTC")
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// for non-negative day counts).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// An age rounded down, for "over N ... ago": seconds below 2 minutes, minutes below 2 hours,
/// hours below 2 days, then days.
fn age_floor(age_ms: u64) -> String {
    let seconds = age_ms / 1_000;
    let (n, unit) = if seconds < 120 {
        (seconds, "second")
    } else if seconds < 2 * 3_600 {
        (seconds / 60, "minute")
    } else if seconds < 2 * 86_400 {
        (seconds / 3_600, "hour")
    } else {
        (seconds / 86_400, "day")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Balances, one line per currency.
pub fn balances(views: &[(AccountView, String, String)]) -> String {
    if views.is_empty() {
        return "Your wallet is empty.".to_owned();
    }
    let mut text = String::from("Your balances:");
    for (view, available, reserved) in views {
        text.push_str(&format!("\n• {}: {available}", view.id.currency));
        if view.balances.debits_pending_minor > 0 {
            text.push_str(&format!(" ({reserved} reserved)"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_request_says_when_it_was_sent_and_that_nothing_happened() {
        // 2026-11-25 14:05:30 UTC, seen 7.5 minutes later.
        let sent_ms = 1_795_615_530_000;
        let text = too_late(false, sent_ms, sent_ms + 450_000);
        assert_eq!(
            text,
            "this payment request arrived too late (sent 14:05 UTC, over 7 minutes ago); \
             nothing was paid. Send it again if you still want to pay."
        );
        let text = too_late(true, sent_ms, sent_ms + 90_000);
        assert!(text.contains("withdrawal request") && text.contains("over 90 seconds ago"));
        assert!(text.contains("nothing was withdrawn"), "{text}");
        // A day or more later the date is shown too.
        let text = too_late(false, sent_ms, sent_ms + 3 * DAY_MS);
        assert!(
            text.contains("sent 2026-11-25 14:05 UTC, over 3 days ago"),
            "{text}"
        );
        assert_eq!(age_floor(3 * 3_600_000 + 59 * 60_000), "3 hours");
        assert_eq!(age_floor(60_000 * 2), "2 minutes");
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(11_017), (2000, 3, 1));
    }

    #[test]
    fn a_pin_from_another_session_is_told_which_challenge_to_reply_to() {
        let text = pin_from_other_device(&challenge_name("5.00", "EUR", Some("@bob:hs")));
        assert!(
            text.contains("reply to the challenge for 5.00 EUR to @bob:hs with your PIN"),
            "{text}"
        );
        let text = pin_from_other_device(&challenge_name("5.00", "EUR", None));
        assert!(
            text.contains("reply to the challenge for the withdrawal of 5.00 EUR"),
            "{text}"
        );
    }

    #[test]
    fn challenge_names_amount_payee_room_and_time() {
        let body = challenge_body("12.50", "EUR", "@bob:hs", "!room", 120_000);
        for part in ["12.50 EUR", "@bob:hs", "!room", "2 minutes", "PIN"] {
            assert!(body.contains(part), "{body}");
        }
        assert!(payment_commands()
            .iter()
            .any(|c| c.usage.starts_with("!pay")));
        assert!(payment_commands()
            .iter()
            .any(|c| c.usage.starts_with("!cancel")));
        // The text promises only what exists: a real cancel, no "ignore to cancel".
        for body in [body, withdraw_challenge_body("5", "EUR", 60_000)] {
            assert!(body.contains("!cancel") && body.contains("reply"), "{body}");
            assert!(!body.contains("Ignore"), "{body}");
        }
    }
}
