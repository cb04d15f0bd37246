//! The running service: health, reflection, HTTP probes, graceful shutdown, and the `kabar`
//! binary itself.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kabar::pb::SendTemplateRequest;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::{
    send_template::invoice_request,
    support::{FakeMeta, NOT_SERVING, SERVING, TestApp, meta_vars},
};

#[tokio::test]
async fn defaults_serve_health_and_reflection() {
    let app = TestApp::start(vec![]).await;
    for service in [
        "",
        kabar::NOTIFICATION_SERVICE,
        kabar::OTP_SERVICE,
        kabar::BATCH_SERVICE,
    ] {
        assert_eq!(app.health_status(service).await, SERVING, "{service:?}");
    }
    let unknown = app
        .health()
        .check(HealthCheckRequest {
            service: "kabar.v1.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    let response = responses.next().await.expect("one answer").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "kabar.v1.NotificationService",
        "kabar.v1.OtpService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }

    // v1alpha, which older grpcurl and many tools still use, serves the same.
    use tonic_reflection::pb::v1alpha as alpha;
    let mut reflection =
        alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection answers")
        .into_inner();
    let response = responses.next().await.expect("one answer").expect("ok");
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "kabar.v1.NotificationService")
    );
}

#[tokio::test]
async fn http_liveness_and_readiness() {
    let app = TestApp::start(vec![]).await;
    let base = format!("http://{}", app.http_addr);
    let live = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(live.status(), 200);
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["ready"], true);
    assert_eq!(body["driver"], "log");
    assert_eq!(body["otp_store"], "memory");

    // Prometheus metrics count calls by method and code.
    let mut client = app.notifications();
    client.send_template(invoice_request()).await.unwrap();
    client.send_template(invoice_request()).await.unwrap();
    let bad = SendTemplateRequest {
        phone: "0812".into(),
        ..invoice_request()
    };
    client.send_template(bad).await.unwrap_err();
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "kabar_grpc_calls_total{method=\"SendTemplate\",code=\"OK\"} 2",
        "kabar_grpc_calls_total{method=\"SendTemplate\",code=\"INVALID_ARGUMENT\"} 1",
        "kabar_grpc_call_duration_seconds_count{method=\"SendTemplate\"} 3",
        "kabar_grpc_call_duration_seconds_bucket{method=\"SendTemplate\",le=\"+Inf\"} 3",
        "kabar_otp_store_up 1",
        "kabar_shutting_down 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_and_finishes_calls_in_flight() {
    let meta = FakeMeta::start().await;
    meta.set_delay(Duration::from_millis(600));
    let app = TestApp::start(meta_vars(&meta)).await;
    let mut watch = app
        .health()
        .watch(HealthCheckRequest {
            service: kabar::NOTIFICATION_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, SERVING);

    let mut client = app.notifications();
    let in_flight = tokio::spawn(async move { client.send_template(invoice_request()).await });
    // Let the call reach Meta, then ask kabar to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while meta.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(meta.count(), 1);
    app.shutdown.cancel();

    let update = tokio::time::timeout(Duration::from_secs(2), watch.message())
        .await
        .expect("health update arrives")
        .expect("stream ok")
        .expect("an update");
    assert_eq!(update.status, NOT_SERVING);
    drop(watch);

    let response = in_flight
        .await
        .unwrap()
        .expect("the call in flight finishes");
    assert!(response.into_inner().message_id.starts_with("wamid.TEST"));
    app.stop().await.expect("run returns Ok");
}

