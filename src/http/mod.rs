//! The HTTP edge (`KABAR_HTTP_ADDR`): liveness and readiness for Kubernetes, systemd watchdogs and
//! load balancers that do not speak gRPC health, and Prometheus metrics.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::json;

/// What the HTTP endpoints report: readiness (kept current by the health monitor and shutdown)
/// and the metrics.
pub struct HttpState {
    pub shutting_down: AtomicBool,
    pub store_reachable: AtomicBool,
    pub store_kind: &'static str,
    pub driver: &'static str,
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub fn router(http_state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(http_state)
}

async fn metrics(State(r): State<Arc<HttpState>>) -> impl axum::response::IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        r.metrics.render(
            r.store_reachable.load(Ordering::Relaxed),
            r.shutting_down.load(Ordering::Relaxed),
        ),
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
        })),
    )
}
