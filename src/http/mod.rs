//! The HTTP edge (`KABAR_HTTP_ADDR`): liveness and readiness for Kubernetes, systemd watchdogs and
//! load balancers that do not speak gRPC health, and Prometheus metrics.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::listen::Admission;

pub mod webhook;

/// Open connections on the HTTP port at most: probes and a metrics scraper need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head (request line and headers) read.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves `router` over HTTP/1.1 until `drain` is cancelled. Each connection answers one request
/// (no keep-alive): an idle connection cannot hold a slot, and a request whose headers do not
/// arrive within the slow-client timeout is closed (hyper's header-read timeout).
pub async fn serve(
    listener: TcpListener,
    admission: Arc<Admission>,
    router: Router,
    header_timeout: std::time::Duration,
    drain: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD_BYTES);
    loop {
        let (conn, _) = tokio::select! {
            accepted = admission.accept(&listener) => accepted,
            () = drain.cancelled() => return,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
        let drain = drain.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = drain.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

/// What the HTTP endpoints report: readiness (kept current by the health monitor and shutdown)
/// and the metrics.
pub struct HttpState {
    pub shutting_down: AtomicBool,
    pub store_reachable: AtomicBool,
    pub store_kind: &'static str,
    pub driver: &'static str,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub pacer: Arc<crate::domain::pacing::Pacer>,
    pub batch_worker: Arc<crate::domain::batch::worker::Worker>,
    /// The number's state and the sends' outcomes, for `/status`.
    pub connection: Arc<crate::ops::status::Connection>,
    /// Sends by template and outcome, for `/metrics`.
    pub sends: Arc<crate::domain::tally::SendTally>,
}

pub fn router(http_state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(http_state)
}

async fn metrics(State(r): State<Arc<HttpState>>) -> impl axum::response::IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        r.metrics.render(
            r.store_reachable.load(Ordering::Relaxed),
            r.shutting_down.load(Ordering::Relaxed),
        ) + &crate::metrics::render_pacing(&r.pacer.snapshot())
            + &crate::metrics::render_batch(&r.batch_worker.snapshot())
            + &crate::metrics::render_sends(&r.sends.snapshot()),
    )
}

/// 200 while kabar accepts calls; 503 once shutdown has begun. The OTP store's state is reported
/// but does not make the whole process unready: notifications still go out while Redis is down.
async fn ready(State(r): State<Arc<HttpState>>) -> (StatusCode, Json<serde_json::Value>) {
    let shutting_down = r.shutting_down.load(Ordering::Relaxed);
    let store = r.store_reachable.load(Ordering::Relaxed);
    let status = if shutting_down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        status,
        Json(json!({
            "ready": !shutting_down,
            "shutting_down": shutting_down,
            "driver": r.driver,
            "otp_store": r.store_kind,
            "otp_store_reachable": store,
            "pacing": pacing_status(&r.pacer.snapshot()),
        })),
    )
}

/// The connection status: the number (as Meta last described it, read in the background),
/// the last accepted send and the last failure with its remedy, the store, pacing and the
/// batches. Never calls Meta, so a probe may ask as often as it likes.
async fn status(State(r): State<Arc<HttpState>>) -> Json<serde_json::Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = |at: Option<u64>| at.map(|t| now.saturating_sub(t));
    let number = r.connection.number();
    let sends = r.connection.last_sends();
    let batches = r.batch_worker.snapshot();
    Json(json!({
        "driver": r.driver,
        "now": now,
        "number": {
            "phone_number_id": number.phone_number_id,
            "display_phone_number": number.display_phone_number,
            "verified_name": number.verified_name,
            "status": number.status,
            "quality_rating": number.quality_rating,
            "messaging_limit": number.messaging_limit,
            "throughput": number.throughput,
            "checked_at": number.checked_at,
            "checked_seconds_ago": ago(number.checked_at),
            "check_error": number.check_error,
        },
        "last_success_at": sends.as_ref().and_then(|s| s.success_at),
        "last_success_seconds_ago": ago(sends.as_ref().and_then(|s| s.success_at)),
        "last_error": sends.and_then(|s| s.error),
        "store": {
            "kind": r.store_kind,
            "reachable": r.store_reachable.load(Ordering::Relaxed),
        },
        "pacing": pacing_status(&r.pacer.snapshot()),
        "batches": {
            "active": batches.active,
            "items_in_hand": batches.in_hand,
        },
        "shutting_down": r.shutting_down.load(Ordering::Relaxed),
    }))
}

/// Pacing as `/readyz` shows it: where the schedule lives and the limits in force.
fn pacing_status(p: &crate::domain::pacing::PacingSnapshot) -> serde_json::Value {
    json!({
        "mode": p.mode,
        "max_mps": p.max_mps,
        "effective_mps": p.effective_mps,
        "daily_limit": if p.daily_limit == 0 { json!("unlimited") } else { json!(p.daily_limit) },
        "daily_limit_source": p.daily_limit_source,
        "daily_recipients": p.daily_used,
    })
}
