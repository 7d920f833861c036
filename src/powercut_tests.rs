//! Simulated power cuts over stores outside the ledger, driven through their real APIs with
//! the layer in [`crate::sled_open::powercut`]. They live here, not beside that layer, because they
//! use the stores (the inbox, the admin stores, the replay records) while the layer itself is
//! used by every store's durable flush: nothing depends on this module.

mod inbox;
mod payment_flow;
mod security;
