//! Delivery status end to end: a message sent through kabar, Meta's signed webhook deliveries
//! built from its samples, and the status read back with GetMessageStatus and
//! WatchMessageStatus, on both stores.

use std::time::Duration;

use hmac::{Hmac, Mac};
use kabar::pb::{
    GetMessageStatusRequest, MessageEvent, WatchMessageStatusRequest, message_event,
    message_status::State,
};
use serde_json::{Value, json};
use sha2::Sha256;
use tonic::Code;

use crate::{
    send_template::invoice_request,
    support::{
        FakeMeta, RedisServer, TestApp, error_info, eventually, meta_vars, store_vars, vars,
    },
};

pub const APP_SECRET: &str = "webhook-test-app-secret";
pub const VERIFY_TOKEN: &str = "verify-me-please";

async fn start(redis: Option<&RedisServer>) -> (FakeMeta, TestApp) {
    let meta = FakeMeta::start().await;
    let mut v = meta_vars(&meta);
    v.extend(store_vars(redis));
    v.extend(vars(&[
        ("META_APP_SECRET", APP_SECRET),
        ("META_WA_WEBHOOK_VERIFY_TOKEN", VERIFY_TOKEN),
    ]));
    (meta, TestApp::start(v).await)
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn sample(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/webhook/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A status delivery shaped like Meta's samples, for `message_id`.
pub fn status_body(message_id: &str, status: &str, timestamp: u64) -> Value {
    let mut body = sample("webhook_status_sent_v24.json");
    let s = &mut body["entry"][0]["changes"][0]["value"]["statuses"][0];
    s["id"] = json!(message_id);
    s["status"] = json!(status);
    s["timestamp"] = json!(timestamp.to_string());
    if status == "delivered" {
        s["pricing"] = json!({"billable": true, "pricing_model": "PMP", "type": "regular", "category": "utility"});
    }
    body
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn post(app: &TestApp, body: &[u8], signature: Option<&str>) -> u16 {
    let url = format!(
        "http://{}/webhook/whatsapp/meta",
        app.webhook_addr.expect("the webhook is served")
    );
    let mut request = reqwest::Client::new().post(url).body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("x-hub-signature-256", signature);
    }
    request.send().await.unwrap().status().as_u16()
}

pub async fn post_signed(app: &TestApp, body: &Value) -> u16 {
    let bytes = serde_json::to_vec(body).unwrap();
    post(app, &bytes, Some(&sign(&bytes))).await
}

/// The status a feed opened after `after` is refused with (at once, or as its first item).
async fn watch_refused(app: &TestApp, after: &str) -> tonic::Status {
    match app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest {
            after: after.to_owned(),
        })
        .await
    {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.expect_err("refused"),
    }
}

/// Asserts that `/metrics` has each of `lines`, exactly.
async fn assert_metrics(app: &TestApp, lines: &[&str]) {
    let metrics = crate::support::metrics_text(app.http_addr).await;
    for line in lines {
        assert!(metrics.lines().any(|l| l == *line), "{line} in\n{metrics}");
    }
}

async fn status_of(app: &TestApp, message_id: &str) -> kabar::pb::MessageStatus {
    app.notifications()
        .get_message_status(GetMessageStatusRequest {
            message_id: message_id.into(),
        })
        .await
        .expect("a record")
        .into_inner()
}

on_both_stores!(
    statuses_move_forward_through_signed_deliveries,
    a_failed_status_keeps_metas_error,
    the_feed_replays_and_resumes_from_a_cursor,
);

async fn statuses_move_forward_through_signed_deliveries(redis: Option<&RedisServer>) {
    let (_meta, app) = start(redis).await;
    let sent = app
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap()
        .into_inner();
    let record = status_of(&app, &sent.message_id).await;
    assert_eq!(record.state(), State::Accepted);
    assert_eq!(record.template, "invoice_notification");
    assert_eq!(record.reference, "INV/2026/11/0042");
    assert_eq!(record.phone, "+6281234567890");

    // Meta's order is not guaranteed: read arrives before delivered, sent twice. Meta's clock
    // is a little ahead of the send.
    let t = now_seconds() + 2;
    for (status, at) in [
        ("sent", t),
        ("read", t + 20),
        ("sent", t),
        ("delivered", t + 10),
    ] {
        assert_eq!(
            post_signed(&app, &status_body(&sent.message_id, status, at)).await,
            200
        );
    }
    let record = status_of(&app, &sent.message_id).await;
    assert_eq!(record.state(), State::Read, "the state only moves forward");
    let history: Vec<(State, i64)> = record
        .history
        .iter()
        .map(|c| (c.state(), c.at.as_ref().unwrap().seconds))
        .collect();
    assert_eq!(history.len(), 4, "{history:?}");
    assert_eq!(history[0].0, State::Accepted);
    assert_eq!(
        &history[1..],
        [
            (State::Sent, t as i64),
            (State::Delivered, t as i64 + 10),
            (State::Read, t as i64 + 20)
        ]
    );
    assert!(record.billable);
    assert_eq!(record.pricing_category, "utility");
    assert_eq!(record.updated_at.unwrap().seconds, t as i64 + 20);

    // An id kabar never sent is acknowledged and not stored.
    assert_eq!(
        post_signed(&app, &status_body("wamid.SOMEONE-ELSE", "delivered", 1)).await,
        200
    );
    let status = app
        .notifications()
        .get_message_status(GetMessageStatusRequest {
            message_id: "wamid.SOMEONE-ELSE".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(error_info(&status).unwrap().0, "MESSAGE_NOT_FOUND");
    let status = app
        .notifications()
        .get_message_status(GetMessageStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

async fn a_failed_status_keeps_metas_error(redis: Option<&RedisServer>) {
    let (_meta, app) = start(redis).await;
    let sent = app
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap()
        .into_inner();
    let mut body = sample("webhook_status_failed_131049.json");
    body["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = json!(sent.message_id);
    assert_eq!(post_signed(&app, &body).await, 200);
    // A later `read` does not revive a failed message.
    assert_eq!(
        post_signed(&app, &status_body(&sent.message_id, "read", 1_751_142_999)).await,
        200
    );
    let record = status_of(&app, &sent.message_id).await;
    assert_eq!(record.state(), State::Failed);
    let error = record.error.expect("Meta's error");
    assert_eq!(error.code, 131049);
    assert_eq!(error.reason, "META_USER_MARKETING_LIMIT");
    assert!(error.details.contains("healthy ecosystem"), "{error:?}");
}

async fn next_event(stream: &mut tonic::Streaming<MessageEvent>) -> MessageEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an event within 5 s")
        .expect("the feed is open")
        .expect("an event")
}

async fn the_feed_replays_and_resumes_from_a_cursor(redis: Option<&RedisServer>) {
    let (_meta, app) = start(redis).await;
    // A reader that starts now sees what happens from now on.
    let mut live = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let sent = app
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap()
        .into_inner();
    let accepted = next_event(&mut live).await;
    let Some(message_event::Event::Status(status)) = &accepted.event else {
        panic!("{accepted:?}")
    };
    assert_eq!(status.message_id, sent.message_id);
    assert_eq!(status.state(), State::Accepted);

    assert_eq!(
        post_signed(
            &app,
            &status_body(&sent.message_id, "delivered", 1_764_400_010)
        )
        .await,
        200
    );
    let delivered = next_event(&mut live).await;
    let Some(message_event::Event::Status(status)) = &delivered.event else {
        panic!("{delivered:?}")
    };
    assert_eq!(status.state(), State::Delivered);

    // A customer's reply is an event too, once however often Meta delivers it.
    for _ in 0..2 {
        assert_eq!(
            post_signed(&app, &sample("webhook_inbound_text.json")).await,
            200
        );
    }
    let inbound = next_event(&mut live).await;
    let Some(message_event::Event::Inbound(message)) = &inbound.event else {
        panic!("{inbound:?}")
    };
    assert_eq!(message.phone, "+16505551234");
    assert_eq!(message.r#type, "text");

    // From the oldest: the same three, in order.
    let mut replay = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest { after: "0".into() })
        .await
        .unwrap()
        .into_inner();
    let first = next_event(&mut replay).await;
    assert_eq!(first.cursor, accepted.cursor);
    // Resuming after the first sees the second next.
    let mut resumed = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest {
            after: first.cursor.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut resumed).await.cursor, delivered.cursor);
    assert_eq!(next_event(&mut resumed).await.cursor, inbound.cursor);
    assert!(
        tokio::time::timeout(Duration::from_millis(600), resumed.message())
            .await
            .is_err(),
        "nothing after the one inbound event"
    );

    // A cursor that is not one of the feed's.
    let status = watch_refused(&app, "yesterday").await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn the_webhook_refuses_what_meta_did_not_sign() {
    let (_meta, app) = start(None).await;
    let body = serde_json::to_vec(&status_body("wamid.X", "sent", 1)).unwrap();
    assert_eq!(post(&app, &body, None).await, 401, "unsigned");
    assert_eq!(
        post(&app, &body, Some(&sign(b"another body"))).await,
        401,
        "signed for another body"
    );
    assert_eq!(post(&app, &body, Some("sha256=zz")).await, 401, "malformed");
    // Meta's own sample and signature: the bytes as Meta sent them.
    let raw = std::fs::read(format!(
        "{}/tests/fixtures/webhook/signature_body.raw",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert_eq!(
        post(&app, &raw, Some(&sign(&raw))).await,
        200,
        "a signed sample is stored"
    );
    assert_eq!(post(&app, b"not json", Some(&sign(b"not json"))).await, 400);
    let deep = "[".repeat(100_000);
    assert_eq!(
        post(&app, deep.as_bytes(), Some(&sign(deep.as_bytes()))).await,
        400
    );
    let huge = vec![b' '; 3 * 1024 * 1024 + 1];
    assert_eq!(post(&app, &huge, Some(&sign(&huge))).await, 413);

    // The verification handshake.
    let base = format!("http://{}/webhook/whatsapp/meta", app.webhook_addr.unwrap());
    let answer = reqwest::get(format!(
        "{base}?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444"
    ))
    .await
    .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "1158201444");
    let answer = reqwest::get(format!(
        "{base}?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1"
    ))
    .await
    .unwrap();
    assert_eq!(answer.status(), 403);
}

#[tokio::test]
async fn without_the_app_secret_there_is_no_webhook() {
    let meta = FakeMeta::start().await;
    let app = TestApp::start(meta_vars(&meta)).await;
    assert!(app.webhook_addr.is_none());
}

/// Redis down mid-ingest: 503 (Meta sends it again), and the same delivery is taken once Redis
/// answers.
#[tokio::test]
async fn a_store_outage_answers_503_and_the_retry_is_stored() {
    let mut redis = RedisServer::start();
    let (_meta, app) = start(Some(&redis)).await;
    // A customer's message (the test's Redis keeps no data across its restart, so the event is
    // one the retry itself must store).
    let body = sample("webhook_inbound_text.json");
    redis.stop();
    assert_eq!(post_signed(&app, &body).await, 503);
    redis.restart();
    // Meta delivers it again; once Redis answers, it is stored.
    assert!(
        eventually(Duration::from_secs(5), || async {
            post_signed(&app, &body).await == 200
        })
        .await,
        "the retried delivery is accepted"
    );
    let mut feed = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest { after: "0".into() })
        .await
        .unwrap()
        .into_inner();
    let event = next_event(&mut feed).await;
    let Some(message_event::Event::Inbound(message)) = &event.event else {
        panic!("{event:?}")
    };
    assert_eq!(message.phone, "+16505551234");
}

/// OTP codes through their life in the metrics: sent, delivered (from the webhook), verified.
#[tokio::test]
async fn otp_conversion_is_counted() {
    let (meta, app) = start(None).await;
    let sent = app
        .otp()
        .send_otp(kabar::pb::SendOtpRequest {
            phone: "0812-3456-7890".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let record = status_of(&app, &sent.message_id).await;
    assert_eq!(record.template, "otp_code");
    assert_eq!(record.state(), State::Accepted);
    assert_eq!(
        post_signed(
            &app,
            &status_body(&sent.message_id, "delivered", now_seconds())
        )
        .await,
        200
    );
    let code = meta.received()[0].body["template"]["components"][0]["parameters"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let verified = app
        .otp()
        .verify_otp(kabar::pb::VerifyOtpRequest {
            phone: "0812-3456-7890".into(),
            purpose: String::new(),
            code,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verified.result(),
        kabar::pb::verify_otp_response::Result::Verified
    );
    // Delivered again, then read: still one delivered code.
    for (status, at) in [("delivered", now_seconds()), ("read", now_seconds() + 1)] {
        assert_eq!(
            post_signed(&app, &status_body(&sent.message_id, status, at)).await,
            200
        );
    }
    assert_metrics(
        &app,
        &[
            "kabar_otp_codes_total{stage=\"sent\"} 1",
            "kabar_otp_codes_total{stage=\"delivered\"} 1",
            "kabar_otp_codes_total{stage=\"verified\"} 1",
            "kabar_webhook_deliveries_total{outcome=\"stored\"} 3",
        ],
    )
    .await;
}

/// Replayed, forged and foreign updates leave the record and the feed as they were.
#[tokio::test]
async fn duplicates_and_forgeries_change_nothing() {
    let redis = RedisServer::start();
    let (_meta, app) = start(Some(&redis)).await;
    let sent = app
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap()
        .into_inner();
    let mut feed = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest { after: "0".into() })
        .await
        .unwrap()
        .into_inner();
    let accepted = next_event(&mut feed).await;
    let delivered = status_body(&sent.message_id, "delivered", now_seconds());
    let bytes = serde_json::to_vec(&delivered).unwrap();
    // Unsigned and wrongly signed posts for a real message: refused, nothing stored.
    assert_eq!(post(&app, &bytes, None).await, 401);
    assert_eq!(post(&app, &bytes, Some(&sign(b"{}"))).await, 401);
    assert_eq!(
        status_of(&app, &sent.message_id).await.state(),
        State::Accepted
    );
    // Applied once, then replayed as Meta does after an unanswered delivery.
    for _ in 0..3 {
        assert_eq!(post(&app, &bytes, Some(&sign(&bytes))).await, 200);
    }
    // A status for a message of another system.
    assert_eq!(
        post_signed(&app, &status_body("wamid.FOREIGN", "read", now_seconds())).await,
        200
    );
    let change = next_event(&mut feed).await;
    assert_ne!(change.cursor, accepted.cursor);
    assert!(
        tokio::time::timeout(Duration::from_millis(600), feed.message())
            .await
            .is_err(),
        "one event for the one change"
    );
    let record = status_of(&app, &sent.message_id).await;
    assert_eq!(record.state(), State::Delivered);
    assert_eq!(record.history.len(), 2);
    assert_metrics(
        &app,
        &[
            "kabar_webhook_deliveries_total{outcome=\"unauthorized\"} 2",
            "kabar_webhook_deliveries_total{outcome=\"stored\"} 4",
            "kabar_message_statuses_total{state=\"delivered\"} 3",
        ],
    )
    .await;
}

/// Template and quality changes reach the feed as account events, and failures are counted by
/// Meta's code.
#[tokio::test]
async fn account_events_and_failures_reach_the_feed_and_the_metrics() {
    let (_meta, app) = start(None).await;
    let mut feed = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        post_signed(&app, &sample("webhook_template_status_paused.json")).await,
        200
    );
    let event = next_event(&mut feed).await;
    let Some(message_event::Event::Account(account)) = &event.event else {
        panic!("{event:?}")
    };
    assert_eq!(account.kind, "template_status");
    assert_eq!(account.value, "PAUSED");
    assert!(
        !account.subject.is_empty() && !account.reason.is_empty(),
        "{account:?}"
    );
    assert_eq!(
        post_signed(&app, &sample("webhook_phone_quality_update.json")).await,
        200
    );
    let event = next_event(&mut feed).await;
    let Some(message_event::Event::Account(account)) = &event.event else {
        panic!("{event:?}")
    };
    assert_eq!(account.kind, "phone_quality");

    assert_eq!(
        post_signed(&app, &sample("webhook_status_failed_131049.json")).await,
        200
    );
    assert_eq!(post(&app, b"[]", Some(&sign(b"[]"))).await, 400);
    assert_metrics(
        &app,
        &[
            "kabar_message_failures_total{meta_code=\"131049\"} 1",
            "kabar_message_statuses_total{state=\"failed\"} 1",
            "kabar_webhook_deliveries_total{outcome=\"bad_request\"} 1",
            "kabar_grpc_calls_total{method=\"WatchMessageStatus\",code=\"OK\"} 1",
        ],
    )
    .await;
}

/// Open feeds end when kabar shuts down, so that their clients reconnect elsewhere.
#[tokio::test]
async fn feeds_end_when_kabar_shuts_down() {
    let (_meta, app) = start(None).await;
    let mut feed = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    app.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), feed.message())
        .await
        .expect("the feed ends within 5 s");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

/// A reader whose cursor is older than what the feed still holds is told so (OUT_OF_RANGE)
/// instead of silently missing events. The trimming that retention does is done here at once.
#[tokio::test]
async fn a_cursor_older_than_the_retention_is_out_of_range() {
    let redis = RedisServer::start();
    let (_meta, app) = start(Some(&redis)).await;
    let mut cursors = Vec::new();
    for _ in 0..3 {
        app.notifications()
            .send_template(invoice_request())
            .await
            .unwrap();
    }
    let mut replay = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest { after: "0".into() })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        cursors.push(next_event(&mut replay).await.cursor);
    }
    let mut con = redis.connection().await;
    let _: i64 = redis::cmd("XTRIM")
        .arg("kabar:events")
        .arg("MAXLEN")
        .arg(1)
        .query_async(&mut con)
        .await
        .unwrap();
    let status = watch_refused(&app, &cursors[0]).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(error_info(&status).unwrap().0, "CURSOR_EXPIRED");
    // From the oldest still held: the one event kept.
    let mut replay = app
        .notifications()
        .watch_message_status(WatchMessageStatusRequest { after: "0".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut replay).await.cursor, cursors[2]);
}

/// Many deliveries at once, as Meta sends them after an outage: each is stored, none is closed
/// to make room for another; an update with an impossible time is skipped; a cursor the feed
/// never gave out is refused.
#[tokio::test]
async fn concurrent_deliveries_are_all_stored() {
    let (_meta, app) = start(None).await;
    let sent = app
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap()
        .into_inner();
    let mut posts = Vec::new();
    for i in 0..48u64 {
        let mut body = status_body(&sent.message_id, "sent", now_seconds());
        let statuses = body["entry"][0]["changes"][0]["value"]["statuses"]
            .as_array_mut()
            .unwrap();
        let template = statuses[0].clone();
        for j in 0..300u64 {
            let mut s = template.clone();
            s["id"] = json!(format!("wamid.OTHER-{i}-{j}"));
            statuses.push(s);
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        let signature = sign(&bytes);
        let url = format!("http://{}/webhook/whatsapp/meta", app.webhook_addr.unwrap());
        posts.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .header("x-hub-signature-256", signature)
                .body(bytes)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    for post in posts {
        assert_eq!(post.await.unwrap(), 200);
    }
    assert_eq!(status_of(&app, &sent.message_id).await.state(), State::Sent);

    // A `read` dated 1970 or far in the future is not Meta's: skipped, nothing changes.
    for at in [0, 99_999_999_999] {
        assert_eq!(
            post_signed(&app, &status_body(&sent.message_id, "read", at)).await,
            200
        );
    }
    let record = status_of(&app, &sent.message_id).await;
    assert_eq!(record.state(), State::Sent);
    assert_eq!(record.history.len(), 2);

    let status = watch_refused(&app, "99999999999999-0").await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}
