//! GraphiQL, served by the query API itself: the page (`GET /graphql` without a query) and its
//! assets under `/graphiql/assets/`, embedded in the binary from `query-api/assets/graphiql/`
//! (GraphiQL, React and ReactDOM vendored from npm at pinned versions, see the README there), so the
//! page works on a machine without internet. Its Content-Security-Policy lets it load nothing from
//! another origin.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Where the assets are served (the page names them under this path).
pub const ASSETS_PATH: &str = "/graphiql/assets";

/// Only this origin: scripts and styles from `ASSETS_PATH`, requests to `/graphql` (and its
/// WebSocket); inline styles because GraphiQL's components set some; images and fonts also as
/// `data:` URLs (the stylesheet embeds its fonts).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
     font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

const PAGE: &str = include_str!("../assets/graphiql/index.html");

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $path:literal, $content_type:literal) => {
        Asset { name: $name, content_type: $content_type, body: include_bytes!(concat!("../assets/graphiql/", $path)) }
    };
}

const ASSETS: &[Asset] = &[
    asset!("graphiql.min.js", "vendor/graphiql.min.js", "text/javascript; charset=utf-8"),
    asset!("graphiql.min.css", "vendor/graphiql.min.css", "text/css; charset=utf-8"),
    asset!("react.production.min.js", "vendor/react.production.min.js", "text/javascript; charset=utf-8"),
    asset!("react-dom.production.min.js", "vendor/react-dom.production.min.js", "text/javascript; charset=utf-8"),
    asset!("start.js", "start.js", "text/javascript; charset=utf-8"),
    asset!("page.css", "page.css", "text/css; charset=utf-8"),
];

/// The routes of the assets (the page itself is `GET /graphql`'s answer without a query: [`page`]).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(&format!("{ASSETS_PATH}/{{name}}"), get(asset))
}

/// The GraphiQL page.
pub fn page() -> Response {
    let mut res = (StatusCode::OK, PAGE).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    res
}

async fn asset(Path(name): Path<String>) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let mut res = (StatusCode::OK, asset.body).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    // The names carry no version: a day, so that an upgrade shows within one.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every script and stylesheet the page names is served here, and nothing is named by an
    /// absolute URL (another origin).
    #[test]
    fn the_page_names_only_assets_served_here() {
        let referenced: Vec<&str> = PAGE.split(['"', '\'']).filter(|s| s.contains(".js") || s.contains(".css") || s.contains("://")).collect();
        assert!(referenced.len() >= 6, "{referenced:?}");
        for r in referenced {
            let name = r.strip_prefix(ASSETS_PATH).and_then(|n| n.strip_prefix('/')).unwrap_or_else(|| panic!("{r} is not under {ASSETS_PATH}"));
            assert!(ASSETS.iter().any(|a| a.name == name), "{name} is not served");
        }
    }
}
