//! The runtime settings in Redis: one hash, `kabar:settings`, with the revision (`rev`) and the
//! JSON document (`doc`). Replicas poll `rev` alone; the document is read only when it changed.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::RedisStore;
use crate::{
    domain::{
        ports::StoreError,
        settings::{MAX_STORED_BYTES, StoredSettings},
    },
    store::SETTINGS_KEY,
};

/// Writes the document if the stored revision is still ARGV[1]. ARGV[2]: the new revision,
/// ARGV[3]: the document. Returns 1 when written, 0 when another change came first.
const REPLACE: &str = r#"
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'rev', ARGV[2], 'doc', ARGV[3])
return 1
"#;

static REPLACE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REPLACE));

impl RedisStore {
    /// The stored document, checked like a change ([`StoredSettings::check`]) and at most
    /// [`MAX_STORED_BYTES`]: anything else is an error, and the settings in force stay.
    pub async fn load_settings(&self) -> Result<Option<StoredSettings>, StoreError> {
        let mut con = self.connection.clone();
        let length: usize = self
            .bounded(
                redis::cmd("HSTRLEN")
                    .arg(SETTINGS_KEY)
                    .arg("doc")
                    .query_async(&mut con),
            )
            .await?;
        if length > MAX_STORED_BYTES {
            return Err(StoreError(format!(
                "the stored runtime settings ({SETTINGS_KEY}) are over {} KiB; not read",
                MAX_STORED_BYTES / 1024
            )));
        }
        let doc: Option<String> = self.bounded(con.hget(SETTINGS_KEY, "doc")).await?;
        let Some(doc) = doc else {
            return Ok(None);
        };
        let stored: StoredSettings = serde_json::from_str(&doc).map_err(|_| {
            StoreError(format!(
                "the stored runtime settings ({SETTINGS_KEY}) are not kabar's JSON document"
            ))
        })?;
        stored.check().map_err(|problem| {
            StoreError(format!(
                "the stored runtime settings ({SETTINGS_KEY}) are refused: {problem}"
            ))
        })?;
        Ok(Some(stored))
    }

    pub async fn settings_revision(&self) -> Result<u64, StoreError> {
        let mut con = self.connection.clone();
        let rev: Option<u64> = self.bounded(con.hget(SETTINGS_KEY, "rev")).await?;
        Ok(rev.unwrap_or(0))
    }

    pub async fn replace_settings(
        &self,
        expected: u64,
        next: &StoredSettings,
    ) -> Result<bool, StoreError> {
        let doc = serde_json::to_string(next).expect("the settings document always serialises");
        let mut con = self.connection.clone();
        let written: i64 = self
            .bounded(
                REPLACE_SCRIPT
                    .key(SETTINGS_KEY)
                    .arg(expected)
                    .arg(next.revision)
                    .arg(doc)
                    .invoke_async(&mut con),
            )
            .await?;
        Ok(written == 1)
    }
}
