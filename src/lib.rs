//! kabar: a gRPC notification gateway and WhatsApp OTP service in front of Meta's WhatsApp Cloud
//! API, for Indonesian ISP billing systems.
//!
//! [`run`] starts the whole service on listeners the caller bound, so that tests start it
//! in-process on `127.0.0.1:0` exactly as `kabar serve` does.
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod grpc;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod otp;
pub mod phone;
pub mod reload;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod tls;
pub mod whatsapp;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::Config,
    domain::{
        batch::{
            Batches,
            worker::{Worker, WorkerConfig},
        },
        delivery::Delivery,
        outbox::Outbox,
        pacing::Pacer,
        ports::PacingStore,
        settings::{self, SettingsService},
    },
    notify::Notifier,
    otp::OtpService,
    store::{MemoryStore, RedisStore, Store},
    whatsapp::Driver,
};

/// The generated `kabar.v1` API.
pub mod pb {
    tonic::include_proto!("kabar.v1");
    /// Descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kabar_descriptor");
}

pub const NOTIFICATION_SERVICE: &str = "kabar.v1.NotificationService";
pub const OTP_SERVICE: &str = "kabar.v1.OtpService";
pub const BATCH_SERVICE: &str = "kabar.v1.BatchService";
pub const ADMIN_SERVICE: &str = "kabar.v1.AdminService";

/// The two sockets kabar serves on.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    /// Meta's webhook; bound only when `META_APP_SECRET` is set.
    pub webhook: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("KABAR_GRPC_ADDR: cannot listen on {}", config.grpc_addr))?;
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("KABAR_HTTP_ADDR: cannot listen on {}", config.http_addr))?;
        let webhook =
            match &config.app_secret {
                Some(_) => Some(TcpListener::bind(config.webhook_addr).await.with_context(
                    || {
                        format!(
                            "KABAR_WEBHOOK_ADDR: cannot listen on {}",
                            config.webhook_addr
                        )
                    },
                )?),
                None => None,
            };
        Ok(Listeners {
            grpc,
            http,
            webhook,
        })
    }
}

/// After shutdown has drained every call, how long answers get to reach their callers before
/// connections still open are closed.
const IDLE_EXIT_PAUSE: Duration = Duration::from_millis(500);

