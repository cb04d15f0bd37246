//! The in-process backend for the embedded default (`REDIS_URL` unset): the Redis scripts'
//! semantics under one mutex. State is lost on restart and not shared between processes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use super::{CodeHash, Gate, Idempotency, StoreError, Verdict, now_ms};

mod batch;
mod messages;
mod pacing;
mod settings;

enum Value {
    Limits {
        count: u32,
        window_end: u64,
        resend_at: u64,
    },
    Counter(u64),
    Code {
        hash: CodeHash,
        attempts_left: u32,
    },
    /// A call in progress: the request's digest and the owner's token.
    InProgress {
        digest: String,
        token: String,
    },
    /// A finished call: the request's digest and its stored answer.
    Answer {
        digest: String,
        bytes: Vec<u8>,
    },
}

struct Entry {
    value: Value,
    expires_at_ms: u64,
}

#[derive(Clone, Default)]
pub struct MemoryStore {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    messages: Arc<Mutex<messages::Messages>>,
    pacing: Arc<pacing::Schedules>,
    batches: Arc<Mutex<batch::Batches>>,
    settings: Arc<Mutex<Option<crate::domain::settings::StoredSettings>>>,
}

impl MemoryStore {
    /// The pacing schedules of this process.
    pub(crate) fn pacing(&self) -> &pacing::Schedules {
        &self.pacing
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave an entry half-written (each update is one
        // insert), so the data is still consistent.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The live entry under `key`, dropping it if it has expired.
    fn live<'a>(map: &'a mut HashMap<String, Entry>, key: &str) -> Option<&'a mut Entry> {
        let now = now_ms();
        if map.get(key).is_some_and(|e| e.expires_at_ms <= now) {
            map.remove(key);
        }
        map.get_mut(key)
    }

    /// Drops expired entries; run periodically so that abandoned codes do not accumulate.
    pub fn sweep(&self) {
        let now = now_ms();
        self.lock().retain(|_, e| e.expires_at_ms > now);
        self.sweep_messages(now);
        self.sweep_batches(now);
    }

    pub async fn gate(
        &self,
        key: &str,
        now: u64,
        resend: Duration,
        max: u32,
        window: Duration,
    ) -> Result<Gate, StoreError> {
        let mut map = self.lock();
        let (mut count, mut window_end, resend_at) = match Self::live(&mut map, key) {
            Some(Entry {
                value:
                    Value::Limits {
                        count,
                        window_end,
                        resend_at,
                    },
                ..
            }) => (*count, *window_end, *resend_at),
            _ => (0, 0, 0),
        };
        if window_end <= now {
            count = 0;
            window_end = now + window.as_millis() as u64;
        }
        if count >= max {
            return Ok(Gate::CapReached(Duration::from_millis(window_end - now)));
        }
        if resend_at > now {
            return Ok(Gate::Cooldown(Duration::from_millis(resend_at - now)));
        }
        let resend_ms = resend.as_millis() as u64;
        let resend_at = if resend_ms > 0 { now + resend_ms } else { 0 };
        map.insert(
            key.to_owned(),
            Entry {
                value: Value::Limits {
                    count: count + 1,
                    window_end,
                    resend_at,
                },
                expires_at_ms: window_end.max(resend_at),
            },
        );
        Ok(Gate::Allowed {
            resend_at_ms: resend_at,
        })
    }

