//! Real parts for the tests: a private `redis-server` per test on a unix socket, a local HTTP
//! server standing in for Meta's Graph API, and the whole kabar app started in-process on
//! `127.0.0.1:0` with real gRPC clients.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::IntoResponse,
    routing::post,
};
use kabar::{
    config::Config,
    pb::{
        batch_service_client::BatchServiceClient,
        notification_service_client::NotificationServiceClient,
        otp_service_client::OtpServiceClient,
    },
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_dir(prefix: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    dir
}

/// A private Redis for one test, on a unix socket, keeping nothing on disk.
pub struct RedisServer {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = unique_dir("kabar-redis");
        let socket = dir.join("redis.sock");
        let mut server = RedisServer {
            dir,
            socket,
            child: None,
        };
        server.spawn();
        server
    }

    fn binary() -> String {
        std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
    }

    fn spawn(&mut self) {
        let child = Command::new(Self::binary())
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&self.socket)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); install it (apt-get install redis-server) \
                     or run scripts/test.sh, which does"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("redis-server did not open {:?}", self.socket);
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Kills the server (as a crash would) and waits until the socket is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts it again on the same socket, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("test redis reachable")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request as the Meta stand-in received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: serde_json::Value,
    pub at: Instant,
}

/// What the stand-in answers next: HTTP status and JSON body, after an optional delay.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
    pub delay: Duration,
}

/// The body of [`Reply::endless`]: the stand-in answers 200 and never ends the body.
const ENDLESS: &str = "<endless body>";

impl Reply {
    /// A 200 whose body never ends (spaces, forever), as a broken proxy might send.
    pub fn endless() -> Self {
        Reply {
            status: 200,
            body: serde_json::Value::String(ENDLESS.to_owned()),
            delay: Duration::ZERO,
        }
    }

    pub fn error(status: u16, code: i64, details: &str) -> Self {
        Reply {
            status,
            body: meta_error_body(code, details),
            delay: Duration::ZERO,
        }
    }
}

/// Meta's error body, shaped like `shared/meta/samples/error_130429_rate_limit.json`.
pub fn meta_error_body(code: i64, details: &str) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "message": format!("(#{code}) {details}"),
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": details},
            "error_subcode": 2494055,
            "fbtrace_id": format!("Az8or2yhqkZfEZ-_{code}")
        }
    })
}

#[derive(Default)]
struct MetaState {
    received: Vec<Received>,
    replies: VecDeque<Reply>,
    delay: Duration,
    next_id: u64,
    /// Messages accepted per sliding second, as Meta's throughput limit: beyond it, 130429.
    cap: Option<usize>,
    /// Arrival times of the messages accepted under the cap, and the count of refused ones.
    accepted_at: Vec<Instant>,
    throttled: usize,
    /// The number's `whatsapp_business_manager_messaging_limit` (e.g. `TIER_2K`).
    messaging_limit: Option<String>,
    /// Reads of the number's state (`GET /{version}/{phone-number-id}`).
    number_reads: usize,
    /// The Graph API side: the business account, its templates and subscriptions.
    graph: crate::meta_graph::Graph,
}

/// A local HTTP server standing in for `graph.facebook.com`. It records every request and answers
/// from a queue of scripted replies, or with Meta's success body when the queue is empty.
#[derive(Clone)]
pub struct FakeMeta {
    pub addr: SocketAddr,
    state: Arc<Mutex<MetaState>>,
}

pub const PHONE_NUMBER_ID: &str = "106540352242922";
pub const TOKEN: &str = "EAAtestTOKENnot-a-real-one";

