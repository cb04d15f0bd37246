//! kabar's load generator and the pieces a benchmark run needs beside kabar itself.
//!
//! ```text
//! loadgen run --scenario health --target http://127.0.0.1:50051 -c 64 -m 4 -d 10
//! loadgen bare-health --addr 127.0.0.1:50061          # tonic with only the health service
//! loadgen meta-standin --addr 127.0.0.1:18080 --latency-ms 200
//! loadgen meta-standin --addr 127.0.0.1:18081 --cap 80   # records arrivals, 130429 beyond 80/s
//! loadgen redis-memory --url unix:///tmp/redis.sock   # bytes per pending OTP and message record
//! loadgen run --scenario webhook --target http://127.0.0.1:50051 \
//!     --webhook http://127.0.0.1:8081 --app-secret SECRET -c 16 -d 10
//! loadgen run --scenario pacing --targets http://127.0.0.1:50051,http://127.0.0.1:50052 \
//!     --meta http://127.0.0.1:18081 --cap 80 --rate 240 --otp-every-ms 200 -d 10 --warmup 1
//! loadgen run --scenario batch-submit --target http://127.0.0.1:50051 -c 4 -m 4 \
//!     --items 100000 --redis unix:///tmp/redis.sock    # kabar with WHATSAPP_ENABLED=false
//! loadgen meta-standin --addr 127.0.0.1:18082 --latency-ms 200 --cap 1000
//! loadgen run --scenario batch-run --target http://127.0.0.1:50051 -c 4 -m 4 \
//!     --items 100000 --meta http://127.0.0.1:18082 --cap 1000 -d 300
//! ```
//!
//! `run` keeps N unary calls in flight over M HTTP/2 connections for a duration (or a count),
//! then prints calls/s, latency percentiles and errors by gRPC code (`--json` for one JSON line).
//! With `--key KEY` (or `KABAR_API_KEY`) every gRPC call carries `authorization: Bearer KEY`, as
//! kabar with `KABAR_API_KEYS_FILE` requires.
//! It exits non-zero when any call ended in an error or none was answered (`--allow-errors`
//! keeps the first case going): a benchmark of failing calls measures nothing.
//! `scripts/bench.sh` starts everything and runs every scenario in one go.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};
use hmac::{Hmac, Mac};
use kabar::pb::{
    Batch, GetBatchRequest, GetMessageStatusRequest, SendOtpRequest, SendTemplateRequest,
    SubmitBatchRequest, VerifyOtpRequest, batch::State as BatchState,
    batch_service_client::BatchServiceClient, message_status::State as MessageState,
    notification_service_client::NotificationServiceClient, otp_service_client::OtpServiceClient,
    verify_otp_response::Result as VerifyResult,
};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[derive(Parser)]
#[command(about = "kabar load generator, bare health server and Meta stand-in")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive one scenario and print the figures.
    Run(Box<RunArgs>),
    /// A bare tonic server with only grpc.health.v1.Health: the framework's ceiling.
    BareHealth {
        #[arg(long, default_value = "127.0.0.1:50061")]
        addr: SocketAddr,
        /// Worker threads of its runtime (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// An HTTP server answering `POST /{version}/{id}/messages` like Meta, after a fixed latency.
    MetaStandin {
        #[arg(long, default_value = "127.0.0.1:18080")]
        addr: SocketAddr,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Meta's throughput limit: records the arrival of every POST (`GET /_bench/arrivals`)
        /// and the accepted messages per recipient (`GET /_bench/recipients`), and answers HTTP
        /// 429 with Meta's error 130429 to a POST that finds this many already accepted in the
        /// second before it (a sliding 1-second window).
        #[arg(long)]
        cap: Option<usize>,
    },
    /// Reads the JSON lines of a benchmark run and prints the targets table (markdown); given
    /// the files of several runs, prints the lowest and highest value of every target instead.
    Summarize {
        /// Files of JSON lines written by `run --json`, `redis-memory --json` and the bench script.
        #[arg(required = true)]
        results: Vec<std::path::PathBuf>,
    },
    /// Redis memory per pending OTP (MEMORY USAGE of code keys) and of the per-phone limit keys;
    /// per message record with four status changes (accepted, sent, delivered, read) and per
    /// entry of the event feed.
    RedisMemory {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 200)]
        sample: usize,
        /// Only the OTP keys: no message records are expected.
        #[arg(long)]
        otp_only: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Scenario {
    /// grpc.health.v1.Health/Check on the target.
    Health,
    /// VerifyOtp over many phones: keys present and absent, right and wrong codes.
    Verify,
    /// VerifyOtp with a code that is not six digits: kabar parses the phone, refuses the call
    /// with INVALID_ARGUMENT (its expected answer here), logs and counts it; no Redis, no Meta.
    /// kabar's own per-call work on one of its RPCs, to set beside `health`.
    VerifyInvalid,
    /// SendOtp to distinct phones (configure kabar with the cooldown out of the way).
    SendOtp,
    /// SendTemplate invoice_notification with seven parameters.
    SendTemplate,
    /// POST straight to the Meta stand-in (target = its base URL), to show it is no bottleneck.
    MetaDirect,
    /// Meta's webhook: signed POSTs of `--batch` status updates each (sent, then delivered, then
    /// read) for messages sent through kabar beforehand, a new connection per POST (kabar's
    /// webhook listener answers one request per connection).
    Webhook,
    /// GetMessageStatus over messages sent through kabar beforehand and then reported sent,
    /// delivered and read through the webhook.
    GetStatus,
    /// Pacing: SendTemplate open-loop at `--rate` calls/s, each to a new phone with a deadline
    /// of `--deadline-ms`, spread round-robin over `--targets` (kabar replicas sharing one
    /// schedule) against a stand-in started with `--cap`; RATE_LIMITED refusals are results.
    /// Then reads the stand-in's arrivals: the busiest 1-second window, the throughput after
    /// the warm-up, Meta's 130429 answers. With `--otp-every-ms`, also one SendOtp that often to
    /// the first target, timed (a second JSON line, labelled `<label>-otp`).
    Pacing,
    /// BatchService: `--items` invoice_notification items (seven positional parameters, a new
    /// phone `0812` + 8 digits and reference each) in SubmitBatch calls of `--per-call`, `-c` calls
    /// in flight, then one call with `last`; items/s over the whole submission. With `--redis`,
    /// Redis's used_memory before and after, per item: kabar must send nothing meanwhile (start
    /// it with WHATSAPP_ENABLED=false: the batch pauses at its first item, every item stays
    /// queued), which the scenario checks.
    BatchSubmit,
    /// BatchService: submits as batch-submit does and times the run from the first SubmitBatch
    /// to the batch DONE (GetBatch every 100 ms), against a stand-in started with `--cap` at
    /// `--meta`; then checks the stand-in's record: every item's phone exactly once, no
    /// 130429, and the batch's counts (every item accepted).
    BatchRun,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// gRPC address of kabar (or of bare-health), or the stand-in's URL for meta-direct.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// The caller's API key, sent as `authorization: Bearer KEY` with every gRPC call of the
    /// scenario (kabar with KABAR_API_KEYS_FILE needs it; health does not). Empty: no key.
    #[arg(long, env = "KABAR_API_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Calls in flight.
    #[arg(short = 'c', long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(short = 'm', long, default_value_t = 4)]
    connections: usize,
    /// Seconds to measure (after the warm-up); batch-run: the longest wait for DONE.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many calls instead (the duration still bounds the run).
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Seconds of calls before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Phones the verify scenario spreads over (+62813 and 8 digits); every other one gets a code.
    #[arg(long, default_value_t = 200_000)]
    phones: u64,
    /// The Meta stand-in kabar sends to: the verify scenario reads the codes it received.
    #[arg(long, default_value = "http://127.0.0.1:18080")]
    meta: String,
    /// Share of verify calls to a phone with a code that carry the right code.
    #[arg(long, default_value_t = 0.02)]
    right_share: f64,
    /// First number of the distinct phones for send-otp / send-template (62812 + 8 digits).
    #[arg(long, default_value_t = 0)]
    phone_offset: u64,
    /// kabar's webhook listener (webhook scenario; get-status posts its statuses there first).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    webhook: String,
    /// META_APP_SECRET of kabar: the key webhook bodies are signed with.
    #[arg(long, default_value = "")]
    app_secret: String,
    /// Messages sent through kabar before a webhook or get-status run (phones from
    /// --phone-offset on).
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Status updates per webhook POST.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Client runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Exit 0 even when calls ended in an error (a run with no answered call still fails).
    #[arg(long)]
    allow_errors: bool,
    /// A label for the JSON output.
    #[arg(long, default_value = "")]
    label: String,
    /// pacing: the kabar replicas, comma-separated gRPC addresses (default: --target).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// pacing: SendTemplate calls issued per second, whatever the answers (open loop).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// pacing: the gRPC deadline of every SendTemplate call, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    deadline_ms: u64,
    /// pacing: KABAR_META_MAX_MPS of the replicas and the stand-in's --cap.
    #[arg(long)]
    cap: Option<u32>,
    /// pacing: one SendOtp every this many milliseconds to the first target (0: none).
    #[arg(long, default_value_t = 0)]
    otp_every_ms: u64,
    /// pacing: writes the stand-in's record of this run here (JSON: when the run started, and
    /// the arrival of every POST accepted and refused, in Unix microseconds).
    #[arg(long)]
    arrivals_out: Option<std::path::PathBuf>,
    /// batch-submit, batch-run: items in the batch (phones 0812 + 8 digits from --phone-offset).
    #[arg(long, default_value_t = 100_000)]
    items: u64,
    /// batch-submit, batch-run: items per SubmitBatch call (kabar takes at most 1,000).
    #[arg(long, default_value_t = 1000)]
    per_call: usize,
    /// batch-submit, batch-run: the batch id (default: bench-<scenario>-<Unix microseconds>).
    #[arg(long)]
    batch_id: Option<String>,
    /// batch-submit: kabar's Redis, whose used_memory is read before and after the items are
    /// queued (kabar must send nothing meanwhile: start it with WHATSAPP_ENABLED=false).
    #[arg(long)]
    redis: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => runtime(args.threads)?.block_on(run(*args)),
        Command::BareHealth { addr, threads } => runtime(threads)?.block_on(bare_health(addr)),
        Command::MetaStandin {
            addr,
            latency_ms,
            threads,
            cap,
        } => runtime(threads)?.block_on(meta_standin(addr, Duration::from_millis(latency_ms), cap)),
        Command::Summarize { results } => summarize(&results),
        Command::RedisMemory {
            url,
            sample,
            otp_only,
            json,
        } => runtime(1)?.block_on(redis_memory(&url, sample, otp_only, json)),
    }
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

async fn bare_health(addr: SocketAddr) -> anyhow::Result<()> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    eprintln!("bare health server on {addr}");
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(service)
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// The last OTP code the stand-in received per recipient, for the verify scenario's right codes.
type Codes = Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>;

/// The messages a capped stand-in accepted, per recipient (digits of `to`, without the `+`).
type Recipients = Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;

/// The POSTs a capped stand-in received: when (Unix microseconds), accepted or refused.
#[derive(Default)]
struct Arrivals {
    accepted: Vec<u64>,
    refused: Vec<u64>,
    /// The accepted ones of the last second, oldest first.
    window: std::collections::VecDeque<u64>,
}

