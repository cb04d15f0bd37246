//! Files read again without a restart: on SIGHUP, and when their content changes (checked every
//! [`POLL_INTERVAL`]), which covers a Kubernetes Secret or cert-manager rotating a mounted file
//! and an operator editing it in place. A file that does not read keeps what is in force, with an
//! error logged once per change.

use std::{path::PathBuf, sync::Arc, time::Duration};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// How often the watched files are compared with what was last read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Most bytes of a watched file taken into its fingerprint (the readers refuse bigger files).
const MAX_FINGERPRINT_BYTES: u64 = 2 * 1024 * 1024;

/// What the watched files hold now: a change in any of them changes it. A missing or unreadable
/// file counts as its error, so that its return is a change too.
fn fingerprint(paths: &[PathBuf]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for path in paths {
        hash.update(path.as_os_str().as_encoded_bytes());
        match crate::config::read_small_file(path, MAX_FINGERPRINT_BYTES) {
            Ok(bytes) => {
                hash.update(b"\x01");
                hash.update(&bytes);
            }
            Err(e) => {
                hash.update(b"\x00");
                hash.update(e.as_bytes());
            }
        }
    }
    hash.finalize().into()
}

/// Reads the files again with `reload` on SIGHUP and whenever their content changes, until
/// `shutdown`. `reload` returns a summary to log (never a secret) or the error, which names the
/// variable at fault; `what` names the files in the log lines (e.g. `KABAR_API_KEYS_FILE`).
///
/// The files' fingerprint and the SIGHUP handler are taken when this is called (within the
/// runtime, before kabar serves), not when the returned future first runs: a change or a signal
/// that comes before the task is scheduled is not lost.
pub fn watch<F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    shutdown: CancellationToken,
    reload: F,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let first = fingerprint(&paths);
    follow(what, paths, shutdown, reload, hangups.ok(), first)
}

async fn follow<F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    shutdown: CancellationToken,
    reload: F,
    mut hangups: Option<tokio::signal::unix::Signal>,
    first: [u8; 32],
) where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    let reload = Arc::new(reload);
    if hangups.is_none() {
        tracing::warn!(
            what,
            "cannot listen for SIGHUP: changed files are still read again"
        );
    }
    let shown = paths
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut last = first;
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let hangup = tokio::select! {
            () = shutdown.cancelled() => return,
            Some(()) = async {
                match hangups.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
            _ = ticker.tick() => false,
        };
        let now = fingerprint_blocking(paths.clone()).await;
        if !hangup && now == last {
            continue;
        }
        last = now;
        let run = reload.clone();
        let outcome = tokio::task::spawn_blocking(move || run())
            .await
            .unwrap_or_else(|_| Err("could not be read".into()));
        let why = if hangup { "SIGHUP" } else { "file changed" };
        match outcome {
            Ok(summary) => tracing::info!(what, file = %shown, why, "{what} read again: {summary}"),
            Err(error) => tracing::error!(
                what,
                file = %shown,
                why,
                error = %error,
                "{what} could not be read again; what is in force stays"
            ),
        }
    }
}

async fn fingerprint_blocking(paths: Vec<PathBuf>) -> [u8; 32] {
    tokio::task::spawn_blocking(move || fingerprint(&paths))
        .await
        .unwrap_or([0; 32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_follows_content_and_presence() {
        let dir = std::env::temp_dir().join(format!("kabar-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys.toml");
        let paths = vec![file.clone()];
        let missing = fingerprint(&paths);
        std::fs::write(&file, "a").unwrap();
        let a = fingerprint(&paths);
        assert_ne!(a, missing, "a file appearing is a change");
        assert_eq!(fingerprint(&paths), a, "the same content is no change");
        std::fs::write(&file, "b").unwrap();
        assert_ne!(fingerprint(&paths), a, "new content is a change");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(fingerprint(&paths), missing);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
