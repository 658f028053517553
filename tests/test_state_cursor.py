"""State to stream: every query API answer carries the fanout cursor it is exact at, and a client that loads
state mid-load and subscribes from that cursor folds exactly the truth (real Redis, Postgres, projector
process and fanout process, concurrent writers)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import psycopg
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from command_api import bodies, commands
from command_api.append import Appender
from command_api.exceptions import CommandRefused
from devstack.ports import free_port
from events.cursor import decode_cursor, encode_cursor
from events.position import LogPosition
from projector.exceptions import ReadModelsFromAnotherEpoch
from projector.migrate import migrate
from projector.params import Problem, parse_wait
from projector.reads import Reads, exact_cursor, reached, reached_all
from projector.settings import ProjectorSettings
from servicekit.log_settings import LogSettings
from tests.fanout_fixtures import PARTITIONS, ROOT, Client, fanout_env, token
from tests.rawredis import Entries
from tests.test_projector_api import AUTH, headers
from tests.test_projector_query_limits import Served, is_problem, served

__all__ = ["served"]  # fixtures

ROUTES = ("/v1/conversations", "/v1/conversations/c1/messages", "/v1/unread", "/v1/search?q=pizza")


def test_the_cursor_of_checkpoints_is_0_0_only_where_nothing_was_projected() -> None:
    wire = decode_cursor(exact_cursor({0: ("e1", "5-1"), 1: (None, "0-0")}, "e1", 3))
    assert (wire.epoch, wire.positions) == ("e1", ["5-1", "0-0", "0-0"])  # partition 2: no row yet
    with pytest.raises(ReadModelsFromAnotherEpoch):  # holds another log's events: no position is exact
        exact_cursor({0: ("e1", "5-1"), 1: ("e0", "9-0")}, "e1", 2)
    nothing = [LogPosition(0, "0-0", "e1"), LogPosition(1, "0-0", "e1")]
    assert reached_all({}, nothing) and reached(None, nothing[0])  # folded nothing includes nothing
    assert not reached_all({0: ("e1", "5-1")}, [LogPosition(0, "5-1", "e1"), LogPosition(1, "1-0", "e1")])


def test_a_wait_is_a_position_token_or_a_fanout_cursor_of_this_logs_partitions() -> None:
    assert parse_wait("e1.1.5-0", 2) == [LogPosition(1, "5-0", "e1")]
    assert parse_wait(encode_cursor("e1", ["3-0", "0-0"]), 2) == [
        LogPosition(0, "3-0", "e1"), LogPosition(1, "0-0", "e1"),
    ]  # fmt: skip
    for bad in (encode_cursor("e1", ["3-0"]), encode_cursor("e\x00", ["1-0", "1-0"]), "Zm9v", "A" * 5000):
        with pytest.raises(Problem) as caught:
            parse_wait(bad, 2)
        assert caught.value.slug == "invalid-position"


async def checkpoint_rows(database_url: str) -> dict[int, tuple[str | None, str]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT partition, epoch, stream_id FROM parley.checkpoints")
        return {p: (e, s) for p, e, s in await cur.fetchall()}


async def test_every_answer_carries_the_cursor_of_its_snapshot_and_waits_for_one(
    served: Served, redis_client: aioredis.Redis, database_url: str
) -> None:
    client, position = served.client, served.position
    checkpoints = await checkpoint_rows(database_url)
    for route in ROUTES:
        r = await client.get(route, headers=headers("bob"))
        assert r.status_code == 200, r.text
        assert r.headers["x-parley-cursor"] == r.json()["cursor"], route
        wire = decode_cursor(r.json()["cursor"])
        assert wire.epoch == position.epoch
        assert wire.positions[position.partition] == position.stream_id  # c1's partition: its last entry
        assert wire.positions[1 - position.partition] == "0-0"  # the other one has folded nothing
        assert [checkpoints[p][1] for p in range(2)] == wire.positions
    r = await client.get("/v1/conversations/c1/messages", headers=headers("bob"))
    assert r.json()["last_seq"] == 2  # the events this answer holds: seq 1..2

    appender = Appender(redis_client, served.settings.log.layout())
    await appender.open()
    try:
        later = await appender.append(commands.send_message(commands.Context("ann"), "c1",
                                                            bodies.SendMessage("later")))  # fmt: skip
    finally:
        await appender.close()
    positions = ["0-0", "0-0"]
    positions[later.position.partition] = later.position.stream_id
    wait = encode_cursor(later.position.epoch, positions)
    r = await client.get("/v1/unread", headers={**headers("bob"), "X-Parley-Position": wait})
    assert r.json()["unread"] == 2  # waited for the cursor's every partition
    assert decode_cursor(r.json()["cursor"]).positions[later.position.partition] == later.position.stream_id
    far = encode_cursor(position.epoch, ["0-0", "99999999999999-0"])
    assert is_problem(await client.get("/v1/unread", params={"position": far}, headers=headers("bob")),
                      503, "position-not-reached")  # fmt: skip
    other = encode_cursor("feedface", ["0-0", "0-0"])
    assert is_problem(await client.get("/v1/unread", params={"position": other}, headers=headers("bob")),
                      409, "position-from-another-log")  # fmt: skip

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("UPDATE parley.checkpoints SET epoch = 'feedface', stream_id = '1-0' "
                           "WHERE partition = %s", (1 - position.partition,))  # fmt: skip
    r = await client.get("/v1/unread", headers=headers("bob"))
    assert is_problem(r, 503, "read-models-from-another-log") and r.headers["retry-after"] == "1"


async def test_a_read_straddling_a_schema_swap_is_done_again(database_url: str) -> None:
    """A statement resolves `parley.*` when it runs, so a rebuild's swap between two statements of one
    snapshot would pair the old checkpoints with the new rows: the read is redone on the new schema."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        await migrate(admin)
        await admin.execute(
            "INSERT INTO parley.checkpoints (partition, epoch, stream_id) VALUES (0, 'e1', '5-0')"
        )
        settings = ProjectorSettings(log=LogSettings("", "ns", 1), database_url=database_url, auth=AUTH)
        calls: list[int] = []

        async def read(conn: psycopg.AsyncConnection[Any]) -> str | None:
            calls.append(1)
            if len(calls) == 1:  # what a rebuild's swap does, between this read's statements
                await admin.execute(
                    "CREATE SCHEMA parley_new; CREATE TABLE parley_new.checkpoints (LIKE parley.checkpoints "
                    "INCLUDING ALL); INSERT INTO parley_new.checkpoints (partition, epoch, stream_id) "
                    "VALUES (0, 'e1', '7-0'); ALTER SCHEMA parley RENAME TO parley_old; "
                    "ALTER SCHEMA parley_new RENAME TO parley"
                )
            cur = await conn.execute("SELECT stream_id FROM parley.checkpoints")
            row = await cur.fetchone()
            return None if row is None else str(row[0])

        async with Reads(settings) as reads:
            value, cursor = await reads.exact("e1", read)
    assert len(calls) == 2 and value == "7-0" and decode_cursor(cursor).positions == ["7-0"]


