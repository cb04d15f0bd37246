//! Pacing end to end: kabar instances on one real Redis against a Meta stand-in that records when
//! each message arrives and refuses like Meta beyond its cap.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use kabar::{
    domain::pacing::{Pacer, PacingConfig, Priority},
    pb::{SendOtpRequest, SendTemplateRequest},
    store::{RedisStore, Store},
};
use serde_json::json;
use tonic::Code;

use crate::{
    delivery::{APP_SECRET, post_signed, sample},
    send_template::invoice_request,
    support::{
        FakeMeta, PHONE_NUMBER_ID, RedisServer, TestApp, busiest_window, error_info, eventually,
        meta_vars, metrics_text, readyz, retry_delay, store_vars, vars,
    },
};

/// A kabar on `redis` (or in-process) sending to `meta`, with `extra` settings.
async fn kabar(meta: &FakeMeta, redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> TestApp {
    let mut v = meta_vars(meta);
    v.extend(store_vars(redis));
    v.extend(vars(extra));
    TestApp::start(v).await
}

/// An invoice to a number of its own for each `i`.
fn invoice_to(i: usize) -> SendTemplateRequest {
    SendTemplateRequest {
        phone: format!("0812{:08}", 10_000_000 + i),
        reference: format!("INV-{i}"),
        ..invoice_request()
    }
}

fn with_deadline<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

fn reason(status: &tonic::Status) -> String {
    error_info(status).map(|(r, _)| r).unwrap_or_default()
}

#[tokio::test]
async fn three_replicas_together_stay_within_metas_cap() {
    const CAP: usize = 10;
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let settings = [
        ("KABAR_META_MAX_MPS", "10"),
        ("KABAR_PAIR_INTERVAL_SECONDS", "6"),
    ];
    let apps = [
        kabar(&meta, Some(&redis), &settings).await,
        kabar(&meta, Some(&redis), &settings).await,
        kabar(&meta, Some(&redis), &settings).await,
    ];
    // Each replica's connection to Meta is open before the run, as on a running system.
    for (i, app) in apps.iter().enumerate() {
        app.notifications()
            .send_template(invoice_to(1000 + i))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let warm = meta.accepted_at().len();
    meta.set_cap(CAP);
    // Three times the cap for four seconds, spread over the replicas, each call with a 2 s
    // deadline: what does not fit is refused, never sent late.
    let accepted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut calls = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / (3 * CAP as u64)));
    for i in 0..(3 * CAP * 4) {
        tick.tick().await;
        let mut client = apps[i % 3].notifications();
        let (accepted, refused) = (accepted.clone(), refused.clone());
        calls.push(tokio::spawn(async move {
            match client
                .send_template(with_deadline(invoice_to(i), Duration::from_secs(2)))
                .await
            {
                Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert_eq!(reason(&status), "RATE_LIMITED");
                    assert!(retry_delay(&status).is_some(), "{status:?}");
                    refused.fetch_add(1, Ordering::Relaxed)
                }
            };
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let elapsed = start.elapsed();
    let arrivals = meta.accepted_at().split_off(warm);
    assert_eq!(
        meta.throttled(),
        0,
        "Meta never had to refuse for throughput"
    );
    assert_eq!(
        arrivals.len(),
        accepted.load(Ordering::Relaxed),
        "refused {}, received {}",
        refused.load(Ordering::Relaxed),
        meta.count()
    );
    let busiest = busiest_window(&arrivals, Duration::from_secs(1));
    assert!(busiest <= CAP, "{busiest} messages within one second");
    // Throughput reaches the cap (kabar fills 98% of it).
    let first = *arrivals.iter().min().unwrap();
    let last = *arrivals.iter().max().unwrap();
    let rate = (arrivals.len() - 1) as f64 / last.duration_since(first).as_secs_f64();
    assert!(
        rate >= CAP as f64 * 0.9,
        "{rate:.1} messages/s over {elapsed:?}"
    );
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the excess was refused"
    );
    let text = metrics_text(apps[0].http_addr).await;
    assert!(
        text.contains("kabar_pacing_refusals_total{reason=\"RATE_LIMITED\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn an_otp_goes_out_within_a_second_during_a_saturating_batch_run() {
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let app = kabar(
        &meta,
        Some(&redis),
        &[
            ("KABAR_META_MAX_MPS", "20"),
            ("KABAR_OTP_RESEND_SECONDS", "0"),
        ],
    )
    .await;
    // A batch run on the same number from another replica: batch-priority admissions that keep
    // the shared schedule full (their messages are not what this test watches).
    let store: Arc<Store> = Arc::new(Store::Redis(
        RedisStore::new(&redis.url(), Duration::from_millis(500)).unwrap(),
    ));
    let run = Arc::new(Pacer::new(
        PacingConfig {
            enabled: true,
            max_mps: 20,
            pair_interval: Duration::ZERO,
            daily_limit: Some(0),
            max_wait: Duration::from_secs(5),
            fallback_replicas: 1,
        },
        PHONE_NUMBER_ID.to_owned(),
        store,
        None,
    ));
    let batch_sent = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for w in 0..40 {
        let (run, sent, stop) = (run.clone(), batch_sent.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let phone = format!("+628139{w:02}{i:05}");
                let deadline = Some(Instant::now() + Duration::from_secs(10));
                if run.admit(&phone, Priority::Batch, deadline).await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for i in 0..6 {
        let started = Instant::now();
        app.otp()
            .send_otp(SendOtpRequest {
                phone: format!("0812-7000-{i:04}"),
                ..Default::default()
            })
            .await
            .expect("the code is sent");
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let batch_window = Instant::now();
    let before = batch_sent.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let batch_rate = batch_sent.load(Ordering::Relaxed) - before;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let slowest = latencies.iter().max().unwrap();
    assert!(*slowest < Duration::from_secs(1), "{latencies:?}");
    // The run kept the schedule full around the codes.
    assert!(
        batch_rate >= 15,
        "{batch_rate} batch sends in {:?}",
        batch_window.elapsed()
    );
}

#[tokio::test]
async fn the_pair_interval_holds_across_replicas() {
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let settings = [("KABAR_PAIR_INTERVAL_SECONDS", "2")];
    let a = kabar(&meta, Some(&redis), &settings).await;
    let b = kabar(&meta, Some(&redis), &settings).await;
    a.notifications()
        .send_template(invoice_request())
        .await
        .expect("first message");
    // The same customer from the other replica, with a deadline too short for the interval.
    let status = b
        .notifications()
        .send_template(with_deadline(
            SendTemplateRequest {
                reference: "INV-2".into(),
                ..invoice_request()
            },
            Duration::from_millis(800),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "PAIR_RATE_LIMITED");
    let wait = retry_delay(&status).expect("RetryInfo");
    assert!(
        wait > Duration::from_millis(500) && wait <= Duration::from_secs(2),
        "{wait:?}"
    );
    assert_eq!(meta.count(), 1, "the refused message was not sent");
    // With time to wait, it waits for the interval and goes.
    b.notifications()
        .send_template(with_deadline(
            SendTemplateRequest {
                reference: "INV-3".into(),
                ..invoice_request()
            },
            Duration::from_secs(5),
        ))
        .await
        .expect("sent after the interval");
    let received = meta.received();
    assert_eq!(received.len(), 2);
    let gap = received[1].at.duration_since(received[0].at);
    assert!(gap >= Duration::from_millis(1900), "{gap:?}");
    // Another customer is not held up.
    let started = Instant::now();
    a.notifications()
        .send_template(invoice_to(1))
        .await
        .expect("another customer");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn the_daily_limit_holds_across_replicas_and_restarts() {
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let settings = [
        ("KABAR_META_DAILY_LIMIT", "3"),
        ("META_APP_SECRET", APP_SECRET),
    ];
    let a = kabar(&meta, Some(&redis), &settings).await;
    let b = kabar(&meta, Some(&redis), &settings).await;
    for (app, i) in [(&a, 1), (&a, 2), (&b, 3)] {
        app.notifications()
            .send_template(invoice_to(i))
            .await
            .expect("within the limit");
    }
    let status = b
        .notifications()
        .send_template(invoice_to(4))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "DAILY_LIMIT_REACHED");
    let wait = retry_delay(&status).expect("RetryInfo");
    assert!(
        wait > Duration::from_secs(23 * 3600) && wait <= Duration::from_secs(24 * 3600),
        "{wait:?}"
    );
    assert_eq!(meta.count(), 3);
    // A customer already counted today still gets their messages.
    b.notifications()
        .send_template(SendTemplateRequest {
            reference: "INV-1b".into(),
            ..invoice_to(1)
        })
        .await
        .expect("already counted");

    // The count lives in Redis: a restarted replica knows it.
    a.stop().await.unwrap();
    let a = kabar(&meta, Some(&redis), &settings).await;
    let status = a
        .notifications()
        .send_template(invoice_to(5))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "DAILY_LIMIT_REACHED");

    // A customer who wrote to the ISP is inside their service window and does not count.
    let mut inbound = sample("webhook_inbound_text.json");
    let message = &mut inbound["entry"][0]["changes"][0]["value"]["messages"][0];
    message["from"] = json!("6281210000006");
    message["timestamp"] = json!(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string()
    );
    assert_eq!(post_signed(&b, &inbound).await, 200);
    a.notifications()
        .send_template(invoice_to(6))
        .await
        .expect("inside the service window");
    assert_eq!(meta.count(), 5);

    let text = metrics_text(a.http_addr).await;
    for line in [
        "kabar_daily_limit 3",
        "kabar_daily_recipients 3",
        "kabar_pacing_refusals_total{reason=\"DAILY_LIMIT_REACHED\"} 1",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}

#[tokio::test]
async fn metas_messaging_limit_is_read_when_none_is_configured() {
    let meta = FakeMeta::start().await;
    meta.set_messaging_limit("TIER_2K");
    let mut v = meta_vars(&meta);
    // Unset (blank) instead of the tests' default, so that kabar asks Meta.
    v.push(("KABAR_META_DAILY_LIMIT".into(), String::new()));
    let app = TestApp::start(v).await;
    // The upkeep reads it at start-up.
    assert!(
        eventually(Duration::from_secs(5), || async {
            readyz(app.http_addr).await.1["pacing"]["daily_limit"] == json!(2000)
        })
        .await,
        "the limit read from Meta is in force"
    );
    let (_, ready) = readyz(app.http_addr).await;
    assert_eq!(ready["pacing"]["daily_limit_source"], "meta");
}

#[tokio::test]
async fn without_a_limit_from_meta_the_default_is_250() {
    let meta = FakeMeta::start().await;
    let mut v = meta_vars(&meta);
    v.push(("KABAR_META_DAILY_LIMIT".into(), String::new()));
    let app = TestApp::start(v).await;
    // Meta was asked, and refused (the stand-in knows no limit until one is set).
    assert!(
        eventually(Duration::from_secs(5), || async {
            meta.number_reads() >= 1
        })
        .await,
        "kabar asked Meta for the messaging limit"
    );
    let (_, ready) = readyz(app.http_addr).await;
    assert_eq!(ready["pacing"]["daily_limit"], json!(250));
    assert_eq!(ready["pacing"]["daily_limit_source"], "default");
}

on_both_stores!(a_send_whose_slot_is_past_its_deadline_is_refused_at_once);

async fn a_send_whose_slot_is_past_its_deadline_is_refused_at_once(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let app = kabar(&meta, redis, &[("KABAR_META_MAX_MPS", "1")]).await;
    let send = |i: usize| {
        let mut client = app.notifications();
        async move {
            let started = Instant::now();
            let answer = client
                .send_template(with_deadline(invoice_to(i), Duration::from_millis(1800)))
                .await;
            (answer, started.elapsed())
        }
    };
    // Staggered a little: two calls arriving in the same instant both see the same free slot,
    // and the one that loses it learns so only when the other takes it.
    let later = |i, by| {
        let call = send(i);
        async move {
            tokio::time::sleep(Duration::from_millis(by)).await;
            call.await
        }
    };
    let (first, second, third) = tokio::join!(send(1), later(2, 100), later(3, 200));
    let mut outcomes = [first, second, third];
    outcomes.sort_by_key(|(answer, _)| answer.is_err());
    assert!(
        outcomes[0].0.is_ok() && outcomes[1].0.is_ok(),
        "{outcomes:?}"
    );
    // The third slot is two seconds out: refused without waiting, and never sent.
    let (refused, took) = &outcomes[2];
    let status = refused.as_ref().unwrap_err();
    assert_eq!(reason(status), "RATE_LIMITED", "{status:?}");
    assert!(*took < Duration::from_millis(500), "{took:?}");
    let wait = retry_delay(status).expect("RetryInfo");
    assert!(wait > Duration::from_millis(1500), "{wait:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let received = meta.received();
    assert_eq!(received.len(), 2);
    let gap = received[1].at.duration_since(received[0].at);
    assert!(gap >= Duration::from_millis(950), "one per second: {gap:?}");
}

on_both_stores!(meta_throttling_slows_down_and_the_send_is_retried);

async fn meta_throttling_slows_down_and_the_send_is_retried(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let app = kabar(&meta, redis, &[]).await;
    meta.push(crate::support::Reply::error(
        429,
        130429,
        "Cloud API message throughput has been reached.",
    ));
    app.notifications()
        .send_template(invoice_request())
        .await
        .expect("retried after the throttling answer");
    let received = meta.received();
    assert_eq!(received.len(), 2);
    // The schedule paused before the retry.
    let gap = received[1].at.duration_since(received[0].at);
    assert!(gap >= Duration::from_millis(150), "{gap:?}");
    let text = metrics_text(app.http_addr).await;
    assert!(
        text.contains("kabar_pacing_meta_throttled_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn without_redis_each_replica_paces_at_its_share() {
    let mut redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let app = kabar(
        &meta,
        Some(&redis),
        &[("KABAR_META_MAX_MPS", "10"), ("KABAR_PACING_REPLICAS", "2")],
    )
    .await;
    app.notifications()
        .send_template(invoice_to(0))
        .await
        .expect("shared schedule");
    assert_eq!(readyz(app.http_addr).await.1["pacing"]["mode"], "shared");
    redis.stop();
    // Messages without an idempotency key still go, at 10 / 2 = 5 per second.
    let sends: Vec<_> = (1..=3)
        .map(|i| {
            let mut client = app.notifications();
            tokio::spawn(async move { client.send_template(invoice_to(i)).await })
        })
        .collect();
    for s in sends {
        s.await.unwrap().expect("sent while Redis is down");
    }
    let received = meta.received();
    let gaps: Vec<Duration> = received[1..]
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(180)),
        "{gaps:?}"
    );
    let (_, ready) = readyz(app.http_addr).await;
    assert_eq!(ready["pacing"]["mode"], "local", "{ready}");
    assert_eq!(ready["pacing"]["effective_mps"], json!(5.0));
    // Back on the shared schedule once Redis answers again.
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut back = false;
    for i in 10..40 {
        let _ = app.notifications().send_template(invoice_to(i)).await;
        if readyz(app.http_addr).await.1["pacing"]["mode"] == "shared" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(back, "pacing went back to the shared schedule");
}

#[tokio::test]
async fn retries_here_and_through_pacing_share_one_budget_of_attempts() {
    let meta = FakeMeta::start().await;
    let app = kabar(&meta, None, &[]).await;
    meta.push(crate::support::Reply::error(
        503,
        131016,
        "Service temporarily unavailable",
    ));
    for _ in 0..3 {
        meta.push(crate::support::Reply::error(
            429,
            130429,
            "Cloud API message throughput has been reached.",
        ));
    }
    let status = app
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "META_THROUGHPUT_EXCEEDED", "{status:?}");
    // KABAR_META_MAX_ATTEMPTS (3) requests in all, and pacing learned from each throttling
    // answer, the last one included.
    assert_eq!(meta.count(), 3);
    let text = metrics_text(app.http_addr).await;
    assert!(
        text.contains("kabar_pacing_meta_throttled_total 2"),
        "{text}"
    );
}

#[tokio::test]
async fn calls_queued_for_one_recipient_are_refused_at_once_when_their_turn_is_too_late() {
    let meta = FakeMeta::start().await;
    let app = kabar(&meta, None, &[("KABAR_PAIR_INTERVAL_SECONDS", "2")]).await;
    app.notifications()
        .send_template(invoice_request())
        .await
        .expect("first message");
    // Two more to the same customer, each with 3 s: the first of them fits after the interval,
    // the second would come another interval later and is refused without waiting.
    let send = |reference: &'static str| {
        let mut client = app.notifications();
        async move {
            let started = Instant::now();
            let answer = client
                .send_template(with_deadline(
                    SendTemplateRequest {
                        reference: reference.into(),
                        ..invoice_request()
                    },
                    Duration::from_secs(3),
                ))
                .await;
            (answer, started.elapsed())
        }
    };
    let second = send("INV-2");
    let third = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send("INV-3").await
    };
    let ((second, _), (third, took)) = tokio::join!(second, third);
    second.expect("sent after the interval");
    let status = third.unwrap_err();
    assert_eq!(reason(&status), "PAIR_RATE_LIMITED", "{status:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert!(retry_delay(&status).unwrap() > Duration::from_secs(3));
    assert_eq!(meta.count(), 2);
}
