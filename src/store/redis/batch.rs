//! Batch runs in Redis, shared by every replica. Each batch is four keys in one Cluster slot
//! (`kabar:batch:{id}...`):
//!
//! - the batch (a hash): state `s`, counts `t q a f u d r`, created `c`, closed `l`, pause reason
//!   `p`;
//! - its items (a hash, reference -> `state \n message id \n error JSON \n item JSON`);
//! - the submission order (a list of references, for ListBatchItems);
//! - the work queue (a stream of references with the consumer group `w`): an entry is handed to
//!   one replica at a time, stays pending with it until settled, and is taken over with
//!   `XAUTOCLAIM` when that replica dies. Settled entries are deleted, so the stream holds only
//!   the work left.
//!
//! Plus one set of the batches with work (`kabar:batches`), touched outside the scripts.
//! Every change is one script applying the tables of `domain::batch::rules` (`PRELUDE`).

use std::time::Duration;

use redis::{Script, Value};

use super::RedisStore;
use crate::{
    domain::{
        batch::{
            BatchInfo, Claim, Claimed, Command, Item, Mark, NewItem, Outcome, Submitted,
            rules::{BatchState, Counts, ItemState},
            taken_over,
        },
        ports::StoreError,
        status::MetaError,
    },
    store::{BATCHES_KEY, batch_keys},
};

/// The rules shared by every script: which way an item may move (`may_move`), what each state
/// counts toward (`C`), when a batch is done (`settle`), and the item encoding.
const PRELUDE: &str = r#"
local FIELDS = {'q', 'a', 'f', 'u', 'd', 'r'}
local C = {{q = 1}, {q = 1}, {u = 1}, {a = 1}, {a = 1, d = 1}, {a = 1, d = 1, r = 1}, {f = 1}}
local function may_move(from, to)
  if from == 7 then return false end
  if to == 7 then return from <= 4 end
  if to == 1 then return false end
  return to > from
end
local function move(meta, from, to)
  for _, k in ipairs(FIELDS) do
    local d = (C[to][k] or 0) - (C[from][k] or 0)
    if d ~= 0 then redis.call('HINCRBY', meta, k, d) end
  end
end
local function split(v)
  local s, m, e, d = string.match(v, '^(%d)\n([^\n]*)\n([^\n]*)\n(.*)$')
  return tonumber(s), m, e, d
end
local function join(s, m, e, d) return s .. '\n' .. m .. '\n' .. e .. '\n' .. d end
local function settle(meta)
  local v = redis.call('HMGET', meta, 's', 'l', 'q')
  local s = tonumber(v[1])
  if v[2] == '1' and tonumber(v[3]) == 0 and (s == 1 or s == 2) then
    redis.call('HSET', meta, 's', 3)
    return 3
  end
  return s
end
local function keep(ms)
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ms) end
end
local function owned(consumer, id)
  return #redis.call('XPENDING', KEYS[4], 'w', id, id, 1, consumer) > 0
end
local function held_for(consumer, id)
  local p = redis.call('XPENDING', KEYS[4], 'w', id, id, 1, consumer)
  if #p == 0 then return nil end
  return tonumber(p[1][3])
end
local function done_with(id)
  redis.call('XACK', KEYS[4], 'w', id)
  redis.call('XDEL', KEYS[4], id)
end
local function info()
  return redis.call('HMGET', KEYS[1], 's', 't', 'q', 'a', 'f', 'u', 'd', 'r', 'c', 'l', 'p')
end
"#;

/// KEYS: batch, items, order, queue. ARGV: now_ms, last (0/1), retention_ms, then reference and
/// item JSON per item. Returns {0, info} when the batch takes no new items (nothing changed),
/// {added, info} otherwise.
const SUBMIT: &str = r#"
local exists = redis.call('EXISTS', KEYS[1]) == 1
local s, closed = 1, '0'
if exists then
  local v = redis.call('HMGET', KEYS[1], 's', 'l')
  s, closed = tonumber(v[1]), v[2]
