//! The call layer: one tower layer under every kabar RPC that
//!
//! - runs the call as its own task, so that a caller who disconnects or times out cuts nothing
//!   off halfway (an idempotency key left locked, an OTP cooldown never lifted);
//! - counts it in flight (shutdown waits for these), in the metrics by method and code, and in
//!   the latency histogram;
//! - writes its one log line: method, code, elapsed time, and what the handler added as
//!   [`CallDetail`] (for SendTemplate: template, recipient, reference, message id) or the
//!   error's text.
//!
//! - reads the caller's deadline (`grpc-timeout`) once, for the handler to send within it.
//!
//! A new RPC gets all of this by being listed in [`Method`]. Health and reflection pass through
//! untouched.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use std::time::Duration;

use tonic::Code;

use crate::metrics::{Method, Metrics};

/// What a handler adds to its call's log line on success (response extensions).
#[derive(Debug, Clone, Default)]
pub struct CallDetail {
    /// A word for the outcome, e.g. `verified`, `code sent`.
    pub outcome: Option<&'static str>,
    pub template: Option<String>,
    pub to: Option<String>,
    pub reference: Option<String>,
    pub message_id: Option<String>,
    pub batch_id: Option<String>,
}

/// The caller's deadline from the `grpc-timeout` header, if it sent one, less a small margin:
/// kabar answers DEADLINE_EXCEEDED itself just before tonic's own timeout would cut the call off
/// with a bare CANCELLED.
fn deadline(headers: &http::HeaderMap, start: Instant) -> Option<Instant> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
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

/// When the caller stops waiting, if it said (request extension set by the layer).
#[derive(Debug, Clone, Copy)]
pub struct CallDeadline(pub Option<Instant>);

/// The deadline the call layer read for this call.
pub fn deadline_of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    request.extensions().get::<CallDeadline>().and_then(|d| d.0)
}

/// The RPC a request path names, if it is one of kabar's.
pub(crate) fn method_of(path: &str) -> Option<Method> {
    Some(match path {
        "/kabar.v1.NotificationService/SendTemplate" => Method::SendTemplate,
        "/kabar.v1.NotificationService/GetMessageStatus" => Method::GetMessageStatus,
        "/kabar.v1.NotificationService/WatchMessageStatus" => Method::WatchMessageStatus,
        "/kabar.v1.OtpService/SendOtp" => Method::SendOtp,
        "/kabar.v1.OtpService/VerifyOtp" => Method::VerifyOtp,
        "/kabar.v1.BatchService/SubmitBatch" => Method::SubmitBatch,
        "/kabar.v1.BatchService/GetBatch" => Method::GetBatch,
        "/kabar.v1.BatchService/WatchBatch" => Method::WatchBatch,
        "/kabar.v1.BatchService/CancelBatch" => Method::CancelBatch,
        "/kabar.v1.BatchService/ResumeBatch" => Method::ResumeBatch,
        "/kabar.v1.BatchService/ListBatchItems" => Method::ListBatchItems,
        "/kabar.v1.AdminService/GetSettings" => Method::GetSettings,
        "/kabar.v1.AdminService/UpdateSettings" => Method::UpdateSettings,
        _ => return None,
    })
}

