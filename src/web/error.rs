//! The one error type of the web edge: each kind maps to a status code and serialises as
//! `{"error": "kind", "message": "..."}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::db::DbError;
use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Unavailable(String),
    /// The request clashes with what exists (a session open in another browser).
    #[error("{0}")]
    Conflict(String),
    /// Switched off by the server's configuration.
    #[error("{0}")]
    Disabled(String),
    /// Too many attempts from this client; try again later.
    #[error("{0}")]
    TooManyRequests(String),
    #[error("the database is unavailable: {0}")]
    Database(#[from] DbError),
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl ApiError {
    /// The error's kind, as the `error` field of its JSON says.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Conflict(_) => "conflict",
            ApiError::Disabled(_) => "disabled",
            ApiError::TooManyRequests(_) => "rate_limited",
            ApiError::Database(_) => "database_unavailable",
            ApiError::Engine(EngineError::UnknownModel { .. }) => "model_not_found",
            ApiError::Engine(EngineError::Busy { .. }) => "busy",
            ApiError::Engine(e) if is_request_error(e) => "invalid_request",
            ApiError::Engine(_) => "engine_error",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Disabled(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Engine(EngineError::UnknownModel { .. }) => StatusCode::NOT_FOUND,
            ApiError::Engine(EngineError::Busy { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Engine(e) if is_request_error(e) => StatusCode::BAD_REQUEST,
            ApiError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: self.kind(),
            message: self.to_string(),
        })
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// Engine errors caused by the request rather than the server.
fn is_request_error(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::EmptyMessages
            | EngineError::InvalidRequest(_)
            | EngineError::PromptTooLong { .. }
            | EngineError::Grammar(_)
    )
}
