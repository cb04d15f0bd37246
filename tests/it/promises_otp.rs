//! The OTP rules of the README that the main OTP tests leave open: the daily cap's day in WIB,
//! what still applies to test numbers, which refusal wins, what the per-IP cap counts, a Redis
//! outage as operators see it, and codes never reaching the log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kabar::pb::{
    SendOtpRequest, SendOtpResponse, VerifyOtpRequest, verify_otp_response::Result as Verify,
};
use tonic::Code;

use crate::{
    process::Kabar,
    support::{
        FakeMeta, PHONE_NUMBER_ID, RedisServer, Reply, TOKEN, TestApp, error_info, eventually,
        meta_vars, metrics_text, readyz, retry_delay, store_vars,
    },
};

struct Otp {
    app: TestApp,
    meta: FakeMeta,
}

impl Otp {
    async fn start(redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> Otp {
        let meta = FakeMeta::start().await;
        let mut vars = meta_vars(&meta);
        vars.extend(store_vars(redis));
        vars.extend(crate::support::vars(extra));
        Otp {
            app: TestApp::start(vars).await,
            meta,
        }
    }

    async fn send(&self, phone: &str, ip: &str) -> Result<SendOtpResponse, tonic::Status> {
        self.app
            .otp()
            .send_otp(SendOtpRequest {
                phone: phone.into(),
                purpose: String::new(),
                client_ip: ip.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn verify(&self, phone: &str, code: &str) -> Result<Verify, tonic::Status> {
        self.app
            .otp()
            .verify_otp(VerifyOtpRequest {
                phone: phone.into(),
                purpose: String::new(),
                code: code.into(),
            })
            .await
            .map(|r| r.into_inner().result())
    }
}

fn assert_refused(status: &tonic::Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(
        error_info(status).expect("ErrorInfo").0,
        reason,
        "{status:?}"
    );
}

const HOUR_WAIT: std::ops::RangeInclusive<u64> = 3590..=3600;

fn wait_of(status: &tonic::Status) -> u64 {
    retry_delay(status).expect("RetryInfo").as_secs()
}

#[test]
fn the_daily_caps_day_turns_at_midnight_wib() {
    const HOUR: u64 = 3600 * 1000;
    // 2026-11-30 17:00:00 UTC is 2026-12-01 00:00:00 WIB.
    let midnight_wib = 1_796_058_000_000_u64;
    assert_eq!(midnight_wib % (24 * HOUR), 17 * HOUR);
    let (before, before_ends) = kabar::otp::wib_day(midnight_wib - 1);
    let (after, after_ends) = kabar::otp::wib_day(midnight_wib);
    assert_eq!(after, before + 1, "a new day at 00:00 WIB");
    assert_eq!(before_ends, midnight_wib);
    assert_eq!(after_ends, midnight_wib + 24 * HOUR);
    // 00:00 UTC (07:00 WIB) is the middle of a WIB day, not a new one.
    let midnight_utc = midnight_wib + 7 * HOUR;
    assert_eq!(kabar::otp::wib_day(midnight_utc - 1).0, after);
    assert_eq!(kabar::otp::wib_day(midnight_utc).0, after);
    assert_eq!(kabar::otp::wib_day(midnight_wib + 24 * HOUR - 1).0, after);
}

/// Seconds from now to the next 00:00 WIB (UTC+7), computed here from the clock.
fn seconds_to_midnight_wib() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    86_400 - (now + 7 * 3600) % 86_400
}

on_both_stores!(
    the_daily_cap_answers_with_the_wait_until_midnight_wib,
    test_numbers_obey_the_country_list_and_the_hourly_caps,
    whatsapp_disabled_spares_only_test_numbers,
    test_numbers_do_not_count_toward_the_daily_cap,
    the_hourly_cap_is_reported_when_it_and_the_cooldown_both_apply,
    refusals_by_the_number_do_not_use_the_ip_allowance,
);

async fn the_daily_cap_answers_with_the_wait_until_midnight_wib(redis: Option<&RedisServer>) {
    let otp = Otp::start(redis, &[("KABAR_OTP_DAILY_LIMIT", "1")]).await;
    otp.send("081200000001", "")
        .await
        .expect("first of the day");
    let before = seconds_to_midnight_wib();
    let status = otp.send("081200000002", "").await.unwrap_err();
    let after = seconds_to_midnight_wib();
    assert_refused(&status, Code::ResourceExhausted, "OTP_DAILY_LIMIT");
    let wait = wait_of(&status);
    assert!(
        (after.saturating_sub(1)..=before + 1).contains(&wait),
        "wait {wait} s, but 00:00 WIB is {before} s away"
    );
    assert_eq!(
        error_info(&status).unwrap().1["retry_after_seconds"],
        wait.to_string()
    );
}

async fn test_numbers_obey_the_country_list_and_the_hourly_caps(redis: Option<&RedisServer>) {
    let otp = Otp::start(
        redis,
        &[
            (
                "KABAR_OTP_TEST_NUMBERS",
                "6281100000001=111111,6281100000002=222222,6281100000003=333333,\
                 +60123456789=444444",
            ),
            ("KABAR_OTP_RESEND_SECONDS", "0"),
            ("KABAR_OTP_MAX_SENDS_PER_HOUR", "2"),
            ("KABAR_OTP_MAX_SENDS_PER_IP_PER_HOUR", "1"),
        ],
    )
    .await;
    // The country allow-list (62 only).
    let status = otp.send("+60 12-345 6789", "").await.unwrap_err();
    assert_refused(&status, Code::FailedPrecondition, "OTP_COUNTRY_NOT_ALLOWED");
    // The hourly cap per number.
    otp.send("0811-0000-0001", "").await.unwrap();
    otp.send("0811-0000-0001", "").await.unwrap();
    let status = otp.send("0811-0000-0001", "").await.unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "OTP_HOURLY_LIMIT");
    assert!(HOUR_WAIT.contains(&wait_of(&status)));
    // The hourly cap per IP.
    otp.send("0811-0000-0002", "203.0.113.5").await.unwrap();
    let status = otp.send("0811-0000-0003", "203.0.113.5").await.unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "OTP_IP_HOURLY_LIMIT");
    assert!(HOUR_WAIT.contains(&wait_of(&status)));
    assert_eq!(otp.meta.count(), 0);
}

async fn whatsapp_disabled_spares_only_test_numbers(redis: Option<&RedisServer>) {
    let otp = Otp::start(
        redis,
        &[
            ("WHATSAPP_ENABLED", "false"),
            ("KABAR_OTP_TEST_NUMBERS", "6281100000001=135790"),
        ],
    )
    .await;
    let sent = otp.send("0811-0000-0001", "").await.expect("test number");
    assert_eq!(sent.message_id, "");
    assert_eq!(
        otp.verify("0811-0000-0001", "135790").await.unwrap(),
        Verify::Verified
    );
    let status = otp.send("0812-3456-7890", "").await.unwrap_err();
    assert_refused(&status, Code::FailedPrecondition, "WHATSAPP_DISABLED");
    assert_eq!(otp.meta.count(), 0);
}

async fn test_numbers_do_not_count_toward_the_daily_cap(redis: Option<&RedisServer>) {
    let otp = Otp::start(
        redis,
        &[
            ("KABAR_OTP_DAILY_LIMIT", "1"),
            ("KABAR_OTP_RESEND_SECONDS", "0"),
            ("KABAR_OTP_TEST_NUMBERS", "6281100000001=135790"),
        ],
    )
    .await;
    for _ in 0..3 {
        otp.send("0811-0000-0001", "").await.expect("test number");
    }
    otp.send("081200000001", "")
        .await
        .expect("the day's one real code is still available");
    let status = otp.send("081200000002", "").await.unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "OTP_DAILY_LIMIT");
    assert_eq!(otp.meta.count(), 1);
}

