//! `mxpay generate-registration -c config.yaml [-o appservice.yaml]`

use std::path::PathBuf;

use crate::config::Config;
use crate::registration::Registration;

/// Arguments of `mxpay generate-registration`.
#[derive(Debug, clap::Args)]
pub struct GenerateRegistrationArgs {
    /// The mxpay config file.
    #[arg(short = 'c', long = "config", default_value = "config.yaml")]
    pub config: PathBuf,
    /// Where to write the registration. Default: the config's `appservice.registration`.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
}

/// Writes a registration with fresh random tokens; an existing file is replaced (its tokens
/// stop working, so the homeserver must load the new file).
pub fn run(args: GenerateRegistrationArgs) -> super::anyhow_like::Result {
    let config = Config::load(&args.config)?;
    let output = args
        .output
        .unwrap_or_else(|| config.appservice.registration.clone());
    let registration = Registration::generate(&config);
    registration.write(&output)?;
    println!(
        "Wrote {}. Add it to the homeserver's app_service_config_files, restart the homeserver, \
         then run `mxpay serve -c {}`.",
        output.display(),
        args.config.display()
    );
    if output != config.appservice.registration {
        println!(
            "Note: the config's appservice.registration is {}; mxpay reads its tokens from there.",
            config.appservice.registration.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    #[test]
    fn dash_g_and_long_form_parse_and_write_a_registration() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, "homeserver: {server_name: example.org}\n").unwrap();
        let output = dir.path().join("out/appservice.yaml");
        for first in ["-g", "generate-registration"] {
            let cli = Cli::try_parse_from([
                "mxpay",
                first,
                "-c",
                config.to_str().unwrap(),
                "-o",
                output.to_str().unwrap(),
            ])
            .unwrap();
            assert!(matches!(cli.command, Command::GenerateRegistration(_)));
            crate::cli::run(cli).unwrap();
            let written = crate::registration::Registration::load(&output).unwrap();
            assert_eq!(written.namespaces.users[0].regex, r"^@_mxpay:example\.org$");
        }
        // Without -o it goes where the config says.
        let cli = Cli::try_parse_from(["mxpay", "-g", "-c", config.to_str().unwrap()]).unwrap();
        crate::cli::run(cli).unwrap();
        assert!(dir.path().join("appservice.yaml").exists());
    }
}
