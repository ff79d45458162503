"""Filling a KATO deployment: `ingestd run` in-process + `ingestd publish`, against learning through KATO's HTTP API.

    python benchmarks/publish_bench.py [--repeat 1] [--json out.json]

Corpus: tinyshakespeare paragraphs ``--repeat`` times as jsonl; hierarchy 8,8,8,8 with metadata at levels 2,3.
In one run, each a subprocess as a user runs it, wall time end to end:

* ``ingestd run`` in-process (the embedded engine), then ``ingestd publish`` into an empty deployment: a real
  Redis (Debian's redis-server) and the real ClickHouse engine (chDB) behind a ClickHouse-HTTP endpoint, the same
  stand-ins the tests use (``tests/deployment.py``);
* ``ingestd run --kato-url`` against ``ingestd kato serve`` (ingestd's KATO-compatible server) on the same
  machine: learning the same knowledge base through the HTTP API, as a KATO deployment is filled today.

Reported: publish throughput (patterns/s, keys/s, rows and keys phases apart), and the ratio of the two ways to a
filled deployment. A real KATO 3.10.1 is slower than ``ingestd kato serve`` by the factor measured in
the brief and issue 16 (~3 ms of KATO CPU per observed token, ~4 ms per request, measured on a real KATO 3.10.1): the estimate below applies that cost to the
tokens this corpus observes, and is labelled as an estimate. The figures that carry over are the ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.deployment import Storage  # noqa: E402 - the tests' Redis and ClickHouse stand-ins

CORPUS = ROOT.parent / "shared" / "corpus" / "tinyshakespeare.txt"
HIERARCHY = ["--chunk-sizes", "8,8,8,8", "--metadata-levels", "2,3", "--node-ids", "bench-node{level}"]
KATO_SECONDS_PER_TOKEN = 0.003  # KATO 3.10.1: CPU per observed token, measured on a real KATO (the brief)


def timed(command: list[str], **options: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True, **options)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paragraphs = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 10] * args.repeat
    ingestd = [sys.executable, "-m", "ingestd"]
    quiet = ["--no-progress", "--log-level", "warning"]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        source = root / "corpus.jsonl"
        source.write_text("".join(json.dumps({"text": text}) + "\n" for text in paragraphs), encoding="utf-8")
        run_seconds, _ = timed([*ingestd, "run", str(source), "--data-dir", str(root / "kb"), *HIERARCHY, *quiet,
                                "--summary-json", str(root / "run.json")])  # fmt: skip
        summary = json.loads((root / "run.json").read_text(encoding="utf-8"))
        storage = Storage(root / "deployment").start()
        try:
            publish_seconds, published = timed([*ingestd, "publish", "--data-dir", str(root / "kb"), "--redis-url",
                                                storage.redis_url, "--clickhouse-url", storage.clickhouse_url, "--json"])  # fmt: skip
            nodes = json.loads(published.stdout)["nodes"]
            verify_seconds, _ = timed([*ingestd, "publish", "--data-dir", str(root / "kb"), "--redis-url", storage.redis_url,
                                       "--clickhouse-url", storage.clickhouse_url, "--verify", "--json"])  # fmt: skip
        finally:
            storage.stop()
        server = subprocess.Popen([*ingestd, "kato", "serve", "--port", "0", "--data", str(root / "served")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert server.stderr is not None
            url = None
            for line in server.stderr:
                found = re.search(r"API on (http://[^ ]+:\d+) ", line)
                if found:
                    url = found.group(1)
                    break
            assert url is not None, "the engine server did not start"
            http_seconds, _ = timed([*ingestd, "run", str(source), "--kato-url", url, "--run-dir", str(root / "http-run"),
                                     *HIERARCHY, *quiet, "--summary-json", str(root / "http.json")])  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)
        http = json.loads((root / "http.json").read_text(encoding="utf-8"))
    patterns = sum(node["patterns"] for node in nodes)
    keys = sum(node["keys"] for node in nodes)
    rows_seconds = sum(node.get("rows_seconds", 0) for node in nodes)
    keys_seconds = sum(node.get("keys_seconds", 0) for node in nodes)
    observed = summary["tokens"] + sum(summary["patterns_per_level"][:-1])  # tokens at level 0, names above
    local = run_seconds + publish_seconds
    result = {
        "samples": summary["samples"]["learned"], "tokens": summary["tokens"], "patterns": patterns, "keys": keys,
        "run_in_process_seconds": round(run_seconds, 2), "publish_seconds": round(publish_seconds, 2),
        "publish_patterns_per_second": round(patterns / publish_seconds), "publish_keys_per_second": round(keys / publish_seconds),
        "rows_phase_patterns_per_second": round(patterns / rows_seconds) if rows_seconds else None,
        "keys_phase_keys_per_second": round(keys / keys_seconds) if keys_seconds else None,
        "verify_seconds": round(verify_seconds, 2),
        "http_learning_seconds": round(http_seconds, 2), "http_requests": http["requests"],
        "ratio_http_over_run_plus_publish": round(http_seconds / local, 2),
        "estimated_real_kato_seconds": round(observed * KATO_SECONDS_PER_TOKEN + http["requests"] * 0.004),
        "estimated_ratio_real_kato_over_run_plus_publish": round((observed * KATO_SECONDS_PER_TOKEN + http["requests"] * 0.004) / local),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
