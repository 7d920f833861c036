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
         within {}. Ignore this message to cancel.",
        money(amount, currency),
        human_duration(timeout_ms)
    )
}

/// The readable form of a withdrawal challenge.
pub fn withdraw_challenge_body(amount: &str, currency: &str, timeout_ms: u64) -> String {
    format!(
        "🔐 Confirm withdrawing {} from your wallet: send your 4-digit PIN here within {}. \
         Ignore this message to cancel.",
        money(amount, currency),
        human_duration(timeout_ms)
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
    }
}
