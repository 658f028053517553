"""The servers a benchmark measures, as child processes: started, awaited until ready, always stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from devstack.ports import is_listening


def _ready(port: int, path: str | None) -> bool:
    if not is_listening(port):
        return False
    if path is None:
        return True
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def server(
    module_args: list[str],
    port: int,
    env: Mapping[str, str] | None = None,
    ready_path: str | None = "/readyz",
    log_path: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m <module_args>` until it listens on `port` (and `ready_path` answers 200, unless None);
    terminated (then killed after 15 s) when the block ends. Its stderr is appended to `log_path` if given.

    Raises:
        RuntimeError: the process exited, or was not ready within 30 s.
    """
    with open(log_path, "ab") if log_path is not None else open(os.devnull, "wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", *module_args], env=None if env is None else dict(env),
            stdout=subprocess.DEVNULL, stderr=errors,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _ready(port, ready_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{module_args[0]} did not become ready (exit {proc.poll()})")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
