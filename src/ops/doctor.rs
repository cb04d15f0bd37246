//! `kabar doctor`: Meta's setup checklist checked live with the configured credentials (token,
//! phone number, business verification, templates, webhook) and kabar's own (store, OTP secret,
//! key file). Each check says what it found and, when it is not right, what to do. Reading
//! Meta's answers into verdicts is pure ([`judge_permissions`], [`judge_number`], ...).

use serde::Serialize;
use serde_json::Value;

use crate::{
    config::{Config, DriverKind},
    domain::error::escape_unsafe,
    store::RedisStore,
    whatsapp::{MetaClient, SendError},
};

use super::templates::{self, Standing};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    /// Works, but worth the operator's attention.
    Warn,
    Fail,
    /// Could not be learned (Meta unreachable, an earlier check failed): counts as a failure.
    Unknown,
}

/// One line of the checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable id, e.g. `token`, `phone.status`, `template.invoice_notification`.
    pub id: String,
    pub verdict: Verdict,
    /// What was found.
    pub found: String,
    /// What to do about it (absent when it passes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

fn check(id: impl Into<String>, verdict: Verdict, found: impl Into<String>) -> Check {
    Check {
        id: id.into(),
        verdict,
        found: found.into(),
        remedy: None,
    }
}

impl Check {
    fn fix(mut self, remedy: impl Into<String>) -> Check {
        if self.verdict != Verdict::Pass {
            self.remedy = Some(remedy.into());
        }
        self
    }
}

/// The whole checklist. Passing means no check failed or stayed unknown; warnings pass.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub passed: bool,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(checks: Vec<Check>) -> Report {
        Report {
            passed: checks
                .iter()
                .all(|c| matches!(c.verdict, Verdict::Pass | Verdict::Warn)),
            checks,
        }
    }
}

/// What could not be learned from Meta, in words, with the remedy Meta's error suggests.
fn unknown(id: &str, what: &str, e: &SendError) -> Check {
    match e {
        SendError::Meta(f) => check(
            id,
            if f.meta_code == 0 {
                Verdict::Unknown
            } else {
                Verdict::Fail
            },
            format!(
                "{what}: Meta answered error {} ({})",
                f.meta_code, f.details
            ),
        )
        .fix(match f.meta_code {
            100 => "Meta does not know this ID, or the token cannot reach it: check the ID in \
                    WhatsApp Manager and that the System User has this asset assigned"
                .to_owned(),
            _ => f.remedy.clone(),
        }),
        other => check(id, Verdict::Unknown, format!("{what}: {other}")).fix(
            "Meta could not be asked: check the network path to META_GRAPH_API_URL and run \
             `kabar doctor` again",
        ),
    }
}

/// The two permissions kabar needs, from `GET /me/permissions`.
pub fn judge_permissions(answer: &Value) -> Check {
    let granted = |name: &str| {
        answer["data"].as_array().is_some_and(|d| {
            d.iter()
                .any(|p| p["permission"] == name && p["status"] == "granted")
        })
    };
    let missing: Vec<&str> = [
        "whatsapp_business_messaging",
        "whatsapp_business_management",
    ]
    .into_iter()
    .filter(|p| !granted(p))
    .collect();
    if missing.is_empty() {
        check(
            "token",
            Verdict::Pass,
            "the token works and has whatsapp_business_messaging and whatsapp_business_management",
        )
    } else {
        check(
            "token",
            Verdict::Fail,
            format!("the token works but lacks {}", missing.join(" and ")),
        )
        .fix(
            "Business Settings > System Users > Generate new token: tick \
             whatsapp_business_messaging and whatsapp_business_management, then put the token \
             in WHATSAPP_API_KEY",
        )
    }
}

