"""Lifecycle of one server child process: start and wait ready, stop, kill -9, restart."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from devstack.ports import LOOPBACK, free_port
from devstack.process import die_with_parent, kill_group, log_tail, stop_group


class ServerStartError(RuntimeError):
    """A server process exited or did not become ready in time."""


class ChildServer:
    """Start/stop/kill/restart lifecycle shared by the servers; subclasses supply the details."""

    name = "server"
    ready_timeout = 10.0
    stop_signal = signal.SIGTERM
    stop_timeout = 10.0

    def __init__(self, data_dir: Path, port: int | None, die_with_parent: bool) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port if port is not None else free_port()
        self._die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """PID of the running server process, if any."""
        return self._proc.pid if self._proc is not None else None

    def _prepare(self) -> None:
        """Create on-disk state before each launch."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _probe(self) -> bool:
        raise NotImplementedError

    def _after_stop(self) -> None:
        """Clean up per-launch state after the process is gone."""

    def start(self) -> None:
        """Launch the server and block until it answers; no-op if already running."""
        if self.running:
            return
        self._prepare()
        with self.log_path.open("ab") as log:
            self._proc = self._spawn(log)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(self.stop_signal) if self._die_with_parent else None,
            **self._popen_kwargs(),
        )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while not self._probe():
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(self._failure(f"exited with code {code}"))
            if time.monotonic() >= deadline:
                raise ServerStartError(self._failure(f"not ready after {self.ready_timeout:.0f}s"))
            time.sleep(0.05)

    def _failure(self, what: str) -> str:
        return f"{self.name} on {LOOPBACK}:{self.port} {what}; log tail:\n{log_tail(self.log_path)}"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Graceful shutdown, SIGKILL after the timeout; leaves no process of ours behind."""
        if self._proc is not None:
            stop_group(self._proc, self.stop_signal, self.stop_timeout)
            self._proc = None
        self._after_stop()

    def kill(self) -> None:
        """SIGKILL the server (crash simulation) and wait until it is gone."""
        if self._proc is not None:
            kill_group(self._proc)
            self._proc = None
        self._after_stop()

    def __enter__(self) -> ChildServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
