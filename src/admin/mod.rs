//! The admin API: top-ups, provider webhooks, freezes, settlement, audit.

pub mod audit;
pub mod token;
pub mod webhook;
