"""Command-line tools the tests run: Prometheus's server and ``promtool``, hadolint, a headless Chromium.

A tool is taken from beside the running Python or from PATH. Prometheus's two binaries and Chromium, when
missing, are obtained once from Debian's archive (the packages ``prometheus`` and ``chromium``, with what
Chromium needs that the machine lacks) into a per-user cache: ``apt-get download`` with a private package list,
then ``dpkg-deb -x``. That needs neither root nor installing or starting anything, so the README's test command
works on a fresh Debian machine as it is written.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ingestd-tests"
PROMETHEUS_TOOLS = ("prometheus", "promtool")


def _works(path: str | None, env: dict[str, str] | None = None) -> bool:
    # (a pyenv shim of an uninstalled tool is found, but does not run)
    return path is not None and subprocess.run([path, "--version"], check=False, capture_output=True, timeout=60,
                                               env=env).returncode == 0  # fmt: skip


def tool(name: str, how: str) -> str:
    """The path of a command-line tool, or a failed test that says how to install it (never a skip)."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if not _works(found) and name in PROMETHEUS_TOOLS:
        root = _from_debian("prometheus", with_dependencies=False)
        found = str(root / "usr" / "bin" / name) if root is not None else None
    if not _works(found):
        pytest.fail(f"`{name}` is not installed and could not be obtained, so this cannot be tested: {how}", pytrace=False)
    return str(found)


def prometheus_tool(name: str) -> str:
    return tool(name, "apt-get install prometheus (Debian's package has both prometheus and promtool)")


def chromium() -> tuple[str, dict[str, str]]:
    """A Chromium that runs headless, and the environment to run it in (the libraries unpacked beside it)."""
    env = dict(os.environ)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if _works(found):
            return str(found), env
    root = _from_debian("chromium", with_dependencies=True)
    if root is not None:
        # every folder of the unpacked libraries (some are found by an rpath into the system's own /usr/lib)
        folders = sorted({str(library.parent) for library in root.rglob("*.so*") if library.is_file()})
        env["LD_LIBRARY_PATH"] = ":".join(folders + [env.get("LD_LIBRARY_PATH", "")])
        binary = root / "usr" / "lib" / "chromium" / "chromium"
        if _works(str(binary), env):
            return str(binary), env
    pytest.fail("Chromium is not installed and could not be obtained, so the HTML report cannot be checked in a "
                "browser: apt-get install chromium", pytrace=False)  # fmt: skip


def _from_debian(package: str, *, with_dependencies: bool) -> Path | None:
    """Debian's ``package`` unpacked into ``CACHE/<package>/root`` (once, whichever test process asks first), with
    the packages it needs that this machine lacks when ``with_dependencies``; the root, or None."""
    cache = CACHE / package
    root = cache / "root"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist's workers ask at the same time
        if (cache / "root.complete").is_file():
            return root
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            return None
        apt = ["apt-get", "-qq", f"-o=Dir::State::Lists={cache / 'lists'}", f"-o=Dir::Cache={cache / 'apt'}",
               "-o=Debug::NoLocking=1"]  # fmt: skip
        if os.geteuid() == 0:
            apt.append("-o=APT::Sandbox::User=root")  # the _apt user could not write into this cache
        for folder in (cache / "lists" / "partial", cache / "apt" / "archives" / "partial"):
            folder.mkdir(parents=True, exist_ok=True)
        for old in cache.glob("*.deb"):
            old.unlink()
        if subprocess.run(apt + ["update"], cwd=cache, check=False, capture_output=True, timeout=600).returncode != 0:
            return None
        packages = [package]
        if with_dependencies:
            # What installing it would add to this machine: the simulation reads the system's dpkg status.
            plan = subprocess.run(apt + ["install", "--simulate", "--no-install-recommends", package], cwd=cache,
                                  check=False, capture_output=True, text=True, timeout=600)  # fmt: skip
            packages = [line.split()[1] for line in plan.stdout.splitlines() if line.startswith("Inst ")] or packages
        if subprocess.run(apt + ["download", *packages], cwd=cache, check=False, capture_output=True,
                          timeout=1200).returncode != 0:  # fmt: skip
            return None
        unpacked = cache / "root.partial"
        shutil.rmtree(unpacked, ignore_errors=True)
        for deb in sorted(cache.glob("*.deb")):
            if subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=False, capture_output=True,
                              timeout=300).returncode != 0:  # fmt: skip
                return None
            deb.unlink()
        shutil.rmtree(root, ignore_errors=True)
        unpacked.rename(root)
        (cache / "root.complete").touch()
        shutil.rmtree(cache / "lists", ignore_errors=True)  # package lists are needed only to download
        return root


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
