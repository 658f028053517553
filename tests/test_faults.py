"""Fault suite (`make test-faults`): every service as a real process on a real Redis (AOF always) and Postgres,
a bounded mixed load with idempotent retries, subscribers that drop and resume (on either of two fanout
processes), one fault injected repeatedly; then the audit is the oracle (exit 0, clients' records
included) and every 202 is in the log exactly once."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from devstack.cluster import RedisClusterServers
from devstack.ports import free_port
from devstack.servers import PostgresServer, RedisServer
from events.redisclient import redis_client
from projector.audit import log_events
from projector.auditsource import gather
from projector.settings import ProjectorSettings
from realtime_fanout.client import FanoutClient, Live, Recorder, write_received
from servicekit.auth_settings import AuthSettings
from servicekit.settings import Env
from servicekit.tokens import mint_token
from tests.conftest import DEV_SECRET, _redis_version

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

PARTITIONS = 4
USERS = [f"u{i}" for i in range(6)]
COMMANDS_PER_WRITER = 60
LEASE_TTL_S = 1.5


@dataclass
class Service:
    """One `python -m <module>` process on a fixed loopback port, restartable on that same port."""

    module: str
    env: dict[str, str]
    port: int
    log: Path
    ready: str = "/readyz"
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        out = self.log.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, stdout=out, stderr=out, env=self.env
            )
        finally:
            out.close()
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if self.proc.returncode is not None:
                    raise AssertionError(f"{self.module} exited {self.proc.returncode}: see {self.log}")
                with suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{self.port}{self.ready}")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.module} never became ready: see {self.log}")

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class Stack:
    redis: RedisServer | RedisClusterServers
    env: dict[str, str]
    api: Service
    projectors: list[Service]
    fanouts: list[Service]
    auth: AuthSettings
    issued_ago_s: float = 0.0
    kept: dict[str, str] | None = None  # one token per user, minted once (`keep_tokens`)

    def services(self) -> list[Service]:
        return [self.api, *self.projectors, *self.fanouts]

    def token(self, user: str) -> str:
        """A token valid for an hour, issued `issued_ago_s` ago (valid on a clock stepped back by less)."""
        if self.kept is not None and user in self.kept:
            return self.kept[user]
        now = time.time() - self.issued_ago_s
        minted = mint_token(self.auth, user, ttl_s=3600 + self.issued_ago_s, now=now)
        if self.kept is not None:
            self.kept[user] = minted
        return minted

    def keep_tokens(self) -> None:
        """From now on each user's token is minted once and reused, as a client holds its token."""
        self.kept = {}


@asynccontextmanager
async def stack(
    redis: RedisServer | RedisClusterServers, database_url: str, tmp: Path, projectors: int = 1, *,
    api_env: dict[str, str] | None = None, issued_ago_s: float = 0.0, **extra_env: str,
) -> AsyncIterator[Stack]:  # fmt: skip
    env = {
        **os.environ, "REDIS_URL": redis.url, "DATABASE_URL": database_url,
        "PARLEY_REDIS_CLUSTER": "1" if isinstance(redis, RedisClusterServers) else "0",
        "PARLEY_LOG_NAMESPACE": "faults", "PARLEY_PARTITIONS": str(PARTITIONS),
        "PARLEY_JWT_SECRET": DEV_SECRET, "PARLEY_DEV_MODE": "1", "PARLEY_RATE_LIMIT_PER_S": "0",
        "PARLEY_PROJECTOR_BATCH": "20", "PARLEY_PROJECTOR_BLOCK_MS": "100",
        "PARLEY_PROJECTOR_LEASE_TTL_S": str(LEASE_TTL_S), "PARLEY_PROJECTOR_RETRY_MAX_S": "0.5",
        "PARLEY_FANOUT_READ_BLOCK_MS": "200", **extra_env,
    }  # fmt: skip

    def service(module: str, setting: str, name: str, ready: str = "/readyz", **extra: str) -> Service:
        port = free_port()
        return Service(module, {**env, setting: str(port), **extra}, port, tmp / f"{name}.log", ready)

    s = Stack(
        redis, env, service("command_api", "PARLEY_API_PORT", "api", "/healthz", **(api_env or {})),
        [service("projector", "PARLEY_PROJECTOR_HTTP_PORT", f"projector{i}",
                 PARLEY_PROJECTOR_WORKER_ID=f"projector-{i}") for i in range(projectors)],
        [service("realtime_fanout", "PARLEY_FANOUT_PORT", f"fanout{i}") for i in range(2)],
        AuthSettings.from_env(Env(env)), issued_ago_s,
    )  # fmt: skip
    try:
        await s.api.start()
        async with httpx.AsyncClient() as http:  # the API creates the log on its first append
            answer = await http.post(
                f"http://127.0.0.1:{s.api.port}/v1/conversations",
                json={"title": "hello", "participants": USERS[1:3]},
                headers={"Authorization": f"Bearer {s.token(USERS[0])}"},
            )
            assert answer.status_code == 202, answer.text
        for proc in (*s.projectors, *s.fanouts):
            await proc.start()
        yield s
    finally:
        for proc in s.services():
            await proc.stop()


