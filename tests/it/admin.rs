//! Runtime settings (`AdminService`): the `admin` scope; the WhatsApp switch reaching another
//! replica on the same Redis within 2 s (and a replica started later); template name and
//! language overrides reaching Meta for SendTemplate, SendOtp and batch items, and clearing them;
//! invalid and stale changes applying nothing; the caller's name kept with each change.

use std::time::{Duration, Instant};

use kabar::{
    domain::auth::new_key,
    pb::{
        GetSettingsRequest, SendOtpRequest, Settings, TemplateSettingsUpdate,
        UpdateSettingsRequest, admin_service_client::AdminServiceClient, batch::State,
        settings::Source as SettingSource,
    },
};
use tonic::{Code, Request, transport::Channel};

use crate::{
    batch::{submit, wait_state},
    send_template::invoice_request,
    support::{
        FakeMeta, RedisServer, SERVING, TestApp, error_info, eventually, meta_vars, store_vars,
        violated_fields,
    },
};

/// A key file with `(name, key, scopes)` entries (see `auth::key_file`); its path as text.
fn key_file(entries: &[(&str, &str, &[&str])]) -> String {
    crate::auth::key_file(entries).display().to_string()
}

fn with_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

fn admin(app: &TestApp) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(app.channel.clone())
}

async fn settings(app: &TestApp, key: Option<&str>) -> Settings {
    admin(app)
        .get_settings(with_key(GetSettingsRequest {}, key))
        .await
        .expect("GetSettings answers")
        .into_inner()
}

async fn update(
    app: &TestApp,
    key: Option<&str>,
    request: UpdateSettingsRequest,
) -> Result<Settings, tonic::Status> {
    admin(app)
        .update_settings(with_key(request, key))
        .await
        .map(tonic::Response::into_inner)
}

fn switch(on: bool) -> UpdateSettingsRequest {
    UpdateSettingsRequest {
        whatsapp_enabled: Some(on),
        ..Default::default()
    }
}

fn template(key: &str, name: Option<&str>, language: Option<&str>) -> UpdateSettingsRequest {
    UpdateSettingsRequest {
        templates: [(
            key.to_owned(),
            TemplateSettingsUpdate {
                name: name.map(str::to_owned),
                language: language.map(str::to_owned),
            },
        )]
        .into(),
        ..Default::default()
    }
}

