//! Message records and what happens to them after Meta accepts a message: the delivery states
//! Meta reports through its webhook, a history of every change, and the event feed that callers
//! follow.
//!
//! Meta sends statuses more than once and out of order (a `read` may come before its
//! `delivered`). The state therefore only moves forward (accepted < sent < delivered < read;
//! failed is final), every state seen goes into the history once with Meta's timestamp, and a
//! duplicate changes nothing.

use serde::{Deserialize, Serialize};

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum State {
    /// Meta took the message (kabar's send succeeded).
    Accepted = 1,
    Sent = 2,
    Delivered = 3,
    Read = 4,
    /// Meta could not deliver it; final.
    Failed = 5,
}

impl State {
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(n: u8) -> Option<State> {
        Some(match n {
            1 => State::Accepted,
            2 => State::Sent,
            3 => State::Delivered,
            4 => State::Read,
            5 => State::Failed,
            _ => return None,
        })
    }

    /// Lower case, as in Meta's payloads and kabar's metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Accepted => "accepted",
            State::Sent => "sent",
            State::Delivered => "delivered",
            State::Read => "read",
            State::Failed => "failed",
        }
    }
}

/// Meta's error on a failed status, with kabar's classification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetaError {
    pub code: i64,
    /// kabar's reason, e.g. `META_RECIPIENT_UNDELIVERABLE`.
    pub reason: String,
    pub title: String,
    pub details: String,
}

/// One state a message was in, and when (Unix milliseconds, Meta's time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    pub state: State,
    pub at_ms: u64,
}

/// Everything kabar knows about one message it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub message_id: String,
    /// E.164.
    pub phone: String,
    /// Registry key of the template.
    pub template: String,
    /// The caller's own id (an invoice number).
    pub reference: String,
    /// The template's category (`UTILITY`, `AUTHENTICATION`).
    pub category: String,
    /// The batch run it belongs to, as the store knows it (`caller/id` with keys, see
    /// [`BatchId`](super::batch::BatchId)); empty for single calls.
    pub batch_id: String,
    pub state: State,
    pub error: Option<MetaError>,
    pub pricing_category: String,
    pub billable: bool,
    /// Every state seen: accepted first, then Meta's in Meta's time order.
    pub history: Vec<StatusChange>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// A status update from Meta's webhook, in kabar's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub message_id: String,
    pub state: State,
    pub at_ms: u64,
    pub error: Option<MetaError>,
    /// `pricing.category` and `pricing.billable`, when Meta sent them.
    pub pricing_category: Option<String>,
    pub billable: Option<bool>,
}

impl MessageRecord {
    /// A record for a message Meta has just accepted.
    pub fn accepted(
        message_id: String,
        phone: String,
        template: String,
        reference: String,
        category: String,
        now_ms: u64,
    ) -> Self {
        MessageRecord {
            message_id,
            phone,
            template,
            reference,
            category,
            batch_id: String::new(),
            state: State::Accepted,
            error: None,
            pricing_category: String::new(),
            billable: false,
            history: vec![StatusChange {
                state: State::Accepted,
                at_ms: now_ms,
            }],
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        }
    }

    /// Applies an update; whether anything changed. The state only moves forward and a failed
    /// message stays failed; each state enters the history once; the first error is kept.
    pub fn apply(&mut self, update: &StatusUpdate) -> bool {
        let mut changed = false;
        if !self.history.iter().any(|c| c.state == update.state) {
            // Accepted (kabar's clock) stays first; Meta's states follow in Meta's time order.
            let at = self
                .history
                .iter()
                .position(|c| c.state != State::Accepted && c.at_ms > update.at_ms)
                .unwrap_or(self.history.len());
            self.history.insert(
                at,
                StatusChange {
                    state: update.state,
                    at_ms: update.at_ms,
                },
            );
            changed = true;
        }
        if self.state != State::Failed && update.state > self.state {
            self.state = update.state;
            self.updated_at_ms = self.updated_at_ms.max(update.at_ms);
            changed = true;
        }
        if update.state == State::Failed
            && self.error.is_none()
            && let Some(error) = &update.error
        {
            self.error = Some(error.clone());
            changed = true;
        }
        if let Some(category) = &update.pricing_category
            && *category != self.pricing_category
        {
            self.pricing_category = category.clone();
            changed = true;
        }
        if let Some(billable) = update.billable
            && billable != self.billable
        {
            self.billable = billable;
            changed = true;
        }
        changed
    }
}

/// A message a customer sent to the ISP's number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    pub message_id: String,
    /// E.164.
    pub phone: String,
    /// `text`, `button`, `image`, ...
    pub kind: String,
    pub text: String,
    pub at_ms: u64,
    pub context_message_id: String,
}

