"""A KATO deployment's storage, reached directly: its Redis, and its ClickHouse through ClickHouse's HTTP interface.

Only what KATO 3.10.1 itself keeps (``kato-storage.md``): the ``kato.patterns_data`` table and the keys under
``<kb>:``. Credentials come from the settings (environment or files), never from URLs, and are never logged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from ingestd.engine.reader import StoredPattern
from ingestd.engine.rules import PATTERN_PREFIX, strip_prefix
from ingestd.errors import IngestError
from ingestd.kb.storage import GLOBALS
from ingestd.runtime import process_alive

TABLE = "patterns_data"
ROW_READ = "name, pattern_data, length, token_set, token_count, minhash_sig, lsh_bands, first_token, last_token"


class DeploymentError(IngestError):
    """The deployment cannot be reached, refuses a request, or is not KATO's storage."""


def check_url(url: str, schemes: tuple[str, ...], what: str) -> str:
    """A storage address without credentials or options (it is logged and recorded); raises naming what to do."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as error:
        raise DeploymentError(f"{what}: not a URL ({error}): give {schemes[0]}://host:port") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise DeploymentError(f"{what} {url!r}: give {schemes[0]}://host:port")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise DeploymentError(f"{what} must be only scheme://host:port (no credentials or options: they would be "
                              "logged): give credentials in the environment or a file (see `ingestd publish -h`)")  # fmt: skip
    if parts.scheme.startswith("redis") and parts.path.strip("/") not in ("", "0"):
        raise DeploymentError(f"{what} {url!r}: KATO keeps its knowledge bases in Redis database 0: leave the "
                              "database out (or give /0)")  # fmt: skip
    return url.rstrip("/")


def identity(url: str) -> str:
    """One spelling per server: scheme://host:port (default port, localhost as 127.0.0.1, database 0 implied)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    host = "127.0.0.1" if host in ("localhost", "::1") else host
    port = parts.port or {"redis": 6379, "rediss": 6379, "http": 8123, "https": 8443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{host}:{port}"


def sql_string(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def scan_pattern(kb: str) -> str:
    """``<kb>:*`` for SCAN MATCH, with the glob characters a kb id may hold escaped (§9.1)."""
    return re.sub(r"([\[\]*?\\])", r"\\\1", kb) + ":*"


@dataclass(frozen=True)
class Credentials:
    redis_password: str | None = None
    clickhouse_user: str | None = None
    clickhouse_password: str | None = None

    def __repr__(self) -> str:  # never shown, whatever prints it
        return "Credentials(…)"


class ClickHouse:
    """ClickHouse's HTTP interface: a statement per request, rows as JSONEachRow."""

    def __init__(self, url: str, user: str | None, password: str | None, *, database: str = "kato",
                 timeout: float = 600.0) -> None:  # fmt: skip
        self.url = url
        self.database = database
        auth = httpx.BasicAuth(user or "default", password or "") if user or password else None
        self._client = httpx.Client(base_url=url, auth=auth, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def run(self, sql: str, body: bytes | None = None, **settings: Any) -> bytes:
        """One statement (``body``: the data an INSERT reads); its answer."""
        params = {"database": self.database, **{name: str(value) for name, value in settings.items()}}
        try:
            if body is None:
                response = self._client.post("/", params=params, content=sql.encode())
            else:
                response = self._client.post("/", params={**params, "query": sql}, content=body)
        except httpx.HTTPError as error:
            raise DeploymentError(f"ClickHouse at {self.url} cannot be reached ({type(error).__name__}: {error}): "
                                  "check --clickhouse-url and that the server runs") from None  # fmt: skip
        if response.status_code != 200:
            first = response.text.strip().splitlines()[0][:300] if response.text.strip() else f"HTTP {response.status_code}"
            if response.status_code in (401, 403, 516) or "Authentication failed" in response.text:
                raise DeploymentError(f"ClickHouse at {self.url} refused the credentials ({first}): set "
                                      "INGESTD_CLICKHOUSE_USER and INGESTD_CLICKHOUSE_PASSWORD (or _FILE)")  # fmt: skip
            raise DeploymentError(f"ClickHouse at {self.url} refused `{sql.split(' FORMAT ')[0][:120]}`: {first}")
        return response.content

    def rows(self, sql: str) -> Iterator[dict[str, Any]]:
        for line in self.run(sql + " FORMAT JSONEachRow").splitlines():
            if line.strip():
                yield orjson.loads(line)

    def scalar(self, sql: str) -> int:
        return int(self.run(sql + " FORMAT TabSeparated").strip() or 0)

    def insert(self, table: str, columns: Sequence[str], body: bytes, form: str = "RowBinary") -> None:
        """A synchronous insert of rows encoded in ``form`` (values in the order of ``columns``; one part on the
        server: give many rows at once)."""
        if body:
            self.run(f"INSERT INTO {self.database}.{table} ({', '.join(columns)}) FORMAT {form}", body,
                     async_insert=0, wait_end_of_query=1)  # fmt: skip


@dataclass(frozen=True)
class KbState:
    """What a deployment holds of one kb."""

    keys: int
    rows: int
    counters: tuple[str | None, ...]  # its three global counters (a publisher writes them last)

    @property
    def empty(self) -> bool:
        return not self.keys and not self.rows

    @property
    def complete(self) -> bool:
        return all(value is not None for value in self.counters)


class Deployment:
    """A KATO deployment's storage: ``redis_url`` (redis://host:port[/db]) and ``clickhouse_url`` (http://host:8123)."""

    def __init__(self, redis_url: str, clickhouse_url: str, credentials: Credentials | None = None, *,
                 database: str = "kato") -> None:  # fmt: skip
        try:
            import redis
        except ImportError:
            raise DeploymentError('reaching a KATO deployment needs redis-py: pip install "ingestd[publish]"') from None

        credentials = credentials or Credentials()
        self.redis_url = check_url(redis_url, ("redis", "rediss"), "--redis-url")
        self.clickhouse_url = check_url(clickhouse_url, ("http", "https"), "--clickhouse-url")
        self.redis = redis.Redis.from_url(self.redis_url, password=credentials.redis_password, decode_responses=True,
                                          socket_timeout=120, socket_connect_timeout=20)  # fmt: skip
        self.clickhouse = ClickHouse(self.clickhouse_url, credentials.clickhouse_user, credentials.clickhouse_password,
                                     database=database)  # fmt: skip
        self.redis_errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self._authentication = (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)

    @property
    def address(self) -> str:
        return f"{self.redis_url} + {self.clickhouse_url}"

    @property
    def identity(self) -> str:
        """The deployment, however its addresses are spelled."""
        return f"{identity(self.redis_url)} + {identity(self.clickhouse_url)}"

    def close(self) -> None:
        self.redis.close()
        self.clickhouse.close()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def check(self) -> None:
        """Both stores answer, and ClickHouse has KATO's table (``config/clickhouse/init.sql``)."""
        try:
            self.redis.ping()
        except self.redis_errors as error:
            wrong = isinstance(error, self._authentication) or any(
                word in str(error) for word in ("NOAUTH", "WRONGPASS", "invalid username-password", "Authentication"))  # fmt: skip
            hint = ("set INGESTD_REDIS_PASSWORD (or INGESTD_REDIS_PASSWORD_FILE) to its password" if wrong
                    else "check --redis-url and that the server runs")  # fmt: skip
            raise DeploymentError(f"Redis at {self.redis_url}: {type(error).__name__}: {error}: {hint}") from None
        found = self.clickhouse.scalar(f"SELECT count() FROM system.tables WHERE database = "
                                       f"{sql_string(self.clickhouse.database)} AND name = {sql_string(TABLE)}")  # fmt: skip
        if not found:
            raise DeploymentError(f"ClickHouse at {self.clickhouse_url} has no table {self.clickhouse.database}.{TABLE}: "
                                  "is it KATO's? Create KATO's tables first (KATO's config/clickhouse/init.sql)")  # fmt: skip

    # -- one kb ----------------------------------------------------------------------------------------------
    def keys(self, kb: str) -> Iterator[str]:
        yield from self.redis.scan_iter(match=scan_pattern(kb), count=5000)

    def row_count(self, kb: str) -> int:
        return self.clickhouse.scalar(f"SELECT count() FROM {self.clickhouse.database}.{TABLE} WHERE kb_id = {sql_string(kb)}")

    def state(self, kb: str) -> KbState:
        keys = sum(1 for _ in self.keys(kb))
        counters = tuple(self.redis.mget([f"{kb}:global:{name}" for name in GLOBALS]))
        return KbState(keys, self.row_count(kb), counters)

    def evictions(self) -> tuple[int, str | None, int]:
        """Keys Redis has evicted so far, its eviction policy and its memory limit (policy None: not readable)."""
        stats = self.redis.info("stats")
        try:
            config = self.redis.config_get("maxmemory*")
        except self.redis_errors:  # CONFIG is often disabled on managed servers
            return int(stats.get("evicted_keys", 0)), None, 0
        return int(stats.get("evicted_keys", 0)), config.get("maxmemory-policy"), int(config.get("maxmemory") or 0)

    def memory_room(self) -> int | None:
        """Bytes Redis may still take before it evicts or refuses writes (None: no limit, or not readable)."""
        _, policy, limit = self.evictions()
        if policy is None or not limit:
            return None
        return limit - int(self.redis.info("memory").get("used_memory", 0))

    def clear(self, kb: str) -> None:
        """What KATO's clear-all removes (§5): the kb's partition and every key under ``<kb>:``."""
        self.clickhouse.run(f"ALTER TABLE {self.clickhouse.database}.{TABLE} DROP PARTITION {sql_string(kb)}")
        batch: list[str] = []
        for key in self.keys(kb):
            batch.append(key)
            if len(batch) >= 5000:
                self.redis.unlink(*batch)
                batch = []
        if batch:
            self.redis.unlink(*batch)

    def rows(self, kb: str, where: str = "") -> Iterator[dict[str, Any]]:
        yield from self.clickhouse.rows(f"SELECT {ROW_READ} FROM {self.clickhouse.database}.{TABLE} WHERE kb_id = "
                                        f"{sql_string(kb)}{where} ORDER BY name")  # fmt: skip

    def values(self, kb: str) -> Iterator[tuple[str, str, Any, int]]:
        """Every key under ``<kb>:`` with its type, value (strings, hashes, sets, as KATO writes them) and time to
        live in ms (-1: none, as KATO's keys). A key gone between listing and reading is left out."""
        keys = list(self.keys(kb))
        for start in range(0, len(keys), 2000):
            part = keys[start : start + 2000]
            with self.redis.pipeline(transaction=False) as pipe:
                for key in part:
                    pipe.type(key)
                    pipe.pttl(key)
                described = pipe.execute()
            kinds, lives = described[0::2], described[1::2]
            with self.redis.pipeline(transaction=False) as pipe:
                for key, kind in zip(part, kinds, strict=True):
                    {"hash": pipe.hgetall, "set": pipe.smembers, "string": pipe.get}.get(kind, pipe.type)(key)
                found = pipe.execute()
            for key, kind, value, life in zip(part, kinds, found, lives, strict=True):
                if kind == "none" or value is None:
                    continue
                yield key, kind, (sorted(value) if kind == "set" else value), int(life)



class DeploymentReader:
    """A KATO deployment's knowledge bases read back, answering as :class:`ingestd.engine.reader.StoreReader` does
    (so :class:`ingestd.kb.KnowledgeBase` and ``ingestd inspect`` read a deployment as they read a store): rows
    from ClickHouse, frequencies, emotives and metadata from Redis. It records no runs, so nodes are named with
    ``--node-ids``."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        deployment.check()

    def close(self) -> None:
        self.deployment.close()

    def __enter__(self) -> DeploymentReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def store_id(self) -> str:
        return f"deployment {self.deployment.address}"

    def merged_stores(self) -> list[str]:
        return []

    def fed_nodes(self) -> list[Any]:
        return []

    def kb_ids(self) -> list[str]:
        clickhouse = self.deployment.clickhouse
        return [row["kb_id"] for row in clickhouse.rows(f"SELECT DISTINCT kb_id FROM {clickhouse.database}.{TABLE} ORDER BY kb_id")]

    def count(self, kb_id: str) -> int:
        return self.deployment.row_count(kb_id)

    def _frequencies(self, kb_id: str, names: list[str]) -> list[int]:
        found: list[int] = []
        for start in range(0, len(names), 10_000):
            values = self.deployment.redis.mget([f"{kb_id}:frequency:{name}" for name in names[start : start + 10_000]])
            try:
                found.extend(int(value) if value is not None else 0 for value in values)  # no key: KATO answers 0 (§3.1)
            except ValueError as error:
                raise DeploymentError(f"kb {kb_id} holds a frequency that is not a number ({error}): the deployment's "
                                      "storage is damaged") from None  # fmt: skip
        return found

    def frequencies(self, kb_id: str) -> Iterator[tuple[str, int, int]]:
        """(name, frequency, length) of every pattern, by name."""
        clickhouse = self.deployment.clickhouse
        rows = list(clickhouse.rows(f"SELECT name, length FROM {clickhouse.database}.{TABLE} WHERE kb_id = "
                                    f"{sql_string(kb_id)} ORDER BY name"))  # fmt: skip
        names = [row["name"] for row in rows]
        for row, frequency in zip(rows, self._frequencies(kb_id, names), strict=True):
            yield PATTERN_PREFIX + row["name"], frequency, int(row["length"])

    def most_frequent(self, kb_id: str, limit: int) -> list[StoredPattern]:
        ranked = sorted(self.frequencies(kb_id), key=lambda row: (-row[1], row[0]))[:limit]
        found = self.patterns(kb_id, [name for name, _, _ in ranked])
        return [found[name] for name, _, _ in ranked if name in found]

    def _stored(self, kb_id: str, rows: list[dict[str, Any]]) -> list[StoredPattern]:
        keys = [f"{kb_id}:{kind}:{row['name']}" for row in rows for kind in ("frequency", "emotives", "metadata")]
        values: list[str | None] = []
        for start in range(0, len(keys), 30_000):
            values.extend(self.deployment.redis.mget(keys[start : start + 30_000]))
        made = []
        for number, row in enumerate(rows):
            frequency, emotives, metadata = values[3 * number : 3 * number + 3]
            try:
                made.append(StoredPattern(PATTERN_PREFIX + row["name"], row["pattern_data"], int(row["length"]),
                                          int(frequency) if frequency is not None else 0,
                                          orjson.loads(emotives) if emotives else [],
                                          orjson.loads(metadata) if metadata else {}))  # fmt: skip
            except (ValueError, TypeError) as error:
                raise DeploymentError(f"kb {kb_id} holds a damaged pattern {row['name']} ({type(error).__name__}: "
                                      f"{error}): its frequency, emotives or metadata key is not what KATO writes") from None  # fmt: skip
        return made

    def patterns(self, kb_id: str, names: Iterable[str]) -> dict[str, StoredPattern]:
        wanted = list(dict.fromkeys(strip_prefix(name) for name in names))
        found: dict[str, StoredPattern] = {}
        clickhouse = self.deployment.clickhouse
        for start in range(0, len(wanted), 2_000):
            part = wanted[start : start + 2_000]
            rows = list(clickhouse.rows(f"SELECT name, pattern_data, length FROM {clickhouse.database}.{TABLE} WHERE "
                                        f"kb_id = {sql_string(kb_id)} AND name IN ({', '.join(map(sql_string, part))})"))  # fmt: skip
            rows = list({row["name"]: row for row in rows}.values())  # (a duplicate row: KATO reads one)
            for pattern in self._stored(kb_id, rows):
                found[pattern.name] = pattern
        return found

    def iter_patterns(self, kb_id: str, batch: int = 10_000) -> Iterator[list[StoredPattern]]:
        clickhouse = self.deployment.clickhouse
        rows = clickhouse.rows(f"SELECT name, pattern_data, length FROM {clickhouse.database}.{TABLE} WHERE kb_id = "
                               f"{sql_string(kb_id)} ORDER BY name")  # fmt: skip
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= batch:
                yield self._stored(kb_id, chunk)
                chunk = []
        if chunk:
            yield self._stored(kb_id, chunk)

    def find(self, kb_ids: Sequence[str], name: str) -> list[tuple[str, StoredPattern]]:
        found = []
        for kb in kb_ids:
            pattern = self.patterns(kb, [name]).get(PATTERN_PREFIX + strip_prefix(name))
            if pattern is not None:
                found.append((kb, pattern))
        return found


LOCK_PREFIX = "ingestd:publish-lock:"  # outside every kb's keys (``<kb>:``): KATO never reads it
LOCK_MILLISECONDS = 30_000  # a lock lives this long unless renewed (a publisher renews it every few seconds)

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"


class PublishLocks:
    """One publisher per target kb at a time, across machines: a Redis key per kb, set only if absent, that expires
    unless renewed (a thread renews it while the publish runs). A lock left by a publisher of this machine whose
    process is gone (``kill -9``) is taken over at once; one of another machine expires within 30 s."""

    def __init__(self, deployment: Deployment, kbs: Sequence[str]) -> None:
        import os
        import socket
        import threading
        import uuid

        self.redis = deployment.redis
        self.kbs = list(kbs)
        self.host = socket.gethostname()
        self.value = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="ingestd-publish-lock", daemon=True)
        self._held: list[str] = []

    def __enter__(self) -> PublishLocks:
        try:
            for kb in self.kbs:
                self._take(LOCK_PREFIX + kb)
        except BaseException:
            self._release()
            raise
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._release()

    def _take(self, key: str) -> None:
        import os

        for _ in range(2):
            if self.redis.set(key, self.value, nx=True, px=LOCK_MILLISECONDS):
                self._held.append(key)
                return
            holder = self.redis.get(key) or ""
            host, _, rest = holder.partition(":")
            pid = rest.partition(":")[0]
            if pid.isdigit() and not process_alive(host, int(pid)) and int(pid) != os.getpid():
                self.redis.eval(_RELEASE, 1, key, holder)  # its publisher is gone: the journal says what it left
                continue
            break
        raise DeploymentError(f"another publish into kb {key[len(LOCK_PREFIX):]} is running ({holder or 'just now'}): "
                              "wait for it to finish (a publisher that died frees it within 30 s), then run again")  # fmt: skip

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_MILLISECONDS / 3000):
            for key in self._held:
                try:
                    self.redis.eval(_RENEW, 1, key, self.value, LOCK_MILLISECONDS)
                except Exception:  # noqa: BLE001 - the publish itself reports a Redis that went away
                    return

    def _release(self) -> None:
        for key in self._held:
            try:
                self.redis.eval(_RELEASE, 1, key, self.value)
            except Exception:  # noqa: BLE001 - it expires by itself
                pass
        self._held = []

