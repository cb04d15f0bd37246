//! Meta's webhook, without the transport: checking the signature of a POST and turning its body
//! into domain-neutral events.
//!
//! # What Meta sends
//!
//! Every POST carries one JSON envelope, `{"object": "whatsapp_business_account", "entry": [...]}`,
//! signed with the app secret in the `X-Hub-Signature-256: sha256=<hex>` header (an HMAC-SHA256
//! of the exact raw bytes: Meta escapes non-ASCII and `/`, so re-serialising the JSON would break
//! the check). Each entry is one business account and holds `changes[]`, each a `field` naming the
//! kind of update and a `value` whose shape depends on it:
//!
//! - `messages`: `value.statuses[]` (what became of a message kabar sent: sent, delivered, read,
//!   failed with `errors[]`, with `pricing`) and `value.messages[]` (what a customer wrote).
//! - `message_template_status_update`: a template was approved, rejected, paused, disabled...
//! - `phone_number_quality_update`: the number's quality rating or messaging limit changed.
//!
//! One POST may batch up to 1,000 updates, and the same update may arrive twice or out of order;
//! deciding what a status means for a message record is the caller's business, not this module's.
//!
//! # Why parsing is lenient
//!
//! Meta retries a POST it did not see acknowledged for days and keeps no history of its own. A body
//! refused as a whole is therefore not "an error reported": it is every update in the batch stuck
//! in Meta's retry loop, then lost. So only a body that is not JSON at all, or JSON without the
//! envelope, is an error ([`ParseError`], answered with 400 by the HTTP edge). Inside the envelope,
//! Meta adds fields and values over the API versions (the `conversation` object is gone from v24,
//! `pricing_model` gained `PMP`, new status strings appear): unknown fields are ignored, optional
//! ones may be missing, ids and timestamps are accepted as strings or numbers, and an item that
//! still makes no sense (an unknown status string, a status without an id, a field kabar does not
//! handle) is skipped and counted in [`Parsed::skipped`] rather than failing its neighbours.
//!
//! What is kept is bounded all the same: every string copied from the payload is cut at
//! [`MAX_TEXT_CHARS`] characters, and a body with more than [`MAX_EVENTS`] events is refused.

use std::fmt;
use std::marker::PhantomData;

use hmac::{Hmac, Mac};
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use sha2::Sha256;

/// The most events one body may yield; a body with more is refused with
/// [`ParseError::TooManyEvents`]. Meta batches at most 1,000 updates per POST.
pub const MAX_EVENTS: usize = 10_000;

/// The most characters kept of any string copied from the payload; longer ones are cut.
pub const MAX_TEXT_CHARS: usize = 1_024;

/// The most errors kept for one failed status (Meta sends one).
const MAX_ERRORS_PER_STATUS: usize = 16;

/// The header prefix before the hex digest.
const SIGNATURE_PREFIX: &str = "sha256=";

// ---------------------------------------------------------------------------------------------
// Signature
// ---------------------------------------------------------------------------------------------

/// Why a POST's `X-Hub-Signature-256` header was not accepted. All three mean 401 at the edge;
/// they are distinct for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `X-Hub-Signature-256` header.
    #[error("the X-Hub-Signature-256 header is missing")]
    Missing,
    /// The header is not `sha256=` followed by 64 hex digits.
    #[error("the X-Hub-Signature-256 header is not sha256= followed by 64 hex digits")]
    Malformed,
    /// The header is well formed but does not match the body and the app secret.
    #[error("the X-Hub-Signature-256 header does not match the body")]
    Mismatch,
}

/// Checks Meta's `X-Hub-Signature-256` header (`sha256=<hex>`, the HMAC-SHA256 of `raw_body`
/// keyed with the app secret), comparing in constant time.
///
/// `raw_body` must be the bytes exactly as received, before any parsing. An empty `app_secret`
/// never verifies: anyone could compute that signature.
pub fn verify_signature(
    app_secret: &[u8],
    raw_body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let digest_hex = header
        .trim()
        .strip_prefix(SIGNATURE_PREFIX)
        .ok_or(SignatureError::Malformed)?;
    let mut claimed = [0u8; 32];
    // `decode_to_slice` insists on exactly 64 hex digits for 32 bytes.
    hex::decode_to_slice(digest_hex, &mut claimed).map_err(|_| SignatureError::Malformed)?;
    if app_secret.is_empty() {
        return Err(SignatureError::Mismatch);
    }
    let mut mac =
        Hmac::<Sha256>::new_from_slice(app_secret).expect("HMAC accepts keys of any length");
    mac.update(raw_body);
    mac.verify_slice(&claimed)
        .map_err(|_| SignatureError::Mismatch)
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// What one POST body yields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// The events, in the order of the body (within one change: statuses, then messages).
    pub events: Vec<WebhookEvent>,
    /// Updates that did not become events: unknown status strings, items missing their id or
    /// timestamp or of the wrong shape, changes of fields kabar does not handle.
    pub skipped: usize,
}

/// One update from Meta, free of Meta's envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEvent {
    /// What became of a message sent from the business number.
    Status(StatusUpdate),
    /// A message a customer sent to the business number.
    Inbound(InboundMessage),
    /// A template's review or quality state changed (`message_template_status_update`).
    TemplateStatus(TemplateStatus),
    /// The number's quality rating or messaging limit changed (`phone_number_quality_update`).
    PhoneQuality(PhoneQuality),
}

/// The delivery states Meta reports for an outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    Sent,
    Delivered,
    Read,
    /// Final: the message will not be delivered; see [`StatusUpdate::errors`].
    Failed,
}

