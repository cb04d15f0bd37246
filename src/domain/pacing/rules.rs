//! The rules of one admission, as pure logic over a clock in microseconds. The in-process store
//! runs them as they are; the Redis store runs the same rules in one Lua script on Redis's own
//! clock (`TIME`), so that every replica shares one schedule whatever their clocks say.
//!
//! - **Rate**: a virtual schedule (GCRA): `tat` is the time of the next free slot; a send takes
//!   the slot at `max(tat, now)` and moves `tat` one interval on. The send then waits for its
//!   slot, so slots are spaced evenly and no burst ever leaves.
//! - **Priority**: a class may only take a slot at most its horizon ahead; a lower class has a
//!   shorter horizon, so that when the schedule is full, a higher class finds a slot sooner.
//! - **Pair interval**: per recipient, the time before which no other message may go.
//! - **Daily limit**: the recipients reached in the last 24 hours, each with its latest send;
//!   customers who wrote in the last 24 hours are inside their service window and not counted.
//!   Nothing is counted while the limit is unlimited.
//! - **Backoff**: after Meta's own throttling answer, the interval is multiplied (2, 4, 8) for
//!   a while and the schedule pauses, so that every replica slows down together. Answers within
//!   a second of the last slow-down are one episode and slow it no further.
//!
//! A refusal or a "wait and ask again" changes nothing.

use std::collections::{BTreeSet, HashMap};

pub const DAY_US: u64 = 24 * 3600 * 1_000_000;
/// How long a backoff lasts after Meta's last throttling answer.
pub const BACKOFF_WINDOW_US: u64 = 10_000_000;
/// The schedule's pause after a throttling answer.
pub const BACKOFF_PAUSE_US: u64 = 200_000;
/// Throttling answers within this time of the one that last slowed the schedule belong to the
/// same episode (answers to messages already on their way): they do not slow it further.
pub const BACKOFF_EPISODE_US: u64 = 1_000_000;
/// The slowest backoff: an eighth of the configured rate.
pub const MAX_BACKOFF: u64 = 8;

/// One admission request.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The recipient, E.164.
    pub phone: &'a str,
    /// Microseconds between two slots at the configured rate.
    pub interval_us: u64,
    /// How far ahead this priority may take a slot.
    pub horizon_us: u64,
    /// How long this send may wait at all (its deadline, less the time the send takes).
    pub budget_us: u64,
    /// Least time between two messages to one recipient; 0 for none.
    pub pair_us: u64,
    /// Unique recipients per rolling 24 hours; 0 for unlimited.
    pub daily_limit: u64,
}

/// Which limit refused a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Rate,
    Pair,
    Daily,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The send has its slot `wait_us` from now; `daily_used` recipients are counted now (0 when
    /// the store did not count them on this admission).
    Admitted { wait_us: u64, daily_used: u64 },
    /// The schedule is full as far as this priority may look: ask again in `wait_us`.
    Queue { wait_us: u64 },
    /// The recipient's pair interval ends in `wait_us` (within the budget): ask again then.
    PairWait { wait_us: u64 },
    /// Not within the budget (or past the daily limit): a slot frees in `retry_us`.
    Refused { limit: Limit, retry_us: u64 },
}

/// Recipients with a time each, ordered by that time so that the old ones can be dropped.
#[derive(Default)]
struct Recent {
    at: HashMap<String, u64>,
    order: BTreeSet<(u64, String)>,
}

impl Recent {
    fn get(&self, phone: &str) -> Option<u64> {
        self.at.get(phone).copied()
    }

    fn set(&mut self, phone: &str, at: u64) {
        if let Some(old) = self.at.insert(phone.to_owned(), at) {
            self.order.remove(&(old, phone.to_owned()));
        }
        self.order.insert((at, phone.to_owned()));
    }

    /// Drops every entry at or before `until`.
    fn drop_until(&mut self, until: u64) {
        while let Some((at, _)) = self.order.first() {
            if *at > until {
                break;
            }
            let (_, phone) = self.order.pop_first().expect("checked above");
            self.at.remove(&phone);
        }
    }

    fn oldest(&self) -> Option<u64> {
        self.order.first().map(|(at, _)| *at)
    }

    fn len(&self) -> u64 {
        self.at.len() as u64
    }
}

/// The pacing state of one business number.
#[derive(Default)]
pub struct PaceState {
    tat: u64,
    backoff_factor: u64,
    backoff_until: u64,
    /// When the backoff was last made slower.
    backoff_since: u64,
    /// When the next message to a recipient may go.
    pair: Recent,
    /// When each recipient counted toward the daily limit was last sent to.
    daily: Recent,
    /// When each customer last wrote to the business.
    inbound: Recent,
}

