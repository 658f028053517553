"""The reconnect storm of `benchmarks.c100k`: every connected client disconnects at once and resumes from
its cursor while messages keep flowing; checked against the log (no gap, no duplicate) and measured.

Two storms: `drop` (every load process aborts all its connections, as a network drop does; the fanout
stays up) and `kill` (the fanout is killed with SIGKILL and started again on the same port). Printed per
storm: time until 99 % (and all) are live again, resumes/s, the fanout's CPU per resume, Redis calls and
Postgres statements per resume (commandstats and pg_stat_statements deltas, plus the fanout's own
history-page counters), admission refusals, and clients closed as slow consumers (must be 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.looplag import Buckets, lag_buckets, lag_quantile_ms
from command_api import commands
from command_api.append import Appender
from command_api.bodies import SendMessage
from command_api.commands import Context
from events.codec import decode
from events.exceptions import DecodeError
from events.layout import LogLayout
from events.log import EventLog
from events.schema import MessageSent

READ_PAGE = 5_000
BACKGROUND_S = 3.0


class LoadProcess:
    """One `benchmarks.c100k_load` child and its JSON lines."""

    def __init__(self, proc: Any, count: int) -> None:
        self.proc = proc
        self.count = count

    async def line(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not raw:
            raise RuntimeError(f"load process exited ({await self.proc.wait()})")
        return dict(json.loads(raw))

    async def ask(self, command: bytes, timeout_s: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + b"\n")
        await self.proc.stdin.drain()
        return await self.line(timeout_s)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"stop\n")
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def total(counts: list[dict[str, Any]], key: str) -> int:
    return sum(int(c[key]) for c in counts)


async def ask_all(loads: list[LoadProcess], command: bytes) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(lp.ask(command) for lp in loads)))


class Sender:
    """Appends messages at `rate_per_s` to random conversations (by one of their members) until stopped."""

    def __init__(
        self, redis_url: str, namespace: str, partitions: int, members: dict[str, list[str]]
    ) -> None:
        self.client = redis.asyncio.Redis.from_url(redis_url)
        self.appender = Appender(self.client, LogLayout(namespace, partitions))
        self.members = members
        self.sent = 0
        self.failed = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, rate_per_s: float) -> None:
        await self.appender.open()
        self._task = asyncio.create_task(self._run(rate_per_s))

    async def _run(self, rate_per_s: float) -> None:
        rng = random.Random(7)
        ids = list(self.members)
        started = time.monotonic()
        pending: set[asyncio.Task[Any]] = set()
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * rate_per_s) - self.sent
            for _ in range(max(0, due)):
                c = rng.choice(ids)
                command = commands.send_message(
                    Context(actor=rng.choice(self.members[c])), c, SendMessage(body=f"s{self.sent}")
                )
                task = asyncio.create_task(self.appender.append(command))
                pending.add(task)
                task.add_done_callback(self._done(pending))
                self.sent += 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*pending, return_exceptions=True)

    def _done(self, pending: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            pending.discard(task)
            if task.cancelled() or task.exception() is not None:
                self.failed += 1

        return done

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.appender.close()
        await self.client.aclose()


async def expected_spans(redis_url: str, namespace: str, partitions: int) -> tuple[dict[str, list[int]], int]:
    """Per conversation, the [first, last] seq of its messages in the log; and how many messages were not
    contiguous with the previous one of their conversation (must be 0: the log's own seqs)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    log = EventLog(client, LogLayout(namespace, partitions))
    spans: dict[str, list[int]] = {}
    holes = 0
    for partition in range(partitions):
        start = "-"
        while True:
            entries = await log.read_range(partition, start, "+", READ_PAGE)
            for entry in entries:
                try:
                    envelope = decode(entry.data)
                except DecodeError:
                    continue
                if not isinstance(envelope.payload, MessageSent):
                    continue
                span = spans.get(envelope.conversation_id)
                if span is None:
                    spans[envelope.conversation_id] = [envelope.seq, envelope.seq]
                else:
                    holes += envelope.seq != span[1] + 1
                    span[1] = envelope.seq
            if len(entries) < READ_PAGE:
                break
            start = f"({entries[-1].stream_id}"
    await client.aclose()
    return spans, holes


def fanout_counters(port: int) -> dict[str, float]:
    """The fanout's counters this benchmark prints, by sample name and labels (empty if unreachable)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=120).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("parley_fanout_") or family.name.startswith("parley_unread"):
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def pg_statements(database_url: str) -> dict[str, int]:
    """Calls per statement of this database (pg_stat_statements), empty if the extension is missing."""
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT query, calls FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
    except psycopg.Error:
        return {}
    out: dict[str, int] = {}
    for query, calls in rows:
        key = " ".join(str(query).split())[:90]
        out[key] = out.get(key, 0) + int(calls)
    return out


def redis_calls(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def net(
    after: dict[str, int], before: dict[str, int], quiet: dict[str, int], scale: float
) -> dict[str, float]:
    """`after - before` less the background: what `before - quiet` took, times `scale` (the storm's length
    over the background window's); only what is left above zero."""
    out = {}
    for k, v in delta(after, before).items():
        left = v - scale * (before.get(k, 0) - quiet.get(k, 0))
        if left > 0:
            out[k] = left
    return out


@dataclass
class Storm:
    """What one storm measured."""

    kind: str
    clients: int
    resumed: int
    t99_s: float
    t_all_s: float | None
    first_s: float
    ready_s: float | None
    fanout_cpu_s: float
    load_cpu_s: float
    elapsed_s: float
    redis: dict[str, float]
    pg: dict[str, float]
    fanout: dict[str, float]
    counts: dict[str, int]
    lag_p99_ms: float
    closes: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    notes: list[str] = field(default_factory=list)
    connect: tuple[float, float] | None = None
    """The same run's first connects, the baseline: (fanout CPU seconds per connection, connections/s)."""

    def lines(self) -> list[str]:
        n = max(self.resumed, 1)
        reached = self.resumed >= 0.99 * self.clients
        rate = (0.98 * self.clients if reached else self.resumed) / max(self.t99_s - self.first_s, 1e-9)
        head = f"storm ({self.kind})"
        out = [
            f"{head:<33}{self.clients:,} live clients disconnected at once; {self.resumed:,} resumed; "
            f"{self.sent:,} messages appended meanwhile",
            (
                f"  99 % live again after          {self.t99_s:.2f} s"
                if reached
                else f"  99 % live again after          not within the bound ({self.resumed:,} resumed by {self.t99_s:.2f} s)"
            )
            + (
                f" (the restarted fanout was ready at {self.ready_s:.2f} s)"
                if self.ready_s is not None
                else ""
            )
            + (
                f"; all after {self.t_all_s:.2f} s"
                if self.t_all_s is not None
                else "; not all live in the bound"
            ),
            f"  resumes/s                      {rate:,.0f} (from 1 % live at {self.first_s:.2f} s to "
            f"{'99 %' if reached else 'the last'} at {self.t99_s:.2f} s)",
            f"  fanout CPU per resume          {1000 * self.fanout_cpu_s / n:.2f} ms "
            f"({n / max(self.fanout_cpu_s, 1e-9):,.0f} resumes per CPU-second)",
            f"  share of a core over the storm fanout {self.fanout_cpu_s / max(self.elapsed_s, 1e-9):.0%}, "
            f"load processes {self.load_cpu_s / max(self.elapsed_s, 1e-9):.0%} in all "
            f"({1000 * self.load_cpu_s / n:.2f} ms per resume: the harness's, not Parley's)",
        ]
        if self.connect is not None:
            cpu_each, per_s = self.connect
            out.append(
                f"  against this run's first connects: resume CPU {self.fanout_cpu_s / n / max(cpu_each, 1e-9):.2f}x "
                f"a connect's ({1000 * cpu_each:.2f} ms), resumes/s {rate / max(per_s, 1e-9):.2f}x the "
                f"connect rate ({per_s:,.0f}/s)"
            )
        calls = sum(self.redis.values())
        top = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(self.redis.items(), key=lambda kv: -kv[1])[:6])
        out.append(
            f"  Redis calls per resume         {calls / n:.2f} ({top}; net of the same-run background)"
        )
        statements = sum(self.pg.values())
        out.append(
            f"  Postgres statements per resume {statements / n:.2f} (pg_stat_statements, net of the same-run background)"
        )
        for query, calls_ in sorted(self.pg.items(), key=lambda kv: -kv[1])[:5]:
            out.append(f"    {calls_ / n:6.3f}  {query}")
        f = self.fanout
        reads = {
            s: f.get(f"parley_fanout_history_reads_total{{source={s}}}", 0) for s in ("redis", "archive")
        }
        shared = {
            s: f.get(f"parley_fanout_history_coalesced_total{{source={s}}}", 0) for s in ("redis", "archive")
        }
        out.append(
            f"  history pages per resume       read {sum(reads.values()) / n:.3f} (redis {reads['redis']:,.0f}, "
            f"archive {reads['archive']:,.0f}), shared {sum(shared.values()) / n:.3f}"
        )
        refused = f.get("parley_fanout_admission_refused_total{}", 0)
        slow = f.get("parley_fanout_closes_total{code=4008}", 0)
        c = self.counts
        out.append(
            f"  slow-consumer closes           {slow:,.0f} by the fanout, {c['slow_consumer']:,} seen by clients; "
            f"admission refusals {refused:,.0f}; connection attempts {c['attempts']:,}"
        )
        closes = ", ".join(
            f"{k.split('=')[1].rstrip('}')}: {v:,.0f}"
            for k, v in f.items()
            if k.startswith("parley_fanout_closes_total")
        )
        out.append(
            f"  fanout closes by code          {closes or 'none'}; clients saw {self.closes or 'none'}"
        )
        out.append(f"  fanout event loop lag          p99 <= {self.lag_p99_ms:.1f} ms")
        out += [f"  NOTE: {n_}" for n_ in self.notes]
        return out


@dataclass
class Probe:
    """One look at the stack before/after a storm."""

    commands: dict[str, int]
    statements: dict[str, int]
    fanout: dict[str, float]
    lag: Buckets

    @staticmethod
    def take(r: redis.Redis, database_url: str, port: int) -> Probe:
        return Probe(
            redis_calls(r), pg_statements(database_url), fanout_counters(port), lag_buckets(port, 120)
        )


async def wait_live(
    loads: list[LoadProcess], want: int, started: float, bound_s: float
) -> tuple[list[dict[str, Any]], float | None]:
    """Poll until `want` clients are live again or `bound_s` passed; the counts and when all were live."""
    deadline = started + bound_s
    while True:
        counts = await ask_all(loads, b"report")
        if total(counts, "live_now") >= want:
            return counts, time.monotonic() - started
        if time.monotonic() > deadline:
            return counts, None
        await asyncio.sleep(0.25)


async def storm(
    kind: str,
    loads: list[LoadProcess],
    r: redis.Redis,
    database_url: str,
    port: int,
    fanout_pid: int,
    restart: Callable[[], Any] | None,
    bound_s: float,
) -> tuple[Storm, int]:
    """Disconnect every client at once (`drop`: the clients; `kill`: SIGKILL the fanout, then `restart()`,
    which returns the new process), wait until all are live again (at most `bound_s`), measure. Returns the
    storm and the fanout's pid afterwards."""
    marked = await ask_all(loads, b"mark")
    clients = total(marked, "live_now")
    quiet = Probe.take(r, database_url, port)
    await asyncio.sleep(BACKGROUND_S)  # the same-run background: messages, projector, heartbeats
    before = Probe.take(r, database_url, port)
    cpu_before = cpu_s(fanout_pid)
    load_before = sum(cpu_s(load.proc.pid) for load in loads)
    notes: list[str] = []
    ready_s: float | None = None
    started = time.monotonic()
    if kind == "drop":
        await ask_all(loads, b"drop")
    else:
        assert restart is not None
        os.kill(fanout_pid, signal.SIGKILL)
        proc = await asyncio.to_thread(restart)
        ready_s = time.monotonic() - started
        fanout_pid = proc.pid
        cpu_before = 0.0
        notes.append(
            "the restarted fanout's CPU includes its start (imports, hub bootstrap); its counters start at 0"
        )
        before.fanout, before.lag = {}, [(le, 0.0) for le, _ in before.lag]
    counts, all_s = await wait_live(loads, clients, started, bound_s)
    after = Probe.take(r, database_url, port)
    scale = (time.monotonic() - started) / BACKGROUND_S
    fanout_cpu = cpu_s(fanout_pid) - cpu_before
    load_cpu = sum(cpu_s(load.proc.pid) for load in loads) - load_before
    elapsed = time.monotonic() - started
    times = sorted(t - started for c in counts for t in c["resumed_at"])
    resumed = len(times)
    if resumed < clients:
        notes.append(f"{clients - resumed:,} clients not live again within {bound_s:.0f} s")

    def pick(q: float) -> float:
        """When the `q` share of the clients (not of those resumed) was live again."""
        return times[min(len(times) - 1, max(0, int(q * clients) - 1))] if times else float("nan")

    lag_p99, _ = lag_quantile_ms(before.lag, after.lag, 0.99)
    result = Storm(
        kind, clients, resumed, pick(0.99), all_s, pick(0.01), ready_s, fanout_cpu, load_cpu, elapsed,
        net(after.commands, before.commands, quiet.commands, scale),
        net(after.statements, before.statements, quiet.statements, scale), delta(after.fanout, before.fanout),
        {k: total(counts, k) - total(marked, k) for k in ("slow_consumer", "attempts", "gaps", "duplicates", "resyncs")},
        lag_p99, notes=notes,
    )  # fmt: skip
    for c, m in zip(counts, marked, strict=True):
        for k, v in c["closes"].items():
            if v - m["closes"].get(k, 0):
                result.closes[k] = result.closes.get(k, 0) + v - m["closes"].get(k, 0)
    return result, fanout_pid
