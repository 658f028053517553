"""The table shape of replayed events, generated from the event schemas so it can never drift from them.

One column per envelope field, then `type`, then every payload field of every type flattened into one
nullable column (a field name means one thing across types; checked here at import), after the position
columns. Types: text -> string, integers -> int64, timestamps -> timestamp[us, UTC], tuples -> list.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from events.codec import current_bytes
from events.schema import CURRENT_VERSIONS, PAYLOAD_TYPES, Envelope

if TYPE_CHECKING:
    from projector.history.reader import Row

POSITION_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("position", pa.string()),
    ("partition", pa.int32()),
    ("stream_id", pa.string()),
)


def _arrow_type(info: msgspec.inspect.Type) -> pa.DataType:
    if isinstance(info, msgspec.inspect.UnionType):
        inner = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(inner) == 1:
            return _arrow_type(inner[0])
    if isinstance(info, msgspec.inspect.StrType):
        return pa.string()
    if isinstance(info, msgspec.inspect.IntType):
        return pa.int64()
    if isinstance(info, msgspec.inspect.BoolType):
        return pa.bool_()
    if isinstance(info, msgspec.inspect.FloatType):
        return pa.float64()
    if isinstance(info, msgspec.inspect.DateTimeType):
        return pa.timestamp("us", tz="UTC")
    if isinstance(info, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
        return pa.list_(_arrow_type(info.item_type))
    raise TypeError(f"no table column type for {info!r}: extend projector/history/columns.py")


def _struct_fields(cls: type[msgspec.Struct], leave_out: str = "") -> list[tuple[str, pa.DataType]]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return [(f.encode_name, _arrow_type(f.type)) for f in info.fields if f.encode_name != leave_out]


def _payload_fields() -> list[tuple[str, pa.DataType]]:
    merged: dict[str, pa.DataType] = {}
    for cls in PAYLOAD_TYPES:
        for name, kind in _struct_fields(cls):
            if merged.setdefault(name, kind) != kind:
                raise TypeError(f"payload field {name!r} has two types across event types")
    return list(merged.items())


ENVELOPE_FIELDS = _struct_fields(Envelope, leave_out="payload")
PAYLOAD_FIELDS = _payload_fields()
if clash := {n for n, _ in PAYLOAD_FIELDS} & {n for n, _ in (*ENVELOPE_FIELDS, *POSITION_COLUMNS)}:
    raise TypeError(f"payload fields {sorted(clash)} collide with envelope columns")

# What pyarrow's JSON reader parses each event line into (the payload as a typed struct).
_JSON_SCHEMA = pa.schema([*ENVELOPE_FIELDS, ("payload", pa.struct([("type", pa.string()), *PAYLOAD_FIELDS]))])
_PARSE = pa_json.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore")
_READ = pa_json.ReadOptions(block_size=1 << 26)

SCHEMA = pa.schema([*POSITION_COLUMNS, *ENVELOPE_FIELDS, ("type", pa.string()), *PAYLOAD_FIELDS])
# Columns whose values repeat across events, which Parquet dictionary-encodes; the others hold a value per
# event (ids, times, texts), which a dictionary cannot shrink and only slows to write.
_PER_EVENT = {"position", "stream_id", "event_id", "occurred_at", "correlation_id", "causation_id",
              "idempotency_key", "seq", "message_id", "body"}  # fmt: skip
REPEATING = tuple(n for n in SCHEMA.names if n not in _PER_EVENT)


def _parse(lines: bytes) -> pa.Table:
    return pa_json.read_json(io.BytesIO(lines), read_options=_READ, parse_options=_PARSE)


def _assemble(parsed: pa.Table, position: Any, partition: Any, stream_id: Any) -> pa.RecordBatch:
    payload = parsed.column("payload").combine_chunks()
    columns: list[Any] = [
        position,
        partition,
        stream_id,
        *(parsed.column(name).combine_chunks() for name, _ in ENVELOPE_FIELDS),
        payload.field("type"),
        *(payload.field(name) for name, _ in PAYLOAD_FIELDS),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def record_batch(
    lines: bytes, positions: list[str], partitions: list[int], stream_ids: list[str]
) -> pa.RecordBatch:
    """The table rows of newline-terminated event lines (current schema), in `SCHEMA`'s column order."""
    return _assemble(
        _parse(lines),
        pa.array(positions, pa.string()),
        pa.array(partitions, pa.int32()),
        pa.array(stream_ids, pa.string()),
    )


_TYPES = pa.array(sorted(CURRENT_VERSIONS))
_VERSIONS = pa.array([CURRENT_VERSIONS[t] for t in sorted(CURRENT_VERSIONS)], pa.int64())


def _all_current(parsed: pa.Table, rows: int) -> bool:
    """Whether `parsed` holds `rows` events, each of its type's current schema version."""
    if parsed.num_rows != rows:
        return False
    kinds = parsed.column("payload").combine_chunks().field("type")
    wanted = pc.take(_VERSIONS, pc.index_in(kinds, value_set=_TYPES))
    same = pc.equal(parsed.column("schema_version"), wanted)
    return bool(pc.all(pc.fill_null(same, False)).as_py())


def rows_batch(epoch: str, rows: list[Row]) -> pa.RecordBatch:
    """The table rows of archive or stream rows: `stored_batch` of their stored bytes."""
    stored = [r[4] for r in rows]
    return stored_batch(
        epoch,
        pa.array([r[2] for r in rows], pa.int32()),
        pa.array([r[3] for r in rows], pa.string()),
        b"\n".join(stored),
        lambda: stored,
    )


def stored_batch(
    epoch: str, partition: pa.Array, stream_id: pa.Array, joined: bytes, stored: Callable[[], list[bytes]]
) -> pa.RecordBatch:
    """The table rows of events as stored (`joined` by newlines; `stored()` one by one), as `record_batch`
    of their current-schema lines: pyarrow parses the stored bytes as they are when every event is of its
    type's current version (checked on the parsed columns), else their upcast lines (`current_bytes`), so
    on the usual path no event is decoded in Python.

    Raises:
        DecodeError: an event is not valid (`pyarrow.ArrowInvalid`: its JSON is not of its schema).
    """
    position = pc.binary_join_element_wise(epoch, pc.cast(partition, pa.string()), stream_id, ".")
    try:
        parsed = _parse(joined)
        current = _all_current(parsed, len(partition))
    except pa.ArrowInvalid:
        current = False
    if not current:
        parsed = _parse(b"".join([current_bytes(data) + b"\n" for data in stored()]))
    return _assemble(parsed, position, partition, stream_id)


def csv_schema() -> pa.Schema:
    """`SCHEMA` with every list column as text: CSV has no lists."""
    return pa.schema([pa.field(f.name, pa.string()) if pa.types.is_list(f.type) else f for f in SCHEMA])


def csv_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """List columns become their items joined by spaces (ids never hold a space)."""
    arrays = [
        pc.binary_join(column, " ") if pa.types.is_list(field.type) else column
        for field, column in zip(batch.schema, batch.columns, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=csv_schema())


def day_of(batch: pa.RecordBatch) -> pa.Array:
    """Each row's UTC day of `occurred_at` (`YYYY-MM-DD`), for a directory partitioned by day."""
    return pc.strftime(batch.column("occurred_at"), format="%Y-%m-%d", locale="C")