# The end-to-end splice. bob's client loads the conversation list and each conversation's messages while
# three writers send, edit, delete, mark read, archive and create conversations, subscribes from the list's
# cursor, and folds what it received into what it loaded with the README's rules.

USERS = ("alice", "carol", "bob")
ME = "bob"


@dataclass
class Writers:
    """Concurrent writers with what they need to know to issue commands that are accepted."""

    appender: Appender
    rooms: list[str]
    mine: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # user -> (room, message id)
    done: int = 0
    n: int = 0
    loaded: asyncio.Event = field(default_factory=asyncio.Event)  # set once the client has loaded its state

    async def run(self, user: str, rng: random.Random, after_load: int, most: int = 1000) -> None:
        """Write until `after_load` commands after the client loaded (at most `most` in all)."""
        ctx = commands.Context(user)
        for _ in range(most):
            if self.loaded.is_set():
                if after_load == 0:
                    return
                after_load -= 1
            self.n += 1
            try:
                await self.act(ctx, rng, rng.choice(self.rooms))
            except CommandRefused:  # a read marker not advanced, already archived, ...: nothing appended
                pass
            self.done += 1
            await asyncio.sleep(rng.random() * 0.02)

    async def act(self, ctx: commands.Context, rng: random.Random, room: str) -> None:
        user, append = ctx.actor, self.appender.append
        owned = [m for m in self.mine.get(user, []) if m[0] == room]
        roll = rng.random()
        if roll < 0.5 or not owned or (user != ME and 0.75 <= roll < 0.95):
            mid = f"m{self.n}"
            await append(
                commands.send_message(ctx, room, bodies.SendMessage(f"{user} {self.n}", message_id=mid))
            )
            self.mine.setdefault(user, []).append((room, mid))
        elif roll < 0.65:
            await append(
                commands.edit_message(ctx, room, rng.choice(owned)[1], bodies.EditMessage(f"e{self.n}"))
            )
        elif roll < 0.75:
            target = rng.choice(owned)
            self.mine[user].remove(target)
            await append(commands.delete_message(ctx, room, target[1]))
        elif user == ME and roll < 0.9:
            sent = await append(commands.send_message(ctx, room, bodies.SendMessage("ping")))
            await append(commands.mark_read(ctx, room, bodies.MarkRead(rng.randint(1, sent.seq))))
        elif user == ME:
            await append(commands.archive(ctx, room) if rng.random() < 0.5 else commands.unarchive(ctx, room))
        else:  # a new conversation naming bob, mid-load
            room = f"new{self.n}"
            create = bodies.CreateConversation(
                title=f"t {room}", participants=[o for o in USERS if o != user]
            )
            await append(commands.create_conversation_with_id(ctx, create, room))
            self.rooms.append(room)


