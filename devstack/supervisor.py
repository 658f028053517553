"""Pure planning for `make run`: which servers to start, which services exist, the banner."""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from command_api.settings import CommandApiSettings
from projector.settings import ProjectorSettings
from realtime_fanout.settings import FanoutSettings
from servicekit.settings import EnvSettings, setting_of

REDIS_PORT = 6380
POSTGRES_PORT = 5433
POSTGRES_REPLICA_PORT = 5434
PG_REPLICA_SETTING = "PARLEY_RUN_PG_REPLICA"
DATABASE_NAME = "parley"
DATA_DIR = Path(".data")
BANNER_READY = "Parley dev stack is up"

FIRST_MESSAGE_HINT = (
    "export TOKEN=$(PARLEY_DEV_MODE=1 PARLEY_JWT_SECRET=$(cat .data/jwt-secret) "
    ".venv/bin/python -m command_api token alice)\n"
    '  curl -s -X POST localhost:8000/v1/conversations -H "Authorization: Bearer $TOKEN" '
    "-H 'Content-Type: application/json' "
    '-d \'{"conversation_id":"welcome","title":"Welcome","participants":["bob"]}\'; echo\n'
    "  curl -s -X POST localhost:8000/v1/conversations/alice:welcome/messages "
    "-H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' "
    '-d \'{"body":"Hello, Bob!"}\'; echo'
)


@dataclass(frozen=True)
class Service:
    """A runnable service module and the port it listens on (None if it serves none);
    `port_setting` names the environment variable that moves it."""

    name: str
    port: int | None = None
    port_setting: str | None = None


def _service(name: str, settings: type[EnvSettings], port_field: str) -> Service:
    """The service `name`, its port and the variable that moves it, as its settings declare them."""
    setting, port = setting_of(settings, port_field)
    return Service(name, port, setting)


SERVICES: tuple[Service, ...] = (
    _service("command_api", CommandApiSettings, "port"),
    _service("projector", ProjectorSettings, "http_port"),
    _service("realtime_fanout", FanoutSettings, "port"),
)


WORKERS_SETTING = "PARLEY_RUN_WORKERS"
MAX_WORKERS = 16


class BadRunSetting(ValueError):
    """A `make run` setting has a value it cannot use."""


def worker_count(env: Mapping[str, str]) -> int:
    """How many processes of each service `make run` starts: PARLEY_RUN_WORKERS (default 1).

    Raises:
        BadRunSetting: the setting is not a whole number from 1 to 16.
    """
    value = env.get(WORKERS_SETTING, "").strip() or "1"
    if not value.isdigit() or not 1 <= int(value) <= MAX_WORKERS:
        raise BadRunSetting(f"{WORKERS_SETTING} must be a number from 1 to {MAX_WORKERS}, got {value!r}")
    return int(value)


def worker_env(env: Mapping[str, str], workers: int) -> dict[str, str]:
    """The environment of every service when `workers` processes of each run: they share each service's
    port by SO_REUSEPORT (so the web page, the banner and a client's URL stay the same)."""
    return {**env, "PARLEY_HTTP_REUSE_PORT": "1"} if workers > 1 else dict(env)


def with_ports(services: list[Service], env: Mapping[str, str]) -> list[Service]:
    """`services` with each port taken from its setting in `env` when set."""
    resolved = []
    for service in services:
        value = env.get(service.port_setting or "")
        port = int(value) if value and value.isdigit() else service.port
        resolved.append(Service(service.name, port, service.port_setting))
    return resolved


@dataclass(frozen=True)
class ServerPlan:
    """Which embedded servers the supervisor must start (a URL in the env means: use it)."""

    start_redis: bool
    start_postgres: bool
    start_postgres_replica: bool = False


def plan_servers(env: Mapping[str, str]) -> ServerPlan:
    """Start Redis unless REDIS_URL is set, Postgres unless DATABASE_URL is set, and a streaming replica of
    that embedded Postgres for the query API with PARLEY_RUN_PG_REPLICA=1."""
    start_postgres = not env.get("DATABASE_URL")
    return ServerPlan(
        start_redis=not env.get("REDIS_URL"),
        start_postgres=start_postgres,
        start_postgres_replica=start_postgres and env.get(PG_REPLICA_SETTING, "").strip() in ("1", "true"),
    )


def available_services(
    find_spec: Callable[[str], Any] = importlib.util.find_spec,
    services: tuple[Service, ...] = SERVICES,
) -> list[Service]:
    """The services whose `<name>.__main__` module exists."""
    return [service for service in services if _has_main(find_spec, service.name)]


def _has_main(find_spec: Callable[[str], Any], name: str) -> bool:
    try:
        return find_spec(f"{name}.__main__") is not None
    except ModuleNotFoundError:
        return False


def resolve_jwt_secret(env: Mapping[str, str], path: Path) -> str:
    """PARLEY_JWT_SECRET from `env` if set, else the secret persisted at `path`."""
    return env.get("PARLEY_JWT_SECRET") or load_or_create_secret(path)


def load_or_create_secret(path: Path) -> str:
    """Return the secret stored at `path`, creating a random one (mode 0600) if absent."""
    if path.exists():
        existing = path.read_text().strip()
        if existing:
            return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


def child_env(
    base: Mapping[str, str],
    redis_url: str,
    database_url: str,
    jwt_secret: str,
    replica_url: str | None = None,
) -> dict[str, str]:
    """The environment every service gets: `base` plus the stack URLs and dev settings; the web page's
    origin is allowed (CORS, WebSocket) and told where the query API and the fanout listen; the query API
    reads `replica_url` when given."""
    env = dict(base)
    env["REDIS_URL"] = redis_url
    env["DATABASE_URL"] = database_url
    if replica_url:
        env.setdefault("PARLEY_QUERY_DATABASE_URLS", replica_url)
    env["PARLEY_DEV_MODE"] = "1"
    env["PARLEY_JWT_SECRET"] = jwt_secret
    ports = {s.name: s.port for s in with_ports(list(SERVICES), env)}
    page = f"http://127.0.0.1:{ports['command_api']}"
    env.setdefault("PARLEY_ALLOWED_ORIGINS", f"{page}, http://localhost:{ports['command_api']}")
    env.setdefault("PARLEY_WEB_QUERY_URL", f"http://127.0.0.1:{ports['projector']}")
    env.setdefault("PARLEY_WEB_FANOUT_URL", f"ws://127.0.0.1:{ports['realtime_fanout']}/v1/stream")
    return env


def banner(
    redis_url: str,
    database_url: str,
    services: list[Service],
    workers: int = 1,
    replica_url: str | None = None,
) -> str:
    """The startup banner: where everything listens and how to send a first message."""
    lines = [
        f"{BANNER_READY}",
        f"  redis      {redis_url}",
        f"  postgres   {database_url}",
        *([f"  replica    {replica_url} (the query API reads it)"] if replica_url else []),
    ]
    processes = f" ({workers} processes, one port)" if workers > 1 else ""
    for service in services:
        where = f"http://127.0.0.1:{service.port}" if service.port else "(no port)"
        lines.append(f"  {service.name:<16} {where}{processes}")
    if not services:
        lines.append("  (no service modules found yet)")
    page = next((s.port for s in services if s.name == "command_api"), None)
    if page is not None:
        lines += ["", f"Web chat page: http://127.0.0.1:{page}/"]
    lines += ["", "Try it:", f"  {FIRST_MESSAGE_HINT}", "", "Ctrl-C stops everything."]
    return "\n".join(lines)
