//! The Graph API side of the Meta stand-in (see `support::FakeMeta`): the token's permissions,
//! the phone number, the business account, its templates (listed with paging, created with
//! Meta's validation and refusals) and its webhook subscriptions. It starts as a complete, good
//! setup; a test breaks one thing at a time.

use serde_json::{Value, json};

use crate::support::{PHONE_NUMBER_ID, TOKEN, meta_error_body};

pub const WABA_ID: &str = "234567890123456";

/// One template as the business account holds it.
#[derive(Debug, Clone)]
pub struct HeldTemplate {
    pub id: String,
    pub name: String,
    pub language: String,
    pub status: String,
    pub category: String,
    pub components: Value,
}

/// What the business account looks like to the Graph API.
#[derive(Debug, Clone)]
pub struct Graph {
    pub permissions: Vec<(String, String)>,
    pub number: Value,
    pub waba: Value,
    pub templates: Vec<HeldTemplate>,
    pub subscribed_apps: Vec<Value>,
    /// Template creations received (their bodies), refused or not.
    pub creations: Vec<Value>,
    /// Page size Meta uses when asked for more.
    pub page_size: usize,
    /// Creations of these names are refused with Meta's subcode and reason.
    pub refuse: Vec<(String, i64, String)>,
    /// Templates held but left out of the list (Meta's list is not always complete).
    pub unlisted: Vec<String>,
    /// The list never ends: every page points to the same next cursor.
    pub endless_paging: bool,
}

/// A positional body text with `n` parameters, as an approved template holds it.
fn body_with(n: usize) -> String {
    let mut text = "Halo".to_owned();
    for i in 1..=n {
        text.push_str(&format!(" {{{{{i}}}}} kata"));
    }
    text.push_str(" terima kasih.");
    text
}

/// The approved template of registry key `key` with `n` parameters.
pub fn approved(name: &str, language: &str, category: &str, n: usize) -> HeldTemplate {
    let body = if category == "AUTHENTICATION" {
        "*{{1}}* adalah kode verifikasi Anda.".to_owned()
    } else {
        body_with(n)
    };
    HeldTemplate {
        id: format!("10{}", name.len() * 7919 + n),
        name: name.to_owned(),
        language: language.to_owned(),
        status: "APPROVED".to_owned(),
        category: category.to_owned(),
        components: json!([{"type": "BODY", "text": body}]),
    }
}

/// The seven built-in templates, approved as kabar's registry expects them.
pub fn built_in_templates() -> Vec<HeldTemplate> {
    vec![
        approved("payment_confirmation", "id", "UTILITY", 5),
        approved("invoice_notification", "id", "UTILITY", 7),
        approved("payment_reminder", "id", "UTILITY", 4),
        approved("overdue_notice", "id", "UTILITY", 3),
        approved("isolation_notice", "id", "UTILITY", 4),
        approved("access_opened", "id", "UTILITY", 2),
        approved("otp_code", "id", "AUTHENTICATION", 1),
    ]
}

impl Default for Graph {
    fn default() -> Self {
        Graph {
            permissions: vec![
                ("whatsapp_business_messaging".into(), "granted".into()),
                ("whatsapp_business_management".into(), "granted".into()),
                ("public_profile".into(), "granted".into()),
            ],
            number: json!({
                "id": PHONE_NUMBER_ID,
                "display_phone_number": "+62 811-0000-0000",
                "verified_name": "Net Nusantara",
                "name_status": "APPROVED",
                "code_verification_status": "VERIFIED",
                "quality_rating": "GREEN",
                "status": "CONNECTED",
                "platform_type": "CLOUD_API",
                "throughput": {"level": "STANDARD"}
            }),
            waba: json!({
                "id": WABA_ID,
                "name": "Net Nusantara",
                "account_review_status": "APPROVED",
                "business_verification_status": "verified"
            }),
            templates: built_in_templates(),
            subscribed_apps: vec![json!({"whatsapp_business_api_data": {
                "id": "67084321", "name": "kabar-isp",
                "link": "https://www.facebook.com/games/?app_id=67084321"}})],
            creations: Vec::new(),
            page_size: 3,
            refuse: Vec::new(),
            unlisted: Vec::new(),
            endless_paging: false,
        }
    }
}

