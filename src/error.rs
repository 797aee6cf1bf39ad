//! The API error body and the one place where errors become HTTP responses.

use crate::infer::{InferError, StepError};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// `{"error": {"code", "type", "message", "param"}}`
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case: clients branch on it.
    #[schema(example = "not_found")]
    pub code: String,
    /// The class of error as OpenAI names it: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    #[schema(example = "not_found_error")]
    pub kind: &'static str,
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
    #[error("the request took longer than the server's limit of {0} seconds")]
    Timeout(u64),
    #[error(transparent)]
    Infer(#[from] crate::infer::InferError),
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
            Self::Invalid { param, .. } => {
                (S::UNPROCESSABLE_ENTITY, "invalid_request", Some(param))
            }
            Self::InvalidDataset { .. } => (S::BAD_REQUEST, "invalid_dataset", None),
            Self::Conflict { code, .. } => (S::CONFLICT, code, None),
            Self::TooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "payload_too_large", None),
            Self::UnsupportedMediaType { .. } => {
                (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", None)
            }
            Self::TooManyRequests(_) => (S::TOO_MANY_REQUESTS, "too_many_requests", None),
            Self::Timeout(_) => (S::REQUEST_TIMEOUT, "request_timeout", None),
            Self::Infer(e) => infer_parts(e),
            Self::Db(_) | Self::Store(_) | Self::Internal(_) => {
                (S::INTERNAL_SERVER_ERROR, "internal_error", None)
            }
        }
    }

    /// The JSON body (server errors keep their detail for the log).
    pub fn body(&self) -> ErrorBody {
        let (status, code, param) = self.parts();
        let message = if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed");
            "internal server error".to_string()
        } else {
            self.to_string()
        };
        let lines = match self {
            Self::InvalidDataset { lines, .. } => lines.clone(),
            _ => Vec::new(),
        };
        ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                kind: kind_of(status),
                message,
                param: param.map(str::to_string),
                lines,
            },
        }
    }
}

fn infer_parts(e: &InferError) -> (StatusCode, &'static str, Option<&str>) {
    use StatusCode as S;
    match e {
        InferError::EmptyPrompt => (S::BAD_REQUEST, "empty_prompt", Some("prompt")),
        InferError::ContextExceeded { .. } => (
            S::BAD_REQUEST,
            "context_length_exceeded",
            Some("max_tokens"),
        ),
        InferError::InvalidParam { param, .. } => {
            (S::UNPROCESSABLE_ENTITY, "invalid_request", Some(param))
        }
        InferError::NoChatTemplate => (S::BAD_REQUEST, "no_chat_template", Some("messages")),
        InferError::UnknownModel(_) => (S::NOT_FOUND, "model_not_found", Some("model")),
        InferError::TooLargeForCache { .. } => (S::BAD_REQUEST, "request_too_large", None),
        InferError::Overloaded(_) => (S::TOO_MANY_REQUESTS, "overloaded", None),
        InferError::Step(StepError::Timeout(_)) => (S::REQUEST_TIMEOUT, "request_timeout", None),
        InferError::AdapterLoad { .. }
        | InferError::Step(StepError::Compute(_))
        | InferError::Model(_)
        | InferError::Candle(_) => (S::INTERNAL_SERVER_ERROR, "internal_error", None),
    }
}

/// OpenAI's error `type` for a status.
fn kind_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.parts().0;
        (status, Json(self.body())).into_response()
    }
}
