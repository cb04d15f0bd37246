//! Message records and the event feed in process memory, with the semantics of the Redis
//! scripts in `store/redis/messages.rs`: records expire after the retention, the feed is trimmed
//! to it, cursors are `milliseconds-sequence` like Redis stream ids.

use std::{
    collections::{HashMap, VecDeque},
    sync::MutexGuard,
    time::Duration,
};

use super::MemoryStore;
use crate::{
    domain::{
        ports::{Applied, FeedError, StoreError},
        status::{After, Event, MessageRecord, StatusUpdate, StoredEvent},
    },
    store::{
        feed::{Bounds, format_cursor},
        now_ms,
    },
};

#[derive(Default)]
pub(super) struct Messages {
    records: HashMap<String, (MessageRecord, u64)>,
    /// (id, event), ids increasing.
    events: VecDeque<((u64, u64), Event)>,
    last_id: (u64, u64),
    /// Dedupe keys of inbound messages and account events, with their expiry.
    seen: HashMap<String, u64>,
    /// Events ever appended (more than those held once some were trimmed).
    added: u64,
}

impl Messages {
    fn append(&mut self, event: Event, now: u64, retention: Duration) {
        let id = if now > self.last_id.0 {
            (now, 0)
        } else {
            (self.last_id.0, self.last_id.1 + 1)
        };
        self.last_id = id;
        self.added += 1;
        self.events.push_back((id, event));
        let oldest_kept = now.saturating_sub(retention.as_millis() as u64);
        while self
            .events
            .front()
            .is_some_and(|(id, _)| id.0 < oldest_kept)
        {
            self.events.pop_front();
        }
    }
}

impl MemoryStore {
    fn messages(&self) -> MutexGuard<'_, Messages> {
        self.messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn sweep_messages(&self, now: u64) {
        let mut m = self.messages();
        m.records.retain(|_, (_, expires)| *expires > now);
        m.seen.retain(|_, expires| *expires > now);
    }

    pub async fn put_record(
        &self,
        record: &MessageRecord,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut m = self.messages();
        m.records.insert(
            record.message_id.clone(),
            (record.clone(), now + retention.as_millis() as u64),
        );
        m.append(Event::Status(record.clone()), now, retention);
        Ok(())
    }

    pub async fn get_record(&self, message_id: &str) -> Result<Option<MessageRecord>, StoreError> {
        let now = now_ms();
        Ok(self
            .messages()
            .records
            .get(message_id)
            .filter(|(_, expires)| *expires > now)
            .map(|(r, _)| r.clone()))
    }

    pub async fn apply_status(
        &self,
        update: &StatusUpdate,
        retention: Duration,
    ) -> Result<Applied, StoreError> {
        let now = now_ms();
        let mut m = self.messages();
        let Some((record, expires)) = m.records.get_mut(&update.message_id) else {
            return Ok(Applied::Unknown);
        };
        if *expires <= now {
            return Ok(Applied::Unknown);
        }
        let previous = record.state;
        if !record.apply(update) {
            return Ok(Applied::Unchanged);
        }
        let snapshot = record.clone();
        let changed = Applied::Changed {
            category: snapshot.category.clone(),
            previous,
            batch_id: snapshot.batch_id.clone(),
            reference: snapshot.reference.clone(),
        };
        m.append(Event::Status(snapshot), now, retention);
        Ok(changed)
    }

    pub async fn append_event(
        &self,
        event: &Event,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut m = self.messages();
        let key = event.dedupe_key();
        if m.seen.get(&key).is_some_and(|expires| *expires > now) {
            return Ok(false);
        }
        m.seen.insert(key, now + retention.as_millis() as u64);
        m.append(event.clone(), now, retention);
        Ok(true)
    }

    pub async fn latest_cursor(&self) -> Result<String, StoreError> {
        Ok(format_cursor(self.messages().last_id))
    }

    pub async fn events_after(
        &self,
        after: &After,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, FeedError> {
        let m = self.messages();
        let start = match after {
            After::Now => m.last_id,
            After::Oldest => (0, 0),
            After::Cursor(cursor) => Bounds {
                trimmed: m.added > m.events.len() as u64,
                oldest_held: m.events.front().map(|(id, _)| *id),
                newest: m.last_id,
            }
            .check(cursor)?,
        };
        // Ids only grow: the first event after `start` is found by bisection, not by a scan of
        // the whole retained feed on every poll.
        let first = m.events.partition_point(|(id, _)| *id <= start);
        Ok(m.events
            .range(first..)
            .take(limit)
            .map(|(id, event)| StoredEvent {
                cursor: format_cursor(*id),
                event: event.clone(),
            })
            .collect())
    }
}
