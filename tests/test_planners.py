"""Planner processes plan exactly what a thread plans, cost nothing but speed when they die, ignore the
Ctrl-C meant for the run, and never outlive it (kill -9 included)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from ingestd.planners import Planners, plan_texts
from ingestd.tokenize import load_tokenizer

from .conftest import CORPUS
from .golden import kb_dump, run_cli, samples_done

COMMON = ["--chunk-sizes", "8,8,8,8", "--metadata-levels", "2,3", "--no-progress", "--log-format", "json"]
NODES = [f"node{level}" for level in range(4)]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _planner_pids(pid: int) -> list[int]:
    pids = []
    for child in _children(pid):
        try:
            if b"ingestd._planning" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(child)
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        return b"State:\tZ" not in Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return False


def test_planners_plan_what_a_thread_plans_and_a_killed_one_costs_nothing(tmp_path: Path) -> None:
    tokenizer = load_tokenizer()
    paragraphs = CORPUS.read_text(encoding="utf-8").split("\n\n")
    batches = [paragraphs[start : start + 200] for start in range(0, 1200, 200)]
    expected = [plan_texts(tokenizer, batch, [8, 4, 2]) for batch in batches]

    async def scenario() -> tuple[list[object], list[int], list[dict[str, object]]]:
        planners = Planners(tokenizer, [8, 4, 2], 1, start_after=0)
        planned = []
        with structlog.testing.capture_logs() as logs:
            try:
                planned.append(await planners.plan(batches[0]))  # starts the planner; planned here meanwhile
                deadline = time.monotonic() + 120
                while not _planner_pids(os.getpid()):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                while planners.scale == 1:  # until it is ready (planned here meanwhile)
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                planned.append(await planners.plan(batches[1]))
                planned.append(await planners.plan(batches[2]))
                pids = _planner_pids(os.getpid())
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                for batch in batches[3:]:
                    planned.append(await planners.plan(batch))
            finally:
                planners.close()
        return planned, pids, logs

    planned, pids, logs = asyncio.run(scenario())
    assert len(pids) == 1
    assert planned == expected  # chunks and names, level by level, whichever process planned them
    assert any(entry["event"].startswith("a planner process failed") for entry in logs)
    assert not _planner_pids(os.getpid())


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tinyshakespeare twice: past the tokens after which planner processes start."""
    path = tmp_path_factory.mktemp("planners") / "twice.txt"
    path.write_text("\n\n".join(CORPUS.read_text(encoding="utf-8").split("\n\n") * 2), encoding="utf-8")
    return path


def _start(corpus: Path, data: Path, summary: Path) -> subprocess.Popen[str]:
    # A session of its own: a signal to its process group is what a Ctrl-C on a terminal sends.
    return subprocess.Popen([sys.executable, "-m", "ingestd", "run", str(corpus), *COMMON, "--data", str(data),
                             "--planners", "1", "--summary-json", str(summary)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _wait_for_planners(process: subprocess.Popen[str]) -> list[int]:
    deadline = time.monotonic() + 120
    while not (pids := _planner_pids(process.pid)):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before planners started"
        time.sleep(0.01)
    return pids


def test_ctrl_c_to_the_process_group_drains_the_run_and_its_planners_without_a_traceback(long_corpus: Path,
                                                                                          tmp_path: Path) -> None:  # fmt: skip
    data, summary = tmp_path / "kb", tmp_path / "summary.json"
    process = _start(long_corpus, data, summary)
    planners = _wait_for_planners(process)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    stopped = json.loads(summary.read_text())
    assert stopped["stopped_early"] is True, (stopped["samples"], stderr[-2000:])
    run_dir = data / "runs" / _run_id(data)
    assert stopped["samples"]["learned"] == samples_done(run_dir) > 0
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in planners):
        assert time.monotonic() < deadline, "a planner outlived its run"
        time.sleep(0.05)
    resumed = run_cli(str(long_corpus), *COMMON[:-2], "--data", str(data), "--run-dir", str(run_dir))
    clean = tmp_path / "clean"
    run_cli(str(long_corpus), *COMMON[:-2], "--data", str(clean), "--planners", "0")
    assert resumed["samples"]["skipped"] == stopped["samples"]["learned"]
    assert kb_dump(data / "kato.sqlite3", NODES) == kb_dump(clean / "kato.sqlite3", NODES)


def test_planners_end_when_their_run_is_killed(long_corpus: Path, tmp_path: Path) -> None:
    process = _start(long_corpus, tmp_path / "kb", tmp_path / "summary.json")
    planners = _wait_for_planners(process)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in planners):
        assert time.monotonic() < deadline, "a planner outlived a kill -9 of its run"
        time.sleep(0.05)


def _run_id(data: Path) -> str:
    (run,) = [path.name for path in (data / "runs").iterdir()]
    return run