fn error(
    status: u16,
    code: i64,
    subcode: Option<i64>,
    message: &str,
    user_msg: Option<&str>,
) -> (u16, Value) {
    let mut body = meta_error_body(code, message);
    body["error"]["error_data"] = Value::Null;
    body["error"]["message"] = json!(message);
    match subcode {
        Some(s) => body["error"]["error_subcode"] = json!(s),
        None => {
            body["error"]
                .as_object_mut()
                .unwrap()
                .remove("error_subcode");
        }
    }
    if let Some(m) = user_msg {
        body["error"]["error_user_title"] = json!("Template refused");
        body["error"]["error_user_msg"] = json!(m);
    }
    (status, body)
}

fn no_object(id: &str) -> (u16, Value) {
    error(
        400,
        100,
        Some(33),
        &format!(
            "Unsupported get request. Object with ID '{id}' does not exist, cannot be loaded due \
             to missing permissions, or does not support this operation"
        ),
        None,
    )
}

/// Only the fields asked for (and the id), as the Graph API answers.
fn fields_of(node: &Value, query: &[(String, String)]) -> Value {
    let Some((_, fields)) = query.iter().find(|(k, _)| k == "fields") else {
        return node.clone();
    };
    let mut out = json!({"id": node["id"]});
    for f in fields.split(',') {
        if let Some(v) = node.get(f) {
            out[f] = v.clone();
        }
    }
    out
}

fn template_json(t: &HeldTemplate) -> Value {
    json!({"id": t.id, "name": t.name, "language": t.language, "status": t.status,
           "category": t.category, "components": t.components})
}

/// `true` when `authorization` carries the stand-in's token.
pub fn authorized(authorization: Option<&str>) -> bool {
    authorization == Some(&format!("Bearer {TOKEN}"))
}

pub fn invalid_token() -> (u16, Value) {
    error(
        401,
        190,
        Some(467),
        "Invalid OAuth access token - Cannot parse access token",
        None,
    )
}

impl Graph {
    /// A read. `None`: not a Graph path the stand-in knows (the caller answers).
    pub fn get(&self, segments: &[&str], query: &[(String, String)]) -> Option<(u16, Value)> {
        Some(match segments {
            ["me", "permissions"] => (
                200,
                json!({"data": self.permissions.iter()
                    .map(|(p, s)| json!({"permission": p, "status": s})).collect::<Vec<_>>()}),
            ),
            [id] if *id == PHONE_NUMBER_ID => (200, fields_of(&self.number, query)),
            [id] if *id == WABA_ID => (200, fields_of(&self.waba, query)),
            [id, "message_templates"] if *id == WABA_ID => self.list(query),
            [id, "subscribed_apps"] if *id == WABA_ID => {
                (200, json!({"data": self.subscribed_apps}))
            }
            [id, ..] => no_object(id),
            [] => return None,
        })
    }

