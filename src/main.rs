use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = mxpay::cli::Cli::parse();
    match mxpay::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxpay: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
