"""Prometheus metrics of a process running pipelines (``ingestd run --metrics-port``, ``ingestd serve``).

Process-wide, as prometheus-client intends: every pipeline of the process adds to the same series, so a
daemon running several jobs exports their totals. Labels are of low cardinality only (level, endpoint,
status class, cause, job state): never a sample index, a pattern name or a job id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SAMPLES_READ = Counter("ingestd_samples_read_total", "Records read from sources.")
SAMPLES_LEARNED = Counter("ingestd_samples_learned_total", "Samples learned by every level of the hierarchy.")
SAMPLES_FILTERED = Counter("ingestd_samples_filtered_total", "Records skipped as too short (10 characters or fewer).")
SAMPLES_FAILED = Counter("ingestd_samples_failed_total", "Samples that failed (bad record, or rejected by KATO).")
SAMPLES_SKIPPED = Counter("ingestd_samples_skipped_total", "Samples skipped because an earlier run learned them.")
TOKENS = Counter("ingestd_tokens_total", "Tokens of learned samples.")
PATTERNS = Counter("ingestd_patterns_learned_total", "Patterns learned, per hierarchy level.", ["level"])
REQUESTS = Counter("ingestd_kato_requests_total", "Calls to KATO, by endpoint and status class.",
                   ["endpoint", "status_class"])  # fmt: skip
RETRIES = Counter("ingestd_retries_total", "KATO calls sent again, by cause.", ["cause"])
SESSION_RECREATIONS = Counter("ingestd_session_recreations_total", "KATO sessions recreated after they were lost.")
SERVER_OUTAGES = Counter("ingestd_server_restarts_detected_total", "Outages of the KATO server waited out.")
POSSIBLE_DUPLICATES = Counter("ingestd_possible_duplicates_total",
                              "Resends that a server without idempotency keys may have applied twice.")  # fmt: skip

REQUEST_SECONDS = Histogram("ingestd_kato_request_duration_seconds", "Latency of KATO calls, by endpoint.",
                            ["endpoint"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                   5, 10, 30))  # fmt: skip
SAMPLE_SECONDS = Histogram("ingestd_sample_duration_seconds", "From a sample's first call to its last, all levels.",
                           buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))  # fmt: skip

QUEUE_DEPTH = Gauge("ingestd_queue_depth", "Planned samples waiting for a worker.")
IN_FLIGHT = Gauge("ingestd_samples_in_flight", "Samples being learned now.")
WORKERS_BUSY = Gauge("ingestd_workers_busy", "Workers learning a sample now.")
JOBS = Gauge("ingestd_jobs", "Daemon jobs, by state.", ["state"])

RUN_METRIC_NAMES = (
    "ingestd_samples_read_total", "ingestd_samples_learned_total", "ingestd_samples_filtered_total",
    "ingestd_samples_failed_total", "ingestd_samples_skipped_total", "ingestd_tokens_total",
    "ingestd_patterns_learned_total", "ingestd_kato_requests_total", "ingestd_retries_total",
    "ingestd_session_recreations_total", "ingestd_server_restarts_detected_total", "ingestd_possible_duplicates_total",
    "ingestd_kato_request_duration_seconds", "ingestd_sample_duration_seconds", "ingestd_queue_depth",
    "ingestd_samples_in_flight", "ingestd_workers_busy", "ingestd_jobs",
)  # fmt: skip
"""Every metric family ingestd exports (dashboards and alert rules may only use these)."""


LABEL_VALUES = {
    "endpoint": ("create-session", "delete-session", "observe-sequence", "clear-stm", "clear-all", "pattern", "load"),
    "status_class": ("2xx", "4xx", "5xx", "error"),
    "cause": ("server_down", "session_lost", "ambiguous"),
    "state": ("queued", "running", "succeeded", "failed", "cancelled"),
}
"""The values each label takes (``level`` is a hierarchy level, 0 up): what dashboards and alerts may match."""


def status_class(status: int | None) -> str:
    """``2xx``/``4xx``/``5xx`` for an answer, ``error`` when there was none."""
    return "error" if status is None else f"{status // 100}xx"


def record_request(endpoint: str, status: int | None, seconds: float) -> None:
    """One KATO call (over HTTP, or the embedded engine's operation of the same name) and its latency."""
    REQUESTS.labels(endpoint, status_class(status)).inc()
    REQUEST_SECONDS.labels(endpoint).observe(seconds)
