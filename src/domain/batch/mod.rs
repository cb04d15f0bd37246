//! Batch runs: the month-start invoice run and the other billing runs, handed to kabar whole.
//!
//! A caller submits up to [`MAX_ITEMS_PER_CALL`] messages a call to a batch it names; each item
//! is checked like a SendTemplate call and kept durably (in Redis, shared by every replica) once
//! the call answers. Workers on every replica ([`worker`]) take items, send each through the
//! send pipeline at the lowest pacing priority, and settle it once: accepted, failed, or
//! unknown when Meta may have it (never sent again). A refusal that would hit every item pauses
//! the batch; webhook statuses move its items on to delivered and read. Batch ids are each
//! caller's own ([`BatchId`]).

pub mod id;
pub mod rules;
pub mod worker;

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

pub use self::id::BatchId;
use self::rules::{BatchState, Counts, ItemState, check_batch_id, daily_hold, eta_seconds};
use super::settings::Effective;
use super::{
    error::{Error, Violations, echo},
    outbox::Outgoing,
    pacing::{Pacer, Priority},
    ports::BatchStore,
    status::MetaError,
};
use crate::{
    notify::{NotificationRequest, Notifier},
    phone,
    store::now_ms,
    templates::Category,
    whatsapp::OutboundTemplate,
};

/// Most messages in one SubmitBatch call.
pub const MAX_ITEMS_PER_CALL: usize = 1000;
/// Most items ListBatchItems returns at once, and the default.
pub const MAX_PAGE: usize = 1000;
pub const DEFAULT_PAGE: usize = 100;
/// Most items one ListBatchItems call looks at while filtering: a page of a rare state may come
/// back short, with a token to look further.
const MAX_SCAN: usize = 10_000;

/// A message of a batch as submitted: checked, resolved against the template registry, ready to
/// send. Stored as it is (short field names keep an item small in Redis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewItem {
    #[serde(rename = "r")]
    pub reference: String,
    /// E.164.
    #[serde(rename = "p")]
    pub phone: String,
    /// Registry key.
    #[serde(rename = "k")]
    pub template: String,
    /// Meta's template name and language from the registry (the environment), or the message's
    /// own language: the runtime settings in force when the item is sent apply on top
    /// ([`outgoing`]), so that a name fixed while a run is paused reaches its remaining items.
    #[serde(rename = "n")]
    pub name: String,
    #[serde(rename = "l")]
    pub language: String,
    /// The language is the message's own (SendTemplateRequest.language): it wins over the
    /// runtime settings.
    #[serde(rename = "x", default, skip_serializing_if = "std::ops::Not::not")]
    pub own_language: bool,
    #[serde(rename = "c")]
    pub category: Category,
    /// Body parameters in `{{1}}..{{n}}` order.
    #[serde(rename = "v", default)]
    pub params: Vec<String>,
}

/// An item and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub data: NewItem,
    pub state: ItemState,
    pub message_id: String,
    pub error: Option<MetaError>,
}

/// An item handed to a worker; `ticket` names this hand-over in the queue.
#[derive(Debug, Clone)]
pub struct Claim {
    pub ticket: String,
    pub item: Item,
}

/// The answer of [`BatchStore::claim`].
#[derive(Debug, Default)]
pub struct Claimed {
    /// None: no such batch.
    pub state: Option<BatchState>,
    pub items: Vec<Claim>,
}

/// The answer of [`BatchStore::mark_sending`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Marked: send it.
    Go,
    /// The batch is no longer workable (paused, cancelled).
    Stopped(BatchState),
    /// Another worker holds the item now.
    Lost,
}

/// How a worker settles an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: ItemState,
    pub message_id: String,
    pub error: Option<MetaError>,
}

/// The answer of [`BatchStore::submit`].
#[derive(Debug, Clone)]
pub enum Submitted {
    Added {
        batch: BatchInfo,
        added: usize,
    },
    /// The batch takes no new items (closed, done or cancelled); nothing was added.
    Closed(BatchInfo),
}

/// A change of a batch's state on request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Cancel,
    /// Why (kabar's reason and Meta's words).
    Pause(String),
    Resume,
}

/// A batch and its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    pub batch_id: String,
    pub state: BatchState,
    pub pause_reason: String,
    pub counts: Counts,
    /// `last` was given: no more items.
    pub closed: bool,
    pub created_at_ms: u64,
}

