"""Command-line tools the tests run: Prometheus's server and ``promtool``, hadolint.

A tool is taken from beside the running Python or from PATH. Prometheus's two binaries, when missing, are
obtained once from Debian's archive (the package ``prometheus``) into a per-user cache: ``apt-get download``
with a private package list, then ``dpkg-deb -x``. That needs neither root nor installing or starting anything,
so the README's test command works on a fresh Debian machine as it is written.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ingestd-tests" / "prometheus"
PROMETHEUS_TOOLS = ("prometheus", "promtool")


def _works(path: str | None) -> bool:
    # (a pyenv shim of an uninstalled tool is found, but does not run)
    return path is not None and subprocess.run([path, "--version"], check=False, capture_output=True,
                                               timeout=60).returncode == 0  # fmt: skip


def tool(name: str, how: str) -> str:
    """The path of a command-line tool, or a failed test that says how to install it (never a skip)."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if not _works(found) and name in PROMETHEUS_TOOLS:
        found = _from_debian(name)
    if not _works(found):
        pytest.fail(f"`{name}` is not installed and could not be obtained, so this cannot be tested: {how}", pytrace=False)
    return str(found)


def prometheus_tool(name: str) -> str:
    return tool(name, "apt-get install prometheus (Debian's package has both prometheus and promtool)")


def _from_debian(name: str) -> str | None:
    """``name`` from Debian's ``prometheus`` package, unpacked into CACHE (once, whichever test process asks first)."""
    binary = CACHE / "root" / "usr" / "bin" / name
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist's workers ask at the same time
        if binary.is_file():
            return str(binary)
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            return None
        apt = ["apt-get", "-qq", f"-o=Dir::State::Lists={CACHE / 'lists'}", f"-o=Dir::Cache={CACHE / 'apt'}",
               "-o=Debug::NoLocking=1"]  # fmt: skip
        if os.geteuid() == 0:
            apt.append("-o=APT::Sandbox::User=root")  # the _apt user could not write into this cache
        for folder in (CACHE / "lists" / "partial", CACHE / "apt" / "archives" / "partial"):
            folder.mkdir(parents=True, exist_ok=True)
        for package in CACHE.glob("*.deb"):
            package.unlink()
        steps = [apt + ["update"], apt + ["download", "prometheus"]]
        for step in steps:
            if subprocess.run(step, cwd=CACHE, check=False, capture_output=True, timeout=600).returncode != 0:
                return None
        package = next(CACHE.glob("prometheus_*.deb"), None)
        unpacked = CACHE / "root.partial"
        shutil.rmtree(unpacked, ignore_errors=True)
        if package is None or subprocess.run(["dpkg-deb", "-x", str(package), str(unpacked)], check=False,
                                             capture_output=True, timeout=300).returncode != 0:  # fmt: skip
            return None
        shutil.rmtree(CACHE / "root", ignore_errors=True)
        unpacked.rename(CACHE / "root")
        package.unlink()
        shutil.rmtree(CACHE / "lists", ignore_errors=True)  # 19 MB of package lists, needed only to download
        return str(binary) if binary.is_file() else None
