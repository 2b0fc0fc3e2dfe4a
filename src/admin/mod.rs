//! The admin HTTP listener: `/metrics`, `/healthz` and `/readyz`.
//!
//! - `/metrics` returns every metric in the Prometheus text format 0.0.4,
//!   after the gauges read at scrape time were refreshed.
//! - `/healthz` returns 200 while the process runs.
//! - `/readyz` returns 200 when the process accepts mail and 503 with the
//!   reason otherwise; see [`Readiness`].
//!
//! HTTP/1.1 only, served with hyper. Any other path gets 404 and any method
//! but GET and HEAD gets 405. Each connection must send its request head
//! within [`HEADER_TIMEOUT`].

mod readiness;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::directory::Directory;
use crate::metrics::Metrics;
use crate::queue::Queue;
pub use readiness::Readiness;

/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The sources the admin endpoints read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub queue: Option<Queue>,
    pub directory: Option<Arc<Directory>>,
}

/// A bound admin listener.
pub struct AdminServer {
    socket: TcpListener,
    state: Arc<AdminState>,
}

impl AdminServer {
    pub async fn bind(address: SocketAddr, state: AdminState) -> anyhow::Result<AdminServer> {
        let socket = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} (admin.address)"))?;
        Ok(AdminServer {
            socket,
            state: Arc::new(state),
        })
    }

    pub fn local_address(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }

    /// Serves until `shutdown`; requests in progress then get a moment to
    /// finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let address = self
            .local_address()
            .map(|address| address.to_string())
            .unwrap_or_default();
        tracing::info!(address = %address, "admin listener serving /metrics, /healthz and /readyz");
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                accepted = self.socket.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            let (stream, _) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = Arc::clone(&self.state);
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let service = service_fn(move |request| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(respond(&state, request).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(error = %error, "admin connection ended with an error");
                        }
                    }
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
                    }
                }
            });
        }
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn respond(state: &AdminState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            state
                .metrics
                .refresh(state.queue.as_ref(), state.directory.as_deref());
            let mut response = text(StatusCode::OK, state.metrics.encode());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match state.readiness.check().await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    }
}