#[tokio::test]
async fn shutdown_delay_keeps_accepting_calls_while_health_says_not_serving() {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.push(("KABAR_SHUTDOWN_DELAY_SECONDS".into(), "1".into()));
    let app = TestApp::start(vars).await;
    let start = Instant::now();
    app.shutdown.cancel();
    assert!(
        app.wait_health("", NOT_SERVING, Duration::from_millis(500))
            .await
    );
    assert_eq!(app.health_status(kabar::OTP_SERVICE).await, NOT_SERVING);
    let ready = reqwest::get(format!("http://{}/readyz", app.http_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    // Still inside the delay: a new call is served.
    app.notifications()
        .send_template(invoice_request())
        .await
        .expect("served during the delay");
    assert!(start.elapsed() < Duration::from_secs(1));
    app.stop().await.expect("run returns Ok");
    assert!(start.elapsed() >= Duration::from_secs(1));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kabar_command(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kabar"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kabar-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn binary_stops_with_one_line_naming_the_missing_variable() {
    let dir = temp_dir("cfg-error");
    let output = kabar_command(&dir)
        .arg("serve")
        .env("WHATSAPP_DRIVER", "meta")
        .env("META_WA_PHONE_NUMBER_ID", "106540352242922")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("WHATSAPP_API_KEY"), "{stderr}");

    // The same variable from a .env file in the working directory.
    std::fs::write(
        dir.join(".env"),
        "WHATSAPP_DRIVER=meta\nWHATSAPP_API_KEY=abc\n",
    )
    .unwrap();
    let output = kabar_command(&dir).arg("serve").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("META_WA_PHONE_NUMBER_ID"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn binary_serves_on_defaults_and_exits_zero_on_sigterm() {
    let dir = temp_dir("serve");
    let grpc_port = free_port();
    let mut child = kabar_command(&dir)
        .arg("serve")
        .env("KABAR_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("KABAR_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("KABAR_LOG_FORMAT", "json")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let channel = loop {
        match tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("kabar did not start: {e}"),
        }
    };
    let status = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, SERVING);
    let response = kabar::pb::notification_service_client::NotificationServiceClient::new(channel)
        .send_template(SendTemplateRequest {
            ..invoice_request()
        })
        .await
        .expect("log driver answers")
        .into_inner();
    assert!(response.message_id.starts_with("wamid.log."));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    })
    .await
    .unwrap();
    assert!(
        output.0.success(),
        "exit status {:?}: {}",
        output.0,
        output.1
    );
    // JSON logs: one object per line, the call logged with its outcome, the warning present.
    let lines: Vec<serde_json::Value> = output
        .1
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(lines.iter().any(|l| {
        l["message"]
            .as_str()
            .unwrap_or_default()
            .contains("development setup")
    }));
    let call = lines
        .iter()
        .find(|l| l["method"] == "SendTemplate")
        .expect("the call is logged");
    assert_eq!(call["code"], "OK");
    assert!(call["elapsed_ms"].is_number());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn send_test_prints_the_message_id_or_the_remedy() {
    let meta = FakeMeta::start().await;
    let dir = temp_dir("send-test");
    let run = |args: &[&str]| {
        let mut command = kabar_command(&dir);
        command
            .arg("send-test")
            .args(args)
            .env("WHATSAPP_DRIVER", "meta")
            .env("WHATSAPP_API_KEY", crate::support::TOKEN)
            .env("META_WA_PHONE_NUMBER_ID", crate::support::PHONE_NUMBER_ID)
            .env("META_GRAPH_API_URL", meta.url());
        command
    };
    let output = tokio::task::spawn_blocking({
        let mut command = run(&["0812-3456-7890", "--param", "nama=Budi"]);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("wamid.TEST00000001"), "{stdout}");
    let sent = &meta.received()[0].body;
    assert_eq!(sent["template"]["name"], "access_opened");
    assert_eq!(
        sent["template"]["components"][0]["parameters"][0]["text"],
        "Budi"
    );
    // The missing parameter got a sample value.
    assert_eq!(
        sent["template"]["components"][0]["parameters"][1]["text"],
        "0800-000-0000"
    );

    meta.push(crate::support::Reply::error(
        404,
        132001,
        "template name does not exist",
    ));
    let output = tokio::task::spawn_blocking({
        let mut command = run(&["0812-3456-7890", "--template", "invoice_notification"]);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("132001"), "{stderr}");
    assert!(
        stderr.contains("invoice_notification in language id is not approved"),
        "{stderr}"
    );
    assert!(!stderr.contains(crate::support::TOKEN));

    let output = tokio::task::spawn_blocking({
        let mut command = run(&["0812345"]);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("phone"));
    assert_eq!(meta.count(), 2, "an invalid phone never reaches Meta");
    let _ = std::fs::remove_dir_all(dir);
}
