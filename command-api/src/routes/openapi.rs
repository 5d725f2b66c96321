//! The parts of the OpenAPI document that several operations share: the command headers
//! (`IdempotencyKey`, `IfMatch`, with the constraints `crate::extract::CommandHeaders` enforces) and
//! the problem+json answer sets the handlers list in their `#[utoipa::path(responses(...))]`: what
//! every command can be answered (`CommandProblems`), what a JSON body adds (`JsonBodyProblems`)
//! and what a command on an existing task adds (`TaskProblems`), and what a read relayed to the
//! query API can meet (`ReadProblems`); the rate limits' 429, which every
//! operation can meet, is added to all of them at once (`answer_rate_limited`). Which status means what is
//! `crate::error::ApiError::status_code`; these sets say which of them each operation can meet, so
//! that a client (or schemathesis, in `./dev test`) finds every status it is answered in the
//! document. Imports nothing from `routes`.

use std::collections::BTreeMap;

use utoipa::openapi::schema::{ObjectBuilder, Ref, Type};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, RefOr, Response, ResponseBuilder};
use utoipa::{IntoParams, IntoResponses, ToSchema};

use crate::error::Problem;

/// `Idempotency-Key`, which every command honours.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// Makes the command safe to retry: the same key with the same request is answered the first
    /// answer again (with `Idempotent-Replayed: true`), with another request 422. 1..=255 visible
    /// ASCII characters.
    #[param(rename = "Idempotency-Key", nullable = false, min_length = 1, max_length = 255, pattern = "^[!-~]+$")]
    pub key: Option<String>,
}

/// `If-Match`, which the commands on a task honour.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatch {
    /// Only if the task is at this version, e.g. `"3"` (412 otherwise); `"0"` on create: only if
    /// the id is unused.
    #[param(rename = "If-Match", nullable = false, pattern = r#"^"[0-9]{1,9}"$"#)]
    pub version: Option<String>,
}

/// The media type of every error answer (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A `Problem` answer with `status` and `description` (and `Retry-After` on a 429 or 503).
fn problem(status: u16, description: &str) -> (String, RefOr<Response>) {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name(Problem::name()))).build();
    let mut response = ResponseBuilder::new().description(description).content(PROBLEM_JSON, content);
    if status == 429 || status == 503 {
        let seconds = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0));
        response = response.header("Retry-After", HeaderBuilder::new().schema(seconds).description(Some("Seconds to wait before retrying")).build());
    }
    (status.to_string(), response.build().into())
}

fn problems(list: &[(u16, &str)]) -> BTreeMap<String, RefOr<Response>> {
    list.iter().map(|&(status, description)| problem(status, description)).collect()
}

/// Adds the answer of the rate limits (`crate::ratelimit`, a layer on every documented route) to
/// every operation of `openapi`, so that no operation can forget it.
pub fn answer_rate_limited(openapi: &mut OpenApi) {
    let (status, response) =
        problem(429, "Too many requests from this user (or, without a valid token, from this client address); retry after Retry-After seconds");
    for item in openapi.paths.paths.values_mut() {
        for operation in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.options, &mut item.head, &mut item.patch, &mut item.trace]
            .into_iter()
            .flatten()
        {
            operation.responses.responses.insert(status.clone(), response.clone());
        }
    }
}

/// Every command: a malformed header (any command reads `Idempotency-Key`, `If-Match` and
/// `X-Correlation-Id`), no valid token, a refused field or a reused `Idempotency-Key`, and the log
/// being unavailable (or the request timing out).
pub struct CommandProblems;

impl IntoResponses for CommandProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[
            (400, "A malformed header (Idempotency-Key, If-Match, X-Correlation-Id), or a body that is not valid JSON"),
            (401, "Missing, invalid or expired bearer token"),
            (422, "Validation failed (`errors` names the fields), or this Idempotency-Key was already used with a different request"),
            (503, "The event log is unavailable or the request took too long; nothing was appended (retry after Retry-After seconds)"),
        ])
    }
}

/// Commands with a JSON body.
pub struct JsonBodyProblems;

impl IntoResponses for JsonBodyProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[(413, "The body is larger than 64 KiB"), (415, "The body is not JSON (Content-Type: application/json)")])
    }
}

/// Commands on an existing task (`/v1/tasks/{id}...`), which honour `If-Match`.
pub struct TaskProblems;

impl IntoResponses for TaskProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[
            (404, "No such task (or it is another user's)"),
            (409, "The command conflicts with the task's state (e.g. the task is deleted, or already completed)"),
            (412, "If-Match: the task is at another version"),
        ])
    }
}

/// A read relayed to the query API (`GET /v1/me/export`): a malformed `X-Consistency-Token`, no
/// valid token, and the query API unavailable, busy, or not caught up in time.
pub struct ReadProblems;

impl IntoResponses for ReadProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[
            (400, "X-Consistency-Token is not a position returned by a command"),
            (401, "Missing, invalid or expired bearer token"),
            (503, "The query API is unavailable or busy, or the read models did not reach X-Consistency-Token in time (retry after Retry-After seconds)"),
        ])
    }
}
