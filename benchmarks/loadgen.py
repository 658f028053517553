"""A small closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending prebuilt requests.

Written on raw asyncio streams so the client spends as little CPU as possible on a 2-core machine,
leaving the server under test most of it. Bounded by duration and by a request cap.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0


async def _connection(
    port: int, requests: list[bytes], deadline: float, cap: int, result: LoadResult, warmup_until: float
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < deadline and result.requests < cap:
            started = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            status = await read_response(reader)
            if status is None:
                result.errors += 1
                return
            if started < warmup_until:
                continue
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.requests += 1
            result.latencies_s.append(time.perf_counter() - started)
    finally:
        writer.close()


async def run_load(
    port: int, per_connection: list[list[bytes]], seconds: float, warmup_s: float = 1.0, cap: int = 2_000_000
) -> LoadResult:
    """Drive one connection per request list for `seconds` after `warmup_s`; statuses and latencies."""
    result = LoadResult()
    start = time.perf_counter()
    warmup_until = start + warmup_s
    deadline = warmup_until + seconds
    await asyncio.gather(
        *(_connection(port, reqs, deadline, cap, result, warmup_until) for reqs in per_connection)
    )
    result.elapsed_s = time.perf_counter() - max(warmup_until, start)
    return result


async def read_response(reader: asyncio.StreamReader) -> int | None:
    """Read one HTTP/1.1 response (headers and Content-Length body); its status, None if the peer closed."""
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return int(status_line.split(b" ", 2)[1]) if status_line else None


def post_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}"]  # fmt: skip
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
