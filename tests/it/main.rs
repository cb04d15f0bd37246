//! kabar's integration tests: one binary, the whole app in-process, real Redis, a real HTTP
//! stand-in for Meta, real gRPC clients.

/// Runs `async fn NAME(redis: Option<&RedisServer>)` as two tests, `NAME::in_memory` and
/// `NAME::on_redis` (a private redis-server), so both stores pass the same case.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn in_memory() {
                super::$name(None).await
            }
            #[tokio::test]
            async fn on_redis() {
                let redis = crate::support::RedisServer::start();
                super::$name(Some(&redis)).await
            }
        }
    )*};
}

mod admin;
mod attack;
mod auth;
mod batch;
mod batch_cli;
mod batch_replicas;
mod config;
mod dashboard;
mod delivery;
mod doctor;
mod hardening;
mod meta_errors;
mod meta_graph;
mod otp;
mod pacing;
mod phone;
mod process;
mod promises_config;
mod promises_idempotency;
mod promises_meta;
mod promises_ops;
mod promises_otp;
mod send_template;
mod server;
mod status;
mod support;
mod tls;
