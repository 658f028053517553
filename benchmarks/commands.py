"""Command throughput: the real API vs a naive FastAPI+XADD endpoint vs raw pipelined XADD, one run.

All three hit the same embedded Redis (appendfsync always) on this machine; the load generator is
a separate process from the servers. Bounded: `--seconds` per phase (default 10) after a warm-up.
Run: make bench-commands   (or python -m benchmarks.commands --seconds 10 --connections 64 [--keyed N])
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from benchmarks.loadgen import LoadResult, post_request, run_load
from benchmarks.machine import describe
from benchmarks.processes import server
from devstack.binaries import redis_server_binary
from devstack.ports import free_port
from devstack.servers import RedisServer
from events.codec import encode
from events.ids import new_event_id
from events.schema import Envelope, MessageSent
from servicekit.auth_settings import AuthSettings
from servicekit.settings import Env
from servicekit.tokens import mint_token

SECRET = "bench-secret-" + "x" * 32
BODY = b'{"body":"hello from the benchmark, a message of ordinary length"}'


async def raw_ceiling(redis_url: str, seconds: float, payload: bytes) -> float:
    """Pipelined XADD of the same payloads, 256 per round trip: what Redis alone sustains here."""
    client = aioredis.Redis.from_url(redis_url)
    count = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        pipe = client.pipeline(transaction=False)
        for _ in range(256):
            pipe.xadd("ceiling:log", {"e": payload})
        await pipe.execute()
        count += 256
    elapsed = time.perf_counter() - started
    await client.aclose()
    return count / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measured_load(
    port: int, pid: int, requests: list[list[bytes]], seconds: float
) -> tuple[LoadResult, float, float]:
    """Run the load; also return the server's and this load generator's CPU use, in cores."""
    server_before, client_before, wall = cpu_seconds(pid), time.process_time(), time.perf_counter()
    result = await run_load(port, requests, seconds)
    wall = time.perf_counter() - wall
    return (
        result,
        (cpu_seconds(pid) - server_before) / wall,
        (time.process_time() - client_before) / wall,
    )


def api_env(redis_url: str, port: int, partitions: int, cluster: bool = False) -> dict[str, str]:
    """The command API's environment for a benchmark: dev mode, no rate limit worth the name."""
    return {
        **os.environ, "REDIS_URL": redis_url, "PARLEY_REDIS_CLUSTER": "1" if cluster else "0",
        "PARLEY_API_PORT": str(port), "PARLEY_PARTITIONS": str(partitions), "PARLEY_LOG_NAMESPACE": "bench",
        "PARLEY_JWT_SECRET": SECRET, "PARLEY_DEV_MODE": "1",
        "PARLEY_RATE_LIMIT_PER_S": "1000000", "PARLEY_RATE_LIMIT_BURST": "1000000",
    }  # fmt: skip


async def message_targets(
    port: int, env: dict[str, str], connections: int
) -> list[tuple[str, dict[str, str]]]:
    """One user and one new conversation per connection: the path to post messages to, and its headers."""
    auth = AuthSettings.from_env(Env(env))
    targets: list[tuple[str, dict[str, str]]] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for i in range(connections):
            headers = {"Authorization": f"Bearer {mint_token(auth, f'user-{i}', ttl_s=3600)}"}
            created = await http.post("/v1/conversations", json={"title": f"bench {i}"}, headers=headers)
            targets.append((f"/v1/conversations/{created.json()['conversation_id']}/messages", headers))
    return targets


def report(name: str, result: LoadResult, server_cpu: float, client_cpu: float) -> str:
    ok = result.statuses.get(202, 0)
    other = {k: v for k, v in result.statuses.items() if k != 202}
    return (
        f"{name:<28} {result.rate:>9,.0f} commands/s   p50 {result.percentile_ms(0.5):6.2f} ms   "
        f"p99 {result.percentile_ms(0.99):6.2f} ms   202s {ok:,}   other {other or '-'}   "
        f"errors {result.errors}   server cpu {server_cpu:.2f} cores   loadgen cpu {client_cpu:.2f} cores"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--keyed", type=int, default=0, metavar="N",
        help="also measure commands that carry an Idempotency-Key: N distinct keys per connection",
    )  # fmt: skip
    args = parser.parse_args()

    body = BODY
    sample = Envelope(
        seq=1, event_id=new_event_id(), schema_version=2,
        occurred_at=__import__("datetime").datetime.now(__import__("datetime").UTC),
        actor="user-1", conversation_id="c-1", correlation_id=new_event_id(),
        payload=MessageSent(message_id=new_event_id(), body=body.decode()[9:-2]),
    )  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp) / "redis", appendfsync="always") as redis,
    ):
        print(f"machine: {describe(str(redis_server_binary()))}")
        print(f"redis: appendfsync always, {args.connections} connections, {args.seconds:g} s per phase\n")

        ceiling = await raw_ceiling(redis.url, args.seconds, encode(sample))

        naive_port = free_port()
        with server(
            ["benchmarks.baselines.naive_api", str(naive_port), redis.url], naive_port, ready_path=None
        ) as naive:
            naive_requests = [
                [post_request(f"/v1/conversations/c{i}/messages", body, {})] for i in range(args.connections)
            ]
            naive_result, naive_cpu, naive_client = await measured_load(
                naive_port, naive.pid, naive_requests, args.seconds
            )

        api_port = free_port()
        env = api_env(redis.url, api_port, args.partitions)
        with server(["command_api"], api_port, env) as api:
            targets = await message_targets(api_port, env, args.connections)
            per_connection = [[post_request(path, body, headers)] for path, headers in targets]
            api_result, api_cpu, api_client = await measured_load(
                api_port, api.pid, per_connection, args.seconds
            )
            keyed = [
                [post_request(path, body, {**headers, "Idempotency-Key": f"k{n}"}) for n in range(args.keyed)]
                for path, headers in targets
            ]
            keyed_result = await measured_load(api_port, api.pid, keyed, args.seconds) if args.keyed else None

    print(f"{'raw pipelined XADD ceiling':<28} {ceiling:>9,.0f} appends/s")
    print(report("naive FastAPI + XADD", naive_result, naive_cpu, naive_client))
    print(report("Parley command API", api_result, api_cpu, api_client))
    if keyed_result is not None:
        print(report("  with Idempotency-Keys", *keyed_result))
    print(
        f"\nParley / ceiling = {api_result.rate / ceiling:.1%}   "
        f"Parley / naive = {api_result.rate / naive_result.rate:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
