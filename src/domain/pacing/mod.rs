//! Pacing: every message leaves within Meta's limits for the business number, whatever the number
//! of replicas. One step of the send pipeline (`outbox`), between idempotency and the send.
//!
//! - a global rate (`KABAR_META_MAX_MPS`), shared through the store's one schedule;
//! - priorities: OTP codes first, single SendTemplate calls next, batch items last;
//! - the pair interval per recipient (`KABAR_PAIR_INTERVAL_SECONDS`);
//! - the daily limit of unique recipients (`KABAR_META_DAILY_LIMIT`, else Meta's, else 250);
//! - Meta's throttling answers slow everyone down for a while.
//!
//! A send that must wait waits for its slot when its deadline allows; otherwise it is refused at
//! once with the time a slot frees, and is never sent later. When the shared store (Redis) is
//! unreachable, each process paces alone at its share of the limits.

mod gather;
pub mod rules;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use self::rules::{Answer, Ask, Limit};
use super::{
    error::Error,
    ports::{PacingStore, StoreError},
    reason::Reason,
};
use crate::whatsapp::MetaFailure;

/// Who is waiting for a slot, highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A customer is waiting for a login code.
    Otp = 0,
    /// One SendTemplate call.
    Single = 1,
    /// An item of a batch run.
    Batch = 2,
}

const PRIORITIES: [&str; 3] = ["otp", "single", "batch"];

impl Priority {
    /// How far ahead of now a send of this priority may take a slot. When the schedule is full
    /// further than this, the send waits its turn in this process and asks again, so that a
    /// higher priority arriving meanwhile waits at most the lower horizons.
    fn horizon(self) -> Duration {
        match self {
            Priority::Otp => Duration::MAX,
            Priority::Single => Duration::from_millis(500),
            Priority::Batch => Duration::from_millis(100),
        }
    }
}

/// The time kept for the send itself after a slot: a slot closer to the deadline than this
/// would leave the request to Meta no time to be answered.
const SEND_MARGIN: Duration = Duration::from_millis(200);

/// The share of `KABAR_META_MAX_MPS` that pacing fills. Slots are spaced exactly, but messages
/// reach Meta a few milliseconds early or late (scheduling, connections, the network): at the
/// full rate, one late message and one on time could put one more than the cap into some second.
pub const HEADROOM: f64 = 0.98;

/// How often a process pacing alone (the store unreachable) tries the shared schedule again.
const SHARED_RETRY: Duration = Duration::from_secs(1);

/// How often Meta's messaging limit is read again, and retried after a failure.
const LIMIT_REFRESH: Duration = Duration::from_secs(3600);
const LIMIT_RETRY: Duration = Duration::from_secs(60);
/// How often the daily count shown in the metrics is read from the store.
const DAILY_REFRESH: Duration = Duration::from_secs(5);

/// Meta's default messaging limit when it cannot be asked.
pub const DEFAULT_DAILY_LIMIT: u64 = 250;

/// The settings of pacing.
#[derive(Debug, Clone)]
pub struct PacingConfig {
    /// `false` only for measurements: every send goes at once.
    pub enabled: bool,
    /// Messages per second to Meta for the number, all replicas together.
    pub max_mps: u32,
    pub pair_interval: Duration,
    /// `KABAR_META_DAILY_LIMIT`: `Some(0)` is unlimited; `None` asks Meta.
    pub daily_limit: Option<u64>,
    /// The longest wait for a call that set no deadline.
    pub max_wait: Duration,
    /// Replicas sharing the limits: the share each paces at when the store is unreachable.
    pub fallback_replicas: u32,
}

/// Meta's messaging limit tier (`TIER_250`, `TIER_2K`, `TIER_100K`, `TIER_UNLIMITED`) as a number
/// of unique recipients per 24 hours, 0 for unlimited; `None` for a spelling kabar does not know.
pub fn parse_tier(tier: &str) -> Option<u64> {
    let value = tier.trim().strip_prefix("TIER_")?;
    if value == "UNLIMITED" {
        return Some(0);
    }
    let (digits, unit) = match value.as_bytes().last()? {
        b'K' => (&value[..value.len() - 1], 1_000),
        b'M' => (&value[..value.len() - 1], 1_000_000),
        _ => (value, 1),
    };
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<u64>()
        .ok()
        .map(|n| n * unit)
        .filter(|&n| n > 0)
}

