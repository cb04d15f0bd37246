//! `GET /status` and `kabar status`: the number as Meta describes it (read in the background,
//! never per request), the last accepted send, the last Meta error with its remedy, the store
//! and the batches.

use std::{net::SocketAddr, time::Duration};

use crate::{
    send_template::invoice_request,
    support::{FakeMeta, Reply, TestApp, eventually, meta_vars},
};

async fn status(http_addr: SocketAddr) -> serde_json::Value {
    reqwest::get(format!("http://{http_addr}/status"))
        .await
        .expect("/status answers")
        .json()
        .await
        .expect("/status JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_number_the_last_send_and_the_last_meta_error() {
    let meta = FakeMeta::start().await;
    meta.set_messaging_limit("TIER_10K");
    let app = TestApp::start(meta_vars(&meta)).await;
    let http = app.http_addr;
    assert!(
        eventually(Duration::from_secs(5), || async {
            !status(http).await["number"]["checked_at"].is_null()
        })
        .await,
        "the number was never read"
    );
    let s = status(http).await;
    assert_eq!(s["driver"], "meta");
    assert_eq!(s["number"]["quality_rating"], "GREEN");
    assert_eq!(s["number"]["status"], "CONNECTED");
    assert_eq!(s["number"]["messaging_limit"], "TIER_10K");
    assert_eq!(s["number"]["throughput"], "STANDARD");
    assert_eq!(s["number"]["display_phone_number"], "+62 811-0000-0000");
    assert!(
        s["last_success_at"].is_null() && s["last_error"].is_null(),
        "{s:#}"
    );
    assert_eq!(s["store"]["kind"], "memory");
    assert_eq!(s["batches"]["active"], 0);

    // A probe asking often makes kabar ask Meta nothing.
    let reads = meta.received().len() + meta.number_reads();
    for _ in 0..20 {
        status(http).await;
    }
    assert_eq!(meta.received().len() + meta.number_reads(), reads);

    app.notifications()
        .send_template(invoice_request())
        .await
        .expect("sent");
    let s = status(http).await;
    assert!(
        s["last_success_seconds_ago"]
            .as_u64()
            .is_some_and(|a| a < 5),
        "{s:#}"
    );

    meta.push(Reply::error(
        404,
        132001,
        "template name does not exist in the translation",
    ));
    let refused = app.notifications().send_template(invoice_request()).await;
    assert!(refused.is_err());
    let s = status(http).await;
    let e = &s["last_error"];
    assert_eq!(e["code"], 132001, "{s:#}");
    assert!(e["details"].as_str().unwrap().contains("does not exist"));
    assert!(!e["remedy"].as_str().unwrap().is_empty());
    assert!(!s["last_success_at"].is_null(), "the last success stays");
    // And the sends by template and outcome.
    let metrics = crate::support::metrics_text(http).await;
    for line in [
        "kabar_messages_total{template=\"invoice_notification\",outcome=\"accepted\"} 1",
        "kabar_messages_total{template=\"invoice_notification\",outcome=\"failed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // `kabar status` prints the same.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kabar"))
            .args(["status", "--addr", &http.to_string()])
            .env_clear()
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("quality GREEN") && text.contains("TIER_10K"),
        "{text}"
    );
    assert!(text.contains("Meta 132001"), "{text}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn kabar_status_says_how_to_reach_kabar_when_nothing_answers() {
    let port = crate::process::free_port();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kabar"))
            .args(["status", "--addr", &format!("127.0.0.1:{port}")])
            .env_clear()
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KABAR_HTTP_ADDR"));
}
