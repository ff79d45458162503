"""The engine called directly from Python (no HTTP) gives KATO's results, the same as over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingestd.engine import Engine, EngineSettings, KatoError, Observation, SessionNotFound
from ingestd.tokenize import load_tokenizer

from .conftest import EngineServer
from .golden import RUNS, load_run


async def _learn_golden_run(engine: Engine, run_name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    run = load_run(run_name)
    tokens = load_tokenizer().tokenize_batch(run.texts)
    node_ids = [f"inproc-{run_name}-node{level}" for level in range(len(run.chunk_sizes))]
    sessions = [(await engine.create_session(n, {"process_predictions": False}))["session_id"] for n in node_ids]
    per_sample = []
    for index, sample_tokens in enumerate(tokens):
        names_per_level, symbols = [], sample_tokens
        for level, size in enumerate(run.chunk_sizes):
            names = []
            for start in range(0, len(symbols), size):
                chunk = symbols[start : start + size]
                if len(chunk) < 2:
                    continue
                observations = [Observation([symbol]) for symbol in chunk]
                if run.metadata_levels[level]:
                    observations[0].metadata = {"source": run.label, "sample_index": index}
                answer = await engine.observe_sequence(sessions[level], observations, learn_at_end=True)
                names.append(answer["final_learned_pattern"])
                if run.metadata_levels[level]:
                    await engine.clear_stm(sessions[level])
            names_per_level.append(names)
            symbols = names
        per_sample.append({"sample_index": index, "token_count": len(sample_tokens), "names": names_per_level})
    kb = {}
    for level, node_id in enumerate(node_ids):
        kb[f"node{level}"] = {
            pattern["name"]: {key: pattern[key] for key in ("frequency", "length", "metadata", "pattern_data", "emotives")}
            for pattern in await engine.patterns(node_id)
        }
    return per_sample, kb


@pytest.mark.parametrize("run_name", RUNS)
def test_golden_run_in_process(tmp_path: Path, run_name: str) -> None:
    async def main() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with Engine(EngineSettings(data_dir=tmp_path)) as engine:
            return await _learn_golden_run(engine, run_name)

    per_sample, kb = asyncio.run(main())
    expected = load_run(run_name).expected
    assert per_sample == expected["per_sample"]
    assert kb == expected["kb"]  # nothing extra: engine.patterns lists every stored pattern


def _strip_volatile(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: ("*" if k in ("unique_id", "session_id", "created_at", "expires_at") else _strip_volatile(v))
                for k, v in body.items()}  # fmt: skip
    if isinstance(body, list):
        return [_strip_volatile(item) for item in body]
    return body


def test_in_process_bodies_equal_http_bodies(tmp_path: Path, engine_server: EngineServer) -> None:
    script: list[tuple[str, dict[str, Any]]] = [
        ("observe", {"strings": ["b", "a"], "metadata": {"k": 1}, "emotives": {"e": 2}}),
        ("observe", {"strings": []}),
        ("observe-sequence", {"observations": [{"strings": ["x"]}, {"strings": ["y"], "unique_id": "mine"}],
                              "learn_at_end": True}),
        ("learn", {}),
        ("observe", {"strings": ["p"]}),
        ("learn", {}),
        ("stm", {}),
        ("clear-stm", {}),
    ]  # fmt: skip

    async def in_process() -> list[Any]:
        bodies = []
        async with Engine(EngineSettings(data_dir=tmp_path)) as engine:
            bodies.append(await engine.create_session("same-node", {"max_pattern_length": 3}))
            sid = bodies[0]["session_id"]
            for operation, body in script:
                try:
                    if operation == "observe":
                        bodies.append(await engine.observe(sid, Observation(**body)))
                    elif operation == "observe-sequence":
                        items = [Observation(**item) for item in body["observations"]]
                        bodies.append(await engine.observe_sequence(sid, items, learn_at_end=body["learn_at_end"]))
                    elif operation == "learn":
                        bodies.append(await engine.learn(sid))
                    elif operation == "stm":
                        bodies.append(await engine.get_stm(sid))
                    else:
                        bodies.append(await engine.clear_stm(sid))
                except KatoError as error:
                    bodies.append({"detail": error.detail})
            bodies.append(await engine.get_pattern("PTRN|b98534b32c1d7489d4ce1a48724aa65aeecbdba9", "same-node"))
            with pytest.raises(SessionNotFound):
                await engine.learn("session-unknown")
        return bodies

    expected = asyncio.run(in_process())
    with httpx.Client(base_url=engine_server.url) as client:
        node_id = f"same-node-{tmp_path.name}"
        created = client.post("/sessions", json={"node_id": node_id, "config": {"max_pattern_length": 3}}).json()
        actual = [created]
        sid = created["session_id"]
        for operation, body in script:
            method = "GET" if operation == "stm" else "POST"
            actual.append(client.request(method, f"/sessions/{sid}/{operation}", json=body or None).json())
        actual.append(client.get("/pattern/PTRN%7Cb98534b32c1d7489d4ce1a48724aa65aeecbdba9",
                                 params={"node_id": node_id}).json())  # fmt: skip

    def rename(body: Any) -> Any:
        return _strip_volatile(body) if not isinstance(body, dict) else _strip_volatile(
            {k: (v.replace(node_id, "same-node").replace(node_id.replace("-", "_"), "same_node")
                 if isinstance(v, str) else rename(v)) for k, v in body.items()})  # fmt: skip

    assert [rename(body) for body in actual] == [_strip_volatile(body) for body in expected]
