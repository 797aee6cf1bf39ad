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
    /// For datasets: the first problems, by line.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<LineProblem>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LineProblem {
    /// 1-based line number in the uploaded file.
    pub line: usize,
    pub message: String,
}

/// Every error an HTTP handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("{0}")]
    NotReady(String),
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("invalid or revoked API key")]
    InvalidKey,
    #[error("invalid admin token")]
    InvalidAdminToken,
    #[error("tenant administration is off: start the server with TUNESHOP_ADMIN_TOKEN set")]
    AdminDisabled,
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    /// 400 with a code of the caller's choosing.
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: String,
        param: Option<String>,
    },
    /// 422: the request is well-formed but a field is wrong.
    #[error("{message}")]
    Invalid { param: String, message: String },
    #[error("{message}")]
    InvalidDataset {
        message: String,
        lines: Vec<LineProblem>,
    },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("the upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("unsupported content type `{got}`: send {expected}")]
    UnsupportedMediaType { got: String, expected: &'static str },
    #[error("{0}")]
    TooManyRequests(String),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn not_found(what: &'static str, id: impl std::fmt::Display) -> Self {
        Self::NotFound {
            what,
            id: id.to_string(),
        }
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<&str>) {
        use StatusCode as S;
        match self {
            Self::RouteNotFound { .. } => (S::NOT_FOUND, "route_not_found", None),
            Self::NotReady(_) => (S::SERVICE_UNAVAILABLE, "not_ready", None),
            Self::MissingKey => (S::UNAUTHORIZED, "missing_api_key", None),
            Self::InvalidKey => (S::UNAUTHORIZED, "invalid_api_key", None),
            Self::InvalidAdminToken => (S::UNAUTHORIZED, "invalid_admin_token", None),
            Self::AdminDisabled => (S::FORBIDDEN, "admin_disabled", None),
            Self::NotFound { .. } => (S::NOT_FOUND, "not_found", None),
            Self::BadRequest { code, param, .. } => (S::BAD_REQUEST, code, param.as_deref()),
            Self::Invalid { param, .. } => (S::UNPROCESSABLE_ENTITY, "invalid_request", Some(param)),
            Self::InvalidDataset { .. } => (S::BAD_REQUEST, "invalid_dataset", None),
            Self::Conflict { code, .. } => (S::CONFLICT, code, None),
            Self::TooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "payload_too_large", None),
            Self::UnsupportedMediaType { .. } => {
                (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", None)
            }
            Self::TooManyRequests(_) => (S::TOO_MANY_REQUESTS, "too_many_requests", None),
            Self::Db(_) | Self::Store(_) | Self::Internal(_) => {
                (S::INTERNAL_SERVER_ERROR, "internal_error", None)
            }
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
        let param = param.map(str::to_string);
        let lines = match self {
            Self::InvalidDataset { lines, .. } => lines,
            _ => Vec::new(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message,
                param,
                lines,
            },
        };
        (status, Json(body)).into_response()
    }
}
