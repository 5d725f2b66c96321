//! Request extractors whose rejections are problem+json: the caller, command headers, JSON bodies;
//! and the layer that keeps a command request as it arrived (to forward it to its partition's owner).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRef, FromRequest, FromRequestParts, MatchedPath, Path, RawPathParams, Request};
use axum::http::{header, request::Parts, HeaderMap, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use domain::{TaskId, UserId};
use platform::auth::{Caller, JwtAuth};
use platform::keys::DataKey;

use crate::error::ApiError;

/// Largest accepted request body.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// The authenticated caller (`Authorization: Bearer <JWT>`): a user, or a service acting for one.
pub struct AuthUser(pub UserId, pub Option<String>);

impl AuthUser {
    pub fn is_service(&self) -> bool {
        self.1.is_some()
    }
}

impl<S> FromRequestParts<S> for AuthUser
where
    JwtAuth: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Verified already by the rate limits' layer (ratelimit.rs), when the route has it.
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(AuthUser(caller.user.clone(), caller.service.clone()));
        }
        let auth = JwtAuth::from_ref(state);
        let header = parts.headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let caller = auth.authenticate_caller(header)?;
        Ok(AuthUser(caller.user, caller.service))
    }
}

/// The `{id}` of a route (a task, a notification). An id that is not a UUID (or not even decodable,
/// like `%FF`) names nothing: 404 problem+json, like an unknown one.
pub struct IdPath(pub uuid::Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await.map_err(|e| match e {
            PathRejection::FailedToDeserializePathParams(_) => ApiError::NotFound,
            other => ApiError::Internal(other.body_text()),
        })?;
        uuid::Uuid::parse_str(&raw).map(IdPath).map_err(|_| ApiError::NotFound)
    }
}

/// The `{id}` of a task route (see `IdPath`).
pub struct TaskPath(pub TaskId);

impl<S: Send + Sync> FromRequestParts<S> for TaskPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        IdPath::from_request_parts(parts, state).await.map(|IdPath(id)| TaskPath(TaskId::from_uuid(id)))
    }
}

/// A caller that must be the service identity; to anyone else the route does not exist (404),
/// whatever the request holds.
pub struct ServiceCaller(pub AuthUser);

impl<S> FromRequestParts<S> for ServiceCaller
where
    JwtAuth: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let caller = AuthUser::from_request_parts(parts, state).await?;
        if caller.is_service() {
            Ok(ServiceCaller(caller))
        } else {
            Err(ApiError::NotFound)
        }
    }
}

/// Headers that shape a command: `If-Match`, `Idempotency-Key`, `X-Correlation-Id`, `traceparent`.
#[derive(Debug, Default)]
pub struct CommandHeaders {
    pub if_match: Option<u32>,
    pub idempotency_key: Option<String>,
    pub correlation_id: Option<String>,
    /// `X-Causation-Id` (honoured for service callers: the event that caused a reaction).
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    /// Forwarded by another instance (which found this one the partition's owner).
    pub forwarded: bool,
    /// On a forwarded create without `task_id`: the id the forwarding instance chose.
    pub forwarded_task_id: Option<uuid::Uuid>,
    /// The request as it arrived, to forward it to the partition's owner.
    pub raw: Option<Arc<RawRequest>>,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers.get(name).map(|v| v.to_str().map_err(|_| ApiError::BadRequest(format!("header {name} must be visible ASCII")))).transpose()
}

