//! `kabar batch ...`: a month's invoices from a spreadsheet export, without writing code.
//!
//! `submit` checks the whole CSV file first (nothing is sent while any row is wrong), then hands
//! it to a running kabar's BatchService in calls of at most 1,000 rows, the last one closing the
//! batch, and follows the run. Every row carries its reference, so a call sent again (after a
//! timeout, or a second run of the same command) adds nothing twice. `status` shows a batch, and
//! follows it with a progress bar on a terminal; `failed` lists the rows that did not go out.

use std::{
    future::Future,
    io::IsTerminal,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kabar::{
    domain::{
        batch::{MAX_ITEMS_PER_CALL, MAX_PAGE, rules::check_batch_id},
        error::MAX_VIOLATIONS,
    },
    pb::{
        Batch, GetBatchRequest, ListBatchItemsRequest, SendTemplateRequest, SubmitBatchRequest,
        batch::State, batch_item, batch_service_client::BatchServiceClient,
    },
    templates::is_language_code,
};
use prost::Message;
use tonic::{Code, Request, Response, Status, transport::Channel};
use tonic_types::StatusExt;

use super::{Failure, connect, exit, resolve_addr, sheet};

#[derive(Args)]
pub struct BatchArgs {
    /// kabar's gRPC address, host:port or http://host:port [default: KABAR_GRPC_ADDR from the
    /// environment or ./.env, else 127.0.0.1:50051]
    #[arg(long, global = true, value_name = "ADDR")]
    addr: Option<String>,
    #[command(subcommand)]
    command: BatchCommand,
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Check a CSV file and send it as one batch run, then follow the run.
    ///
    /// The file has a header row: phone, reference (unique per row, e.g. the invoice number) and
    /// one column per template parameter, named like the parameter (nama, nominal, ...). Cells
    /// may be separated by , or ; (Excel). Nothing is sent while any row is wrong. Running the
    /// same command again is safe: rows already in the batch are skipped.
    ///
    /// Exit codes: 0 done, 1 kabar unreachable or refused, 2 the file or an argument is wrong,
    /// 3 the batch paused, 4 the batch was cancelled.
    Submit {
        /// The CSV file (UTF-8; Excel: "CSV UTF-8").
        file: PathBuf,
        /// Registry key of the template, e.g. invoice_notification.
        #[arg(long)]
        template: String,
        /// Name of the run: 1 to 128 of A-Z a-z 0-9 . _ : - [default: the file name]
        #[arg(long)]
        batch_id: Option<String>,
        /// Language code overriding the registry's (e.g. en_US).
        #[arg(long, default_value = "", value_name = "CODE")]
        language: String,
        /// Only check the file; send nothing.
        #[arg(long)]
        check: bool,
        /// Return once the file is submitted instead of following the run.
        #[arg(long)]
        no_watch: bool,
    },
    /// Show a batch; follow it until it is done (by default on a terminal).
    ///
    /// Exit codes: 0, or when following: 0 done, 3 paused, 4 cancelled; 1 kabar unreachable or
    /// the batch unknown.
    Status {
        /// The batch id.
        id: String,
        #[command(flatten)]
        watch: Watch,
    },
    /// List the rows that failed or whose outcome is unknown, as CSV: reference, phone, state,
    /// Meta's error code, kabar's reason, and what to do.
    Failed {
        /// The batch id.
        id: String,
    },
    /// Stop sending the batch's remaining rows.
    Cancel {
        /// The batch id.
        id: String,
    },
    /// Continue a paused batch once the cause of the pause is fixed, and follow it.
    Resume {
        /// The batch id.
        id: String,
        #[command(flatten)]
        watch: Watch,
    },
}

#[derive(Args)]
struct Watch {
    /// Follow the batch until it is done [default on a terminal].
    #[arg(long, conflicts_with = "no_watch")]
    watch: bool,
    /// Show the batch once.
    #[arg(long)]
    no_watch: bool,
}

impl Watch {
    fn wanted(&self) -> bool {
        self.watch || (!self.no_watch && std::io::stdout().is_terminal())
    }
}

/// Runs a `kabar batch` command; its exit code.
pub fn main(args: BatchArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kabar: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("kabar: {}", f.message);
            f.code
        }
    }
}

