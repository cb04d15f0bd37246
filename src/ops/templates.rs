//! The registry's templates as Meta holds them: `kabar templates status` compares them,
//! `kabar templates push` creates the missing ones, and `kabar doctor` checks them. What Meta
//! answers is read in [`fetch`]; comparing and building requests is pure.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    templates::{Category, Template, TemplateRegistry},
    whatsapp::{MetaClient, SendError},
};

use super::lint::{self, Finding, Severity, positional_count};

/// One template of the business account, as Meta lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AtMeta {
    pub name: String,
    pub language: String,
    /// `APPROVED`, `PENDING`, `REJECTED`, `PAUSED`, `DISABLED`, ...
    pub status: String,
    pub category: String,
    /// Distinct `{{n}}` in its body; `None` when it uses named parameters or has no body.
    pub body_params: Option<usize>,
    pub rejected_reason: Option<String>,
}

impl AtMeta {
    fn from_json(v: &Value) -> Option<AtMeta> {
        let text = |k: &str| v[k].as_str().map(str::to_owned);
        let body = v["components"].as_array().and_then(|cs| {
            cs.iter()
                .find(|c| {
                    c["type"]
                        .as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case("BODY"))
                })
                .and_then(|c| c["text"].as_str())
        });
        Some(AtMeta {
            name: text("name")?,
            // Template webhooks spell `en-US`; the API `en_US`.
            language: text("language")?.replace('-', "_"),
            status: text("status").unwrap_or_default().to_uppercase(),
            category: text("category").unwrap_or_default().to_uppercase(),
            body_params: body.and_then(positional_count),
            rejected_reason: text("rejected_reason").filter(|r| r != "NONE"),
        })
    }
}

/// Pages of templates read at most (100 each): a business account holds at most a few thousand.
const MAX_PAGES: usize = 100;

/// The longest reading the whole list may take.
const FETCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Every template of business account `waba`, following Meta's paging. A list that does not
/// end (a cursor seen twice, more than [`MAX_PAGES`] pages, longer than [`FETCH_DEADLINE`]) is
/// an error, never a partial list: a template missing from it would be reported missing, and
/// created again.
pub async fn fetch(meta: &MetaClient, waba: &str) -> Result<Vec<AtMeta>, SendError> {
    tokio::time::timeout(FETCH_DEADLINE, fetch_pages(meta, waba))
        .await
        .unwrap_or_else(|_| {
            Err(SendError::Uncertain(format!(
                "Meta's template list took longer than {} s",
                FETCH_DEADLINE.as_secs()
            )))
        })
}

async fn fetch_pages(meta: &MetaClient, waba: &str) -> Result<Vec<AtMeta>, SendError> {
    let path = format!("{waba}/message_templates");
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..MAX_PAGES {
        let mut query = vec![
            (
                "fields",
                "name,language,status,category,components,rejected_reason",
            ),
            ("limit", "100"),
        ];
        if let Some(cursor) = &after {
            query.push(("after", cursor));
        }
        let page = meta.graph_get(&path, &query).await?;
        let data = page["data"].as_array().ok_or_else(|| {
            SendError::Uncertain("Meta's template list has no `data` array".into())
        })?;
        all.extend(data.iter().filter_map(AtMeta::from_json));
        // Meta gives `next` only while there is another page.
        after = match (
            &page["paging"]["next"],
            page["paging"]["cursors"]["after"].as_str(),
        ) {
            (Value::String(_), Some(cursor)) if !data.is_empty() => {
                if !seen.insert(cursor.to_owned()) {
                    return Err(SendError::Uncertain(
                        "Meta's template list repeats a page".into(),
                    ));
                }
                Some(cursor.to_owned())
            }
            _ => return Ok(all),
        };
    }
    Err(SendError::Uncertain(format!(
        "Meta's template list goes on past {MAX_PAGES} pages"
    )))
}

/// Meta's subcode for a template that exists in that language.
const ALREADY_EXISTS: i64 = 2388024;

/// Where a registry template stands at Meta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Standing {
    /// Approved in its language, with the category and parameter count the registry expects.
    Ready,
    /// No template of that name in that language.
    Missing { other_languages: Vec<String> },
    /// Exists, but sends would fail or cost more; `problem` says what and how to fix it.
    Wrong { status: String, problem: String },
    /// Submitted and waiting for Meta's review.
    Pending,
}

/// A registry template and its standing.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    pub key: String,
    pub name: String,
    pub language: String,
    pub category: Category,
    pub params: usize,
    #[serde(flatten)]
    pub standing: Standing,
}

fn category_name(c: Category) -> &'static str {
    match c {
        Category::Utility => "UTILITY",
        Category::Authentication => "AUTHENTICATION",
        Category::Marketing => "MARKETING",
    }
}

