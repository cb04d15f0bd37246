//! The README's idempotency rules for `SendTemplate.idempotency_key`: a concurrent duplicate is
//! ABORTED, the key is freed when nothing can have been sent and kept when something may have,
//! the lock expires, only its holder frees it, invalid requests never take it, and a key needs
//! the store.

use std::time::{Duration, Instant};

use kabar::pb::SendTemplateRequest;
use tonic::Code;

use crate::{
    send_template::invoice_request,
    support::{
        FakeMeta, RedisServer, Reply, TestApp, error_info, eventually, is_deadline_passed,
        meta_vars, retry_delay, store_vars,
    },
};

async fn start(redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> (FakeMeta, TestApp) {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(redis));
    vars.extend(crate::support::vars(extra));
    let app = TestApp::start(vars).await;
    (meta, app)
}

fn keyed(key: &str) -> SendTemplateRequest {
    SendTemplateRequest {
        idempotency_key: key.into(),
        ..invoice_request()
    }
}

/// Meta's success answer, after `delay`.
fn slow_success(delay: Duration) -> Reply {
    Reply {
        status: 200,
        body: serde_json::Value::Null,
        delay,
    }
}

fn assert_in_flight(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(error_info(status).unwrap().0, "IDEMPOTENCY_KEY_IN_FLIGHT");
    assert_eq!(retry_delay(status), Some(Duration::from_secs(1)));
}

on_both_stores!(
    a_concurrent_duplicate_is_aborted_while_the_first_is_in_flight,
    the_send_finishes_and_settles_the_key_after_the_caller_has_gone,
    a_deadline_before_sending_frees_the_key,
    a_deadline_after_sending_keeps_the_key,
    an_invalid_request_never_takes_the_key,
);

async fn a_concurrent_duplicate_is_aborted_while_the_first_is_in_flight(
    redis: Option<&RedisServer>,
) {
    let (meta, app) = start(redis, &[]).await;
    meta.push(slow_success(Duration::from_millis(600)));
    let mut client = app.notifications();
    let first = tokio::spawn(async move { client.send_template(keyed("inv-dup")).await });
    assert!(eventually(Duration::from_secs(5), || async { meta.count() == 1 }).await);

    let duplicate = app
        .notifications()
        .send_template(keyed("inv-dup"))
        .await
        .unwrap_err();
    assert_in_flight(&duplicate);
    let first = first
        .await
        .unwrap()
        .expect("the first call sends")
        .into_inner();
    let replay = app
        .notifications()
        .send_template(keyed("inv-dup"))
        .await
        .expect("the finished key answers")
        .into_inner();
    assert_eq!(replay, first);
    assert_eq!(meta.count(), 1, "sent once");
}

async fn a_deadline_before_sending_frees_the_key(redis: Option<&RedisServer>) {
    let (meta, app) = start(redis, &[("KABAR_META_MAX_IN_FLIGHT", "1")]).await;
    // A call without a key holds the only send slot for 800 ms.
    meta.push(slow_success(Duration::from_millis(800)));
    let mut client = app.notifications();
    let holder = tokio::spawn(async move { client.send_template(invoice_request()).await });
    assert!(eventually(Duration::from_secs(5), || async { meta.count() == 1 }).await);

    // The keyed call's deadline passes while it waits for the slot: nothing went out.
    let mut request = tonic::Request::new(keyed("inv-never-sent"));
    request.set_timeout(Duration::from_millis(300));
    let status = app
        .notifications()
        .send_template(request)
        .await
        .unwrap_err();
    assert!(is_deadline_passed(&status), "{status:?}");
    holder.await.unwrap().expect("the holder's send goes out");
    assert_eq!(meta.count(), 1, "the timed-out call never reached Meta");

    // The key was freed: a retry with it sends.
    let retried = app
        .notifications()
        .send_template(keyed("inv-never-sent"))
        .await
        .expect("the retry sends")
        .into_inner();
    assert_eq!(meta.count(), 2);
    assert_eq!(retried.message_id, "wamid.TEST00000002");
}

