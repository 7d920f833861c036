//! The sentences the bot says. Pure functions, so wording is tested without a homeserver.
//! None of them ever includes a PIN.

use crate::handler::CommandHelp;
use crate::ledger::AccountView;
use crate::policy::pin::human_duration;

/// The payment commands for `!help`.
pub fn payment_commands() -> Vec<CommandHelp> {
    vec![
        CommandHelp::new(
            "!pay @user:server AMOUNT CURRENCY [note]",
            "pay someone in this room (encrypted rooms only; you confirm with your PIN in our private chat)",
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
         within {} (if several payments wait, as a reply to this message). Send !cancel to \
         cancel it now; if no PIN comes in time, nothing is paid.",
        money(amount, currency),
        human_duration(timeout_ms)
    )
}

/// The readable form of a withdrawal challenge.
pub fn withdraw_challenge_body(amount: &str, currency: &str, timeout_ms: u64) -> String {
    format!(
        "🔐 Confirm withdrawing {} from your wallet: send your 4-digit PIN here \
         within {} (if several payments wait, as a reply to this message). Send !cancel to \
         cancel it now; if no PIN comes in time, nothing is withdrawn.",
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

/// Several challenges are open and a PIN did not say which one it confirms.
pub fn which_challenge(lines: &[String]) -> String {
    format!(
        "Several payments are waiting for your PIN, so I did not use this one (it was not \
         checked and counts as no attempt):\n{}\nReply to the confirmation message of the \
         payment you mean with your PIN, or send !cancel to cancel all of them.",
        lines.join("\n")
    )
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
