"""How close `ingestd run` in-process comes to the limits set by tokenizing and planning, in one run.

    python benchmarks/limits_bench.py [--repeat 12] [--shape paragraphs|doc500|doc5000] [--levels 4]
                                      [--workers 8] [--durability full] [--json out.json]

Corpus: tinyshakespeare, ``--repeat`` times, as jsonl with a ``url`` field: one sample per paragraph
(``paragraphs``, 7,142 a pass), or documents of about 500 or 5,000 GPT-2 tokens (consecutive paragraphs
joined). Hierarchy: chunk size 8 at every level; metadata at levels 2 and 3 (4 levels), or at 2, 3 and 5
(6 levels). Measured, each over the same texts, in this process unless said:

* the tokenizer alone (``load_tokenizer().tokenize_batch``, batches of 64);
* the tokenizer and the planner (``plan_levels``: every chunk and name at every level);
* ``ingestd run`` in-process, end to end, as a user runs it (a subprocess: its wall time and peak RSS).

The figure that matters is the ratio of the last to the second (tokens/s over tokens/s): how much of
the time a run spends beyond computing what to learn. Absolute figures differ 2-3x between machines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ingestd.plan import plan_levels
from ingestd.tokenize import load_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tinyshakespeare.txt"
METADATA_LEVELS = {4: "2,3", 6: "2,3,5"}


def texts(shape: str, repeat: int) -> list[str]:
    paragraphs = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) >= 11]
    if shape == "paragraphs":
        return paragraphs * repeat
    target = {"doc500": 500, "doc5000": 5000}[shape] * 4  # about 4 characters a GPT-2 token
    documents, current = [], []
    for paragraph in paragraphs * repeat:
        current.append(paragraph)
        if sum(len(part) for part in current) >= target:
            documents.append("\n\n".join(current))
            current = []
    return documents + (["\n\n".join(current)] if current else [])


def tokenize_only(samples: list[str]) -> tuple[float, int]:
    tokenizer = load_tokenizer()
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(samples), 64):
        tokens += sum(len(t) for t in tokenizer.tokenize_batch(samples[start : start + 64]))
    return time.perf_counter() - started, tokens


def tokenize_and_plan(samples: list[str], levels: int) -> float:
    tokenizer = load_tokenizer()
    started = time.perf_counter()
    for start in range(0, len(samples), 64):
        for tokens in tokenizer.tokenize_batch(samples[start : start + 64]):
            plan_levels(tokens, [8] * levels)
    return time.perf_counter() - started


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            frontier += children
    return found


def run_in_process(source: Path, levels: int, workers: int, durability: str, scratch: Path,
                   extra: list[str]) -> dict[str, Any]:  # fmt: skip
    """The run as a user types it; its peak RSS sampled every 20 ms: the process's own, and with its planner
    processes (the sum at each moment)."""
    summary = scratch / "summary.json"
    command = [sys.executable, "-m", "ingestd", "run", str(source), "--data", str(scratch / "kb"), "--no-progress",
               "--log-level", "warning", "--chunk-sizes", ",".join(["8"] * levels), "--metadata-levels",
               METADATA_LEVELS[levels], "--metadata-fields", "url", "--min-chars", "0", "--workers", str(workers),
               "--durability", durability, "--summary-json", str(summary), *extra]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    own = total = 0.0
    while process.poll() is None:
        rss = _rss_mib(process.pid)
        own, total = max(own, rss), max(total, rss + sum(_rss_mib(child) for child in _descendants(process.pid)))
        time.sleep(0.02)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"ingestd run exited {process.returncode}")
    result = json.loads(summary.read_text())
    return {"wall_seconds": round(wall, 2), "pipeline_seconds": result["wall_seconds"], "tokens": result["tokens"],
            "samples": result["samples"]["learned"], "peak_rss_mib": round(own, 1),
            "peak_rss_with_planners_mib": round(total, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=12)
    parser.add_argument("--shape", choices=["paragraphs", "doc500", "doc5000"], default="paragraphs")
    parser.add_argument("--levels", type=int, choices=sorted(METADATA_LEVELS), default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--planners", type=int, help="ingestd run --planners (default: its own)")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()

    samples = texts(options.shape, options.repeat)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        source = scratch / "corpus.jsonl"
        source.write_text("".join(json.dumps({"text": text, "url": f"https://example.org/{i}"}) + "\n"
                                  for i, text in enumerate(samples)))  # fmt: skip
        tokenize_seconds, tokens = tokenize_only(samples)
        plan_seconds = tokenize_and_plan(samples, options.levels)
        extra = [] if options.planners is None else ["--planners", str(options.planners)]
        run = run_in_process(source, options.levels, options.workers, options.durability, scratch, extra)
    assert run["tokens"] == tokens, (run["tokens"], tokens)  # the same texts, the same tokens
    rates = {"tokenizer": tokens / tokenize_seconds, "tokenizer+plan": tokens / plan_seconds,
             "ingestd run in-process": tokens / run["pipeline_seconds"]}  # fmt: skip
    report = {
        "corpus": {"shape": options.shape, "repeat": options.repeat, "samples": len(samples), "tokens": tokens},
        "hierarchy": {"levels": options.levels, "chunk_size": 8, "metadata_levels": METADATA_LEVELS[options.levels]},
        "tokens_per_second": {name: round(rate) for name, rate in rates.items()},
        "run_over_tokenizer_plus_plan": round(rates["ingestd run in-process"] / rates["tokenizer+plan"], 3),
        "plan_share_of_run": round(plan_seconds / run["pipeline_seconds"], 3),
        "run": run,
    }
    print(json.dumps(report, indent=2))
    if options.json:
        options.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
