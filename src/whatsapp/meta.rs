//! The WhatsApp Cloud API client: one shared connection pool, Bearer authentication, Meta's
//! exact JSON, and retries for what Meta says is temporary.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use secrecy::ExposeSecret;
use serde::Deserialize;

pub use crate::config::MetaSettings;

use super::{
    OutboundTemplate, SendError, Sent,
    classify::{MetaErrorBody, MetaErrorKind, MetaFailure, SendContext, classify},
};

#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    messages_url: String,
    /// `{base}/{version}`: where every Graph API path starts.
    graph_url: String,
    phone_number_id: String,
    authorization: HeaderValue,
    request_timeout: Duration,
    max_attempts: u32,
    retry_base: Duration,
    /// Bounds connections and memory when Meta slows down: at 200 ms per call, 512 slots carry
    /// 2,500 messages/s, well above the 1,000/s Meta accepts from one number.
    in_flight: tokio::sync::Semaphore,
    /// The last message Meta accepted and the last failure, for the connection status.
    last: std::sync::Mutex<LastSends>,
}

/// What the connection status shows of the sends so far.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LastSends {
    /// When Meta last accepted a message (Unix seconds).
    pub success_at: Option<u64>,
    /// The last send that failed, with what to do about it.
    pub error: Option<LastError>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LastError {
    /// Unix seconds.
    pub at: u64,
    /// Meta's error code; 0 when Meta gave no answer (unreachable, no usable answer).
    pub code: i64,
    pub reason: String,
    pub details: String,
    pub remedy: String,
}

/// How much of Meta's words the status keeps.
const MAX_STATUS_DETAIL_CHARS: usize = 200;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl std::fmt::Debug for MetaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaClient")
            .field("messages_url", &self.inner.messages_url)
            .field("authorization", &"[redacted]")
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct SuccessBody {
    #[serde(default)]
    contacts: Vec<Contact>,
    messages: Vec<MessageId>,
}

#[derive(Deserialize)]
struct Contact {
    wa_id: String,
}

#[derive(Deserialize)]
struct MessageId {
    id: String,
}