/// Where the daily limit in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    Configured = 0,
    Meta = 1,
    Default = 2,
}

const SOURCES: [&str; 3] = ["configured", "meta", "default"];

/// Upper bounds of the wait buckets, in seconds.
pub const WAIT_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Stats {
    admitted: [AtomicU64; 3],
    waits: [AtomicU64; WAIT_BUCKETS.len() + 1],
    wait_micros: AtomicU64,
    refused: [AtomicU64; 3],
    throttled: AtomicU64,
    daily_used: AtomicU64,
    /// Admissions in the current and the previous second of this process.
    second: AtomicU64,
    this_second: AtomicU64,
    last_second: AtomicU64,
}

/// What pacing shows operators (`/metrics`, `/readyz`).
#[derive(Debug, Clone)]
pub struct PacingSnapshot {
    pub enabled: bool,
    /// `shared` (Redis), `process` (the in-process store), `local` (Redis unreachable).
    pub mode: &'static str,
    pub max_mps: u32,
    /// The rate this process paces at now (its share while pacing alone).
    pub effective_mps: f64,
    /// Sends this process admitted in the last whole second.
    pub sent_last_second: u64,
    pub admitted: [(&'static str, u64); 3],
    /// Cumulative wait histogram: (upper bound, count), then the total and the sum in seconds.
    pub waits: Vec<(f64, u64)>,
    pub wait_count: u64,
    pub wait_seconds: f64,
    pub refused: [(&'static str, u64); 3],
    pub throttled: u64,
    pub daily_used: u64,
    /// 0 when unlimited.
    pub daily_limit: u64,
    pub daily_limit_source: &'static str,
}

pub struct Pacer {
    config: PacingConfig,
    /// The business number's phone number ID: whose schedule this is.
    number: String,
    shared: Arc<dyn PacingStore>,
    /// The per-process schedule used while `shared` (Redis) is unreachable; `None` when
    /// `shared` is already in-process.
    fallback: Option<Arc<dyn PacingStore>>,
    /// Gathers this process's admissions into batches for the shared store (Redis).
    gatherer: Option<Arc<gather::Gatherer>>,
    /// While this process paces alone: when the shared schedule is tried again.
    alone: Mutex<Option<Instant>>,
    /// The backoff factor last logged, and when.
    throttle_logged: Mutex<Option<(u64, Instant)>>,
    /// The shared daily count last seen before this process began pacing alone.
    used_when_alone: AtomicU64,
    daily_limit: AtomicU64,
    limit_source: AtomicU8,
    /// The last daily-limit warning given: 0, 80 or 100 (percent).
    warned: AtomicU8,
    /// Per priority: one caller polls the schedule at a time; the others queue here.
    turns: [tokio::sync::Mutex<()>; 3],
    /// Per priority: callers of this process waiting for a slot beyond their horizon.
    waiting: [AtomicUsize; 3],
    /// Per recipient: callers of this process waiting for the pair interval to end.
    pair_waiting: Mutex<std::collections::HashMap<String, u32>>,
    stats: Stats,
}

impl Pacer {
    pub fn new(
        config: PacingConfig,
        number: String,
        shared: Arc<dyn PacingStore>,
        fallback: Option<Arc<dyn PacingStore>>,
    ) -> Self {
        let (limit, source) = match config.daily_limit {
            Some(limit) => (limit, LimitSource::Configured),
            None => (DEFAULT_DAILY_LIMIT, LimitSource::Default),
        };
        let gatherer = fallback
            .is_some()
            .then(|| gather::Gatherer::new(shared.clone(), number.clone()));
        Pacer {
            config,
            number,
            shared,
            fallback,
            gatherer,
            alone: Mutex::new(None),
            throttle_logged: Mutex::new(None),
            used_when_alone: AtomicU64::new(0),
            daily_limit: AtomicU64::new(limit),
            limit_source: AtomicU8::new(source as u8),
            warned: AtomicU8::new(0),
            turns: Default::default(),
            waiting: Default::default(),
            pair_waiting: Mutex::default(),
            stats: Stats::default(),
        }
    }

    /// Whether the daily limit should be read from Meta (none is configured).
    pub fn wants_meta_limit(&self) -> bool {
        self.config.enabled && self.config.daily_limit.is_none()
    }

    /// Meta's messaging limit for the number (0: unlimited), unless one is configured.
    pub fn set_meta_daily_limit(&self, limit: u64) {
        if self.config.daily_limit.is_some() {
            return;
        }
        let old = self.daily_limit.swap(limit, Ordering::Relaxed);
        self.limit_source
            .store(LimitSource::Meta as u8, Ordering::Relaxed);
        if old != limit {
            tracing::info!(
                daily_limit = limit,
                "daily limit of unique recipients read from Meta (0 is unlimited)"
            );
        }
    }

    /// Keeps what pacing knows current until `shutdown`: Meta's messaging limit (unless one is
    /// configured), every [`LIMIT_REFRESH`], and the daily count of every replica for the
    /// metrics, every [`DAILY_REFRESH`].
    pub async fn upkeep(
        self: Arc<Self>,
        driver: crate::whatsapp::Driver,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if !self.config.enabled {
            return;
        }
        let mut next_limit = Instant::now();
        loop {
            if self.wants_meta_limit() && Instant::now() >= next_limit {
                next_limit = Instant::now() + LIMIT_REFRESH;
                match driver.messaging_limit().await {
                    None => {}
                    Some(Ok(tier)) => match parse_tier(&tier) {
                        Some(limit) => self.set_meta_daily_limit(limit),
                        None => tracing::warn!(
                            tier = %crate::domain::error::echo(&tier),
                            "Meta answered a messaging limit kabar does not know; the daily \
                             limit stays as it was (set KABAR_META_DAILY_LIMIT to choose it)"
                        ),
                    },
                    Some(Err(e)) => {
                        next_limit = Instant::now() + LIMIT_RETRY;
                        tracing::warn!(
                            error = %e,
                            daily_limit = self.daily_limit.load(Ordering::Relaxed),
                            "could not read the number's messaging limit from Meta; the daily \
                             limit stays as it was (set KABAR_META_DAILY_LIMIT to choose it)"
                        );
                    }
                }
            }
            self.refresh_daily_used().await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(DAILY_REFRESH) => {}
            }
        }
    }

    /// Waits for this message's slot, or refuses it when the slot is later than the deadline
    /// allows (or the daily limit is reached). After `Ok`, the message goes out now.
    pub async fn admit(
        &self,
        phone: &str,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        if !self.config.enabled {
            return Ok(());
        }
        let start = Instant::now();
        let end = deadline
            .unwrap_or(start + self.config.max_wait)
            .checked_sub(SEND_MARGIN)
            .unwrap_or(start);
        let p = priority as usize;
        let mut turn: Option<Waiting<'_>> = None;
        let mut pair_turn: Option<PairWaiting<'_>> = None;
        loop {
            let mut horizon = priority.horizon();
            let mut ahead = Duration::ZERO;
            if turn.is_none() {
                let waiting = self.waiting[p].load(Ordering::Relaxed);
                if waiting > 0 {
                    // Others of this priority wait here for slots: a newcomer only takes a slot
                    // free now, and is refused at once when its slot, behind theirs, cannot
                    // fit its deadline.
                    horizon = Duration::ZERO;
                    ahead = self.interval() * waiting as u32;
                }
            }
            let budget = end.saturating_duration_since(Instant::now());
            match self.ask(phone, horizon, end, ahead).await? {
                Answer::Admitted {
                    wait_us,
                    daily_used,
                } => {
                    drop(turn);
                    drop(pair_turn);
                    if daily_used > 0 {
                        self.note_daily(daily_used);
                    }
                    tokio::time::sleep(Duration::from_micros(wait_us)).await;
                    self.count_admitted(priority, start.elapsed());
                    return Ok(());
                }
                Answer::Queue { wait_us } => {
                    if turn.is_none() {
                        turn = Some(self.wait_turn(priority, end).await?);
                        continue;
                    }
                    tokio::time::sleep(Duration::from_micros(wait_us.max(100)).min(budget)).await;
                }
                Answer::PairWait { wait_us } => {
                    // The rate schedule is not this caller's to hold while it waits for the
                    // recipient: others of its priority go on.
                    turn = None;
                    // Others of this process waiting for the same recipient go first, one
                    // pair interval each: a wait that cannot fit behind them is refused now,
                    // and the others wake one interval apart instead of racing.
                    let wait = Duration::from_micros(wait_us);
                    let ahead = match &pair_turn {
                        Some(_) => 0,
                        None => {
                            let (waiting, ahead) = self.wait_for_pair(phone);
                            pair_turn = Some(waiting);
                            ahead
                        }
                    };
                    let behind = wait + self.config.pair_interval * ahead;
                    if behind > budget {
                        return Err(self.refuse(Limit::Pair, behind));
                    }
                    tokio::time::sleep(behind).await;
                }
                Answer::Refused { limit, retry_us } => {
                    let retry = Duration::from_micros(retry_us);
                    return Err(self.refuse(
                        limit,
                        if limit == Limit::Rate {
                            retry + ahead
                        } else {
                            retry
                        },
                    ));
                }
            }
        }
    }

    /// Waits for this process's turn to poll the schedule at `priority`, until `end`. The
    /// caller counts as waiting until the turn is dropped.
    async fn wait_turn(&self, priority: Priority, end: Instant) -> Result<Waiting<'_>, Error> {
        let p = priority as usize;
        self.waiting[p].fetch_add(1, Ordering::Relaxed);
        let counted = Counted(&self.waiting[p]);
        match tokio::time::timeout_at(end.into(), self.turns[p].lock()).await {
            Ok(guard) => Ok(Waiting {
                _guard: guard,
                _counted: counted,
            }),
            Err(_) => Err(self.refuse(Limit::Rate, self.interval() * 2)),
        }
    }

    /// Counts this caller as waiting for `phone`'s pair interval; answers how many of this
    /// process were waiting for it already.
    fn wait_for_pair(&self, phone: &str) -> (PairWaiting<'_>, u32) {
        let mut waiting = lock(&self.pair_waiting);
        let count = waiting.entry(phone.to_owned()).or_insert(0);
        let ahead = *count;
        *count += 1;
        (
            PairWaiting {
                pacer: self,
                phone: phone.to_owned(),
            },
            ahead,
        )
    }

    /// Meta refused a send for one of its rate limits: learn from it. Returns whether the send
    /// may be tried again (through pacing, within its deadline).
    pub async fn meta_refused(&self, failure: &MetaFailure, phone: &str) -> bool {
        if !self.config.enabled {
            return false;
        }
        match failure.meta_code {
            // Throughput of the number, the business account's and the app's rate limits.
            130429 | 80007 | 4 => {
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                let factor = self.with_store(Op::SlowDown).await.unwrap_or(2);
                // Once per step of the backoff: the answers of one episode say nothing new.
                let now = Instant::now();
                let last = lock(&self.throttle_logged).replace((factor, now));
                if last.is_some_and(|(f, at)| {
                    f == factor
                        && now.duration_since(at) < Duration::from_micros(rules::BACKOFF_WINDOW_US)
                }) {
                    return true;
                }
                tracing::warn!(
                    meta_code = failure.meta_code,
                    slow_down = factor,
                    "Meta throttled the number: every replica sends at 1/{factor} of \
                     KABAR_META_MAX_MPS for the next {} s",
                    rules::BACKOFF_WINDOW_US / 1_000_000
                );
                true
            }
            // With the pair interval switched off (0), so is learning it from Meta.
            131056 if !self.config.pair_interval.is_zero() => {
                let hold = failure
                    .retry_after
                    .unwrap_or_default()
                    .max(self.config.pair_interval);
                let _ = self.with_store(Op::BlockPair(phone, hold)).await;
                true
            }
            _ => false,
        }
    }

    /// Customers wrote to the business: they are inside their service window.
    pub async fn customers_wrote(&self, customers: &[(String, u64)]) {
        if !self.config.enabled || customers.is_empty() {
            return;
        }
        if let Err(e) = self.with_store(Op::CustomersWrote(customers)).await {
            tracing::warn!(error = %e, "could not record customers' service windows");
        }
    }

    /// Refreshes the daily count shown in metrics (other replicas' sends included).
    pub async fn refresh_daily_used(&self) {
        if let Ok(used) = self.with_store(Op::DailyUsed).await {
            self.stats.daily_used.store(used, Ordering::Relaxed);
        }
    }

    /// Time between two slots: the configured rate less [`HEADROOM`].
    fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / (f64::from(self.config.max_mps.max(1)) * HEADROOM))
    }

