# kabar's container image: the release binary on a small runtime image, run as a non-root user.
#
#   docker build -t kabar:0.1.0 .
#   docker run --rm kabar:0.1.0 keys new --name billing --scope notify --scope status
#   docker compose up          # kabar with Redis, see compose.yaml
#
# The image listens on all container addresses (KABAR_GRPC_ADDR 0.0.0.0:50051), so kabar starts
# only with KABAR_API_KEYS_FILE (or KABAR_ALLOW_UNAUTHENTICATED=true): see "Callers and keys" in
# README.md. Configuration comes from the environment; kabar also reads a .env file from its
# working directory, /etc/kabar.
#
# No HEALTHCHECK: the runtime image has no shell and no HTTP client. Use the orchestrator's
# probes instead (deploy/kubernetes.yaml: gRPC health for readiness, GET /healthz on port 8080 for
# liveness).

# The build stage's Rust is the release rust-toolchain.toml pins (scripts/check-deploy.sh checks
# that they match). rust-toolchain.toml itself stays out of the build context: it also asks for
# rustfmt and clippy, which the image does not have and the build does not need.
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in a layer of their own: it is built again only when Cargo.toml,
# Cargo.lock, build.rs, the proto or the benches (which Cargo.toml names) change, not on every
# source edit. A placeholder crate stands in for src/ while they compile.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY benches benches
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin kabar \
    && rm -rf src

# COPY keeps the files' own modification times, which can be older than the placeholder build:
# touch the crate roots so that cargo builds kabar itself again.
COPY src src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin kabar \
    && ./target/release/kabar --version

# glibc and libgcc_s (which the binary links), CA certificates and a passwd entry for the
# nonroot user (65532, the runAsUser of deploy/kubernetes.yaml); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="kabar" \
      org.opencontainers.image.description="gRPC notification gateway and WhatsApp OTP service for Indonesian ISP billing systems" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /src/target/release/kabar /usr/local/bin/kabar
WORKDIR /etc/kabar
ENV KABAR_GRPC_ADDR=0.0.0.0:50051 \
    KABAR_HTTP_ADDR=0.0.0.0:8080 \
    KABAR_WEBHOOK_ADDR=0.0.0.0:8081
USER 65532:65532
# gRPC (kabar services, health, reflection); HTTP (/healthz, /readyz, /status, /metrics); Meta's webhook
# (served only with META_APP_SECRET).
EXPOSE 50051 8080 8081
# kabar handles SIGTERM itself (health NOT_SERVING, the shutdown delay, then the grace for calls
# in flight): give `docker stop` more than delay + grace (docker stop -t 35; compose.yaml sets
# stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/kabar"]
CMD ["serve"]
