//! Wires the HTTP edge, the inbox worker and the homeserver client together.

use crate::config::Config;

/// Errors starting or running the appservice.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Not built yet.
    #[error("mxpay serve is not built yet")]
    NotBuilt,
}

/// Runs the appservice until SIGINT/SIGTERM.
pub async fn serve(config: Config) -> Result<(), AppError> {
    let _ = config;
    Err(AppError::NotBuilt)
}