end
local new = {}
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then new[#new + 1] = i end
end
if #new > 0 and (closed == '1' or s == 3 or s == 4) then return {-1, info()} end
if not exists then
  redis.call('HSET', KEYS[1], 's', 1, 't', 0, 'q', 0, 'a', 0, 'f', 0, 'u', 0, 'd', 0, 'r', 0,
    'c', ARGV[1], 'l', 0, 'p', '')
  pcall(redis.call, 'XGROUP', 'CREATE', KEYS[4], 'w', '0', 'MKSTREAM')
end
for _, i in ipairs(new) do
  redis.call('HSET', KEYS[2], ARGV[i], '1\n\n\n' .. ARGV[i + 1])
  redis.call('RPUSH', KEYS[3], ARGV[i])
  redis.call('XADD', KEYS[4], '*', 'r', ARGV[i])
end
redis.call('HINCRBY', KEYS[1], 't', #new)
redis.call('HINCRBY', KEYS[1], 'q', #new)
if ARGV[2] == '1' and s ~= 3 and s ~= 4 then redis.call('HSET', KEYS[1], 'l', 1) end
settle(KEYS[1])
keep(ARGV[3])
return {#new, info()}
"#;

/// KEYS: batch, items, order, queue. ARGV: consumer, max, stale_ms, the error of an item taken
/// over while being sent, retention_ms. Returns {state (0: no batch), then id, reference, item per
/// item}. A batch being worked is kept for the retention from now.
const CLAIM: &str = r#"
local s = tonumber(redis.call('HGET', KEYS[1], 's'))
if not s then return {0} end
if s ~= 1 and s ~= 2 then return {s} end
keep(ARGV[5])
local out = {0}
local n, max = 0, tonumber(ARGV[2])
local function take(entry)
  local id, ref = entry[1], entry[2] and entry[2][2]
  local v = ref and redis.call('HGET', KEYS[2], ref)
  if not v then
    done_with(id)
    return
  end
  local st, m, e, d = split(v)
  if st == 2 then
    -- Its worker died while sending it: Meta may have it.
    move(KEYS[1], 2, 3)
    redis.call('HSET', KEYS[2], ref, join(3, m, ARGV[4], d))
    done_with(id)
  elseif st == 1 then
    n = n + 1
    out[#out + 1] = id
    out[#out + 1] = ref
    out[#out + 1] = v
  else
    done_with(id)
  end
end
local stale = redis.call('XAUTOCLAIM', KEYS[4], 'w', ARGV[1], ARGV[3], '0-0', 'COUNT', max)
for _, entry in ipairs(stale[2]) do take(entry) end
if n < max then
  local fresh = redis.call('XREADGROUP', 'GROUP', 'w', ARGV[1], 'COUNT', max - n, 'STREAMS',
    KEYS[4], '>')
  if fresh then
    for _, entry in ipairs(fresh[1][2]) do take(entry) end
  end
end
if n > 0 and s == 1 then
  redis.call('HSET', KEYS[1], 's', 2)
end
out[1] = settle(KEYS[1])
return out
"#;

/// KEYS: batch, items, order, queue. ARGV: consumer, id, reference, within_ms. Returns 100
/// (marked), 0 (not held, or held for `within` already), or the batch's state when it is not
/// workable.
const MARK: &str = r#"
local s = tonumber(redis.call('HGET', KEYS[1], 's'))
if not s then return 0 end
if s ~= 1 and s ~= 2 then return s end
local idle = held_for(ARGV[1], ARGV[2])
if not idle or idle >= tonumber(ARGV[4]) then return 0 end
local v = redis.call('HGET', KEYS[2], ARGV[3])
if not v then return 0 end
local st, m, e, d = split(v)
if st ~= 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], join(2, m, e, d))
return 100
"#;

/// KEYS: batch, items, order, queue. ARGV: consumer, id, reference, state, message id, error
/// JSON, retention_ms. Returns the batch's state, or 0 when the item was not held (and was not
/// an unknown item turning accepted).
const SETTLE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local held = owned(ARGV[1], ARGV[2])
local v = redis.call('HGET', KEYS[2], ARGV[3])
if not v then
  if held then done_with(ARGV[2]) end
  return 0
end
local st, m, e, d = split(v)
local to = tonumber(ARGV[4])
if not held and not (to == 4 and st == 3) then return 0 end
if held then done_with(ARGV[2]) end
if may_move(st, to) then
  move(KEYS[1], st, to)
  if m == '' then m = ARGV[5] end
  if e == '' then e = ARGV[6] end
  redis.call('HSET', KEYS[2], ARGV[3], join(to, m, e, d))
end
local s = settle(KEYS[1])
if s == 3 or s == 4 then keep(ARGV[7]) end
return s
"#;

/// KEYS: batch, items, order, queue. ARGV: consumer, id, reference. Back to the end of the queue
/// (not for a cancelled or finished batch).
const RELEASE: &str = r#"
if not owned(ARGV[1], ARGV[2]) then return 0 end
done_with(ARGV[2])
local v = redis.call('HGET', KEYS[2], ARGV[3])
if not v then return 0 end
local st, m, e, d = split(v)
if st == 2 then
  st = 1
  redis.call('HSET', KEYS[2], ARGV[3], join(1, m, e, d))
end
local s = tonumber(redis.call('HGET', KEYS[1], 's'))
if st == 1 and s and s ~= 3 and s ~= 4 then
  redis.call('XADD', KEYS[4], '*', 'r', ARGV[3])
end
return 1
"#;

/// KEYS: batch, items, order, queue. ARGV: cancel | pause | resume, reason, retention_ms.
/// Returns {1, info} (nothing changed), {2, info} (the state changed), or {0} for no batch. The
/// batch is kept for the retention from now.
const COMMAND: &str = r#"
local s = tonumber(redis.call('HGET', KEYS[1], 's'))
if not s then return {0} end
keep(ARGV[3])
local changed = 1
if ARGV[1] == 'cancel' and s ~= 3 and s ~= 4 then
  redis.call('HSET', KEYS[1], 's', 4)
  redis.call('XTRIM', KEYS[4], 'MAXLEN', 0)
  changed = 2
elseif ARGV[1] == 'pause' and (s == 1 or s == 2) then
  redis.call('HSET', KEYS[1], 's', 5, 'p', ARGV[2])
  changed = 2
elseif ARGV[1] == 'resume' and s == 5 then
  redis.call('HSET', KEYS[1], 's', 2, 'p', '')
  settle(KEYS[1])
  changed = 2
end
return {changed, info()}
"#;

/// KEYS: batch, items, order, queue. ARGV: reference, message id, state, error JSON,
/// retention_ms. A webhook status of an item's message.
const ITEM_STATUS: &str = r#"
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 0 end
local st, m, e, d = split(v)
local to = tonumber(ARGV[3])
if not may_move(st, to) then return 0 end
move(KEYS[1], st, to)
if m == '' then m = ARGV[2] end
if e == '' then e = ARGV[4] end
redis.call('HSET', KEYS[2], ARGV[1], join(to, m, e, d))
local s = settle(KEYS[1])
if s == 3 or s == 4 then keep(ARGV[5]) end
return 1
"#;

pub(super) struct Scripts {
    submit: Script,
    claim: Script,
    mark: Script,
    settle: Script,
    release: Script,
    command: Script,
    item_status: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let with = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            submit: with(SUBMIT),
            claim: with(CLAIM),
            mark: with(MARK),
            settle: with(SETTLE),
            release: with(RELEASE),
            command: with(COMMAND),
            item_status: with(ITEM_STATUS),
        }
    }
}

fn bad(what: &str, detail: impl std::fmt::Debug) -> StoreError {
    StoreError(format!(
        "unexpected answer from the batch {what} script: {detail:?}"
    ))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// A batch from the `info()` fields (s t q a f u d r c l p).
fn batch_info(batch_id: &str, v: &Value) -> Result<Option<BatchInfo>, StoreError> {
    let Value::Array(fields) = v else {
        return Err(bad("info", v));
    };
    let [s, t, q, a, f, u, d, r, c, l, p] = fields.as_slice() else {
        return Err(bad("info", v));
    };
    if matches!(s, Value::Nil) {
        return Ok(None);
    }
    let n = |v: &Value| int(v).and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
    let state = int(s)
        .and_then(|n| u8::try_from(n).ok())
        .and_then(BatchState::from_u8)
        .ok_or_else(|| bad("info", s))?;
    Ok(Some(BatchInfo {
        batch_id: batch_id.to_owned(),
        state,
        pause_reason: text(p).unwrap_or_default(),
        counts: Counts {
            total: n(t),
            queued: n(q),
            accepted: n(a),
            failed: n(f),
            unknown: n(u),
            delivered: n(d),
            read: n(r),
        },
        closed: n(l) == 1,
        created_at_ms: n(c),
    }))
}

fn error_json(e: &MetaError) -> String {
    serde_json::to_string(e).expect("an error of strings and a number always serialises")
}

/// A message id safe in the item encoding (one line).
fn one_line(id: &str) -> String {
    id.chars().filter(|c| !c.is_control()).collect()
}

/// An item from its stored form.
fn item_from(stored: &str) -> Result<Item, StoreError> {
    let mut parts = stored.splitn(4, '\n');
    let (Some(s), Some(m), Some(e), Some(d)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(StoreError("a stored batch item is unreadable".into()));
    };
    let state = s
        .parse::<u8>()
        .ok()
        .and_then(ItemState::from_u8)
        .ok_or_else(|| StoreError("a stored batch item has no state".into()))?;
    let data: NewItem = serde_json::from_str(d)
        .map_err(|e| StoreError(format!("a stored batch item is unreadable: {e}")))?;
    Ok(Item {
        data,
        state,
        message_id: m.to_owned(),
        error: if e.is_empty() {
            None
        } else {
            serde_json::from_str(e).ok()
        },
    })
}

impl RedisStore {
    fn batch_script<'a>(&self, script: &'a Script, batch_id: &str) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in batch_keys(batch_id) {
            invocation.key(key);
        }
        invocation
    }

    pub async fn batch_submit(
        &self,
        batch_id: &str,
        items: &[NewItem],
        last: bool,
        now_ms: u64,
        retention: Duration,
    ) -> Result<Submitted, StoreError> {
        let mut con = self.connection.clone();
        // On the list of batches with work first: a batch is never stored without being there.
        self.bounded(
            redis::cmd("SADD")
                .arg(BATCHES_KEY)
                .arg(batch_id)
                .query_async::<i64>(&mut con),
        )
        .await?;
        let mut invocation = self.batch_script(&self.batch_scripts.submit, batch_id);
        invocation
            .arg(now_ms)
            .arg(u8::from(last))
            .arg(retention.as_millis() as u64);
        for item in items {
            let json = serde_json::to_string(item).expect("an item of strings always serialises");
            invocation.arg(&item.reference).arg(json);
        }
        let answer: Vec<Value> = self.bounded(invocation.invoke_async(&mut con)).await?;
        let [added, info] = answer.as_slice() else {
            return Err(bad("submit", answer));
        };
        let batch = batch_info(batch_id, info)?.ok_or_else(|| bad("submit", info))?;
        match int(added) {
            Some(-1) => Ok(Submitted::Closed(batch)),
            Some(n) if n >= 0 => Ok(Submitted::Added {
                batch,
                added: n as usize,
            }),
            _ => Err(bad("submit", added)),
        }
    }

    pub async fn batch_get(&self, batch_id: &str) -> Result<Option<BatchInfo>, StoreError> {
        let mut con = self.connection.clone();
        let [meta, ..] = batch_keys(batch_id);
        let fields: Value = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(meta)
                    .arg(&["s", "t", "q", "a", "f", "u", "d", "r", "c", "l", "p"])
                    .query_async(&mut con),
            )
            .await?;
        batch_info(batch_id, &fields)
    }

    pub async fn batch_active(&self) -> Result<Vec<String>, StoreError> {
        let mut con = self.connection.clone();
        let mut ids: Vec<String> = self
            .bounded(
                redis::cmd("SMEMBERS")
                    .arg(BATCHES_KEY)
                    .query_async(&mut con),
            )
            .await?;
        ids.sort();
        Ok(ids)
    }

    pub async fn batch_forget(&self, batch_id: &str) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        self.bounded(
            redis::cmd("SREM")
                .arg(BATCHES_KEY)
                .arg(batch_id)
                .query_async::<i64>(&mut con),
        )
        .await?;
        Ok(())
    }

    pub async fn batch_claim(
        &self,
        batch_id: &str,
        consumer: &str,
        max: usize,
        stale: Duration,
        retention: Duration,
    ) -> Result<Claimed, StoreError> {
        let mut con = self.connection.clone();
        let mut invocation = self.batch_script(&self.batch_scripts.claim, batch_id);
        invocation
            .arg(consumer)
            .arg(max)
            .arg(stale.as_millis() as u64)
            .arg(error_json(&taken_over()))
            .arg(retention.as_millis() as u64);
        let answer: Vec<Value> = self.bounded(invocation.invoke_async(&mut con)).await?;
        let Some((state, rest)) = answer.split_first() else {
            return Err(bad("claim", answer));
        };
        let state = int(state).ok_or_else(|| bad("claim", state))?;
        let state = u8::try_from(state).ok().and_then(BatchState::from_u8);
        let mut items = Vec::with_capacity(rest.len() / 3);
        for entry in rest.chunks(3) {
            let [id, _, stored] = entry else {
                return Err(bad("claim", entry));
            };
            let (Some(ticket), Some(stored)) = (text(id), text(stored)) else {
                return Err(bad("claim", entry));
            };
            items.push(Claim {
                ticket,
                item: item_from(&stored)?,
            });
        }
        Ok(Claimed { state, items })
    }

    pub async fn batch_mark(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
        within: Duration,
    ) -> Result<Mark, StoreError> {
        let mut con = self.connection.clone();
        let mut invocation = self.batch_script(&self.batch_scripts.mark, batch_id);
        invocation
            .arg(consumer)
            .arg(&claim.ticket)
            .arg(&claim.item.data.reference)
            .arg(within.as_millis() as u64);
        let answer: i64 = self.bounded(invocation.invoke_async(&mut con)).await?;
        Ok(match answer {
            100 => Mark::Go,
            n => match u8::try_from(n).ok().and_then(BatchState::from_u8) {
                Some(state) => Mark::Stopped(state),
                None => Mark::Lost,
            },
        })
    }

    pub async fn batch_settle(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
        outcome: &Outcome,
        retention: Duration,
    ) -> Result<Option<BatchState>, StoreError> {
        let mut con = self.connection.clone();
        let mut invocation = self.batch_script(&self.batch_scripts.settle, batch_id);
        invocation
            .arg(consumer)
            .arg(&claim.ticket)
            .arg(&claim.item.data.reference)
            .arg(outcome.state.as_u8())
            .arg(one_line(&outcome.message_id))
            .arg(outcome.error.as_ref().map(error_json).unwrap_or_default())
            .arg(retention.as_millis() as u64);
        let answer: i64 = self.bounded(invocation.invoke_async(&mut con)).await?;
        Ok(u8::try_from(answer).ok().and_then(BatchState::from_u8))
    }

    pub async fn batch_release(
        &self,
        batch_id: &str,
        claim: &Claim,
        consumer: &str,
    ) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let mut invocation = self.batch_script(&self.batch_scripts.release, batch_id);
        invocation
            .arg(consumer)
            .arg(&claim.ticket)
            .arg(&claim.item.data.reference);
        let _: i64 = self.bounded(invocation.invoke_async(&mut con)).await?;
        Ok(())
    }

    pub async fn batch_command(
        &self,
        batch_id: &str,
        command: &Command,
        retention: Duration,
    ) -> Result<Option<(BatchInfo, bool)>, StoreError> {
        let mut con = self.connection.clone();
        let (name, reason) = match command {
            Command::Cancel => ("cancel", ""),
            Command::Pause(reason) => ("pause", reason.as_str()),
            Command::Resume => ("resume", ""),
        };
        let mut invocation = self.batch_script(&self.batch_scripts.command, batch_id);
        invocation
            .arg(name)
            .arg(reason)
            .arg(retention.as_millis() as u64);
        let answer: Vec<Value> = self.bounded(invocation.invoke_async(&mut con)).await?;
        match answer.as_slice() {
            [Value::Int(0)] => Ok(None),
            [changed, info] => {
                Ok(batch_info(batch_id, info)?.map(|b| (b, int(changed) == Some(2))))
            }
            other => Err(bad("command", other)),
        }
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
        let mut con = self.connection.clone();
        let mut invocation = self.batch_script(&self.batch_scripts.item_status, batch_id);
        invocation
            .arg(reference)
            .arg(one_line(message_id))
            .arg(to.as_u8())
            .arg(error.map(error_json).unwrap_or_default())
            .arg(retention.as_millis() as u64);
        let _: i64 = self.bounded(invocation.invoke_async(&mut con)).await?;
        Ok(())
    }

    pub async fn batch_items(
        &self,
        batch_id: &str,
        start: u64,
        count: usize,
    ) -> Result<Option<(Vec<Item>, u64)>, StoreError> {
        let mut con = self.connection.clone();
        let [meta, items, order, _] = batch_keys(batch_id);
        // Positions past what a list can hold are past the end (LRANGE would count a wrapped
        // negative start from the end).
        let start = isize::try_from(start).unwrap_or(isize::MAX);
        let count = isize::try_from(count).unwrap_or(isize::MAX);
        let (exists, total, references): (bool, u64, Vec<String>) = self
            .bounded(
                redis::pipe()
                    .exists(&meta)
                    .llen(&order)
                    .lrange(&order, start, start.saturating_add(count) - 1)
                    .query_async(&mut con),
            )
            .await?;
        if !exists {
            return Ok(None);
        }
        if references.is_empty() || count == 0 {
            return Ok(Some((Vec::new(), total)));
        }
        let stored: Vec<Option<String>> = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(&items)
                    .arg(&references)
                    .query_async(&mut con),
            )
            .await?;
        let items = stored
            .into_iter()
            .flatten()
            .map(|s| item_from(&s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((items, total)))
    }
}
