//! `kabar batch ...` as an operator runs it: the real binary, a spreadsheet export on disk, and a
//! `kabar serve` child process sending to the Meta stand-in. Output is piped, so it is the plain
//! one (no progress bar).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use kabar::{
    domain::auth::{key_hash, new_key},
    pb::{GetBatchRequest, batch_service_client::BatchServiceClient},
};
use tonic::Code;

use crate::{
    process::{Kabar, free_port, work_dir},
    support::{FakeMeta, PHONE_NUMBER_ID, Reply, TOKEN},
};

/// `kabar serve` sending to `meta`, in-process store.
async fn serve(meta: &FakeMeta) -> Kabar {
    let url = meta.url();
    let mut kabar = Kabar::serve(&[
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", TOKEN),
        ("META_WA_PHONE_NUMBER_ID", PHONE_NUMBER_ID),
        ("META_GRAPH_API_URL", &url),
        ("KABAR_META_RETRY_BASE_MS", "20"),
    ]);
    kabar.wait_serving().await;
    kabar
}

/// What a finished `kabar batch ...` left.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(output: Output) -> Self {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn all(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `kabar batch ARGS` in `dir` with `KABAR_GRPC_ADDR=addr` and nothing else from the
/// test's environment (no secrets either: the client needs none).
async fn kabar_batch(dir: &Path, addr: &str, args: &[&str]) -> Run {
    kabar_batch_as(dir, addr, None, args).await
}

/// [`kabar_batch`] with `KABAR_API_KEY=key`, when given.
async fn kabar_batch_as(dir: &Path, addr: &str, key: Option<&str>, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kabar"));
    command
        .arg("batch")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KABAR_GRPC_ADDR", addr)
        .current_dir(dir)
        .stdin(Stdio::null());
    if let Some(key) = key {
        command.env("KABAR_API_KEY", key);
    }
    // The Meta stand-in runs on this test's runtime: wait on another thread.
    let output = tokio::task::spawn_blocking(move || command.output().expect("kabar runs"))
        .await
        .expect("joins");
    Run::from(output)
}

/// Customer `i`'s number as a spreadsheet holds it, and as kabar sends it.
fn phone(i: usize) -> String {
    format!("0812-{:04}-{:04}", 7000 + i / 10_000, i % 10_000)
}
fn e164(i: usize) -> String {
    format!("+62812{:04}{:04}", 7000 + i / 10_000, i % 10_000)
}

const HEADER: &[&str] = &[
    "phone",
    "reference",
    "nama",
    "periode",
    "no_invoice",
    "paket",
    "nominal",
    "jatuh_tempo",
    "customer_id",
];

/// The row of customer `i`: every parameter of invoice_notification.
fn row(i: usize) -> Vec<String> {
    vec![
        phone(i),
        format!("INV-2026-12-{i:04}"),
        format!("Pelanggan {i}"),
        "Desember 2026".into(),
        format!("INV-2026-12-{i:04}"),
        "Home 20 Mbps".into(),
        // A comma inside a value: fine with ; between cells.
        "Rp 150.000,00".into(),
        "10 Desember 2026".into(),
        format!("C{i:05}"),
    ]
}

/// Writes `name` in `dir`: `header` and `rows`, cells separated by `sep`, lines ended by `end`.
fn write_csv(
    dir: &Path,
    name: &str,
    header: &[&str],
    rows: &[Vec<String>],
    sep: &str,
    end: &str,
) -> PathBuf {
    let mut text = header.join(sep) + end;
    for r in rows {
        // As Excel writes them: a cell with the separator in it is quoted.
        let cells: Vec<String> = r
            .iter()
            .map(|c| {
                if c.contains(sep) {
                    format!("\"{c}\"")
                } else {
                    c.clone()
                }
            })
            .collect();
        text.push_str(&cells.join(sep));
        text.push_str(end);
    }
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the CSV");
    path
}

/// How often Meta received a message for each recipient.
fn sends_per_phone(meta: &FakeMeta) -> HashMap<String, usize> {
    let mut sends = HashMap::new();
    for r in meta.received() {
        if let Some(to) = r.body["to"].as_str() {
            *sends.entry(to.to_owned()).or_insert(0) += 1;
        }
    }
    sends
}