fn visible_ascii(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl<S: Send + Sync> FromRequestParts<S> for CommandHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let h = &parts.headers;
        let if_match = header_str(h, "if-match")?
            .map(|v| {
                let v = v.trim();
                let inner = v.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(v);
                inner.parse::<u32>().map_err(|_| ApiError::BadRequest(format!("If-Match must be a task version in quotes, like \"3\" (got {v})")))
            })
            .transpose()?;
        let idempotency_key = header_str(h, "idempotency-key")?
            .map(|k| {
                if visible_ascii(k, 255) {
                    Ok(k.to_owned())
                } else {
                    Err(ApiError::BadRequest("Idempotency-Key must be 1..=255 visible ASCII characters".into()))
                }
            })
            .transpose()?;
        let correlation_id = header_str(h, "x-correlation-id")?
            .map(|c| {
                if visible_ascii(c, 128) {
                    Ok(c.to_owned())
                } else {
                    Err(ApiError::BadRequest("X-Correlation-Id must be 1..=128 visible ASCII characters".into()))
                }
            })
            .transpose()?;
        let causation_id = header_str(h, "x-causation-id")?.filter(|c| visible_ascii(c, 128)).map(str::to_owned);
        // W3C trace context: version-traceid-parentid-flags; an invalid one is ignored, as the spec says.
        let traceparent = header_str(h, "traceparent")?.filter(|t| is_traceparent(t)).map(str::to_owned);
        let forwarded = h.contains_key(FORWARDED_BY);
        let forwarded_task_id = if forwarded { header_str(h, FORWARDED_TASK_ID)?.and_then(|v| v.parse::<uuid::Uuid>().ok()) } else { None };
        let raw = parts.extensions.get::<Arc<RawRequest>>().cloned();
        Ok(Self { if_match, idempotency_key, correlation_id, causation_id, traceparent, forwarded, forwarded_task_id, raw })
    }
}

fn is_traceparent(t: &str) -> bool {
    let parts: Vec<&str> = t.split('-').collect();
    parts.len() == 4 && [2, 32, 16, 2].iter().zip(&parts).all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A JSON body, parsed into `T` with field paths in errors, plus a digest of its canonical form
/// (for `Idempotency-Key`).
pub struct JsonBody<T> {
    pub value: T,
    pub canonical: Vec<u8>,
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(BODY_LIMIT_BYTES)
            } else {
                ApiError::BadRequest(format!("could not read the body: {rejection}"))
            }
        })?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
        if !json.is_object() {
            return Err(ApiError::validation("", "the body must be a JSON object"));
        }
        let canonical = serde_json::to_vec(&json).map_err(|e| ApiError::Internal(e.to_string()))?;
        let value = serde_path_to_error::deserialize(json).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let field = if path == "." { field_from_message(&inner).unwrap_or_default() } else { path };
            ApiError::validation(&field, inner)
        })?;
        Ok(JsonBody { value, canonical })
    }
}

/// serde reports unknown/missing fields at the root; pull the field name out of its message.
fn field_from_message(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let end = start + msg[start..].find('`')?;
    Some(msg[start..end].to_owned())
}

/// The route a command came in on: its method and the matched route template with the parameters
/// in canonical form (a UUID written in upper case names the same task). The Idempotency-Key digest
/// is computed from it, so no handler retypes its own path.
pub struct CommandRoute {
    method: Method,
    path: String,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandRoute {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let template = parts.extensions.get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| parts.uri.path().to_owned());
        let params = RawPathParams::from_request_parts(parts, state).await.map_err(|_| ApiError::NotFound)?;
        let mut path = template;
        for (name, value) in params.iter() {
            let canonical = uuid::Uuid::parse_str(value).map(|u| u.to_string()).unwrap_or_else(|_| value.to_owned());
            path = path.replace(&format!("{{{name}}}"), &canonical);
        }
        Ok(Self { method: parts.method.clone(), path })
    }
}

impl CommandRoute {
    /// The digest of this request (method, path, `If-Match` when the command honours it, canonical body).
    pub fn digest(&self, if_match: Option<u32>, body: &[u8]) -> RequestDigest {
        RequestDigest {
            plain: request_digest(self.method.as_str(), &self.path, if_match, body),
            lowercase_method: request_digest(&self.method.as_str().to_ascii_lowercase(), &self.path, if_match, body),
            keyed: Vec::new(),
        }
    }
}

/// What identifies a request under an Idempotency-Key: the same key with another request is refused.
///
/// The request's body holds personal data (a title, a description), and the digest is recorded in
/// the log, which outlives an erasure: a plain hash of a short body could be confirmed by guessing.
/// So what is recorded is keyed with the user's data key ([`RequestDigest::keyed_with`]): after an
/// erasure destroys the key, nobody can check a guess against it.
#[derive(Debug, Clone)]
pub struct RequestDigest {
    /// SHA-256 of the request (never recorded now; what earlier versions recorded).
    plain: String,
    /// The same with the method in lower case, as earlier versions recorded it for
    /// complete/reopen/delete, so that a retry across an upgrade is still recognised.
    lowercase_method: String,
    /// HMAC-SHA256 of `plain` under a key derived from each of the user's data keys, the current
    /// one first (the one recorded).
    keyed: Vec<String>,
}

