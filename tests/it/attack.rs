//! Attacks on the real binary, one at a time, measured by its own memory (`/proc/PID/status`) and
//! by whether a fresh connection still gets health SERVING within 1 s during and after. Each runs
//! `kabar serve` as a subprocess so that its memory and its open files limit are its own.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream as StdStream},
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{process::Kabar, send_template::invoice_request, support::SERVING};

/// The budgets of the README's operations section.
const PEAK_RSS_BUDGET_KIB: u64 = 128 * 1024;
const SETTLE_BUDGET_KIB: u64 = 10 * 1024;

/// Starts `kabar serve` (under an open files limit, when given) and waits for SERVING.
async fn start(vars: &[(&str, &str)], open_files: Option<u32>) -> Kabar {
    let mut kabar = Kabar::serve_limited(vars, open_files);
    kabar.wait_serving().await;
    kabar
}

fn log_of(kabar: &Kabar) -> String {
    kabar.stderr().join("\n")
}

fn rss_kib(kabar: &Kabar) -> u64 {
    kabar.memory_kib("VmRSS:")
}

fn peak_rss_kib(kabar: &Kabar) -> u64 {
    kabar.memory_kib("VmHWM:")
}

/// Whether a fresh connection to `addr` gets health SERVING within `within`.
async fn health_within(addr: SocketAddr, within: Duration) -> bool {
    let check = async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .ok()?
            .into_inner()
            .status;
        Some(status == SERVING)
    };
    matches!(tokio::time::timeout(within, check).await, Ok(Some(true)))
}

async fn assert_healthy(kabar: &Kabar, when: &str) {
    assert!(
        health_within(kabar.grpc_addr, Duration::from_secs(1)).await,
        "{when}: a fresh connection got no health SERVING within 1 s\n{}",
        log_of(kabar)
    );
}

/// Whether `GET /healthz` on a fresh connection answers 200 within `within`.
fn http_healthz_within(addr: SocketAddr, within: Duration) -> bool {
    let Ok(mut stream) = StdStream::connect_timeout(&addr, within) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(within));
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kabar\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 200")
}

/// SIGTERM, then the exit code and how long the exit took.
async fn terminate(kabar: &mut Kabar) -> (Option<i32>, Duration) {
    let started = Instant::now();
    let status = kabar.stop(Duration::from_secs(30)).await;
    (status.code(), started.elapsed())
}