impl Arrivals {
    /// Records a POST arriving at `now`; false when it finds `cap` accepted in the second
    /// before it (Meta's answer is then 130429).
    fn admit(&mut self, now: u64, cap: usize) -> bool {
        while self.window.front().is_some_and(|&at| at + 1_000_000 <= now) {
            self.window.pop_front();
        }
        if self.window.len() >= cap {
            self.refused.push(now);
            return false;
        }
        self.window.push_back(now);
        self.accepted.push(now);
        true
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn meta_standin(
    addr: SocketAddr,
    latency: Duration,
    cap: Option<usize>,
) -> anyhow::Result<()> {
    use axum::{
        Router,
        body::Bytes,
        http::StatusCode,
        response::IntoResponse,
        routing::{get, post},
    };
    let counter = Arc::new(AtomicU64::new(0));
    let codes: Codes = Arc::default();
    let recorded = codes.clone();
    let arrivals = Arc::new(std::sync::Mutex::new(Arrivals::default()));
    let arrivals_read = arrivals.clone();
    // With --cap: how many accepted messages each recipient got (the batch-run check).
    let recipients: Recipients = Arc::default();
    let recipients_read = recipients.clone();
    let app = Router::new()
        .route(
            "/_bench/arrivals",
            get(move || {
                let arrivals = arrivals_read.clone();
                async move {
                    let a = arrivals.lock().expect("not poisoned");
                    serde_json::json!({
                        "cap": cap,
                        "accepted_us": a.accepted,
                        "refused_us": a.refused,
                    })
                    .to_string()
                }
            }),
        )
        .route(
            "/_bench/recipients",
            get(move || {
                let recipients = recipients_read.clone();
                async move {
                    let map = recipients.lock().expect("not poisoned").clone();
                    serde_json::to_string(&map).unwrap_or_default()
                }
            }),
        )
        .route(
            "/_bench/codes",
            get(move || {
                let codes = codes.clone();
                async move {
                    let map = codes.lock().expect("not poisoned").clone();
                    serde_json::to_string(&map).unwrap_or_default()
                }
            }),
        )
        .route(
            "/{version}/{phone_number_id}/messages",
            post(move |body: Bytes| {
                let counter = counter.clone();
                let recorded = recorded.clone();
                let arrivals = arrivals.clone();
                let recipients = recipients.clone();
                async move {
                    if let Some(cap) = cap {
                        let now = unix_micros();
                        if !arrivals.lock().expect("not poisoned").admit(now, cap) {
                            // Meta's answer past the number's throughput, as Meta words it.
                            let trace = counter.fetch_add(1, Ordering::Relaxed);
                            return (
                                StatusCode::TOO_MANY_REQUESTS,
                                [("content-type", "application/json")],
                                serde_json::json!({"error": {
                                    "message": "(#130429) Rate limit hit",
                                    "type": "OAuthException",
                                    "code": 130429,
                                    "error_data": {
                                        "messaging_product": "whatsapp",
                                        "details": "Cloud API message throughput has been reached."
                                    },
                                    "fbtrace_id": format!("ABench{trace:016X}")
                                }})
                                .to_string(),
                            )
                                .into_response();
                        }
                    }
                    if !latency.is_zero() {
                        tokio::time::sleep(latency).await;
                    }
                    let id = counter.fetch_add(1, Ordering::Relaxed);
                    let parsed = serde_json::from_slice::<serde_json::Value>(&body).ok();
                    let to = parsed
                        .as_ref()
                        .and_then(|v| v["to"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    // An authentication template carries the code in its copy-code button.
                    if let Some(code) = parsed.as_ref().and_then(|v| {
                        v["template"]["components"][1]["parameters"][0]["text"].as_str()
                    }) {
                        recorded
                            .lock()
                            .expect("not poisoned")
                            .insert(to.clone(), code.to_owned());
                    }
                    let wa_id = to.trim_start_matches('+').to_owned();
                    if cap.is_some() {
                        *recipients
                            .lock()
                            .expect("not poisoned")
                            .entry(wa_id.clone())
                            .or_default() += 1;
                    }
                    // An id of the length and alphabet of Meta's (58 characters here; Meta's
                    // are 58 to 63): the id is stored twice per record (key and field).
                    let wamid = format!("wamid.HBgN{wa_id:0>13}FQIAERgSQkVOQ0g{id:016X}AA==");
                    (
                        [("content-type", "application/json")],
                        serde_json::json!({
                            "messaging_product": "whatsapp",
                            "contacts": [{"input": to, "wa_id": wa_id}],
                            "messages": [{"id": wamid}]
                        })
                        .to_string(),
                    )
                        .into_response()
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    match cap {
        Some(cap) => eprintln!(
            "Meta stand-in on {addr}, latency {latency:?}, at most {cap} messages in any second \
             (130429 beyond), arrivals recorded"
        ),
        None => eprintln!("Meta stand-in on {addr}, latency {latency:?}"),
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn redis_memory(url: &str, sample: usize, otp_only: bool, json: bool) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut keys: Vec<String> = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("kabar:otp:{*")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 || keys.len() >= sample {
            break;
        }
    }
    keys.truncate(sample);
    anyhow::ensure!(
        !keys.is_empty(),
        "no pending OTP keys (kabar:otp:{{...}}) in Redis"
    );
    let (mut code_bytes, mut limit_bytes) = (0u64, 0u64);
    for key in &keys {
        let code: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut con)
            .await?;
        let phone = key
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(p, _)| p)
            .unwrap_or_default();
        let limit: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("kabar:otp-limit:{{{phone}}}"))
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut con)
            .await?;
        code_bytes += code;
        limit_bytes += limit.unwrap_or(0);
    }
    let n = keys.len() as f64;
    let (code_avg, limit_avg) = (code_bytes as f64 / n, limit_bytes as f64 / n);
    let mut figures = serde_json::json!({
        "label": "redis-memory",
        "keys_sampled": keys.len(),
        "code_key_bytes": code_avg,
        "limit_key_bytes": limit_avg,
        "code_plus_limit_bytes": code_avg + limit_avg,
    });
    if !json {
        println!(
            "{} pending OTPs sampled: code key {code_avg:.0} B (the pending OTP); per-phone limit key {limit_avg:.0} B; together {:.0} B",
            keys.len(),
            code_avg + limit_avg
        );
    }
    if !otp_only {
        let records = record_memory(&mut con, sample).await?;
        if !json {
            println!(
                "{} message records with four status changes sampled: {:.0} B each (ids of {:.0} \
                 characters); event feed: {} entries, {:.0} B each",
                records.sampled,
                records.record_bytes,
                records.id_chars,
                records.feed_entries,
                records.feed_entry_bytes
            );
        }
        figures["records_sampled"] = records.sampled.into();
        figures["record_bytes"] = records.record_bytes.into();
        figures["record_id_chars"] = records.id_chars.into();
        figures["feed_entries"] = records.feed_entries.into();
        figures["feed_bytes"] = records.feed_bytes.into();
        figures["feed_entry_bytes"] = records.feed_entry_bytes.into();
    }
    if json {
        println!("{figures}");
    }
    Ok(())
}

struct RecordMemory {
    sampled: usize,
    record_bytes: f64,
    id_chars: f64,
    feed_entries: u64,
    feed_bytes: u64,
    feed_entry_bytes: f64,
}

/// MEMORY USAGE of message records whose history holds exactly accepted, sent, delivered and
/// read (`s` = 4, four history entries), and of the whole event feed divided by its entries.
async fn record_memory(
    con: &mut redis::aio::MultiplexedConnection,
    sample: usize,
) -> anyhow::Result<RecordMemory> {
    let mut cursor: u64 = 0;
    let (mut sampled, mut bytes, mut id_chars) = (0usize, 0u64, 0usize);
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("kabar:msg:{*")
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        for key in batch {
            if sampled >= sample {
                break;
            }
            let (state, history): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(&key)
                .arg("s")
                .arg("h")
                .query_async(con)
                .await?;
            let four = history.is_some_and(|h| h.split(';').filter(|e| !e.is_empty()).count() == 4);
            if state.as_deref() != Some("4") || !four {
                continue;
            }
            let used: u64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(con)
                .await?;
            bytes += used;
            id_chars += key.len() - "kabar:msg:{}".len();
            sampled += 1;
        }
        cursor = next;
        if cursor == 0 || sampled >= sample {
            break;
        }
    }
    anyhow::ensure!(
        sampled > 0,
        "no message record with four status changes (kabar:msg:{{...}} read, with accepted, sent, \
         delivered and read in its history) in Redis: run the get-status scenario first, or pass \
         --otp-only"
    );
    let feed_entries: u64 = redis::cmd("XLEN")
        .arg("kabar:events")
        .query_async(con)
        .await?;
    let feed_bytes: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg("kabar:events")
        .arg("SAMPLES")
        .arg(0)
        .query_async(con)
        .await?;
    let feed_bytes = feed_bytes.unwrap_or(0);
    Ok(RecordMemory {
        sampled,
        record_bytes: bytes as f64 / sampled as f64,
        id_chars: id_chars as f64 / sampled as f64,
        feed_entries,
        feed_bytes,
        feed_entry_bytes: feed_bytes as f64 / feed_entries.max(1) as f64,
    })
}

/// One HTTP/2 connection to a gRPC server that adds the caller's key to every call it carries:
/// `authorization: Bearer KEY`, a header value built once per run, so that a call only clones a
/// reference-counted value into its headers (what a client's interceptor does at the least).
#[derive(Clone)]
struct Conn {
    channel: Channel,
    authorization: Option<http::HeaderValue>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Response;
    type Error = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Error;
    type Future = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.channel.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        self.channel.call(request)
    }
}

/// The `authorization` header of `--key` (or `KABAR_API_KEY`), built once; `None` without a key.
fn authorization(args: &RunArgs) -> anyhow::Result<Option<http::HeaderValue>> {
    let Some(key) = args.key.as_deref().map(str::trim).filter(|k| !k.is_empty()) else {
        return Ok(None);
    };
    let value = http::HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
        anyhow::anyhow!(
            "--key / KABAR_API_KEY: not a key (printable ASCII, as `kabar keys new` prints it)"
        )
    })?;
    Ok(Some(value))
}

/// Opens one HTTP/2 connection (each Endpoint::connect is its own) that sends `authorization`.
async fn connect(target: &str, authorization: Option<&http::HeaderValue>) -> anyhow::Result<Conn> {
    let channel = Endpoint::from_shared(target.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(Conn {
        channel,
        authorization: authorization.cloned(),
    })
}

/// One call's outcome: `Ok(label)` or `Err(gRPC code name)`.
type Outcome = Result<&'static str, String>;

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
    results: BTreeMap<&'static str, u64>,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Pacing => return run_pacing(args).await,
        Scenario::BatchSubmit | Scenario::BatchRun => return run_batch(args).await,
        _ => {}
    }
    let args = Arc::new(args);
    let channels = if args.scenario == Scenario::MetaDirect {
        Vec::new()
    } else {
        let authorization = authorization(&args)?;
        let mut channels = Vec::with_capacity(args.connections);
        for _ in 0..args.connections.max(1) {
            channels.push(connect(&args.target, authorization.as_ref()).await?);
        }
        channels
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;

    let prepared = Arc::new(match args.scenario {
        Scenario::Verify => Prepared {
            codes: prepare_verify(&args, &channels).await?,
            ..Prepared::default()
        },
        Scenario::Webhook => Prepared {
            messages: prepare_messages(&args, &channels, false).await?,
            webhook: Some(WebhookPoster::new(&args)?),
            since_secs: unix_secs(),
            ..Prepared::default()
        },
        Scenario::GetStatus => Prepared {
            messages: prepare_messages(&args, &channels, true).await?,
            ..Prepared::default()
        },
        _ => Prepared::default(),
    });

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let sequence = Arc::new(AtomicU64::new(args.phone_offset));
    let mut workers = Vec::with_capacity(args.concurrency);
    for i in 0..args.concurrency {
        let channel = channels.get(i % channels.len().max(1)).cloned();
        let prepared = prepared.clone();
        let (args, measuring, stop, issued, sequence, http) = (
            args.clone(),
            measuring.clone(),
            stop.clone(),
            issued.clone(),
            sequence.clone(),
            http.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut caller = Caller::new(&args, channel, http, i as u64);
            while !stop.load(Ordering::Relaxed) {
                let counted = measuring.load(Ordering::Relaxed);
                if counted
                    && let Some(limit) = args.count
                    && issued.fetch_add(1, Ordering::Relaxed) >= limit
                {
                    break;
                }
                let start = Instant::now();
                let outcome = caller.call(&args, &sequence, &prepared).await;
                // A call counts when it ends inside the measured seconds, wherever it began:
                // with calls slower than the window (1,024 in flight at 200 ms, a loaded debug
                // build) counting only calls that began inside it would count almost none.
                if measuring.load(Ordering::Relaxed) {
                    let us = start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    tally.latencies_us.push(us);
                    match outcome {
                        Ok(label) => *tally.results.entry(label).or_default() += 1,
                        Err(code) => *tally.errors.entry(code).or_default() += 1,
                    }
                }
            }
            tally
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    while Instant::now() < deadline {
        if args
            .count
            .is_some_and(|n| issued.load(Ordering::Relaxed) >= n)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);

    let mut all = Tally::default();
    for worker in workers {
        let t = worker.await?;
        all.latencies_us.extend(t.latencies_us);
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
        for (k, v) in t.results {
            *all.results.entry(k).or_default() += v;
        }
    }
    // Whether the run's gRPC calls carried a key (meta-direct and the webhook's POSTs are HTTP).
    let api_key = channels.first().is_some_and(|c| c.authorization.is_some());
    report(&args, &mut all, elapsed, api_key);
    // The scenario's expected answers are results; everything else is an error.
    let answered: u64 = all.results.values().sum();
    let failed: u64 = all.errors.values().sum();
    anyhow::ensure!(
        answered > 0,
        "{} {}: no call was answered as expected ({failed} errors: {:?})",
        args.target,
        args.label,
        all.errors
    );
    anyhow::ensure!(
        failed == 0 || args.allow_errors,
        "{} {}: {failed} of {} calls ended in an error: {:?} (--allow-errors to accept them)",
        args.target,
        args.label,
        failed + answered,
        all.errors
    );
    Ok(())
}

/// What a call of the pacing scenario was.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PacedCall {
    Template,
    Otp,
}

/// One call of the pacing scenario.
struct PacedOutcome {
    kind: PacedCall,
    latency_us: u32,
    outcome: Outcome,
}

/// The OTP phones of a pacing run start this far past its --phone-offset.
const PACING_OTP_PHONES: u64 = 5_000_000;

/// A paced SendTemplate refused: RATE_LIMITED (no slot before the call's deadline) is the
/// expected answer to a load past the cap; Meta's throughput answer passed back
/// (META_THROUGHPUT_EXCEEDED) and a call kabar answered only after its deadline (tonic's server
/// then ends it as CANCELLED, "Timeout expired") are counted apart; anything else is an error.
fn paced_refusal(status: &tonic::Status) -> Outcome {
    if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
        return Ok("past_deadline");
    }
    use tonic_types::StatusExt;
    let reason = status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default();
    match (status.code(), reason.as_str()) {
        (tonic::Code::ResourceExhausted, "RATE_LIMITED") => Ok("rate_limited"),
        (tonic::Code::ResourceExhausted, "META_THROUGHPUT_EXCEEDED") => Ok("meta_throttled"),
        (code, "") => Err(format!("{code:?}")),
        (code, reason) => Err(format!("{code:?} {reason}")),
    }
}

