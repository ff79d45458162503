"""Bulk loads to a served engine (``POST /ingestd/load/{run_key}``): what ``ingestd run --kato-url`` sends to
``ingestd kato serve`` unless told ``--no-bulk-load``. The endpoint on its own (refusals, resends), then whole
runs through it: the same knowledge base as in-process and as KATO's calls, twice, two at once, a killed
client resumed with KATO's calls, a killed server, lost answers, and refused loads.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingestd.engine.rules import chunk_name

from .conftest import CORPUS, EngineServer, paragraphs
from .faultproxy import FaultProxy
from .golden import kb_dump, wait_for_samples
from .test_exactly_once import doubled, ingestd, ok, start
from .test_server_workers import _chunks_ahead

LEVELS = ["--chunk-sizes", "4,4,4", "--metadata-levels", "1,2"]
NODES = ["node0", "node1", "node2"]


def _level(node_id: str, chunks: list[list[str]], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"node_id": node_id, "chunks": chunks, "names": [chunk_name(chunk) for chunk in chunks], "metadata": metadata}


def _counts(client: httpx.Client, *node_ids: str) -> dict[str, int]:
    answer = client.post("/ingestd/nodes/counts", json={"node_ids": list(node_ids)})
    assert answer.status_code == 200, answer.text
    counts: dict[str, int] = answer.json()["patterns"]
    return counts


def _frequency(client: httpx.Client, node_id: str, chunk: list[str]) -> int:
    answer = client.get(f"/pattern/{chunk_name(chunk).replace('|', '%7C')}", params={"node_id": node_id})
    pattern = answer.json()["pattern"]
    return int(pattern["pattern"]["frequency"]) if pattern["status"] == "okay" else 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 paragraphs of tinyshakespeare: long enough to stop a run in the middle."""
    return paragraphs(tmp_path_factory.mktemp("corpus") / "shakespeare.txt", 600)


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The knowledge base of one clean in-process run."""
    data = tmp_path_factory.mktemp("reference")
    assert ok(str(corpus), *LEVELS, "--data", str(data))["samples"]["learned"] > 500
    return kb_dump(data / "kato.sqlite3", NODES)


def test_a_load_is_stored_once_however_often_it_is_sent(fresh_server: EngineServer) -> None:
    with httpx.Client(base_url=fresh_server.url, timeout=30) as client:
        assert client.get("/ingestd").json()["extensions"]["load"] == 1
        first = [["a", "b"], ["c", "d"], ["a", "b"]]
        body = {"samples": [{"index": 0, "levels": [_level("ld0", first), _level("ld1", [[chunk_name(c) for c in first[:2]]],
                                                                                   {"book": "b1", "n": 5})]},
                            {"index": 1, "levels": [_level("ld0", [["a", "b"]]), _level("ld1", [])]}]}  # fmt: skip
        answer = client.post("/ingestd/load/run-a", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"held": [[0, 0], [0, 0]]}
        assert _frequency(client, "ld0", ["a", "b"]) == 3 and _frequency(client, "ld0", ["c", "d"]) == 1
        upper = client.get(f"/pattern/{body['samples'][0]['levels'][1]['names'][0].replace('|', '%7C')}",
                           params={"node_id": "ld1"}).json()["pattern"]["pattern"]  # fmt: skip
        assert upper["metadata"] == {"book": ["b1"], "n": ["5"]} and upper["frequency"] == 1  # KATO's str() of values

        # Sent again (a lost answer), and with a level grown by a chunk (a resume in another batch size):
        # only what the run ledger lacks is stored.
        assert client.post("/ingestd/load/run-a", json=body).json() == {"held": [[3, 1], [1, 0]]}
        body["samples"][1]["levels"][0] = _level("ld0", [["a", "b"], ["e", "f"]])
        assert client.post("/ingestd/load/run-a", json=body).json() == {"held": [[3, 1], [1, 0]]}
        assert _frequency(client, "ld0", ["a", "b"]) == 3 and _frequency(client, "ld0", ["e", "f"]) == 1
        # Another run's load of the same sample is learned again (as KATO would learn it again).
        assert client.post("/ingestd/load/run-b", json=body).json() == {"held": [[0, 0], [0, 0]]}
        assert _frequency(client, "ld0", ["a", "b"]) == 6


@pytest.mark.parametrize(("body", "status", "said"), [
    ({"samples": [{"index": 0, "levels": [{**_level("bad0", [["a", "b"]]), "names": ["PTRN|" + "0" * 40]}]}]},
     422, "samples[1].levels[0].names[0] is not the name KATO gives"),
    ({"samples": [{"index": 0, "levels": [_level("bad0", [["a"]])]}]}, 422, "a pattern needs at least 2 symbols"),
    ({"samples": [{"index": 0, "levels": [{**_level("bad0", [["a", "b"]]), "names": []}]}]}, 422, "1 chunks but 0 names"),
    ({"samples": [{"index": 3, "levels": [_level("bad0", [["a", "b"]])]}] * 2}, 422, "sample 3 is given twice"),
    ({"samples": [{"index": 0, "levels": [_level("bad.0", [["a", "b"]]), _level("bad_0", [["c", "d"]])]}]}, 422,
     "node 'bad_0' is the knowledge base of node 'bad.0'"),  # KATO's kb id: one ledger record, so refused
    ({"samples": [{"index": 0, "levels": [_level("bad0", [["a", "b"]], {"deep": "DEEP"})]}]}, 400, ""),  # see below
    ({"samples": [{"index": 0, "levels": [_level("bad0", [["a", 7]])]}]}, 422, "chunks"),
    ({"samples": [{"index": -1, "levels": [_level("bad0", [["a", "b"]])]}]}, 422, "index"),
    ({"samples": [{"index": 0, "levels": [{**_level("bad0", [["a", "b"]]), "first": 2**63 - 1}]}]}, 422,
     "its chunks end past position"),
    ({"samples": [{"index": 0, "levels": [{**_level("bad0", [["a", "b"]]), "colour": "red"}]}]}, 422, "colour"),
    ({"samples": []}, 422, "samples"),
    ({"nothing": 1}, 422, "samples"),
])  # fmt: skip
def test_a_load_that_cannot_be_stored_is_refused_whole_and_stores_nothing(engine_server: EngineServer, body: Any,
                                                                         status: int, said: str) -> None:  # fmt: skip
    with httpx.Client(base_url=engine_server.url, timeout=30) as client:
        good = {"index": 9, "levels": [_level("bad0", [["x", "y"]])]}
        content = json.dumps({**body, "samples": [good, *body["samples"]]} if body.get("samples") else body)
        # metadata nested past what Python's parser takes (observe's metadata gets the same 400; orjson reads it)
        content = content.replace('"DEEP"', "[" * 1200 + "1" + "]" * 1200)
        answer = client.post("/ingestd/load/refusals", content=content, headers={"content-type": "application/json"})
        assert answer.status_code == status, answer.text
        assert said in answer.text
        assert _counts(client, "bad0", "bad_0") == {"bad0": 0, "bad_0": 0}  # not even the good sample of the load
        assert client.post("/ingestd/load/bad run", json={"samples": [good]}).status_code == 400


def test_runs_over_http_load_in_bulk_and_store_what_in_process_and_kato_calls_store(
        corpus: Path, reference: list[dict[str, Any]], tmp_path: Path) -> None:  # fmt: skip
    """The default over HTTP is bulk loads (few requests); --no-bulk-load sends KATO's calls; the same KB. The same
    command again learns nothing more; two runs of other names at once learn it twice."""
    for bulk in ("--bulk-load", "--no-bulk-load"):
        server = EngineServer(tmp_path / f"kb{bulk}").start()
        try:
            command = [str(corpus), *LEVELS, "--kato", server.url, "--run-dir", str(tmp_path / f"run{bulk}"), bulk]
            summary = ok(*command)
            learned = summary["samples"]["learned"]
            if bulk == "--bulk-load":
                assert summary["requests"] < learned / 10, summary["requests"]  # loads of many samples
            else:
                assert summary["requests"] > 2 * learned  # a call per level and sample at least
            again = ok(*command)
            assert again["samples"]["learned"] == 0 and again["samples"]["skipped"] == learned
        finally:
            server.stop()
        assert kb_dump(tmp_path / f"kb{bulk}" / "kato.sqlite3", NODES) == reference

    server = EngineServer(tmp_path / "kb-two").start()
    try:
        runs = [start(str(corpus), *LEVELS, "--kato", server.url, "--run-id", name, "--run-dir", str(tmp_path / name))
                for name in ("one", "two")]  # fmt: skip
        assert [process.wait(timeout=300) for process in runs] == [0, 0]
    finally:
        server.stop()
    assert kb_dump(tmp_path / "kb-two" / "kato.sqlite3", NODES) == doubled(reference)


def test_a_killed_run_resumed_with_kato_calls_then_in_process_stores_every_chunk_once(
        corpus: Path, reference: list[dict[str, Any]], tmp_path: Path) -> None:  # fmt: skip
    _killed_and_resumed([str(corpus), *LEVELS, "--run-dir", str(tmp_path / "run")], EngineServer(tmp_path / "kb"),
                        lambda process: wait_for_samples(process, tmp_path / "run", 100), reference,
                        "--batch-chunks", "3", "--max-samples", "400")  # fmt: skip


def _killed_and_resumed(base: list[str], server: EngineServer, until: Callable[[subprocess.Popen[str]], None],
                        reference: list[dict[str, Any]], *options: str, drop_every: int = 0) -> None:  # fmt: skip
    """A run with bulk loads (every ``drop_every``-th dropped unsent, and resent: later ones land first), killed
    once ``until`` returns; resumed over HTTP with KATO's calls and ``options``, then in-process on the server's
    store: the knowledge base is ``reference``."""
    server.start()
    try:
        with FaultProxy(server.port) as proxy:
            if drop_every:
                proxy.drop_every(drop_every, only_paths="/ingestd/load")
            process = start(*base, "--kato", proxy.url)
            until(process)
            process.kill()
            process.wait()
        middle = ok(*base, "--kato", server.url, "--no-bulk-load", *options)
        assert middle["recovery"]["possible_duplicates"] == 0
    finally:
        server.stop()
    rest = ok(*base, "--data", str(server.data_dir))
    assert rest["samples"]["failed"] == 0
    assert kb_dump(server.data_dir / "kato.sqlite3", NODES) == reference


def test_a_server_killed_under_loads_and_restarted_loses_and_doubles_nothing(
        corpus: Path, reference: list[dict[str, Any]], tmp_path: Path) -> None:  # fmt: skip
    """kill -9 of the server while loads are in flight (some committed, their answers lost), restarted on the
    same store: the run waits for it, resends, and the ledger stores what was not stored."""
    server = EngineServer(tmp_path / "kb").start()
    process = start(str(corpus), *LEVELS, "--kato", server.url, "--run-dir", str(tmp_path / "run"), "--workers", "4")
    try:
        wait_for_samples(process, tmp_path / "run", 50)
        server.kill()
        time.sleep(1.0)
        server.start()
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            process.kill()
        server.stop()
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == reference


def test_lost_answers_are_resent_and_applied_once(corpus: Path, reference: list[dict[str, Any]], tmp_path: Path) -> None:
    server = EngineServer(tmp_path / "kb").start()
    try:
        with FaultProxy(server.port) as proxy:
            proxy.drop_response_every(2, only_paths="/ingestd/load")  # stored, then the connection dropped
            summary = ok(str(corpus), *LEVELS, "--kato", proxy.url, "--run-dir", str(tmp_path / "run"))
            assert proxy.injected["drop_response_every"] > 0
    finally:
        server.stop()
    assert summary["recovery"]["retries"]["ambiguous"] > 0, summary["recovery"]
    assert sum(summary["replayed_per_level"]) > 0  # what the dropped answers had stored was found stored
    assert summary["recovery"]["possible_duplicates"] == 0
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == reference


def test_refused_loads_fail_only_their_samples_which_a_retry_learns(
        corpus: Path, reference: list[dict[str, Any]], tmp_path: Path) -> None:  # fmt: skip
    """A load refused with a 4xx is sent again one sample at a time; the samples still refused fail alone
    (recorded, exit 7), the others are learned, and --retry-failed learns the failed ones."""
    server = EngineServer(tmp_path / "kb").start()
    base = [str(corpus), *LEVELS, "--run-dir", str(tmp_path / "run")]
    try:
        with FaultProxy(server.port) as proxy:
            proxy.unavailable_burst(3, status=422, only_paths="/ingestd/load")  # a load, then its first 2 samples
            failed = ok(*base, "--kato", proxy.url, "--workers", "1", expect=7)  # (one load at a time)
        assert failed["samples"]["failed"] == 2
        assert len((tmp_path / "run" / "failed.jsonl").read_text().splitlines()) == 2
        retried = ok(*base, "--kato", server.url, "--retry-failed")
        assert retried["samples"]["learned"] == 2 and retried["samples"]["failed"] == 0
    finally:
        server.stop()
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == reference


def test_a_server_that_stops_taking_loads_stops_the_run_and_fails_no_sample(
        corpus: Path, reference: list[dict[str, Any]], tmp_path: Path) -> None:  # fmt: skip
    """Another server at the address, without bulk loads (404): the run stops (exit 6), progress kept, no sample
    recorded as failed; the same command against a server that takes them finishes the run exactly."""
    server = EngineServer(tmp_path / "kb").start()
    base = [str(corpus), *LEVELS, "--run-dir", str(tmp_path / "run")]
    try:
        with FaultProxy(server.port) as proxy:
            proxy.unavailable_burst(10**9, status=404, only_paths="/ingestd/load")
            result, summary = ingestd(*base, "--kato", proxy.url)
        assert result.returncode == 6 and "no longer takes bulk loads" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert summary is not None and summary["samples"]["failed"] == 0
        assert ok(*base, "--kato", server.url)["samples"]["failed"] == 0
    finally:
        server.stop()
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == reference


@pytest.fixture(scope="module")
def books(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Four documents of 60,000 characters (about 15k tokens each: pieces of a load), and their clean KB."""
    folder = tmp_path_factory.mktemp("books")
    text = CORPUS.read_text(encoding="utf-8")
    path = folder / "books.jsonl"
    path.write_text("".join(json.dumps({"text": text[i * 60_000 : (i + 1) * 60_000]}) + "\n" for i in range(4)))
    ok(str(path), *LEVELS, "--data", str(folder / "reference"))
    return path, kb_dump(folder / "reference" / "kato.sqlite3", NODES)


