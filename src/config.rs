//! Configuration: environment variables (and a `.env` file in the working directory), plus the TOML
//! template registry named by `KABAR_TEMPLATES`. Everything is validated once at start-up; a
//! problem stops the process with one line naming the variable and what it needs. Secrets are held
//! in `secrecy` types and never printed.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use secrecy::{ExposeSecret, SecretBox, SecretString};

use crate::{domain::pacing::PacingConfig, phone, templates::TemplateRegistry};

/// Settings of the Meta client: configuration owns them, the client in `whatsapp` uses them.
#[derive(Clone)]
pub struct MetaSettings {
    pub graph_api_url: String,
    pub graph_api_version: String,
    pub phone_number_id: String,
    pub access_token: SecretString,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Total attempts for a retryable failure, the first included.
    pub max_attempts: u32,
    /// First backoff; doubled after each attempt, with full jitter over its upper half.
    pub retry_base: Duration,
    /// Sends in progress at once; more wait (within their deadline) for a free slot.
    pub max_in_flight: usize,
}

/// A configuration problem: which variable, and what it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// File descriptors kept free of gRPC connections: the HTTP port's connections, Redis, the
/// connections to Meta, logs and the listeners themselves.
pub const FD_RESERVE: usize = 128;

/// The soft limit on open files of this process (Linux: `/proc/self/limits`), if known.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A URL as it may be shown: any `user:password@` replaced, so that a configuration error or a
/// log line never prints a credential.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@') {
            return format!("{}://[redacted]@{}", &url[..scheme_end], &rest[at + 1..]);
        }
    }
    url.to_owned()
}

fn err(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    Meta,
    Log,
}

/// Most bytes a key file may hold (a thousand keys take about 150 KB).
const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a regular file of at most `max` bytes (a device or a pipe would never end).
pub fn read_small_file(path: &std::path::Path, max: u64) -> Result<Vec<u8>, String> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    // Non-blocking: opening a named pipe would otherwise wait for a writer, forever.
    #[cfg(target_os = "macos")]
    const O_NONBLOCK: i32 = 0x0004;
    #[cfg(not(target_os = "macos"))]
    const O_NONBLOCK: i32 = 0o4000;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("is over {max} bytes"));
    }
    Ok(bytes)
}

/// Reads and checks a key file: a regular file of at most [`MAX_KEY_FILE_BYTES`].
pub fn read_key_file(path: &std::path::Path) -> Result<crate::domain::auth::KeyRing, String> {
    let bytes = read_small_file(path, MAX_KEY_FILE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| "cannot read it as text: not UTF-8")?;
    crate::domain::auth::KeyRing::parse(&text)
}

/// The key file and the callers read from it.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    pub path: std::path::PathBuf,
    pub ring: crate::domain::auth::KeyRing,
}

/// Batch runs.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Items one replica sends at once.
    pub concurrency: usize,
    /// How long a replica may hold an item before another takes it over (it died); each send
    /// gets half of it.
    pub claim_timeout: Duration,
}