/// The p-th percentile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    f64::from(sorted_us[idx.clamp(1, sorted_us.len()) - 1]) / 1000.0
}

/// The most times in any window [t, t + 1 s) over sorted Unix microseconds, and the time that
/// window starts at (a busiest window can always be made to start at an arrival).
fn busiest_second(sorted_us: &[u64]) -> (usize, u64) {
    let (mut best, mut at, mut end) = (0, 0, 0);
    for (i, &t) in sorted_us.iter().enumerate() {
        while end < sorted_us.len() && sorted_us[end] < t + 1_000_000 {
            end += 1;
        }
        if end - i > best {
            (best, at) = (end - i, t);
        }
    }
    (best, at)
}

/// What a stand-in started with --cap recorded.
#[derive(serde::Deserialize)]
struct Recorded {
    accepted_us: Vec<u64>,
    refused_us: Vec<u64>,
}

/// The pacing scenario (open loop): `--rate` SendTemplate calls a second for `--warmup` plus
/// `-d` seconds, whatever the answers, round-robin over the replicas; then the stand-in's
/// record of what kabar sent it.
async fn run_pacing(args: RunArgs) -> anyhow::Result<()> {
    let targets = if args.targets.is_empty() {
        vec![args.target.clone()]
    } else {
        args.targets.clone()
    };
    let cap = f64::from(args.cap.ok_or_else(|| {
        anyhow::anyhow!(
            "--cap is required for the pacing scenario: the replicas' KABAR_META_MAX_MPS"
        )
    })?);
    anyhow::ensure!(
        args.rate > 0.0 && cap > 0.0,
        "--rate and --cap must be above 0"
    );
    let deadline = Duration::from_millis(args.deadline_ms);
    // A refused call holds its stream until its deadline: about rate x deadline / replicas
    // calls are in flight on each replica, and kabar takes 256 streams per HTTP/2 connection.
    let in_flight = args.rate * deadline.as_secs_f64() / targets.len() as f64;
    let per_target = args
        .connections
        .max((in_flight / 200.0).ceil() as usize + 1);
    let authorization = authorization(&args)?;
    let mut channels = Vec::with_capacity(per_target * targets.len());
    for _ in 0..per_target {
        // Replica-minor order: call n goes to replica n % replicas.
        for target in &targets {
            channels.push(connect(target, authorization.as_ref()).await?);
        }
    }
    let warmup = Duration::from_secs_f64(args.warmup);
    let measured = Duration::from_secs_f64(args.duration);
    let otp_every = Duration::from_millis(args.otp_every_ms);
    // A call kabar never answers ends here, as an error.
    let give_up = deadline + Duration::from_secs(5);
    let otp_give_up = Duration::from_secs(15);

    let started_us = unix_micros();
    let started = Instant::now();
    let end = started + warmup + measured;
    let mut calls = Vec::new();
    let (mut issued, mut otps) = (0u64, 0u64);
    let mut next_otp = started + warmup;
    while Instant::now() < end {
        let due = (started.elapsed().as_secs_f64() * args.rate) as u64 + 1;
        while issued < due {
            let channel = channels[issued as usize % channels.len()].clone();
            let mut request = tonic::Request::new(invoice_request(args.phone_offset + issued));
            request.set_timeout(deadline);
            calls.push(tokio::spawn(async move {
                let start = Instant::now();
                let mut client = NotificationServiceClient::new(channel);
                let outcome =
                    match tokio::time::timeout(give_up, client.send_template(request)).await {
                        Ok(Ok(_)) => Ok("sent"),
                        Ok(Err(status)) => paced_refusal(&status),
                        Err(_) => Err("no answer".to_owned()),
                    };
                PacedOutcome {
                    kind: PacedCall::Template,
                    latency_us: start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
                    outcome,
                }
            }));
            issued += 1;
        }
        if !otp_every.is_zero() && Instant::now() >= next_otp {
            next_otp += otp_every;
            let mut client = OtpServiceClient::new(channels[0].clone());
            let request = SendOtpRequest {
                phone: distinct_phone(args.phone_offset + PACING_OTP_PHONES + otps),
                purpose: "login".into(),
                client_ip: String::new(),
            };
            otps += 1;
            calls.push(tokio::spawn(async move {
                let start = Instant::now();
                let outcome =
                    match tokio::time::timeout(otp_give_up, client.send_otp(request)).await {
                        Ok(Ok(_)) => Ok("sent"),
                        Ok(Err(status)) => match paced_refusal(&status) {
                            Ok(answer) => Err(answer.to_owned()),
                            Err(e) => Err(e),
                        },
                        Err(_) => Err("no answer".to_owned()),
                    };
                PacedOutcome {
                    kind: PacedCall::Otp,
                    latency_us: start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
                    outcome,
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let offered_secs = started.elapsed().as_secs_f64();

    let (mut templates, mut otp) = (Tally::default(), Tally::default());
    let mut sent_us = Vec::new();
    for call in calls {
        let call = call.await?;
        let tally = match call.kind {
            PacedCall::Template => &mut templates,
            PacedCall::Otp => &mut otp,
        };
        tally.latencies_us.push(call.latency_us);
        match call.outcome {
            Ok(label) => {
                if call.kind == PacedCall::Template && label == "sent" {
                    sent_us.push(call.latency_us);
                }
                *tally.results.entry(label).or_default() += 1;
            }
            Err(code) => *tally.errors.entry(code).or_default() += 1,
        }
    }
    sent_us.sort_unstable();
    otp.latencies_us.sort_unstable();

    let recorded: Recorded = reqwest::get(format!(
        "{}/_bench/arrivals",
        args.meta.trim_end_matches('/')
    ))
    .await?
    .error_for_status()?
    .json()
    .await?;
    let accepted: Vec<u64> = recorded
        .accepted_us
        .into_iter()
        .filter(|&t| t >= started_us)
        .collect();
    let refused_us: Vec<u64> = recorded
        .refused_us
        .iter()
        .copied()
        .filter(|&t| t >= started_us)
        .collect();
    if let Some(path) = &args.arrivals_out {
        let record = serde_json::json!({
            "label": args.label,
            "cap": args.cap,
            "started_us": started_us,
            "accepted_us": accepted,
            "refused_us": refused_us,
        });
        std::fs::write(path, record.to_string())
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    let mut posts: Vec<u64> = accepted.clone();
    posts.extend(&refused_us);
    posts.sort_unstable();
    let (busiest, busiest_at) = busiest_second(&posts);
    let steady_from = started_us + warmup.as_micros() as u64;
    let steady_to = steady_from + measured.as_micros() as u64;
    let steady = accepted
        .iter()
        .filter(|&&t| (steady_from..steady_to).contains(&t))
        .count() as f64
        / measured.as_secs_f64();
    let mut per_second = vec![0u64; (offered_secs.ceil() as usize).max(1) + 5];
    for &t in &accepted {
        let s = ((t - started_us) / 1_000_000) as usize;
        if s < per_second.len() {
            per_second[s] += 1;
        }
    }
    while per_second.len() > 1 && per_second.last() == Some(&0) {
        per_second.pop();
    }
    let busiest_at_s = busiest_at.saturating_sub(started_us) as f64 / 1e6;

    let figures = serde_json::json!({
        "label": args.label,
        "scenario": "pacing",
        "targets": targets,
        "api_key": authorization.is_some(),
        "replicas": targets.len(),
        "cap": args.cap,
        "offered_per_sec": args.rate,
        "deadline_ms": args.deadline_ms,
        "warmup": args.warmup,
        "seconds": args.duration,
        "offered_seconds": offered_secs,
        "calls": issued,
        "results": templates.results,
        "errors": templates.errors,
        "sent_p50_ms": percentile_ms(&sent_us, 50.0),
        "sent_p99_ms": percentile_ms(&sent_us, 99.0),
        "meta_posts": posts.len(),
        "meta_accepted": accepted.len(),
        "meta_130429": refused_us.len(),
        "busiest_window": busiest,
        "busiest_window_ratio": busiest as f64 / cap,
        "busiest_window_at_s": busiest_at_s,
        "steady_per_sec": steady,
        "steady_ratio": steady / cap,
        "accepted_per_second": per_second,
    });
    let otp_figures = (!otp_every.is_zero()).then(|| {
        let calls = otp.latencies_us.len();
        serde_json::json!({
            "label": format!("{}-otp", args.label),
            "scenario": "send-otp",
            "target": targets[0],
            "api_key": authorization.is_some(),
            "every_ms": args.otp_every_ms,
            "under": args.label,
            "seconds": args.duration,
            "calls": calls,
            "calls_per_sec": calls as f64 / measured.as_secs_f64(),
            "p50_ms": percentile_ms(&otp.latencies_us, 50.0),
            "p90_ms": percentile_ms(&otp.latencies_us, 90.0),
            "p99_ms": percentile_ms(&otp.latencies_us, 99.0),
            "max_ms": percentile_ms(&otp.latencies_us, 100.0),
            "results": otp.results,
            "errors": otp.errors,
        })
    });
    if args.json {
        println!("{figures}");
        if let Some(otp_figures) = &otp_figures {
            println!("{otp_figures}");
        }
    } else {
        println!(
            "pacing {}: {} replicas, cap {cap}/s, {issued} SendTemplate calls offered at {}/s \
             for {offered_secs:.1} s (deadline {} ms)",
            args.label,
            targets.len(),
            args.rate,
            args.deadline_ms
        );
        println!("  kabar's answers: {:?}", templates.results);
        println!("  errors: {:?}", templates.errors);
        println!(
            "  Meta stand-in: {} POSTs, {} accepted, {} answered 130429",
            posts.len(),
            accepted.len(),
            refused_us.len()
        );
        println!(
            "  busiest 1-second window: {busiest} = {:.1}% of the cap (from {busiest_at_s:.2} s)",
            100.0 * busiest as f64 / cap
        );
        println!(
            "  accepted after the first {:.1} s: {steady:.1}/s = {:.1}% of the cap",
            args.warmup,
            100.0 * steady / cap
        );
        println!(
            "  accepted per second: {:?}",
            figures["accepted_per_second"]
        );
        if let Some(o) = &otp_figures {
            println!(
                "  SendOtp every {} ms: {} calls, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, \
                 results {}, errors {}",
                args.otp_every_ms,
                o["calls"],
                o["p50_ms"],
                o["p99_ms"],
                o["max_ms"],
                o["results"],
                o["errors"]
            );
        }
    }
    let sent = templates.results.get("sent").copied().unwrap_or(0);
    let failed: u64 = templates.errors.values().chain(otp.errors.values()).sum();
    anyhow::ensure!(
        sent > 0,
        "{}: no SendTemplate call was sent ({:?})",
        args.label,
        templates.errors
    );
    anyhow::ensure!(
        !posts.is_empty(),
        "{}: the stand-in at {} recorded no POST (start it with --cap)",
        args.label,
        args.meta
    );
    anyhow::ensure!(
        failed == 0 || args.allow_errors,
        "{}: {failed} calls ended in an error: {:?} {:?} (--allow-errors to accept them)",
        args.label,
        templates.errors,
        otp.errors
    );
    Ok(())
}

/// An item of the batch scenarios: invoice_notification with its seven parameters in template
/// order, to the n-th phone written nationally (0812 + 8 digits), its invoice number as reference.
fn batch_item(n: u64) -> SendTemplateRequest {
    SendTemplateRequest {
        phone: format!("0812{:08}", n % 100_000_000),
        template: "invoice_notification".into(),
        positional_params: vec![
            "Budi Santoso".into(),
            "November 2026".into(),
            format!("INV/2026/11/{n:08}"),
            "Home 30 Mbps".into(),
            "Rp 250.000".into(),
            "10 Desember 2026".into(),
            format!("CUST-{n:08}"),
        ],
        reference: format!("INV/2026/11/{n:08}"),
        ..Default::default()
    }
}

/// What submitting a batch took.
struct Submission {
    /// From the first call's start to the last call's answer.
    seconds: f64,
    /// Per call, in microseconds, sorted.
    latencies_us: Vec<u32>,
    /// The answer to the closing call (`last`).
    closed: Batch,
}

/// Submits `--items` items to `batch_id` in calls of `--per-call`, `-c` calls in flight over
/// the channels, then closes the batch with one call of no items and `last`. The requests are
/// built before the clock starts.
async fn submit_batch(
    args: &RunArgs,
    channels: &[Conn],
    batch_id: &str,
) -> anyhow::Result<Submission> {
    anyhow::ensure!(
        args.items > 0 && args.per_call > 0,
        "--items and --per-call must be at least 1"
    );
    let calls: Vec<SubmitBatchRequest> = (0..args.items)
        .step_by(args.per_call)
        .map(|first| SubmitBatchRequest {
            batch_id: batch_id.to_owned(),
            messages: (first..(first + args.per_call as u64).min(args.items))
                .map(|i| batch_item(args.phone_offset + i))
                .collect(),
            last: false,
        })
        .collect();
    let calls = Arc::new(std::sync::Mutex::new(calls.into_iter()));
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..args.concurrency.max(1) {
        let mut client = BatchServiceClient::new(channels[c % channels.len()].clone())
            .max_encoding_message_size(4 * 1024 * 1024);
        let calls = calls.clone();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(request) = calls.lock().expect("not poisoned").next() else {
                    return Ok::<_, tonic::Status>(latencies);
                };
                let start = Instant::now();
                client.submit_batch(request).await?;
                latencies.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
        }));
    }
    let mut latencies_us = Vec::new();
    for client in clients {
        match client.await? {
            Ok(l) => latencies_us.extend(l),
            Err(s) => anyhow::bail!(
                "SubmitBatch to {batch_id} failed: {:?} {}",
                s.code(),
                s.message()
            ),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    let closed = BatchServiceClient::new(channels[0].clone())
        .submit_batch(SubmitBatchRequest {
            batch_id: batch_id.to_owned(),
            messages: Vec::new(),
            last: true,
        })
        .await
        .map_err(|s| anyhow::anyhow!("closing {batch_id}: {:?} {}", s.code(), s.message()))?
        .into_inner();
    Ok(Submission {
        seconds,
        latencies_us,
        closed,
    })
}

/// The id the store knows a batch by: the caller's own id without API keys, `caller/id` with
/// them (batch ids are each caller's own), found by its key `kabar:batch:{caller/id}`.
async fn stored_batch_id(
    con: &mut redis::aio::MultiplexedConnection,
    batch_id: &str,
) -> anyhow::Result<String> {
    let plain: bool = redis::cmd("EXISTS")
        .arg(format!("kabar:batch:{{{batch_id}}}"))
        .query_async(con)
        .await?;
    if plain {
        return Ok(batch_id.to_owned());
    }
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("kabar:batch:{{*/{batch_id}}}"))
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        if let Some(stored) = keys.first().and_then(|k| {
            k.strip_prefix("kabar:batch:{")
                .and_then(|k| k.strip_suffix('}'))
        }) {
            return Ok(stored.to_owned());
        }
        cursor = next;
        if cursor == 0 {
            anyhow::bail!("{batch_id}: no key kabar:batch:{{...{batch_id}}} in Redis");
        }
    }
}

/// Redis's `used_memory` (INFO memory).
async fn used_memory(con: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(con).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no used_memory in INFO memory"))
}

fn batch_state_name(batch: &Batch) -> String {
    format!("{:?}", batch.state()).to_uppercase()
}

/// The items of a batch that have left the queue one way or another.
fn settled(batch: &Batch) -> u64 {
    batch.accepted + batch.failed + batch.unknown
}

/// The batch scenarios (see [`Scenario::BatchSubmit`] and [`Scenario::BatchRun`]).
async fn run_batch(args: RunArgs) -> anyhow::Result<()> {
    let scenario = args
        .scenario
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned());
    let batch_id = args
        .batch_id
        .clone()
        .unwrap_or_else(|| format!("bench-{scenario}-{}", unix_micros()));
    let authorization = authorization(&args)?;
    let mut channels = Vec::with_capacity(args.connections.max(1));
    for _ in 0..args.connections.max(1) {
        channels.push(connect(&args.target, authorization.as_ref()).await?);
    }
    match args.scenario {
        Scenario::BatchRun => run_batch_run(&args, &channels, &batch_id).await,
        _ => run_batch_submit(&args, &channels, &batch_id).await,
    }
}

async fn get_batch(channel: &Conn, batch_id: &str) -> anyhow::Result<Batch> {
    Ok(BatchServiceClient::new(channel.clone())
        .get_batch(GetBatchRequest {
            batch_id: batch_id.to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("GetBatch {batch_id}: {:?} {}", s.code(), s.message()))?
        .into_inner())
}

async fn run_batch_submit(args: &RunArgs, channels: &[Conn], batch_id: &str) -> anyhow::Result<()> {
    let mut redis = match &args.redis {
        Some(url) => Some(
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        ),
        None => None,
    };
    let before = match redis.as_mut() {
        Some(con) => Some(used_memory(con).await?),
        None => None,
    };
    let submission = submit_batch(args, channels, batch_id).await?;
    // The workers take the first items at once: let them give them back (paused) or go on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let batch = get_batch(&channels[0], batch_id).await?;
    let items_per_sec = args.items as f64 / submission.seconds;
    let calls = submission.latencies_us.len();
    let lat = &submission.latencies_us;
    let mut figures = serde_json::json!({
        "label": args.label,
        "scenario": "batch-submit",
        "target": args.target,
        "api_key": channels[0].authorization.is_some(),
        "batch_id": batch_id,
        "items": args.items,
        "per_call": args.per_call,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "seconds": submission.seconds,
        "calls": calls,
        "calls_per_sec": calls as f64 / submission.seconds,
        "items_per_sec": items_per_sec,
        "p50_ms": percentile_ms(lat, 50.0),
        "p90_ms": percentile_ms(lat, 90.0),
        "p99_ms": percentile_ms(lat, 99.0),
        "max_ms": percentile_ms(lat, 100.0),
        "results": {"submitted": calls},
        "errors": {},
        "state": batch_state_name(&batch),
        "total": batch.total,
        "queued": batch.queued,
        "sent": settled(&batch),
    });
    anyhow::ensure!(
        batch.total == args.items,
        "{batch_id}: {} items in the batch after submitting {} (closing answer: {} items)",
        batch.total,
        args.items,
        submission.closed.total
    );
    if let (Some(con), Some(before)) = (redis.as_mut(), before) {
        anyhow::ensure!(
            settled(&batch) == 0 && batch.queued == args.items,
            "{batch_id}: kabar sent items during the memory measurement ({} settled, state {}): \
             start it with WHATSAPP_ENABLED=false so that every item stays queued",
            settled(&batch),
            batch_state_name(&batch)
        );
        let after = used_memory(con).await?;
        let per_item = after.saturating_sub(before) as f64 / args.items as f64;
        figures["used_memory_before"] = before.into();
        figures["used_memory_after"] = after.into();
        figures["bytes_per_item"] = per_item.into();
        // The batch's own keys, each divided by the items (MEMORY USAGE, every element).
        let stored = stored_batch_id(con, batch_id).await?;
        let mut keys = serde_json::Map::new();
        for (name, suffix) in [
            ("batch", ""),
            ("items", ":items"),
            ("order", ":order"),
            ("queue", ":queue"),
        ] {
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("kabar:batch:{{{stored}}}{suffix}"))
                .arg("SAMPLES")
                .arg(0)
                .query_async(con)
                .await?;
            keys.insert(
                name.to_owned(),
                (bytes.unwrap_or(0) as f64 / args.items as f64).into(),
            );
        }
        figures["key_bytes_per_item"] = keys.into();
    }
    if args.json {
        println!("{figures}");
    } else {
        println!(
            "batch-submit {}: {} items in {calls} calls of {} in {:.2} s = {items_per_sec:.0} \
             items/s ({} calls in flight over {} connections)",
            args.label,
            args.items,
            args.per_call,
            submission.seconds,
            args.concurrency,
            args.connections
        );
        println!(
            "  per call ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            percentile_ms(lat, 50.0),
            percentile_ms(lat, 90.0),
            percentile_ms(lat, 99.0),
            percentile_ms(lat, 100.0)
        );
        println!(
            "  batch {batch_id}: {}, {} items, {} queued, {} settled",
            batch_state_name(&batch),
            batch.total,
            batch.queued,
            settled(&batch)
        );
        if let Some(per_item) = figures["bytes_per_item"].as_f64() {
            println!(
                "  Redis used_memory {} -> {} B: {per_item:.0} B per queued item (keys per item: {})",
                figures["used_memory_before"],
                figures["used_memory_after"],
                figures["key_bytes_per_item"]
            );
        }
    }
    Ok(())
}

/// A GetBatch answer during a run, and when (seconds from the first SubmitBatch).
struct Progress {
    at: f64,
    batch: Batch,
}

async fn run_batch_run(args: &RunArgs, channels: &[Conn], batch_id: &str) -> anyhow::Result<()> {
    let meta = args.meta.trim_end_matches('/').to_owned();
    let started_us = unix_micros();
    let started = Instant::now();
    let give_up = started + Duration::from_secs_f64(args.duration);
    // Polls GetBatch from the first submit on until the batch is final (or paused, or gives up).
    let poller = {
        let (channel, batch_id) = (channels[0].clone(), batch_id.to_owned());
        tokio::spawn(async move {
            let mut progress: Vec<Progress> = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let answer = BatchServiceClient::new(channel.clone())
                    .get_batch(GetBatchRequest {
                        batch_id: batch_id.clone(),
                    })
                    .await;
                let at = started.elapsed().as_secs_f64();
                match answer {
                    Ok(batch) => {
                        let batch = batch.into_inner();
                        let state = batch.state();
                        progress.push(Progress { at, batch });
                        if matches!(
                            state,
                            BatchState::Done | BatchState::Cancelled | BatchState::Paused
                        ) {
                            return progress;
                        }
                    }
                    // Not created yet: the first submit has not answered.
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(_) => {}
                }
                if Instant::now() >= give_up {
                    return progress;
                }
            }
        })
    };
    let submission = submit_batch(args, channels, batch_id).await?;
    let submitted_at = started.elapsed().as_secs_f64();
    let progress = poller.await?;
    let last = progress
        .last()
        .ok_or_else(|| anyhow::anyhow!("{batch_id}: GetBatch never answered"))?;
    let done = last.batch.state() == BatchState::Done;
    let seconds = last.at;
    // The figures are read a moment after DONE: the stand-in has answered everything.
    let recorded: Recorded = reqwest::get(format!("{meta}/_bench/arrivals"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    let recipients: std::collections::HashMap<String, u32> =
        reqwest::get(format!("{meta}/_bench/recipients"))
            .await?
            .error_for_status()?
            .json()
            .await?;
    let mut accepted: Vec<u64> = recorded
        .accepted_us
        .into_iter()
        .filter(|&t| t >= started_us)
        .collect();
    accepted.sort_unstable();
    let refused = recorded
        .refused_us
        .iter()
        .filter(|&&t| t >= started_us)
        .count();
    // Every item's phone, as the stand-in keys it (E.164 digits).
    let (mut once, mut missing, mut repeated) = (0u64, 0u64, 0u64);
    for n in 0..args.items {
        let digits = format!("62812{:08}", (args.phone_offset + n) % 100_000_000);
        match recipients.get(&digits) {
            None => missing += 1,
            Some(1) => once += 1,
            Some(_) => repeated += 1,
        }
    }
    let (busiest, _) = busiest_second(&accepted);
    let first_s = accepted
        .first()
        .map_or(0.0, |&t| (t - started_us) as f64 / 1e6);
    let last_s = accepted
        .last()
        .map_or(0.0, |&t| (t - started_us) as f64 / 1e6);
    let mut per_second = vec![0u64; (last_s.ceil() as usize).max(1) + 1];
    for &t in &accepted {
        per_second[((t - started_us) / 1_000_000) as usize] += 1;
    }
    while per_second.len() > 1 && per_second.last() == Some(&0) {
        per_second.pop();
    }
    // The steady rate: the messages between 10% and 90% of the run, over the time between.
    let steady = if accepted.len() >= 10 {
        let (a, b) = (accepted.len() / 10, accepted.len() * 9 / 10);
        (b - a) as f64 / ((accepted[b] - accepted[a]) as f64 / 1e6).max(1e-6)
    } else {
        0.0
    };
    let b = &last.batch;
    let state = batch_state_name(b);
    let (submit_p50, submit_p99) = (
        percentile_ms(&submission.latencies_us, 50.0),
        percentile_ms(&submission.latencies_us, 99.0),
    );
    let figures = serde_json::json!({
        "label": args.label,
        "scenario": "batch-run",
        "target": args.target,
        "api_key": channels[0].authorization.is_some(),
        "meta": args.meta,
        "batch_id": batch_id,
        "cap": args.cap,
        "items": args.items,
        "per_call": args.per_call,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "state": state,
        "seconds_to_done": seconds,
        "messages_per_sec": args.items as f64 / seconds,
        "submit_seconds": submission.seconds,
        "submit_items_per_sec": args.items as f64 / submission.seconds,
        "submitted_at_s": submitted_at,
        "submit_p50_ms": submit_p50,
        "submit_p99_ms": submit_p99,
        "accepted": b.accepted,
        "failed": b.failed,
        "unknown": b.unknown,
        "queued": b.queued,
        "meta_accepted": accepted.len(),
        "meta_130429": refused,
        "phones_once": once,
        "phones_missing": missing,
        "phones_repeated": repeated,
        "meta_first_s": first_s,
        "meta_last_s": last_s,
        "busiest_window": busiest,
        "steady_per_sec": steady,
        "accepted_per_second": per_second,
    });
    if args.json {
        println!("{figures}");
    } else {
        println!(
            "batch-run {}: {} items, {state} after {seconds:.2} s = {:.0} messages/s from the \
             first SubmitBatch",
            args.label,
            args.items,
            args.items as f64 / seconds
        );
        println!(
            "  submitted in {:.2} s = {:.0} items/s while sending (calls of {}, {} in flight; \
             per call p50 {submit_p50:.2} ms, p99 {submit_p99:.2} ms)",
            submission.seconds,
            args.items as f64 / submission.seconds,
            args.per_call,
            args.concurrency
        );
        println!(
            "  batch: {} accepted, {} failed, {} unknown, {} queued",
            b.accepted, b.failed, b.unknown, b.queued
        );
        println!(
            "  Meta stand-in: {} accepted, {refused} answered 130429, first at {first_s:.2} s, \
             last at {last_s:.2} s; busiest 1-s window {busiest}; {steady:.0}/s between 10% and \
             90% of the run",
            accepted.len()
        );
        println!(
            "  phones: {once} once, {missing} missing, {repeated} more than once (of {})",
            args.items
        );
        println!("  accepted per second: {}", figures["accepted_per_second"]);
    }
    anyhow::ensure!(
        done,
        "{batch_id}: not DONE after {seconds:.1} s (state {state}, {} queued; -d is the longest \
         wait)",
        b.queued
    );
    anyhow::ensure!(
        b.accepted == args.items && b.failed == 0 && b.unknown == 0,
        "{batch_id}: {} accepted, {} failed, {} unknown of {} items",
        b.accepted,
        b.failed,
        b.unknown,
        args.items
    );
    anyhow::ensure!(
        once == args.items && accepted.len() as u64 == args.items,
        "{batch_id}: the stand-in accepted {} messages; {once} phones once, {missing} missing, \
         {repeated} more than once (start it with --cap, fresh for the run)",
        accepted.len()
    );
    Ok(())
}

fn report(args: &RunArgs, tally: &mut Tally, elapsed: f64, api_key: bool) {
    tally.latencies_us.sort_unstable();
    let calls = tally.latencies_us.len();
    let pct = |p: f64| -> f64 {
        if calls == 0 {
            return 0.0;
        }
        let idx = ((p / 100.0) * calls as f64).ceil() as usize;
        f64::from(tally.latencies_us[idx.clamp(1, calls) - 1]) / 1000.0
    };
    let rate = calls as f64 / elapsed;
    let (p50, p90, p99, max) = (pct(50.0), pct(90.0), pct(99.0), pct(100.0));
    let scenario = args
        .scenario
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned());
    let webhook = args.scenario == Scenario::Webhook;
    if args.json {
        let mut figures = serde_json::json!({
            "label": args.label,
            "scenario": scenario,
            "target": if webhook { &args.webhook } else { &args.target },
            "api_key": api_key,
            "concurrency": args.concurrency,
            "connections": if webhook { args.concurrency } else { args.connections },
            "seconds": elapsed,
            "calls": calls,
            "calls_per_sec": rate,
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
            "errors": tally.errors,
            "results": tally.results,
        });
        if webhook {
            figures["batch"] = args.batch.into();
            figures["updates_per_sec"] = (rate * args.batch as f64).into();
        }
        println!("{figures}");
    } else {
        println!(
            "{scenario} {}: {calls} calls in {elapsed:.1} s = {rate:.0} calls/s, c={} m={}{}",
            args.label,
            args.concurrency,
            args.connections,
            if api_key { ", with an API key" } else { "" }
        );
        if webhook {
            println!(
                "  {:.0} status updates/s ({} per POST, a new connection each)",
                rate * args.batch as f64,
                args.batch
            );
        }
        println!("  latency ms: p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}");
        println!("  results: {:?}", tally.results);
        println!("  errors by code: {:?}", tally.errors);
    }
}

/// Gives every other phone of the verify scenario a pending code (sent through kabar to the
/// stand-in, many at once), then reads back from the stand-in which code each phone got.
async fn prepare_verify(
    args: &RunArgs,
    channels: &[Conn],
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for w in 0..64 {
        let mut client = OtpServiceClient::new(channels[w % channels.len()].clone());
        let (next, phones) = (next.clone(), args.phones);
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(2, Ordering::Relaxed);
                if i >= phones {
                    return Ok::<(), tonic::Status>(());
                }
                client
                    .send_otp(SendOtpRequest {
                        phone: verify_phone(i),
                        purpose: "login".into(),
                        client_ip: String::new(),
                    })
                    .await?;
            }
        }));
    }
    for sender in senders {
        if let Err(s) = sender.await? {
            anyhow::bail!(
                "preparing verify: SendOtp failed: {:?} {} (configure kabar with \
                 KABAR_OTP_RESEND_SECONDS=0 and a high KABAR_OTP_DAILY_LIMIT)",
                s.code(),
                s.message()
            );
        }
    }
    let codes: std::collections::HashMap<String, String> =
        reqwest::get(format!("{}/_bench/codes", args.meta.trim_end_matches('/')))
            .await?
            .json()
            .await?;
    let pending = (0..args.phones)
        .step_by(2)
        .filter(|i| codes.contains_key(&verify_phone(*i)))
        .count();
    eprintln!(
        "verify: {pending} of {} phones have a pending code",
        args.phones
    );
    Ok(codes)
}

