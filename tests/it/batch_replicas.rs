//! A batch run over two kabar processes sharing one Redis, one of them killed with SIGKILL
//! mid-run: every item is sent at most once, the accounting is exact, progress never goes back,
//! and a cancel on one replica stops the other.

use std::{collections::HashSet, time::Duration};

use kabar::pb::{
    Batch, ListBatchItemsRequest, batch::State, batch_service_client::BatchServiceClient,
};
use tonic::transport::Channel;

use crate::{
    batch::{e164_of, get, submit},
    process::Kabar,
    support::{FakeMeta, PHONE_NUMBER_ID, RedisServer, TOKEN},
};

fn replica(meta: &FakeMeta, redis: &RedisServer) -> Kabar {
    let meta_url = meta.url();
    let redis_url = redis.url();
    Kabar::serve(&[
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", TOKEN),
        ("META_WA_PHONE_NUMBER_ID", PHONE_NUMBER_ID),
        ("META_GRAPH_API_URL", &meta_url),
        ("KABAR_META_RETRY_BASE_MS", "20"),
        ("REDIS_URL", &redis_url),
        ("KABAR_OTP_SECRET", "test-otp-secret-0123456789abcdef-0123"),
        // A run of a few seconds, shared by both replicas.
        ("KABAR_META_MAX_MPS", "500"),
        ("KABAR_BATCH_CONCURRENCY", "64"),
        ("KABAR_BATCH_CLAIM_TIMEOUT_SECONDS", "4"),
        ("KABAR_SHUTDOWN_DELAY_SECONDS", "0"),
    ])
}

/// Items of the batch in `state` (all pages).
async fn items_in(
    client: &mut BatchServiceClient<Channel>,
    batch_id: &str,
    state: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_batch_items(ListBatchItemsRequest {
                batch_id: batch_id.into(),
                filter: state.into(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.items.into_iter().map(|i| i.phone));
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

fn settled(b: &Batch) -> u64 {
    b.accepted + b.failed + b.unknown
}

#[tokio::test]
async fn a_replica_killed_mid_run_loses_nothing_and_sends_nothing_twice() {
    const ITEMS: usize = 3000;
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    // Answers take a while: a kill finds messages in flight.
    meta.set_delay(Duration::from_millis(40));
    let mut a = replica(&meta, &redis);
    let mut b = replica(&meta, &redis);
    let mut to_a = BatchServiceClient::new(a.wait_serving().await);
    let mut to_b = BatchServiceClient::new(b.wait_serving().await);
    for chunk in 0..3 {
        to_a.submit_batch(submit(
            "crash-run",
            chunk * 1000..(chunk + 1) * 1000,
            chunk == 2,
        ))
        .await
        .unwrap();
    }
    // Follow progress on B; kill A a third of the way through.
    let mut last: Option<Batch> = None;
    let mut killed = false;
    let until = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let now = to_b.get_batch(get("crash-run")).await.unwrap().into_inner();
        assert_eq!(
            now.queued + settled(&now),
            now.total,
            "the counts do not add up: {now:?}"
        );
        if let Some(before) = &last {
            assert!(
                settled(&now) >= settled(before),
                "progress went back: {before:?} -> {now:?}"
            );
            assert!(
                now.accepted + now.unknown >= before.accepted,
                "{before:?} -> {now:?}"
            );
        }
        if !killed && settled(&now) >= ITEMS as u64 / 3 {
            a.kill().await;
            killed = true;
        }
        let done = now.state == State::Done as i32;
        last = Some(now);
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the run did not finish: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(killed, "the run ended before the kill");
    let end = last.unwrap();
    assert_eq!(end.total, ITEMS as u64);
    assert_eq!(end.failed, 0, "{end:?}");
    assert_eq!(end.accepted + end.unknown, ITEMS as u64, "{end:?}");

    // Exactly once: no recipient got two messages; every accepted item reached Meta; an
    // unknown item reached Meta at most once (the killed replica may have sent it).
    let received: Vec<String> = meta
        .received()
        .iter()
        .filter_map(|r| r.body["to"].as_str().map(str::to_owned))
        .collect();
    let distinct: HashSet<&String> = received.iter().collect();
    assert_eq!(distinct.len(), received.len(), "a message went out twice");
    let accepted = items_in(&mut to_b, "crash-run", "accepted").await;
    let unknown = items_in(&mut to_b, "crash-run", "unknown").await;
    assert_eq!(accepted.len() as u64, end.accepted);
    assert_eq!(unknown.len() as u64, end.unknown);
    for phone in &accepted {
        assert!(distinct.contains(phone), "accepted but never sent: {phone}");
    }
    let known: HashSet<&String> = accepted.iter().chain(unknown.iter()).collect();
    for phone in &distinct {
        assert!(known.contains(phone), "sent but not accounted for: {phone}");
    }
    assert!(
        (0..ITEMS).all(|i| known.contains(&e164_of(i))),
        "an item is missing from the accounting"
    );
    eprintln!(
        "crash run: {} accepted, {} unknown, {} sent",
        end.accepted,
        end.unknown,
        received.len()
    );

    // Cancel on one replica stops the other at once.
    let mut c = replica(&meta, &redis);
    let mut to_c = BatchServiceClient::new(c.wait_serving().await);
    let start = meta.count();
    for chunk in 0..2 {
        let from = 10_000 + chunk * 1000;
        to_c.submit_batch(submit("cancel-run", from..from + 1000, chunk == 1))
            .await
            .unwrap();
    }
    crate::support::eventually(Duration::from_secs(20), || async {
        meta.count() >= start + 200
    })
    .await;
    let cancelled = to_b
        .cancel_batch(get("cancel-run"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, State::Cancelled as i32);
    // Sends under way finish (answers take 40 ms); nothing starts after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_cancel = meta.count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        meta.count(),
        after_cancel,
        "sending went on after the cancel"
    );
    let end = to_c
        .get_batch(get("cancel-run"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(end.queued + settled(&end), end.total);
    assert!(end.queued > 0, "{end:?}");
    assert_eq!((end.accepted + end.unknown) as usize, after_cancel - start);

    // SIGTERM: a replica gives back what it holds and exits cleanly.
    let status = b.stop(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
    let status = c.stop(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
}