pub struct Config {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Meta's webhook listener (`KABAR_WEBHOOK_ADDR`); served only with `META_APP_SECRET`.
    pub webhook_addr: SocketAddr,
    pub log_format: LogFormat,
    /// The log filter: `KABAR_LOG`, else `RUST_LOG`, else none (`info`).
    pub log_filter: Option<String>,
    /// `WHATSAPP_ENABLED=false` refuses every send with FAILED_PRECONDITION instead of sending.
    /// The runtime setting (`crate::domain::settings`) overrides it while kabar runs.
    pub whatsapp_enabled: bool,
    pub driver: DriverKind,
    /// Present when `driver` is `Meta`.
    pub meta: Option<MetaSettings>,
    pub business_account_id: Option<String>,
    pub webhook_verify_token: Option<SecretString>,
    pub app_secret: Option<SecretString>,
    pub templates: TemplateRegistry,
    /// Redis URL (may carry a password, so it is secret). `None`: in-process store.
    pub redis_url: Option<SecretString>,
    pub redis_timeout: Duration,
    pub otp: OtpConfig,
    /// How long calls in flight may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How long health reports NOT_SERVING, while calls are still accepted, before the servers
    /// stop accepting: time for load balancers and Kubernetes to move traffic away.
    pub shutdown_delay: Duration,
    /// Open connections on the gRPC port at most (`KABAR_MAX_CONNECTIONS`), already lowered to
    /// fit the process's file descriptor limit.
    pub max_connections: usize,
    /// Established gRPC connections per client address at most (`KABAR_MAX_CONNECTIONS_PER_IP`).
    pub max_connections_per_ip: usize,
    /// How long message records and events are kept (`KABAR_MESSAGE_RETENTION_DAYS`).
    pub message_retention: Duration,
    /// How long a client may take to complete a connection's handshake, an HTTP request's
    /// headers, or one gRPC request message (`KABAR_SLOW_CLIENT_TIMEOUT_SECONDS`).
    pub slow_client_timeout: Duration,
    /// Pacing within Meta's limits (`KABAR_META_MAX_MPS`, `KABAR_PAIR_INTERVAL_SECONDS`,
    /// `KABAR_META_DAILY_LIMIT`, ...).
    pub pacing: PacingConfig,
    /// Batch runs (`KABAR_BATCH_CONCURRENCY`, `KABAR_BATCH_CLAIM_TIMEOUT_SECONDS`).
    pub batch: BatchConfig,
    /// The callers' keys (`KABAR_API_KEYS_FILE`); `None`: every call is let in (loopback, or
    /// `KABAR_ALLOW_UNAUTHENTICATED=true`).
    pub api_keys: Option<ApiKeys>,
    /// TLS on the gRPC port (`KABAR_TLS_CERT_FILE`, `KABAR_TLS_KEY_FILE`,
    /// `KABAR_TLS_CLIENT_CA_FILE`), read and checked at start-up; `None`: plain HTTP/2.
    pub tls: Option<(crate::tls::TlsFiles, Arc<rustls::ServerConfig>)>,
    /// Warnings to log once logging is up (development defaults in use).
    pub warnings: Vec<String>,
}

pub struct OtpConfig {
    /// The HMAC key for stored codes. `None`: a random per-process key (development only).
    pub secret: Option<SecretBox<Vec<u8>>>,
    pub ttl: Duration,
    pub max_attempts: u32,
    pub resend_after: Duration,
    pub max_sends_per_hour: u32,
    pub max_sends_per_ip_per_hour: u32,
    pub code_length: usize,
    pub template: String,
    /// Country calling codes whose numbers may receive codes.
    pub allowed_countries: Vec<u16>,
    pub daily_limit: u32,
    /// E.164 digits (no `+`) to fixed code: these numbers never reach Meta.
    pub test_numbers: HashMap<String, SecretString>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("whatsapp_enabled", &self.whatsapp_enabled)
            .field("driver", &self.driver)
            .field("redis", &self.redis_url.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

/// Where variables come from: the process environment in production, a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// The process environment, then `.env` from the working directory: a variable set to a
/// non-blank value in the environment wins over the file; one that is unset or blank takes the
/// file's value.
pub struct Environment {
    dotenv: HashMap<String, String>,
}

impl Environment {
    pub fn load() -> Result<Self, ConfigError> {
        // Only the working directory's .env: searching parent directories could pick up an
        // unrelated file (e.g. /etc/.env for a service started in /etc/kabar).
        let mut dotenv = HashMap::new();
        match dotenvy::from_path_iter(".env") {
            Ok(items) => {
                for item in items {
                    let (name, value) =
                        item.map_err(|e| err(".env", format!("cannot read the .env file: {e}")))?;
                    dotenv.insert(name, value);
                }
            }
            Err(e) if e.not_found() => {}
            Err(e) => return Err(err(".env", format!("cannot read the .env file: {e}"))),
        }
        Ok(Environment { dotenv })
    }
}

impl Source for Environment {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .or_else(|| self.dotenv.get(name).cloned())
    }
}

struct Reader<'a> {
    source: &'a dyn Source,
}