impl DeliveryState {
    /// The state for Meta's `status` string, `None` for one kabar does not know (e.g. `played`).
    pub fn from_meta(status: &str) -> Option<Self> {
        match status.to_ascii_lowercase().as_str() {
            "sent" => Some(Self::Sent),
            "delivered" => Some(Self::Delivered),
            "read" => Some(Self::Read),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }

    /// Meta's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `value.statuses[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    /// The `wamid` Meta gave when it accepted the message.
    pub message_id: String,
    pub status: DeliveryState,
    /// When the state was reached, in Unix seconds (Meta's clock).
    pub timestamp: u64,
    /// The recipient's WhatsApp id (digits; a group id for group messages); empty when absent.
    pub recipient_id: String,
    /// Why a failed message failed (usually one error); empty otherwise.
    pub errors: Vec<WebhookError>,
    /// Present when Meta sent a `pricing` object.
    pub pricing: Option<Pricing>,
}

/// One entry of a failed status's `errors[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookError {
    /// Meta's error code (e.g. 131049), the key for classifying it.
    pub code: i64,
    /// Empty when absent.
    pub title: String,
    /// Empty when absent.
    pub message: String,
    /// `error_data.details`, when present.
    pub details: Option<String>,
}

/// A status's `pricing` object (v24 dropped `conversation`; this stays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    pub billable: Option<bool>,
    /// e.g. `utility`, `authentication`, `marketing`, `service`.
    pub category: Option<String>,
    /// `pricing_model`: `CBP`, or `PMP` since July 2025.
    pub model: Option<String>,
    /// `type`, e.g. `regular` or `free_customer_service` (PMP only).
    pub kind: Option<String>,
}

/// One entry of `value.messages[]`: a customer wrote to the business number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    pub message_id: String,
    /// The sender's WhatsApp id (their number in digits, without `+`).
    pub from: String,
    /// Meta's message `type`: `text`, `button`, `interactive`, `image`, ... (`unknown` when absent).
    pub kind: String,
    /// `text.body`, `button.text` or the title of an interactive reply; empty for other kinds.
    pub text: String,
    /// Unix seconds.
    pub timestamp: u64,
    /// The message this one replies to (`context.id`), when it is a reply.
    pub context_message_id: Option<String>,
}

/// A `message_template_status_update`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateStatus {
    /// `APPROVED`, `REJECTED`, `PAUSED`, `DISABLED`, `ARCHIVED`, ...
    pub event: String,
    pub template_name: Option<String>,
    pub language: Option<String>,
    pub template_id: Option<String>,
    /// Meta's `reason`, verbatim (`NONE` when there is none).
    pub reason: Option<String>,
    /// The description of `other_info` or `disable_info` (e.g. why the template was paused).
    pub detail: Option<String>,
    /// The entry's `time` (Unix seconds), when Meta sent one.
    pub at: Option<u64>,
}

/// A `phone_number_quality_update`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneQuality {
    pub display_phone_number: Option<String>,
    /// `FLAGGED`, `UNFLAGGED`, `UPGRADE`, `DOWNGRADE`, `THROUGHPUT_UPGRADE`, ...
    pub event: String,
    /// `TIER_250`, `TIER_1K`, ... (being retired by Meta).
    pub current_limit: Option<String>,
    /// `max_daily_conversations_per_business`, the replacement of `current_limit`, verbatim.
    pub max_daily_conversations: Option<String>,
    /// The entry's `time` (Unix seconds), when Meta sent one.
    pub at: Option<u64>,
}

/// Why a body could not be read at all (the HTTP edge answers 400).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or nested deeper than the JSON reader allows.
    #[error("the webhook body is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// JSON, but not an object with a string `object` and an array `entry`.
    #[error("the webhook body is not a webhook envelope: {0}")]
    NotAnEnvelope(#[source] serde_json::Error),
    /// An envelope for something other than a WhatsApp Business account.
    #[error("the webhook body is for object {0:?}, not whatsapp_business_account")]
    UnexpectedObject(String),
    /// More than [`MAX_EVENTS`] events, or a list in the body longer than that.
    #[error("the webhook body holds more than {limit} events")]
    TooManyEvents { limit: usize },
}

/// The `object` of WhatsApp Business account envelopes.
const WHATSAPP_OBJECT: &str = "whatsapp_business_account";

/// Turns one POST body into events. Call it only after [`verify_signature`] accepted the body.
pub fn parse(raw_body: &[u8]) -> Result<Parsed, ParseError> {
    let envelope: RawEnvelope =
        serde_json::from_slice(raw_body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ParseError::NotAnEnvelope(e),
            _ => ParseError::NotJson(e),
        })?;
    if envelope.object != WHATSAPP_OBJECT {
        return Err(ParseError::UnexpectedObject(cap(envelope.object)));
    }
    let mut out = Collector::default();
    out.list(&envelope.entry)?;
    for entry in envelope.entry.kept {
        out.list(&entry.changes)?;
        for change in entry.changes.kept {
            out.change(change, entry.time)?;
        }
    }
    Ok(Parsed {
        events: out.events,
        skipped: out.skipped,
    })
}

/// Accumulates events while enforcing [`MAX_EVENTS`].
#[derive(Default)]
struct Collector {
    events: Vec<WebhookEvent>,
    skipped: usize,
}

impl Collector {
    /// Counts a list's malformed items; refuses a list too long to have been kept whole.
    fn list<T>(&mut self, items: &Items<T, MAX_EVENTS>) -> Result<(), ParseError> {
        if items.overflow {
            return Err(ParseError::TooManyEvents { limit: MAX_EVENTS });
        }
        self.skipped += items.malformed;
        Ok(())
    }

    fn push(&mut self, event: WebhookEvent) -> Result<(), ParseError> {
        if self.events.len() >= MAX_EVENTS {
            return Err(ParseError::TooManyEvents { limit: MAX_EVENTS });
        }
        self.events.push(event);
        Ok(())
    }

    fn push_or_skip(&mut self, event: Option<WebhookEvent>) -> Result<(), ParseError> {
        match event {
            Some(event) => self.push(event),
            None => {
                self.skipped += 1;
                Ok(())
            }
        }
    }

