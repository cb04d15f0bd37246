//! `kabar doctor` and `kabar templates status|push`: the operator's setup commands. They read
//! the same configuration as `kabar serve` and ask Meta's Graph API directly.

use std::process::ExitCode;

use kabar::{
    config::{Config, DriverKind},
    domain::error::escape_unsafe,
    ops::{
        doctor,
        lint::Severity,
        templates::{self, Pushed, Standing},
    },
    whatsapp::MetaClient,
};

/// Exit codes: 0 all good, 1 something needs attention (or Meta could not be asked), 2 the
/// configuration does not allow the command.
const NEEDS_ATTENTION: u8 = 1;
const CONFIGURATION: u8 = 2;

fn json_line<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports always serialise")
    );
}

pub async fn doctor(config: &Config, json: bool) -> ExitCode {
    let report = doctor::run(config).await;
    if json {
        json_line(&report);
    } else {
        print!("{}", doctor::render(&report));
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(NEEDS_ATTENTION)
    }
}

/// The Graph API client and business account the template commands need.
fn meta_of(config: &Config) -> Result<(MetaClient, String), String> {
    let (DriverKind::Meta, Some(settings)) = (&config.driver, &config.meta) else {
        return Err(
            "WHATSAPP_DRIVER is log: set WHATSAPP_DRIVER=meta with WHATSAPP_API_KEY and \
             META_WA_PHONE_NUMBER_ID"
                .into(),
        );
    };
    let Some(waba) = config.business_account_id.clone() else {
        return Err(
            "META_WA_BUSINESS_ACCOUNT_ID is required: templates belong to the WhatsApp Business \
             Account (WhatsApp Manager > Account tools)"
                .into(),
        );
    };
    Ok((MetaClient::new(settings)?, waba))
}

pub async fn templates_status(config: &Config, json: bool) -> ExitCode {
    let (meta, waba) = match meta_of(config) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kabar templates status: {e}");
            return ExitCode::from(CONFIGURATION);
        }
    };
    let at_meta = match templates::fetch(&meta, &waba).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kabar templates status: the templates could not be read: {e}");
            return ExitCode::from(NEEDS_ATTENTION);
        }
    };
    let compared = templates::compare_all(&config.templates, &at_meta);
    if json {
        json_line(&compared);
    } else {
        for c in &compared {
            let (state, note) = match &c.standing {
                Standing::Ready => ("APPROVED".to_owned(), String::new()),
                Standing::Pending => ("PENDING".to_owned(), "waiting for Meta's review".into()),
                Standing::Missing { other_languages } if other_languages.is_empty() => (
                    "MISSING".to_owned(),
                    "not at Meta: `kabar templates push` creates it".into(),
                ),
                Standing::Missing { other_languages } => (
                    "MISSING".to_owned(),
                    format!("only in {}", other_languages.join(", ")),
                ),
                Standing::Wrong { status, problem } => (status.clone(), problem.clone()),
            };
            // Meta's words may hold terminal escapes: shown escaped.
            println!(
                "{:<22} {:<28} {:<6} {:<10} {}",
                c.key,
                c.name,
                c.language,
                escape_unsafe(&state),
                escape_unsafe(&note)
            );
        }
    }
    if compared.iter().all(|c| c.standing == Standing::Ready) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(NEEDS_ATTENTION)
    }
}

