"""The process layer of `python -m devstack`: start servers and services, supervise, tear down."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from devstack import pgadmin
from devstack.ports import is_listening, preferred_or_free_port
from devstack.process import die_with_parent, stop_group
from devstack.servers import PostgresServer, PostgresStandby, RedisServer
from devstack.supervisor import (
    DATA_DIR,
    DATABASE_NAME,
    POSTGRES_PORT,
    POSTGRES_REPLICA_PORT,
    REDIS_PORT,
    BadRunSetting,
    Service,
    available_services,
    banner,
    child_env,
    plan_servers,
    resolve_jwt_secret,
    with_ports,
    worker_count,
    worker_env,
)

SERVICE_STOP_TIMEOUT = 10.0
LISTEN_TIMEOUT = 15.0


class Shutdown(Exception):
    """Raised in the main thread when SIGINT or SIGTERM arrives."""


@dataclass
class RunningService:
    """A started service child process."""

    service: Service
    proc: subprocess.Popen[bytes]


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    raise Shutdown(signal.Signals(signum).name)


def _start_servers(stack: contextlib.ExitStack, env: Mapping[str, str]) -> tuple[str, str, str | None]:
    plan = plan_servers(env)
    redis_url = env.get("REDIS_URL", "")
    database_url = env.get("DATABASE_URL", "")
    replica_url = None
    if plan.start_redis:
        redis = RedisServer(
            DATA_DIR / "redis",
            preferred_or_free_port(REDIS_PORT),
            appendfsync=env.get("PARLEY_REDIS_APPENDFSYNC", "always"),
            die_with_parent=True,
        )
        stack.callback(redis.stop)
        redis.start()
        redis_url = redis.url
    if plan.start_postgres:
        postgres = PostgresServer(
            DATA_DIR / "postgres", preferred_or_free_port(POSTGRES_PORT), die_with_parent=True
        )
        stack.callback(postgres.stop)
        postgres.start()
        database_url = pgadmin.create_database(postgres.url, DATABASE_NAME, exist_ok=True)
        if plan.start_postgres_replica:
            port = preferred_or_free_port(POSTGRES_REPLICA_PORT)
            replica = PostgresStandby(postgres, DATA_DIR / "postgres-replica", port, die_with_parent=True)
            stack.callback(replica.stop)
            replica.start()
            replica_url = pgadmin.with_database(replica.url, DATABASE_NAME)
    return redis_url, database_url, replica_url


def _start_service(service: Service, env: Mapping[str, str]) -> RunningService:
    proc = subprocess.Popen(
        [sys.executable, "-m", service.name],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    return RunningService(service, proc)


def _stop_services(running: list[RunningService]) -> None:
    for child in running:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in running:
        stop_group(child.proc, signal.SIGTERM, SERVICE_STOP_TIMEOUT)


def _first_exited(running: list[RunningService]) -> RunningService | None:
    return next((child for child in running if child.proc.poll() is not None), None)


def _wait_listening(running: list[RunningService]) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    for child in running:
        port = child.service.port
        while port is not None and not is_listening(port) and _first_exited(running) is None:
            if time.monotonic() >= deadline:
                print(f"devstack: {child.service.name} not listening on :{port} yet", flush=True)
                return
            time.sleep(0.1)


def _supervise(running: list[RunningService]) -> int:
    while True:
        exited = _first_exited(running)
        if exited is not None:
            code = exited.proc.returncode
            print(f"devstack: {exited.service.name} exited with code {code}", file=sys.stderr)
            return 1
        time.sleep(0.2)


def main() -> int:
    """Run the dev stack until Ctrl-C/SIGTERM (exit 0) or a service dies (exit 1)."""
    signal.signal(signal.SIGINT, _raise_shutdown)
    signal.signal(signal.SIGTERM, _raise_shutdown)
    running: list[RunningService] = []
    with contextlib.ExitStack() as stack:
        try:
            workers = worker_count(os.environ)
            redis_url, database_url, replica_url = _start_servers(stack, os.environ)
            secret = resolve_jwt_secret(os.environ, DATA_DIR / "jwt-secret")
            env = worker_env(child_env(os.environ, redis_url, database_url, secret, replica_url), workers)
            stack.callback(_stop_services, running)
            services = with_ports(available_services(), env)
            for service in services:
                running.extend(_start_service(service, env) for _ in range(workers))
            _wait_listening(running)
            print(banner(redis_url, database_url, services, workers, replica_url), flush=True)
            if not running:
                signal.pause()
            return _supervise(running)
        except Shutdown as exc:
            print(f"devstack: {exc}, stopping", flush=True)
            return 0
        except BadRunSetting as exc:
            print(f"devstack: {exc}", file=sys.stderr)
            return 2
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 1
