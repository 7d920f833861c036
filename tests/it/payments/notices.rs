//! Notices the bot could not deliver at once (no DM it knew of) wait durably and go out, in
//! order, once the user's DM is ready: issue 16's lost top-up notices.

use super::{open_dm, payments_lease, send_text, topup, wait_notice};
use crate::support::{self, MxpayProcess, TestClient};

/// Waits until the outbox handled `count` notices it could not send for lack of a DM (so the
/// user's next message is what delivers them, not a DM the bot already knew). Matches the
/// log line of mxpay before the fix too ("no private chat to tell about ..."), so on that code
/// the test fails where the notice does not arrive.
async fn wait_queued(mxpay: &MxpayProcess, count: usize) {
    support::eventually("the outbox to handle the top-ups", || async {
        let log = mxpay.log();
        let handled = log.matches("waits for one").count()
            + log.matches("no private chat to tell about").count();
        (handled >= count).then_some(())
    })
    .await;
}

/// Index of the first bot message in `client`'s timeline whose body contains `part`.
fn position(client: &TestClient, bot: &str, part: &str) -> usize {
    client
        .seen_events()
        .iter()
        .position(|e| {
            e.sender() == bot
                && e.event_type() == "m.room.message"
                && e.body().is_some_and(|b| b.contains(part))
        })
        .unwrap_or_else(|| panic!("no bot message containing {part:?}"))
}

/// A user whose DM with the bot exists (bot joined, encrypted, the two of them) but who never
/// wrote there is topped up twice; the notices wait across a restart of mxpay, and when the
/// user writes `!balance` in the DM both arrive, in the order of the top-ups.
#[tokio::test]
async fn top_ups_before_the_first_message_in_the_dm_are_told_once_the_user_writes() {
    let alice_user = support::user("alice").await;
    let (lease, admin_key) = payments_lease("notices-dm", 120_000).await;
    let mut mxpay = MxpayProcess::start(&lease).await;
    let bot = lease.spec.bot_user_id();
    let alice = support::client(&alice_user).await;
    alice.bootstrap_cross_signing().await;
    let dm = open_dm(&alice, &bot).await;
    let who = alice.user.user_id.as_str();
    topup(&mxpay.url, &admin_key, who, "5.00", "EUR").await;
    topup(&mxpay.url, &admin_key, who, "7.00", "EUR").await;
    wait_queued(&mxpay, 2).await;
    // Durably: what waits survives a restart.
    mxpay.restart().await;

    send_text(&alice, &dm, "!balance").await;
    wait_notice(&alice, &dm, &bot, "topped up with 5").await;
    wait_notice(&alice, &dm, &bot, "topped up with 7").await;
    assert!(
        position(&alice, &bot, "topped up with 5") < position(&alice, &bot, "topped up with 7"),
        "the notices keep the order of the top-ups"
    );
    // Once the DM is known, the next top-up is told at once.
    topup(&mxpay.url, &admin_key, who, "1.00", "EUR").await;
    wait_notice(&alice, &dm, &bot, "topped up with 1").await;
}

/// A user with no DM at all is topped up; the notice waits until they open a DM with the bot
/// and write anything there (not a command).
#[tokio::test]
async fn a_top_up_to_a_user_without_a_dm_is_told_in_the_dm_they_open_later() {
    let bob_user = support::user("bob").await;
    let (lease, admin_key) = payments_lease("notices-nodm", 120_000).await;
    let mxpay = MxpayProcess::start(&lease).await;
    let bot = lease.spec.bot_user_id();
    let bob = support::client(&bob_user).await;
    // The bot shares DM room keys only with cross-signed sessions.
    bob.bootstrap_cross_signing().await;
    topup(
        &mxpay.url,
        &admin_key,
        bob.user.user_id.as_str(),
        "3.00",
        "EUR",
    )
    .await;
    wait_queued(&mxpay, 1).await;

    let dm = open_dm(&bob, &bot).await;
    send_text(&bob, &dm, "hello").await;
    wait_notice(&bob, &dm, &bot, "topped up with 3").await;
}