@dataclass
class Load:
    """Writers that retry every command with its Idempotency-Key until it is answered below 500."""

    base: str
    token: Callable[[str], str]
    rng: random.Random
    accepted: list[dict[str, Any]] = field(default_factory=list)
    replays: int = 0
    retries: int = 0  # attempts that failed (no answer, or 5xx) and were sent again with the same key
    keep: int = 0  # 0: each round is a new conversation; N: each writer goes round N of its own (steady)
    kept: dict[str, list[tuple[str, list[str], int]]] = field(default_factory=dict)

    async def command(self, http: httpx.AsyncClient, user: str, method: str, path: str,
                      body: Any = None) -> httpx.Response:  # fmt: skip
        key = uuid.uuid4().hex
        headers = {"Authorization": f"Bearer {self.token(user)}", "Idempotency-Key": key}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        again = self.rng.random() < 0.1  # retry a success too: the answer must be replayed
        while True:
            try:
                answer = await http.request(method, self.base + path, json=body, headers=headers, timeout=5)
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code < 500:
                if answer.status_code != 202 or not again:
                    break
                again, first = False, answer.json()
                retried = await self.command_again(http, method, path, body, headers)
                assert retried.json() == first and retried.headers.get("idempotent-replayed") == "true"
                self.replays += 1
                break
            assert loop.time() < deadline, f"{method} {path} never answered"
            self.retries += 1
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))
        if answer.status_code == 202:
            self.accepted.append(answer.json())
        return answer

    async def command_again(self, http: httpx.AsyncClient, method: str, path: str, body: Any,
                            headers: dict[str, str]) -> httpx.Response:  # fmt: skip
        while True:
            with suppress(httpx.TransportError):
                answer = await http.request(method, self.base + path, json=body, headers=headers, timeout=5)
                if answer.status_code < 500:
                    return answer
            await asyncio.sleep(0.1)

    async def writer(self, user: str) -> None:
        """One conversation of `user`'s (a new one, or with `keep` one of the writer's N), then a mix of
        sends, joins, leaves, reads and archiving."""
        rng = random.Random(self.rng.random())
        async with httpx.AsyncClient() as http:
            kept = self.kept.setdefault(user, [])
            if self.keep and len(kept) >= self.keep:
                slot = rng.randrange(len(kept))
                cid, members, seq = kept[slot]
            else:
                others = rng.sample([u for u in USERS if u != user], 2)
                created = await self.command(http, user, "POST", "/v1/conversations",
                                             {"title": f"{user}'s", "participants": others})  # fmt: skip
                assert created.status_code == 202, created.text
                cid, members, seq = created.json()["conversation_id"], [user, *others], 1
                slot = len(kept)
                kept.append((cid, members, seq))
            base = f"/v1/conversations/{cid}"
            for _ in range(COMMANDS_PER_WRITER):
                roll = rng.random()
                if roll < 0.65:
                    answer = await self.command(http, rng.choice(members), "POST", f"{base}/messages",
                                                {"body": f"hi {rng.random():.3f}"})  # fmt: skip
                elif roll < 0.77:
                    newcomer = rng.choice([u for u in USERS if u not in members] or [user])
                    answer = await self.command(
                        http, user, "POST", f"{base}/participants", {"user_id": newcomer}
                    )
                    if answer.status_code == 202:
                        members.append(newcomer)
                elif roll < 0.87 and len(members) > 2:
                    leaver = rng.choice(members[1:])
                    answer = await self.command(http, user, "DELETE", f"{base}/participants/{leaver}")
                    if answer.status_code == 202:
                        members.remove(leaver)
                elif roll < 0.93:
                    answer = await self.command(http, rng.choice(members), "POST", f"{base}/read",
                                                {"up_to_seq": seq})  # fmt: skip
                else:
                    method = "PUT" if rng.random() < 0.6 else "DELETE"
                    answer = await self.command(http, rng.choice(members), method, f"{base}/archive")
                if answer.status_code == 202:
                    seq = max(seq, answer.json()["seq"])
                await asyncio.sleep(rng.uniform(0.0, 0.04))
            if self.keep:
                kept[slot] = (cid, members, seq)
            else:
                kept.clear()


