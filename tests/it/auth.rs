//! Callers and keys: every RPC with no key, an unknown key, the wrong scope and the right one;
//! health and reflection open; the bind rule; reloading the key file on SIGHUP; idempotency keys
//! and batch ids scoped by caller; `kabar keys new`.

use std::time::Duration;

use kabar::{
    config::Config,
    domain::auth::{key_hash, new_key},
    pb::{
        Batch, GetBatchRequest, GetMessageStatusRequest, ListBatchItemsRequest, SendOtpRequest,
        SubmitBatchRequest, VerifyOtpRequest, WatchMessageStatusRequest, batch::State,
        batch_service_client::BatchServiceClient,
        notification_service_client::NotificationServiceClient,
        otp_service_client::OtpServiceClient,
    },
};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    batch::{get, submit},
    process::{Kabar, work_dir},
    send_template::invoice_request,
    support::{FakeMeta, RedisServer, TestApp, error_info, eventually, meta_vars, store_vars},
};

/// A key file with `(name, key, scopes)` entries; its path.
pub fn key_file(entries: &[(&str, &str, &[&str])]) -> std::path::PathBuf {
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

on_both_stores!(batch_ids_are_each_callers_own);

/// Caller `key`'s batch `id` once it is DONE.
async fn done(client: &mut BatchServiceClient<Channel>, key: &str, id: &str) -> Batch {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let b = client
            .get_batch(with_key(get(id), Some(key)))
            .await
            .unwrap()
            .into_inner();
        if b.state == State::Done as i32 {
            return b;
        }
        assert!(std::time::Instant::now() < until, "not DONE: {b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn batch_ids_are_each_callers_own(redis: Option<&RedisServer>) {
    use crate::delivery::{APP_SECRET, VERIFY_TOKEN, post_signed, status_body};
    let meta = FakeMeta::start().await;
    let a = new_key();
    let b = new_key();
    let file = key_file(&[
        ("billing-a", &a, &["notify", "status"]),
        ("billing-b", &b, &["notify", "status"]),
    ]);
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(redis));
    vars.extend(crate::support::vars(&[
        ("KABAR_API_KEYS_FILE", &file.display().to_string()),
        ("META_APP_SECRET", APP_SECRET),
        ("META_WA_WEBHOOK_VERIFY_TOKEN", VERIFY_TOKEN),
    ]));
    let app = TestApp::start(vars).await;
    let mut client = app.batches();
    let id = "invoices-2026-12";

    // One id and the same references from both callers: two batches, every item sent.
    let first_a = client
        .submit_batch(with_key(submit(id, 0..3, true), Some(&a)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first_a.batch_id.as_str(), first_a.total), (id, 3));
    let first_b = client
        .submit_batch(with_key(submit(id, 0..2, true), Some(&b)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first_b.batch_id.as_str(), first_b.total),
        (id, 2),
        "b's items are not a's"
    );
    let batch_a = done(&mut client, &a, id).await;
    let batch_b = done(&mut client, &b, id).await;
    assert_eq!(
        (batch_a.batch_id.as_str(), batch_a.total, batch_a.accepted),
        (id, 3, 3)
    );
    assert_eq!(
        (batch_b.batch_id.as_str(), batch_b.total, batch_b.accepted),
        (id, 2, 2)
    );
    assert_eq!(meta.count(), 5, "Meta received each caller's items");

    // Each caller lists its own items only.
    let items = |key: String| {
        let mut client = client.clone();
        async move {
            client
                .list_batch_items(with_key(
                    ListBatchItemsRequest {
                        batch_id: id.into(),
                        ..Default::default()
                    },
                    Some(&key),
                ))
                .await
                .unwrap()
                .into_inner()
                .items
        }
    };
    let items_a = items(a.clone()).await;
    let items_b = items(b.clone()).await;
    assert_eq!(items_a.len(), 3);
    assert_eq!(items_b.len(), 2);
    assert!(
        items_a
            .iter()
            .all(|i| items_b.iter().all(|j| i.message_id != j.message_id)),
        "two sends, two messages"
    );
    // The message's record names the batch by the caller's own id.
    let status = app
        .notifications()
        .get_message_status(with_key(
            GetMessageStatusRequest {
                message_id: items_a[0].message_id.clone(),
            },
            Some(&a),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.batch_id.as_str(), status.reference.as_str()),
        (id, "INV-0")
    );

    // A webhook status of a's message moves a's item, not b's of the same reference.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let delivered = status_body(&items_a[0].message_id, "delivered", now);
    assert_eq!(post_signed(&app, &delivered).await, 200);
    let mut check = client.clone();
    let (key_a, key_b) = (a.clone(), b.clone());
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut client = check.clone();
            let key_a = key_a.clone();
            async move {
                let got = client.get_batch(with_key(get(id), Some(&key_a))).await;
                got.unwrap().into_inner().delivered == 1
            }
        })
        .await,
        "a's item delivered"
    );
    let b_now = check
        .get_batch(with_key(get(id), Some(&key_b)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b_now.delivered, b_now.accepted), (0, 2), "{b_now:?}");

    // A batch only a has: b cannot see, follow, list, cancel or resume it. The answer is the one
    // for a batch that does not exist, and names neither a nor a's batch as stored.
    client
        .submit_batch(with_key(submit("only-a", 10..12, false), Some(&a)))
        .await
        .unwrap();
    let refusals = |key: String, batch: &'static str| {
        let mut client = client.clone();
        async move {
            let req = || with_key(get(batch), Some(&key));
            vec![
                client.get_batch(req()).await.unwrap_err(),
                client.watch_batch(req()).await.unwrap_err(),
                client
                    .list_batch_items(with_key(
                        ListBatchItemsRequest {
                            batch_id: batch.into(),
                            ..Default::default()
                        },
                        Some(&key),
                    ))
                    .await
                    .unwrap_err(),
                client.cancel_batch(req()).await.unwrap_err(),
                client.resume_batch(req()).await.unwrap_err(),
            ]
        }
    };
    let of_a = refusals(b.clone(), "only-a").await;
    let missing = refusals(b.clone(), "no-such-batch").await;
    for (e, none) in of_a.iter().zip(&missing) {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert_eq!(error_info(e).unwrap().0, "BATCH_NOT_FOUND");
        assert_eq!(error_info(e), error_info(none));
        assert_eq!(
            e.message().replace("only-a", "no-such-batch"),
            none.message(),
            "no hint that the batch exists"
        );
        assert!(!e.message().contains("billing-a"), "{}", e.message());
    }
    // ... and a's batch is untouched: still open, nothing cancelled.
    let only_a = client
        .get_batch(with_key(get("only-a"), Some(&a)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only_a.batch_id, "only-a");
    assert_ne!(only_a.state, State::Cancelled as i32, "{only_a:?}");
    assert_eq!(only_a.total, 2);
    // A forged id naming a's batch as stored is no batch id at all.
    let forged = client
        .get_batch(with_key(get("billing-a/only-a"), Some(&b)))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);

    // Refusals about a caller's own batch name it by its own id.
    let closed = client
        .submit_batch(with_key(submit(id, 3..4, false), Some(&a)))
        .await
        .unwrap_err();
    assert_eq!(closed.code(), Code::FailedPrecondition);
    assert!(
        closed.message().contains(&format!("batch {id} is DONE"))
            && !closed.message().contains('/'),
        "{}",
        closed.message()
    );

    if let Some(redis) = redis {
        // Stored under the caller's name, every key of a batch in one Cluster slot.
        let mut con = redis.connection().await;
        for key in [
            "kabar:batch:{billing-a/invoices-2026-12}",
            "kabar:batch:{billing-b/invoices-2026-12}",
            "kabar:batch:{billing-a/invoices-2026-12}:items",
            "kabar:batch:{billing-a/invoices-2026-12}:order",
        ] {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut con)
                .await
                .unwrap();
            assert_eq!(exists, 1, "{key}");
        }
        let bare: i64 = redis::cmd("EXISTS")
            .arg("kabar:batch:{invoices-2026-12}")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(bare, 0);
    }
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
    // Batch ids are each caller's own: the caller that follows the batch is the one that fills it.
    let file = key_file(&[("billing", &old, &["notify", "status"])]);
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
    let submit = |from: usize, key: &str| {
        with_key(
            SubmitBatchRequest {
                batch_id: "watched".into(),
                messages: (from..from + 2).map(crate::batch::invoice).collect(),
                last: false,
            },
            Some(key),
        )
    };
    batches.submit_batch(submit(0, &old)).await.unwrap();
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
    let text =
        std::fs::read_to_string(key_file(&[("billing", &new, &["notify", "status"])])).unwrap();
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
            .wait_for_line("KABAR_API_KEYS_FILE read again", Duration::from_secs(5))
            .await
    );
    assert_eq!(status(new.clone()).await, Code::NotFound);
    assert_eq!(status(old.clone()).await, Code::Unauthenticated);
    // The open stream ends at its next message (items the caller adds with its new key) instead
    // of delivering it.
    batches.submit_batch(submit(2, &new)).await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends");
    assert_eq!(cut.unwrap_err().code(), Code::Unauthenticated);
    // A broken file keeps the keys in force, and says why without a hash.
    std::fs::write(&file, "[[key]]\nname = \"billing\"\n").unwrap();
    assert!(hangup(kabar.pid()).success());
    assert!(
        kabar
            .wait_for_line("could not be read again", Duration::from_secs(5))
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

#[tokio::test]
async fn keys_are_read_again_when_the_file_changes() {
    let (first, second, third) = (new_key(), new_key(), new_key());
    let file = key_file(&[("billing", &first, &["status"])]);
    let app = TestApp::start(vec![(
        "KABAR_API_KEYS_FILE".into(),
        file.display().to_string(),
    )])
    .await;
    let status = |key: String| {
        let channel = app.channel.clone();
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
    let works = |key: &String| {
        let key = key.clone();
        let status = &status;
        async move { status(key).await == Code::NotFound }
    };
    assert!(works(&first).await);
    let entries =
        |key: &str| std::fs::read_to_string(key_file(&[("billing", key, &["status"])])).unwrap();
    let within = kabar::reload::POLL_INTERVAL * 3;

    // Edited in place: no signal needed.
    std::fs::write(&file, entries(&second)).unwrap();
    assert!(eventually(within, || works(&second)).await, "the new key");
    assert_eq!(status(first.clone()).await, Code::Unauthenticated);

    // A file that does not read keeps the keys in force.
    std::fs::write(&file, "[[key]]\nname = \"billing\"\n").unwrap();
    tokio::time::sleep(within).await;
    assert!(works(&second).await, "a broken file took the keys away");

    // Replaced by a rename, as Kubernetes updates a mounted Secret.
    let staged = file.with_extension("staged");
    std::fs::write(&staged, entries(&third)).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    assert!(
        eventually(within, || works(&third)).await,
        "the renamed-in key"
    );
    assert_eq!(status(second.clone()).await, Code::Unauthenticated);

    // A named pipe in its place blocks nothing: the keys stay, and later changes are read.
    std::fs::remove_file(&file).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&file)
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(within).await;
    assert!(works(&third).await, "a named pipe took the keys away");
    std::fs::remove_file(&file).unwrap();
    let fourth = new_key();
    std::fs::write(&file, entries(&fourth)).unwrap();
    assert!(
        eventually(within, || works(&fourth)).await,
        "read again after the pipe"
    );
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("shutdown is not held up")
        .unwrap();
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
    // The operator sees who was refused, by caller.
    let metrics = crate::support::metrics_text(app.http_addr).await;
    for line in [
        "kabar_grpc_caller_calls_total{caller=\"job\",code=\"NOT_FOUND\"} 6",
        "kabar_grpc_caller_calls_total{caller=\"job\",code=\"RESOURCE_EXHAUSTED\"} 3",
        "kabar_grpc_caller_calls_total{caller=\"portal\",code=\"NOT_FOUND\"} 20",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    app.stop().await.unwrap();
}
