//! Callers and keys: every RPC with no key, an unknown key, the wrong scope and the right one;
//! health and reflection open; the bind rule; reloading the key file on SIGHUP; idempotency keys
//! scoped by caller; `kabar keys new`.

use std::time::Duration;

use kabar::{
    config::Config,
    domain::auth::{key_hash, new_key},
    pb::{
        GetBatchRequest, GetMessageStatusRequest, ListBatchItemsRequest, SendOtpRequest,
        SubmitBatchRequest, VerifyOtpRequest, WatchMessageStatusRequest,
        batch_service_client::BatchServiceClient,
        notification_service_client::NotificationServiceClient,
        otp_service_client::OtpServiceClient,
    },
};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    process::{Kabar, work_dir},
    send_template::invoice_request,
    support::{FakeMeta, TestApp, error_info, meta_vars},
};

/// A key file with `(name, key, scopes)` entries; its path.
fn key_file(entries: &[(&str, &str, &[&str])]) -> std::path::PathBuf {
    let text: String = entries
        .iter()
        .map(|(name, key, scopes)| {
            let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
            format!(
                "[[key]]\nname = {name:?}\nhash = {:?}\nscopes = [{}]\n",
                key_hash(key),
                scopes.join(", ")
            )
        })
        .collect();
    let path = work_dir("keys").join("keys.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn with_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

/// Every kabar RPC once with `key`: its name and the code it was answered with.
async fn every_rpc(channel: &Channel, key: Option<&str>) -> Vec<(&'static str, Code)> {
    let mut n = NotificationServiceClient::new(channel.clone());
    let mut o = OtpServiceClient::new(channel.clone());
    let mut b = BatchServiceClient::new(channel.clone());
    let code = |r: Result<tonic::Code, tonic::Status>| match r {
        Ok(c) => c,
        Err(s) => s.code(),
    };
    let get = || GetBatchRequest {
        batch_id: "nope".into(),
    };
    vec![
        (
            "SendTemplate",
            code(
                n.send_template(with_key(invoice_request(), key))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "GetMessageStatus",
            code(
                n.get_message_status(with_key(GetMessageStatusRequest::default(), key))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "WatchMessageStatus",
            code(
                n.watch_message_status(with_key(
                    WatchMessageStatusRequest {
                        after: "bad cursor".into(),
                    },
                    key,
                ))
                .await
                .map(|_| Code::Ok),
            ),
        ),
        (
            "SendOtp",
            code(
                o.send_otp(with_key(SendOtpRequest::default(), key))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "VerifyOtp",
            code(
                o.verify_otp(with_key(VerifyOtpRequest::default(), key))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "SubmitBatch",
            code(
                b.submit_batch(with_key(SubmitBatchRequest::default(), key))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "GetBatch",
            code(b.get_batch(with_key(get(), key)).await.map(|_| Code::Ok)),
        ),
        (
            "WatchBatch",
            code(b.watch_batch(with_key(get(), key)).await.map(|_| Code::Ok)),
        ),
        (
            "CancelBatch",
            code(b.cancel_batch(with_key(get(), key)).await.map(|_| Code::Ok)),
        ),
        (
            "ResumeBatch",
            code(b.resume_batch(with_key(get(), key)).await.map(|_| Code::Ok)),
        ),
        (
            "ListBatchItems",
            code(
                b.list_batch_items(with_key(ListBatchItemsRequest::default(), key))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
    ]
}

const OTP: &[&str] = &["SendOtp", "VerifyOtp"];
const NOTIFY: &[&str] = &["SendTemplate", "SubmitBatch", "CancelBatch", "ResumeBatch"];
const STATUS: &[&str] = &[
    "GetMessageStatus",
    "WatchMessageStatus",
    "GetBatch",
    "WatchBatch",
    "ListBatchItems",
];

#[tokio::test]
async fn every_rpc_needs_a_key_with_its_scope() {
    let meta = FakeMeta::start().await;
    let portal = new_key();
    let billing = new_key();
    let reader = new_key();
    let file = key_file(&[
        ("portal", &portal, &["otp"]),
        ("billing", &billing, &["notify"]),
        ("reader", &reader, &["status"]),
    ]);
    let mut vars = meta_vars(&meta);
    vars.push(("KABAR_API_KEYS_FILE".into(), file.display().to_string()));
    let app = TestApp::start(vars).await;

    for (name, code) in every_rpc(&app.channel, None).await {
        assert_eq!(code, Code::Unauthenticated, "{name} without a key");
    }
    for (name, code) in every_rpc(&app.channel, Some("kabar_not-a-key")).await {
        assert_eq!(code, Code::Unauthenticated, "{name} with an unknown key");
    }
    for (key, allowed) in [(&portal, OTP), (&billing, NOTIFY), (&reader, STATUS)] {
        for (name, code) in every_rpc(&app.channel, Some(key)).await {
            if allowed.contains(&name) {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{name} with its scope: {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{name} without its scope");
            }
        }
    }
    // Only the calls with their scope reached Meta (SendTemplate with billing's key).
    assert_eq!(meta.count(), 1);
    // The refusals name the reason and the missing scope.
    let mut n = NotificationServiceClient::new(app.channel.clone());
    let e = n
        .send_template(with_key(invoice_request(), None))
        .await
        .unwrap_err();
    assert_eq!(error_info(&e).unwrap().0, "API_KEY_MISSING");
    let e = n
        .send_template(with_key(invoice_request(), Some(&portal)))
        .await
        .unwrap_err();
    let (reason, metadata) = error_info(&e).unwrap();
    assert_eq!(reason, "MISSING_SCOPE");
    assert_eq!(metadata["scope"], "notify");
    assert!(!e.message().contains(&portal));
    assert_eq!(meta.count(), 1, "nothing was sent for a refused call");
    // With the right key the call goes through.
    n.send_template(with_key(invoice_request(), Some(&billing)))
        .await
        .unwrap();
    assert_eq!(meta.count(), 2);

    // Health and reflection need no key.
    let health = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, crate::support::SERVING);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn idempotency_keys_are_each_callers_own() {
    let meta = FakeMeta::start().await;
    let a = new_key();
    let b = new_key();
    let file = key_file(&[
        ("billing-a", &a, &["notify"]),
        ("billing-b", &b, &["notify"]),
    ]);
    let mut vars = meta_vars(&meta);
    vars.push(("KABAR_API_KEYS_FILE".into(), file.display().to_string()));
    let app = TestApp::start(vars).await;
    let mut n = NotificationServiceClient::new(app.channel.clone());
    let mut first = invoice_request();
    first.idempotency_key = "inv-1".into();
    let mut second = first.clone();
    second.phone = "0857-1234-5678".into();
    let answer_a = n
        .send_template(with_key(first.clone(), Some(&a)))
        .await
        .unwrap()
        .into_inner();
    let answer_b = n
        .send_template(with_key(second, Some(&b)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(answer_a.message_id, answer_b.message_id);
    assert_eq!(answer_b.phone, "+6285712345678", "b never sees a's answer");
    // The same caller with the same key gets its first answer back, nothing sent again.
    let again = n
        .send_template(with_key(first, Some(&a)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.message_id, answer_a.message_id);
    assert_eq!(meta.count(), 2);
    app.stop().await.unwrap();
}

#[test]
fn without_keys_kabar_listens_on_loopback_only() {
    let source = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let Err(e) = Config::from_source(&source(&[("KABAR_GRPC_ADDR", "0.0.0.0:50051")])) else {
        panic!("refused without keys");
    };
    assert_eq!(e.var, "KABAR_API_KEYS_FILE");
    assert!(
        e.message.contains("KABAR_ALLOW_UNAUTHENTICATED=true"),
        "{e}"
    );
    let open = Config::from_source(&source(&[
        ("KABAR_GRPC_ADDR", "0.0.0.0:50051"),
        ("KABAR_ALLOW_UNAUTHENTICATED", "true"),
    ]))
    .expect("the explicit opt-out");
    assert!(open.warnings.iter().any(|w| w.contains("without API keys")));
    assert!(Config::from_source(&source(&[("KABAR_GRPC_ADDR", "[::1]:50051")])).is_ok());
    let key = new_key();
    let file = key_file(&[("billing", &key, &["notify"])]);
    let keyed = Config::from_source(&source(&[
        ("KABAR_GRPC_ADDR", "0.0.0.0:50051"),
        ("KABAR_API_KEYS_FILE", &file.display().to_string()),
    ]))
    .expect("keys on any address");
    assert_eq!(keyed.api_keys.unwrap().ring.len(), 1);
    // A broken file names the variable and never shows the key or its hash.
    std::fs::write(
        &file,
        format!("[[key]]\nname = \"billing\"\nhash = \"{key}\"\nscopes = [\"notify\"]\n"),
    )
    .unwrap();
    let Err(e) = Config::from_source(&source(&[(
        "KABAR_API_KEYS_FILE",
        &file.display().to_string(),
    )])) else {
        panic!("a key where a hash belongs is refused");
    };
    assert_eq!(e.var, "KABAR_API_KEYS_FILE");
    assert!(!e.message.contains(&key[6..]), "{e}");
}

#[tokio::test]
async fn keys_are_read_again_on_sighup() {
    let old = new_key();
    let new = new_key();
    let sender = new_key();
    let file = key_file(&[
        ("billing", &old, &["status"]),
        ("sender", &sender, &["notify"]),
    ]);
    let path = file.display().to_string();
    let mut kabar = Kabar::serve(&[("KABAR_API_KEYS_FILE", &path)]);
    let channel = kabar.wait_serving().await;
    let status = |key: String| {
        let channel = channel.clone();
        async move {
            BatchServiceClient::new(channel)
                .get_batch(with_key(
                    GetBatchRequest {
                        batch_id: "x".into(),
                    },
                    Some(&key),
                ))
                .await
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(status(old.clone()).await, Code::NotFound);
    assert_eq!(status(new.clone()).await, Code::Unauthenticated);
    // A stream opened with the old key: a batch that stays open, followed with WatchBatch.
    let mut batches = BatchServiceClient::new(channel.clone());
    let submit = |from: usize| {
        with_key(
            SubmitBatchRequest {
                batch_id: "watched".into(),
                messages: (from..from + 2).map(crate::batch::invoice).collect(),
                last: false,
            },
            Some(&sender),
        )
    };
    batches.submit_batch(submit(0)).await.unwrap();
    let mut stream = batches
        .watch_batch(with_key(
            GetBatchRequest {
                batch_id: "watched".into(),
            },
            Some(&old),
        ))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("the batch now");
    // Rotation: the new key in, the old one out.
    let text = std::fs::read_to_string(key_file(&[
        ("billing", &new, &["status"]),
        ("sender", &sender, &["notify"]),
    ]))
    .unwrap();
    std::fs::write(&file, text).unwrap();
    let hangup = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
    };
    assert!(hangup(kabar.pid()).success());
    assert!(
        kabar
            .wait_for_line("API keys read again", Duration::from_secs(5))
            .await
    );
    assert_eq!(status(new.clone()).await, Code::NotFound);
    assert_eq!(status(old.clone()).await, Code::Unauthenticated);
    // The open stream ends at its next message instead of delivering it.
    batches.submit_batch(submit(2)).await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends");
    assert_eq!(cut.unwrap_err().code(), Code::Unauthenticated);
    // A broken file keeps the keys in force, and says why without a hash.
    std::fs::write(&file, "[[key]]\nname = \"billing\"\n").unwrap();
    assert!(hangup(kabar.pid()).success());
    assert!(
        kabar
            .wait_for_line("was not read again", Duration::from_secs(5))
            .await
    );
    assert_eq!(status(new.clone()).await, Code::NotFound);
    let log = kabar.stderr().join("\n");
    assert!(
        !log.contains(&new[6..]) && !log.contains(&key_hash(&new)[7..]),
        "{log}"
    );
    kabar.stop(Duration::from_secs(10)).await;
}

#[test]
fn keys_new_prints_a_key_once_and_its_entry() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kabar"))
        .args(["keys", "new", "--name", "portal", "--scope", "otp"])
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().next().unwrap();
    assert!(key.starts_with("kabar_") && key.len() == 70, "{key}");
    let entry: String = stdout.lines().skip(1).collect::<Vec<_>>().join("\n");
    let ring = kabar::domain::auth::KeyRing::parse(&entry).unwrap();
    assert_eq!(ring.caller(key).unwrap().name, "portal");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_kabar"))
        .args(["keys", "new", "--name", "portal", "--scope", "send"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test]
async fn a_runaway_caller_meets_its_quota_and_the_others_do_not() {
    let job = new_key();
    let portal = new_key();
    let path = work_dir("quota").join("keys.toml");
    std::fs::write(
        &path,
        format!(
            "[[key]]\nname = \"job\"\nhash = \"{}\"\nscopes = [\"status\"]\ncalls_per_second = 5\n\
             [[key]]\nname = \"portal\"\nhash = \"{}\"\nscopes = [\"status\"]\n",
            key_hash(&job),
            key_hash(&portal)
        ),
    )
    .unwrap();
    let app = TestApp::start(vec![(
        "KABAR_API_KEYS_FILE".into(),
        path.display().to_string(),
    )])
    .await;
    let mut client = BatchServiceClient::new(app.channel.clone());
    let get = |key: &str| {
        with_key(
            GetBatchRequest {
                batch_id: "x".into(),
            },
            Some(key),
        )
    };
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(client.get_batch(get(&job)).await.unwrap_err());
    }
    let passed = codes.iter().filter(|e| e.code() == Code::NotFound).count();
    assert_eq!(passed, 5, "a second's burst of 5: {codes:?}");
    let refused = codes.last().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(error_info(refused).unwrap().0, "CALLER_QUOTA");
    let wait = crate::support::retry_delay(refused).expect("RetryInfo");
    assert!(wait <= Duration::from_secs(1), "{wait:?}");
    // Another caller is not held up.
    for _ in 0..20 {
        assert_eq!(
            client.get_batch(get(&portal)).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    // After the wait, the job may call again.
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    assert_eq!(
        client.get_batch(get(&job)).await.unwrap_err().code(),
        Code::NotFound
    );
    app.stop().await.unwrap();
}
