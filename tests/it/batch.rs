//! Batch runs in-process on both stores: submit checks, a run to DONE with exact accounting,
//! pause and resume, cancel, paging, webhook statuses.

use std::{collections::HashMap, time::Duration};

use kabar::pb::{
    Batch, GetBatchRequest, ListBatchItemsRequest, SendTemplateRequest, SubmitBatchRequest,
    batch::State, batch_item,
};
use tonic::Code;

use crate::support::{
    FakeMeta, RedisServer, Reply, TestApp, error_info, eventually, meta_vars, store_vars,
    violated_fields,
};

/// An invoice for customer `i`: a distinct phone number and reference per customer.
pub fn invoice(i: usize) -> SendTemplateRequest {
    SendTemplateRequest {
        phone: phone_of(i),
        template: "invoice_notification".into(),
        positional_params: vec![
            format!("Pelanggan {i}"),
            "Desember 2026".into(),
            format!("INV-{i}"),
            "Home 20 Mbps".into(),
            "Rp 150.000".into(),
            "10 Desember 2026".into(),
            format!("C{i}"),
        ],
        reference: format!("INV-{i}"),
        ..Default::default()
    }
}

/// The local form of customer `i`'s number, and its E.164 form.
pub fn phone_of(i: usize) -> String {
    format!("0812{:08}", 10_000_000 + i)
}
pub fn e164_of(i: usize) -> String {
    format!("+62812{:08}", 10_000_000 + i)
}

pub fn submit(batch_id: &str, range: std::ops::Range<usize>, last: bool) -> SubmitBatchRequest {
    SubmitBatchRequest {
        batch_id: batch_id.into(),
        messages: range.map(invoice).collect(),
        last,
    }
}

pub fn get(batch_id: &str) -> GetBatchRequest {
    GetBatchRequest {
        batch_id: batch_id.into(),
    }
}

async fn app(meta: &FakeMeta, redis: Option<&RedisServer>) -> TestApp {
    let mut vars = meta_vars(meta);
    vars.extend(store_vars(redis));
    TestApp::start(vars).await
}