/// The phone number's state, from `GET /{phone-number-id}`.
pub fn judge_number(n: &Value) -> Vec<Check> {
    let text = |k: &str| n[k].as_str().unwrap_or("").to_owned();
    let shown = match (text("display_phone_number"), text("verified_name")) {
        (number, name) if !name.is_empty() => format!("{number} ({name})"),
        (number, _) => number,
    };
    let mut checks = Vec::new();
    let status = text("status");
    let platform = text("platform_type");
    checks.push(
        match (status.as_str(), platform.as_str()) {
            ("CONNECTED", "CLOUD_API" | "") => check(
                "phone.registered",
                Verdict::Pass,
                format!("{shown} is connected to the Cloud API"),
            ),
            ("CONNECTED", other) => check(
                "phone.registered",
                Verdict::Fail,
                format!("{shown} is on {other}, not the Cloud API"),
            ),
            (other, _) => check(
                "phone.registered",
                Verdict::Fail,
                format!(
                    "{shown} has status {}",
                    if other.is_empty() { "unknown" } else { other }
                ),
            ),
        }
        .fix(
            "register the number on the Cloud API: POST /{phone-number-id}/register with its \
             two-step PIN (WhatsApp Manager > Phone numbers)",
        ),
    );
    let name_status = text("name_status");
    checks.push(
        match name_status.as_str() {
            "APPROVED" | "AVAILABLE_WITHOUT_REVIEW" => check(
                "phone.name",
                Verdict::Pass,
                format!("display name approved ({name_status})"),
            ),
            "PENDING_REVIEW" | "" => check(
                "phone.name",
                Verdict::Warn,
                format!(
                    "display name {}",
                    if name_status.is_empty() {
                        "state unknown".to_owned()
                    } else {
                        "waiting for review".to_owned()
                    }
                ),
            ),
            other => check("phone.name", Verdict::Fail, format!("display name {other}")),
        }
        .fix(
            "WhatsApp Manager > Phone numbers > the number > Edit display name: use the \
             business's real name as on its documents",
        ),
    );
    let quality = text("quality_rating");
    checks.push(
        match quality.as_str() {
            "GREEN" => check("phone.quality", Verdict::Pass, "quality rating GREEN"),
            "RED" => check("phone.quality", Verdict::Fail, "quality rating RED"),
            other => check(
                "phone.quality",
                Verdict::Warn,
                format!(
                    "quality rating {}",
                    if other.is_empty() { "unknown" } else { other }
                ),
            ),
        }
        .fix(
            "customers are blocking or reporting messages: send only what they expect, check \
             template quality in WhatsApp Manager; a RED number is limited by Meta",
        ),
    );
    let throughput = n["throughput"]["level"].as_str().unwrap_or("unknown");
    checks.push(check(
        "phone.throughput",
        Verdict::Pass,
        format!(
            "throughput {throughput}{}",
            match throughput {
                "STANDARD" => " (80 messages/s)",
                "HIGH" => " (1,000 messages/s)",
                _ => "",
            }
        ),
    ));
    checks
}

/// The messaging limit (`whatsapp_business_manager_messaging_limit`).
pub fn judge_limit(tier: &str) -> Check {
    let verdict = if tier == "TIER_250" {
        Verdict::Warn
    } else {
        Verdict::Pass
    };
    check(
        "phone.limit",
        verdict,
        format!("messaging limit {tier} (unique customers per 24 h)"),
    )
    .fix(
        "TIER_250 allows 250 customers a day: verify the business and keep quality high so Meta \
         raises it; kabar holds sends past the limit (KABAR_META_DAILY_LIMIT)",
    )
}

/// The business account, from `GET /{waba-id}`.
pub fn judge_business(waba: &Value) -> Vec<Check> {
    let verification = waba["business_verification_status"]
        .as_str()
        .unwrap_or("")
        .to_lowercase();
    let review = waba["account_review_status"].as_str().unwrap_or("");
    let name = waba["name"].as_str().unwrap_or("");
    vec![
        match verification.as_str() {
            "verified" => check(
                "business.verification",
                Verdict::Pass,
                format!("business {name} is verified"),
            ),
            "" => check(
                "business.verification",
                Verdict::Warn,
                "business verification state not reported",
            ),
            "rejected" | "failed" | "revoked" | "expired" | "ineligible" => check(
                "business.verification",
                Verdict::Fail,
                format!("business verification {verification}"),
            ),
            other => check(
                "business.verification",
                Verdict::Warn,
                format!("business verification {other}"),
            ),
        }
        .fix(
            "Business Settings > Security Center > Start verification (legal name, address, \
             NPWP or NIB documents); unverified businesses stay at 250 customers a day",
        ),
        match review {
            "APPROVED" | "" => check(
                "business.review",
                Verdict::Pass,
                format!(
                    "account review {}",
                    if review.is_empty() {
                        "not reported"
                    } else {
                        "approved"
                    }
                ),
            ),
            "PENDING" => check("business.review", Verdict::Warn, "account review pending"),
            other => check(
                "business.review",
                Verdict::Fail,
                format!("account review {other}"),
            ),
        }
        .fix("WhatsApp Manager > Account overview: see why the account was not approved"),
    ]
}

