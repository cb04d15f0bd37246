//! `kabar serve` and `kabar send-test`: configuration, logging, then the library does the work.
//! `kabar batch ...`: a gRPC client of a running kabar, for operators (see [`cli::batch`]).

mod cli;

use std::{process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use kabar::{
    config::Config,
    domain::outbox::Outbox,
    notify::{NotificationRequest, Notifier},
    store::{MemoryStore, Store},
    whatsapp::Driver,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kabar",
    version,
    about = "WhatsApp notification gateway and OTP service for ISP billing systems"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (KABAR_GRPC_ADDR) and HTTP health (KABAR_HTTP_ADDR) until SIGTERM or Ctrl-C.
    Serve,
    /// Send one template message through the configured driver and print Meta's message id.
    SendTest {
        /// Recipient, as typed: 0812-3456-7890, +62 812 3456 7890, ...
        phone: String,
        /// Registry key of the template.
        #[arg(long, default_value = "access_opened")]
        template: String,
        /// A parameter as name=value; repeat for each. Missing ones get sample values.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Language code overriding the registry's (e.g. en_US).
        #[arg(long, default_value = "")]
        language: String,
    },
    /// Batch runs from a spreadsheet: submit a CSV file, follow a run, list what failed.
    ///
    /// A client of a running kabar (`kabar serve`) over gRPC; its key is KABAR_API_KEY.
    Batch(cli::batch::BatchArgs),
    /// API keys for callers (KABAR_API_KEYS_FILE).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Checks the setup live against Meta (token, number, business, templates, webhook) and
    /// kabar's own (Redis, OTP secret, key file): one line per check with its remedy; exits 0
    /// only when nothing failed.
    Doctor {
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The registry's templates at Meta.
    #[command(subcommand)]
    Templates(TemplatesCommand),
    /// The connection status of a running kabar (GET /status on its HTTP port): the number,
    /// its quality and limit, the last send and the last Meta error, the store, the batches.
    Status {
        /// kabar's HTTP address (default: KABAR_HTTP_ADDR, else 127.0.0.1:8080).
        #[arg(long)]
        addr: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// Each registry template's state at Meta (APPROVED, PENDING, MISSING, ...).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Creates the registry templates missing at Meta, after checking them against Meta's
    /// rejection reasons. Templates that exist are left alone.
    Push {
        /// Show what would be submitted; create nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Makes a new key: prints it once (give it to the caller) and the lines for the key file
    /// (kabar stores only the key's SHA-256).
    New {
        /// The caller's name, e.g. billing or portal (a-z 0-9 _ -).
        #[arg(long)]
        name: String,
        /// What the key allows: otp, notify, status, admin; repeat for each.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
}

/// `kabar keys new`: the key on stdout's first line, then the entry for the key file.
fn new_key(name: &str, scopes: &[String]) -> ExitCode {
    use kabar::domain::auth::{KeyRing, Scope, key_hash, new_key};
    for s in scopes {
        if Scope::parse(s).is_none() {
            eprintln!("kabar keys new: unknown scope {s:?}; one of otp, notify, status, admin");
            return ExitCode::from(2);
        }
    }
    let key = new_key();
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
    let entry = format!(
        "[[key]]\nname = {name:?}\nhash = \"{}\"\nscopes = [{}]\n",
        key_hash(&key),
        scopes.join(", ")
    );
    // The entry must read back as a valid key file, or nothing is printed.
    if let Err(e) = KeyRing::parse(&entry) {
        eprintln!("kabar keys new: {e}");
        return ExitCode::from(2);
    }
    println!("{key}");
    eprintln!(
        "The key above is shown only now: give it to the caller {name:?} (it sends it as \
         `authorization: Bearer <key>`; the kabar commands read KABAR_API_KEY). Add these lines \
         to KABAR_API_KEYS_FILE, then send kabar SIGHUP or restart it:"
    );
    print!("\n{entry}");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let command = match Cli::parse().command {
        // A client of a running kabar: none of the server's configuration applies.
        Command::Batch(args) => return ExitCode::from(cli::batch::main(args)),
        Command::Keys(KeysCommand::New { name, scopes }) => return new_key(&name, &scopes),
        Command::Status { addr, json } => {
            return match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(cli::ops::status(addr, json)),
                Err(e) => {
                    eprintln!("kabar: cannot start the async runtime: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        command => command,
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kabar: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    kabar::telemetry::init(config.log_format, config.log_filter.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kabar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        Command::Serve => runtime.block_on(serve(config)),
        Command::SendTest {
            phone,
            template,
            params,
            language,
        } => runtime.block_on(send_test(config, phone, template, params, language)),
        Command::Doctor { json } => return runtime.block_on(cli::ops::doctor(&config, json)),
        Command::Templates(TemplatesCommand::Status { json }) => {
            return runtime.block_on(cli::ops::templates_status(&config, json));
        }
        Command::Templates(TemplatesCommand::Push { dry_run, json }) => {
            return runtime.block_on(cli::ops::templates_push(&config, dry_run, json));
        }
        Command::Batch(_) | Command::Keys(_) | Command::Status { .. } => {
            unreachable!("handled before the configuration is read")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kabar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = kabar::Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal(shutdown.clone()));
    kabar::run(config, listeners, shutdown).await
}

/// Cancels `shutdown` on SIGTERM (Kubernetes, systemd) or Ctrl-C.
async fn signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => tracing::info!("Ctrl-C received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    shutdown.cancel();
}

async fn send_test(
    config: Config,
    phone: String,
    template: String,
    params: Vec<String>,
    language: String,
) -> anyhow::Result<()> {
    let driver = Driver::from_config(&config).map_err(anyhow::Error::msg)?;
    // One message, no replicas: its record can live in this process and go with it.
    let store = Arc::new(Store::Memory(MemoryStore::default()));
    // One message paces against nothing but itself.
    let pacer = Arc::new(kabar::domain::pacing::Pacer::new(
        config.pacing.clone(),
        driver.number().to_owned(),
        store.clone(),
        None,
    ));
    let outbox = Arc::new(Outbox::new(
        driver,
        config.whatsapp_enabled,
        store.clone(),
        store,
        pacer,
        config.message_retention,
    ));
    let notifier = Notifier::new(config.templates.clone(), outbox);
    let mut named = std::collections::HashMap::new();
    for p in &params {
        let (name, value) = p
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--param {p:?}: write it as name=value"))?;
        named.insert(name.to_owned(), value.to_owned());
    }
    if let Some(t) = notifier.templates().get(&template) {
        for name in &t.params {
            named
                .entry(name.clone())
                .or_insert_with(|| kabar::templates::sample_value(name).to_owned());
        }
    }
    let sent = notifier
        .send_template(
            &NotificationRequest {
                phone: &phone,
                template: &template,
                params: &named,
                positional_params: &[],
                language: &language,
                reference: "",
                idempotency_key: "",
                caller: "",
            },
            None,
        )
        .await;
    match sent {
        Ok(sent) => {
            println!(
                "sent to {} ({}): message_id {}",
                sent.phone, sent.wa_id, sent.message_id
            );
            Ok(())
        }
        Err(kabar::domain::error::Error::Meta(f)) => Err(anyhow::anyhow!(
            "Meta refused the message: code {} ({}), {}\nremedy: {}{}",
            f.meta_code,
            f.reason,
            f.details,
            f.remedy,
            f.fbtrace_id
                .map(|t| format!("\nfbtrace_id: {t}"))
                .unwrap_or_default()
        )),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}
