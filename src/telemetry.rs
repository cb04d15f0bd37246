//! Structured logs with `tracing`: human-readable by default, one JSON object per line with
//! `KABAR_LOG_FORMAT=json`. The level comes from `KABAR_LOG` (or `RUST_LOG`), default `info`.
//! Colours only on a terminal: a file or the journal gets plain text.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// `filter`: the configured filter (`KABAR_LOG`, else `RUST_LOG`), if any.
pub fn init(format: LogFormat, filter: Option<&str>) {
    let filter = match filter {
        None => EnvFilter::new("info"),
        Some(spec) => EnvFilter::try_new(spec).unwrap_or_else(|e| {
            eprintln!("kabar: KABAR_LOG {spec:?} is not a log filter ({e}); using info");
            EnvFilter::new("info")
        }),
    };
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests starting several apps) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
