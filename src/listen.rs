//! Connection admission for both listeners: a cap on open connections, a deadline for a new
//! connection to show it speaks the protocol, and eviction of the oldest connection still
//! handshaking when the cap is reached.
//!
//! Without these, one client that opens sockets and sends nothing holds a file descriptor each
//! until kabar runs out of them, and fresh connections fail silently. With them:
//! - a connection must complete its handshake (gRPC: the 24-byte HTTP/2 preface; HTTP: a whole
//!   request, so the first answer) within `handshake_timeout`, or it is closed;
//! - at most `max_connections` are open at once; past that, the oldest connection that has not
//!   completed its handshake is closed to make room, and when every connection is established,
//!   new ones wait in the kernel's backlog;
//! - at most `max_pending` connections may be handshaking at once (the oldest is closed first),
//!   so that idle sockets cannot crowd out the established clients;
//! - at most `max_per_ip` established connections per client address (HTTP/2 only): one client
//!   that completes handshakes and then idles, answering keepalive pings, cannot fill the cap
//!   and lock everyone else out; a connection past it is closed right after its handshake;
//! - on shutdown, connections still handshaking close at once;
//! - every cap that is hit is logged (at most once every 10 s per listener).

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// When a connection counts as established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Once this many bytes have arrived (HTTP/2: the client preface is 24 bytes).
    BytesRead(usize),
    /// Once kabar writes its first answer (HTTP/1: a whole request has arrived).
    FirstWrite,
    /// When [`Guarded::establish`] says so (TLS: the TLS handshake and then the HTTP/2 client
    /// preface, read through the encryption, have arrived).
    Manual,
}

/// The length of the HTTP/2 client connection preface.
pub const HTTP2_PREFACE_LEN: usize = 24;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending: usize,
    /// Established connections per client address at most (counted once the handshake is
    /// complete; `Handshake::BytesRead` only).
    pub max_per_ip: usize,
    pub handshake_timeout: Duration,
    pub handshake: Handshake,
}

/// How often a hit cap is logged, at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One listener's admission state, shared by its accept loop and its connections.
pub struct Admission {
    name: &'static str,
    limits: Limits,
    slots: Arc<Semaphore>,
    pending: Mutex<VecDeque<Arc<PendingEntry>>>,
    pending_count: AtomicUsize,
    established: Mutex<HashMap<IpAddr, usize>>,
    /// Cancelled on shutdown: connections still handshaking close at once.
    drain: CancellationToken,
    started: Instant,
    last_warning_ms: AtomicU64,
}

struct PendingEntry {
    done: AtomicBool,
    evict: CancellationToken,
}

impl Admission {
    pub fn new(name: &'static str, limits: Limits, drain: CancellationToken) -> Arc<Self> {
        Arc::new(Admission {
            name,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            pending: Mutex::new(VecDeque::new()),
            pending_count: AtomicUsize::new(0),
            established: Mutex::new(HashMap::new()),
            drain,
            started: Instant::now(),
            last_warning_ms: AtomicU64::new(u64::MAX),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections.max(1) - self.slots.available_permits()
    }

    /// Connections open now that have not completed their handshake.
    pub fn pending(&self) -> usize {
        self.pending_count.load(Ordering::Acquire)
    }

    /// Counts an established connection from `ip`; `false` (nothing counted) past the cap.
    fn establish(&self, ip: IpAddr) -> bool {
        let mut established = self.established.lock().expect("per-address lock");
        let count = established.entry(ip).or_insert(0);
        if *count >= self.limits.max_per_ip {
            drop(established);
            self.warn("a client address reached its connection limit: closing its new connection");
            return false;
        }
        *count += 1;
        true
    }

    fn disestablish(&self, ip: IpAddr) {
        let mut established = self.established.lock().expect("per-address lock");
        if let Some(count) = established.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                established.remove(&ip);
            }
        }
    }

