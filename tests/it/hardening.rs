//! Hostile input against the whole app in-process: answers stay small whatever the input, reused
//! idempotency keys are refused, Meta's answers are read within a bound, caller text is checked,
//! and work that ends after the caller left is still counted.

use std::{collections::HashMap, time::Duration};

use kabar::pb::{SendOtpRequest, SendTemplateRequest, VerifyOtpRequest};
use tonic::{Code, Request};

use crate::{
    send_template::invoice_request,
    support::{
        FakeMeta, RedisServer, Reply, TestApp, error_info, eventually, is_deadline_passed,
        meta_vars, metrics_text, store_vars, vars, violated_fields,
    },
};

/// Bytes the status would take on the wire: `grpc-message` percent-encoded (at most 3 bytes per
/// byte) and `grpc-status-details-bin` in base64.
fn trailer_bytes(status: &tonic::Status) -> usize {
    status.message().len() * 3 + status.details().len() * 4 / 3 + 4
}

fn assert_small(status: &tonic::Status) {
    assert!(
        status.message().len() <= 512,
        "grpc-message of {} bytes",
        status.message().len()
    );
    // grpcio and grpc-go refuse trailers over 16 KiB; stay well under.
    assert!(
        trailer_bytes(status) < 8 * 1024,
        "trailers of about {} bytes",
        trailer_bytes(status)
    );
}

#[tokio::test]
async fn thousands_of_unknown_parameters_give_a_small_answer() {
    let meta = FakeMeta::start().await;
    let app = TestApp::start(meta_vars(&meta)).await;
    let mut request = invoice_request();
    for i in 0..2_000 {
        request
            .params
            .insert(format!("unknown_{i:05}_\u{1b}[31m"), "x".into());
    }
    // Under the 64 KiB message limit, so that validation, not the decoder, answers.
    assert!(prost::Message::encoded_len(&request) < 64 * 1024);
    let status = app
        .notifications()
        .send_template(request)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_small(&status);
    let fields = violated_fields(&status);
    assert_eq!(fields.len(), 10, "{fields:?}");
    assert!(
        fields[0].starts_with("params[unknown_00000_\\u{1b}[31m]"),
        "{fields:?}"
    );
    assert!(
        status.message().ends_with("and 1990 more") || status.message().ends_with("..."),
        "{}",
        status.message()
    );
    assert!(!status.message().contains('\u{1b}'));
    assert_eq!(meta.count(), 0);
}

