"""`GET /v1/history` on the query API: analysts page or stream exactly what the replay gives; nobody else
gets anything, whatever the filters; bad selections are problem+json."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from command_api.append import Appender
from events.codec import decode
from servicekit.tokens import mint_token
from tests.test_history_replay import expected
from tests.test_projector_api import AUTH, headers
from tests.test_projector_query_limits import projector_running
from tests.test_projector_store import settings_for, wait_caught_up, whole_log
from tests.workload import Workload

pytestmark = pytest.mark.slow


def analyst(roles: Any = ("analyst",)) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(AUTH, 'ana', extra={'roles': roles})}"}


@pytest.fixture
async def served(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Appender, Workload]]:
    settings = settings_for(redis_server_url, log_namespace, database_url, auth=AUTH)
    appender = Appender(redis_client, settings.log.layout())
    await appender.open()
    workload = Workload(seed=11)
    await workload.append(appender, 300)
    try:
        async with projector_running(settings) as (worker, _reads, app):
            await wait_caught_up(worker)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://projector") as client:
                yield client, appender, workload
    finally:
        await appender.close()


async def test_pages_and_stream_hold_exactly_the_replay(
    served: tuple[httpx.AsyncClient, Appender, Workload],
) -> None:
    client, appender, _ = served
    want = [json.loads(line) for _, line in expected(await whole_log(appender.log))]
    got: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 37}
    for _ in range(100):
        r = await client.get("/v1/history", params=params, headers=analyst())
        assert r.status_code == 200, r.text
        page = r.json()
        got += page["events"]
        if not page["more"]:
            break
        params = {"limit": 37, "from": page["next_from"]}
    assert [item["event"] for item in got] == want
    assert len({item["position"] for item in got}) == len(got)

    r = await client.get("/v1/history", params={"format": "ndjson"}, headers=analyst())
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in r.text.splitlines()] == got

    conversation = want[0]["conversation_id"]
    r = await client.get(
        "/v1/history", params={"conversation": conversation, "type": ["message_sent", "message_edited"],
                               "limit": 1000}, headers=analyst(),
    )  # fmt: skip
    assert [i["event"] for i in r.json()["events"]] == [
        e
        for e in want
        if e["conversation_id"] == conversation and e["payload"]["type"] in ("message_sent", "message_edited")
    ]
    # A space-separated roles claim counts too.
    r = await client.get("/v1/history", params={"limit": 1}, headers=analyst("reader analyst"))
    assert r.status_code == 200


async def test_nobody_but_an_analyst_reads_anything_whatever_the_filters(
    served: tuple[httpx.AsyncClient, Appender, Workload],
) -> None:
    client, appender, workload = served
    member = next(iter(workload.members.values()))
    theirs = next(cid for cid, people in workload.members.items() if member[0] in people)
    others = next(cid for cid, people in workload.members.items() if member[0] not in people)
    events = [decode(e.data) for e in await whole_log(appender.log)]
    position = f"{appender.log.epoch}.0.0-1"
    filters: list[dict[str, Any]] = [
        {}, {"conversation": theirs}, {"conversation": others}, {"conversation": [theirs, others]},
        {"actor": member[0]}, {"actor": events[0].actor}, {"type": "message_sent"}, {"from": position},
        {"since": "2000-01-01"}, {"format": "ndjson"}, {"conversation": others, "format": "ndjson"},
    ]  # fmt: skip
    tokens = [
        headers(member[0]),
        headers("stranger"),
        analyst(["analysts"]),
        analyst("reader"),
        analyst(None),
    ]
    for params, token in itertools.product(filters, tokens):
        r = await client.get("/v1/history", params=params, headers=token)
        assert r.status_code == 403, (params, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "/problems/analyst-role-required"
        assert "event" not in r.text
    r = await client.get("/v1/history")
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("params", "status", "slug"),
    [
        ({"type": "message_snet"}, 400, "unknown-event-type"),
        ({"from": "garbage"}, 400, "invalid-position"),
        ({"to": "x.1.1"}, 400, "invalid-position"),
        ({"since": "yesterday"}, 400, "invalid-time"),
        ({"since": "2026-12-02", "until": "2026-12-01"}, 400, "empty-range"),
        ({"from": "feedface.0.1-0"}, 409, "position-from-another-log"),
        ({"limit": "0"}, 400, "invalid-limit"),
        ({"limit": "²"}, 400, "invalid-limit"),
    ],
)
async def test_bad_selections_are_problems(
    served: tuple[httpx.AsyncClient, Appender, Workload], params: dict[str, str], status: int, slug: str
) -> None:
    client, _, _ = served
    r = await client.get("/v1/history", params=params, headers=analyst())
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == f"/problems/{slug}"
