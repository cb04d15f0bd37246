//! The rules of a batch run as pure logic: which way an item's state may move, what each state
//! counts toward, when a batch is finished, which failures stop the whole run. The in-process
//! store applies these functions as they are; the Redis scripts (`store/redis/batch.rs`) encode
//! the same tables, and the integration tests run the same cases against both.

use std::time::Duration;

use crate::{
    domain::{error::Error, reason::Reason, status::State},
    whatsapp::MetaErrorKind,
};

/// Where one item stands. The numbers are the stored form (the Redis scripts use them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemState {
    /// Waiting for a worker.
    Queued = 1,
    /// A worker is about to call Meta or is calling it: if the worker dies now, nobody can know
    /// whether Meta has the message.
    Sending = 2,
    /// Sent, but no answer came back: never sent again.
    Unknown = 3,
    Accepted = 4,
    Delivered = 5,
    Read = 6,
    Failed = 7,
}

impl ItemState {
    pub const ALL: [ItemState; 7] = [
        ItemState::Queued,
        ItemState::Sending,
        ItemState::Unknown,
        ItemState::Accepted,
        ItemState::Delivered,
        ItemState::Read,
        ItemState::Failed,
    ];

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(n: u8) -> Option<ItemState> {
        ItemState::ALL.into_iter().find(|s| s.as_u8() == n)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Queued => "queued",
            ItemState::Sending => "sending",
            ItemState::Unknown => "unknown",
            ItemState::Accepted => "accepted",
            ItemState::Delivered => "delivered",
            ItemState::Read => "read",
            ItemState::Failed => "failed",
        }
    }

    /// What the item adds to each count of its batch.
    pub fn counts(self) -> Counts {
        let mut c = Counts::default();
        match self {
            ItemState::Queued | ItemState::Sending => c.queued = 1,
            ItemState::Unknown => c.unknown = 1,
            ItemState::Accepted => c.accepted = 1,
            ItemState::Delivered => {
                c.accepted = 1;
                c.delivered = 1;
            }
            ItemState::Read => {
                c.accepted = 1;
                c.delivered = 1;
                c.read = 1;
            }
            ItemState::Failed => c.failed = 1,
        }
        c
    }

    /// Where a webhook status moves an item whose message it is.
    pub fn of_status(state: State) -> ItemState {
        match state {
            State::Accepted | State::Sent => ItemState::Accepted,
            State::Delivered => ItemState::Delivered,
            State::Read => ItemState::Read,
            State::Failed => ItemState::Failed,
        }
    }
}

/// Whether an item may move from `from` to `to`. States move forward only: queued, sending,
/// unknown, accepted, delivered, read. An unknown item that turns out accepted (a late answer,
/// or a webhook status of its message) moves on; an accepted message that Meta later reports
/// failed becomes failed, but nothing moves after failed, delivered or read back to failed.
/// (Giving a sending item back to the queue is not a move: only its owner does it, when the
/// message certainly did not go out.)
pub fn may_move(from: ItemState, to: ItemState) -> bool {
    use ItemState::*;
    match (from, to) {
        (Failed, _) => false,
        (_, Failed) => matches!(from, Queued | Sending | Unknown | Accepted),
        (_, Queued) => false,
        _ => to.as_u8() > from.as_u8(),
    }
}

/// The counts of a batch. Every item is in exactly one of queued, accepted, failed and unknown,
/// so these add up to total; delivered and read are among the accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub queued: u64,
    pub accepted: u64,
    pub failed: u64,
    pub unknown: u64,
    pub delivered: u64,
    pub read: u64,
}

impl Counts {
    /// The counts after one item moved from `from` to `to`.
    pub fn moved(mut self, from: ItemState, to: ItemState) -> Counts {
        let (a, b) = (from.counts(), to.counts());
        let step = |n: &mut u64, out: u64, into: u64| *n = (*n + into).saturating_sub(out);
        step(&mut self.queued, a.queued, b.queued);
        step(&mut self.accepted, a.accepted, b.accepted);
        step(&mut self.failed, a.failed, b.failed);
        step(&mut self.unknown, a.unknown, b.unknown);
        step(&mut self.delivered, a.delivered, b.delivered);
        step(&mut self.read, a.read, b.read);
        self
    }
}

