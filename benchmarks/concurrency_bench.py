"""How ingestd's concurrency settings fare against a server that is the wall, as a real KATO is (issue 17).

    python benchmarks/concurrency_bench.py [--docs 120] [--lines 20] [--scale 0.1] [--workers 1,2,4,8,16,32,64]
                                           [--server-workers 1,2] [--limit-concurrency 100] [--rounds 3]
                                           [--long-doc-lines 1500] [--json out.json]

The server is ``ingestd kato serve --workers S`` standing in for a KATO 3.10.1 of S uvicorn workers: it spends
``--scale`` times a real KATO's CPU on each request (4 ms, and 3 ms per observed symbol:
``--cpu-per-request-ms``, ``--cpu-per-symbol-ms``) and answers 503 beyond ``--limit-concurrency`` per process (KATO's
image: 100). Corpus: ``--docs`` documents of ``--lines`` consecutive lines of tinyshakespeare; hierarchy: chunk sizes
8,8,8,8 with metadata at levels 2 and 3 (the notebooks'). Every run learns the same documents into nodes of its own,
through KATO's calls (``--no-bulk-load``: a KATO has no bulk loads).

For each server size: a run with ingestd's defaults, and one per ``--workers`` value; samples/s, the 503s the
server answered (retries), and each server process's share of the server's CPU. Each setting runs ``--rounds``
times, alternating in a new order each round, and its median is reported. Then, with several server processes,
one long document (one sample, its level 0 in many batches) with ``--parallel-batches`` 1 and 4 (the default).
Figures are ratios within this one run: absolute speed differs 2-3x between machines, and on a 2-core machine
the server's processes and the client share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from ingestd import Hierarchy, run
from ingestd.engine.serve import ServerProcess

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tinyshakespeare.txt"
CHUNKS = [8, 8, 8, 8]
METADATA_LEVELS = {2, 3}


def server_cpu(pid: int) -> list[float]:
    """CPU seconds of each process serving: the server's spawned workers, or the server itself if it has none."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(stat: str) -> float:
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in command:
            children.append(cpu(stat))
    return children or [cpu(Path(f"/proc/{pid}/stat").read_text())]


