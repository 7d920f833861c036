//! Recognises the events that carry a PIN, whatever their shape. Pure: no I/O, no policy.
//!
//! A person may send their PIN as a plain message, but also as an edit of an earlier message
//! (`m.replace`: the new text is in `m.new_content`), as a reply (the body then starts with a
//! reply fallback, `> ` lines and a blank line; the HTML has an `<mx-reply>` block), as an
//! `m.notice` or `m.emote`, or with spaces around it; a client may send an
//! `org.mxpay.stepup.response`. Every one of these must be seen, so a PIN is never left
//! standing in a room because of its shape. Where such a message counts as a PIN answer, and
//! where it is only chat, is the payment flow's decision ([`super::Payments`]).

use ruma::OwnedEventId;
use serde_json::Value;

use crate::policy::pin::Pin;

/// The message types whose text is read for a PIN.
const TEXT_MSGTYPES: [&str; 3] = ["m.text", "m.notice", "m.emote"];

/// An event that carries a PIN, or a field meant to hold one. Its Debug form hides the PIN.
#[derive(Debug)]
pub struct PinMessage {
    /// The PIN. `None` when an `org.mxpay.stepup.response` has a `pin` field that is not
    /// exactly 4 digits: it may be a mistyped PIN, so it is redacted all the same, but it is
    /// never compared.
    pub pin: Option<Pin>,
    /// The event says it holds a PIN (`org.mxpay.stepup.response`), as opposed to a chat
    /// message whose text looks like one.
    pub declared: bool,
    /// The challenge a step-up response names.
    pub challenge_id: Option<String>,
    /// The event a reply answers (`m.relates_to.m.in_reply_to`).
    pub reply_to: Option<String>,
    /// The event an edit replaces (`m.relates_to` with `rel_type: m.replace`): the message as
    /// people see it is the edit, so it goes with it.
    pub replaces: Option<OwnedEventId>,
}