/// The app's subscription to the business account's webhooks, from `GET /{waba}/subscribed_apps`.
pub fn judge_subscription(answer: &Value, app_secret_set: bool) -> Vec<Check> {
    let apps: Vec<&str> = answer["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|a| a["whatsapp_business_api_data"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let mut checks = vec![
        if apps.is_empty() {
            check(
                "webhook.subscribed",
                Verdict::Fail,
                "no app is subscribed to the business account: no delivery status reaches kabar",
            )
        } else {
            check(
                "webhook.subscribed",
                Verdict::Pass,
                format!("subscribed app: {}", apps.join(", ")),
            )
        }
        .fix(
            "POST /{waba-id}/subscribed_apps with the System User token (once), and in the App \
             Dashboard > WhatsApp > Configuration set the callback URL to kabar's webhook with \
             the messages field",
        ),
    ];
    checks.push(
        if app_secret_set {
            check(
                "webhook.signature",
                Verdict::Pass,
                "META_APP_SECRET is set: kabar checks the webhook's signature",
            )
        } else {
            check(
                "webhook.signature",
                Verdict::Fail,
                "META_APP_SECRET is not set: kabar's webhook is off",
            )
        }
        .fix("set META_APP_SECRET (App Dashboard > App settings > Basic > App secret)"),
    );
    checks
}

/// The registry's templates against the business account's.
pub fn judge_templates(compared: &[templates::Compared]) -> Vec<Check> {
    compared
        .iter()
        .map(|c| {
            let id = format!("template.{}", c.key);
            let what = format!("{} ({})", c.name, c.language);
            match &c.standing {
                Standing::Ready => check(
                    id,
                    Verdict::Pass,
                    format!("{what} is APPROVED with {} parameters", c.params),
                ),
                Standing::Pending => check(
                    id,
                    Verdict::Warn,
                    format!("{what} is waiting for Meta's review"),
                )
                .fix("wait for Meta's review (usually minutes, at most 24 h)"),
                Standing::Missing { other_languages } => check(
                    id,
                    Verdict::Fail,
                    if other_languages.is_empty() {
                        format!("{what} does not exist at Meta (sends fail with 132001)")
                    } else {
                        format!(
                            "{what} does not exist in this language, only in {} (132001)",
                            other_languages.join(", ")
                        )
                    },
                )
                .fix(
                    "run `kabar templates push`, or set this template's name and language in \
                     KABAR_TEMPLATES to the approved ones",
                ),
                Standing::Wrong { status, problem } => {
                    check(id, Verdict::Fail, format!("{what} ({status})")).fix(problem.clone())
                }
            }
        })
        .collect()
}

/// kabar's own side: the store, the OTP secret, the key file.
async fn local_checks(config: &Config) -> Vec<Check> {
    use secrecy::ExposeSecret;
    let mut checks = Vec::new();
    checks.push(match &config.redis_url {
        None => check(
            "store",
            Verdict::Warn,
            "no REDIS_URL: the in-process store (one replica only; codes and batches die with \
             a restart)",
        )
        .fix("set REDIS_URL for production"),
        Some(url) => {
            let reached = match RedisStore::new(url.expose_secret(), config.redis_timeout) {
                Ok(store) => tokio::time::timeout(std::time::Duration::from_secs(3), store.ping())
                    .await
                    .map_err(|_| "no answer in 3 s".to_owned())
                    .and_then(|r| r.map_err(|e| e.to_string())),
                Err(e) => Err(e.to_string()),
            };
            match reached {
                Ok(()) => check("store", Verdict::Pass, "Redis answers"),
                Err(e) => check(
                    "store",
                    Verdict::Fail,
                    format!("Redis does not answer: {e}"),
                )
                .fix("start Redis or correct REDIS_URL (the URL is never printed)"),
            }
        }
    });
    checks.push(match &config.otp.secret {
        Some(_) => check("otp.secret", Verdict::Pass, "KABAR_OTP_SECRET is set"),
        None => check(
            "otp.secret",
            Verdict::Warn,
            "no KABAR_OTP_SECRET: a random key per process (codes do not survive a restart)",
        )
        .fix("set KABAR_OTP_SECRET: openssl rand -hex 32"),
    });
    checks.push(match &config.api_keys {
        Some(k) => check(
            "api_keys",
            Verdict::Pass,
            format!("{}: {} callers", k.path.display(), k.ring.len()),
        ),
        None => check(
            "api_keys",
            Verdict::Warn,
            "no KABAR_API_KEYS_FILE: every caller that reaches the gRPC port may call",
        )
        .fix("create keys with `kabar keys new` and set KABAR_API_KEYS_FILE"),
    });
    checks
}

