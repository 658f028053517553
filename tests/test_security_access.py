"""Security suite: who sees what, table-driven against the real services. A stranger, a removed
participant, a re-added participant and a late joiner get exactly what the README grants them on every
query route and on the WebSocket (from a forged start-of-log cursor too), and nothing else."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from events.cursor import decode_cursor, encode_cursor
from tests.fanout_fixtures import PARTITIONS, token
from tests.test_http_edge import Services
from tests.test_http_edge import services as services  # the real processes, one set per module

pytestmark = pytest.mark.security

WORDS = {"m1": "alpha", "m2": "bravo", "m3": "charlie"}


@dataclass(frozen=True)
class Grant:
    """What the README grants one user of the conversation after the script below."""

    messages: frozenset[str] | None  # the words of the messages page; None: 404 as for a missing one
    listed: bool  # in GET /v1/conversations (current conversations only)
    unread: int


GRANTS = {
    "alice": Grant(frozenset({"m1", "m2", "m3"}), True, 0),  # the creator, who sent everything
    "bob": Grant(frozenset({"m1", "m2"}), False, 0),  # removed after m2: keeps what he saw, unread frozen
    "carol": Grant(frozenset({"m1", "m3"}), True, 2),  # removed after m1, re-added before m3
    "dave": Grant(frozenset({"m3"}), True, 1),  # added after m2
    "eve": Grant(None, False, 0),  # never in it
}


class Api:
    def __init__(self, http: httpx.AsyncClient, services: Services) -> None:
        self.http, self.services, self.position = http, services, ""

    async def command(self, user: str, method: str, path: str, body: object = None) -> dict[str, Any]:
        answer = await self.http.request(
            method, f"http://127.0.0.1:{self.services.command_api}{path}", json=body,
            headers={"Authorization": f"Bearer {token(user)}", "Idempotency-Key": uuid.uuid4().hex},
        )  # fmt: skip
        assert answer.status_code == 202, (method, path, answer.text)
        result: dict[str, Any] = answer.json()
        self.position = result["position_token"]
        return result

    async def read(self, user: str, path: str, **params: str) -> httpx.Response:
        return await self.http.get(
            f"http://127.0.0.1:{self.services.query_api}{path}", params={**params, "position": self.position},
            headers={"Authorization": f"Bearer {token(user)}"},
        )  # fmt: skip


async def _script(api: Api) -> str:
    suffix = uuid.uuid4().hex[:8]
    created = await api.command("alice", "POST", "/v1/conversations",
                                {"title": "t", "participants": ["bob", "carol"]})  # fmt: skip
    cid = str(created["conversation_id"])
    base = f"/v1/conversations/{cid}"
    await api.command("alice", "POST", f"{base}/messages", {"body": f"codeword {WORDS['m1']}{suffix}"})
    await api.command("alice", "DELETE", f"{base}/participants/carol")
    await api.command("alice", "POST", f"{base}/messages", {"body": f"codeword {WORDS['m2']}{suffix}"})
    await api.command("alice", "DELETE", f"{base}/participants/bob")
    await api.command("alice", "POST", f"{base}/participants", {"user_id": "dave"})
    await api.command("alice", "POST", f"{base}/participants", {"user_id": "carol"})
    await api.command("alice", "POST", f"{base}/messages", {"body": f"codeword {WORDS['m3']}{suffix}"})
    return cid


def _words_in(text: str) -> set[str]:
    return {m for m, word in WORDS.items() if word in text}


async def _stream_from_the_start(services: Services, user: str, epoch: str) -> str:
    """Every frame up to `live` for a subscriber who forged a cursor at the very start of the log."""
    forged = encode_cursor(epoch, ["0-0"] * PARTITIONS)
    frames = []
    async with connect(f"ws://127.0.0.1:{services.fanout}/v1/stream?token={token(user)}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "cursor": forged}))
        async with asyncio.timeout(10):
            while True:
                frame = json.loads(await ws.recv())
                frames.append(frame)
                if frame["type"] == "live":
                    break
    return json.dumps([f for f in frames if f["type"] in {"event", "events", "resync"}])


async def test_each_kind_of_user_gets_exactly_what_the_readme_grants(services: Services) -> None:
    async with httpx.AsyncClient(timeout=15) as http:
        api = Api(http, services)
        cid = await _script(api)
        missing = f"alice:missing-{uuid.uuid4().hex[:6]}"
        for user, grant in GRANTS.items():
            page = await api.read(user, f"/v1/conversations/{cid}/messages")
            if grant.messages is None:
                absent = await api.read(user, f"/v1/conversations/{missing}/messages")
                assert (page.status_code, page.content) == (absent.status_code, absent.content), user
                assert page.status_code == 404 and page.json()["type"].endswith("conversation-not-found")
            else:
                assert page.status_code == 200, (user, page.text)
                bodies = [m["body"] for m in page.json()["messages"] if m.get("body")]
                assert _words_in(" ".join(bodies)) == grant.messages, (user, bodies)
                assert len(bodies) == len(grant.messages), (user, bodies)
            listing = await api.read(user, "/v1/conversations")
            assert listing.status_code == 200, listing.text
            mine = [c for c in listing.json()["conversations"] if c["conversation_id"] == cid]
            assert bool(mine) == grant.listed, (user, mine)
            assert _words_in(json.dumps(mine)) <= (grant.messages or set()), (user, mine)
            unread = await api.read(user, "/v1/unread")
            assert unread.json()["unread"] == grant.unread, (user, unread.text)
            found = await api.read(user, "/v1/search", q="codeword")
            assert found.status_code == 200, found.text
            words = _words_in(json.dumps(found.json()["messages"]))
            assert words <= (grant.messages or set()), (user, words)
            if grant.listed:
                assert frozenset(words) == grant.messages, (user, words)
        epoch = decode_cursor(listing.json()["cursor"]).epoch
        for user, grant in GRANTS.items():
            seen = await _stream_from_the_start(services, user, epoch)
            assert _words_in(seen) == (grant.messages or set()), (user, seen[:500])
            if grant.messages is None:
                assert cid not in seen, user
            foreign = await _stream_from_the_start(services, user, "feedface" * 4)  # another log's epoch
            assert '"reason": "foreign-epoch"' in foreign, (user, foreign[:300])
            assert _words_in(foreign) <= (grant.messages or set()), (user, foreign[:500])
        for user in ("carol", "dave"):  # the re-added participant and the late joiner may post again
            await api.command(user, "POST", f"/v1/conversations/{cid}/messages", {"body": "back"})
