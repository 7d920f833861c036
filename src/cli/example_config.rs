//! `mxpay -e [-o config.yaml]`: writes the commented example config (every key with its
//! default and what it does), as mautrix bridges' `-e` does.

use std::path::PathBuf;

/// The example config shipped with this version (`config.example.yaml`).
pub const EXAMPLE_CONFIG: &str = include_str!("../../config.example.yaml");

/// Arguments of `mxpay example-config`.
#[derive(Debug, clap::Args)]
pub struct ExampleConfigArgs {
    /// Where to write it; an existing file is left alone (an error says so).
    #[arg(short = 'o', long = "output", default_value = "config.yaml")]
    pub output: PathBuf,
}

/// Writes the example config to `args.output`, never over an existing file.
pub fn run(args: ExampleConfigArgs) -> super::anyhow_like::Result {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.output)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{} exists already; mxpay -e does not overwrite a config (choose another \
                     file with -o)",
                    args.output.display()
                )
            } else {
                format!("{}: {e}", args.output.display())
            }
        })?;
    file.write_all(EXAMPLE_CONFIG.as_bytes())
        .map_err(|e| format!("{}: {e}", args.output.display()))?;
    println!(
        "Wrote {}. Edit it (every key is explained in it and in docs/config.md), then run \
         `mxpay -g -c {}` to make the registration.",
        args.output.display(),
        args.output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    #[test]
    fn dash_e_writes_a_valid_config_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("config.yaml");
        let cli = Cli::try_parse_from(["mxpay", "-e", "-o", output.to_str().unwrap()]).unwrap();
        let Command::ExampleConfig(args) = cli.command else {
            panic!("-e is example-config");
        };
        super::run(args).unwrap();
        crate::config::Config::load(&output).expect("the example config is valid");

        std::fs::write(&output, "mine").unwrap();
        let cli = Cli::try_parse_from(["mxpay", "example-config", "-o", output.to_str().unwrap()])
            .unwrap();
        let Command::ExampleConfig(args) = cli.command else {
            panic!("example-config");
        };
        let error = super::run(args).unwrap_err().to_string();
        assert!(error.contains("exists already"), "{error}");
        assert_eq!(std::fs::read_to_string(&output).unwrap(), "mine");
    }
}
