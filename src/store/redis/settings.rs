//! The runtime settings in Redis: one hash, `kabar:settings`, with the revision (`rev`) and the
//! JSON document (`doc`). Replicas poll `rev` alone; the document is read only when it changed.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::RedisStore;
use crate::{
    domain::{ports::StoreError, settings::StoredSettings},
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
    pub async fn load_settings(&self) -> Result<Option<StoredSettings>, StoreError> {
        let mut con = self.connection.clone();
        let doc: Option<String> = self.bounded(con.hget(SETTINGS_KEY, "doc")).await?;
        doc.map(|doc| {
            serde_json::from_str(&doc)
                .map_err(|e| StoreError(format!("the stored runtime settings are unreadable: {e}")))
        })
        .transpose()
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
