//! Delivery status: what Meta's webhook reports about the messages kabar sent, and reading it
//! back. Webhook updates are applied to the message records (state forward only, history,
//! duplicates ignored) and every change, inbound customer message and account event goes into
//! the event feed that `WatchMessageStatus` follows.

use std::{sync::Arc, time::Duration};

use super::{
    batch::rules::ItemState,
    error::{Error, Violations, echo},
    outbox::category_name,
    pacing::Pacer,
    ports::{Applied, BatchStore, FeedError, MessageStore},
    status::{After, Event, MessageRecord, State, StatusUpdate, StoredEvent},
};
use crate::templates::Category;

/// Longest message id accepted in a request (a wamid is about 60 characters).
const MAX_MESSAGE_ID_CHARS: usize = 256;

/// One item of a webhook delivery, in kabar's terms.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// A status update (its error, if it failed, carries the reason kabar gives the code).
    Status(StatusUpdate),
    /// An inbound message or an account event.
    Event(Event),
}

/// What one webhook delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    pub changed: usize,
    pub duplicates: usize,
    /// Statuses of messages kabar has no record of (another system on the same number, or
    /// older than the retention): acknowledged, not stored.
    pub unknown: usize,
    pub events: usize,
    /// OTP messages (AUTHENTICATION) newly reported delivered: with the codes verified, the
    /// conversion from sent to used.
    pub otp_delivered: usize,
}

pub struct Delivery {
    store: Arc<dyn MessageStore>,
    /// Told when a message of a batch item moves on.
    batches: Arc<dyn BatchStore>,
    /// Told of customers who wrote: their service window keeps them out of the daily limit.
    pacer: Arc<Pacer>,
    retention: Duration,
}

impl Delivery {
    pub fn new(
        store: Arc<dyn MessageStore>,
        batches: Arc<dyn BatchStore>,
        pacer: Arc<Pacer>,
        retention: Duration,
    ) -> Self {
        Delivery {
            store,
            batches,
            pacer,
            retention,
        }
    }

    /// `GetMessageStatus`.
    pub async fn get(&self, message_id: &str) -> Result<MessageRecord, Error> {
        check_message_id(message_id)?;
        self.store
            .get_record(message_id)
            .await?
            .ok_or_else(|| Error::MessageNotFound(echo(message_id)))
    }

    /// Checks where a reader starts; `After::Now` is pinned to the newest event now, so that
    /// nothing appended after this call is missed.
    pub async fn start(&self, after: &str) -> Result<After, Error> {
        match After::parse(after) {
            After::Now => {
                let cursor = self.store.latest_cursor().await?;
                Ok(After::Cursor(cursor))
            }
            After::Cursor(c) if c.len() > 64 || !c.bytes().all(|b| b.is_ascii_graphic()) => {
                Err(Error::field(
                    "after",
                    "must be \"\", \"0\" or a cursor from an earlier event",
                ))
            }
            other => Ok(other),
        }
    }

    /// Up to `limit` events after `after`, oldest first.
    pub async fn events(&self, after: &After, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        self.store
            .events_after(after, limit)
            .await
            .map_err(|e| match e {
                FeedError::Expired(cursor) => Error::CursorExpired(echo(&cursor)),
                FeedError::Malformed(_) => Error::field(
                    "after",
                    "must be \"\", \"0\" or a cursor from an earlier event",
                ),
                FeedError::Store(e) => Error::StoreUnavailable(e.0),
            })
    }

    /// Stores one webhook delivery. Each update is applied once: a delivery that fails halfway
    /// (the store went away) is answered with an error, Meta sends it again, and the updates
    /// already applied are recognised as duplicates. Updates are applied [`INGEST_IN_FLIGHT`] at
    /// a time: each is atomic and the rules do not depend on their order (the state moves
    /// forward whatever comes first, the history is kept in Meta's time order).
    pub async fn ingest(&self, items: Vec<Incoming>) -> Result<Ingested, Error> {
        use futures_util::{StreamExt, TryStreamExt};
        let wrote: Vec<(String, u64)> = items
            .iter()
            .filter_map(|item| match item {
                Incoming::Event(Event::Inbound(m)) => Some((m.phone.clone(), m.at_ms)),
                _ => None,
            })
            .collect();
        self.pacer.customers_wrote(&wrote).await;
        let outcomes: Vec<Outcome> = futures_util::stream::iter(items)
            .map(|item| self.apply(item))
            .buffer_unordered(INGEST_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut done = Ingested::default();
        for outcome in outcomes {
            match outcome {
                Outcome::Changed { otp_delivered } => {
                    done.changed += 1;
                    done.otp_delivered += usize::from(otp_delivered);
                }
                Outcome::Duplicate => done.duplicates += 1,
                Outcome::Unknown => done.unknown += 1,
                Outcome::Event => done.events += 1,
            }
        }
        Ok(done)
    }

    async fn apply(&self, item: Incoming) -> Result<Outcome, Error> {
        match item {
            Incoming::Status(update) => Ok(
                match self.store.apply_status(&update, self.retention).await? {
                    Applied::Changed {
                        category,
                        previous,
                        batch_id,
                        reference,
                    } => {
                        if !batch_id.is_empty() {
                            self.batch_item_moved(&batch_id, &reference, &update)
                                .await?;
                        }
                        Outcome::Changed {
                            // Counted once per code: when its state first reaches delivered (a
                            // `read` that came without a `delivered` counts too).
                            otp_delivered: category == category_name(Category::Authentication)
                                && previous < State::Delivered
                                && matches!(update.state, State::Delivered | State::Read),
                        }
                    }
                    Applied::Unchanged => Outcome::Duplicate,
                    Applied::Unknown => Outcome::Unknown,
                },
            ),
            Incoming::Event(event) => {
                if self.store.append_event(&event, self.retention).await? {
                    Ok(Outcome::Event)
                } else {
                    Ok(Outcome::Duplicate)
                }
            }
        }
    }

    /// A status of a batch item's message moves the item on (delivered, read, failed). If this
    /// fails the webhook delivery fails too, and Meta's retry finds the record already changed:
    /// the batch counts then miss this one status, nothing else.
    async fn batch_item_moved(
        &self,
        batch_id: &str,
        reference: &str,
        update: &StatusUpdate,
    ) -> Result<(), Error> {
        self.batches
            .item_status(
                batch_id,
                reference,
                &update.message_id,
                ItemState::of_status(update.state),
                update.error.as_ref(),
                self.retention,
            )
            .await?;
        Ok(())
    }
}

/// Webhook updates applied at once (Redis pipelines them on its one connection).
const INGEST_IN_FLIGHT: usize = 32;

enum Outcome {
    Changed { otp_delivered: bool },
    Duplicate,
    Unknown,
    Event,
}

fn check_message_id(id: &str) -> Result<(), Error> {
    let mut violations = Violations::new();
    if id.is_empty() {
        violations.push("message_id", "is required");
    } else if id.chars().count() > MAX_MESSAGE_ID_CHARS || !id.bytes().all(|b| b.is_ascii_graphic())
    {
        violations.push(
            "message_id",
            "must be a message id as SendTemplate returned it (printable ASCII, at most 256 characters)",
        );
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(violations))
    }
}
