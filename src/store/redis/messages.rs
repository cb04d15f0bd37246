//! Message records and the event feed in Redis. A record is one hash per message id; the feed is
//! one stream (`kabar:events`) trimmed to the retention with `MINID`. Creating a record and
//! applying a status each append the record to the feed in the same script, so that a change is
//! never stored without its event (a webhook retried after a failure finds the change already
//! made and appends nothing twice). The feed and the records live under different keys: on Redis
//! Cluster both would have to be placed in one slot.

use std::{collections::HashMap, time::Duration};

use redis::Script;

use super::RedisStore;
use crate::{
    domain::{
        ports::{Applied, FeedError, StoreError},
        status::{
            AccountEvent, After, Event, InboundMessage, MessageRecord, MetaError, State,
            StatusChange, StatusUpdate, StoredEvent,
        },
    },
    store::{
        EVENTS_KEY,
        feed::{Bounds, format_cursor, parse_cursor},
        now_ms, record_key, seen_key,
    },
};

/// KEYS: record, feed. ARGV: ttl_ms, minid, then the record's field/value pairs.
const PUT: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[2], '*', 'k', 'status', unpack(ARGV, 3))
return 1
"#;

/// The rules of `MessageRecord::apply`: the state only moves forward and failed is final; each
/// state enters the history (`state:ms;...`, accepted first, then in time order) once; the first error is kept;
/// pricing is taken when it changes. KEYS: record, feed. ARGV: state, at_ms, error code, reason,
/// title, details ('' without an error), pricing category, billable ('' when absent), minid.
/// Returns {0} (no record), {1} (unchanged), {2, category, state before} (changed; the record
/// appended to the feed).
const APPLY: &str = r#"
local s = redis.call('HGET', KEYS[1], 's')
if not s then return {0} end
s = tonumber(s)
local new = tonumber(ARGV[1])
local changed = false
local h = redis.call('HGET', KEYS[1], 'h') or ''
if not string.find(';' .. h, ';' .. ARGV[1] .. ':', 1, true) then
  local entries = {}
  for e in string.gmatch(h, '[^;]+') do table.insert(entries, e) end
  local at = tonumber(ARGV[2])
  local pos = #entries + 1
  for i, e in ipairs(entries) do
    if string.sub(e, 1, 2) ~= '1:' and tonumber(string.match(e, ':(%d+)$')) > at then
      pos = i
      break
    end
  end
  table.insert(entries, pos, ARGV[1] .. ':' .. ARGV[2])
  redis.call('HSET', KEYS[1], 'h', table.concat(entries, ';'))
  changed = true
end
if s ~= 5 and new > s then
  local u = tonumber(redis.call('HGET', KEYS[1], 'u')) or 0
  redis.call('HSET', KEYS[1], 's', ARGV[1], 'u', string.format('%.0f', math.max(u, tonumber(ARGV[2]))))
  changed = true
end
if new == 5 and ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[1], 'ec') == 0 then
  redis.call('HSET', KEYS[1], 'ec', ARGV[3], 'er', ARGV[4], 'et', ARGV[5], 'ed', ARGV[6])
  changed = true
end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'pc') ~= ARGV[7] then
  redis.call('HSET', KEYS[1], 'pc', ARGV[7])
  changed = true
end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'bl') ~= ARGV[8] then
  redis.call('HSET', KEYS[1], 'bl', ARGV[8])
  changed = true
end
if not changed then return {1} end
local all = redis.call('HGETALL', KEYS[1])
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[9], '*', 'k', 'status', unpack(all))
local v = redis.call('HMGET', KEYS[1], 'c', 'b', 'r')
return {2, v[1] or '', s, v[2] or '', v[3] or ''}
"#;

/// KEYS: the event's dedupe key, feed. ARGV: ttl_ms, minid, then the event's field/value pairs.
/// Appends unless the dedupe key was seen within the retention: 1 appended, 0 a repeat.
const APPEND: &str = r#"
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[2], '*', unpack(ARGV, 3))
return 1
"#;

pub(super) struct Scripts {
    put: Script,
    apply: Script,
    append: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            put: Script::new(PUT),
            apply: Script::new(APPLY),
            append: Script::new(APPEND),
        }
    }
}

fn minid(retention: Duration) -> String {
    now_ms()
        .saturating_sub(retention.as_millis() as u64)
        .to_string()
}

/// A record as hash fields (the same pairs go into its feed entries).
fn record_fields(r: &MessageRecord) -> Vec<(&'static str, String)> {
    let history = r
        .history
        .iter()
        .map(|c| format!("{}:{}", c.state.as_u8(), c.at_ms))
        .collect::<Vec<_>>()
        .join(";");
    let mut fields = vec![
        ("id", r.message_id.clone()),
        ("p", r.phone.clone()),
        ("t", r.template.clone()),
        ("r", r.reference.clone()),
        ("c", r.category.clone()),
        ("b", r.batch_id.clone()),
        ("s", r.state.as_u8().to_string()),
        ("h", history),
        ("ca", r.created_at_ms.to_string()),
        ("u", r.updated_at_ms.to_string()),
        ("pc", r.pricing_category.clone()),
        ("bl", if r.billable { "1" } else { "0" }.to_owned()),
    ];
    if let Some(e) = &r.error {
        fields.extend([
            ("ec", e.code.to_string()),
            ("er", e.reason.clone()),
            ("et", e.title.clone()),
            ("ed", e.details.clone()),
        ]);
    }
    fields
}

