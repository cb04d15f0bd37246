//! `AdminService`: the runtime settings (scope `admin`, checked by the auth layer). Decodes the
//! change, calls [`SettingsService`], and shows the settings in force with their sources.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth, calls::CallDetail, messages::timestamp};
use crate::{
    domain::{
        error::Error,
        settings::{Change, Edit, Effective, Resolved, SettingsService, Source, TemplateEdit},
    },
    pb::{self, settings::Source as SettingSource},
};

pub struct AdminGrpc {
    settings: Arc<SettingsService>,
}

impl AdminGrpc {
    pub fn new(settings: Arc<SettingsService>) -> Self {
        AdminGrpc { settings }
    }

    fn view(&self, effective: &Effective) -> pb::Settings {
        let registry = self.settings.registry();
        let templates = registry
            .keys()
            .into_iter()
            .filter_map(|key| registry.get(key))
            .map(|t| {
                (
                    t.key.clone(),
                    pb::TemplateSettings {
                        name: Some(string_setting(effective.name(t))),
                        language: Some(string_setting(effective.language(t))),
                    },
                )
            })
            .collect();
        let stored = &effective.stored;
        pb::Settings {
            whatsapp_enabled: Some(pb::BoolSetting {
                value: effective.whatsapp_enabled.value,
                source: source(effective.whatsapp_enabled.source) as i32,
                environment_value: effective.whatsapp_enabled.environment,
            }),
            templates,
            revision: stored.revision,
            changed_by: stored.changed_by.clone(),
            changed_at: (stored.changed_at_ms > 0)
                .then(|| timestamp(stored.changed_at_ms))
                .flatten(),
        }
    }
}

fn source(s: Source) -> SettingSource {
    match s {
        Source::Environment => SettingSource::Environment,
        Source::Runtime => SettingSource::Runtime,
    }
}

fn string_setting(r: Resolved<String>) -> pb::StringSetting {
    pb::StringSetting {
        value: r.value,
        source: source(r.source) as i32,
        environment_value: r.environment,
    }
}

/// An optional text field of the request: unset leaves the setting, empty clears it.
fn edit(value: Option<String>) -> Option<Edit<String>> {
    value.map(|v| {
        if v.is_empty() {
            Edit::Clear
        } else {
            Edit::Set(v)
        }
    })
}

/// The request as a domain change; the one check the domain cannot make (both set and clear).
fn change_of(r: pb::UpdateSettingsRequest) -> Result<Change, Error> {
    let whatsapp_enabled = match (r.whatsapp_enabled, r.clear_whatsapp_enabled) {
        (Some(_), true) => {
            return Err(Error::field(
                "clear_whatsapp_enabled",
                "set whatsapp_enabled or clear it, not both",
            ));
        }
        (Some(on), false) => Some(Edit::Set(on)),
        (None, true) => Some(Edit::Clear),
        (None, false) => None,
    };
    Ok(Change {
        whatsapp_enabled,
        templates: r
            .templates
            .into_iter()
            .map(|(key, t)| {
                (
                    key,
                    TemplateEdit {
                        name: edit(t.name),
                        language: edit(t.language),
                    },
                )
            })
            .collect(),
        expected_revision: r.expected_revision,
    })
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminGrpc {
    async fn get_settings(
        &self,
        _request: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::Settings>, Status> {
        let effective = self.settings.get().await.map_err(Status::from)?;
        Ok(Response::new(self.view(&effective)))
    }

    async fn update_settings(
        &self,
        request: Request<pb::UpdateSettingsRequest>,
    ) -> Result<Response<pb::Settings>, Status> {
        let caller = auth::caller_of(&request)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let change = change_of(request.into_inner()).map_err(Status::from)?;
        let effective = self
            .settings
            .update(&change, &caller)
            .await
            .map_err(Status::from)?;
        let mut response = Response::new(self.view(&effective));
        response.extensions_mut().insert(CallDetail {
            outcome: Some("settings changed"),
            ..CallDetail::default()
        });
        Ok(response)
    }
}
