//! Runtime settings: what the billing panel sets through `AdminService`, which wins over the
//! environment, as the panel's settings win over `.env`.
//!
//! - The WhatsApp switch (`WHATSAPP_ENABLED`) and, per registry key, the Meta template name and
//!   language (`KABAR_TEMPLATES`) can be overridden; an override can be cleared, and the
//!   environment's value applies again.
//! - The settings are one document with a revision, stored through [`SettingsStore`] (one Redis
//!   key shared by every replica, or the process). A change is compare-and-set on the revision,
//!   so that two admins editing at once never overwrite each other unknowingly.
//! - Every replica follows the store ([`follow`]): a cheap revision check every
//!   [`POLL_INTERVAL`], the document read only when it changed. The send path reads the settings
//!   in force through one shared handle ([`LiveSettings`]), never the store.
//! - A change is validated as the environment is (known keys, Meta's name and language rules);
//!   one bad field refuses the whole change, and nothing is applied.
//!
//! The access token is deliberately not a setting: it stays in the environment (or its file).

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{
    error::{Error, Violations, echo},
    ports::SettingsStore,
};
use crate::{
    store::now_ms,
    templates::{Template, TemplateRegistry, is_language_code},
};

/// How often a replica checks the store's revision: a change is in force everywhere well within
/// the 2 seconds the API promises, for one tiny Redis read per replica and interval.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often a change is tried again when another change landed between reading and writing
/// (only for changes without `expected_revision`).
const WRITE_ATTEMPTS: usize = 5;

/// Meta's rule for template names: `^[a-z0-9_]+$`, at most 512 characters.
pub const MAX_NAME_CHARS: usize = 512;

/// The overrides of one template; `None`: the environment's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

impl TemplateOverride {
    fn is_empty(&self) -> bool {
        self.name.is_none() && self.language.is_none()
    }
}

/// The settings document as stored: the overrides, and who changed them last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSettings {
    /// 0: never changed. Every change adds one.
    pub revision: u64,
    /// The caller's name from the key file; empty while API keys are off.
    #[serde(default)]
    pub changed_by: String,
    /// Unix milliseconds; 0 when never changed.
    #[serde(default)]
    pub changed_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whatsapp_enabled: Option<bool>,
    /// By registry key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub templates: BTreeMap<String, TemplateOverride>,
}

/// Most bytes of the stored document read: a thousand overrides fit in far less.
pub const MAX_STORED_BYTES: usize = 256 * 1024;

impl StoredSettings {
    /// Checks a document read back from the store as a change is checked: a document written
    /// there by anything but kabar (or corrupted) is never put in force. The problem, in words
    /// that never echo the document.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = |n: &str| {
            n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        };
        if !name_ok(&self.changed_by) {
            return Err("changed_by is not a caller name".into());
        }
        for (key, o) in &self.templates {
            if !is_template_name(key) {
                return Err("a template key is not a registry key".into());
            }
            if o.name.as_deref().is_some_and(|n| !is_template_name(n)) {
                return Err(format!("templates[{key}].name is not a Meta template name"));
            }
            if o.language.as_deref().is_some_and(|l| !is_language_code(l)) {
                return Err(format!("templates[{key}].language is not a language code"));
            }
        }
        Ok(())
    }
}

/// What to do with one setting in a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit<T> {
    /// Override the environment with this value.
    Set(T),
    /// Clear the override: the environment's value applies again.
    Clear,
}

/// The settings of one template in a change; `None`: unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateEdit {
    pub name: Option<Edit<String>>,
    pub language: Option<Edit<String>>,
}

/// One UpdateSettings call, as received. Settings not named stay as they are.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub whatsapp_enabled: Option<Edit<bool>>,
    /// By registry key.
    pub templates: BTreeMap<String, TemplateEdit>,
    /// Compare-and-set: the revision the change was made on.
    pub expected_revision: Option<u64>,
}

