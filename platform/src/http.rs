//! HTTP pieces every service shares: graceful-shutdown signal and the Prometheus endpoint.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            // Latency metrics (names ending in `_seconds`) are histograms with these buckets.
            let builder = || {
                PrometheusBuilder::new()
                    .set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                        &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                    )
                    .expect("non-empty buckets")
            };
            builder().install_recorder().unwrap_or_else(|_| builder().build_recorder().handle())
        })
        .clone()
}

/// `GET /metrics` in the Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics_handle().render())
}

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Connections the kernel may hold for a service before it accepts them (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). tokio's `TcpListener::bind` asks for 1 024. A client
/// that opens connections faster than a busy box accepts them overflowed that queue: the kernel
/// dropped the handshakes and the clients sent them again after 1 s, 3 s, 7 s. At 1 000 commands/s
/// on the 2-core box, `loadgen latency` overflowed it 13 117 times in 30 s (`nstat
/// TcpExtListenOverflows`); with this backlog, never.
pub const LISTEN_BACKLOG: u32 = 8_192;

/// Binds a service's listening address; a failure names the address and the variable that sets it
/// (e.g. another instance still holds the port).
pub async fn listen(addr: std::net::SocketAddr, variable: &str) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    let bind = || -> std::io::Result<tokio::net::TcpListener> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As `TcpListener::bind` does: a restarted service binds its port again at once, while
        // connections of its previous run are still in TIME-WAIT.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().with_context(|| format!("cannot listen on {addr} (set by {variable})"))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A burst of connections that the service has not accepted yet is queued, not dropped: with
    /// tokio's default backlog (1 024) the connections past it got no answer to their handshake
    /// (the kernel retries it after 1 s, 3 s, …), so 175 of these 1 200 timed out.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_listen_queue() {
        // 1 200 connections, past tokio's 1 024, where the process may open that many.
        let open_files: usize = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| l.lines().find(|l| l.starts_with("Max open files"))?.split_whitespace().nth(3)?.parse().ok())
            .unwrap_or(1_024);
        let burst = 1_200.min(open_files.saturating_sub(100));
        let listener = listen("127.0.0.1:0".parse().unwrap(), "TEST_ADDR").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The kernel caps the backlog at net.core.somaxconn (and holds one more than the backlog).
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(4096);
        let expected = burst.min(somaxconn.min(LISTEN_BACKLOG as usize) + 1);
        let connects = (0..burst).map(|_| tokio::time::timeout(Duration::from_millis(2_500), tokio::net::TcpStream::connect(addr)));
        let streams = futures::future::join_all(connects).await;
        let connected = streams.iter().filter(|s| matches!(s, Ok(Ok(_)))).count();
        let failed: Vec<String> = streams
            .iter()
            .filter_map(|s| match s {
                Ok(Err(e)) => Some(e.to_string()),
                _ => None,
            })
            .take(3)
            .collect();
        assert!(failed.is_empty(), "connections failed (not timed out): {failed:?}");
        assert!(connected >= expected, "{connected} of {burst} connections were queued before any was accepted; expected {expected}");
    }

    #[tokio::test]
    async fn a_taken_address_is_named_with_the_variable_that_sets_it() {
        let taken = listen("127.0.0.1:0".parse().unwrap(), "TEST_ADDR").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = listen(addr, "COMMAND_API_ADDR").await.unwrap_err();
        assert_eq!(error.to_string(), format!("cannot listen on {addr} (set by COMMAND_API_ADDR)"));
    }
}
