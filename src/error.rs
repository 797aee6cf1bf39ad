//! The API error body and the one place where errors become HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// `{"error": {"code", "message", "param"}}`
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case: clients branch on it.
    #[schema(example = "not_found")]
    pub code: String,
    /// What went wrong and how to fix it.
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

/// Every error an HTTP handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("{0}")]
    NotReady(String),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, Option<&str>) {
        match self {
            Self::RouteNotFound { .. } => (StatusCode::NOT_FOUND, "route_not_found", None),
            Self::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready", None),
            Self::Db(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, param) = self.parts();
        let message = if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            // The detail goes to the log; clients get a generic message.
            tracing::error!(error = %self, "request failed");
            "internal server error".to_string()
        } else {
            self.to_string()
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message,
                param: param.map(str::to_string),
            },
        };
        (status, Json(body)).into_response()
    }
}