/// What a scenario prepared before measuring.
#[derive(Default)]
struct Prepared {
    /// verify: the pending code of each phone that has one.
    codes: std::collections::HashMap<String, String>,
    /// webhook, get-status: messages sent through kabar, as (message id, recipient's wa_id).
    messages: Vec<(String, String)>,
    /// webhook: the signed poster.
    webhook: Option<WebhookPoster>,
    /// webhook: when the messages were sent (unix seconds); statuses are dated after it.
    since_secs: u64,
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The SendTemplate call of the send-template scenario, to the n-th distinct phone.
fn invoice_request(n: u64) -> SendTemplateRequest {
    let params = [
        ("nama", "Budi Santoso".to_owned()),
        ("periode", "November 2026".to_owned()),
        ("no_invoice", format!("INV/2026/11/{n:06}")),
        ("paket", "Home 30 Mbps".to_owned()),
        ("nominal", "Rp 250.000".to_owned()),
        ("jatuh_tempo", "10 Desember 2026".to_owned()),
        ("customer_id", format!("CUST-{n:06}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    SendTemplateRequest {
        phone: distinct_phone(n),
        template: "invoice_notification".into(),
        params,
        ..Default::default()
    }
}

/// The states a webhook run reports, in order: each message passes through all three.
const REPORTED: [&str; 3] = ["sent", "delivered", "read"];

/// Sends `--messages` invoice notifications through kabar (phones from `--phone-offset`) and
/// returns their ids in order; with `report_read`, then posts sent, delivered and read for every
/// one of them through the webhook, so that each record holds four status changes.
async fn prepare_messages(
    args: &RunArgs,
    channels: &[Conn],
    report_read: bool,
) -> anyhow::Result<Vec<(String, String)>> {
    anyhow::ensure!(args.messages > 0, "--messages must be at least 1");
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for w in 0..64 {
        let mut client = NotificationServiceClient::new(channels[w % channels.len()].clone());
        let (next, total, offset) = (next.clone(), args.messages, args.phone_offset);
        senders.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, tonic::Status>(sent);
                }
                let answer = client
                    .send_template(invoice_request(offset + i))
                    .await?
                    .into_inner();
                sent.push((i, answer.message_id, answer.wa_id));
            }
        }));
    }
    let mut messages = Vec::with_capacity(args.messages as usize);
    for sender in senders {
        match sender.await? {
            Ok(sent) => messages.extend(sent),
            Err(s) => anyhow::bail!(
                "preparing {} messages: SendTemplate failed: {:?} {}",
                args.messages,
                s.code(),
                s.message()
            ),
        }
    }
    messages.sort_unstable_by_key(|(i, _, _)| *i);
    let messages: Vec<(String, String)> = messages
        .into_iter()
        .map(|(_, id, wa_id)| (id, wa_id))
        .collect();
    let sent_in = started.elapsed().as_secs_f64();
    if report_read {
        let poster = WebhookPoster::new(args)?;
        let since = unix_secs();
        let messages = Arc::new(messages.clone());
        for (pass, state) in REPORTED.into_iter().enumerate() {
            let blocks = messages.len().div_ceil(args.batch);
            let next = Arc::new(AtomicU64::new(0));
            let mut posters = Vec::new();
            for _ in 0..16 {
                let (next, messages, poster, batch) =
                    (next.clone(), messages.clone(), poster.clone(), args.batch);
                posters.push(tokio::spawn(async move {
                    loop {
                        let block = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if block >= blocks {
                            return Ok::<(), String>(());
                        }
                        let end = ((block + 1) * batch).min(messages.len());
                        let body = status_body(
                            &messages[block * batch..end],
                            state,
                            since + 1 + pass as u64,
                        );
                        match poster.post(&body).await? {
                            200 => {}
                            code => return Err(format!("HTTP {code}")),
                        }
                    }
                }));
            }
            for poster in posters {
                if let Err(e) = poster.await? {
                    anyhow::bail!("preparing: posting {state} statuses to the webhook: {e}");
                }
            }
        }
    }
    eprintln!(
        "{}: {} messages sent through kabar in {sent_in:.1} s{}",
        args.label,
        messages.len(),
        if report_read {
            format!(
                ", then reported sent, delivered and read through the webhook in {:.1} s",
                started.elapsed().as_secs_f64() - sent_in
            )
        } else {
            String::new()
        }
    );
    Ok(messages)
}