impl PaceState {
    pub fn admit(&mut self, now: u64, ask: &Ask<'_>) -> Answer {
        let since = now.saturating_sub(DAY_US);
        self.inbound.drop_until(since);
        self.daily.drop_until(since);
        self.pair.drop_until(now);

        let counts = ask.daily_limit > 0 && self.inbound.get(ask.phone).is_none();
        if counts && ask.daily_limit > 0 && self.daily.get(ask.phone).is_none() {
            let used = self.daily.len();
            if used >= ask.daily_limit {
                let oldest = self.daily.oldest().unwrap_or(now);
                return Answer::Refused {
                    limit: Limit::Daily,
                    retry_us: (oldest + DAY_US).saturating_sub(now),
                };
            }
        }
        if let Some(next) = self.pair.get(ask.phone).filter(|_| ask.pair_us > 0) {
            let wait_us = next - now;
            return if wait_us > ask.budget_us {
                Answer::Refused {
                    limit: Limit::Pair,
                    retry_us: wait_us,
                }
            } else {
                Answer::PairWait { wait_us }
            };
        }
        let factor = if self.backoff_until > now {
            self.backoff_factor.max(1)
        } else {
            1
        };
        let slot = self.tat.max(now);
        let wait_us = slot - now;
        if wait_us > ask.budget_us {
            return Answer::Refused {
                limit: Limit::Rate,
                retry_us: wait_us,
            };
        }
        if wait_us > ask.horizon_us {
            return Answer::Queue {
                wait_us: wait_us - ask.horizon_us,
            };
        }
        self.tat = slot + ask.interval_us * factor;
        if ask.pair_us > 0 {
            self.pair.set(ask.phone, slot + ask.pair_us);
        }
        if counts {
            self.daily.set(ask.phone, now);
        }
        Answer::Admitted {
            wait_us,
            daily_used: self.daily.len(),
        }
    }

    /// Meta throttled the number: slow every sender down for a while. Returns the factor.
    pub fn slow_down(&mut self, now: u64) -> u64 {
        if self.backoff_until <= now {
            self.backoff_factor = 2;
            self.backoff_since = now;
        } else if now >= self.backoff_since + BACKOFF_EPISODE_US {
            self.backoff_factor = (self.backoff_factor * 2).clamp(2, MAX_BACKOFF);
            self.backoff_since = now;
        }
        self.backoff_until = now + BACKOFF_WINDOW_US;
        self.tat = self.tat.max(now + BACKOFF_PAUSE_US);
        self.backoff_factor
    }

    /// Meta refused a message to this recipient for the pair rate: nothing more to them for
    /// `for_us`.
    pub fn block_pair(&mut self, now: u64, phone: &str, for_us: u64) {
        let until = (now + for_us).max(self.pair.get(phone).unwrap_or(0));
        self.pair.set(phone, until);
    }

    /// A customer wrote at `at`: their service window is open for 24 hours from then.
    pub fn customer_wrote(&mut self, now: u64, phone: &str, at: u64) {
        if at + DAY_US <= now || self.inbound.get(phone).is_some_and(|t| t >= at) {
            return;
        }
        self.inbound.set(phone, at.min(now));
    }

    /// Recipients counted in the last 24 hours.
    pub fn daily_used(&mut self, now: u64) -> u64 {
        self.daily.drop_until(now.saturating_sub(DAY_US));
        self.daily.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000_000;

    fn ask(phone: &str) -> Ask<'_> {
        Ask {
            phone,
            interval_us: 12_500, // 80/s
            horizon_us: 1_000_000,
            budget_us: 5_000_000,
            pair_us: 0,
            daily_limit: 0,
        }
    }

