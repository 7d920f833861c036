# mxpay: multi-stage build. The runtime image holds the binary, CA certificates and curl
# (for the health check), and runs as an unprivileged user.
#
#   docker build -t mxpay .
#   docker run -d --name mxpay \
#     -v /srv/mxpay/config:/config:ro \   # config.yaml + appservice.yaml (see docs/admin.md)
#     -v /srv/mxpay/data:/data \          # ledger, inbox, crypto store: back it up
#     -e MXPAY_PIN_PEPPER_FILE=/run/secrets/pin_pepper \
#     -p 127.0.0.1:29330:29330 mxpay
#
# In config.yaml set `data_dir: /data` and `appservice.listen: 0.0.0.0:29330`.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Manifests first, so dependency layers are reused when only our code changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# The fake sources above left stale fingerprints for our own crate: touch forces a rebuild.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && strip target/release/mxpay

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin mxpay \
    && mkdir -p /data /config && chown mxpay:mxpay /data
COPY --from=build /src/target/release/mxpay /usr/local/bin/mxpay
USER mxpay
VOLUME ["/data"]
EXPOSE 29330
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:29330/health || exit 1
ENTRYPOINT ["/usr/local/bin/mxpay"]
CMD ["serve", "-c", "/config/config.yaml"]