/// A webhook body as Meta posts it: one entry, one change, `statuses[]` for these messages.
fn status_body(messages: &[(String, String)], state: &str, at_secs: u64) -> Vec<u8> {
    let statuses: Vec<serde_json::Value> = messages
        .iter()
        .map(|(id, wa_id)| {
            let mut status = serde_json::json!({
                "id": id,
                "status": state,
                "timestamp": at_secs.to_string(),
                "recipient_id": wa_id,
            });
            // Meta prices a template message on sent and delivered, not on read.
            if state != "read" {
                status["pricing"] = serde_json::json!({
                    "billable": true, "pricing_model": "PMP", "type": "regular",
                    "category": "utility"
                });
            }
            status
        })
        .collect();
    serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "102290129340398",
            "changes": [{
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "6281100000000", "phone_number_id": "1"},
                    "statuses": statuses
                },
                "field": "messages"
            }]
        }]
    })
    .to_string()
    .into_bytes()
}

/// Posts signed bodies to kabar's webhook, one HTTP/1.1 connection per request.
#[derive(Clone)]
struct WebhookPoster {
    /// host:port
    addr: String,
    path: String,
    mac: Hmac<Sha256>,
}

impl WebhookPoster {
    fn new(args: &RunArgs) -> anyhow::Result<Self> {
        let rest = args
            .webhook
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("--webhook must be an http:// URL"))?;
        let (addr, path) = match rest.split_once('/') {
            Some((addr, path)) if !path.is_empty() => (addr, format!("/{path}")),
            Some((addr, _)) => (addr, String::new()),
            None => (rest, String::new()),
        };
        let path = if path.is_empty() {
            "/webhook/whatsapp/meta".to_owned()
        } else {
            path
        };
        anyhow::ensure!(
            !args.app_secret.is_empty(),
            "--app-secret is required: kabar's META_APP_SECRET, to sign the webhook bodies"
        );
        Ok(WebhookPoster {
            addr: addr.to_owned(),
            path,
            mac: Hmac::<Sha256>::new_from_slice(args.app_secret.as_bytes())?,
        })
    }

    /// Posts one body, signed as Meta signs it, on a new connection; answers the HTTP status.
    async fn post(&self, body: &[u8]) -> Result<u16, String> {
        let mut mac = self.mac.clone();
        mac.update(body);
        let signature = hex::encode(mac.finalize().into_bytes());
        let mut request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nX-Hub-Signature-256: sha256={signature}\r\n\
             Connection: close\r\n\r\n",
            self.path,
            self.addr,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        let mut stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|_| "connect".to_owned())?;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(&request)
            .await
            .map_err(|_| "write".to_owned())?;
        let mut answer = Vec::with_capacity(256);
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|_| "read".to_owned())?;
        // "HTTP/1.1 200 OK"
        answer
            .get(9..12)
            .and_then(|code| std::str::from_utf8(code).ok())
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| "no HTTP answer".to_owned())
    }
}

