//! The Meta client's promises from the README: the wait for a send slot, a connection broken
//! after sending, the RetryInfo of each error row, exponential backoff, and retries that stop at
//! the caller's deadline.

use std::time::{Duration, Instant};

use kabar::pb::SendTemplateRequest;
use tonic::Code;

use crate::{
    send_template::invoice_request,
    support::{
        BrokenMeta, FakeMeta, Reply, TestApp, error_info, eventually, is_deadline_passed,
        meta_vars, retry_delay,
    },
};

#[tokio::test]
async fn a_call_without_a_deadline_waits_for_a_send_slot_then_gives_up_unsent() {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(crate::support::vars(&[
        ("KABAR_META_MAX_IN_FLIGHT", "1"),
        ("KABAR_META_TIMEOUT_MS", "400"),
        // A send keeps its slot while it backs off: 2.5 to 5 s after a retryable failure.
        ("KABAR_META_RETRY_BASE_MS", "5000"),
    ]));
    let app = TestApp::start(vars).await;
    meta.push(Reply::error(503, 131016, "Service temporarily unavailable"));
    let mut holder = app.notifications();
    let holder = tokio::spawn(async move { holder.send_template(invoice_request()).await });
    assert!(eventually(Duration::from_secs(5), || async { meta.count() == 1 }).await);

    // No deadline: it waits KABAR_META_TIMEOUT_MS for the slot, then gives up unsent.
    let start = Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(2),
        app.notifications().send_template(invoice_request()),
    )
    .await
    .expect("the wait for a slot is bounded")
    .unwrap_err();
    let waited = start.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).unwrap().0, "META_UNREACHABLE");
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(5)));
    assert!(
        waited >= Duration::from_millis(400),
        "it waited for a slot: {waited:?}"
    );
    assert_eq!(
        meta.count(),
        1,
        "the call that got no slot never reached Meta"
    );
    holder.abort();
}

on_both_stores!(a_connection_broken_after_sending_is_outcome_unknown_and_not_retried);