/// Sockets that connect and never send a byte, more than the open files limit allows: fresh
/// clients still get through, the idle ones are closed after the slow-client timeout, caps are
/// logged, and shutdown does not wait for them.
/// Whether kabar has closed `socket`: the end of the stream (after whatever it sent first, such
/// as the HTTP/2 server preface) or a reset, within 2 s. A socket still open times out: `false`.
fn closed_by_peer(socket: &mut StdStream) -> bool {
    use std::io::ErrorKind;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buffer = [0u8; 4096];
    for _ in 0..64 {
        match socket.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => {
                return matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                );
            }
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_exhaust_file_descriptors() {
    let mut kabar = start(&[("KABAR_SLOW_CLIENT_TIMEOUT_SECONDS", "2")], Some(256)).await;
    let baseline = rss_kib(&kabar);
    let mut idle = Vec::new();
    for i in 0..400 {
        let target = if i % 4 == 0 {
            kabar.http_addr
        } else {
            kabar.grpc_addr
        };
        idle.push(StdStream::connect(target).expect("the kernel accepts the connection"));
    }
    assert_healthy(&kabar, "with 400 idle sockets").await;
    assert!(
        http_healthz_within(kabar.http_addr, Duration::from_secs(1)),
        "HTTP /healthz with 400 idle sockets"
    );
    for _ in 0..200 {
        idle.push(StdStream::connect(kabar.grpc_addr).expect("connect"));
    }
    assert_healthy(&kabar, "with 600 idle sockets").await;

    // Every idle socket is closed by kabar within the timeout (evicted ones sooner).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for (i, socket) in idle.iter_mut().enumerate() {
        assert!(closed_by_peer(socket), "idle socket {i} still open");
    }
    assert_healthy(&kabar, "after the idle sockets").await;
    let log = log_of(&kabar);
    assert!(
        log.contains("does not fit the open files limit"),
        "the lowered cap is announced:\n{log}"
    );
    assert!(
        log.contains("connection limit reached") || log.contains("handshaking at once"),
        "a hit cap is logged:\n{log}"
    );
    assert!(peak_rss_kib(&kabar) < PEAK_RSS_BUDGET_KIB);
    assert!(rss_kib(&kabar) < baseline + SETTLE_BUDGET_KIB);

    // Shutdown with idle sockets open does not wait for the grace period (20 s here).
    let mut more = Vec::new();
    for _ in 0..50 {
        more.push(StdStream::connect(kabar.grpc_addr).expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, took) = terminate(&mut kabar).await;
    assert_eq!(code, Some(0), "{}", log_of(&kabar));
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    assert!(
        !log_of(&kabar).contains("calls still in flight"),
        "{}",
        log_of(&kabar)
    );
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://kabar{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// The gRPC status of a stream's answer: from a trailers-only answer's headers, or the trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<String> {
    let response = response.await.ok()?;
    if let Some(status) = response.headers().get("grpc-status") {
        return Some(status.to_str().ok()?.to_owned());
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.ok()??;
    Some(trailers.get("grpc-status")?.to_str().ok()?.to_owned())
}

/// Messages that stop arriving and streams that never send a body are dropped after the slow
/// client timeout; a message announcing more than the limit is refused at once; the connection
/// advertises a bounded number of streams. Memory stays within the budget throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_messages_and_stream_floods_are_bounded() {
    let kabar = start(&[("KABAR_SLOW_CLIENT_TIMEOUT_SECONDS", "2")], None).await;
    let baseline = rss_kib(&kabar);
    let tcp = tokio::net::TcpStream::connect(kabar.grpc_addr)
        .await
        .unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    client = client.ready().await.expect("ready");

    let path = "/kabar.v1.NotificationService/SendTemplate";
    let started = Instant::now();
    let mut answers = Vec::new();
    // 40 messages of 60,000 bytes, each missing its last 16 bytes.
    for _ in 0..40 {
        client = client.ready().await.expect("ready");
        let (response, mut body) = client.send_request(grpc_request(path), false).unwrap();
        let mut frame = vec![0u8, 0, 0, 0xea, 0x60];
        frame.extend(std::iter::repeat_n(0u8, 60_000 - 16));
        body.send_data(Bytes::from(frame), false).unwrap();
        answers.push((response, body));
    }
    // 200 streams that send headers and nothing else.
    for _ in 0..200 {
        client = client.ready().await.expect("ready");
        let (response, body) = client.send_request(grpc_request(path), false).unwrap();
        answers.push((response, body));
    }
    assert_healthy(&kabar, "with 240 stalled streams").await;
    let mut statuses = Vec::new();
    for (response, _body) in answers {
        statuses.push(
            tokio::time::timeout(Duration::from_secs(10), grpc_status(response))
                .await
                .expect("every stalled stream is answered"),
        );
    }
    let took = started.elapsed();
    assert!(
        statuses.iter().all(|s| s.as_deref() == Some("4")),
        "DEADLINE_EXCEEDED for each: {statuses:?}"
    );
    assert!(took >= Duration::from_millis(1_900), "{took:?}");

    // A message announcing 4 MiB is refused without waiting for it.
    client = client.ready().await.expect("ready");
    let (response, mut body) = client.send_request(grpc_request(path), false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0x40, 0, 0, 1, 2, 3]), false)
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(1), grpc_status(response))
        .await
        .expect("answered at once");
    assert!(
        matches!(status.as_deref(), Some("8" | "11")),
        "RESOURCE_EXHAUSTED or OUT_OF_RANGE: {status:?}"
    );
    drop(client);
    connection.abort();

    // The advertised stream limit.
    let tcp = tokio::net::TcpStream::connect(kabar.grpc_addr)
        .await
        .unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let settle = Instant::now() + Duration::from_secs(2);
    while connection.max_concurrent_send_streams() == usize::MAX && Instant::now() < settle {
        let _ = tokio::time::timeout(Duration::from_millis(20), &mut connection).await;
    }
    assert_eq!(connection.max_concurrent_send_streams(), 256);
    drop(client);

    assert_healthy(&kabar, "after the stalled streams").await;
    assert!(peak_rss_kib(&kabar) < PEAK_RSS_BUDGET_KIB);
    let settled = rss_kib(&kabar);
    assert!(
        settled < baseline + SETTLE_BUDGET_KIB,
        "RSS {settled} KiB after, {baseline} KiB before"
    );
}