async fn run(args: BatchArgs) -> Result<u8, Failure> {
    let addr = resolve_addr(args.addr.as_deref());
    match args.command {
        BatchCommand::Submit {
            file,
            template,
            batch_id,
            language,
            check,
            no_watch,
        } => {
            let plan = plan(file, template, batch_id, language)?;
            if check {
                println!("checked: nothing sent (--check)");
                return Ok(exit::OK);
            }
            let client = client(&addr).await?;
            submit(client, &addr, plan, !no_watch).await
        }
        BatchCommand::Status { id, watch } => {
            check_id(&id)?;
            let mut client = client(&addr).await?;
            if watch.wanted() {
                follow(&mut client, &id).await
            } else {
                let b = get(&client, &id).await?;
                print_batch(&b);
                Ok(exit::OK)
            }
        }
        BatchCommand::Failed { id } => {
            check_id(&id)?;
            let client = client(&addr).await?;
            list_failed(&client, &id).await
        }
        BatchCommand::Cancel { id } => {
            check_id(&id)?;
            let client = client(&addr).await?;
            let id = id.as_str();
            let b = retrying(&client, "CancelBatch", |mut c| async move {
                c.cancel_batch(by_id(id)).await
            })
            .await
            .map_err(|s| refused(&s, id))?;
            print_batch(&b);
            Ok(exit::OK)
        }
        BatchCommand::Resume { id, watch } => {
            check_id(&id)?;
            let mut client = client(&addr).await?;
            let id = id.as_str();
            let b = retrying(&client, "ResumeBatch", |mut c| async move {
                c.resume_batch(by_id(id)).await
            })
            .await
            .map_err(|s| refused(&s, id))?;
            if watch.wanted() {
                follow(&mut client, id).await
            } else {
                print_batch(&b);
                Ok(exit::OK)
            }
        }
    }
}

type Client =
    BatchServiceClient<tonic::service::interceptor::InterceptedService<Channel, super::ApiKey>>;

async fn client(addr: &str) -> Result<Client, Failure> {
    Ok(BatchServiceClient::with_interceptor(
        connect(addr).await?,
        super::ApiKey::from_env()?,
    ))
}

fn check_id(id: &str) -> Result<(), Failure> {
    check_batch_id(id).map_err(|problem| Failure::input(format!("batch id {id:?}: {problem}")))
}

/// The request of a call about one batch, with a deadline.
fn by_id(id: &str) -> Request<GetBatchRequest> {
    timed(GetBatchRequest {
        batch_id: id.to_owned(),
    })
}

/// How long one unary call may take before it is tried again.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn timed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// Tries after the first call fails for a passing reason.
const RETRIES: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Whether a call may be sent again as it is: kabar unreachable for a moment or the deadline
/// passed (the tonic client's own timer reports that as CANCELLED). Batch calls are safe to
/// repeat: references make a resubmitted row a no-op.
fn passing(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded => true,
        Code::Cancelled => status.message().contains("Timeout expired"),
        Code::ResourceExhausted => status.get_details_retry_info().is_some(),
        _ => false,
    }
}

fn backoff(attempt: u32) -> Duration {
    (FIRST_BACKOFF * 2u32.saturating_pow(attempt.saturating_sub(1))).min(MAX_BACKOFF)
}

