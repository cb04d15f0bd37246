//! Sends counted by template and outcome, for `kabar_messages_total`: what operators look at to
//! see which notification fails. Every send passes the outbox, so this sees SendTemplate, OTP
//! codes and batch items alike.

use std::{collections::BTreeMap, sync::Mutex};

use super::error::Error;

/// `(template, outcome)` pairs kept: template keys come from the registry, but the page must
/// stay bounded whatever the registry holds.
pub const MAX_PAIRS: usize = 256;

/// What became of a send that reached the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Meta accepted it.
    Accepted,
    /// Meta refused it.
    Failed,
    /// No usable answer: it may have been delivered.
    Unknown,
    /// It never went to Meta (pacing, deadline, Meta unreachable, the store).
    NotSent,
}

impl Outcome {
    pub fn of(result: &Result<impl Sized, Error>) -> Outcome {
        match result {
            Ok(_) => Outcome::Accepted,
            Err(e) if e.may_have_been_delivered() => Outcome::Unknown,
            Err(Error::Meta(_)) => Outcome::Failed,
            Err(_) => Outcome::NotSent,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Failed => "failed",
            Outcome::Unknown => "unknown",
            Outcome::NotSent => "not_sent",
        }
    }
}

#[derive(Default)]
pub struct SendTally {
    counts: Mutex<BTreeMap<(String, Outcome), u64>>,
}

impl SendTally {
    pub fn record(&self, template: &str, outcome: Outcome) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&(template.to_owned(), outcome)) {
            *n += 1;
        } else if counts.len() < MAX_PAIRS {
            counts.insert((template.to_owned(), outcome), 1);
        }
    }

    /// `(template, outcome, count)`, in order.
    pub fn snapshot(&self) -> Vec<(String, &'static str, u64)> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|((t, o), n)| (t.clone(), o.label(), *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_what_may_have_been_delivered() {
        let ok: Result<(), Error> = Ok(());
        assert_eq!(Outcome::of(&ok), Outcome::Accepted);
        let unknown: Result<(), Error> = Err(Error::MetaOutcomeUnknown("timeout".into()));
        assert_eq!(Outcome::of(&unknown), Outcome::Unknown);
        let unreachable: Result<(), Error> = Err(Error::MetaUnreachable("refused".into()));
        assert_eq!(Outcome::of(&unreachable), Outcome::NotSent);
    }

    #[test]
    fn counts_stay_bounded() {
        let tally = SendTally::default();
        tally.record("invoice_notification", Outcome::Accepted);
        tally.record("invoice_notification", Outcome::Accepted);
        for i in 0..2 * MAX_PAIRS {
            tally.record(&format!("t{i}"), Outcome::Failed);
        }
        let snapshot = tally.snapshot();
        assert_eq!(snapshot.len(), MAX_PAIRS);
        assert!(snapshot.contains(&("invoice_notification".into(), "accepted", 2)));
    }
}
