"""``ingestd publish``: an embedded knowledge base written into a KATO deployment's own storage, so that the
deployment holds exactly what KATO 3.10.1 would hold had it learned the same patterns through its API
(``kato-storage.md`` §0.1, §9).

Per knowledge base, in this order: every ``patterns_data`` row (large synchronous inserts, then their count
checked), the per-pattern keys, the symbol tables, and the three global counters **last**, so a kb without them
is known unfinished. The store is read in one snapshot, twice (rows, then keys), so memory stays flat whatever
the KB's size, and a run learning into it meanwhile changes nothing of what is published.

Safety:

* a target kb that holds anything is refused (before anything is written), unless ``replace``, which clears
  it first as KATO's clear-all does;
* a journal in the source's data directory (``published/``) records each publish begun and finished, by the
  deployment, the target kb and the source's content: a publish killed at any moment and run again clears what
  it had written of that kb and publishes it again, ending as one uninterrupted publish would; run again after
  it finished, it does nothing;
* one publisher per target kb at a time, across machines: a Redis key outside every kb's keys
  (``ingestd:publish-lock:<kb>``) that expires unless renewed (:class:`~ingestd.kb.deployment.PublishLocks`);
* ``verify`` reads the deployment back and compares it with the source, pattern for pattern and counter for
  counter, in the canonical form of ``kato-golden/storage/README.md``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingestd.engine.reader import StoredPattern, StoreReader
from ingestd.engine.rules import kb_id
from ingestd.errors import IngestError
from ingestd.kb import storage
from ingestd.kb.deployment import TABLE, Deployment, DeploymentError, KbState, PublishLocks
from ingestd.kb.nodes import Node

ROWS_PER_INSERT = 50_000
KEYS_PER_PIPELINE = 20_000
KEYS_PER_MSET = 3_000
FIELDS_PER_HSET = 2_000
JOURNAL = "published"

RESTART_NOTE = ("KATO reads published kbs at once: nothing to do for nodes new to it. A KATO worker that has "
                "predicted on one of these nodes since it started keeps stale counters for it: restart every KATO "
                "worker after publishing into such a node (kato-storage.md §0.2).")  # fmt: skip


class PublishError(IngestError):
    """The publish cannot go ahead: a target is not empty, or the source and target disagree."""


@dataclass(frozen=True)
class Target:
    """One node of the source and where it goes."""

    node: Node
    node_id: str  # in the deployment
    kb: str

    @property
    def level(self) -> int:
        return self.node.level


_BAD_NODE_CHARACTERS = frozenset("'[]")


def targets(nodes: Sequence[Node], rename: str | None = None) -> list[Target]:
    """The deployment's node for each source node: the same id, or ``rename`` (``'prod-node{level}'``)."""
    made = []
    for node in nodes:
        if rename is None:
            node_id = node.node_id
        else:
            try:
                node_id = rename.format(level=node.level, node_id=node.node_id)
            except Exception as error:  # noqa: BLE001 - str.format raises many kinds on a template
                raise PublishError(f"--as {rename!r}: {type(error).__name__}: {error}: use {{level}} (and "
                                   "{node_id}), e.g. 'prod-node{level}'") from None  # fmt: skip
        made.append(Target(node, node_id, kb_id(node_id)))
    kbs = [target.kb for target in made]
    if len(set(kbs)) != len(kbs):
        raise PublishError(f"--as {rename!r} names the same node for several levels: put {{level}} in it")
    for target in made:
        shown = target.node_id.encode("utf-8", "backslashreplace").decode()
        if not target.node_id or _BAD_NODE_CHARACTERS & set(target.node_id):
            raise PublishError(f"node id {shown!r}: KATO cannot store a node id with ', [ or ] safely "
                               "(kato-storage.md §11): publish it under another name with --as")  # fmt: skip
        if any(not character.isprintable() or character.isspace() for character in target.node_id) or shown != target.node_id:
            raise PublishError(f"node id {shown!r} holds spaces, control characters or undecodable bytes: publish it "
                               "under a plain name with --as")  # fmt: skip
        if target.kb.startswith("test_"):
            raise PublishError(f"node id {shown!r}: KATO drops the knowledge base of a node whose kb id starts with "
                               "test_ when a worker evicts it (kato-protocol.md): publish it under another name with --as")  # fmt: skip
    return made


