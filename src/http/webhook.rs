//! Meta's webhook (`KABAR_WEBHOOK_ADDR`, `/webhook/whatsapp/meta`): the one endpoint that faces
//! the internet, on a listener of its own so that an operator exposes exactly this and nothing
//! else.
//!
//! - `GET`: Meta's verification handshake. `hub.verify_token` equal to
//!   `META_WA_WEBHOOK_VERIFY_TOKEN` answers 200 with `hub.challenge`; anything else 403.
//! - `POST`: the signature (`X-Hub-Signature-256`, keyed with `META_APP_SECRET`) is checked over
//!   the raw bytes before anything is parsed: missing or wrong, 401 and nothing stored. Over
//!   3 MiB, 413. Signed but not a webhook body, 400. Stored, 200. The store unreachable, 503:
//!   Meta retries for days, so nothing is lost, and updates already applied are recognised as
//!   duplicates when the delivery comes again.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Query, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::get,
};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    domain::{
        delivery::{Delivery, Incoming},
        error::Error,
        status::{AccountEvent, Event, InboundMessage, MetaError, State as DeliveryStatus},
    },
    metrics::Metrics,
    store::now_ms,
    whatsapp::{
        reason_of_code,
        webhook::{self, DeliveryState, WebhookEvent},
    },
};

/// The path Meta is pointed at.
pub const PATH: &str = "/webhook/whatsapp/meta";
/// Meta's deliveries are at most about 3 MB.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub struct WebhookState {
    pub app_secret: SecretString,
    pub verify_token: Option<SecretString>,
    pub delivery: Arc<Delivery>,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: Arc<WebhookState>, request_timeout: Duration) -> Router {
    Router::new()
        .route(PATH, get(verify).post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                // A body that trickles in must not hold a connection for long.
                match tokio::time::timeout(request_timeout, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
                }
            },
        ))
        .with_state(state)
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn verify(
    State(state): State<Arc<WebhookState>>,
    Query(query): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    let token = query.get("hub.verify_token").map(String::as_bytes);
    let expected = state
        .verify_token
        .as_ref()
        .map(|t| t.expose_secret().as_bytes());
    match (query.get("hub.mode").map(String::as_str), token, expected) {
        (Some("subscribe"), Some(token), Some(expected)) if same_secret(token, expected) => {
            let challenge = query.get("hub.challenge").cloned().unwrap_or_default();
            tracing::info!("Meta verified the webhook");
            // Meta's challenge is a number; anything else is not echoed.
            if challenge.len() <= 128 && challenge.bytes().all(|b| b.is_ascii_alphanumeric()) {
                (StatusCode::OK, challenge)
            } else {
                (StatusCode::BAD_REQUEST, String::new())
            }
        }
        _ => {
            tracing::warn!("webhook verification refused: wrong or missing hub.verify_token");
            (StatusCode::FORBIDDEN, String::new())
        }
    }
}

async fn receive(
    State(state): State<Arc<WebhookState>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = webhook::verify_signature(
        state.app_secret.expose_secret().as_bytes(),
        &body,
        signature,
    ) {
        state.metrics.webhook("unauthorized");
        tracing::warn!(error = %e, "webhook delivery refused: not signed by Meta");
        return StatusCode::UNAUTHORIZED;
    }
    let parsed = match webhook::parse(&body) {
        Ok(parsed) => parsed,
        Err(e) => {
            state.metrics.webhook("bad_request");
            tracing::warn!(error = %e, "a signed webhook delivery could not be read");
            return StatusCode::BAD_REQUEST;
        }
    };
    let items: Vec<Incoming> = parsed.events.into_iter().map(incoming).collect();
    for item in &items {
        if let Incoming::Status { update, .. } = item {
            state
                .metrics
                .status(update.state.as_str(), update.error.as_ref().map(|e| e.code));
        }
    }
    match state.delivery.ingest(items).await {
        Ok(done) => {
            state.metrics.webhook("stored");
            state.metrics.otp("delivered", done.otp_delivered);
            tracing::info!(
                changed = done.changed,
                duplicates = done.duplicates,
                unknown = done.unknown,
                events = done.events,
                skipped = parsed.skipped,
                "webhook delivery stored"
            );
            StatusCode::OK
        }
        Err(Error::StoreUnavailable(e)) => {
            state.metrics.webhook("unavailable");
            tracing::error!(error = %e, "webhook delivery not stored: the store is unavailable; Meta will send it again");
            StatusCode::SERVICE_UNAVAILABLE
        }
        Err(e) => {
            state.metrics.webhook("unavailable");
            tracing::error!(error = %e.summary(), "webhook delivery not stored");
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

fn seconds_to_ms(seconds: u64) -> u64 {
    seconds.saturating_mul(1000)
}

/// A parsed webhook item in kabar's terms.
fn incoming(event: WebhookEvent) -> Incoming {
    match event {
        WebhookEvent::Status(s) => {
            let state = match s.status {
                DeliveryState::Sent => DeliveryStatus::Sent,
                DeliveryState::Delivered => DeliveryStatus::Delivered,
                DeliveryState::Read => DeliveryStatus::Read,
                DeliveryState::Failed => DeliveryStatus::Failed,
            };
            let error = s.errors.first().map(|e| MetaError {
                code: e.code,
                reason: String::new(),
                title: e.title.clone(),
                details: e.details.clone().unwrap_or_else(|| e.message.clone()),
            });
            let error_reason = error
                .as_ref()
                .map(|e| reason_of_code(e.code).as_str().to_owned())
                .unwrap_or_default();
            Incoming::Status {
                update: crate::domain::status::StatusUpdate {
                    message_id: s.message_id,
                    state,
                    at_ms: seconds_to_ms(s.timestamp),
                    error,
                    pricing_category: s.pricing.as_ref().and_then(|p| p.category.clone()),
                    billable: s.pricing.as_ref().and_then(|p| p.billable),
                },
                error_reason,
            }
        }
        WebhookEvent::Inbound(m) => Incoming::Event(Event::Inbound(InboundMessage {
            message_id: m.message_id,
            phone: format!("+{}", m.from.trim_start_matches('+')),
            kind: m.kind,
            text: m.text,
            at_ms: seconds_to_ms(m.timestamp),
            context_message_id: m.context_message_id.unwrap_or_default(),
        })),
        WebhookEvent::TemplateStatus(t) => Incoming::Event(Event::Account(AccountEvent {
            kind: "template_status".into(),
            subject: format!(
                "{} ({})",
                t.template_name.unwrap_or_default(),
                t.language.unwrap_or_default()
            ),
            value: t.event,
            reason: t
                .detail
                .or(t.reason.filter(|r| r != "NONE"))
                .unwrap_or_default(),
            at_ms: t.at.map_or_else(now_ms, seconds_to_ms),
        })),
        WebhookEvent::PhoneQuality(q) => Incoming::Event(Event::Account(AccountEvent {
            kind: "phone_quality".into(),
            subject: q.display_phone_number.unwrap_or_default(),
            value: q.event,
            reason: q
                .max_daily_conversations
                .map(|n| format!("messaging limit {n}"))
                .or(q.current_limit)
                .unwrap_or_default(),
            at_ms: q.at.map_or_else(now_ms, seconds_to_ms),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"token", b"tokem"));
        assert!(!same_secret(b"token", b"token2"));
    }
}
