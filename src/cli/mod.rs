//! Operators' commands that are gRPC clients of a running kabar (`kabar batch ...`).

pub mod batch;
pub mod ops;
mod sheet;

use std::time::Duration;

use kabar::config::{Environment, Source};
use tonic::transport::{Channel, Endpoint};

/// Where kabar listens when neither `--addr` nor `KABAR_GRPC_ADDR` says.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";

/// Exit codes of the client commands.
pub mod exit {
    pub const OK: u8 = 0;
    /// kabar unreachable, or a call refused for another reason than its input.
    pub const FAILURE: u8 = 1;
    /// The input was refused (the file, an argument, or the server's checks): fix it and run
    /// again.
    pub const INPUT: u8 = 2;
    /// The batch is paused: an operator has to fix the cause and resume it.
    pub const PAUSED: u8 = 3;
    /// The batch was cancelled.
    pub const CANCELLED: u8 = 4;
    /// Ctrl-C while following a batch (which goes on in kabar).
    pub const INTERRUPTED: u8 = 130;
}

/// Why a command stopped: what to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn input(message: impl Into<String>) -> Self {
        Failure {
            code: exit::INPUT,
            message: message.into(),
        }
    }

    pub fn other(message: impl Into<String>) -> Self {
        Failure {
            code: exit::FAILURE,
            message: message.into(),
        }
    }
}

/// The caller's key, from `KABAR_API_KEY` (environment, then `./.env`), sent with every call as
/// `authorization: Bearer <key>` (kabar with `KABAR_API_KEYS_FILE` needs it).
#[derive(Clone)]
pub struct ApiKey(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl ApiKey {
    pub fn from_env() -> Result<Self, Failure> {
        let env = Environment::load().ok();
        let key = match &env {
            Some(env) => env.get("KABAR_API_KEY"),
            None => std::env::var("KABAR_API_KEY").ok(),
        };
        match key.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()) {
            None => Ok(ApiKey(None)),
            Some(key) => format!("Bearer {key}")
                .parse()
                .map(|v| ApiKey(Some(v)))
                .map_err(|_| {
                    Failure::input(
                        "KABAR_API_KEY: not a key (printable ASCII, as `kabar keys new` prints it)",
                    )
                }),
        }
    }
}

impl tonic::service::Interceptor for ApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The address to call: `--addr`, else `KABAR_GRPC_ADDR` (environment, then `./.env`, as
/// `kabar serve` reads it), else [`DEFAULT_ADDR`].
pub fn resolve_addr(flag: Option<&str>) -> String {
    if let Some(addr) = flag.map(str::trim).filter(|a| !a.is_empty()) {
        return addr.to_owned();
    }
    // A broken .env is `kabar serve`'s problem to report; the client only falls back.
    let env = Environment::load().ok();
    let from_env = match &env {
        Some(env) => env.get("KABAR_GRPC_ADDR"),
        None => std::env::var("KABAR_GRPC_ADDR").ok(),
    };
    from_env
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned())
}

/// The URL of `host:port`, `http://host:port` or `https://host:port` (kabar with
/// `KABAR_TLS_CERT_FILE`).
pub fn endpoint_url(addr: &str) -> Result<String, String> {
    let addr = addr.trim();
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_owned()
    } else if addr.contains("://") {
        return Err(format!(
            "{addr}: give host:port, http://host:port or https://host:port"
        ));
    } else {
        format!("http://{addr}")
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("{addr}: give host:port or http://host:port"))?;
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(format!(
            "{addr}: give host:port or http://host:port (e.g. {DEFAULT_ADDR})"
        ));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("{addr}: give host:port, without a path"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// How to reach kabar over TLS, from `KABAR_TLS_CA_FILE`, `KABAR_TLS_CLIENT_CERT_FILE` and
/// `KABAR_TLS_CLIENT_KEY_FILE` (environment, then `./.env`).
fn client_tls() -> kabar::tls::ClientTls {
    let env = Environment::load().ok();
    let get = |name: &str| {
        match &env {
            Some(env) => env.get(name),
            None => std::env::var(name).ok(),
        }
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .map(Into::into)
    };
    kabar::tls::ClientTls {
        ca: get("KABAR_TLS_CA_FILE"),
        cert: get("KABAR_TLS_CLIENT_CERT_FILE"),
        key: get("KABAR_TLS_CLIENT_KEY_FILE"),
    }
}

/// A connection to kabar at `addr`.
pub async fn connect(addr: &str) -> Result<Channel, Failure> {
    let url = endpoint_url(addr).map_err(Failure::input)?;
    let unreachable = |e: &dyn std::error::Error| {
        Failure::other(format!(
            "cannot reach kabar at {addr}: {}\nIs `kabar serve` running there? Give the address \
             with --addr or KABAR_GRPC_ADDR.",
            error_chain(e)
        ))
    };
    if url.starts_with("https://") {
        let uri: http::Uri = url.parse().map_err(|_| Failure::input(addr))?;
        let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
            return Err(Failure::input(format!("{addr}: give https://host:port")));
        };
        let config =
            kabar::tls::client_config(&client_tls()).map_err(|e| Failure::input(e.to_string()))?;
        return kabar::tls::connect(host, port, config, Duration::from_secs(5))
            .await
            .map_err(|e| unreachable(&e));
    }
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| Failure::input(format!("{addr}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    endpoint.connect().await.map_err(|e| unreachable(&e))
}

/// An error and its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_port_or_http_urls() {
        assert_eq!(
            endpoint_url("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            endpoint_url(" http://kabar.internal:50051/ ").unwrap(),
            "http://kabar.internal:50051"
        );
        assert_eq!(endpoint_url("[::1]:50051").unwrap(), "http://[::1]:50051");
        assert_eq!(
            endpoint_url("https://kabar.internal:50051").unwrap(),
            "https://kabar.internal:50051"
        );
        for bad in [
            "grpc://kabar:50051",
            "kabar",
            "http://kabar",
            "kabar:50051/v1",
            "",
            ":50051",
        ] {
            assert!(endpoint_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_flag_wins_over_the_environment() {
        assert_eq!(resolve_addr(Some(" 10.0.0.5:6000 ")), "10.0.0.5:6000");
    }
}
