//! MSC4391: the bot describes its commands in rooms where it may send state, so supporting
//! clients offer them as slash commands; an invocation is handled like the typed command.

use matrix_sdk::ruma::UserId;
use serde_json::{json, Value};

use super::{scene, wait_notice};
use crate::support;

#[tokio::test]
async fn the_bot_describes_its_commands_in_the_dm_and_answers_an_invocation() {
    let s = scene("msc4391", 120_000, "20.00").await;
    let bot = UserId::parse(s.bot.as_str()).unwrap();
    let token = s.alice.inner().access_token().expect("logged in");
    let state_key = mxpay::events::bot_command::state_key("pay", &bot);
    let url = format!(
        "{}/_matrix/client/v3/rooms/{}/state/org.matrix.msc4391.command_description/{}",
        support::synapse().url,
        s.dm,
        url::form_urlencoded::byte_serialize(state_key.as_bytes()).collect::<String>()
    );
    let pay: Value = support::eventually("the bot's description of !pay", || async {
        let response = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    })
    .await;
    assert_eq!(pay["command"], "pay");
    assert_eq!(pay["parameters"][0]["key"], "payee");

    // A client's structured invocation (its body is the client's own text).
    s.alice
        .room(&s.dm)
        .await
        .send_raw(
            "m.room.message",
            json!({
                "msgtype": "m.text",
                "body": "/balance",
                "m.mentions": { "user_ids": [s.bot] },
                "org.matrix.msc4391.command": { "command": "balance", "arguments": {} },
            }),
        )
        .await
        .expect("send the invocation");
    wait_notice(&s.alice, &s.dm, &s.bot, "EUR: 20.00").await;
}
