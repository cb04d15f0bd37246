//! OTP login through the gRPC API: the same cases against the Redis store (a private
//! `redis-server`) and the in-process store.

use std::time::{Duration, Instant};

use kabar::pb::{
    SendOtpRequest, SendOtpResponse, VerifyOtpRequest, verify_otp_response::Result as Verify,
};
use serde_json::json;
use tonic::Code;

use crate::support::{
    FakeMeta, NOT_SERVING, RedisServer, Reply, SERVING, TestApp, error_info, meta_vars,
    retry_delay, store_vars, violated_fields,
};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis,
}

const PHONE: &str = "0812-3456-7890";

struct Env {
    app: TestApp,
    meta: FakeMeta,
    redis: Option<RedisServer>,
}

impl Env {
    async fn start(backend: Backend, extra: &[(&str, &str)]) -> Env {
        let meta = FakeMeta::start().await;
        let mut vars = meta_vars(&meta);
        let redis = match backend {
            Backend::Memory => None,
            Backend::Redis => Some(RedisServer::start()),
        };
        vars.extend(store_vars(redis.as_ref()));
        for (k, v) in extra {
            vars.push(((*k).into(), (*v).into()));
        }
        let app = TestApp::start(vars).await;
        Env { app, meta, redis }
    }

    async fn send(&self, phone: &str, purpose: &str) -> Result<SendOtpResponse, tonic::Status> {
        self.send_from(phone, purpose, "").await
    }

    async fn send_from(
        &self,
        phone: &str,
        purpose: &str,
        ip: &str,
    ) -> Result<SendOtpResponse, tonic::Status> {
        self.app
            .otp()
            .send_otp(SendOtpRequest {
                phone: phone.into(),
                purpose: purpose.into(),
                client_ip: ip.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn verify(&self, phone: &str, purpose: &str, code: &str) -> (Verify, u32) {
        let r = self
            .app
            .otp()
            .verify_otp(VerifyOtpRequest {
                phone: phone.into(),
                purpose: purpose.into(),
                code: code.into(),
            })
            .await
            .expect("verify answers")
            .into_inner();
        (r.result(), r.attempts_remaining)
    }

    /// The code in the last message Meta received.
    fn last_code(&self) -> String {
        let received = self.meta.received();
        let body = &received.last().expect("a message reached Meta").body;
        body["template"]["components"][0]["parameters"][0]["text"]
            .as_str()
            .expect("body parameter")
            .to_owned()
    }
}

/// A code that differs from `code` in every digit.
fn wrong(code: &str) -> String {
    code.bytes()
        .map(|b| char::from(b'0' + (b - b'0' + 1) % 10))
        .collect()
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(super::Backend::Memory).await
            }
            #[tokio::test]
            async fn redis() {
                super::$name(super::Backend::Redis).await
            }
        }
    )*};
}

both_stores!(
    code_reaches_meta_in_the_authentication_template,
    five_wrong_codes_lock_the_code,
    concurrent_right_codes_verify_exactly_once,
    a_resend_invalidates_the_previous_code,
    cooldown_and_hourly_cap_answer_with_the_wait,
    per_ip_cap,
    ip_refusals_do_not_lock_out_the_number,
    expired_code,
    purpose_isolation,
    allowed_countries,
    test_numbers_never_reach_meta,
    meta_refusal_discards_the_code_and_lifts_the_cooldown,
    an_uncertain_send_keeps_the_code_and_the_cooldown,
    malformed_codes_use_no_attempt,
    daily_cap_protects_the_bill,
    bad_requests_name_their_fields,
    meta_unreachable_discards_the_code_and_lifts_the_cooldown,
    the_daily_cap_counts_codes_meta_refused,
    a_send_finishes_after_the_caller_has_gone,
);

