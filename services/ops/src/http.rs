//! The operations endpoint over `axum`: `GET /healthz` (the process is alive),
//! `GET /readyz` (connected and taking work; 503 while starting or draining) and
//! `GET /metrics` (the Prometheus text exposition). Any other path is 404.

use crate::{Metrics, Readiness};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// The content type of the OpenMetrics text exposition.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct Ops {
    metrics: Metrics,
    ready: Readiness,
}

/// The routes, for serving or for testing without a socket.
pub fn router(metrics: Metrics, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Ops { metrics, ready })
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.ready.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], ops.metrics.render())
}

/// Binds `addr` (empty = disabled) and serves until `shutdown` is cancelled.
/// Returns the bound address (useful with port 0), or `None` when disabled.
///
/// # Errors
/// The address does not parse or cannot be bound.
pub async fn serve(
    addr: &str,
    metrics: Metrics,
    ready: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<Option<SocketAddr>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(metrics, ready);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            eprintln!("the operations endpoint stopped: {e}");
        }
    });
    Ok(Some(local))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A request split across two writes is still one request (the hand-written
    /// responder this replaced answered 404 to the first fragment).
    #[tokio::test]
    async fn serves_a_request_split_across_packets() {
        let metrics = Metrics::new();
        metrics.request("tasks.create", "ok", std::time::Duration::from_millis(2));
        let ready = Readiness::default();
        let stop = CancellationToken::new();
        let addr = serve("127.0.0.1:0", metrics, ready.clone(), stop.clone())
            .await
            .unwrap()
            .unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let (a, b) = req.split_at(7);
            s.write_all(a.as_bytes()).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            s.write_all(b.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(
            m.contains("tanjiren_requests_total{subject=\"tasks.create\",outcome=\"ok\"} 1"),
            "{m}"
        );
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
    }
}
