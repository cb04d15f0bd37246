//! The pacing schedule in Redis: the rules of `domain::pacing::rules`, each admission one Lua
//! script on Redis's own clock (`TIME`), so that replicas whose clocks disagree still share one
//! schedule. Times are microseconds since the Unix epoch (exact in Lua's doubles).

use std::time::Duration;

use redis::Script;

use super::RedisStore;
use crate::{
    domain::{
        pacing::rules::{
            Answer, Ask, BACKOFF_EPISODE_US, BACKOFF_PAUSE_US, BACKOFF_WINDOW_US, DAY_US, Limit,
            MAX_BACKOFF,
        },
        ports::StoreError,
    },
    store::{pace_backoff_key, pace_daily_key, pace_inbound_key, pace_pair_key, pace_rate_key},
};

/// KEYS: the schedule (the next free slot), the backoff ("factor:since", expiring when the
/// backoff ends), the recipient's pair key, daily recipients (zset by last send), customers who
/// wrote (zset by when). ARGV: phone, interval, horizon, budget, pair interval (0: off), daily
/// limit (0: unlimited, nothing counted), day. Returns {0, wait, daily used (0: not counted
/// now)} admitted | {1, wait} queue | {2, wait} pair wait | {3, limit (1 rate, 2 pair, 3 daily),
/// retry}. With the pair interval off and no daily limit it is three commands: TIME, MGET, SET.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local phone = ARGV[1]
local function f(x) return string.format('%.0f', x) end
local limit = tonumber(ARGV[6])
local counts = false
local used = 0
if limit > 0 then
  local day = tonumber(ARGV[7])
  local since = now - day
  local wrote = redis.call('ZSCORE', KEYS[5], phone)
  counts = not (wrote and tonumber(wrote) > since)
  if counts then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', f(since))
    if not redis.call('ZSCORE', KEYS[4], phone) then
      used = redis.call('ZCARD', KEYS[4])
      if used >= limit then
        local oldest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
        return {3, 3, f(math.max(tonumber(oldest[2]) + day - now, 0))}
      end
      used = used + 1
    end
  end
end
local budget = tonumber(ARGV[4])
local pair = tonumber(ARGV[5])
if pair > 0 then
  local pair_next = tonumber(redis.call('GET', KEYS[3]) or '0')
  if pair_next > now then
    if pair_next - now > budget then return {3, 2, f(pair_next - now)} end
    return {2, f(pair_next - now)}
  end
end
local v = redis.call('MGET', KEYS[1], KEYS[2])
local factor = 1
if v[2] then factor = tonumber(string.match(v[2], '^(%d+)')) or 1 end
local slot = math.max(tonumber(v[1]) or 0, now)
local wait = slot - now
if wait > budget then return {3, 1, f(wait)} end
local horizon = tonumber(ARGV[3])
if wait > horizon then return {1, f(wait - horizon)} end
redis.call('SET', KEYS[1], f(slot + tonumber(ARGV[2]) * factor), 'PX', 3600000)
if pair > 0 then
  redis.call('SET', KEYS[3], f(slot + pair), 'PX', f(math.ceil((slot + pair - now) / 1000) + 1))
end
if counts then
  if redis.call('ZADD', KEYS[4], f(now), phone) == 1 then
    redis.call('PEXPIRE', KEYS[4], f(tonumber(ARGV[7]) / 1000 + 60000))
  end
end
return {0, f(wait), used}
"#;

/// KEYS: the schedule, the backoff. ARGV: backoff window, pause, largest factor, episode.
/// Returns the factor in force.
const SLOW_DOWN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function f(x) return string.format('%.0f', x) end
local factor, since = 2, now
local v = redis.call('GET', KEYS[2])
if v then
  local f0, s0 = string.match(v, '^(%d+):(%d+)$')
  f0, s0 = tonumber(f0) or 1, tonumber(s0) or 0
  if now < s0 + tonumber(ARGV[4]) then
    factor, since = f0, s0
  else
    factor = math.min(math.max(f0 * 2, 2), tonumber(ARGV[3]))
  end
end
redis.call('SET', KEYS[2], factor .. ':' .. f(since), 'PX', f(tonumber(ARGV[1]) / 1000))
local slot = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now + tonumber(ARGV[2]))
redis.call('SET', KEYS[1], f(slot), 'PX', 3600000)
return factor
"#;

/// KEYS: the recipient's pair key. ARGV: hold.
const BLOCK_PAIR: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_ = math.max(now + tonumber(ARGV[1]), tonumber(redis.call('GET', KEYS[1]) or '0'))
redis.call('SET', KEYS[1], string.format('%.0f', until_), 'PX',
  string.format('%.0f', math.ceil((until_ - now) / 1000) + 1))
