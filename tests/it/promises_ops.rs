//! Operations promises of the README, checked on the real binary where only the process shows
//! them: start-up with Redis down, exit codes, the per-call log line, the shutdown grace, the
//! log filter variables; and reflection as `grpcurl describe` uses it.

use std::time::{Duration, Instant};

use kabar::pb::{
    SendOtpRequest, SendTemplateRequest, VerifyOtpRequest,
    notification_service_client::NotificationServiceClient, otp_service_client::OtpServiceClient,
};
use tokio_stream::StreamExt;

use crate::{
    process::Kabar,
    send_template::invoice_request,
    support::{
        FakeMeta, NOT_SERVING, PHONE_NUMBER_ID, RedisServer, Reply, SERVING, TOKEN, TestApp,
        eventually, metrics_text,
    },
};

const SECRET: &str = "test-otp-secret-0123456789abcdef-0123";

#[tokio::test]
async fn starts_with_redis_down_and_serves_otp_once_redis_answers() {
    let mut redis = RedisServer::start();
    redis.stop();
    let url = redis.url();
    let mut kabar = Kabar::serve(&[("REDIS_URL", &url), ("KABAR_OTP_SECRET", SECRET)]);
    let channel = kabar.wait_serving().await;
    assert_eq!(
        kabar
            .health_status(&channel, kabar::NOTIFICATION_SERVICE)
            .await,
        Some(SERVING)
    );
    assert_eq!(
        kabar.health_status(&channel, kabar::OTP_SERVICE).await,
        Some(NOT_SERVING),
        "OtpService is NOT_SERVING while Redis is down"
    );
    let (ready, body) = crate::support::readyz(kabar.http_addr).await;
    assert_eq!(ready, 200, "ready: notifications still go out");
    assert_eq!(body["otp_store_reachable"], false);
    assert!(
        kabar
            .stderr()
            .iter()
            .any(|l| l.contains("Redis is not reachable yet")),
        "{:#?}",
        kabar.stderr()
    );

    redis.restart();
    let serving = eventually(Duration::from_secs(10), || async {
        kabar.health_status(&channel, kabar::OTP_SERVICE).await == Some(SERVING)
    })
    .await;
    assert!(serving, "OtpService turns SERVING once Redis answers");
    OtpServiceClient::new(channel)
        .send_otp(SendOtpRequest {
            phone: "0812-3456-7890".into(),
            ..Default::default()
        })
        .await
        .expect("SendOtp works once Redis is up");
    assert!(kabar.stop(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn a_port_that_cannot_be_bound_exits_1_naming_the_variable() {
    for var in ["KABAR_GRPC_ADDR", "KABAR_HTTP_ADDR"] {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let mut kabar = Kabar::serve(&[(var, &addr)]);
        let status = kabar
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("kabar exits when it cannot listen");
        assert_eq!(status.code(), Some(1), "{var}: {:#?}", kabar.stderr());
        let expected = format!("kabar: {var}: cannot listen on {addr}");
        assert!(
            kabar.stderr().iter().any(|l| l.starts_with(&expected)),
            "{expected} in {:#?}",
            kabar.stderr()
        );
        drop(taken);
    }
}

/// The one log line of the call logged with `method`.
fn call_line<'a>(
    lines: &'a [serde_json::Value],
    method: &str,
    code: &str,
) -> &'a serde_json::Value {
    let found: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["method"] == method && l["code"] == code)
        .collect();
    assert_eq!(found.len(), 1, "one {method} {code} line in {lines:#?}");
    found[0]
}

