"""ingestd vs a notebook-style client, against the same embedded KATO server over HTTP; plus ingestd in-process.

    python benchmarks/pipeline_bench.py [--docs 60] [--lines 40] [--workers 8] [--rounds 3] [--server-workers 1]
                                        [--json out.json]

Corpus: documents of ``--lines`` consecutive lines of tinyshakespeare (about
10 GPT-2 tokens a line, so 40 lines ~ the notebooks' 500-token samples).
Hierarchy: chunk sizes 8,8,8,8 with metadata at levels 2 and 3 (the v2
notebook's). The notebook-style client is the seeds' way: sequential, and per
chunk a ``clear-stm`` then an ``observe-sequence`` with ``learn_at_end``.
ingestd runs over HTTP twice: as it does by default against ``ingestd kato serve``
(bulk loads, ``POST /ingestd/load``), and with ``--no-bulk-load`` (KATO's calls, as
to a real KATO: sessions and ``observe-sequence``).
All runs must end with the same knowledge base (checked), on separate node
ids. Figures are ratios within this one run; the machine is noisy, and an
ingestd run lasts a second or two where the notebook-style client's lasts half a
minute, so each ingestd client runs ``--rounds`` times (alternating) and its
median is reported, with the range.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ingestd import Hierarchy, run
from ingestd.engine.rules import kb_id
from ingestd.engine.serve import ServerProcess
from ingestd.tokenize import load_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tinyshakespeare.txt"
CHUNKS = [8, 8, 8, 8]
METADATA_LEVELS = {2, 3}


def write_corpus(path: Path, docs: int, lines: int) -> list[str]:
    all_lines = CORPUS.read_text(encoding="utf-8").split("\n")
    texts = ["\n".join(all_lines[start : start + lines]) for start in range(0, docs * lines, lines)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return texts


def notebook_client(url: str, texts: list[str], prefix: str) -> dict[str, Any]:
    """The seeds' way: one sample at a time, clear-stm + observe-sequence for every chunk."""
    tokenizer = load_tokenizer()
    requests = 0
    started = time.perf_counter()
    tokens_total = 0
    with httpx.Client(base_url=url, timeout=60.0) as client:
        sessions = []
        for level in range(len(CHUNKS)):
            body = {"node_id": f"{prefix}-node{level}", "config": {"process_predictions": False}}
            sessions.append(client.post("/sessions", json=body).json()["session_id"])
            requests += 1
        for index, text in enumerate(texts):
            symbols = tokenizer.tokenize(text)
            tokens_total += len(symbols)
            for level, size in enumerate(CHUNKS):
                names = []
                for start in range(0, len(symbols), size):
                    chunk = symbols[start : start + size]
                    if len(chunk) < 2:
                        continue
                    observations: list[dict[str, Any]] = [{"strings": [symbol]} for symbol in chunk]
                    if level in METADATA_LEVELS:
                        observations[0]["metadata"] = {"source": "bench", "sample_index": index}
                    client.post(f"/sessions/{sessions[level]}/clear-stm").raise_for_status()
                    answer = client.post(f"/sessions/{sessions[level]}/observe-sequence",
                                         json={"observations": observations, "learn_at_end": True})  # fmt: skip
                    requests += 2
                    names.append(answer.json()["final_learned_pattern"])
                symbols = names
        for session in sessions:
            client.delete(f"/sessions/{session}")
            requests += 1
    elapsed = time.perf_counter() - started
    return {"samples": len(texts), "tokens": tokens_total, "requests": requests, "seconds": elapsed}


def ingestd_run(corpus: Path, prefix: str, workers: int, **options: Any) -> dict[str, Any]:
    # A run directory of its own in the scratch directory: a new run, not a resume of an earlier benchmark.
    options.setdefault("run_dir", corpus.parent / f"run-{prefix}-{'http' if 'kato_url' in options else 'inproc'}"
                                                 f"{'' if options.get('bulk_load', True) else '-calls'}")
    hierarchy = Hierarchy.from_chunk_sizes(CHUNKS, METADATA_LEVELS, node_id_template=f"{prefix}-node{{level}}")
    # The same entry point as ``ingestd run`` (uvloop where installed).
    summary = run(str(corpus), hierarchy, workers=workers, source_label="bench", **options).as_dict()
    return {"samples": summary["samples"]["learned"], "tokens": summary["tokens"], "requests": summary["requests"],
            "seconds": summary["wall_seconds"]}  # fmt: skip