def test_long_documents_go_in_pieces_and_resume_exactly_after_a_kill_with_pieces_out_of_order(
        books: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:  # fmt: skip
    """A document longer than a load is sent in pieces (ranges of a level's chunks), several at once; killed while
    pieces stand stored out of order, resumed with KATO's calls, then in-process: every chunk stored once."""
    path, reference = books
    server = EngineServer(tmp_path / "clean").start()
    try:
        whole = ok(str(path), *LEVELS, "--kato", server.url, "--run-dir", str(tmp_path / "clean-run"))
    finally:
        server.stop()
    assert whole["samples"]["learned"] == 4 and whole["requests"] > 4 * 3  # pieces: more requests than samples
    assert kb_dump(tmp_path / "clean" / "kato.sqlite3", NODES) == reference

    def pieces_out_of_order(process: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 120
        while not _chunks_ahead(tmp_path / "kb" / "kato.sqlite3"):  # a later piece stored before an earlier one
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.002)

    _killed_and_resumed([str(path), *LEVELS, "--run-dir", str(tmp_path / "run")],
                        EngineServer(tmp_path / "kb", extra_args=("--workers", "2")), pieces_out_of_order, reference,
                        "--batch-chunks", "5", "--max-samples", "2", drop_every=3)  # fmt: skip


def test_pieces_of_a_level_landing_out_of_order_are_joined_in_the_ledger(fresh_server: EngineServer) -> None:
    chunks = [["p", "q"], ["r", "s"], ["t", "u"], ["v", "w"], ["x", "y"]]

    def piece(first: int, end: int) -> dict[str, Any]:
        return {"samples": [{"index": 4, "levels": [{**_level("pc0", chunks[first:end]), "first": first}]}]}

    with httpx.Client(base_url=fresh_server.url, timeout=30) as client:
        assert client.post("/ingestd/load/pieces", json=piece(3, 5)).json() == {"held": [[0]]}
        status = client.post("/ingestd/ledger/pieces", json={"node_ids": ["pc0"], "samples": [4]}).json()
        assert status["samples"]["4"] == {"pc0": 0} and status["ahead"]["4"] == {"pc0": [[3, 5]]}
        assert client.post("/ingestd/load/pieces", json=piece(2, 4)).json() == {"held": [[1]]}  # chunk 3 stored
        assert client.post("/ingestd/load/pieces", json=piece(0, 2)).json() == {"held": [[0]]}
        status = client.post("/ingestd/ledger/pieces", json={"node_ids": ["pc0"], "samples": [4]}).json()
        assert status["samples"]["4"] == {"pc0": 5} and status["ahead"] == {}
        assert client.post("/ingestd/load/pieces", json=piece(0, 5)).json() == {"held": [[5]]}  # all there: a replay
        assert [_frequency(client, "pc0", chunk) for chunk in chunks] == [1] * 5
