//! kabar's integration tests: one binary, the whole app in-process, real Redis, a real HTTP
//! stand-in for Meta, real gRPC clients.

mod config;
mod meta_errors;
mod otp;
mod phone;
mod send_template;
mod server;
mod support;
