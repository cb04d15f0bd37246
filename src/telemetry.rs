//! Structured logs with `tracing`: human-readable by default, one JSON object per line with
//! `KABAR_LOG_FORMAT=json`. The level comes from `KABAR_LOG` (or `RUST_LOG`), default `info`.

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let filter = match set("KABAR_LOG").or_else(|| set("RUST_LOG")) {
        None => EnvFilter::new("info"),
        Some(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("kabar: KABAR_LOG {spec:?} is not a log filter ({e}); using info");
            EnvFilter::new("info")
        }),
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