async def subscriber(s: Stack, rec: Recorder, done: asyncio.Event, rng: random.Random) -> None:
    """Stretches of 0.3-1.5 s on a random fanout process, some dropped mid-way (the client resumes by
    itself), each resumed by a new client from the last cursor; at the end, one that catches up."""
    cursor: str | None = None
    while True:
        final = done.is_set()
        fanout = s.fanouts[0] if final else rng.choice(s.fanouts)
        client = FanoutClient(f"ws://127.0.0.1:{fanout.port}/v1/stream", s.token(rec.user), cursor=cursor,
                              recorder=rec, backoff_initial_s=0.05, backoff_max_s=0.5)  # fmt: skip
        live, last = asyncio.Event(), [asyncio.get_running_loop().time()]

        async def consume(client: FanoutClient = client, live: asyncio.Event = live,
                          last: list[float] = last) -> None:  # fmt: skip
            async for item in client:
                last[0] = asyncio.get_running_loop().time()
                if isinstance(item, Live):
                    live.set()

        task = asyncio.create_task(consume())
        if final:
            await asyncio.wait_for(live.wait(), 30)
            while asyncio.get_running_loop().time() - last[0] < 1.5:
                await asyncio.sleep(0.2)
        else:
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            if rng.random() < 0.5:
                client.drop()
                await asyncio.sleep(rng.uniform(0.1, 0.5))
        await client.close()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
        cursor = client.cursor
        if final:
            return