#[tokio::test]
async fn a_long_template_name_is_cut_in_the_answer() {
    let meta = FakeMeta::start().await;
    let app = TestApp::start(meta_vars(&meta)).await;
    let status = app
        .notifications()
        .send_template(SendTemplateRequest {
            template: "t".repeat(4_000),
            ..invoice_request()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_small(&status);
    assert!(!status.message().contains(&"t".repeat(100)));
}

#[tokio::test]
async fn a_request_over_the_message_limit_is_refused_before_it_is_read() {
    let meta = FakeMeta::start().await;
    let app = TestApp::start(meta_vars(&meta)).await;
    let status = app
        .notifications()
        .send_template(SendTemplateRequest {
            reference: "r".repeat(200_000),
            ..invoice_request()
        })
        .await
        .expect_err("refused");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert_eq!(meta.count(), 0);
}

async fn reused_idempotency_key_is_refused(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let mut v = meta_vars(&meta);
    v.extend(store_vars(redis));
    let app = TestApp::start(v).await;
    let first = SendTemplateRequest {
        idempotency_key: "invoice-42".into(),
        ..invoice_request()
    };
    let answer = app
        .notifications()
        .send_template(first.clone())
        .await
        .expect("sent")
        .into_inner();
    // The same request (the phone written another way) gets the first answer, sends nothing.
    let again = app
        .notifications()
        .send_template(SendTemplateRequest {
            phone: "+62 812 3456 7890".into(),
            ..first.clone()
        })
        .await
        .expect("same answer")
        .into_inner();
    assert_eq!(again, answer);
    // Each difference makes it another request.
    let mut other_params = first.params.clone();
    other_params.insert("nominal".into(), "Rp 999.000".into());
    let others = [
        SendTemplateRequest {
            phone: "0812-9999-0000".into(),
            ..first.clone()
        },
        SendTemplateRequest {
            params: other_params,
            ..first.clone()
        },
        SendTemplateRequest {
            reference: "INV/2026/11/0043".into(),
            ..first.clone()
        },
        SendTemplateRequest {
            template: "payment_confirmation".into(),
            params: [
                ("nama", "Budi"),
                ("nominal", "Rp 1"),
                ("no_bayar", "P-1"),
                ("tanggal", "1-12-2026"),
                ("status", "LUNAS"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..first.clone()
        },
        SendTemplateRequest {
            language: "en_US".into(),
            ..first.clone()
        },
    ];
    for other in others {
        let status = app
            .notifications()
            .send_template(other)
            .await
            .expect_err("a reused key is refused");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(
            error_info(&status).map(|(r, _)| r).as_deref(),
            Some("IDEMPOTENCY_KEY_REUSED")
        );
    }
    assert_eq!(meta.count(), 1, "only the first request reached Meta");
}

on_both_stores!(reused_idempotency_key_is_refused);

#[tokio::test]
async fn an_endless_answer_from_meta_is_unknown_and_cut_short() {
    let meta = FakeMeta::start().await;
    meta.push(Reply::endless());
    let app = TestApp::start(meta_vars(&meta)).await;
    let started = std::time::Instant::now();
    let status = app
        .notifications()
        .send_template(invoice_request())
        .await
        .expect_err("unknown outcome");
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(
        error_info(&status).map(|(r, _)| r).as_deref(),
        Some("META_OUTCOME_UNKNOWN")
    );
    assert!(
        status.message().contains("longer than 64 KiB"),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "kabar stopped reading at the bound, not at the timeout"
    );
    assert_eq!(
        meta.count(),
        1,
        "never retried: the message may have gone out"
    );
}

/// A 200 whose message id is empty, or not a wamid at all (text that would forge a log line), is
/// not a success: UNKNOWN (the message may have gone out), never retried, and nothing of the id
/// reaches the answer.
#[tokio::test]
async fn an_empty_or_malformed_message_id_is_unknown() {
    let meta = FakeMeta::start().await;
    let ids = ["", "wamid.A\nforged log line \u{1b}[2J"];
    for id in ids {
        meta.push(Reply {
            status: 200,
            body: serde_json::json!({
                "messaging_product": "whatsapp",
                "contacts": [{"input": "+6281234567890", "wa_id": "6281234567890"}],
                "messages": [{"id": id}]
            }),
            delay: Duration::ZERO,
        });
    }
    let app = TestApp::start(meta_vars(&meta)).await;
    for id in ids {
        let status = app
            .notifications()
            .send_template(invoice_request())
            .await
            .expect_err("no usable message id");
        assert_eq!(status.code(), Code::Unknown, "{id:?}: {status:?}");
        assert!(!status.message().contains('\n'), "{status:?}");
    }
    assert_eq!(meta.count(), ids.len(), "never retried");
}

#[tokio::test]
async fn reference_and_parameter_text_are_checked() {
    let meta = FakeMeta::start().await;
    let app = TestApp::start(meta_vars(&meta)).await;
    let with_param = |value: &str| {
        let mut r = invoice_request();
        r.params.insert("nama".into(), value.into());
        r
    };
    let cases = [
        (
            SendTemplateRequest {
                reference: "x".repeat(257),
                ..invoice_request()
            },
            "reference",
        ),
        (
            SendTemplateRequest {
                reference: "INV-1\n2026-11-29 level=INFO forged".into(),
                ..invoice_request()
            },
            "reference",
        ),
        (
            SendTemplateRequest {
                reference: "INV-1\u{1b}[2J".into(),
                ..invoice_request()
            },
            "reference",
        ),
        (
            SendTemplateRequest {
                reference: "INV-1\u{202e}lave".into(),
                ..invoice_request()
            },
            "reference",
        ),
        (with_param("Budi\u{2028}Santoso"), "params[nama]"),
        (with_param("Budi\u{2029}Santoso"), "params[nama]"),
        (with_param("Budi\u{85}Santoso"), "params[nama]"),
        (with_param("Budi\u{0b}Santoso"), "params[nama]"),
        (with_param("Budi\u{0c}Santoso"), "params[nama]"),
        (with_param("Budi\u{0}Santoso"), "params[nama]"),
        (
            with_param("Budi \u{a0}\u{2003}\u{3000} Santoso"),
            "params[nama]",
        ),
    ];
    for (request, field) in cases {
        let status = app
            .notifications()
            .send_template(request)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), vec![field], "{status:?}");
    }
    // A 256-character reference is fine.
    app.notifications()
        .send_template(SendTemplateRequest {
            reference: "é".repeat(256),
            ..invoice_request()
        })
        .await
        .expect("sent");
    assert_eq!(meta.count(), 1);
}

#[tokio::test]
async fn a_per_ip_refusal_stores_nothing_for_the_phone() {
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let mut v = meta_vars(&meta);
    v.extend(store_vars(Some(&redis)));
    v.extend(vars(&[("KABAR_OTP_MAX_SENDS_PER_IP_PER_HOUR", "1")]));
    let app = TestApp::start(v).await;
    let send = |phone: &str, ip: &str| {
        let mut client = app.otp();
        let request = SendOtpRequest {
            phone: phone.into(),
            client_ip: ip.into(),
            ..Default::default()
        };
        async move { client.send_otp(request).await }
    };
    send("081200000000", "203.0.113.7").await.expect("first");
    for i in 1..=20 {
        let status = send(&format!("0812000000{i:02}"), "203.0.113.7")
            .await
            .expect_err("IP cap");
        assert_eq!(
            error_info(&status).map(|(r, _)| r).as_deref(),
            Some("OTP_IP_HOURLY_LIMIT")
        );
    }
    // The IPv4-compatible spelling of the same address shares its bucket.
    let status = send("081200000099", "::203.0.113.7")
        .await
        .expect_err("same IP");
    assert_eq!(
        error_info(&status).map(|(r, _)| r).as_deref(),
        Some("OTP_IP_HOURLY_LIMIT")
    );
    let mut con = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("kabar:otp-limit:*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys, vec!["kabar:otp-limit:{6281200000000}".to_owned()]);
    assert_eq!(meta.count(), 1);
}

#[tokio::test]
async fn a_call_that_ends_after_the_caller_left_is_counted() {
    let meta = FakeMeta::start().await;
    meta.set_delay(Duration::from_millis(600));
    let app = TestApp::start(meta_vars(&meta)).await;
    let mut request = Request::new(invoice_request());
    request.set_timeout(Duration::from_millis(150));
    let status = app
        .notifications()
        .send_template(request)
        .await
        .expect_err("the caller gives up first");
    assert!(is_deadline_passed(&status), "{status:?}");
    // kabar's own work ends at the deadline it read, and is counted with its own answer.
    let counted = "kabar_grpc_calls_total{method=\"SendTemplate\",code=\"DEADLINE_EXCEEDED\"} 1";
    assert!(
        eventually(Duration::from_secs(5), || async {
            let text = metrics_text(app.http_addr).await;
            text.contains(counted) && text.contains("kabar_grpc_calls_in_flight 0")
        })
        .await,
        "the call was never counted:\n{}",
        metrics_text(app.http_addr).await
    );
}

#[test]
fn a_config_error_never_prints_url_credentials() {
    let mut map = HashMap::new();
    map.insert("META_GRAPH_API_URL".to_owned(), "ftp://u:pw@x".to_owned());
    let Err(error) = kabar::config::Config::from_source(&map) else {
        panic!("refused")
    };
    let error = error.to_string();
    assert!(!error.contains("pw"), "{error}");
    assert!(error.contains("META_GRAPH_API_URL"), "{error}");
    map.insert(
        "META_GRAPH_API_URL".to_owned(),
        "https://user:secret@graph.example".to_owned(),
    );
    let Err(error) = kabar::config::Config::from_source(&map) else {
        panic!("userinfo refused")
    };
    let error = error.to_string();
    assert!(!error.contains("secret"), "{error}");
}

/// Arbitrary text in every string field of every RPC: always a definite answer, never INTERNAL or
/// UNKNOWN, and always small.
#[tokio::test]
async fn arbitrary_strings_in_every_field_get_definite_small_answers() {
    let meta = FakeMeta::start().await;
    let mut v = meta_vars(&meta);
    v.extend(vars(&[
        ("KABAR_OTP_RESEND_SECONDS", "0"),
        ("KABAR_OTP_MAX_SENDS_PER_HOUR", "1000"),
        ("KABAR_OTP_MAX_SENDS_PER_IP_PER_HOUR", "100000"),
    ]));
    let app = TestApp::start(v).await;
    let mut texts = TextGen::new(0x006b_6162_6172);
    for round in 0..150 {
        let mut params = HashMap::new();
        for _ in 0..texts.below(4) {
            params.insert(texts.text(), texts.text());
        }
        let mut request = invoice_request();
        match round % 6 {
            0 => request.phone = texts.text(),
            1 => request.template = texts.text(),
            2 => request.params.extend(params),
            3 => request.positional_params = (0..texts.below(4)).map(|_| texts.text()).collect(),
            4 => request.language = texts.text(),
            _ => {
                request.reference = texts.text();
                request.idempotency_key = texts.text();
            }
        }
        if let Err(status) = app.notifications().send_template(request).await {
            assert_definite(&status);
        }
        let otp = SendOtpRequest {
            phone: if round % 2 == 0 {
                texts.text()
            } else {
                "081234567890".into()
            },
            purpose: texts.text(),
            client_ip: texts.text(),
        };
        if let Err(status) = app.otp().send_otp(otp).await {
            assert_definite(&status);
        }
        let verify = VerifyOtpRequest {
            phone: texts.text(),
            purpose: texts.text(),
            code: texts.text(),
        };
        if let Err(status) = app.otp().verify_otp(verify).await {
            assert_definite(&status);
        }
    }
}

fn assert_definite(status: &tonic::Status) {
    assert!(
        !matches!(
            status.code(),
            Code::Internal | Code::Unknown | Code::Unavailable
        ),
        "{status:?}"
    );
    assert_small(status);
}

/// Strings drawn from the characters that break things: controls, separators, quotes, long runs,
/// digits and plus signs, non-Latin scripts, and sometimes very long.
struct TextGen(u64);

impl TextGen {
    fn new(seed: u64) -> Self {
        TextGen(seed | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn text(&mut self) -> String {
        const PIECES: &[&str] = &[
            "0",
            "8",
            "+",
            "62",
            "-",
            " ",
            "     ",
            "\t",
            "\n",
            "\r",
            "\u{0}",
            "\u{1b}[31m",
            "\u{7f}",
            "\u{85}",
            "\u{a0}",
            "\u{2028}",
            "\u{2029}",
            "\u{feff}",
            "\u{200b}",
            "\"",
            "\\",
            "{{1}}",
            "%s",
            "é",
            "ß",
            "日本",
            "🙂",
            "\u{10ffff}",
            "login",
            "otp_code",
            "invoice_notification",
            "id",
            "en_US",
            "::1.2.3.4",
            "1.2.3.4",
            "nama",
        ];
        let len = match self.below(10) {
            0 => 0,
            1 => 2_000 + self.below(8_000) as usize,
            _ => self.below(12) as usize,
        };
        let mut out = String::new();
        for _ in 0..len {
            out.push_str(PIECES[self.below(PIECES.len() as u64) as usize]);
        }
        out
    }
}