/// The PIN an event carries, if it carries one (or an `org.mxpay.stepup.response` carries a
/// `pin` field at all). `None` for everything else, including a step-up response without a
/// `pin` field.
pub fn recognise(event_type: &str, content: &Value) -> Option<PinMessage> {
    match event_type {
        "m.room.message" => recognise_message(content),
        "org.mxpay.stepup.response" => {
            let field = content.get("pin")?;
            Some(PinMessage {
                pin: field.as_str().and_then(|p| Pin::parse(p).ok()),
                declared: true,
                challenge_id: content
                    .get("challenge_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                reply_to: reply_to(content),
                replaces: None,
            })
        }
        _ => None,
    }
}

fn recognise_message(content: &Value) -> Option<PinMessage> {
    let relates_to = content.get("m.relates_to");
    let is_edit = relates_to
        .and_then(|r| r.get("rel_type"))
        .and_then(Value::as_str)
        == Some("m.replace");
    // An edit's text is in `m.new_content`; its top-level body is the fallback for clients
    // that do not know edits (`* 1234`). Either one holding a PIN is enough.
    let new_content = content
        .get("m.new_content")
        .filter(|new| is_edit && new.is_object());
    let pin = new_content
        .and_then(|new| text_pin(new, false))
        .or_else(|| text_pin(content, is_edit))?;
    let replaces = if is_edit {
        relates_to
            .and_then(|r| r.get("event_id"))
            .and_then(Value::as_str)
            .and_then(|id| OwnedEventId::try_from(id).ok())
    } else {
        None
    };
    Some(PinMessage {
        pin: Some(pin),
        declared: false,
        challenge_id: None,
        reply_to: reply_to(content),
        replaces,
    })
}

fn reply_to(content: &Value) -> Option<String> {
    content
        .pointer("/m.relates_to/m.in_reply_to/event_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The PIN in a message content's text: its `body` without a reply fallback (and, for an
/// edit's top-level content, without the `* ` edit marker), or else its `formatted_body`
/// without the `<mx-reply>` block. Surrounding whitespace is ignored ([`Pin::parse`]).
fn text_pin(content: &Value, edit_fallback: bool) -> Option<Pin> {
    let msgtype = content.get("msgtype").and_then(Value::as_str)?;
    if !TEXT_MSGTYPES.contains(&msgtype) {
        return None;
    }
    let from_body = content
        .get("body")
        .and_then(Value::as_str)
        .and_then(|body| {
            let text = strip_reply_fallback(body);
            let text = if edit_fallback {
                text.trim_start().strip_prefix('*').unwrap_or(text)
            } else {
                text
            };
            Pin::parse(text).ok()
        });
    from_body.or_else(|| {
        content
            .get("formatted_body")
            .and_then(Value::as_str)
            .and_then(|html| Pin::parse(strip_mx_reply(html)).ok())
    })
}

/// `body` without a leading reply fallback: one or more lines starting with `> ` (or just
/// `>`), then a blank line. A quote that is not followed by a blank line is kept.
fn strip_reply_fallback(body: &str) -> &str {
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

/// `formatted_body` without a leading `<mx-reply>…</mx-reply>` block.
fn strip_mx_reply(html: &str) -> &str {
    const END: &str = "</mx-reply>";
    if !html.trim_start().starts_with("<mx-reply>") {
        return html;
    }
    match html.find(END) {
        Some(at) => &html[at + END.len()..],
        None => html,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(content: Value) -> Option<PinMessage> {
        recognise("m.room.message", &content)
    }

    fn is_pin(message: &Option<PinMessage>, pin: &str) -> bool {
        message
            .as_ref()
            .and_then(|m| m.pin.as_ref())
            .is_some_and(|p| *p == Pin::parse(pin).unwrap())
    }

    #[test]
    fn plain_messages_of_every_text_type_with_whitespace() {
        for msgtype in ["m.text", "m.notice", "m.emote"] {
            for body in ["4821", " 4821 ", "\n4821\t\n", "\u{a0}4821"] {
                let found = message(json!({"msgtype": msgtype, "body": body}));
                assert!(is_pin(&found, "4821"), "{msgtype} {body:?}");
                let found = found.unwrap();
                assert!(!found.declared && found.replaces.is_none() && found.reply_to.is_none());
            }
        }
        for not_a_pin in [
            json!({"msgtype": "m.text", "body": "1990 was a good year"}),
            json!({"msgtype": "m.text", "body": "12345"}),
            json!({"msgtype": "m.text", "body": "48 21"}),
            json!({"msgtype": "m.image", "body": "4821"}),
            json!({"msgtype": "m.text"}),
            json!({"body": "4821"}),
            json!({"msgtype": "m.text", "body": "> 4821"}),
        ] {
            assert!(message(not_a_pin.clone()).is_none(), "{not_a_pin}");
        }
        assert!(recognise("m.sticker", &json!({"body": "4821"})).is_none());
    }

    #[test]
    fn edits_carry_the_pin_in_new_content_and_name_the_original() {
        let edit = message(json!({
            "msgtype": "m.text",
            "body": "* 4821",
            "m.new_content": {"msgtype": "m.text", "body": "4821"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$original"},
        }));
        assert!(is_pin(&edit, "4821"));
        assert_eq!(edit.unwrap().replaces.unwrap().as_str(), "$original");

        // The new text alone decides, whatever the fallback says...
        let edit = message(json!({
            "msgtype": "m.text",
            "body": "* (edited)",
            "m.new_content": {"msgtype": "m.notice", "body": " 4821\n"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$original"},
        }));
        assert!(is_pin(&edit, "4821"));
        // ...and a fallback holding a PIN is enough too (an odd client), `*` marker or not.
        for body in ["* 4821", "*4821", "4821"] {
            let edit = message(json!({
                "msgtype": "m.text",
                "body": body,
                "m.new_content": {"msgtype": "m.text", "body": "hello"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": "$original"},
            }));
            assert!(is_pin(&edit, "4821"), "{body}");
        }
        // An edit without m.new_content: the fallback is read.
        let bare = message(json!({
            "msgtype": "m.text",
            "body": "* 4821",
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$original"},
        }));
        assert!(is_pin(&bare, "4821"));
        // An edit to ordinary text is nothing; "* 4821" outside an edit is text, not a PIN.
        assert!(message(json!({
            "msgtype": "m.text",
            "body": "* hello",
            "m.new_content": {"msgtype": "m.text", "body": "hello"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$original"},
        }))
        .is_none());
        assert!(message(json!({"msgtype": "m.text", "body": "* 4821"})).is_none());
        // m.new_content without an m.replace relation is not an edit.
        assert!(message(json!({
            "msgtype": "m.text",
            "body": "hello",
            "m.new_content": {"msgtype": "m.text", "body": "4821"},
        }))
        .is_none());
    }

    #[test]
    fn replies_are_read_without_their_fallback() {
        let reply = message(json!({
            "msgtype": "m.text",
            "body": "> <@_mxpay:hs> 🔐 Confirm paying 12.50 EUR\n> to @bob:hs\n\n4821",
            "format": "org.matrix.custom.html",
            "formatted_body": "<mx-reply><blockquote>Confirm</blockquote></mx-reply>4821",
            "m.relates_to": {"m.in_reply_to": {"event_id": "$notice"}},
        }));
        assert!(is_pin(&reply, "4821"));
        assert_eq!(reply.unwrap().reply_to.as_deref(), Some("$notice"));
        // CRLF line ends, a bare `>` line, spaces around.
        let reply = message(json!({
            "msgtype": "m.text",
            "body": "> <@a:hs> hi\r\n>\r\n\r\n 4821 ",
        }));
        assert!(is_pin(&reply, "4821"));
        // Only the HTML holds the PIN (the body is something else).
        let html = message(json!({
            "msgtype": "m.text",
            "body": "> quoted",
            "formatted_body": "<mx-reply><blockquote>q</blockquote></mx-reply> 4821",
        }));
        assert!(is_pin(&html, "4821"));
        // A quote with more text is not a PIN; nor is text after the fallback.
        assert!(message(json!({"msgtype": "m.text", "body": "> 4821\n\nsee above"})).is_none());
        assert!(message(json!({"msgtype": "m.text", "body": "> a\n4821"})).is_none());
        assert_eq!(strip_reply_fallback("> a\n> b\n\nrest"), "rest");
        assert_eq!(strip_reply_fallback("> only a quote"), "> only a quote");
        assert_eq!(strip_mx_reply("<mx-reply>x</mx-reply>1"), "1");
        assert_eq!(strip_mx_reply("<p>1</p>"), "<p>1</p>");
    }

    #[test]
    fn every_stepup_response_with_a_pin_field_is_recognised() {
        let valid = recognise(
            "org.mxpay.stepup.response",
            &json!({"body": "PIN confirmation", "challenge_id": "c1", "pin": "4821"}),
        )
        .unwrap();
        assert!(valid.declared);
        assert_eq!(valid.challenge_id.as_deref(), Some("c1"));
        assert_eq!(valid.pin, Some(Pin::parse("4821").unwrap()));
        // Not four digits: still recognised (to be redacted), with no PIN to compare.
        for pin in [
            json!("12345"),
            json!("12a4"),
            json!(""),
            json!(4821),
            json!(null),
        ] {
            let found = recognise(
                "org.mxpay.stepup.response",
                &json!({"body": "PIN", "challenge_id": "c1", "pin": pin}),
            )
            .unwrap_or_else(|| panic!("{pin} not recognised"));
            assert!(found.declared && found.pin.is_none(), "{pin}");
        }
        // No pin field: nothing to redact.
        assert!(recognise(
            "org.mxpay.stepup.response",
            &json!({"body": "PIN", "challenge_id": "c1"})
        )
        .is_none());
    }

    #[test]
    fn debug_hides_the_pin() {
        let found = message(json!({"msgtype": "m.text", "body": "4821"})).unwrap();
        let debug = format!("{found:?} {found:#?}");
        assert!(!debug.contains("4821"), "{debug}");
    }
}