/// Whether `name` is a valid Meta template name.
pub fn is_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Checks a change against the registry, reporting every problem, each naming its field
/// (`templates[invoice_notification].name`).
pub fn validate(change: &Change, registry: &TemplateRegistry) -> Result<(), Error> {
    let mut violations = Violations::new();
    for (key, TemplateEdit { name, language }) in &change.templates {
        let field = format!("templates[{}]", crate::domain::error::sanitize(key));
        if registry.get(key).is_none() {
            violations.push(
                field,
                format!(
                    "unknown template {}; known: {}",
                    echo(key),
                    registry.keys().join(", ")
                ),
            );
            continue;
        }
        if name.is_none() && language.is_none() {
            violations.push(
                field.clone(),
                "names no setting: give name or language (empty to clear the override)",
            );
        }
        if let Some(Edit::Set(name)) = name
            && !is_template_name(name)
        {
            violations.push(
                format!("{field}.name"),
                format!(
                    "{} is not a Meta template name: 1 to {MAX_NAME_CHARS} lowercase letters, \
                     digits and underscores",
                    echo(name)
                ),
            );
        }
        if let Some(Edit::Set(language)) = language
            && !is_language_code(language)
        {
            violations.push(
                format!("{field}.language"),
                format!(
                    "{} is not a Meta language code such as id or en_US",
                    echo(language)
                ),
            );
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(violations))
    }
}

/// `current` with `change` applied (already validated), as the next revision.
pub fn apply(
    current: &StoredSettings,
    change: &Change,
    caller: &str,
    now_ms: u64,
) -> StoredSettings {
    let mut next = current.clone();
    next.revision = current.revision + 1;
    next.changed_by = caller.to_owned();
    next.changed_at_ms = now_ms;
    match &change.whatsapp_enabled {
        Some(Edit::Set(on)) => next.whatsapp_enabled = Some(*on),
        Some(Edit::Clear) => next.whatsapp_enabled = None,
        None => {}
    }
    for (key, TemplateEdit { name, language }) in &change.templates {
        let entry = next.templates.entry(key.clone()).or_default();
        match name {
            Some(Edit::Set(n)) => entry.name = Some(n.clone()),
            Some(Edit::Clear) => entry.name = None,
            None => {}
        }
        match language {
            Some(Edit::Set(l)) => entry.language = Some(l.clone()),
            Some(Edit::Clear) => entry.language = None,
            None => {}
        }
        if entry.is_empty() {
            next.templates.remove(key);
        }
    }
    next
}

/// The change in words for the change log: settings, values and the clears. Every value was
/// validated (names, language codes, registry keys), so it is safe to log as it is.
pub fn describe(change: &Change) -> String {
    fn word<T: std::fmt::Display>(edit: &Edit<T>) -> String {
        match edit {
            Edit::Set(v) => v.to_string(),
            Edit::Clear => "(environment)".to_owned(),
        }
    }
    let mut parts = Vec::new();
    if let Some(edit) = &change.whatsapp_enabled {
        parts.push(format!("whatsapp_enabled={}", word(edit)));
    }
    for (key, TemplateEdit { name, language }) in &change.templates {
        if let Some(edit) = name {
            parts.push(format!("templates[{key}].name={}", word(edit)));
        }
        if let Some(edit) = language {
            parts.push(format!("templates[{key}].language={}", word(edit)));
        }
    }
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Where a value in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The environment, `.env`, the `KABAR_TEMPLATES` file, or the built-in default.
    Environment,
    /// A runtime setting (UpdateSettings).
    Runtime,
}

/// A value in force, where it comes from, and the environment's value beneath it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<T> {
    pub value: T,
    pub source: Source,
    pub environment: T,
}

fn resolve<T: Clone>(environment: &T, over: Option<&T>) -> Resolved<T> {
    match over {
        Some(v) => Resolved {
            value: v.clone(),
            source: Source::Runtime,
            environment: environment.clone(),
        },
        None => Resolved {
            value: environment.clone(),
            source: Source::Environment,
            environment: environment.clone(),
        },
    }
}

/// The settings in force on this replica: the environment with the stored overrides on top.
#[derive(Debug, Clone)]
pub struct Effective {
    pub stored: StoredSettings,
    pub whatsapp_enabled: Resolved<bool>,
}

impl Effective {
    fn new(environment_enabled: bool, stored: StoredSettings) -> Self {
        Effective {
            whatsapp_enabled: resolve(&environment_enabled, stored.whatsapp_enabled.as_ref()),
            stored,
        }
    }

