//! What the domain needs from storage, one trait per concern. The Redis and in-process backends
//! (`crate::store`) implement each with the same semantics, and the integration tests run the
//! same cases against both.

use std::time::Duration;

use async_trait::async_trait;

use super::{
    batch::{
        BatchInfo, Claim, Claimed, Command, Item, Mark, NewItem, Outcome, Submitted,
        rules::{BatchState, ItemState},
    },
    pacing::rules::{Answer, Ask},
    settings::StoredSettings,
    status::{After, Event, MessageRecord, MetaError, StatusUpdate, StoredEvent},
};

/// The store could not be reached or answered something unusable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Length of a stored OTP hash (HMAC-SHA256).
pub const HASH_LEN: usize = 32;
pub type CodeHash = [u8; HASH_LEN];

/// The answer of a counter gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Counted. `resend_at_ms` identifies the cooldown this call started (0 if none).
    Allowed { resend_at_ms: u64 },
    /// Inside the resend cooldown.
    Cooldown(Duration),
    /// The window's cap is reached.
    CapReached(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Verified,
    Invalid { attempts_left: u32 },
    Expired,
    TooManyAttempts,
}

/// One-time codes and the counters that guard their sending. A refusal changes nothing.
#[async_trait]
pub trait OtpStore: Send + Sync {
    /// Counts one send in a window of `window` that starts at its first send (`max` per
    /// window), refusing inside `resend` of the last counted send.
    async fn gate(
        &self,
        key: &str,
        now_ms: u64,
        resend: Duration,
        max: u32,
        window: Duration,
    ) -> Result<Gate, StoreError>;

    /// Undoes the gate for the send identified by `resend_at_ms`: lifts its cooldown and, with
    /// `uncount`, takes it back off the count (nothing is kept when nothing is left).
    async fn release(&self, key: &str, resend_at_ms: u64, uncount: bool) -> Result<(), StoreError>;

    /// Counts one message against a daily cap; `false` once `limit` is passed.
    async fn count_daily(
        &self,
        key: &str,
        limit: u32,
        expire_at_ms: u64,
    ) -> Result<bool, StoreError>;

    /// Stores a code's hash with its attempts, replacing any earlier code.
    async fn put_code(
        &self,
        key: &str,
        hash: &CodeHash,
        attempts: u32,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Deletes the code if it is still the one with this hash.
    async fn discard_code(&self, key: &str, hash: &CodeHash) -> Result<(), StoreError>;

    /// The whole check, atomically: missing, match (consumed), mismatch (one attempt used).
    async fn verify(&self, key: &str, hash: &CodeHash) -> Result<Verdict, StoreError>;
}

/// The answer of [`IdempotencyStore::begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotency {
    /// This call owns the key now and must finish or abort it.
    Started,
    /// Another call holds the key and has not finished.
    InFlight,
    /// A call with this key finished; here is its stored answer.
    Done(Vec<u8>),
    /// The key was taken by a different request (another digest).
    Reused,
}

/// Idempotency keys: one call at a time per key, its answer remembered.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Takes `key` for a call (identified by `token`) of the request with `digest` (64 hex
    /// characters), for at most `lock`, unless it is taken or answered, or was taken by another
    /// request.
    async fn begin(
        &self,
        key: &str,
        digest: &str,
        token: &str,
        lock: Duration,
    ) -> Result<Idempotency, StoreError>;

    /// Stores the answer for `keep`, if `token` still owns the key.
    async fn finish(
        &self,
        key: &str,
        digest: &str,
        token: &str,
        answer: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError>;

    /// Frees the key, if `token` still owns it.
    async fn abort(&self, key: &str, digest: &str, token: &str) -> Result<(), StoreError>;
}

/// What [`MessageStore::apply_status`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// No record: a message kabar did not send (or whose record expired).
    Unknown,
    /// A duplicate: nothing changed.
    Unchanged,
    /// The record changed and an event was appended: the record's template category, its
    /// state before the update, and the batch run and reference it belongs to (empty for
    /// single calls).
    Changed {
        category: String,
        previous: super::status::State,
        batch_id: String,
        reference: String,
    },
}

/// A feed cursor older than the oldest retained event: reading on would skip events silently.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FeedError {
    #[error("the cursor {0:?} is older than the oldest retained event")]
    Expired(String),
    #[error("{0:?} is not a cursor of this feed")]
    Malformed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Message records and the event feed. Records and events are kept for `retention`.
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Stores a new record and appends its first event.
    async fn put_record(
        &self,
        record: &MessageRecord,
        retention: Duration,
    ) -> Result<(), StoreError>;

    async fn get_record(&self, message_id: &str) -> Result<Option<MessageRecord>, StoreError>;

    /// Applies a status update to its record and, when it changed, appends the record as an
    /// event, in one atomic step.
    async fn apply_status(
        &self,
        update: &StatusUpdate,
        retention: Duration,
    ) -> Result<Applied, StoreError>;

    /// Appends an inbound message or an account event, unless an event with the same
    /// [`Event::dedupe_key`] was appended within the retention; whether it was appended.
    async fn append_event(&self, event: &Event, retention: Duration) -> Result<bool, StoreError>;

    /// The cursor of the newest event (for a reader starting now).
    async fn latest_cursor(&self) -> Result<String, StoreError>;

    /// Up to `limit` events after `after`, oldest first.
    async fn events_after(
        &self,
        after: &After,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, FeedError>;
}