/// Waits until the batch is in `state`; the batch then.
pub async fn wait_state(app: &TestApp, batch_id: &str, state: State, within: Duration) -> Batch {
    let mut client = app.batches();
    let until = std::time::Instant::now() + within;
    loop {
        // While Redis stalls, reads fail too: UNAVAILABLE, and the test reads again.
        let b = match client.get_batch(get(batch_id)).await {
            Ok(b) => b.into_inner(),
            Err(e) if e.code() == Code::Unavailable && std::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        if b.state == state as i32 {
            return b;
        }
        assert!(
            std::time::Instant::now() < until,
            "the batch is not {state:?} after {within:?}: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many times Meta received a message for each recipient.
fn sends_per_phone(meta: &FakeMeta) -> HashMap<String, usize> {
    let mut sends = HashMap::new();
    for r in meta.received() {
        if let Some(to) = r.body["to"].as_str() {
            *sends.entry(to.to_owned()).or_insert(0) += 1;
        }
    }
    sends
}

fn adds_up(b: &Batch) -> bool {
    b.queued + b.accepted + b.failed + b.unknown == b.total
}

async fn a_run_sends_every_item_once_and_finishes(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let app = app(&meta, redis).await;
    let mut client = app.batches();
    for chunk in 0..3 {
        let b = client
            .submit_batch(submit(
                "invoices-2026-12",
                chunk * 100..(chunk + 1) * 100,
                chunk == 2,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(adds_up(&b), "{b:?}");
    }
    // A retried chunk adds nothing.
    let again = client
        .submit_batch(submit("invoices-2026-12", 0..100, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.total, 300);
    let b = wait_state(
        &app,
        "invoices-2026-12",
        State::Done,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        (b.total, b.accepted, b.queued, b.failed, b.unknown),
        (300, 300, 0, 0, 0)
    );
    assert!(b.closed);
    let sends = sends_per_phone(&meta);
    assert_eq!(sends.len(), 300);
    assert!(sends.values().all(|n| *n == 1), "a message went twice");
    // The message Meta received is the item's: template parameters in order.
    let r = meta
        .received()
        .into_iter()
        .find(|r| r.body["to"] == e164_of(7))
        .unwrap();
    assert_eq!(
        r.body["template"]["components"][0]["parameters"][2]["text"],
        "INV-7"
    );
    // Every item is listed accepted with its message id; the records carry the batch.
    let page = client
        .list_batch_items(ListBatchItemsRequest {
            batch_id: "invoices-2026-12".into(),
            filter: "accepted".into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.items.len(), 300);
    assert!(page.next_page_token.is_empty());
    assert!(
        page.items
            .iter()
            .all(|i| i.message_id.starts_with("wamid."))
    );
    assert_eq!(page.items[0].reference, "INV-0");
    let status = app
        .notifications()
        .get_message_status(kabar::pb::GetMessageStatusRequest {
            message_id: page.items[5].message_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.batch_id, "invoices-2026-12");
    assert_eq!(status.reference, "INV-5");
    if let Some(redis) = redis {
        // Without keys a batch is stored by its id alone, as it always was.
        let exists: i64 = redis::cmd("EXISTS")
            .arg("kabar:batch:{invoices-2026-12}")
            .query_async(&mut redis.connection().await)
            .await
            .unwrap();
        assert_eq!(exists, 1);
    }
    // A done batch takes no new items; resubmitting its own is still fine.
    let refused = client
        .submit_batch(submit("invoices-2026-12", 300..301, false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let (reason, metadata) = error_info(&refused).unwrap();
    assert_eq!(reason, "BATCH_CLOSED");
    assert_eq!(metadata["state"], "DONE");
    for refused in [
        client
            .cancel_batch(get("invoices-2026-12"))
            .await
            .unwrap_err(),
        client
            .resume_batch(get("invoices-2026-12"))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert_eq!(error_info(&refused).unwrap().1["state"], "DONE");
    }
    client
        .submit_batch(submit("invoices-2026-12", 5..10, false))
        .await
        .unwrap();
    app.stop().await.unwrap();
}

async fn one_bad_item_refuses_the_call_and_queues_nothing(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let app = app(&meta, redis).await;
    let mut client = app.batches();
    let mut request = submit("run-1", 0..10, false);
    request.messages[3].phone = "12".into();
    request.messages[5].positional_params.pop();
    request.messages[7].reference = "INV-2".into();
    request.messages[8].template = "no_such_template".into();
    let e = client.submit_batch(request).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let fields = violated_fields(&e);
    for field in [
        "messages[3].phone",
        "messages[5].positional_params",
        "messages[7].reference",
        "messages[8].template",
    ] {
        assert!(fields.iter().any(|f| f == field), "{field} in {fields:?}");
    }
    // Nothing was queued: the batch does not even exist.
    let missing = client.get_batch(get("run-1")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // The other refusals.
    let cases: Vec<(SubmitBatchRequest, &str)> = vec![
        (submit("", 0..1, false), "batch_id"),
        (submit("bad id", 0..1, false), "batch_id"),
        (submit("run-1", 0..1001, false), "messages"),
        (submit("run-1", 0..0, false), "messages"),
        (
            {
                let mut r = submit("run-1", 0..2, false);
                r.messages[1].reference.clear();
                r
            },
            "messages[1].reference",
        ),
        (
            {
                let mut r = submit("run-1", 0..2, false);
                r.messages[0].idempotency_key = "k".into();
                r
            },
            "messages[0].idempotency_key",
        ),
        (
            {
                let mut r = submit("run-1", 0..2, false);
                r.messages[1].template = "otp_code".into();
                r
            },
            "messages[1].template",
        ),
    ];
    for (request, field) in cases {
        let e = client.submit_batch(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(
            violated_fields(&e).iter().any(|f| f == field),
            "{field} in {:?}",
            violated_fields(&e)
        );
    }
    // A call over 2 MiB is refused before it is read.
    let mut huge = submit("run-1", 0..1, false);
    huge.messages[0].positional_params[0] = "x".repeat(2_200_000);
    let e = client.submit_batch(huge).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert_eq!(
        client.get_batch(get("run-1")).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(meta.count(), 0);
    // A closed batch that is still running takes no new items either; its own are fine.
    let mut slow = submit("run-2", 0..3, true);
    slow.messages.truncate(3);
    client.submit_batch(slow.clone()).await.unwrap();
    client.submit_batch(slow).await.unwrap();
    let late = client
        .submit_batch(submit("run-2", 3..4, false))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let state = error_info(&late).unwrap().1["state"].clone();
    assert!(state == "closed" || state == "DONE", "{state}");
    app.stop().await.unwrap();
}

async fn a_refusal_for_every_item_pauses_until_resumed(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    // The template is not approved: every item would fail the same way.
    meta.push(Reply::error(
        404,
        132001,
        "template name (invoice_notification) does not exist in id",
    ));
    let app = app(&meta, redis).await;
    let mut client = app.batches();
    client
        .submit_batch(submit("paused-run", 0..50, true))
        .await
        .unwrap();
    let b = wait_state(&app, "paused-run", State::Paused, Duration::from_secs(10)).await;
    assert!(b.pause_reason.contains("132001"), "{}", b.pause_reason);
    let metrics = crate::support::metrics_text(app.http_addr).await;
    assert!(
        metrics.lines().any(|l| l == "kabar_batch_paused_total 1"),
        "{metrics}"
    );
    assert_eq!(b.failed, 0, "the refused item goes back to the queue");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let sent_while_paused = meta.count();
    assert!(sent_while_paused <= 50, "{sent_while_paused}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        meta.count(),
        sent_while_paused,
        "a paused batch sends nothing"
    );
    // The operator fixed the template: the run goes on and every item goes out once.
    client.resume_batch(get("paused-run")).await.unwrap();
    let b = wait_state(&app, "paused-run", State::Done, Duration::from_secs(30)).await;
    assert_eq!((b.accepted, b.failed, b.unknown), (50, 0, 0), "{b:?}");
    let sends = sends_per_phone(&meta);
    assert_eq!(sends.len(), 50);
    // Recipient refusals fail the item only (131049: Meta holds messages to that user for a
    // day; the run goes on).
    meta.push(Reply::error(400, 131026, "Message Undeliverable."));
    meta.push(Reply::error(
        400,
        131049,
        "This message was not delivered to maintain healthy ecosystem engagement.",
    ));
    client
        .submit_batch(submit("second-run", 100..110, true))
        .await
        .unwrap();
    let b = wait_state(&app, "second-run", State::Done, Duration::from_secs(30)).await;
    assert_eq!((b.accepted, b.failed), (8, 2), "{b:?}");
    let failed = client
        .list_batch_items(ListBatchItemsRequest {
            batch_id: "second-run".into(),
            filter: "failed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.items.len(), 2);
    let error = failed
        .items
        .iter()
        .filter_map(|i| i.error.as_ref())
        .find(|e| e.code == 131026)
        .unwrap();
    assert_eq!(error.reason, "META_RECIPIENT_UNDELIVERABLE");
    assert!(
        failed
            .items
            .iter()
            .all(|i| i.state == batch_item::State::Failed as i32)
    );
    app.stop().await.unwrap();
}

async fn cancel_stops_sending(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(redis));
    // 20 messages a second: the run would take 10 seconds.
    vars.push(("KABAR_META_MAX_MPS".into(), "20".into()));
    let app = TestApp::start(vars).await;
    let mut client = app.batches();
    client
        .submit_batch(submit("cancelled-run", 0..200, true))
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || async { meta.count() >= 10 }).await);
    let b = client
        .cancel_batch(get("cancelled-run"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, State::Cancelled as i32);
    // Sends already under way finish; nothing starts after that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = meta.count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(meta.count(), sent, "sending went on after the cancel");
    assert!(sent < 200);
    let b = client
        .get_batch(get("cancelled-run"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, State::Cancelled as i32);
    assert!(adds_up(&b), "{b:?}");
    assert_eq!(b.accepted as usize, sent);
    // Cancelled is final.
    let e = client.resume_batch(get("cancelled-run")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = client
        .submit_batch(submit("cancelled-run", 500..501, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    app.stop().await.unwrap();
}

async fn items_page_through_by_state(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    // The first five messages are refused for their recipients.
    for _ in 0..5 {
        meta.push(Reply::error(400, 131026, "Message Undeliverable."));
    }
    let app = app(&meta, redis).await;
    let mut client = app.batches();
    client
        .submit_batch(submit("paged", 0..250, true))
        .await
        .unwrap();
    wait_state(&app, "paged", State::Done, Duration::from_secs(30)).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_batch_items(ListBatchItemsRequest {
                batch_id: "paged".into(),
                filter: String::new(),
                page_size: 100,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.items.len() <= 100);
        seen.extend(page.items.into_iter().map(|i| i.reference));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..250).map(|i| format!("INV-{i}")).collect();
    assert_eq!(seen, expected);
    // By state: the failed ones over pages of two, the accepted ones in one page.
    let mut failed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_batch_items(ListBatchItemsRequest {
                batch_id: "paged".into(),
                filter: "failed".into(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.items.len() <= 2);
        assert!(
            page.items
                .iter()
                .all(|i| i.state == batch_item::State::Failed as i32)
        );
        failed.extend(page.items.into_iter().map(|i| i.reference));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(failed.len(), 5, "{failed:?}");
    assert!(pages >= 3, "{pages} pages");
    let accepted = client
        .list_batch_items(ListBatchItemsRequest {
            batch_id: "paged".into(),
            filter: "accepted".into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(accepted.items.len(), 245);
    assert!(accepted.next_page_token.is_empty());
    for (filter, code) in [("nonsense", Code::InvalidArgument)] {
        let e = client
            .list_batch_items(ListBatchItemsRequest {
                batch_id: "paged".into(),
                filter: filter.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code);
        assert_eq!(violated_fields(&e), ["filter"]);
    }
    let e = client
        .list_batch_items(ListBatchItemsRequest {
            batch_id: "paged".into(),
            page_token: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&e), ["page_token"]);
    let e = client.get_batch(get("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(error_info(&e).unwrap().0, "BATCH_NOT_FOUND");
    app.stop().await.unwrap();
}

on_both_stores!(
    a_run_sends_every_item_once_and_finishes,
    one_bad_item_refuses_the_call_and_queues_nothing,
    a_refusal_for_every_item_pauses_until_resumed,
    cancel_stops_sending,
    items_page_through_by_state,
    webhook_statuses_move_items_and_progress_is_streamed,
    a_run_held_by_the_daily_limit_says_so,
    a_hanging_meta_costs_few_items,
    the_sending_mark_is_exclusive,
);

async fn webhook_statuses_move_items_and_progress_is_streamed(redis: Option<&RedisServer>) {
    use crate::delivery::{APP_SECRET, VERIFY_TOKEN, post_signed, sample, status_body};
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(redis));
    vars.extend(crate::support::vars(&[
        ("META_APP_SECRET", APP_SECRET),
        ("META_WA_WEBHOOK_VERIFY_TOKEN", VERIFY_TOKEN),
        ("KABAR_META_MAX_MPS", "20"),
    ]));
    let app = TestApp::start(vars).await;
    let mut client = app.batches();
    client
        .submit_batch(submit("watched", 0..30, false))
        .await
        .unwrap();
    let mut stream = client
        .watch_batch(get("watched"))
        .await
        .unwrap()
        .into_inner();
    // Closing the batch lets it finish.
    client
        .submit_batch(SubmitBatchRequest {
            batch_id: "watched".into(),
            messages: Vec::new(),
            last: true,
        })
        .await
        .unwrap();
    let mut seen: Vec<Batch> = Vec::new();
    while let Some(b) = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("progress within 20 s")
        .unwrap()
    {
        if let Some(before) = seen.last() {
            assert!(b.queued <= before.queued, "{before:?} -> {b:?}");
            assert!(b.accepted >= before.accepted, "{before:?} -> {b:?}");
        }
        assert!(adds_up(&b), "{b:?}");
        seen.push(b);
    }
    let last = seen.last().unwrap();
    assert_eq!(
        last.state,
        State::Done as i32,
        "the stream ends with the batch"
    );
    assert_eq!(last.accepted, 30);
    assert!(seen.len() >= 3, "progress came in steps: {}", seen.len());
    assert!(
        seen.iter()
            .any(|b| b.state == State::Running as i32 && b.eta_seconds > 0),
        "a running batch has an ETA"
    );

    let ids: Vec<String> = client
        .list_batch_items(ListBatchItemsRequest {
            batch_id: "watched".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .map(|i| i.message_id)
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (id, status) in [
        (&ids[0], "delivered"),
        (&ids[1], "delivered"),
        (&ids[2], "read"),
        (&ids[0], "read"),
        (&ids[0], "read"),
    ] {
        assert_eq!(post_signed(&app, &status_body(id, status, now)).await, 200);
    }
    let mut failed = sample("webhook_status_failed_131049.json");
    failed["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = ids[4].clone().into();
    assert_eq!(post_signed(&app, &failed).await, 200);
    let b = client.get_batch(get("watched")).await.unwrap().into_inner();
    assert_eq!(
        (b.accepted, b.delivered, b.read, b.failed),
        (29, 3, 2, 1),
        "{b:?}"
    );
    let read = client
        .list_batch_items(ListBatchItemsRequest {
            batch_id: "watched".into(),
            filter: "read".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.items.len(), 2);
    let failed = client
        .list_batch_items(ListBatchItemsRequest {
            batch_id: "watched".into(),
            filter: "failed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.items[0].error.as_ref().unwrap().code, 131049);
    app.stop().await.unwrap();
}

/// Redis stops answering mid-run: the worker waits and resumes, nothing lost or sent twice.
#[tokio::test]
async fn a_redis_stall_mid_run_loses_nothing() {
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(Some(&redis)));
    vars.extend(crate::support::vars(&[
        ("KABAR_META_MAX_MPS", "100"),
        ("KABAR_BATCH_CLAIM_TIMEOUT_SECONDS", "4"),
    ]));
    let app = TestApp::start(vars).await;
    let mut client = app.batches();
    client
        .submit_batch(submit("stalled", 0..300, true))
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || async { meta.count() >= 50 }).await);
    // Every write waits for three seconds: kabar's calls time out meanwhile.
    let mut con = redis.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "3000", "WRITE"])
        .query_async(&mut con)
        .await
        .unwrap();
    let b = wait_state(&app, "stalled", State::Done, Duration::from_secs(60)).await;
    assert_eq!(b.total, 300);
    assert_eq!(b.accepted + b.unknown, 300, "{b:?}");
    let sends = sends_per_phone(&meta);
    assert!(sends.values().all(|n| *n == 1), "a message went twice");
    assert!(sends.len() as u64 >= b.accepted, "{b:?}");
    app.stop().await.unwrap();
}

async fn a_run_held_by_the_daily_limit_says_so(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(redis));
    vars.push(("KABAR_META_DAILY_LIMIT".into(), "5".into()));
    let app = TestApp::start(vars).await;
    let mut client = app.batches();
    let b = client
        .submit_batch(submit("held", 0..8, true))
        .await
        .unwrap()
        .into_inner();
    assert!(b.held_reason.contains("DAILY_LIMIT_REACHED soon"), "{b:?}");
    assert!(eventually(Duration::from_secs(10), || async { meta.count() >= 5 }).await);
    let held = eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let b = client.get_batch(get("held")).await.unwrap().into_inner();
            b.held_reason.contains("used up") && b.eta_seconds == 0
        }
    })
    .await;
    assert!(held, "the batch does not say it is held");
    let b = client.get_batch(get("held")).await.unwrap().into_inner();
    assert_eq!(b.state, State::Running as i32);
    assert_eq!((b.accepted, b.queued), (5, 3), "{b:?}");
    assert_eq!(meta.count(), 5, "past the daily limit nothing goes out");
    app.stop().await.unwrap();
}

/// Meta hangs for a while: the items whose answers went missing are unknown (Meta may have
/// them), but the worker then lets one item at a time go until Meta answers again, instead of
/// writing off its whole concurrency per timeout.
async fn a_hanging_meta_costs_few_items(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(redis));
    vars.extend(crate::support::vars(&[
        ("KABAR_META_MAX_MPS", "50"),
        ("KABAR_META_TIMEOUT_MS", "400"),
        ("KABAR_META_MAX_ATTEMPTS", "1"),
    ]));
    let app = TestApp::start(vars).await;
    meta.set_delay(Duration::from_secs(2));
    let mut client = app.batches();
    client
        .submit_batch(submit("hang", 0..300, true))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    meta.set_delay(Duration::ZERO);
    let b = wait_state(&app, "hang", State::Done, Duration::from_secs(60)).await;
    assert!(adds_up(&b), "{b:?}");
    assert_eq!(b.failed, 0, "{b:?}");
    // Without the one-at-a-time rule, 4 s at 50/s would have written off about 200.
    assert!(b.unknown <= 60, "{b:?}");
    assert!(b.unknown >= 1, "the hang was not noticed: {b:?}");
    let sends = sends_per_phone(&meta);
    assert!(sends.values().all(|n| *n == 1), "a message went twice");
    assert_eq!(sends.len() as u64, b.accepted + b.unknown, "{b:?}");
    app.stop().await.unwrap();
}

/// The store side of exactly-once: an item is marked only by its holder, only while its send
/// may still start, only once; a stale item marked as being sent is taken over as unknown.
async fn the_sending_mark_is_exclusive(redis: Option<&RedisServer>) {
    use kabar::domain::{
        batch::{Mark, NewItem, Outcome, rules::ItemState},
        ports::BatchStore,
    };
    let store: kabar::store::Store = match redis {
        Some(r) => kabar::store::Store::Redis(
            kabar::store::RedisStore::new(&r.url(), Duration::from_secs(2)).unwrap(),
        ),
        None => kabar::store::Store::Memory(kabar::store::MemoryStore::default()),
    };
    let keep = Duration::from_secs(3600);
    let items: Vec<NewItem> = (0..2)
        .map(|i| NewItem {
            reference: format!("R{i}"),
            phone: e164_of(i),
            template: "access_opened".into(),
            name: "access_opened".into(),
            language: "id".into(),
            own_language: false,
            category: kabar::templates::Category::Utility,
            params: vec!["Budi".into(), "0800".into()],
        })
        .collect();
    store.submit("marks", &items, true, 1, keep).await.unwrap();
    let stale = Duration::from_millis(300);
    let mut claimed = store.claim("marks", "a", 10, stale, keep).await.unwrap();
    assert_eq!(claimed.items.len(), 2);
    let second = claimed.items.pop().unwrap();
    let first = claimed.items.pop().unwrap();
    // Another consumer cannot take or mark what "a" holds.
    assert!(
        store
            .claim("marks", "b", 10, stale, keep)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let within = Duration::from_millis(150);
    assert_eq!(
        store
            .mark_sending("marks", &first, "b", within)
            .await
            .unwrap(),
        Mark::Lost
    );
    assert_eq!(
        store
            .mark_sending("marks", &first, "a", within)
            .await
            .unwrap(),
        Mark::Go
    );
    assert_eq!(
        store
            .mark_sending("marks", &first, "a", within)
            .await
            .unwrap(),
        Mark::Lost
    );
    // Held too long: the second is not marked any more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store
            .mark_sending("marks", &second, "a", within)
            .await
            .unwrap(),
        Mark::Lost
    );
    // Past the claim timeout "b" takes both over: the marked one as unknown, the other to send.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let taken = store.claim("marks", "b", 10, stale, keep).await.unwrap();
    assert_eq!(taken.items.len(), 1);
    assert_eq!(taken.items[0].item.data.reference, "R1");
    let b = store.get("marks").await.unwrap().unwrap();
    assert_eq!((b.counts.unknown, b.counts.queued), (1, 1));
    // "a" learns its answer late: accepted still counts; "a" can no longer settle the other.
    let accepted = Outcome {
        state: ItemState::Accepted,
        message_id: "wamid.late".into(),
        error: None,
    };
    assert!(
        store
            .settle("marks", &first, "a", &accepted, keep)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .settle("marks", &second, "a", &accepted, keep)
            .await
            .unwrap()
            .is_none()
    );
    let mark = store
        .mark_sending("marks", &taken.items[0], "b", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(mark, Mark::Go);
    store
        .settle("marks", &taken.items[0], "b", &accepted, keep)
        .await
        .unwrap();
    let b = store.get("marks").await.unwrap().unwrap();
    assert_eq!(
        (b.counts.accepted, b.counts.unknown, b.counts.queued),
        (2, 0, 0)
    );
    assert_eq!(b.state, kabar::domain::batch::rules::BatchState::Done);
}