/// A batch as callers see it: with the time its queued items still need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchView {
    pub info: BatchInfo,
    pub eta_seconds: u64,
    /// Why queued items cannot all go out now although the batch runs (Meta's daily limit).
    pub held_reason: String,
}

/// Which items ListBatchItems returns.
fn parse_filter(filter: &str) -> Result<Option<ItemState>, Error> {
    if filter.is_empty() {
        return Ok(None);
    }
    ItemState::ALL
        .into_iter()
        .find(|s| s.as_str().eq_ignore_ascii_case(filter))
        .map(Some)
        .ok_or_else(|| {
            Error::field(
                "filter",
                format!(
                    "unknown filter {}; one of: \"\" (every item), {}",
                    echo(filter),
                    ItemState::ALL.map(ItemState::as_str).join(", ")
                ),
            )
        })
}

/// A page of items and where the next one starts.
pub struct ItemPage {
    pub items: Vec<Item>,
    /// Empty when there are no more.
    pub next_page_token: String,
}

pub struct Batches {
    store: Arc<dyn BatchStore>,
    notifier: Arc<Notifier>,
    pacer: Arc<Pacer>,
    retention: Duration,
    /// Wakes this replica's workers when items arrive.
    wake: Arc<Notify>,
}

impl Batches {
    pub fn new(
        store: Arc<dyn BatchStore>,
        notifier: Arc<Notifier>,
        pacer: Arc<Pacer>,
        retention: Duration,
        wake: Arc<Notify>,
    ) -> Self {
        Batches {
            store,
            notifier,
            pacer,
            retention,
            wake,
        }
    }