#[tokio::test]
async fn each_call_logs_one_line_with_its_outcome_fields() {
    let meta = FakeMeta::start().await;
    let url = meta.url();
    let mut kabar = Kabar::serve(&[
        ("KABAR_LOG_FORMAT", "json"),
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", TOKEN),
        ("META_WA_PHONE_NUMBER_ID", PHONE_NUMBER_ID),
        ("META_GRAPH_API_URL", &url),
        ("KABAR_META_RETRY_BASE_MS", "5"),
    ]);
    let channel = kabar.wait_serving().await;
    let mut notifications = NotificationServiceClient::new(channel.clone());
    let mut otp = OtpServiceClient::new(channel.clone());

    // OK
    notifications
        .send_template(SendTemplateRequest {
            reference: "INV-2026-77".into(),
            ..invoice_request()
        })
        .await
        .expect("sent");
    // INVALID_ARGUMENT: a refusal
    notifications
        .send_template(SendTemplateRequest {
            phone: "0812".into(),
            ..invoice_request()
        })
        .await
        .unwrap_err();
    // FAILED_PRECONDITION from Meta: a refusal, with Meta's code, reason and remedy
    meta.push(Reply::error(404, 132001, "template name does not exist"));
    notifications
        .send_template(invoice_request())
        .await
        .unwrap_err();
    // UNAVAILABLE from Meta after three attempts: a failure
    for _ in 0..3 {
        meta.push(Reply::error(503, 131016, "Service temporarily unavailable"));
    }
    notifications
        .send_template(invoice_request())
        .await
        .unwrap_err();
    // SendOtp OK, then RESOURCE_EXHAUSTED (cooldown); VerifyOtp OK.
    let otp_request = SendOtpRequest {
        phone: "0812-9999-0000".into(),
        ..Default::default()
    };
    otp.send_otp(otp_request.clone()).await.expect("code sent");
    otp.send_otp(otp_request).await.unwrap_err();
    otp.verify_otp(VerifyOtpRequest {
        phone: "0812-9999-0000".into(),
        purpose: String::new(),
        code: "000000".into(),
    })
    .await
    .expect("verify answers");

    assert!(kabar.stop(Duration::from_secs(10)).await.success());
    let lines = kabar.json_lines();
    assert_eq!(
        lines.iter().filter(|l| l.get("method").is_some()).count(),
        7,
        "one line per call: {lines:#?}"
    );
    for l in lines.iter().filter(|l| l.get("method").is_some()) {
        assert!(l["elapsed_ms"].is_number(), "elapsed_ms in {l}");
    }

    let ok = call_line(&lines, "SendTemplate", "OK");
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["template"], "invoice_notification");
    assert_eq!(ok["to"], "+6281234567890");
    assert_eq!(ok["reference"], "INV-2026-77");
    assert_eq!(ok["message_id"], "wamid.TEST00000001");

    let invalid = call_line(&lines, "SendTemplate", "InvalidArgument");
    assert_eq!(invalid["level"], "INFO");
    assert!(
        invalid["error"].as_str().unwrap().contains("phone"),
        "{invalid}"
    );

    let refused = call_line(&lines, "SendTemplate", "FailedPrecondition");
    assert_eq!(refused["level"], "INFO");
    let error = refused["error"].as_str().unwrap();
    for part in [
        "132001",
        "META_TEMPLATE_NOT_APPROVED",
        "invoice_notification in language id is not approved",
    ] {
        assert!(error.contains(part), "{part} in {error}");
    }

    let failed = call_line(&lines, "SendTemplate", "Unavailable");
    assert_eq!(failed["level"], "WARN");
    let error = failed["error"].as_str().unwrap();
    for part in ["131016", "META_SERVICE_UNAVAILABLE", "retry later"] {
        assert!(error.contains(part), "{part} in {error}");
    }

    assert_eq!(call_line(&lines, "SendOtp", "OK")["level"], "INFO");
    assert_eq!(
        call_line(&lines, "SendOtp", "ResourceExhausted")["level"],
        "INFO"
    );
    assert_eq!(call_line(&lines, "VerifyOtp", "OK")["level"], "INFO");
}

