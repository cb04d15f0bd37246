//! The domain: what kabar does, free of transport (tonic, axum) and storage (Redis) types. The
//! edges (`grpc`, `http`) decode, call in here and encode; stores and Meta sit behind it.

pub mod auth;
pub mod batch;
pub mod delivery;
pub mod error;
pub mod outbox;
pub mod pacing;
pub mod ports;
pub mod reason;
pub mod settings;
pub mod status;
pub mod tally;
