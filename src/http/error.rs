//! Matrix error answers of the edge. Texts are fixed sentences: no paths, database errors or
//! tokens ever reach a client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What the edge refuses, each with its status and Matrix errcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EdgeError {
    /// No hs_token given.
    #[error("missing hs_token")]
    MissingToken,
    /// Wrong hs_token.
    #[error("invalid hs_token")]
    BadToken,
    /// `/metrics` without the metrics token (`metrics.bearer_token_file`).
    #[error("missing metrics token")]
    MissingMetricsToken,
    /// `/metrics` with a wrong metrics token.
    #[error("invalid metrics token")]
    BadMetricsToken,
    /// Body over `appservice.max_body_bytes`.
    #[error("request body too large")]
    TooLarge,
    /// Body is not JSON.
    #[error("request body is not JSON")]
    NotJson,
    /// Body is JSON of the wrong shape.
    #[error("{0}")]
    BadJson(&'static str),
    /// A path parameter is unacceptable.
    #[error("{0}")]
    InvalidParam(&'static str),
    /// The user or alias does not exist (mxpay creates none on demand).
    #[error("{0}")]
    NotFound(&'static str),
    /// Unknown endpoint.
    #[error("unrecognized request")]
    Unrecognized,
    /// Known endpoint, wrong method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body stream broke while reading.
    #[error("could not read the request body")]
    BodyRead,
    /// The inbox holds `appservice.pending_transactions_max` transactions: send it again later.
    #[error("too many transactions waiting; send this one again later")]
    Busy,
    /// Something failed inside mxpay (logged where it happened); the homeserver should retry.
    #[error("internal error; try again later")]
    Internal,
}

impl EdgeError {
    /// HTTP status and Matrix errcode.
    pub fn status_and_code(self) -> (StatusCode, &'static str) {
        match self {
            Self::MissingToken | Self::MissingMetricsToken => {
                (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED")
            }
            Self::BadToken | Self::BadMetricsToken => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            Self::NotJson => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            Self::BadJson(_) => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            Self::InvalidParam(_) => (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            Self::Unrecognized => (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"),
            Self::BodyRead => (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
            Self::Busy => (StatusCode::SERVICE_UNAVAILABLE, "M_LIMIT_EXCEEDED"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        }
    }
}

impl IntoResponse for EdgeError {
    fn into_response(self) -> Response {
        let (status, errcode) = self.status_and_code();
        json_response(
            status,
            &serde_json::json!({ "errcode": errcode, "error": self.to_string() }),
        )
    }
}

/// A JSON answer with explicit `Content-Type` and `Content-Length` (a homeserver that cannot
/// tell where the body ends retries the transaction).
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let body = serde_json::to_vec(value).expect("JSON values serialise");
    (
        status,
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/json".to_owned(),
            ),
            (axum::http::header::CONTENT_LENGTH, body.len().to_string()),
        ],
        body,
    )
        .into_response()
}
