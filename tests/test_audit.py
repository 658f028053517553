"""`python -m projector audit`: green on a healthy deployment, and each check catches the fault it names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import psycopg
import redis.asyncio as aioredis

from command_api.append import Appender
from events import schema
from events.codec import encode
from events.cursor import encode_cursor
from events.layout import LogLayout
from events.log import LogEntry
from projector.audit import AuditInput, PartitionInput, Window, check_archive, check_received, run_checks
from projector.auditsource import gather
from realtime_fanout.client import Event, Live, Recorder
from tests.apiclient import ApiClient
from tests.conftest import DEV_SECRET
from tests.rawredis import Entries
from tests.test_projector_fold import envelope
from tests.test_projector_store import PARTITIONS, project_until_caught_up, settings_for
from tests.workload import Workload


def audit_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "projector", "audit", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_audit_green_then_each_injected_fault_found(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    layout = settings.log.layout()
    appender = Appender(redis_client, layout)
    await appender.open()
    env = {"REDIS_URL": redis_server_url, "PARLEY_LOG_NAMESPACE": log_namespace,
           "PARLEY_PARTITIONS": str(PARTITIONS), "DATABASE_URL": database_url}  # fmt: skip
    async with ApiClient.running(
        {**env, "PARLEY_JWT_SECRET": DEV_SECRET, "PARLEY_DEV_MODE": "1", "PARLEY_RATE_LIMIT_PER_S": "0"}
    ) as api:
        cid = await api.create_conversation("ann", "bob")
        for i in range(5):
            answer = await api.send("ann", cid, f"m{i}", {"Idempotency-Key": f"k{i}"})
            assert answer.status_code == 202
        await Workload(seed=3).append(appender, 300)
        await redis_client.xadd(layout.stream_key(1), {"e": b"\xffnot an event"})
        try:
            await project_until_caught_up(settings)
        finally:
            await appender.close()

        report = run_checks(await gather(settings))
        assert report.ok, report.text()
        idem = next(c for c in report.checks if c.name.startswith("idempotency"))
        assert idem.checked == 5
        assert run_checks(await gather(settings, sample=3)).ok
        done = audit_cli(env, "--json", "--sample", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["ok"] is True

        # A read-model row changed behind the fold's back, an idempotency record pointing nowhere, and an
        # event appended twice (same bytes: its seq repeats and its id appears twice).
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            await conn.execute("UPDATE parley.messages SET body = 'tampered' WHERE conversation_id = %s "
                               "AND seq = 2", (cid,))  # fmt: skip
        p = layout.partition_for(cid)
        await redis_client.set(layout.idempotency_key(p, "ann", "ghost"), b"fp\n9\n1-1\n")
        first = cast(Entries, await redis_client.xrange(layout.stream_key(p), "-", "+", count=1))[0]
        await redis_client.xadd(layout.stream_key(p), {k: v for k, v in first[1].items()})
        done = audit_cli(env)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "tampered" in done.stdout
        assert "ghost" in done.stdout
        assert "appears twice" in done.stdout and "where" in done.stdout
        assert audit_cli({**env, "REDIS_URL": "redis://127.0.0.1:1/0"}).returncode == 3
        assert audit_cli(env, "--since", "yesterday").returncode == 2


def _part(stream: list[LogEntry], archive: list[LogEntry], **kw: object) -> PartitionInput:
    return PartitionInput(0, stream, archive, {}, **kw)  # type: ignore[arg-type]


def _entries(*events: schema.Envelope) -> list[LogEntry]:
    return [LogEntry(0, f"{1000 + i}-0", encode(e)) for i, e in enumerate(events)]


CREATED = envelope("c", 1, "ann", schema.ConversationCreated("t", ("ann", "bob")))


def test_archive_check_finds_a_hole_a_changed_byte_and_an_unquarantined_entry() -> None:
    entries = _entries(CREATED, envelope("c", 2, "ann", schema.MessageSent("m", "x")))
    layout = LogLayout("t", 1)

    def audit(part: PartitionInput) -> AuditInput:
        return AuditInput("ep", layout, [part], {})

    healthy = _part(entries, entries, checkpoint="1001-0", events_applied=2, entries_added=2,
                    last_generated="1001-0")  # fmt: skip
    assert check_archive(audit(healthy)).ok
    # Redis 7 counted three entries; the archive and the stream hold two: one was lost.
    lost = _part(entries[1:], entries, checkpoint="1001-0", events_applied=2, entries_added=3,
                 last_generated="1001-0")  # fmt: skip
    assert "1 lost" in check_archive(audit(lost)).examples[0]
    changed = [LogEntry(0, entries[1].stream_id, entries[1].data.replace(b'"x"', b'"y"'))]
    tampered = _part(entries, entries[:1] + changed, checkpoint="1001-0", events_applied=2)
    assert "differ" in check_archive(audit(tampered)).examples[0]
    poison = [*entries, LogEntry(0, "1002-0", b"nope")]
    unquarantined = _part(poison, entries, checkpoint="1002-0", events_applied=3)
    assert "not a dead letter" in check_archive(audit(unquarantined)).examples[0]
    windowed = AuditInput("ep", layout, [lost], {}, window=Window(since_ms=1001))
    assert check_archive(windowed).ok  # the hole count needs the whole log


def test_received_check_sees_a_gap_a_duplicate_and_what_is_not_yours() -> None:
    layout = LogLayout("t", 1)
    events = [
        CREATED,
        envelope("c", 2, "ann", schema.MessageSent("m1", "x")),
        envelope("c", 3, "bob", schema.ConversationArchived()),  # bob's own: ann must not see it
        envelope("c", 4, "ann", schema.ParticipantRemoved("bob")),  # bob sees his removal, then nothing
        envelope("c", 5, "ann", schema.MessageSent("m2", "y")),
    ]
    entries = _entries(*events)
    part = _part(entries, entries, checkpoint="1004-0", events_applied=5)

    def cur(sid: str) -> str:
        return encode_cursor("ep", [sid])

    def record(user: str, got: list[int], start: str = "0-0", end: str = "1004-0") -> Recorder:
        rec = Recorder(f"s-{user}", user)
        rec.subscribed(cur(start), None)
        for i in got:
            rec.received(Event(msgspec_builtins(events[i]), None))
        rec.received(Live(cur(end)))
        return rec

    def verdict(*recs: Recorder) -> list[str]:
        lines = [line for rec in recs for line in rec.lines]
        return check_received(AuditInput("ep", layout, [part], {}, received=lines)).examples

    assert verdict(record("ann", [0, 1, 3, 4]), record("bob", [0, 1, 2, 3]), record("cy", [])) == []
    assert verdict(record("ann", [1, 3, 4], start="1000-0")) == []  # resumed after the creation
    assert "missing" in verdict(record("ann", [0, 3, 4]))[0]
    assert "twice" in verdict(record("ann", [0, 1, 1, 3, 4]))[0]
    assert "not theirs" in verdict(record("ann", [0, 1, 2, 3, 4]))[0]
    assert "not theirs" in verdict(record("bob", [0, 1, 2, 3, 4]))[0]
    assert "out of order" in verdict(record("ann", [1, 0, 3, 4]))[0]

    def fresh(user: str, got: list[int], start: str, *, live_first: bool = True) -> Recorder:
        """Subscribed without a cursor: the server's first frame, `live`, names where it starts."""
        rec = Recorder(f"s-{user}-{got}-{start}", user)
        rec.subscribed(None, None)
        if live_first:
            rec.received(Live(cur(start)))
        for i in got:
            rec.received(Event(msgspec_builtins(events[i]), cur(f"100{i}-0")))
        return rec

    assert (
        verdict(fresh("ann", [3, 4], "1002-0"), fresh("bob", [3], "1002-0"), fresh("ann", [], "1004-0")) == []
    )
    assert "missing" in verdict(fresh("ann", [4], "1002-0"))[0]
    assert "twice" in verdict(fresh("ann", [3, 3, 4], "1002-0"))[0]
    assert "outside the cursors" in verdict(fresh("ann", [3, 4], "1002-0", live_first=False))[0]


def msgspec_builtins(event: schema.Envelope) -> dict[str, object]:
    decoded: dict[str, object] = json.loads(encode(event))
    return decoded


def test_received_file_round_trips_through_the_cli_reader(tmp_path: Path) -> None:
    from projector.auditsource import read_received
    from realtime_fanout.client import write_received

    rec = Recorder("s1", "ann")
    rec.subscribed(None, ["c"])
    rec.received(Live(encode_cursor("ep", ["0-0"])))
    write_received(tmp_path / "r.jsonl", [rec])
    assert read_received(tmp_path / "r.jsonl") == rec.lines