/// Runs every check. Meta is asked only what the configuration allows; what cannot be learned
/// is reported as unknown with the reason, never skipped silently.
pub async fn run(config: &Config) -> Report {
    let mut checks = Vec::new();
    let meta = match (&config.driver, &config.meta) {
        (DriverKind::Meta, Some(settings)) => match MetaClient::new(settings) {
            Ok(client) => Some(client),
            Err(e) => {
                checks.push(check("config", Verdict::Fail, e));
                None
            }
        },
        _ => {
            checks.push(
                check(
                    "config",
                    Verdict::Fail,
                    "WHATSAPP_DRIVER is log: nothing is sent to Meta, so nothing can be checked \
                     there",
                )
                .fix(
                    "set WHATSAPP_DRIVER=meta, WHATSAPP_API_KEY, META_WA_PHONE_NUMBER_ID and \
                     META_WA_BUSINESS_ACCOUNT_ID",
                ),
            );
            None
        }
    };
    if let Some(meta) = &meta {
        checks.extend(meta_checks(config, meta).await);
    }
    checks.extend(local_checks(config).await);
    Report::new(checks)
}

async fn meta_checks(config: &Config, meta: &MetaClient) -> Vec<Check> {
    let mut checks = Vec::new();
    let answer = meta.graph_get("me/permissions", &[]).await;
    // A refused or unchecked token makes every other question to Meta fail the same way.
    let token_works = match &answer {
        Ok(_) => true,
        Err(SendError::Meta(f)) => !matches!(f.meta_code, 0 | 102 | 104 | 190),
        Err(_) => false,
    };
    checks.push(match answer {
        Ok(answer) => judge_permissions(&answer),
        Err(e) => unknown("token", "the token could not be checked", &e),
    });
    if !token_works {
        checks.push(
            check(
                "meta",
                Verdict::Unknown,
                "the phone number, business account, templates and webhook were not checked",
            )
            .fix("fix the token first"),
        );
        return checks;
    }
    let number = meta.phone_number_id();
    match meta
        .graph_get(
            number,
            &[(
                "fields",
                "display_phone_number,verified_name,name_status,quality_rating,status,\
                 platform_type,throughput",
            )],
        )
        .await
    {
        Ok(n) => checks.extend(judge_number(&n)),
        Err(e) => checks.push(unknown("phone", "the phone number could not be read", &e)),
    }
    // Asked apart: an older Graph API version does not know the field and fails the request.
    match meta.messaging_limit().await {
        Ok(tier) => checks.push(judge_limit(&tier)),
        Err(e) => checks.push(
            unknown("phone.limit", "the messaging limit could not be read", &e)
                .fix("use META_GRAPH_API_VERSION v24.0 or later"),
        ),
    }
    let Some(waba) = &config.business_account_id else {
        checks.push(
            check(
                "business",
                Verdict::Fail,
                "META_WA_BUSINESS_ACCOUNT_ID is not set: the business account, its templates \
                 and its webhook cannot be checked",
            )
            .fix("set META_WA_BUSINESS_ACCOUNT_ID (WhatsApp Manager > Account tools)"),
        );
        return checks;
    };
    match meta
        .graph_get(
            waba,
            &[(
                "fields",
                "name,business_verification_status,account_review_status",
            )],
        )
        .await
    {
        Ok(w) => checks.extend(judge_business(&w)),
        Err(e) => checks.push(unknown(
            "business",
            "the business account could not be read",
            &e,
        )),
    }
    match templates::fetch(meta, waba).await {
        Ok(at_meta) => checks.extend(judge_templates(&templates::compare_all(
            &config.templates,
            &at_meta,
        ))),
        Err(e) => checks.push(unknown("templates", "the templates could not be read", &e)),
    }
    match meta
        .graph_get(&format!("{waba}/subscribed_apps"), &[])
        .await
    {
        Ok(answer) => checks.extend(judge_subscription(&answer, config.app_secret.is_some())),
        Err(e) => checks.push(unknown(
            "webhook.subscribed",
            "the webhook subscription could not be read",
            &e,
        )),
    }
    checks
}

