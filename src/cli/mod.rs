//! Command line: `mxpay <command>`. Each command lives in its own file; main.rs only dispatches.

pub mod admin;
pub mod demo;
pub mod dev;
pub mod example_config;
pub mod registration;
pub mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod bench;
pub mod bench_e2e;
pub mod ledger;

/// mxpay: chat payments for end-to-end-encrypted Matrix rooms.
#[derive(Debug, Parser)]
#[command(name = "mxpay", version, about)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the application service.
    Serve(serve::ServeArgs),
    /// Writes an appservice registration with fresh tokens for the homeserver (alias `-g`).
    #[command(short_flag = 'g', visible_alias = "g")]
    GenerateRegistration(registration::GenerateRegistrationArgs),
    /// Writes the commented example config (alias `-e`).
    #[command(short_flag = 'e', visible_alias = "e")]
    ExampleConfig(example_config::ExampleConfigArgs),
    /// A first payment end to end against the `mxpay dev` setup (starting it if needed): two
    /// real encrypted clients set a PIN, pay and see the receipt, with each step's latency.
    Demo(demo::DemoArgs),
    /// Local development: Synapse, mxpay and demo users under `.dev/`, until Ctrl-C.
    Dev(dev::DevArgs),
    /// Ledger tools that work on a data directory directly (mxpay must not be running).
    Ledger {
        /// What to do.
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// The admin API from the command line (top-ups, balances, freezes, settlement, audit).
    Admin(admin::AdminArgs),
    /// Benchmarks (not tests): measure on a release build.
    Bench {
        /// What to measure.
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

/// `mxpay ledger ...`
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Replays the journal and checks every invariant; exits non-zero and says where on failure.
    Verify {
        /// The data directory (the `data_dir` config key).
        data_dir: PathBuf,
    },
}

/// Runs the parsed command; the process exit code is derived from the result.
pub fn run(cli: Cli) -> anyhow_like::Result {
    // Before any file is created: data_dir, logs of children and keys stay owner-only.
    crate::private_fs::restrict_umask();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::GenerateRegistration(args) => registration::run(args),
        Command::ExampleConfig(args) => example_config::run(args),
        Command::Dev(args) => dev::run(args).map_err(Into::into),
        Command::Demo(args) => demo::run(args).map_err(Into::into),
        Command::Ledger { command } => match command {
            LedgerCommand::Verify { data_dir } => ledger::verify(&data_dir),
        },
        Command::Bench { command } => bench::run(command),
        Command::Admin(args) => admin::run(args),
    }
}

/// A boxed error for the CLI edge, where every error ends as a sentence on stderr.
pub mod anyhow_like {
    /// Result of a CLI command.
    pub type Result = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
}