/// `call`, tried again with backoff while it fails for a passing reason.
async fn retrying<T, F, Fut>(client: &Client, what: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut(Client) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let mut attempt = 0;
    loop {
        match call(client.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if passing(&status) && attempt < RETRIES => {
                attempt += 1;
                let wait = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .unwrap_or_else(|| backoff(attempt))
                    .min(MAX_BACKOFF);
                eprintln!(
                    "kabar: {what}: {:?}: {}; trying again in {:.1}s ({attempt} of {RETRIES})",
                    status.code(),
                    status.message(),
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            Err(status) => return Err(status),
        }
    }
}

/// A refusal of a call about batch `id`, in words.
fn refused(status: &Status, id: &str) -> Failure {
    let message = status.message();
    match status.code() {
        // kabar's own words name the batch and the state.
        Code::NotFound | Code::FailedPrecondition => Failure::other(message),
        Code::InvalidArgument => {
            let mut text = format!("refused: {message}");
            if let Some(bad) = status.get_details_bad_request() {
                for v in bad.field_violations {
                    text.push_str(&format!("\n  {}: {}", v.field, v.description));
                }
            }
            Failure::input(text)
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Failure::other(format!(
            "kabar did not answer about batch {id} ({:?}: {message}); the command may be run \
             again safely",
            status.code()
        )),
        code => Failure::other(format!("{code:?}: {message}")),
    }
}

async fn get(client: &Client, id: &str) -> Result<Batch, Failure> {
    retrying(client, "GetBatch", |mut c| async move {
        c.get_batch(by_id(id)).await
    })
    .await
    .map_err(|s| refused(&s, id))
}

/// A checked file, ready to send.
struct Plan {
    file: PathBuf,
    batch_id: String,
    template: String,
    language: String,
    sheet: sheet::Sheet,
}

/// At most this many of the file's problems are printed.
const MAX_PROBLEMS_SHOWN: usize = 30;

fn plan(
    file: PathBuf,
    template: String,
    batch_id: Option<String>,
    language: String,
) -> Result<Plan, Failure> {
    let template = template.trim().to_owned();
    if template.is_empty() {
        return Err(Failure::input(
            "--template: give the registry key of the template, e.g. invoice_notification",
        ));
    }
    let language = language.trim().to_owned();
    if !language.is_empty() && !is_language_code(&language) {
        return Err(Failure::input(format!(
            "--language {language:?}: give a Meta language code such as id or en_US"
        )));
    }
    let (batch_id, named_by) = match batch_id {
        Some(id) => {
            let id = id.trim().to_owned();
            check_batch_id(&id)
                .map_err(|problem| Failure::input(format!("--batch-id {id:?}: {problem}")))?;
            (id, "--batch-id")
        }
        None => (
            sheet::batch_id_from_path(&file).ok_or_else(|| {
                Failure::input(format!(
                    "{}: no batch id can be made from the file name; give one with --batch-id",
                    file.display()
                ))
            })?,
            "the file name; --batch-id names it otherwise",
        ),
    };
    let bytes = std::fs::read(&file)
        .map_err(|e| Failure::input(format!("cannot read {}: {e}", file.display())))?;
    let sheet = sheet::read(&bytes).map_err(|problems| {
        let mut text = format!(
            "{}: {} problem{} (nothing was sent; fix the file and run again / perbaiki file \
             lalu jalankan lagi):",
            file.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for p in problems.iter().take(MAX_PROBLEMS_SHOWN) {
            text.push_str(&format!("\n  {p}"));
        }
        if problems.len() > MAX_PROBLEMS_SHOWN {
            text.push_str(&format!(
                "\n  ... and {} more",
                problems.len() - MAX_PROBLEMS_SHOWN
            ));
        }
        Failure::input(text)
    })?;
    println!(
        "{}: {} rows, parameters: {} (separated by {:?}); batch {batch_id} (from {named_by})",
        file.display(),
        sheet.rows.len(),
        if sheet.params.is_empty() {
            "none".to_owned()
        } else {
            sheet.params.join(", ")
        },
        sheet.delimiter as char,
    );
    Ok(Plan {
        file,
        batch_id,
        template,
        language,
        sheet,
    })
}

/// The largest SubmitBatch message sent: well under kabar's limit on one message (2 MiB), and
/// small enough to be read quickly.
const MAX_CALL_BYTES: usize = 900 * 1024;

/// The rows of each call: at most [`MAX_ITEMS_PER_CALL`] rows and [`MAX_CALL_BYTES`] bytes.
fn chunks(messages: &[SendTemplateRequest]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, m) in messages.iter().enumerate() {
        // Each message is a length-delimited field of the request.
        let size = m.encoded_len() + 8;
        if i > start && (i - start == MAX_ITEMS_PER_CALL || bytes + size > MAX_CALL_BYTES) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < messages.len() {
        out.push(start..messages.len());
    }
    out
}

fn message(plan: &Plan, row: &sheet::Row) -> SendTemplateRequest {
    SendTemplateRequest {
        phone: row.phone.clone(),
        template: plan.template.clone(),
        params: row.params.iter().cloned().collect(),
        language: plan.language.clone(),
        reference: row.reference.clone(),
        ..Default::default()
    }
}

async fn submit(mut client: Client, addr: &str, plan: Plan, watch: bool) -> Result<u8, Failure> {
    let id = plan.batch_id.as_str();
    // A batch already closed takes nothing new, and its rows are never sent again, even with new
    // values: say so before anything is sent.
    let mut before = match retrying(&client, "GetBatch", |mut c| async move {
        c.get_batch(by_id(id)).await
    })
    .await
    {
        Ok(b) if b.closed || is_final(&b) => {
            return Err(Failure::input(format!(
                "batch {id} was already submitted whole ({}, {} rows, created {}): nothing was \
                 sent. Rows already in a batch are never sent again, even with new values. To \
                 send this file as a new run, give a new --batch-id; to see the old run: \
                 kabar batch status {id}",
                state_name(b.state),
                b.total,
                created(&b)
            )));
        }
        Ok(b) => {
            println!(
                "batch {id} already has {} rows and is not closed: going on; rows already in it \
                 are skipped",
                b.total
            );
            b.total
        }
        Err(s) if s.code() == Code::NotFound => 0,
        Err(s) => return Err(refused(&s, id)),
    };
    let messages: Vec<SendTemplateRequest> =
        plan.sheet.rows.iter().map(|r| message(&plan, r)).collect();
    let ranges = chunks(&messages);
    let mut columns = vec![sheet::PHONE.to_owned(), sheet::REFERENCE.to_owned()];
    columns.extend(plan.sheet.params.iter().cloned());
    let mut last_batch = None;
    for (n, range) in ranges.iter().enumerate() {
        let last = n + 1 == ranges.len();
        let rows = &plan.sheet.rows[range.clone()];
        let request = SubmitBatchRequest {
            batch_id: id.to_owned(),
            messages: messages[range.clone()].to_vec(),
            last,
        };
        let lines = format!(
            "lines {}-{}",
            rows.first().map_or(0, |r| r.line),
            rows.last().map_or(0, |r| r.line)
        );
        let request = &request;
        let answer = retrying(
            &client,
            &format!("SubmitBatch ({lines})"),
            |mut c| async move { c.submit_batch(timed(request.clone())).await },
        )
        .await;
        let b = match answer {
            Ok(b) => b,
            Err(status) => {
                let mut failure = submit_refused(&status, &plan, rows, &columns);
                if n > 0 {
                    failure.message.push_str(&format!(
                        "\nThe rows before {lines} are in batch {id} and are being sent. Once \
                         fixed, run the same command again: rows already in the batch are \
                         skipped."
                    ));
                } else {
                    failure
                        .message
                        .push_str("\nNothing from this file was queued.");
                }
                return Err(failure);
            }
        };
        let added = b.total.saturating_sub(before);
        before = b.total;
        if ranges.len() > 1 {
            println!(
                "{lines}: {} rows submitted ({added} new){}",
                rows.len(),
                if last { ", batch closed" } else { "" }
            );
        }
        last_batch = Some(b);
    }
    let b = last_batch.expect("a file has at least one row");
    println!(
        "submitted {} rows from {} to batch {id} ({} items in the batch)",
        plan.sheet.rows.len(),
        plan.file.display(),
        b.total
    );
    if b.total != plan.sheet.rows.len() as u64 {
        println!(
            "note: the batch holds {} items, the file {} rows: it had items from elsewhere too",
            b.total,
            plan.sheet.rows.len()
        );
    }
    if watch {
        follow(&mut client, id).await
    } else {
        print_batch(&b);
        println!("follow it: kabar batch status {id} --watch --addr {addr}");
        Ok(exit::OK)
    }
}

/// A refused SubmitBatch in the file's terms.
fn submit_refused(
    status: &Status,
    plan: &Plan,
    rows: &[sheet::Row],
    columns: &[String],
) -> Failure {
    if status.code() != Code::InvalidArgument {
        let mut failure = refused(status, &plan.batch_id);
        if status.get_details_error_info().map(|i| i.reason).as_deref() == Some("BATCH_CLOSED") {
            failure.message.push_str(&format!(
                "\nGive this file a new --batch-id; to see the old run: kabar batch status {}",
                plan.batch_id
            ));
        }
        return failure;
    }
    let violations: Vec<(String, String)> = status
        .get_details_bad_request()
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default();
    if violations.is_empty() {
        return Failure::input(format!("kabar refused the file: {}", status.message()));
    }
    let lines: Vec<u64> = rows.iter().map(|r| r.line).collect();
    let mut text = format!(
        "kabar refused {} (template {}):",
        plan.file.display(),
        plan.template
    );
    for line in sheet::explain(&violations, &lines, columns) {
        text.push_str(&format!("\n  {line}"));
    }
    if violations.len() >= MAX_VIOLATIONS {
        text.push_str(&format!(
            "\n  kabar names at most {MAX_VIOLATIONS} problems a call; there may be more"
        ));
    }
    Failure::input(text)
}

fn is_final(b: &Batch) -> bool {
    b.state == State::Done as i32 || b.state == State::Cancelled as i32
}

fn state_name(state: i32) -> &'static str {
    State::try_from(state).map_or("UNKNOWN_STATE", |s| s.as_str_name())
}

/// Where the progress goes: a bar on a terminal, plain lines elsewhere.
enum Progress {
    Bar(ProgressBar),
    Plain { last: Option<(i32, Instant)> },
}

/// A plain line for a change of counts at most this often (a change of state at once).
const PLAIN_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new() -> Self {
        if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>9} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            Progress::Bar(bar)
        } else {
            Progress::Plain { last: None }
        }
    }

    fn update(&mut self, b: &Batch) {
        match self {
            Progress::Bar(bar) => {
                bar.set_prefix(state_name(b.state));
                bar.set_length(b.total);
                bar.set_position(b.total - b.queued.min(b.total));
                bar.set_message(counts(b));
            }
            Progress::Plain { last } => {
                let due = match last {
                    None => true,
                    Some((state, at)) => *state != b.state || at.elapsed() >= PLAIN_EVERY,
                };
                if due {
                    println!("{}", line(b));
                    *last = Some((b.state, Instant::now()));
                }
            }
        }
    }

    fn note(&self, text: &str) {
        match self {
            Progress::Bar(bar) => bar.println(text),
            Progress::Plain { .. } => println!("{text}"),
        }
    }

    fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The counts of a progress line.
fn counts(b: &Batch) -> String {
    let mut text = format!(
        "{} accepted, {} failed, {} unknown",
        b.accepted, b.failed, b.unknown
    );
    if b.queued > 0 && b.eta_seconds > 0 {
        text.push_str(&format!(", ETA {}", duration_words(b.eta_seconds)));
    }
    if !b.held_reason.is_empty() {
        text.push_str(", held by Meta's daily limit");
    }
    text
}

/// One plain progress line.
fn line(b: &Batch) -> String {
    format!(
        "{} {}: {}/{} settled, {}",
        b.batch_id,
        state_name(b.state),
        b.total - b.queued.min(b.total),
        b.total,
        counts(b)
    )
}

/// How long `seconds` is, as people read it: `45s`, `3m 05s`, `2h 07m`.
fn duration_words(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Opening the watch again after the connection broke: at most this many times in a row.
const MAX_RECONNECTS: u32 = 8;

/// Follows the batch until it is done, cancelled or paused (or Ctrl-C); prints the outcome;
/// the exit code.
async fn follow(client: &mut Client, id: &str) -> Result<u8, Failure> {
    let mut progress = Progress::new();
    let watched = tokio::select! {
        watched = watch(client, id, &mut progress) => Some(watched),
        _ = tokio::signal::ctrl_c() => None,
    };
    progress.finish();
    let Some(watched) = watched else {
        println!(
            "stopped following; the batch goes on in kabar. Follow it again: kabar batch status \
             {id} --watch"
        );
        return Ok(exit::INTERRUPTED);
    };
    let b = watched?;
    println!("{}", summary(&b));
    let state = State::try_from(b.state).unwrap_or(State::Unspecified);
    if b.failed + b.unknown > 0 {
        println!("list the rows that did not go out: kabar batch failed {id} > {id}-failed.csv");
    }
    Ok(match state {
        State::Paused => {
            print_pause(&b);
            exit::PAUSED
        }
        State::Cancelled => exit::CANCELLED,
        _ => exit::OK,
    })
}

/// The batch on every change until it is done, cancelled or paused.
async fn watch(client: &mut Client, id: &str, progress: &mut Progress) -> Result<Batch, Failure> {
    let mut breaks = 0;
    let mut waiting_noted = false;
    let mut latest: Option<Batch> = None;
    loop {
        let broke = match client
            .watch_batch(GetBatchRequest {
                batch_id: id.to_owned(),
            })
            .await
        {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(b)) => {
                            breaks = 0;
                            progress.update(&b);
                            let paused = b.state == State::Paused as i32;
                            if is_final(&b) || paused {
                                return Ok(b);
                            }
                            if !b.closed && b.queued == 0 && b.total > 0 && !waiting_noted {
                                progress.note(&format!(
                                    "every item so far is settled, but batch {id} is not closed: \
                                     more may follow. If a submission was interrupted, run \
                                     `kabar batch submit FILE --batch-id {id}` again to finish it."
                                ));
                                waiting_noted = true;
                            }
                            latest = Some(b);
                        }
                        // kabar is draining (a restart): watch again.
                        Ok(None) => break None,
                        Err(s) if passing(&s) || s.code() == Code::Unknown => break Some(s),
                        Err(s) => return Err(refused(&s, id)),
                    }
                }
            }
            Err(s) if passing(&s) => Some(s),
            Err(s) => return Err(refused(&s, id)),
        };
        breaks += 1;
        let why = broke.map_or_else(
            || "kabar ended the watch (restarting?)".to_owned(),
            |s| format!("{:?}: {}", s.code(), s.message()),
        );
        if breaks > MAX_RECONNECTS {
            if let Some(b) = &latest {
                progress.note(&line(b));
            }
            return Err(Failure::other(format!(
                "lost kabar ({why}); the batch goes on there. Follow it again: kabar batch \
                 status {id} --watch"
            )));
        }
        let wait = backoff(breaks);
        progress.note(&format!(
            "lost the watch ({why}); watching again in {:.1}s",
            wait.as_secs_f64()
        ));
        tokio::time::sleep(wait).await;
    }
}