/// How often the OTP store's reachability is checked for gRPC health.
const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Runs kabar until `shutdown` is cancelled. Then health turns NOT_SERVING, calls in flight finish
/// (for at most `KABAR_SHUTDOWN_GRACE_SECONDS`), and the function returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    tokio::task::spawn_blocking(phone::warm_up)
        .await
        .context("loading phone number metadata")?;
    let driver = Driver::from_config(&config).map_err(anyhow::Error::msg)?;
    let store = match &config.redis_url {
        Some(url) => Store::Redis(
            RedisStore::new(url.expose_secret(), config.redis_timeout)
                .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?,
        ),
        None => Store::Memory(MemoryStore::default()),
    };
    let otp_template = config
        .templates
        .get(&config.otp.template)
        .cloned()
        .context("KABAR_OTP_TEMPLATE is not in the template registry")?;
    let pacer = Arc::new(Pacer::new(
        config.pacing.clone(),
        driver.number().to_owned(),
        Arc::new(store.clone()),
        // Pacing alone while Redis is unreachable: this process's share of the limits.
        store
            .is_redis()
            .then(|| Arc::new(Store::Memory(MemoryStore::default())) as Arc<dyn PacingStore>),
    ));
    let outbox = Arc::new(Outbox::new(
        driver.clone(),
        config.whatsapp_enabled,
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        pacer.clone(),
        config.message_retention,
    ));
    // The runtime settings win over the environment: in force before the first call, followed
    // from the store from then on.
    let live_settings = outbox.settings().clone();
    settings::load_at_start(&store, &live_settings).await;
    let settings_service = Arc::new(SettingsService::new(
        Arc::new(store.clone()),
        live_settings.clone(),
        config.templates.clone(),
    ));
    tokio::spawn(settings::follow(
        Arc::new(store.clone()),
        live_settings,
        shutdown.clone(),
    ));
    let otp = Arc::new(OtpService::new(
        &config.otp,
        Arc::new(store.clone()),
        outbox.clone(),
        otp_template,
    ));
    let notifier = Arc::new(Notifier::new(config.templates.clone(), outbox.clone()));
    let delivery = Arc::new(Delivery::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        pacer.clone(),
        config.message_retention,
    ));
    let batch_wake = Arc::new(tokio::sync::Notify::new());
    let batches = Arc::new(Batches::new(
        Arc::new(store.clone()),
        notifier.clone(),
        pacer.clone(),
        config.message_retention,
        batch_wake.clone(),
    ));
    let batch_worker = Arc::new(Worker::new(
        Arc::new(store.clone()),
        outbox.clone(),
        WorkerConfig {
            concurrency: config.batch.concurrency,
            claim_timeout: config.batch.claim_timeout,
            retention: config.message_retention,
        },
    ));

    let metrics = Arc::new(metrics::Metrics::default());
    // The number's state for `/status`, read from Meta in the background, never per request.
    let connection = Arc::new(ops::status::Connection::new(driver.clone()));
    tokio::spawn(connection.clone().keep_fresh(shutdown.clone()));
    let http_state = Arc::new(http::HttpState {
        metrics: metrics.clone(),
        shutting_down: false.into(),
        store_reachable: true.into(),
        store_kind: if store.is_redis() { "redis" } else { "memory" },
        driver: driver.name(),
        pacer: pacer.clone(),
        batch_worker: batch_worker.clone(),
        connection: connection.clone(),
        sends: outbox.tally().clone(),
    });
    let upkeep = tokio::spawn(pacer.clone().upkeep(driver.clone(), shutdown.clone()));
    // On shutdown the worker takes no new items, gives back those not yet being sent, and
    // finishes the sends under way.
    let worker = tokio::spawn(batch_worker.clone().run(batch_wake, shutdown.clone()));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    for service in [NOTIFICATION_SERVICE, BATCH_SERVICE, ADMIN_SERVICE] {
        reporter
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    let store_ok = store.ping().await.is_ok();
    http_state
        .store_reachable
        .store(store_ok, Ordering::Relaxed);
    reporter
        .set_service_status(OTP_SERVICE, serving(store_ok))
        .await;
    if !store_ok {
        tracing::warn!("Redis is not reachable yet: OtpService is NOT_SERVING until it is");
    }

    let monitor = tokio::spawn(monitor_store(
        store.clone(),
        reporter.clone(),
        http_state.clone(),
        shutdown.clone(),
    ));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build gRPC reflection")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("cannot build gRPC reflection")?;

    let grpc_addr = listeners.grpc.local_addr()?;
    let http_addr = listeners.http.local_addr()?;

    // Health turns NOT_SERVING before the servers stop accepting calls, so that load balancers
    // move traffic away while calls in flight finish.
    let drain = CancellationToken::new();
    {
        let (shutdown, drain, reporter, http_state, delay) = (
            shutdown.clone(),
            drain.clone(),
            reporter.clone(),
            http_state.clone(),
            config.shutdown_delay,
        );
        tokio::spawn(async move {
            shutdown.cancelled().await;
            http_state.shutting_down.store(true, Ordering::Relaxed);
            for service in [
                "",
                NOTIFICATION_SERVICE,
                OTP_SERVICE,
                BATCH_SERVICE,
                ADMIN_SERVICE,
            ] {
                reporter
                    .set_service_status(service, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!(
                delay_seconds = delay.as_secs(),
                "shutting down: health is NOT_SERVING"
            );
            // Calls are still accepted during the delay, while load balancers notice.
            tokio::time::sleep(delay).await;
            tracing::info!("no longer accepting calls; finishing calls in flight");
            drain.cancel();
        });
    }

    let keys: Option<grpc::auth::Keys> = config
        .api_keys
        .as_ref()
        .map(|k| Arc::new(grpc::auth::KeysInForce::new(k.ring.clone())));
    match &config.api_keys {
        Some(k) => tracing::info!(
            file = %k.path.display(),
            keys = k.ring.len(),
            "API keys are required on the gRPC port"
        ),
        None => {
            tracing::info!("API keys are off: every caller that reaches the gRPC port may call")
        }
    }
    if let (Some(keys), Some(api_keys)) = (&keys, &config.api_keys) {
        let (keys, path) = (keys.clone(), api_keys.path.clone());
        tokio::spawn(reload::watch(
            "KABAR_API_KEYS_FILE",
            vec![path.clone()],
            shutdown.clone(),
            move || {
                let ring = config::read_key_file(&path)?;
                let count = ring.len();
                keys.replace(ring);
                Ok(format!("{count} keys in force"))
            },
        ));
    }
    let tls = config
        .tls
        .as_ref()
        .map(|(files, server)| tls::ServerTls::new(files.clone(), server.clone()));
    if let Some(tls) = &tls {
        tracing::info!(
            cert = %tls.files().cert.display(),
            client_certificates = tls.files().client_ca.is_some(),
            "the gRPC port speaks TLS"
        );
        let reloaded = tls.clone();
        tokio::spawn(reload::watch(
            "the TLS files",
            tls.files().paths(),
            shutdown.clone(),
            move || {
                reloaded.reload().map_err(|e| e.to_string())?;
                Ok("new connections use the certificate now in the files".into())
            },
        ));
    }
    let grpc_admission = listen::Admission::new(
        "grpc",
        listen::Limits {
            max_connections: config.max_connections,
            max_pending: (config.max_connections / 4).max(16),
            max_per_ip: config.max_connections_per_ip,
            handshake_timeout: config.slow_client_timeout,
            handshake: match tls {
                Some(_) => listen::Handshake::Manual,
                None => listen::Handshake::BytesRead(listen::HTTP2_PREFACE_LEN),
            },
        },
        drain.clone(),
    );
    let http_admission = listen::Admission::new(
        "http",
        listen::Limits {
            max_connections: http::MAX_CONNECTIONS,
            max_pending: http::MAX_CONNECTIONS / 2,
            max_per_ip: http::MAX_CONNECTIONS,
            handshake_timeout: config.slow_client_timeout,
            handshake: listen::Handshake::FirstWrite,
        },
        drain.clone(),
    );

    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(grpc::limits::MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(grpc::limits::STREAM_WINDOW)
        .initial_connection_window_size(grpc::limits::CONNECTION_WINDOW)
        .http2_max_header_list_size(grpc::limits::MAX_HEADER_LIST_BYTES)
        // In order, outermost first: the slow-client deadline of a request message (it starts
        // when the message is first read); the call's task, log line and metrics; the caller's
        // key and scope (refusals are logged and counted); a SubmitBatch call's turn before its
        // message is read (only for callers with a key).
        .layer(grpc::limits::RequestBodyDeadline(
            config.slow_client_timeout,
        ))
        .layer(grpc::calls::CallLayer {
            metrics: metrics.clone(),
        })
        .layer(grpc::auth::AuthLayer::new(keys.clone()))
        .layer(grpc::limits::SubmitTurns::new(config.slow_client_timeout))
        // Open to every caller: their requests are a few bytes, so that is all they may send.
        .add_service(health_service.max_decoding_message_size(grpc::limits::MAX_OPEN_MESSAGE_BYTES))
        .add_service(reflection_v1.max_decoding_message_size(grpc::limits::MAX_OPEN_MESSAGE_BYTES))
        .add_service(
            reflection_v1alpha.max_decoding_message_size(grpc::limits::MAX_OPEN_MESSAGE_BYTES),
        )
        .add_service(
            pb::notification_service_server::NotificationServiceServer::new(
                grpc::NotificationGrpc::new(notifier, delivery.clone(), drain.clone()),
            )
            .max_decoding_message_size(grpc::limits::MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::otp_service_server::OtpServiceServer::new(grpc::OtpGrpc::new(otp, metrics.clone()))
                .max_decoding_message_size(grpc::limits::MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::batch_service_server::BatchServiceServer::new(grpc::batch::BatchGrpc::new(
                batches,
                drain.clone(),
            ))
            .max_decoding_message_size(grpc::limits::MAX_BATCH_MESSAGE_BYTES),
        )
        .add_service(
            pb::admin_service_server::AdminServiceServer::new(grpc::admin::AdminGrpc::new(
                settings_service,
            ))
            .max_decoding_message_size(grpc::limits::MAX_MESSAGE_BYTES),
        );
    let grpc_server = async {
        let stopped = drain.clone().cancelled_owned();
        match tls {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(
                        tls::incoming(listeners.grpc, grpc_admission, tls),
                        stopped,
                    )
                    .await
            }
            None => {
                router
                    .serve_with_incoming_shutdown(
                        listen::incoming(listeners.grpc, grpc_admission),
                        stopped,
                    )
                    .await
            }
        }
    };

    let http_server = http::serve(
        listeners.http,
        http_admission,
        http::router(http_state.clone()),
        config.slow_client_timeout,
        drain.clone(),
    );

    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        driver = driver.name(),
        otp_store = http_state.store_kind,
        "kabar is serving"
    );

    let webhook_server = async {
        let (Some(listener), Some(app_secret)) = (listeners.webhook, config.app_secret.clone())
        else {
            return;
        };
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(webhook = %addr, path = http::webhook::PATH, "Meta's webhook is served");
        }
        let admission = listen::Admission::new(
            "webhook",
            listen::Limits {
                max_connections: http::webhook::MAX_CONNECTIONS,
                max_pending: http::webhook::MAX_CONNECTIONS / 2,
                max_per_ip: http::webhook::MAX_CONNECTIONS / 2,
                handshake_timeout: config.slow_client_timeout,
                // A request being stored must never count as handshaking (and be closed to
                // make room): the connection is established once the request line starts.
                handshake: listen::Handshake::BytesRead(http::webhook::REQUEST_LINE_START),
            },
            drain.clone(),
        );
        let state = Arc::new(http::webhook::WebhookState {
            app_secret,
            verify_token: config.webhook_verify_token.clone(),
            delivery: delivery.clone(),
            metrics: metrics.clone(),
        });
        http::serve(
            listener,
            admission,
            http::webhook::router(state, config.slow_client_timeout * 3),
            config.slow_client_timeout,
            drain.clone(),
        )
        .await;
    };
    if config.app_secret.is_none() {
        tracing::warn!(
            "META_APP_SECRET is not set: Meta's webhook is off (delivery statuses are not \
             received), and unsigned posts are never accepted"
        );
    }

    let servers = async {
        let (grpc, (), ()) = tokio::join!(grpc_server, http_server, webhook_server);
        grpc.context("gRPC server failed")?;
        anyhow::Ok(())
    };
    tokio::pin!(servers);
    let grace = config.shutdown_grace;
    let result = tokio::select! {
        r = &mut servers => r,
        () = async {
            // Once no call is in flight, idle connections (clients that keep them open after the
            // GOAWAY) no longer hold the exit; a short pause lets the last answers go out.
            drain.cancelled().await;
            metrics.idle().await;
            tokio::time::sleep(IDLE_EXIT_PAUSE).await;
        } => {
            tracing::info!("no call in flight: closing the remaining connections");
            Ok(())
        }
        () = async {
            drain.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            match metrics.in_flight() {
                0 => tracing::warn!(
                    grace_seconds = grace.as_secs(),
                    "no call in flight, but clients kept connections open past the shutdown grace period; stopping anyway"
                ),
                calls => tracing::warn!(
                    grace_seconds = grace.as_secs(),
                    calls,
                    "calls still in flight after the shutdown grace period; stopping anyway"
                ),
            }
            Ok(())
        }
    };
    if tokio::time::timeout(grace, worker).await.is_err() {
        tracing::warn!(
            "batch items were still being sent after the shutdown grace period; another \
             replica settles them as unknown"
        );
    }
    monitor.abort();
    upkeep.abort();
    tracing::info!("kabar stopped");
    result
}

fn serving(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Keeps `kabar.v1.OtpService` health in step with the store's reachability, and sweeps the
/// in-process store.
async fn monitor_store(
    store: Store,
    reporter: HealthReporter,
    http_state: Arc<http::HttpState>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(STORE_PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        ticks += 1;
        if let Store::Memory(memory) = &store {
            if ticks.is_multiple_of(60) {
                memory.sweep();
            }
            continue;
        }
        let ok = store.ping().await.is_ok();
        let before = http_state.store_reachable.swap(ok, Ordering::Relaxed);
        if before != ok && !shutdown.is_cancelled() {
            if ok {
                tracing::info!("Redis is reachable again: OtpService is SERVING");
            } else {
                tracing::error!("Redis is unreachable: OtpService is NOT_SERVING");
            }
            reporter.set_service_status(OTP_SERVICE, serving(ok)).await;
        }
    }
}