/// Where a batch stands. The numbers are the stored form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchState {
    /// Created; no item taken yet.
    Open = 1,
    Running = 2,
    /// Closed (`last`) and every item settled.
    Done = 3,
    Cancelled = 4,
    /// Stopped by a refusal that would hit every item, until ResumeBatch.
    Paused = 5,
}

impl BatchState {
    pub fn from_u8(n: u8) -> Option<BatchState> {
        Some(match n {
            1 => BatchState::Open,
            2 => BatchState::Running,
            3 => BatchState::Done,
            4 => BatchState::Cancelled,
            5 => BatchState::Paused,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Open => "OPEN",
            BatchState::Running => "RUNNING",
            BatchState::Done => "DONE",
            BatchState::Cancelled => "CANCELLED",
            BatchState::Paused => "PAUSED",
        }
    }

    /// DONE and CANCELLED never change again.
    pub fn is_final(self) -> bool {
        matches!(self, BatchState::Done | BatchState::Cancelled)
    }

    /// Whether workers take its items.
    pub fn is_workable(self) -> bool {
        matches!(self, BatchState::Open | BatchState::Running)
    }
}

/// The state a batch is in once its counts are `counts`: a closed batch with nothing queued is
/// done (a paused or cancelled one stays as it is).
pub fn settled_state(state: BatchState, closed: bool, counts: &Counts) -> BatchState {
    if closed && counts.queued == 0 && matches!(state, BatchState::Open | BatchState::Running) {
        BatchState::Done
    } else {
        state
    }
}

/// What a worker does with an item whose send failed, judged by the error alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The whole run would fail the same way: pause the batch (the item goes back to the queue).
    Pause(String),
    /// Nothing went out and a later try may work: back to the queue, try again after the wait.
    Retry(Duration),
    /// Meta may have the message: settled as unknown, never sent again.
    Unknown,
    /// This item only: settled as failed.
    Fail,
}

/// How long an item waits before another try, when the error does not say.
pub const RETRY_WAIT: Duration = Duration::from_secs(2);
/// The longest a replica holds a batch back after a failure that a later try may fix: Meta's
/// waits can be long, and the run should notice soon when they end.
pub const MAX_HOLD: Duration = Duration::from_secs(30);

/// Judges a failed send of a batch item.
pub fn judge(error: &Error) -> Failure {
    if error.may_have_been_delivered() {
        return Failure::Unknown;
    }
    match error {
        Error::Meta(f) => match f.kind {
            MetaErrorKind::Configuration if f.reason != Reason::MetaReengagementRequired => {
                Failure::Pause(format!(
                    "{}: Meta error {}: {}. {}",
                    f.reason, f.meta_code, f.details, f.remedy
                ))
            }
            // A template whose parameter count differs from Meta's fails every item alike.
            MetaErrorKind::InvalidArgument
                if f.reason == Reason::MetaTemplateParamCountMismatch =>
            {
                Failure::Pause(format!(
                    "{}: Meta error {}: {}. {}",
                    f.reason, f.meta_code, f.details, f.remedy
                ))
            }
            // Meta holds marketing-style messages to this one user for a day: the item fails,
            // the run goes on.
            MetaErrorKind::RateLimited if f.reason == Reason::MetaUserMarketingLimit => {
                Failure::Fail
            }
            MetaErrorKind::RateLimited | MetaErrorKind::Unavailable => {
                Failure::Retry(f.retry_after.unwrap_or(RETRY_WAIT).min(MAX_HOLD))
            }
            MetaErrorKind::Configuration
            | MetaErrorKind::InvalidArgument
            | MetaErrorKind::RecipientUndeliverable
            | MetaErrorKind::Unclassified => Failure::Fail,
        },
        Error::WhatsAppDisabled => Failure::Pause(format!(
            "{}: {}",
            Reason::WhatsappDisabled,
            Error::WhatsAppDisabled
        )),
        Error::Limited { retry_after, .. } => {
            Failure::Retry((*retry_after).clamp(RETRY_WAIT / 4, MAX_HOLD))
        }
        Error::MetaUnreachable(_)
        | Error::StoreUnavailable(_)
        | Error::DeadlineExceeded { .. }
        | Error::IdempotencyInFlight => Failure::Retry(RETRY_WAIT),
        Error::InvalidArgument(_)
        | Error::MetaOutcomeUnknown(_)
        | Error::CountryNotAllowed(_)
        | Error::IdempotencyKeyReused
        | Error::MessageNotFound(_)
        | Error::CursorExpired(_)
        | Error::BatchNotFound(_)
        | Error::BatchClosed { .. }
        | Error::Unauthenticated { .. }
        | Error::MissingScope { .. }
        | Error::SettingsRevisionMismatch { .. } => Failure::Fail,
    }
}

