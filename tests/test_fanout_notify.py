"""End to end: unread counts seeded from the real projector's read model, read receipts, own archive events."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from command_api import commands
from command_api.append import Appender
from command_api.bodies import MarkRead, SendMessage
from command_api.commands import Context
from devstack.ports import free_port
from tests.fanout_fixtures import ROOT, Client, Log, fanout_env


@pytest.fixture
def projector(redis_server_url: str, log_namespace: str, database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `python -m projector` on the test's log and database; yields the database URL."""
    env = fanout_env(redis_server_url, log_namespace, DATABASE_URL=database_url)
    env.update(PARLEY_PROJECTOR_HTTP_PORT=str(free_port()), PARLEY_PROJECTOR_BLOCK_MS="100")
    with (tmp_path / "projector.log").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "projector"], env=env, cwd=ROOT, stdout=out, stderr=out
        )
    try:
        yield database_url
    finally:
        proc.kill()
        proc.wait(10)


async def inbox(database_url: str, user: str, cid: str) -> tuple[int, int] | None:
    """(unread_count, read_seq) of the read model, or None before the projector has the row."""
    try:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute(
                "SELECT unread_count, read_seq FROM parley.inbox WHERE user_id = %s AND conversation_id = %s",
                (user, cid),
            )
            row = await cur.fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return None if row is None else (int(row[0]), int(row[1]))


async def until_projected(database_url: str, user: str, cid: str, want: tuple[int, int]) -> None:
    deadline = time.monotonic() + 20
    while (got := await inbox(database_url, user, cid)) != want:
        assert time.monotonic() < deadline, f"projector never reached {want} (at {got})"
        await asyncio.sleep(0.05)


def kinds(client: Client, kind: str) -> list[dict[str, Any]]:
    return [f for f in client.control if f["type"] == kind]


