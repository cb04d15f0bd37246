//! The domain error: what went wrong, in kabar's words, free of any transport. The gRPC edge
//! (`grpc/status.rs`) maps it to status codes and rich details; whether a message may have reached
//! the customer is decided here, once.

use std::time::Duration;

use super::reason::Reason;
use crate::whatsapp::{MetaFailure, SendError};

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field's path, e.g. `params[nama]`.
    pub field: String,
    pub description: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// One or more request fields are invalid; nothing was sent or stored.
    #[error("invalid request: {0}")]
    InvalidArgument(Violations),
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
    /// `WHATSAPP_ENABLED=false`, or the runtime setting that overrides it.
    #[error(
        "WhatsApp sending is disabled on this kabar (WHATSAPP_ENABLED=false, or the runtime setting whatsapp_enabled)"
    )]
    WhatsAppDisabled,
    /// OTP codes are not sent to this country (`KABAR_OTP_ALLOWED_COUNTRIES`).
    #[error("OTP codes are not sent to numbers with country code +{0}")]
    CountryNotAllowed(u16),
    /// A kabar-side limit: cooldown, hourly caps, daily cap.
    #[error("{message}")]
    Limited {
        reason: Reason,
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
    /// The idempotency key was used before for a different request.
    #[error(
        "this idempotency_key was already used for a different request (another recipient, template, language, parameters or reference); use a new key for a new message"
    )]
    IdempotencyKeyReused,
    /// No record of this message id (never sent by kabar, or older than the retention).
    #[error("kabar has no record of message {0}")]
    MessageNotFound(String),
    /// A feed cursor from before the oldest retained event.
    #[error(
        "the cursor {0} is older than the oldest retained event: events were lost to this reader; read again from \"0\" and reconcile"
    )]
    CursorExpired(String),
    /// The call carries no API key, or one kabar does not know.
    #[error(
        "{}",
        if *missing {
            "this call needs an API key: send metadata authorization: Bearer <key>"
        } else {
            "the API key is not valid (unknown, or removed from KABAR_API_KEYS_FILE)"
        }
    )]
    Unauthenticated { missing: bool },
    /// The caller's key lacks the scope the RPC needs.
    #[error("the key of {caller} lacks the scope {scope}, which {method} needs")]
    MissingScope {
        caller: String,
        scope: &'static str,
        method: &'static str,
    },
    /// No batch with this id (never submitted, or older than the retention).
    #[error("kabar has no batch {0}")]
    BatchNotFound(String),
    /// The batch does not take this change in its state (new items for a closed, done or
    /// cancelled batch; resuming a finished one).
    #[error("batch {batch_id} is {state}: {what}")]
    BatchClosed {
        batch_id: String,
        state: &'static str,
        what: &'static str,
    },
    /// UpdateSettings with an `expected_revision` that is no longer the stored one: someone
    /// else changed the settings since they were read.
    #[error(
        "the settings are at revision {current}, not {expected}: someone else changed them; read them again (GetSettings) and repeat the change"
    )]
    SettingsRevisionMismatch { expected: u64, current: u64 },
}

/// At most this many field violations are reported; the rest are only counted, so that an answer
/// stays small however much bad input a request carries.
pub const MAX_VIOLATIONS: usize = 10;
/// At most this many characters of a caller's own text are echoed in an error.
pub const MAX_ECHO_CHARS: usize = 64;
/// Longest field path and description kept in one violation.
const MAX_FIELD_CHARS: usize = 96;
const MAX_DESCRIPTION_CHARS: usize = 320;
/// Longest `grpc-message`: the details carry the rest.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// The field violations of one request: the first [`MAX_VIOLATIONS`], each cut to a bounded
/// length, and how many more there were.
#[derive(Debug, Clone, Default)]
pub struct Violations {
    shown: Vec<Violation>,
    omitted: usize,
}

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.shown.len() >= MAX_VIOLATIONS {
            self.omitted += 1;
            return;
        }
        self.shown.push(Violation {
            field: cut(&field.into(), MAX_FIELD_CHARS),
            description: cut(&description.into(), MAX_DESCRIPTION_CHARS),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.shown.is_empty()
    }

    /// Every violation, counted ones included.
    pub fn len(&self) -> usize {
        self.shown.len() + self.omitted
    }

    /// The reported violations (at most [`MAX_VIOLATIONS`]).
    pub fn shown(&self) -> &[Violation] {
        &self.shown
    }
}

