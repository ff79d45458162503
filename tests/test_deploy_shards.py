"""The sharding examples in deploy/ (a Slurm job array, a KubeRay RayJob), checked offline: the Slurm scripts run
for real, as Slurm would run them; the RayJob's command is parsed by ingestd's own CLI."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .conftest import REPO, paragraphs

SLURM = REPO / "deploy" / "slurm"
RAYJOB = REPO / "deploy" / "ray" / "rayjob.yaml"


def dump(data: Path) -> dict[tuple[str, str], tuple[Any, ...]]:
    with sqlite3.connect(data / "kato.sqlite3") as connection:
        rows = connection.execute("SELECT kb_id, name, frequency, pattern_data, metadata FROM patterns")
        return {(kb, name): (frequency, bytes(data), json.loads(metadata)) for kb, name, frequency, data, metadata in rows}


def test_the_slurm_array_and_its_merge_learn_what_one_process_learns(tmp_path: Path) -> None:
    for script in SLURM.glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
        headers = [line for line in script.read_text(encoding="utf-8").splitlines() if line.startswith("#SBATCH")]
        assert headers and all(len(line.split()) == 2 for line in headers)
    source = paragraphs(tmp_path / "corpus.txt", 600)
    options = ["--chunk-sizes", "4,4,4", "--metadata-levels", "1,2"]
    for index in range(3):  # as Slurm runs the array's tasks: the script, with its environment
        environment = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_TASK_COUNT": "3"}
        task = subprocess.run(["bash", str(SLURM / "ingestd-shards.sbatch"), str(source), str(tmp_path / "kb"), *options],
                              env=environment, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert task.returncode == 0, task.stderr[-2000:]
    merged = subprocess.run(["bash", str(SLURM / "ingestd-merge.sbatch"), str(tmp_path / "kb"), "3"], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-2000:]
    single = subprocess.run(["ingestd", "run", str(source), "--data-dir", str(tmp_path / "single"), "--no-progress",
                             *options], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    assert dump(tmp_path / "kb") == dump(tmp_path / "single")
    outside = subprocess.run(["bash", str(SLURM / "ingestd-shards.sbatch"), str(source), str(tmp_path / "x")],
                             env={key: value for key, value in os.environ.items() if not key.startswith("SLURM_")},
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert outside.returncode != 0 and "sbatch --array" in outside.stderr


def test_the_rayjob_runs_ingestd_s_sharded_command_on_shared_storage() -> None:
    import click
    import typer.main

    from ingestd.cli import app

    documents = list(yaml.safe_load_all(RAYJOB.read_text(encoding="utf-8")))
    job = next(document for document in documents if document["kind"] == "RayJob")
    claim = next(document for document in documents if document["kind"] == "PersistentVolumeClaim")
    assert job["apiVersion"] == "ray.io/v1" and "ReadWriteMany" in claim["spec"]["accessModes"]
    arguments = shlex.split(job["spec"]["entrypoint"])
    assert arguments[:2] == ["ingestd", "run"]
    command = typer.main.get_command(app)
    with command.make_context("ingestd", arguments[1:], resilient_parsing=False) as context:
        run = command.get_command(context, "run")
        assert run is not None
        parsed = run.make_context("run", arguments[2:], parent=context)  # every option exists and parses
    assert parsed.params["executor"] == "ray" and parsed.params["shards"] > 1
    data_dir = str(parsed.params["data"])
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:  # head and workers see the same volume at the same path, and the data directory is on it
        mounts = {mount["name"]: mount["mountPath"] for container in pod["containers"] for mount in container["volumeMounts"]}
        claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
        assert claims == {"shared": claim["metadata"]["name"]} and data_dir.startswith(mounts["shared"] + "/")
    assert isinstance(click, object)
