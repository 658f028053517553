"""Child-process helpers: own process groups, bounded stops, liveness and log tails."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """Return a preexec_fn that makes the child receive `sig` when its parent thread dies."""

    libc = ctypes.CDLL(None, use_errno=True)

    def _preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return _preexec


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """Yield (pid, fields after the command name) for each process in /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat.rsplit(")", 1)[-1].split()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its descendants, reaped ones included."""
    stats = {p: f for p, f in _proc_stats() if len(f) > 14}
    children: dict[int, list[int]] = {}
    for p, f in stats.items():
        children.setdefault(int(f[1]), []).append(p)
    ticks, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            ticks += sum(int(v) for v in stats[p][11:15])
        todo.extend(children.get(p, ()))
    return ticks / os.sysconf("SC_CLK_TCK")


def group_alive(pgid: int) -> bool:
    """True if any non-zombie process belongs to process group `pgid` (Linux /proc)."""
    return any(f[0] != "Z" and int(f[2]) == pgid for _, f in _proc_stats() if len(f) > 2)


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group led by `proc` (it must be a session/group leader)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until group `pgid` has no live process; False on timeout."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the whole group led by `proc`, reap the leader and wait for the group to vanish."""
    signal_group(proc, signal.SIGKILL)
    proc.wait()
    wait_group_gone(proc.pid, timeout=5.0)


def stop_group(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send `sig` to `proc`, wait up to `timeout` s, then SIGKILL its group; nothing survives."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)


def log_tail(path: Path, lines: int = 30) -> str:
    """Return the last `lines` lines of a log file, or a note if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def child_pids(pid: int) -> list[int]:
    """PIDs of the live direct children of `pid` (Linux /proc)."""
    return [child for child, f in _proc_stats() if len(f) > 1 and f[0] != "Z" and int(f[1]) == pid]
