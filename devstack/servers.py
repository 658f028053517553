"""Real Redis and Postgres servers run as child processes we own (never daemonized)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from devstack import pgadmin
from devstack.binaries import postgres_bindir, redis_server_binary
from devstack.child import ChildServer, ServerStartError
from devstack.pguser import RunAs, give_dir, make_traversable, pg_run_as
from devstack.ports import LOOPBACK

_MAX_SOCKET_DIR_LEN = 90


class RedisServer(ChildServer):
    """redis-server with AOF persistence in `data_dir`, bound to 127.0.0.1:`port`."""

    name = "redis-server"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendfsync: str = "always",
        *,
        die_with_parent: bool = False,
        binary: Path | None = None,
    ) -> None:
        super().__init__(data_dir, port, die_with_parent)
        self.appendfsync = appendfsync
        self.binary = binary or redis_server_binary()

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0"""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(self.binary),
            "--bind",
            LOOPBACK,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]

    def _probe(self) -> bool:
        """True once this server (its pid, not another that took the port first) answers PING."""
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\nINFO server\r\n")
                data = b""
                for _ in range(100):  # bounded: the INFO reply is about 1 KiB
                    if b"process_id:" in data and data.endswith(b"\r\n\r\n"):
                        break
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(b"+PONG") and f"process_id:{self.pid}\r\n".encode() in data
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        self.start()
        return self


class PostgresServer(ChildServer):
    """A Postgres cluster in `data_dir` (initdb on first start) on 127.0.0.1:`port`, trust auth."""

    name = "postgres"
    ready_timeout = 20.0
    stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        fast: bool = False,
        settings: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """`fast` trades durability for speed (tests); `settings` are extra `-c name=value` options."""
        super().__init__(data_dir, port, die_with_parent)
        self.fast = fast
        self.settings = dict(settings or {})
        self._run_as = RunAs()
        self._socket_dir: Path | None = None

    @property
    def url(self) -> str:
        """postgresql://postgres@127.0.0.1:PORT/postgres"""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """Create database `name` on this server; return its URL."""
        return pgadmin.create_database(self.url, name, exist_ok=exist_ok)

    def _popen_kwargs(self) -> dict[str, Any]:
        return {
            "user": self._run_as.uid,
            "group": self._run_as.gid,
            "extra_groups": self._run_as.extra_groups,
        }

    def _prepare(self) -> None:
        self._run_as = pg_run_as()
        bindir = postgres_bindir()
        if self._run_as.uid is not None:
            make_traversable(bindir)
        give_dir(self.data_dir, self._run_as)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bindir)
        self._socket_dir = self._make_socket_dir()

    def _initdb(self, bindir: Path) -> None:
        cmd = [
            str(bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
        ]
        if self.fast:
            cmd.append("--no-sync")
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False, **self._popen_kwargs()
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ServerStartError(f"initdb failed ({result.returncode}):\n{output[-3000:]}")

    def _make_socket_dir(self) -> Path:
        if len(str(self.data_dir)) <= _MAX_SOCKET_DIR_LEN:
            return self.data_dir
        socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))
        give_dir(socket_dir, self._run_as)
        return socket_dir

    def _command(self) -> list[str]:
        assert self._socket_dir is not None
        cmd = [
            str(postgres_bindir() / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            LOOPBACK,
            "-p",
            str(self.port),
            "-k",
            str(self._socket_dir),
            "-c",
            "max_connections=200",
        ]
        if self.fast:
            for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                cmd += ["-c", setting]
        for name, value in self.settings.items():
            cmd += ["-c", f"{name}={value}"]
        return cmd

    def _probe(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _after_stop(self) -> None:
        if self._socket_dir is not None and self._socket_dir != self.data_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self._socket_dir = None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self


REPLICATION_ROLE = "replicator"


class PostgresStandby(PostgresServer):
    """A hot standby streaming from `primary` on its own port: on first start, `pg_basebackup -R` copies
    the primary as the `REPLICATION_ROLE` role (created if missing; initdb's pg_hba trusts replication
    from loopback), and the copy starts in recovery, read-only, replaying the primary's WAL."""

    name = "postgres-standby"

    def __init__(
        self, primary: PostgresServer, data_dir: Path, port: int | None = None, **options: Any
    ) -> None:
        """`options` as `PostgresServer`'s."""
        super().__init__(data_dir, port, **options)
        self.primary = primary

    def _prepare(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self._basebackup()
        # The primary as it listens now (a restarted `make run` may have given it another port); the
        # command line outranks what -R wrote into postgresql.auto.conf.
        self.settings["primary_conninfo"] = (
            f"host={LOOPBACK} port={self.primary.port} user={REPLICATION_ROLE} application_name={self.name}"
        )
        super()._prepare()

    def _basebackup(self) -> None:
        run_as = pg_run_as()
        give_dir(self.data_dir, run_as)
        with psycopg.connect(self.primary.url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (REPLICATION_ROLE,)).fetchone()
            if exists is None:
                conn.execute(f"CREATE ROLE {REPLICATION_ROLE} WITH REPLICATION LOGIN")
        cmd = [
            str(postgres_bindir() / "pg_basebackup"), "-h", LOOPBACK, "-p", str(self.primary.port),
            "-U", REPLICATION_ROLE, "-D", str(self.data_dir), "-R", "-X", "stream", "-c", "fast",
        ]  # fmt: skip
        if self.fast:
            cmd.append("--no-sync")
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=120,
            user=run_as.uid, group=run_as.gid, extra_groups=run_as.extra_groups,
        )  # fmt: skip
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ServerStartError(f"pg_basebackup failed ({result.returncode}):\n{output[-3000:]}")

    def __enter__(self) -> PostgresStandby:
        self.start()
        return self