async fn a_deadline_after_sending_keeps_the_key(redis: Option<&RedisServer>) {
    let (meta, app) = start(redis, &[]).await;
    // Meta is slow: the request is out when the deadline passes.
    meta.push(slow_success(Duration::from_millis(1000)));
    let mut request = tonic::Request::new(keyed("inv-maybe-sent"));
    request.set_timeout(Duration::from_millis(300));
    let status = app
        .notifications()
        .send_template(request)
        .await
        .unwrap_err();
    assert!(is_deadline_passed(&status), "{status:?}");
    assert_eq!(meta.count(), 1);

    // Once Meta has answered the abandoned request, kabar has long settled the key: it stays
    // locked, so a retry cannot send a second copy.
    let answered_at = meta.received()[0].at + Duration::from_millis(1100);
    tokio::time::sleep_until(answered_at.into()).await;
    let retry = app
        .notifications()
        .send_template(keyed("inv-maybe-sent"))
        .await
        .unwrap_err();
    assert_in_flight(&retry);
    assert_eq!(meta.count(), 1, "no second copy");
}

async fn an_invalid_request_never_takes_the_key(redis: Option<&RedisServer>) {
    let (meta, app) = start(redis, &[]).await;
    let invalid = |key: &str| SendTemplateRequest {
        phone: "0812".into(),
        ..keyed(key)
    };
    // While a valid call holds the key, an invalid one with it is refused for what it is.
    meta.push(slow_success(Duration::from_millis(500)));
    let mut client = app.notifications();
    let valid = tokio::spawn(async move { client.send_template(keyed("inv-held")).await });
    assert!(eventually(Duration::from_secs(5), || async { meta.count() == 1 }).await);
    let status = app
        .notifications()
        .send_template(invalid("inv-held"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    valid.await.unwrap().expect("sent");

    // An invalid request leaves a fresh key untaken: the corrected request sends at once.
    let mut client = app.notifications();
    for _ in 0..2 {
        let status = client
            .send_template(invalid("inv-corrected"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    client
        .send_template(keyed("inv-corrected"))
        .await
        .expect("the corrected request sends");
    assert_eq!(meta.count(), 2);
}

/// The idempotency key's entry in Redis.
fn store_key(key: &str) -> String {
    format!("kabar:idem:{{{key}}}")
}

#[tokio::test]
async fn an_expired_lock_lets_the_same_key_send_again() {
    let redis = RedisServer::start();
    // The defaults that the README's "72 s" is computed from.
    let (meta, app) = start(Some(&redis), &[("KABAR_META_RETRY_BASE_MS", "200")]).await;
    meta.push(Reply {
        status: 200,
        body: serde_json::json!({"unexpected": true}),
        delay: Duration::ZERO,
    });
    let mut client = app.notifications();
    let status = client.send_template(keyed("inv-lock")).await.unwrap_err();
    assert_eq!(error_info(&status).unwrap().0, "META_OUTCOME_UNKNOWN");
    assert_in_flight(&client.send_template(keyed("inv-lock")).await.unwrap_err());

    // The lock lasts every attempt at KABAR_META_TIMEOUT_MS, the backoffs and the slot wait,
    // plus 30 s: about 72 s with the defaults.
    let mut con = redis.connection().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(store_key("inv-lock"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(
        (70_000..=72_000).contains(&ttl),
        "the lock expires in {ttl} ms"
    );

    // Let the lock run out now rather than in 72 s; then the same key sends again.
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(store_key("inv-lock"))
        .arg(1)
        .query_async(&mut con)
        .await
        .unwrap();
    let expired = eventually(Duration::from_secs(2), || {
        let mut con = con.clone();
        async move {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(store_key("inv-lock"))
                .query_async(&mut con)
                .await
                .unwrap();
            exists == 0
        }
    })
    .await;
    assert!(expired);
    let resent = client
        .send_template(keyed("inv-lock"))
        .await
        .expect("sent again after the lock expired")
        .into_inner();
    assert_eq!(resent.message_id, "wamid.TEST00000002");
    assert_eq!(meta.count(), 2);
}

#[tokio::test]
async fn a_call_that_outlived_its_lock_cannot_free_the_next_holders() {
    let redis = RedisServer::start();
    let (meta, app) = start(Some(&redis), &[]).await;
    let mut con = redis.connection().await;
    // Call A: Meta refuses after 800 ms (nothing sent, so A frees its key when it ends).
    meta.push(Reply {
        delay: Duration::from_millis(800),
        ..Reply::error(400, 131026, "Message undeliverable")
    });
    // Call B: Meta accepts after 1500 ms.
    meta.push(slow_success(Duration::from_millis(1500)));

    let mut client = app.notifications();
    let a = tokio::spawn(async move { client.send_template(keyed("inv-owner")).await });
    assert!(eventually(Duration::from_secs(5), || async { meta.count() == 1 }).await);
    // A's lock runs out while A is still waiting for Meta (as if kabar had stalled for 72 s).
    let _: i64 = redis::cmd("DEL")
        .arg(store_key("inv-owner"))
        .query_async(&mut con)
        .await
        .unwrap();
    let mut client = app.notifications();
    let b = tokio::spawn(async move { client.send_template(keyed("inv-owner")).await });
    assert!(eventually(Duration::from_secs(5), || async { meta.count() == 2 }).await);

    // A ends with a refusal while B holds the key: A must not free B's lock.
    let a = a.await.unwrap().unwrap_err();
    assert_eq!(a.code(), Code::FailedPrecondition, "{a:?}");
    let start = Instant::now();
    let c = app
        .notifications()
        .send_template(keyed("inv-owner"))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "answered while B is in flight"
    );
    assert_in_flight(&c);
    let b = b.await.unwrap().expect("B sends").into_inner();
    let replay = app
        .notifications()
        .send_template(keyed("inv-owner"))
        .await
        .expect("B's answer")
        .into_inner();
    assert_eq!(replay, b);
    assert_eq!(meta.count(), 2, "C never sent");
}

#[tokio::test]
async fn a_key_needs_redis_and_calls_without_one_do_not() {
    let mut redis = RedisServer::start();
    let (meta, app) = start(Some(&redis), &[]).await;
    redis.stop();
    let start = Instant::now();
    let status = app
        .notifications()
        .send_template(keyed("inv-no-redis"))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(1500), "fails fast");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).unwrap().0, "STORE_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(1)));
    assert_eq!(meta.count(), 0, "nothing is sent without the key's lock");

    app.notifications()
        .send_template(invoice_request())
        .await
        .expect("a call without a key does not touch Redis");
    assert_eq!(meta.count(), 1);
}

async fn the_send_finishes_and_settles_the_key_after_the_caller_has_gone(
    redis: Option<&RedisServer>,
) {
    let (meta, app) = start(redis, &[]).await;
    meta.push(slow_success(Duration::from_millis(500)));
    let mut client = app.notifications();
    let caller = tokio::spawn(async move { client.send_template(keyed("inv-gone")).await });
    assert!(eventually(Duration::from_secs(5), || async { meta.count() == 1 }).await);
    // The caller disconnects while the request is at Meta.
    caller.abort();

    // kabar still finishes the send and stores its answer under the key: a retry gets it
    // (once the send has finished) and nothing is sent twice.
    let mut client = app.notifications();
    let deadline = Instant::now() + Duration::from_secs(5);
    let replay = loop {
        match client.send_template(keyed("inv-gone")).await {
            Ok(answer) => break answer.into_inner(),
            Err(status) => assert_in_flight(&status),
        }
        assert!(
            Instant::now() < deadline,
            "the key is settled after the caller has gone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(replay.message_id, "wamid.TEST00000001");
    assert_eq!(meta.count(), 1);
    client
        .send_template(invoice_request())
        .await
        .expect("kabar still serves");
}

/// A send that could not connect to Meta sent nothing: the key is freed and a retry with it
/// sends once Meta is reachable.
#[tokio::test]
async fn meta_unreachable_frees_the_key() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let redis = RedisServer::start();
    let mut vars = store_vars(Some(&redis));
    vars.extend(crate::support::vars(&[
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", crate::support::TOKEN),
        ("META_WA_PHONE_NUMBER_ID", crate::support::PHONE_NUMBER_ID),
        ("KABAR_META_RETRY_BASE_MS", "1"),
    ]));
    vars.push(("META_GRAPH_API_URL".into(), format!("http://{addr}")));
    let app = TestApp::start(vars).await;
    let status = app
        .notifications()
        .send_template(keyed("inv-unreachable"))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).unwrap().0, "META_UNREACHABLE");
    let meta = FakeMeta::start_on(addr).await;
    app.notifications()
        .send_template(keyed("inv-unreachable"))
        .await
        .expect("the retry with the same key sends");
    assert_eq!(meta.count(), 1);
}

/// A finished answer is remembered for 24 hours.
#[tokio::test]
async fn an_answer_is_remembered_for_24_hours() {
    let redis = RedisServer::start();
    let (_meta, app) = start(Some(&redis), &[]).await;
    app.notifications()
        .send_template(keyed("inv-24h"))
        .await
        .expect("sent");
    let mut con = redis.connection().await;
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg("kabar:idem:{inv-24h}")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(
        (86_390_000..=86_400_000).contains(&ttl_ms),
        "answer kept for {ttl_ms} ms"
    );
}
