//! `mxpay ledger ...`: tools that work on a data directory directly.

use std::path::Path;

use crate::ledger::{verify_dir, VerifyReport};

/// `mxpay ledger verify <data-dir>`: replays the journal, checks the hash chain, the head and
/// every invariant. On success prints a summary; on failure the error names the record.
pub fn verify(data_dir: &Path) -> super::anyhow_like::Result {
    let VerifyReport {
        records,
        entries,
        accounts,
        transfers,
        pending,
    } = verify_dir(data_dir)?;
    println!(
        "ledger OK: {records} records, {entries} entries, {accounts} accounts, \
         {transfers} transfers ({pending} pending)"
    );
    Ok(())
}
