"""The embedded servers, the supervisor's planning, and `python -m devstack` end to end."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from devstack import pgadmin
from devstack.ports import LOOPBACK, free_port, is_listening, port_is_free, preferred_or_free_port
from devstack.process import child_pids, group_alive
from devstack.servers import PostgresServer, RedisServer
from devstack.supervisor import (
    BANNER_READY,
    FIRST_MESSAGE_HINT,
    SERVICES,
    BadRunSetting,
    Service,
    available_services,
    banner,
    child_env,
    plan_servers,
    resolve_jwt_secret,
    worker_count,
    worker_env,
)
from tests.apiclient import ApiClient


def test_free_port_is_bindable_and_preferred_falls_back() -> None:
    port = free_port()
    assert port_is_free(port)
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))
        sock.listen()
        assert not port_is_free(port)
        assert is_listening(port)
        assert preferred_or_free_port(port) != port


async def test_shared_redis_answers(redis_client: aioredis.Redis, log_namespace: str) -> None:
    await redis_client.set(f"{log_namespace}:k", b"v")
    assert await redis_client.get(f"{log_namespace}:k") == b"v"


def test_redis_kill9_then_restart_replays_aof(redis_proc: RedisServer) -> None:
    port, pid = redis_proc.port, redis_proc.pid
    assert pid is not None
    with redis.Redis.from_url(redis_proc.url) as client:
        client.xadd("log", {"n": "1"})
        client.set("k", "v")
    redis_proc.kill()
    assert not group_alive(pid)
    redis_proc.start()
    assert redis_proc.port == port
    with redis.Redis.from_url(redis_proc.url) as client:
        assert client.get("k") == b"v"
        assert client.xlen("log") == 1


def test_database_url_is_a_fresh_database(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    assert database_url.endswith("/" + row[0])


def test_postgres_restart_and_stop_leave_no_process(pg_root: Path) -> None:
    server = PostgresServer(pg_root / "pg", fast=True)
    with server:
        url = server.create_database("app")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
        server.stop()
        server.start()
        killed = server.pid
        assert killed is not None
        server.kill()
        assert not group_alive(killed)
        server.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (7,)
        last = server.pid
    assert last is not None
    assert not server.running
    assert not group_alive(last)
    assert not is_listening(server.port)


def test_plan_servers_uses_given_urls_and_starts_the_rest() -> None:
    given = {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "postgresql://x@127.0.0.1/db"}
    assert not plan_servers(given).start_redis
    assert not plan_servers(given).start_postgres
    assert plan_servers({}).start_redis
    assert plan_servers({}).start_postgres
    only_redis = plan_servers({"REDIS_URL": given["REDIS_URL"]})
    assert (only_redis.start_redis, only_redis.start_postgres) == (False, True)
    assert not plan_servers({}).start_postgres_replica
    assert plan_servers({"PARLEY_RUN_PG_REPLICA": "1"}).start_postgres_replica
    assert not plan_servers({**given, "PARLEY_RUN_PG_REPLICA": "1"}).start_postgres_replica  # not ours


def test_available_services_are_those_with_a_main_module() -> None:
    def find_spec(name: str) -> Any:
        return object() if name == "projector.__main__" else None

    assert [s.name for s in available_services(find_spec)] == ["projector"]
    assert set(available_services()) <= set(SERVICES)


def test_child_env_secret_and_banner(tmp_path: Path) -> None:
    secret_file = tmp_path / ".data" / "jwt-secret"
    secret = resolve_jwt_secret({}, secret_file)
    assert resolve_jwt_secret({}, secret_file) == secret
    assert resolve_jwt_secret({"PARLEY_JWT_SECRET": "s"}, secret_file) == "s"
    env = child_env({"PATH": "/bin"}, "redis://r", "postgresql://p", secret)
    assert env["PARLEY_DEV_MODE"] == "1"
    assert (env["REDIS_URL"], env["PARLEY_JWT_SECRET"]) == ("redis://r", secret)
    text = banner("redis://r", "postgresql://p", [Service("command_api", 8000)])
    assert BANNER_READY in text and FIRST_MESSAGE_HINT in text and ":8000" in text


def _free_service_ports() -> dict[str, str]:
    return {s.port_setting: str(free_port()) for s in SERVICES if s.port_setting}


def _run_devstack_until_banner(
    cwd: Path, env: Mapping[str, str], while_up: Callable[[str], None] | None = None
) -> tuple[int, str, list[int]]:
    """Run `python -m devstack` until its banner (and `while_up(output)` returns), then SIGINT it."""
    out = cwd / "devstack.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devstack"], cwd=cwd, env=dict(env), stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + 30
        while BANNER_READY not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.1)
        children = child_pids(proc.pid)
        if while_up is not None:
            while_up(out.read_text(errors="replace"))
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, out.read_text(errors="replace"), children


@pytest.mark.skipif(not available_services(), reason="no service module has a __main__ yet")
def test_devstack_runs_services_and_stops_them_on_sigint(
    tmp_path: Path, redis_server_url: str, database_url: str
) -> None:
    env = {**os.environ, "REDIS_URL": redis_server_url, "DATABASE_URL": database_url, **_free_service_ports()}
    code, output, children = _run_devstack_until_banner(tmp_path, env)
    assert code == 0, output
    assert len(children) == len(available_services())
    assert not [pid for pid in children if group_alive(pid)]


def test_run_workers_is_how_many_processes_of_each_service_share_its_port() -> None:
    assert worker_count({}) == 1 and worker_count({"PARLEY_RUN_WORKERS": "3"}) == 3
    for bad in ("0", "x", "17", "-1"):
        with pytest.raises(BadRunSetting, match="PARLEY_RUN_WORKERS"):
            worker_count({"PARLEY_RUN_WORKERS": bad})
    assert "PARLEY_HTTP_REUSE_PORT" not in worker_env({}, 1)
    assert worker_env({"A": "b"}, 2) == {"A": "b", "PARLEY_HTTP_REUSE_PORT": "1"}


@pytest.mark.skipif(not available_services(), reason="no service module has a __main__ yet")
def test_devstack_runs_two_processes_of_each_service(
    tmp_path: Path, redis_server_url: str, database_url: str
) -> None:
    env = {**os.environ, "REDIS_URL": redis_server_url, "DATABASE_URL": database_url, **_free_service_ports(),
           "PARLEY_RUN_WORKERS": "2"}  # fmt: skip
    code, output, children = _run_devstack_until_banner(tmp_path, env)
    assert code == 0, output
    assert len(children) == 2 * len(available_services())
    assert "(2 processes, one port)" in output
    assert not [pid for pid in children if group_alive(pid)]


def test_devstack_runs_a_postgres_replica_the_query_api_reads(pg_root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    ports = _free_service_ports()
    env.update(ports, PARLEY_RUN_PG_REPLICA="1")

    def replica_serving(_output: str) -> None:
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{ports['PARLEY_PROJECTOR_HTTP_PORT']}/readyz"
        while True:
            with contextlib.suppress(httpx.HTTPError):
                details = httpx.get(url, timeout=2).json().get("details", {})
                if details.get("replicas", {}).get("replica-0", {}).get("serving"):
                    return
            assert time.monotonic() < deadline, details
            time.sleep(0.2)

    code, output, children = _run_devstack_until_banner(pg_root, env, replica_serving)
    assert code == 0, output
    assert "replica    postgresql://" in output and "(the query API reads it)" in output
    assert (pg_root / ".data" / "postgres-replica" / "standby.signal").is_file()
    assert not [pid for pid in children if group_alive(pid)]


def test_devstack_starts_and_stops_its_own_servers(pg_root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(_free_service_ports())
    code, output, children = _run_devstack_until_banner(pg_root, env)
    assert code == 0, output
    assert len(children) >= 2
    assert not [pid for pid in children if group_alive(pid)]
    assert (pg_root / ".data" / "jwt-secret").is_file()
    assert (pg_root / ".data" / "postgres" / "PG_VERSION").is_file()
    postgres_url = next(line.split()[-1] for line in output.splitlines() if "postgres " in line)
    assert postgres_url.endswith("/parley")
    assert pgadmin.with_database(postgres_url, "x").endswith("/x")


async def test_the_first_message_hint_is_accepted_and_matches_the_readme(api: ApiClient) -> None:
    """The two curls `make run` prints (and the README's quick start shows) work as printed."""
    requests = re.findall(r"POST localhost:8000(\S+) .*?-d '(\{.*?\})'", FIRST_MESSAGE_HINT)
    assert len(requests) == 2
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for path, body in requests:
        assert f"localhost:8000{path} " in readme and f"-d '{body}'" in readme
        answer = await api.post("alice", path, json.loads(body))
        assert answer.status_code == 202, answer.text