/// The purpose a data key is derived for to key request digests (`DataKey::mac_hex`).
const DIGEST_PURPOSE: &str = "taskstream request digest v1";

impl RequestDigest {
    /// Keyed with the user's data keys: the first is recorded, any of them matches (a user made
    /// at once on two instances has two keys, and each instance may call another one current).
    /// None (e.g. an erasure's own request, which carries no personal data): the plain digest is
    /// recorded.
    pub fn keyed_with<'k>(mut self, keys: impl IntoIterator<Item = &'k DataKey>) -> Self {
        self.keyed = keys.into_iter().map(|k| k.mac_hex(DIGEST_PURPOSE, self.plain.as_bytes())).collect();
        self
    }

    /// Recorded with the command's events (`ce_requestdigest`) and kept with its answer.
    pub fn recorded(&self) -> &str {
        self.keyed.first().unwrap_or(&self.plain)
    }

    /// Whether `recorded` (kept with an earlier answer under the same Idempotency-Key) is this
    /// request's digest, as this version or an earlier one recorded it.
    pub fn matches(&self, recorded: &str) -> bool {
        self.keyed.iter().any(|k| k == recorded) || recorded == self.plain || recorded == self.lowercase_method
    }
}

fn request_digest(method: &str, path: &str, if_match: Option<u32>, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(if_match.map(|v| v.to_string()).unwrap_or_default().as_bytes());
    h.update(b"\n");
    h.update(body);
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_recorded_request_digest_is_keyed_with_the_users_data_key_and_earlier_ones_still_match() {
        let ring = platform::keys::KeyRing::in_memory(platform::keys::Keks::dev());
        let (alice, bob) = (ring.ensure("alice").await.unwrap(), ring.ensure("bob").await.unwrap());
        let route = CommandRoute { method: Method::POST, path: "/v1/tasks".into() };
        let digest = route.digest(None, br#"{"title":"see the doctor"}"#);
        let plain = digest.recorded().to_owned();
        assert_eq!(plain.len(), 64);
        let keyed = digest.clone().keyed_with([&*alice]);
        assert_eq!(keyed.recorded().len(), 64, "hex HMAC-SHA256");
        assert_ne!(keyed.recorded(), plain, "not the plain hash, which a guess could confirm");
        assert_ne!(digest.clone().keyed_with([&*bob]).recorded(), keyed.recorded(), "another key, another digest");
        assert!(keyed.matches(keyed.recorded()));
        assert!(keyed.matches(&plain), "a digest recorded by an earlier version still matches");
        assert!(!keyed.matches(route.digest(None, br#"{"title":"other"}"#).keyed_with([&*alice]).recorded()));
        let both = digest.clone().keyed_with([&*bob, &*alice]);
        assert!(both.matches(keyed.recorded()) && both.recorded() != keyed.recorded(), "any of the user's keys matches; the first is recorded");
        assert_eq!(digest.keyed_with([]).recorded(), plain, "no data key (an erasure's request): the plain digest");
    }

    #[test]
    fn traceparent_shape() {
        assert!(is_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_traceparent("00-xyz-00f067aa0ba902b7-01"));
    }

    #[test]
    fn field_names_come_out_of_serde_messages() {
        assert_eq!(field_from_message("unknown field `colour`, expected one of ..."), Some("colour".into()));
    }
}

/// Marks a forwarded request (its value: the forwarding instance).
pub const FORWARDED_BY: &str = "taskstream-forwarded-by";
/// On a forwarded create without a `task_id`: the id the forwarding instance chose.
pub const FORWARDED_TASK_ID: &str = "taskstream-task-id";

/// A command request as it arrived.
#[derive(Debug)]
pub struct RawRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Layer on the command routes: keeps the request (body included) so it can be forwarded.
pub async fn capture(req: Request, next: Next) -> Response {
    if req.method() == Method::GET {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, BODY_LIMIT_BYTES).await {
        Ok(b) => b,
        Err(_) => return ApiError::PayloadTooLarge(BODY_LIMIT_BYTES).into_response(),
    };
    let raw = Arc::new(RawRequest { method: parts.method.clone(), uri: parts.uri.clone(), headers: parts.headers.clone(), body: body.clone() });
    parts.extensions.insert(raw);
    next.run(Request::from_parts(parts, Body::from(body))).await
}
