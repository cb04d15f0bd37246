//! `kabar doctor` and `kabar templates status|push` against the Meta stand-in's Graph API: a
//! good setup passes; each checklist fault, one at a time, is found and named; Meta unreachable
//! or hanging is reported without hanging; push creates exactly the missing templates, valid by
//! Meta's rules, and a second push creates nothing.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use kabar::{
    config::Config,
    ops::{
        doctor::{self, Verdict},
        templates::{self, Pushed},
    },
};
use serde_json::json;

use crate::{
    meta_graph::{Graph, WABA_ID, approved},
    process::{free_port, work_dir},
    support::{FakeMeta, RedisServer, meta_vars},
};

fn config_for(meta_url: &str, redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> Config {
    let fake_vars = |url: &str| {
        vec![
            ("WHATSAPP_DRIVER".to_owned(), "meta".to_owned()),
            (
                "WHATSAPP_API_KEY".to_owned(),
                crate::support::TOKEN.to_owned(),
            ),
            (
                "META_WA_PHONE_NUMBER_ID".to_owned(),
                crate::support::PHONE_NUMBER_ID.to_owned(),
            ),
            ("META_GRAPH_API_URL".to_owned(), url.to_owned()),
        ]
    };
    let mut map: HashMap<String, String> = fake_vars(meta_url).into_iter().collect();
    map.insert("META_WA_BUSINESS_ACCOUNT_ID".into(), WABA_ID.into());
    map.insert("META_APP_SECRET".into(), "app-secret-for-tests".into());
    map.insert("KABAR_META_TIMEOUT_MS".into(), "1000".into());
    map.insert("KABAR_META_CONNECT_TIMEOUT_MS".into(), "500".into());
    if let Some(redis) = redis {
        map.insert("REDIS_URL".into(), redis.url());
        map.insert(
            "KABAR_OTP_SECRET".into(),
            "test-otp-secret-0123456789abcdef-0123".into(),
        );
    }
    for (k, v) in extra {
        map.insert((*k).into(), (*v).into());
    }
    Config::from_source(&map).expect("valid test configuration")
}

fn failing(report: &doctor::Report) -> BTreeSet<String> {
    report
        .checks
        .iter()
        .filter(|c| matches!(c.verdict, Verdict::Fail | Verdict::Unknown))
        .map(|c| c.id.clone())
        .collect()
}

#[tokio::test]
async fn a_good_setup_passes_every_check() {
    let meta = FakeMeta::start().await;
    meta.set_messaging_limit("TIER_2K");
    let redis = RedisServer::start();
    let report = doctor::run(&config_for(&meta.url(), Some(&redis), &[])).await;
    assert!(report.passed, "{}", doctor::render(&report));
    let ids: BTreeSet<&str> = report.checks.iter().map(|c| c.id.as_str()).collect();
    for id in [
        "token",
        "phone.registered",
        "phone.name",
        "phone.quality",
        "phone.throughput",
        "phone.limit",
        "business.verification",
        "business.review",
        "template.invoice_notification",
        "template.otp_code",
        "webhook.subscribed",
        "webhook.signature",
        "store",
        "otp.secret",
    ] {
        assert!(ids.contains(id), "{id} missing from {ids:?}");
    }
    // Seven templates over three pages: paging was followed.
    assert_eq!(ids.iter().filter(|i| i.starts_with("template.")).count(), 7);
    assert!(report.checks.iter().all(|c| c.verdict != Verdict::Fail));
}

/// A fault in the stand-in and the checks that must name it.
type Fault = (&'static str, fn(&mut Graph), &'static [&'static str]);

#[tokio::test]
async fn each_checklist_fault_is_found_and_named() {
    let faults: &[Fault] = &[
        (
            "a permission missing",
            |g| {
                g.permissions
                    .retain(|(p, _)| p != "whatsapp_business_management")
            },
            &["token"],
        ),
        (
            "the number not registered",
            |g| g.number["status"] = json!("PENDING"),
            &["phone.registered"],
        ),
        (
            "the number on premises",
            |g| g.number["platform_type"] = json!("ON_PREMISE"),
            &["phone.registered"],
        ),
        (
            "the display name declined",
            |g| g.number["name_status"] = json!("DECLINED"),
            &["phone.name"],
        ),
        (
            "quality RED",
            |g| g.number["quality_rating"] = json!("RED"),
            &["phone.quality"],
        ),
        (
            "business verification rejected",
            |g| g.waba["business_verification_status"] = json!("rejected"),
            &["business.verification"],
        ),
        (
            "a template missing (132001)",
            |g| g.templates.retain(|t| t.name != "invoice_notification"),
            &["template.invoice_notification"],
        ),
        (
            "a template in another language",
            |g| {
                g.templates
                    .iter_mut()
                    .filter(|t| t.name == "otp_code")
                    .for_each(|t| t.language = "en_US".into())
            },
            &["template.otp_code"],
        ),
        (
            "a parameter count that differs (132000)",
            |g| {
                g.templates.retain(|t| t.name != "payment_reminder");
                g.templates
                    .push(approved("payment_reminder", "id", "UTILITY", 3));
            },
            &["template.payment_reminder"],
        ),
        (
            "a template rejected",
            |g| {
                g.templates
                    .iter_mut()
                    .filter(|t| t.name == "overdue_notice")
                    .for_each(|t| t.status = "REJECTED".into())
            },
            &["template.overdue_notice"],
        ),
        (
            "a template of another category",
            |g| {
                g.templates
                    .iter_mut()
                    .filter(|t| t.name == "access_opened")
                    .for_each(|t| t.category = "MARKETING".into())
            },
            &["template.access_opened"],
        ),
        (
            "no app subscribed",
            |g| g.subscribed_apps.clear(),
            &["webhook.subscribed"],
        ),
    ];
    let redis = RedisServer::start();
    for (what, break_it, named) in faults {
        let meta = FakeMeta::start().await;
        meta.set_messaging_limit("TIER_2K");
        meta.graph(break_it);
        let report = doctor::run(&config_for(&meta.url(), Some(&redis), &[])).await;
        let expected: BTreeSet<String> = named.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            failing(&report),
            expected,
            "{what}:\n{}",
            doctor::render(&report)
        );
        assert!(!report.passed, "{what}");
        for c in report.checks.iter().filter(|c| expected.contains(&c.id)) {
            assert!(
                c.remedy.as_ref().is_some_and(|r| !r.is_empty()),
                "{what}: no remedy"
            );
        }
    }
    // The 132000 and 132001 mistakes are named as such.
    let meta = FakeMeta::start().await;
    meta.set_messaging_limit("TIER_2K");
    meta.graph(|g| {
        g.templates
            .retain(|t| t.name != "invoice_notification" && t.name != "payment_reminder");
        g.templates
            .push(approved("payment_reminder", "id", "UTILITY", 3));
    });
    let report = doctor::run(&config_for(&meta.url(), Some(&redis), &[])).await;
    let text = doctor::render(&report);
    assert!(text.contains("132001") && text.contains("132000"), "{text}");
}

#[tokio::test]
async fn local_faults_and_a_bad_token_are_named() {
    let meta = FakeMeta::start().await;
    meta.set_messaging_limit("TIER_2K");
    // Redis that does not answer.
    let dead_redis = format!("redis://127.0.0.1:{}/0", free_port());
    let report = doctor::run(&config_for(
        &meta.url(),
        None,
        &[
            ("REDIS_URL", &dead_redis),
            ("KABAR_OTP_SECRET", "test-otp-secret-0123456789abcdef-0123"),
        ],
    ))
    .await;
    assert_eq!(failing(&report), BTreeSet::from(["store".to_owned()]));
    assert!(!doctor::render(&report).contains(&dead_redis));

    // A token Meta refuses: named, and nothing else is asked of Meta.
    let before = meta.received().len();
    let report = doctor::run(&config_for(
        &meta.url(),
        None,
        &[("WHATSAPP_API_KEY", "EAAexpired-token-of-the-past")],
    ))
    .await;
    let token = report.checks.iter().find(|c| c.id == "token").unwrap();
    assert_eq!(token.verdict, Verdict::Fail, "{token:?}");
    assert!(token.found.contains("190"), "{token:?}");
    assert!(
        token.remedy.as_ref().unwrap().contains("token"),
        "{token:?}"
    );
    assert!(failing(&report).contains("meta"));
    assert_eq!(meta.received().len(), before);
    let text = doctor::render(&report);
    assert!(
        !text.contains("EAAexpired"),
        "the token was printed: {text}"
    );

    // A wrong business account ID.
    let report = doctor::run(&config_for(
        &meta.url(),
        None,
        &[("META_WA_BUSINESS_ACCOUNT_ID", "999999999999999")],
    ))
    .await;
    let business = report.checks.iter().find(|c| c.id == "business").unwrap();
    assert!(business.found.contains("100"), "{business:?}");
    assert!(failing(&report).contains("templates"));
    assert!(failing(&report).contains("webhook.subscribed"));
}

#[tokio::test]
async fn meta_unreachable_or_silent_is_reported_without_hanging() {
    // Nothing listens.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let report = doctor::run(&config_for(&closed, None, &[])).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let token = report.checks.iter().find(|c| c.id == "token").unwrap();
    assert_eq!(token.verdict, Verdict::Unknown, "{token:?}");
    assert!(!report.passed);

    // Accepts and never answers: bounded by KABAR_META_TIMEOUT_MS (1 s here).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let started = Instant::now();
    let report = doctor::run(&config_for(&format!("http://{addr}"), None, &[])).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        report
            .checks
            .iter()
            .find(|c| c.id == "token")
            .unwrap()
            .verdict,
        Verdict::Unknown
    );
}

#[tokio::test]
async fn push_creates_exactly_the_missing_templates_and_a_second_push_nothing() {
    let meta = FakeMeta::start().await;
    meta.graph(|g| {
        g.templates.retain(|t| {
            ["payment_confirmation", "overdue_notice", "access_opened"].contains(&t.name.as_str())
        })
    });
    let config = config_for(&meta.url(), None, &[]);
    let client = kabar::whatsapp::MetaClient::new(config.meta.as_ref().unwrap()).unwrap();

    // A dry run submits nothing.
    let dry = templates::push(&client, WABA_ID, &config.templates, config.otp.ttl, true)
        .await
        .unwrap();
    assert_eq!(
        dry.iter()
            .filter(|l| matches!(l.pushed, Pushed::WouldCreate { .. }))
            .count(),
        4
    );
    assert!(meta.graph(|g| g.creations.is_empty()));

    let lines = templates::push(&client, WABA_ID, &config.templates, config.otp.ttl, false)
        .await
        .unwrap();
    let created: BTreeSet<&str> = lines
        .iter()
        .filter(|l| matches!(l.pushed, Pushed::Created { .. }))
        .map(|l| l.key.as_str())
        .collect();
    assert_eq!(
        created,
        BTreeSet::from([
            "invoice_notification",
            "isolation_notice",
            "otp_code",
            "payment_reminder"
        ])
    );
    // The stand-in refuses what Meta refuses: every creation it received was accepted.
    let (creations, held) = meta.graph(|g| (g.creations.clone(), g.templates.len()));
    assert_eq!(creations.len(), 4);
    assert_eq!(held, 7);
    let otp = creations.iter().find(|c| c["name"] == "otp_code").unwrap();
    assert_eq!(otp["components"][1]["code_expiration_minutes"], 5);
    assert_eq!(otp["message_send_ttl_seconds"], 300);
    let invoice = creations
        .iter()
        .find(|c| c["name"] == "invoice_notification")
        .unwrap();
    assert_eq!(
        invoice["components"][0]["example"]["body_text"][0]
            .as_array()
            .unwrap()
            .len(),
        7
    );

    // Everything exists now (pending or approved): nothing more is created.
    let again = templates::push(&client, WABA_ID, &config.templates, config.otp.ttl, false)
        .await
        .unwrap();
    assert!(
        again
            .iter()
            .all(|l| matches!(l.pushed, Pushed::Exists { .. })),
        "{again:?}"
    );
    assert_eq!(meta.graph(|g| g.creations.len()), 4);
    // And the status shows the new ones waiting for review.
    let at_meta = templates::fetch(&client, WABA_ID).await.unwrap();
    let compared = templates::compare_all(&config.templates, &at_meta);
    assert_eq!(
        compared
            .iter()
            .filter(|c| c.standing == templates::Standing::Pending)
            .count(),
        3
    );
}

#[tokio::test]
async fn push_lints_first_and_shows_metas_reason_for_a_refusal() {
    let meta = FakeMeta::start().await;
    meta.graph(|g| {
        g.refuse.push((
            "welcome".into(),
            2388293,
            "The number of variables compared to the message length is too high".into(),
        ))
    });
    let dir = work_dir("push-lint");
    let registry = dir.join("templates.toml");
    std::fs::write(
        &registry,
        r#"
[templates.late_fee]
category = "UTILITY"
params = ["nama", "nominal"]
body = "Halo {{1}}, denda keterlambatan Anda {{2}}"
examples = ["Budi", "Rp 10.000"]

[templates.welcome]
category = "UTILITY"
params = ["nama"]
body = "Halo {{1}}, selamat bergabung dengan layanan internet kami. Terima kasih."
examples = ["Budi"]
"#,
    )
    .unwrap();
    let config = config_for(
        &meta.url(),
        None,
        &[("KABAR_TEMPLATES", registry.to_str().unwrap())],
    );
    let client = kabar::whatsapp::MetaClient::new(config.meta.as_ref().unwrap()).unwrap();
    let lines = templates::push(&client, WABA_ID, &config.templates, config.otp.ttl, false)
        .await
        .unwrap();
    let line = |key: &str| lines.iter().find(|l| l.key == key).unwrap();
    match &line("late_fee").pushed {
        Pushed::Refused { findings } => assert!(
            findings
                .iter()
                .any(|f| f.problem.contains("ends with a parameter")),
            "{findings:?}"
        ),
        other => panic!("{other:?}"),
    }
    match &line("welcome").pushed {
        Pushed::Failed { code, reason } => {
            assert_eq!(*code, 100);
            assert!(reason.contains("too high"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The linted template never reached Meta; the refused one did, once.
    let names: Vec<String> =
        meta.graph(|g| g.creations.iter().map(|c| c["name"].to_string()).collect());
    assert_eq!(names, vec!["\"welcome\"".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_exit_by_the_outcome_and_print_json() {
    let meta = FakeMeta::start().await;
    meta.set_messaging_limit("TIER_2K");
    let dir = work_dir("doctor-cli");
    let run = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kabar"));
        command
            .args(args)
            .current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in meta_vars(&meta) {
            command.env(k, v);
        }
        command
            .env("META_WA_BUSINESS_ACCOUNT_ID", WABA_ID)
            .env("META_APP_SECRET", "app-secret-for-tests");
        tokio::task::block_in_place(|| command.output().unwrap())
    };
    let out = run(&["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(out.status.code(), Some(0));

    let out = run(&["templates", "status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("APPROVED").count(), 7, "{text}");

    meta.graph(|g| g.templates.retain(|t| t.name != "access_opened"));
    let out = run(&["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL  template.access_opened"), "{text}");
    let out = run(&["templates", "push", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("would create access_opened"));
    assert!(meta.graph(|g| g.creations.is_empty()));
    let out = run(&["templates", "push"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(meta.graph(|g| g.creations.len()), 1);
}

#[tokio::test]
async fn a_list_that_never_ends_is_an_error_and_an_unlisted_template_is_not_created_twice() {
    let meta = FakeMeta::start().await;
    meta.set_messaging_limit("TIER_2K");
    meta.graph(|g| g.endless_paging = true);
    let config = config_for(&meta.url(), None, &[]);
    let report = doctor::run(&config).await;
    let templates = report.checks.iter().find(|c| c.id == "templates").unwrap();
    assert_eq!(templates.verdict, Verdict::Unknown, "{templates:?}");
    assert!(templates.found.contains("repeats a page"), "{templates:?}");
    let client = kabar::whatsapp::MetaClient::new(config.meta.as_ref().unwrap()).unwrap();
    assert!(
        templates::push(&client, WABA_ID, &config.templates, config.otp.ttl, false)
            .await
            .is_err()
    );
    assert!(
        meta.graph(|g| g.creations.is_empty()),
        "nothing created from a partial list"
    );

    // Meta holds a template its list left out: the creation is refused as existing, and push
    // says it exists rather than failed.
    meta.graph(|g| {
        g.endless_paging = false;
        g.unlisted.push("access_opened".into());
    });
    let lines = templates::push(&client, WABA_ID, &config.templates, config.otp.ttl, false)
        .await
        .unwrap();
    let line = lines.iter().find(|l| l.key == "access_opened").unwrap();
    assert!(matches!(line.pushed, Pushed::Exists { .. }), "{line:?}");
    assert_eq!(meta.graph(|g| g.templates.len()), 7);
}
