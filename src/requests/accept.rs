//! Transfers the payee accepts (WeChat's accept-or-return), as pure decisions.
//!
//! With `payments.payee_must_accept` on (always for a payee who never used mxpay), a payment
//! confirmed with the payer's PIN stays reserved, not posted, until its payee accepts (✅ or
//! `!accept` as a reply, from a trusted device of theirs) or declines (❌ or `!decline`); when
//! the window passes it goes back to the payer by itself.

use matrix_sdk::ruma::{OwnedUserId, UserId};

use super::reason::RequestRefusal;

/// How long a held payment waits for its payee by default: 24 hours.
pub const ACCEPT_WINDOW_DEFAULT_MS: u64 = 24 * 3_600_000;

/// Whether a confirmed payment to this payee waits for them to accept it: when the operator
/// turned the switch on, and always for a payee who never used mxpay (no wallet activity, no
/// PIN), so money sent to a mistyped or unused account comes back.
pub fn payee_must_accept(switch_on: bool, payee_has_used_mxpay: bool) -> bool {
    switch_on || !payee_has_used_mxpay
}

/// A payment held for its payee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPayment {
    /// The pending ledger transfer.
    pub transfer_id: u128,
    /// Who paid.
    pub payer: OwnedUserId,
    /// Who must accept it.
    pub payee: OwnedUserId,
    /// When it goes back to the payer by itself (confirmed at + window).
    pub return_at_ms: u64,
}

/// What to do with a held payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldOutcome {
    /// Post it: the payee has the money.
    Post,
    /// Void it: the reservation is released to the payer.
    Return,
}

impl HeldPayment {
    /// The window ends at `return_at_ms`.
    pub fn return_due(&self, now_ms: u64) -> bool {
        now_ms >= self.return_at_ms
    }

    fn check_actor(&self, actor: &UserId, now_ms: u64) -> Result<(), RequestRefusal> {
        if actor != self.payee {
            return Err(RequestRefusal::NotThePayee);
        }
        if self.return_due(now_ms) {
            return Err(RequestRefusal::AcceptanceWindowPassed);
        }
        Ok(())
    }

    /// `actor` accepts. Refused: `not_the_payee`, `acceptance_window_passed`. (A payment no
    /// longer held is `payment_already_settled`: the caller knows that from the ledger.)
    pub fn accept(&self, actor: &UserId, now_ms: u64) -> Result<HeldOutcome, RequestRefusal> {
        self.check_actor(actor, now_ms)?;
        Ok(HeldOutcome::Post)
    }

    /// `actor` declines: the money goes back. Refused like [`Self::accept`].
    pub fn decline(&self, actor: &UserId, now_ms: u64) -> Result<HeldOutcome, RequestRefusal> {
        self.check_actor(actor, now_ms)?;
        Ok(HeldOutcome::Return)
    }

    /// The timer: `Some(Return)` once the window has passed.
    pub fn on_timer(&self, now_ms: u64) -> Option<HeldOutcome> {
        self.return_due(now_ms).then_some(HeldOutcome::Return)
    }
}

#[cfg(test)]
mod tests {
    use matrix_sdk::ruma::{owned_user_id, user_id};

    use super::*;

    fn held() -> HeldPayment {
        HeldPayment {
            transfer_id: 1,
            payer: owned_user_id!("@alice:s"),
            payee: owned_user_id!("@bob:s"),
            return_at_ms: 1_000 + ACCEPT_WINDOW_DEFAULT_MS,
        }
    }

    #[test]
    fn only_the_payee_within_the_window() {
        let h = held();
        assert_eq!(h.accept(user_id!("@bob:s"), 1_000), Ok(HeldOutcome::Post));
        assert_eq!(
            h.decline(user_id!("@bob:s"), 1_000),
            Ok(HeldOutcome::Return)
        );
        assert_eq!(
            h.accept(user_id!("@alice:s"), 1_000),
            Err(RequestRefusal::NotThePayee)
        );
        assert_eq!(
            h.accept(user_id!("@carol:s"), 1_000),
            Err(RequestRefusal::NotThePayee)
        );
        let end = h.return_at_ms;
        assert_eq!(h.on_timer(end - 1), None);
        assert!(h.accept(user_id!("@bob:s"), end - 1).is_ok());
        assert_eq!(h.on_timer(end), Some(HeldOutcome::Return));
        assert_eq!(
            h.accept(user_id!("@bob:s"), end),
            Err(RequestRefusal::AcceptanceWindowPassed)
        );
    }

    #[test]
    fn new_payees_always_accept() {
        assert!(payee_must_accept(false, false));
        assert!(payee_must_accept(true, true));
        assert!(!payee_must_accept(false, true));
    }
}
