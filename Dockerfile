# mxpay: multi-stage build. The runtime image holds the binary, CA certificates and curl
# (for the health check), and runs as an unprivileged user (uid 10001).
#
#   docker build -t mxpay .
#   docker run -d --name mxpay \
#     -v /srv/mxpay/config:/config:ro \   # config.yaml, appservice.yaml, admin keys
#     -v /srv/mxpay/secrets:/secrets:ro \ # pin_pepper (and, if you like, the crypto store key)
#     -v /srv/mxpay/data:/data \          # ledger, inbox, payments, crypto store: back it up
#     -p 127.0.0.1:29330:29330 mxpay
#
# In /config/config.yaml (relative paths there are resolved against /config):
#   data_dir: /data
#   appservice: { listen: 0.0.0.0:29330, url: http://mxpay:29330 }   # how Synapse reaches us
#   homeserver: { url: http://synapse:8008, server_name: example.org }
#   payments: { enabled: true, pepper_file: /secrets/pin_pepper }
#   admin: { token: { algorithm: HS256, secret: { file: ./admin-jwt.key } } }
# The pepper may instead come as `-e MXPAY_PIN_PEPPER=<the pepper>`, and the crypto store key
# as `-e MXPAY_CRYPTO_STORE_KEY=<64 hex>` (otherwise it is created as /data/crypto-store.key).
# The /data volume must be writable by uid 10001. docs/admin.md has the whole procedure.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Manifests first, so dependency layers are reused when only our code changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# src/admin/api.rs embeds docs/openapi.json with include_str!.
COPY docs/openapi.json ./docs/openapi.json
# The fake sources above left stale fingerprints for our own crate: touch forces a rebuild.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && strip target/release/mxpay

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin mxpay \
    && mkdir -p /data /config /secrets && chown mxpay:mxpay /data
COPY --from=build /src/target/release/mxpay /usr/local/bin/mxpay
USER mxpay
WORKDIR /data
VOLUME ["/data"]
EXPOSE 29330
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:29330/health || exit 1
ENTRYPOINT ["/usr/local/bin/mxpay"]
CMD ["serve", "-c", "/config/config.yaml"]
