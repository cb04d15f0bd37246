//! Meta's error codes, classified: what each means for the caller, whether kabar retries it, and
//! the remedy a developer can act on. Decisions rest on `code` (and the HTTP status for codes Meta
//! has not documented), never on the message text or the subcode, which Meta changes freely.

use std::time::Duration;

use serde::Deserialize;

use crate::domain::reason::Reason;

/// How a Meta refusal reaches the caller. Each kind has exactly one gRPC code (see `error.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaErrorKind {
    /// The request itself is wrong (parameters, registry): INVALID_ARGUMENT.
    InvalidArgument,
    /// Configuration or policy on the business side (token, template approval, number
    /// registration): FAILED_PRECONDITION.
    Configuration,
    /// The recipient cannot receive WhatsApp messages (131026): FAILED_PRECONDITION.
    RecipientUndeliverable,
    /// A Meta rate limit: RESOURCE_EXHAUSTED with the wait.
    RateLimited,
    /// Meta is failing or in maintenance: UNAVAILABLE.
    Unavailable,
    /// A code Meta did not document for this API: UNKNOWN, with everything Meta said.
    Unclassified,
}

/// Meta's error body: `{"error": {...}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct MetaErrorBody {
    pub error: MetaErrorObject,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetaErrorObject {
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    pub code: i64,
    #[serde(default)]
    pub error_subcode: Option<i64>,
    #[serde(default)]
    pub error_data: Option<MetaErrorData>,
    /// Meta's explanation for a person, e.g. why a template was refused.
    #[serde(default)]
    pub error_user_msg: Option<String>,
    #[serde(default)]
    pub fbtrace_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetaErrorData {
    #[serde(default)]
    pub details: Option<String>,
}

/// Most bytes of Meta's error text passed on.
pub const MAX_DETAILS_BYTES: usize = 512;
/// Most bytes of Meta's trace id passed on.
const MAX_TRACE_ID_BYTES: usize = 128;

/// A refusal from Meta, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaFailure {
    pub kind: MetaErrorKind,
    /// Machine-readable reason for `google.rpc.ErrorInfo`, e.g. `META_TEMPLATE_NOT_APPROVED`.
    pub reason: Reason,
    /// Meta's `code` (or 0 when Meta sent no parseable body).
    pub meta_code: i64,
    /// Meta's `error_subcode`: a hint only (e.g. a template that exists), never a decision.
    pub subcode: Option<i64>,
    pub http_status: u16,
    /// Meta's `error_data.details`, else its `error_user_msg`, else its `message`.
    pub details: String,
    pub fbtrace_id: Option<String>,
    /// What a developer or operator should do about it.
    pub remedy: String,
    /// kabar may try the same request again.
    pub retryable: bool,
    /// How long the caller should wait before trying again (rate limits).
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for MetaFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Meta error {} ({}): {}. {}",
            self.meta_code, self.reason, self.details, self.remedy
        )
    }
}

/// What the template was, for remedies that name it.
pub struct SendContext<'a> {
    pub template: &'a str,
    pub language: &'a str,
}

/// The reason of a Meta error code reported without an HTTP answer (a failed status in the
/// webhook), as the same code would be classified in an answer.
pub fn reason_of_code(code: i64) -> Reason {
    let body = MetaErrorObject {
        message: String::new(),
        kind: String::new(),
        code,
        error_subcode: None,
        error_data: None,
        error_user_msg: None,
        fbtrace_id: None,
    };
    classify(
        400,
        Some(&body),
        &SendContext {
            template: "",
            language: "",
        },
    )
    .reason
}

