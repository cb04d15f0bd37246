//! The connection status (`GET /status`, `kabar status`): the business number as Meta last
//! described it, the last accepted send and the last failure with its remedy, the store and the
//! batches. The number is read from Meta in the background every [`NUMBER_REFRESH`], so a
//! monitoring probe never makes kabar call Meta.

use std::{sync::RwLock, time::Duration};

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::whatsapp::{Driver, SendError};

/// How often the number's state is read from Meta.
pub const NUMBER_REFRESH: Duration = Duration::from_secs(60);

/// The number as Meta last described it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NumberState {
    pub phone_number_id: String,
    pub display_phone_number: Option<String>,
    pub verified_name: Option<String>,
    /// `GREEN`, `YELLOW`, `RED`, ...
    pub quality_rating: Option<String>,
    /// `CONNECTED`, ...
    pub status: Option<String>,
    /// `STANDARD` (80 messages/s) or `HIGH` (1,000).
    pub throughput: Option<String>,
    /// `TIER_250` ... `TIER_UNLIMITED`.
    pub messaging_limit: Option<String>,
    /// When it was read (Unix seconds); `None` before the first answer.
    pub checked_at: Option<u64>,
    /// Why the last read failed, if it did (the values above are then the last known).
    pub check_error: Option<String>,
}

/// The connection to Meta as the status shows it: the number's state, kept fresh in the
/// background, and the sends' outcomes.
pub struct Connection {
    driver: Driver,
    state: RwLock<NumberState>,
}

impl Connection {
    pub fn new(driver: Driver) -> Self {
        let state = NumberState {
            phone_number_id: driver.number().to_owned(),
            ..NumberState::default()
        };
        Connection {
            driver,
            state: RwLock::new(state),
        }
    }

    /// The last accepted send and the last failure (`None` for the `log` driver).
    pub fn last_sends(&self) -> Option<crate::whatsapp::LastSends> {
        match &self.driver {
            Driver::Meta(meta) => Some(meta.last_sends()),
            Driver::Log => None,
        }
    }

    pub fn number(&self) -> NumberState {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the number from Meta once (nothing for the `log` driver).
    pub async fn refresh(&self) {
        let Driver::Meta(meta) = &self.driver else {
            return;
        };
        let number = meta
            .graph_get(
                meta.phone_number_id(),
                &[(
                    "fields",
                    "display_phone_number,verified_name,quality_rating,status,throughput",
                )],
            )
            .await;
        let limit = meta.messaging_limit().await;
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        apply(&mut state, number, limit);
    }

    /// Refreshes every [`NUMBER_REFRESH`] until `stop`.
    pub async fn keep_fresh(self: std::sync::Arc<Self>, stop: CancellationToken) {
        if matches!(self.driver, Driver::Log) {
            return;
        }
        let mut ticker = tokio::time::interval(NUMBER_REFRESH);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.refresh().await,
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Folds Meta's answers into the state; a failed read keeps the last known values.
fn apply(
    state: &mut NumberState,
    number: Result<Value, SendError>,
    limit: Result<String, SendError>,
) {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    match number {
        Ok(n) => {
            state.display_phone_number = text(&n["display_phone_number"]);
            state.verified_name = text(&n["verified_name"]);
            state.quality_rating = text(&n["quality_rating"]);
            state.status = text(&n["status"]);
            state.throughput = text(&n["throughput"]["level"]);
            state.checked_at = Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            );
            state.check_error = None;
        }
        Err(e) => state.check_error = Some(e.to_string().chars().take(200).collect()),
    }
    // An older Graph API version has no such field: the tier stays unknown.
    if let Ok(tier) = limit {
        state.messaging_limit = Some(tier);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_failed_read_keeps_what_was_known() {
        let mut state = NumberState::default();
        apply(
            &mut state,
            Ok(
                json!({"display_phone_number": "+62 811", "quality_rating": "GREEN",
                      "status": "CONNECTED", "throughput": {"level": "STANDARD"}}),
            ),
            Ok("TIER_2K".into()),
        );
        assert_eq!(state.quality_rating.as_deref(), Some("GREEN"));
        assert_eq!(state.throughput.as_deref(), Some("STANDARD"));
        assert!(state.checked_at.is_some() && state.check_error.is_none());
        apply(
            &mut state,
            Err(SendError::Unreachable("connection refused".into())),
            Err(SendError::Unreachable("connection refused".into())),
        );
        assert_eq!(state.quality_rating.as_deref(), Some("GREEN"));
        assert_eq!(state.messaging_limit.as_deref(), Some("TIER_2K"));
        assert!(state.check_error.as_ref().unwrap().contains("refused"));
    }
}