async def run_with_fault(s: Stack, tmp: Path, inject: Callable[[Stack], Awaitable[None]]) -> Load:
    """The load and the subscribers around `inject`; then recovery, and the audit as oracle."""
    rng = random.Random(17)
    load = Load(f"http://127.0.0.1:{s.api.port}", s.token, rng)
    recorders = [Recorder(f"sub-{user}", user) for user in USERS[:4]]
    done = asyncio.Event()
    subs = [asyncio.create_task(subscriber(s, r, done, random.Random(i))) for i, r in enumerate(recorders)]
    await asyncio.sleep(1.0)  # every subscriber live before the load
    writers = asyncio.gather(*(load.writer(user) for user in USERS[:4]))
    try:
        await asyncio.sleep(0.8)
        await inject(s)
        await writers
    finally:
        done.set()
        writers.cancel()
        with suppress(asyncio.CancelledError):
            await writers
    await asyncio.wait_for(asyncio.gather(*subs), 60)
    settings = ProjectorSettings.from_env(Env(s.env), auth=False)
    await wait_projected(settings)
    received = tmp / "received.jsonl"
    write_received(received, recorders)
    code, report = await run_audit(s, received)
    assert code == 0, json.dumps(report, indent=1)  # in full: the examples name what went wrong
    assert all(c["checked"] for c in report["checks"]), report
    if int(_redis_version(s.redis.binary).split(".")[0]) >= 7:  # the hole count ran, not its 6.2 stand-in
        assert not any("6.2" in note for c in report["checks"] for note in c["notes"]), report
    logged = [pe.event.event_id for pe in log_events(await gather(settings))]
    acknowledged = [e for answer in load.accepted for e in answer["event_ids"]]
    assert len(acknowledged) > 150 and load.replays > 0
    assert sorted(set(acknowledged) - set(logged)) == []  # every 202 is in the log ...
    assert len(logged) == len(set(logged))  # ... exactly once
    assert all(any(ln["kind"] == "event" for ln in r.lines) for r in recorders)
    # The oracle is not vacuous here: one event fewer in one subscriber's record is a violation.
    lines = received.read_bytes().splitlines(keepends=True)
    first_event = next(i for i, ln in enumerate(lines) if b'"kind":"event"' in ln)
    (tmp / "short.jsonl").write_bytes(b"".join(lines[:first_event] + lines[first_event + 1 :]))
    assert (await run_audit(s, tmp / "short.jsonl"))[0] == 1
    return load


async def run_audit(s: Stack, received: Path) -> tuple[int | None, Any]:
    """`python -m projector audit --received FILE --json` against the stack: (exit code, report)."""
    audit = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "projector", "audit", "--received", str(received), "--json",
        env=s.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(audit.communicate(), 60)
    return audit.returncode, json.loads(out) if out else err.decode()


async def wait_projected(settings: ProjectorSettings, limit_s: float = 40) -> None:
    """Until every partition's checkpoint is its stream's head."""
    import psycopg

    from events.log import EventLog

    client = redis_client(settings.log.redis_url, 10, cluster=settings.log.redis_cluster)
    log = EventLog(client, settings.log.layout())
    try:
        async with asyncio.timeout(limit_s):
            while True:
                heads = {p: await log.head(p) for p in range(PARTITIONS)}
                async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
                    cur = await conn.execute("SELECT partition, stream_id FROM parley.checkpoints")
                    if {int(r[0]): str(r[1]) for r in await cur.fetchall()} == heads:
                        return
                await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def kill_projector_repeatedly(s: Stack) -> None:
    for _ in range(4):
        await asyncio.sleep(random.uniform(0.4, 1.0))
        await s.projectors[0].kill()
        await s.projectors[0].start()


async def kill_fanout(s: Stack) -> None:
    for fanout in s.fanouts:
        await asyncio.sleep(1.0)
        await fanout.kill()
        await asyncio.sleep(0.3)
        await fanout.start()


async def kill_command_api(s: Stack) -> None:
    for _ in range(3):
        await asyncio.sleep(0.7)
        await s.api.kill()
        await s.api.start()


async def kill_redis(s: Stack) -> None:
    """kill -9 of Redis, down for longer than the clients' reconnect retries ride over (about 1 s)."""
    assert isinstance(s.redis, RedisServer)
    for _ in range(2):
        await asyncio.sleep(1.0)
        await asyncio.to_thread(s.redis.kill)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(s.redis.start)


