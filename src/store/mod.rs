//! sled behind small, purpose-named wrappers. Nothing outside this module names sled; callers
//! see keys, values and sequence numbers.
//!
//! Trees are named `key_value` so a tree's name says what maps to what.

pub mod held;
pub mod inbox;
pub mod payments;
pub mod receipts;
pub mod requests;

pub use inbox::{InboxStore, Inserted, StoredEntry};
pub use payments::PaymentStore;

/// Errors of the storage layer. The text may name files and sled internals: it is for logs,
/// never for clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (missing permissions, locked by another process...).
    #[error("cannot open database at {path}: {source}")]
    Open {
        /// The database directory.
        path: std::path::PathBuf,
        /// Why.
        source: sled::Error,
    },
    /// A read, write or flush failed.
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value does not decode: the database is corrupt or from another program.
    #[error("corrupt entry in tree `{tree}`: {reason}")]
    Corrupt {
        /// The tree name.
        tree: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A blocking task was cancelled (runtime shutting down).
    #[error("storage task did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}
