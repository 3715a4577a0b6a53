# syntax=docker/dockerfile:1
# loragate images. Two targets, both small and non-root:
#   docker build --target gateway -t loragate-gateway .   (light deps only: pip install .; see GATEWAY_EXTRAS)
#   docker build --target monitor -t loragate-monitor .   (pip install .[monitor]: Evidently, pandas, pyarrow)
#   docker build --target monitor --build-arg MONITOR_EXTRAS=monitor,train -t loragate-trainer .
#     (the same image able to run `loragate train|pipeline run`, the chart's training Job: adds torch/peft)
# The vLLM engine runs from the official vllm/vllm-openai image; it is not built here.
# No secrets are baked in: API keys and the admin token come from the environment at run time.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# A C compiler and PCRE2's headers build the C modules (setup.py: the scrubber's rules, the request log's JSON
# reading and its queue); the runtime image needs only libpcre2-8, which the slim image already has. (Debian bookworm's versions, pinned by the base image's release.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libpcre2-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/loragate
COPY pyproject.toml setup.py README* ./
COPY service ./service
COPY monitoring ./monitoring
COPY loragate ./loragate

FROM build AS build-gateway
# Light deps only by default. The request log (LORAGATE_REQUEST_LOG_URL) needs pyarrow:
# docker build --target gateway --build-arg GATEWAY_EXTRAS=requestlog .
ARG GATEWAY_EXTRAS=""
RUN /opt/loragate/bin/pip install --no-cache-dir ".${GATEWAY_EXTRAS:+[$GATEWAY_EXTRAS]}"

FROM build AS build-monitor
ARG MONITOR_EXTRAS="monitor"
RUN /opt/loragate/bin/pip install --no-cache-dir ".[${MONITOR_EXTRAS}]"

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/loragate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 10001 loragate \
    && useradd --system --uid 10001 --gid loragate --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin loragate \
    && mkdir -p /var/lib/loragate/requestlog /var/lib/loragate/monitor \
    && chown -R 10001:10001 /var/lib/loragate
# (Owned by the loragate user so that named volumes mounted there start writable.)
WORKDIR /app

FROM runtime AS monitor
# `loragate monitor --config monitor.yaml` (docs/monitoring.md): mount the config at
# /etc/loragate/monitor.yaml. --host/--port override the config's, so /metrics and /healthz
# are on 0.0.0.0:9108 (the chart and compose use the same). Reports and trigger state go
# where the config says (output_dir, state_file): put them on a volume.
COPY --from=build-monitor /opt/loragate /opt/loragate
USER 10001:10001
EXPOSE 9108
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2)"]
ENTRYPOINT ["loragate"]
CMD ["monitor", "--config", "/etc/loragate/monitor.yaml", "--host", "0.0.0.0", "--port", "9108"]

# The default target (last stage): the gateway. One uvicorn worker per container; scale with replicas.
FROM runtime AS gateway
COPY --from=build-gateway /opt/loragate /opt/loragate
ENV LORAGATE_HOST=0.0.0.0 \
    LORAGATE_PORT=8080 \
    LORAGATE_WORKERS=1 \
    LORAGATE_ROUTES_FILE=/etc/loragate/routes/routes.yaml
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LORAGATE_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["loragate"]
CMD ["serve"]
