//! Configuration is validated at start: each problem names its variable; secrets never print.

use std::collections::HashMap;

use kabar::config::{Config, DriverKind};

fn load(pairs: &[(&str, &str)]) -> Result<Config, kabar::config::ConfigError> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_source(&map)
}

#[test]
fn nothing_configured_is_the_development_setup() {
    let config = load(&[]).expect("embedded defaults are valid");
    assert_eq!(config.driver, DriverKind::Log);
    assert_eq!(config.grpc_addr.to_string(), "127.0.0.1:50051");
    assert_eq!(config.http_addr.to_string(), "127.0.0.1:8080");
    assert!(config.redis_url.is_none());
    assert_eq!(config.otp.ttl.as_secs(), 300);
    assert_eq!(config.otp.code_length, 6);
    assert_eq!(config.otp.allowed_countries, vec![62]);
    let warnings = config.warnings.join("\n");
    assert!(warnings.contains("WHATSAPP_DRIVER=log"), "{warnings}");
    assert!(warnings.contains("REDIS_URL"), "{warnings}");
    assert!(warnings.contains("batch runs"), "{warnings}");
    assert_eq!(config.batch.concurrency, 512);
    assert_eq!(config.batch.claim_timeout.as_secs(), 60);
    assert!(warnings.contains("KABAR_OTP_SECRET"), "{warnings}");
}

/// Variables set, the variable the error must name, and words it must contain.
type ConfigCase = (
    Vec<(&'static str, &'static str)>,
    &'static str,
    &'static str,
);