impl Reader<'_> {
    /// A set, non-blank value.
    fn get(&self, var: &'static str) -> Option<String> {
        self.source
            .get(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, var: &'static str, default: &str) -> String {
        self.get(var).unwrap_or_else(|| default.to_owned())
    }

    fn addr(&self, var: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
        let v = self.string(var, default);
        v.parse().map_err(|_| {
            err(
                var,
                format!("needs an address such as 127.0.0.1:50051 or 0.0.0.0:50051 (got {v:?})"),
            )
        })
    }

    fn bool(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(|v| v.to_ascii_lowercase()).as_deref() {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(other) => Err(err(var, format!("needs true or false (got {other:?})"))),
        }
    }

    fn number(
        &self,
        var: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if range.contains(&n) => Ok(n),
                _ => Err(err(
                    var,
                    format!(
                        "needs a whole number from {} to {} (got {v:?})",
                        range.start(),
                        range.end()
                    ),
                )),
            },
        }
    }

    /// A secret from `VAR` or from the file named by `VAR_FILE` (Kubernetes secrets, systemd
    /// credentials). Never echoed back in errors.
    fn secret(
        &self,
        var: &'static str,
        file_var: &'static str,
    ) -> Result<Option<SecretString>, ConfigError> {
        match (self.get(var), self.get(file_var)) {
            (Some(_), Some(_)) => Err(err(
                var,
                format!("set either {var} or {file_var}, not both"),
            )),
            (Some(v), None) => Ok(Some(SecretString::from(v))),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| err(file_var, format!("cannot read {path:?}: {e}")))?;
                let text = text.trim_end_matches(['\n', '\r']).to_owned();
                if text.is_empty() {
                    return Err(err(file_var, format!("{path:?} is empty")));
                }
                Ok(Some(SecretString::from(text)))
            }
            (None, None) => Ok(None),
        }
    }
}