#[derive(Clone)]
pub struct CallLayer {
    pub metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for CallLayer {
    type Service = Calls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Calls {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Calls<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<tonic::body::Body>> for Calls<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone serves the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(method) = method_of(request.uri().path()) else {
            let call = inner.call(request);
            return Box::pin(async move { call.await.map_err(Into::into) });
        };
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let deadline = deadline(request.headers(), start);
        request.extensions_mut().insert(CallDeadline(deadline));
        let guard = metrics.call_started();
        let task = tokio::spawn(async move {
            let result = inner.call(request).await.map_err(Into::into);
            if let Ok(response) = &result {
                log_call(&metrics, method, start, response);
            }
            drop(guard);
            result
        });
        Box::pin(async move {
            task.await
                .map_err(|_| -> BoxError { "the call's task failed".into() })?
        })
    }
}

/// The status of a failed call, read back from its answer: a failed unary call carries it in
/// its headers (trailers only). An answer without one is a success whose status follows the
/// message.
fn failure_of<B>(response: &http::Response<B>) -> Option<tonic::Status> {
    tonic::Status::from_header_map(response.headers()).filter(|s| s.code() != Code::Ok)
}

/// Counts the call and writes its one log line. Only kabar's own words and values it has
/// checked reach the line: error texts escape and cut whatever of the caller's input they echo.
fn log_call<B>(metrics: &Metrics, method: Method, start: Instant, response: &http::Response<B>) {
    let elapsed = start.elapsed();
    let failure = failure_of(response);
    let code = failure.as_ref().map_or(Code::Ok, tonic::Status::code);
    metrics.record(method, code, elapsed);
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    let method = method.name();
    // Checked names from the key file (a-z 0-9 _ -); absent while keys are off.
    let caller = response
        .extensions()
        .get::<crate::domain::auth::Caller>()
        .map(|c| c.name.as_str());
    if let Some(caller) = caller {
        metrics.record_caller(caller, code);
    }
    let Some(failure) = failure else {
        let detail = response
            .extensions()
            .get::<CallDetail>()
            .cloned()
            .unwrap_or_default();
        tracing::info!(
            method,
            caller,
            code = "OK",
            elapsed_ms,
            detail = detail.outcome,
            template = detail.template,
            to = detail.to,
            reference = detail.reference,
            message_id = detail.message_id,
            batch_id = detail.batch_id,
            "call done"
        );
        return;
    };
    let code_name = format!("{code:?}");
    // The message is kabar's own, already bounded; escaped again for the log line.
    let error = crate::domain::error::escape_unsafe(failure.message());
    match code {
        Code::InvalidArgument
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::OutOfRange
        | Code::Unauthenticated
        | Code::PermissionDenied => {
            tracing::info!(method, caller, code = %code_name, elapsed_ms, error, "call refused")
        }
        _ => tracing::warn!(method, caller, code = %code_name, elapsed_ms, error, "call failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
        m.insert("grpc-timeout", value.parse().unwrap());
        m
    }

    #[test]
    fn the_deadline_comes_a_little_before_the_callers() {
        let start = Instant::now();
        assert_eq!(
            deadline(&with_timeout("400m"), start),
            Some(start + Duration::from_millis(300))
        );
        assert_eq!(
            deadline(&with_timeout("15S"), start),
            Some(start + Duration::from_millis(14_750))
        );
        assert_eq!(deadline(&with_timeout("15x"), start), None);
        assert_eq!(deadline(&with_timeout("S"), start), None);
        assert_eq!(deadline(&http::HeaderMap::new(), start), None);
    }

    #[test]
    fn kabar_methods_are_known_and_others_pass() {
        assert!(matches!(
            method_of("/kabar.v1.OtpService/VerifyOtp"),
            Some(Method::VerifyOtp)
        ));
        assert!(method_of("/grpc.health.v1.Health/Check").is_none());
    }

    /// Every RPC of the `kabar.v1` services is counted, logged and given its deadline: a new
    /// RPC added to the proto fails this test until it is listed.
    #[test]
    fn every_kabar_rpc_is_a_known_method() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut count = 0;
        for file in set.file.iter().filter(|f| f.package() == "kabar.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/kabar.v1.{}/{}", service.name(), method.name());
                    let known = method_of(&path).unwrap_or_else(|| panic!("{path} is not listed"));
                    assert_eq!(known.name(), method.name());
                    count += 1;
                }
            }
        }
        assert_eq!(count, 13);
    }

    #[test]
    fn failures_are_read_back_from_the_headers() {
        let response = http::Response::builder()
            .header("grpc-status", "3")
            .header("grpc-message", "invalid%20request:%20phone%0Aforged")
            .body(())
            .unwrap();
        let failure = failure_of(&response).expect("a failure");
        assert_eq!(failure.code(), Code::InvalidArgument);
        assert_eq!(
            crate::domain::error::escape_unsafe(failure.message()),
            "invalid request: phone\\u{a}forged"
        );
        let ok = http::Response::builder().body(()).unwrap();
        assert!(failure_of(&ok).is_none());
    }
}