impl MetaClient {
    pub fn new(settings: &MetaSettings) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            // A monthly invoice run keeps hundreds of requests in flight against a 200 ms API;
            // keep those connections instead of reopening them.
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("kabar/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {}", settings.access_token.expose_secret()))
                .map_err(|_| "WHATSAPP_API_KEY contains characters not allowed in a header")?;
        authorization.set_sensitive(true);
        let graph_url = format!(
            "{}/{}",
            settings.graph_api_url.trim_end_matches('/'),
            settings.graph_api_version,
        );
        let number_url = format!("{graph_url}/{}", settings.phone_number_id);
        let messages_url = format!("{number_url}/messages");
        Ok(MetaClient {
            inner: Arc::new(Inner {
                http,
                messages_url,
                graph_url,
                phone_number_id: settings.phone_number_id.clone(),
                authorization,
                request_timeout: settings.request_timeout,
                max_attempts: settings.max_attempts.max(1),
                retry_base: settings.retry_base,
                in_flight: tokio::sync::Semaphore::new(settings.max_in_flight.max(1)),
                last: std::sync::Mutex::new(LastSends::default()),
            }),
        })
    }

    /// The longest a send can take: the wait for a slot, every attempt at its timeout, and the
    /// backoffs between them.
    pub fn longest_send(&self) -> Duration {
        let inner = &*self.inner;
        inner.request_timeout * (inner.max_attempts + 1)
            + inner.retry_base * (1 << inner.max_attempts.min(16))
    }

    /// The number's messaging limit as Meta spells it (`TIER_250`, ..., `TIER_UNLIMITED`), from
    /// the field `whatsapp_business_manager_messaging_limit`.
    pub async fn messaging_limit(&self) -> Result<String, SendError> {
        let number = self
            .graph_get(
                &self.inner.phone_number_id,
                &[("fields", "whatsapp_business_manager_messaging_limit")],
            )
            .await?;
        number["whatsapp_business_manager_messaging_limit"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| {
                SendError::Uncertain("Meta's answer has no messaging limit field".into())
            })
    }

    /// Reads a Graph API node or edge (`GET {base}/{version}/{path}`), with the token, timeouts
    /// and error classification of sending: the phone number's state, the business account,
    /// templates, webhook subscriptions. One attempt; an answer of at most
    /// [`MAX_GRAPH_ANSWER_BYTES`].
    pub async fn graph_get(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<serde_json::Value, SendError> {
        let inner = &*self.inner;
        let request = inner
            .http
            .get(format!("{}/{path}", inner.graph_url))
            .query(query);
        self.graph_call(request).await
    }

    /// Writes to the Graph API (`POST {base}/{version}/{path}` with a JSON body), as
    /// [`graph_get`](Self::graph_get) reads: creating a template.
    pub async fn graph_post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, SendError> {
        let inner = &*self.inner;
        let request = inner
            .http
            .post(format!("{}/{path}", inner.graph_url))
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body.to_string());
        self.graph_call(request).await
    }

    async fn graph_call(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<serde_json::Value, SendError> {
        let inner = &*self.inner;
        let response = request
            .header(AUTHORIZATION, inner.authorization.clone())
            .send()
            .await
            .map_err(|e| match e.is_connect() {
                true => SendError::Unreachable(e.to_string()),
                false => transport_error(&e, None),
            })?;
        let status = response.status().as_u16();
        let bytes = read_bounded(response, None, MAX_GRAPH_ANSWER_BYTES).await?;
        if !(200..300).contains(&status) {
            let ctx = SendContext {
                template: "",
                language: "",
            };
            return Err(SendError::Meta(failure_of(status, &bytes, &ctx)));
        }
        serde_json::from_slice(&bytes).map_err(|_| {
            SendError::Uncertain(format!(
                "Meta answered {status} with a body that is not JSON"
            ))
        })
    }

    pub fn phone_number_id(&self) -> &str {
        &self.inner.phone_number_id
    }

    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// Sends a template message. Retries only failures Meta calls temporary and connections that
    /// failed before the request was sent: a request that timed out after being sent may have
    /// been delivered, and a second copy would cost the ISP and confuse the customer. Meta's
    /// rate limits are not retried here: they go back to pacing, which slows every replica down.
    ///
    /// `attempts` is what is left of the message's `KABAR_META_MAX_ATTEMPTS`: each request made
    /// takes one from it, so that retries here and through pacing share one budget.
    pub async fn send(
        &self,
        message: &OutboundTemplate,
        deadline: Option<Instant>,
        attempts: &mut u32,
    ) -> Result<Sent, SendError> {
        let outcome = self.send_once(message, deadline, attempts).await;
        self.remember(&outcome);
        outcome
    }

    /// The last accepted message and the last failure.
    pub fn last_sends(&self) -> LastSends {
        self.inner
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn remember(&self, outcome: &Result<Sent, SendError>) {
        let error = match outcome {
            Ok(_) => None,
            // The caller gave up waiting: not a fault of the connection.
            Err(SendError::DeadlineExceeded { .. }) => return,
            Err(SendError::Meta(f)) => Some(LastError {
                at: unix_now(),
                code: f.meta_code,
                reason: f.reason.to_string(),
                details: f.details.chars().take(MAX_STATUS_DETAIL_CHARS).collect(),
                remedy: f.remedy.clone(),
            }),
            Err(e @ (SendError::Unreachable(_) | SendError::Uncertain(_))) => Some(LastError {
                at: unix_now(),
                code: 0,
                reason: match e {
                    SendError::Unreachable(_) => "META_UNREACHABLE".into(),
                    _ => "META_NO_ANSWER".into(),
                },
                details: e
                    .to_string()
                    .chars()
                    .take(MAX_STATUS_DETAIL_CHARS)
                    .collect(),
                remedy: "check the network path to graph.facebook.com (META_GRAPH_API_URL)".into(),
            }),
        };
        let mut last = self
            .inner
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match error {
            None => last.success_at = Some(unix_now()),
            Some(e) => last.error = Some(e),
        }
    }

    async fn send_once(
        &self,
        message: &OutboundTemplate,
        deadline: Option<Instant>,
        attempts: &mut u32,
    ) -> Result<Sent, SendError> {
        let inner = &*self.inner;
        let _slot = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), inner.in_flight.acquire())
                .await
                .map_err(|_| SendError::DeadlineExceeded { sent: false })?,
            None => tokio::time::timeout(inner.request_timeout, inner.in_flight.acquire())
                .await
                .map_err(|_| {
                    SendError::Unreachable(
                        "every send slot to Meta (KABAR_META_MAX_IN_FLIGHT) stayed busy".into(),
                    )
                })?,
        }
        .expect("the in-flight semaphore is never closed");
        let body = bytes_of(message);
        let ctx = SendContext {
            template: &message.template,
            language: &message.language,
        };
        let mut attempt = 1;
        loop {
            *attempts = attempts.saturating_sub(1);
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // Earlier attempts ended in definite refusals or failed connections.
                        return Err(SendError::DeadlineExceeded { sent: false });
                    }
                    left.min(inner.request_timeout)
                }
                None => inner.request_timeout,
            };
            let outcome = inner
                .http
                .post(&inner.messages_url)
                .header(AUTHORIZATION, inner.authorization.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body.clone())
                .timeout(timeout)
                .send()
                .await;
            let error = match outcome {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let bytes = read_bounded(response, deadline, MAX_ANSWER_BYTES).await?;
                    if (200..300).contains(&status) {
                        return parse_success(&bytes);
                    }
                    let failure = failure_of(status, &bytes, &ctx);
                    if !failure.retryable || failure.kind == MetaErrorKind::RateLimited {
                        return Err(SendError::Meta(failure));
                    }
                    SendError::Meta(failure)
                }
                Err(e) if e.is_connect() => SendError::Unreachable(e.to_string()),
                Err(e) => return Err(transport_error(&e, deadline)),
            };
            if *attempts == 0 {
                return Err(error);
            }
            let backoff = backoff(inner.retry_base, attempt);
            if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                return Err(error);
            }
            tracing::debug!(attempt, ?backoff, %error, "retrying Meta send");
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }
}

