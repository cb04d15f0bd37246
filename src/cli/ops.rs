//! `kabar doctor` and `kabar templates status|push`: the operator's setup commands. They read
//! the same configuration as `kabar serve` and ask Meta's Graph API directly.

use std::process::ExitCode;

use kabar::{
    config::{Config, DriverKind},
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
            println!(
                "{:<22} {:<28} {:<6} {:<10} {note}",
                c.key, c.name, c.language, state
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
            println!("{text}");
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
