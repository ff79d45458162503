"""`ingestd publish`: a knowledge base learned in-process, written into a KATO deployment's storage (a real Redis,
the real ClickHouse engine behind ClickHouse's HTTP interface), equals what KATO 3.10.1 stored while learning the
same runs, byte for byte in the canonical dump form; refuses what it must; survives kill -9; verifies."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ingestd import run
from ingestd.engine.rules import kb_id

from .conftest import CORPUS, GOLDEN
from .deployment import Storage
from .golden import RUNS, load_run

STORAGE = GOLDEN / "storage"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    storage = Storage(tmp_path_factory.mktemp("deployment"), password="r3dis-secret", clickhouse_user="kato",
                      clickhouse_password="ch-secret").start()  # fmt: skip
    yield storage
    storage.stop()


def _client(storage: Storage) -> redis.Redis:
    return redis.Redis(port=storage.redis_port, password=storage.password, decode_responses=True)


def _sql(storage: Storage, statement: str) -> str:
    answer = httpx.post(storage.clickhouse_url, content=statement.encode(), auth=(storage.clickhouse_user, storage.clickhouse_password),
                        timeout=120)  # fmt: skip
    assert answer.status_code == 200, answer.text
    return answer.text


def canonical(storage: Storage, kbs: list[str]) -> tuple[str, str]:
    """The dumps of kato-golden/storage/README.md, made here from what the deployment holds (not with ingestd's
    own code): ``clickhouse.jsonl`` and ``redis.jsonl`` text for these kbs, level = position in the list."""
    rows, keys = [], []
    client = _client(storage)
    for level, kb in enumerate(kbs):
        text = _sql(storage, "SELECT name, pattern_data, length, token_set, token_count, first_token, last_token, "
                             f"minhash_sig, lsh_bands FROM kato.patterns_data WHERE kb_id = '{kb}' FORMAT JSONEachRow")  # fmt: skip
        for line in text.splitlines():
            row = json.loads(line)
            signature, bands = [int(v) for v in row["minhash_sig"]], [int(v) for v in row["lsh_bands"]]
            out = {"table": "patterns_data", "level": level, "kb_id": "{kb}", "name": row["name"],
                   "pattern_data": row["pattern_data"], "length": row["length"], "token_set": sorted(row["token_set"]),
                   "token_count": row["token_count"], "first_token": row["first_token"], "last_token": row["last_token"],
                   "minhash_sha1": hashlib.sha1(json.dumps([signature, bands], separators=(",", ":")).encode()).hexdigest()}  # fmt: skip
            if row["name"][0] in "0123":
                out.update(minhash_sig=signature, lsh_bands=bands)
            rows.append(((level, row["name"]), out))
        names = list(client.scan_iter(match=f"{kb}:*", count=5000))
        for start in range(0, len(names), 5000):
            part = names[start : start + 5000]
            with client.pipeline(transaction=False) as pipe:
                for key in part:
                    pipe.type(key)
                kinds = pipe.execute()
            with client.pipeline(transaction=False) as pipe:
                for key, kind in zip(part, kinds, strict=True):
                    {"hash": pipe.hgetall, "set": pipe.smembers}.get(kind, pipe.get)(key)
                values = pipe.execute()
            for key, kind, value in zip(part, kinds, values, strict=True):
                if kind == "hash":
                    value = dict(sorted(value.items()))
                elif kind == "set":
                    value = sorted(value)
                elif key.startswith(f"{kb}:metadata:"):
                    value = json.dumps(dict(sorted(json.loads(value).items())))
                keys.append(((level, "{kb}" + key[len(kb):]), {"key": "{kb}" + key[len(kb):], "level": level,
                                                                "type": kind, "value": value}))  # fmt: skip
    client.close()

    def text(lines: list[tuple[Any, dict[str, Any]]]) -> str:
        return "".join(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n" for _, line in sorted(lines, key=lambda item: item[0]))

    return text(rows), text(keys)


def publish(storage: Storage, data: Path, *arguments: str, expect: int = 0, timeout: float = 300,
            redis_url: str | None = None) -> dict[str, Any]:  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "ingestd", "publish", "--data-dir", str(data), "--redis-url",
                             redis_url or storage.redis_url, "--clickhouse-url", storage.clickhouse_url, "--json", *arguments],
                            capture_output=True, text=True, timeout=timeout, env=storage.env())  # fmt: skip
    assert result.returncode == expect, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert storage.password not in result.stdout + result.stderr and storage.clickhouse_password not in result.stdout + result.stderr  # type: ignore[operator]
    return json.loads(result.stdout) if expect == 0 else {"stderr": result.stderr, "stdout": result.stdout}


def learn_golden(run_name: str, data: Path, node_template: str, **extra: Any) -> list[str]:
    """The golden run learned in-process (``ingestd.run``, the CLI's pipeline); its node ids."""
    from ingestd import run

    golden = load_run(run_name)
    run(str(GOLDEN / "hierarchy" / run_name / "samples.jsonl"), chunk_sizes=golden.chunk_sizes, node_ids=node_template,
        source_label=golden.label, data_dir=data, metadata_levels=[i for i, flag in enumerate(golden.metadata_levels) if flag],
        progress=False, **extra)  # fmt: skip
    return [node_template.format(level=level) for level in range(len(golden.chunk_sizes))]


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each golden run learned once, into a store of its own, on nodes ``learned-<run>-node<L>``; the tests
    publish them under names of their own (``--as``), so they share the stores."""
    stores = {}
    for run_name in RUNS:
        stores[run_name] = tmp_path_factory.mktemp("learned") / run_name
        learn_golden(run_name, stores[run_name], f"learned-{run_name}-node{{level}}")
    return stores


@pytest.mark.parametrize("run_name", RUNS)
def test_a_published_golden_run_is_what_kato_stored_byte_for_byte(deployment: Storage, learned: dict[str, Path],
                                                                 run_name: str) -> None:  # fmt: skip
    nodes = [f"learned-{run_name}-node{level}" for level in range(len(load_run(run_name).chunk_sizes))]
    published = publish(deployment, learned[run_name], "--as", f"pub-{run_name}-node{{level}}", "--verify")
    assert [node["target_node_id"] for node in published["nodes"]] == [f"pub-{run_name}-node{level}" for level in range(len(nodes))]
    assert all(node["verified"]["ok"] for node in published["nodes"])
    rows, keys = canonical(deployment, [kb_id(f"pub-{run_name}-node{level}") for level in range(len(nodes))])
    assert rows == (STORAGE / run_name / "clickhouse.jsonl").read_text(encoding="utf-8")
    assert keys == (STORAGE / run_name / "redis.jsonl").read_text(encoding="utf-8")
    # the source's own node ids are not in the deployment (renamed), and a second publish does nothing
    assert _sql(deployment, f"SELECT count() FROM kato.patterns_data WHERE kb_id = '{kb_id(nodes[0])}'").strip() == "0"
    again = publish(deployment, learned[run_name], "--as", f"pub-{run_name}-node{{level}}")
    assert {node["action"] for node in again["nodes"]} == {"already published"}
    assert canonical(deployment, [kb_id(f"pub-{run_name}-node{level}") for level in range(len(nodes))]) == (rows, keys)


def test_a_merged_sharded_run_publishes_as_the_single_run(deployment: Storage, tmp_path: Path) -> None:
    run_name = "shakespeare-docs"
    template = "shard-docs-node{level}"
    for index in range(3):
        learn_golden(run_name, tmp_path / f"shard{index}", template, shard=f"{index}/3")
    subprocess.run([sys.executable, "-m", "ingestd", "merge", *(str(tmp_path / f"shard{index}") for index in range(3)),
                    "--into", str(tmp_path / "merged")], check=True, capture_output=True, timeout=300)  # fmt: skip
    publish(deployment, tmp_path / "merged", "--node-ids", template, "--as", "merged-docs-node{level}")
    rows, keys = canonical(deployment, [kb_id(f"merged-docs-node{level}") for level in range(4)])
    assert rows == (STORAGE / run_name / "clickhouse.jsonl").read_text(encoding="utf-8")
    assert keys == (STORAGE / run_name / "redis.jsonl").read_text(encoding="utf-8")


def test_a_target_that_holds_anything_is_refused_before_anything_is_written(deployment: Storage, learned: dict[str, Path]) -> None:
    source = learned["shakespeare-dup"]
    client = _client(deployment)
    # KATO learned one pattern into the level-2 node of the target: a key, no rows
    client.set(f"{kb_id('busy-node2')}:frequency:0123", "1")
    refused = publish(deployment, source, "--as", "busy-node{level}", expect=2)
    assert "busy_node2" in refused["stderr"] and "--replace" in refused["stderr"] and "--as" in refused["stderr"]
    for level in range(3):  # nothing written, levels 0 and 1 included
        assert not list(client.scan_iter(match=f"{kb_id(f'busy-node{level}')}:*")) or level == 2
        assert _sql(deployment, f"SELECT count() FROM kato.patterns_data WHERE kb_id = '{kb_id(f'busy-node{level}')}'").strip() == "0"
    # --replace clears it first (as KATO's clear-all) and publishes: the stray key is gone
    replaced = publish(deployment, source, "--as", "busy-node{level}", "--replace", "--verify")
    assert [node["action"] for node in replaced["nodes"]] == ["published", "published", "replaced"]
    assert client.get(f"{kb_id('busy-node2')}:frequency:0123") is None
    rows, keys = canonical(deployment, [kb_id(f"busy-node{level}") for level in range(3)])
    assert rows == (STORAGE / "shakespeare-dup" / "clickhouse.jsonl").read_text(encoding="utf-8")
    assert keys == (STORAGE / "shakespeare-dup" / "redis.jsonl").read_text(encoding="utf-8")
    # another knowledge base replaces it; publishing the first again is refused, not taken for done...
    other = learned["shakespeare-docs"]
    publish(deployment, other, "--node-ids", "learned-shakespeare-docs-node{level}", "--as", "busy-node{level}", "--replace")
    assert "did not write" in publish(deployment, source, "--as", "busy-node{level}", expect=2)["stderr"]
    # ...and with --replace it replaces it, whatever its journal says
    back = publish(deployment, source, "--as", "busy-node{level}", "--replace")
    assert {node["action"] for node in back["nodes"]} == {"replaced"}
    assert canonical(deployment, [kb_id(f"busy-node{level}") for level in range(3)]) == (rows, keys)
    client.close()


def test_verify_finds_a_tampered_key_and_a_missing_row(deployment: Storage, learned: dict[str, Path]) -> None:
    source = learned["shakespeare-dup"]
    publish(deployment, source, "--as", "tamper-node{level}")
    kb = kb_id("tamper-node0")
    client = _client(deployment)
    name = next(iter(client.scan_iter(match=f"{kb}:frequency:*"))).split(":")[-1]
    client.incr(f"{kb}:frequency:{name}")
    other = _sql(deployment, f"SELECT name FROM kato.patterns_data WHERE kb_id = '{kb}' AND name != '{name}' ORDER BY name LIMIT 1").strip()
    _sql(deployment, f"ALTER TABLE kato.patterns_data DELETE WHERE kb_id = '{kb}' AND name = '{other}' SETTINGS mutations_sync = 1")
    kb1 = kb_id("tamper-node1")
    doubled = _sql(deployment, f"SELECT name FROM kato.patterns_data WHERE kb_id = '{kb1}' ORDER BY name LIMIT 1").strip()
    _sql(deployment, "INSERT INTO kato.patterns_data SELECT kb_id, name, [['BOGUS']], length, token_set, token_count, "
                     "minhash_sig, lsh_bands, first_token, last_token, created_at, updated_at FROM kato.patterns_data "
                     f"WHERE kb_id = '{kb1}' AND name = '{doubled}'")  # fmt: skip
    client.set(f"{kb_id('tamper-node2')}:prediction:some-observation", "[]")  # KATO's own, while serving: not the KB
    checked = publish(deployment, source, "--as", "tamper-node{level}", "--verify", expect=1)
    reports = [node["verified"] for node in json.loads(checked["stdout"])["nodes"]]
    assert not reports[0]["ok"] and reports[0]["rows"]["missing"] == 1 and reports[0]["keys"]["different"] == 1, reports[0]
    assert f"missing {other}" in reports[0]["rows"]["examples"]
    assert f"different {kb}:frequency:{name}" in reports[0]["keys"]["examples"]
    assert not reports[1]["ok"] and reports[1]["rows"]["extra"] == 1 and f"extra {doubled}" in reports[1]["rows"]["examples"]
    assert reports[2]["ok"]  # intact (a prediction key KATO wrote is not part of the KB)
    assert "differ from the source" in checked["stderr"]
    client.close()


def test_two_publishes_at_once_into_one_target_publish_it_once(deployment: Storage, learned: dict[str, Path]) -> None:
    source = learned["shakespeare-4x8"]
    command = [sys.executable, "-m", "ingestd", "publish", "--data-dir", str(source), "--redis-url", deployment.redis_url,
               "--clickhouse-url", deployment.clickhouse_url, "--as", "twice-node{level}", "--json"]  # fmt: skip
    processes = [subprocess.Popen(command, env=deployment.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]  # fmt: skip
    outcomes = [(process.wait(timeout=300), process.stdout.read(), process.stderr.read()) for process in processes]  # type: ignore[union-attr]
    assert sorted(code for code, _, _ in outcomes) in ([0, 0], [0, 2]), outcomes
    for code, out, err in outcomes:
        assert "Traceback" not in err
        if code == 2:
            assert "another publish into kb twice_node" in err
        else:
            assert {node["action"] for node in json.loads(out)["nodes"]} <= {"published", "already published"}
    rows, keys = canonical(deployment, [kb_id(f"twice-node{level}") for level in range(4)])
    assert rows == (STORAGE / "shakespeare-4x8" / "clickhouse.jsonl").read_text(encoding="utf-8")  # no row twice
    assert keys == (STORAGE / "shakespeare-4x8" / "redis.jsonl").read_text(encoding="utf-8")
    client = _client(deployment)
    assert not client.keys("ingestd:publish-lock:*")  # released
    # a publisher on another machine holds the lock of one target: refused, nothing written; once it is gone, fine
    client.set(f"ingestd:publish-lock:{kb_id('locked-node1')}", "elsewhere:1:token", px=60_000)
    held = publish(deployment, source, "--as", "locked-node{level}", expect=2)
    assert "another publish into kb locked_node1_kato is running (elsewhere:1:token)" in held["stderr"]
    assert _progress(deployment, [kb_id(f"locked-node{level}") for level in range(4)], "x") == (0, 0, 0)
    client.delete(f"ingestd:publish-lock:{kb_id('locked-node1')}")
    assert {node["action"] for node in publish(deployment, source, "--as", "locked-node{level}")["nodes"]} == {"published"}
    client.close()


def _progress(storage: Storage, kbs: list[str], first: str) -> tuple[int, int, int]:
    """Cheaply, now: rows of these kbs, whether level 0's first pattern has its keys, how many global counters."""
    client = _client(storage)
    rows = int(_sql(storage, f"SELECT count() FROM kato.patterns_data WHERE kb_id IN ({', '.join(repr(kb) for kb in kbs)})").strip())
    keys = client.exists(f"{kbs[0]}:frequency:{first}")
    counters = client.exists(*(f"{kb}:global:{name}" for kb in kbs for name in
                               ("total_symbols_in_patterns_frequencies", "total_pattern_frequencies", "total_unique_patterns")))  # fmt: skip
    client.close()
    return rows, keys, counters


def test_a_publish_killed_at_any_moment_and_run_again_is_one_uninterrupted_publish(deployment: Storage, tmp_path: Path,
                                                                                   learned: dict[str, Path]) -> None:  # fmt: skip
    source = tmp_path / "corpus.txt"
    text = CORPUS.read_text(encoding="utf-8")
    source.write_text(text[: len(text) // 6], encoding="utf-8")
    run(str(source), chunk_sizes=[4, 4, 4], metadata_levels=[1, 2], data_dir=tmp_path / "kb", node_ids="big-node{level}",
        progress=False)  # fmt: skip
    with sqlite3.connect(tmp_path / "kb" / "kato.sqlite3") as connection:
        first = connection.execute("SELECT min(name) FROM patterns WHERE kb_id = ?", (kb_id("big-node0"),)).fetchone()[0]
    publish(deployment, tmp_path / "kb", "--as", "whole-node{level}")
    reference = canonical(deployment, [kb_id(f"whole-node{level}") for level in range(3)])
    kbs = [kb_id(f"killed-node{level}") for level in range(3)]
    command = [sys.executable, "-m", "ingestd", "publish", "--data-dir", str(tmp_path / "kb"), "--redis-url",
               deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url, "--as", "killed-node{level}"]  # fmt: skip
    seen = []
    moments = [lambda rows, keys, counters: rows > 0 and not keys,  # level 0's rows inserted, no key yet
               lambda rows, keys, counters: keys and not counters,  # writing level 0's keys
               lambda rows, keys, counters: 3 <= counters < 6,  # level 0 done, level 1 under way
               lambda rows, keys, counters: 6 <= counters < 9]  # fmt: skip
    for moment in moments:
        process = subprocess.Popen(command, env=deployment.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            now = _progress(deployment, kbs, first)
            if moment(*now):
                os.kill(process.pid, signal.SIGKILL)
                seen.append(now)
                break
            time.sleep(0.002)
        process.wait(timeout=60)
    assert any(counters < 9 for _, _, counters in seen), f"every publish finished before it could be killed: {seen}"
    # run again with the deployment's address spelled another way: the same deployment, so it finishes
    again = publish(deployment, tmp_path / "kb", "--as", "killed-node{level}", "--verify",
                    redis_url=f"redis://localhost:{deployment.redis_port}")  # fmt: skip
    assert all(node["verified"]["ok"] for node in again["nodes"])
    assert canonical(deployment, kbs) == reference
    # killed, then another knowledge base published there with --replace: running the killed one again must not
    # wipe it (it is not this publish's unfinished kb any more)
    process = subprocess.Popen([*command[:-1], "stolen-node{level}"], env=deployment.env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    stolen = [kb_id(f"stolen-node{level}") for level in range(3)]
    while process.poll() is None and not _progress(deployment, stolen, first)[0]:
        time.sleep(0.002)
    process.kill()
    process.wait(timeout=60)
    other = learned["shakespeare-dup"]
    publish(deployment, other, "--node-ids", "learned-shakespeare-dup-node{level}", "--as", "stolen-node{level}", "--replace")
    theirs = canonical(deployment, stolen)
    refused = publish(deployment, tmp_path / "kb", "--as", "stolen-node{level}", expect=2)
    assert "that this publish did not write" in refused["stderr"] and canonical(deployment, stolen) == theirs


def test_bad_addresses_credentials_and_nodes_are_one_line(deployment: Storage, learned: dict[str, Path]) -> None:
    base = [sys.executable, "-m", "ingestd", "publish", "--data-dir", str(learned["shakespeare-dup"])]
    cases = [
        (["--redis-url", "redis://user:pw@127.0.0.1:1", "--clickhouse-url", deployment.clickhouse_url], deployment.env(), "credentials"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url], dict(os.environ), "INGESTD_REDIS_PASSWORD"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url],
         {**deployment.env(), "INGESTD_CLICKHOUSE_PASSWORD": "wrong"}, "INGESTD_CLICKHOUSE_USER"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", "http://127.0.0.1:9"], deployment.env(), "cannot be reached"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url, "--as", "same"],
         deployment.env(), "{level}"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url, "--as", "x'-node{level}"],
         deployment.env(), "--as"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url, "--node-ids", "nope{level}"],
         deployment.env(), "holds no node"),
        (["--redis-url", f"{deployment.redis_url}?password=r3dis-secret", "--clickhouse-url", deployment.clickhouse_url],
         deployment.env(), "no credentials or options"),
        (["--redis-url", deployment.redis_url[:-2] + "/3", "--clickhouse-url", deployment.clickhouse_url], deployment.env(),
         "database 0"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url, "--as", "{level[0]}"],
         deployment.env(), "--as"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url, "--as", "{level:>30}"],
         deployment.env(), "spaces"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url, "--as", "test-node{level}"],
         deployment.env(), "test_"),
        (["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url, "--node-ids",
          "learned-shakespeare-dup-node2", "--as", "x-node{level}"], deployment.env(), "{node_id}"),
    ]  # fmt: skip
    for arguments, env, said in cases:
        named = [] if "--as" in arguments else ["--as", "bad-node{level}"]
        result = subprocess.run(base + arguments + named, capture_output=True, text=True, timeout=120,
                                env={**env, "COLUMNS": "400"})  # fmt: skip
        assert result.returncode != 0 and said in result.stderr, (arguments, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "r3dis-secret" not in result.stderr and "ch-secret" not in result.stderr
    assert _progress(deployment, [kb_id(f"bad-node{level}") for level in range(3)], "x") == (0, 0, 0)


def _inspect(*arguments: str, env: dict[str, str] | None = None) -> Any:
    result = subprocess.run([sys.executable, "-m", "ingestd", "inspect", *arguments], capture_output=True, text=True,
                            timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return json.loads(result.stdout) if "--json" in arguments else None


def test_inspect_reads_a_deployment_as_it_reads_the_store(deployment: Storage, learned: dict[str, Path], tmp_path: Path) -> None:
    """The notebooks' ClickHouse/Redis analyzer: stats, top, show (unravelled to text), sample, histogram and export
    give the same answers on the deployment as on the embedded store it was published from (the Python API; and
    the CLI for stats and show)."""
    import pandas as pd

    from ingestd import Deployment, KnowledgeBase
    from ingestd.kb.export import export_parquet

    publish(deployment, learned["shakespeare-docs"], "--as", "remote-node{level}")
    local = KnowledgeBase(learned["shakespeare-docs"], node_ids="learned-shakespeare-docs-node{level}")
    remote = KnowledgeBase(node_ids="remote-node{level}", deployment=Deployment(
        deployment.redis_url, deployment.clickhouse_url, _credentials(deployment)))  # fmt: skip
    with local, remote:
        def same(mine: pd.DataFrame, theirs: pd.DataFrame, *drop: str) -> None:
            def plain(frame: pd.DataFrame) -> list[dict[str, Any]]:
                text = json.dumps(frame.drop(columns=[c for c in drop if c in frame]).to_dict(orient="records"), default=str)
                return json.loads(text.replace("remote-node", "learned-shakespeare-docs-node")
                                  .replace("remote_node", "learned_shakespeare_docs_node"))  # fmt: skip

            assert plain(theirs) == plain(mine)

        # KATO's storage does not record what chunk size fed a node
        same(local.stats(), remote.stats(), "chunk_size")
        assert list(remote.stats()["patterns"]) == [1941, 249, 35, 12]
        top = local.top(level=1, n=5)
        same(top, remote.top(level=1, n=5))
        same(local.sample(level=3, n=4, seed=7), remote.sample(level=3, n=4, seed=7))
        same(local.histogram(), remote.histogram())
        name = top["name"][0]
        assert remote.show(name).as_dict()["text"] == local.show(name).as_dict()["text"] != ""  # unravelled to text
        assert export_parquet(local, 0, tmp_path / "local.parquet") == export_parquet(remote, 0, tmp_path / "remote.parquet") == 1941
    mine, theirs = pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(tmp_path / "remote.parquet")
    assert mine.drop(columns=[c for c in mine if "node" in c]).equals(theirs.drop(columns=[c for c in theirs if "node" in c]))
    # the CLI: `ingestd inspect --redis-url … --clickhouse-url …`, credentials from the environment
    where = ["--redis-url", deployment.redis_url, "--clickhouse-url", deployment.clickhouse_url]
    shown = _inspect(*where, "show", name, "--node-ids", "remote-node{level}", "--json", env=deployment.env())
    assert shown["text"] == local_text(learned["shakespeare-docs"], name) and shown["level"] == 1
    # a deployment names no runs: --node-ids is asked for, in one line
    result = subprocess.run([sys.executable, "-m", "ingestd", "inspect", *where, "stats"], capture_output=True, text=True,
                            timeout=120, env=deployment.env())  # fmt: skip
    assert result.returncode == 2 and "--node-ids" in result.stderr and "Traceback" not in result.stderr


def _credentials(storage: Storage) -> Any:
    from ingestd.kb.deployment import Credentials

    return Credentials(storage.password, storage.clickhouse_user, storage.clickhouse_password)


def local_text(data: Path, name: str) -> str:
    from ingestd import KnowledgeBase

    with KnowledgeBase(data, node_ids="learned-shakespeare-docs-node{level}") as kb:
        return kb.show(name).text


def test_minhash_and_band_hashes_are_datasketchs_and_cpythons() -> None:
    """The constants are datasketch's (checked against the golden file), the band hash is CPython's own tuple hash
    (checked against ``hash()`` on random signatures, extremes included), and kato-storage.md's example holds."""
    import random

    import numpy as np

    from ingestd.kb import storage

    published = json.loads((STORAGE / "minhash_permutations.json").read_text(encoding="utf-8"))
    a, b = storage.permutations()
    assert [[int(x), int(y)] for x, y in zip(a, b, strict=True)] == published["a_b"]
    signatures, bands = storage.MinHasher().signatures([["x", "y"]])
    assert signatures[0][:4].tolist() == [2681891830, 1055611867, 14964313, 3144002756]
    assert bands[0][:2].tolist() == [367366262628962406, 316208540161388210]
    chooser = random.Random(5)
    rows = np.array([[chooser.choice([0, 1, storage.MAX_HASH, chooser.randrange(storage.MAX_HASH + 1)]) for _ in range(100)]
                     for _ in range(300)], dtype=np.uint64)  # fmt: skip
    expected = [[abs(hash(tuple(row[5 * j : 5 * j + 5]))) for j in range(20)] for row in rows.tolist()]
    assert storage.band_hashes(rows).tolist() == expected


def test_a_publish_that_would_not_fit_in_redis_memory_is_refused(deployment: Storage, learned: dict[str, Path]) -> None:
    """KATO's Redis evicts any key when full (allkeys-lru): a publish that does not fit is refused before writing."""
    client = _client(deployment)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("maxmemory", str(used + 512 * 1024))
    try:
        refused = publish(deployment, learned["shakespeare-4x8"], "--as", "full-node{level}", expect=2)
        assert "maxmemory" in refused["stderr"] and "evict" in refused["stderr"]
        assert _progress(deployment, [kb_id(f"full-node{level}") for level in range(4)], "x") == (0, 0, 0)
    finally:
        client.config_set("maxmemory", "0")
        client.config_set("maxmemory-policy", "noeviction")
        client.close()


def test_emotives_need_their_affinity_left_out_on_purpose(deployment: Storage, tmp_path: Path) -> None:
    from .conftest import EngineServer

    server = EngineServer(tmp_path / "kb").start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            session = client.post("/sessions", json={"node_id": "feel-node0", "config": {"process_predictions": False}}).json()["session_id"]
            for strings, emotives in ((["a"], {"joy": 1.0, "fear": 0.5}), (["b"], {}), (["c"], {"joy": 3.0})):
                body: dict[str, Any] = {"strings": strings, **({"emotives": emotives} if emotives else {})}
                assert client.post(f"/sessions/{session}/observe", json=body).status_code == 200
            assert client.post(f"/sessions/{session}/learn").status_code == 200
    finally:
        server.stop()
    refused = publish(deployment, tmp_path / "kb", "--node-ids", "feel-node0", "--as", "feel-{node_id}", expect=2)
    assert "emotives" in refused["stderr"] and "--without-affinity" in refused["stderr"]
    published = publish(deployment, tmp_path / "kb", "--node-ids", "feel-node0", "--as", "feel-{node_id}",
                        "--without-affinity", "--verify")  # fmt: skip
    assert published["nodes"][0]["verified"]["ok"]
    client = _client(deployment)
    kb = kb_id("feel-feel-node0")
    emotives = [client.get(key) for key in client.scan_iter(match=f"{kb}:emotives:*")]
    assert emotives == ['[{"joy": 1.0, "fear": 0.5}, {"joy": 3.0}]']  # Python's json.dumps text, as KATO writes it
    assert not list(client.scan_iter(match=f"{kb}:affinity:*"))
    client.close()