async fn code_reaches_meta_in_the_authentication_template(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    let sent = env.send(PHONE, "").await.expect("sent");
    assert_eq!(sent.expires_in_seconds, 300);
    assert_eq!(sent.resend_after_seconds, 60);
    assert_eq!(sent.message_id, "wamid.TEST00000001");
    let received = env.meta.received();
    assert_eq!(received.len(), 1);
    let code = env.last_code();
    assert_eq!(code.len(), 6);
    assert!(code.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(
        received[0].body,
        json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "+6281234567890",
            "type": "template",
            "template": {
                "name": "otp_code",
                "language": {"code": "id"},
                "components": [
                    {"type": "body", "parameters": [{"type": "text", "text": code}]},
                    {"type": "button", "sub_type": "url", "index": "0",
                     "parameters": [{"type": "text", "text": code}]}
                ]
            }
        })
    );
    // Any spelling of the same number verifies; a code is used once.
    assert_eq!(
        env.verify("+62 812 3456 7890", "login", &code).await.0,
        Verify::Verified
    );
    assert_eq!(env.verify(PHONE, "login", &code).await.0, Verify::Expired);
}

async fn five_wrong_codes_lock_the_code(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    env.send(PHONE, "login").await.unwrap();
    let code = env.last_code();
    let bad = wrong(&code);
    for left in [4, 3, 2, 1] {
        assert_eq!(
            env.verify(PHONE, "login", &bad).await,
            (Verify::InvalidCode, left)
        );
    }
    assert_eq!(
        env.verify(PHONE, "login", &bad).await.0,
        Verify::TooManyAttempts
    );
    assert_eq!(env.verify(PHONE, "login", &code).await.0, Verify::Expired);
}

