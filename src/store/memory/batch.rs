//! Batch runs in process memory, with the semantics of the Redis scripts in
//! `store/redis/batch.rs`: the rules of `domain::batch::rules` applied under one mutex. Lost on
//! restart; a process is its own only worker, but hand-overs and take-overs work as in Redis.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use super::MemoryStore;
use crate::{
    domain::{
        batch::{
            BatchInfo, Claim, Claimed, Command, Item, Mark, NewItem, Outcome, Submitted,
            rules::{BatchState, Counts, ItemState, may_move, settled_state},
            taken_over,
        },
        ports::StoreError,
        status::MetaError,
    },
    store::now_ms,
};

#[derive(Default)]
pub(super) struct Batches {
    batches: HashMap<String, Run>,
}

struct Run {
    info: BatchInfo,
    items: HashMap<String, Item>,
    order: Vec<String>,
    /// Tickets waiting for a worker, oldest first, with their item's reference.
    queue: VecDeque<(u64, String)>,
    /// Tickets handed out: the item, who holds it, since when.
    held: HashMap<u64, (String, String, Instant)>,
    next_ticket: u64,
    expires_at_ms: u64,
}

impl Run {
    fn enqueue(&mut self, reference: String) {
        self.next_ticket += 1;
        self.queue.push_back((self.next_ticket, reference));
    }

    /// Moves an item and the counts with it; whether it moved.
    fn step(
        &mut self,
        reference: &str,
        to: ItemState,
        message_id: &str,
        error: Option<&MetaError>,
    ) -> bool {
        let Some(item) = self.items.get_mut(reference) else {
            return false;
        };
        if !may_move(item.state, to) {
            return false;
        }
        self.info.counts = self.info.counts.moved(item.state, to);
        item.state = to;
        if !message_id.is_empty() && item.message_id.is_empty() {
            item.message_id = message_id.to_owned();
        }
        if let Some(error) = error {
            item.error.get_or_insert_with(|| error.clone());
        }
        true
    }

    fn settle_state(&mut self) {
        self.info.state = settled_state(self.info.state, self.info.closed, &self.info.counts);
    }

    fn keep(&mut self, retention: Duration) {
        self.expires_at_ms = now_ms() + retention.as_millis() as u64;
    }

    /// The ticket, if `consumer` holds it.
    fn held_by(&self, claim: &Claim, consumer: &str) -> Option<u64> {
        let ticket: u64 = claim.ticket.parse().ok()?;
        match self.held.get(&ticket) {
            Some((_, holder, _)) if holder == consumer => Some(ticket),
            _ => None,
        }
    }
}

impl MemoryStore {
    fn batches(&self) -> std::sync::MutexGuard<'_, Batches> {
        self.batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops batches past their retention.
    pub(super) fn sweep_batches(&self, now: u64) {
        self.batches()
            .batches
            .retain(|_, run| run.expires_at_ms > now);
    }

    pub async fn batch_submit(
        &self,
        batch_id: &str,
        items: &[NewItem],
        last: bool,
        now: u64,
        retention: Duration,
    ) -> Result<Submitted, StoreError> {
        let mut all = self.batches();
        if all
            .batches
            .get(batch_id)
            .is_some_and(|run| run.expires_at_ms <= now)
        {
            all.batches.remove(batch_id);
        }
        let run = all
            .batches
            .entry(batch_id.to_owned())
            .or_insert_with(|| Run {
                info: BatchInfo {
                    batch_id: batch_id.to_owned(),
                    state: BatchState::Open,
                    pause_reason: String::new(),
                    counts: Counts::default(),
                    closed: false,
                    created_at_ms: now,
                },
                items: HashMap::new(),
                order: Vec::new(),
                queue: VecDeque::new(),
                held: HashMap::new(),
                next_ticket: 0,
                expires_at_ms: 0,
            });
        let new: Vec<&NewItem> = items
            .iter()
            .filter(|i| !run.items.contains_key(&i.reference))
            .collect();
        if !new.is_empty() && (run.info.closed || run.info.state.is_final()) {
            return Ok(Submitted::Closed(run.info.clone()));
        }
        for item in &new {
            run.items.insert(
                item.reference.clone(),
                Item {
                    data: (*item).clone(),
                    state: ItemState::Queued,
                    message_id: String::new(),
                    error: None,
                },
            );
            run.order.push(item.reference.clone());
            run.enqueue(item.reference.clone());
        }
        let added = new.len() as u64;
        run.info.counts.total += added;
        run.info.counts.queued += added;
        // A final batch stays as it is (resubmitting its own items changes nothing).
        if !run.info.state.is_final() {
            run.info.closed |= last;
        }
        run.settle_state();
        run.keep(retention);
        Ok(Submitted::Added {
            batch: run.info.clone(),
            added: added as usize,
        })
    }