/// The one-line outcome of a batch.
fn summary(b: &Batch) -> String {
    format!(
        "batch {} {}: {} items, {} accepted, {} failed, {} unknown, {} queued ({} delivered, {} \
         read)",
        b.batch_id,
        state_name(b.state),
        b.total,
        b.accepted,
        b.failed,
        b.unknown,
        b.queued,
        b.delivered,
        b.read
    )
}

fn print_pause(b: &Batch) {
    println!("paused: {}", b.pause_reason);
    println!(
        "Fix the cause, then continue: kabar batch resume {id}\n\
         (Perbaiki penyebabnya, lalu lanjutkan: kabar batch resume {id})",
        id = b.batch_id
    );
}

fn print_batch(b: &Batch) {
    let state = State::try_from(b.state).unwrap_or(State::Unspecified);
    println!("batch      {}", b.batch_id);
    println!(
        "state      {}{}",
        state_name(b.state),
        if b.closed || state == State::Cancelled {
            ""
        } else {
            " (not closed: more items may follow)"
        }
    );
    println!("created    {}", created(b));
    println!("total      {}", b.total);
    println!("queued     {}", b.queued);
    println!("accepted   {}", b.accepted);
    println!("failed     {}", b.failed);
    println!("unknown    {}", b.unknown);
    println!("delivered  {}", b.delivered);
    println!("read       {}", b.read);
    if b.queued > 0 && b.eta_seconds > 0 {
        println!("ETA        {}", duration_words(b.eta_seconds));
    }
    if !b.held_reason.is_empty() {
        println!("held       {}", b.held_reason);
    }
    if state == State::Paused {
        print_pause(b);
    }
    if b.failed + b.unknown > 0 {
        println!(
            "list the rows that did not go out: kabar batch failed {}",
            b.batch_id
        );
    }
}