    /// `SubmitBatch`: checks every message first (one bad item refuses the call, naming it),
    /// then adds the new references in one step.
    pub async fn submit(
        &self,
        batch_id: &BatchId,
        messages: &[NotificationRequest<'_>],
        last: bool,
    ) -> Result<BatchView, Error> {
        let items = self.prepare(batch_id.own(), messages, last)?;
        match self
            .store
            .submit(batch_id.stored(), &items, last, now_ms(), self.retention)
            .await?
        {
            Submitted::Added { batch, added } => {
                if added > 0 {
                    self.wake.notify_waiters();
                }
                Ok(self.view(batch_id, batch))
            }
            Submitted::Closed(batch) => Err(Error::BatchClosed {
                batch_id: batch_id.own().to_owned(),
                state: if batch.state.is_final() {
                    batch.state.as_str()
                } else {
                    "closed"
                },
                what: "it takes no new items (resubmitting items already in it is fine); \
                       start a new batch_id",
            }),
        }
    }

    /// Checks the whole call and resolves every message, reporting the problems of all items,
    /// each named by its place in the call (`messages[3].phone`).
    fn prepare(
        &self,
        batch_id: &str,
        messages: &[NotificationRequest<'_>],
        last: bool,
    ) -> Result<Vec<NewItem>, Error> {
        let mut violations = Violations::new();
        if let Err(problem) = check_batch_id(batch_id) {
            violations.push("batch_id", problem);
        }
        if messages.len() > MAX_ITEMS_PER_CALL {
            // Nothing else is checked: the call is refused whatever its items hold.
            violations.push(
                "messages",
                format!(
                    "at most {MAX_ITEMS_PER_CALL} messages a call (got {}); call again with the \
                     same batch_id for more",
                    messages.len()
                ),
            );
            return Err(Error::InvalidArgument(violations));
        }
        if messages.is_empty() && !last {
            violations.push(
                "messages",
                "is empty; send at least one message, or last=true to close the batch",
            );
        }
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(messages.len());
        let mut items = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if m.reference.is_empty() {
                violations.push(
                    format!("messages[{i}].reference"),
                    "is required in a batch: the caller's own id of the message (the invoice \
                     number), unique in the batch",
                );
            } else if let Some(first) = seen.insert(m.reference, i) {
                violations.push(
                    format!("messages[{i}].reference"),
                    format!(
                        "repeats the reference of messages[{first}]; each reference is sent once \
                         per batch"
                    ),
                );
            }
            if !m.idempotency_key.is_empty() {
                violations.push(
                    format!("messages[{i}].idempotency_key"),
                    "is not used in a batch: the batch and the reference make each item's key",
                );
            }
            match self.notifier.prepare(m) {
                Ok(out) => {
                    // The registry's name and language are stored; the runtime settings apply
                    // when each item is sent.
                    let registry = self.notifier.templates().get(&out.template_key);
                    let own_language = !m.language.is_empty();
                    items.push(NewItem {
                        reference: out.reference,
                        phone: out.message.to.e164().to_owned(),
                        name: registry.map_or(out.message.template, |t| t.name.clone()),
                        language: match registry {
                            Some(t) if !own_language => t.language.clone(),
                            _ => out.message.language,
                        },
                        own_language,
                        template: out.template_key,
                        category: out.category,
                        params: out.message.body_params,
                    })
                }
                Err(Error::InvalidArgument(problems)) => {
                    for v in problems.shown() {
                        violations.push(format!("messages[{i}].{}", v.field), &v.description);
                    }
                }
                Err(other) => return Err(other),
            }
        }
        if violations.is_empty() {
            Ok(items)
        } else {
            Err(Error::InvalidArgument(violations))
        }
    }

    /// `GetBatch`. Another caller's batch is not found, exactly as one that does not exist.
    pub async fn get(&self, batch_id: &BatchId) -> Result<BatchView, Error> {
        check_id(batch_id)?;
        let batch = self
            .store
            .get(batch_id.stored())
            .await?
            .ok_or_else(|| not_found(batch_id))?;
        Ok(self.view(batch_id, batch))
    }

    /// `CancelBatch`: no further item is sent, on any replica (items being sent this instant
    /// finish). Cancelling a cancelled batch changes nothing; a done one cannot be cancelled.
    pub async fn cancel(&self, batch_id: &BatchId) -> Result<BatchView, Error> {
        self.command(batch_id, &Command::Cancel).await
    }

    /// `ResumeBatch`: a paused batch runs again; a running one is left as it is.
    pub async fn resume(&self, batch_id: &BatchId) -> Result<BatchView, Error> {
        let view = self.command(batch_id, &Command::Resume).await?;
        self.wake.notify_waiters();
        Ok(view)
    }

    async fn command(&self, batch_id: &BatchId, command: &Command) -> Result<BatchView, Error> {
        check_id(batch_id)?;
        let (batch, _) = self
            .store
            .command(batch_id.stored(), command, self.retention)
            .await?
            .ok_or_else(|| not_found(batch_id))?;
        let refused = match (command, batch.state) {
            (Command::Cancel, BatchState::Done) => Some("a finished batch cannot be cancelled"),
            (Command::Resume, BatchState::Done | BatchState::Cancelled) => {
                Some("a finished batch cannot be resumed")
            }
            _ => None,
        };
        match refused {
            Some(what) => Err(Error::BatchClosed {
                batch_id: batch_id.own().to_owned(),
                state: batch.state.as_str(),
                what,
            }),
            None => Ok(self.view(batch_id, batch)),
        }
    }

    /// `ListBatchItems`: items in submission order, only those in the `filter` state if one is
    /// given. The page token is the position to go on from.
    pub async fn list(
        &self,
        batch_id: &BatchId,
        filter: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<ItemPage, Error> {
        check_id(batch_id)?;
        let filter = parse_filter(filter)?;
        let page = match page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let bad_token = || {
            Error::field(
                "page_token",
                "must be a next_page_token from an earlier answer",
            )
        };
        let mut at: u64 = if page_token.is_empty() {
            0
        } else if page_token.len() > 20 || !page_token.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad_token());
        } else {
            page_token.parse().map_err(|_| bad_token())?
        };
        let mut items = Vec::new();
        let mut scanned = 0;
        loop {
            let want = if filter.is_none() {
                page - items.len()
            } else {
                MAX_PAGE
            };
            let (chunk, total) = self
                .store
                .items(batch_id.stored(), at, want)
                .await?
                .ok_or_else(|| not_found(batch_id))?;
            if at > total {
                return Err(bad_token());
            }
            let read = chunk.len();
            for item in chunk {
                at += 1;
                scanned += 1;
                if filter.is_none_or(|f| f == item.state) {
                    items.push(item);
                    if items.len() == page {
                        break;
                    }
                }
            }
            if at >= total {
                return Ok(ItemPage {
                    items,
                    next_page_token: String::new(),
                });
            }
            if items.len() == page || scanned >= MAX_SCAN || read == 0 {
                return Ok(ItemPage {
                    items,
                    next_page_token: at.to_string(),
                });
            }
        }
    }

