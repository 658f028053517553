"""The event catalogue as Markdown, generated from the schemas: what each type means and its fields.

`python -m events.catalog` prints it; the README's copy is checked against it by a test, so the manual
cannot drift from the code.
"""

from __future__ import annotations

import inspect

import msgspec

from events.schema import PAYLOAD_TYPES, Envelope, tag_of


def _type_name(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.UnionType):
        return " or ".join(_type_name(t) for t in info.types)
    if isinstance(info, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
        return f"list of {_type_name(info.item_type)}"
    names = {
        msgspec.inspect.StrType: "text",
        msgspec.inspect.IntType: "integer",
        msgspec.inspect.NoneType: "null",
        msgspec.inspect.DateTimeType: "timestamp (RFC 3339, UTC)",
        msgspec.inspect.BoolType: "boolean",
    }
    return names.get(type(info), type(info).__name__)


def _fields(cls: type[msgspec.Struct], leave_out: tuple[str, ...] = ()) -> list[str]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return [
        f"`{f.encode_name}` ({_type_name(f.type)}{'' if f.required else ', optional'})"
        for f in info.fields
        if f.encode_name not in leave_out
    ]


def _doc(cls: type) -> str:
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def markdown() -> str:
    """The catalogue: the envelope's fields, then one row per event type (version, fields, meaning)."""
    lines = [
        f"Every event: {', '.join(_fields(Envelope, ('payload',)))}, and `payload` (below).",
        "",
        "| `payload.type` | version | payload fields | meaning |",
        "|---|---|---|---|",
    ]
    for cls in PAYLOAD_TYPES:
        fields = ", ".join(_fields(cls)) or "none"
        lines.append(f"| `{tag_of(cls)}` | {cls.VERSION} | {fields} | {_doc(cls)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