def kb_state(database: Path, prefix: str) -> list[dict[str, tuple[int, str]]]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return [
            {name: (frequency, metadata) for name, frequency, metadata in connection.execute(
                "SELECT name, frequency, metadata FROM patterns WHERE kb_id = ?", (kb_id(f"{prefix}-node{level}"),))}
            for level in range(len(CHUNKS))
        ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each ingestd client (the median is reported)")
    parser.add_argument("--server-workers", type=int, default=1, help="processes of the server (ingestd kato serve --workers)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "docs.jsonl"
        texts = write_corpus(corpus, args.docs, args.lines)
        rounds: dict[str, list[dict[str, Any]]] = {"ingestd (HTTP)": [], "ingestd (HTTP, KATO calls)": [],
                                                    "ingestd (in-process)": []}  # fmt: skip
        with ServerProcess(f"{scratch}/server", "--workers", str(args.server_workers)) as server:
            url = server.url
            notebook = notebook_client(url, texts, "nb")
            for number in range(args.rounds):
                rounds["ingestd (HTTP)"].append(ingestd_run(corpus, f"ing{number}", args.workers, kato_url=url))
                rounds["ingestd (HTTP, KATO calls)"].append(
                    ingestd_run(corpus, f"calls{number}", args.workers, kato_url=url, bulk_load=False))
                rounds["ingestd (in-process)"].append(
                    ingestd_run(corpus, f"ing{number}", args.workers, data_dir=Path(scratch) / "inproc"))
        server_db = Path(scratch) / "server" / "kato.sqlite3"
        expected = kb_state(server_db, "nb")
        same = all(kb_state(server_db, f"ing{number}") == kb_state(server_db, f"calls{number}") == expected
                   == kb_state(Path(scratch) / "inproc" / "kato.sqlite3", f"ing{number}")
                   for number in range(args.rounds))  # fmt: skip

    base_rate = notebook["samples"] / notebook["seconds"]
    print(f"{args.docs} documents of {args.lines} lines, {notebook['tokens']} GPT-2 tokens; chunks {CHUNKS}, metadata at "
          f"levels {sorted(METADATA_LEVELS)}; {args.workers} ingestd workers, {args.server_workers} server processes; "
          f"{args.rounds} rounds of each ingestd "
          f"client; identical knowledge bases: {same}")  # fmt: skip
    print(f"{'client':<28} {'samples/s':>10} {'tokens/s':>10} {'requests/sample':>16} {'speed-up':>9} {'range':>14}")
    rows = []
    for name, runs in {"notebook-style (HTTP)": [notebook], **rounds}.items():
        rates = sorted(figures["samples"] / figures["seconds"] for figures in runs)
        median = statistics.median(rates)
        figures = runs[0]
        row = {"client": name, "samples_per_second": round(median, 2),
               "tokens_per_second": round(figures["tokens"] / figures["samples"] * median, 1),
               "requests_per_sample": round(figures["requests"] / figures["samples"], 2),
               "speedup": round(median / base_rate, 1),
               "speedup_range": [round(rates[0] / base_rate, 1), round(rates[-1] / base_rate, 1)]}  # fmt: skip
        rows.append(row)
        spread = f"{row['speedup_range'][0]:.1f}-{row['speedup_range'][1]:.1f}x" if len(runs) > 1 else ""
        print(f"{name:<28} {row['samples_per_second']:>10.2f} {row['tokens_per_second']:>10.0f} "
              f"{row['requests_per_sample']:>16.2f} {row['speedup']:>8.1f}x {spread:>14}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"identical_knowledge_bases": same, "results": rows}, indent=2))
    if not same:
        raise SystemExit("the three runs did not produce the same knowledge base")


if __name__ == "__main__":
    main()
