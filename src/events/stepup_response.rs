//! `org.mxpay.stepup.response`: the payer answers a challenge with their PIN, in the private DM
//! only. The bot redacts it after reading.

use std::fmt;

use matrix_sdk::ruma::events::macros::EventContent;
use serde::{Deserialize, Serialize};

/// A PIN for one challenge. Its Debug form hides the PIN.
#[derive(Clone, PartialEq, Deserialize, Serialize, EventContent)]
#[ruma_event(type = "org.mxpay.stepup.response", kind = MessageLike)]
pub struct StepUpResponseEventContent {
    /// Fallback text; must not contain the PIN (e.g. "PIN confirmation").
    pub body: String,
    /// The challenge answered.
    pub challenge_id: String,
    /// The 4-digit PIN.
    pub pin: String,
}

impl fmt::Debug for StepUpResponseEventContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepUpResponseEventContent")
            .field("challenge_id", &self.challenge_id)
            .field("pin", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_hides_the_pin() {
        let content = StepUpResponseEventContent {
            body: "PIN confirmation".to_owned(),
            challenge_id: "c1".to_owned(),
            pin: "4821".to_owned(),
        };
        let debug = format!("{content:?} {content:#?}");
        assert!(!debug.contains("4821"), "{debug}");
    }
}