    fn warn(&self, what: &str) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) < WARN_EVERY.as_millis() as u64 {
            return;
        }
        if self
            .last_warning_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                listener = self.name,
                open = self.open(),
                handshaking = self.pending(),
                max_connections = self.limits.max_connections,
                "{what}"
            );
        }
    }

    /// Closes the oldest connection still handshaking. Returns whether there was one.
    fn evict_oldest_pending(&self) -> bool {
        let mut queue = self.pending.lock().expect("pending queue lock");
        while let Some(entry) = queue.pop_front() {
            if !entry.done.load(Ordering::Acquire) && !entry.evict.is_cancelled() {
                entry.evict.cancel();
                return true;
            }
        }
        false
    }

    /// Accepts the next connection, within the caps. Errors of `accept` itself (such as running
    /// out of file descriptors) are logged and retried after a pause, never passed on: a server
    /// loop that retries them at once would spin.
    pub async fn accept(self: &Arc<Self>, listener: &TcpListener) -> (Guarded, SocketAddr) {
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    if self.evict_oldest_pending() {
                        self.warn(
                            "connection limit reached (KABAR_MAX_CONNECTIONS): closing the oldest \
                             connection that has not completed its handshake",
                        );
                    } else {
                        self.warn(
                            "connection limit reached (KABAR_MAX_CONNECTIONS): new connections \
                             wait until one closes",
                        );
                    }
                    self.slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the connection semaphore is never closed")
                }
            };
            let (stream, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.warn(&format!(
                        "cannot accept a connection ({e}); is the file descriptor limit \
                         (LimitNOFILE, ulimit -n) too low? retrying"
                    ));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            return (self.admit(stream, slot), addr);
        }
    }

    fn admit(self: &Arc<Self>, stream: TcpStream, slot: OwnedSemaphorePermit) -> Guarded {
        let evict = self.drain.child_token();
        let entry = Arc::new(PendingEntry {
            done: AtomicBool::new(false),
            evict: evict.clone(),
        });
        let over = {
            let mut queue = self.pending.lock().expect("pending queue lock");
            if queue.len() > 2 * self.limits.max_pending.max(1) {
                queue.retain(|e| !e.done.load(Ordering::Acquire) && !e.evict.is_cancelled());
            }
            queue.push_back(entry.clone());
            self.pending_count.fetch_add(1, Ordering::AcqRel) + 1 > self.limits.max_pending
        };
        if over && self.evict_oldest_pending() {
            self.warn(
                "too many connections are handshaking at once: closing the oldest \
                 (a client that opens connections and sends nothing?)",
            );
        }
        let bytes_left = match self.limits.handshake {
            Handshake::BytesRead(n) => n,
            Handshake::FirstWrite | Handshake::Manual => usize::MAX,
        };
        let peer = stream
            .peer_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical());
        Guarded {
            inner: stream,
            _slot: slot,
            peer,
            counted: false,
            admission: None,
            handshake: Some(Box::new(PendingHandshake {
                admission: self.clone(),
                entry,
                deadline: Box::pin(tokio::time::sleep(self.limits.handshake_timeout)),
                closed: Box::pin(evict.cancelled_owned()),
                bytes_left,
                first_write: self.limits.handshake == Handshake::FirstWrite,
            })),
        }
    }
}

struct PendingHandshake {
    admission: Arc<Admission>,
    entry: Arc<PendingEntry>,
    deadline: Pin<Box<Sleep>>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    bytes_left: usize,
    first_write: bool,
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        self.entry.done.store(true, Ordering::Release);
        self.admission.pending_count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted connection holding its slot under the cap until it closes.
pub struct Guarded {
    inner: TcpStream,
    _slot: OwnedSemaphorePermit,
    peer: IpAddr,
    /// Counted under the per-address cap (until dropped).
    counted: bool,
    admission: Option<Arc<Admission>>,
    /// Present until the handshake completes.
    handshake: Option<Box<PendingHandshake>>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.counted
            && let Some(admission) = &self.admission
        {
            admission.disestablish(self.peer);
        }
    }
}

impl Guarded {
    /// Marks the handshake complete: the handshake deadline no longer applies and the connection
    /// counts under its address's cap. An error (and nothing counted) past that cap: the
    /// connection must be closed.
    pub fn establish(&mut self) -> io::Result<()> {
        let Some(h) = self.handshake.take() else {
            return Ok(());
        };
        let admission = h.admission.clone();
        drop(h);
        if !admission.establish(self.peer) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "too many connections from this address",
            ));
        }
        self.counted = true;
        self.admission = Some(admission);
        Ok(())
    }

    /// Whether the connection must close now: handshake deadline passed, evicted, or shutdown.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let h = self.handshake.as_mut()?;
        if h.closed.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed before its handshake completed",
            ));
        }
        if h.deadline.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake not completed in time",
            ));
        }
        None
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.poll_expired(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        if let Some(h) = this.handshake.as_mut()
            && !h.first_write
        {
            h.bytes_left = h.bytes_left.saturating_sub(read);
            if h.bytes_left == 0 {
                this.establish()?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if this.handshake.as_ref().is_some_and(|h| h.first_write) {
            this.handshake = None;
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if this.handshake.as_ref().is_some_and(|h| h.first_write) {
            this.handshake = None;
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The accepted connections of `listener` as a stream, for tonic's server.
pub fn incoming(
    listener: TcpListener,
    admission: Arc<Admission>,
) -> impl futures_util::Stream<Item = io::Result<Guarded>> + Send + 'static {
    futures_util::stream::unfold((listener, admission), |(listener, admission)| async move {
        let (conn, _) = admission.accept(&listener).await;
        Some((Ok(conn), (listener, admission)))
    })
}
