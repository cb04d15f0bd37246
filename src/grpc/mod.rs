//! The gRPC edge: decode the request, call the domain, encode the answer. Running each call as
//! its own task, its log line and its metrics are the call layer's work (`calls.rs`); the only
//! mapping of domain errors to statuses is `status.rs`. No store or Meta details live here.

pub mod admin;
pub mod auth;
pub mod batch;
pub mod calls;
pub mod limits;
mod messages;
pub mod status;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use self::calls::CallDetail;
use crate::{
    domain::ports::Verdict,
    domain::{
        delivery::Delivery,
        error::Error,
        status::{After, StoredEvent},
    },
    notify::{NotificationRequest, Notifier},
    otp::OtpService,
    pb::{
        self, SendOtpRequest, SendOtpResponse, SendTemplateRequest, SendTemplateResponse,
        VerifyOtpRequest, VerifyOtpResponse, verify_otp_response::Result as VerifyResult,
    },
};

/// Runs a call's domain work and maps its error to a status. (The call layer runs it as its
/// own task, counts and logs it.)
async fn call<T>(work: impl Future<Output = Result<T, Error>>) -> Result<T, Status> {
    work.await.map_err(Status::from)
}

/// A response carrying what the call's log line should say about it.
fn answer<T>(message: T, detail: CallDetail) -> Response<T> {
    let mut response = Response::new(message);
    response.extensions_mut().insert(detail);
    response
}

pub struct NotificationGrpc {
    notifier: Arc<Notifier>,
    delivery: Arc<Delivery>,
    /// Cancelled when kabar stops accepting calls: open status feeds end, so that their
    /// clients reconnect (to another replica) with their cursor.
    drain: CancellationToken,
}

impl NotificationGrpc {
    pub fn new(notifier: Arc<Notifier>, delivery: Arc<Delivery>, drain: CancellationToken) -> Self {
        NotificationGrpc {
            notifier,
            delivery,
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

/// The events after `after`, as they come: read in batches, polled every [`FEED_POLL`] when
/// there are none; ends when kabar drains, or after an error (sent as the last item).
fn feed(delivery: Arc<Delivery>, after: After, drain: CancellationToken) -> EventStream {
    let state = (
        delivery,
        after,
        std::collections::VecDeque::new(),
        drain,
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
                    let event: StoredEvent = event;
                    after = After::Cursor(event.cursor.clone());
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
    Box::pin(stream)
}

#[tonic::async_trait]
impl pb::notification_service_server::NotificationService for NotificationGrpc {
    type WatchMessageStatusStream = EventStream;

    async fn get_message_status(
        &self,
        request: Request<pb::GetMessageStatusRequest>,
    ) -> Result<Response<pb::MessageStatus>, Status> {
        let id = request.into_inner().message_id;
        let record = call(self.delivery.get(&id)).await?;
        Ok(answer(
            messages::status(record),
            CallDetail {
                outcome: Some("found"),
                ..CallDetail::default()
            },
        ))
    }

    async fn watch_message_status(
        &self,
        request: Request<pb::WatchMessageStatusRequest>,
    ) -> Result<Response<Self::WatchMessageStatusStream>, Status> {
        let after = request.into_inner().after;
        let after = call(self.delivery.start(&after)).await?;
        let stream = feed(self.delivery.clone(), after, self.drain.clone());
        Ok(answer(
            stream,
            CallDetail {
                outcome: Some("feed opened"),
                ..CallDetail::default()
            },
        ))
    }

    async fn send_template(
        &self,
        request: Request<SendTemplateRequest>,
    ) -> Result<Response<SendTemplateResponse>, Status> {
        let deadline = calls::deadline_of(&request);
        let caller = auth::caller_of(&request)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let request = request.into_inner();
        let accepted = call(self.notifier.send_template(
            &NotificationRequest {
                phone: &request.phone,
                template: &request.template,
                params: &request.params,
                positional_params: &request.positional_params,
                language: &request.language,
                reference: &request.reference,
                idempotency_key: &request.idempotency_key,
                caller: &caller,
            },
            deadline,
        ))
        .await?;
        // The template is a registry key and the reference passed its checks (no control
        // characters, bounded length): both are safe to log as they are.
        let detail = CallDetail {
            outcome: None,
            template: Some(request.template),
            to: Some(accepted.phone.clone()),
            reference: Some(request.reference),
            message_id: Some(accepted.message_id.clone()),
            batch_id: None,
        };
        Ok(answer(
            SendTemplateResponse {
                message_id: accepted.message_id,
                wa_id: accepted.wa_id,
                phone: accepted.phone,
            },
            detail,
        ))
    }
}

pub struct OtpGrpc {
    otp: Arc<OtpService>,
    /// For the OTP conversion counters (codes sent, verified).
    metrics: Arc<crate::metrics::Metrics>,
}

impl OtpGrpc {
    pub fn new(otp: Arc<OtpService>, metrics: Arc<crate::metrics::Metrics>) -> Self {
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
        let deadline = calls::deadline_of(&request);
        let r = request.into_inner();
        let sent = call(self.otp.send(&r.phone, &r.purpose, &r.client_ip, deadline)).await?;
        if !sent.message_id.is_empty() {
            self.metrics.otp("sent", 1);
        }
        Ok(answer(
            SendOtpResponse {
                expires_in_seconds: seconds(sent.expires_in),
                resend_after_seconds: seconds(sent.resend_after),
                message_id: sent.message_id,
            },
            CallDetail {
                outcome: Some("code sent"),
                ..CallDetail::default()
            },
        ))
    }

    async fn verify_otp(
        &self,
        request: Request<VerifyOtpRequest>,
    ) -> Result<Response<VerifyOtpResponse>, Status> {
        let r = request.into_inner();
        let verdict = call(self.otp.verify(&r.phone, &r.purpose, &r.code)).await?;
        if verdict == Verdict::Verified {
            self.metrics.otp("verified", 1);
        }
        let (result, attempts_remaining) = match verdict {
            Verdict::Verified => (VerifyResult::Verified, 0),
            Verdict::Invalid { attempts_left } => (VerifyResult::InvalidCode, attempts_left),
            Verdict::Expired => (VerifyResult::Expired, 0),
            Verdict::TooManyAttempts => (VerifyResult::TooManyAttempts, 0),
        };
        Ok(answer(
            VerifyOtpResponse {
                result: result as i32,
                attempts_remaining,
            },
            CallDetail {
                outcome: Some(verdict_word(verdict)),
                ..CallDetail::default()
            },
        ))
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