async fn a_connection_broken_after_sending_is_outcome_unknown_and_not_retried(
    redis: Option<&crate::support::RedisServer>,
) {
    let broken = BrokenMeta::start().await;
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(crate::support::store_vars(redis));
    vars.push(("META_GRAPH_API_URL".into(), broken.url()));
    let app = TestApp::start(vars).await;
    let mut client = app.notifications();
    let request = SendTemplateRequest {
        idempotency_key: "inv-broken-connection".into(),
        ..invoice_request()
    };
    let status = client.send_template(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(error_info(&status).unwrap().0, "META_OUTCOME_UNKNOWN");
    assert_eq!(
        retry_delay(&status),
        None,
        "no RetryInfo: it may be delivered"
    );
    assert_eq!(
        broken.count(),
        1,
        "a request that may have arrived is not retried"
    );
    // The key stays locked: a retry cannot send a second copy.
    let again = client.send_template(request).await.unwrap_err();
    assert_eq!(again.code(), Code::Aborted, "{again:?}");
    assert_eq!(broken.count(), 1);
}

/// One row of the README's error tables: Meta's answer, then what the caller gets.
struct Row {
    http: u16,
    meta_code: i64,
    grpc: Code,
    reason: &'static str,
    attempts: usize,
    retry_info: Option<u64>,
}

const fn row(
    http: u16,
    meta_code: i64,
    grpc: Code,
    reason: &'static str,
    attempts: usize,
    retry_info: Option<u64>,
) -> Row {
    Row {
        http,
        meta_code,
        grpc,
        reason,
        attempts,
        retry_info,
    }
}

const DAY: u64 = 24 * 3600;

/// The README's table "How Meta's error codes map", with its RetryInfo column as seconds.
const ROWS: &[Row] = &[
    row(
        401,
        190,
        Code::FailedPrecondition,
        "META_TOKEN_INVALID",
        1,
        None,
    ),
    row(
        403,
        10,
        Code::FailedPrecondition,
        "META_PERMISSION_DENIED",
        1,
        None,
    ),
    row(
        429,
        4,
        Code::ResourceExhausted,
        "META_APP_RATE_LIMIT",
        3,
        Some(60),
    ),
    row(
        429,
        80007,
        Code::ResourceExhausted,
        "META_ACCOUNT_RATE_LIMIT",
        3,
        Some(60),
    ),
    row(
        429,
        130429,
        Code::ResourceExhausted,
        "META_THROUGHPUT_EXCEEDED",
        3,
        Some(1),
    ),
    row(
        400,
        131056,
        Code::ResourceExhausted,
        "META_PAIR_RATE_LIMIT",
        1,
        Some(6),
    ),
    row(
        400,
        131049,
        Code::ResourceExhausted,
        "META_USER_MARKETING_LIMIT",
        1,
        Some(DAY),
    ),
    row(
        429,
        131048,
        Code::FailedPrecondition,
        "META_SPAM_RATE_LIMIT",
        1,
        None,
    ),
    row(
        400,
        100,
        Code::InvalidArgument,
        "META_INVALID_PARAMETER",
        1,
        None,
    ),
    row(
        400,
        132018,
        Code::InvalidArgument,
        "META_TEMPLATE_PARAM_INVALID_TEXT",
        1,
        None,
    ),
    row(
        404,
        132001,
        Code::FailedPrecondition,
        "META_TEMPLATE_NOT_APPROVED",
        1,
        None,
    ),
    row(
        400,
        131026,
        Code::FailedPrecondition,
        "META_RECIPIENT_UNDELIVERABLE",
        1,
        None,
    ),
    row(
        403,
        368,
        Code::FailedPrecondition,
        "META_ACCOUNT_BLOCKED",
        1,
        None,
    ),
    row(
        500,
        131000,
        Code::Unavailable,
        "META_UNKNOWN_ERROR",
        3,
        Some(5),
    ),
    row(
        503,
        131016,
        Code::Unavailable,
        "META_SERVICE_UNAVAILABLE",
        3,
        Some(5),
    ),
    row(
        503,
        131057,
        Code::Unavailable,
        "META_ACCOUNT_MAINTENANCE",
        3,
        Some(60),
    ),
    // Codes the table does not name: decided by the HTTP status.
    row(
        502,
        999_999,
        Code::Unavailable,
        "META_SERVER_ERROR",
        3,
        Some(5),
    ),
    row(
        429,
        999_999,
        Code::ResourceExhausted,
        "META_RATE_LIMIT",
        1,
        Some(60),
    ),
    row(400, 999_999, Code::Unknown, "META_ERROR", 1, None),
];

#[tokio::test]
async fn retry_info_carries_the_documented_wait_of_each_row() {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.push(("KABAR_META_RETRY_BASE_MS".into(), "2".into()));
    let app = TestApp::start(vars).await;
    let mut client = app.notifications();
    for r in ROWS {
        for _ in 0..r.attempts {
            meta.push(Reply::error(r.http, r.meta_code, "details"));
        }
        let before = meta.count();
        let status = client.send_template(invoice_request()).await.unwrap_err();
        let what = format!("HTTP {} code {}", r.http, r.meta_code);
        assert_eq!(status.code(), r.grpc, "{what}: {status:?}");
        assert_eq!(error_info(&status).unwrap().0, r.reason, "{what}");
        assert_eq!(meta.count() - before, r.attempts, "{what}: attempts");
        assert_eq!(
            retry_delay(&status),
            r.retry_info.map(Duration::from_secs),
            "{what}: RetryInfo"
        );
    }

    // Meta unreachable (nothing listens): RetryInfo 5 s.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut vars = meta_vars(&meta);
    vars.push(("KABAR_META_RETRY_BASE_MS".into(), "2".into()));
    vars.push(("META_GRAPH_API_URL".into(), format!("http://{addr}")));
    let unreachable = TestApp::start(vars).await;
    let status = unreachable
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).unwrap().0, "META_UNREACHABLE");
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(5)));

    // An unusable 200: META_OUTCOME_UNKNOWN, without RetryInfo.
    meta.push(Reply {
        status: 200,
        body: serde_json::json!({"messages": []}),
        delay: Duration::ZERO,
    });
    let status = client.send_template(invoice_request()).await.unwrap_err();
    assert_eq!(error_info(&status).unwrap().0, "META_OUTCOME_UNKNOWN");
    assert_eq!(retry_delay(&status), None);
}