    pub async fn batch_get(&self, batch_id: &str) -> Result<Option<BatchInfo>, StoreError> {
        let now = now_ms();
        Ok(self
            .batches()
            .batches
            .get(batch_id)
            .filter(|run| run.expires_at_ms > now)
            .map(|run| run.info.clone()))
    }

    pub async fn batch_active(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<(u64, String)> = self
            .batches()
            .batches
            .values()
            .filter(|run| !run.info.state.is_final())
            .map(|run| (run.info.created_at_ms, run.info.batch_id.clone()))
            .collect();
        ids.sort();
        Ok(ids.into_iter().map(|(_, id)| id).collect())
    }

    pub async fn batch_claim(
        &self,
        batch_id: &str,
        consumer: &str,
        max: usize,
        stale: Duration,
        retention: Duration,
    ) -> Result<Claimed, StoreError> {
        let mut all = self.batches();
        let Some(run) = all.batches.get_mut(batch_id) else {
            return Ok(Claimed::default());
        };
        let mut claimed = Claimed {
            state: Some(run.info.state),
            items: Vec::new(),
        };
        if !run.info.state.is_workable() {
            return Ok(claimed);
        }
        run.keep(retention);
        let now = Instant::now();
        // Items held too long: their worker died (or, as in Redis, this one lost track).
        let mut stale_tickets: Vec<u64> = run
            .held
            .iter()
            .filter(|(_, (_, _, since))| now.duration_since(*since) >= stale)
            .map(|(t, _)| *t)
            .collect();
        stale_tickets.sort_unstable();
        for ticket in stale_tickets {
            if claimed.items.len() >= max {
                break;
            }
            let (reference, _, _) = run.held.remove(&ticket).expect("listed above");
            match run.items.get(&reference).map(|i| i.state) {
                Some(ItemState::Sending) => {
                    run.step(&reference, ItemState::Unknown, "", Some(&taken_over()));
                }
                Some(ItemState::Queued) => {
                    run.held
                        .insert(ticket, (reference.clone(), consumer.to_owned(), now));
                    claimed.items.push(Claim {
                        ticket: ticket.to_string(),
                        item: run.items[&reference].clone(),
                    });
                }
                _ => {}
            }
        }
        while claimed.items.len() < max {
            let Some((ticket, reference)) = run.queue.pop_front() else {
                break;
            };
            match run.items.get(&reference) {
                Some(item) if item.state == ItemState::Queued => {
                    claimed.items.push(Claim {
                        ticket: ticket.to_string(),
                        item: item.clone(),
                    });
                    run.held
                        .insert(ticket, (reference, consumer.to_owned(), now));
                }
                _ => {}
            }
        }
        if !claimed.items.is_empty() && run.info.state == BatchState::Open {
            run.info.state = BatchState::Running;
        }
        run.settle_state();
        claimed.state = Some(run.info.state);
        Ok(claimed)
    }