impl std::fmt::Display for Violations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, v) in self.shown.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        if self.omitted > 0 {
            write!(f, "; and {} more", self.omitted)?;
        }
        Ok(())
    }
}

/// A caller's text as it may appear in an error or a log line: at most [`MAX_ECHO_CHARS`]
/// characters, control and separator characters escaped, quoted.
pub fn echo(text: &str) -> String {
    format!("\"{}\"", sanitize(text))
}

/// A caller's text cut to [`MAX_ECHO_CHARS`] characters, with quotes, backslashes, control and
/// separator characters escaped, so that it cannot break a log line or an error text.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_ECHO_CHARS * 2));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_ECHO_CHARS {
            out.push_str("...");
            break;
        }
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() || is_separator(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Characters that must never reach a log line or a terminal as they are: line and paragraph
/// separators (some log readers treat them as line breaks) and the bidirectional controls, which
/// make a line display in another order than it is written (U+202E turns text around).
pub fn is_separator(c: char) -> bool {
    matches!(
        c,
        '\u{2028}'
            | '\u{2029}'
            | '\u{0085}'
            | '\u{061c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// `text` with control, separator and bidirectional characters escaped (`\u{..}`): safe for a
/// log line or a status message whatever its source (a caller, or Meta's answer).
pub fn escape_unsafe(text: &str) -> String {
    if !text.chars().any(|c| c.is_control() || is_separator(c)) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() || is_separator(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// `text` cut to at most `max` characters (an ellipsis marks the cut).
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((at, _)) => format!("{}...", &text[..at]),
    }
}

/// Text from outside (Meta's answers) as kabar passes it on: escaped, and at most `max` bytes.
pub fn bounded_text(text: &str, max: usize) -> String {
    cut_bytes(escape_unsafe(text), max)
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut_bytes(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut at = max.saturating_sub(3);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push_str("...");
    }
    text
}

impl Error {
    /// The error in words, at most [`MAX_MESSAGE_BYTES`]: the `grpc-message` and the log line.
    /// Text from Meta's answer is escaped like a caller's.
    pub fn summary(&self) -> String {
        cut_bytes(escape_unsafe(&self.to_string()), MAX_MESSAGE_BYTES)
    }

    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = Violations::new();
        v.push(field, description);
        Error::InvalidArgument(v)
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
            | Error::IdempotencyInFlight
            | Error::IdempotencyKeyReused
            | Error::MessageNotFound(_)
            | Error::CursorExpired(_)
            | Error::BatchNotFound(_)
            | Error::BatchClosed { .. }
            | Error::Unauthenticated { .. }
            | Error::MissingScope { .. }
            | Error::SettingsRevisionMismatch { .. } => false,
        }
    }
}

impl From<super::ports::StoreError> for Error {
    fn from(e: super::ports::StoreError) -> Self {
        Error::StoreUnavailable(e.0)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_past_the_cap_are_counted_not_kept() {
        let mut v = Violations::new();
        for i in 0..5_000 {
            v.push(format!("params[{i}]"), "x".repeat(10_000));
        }
        assert_eq!(v.shown().len(), MAX_VIOLATIONS);
        assert_eq!(v.len(), 5_000);
        assert!(
            v.shown()
                .iter()
                .all(|f| f.description.chars().count() <= 323)
        );
        assert!(v.to_string().ends_with("; and 4990 more"));
    }

    #[test]
    fn meta_text_is_escaped_in_the_summary() {
        let e = Error::MetaOutcomeUnknown("a\nforged line \u{1b}[2J \u{202e}evil".into());
        let summary = e.summary();
        assert!(!summary.contains('\n') && !summary.contains('\u{1b}'));
        assert!(!summary.contains('\u{202e}'), "{summary}");
        assert!(summary.contains("\\u{202e}"), "{summary}");
    }

    #[test]
    fn echo_escapes_and_cuts() {
        assert_eq!(echo("inv\n\u{1b}[31m"), "\"inv\\u{a}\\u{1b}[31m\"");
        assert_eq!(echo("a\u{2028}b"), "\"a\\u{2028}b\"");
        let long = echo(&"é".repeat(1000));
        assert_eq!(long.chars().count(), MAX_ECHO_CHARS + 5);
        assert!(long.ends_with("...\""));
    }
}