    /// The ask for a slot now: within `end` less the slots of the `ahead` waiters, and at most
    /// `horizon` ahead.
    fn ask_for<'a>(
        &self,
        phone: &'a str,
        horizon: Duration,
        end: Instant,
        ahead: Duration,
    ) -> Ask<'a> {
        let budget = end
            .saturating_duration_since(Instant::now())
            .saturating_sub(ahead);
        let horizon = horizon.min(budget);
        Ask {
            phone,
            interval_us: (self.interval().as_micros() as u64).max(1),
            horizon_us: horizon.as_micros().min(u128::from(u64::MAX)) as u64,
            budget_us: budget.as_micros() as u64,
            pair_us: self.config.pair_interval.as_micros() as u64,
            daily_limit: self.daily_limit.load(Ordering::Relaxed),
        }
    }

    /// One admission, on the shared schedule, or on this process's own share of it while the
    /// shared one is unreachable. After a failed shared ask, the time the failure took counts
    /// (a stalled Redis answers after its timeout).
    async fn ask(
        &self,
        phone: &str,
        horizon: Duration,
        end: Instant,
        ahead: Duration,
    ) -> Result<Answer, Error> {
        let (Some(fallback), Some(gatherer)) = (&self.fallback, &self.gatherer) else {
            let ask = self.ask_for(phone, horizon, end, ahead);
            return one(self.shared.admit(&self.number, &[ask]).await).map_err(Error::from);
        };
        if !self.pacing_alone() {
            let ask = self.ask_for(phone, horizon, end, ahead);
            match gatherer.admit(&ask).await {
                Ok(answer) => {
                    self.shared_answered();
                    return Ok(answer);
                }
                Err(e) => self.go_alone(&e.0),
            }
        }
        let ask = self.ask_for(phone, horizon, end, ahead);
        let share = u64::from(self.config.fallback_replicas.max(1));
        let alone = Ask {
            interval_us: ask.interval_us * share,
            // What was left of the shared limit when last seen, shared out: the recipients
            // this process admits alone are not in the shared count.
            daily_limit: match ask.daily_limit {
                0 => 0,
                n => {
                    (n.saturating_sub(self.used_when_alone.load(Ordering::Relaxed)) / share).max(1)
                }
            },
            ..ask
        };
        one(fallback.admit(&self.number, &[alone]).await).map_err(Error::from)
    }

    /// Whether this process paces alone now. Once the retry time has come, the shared schedule
    /// is tried again; pacing alone ends only when it answers ([`Self::shared_answered`]).
    fn pacing_alone(&self) -> bool {
        lock(&self.alone).is_some_and(|retry| Instant::now() < retry)
    }

    fn shared_answered(&self) {
        if lock(&self.alone).take().is_some() {
            tracing::info!("the shared pacing schedule (Redis) answers again");
        }
    }

    fn go_alone(&self, error: &str) {
        let already = lock(&self.alone)
            .replace(Instant::now() + SHARED_RETRY)
            .is_some();
        if !already {
            self.used_when_alone.store(
                self.stats.daily_used.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            tracing::warn!(
                error,
                replicas = self.config.fallback_replicas,
                "the shared pacing schedule (Redis) is unreachable: this process paces alone at \
                 KABAR_META_MAX_MPS / KABAR_PACING_REPLICAS until it answers"
            );
        }
    }

    /// Runs `op` on the shared schedule, or on the fallback while pacing alone.
    async fn with_store(&self, op: Op<'_>) -> Result<u64, StoreError> {
        if let Some(fallback) = &self.fallback {
            if self.pacing_alone() {
                return op.run(fallback.as_ref(), &self.number).await;
            }
            match op.run(self.shared.as_ref(), &self.number).await {
                Ok(v) => {
                    self.shared_answered();
                    Ok(v)
                }
                Err(e) => {
                    self.go_alone(&e.0);
                    op.run(fallback.as_ref(), &self.number).await
                }
            }
        } else {
            op.run(self.shared.as_ref(), &self.number).await
        }
    }

    fn refuse(&self, limit: Limit, retry: Duration) -> Error {
        let retry_after = Duration::from_millis(retry.as_millis().max(1) as u64);
        let message = match limit {
            Limit::Rate => format!(
                "kabar sends at most {} messages/s to Meta for this number \
                     (KABAR_META_MAX_MPS) and no slot is free before the call's deadline",
                self.config.max_mps
            ),
            Limit::Pair => "this recipient was sent a message moments ago, and Meta allows about \
                            one message every 6 s to one recipient (KABAR_PAIR_INTERVAL_SECONDS)"
                .to_owned(),
            Limit::Daily => {
                let limit = self.daily_limit.load(Ordering::Relaxed);
                self.stats.daily_used.store(limit, Ordering::Relaxed);
                self.warn_daily(100, limit, limit);
                format!(
                    "the daily limit of {limit} unique recipients in 24 hours is reached \
                     (Meta's messaging limit for this number); recipients already sent to \
                     today still go through, new ones when the oldest drops out of the window"
                )
            }
        };
        self.stats.refused[limit as usize].fetch_add(1, Ordering::Relaxed);
        Error::Limited {
            reason: reason_of(limit),
            message: format!(
                "{message}; retry in {:.1} s",
                retry_after.as_secs_f64().max(0.1)
            ),
            retry_after,
        }
    }

    fn count_admitted(&self, priority: Priority, waited: Duration) {
        let s = &self.stats;
        s.admitted[priority as usize].fetch_add(1, Ordering::Relaxed);
        let seconds = waited.as_secs_f64();
        let bucket = WAIT_BUCKETS
            .iter()
            .position(|&upper| seconds <= upper)
            .unwrap_or(WAIT_BUCKETS.len());
        s.waits[bucket].fetch_add(1, Ordering::Relaxed);
        s.wait_micros
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        let second = crate::store::now_ms() / 1000;
        let current = s.second.load(Ordering::Relaxed);
        if current != second && s.second.swap(second, Ordering::Relaxed) == current {
            let previous = s.this_second.swap(0, Ordering::Relaxed);
            s.last_second.store(
                if second == current + 1 { previous } else { 0 },
                Ordering::Relaxed,
            );
        }
        s.this_second.fetch_add(1, Ordering::Relaxed);
    }

    fn note_daily(&self, used: u64) {
        self.stats.daily_used.store(used, Ordering::Relaxed);
        let limit = self.daily_limit.load(Ordering::Relaxed);
        if limit == 0 {
            return;
        }
        let level = if used >= limit {
            100
        } else if used * 5 >= limit * 4 {
            80
        } else {
            0
        };
        self.warn_daily(level, used, limit);
    }

    /// Warns once when the daily count first reaches 80% and 100% of the limit.
    fn warn_daily(&self, level: u8, used: u64, limit: u64) {
        let before = self.warned.swap(level, Ordering::Relaxed);
        if level > before {
            tracing::warn!(
                used,
                limit,
                "{level}% of the daily limit of unique recipients is used: past it, messages \
                 to new recipients are refused (DAILY_LIMIT_REACHED) until the oldest drop out \
                 of the 24-hour window"
            );
        }
    }

    pub fn snapshot(&self) -> PacingSnapshot {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut cumulative = 0;
        let waits = WAIT_BUCKETS
            .iter()
            .zip(&s.waits)
            .map(|(upper, count)| {
                cumulative += load(count);
                (*upper, cumulative)
            })
            .collect();
        let alone = lock(&self.alone).is_some();
        let mode = match (&self.fallback, alone) {
            _ if !self.config.enabled => "off",
            (None, _) => "process",
            (Some(_), false) => "shared",
            (Some(_), true) => "local",
        };
        let share = if alone {
            f64::from(self.config.fallback_replicas.max(1))
        } else {
            1.0
        };
        let current_second = crate::store::now_ms() / 1000;
        let second = load(&s.second);
        let sent_last_second = if second + 1 == current_second {
            load(&s.this_second)
        } else if second == current_second {
            load(&s.last_second)
        } else {
            0
        };
        PacingSnapshot {
            enabled: self.config.enabled,
            mode,
            max_mps: self.config.max_mps,
            effective_mps: f64::from(self.config.max_mps) / share,
            sent_last_second,
            admitted: std::array::from_fn(|i| (PRIORITIES[i], load(&s.admitted[i]))),
            wait_count: s.waits.iter().map(load).sum(),
            waits,
            wait_seconds: load(&s.wait_micros) as f64 / 1e6,
            refused: [Limit::Rate, Limit::Pair, Limit::Daily]
                .map(|limit| (reason_of(limit).as_str(), load(&s.refused[limit as usize]))),
            throttled: load(&s.throttled),
            daily_used: load(&s.daily_used),
            daily_limit: self.daily_limit.load(Ordering::Relaxed),
            daily_limit_source: SOURCES[usize::from(self.limit_source.load(Ordering::Relaxed))],
        }
    }
}