impl Config {
    /// Reads and validates the configuration from the process environment and `.env`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let env = Environment::load()?;
        Self::from_source(&env)
    }

    /// Reads and validates the configuration from any source of variables.
    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let r = Reader { source };
        let mut warnings = Vec::new();

        let grpc_addr = r.addr("KABAR_GRPC_ADDR", "127.0.0.1:50051")?;
        let http_addr = r.addr("KABAR_HTTP_ADDR", "127.0.0.1:8080")?;
        let webhook_addr = r.addr("KABAR_WEBHOOK_ADDR", "127.0.0.1:8081")?;
        let log_filter = r.get("KABAR_LOG").or_else(|| r.get("RUST_LOG"));
        let log_format = match r.string("KABAR_LOG_FORMAT", "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "KABAR_LOG_FORMAT",
                    format!("needs text or json (got {other:?})"),
                ));
            }
        };

        let whatsapp_enabled = r.bool("WHATSAPP_ENABLED", true)?;
        let driver = match r.string("WHATSAPP_DRIVER", "log").as_str() {
            "meta" => DriverKind::Meta,
            "log" => DriverKind::Log,
            other => {
                return Err(err(
                    "WHATSAPP_DRIVER",
                    format!("needs meta or log (got {other:?})"),
                ));
            }
        };
        let graph_api_url = r.string("META_GRAPH_API_URL", "https://graph.facebook.com");
        let parsed = reqwest::Url::parse(&graph_api_url);
        if !(graph_api_url.starts_with("https://") || graph_api_url.starts_with("http://"))
            || parsed.is_err()
        {
            return Err(err(
                "META_GRAPH_API_URL",
                format!(
                    "needs an http(s) URL such as https://graph.facebook.com (got {:?})",
                    redact_url(&graph_api_url)
                ),
            ));
        }
        if parsed.is_ok_and(|u| !u.username().is_empty() || u.password().is_some()) {
            return Err(err(
                "META_GRAPH_API_URL",
                format!(
                    "must not carry a user name or password; Meta is authenticated with WHATSAPP_API_KEY (got {:?})",
                    redact_url(&graph_api_url)
                ),
            ));
        }
        let graph_api_version = r.string("META_GRAPH_API_VERSION", "v24.0");
        if !is_graph_version(&graph_api_version) {
            return Err(err(
                "META_GRAPH_API_VERSION",
                format!("needs a Graph API version such as v24.0 (got {graph_api_version:?})"),
            ));
        }
        let api_key = r.secret("WHATSAPP_API_KEY", "WHATSAPP_API_KEY_FILE")?;
        let phone_number_id = r.get("META_WA_PHONE_NUMBER_ID");
        if let Some(id) = &phone_number_id
            && !id.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err(
                "META_WA_PHONE_NUMBER_ID",
                "needs the numeric Phone number ID from WhatsApp Manager > API Setup (not the phone number itself)",
            ));
        }
        let business_account_id = r.get("META_WA_BUSINESS_ACCOUNT_ID");
        if let Some(id) = &business_account_id
            && !id.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err(
                "META_WA_BUSINESS_ACCOUNT_ID",
                "needs the numeric WhatsApp Business Account ID",
            ));
        }
        let connect_timeout = Duration::from_millis(r.number(
            "KABAR_META_CONNECT_TIMEOUT_MS",
            3_000,
            100..=60_000,
        )?);
        let request_timeout =
            Duration::from_millis(r.number("KABAR_META_TIMEOUT_MS", 10_000, 100..=30_000)?);
        let max_attempts = r.number("KABAR_META_MAX_ATTEMPTS", 3, 1..=3)? as u32;
        let retry_base =
            Duration::from_millis(r.number("KABAR_META_RETRY_BASE_MS", 200, 1..=10_000)?);
        let max_in_flight = r.number("KABAR_META_MAX_IN_FLIGHT", 512, 1..=10_000)? as usize;

        let meta = match driver {
            DriverKind::Meta => {
                let access_token = api_key.ok_or_else(|| {
                    err(
                        "WHATSAPP_API_KEY",
                        "is required with WHATSAPP_DRIVER=meta: the System User access token from Meta Business Settings",
                    )
                })?;
                let phone_number_id = phone_number_id.ok_or_else(|| {
                    err(
                        "META_WA_PHONE_NUMBER_ID",
                        "is required with WHATSAPP_DRIVER=meta: the Phone number ID from WhatsApp Manager > API Setup",
                    )
                })?;
                if access_token
                    .expose_secret()
                    .chars()
                    .any(char::is_whitespace)
                {
                    return Err(err(
                        "WHATSAPP_API_KEY",
                        "contains whitespace: paste the token alone, without \"Bearer\"",
                    ));
                }
                Some(MetaSettings {
                    graph_api_url,
                    graph_api_version,
                    phone_number_id,
                    access_token,
                    connect_timeout,
                    request_timeout,
                    max_attempts,
                    retry_base,
                    max_in_flight,
                })
            }
            DriverKind::Log => {
                warnings.push(
                    "WHATSAPP_DRIVER=log: messages (OTP codes included) are written to this log \
                     instead of being sent; a development setup, not for production"
                        .to_owned(),
                );
                None
            }
        };

        let templates = match r.get("KABAR_TEMPLATES") {
            None => TemplateRegistry::default(),
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| err("KABAR_TEMPLATES", format!("cannot read {path:?}: {e}")))?;
                TemplateRegistry::from_toml(&text)
                    .map_err(|e| err("KABAR_TEMPLATES", format!("{path}: {e}")))?
            }
        };

        let api_keys = match r.get("KABAR_API_KEYS_FILE") {
            None => None,
            Some(path) => {
                let ring = read_key_file(std::path::Path::new(&path))
                    .map_err(|e| err("KABAR_API_KEYS_FILE", format!("{path}: {e}")))?;
                Some(ApiKeys {
                    path: path.into(),
                    ring,
                })
            }
        };
        let allow_unauthenticated = r.bool("KABAR_ALLOW_UNAUTHENTICATED", false)?;
        if api_keys.is_none() && !grpc_addr.ip().is_loopback() {
            if !allow_unauthenticated {
                return Err(err(
                    "KABAR_API_KEYS_FILE",
                    format!(
                        "is required when KABAR_GRPC_ADDR ({grpc_addr}) is not a loopback address: \
                         without keys anyone who reaches the port can send messages at the ISP's \
                         cost. Create keys with `kabar keys new --name billing --scope notify \
                         --scope status`, or set KABAR_ALLOW_UNAUTHENTICATED=true for a trusted \
                         mesh that authenticates callers itself"
                    ),
                ));
            }
            warnings.push(format!(
                "KABAR_ALLOW_UNAUTHENTICATED=true: kabar serves gRPC on {grpc_addr} without API \
                 keys; every caller that reaches the port may send"
            ));
        }

        let tls = match (
            r.get("KABAR_TLS_CERT_FILE"),
            r.get("KABAR_TLS_KEY_FILE"),
            r.get("KABAR_TLS_CLIENT_CA_FILE"),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), client_ca) => {
                let files = crate::tls::TlsFiles {
                    cert: cert.into(),
                    key: key.into(),
                    client_ca: client_ca.map(Into::into),
                };
                let server = crate::tls::server_config(&files)?;
                Some((files, server))
            }
            (None, _, _) => {
                return Err(err(
                    "KABAR_TLS_CERT_FILE",
                    "is required with KABAR_TLS_KEY_FILE or KABAR_TLS_CLIENT_CA_FILE: the \
                     server's certificate chain (PEM)",
                ));
            }
            (Some(_), None, _) => {
                return Err(err(
                    "KABAR_TLS_KEY_FILE",
                    "is required with KABAR_TLS_CERT_FILE: the certificate's private key (PEM)",
                ));
            }
        };

        let redis_url = r.secret("REDIS_URL", "REDIS_URL_FILE")?;
        if let Some(url) = &redis_url {
            let u = url.expose_secret();
            if redis::IntoConnectionInfo::into_connection_info(u).is_err() {
                return Err(err(
                    "REDIS_URL",
                    "needs a URL such as redis://127.0.0.1:6379/0, rediss://host:6380 or unix:///run/redis.sock",
                ));
            }
        }
        let redis_timeout =
            Duration::from_millis(r.number("KABAR_REDIS_TIMEOUT_MS", 500, 50..=10_000)?);

        let otp = Self::otp(&r, redis_url.is_some(), &templates, &mut warnings)?;
        let shutdown_grace =
            Duration::from_secs(r.number("KABAR_SHUTDOWN_GRACE_SECONDS", 25, 0..=600)?);
        let shutdown_delay =
            Duration::from_secs(r.number("KABAR_SHUTDOWN_DELAY_SECONDS", 0, 0..=60)?);

        let wanted_connections = r.number("KABAR_MAX_CONNECTIONS", 1000, 1..=1_000_000)? as usize;
        let max_connections = match open_files_limit() {
            Some(limit) if wanted_connections + FD_RESERVE > limit => {
                let fitted = limit.saturating_sub(FD_RESERVE).max(1);
                warnings.push(format!(
                    "KABAR_MAX_CONNECTIONS={wanted_connections} does not fit the open files limit \
                     of {limit} (ulimit -n; LimitNOFILE= in systemd): at most {fitted} gRPC \
                     connections are accepted. Raise the limit to allow more."
                ));
                fitted
            }
            _ => wanted_connections,
        };
        let message_retention =
            Duration::from_secs(r.number("KABAR_MESSAGE_RETENTION_DAYS", 30, 1..=365)? * 24 * 3600);
        let max_connections_per_ip =
            r.number("KABAR_MAX_CONNECTIONS_PER_IP", 64, 1..=1_000_000)? as usize;
        let slow_client_timeout =
            Duration::from_secs(r.number("KABAR_SLOW_CLIENT_TIMEOUT_SECONDS", 10, 1..=300)?);

        let pacing = Self::pacing(&r, &mut warnings)?;
        let batch = BatchConfig {
            concurrency: r.number("KABAR_BATCH_CONCURRENCY", 512, 1..=10_000)? as usize,
            claim_timeout: Duration::from_secs(r.number(
                "KABAR_BATCH_CLAIM_TIMEOUT_SECONDS",
                60,
                4..=3600,
            )?),
        };

        if redis_url.is_none() {
            warnings.push(
                "REDIS_URL is not set: OTP codes, rate limits and batch runs live in this \
                 process only and are lost on restart (a batch run in progress is lost with \
                 them); a development setup, not for production"
                    .to_owned(),
            );
        }

        let config = Config {
            grpc_addr,
            http_addr,
            webhook_addr,
            log_format,
            log_filter,
            whatsapp_enabled,
            driver,
            meta,
            business_account_id,
            webhook_verify_token: r.secret(
                "META_WA_WEBHOOK_VERIFY_TOKEN",
                "META_WA_WEBHOOK_VERIFY_TOKEN_FILE",
            )?,
            app_secret: r.secret("META_APP_SECRET", "META_APP_SECRET_FILE")?,
            templates,
            redis_url,
            redis_timeout,
            otp,
            shutdown_grace,
            shutdown_delay,
            max_connections,
            max_connections_per_ip,
            message_retention,
            slow_client_timeout,
            pacing,
            batch,
            api_keys,
            tls,
            warnings,
        };
        // The token goes into a header: a character a header cannot carry fails here, at start-up.
        if let Some(meta) = &config.meta
            && reqwest::header::HeaderValue::from_str(meta.access_token.expose_secret()).is_err()
        {
            return Err(err(
                "WHATSAPP_API_KEY",
                "contains characters not allowed in an HTTP header",
            ));
        }
        Ok(config)
    }

    fn pacing(r: &Reader<'_>, warnings: &mut Vec<String>) -> Result<PacingConfig, ConfigError> {
        let enabled = r.bool("KABAR_PACING_ENABLED", true)?;
        if !enabled {
            warnings.push(
                "KABAR_PACING_ENABLED=false: sends go to Meta as fast as they come, past Meta's \
                 limits; for measurements only, never in production"
                    .to_owned(),
            );
        }
        let daily_limit = match r.get("KABAR_META_DAILY_LIMIT") {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("unlimited") => Some(0),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (1..=100_000_000).contains(&n) => Some(n),
                _ => {
                    return Err(err(
                        "KABAR_META_DAILY_LIMIT",
                        format!(
                            "needs the number's messaging limit, a whole number from 1 to \
                             100000000 (250, 2000, 10000, 100000) or \"unlimited\"; leave it \
                             unset to read it from Meta (got {v:?})"
                        ),
                    ));
                }
            },
        };
        Ok(PacingConfig {
            enabled,
            max_mps: r.number("KABAR_META_MAX_MPS", 80, 1..=100_000)? as u32,
            pair_interval: Duration::from_secs(r.number(
                "KABAR_PAIR_INTERVAL_SECONDS",
                6,
                0..=3600,
            )?),
            daily_limit,
            max_wait: Duration::from_secs(r.number("KABAR_PACING_MAX_WAIT_SECONDS", 5, 0..=60)?),
            fallback_replicas: r.number("KABAR_PACING_REPLICAS", 2, 1..=1000)? as u32,
        })
    }

    fn otp(
        r: &Reader<'_>,
        with_redis: bool,
        templates: &TemplateRegistry,
        warnings: &mut Vec<String>,
    ) -> Result<OtpConfig, ConfigError> {
        let secret = match r.secret("KABAR_OTP_SECRET", "KABAR_OTP_SECRET_FILE")? {
            Some(s) if s.expose_secret().len() < 32 => {
                return Err(err(
                    "KABAR_OTP_SECRET",
                    "needs at least 32 bytes; generate one with: openssl rand -hex 32",
                ));
            }
            Some(s) => Some(SecretBox::new(Box::new(
                s.expose_secret().as_bytes().to_vec(),
            ))),
            None if with_redis => {
                return Err(err(
                    "KABAR_OTP_SECRET",
                    "is required when REDIS_URL is set (at least 32 bytes, or KABAR_OTP_SECRET_FILE); generate one with: openssl rand -hex 32",
                ));
            }
            None => {
                warnings.push(
                    "KABAR_OTP_SECRET is not set: OTP hashes use a random key made at start-up, \
                     so pending codes stop working on restart; a development setup"
                        .to_owned(),
                );
                None
            }
        };
        let ttl = r.number("KABAR_OTP_TTL_SECONDS", 300, 1..=3600)?;
        let max_attempts = r.number("KABAR_OTP_MAX_ATTEMPTS", 5, 1..=20)? as u32;
        let resend = r.number("KABAR_OTP_RESEND_SECONDS", 60, 0..=3600)?;
        let per_hour = r.number("KABAR_OTP_MAX_SENDS_PER_HOUR", 5, 1..=1000)? as u32;
        let per_ip = r.number("KABAR_OTP_MAX_SENDS_PER_IP_PER_HOUR", 20, 1..=100_000)? as u32;
        let code_length = r.number("KABAR_OTP_CODE_LENGTH", 6, 4..=10)? as usize;
        let daily_limit = r.number("KABAR_OTP_DAILY_LIMIT", 10_000, 1..=10_000_000)? as u32;
        let template = r.string("KABAR_OTP_TEMPLATE", "otp_code");
        match templates.get(&template) {
            Some(t) if t.category == crate::templates::Category::Authentication => {}
            Some(_) => {
                return Err(err(
                    "KABAR_OTP_TEMPLATE",
                    format!("template {template:?} must have category AUTHENTICATION"),
                ));
            }
            None => {
                return Err(err(
                    "KABAR_OTP_TEMPLATE",
                    format!("template {template:?} is not in the registry"),
                ));
            }
        }
        let allowed = r.string("KABAR_OTP_ALLOWED_COUNTRIES", "62");
        let allowed_countries = allowed
            .split(',')
            .map(|c| c.trim().trim_start_matches('+'))
            .filter(|c| !c.is_empty())
            .map(|c| match c.parse::<u16>() {
                Ok(n) if (1..=999).contains(&n) => Ok(n),
                _ => Err(err(
                    "KABAR_OTP_ALLOWED_COUNTRIES",
                    format!("needs country calling codes separated by commas, e.g. 62 or 62,60,65 (got {c:?})"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if allowed_countries.is_empty() {
            return Err(err(
                "KABAR_OTP_ALLOWED_COUNTRIES",
                "needs at least one country calling code, e.g. 62",
            ));
        }
        let mut test_numbers = HashMap::new();
        if let Some(list) = r.secret("KABAR_OTP_TEST_NUMBERS", "KABAR_OTP_TEST_NUMBERS_FILE")? {
            for entry in list
                .expose_secret()
                .split([',', '\n'])
                .map(str::trim)
                .filter(|e| !e.is_empty())
            {
                let (number, code) = entry.split_once('=').ok_or_else(|| {
                    err(
                        "KABAR_OTP_TEST_NUMBERS",
                        "needs entries like 6281100000001=123456 separated by commas",
                    )
                })?;
                let phone = phone::normalize(number)
                    .map_err(|e| err("KABAR_OTP_TEST_NUMBERS", format!("{number:?}: {e}")))?;
                let code = code.trim();
                if code.len() != code_length || !code.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err(
                        "KABAR_OTP_TEST_NUMBERS",
                        format!(
                            "the code for {number} must be {code_length} digits (KABAR_OTP_CODE_LENGTH)"
                        ),
                    ));
                }
                test_numbers.insert(phone.digits().to_owned(), SecretString::from(code));
            }
        }
        Ok(OtpConfig {
            secret,
            ttl: Duration::from_secs(ttl),
            max_attempts,
            resend_after: Duration::from_secs(resend),
            max_sends_per_hour: per_hour,
            max_sends_per_ip_per_hour: per_ip,
            code_length,
            template,
            allowed_countries,
            daily_limit,
            test_numbers,
        })
    }
}

fn is_graph_version(v: &str) -> bool {
    v.strip_prefix('v')
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(major, minor)| {
            !major.is_empty()
                && !minor.is_empty()
                && major.bytes().all(|b| b.is_ascii_digit())
                && minor.bytes().all(|b| b.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn userinfo_never_shows() {
        assert_eq!(redact_url("ftp://u:pw@x"), "ftp://[redacted]@x");
        assert_eq!(
            redact_url("https://user:p%40ss@graph.example/v1?a=b@c"),
            "https://[redacted]@graph.example/v1?a=b@c"
        );
        assert_eq!(
            redact_url("https://graph.facebook.com/a@b"),
            "https://graph.facebook.com/a@b"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