#[test]
fn each_problem_names_its_variable() {
    let secret = "0123456789abcdef0123456789abcdef";
    let cases: Vec<ConfigCase> = vec![
        (
            vec![
                ("WHATSAPP_DRIVER", "meta"),
                ("META_WA_PHONE_NUMBER_ID", "1"),
            ],
            "WHATSAPP_API_KEY",
            "required",
        ),
        (
            vec![("WHATSAPP_DRIVER", "meta"), ("WHATSAPP_API_KEY", "t")],
            "META_WA_PHONE_NUMBER_ID",
            "required",
        ),
        (
            vec![("WHATSAPP_DRIVER", "twilio")],
            "WHATSAPP_DRIVER",
            "meta or log",
        ),
        (
            vec![("KABAR_META_MAX_MPS", "0")],
            "KABAR_META_MAX_MPS",
            "from 1 to 100000",
        ),
        (
            vec![("KABAR_BATCH_CONCURRENCY", "0")],
            "KABAR_BATCH_CONCURRENCY",
            "from 1 to 10000",
        ),
        (
            vec![("KABAR_BATCH_CLAIM_TIMEOUT_SECONDS", "3")],
            "KABAR_BATCH_CLAIM_TIMEOUT_SECONDS",
            "from 4 to 3600",
        ),
        (
            vec![("KABAR_META_MAX_MPS", "80/s")],
            "KABAR_META_MAX_MPS",
            "whole number",
        ),
        (
            vec![("KABAR_PAIR_INTERVAL_SECONDS", "-1")],
            "KABAR_PAIR_INTERVAL_SECONDS",
            "from 0 to 3600",
        ),
        (
            vec![("KABAR_META_DAILY_LIMIT", "0")],
            "KABAR_META_DAILY_LIMIT",
            "unlimited",
        ),
        (
            vec![("KABAR_META_DAILY_LIMIT", "TIER_2K")],
            "KABAR_META_DAILY_LIMIT",
            "unset to read it from Meta",
        ),
        (
            vec![("KABAR_PACING_REPLICAS", "0")],
            "KABAR_PACING_REPLICAS",
            "from 1 to 1000",
        ),
        (
            vec![("KABAR_PACING_MAX_WAIT_SECONDS", "600")],
            "KABAR_PACING_MAX_WAIT_SECONDS",
            "from 0 to 60",
        ),
        (
            vec![("WHATSAPP_ENABLED", "maybe")],
            "WHATSAPP_ENABLED",
            "true or false",
        ),
        (
            vec![("META_WA_PHONE_NUMBER_ID", "+62 812")],
            "META_WA_PHONE_NUMBER_ID",
            "numeric",
        ),
        (
            vec![("META_GRAPH_API_URL", "graph.facebook.com")],
            "META_GRAPH_API_URL",
            "URL",
        ),
        (
            vec![("META_GRAPH_API_VERSION", "24")],
            "META_GRAPH_API_VERSION",
            "v24.0",
        ),
        (
            vec![("KABAR_GRPC_ADDR", "localhost")],
            "KABAR_GRPC_ADDR",
            "address",
        ),
        (
            vec![("KABAR_HTTP_ADDR", ":8080")],
            "KABAR_HTTP_ADDR",
            "address",
        ),
        (
            vec![("KABAR_LOG_FORMAT", "xml")],
            "KABAR_LOG_FORMAT",
            "text or json",
        ),
        (
            vec![("REDIS_URL", "redis://127.0.0.1:6379")],
            "KABAR_OTP_SECRET",
            "required when REDIS_URL",
        ),
        (
            vec![("REDIS_URL", "not a url"), ("KABAR_OTP_SECRET", secret)],
            "REDIS_URL",
            "URL",
        ),
        (
            vec![("KABAR_OTP_SECRET", "short")],
            "KABAR_OTP_SECRET",
            "32 bytes",
        ),
        (
            vec![("KABAR_OTP_SECRET_FILE", "/nonexistent/kabar-secret")],
            "KABAR_OTP_SECRET_FILE",
            "cannot read",
        ),
        (
            vec![("KABAR_OTP_TTL_SECONDS", "five")],
            "KABAR_OTP_TTL_SECONDS",
            "whole number",
        ),
        (
            vec![("KABAR_OTP_CODE_LENGTH", "3")],
            "KABAR_OTP_CODE_LENGTH",
            "4 to 10",
        ),
        (
            vec![("KABAR_OTP_CODE_LENGTH", "11")],
            "KABAR_OTP_CODE_LENGTH",
            "4 to 10",
        ),
        (
            vec![("KABAR_OTP_MAX_ATTEMPTS", "0")],
            "KABAR_OTP_MAX_ATTEMPTS",
            "from 1",
        ),
        (
            vec![("KABAR_OTP_TEMPLATE", "invoice_notification")],
            "KABAR_OTP_TEMPLATE",
            "AUTHENTICATION",
        ),
        (
            vec![("KABAR_OTP_TEMPLATE", "nope")],
            "KABAR_OTP_TEMPLATE",
            "not in the registry",
        ),
        (
            vec![("KABAR_OTP_ALLOWED_COUNTRIES", "62,indonesia")],
            "KABAR_OTP_ALLOWED_COUNTRIES",
            "country calling codes",
        ),
        (
            vec![("KABAR_OTP_TEST_NUMBERS", "6281100000001")],
            "KABAR_OTP_TEST_NUMBERS",
            "6281100000001=123456",
        ),
        (
            vec![("KABAR_OTP_TEST_NUMBERS", "6281100000001=12")],
            "KABAR_OTP_TEST_NUMBERS",
            "6 digits",
        ),
        (
            vec![("KABAR_OTP_TEST_NUMBERS", "12345=123456")],
            "KABAR_OTP_TEST_NUMBERS",
            "12345",
        ),
        (
            vec![("KABAR_TEMPLATES", "/nonexistent/templates.toml")],
            "KABAR_TEMPLATES",
            "cannot read",
        ),
        (
            vec![("KABAR_META_MAX_ATTEMPTS", "5")],
            "KABAR_META_MAX_ATTEMPTS",
            "1 to 3",
        ),
    ];
    for (pairs, var, words) in cases {
        let error = load(&pairs)
            .err()
            .unwrap_or_else(|| panic!("{pairs:?} must fail"));
        assert_eq!(error.var, var, "{pairs:?}: {error}");
        let line = error.to_string();
        assert!(line.starts_with(&format!("{var}: ")), "{line}");
        assert!(
            line.contains(words),
            "{pairs:?}: {line:?} should mention {words:?}"
        );
        assert!(!line.contains('\n'), "one line: {line:?}");
    }
}

