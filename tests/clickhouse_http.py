"""The ClickHouse SQL engine (chDB: ClickHouse in-process, from PyPI) behind enough of ClickHouse's HTTP interface
for ingestd: there is no ClickHouse server package here. It creates KATO 3.10.1's tables as KATO's
``config/clickhouse/init.sql`` does (kato-storage.md §2), and answers as ClickHouse does: a statement in the body,
or in ``?query=`` with the data an INSERT reads in the body (text formats, RowBinary and Native); errors as HTTP 500 with ClickHouse's message; a
wrong user or password as ClickHouse's 516.

    python -m tests.clickhouse_http --path DIR [--port 0] [--user U --password P]

prints ``ClickHouse HTTP on http://127.0.0.1:PORT`` once it listens.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SCHEMA = [
    "CREATE DATABASE IF NOT EXISTS kato",
    """CREATE TABLE IF NOT EXISTS kato.patterns_data (
        kb_id String, name String, pattern_data Array(Array(String)), length UInt32, token_set Array(String),
        token_count UInt32, minhash_sig Array(UInt32), lsh_bands Array(UInt64), first_token String, last_token String,
        created_at DateTime DEFAULT now(), updated_at DateTime DEFAULT now(),
        INDEX idx_length length TYPE minmax GRANULARITY 4,
        INDEX idx_token_set token_set TYPE bloom_filter(0.01) GRANULARITY 4,
        INDEX idx_token_count token_count TYPE minmax GRANULARITY 4
    ) ENGINE = MergeTree PARTITION BY kb_id ORDER BY (kb_id, length, name)""",
    """CREATE TABLE IF NOT EXISTS kato.lsh_buckets (kb_id String, band_index UInt8, band_hash UInt64,
        pattern_name String) ENGINE = MergeTree ORDER BY (kb_id, band_index, band_hash)""",
    """CREATE TABLE IF NOT EXISTS kato.pattern_stats (kb_id String, date Date, total_patterns UInt64,
        avg_length Float64, avg_token_count Float64, min_length UInt32, max_length UInt32)
        ENGINE = MergeTree ORDER BY (kb_id, date)""",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", default="default")
    parser.add_argument("--password", default="")
    args = parser.parse_args()
    from chdb import session

    engine = session.Session(args.path)
    lock = threading.Lock()
    for statement in SCHEMA:
        engine.query(statement)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:  # quiet
            pass

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            user, password = self.headers.get("X-ClickHouse-User"), self.headers.get("X-ClickHouse-Key")
            basic = self.headers.get("Authorization", "")
            if basic.startswith("Basic "):
                user, _, password = base64.b64decode(basic[6:]).decode().partition(":")
            return (user or "default") == args.user and (password or "") == args.password

        def do_GET(self) -> None:  # /ping, and read-only queries
            if urlsplit(self.path).path == "/ping":
                self._answer(200, b"Ok.\n")
                return
            self._statement(b"")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._statement(self.rfile.read(length) if length else b"")

        def _statement(self, body: bytes) -> None:
            if not self._authorised():
                self._answer(516, b"Code: 516. DB::Exception: default: Authentication failed: password is incorrect, "
                                  b"or there is no user with such name. (AUTHENTICATION_FAILED)\n")  # fmt: skip
                return
            query = parse_qs(urlsplit(self.path).query).get("query", [""])[0]
            binary = re.fullmatch(r"\s*INSERT INTO\s+([\w.]+)\s*\(([^)]*)\)\s*FORMAT\s+(RowBinary\w*|Native)\s*", query,
                                  flags=re.IGNORECASE)  # fmt: skip
            try:
                with lock:
                    if binary is not None and body:  # the data is not text: chDB reads it from a file
                        table, columns, form = binary.groups()
                        names = [name.strip() for name in columns.split(",")]
                        types = dict(tuple(line.split("\t")[:2]) for line in engine.query(
                            f"DESCRIBE TABLE {table}", "TabSeparated").bytes().decode().splitlines())  # fmt: skip
                        with tempfile.NamedTemporaryFile(dir=args.path, suffix=".bin") as data:
                            data.write(body)
                            data.flush()
                            structure = ", ".join(f"{name} {types[name]}" for name in names)
                            engine.query(f"INSERT INTO {table} ({columns}) SELECT * FROM file('{data.name}', '{form}', "
                                         f"'{structure}')")  # fmt: skip
                        answer = b""
                    else:
                        sql = (query + "\n" + body.decode("utf-8")) if query else body.decode("utf-8")
                        result = engine.query(sql, "TabSeparated")
                        answer = result.bytes() if result is not None else b""
            except Exception as error:  # noqa: BLE001 - chDB raises RuntimeError with ClickHouse's message
                self._answer(500, (str(error).strip() + "\n").encode())
                return
            self._answer(200, answer)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"ClickHouse HTTP on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
