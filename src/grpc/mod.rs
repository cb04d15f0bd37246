//! The gRPC edge: decode the request, call the domain, encode the answer. One log line per call
//! with its outcome and duration. No store or Meta details live here.

pub mod limits;
pub mod status;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prost::Message;
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

use crate::{
    domain::error::Error,
    metrics::{Method, Metrics},
    notify::{NotificationRequest, Notifier},
    otp::OtpService,
    pb::{
        self, SendOtpRequest, SendOtpResponse, SendTemplateRequest, SendTemplateResponse,
        VerifyOtpRequest, VerifyOtpResponse, verify_otp_response::Result as VerifyResult,
    },
    store::{self, Verdict},
    whatsapp::OutboundTemplate,
};

/// How long an idempotency key remembers its answer.
const IDEMPOTENCY_KEEP: Duration = Duration::from_secs(24 * 3600);

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
    core: Arc<NotificationCore>,
    metrics: Arc<Metrics>,
}

struct NotificationCore {
    notifier: Arc<Notifier>,
    store: store::Store,
    /// How long a key stays locked by a call in progress: longer than the longest send.
    idempotency_lock: Duration,
}

impl NotificationGrpc {
    /// `longest_send`: the most a send may take with its retries and its wait for a slot.
    pub fn new(
        notifier: Arc<Notifier>,
        store: store::Store,
        longest_send: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        NotificationGrpc {
            metrics,
            core: Arc::new(NotificationCore {
                notifier,
                store,
                idempotency_lock: longest_send + Duration::from_secs(30),
            }),
        }
    }
}

impl NotificationCore {
    async fn send_template(
        &self,
        request: &SendTemplateRequest,
        deadline: Option<Instant>,
    ) -> Result<SendTemplateResponse, Error> {
        let message = self.notifier.prepare(&NotificationRequest {
            phone: &request.phone,
            template: &request.template,
            params: &request.params,
            positional_params: &request.positional_params,
            language: &request.language,
            reference: &request.reference,
        })?;
        if request.idempotency_key.is_empty() {
            let sent = self.notifier.send(&message, deadline).await?;
            return Ok(SendTemplateResponse {
                message_id: sent.message_id,
                wa_id: sent.wa_id,
                phone: message.to.e164().to_owned(),
            });
        }
        let key = &request.idempotency_key;
        if key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::field(
                "idempotency_key",
                "must be 1 to 128 printable ASCII characters without spaces",
            ));
        }
        let store_key = store::idempotency_key(key);
        let digest = request_digest(&request.template, &message, &request.reference);
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).expect("the OS random number generator is available");
        let token = hex::encode(random);
        match self
            .store
            .idempotency_begin(&store_key, &digest, &token, self.idempotency_lock)
            .await
            .map_err(|e| Error::StoreUnavailable(e.0))?
        {
            store::Idempotency::Done(bytes) => {
                return SendTemplateResponse::decode(bytes.as_slice()).map_err(|_| {
                    Error::StoreUnavailable("stored idempotent answer is unreadable".into())
                });
            }
            store::Idempotency::InFlight => return Err(Error::IdempotencyInFlight),
            store::Idempotency::Reused => return Err(Error::IdempotencyKeyReused),
            store::Idempotency::Started => {}
        }
        match self.notifier.send(&message, deadline).await {
            Ok(sent) => {
                let response = SendTemplateResponse {
                    message_id: sent.message_id,
                    wa_id: sent.wa_id,
                    phone: message.to.e164().to_owned(),
                };
                if let Err(e) = self
                    .store
                    .idempotency_finish(
                        &store_key,
                        &digest,
                        &token,
                        &response.encode_to_vec(),
                        IDEMPOTENCY_KEEP,
                    )
                    .await
                {
                    tracing::warn!(error = %e, "could not store the answer for an idempotency key");
                }
                Ok(response)
            }
            Err(e) if e.may_have_been_delivered() => {
                // The message may have gone out: the key stays taken until its lock expires, so
                // a retry with it cannot send a second copy right away.
                tracing::warn!(
                    "send with an idempotency key ended without a usable answer from Meta; \
                     the key stays locked"
                );
                Err(e)
            }
            Err(e) => {
                // Nothing was sent: the caller may retry with the same key.
                if let Err(e) = self
                    .store
                    .idempotency_abort(&store_key, &digest, &token)
                    .await
                {
                    tracing::warn!(error = %e, "could not release an idempotency key");
                }
                Err(e)
            }
        }
    }
}

/// What makes two SendTemplate calls the same request, as 64 hex characters: the registry key,
/// the normalised recipient, the language, every parameter value in order, and the reference.
/// Each part is length-prefixed, so that no two different requests share a digest by shifting
/// text from one part to the next.
fn request_digest(template_key: &str, message: &OutboundTemplate, reference: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    part(template_key.as_bytes());
    part(message.to.e164().as_bytes());
    part(message.language.as_bytes());
    part(reference.as_bytes());
    for value in &message.body_params {
        part(value.as_bytes());
    }
    hex::encode(hash.finalize())
}

#[tonic::async_trait]
impl pb::notification_service_server::NotificationService for NotificationGrpc {
    async fn send_template(
        &self,
        request: Request<SendTemplateRequest>,
    ) -> Result<Response<SendTemplateResponse>, Status> {
        let start = Instant::now();
        let deadline = deadline(request.metadata(), start);
        let request = request.into_inner();
        let core = self.core.clone();
        let template = request.template.clone();
        let reference = request.reference.clone();
        let response = detached(
            &self.metrics,
            Method::SendTemplate,
            start,
            async move { core.send_template(&request, deadline).await },
            move |metrics, response: &SendTemplateResponse| {
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
        Ok(Response::new(response))
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
