//! mxpay: chat payments for end-to-end-encrypted Matrix rooms, as a Matrix application service.
//!
//! Data flows one way (see `docs/architecture.md`):
//! homeserver transaction -> [`http`] -> [`inbox`] -> [`crypto`] -> [`command`] -> [`policy`]
//! -> [`ledger`] -> [`outbox`] -> receipt event sent by the bot.
#![recursion_limit = "256"]

pub mod admin;
pub mod app;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod crypto;
pub mod events;
pub mod flood;
pub mod homeserver;
pub mod http;
pub mod inbox;
pub mod ledger;
pub mod merchants;
pub mod metrics;
pub mod outbox;
pub mod payments;
pub mod pipeline;
pub mod policy;
#[cfg(test)]
mod powercut_tests;
pub mod private_fs;
pub mod registration;
pub mod requests;
pub mod secret;
pub mod signature;
pub mod sled_open;
pub mod store;
pub mod webhooks;
