//! Limits on what one call may hold on the gRPC port, as a tower layer under every service:
//! a request message must arrive whole within a deadline, so that a client that sends all but
//! the last bytes of a message and stops cannot hold its buffer.
//!
//! The other per-connection bounds are HTTP/2 settings and message sizes, set where the server is
//! built (see [`crate::run`]): concurrent streams, flow-control windows, header list size and the
//! largest decoded message.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;

/// Streams one HTTP/2 connection may open at once (SETTINGS_MAX_CONCURRENT_STREAMS); more are
/// refused by the client's own HTTP/2 layer. Enough for a load generator's 256 calls in flight
/// on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// The largest request message decoded. kabar's requests are a few KB (a whole template body is
/// at most 1,024 characters); a larger one is refused before it is buffered.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The largest SubmitBatch message: 1,000 items with every field at its longest in Latin text
/// (about 1.4 KB each); 1,000 typical invoices are about 300 KB.
pub const MAX_BATCH_MESSAGE_BYTES: usize = 2 * 1024 * 1024;
/// SubmitBatch calls whose message may be read at once, all clients together. The others wait
/// for a turn (up to the slow-client timeout, then RESOURCE_EXHAUSTED) before a byte of theirs
/// is read, so that half-sent batch messages cannot pile up in memory: unread, a call holds at
/// most its HTTP/2 window.
pub const SUBMITS_AT_ONCE: usize = 8;
const SUBMIT_PATH: &str = "/kabar.v1.BatchService/SubmitBatch";

/// Gives SubmitBatch calls their turn ([`SUBMITS_AT_ONCE`]) before their message is read.
#[derive(Debug, Clone)]
pub struct SubmitTurns {
    turns: std::sync::Arc<tokio::sync::Semaphore>,
    wait: Duration,
}

impl SubmitTurns {
    pub fn new(wait: Duration) -> Self {
        SubmitTurns {
            turns: std::sync::Arc::new(tokio::sync::Semaphore::new(SUBMITS_AT_ONCE)),
            wait,
        }
    }
}

impl<S> tower::Layer<S> for SubmitTurns {
    type Service = WithSubmitTurns<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithSubmitTurns {
            inner,
            turns: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WithSubmitTurns<S> {
    inner: S,
    turns: SubmitTurns,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for WithSubmitTurns<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone serves the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path() != SUBMIT_PATH {
            return Box::pin(inner.call(request));
        }
        let SubmitTurns { turns, wait } = self.turns.clone();
        Box::pin(async move {
            let Ok(Ok(turn)) = tokio::time::timeout(wait, turns.acquire_owned()).await else {
                let busy = crate::domain::error::Error::Limited {
                    reason: crate::domain::reason::Reason::BatchSubmitBusy,
                    message: format!(
                        "kabar is reading {SUBMITS_AT_ONCE} other SubmitBatch calls and none \
                         finished within {} s; try again",
                        wait.as_secs()
                    ),
                    retry_after: Duration::from_secs(1),
                };
                return Ok(Status::from(busy).into_http());
            };
            let answer = inner.call(request).await;
            drop(turn);
            answer
        })
    }
}

/// The largest message health and reflection read: open to every caller, and their requests
/// are a few bytes.
pub const MAX_OPEN_MESSAGE_BYTES: usize = 4 * 1024;
/// HTTP/2 flow-control windows
/// HTTP/2 flow-control windows: what a client may send before kabar reads it.
pub const STREAM_WINDOW: u32 = 256 * 1024;
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Request headers (gRPC metadata) at most.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Wraps every request body in [`DeadlineBody`].
#[derive(Debug, Clone, Copy)]
pub struct RequestBodyDeadline(pub Duration);

impl<S> tower::Layer<S> for RequestBodyDeadline {
    type Service = WithBodyDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithBodyDeadline {
            inner,
            within: self.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WithBodyDeadline<S> {
    inner: S,
    within: Duration,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for WithBodyDeadline<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let within = self.within;
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(DeadlineBody {
                inner: body,
                deadline: None,
                within,
            })
        }))
    }
}

/// A request body that fails once `within` has passed since it was first read, unless it has
/// ended by then. (A body nobody reads yet holds at most its HTTP/2 window: a SubmitBatch call
/// waiting for its turn does not lose its time to the wait.)
pub struct DeadlineBody {
    inner: tonic::body::Body,
    deadline: Option<Pin<Box<Sleep>>>,
    within: Duration,
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let within = self.within;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                "the request message did not arrive whole within {} s",
                self.within.as_secs()
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
