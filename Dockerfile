# syntax=docker/dockerfile:1
# sms-bridge: two stages, a build stage that makes a wheel and a slim runtime.
#   docker build -t sms-bridge .
#   docker run -p 2525:2525 -p 8080:8080 -v sms-bridge:/data sms-bridge
# That runs the sandbox provider: nothing leaves the machine, so the open listeners are
# fine. With the real provider the bridge refuses to start (protected mode) until its
# listeners are protected; give it tokens and the SMTP clients' networks, secrets as files:
#   docker run -p 2525:2525 -p 8080:8080 -v sms-bridge:/data \
#     -e SMS_BRIDGE_PROVIDER_BASE_URL=https://sms.massej.li/api/v1 \
#     -e SMS_BRIDGE_PROVIDER_API_KEY_FILE=/run/secrets/sms_api_key \
#     -e SMS_BRIDGE_TOKENS_DEPLOY_TOKEN_FILE=/run/secrets/deploy_token \
#     -e SMS_BRIDGE_TOKENS_DEPLOY_SCOPES=send \
#     -e SMS_BRIDGE_SMTP_ALLOWED_NETWORKS=192.0.2.0/24 \
#     -e SMS_BRIDGE_HTTP_ALLOWED_HOSTS=sms-bridge.example.org \
#     sms-bridge
# (the secrets from `docker secret`/compose `secrets:`, or -v FILE:/run/secrets/NAME:ro).
# Or configure with a file (-v ./config.toml:/etc/sms-bridge/config.toml:ro and
# -e SMS_BRIDGE_CONFIG=/etc/sms-bridge/config.toml); chmod 600 it if it holds secrets.
# Other machines reach the API by name only once it is in http.allowed_hosts (any IP
# address works as it is). See docs/security.md.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin sms-bridge \
    && mkdir -p /data /etc/sms-bridge \
    && chown sms-bridge:sms-bridge /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

ENV PYTHONUNBUFFERED=1 \
    SMS_BRIDGE_STORE_PATH=/data/sms-bridge.db \
    SMS_BRIDGE_SMTP_LISTEN=0.0.0.0:2525 \
    SMS_BRIDGE_HTTP_LISTEN=0.0.0.0:8080 \
    SMS_BRIDGE_LOG_FORMAT=json
VOLUME ["/data"]
WORKDIR /data
USER sms-bridge
EXPOSE 2525 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sms-bridge"]
CMD ["serve"]