/// The report as lines for a terminal: `PASS  id  found`, and the remedy under what failed.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for c in &report.checks {
        let mark = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Unknown => "????",
        };
        // Meta's words (names, error details) may hold terminal escapes: shown escaped.
        out.push_str(&format!(
            "{mark}  {:<32} {}\n",
            c.id,
            escape_unsafe(&c.found)
        ));
        if let Some(remedy) = &c.remedy {
            out.push_str(&format!("      -> {}\n", escape_unsafe(remedy)));
        }
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| matches!(c.verdict, Verdict::Fail | Verdict::Unknown))
        .count();
    out.push_str(&if report.passed {
        "\nAll checks passed.\n".to_owned()
    } else {
        format!("\n{failed} checks need attention.\n")
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_permissions_are_needed() {
        let granted = |ps: &[&str]| json!({"data": ps.iter().map(|p| json!({"permission": p, "status": "granted"})).collect::<Vec<_>>()});
        assert_eq!(
            judge_permissions(&granted(&[
                "whatsapp_business_messaging",
                "whatsapp_business_management"
            ]))
            .verdict,
            Verdict::Pass
        );
        let one = judge_permissions(&granted(&["whatsapp_business_messaging"]));
        assert_eq!(one.verdict, Verdict::Fail);
        assert!(one.found.contains("whatsapp_business_management"));
        let declined = json!({"data": [
            {"permission": "whatsapp_business_messaging", "status": "declined"},
            {"permission": "whatsapp_business_management", "status": "granted"}]});
        assert_eq!(judge_permissions(&declined).verdict, Verdict::Fail);
    }

    #[test]
    fn a_number_must_be_connected_to_the_cloud_api_and_named() {
        let good = json!({"display_phone_number": "+62 811-0000-0000", "verified_name": "Net",
            "name_status": "APPROVED", "quality_rating": "GREEN", "status": "CONNECTED",
            "platform_type": "CLOUD_API", "throughput": {"level": "STANDARD"}});
        let checks = judge_number(&good);
        assert!(
            checks.iter().all(|c| c.verdict == Verdict::Pass),
            "{checks:?}"
        );
        let verdict_of = |n: Value, id: &str| {
            judge_number(&n)
                .into_iter()
                .find(|c| c.id == id)
                .unwrap()
                .verdict
        };
        let mut bad = good.clone();
        bad["status"] = json!("PENDING");
        assert_eq!(verdict_of(bad, "phone.registered"), Verdict::Fail);
        let mut bad = good.clone();
        bad["platform_type"] = json!("ON_PREMISE");
        assert_eq!(verdict_of(bad, "phone.registered"), Verdict::Fail);
        let mut bad = good.clone();
        bad["name_status"] = json!("DECLINED");
        assert_eq!(verdict_of(bad, "phone.name"), Verdict::Fail);
        let mut bad = good.clone();
        bad["quality_rating"] = json!("RED");
        assert_eq!(verdict_of(bad, "phone.quality"), Verdict::Fail);
        let mut yellow = good;
        yellow["quality_rating"] = json!("YELLOW");
        assert_eq!(verdict_of(yellow, "phone.quality"), Verdict::Warn);
    }

    #[test]
    fn verification_is_read_in_any_case() {
        let verdict = |status: &str| {
            judge_business(&json!({"name": "Net", "business_verification_status": status}))[0]
                .verdict
        };
        assert_eq!(verdict("verified"), Verdict::Pass);
        assert_eq!(verdict("VERIFIED"), Verdict::Pass);
        assert_eq!(verdict("pending_need_more_info"), Verdict::Warn);
        assert_eq!(verdict("rejected"), Verdict::Fail);
    }

    #[test]
    fn a_report_passes_with_warnings_but_not_with_unknowns() {
        assert!(
            Report::new(vec![
                check("a", Verdict::Pass, ""),
                check("b", Verdict::Warn, "")
            ])
            .passed
        );
        assert!(!Report::new(vec![check("a", Verdict::Unknown, "")]).passed);
        assert!(!Report::new(vec![check("a", Verdict::Fail, "")]).passed);
    }

    #[test]
    fn no_subscribed_app_fails() {
        let none = judge_subscription(&json!({"data": []}), true);
        assert_eq!(none[0].verdict, Verdict::Fail);
        let one = judge_subscription(
            &json!({"data": [{"whatsapp_business_api_data": {"id": "1", "name": "kabar"}}]}),
            false,
        );
        assert_eq!(one[0].verdict, Verdict::Pass);
        assert_eq!(one[1].verdict, Verdict::Fail);
    }
}
