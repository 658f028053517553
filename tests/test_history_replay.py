"""`python -m projector replay` and the notebook API against real servers: every event once, in order,
upcast, filtered as asked, identical before and after the streams are trimmed, and clear errors."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import redis.asyncio as aioredis

from command_api.append import Appender
from events.codec import current_bytes, decode
from events.cursor import encode_cursor
from events.exceptions import DecodeError
from events.log import LogEntry
from events.position import parse_stream_id
from projector import history
from projector.history import columns, tables
from projector.settings import ProjectorSettings
from tests.test_projector_store import project_until_caught_up, settings_for, whole_log
from tests.workload import Workload

PARTITIONS = 4
pytestmark = pytest.mark.slow


@dataclass
class Log:
    settings: ProjectorSettings
    env: dict[str, str]
    appender: Appender
    workload: Workload
    epoch: str


@pytest.fixture
async def log(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> AsyncIterator[Log]:
    """300 commands projected and archived, then 80 more that only the streams hold."""
    settings = settings_for(redis_server_url, log_namespace, database_url)
    appender = Appender(redis_client, settings.log.layout())
    epoch = await appender.open()
    workload = Workload(seed=7)
    await workload.append(appender, 300)
    await project_until_caught_up(settings)
    await workload.append(appender, 80)
    env = {**os.environ, **settings.child_env()}
    try:
        yield Log(settings, env, appender, workload, epoch)
    finally:
        await appender.close()


def expected(entries: list[LogEntry]) -> list[tuple[tuple[int, int, int], bytes]]:
    """The oracle: decodable entries in (log time, partition) order, as current-schema lines."""
    out = []
    for e in entries:
        try:
            decode(e.data)
        except DecodeError:
            continue
        out.append(((*parse_stream_id(e.stream_id), e.partition), current_bytes(e.data) + b"\n"))
    return sorted(out)


async def replay(env: dict[str, str], *args: str) -> tuple[int, bytes, str]:
    return await projector_cli(env, "replay", *args)


async def projector_cli(env: dict[str, str], *args: str) -> tuple[int, bytes, str]:
    """Run `python -m projector ARGS`: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "projector", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err.decode()


async def trim_to_archive(redis_client: aioredis.Redis, settings: ProjectorSettings) -> None:
    """What retention does: drop every stream entry older than the archive's head."""
    import psycopg

    layout = settings.log.layout()
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        for p in range(PARTITIONS):
            cur = await conn.execute(
                "SELECT stream_id FROM parley_store.event_archive WHERE partition = %s "
                "ORDER BY stream_ms DESC, stream_seq DESC LIMIT 1",
                (p,),
            )
            row = await cur.fetchone()
            if row is not None:
                await redis_client.xtrim(layout.stream_key(p), minid=row[0])


async def test_replays_everything_once_in_order_and_identically_after_a_trim(
    log: Log, redis_client: aioredis.Redis
) -> None:
    entries = await whole_log(log.appender.log)
    want = b"".join(line for _, line in expected(entries))
    code, first, err = await replay(log.env)
    assert code == 0, err
    assert first == want
    assert len(first.splitlines()) == len(entries) == log.workload.appended
    code, second, _ = await replay(log.env)
    assert second == first

    await trim_to_archive(redis_client, log.settings)
    assert sum([await redis_client.xlen(k) for k in log.settings.log.layout().stream_keys()]) < len(entries)
    code, trimmed, err = await replay(log.env)
    assert code == 0, err
    assert trimmed == first


