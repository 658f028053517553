"""The native edge's process-wide loops: one flush per event-loop turn for every connection with frames to
send, and one keepalive wheel pinging every connection (no timer or task per connection)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from realtime_fanout.connection import CallbackConnection
    from realtime_fanout.edge import StreamEdge

log = logging.getLogger(__name__)

WHEEL_STEP_S = 0.05
"""How often the keepalive wheel turns (at most 400 steps per ping interval): pings go out spread over the
interval, at 100,000 connections and 20 s about 250 per step, not in bursts."""
MAX_WHEEL_STEPS = 400


class Flusher:
    """Connections that have frames to send, written once per loop turn: a burst of live items to one
    connection is one write."""

    __slots__ = ("_dirty", "_handle")

    def __init__(self) -> None:
        self._dirty: list[CallbackConnection] = []
        self._handle: asyncio.Handle | None = None

    def want(self, connection: CallbackConnection) -> None:
        if connection.flush_pending:
            return
        connection.flush_pending = True
        self._dirty.append(connection)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._handle = None
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush_pending = False
            if not connection.edge.writable_now():
                continue  # resume_writing asks again
            try:
                connection.flush_now()
            except Exception:
                log.exception("writing to %s failed", connection.user_id)
                connection.abort()


class Keepalive:
    """Every connection is pinged once per `interval_s` (its step of the wheel); one whose ping is not
    answered within `timeout_s` is closed 1011. At the same step a connection whose deadline (token
    expiry) has come within `horizon_s` arms its timer: a far deadline holds none (0.5 KiB each)."""

    __slots__ = (
        "_check_back",
        "_handle",
        "_slots",
        "_step",
        "horizon_s",
        "interval_s",
        "step_s",
        "steps",
        "timeout_s",
    )

    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.steps = max(1, min(MAX_WHEEL_STEPS, round(interval_s / WHEEL_STEP_S)))
        self.step_s = interval_s / self.steps
        self.horizon_s = 2 * interval_s + 1
        self._slots: list[set[StreamEdge]] = [set() for _ in range(self.steps)]
        self._check_back = math.ceil(timeout_s / self.step_s)
        """Steps after a ping when its pong is checked (past a whole turn, the next ping's step checks)."""
        self._step = 0
        self._handle: asyncio.TimerHandle | None = None

    def add(self, edge: StreamEdge) -> None:
        edge.bucket = (self._step - 1) % self.steps  # first pinged a whole interval from now
        self._slots[edge.bucket].add(edge)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.step_s, self._turn)

    def discard(self, edge: StreamEdge) -> None:
        if edge.bucket >= 0:
            self._slots[edge.bucket].discard(edge)
            edge.bucket = -1

    def _turn(self) -> None:
        self._handle = None
        step, self._step = self._step, (self._step + 1) % self.steps
        now = time.monotonic()
        if self._check_back < self.steps:
            for edge in list(self._slots[(step - self._check_back) % self.steps]):
                if edge.ping_sent_at and now - edge.ping_sent_at >= self.timeout_s - self.step_s / 2:
                    self._expire(edge)
        for edge in list(self._slots[step]):
            if edge.ping_sent_at:
                if now - edge.ping_sent_at >= self.timeout_s - self.step_s / 2:
                    self._expire(edge)
                continue  # a ping still in flight (timeout past the interval)
            edge.ping_sent_at = now
            try:
                edge.ping(os.urandom(4))
                if edge.connection is not None:
                    edge.connection.arm_timer_if_near()
            except Exception:
                log.exception("pinging a connection failed")
        if any(self._slots):
            self._handle = asyncio.get_running_loop().call_later(self.step_s, self._turn)

    def _expire(self, edge: StreamEdge) -> None:
        self.discard(edge)
        try:
            edge.keepalive_timeout()
        except Exception:
            log.exception("closing a connection that missed its pong failed")
