//! Where OTP state lives: Redis in production, process memory for the embedded default. Both
//! backends implement exactly the same semantics, and the integration tests run the same cases
//! against each.
//!
//! What is stored, per (purpose, phone): the 32-byte HMAC of the code followed by one byte of
//! attempts left, expiring with the code. Per phone: the send count of the current hour window,
//! when that window ends, and when the next send is allowed. Per client IP: the same counter.
//! Per day: one global counter. Never the code.

use std::time::Duration;

pub mod feed;
pub mod memory;
pub mod redis;

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// Key prefixes. Every key carries a `{hash tag}` so that all keys of one phone live in one Redis
/// Cluster slot.
pub(crate) fn code_key(purpose: &str, phone_digits: &str) -> String {
    format!("kabar:otp:{{{phone_digits}}}:{purpose}")
}
pub(crate) fn limits_key(phone_digits: &str) -> String {
    format!("kabar:otp-limit:{{{phone_digits}}}")
}
pub(crate) fn ip_key(ip: &str) -> String {
    format!("kabar:otp-ip:{{{ip}}}")
}
pub(crate) fn daily_key(day: u64) -> String {
    format!("kabar:otp-daily:{{{day}}}")
}
/// One message record (a hash), by Meta's message id.
pub(crate) fn record_key(message_id: &str) -> String {
    format!("kabar:msg:{{{message_id}}}")
}
/// The event feed (a stream), shared by every replica.
pub(crate) const EVENTS_KEY: &str = "kabar:events";
/// Marks an inbound message or account event as appended to the feed.
pub(crate) fn seen_key(dedupe_key: &str) -> String {
    format!("kabar:seen:{{{dedupe_key}}}")
}
pub(crate) fn idempotency_key(key: &str) -> String {
    format!("kabar:idem:{{{key}}}")
}
/// The pacing keys of one business number (its phone number ID), all in one Cluster slot: the
/// schedule, its backoff after Meta's throttling, one key per recipient's pair interval, the
/// recipients counted toward the daily limit, and the customers inside their service window.
pub(crate) fn pace_rate_key(number: &str) -> String {
    format!("kabar:pace:{{{number}}}:rate")
}
pub(crate) fn pace_backoff_key(number: &str) -> String {
    format!("kabar:pace:{{{number}}}:backoff")
}
pub(crate) fn pace_pair_key(number: &str, phone: &str) -> String {
    format!("kabar:pace:{{{number}}}:pair:{phone}")
}
pub(crate) fn pace_daily_key(number: &str) -> String {
    format!("kabar:pace:{{{number}}}:daily")
}
pub(crate) fn pace_inbound_key(number: &str) -> String {
    format!("kabar:pace:{{{number}}}:inbound")
}

/// The keys of one batch run, all in one Cluster slot: the batch, its items, their order, the
/// work queue. (Batch ids are restricted to `A-Z a-z 0-9 . _ : -`, so the tag is the id.)
pub(crate) fn batch_keys(batch_id: &str) -> [String; 4] {
    [
        format!("kabar:batch:{{{batch_id}}}"),
        format!("kabar:batch:{{{batch_id}}}:items"),
        format!("kabar:batch:{{{batch_id}}}:order"),
        format!("kabar:batch:{{{batch_id}}}:queue"),
    ]
}
/// The runtime settings (a hash: `rev`, `doc`), one for the deployment.
pub(crate) const SETTINGS_KEY: &str = "kabar:settings";
/// The batches that may have work (a set of ids).
pub(crate) const BATCHES_KEY: &str = "kabar:batches";

/// Wall-clock milliseconds since the Unix epoch: the time base of windows, cooldowns and expiry.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Wall-clock microseconds since the Unix epoch: the time base of the in-process pacing schedule.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
pub use crate::domain::ports::{CodeHash, Gate, HASH_LEN, Idempotency, StoreError, Verdict};
use crate::domain::{
    batch::{
        BatchInfo, Claim, Claimed, Command, Item, Mark, NewItem, Outcome, Submitted,
        rules::{BatchState, ItemState},
    },
    status::MetaError,
};

