//! Prometheus metrics for operators, served at `GET /metrics` on `KABAR_HTTP_ADDR`: calls by
//! method and gRPC code, call latency histograms, and the OTP store's reachability. Recording is a
//! few relaxed atomic additions per call, so it costs nothing measurable on the hot path.

use std::{
    fmt::Write,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tonic::Code;

/// The RPCs kabar serves (health and reflection are not counted).
#[derive(Debug, Clone, Copy)]
pub enum Method {
    SendTemplate = 0,
    SendOtp = 1,
    VerifyOtp = 2,
    GetMessageStatus = 3,
    /// Counted when the feed opens (or is refused), not per event.
    WatchMessageStatus = 4,
    SubmitBatch = 5,
    GetBatch = 6,
    /// Counted when the stream opens (or is refused), not per update.
    WatchBatch = 7,
    CancelBatch = 8,
    ResumeBatch = 9,
    ListBatchItems = 10,
    GetSettings = 11,
    UpdateSettings = 12,
}

const METHODS: [&str; 13] = [
    "SendTemplate",
    "SendOtp",
    "VerifyOtp",
    "GetMessageStatus",
    "WatchMessageStatus",
    "SubmitBatch",
    "GetBatch",
    "WatchBatch",
    "CancelBatch",
    "ResumeBatch",
    "ListBatchItems",
    "GetSettings",
    "UpdateSettings",
];

impl Method {
    pub fn name(self) -> &'static str {
        METHODS[self as usize]
    }
}
/// gRPC codes 0..=16.
const CODES: usize = 17;
/// Upper bounds of the latency buckets, in seconds (Meta answers in 100 ms to a few seconds).
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct MethodMetrics {
    calls: [AtomicU64; CODES],
    /// Cumulative counts per bucket are computed when rendering; each slot counts its own range.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    duration_micros: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    methods: [MethodMetrics; METHODS.len()],
    /// Calls whose work has started and not finished (the work outlives a caller that left).
    in_flight: AtomicU64,
    idle: tokio::sync::Notify,
    /// Webhook and delivery counters by label: `(metric, label value) -> count`. The label
    /// values come from small fixed sets, and Meta's error codes are capped in number.
    labeled: std::sync::Mutex<std::collections::BTreeMap<(&'static str, String), u64>>,
    /// Calls by caller (a name from the key file) and gRPC code.
    by_caller: std::sync::Mutex<std::collections::BTreeMap<String, [u64; CODES]>>,
}

/// Callers counted: the names come from the operator's key file, but a file with thousands of
/// callers must not grow the page without end.
const MAX_CALLERS: usize = 1024;

/// Label values kept per labeled metric: Meta's error codes come from outside, and a hostile or
/// broken sender must not grow the page; the other labels are small fixed sets.
const MAX_LABELS: usize = 64;

/// One call in progress; dropping it ends the call.
pub struct CallGuard(std::sync::Arc<Metrics>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Metrics {
    /// Adds `n` to `metric{label}`; a metric keeps at most [`MAX_LABELS`] label values.
    fn count(&self, metric: &'static str, label: String, n: u64) {
        let mut labeled = self
            .labeled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !labeled.contains_key(&(metric, label.clone()))
            && labeled.keys().filter(|(m, _)| *m == metric).count() >= MAX_LABELS
        {
            return;
        }
        *labeled.entry((metric, label)).or_insert(0) += n;
    }

    /// A webhook delivery and what became of it (`stored`, `unauthorized`, `bad_request`,
    /// `unavailable`).
    pub fn webhook(&self, outcome: &'static str) {
        self.count("kabar_webhook_deliveries_total", outcome.to_owned(), 1);
    }

    /// A status update from Meta, and its error code when it failed.
    pub fn status(&self, state: &'static str, meta_code: Option<i64>) {
        self.count("kabar_message_statuses_total", state.to_owned(), 1);
        if let Some(code) = meta_code {
            self.count("kabar_message_failures_total", code.to_string(), 1);
        }
    }

    /// OTP codes through their life: `sent` (Meta accepted), `delivered` (Meta's webhook),
    /// `verified`. Delivered over sent and verified over delivered are the conversion figures.
    pub fn otp(&self, stage: &'static str, n: usize) {
        if n > 0 {
            self.count("kabar_otp_codes_total", stage.to_owned(), n as u64);
        }
    }

    /// Counts a call as in flight until the guard is dropped.
    pub fn call_started(self: &std::sync::Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits until no call is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn record(&self, method: Method, code: Code, elapsed: Duration) {
        let m = &self.methods[method as usize];
        let code_index = (code as usize).min(CODES - 1);
        m.calls[code_index].fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&upper| seconds <= upper)
            .unwrap_or(BUCKETS.len());
        m.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        m.duration_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// A call of a caller with a key (keys on), by the answer's gRPC code.
    pub fn record_caller(&self, caller: &str, code: Code) {
        let code = (code as usize).min(CODES - 1);
        let mut by_caller = self
            .by_caller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Looked up by the borrowed name: no allocation on a call, only for a new caller.
        if let Some(counts) = by_caller.get_mut(caller) {
            counts[code] += 1;
        } else if by_caller.len() < MAX_CALLERS {
            let mut counts = [0; CODES];
            counts[code] = 1;
            by_caller.insert(caller.to_owned(), counts);
        }
    }

    /// The Prometheus text exposition format.
    pub fn render(&self, store_reachable: bool, shutting_down: bool) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP kabar_grpc_calls_total Calls answered, by method and gRPC code.\n");
        out.push_str("# TYPE kabar_grpc_calls_total counter\n");
        for (i, m) in self.methods.iter().enumerate() {
            for (code, count) in m.calls.iter().enumerate() {
                let n = count.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "kabar_grpc_calls_total{{method=\"{}\",code=\"{}\"}} {n}",
                        METHODS[i],
                        code_name(code)
                    );
                }
            }
        }
        out.push_str("# HELP kabar_grpc_call_duration_seconds Time to answer a call.\n");
        out.push_str("# TYPE kabar_grpc_call_duration_seconds histogram\n");
        for (i, m) in self.methods.iter().enumerate() {
            let mut cumulative = 0;
            for (b, upper) in BUCKETS.iter().enumerate() {
                cumulative += m.buckets[b].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "kabar_grpc_call_duration_seconds_bucket{{method=\"{}\",le=\"{upper}\"}} {cumulative}",
                    METHODS[i]
                );
            }
            cumulative += m.buckets[BUCKETS.len()].load(Ordering::Relaxed);
            let sum = m.duration_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "kabar_grpc_call_duration_seconds_bucket{{method=\"{0}\",le=\"+Inf\"}} {cumulative}\n\
                 kabar_grpc_call_duration_seconds_sum{{method=\"{0}\"}} {sum}\n\
                 kabar_grpc_call_duration_seconds_count{{method=\"{0}\"}} {cumulative}",
                METHODS[i]
            );
        }
        let _ = writeln!(
            out,
            "# HELP kabar_grpc_calls_in_flight Calls whose work has started and not finished.\n\
             # TYPE kabar_grpc_calls_in_flight gauge\n\
             kabar_grpc_calls_in_flight {}",
            self.in_flight()
        );
        for (metric, label, help) in [
            (
                "kabar_webhook_deliveries_total",
                "outcome",
                "Webhook deliveries from Meta, by outcome.",
            ),
            (
                "kabar_message_statuses_total",
                "state",
                "Status updates from Meta's webhook, by state.",
            ),
            (
                "kabar_message_failures_total",
                "meta_code",
                "Failed statuses from Meta's webhook, by Meta error code.",
            ),
            (
                "kabar_otp_codes_total",
                "stage",
                "OTP codes sent (accepted by Meta), delivered (webhook) and verified.",
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            let labeled = self
                .labeled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ((m, value), n) in labeled.iter() {
                if *m == metric {
                    let _ = writeln!(out, "{metric}{{{label}=\"{value}\"}} {n}");
                }
            }
        }
        out.push_str(
            "# HELP kabar_grpc_caller_calls_total Calls of callers with an API key, by caller and \
             gRPC code.\n# TYPE kabar_grpc_caller_calls_total counter\n",
        );
        for (caller, counts) in self
            .by_caller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            for (code, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                let _ = writeln!(
                    out,
                    "kabar_grpc_caller_calls_total{{caller=\"{caller}\",code=\"{}\"}} {n}",
                    code_name(code)
                );
            }
        }
        out.push_str("# HELP kabar_otp_store_up Whether the OTP store (Redis) answers.\n");
        out.push_str("# TYPE kabar_otp_store_up gauge\n");
        let _ = writeln!(out, "kabar_otp_store_up {}", u8::from(store_reachable));
        out.push_str("# HELP kabar_shutting_down Whether shutdown has begun.\n");
        out.push_str("# TYPE kabar_shutting_down gauge\n");
        let _ = writeln!(out, "kabar_shutting_down {}", u8::from(shutting_down));
        out
    }
}

