"""What the tests' Redis clients answer, typed: they never decode responses, so a stream read gives bytes
(redis-py's stubs say `bytes | str`, and None for an empty read)."""

from __future__ import annotations

Entries = list[tuple[bytes, dict[bytes, bytes]]]
"""XRANGE / XREVRANGE: (stream id, fields) per entry."""
