"""The trimmed-history rule (`realtime_fanout/trimrule.py`): a table over `XINFO STREAM` replies shaped as
Redis 6.2 and 7 give them, and a property on real servers of both versions (random appends and trims)
checked against what the test itself removed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime_fanout.cursor import stream_key
from realtime_fanout.trimrule import NotHeld, Served, history_plan, stream_holds

FIELDS: dict[Any, Any] = {b"event": b"{}"}


def v6(first: str | None, last_generated: str, length: int) -> dict[str, Any]:
    """An XINFO STREAM reply of Redis 6.2 (as redis-py parses it)."""
    entry = None if first is None else (first.encode(), FIELDS)
    return {"length": length, "radix-tree-keys": 1, "radix-tree-nodes": 2,
            "last-generated-id": last_generated.encode(), "groups": 0, "first-entry": entry,
            "last-entry": None if first is None else (last_generated.encode(), FIELDS)}  # fmt: skip


def v7(first: str | None, last_generated: str, length: int, added: int) -> dict[str, Any]:
    """An XINFO STREAM reply of Redis 7.0 (XTRIM leaves max-deleted-entry-id at 0-0)."""
    return {**v6(first, last_generated, length), "max-deleted-entry-id": b"0-0", "entries-added": added,
            "recorded-first-entry-id": (first or "0-0").encode()}  # fmt: skip


NOT_HELD = NotHeld("", may_catch_up=True)
GONE = NotHeld("", may_catch_up=False)
TABLE: list[tuple[str, dict[str, Any] | None, str, str | None, Served | NotHeld]] = [
    # name, XINFO reply (None: no key), cursor, archive head, plan
    ("no stream, cursor at the origin", None, "0-0", None, Served()),
    ("no stream, cursor past the origin", None, "4-0", "9-0", GONE),
    ("6.2 cursor at the first entry", v6("3-0", "5-0", 3), "3-0", None, Served()),
    ("6.2 cursor after the first entry", v6("3-0", "5-0", 3), "4-0", None, Served()),
    ("6.2 cursor before it, nothing archived", v6("3-0", "5-0", 3), "2-0", None, NOT_HELD),
    ("6.2 cursor before it, archive reaches it", v6("3-0", "5-0", 3), "2-0", "3-0", Served("3-0")),
    ("6.2 cursor before it, archive behind", v6("3-0", "5-0", 3), "1-0", "2-5", NOT_HELD),
    ("6.2 origin, nothing archived: assumed", v6("3-0", "5-0", 3), "0-0", None, Served()),
    ("6.2 origin, archive behind", v6("3-0", "5-0", 3), "0-0", "1-0", NOT_HELD),
    ("6.2 origin, archive reaches it", v6("3-0", "5-0", 3), "0-0", "4-0", Served("3-0")),
    ("6.2 emptied, cursor at last id", v6(None, "5-0", 0), "5-0", None, Served()),
    ("6.2 emptied, archive reaches it", v6(None, "5-0", 0), "4-0", "5-0", Served("5-0")),
    ("6.2 emptied, origin: assumed", v6(None, "5-0", 0), "0-0", None, Served()),
    ("7 never trimmed, origin", v7("3-0", "5-0", 3, 3), "0-0", None, Served()),
    ("7 never trimmed, cursor before first", v7("3-0", "5-0", 3, 3), "1-0", "1-0", Served()),
    ("7 trimmed, origin, nothing archived", v7("3-0", "5-0", 3, 5), "0-0", None, NOT_HELD),
    ("7 trimmed, origin, archive reaches it", v7("3-0", "5-0", 3, 5), "0-0", "3-0", Served("3-0")),
    ("7 trimmed, cursor at the first entry", v7("3-0", "5-0", 3, 5), "3-0", None, Served()),
    ("7 trimmed, archive behind", v7("3-0", "5-0", 3, 5), "2-0", "2-9", NOT_HELD),
    ("7 emptied, cursor at last id", v7(None, "5-0", 0, 5), "5-0", None, Served()),
    ("7 emptied, archive reaches it", v7(None, "5-0", 0, 5), "1-0", "5-0", Served("5-0")),
    ("7 emptied, nothing archived", v7(None, "5-0", 0, 5), "0-0", None, NOT_HELD),
]


@pytest.mark.parametrize(
    ("info", "cursor", "head", "plan"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_the_rule_on_6_2_and_7_replies(
    info: dict[str, Any] | None, cursor: str, head: str | None, plan: Served | NotHeld
) -> None:
    got = history_plan(info, None if head is None else stream_key(head), stream_key(cursor))
    if isinstance(plan, NotHeld):
        assert isinstance(got, NotHeld) and got.may_catch_up == plan.may_catch_up
    else:
        assert got == plan
    if stream_holds(info, stream_key(cursor)):  # the archive is not even asked
        assert got == Served() and history_plan(info, None, stream_key(cursor)) == got


@pytest.fixture(scope="module")
def server(contract_redis_url: str) -> Iterator[tuple[redis.Redis, int]]:
    client = redis.Redis.from_url(contract_redis_url)
    major = int(str(client.info("server")["redis_version"]).split(".")[0])
    yield client, major
    client.close()


def ids(client: redis.Redis, key: str) -> list[int]:
    """The entries `key` holds, as the first part of their ids (the test's ids are `<n>-0`)."""
    entries: Any = client.xrange(key)
    return [stream_key(entry[0].decode())[0] for entry in entries]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 3)),
        st.tuples(st.just("trim"), st.integers(0, 12)),
        st.tuples(st.just("del-first"), st.just(0)),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, cursor_at=st.integers(0, 14), head_at=st.none() | st.integers(0, 14))
def test_the_rule_is_sound_on_a_real_server(
    server: tuple[redis.Redis, int], ops: list[tuple[str, int]], cursor_at: int, head_at: int | None
) -> None:
    """Whatever the plan serves from the stream is still in it, and what the archive must serve lies within
    its head; on Redis 7 a stream nothing was removed from needs no archive. Entries go only from a stream's
    start (XTRIM MINID, or XDEL of the first): the log never deletes inside a stream."""
    client: Any = server[0]
    major = server[1]
    key = "trimrule:" + str(id(ops))
    client.delete(key)
    added: list[int] = []
    removed = False
    for op, n in ops:
        if op == "add":
            for _ in range(n):
                added.append(len(added) + 1)
                client.xadd(key, FIELDS, id=f"{added[-1]}-0")
        elif op == "trim" and added:
            removed |= int(client.xtrim(key, minid=f"{n}-0", approximate=False)) > 0
        elif op == "del-first" and (first := ids(client, key)[:1]):
            removed |= int(client.xdel(key, f"{first[0]}-0")) > 0
    try:
        info: Any = client.xinfo_stream(key)
    except redis.exceptions.ResponseError:
        info = None
    held = set(ids(client, key))
    client.delete(key)
    cursor, head = (cursor_at, 0), None if head_at is None else (head_at, 0)
    if info is None:
        cursor = (0, 0) if not added else cursor
    lost = {i for i in added if i > cursor[0] and i not in held}
    plan = history_plan(info, head, cursor)
    if major >= 7 and not removed and info is not None:
        assert plan == Served()
    if major < 7 and cursor == (0, 0) and head is None:
        return  # Redis 6 cannot tell; the rule assumes "0-0" is served (README says so)
    if isinstance(plan, Served):
        until = 0 if plan.archive_until is None else stream_key(plan.archive_until)[0]
        assert all(i <= until for i in lost), (ops, cursor, plan)
        if plan.archive_until is not None:
            assert head is not None and head >= stream_key(plan.archive_until)
