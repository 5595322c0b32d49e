# syntax=docker/dockerfile:1
#
# graceful: one static binary in an empty image.
#   docker build -t graceful:latest .
#   kind load docker-image graceful:latest        # or: minikube image load graceful:latest
#
# The runtime stage can also take a binary built elsewhere: a named build context called `build`
# stands in for the build stage (which is then skipped, nothing is pulled), e.g.
#   docker buildx build --build-context build=DIR -t graceful:latest DIR   # DIR/out/usr/local/bin/graceful
# CI does this with buildah (.ci/build-image), so it builds the very runtime stage users get.
#
# Stage 1 builds a fully static musl binary (no C dependencies: actix/awc default features are off,
# the OTLP exporter speaks plain HTTP). Stage 2 is `scratch`: no shell, no libc, no package manager;
# the binary is PID 1 and handles SIGTERM itself, so no init is needed.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim AS build
ARG TARGET=x86_64-unknown-linux-musl
RUN rustup target add "${TARGET}"
WORKDIR /src

# Dependencies first, in their own layer: with only the manifests and a stub crate, this layer is
# rebuilt only when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --target "${TARGET}" \
 && rm -rf src \
    "target/${TARGET}/release/.fingerprint/graceful-"* \
    "target/${TARGET}/release/deps/graceful-"* \
    "target/${TARGET}/release/deps/libgraceful-"*

# Then the real sources; only the crate itself recompiles. The lab embeds the rendered overlays
# (include_str!), so they are part of the sources.
COPY src ./src
COPY deploy/rendered ./deploy/rendered
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --target "${TARGET}" \
 && install -D -m 0555 "target/${TARGET}/release/graceful" /out/usr/local/bin/graceful

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="graceful" \
      org.opencontainers.image.description="Shows and solves the Kubernetes graceful-shutdown race: backend, frontend, preStop probe and a local lab" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="scratch"
COPY --from=build /out/ /
# 65532: the conventional "nonroot" id; numeric so that runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
EXPOSE 5000 5001 8080 8081
ENTRYPOINT ["/usr/local/bin/graceful"]
CMD ["--help"]
