//! Delivery of template messages: Meta's WhatsApp Cloud API, or the `log` driver for development.
//!
//! The client knows nothing of gRPC: it takes an [`OutboundTemplate`] and answers [`Sent`] or a
//! [`SendError`].

mod classify;
mod meta;
pub mod webhook;

use std::time::Instant;

use serde::Serialize;

pub use classify::{
    MetaErrorBody, MetaErrorKind, MetaErrorObject, MetaFailure, SendContext, classify,
    reason_of_code,
};
pub use meta::{LastError, LastSends, MetaClient, MetaSettings};

use crate::phone::Phone;

/// A template message ready for Meta: the wire body is derived from it.
#[derive(Clone)]
pub struct OutboundTemplate {
    pub to: Phone,
    pub template: String,
    pub language: String,
    /// Body parameters in `{{1}}..{{n}}` order.
    pub body_params: Vec<String>,
    /// The parameter of the copy-code button of an AUTHENTICATION template.
    pub button_param: Option<String>,
    /// Whether the parameters are secret (an OTP code): kept out of logs and `Debug`.
    pub sensitive: bool,
}

impl std::fmt::Debug for OutboundTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("OutboundTemplate");
        d.field("to", &self.to)
            .field("template", &self.template)
            .field("language", &self.language);
        if self.sensitive {
            d.field("body_params", &"[redacted]");
        } else {
            d.field("body_params", &self.body_params);
        }
        d.finish_non_exhaustive()
    }
}

impl OutboundTemplate {
    /// The exact JSON body of `POST /{version}/{phone-number-id}/messages`.
    pub fn to_meta_json(&self) -> MetaMessage<'_> {
        let mut components = Vec::with_capacity(2);
        if !self.body_params.is_empty() {
            components.push(Component {
                kind: "body",
                sub_type: None,
                index: None,
                parameters: self
                    .body_params
                    .iter()
                    .map(|t| TextParam {
                        kind: "text",
                        text: t,
                    })
                    .collect(),
            });
        }
        if let Some(code) = &self.button_param {
            components.push(Component {
                kind: "button",
                sub_type: Some("url"),
                index: Some("0"),
                parameters: vec![TextParam {
                    kind: "text",
                    text: code,
                }],
            });
        }
        MetaMessage {
            messaging_product: "whatsapp",
            recipient_type: "individual",
            to: self.to.e164(),
            kind: "template",
            template: TemplateObject {
                name: &self.template,
                language: Language {
                    code: &self.language,
                },
                components,
            },
        }
    }
}

#[derive(Serialize)]
pub struct MetaMessage<'a> {
    messaging_product: &'static str,
    recipient_type: &'static str,
    to: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    template: TemplateObject<'a>,
}

#[derive(Serialize)]
struct TemplateObject<'a> {
    name: &'a str,
    language: Language<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    components: Vec<Component<'a>>,
}

#[derive(Serialize)]
struct Language<'a> {
    code: &'a str,
}

#[derive(Serialize)]
struct Component<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<&'static str>,
    parameters: Vec<TextParam<'a>>,
}

#[derive(Serialize)]
struct TextParam<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// Meta accepted the message (accepted is not delivered: delivery arrives later by webhook).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub message_id: String,
    pub wa_id: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Meta answered with an error.
    #[error("{0}")]
    Meta(MetaFailure),
    /// Meta could not be reached: nothing was sent.
    #[error("WhatsApp Cloud API unreachable: {0}")]
    Unreachable(String),
    /// The request went out but no usable answer came back (a timeout, a broken connection, an
    /// unreadable body): Meta may have delivered the message.
    #[error(
        "no usable answer from the WhatsApp Cloud API (the message may have been delivered): {0}"
    )]
    Uncertain(String),
    /// The caller's deadline passed; `sent` says whether a request had gone out by then.
    #[error("deadline exceeded while waiting for Meta")]
    DeadlineExceeded { sent: bool },
}

/// The configured way of delivering messages.
#[derive(Debug, Clone)]
pub enum Driver {
    Meta(MetaClient),
    Log,
}

