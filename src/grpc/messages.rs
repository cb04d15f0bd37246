//! Message records and feed events as `kabar.v1` messages.

use prost_types::Timestamp;

use crate::{
    domain::{
        batch::BatchId,
        status::{Event, MessageRecord, MetaError, State, StoredEvent},
    },
    pb::{self, message_event, message_status},
};

pub fn timestamp(ms: u64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

fn state(s: State) -> i32 {
    (match s {
        State::Accepted => message_status::State::Accepted,
        State::Sent => message_status::State::Sent,
        State::Delivered => message_status::State::Delivered,
        State::Read => message_status::State::Read,
        State::Failed => message_status::State::Failed,
    }) as i32
}

pub fn meta_error(e: MetaError) -> pb::MetaError {
    pb::MetaError {
        code: i32::try_from(e.code).unwrap_or(i32::MAX),
        reason: e.reason,
        title: e.title,
        details: e.details,
    }
}

pub fn status(r: MessageRecord) -> pb::MessageStatus {
    pb::MessageStatus {
        message_id: r.message_id,
        phone: r.phone,
        template: r.template,
        reference: r.reference,
        state: state(r.state),
        error: r.error.map(meta_error),
        pricing_category: r.pricing_category,
        billable: r.billable,
        history: r
            .history
            .iter()
            .map(|c| pb::StatusChange {
                state: state(c.state),
                at: timestamp(c.at_ms),
            })
            .collect(),
        updated_at: timestamp(r.updated_at_ms),
        // The record names the batch as the store knows it; callers see their own id only.
        batch_id: BatchId::from_stored(&r.batch_id).own().to_owned(),
    }
}

pub fn event(e: StoredEvent) -> pb::MessageEvent {
    pb::MessageEvent {
        cursor: e.cursor,
        event: Some(match e.event {
            Event::Status(r) => message_event::Event::Status(status(r)),
            Event::Inbound(m) => message_event::Event::Inbound(pb::InboundMessage {
                message_id: m.message_id,
                phone: m.phone,
                r#type: m.kind,
                text: m.text,
                at: timestamp(m.at_ms),
                context_message_id: m.context_message_id,
            }),
            Event::Account(a) => message_event::Event::Account(pb::AccountEvent {
                kind: a.kind,
                subject: a.subject,
                value: a.value,
                reason: a.reason,
                at: timestamp(a.at_ms),
            }),
        }),
    }
}
