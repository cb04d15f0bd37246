//! Billing notifications: a registry key and its parameters become one template message, checked
//! completely before anything is sent, then delivered through the configured driver.

use std::{collections::HashMap, time::Instant};

use tonic_types::FieldViolation;

use crate::{
    error::Error,
    phone,
    templates::{self, Category, TemplateRegistry},
    whatsapp::{Driver, OutboundTemplate, Sent},
};

/// What a caller asks to send, as received.
pub struct NotificationRequest<'a> {
    pub phone: &'a str,
    pub template: &'a str,
    pub params: &'a HashMap<String, String>,
    pub positional_params: &'a [String],
    pub language: &'a str,
}

pub struct Notifier {
    templates: TemplateRegistry,
    driver: Driver,
    enabled: bool,
}

impl Notifier {
    pub fn new(templates: TemplateRegistry, driver: Driver, enabled: bool) -> Self {
        Notifier {
            templates,
            driver,
            enabled,
        }
    }

    pub fn templates(&self) -> &TemplateRegistry {
        &self.templates
    }

    /// Checks the whole request and reports every problem at once, each naming its field.
    pub fn prepare(&self, request: &NotificationRequest<'_>) -> Result<OutboundTemplate, Error> {
        let mut violations = Vec::new();
        let phone = match phone::normalize(request.phone) {
            Ok(p) => Some(p),
            Err(e) => {
                violations.push(FieldViolation::new("phone", e.to_string()));
                None
            }
        };
        if !request.language.is_empty() && !templates::is_language_code(request.language) {
            violations.push(FieldViolation::new(
                "language",
                "must be a Meta language code such as id or en_US",
            ));
        }
        let template = if request.template.is_empty() {
            violations.push(FieldViolation::new(
                "template",
                format!("is required; one of: {}", self.templates.keys().join(", ")),
            ));
            None
        } else {
            let found = self.templates.get(request.template);
            if found.is_none() {
                violations.push(FieldViolation::new(
                    "template",
                    format!(
                        "unknown template {:?}; known: {}",
                        request.template,
                        self.templates.keys().join(", ")
                    ),
                ));
            }
            found
        };

        let mut values: Vec<String> = Vec::new();
        if let Some(t) = template {
            // Only error texts use the list: build it when one is written.
            let expected = || t.params.join(", ");
            if !request.params.is_empty() && !request.positional_params.is_empty() {
                violations.push(FieldViolation::new(
                    "positional_params",
                    "use params (by name) or positional_params, not both",
                ));
            } else if !request.positional_params.is_empty() {
                if request.positional_params.len() != t.params.len() {
                    violations.push(FieldViolation::new(
                        "positional_params",
                        format!(
                            "template {} takes {} parameters ({}), got {}",
                            t.key,
                            t.params.len(),
                            expected(),
                            request.positional_params.len()
                        ),
                    ));
                }
                for (i, value) in request.positional_params.iter().enumerate() {
                    if let Err(problem) = templates::check_param_text(value) {
                        violations.push(FieldViolation::new(
                            format!("positional_params[{i}]"),
                            problem,
                        ));
                    }
                }
                values = request.positional_params.to_vec();
            } else {
                for name in &t.params {
                    match request.params.get(name) {
                        None => violations.push(FieldViolation::new(
                            format!("params[{name}]"),
                            format!("is required by template {} ({})", t.key, expected()),
                        )),
                        Some(value) => {
                            if let Err(problem) = templates::check_param_text(value) {
                                violations
                                    .push(FieldViolation::new(format!("params[{name}]"), problem));
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
                    violations.push(FieldViolation::new(
                        format!("params[{name}]"),
                        format!("is not a parameter of template {} ({})", t.key, expected()),
                    ));
                }
            }
            let total: usize = values.iter().map(|v| v.chars().count()).sum();
            if total > templates::MAX_BODY_CHARS {
                violations.push(FieldViolation::new(
                    "params",
                    format!(
                        "the parameters total {total} characters; Meta's whole message body is at most {}",
                        templates::MAX_BODY_CHARS
                    ),
                ));
            }
            if t.category == Category::Authentication
                && values
                    .first()
                    .is_some_and(|c| c.chars().count() > templates::MAX_OTP_CODE_CHARS)
            {
                violations.push(FieldViolation::new(
                    "params",
                    format!(
                        "an authentication code is at most {} characters",
                        templates::MAX_OTP_CODE_CHARS
                    ),
                ));
            }
        }

        match (phone, template) {
            (Some(to), Some(t)) if violations.is_empty() => {
                let authentication = t.category == Category::Authentication;
                Ok(OutboundTemplate {
                    to,
                    template: t.name.clone(),
                    language: if request.language.is_empty() {
                        t.language.clone()
                    } else {
                        request.language.to_owned()
                    },
                    button_param: authentication.then(|| values[0].clone()),
                    body_params: values,
                    sensitive: authentication,
                })
            }
            _ => Err(Error::InvalidArgument(violations)),
        }
    }

    pub async fn send(
        &self,
        message: &OutboundTemplate,
        deadline: Option<Instant>,
    ) -> Result<Sent, Error> {
        if !self.enabled {
            return Err(Error::WhatsAppDisabled);
        }
        Ok(self.driver.send(message, deadline).await?)
    }
}