    fn change(&mut self, change: RawChange, at: Option<u64>) -> Result<(), ParseError> {
        let value = change.value;
        match change.field.as_deref() {
            Some("messages") => {
                self.list(&value.statuses)?;
                for status in value.statuses.kept {
                    self.push_or_skip(status.into_event())?;
                }
                self.list(&value.messages)?;
                for message in value.messages.kept {
                    self.push(message.into_event())?;
                }
                Ok(())
            }
            Some("message_template_status_update") => {
                self.push_or_skip(value.into_template_status(at))
            }
            Some("phone_number_quality_update") => self.push_or_skip(value.into_phone_quality(at)),
            _ => {
                self.skipped += 1;
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Meta's payload, as read
// ---------------------------------------------------------------------------------------------
//
// Unknown fields are ignored (no `deny_unknown_fields`). Fields without `#[serde(default)]` are
// the ones an item cannot do without: an item missing one, or of the wrong shape, is dropped by
// `Items` and counted. Leaves go through the tolerant readers at the end of this section.

// The envelope, its entries and their changes are read in place, never buffered as a JSON tree:
// a body of 3 MiB in one entry would otherwise take a hundred times that in memory. A wrong shape
// at these levels refuses the delivery (400); Meta's own are always well formed. Statuses and
// messages, the leaves, are read one at a time and skipped alone when malformed.

#[derive(Deserialize)]
struct RawEnvelope {
    object: String,
    #[serde(deserialize_with = "in_place_list")]
    entry: Items<RawEntry, MAX_EVENTS>,
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(default, deserialize_with = "unix_seconds")]
    time: Option<u64>,
    #[serde(deserialize_with = "in_place_list")]
    changes: Items<RawChange, MAX_EVENTS>,
}

#[derive(Deserialize)]
struct RawChange {
    #[serde(default, deserialize_with = "text")]
    field: Option<String>,
    value: RawValue,
}

/// The `value` of a change: the union of the fields of every `field` kabar handles.
#[derive(Deserialize)]
struct RawValue {
    // field == "messages"
    #[serde(default)]
    statuses: Items<RawStatus, MAX_EVENTS>,
    #[serde(default)]
    messages: Items<RawMessage, MAX_EVENTS>,
    // field == "message_template_status_update" (and `event` for the quality update)
    #[serde(default, deserialize_with = "text")]
    event: Option<String>,
    #[serde(default, deserialize_with = "text")]
    message_template_id: Option<String>,
    #[serde(default, deserialize_with = "text")]
    message_template_name: Option<String>,
    #[serde(default, deserialize_with = "text")]
    message_template_language: Option<String>,
    #[serde(default, deserialize_with = "text")]
    reason: Option<String>,
    #[serde(default)]
    other_info: Lenient<RawInfo>,
    #[serde(default)]
    disable_info: Lenient<RawInfo>,
    // field == "phone_number_quality_update"
    #[serde(default, deserialize_with = "text")]
    display_phone_number: Option<String>,
    #[serde(default, deserialize_with = "text")]
    current_limit: Option<String>,
    #[serde(default, deserialize_with = "text")]
    max_daily_conversations_per_business: Option<String>,
}

impl RawValue {
    fn into_template_status(self, at: Option<u64>) -> Option<WebhookEvent> {
        let detail = self
            .other_info
            .0
            .and_then(|info| info.description)
            .or_else(|| self.disable_info.0.and_then(|info| info.description));
        Some(WebhookEvent::TemplateStatus(TemplateStatus {
            event: self.event?,
            template_name: self.message_template_name,
            language: self.message_template_language,
            template_id: self.message_template_id,
            reason: self.reason,
            detail,
            at,
        }))
    }

    fn into_phone_quality(self, at: Option<u64>) -> Option<WebhookEvent> {
        Some(WebhookEvent::PhoneQuality(PhoneQuality {
            display_phone_number: self.display_phone_number,
            event: self.event?,
            current_limit: self.current_limit,
            max_daily_conversations: self.max_daily_conversations_per_business,
            at,
        }))
    }
}

#[derive(Deserialize)]
struct RawInfo {
    #[serde(default, deserialize_with = "text")]
    description: Option<String>,
}

#[derive(Deserialize)]
struct RawStatus {
    #[serde(deserialize_with = "required_text")]
    id: String,
    #[serde(deserialize_with = "required_text")]
    status: String,
    #[serde(deserialize_with = "required_unix_seconds")]
    timestamp: u64,
    #[serde(default, deserialize_with = "text")]
    recipient_id: Option<String>,
    #[serde(default)]
    errors: Items<RawError, MAX_ERRORS_PER_STATUS>,
    #[serde(default)]
    pricing: Lenient<RawPricing>,
}

impl RawStatus {
    /// The event, or `None` for a status string kabar does not know.
    fn into_event(self) -> Option<WebhookEvent> {
        let status = DeliveryState::from_meta(&self.status)?;
        Some(WebhookEvent::Status(StatusUpdate {
            message_id: self.id,
            status,
            timestamp: self.timestamp,
            recipient_id: self.recipient_id.unwrap_or_default(),
            errors: self
                .errors
                .kept
                .into_iter()
                .map(|e| WebhookError {
                    code: e.code,
                    title: e.title.unwrap_or_default(),
                    message: e.message.unwrap_or_default(),
                    details: e.error_data.0.and_then(|d| d.details),
                })
                .collect(),
            pricing: self.pricing.0.map(|p| Pricing {
                billable: p.billable,
                category: p.category,
                model: p.pricing_model,
                kind: p.kind,
            }),
        }))
    }
}

#[derive(Deserialize)]
struct RawError {
    #[serde(deserialize_with = "error_code")]
    code: i64,
    #[serde(default, deserialize_with = "text")]
    title: Option<String>,
    #[serde(default, deserialize_with = "text")]
    message: Option<String>,
    #[serde(default)]
    error_data: Lenient<RawErrorData>,
}

#[derive(Deserialize)]
struct RawErrorData {
    #[serde(default, deserialize_with = "text")]
    details: Option<String>,
}

#[derive(Deserialize)]
struct RawPricing {
    #[serde(default, deserialize_with = "flag")]
    billable: Option<bool>,
    #[serde(default, deserialize_with = "text")]
    category: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pricing_model: Option<String>,
    #[serde(default, rename = "type", deserialize_with = "text")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(deserialize_with = "required_text")]
    id: String,
    #[serde(deserialize_with = "required_text")]
    from: String,
    #[serde(deserialize_with = "required_unix_seconds")]
    timestamp: u64,
    #[serde(default, rename = "type", deserialize_with = "text")]
    kind: Option<String>,
    #[serde(default)]
    text: Lenient<RawText>,
    #[serde(default)]
    button: Lenient<RawButton>,
    #[serde(default)]
    interactive: Lenient<RawInteractive>,
    #[serde(default)]
    context: Lenient<RawContext>,
}

impl RawMessage {
    fn into_event(self) -> WebhookEvent {
        let text = self
            .text
            .0
            .and_then(|t| t.body)
            .or_else(|| self.button.0.and_then(|b| b.text))
            .or_else(|| {
                self.interactive.0.and_then(|i| {
                    (i.button_reply.0.and_then(|r| r.title))
                        .or_else(|| i.list_reply.0.and_then(|r| r.title))
                })
            })
            .unwrap_or_default();
        WebhookEvent::Inbound(InboundMessage {
            message_id: self.id,
            from: self.from,
            kind: self.kind.unwrap_or_else(|| "unknown".to_owned()),
            text,
            timestamp: self.timestamp,
            context_message_id: self.context.0.and_then(|c| c.id),
        })
    }
}

#[derive(Deserialize)]
struct RawText {
    #[serde(default, deserialize_with = "text")]
    body: Option<String>,
}

#[derive(Deserialize)]
struct RawButton {
    #[serde(default, deserialize_with = "text")]
    text: Option<String>,
}

#[derive(Deserialize)]
struct RawInteractive {
    #[serde(default)]
    button_reply: Lenient<RawReply>,
    #[serde(default)]
    list_reply: Lenient<RawReply>,
}

#[derive(Deserialize)]
struct RawReply {
    #[serde(default, deserialize_with = "text")]
    title: Option<String>,
}

#[derive(Deserialize)]
struct RawContext {
    #[serde(default, deserialize_with = "text")]
    id: Option<String>,
}

/// A JSON array read one item at a time: an item of the wrong shape is counted in `malformed`
/// instead of failing the whole body, and at most `CAP` items are kept (`overflow` says some were
/// not). `null` reads as an empty list; another value in place of the list as one malformed item.
struct Items<T, const CAP: usize> {
    kept: Vec<T>,
    malformed: usize,
    overflow: bool,
}

impl<T, const CAP: usize> Default for Items<T, CAP> {
    fn default() -> Self {
        Self {
            kept: Vec::new(),
            malformed: 0,
            overflow: false,
        }
    }
}

impl<'de, T: DeserializeOwned, const CAP: usize> Deserialize<'de> for Items<T, CAP> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemsVisitor(PhantomData))
    }
}

