//! Billing notifications: a registry key and its parameters become one template message, checked
//! completely before anything is sent, then sent through the send pipeline ([`Outbox`]).

use std::{collections::HashMap, sync::Arc, time::Instant};

use crate::{
    domain::{
        error::{Error, Violations, echo, sanitize},
        outbox::{Accepted, Outbox, Outgoing},
        pacing::Priority,
    },
    phone,
    templates::{self, Category, TemplateRegistry},
    whatsapp::OutboundTemplate,
};

/// What a caller asks to send, as received.
pub struct NotificationRequest<'a> {
    pub phone: &'a str,
    pub template: &'a str,
    pub params: &'a HashMap<String, String>,
    pub positional_params: &'a [String],
    pub language: &'a str,
    /// The caller's own id (an invoice number); logged and stored with the message.
    pub reference: &'a str,
    /// Empty: none.
    pub idempotency_key: &'a str,
    /// Who calls (the key file's name); empty while keys are off. Idempotency keys are the
    /// caller's own: two callers using `inv-1` never see each other's answer.
    pub caller: &'a str,
}

/// Longest `reference`, in characters.
pub const MAX_REFERENCE_CHARS: usize = 256;

/// Checks a caller's `reference`: short, and free of characters that could forge a log line.
pub fn check_reference(reference: &str) -> Result<(), String> {
    if reference.chars().count() > MAX_REFERENCE_CHARS {
        return Err(format!("must be at most {MAX_REFERENCE_CHARS} characters"));
    }
    if reference
        .chars()
        .any(|c| c.is_control() || crate::domain::error::is_separator(c))
    {
        return Err("must not contain control characters or line breaks".to_owned());
    }
    Ok(())
}

pub struct Notifier {
    templates: TemplateRegistry,
    outbox: Arc<Outbox>,
}

impl Notifier {
    pub fn new(templates: TemplateRegistry, outbox: Arc<Outbox>) -> Self {
        Notifier { templates, outbox }
    }

    /// `SendTemplate`: checks the whole request, then sends it through the pipeline.
    pub async fn send_template(
        &self,
        request: &NotificationRequest<'_>,
        deadline: Option<Instant>,
    ) -> Result<Accepted, Error> {
        let outgoing = self.prepare(request)?;
        self.outbox.send(&outgoing, deadline).await
    }

    pub fn templates(&self) -> &TemplateRegistry {
        &self.templates
    }

    /// The registry keys SendTemplate accepts: every template but the AUTHENTICATION ones.
    fn sendable_keys(&self) -> Vec<&str> {
        self.templates
            .keys()
            .into_iter()
            .filter(|k| {
                self.templates
                    .get(k)
                    .is_some_and(|t| t.category != Category::Authentication)
            })
            .collect()
    }

    /// Checks the whole request and reports every problem at once, each naming its field.
    pub fn prepare(&self, request: &NotificationRequest<'_>) -> Result<Outgoing, Error> {
        let mut violations = Violations::new();
        let phone = match phone::normalize(request.phone) {
            Ok(p) => Some(p),
            Err(e) => {
                violations.push("phone", e.to_string());
                None
            }
        };
        if !request.language.is_empty() && !templates::is_language_code(request.language) {
            violations.push(
                "language",
                "must be a Meta language code such as id or en_US",
            );
        }
        if let Err(problem) = check_reference(request.reference) {
            violations.push("reference", problem);
        }
        let key = request.idempotency_key;
        if key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            violations.push(
                "idempotency_key",
                "must be 1 to 128 printable ASCII characters without spaces",
            );
        }
        let template = if request.template.is_empty() {
            violations.push(
                "template",
                format!("is required; one of: {}", self.sendable_keys().join(", ")),
            );
            None
        } else {
            match self.templates.get(request.template) {
                None => {
                    violations.push(
                        "template",
                        format!(
                            "unknown template {}; known: {}",
                            echo(request.template),
                            self.sendable_keys().join(", ")
                        ),
                    );
                    None
                }
                Some(t) if t.category == Category::Authentication => {
                    // The OTP limits (country allow-list, cooldown, hourly and daily caps) apply
                    // only in SendOtp: a login code template sent from here would skip them all.
                    violations.push(
                        "template",
                        format!(
                            "{} is an AUTHENTICATION template: login codes are sent only through \
                             OtpService.SendOtp, which applies the OTP limits",
                            t.key
                        ),
                    );
                    None
                }
                Some(t) => Some(t),
            }
        };

        let mut values: Vec<String> = Vec::new();
        if let Some(t) = template {
            // Only error texts use the list: build it when one is written.
            let expected = || t.params.join(", ");
            if !request.params.is_empty() && !request.positional_params.is_empty() {
                violations.push(
                    "positional_params",
                    "use params (by name) or positional_params, not both",
                );
            } else if !request.positional_params.is_empty() {
                if request.positional_params.len() != t.params.len() {
                    violations.push(
                        "positional_params",
                        format!(
                            "template {} takes {} parameters ({}), got {}",
                            t.key,
                            t.params.len(),
                            expected(),
                            request.positional_params.len()
                        ),
                    );
                }
                for (i, value) in request.positional_params.iter().enumerate() {
                    if let Err(problem) = templates::check_param_text(value) {
                        violations.push(format!("positional_params[{i}]"), problem);
                    }
                }
                values = request.positional_params.to_vec();
            } else {
                for name in &t.params {
                    match request.params.get(name) {
                        None => violations.push(
                            format!("params[{name}]"),
                            format!("is required by template {} ({})", t.key, expected()),
                        ),
                        Some(value) => {
                            if let Err(problem) = templates::check_param_text(value) {
                                violations.push(format!("params[{name}]"), problem);
                            }
                            values.push(value.clone());
                        }
                    }
                }
                let mut unknown: Vec<&String> = request
                    .params
                    .keys()
                    .filter(|k| !t.params.contains(k))
                    .collect();
                unknown.sort();
                for name in unknown {
                    violations.push(
                        format!("params[{}]", sanitize(name)),
                        format!("is not a parameter of template {} ({})", t.key, expected()),
                    );
                }
            }
            let total: usize = values.iter().map(|v| v.chars().count()).sum();
            if total > templates::MAX_BODY_CHARS {
                violations.push(
                    "params",
                    format!(
                        "the parameters total {total} characters; Meta's whole message body is at most {}",
                        templates::MAX_BODY_CHARS
                    ),
                );
            }
        }

        match (phone, template) {
            (Some(to), Some(t)) if violations.is_empty() => {
                // The runtime settings win over the registry; a request's own language wins over
                // both.
                let settings = self.outbox.settings().current();
                Ok(Outgoing {
                    message: OutboundTemplate {
                        to,
                        template: settings.name(t).value,
                        language: if request.language.is_empty() {
                            settings.language(t).value
                        } else {
                            request.language.to_owned()
                        },
                        body_params: values,
                        button_param: None,
                        sensitive: false,
                    },
                    template_key: t.key.clone(),
                    category: t.category,
                    reference: request.reference.to_owned(),
                    // Caller names have no `/`: `billing/inv-1` cannot be another caller's key.
                    idempotency_key: (!key.is_empty()).then(|| match request.caller {
                        "" => key.to_owned(),
                        caller => format!("{caller}/{key}"),
                    }),
                    priority: Priority::Single,
                    batch_id: String::new(),
                })
            }
            _ => Err(Error::InvalidArgument(violations)),
        }
    }
}
