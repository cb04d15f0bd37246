//! SendTemplate end to end: the exact request Meta receives, and every bad input refused before
//! Meta is called.

use std::collections::HashMap;

use kabar::pb::SendTemplateRequest;
use serde_json::json;
use tonic::Code;

use crate::support::{
    FakeMeta, PHONE_NUMBER_ID, TOKEN, TestApp, error_info, meta_vars, violated_fields,
};

pub fn invoice_params() -> HashMap<String, String> {
    [
        ("nama", "Budi Santoso"),
        ("periode", "November 2026"),
        ("no_invoice", "INV/2026/11/0042"),
        ("paket", "Home 30 Mbps"),
        ("nominal", "Rp 250.000"),
        ("jatuh_tempo", "10 Desember 2026"),
        ("customer_id", "CUST-00042"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

pub fn invoice_request() -> SendTemplateRequest {
    SendTemplateRequest {
        phone: "0812-3456-7890".into(),
        template: "invoice_notification".into(),
        params: invoice_params(),
        reference: "INV/2026/11/0042".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn invoice_reaches_meta_as_documented_json() {
    let meta = FakeMeta::start().await;
    let app = TestApp::start(meta_vars(&meta)).await;
    let response = app
        .notifications()
        .send_template(invoice_request())
        .await
        .expect("sent")
        .into_inner();
    assert_eq!(response.message_id, "wamid.TEST00000001");
    assert_eq!(response.phone, "+6281234567890");
    assert_eq!(response.wa_id, "6281234567890");

    let received = meta.received();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.path, format!("/v24.0/{PHONE_NUMBER_ID}/messages"));
    assert_eq!(
        r.authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    let text = |t: &str| json!({"type": "text", "text": t});
    assert_eq!(
        r.body,
        json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "+6281234567890",
            "type": "template",
            "template": {
                "name": "invoice_notification",
                "language": {"code": "id"},
                "components": [{
                    "type": "body",
                    "parameters": [
                        text("Budi Santoso"),
                        text("November 2026"),
                        text("INV/2026/11/0042"),
                        text("Home 30 Mbps"),
                        text("Rp 250.000"),
                        text("10 Desember 2026"),
                        text("CUST-00042"),
                    ]
                }]
            }
        })
    );
}

#[tokio::test]
async fn positional_params_language_override_and_api_version() {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.push(("META_GRAPH_API_VERSION".into(), "v23.0".into()));
    let app = TestApp::start(vars).await;
    app.notifications()
        .send_template(SendTemplateRequest {
            phone: "+62 857 1234 5678".into(),
            template: "access_opened".into(),
            positional_params: vec!["Siti".into(), "0800-1-234-567".into()],
            language: "en_US".into(),
            ..Default::default()
        })
        .await
        .expect("sent");
    let r = &meta.received()[0];
    assert_eq!(r.path, format!("/v23.0/{PHONE_NUMBER_ID}/messages"));
    assert_eq!(r.body["to"], "+6285712345678");
    assert_eq!(r.body["template"]["language"]["code"], "en_US");
    assert_eq!(
        r.body["template"]["components"][0]["parameters"],
        json!([{"type": "text", "text": "Siti"}, {"type": "text", "text": "0800-1-234-567"}])
    );
}

#[tokio::test]
async fn registry_overrides_name_language_and_order() {
    let meta = FakeMeta::start().await;
    let dir = std::env::temp_dir().join(format!("kabar-registry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("templates.toml");
    std::fs::write(
        &path,
        r#"
[templates.access_opened]
name = "akses_dibuka_v2"
language = "en"
params = ["telepon_cs", "nama"]

[templates.welcome]
category = "UTILITY"
params = ["nama", "paket"]
"#,
    )
    .unwrap();
    let mut vars = meta_vars(&meta);
    vars.push(("KABAR_TEMPLATES".into(), path.display().to_string()));
    let app = TestApp::start(vars).await;
    let mut client = app.notifications();
    let params: HashMap<String, String> = [("nama", "Siti"), ("telepon_cs", "021-555")]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    client
        .send_template(SendTemplateRequest {
            phone: "081234567890".into(),
            template: "access_opened".into(),
            params,
            ..Default::default()
        })
        .await
        .expect("sent");
    client
        .send_template(SendTemplateRequest {
            phone: "081234567890".into(),
            template: "welcome".into(),
            positional_params: vec!["Siti".into(), "Home 30".into()],
            ..Default::default()
        })
        .await
        .expect("sent");
    let received = meta.received();
    let t = &received[0].body["template"];
    assert_eq!(t["name"], "akses_dibuka_v2");
    assert_eq!(t["language"]["code"], "en");
    assert_eq!(t["components"][0]["parameters"][0]["text"], "021-555");
    assert_eq!(t["components"][0]["parameters"][1]["text"], "Siti");
    assert_eq!(received[1].body["template"]["name"], "welcome");
    assert_eq!(received[1].body["template"]["language"]["code"], "id");
    let _ = std::fs::remove_dir_all(dir);
}

/// The AUTHENTICATION template goes out only through SendOtp, which applies the OTP limits
/// (country allow-list, cooldown, hourly and daily caps): SendTemplate refuses it.
#[tokio::test]
async fn authentication_template_is_refused_by_send_template() {
    let meta = FakeMeta::start().await;
    let app = TestApp::start(meta_vars(&meta)).await;
    for _ in 0..3 {
        let status = app
            .notifications()
            .send_template(SendTemplateRequest {
                phone: "+79161234567".into(),
                template: "otp_code".into(),
                positional_params: vec!["482913".into()],
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), vec!["template"]);
        assert!(status.message().contains("SendOtp"), "{}", status.message());
    }
    assert_eq!(meta.count(), 0, "nothing reaches Meta");
}

/// Each bad request, and the fields its INVALID_ARGUMENT must name.
fn bad_requests() -> Vec<(&'static str, SendTemplateRequest, Vec<&'static str>)> {
    let base = invoice_request();
    let with_param = |name: &str, value: &str| {
        let mut r = invoice_request();
        r.params.insert(name.to_owned(), value.to_owned());
        r
    };
    let without = |name: &str| {
        let mut r = invoice_request();
        r.params.remove(name);
        r
    };
    vec![
        (
            "short phone",
            SendTemplateRequest {
                phone: "0812345".into(),
                ..base.clone()
            },
            vec!["phone"],
        ),
        (
            "letters in phone",
            SendTemplateRequest {
                phone: "0812-ABCD-7890".into(),
                ..base.clone()
            },
            vec!["phone"],
        ),
        (
            "empty phone",
            SendTemplateRequest {
                phone: String::new(),
                ..base.clone()
            },
            vec!["phone"],
        ),
        (
            "unknown template",
            SendTemplateRequest {
                template: "invoice".into(),
                ..base.clone()
            },
            vec!["template"],
        ),
        (
            "no template",
            SendTemplateRequest {
                template: String::new(),
                ..base.clone()
            },
            vec!["template"],
        ),
        (
            "missing parameter",
            without("jatuh_tempo"),
            vec!["params[jatuh_tempo]"],
        ),
        (
            "unknown parameter",
            with_param("alamat", "Jl. Merdeka 1"),
            vec!["params[alamat]"],
        ),
        (
            "empty parameter",
            with_param("nama", ""),
            vec!["params[nama]"],
        ),
        (
            "blank parameter",
            with_param("nama", "   "),
            vec!["params[nama]"],
        ),
        (
            "newline",
            with_param("nama", "Budi\nSantoso"),
            vec!["params[nama]"],
        ),
        (
            "carriage return",
            with_param("nama", "Budi\rSantoso"),
            vec!["params[nama]"],
        ),
        (
            "tab",
            with_param("paket", "Home\t30"),
            vec!["params[paket]"],
        ),
        (
            "five spaces",
            with_param("paket", "Home     30"),
            vec!["params[paket]"],
        ),
        (
            "too long",
            with_param("nama", &"a".repeat(1025)),
            vec!["params[nama]", "params"],
        ),
        (
            "together too long",
            {
                let mut r = invoice_request();
                for v in r.params.values_mut() {
                    *v = "x".repeat(200);
                }
                r
            },
            vec!["params"],
        ),
        (
            "both params and positional",
            SendTemplateRequest {
                positional_params: vec!["a".into(); 7],
                ..base.clone()
            },
            vec!["positional_params"],
        ),
        (
            "positional count",
            SendTemplateRequest {
                params: HashMap::new(),
                positional_params: vec!["a".into(); 6],
                ..base.clone()
            },
            vec!["positional_params"],
        ),
        (
            "bad positional text",
            SendTemplateRequest {
                params: HashMap::new(),
                positional_params: vec![
                    "a".into(),
                    "b".into(),
                    "c\nd".into(),
                    "e".into(),
                    "f".into(),
                    "g".into(),
                    "h".into(),
                ],
                ..base.clone()
            },
            vec!["positional_params[2]"],
        ),
        (
            "bad language",
            SendTemplateRequest {
                language: "Indonesian".into(),
                ..base.clone()
            },
            vec!["language"],
        ),
        (
            "several problems at once",
            SendTemplateRequest {
                phone: "12".into(),
                ..without("nama")
            },
            vec!["phone", "params[nama]"],
        ),
        (
            "idempotency key with spaces",
            SendTemplateRequest {
                idempotency_key: "a key".into(),
                ..base.clone()
            },
            vec!["idempotency_key"],
        ),
    ]
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field_and_never_reaches_meta() {
    let meta = FakeMeta::start().await;
    let app = TestApp::start(meta_vars(&meta)).await;
    let mut client = app.notifications();
    for (name, request, fields) in bad_requests() {
        let status = client
            .send_template(request)
            .await
            .expect_err(&format!("{name}: must be refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        let mut got = violated_fields(&status);
        got.sort();
        let mut want: Vec<String> = fields.iter().map(|f| (*f).to_owned()).collect();
        want.sort();
        assert_eq!(got, want, "{name}: {}", status.message());
    }
    assert_eq!(meta.count(), 0, "no bad request may reach Meta");
}

#[tokio::test]
async fn log_driver_answers_with_a_synthetic_id_and_sends_nothing() {
    let meta = FakeMeta::start().await;
    // Meta's URL is configured but the driver is `log`: nothing may reach it.
    let app = TestApp::start(crate::support::vars(&[("META_GRAPH_API_URL", &meta.url())])).await;
    let response = app
        .notifications()
        .send_template(invoice_request())
        .await
        .expect("logged")
        .into_inner();
    assert!(
        response.message_id.starts_with("wamid.log."),
        "{response:?}"
    );
    assert_eq!(response.phone, "+6281234567890");
    assert_eq!(meta.count(), 0);
}

#[tokio::test]
async fn whatsapp_disabled_refuses_with_failed_precondition() {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.push(("WHATSAPP_ENABLED".into(), "false".into()));
    let app = TestApp::start(vars).await;
    let status = app
        .notifications()
        .send_template(invoice_request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).unwrap().0, "WHATSAPP_DISABLED");
    assert_eq!(meta.count(), 0);
}

on_both_stores!(idempotency_key_sends_once_and_replays_the_answer);

async fn idempotency_key_sends_once_and_replays_the_answer(
    redis: Option<&crate::support::RedisServer>,
) {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(crate::support::store_vars(redis));
    let app = TestApp::start(vars).await;
    let mut client = app.notifications();
    let request = SendTemplateRequest {
        idempotency_key: "invoice-INV/2026/11/0042".into(),
        ..invoice_request()
    };
    let first = client
        .send_template(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = client
        .send_template(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    assert_eq!(meta.count(), 1);

    // A failed send frees the key: the retry goes out.
    meta.push(crate::support::Reply::error(
        400,
        131026,
        "Message undeliverable",
    ));
    let failing = SendTemplateRequest {
        idempotency_key: "invoice-2".into(),
        ..invoice_request()
    };
    assert!(client.send_template(failing.clone()).await.is_err());
    let retried = client.send_template(failing).await.unwrap().into_inner();
    assert_ne!(retried.message_id, first.message_id);
    assert_eq!(meta.count(), 3);
}
