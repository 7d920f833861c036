//! What the payment layer writes into a ledger transfer's opaque memo: enough to tell the room
//! about the transfer later (room, the event that asked, the note), so the ledger's journal is
//! also the outbox's durable record.

use serde::{Deserialize, Serialize};

use crate::ledger::MEMO_BYTES_MAX;

/// The kind of payment a memo belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoKind {
    /// A payment between two users, asked for in `room`.
    Pay,
    /// A withdrawal to the settlement account.
    Withdraw,
}

/// A payment memo, stored as compact JSON: `{"mxpay":"pay","room":"!r","event":"$e","note":"lunch"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentMemo {
    /// Kind; the key also marks the memo as mxpay's.
    #[serde(rename = "mxpay")]
    pub kind: MemoKind,
    /// The room the payment was asked for in.
    pub room: String,
    /// The event that asked for it (receipts reference it).
    pub event: String,
    /// The payer's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The payment request this payment pays (the request's id: the event that asked), so
    /// the outbox records it paid once the money moved, and the receipt names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The payment this one refunds, so its receipt names the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<RefundMemo>,
}

/// What a refund's memo says of the payment it refunds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundMemo {
    /// The original transfer, as the decimal string of its id.
    pub of: String,
    /// The bot's receipt of the original that `!refund` replied to.
    pub receipt: String,
}

impl PaymentMemo {
    /// The memo bytes, at most [`MEMO_BYTES_MAX`]: the note is shortened if needed, in one
    /// pass over it (cutting a char at a time and serialising again was quadratic in the
    /// note's length).
    pub fn encode(&self) -> Vec<u8> {
        let bytes = serde_json::to_vec(self).expect("memo serialises");
        if bytes.len() <= MEMO_BYTES_MAX {
            return bytes;
        }
        let Some(note) = &self.note else {
            // Room and event ids are at most 255 bytes each (three of them with a request or a
            // refund, a refund's transfer id 39 digits): without a note the memo fits.
            return bytes;
        };
        let mut memo = self.clone();
        memo.note = Some(String::new());
        let base = serde_json::to_vec(&memo).expect("memo serialises").len();
        let keep = note_prefix_len(note, MEMO_BYTES_MAX.saturating_sub(base));
        memo.note = (keep > 0).then(|| note[..keep].to_owned());
        let bytes = serde_json::to_vec(&memo).expect("memo serialises");
        debug_assert!(bytes.len() <= MEMO_BYTES_MAX, "the cut note fits");
        bytes
    }

    /// Reads a memo; `None` for memos that are not mxpay's (e.g. an admin top-up's).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The length in bytes of the longest prefix of `note` whose JSON string form (without the
/// quotes) takes at most `budget_bytes`, cut at a char boundary. One pass.
fn note_prefix_len(note: &str, budget_bytes: usize) -> usize {
    let mut used = 0;
    for (at, c) in note.char_indices() {
        used += json_escaped_len(c);
        if used > budget_bytes {
            return at;
        }
    }
    note.len()
}

/// How many bytes `c` takes inside a JSON string as serde_json writes it: `\"` and `\\`,
/// the short escapes of control characters, `\u00XX` for the other control characters, the
/// UTF-8 bytes for everything else.
fn json_escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        '\u{0}'..='\u{1f}' => 6,
        _ => c.len_utf8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_memos() {
        let memo = PaymentMemo {
            kind: MemoKind::Pay,
            room: "!r".into(),
            event: "$e".into(),
            note: Some("lunch".into()),
            request: None,
            refund: None,
        };
        let bytes = memo.encode();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"mxpay":"pay","room":"!r","event":"$e","note":"lunch"}"#
        );
        assert_eq!(PaymentMemo::decode(&bytes), Some(memo));
        assert_eq!(PaymentMemo::decode(b"top-up from bank ref 42"), None);
        assert_eq!(PaymentMemo::decode(br#"{"ref":"x"}"#), None);
    }

    #[test]
    fn long_notes_are_cut_to_fit() {
        let memo = PaymentMemo {
            kind: MemoKind::Pay,
            room: format!("!{}", "r".repeat(250)),
            event: format!("${}", "e".repeat(250)),
            note: Some("\u{1}".repeat(140)),
            request: Some(format!("${}", "q".repeat(250))),
            refund: None,
        };
        let bytes = memo.encode();
        assert!(bytes.len() <= MEMO_BYTES_MAX);
        assert!(PaymentMemo::decode(&bytes).is_some());
        // A refund pays no request: its original's id and receipt take the request's place.
        let refund = PaymentMemo {
            request: None,
            refund: Some(RefundMemo {
                of: u128::MAX.to_string(),
                receipt: format!("${}", "x".repeat(250)),
            }),
            ..memo
        };
        let bytes = refund.encode();
        assert!(bytes.len() <= MEMO_BYTES_MAX);
        assert_eq!(
            PaymentMemo::decode(&bytes).and_then(|m| m.refund),
            refund.refund
        );
    }

    /// The escape lengths the one-pass cut counts are serde_json's own.
    #[test]
    fn escaped_lengths_match_serde_json() {
        for c in (0u32..0x3000)
            .chain([0x1F600, 0x10FFFF])
            .filter_map(char::from_u32)
        {
            let quoted = serde_json::to_string(&c.to_string()).unwrap();
            assert_eq!(json_escaped_len(c), quoted.len() - 2, "{c:?}");
        }
    }

    /// The cut keeps the longest note that fits, in one pass, whatever the note holds: a
    /// long note (the old cut serialised the memo again for every char it removed) of mixed
    /// escapes and multi-byte chars is cut to exactly fill the memo.
    #[test]
    fn the_cut_keeps_the_longest_note_that_fits() {
        let note: String = "a\"é\u{1}😀\\".repeat(20_000);
        let memo = PaymentMemo {
            kind: MemoKind::Pay,
            room: "!r".into(),
            event: "$e".into(),
            note: Some(note.clone()),
            request: None,
            refund: None,
        };
        let bytes = memo.encode();
        assert!(bytes.len() <= MEMO_BYTES_MAX);
        let kept = PaymentMemo::decode(&bytes).unwrap().note.unwrap();
        assert!(note.starts_with(&kept) && !kept.is_empty());
        // One more char would not fit.
        let next = note[kept.len()..].chars().next().unwrap();
        let longer = PaymentMemo {
            note: Some(format!("{kept}{next}")),
            ..memo.clone()
        };
        assert!(serde_json::to_vec(&longer).unwrap().len() > MEMO_BYTES_MAX);
        assert_eq!(note_prefix_len("abc", 0), 0);
        assert_eq!(note_prefix_len("aé", 2), 1, "never inside a char");
    }
}