async fn concurrent_right_codes_verify_exactly_once(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    env.send(PHONE, "login").await.unwrap();
    let code = env.last_code();
    let mut calls = Vec::new();
    for _ in 0..32 {
        let mut client = env.app.otp();
        let code = code.clone();
        calls.push(tokio::spawn(async move {
            client
                .verify_otp(VerifyOtpRequest {
                    phone: PHONE.into(),
                    purpose: "login".into(),
                    code,
                })
                .await
                .unwrap()
                .into_inner()
                .result()
        }));
    }
    let mut verified = 0;
    for call in calls {
        match call.await.unwrap() {
            Verify::Verified => verified += 1,
            Verify::Expired => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(verified, 1);
}

async fn a_resend_invalidates_the_previous_code(backend: Backend) {
    let env = Env::start(backend, &[("KABAR_OTP_RESEND_SECONDS", "0")]).await;
    env.send(PHONE, "login").await.unwrap();
    let first = env.last_code();
    let mut second = first.clone();
    // One chance in a million that the new code equals the old one: draw again.
    for _ in 0..3 {
        env.send(PHONE, "login").await.unwrap();
        second = env.last_code();
        if second != first {
            break;
        }
    }
    assert_ne!(first, second);
    assert_eq!(
        env.verify(PHONE, "login", &first).await,
        (Verify::InvalidCode, 4)
    );
    assert_eq!(
        env.verify(PHONE, "login", &second).await.0,
        Verify::Verified
    );
}

fn assert_limited(status: &tonic::Status, reason: &str, wait: std::ops::RangeInclusive<u64>) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(error_info(status).expect("ErrorInfo").0, reason);
    let delay = retry_delay(status).expect("RetryInfo").as_secs();
    assert!(
        wait.contains(&delay),
        "{reason}: wait {delay} s not in {wait:?}"
    );
}

async fn cooldown_and_hourly_cap_answer_with_the_wait(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    env.send(PHONE, "login").await.unwrap();
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_limited(&status, "OTP_RESEND_COOLDOWN", 58..=60);
    // The cooldown is per phone, whatever the purpose.
    let status = env.send(PHONE, "reset").await.unwrap_err();
    assert_limited(&status, "OTP_RESEND_COOLDOWN", 58..=60);
    assert_eq!(env.meta.count(), 1);

    let env = Env::start(
        backend,
        &[
            ("KABAR_OTP_RESEND_SECONDS", "0"),
            ("KABAR_OTP_MAX_SENDS_PER_HOUR", "3"),
        ],
    )
    .await;
    for _ in 0..3 {
        env.send(PHONE, "login").await.unwrap();
    }
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_limited(&status, "OTP_HOURLY_LIMIT", 3590..=3600);
    assert_eq!(env.meta.count(), 3);
    // Another number is not affected.
    env.send("0812-9999-0000", "login").await.unwrap();
}

async fn per_ip_cap(backend: Backend) {
    let env = Env::start(backend, &[("KABAR_OTP_MAX_SENDS_PER_IP_PER_HOUR", "2")]).await;
    env.send_from("081200000001", "login", "203.0.113.7")
        .await
        .unwrap();
    env.send_from("081200000002", "login", "203.0.113.7")
        .await
        .unwrap();
    let status = env
        .send_from("081200000003", "login", "203.0.113.7")
        .await
        .unwrap_err();
    assert_limited(&status, "OTP_IP_HOURLY_LIMIT", 3590..=3600);
    // An IPv4-mapped IPv6 address is the same client.
    let status = env
        .send_from("081200000004", "login", "::ffff:203.0.113.7")
        .await
        .unwrap_err();
    assert_limited(&status, "OTP_IP_HOURLY_LIMIT", 3590..=3600);
    env.send_from("081200000005", "login", "198.51.100.1")
        .await
        .unwrap();
    assert_eq!(env.meta.count(), 3);

    // The refusals by IP left the numbers untouched: no cooldown, nothing counted.
    env.send_from("081200000003", "login", "198.51.100.2")
        .await
        .expect("no cooldown from the refused send");

    // IPv6: one subscriber's /64 is one client, whatever address in it they use.
    env.send_from("081200000006", "login", "2001:db8:1:2::10")
        .await
        .unwrap();
    env.send_from("081200000007", "login", "2001:db8:1:2:ffff::99")
        .await
        .unwrap();
    let status = env
        .send_from("081200000008", "login", "2001:db8:1:2:abcd::1")
        .await
        .unwrap_err();
    assert_limited(&status, "OTP_IP_HOURLY_LIMIT", 3590..=3600);
    env.send_from("081200000008", "login", "2001:db8:1:3::1")
        .await
        .expect("another /64 is another client");
}

/// A caller already refused by the per-IP cap cannot use up someone else's hourly allowance.
async fn ip_refusals_do_not_lock_out_the_number(backend: Backend) {
    let env = Env::start(
        backend,
        &[
            ("KABAR_OTP_MAX_SENDS_PER_IP_PER_HOUR", "1"),
            ("KABAR_OTP_MAX_SENDS_PER_HOUR", "2"),
        ],
    )
    .await;
    env.send_from("081200000001", "login", "203.0.113.9")
        .await
        .unwrap();
    for _ in 0..5 {
        let status = env
            .send_from(PHONE, "login", "203.0.113.9")
            .await
            .unwrap_err();
        assert_limited(&status, "OTP_IP_HOURLY_LIMIT", 3590..=3600);
    }
    env.send_from(PHONE, "login", "198.51.100.7")
        .await
        .expect("the victim's number still has its allowance");
}

async fn expired_code(backend: Backend) {
    let env = Env::start(backend, &[("KABAR_OTP_TTL_SECONDS", "1")]).await;
    let sent = env.send(PHONE, "login").await.unwrap();
    assert_eq!(sent.expires_in_seconds, 1);
    let code = env.last_code();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(env.verify(PHONE, "login", &code).await.0, Verify::Expired);
}

async fn purpose_isolation(backend: Backend) {
    let env = Env::start(backend, &[("KABAR_OTP_RESEND_SECONDS", "0")]).await;
    env.send(PHONE, "login").await.unwrap();
    let login = env.last_code();
    assert_eq!(env.verify(PHONE, "reset", &login).await.0, Verify::Expired);
    env.send(PHONE, "reset").await.unwrap();
    let reset = env.last_code();
    if reset != login {
        assert_eq!(
            env.verify(PHONE, "reset", &login).await,
            (Verify::InvalidCode, 4)
        );
    }
    assert_eq!(env.verify(PHONE, "login", &login).await.0, Verify::Verified);
    assert_eq!(env.verify(PHONE, "reset", &reset).await.0, Verify::Verified);
}

async fn allowed_countries(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    let status = env.send("+60 12-345 6789", "login").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).unwrap().0, "OTP_COUNTRY_NOT_ALLOWED");
    assert_eq!(env.meta.count(), 0);

    let (_, metadata) = error_info(&status).unwrap();
    assert_eq!(metadata.get("country_code").map(String::as_str), Some("60"));

    let env = Env::start(backend, &[("KABAR_OTP_ALLOWED_COUNTRIES", "62, 60")]).await;
    env.send("+60 12-345 6789", "login").await.unwrap();
    assert_eq!(env.meta.received()[0].body["to"], "+60123456789");
}