    /// The runtime overrides of registry key `key`: (name, language).
    pub fn overrides(&self, key: &str) -> (Option<&str>, Option<&str>) {
        match self.stored.templates.get(key) {
            Some(o) => (o.name.as_deref(), o.language.as_deref()),
            None => (None, None),
        }
    }

    /// The Meta template name of `template` in force.
    pub fn name(&self, template: &Template) -> Resolved<String> {
        resolve(
            &template.name,
            self.stored
                .templates
                .get(&template.key)
                .and_then(|o| o.name.as_ref()),
        )
    }

    /// The language of `template` in force (a request's own `language` still wins over it).
    pub fn language(&self, template: &Template) -> Resolved<String> {
        resolve(
            &template.language,
            self.stored
                .templates
                .get(&template.key)
                .and_then(|o| o.language.as_ref()),
        )
    }
}

/// The one handle the send path reads the settings through: cheap to read on every send,
/// replaced whole when the settings change.
pub struct LiveSettings {
    environment_enabled: bool,
    current: RwLock<Arc<Effective>>,
}

impl LiveSettings {
    /// The environment alone, until the stored settings are installed.
    pub fn new(environment_enabled: bool) -> Self {
        LiveSettings {
            environment_enabled,
            current: RwLock::new(Arc::new(Effective::new(
                environment_enabled,
                StoredSettings::default(),
            ))),
        }
    }

    pub fn current(&self) -> Arc<Effective> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn whatsapp_enabled(&self) -> bool {
        self.current().whatsapp_enabled.value
    }

    /// Puts `stored` in force; whether it differs from what was in force. Only the revision is
    /// compared: every change has its own. (A Redis that lost its data starts again at 0, and
    /// the environment applies again.)
    /// Puts `stored` in force only if it is newer than what is in force (checked under the
    /// lock, so a concurrent newer change is never replaced by an older read).
    pub fn install_newer(&self, stored: StoredSettings) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if stored.revision <= current.stored.revision {
            return false;
        }
        *current = Arc::new(Effective::new(self.environment_enabled, stored));
        true
    }

    pub fn install(&self, stored: StoredSettings) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.stored.revision == stored.revision && current.stored == stored {
            return false;
        }
        *current = Arc::new(Effective::new(self.environment_enabled, stored));
        true
    }
}

/// GetSettings and UpdateSettings.
pub struct SettingsService {
    store: Arc<dyn SettingsStore>,
    live: Arc<LiveSettings>,
    registry: TemplateRegistry,
}

impl SettingsService {
    pub fn new(
        store: Arc<dyn SettingsStore>,
        live: Arc<LiveSettings>,
        registry: TemplateRegistry,
    ) -> Self {
        SettingsService {
            store,
            live,
            registry,
        }
    }

    pub fn registry(&self) -> &TemplateRegistry {
        &self.registry
    }

    /// The settings as stored now (and put in force here, if this replica had not yet).
    pub async fn get(&self) -> Result<Arc<Effective>, Error> {
        let stored = self.store.load_settings().await?.unwrap_or_default();
        // Put in force only forward: a change made here while this read was on its way stays in
        // force. (Going back, e.g. Redis lost its data, is for the follower, with a warning.)
        if self.live.install_newer(stored.clone()) {
            return Ok(self.live.current());
        }
        Ok(Arc::new(Effective::new(
            self.live.environment_enabled,
            stored,
        )))
    }

    /// Validates and stores `change` (compare-and-set on the revision), puts it in force here at
    /// once, and logs it with the caller's name. Nothing is applied when anything is wrong.
    pub async fn update(&self, change: &Change, caller: &str) -> Result<Arc<Effective>, Error> {
        validate(change, &self.registry)?;
        for _ in 0..WRITE_ATTEMPTS {
            let current = self.store.load_settings().await?.unwrap_or_default();
            if let Some(expected) = change.expected_revision
                && expected != current.revision
            {
                return Err(Error::SettingsRevisionMismatch {
                    expected,
                    current: current.revision,
                });
            }
            let next = apply(&current, change, caller, now_ms());
            if self.store.replace_settings(current.revision, &next).await? {
                tracing::info!(
                    caller,
                    revision = next.revision,
                    change = %describe(change),
                    "runtime settings changed"
                );
                self.live.install(next);
                return Ok(self.live.current());
            }
            // Another change landed between the read and the write.
            if let Some(expected) = change.expected_revision {
                let current = self.store.load_settings().await?.map_or(0, |s| s.revision);
                return Err(Error::SettingsRevisionMismatch { expected, current });
            }
        }
        Err(Error::StoreUnavailable(
            "the runtime settings kept changing under this update; try again".to_owned(),
        ))
    }
}

