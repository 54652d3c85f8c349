# syntax=docker/dockerfile:1
# sms-bridge: two stages, a build stage that makes a wheel and a slim runtime.
#   docker build -t sms-bridge .
#   docker run -p 2525:2525 -p 8080:8080 -v sms-bridge:/data sms-bridge
# Configure with a file (-v ./config.toml:/etc/sms-bridge/config.toml:ro) or with
# SMS_BRIDGE_<SECTION>_<KEY> environment variables; secrets as *_FILE (Docker secrets).

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