async fn test_numbers_never_reach_meta(backend: Backend) {
    let env = Env::start(
        backend,
        &[(
            "KABAR_OTP_TEST_NUMBERS",
            "6281100000001=123456, 6281100000002=654321",
        )],
    )
    .await;
    let sent = env.send("0811-0000-0001", "login").await.unwrap();
    assert_eq!(sent.message_id, "");
    assert_eq!(sent.expires_in_seconds, 300);
    assert_eq!(env.meta.count(), 0);
    // The same attempt rules apply.
    assert_eq!(
        env.verify("0811-0000-0001", "login", "000000").await,
        (Verify::InvalidCode, 4)
    );
    assert_eq!(
        env.verify("0811-0000-0001", "login", "123456").await.0,
        Verify::Verified
    );
    let status = env.send("0811-0000-0001", "login").await.unwrap_err();
    assert_limited(&status, "OTP_RESEND_COOLDOWN", 58..=60);
    assert_eq!(env.meta.count(), 0);
}

async fn meta_refusal_discards_the_code_and_lifts_the_cooldown(backend: Backend) {
    let env = Env::start(backend, &[("KABAR_OTP_MAX_SENDS_PER_HOUR", "2")]).await;
    env.meta
        .push(Reply::error(400, 131026, "Message undeliverable"));
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        error_info(&status).unwrap().0,
        "META_RECIPIENT_UNDELIVERABLE"
    );
    let undelivered = env.last_code();
    // The undelivered code does not work.
    assert_eq!(
        env.verify(PHONE, "login", &undelivered).await.0,
        Verify::Expired
    );
    // No cooldown: the customer may ask again at once.
    env.send(PHONE, "login").await.expect("retry at once");
    let delivered = env.last_code();
    // But the failed attempt counted toward the hourly cap of 2.
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_limited(&status, "OTP_HOURLY_LIMIT", 3590..=3600);
    assert_eq!(
        env.verify(PHONE, "login", &delivered).await.0,
        Verify::Verified
    );
}

async fn an_uncertain_send_keeps_the_code_and_the_cooldown(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    // Meta takes the request but the answer is unusable: the customer may have the code.
    env.meta.push(Reply {
        status: 200,
        body: json!({"messages": []}),
        delay: Duration::ZERO,
    });
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_eq!(status.code(), Code::Unknown);
    assert_eq!(error_info(&status).unwrap().0, "META_OUTCOME_UNKNOWN");
    let code = env.last_code();
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_limited(&status, "OTP_RESEND_COOLDOWN", 58..=60);
    assert_eq!(env.verify(PHONE, "login", &code).await.0, Verify::Verified);
}

