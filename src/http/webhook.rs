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
/// Open connections on the webhook listener at most (half of them from one address).
pub const MAX_CONNECTIONS: usize = 128;
/// Bytes of `POST /webhook/...` after which a connection counts as established.
pub const REQUEST_LINE_START: usize = 16;
/// Request bodies read at once: what unsigned bodies can hold in memory is bounded by this
/// times [`MAX_BODY_BYTES`] (48 MiB), whatever the number of connections.
pub const BODIES_IN_FLIGHT: usize = 16;

pub struct WebhookState {
    pub app_secret: SecretString,
    pub verify_token: Option<SecretString>,
    pub delivery: Arc<Delivery>,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: Arc<WebhookState>, request_timeout: Duration) -> Router {
    let bodies = Arc::new(tokio::sync::Semaphore::new(BODIES_IN_FLIGHT));
    Router::new()
        .route(PATH, get(verify).post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let bodies = bodies.clone();
                async move {
                    // A body that trickles in must not hold a connection for long, and only so
                    // many bodies are read at once.
                    let work = async {
                        let _slot = bodies.acquire_owned().await;
                        next.run(request).await
                    };
                    match tokio::time::timeout(request_timeout, work).await {
                        Ok(response) => response,
                        Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
                    }
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
    // Parsing 3 MiB takes a while: off the threads that serve calls.
    let parsed = match tokio::task::spawn_blocking(move || webhook::parse(&body)).await {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(e)) => {
            state.metrics.webhook("bad_request");
            tracing::warn!(error = %e, "a signed webhook delivery could not be read");
            return StatusCode::BAD_REQUEST;
        }
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR,
    };
    let now = now_ms();
    let mut skipped = parsed.skipped;
    let items: Vec<Incoming> = parsed
        .events
        .into_iter()
        .filter_map(|event| {
            let item = incoming(event, now);
            skipped += usize::from(item.is_none());
            item
        })
        .collect();
    for item in &items {
        if let Incoming::Status(update) = item {
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
                skipped,
                "webhook delivery stored"
            );
            StatusCode::OK
        }
        Err(e) => {
            state.metrics.webhook("unavailable");
            tracing::error!(
                error = %e.summary(),
                "webhook delivery not stored; Meta will send it again"
            );
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

fn seconds_to_ms(seconds: u64) -> u64 {
    seconds.saturating_mul(1000)
}

/// Meta's time of an update, if it is plausible: after 2020 and at most a day ahead of kabar's
/// clock. Anything else is not Meta's (it would sort a history wrongly or overflow a timestamp).
fn plausible(seconds: u64, now_ms: u64) -> Option<u64> {
    const YEAR_2020_MS: u64 = 1_577_836_800_000;
    let ms = seconds_to_ms(seconds);
    (YEAR_2020_MS..=now_ms + 24 * 3600 * 1000)
        .contains(&ms)
        .then_some(ms)
}

/// A parsed webhook item in kabar's terms; `None` for one whose time is not plausible.
fn incoming(event: WebhookEvent, now: u64) -> Option<Incoming> {
    Some(match event {
        WebhookEvent::Status(s) => {
            let at_ms = plausible(s.timestamp, now)?;
            let state = match s.status {
                DeliveryState::Sent => DeliveryStatus::Sent,
                DeliveryState::Delivered => DeliveryStatus::Delivered,
                DeliveryState::Read => DeliveryStatus::Read,
                DeliveryState::Failed => DeliveryStatus::Failed,
            };
            let error = s.errors.first().map(|e| MetaError {
                code: e.code,
                reason: reason_of_code(e.code).as_str().to_owned(),
                title: e.title.clone(),
                details: e.details.clone().unwrap_or_else(|| e.message.clone()),
            });
            Incoming::Status(crate::domain::status::StatusUpdate {
                message_id: s.message_id,
                state,
                at_ms,
                error,
                pricing_category: s.pricing.as_ref().and_then(|p| p.category.clone()),
                billable: s.pricing.as_ref().and_then(|p| p.billable),
            })
        }
        WebhookEvent::Inbound(m) => Incoming::Event(Event::Inbound(InboundMessage {
            at_ms: plausible(m.timestamp, now)?,
            message_id: m.message_id,
            phone: format!("+{}", m.from.trim_start_matches('+')),
            kind: m.kind,
            text: m.text,
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
            at_ms: t.at.and_then(|at| plausible(at, now)).unwrap_or(now),
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
            at_ms: q.at.and_then(|at| plausible(at, now)).unwrap_or(now),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn only_plausible_times_are_taken() {
        let now = 1_795_000_000_000;
        assert_eq!(super::plausible(1_795_000_000, now), Some(now));
        assert_eq!(super::plausible(0, now), None);
        assert_eq!(super::plausible(99_999_999_999, now), None);
        assert_eq!(super::plausible(u64::MAX, now), None);
        assert!(super::plausible(1_795_000_000 + 3600, now).is_some());
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"token", b"tokem"));
        assert!(!same_secret(b"token", b"token2"));
    }
}
