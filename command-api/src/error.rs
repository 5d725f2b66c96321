//! One error type for the command API, written as RFC 9457 problem+json. 5xx causes are logged and
//! never sent to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use domain::{DomainError, FieldError};
use platform::auth::AuthError;
use platform::ratelimit::{retry_after_secs, RateLimited};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    #[error("task not found")]
    NotFound,
    /// A 404 whose detail says more than "task not found" (an unknown notification).
    #[error("{0}")]
    NotFoundBecause(String),
    #[error("this method is not allowed here (see the Allow header)")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("the task is at version {actual}, not {expected}")]
    PreconditionFailed { expected: u32, actual: u32 },
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// Over the caller's request budget (the rate limits, ratelimit.rs).
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error("the event log is unavailable; nothing was appended, retry later")]
    Unavailable(String),
    /// The query API, to which a read is relayed (`GET /v1/me/export`), did not answer.
    #[error("the query API is unavailable; retry later")]
    QueryApiUnavailable(String),
    /// Writes to a stream are stopped (its log holds a record that cannot be decoded).
    #[error("{0}")]
    Blocked(String),
    #[error("internal error")]
    Internal(String),
}

/// RFC 9457 problem details.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI reference identifying the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// For validation problems: which fields were refused and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<ProblemField>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemField {
    pub field: String,
    pub message: String,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound | ApiError::NotFoundBecause(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation(_) | ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::QueryApiUnavailable(_) | ApiError::Blocked(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound | ApiError::NotFoundBecause(_) => "not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PreconditionFailed { .. } => "version-mismatch",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::Validation(_) => "validation",
            ApiError::IdempotencyKeyReused => "idempotency-key-reused",
            ApiError::RateLimited(_) => "rate-limited",
            ApiError::Unavailable(_) => "log-unavailable",
            ApiError::QueryApiUnavailable(_) => "query-api-unavailable",
            ApiError::Blocked(_) => "stream-blocked",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError::new(field, message)])
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::NotFound => ApiError::NotFound,
            e @ DomainError::UnknownNotification => ApiError::NotFoundBecause(e.to_string()),
            DomainError::VersionMismatch { expected, actual } => ApiError::PreconditionFailed { expected, actual },
            DomainError::Invalid(errors) => ApiError::Validation(errors),
            e @ (DomainError::AlreadyExists
            | DomainError::Deleted
            | DomainError::AlreadyCompleted
            | DomainError::NotCompleted
            | DomainError::NoReminderDue
            | DomainError::AlreadyRead
            | DomainError::NotificationExists) => ApiError::Conflict(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let detail = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error.message = %cause, "internal error");
                "an internal error occurred; it has been logged".to_owned()
            }
            ApiError::Unavailable(cause) | ApiError::QueryApiUnavailable(cause) => {
                tracing::warn!(error.message = %cause, "answering 503");
                self.to_string()
            }
            other => other.to_string(),
        };
        let errors = match &self {
            ApiError::Validation(errs) => Some(errs.iter().map(|e| ProblemField { field: e.field.clone(), message: e.message.clone() }).collect()),
            // A 422 like any other: clients find what was refused in `errors`.
            ApiError::IdempotencyKeyReused => {
                Some(vec![ProblemField { field: "Idempotency-Key".to_owned(), message: "was already used with a different request".to_owned() }])
            }
            _ => None,
        };
        let problem = Problem {
            kind: format!("urn:taskstream:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            errors,
        };
        let mut res = (status, axum::Json(problem)).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        match self {
            ApiError::Unavailable(_) | ApiError::QueryApiUnavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Blocked(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            ApiError::RateLimited(r) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(r.retry_after)));
            }
            ApiError::Unauthorized(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        res
    }
}
