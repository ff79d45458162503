"""The project's own promises: README commands, CI script, CLI help."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    install_and_run, test_command = readme_commands()[:2]
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines
    assert "pytest" in test_command and "ingestd" in install_and_run


def test_cli_explains_itself() -> None:
    for command in ([], ["run"], ["kato"], ["kato", "serve"], ["kato", "demo"]):
        result = subprocess.run([sys.executable, "-m", "ingestd", *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout
    serve_help = subprocess.run([sys.executable, "-m", "ingestd", "kato", "serve", "--help"], capture_output=True,
                                text=True).stdout  # fmt: skip
    assert "--durability" in serve_help and "--data" in serve_help


def test_demo_learns_through_the_http_api() -> None:
    corpus = REPO.parent / "shared" / "corpus" / "tinyshakespeare.txt"
    result = subprocess.run([sys.executable, "-m", "ingestd", "kato", "demo", str(corpus), "--paragraphs", "40"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "40 paragraphs" in result.stdout and "node0 learns" in result.stdout


def test_demo_refuses_a_missing_corpus() -> None:
    result = subprocess.run([sys.executable, "-m", "ingestd", "kato", "demo", "/no/such/file.txt"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert "/no/such/file.txt" in result.stderr


def test_readme_first_command_runs_the_main_job(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The README's first command, minus the install, from a fresh directory."""
    install_and_run = readme_commands()[0]
    command = install_and_run.split("&&", 1)[1].strip().split()
    assert command[:2] == ["ingestd", "run"]
    corpus = str((REPO / command[2]).resolve())
    result = subprocess.run([sys.executable, "-m", "ingestd", "run", corpus, *command[3:], "--summary-json", "s.json"],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["samples"] == {"read": 7222, "learned": 7142, "filtered": 80, "failed": 0, "skipped": 0, "unfinished": 0}
    assert (tmp_path / "kato-data" / "kato.sqlite3").exists()
    assert "patterns learned, level 3" in result.stdout