/// Reads an array whose items are read in place: no item is buffered as a JSON tree first, so
/// memory follows what is kept, not the size of the body. Anything but an array, or a malformed
/// item, fails the whole read (for the envelope's `entry`: the body is not a webhook).
fn in_place_list<'de, D, T>(deserializer: D) -> Result<Items<T, MAX_EVENTS>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    deserializer.deserialize_seq(InPlaceVisitor(PhantomData))
}

struct InPlaceVisitor<T, const CAP: usize>(PhantomData<T>);

impl<'de, T: DeserializeOwned, const CAP: usize> Visitor<'de> for InPlaceVisitor<T, CAP> {
    type Value = Items<T, CAP>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Items::<T, CAP>::default();
        loop {
            if items.kept.len() >= CAP {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    break;
                }
                items.overflow = true;
                continue;
            }
            match seq.next_element::<T>()? {
                Some(item) => items.kept.push(item),
                None => break,
            }
        }
        Ok(items)
    }
}

/// Reads an array into [`Items`]; anything else than an array or `null` counts as one malformed
/// item.
struct ItemsVisitor<T, const CAP: usize>(PhantomData<T>);

impl<T, const CAP: usize> ItemsVisitor<T, CAP> {
    fn not_a_list<E>(self) -> Result<Items<T, CAP>, E> {
        Ok(Items {
            malformed: 1,
            ..Items::default()
        })
    }
}

impl<'de, T: DeserializeOwned, const CAP: usize> Visitor<'de> for ItemsVisitor<T, CAP> {
    type Value = Items<T, CAP>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Items::default())
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        self.not_a_list()
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        self.not_a_list()
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        self.not_a_list()
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        self.not_a_list()
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        self.not_a_list()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.not_a_list()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Items::<T, CAP>::default();
        loop {
            if items.kept.len() >= CAP {
                // Read past the rest without keeping it.
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    break;
                }
                items.overflow = true;
                continue;
            }
            // Each item is buffered alone, so that a wrong shape costs only that item.
            let Some(value) = seq.next_element::<Value>()? else {
                break;
            };
            match from_object(value) {
                Some(item) => items.kept.push(item),
                None => items.malformed += 1,
            }
        }
        Ok(items)
    }
}

/// An optional object that is dropped (`None`) when it has the wrong shape, rather than taking
/// its parent down with it.
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self(from_object(Value::deserialize(deserializer)?)))
    }
}

/// `value` as a `T`, if it is a JSON object of that shape. (Serde would also read a struct from
/// an array, field by field; Meta never sends one, so an array there is a wrong shape.)
fn from_object<T: DeserializeOwned>(value: Value) -> Option<T> {
    if value.is_object() {
        T::deserialize(value).ok()
    } else {
        None
    }
}

/// Cuts `s` at [`MAX_TEXT_CHARS`] characters.
fn cap(mut s: String) -> String {
    // A string of at most MAX_TEXT_CHARS bytes has at most as many characters.
    if s.len() > MAX_TEXT_CHARS
        && let Some((cut, _)) = s.char_indices().nth(MAX_TEXT_CHARS)
    {
        s.truncate(cut);
    }
    s
}

