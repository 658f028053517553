"""compose.yaml and the Dockerfile stay true to the code: real entry points, real settings, one image."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SETTING_DIRS = ("events", "command_api", "projector", "realtime_fanout", "servicekit", "devstack")
CHECKED_VARIABLE = re.compile(r"^(PARLEY_[A-Z0-9_]+|REDIS_URL|DATABASE_URL)$")
ENV_CALL = re.compile(
    r"(?:\bsetting|env\.(?:str|int|float|bool|choice|csv|optional_str|raw))\("
    r"\s*(?:\"([A-Z0-9_]+)\"|([A-Z_][A-Z0-9_]*)\b)"
)
CONSTANT = re.compile(r"^([A-Z_][A-Z0-9_]*)\s*(?::\s*[^=]+)?=\s*\"([A-Z0-9_]+)\"\s*$", re.MULTILINE)


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


@cache
def project_packages() -> frozenset[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return frozenset(pattern.rstrip("*") for pattern in include)


@cache
def setting_keys() -> frozenset[str]:
    """Every key the sources declare (`setting(...)`) or read through `Env`: literal keys, and module
    constants passed by name."""
    keys: set[str] = set()
    for directory in SETTING_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            source = path.read_text()
            constants = dict(CONSTANT.findall(source))
            for literal, name in ENV_CALL.findall(source):
                if literal:
                    keys.add(literal)
                elif name in constants:
                    keys.add(constants[name])
    return frozenset(keys)


def module_of(service: dict[str, Any]) -> str | None:
    """X for a `python -m X` command (list or string form), else None."""
    command = service.get("command")
    if command is None:
        return None
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if len(argv) == 3 and argv[0] == "python" and argv[1] == "-m":
        return argv[2]
    return None


def has_main(package: str) -> bool:
    return importlib.util.find_spec(f"{package}.__main__") is not None


def app_services(profile: str | None = None) -> dict[str, dict[str, Any]]:
    """The services built from the project's Dockerfile: the default stack's, or a profile's."""
    return {
        name: svc for name, svc in compose()["services"].items()
        if "build" in svc and (profile in svc.get("profiles", ()) if profile else "profiles" not in svc)
    }  # fmt: skip


APP_SERVICES = ("command_api", "projector", "realtime_fanout")
CLUSTER_SERVICES = {"cluster-command-api": "command_api", "cluster-projector": "projector",
                    "cluster-fanout": "realtime_fanout"}  # fmt: skip


def test_setting_key_collection_finds_literal_and_constant_keys() -> None:
    keys = setting_keys()
    assert {"REDIS_URL", "PARLEY_PARTITIONS", "PARLEY_API_HOST"} <= keys  # literals
    assert {"PARLEY_JWT_SECRET", "PARLEY_DEV_MODE"} <= keys  # module constants (servicekit.auth_settings)


def test_the_app_services_share_one_image_built_by_the_dockerfile() -> None:
    services = app_services()
    assert set(services) == set(APP_SERVICES)
    assert {svc["build"] for svc in services.values()} == {"."}
    assert len({svc.get("image") for svc in services.values()}) == 1
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", dockerfile, re.MULTILINE)
    assert re.search(r"^USER (?!root\b|0\b)\S+", dockerfile, re.MULTILINE)
    assert 'CMD ["python", "-m", "command_api"]' in dockerfile
    assert "pip install ." in dockerfile and "[dev]" not in dockerfile


def test_redis_is_durable_and_postgres_has_the_parley_database() -> None:
    services = compose()["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly yes" in redis_command and "--appendfsync always" in redis_command
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "parley"


def test_every_app_service_shares_the_log_settings() -> None:
    envs = [svc["environment"] for svc in app_services().values()]
    for key in ("REDIS_URL", "PARLEY_PARTITIONS", "PARLEY_JWT_SECRET"):
        assert len({env.get(key) for env in envs}) == 1, f"{key} differs between services"


@pytest.mark.parametrize(
    ("service", "port"), [("command_api", 8000), ("realtime_fanout", 8001), ("projector", 8002)]
)
def test_service_publishes_its_port(service: str, port: int) -> None:
    published = [str(p) for p in compose()["services"][service].get("ports", [])]
    assert any(p.endswith(f":{port}:{port}") or p == f"{port}:{port}" for p in published), published


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_command_is_a_real_entry_point(service: str) -> None:
    module = module_of(compose()["services"][service])
    assert module in project_packages(), f"{service}: command is not `python -m <project package>`"
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().is_relative_to(ROOT / module), (
        f"{module} is not imported from the repo"
    )
    if not has_main(module):
        pytest.skip(f"{module}/__main__.py does not exist yet")
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("service", sorted(compose()["services"]))
def test_every_variable_compose_sets_is_a_real_setting(service: str) -> None:
    svc = compose()["services"][service]
    environment = svc.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    unknown = sorted(k for k in environment if CHECKED_VARIABLE.match(k) and k not in setting_keys())
    module = module_of(svc)
    if unknown and module is not None and not has_main(module):
        pytest.skip(f"{module} is not written yet; its settings {unknown} cannot be checked")
    assert unknown == [], f"{service} sets variables no code reads: {unknown}"


def test_the_cluster_profile_runs_two_of_each_service_on_a_redis_cluster_and_a_postgres_replica() -> None:
    services = compose()["services"]
    assert {name: module_of(svc) for name, svc in app_services("cluster").items()} == CLUSTER_SERVICES
    for name, module in CLUSTER_SERVICES.items():
        svc, default = services[name], services[module]
        assert svc["deploy"]["replicas"] == 2 and svc["image"] == default["image"]
        assert svc["environment"]["PARLEY_REDIS_CLUSTER"] == "1"
        assert svc["environment"]["REDIS_URL"].startswith("redis://redis-node-")
        assert svc["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
        (published,) = svc["ports"]
        _host, host_ports, container_port = published.split(":")  # 127.0.0.1:LOW-HIGH:PORT, one each
        low, high = (int(p) for p in host_ports.split("-"))
        (default_published,) = default["ports"]
        assert high - low + 1 == 2 and container_port == default_published.split(":")[-1]
    nodes = [svc for name, svc in services.items() if name.startswith("redis-node-")]
    assert len(nodes) == 6 and all("--cluster-enabled yes" in " ".join(n["command"]) for n in nodes)
    assert all("--appendfsync always" in " ".join(n["command"]) for n in nodes)
    assert "--cluster-replicas 1" in " ".join(services["redis-cluster-init"]["command"])
    replica = services["postgres-replica"]
    assert "pg_basebackup" in " ".join(replica["command"]) and " -R " in " ".join(replica["command"])
    env = services["cluster-projector"]["environment"]
    assert "@postgres-replica:" in env["PARLEY_QUERY_DATABASE_URLS"] and "@postgres:" in env["DATABASE_URL"]
    assert "REPLICATION" in compose()["configs"]["postgres-replication"]["content"]