#[test]
fn bad_template_registry_files_are_refused() {
    let dir = std::env::temp_dir().join(format!("kabar-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "[templates.welcome]\nparams = [\"nama\"]\n",
            "needs a category",
        ),
        (
            "[templates.welcome]\ncategory = \"UTILITY\"\n",
            "needs params",
        ),
        (
            "[templates.access_opened]\nname = \"Akses Dibuka\"\n",
            "lowercase",
        ),
        (
            "[templates.access_opened]\nlanguage = \"Bahasa\"\n",
            "language",
        ),
        (
            "[templates.access_opened]\nparams = [\"nama\", \"nama\"]\n",
            "distinct",
        ),
        (
            "[templates.otp_code]\nparams = [\"a\", \"b\"]\n",
            "exactly one parameter",
        ),
        ("[templates.access_opened]\nnmae = \"x\"\n", "nmae"),
        ("[templates.access_opened\n", "TOML"),
    ];
    for (i, (text, words)) in cases.iter().enumerate() {
        let path = dir.join(format!("t{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let error = load(&[("KABAR_TEMPLATES", path.to_str().unwrap())])
            .err()
            .unwrap_or_else(|| panic!("{text:?} must fail"));
        assert_eq!(error.var, "KABAR_TEMPLATES");
        let line = error.to_string();
        assert!(
            line.to_lowercase().contains(&words.to_lowercase()) || *words == "TOML",
            "{text:?}: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn secrets_never_appear_in_errors_or_debug() {
    let token = "EAAsecretTOKEN1234567890";
    let otp_secret = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t!";
    let redis_password = "hunter2hunter2";
    let config = load(&[
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", token),
        ("META_WA_PHONE_NUMBER_ID", "106540352242922"),
        ("KABAR_OTP_SECRET", otp_secret),
        (
            "REDIS_URL",
            &format!("redis://:{redis_password}@127.0.0.1:6379/0"),
        ),
        ("KABAR_OTP_TEST_NUMBERS", "6281100000001=135790"),
        ("META_APP_SECRET", "appsecret-appsecret"),
        ("META_WA_WEBHOOK_VERIFY_TOKEN", "verify-me-token"),
    ])
    .expect("valid");
    let debug = format!("{config:?}");
    let client = kabar::whatsapp::MetaClient::new(config.meta.as_ref().unwrap()).unwrap();
    let client_debug = format!("{client:?}");
    for secret in [
        token,
        otp_secret,
        redis_password,
        "135790",
        "appsecret",
        "verify-me",
    ] {
        assert!(
            !debug.contains(secret),
            "Config Debug leaks {secret}: {debug}"
        );
        assert!(
            !client_debug.contains(secret),
            "MetaClient Debug leaks {secret}"
        );
    }

    // A token with a space is refused without echoing it.
    let error = load(&[
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", "Bearer EAAsecretTOKEN"),
        ("META_WA_PHONE_NUMBER_ID", "1"),
    ])
    .err()
    .unwrap();
    assert_eq!(error.var, "WHATSAPP_API_KEY");
    assert!(!error.to_string().contains("EAAsecretTOKEN"));
}

#[test]
fn secrets_can_come_from_files() {
    let dir = std::env::temp_dir().join(format!("kabar-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("otp_secret");
    std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
    let config = load(&[
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("KABAR_OTP_SECRET_FILE", path.to_str().unwrap()),
    ])
    .expect("secret from file");
    assert!(config.otp.secret.is_some());
    let both = load(&[
        ("KABAR_OTP_SECRET", "0123456789abcdef0123456789abcdef"),
        ("KABAR_OTP_SECRET_FILE", path.to_str().unwrap()),
    ])
    .err()
    .unwrap();
    assert_eq!(both.var, "KABAR_OTP_SECRET");
    let _ = std::fs::remove_dir_all(dir);
}