pub async fn templates_push(config: &Config, dry_run: bool, json: bool) -> ExitCode {
    let (meta, waba) = match meta_of(config) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kabar templates push: {e}");
            return ExitCode::from(CONFIGURATION);
        }
    };
    let lines =
        match templates::push(&meta, &waba, &config.templates, config.otp.ttl, dry_run).await {
            Ok(lines) => lines,
            Err(e) => {
                eprintln!(
                    "kabar templates push: Meta could not be asked: {e}\nWhat was created before \
                     this stays; run the command again to create the rest."
                );
                return ExitCode::from(NEEDS_ATTENTION);
            }
        };
    let mut ok = true;
    if json {
        json_line(&lines);
    }
    for line in &lines {
        let what = format!("{} ({}, {})", line.key, line.name, line.language);
        let text = match &line.pushed {
            Pushed::Exists { status } => format!("exists      {what}: {status}"),
            Pushed::Created { id, status } => format!("created     {what}: id {id}, {status}"),
            Pushed::WouldCreate { request } => {
                format!("would create {what}:\n{request:#}")
            }
            Pushed::Refused { findings } => {
                ok = false;
                let mut text = format!("not sent    {what}: fix first:");
                for f in findings {
                    text.push_str(&format!("\n    - {}", f.problem));
                }
                text
            }
            Pushed::Failed { code, reason } => {
                ok = false;
                format!("refused     {what}: Meta error {code}: {reason}")
            }
        };
        if !json {
            // Meta's words may hold terminal escapes (line breaks of our own are kept).
            for line in text.lines() {
                println!("{}", escape_unsafe(line));
            }
            for w in line
                .warnings
                .iter()
                .filter(|w| w.severity == Severity::Warning)
            {
                println!("    warning: {}", w.problem);
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(NEEDS_ATTENTION)
    }
}

/// `kabar status`: the connection status of a running kabar, from `GET /status` on its HTTP
/// port (`--addr`, else `KABAR_HTTP_ADDR` from the environment or `./.env`, else the default).
pub async fn status(addr: Option<String>, json: bool) -> ExitCode {
    use kabar::config::{Environment, Source};
    let addr = addr
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .or_else(|| match Environment::load() {
            Ok(env) => env.get("KABAR_HTTP_ADDR"),
            Err(_) => std::env::var("KABAR_HTTP_ADDR").ok(),
        })
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        format!("{}/status", addr.trim_end_matches('/'))
    } else {
        format!("http://{addr}/status")
    };
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kabar status: {e}");
            return ExitCode::from(NEEDS_ATTENTION);
        }
    };
    let answer = match client.get(&url).send().await {
        Ok(r) => read_json(r).await,
        Err(e) => {
            eprintln!(
                "kabar status: cannot reach kabar at {url}: {e}\nIs `kabar serve` running? Give \
                 its HTTP address with --addr or KABAR_HTTP_ADDR."
            );
            return ExitCode::from(NEEDS_ATTENTION);
        }
    };
    let s = match answer {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kabar status: {url} did not answer with the status: {e}");
            return ExitCode::from(NEEDS_ATTENTION);
        }
    };
    if json {
        json_line(&s);
    } else {
        print!("{}", render_status(&s));
    }
    ExitCode::SUCCESS
}

/// Most bytes of `/status` read: it is a few hundred; anything longer is not kabar's answer.
const MAX_STATUS_BYTES: usize = 1024 * 1024;

async fn read_json(mut response: reqwest::Response) -> Result<serde_json::Value, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_STATUS_BYTES {
            return Err(format!(
                "the answer is over {} KiB",
                MAX_STATUS_BYTES / 1024
            ));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// The status as a few lines for a terminal.
fn render_status(s: &serde_json::Value) -> String {
    // Meta's words (names, error details) may hold terminal escapes: shown escaped.
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "unknown".to_owned(),
        serde_json::Value::String(t) => kabar::domain::error::escape_unsafe(t),
        other => kabar::domain::error::escape_unsafe(&other.to_string()),
    };
    let ago = |v: &serde_json::Value| match v.as_u64() {
        Some(s) => format!("{s} s ago"),
        None => "never".to_owned(),
    };
    let n = &s["number"];
    let mut out = format!(
        "driver      {}\nnumber      {} {} ({})\nstate       {}, quality {}, limit {}, throughput {}\n",
        text(&s["driver"]),
        text(&n["display_phone_number"]),
        text(&n["verified_name"]),
        text(&n["phone_number_id"]),
        text(&n["status"]),
        text(&n["quality_rating"]),
        text(&n["messaging_limit"]),
        text(&n["throughput"]),
    );
    out.push_str(&format!("checked     {}\n", ago(&n["checked_seconds_ago"])));
    if !n["check_error"].is_null() {
        out.push_str(&format!(
            "            last check failed: {}\n",
            text(&n["check_error"])
        ));
    }
    out.push_str(&format!(
        "last send   {}\n",
        ago(&s["last_success_seconds_ago"])
    ));
    let e = &s["last_error"];
    if !e.is_null() {
        out.push_str(&format!(
            "last error  Meta {} {}: {}\n            -> {}\n",
            text(&e["code"]),
            text(&e["reason"]),
            text(&e["details"]),
            text(&e["remedy"])
        ));
    }
    out.push_str(&format!(
        "store       {} ({})\nbatches     {} active, {} items in hand\n",
        text(&s["store"]["kind"]),
        if s["store"]["reachable"] == true {
            "reachable"
        } else {
            "UNREACHABLE"
        },
        text(&s["batches"]["active"]),
        text(&s["batches"]["items_in_hand"]),
    ));
    out
}