/// Compares one registry template with the business account's templates.
pub fn compare(t: &Template, at_meta: &[AtMeta]) -> Compared {
    let standing = match at_meta
        .iter()
        .find(|m| m.name == t.name && m.language == t.language)
    {
        None => Standing::Missing {
            other_languages: at_meta
                .iter()
                .filter(|m| m.name == t.name)
                .map(|m| m.language.clone())
                .collect(),
        },
        Some(m) => standing_of(t, m),
    };
    Compared {
        key: t.key.clone(),
        name: t.name.clone(),
        language: t.language.clone(),
        category: t.category,
        params: t.params.len(),
        standing,
    }
}

fn standing_of(t: &Template, m: &AtMeta) -> Standing {
    let wrong = |problem: String| Standing::Wrong {
        status: m.status.clone(),
        problem,
    };
    match m.status.as_str() {
        "APPROVED" => {}
        "PENDING" | "IN_APPEAL" => return Standing::Pending,
        "REJECTED" => {
            return wrong(format!(
                "Meta rejected it{}: fix the text in WhatsApp Manager and submit it again, or \
                 delete it there and run `kabar templates push` (sends fail with 132001)",
                m.rejected_reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
        "PAUSED" => {
            return wrong(
                "paused by Meta for low quality: sends fail with 132015 until it is unpaused; \
                 see WhatsApp Manager"
                    .into(),
            );
        }
        other => {
            return wrong(format!(
                "its status is {other}: only APPROVED templates can be sent (132001)"
            ));
        }
    }
    let expected = category_name(t.category);
    if m.category != expected {
        return wrong(format!(
            "Meta holds it as {} but the registry says {expected}: set `category = \"{}\"` in \
             KABAR_TEMPLATES, or create a template of the intended category",
            m.category, m.category
        ));
    }
    match m.body_params {
        Some(n) if n != t.params.len() => wrong(format!(
            "its body has {n} parameters but the registry lists {} ({}): sends would fail with \
             132000; make `params` in KABAR_TEMPLATES match the approved text",
            t.params.len(),
            t.params.join(", ")
        )),
        None => wrong(
            "its body uses named parameters, which kabar does not fill: create it with {{1}}..{{n}}"
                .into(),
        ),
        Some(_) => Standing::Ready,
    }
}

/// Every registry template compared, in key order.
pub fn compare_all(registry: &TemplateRegistry, at_meta: &[AtMeta]) -> Vec<Compared> {
    registry.all().iter().map(|t| compare(t, at_meta)).collect()
}

/// How long an OTP code stays valid, in the whole minutes its template's footer shows.
pub fn code_expiration_minutes(otp_ttl: Duration) -> u64 {
    otp_ttl.as_secs().div_ceil(60)
}

/// The body of `POST /{waba}/message_templates` creating `t`.
pub fn creation_request(t: &Template, otp_ttl: Duration) -> Value {
    let category = category_name(t.category);
    if t.category == Category::Authentication {
        // Meta writes the body; the footer shows the expiry; the button copies the code. A code
        // that arrives after it expired is useless, so Meta stops delivering it then.
        return json!({
            "name": t.name,
            "language": t.language,
            "category": category,
            "message_send_ttl_seconds": otp_ttl.as_secs().clamp(30, 900),
            "components": [
                {"type": "BODY", "add_security_recommendation": true},
                {"type": "FOOTER", "code_expiration_minutes": code_expiration_minutes(otp_ttl)},
                {"type": "BUTTONS", "buttons": [
                    {"type": "OTP", "otp_type": "COPY_CODE", "text": "Salin kode"}
                ]}
            ]
        });
    }
    let mut body = json!({"type": "BODY", "text": t.body.clone().unwrap_or_default()});
    if !t.params.is_empty() {
        body["example"] = json!({"body_text": [t.examples]});
    }
    json!({
        "name": t.name,
        "language": t.language,
        "category": category,
        "parameter_format": "POSITIONAL",
        "components": [body]
    })
}

/// What `push` did (or would do) with one registry template.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Pushed {
    /// Already at Meta in its language (whatever its status): nothing sent.
    Exists { status: String },
    /// Created; Meta's answer.
    Created { id: String, status: String },
    /// `--dry-run`: would be created with this request.
    WouldCreate { request: Value },
    /// Not submitted: the lint found what Meta would refuse.
    Refused { findings: Vec<Finding> },
    /// Meta refused it; its reason.
    Failed { code: i64, reason: String },
}

/// One template's push.
#[derive(Debug, Clone, Serialize)]
pub struct PushLine {
    pub key: String,
    pub name: String,
    pub language: String,
    #[serde(flatten)]
    pub pushed: Pushed,
    /// Lint warnings (submitted anyway).
    pub warnings: Vec<Finding>,
}

/// Creates the registry templates missing at Meta (in their language); with `dry_run` only says
/// what it would submit. Templates that exist are left alone, so a second push creates nothing.
pub async fn push(
    meta: &MetaClient,
    waba: &str,
    registry: &TemplateRegistry,
    otp_ttl: Duration,
    dry_run: bool,
) -> Result<Vec<PushLine>, SendError> {
    let at_meta = fetch(meta, waba).await?;
    let minutes = code_expiration_minutes(otp_ttl);
    let mut lines = Vec::new();
    for t in registry.all() {
        let line = |pushed, warnings| PushLine {
            key: t.key.clone(),
            name: t.name.clone(),
            language: t.language.clone(),
            pushed,
            warnings,
        };
        if let Some(m) = at_meta
            .iter()
            .find(|m| m.name == t.name && m.language == t.language)
        {
            lines.push(line(
                Pushed::Exists {
                    status: m.status.clone(),
                },
                vec![],
            ));
            continue;
        }
        let (errors, warnings): (Vec<Finding>, Vec<Finding>) = lint::lint(t, minutes)
            .into_iter()
            .partition(|f| f.severity == Severity::Error);
        if !errors.is_empty() {
            lines.push(line(Pushed::Refused { findings: errors }, warnings));
            continue;
        }
        let request = creation_request(t, otp_ttl);
        if dry_run {
            lines.push(line(Pushed::WouldCreate { request }, warnings));
            continue;
        }
        let pushed = match meta
            .graph_post(&format!("{waba}/message_templates"), &request)
            .await
        {
            Ok(answer) => Pushed::Created {
                id: answer["id"].as_str().unwrap_or_default().to_owned(),
                status: answer["status"].as_str().unwrap_or("PENDING").to_owned(),
            },
            // The list did not show it, but Meta has it: nothing was created.
            Err(SendError::Meta(f)) if f.subcode == Some(ALREADY_EXISTS) => Pushed::Exists {
                status: "exists at Meta (not in its list)".into(),
            },
            Err(SendError::Meta(f)) => Pushed::Failed {
                code: f.meta_code,
                reason: f.details,
            },
            // Unreachable or unreadable: what was created is unknown; a rerun finds out.
            Err(e) => return Err(e),
        };
        lines.push(line(pushed, warnings));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_meta(name: &str, language: &str, status: &str, category: &str, body: &str) -> AtMeta {
        AtMeta::from_json(&json!({
            "name": name, "language": language, "status": status, "category": category,
            "components": [{"type": "BODY", "text": body}], "id": "1"
        }))
        .unwrap()
    }

    #[test]
    fn a_template_is_ready_only_approved_in_its_language_with_its_category_and_count() {
        let registry = TemplateRegistry::default();
        let t = registry.get("overdue_notice").unwrap();
        let body = "Halo {{1}}, {{2}} dan {{3}} ya.";
        let ready = at_meta("overdue_notice", "id", "APPROVED", "UTILITY", body);
        assert_eq!(compare(t, &[ready]).standing, Standing::Ready);

        let english = at_meta("overdue_notice", "en-US", "APPROVED", "UTILITY", body);
        assert_eq!(
            compare(t, &[english]).standing,
            Standing::Missing {
                other_languages: vec!["en_US".into()]
            }
        );
        let problem = |m: AtMeta| match compare(t, &[m]).standing {
            Standing::Wrong { problem, .. } => problem,
            other => panic!("{other:?}"),
        };
        assert!(
            problem(at_meta(
                "overdue_notice",
                "id",
                "APPROVED",
                "MARKETING",
                body
            ))
            .contains("MARKETING")
        );
        assert!(
            problem(at_meta(
                "overdue_notice",
                "id",
                "APPROVED",
                "UTILITY",
                "Halo {{1}} ya"
            ))
            .contains("132000")
        );
        assert!(
            problem(at_meta("overdue_notice", "id", "REJECTED", "UTILITY", body))
                .contains("rejected")
        );
        assert_eq!(
            compare(
                t,
                &[at_meta("overdue_notice", "id", "PENDING", "UTILITY", body)]
            )
            .standing,
            Standing::Pending
        );
    }

    #[test]
    fn creation_requests_follow_metas_shapes() {
        let registry = TemplateRegistry::default();
        let invoice = creation_request(
            registry.get("invoice_notification").unwrap(),
            Duration::from_secs(300),
        );
        assert_eq!(invoice["category"], "UTILITY");
        assert_eq!(invoice["parameter_format"], "POSITIONAL");
        let examples = invoice["components"][0]["example"]["body_text"][0]
            .as_array()
            .unwrap();
        assert_eq!(examples.len(), 7);
        assert_eq!(
            positional_count(invoice["components"][0]["text"].as_str().unwrap()),
            Some(7)
        );
        let otp = creation_request(registry.get("otp_code").unwrap(), Duration::from_secs(300));
        assert_eq!(otp["category"], "AUTHENTICATION");
        assert_eq!(otp["message_send_ttl_seconds"], 300);
        assert_eq!(otp["components"][0]["add_security_recommendation"], true);
        assert_eq!(otp["components"][1]["code_expiration_minutes"], 5);
        assert_eq!(otp["components"][2]["buttons"][0]["otp_type"], "COPY_CODE");
        assert!(otp["components"][0].get("text").is_none());
    }

    #[test]
    fn the_code_expiry_rounds_up_to_whole_minutes() {
        assert_eq!(code_expiration_minutes(Duration::from_secs(300)), 5);
        assert_eq!(code_expiration_minutes(Duration::from_secs(301)), 6);
        assert_eq!(code_expiration_minutes(Duration::from_secs(30)), 1);
    }
}