    pub async fn batch_mark(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
        within: Duration,
    ) -> Result<Mark, StoreError> {
        let mut all = self.batches();
        let Some(run) = all.batches.get_mut(batch_id) else {
            return Ok(Mark::Lost);
        };
        if !run.info.state.is_workable() {
            return Ok(Mark::Stopped(run.info.state));
        }
        match run.held_by(claim, consumer).and_then(|t| run.held.get(&t)) {
            Some((_, _, since)) if since.elapsed() < within => {}
            _ => return Ok(Mark::Lost),
        }
        if !run.step(&claim.item.data.reference, ItemState::Sending, "", None) {
            return Ok(Mark::Lost);
        }
        Ok(Mark::Go)
    }

    pub async fn batch_settle(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
        outcome: &Outcome,
        retention: Duration,
    ) -> Result<Option<BatchState>, StoreError> {
        let mut all = self.batches();
        let Some(run) = all.batches.get_mut(batch_id) else {
            return Ok(None);
        };
        let reference = &claim.item.data.reference;
        match run.held_by(claim, consumer) {
            Some(ticket) => {
                run.held.remove(&ticket);
            }
            // Taken over and settled unknown meanwhile: the answer that came late still counts.
            None if outcome.state == ItemState::Accepted
                && run.items.get(reference).map(|i| i.state) == Some(ItemState::Unknown) => {}
            None => return Ok(None),
        }
        run.step(
            reference,
            outcome.state,
            &outcome.message_id,
            outcome.error.as_ref(),
        );
        run.settle_state();
        if run.info.state.is_final() {
            run.keep(retention);
        }
        Ok(Some(run.info.state))
    }

    pub async fn batch_release(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
    ) -> Result<(), StoreError> {
        let mut all = self.batches();
        let Some(run) = all.batches.get_mut(batch_id) else {
            return Ok(());
        };
        let Some(ticket) = run.held_by(claim, consumer) else {
            return Ok(());
        };
        run.held.remove(&ticket);
        let reference = claim.item.data.reference.clone();
        if let Some(item) = run.items.get_mut(&reference) {
            if item.state == ItemState::Sending {
                item.state = ItemState::Queued;
            }
            if item.state == ItemState::Queued && run.info.state != BatchState::Cancelled {
                run.enqueue(reference);
            }
        }
        Ok(())
    }

    pub async fn batch_command(
        &self,
        batch_id: &str,
        command: &Command,
        retention: Duration,
    ) -> Result<Option<(BatchInfo, bool)>, StoreError> {
        let mut all = self.batches();
        let Some(run) = all.batches.get_mut(batch_id) else {
            return Ok(None);
        };
        run.keep(retention);
        let before = run.info.state;
        match command {
            Command::Cancel if run.info.state != BatchState::Done => {
                run.info.state = BatchState::Cancelled;
                run.queue.clear();
            }
            Command::Pause(reason) if run.info.state.is_workable() => {
                run.info.state = BatchState::Paused;
                run.info.pause_reason.clone_from(reason);
            }
            Command::Resume if run.info.state == BatchState::Paused => {
                run.info.state = BatchState::Running;
                run.info.pause_reason.clear();
                run.settle_state();
            }
            _ => {}
        }
        Ok(Some((run.info.clone(), run.info.state != before)))
    }

    pub async fn batch_item_status(
        &self,
        batch_id: &str,
        reference: &str,
        message_id: &str,
        to: ItemState,
        error: Option<&MetaError>,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let mut all = self.batches();
        if let Some(run) = all.batches.get_mut(batch_id)
            && run.step(reference, to, message_id, error)
        {
            run.settle_state();
            if run.info.state.is_final() {
                run.keep(retention);
            }
        }
        Ok(())
    }

    pub async fn batch_items(
        &self,
        batch_id: &str,
        start: u64,
        count: usize,
    ) -> Result<Option<(Vec<Item>, u64)>, StoreError> {
        let all = self.batches();
        let Some(run) = all.batches.get(batch_id) else {
            return Ok(None);
        };
        let items = run
            .order
            .iter()
            .skip(usize::try_from(start).unwrap_or(usize::MAX))
            .take(count)
            .filter_map(|r| run.items.get(r).cloned())
            .collect();
        Ok(Some((items, run.order.len() as u64)))
    }
}