/// Keeps `live` in step with the store until `shutdown`: the revision every [`POLL_INTERVAL`],
/// the whole document only when it changed. While the store is unreachable the settings last
/// in force stay in force.
pub async fn follow(
    store: Arc<dyn SettingsStore>,
    live: Arc<LiveSettings>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let result = async {
            let revision = store.settings_revision().await?;
            if revision == live.current().stored.revision {
                return Ok(false);
            }
            let stored = store.load_settings().await?.unwrap_or_default();
            if stored.revision < live.current().stored.revision {
                tracing::warn!(
                    from = live.current().stored.revision,
                    to = stored.revision,
                    "the runtime settings went back to an older revision (Redis lost or restored \
                     its data?); applying them"
                );
            }
            Ok::<_, super::ports::StoreError>(live.install(stored))
        }
        .await;
        match result {
            Ok(changed) => {
                if failing {
                    tracing::info!("runtime settings can be read again");
                    failing = false;
                }
                if changed {
                    let current = live.current();
                    tracing::info!(
                        revision = current.stored.revision,
                        changed_by = %current.stored.changed_by,
                        whatsapp_enabled = current.whatsapp_enabled.value,
                        "runtime settings applied"
                    );
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        error = %e,
                        "cannot read the runtime settings; the settings last read stay in force"
                    );
                    failing = true;
                }
            }
        }
    }
}