def learn(corpus: Path, url: str, prefix: str, scratch: Path, server_pid: int, **options: Any) -> dict[str, Any]:
    hierarchy = Hierarchy.from_chunk_sizes(CHUNKS, METADATA_LEVELS, node_id_template=f"{prefix}-node{{level}}")
    before = server_cpu(server_pid)
    # KATO's calls, as to a real KATO (a served engine would otherwise be sent bulk loads, which a KATO has not)
    summary = run(str(corpus), hierarchy, kato_url=url, run_dir=scratch / f"run-{prefix}", source_label="bench",
                  progress=False, bulk_load=False, **options).as_dict()  # fmt: skip
    used = [after - start for after, start in zip(server_cpu(server_pid), before, strict=True)]
    assert summary["samples"]["failed"] == 0, summary
    return {"samples_per_second": round(summary["samples"]["learned"] / summary["wall_seconds"], 2),
            "seconds": summary["wall_seconds"], "retries": summary["recovery"]["retries"],
            "outages": summary["recovery"]["server_outages"],
            "server_cpu_shares": [round(part / sum(used), 2) if sum(used) else None for part in used]}  # fmt: skip


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median speed, with the range of speeds over the rounds."""
    ordered = sorted(runs, key=lambda found: found["samples_per_second"])
    return {**ordered[len(ordered) // 2], "range": [ordered[0]["samples_per_second"], ordered[-1]["samples_per_second"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=120)
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--scale", type=float, default=0.1, help="of a real KATO's CPU per request and per symbol")
    parser.add_argument("--workers", default="1,2,4,8,16,32,64")
    parser.add_argument("--server-workers", default="1,2")
    parser.add_argument("--limit-concurrency", type=int, default=100)
    parser.add_argument("--long-doc-lines", type=int, default=1500, help="lines of the one long document (0: skip it)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting, alternating (the median is reported)")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    worker_counts = [int(count) for count in arguments.workers.split(",")]
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    results: dict[str, Any] = {"scale": arguments.scale, "limit_concurrency": arguments.limit_concurrency, "servers": {}}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        corpus = scratch / "docs.jsonl"
        corpus.write_text("".join(json.dumps({"text": "\n".join(lines[start : start + arguments.lines])}) + "\n"
                                  for start in range(0, arguments.docs * arguments.lines, arguments.lines)))  # fmt: skip
        for size in (int(count) for count in arguments.server_workers.split(",")):
            costs = ["--cpu-per-request-ms", str(4 * arguments.scale), "--cpu-per-symbol-ms", str(3 * arguments.scale)]
            server = ServerProcess(str(scratch / f"kb{size}"), "--workers", str(size), "--limit-concurrency",
                                   str(arguments.limit_concurrency), *costs)  # fmt: skip
            with server:
                time.sleep(1.0)  # every process up
                configs: dict[str, dict[str, Any]] = {"default": {}}
                configs |= {f"workers={count}": {"workers": count} for count in worker_counts}
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
                order = random.Random(size)
                for round_ in range(arguments.rounds):  # alternating, in a new order each round: drift and the
                    names = list(configs)  # server's work left over from the run before hit every setting alike
                    order.shuffle(names)
                    for name in names:
                        options = configs[name]
                        time.sleep(0.5)
                        runs[name].append(learn(corpus, server.url, f"s{size}-{name.replace('=', '')}-r{round_}",
                                                scratch, server.process.pid, **options))  # fmt: skip
                        print(f"server x{size}  {name:<11} round {round_}: {runs[name][-1]}", flush=True)
                rows: dict[str, Any] = {name: _median(found) for name, found in runs.items()}
                fixed = {name: row["samples_per_second"] for name, row in rows.items() if name != "default"}
                rows["default_vs_best_fixed"] = round(rows["default"]["samples_per_second"] / max(fixed.values()), 3)
                rows["best_fixed"] = max(fixed, key=fixed.__getitem__)
                if "workers=1" in fixed:
                    rows["slowest_vs_workers_1"] = round(min(fixed.values()) / fixed["workers=1"], 3)
                print(f"server x{size}  median samples/s: " + ", ".join(f"{name} {row['samples_per_second']}"
                                                                       for name, row in rows.items() if isinstance(row, dict)))  # fmt: skip
                print(f"server x{size}  default / best fixed ({rows['best_fixed']}): {rows['default_vs_best_fixed']}; "
                      f"slowest / --workers 1: {rows.get('slowest_vs_workers_1')}", flush=True)  # fmt: skip
                if arguments.long_doc_lines and size > 1:
                    long_doc = scratch / "long.jsonl"
                    long_doc.write_text(json.dumps({"text": "\n".join(lines[: arguments.long_doc_lines])}) + "\n")
                    long_runs: dict[int, list[dict[str, Any]]] = {1: [], 4: []}
                    for round_ in range(arguments.rounds):
                        for parallel, found in long_runs.items():
                            found.append(learn(long_doc, server.url, f"s{size}-long{parallel}-r{round_}", scratch,
                                               server.process.pid, workers=1, parallel_batches=parallel))  # fmt: skip
                            print(f"server x{size}  long document, --parallel-batches {parallel}, round {round_}: "
                                  f"{found[-1]}", flush=True)  # fmt: skip
                    for parallel, found in long_runs.items():
                        rows[f"long_doc_parallel_batches={parallel}"] = _median(found)
                    one, four = (rows[f"long_doc_parallel_batches={parallel}"]["seconds"] for parallel in (1, 4))
                    rows["long_doc_speedup"] = round(one / four, 2)
                    print(f"server x{size}  long document: --parallel-batches 4 is {rows['long_doc_speedup']}x 1", flush=True)
            results["servers"][str(size)] = rows
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