async def test_filters_and_ranges(log: Log) -> None:
    rows = expected(await whole_log(log.appender.log))
    events = [(key, decode(line), line) for key, line in rows]
    conversation = events[0][1].conversation_id
    code, out, err = await replay(log.env, "--conversation", conversation)
    assert code == 0, err
    assert out == b"".join(line for _, e, line in events if e.conversation_id == conversation)

    code, out, _ = await replay(log.env, "--type", "message_sent", "--type", "messages_read", "--actor", "u3")
    assert out == b"".join(
        line for _, e, line in events if e.type in ("message_sent", "messages_read") and e.actor == "u3"
    )
    assert out

    # --from is exclusive, --to inclusive; a cursor bounds each partition exactly.
    lo, hi = events[60], events[250]
    lo_token = f"{log.epoch}.{lo[0][2]}.{lo[0][0]}-{lo[0][1]}"
    hi_token = f"{log.epoch}.{hi[0][2]}.{hi[0][0]}-{hi[0][1]}"
    code, out, _ = await replay(log.env, "--from", lo_token, "--to", hi_token)
    assert out == b"".join(line for key, _, line in events if key[:2] > lo[0][:2] and key[:2] <= hi[0][:2])
    positions = ["0-0"] * PARTITIONS
    for key, _, _ in events[:150]:
        positions[key[2]] = f"{key[0]}-{key[1]}"
    code, out, _ = await replay(log.env, "--from", encode_cursor(log.epoch, positions))
    assert out == b"".join(line for _, _, line in events[150:])

    since_ms = events[120][0][0]
    since = datetime.fromtimestamp(since_ms / 1000, UTC).isoformat()
    code, out, _ = await replay(log.env, "--since", since)
    assert out == b"".join(line for key, _, line in events if key[0] >= since_ms)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "message_snet"], "unknown event type message_snet"),
        (["--from", "nonsense"], "malformed position"),
        (["--since", "yesterday"], "malformed time"),
        (["--since", "2026-12-02", "--until", "2026-12-01"], "range is empty"),
        (["--from", "deadbeef.1.1-0"], "from log epoch deadbeef"),
        (["--format", "parquet"], "give --output"),
        (["--follow", "--until", "2026-12-01"], "takes no --to"),
    ],
)
async def test_bad_requests_are_one_line_on_stderr_and_exit_2(
    log: Log, args: list[str], message: str
) -> None:
    code, out, err = await replay(log.env, *args)
    assert (code, out) == (2, b"")
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


