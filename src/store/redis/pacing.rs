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

/// Admissions in order, on one reading of the clock. KEYS: the schedule (the next free slot),
/// the backoff ("factor:since", expiring when the backoff ends), daily recipients (zset by last
/// send), customers who wrote (zset by when), then each ask's recipient pair key. ARGV:
/// interval, pair interval (0: off), daily limit (0: unlimited, nothing counted), day, then per
/// ask: phone, horizon, budget. Returns three numbers per ask: {0, wait, daily used (0: not
/// counted now)} admitted | {1, wait, 0} queue | {2, wait, 0} pair wait | {3, limit (1 rate,
/// 2 pair, 3 daily), retry}. With the pair interval off and no daily limit, a batch is three
/// commands: TIME, MGET, SET.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function f(x) return string.format('%.0f', x) end
local interval = tonumber(ARGV[1])
local pair = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local day = tonumber(ARGV[4])
local since = now - day
local v = redis.call('MGET', KEYS[1], KEYS[2])
local factor = 1
if v[2] then factor = tonumber(string.match(v[2], '^(%d+)')) or 1 end
local tat = tonumber(v[1]) or 0
local moved = false
if limit > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', f(since)) end
local out = {}
local function answer(a, b, c)
  out[#out + 1] = a
  out[#out + 1] = f(b)
  out[#out + 1] = c
end
for i = 1, (#ARGV - 4) / 3 do
  local phone = ARGV[3 * i + 2]
  local horizon = tonumber(ARGV[3 * i + 3])
  local budget = tonumber(ARGV[3 * i + 4])
  local pair_key = KEYS[4 + i]
  local counts = false
  local new = false
  local used = 0
  local refused = false
  if limit > 0 then
    local wrote = redis.call('ZSCORE', KEYS[4], phone)
    counts = not (wrote and tonumber(wrote) > since)
    if counts and not redis.call('ZSCORE', KEYS[3], phone) then
      used = redis.call('ZCARD', KEYS[3])
      if used >= limit then
        local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
        answer(3, 3, f(math.max(tonumber(oldest[2]) + day - now, 0)))
        refused = true
      end
      new = true
      used = used + 1
    end
  end
  local pair_next = 0
  if not refused and pair > 0 then
    pair_next = tonumber(redis.call('GET', pair_key) or '0')
    if pair_next > now then
      if pair_next - now > budget then answer(3, 2, f(pair_next - now))
      else answer(2, pair_next - now, 0) end
      refused = true
    end
  end
  if not refused then
    local slot = math.max(tat, now)
    local wait = slot - now
    if wait > budget then answer(3, 1, f(wait))
    elseif wait > horizon then answer(1, wait - horizon, 0)
    else
      tat = slot + interval * factor
      moved = true
      if pair > 0 then
        redis.call('SET', pair_key, f(slot + pair), 'PX', f(math.ceil((slot + pair - now) / 1000) + 1))
      end
      if counts then
        redis.call('ZADD', KEYS[3], f(now), phone)
        if new then redis.call('PEXPIRE', KEYS[3], f(day / 1000 + 60000)) end
      end
      answer(0, wait, used)
    end
  end
end
if moved then redis.call('SET', KEYS[1], f(tat), 'PX', 3600000) end
return out
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
    pub async fn pace_admit(
        &self,
        number: &str,
        asks: &[Ask<'_>],
    ) -> Result<Vec<Answer>, StoreError> {
        let Some(first) = asks.first() else {
            return Ok(Vec::new());
        };
        let mut con = self.connection.clone();
        let mut invocation = self.pacing_scripts.admit.prepare_invoke();
        invocation
            .key(pace_rate_key(number))
            .key(pace_backoff_key(number))
            .key(pace_daily_key(number))
            .key(pace_inbound_key(number))
            .arg(first.interval_us)
            .arg(first.pair_us)
            .arg(first.daily_limit)
            .arg(DAY_US);
        for ask in asks {
            invocation
                .key(pace_pair_key(number, ask.phone))
                .arg(ask.phone)
                .arg(ask.horizon_us)
                .arg(ask.budget_us);
        }
        let flat: Vec<u64> = self.bounded(invocation.invoke_async(&mut con)).await?;
        if flat.len() != asks.len() * 3 {
            return Err(unexpected("pacing", &flat));
        }
        flat.chunks(3)
            .map(|answer| match *answer {
                [0, wait_us, daily_used] => Ok(Answer::Admitted {
                    wait_us,
                    daily_used,
                }),
                [1, wait_us, _] => Ok(Answer::Queue { wait_us }),
                [2, wait_us, _] => Ok(Answer::PairWait { wait_us }),
                [3, limit @ 1..=3, retry_us] => Ok(Answer::Refused {
                    limit: [Limit::Rate, Limit::Pair, Limit::Daily][limit as usize - 1],
                    retry_us,
                }),
                _ => Err(unexpected("pacing", answer)),
            })
            .collect()
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