impl Driver {
    /// The driver the configuration asks for.
    pub fn from_config(config: &crate::config::Config) -> Result<Self, String> {
        match (&config.driver, &config.meta) {
            (crate::config::DriverKind::Meta, Some(meta)) => {
                Ok(Driver::Meta(MetaClient::new(meta)?))
            }
            _ => Ok(Driver::Log),
        }
    }

    /// The longest one send may take (the `log` driver answers at once).
    pub fn longest_send(&self) -> std::time::Duration {
        match self {
            Driver::Meta(client) => client.longest_send(),
            Driver::Log => std::time::Duration::ZERO,
        }
    }

    /// Sends one template message, retrying what is retryable, never past `deadline` and never
    /// more than `attempts` requests (what is left of the message's attempts; each request
    /// made takes one).
    pub async fn send(
        &self,
        message: &OutboundTemplate,
        deadline: Option<Instant>,
        attempts: &mut u32,
    ) -> Result<Sent, SendError> {
        match self {
            Driver::Meta(client) => client.send(message, deadline, attempts).await,
            Driver::Log => {
                *attempts = attempts.saturating_sub(1);
                Ok(log_send(message))
            }
        }
    }

    /// The number's messaging limit tier from Meta; `None` for the `log` driver.
    pub async fn messaging_limit(&self) -> Option<Result<String, SendError>> {
        match self {
            Driver::Meta(client) => Some(client.messaging_limit().await),
            Driver::Log => None,
        }
    }

    /// The business number whose limits apply: its phone number ID (`log` for the `log`
    /// driver).
    pub fn number(&self) -> &str {
        match self {
            Driver::Meta(client) => client.phone_number_id(),
            Driver::Log => "log",
        }
    }

    /// Attempts at one message, the first included (`KABAR_META_MAX_ATTEMPTS`).
    pub fn max_attempts(&self) -> u32 {
        match self {
            Driver::Meta(client) => client.max_attempts(),
            Driver::Log => 1,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Driver::Meta(_) => "meta",
            Driver::Log => "log",
        }
    }
}

/// The `log` driver: writes what would have been sent and invents a message id. This is the one
/// place where an OTP code may appear in a log, and only because nothing is sent in this mode.
fn log_send(message: &OutboundTemplate) -> Sent {
    let mut random = [0u8; 12];
    // The id only needs to be unique enough for a demo; a failing OS RNG still yields an id.
    let _ = getrandom::fill(&mut random);
    let message_id = format!("wamid.log.{}", hex::encode(random));
    tracing::info!(
        driver = "log",
        to = %message.to,
        template = %message.template,
        language = %message.language,
        params = ?message.body_params,
        message_id = %message_id,
        "WHATSAPP_DRIVER=log: message not sent, logged instead (development only)"
    );
    Sent {
        message_id,
        wa_id: message.to.digits().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::OutboundTemplate;

    fn message(button: Option<&str>) -> OutboundTemplate {
        OutboundTemplate {
            to: crate::phone::normalize("0812-3456-7890").unwrap(),
            template: "otp_code".into(),
            language: "id".into(),
            body_params: vec!["482913".into()],
            button_param: button.map(str::to_owned),
            sensitive: button.is_some(),
        }
    }

    #[test]
    fn meta_receives_parameters_in_order_and_the_copy_code_button() {
        let json = serde_json::to_value(message(Some("482913")).to_meta_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": "+6281234567890",
                "type": "template",
                "template": {
                    "name": "otp_code",
                    "language": {"code": "id"},
                    "components": [
                        {"type": "body", "parameters": [{"type": "text", "text": "482913"}]},
                        {"type": "button", "sub_type": "url", "index": "0",
                         "parameters": [{"type": "text", "text": "482913"}]}
                    ]
                }
            })
        );
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let shown = format!("{:?}", message(Some("482913")));
        assert!(!shown.contains("482913"), "{shown}");
        let plain = format!("{:?}", message(None));
        assert!(plain.contains("482913"));
    }
}
