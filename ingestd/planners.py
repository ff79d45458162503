"""Planners: tokenizing and planning (:mod:`ingestd.tokenize`, :mod:`ingestd.plan`) in processes of their own.

Planning is Python, and so is storing what it planned: in one process the two take turns for the GIL, and
a run can never be faster than both together. In processes of their own, planners run on the machine's
other cores while this process learns. Their results come back as each sample's tokens and names, from
which the chunks are cut again here (slicing is cheap; shipping nested lists is not).

A planner (:mod:`ingestd._planning`) is a plain child process talking pickles over its standard input and
output: started in a session of its own (a Ctrl-C on the terminal reaches the run, which decides how to
stop, not its helpers), it ends when its input closes, so also when the run is killed with -9. One that
dies anyway (killed, out of memory) costs nothing but speed: its batches, and every later one, are
planned in this process instead.
"""

from __future__ import annotations

import asyncio
import collections
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Awaitable, Sequence
from typing import IO, Any

import anyio
import structlog

from ingestd.plan import LevelPlan, plan_levels
from ingestd.tokenize import Tokenizer

log = structlog.get_logger("ingestd.planners")

Planned = tuple[int, list[LevelPlan]]  # a sample's token count, and its plan per level


def default_planners() -> int:
    """One planner per core beyond the first (the first learns), at most 8; none on one core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(cores - 1, 8))


def plan_texts(tokenizer: Tokenizer, texts: list[str], chunk_sizes: Sequence[int]) -> list[Planned]:
    """Tokenize and plan, here (in a thread of this process)."""
    return [(len(tokens), plan_levels(tokens, chunk_sizes)) for tokens in tokenizer.tokenize_batch(texts)]


def _cut(tokens: list[str], names: list[list[str]], chunk_sizes: Sequence[int]) -> Planned:
    """A sample's plan from its tokens and names: each level's chunks are the first slices of its input
    (the level below's names), as many as it has names (a last slice of one symbol has none)."""
    levels, symbols = [], tokens
    for size, level_names in zip(chunk_sizes, names, strict=True):
        levels.append(LevelPlan([symbols[start : start + size] for start in range(0, size * len(level_names), size)],
                                level_names))  # fmt: skip
        symbols = level_names
    return len(tokens), levels


PLANNERS_AFTER = 100_000
"""Tokens planned in this process before planner processes are started: a planner costs a spawn and an
import (about half a second of a core), which only a source past this size pays back."""


class PlannerDied(Exception):
    """A planner process ended (or failed a batch); the batch is planned in this process."""


class _Planner:
    """One planner process: requests are written in order, and a thread of its own reads the answers,
    which come in the same order, and hands each to the event loop."""

    def __init__(self, tokenizer: str, chunk_sizes: Sequence[int], loop: asyncio.AbstractEventLoop) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ingestd._planning", tokenizer, ",".join(map(str, chunk_sizes))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self.loop = loop
        self.ready = False
        self.alive = True
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()  # in the order written
        self._writing = threading.Lock()  # one request written at a time, its future queued first
        self._queue = threading.Lock()  # guards _waiting (the reader never waits for a write)
        threading.Thread(target=self._read, name="planner-answers", daemon=True).start()

    def submit(self, texts: list[str]) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        request = pickle.dumps(texts, protocol=pickle.HIGHEST_PROTOCOL)
        stdin = self.process.stdin
        assert stdin is not None

        def write() -> None:
            with self._writing:
                with self._queue:
                    queued = self.alive  # its reader answers (or fails) every future queued while it lives
                    if queued:
                        self._waiting.append(future)
                if queued:
                    try:
                        stdin.write(request)
                        stdin.flush()
                        return
                    except (OSError, ValueError):  # the process is gone, or closed
                        self._stop()
                    with self._queue:
                        if future in self._waiting:
                            self._waiting.remove(future)
                self._hand(future, None, PlannerDied("the planner process ended"))

        threading.Thread(target=write, name="planner-request", daemon=True).start()  # a pipe may block
        return future

    def _read(self) -> None:
        stdout: IO[bytes] | None = self.process.stdout
        assert stdout is not None
        try:
            pickle.load(stdout)  # its pid: the tokenizer is loaded
            self.ready = True
            while True:
                answer = pickle.load(stdout)
                with self._queue:
                    future = self._waiting.popleft()
                failure = PlannerDied(f"the planner failed a batch ({answer})") if isinstance(answer, str) else None
                self._hand(future, answer, failure)
        except (EOFError, OSError, pickle.UnpicklingError, IndexError, ValueError):
            pass
        finally:
            with self._queue:
                self.alive = False
                waiting, self._waiting = list(self._waiting), collections.deque()
            for future in waiting:
                self._hand(future, None, PlannerDied("the planner process ended"))

    def _hand(self, future: asyncio.Future[Any], answer: Any, failure: BaseException | None) -> None:
        """Settle ``future`` on the event loop (from this object's threads); nothing if the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(_settle, future, answer, failure)
        except RuntimeError:  # the run's loop is closed: nobody waits for it any more
            pass

    def _stop(self) -> None:
        self.alive = False
        if self.process.poll() is None:
            self.process.kill()

    def close(self) -> None:
        """Close its input (it exits), and reap it; killed if it does not exit within 5 s."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._stop()
            self.process.wait()


def _settle(future: asyncio.Future[Any], answer: Any, failure: BaseException | None) -> None:
    if future.done():
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(answer)


class Planners:
    """Tokenize and plan batches of texts: in up to ``processes`` planner processes once the run has planned
    ``start_after`` tokens (and they are ready); before that, and with 0, in a thread of this process."""

    def __init__(self, tokenizer: Tokenizer, chunk_sizes: Sequence[int], processes: int, *,
                 start_after: int = PLANNERS_AFTER) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.chunk_sizes = list(chunk_sizes)
        self.processes = processes
        self.start_after = start_after
        self.planned_here = 0  # tokens planned in this process
        self._planners: list[_Planner] = []
        self._next = 0

    @property
    def _working(self) -> list[_Planner]:
        return [planner for planner in self._planners if planner.ready and planner.alive]

    @property
    def ahead(self) -> int:
        """Batches worth planning ahead: while this process stores a load (its event loop busy for a tenth
        of a second), planners must have work queued: two per planner; in a thread, one."""
        return 2 * len(self._working) + 1 if self._working else 1

    @property
    def scale(self) -> int:
        """How many read batches make one batch to plan: in a planner process, a batch must be worth the
        trip (pickling both ways, two thread wakeups)."""
        return 8 if self._working else 1

    def plan(self, texts: list[str]) -> Awaitable[list[Planned]]:
        """Start planning ``texts`` (at once, in a planner process); await the result."""
        if not self._planners and 0 < self.processes and self.start_after <= self.planned_here:
            self._start()
        working = self._working
        if not working:
            return self._here(texts)
        planner = working[self._next % len(working)]
        self._next += 1
        return self._collect(planner.submit(texts), texts)

    async def _here(self, texts: list[str]) -> list[Planned]:
        planned = await anyio.to_thread.run_sync(plan_texts, self.tokenizer, texts, self.chunk_sizes)
        self.planned_here += sum(tokens for tokens, _ in planned)
        return planned

    async def _collect(self, future: asyncio.Future[Any], texts: list[str]) -> list[Planned]:
        try:
            planned = await future
        except PlannerDied as failure:
            log.warning("a planner process failed; this batch is planned here (slower, nothing lost)", reason=str(failure))
            return await self._here(texts)
        return [_cut(tokens, names, self.chunk_sizes) for tokens, names in planned]

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._planners = [_Planner(self.tokenizer.name, self.chunk_sizes, loop) for _ in range(self.processes)]
        except OSError as error:  # cannot start a process here: plan in this one
            log.warning("cannot start planner processes; planning here", reason=str(error))
            self.processes = 0
        else:
            log.debug("planner processes starting", processes=self.processes)

    def close(self) -> None:
        for planner in self._planners:
            planner.close()
        self._planners = []