/// A string, or a number written as text (Meta sends some ids as numbers); anything else is
/// treated as absent. Capped.
fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(s) => Some(cap(s)),
        Value::Number(n) => Some(cap(n.to_string())),
        _ => None,
    })
}

fn required_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    text(deserializer)?.ok_or_else(|| serde::de::Error::custom("expected a string"))
}

/// Unix seconds: Meta sends strings of digits (`"1749416383"`), sometimes numbers.
fn unix_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    })
}

fn required_unix_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    unix_seconds(deserializer)?.ok_or_else(|| serde::de::Error::custom("expected Unix seconds"))
}

/// An error code: a number, or a number written as a string.
fn error_code<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| serde::de::Error::custom("expected an error code"))
}

/// A boolean, or `"true"`/`"false"`; anything else is treated as absent.
fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Bool(b) => Some(b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::{Duration, Instant};

    const SECRET: &[u8] = b"test_app_secret";
    const SIGNED_BODY: &[u8] = include_bytes!("../../tests/fixtures/webhook/signature_body.raw");
    const SIGNATURE: &str =
        "sha256=ded1d1d9621cffa39832ccf2b330fa476b4dc8ec2a5d102e1e554312b3f21d42";

    const INBOUND_TEXT: &str =
        include_str!("../../tests/fixtures/webhook/webhook_inbound_text.json");
    const PHONE_QUALITY: &str =
        include_str!("../../tests/fixtures/webhook/webhook_phone_quality_update.json");
    const DELIVERED_CBP: &str =
        include_str!("../../tests/fixtures/webhook/webhook_status_delivered_cbp.json");
    const FAILED_131049: &str =
        include_str!("../../tests/fixtures/webhook/webhook_status_failed_131049.json");
    const SENT_PMP: &str =
        include_str!("../../tests/fixtures/webhook/webhook_status_sent_pmp.json");
    const SENT_V24: &str =
        include_str!("../../tests/fixtures/webhook/webhook_status_sent_v24.json");
    /// Not one envelope: a JSON object of named envelopes.
    const STATUSES_VARIOUS: &str =
        include_str!("../../tests/fixtures/webhook/webhook_statuses_various.json");
    const TEMPLATE_PAUSED: &str =
        include_str!("../../tests/fixtures/webhook/webhook_template_status_paused.json");

    /// Every single-envelope sample, including each envelope of `STATUSES_VARIOUS`.
    fn all_samples() -> Vec<Vec<u8>> {
        let mut samples: Vec<Vec<u8>> = [
            INBOUND_TEXT,
            PHONE_QUALITY,
            DELIVERED_CBP,
            FAILED_131049,
            SENT_PMP,
            SENT_V24,
            TEMPLATE_PAUSED,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        samples.push(SIGNED_BODY.to_vec());
        samples.extend(various().into_iter().map(|(_, body)| body));
        samples
    }

    fn various() -> Vec<(String, Vec<u8>)> {
        let map: serde_json::Map<String, Value> = serde_json::from_str(STATUSES_VARIOUS).unwrap();
        map.into_iter()
            .map(|(name, envelope)| (name, serde_json::to_vec(&envelope).unwrap()))
            .collect()
    }

    fn only_status(body: &[u8]) -> StatusUpdate {
        let parsed = parse(body).unwrap();
        assert_eq!(parsed.skipped, 0);
        match <[WebhookEvent; 1]>::try_from(parsed.events) {
            Ok([WebhookEvent::Status(status)]) => status,
            other => panic!("expected one status, got {other:?}"),
        }
    }

    fn only_event(body: &[u8]) -> WebhookEvent {
        let parsed = parse(body).unwrap();
        assert_eq!(parsed.skipped, 0);
        assert_eq!(parsed.events.len(), 1, "{:?}", parsed.events);
        parsed.events.into_iter().next().unwrap()
    }

    // --- signature ---

    #[test]
    fn the_known_signature_verifies() {
        assert_eq!(
            verify_signature(SECRET, SIGNED_BODY, Some(SIGNATURE)),
            Ok(())
        );
    }

    #[test]
    fn a_missing_header_is_missing() {
        assert_eq!(
            verify_signature(SECRET, SIGNED_BODY, None),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn a_header_without_sha256_and_64_hex_digits_is_malformed() {
        let digest = &SIGNATURE[SIGNATURE_PREFIX.len()..];
        for header in [
            String::new(),
            digest.to_owned(),
            format!("sha1={digest}"),
            format!("SHA256={digest}"),
            format!("sha256={}", &digest[..63]),
            format!("sha256={digest}0"),
            format!("sha256={}g", &digest[..63]),
            "sha256=".to_owned(),
        ] {
            assert_eq!(
                verify_signature(SECRET, SIGNED_BODY, Some(&header)),
                Err(SignatureError::Malformed),
                "{header:?}"
            );
        }
    }

    #[test]
    fn a_wrong_signature_is_a_mismatch() {
        let mut body = SIGNED_BODY.to_vec();
        body[10] ^= 1;
        assert_eq!(
            verify_signature(SECRET, &body, Some(SIGNATURE)),
            Err(SignatureError::Mismatch)
        );
        // A re-serialised body is not the body Meta signed.
        let reserialised =
            serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(SIGNED_BODY).unwrap())
                .unwrap();
        assert_eq!(
            verify_signature(SECRET, &reserialised, Some(SIGNATURE)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"another_secret", SIGNED_BODY, Some(SIGNATURE)),
            Err(SignatureError::Mismatch)
        );
        let zeros = format!("sha256={}", "0".repeat(64));
        assert_eq!(
            verify_signature(SECRET, SIGNED_BODY, Some(&zeros)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn an_empty_secret_never_verifies() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"").unwrap();
        mac.update(SIGNED_BODY);
        let header = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            verify_signature(b"", SIGNED_BODY, Some(&header)),
            Err(SignatureError::Mismatch)
        );
    }

    // --- samples ---

    #[test]
    fn the_signed_body_is_an_inbound_text() {
        let WebhookEvent::Inbound(message) = only_event(SIGNED_BODY) else {
            panic!("expected an inbound message");
        };
        assert_eq!(message.text, "Does it come in another color?");
    }

    #[test]
    fn inbound_text() {
        let event = only_event(INBOUND_TEXT.as_bytes());
        assert_eq!(
            event,
            WebhookEvent::Inbound(InboundMessage {
                message_id: "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="
                    .to_owned(),
                from: "16505551234".to_owned(),
                kind: "text".to_owned(),
                text: "Does it come in another color?".to_owned(),
                timestamp: 1_749_416_383,
                context_message_id: None,
            })
        );
    }

    #[test]
    fn failed_131049_keeps_meta_error() {
        let status = only_status(FAILED_131049.as_bytes());
        assert_eq!(status.status, DeliveryState::Failed);
        assert_eq!(
            status.message_id,
            "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBI0QUQ2MjA4NEYyRkExNjMyREUA"
        );
        assert_eq!(status.timestamp, 1_751_142_888);
        assert_eq!(status.recipient_id, "16505551234");
        assert_eq!(status.pricing, None);
        assert_eq!(status.errors.len(), 1);
        let error = &status.errors[0];
        assert_eq!(error.code, 131_049);
        assert_eq!(
            error.title,
            "This message was not delivered to maintain healthy ecosystem engagement."
        );
        assert_eq!(error.message, error.title);
        assert_eq!(
            error.details.as_deref(),
            Some(
                "In order to maintain a healthy ecosystem engagement, the message failed to be delivered."
            )
        );
    }

    #[test]
    fn delivered_cbp_has_pricing() {
        let status = only_status(DELIVERED_CBP.as_bytes());
        assert_eq!(status.status, DeliveryState::Delivered);
        assert_eq!(status.timestamp, 1_750_263_773);
        assert!(status.errors.is_empty());
        assert_eq!(
            status.pricing,
            Some(Pricing {
                billable: Some(true),
                category: Some("service".to_owned()),
                model: Some("CBP".to_owned()),
                kind: None,
            })
        );
    }

    #[test]
    fn sent_pmp_has_pricing_type() {
        let status = only_status(SENT_PMP.as_bytes());
        assert_eq!(status.status, DeliveryState::Sent);
        assert_eq!(
            status.pricing,
            Some(Pricing {
                billable: Some(true),
                category: Some("marketing".to_owned()),
                model: Some("PMP".to_owned()),
                kind: Some("regular".to_owned()),
            })
        );
    }

    #[test]
    fn sent_v24_has_neither_conversation_nor_pricing() {
        let status = only_status(SENT_V24.as_bytes());
        assert_eq!(
            status,
            StatusUpdate {
                message_id: "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUFERjg0NDEzNDdFODU3MUMxMAA="
                    .to_owned(),
                status: DeliveryState::Sent,
                timestamp: 1_750_030_073,
                recipient_id: "16505551234".to_owned(),
                errors: vec![],
                pricing: None,
            }
        );
    }

    #[test]
    fn v24_pricing_without_conversation() {
        // The v24 shape the issue describes: `pricing` with billable and category, no
        // `conversation`.
        let body = SENT_V24.replace(
            r#""recipient_id": "16505551234""#,
            r#""recipient_id": "16505551234", "pricing": {"billable": false, "category": "utility"}"#,
        );
        let status = only_status(body.as_bytes());
        assert_eq!(
            status.pricing,
            Some(Pricing {
                billable: Some(false),
                category: Some("utility".to_owned()),
                model: None,
                kind: None,
            })
        );
    }

    #[test]
    fn statuses_various() {
        let mut seen = 0;
        for (name, body) in various() {
            seen += 1;
            let parsed = parse(&body).unwrap();
            match name.as_str() {
                "played" => {
                    assert!(parsed.events.is_empty());
                    assert_eq!(parsed.skipped, 1);
                }
                _ => {
                    assert_eq!(parsed.skipped, 0, "{name}");
                    let [WebhookEvent::Status(status)] = &parsed.events[..] else {
                        panic!("{name}: {:?}", parsed.events);
                    };
                    let expected = match name.as_str() {
                        "sent" | "with_tracker" => DeliveryState::Sent,
                        "delivered" => DeliveryState::Delivered,
                        "read" | "group" => DeliveryState::Read,
                        "failed" => DeliveryState::Failed,
                        other => panic!("unexpected sample {other}"),
                    };
                    assert_eq!(status.status, expected, "{name}");
                    match name.as_str() {
                        "failed" => assert_eq!(status.errors[0].code, 130_472),
                        "group" => {
                            assert_eq!(status.recipient_id, "fowefinoewcnw");
                            assert_eq!(status.pricing, None);
                        }
                        _ => assert_eq!(status.recipient_id, "972987654321"),
                    }
                }
            }
        }
        assert_eq!(seen, 7);
    }

    #[test]
    fn template_paused_with_its_reason() {
        assert_eq!(
            only_event(TEMPLATE_PAUSED.as_bytes()),
            WebhookEvent::TemplateStatus(TemplateStatus {
                event: "PAUSED".to_owned(),
                template_name: Some("invoice_notification".to_owned()),
                language: Some("id".to_owned()),
                // A JSON number in the sample.
                template_id: Some("1289446782345511".to_owned()),
                reason: Some("NONE".to_owned()),
                detail: Some(
                    "Your template has been paused for 3 hours because of low quality feedback \
                     from customers."
                        .to_owned()
                ),
                at: Some(1_764_998_400),
            })
        );
    }

    #[test]
    fn phone_quality_update() {
        assert_eq!(
            only_event(PHONE_QUALITY.as_bytes()),
            WebhookEvent::PhoneQuality(PhoneQuality {
                display_phone_number: Some("6281100000000".to_owned()),
                event: "UPGRADE".to_owned(),
                current_limit: Some("TIER_10K".to_owned()),
                max_daily_conversations: Some("10000".to_owned()),
                at: Some(1_764_998_460),
            })
        );
    }

    // --- leniency and bounds ---

    fn envelope(changes: &str) -> String {
        format!(
            r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{changes}]}}]}}"#
        )
    }

    fn statuses(items: &str) -> String {
        envelope(&format!(
            r#"{{"field":"messages","value":{{"statuses":[{items}]}}}}"#
        ))
    }

    #[test]
    fn not_json_and_not_an_envelope_are_errors() {
        assert!(matches!(parse(b""), Err(ParseError::NotJson(_))));
        assert!(matches!(parse(b"hello"), Err(ParseError::NotJson(_))));
        assert!(matches!(
            parse(b"{\"object\":"),
            Err(ParseError::NotJson(_))
        ));
        assert!(matches!(parse(b"[]"), Err(ParseError::NotAnEnvelope(_))));
        assert!(matches!(parse(b"{}"), Err(ParseError::NotAnEnvelope(_))));
        assert!(matches!(
            parse(br#"{"object":"whatsapp_business_account","entry":{}}"#),
            Err(ParseError::NotAnEnvelope(_))
        ));
        assert!(matches!(
            parse(br#"{"object":"page","entry":[]}"#),
            Err(ParseError::UnexpectedObject(object)) if object == "page"
        ));
    }

    #[test]
    fn other_fields_and_malformed_items_are_skipped_and_counted() {
        let body = envelope(
            r#"{"field":"account_update","value":{"event":"X"}},
               {"field":"messages","value":{"statuses":[
                   {"id":"a","status":"sent","timestamp":1},
                   {"status":"sent","timestamp":1},
                   {"id":"b","status":"sent","timestamp":"soon"},
                   "nonsense",
                   ["e","sent","1"],
                   {"id":"c","status":"deleted","timestamp":"2"},
                   {"id":"d","status":"READ","timestamp":"3","errors":"x","pricing":[]}
               ]}},
               {"field":"message_template_status_update","value":{"message_template_name":"t"}}"#,
        );
        let parsed = parse(body.as_bytes()).unwrap();
        // account_update, status without id, bad timestamp, "nonsense", [...], "deleted",
        // template update without event.
        assert_eq!(parsed.skipped, 7);
        let ids: Vec<_> = parsed
            .events
            .iter()
            .map(|e| match e {
                WebhookEvent::Status(s) => (s.message_id.as_str(), s.status, s.pricing.is_some()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("a", DeliveryState::Sent, false),
                ("d", DeliveryState::Read, false)
            ]
        );
    }

    #[test]
    fn a_change_of_the_wrong_shape_refuses_the_delivery() {
        // Entries and changes are read in place (never buffered whole), so a wrong shape there
        // is not skipped but refused; Meta's deliveries are never shaped so.
        for change in [r#"{"field":"messages","value":5}"#, r#"7"#] {
            assert!(parse(envelope(change).as_bytes()).is_err(), "{change}");
        }
    }

    #[test]
    fn a_huge_entry_costs_what_is_kept_not_the_body() {
        // Tiny changes of an unhandled field are read in place and skipped; past the cap the
        // delivery is refused, without a tree of them ever being built.
        let changes = vec![r#"{"field":"x","value":{}}"#; 9_000].join(",");
        let parsed = parse(envelope(&changes).as_bytes()).unwrap();
        assert!(parsed.events.is_empty());
        assert_eq!(parsed.skipped, 9_000);
        let changes = vec![r#"{"field":"x","value":{}}"#; 300_000].join(",");
        assert!(matches!(
            parse(envelope(&changes).as_bytes()),
            Err(ParseError::TooManyEvents { .. })
        ));
    }

    #[test]
    fn numbers_and_strings_are_both_accepted() {
        let body = statuses(
            r#"{"id":"a","status":"failed","timestamp":1700000000,"recipient_id":628123,
                "errors":[{"code":"131026","title":"t"}],"pricing":{"billable":"false"}}"#,
        );
        let status = only_status(body.as_bytes());
        assert_eq!(status.timestamp, 1_700_000_000);
        assert_eq!(status.recipient_id, "628123");
        assert_eq!(status.errors[0].code, 131_026);
        assert_eq!(status.errors[0].message, "");
        assert_eq!(status.errors[0].details, None);
        assert_eq!(status.pricing.unwrap().billable, Some(false));
    }

    #[test]
    fn inbound_replies_and_buttons() {
        let body = envelope(
            r#"{"field":"messages","value":{"messages":[
                {"from":"628111","id":"m1","timestamp":"10","type":"button",
                 "button":{"text":"Sudah bayar","payload":"paid"},"context":{"id":"wamid.out"}},
                {"from":"628111","id":"m2","timestamp":"11","type":"interactive",
                 "interactive":{"type":"list_reply","list_reply":{"id":"1","title":"Pilihan"}}},
                {"from":"628111","id":"m3","timestamp":"12","type":"image","image":{"id":"x"}}
            ]}}"#,
        );
        let parsed = parse(body.as_bytes()).unwrap();
        let got: Vec<_> = parsed
            .events
            .iter()
            .map(|e| match e {
                WebhookEvent::Inbound(m) => (
                    m.kind.as_str(),
                    m.text.as_str(),
                    m.context_message_id.as_deref(),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                ("button", "Sudah bayar", Some("wamid.out")),
                ("interactive", "Pilihan", None),
                ("image", "", None),
            ]
        );
    }

    #[test]
    fn strings_are_cut_at_the_cap() {
        let long = "é".repeat(MAX_TEXT_CHARS + 500);
        let body = envelope(&format!(
            r#"{{"field":"messages","value":{{"messages":[
                {{"from":"1","id":"{long}","timestamp":"1","type":"text","text":{{"body":"{long}"}}}}
            ]}}}}"#
        ));
        let WebhookEvent::Inbound(message) = only_event(body.as_bytes()) else {
            panic!("expected an inbound message");
        };
        assert_eq!(message.text.chars().count(), MAX_TEXT_CHARS);
        assert_eq!(message.message_id.chars().count(), MAX_TEXT_CHARS);
        assert!(long.starts_with(&message.text));
    }

    #[test]
    fn more_than_max_events_is_refused() {
        let item = r#"{"id":"a","status":"sent","timestamp":"1"}"#;
        let at_limit = statuses(&vec![item; MAX_EVENTS].join(","));
        assert_eq!(parse(at_limit.as_bytes()).unwrap().events.len(), MAX_EVENTS);

        let over = statuses(&vec![item; MAX_EVENTS + 1].join(","));
        assert!(matches!(
            parse(over.as_bytes()),
            Err(ParseError::TooManyEvents { limit: MAX_EVENTS })
        ));

        // The limit counts across changes too.
        let half = format!(
            r#"{{"field":"messages","value":{{"statuses":[{}]}}}}"#,
            vec![item; MAX_EVENTS / 2 + 1].join(",")
        );
        let split = envelope(&format!("{half},{half}"));
        assert!(matches!(
            parse(split.as_bytes()),
            Err(ParseError::TooManyEvents { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_a_json_error() {
        let deep = format!(
            r#"{{"object":"whatsapp_business_account","entry":[{}{}]}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        match parse(deep.as_bytes()) {
            Err(ParseError::NotJson(e)) => assert!(e.to_string().contains("recursion limit")),
            other => panic!("expected a recursion-limit error, got {other:?}"),
        }
    }

    // --- robustness ---

    /// A fixed-seed xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// The deep array spliced in for the "nest 10,000 deep" mutation.
    const DEEP_MARK: &str = "\"__deep__\"";

    /// Replaces one node of `value`, picked at random, with `replacement`.
    fn replace_random_node(value: &mut Value, rng: &mut Rng, replacement: Value) {
        let mut node = value;
        loop {
            let children = match node {
                Value::Object(map) => map.len(),
                Value::Array(items) => items.len(),
                _ => 0,
            };
            // Stop here at random, or at a leaf.
            if children == 0 || rng.below(3) == 0 {
                *node = replacement;
                return;
            }
            let i = rng.below(children);
            node = match node {
                Value::Object(map) => map.values_mut().nth(i).unwrap(),
                Value::Array(items) => &mut items[i],
                _ => unreachable!(),
            };
        }
    }

    fn other_json_type(rng: &mut Rng) -> Value {
        match rng.below(9) {
            0 => Value::Null,
            1 => Value::Bool(rng.below(2) == 0),
            2 => Value::from(rng.next() as i64),
            3 => Value::from(-1.5e300),
            4 => Value::from("x".repeat(rng.below(5_000))),
            5 => serde_json::json!([1, "a", null, {}]),
            6 => serde_json::json!({"id": 1, "status": "read", "timestamp": "x"}),
            7 => Value::from("played"),
            _ => Value::String(DEEP_MARK.trim_matches('"').to_owned()),
        }
    }

    fn mutate(sample: &[u8], rng: &mut Rng) -> Vec<u8> {
        let mut body = sample.to_vec();
        for _ in 0..=rng.below(3) {
            match rng.below(5) {
                0 => body.truncate(rng.below(body.len() + 1)),
                1 if !body.is_empty() => {
                    let i = rng.below(body.len());
                    body[i] ^= 1 << rng.below(8);
                }
                2 => {
                    let i = rng.below(body.len() + 1);
                    let bytes = b"{}[]\",:0\\\xff\x00e-";
                    body.insert(i, bytes[rng.below(bytes.len())]);
                }
                _ => {
                    // Structural: replace a value with another JSON type, when it still parses.
                    if let Ok(mut value) = serde_json::from_slice::<Value>(&body) {
                        let replacement = other_json_type(rng);
                        replace_random_node(&mut value, rng, replacement);
                        let text = serde_json::to_string(&value).unwrap();
                        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
                        body = text.replace(DEEP_MARK, &deep).into_bytes();
                    }
                }
            }
        }
        body
    }

    fn assert_bounded(parsed: &Parsed) {
        assert!(parsed.events.len() <= MAX_EVENTS);
        let short = |s: &str| assert!(s.chars().count() <= MAX_TEXT_CHARS);
        for event in &parsed.events {
            match event {
                WebhookEvent::Status(s) => {
                    short(&s.message_id);
                    short(&s.recipient_id);
                    assert!(s.errors.len() <= MAX_ERRORS_PER_STATUS);
                    for e in &s.errors {
                        short(&e.title);
                        short(&e.message);
                    }
                }
                WebhookEvent::Inbound(m) => {
                    short(&m.message_id);
                    short(&m.from);
                    short(&m.kind);
                    short(&m.text);
                }
                WebhookEvent::TemplateStatus(t) => short(&t.event),
                WebhookEvent::PhoneQuality(q) => short(&q.event),
            }
        }
    }

    #[test]
    fn mutated_samples_never_panic_and_parse_quickly() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let samples = all_samples();
        let (mut ok, mut refused, mut deep) = (0, 0, 0);
        for round in 0..400 {
            for sample in &samples {
                let body = mutate(sample, &mut rng);
                let started = Instant::now();
                let result = parse(&body);
                let took = started.elapsed();
                assert!(
                    took < Duration::from_secs(2),
                    "round {round}: {took:?} for {} bytes",
                    body.len()
                );
                match result {
                    Ok(parsed) => {
                        ok += 1;
                        assert_bounded(&parsed);
                    }
                    Err(ParseError::NotJson(e)) if e.to_string().contains("recursion limit") => {
                        deep += 1;
                    }
                    Err(_) => refused += 1,
                }
            }
        }
        // The mutations exercised every outcome.
        assert!(
            ok > 100 && refused > 100 && deep > 10,
            "{ok} {refused} {deep}"
        );
    }
}
