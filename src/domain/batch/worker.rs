//! The batch worker of one replica: takes items of every workable batch from the shared queue,
//! sends each through the send pipeline, and settles it.
//!
//! Exactly-once rests on one mark: right before the message goes to Meta (after its pacing slot)
//! the item is marked as being sent, in the store, by the worker that holds it. A replica that
//! dies leaves its items held; once they have been held for longer than the claim timeout
//! another replica takes them over. An item taken over unmarked was never sent and is sent now;
//! an item taken over marked may be at Meta and is settled `unknown`, never sent again. A late
//! webhook status of its message (the record carries batch and reference) still moves it on.
//!
//! An item is marked only while its send deadline (half the claim timeout) has not passed, so
//! that a take-over, which needs the whole claim timeout, never meets an item whose send may
//! still start.
//!
//! When Meta's answers go missing (it hangs: each such item is settled unknown), the worker lets
//! one item at a time go to Meta until one is answered again, instead of writing off its whole
//! concurrency of items per timeout.
//!
//! On shutdown the worker takes no new items, gives back those it holds that are not yet
//! marked, and finishes the sends already under way.
//!
//! The worker knows batches as the store does ([`BatchId::stored`]); its log lines name a batch
//! the way a call's log line does: `caller` (with keys) and the caller's own `batch_id`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{
    BatchId, Claim, Mark, Outcome, item_error, outgoing,
    rules::{Failure, ItemState, judge},
};
use crate::domain::{
    error::Error,
    outbox::{Outbox, SendGuard},
    ports::BatchStore,
};

/// Most items taken from one batch at a time.
const CLAIM_MAX: usize = 64;
/// How often an idle worker looks for work (a submit on this replica wakes it at once).
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Wait between tries of a store write that failed.
const STORE_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Items in hand at once.
    pub concurrency: usize,
    /// How long an item may be held before another replica takes it over.
    pub claim_timeout: Duration,
    /// Kept as long as message records.
    pub retention: Duration,
}