/// Seconds left for `queued` items at `rate` messages a second (rounded up; 0 when nothing is
/// queued or nothing is sent).
pub fn eta_seconds(queued: u64, rate: f64) -> u64 {
    if queued == 0 || rate.is_nan() || rate <= 0.0 {
        return 0;
    }
    (queued as f64 / rate).ceil() as u64
}

/// Why a running batch's items cannot all go out now, from Meta's daily limit of unique
/// recipients (`limit` 0: unlimited): used up, or too little left for what is queued.
pub fn daily_hold(queued: u64, used: u64, limit: u64) -> Option<String> {
    if limit == 0 || queued == 0 {
        return None;
    }
    let left = limit.saturating_sub(used);
    if left == 0 {
        Some(format!(
            "DAILY_LIMIT_REACHED: Meta's daily limit of {limit} unique recipients is used up; \
             items wait until recipients leave the rolling 24 hours (recipients already reached \
             today still get theirs)"
        ))
    } else if queued > left {
        Some(format!(
            "DAILY_LIMIT_REACHED soon: {queued} items are queued and {left} of Meta's daily limit \
             of {limit} unique recipients are left; the rest wait for the rolling 24 hours"
        ))
    } else {
        None
    }
}

/// Longest batch id, in characters.
pub const MAX_BATCH_ID: usize = 128;