async fn the_hourly_cap_is_reported_when_it_and_the_cooldown_both_apply(
    redis: Option<&RedisServer>,
) {
    let otp = Otp::start(
        redis,
        &[
            ("KABAR_OTP_RESEND_SECONDS", "60"),
            ("KABAR_OTP_MAX_SENDS_PER_HOUR", "1"),
        ],
    )
    .await;
    otp.send("0812-3456-7890", "").await.unwrap();
    // Inside the 60 s cooldown and at the hourly cap: the longer wait is reported.
    let status = otp.send("0812-3456-7890", "").await.unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "OTP_HOURLY_LIMIT");
    assert!(HOUR_WAIT.contains(&wait_of(&status)), "{status:?}");
}

async fn refusals_by_the_number_do_not_use_the_ip_allowance(redis: Option<&RedisServer>) {
    // A number refused by its cooldown, then one refused by its hourly cap.
    for (settings, reason) in [
        (
            [
                ("KABAR_OTP_RESEND_SECONDS", "60"),
                ("KABAR_OTP_MAX_SENDS_PER_HOUR", "5"),
            ],
            "OTP_RESEND_COOLDOWN",
        ),
        (
            [
                ("KABAR_OTP_RESEND_SECONDS", "0"),
                ("KABAR_OTP_MAX_SENDS_PER_HOUR", "1"),
            ],
            "OTP_HOURLY_LIMIT",
        ),
    ] {
        let mut extra = vec![("KABAR_OTP_MAX_SENDS_PER_IP_PER_HOUR", "2")];
        extra.extend(settings);
        let otp = Otp::start(redis, &extra).await;
        let ip = "203.0.113.80";
        otp.send("081200000001", ip).await.unwrap();
        // The customer taps "send again": refused by the number, not counted for the IP.
        for _ in 0..3 {
            let status = otp.send("081200000001", ip).await.unwrap_err();
            assert_refused(&status, Code::ResourceExhausted, reason);
        }
        otp.send("081200000002", ip)
            .await
            .expect("the IP's second send is still allowed");
        let status = otp.send("081200000003", ip).await.unwrap_err();
        assert_refused(&status, Code::ResourceExhausted, "OTP_IP_HOURLY_LIMIT");
        if let Some(redis) = redis {
            // The next round starts from an empty store.
            let mut con = redis.connection().await;
            let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_redis_outage_shows_in_readyz_and_metrics_and_fails_fast() {
    let mut redis = RedisServer::start();
    let otp = Otp::start(Some(&redis), &[]).await;
    let http = otp.app.http_addr;
    let (status, body) = readyz(http).await;
    assert_eq!(status, 200);
    assert_eq!(body["otp_store"], "redis");
    assert_eq!(body["otp_store_reachable"], true);
    let store_up = |v: u8| format!("kabar_otp_store_up {v}");
    assert!(metrics_text(http).await.lines().any(|l| l == store_up(1)));

    redis.stop();
    let status = otp.send("0812-3456-7890", "").await.unwrap_err();
    assert_refused(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(1)));
    let status = otp.verify("0812-3456-7890", "123456").await.unwrap_err();
    assert_refused(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(1)));

    // The probe notices within about a second; kabar stays ready (notifications still go out).
    let noticed = eventually(Duration::from_secs(5), || async {
        readyz(http).await.1["otp_store_reachable"] == false
    })
    .await;
    assert!(noticed, "/readyz reports the store unreachable");
    let (status, body) = readyz(http).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert!(metrics_text(http).await.lines().any(|l| l == store_up(0)));

    redis.restart();
    let back = eventually(Duration::from_secs(10), || async {
        readyz(http).await.1["otp_store_reachable"] == true
    })
    .await;
    assert!(back, "/readyz reports the store reachable again");
    assert!(metrics_text(http).await.lines().any(|l| l == store_up(1)));
}

#[tokio::test]
async fn codes_never_reach_the_log() {
    let meta = FakeMeta::start().await;
    let url = meta.url();
    // Ten-digit codes: no timestamp or duration in the log contains one by chance.
    let test_code = "1357924680";
    let mut kabar = Kabar::serve(&[
        ("KABAR_LOG", "kabar=trace,info"),
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", TOKEN),
        ("META_WA_PHONE_NUMBER_ID", PHONE_NUMBER_ID),
        ("META_GRAPH_API_URL", &url),
        ("KABAR_META_RETRY_BASE_MS", "5"),
        ("KABAR_OTP_CODE_LENGTH", "10"),
        ("KABAR_OTP_RESEND_SECONDS", "0"),
        (
            "KABAR_OTP_TEST_NUMBERS",
            &format!("6281100000001={test_code}"),
        ),
    ]);
    let channel = kabar.wait_serving().await;
    let mut client = kabar::pb::otp_service_client::OtpServiceClient::new(channel);
    let phone = "0812-3456-7890";
    let send = SendOtpRequest {
        phone: phone.into(),
        ..Default::default()
    };
    let verify = |code: &str| VerifyOtpRequest {
        phone: phone.into(),
        purpose: String::new(),
        code: code.into(),
    };
    let last_code = || {
        meta.received().last().unwrap().body["template"]["components"][0]["parameters"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut codes = vec![test_code.to_owned()];

    // Delivered, then a wrong guess and the right one.
    client.send_otp(send.clone()).await.unwrap();
    let code = last_code();
    let wrong: String = code
        .bytes()
        .map(|b| char::from(b'0' + (b - b'0' + 1) % 10))
        .collect();
    client.verify_otp(verify(&wrong)).await.unwrap();
    client.verify_otp(verify(&code)).await.unwrap();
    codes.extend([code, wrong]);
    // Refused by Meta, retried then failed, and an unusable answer.
    meta.push(Reply::error(400, 131026, "Message undeliverable"));
    client.send_otp(send.clone()).await.unwrap_err();
    codes.push(last_code());
    for _ in 0..3 {
        meta.push(Reply::error(503, 131016, "Service temporarily unavailable"));
    }
    client.send_otp(send.clone()).await.unwrap_err();
    codes.push(last_code());
    meta.push(Reply {
        status: 200,
        body: serde_json::json!({"messages": []}),
        delay: Duration::ZERO,
    });
    client.send_otp(send).await.unwrap_err();
    codes.push(last_code());
    // A test number, sent and verified.
    client
        .send_otp(SendOtpRequest {
            phone: "0811-0000-0001".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .verify_otp(VerifyOtpRequest {
            phone: "0811-0000-0001".into(),
            purpose: String::new(),
            code: test_code.into(),
        })
        .await
        .unwrap();

    assert!(kabar.stop(Duration::from_secs(10)).await.success());
    let log = kabar.stderr();
    assert!(
        log.iter().filter(|l| l.contains("SendOtp")).count() >= 5,
        "the calls are logged: {log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("+6281100000001")),
        "phone numbers appear: {log:#?}"
    );
    for code in &codes {
        assert_eq!(code.len(), 10);
        let leaks: Vec<&String> = log.iter().filter(|l| l.contains(code.as_str())).collect();
        assert!(leaks.is_empty(), "code {code} logged: {leaks:#?}");
    }
}

/// Reaching the daily cap is logged at ERROR, so that an alert on error lines catches an OTP
/// pumping attack.
#[tokio::test]
async fn the_daily_cap_is_logged_at_error_when_reached() {
    let mut kabar = Kabar::serve(&[("KABAR_LOG_FORMAT", "json"), ("KABAR_OTP_DAILY_LIMIT", "1")]);
    let channel = kabar.wait_serving().await;
    let mut client = kabar::pb::otp_service_client::OtpServiceClient::new(channel);
    for (phone, ok) in [("081200000001", true), ("081200000002", false)] {
        let result = client
            .send_otp(SendOtpRequest {
                phone: phone.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(result.is_ok(), ok, "{result:?}");
    }
    assert!(kabar.stop(Duration::from_secs(10)).await.success());
    let lines = kabar.json_lines();
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("OTP DAILY LIMIT REACHED"))),
        "{lines:#?}"
    );
}