/// Something that happened to the account: a template's review state, the number's quality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountEvent {
    /// `template_status` or `phone_quality`.
    pub kind: String,
    /// The template name and language, or the number.
    pub subject: String,
    /// e.g. `PAUSED`, `APPROVED`, `FLAGGED`.
    pub value: String,
    pub reason: String,
    pub at_ms: u64,
}

/// One entry of the event feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message's status after a change.
    Status(MessageRecord),
    Inbound(InboundMessage),
    Account(AccountEvent),
}

impl Event {
    /// What identifies an inbound message or account event when Meta delivers it again: the
    /// same key is appended once. (Status changes are deduplicated by their record.)
    pub fn dedupe_key(&self) -> String {
        match self {
            Event::Status(r) => format!("status:{}", r.message_id),
            Event::Inbound(m) => format!("inbound:{}", m.message_id),
            Event::Account(a) => {
                format!("account:{}:{}:{}:{}", a.kind, a.subject, a.value, a.at_ms)
            }
        }
    }
}

/// An event with its place in the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Opaque; passing it back as `after` resumes right after this event.
    pub cursor: String,
    pub event: Event,
}

/// Where a reader of the feed starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Only events appended from now on.
    Now,
    /// From the oldest event still retained.
    Oldest,
    /// Right after the event with this cursor.
    Cursor(String),
}

impl After {
    /// `""`: now; `"0"`: the oldest retained; anything else: a cursor.
    pub fn parse(after: &str) -> After {
        match after {
            "" => After::Now,
            "0" => After::Oldest,
            cursor => After::Cursor(cursor.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> MessageRecord {
        MessageRecord::accepted(
            "wamid.1".into(),
            "+6281234567890".into(),
            "invoice_notification".into(),
            "INV-1".into(),
            "UTILITY".into(),
            1_000,
        )
    }

    fn update(state: State, at_ms: u64) -> StatusUpdate {
        StatusUpdate {
            message_id: "wamid.1".into(),
            state,
            at_ms,
            error: None,
            pricing_category: None,
            billable: None,
        }
    }

    #[test]
    fn the_state_only_moves_forward_and_history_keeps_meta_order() {
        let mut r = record();
        assert!(r.apply(&update(State::Read, 4_000)));
        assert_eq!(r.state, State::Read);
        // A late `delivered` enters the history in its place but does not move the state back.
        assert!(r.apply(&update(State::Delivered, 3_000)));
        assert_eq!(r.state, State::Read);
        let states: Vec<State> = r.history.iter().map(|c| c.state).collect();
        assert_eq!(states, [State::Accepted, State::Delivered, State::Read]);
        assert_eq!(r.updated_at_ms, 4_000);
    }

    #[test]
    fn accepted_stays_first_whatever_metas_clock_says() {
        let mut r = record();
        assert!(r.apply(&update(State::Sent, 500)));
        assert_eq!(r.history[0].state, State::Accepted);
        assert_eq!(r.history[1].state, State::Sent);
    }

    #[test]
    fn duplicates_change_nothing() {
        let mut r = record();
        assert!(r.apply(&update(State::Sent, 2_000)));
        let before = r.clone();
        assert!(!r.apply(&update(State::Sent, 2_000)));
        assert!(!r.apply(&update(State::Sent, 2_500)));
        assert_eq!(r, before);
    }

    #[test]
    fn failed_is_final_and_keeps_the_first_error() {
        let mut r = record();
        let mut failed = update(State::Failed, 2_000);
        failed.error = Some(MetaError {
            code: 131049,
            reason: "META_RECIPIENT_UNDELIVERABLE".into(),
            title: "not delivered".into(),
            details: "ecosystem".into(),
        });
        assert!(r.apply(&failed));
        assert_eq!(r.state, State::Failed);
        assert!(r.apply(&update(State::Read, 3_000)));
        assert_eq!(r.state, State::Failed, "failed stays failed");
        assert_eq!(r.error.as_ref().map(|e| e.code), Some(131049));
    }

    #[test]
    fn pricing_is_taken_when_it_changes() {
        let mut r = record();
        let mut sent = update(State::Sent, 2_000);
        sent.pricing_category = Some("utility".into());
        sent.billable = Some(true);
        assert!(r.apply(&sent));
        assert!(r.billable);
        assert_eq!(r.pricing_category, "utility");
        assert!(!r.apply(&sent));
    }

    #[test]
    fn states_round_trip_through_their_number() {
        for s in [
            State::Accepted,
            State::Sent,
            State::Delivered,
            State::Read,
            State::Failed,
        ] {
            assert_eq!(State::from_u8(s.as_u8()), Some(s));
        }
        assert_eq!(State::from_u8(0), None);
        assert_eq!(After::parse(""), After::Now);
        assert_eq!(After::parse("0"), After::Oldest);
        assert_eq!(After::parse("17-1"), After::Cursor("17-1".into()));
    }
}