/// Checks a caller's batch id: 1 to 128 of `A-Z a-z 0-9 . _ : -` (safe in a Redis key and a log).
pub fn check_batch_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("is required, e.g. invoices-2026-12");
    }
    if id.len() > MAX_BATCH_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err("must be 1 to 128 of A-Z a-z 0-9 . _ : - (e.g. invoices-2026-12)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ItemState::*;

    #[test]
    fn states_move_forward_only() {
        assert!(may_move(Queued, Sending));
        assert!(may_move(Sending, Accepted));
        assert!(may_move(Sending, Unknown));
        assert!(may_move(Unknown, Accepted));
        assert!(may_move(Unknown, Delivered));
        assert!(may_move(Accepted, Read));
        assert!(may_move(Accepted, Failed));
        assert!(may_move(Queued, Failed));
        assert!(!may_move(Accepted, Unknown));
        assert!(!may_move(Accepted, Accepted));
        assert!(!may_move(Read, Delivered));
        assert!(!may_move(Delivered, Failed));
        assert!(!may_move(Failed, Accepted));
        assert!(!may_move(Sending, Queued));
        // Webhook statuses: `sent` is still accepted for the batch; the rest move it on.
        assert_eq!(ItemState::of_status(State::Sent), Accepted);
        assert_eq!(ItemState::of_status(State::Read), Read);
        assert!(may_move(Unknown, ItemState::of_status(State::Delivered)));
        assert!(!may_move(Delivered, ItemState::of_status(State::Failed)));
        for s in ItemState::ALL {
            assert_eq!(ItemState::from_u8(s.as_u8()), Some(s));
        }
    }

    #[test]
    fn counts_always_add_up() {
        let mut counts = Counts {
            total: 3,
            queued: 3,
            ..Counts::default()
        };
        let path = [
            (Queued, Sending),
            (Sending, Unknown),
            (Unknown, Read),
            (Queued, Failed),
            (Queued, Sending),
            (Sending, Accepted),
            (Accepted, Failed),
        ];
        for (from, to) in path {
            assert!(may_move(from, to), "{from:?} -> {to:?}");
            counts = counts.moved(from, to);
            assert_eq!(
                counts.queued + counts.accepted + counts.failed + counts.unknown,
                counts.total,
                "{counts:?}"
            );
            assert!(counts.read <= counts.delivered && counts.delivered <= counts.accepted);
        }
        assert_eq!(
            counts,
            Counts {
                total: 3,
                queued: 0,
                accepted: 1,
                failed: 2,
                unknown: 0,
                delivered: 1,
                read: 1,
            }
        );
    }

    #[test]
    fn a_closed_batch_with_nothing_queued_is_done() {
        let empty = Counts::default();
        let busy = Counts {
            total: 1,
            queued: 1,
            ..Counts::default()
        };
        assert_eq!(
            settled_state(BatchState::Running, true, &empty),
            BatchState::Done
        );
        assert_eq!(
            settled_state(BatchState::Running, false, &empty),
            BatchState::Running
        );
        assert_eq!(
            settled_state(BatchState::Running, true, &busy),
            BatchState::Running
        );
        assert_eq!(
            settled_state(BatchState::Paused, true, &empty),
            BatchState::Paused
        );
    }

    #[test]
    fn failures_that_hit_every_item_pause_the_run() {
        use crate::whatsapp::{MetaErrorBody, SendContext, classify};
        let meta = |code: i64, status: u16| {
            let body: MetaErrorBody = serde_json::from_value(serde_json::json!({
                "error": {"message": "x", "type": "OAuthException", "code": code}
            }))
            .unwrap();
            let ctx = SendContext {
                template: "invoice",
                language: "id",
            };
            Error::Meta(classify(status, Some(&body.error), &ctx))
        };
        for code in [132001, 132015, 132016, 190, 133010, 132000] {
            assert!(
                matches!(judge(&meta(code, 400)), Failure::Pause(_)),
                "{code}"
            );
        }
        assert_eq!(judge(&meta(131026, 400)), Failure::Fail);
        assert_eq!(judge(&meta(131047, 400)), Failure::Fail);
        assert_eq!(judge(&meta(131049, 400)), Failure::Fail);
        let Failure::Retry(wait) = judge(&meta(80007, 400)) else {
            panic!("80007 is tried again")
        };
        assert!(wait <= MAX_HOLD);
        assert!(matches!(judge(&meta(130429, 400)), Failure::Retry(_)));
        assert!(matches!(judge(&meta(131000, 500)), Failure::Retry(_)));
        assert_eq!(
            judge(&Error::MetaOutcomeUnknown("timeout".into())),
            Failure::Unknown
        );
        assert!(matches!(judge(&Error::WhatsAppDisabled), Failure::Pause(_)));
        assert!(matches!(
            judge(&Error::MetaUnreachable("refused".into())),
            Failure::Retry(_)
        ));
    }

    #[test]
    fn eta_rounds_up_and_never_divides_by_zero() {
        assert_eq!(eta_seconds(0, 80.0), 0);
        assert_eq!(eta_seconds(100, 0.0), 0);
        assert_eq!(eta_seconds(161, 80.0), 3);
        assert_eq!(eta_seconds(100_000, 980.0), 103);
    }

    #[test]
    fn the_daily_limit_holding_a_run_is_said() {
        assert_eq!(daily_hold(100, 10, 0), None);
        assert_eq!(daily_hold(0, 250, 250), None);
        assert_eq!(daily_hold(100, 10, 250), None);
        assert!(daily_hold(50, 250, 250).unwrap().contains("used up"));
        assert!(daily_hold(300, 0, 250).unwrap().contains("250 of"));
    }

    #[test]
    fn batch_ids_are_safe_names() {
        assert!(check_batch_id("invoices-2026-12").is_ok());
        assert!(check_batch_id("a.b_c:d").is_ok());
        assert!(check_batch_id("").is_err());
        assert!(check_batch_id("with space").is_err());
        assert!(check_batch_id("{tag}").is_err());
        assert!(check_batch_id(&"x".repeat(129)).is_err());
    }
}