#[tokio::test]
async fn after_the_grace_period_kabar_exits_and_refuses_new_calls_meanwhile() {
    let meta = FakeMeta::start().await;
    // The call in flight would take far longer than the grace period.
    meta.set_delay(Duration::from_secs(6));
    let url = meta.url();
    let mut kabar = Kabar::serve(&[
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", TOKEN),
        ("META_WA_PHONE_NUMBER_ID", PHONE_NUMBER_ID),
        ("META_GRAPH_API_URL", &url),
        ("KABAR_SHUTDOWN_DELAY_SECONDS", "0"),
        ("KABAR_SHUTDOWN_GRACE_SECONDS", "1"),
    ]);
    let channel = kabar.wait_serving().await;
    let mut client = NotificationServiceClient::new(channel);
    let in_flight = tokio::spawn(async move { client.send_template(invoice_request()).await });
    assert!(
        eventually(Duration::from_secs(5), || async { meta.count() == 1 }).await,
        "the call reaches Meta"
    );

    let sigterm = Instant::now();
    kabar.terminate();
    assert!(
        kabar
            .wait_for_line("no longer accepting calls", Duration::from_secs(5))
            .await,
        "{:#?}",
        kabar.stderr()
    );
    // Drained: a new call is refused and never reaches Meta.
    let refused = async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", kabar.grpc_addr))
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        NotificationServiceClient::new(channel)
            .send_template(invoice_request())
            .await
    }
    .await
    .expect_err("no call is accepted after the drain");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let status = kabar
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("kabar exits after the grace period");
    let took = sigterm.elapsed();
    assert!(status.success(), "exit {status}: {:#?}", kabar.stderr());
    assert!(
        took >= Duration::from_secs(1),
        "the grace lasts 1 s: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "kabar did not wait for the call in flight: {took:?}"
    );
    assert!(
        kabar
            .stderr()
            .iter()
            .any(|l| l.contains("calls still in flight after the shutdown grace period")),
        "{:#?}",
        kabar.stderr()
    );
    assert!(in_flight.await.unwrap().is_err(), "the cut call failed");
    assert_eq!(meta.count(), 1);
}

#[tokio::test]
async fn shutting_down_metric_turns_1_when_shutdown_begins() {
    let app = TestApp::start(crate::support::vars(&[(
        "KABAR_SHUTDOWN_DELAY_SECONDS",
        "1",
    )]))
    .await;
    let line = |v: u8| format!("kabar_shutting_down {v}");
    assert!(
        metrics_text(app.http_addr)
            .await
            .lines()
            .any(|l| l == line(0))
    );
    app.shutdown.cancel();
    // During the delay the HTTP port still answers, and says it.
    let flipped = eventually(Duration::from_millis(800), || async {
        metrics_text(app.http_addr)
            .await
            .lines()
            .any(|l| l == line(1))
    })
    .await;
    assert!(flipped, "kabar_shutting_down 1 during the shutdown delay");
    app.stop().await.expect("run returns Ok");
}

/// The few fields of `google.protobuf.FileDescriptorProto` the test reads.
#[derive(Clone, PartialEq, prost::Message)]
struct FileDescriptorProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(message, repeated, tag = "4")]
    message_type: Vec<NamedProto>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDescriptorProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ServiceDescriptorProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "2")]
    method: Vec<NamedProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NamedProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