/// Phones of the verify scenario: +62813 followed by 8 digits.
fn verify_phone(i: u64) -> String {
    format!("+62813{:08}", i % 100_000_000)
}

/// Distinct recipients of send-otp / send-template: +62812 followed by 8 digits.
fn distinct_phone(n: u64) -> String {
    format!("+62812{:08}", n % 100_000_000)
}

struct Caller {
    health: Option<HealthClient<Conn>>,
    otp: Option<OtpServiceClient<Conn>>,
    notifications: Option<NotificationServiceClient<Conn>>,
    http: reqwest::Client,
    /// xorshift state: cheap per-call randomness for the verify mix.
    rng: u64,
}

impl Caller {
    fn new(args: &RunArgs, channel: Option<Conn>, http: reqwest::Client, seed: u64) -> Self {
        Caller {
            health: channel.clone().map(HealthClient::new),
            otp: channel.clone().map(OtpServiceClient::new),
            notifications: channel.map(NotificationServiceClient::new),
            http,
            rng: (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ args.phone_offset,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    async fn call(&mut self, args: &RunArgs, sequence: &AtomicU64, prepared: &Prepared) -> Outcome {
        match args.scenario {
            Scenario::Health => self
                .health
                .as_mut()
                .expect("channel")
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| "ok")
                .map_err(|s| format!("{:?}", s.code())),
            Scenario::Verify => {
                let phone = verify_phone(self.next() % args.phones);
                let right = prepared.codes.get(&phone);
                let roll = (self.next() % 1_000_000) as f64 / 1_000_000.0;
                let code = match right {
                    Some(code) if roll < args.right_share => code.clone(),
                    // A wrong code of the right length: each digit shifted by one.
                    Some(code) => code
                        .bytes()
                        .map(|b| char::from(b'0' + (b - b'0' + 1) % 10))
                        .collect(),
                    None => "000000".to_owned(),
                };
                self.otp
                    .as_mut()
                    .expect("channel")
                    .verify_otp(VerifyOtpRequest {
                        phone,
                        purpose: "login".into(),
                        code,
                    })
                    .await
                    .map(|r| match r.into_inner().result() {
                        VerifyResult::Verified => "verified",
                        VerifyResult::InvalidCode => "invalid_code",
                        VerifyResult::Expired => "expired",
                        VerifyResult::TooManyAttempts => "too_many_attempts",
                        VerifyResult::Unspecified => "unspecified",
                    })
                    .map_err(|s| format!("{:?}", s.code()))
            }
            Scenario::VerifyInvalid => {
                let phone = verify_phone(self.next() % args.phones);
                match self
                    .otp
                    .as_mut()
                    .expect("channel")
                    .verify_otp(VerifyOtpRequest {
                        phone,
                        purpose: "login".into(),
                        code: "12345x".into(),
                    })
                    .await
                {
                    Err(s) if s.code() == tonic::Code::InvalidArgument => Ok("invalid_argument"),
                    Ok(_) => Err("OK (expected INVALID_ARGUMENT)".to_owned()),
                    Err(s) => Err(format!("{:?}", s.code())),
                }
            }
            Scenario::SendOtp => {
                let n = sequence.fetch_add(1, Ordering::Relaxed);
                self.otp
                    .as_mut()
                    .expect("channel")
                    .send_otp(SendOtpRequest {
                        phone: distinct_phone(n),
                        purpose: "login".into(),
                        client_ip: String::new(),
                    })
                    .await
                    .map(|_| "sent")
                    .map_err(|s| format!("{:?}", s.code()))
            }
            Scenario::SendTemplate => {
                let n = sequence.fetch_add(1, Ordering::Relaxed);
                self.notifications
                    .as_mut()
                    .expect("channel")
                    .send_template(invoice_request(n))
                    .await
                    .map(|_| "sent")
                    .map_err(|s| format!("{:?}", s.code()))
            }
            Scenario::MetaDirect => {
                let n = sequence.fetch_add(1, Ordering::Relaxed);
                let body = serde_json::json!({
                    "messaging_product": "whatsapp", "recipient_type": "individual",
                    "to": distinct_phone(n), "type": "template",
                    "template": {"name": "invoice_notification", "language": {"code": "id"}}
                });
                match self
                    .http
                    .post(format!("{}/v24.0/1/messages", args.target))
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => Ok("ok"),
                        Err(_) => Err("body".to_owned()),
                    },
                    Ok(r) => Err(format!("http {}", r.status().as_u16())),
                    Err(_) => Err("connect".to_owned()),
                }
            }
            Scenario::Webhook => {
                // Batch b covers block b % blocks of the messages; the passes go sent,
                // delivered, read. Past the third pass every update is a duplicate.
                let b = (sequence.fetch_add(1, Ordering::Relaxed) - args.phone_offset) as usize;
                let messages = &prepared.messages;
                let blocks = messages.len().div_ceil(args.batch);
                let (pass, block) = (b / blocks, b % blocks);
                let end = ((block + 1) * args.batch).min(messages.len());
                let body = status_body(
                    &messages[block * args.batch..end],
                    REPORTED[pass % REPORTED.len()],
                    prepared.since_secs + 1 + pass as u64,
                );
                match prepared.webhook.as_ref().expect("poster").post(&body).await {
                    Ok(200) if pass < REPORTED.len() => Ok("stored"),
                    Ok(200) => Ok("stored_duplicates"),
                    Ok(code) => Err(format!("http {code}")),
                    Err(e) => Err(e),
                }
            }
            Scenario::Pacing => unreachable!("run_pacing drives the pacing scenario"),
            Scenario::BatchSubmit | Scenario::BatchRun => {
                unreachable!("run_batch drives the batch scenarios")
            }
            Scenario::GetStatus => {
                let messages = &prepared.messages;
                let (id, _) = &messages[(self.next() % messages.len() as u64) as usize];
                match self
                    .notifications
                    .as_mut()
                    .expect("channel")
                    .get_message_status(GetMessageStatusRequest {
                        message_id: id.clone(),
                    })
                    .await
                {
                    Ok(r) => {
                        let record = r.into_inner();
                        match (record.state(), record.history.len()) {
                            (MessageState::Read, 4) => Ok("read"),
                            (state, changes) => Err(format!(
                                "{state:?} with {changes} changes (expected READ with 4)"
                            )),
                        }
                    }
                    Err(s) => Err(format!("{:?}", s.code())),
                }
            }
        }
    }
}

/// One benchmark run's JSON lines, by label.
type RunFigures = BTreeMap<String, serde_json::Value>;

fn load_run(path: &std::path::Path) -> anyhow::Result<RunFigures> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut by_label = RunFigures::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let label = v["label"].as_str().unwrap_or_default().to_owned();
        by_label.insert(label, v);
    }
    Ok(by_label)
}