fn bytes_of(message: &OutboundTemplate) -> bytes::Bytes {
    // Serialising these plain structs cannot fail: no maps with non-string keys, no floats.
    serde_json::to_vec(&message.to_meta_json())
        .expect("a template message always serialises")
        .into()
}

/// The longest message id or WhatsApp id accepted from Meta.
const MAX_ID_BYTES: usize = 256;

/// Meta's answers are a few KB; anything longer is not an answer kabar can trust.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A page of templates with their components is longer than a send's answer.
pub const MAX_GRAPH_ANSWER_BYTES: usize = 1024 * 1024;

/// Reads an answer's body, at most `max` bytes. A longer (or endless) body is an unreadable
/// answer: the request reached Meta, so the message may have gone out.
async fn read_bounded(
    mut response: reqwest::Response,
    deadline: Option<Instant>,
    max: usize,
) -> Result<Vec<u8>, SendError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(None) => return Ok(body),
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(SendError::Uncertain(format!(
                        "Meta's answer is longer than {} KiB; it was not read",
                        max / 1024
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Err(e) => return Err(transport_error(&e, deadline)),
        }
    }
}

/// Meta's refusal, classified from its status and body (which may not be Meta's error JSON).
fn failure_of(status: u16, body: &[u8], ctx: &SendContext<'_>) -> MetaFailure {
    let parsed = serde_json::from_slice::<MetaErrorBody>(body).ok();
    classify(status, parsed.as_ref().map(|b| &b.error), ctx)
}

fn parse_success(bytes: &[u8]) -> Result<Sent, SendError> {
    let body: SuccessBody = serde_json::from_slice(bytes).map_err(|e| {
        SendError::Uncertain(format!("Meta answered 200 with an unexpected body: {e}"))
    })?;
    let message_id = body
        .messages
        .into_iter()
        .next()
        .map(|m| m.id)
        .filter(|id| !id.trim().is_empty())
        .ok_or_else(|| SendError::Uncertain("Meta answered 200 without a message id".into()))?;
    // A wamid is a few dozen printable ASCII characters; anything else is not Meta's answer.
    if message_id.len() > MAX_ID_BYTES || !message_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SendError::Uncertain(
            "Meta answered 200 with a malformed message id".into(),
        ));
    }
    let wa_id = body
        .contacts
        .into_iter()
        .next()
        .map(|c| c.wa_id)
        .filter(|w| w.len() <= MAX_ID_BYTES && w.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_default();
    Ok(Sent { message_id, wa_id })
}

/// A failure after the connection was made: the request may have reached Meta.
fn transport_error(e: &reqwest::Error, deadline: Option<Instant>) -> SendError {
    if e.is_timeout() && deadline.is_some_and(|d| Instant::now() >= d) {
        SendError::DeadlineExceeded { sent: true }
    } else if e.is_timeout() {
        SendError::Uncertain("Meta did not answer in time".to_owned())
    } else {
        // reqwest errors name the URL, which holds no secret (the token is a header).
        SendError::Uncertain(e.to_string())
    }
}

/// `base * 2^(attempt-1)`, drawn uniformly from its upper half so that many senders backing off
/// together do not retry in lockstep.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let full = base.saturating_mul(1 << (attempt - 1).min(16));
    let mut random = [0u8; 4];
    let fraction = match getrandom::fill(&mut random) {
        Ok(()) => f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX),
        Err(_) => 1.0,
    };
    full / 2 + full.mul_f64(fraction / 2.0)
}
