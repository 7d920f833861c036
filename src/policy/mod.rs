//! Decisions only, no I/O: PINs, step-up proofs, limits.

pub mod payee;
pub mod pin;
pub mod rate;
pub mod stepup;
pub mod trust;