/// Asks reflection v1 for the file containing `symbol`; the decoded files, or the error code.
async fn file_containing(
    channel: &tonic::transport::Channel,
    symbol: &str,
) -> Result<Vec<FileDescriptorProto>, tonic::Code> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    let response = match responses.next().await.expect("one answer") {
        Ok(response) => response,
        Err(status) => return Err(status.code()),
    };
    match response.message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => Ok(files
            .file_descriptor_proto
            .iter()
            .map(|b| <FileDescriptorProto as prost::Message>::decode(b.as_slice()).unwrap())
            .collect()),
        Some(MessageResponse::ErrorResponse(e)) => Err(tonic::Code::from(e.error_code)),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn reflection_describes_a_symbol_with_its_whole_file() {
    let app = TestApp::start(vec![]).await;
    for symbol in [
        "kabar.v1.NotificationService",
        "kabar.v1.OtpService",
        "kabar.v1.SendTemplateRequest",
        "kabar.v1.NotificationService.SendTemplate",
    ] {
        let files = file_containing(&app.channel, symbol)
            .await
            .unwrap_or_else(|code| panic!("{symbol}: error {code:?}"));
        let file = files
            .iter()
            .find(|f| f.name.as_deref() == Some("kabar/v1/kabar.proto"))
            .unwrap_or_else(|| panic!("{symbol}: kabar.proto in {files:?}"));
        assert_eq!(file.package.as_deref(), Some("kabar.v1"));

        let methods = |service: &str| -> Vec<String> {
            file.service
                .iter()
                .find(|s| s.name.as_deref() == Some(service))
                .unwrap_or_else(|| panic!("{service} in {file:?}"))
                .method
                .iter()
                .filter_map(|m| m.name.clone())
                .collect()
        };
        assert_eq!(
            methods("NotificationService"),
            ["SendTemplate", "GetMessageStatus", "WatchMessageStatus"]
        );
        assert_eq!(methods("OtpService"), ["SendOtp", "VerifyOtp"]);
        assert!(
            file.message_type
                .iter()
                .any(|m| m.name.as_deref() == Some("SendTemplateRequest"))
        );
    }
    // grpcurl asks for the imports too, to describe the timestamps.
    let timestamp = file_containing(&app.channel, "google.protobuf.Timestamp")
        .await
        .expect("the imported well-known type is described");
    assert!(
        timestamp
            .iter()
            .any(|f| f.name.as_deref() == Some("google/protobuf/timestamp.proto"))
    );
    let health = file_containing(&app.channel, "grpc.health.v1.Health")
        .await
        .expect("health is described");
    assert!(health.iter().any(|f| {
        f.service
            .iter()
            .any(|s| s.name.as_deref() == Some("Health"))
    }));
    let unknown = file_containing(&app.channel, "kabar.v1.Nope").await;
    assert_eq!(unknown.unwrap_err(), tonic::Code::NotFound);
}

/// Runs kabar with `vars` until SERVING, stops it, and returns its stderr.
async fn log_of(vars: &[(&str, &str)]) -> Vec<String> {
    let mut kabar = Kabar::serve(vars);
    kabar.wait_serving().await;
    assert!(kabar.stop(Duration::from_secs(10)).await.success());
    kabar.stderr()
}

fn has_info(log: &[String]) -> bool {
    log.iter().any(|l| l.contains("kabar is serving"))
}

fn has_warning(log: &[String]) -> bool {
    log.iter().any(|l| l.contains("development setup"))
}

#[tokio::test]
async fn kabar_log_sets_the_level_and_rust_log_is_the_fallback() {
    let (rust_log_only, kabar_log_wins, unparsable) = tokio::join!(
        log_of(&[("RUST_LOG", "warn")]),
        log_of(&[("KABAR_LOG", "warn"), ("RUST_LOG", "info")]),
        log_of(&[("KABAR_LOG", "kabar=["), ("RUST_LOG", "warn")]),
    );
    // RUST_LOG applies when KABAR_LOG is unset.
    assert!(
        !has_info(&rust_log_only) && has_warning(&rust_log_only),
        "{rust_log_only:#?}"
    );
    // KABAR_LOG wins over RUST_LOG.
    assert!(
        !has_info(&kabar_log_wins) && has_warning(&kabar_log_wins),
        "{kabar_log_wins:#?}"
    );
    // A KABAR_LOG that does not parse: info (not RUST_LOG), with a note on stderr.
    assert!(has_info(&unparsable), "{unparsable:#?}");
    assert!(
        unparsable
            .iter()
            .any(|l| l.contains("KABAR_LOG") && l.contains("is not a log filter")),
        "{unparsable:#?}"
    );
}
