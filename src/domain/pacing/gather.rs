//! Admissions of one process's calls, gathered: while one batch is at the shared store, the asks
//! that arrive wait and go together in the next one. Under load this turns many store round
//! trips into one; alone, an ask goes at once.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::rules::{Answer, Ask};
use crate::domain::ports::{PacingStore, StoreError};

/// The most asks in one batch.
const MAX_BATCH: usize = 64;

struct Pending {
    phone: String,
    /// The ask, its phone left empty (it is `phone`).
    ask: Ask<'static>,
    reply: oneshot::Sender<Result<Answer, StoreError>>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// A task is taking batches to the store.
    flushing: bool,
}

pub(super) struct Gatherer {
    store: Arc<dyn PacingStore>,
    number: String,
    queue: Mutex<Queue>,
}

impl Gatherer {
    pub(super) fn new(store: Arc<dyn PacingStore>, number: String) -> Arc<Self> {
        Arc::new(Gatherer {
            store,
            number,
            queue: Mutex::default(),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Each change to the queue is one push, drain or flag: a panic cannot leave it torn.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One admission, in the next batch.
    pub(super) async fn admit(self: &Arc<Self>, ask: &Ask<'_>) -> Result<Answer, StoreError> {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut queue = self.queue();
            queue.pending.push(Pending {
                phone: ask.phone.to_owned(),
                ask: Ask { phone: "", ..*ask },
                reply,
            });
            !std::mem::replace(&mut queue.flushing, true)
        };
        if lead {
            // Its own task: a caller that goes away must not strand the asks of the others.
            tokio::spawn(self.clone().flush());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError("the pacing batch was lost".into())))
    }

    /// Takes batches to the store until none is left.
    async fn flush(self: Arc<Self>) {
        let mut guard = Flushing(&self, true);
        loop {
            let batch: Vec<Pending> = {
                let mut queue = self.queue();
                if queue.pending.is_empty() {
                    queue.flushing = false;
                    guard.1 = false;
                    return;
                }
                let n = queue.pending.len().min(MAX_BATCH);
                queue.pending.drain(..n).collect()
            };
            let asks: Vec<Ask<'_>> = batch
                .iter()
                .map(|p| Ask {
                    phone: &p.phone,
                    ..p.ask
                })
                .collect();
            let result = self
                .store
                .admit(&self.number, &asks)
                .await
                .and_then(|answers| {
                    if answers.len() == asks.len() {
                        Ok(answers)
                    } else {
                        Err(StoreError(
                            "the pacing store answered a batch with the wrong count".into(),
                        ))
                    }
                });
            drop(asks);
            match result {
                Ok(answers) => {
                    for (pending, answer) in batch.into_iter().zip(answers) {
                        let _ = pending.reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    for pending in batch {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// Clears the flushing flag if the flushing task ends without doing so (a panic), so that the
/// next ask starts a new one.
struct Flushing<'a>(&'a Gatherer, bool);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.queue().flushing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, Store};

    #[tokio::test]
    async fn every_ask_of_many_at_once_gets_its_own_answer() {
        let gatherer = Gatherer::new(Arc::new(Store::Memory(MemoryStore::default())), "1".into());
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let gatherer = gatherer.clone();
                tokio::spawn(async move {
                    let phone = format!("+62812{i:07}");
                    let ask = Ask {
                        phone: &phone,
                        interval_us: 1_000,
                        horizon_us: u64::MAX,
                        budget_us: u64::MAX,
                        pair_us: 0,
                        daily_limit: 0,
                    };
                    gatherer.admit(&ask).await
                })
            })
            .collect();
        let mut waits = Vec::new();
        for call in calls {
            match call.await.unwrap().unwrap() {
                Answer::Admitted { wait_us, .. } => waits.push(wait_us),
                other => panic!("{other:?}"),
            }
        }
        // Two hundred distinct slots, one interval apart (give or take the clock between
        // batches).
        waits.sort_unstable();
        assert_eq!(waits.len(), 200);
        assert!(waits.last().unwrap() >= &(199 * 1_000 - 50_000));
        // The flushing task ends once the queue is empty.
        for _ in 0..1000 {
            if !gatherer.queue().flushing {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("the flushing task did not end");
    }
}
