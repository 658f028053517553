"""Security suite: floods against the real services with tight limits. The command API's per-user rate
limit and the query API's per-user reads in flight hold (429 problem+json with Retry-After) while another
user is served as usual."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest

from events.cursor import decode_cursor, encode_cursor
from tests.fanout_fixtures import PARTITIONS, token
from tests.test_http_edge import Services, running_services

pytestmark = pytest.mark.security

BURST = 5
READS_IN_FLIGHT = 2
READ_WAIT_S = 2.0


@pytest.fixture(scope="module")
def limited(
    redis_server_url: str, database_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    with running_services(
        redis_server_url, database_server_url, tmp_path_factory.mktemp("floods"),
        PARLEY_RATE_LIMIT_BURST=str(BURST), PARLEY_RATE_LIMIT_PER_S="1",
        PARLEY_QUERY_MAX_CONCURRENT_PER_USER=str(READS_IN_FLIGHT), PARLEY_READ_WAIT_S=str(READ_WAIT_S),
    ) as ports:  # fmt: skip
        yield ports


def _assert_429(answer: httpx.Response, slug: str) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"].endswith(slug) and answer.json()["status"] == 429
    assert float(answer.headers["retry-after"]) >= 1


async def test_a_command_flood_is_rate_limited_and_another_user_is_not(limited: Services) -> None:
    url = f"http://127.0.0.1:{limited.command_api}/v1/conversations"

    async def create(http: httpx.AsyncClient, user: str) -> httpx.Response:
        return await http.post(url, json={"title": "flood"}, headers={
            "Authorization": f"Bearer {token(user)}", "Idempotency-Key": uuid.uuid4().hex})  # fmt: skip

    async with httpx.AsyncClient(timeout=10) as http:
        flood = await asyncio.gather(*(create(http, "mallory") for _ in range(4 * BURST)))
        statuses = [a.status_code for a in flood]
        assert statuses.count(202) <= BURST + 2 and set(statuses) == {202, 429}, statuses  # ~1/s refills
        _assert_429(next(a for a in flood if a.status_code == 429), "rate-limited")
        others = [await create(http, "alice") for _ in range(BURST)]
        assert [a.status_code for a in others] == [202] * BURST
        _assert_429(await create(http, "mallory"), "rate-limited")


async def test_a_read_flood_is_refused_past_the_reads_in_flight_and_another_user_is_not(
    limited: Services,
) -> None:
    base = f"http://127.0.0.1:{limited.query_api}"
    async with httpx.AsyncClient(timeout=10) as http:
        seen = await http.get(f"{base}/v1/unread", headers={"Authorization": f"Bearer {token('alice')}"})
        epoch = decode_cursor(seen.json()["cursor"]).epoch
        never = encode_cursor(epoch, ["99999999999999-0"] * PARTITIONS)  # each read waits READ_WAIT_S

        async def read(user: str, position: str | None) -> httpx.Response:
            params = {"position": position} if position else {}
            return await http.get(f"{base}/v1/unread", params=params,
                                  headers={"Authorization": f"Bearer {token(user)}"})  # fmt: skip

        waiting = [asyncio.create_task(read("mallory", never)) for _ in range(READS_IN_FLIGHT)]
        await asyncio.sleep(0.5)
        _assert_429(await read("mallory", None), "too-many-reads")
        other = await read("alice", None)
        assert other.status_code == 200, other.text
        for answer in await asyncio.gather(*waiting):
            assert answer.status_code == 503 and answer.headers["retry-after"], answer.text
        assert (await read("mallory", None)).status_code == 200  # the slots are free again