/// Classifies a Meta error. `body` is Meta's parsed error body, if the response had one.
pub fn classify(
    http_status: u16,
    body: Option<&MetaErrorObject>,
    ctx: &SendContext<'_>,
) -> MetaFailure {
    use MetaErrorKind::*;
    let code = body.map_or(0, |b| b.code);
    let (tpl, lang) = (ctx.template, ctx.language);
    let (kind, reason, retryable, retry_after, remedy): (_, _, _, Option<Duration>, String) =
        match code {
            0 | 190 if body.is_some() => (
                Configuration,
                Reason::MetaTokenInvalid,
                false,
                None,
                "the access token (WHATSAPP_API_KEY) is invalid or expired: generate a new \
                 System User token in Meta Business Settings and restart kabar"
                    .to_owned(),
            ),
            3 | 10 | 200..=299 => (
                Configuration,
                Reason::MetaPermissionDenied,
                false,
                None,
                "the token lacks a permission: give the System User whatsapp_business_messaging \
                 and whatsapp_business_management on this WhatsApp Business Account"
                    .to_owned(),
            ),
            4 => (
                RateLimited,
                Reason::MetaAppRateLimit,
                true,
                Some(Duration::from_secs(60)),
                "the Meta app hit its Graph API call limit: slow down and retry later".to_owned(),
            ),
            80007 => (
                RateLimited,
                Reason::MetaAccountRateLimit,
                true,
                Some(Duration::from_secs(60)),
                "the WhatsApp Business Account hit its rate limit: slow down and retry later"
                    .to_owned(),
            ),
            130429 => (
                RateLimited,
                Reason::MetaThroughputExceeded,
                true,
                Some(Duration::from_secs(1)),
                "the sending number exceeded its throughput (80 messages/s by default): \
                 spread the run out and retry"
                    .to_owned(),
            ),
            131056 => (
                RateLimited,
                Reason::MetaPairRateLimit,
                false,
                Some(Duration::from_secs(6)),
                "too many messages to this recipient in a short time: wait a few seconds \
                 before sending to them again"
                    .to_owned(),
            ),
            131048 => (
                Configuration,
                Reason::MetaSpamRateLimit,
                false,
                None,
                "Meta limited this number because of low message quality: check the quality \
                 rating in WhatsApp Manager and pause non-essential sends"
                    .to_owned(),
            ),
            131049 => (
                RateLimited,
                Reason::MetaUserMarketingLimit,
                false,
                Some(Duration::from_secs(24 * 3600)),
                "Meta limits how many marketing messages one user receives: try again in 24 hours"
                    .to_owned(),
            ),
            100 => (
                InvalidArgument,
                Reason::MetaInvalidParameter,
                false,
                None,
                "Meta refused a parameter of the request (often the phone number or the \
                 template name): check the details"
                    .to_owned(),
            ),
            131008 => (
                InvalidArgument,
                Reason::MetaParameterMissing,
                false,
                None,
                "a required parameter is missing: check the template's parameters".to_owned(),
            ),
            131009 => (
                InvalidArgument,
                Reason::MetaParameterInvalid,
                false,
                None,
                "a parameter value is invalid: check the details".to_owned(),
            ),
            132000 => (
                InvalidArgument,
                Reason::MetaTemplateParamCountMismatch,
                false,
                None,
                format!(
                    "template {tpl} in language {lang} has a different number of parameters in \
                     WhatsApp Manager: fix its params list in the template registry \
                     (KABAR_TEMPLATES)"
                ),
            ),
            132005 => (
                InvalidArgument,
                Reason::MetaTemplateTextTooLong,
                false,
                None,
                format!("the rendered text of template {tpl} is too long: shorten the parameters"),
            ),
            132007 => (
                InvalidArgument,
                Reason::MetaTemplatePolicyViolation,
                false,
                None,
                format!("the content of template {tpl} violates WhatsApp policy"),
            ),
            132012 => (
                InvalidArgument,
                Reason::MetaTemplateParamFormat,
                false,
                None,
                format!(
                    "a parameter of template {tpl} does not match the format approved in \
                     WhatsApp Manager"
                ),
            ),
            132018 => (
                InvalidArgument,
                Reason::MetaTemplateParamInvalidText,
                false,
                None,
                "a parameter contains a line break, a tab or more than 4 consecutive spaces"
                    .to_owned(),
            ),
            132001 => (
                Configuration,
                Reason::MetaTemplateNotApproved,
                false,
                None,
                format!(
                    "template {tpl} in language {lang} is not approved in WhatsApp Manager \
                     (or has another name there): check its status, or map the key to the \
                     approved name in KABAR_TEMPLATES"
                ),
            ),
            132015 => (
                Configuration,
                Reason::MetaTemplatePaused,
                false,
                None,
                format!(
                    "template {tpl} is paused by Meta for low quality: edit it in WhatsApp \
                     Manager or wait for it to be unpaused"
                ),
            ),
            132016 => (
                Configuration,
                Reason::MetaTemplateDisabled,
                false,
                None,
                format!(
                    "template {tpl} is disabled by Meta: create and approve a new template and \
                     map the key to it in KABAR_TEMPLATES"
                ),
            ),
            133010 => (
                Configuration,
                Reason::MetaPhoneNotRegistered,
                false,
                None,
                "the business phone number (META_WA_PHONE_NUMBER_ID) is not registered with the \
                 Cloud API: register it in WhatsApp Manager"
                    .to_owned(),
            ),
            131047 => (
                Configuration,
                Reason::MetaReengagementRequired,
                false,
                None,
                "more than 24 hours since the customer last wrote: only an approved template \
                 can be sent"
                    .to_owned(),
            ),
            131026 => (
                RecipientUndeliverable,
                Reason::MetaRecipientUndeliverable,
                false,
                None,
                "the recipient cannot receive WhatsApp messages (no WhatsApp on this number, \
                 an old app, or terms not accepted): contact the customer another way"
                    .to_owned(),
            ),
            368 => (
                Configuration,
                Reason::MetaAccountBlocked,
                false,
                None,
                "Meta temporarily blocked this account for policy violations: stop sending and \
                 check Account Quality in WhatsApp Manager"
                    .to_owned(),
            ),
            131000 => (
                Unavailable,
                Reason::MetaUnknownError,
                true,
                Some(Duration::from_secs(5)),
                "Meta failed with an unknown error: retry later".to_owned(),
            ),
            131016 => (
                Unavailable,
                Reason::MetaServiceUnavailable,
                true,
                Some(Duration::from_secs(5)),
                "Meta's service is temporarily unavailable: retry later".to_owned(),
            ),
            131057 => (
                Unavailable,
                Reason::MetaAccountMaintenance,
                true,
                Some(Duration::from_secs(60)),
                "the business account is in maintenance (often a throughput upgrade): retry in \
                 a few minutes"
                    .to_owned(),
            ),
            _ if http_status >= 500 => (
                Unavailable,
                Reason::MetaServerError,
                true,
                Some(Duration::from_secs(5)),
                format!("Meta answered HTTP {http_status}: retry later"),
            ),
            _ if http_status == 429 => (
                RateLimited,
                Reason::MetaRateLimit,
                false,
                Some(Duration::from_secs(60)),
                "Meta rate-limited the request: retry later".to_owned(),
            ),
            _ => (
                Unclassified,
                Reason::MetaError,
                false,
                None,
                format!(
                    "Meta refused the message with code {code} (HTTP {http_status}): see Meta's \
                     error-code reference"
                ),
            ),
        };
    // Meta's words go on to callers (error details), logs, stored batch items and terminals:
    // escaped and bounded, whatever Meta (or something pretending to be it) sent.
    let details = body
        .map(|b| {
            let text = b
                .error_data
                .as_ref()
                .and_then(|d| d.details.as_deref())
                .filter(|d| !d.is_empty())
                .or_else(|| b.error_user_msg.as_deref().filter(|m| !m.is_empty()))
                .unwrap_or(&b.message);
            crate::domain::error::bounded_text(text, MAX_DETAILS_BYTES)
        })
        .unwrap_or_else(|| format!("HTTP {http_status} without a Meta error body"));
    MetaFailure {
        kind,
        reason,
        meta_code: code,
        subcode: body.and_then(|b| b.error_subcode),
        http_status,
        details,
        // A trace id is a short token; anything else is not one.
        fbtrace_id: body
            .and_then(|b| b.fbtrace_id.clone())
            .filter(|t| t.len() <= MAX_TRACE_ID_BYTES && t.bytes().all(|b| b.is_ascii_graphic())),
        remedy,
        retryable,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: i64) -> MetaErrorObject {
        MetaErrorObject {
            message: format!("(#{code}) something"),
            kind: "OAuthException".into(),
            code,
            error_subcode: None,
            error_data: Some(MetaErrorData {
                details: Some("what Meta said".into()),
            }),
            error_user_msg: None,
            fbtrace_id: Some("trace".into()),
        }
    }

    fn run(status: u16, code: Option<i64>) -> MetaFailure {
        let b = code.map(body);
        classify(
            status,
            b.as_ref(),
            &SendContext {
                template: "invoice",
                language: "id",
            },
        )
    }

    #[test]
    fn metas_words_are_escaped_and_bounded() {
        let mut b = body(100);
        b.error_data = Some(MetaErrorData {
            details: Some(format!("\u{1b}[2J{}", "x".repeat(30_000))),
        });
        b.fbtrace_id = Some("t".repeat(5_000));
        let ctx = SendContext {
            template: "invoice",
            language: "id",
        };
        let f = classify(400, Some(&b), &ctx);
        assert!(f.details.len() <= MAX_DETAILS_BYTES, "{}", f.details.len());
        assert!(
            !f.details.chars().any(char::is_control),
            "{:?}",
            &f.details[..20]
        );
        assert_eq!(f.fbtrace_id, None);
        assert_eq!(run(400, Some(100)).fbtrace_id.as_deref(), Some("trace"));
    }

    #[test]
    fn configuration_problems_are_not_retried() {
        let f = run(401, Some(190));
        assert_eq!(f.kind, MetaErrorKind::Configuration);
        assert_eq!(f.reason, Reason::MetaTokenInvalid);
        assert!(!f.retryable);
        assert_eq!(f.fbtrace_id.as_deref(), Some("trace"));
        assert!(f.remedy.contains("WHATSAPP_API_KEY"), "{}", f.remedy);
    }

    #[test]
    fn meta_rate_limits_are_retried_with_a_wait() {
        let f = run(429, Some(130429));
        assert_eq!(f.kind, MetaErrorKind::RateLimited);
        assert!(f.retryable);
        assert!(f.retry_after.is_some());
    }

    #[test]
    fn recipients_and_unknown_codes() {
        let f = run(400, Some(131026));
        assert_eq!(f.kind, MetaErrorKind::RecipientUndeliverable);
        assert_eq!(f.reason, Reason::MetaRecipientUndeliverable);
        assert!(!f.retryable);
        let f = run(400, Some(987_654));
        assert_eq!(f.kind, MetaErrorKind::Unclassified);
        assert_eq!(f.meta_code, 987_654);
    }

    #[test]
    fn a_server_error_without_a_body_is_temporary() {
        let f = run(503, None);
        assert_eq!(f.kind, MetaErrorKind::Unavailable);
        assert!(f.retryable);
    }

    #[test]
    fn webhook_codes_get_the_same_reasons_as_answers() {
        assert_eq!(reason_of_code(131026), Reason::MetaRecipientUndeliverable);
        assert_eq!(reason_of_code(131049), run(400, Some(131049)).reason);
    }
}