@pytest.mark.slow
async def test_unread_counts_read_receipts_and_own_archive_reach_the_right_connections(
    appender: Appender, make_fanout: Any, projector: str
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    await log.create("other", "bob")
    for n in range(3):
        await log.send("room", "alice", f"m{n}")
    await until_projected(projector, "bob", "room", (3, 0))
    fanout = await make_fanout(DATABASE_URL=projector, PARLEY_FANOUT_UNREAD_WAIT_S="10")
    bob = await Client.open(fanout.url, "bob")
    bob_other = await Client.open(fanout.url, "bob", conversations=["other"])
    alice = await Client.open(fanout.url, "alice")
    await log.send("room", "alice", "m3")
    await bob.until(lambda c: kinds(c, "unread"))
    unread = {"type": "unread", "conversation_id": "room", "unread": 4, "read_seq": 0, "seq": 5}
    assert kinds(bob, "unread") == [unread]
    m3 = next(e for e in bob.events if e["payload"].get("body") == "m3")
    assert m3["seq"] == 5
    await appender.append(
        commands.delete_message(Context(actor="alice"), "room", m3["payload"]["message_id"])
    )
    await bob.until(lambda c: len(kinds(c, "unread")) == 2)
    assert kinds(bob, "unread")[-1] == {**unread, "unread": 3, "seq": 6}
    await appender.append(commands.mark_read(Context(actor="bob"), "room", MarkRead(up_to_seq=3)))
    await bob.until(lambda c: len(kinds(c, "unread")) == 3)
    receipt = {"type": "read", "conversation_id": "room", "user_id": "bob", "up_to_seq": 3, "seq": 7}
    assert kinds(bob, "read") == [receipt]
    assert kinds(bob, "unread")[-1] == {**unread, "unread": 1, "read_seq": 3, "seq": 7}
    await alice.until(lambda c: kinds(c, "read"))
    assert kinds(alice, "read") == [receipt] and kinds(alice, "unread") == []  # alice wrote them all
    await until_projected(projector, "bob", "room", (1, 3))  # the read model agrees
    await appender.append(commands.archive(Context(actor="bob"), "room"))
    await log.send("other", "bob", "marker")
    await log.send("room", "bob", "after")
    for client in (bob, bob_other):  # every connection of bob's, the one filtered to "other" too
        await client.until(
            lambda c: (
                "marker" in c.bodies() and "conversation_archived" in [e["payload"]["type"] for e in c.events]
            )
        )  # two conversations, maybe two partitions: no order between them
    await alice.until(lambda c: "after" in c.bodies())
    assert "conversation_archived" not in [e["payload"]["type"] for e in alice.events]  # nobody else's
    for client in (bob, bob_other, alice):
        await client.close()


async def test_a_delete_and_a_read_past_the_held_ids_are_counted_exactly_by_a_reseed(
    appender: Appender, make_fanout: Any, projector: str
) -> None:
    """One unread id held per conversation (PARLEY_FANOUT_UNREAD_WINDOW=1): deleting the oldest unread
    message, then reading part of the backlog, cannot be decided from it; the connection reads the count
    again from the read model, and each frame still equals the read model's row."""
    log = Log(appender)
    await log.create("room", "alice", "bob")
    for n in range(4):
        await log.send("room", "alice", f"m{n}")  # seq 2-5
    await until_projected(projector, "bob", "room", (4, 0))
    fanout = await make_fanout(
        DATABASE_URL=projector, PARLEY_FANOUT_UNREAD_WAIT_S="10", PARLEY_FANOUT_UNREAD_WINDOW="1"
    )
    bob = await Client.open(fanout.url, "bob")
    async with await psycopg.AsyncConnection.connect(projector) as conn:
        cur = await conn.execute(
            "SELECT message_id FROM parley.messages WHERE conversation_id = 'room' AND seq = 2"
        )
        (first,) = await cur.fetchone() or (None,)
    await appender.append(commands.delete_message(Context(actor="alice"), "room", str(first)))
    await bob.until(lambda c: kinds(c, "unread"))
    unread = {"type": "unread", "conversation_id": "room", "unread": 3, "read_seq": 0, "seq": 6}
    assert kinds(bob, "unread") == [unread]
    await until_projected(projector, "bob", "room", (3, 0))
    await appender.append(commands.mark_read(Context(actor="bob"), "room", MarkRead(up_to_seq=3)))
    await bob.until(lambda c: len(kinds(c, "unread")) == 2)
    assert kinds(bob, "unread")[-1] == {**unread, "unread": 2, "read_seq": 3, "seq": 7}
    await until_projected(projector, "bob", "room", (2, 3))
    await bob.close()


@pytest.mark.slow
async def test_after_remove_delete_re_add_the_unread_frame_equals_the_read_model(
    appender: Appender, make_fanout: Any, projector: str
) -> None:
    log = Log(appender)
    alice = Context(actor="alice")
    await log.create("room", "alice", "bob")
    for mid in ("m1", "m2"):
        await appender.append(commands.send_message(alice, "room", SendMessage(body=mid, message_id=mid)))
    await until_projected(projector, "bob", "room", (2, 0))
    fanout = await make_fanout(DATABASE_URL=projector, PARLEY_FANOUT_UNREAD_WAIT_S="10")
    connected_while_in = await Client.open(fanout.url, "bob")
    await log.remove("room", "alice", "bob")
    await connected_while_in.until(
        lambda c: any(e["payload"]["type"] == "participant_removed" for e in c.events)
    )
    connected_while_out = await Client.open(fanout.url, "bob")  # seeded with the frozen row
    await appender.append(commands.delete_message(alice, "room", "m1"))
    await log.add("room", "alice", "bob")
    for bob in (connected_while_in, connected_while_out):
        await bob.until(lambda c: kinds(c, "unread"))
        assert kinds(bob, "unread") == [
            {"type": "unread", "conversation_id": "room", "unread": 1, "read_seq": 0, "seq": 6}
        ]
        assert 5 not in [e["seq"] for e in bob.events]  # the deletion itself is not shown while out
    await until_projected(projector, "bob", "room", (1, 0))  # the read model agrees
    await appender.append(commands.delete_message(alice, "room", "m2"))
    for bob in (connected_while_in, connected_while_out):
        await bob.until(lambda c: len(kinds(c, "unread")) == 2)
        assert kinds(bob, "unread")[-1]["unread"] == 0
        await bob.close()