/// When the batch was created, in UTC.
fn created(b: &Batch) -> String {
    b.created_at
        .as_ref()
        .map_or_else(|| "-".to_owned(), |t| utc(t.seconds))
}

/// `2026-12-01 08:00:00 UTC` for seconds since 1970.
fn utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// Writes the failed and unknown items as CSV to stdout.
async fn list_failed(client: &Client, id: &str) -> Result<u8, Failure> {
    let mut out = csv::Writer::from_writer(std::io::stdout().lock());
    write(
        &mut out,
        &[
            "reference",
            "phone",
            "state",
            "meta_code",
            "reason",
            "remedy",
            "details",
        ],
    )?;
    let mut found = [0usize; 2];
    for (n, filter) in ["failed", "unknown"].into_iter().enumerate() {
        let mut token = String::new();
        loop {
            let token_now = token.as_str();
            let page = retrying(client, "ListBatchItems", |mut c| async move {
                c.list_batch_items(timed(ListBatchItemsRequest {
                    batch_id: id.to_owned(),
                    filter: filter.to_owned(),
                    page_size: MAX_PAGE as u32,
                    page_token: token_now.to_owned(),
                }))
                .await
            })
            .await
            .map_err(|s| refused(&s, id))?;
            for item in &page.items {
                let error = item.error.clone().unwrap_or_default();
                let code = if error.code == 0 {
                    String::new()
                } else {
                    error.code.to_string()
                };
                let state = batch_item::State::try_from(item.state)
                    .map_or("UNKNOWN_STATE", |s| s.as_str_name());
                write(
                    &mut out,
                    &[
                        &item.reference,
                        &item.phone,
                        state,
                        &code,
                        &error.reason,
                        &error.title,
                        &error.details,
                    ],
                )?;
                found[n] += 1;
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    out.flush()
        .map_err(|e| Failure::other(format!("cannot write: {e}")))?;
    eprintln!("batch {id}: {} failed, {} unknown", found[0], found[1]);
    if found[1] > 0 {
        eprintln!(
            "unknown: sent, but Meta's answer never came; Meta may have them, so kabar does not \
             send them again"
        );
    }
    Ok(exit::OK)
}

fn write<W: std::io::Write>(out: &mut csv::Writer<W>, record: &[&str]) -> Result<(), Failure> {
    out.write_record(record)
        .map_err(|e| Failure::other(format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration_words(0), "0s");
        assert_eq!(duration_words(45), "45s");
        assert_eq!(duration_words(185), "3m 05s");
        assert_eq!(duration_words(3600 + 7 * 60 + 59), "1h 07m");
        assert_eq!(duration_words(50 * 3600), "50h 00m");
    }

    #[test]
    fn timestamps_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_798_761_600), "2027-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_164_800 + 3661), "2024-02-29 01:01:01 UTC");
        assert_eq!(utc(-1), "1969-12-31 23:59:59 UTC");
    }

    fn invoice(i: usize, params: usize) -> SendTemplateRequest {
        SendTemplateRequest {
            phone: format!("0812{:08}", i),
            template: "invoice_notification".into(),
            params: (0..params)
                .map(|p| (format!("p{p}"), "x".repeat(100)))
                .collect(),
            reference: format!("INV-{i}"),
            ..Default::default()
        }
    }

    #[test]
    fn calls_hold_at_most_a_thousand_rows_and_fit_kabars_message_limit() {
        let small: Vec<_> = (0..2500).map(|i| invoice(i, 1)).collect();
        assert_eq!(chunks(&small), [0..1000, 1000..2000, 2000..2500]);
        let exact: Vec<_> = (0..2000).map(|i| invoice(i, 1)).collect();
        assert_eq!(chunks(&exact), [0..1000, 1000..2000]);
        assert_eq!(chunks(&small[..1]).len(), 1);
        assert!(chunks(&[]).is_empty());
        // Rows of about 1 KB: a call stays under the limit whatever the row count.
        let big: Vec<_> = (0..1000).map(|i| invoice(i, 9)).collect();
        let ranges = chunks(&big);
        assert!(ranges.len() > 1, "{ranges:?}");
        for r in &ranges {
            let request = SubmitBatchRequest {
                batch_id: "b".into(),
                messages: big[r.clone()].to_vec(),
                last: true,
            };
            assert!(request.encoded_len() <= MAX_CALL_BYTES, "{r:?}");
        }
        assert_eq!(ranges.last().unwrap().end, 1000);
    }

    #[test]
    fn only_passing_failures_are_tried_again() {
        assert!(passing(&Status::unavailable("down")));
        assert!(passing(&Status::deadline_exceeded("late")));
        assert!(passing(&Status::cancelled("Timeout expired")));
        assert!(!passing(&Status::cancelled("the client went away")));
        assert!(!passing(&Status::invalid_argument("bad")));
        assert!(!passing(&Status::failed_precondition("closed")));
        assert!(!passing(&Status::resource_exhausted("no retry info")));
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn a_progress_line_names_the_counts() {
        let b = Batch {
            batch_id: "inv-12".into(),
            state: State::Running as i32,
            total: 300,
            queued: 120,
            accepted: 178,
            failed: 2,
            eta_seconds: 90,
            ..Default::default()
        };
        assert_eq!(
            line(&b),
            "inv-12 RUNNING: 180/300 settled, 178 accepted, 2 failed, 0 unknown, ETA 1m 30s"
        );
        let done = Batch {
            state: State::Done as i32,
            queued: 0,
            accepted: 298,
            delivered: 10,
            ..b
        };
        assert_eq!(
            summary(&done),
            "batch inv-12 DONE: 300 items, 298 accepted, 2 failed, 0 unknown, 0 queued (10 \
             delivered, 0 read)"
        );
    }
}