/// What callers are told a limit is.
fn reason_of(limit: Limit) -> Reason {
    match limit {
        Limit::Rate => Reason::RateLimited,
        Limit::Pair => Reason::PairRateLimited,
        Limit::Daily => Reason::DailyLimitReached,
    }
}

/// A lock whose data stays whole across a panic (each change under it is one step).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The one answer to a batch of one.
fn one(answers: Result<Vec<Answer>, StoreError>) -> Result<Answer, StoreError> {
    answers?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError("the pacing store gave no answer".into()))
}

/// A store call that is not an admission.
enum Op<'a> {
    SlowDown,
    BlockPair(&'a str, Duration),
    CustomersWrote(&'a [(String, u64)]),
    DailyUsed,
}

impl Op<'_> {
    async fn run(&self, store: &dyn PacingStore, number: &str) -> Result<u64, StoreError> {
        match self {
            Op::SlowDown => store.slow_down(number).await,
            Op::BlockPair(phone, hold) => store.block_pair(number, phone, *hold).await.map(|()| 0),
            Op::CustomersWrote(customers) => {
                store.customers_wrote(number, customers).await.map(|()| 0)
            }
            Op::DailyUsed => store.daily_used(number).await,
        }
    }
}

/// One caller counted as waiting; uncounted when dropped.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A caller counted as waiting for a recipient's pair interval; uncounted when dropped.
struct PairWaiting<'a> {
    pacer: &'a Pacer,
    phone: String,
}

impl Drop for PairWaiting<'_> {
    fn drop(&mut self) {
        let mut waiting = lock(&self.pacer.pair_waiting);
        if let Some(count) = waiting.get_mut(&self.phone) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(&self.phone);
            }
        }
    }
}

/// A caller's turn to poll the schedule for its priority.
struct Waiting<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    _counted: Counted<'a>,
}

#[cfg(test)]
mod tests {
    use super::parse_tier;

    #[test]
    fn meta_tiers_become_numbers() {
        assert_eq!(parse_tier("TIER_250"), Some(250));
        assert_eq!(parse_tier("TIER_2K"), Some(2_000));
        assert_eq!(parse_tier("TIER_100K"), Some(100_000));
        assert_eq!(parse_tier("TIER_UNLIMITED"), Some(0));
        for bad in [
            "",
            "TIER_",
            "TIER_K",
            "TIER_0",
            "250",
            "TIER_-5",
            "TIER_9999999K",
        ] {
            assert_eq!(parse_tier(bad), None, "{bad}");
        }
    }
}
