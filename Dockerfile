# fleetlake for docker-compose.yml. Not built in CI (no Docker engine there).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends mold && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin fleetlake

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/fleetlake /usr/local/bin/fleetlake
ENTRYPOINT ["fleetlake"]