async def kill_redis_with_a_torn_aof_tail(s: Stack) -> None:
    """kill -9 of Redis in the middle of writing a command to the AOF (a torn, never acknowledged write):
    it loads the whole commands and truncates the torn one (`aof-load-truncated yes`, the default)."""
    assert isinstance(s.redis, RedisServer)
    for _ in range(2):
        await asyncio.sleep(1.0)
        await asyncio.to_thread(s.redis.kill)
        aof = max(s.redis.data_dir.rglob("*.aof"), key=lambda f: f.stat().st_mtime)
        with aof.open("ab") as f:
            f.write(b"*3\r\n$4\r\nXADD\r\n$11\r\nfaults:{p0")
        await asyncio.sleep(2.0)
        await asyncio.to_thread(s.redis.start)
    assert "truncated" in s.redis.log_path.read_text().lower()


async def cut_redis_connections(s: Stack) -> None:
    """The network to Redis cut, as the services see it: every client connection killed, repeatedly."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(s.redis.url)
    try:
        for _ in range(5):
            await asyncio.sleep(0.5)
            await client.client_kill_filter(_type="normal", skipme=True)
    finally:
        await client.aclose()


async def freeze_projector_beyond_its_lease(s: Stack) -> None:
    """SIGSTOP one of two projectors past its lease (the other takes over), then SIGCONT: the zombie must
    notice it lost its leases before writing anything."""
    for _ in range(2):
        await asyncio.sleep(0.8)
        s.projectors[0].signal(signal.SIGSTOP)
        await asyncio.sleep(LEASE_TTL_S * 2.5)
        s.projectors[0].signal(signal.SIGCONT)


# fault: (injection, projector processes, whether writers must have had to retry)
FAULTS: dict[str, tuple[Callable[[Stack], Awaitable[None]], int, bool]] = {
    "projector-kill-9": (kill_projector_repeatedly, 1, False),
    "fanout-kill-9": (kill_fanout, 1, False),
    "command-api-kill-9": (kill_command_api, 1, True),
    "redis-kill-9": (kill_redis, 1, True),
    "redis-kill-9-torn-aof-tail": (kill_redis_with_a_torn_aof_tail, 1, True),
    "redis-connections-cut": (cut_redis_connections, 1, False),
    "projector-sigstop": (freeze_projector_beyond_its_lease, 2, False),
}


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of our own (AOF always) to kill: a 7.x `redis-server` from PATH when there is one, so the
    audit also counts entries-added (the bundled 6.2 otherwise)."""
    found = shutil.which("redis-server")
    binary = Path(found) if found and int(_redis_version(Path(found)).split(".")[0]) >= 7 else None
    server = RedisServer(tmp_path / "redis", appendfsync="always", binary=binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_fault_then_audit_is_green(
    fault: str, fault_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    inject, projectors, retried = FAULTS[fault]
    async with stack(fault_redis, database_url, tmp_path, projectors) as s:
        load = await run_with_fault(s, tmp_path, inject)
    assert load.retries > 0 or not retried  # commands were in flight or refused while it was down


async def test_postgres_stopped_10_s_then_audit_is_green(
    fault_redis: RedisServer, tmp_path: Path, pg_root: Path
) -> None:
    """Postgres of our own, stopped for 10 s under load (the projector waits and retries), then started."""
    with PostgresServer(pg_root / "pg", fast=True) as pg:
        database_url = pg.create_database("parley")

        async def stop_postgres(_s: Stack) -> None:
            await asyncio.to_thread(pg.stop)
            await asyncio.sleep(10)
            await asyncio.to_thread(pg.start)

        async with stack(fault_redis, database_url, tmp_path) as s:
            await run_with_fault(s, tmp_path, stop_postgres)


LEEWAY_S = 10.0


async def fanout_auth(port: int, token: str) -> tuple[int | str, str]:
    """The fanout's answer to a first `auth` frame: `authenticated`, or the close code; and the frames."""
    frames = []
    async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        try:
            while True:
                frames.append(str(await asyncio.wait_for(ws.recv(), 10)))
                if json.loads(frames[-1])["type"] == "authenticated":
                    return "authenticated", "".join(frames)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, "".join(frames)


async def test_tokens_within_the_leeway_pass_and_beyond_it_are_refused_everywhere(
    fault_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """Issuer and service clocks skewed: a token expired or not yet valid by less than PARLEY_JWT_LEEWAY_S
    passes on the command API, the query API and the fanout; by more, it is refused (401 / close 4401)."""
    async with stack(fault_redis, database_url, tmp_path, PARLEY_JWT_LEEWAY_S=str(LEEWAY_S)) as s:
        within, beyond = LEEWAY_S * 0.4, LEEWAY_S * 3
        cases = {  # (skew, ok): a token expired `skew` ago, then one valid from `skew` on
            "expired-token": [(within, True), (beyond, False)],
            "token-not-yet-valid": [(within, True), (beyond, False)],
        }
        async with httpx.AsyncClient() as http:
            for slug, skews in cases.items():
                for skew, ok in skews:
                    now = time.time() - 60 - skew if slug == "expired-token" else time.time() + skew
                    token = mint_token(s.auth, USERS[0], ttl_s=60, now=now)
                    auth = {"Authorization": f"Bearer {token}"}
                    command = await http.post(f"http://127.0.0.1:{s.api.port}/v1/conversations",
                                              json={"title": "skew", "participants": USERS[1:2]},
                                              headers=auth)  # fmt: skip
                    query = await http.get(f"http://127.0.0.1:{s.projectors[0].port}/v1/conversations",
                                           headers=auth)  # fmt: skip
                    ws, frames = await fanout_auth(s.fanouts[0].port, token)
                    got = (command.status_code, query.status_code, ws)
                    if ok:
                        assert got == (202, 200, "authenticated"), (slug, skew, command.text, query.text)
                    else:
                        assert got == (401, 401, 4401), (slug, skew)
                        assert slug in command.text and slug in query.text and slug in frames, frames


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
STEP_BACK_S = 300


@pytest.mark.skipif(
    not LIBFAKETIME.exists(),
    reason=f"libfaketime not installed ({LIBFAKETIME}; Debian: apt-get install faketime)",
)
async def test_the_api_host_clock_stepped_back_under_load_keeps_order_and_ids(
    fault_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """The command API under libfaketime, its wall clock stepped back 5 min, then 5 more, mid-load: the
    audit is green (seq 1..n, archive in stream order, ids unique, nothing lost), stream ids (Redis's clock)
    keep increasing, and only `occurred_at` (the API host's clock) goes back."""
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    faked = {
        "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_CACHE_DURATION": "0",  # the file is read at every clock read: a step lands at once
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # a stepped wall clock; asyncio's timers keep CLOCK_MONOTONIC
    }  # fmt: skip

    async def step_back(s: Stack) -> None:
        for step in (1, 2):
            offset.write_text(f"-{STEP_BACK_S * step}\n")
            await asyncio.sleep(0.3)

    async with stack(fault_redis, database_url, tmp_path, api_env=faked, issued_ago_s=3 * STEP_BACK_S) as s:
        await run_with_fault(s, tmp_path, step_back)
        events = log_events(await gather(ProjectorSettings.from_env(Env(s.env), auth=False)))
    deepest = 0.0  # how far occurred_at fell below its running maximum, in log order
    for partition in range(PARTITIONS):
        mine = [pe for pe in events if pe.partition == partition]
        assert [pe.key for pe in mine] == sorted({pe.key for pe in mine})  # stream ids increase
        times = [pe.event.occurred_at for pe in mine]
        peaks = itertools.accumulate(times, max)
        deepest = max([deepest, *((peak - t).total_seconds() for peak, t in zip(peaks, times, strict=True))])
    # Both steps did happen: the API's clock went 10 min back (one jump where a partition got no event
    # between the steps, two where it did; counting jumps failed when the writers missed that 0.3 s).
    assert deepest > STEP_BACK_S * 1.6