    /// The batch as its caller sees it: under the caller's own id, with the time left.
    fn view(&self, batch_id: &BatchId, mut info: BatchInfo) -> BatchView {
        batch_id.own().clone_into(&mut info.batch_id);
        if !info.state.is_workable() {
            return BatchView {
                info,
                eta_seconds: 0,
                held_reason: String::new(),
            };
        }
        let pacing = self.pacer.snapshot();
        let queued = info.counts.queued;
        let held = daily_hold(queued, pacing.daily_used, pacing.daily_limit);
        BatchView {
            // Held by the daily limit, the time left is not the rate's: none is given.
            eta_seconds: match held {
                Some(_) if pacing.daily_used >= pacing.daily_limit => 0,
                _ => eta_seconds(queued, pacing.effective_mps),
            },
            held_reason: held.unwrap_or_default(),
            info,
        }
    }
}

fn check_id(batch_id: &BatchId) -> Result<(), Error> {
    check_batch_id(batch_id.own()).map_err(|problem| Error::field("batch_id", problem))
}

/// No such batch of this caller: it was never submitted, is older than the retention, or is
/// another caller's (the answer is the same, so nothing tells which).
fn not_found(batch_id: &BatchId) -> Error {
    Error::BatchNotFound(echo(batch_id.own()))
}

/// The message of an item, ready for the send pipeline, with the runtime `settings` in force
/// now. Its record carries the batch as the store knows it ([`BatchId::stored`]), so that a
/// webhook status of the message finds the item.
pub fn outgoing(
    batch_id: &BatchId,
    item: &NewItem,
    settings: &Effective,
) -> Result<Outgoing, Error> {
    let to = phone::normalize(&item.phone).map_err(|e| Error::field("phone", e.to_string()))?;
    let (name, language) = settings.overrides(&item.template);
    Ok(Outgoing {
        message: OutboundTemplate {
            to,
            template: name.unwrap_or(&item.name).to_owned(),
            language: match language {
                Some(language) if !item.own_language => language.to_owned(),
                _ => item.language.clone(),
            },
            body_params: item.params.clone(),
            button_param: None,
            sensitive: false,
        },
        template_key: item.template.clone(),
        category: item.category,
        reference: item.reference.clone(),
        idempotency_key: None,
        priority: Priority::Batch,
        batch_id: batch_id.stored().to_owned(),
    })
}

/// An item's error as ListBatchItems shows it: Meta's code and words when Meta refused, kabar's
/// reason otherwise.
pub fn item_error(error: &Error) -> MetaError {
    match error {
        Error::Meta(f) => MetaError {
            code: f.meta_code,
            reason: f.reason.as_str().to_owned(),
            title: f.remedy.clone(),
            details: super::error::escape_unsafe(&f.details),
        },
        other => MetaError {
            code: 0,
            reason: match other {
                Error::MetaOutcomeUnknown(_) | Error::DeadlineExceeded { .. } => {
                    super::reason::Reason::MetaOutcomeUnknown
                        .as_str()
                        .to_owned()
                }
                Error::InvalidArgument(_) => "INVALID_ARGUMENT".to_owned(),
                _ => "ERROR".to_owned(),
            },
            title: String::new(),
            details: other.summary(),
        },
    }
}

/// How long after its claim an item may still be marked and sent: half of
/// `KABAR_BATCH_CLAIM_TIMEOUT_SECONDS`, so that a take-over (which needs the whole timeout) never
/// meets a send that may still start.
pub fn send_window(claim_timeout: Duration) -> Duration {
    claim_timeout / 2
}

/// The error of an item settled unknown because the replica sending it stopped first.
pub fn taken_over() -> MetaError {
    MetaError {
        code: 0,
        reason: super::reason::Reason::MetaOutcomeUnknown
            .as_str()
            .to_owned(),
        title: String::new(),
        details: "the replica sending this item stopped before Meta's answer was stored; \
                  Meta may have the message, so it is not sent again"
            .to_owned(),
    }
}
