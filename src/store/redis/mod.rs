//! The Redis backend: one shared `ConnectionManager` (it reconnects by itself), Lua scripts hashed
//! once at start-up and run with EVALSHA, and every call bounded by a short timeout so that an
//! unreachable Redis answers UNAVAILABLE quickly instead of holding the caller.

use std::{sync::Arc, time::Duration};

use ::redis::{AsyncCommands, Script, aio::ConnectionManager};

mod batch;
mod messages;
mod pacing;
mod settings;

use super::{CodeHash, Gate, HASH_LEN, Idempotency, StoreError, Verdict};

/// Counts a send in a fixed window that starts at its first send; refuses at the cap (the longer
/// wait, so it is reported first) or inside the cooldown, without changing anything. Returns {0, resend_at} | {1, wait_ms} | {2, wait_ms}.
const GATE: &str = r#"
local now = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'n', 'w', 'r')
local n = tonumber(v[1]) or 0
local w = tonumber(v[2]) or 0
local r = tonumber(v[3]) or 0
if w <= now then
  n = 0
  w = now + tonumber(ARGV[4])
end
if n >= tonumber(ARGV[3]) then return {2, w - now} end
if r > now then return {1, r - now} end
n = n + 1
local resend = tonumber(ARGV[2])
if resend > 0 then r = now + resend else r = 0 end
redis.call('HSET', KEYS[1], 'n', n, 'w', string.format('%.0f', w), 'r', string.format('%.0f', r))
redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', math.max(w, r)))
return {0, r}
"#;

/// Undoes what GATE did for a send that did not happen: lifts its cooldown and, when asked,
/// takes the send back off the count (deleting the key when nothing is left to count). ARGV[1] identifies the send (its resend-at time).
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'r') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'r', '0')
if ARGV[2] == '1' then
  local n = tonumber(redis.call('HGET', KEYS[1], 'n')) or 0
  if n <= 1 then
    redis.call('DEL', KEYS[1])
  else
    redis.call('HSET', KEYS[1], 'n', n - 1)
  end
end
return 1
"#;

const DAILY: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then return 0 end
return 1
"#;

/// The stored value is the 32-byte hash followed by one byte of attempts left.
const VERIFY: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return {3, 0} end
if string.sub(v, 1, 32) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return {1, 0}
end
local left = string.byte(v, 33) - 1
if left <= 0 then
  redis.call('DEL', KEYS[1])
  return {4, 0}
end
redis.call('SETRANGE', KEYS[1], 32, string.char(left))
return {2, left}
"#;

const DISCARD: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 32) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// A call in progress is stored as 'p', the request's digest (64 hex characters) and the owner's
/// token; a finished one as 'd', the digest and the answer's bytes. Only the owner of the lock may
/// finish or abort it: a call that outlived its lock must not free or overwrite the next owner's.
/// The same key with another digest is a different request reusing the key: {3}.
const IDEMPOTENCY_BEGIN: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'p' .. ARGV[2] .. ARGV[3], 'PX', ARGV[1])
  return {0}
end
if string.sub(v, 2, 65) ~= ARGV[2] then return {3} end
if string.sub(v, 1, 1) == 'p' then return {1} end
return {2, string.sub(v, 66)}
"#;

const IDEMPOTENCY_FINISH: &str = r#"
if redis.call('GET', KEYS[1]) ~= 'p' .. ARGV[1] .. ARGV[2] then return 0 end
redis.call('SET', KEYS[1], 'd' .. ARGV[1] .. ARGV[3], 'PX', ARGV[4])
return 1
"#;

const IDEMPOTENCY_ABORT: &str = r#"
if redis.call('GET', KEYS[1]) == 'p' .. ARGV[1] .. ARGV[2] then redis.call('DEL', KEYS[1]) end
return 0
"#;

struct Scripts {
    gate: Script,
    release: Script,
    daily: Script,
    verify: Script,
    discard: Script,
    idempotency_begin: Script,
    idempotency_finish: Script,
    idempotency_abort: Script,
}

#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    scripts: Arc<Scripts>,
    message_scripts: Arc<messages::Scripts>,
    pacing_scripts: Arc<pacing::Scripts>,
    batch_scripts: Arc<batch::Scripts>,
    timeout: Duration,
}