    fn list(&self, query: &[(String, String)]) -> (u16, Value) {
        let param = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
        let limit = param("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(25)
            .min(self.page_size);
        let start = match param("after") {
            None => 0,
            Some(cursor) => match cursor.strip_prefix("cursor-").and_then(|c| c.parse().ok()) {
                Some(at) => at,
                None => return error(400, 131059, None, "Invalid pagination cursor", None),
            },
        };
        if self.endless_paging {
            let page: Vec<Value> = self.templates.iter().take(1).map(template_json).collect();
            return (
                200,
                json!({"data": page, "paging": {"cursors": {"after": "cursor-1"},
                    "next": "https://graph.facebook.com/v24.0/x?after=cursor-1"}}),
            );
        }
        let listed: Vec<&HeldTemplate> = self
            .templates
            .iter()
            .filter(|t| !self.unlisted.contains(&t.name))
            .collect();
        let page: Vec<Value> = listed
            .iter()
            .copied()
            .skip(start)
            .take(limit)
            .map(template_json)
            .collect();
        let end = start + page.len();
        let mut paging = json!({"cursors": {"before": format!("cursor-{start}"),
                                             "after": format!("cursor-{end}")}});
        if end < listed.len() {
            paging["next"] = json!(format!(
                "https://graph.facebook.com/v24.0/{WABA_ID}/message_templates?after=cursor-{end}"
            ));
        }
        (200, json!({"data": page, "paging": paging}))
    }

    /// A write. `None`: not a Graph path the stand-in knows.
    pub fn post(&mut self, segments: &[&str], body: &Value) -> Option<(u16, Value)> {
        match segments {
            [id, "message_templates"] if *id == WABA_ID => Some(self.create(body)),
            _ => None,
        }
    }

    /// Template creation, refused the way Meta refuses.
    fn create(&mut self, body: &Value) -> (u16, Value) {
        self.creations.push(body.clone());
        let name = body["name"].as_str().unwrap_or_default();
        let language = body["language"].as_str().unwrap_or_default();
        let category = body["category"].as_str().unwrap_or_default();
        let name_ok = !name.is_empty()
            && name.len() <= 512
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok || language.is_empty() {
            return error(400, 100, None, "Invalid parameter", None);
        }
        if !["UTILITY", "MARKETING", "AUTHENTICATION"].contains(&category) {
            return error(400, 100, None, "Invalid parameter", None);
        }
        if let Some((_, subcode, reason)) = self.refuse.iter().find(|(n, _, _)| n == name) {
            return error(400, 100, Some(*subcode), "Invalid parameter", Some(reason));
        }
        if self
            .templates
            .iter()
            .any(|t| t.name == name && t.language == language)
        {
            return error(
                400,
                100,
                Some(2388024),
                "Invalid parameter",
                Some("Content in this language already exists"),
            );
        }
        let components = body["components"].as_array().cloned().unwrap_or_default();
        let of_type = |t: &str| components.iter().find(|c| c["type"] == t).cloned();
        let stored_body = if category == "AUTHENTICATION" {
            let buttons = of_type("BUTTONS");
            let otp = buttons
                .as_ref()
                .and_then(|b| b["buttons"][0]["otp_type"].as_str())
                .map(str::to_owned);
            let minutes = of_type("FOOTER").and_then(|f| f["code_expiration_minutes"].as_u64());
            let body_text = of_type("BODY").and_then(|b| b.get("text").cloned());
            if otp.as_deref() != Some("COPY_CODE")
                || !minutes.is_some_and(|m| (1..=90).contains(&m))
                || body_text.is_some()
            {
                return error(
                    400,
                    100,
                    Some(2388072),
                    "Invalid parameter",
                    Some(
                        "Authentication templates take no body text, a code expiry of 1 to 90 minutes and an OTP button",
                    ),
                );
            }
            "*{{1}}* adalah kode verifikasi Anda.".to_owned()
        } else {
            let Some(text) = of_type("BODY").and_then(|b| b["text"].as_str().map(str::to_owned))
            else {
                return error(
                    400,
                    100,
                    Some(2388072),
                    "Invalid parameter",
                    Some("The body is required"),
                );
            };
            let trimmed = text.trim();
            let starts = trimmed.starts_with("{{");
            let ends = trimmed
                .trim_end_matches(|c: char| !c.is_alphanumeric() && c != '}')
                .ends_with("}}");
            if starts || ends {
                return error(
                    400,
                    100,
                    Some(2388299),
                    "Invalid parameter",
                    Some("Variables can't be at the start or end of the template."),
                );
            }
            let params = text.matches("{{").count();
            let examples = of_type("BODY")
                .and_then(|b| b["example"]["body_text"][0].as_array().map(Vec::len))
                .unwrap_or(0);
            if params != examples {
                return error(
                    400,
                    100,
                    Some(2388043),
                    "Invalid parameter",
                    Some("Every variable needs a sample value"),
                );
            }
            text
        };
        let id = format!("77{}", self.templates.len() + 1000);
        let status = if category == "AUTHENTICATION" {
            "APPROVED"
        } else {
            "PENDING"
        };
        self.templates.push(HeldTemplate {
            id: id.clone(),
            name: name.to_owned(),
            language: language.to_owned(),
            status: status.to_owned(),
            category: category.to_owned(),
            components: json!([{"type": "BODY", "text": stored_body}]),
        });
        (
            200,
            json!({"id": id, "status": status, "category": category}),
        )
    }
}