/// Reads the stored settings once at start-up, so that a replica starts with the panel's
/// settings (a switched-off WhatsApp stays off); the environment while the store cannot answer.
pub async fn load_at_start(store: &dyn SettingsStore, live: &LiveSettings) {
    match store.load_settings().await {
        Ok(Some(stored)) => {
            let revision = stored.revision;
            live.install(stored);
            tracing::info!(revision, "runtime settings in force");
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "cannot read the runtime settings yet: the environment applies until they can be read"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_never_replaces_a_newer_change() {
        let live = LiveSettings::new(true);
        let newer = StoredSettings {
            revision: 6,
            whatsapp_enabled: Some(false),
            ..StoredSettings::default()
        };
        assert!(live.install(newer));
        let older = StoredSettings {
            revision: 5,
            ..StoredSettings::default()
        };
        assert!(!live.install_newer(older));
        assert!(!live.current().whatsapp_enabled.value);
        let newest = StoredSettings {
            revision: 7,
            ..StoredSettings::default()
        };
        assert!(live.install_newer(newest));
        assert!(live.current().whatsapp_enabled.value);
    }

    #[test]
    fn a_stored_document_is_checked_like_a_change() {
        let mut good = StoredSettings {
            revision: 3,
            changed_by: "panel".into(),
            ..StoredSettings::default()
        };
        good.templates.insert(
            "invoice_notification".into(),
            TemplateOverride {
                name: Some("tagihan_v2".into()),
                language: Some("en_US".into()),
            },
        );
        assert_eq!(good.check(), Ok(()));
        let mut forged = good.clone();
        forged.changed_by = "evil\nINFO forged".into();
        assert!(forged.check().is_err());
        let mut bad_name = good.clone();
        bad_name
            .templates
            .get_mut("invoice_notification")
            .unwrap()
            .name = Some("BAD NAME".into());
        assert!(bad_name.check().unwrap_err().contains("name"));
        let mut bad_language = good;
        bad_language
            .templates
            .get_mut("invoice_notification")
            .unwrap()
            .language = Some("zz-!!".into());
        assert!(bad_language.check().unwrap_err().contains("language"));
    }

    fn set_name(key: &str, name: &str) -> Change {
        let mut change = Change::default();
        change
            .templates
            .insert(key.to_owned(), edit(Some(Edit::Set(name.to_owned())), None));
        change
    }

    fn edit(name: Option<Edit<String>>, language: Option<Edit<String>>) -> TemplateEdit {
        TemplateEdit { name, language }
    }

    fn fields(e: Error) -> Vec<String> {
        match e {
            Error::InvalidArgument(v) => v.shown().iter().map(|v| v.field.clone()).collect(),
            other => panic!("not invalid: {other:?}"),
        }
    }

    #[test]
    fn names_follow_metas_rule() {
        assert!(is_template_name("tagihan_internet_v2"));
        assert!(is_template_name(&"a".repeat(MAX_NAME_CHARS)));
        for bad in ["", "Tagihan", "tagihan-v2", "tagihan v2", "tagihan.v2", "ü"] {
            assert!(!is_template_name(bad), "{bad:?}");
        }
        assert!(!is_template_name(&"a".repeat(MAX_NAME_CHARS + 1)));
    }

    #[test]
    fn every_bad_field_is_named() {
        let registry = TemplateRegistry::default();
        let mut change = set_name("invoice_notification", "Bad-Name");
        change.templates.insert(
            "otp_code".to_owned(),
            edit(None, Some(Edit::Set("english".to_owned()))),
        );
        change
            .templates
            .insert("welcome".to_owned(), edit(Some(Edit::Clear), None));
        change
            .templates
            .insert("access_opened".to_owned(), edit(None, None));
        let err = validate(&change, &registry).unwrap_err();
        assert_eq!(
            fields(err),
            [
                "templates[access_opened]",
                "templates[invoice_notification].name",
                "templates[otp_code].language",
                "templates[welcome]",
            ]
        );
        assert!(validate(&set_name("invoice_notification", "tagihan_v2"), &registry).is_ok());
    }

    #[test]
    fn a_change_sets_and_clears_and_counts_a_revision() {
        let mut change = set_name("invoice_notification", "tagihan_v2");
        change.whatsapp_enabled = Some(Edit::Set(false));
        let first = apply(&StoredSettings::default(), &change, "panel", 1000);
        assert_eq!(first.revision, 1);
        assert_eq!(first.changed_by, "panel");
        assert_eq!(first.whatsapp_enabled, Some(false));
        assert_eq!(
            first.templates["invoice_notification"].name.as_deref(),
            Some("tagihan_v2")
        );

        let mut clear = Change {
            whatsapp_enabled: Some(Edit::Clear),
            ..Change::default()
        };
        clear.templates.insert(
            "invoice_notification".to_owned(),
            edit(Some(Edit::Clear), None),
        );
        let second = apply(&first, &clear, "ops", 2000);
        assert_eq!(second.revision, 2);
        assert_eq!(second.whatsapp_enabled, None);
        assert!(second.templates.is_empty(), "an empty override is dropped");
        assert_eq!(
            describe(&clear),
            "whatsapp_enabled=(environment), templates[invoice_notification].name=(environment)"
        );
    }

    #[test]
    fn overrides_win_over_the_environment_and_say_so() {
        let registry = TemplateRegistry::default();
        let invoice = registry.get("invoice_notification").unwrap();
        let live = LiveSettings::new(true);
        assert!(live.whatsapp_enabled());
        let mut change = set_name("invoice_notification", "tagihan_v2");
        change.whatsapp_enabled = Some(Edit::Set(false));
        assert!(live.install(apply(&StoredSettings::default(), &change, "", 1)));
        let now = live.current();
        assert!(!now.whatsapp_enabled.value);
        assert_eq!(now.whatsapp_enabled.source, Source::Runtime);
        assert!(now.whatsapp_enabled.environment);
        let name = now.name(invoice);
        assert_eq!(
            (name.value.as_str(), name.source, name.environment.as_str()),
            ("tagihan_v2", Source::Runtime, "invoice_notification")
        );
        let language = now.language(invoice);
        assert_eq!(
            (language.value.as_str(), language.source),
            ("id", Source::Environment)
        );
        // The same document again changes nothing; an emptied store brings the environment back.
        assert!(!live.install(now.stored.clone()));
        assert!(live.install(StoredSettings::default()));
        assert!(live.whatsapp_enabled());
    }

    #[test]
    fn the_stored_document_reads_back() {
        let stored = apply(
            &StoredSettings::default(),
            &set_name("payment_reminder", "pengingat"),
            "panel",
            5,
        );
        let text = serde_json::to_string(&stored).unwrap();
        assert_eq!(
            serde_json::from_str::<StoredSettings>(&text).unwrap(),
            stored
        );
    }
}
