//! The sentences the bot says about requests. Pure functions, so wording is tested without a
//! homeserver. Amounts come in already formatted (`12.00`, see [`super::split::format_minor`]).

use matrix_sdk::ruma::UserId;

use super::state::{Request, ShareState};
use crate::events::RequestState;

fn what_for(memo: Option<&str>) -> String {
    memo.map(|m| format!(" ({m})")).unwrap_or_default()
}

/// The notice (and typed event `body`) of a request naming one payer; sent as `m.text`
/// mentioning the payer, so it notifies them.
pub fn request_notice(
    requester: &UserId,
    payer: &UserId,
    amount: &str,
    currency: &str,
    memo: Option<&str>,
) -> String {
    format!(
        "💸 {requester} asks {payer} for {amount} {currency}{}. Reply !pay or react ✅ to pay, ❌ to decline.",
        what_for(memo)
    )
}

/// The notice of a request open to everyone in the room.
pub fn open_request_notice(
    requester: &UserId,
    amount: &str,
    currency: &str,
    memo: Option<&str>,
) -> String {
    format!(
        "💸 {requester} asks anyone here for {amount} {currency}{}. Reply !pay or react ✅ to pay.",
        what_for(memo)
    )
}

/// The summary notice of a split: who is asked for what (`shares`, from
/// [`super::split::SplitPlan::describe`]), edited as payments arrive ([`split_progress`]).
pub fn split_notice(
    requester: &UserId,
    total: &str,
    currency: &str,
    memo: Option<&str>,
    shares: &str,
) -> String {
    format!(
        "💸 {requester} splits {total} {currency}{}: {shares}. Reply !pay or react ✅ to pay your share, ❌ to decline.",
        what_for(memo)
    )
}

/// One line per payer of a request as it stands at `now_ms`, for the edited summary:
/// "✅ @a:s 33.34", "⏳ @b:s 33.33" (open), "❌" declined, "🚫" cancelled, "⌛" expired.
/// `format` turns minor units into the shown amount.
pub fn split_progress(request: &Request, now_ms: u64, format: impl Fn(u128) -> String) -> String {
    request
        .shares()
        .iter()
        .map(|share| {
            let mark = match request.live_state(share, now_ms) {
                ShareState::Open | ShareState::Paying { .. } => "⏳",
                ShareState::Paid { .. } => "✅",
                ShareState::Declined { .. } => "❌",
                ShareState::Cancelled { .. } => "🚫",
                ShareState::Expired { .. } => "⌛",
            };
            format!("{mark} {} {}", share.payer, format(share.amount_minor))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The status `body` when `payer` paid their part: "✅ @bob paid 33.34 EUR to @alice (dinner):
/// 1 of 3 paid." (without "N of M" for a single payer or an open request).
pub fn paid_status(
    payer: &UserId,
    requester: &UserId,
    amount: &str,
    currency: &str,
    memo: Option<&str>,
    paid_count: u32,
    payer_count: Option<u32>,
) -> String {
    let progress = match payer_count {
        Some(count) if count > 1 => format!(": {paid_count} of {count} paid"),
        _ => String::new(),
    };
    format!(
        "✅ {payer} paid {amount} {currency} to {requester}{}{progress}.",
        what_for(memo)
    )
}

/// The status `body` when a request (or one payer's part) ended without a payment.
pub fn ended_status(
    state: RequestState,
    requester: &UserId,
    payer: Option<&UserId>,
    amount: &str,
    currency: &str,
    memo: Option<&str>,
) -> String {
    let to = payer.map(|p| format!(" to {p}")).unwrap_or_default();
    let memo = what_for(memo);
    match state {
        RequestState::Declined => format!(
            "❌ {} declined the request of {requester} for {amount} {currency}{memo}.",
            payer.map(|p| p.as_str()).unwrap_or("the payer")
        ),
        RequestState::Cancelled => {
            format!("🚫 {requester} cancelled the request{to} for {amount} {currency}{memo}.")
        }
        RequestState::Expired => {
            format!(
                "⌛ The request of {requester}{to} for {amount} {currency}{memo} expired unpaid."
            )
        }
        RequestState::Open | RequestState::Paid => {
            format!(
                "💸 The request of {requester}{to} for {amount} {currency}{memo} is {}.",
                state.code()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::user_id;

    use super::*;

    /// The bodies in docs/events.md's examples are what these functions say.
    #[test]
    fn the_documented_bodies_are_the_bots_words() {
        let (alice, bob) = (user_id!("@alice:example.org"), user_id!("@bob:example.org"));
        let docs = include_str!("../../docs/events.md");
        let request = request_notice(alice, bob, "12.00", "EUR", Some("pizza"));
        assert!(
            docs.contains(&format!("\"body\": \"{request}\"")),
            "{request}"
        );
        let paid = paid_status(bob, alice, "33.34", "EUR", Some("dinner"), 1, Some(3));
        assert!(docs.contains(&format!("\"body\": \"{paid}\"")), "{paid}");
        let cancelled = ended_status(
            RequestState::Cancelled,
            alice,
            Some(bob),
            "12.00",
            "EUR",
            Some("pizza"),
        );
        assert!(
            docs.contains(&format!("\"body\": \"{cancelled}\"")),
            "{cancelled}"
        );
    }

    #[test]
    fn wording() {
        let (alice, bob) = (user_id!("@alice:s"), user_id!("@bob:s"));
        assert_eq!(
            open_request_notice(alice, "4.20", "EUR", None),
            "💸 @alice:s asks anyone here for 4.20 EUR. Reply !pay or react ✅ to pay."
        );
        assert_eq!(
            split_notice(
                alice,
                "100.00",
                "EUR",
                Some("dinner"),
                "33.34 from @a:s, 33.33 from @b:s and @c:s"
            ),
            "💸 @alice:s splits 100.00 EUR (dinner): 33.34 from @a:s, 33.33 from @b:s and @c:s. \
             Reply !pay or react ✅ to pay your share, ❌ to decline."
        );
        assert_eq!(
            paid_status(bob, alice, "12.00", "EUR", None, 1, Some(1)),
            "✅ @bob:s paid 12.00 EUR to @alice:s."
        );
        assert_eq!(
            ended_status(
                RequestState::Declined,
                alice,
                Some(bob),
                "12.00",
                "EUR",
                None
            ),
            "❌ @bob:s declined the request of @alice:s for 12.00 EUR."
        );
        assert_eq!(
            ended_status(
                RequestState::Expired,
                alice,
                None,
                "4.20",
                "EUR",
                Some("coffee")
            ),
            "⌛ The request of @alice:s for 4.20 EUR (coffee) expired unpaid."
        );
    }
}
