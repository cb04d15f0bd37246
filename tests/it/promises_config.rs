//! Configuration promises of the README: `_FILE` values lose their trailing newline, the real
//! environment wins over `.env`, and a blank value counts as unset.

use std::{collections::BTreeMap, time::Duration};

use kabar::pb::{
    SendOtpRequest, VerifyOtpRequest, otp_service_client::OtpServiceClient,
    verify_otp_response::Result as Verify,
};

use crate::{
    process::{Kabar, free_port, work_dir},
    support::{FakeMeta, PHONE_NUMBER_ID, RedisServer, TOKEN, TestApp, store_vars, vars},
};

const SECRET: &str = "test-otp-secret-0123456789abcdef-0123";

#[tokio::test]
async fn file_values_lose_their_trailing_newline() {
    let dir = work_dir("secret-files");
    let file = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let token_file = file("token", format!("{TOKEN}\n"));
    let secret_file = file("otp_secret", format!("{SECRET}\n"));
    let redis_file = file("redis_url", format!("{}\n", redis.url()));
    // One replica reads its secrets from files (as Kubernetes mounts them, newline included)...
    let from_files = TestApp::start(vars(&[
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY_FILE", &token_file),
        ("META_WA_PHONE_NUMBER_ID", PHONE_NUMBER_ID),
        ("META_GRAPH_API_URL", &meta.url()),
        ("REDIS_URL_FILE", &redis_file),
        ("KABAR_OTP_SECRET_FILE", &secret_file),
    ]))
    .await;
    // ...another from plain variables, on the same Redis.
    let from_env = TestApp::start(store_vars(Some(&redis))).await;

    from_files
        .otp()
        .send_otp(SendOtpRequest {
            phone: "0812-3456-7890".into(),
            ..Default::default()
        })
        .await
        .expect("sent");
    let received = meta.received();
    assert_eq!(
        received[0].authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}")),
        "the token without its newline"
    );
    let code = received[0].body["template"]["components"][0]["parameters"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    // The code hashed with the file's secret verifies with the variable's: the same key.
    let verified = from_env
        .otp()
        .verify_otp(VerifyOtpRequest {
            phone: "0812-3456-7890".into(),
            purpose: String::new(),
            code,
        })
        .await
        .unwrap()
        .into_inner()
        .result();
    assert_eq!(verified, Verify::Verified);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_environment_wins_over_dotenv_and_blank_values_count_as_unset() {
    let dir = work_dir("dotenv");
    let (file_grpc, env_grpc, file_http) = (free_port(), free_port(), free_port());
    std::fs::write(
        dir.join(".env"),
        format!(
            "KABAR_GRPC_ADDR=127.0.0.1:{file_grpc}\n\
             KABAR_HTTP_ADDR=127.0.0.1:{file_http}\n\
             KABAR_LOG_FORMAT=json\n\
             KABAR_OTP_RESEND_SECONDS=7\n\
             # blank: the default code length, 6\n\
             KABAR_OTP_CODE_LENGTH=\n"
        ),
    )
    .unwrap();
    let env: BTreeMap<String, String> = [
        // Set in the environment: wins over the file.
        ("KABAR_GRPC_ADDR", format!("127.0.0.1:{env_grpc}")),
        // Blank in the environment: the default TTL, 300 s.
        ("KABAR_OTP_TTL_SECONDS", "  ".to_owned()),
        // Blank in the environment, set in the file: the file's value.
        ("KABAR_OTP_RESEND_SECONDS", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut kabar = Kabar::spawn(&dir, env);
    let channel = kabar.wait_serving().await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", file_grpc)).is_err(),
        "nothing listens on the .env's gRPC address"
    );
    // The file's other values apply: its HTTP address, its log format.
    let ready = reqwest::get(format!("http://127.0.0.1:{file_http}/readyz"))
        .await
        .expect("HTTP on the .env's address");
    assert_eq!(ready.status(), 200);

    let mut otp = OtpServiceClient::new(channel);
    let sent = otp
        .send_otp(SendOtpRequest {
            phone: "0812-3456-7890".into(),
            ..Default::default()
        })
        .await
        .expect("sent with the log driver")
        .into_inner();
    assert_eq!(sent.expires_in_seconds, 300);
    assert_eq!(
        sent.resend_after_seconds, 7,
        "a blank variable does not hide .env"
    );
    let verified = otp
        .verify_otp(VerifyOtpRequest {
            phone: "0812-3456-7890".into(),
            purpose: String::new(),
            code: "000000".into(),
        })
        .await
        .expect("a 6-digit code is well formed")
        .into_inner();
    assert_ne!(verified.result(), Verify::Expired);

    assert!(kabar.stop(Duration::from_secs(10)).await.success());
    let lines = kabar.json_lines();
    assert!(lines.iter().any(|l| l["method"] == "SendOtp"));
    let _ = std::fs::remove_dir_all(dir);
}