/// A field of one scenario; a scenario run more than once (labelled `name`, `name#2`, ...)
/// counts with the mean of its runs.
fn mean(run: &RunFigures, label: &str, field: &str) -> Option<f64> {
    let values: Vec<f64> = run
        .iter()
        .filter(|(l, _)| *l == label || l.strip_prefix(label).is_some_and(|r| r.starts_with('#')))
        .filter_map(|(_, v)| v[field].as_f64())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// One line of the targets table.
struct Target {
    name: &'static str,
    /// `None`: a figure reported without a goal.
    goal: Option<&'static str>,
    /// How a value reads in the spread over several runs.
    show: fn(f64) -> String,
    measured: Option<Measured>,
}

struct Measured {
    value: f64,
    /// How the value was reached, for one run's table.
    text: String,
    met: bool,
}

fn percent(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

fn nanos(v: f64) -> String {
    format!("{v:.0} ns")
}

fn per_sec(v: f64) -> String {
    format!("{v:.0} calls/s")
}

fn percent1(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

/// A pacing run's figure against its cap: `field` counts, `ratio` is it divided by the cap.
fn of_cap(
    run: &RunFigures,
    label: &str,
    field: &str,
    ratio: &str,
    unit: &str,
    met: fn(f64) -> bool,
) -> Option<Measured> {
    let v = run.get(label)?;
    let (n, r, cap) = (v[field].as_f64()?, v[ratio].as_f64()?, v["cap"].as_f64()?);
    Some(Measured {
        value: r,
        text: format!("{n:.0}{unit} / {cap:.0} = {}", percent1(r)),
        met: met(r),
    })
}

/// The 130429 answers the capped stand-in gave during a pacing run.
fn throttled(run: &RunFigures, label: &str) -> Option<Measured> {
    let v = run.get(label)?;
    let (n, posts) = (v["meta_130429"].as_f64()?, v["meta_posts"].as_f64()?);
    Some(Measured {
        value: n,
        text: format!("{n:.0} of {posts:.0} POSTs"),
        met: n == 0.0,
    })
}

fn ratio(a: Option<f64>, b: Option<f64>, goal: f64) -> Option<Measured> {
    let (a, b) = (a?, b?);
    let r = a / b;
    Some(Measured {
        value: r,
        text: format!("{a:.0} / {b:.0} = {}", percent(r)),
        met: r >= goal,
    })
}

fn plain(
    value: Option<f64>,
    show: fn(f64) -> String,
    met: impl Fn(f64) -> bool,
) -> Option<Measured> {
    value.map(|v| Measured {
        value: v,
        text: show(v),
        met: met(v),
    })
}

/// The peak resident memory of each kabar process a run started, in KiB.
const RSS_FIELDS: [(&str, &str); 3] = [
    (
        "kabar_peak_rss_kb",
        "0 ms Meta, every scenario before the 200 ms ones",
    ),
    (
        "kabar_200ms_peak_rss_kb",
        "200 ms Meta, after 256 in flight",
    ),
    (
        "kabar_200ms_1024_peak_rss_kb",
        "200 ms Meta, after 1,024 in flight",
    ),
];

/// The benchmark's targets, checked against one run's figures. Every ratio divides by kabar's
/// own health check measured in the same run; the bare tonic server only tells how noisy the
/// machine was, since kabar's health check is that same tonic service.
fn targets(run: &RunFigures) -> Vec<Target> {
    let rate = |label: &str| mean(run, label, "calls_per_sec");
    let p50 = |label: &str| mean(run, label, "p50_ms");
    let p99 = |label: &str| mean(run, label, "p99_ms");
    let rss = RSS_FIELDS
        .iter()
        .filter_map(|(field, _)| run.get("rss")?[*field].as_f64())
        .fold(None::<f64>, |acc, v| Some(acc.map_or(v, |a| a.max(v))));
    let phone = |field: &str| run.get("phone-normalize")?[field].as_f64();
    let memory = |field: &str| run.get("redis-memory")?[field].as_f64();
    let bytes = |b: f64| format!("{b:.0} B");
    let mut list = vec![
        Target {
            name: "noise check: kabar health / bare tonic health (the same tonic service; mean of interleaved runs)",
            goal: Some(">= 80%"),
            show: percent,
            measured: ratio(rate("health"), rate("bare-health"), 0.80),
        },
        Target {
            name: "kabar's own per-call work: verify-invalid (VerifyOtp refused as INVALID_ARGUMENT) / kabar health",
            goal: None,
            show: percent,
            measured: ratio(rate("verify-invalid"), rate("health"), 0.0),
        },
        Target {
            name: "kabar's own per-call work: verify-invalid p50 - kabar health p50",
            goal: None,
            show: |v| format!("{v:+.2} ms"),
            measured: p50("verify-invalid")
                .zip(p50("health"))
                .map(|(a, b)| Measured {
                    value: a - b,
                    text: format!("{a:.2} - {b:.2} = {:+.2} ms", a - b),
                    met: true,
                }),
        },
        Target {
            name: "verify (Redis) / kabar health",
            goal: Some(">= 40%"),
            show: percent,
            measured: ratio(rate("verify"), rate("health"), 0.40),
        },
        Target {
            name: "verify p99 at 64 in flight",
            goal: Some("< 10 ms"),
            show: ms,
            measured: plain(p99("verify"), ms, |p| p < 10.0),
        },
        Target {
            name: "send-template (0 ms Meta) / kabar health",
            goal: Some(">= 12%"),
            show: percent,
            measured: ratio(rate("send-template"), rate("health"), 0.12),
        },
        Target {
            name: "send-otp (0 ms Meta) / kabar health",
            goal: Some(">= 12%"),
            show: percent,
            measured: ratio(rate("send-otp"), rate("health"), 0.12),
        },
        Target {
            name: "pacing overhead: send-template paced / unpaced (KABAR_PACING_ENABLED=false), cap far above the load",
            goal: Some(">= 80%"),
            show: percent,
            measured: ratio(rate("send-template"), rate("send-template-unpaced"), 0.80),
        },
        Target {
            name: "pacing overhead: send-otp paced / unpaced (KABAR_PACING_ENABLED=false), cap far above the load",
            goal: Some(">= 80%"),
            show: percent,
            measured: ratio(rate("send-otp"), rate("send-otp-unpaced"), 0.80),
        },
        Target {
            name: "send-template, 200 ms Meta, 256 in flight: calls/s",
            goal: Some(">= 1000"),
            show: per_sec,
            measured: plain(rate("send-template-200ms"), per_sec, |r| r >= 1000.0),
        },
        Target {
            name: "send-template, 200 ms Meta, 256 in flight: p99",
            goal: Some("< 300 ms"),
            show: ms,
            measured: plain(p99("send-template-200ms"), ms, |p| p < 300.0),
        },
        Target {
            name: "send-template, 200 ms Meta, 1,024 in flight: calls/s",
            goal: None,
            show: per_sec,
            measured: plain(rate("send-template-200ms-1024"), per_sec, |_| true),
        },
        Target {
            name: "send-template, 200 ms Meta, 1,024 in flight: p99",
            goal: None,
            show: ms,
            measured: plain(p99("send-template-200ms-1024"), ms, |_| true),
        },
        Target {
            name: "Meta stand-in alone (0 ms) / send-template",
            goal: Some("stand-in faster"),
            show: |v| format!("{v:.2}x"),
            measured: rate("meta-direct-0ms")
                .zip(rate("send-template"))
                .map(|(m, s)| Measured {
                    value: m / s,
                    text: format!("{m:.0} vs {s:.0} calls/s"),
                    met: m > s,
                }),
        },
        Target {
            name: "kabar peak resident memory (highest of its processes)",
            goal: Some("<= 64 MiB"),
            show: |kb| format!("{:.1} MiB", kb / 1024.0),
            measured: rss.map(|kb| Measured {
                value: kb,
                text: format!("{:.1} MiB", kb / 1024.0),
                met: kb <= 64.0 * 1024.0,
            }),
        },
        Target {
            name: "Redis bytes per pending OTP (its key; no index exists)",
            goal: Some("<= 200 B"),
            show: |b| format!("{b:.0} B"),
            measured: plain(memory("code_key_bytes"), bytes, |b| b <= 200.0),
        },
        Target {
            name: "webhook ingest: status updates/s (signed POSTs of 100, a new connection each)",
            goal: Some(">= 10000"),
            show: |v| format!("{v:.0} updates/s"),
            measured: mean(run, "webhook", "updates_per_sec")
                .zip(rate("webhook"))
                .map(|(u, r)| Measured {
                    value: u,
                    text: format!("{r:.0} POSTs/s x 100 = {u:.0} updates/s"),
                    met: u >= 10_000.0,
                }),
        },
        Target {
            name: "webhook ingest: p99 per POST of 100 updates",
            goal: Some("< 100 ms"),
            show: ms,
            measured: plain(p99("webhook"), ms, |p| p < 100.0),
        },
        Target {
            name: "get-status (GetMessageStatus, Redis) / kabar health",
            goal: Some(">= 40%"),
            show: percent,
            measured: ratio(rate("get-status"), rate("health"), 0.40),
        },
        Target {
            name: "Redis bytes per message record (accepted, sent, delivered, read)",
            goal: Some("<= 400 B"),
            show: bytes,
            measured: plain(memory("record_bytes"), bytes, |b| b <= 400.0),
        },
        Target {
            name: "Redis bytes per event feed entry (kabar:events)",
            goal: None,
            show: bytes,
            measured: plain(memory("feed_entry_bytes"), bytes, |_| true),
        },
        Target {
            name: "pacing accuracy, cap 80, 3 replicas, 3x offered: busiest 1-s window of POSTs at Meta / cap",
            goal: Some("<= 101%"),
            show: percent1,
            measured: of_cap(
                run,
                "pacing-80",
                "busiest_window",
                "busiest_window_ratio",
                "",
                |r| r <= 1.01,
            ),
        },
        Target {
            name: "pacing accuracy, cap 80: messages/s Meta accepted after the first second / cap",
            goal: Some(">= 97%"),
            show: percent1,
            measured: of_cap(
                run,
                "pacing-80",
                "steady_per_sec",
                "steady_ratio",
                "/s",
                |r| r >= 0.97,
            ),
        },
        Target {
            name: "pacing accuracy, cap 80: Meta's 130429 answers",
            goal: Some("0"),
            show: |v| format!("{v:.0}"),
            measured: throttled(run, "pacing-80"),
        },
        Target {
            name: "pacing accuracy, cap 1,000, 3 replicas, 3x offered: busiest 1-s window of POSTs at Meta / cap",
            goal: Some("<= 101%"),
            show: percent1,
            measured: of_cap(
                run,
                "pacing-1000",
                "busiest_window",
                "busiest_window_ratio",
                "",
                |r| r <= 1.01,
            ),
        },
        Target {
            name: "pacing accuracy, cap 1,000: messages/s Meta accepted after the first second / cap",
            goal: Some(">= 97%"),
            show: percent1,
            measured: of_cap(
                run,
                "pacing-1000",
                "steady_per_sec",
                "steady_ratio",
                "/s",
                |r| r >= 0.97,
            ),
        },
        Target {
            name: "pacing accuracy, cap 1,000: Meta's 130429 answers",
            goal: Some("0"),
            show: |v| format!("{v:.0}"),
            measured: throttled(run, "pacing-1000"),
        },
        Target {
            name: "SendOtp every 200 ms while SendTemplate saturates cap 80 (3 replicas): p50",
            goal: None,
            show: ms,
            measured: plain(p50("pacing-80-otp"), ms, |_| true),
        },
        Target {
            name: "SendOtp every 200 ms while SendTemplate saturates cap 80 (3 replicas): p99",
            goal: Some("< 1000 ms"),
            show: ms,
            measured: plain(p99("pacing-80-otp"), ms, |p| p < 1000.0),
        },
        Target {
            name: "phone::normalize, Indonesian mobile number (micro-benchmark)",
            goal: None,
            show: nanos,
            measured: plain(phone("indonesian_ns"), nanos, |_| true),
        },
        Target {
            name: "phone::normalize, non-Indonesian number (micro-benchmark)",
            goal: None,
            show: nanos,
            measured: plain(phone("other_ns"), nanos, |_| true),
        },
        Target {
            name: "phonenumber's general path, the same Indonesian number (micro-benchmark)",
            goal: None,
            show: nanos,
            measured: plain(phone("general_path_ns"), nanos, |_| true),
        },
    ];
    // What keys cost has a mode of its own (`--keys`): its lines only when it ran, and alone
    // (no sends) only the targets of health and verify beside them.
    if run.contains_key("verify-nokeys") || run.contains_key("verify-invalid-nokeys") {
        if !run.contains_key("send-template") {
            list.retain(|t| {
                ["noise check", "kabar's own", "verify"]
                    .iter()
                    .any(|p| t.name.starts_with(p))
            });
        }
        list.extend(key_targets(run));
    }
    // The batch runs have a mode of their own (`--batch`): their lines only when they ran, and
    // only theirs when nothing else did.
    let batch = |label: &String| label.starts_with("batch-");
    if !run.keys().any(batch) {
        return list;
    }
    if run.keys().all(batch) {
        list.clear();
    }
    list.extend(batch_targets(run));
    list
}

/// What API keys cost: kabar with KABAR_API_KEYS_FILE (every call but health with a key)
/// against the same kabar without, run beside it (`-nokeys`), and health with a key sent.
fn key_targets(run: &RunFigures) -> Vec<Target> {
    let rate = |label: &str| mean(run, label, "calls_per_sec");
    let p50 = |label: &str| mean(run, label, "p50_ms");
    let p99 = |label: &str| mean(run, label, "p99_ms");
    let more_ms = |a: Option<f64>, b: Option<f64>| {
        a.zip(b).map(|(a, b)| Measured {
            value: a - b,
            text: format!("{a:.2} - {b:.2} = {:+.2} ms", a - b),
            met: true,
        })
    };
    vec![
        Target {
            name: "API keys: verify-invalid with a key / the same kabar without KABAR_API_KEYS_FILE",
            goal: None,
            show: percent,
            measured: ratio(rate("verify-invalid"), rate("verify-invalid-nokeys"), 0.0),
        },
        Target {
            name: "API keys: verify-invalid p50 with a key - without",
            goal: None,
            show: |v| format!("{v:+.2} ms"),
            measured: more_ms(p50("verify-invalid"), p50("verify-invalid-nokeys")),
        },
        Target {
            name: "API keys: verify (Redis) with a key / the same kabar without KABAR_API_KEYS_FILE",
            goal: None,
            show: percent,
            measured: ratio(rate("verify"), rate("verify-nokeys"), 0.0),
        },
        Target {
            name: "API keys: verify p99 with a key - without",
            goal: None,
            show: |v| format!("{v:+.2} ms"),
            measured: more_ms(p99("verify"), p99("verify-nokeys")),
        },
        Target {
            name: "verify (Redis) on the kabar without KABAR_API_KEYS_FILE / kabar health",
            goal: Some(">= 40%"),
            show: percent,
            measured: ratio(rate("verify-nokeys"), rate("health"), 0.40),
        },
        Target {
            name: "health with a key sent / without (health is open: the key is carried, not checked)",
            goal: None,
            show: percent,
            measured: ratio(rate("health-with-key"), rate("health"), 0.0),
        },
    ]
}

/// The targets of the batch runs.
fn batch_targets(run: &RunFigures) -> Vec<Target> {
    let submit = |field: &str| run.get("batch-submit")?[field].as_f64();
    let batch_run = |field: &str| run.get("batch-run")?[field].as_f64();
    let items_per_sec = |v: f64| format!("{v:.0} items/s");
    let msgs_per_sec = |v: f64| format!("{v:.0} messages/s");
    vec![
        Target {
            name: "batch: SubmitBatch items/s, calls of 1,000, 4 in flight, nothing sent (batch paused)",
            goal: Some(">= 20000"),
            show: items_per_sec,
            measured: submit("items_per_sec").map(|v| Measured {
                value: v,
                text: format!(
                    "{:.0} items in {:.2} s = {v:.0} items/s",
                    submit("items").unwrap_or(0.0),
                    submit("seconds").unwrap_or(0.0)
                ),
                met: v >= 20_000.0,
            }),
        },
        Target {
            name: "batch: SubmitBatch per call of 1,000 items, nothing sent: p99",
            goal: None,
            show: ms,
            measured: plain(submit("p99_ms"), ms, |_| true),
        },
        Target {
            name: "batch: SubmitBatch items/s while the same batch is being sent (the run below)",
            goal: None,
            show: items_per_sec,
            measured: plain(batch_run("submit_items_per_sec"), items_per_sec, |_| true),
        },
        Target {
            name: "batch: Redis bytes per queued item (used_memory after - before, / items)",
            goal: Some("<= 1024 B"),
            show: |b| format!("{b:.0} B"),
            measured: submit("bytes_per_item").map(|b| Measured {
                value: b,
                text: format!(
                    "({:.0} - {:.0}) / {:.0} = {b:.0} B",
                    submit("used_memory_after").unwrap_or(0.0),
                    submit("used_memory_before").unwrap_or(0.0),
                    submit("items").unwrap_or(0.0)
                ),
                met: b <= 1024.0,
            }),
        },
        Target {
            name: "batch run, 200 ms Meta capped at 1,000/s, KABAR_META_MAX_MPS=1000: first SubmitBatch to DONE",
            goal: Some("100,000 in <= 110 s"),
            show: |s| format!("{s:.1} s"),
            measured: batch_run("seconds_to_done").map(|s| {
                let items = batch_run("items").unwrap_or(0.0);
                Measured {
                    value: s,
                    text: format!("{items:.0} items in {s:.1} s = {:.0} messages/s", items / s),
                    // The goal is for 100,000 items: a smaller run is held to the same rate.
                    met: s <= 110.0 * items / 100_000.0,
                }
            }),
        },
        Target {
            name: "batch run: messages/s at Meta between 10% and 90% of the run",
            goal: None,
            show: msgs_per_sec,
            measured: plain(batch_run("steady_per_sec"), msgs_per_sec, |_| true),
        },
        Target {
            name: "batch run: every item's phone at Meta exactly once",
            goal: Some("all"),
            show: |v| format!("{:.0}%", v * 100.0),
            measured: batch_run("phones_once").map(|once| {
                let items = batch_run("items").unwrap_or(0.0);
                Measured {
                    value: once / items.max(1.0),
                    text: format!(
                        "{once:.0} of {items:.0} ({:.0} missing, {:.0} more than once)",
                        batch_run("phones_missing").unwrap_or(0.0),
                        batch_run("phones_repeated").unwrap_or(0.0)
                    ),
                    met: once == items && batch_run("meta_accepted") == Some(items),
                }
            }),
        },
        Target {
            name: "batch run: Meta's 130429 answers",
            goal: Some("0"),
            show: |v| format!("{v:.0}"),
            measured: batch_run("meta_130429").map(|n| Measured {
                value: n,
                text: format!(
                    "{n:.0} of {:.0} POSTs",
                    n + batch_run("meta_accepted").unwrap_or(0.0)
                ),
                met: n == 0.0,
            }),
        },
    ]
}

fn met_word(target: &Target, met: bool) -> &'static str {
    match (target.goal, met) {
        (None, _) => "-",
        (Some(_), true) => "yes",
        (Some(_), false) => "**no**",
    }
}

/// Prints one run's scenarios and targets, or the spread of the targets over several runs.
fn summarize(paths: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let runs = paths
        .iter()
        .map(|p| load_run(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    match runs.as_slice() {
        [run] => summarize_one(run),
        _ => summarize_spread(&runs),
    }
    Ok(())
}

fn summarize_one(run: &RunFigures) {
    println!("| scenario | calls/s | p50 ms | p90 ms | p99 ms | max ms | results | errors |");
    println!("|---|---:|---:|---:|---:|---:|---|---|");
    for (label, v) in run {
        if v.get("calls_per_sec").is_none() {
            continue;
        }
        let shape = match v["every_ms"].as_u64() {
            Some(every) => format!("one every {every} ms"),
            None => format!("c={}, m={}", v["concurrency"], v["connections"]),
        };
        println!(
            "| {label} ({shape}) | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            v["calls_per_sec"].as_f64().unwrap_or(0.0),
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p90_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0),
            v["max_ms"].as_f64().unwrap_or(0.0),
            v["results"],
            v["errors"]
        );
    }
    println!();
    println!("| target | measured | goal | met |");
    println!("|---|---|---|---|");
    for target in targets(run) {
        let goal = target.goal.unwrap_or("-");
        match &target.measured {
            Some(m) => println!(
                "| {} | {} | {goal} | {} |",
                target.name,
                m.text,
                met_word(&target, m.met)
            ),
            None => println!("| {} | not measured | {goal} | - |", target.name),
        }
    }
    for (label, v) in run {
        if v["scenario"] != "pacing" {
            continue;
        }
        println!(
            "\n{label}: {} replicas at KABAR_META_MAX_MPS={}, SendTemplate offered at {:.0} calls/s \
             for {:.1} s (deadline {} ms, a new phone each): kabar answered {} (errors {}); sent \
             p50 {:.0} ms, p99 {:.0} ms. The stand-in got {} POSTs, {} accepted and {} answered \
             130429; busiest 1-s window {} (from {:.2} s); accepted per second {}.",
            v["replicas"],
            v["cap"],
            v["offered_per_sec"].as_f64().unwrap_or(0.0),
            v["offered_seconds"].as_f64().unwrap_or(0.0),
            v["deadline_ms"],
            v["results"],
            v["errors"],
            v["sent_p50_ms"].as_f64().unwrap_or(0.0),
            v["sent_p99_ms"].as_f64().unwrap_or(0.0),
            v["meta_posts"],
            v["meta_accepted"],
            v["meta_130429"],
            v["busiest_window"],
            v["busiest_window_at_s"].as_f64().unwrap_or(0.0),
            v["accepted_per_second"]
        );
    }
    if let Some(v) = run.get("batch-submit") {
        println!(
            "\nbatch-submit: {} items in calls of {}, {} in flight over {} connections, in {:.2} s \
             (per call p50 {:.2} ms, p99 {:.2} ms); the batch then {} with {} queued and {} sent; \
             Redis per item, by key: {}.",
            v["items"],
            v["per_call"],
            v["concurrency"],
            v["connections"],
            v["seconds"].as_f64().unwrap_or(0.0),
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0),
            v["state"].as_str().unwrap_or_default(),
            v["queued"],
            v["sent"],
            v["key_bytes_per_item"]
        );
    }
    if let Some(v) = run.get("batch-run") {
        println!(
            "\nbatch-run: {} items, {} after {:.2} s; submitted in {:.2} s (per call p50 {:.2} ms, \
             p99 {:.2} ms) while the workers sent; batch counts {} accepted, {} failed, {} \
             unknown. The stand-in accepted {} (first at {:.2} s, last at {:.2} s), answered {} \
             with 130429; busiest 1-s window {}; accepted per second {}.",
            v["items"],
            v["state"].as_str().unwrap_or_default(),
            v["seconds_to_done"].as_f64().unwrap_or(0.0),
            v["submit_seconds"].as_f64().unwrap_or(0.0),
            v["submit_p50_ms"].as_f64().unwrap_or(0.0),
            v["submit_p99_ms"].as_f64().unwrap_or(0.0),
            v["accepted"],
            v["failed"],
            v["unknown"],
            v["meta_accepted"],
            v["meta_first_s"].as_f64().unwrap_or(0.0),
            v["meta_last_s"].as_f64().unwrap_or(0.0),
            v["meta_130429"],
            v["busiest_window"],
            v["accepted_per_second"]
        );
    }
    let keyed: Vec<&str> = run
        .iter()
        .filter(|(_, v)| v["api_key"].as_bool() == Some(true))
        .map(|(label, _)| label.as_str())
        .collect();
    if keyed.is_empty() {
        println!("\nAPI keys: no call sent one.");
    } else {
        println!(
            "\nAPI keys: the gRPC calls of {} sent `authorization: Bearer <key>`; the other \
             scenarios none.",
            keyed.join(", ")
        );
    }
    if let Some(rss) = run.get("rss") {
        println!();
        for (field, what) in RSS_FIELDS {
            if let Some(kb) = rss[field].as_f64() {
                println!("kabar peak resident memory, {what}: {:.1} MiB", kb / 1024.0);
            }
        }
    }
    if let Some(limit) = run
        .get("redis-memory")
        .and_then(|v| v["limit_key_bytes"].as_f64())
    {
        println!(
            "\nPer-phone rate-limit key (cooldown and hourly count; lives for the hour window, \
             not with the code): {limit:.0} B per phone that asked for a code in the last hour."
        );
    }
    if let Some(m) = run.get("redis-memory")
        && let Some(record) = m["record_bytes"].as_f64()
    {
        println!(
            "\nMessage records with four status changes: {} sampled, {record:.0} B each, their \
             message ids {:.0} characters long. Event feed: {} entries, {:.1} MiB, {:.0} B each.",
            m["records_sampled"],
            m["record_id_chars"].as_f64().unwrap_or(0.0),
            m["feed_entries"],
            m["feed_bytes"].as_f64().unwrap_or(0.0) / 1024.0 / 1024.0,
            m["feed_entry_bytes"].as_f64().unwrap_or(0.0)
        );
    }
}

fn summarize_spread(runs: &[RunFigures]) {
    println!(
        "{} runs: the lowest and highest value of every target.",
        runs.len()
    );
    println!();
    println!("| target | lowest | highest | goal | met in every run |");
    println!("|---|---|---|---|---|");
    let per_run: Vec<Vec<Target>> = runs.iter().map(targets).collect();
    for (i, target) in per_run[0].iter().enumerate() {
        let measured: Vec<&Measured> = per_run
            .iter()
            .filter_map(|t| t[i].measured.as_ref())
            .collect();
        let goal = target.goal.unwrap_or("-");
        if measured.len() < runs.len() {
            println!(
                "| {} | measured in {} of {} runs | | {goal} | - |",
                target.name,
                measured.len(),
                runs.len()
            );
            continue;
        }
        let low = measured
            .iter()
            .map(|m| m.value)
            .fold(f64::INFINITY, f64::min);
        let high = measured
            .iter()
            .map(|m| m.value)
            .fold(f64::NEG_INFINITY, f64::max);
        let met = measured.iter().all(|m| m.met);
        println!(
            "| {} | {} | {} | {goal} | {} |",
            target.name,
            (target.show)(low),
            (target.show)(high),
            met_word(target, met)
        );
    }
}