async fn malformed_codes_use_no_attempt(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    env.send(PHONE, "login").await.unwrap();
    let code = env.last_code();
    for bad in ["12345", "1234567", "12345a", "", "١٢٣٤٥٦", "12 456"] {
        let status = env
            .app
            .otp()
            .verify_otp(VerifyOtpRequest {
                phone: PHONE.into(),
                purpose: "login".into(),
                code: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(violated_fields(&status), vec!["code"], "{bad:?}");
    }
    assert_eq!(
        env.verify(PHONE, "login", &wrong(&code)).await,
        (Verify::InvalidCode, 4)
    );
}

async fn daily_cap_protects_the_bill(backend: Backend) {
    let env = Env::start(
        backend,
        &[
            ("KABAR_OTP_DAILY_LIMIT", "2"),
            ("KABAR_OTP_TEST_NUMBERS", "6281100000001=123456"),
        ],
    )
    .await;
    env.send("081200000001", "login").await.unwrap();
    env.send("081200000002", "login").await.unwrap();
    let status = env.send("081200000003", "login").await.unwrap_err();
    assert_limited(&status, "OTP_DAILY_LIMIT", 1..=86_400);
    assert_eq!(env.meta.count(), 2);
    // A refused send starts no cooldown for that number.
    let status = env.send("081200000003", "login").await.unwrap_err();
    assert_eq!(error_info(&status).unwrap().0, "OTP_DAILY_LIMIT");
    // Test numbers cost nothing and are not capped.
    env.send("0811-0000-0001", "login").await.unwrap();
}

async fn bad_requests_name_their_fields(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    let cases = [
        ("0812345", "login", "", vec!["phone"]),
        ("0812-3456-7890", "Log In", "", vec!["purpose"]),
        ("0812-3456-7890", "login|x", "", vec!["purpose"]),
        ("0812-3456-7890", "login", "not-an-ip", vec!["client_ip"]),
        (
            "abc",
            "LOGIN",
            "1.2.3",
            vec!["phone", "purpose", "client_ip"],
        ),
    ];
    for (phone, purpose, ip, fields) in cases {
        let status = env.send_from(phone, purpose, ip).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), fields, "{phone} {purpose} {ip}");
    }
    let status = env
        .app
        .otp()
        .verify_otp(VerifyOtpRequest {
            phone: "0812".into(),
            purpose: "login".into(),
            code: "123456".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["phone"]);
    assert_eq!(env.meta.count(), 0);
}

#[tokio::test]
async fn redis_holds_only_keyed_hashes_with_bounded_ttls() {
    let env = Env::start(
        Backend::Redis,
        &[
            ("KABAR_OTP_RESEND_SECONDS", "0"),
            ("KABAR_OTP_TEST_NUMBERS", "6281100000001=246810"),
        ],
    )
    .await;
    let mut codes = Vec::new();
    for (i, phone) in ["081234567890", "081298765432", "085712345678"]
        .iter()
        .enumerate()
    {
        env.send_from(phone, "login", &format!("198.51.100.{i}"))
            .await
            .unwrap();
        codes.push(env.last_code());
        env.send(phone, "reset").await.unwrap();
        codes.push(env.last_code());
    }
    env.send("0811-0000-0001", "login").await.unwrap();
    codes.push("246810".to_owned());

    let redis = env.redis.as_ref().unwrap();
    let mut con = redis.connection().await;
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let mut code_keys = 0;
    for key in &keys {
        let key_text = String::from_utf8_lossy(key).into_owned();
        if key_text == "kabar:events" || key_text.starts_with("kabar:msg:{") {
            // The message records and the event feed: who got a message and its status, never
            // the code. The feed is trimmed by age instead of expiring.
            // Field/value pairs; times and Meta's ids are numbers that a code could match by
            // chance, so only the other fields are compared.
            let pairs: Vec<(String, String)> = if key_text == "kabar:events" {
                let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                    .arg(key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut con)
                    .await
                    .unwrap();
                assert!(!entries.is_empty());
                entries
                    .into_iter()
                    .flat_map(|(_, flat)| {
                        flat.chunks(2)
                            .map(|kv| (kv[0].clone(), kv[1].clone()))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            } else {
                let map: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(key)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                assert_eq!(map.get("c").map(String::as_str), Some("AUTHENTICATION"));
                map.into_iter().collect()
            };
            for (field, value) in pairs {
                if ["ca", "u", "h", "id"].contains(&field.as_str()) {
                    continue;
                }
                for code in &codes {
                    assert!(!value.contains(code.as_str()), "{key_text} holds a code");
                }
            }
            continue;
        }
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(ttl > 0, "{key_text} has no TTL");
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        if key_text.starts_with("kabar:otp:{") {
            // A code key: its name holds the phone and purpose, its value the HMAC and attempts.
            code_keys += 1;
            assert_eq!(kind, "string", "{key_text}");
            assert!(ttl <= 300_000, "{key_text}: TTL {ttl} ms");
            assert!(
                key_text.ends_with("}:login") || key_text.ends_with("}:reset"),
                "{key_text}"
            );
            let value: Vec<u8> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut con)
                .await
                .unwrap();
            assert_eq!(value.len(), 33, "32-byte HMAC and one attempts byte");
            for code in &codes {
                assert!(
                    !value.windows(code.len()).any(|w| w == code.as_bytes()),
                    "{key_text} holds a code"
                );
            }
        } else if key_text.starts_with("kabar:pace:{") {
            // Pacing keys: the schedule (times), the recipients counted toward the daily limit
            // (phone numbers scored by time), a recipient's pair interval (a time).
            assert!(ttl <= 86_400_000 * 2, "{key_text}: TTL {ttl} ms");
            let values: Vec<String> = match kind.as_str() {
                // The schedule's next slot, the backoff ("factor:since"), a pair interval's end.
                "string" => {
                    let v: String = redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut con)
                        .await
                        .unwrap();
                    v.split(':').map(str::to_owned).collect()
                }
                "hash" => redis::cmd("HVALS")
                    .arg(key)
                    .query_async(&mut con)
                    .await
                    .unwrap(),
                "zset" => redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut con)
                    .await
                    .unwrap(),
                other => panic!("unexpected type {other} for {key_text}"),
            };
            for v in values {
                let number = v.strip_prefix('+').unwrap_or(&v);
                // A time, or a recipient's number: nothing else.
                assert!(number.parse::<u64>().is_ok(), "{key_text}: {v:?}");
            }
        } else {
            // Rate-limit keys: counters and times only, in known fields.
            assert!(
                key_text.starts_with("kabar:otp-limit:{")
                    || key_text.starts_with("kabar:otp-ip:{")
                    || key_text.starts_with("kabar:otp-daily:{"),
                "unexpected key {key_text}"
            );
            assert!(ttl <= 86_400_000 * 2, "{key_text}: TTL {ttl} ms");
            let values: Vec<String> = match kind.as_str() {
                "hash" => {
                    let map: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                        .arg(key)
                        .query_async(&mut con)
                        .await
                        .unwrap();
                    let mut fields: Vec<&str> = map.keys().map(String::as_str).collect();
                    fields.sort_unstable();
                    assert_eq!(fields, ["n", "r", "w"], "{key_text}");
                    map.into_values().collect()
                }
                "string" => vec![
                    redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut con)
                        .await
                        .unwrap(),
                ],
                other => panic!("unexpected type {other} for {key_text}"),
            };
            for v in values {
                assert!(
                    v.parse::<u64>().is_ok(),
                    "{key_text}: {v:?} is not a number"
                );
            }
        }
        // No key name carries a code either (names hold a phone, an IP or a day number).
        for code in &codes {
            let phone_free = key_text
                .split(['{', '}'])
                .enumerate()
                .filter(|(i, _)| i % 2 == 0)
                .map(|(_, part)| part)
                .collect::<String>();
            assert!(
                !phone_free.contains(code.as_str()),
                "{key_text} names a code"
            );
        }
    }
    assert_eq!(code_keys, 7);
}

