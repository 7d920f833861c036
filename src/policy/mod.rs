//! Decisions only, no I/O: PINs, step-up proofs, limits.

pub mod pin;
pub mod stepup;
