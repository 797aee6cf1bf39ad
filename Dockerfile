# tuneshop: build the release binary, then run it on a slim Debian with Python's pip (used once,
# to fetch the default model into the data volume).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY openapi openapi
RUN cargo build --release --locked && strip target/release/tuneshop

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data --create-home tuneshop
COPY --from=build /src/target/release/tuneshop /usr/local/bin/tuneshop
USER tuneshop
ENV TUNESHOP_DATA_DIR=/data \
    TUNESHOP_ADDR=0.0.0.0:8080 \
    PIP_BREAK_SYSTEM_PACKAGES=1
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["tuneshop"]
CMD ["serve"]