/// Which backend, chosen by `REDIS_URL`.
#[derive(Clone)]
pub enum Store {
    Redis(RedisStore),
    Memory(MemoryStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Redis($s) => $call,
            Store::Memory($s) => $call,
        }
    };
}

impl Store {
    /// Whether the store answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }

    pub fn is_redis(&self) -> bool {
        matches!(self, Store::Redis(_))
    }
}

#[async_trait::async_trait]
impl crate::domain::ports::SettingsStore for Store {
    async fn load_settings(
        &self,
    ) -> Result<Option<crate::domain::settings::StoredSettings>, StoreError> {
        dispatch!(self, s => s.load_settings().await)
    }

    async fn settings_revision(&self) -> Result<u64, StoreError> {
        dispatch!(self, s => s.settings_revision().await)
    }

    async fn replace_settings(
        &self,
        expected: u64,
        next: &crate::domain::settings::StoredSettings,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.replace_settings(expected, next).await)
    }
}

#[async_trait::async_trait]
impl crate::domain::ports::IdempotencyStore for Store {
    async fn begin(
        &self,
        key: &str,
        digest: &str,
        token: &str,
        lock: Duration,
    ) -> Result<Idempotency, StoreError> {
        dispatch!(self, s => s.idempotency_begin(key, digest, token, lock).await)
    }

    async fn finish(
        &self,
        key: &str,
        digest: &str,
        token: &str,
        answer: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.idempotency_finish(key, digest, token, answer, keep).await)
    }

    async fn abort(&self, key: &str, digest: &str, token: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.idempotency_abort(key, digest, token).await)
    }
}

#[async_trait::async_trait]
impl crate::domain::ports::MessageStore for Store {
    async fn put_record(
        &self,
        record: &crate::domain::status::MessageRecord,
        retention: Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_record(record, retention).await)
    }

    async fn get_record(
        &self,
        message_id: &str,
    ) -> Result<Option<crate::domain::status::MessageRecord>, StoreError> {
        dispatch!(self, s => s.get_record(message_id).await)
    }

    async fn apply_status(
        &self,
        update: &crate::domain::status::StatusUpdate,
        retention: Duration,
    ) -> Result<crate::domain::ports::Applied, StoreError> {
        dispatch!(self, s => s.apply_status(update, retention).await)
    }

    async fn append_event(
        &self,
        event: &crate::domain::status::Event,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.append_event(event, retention).await)
    }

    async fn latest_cursor(&self) -> Result<String, StoreError> {
        dispatch!(self, s => s.latest_cursor().await)
    }

    async fn events_after(
        &self,
        after: &crate::domain::status::After,
        limit: usize,
    ) -> Result<Vec<crate::domain::status::StoredEvent>, crate::domain::ports::FeedError> {
        dispatch!(self, s => s.events_after(after, limit).await)
    }
}

#[async_trait::async_trait]
impl crate::domain::ports::OtpStore for Store {
    async fn gate(
        &self,
        key: &str,
        now_ms: u64,
        resend: Duration,
        max: u32,
        window: Duration,
    ) -> Result<Gate, StoreError> {
        dispatch!(self, s => s.gate(key, now_ms, resend, max, window).await)
    }

    async fn release(&self, key: &str, resend_at_ms: u64, uncount: bool) -> Result<(), StoreError> {
        dispatch!(self, s => s.release(key, resend_at_ms, uncount).await)
    }

    async fn count_daily(
        &self,
        key: &str,
        limit: u32,
        expire_at_ms: u64,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.count_daily(key, limit, expire_at_ms).await)
    }

    async fn put_code(
        &self,
        key: &str,
        hash: &CodeHash,
        attempts: u32,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_code(key, hash, attempts, ttl).await)
    }

    async fn discard_code(&self, key: &str, hash: &CodeHash) -> Result<(), StoreError> {
        dispatch!(self, s => s.discard_code(key, hash).await)
    }

    async fn verify(&self, key: &str, hash: &CodeHash) -> Result<Verdict, StoreError> {
        dispatch!(self, s => s.verify(key, hash).await)
    }
}

