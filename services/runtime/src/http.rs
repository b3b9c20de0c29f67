//! The operations endpoint: `/healthz` (process alive), `/readyz` (connected and
//! taking work; 503 while draining) and `/metrics` (Prometheus text). A minimal
//! HTTP/1.1 responder: these three GETs are all it has to serve.

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Readiness shared between a service and its endpoint.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Binds `addr` (empty = disabled) and serves until shutdown. Returns the bound address.
pub async fn serve_ops(
    addr: &str,
    metrics: Metrics,
    ready: Readiness,
    shutdown: Shutdown,
) -> std::io::Result<Option<std::net::SocketAddr>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            };
            let metrics = metrics.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if ready.is_ready() => ("200 OK", "ready\n".to_string()),
                    "/readyz" => ("503 Service Unavailable", "not ready\n".to_string()),
                    "/metrics" => ("200 OK", metrics.render()),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(Some(local))
}