def _item(stored: StoredPattern) -> storage.Pattern:
    return storage.pattern(stored.name, stored.pattern_data, stored.frequency, stored.emotives, stored.metadata)


def _batches(reader: StoreReader, kb: str) -> Iterator[list[storage.Pattern]]:
    for batch in reader.iter_patterns(kb, batch=ROWS_PER_INSERT):
        yield [_item(stored) for stored in batch]


class _Journal:
    """``<data>/published/<digest>.json`` per (deployment, kb): which content of which node a publish began or
    finished writing there, and the global counters it wrote (to know the kb holds that publish still)."""

    def __init__(self, data_dir: Path, deployment: Deployment) -> None:
        self.folder = Path(data_dir) / JOURNAL
        self.deployment = deployment.identity  # however its URLs are spelled

    def _path(self, kb: str) -> Path:
        return self.folder / (hashlib.sha1(f"{self.deployment}\n{kb}".encode()).hexdigest()[:24] + ".json")

    def read(self, kb: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._path(kb).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def write(self, kb: str, **record: Any) -> None:
        path = self._path(kb)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_text(json.dumps({"deployment": self.deployment, "kb": kb, **record}), encoding="utf-8")
            os.replace(partial, path)
        except OSError as error:
            raise PublishError(f"cannot write the publish journal {path} ({error.strerror or error}): the source's data "
                               "directory must be writable (it records what was published where)") from None  # fmt: skip


def _decide(target: Target, state: KbState, journal: dict[str, Any] | None, content: str, patterns: int,
            replace: bool) -> str:  # fmt: skip
    """What to do with one target kb: 'publish' (empty), 'redo' (this publish's unfinished kb: clear it first),
    'replace' (asked), 'done' (this very publish is there, complete)."""
    ours = journal is not None and journal.get("content") == content and journal.get("node") == target.node.kb_id
    if state.empty:
        return "done" if ours and journal and journal.get("state") == "finished" and not patterns else "publish"
    if replace:
        return "replace"
    if ours and journal and state.complete and list(state.counters) == journal.get("counters"):
        return "done"  # this publish wrote it to the end, its counters last (what else it holds is --verify's business)
    if ours and not state.complete:
        return "redo"  # begun by a publish of this very source that did not finish (killed, failed)
    if journal is not None and journal.get("node") == target.node.kb_id and journal.get("content") != content:
        raise PublishError(f"kb {target.kb} (node {target.node_id}) was published from this store before it changed "
                           "(it learned or was pruned since): give --replace to publish what it holds now (then restart "
                           "every KATO worker), or publish into new nodes with --as")  # fmt: skip
    raise PublishError(
        f"the deployment already holds kb {target.kb} (node {target.node_id}: {state.keys:,} Redis keys, "
        f"{state.rows:,} ClickHouse rows{'' if state.complete else ', unfinished'}) that this publish did not write "
        "(or that changed since): publish into new nodes with --as 'NAME-node{level}', or give --replace to clear it "
        "first (as KATO's clear-all does; then restart every KATO worker)"
    )


def publish(data_dir: Path, nodes: Sequence[Node], deployment: Deployment, *, rename: str | None = None,
            replace: bool = False, verify: bool = False, without_affinity: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Publish ``nodes`` of the store in ``data_dir`` into ``deployment``; per node, what was done."""
    chosen = targets(nodes, rename)
    try:
        deployment.check()
        with PublishLocks(deployment, [target.kb for target in chosen]):
            return _publish(Path(data_dir), chosen, deployment, replace=replace, verify=verify,
                            without_affinity=without_affinity)  # fmt: skip
    except deployment.redis_errors as error:
        raise DeploymentError(f"Redis at {deployment.redis_url} failed ({type(error).__name__}: {error}): what was "
                              "being published stays unfinished (its global counters are missing): run the same "
                              "command again once Redis is back to finish it") from None  # fmt: skip


def _publish(data_dir: Path, chosen: list[Target], deployment: Deployment, *, replace: bool, verify: bool,
             without_affinity: bool) -> list[dict[str, Any]]:  # fmt: skip
    journal = _Journal(data_dir, deployment)
    results = []
    with StoreReader(data_dir) as reader, reader.snapshot():
        content = reader.content()
        plans = []
        for target in chosen:  # every target checked before anything is written
            patterns = reader.count(target.node.kb_id)
            emotive = reader.count_with_emotives(target.node.kb_id)
            if emotive and not without_affinity:
                raise PublishError(f"node {target.node.node_id} has {emotive:,} patterns with emotives: KATO also keeps "
                                   "per-symbol affinity for them, which depends on the order of every learn and "
                                   "cannot be published (kato-storage.md §3.6); give --without-affinity to publish "
                                   "without it (/symbols/affinity and affinity_emotive predictions will differ)")  # fmt: skip
            action = _decide(target, deployment.state(target.kb), journal.read(target.kb), content, patterns, replace)
            plans.append((target, patterns, action))
        _check_room(deployment, reader, [target for target, _, action in plans if action != "done"])
        evicted_before = deployment.evictions()[0]
        for target, patterns, action in plans:
            started = time.perf_counter()
            written: dict[str, Any] = {"rows": 0, "keys": 0}
            if action != "done":
                if action in ("redo", "replace"):
                    deployment.clear(target.kb)
                # the counters it will write last, known before it starts: a kb that holds them is this publish's
                counters = _counters(reader, target)
                journal.write(target.kb, node=target.node.kb_id, content=content, state="started", patterns=patterns,
                              counters=counters)  # fmt: skip
                written = _publish_kb(reader, target, deployment)
                if written.pop("counters") != counters:
                    raise PublishError(f"kb {target.kb}: the global counters written differ from the ones computed "
                                       "before: the store changed under the publish; publish again")  # fmt: skip
                journal.write(target.kb, node=target.node.kb_id, content=content, state="finished", patterns=patterns,
                              counters=counters)  # fmt: skip
            result = {"level": target.level, "node_id": target.node.node_id, "target_node_id": target.node_id,
                      "kb_id": target.kb, "patterns": patterns, **written,
                      "action": {"publish": "published", "redo": "published (an unfinished publish cleared first)",
                                 "replace": "replaced", "done": "already published"}[action],
                      "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
            if verify:
                result["verified"] = verify_kb(reader, target, deployment)
            results.append(result)
        evicted = deployment.evictions()[0] - evicted_before
        if evicted > 0:
            raise PublishError(f"Redis evicted {evicted:,} keys while this publish wrote (its memory limit, policy "
                               "allkeys-*): the deployment has lost data, this publish's or other kbs'. Raise "
                               "maxmemory or set maxmemory-policy noeviction, then publish again with --replace")  # fmt: skip
    return results


def _counters(reader: StoreReader, target: Target) -> list[str | None]:
    """The three global counters publishing ``target`` writes (§3.3); none for a node without patterns."""
    symbols = patterns = 0
    for _, frequency, length in reader.frequencies(target.node.kb_id):
        symbols += frequency * length
        patterns += 1
    return storage.global_counters(symbols, patterns)


BYTES_PER_KEY = 160  # what Redis takes per small string key, beyond its name and value (measured: ~100-200)


def _check_room(deployment: Deployment, reader: StoreReader, chosen: list[Target]) -> None:
    """Refuse, before writing, a publish whose keys would not fit in the memory Redis has left: KATO's Redis
    evicts any key when full (``allkeys-lru``), other kbs' too."""
    room = deployment.memory_room()
    if room is None or not chosen:
        return
    needed = 0
    for target in chosen:
        for batch in _batches(reader, target.node.kb_id):
            for item in batch:
                needed += sum(len(key) + len(value) + BYTES_PER_KEY for key, value in storage.pattern_keys(target.kb, item))
                needed += 2 * sum(len(symbol) + 60 for symbol in set(item.symbols))  # symbol tables and sets, roughly
    if needed > room:
        raise PublishError(f"publishing needs about {needed / 2**20:,.0f} MiB of Redis memory and Redis has "
                           f"{max(room, 0) / 2**20:,.0f} MiB left before its maxmemory: it would evict keys (KATO's "
                           "allkeys-lru evicts any, other kbs' too). Raise maxmemory (CONFIG SET maxmemory) or "
                           "publish fewer nodes")  # fmt: skip


def _publish_kb(reader: StoreReader, target: Target, deployment: Deployment) -> dict[str, Any]:
    """One kb, in KATO's order: rows, per-pattern keys, symbol tables, global counters."""
    kb = target.kb
    source = target.node.kb_id
    now = int(time.time())
    hasher = storage.MinHasher()
    rows = 0
    started = time.perf_counter()
    # a batch's rows are computed while the one before is being inserted (one insert in flight)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ingestd-insert") as inserter:
        pending: concurrent.futures.Future[None] | None = None
        for batch in _batches(reader, source):
            made = storage.row_binary(storage.rows(kb, batch, hasher, now))
            if pending is not None:
                pending.result()
            pending = inserter.submit(deployment.clickhouse.insert, TABLE, storage.ROW_COLUMNS, made)
            rows += len(batch)
        if pending is not None:
            pending.result()
    stored = deployment.row_count(kb)
    if stored != rows:
        raise PublishError(f"ClickHouse holds {stored:,} rows of kb {kb} after inserting {rows:,}: publish again "
                           "(the unfinished kb is cleared first)")  # fmt: skip
    rows_done = time.perf_counter()
    statistics = storage.SymbolStatistics()
    keys = 0
    pipe = deployment.redis.pipeline(transaction=False)
    for batch in _batches(reader, source):
        for start in range(0, len(batch), KEYS_PER_MSET // 3):
            strings: dict[str, str] = {}
            for item in batch[start : start + KEYS_PER_MSET // 3]:
                statistics.add(item)
                strings.update(storage.pattern_keys(kb, item))
            pipe.mset(strings)  # the same strings as SET each: one command for thousands of keys
            keys += len(strings)
        pipe.execute()
    if not statistics.patterns:
        return {"rows": rows, "keys": 0, "rows_seconds": round(rows_done - started, 3), "keys_seconds": 0.0,
                "counters": storage.global_counters(0, 0)}
    for name, table in (("symbols:freq", statistics.freq), ("symbols:pmf", statistics.pmf)):
        fields = list(table.items())
        for start in range(0, len(fields), FIELDS_PER_HSET):
            pipe.hset(f"{kb}:{name}", mapping={symbol: str(value) for symbol, value in fields[start : start + FIELDS_PER_HSET]})
            pipe.execute()
        keys += 1
    for symbol, members in statistics.members.items():
        pipe.sadd(f"{kb}:symbol_to_patterns:{symbol}", *members)
        keys += 1
        if len(pipe) >= KEYS_PER_PIPELINE:
            pipe.execute()
    pipe.execute()
    for key, value in statistics.global_keys(kb):  # last: a kb without them is unfinished
        pipe.set(key, value)
        keys += 1
    pipe.execute()
    return {"rows": rows, "keys": keys, "rows_seconds": round(rows_done - started, 3),
            "keys_seconds": round(time.perf_counter() - rows_done, 3),
            "counters": storage.global_counters(statistics.symbols_learned, statistics.patterns)}


# -- reading back ---------------------------------------------------------------------------------------------


def expected_dump(reader: StoreReader, target: Target) -> tuple[list[str], list[str]]:
    """The canonical dump lines (rows, keys) of what publishing ``target`` writes, computed from the source."""
    kb, level = target.kb, target.level
    hasher = storage.MinHasher()
    rows: list[tuple[int, str, str]] = []
    keys: list[tuple[int, str, str]] = []
    statistics = storage.SymbolStatistics()
    for batch in _batches(reader, target.node.kb_id):
        for row in map(storage.row_dict, storage.rows(kb, batch, hasher, 0)):
            rows.append((level, row["name"], storage.row_line(level, row)))
        for item in batch:
            statistics.add(item)
            for key, value in storage.pattern_keys(kb, item):
                keys.append((level, key, storage.key_line(level, kb, key, "string", value)))
    if statistics.patterns:
        for name, table in (("symbols:freq", statistics.freq), ("symbols:pmf", statistics.pmf)):
            key = f"{kb}:{name}"
            keys.append((level, key, storage.key_line(level, kb, key, "hash", {s: str(v) for s, v in table.items()})))
        for symbol, members in statistics.members.items():
            key = f"{kb}:symbol_to_patterns:{symbol}"
            keys.append((level, key, storage.key_line(level, kb, key, "set", members)))
        for key, value in statistics.global_keys(kb):
            keys.append((level, key, storage.key_line(level, kb, key, "string", value)))
    return list(storage.sorted_lines(rows)), list(storage.sorted_lines(keys))


INFERENCE_KEYS = ("prediction", "entropy", "normalized_entropy", "global_normalized_entropy", "tf_vector")
"""Keys KATO itself writes under ``<kb>:`` while it serves (predictions, finalize-training): not the KB (§3.7)."""


def deployment_dump(deployment: Deployment, kb: str, level: int) -> tuple[list[str], list[str]]:
    """The canonical dump lines (rows, keys) of what ``deployment`` holds of ``kb`` (KATO's inference keys left
    out); a key that expires is dumped with its time to live, so that it differs from what was published."""
    rows = [(level, row["name"], storage.row_line(level, row)) for row in deployment.rows(kb)]
    keys = []
    for key, kind, value, life in deployment.values(kb):
        if key[len(kb) + 1 :].split(":", 1)[0] in INFERENCE_KEYS:
            continue
        line = storage.key_line(level, kb, key, kind, value)
        keys.append((level, key, line if life < 0 else line[:-1] + f',"expires_in_ms":{life}}}'))
    return list(storage.sorted_lines(rows)), list(storage.sorted_lines(keys))


def verify_kb(reader: StoreReader, target: Target, deployment: Deployment) -> dict[str, Any]:
    """The deployment's kb against the source: rows and keys missing, extra (a row twice included), different
    (an expiring key included), with a few examples. KATO's own inference keys (predictions, finalize-training)
    are not compared."""
    expected_rows, expected_keys = expected_dump(reader, target)
    actual_rows, actual_keys = deployment_dump(deployment, target.kb, target.level)
    report: dict[str, Any] = {"ok": True}
    for what, expected, actual in (("rows", expected_rows, actual_rows), ("keys", expected_keys, actual_keys)):
        want, have = _by_name(expected, what), _by_name(actual, what)
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want)) + sorted(name for name, lines in have.items() if len(lines) > 1)
        different = sorted(name for name in set(want) & set(have) if have[name][0] != want[name][0])
        shown = {name: name.replace("{kb}", target.kb, 1) for name in [*missing[:3], *extra[:3], *different[:3]]}
        report[what] = {"expected": len(want), "missing": len(missing), "extra": len(extra), "different": len(different),
                        "examples": [f"missing {shown[name]}" for name in missing[:3]] + [f"extra {shown[name]}" for name in extra[:3]]
                        + [f"different {shown[name]}" for name in different[:3]]}  # fmt: skip
        report["ok"] = report["ok"] and not (missing or extra or different)
    return report


def _by_name(lines: list[str], what: str) -> dict[str, list[str]]:
    field = "name" if what == "rows" else "key"
    found: dict[str, list[str]] = {}
    for line in lines:
        found.setdefault(json.loads(line)[field], []).append(line)
    return found
