//! Rate limits of the command API (the budgets are `platform::ratelimit`'s, shared with the query
//! API): a layer on the `/v1` and internal routes checks the caller's budget before anything else
//! runs (before the body is read). A request with a valid user token spends its user's budget; one
//! without a valid token spends its client address's (it is then refused 401 by the handler, unless
//! the address is over budget: 429). The service identity (the projector's reactions, holding a
//! secret users never see) is not limited: a reaction refused would only be retried.
//!
//! Over budget: 429 problem+json `urn:taskstream:problem:rate-limited` with `Retry-After`,
//! counted in `command_api_rate_limited_total{key="user"|"address"}`. Budgets are per instance:
//! a command forwarded to its partition's owner spends the user's budget there too.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use platform::auth::JwtAuth;
use platform::ratelimit::{RateLimiter, RateLimits};

use crate::error::ApiError;

/// The counter of refused requests.
pub const METRIC: &str = "command_api_rate_limited_total";

/// The command API's budgets of `limits`.
pub fn limiter(limits: RateLimits) -> RateLimiter {
    RateLimiter::new(limits, METRIC)
}

/// The layer (`axum::middleware::from_fn_with_state`, with the state's limiter and token verifier).
/// The verified caller is left in the request's extensions, where the `AuthUser` extractor takes
/// it instead of verifying the token again.
pub async fn limit(State((limiter, auth)): State<(RateLimiter, JwtAuth)>, mut req: Request, next: Next) -> Response {
    // A header that is not visible ASCII cannot be a valid bearer token.
    let authorization = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let checked = match auth.authenticate_caller(authorization) {
        Ok(caller) => {
            let checked = if caller.service.is_some() { Ok(()) } else { limiter.check_user(&caller.user) };
            req.extensions_mut().insert(caller);
            checked
        }
        Err(_) => limiter.check_address(req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())),
    };
    match checked {
        Ok(()) => next.run(req).await,
        Err(refused) => {
            tracing::debug!(key = refused.key, "request over its rate limit");
            ApiError::from(refused).into_response()
        }
    }
}