#[tokio::test]
async fn redis_outage_fails_fast_flips_health_and_recovers() {
    let mut env = Env::start(Backend::Redis, &[]).await;
    assert_eq!(env.app.health_status(kabar::OTP_SERVICE).await, SERVING);
    env.send(PHONE, "login").await.unwrap();

    env.redis.as_mut().unwrap().stop();
    for _ in 0..3 {
        let start = Instant::now();
        let status = env.send("081298765432", "login").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(error_info(&status).unwrap().0, "STORE_UNAVAILABLE");
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );
        let start = Instant::now();
        let status = env
            .app
            .otp()
            .verify_otp(VerifyOtpRequest {
                phone: PHONE.into(),
                purpose: "login".into(),
                code: "123456".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );
    }
    assert!(
        env.app
            .wait_health(kabar::OTP_SERVICE, NOT_SERVING, Duration::from_secs(5))
            .await,
        "OtpService turns NOT_SERVING"
    );
    // Notifications do not depend on Redis.
    assert_eq!(
        env.app.health_status(kabar::NOTIFICATION_SERVICE).await,
        SERVING
    );

    env.redis.as_mut().unwrap().restart();
    assert!(
        env.app
            .wait_health(kabar::OTP_SERVICE, SERVING, Duration::from_secs(10))
            .await,
        "OtpService is SERVING again without a restart"
    );
    env.send("081298765432", "login")
        .await
        .expect("works again");
    let code = env.last_code();
    assert_eq!(
        env.verify("081298765432", "login", &code).await.0,
        Verify::Verified
    );
}

