//! The query API as the command API reaches it, for the one read the contract lists among the
//! command API's routes (`GET /v1/me/export`): the request is relayed to `QUERY_API_URL` with the
//! caller's `Authorization` (and `X-Consistency-Token`, `X-Correlation-Id`, `traceparent`), and the
//! answer's status, media type, download name and body are relayed back, the body streamed as it
//! arrives (an export can be large). The query API not answering is a 503 problem+json with
//! `Retry-After`; a body cut short there is cut short here (the connection closes without the final
//! chunk), never passed off as complete.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// `QUERY_API_URL` when neither it nor `QUERY_API_ADDR` is set.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8081";

/// Request headers that travel to the query API.
const REQUEST_HEADERS: [&str; 4] = ["authorization", "x-consistency-token", "x-correlation-id", "traceparent"];
/// Answer headers that travel back.
const ANSWER_HEADERS: [HeaderName; 5] =
    [header::CONTENT_TYPE, header::CONTENT_DISPOSITION, header::CACHE_CONTROL, header::RETRY_AFTER, header::WWW_AUTHENTICATE];

/// The base URL of the query API: `url` when given (`QUERY_API_URL`), else the query API on this
/// host at `addr` (`QUERY_API_ADDR`, which `./dev` and the end-to-end tests give every service;
/// a wildcard address is reached on loopback), else [`DEFAULT_URL`].
pub fn base_url(url: Option<&str>, addr: Option<std::net::SocketAddr>) -> String {
    match (url, addr) {
        (Some(url), _) => url.trim_end_matches('/').to_owned(),
        (None, Some(mut addr)) => {
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
            }
            format!("http://{addr}")
        }
        (None, None) => DEFAULT_URL.to_owned(),
    }
}

#[derive(Clone, Debug)]
pub struct QueryApi {
    client: reqwest::Client,
    base: String,
}

impl QueryApi {
    /// A client of the query API at `base` (an absolute http(s) URL).
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(base).map_err(|e| anyhow::anyhow!("QUERY_API_URL {base:?} is not a URL: {e}"))?;
        anyhow::ensure!(matches!(url.scheme(), "http" | "https"), "QUERY_API_URL {base:?} must be an http(s) URL");
        // No overall timeout: a large export streams for as long as it takes. The answer's head is
        // bounded by the request time limit (`routes::time_limit`), each read of the body here.
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .read_timeout(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self { client, base: base.trim_end_matches('/').to_owned() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET <base><path>` with the caller's headers; the answer relayed.
    pub async fn relay_get(&self, path: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.client.get(&url);
        for name in REQUEST_HEADERS {
            for value in headers.get_all(name) {
                req = req.header(name, value.clone());
            }
        }
        let res = req.send().await.map_err(|e| ApiError::QueryApiUnavailable(format!("GET {url}: {e}")))?;
        let status = StatusCode::from_u16(res.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut relayed = HeaderMap::new();
        for name in ANSWER_HEADERS {
            if let Some(value) = res.headers().get(&name) {
                relayed.insert(name, value.clone());
            }
        }
        metrics::counter!("command_api_relayed_reads_total", "status" => status.as_str().to_owned()).increment(1);
        let body =
            Body::from_stream(futures::stream::try_unfold(res, |mut res| async move { Ok::<_, reqwest::Error>(res.chunk().await?.map(|chunk| (chunk, res))) }));
        Ok((status, relayed, body).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_comes_from_the_setting_then_the_query_apis_address_then_the_default() {
        assert_eq!(base_url(Some("http://query-api:8081/"), Some("127.0.0.1:9".parse().unwrap())), "http://query-api:8081");
        assert_eq!(base_url(None, Some("127.0.0.1:18081".parse().unwrap())), "http://127.0.0.1:18081");
        assert_eq!(base_url(None, Some("0.0.0.0:8081".parse().unwrap())), "http://127.0.0.1:8081");
        assert_eq!(base_url(None, Some("[::]:8081".parse().unwrap())), "http://[::1]:8081");
        assert_eq!(base_url(None, None), DEFAULT_URL);
    }

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(QueryApi::new("http://127.0.0.1:8081").is_ok());
        assert!(QueryApi::new("ftp://example.com").is_err());
        assert!(QueryApi::new("not a url").is_err());
    }
}
