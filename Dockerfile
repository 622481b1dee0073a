# Multi-stage build of the mqtt-notary binary.
#   docker build -t mqtt-notary .
FROM rust:1.94-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mqtt-notary

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data mqtt-notary \
 && mkdir -p /data && chown mqtt-notary /data
COPY --from=build /src/target/release/mqtt-notary /usr/local/bin/mqtt-notary
USER mqtt-notary
VOLUME /data
EXPOSE 1883 8080
ENTRYPOINT ["mqtt-notary"]
CMD ["run", "--data-dir", "/data", "--mqtt", "0.0.0.0:1883", "--http", "0.0.0.0:8080"]