fn record_from(f: &HashMap<String, String>) -> Result<MessageRecord, StoreError> {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let state = f
        .get("s")
        .and_then(|s| s.parse().ok())
        .and_then(State::from_u8)
        .ok_or_else(|| StoreError("a message record without a valid state".into()))?;
    let mut history = Vec::new();
    for entry in get("h").split(';').filter(|e| !e.is_empty()) {
        let parsed = entry
            .split_once(':')
            .and_then(|(s, at)| Some((State::from_u8(s.parse().ok()?)?, at.parse().ok()?)));
        let (state, at_ms) =
            parsed.ok_or_else(|| StoreError(format!("a malformed history entry {entry:?}")))?;
        history.push(StatusChange { state, at_ms });
    }
    let error = f.get("ec").map(|code| MetaError {
        code: code.parse().unwrap_or(0),
        reason: get("er"),
        title: get("et"),
        details: get("ed"),
    });
    Ok(MessageRecord {
        message_id: get("id"),
        phone: get("p"),
        template: get("t"),
        reference: get("r"),
        category: get("c"),
        batch_id: get("b"),
        state,
        error,
        pricing_category: get("pc"),
        billable: get("bl") == "1",
        history,
        created_at_ms: num("ca"),
        updated_at_ms: num("u"),
    })
}

fn event_fields(event: &Event) -> Vec<(&'static str, String)> {
    match event {
        Event::Status(r) => {
            let mut f = vec![("k", "status".to_owned())];
            f.extend(record_fields(r));
            f
        }
        Event::Inbound(m) => vec![
            ("k", "inbound".to_owned()),
            ("id", m.message_id.clone()),
            ("p", m.phone.clone()),
            ("ty", m.kind.clone()),
            ("tx", m.text.clone()),
            ("at", m.at_ms.to_string()),
            ("cx", m.context_message_id.clone()),
        ],
        Event::Account(a) => vec![
            ("k", "account".to_owned()),
            ("kd", a.kind.clone()),
            ("sj", a.subject.clone()),
            ("v", a.value.clone()),
            ("rs", a.reason.clone()),
            ("at", a.at_ms.to_string()),
        ],
    }
}

fn event_from(f: &HashMap<String, String>) -> Result<Event, StoreError> {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let at = || f.get("at").and_then(|v| v.parse().ok()).unwrap_or(0);
    match f.get("k").map(String::as_str) {
        Some("status") => Ok(Event::Status(record_from(f)?)),
        Some("inbound") => Ok(Event::Inbound(InboundMessage {
            message_id: get("id"),
            phone: get("p"),
            kind: get("ty"),
            text: get("tx"),
            at_ms: at(),
            context_message_id: get("cx"),
        })),
        Some("account") => Ok(Event::Account(AccountEvent {
            kind: get("kd"),
            subject: get("sj"),
            value: get("v"),
            reason: get("rs"),
            at_ms: at(),
        })),
        other => Err(StoreError(format!("an event of unknown kind {other:?}"))),
    }
}

fn text(v: &redis::Value) -> Result<String, StoreError> {
    redis::from_redis_value(v.clone())
        .map_err(|e| StoreError(format!("unexpected text from the status script: {e}")))
}

fn pairs(flat: Vec<String>) -> HashMap<String, String> {
    let mut map = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(k, v);
    }
    map
}

/// The feed's bounds from an `XINFO STREAM` answer: trimmed once `entries-added` exceeds
/// `length`; the oldest held is `recorded-first-entry-id` while anything is held; the newest is
/// `last-generated-id`.
fn bounds(info: &redis::Value) -> Bounds {
    let items: Vec<redis::Value> = match info {
        redis::Value::Array(items) => items.clone(),
        redis::Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect(),
        _ => Vec::new(),
    };
    let mut fields: HashMap<String, redis::Value> = HashMap::new();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Ok(key) = redis::from_redis_value::<String>(k) {
            fields.insert(key, v);
        }
    }
    let number = |name: &str| {
        fields
            .get(name)
            .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
            .unwrap_or(0)
    };
    let id = |name: &str| {
        fields
            .get(name)
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .and_then(|s| parse_cursor(&s))
    };
    let length = number("length");
    Bounds {
        trimmed: number("entries-added") > length,
        oldest_held: if length > 0 {
            id("recorded-first-entry-id")
        } else {
            None
        },
        newest: id("last-generated-id").unwrap_or((0, 0)),
    }
}

