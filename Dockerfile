# syntax=docker/dockerfile:1
# presence-gateway: the release binary on a distroless base (glibc, CA certificates, no shell),
# run as the image's non-root user. Build from the repository root:
#   docker build -t presence-gateway:0.1.0 .
# The Helm chart (helm/presence-gateway) runs it with a read-only root filesystem.

# The compiler rust-toolchain.toml pins, so rustup downloads nothing during the build.
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
# Caches keep the registry and the build directory between builds; the binary is copied out of
# the cached target directory, which is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p presence-gateway --bin presence-gateway \
    && cp target/release/presence-gateway /presence-gateway

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /presence-gateway /usr/local/bin/presence-gateway
# 65532 is distroless's `nonroot`; the chart's securityContext uses the same ids.
USER 65532:65532
EXPOSE 8080
ENV PRESENCE_LISTEN=0.0.0.0:8080 \
    PRESENCE_LOG_FORMAT=json
# Kubernetes probes /healthz and /readyz (the chart sets them); the image has no shell or curl
# for a Docker HEALTHCHECK.
ENTRYPOINT ["/usr/local/bin/presence-gateway"]
