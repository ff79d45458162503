"""One process against shards, on this machine, in one run: what sharding buys, and what Ray and the merge cost.

    python benchmarks/shards_bench.py [--repeat 6] [--shards 2] [--json out.json]

Corpus: tinyshakespeare ``--repeat`` times as a directory of jsonl parts (7,142 paragraphs a pass, 8 parts);
hierarchy 8,8,8,8 with metadata at 2,3. Each configuration learns the same corpus into a fresh store, as a user
runs it (``ingestd`` subprocesses, wall time end to end):

* one process (``ingestd run``, its planner process included: the default), and how many cores it keeps busy
  (N shards can be at most ``N / cores_busy`` times faster on N cores);
* ``--shards N --executor ray`` (a local Ray started by the run: its start-up is in the time, and reported alone);
* N shards by hand (``--shard I/N``, the N processes at once), then ``ingestd merge``.

The figures that carry over are the ratios (tokens/s over one process's tokens/s), and the merge's patterns/s.
Every store is checked equal to the one process's, pattern for pattern.
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tinyshakespeare.txt"
OPTIONS = ["--metadata-levels", "2,3", "--no-progress", "--log-level", "warning"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ingestd(*arguments: str, summary: Path | None = None) -> tuple[float, dict[str, Any], float]:
    """Wall seconds, the summary, and the cores the command kept busy on average (its CPU seconds, its planner
    process's included, over its wall time; Ray's own processes are not its children and are not counted)."""
    extra = ["--summary-json", str(summary)] if summary is not None else []
    started, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-m", "ingestd", *arguments, *extra], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    cores = (_children_cpu() - cpu) / elapsed
    return elapsed, json.loads(summary.read_text(encoding="utf-8")) if summary is not None else {}, cores


def dump(data: Path) -> dict[Any, Any]:
    with sqlite3.connect(data / "kato.sqlite3") as connection:
        rows = connection.execute("SELECT kb_id, name, frequency, metadata FROM patterns")
        return {(kb, name): (frequency, json.loads(metadata)) for kb, name, frequency, metadata in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paragraphs = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()] * args.repeat
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        parts = root / "corpus"
        parts.mkdir()
        size = -(-len(paragraphs) // 8)
        for number in range(8):
            part = paragraphs[number * size : (number + 1) * size]
            (parts / f"part-{number}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part), encoding="utf-8")
        one_seconds, one, one_cores = ingestd("run", str(parts), "--data-dir", str(root / "one"), *OPTIONS, summary=root / "one.json")
        tokens = one["tokens"]
        ray_seconds, on_ray, _ = ingestd("run", str(parts), "--data-dir", str(root / "ray"), "--shards", str(args.shards),
                                      "--executor", "ray", *OPTIONS, summary=root / "ray.json")  # fmt: skip
        shard_seconds = max(shard["wall_seconds"] for shard in on_ray["shards"])
        started = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, "-m", "ingestd", "run", str(parts), "--shard", f"{i}/{args.shards}",
                                       "--data-dir", str(root / f"hand{i}"), "--planners", "0", *OPTIONS],
                                      stdout=subprocess.DEVNULL) for i in range(args.shards)]  # fmt: skip
        assert all(process.wait() == 0 for process in processes)
        learned = time.perf_counter() - started
        started = time.perf_counter()
        merged = subprocess.run([sys.executable, "-m", "ingestd", "merge", *(str(root / f"hand{i}") for i in range(args.shards)),
                                 "--into", str(root / "hand"), "--json"], check=True, capture_output=True, text=True)  # fmt: skip
        merge_seconds = time.perf_counter() - started
        by_hand_seconds = learned + merge_seconds
        patterns = sum(row["patterns"] for row in json.loads(merged.stdout))
        reference = dump(root / "one")
        assert dump(root / "ray") == reference and dump(root / "hand") == reference, "a sharded store differs"
    result = {
        "samples": one["samples"]["learned"], "tokens": tokens, "shards": args.shards,
        "one_process": {"seconds": round(one_seconds, 2), "tokens_per_second": round(tokens / one_seconds),
                        "cores_busy": round(one_cores, 2)},
        "ray": {"seconds": round(ray_seconds, 2), "tokens_per_second": round(tokens / ray_seconds),
                "ratio": round(one_seconds / ray_seconds, 2),
                "start_up_and_merge_seconds": round(ray_seconds - shard_seconds, 2),
                "ratio_without_overhead": round(one_seconds / shard_seconds, 2)},
        "by_hand": {"seconds": round(by_hand_seconds, 2), "tokens_per_second": round(tokens / by_hand_seconds),
                    "ratio": round(one_seconds / by_hand_seconds, 2), "merge_seconds": round(merge_seconds, 2),
                    "merge_patterns_per_second": round(patterns / merge_seconds)},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