/// Meta answering a 30 MB body, or a body that never ends: each send is UNKNOWN without reading
/// past the bound, and memory stays within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_endless_answers_from_meta_are_not_read() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let meta_addr = listener.local_addr().unwrap();
    let huge = Bytes::from(vec![b' '; 30 * 1024 * 1024]);
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::post(move |uri: axum::http::Uri| {
            let huge = huge.clone();
            async move {
                if uri.path().contains("/2002/") {
                    let chunk = Bytes::from_static(&[b' '; 8192]);
                    axum::body::Body::from_stream(futures_util::stream::repeat_with(move || {
                        Ok::<_, std::io::Error>(chunk.clone())
                    }))
                } else {
                    axum::body::Body::from(huge)
                }
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    for (phone_number_id, what) in [("1001", "a 30 MB answer"), ("2002", "an endless answer")] {
        let url = format!("http://{meta_addr}");
        let kabar = start(
            &[
                ("WHATSAPP_DRIVER", "meta"),
                ("WHATSAPP_API_KEY", "EAAtest"),
                ("META_WA_PHONE_NUMBER_ID", phone_number_id),
                ("META_GRAPH_API_URL", &url),
                ("KABAR_META_TIMEOUT_MS", "20000"),
            ],
            None,
        )
        .await;
        let baseline = rss_kib(&kabar);
        let channel = Channel::from_shared(format!("http://{}", kabar.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let started = Instant::now();
        let mut calls = Vec::new();
        for _ in 0..20 {
            let mut client = kabar::pb::notification_service_client::NotificationServiceClient::new(
                channel.clone(),
            );
            calls.push(tokio::spawn(async move {
                client.send_template(invoice_request()).await
            }));
        }
        for call in calls {
            let status = call.await.unwrap().expect_err("unknown outcome");
            assert_eq!(status.code(), tonic::Code::Unknown, "{what}: {status:?}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: answered without waiting for the body's end"
        );
        assert_healthy(&kabar, what).await;
        let peak = peak_rss_kib(&kabar);
        assert!(peak < PEAK_RSS_BUDGET_KIB, "{what}: peak {peak} KiB");
        assert!(
            rss_kib(&kabar) < baseline + SETTLE_BUDGET_KIB,
            "{what}: {} KiB after, {baseline} KiB before",
            rss_kib(&kabar)
        );
    }
}

/// The request the amplification finding used, 0.7 MB of unknown parameter names: refused by
/// size before it is decoded, and a message just under the limit gives a small answer and a
/// short log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_many_violation_requests_keep_answers_and_logs_small() {
    let kabar = start(&[], None).await;
    let channel = Channel::from_shared(format!("http://{}", kabar.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        kabar::pb::notification_service_client::NotificationServiceClient::new(channel);
    let mut big = invoice_request();
    for i in 0..50_000 {
        big.params.insert(format!("p{i:07}"), String::new());
    }
    assert!(big.encoded_len() > 600_000);
    let status = client.send_template(big).await.expect_err("refused");
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );
    let mut many = invoice_request();
    for i in 0..3_000 {
        many.params
            .insert(format!("p{i:07}\n forged"), String::new());
    }
    assert!(many.encoded_len() < 64 * 1024);
    let status = client.send_template(many).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().len() <= 512);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = log_of(&kabar);
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2_048, "a log line of {longest} bytes");
    assert!(
        !log.contains("\n forged"),
        "a caller's line break reached the log"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no escape sequence, not even colours, in a log that is not a terminal"
    );
    assert!(peak_rss_kib(&kabar) < PEAK_RSS_BUDGET_KIB);
}

/// One client address that completes handshakes and then idles (its HTTP/2 layer answering
/// keepalive pings) holds at most KABAR_MAX_CONNECTIONS_PER_IP connections: other clients still
/// get in, and shutdown does not wait for the idle connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_fill_the_connection_cap() {
    let mut kabar = start(
        &[
            ("KABAR_MAX_CONNECTIONS", "40"),
            ("KABAR_MAX_CONNECTIONS_PER_IP", "10"),
        ],
        None,
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..30 {
        let tcp = tokio::net::TcpStream::connect(kabar.grpc_addr)
            .await
            .unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
        held.push((client, tokio::spawn(connection)));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let closed = loop {
        let closed = held.iter().filter(|(_, task)| task.is_finished()).count();
        if closed >= 20 || Instant::now() > deadline {
            break closed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        closed, 20,
        "connections past 10 from one address are closed"
    );
    // Another address (127.0.0.2 is loopback too) gets a connection and health at once.
    let other = async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", kabar.grpc_addr))
                .unwrap()
                .local_address(Some("127.0.0.2".parse().unwrap()))
                .connect()
                .await
                .ok()?;
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .ok()
            .map(|r| r.into_inner().status)
    };
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(1), other)
            .await
            .ok()
            .flatten(),
        Some(SERVING)
    );
    assert!(
        log_of(&kabar).contains("reached its connection limit"),
        "{}",
        log_of(&kabar)
    );
    // Ten idle connections stay open; shutdown closes them once no call is in flight.
    let (code, took) = terminate(&mut kabar).await;
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    drop(held);
}

/// The HTTP port answers one request per connection, refuses a head over 16 KiB, and holds at
/// most 64 connections however many clients start a request and stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_is_bounded() {
    let kabar = start(&[("KABAR_SLOW_CLIENT_TIMEOUT_SECONDS", "3")], None).await;
    let within = Duration::from_secs(2);

    // One request per connection: kabar closes it after answering, keep-alive asked or not.
    let mut stream = StdStream::connect(kabar.http_addr).unwrap();
    stream.set_read_timeout(Some(within)).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kabar\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("kabar closes the connection after its answer");
    assert!(answer.starts_with(b"HTTP/1.1 200"));

    // A head over 16 KiB.
    let mut stream = StdStream::connect(kabar.http_addr).unwrap();
    stream.set_read_timeout(Some(within)).unwrap();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: kabar\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let _ = stream.write_all(big.as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // 150 clients that start a request and stall: kabar holds at most 64 of them.
    let fds = |kabar: &Kabar| {
        std::fs::read_dir(format!("/proc/{}/fd", kabar.pid()))
            .unwrap()
            .count()
    };
    let before = fds(&kabar);
    let mut stalled = Vec::new();
    for _ in 0..150 {
        let mut s = StdStream::connect(kabar.http_addr).unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ka");
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = fds(&kabar);
    assert!(
        during <= before + 64,
        "{during} descriptors open, {before} before"
    );
    assert!(
        http_healthz_within(kabar.http_addr, Duration::from_secs(1)),
        "a fresh request is still answered"
    );
    assert_healthy(&kabar, "with 150 stalled HTTP clients").await;
}

/// Signed webhook bodies built to expand in memory (hundreds of thousands of tiny changes or
/// statuses in 3 MiB), and 40 unsigned bodies held one byte short: memory stays in the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_bodies_cannot_blow_up_memory() {
    use hmac::{Hmac, Mac};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let webhook = format!("127.0.0.1:{port}");
    let kabar = start(
        &[
            ("META_APP_SECRET", "attack-secret"),
            ("KABAR_WEBHOOK_ADDR", webhook.as_str()),
        ],
        None,
    )
    .await;
    let baseline = rss_kib(&kabar);
    let sign = |body: &[u8]| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"attack-secret").unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let client = reqwest::Client::new();
    let url = format!("http://{webhook}/webhook/whatsapp/meta");
    for item in [
        r#"{"f":1}"#,
        r#"{"field":"messages","value":{"statuses":[1]}}"#,
    ] {
        let mut body =
            String::from(r#"{"object":"whatsapp_business_account","entry":[{"changes":["#);
        while body.len() < 3 * 1024 * 1024 - 100 {
            body.push_str(item);
            body.push(',');
        }
        body.pop();
        body.push_str("]}]}");
        let status = client
            .post(&url)
            .header("x-hub-signature-256", sign(body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 400, "{item}");
    }
    // Bodies held one byte short: at most 16 are read at once.
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = StdStream::connect(&webhook).unwrap();
        let _ = s.write_all(
            format!(
                "POST /webhook/whatsapp/meta HTTP/1.1\r\nHost: k\r\nContent-Length: {}\r\n\r\n",
                3 * 1024 * 1024
            )
            .as_bytes(),
        );
        let _ = s.write_all(&vec![b' '; 3 * 1024 * 1024 - 1]);
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_healthy(&kabar, "with webhook bodies held").await;
    drop(held);
    let peak = peak_rss_kib(&kabar);
    assert!(peak < PEAK_RSS_BUDGET_KIB, "peak {peak} KiB");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rss_kib(&kabar) < baseline + 64 * 1024,
        "{} KiB after, {baseline} KiB before",
        rss_kib(&kabar)
    );
}

/// Half-sent SubmitBatch messages (announcing nearly 2 MiB, the largest accepted; 400 KB sent)
/// on 2 connections of 256 streams: only 8 are read at once, the others wait unread (each holding at most its
/// HTTP/2 window), so memory stays within the budget; every stream is answered, the waiting
/// ones with RESOURCE_EXHAUSTED `BATCH_SUBMIT_BUSY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_batch_submissions_cannot_pile_up() {
    let kabar = start(&[("KABAR_SLOW_CLIENT_TIMEOUT_SECONDS", "2")], None).await;
    let path = "/kabar.v1.BatchService/SubmitBatch";
    let size: u32 = 2 * 1024 * 1024 - 64;
    let mut answers = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(kabar.grpc_addr)
            .await
            .unwrap();
        let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        connections.push(tokio::spawn(async move {
            let _ = connection.await;
        }));
        for _ in 0..256 {
            client = client.ready().await.expect("ready");
            let (response, mut body) = client.send_request(grpc_request(path), false).unwrap();
            let mut frame = vec![0u8];
            frame.extend(size.to_be_bytes());
            frame.extend(std::iter::repeat_n(0u8, 400_000));
            body.send_data(Bytes::from(frame), false).unwrap();
            answers.push((response, body));
        }
    }
    assert_healthy(&kabar, "with 512 half-sent batch submissions").await;
    let mut statuses = Vec::new();
    for (response, _body) in answers {
        statuses.push(
            tokio::time::timeout(Duration::from_secs(20), grpc_status(response))
                .await
                .expect("every stalled stream is answered"),
        );
    }
    let peak = peak_rss_kib(&kabar);
    assert!(peak < PEAK_RSS_BUDGET_KIB, "peak RSS {peak} KiB");
    let busy = statuses
        .iter()
        .filter(|s| s.as_deref() == Some("8"))
        .count();
    let cut = statuses
        .iter()
        .filter(|s| s.as_deref() == Some("4"))
        .count();
    assert_eq!(busy + cut, statuses.len(), "{statuses:?}");
    assert!(busy > 400, "most waited for a turn: {busy} busy, {cut} cut");
    for c in connections {
        c.abort();
    }
}

/// Health and reflection are open to every caller, so they read only a few bytes: a message
/// announcing 60 KB is refused at once instead of being held while it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_services_read_only_small_messages() {
    let kabar = start(&[], None).await;
    let tcp = tokio::net::TcpStream::connect(kabar.grpc_addr)
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    for path in [
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ] {
        let mut client = client.clone().ready().await.expect("ready");
        let (response, mut body) = client.send_request(grpc_request(path), false).unwrap();
        body.send_data(Bytes::from_static(&[0, 0, 0, 0xea, 0x60, 1, 2, 3]), false)
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(1), grpc_status(response))
            .await
            .expect("answered at once");
        // Health refuses it OUT_OF_RANGE; reflection, a stream, ends its answer at once.
        if path.contains("Health") {
            assert_eq!(status.as_deref(), Some("11"), "{path}: OUT_OF_RANGE");
        } else {
            assert!(status.is_some(), "{path}");
        }
    }
    connection.abort();
}