/// What this replica's worker has done since it started, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// Items settled here: accepted, failed, unknown.
    pub settled: [(&'static str, u64); 3],
    /// Items given back to the queue for another try (Meta's rate limits or outages, pacing).
    pub retried: u64,
    /// Batches this replica paused.
    pub paused: u64,
    /// Items in hand now.
    pub in_hand: u64,
    /// Batches with items to send, as this replica last saw them.
    pub active: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    failed: AtomicU64,
    unknown: AtomicU64,
    retried: AtomicU64,
    paused: AtomicU64,
    active: AtomicU64,
}

pub struct Worker {
    store: Arc<dyn BatchStore>,
    counters: Counters,
    /// One permit per item this replica may hold; each item in hand holds one.
    slots: Arc<Semaphore>,
    outbox: Arc<Outbox>,
    config: WorkerConfig,
    /// This replica's name in the shared queue.
    consumer: String,
    /// Batches whose items wait before another try, and until when.
    held_back: Mutex<HashMap<String, Instant>>,
    /// Set when a send ended without Meta's answer; cleared by the next answered send. While
    /// set, only the holder of `probe` may send.
    meta_silent: AtomicBool,
    probe: Arc<Semaphore>,
}

impl Worker {
    pub fn new(store: Arc<dyn BatchStore>, outbox: Arc<Outbox>, config: WorkerConfig) -> Self {
        let mut random = [0u8; 6];
        getrandom::fill(&mut random).expect("the OS random number generator is available");
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        Worker {
            store,
            outbox,
            consumer: format!("{host}-{}-{}", std::process::id(), hex::encode(random)),
            counters: Counters::default(),
            slots: Arc::new(Semaphore::new(config.concurrency)),
            held_back: Mutex::new(HashMap::new()),
            meta_silent: AtomicBool::new(false),
            probe: Arc::new(Semaphore::new(1)),
            config,
        }
    }

    pub fn snapshot(&self) -> WorkerSnapshot {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerSnapshot {
            settled: [
                ("accepted", n(&c.accepted)),
                ("failed", n(&c.failed)),
                ("unknown", n(&c.unknown)),
            ],
            retried: n(&c.retried),
            paused: n(&c.paused),
            in_hand: (self.config.concurrency - self.slots.available_permits()) as u64,
            active: n(&c.active),
        }
    }

    /// Works batches until `stop`; returns once the items in hand are settled or given back.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, stop: CancellationToken) {
        let slots = self.slots.clone();
        let mut store_down = false;
        while !stop.is_cancelled() {
            let took = match self.round(&slots, &stop).await {
                Ok(n) => {
                    if store_down {
                        tracing::info!("batch worker: the store answers again; resuming");
                        store_down = false;
                    }
                    n
                }
                Err(e) => {
                    if !store_down {
                        tracing::warn!(error = %e, "batch worker: the store is unreachable; waiting");
                        store_down = true;
                    }
                    0
                }
            };
            if took == 0 {
                let wakened = wake.notified();
                tokio::select! {
                    () = tokio::time::sleep(IDLE_POLL) => {}
                    () = wakened => {}
                    () = stop.cancelled() => {}
                }
            } else if slots.available_permits() == 0 {
                // Every slot busy: wait until one frees.
                tokio::select! {
                    permit = slots.clone().acquire_owned() => drop(permit),
                    () = stop.cancelled() => {}
                }
            }
        }
        // Every item in hand holds a slot: all slots back means all items settled or given back.
        let _ = slots.acquire_many(self.config.concurrency as u32).await;
    }

    /// One pass over the active batches; how many items were taken.
    async fn round(
        self: &Arc<Self>,
        slots: &Arc<Semaphore>,
        stop: &CancellationToken,
    ) -> Result<usize, crate::domain::ports::StoreError> {
        let mut took = 0;
        let active = self.store.active().await?;
        self.counters
            .active
            .store(active.len() as u64, Ordering::Relaxed);
        for stored in active {
            let free = slots.available_permits();
            if free == 0 || stop.is_cancelled() {
                break;
            }
            if self.held_back(&stored) {
                continue;
            }
            let batch_id = BatchId::from_stored(&stored);
            let claimed = self
                .store
                .claim(
                    &stored,
                    &self.consumer,
                    free.min(CLAIM_MAX),
                    self.config.claim_timeout,
                    self.config.retention,
                )
                .await?;
            match claimed.state {
                None => self.store.forget(&stored).await?,
                Some(state) if state.is_final() => self.store.forget(&stored).await?,
                Some(_) => {}
            }
            for claim in claimed.items {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Cannot happen (no more than `free` were asked for); the item goes back.
                    let _ = self.store.release(&stored, &claim, &self.consumer).await;
                    continue;
                };
                took += 1;
                let (me, batch_id, stop) = (self.clone(), batch_id.clone(), stop.clone());
                tokio::spawn(async move {
                    me.handle(&batch_id, claim, &stop).await;
                    drop(slot);
                });
            }
        }
        Ok(took)
    }

    fn held_back(&self, stored: &str) -> bool {
        let mut held = self.held_back.lock().unwrap_or_else(|e| e.into_inner());
        match held.get(stored) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                held.remove(stored);
                false
            }
            None => false,
        }
    }

    fn hold_back(&self, batch_id: &BatchId, wait: Duration) {
        let mut held = self.held_back.lock().unwrap_or_else(|e| e.into_inner());
        let until = Instant::now() + wait;
        let entry = held.entry(batch_id.stored().to_owned()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Sends one item and settles it.
    async fn handle(&self, batch_id: &BatchId, claim: Claim, stop: &CancellationToken) {
        let settings = self.outbox.settings().current();
        let out = match outgoing(batch_id, &claim.item.data, &settings) {
            Ok(out) => out,
            Err(e) => {
                // Checked at submit: only a stored item from another version could fail here.
                self.settle(batch_id, &claim, ItemState::Failed, "", Some(&e), stop)
                    .await;
                return;
            }
        };
        let guard = MarkGuard {
            worker: self,
            batch_id,
            claim: &claim,
            started: AtomicBool::new(false),
            answer: Mutex::new(None),
            probe: Mutex::new(None),
        };
        let deadline = Instant::now() + super::send_window(self.config.claim_timeout);
        let result = {
            let mut send = Box::pin(self.outbox.send_guarded(&out, Some(deadline), &guard));
            tokio::select! {
                r = &mut send => r,
                () = stop.cancelled() => {
                    if guard.started.load(Ordering::SeqCst) {
                        // The mark is written or being written: the send goes on to its end.
                        send.await
                    } else {
                        // Not marked: nothing went out; stop waiting for the slot.
                        drop(send);
                        self.give_back(batch_id, &claim).await;
                        return;
                    }
                }
            }
        };
        let answer = *guard.answer.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => self.meta_silent.store(false, Ordering::SeqCst),
            Err(e) if e.may_have_been_delivered() => {
                if !self.meta_silent.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        caller = batch_id.owner(),
                        batch_id = batch_id.own(),
                        "a batch item went to Meta and no answer came back; batch items go one at \
                         a time until Meta answers again"
                    );
                }
            }
            Err(_) => {}
        }
        match (result, answer) {
            (Ok(accepted), _) => {
                self.settle(
                    batch_id,
                    &claim,
                    ItemState::Accepted,
                    &accepted.message_id,
                    None,
                    stop,
                )
                .await;
            }
            // The batch was paused or cancelled meanwhile, or another worker took the item.
            (Err(_), Some(Mark::Stopped(_) | Mark::Lost)) => {
                self.give_back(batch_id, &claim).await;
            }
            (Err(e), _) => match judge(&e) {
                Failure::Pause(reason) => {
                    let pause = super::Command::Pause(reason.clone());
                    match self
                        .store
                        .command(batch_id.stored(), &pause, self.config.retention)
                        .await
                    {
                        // Logged and counted once per pause, by the item that paused it.
                        Ok(Some((_, true))) => {
                            self.counters.paused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                caller = batch_id.owner(),
                                batch_id = batch_id.own(),
                                reason = %reason,
                                "batch paused: Meta refused in a way that would hit every item; \
                                 fix the cause, then ResumeBatch"
                            );
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(
                                caller = batch_id.owner(),
                                batch_id = batch_id.own(),
                                error = %e,
                                "could not pause the batch"
                            );
                            self.hold_back(batch_id, super::rules::RETRY_WAIT);
                        }
                    }
                    self.give_back(batch_id, &claim).await;
                }
                Failure::Retry(wait) => {
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    self.hold_back(batch_id, wait);
                    self.give_back(batch_id, &claim).await;
                }
                Failure::Unknown => {
                    self.hold_back(batch_id, super::rules::RETRY_WAIT);
                    self.settle(batch_id, &claim, ItemState::Unknown, "", Some(&e), stop)
                        .await;
                }
                Failure::Fail => {
                    self.settle(batch_id, &claim, ItemState::Failed, "", Some(&e), stop)
                        .await;
                }
            },
        }
    }

    /// Settles an item, trying again while the store is unreachable (until shutdown; an item
    /// left held is then taken over by another replica).
    async fn settle(
        &self,
        batch_id: &BatchId,
        claim: &Claim,
        state: ItemState,
        message_id: &str,
        error: Option<&Error>,
        stop: &CancellationToken,
    ) {
        let outcome = Outcome {
            state,
            message_id: message_id.to_owned(),
            error: error.map(item_error),
        };
        let mut warned = false;
        loop {
            match self
                .store
                .settle(
                    batch_id.stored(),
                    claim,
                    &self.consumer,
                    &outcome,
                    self.config.retention,
                )
                .await
            {
                Ok(Some(_)) => {
                    let counter = match state {
                        ItemState::Accepted => &self.counters.accepted,
                        ItemState::Failed => &self.counters.failed,
                        _ => &self.counters.unknown,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(None) => {
                    tracing::warn!(
                        caller = batch_id.owner(),
                        batch_id = batch_id.own(),
                        state = state.as_str(),
                        "a batch item was taken over by another replica before it was settled here"
                    );
                    return;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(
                            caller = batch_id.owner(),
                            batch_id = batch_id.own(),
                            error = %e,
                            "could not settle a batch item; trying again"
                        );
                        warned = true;
                    }
                    if stop.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
    }

    /// Gives an item that did not go out back to the queue. When the store is unreachable the
    /// item stays held, and is taken over after the claim timeout.
    async fn give_back(&self, batch_id: &BatchId, claim: &Claim) {
        if let Err(e) = self
            .store
            .release(batch_id.stored(), claim, &self.consumer)
            .await
        {
            tracing::warn!(
                caller = batch_id.owner(),
                batch_id = batch_id.own(),
                error = %e,
                "could not give a batch item back; it is taken over after the claim timeout"
            );
        }
    }
}

/// Marks the item as being sent, right before Meta is called.
struct MarkGuard<'a> {
    worker: &'a Worker,
    batch_id: &'a BatchId,
    claim: &'a Claim,
    /// Set before the mark is written: from then on the send is never abandoned.
    started: AtomicBool,
    answer: Mutex<Option<Mark>>,
    /// Held while this item is the one send allowed while Meta's answers go missing.
    probe: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

#[async_trait::async_trait]
impl SendGuard for MarkGuard<'_> {
    async fn before_send(&self) -> Result<(), Error> {
        let worker = self.worker;
        if worker.meta_silent.load(Ordering::SeqCst) {
            match worker.probe.clone().try_acquire_owned() {
                Ok(permit) => *self.probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit),
                Err(_) => {
                    return Err(Error::MetaUnreachable(
                        "Meta's answers are missing; one batch item at a time goes until it \
                         answers again"
                            .into(),
                    ));
                }
            }
        }
        self.started.store(true, Ordering::SeqCst);
        // Past its send window the item may be taken over: it is not marked any more.
        let within = super::send_window(worker.config.claim_timeout);
        let mark = worker
            .store
            .mark_sending(self.batch_id.stored(), self.claim, &worker.consumer, within)
            .await;
        let mark = match mark {
            Ok(m) => m,
            Err(e) => {
                // Not marked: nothing goes out, and the item can go back to the queue.
                self.started.store(false, Ordering::SeqCst);
                return Err(e.into());
            }
        };
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(mark);
        match mark {
            Mark::Go => Ok(()),
            Mark::Stopped(state) => Err(Error::BatchClosed {
                batch_id: self.batch_id.own().to_owned(),
                state: state.as_str(),
                what: "its items are not sent now",
            }),
            Mark::Lost => Err(Error::BatchClosed {
                batch_id: self.batch_id.own().to_owned(),
                state: "taken over",
                what: "another replica holds the item",
            }),
        }
    }
}
