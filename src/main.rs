use clap::Parser;

fn main() -> std::process::ExitCode {
    fixed_mmap_threshold();
    let cli = mxpay::cli::Cli::parse();
    match mxpay::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxpay: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Makes glibc serve every allocation of 8 MiB or more with its own mapping, returned to the
/// system when freed. The ledger allocates and frees blocks of tens of MiB at each checkpoint
/// (the transfers since the last spill, their id index, the spill's rows); by default glibc
/// raises its mapping threshold to the size of the last such block freed, so the next ones
/// came from the heap, which fragmented: RSS grew with history while live memory did not
/// (`mxpay bench ledger --rss-every 1000000`, 3M transfers: RSS at 3M 1.20-1.70x the figure
/// at 1M, 0.95-1.02x with this; peak RSS 374-447 MiB, 344-349 MiB with this). Below 8 MiB,
/// a batch call's buffers (about 1 MiB each) would pay a mapping and its page faults each.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointers and is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
    }
}
