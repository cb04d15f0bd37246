//! The gRPC edge: decode the request, call the domain, encode the answer. One log line per call
//! with its outcome and duration. No store or Meta details live here.

pub mod limits;
mod messages;
pub mod status;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

use crate::{
    domain::{delivery::Delivery, error::Error, outbox::Accepted},
    metrics::{Method, Metrics},
    notify::{NotificationRequest, Notifier},
    otp::OtpService,
    pb::{
        self, SendOtpRequest, SendOtpResponse, SendTemplateRequest, SendTemplateResponse,
        VerifyOtpRequest, VerifyOtpResponse, verify_otp_response::Result as VerifyResult,
    },
    store::Verdict,
};

/// The caller's deadline from the `grpc-timeout` header, if it sent one, less a small margin:
/// kabar answers DEADLINE_EXCEEDED itself just before tonic's own timeout would cut the call off
/// with a bare CANCELLED.
pub fn deadline(metadata: &MetadataMap, start: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    // The server's own gRPC layer cuts the call off with CANCELLED exactly at the caller's
    // timeout: answer early enough to win that race on a loaded machine.
    let margin = (timeout / 4).min(Duration::from_millis(250));
    start.checked_add(timeout - margin)
}

/// Counts the call and writes its one log line. `detail` describes a success. Only kabar's own
/// words and values it has checked reach the line: the error text escapes and cuts whatever of
/// the caller's input it echoes.
fn log_call(metrics: &Metrics, method: Method, start: Instant, outcome: Result<&str, &Error>) {
    let elapsed = start.elapsed();
    metrics.record(
        method,
        outcome.map_or_else(status::code, |_| Code::Ok),
        elapsed,
    );
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    let method = method.name();
    match outcome {
        Ok(detail) => tracing::info!(method, code = "OK", elapsed_ms, detail, "call done"),
        Err(e) => {
            let code = status::code(e);
            let code_name = format!("{code:?}");
            match code {
                Code::InvalidArgument | Code::ResourceExhausted | Code::FailedPrecondition => {
                    tracing::info!(method, code = %code_name, elapsed_ms, error = %e.summary(), "call refused")
                }
                _ => {
                    tracing::warn!(method, code = %code_name, elapsed_ms, error = %e.summary(), "call failed")
                }
            }
        }
    }
}

/// Runs a call's domain work as its own task, and counts and logs it there: a caller that
/// disconnects or times out must neither cut the work off halfway (an idempotency key left
/// locked, an OTP cooldown never lifted) nor make it vanish from the log and the metrics.
async fn detached<T: Send + 'static>(
    metrics: &Arc<Metrics>,
    method: Method,
    start: Instant,
    work: impl Future<Output = Result<T, Error>> + Send + 'static,
    log_ok: impl FnOnce(&Metrics, &T) + Send + 'static,
) -> Result<T, Status> {
    let call = metrics.call_started();
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let result = work.await;
        match &result {
            Ok(value) => log_ok(&metrics, value),
            Err(e) => log_call(&metrics, method, start, Err(e)),
        }
        drop(call);
        result.map_err(Status::from)
    })
    .await
    .map_err(|_| Status::internal("the call's task failed"))?
}

pub struct NotificationGrpc {
    notifier: Arc<Notifier>,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
    /// Cancelled when kabar stops accepting calls: open status feeds end, so that their
    /// clients reconnect (to another replica) with their cursor.
    drain: CancellationToken,
}

impl NotificationGrpc {
    pub fn new(
        notifier: Arc<Notifier>,
        delivery: Arc<Delivery>,
        metrics: Arc<Metrics>,
        drain: CancellationToken,
    ) -> Self {
        NotificationGrpc {
            notifier,
            delivery,
            metrics,
            drain,
        }
    }
}

/// How often an open status feed looks for new events.
const FEED_POLL: Duration = Duration::from_millis(200);
/// Events read from the store at a time.
const FEED_BATCH: usize = 100;

type EventStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::MessageEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::notification_service_server::NotificationService for NotificationGrpc {
    type WatchMessageStatusStream = EventStream;

    async fn get_message_status(
        &self,
        request: Request<pb::GetMessageStatusRequest>,
    ) -> Result<Response<pb::MessageStatus>, Status> {
        let start = Instant::now();
        let id = request.into_inner().message_id;
        let delivery = self.delivery.clone();
        let record = detached(
            &self.metrics,
            Method::GetMessageStatus,
            start,
            async move { delivery.get(&id).await },
            move |metrics, _| log_call(metrics, Method::GetMessageStatus, start, Ok("found")),
        )
        .await?;
        Ok(Response::new(messages::status(record)))
    }

    async fn watch_message_status(
        &self,
        request: Request<pb::WatchMessageStatusRequest>,
    ) -> Result<Response<Self::WatchMessageStatusStream>, Status> {
        let start = Instant::now();
        let after = request.into_inner().after;
        let delivery = self.delivery.clone();
        let after = detached(
            &self.metrics,
            Method::WatchMessageStatus,
            start,
            async move { delivery.start(&after).await },
            move |metrics, _| {
                log_call(
                    metrics,
                    Method::WatchMessageStatus,
                    start,
                    Ok("feed opened"),
                )
            },
        )
        .await?;
        let state = (
            self.delivery.clone(),
            after,
            std::collections::VecDeque::new(),
            self.drain.clone(),
            false,
        );
        let stream = futures_util::stream::unfold(
            state,
            |(delivery, mut after, mut buffer, drain, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    if let Some(event) = buffer.pop_front() {
                        let event: crate::domain::status::StoredEvent = event;
                        after = crate::domain::status::After::Cursor(event.cursor.clone());
                        return Some((
                            Ok(messages::event(event)),
                            (delivery, after, buffer, drain, false),
                        ));
                    }
                    if drain.is_cancelled() {
                        return None;
                    }
                    match delivery.events(&after, FEED_BATCH).await {
                        Ok(events) if events.is_empty() => {
                            tokio::select! {
                                () = tokio::time::sleep(FEED_POLL) => {}
                                () = drain.cancelled() => return None,
                            }
                        }
                        Ok(events) => buffer.extend(events),
                        Err(e) => {
                            return Some((
                                Err(Status::from(e)),
                                (delivery, after, buffer, drain, true),
                            ));
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn send_template(
        &self,
        request: Request<SendTemplateRequest>,
    ) -> Result<Response<SendTemplateResponse>, Status> {
        let start = Instant::now();
        let deadline = deadline(request.metadata(), start);
        let request = request.into_inner();
        let notifier = self.notifier.clone();
        let template = request.template.clone();
        let reference = request.reference.clone();
        let accepted = detached(
            &self.metrics,
            Method::SendTemplate,
            start,
            async move {
                notifier
                    .send_template(
                        &NotificationRequest {
                            phone: &request.phone,
                            template: &request.template,
                            params: &request.params,
                            positional_params: &request.positional_params,
                            language: &request.language,
                            reference: &request.reference,
                            idempotency_key: &request.idempotency_key,
                        },
                        deadline,
                    )
                    .await
            },
            move |metrics, response: &Accepted| {
                let elapsed = start.elapsed();
                metrics.record(Method::SendTemplate, Code::Ok, elapsed);
                // The template is a registry key and the reference passed its checks (no
                // control characters, bounded length): both are safe to log as they are.
                tracing::info!(
                    method = "SendTemplate",
                    code = "OK",
                    elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                    template = %template,
                    to = %response.phone,
                    reference = %reference,
                    message_id = %response.message_id,
                    "call done"
                );
            },
        )
        .await?;
        Ok(Response::new(SendTemplateResponse {
            message_id: accepted.message_id,
            wa_id: accepted.wa_id,
            phone: accepted.phone,
        }))
    }
}

pub struct OtpGrpc {
    otp: Arc<OtpService>,
    metrics: Arc<Metrics>,
}

impl OtpGrpc {
    pub fn new(otp: Arc<OtpService>, metrics: Arc<Metrics>) -> Self {
        OtpGrpc { otp, metrics }
    }
}

fn seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl pb::otp_service_server::OtpService for OtpGrpc {
    async fn send_otp(
        &self,
        request: Request<SendOtpRequest>,
    ) -> Result<Response<SendOtpResponse>, Status> {
        let start = Instant::now();
        let deadline = deadline(request.metadata(), start);
        let r = request.into_inner();
        let otp = self.otp.clone();
        let sent = detached(
            &self.metrics,
            Method::SendOtp,
            start,
            async move { otp.send(&r.phone, &r.purpose, &r.client_ip, deadline).await },
            move |metrics, _| log_call(metrics, Method::SendOtp, start, Ok("code sent")),
        )
        .await?;
        Ok(Response::new(SendOtpResponse {
            expires_in_seconds: seconds(sent.expires_in),
            resend_after_seconds: seconds(sent.resend_after),
            message_id: sent.message_id,
        }))
    }

    async fn verify_otp(
        &self,
        request: Request<VerifyOtpRequest>,
    ) -> Result<Response<VerifyOtpResponse>, Status> {
        let start = Instant::now();
        let r = request.into_inner();
        let otp = self.otp.clone();
        let verdict = detached(
            &self.metrics,
            Method::VerifyOtp,
            start,
            async move { otp.verify(&r.phone, &r.purpose, &r.code).await },
            move |metrics, verdict: &Verdict| {
                log_call(
                    metrics,
                    Method::VerifyOtp,
                    start,
                    Ok(verdict_word(*verdict)),
                )
            },
        )
        .await?;
        let (result, attempts_remaining) = match verdict {
            Verdict::Verified => (VerifyResult::Verified, 0),
            Verdict::Invalid { attempts_left } => (VerifyResult::InvalidCode, attempts_left),
            Verdict::Expired => (VerifyResult::Expired, 0),
            Verdict::TooManyAttempts => (VerifyResult::TooManyAttempts, 0),
        };
        Ok(Response::new(VerifyOtpResponse {
            result: result as i32,
            attempts_remaining,
        }))
    }
}

fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Verified => "verified",
        Verdict::Invalid { .. } => "invalid code",
        Verdict::Expired => "expired",
        Verdict::TooManyAttempts => "too many attempts",
    }
}
