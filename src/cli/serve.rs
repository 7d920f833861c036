//! `mxpay serve -c config.yaml`: runs the application service until SIGINT/SIGTERM.

use std::path::PathBuf;

use crate::config::{Config, LogFormat};

/// Arguments of `mxpay serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The mxpay config file.
    #[arg(short = 'c', long = "config", default_value = "config.yaml")]
    pub config: PathBuf,
    /// Log format: `pretty` (human lines) or `json` (one object per line). Overrides the
    /// config's `logging.format`.
    #[arg(long = "log-format", value_enum)]
    pub log_format: Option<LogFormatArg>,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Pretty => LogFormat::Pretty,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// Loads the config, sets up logging and runs the appservice.
pub fn run(args: ServeArgs) -> super::anyhow_like::Result {
    let mut config = Config::load(&args.config)?;
    if let Some(format) = args.log_format {
        config.logging.format = format.into();
    }
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(crate::app::serve(config))?;
    Ok(())
}

/// Installs the tracing subscriber; `RUST_LOG` overrides `logging.level`.
pub fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::EnvFilter>().ok())
        .unwrap_or_else(|| {
            config
                .logging
                .level
                .parse()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        });
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match config.logging.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};
    use crate::config::LogFormat;

    #[test]
    fn log_format_flag_parses_and_maps() {
        let cli = Cli::try_parse_from(["mxpay", "serve", "--log-format", "json"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.log_format.map(LogFormat::from), Some(LogFormat::Json));
        let cli = Cli::try_parse_from(["mxpay", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.log_format, None, "the config decides");
        assert!(Cli::try_parse_from(["mxpay", "serve", "--log-format", "xml"]).is_err());
    }
}