    pub async fn release(&self, key: &str, token: u64, uncount: bool) -> Result<(), StoreError> {
        let mut map = self.lock();
        if let Some(Entry {
            value: Value::Limits {
                count, resend_at, ..
            },
            ..
        }) = Self::live(&mut map, key)
            && *resend_at == token
        {
            *resend_at = 0;
            if uncount {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    // Nothing was sent in this window: keep nothing for it.
                    map.remove(key);
                }
            }
        }
        Ok(())
    }

    pub async fn count_daily(
        &self,
        key: &str,
        limit: u32,
        expire_at_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut map = self.lock();
        let count = match Self::live(&mut map, key) {
            Some(Entry {
                value: Value::Counter(n),
                ..
            }) => {
                *n += 1;
                *n
            }
            _ => {
                map.insert(
                    key.to_owned(),
                    Entry {
                        value: Value::Counter(1),
                        expires_at_ms: expire_at_ms,
                    },
                );
                1
            }
        };
        Ok(count <= u64::from(limit))
    }

    pub async fn put_code(
        &self,
        key: &str,
        hash: &CodeHash,
        attempts: u32,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.lock().insert(
            key.to_owned(),
            Entry {
                value: Value::Code {
                    hash: *hash,
                    attempts_left: attempts,
                },
                expires_at_ms: now_ms() + ttl.as_millis() as u64,
            },
        );
        Ok(())
    }

    pub async fn discard_code(&self, key: &str, hash: &CodeHash) -> Result<(), StoreError> {
        let mut map = self.lock();
        if let Some(Entry {
            value: Value::Code { hash: stored, .. },
            ..
        }) = Self::live(&mut map, key)
            && stored == hash
        {
            map.remove(key);
        }
        Ok(())
    }

    pub async fn verify(&self, key: &str, hash: &CodeHash) -> Result<Verdict, StoreError> {
        let mut map = self.lock();
        let Some(Entry {
            value:
                Value::Code {
                    hash: stored,
                    attempts_left,
                },
            ..
        }) = Self::live(&mut map, key)
        else {
            return Ok(Verdict::Expired);
        };
        if stored == hash {
            map.remove(key);
            return Ok(Verdict::Verified);
        }
        *attempts_left = attempts_left.saturating_sub(1);
        if *attempts_left == 0 {
            map.remove(key);
            return Ok(Verdict::TooManyAttempts);
        }
        Ok(Verdict::Invalid {
            attempts_left: *attempts_left,
        })
    }

    pub async fn idempotency_begin(
        &self,
        key: &str,
        digest: &str,
        token: &str,
        lock: Duration,
    ) -> Result<Idempotency, StoreError> {
        let mut map = self.lock();
        match Self::live(&mut map, key) {
            Some(Entry {
                value: Value::Answer { digest: d, .. } | Value::InProgress { digest: d, .. },
                ..
            }) if d != digest => Ok(Idempotency::Reused),
            Some(Entry {
                value: Value::Answer { bytes, .. },
                ..
            }) => Ok(Idempotency::Done(bytes.clone())),
            Some(_) => Ok(Idempotency::InFlight),
            None => {
                map.insert(
                    key.to_owned(),
                    Entry {
                        value: Value::InProgress {
                            digest: digest.to_owned(),
                            token: token.to_owned(),
                        },
                        expires_at_ms: now_ms() + lock.as_millis() as u64,
                    },
                );
                Ok(Idempotency::Started)
            }
        }
    }

    fn owned_by(map: &mut HashMap<String, Entry>, key: &str, token: &str) -> bool {
        matches!(
            Self::live(map, key),
            Some(Entry { value: Value::InProgress { token: owner, .. }, .. }) if owner == token
        )
    }

    pub async fn idempotency_finish(
        &self,
        key: &str,
        digest: &str,
        token: &str,
        answer: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let mut map = self.lock();
        if Self::owned_by(&mut map, key, token) {
            map.insert(
                key.to_owned(),
                Entry {
                    value: Value::Answer {
                        digest: digest.to_owned(),
                        bytes: answer.to_vec(),
                    },
                    expires_at_ms: now_ms() + keep.as_millis() as u64,
                },
            );
        }
        Ok(())
    }

    pub async fn idempotency_abort(
        &self,
        key: &str,
        _digest: &str,
        token: &str,
    ) -> Result<(), StoreError> {
        let mut map = self.lock();
        if Self::owned_by(&mut map, key, token) {
            map.remove(key);
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
