"""Upcasters: pure functions that lift a stored payload one version up, so readers see only current events.

Each upcaster takes the raw envelope dict (payload included, already at `from_version`) and returns
the payload dict at `from_version + 1`. The registry is keyed by (type, from_version).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from events.exceptions import UpcastError
from events.schema import CURRENT_VERSIONS

RawDict = dict[str, Any]
Upcaster = Callable[[RawDict], RawDict]

UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register `fn` as the step from `from_version` to `from_version + 1` of `event_type`."""

    def register(fn: Upcaster) -> Upcaster:
        key = (event_type, from_version)
        if key in UPCASTERS:
            raise ValueError(f"duplicate upcaster for {event_type} v{from_version}")
        UPCASTERS[key] = fn
        return fn

    return register


@upcaster("message_sent", 1)
def _message_sent_v1_to_v2(envelope: RawDict) -> RawDict:
    """v1 called the body `text` and had no replies."""
    payload = dict(envelope["payload"])
    payload["body"] = payload.pop("text")
    payload.setdefault("reply_to", None)
    return payload


def upcast(envelope: RawDict) -> RawDict:
    """Return `envelope` with its payload lifted to the current version of its type.

    Raises:
        UpcastError: the type is unknown, the version is newer than this reader, or a step is missing.
    """
    payload = envelope.get("payload")
    if not isinstance(payload, dict):
        raise UpcastError("envelope has no payload object")
    event_type = payload.get("type")
    version = envelope.get("schema_version")
    if not isinstance(event_type, str) or event_type not in CURRENT_VERSIONS:
        raise UpcastError(f"unknown event type {event_type!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UpcastError(f"{event_type}: invalid schema_version {version!r}")
    current = CURRENT_VERSIONS[event_type]
    if version > current:
        raise UpcastError(f"{event_type} v{version} is newer than this reader (v{current})")
    lifted = dict(envelope)
    while version < current:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise UpcastError(f"no upcaster for {event_type} v{version}")
        try:
            new_payload = step(lifted)
        except (KeyError, TypeError, ValueError) as exc:
            raise UpcastError(f"{event_type} v{version} upcast failed: {exc!r}") from exc
        new_payload["type"] = event_type
        version += 1
        lifted = {**lifted, "payload": new_payload, "schema_version": version}
    return lifted
