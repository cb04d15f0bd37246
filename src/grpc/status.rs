//! The one mapping from the domain error to gRPC statuses with rich details (`tonic-types`):
//! BadRequest for invalid fields, ErrorInfo with a reason for everything else, RetryInfo where a
//! retry may succeed. The `match`es list every variant and every Meta error kind: a new variant
//! does not compile until someone decides its status code.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::{
    domain::{error::Error, reason::Reason},
    whatsapp::MetaErrorKind,
};

/// `google.rpc.ErrorInfo.domain` of every error kabar produces.
pub const ERROR_DOMAIN: &str = "kabar";

/// The gRPC code of an error (for the status, logs and metrics).
pub fn code(e: &Error) -> Code {
    match e {
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
        Error::IdempotencyKeyReused => Code::FailedPrecondition,
        Error::MessageNotFound(_) => Code::NotFound,
        Error::CursorExpired(_) => Code::OutOfRange,
        Error::BatchNotFound(_) => Code::NotFound,
        Error::BatchClosed { .. } => Code::FailedPrecondition,
        Error::Unauthenticated { .. } => Code::Unauthenticated,
        Error::MissingScope { .. } => Code::PermissionDenied,
        Error::SettingsRevisionMismatch { .. } => Code::FailedPrecondition,
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

fn info(reason: Reason, metadata: &[(&str, String)]) -> ErrorDetails {
    ErrorDetails::with_error_info(
        reason.as_str(),
        ERROR_DOMAIN,
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<std::collections::HashMap<_, _>>(),
    )
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = code(&e);
        let message = e.summary();
        let details = match &e {
            Error::InvalidArgument(violations) => ErrorDetails::with_bad_request(
                violations
                    .shown()
                    .iter()
                    .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
                    .collect::<Vec<_>>(),
            ),
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
                let mut d = info(Reason::MetaUnreachable, &[]);
                d.set_retry_info(Some(Duration::from_secs(5)));
                d
            }
            Error::MetaOutcomeUnknown(_) => info(Reason::MetaOutcomeUnknown, &[]),
            Error::WhatsAppDisabled => info(Reason::WhatsappDisabled, &[]),
            Error::CountryNotAllowed(cc) => info(
                Reason::OtpCountryNotAllowed,
                &[("country_code", cc.to_string())],
            ),
            Error::Limited {
                reason,
                retry_after,
                ..
            } => {
                let mut d = info(
                    *reason,
                    // Whole seconds, rounded up: RetryInfo carries the exact wait.
                    &[(
                        "retry_after_seconds",
                        retry_after.as_millis().div_ceil(1000).to_string(),
                    )],
                );
                d.set_retry_info(Some(*retry_after));
                d
            }
            Error::StoreUnavailable(_) => {
                let mut d = info(Reason::StoreUnavailable, &[]);
                d.set_retry_info(Some(Duration::from_secs(1)));
                d
            }
            Error::DeadlineExceeded { .. } => ErrorDetails::new(),
            Error::IdempotencyInFlight => {
                let mut d = info(Reason::IdempotencyKeyInFlight, &[]);
                d.set_retry_info(Some(Duration::from_secs(1)));
                d
            }
            Error::IdempotencyKeyReused => info(Reason::IdempotencyKeyReused, &[]),
            Error::MessageNotFound(_) => info(Reason::MessageNotFound, &[]),
            Error::CursorExpired(_) => info(Reason::CursorExpired, &[]),
            Error::BatchNotFound(_) => info(Reason::BatchNotFound, &[]),
            Error::Unauthenticated { missing: true } => info(Reason::ApiKeyMissing, &[]),
            Error::Unauthenticated { missing: false } => info(Reason::ApiKeyInvalid, &[]),
            Error::MissingScope { scope, caller, .. } => info(
                Reason::MissingScope,
                &[("scope", (*scope).to_owned()), ("caller", caller.clone())],
            ),
            Error::BatchClosed { state, .. } => {
                info(Reason::BatchClosed, &[("state", (*state).to_owned())])
            }
            Error::SettingsRevisionMismatch { current, .. } => info(
                Reason::SettingsRevisionMismatch,
                &[("current_revision", current.to_string())],
            ),
        };
        Status::with_error_details(code, message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::error::{MAX_MESSAGE_BYTES, Violations};

    #[test]
    fn grpc_message_is_bounded() {
        let mut v = Violations::new();
        for i in 0..10 {
            v.push(
                format!("params[{}]", "ü".repeat(500)),
                format!("bad {i} {}", "x".repeat(500)),
            );
        }
        let status: Status = Error::InvalidArgument(v).into();
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(status.details().len() < 6_000, "{}", status.details().len());
    }
}