async fn meta_unreachable_discards_the_code_and_lifts_the_cooldown(backend: Backend) {
    // A port with nothing listening: nothing can reach Meta.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let url = format!("http://{addr}");
    let env = Env::start(
        backend,
        &[
            ("META_GRAPH_API_URL", url.as_str()),
            ("KABAR_META_RETRY_BASE_MS", "1"),
            ("KABAR_OTP_MAX_SENDS_PER_HOUR", "2"),
        ],
    )
    .await;
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).unwrap().0, "META_UNREACHABLE");
    // No cooldown: the next request is answered by the gate, not refused by it; and it counts.
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_eq!(error_info(&status).unwrap().0, "META_UNREACHABLE");
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_limited(&status, "OTP_HOURLY_LIMIT", 3590..=3600);
}

async fn the_daily_cap_counts_codes_meta_refused(backend: Backend) {
    let env = Env::start(backend, &[("KABAR_OTP_DAILY_LIMIT", "1")]).await;
    env.meta
        .push(Reply::error(400, 131026, "Message undeliverable"));
    let status = env.send("081200000001", "login").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = env.send("081200000002", "login").await.unwrap_err();
    assert_limited(&status, "OTP_DAILY_LIMIT", 1..=86_400);
    assert_eq!(env.meta.count(), 1);
}

async fn a_send_finishes_after_the_caller_has_gone(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    env.meta.set_delay(Duration::from_millis(700));
    let mut request = tonic::Request::new(SendOtpRequest {
        phone: PHONE.into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(150));
    let status = env.app.otp().send_otp(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The send went on without the caller: the code arrives and works, and the cooldown stands.
    assert!(
        crate::support::eventually(Duration::from_secs(5), || async { env.meta.count() == 1 })
            .await
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    let code = env.last_code();
    let status = env.send(PHONE, "login").await.unwrap_err();
    assert_limited(&status, "OTP_RESEND_COOLDOWN", 55..=60);
    assert_eq!(env.verify(PHONE, "login", &code).await.0, Verify::Verified);
}
