//! The pacing schedule in process memory: the rules as they are, under one mutex, on this
//! process's clock.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use crate::{
    domain::{
        pacing::rules::{Answer, Ask, PaceState},
        ports::StoreError,
    },
    store::now_us,
};

/// One schedule per business number.
#[derive(Default)]
pub struct Schedules(Mutex<HashMap<String, PaceState>>);

impl Schedules {
    fn with<T>(&self, number: &str, f: impl FnOnce(&mut PaceState, u64) -> T) -> T {
        // Each rule updates the state in one step under the lock: a panic cannot leave it
        // half-written.
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = map.entry(number.to_owned()).or_default();
        f(state, now_us())
    }

    pub fn admit(&self, number: &str, asks: &[Ask<'_>]) -> Result<Vec<Answer>, StoreError> {
        Ok(self.with(number, |s, now| {
            asks.iter().map(|ask| s.admit(now, ask)).collect()
        }))
    }

    pub fn slow_down(&self, number: &str) -> Result<u64, StoreError> {
        Ok(self.with(number, |s, now| s.slow_down(now)))
    }

    pub fn block_pair(&self, number: &str, phone: &str, hold: Duration) -> Result<(), StoreError> {
        self.with(number, |s, now| {
            s.block_pair(now, phone, hold.as_micros() as u64)
        });
        Ok(())
    }

    pub fn customers_wrote(
        &self,
        number: &str,
        customers: &[(String, u64)],
    ) -> Result<(), StoreError> {
        self.with(number, |s, now| {
            for (phone, at_ms) in customers {
                s.customer_wrote(now, phone, at_ms.saturating_mul(1000));
            }
        });
        Ok(())
    }

    pub fn daily_used(&self, number: &str) -> Result<u64, StoreError> {
        Ok(self.with(number, |s, now| s.daily_used(now)))
    }
}
