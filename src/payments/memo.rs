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
}

impl PaymentMemo {
    /// The memo bytes, at most [`MEMO_BYTES_MAX`]: the note is shortened if needed.
    pub fn encode(&self) -> Vec<u8> {
        let mut memo = self.clone();
        loop {
            let bytes = serde_json::to_vec(&memo).expect("memo serialises");
            if bytes.len() <= MEMO_BYTES_MAX {
                return bytes;
            }
            match &mut memo.note {
                Some(note) if !note.is_empty() => {
                    note.pop();
                }
                _ => {
                    // Room and event ids are at most 255 bytes each: without the note the
                    // memo always fits.
                    memo.note = None;
                    return serde_json::to_vec(&memo).expect("memo serialises");
                }
            }
        }
    }

    /// Reads a memo; `None` for memos that are not mxpay's (e.g. an admin top-up's).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
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
        };
        let bytes = memo.encode();
        assert!(bytes.len() <= MEMO_BYTES_MAX);
        assert!(PaymentMemo::decode(&bytes).is_some());
    }
}
