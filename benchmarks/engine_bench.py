"""Learns per second of the embedded engine: over HTTP and in-process, 1 and 8 concurrent clients.

    python benchmarks/engine_bench.py [--seconds 5] [--durability full|normal] [--json out.json]

Two call shapes, both with real GPT-2 chunks of tinyshakespeare (8 tokens each):
* one-chunk: one ``observe-sequence`` per chunk with ``learn_at_end`` (the notebook way);
* batched: one ``observe-sequence`` of 64 whole chunks on a session with
  ``max_pattern_length = 8, stm_mode = CLEAR`` (KATO's auto-learn; how ingestd batches node0).

The server runs as its own process (``ingestd kato serve``), so HTTP figures
include a real loopback round trip; on a 2-core machine the clients share the
CPU with the server. Compare figures of one run only: the machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ingestd.engine import Engine, EngineSettings, Observation
from ingestd.engine.serve import ServerProcess
from ingestd.tokenize import load_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tinyshakespeare.txt"
CHUNK = 8
BATCH = 64


def corpus_chunks(limit: int = 200_000) -> list[list[str]]:
    text = CORPUS.read_text(encoding="utf-8")
    tokens = [t for block in load_tokenizer().tokenize_batch(text.split("\n\n")) for t in block]
    return [tokens[i : i + CHUNK] for i in range(0, min(len(tokens), limit * CHUNK) - CHUNK + 1, CHUNK)]


def one_chunk_body(chunk: list[str]) -> dict[str, Any]:
    return {"observations": [{"strings": [token]} for token in chunk], "learn_at_end": True}


def batched_body(chunks: list[list[str]]) -> dict[str, Any]:
    return {"observations": [{"strings": [token]} for chunk in chunks for token in chunk], "learn_at_end": True}


async def http_clients(url: str, clients: int, batched: bool, seconds: float, chunks: list[list[str]]) -> float:
    config = {"process_predictions": False}
    if batched:
        config |= {"max_pattern_length": CHUNK, "stm_mode": "CLEAR"}
    learned = 0
    deadline = time.perf_counter() + seconds
    source = itertools.cycle(range(0, len(chunks) - BATCH, BATCH if batched else 1))

    async def client(index: int) -> None:
        nonlocal learned
        # One connection per client: uvicorn serves a connection on one worker.
        async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=httpx.Limits(max_connections=1)) as http:
            session = (await http.post("/sessions", json={"node_id": f"bench-{batched}", "config": config})).json()
            sid = session["session_id"]
            while time.perf_counter() < deadline:
                start = next(source)
                body = batched_body(chunks[start : start + BATCH]) if batched else one_chunk_body(chunks[start])
                answer = await http.post(f"/sessions/{sid}/observe-sequence", json=body)
                answer.raise_for_status()
                learned += BATCH if batched else 1
            await http.delete(f"/sessions/{sid}")

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return learned / (time.perf_counter() - started)


async def in_process(data_dir: Path, durability: str, clients: int, batched: bool, seconds: float,
                     chunks: list[list[str]]) -> float:  # fmt: skip
    config = {"process_predictions": False}
    if batched:
        config |= {"max_pattern_length": CHUNK, "stm_mode": "CLEAR"}
    learned = 0
    source = itertools.cycle(range(0, len(chunks) - BATCH, BATCH if batched else 1))
    async with Engine(EngineSettings(data_dir=data_dir, durability=durability)) as engine:  # type: ignore[arg-type]
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal learned
            sid = (await engine.create_session(f"bench-{batched}", config))["session_id"]
            while time.perf_counter() < deadline:
                start = next(source)
                selected = chunks[start : start + BATCH] if batched else [chunks[start]]
                observations = [Observation([token]) for chunk in selected for token in chunk]
                await engine.observe_sequence(sid, observations, learn_at_end=True)
                learned += len(selected)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return learned / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    chunks = corpus_chunks()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        with ServerProcess(f"{scratch}/http", "--durability", args.durability) as server:
            for batched in (False, True):
                for clients in (1, 8):
                    rate = asyncio.run(http_clients(server.url, clients, batched, args.seconds, chunks))
                    results.append({"path": "http", "shape": "batched-64" if batched else "one-chunk",
                                    "clients": clients, "learns_per_second": round(rate, 1)})  # fmt: skip
        for batched in (False, True):
            for clients in (1, 8):
                data_dir = Path(scratch) / f"inproc-{batched}-{clients}"
                rate = asyncio.run(in_process(data_dir, args.durability, clients, batched, args.seconds, chunks))
                results.append({"path": "in-process", "shape": "batched-64" if batched else "one-chunk",
                                "clients": clients, "learns_per_second": round(rate, 1)})  # fmt: skip

    base = results[0]["learns_per_second"]
    print(f"durability={args.durability}, {args.seconds:g} s per figure, chunk={CHUNK} tokens, batch={BATCH} chunks")
    print(f"{'path':<11} {'shape':<11} {'clients':>7} {'learns/s':>10} {'vs http one-chunk x1':>22}")
    for row in results:
        ratio = row["learns_per_second"] / base if base else float("nan")
        print(f"{row['path']:<11} {row['shape']:<11} {row['clients']:>7} {row['learns_per_second']:>10.1f} {ratio:>21.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"durability": args.durability, "results": results}, indent=2))


if __name__ == "__main__":
    main()
