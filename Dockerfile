# syntax=docker/dockerfile:1
# sms-bridge: two stages, a build stage that makes a wheel and a slim runtime.
#   docker build -t sms-bridge .
#   docker run --stop-timeout 30 -p 127.0.0.1:2525:2525 -p 127.0.0.1:8080:8080 \
#     -v sms-bridge:/data sms-bridge
# (30 s to stop: the provider request under way may take 15; see docs/recipes.md, "Docker")
# The bridge reads /etc/sms-bridge/config.toml (SMS_BRIDGE_CONFIG); the image's own is
# docker/config.toml. Mount yours over it (it replaces the image's whole):
#   --mount type=bind,src="$PWD/config.toml",dst=/etc/sms-bridge/config.toml,readonly
# and secrets as files its *_file keys name:
#   --mount type=bind,src="$PWD/secrets",dst=/run/secrets,readonly
# Single keys: -e SMS_BRIDGE_<SECTION>_<KEY>. See docs/recipes.md, "Docker".
# With the sandbox (no provider.base_url) nothing leaves the machine. With the real
# provider the bridge refuses to start (protected mode) until its listeners are
# protected: tokens, smtp.allowed_networks or require_auth, http.allowed_hosts for the
# names clients use. See docs/security.md.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
# With the postgres extra (asyncpg): the same image runs on SQLite or, with store.url,
# as one of several instances on PostgreSQL (docs/cluster.md).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres]"

FROM python:3.11-slim-bookworm
# tini as PID 1 (Debian's package): the kernel drops a signal sent to PID 1 that has no
# handler, and Python has none for SIGTERM until `serve` installs its own, so a
# `docker stop` while the bridge started (imports, waiting for its store) was ignored
# and ended by SIGKILL 10 s later. tini forwards SIGTERM to the bridge at any moment
# and reaps what exits: no `docker run --init` needed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin sms-bridge \
    && mkdir -p /data /etc/sms-bridge \
    && chown sms-bridge:sms-bridge /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

COPY docker/config.toml /etc/sms-bridge/config.toml
# Only the file's location here: a key set by ENV would win over a mounted file's value.
ENV PYTHONUNBUFFERED=1 \
    SMS_BRIDGE_CONFIG=/etc/sms-bridge/config.toml
VOLUME ["/data"]
WORKDIR /data
USER sms-bridge
EXPOSE 2525 8080
# /healthz where the config has HTTP listen (its port, HTTPS with http.tls_cert); with
# http.listen = "" (mail only), the SMTP greeting on smtp.listen.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["sms-bridge", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "sms-bridge"]
CMD ["serve"]