    fn admitted_wait(answer: Answer) -> u64 {
        match answer {
            Answer::Admitted { wait_us, .. } => wait_us,
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[test]
    fn slots_are_spaced_one_interval_apart_without_a_burst() {
        let mut s = PaceState::default();
        let waits: Vec<u64> = (0..5)
            .map(|i| admitted_wait(s.admit(T0, &ask(&format!("+62812000{i}")))))
            .collect();
        assert_eq!(waits, [0, 12_500, 25_000, 37_500, 50_000]);
        // Idle time is not saved up as a burst.
        assert_eq!(admitted_wait(s.admit(T0 + 10_000_000, &ask("+628129"))), 0);
        assert_eq!(
            admitted_wait(s.admit(T0 + 10_000_000, &ask("+628128"))),
            12_500
        );
    }

    #[test]
    fn a_lower_priority_queues_where_a_higher_one_still_gets_a_slot() {
        let mut s = PaceState::default();
        // Fill the schedule 100 ms ahead.
        for i in 0..8 {
            s.admit(T0, &ask(&format!("+6281200{i}")));
        }
        let batch = Ask {
            horizon_us: 50_000,
            ..ask("+628130")
        };
        match s.admit(T0, &batch) {
            Answer::Queue { wait_us } => assert_eq!(wait_us, 100_000 - 50_000),
            other => panic!("{other:?}"),
        }
        assert_eq!(admitted_wait(s.admit(T0, &ask("+628131"))), 100_000);
    }

    #[test]
    fn a_wait_beyond_the_budget_is_refused_and_changes_nothing() {
        let mut s = PaceState::default();
        let tight = Ask {
            budget_us: 20_000,
            ..ask("+628120")
        };
        for i in 0..2 {
            s.admit(T0, &ask(&format!("+6281300{i}")));
        }
        assert_eq!(
            s.admit(T0, &tight),
            Answer::Refused {
                limit: Limit::Rate,
                retry_us: 25_000
            }
        );
        assert_eq!(admitted_wait(s.admit(T0, &ask("+628140"))), 25_000);
    }

    #[test]
    fn one_recipient_waits_the_pair_interval() {
        let mut s = PaceState::default();
        let pair = Ask {
            pair_us: 6_000_000,
            ..ask("+628120")
        };
        admitted_wait(s.admit(T0, &pair));
        assert_eq!(
            s.admit(T0 + 500_000, &pair),
            Answer::Refused {
                limit: Limit::Pair,
                retry_us: 5_500_000
            }
        );
        assert_eq!(
            s.admit(T0 + 2_000_000, &pair),
            Answer::PairWait { wait_us: 4_000_000 }
        );
        // Another recipient is not held up.
        admitted_wait(s.admit(
            T0 + 1_000_000,
            &Ask {
                pair_us: 6_000_000,
                ..ask("+628121")
            },
        ));
        assert_eq!(admitted_wait(s.admit(T0 + 6_000_000, &pair)), 0);
    }

    #[test]
    fn the_daily_limit_counts_unique_recipients_in_a_rolling_day() {
        let mut s = PaceState::default();
        let limited = |phone| Ask {
            daily_limit: 2,
            ..ask(phone)
        };
        admitted_wait(s.admit(T0, &limited("+628120")));
        admitted_wait(s.admit(T0 + 1_000_000, &limited("+628121")));
        assert_eq!(
            s.admit(T0 + 2_000_000, &limited("+628122")),
            Answer::Refused {
                limit: Limit::Daily,
                retry_us: DAY_US - 2_000_000
            }
        );
        // A recipient already counted goes through, and stays counted from this send.
        assert!(matches!(
            s.admit(T0 + 3_000_000, &limited("+628120")),
            Answer::Admitted { daily_used: 2, .. }
        ));
        // A day after the second recipient's send, its slot is free; the first one's send
        // three seconds in keeps it counted.
        assert!(matches!(
            s.admit(T0 + DAY_US + 1_000_000, &limited("+628122")),
            Answer::Admitted { daily_used: 2, .. }
        ));
    }

    #[test]
    fn customers_inside_their_service_window_do_not_count() {
        let mut s = PaceState::default();
        let limited = |phone| Ask {
            daily_limit: 1,
            ..ask(phone)
        };
        admitted_wait(s.admit(T0, &limited("+628120")));
        s.customer_wrote(T0, "+628121", T0 - 3_600_000_000);
        assert!(matches!(
            s.admit(T0, &limited("+628121")),
            Answer::Admitted { daily_used: 1, .. }
        ));
        // Their window closes a day after they wrote.
        assert!(matches!(
            s.admit(T0 + DAY_US - 3_000_000_000, &limited("+628121")),
            Answer::Refused {
                limit: Limit::Daily,
                ..
            }
        ));
        // A message older than a day opens nothing.
        s.customer_wrote(T0, "+628122", T0 - DAY_US - 1);
        assert!(matches!(
            s.admit(T0, &limited("+628122")),
            Answer::Refused { .. }
        ));
    }

    #[test]
    fn throttling_slows_the_schedule_then_wears_off() {
        let mut s = PaceState::default();
        assert_eq!(s.slow_down(T0), 2);
        // Answers to messages already on their way: the same episode.
        assert_eq!(s.slow_down(T0 + 300_000), 2);
        assert_eq!(s.slow_down(T0 + 1_000_000), 4);
        assert_eq!(s.slow_down(T0 + 2_000_000), 8);
        let t = T0 + 2_000_000;
        assert_eq!(s.slow_down(t + 1_000_000), 8);
        let t = t + 1_000_000;
        // The pause, then slots eight intervals apart.
        assert_eq!(admitted_wait(s.admit(t, &ask("+628120"))), BACKOFF_PAUSE_US);
        assert_eq!(
            admitted_wait(s.admit(t, &ask("+628121"))),
            BACKOFF_PAUSE_US + 8 * 12_500
        );
        let later = t + BACKOFF_WINDOW_US + 1;
        admitted_wait(s.admit(later, &ask("+628122")));
        assert_eq!(admitted_wait(s.admit(later, &ask("+628123"))), 12_500);
    }

    #[test]
    fn a_pair_refusal_from_meta_holds_the_recipient() {
        let mut s = PaceState::default();
        s.block_pair(T0, "+628120", 6_000_000);
        let pair = Ask {
            pair_us: 6_000_000,
            ..ask("+628120")
        };
        assert_eq!(
            s.admit(T0, &pair),
            Answer::Refused {
                limit: Limit::Pair,
                retry_us: 6_000_000
            }
        );
    }
}
