# relay container image: multi-stage build with cargo-chef dependency caching.
#
#   docker build -t relay:local .
#
# Stages:
#   chef     Rust toolchain + cargo-chef (the Rust tag must equal rust-toolchain.toml's channel;
#            .ci/deploy-checks.sh enforces it, and rust-toolchain.toml itself is kept out of the
#            build context so rustup never downloads extra components in here)
#   planner  turns the workspace's manifests (Cargo.toml, loadgen/Cargo.toml) and Cargo.lock into
#            recipe.json (changes only when dependencies change)
#   builder  builds relay's dependencies from the recipe (cached layer), then the relay binary;
#            the load generator (loadgen/, a workspace member) and its dependencies are not built
#   runtime  distroless glibc image, no shell, non-root uid 65532
#
# The builder is Debian 12 (bookworm) so the binary links against the same glibc as the
# distroless cc-debian12 runtime.

FROM rust:1.95.0-slim-bookworm AS chef
WORKDIR /build
# SQLX_OFFLINE: never try to reach a database at compile time (sqlx::migrate! only embeds files).
# CARGO_PROFILE_RELEASE_STRIP: smaller image without editing Cargo.toml; set here so cook and
# build use the same profile (otherwise the dependency cache would be missed).
ENV SQLX_OFFLINE=true \
    CARGO_INCREMENTAL=0 \
    CARGO_TERM_COLOR=never \
    CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo install cargo-chef --locked --version 0.1.78

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
# Patched crates (vendor/README.md) are dependencies, not workspace members: the recipe does not
# carry them, so they come in before the dependency build.
COPY vendor/ vendor/
# Dependencies only: this layer is reused until the manifests / Cargo.lock change. `-p relay` here
# and below: the same package, so the same features, so the cached dependencies are the ones used.
RUN cargo chef cook --release --locked -p relay --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p relay --bin relay \
    && cp target/release/relay /build/relay

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="Realtime fan-out service: Redis pub/sub to WebSocket and SSE" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
WORKDIR /app
# Owned by root and not writable by the service user: the service writes nothing to disk, so the
# root filesystem can be mounted read-only.
COPY --from=builder --chown=0:0 /build/relay /usr/local/bin/relay
COPY --chown=0:0 config/ /app/config/
ENV APP_ENV=production \
    APP_CONFIG_DIR=/app/config
# 65532 = "nonroot" in distroless; numeric so Kubernetes runAsNonRoot can verify it.
USER 65532:65532
# 8080: public API (HTTP, /healthz, /readyz, /ws, /sse, /api/v1). 9090: admin (/metrics).
EXPOSE 8080 9090
# GETs /readyz on server.port; no shell or curl needed in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=40s --retries=3 \
    CMD ["/usr/local/bin/relay", "healthcheck"]
# Subcommands: serve (default), migrate, check-config, healthcheck.
ENTRYPOINT ["/usr/local/bin/relay"]
CMD ["serve"]
