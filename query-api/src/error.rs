//! Errors. A request refused before the query runs is answered with an HTTP status and a
//! GraphQL-shaped body, `{"errors": [{"message": .., "extensions": {"code": ..}}]}`; errors inside
//! the query become GraphQL errors with the same `extensions.code`. Internal causes are logged with
//! their chain and never sent to the client.

use async_graphql::ErrorExtensions;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use platform::auth::AuthError;
use platform::ratelimit::{retry_after_secs, RateLimited};

use crate::progress::NotYetApplied;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(#[from] AuthError),
    #[error("X-Consistency-Token is not a position returned by the command API")]
    BadConsistencyToken,
    #[error(transparent)]
    ConsistencyTimeout(#[from] NotYetApplied),
    #[error("{0}")]
    BadRequest(String),
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The service started but cannot serve queries yet (PostgreSQL not reached since start).
    #[error("the query API is not ready yet: PostgreSQL has not been reached since it started (retrying); try again shortly")]
    NotReady,
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    /// Every slot for a long-running request (an export) is taken.
    #[error("{0}")]
    Busy(&'static str),
    /// PostgreSQL failed a request outside GraphQL (the cause is logged, never sent).
    #[error("the read models could not be read; try again shortly")]
    Database,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadConsistencyToken | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ConsistencyTimeout(_) | ApiError::NotReady | ApiError::Busy(_) | ApiError::Database => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// `extensions.code` of the error, also the `result` label of `graphql_requests_total`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(_) => "UNAUTHENTICATED",
            ApiError::BadConsistencyToken => "BAD_CONSISTENCY_TOKEN",
            ApiError::ConsistencyTimeout(_) => "CONSISTENCY_TIMEOUT",
            ApiError::BadRequest(_) => "BAD_REQUEST",
            ApiError::PayloadTooLarge(_) => "PAYLOAD_TOO_LARGE",
            ApiError::NotReady => "NOT_READY",
            ApiError::RateLimited(_) => "RATE_LIMITED",
            ApiError::Busy(_) => "BUSY",
            ApiError::Database => "UNAVAILABLE",
        }
    }

    /// A failed read-model statement outside GraphQL: logged with its cause chain, answered 503.
    pub fn database(e: sqlx::Error) -> Self {
        let e = anyhow::Error::from(e);
        tracing::error!(error.message = %e, error.cause_chain = ?e, "read-model query failed");
        ApiError::Database
    }

    /// The error as RFC 9457 problem+json, for the plain HTTP routes (`GET /v1/me/export`), with the
    /// command API's problem types (`urn:taskstream:problem:<slug>`) and the same headers as
    /// [`IntoResponse`] (Retry-After, WWW-Authenticate).
    pub fn into_problem(self) -> Response {
        let slug = match &self {
            ApiError::Unauthenticated(_) => "unauthorized",
            ApiError::BadConsistencyToken | ApiError::BadRequest(_) => "bad-request",
            ApiError::ConsistencyTimeout(_) => "consistency-timeout",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::NotReady | ApiError::Busy(_) | ApiError::Database => "unavailable",
            ApiError::RateLimited(_) => "rate-limited",
        };
        let status = self.status_code();
        let body = json!({
            "type": format!("urn:taskstream:problem:{slug}"),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        let mut res = self.into_response();
        *res.body_mut() = axum::body::Body::from(body.to_string());
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        res
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "errors": [{ "message": self.to_string(), "extensions": { "code": self.code() } }] });
        let mut res = (self.status_code(), Json(body)).into_response();
        match self {
            ApiError::RateLimited(r) => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(r.retry_after)));
            }
            ApiError::Unauthenticated(_) => {
                res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::ConsistencyTimeout(_) | ApiError::NotReady | ApiError::Database => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Busy(_) => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        res
    }
}

/// A GraphQL error the caller can fix, with `extensions.code`.
pub fn user_error(code: &'static str, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code))
}

/// A failed read-model query: logged with its cause chain, answered as a generic internal error.
pub fn internal(e: sqlx::Error) -> async_graphql::Error {
    let e = anyhow::Error::from(e);
    tracing::error!(error.message = %e, error.cause_chain = ?e, "read-model query failed");
    user_error("INTERNAL_SERVER_ERROR", "internal error")
}