impl RedisStore {
    pub async fn put_record(
        &self,
        record: &MessageRecord,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let mut invocation = self.message_scripts.put.prepare_invoke();
        invocation
            .key(record_key(&record.message_id))
            .key(EVENTS_KEY)
            .arg(retention.as_millis() as u64)
            .arg(minid(retention));
        for (k, v) in record_fields(record) {
            invocation.arg(k).arg(v);
        }
        let _: i64 = self.bounded(invocation.invoke_async(&mut con)).await?;
        Ok(())
    }

    pub async fn get_record(&self, message_id: &str) -> Result<Option<MessageRecord>, StoreError> {
        let mut con = self.connection.clone();
        let flat: Vec<String> = self
            .bounded(
                redis::cmd("HGETALL")
                    .arg(record_key(message_id))
                    .query_async(&mut con),
            )
            .await?;
        if flat.is_empty() {
            return Ok(None);
        }
        record_from(&pairs(flat)).map(Some)
    }

    pub async fn apply_status(
        &self,
        update: &StatusUpdate,
        retention: Duration,
    ) -> Result<Applied, StoreError> {
        let mut con = self.connection.clone();
        let error = update.error.as_ref();
        let answer: Vec<redis::Value> = self
            .bounded(
                self.message_scripts
                    .apply
                    .key(record_key(&update.message_id))
                    .key(EVENTS_KEY)
                    .arg(update.state.as_u8())
                    .arg(update.at_ms)
                    .arg(error.map(|e| e.code.to_string()).unwrap_or_default())
                    .arg(error.map(|e| e.reason.as_str()).unwrap_or_default())
                    .arg(error.map(|e| e.title.as_str()).unwrap_or_default())
                    .arg(error.map(|e| e.details.as_str()).unwrap_or_default())
                    .arg(update.pricing_category.as_deref().unwrap_or_default())
                    .arg(match update.billable {
                        Some(true) => "1",
                        Some(false) => "0",
                        None => "",
                    })
                    .arg(minid(retention))
                    .invoke_async(&mut con),
            )
            .await?;
        match answer.as_slice() {
            [redis::Value::Int(0)] => Ok(Applied::Unknown),
            [redis::Value::Int(1)] => Ok(Applied::Unchanged),
            [
                redis::Value::Int(2),
                category,
                redis::Value::Int(previous),
                batch_id,
                reference,
            ] => Ok(Applied::Changed {
                category: text(category)?,
                batch_id: text(batch_id)?,
                reference: text(reference)?,
                previous: u8::try_from(*previous)
                    .ok()
                    .and_then(State::from_u8)
                    .ok_or_else(|| {
                        StoreError(format!(
                            "unexpected state from the status script: {previous}"
                        ))
                    })?,
            }),
            other => Err(StoreError(format!(
                "unexpected answer from the status script: {other:?}"
            ))),
        }
    }

    pub async fn append_event(
        &self,
        event: &Event,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let mut con = self.connection.clone();
        let mut invocation = self.message_scripts.append.prepare_invoke();
        invocation
            .key(seen_key(&event.dedupe_key()))
            .key(EVENTS_KEY)
            .arg(retention.as_millis() as u64)
            .arg(minid(retention));
        for (k, v) in event_fields(event) {
            invocation.arg(k).arg(v);
        }
        let appended: i64 = self.bounded(invocation.invoke_async(&mut con)).await?;
        match appended {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(StoreError(format!(
                "unexpected answer from the append script: {other}"
            ))),
        }
    }

    pub async fn latest_cursor(&self) -> Result<String, StoreError> {
        let mut con = self.connection.clone();
        let newest: Vec<(String, Vec<String>)> = self
            .bounded(
                redis::cmd("XREVRANGE")
                    .arg(EVENTS_KEY)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut con),
            )
            .await?;
        Ok(newest
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }

    pub async fn events_after(
        &self,
        after: &After,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, FeedError> {
        let mut con = self.connection.clone();
        let start = match after {
            After::Oldest => "-".to_owned(),
            After::Now => format!("({}", self.latest_cursor().await?),
            After::Cursor(cursor) => {
                let info: Option<redis::Value> = self
                    .bounded(async {
                        match redis::cmd("XINFO")
                            .arg("STREAM")
                            .arg(EVENTS_KEY)
                            .query_async::<redis::Value>(&mut con.clone())
                            .await
                        {
                            Ok(v) => Ok(Some(v)),
                            // No stream yet: nothing was given out, nothing trimmed.
                            Err(e) if e.code().is_some() => Ok(None),
                            Err(e) => Err(e),
                        }
                    })
                    .await?;
                let bounds = info.as_ref().map_or(
                    Bounds {
                        trimmed: false,
                        oldest_held: None,
                        newest: (0, 0),
                    },
                    bounds,
                );
                format!("({}", format_cursor(bounds.check(cursor)?))
            }
        };
        let rows: Vec<(String, Vec<String>)> = self
            .bounded(
                redis::cmd("XRANGE")
                    .arg(EVENTS_KEY)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit.max(1))
                    .query_async(&mut con),
            )
            .await?;
        rows.into_iter()
            .map(|(cursor, flat)| {
                Ok(StoredEvent {
                    cursor,
                    event: event_from(&pairs(flat))?,
                })
            })
            .collect()
    }
}
