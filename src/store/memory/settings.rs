//! The runtime settings in process memory: the document under a mutex, for one instance.

use super::MemoryStore;
use crate::domain::{ports::StoreError, settings::StoredSettings};

impl MemoryStore {
    fn settings_doc(&self) -> std::sync::MutexGuard<'_, Option<StoredSettings>> {
        // Each change replaces the document in one assignment: a panic cannot leave it
        // half-written.
        self.settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub async fn load_settings(&self) -> Result<Option<StoredSettings>, StoreError> {
        Ok(self.settings_doc().clone())
    }

    pub async fn settings_revision(&self) -> Result<u64, StoreError> {
        Ok(self.settings_doc().as_ref().map_or(0, |s| s.revision))
    }

    pub async fn replace_settings(
        &self,
        expected: u64,
        next: &StoredSettings,
    ) -> Result<bool, StoreError> {
        let mut doc = self.settings_doc();
        if doc.as_ref().map_or(0, |s| s.revision) != expected {
            return Ok(false);
        }
        *doc = Some(next.clone());
        Ok(true)
    }
}
