"""``ingestd kato demo``: start the embedded server, learn a few paragraphs over HTTP, show what was learned."""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from ingestd.engine.rules import chunk_name
from ingestd.engine.serve import ServerProcess
from ingestd.source import Sample, Source, SourceSpec
from ingestd.tokenize import load_tokenizer


def _paragraphs(corpus: Path, limit: int) -> list[str]:
    """The first ``limit`` paragraphs, read as ``ingestd run`` reads a .txt file."""
    events = Source(SourceSpec(str(corpus))).events(max_samples=limit)
    return [event.text for event in events if isinstance(event, Sample)]


def run_demo(corpus: Path, paragraphs: int, chunk_size: int, console: Console) -> None:
    texts = _paragraphs(corpus, paragraphs)
    tokens = load_tokenizer().tokenize_batch(texts)
    with tempfile.TemporaryDirectory(prefix="ingestd-demo-") as data_dir, \
            ServerProcess(data_dir, "--durability", "normal") as server:  # fmt: skip
        url = server.url
        with httpx.Client(base_url=url, timeout=30.0) as client:
            console.print(f"embedded KATO 3.10.1-compatible server on {url}")
            started = time.perf_counter()
            requests = 0
            # node0 learns every chunk_size tokens through KATO's auto-learn: one call per paragraph.
            node0 = client.post("/sessions", json={"node_id": "demo-node0", "config": {
                "process_predictions": False, "max_pattern_length": chunk_size, "stm_mode": "CLEAR"}}).json()
            node1 = client.post("/sessions", json={"node_id": "demo-node1", "config": {
                "process_predictions": False}}).json()  # fmt: skip
            learned: collections.Counter[str] = collections.Counter()
            first_chunk: dict[str, list[str]] = {}
            node1_names = 0
            for sample in tokens:
                answer = client.post(f"/sessions/{node0['session_id']}/observe-sequence", json={
                    "observations": [{"strings": [token]} for token in sample], "learn_at_end": True}).json()  # fmt: skip
                requests += 1
                names = [name for name in answer["auto_learned_patterns"] if name]
                for start, name in zip(range(0, len(sample), chunk_size), names, strict=False):
                    learned[name] += 1
                    first_chunk.setdefault(name, sample[start : start + chunk_size])
                for start in range(0, len(names), chunk_size):
                    group = names[start : start + chunk_size]
                    if len(group) < 2:
                        continue
                    answer = client.post(f"/sessions/{node1['session_id']}/observe-sequence", json={
                        "observations": [{"strings": [name]} for name in group], "learn_at_end": True}).json()  # fmt: skip
                    requests += 1
                    assert answer["final_learned_pattern"] == chunk_name(group)
                    node1_names += 1
            elapsed = time.perf_counter() - started

            table = Table(title=f"Most frequent node0 patterns ({chunk_size} GPT-2 tokens each)")
            table.add_column("pattern")
            table.add_column("frequency (server)", justify="right")
            table.add_column("text")
            for name, _ in learned.most_common(8):
                stored = client.get(f"/pattern/{name.replace('|', '%7C')}", params={"node_id": "demo-node0"})
                pattern = stored.json()["pattern"]["pattern"]
                text = "".join(first_chunk[name]).replace("Ġ", " ").replace("Ċ", "⏎")
                table.add_row(name[:17] + "…", str(pattern["frequency"]), text)
            console.print(table)
            console.print(
                f"{len(texts)} paragraphs, {sum(map(len, tokens))} tokens → {sum(learned.values())} node0 learns "
                f"({len(learned)} distinct), {node1_names} node1 learns; {requests} HTTP requests in {elapsed:.2f} s"
            )
