//! The JSON error answer of every HTTP endpoint (`{"error": {"code", "message"}}`, and
//! `outcome` on a failed message send), shared by the REST API and the WebSocket upgrade.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;
use shared::{ErrorCode, Outcome};

use crate::backend::{BackendError, ErrorKind};

/// An error answer: `{"error": {"code", "message"}}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    /// On a message send that failed: whether it may have gone out (`outcome` in the body).
    outcome: Option<Outcome>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            outcome: None,
        }
    }

    pub fn with_outcome(self, outcome: Outcome) -> Self {
        ApiError {
            outcome: Some(outcome),
            ..self
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        tracing::warn!(error = %e, "backend call failed");
        match e.kind() {
            ErrorKind::Unavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "backend unavailable",
            ),
            ErrorKind::Internal => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "backend error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(outcome) = self.outcome {
            error["outcome"] = json!(outcome);
        }
        let body = json!({ "error": error });
        (self.status, Json(body)).into_response()
    }
}
