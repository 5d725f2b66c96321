//! Forwarding a command to the instance that owns its partition, answered to the client as if this
//! instance had executed it. The request is kept as it arrived (`extract::RawRequest`, captured by a
//! layer on the command routes) and replayed to the owner with `Taskstream-Forwarded-By`; an owner
//! that no longer owns the partition answers 503 instead of forwarding again (no loops).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::extract::{RawRequest, FORWARDED_BY, FORWARDED_TASK_ID};
use crate::log::OwnerRecord;

/// Headers that belong to one hop, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(name.as_str(), "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive" | "upgrade" | "te" | "trailer" | "proxy-connection")
}

#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    me: HeaderValue,
}

impl Forwarder {
    pub fn new(instance: &str, timeout: Duration) -> Self {
        let client = reqwest::Client::builder().timeout(timeout).pool_idle_timeout(Duration::from_secs(30)).build().expect("a plain HTTP client");
        Self { client, me: HeaderValue::from_str(instance).unwrap_or(HeaderValue::from_static("command-api")) }
    }

    /// Sends `raw` to `owner` and returns its answer.
    pub async fn forward(&self, owner: &OwnerRecord, raw: &RawRequest, task_id: Option<uuid::Uuid>) -> Result<Response, ApiError> {
        let path = raw.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = format!("{}{}", owner.url.trim_end_matches('/'), path);
        let mut headers = HeaderMap::with_capacity(raw.headers.len() + 2);
        for (name, value) in &raw.headers {
            if !hop_by_hop(name) && name != FORWARDED_BY && name != FORWARDED_TASK_ID {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(FORWARDED_BY, self.me.clone());
        if let Some(id) = task_id {
            if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
                headers.insert(FORWARDED_TASK_ID, v);
            }
        }
        let unavailable = |e: String| {
            ApiError::Unavailable(format!(
                "the owner of partition {} ({}) did not answer: {e}; the partition moves to another instance when it is gone",
                owner.partition, owner.instance
            ))
        };
        let res = self.client.request(raw.method.clone(), &url).headers(headers).body(raw.body.clone()).send().await.map_err(|e| unavailable(e.to_string()))?;
        metrics::counter!("commands_forwarded_total").increment(1);
        let status = StatusCode::from_u16(res.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut out_headers = HeaderMap::with_capacity(res.headers().len());
        for (name, value) in res.headers() {
            if !hop_by_hop(name) {
                out_headers.append(name.clone(), value.clone());
            }
        }
        let body = res.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        let mut response = (status, body).into_response();
        *response.headers_mut() = out_headers;
        Ok(response)
    }
}