async def test_unreachable_servers_exit_3(log: Log) -> None:
    code, out, err = await replay({**log.env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert (code, out) == (3, b"") and "Traceback" not in err, err


async def test_an_unwritable_output_is_one_line_on_stderr_and_exit_4(log: Log, tmp_path: Path) -> None:
    for fmt in ("jsonl", "parquet"):
        code, out, err = await replay(log.env, "--format", fmt, "--output", str(tmp_path / "no" / "such"))
        assert (code, out) == (4, b"") and "Traceback" not in err and err.count("\n") == 1, err


async def test_old_versions_come_out_upcast(log: Log, redis_client: aioredis.Redis, tmp_path: Path) -> None:
    v1 = (
        b'{"seq":1,"event_id":"e1","schema_version":1,"occurred_at":"2026-12-01T10:00:00Z","actor":"old",'
        b'"conversation_id":"legacy","correlation_id":"c1","payload":{"type":"message_sent","message_id":"m1",'
        b'"text":"from v1"}}'
    )
    partition = log.settings.log.layout().partition_for("legacy")
    await redis_client.xadd(log.settings.log.layout().stream_key(partition), {"e": v1})
    code, out, err = await replay(log.env, "--conversation", "legacy")
    assert code == 0, err
    event = json.loads(out)
    assert event["schema_version"] == 2 and event["payload"]["body"] == "from v1" and event["seq"] == 1
    assert out.startswith(b'{"seq":1,')

    # In a table too, within a page of current events (parsed as stored) and alone.
    code, everything, err = await replay(log.env)
    assert code == 0, err
    for args in ([], ["--conversation", "legacy"]):
        code, _, err = await replay(log.env, *args, "--format", "parquet", "--output", str(tmp_path / "t.pq"))
        assert code == 0, err
        table = pq.read_table(tmp_path / "t.pq")
        assert table.column("event_id").to_pylist() == [
            json.loads(line)["event_id"] for line in (everything if not args else out).splitlines()
        ]
        (old,) = [r for r in table.to_pylist() if r["conversation_id"] == "legacy"]
        assert (old["schema_version"], old["body"], old["reply_to"]) == (2, "from v1", None)


def _legacy(seq: int, schema: bytes, payload: bytes) -> bytes:
    return (
        b'{"seq":%d,"event_id":"odd%d",%s,"occurred_at":"2026-12-01T10:00:00Z","actor":"old",'
        b'"conversation_id":"legacy","correlation_id":"c%d","payload":%s}' % (seq, seq, schema, seq, payload)
    )


async def test_archived_events_of_odd_forms_come_out_upcast(
    log: Log, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Archived events pass as stored only when current: an old version, an old version under an escaped
    key with a current-looking key nested in its payload, the text "schema_version" in a body and escapes
    all come out as `current_bytes` renders them, in JSON Lines (plain and with positions) and Parquet,
    among other events and alone in a page."""
    odd = [
        _legacy(1, b'"schema_version":1', b'{"type":"conversation_created","title":"t","participants":["old"]}'),
        _legacy(2, b'"schema_version":1', b'{"type":"message_sent","message_id":"m1","text":"from v1"}'),
        # v1 under an escaped key, with a current-looking key nested in the payload: must be upcast.
        _legacy(
            3, b'"schema_versio\\u006e":1',
            b'{"type":"message_sent","message_id":"m2","text":"hidden v1","x":{"schema_version":2,"y":1}}',
        ),
        _legacy(4, b'"schema_version":2', b'{"type":"message_sent","message_id":"m3","body":"\\"schema_version\\""}'),
        _legacy(5, b'"schema_version":2', b'{"type":"message_sent","message_id":"m4","body":"caf\\u00e9 \\\\u"}'),
    ]  # fmt: skip
    partition = log.settings.log.layout().partition_for("legacy")
    for data in odd:
        await redis_client.xadd(log.settings.log.layout().stream_key(partition), {"e": data})
    await project_until_caught_up(log.settings)  # archived: a replay reads them from the archive
    code, out, err = await replay(log.env)
    assert code == 0, err
    lines = out.splitlines(keepends=True)
    legacy = [json.loads(line) for line in lines if b'"conversation_id":"legacy"' in line]
    assert [(e["schema_version"], e["payload"].get("body")) for e in legacy] == [
        (1, None),
        (2, "from v1"), (2, "hidden v1"), (2, '"schema_version"'), (2, "café \\u"),
    ]  # fmt: skip
    for event in legacy:
        assert decode(json.dumps(event).encode()).payload == decode(current_bytes(_by_id(odd, event))).payload

    code, wrapped, err = await replay(log.env, "--with-position")
    assert code == 0, err
    assert [json.dumps(json.loads(w)["event"]) for w in wrapped.splitlines()] == [
        json.dumps(json.loads(line)) for line in lines
    ]
    # The look-alikes alone (no old version in the same page).
    (after,) = [json.loads(w)["position"] for w in wrapped.splitlines() if b'"event_id":"odd2"' in w]
    code, tail, err = await replay(log.env, "--from", after)
    assert code == 0, err
    assert tail.splitlines(keepends=True) == lines[-3:]
    code, _, err = await replay(log.env, "--format", "parquet", "--output", str(tmp_path / "t.pq"))
    assert code == 0, err
    table = pq.read_table(tmp_path / "t.pq")
    assert table.column("position").to_pylist() == [json.loads(w)["position"] for w in wrapped.splitlines()]
    assert table.column("body").to_pylist() == [json.loads(line)["payload"].get("body") for line in lines]


def _by_id(stored: list[bytes], event: dict[str, object]) -> bytes:
    (data,) = [d for d in stored if b'"event_id":"%s"' % str(event["event_id"]).encode() in d]
    return data


async def test_csv_and_parquet_hold_the_same_events(log: Log, tmp_path: Path) -> None:
    code, jsonl, err = await replay(log.env, "--with-position")
    assert code == 0, err
    lines = [json.loads(line) for line in jsonl.splitlines()]
    code, _, err = await replay(log.env, "--format", "parquet", "--output", str(tmp_path / "all.parquet"))
    assert code == 0, err
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.schema == columns.SCHEMA
    assert table.column("position").to_pylist() == [line["position"] for line in lines]
    assert table.column("event_id").to_pylist() == [line["event"]["event_id"] for line in lines]
    assert table.column("body").to_pylist() == [line["event"]["payload"].get("body") for line in lines]
    assert table.column("participants").to_pylist() == [
        line["event"]["payload"].get("participants") for line in lines
    ]

    code, csv_out, err = await replay(log.env, "--format", "csv")
    assert code == 0, err
    from_csv = pa_csv.read_csv(io.BytesIO(csv_out))
    assert from_csv.column("event_id").to_pylist() == table.column("event_id").to_pylist()

    code, _, err = await replay(
        log.env, "--format", "parquet", "--by-day", "--output", str(tmp_path / "days")
    )
    assert code == 0, err
    days = sorted(p.name for p in (tmp_path / "days").iterdir())
    assert days and all(d.startswith("day=") for d in days)
    total = sum(pq.read_table(tmp_path / "days" / d / "part-0.parquet").num_rows for d in days)
    assert total == table.num_rows


async def test_parquet_holds_every_value_of_the_jsonl_export(log: Log, tmp_path: Path) -> None:
    """Every column of every row equals the JSON Lines export's value, whatever the writer's row groups
    and encodings."""
    code, jsonl, err = await replay(log.env, "--with-position")
    assert code == 0, err
    code, _, err = await replay(log.env, "--format", "parquet", "--output", str(tmp_path / "all.parquet"))
    assert code == 0, err
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.schema == columns.SCHEMA
    payload_names = [name for name, _ in columns.PAYLOAD_FIELDS]
    want = []
    for line in jsonl.splitlines():
        wrapped = json.loads(line)
        event = wrapped["event"]
        _, partition, stream_id = wrapped["position"].split(".")
        row = {"position": wrapped["position"], "partition": int(partition), "stream_id": stream_id}
        row |= {name: event.get(name) for name, _ in columns.ENVELOPE_FIELDS}
        row["occurred_at"] = datetime.fromisoformat(event["occurred_at"])
        row["type"] = event["payload"]["type"]
        row |= {name: event["payload"].get(name) for name in payload_names}
        want.append(row)
    assert len(want) == table.num_rows > 300
    assert table.to_pylist() == want

    # Pages gathered into row groups spanning pages: the same table.
    lines = [json.dumps(json.loads(line)["event"]).encode() + b"\n" for line in jsonl.splitlines()]
    writer = tables._Parquet(tmp_path / "grouped.parquet", row_group_rows=100)
    for at in range(0, len(want), 37):
        rows = want[at : at + 37]
        writer.write_batch(
            columns.record_batch(
                b"".join(lines[at : at + 37]),
                [r["position"] for r in rows], [r["partition"] for r in rows], [r["stream_id"] for r in rows],
            )
        )  # fmt: skip
    writer.close()
    grouped = pq.ParquetFile(tmp_path / "grouped.parquet")
    assert grouped.metadata.num_row_groups == -(-len(want) // 100)
    assert {grouped.metadata.row_group(i).num_rows for i in range(grouped.metadata.num_row_groups - 1)} == {
        100
    }
    assert grouped.read().equals(table)


async def test_follow_continues_past_the_head_without_a_gap(log: Log) -> None:
    before = len(await whole_log(log.appender.log))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "projector", "replay", "--follow", env=log.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        got = [await asyncio.wait_for(proc.stdout.readline(), 20) for _ in range(before)]
        await log.workload.append(log.appender, 40)
        added = len(await whole_log(log.appender.log)) - before
        got += [await asyncio.wait_for(proc.stdout.readline(), 20) for _ in range(added)]
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.stderr is not None
    assert proc.returncode == 0, await proc.stderr.read()
    entries = await whole_log(log.appender.log)
    assert sorted(got) == sorted(line for _, line in expected(entries))
    assert len(set(got)) == len(got)


async def test_notebook_api_matches_the_cli(log: Log) -> None:
    source = history.Source(log.settings.log, log.settings.database_url)
    code, out, err = await replay(log.env, "--type", "message_sent")
    assert code == 0, err
    events = await asyncio.to_thread(lambda: list(history.events(types=["message_sent"], source=source)))
    assert [e.event_id for _, e in events] == [json.loads(line)["event_id"] for line in out.splitlines()]
    table = await asyncio.to_thread(history.table, types=["message_sent"], source=source)
    assert table.column("event_id").to_pylist() == [e.event_id for _, e in events]
    assert set(table.column("type").to_pylist()) == {"message_sent"}