fn code_name(code: usize) -> &'static str {
    const NAMES: [&str; CODES] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES[code.min(CODES - 1)]
}

/// The pacing metrics: the rate in force and achieved, waits, refusals by reason, Meta's
/// throttling answers, and the daily recipients against the limit.
pub fn render_pacing(p: &crate::domain::pacing::PacingSnapshot) -> String {
    let mut out = String::with_capacity(2048);
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        "kabar_pacing_limit_mps",
        "Messages per second this process paces at now (its share while Redis is unreachable).",
        p.effective_mps.to_string(),
    );
    gauge(
        "kabar_pacing_sent_last_second",
        "Messages this process let go to Meta in the last whole second.",
        p.sent_last_second.to_string(),
    );
    gauge(
        "kabar_pacing_shared",
        "1 while the pacing schedule is shared through Redis, 0 while this process paces alone.",
        u8::from(p.mode == "shared").to_string(),
    );
    gauge(
        "kabar_daily_recipients",
        "Unique recipients counted toward Meta's daily messaging limit (rolling 24 hours).",
        p.daily_used.to_string(),
    );
    gauge(
        "kabar_daily_limit",
        "Meta's daily messaging limit in force (0: unlimited).",
        p.daily_limit.to_string(),
    );
    out.push_str("# HELP kabar_pacing_admitted_total Messages let go to Meta, by priority.\n");
    out.push_str("# TYPE kabar_pacing_admitted_total counter\n");
    for (priority, n) in p.admitted {
        let _ = writeln!(
            out,
            "kabar_pacing_admitted_total{{priority=\"{priority}\"}} {n}"
        );
    }
    out.push_str("# HELP kabar_pacing_refusals_total Sends refused by pacing, by reason.\n");
    out.push_str("# TYPE kabar_pacing_refusals_total counter\n");
    for (reason, n) in p.refused {
        let _ = writeln!(
            out,
            "kabar_pacing_refusals_total{{reason=\"{reason}\"}} {n}"
        );
    }
    out.push_str(
        "# HELP kabar_pacing_meta_throttled_total Meta's throttling answers (130429, 80007, 4) that slowed pacing down.\n",
    );
    out.push_str("# TYPE kabar_pacing_meta_throttled_total counter\n");
    let _ = writeln!(out, "kabar_pacing_meta_throttled_total {}", p.throttled);
    out.push_str("# HELP kabar_pacing_wait_seconds Time a send waited for its slot.\n");
    out.push_str("# TYPE kabar_pacing_wait_seconds histogram\n");
    for (upper, count) in &p.waits {
        let _ = writeln!(
            out,
            "kabar_pacing_wait_seconds_bucket{{le=\"{upper}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "kabar_pacing_wait_seconds_bucket{{le=\"+Inf\"}} {}\nkabar_pacing_wait_seconds_sum {}\nkabar_pacing_wait_seconds_count {}",
        p.wait_count, p.wait_seconds, p.wait_count
    );
    out
}

/// The batch worker of this replica in Prometheus text.
pub fn render_batch(w: &crate::domain::batch::worker::WorkerSnapshot) -> String {
    let mut out = String::with_capacity(1024);
    out.push_str(
        "# HELP kabar_batch_items_total Batch items settled by this replica, by outcome.\n\
         # TYPE kabar_batch_items_total counter\n",
    );
    for (outcome, n) in w.settled {
        let _ = writeln!(out, "kabar_batch_items_total{{outcome=\"{outcome}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP kabar_batch_items_retried_total Batch items given back for another try (Meta's \
         rate limits or outages, pacing).\n# TYPE kabar_batch_items_retried_total counter\n\
         kabar_batch_items_retried_total {}",
        w.retried
    );
    let _ = writeln!(
        out,
        "# HELP kabar_batch_paused_total Batches this replica paused on a refusal of Meta that \
         would hit every item.\n# TYPE kabar_batch_paused_total counter\n\
         kabar_batch_paused_total {}",
        w.paused
    );
    let _ = writeln!(
        out,
        "# HELP kabar_batch_items_in_hand Batch items this replica holds now.\n\
         # TYPE kabar_batch_items_in_hand gauge\nkabar_batch_items_in_hand {}",
        w.in_hand
    );
    out
}

/// Sends by template and outcome (see [`crate::domain::tally`]).
pub fn render_sends(sends: &[(String, &'static str, u64)]) -> String {
    let mut out = String::from(
        "# HELP kabar_messages_total Sends that reached the pipeline, by registry template and \
         outcome (accepted, failed, unknown, not_sent).\n# TYPE kabar_messages_total counter\n",
    );
    for (template, outcome, n) in sends {
        let _ = writeln!(
            out,
            "kabar_messages_total{{template=\"{template}\",outcome=\"{outcome}\"}} {n}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_caller_and_code_within_a_cap() {
        let metrics = Metrics::default();
        metrics.record_caller("billing", Code::Ok);
        metrics.record_caller("billing", Code::Ok);
        metrics.record_caller("portal", Code::ResourceExhausted);
        let page = metrics.render(true, false);
        assert!(page.contains("kabar_grpc_caller_calls_total{caller=\"billing\",code=\"OK\"} 2"));
        assert!(page.contains(
            "kabar_grpc_caller_calls_total{caller=\"portal\",code=\"RESOURCE_EXHAUSTED\"} 1"
        ));
        for i in 0..2 * MAX_CALLERS {
            metrics.record_caller(&format!("caller-{i}"), Code::Ok);
        }
        let page = metrics.render(true, false);
        let lines = page
            .lines()
            .filter(|l| l.starts_with("kabar_grpc_caller_calls_total{"))
            .count();
        assert_eq!(lines, MAX_CALLERS);
        // Pairs already counted keep counting past the cap.
        metrics.record_caller("billing", Code::Ok);
        assert!(
            metrics
                .render(true, false)
                .contains("kabar_grpc_caller_calls_total{caller=\"billing\",code=\"OK\"} 3")
        );
    }
}