#[async_trait::async_trait]
impl crate::domain::ports::PacingStore for Store {
    async fn admit(
        &self,
        number: &str,
        asks: &[crate::domain::pacing::rules::Ask<'_>],
    ) -> Result<Vec<crate::domain::pacing::rules::Answer>, StoreError> {
        match self {
            Store::Redis(s) => s.pace_admit(number, asks).await,
            Store::Memory(s) => s.pacing().admit(number, asks),
        }
    }

    async fn slow_down(&self, number: &str) -> Result<u64, StoreError> {
        match self {
            Store::Redis(s) => s.pace_slow_down(number).await,
            Store::Memory(s) => s.pacing().slow_down(number),
        }
    }

    async fn block_pair(
        &self,
        number: &str,
        phone: &str,
        hold: Duration,
    ) -> Result<(), StoreError> {
        match self {
            Store::Redis(s) => s.pace_block_pair(number, phone, hold).await,
            Store::Memory(s) => s.pacing().block_pair(number, phone, hold),
        }
    }

    async fn customers_wrote(
        &self,
        number: &str,
        customers: &[(String, u64)],
    ) -> Result<(), StoreError> {
        match self {
            Store::Redis(s) => s.pace_customers_wrote(number, customers).await,
            Store::Memory(s) => s.pacing().customers_wrote(number, customers),
        }
    }

    async fn daily_used(&self, number: &str) -> Result<u64, StoreError> {
        match self {
            Store::Redis(s) => s.pace_daily_used(number).await,
            Store::Memory(s) => s.pacing().daily_used(number),
        }
    }
}

#[async_trait::async_trait]
impl crate::domain::ports::BatchStore for Store {
    async fn submit(
        &self,
        batch_id: &str,
        items: &[NewItem],
        last: bool,
        now_ms: u64,
        retention: Duration,
    ) -> Result<Submitted, StoreError> {
        dispatch!(self, s => s.batch_submit(batch_id, items, last, now_ms, retention).await)
    }

    async fn get(&self, batch_id: &str) -> Result<Option<BatchInfo>, StoreError> {
        dispatch!(self, s => s.batch_get(batch_id).await)
    }

    async fn active(&self) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.batch_active().await)
    }

    async fn forget(&self, batch_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(s) => s.batch_forget(batch_id).await,
            // In process, the list of batches with work is derived from their states.
            Store::Memory(_) => Ok(()),
        }
    }

    async fn claim(
        &self,
        batch_id: &str,
        consumer: &str,
        max: usize,
        stale: Duration,
        retention: Duration,
    ) -> Result<Claimed, StoreError> {
        dispatch!(self, s => s.batch_claim(batch_id, consumer, max, stale, retention).await)
    }

    async fn mark_sending(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
        within: Duration,
    ) -> Result<Mark, StoreError> {
        dispatch!(self, s => s.batch_mark(batch_id, claim, consumer, within).await)
    }

    async fn settle(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
        outcome: &Outcome,
        retention: Duration,
    ) -> Result<Option<BatchState>, StoreError> {
        dispatch!(self, s => s.batch_settle(batch_id, claim, consumer, outcome, retention).await)
    }

    async fn release(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.batch_release(batch_id, claim, consumer).await)
    }

    async fn command(
        &self,
        batch_id: &str,
        command: &Command,
        retention: Duration,
    ) -> Result<Option<(BatchInfo, bool)>, StoreError> {
        dispatch!(self, s => s.batch_command(batch_id, command, retention).await)
    }

    async fn item_status(
        &self,
        batch_id: &str,
        reference: &str,
        message_id: &str,
        to: ItemState,
        error: Option<&MetaError>,
        retention: Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.batch_item_status(batch_id, reference, message_id, to, error, retention).await)
    }

    async fn items(
        &self,
        batch_id: &str,
        start: u64,
        count: usize,
    ) -> Result<Option<(Vec<Item>, u64)>, StoreError> {
        dispatch!(self, s => s.batch_items(batch_id, start, count).await)
    }
}