@pytest.fixture
def query_api(redis_server_url: str, log_namespace: str, database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `python -m projector` (worker and query API) on the test's log; yields the API's base URL."""
    port = free_port()
    env = fanout_env(redis_server_url, log_namespace, DATABASE_URL=database_url,
                     PARLEY_PROJECTOR_HTTP_PORT=str(port), PARLEY_PROJECTOR_BLOCK_MS="100")  # fmt: skip
    with (tmp_path / "projector.log").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "projector"], env=env, cwd=ROOT, stdout=out, stderr=out
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


async def until_served(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            if (await http.get("/v1/unread")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the query API never answered"
        await asyncio.sleep(0.05)


async def subscribe(url: str, user: str, cursor: str) -> Client:
    """The client contract: auth, wait for `authenticated`, then subscribe from the state's cursor."""
    client = Client(await connect(url, open_timeout=5, close_timeout=2))
    await client.ws.send(msgspec.json.encode({"type": "auth", "token": token(user)}).decode())
    await client.until(lambda c: any(f["type"] == "authenticated" for f in c.control))
    await client.ws.send(msgspec.json.encode({"type": "subscribe", "cursor": cursor}).decode())
    return client


async def log_head(redis: aioredis.Redis, namespace: str, epoch: str) -> str:
    """A fanout cursor at every partition's last entry: reading at it waits for everything written."""
    layout = LogSettings("", namespace, PARTITIONS).layout()
    heads = []
    for p in range(PARTITIONS):
        last = cast(Entries, await redis.xrevrange(layout.stream_key(p), count=1))
        heads.append(last[0][0].decode() if last else "0-0")
    return encode_cursor(epoch, heads)


Message = list[Any]  # [message_id, author, body, state], as the query API shows it


def fold_message(messages: dict[int, Message], event: dict[str, Any]) -> None:
    """The README's message rules: an edit replaces the body, a deletion withdraws it."""
    payload = event["payload"]
    kind = payload["type"]
    if kind == "message_sent":
        messages[event["seq"]] = [payload["message_id"], event["actor"], payload["body"], "sent"]
    elif kind in ("message_edited", "message_deleted"):
        (message,) = [m for m in messages.values() if m[0] == payload["message_id"]]
        message[2:] = [payload["body"], "edited"] if kind == "message_edited" else [None, "deleted"]


@dataclass
class Listed:
    """A conversation list item as the client folds it: unread(u, c) kept as the set of unread seqs."""

    title: str
    archived: bool
    last_seq: int
    unread: set[int]

    def fold(self, event: dict[str, Any], seq_of: dict[str, int]) -> None:
        payload = event["payload"]
        kind, mine = payload["type"], event["actor"] == ME
        self.last_seq = event["seq"]
        if kind == "message_sent" and not mine:
            self.unread.add(event["seq"])
        elif kind == "message_deleted":
            self.unread.discard(seq_of[payload["message_id"]])
        elif kind == "messages_read" and mine:
            self.unread = {s for s in self.unread if s > payload["up_to_seq"]}
        elif kind in ("conversation_archived", "conversation_unarchived") and mine:
            self.archived = kind == "conversation_archived"

    def row(self) -> tuple[str, int, bool, int]:
        return self.title, len(self.unread), self.archived, self.last_seq


def unread_at_load(item: dict[str, Any], page: dict[str, Any], later: list[dict[str, Any]]) -> set[int]:
    """The unread seqs the list item counts: the last `unread_count` messages by others not deleted at its
    cursor (a message the page shows deleted was not, if its deletion came after the list's last_seq)."""
    deleted_later = {e["payload"]["message_id"] for e in later if e["payload"]["type"] == "message_deleted"}
    candidates = sorted(
        m["seq"] for m in page["messages"]
        if m["seq"] <= item["last_seq"] and m["author"] != ME
        and (m["state"] != "deleted" or m["message_id"] in deleted_later)
    )  # fmt: skip
    count = item["unread_count"]
    assert count <= len(candidates), (item, candidates)
    return set(candidates[len(candidates) - count :])


async def read_models(
    http: httpx.AsyncClient, at: str
) -> tuple[dict[str, Any], dict[str, dict[int, Message]]]:
    """The list rows and every conversation's messages, once the read models reached `at`."""
    listing = (await http.get("/v1/conversations", params={"limit": 200, "position": at})).json()
    rows = {i["conversation_id"]: (i["title"], i["unread_count"], i["archived"], i["last_seq"])
            for i in listing["conversations"]}  # fmt: skip
    messages = {}
    for cid in rows:
        page = (await http.get(f"/v1/conversations/{cid}/messages", params={"limit": 200})).json()
        messages[cid] = {
            m["seq"]: [m["message_id"], m["author"], m["body"], m["state"]] for m in page["messages"]
        }
    return rows, messages


@pytest.mark.slow
async def test_state_loaded_mid_load_plus_the_stream_from_its_cursor_is_the_read_models(
    appender: Appender,
    make_fanout: Any,
    query_api: str,
    redis_client: aioredis.Redis,
    log_namespace: str,
    database_url: str,
) -> None:
    rooms = [f"room{i}" for i in range(4)]
    for room in rooms:
        create = bodies.CreateConversation(title=f"t {room}", participants=["bob", "carol"])
        await appender.append(commands.create_conversation_with_id(commands.Context("alice"), create, room))
    fanout = await make_fanout(DATABASE_URL=database_url)
    writers = Writers(appender, rooms)
    async with httpx.AsyncClient(
        base_url=query_api, headers={"Authorization": f"Bearer {token(ME)}"}
    ) as http:
        await until_served(http)
        tasks = [asyncio.create_task(writers.run(u, random.Random(i), 40)) for i, u in enumerate(USERS)]
        while writers.done < 120:
            await asyncio.sleep(0.005)
        # Mid-load: the list (once the read models hold what was written so far), its cursor, a subscription
        # from it, then each conversation's messages.
        head = await log_head(redis_client, log_namespace, appender.epoch or "")
        r = await http.get("/v1/conversations", params={"limit": 200, "position": head})
        listing = r.json()
        assert r.headers["x-parley-cursor"] == listing["cursor"]
        client = await subscribe(fanout.url, ME, listing["cursor"])
        pages = {}
        for item in listing["conversations"]:
            cid = item["conversation_id"]
            pages[cid] = (await http.get(f"/v1/conversations/{cid}/messages", params={"limit": 200})).json()
        writers.loaded.set()  # the writers write on for a while
        await asyncio.gather(*tasks)
        assert appender.epoch is not None
        truth, truth_messages = await read_models(
            http, await log_head(redis_client, log_namespace, appender.epoch)
        )
        total = (await http.get("/v1/unread")).json()["unread"]

    listed = {item["conversation_id"]: item for item in listing["conversations"]}
    final_seq = {cid: row[3] for cid, row in truth.items()}

    def received_all(c: Client) -> bool:
        got = {cid: item["last_seq"] for cid, item in listed.items()}
        for event in c.events:
            got[event["conversation_id"]] = event["seq"]
        return got == final_seq

    await client.until(received_all, wait_s=20)
    await client.close()

    # Per conversation, the events received are exactly those after the state: no duplicate, no gap.
    events: dict[str, list[dict[str, Any]]] = {cid: [] for cid in final_seq}
    for event in client.events:
        events[event["conversation_id"]].append(event)
    for cid, evs in events.items():
        first = listed[cid]["last_seq"] + 1 if cid in listed else 1
        assert [e["seq"] for e in evs] == list(range(first, final_seq[cid] + 1)), cid
    assert sum(map(len, events.values())) > 0 and set(final_seq) - set(listed), "nothing happened mid-load"

    views: dict[str, Listed] = {}
    messages: dict[str, dict[int, Message]] = {}
    for cid, evs in events.items():
        if cid in listed:
            item, page = listed[cid], pages[cid]
            assert page["last_seq"] >= item["last_seq"] and all(
                m["seq"] <= page["last_seq"] for m in page["messages"]
            )
            messages[cid] = {
                m["seq"]: [m["message_id"], m["author"], m["body"], m["state"]] for m in page["messages"]
            }
            for event in evs:  # the page holds every event up to its own last_seq: fold only the later ones
                if event["seq"] > page["last_seq"]:
                    fold_message(messages[cid], event)
            view = Listed(item["title"], item["archived"], item["last_seq"], unread_at_load(item, page, evs))
        else:  # created mid-load, naming bob: all of it from the stream
            messages[cid] = {}
            for event in evs:
                fold_message(messages[cid], event)
            created, evs = evs[0], evs[1:]
            assert created["payload"]["type"] == "conversation_created"
            view = Listed(created["payload"]["title"], False, created["seq"], set())
        seq_of = {m[0]: seq for seq, m in messages[cid].items()}
        for event in evs:
            view.fold(event, seq_of)
        views[cid] = view

    assert {cid: v.row() for cid, v in views.items()} == truth  # unread counts included
    assert messages == truth_messages
    assert sum(len(v.unread) for v in views.values()) == total