impl FakeMeta {
    pub async fn start() -> Self {
        FakeMeta::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// The stand-in on `addr` (e.g. a port kabar was pointed at while nothing listened there).
    pub async fn start_on(addr: SocketAddr) -> Self {
        let state = Arc::new(Mutex::new(MetaState::default()));
        let app = Router::new()
            .route("/{*path}", post(meta_handler).get(number_handler))
            .with_state(state.clone());
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeMeta { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn push(&self, reply: Reply) {
        self.state.lock().unwrap().replies.push_back(reply);
    }

    /// Delay of every default (success) answer.
    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// Refuses messages like Meta beyond `per_second` in any sliding second (130429).
    pub fn set_cap(&self, per_second: usize) {
        self.state.lock().unwrap().cap = Some(per_second);
    }

    /// When each message accepted under the cap arrived.
    pub fn accepted_at(&self) -> Vec<Instant> {
        self.state.lock().unwrap().accepted_at.clone()
    }

    /// Messages refused with 130429 for the cap.
    pub fn throttled(&self) -> usize {
        self.state.lock().unwrap().throttled
    }

    /// The messaging limit the phone number reports (`GET /{version}/{phone-number-id}`).
    pub fn set_messaging_limit(&self, tier: &str) {
        self.state.lock().unwrap().messaging_limit = Some(tier.to_owned());
    }

    /// How often the number's state was read.
    pub fn number_reads(&self) -> usize {
        self.state.lock().unwrap().number_reads
    }

    /// Reads or changes the business account as the Graph API shows it.
    pub fn graph<R>(&self, f: impl FnOnce(&mut crate::meta_graph::Graph) -> R) -> R {
        f(&mut self.state.lock().unwrap().graph)
    }
}

/// The path after the version (`/v24.0/a/b` -> `["a", "b"]`).
fn graph_segments(uri: &Uri) -> Vec<&str> {
    uri.path()
        .trim_matches('/')
        .split('/')
        .skip(1)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A Graph API request answered by [`crate::meta_graph::Graph`] (`None`: not a path it knows):
/// the token is checked first, as Meta checks it.
fn graph_answer(
    state: &Mutex<MetaState>,
    headers: &HeaderMap,
    answer: impl FnOnce(&mut crate::meta_graph::Graph) -> Option<(u16, serde_json::Value)>,
) -> Option<axum::response::Response> {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
    if !crate::meta_graph::authorized(authorization) {
        return Some(json_answer(crate::meta_graph::invalid_token()));
    }
    answer(&mut state.lock().unwrap().graph).map(json_answer)
}

fn json_answer((status, body): (u16, serde_json::Value)) -> axum::response::Response {
    (
        StatusCode::from_u16(status).expect("valid status"),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The most arrivals in any window of `window` (sliding over the arrival times).
pub fn busiest_window(times: &[Instant], window: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end].duration_since(sorted[start]) >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// `GET /{version}/...`: the number's messaging limit (read by pacing), and the Graph API reads
/// of [`crate::meta_graph::Graph`] (which need the token).
async fn number_handler(
    State(state): State<Arc<Mutex<MetaState>>>,
    uri: Uri,
    headers: HeaderMap,
) -> axum::response::Response {
    let query: Vec<(String, String)> = uri.query().map(url_pairs).unwrap_or_default();
    let asks_limit = query
        .iter()
        .any(|(k, v)| k == "fields" && v.contains("whatsapp_business_manager_messaging_limit"));
    if !asks_limit
        && let Some(answer) =
            graph_answer(&state, &headers, |g| g.get(&graph_segments(&uri), &query))
    {
        return answer;
    }
    let limit = {
        let mut s = state.lock().unwrap();
        s.number_reads += 1;
        s.messaging_limit.clone()
    };
    match limit {
        Some(tier) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            serde_json::json!({
                "whatsapp_business_manager_messaging_limit": tier,
                "id": PHONE_NUMBER_ID
            })
            .to_string(),
        ),
        None => (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            meta_error_body(100, "Tried accessing nonexisting field").to_string(),
        ),
    }
    .into_response()
}

/// `a=1&b=x%2Cy` as pairs, percent-decoded.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let Ok(b) =
                    u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16)
            {
                out.push(b);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

async fn meta_handler(
    State(state): State<Arc<Mutex<MetaState>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let parsed: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if !uri.path().ends_with("/messages")
        && let Some(answer) =
            graph_answer(&state, &headers, |g| g.post(&graph_segments(&uri), &parsed))
    {
        return answer;
    }
    let (reply, id) = {
        let mut s = state.lock().unwrap();
        s.received.push(Received {
            path: uri.path().to_owned(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            content_type: headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: parsed.clone(),
            at: Instant::now(),
        });
        s.next_id += 1;
        let delay = s.delay;
        let now = Instant::now();
        let over_cap = s.cap.is_some_and(|cap| {
            s.accepted_at
                .iter()
                .rev()
                .take_while(|t| now.duration_since(**t) < Duration::from_secs(1))
                .count()
                >= cap
        });
        let reply = if over_cap {
            s.throttled += 1;
            Reply::error(
                429,
                130429,
                "Cloud API message throughput has been reached.",
            )
        } else {
            s.accepted_at.push(now);
            s.replies.pop_front().unwrap_or(Reply {
                status: 200,
                body: serde_json::Value::Null,
                delay,
            })
        };
        (reply, s.next_id)
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    if reply.body == ENDLESS {
        let spaces = Bytes::from_static(&[b' '; 8192]);
        let stream =
            futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(spaces.clone()));
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            axum::body::Body::from_stream(stream),
        )
            .into_response();
    }
    let body = if reply.status == 200 && reply.body.is_null() {
        let to = parsed["to"].as_str().unwrap_or_default().to_owned();
        serde_json::json!({
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": to.trim_start_matches('+')}],
            "messages": [{"id": format!("wamid.TEST{id:08}"), "message_status": "accepted"}]
        })
    } else {
        reply.body
    };
    (
        StatusCode::from_u16(reply.status).expect("valid status"),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Pacing settings that never hold up a test that is not about pacing.
pub const PACING_OUT_OF_THE_WAY: [(&str, &str); 3] = [
    ("KABAR_META_MAX_MPS", "100000"),
    ("KABAR_PAIR_INTERVAL_SECONDS", "0"),
    ("KABAR_META_DAILY_LIMIT", "unlimited"),
];

/// The whole kabar app, in-process, with gRPC clients connected to it.
pub struct TestApp {
    pub http_addr: SocketAddr,
    /// Meta's webhook, when `META_APP_SECRET` is set.
    pub webhook_addr: Option<SocketAddr>,
    pub channel: Channel,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Variables for an app that sends through `meta` with fast retries.
pub fn meta_vars(meta: &FakeMeta) -> Vec<(String, String)> {
    vec![
        ("WHATSAPP_DRIVER".into(), "meta".into()),
        ("WHATSAPP_API_KEY".into(), TOKEN.into()),
        ("META_WA_PHONE_NUMBER_ID".into(), PHONE_NUMBER_ID.into()),
        ("META_GRAPH_API_URL".into(), meta.url()),
        ("KABAR_META_RETRY_BASE_MS".into(), "20".into()),
    ]
}

/// Variables that put kabar's store on `redis` (or leave it in-process for `None`).
pub fn store_vars(redis: Option<&RedisServer>) -> Vec<(String, String)> {
    match redis {
        Some(redis) => vec![
            ("REDIS_URL".into(), redis.url()),
            (
                "KABAR_OTP_SECRET".into(),
                "test-otp-secret-0123456789abcdef-0123".into(),
            ),
        ],
        None => Vec::new(),
    }
}

pub fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl TestApp {
    /// Starts kabar with `vars`; a variable listed twice takes its later value.
    pub async fn start(vars: Vec<(String, String)>) -> Self {
        let mut map: HashMap<String, String> = HashMap::new();
        map.insert("KABAR_GRPC_ADDR".into(), "127.0.0.1:0".into());
        map.insert("KABAR_HTTP_ADDR".into(), "127.0.0.1:0".into());
        map.insert("KABAR_WEBHOOK_ADDR".into(), "127.0.0.1:0".into());
        map.insert("KABAR_SHUTDOWN_GRACE_SECONDS".into(), "5".into());
        // Pacing far above what a test sends, unless the test is about pacing.
        for (k, v) in PACING_OUT_OF_THE_WAY {
            map.insert(k.into(), v.into());
        }
        for (k, v) in vars {
            map.insert(k, v);
        }
        let config = Config::from_source(&map).expect("valid test configuration");
        let listeners = kabar::Listeners::bind(&config).await.expect("bind");
        let grpc_addr = listeners.grpc.local_addr().unwrap();
        let http_addr = listeners.http.local_addr().unwrap();
        let webhook_addr = listeners.webhook.as_ref().map(|l| l.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(kabar::run(config, listeners, shutdown.clone()));
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to kabar");
        let app = TestApp {
            http_addr,
            webhook_addr,
            channel,
            shutdown,
            handle: Some(handle),
        };
        // The listeners accept connections before kabar has finished starting; wait for it.
        assert!(
            app.wait_health("", SERVING, Duration::from_secs(10)).await,
            "kabar did not report SERVING"
        );
        app
    }

    pub fn notifications(&self) -> NotificationServiceClient<Channel> {
        NotificationServiceClient::new(self.channel.clone())
    }

    pub fn batches(&self) -> BatchServiceClient<Channel> {
        BatchServiceClient::new(self.channel.clone())
    }

    pub fn otp(&self) -> OtpServiceClient<Channel> {
        OtpServiceClient::new(self.channel.clone())
    }

    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    /// The serving status of `service` ("" for the whole server), as an i32 of `ServingStatus`.
    pub async fn health_status(&self, service: &str) -> i32 {
        self.health()
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check answers")
            .into_inner()
            .status
    }

    /// Polls health until `service` reports `status` or `within` passes.
    pub async fn wait_health(&self, service: &str, status: i32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.health_status(service).await == status {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.take().expect("running").await.expect("joins")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub const SERVING: i32 = 1;
pub const NOT_SERVING: i32 = 2;

/// The `google.rpc.BadRequest` field names of a status.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// `(reason, metadata)` of the `google.rpc.ErrorInfo` of a status.
pub fn error_info(status: &tonic::Status) -> Option<(String, HashMap<String, String>)> {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| (i.reason, i.metadata))
}

pub fn retry_delay(status: &tonic::Status) -> Option<Duration> {
    use tonic_types::StatusExt;
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

/// A stand-in for Meta at the TCP level: it reads each whole HTTP request, then closes the
/// connection without answering, as when a connection breaks after the request went out.
pub struct BrokenMeta {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl BrokenMeta {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    // Sends only: kabar also reads the number's state (GET) for its status.
                    if read_http_request(&mut socket)
                        .await
                        .is_some_and(|head| head.starts_with("post "))
                    {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    // Dropping the socket closes the connection with no answer.
                });
            }
        });
        BrokenMeta { addr, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whole sends (POST requests) received.
    pub fn count(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one HTTP/1.1 request (headers and a `content-length` body); `false` if the peer closed
/// before it was complete.
/// Reads one whole request; its head, lowercased (`None`: the connection ended first).
async fn read_http_request(socket: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                return Some(head);
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The text of `GET /metrics`.
pub async fn metrics_text(http_addr: SocketAddr) -> String {
    reqwest::get(format!("http://{http_addr}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics body")
}

/// Status and JSON body of `GET /readyz`.
pub async fn readyz(http_addr: SocketAddr) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("http://{http_addr}/readyz"))
        .await
        .expect("readyz answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("readyz JSON"))
}

/// Polls `check` every 20 ms until it holds or `within` passes; whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `status` says the caller's deadline passed: kabar's own DEADLINE_EXCEEDED, or the
/// CANCELLED that the tonic client's own timer produces when kabar's answer (sent a few
/// milliseconds before the deadline) arrives after it on a loaded machine.
pub fn is_deadline_passed(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::DeadlineExceeded
        || (status.code() == tonic::Code::Cancelled && status.message().contains("Timeout expired"))
}
