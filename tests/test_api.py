"""The Python API as a notebook uses it: option names checked, run() inside a running loop, interrupts, progress."""

from __future__ import annotations

import _thread
import asyncio
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from ingestd import Hierarchy, KnowledgeBase, run
from ingestd.api import UnknownOption, build_config, option_names
from ingestd.engine.rules import kb_id

from .conftest import CORPUS


def frequencies(data: Path, node: str) -> dict[str, int]:
    with sqlite3.connect(data / "kato.sqlite3") as connection:
        return dict(connection.execute("SELECT name, frequency FROM patterns WHERE kb_id = ?", (kb_id(node),)).fetchall())


@pytest.mark.parametrize(("options", "closest"), [
    ({"max_sample": 5}, "max_samples"), ({"kato": "http://127.0.0.1:9"}, "kato_url"), ({"data": "x"}, "data_dir"),
    ({"sourcelabel": "x"}, "source_label"), ({"chunksizes": [4]}, "chunk_sizes"), ({"wrokers": 2}, "workers"),
])  # fmt: skip
def test_a_misspelled_option_is_refused_naming_the_closest(tmp_path: Path, options: dict[str, Any], closest: str) -> None:
    with pytest.raises(UnknownOption, match=f"did you mean '{closest}'"):
        run(str(CORPUS), Hierarchy.from_chunk_sizes([8, 8]), data_dir=tmp_path / "kb", **options)
    assert not (tmp_path / "kb").exists()  # nothing was learned, nowhere


def test_option_names_are_the_cli_s(tmp_path: Path) -> None:
    names = option_names()
    for name in ("kato_url", "data_dir", "source_label", "max_sample_chars", "patience", "request_timeout", "chunk_sizes",
                 "metadata_levels", "node_ids", "run_id", "run_dir", "max_samples", "skip", "fresh", "workers"):
        assert name in names
    config = build_config(str(CORPUS), chunk_sizes=[4, 4], metadata_levels=[1], node_ids="nb-{level}", source_label="x",
                          max_sample_chars=500, patience=3, request_timeout=2, data_dir=tmp_path)  # fmt: skip
    assert config.hierarchy.node_ids() == ["nb-0", "nb-1"] and config.hierarchy.levels[1].capture_metadata
    assert (config.source.label, config.source.max_chars) == ("x", 500)
    assert (config.retry.patience, config.retry.request_timeout) == (3, 2)
    assert build_config(str(CORPUS), label="old").source.label == "old"  # the earlier spelling still works
    with pytest.raises(UnknownOption, match="not both"):
        build_config(str(CORPUS), Hierarchy.from_chunk_sizes([8]), chunk_sizes=[4])
    with pytest.raises(UnknownOption, match="not both"):
        build_config(str(CORPUS), label="a", source_label="b")


def test_run_inside_a_running_loop_learns_the_same(tmp_path: Path) -> None:
    plain = run(str(CORPUS), chunk_sizes=[8, 8], max_samples=400, data_dir=tmp_path / "plain")
    seen: list[int] = []

    async def cell() -> Any:  # a notebook cell: the loop is running while run() blocks in it
        return run(str(CORPUS), chunk_sizes=[8, 8], max_samples=400, data_dir=tmp_path / "notebook",
                   on_progress=lambda stats: seen.append(stats.samples_learned))  # fmt: skip

    loop = asyncio.new_event_loop()
    try:
        summary = loop.run_until_complete(cell())
    finally:
        loop.close()
    assert summary.stats.samples_learned == plain.stats.samples_learned == 400
    assert seen and seen[-1] == 400
    for node in ("node0", "node1"):
        assert frequencies(tmp_path / "notebook", node) == frequencies(tmp_path / "plain", node)


def test_an_interrupt_in_a_notebook_stops_the_run_and_it_resumes_exactly(tmp_path: Path) -> None:
    source = tmp_path / "big.txt"
    source.write_text((CORPUS.read_text(encoding="utf-8") + "\n\n") * 6, encoding="utf-8")
    data = tmp_path / "kb"

    async def cell() -> Any:
        threading.Timer(1.5, _thread.interrupt_main).start()  # Jupyter's interrupt: KeyboardInterrupt in this thread
        return run(str(source), chunk_sizes=[8, 8], data_dir=data, planners=0)

    loop = asyncio.new_event_loop()
    try:
        stopped = loop.run_until_complete(cell())
    finally:
        loop.close()
    assert stopped.stats.stopped_early and 0 < stopped.stats.samples_learned
    rest = run(str(source), chunk_sizes=[8, 8], data_dir=data)
    total = stopped.stats.samples_learned + rest.stats.samples_learned
    assert total == rest.stats.samples_read - rest.stats.samples_filtered
    learned = [a + b for a, b in zip(stopped.stats.patterns_per_level, rest.stats.patterns_per_level, strict=True)]
    with KnowledgeBase(data) as kb:
        assert kb.stats()["total_frequency"].tolist() == learned  # every learn once: none lost, none twice
    # learned at once into another store: the same knowledge base
    run(str(source), chunk_sizes=[8, 8], data_dir=tmp_path / "once")
    assert frequencies(data, "node1") == frequencies(tmp_path / "once", "node1")


def test_progress_bar_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(str(CORPUS), chunk_sizes=[8], max_samples=200, data_dir=tmp_path / "quiet")
    assert "learning" not in capsys.readouterr().err  # no bar in a script unless asked
    run(str(CORPUS), chunk_sizes=[8], max_samples=200, data_dir=tmp_path / "bar", progress=True)
    err = capsys.readouterr().err
    assert "learning" in err and re.search(r"(\d+)/\1 \[", err)  # full at the end: every sample read


def test_one_name_per_option_in_hierarchy_files_too(tmp_path: Path) -> None:
    import subprocess
    import sys

    from ingestd.hierarchy import Hierarchy as Loaded

    good = tmp_path / "h.toml"
    good.write_text('node_ids = "file-{level}"\n[[levels]]\nchunk_size = 4\n[[levels]]\nchunk_size = 4\n', encoding="utf-8")
    assert Loaded.from_file(good).node_ids() == ["file-0", "file-1"]
    old = tmp_path / "old.yaml"
    old.write_text("node_id_template: 'old-{level}'\nlevels:\n  - chunk_size: 4\n", encoding="utf-8")
    assert Loaded.from_file(old).node_ids() == ["old-0"]  # files written with the earlier name still load
    result = subprocess.run([sys.executable, "-m", "ingestd", "run", str(CORPUS), "--hierarchy", str(good), "--data-dir",
                             str(tmp_path / "kb"), "--max-samples", "20", "--no-progress"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert set(frequencies(tmp_path / "kb", "file-1")) and not (tmp_path / "kato-data").exists()
    for text, closest in (('node_idz = "x-{level}"\n[[levels]]\nchunk_size = 4\n', "node_ids"),
                          ("[[levels]]\nchunk_size = 4\ncapture_metadat = true\n", "capture_metadata")):
        typo = tmp_path / "typo.toml"
        typo.write_text(text, encoding="utf-8")
        refused = subprocess.run([sys.executable, "-m", "ingestd", "run", str(CORPUS), "--hierarchy", str(typo)],
                                 capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
        assert refused.returncode == 2 and f"did you mean {closest!r}?" in refused.stderr
        assert "Traceback" not in refused.stderr and not (tmp_path / "kato-data").exists()
