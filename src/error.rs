//! The domain error and its one mapping to gRPC statuses. The `match` lists every variant and every
//! Meta error kind: a new variant does not compile until someone decides its status code.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::whatsapp::{MetaErrorKind, MetaFailure, SendError};

/// `google.rpc.ErrorInfo.domain` of every error kabar produces.
pub const ERROR_DOMAIN: &str = "kabar";

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// One or more request fields are invalid; nothing was sent or stored.
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// Meta refused the message.
    #[error("{0}")]
    Meta(MetaFailure),
    /// Meta could not be reached; nothing was sent.
    #[error("the WhatsApp Cloud API is unreachable: {0}")]
    MetaUnreachable(String),
    /// The request reached Meta but no usable answer came back; it may have been delivered.
    #[error(
        "no usable answer from the WhatsApp Cloud API; the message may have been delivered, so check before sending it again: {0}"
    )]
    MetaOutcomeUnknown(String),
    /// `WHATSAPP_ENABLED=false`.
    #[error("WhatsApp sending is disabled on this kabar (WHATSAPP_ENABLED=false)")]
    WhatsAppDisabled,
    /// OTP codes are not sent to this country (`KABAR_OTP_ALLOWED_COUNTRIES`).
    #[error("OTP codes are not sent to numbers with country code +{0}")]
    CountryNotAllowed(u16),
    /// A kabar-side limit: cooldown, hourly caps, daily cap.
    #[error("{message}")]
    Limited {
        reason: &'static str,
        message: String,
        retry_after: Duration,
    },
    /// The store (Redis) is unreachable or too slow.
    #[error("the store (Redis) is unavailable: {0}")]
    StoreUnavailable(String),
    /// The caller's deadline passed; `maybe_delivered` when a request to Meta had gone out.
    #[error("deadline exceeded")]
    DeadlineExceeded { maybe_delivered: bool },
    /// The same idempotency key is being processed by another call right now.
    #[error("a call with this idempotency_key is still in progress")]
    IdempotencyInFlight,
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// Whether a message may have reached the customer although the call failed: such a call
    /// must not be repeated blindly (idempotency keys stay taken, OTP codes stay valid).
    pub fn may_have_been_delivered(&self) -> bool {
        match self {
            Error::MetaOutcomeUnknown(_) => true,
            Error::DeadlineExceeded { maybe_delivered } => *maybe_delivered,
            Error::InvalidArgument(_)
            | Error::Meta(_)
            | Error::MetaUnreachable(_)
            | Error::WhatsAppDisabled
            | Error::CountryNotAllowed(_)
            | Error::Limited { .. }
            | Error::StoreUnavailable(_)
            | Error::IdempotencyInFlight => false,
        }
    }

    /// The gRPC code alone (for logs and metrics).
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Meta(f) => meta_code(f.kind),
            Error::MetaUnreachable(_) => Code::Unavailable,
            // Not UNAVAILABLE: gRPC retry policies resend UNAVAILABLE calls on their own, and this
            // message may already have been delivered.
            Error::MetaOutcomeUnknown(_) => Code::Unknown,
            Error::WhatsAppDisabled => Code::FailedPrecondition,
            Error::CountryNotAllowed(_) => Code::FailedPrecondition,
            Error::Limited { .. } => Code::ResourceExhausted,
            Error::StoreUnavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Error::IdempotencyInFlight => Code::Aborted,
        }
    }
}

fn meta_code(kind: MetaErrorKind) -> Code {
    match kind {
        MetaErrorKind::InvalidArgument => Code::InvalidArgument,
        MetaErrorKind::Configuration => Code::FailedPrecondition,
        MetaErrorKind::RecipientUndeliverable => Code::FailedPrecondition,
        MetaErrorKind::RateLimited => Code::ResourceExhausted,
        MetaErrorKind::Unavailable => Code::Unavailable,
        MetaErrorKind::Unclassified => Code::Unknown,
    }
}

fn info(reason: &str, metadata: &[(&str, String)]) -> ErrorDetails {
    ErrorDetails::with_error_info(
        reason,
        ERROR_DOMAIN,
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<std::collections::HashMap<_, _>>(),
    )
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Meta(f) => Error::Meta(f),
            SendError::Unreachable(m) => Error::MetaUnreachable(m),
            SendError::Uncertain(m) => Error::MetaOutcomeUnknown(m),
            SendError::DeadlineExceeded { sent } => Error::DeadlineExceeded {
                maybe_delivered: sent,
            },
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = e.code();
        let message = e.to_string();
        let details = match &e {
            Error::InvalidArgument(violations) => {
                ErrorDetails::with_bad_request(violations.clone())
            }
            Error::Meta(f) => {
                let mut metadata = vec![
                    ("meta_code", f.meta_code.to_string()),
                    ("http_status", f.http_status.to_string()),
                    ("details", f.details.clone()),
                    ("remedy", f.remedy.clone()),
                ];
                if let Some(trace) = &f.fbtrace_id {
                    metadata.push(("fbtrace_id", trace.clone()));
                }
                let mut d = info(f.reason, &metadata);
                if let Some(wait) = f.retry_after {
                    d.set_retry_info(Some(wait));
                }
                d
            }
            Error::MetaUnreachable(_) => {
                let mut d = info("META_UNREACHABLE", &[]);
                d.set_retry_info(Some(Duration::from_secs(5)));
                d
            }
            Error::MetaOutcomeUnknown(_) => info("META_OUTCOME_UNKNOWN", &[]),
            Error::WhatsAppDisabled => info("WHATSAPP_DISABLED", &[]),
            Error::CountryNotAllowed(cc) => info(
                "OTP_COUNTRY_NOT_ALLOWED",
                &[("country_code", cc.to_string())],
            ),
            Error::Limited {
                reason,
                retry_after,
                ..
            } => {
                let mut d = info(
                    reason,
                    &[("retry_after_seconds", retry_after.as_secs().to_string())],
                );
                d.set_retry_info(Some(*retry_after));
                d
            }
            Error::StoreUnavailable(_) => {
                let mut d = info("STORE_UNAVAILABLE", &[]);
                d.set_retry_info(Some(Duration::from_secs(1)));
                d
            }
            Error::DeadlineExceeded { .. } => ErrorDetails::new(),
            Error::IdempotencyInFlight => {
                let mut d = info("IDEMPOTENCY_KEY_IN_FLIGHT", &[]);
                d.set_retry_info(Some(Duration::from_secs(1)));
                d
            }
        };
        Status::with_error_details(code, message, details)
    }
}