/// The shared pacing schedule of one business number (`number`: its phone number ID), with the
/// rules of [`super::pacing::rules`]. Time is the store's own clock.
#[async_trait]
pub trait PacingStore: Send + Sync {
    /// Admissions in order, as one atomic step (one answer per ask): a refusal or a wait changes
    /// nothing. The asks share their interval, pair interval and daily limit (the first ask's).
    async fn admit(&self, number: &str, asks: &[Ask<'_>]) -> Result<Vec<Answer>, StoreError>;

    /// Meta throttled the number: back off the shared rate. Returns the new slow-down factor.
    async fn slow_down(&self, number: &str) -> Result<u64, StoreError>;

    /// Meta refused a message to `phone` for the pair rate: hold the recipient for `hold`.
    async fn block_pair(&self, number: &str, phone: &str, hold: Duration)
    -> Result<(), StoreError>;

    /// Customers (E.164) wrote to the business at the given Unix milliseconds.
    async fn customers_wrote(
        &self,
        number: &str,
        customers: &[(String, u64)],
    ) -> Result<(), StoreError>;

    /// Recipients counted toward the daily limit now.
    async fn daily_used(&self, number: &str) -> Result<u64, StoreError>;
}

/// The runtime settings document (see [`super::settings`]): one per deployment, shared by every
/// replica, changed only by compare-and-set on its revision.
#[async_trait]
pub trait SettingsStore: Send + Sync {
    /// The document; None when no setting was ever made.
    async fn load_settings(&self) -> Result<Option<StoredSettings>, StoreError>;

    /// The stored revision alone (0: none): the cheap check every replica polls.
    async fn settings_revision(&self) -> Result<u64, StoreError>;

    /// Stores `next` if the stored revision is still `expected`; `false` (nothing written) when
    /// another change came first.
    async fn replace_settings(
        &self,
        expected: u64,
        next: &StoredSettings,
    ) -> Result<bool, StoreError>;
}

/// Batch runs: items kept durably and handed to workers, each settled once. Every change is one
/// atomic step; a refusal changes nothing. A batch is named by its stored id
/// ([`BatchId::stored`](super::batch::BatchId::stored): `caller/id` with keys, the id alone
/// without), which the store takes as an opaque string.
#[async_trait]
pub trait BatchStore: Send + Sync {
    /// Adds the items whose reference is new to the batch (created on first use) and queues
    /// them; `last` closes it. Refused as a whole, with nothing added, when the batch is closed,
    /// done or cancelled and an item is new. Kept for `retention` after its last change.
    async fn submit(
        &self,
        batch_id: &str,
        items: &[NewItem],
        last: bool,
        now_ms: u64,
        retention: Duration,
    ) -> Result<Submitted, StoreError>;

    async fn get(&self, batch_id: &str) -> Result<Option<BatchInfo>, StoreError>;

    /// Batches that may have work: every batch not yet done or cancelled.
    async fn active(&self) -> Result<Vec<String>, StoreError>;

    /// Takes the batch off the active list (it is done or cancelled, or gone).
    async fn forget(&self, batch_id: &str) -> Result<(), StoreError>;

    /// Hands `consumer` up to `max` items: first those another consumer has held for longer
    /// than `stale` (it died), then new ones. A stale item that was already being sent is
    /// settled as unknown here, never handed out. Nothing is handed out unless the batch is
    /// workable; the answer says what state the batch is in (None: no such batch). A batch being
    /// worked is kept for `retention` from now.
    async fn claim(
        &self,
        batch_id: &str,
        consumer: &str,
        max: usize,
        stale: Duration,
        retention: Duration,
    ) -> Result<Claimed, StoreError>;

    /// Marks a claimed item as being sent, if the batch is still workable and `consumer` has
    /// held it for less than `within` (after that it may be taken over).
    async fn mark_sending(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
        within: Duration,
    ) -> Result<Mark, StoreError>;

    /// Settles a claimed item (the state moves only forward) and takes it off the queue, if
    /// `consumer` still holds it; an item settled meanwhile as unknown may still become
    /// accepted. Returns the batch's state afterwards (None: the item was not held).
    async fn settle(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
        outcome: &Outcome,
        retention: Duration,
    ) -> Result<Option<BatchState>, StoreError>;

    /// Gives a claimed item back to the queue (it certainly did not go out), if `consumer` still
    /// holds it.
    async fn release(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
    ) -> Result<(), StoreError>;

    /// Cancels, pauses or resumes the batch, when its state allows; the batch afterwards, and
    /// whether this command changed its state. The batch is kept for `retention` from now.
    async fn command(
        &self,
        batch_id: &str,
        command: &Command,
        retention: Duration,
    ) -> Result<Option<(BatchInfo, bool)>, StoreError>;

    /// A webhook status of an item's message: moves the item forward (`to` is delivered, read or
    /// failed).
    async fn item_status(
        &self,
        batch_id: &str,
        reference: &str,
        message_id: &str,
        to: ItemState,
        error: Option<&MetaError>,
        retention: Duration,
    ) -> Result<(), StoreError>;

    /// Up to `count` items in submission order from position `start`, and how many the batch
    /// has (None: no such batch).
    async fn items(
        &self,
        batch_id: &str,
        start: u64,
        count: usize,
    ) -> Result<Option<(Vec<Item>, u64)>, StoreError>;
}