/// The template name and language of the last message Meta received.
fn last_sent(meta: &FakeMeta) -> (String, String) {
    let received = meta.received();
    let body = &received.last().expect("Meta received a message").body;
    (
        body["template"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        body["template"]["language"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// `(value, source)` of a template's name and language in `settings`.
fn template_view(settings: &Settings, key: &str) -> ((String, i32), (String, i32)) {
    let t = &settings.templates[key];
    let name = t.name.as_ref().unwrap();
    let language = t.language.as_ref().unwrap();
    (
        (name.value.clone(), name.source),
        (language.value.clone(), language.source),
    )
}

const ENVIRONMENT: i32 = SettingSource::Environment as i32;
const RUNTIME: i32 = SettingSource::Runtime as i32;

#[tokio::test]
async fn settings_need_the_admin_scope() {
    let meta = FakeMeta::start().await;
    let panel = new_key();
    let billing = new_key();
    let file = key_file(&[
        ("panel", &panel, &["admin"]),
        ("billing", &billing, &["notify", "status", "otp"]),
    ]);
    let mut vars = meta_vars(&meta);
    vars.push(("KABAR_API_KEYS_FILE".into(), file));
    let app = TestApp::start(vars).await;
    assert_eq!(app.health_status("kabar.v1.AdminService").await, SERVING);

    for key in [None, Some("kabar_not-a-key")] {
        let e = admin(&app)
            .get_settings(with_key(GetSettingsRequest {}, key))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = update(&app, key, switch(false)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let e = admin(&app)
        .get_settings(with_key(GetSettingsRequest {}, Some(&billing)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = update(&app, Some(&billing), switch(false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let (reason, metadata) = error_info(&e).unwrap();
    assert_eq!(
        (reason.as_str(), metadata["scope"].as_str()),
        ("MISSING_SCOPE", "admin")
    );
    // The refused change did nothing.
    let now = settings(&app, Some(&panel)).await;
    assert_eq!(now.revision, 0);
    assert!(now.whatsapp_enabled.unwrap().value);
    // The admin key is for settings only.
    let e = app
        .notifications()
        .send_template(with_key(invoice_request(), Some(&panel)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(meta.count(), 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_switch_reaches_every_replica_on_the_same_redis_within_2_s() {
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    let panel = new_key();
    let billing = new_key();
    let file = key_file(&[
        ("panel", &panel, &["admin"]),
        ("billing", &billing, &["notify", "otp"]),
    ]);
    let replica_vars = || {
        let mut vars = meta_vars(&meta);
        vars.extend(store_vars(Some(&redis)));
        vars.push(("KABAR_API_KEYS_FILE".into(), file.clone()));
        vars
    };
    let a = TestApp::start(replica_vars()).await;
    let b = TestApp::start(replica_vars()).await;
    let send_on = |app: &TestApp| {
        let mut client = app.notifications();
        let billing = billing.clone();
        async move {
            client
                .send_template(with_key(invoice_request(), Some(&billing)))
                .await
        }
    };
    send_on(&b).await.expect("WhatsApp is on");

    // Off on A, compare-and-set on the revision that was read.
    let before = settings(&a, Some(&panel)).await;
    let mut off = switch(false);
    off.expected_revision = Some(before.revision);
    let changed = update(&a, Some(&panel), off).await.unwrap();
    let at = Instant::now();
    let enabled = changed.whatsapp_enabled.unwrap();
    assert_eq!(
        (enabled.value, enabled.source, enabled.environment_value),
        (false, RUNTIME, true)
    );
    assert_eq!(changed.revision, before.revision + 1);
    assert_eq!(changed.changed_by, "panel");
    assert!(changed.changed_at.is_some());
    // A refuses at once; B within 2 s.
    let e = send_on(&a).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&e).unwrap().0, "WHATSAPP_DISABLED");
    let refused = eventually(Duration::from_secs(2), || async {
        matches!(send_on(&b).await, Err(e) if e.code() == Code::FailedPrecondition)
    })
    .await;
    assert!(refused, "B still sends {:?} after the switch", at.elapsed());
    let sent = meta.count();
    // SendOtp honours the switch too.
    let e = b
        .otp()
        .send_otp(with_key(
            SendOtpRequest {
                phone: "0812-3456-7890".into(),
                ..Default::default()
            },
            Some(&billing),
        ))
        .await
        .unwrap_err();
    assert_eq!(error_info(&e).unwrap().0, "WHATSAPP_DISABLED");
    assert_eq!(meta.count(), sent, "nothing was sent while off");

    // B shows what A changed, and who; so does the stored document.
    let seen = settings(&b, Some(&panel)).await;
    assert_eq!(seen.revision, changed.revision);
    assert_eq!(seen.changed_by, "panel");
    assert_eq!(seen.whatsapp_enabled.unwrap().source, RUNTIME);
    let mut con = redis.connection().await;
    let doc: String = redis::cmd("HGET")
        .arg("kabar:settings")
        .arg("doc")
        .query_async(&mut con)
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["changed_by"], "panel");
    assert!(!doc.to_string().contains(&panel), "no key in the document");

    // A replica started now starts with WhatsApp off.
    let c = TestApp::start(replica_vars()).await;
    let e = send_on(&c).await.unwrap_err();
    assert_eq!(error_info(&e).unwrap().0, "WHATSAPP_DISABLED");

    // Back to the environment, from B: A sends again within 2 s.
    let cleared = update(
        &b,
        Some(&panel),
        UpdateSettingsRequest {
            clear_whatsapp_enabled: true,
            expected_revision: Some(changed.revision),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let enabled = cleared.whatsapp_enabled.unwrap();
    assert_eq!((enabled.value, enabled.source), (true, ENVIRONMENT));
    let sends = eventually(Duration::from_secs(2), || async {
        send_on(&a).await.is_ok()
    })
    .await;
    assert!(sends, "A does not send after the switch went back on");
    let sends = eventually(Duration::from_secs(2), || async {
        send_on(&c).await.is_ok()
    })
    .await;
    assert!(sends, "C does not send after the switch went back on");
    assert_eq!(meta.count(), sent + 2);

    // A document written into Redis by anything but kabar (or corrupted) is never put in force:
    // here it would switch WhatsApp off with a forged name and a broken template; then one far
    // too big. The replicas keep the settings in force (WhatsApp on) and go on sending.
    let forged = serde_json::json!({
        "revision": cleared.revision + 5,
        "changed_by": "evil\n2026-11-30 INFO kabar: forged line",
        "whatsapp_enabled": false,
        "templates": {"invoice_notification": {"name": "BAD NAME\nwith newline", "language": "zz-!!"}}
    });
    let oversized = serde_json::json!({
        "revision": cleared.revision + 6,
        "changed_by": "x".repeat(400 * 1024),
        "whatsapp_enabled": false
    });
    for (rev, doc) in [
        (cleared.revision + 5, forged),
        (cleared.revision + 6, oversized),
    ] {
        let _: () = redis::cmd("HSET")
            .arg("kabar:settings")
            .arg("rev")
            .arg(rev)
            .arg("doc")
            .arg(doc.to_string())
            .query_async(&mut con)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for app in [&a, &b, &c] {
            send_on(app)
                .await
                .expect("a tampered document switched sending off");
        }
    }
    // The way back, as the README says: delete the key, and the environment applies.
    let _: () = redis::cmd("DEL")
        .arg("kabar:settings")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(settings(&a, Some(&panel)).await.revision, 0);
    for app in [a, b, c] {
        app.stop().await.unwrap();
    }
}

on_both_stores!(template_overrides_reach_meta_and_clear);

async fn template_overrides_reach_meta_and_clear(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(redis));
    let app = TestApp::start(vars).await;
    let mut n = app.notifications();

    let initial = settings(&app, None).await;
    assert_eq!(initial.templates.len(), 7, "every registry key is shown");
    assert_eq!(
        template_view(&initial, "invoice_notification"),
        (
            ("invoice_notification".to_owned(), ENVIRONMENT),
            ("id".to_owned(), ENVIRONMENT)
        )
    );

    let changed = update(
        &app,
        None,
        template(
            "invoice_notification",
            Some("tagihan_internet_v2"),
            Some("en_US"),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        template_view(&changed, "invoice_notification"),
        (
            ("tagihan_internet_v2".to_owned(), RUNTIME),
            ("en_US".to_owned(), RUNTIME)
        )
    );
    let name = changed.templates["invoice_notification"]
        .name
        .clone()
        .unwrap();
    assert_eq!(name.environment_value, "invoice_notification");
    assert_eq!(changed.changed_by, "", "keys are off: no caller name");
    n.send_template(invoice_request()).await.unwrap();
    assert_eq!(
        last_sent(&meta),
        ("tagihan_internet_v2".to_owned(), "en_US".to_owned())
    );
    // A request's own language still wins.
    let mut own = invoice_request();
    own.language = "id".into();
    n.send_template(own).await.unwrap();
    assert_eq!(
        last_sent(&meta),
        ("tagihan_internet_v2".to_owned(), "id".to_owned())
    );
    // Batch items take the settings in force.
    app.batches()
        .submit_batch(submit("overrides", 0..1, true))
        .await
        .unwrap();
    wait_state(&app, "overrides", State::Done, Duration::from_secs(10)).await;
    assert_eq!(
        last_sent(&meta),
        ("tagihan_internet_v2".to_owned(), "en_US".to_owned())
    );

    // Clearing the name: the registry's name again, the language stays overridden.
    update(&app, None, template("invoice_notification", Some(""), None))
        .await
        .unwrap();
    n.send_template(invoice_request()).await.unwrap();
    assert_eq!(
        last_sent(&meta),
        ("invoice_notification".to_owned(), "en_US".to_owned())
    );
    let cleared = update(&app, None, template("invoice_notification", None, Some("")))
        .await
        .unwrap();
    assert_eq!(
        template_view(&cleared, "invoice_notification"),
        (
            ("invoice_notification".to_owned(), ENVIRONMENT),
            ("id".to_owned(), ENVIRONMENT)
        )
    );
    assert_eq!(cleared.revision, 3);
    n.send_template(invoice_request()).await.unwrap();
    assert_eq!(
        last_sent(&meta),
        ("invoice_notification".to_owned(), "id".to_owned())
    );

    // The OTP template too.
    update(&app, None, template("otp_code", Some("kode_masuk"), None))
        .await
        .unwrap();
    app.otp()
        .send_otp(SendOtpRequest {
            phone: "0812-3456-7890".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(last_sent(&meta), ("kode_masuk".to_owned(), "id".to_owned()));
    app.stop().await.unwrap();
}

on_both_stores!(invalid_and_stale_changes_apply_nothing);

async fn invalid_and_stale_changes_apply_nothing(redis: Option<&RedisServer>) {
    let meta = FakeMeta::start().await;
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(redis));
    let app = TestApp::start(vars).await;
    let base = update(
        &app,
        None,
        template("payment_reminder", Some("pengingat"), None),
    )
    .await
    .unwrap();
    assert_eq!(base.revision, 1);

    let invalid = |request: UpdateSettingsRequest, fields: &'static [&'static str]| {
        let app = &app;
        async move {
            let e = update(app, None, request).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert_eq!(violated_fields(&e), fields, "{e:?}");
        }
    };
    invalid(
        template("welcome", Some("selamat_datang"), None),
        &["templates[welcome]"],
    )
    .await;
    invalid(
        template("invoice_notification", Some("Tagihan-V2"), None),
        &["templates[invoice_notification].name"],
    )
    .await;
    invalid(
        template("invoice_notification", Some(&"a".repeat(513)), None),
        &["templates[invoice_notification].name"],
    )
    .await;
    invalid(
        template("invoice_notification", None, Some("indonesian")),
        &["templates[invoice_notification].language"],
    )
    .await;
    // One bad field refuses the good ones with it.
    let mut mixed = template("invoice_notification", Some("tagihan_v2"), Some("en-US"));
    mixed.whatsapp_enabled = Some(false);
    mixed.templates.insert(
        "payment_reminder".into(),
        TemplateSettingsUpdate {
            name: Some("".into()),
            language: None,
        },
    );
    invalid(mixed, &["templates[invoice_notification].language"]).await;
    let mut both = switch(false);
    both.clear_whatsapp_enabled = true;
    invalid(both, &["clear_whatsapp_enabled"]).await;

    // A change based on an older revision.
    let mut stale = switch(false);
    stale.expected_revision = Some(0);
    let e = update(&app, None, stale).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let (reason, metadata) = error_info(&e).unwrap();
    assert_eq!(reason, "SETTINGS_REVISION_MISMATCH");
    assert_eq!(metadata["current_revision"], "1");

    let after = settings(&app, None).await;
    assert_eq!(after.revision, 1, "nothing was applied");
    assert!(after.whatsapp_enabled.unwrap().value);
    assert_eq!(
        template_view(&after, "payment_reminder").0,
        ("pengingat".to_owned(), RUNTIME)
    );
    assert_eq!(
        template_view(&after, "invoice_notification").0,
        ("invoice_notification".to_owned(), ENVIRONMENT)
    );
    app.notifications()
        .send_template(invoice_request())
        .await
        .unwrap();
    assert_eq!(
        last_sent(&meta),
        ("invoice_notification".to_owned(), "id".to_owned())
    );
    app.stop().await.unwrap();
}

/// A run paused by 132001 (the registry's name is not the approved one): the operator sets the
/// approved name and resumes, and the items already queued go out under it.
#[tokio::test]
async fn a_name_fixed_while_a_run_is_paused_reaches_its_queued_items() {
    let redis = RedisServer::start();
    let meta = FakeMeta::start().await;
    meta.push(crate::support::Reply::error(
        404,
        132001,
        "template name (invoice_notification) does not exist in id",
    ));
    let mut vars = meta_vars(&meta);
    vars.extend(store_vars(Some(&redis)));
    // One item at a time: the refusal pauses the run before any other item is sent.
    vars.push(("KABAR_BATCH_CONCURRENCY".into(), "1".into()));
    let app = TestApp::start(vars).await;
    let mut client = app.batches();
    client
        .submit_batch(submit("paused-run", 0..5, true))
        .await
        .unwrap();
    wait_state(&app, "paused-run", State::Paused, Duration::from_secs(10)).await;
    let refused = meta.count();
    assert_eq!(refused, 1);
    update(
        &app,
        None,
        template("invoice_notification", Some("tagihan_v2"), None),
    )
    .await
    .unwrap();
    client
        .resume_batch(crate::batch::get("paused-run"))
        .await
        .unwrap();
    let b = wait_state(&app, "paused-run", State::Done, Duration::from_secs(30)).await;
    assert_eq!((b.accepted, b.failed, b.unknown), (5, 0, 0), "{b:?}");
    let received = meta.received();
    assert_eq!(received.len(), refused + 5);
    for r in &received[refused..] {
        assert_eq!(r.body["template"]["name"], "tagihan_v2");
        assert_eq!(r.body["template"]["language"]["code"], "id");
    }
    app.stop().await.unwrap();
}