async fn batch_exists(kabar: &mut Kabar, batch_id: &str) -> bool {
    let channel = kabar.wait_serving().await;
    match BatchServiceClient::new(channel)
        .get_batch(GetBatchRequest {
            batch_id: batch_id.into(),
        })
        .await
    {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => panic!("GetBatch: {e}"),
    }
}

#[tokio::test]
async fn an_excel_export_runs_to_done_with_every_phone_sent_once() {
    let meta = FakeMeta::start().await;
    // One recipient refuses: that row fails alone.
    meta.push(Reply::error(400, 131026, "Message Undeliverable."));
    let kabar = serve(&meta).await;
    let addr = kabar.grpc_addr.to_string();
    let dir = work_dir("batch-cli");
    // Excel with Indonesian settings: a byte order mark, ; between cells, CRLF.
    let rows: Vec<Vec<String>> = (0..30).map(row).collect();
    let path = write_csv(
        &dir,
        "Tagihan Desember 2026.csv",
        HEADER,
        &rows,
        ";",
        "\r\n",
    );
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(&path).unwrap());
    std::fs::write(&path, bytes).unwrap();

    let run = kabar_batch(
        &dir,
        &addr,
        &[
            "submit",
            "Tagihan Desember 2026.csv",
            "--template",
            "invoice_notification",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        run.stdout.contains("30 rows") && run.stdout.contains("batch Tagihan-Desember-2026"),
        "{}",
        run.all()
    );
    assert!(
        run.stdout.contains(
            "batch Tagihan-Desember-2026 DONE: 30 items, 29 accepted, 1 failed, 0 unknown, 0 queued"
        ),
        "{}",
        run.all()
    );
    assert!(
        run.stdout
            .contains("kabar batch failed Tagihan-Desember-2026"),
        "{}",
        run.all()
    );
    assert!(
        !run.stdout.contains('\u{1b}'),
        "no terminal codes in piped output"
    );

    // Every phone went out once, with its own row's parameters in the template's order.
    let sends = sends_per_phone(&meta);
    assert_eq!(sends.len(), 30);
    assert!(sends.values().all(|n| *n == 1), "{sends:?}");
    for i in 0..30 {
        assert_eq!(sends.get(&e164(i)), Some(&1), "{}", e164(i));
    }
    let seventh = meta
        .received()
        .into_iter()
        .find(|r| r.body["to"] == e164(7))
        .unwrap();
    let params = &seventh.body["template"]["components"][0]["parameters"];
    assert_eq!(params[0]["text"], "Pelanggan 7");
    assert_eq!(params[4]["text"], "Rp 150.000,00");
    assert_eq!(params[6]["text"], "C00007");

    // status shows the batch once (not a terminal: no watching).
    let status = kabar_batch(&dir, &addr, &["status", "Tagihan-Desember-2026"]).await;
    assert_eq!(status.code, Some(0), "{}", status.all());
    for line in [
        "state      DONE",
        "total      30",
        "accepted   29",
        "failed     1",
    ] {
        assert!(status.stdout.contains(line), "{line}: {}", status.all());
    }

    // failed lists the refused row as CSV, with Meta's code and kabar's reason.
    let failed = kabar_batch(&dir, &addr, &["failed", "Tagihan-Desember-2026"]).await;
    assert_eq!(failed.code, Some(0), "{}", failed.all());
    let lines: Vec<&str> = failed.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", failed.all());
    assert!(lines[0].starts_with("reference,phone,state,meta_code,reason"));
    assert!(
        lines[1].contains(",FAILED,131026,META_RECIPIENT_UNDELIVERABLE,"),
        "{}",
        failed.all()
    );
    assert!(
        failed.stderr.contains("1 failed, 0 unknown"),
        "{}",
        failed.all()
    );

    // The same file again: the batch is closed, nothing is sent twice.
    let again = kabar_batch(
        &dir,
        &addr,
        &[
            "submit",
            "Tagihan Desember 2026.csv",
            "--template",
            "invoice_notification",
        ],
    )
    .await;
    assert_eq!(again.code, Some(2), "{}", again.all());
    assert!(
        again.stderr.contains("already submitted whole"),
        "{}",
        again.all()
    );
    assert_eq!(meta.count(), 30);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_bad_phone_is_named_by_line_and_column_and_nothing_is_sent() {
    let meta = FakeMeta::start().await;
    let mut kabar = serve(&meta).await;
    let addr = kabar.grpc_addr.to_string();
    let dir = work_dir("batch-cli");
    let mut rows: Vec<Vec<String>> = (0..10).map(row).collect();
    // Line 5: the header is line 1.
    rows[3][0] = "12345".into();
    write_csv(&dir, "desember.csv", HEADER, &rows, ",", "\n");
    let run = kabar_batch(
        &dir,
        &format!("http://{addr}"),
        &[
            "submit",
            "desember.csv",
            "--template",
            "invoice_notification",
        ],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert!(
        run.stderr.contains("line 5, column phone: \"12345\""),
        "{}",
        run.all()
    );
    assert!(run.stderr.contains("nothing was sent"), "{}", run.all());
    assert_eq!(run.stderr.matches("line ").count(), 1, "{}", run.all());
    assert!(!batch_exists(&mut kabar, "desember").await);
    assert_eq!(meta.count(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_repeated_reference_is_refused_without_calling_kabar() {
    let dir = work_dir("batch-cli");
    let mut rows: Vec<Vec<String>> = (0..6).map(row).collect();
    rows[4][1] = rows[1][1].clone();
    write_csv(&dir, "ulang.csv", HEADER, &rows, ",", "\n");
    // Nothing listens there: the file is refused before any connection.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let run = kabar_batch(
        &dir,
        &nowhere,
        &["submit", "ulang.csv", "--template", "invoice_notification"],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert!(
        run.stderr.contains(
            "line 6, column reference: \"INV-2026-12-0001\" repeats the reference of line 3"
        ),
        "{}",
        run.all()
    );
    // A command that needs kabar says where it looked.
    let status = kabar_batch(&dir, &nowhere, &["status", "ulang"]).await;
    assert_eq!(status.code, Some(1), "{}", status.all());
    assert!(
        status
            .stderr
            .contains(&format!("cannot reach kabar at {nowhere}")),
        "{}",
        status.all()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn kabars_refusal_is_named_by_the_files_lines_and_columns() {
    let meta = FakeMeta::start().await;
    let mut kabar = serve(&meta).await;
    let addr = kabar.grpc_addr.to_string();
    let dir = work_dir("batch-cli");
    // A column the template does not have, and one of its parameters missing: only kabar's
    // template registry knows.
    let mut header: Vec<&str> = HEADER.to_vec();
    header.retain(|c| *c != "customer_id");
    header.push("diskon");
    let rows: Vec<Vec<String>> = (0..4)
        .map(|i| {
            let mut r = row(i);
            r.pop();
            r.push("10%".into());
            r
        })
        .collect();
    write_csv(&dir, "run.csv", &header, &rows, ",", "\n");
    let run = kabar_batch(
        &dir,
        &addr,
        &["submit", "run.csv", "--template", "invoice_notification"],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert!(
        run.stderr
            .contains("lines 2, 3, 4, 5, column diskon: is not a parameter of template"),
        "{}",
        run.all()
    );
    assert!(
        run.stderr
            .contains("column customer_id (not in the file): is required by template"),
        "{}",
        run.all()
    );
    assert!(
        run.stderr.contains("Nothing from this file was queued."),
        "{}",
        run.all()
    );
    // A template the registry does not know is named once, as the option it came from.
    let run = kabar_batch(
        &dir,
        &addr,
        &["submit", "run.csv", "--template", "tagihan", "--no-watch"],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert_eq!(
        run.stderr.matches("--template: unknown template").count(),
        1,
        "{}",
        run.all()
    );
    assert!(!batch_exists(&mut kabar, "run").await);
    assert_eq!(meta.count(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_paused_run_says_why_and_resume_finishes_it() {
    let meta = FakeMeta::start().await;
    // The template is not approved yet: every row would fail the same way, so the run pauses.
    meta.push(Reply::error(
        404,
        132001,
        "template name (invoice_notification) does not exist in id",
    ));
    let kabar = serve(&meta).await;
    let addr = kabar.grpc_addr.to_string();
    let dir = work_dir("batch-cli");
    let rows: Vec<Vec<String>> = (0..12).map(row).collect();
    write_csv(&dir, "januari.csv", HEADER, &rows, ",", "\n");
    let run = kabar_batch(
        &dir,
        &addr,
        &[
            "submit",
            "januari.csv",
            "--template",
            "invoice_notification",
            "--batch-id",
            "tagihan-2027-01",
        ],
    )
    .await;
    assert_eq!(run.code, Some(3), "{}", run.all());
    assert!(
        run.stdout.contains("batch tagihan-2027-01 PAUSED"),
        "{}",
        run.all()
    );
    assert!(run.stdout.contains("132001"), "{}", run.all());
    assert!(
        run.stdout.contains("kabar batch resume tagihan-2027-01"),
        "{}",
        run.all()
    );
    // The operator fixed the template.
    let resumed = kabar_batch(&dir, &addr, &["resume", "tagihan-2027-01", "--watch"]).await;
    assert_eq!(resumed.code, Some(0), "{}", resumed.all());
    assert!(
        resumed
            .stdout
            .contains("batch tagihan-2027-01 DONE: 12 items, 12 accepted, 0 failed, 0 unknown"),
        "{}",
        resumed.all()
    );
    let sends = sends_per_phone(&meta);
    assert_eq!(sends.len(), 12);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn with_keys_two_callers_run_batches_of_one_name() {
    let meta = FakeMeta::start().await;
    let (billing, other) = (new_key(), new_key());
    let dir = work_dir("batch-cli-keys");
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[key]]\nname = \"billing\"\nhash = \"{}\"\nscopes = [\"notify\", \"status\"]\n\
             [[key]]\nname = \"other\"\nhash = \"{}\"\nscopes = [\"notify\", \"status\"]\n",
            key_hash(&billing),
            key_hash(&other)
        ),
    )
    .unwrap();
    let (url, keys) = (meta.url(), keys.display().to_string());
    let mut kabar = Kabar::serve(&[
        ("WHATSAPP_DRIVER", "meta"),
        ("WHATSAPP_API_KEY", TOKEN),
        ("META_WA_PHONE_NUMBER_ID", PHONE_NUMBER_ID),
        ("META_GRAPH_API_URL", &url),
        ("KABAR_META_RETRY_BASE_MS", "20"),
        ("KABAR_API_KEYS_FILE", &keys),
        ("KABAR_LOG_FORMAT", "json"),
    ]);
    kabar.wait_serving().await;
    let addr = kabar.grpc_addr.to_string();
    let rows: Vec<Vec<String>> = (0..5).map(row).collect();
    write_csv(&dir, "januari.csv", HEADER, &rows, ",", "\n");
    let submit = |key: String| {
        let (dir, addr) = (dir.clone(), addr.clone());
        async move {
            kabar_batch_as(
                &dir,
                &addr,
                Some(&key),
                &[
                    "submit",
                    "januari.csv",
                    "--template",
                    "invoice_notification",
                    "--batch-id",
                    "tagihan-2027-01",
                ],
            )
            .await
        }
    };
    let first = submit(billing.clone()).await;
    assert_eq!(first.code, Some(0), "{}", first.all());
    let done = "batch tagihan-2027-01 DONE: 5 items, 5 accepted, 0 failed, 0 unknown";
    assert!(first.stdout.contains(done), "{}", first.all());
    // The other caller has no batch of that name: it is not shown billing's.
    let status = kabar_batch_as(&dir, &addr, Some(&other), &["status", "tagihan-2027-01"]).await;
    assert_eq!(status.code, Some(1), "{}", status.all());
    assert!(
        status.all().contains("no batch \"tagihan-2027-01\"") && !status.all().contains("billing"),
        "{}",
        status.all()
    );
    // Its own run of the same name and the same rows is its own, sent in full.
    let second = submit(other.clone()).await;
    assert_eq!(second.code, Some(0), "{}", second.all());
    assert!(second.stdout.contains(done), "{}", second.all());
    assert_eq!(meta.count(), 10);
    let status = kabar_batch_as(&dir, &addr, Some(&billing), &["status", "tagihan-2027-01"]).await;
    assert!(
        status.stdout.contains("batch      tagihan-2027-01")
            && status.stdout.contains("total      5"),
        "{}",
        status.all()
    );

    // The call's log line names the caller and the caller's own batch id, never the two joined.
    let lines = kabar.json_lines();
    for caller in ["billing", "other"] {
        assert!(
            lines.iter().any(|l| l["method"] == "SubmitBatch"
                && l["code"] == "OK"
                && l["caller"] == caller
                && l["batch_id"] == "tagihan-2027-01"),
            "{caller}: {lines:#?}"
        );
    }
    assert!(
        !kabar
            .stderr()
            .iter()
            .any(|l| l.contains("billing/") || l.contains("other/")),
        "{:#?}",
        kabar.stderr()
    );
    kabar.stop(std::time::Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(dir);
}
