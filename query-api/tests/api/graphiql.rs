//! GraphiQL in a real browser: headless Chromium (Debian's `chromium`, which `./dev test` installs)
//! loads `GET /graphql` from a query API on a real socket, driven over the DevTools protocol. The
//! page must render GraphiQL's editor, every request it makes must go to the query API itself (no
//! CDN: the assets are vendored and embedded), none may fail, and no script may throw. Chromium also
//! resolves every other host to nothing, so a page that reached out could not work by accident.
//!
//! Without Chromium the test fails, saying how to install it: it never skips.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::spawn_app;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol connection to the browser, talking to one page (a flattened session);
/// every event received is kept.
struct Cdp {
    socket: Socket,
    next_id: u64,
    session: Option<String>,
    events: Vec<Value>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.socket.send(Message::Text(msg.to_string().into())).await.map_err(|e| e.to_string())?;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.socket.next()).await.map_err(|_| format!("no answer to {method}"))?;
            let text = match next {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(_)) => continue,
                other => return Err(format!("the DevTools connection ended: {other:?}")),
            };
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            if v["id"] == json!(id) {
                return match v.get("error") {
                    Some(e) => Err(format!("{method}: {e}")),
                    None => Ok(v["result"].clone()),
                };
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    fn events(&self, method: &str) -> impl Iterator<Item = &Value> {
        let method = method.to_owned();
        self.events.iter().filter(move |e| e["method"] == json!(method)).map(|e| &e["params"])
    }

    /// Polls `expression` in the page until it is `true` (errors while the page loads count as not
    /// yet), or fails after `timeout` naming `what`.
    async fn wait_for(&mut self, what: &str, expression: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
            if matches!(&result, Ok(r) if r["result"]["value"] == json!(true)) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what} (last answer: {result:?})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A headless Chromium with a fresh profile; killed (and its profile removed) when dropped.
struct Browser {
    _child: Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Starts Chromium (`$CHROMIUM`, or `chromium` on the PATH) and connects to it.
async fn launch() -> (Browser, Cdp) {
    let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
    let profile = std::env::temp_dir().join(format!("taskstream-chromium-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&profile).unwrap();
    let child = Command::new(&binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            // Containers often have a small /dev/shm.
            "--disable-dev-shm-usage",
            // Any host but the query API's resolves to nothing.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("could not start Chromium ({binary}: {e}). `./dev test` installs it (apt-get install chromium); or set CHROMIUM to its path")
        });
    let browser = Browser { _child: child, profile: profile.clone() };
    // Chromium writes the port it picked and the browser's DevTools path into the profile.
    let active = profile.join("DevToolsActivePort");
    let endpoint = test_support::eventually("Chromium's DevTools endpoint", Duration::from_secs(30), || {
        let active = active.clone();
        async move {
            let text = std::fs::read_to_string(&active).ok()?;
            let mut lines = text.lines();
            let (port, path) = (lines.next()?.trim().to_owned(), lines.next()?.trim().to_owned());
            Some(format!("ws://127.0.0.1:{port}{path}"))
        }
    })
    .await
    .expect("Chromium started");
    let (socket, _) = tokio_tungstenite::connect_async(endpoint).await.expect("connects to Chromium's DevTools");
    (browser, Cdp { socket, next_id: 0, session: None, events: Vec::new() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_renders_in_headless_chromium_from_local_assets_only() {
    let app = spawn_app().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router.clone();
    tokio::spawn(async move { axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).await });

    let (_browser, mut cdp) = launch().await;
    let target = cdp.call("Target.createTarget", json!({"url": "about:blank"})).await.unwrap();
    let attached = cdp.call("Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true})).await.unwrap();
    cdp.session = attached["sessionId"].as_str().map(str::to_owned);
    for domain in ["Network.enable", "Page.enable", "Runtime.enable"] {
        cdp.call(domain, json!({})).await.unwrap();
    }
    let page = format!("{origin}/graphql");
    let navigated = cdp.call("Page.navigate", json!({"url": page})).await.unwrap();
    assert!(navigated.get("errorText").is_none(), "{navigated}");

    // GraphiQL's query editor (CodeMirror inside GraphiQL's layout) is on the page...
    cdp.wait_for(
        "GraphiQL's editor",
        "!!document.querySelector('.graphiql-container .graphiql-query-editor .CodeMirror') && !document.body.innerText.includes('Loading GraphiQL')",
        Duration::from_secs(60),
    )
    .await;
    // ...and it asked this query API for the schema (its fetcher works; without a token the answer
    // is 401, which GraphiQL shows).
    cdp.wait_for(
        "GraphiQL's introspection request to be answered",
        "performance.getEntriesByType('resource').some(e => e.name.endsWith('/graphql') && e.responseEnd > 0)",
        Duration::from_secs(30),
    )
    .await;

    let mut urls: Vec<String> = cdp.events("Network.requestWillBeSent").filter_map(|p| p["request"]["url"].as_str().map(str::to_owned)).collect();
    urls.extend(cdp.events("Network.webSocketCreated").filter_map(|p| p["url"].as_str().map(str::to_owned)));
    let ws_origin = origin.replacen("http", "ws", 1);
    let foreign: Vec<&String> =
        urls.iter().filter(|u| !(u.starts_with(&format!("{origin}/")) || u.starts_with(&format!("{ws_origin}/")) || u.starts_with("data:"))).collect();
    assert!(foreign.is_empty(), "requests that leave the query API: {foreign:?}");
    for asset in ["graphiql.min.js", "graphiql.min.css", "react.production.min.js", "react-dom.production.min.js", "start.js", "page.css"] {
        let url = format!("{origin}/graphiql/assets/{asset}");
        let status = cdp.events("Network.responseReceived").find(|p| p["response"]["url"] == json!(url)).map(|p| p["response"]["status"].clone());
        assert_eq!(status, Some(json!(200)), "{url} was not loaded (requests: {urls:#?})");
    }
    assert!(urls.contains(&page), "{urls:?}");
    let failed: Vec<&Value> = cdp.events("Network.loadingFailed").collect();
    assert!(failed.is_empty(), "requests that failed (blocked?): {failed:#?}");
    let thrown: Vec<&Value> = cdp.events("Runtime.exceptionThrown").collect();
    assert!(thrown.is_empty(), "the page threw: {thrown:#?}");
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_their_types() {
    let app = spawn_app().await;
    let page = app.get("/graphql").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("script-src 'self'") && !csp.contains("unsafe-eval"), "{csp}");
    for (asset, content_type) in [("graphiql.min.js", "text/javascript; charset=utf-8"), ("graphiql.min.css", "text/css; charset=utf-8")] {
        let a = app.get(&format!("/graphiql/assets/{asset}")).await;
        assert_eq!(a.status, 200, "{asset}");
        assert_eq!(a.headers["content-type"], content_type, "{asset}");
    }
    assert_eq!(app.get("/graphiql/assets/nothing.js").await.status, 404);
}