return 1
"#;

/// KEYS: customers who wrote. ARGV: day, then phone, when (microseconds) pairs. Keeps each
/// customer's latest message; drops those older than a day.
const CUSTOMERS_WROTE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local day = tonumber(ARGV[1])
local function f(x) return string.format('%.0f', x) end
for i = 2, #ARGV, 2 do
  local at = math.min(tonumber(ARGV[i + 1]), now)
  if at + day > now then redis.call('ZADD', KEYS[1], 'GT', f(at), ARGV[i]) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', f(now - day))
redis.call('PEXPIRE', KEYS[1], f(day / 1000 + 60000))
return 1
"#;

/// KEYS: daily recipients. ARGV: day.
const DAILY_USED: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - tonumber(ARGV[1])))
return redis.call('ZCARD', KEYS[1])
"#;

pub(super) struct Scripts {
    admit: Script,
    slow_down: Script,
    block_pair: Script,
    customers_wrote: Script,
    daily_used: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            admit: Script::new(ADMIT),
            slow_down: Script::new(SLOW_DOWN),
            block_pair: Script::new(BLOCK_PAIR),
            customers_wrote: Script::new(CUSTOMERS_WROTE),
            daily_used: Script::new(DAILY_USED),
        }
    }
}

fn unexpected(script: &str, answer: &[u64]) -> StoreError {
    StoreError(format!(
        "unexpected answer from the {script} script: {answer:?}"
    ))
}

impl RedisStore {
    pub async fn pace_admit(&self, number: &str, ask: &Ask<'_>) -> Result<Answer, StoreError> {
        let mut con = self.connection.clone();
        let answer: Vec<u64> = self
            .bounded(
                self.pacing_scripts
                    .admit
                    .key(pace_rate_key(number))
                    .key(pace_backoff_key(number))
                    .key(pace_pair_key(number, ask.phone))
                    .key(pace_daily_key(number))
                    .key(pace_inbound_key(number))
                    .arg(ask.phone)
                    .arg(ask.interval_us)
                    .arg(ask.horizon_us)
                    .arg(ask.budget_us)
                    .arg(ask.pair_us)
                    .arg(ask.daily_limit)
                    .arg(DAY_US)
                    .invoke_async(&mut con),
            )
            .await?;
        match answer[..] {
            [0, wait_us, daily_used] => Ok(Answer::Admitted {
                wait_us,
                daily_used,
            }),
            [1, wait_us] => Ok(Answer::Queue { wait_us }),
            [2, wait_us] => Ok(Answer::PairWait { wait_us }),
            [3, limit @ 1..=3, retry_us] => Ok(Answer::Refused {
                limit: [Limit::Rate, Limit::Pair, Limit::Daily][limit as usize - 1],
                retry_us,
            }),
            _ => Err(unexpected("pacing", &answer)),
        }
    }

    pub async fn pace_slow_down(&self, number: &str) -> Result<u64, StoreError> {
        let mut con = self.connection.clone();
        self.bounded(
            self.pacing_scripts
                .slow_down
                .key(pace_rate_key(number))
                .key(pace_backoff_key(number))
                .arg(BACKOFF_WINDOW_US)
                .arg(BACKOFF_PAUSE_US)
                .arg(MAX_BACKOFF)
                .arg(BACKOFF_EPISODE_US)
                .invoke_async(&mut con),
        )
        .await
    }

    pub async fn pace_block_pair(
        &self,
        number: &str,
        phone: &str,
        hold: Duration,
    ) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let _: i64 = self
            .bounded(
                self.pacing_scripts
                    .block_pair
                    .key(pace_pair_key(number, phone))
                    .arg(hold.as_micros() as u64)
                    .invoke_async(&mut con),
            )
            .await?;
        Ok(())
    }

    pub async fn pace_customers_wrote(
        &self,
        number: &str,
        customers: &[(String, u64)],
    ) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let mut invocation = self.pacing_scripts.customers_wrote.prepare_invoke();
        invocation.key(pace_inbound_key(number)).arg(DAY_US);
        for (phone, at_ms) in customers {
            invocation.arg(phone).arg(at_ms.saturating_mul(1000));
        }
        let _: i64 = self.bounded(invocation.invoke_async(&mut con)).await?;
        Ok(())
    }

    pub async fn pace_daily_used(&self, number: &str) -> Result<u64, StoreError> {
        let mut con = self.connection.clone();
        self.bounded(
            self.pacing_scripts
                .daily_used
                .key(pace_daily_key(number))
                .arg(DAY_US)
                .invoke_async(&mut con),
        )
        .await
    }
}