#[tokio::test]
async fn backoff_doubles_from_one_attempt_to_the_next() {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    // Backoffs of 200..400 ms, then 400..800 ms. A constant backoff would give 200..400 ms twice.
    vars.push(("KABAR_META_RETRY_BASE_MS".into(), "400".into()));
    let app = TestApp::start(vars).await;
    for _ in 0..3 {
        meta.push(Reply::error(503, 131016, "Service temporarily unavailable"));
    }
    let status = app
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let at: Vec<Instant> = meta.received().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 3);
    let (first, second) = (at[1] - at[0], at[2] - at[1]);
    assert!(first >= Duration::from_millis(200), "first pause {first:?}");
    assert!(
        second >= Duration::from_millis(400),
        "second pause {second:?}"
    );
    assert!(
        first < Duration::from_millis(400 + 600) && second < Duration::from_millis(800 + 600),
        "pauses {first:?} then {second:?}"
    );
}

#[tokio::test]
async fn retries_stop_before_the_deadline_with_metas_last_error_at_once() {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    // First backoff 500..1000 ms: it fits in a 1.5 s deadline. The second, 1000..2000 ms after
    // the second attempt (itself at least 500 ms in), cannot: kabar must answer at once.
    vars.push(("KABAR_META_RETRY_BASE_MS".into(), "1000".into()));
    let app = TestApp::start(vars).await;
    for _ in 0..3 {
        meta.push(Reply::error(503, 131016, "Service temporarily unavailable"));
    }
    let mut request = tonic::Request::new(invoice_request());
    request.set_timeout(Duration::from_millis(1500));
    let status = app
        .notifications()
        .send_template(request)
        .await
        .unwrap_err();
    let answered = Instant::now();
    // Meta's own error, not DEADLINE_EXCEEDED: the last error comes back.
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).unwrap().0, "META_SERVICE_UNAVAILABLE");
    let received = meta.received();
    assert_eq!(
        received.len(),
        2,
        "the third attempt would pass the deadline"
    );
    let after_last = answered - received[1].at;
    assert!(
        after_last < Duration::from_millis(300),
        "answered {after_last:?} after the last attempt: it waited instead"
    );
}

#[tokio::test]
async fn kabar_answers_deadline_exceeded_itself_before_the_callers_timer() {
    let meta = FakeMeta::start().await;
    meta.set_delay(Duration::from_secs(2));
    let app = TestApp::start(meta_vars(&meta)).await;
    // kabar answers a quarter of the timeout (at most 250 ms) before the caller's deadline; the
    // tonic client's own timer answers CANCELLED at the deadline. On a loaded machine a single
    // call may lose that race, so several calls are made and at least one must carry kabar's
    // own DEADLINE_EXCEEDED.
    let mut own_answers = 0;
    for _ in 0..5 {
        let mut request = tonic::Request::new(invoice_request());
        request.set_timeout(Duration::from_millis(200));
        let status = app
            .notifications()
            .send_template(request)
            .await
            .unwrap_err();
        assert!(is_deadline_passed(&status), "{status:?}");
        if status.code() == Code::DeadlineExceeded {
            own_answers += 1;
        }
    }
    assert!(own_answers >= 1, "kabar never answered the deadline itself");
}
