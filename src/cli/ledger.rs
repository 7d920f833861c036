//! `mxpay ledger ...`: tools that work on a data directory directly.

use std::path::Path;

use crate::ledger::{verify_dir, CheckpointCheck, VerifyReport};

/// `mxpay ledger verify <data-dir>`: replays the journal, checks the hash chain, the head and
/// every invariant. On success prints a summary; on failure the error names the record.
pub fn verify(data_dir: &Path) -> super::anyhow_like::Result {
    let VerifyReport {
        records,
        entries,
        accounts,
        transfers,
        pending,
        checkpoint,
    } = verify_dir(data_dir)?;
    println!(
        "ledger OK: {records} records, {entries} entries, {accounts} accounts, \
         {transfers} transfers ({pending} pending)"
    );
    match checkpoint {
        CheckpointCheck::None => println!("checkpoint: none"),
        CheckpointCheck::Compared { seq } => {
            println!("checkpoint at record {seq}: the replay up to it, rows on disk included")
        }
        CheckpointCheck::OldFormat { seq, version } => println!(
            "checkpoint at record {seq}: old format {version}, not compared (the chain and \
             every invariant were checked by the replay; the next start writes the new format)"
        ),
    }
    Ok(())
}