impl RedisStore {
    /// Prepares the store without waiting for Redis: kabar starts (and reports OtpService
    /// NOT_SERVING) while Redis is down, and connects as soon as it is up.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError(e.to_string()))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError(e.to_string()))?;
        Ok(RedisStore {
            connection,
            scripts: Arc::new(Scripts {
                gate: Script::new(GATE),
                release: Script::new(RELEASE),
                daily: Script::new(DAILY),
                verify: Script::new(VERIFY),
                discard: Script::new(DISCARD),
                idempotency_begin: Script::new(IDEMPOTENCY_BEGIN),
                idempotency_finish: Script::new(IDEMPOTENCY_FINISH),
                idempotency_abort: Script::new(IDEMPOTENCY_ABORT),
            }),
            message_scripts: Arc::new(messages::Scripts::new()),
            pacing_scripts: Arc::new(pacing::Scripts::new()),
            batch_scripts: Arc::new(batch::Scripts::new()),
            timeout,
        })
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError(format!("redis: {e}"))),
            Err(_) => Err(StoreError(format!(
                "redis did not answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    pub async fn gate(
        &self,
        key: &str,
        now_ms: u64,
        resend: Duration,
        max: u32,
        window: Duration,
    ) -> Result<Gate, StoreError> {
        let mut con = self.connection.clone();
        let (status, value): (u8, u64) = self
            .bounded(
                self.scripts
                    .gate
                    .key(key)
                    .arg(now_ms)
                    .arg(resend.as_millis() as u64)
                    .arg(max)
                    .arg(window.as_millis() as u64)
                    .invoke_async(&mut con),
            )
            .await?;
        match status {
            0 => Ok(Gate::Allowed {
                resend_at_ms: value,
            }),
            1 => Ok(Gate::Cooldown(Duration::from_millis(value))),
            2 => Ok(Gate::CapReached(Duration::from_millis(value))),
            other => Err(StoreError(format!(
                "unexpected answer from the gate script: {other}"
            ))),
        }
    }

    pub async fn release(
        &self,
        key: &str,
        resend_at_ms: u64,
        uncount: bool,
    ) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let _: i64 = self
            .bounded(
                self.scripts
                    .release
                    .key(key)
                    .arg(resend_at_ms.to_string())
                    .arg(if uncount { "1" } else { "0" })
                    .invoke_async(&mut con),
            )
            .await?;
        Ok(())
    }

    pub async fn count_daily(
        &self,
        key: &str,
        limit: u32,
        expire_at_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut con = self.connection.clone();
        let allowed: i64 = self
            .bounded(
                self.scripts
                    .daily
                    .key(key)
                    .arg(limit)
                    .arg(expire_at_ms)
                    .invoke_async(&mut con),
            )
            .await?;
        Ok(allowed == 1)
    }

    pub async fn put_code(
        &self,
        key: &str,
        hash: &CodeHash,
        attempts: u32,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut value = [0u8; HASH_LEN + 1];
        value[..HASH_LEN].copy_from_slice(hash);
        value[HASH_LEN] = attempts.min(255) as u8;
        let mut con = self.connection.clone();
        let options = redis::SetOptions::default()
            .with_expiration(redis::SetExpiry::PX(ttl.as_millis() as u64));
        self.bounded(con.set_options::<_, _, ()>(key, &value[..], options))
            .await
    }

    pub async fn discard_code(&self, key: &str, hash: &CodeHash) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let _: i64 = self
            .bounded(
                self.scripts
                    .discard
                    .key(key)
                    .arg(&hash[..])
                    .invoke_async(&mut con),
            )
            .await?;
        Ok(())
    }

    pub async fn verify(&self, key: &str, hash: &CodeHash) -> Result<Verdict, StoreError> {
        let mut con = self.connection.clone();
        let (status, left): (u8, u32) = self
            .bounded(
                self.scripts
                    .verify
                    .key(key)
                    .arg(&hash[..])
                    .invoke_async(&mut con),
            )
            .await?;
        match status {
            1 => Ok(Verdict::Verified),
            2 => Ok(Verdict::Invalid {
                attempts_left: left,
            }),
            3 => Ok(Verdict::Expired),
            4 => Ok(Verdict::TooManyAttempts),
            other => Err(StoreError(format!(
                "unexpected answer from the verify script: {other}"
            ))),
        }
    }

    pub async fn idempotency_begin(
        &self,
        key: &str,
        digest: &str,
        token: &str,
        lock: Duration,
    ) -> Result<Idempotency, StoreError> {
        let mut con = self.connection.clone();
        let answer: Vec<redis::Value> = self
            .bounded(
                self.scripts
                    .idempotency_begin
                    .key(key)
                    .arg(lock.as_millis() as u64)
                    .arg(digest)
                    .arg(token)
                    .invoke_async(&mut con),
            )
            .await?;
        match answer.as_slice() {
            [redis::Value::Int(0)] => Ok(Idempotency::Started),
            [redis::Value::Int(1)] => Ok(Idempotency::InFlight),
            [redis::Value::Int(2), redis::Value::BulkString(bytes)] => {
                Ok(Idempotency::Done(bytes.clone()))
            }
            [redis::Value::Int(3)] => Ok(Idempotency::Reused),
            other => Err(StoreError(format!(
                "unexpected answer from the idempotency script: {other:?}"
            ))),
        }
    }

    pub async fn idempotency_finish(
        &self,
        key: &str,
        digest: &str,
        token: &str,
        answer: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let _: i64 = self
            .bounded(
                self.scripts
                    .idempotency_finish
                    .key(key)
                    .arg(digest)
                    .arg(token)
                    .arg(answer)
                    .arg(keep.as_millis() as u64)
                    .invoke_async(&mut con),
            )
            .await?;
        Ok(())
    }

    pub async fn idempotency_abort(
        &self,
        key: &str,
        digest: &str,
        token: &str,
    ) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let _: i64 = self
            .bounded(
                self.scripts
                    .idempotency_abort
                    .key(key)
                    .arg(digest)
                    .arg(token)
                    .invoke_async(&mut con),
            )
            .await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        self.bounded(redis::cmd("PING").query_async::<()>(&mut con))
            .await
    }
}
