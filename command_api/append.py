"""Append commands to the log through the decide-and-append Lua script, in per-partition batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import assert_never

import redis.exceptions

from command_api.batching import MicroBatcher
from command_api.exceptions import CommandRefused, LogUnavailable
from command_api.rules import Add, Archive, Create, Delete, Edit, Operation, Read, Remove, Send, Unarchive
from command_api.rules import Command as Command  # re-exported: callers build commands and hand them here
from command_api.statekeys import message_field
from events.exceptions import LogError
from events.layout import LogLayout
from events.log import EventLog
from events.position import LogPosition
from events.redisclient import REDIS_ERRORS, RedisClient, raise_first_error, run_script_once, slot_group

log = logging.getLogger(__name__)

APPEND_SCRIPT = files("command_api").joinpath("append.lua").read_text()
CLAIM_SCRIPT = files("command_api").joinpath("claim.lua").read_text()
CLAIM_MARGIN_S = 60
"""A claim outlives the partition's idempotency record, written after it, by this much."""


@dataclass(frozen=True, slots=True)
class Appended:
    """Where a command's event landed; `replayed` when an idempotent retry returned the original."""

    seq: int
    position: LogPosition
    memo: str
    replayed: bool


@dataclass(frozen=True, slots=True)
class AppendSettings:
    idempotency_ttl_s: float = 86_400
    wait_replicas: int = 0
    wait_timeout_ms: int = 1_000
    max_batch: int = 256


class Appender:
    """Appends commands to the partitioned log; one script call per partition batch.

    The scripts that write (append, claim) are sent once (`events.redisclient.send_once`): the
    client's retry of a dead connection covers only connecting and the idle connection's PING, so a
    command is never appended twice; a connection lost after sending is `LogUnavailable` (outcome unknown).
    """

    def __init__(self, redis: RedisClient, layout: LogLayout, settings: AppendSettings | None = None) -> None:
        self.redis = redis
        self.layout = layout
        self.settings = settings or AppendSettings()
        self.log = EventLog(redis, layout)
        self._script = redis.register_script(APPEND_SCRIPT)
        self._claim_script = redis.register_script(CLAIM_SCRIPT)
        self._batcher: MicroBatcher[int, Command, Appended] = MicroBatcher(
            self._flush, self.settings.max_batch
        )
        self._claims: MicroBatcher[int, Command, bool] = MicroBatcher(
            self._flush_claims, self.settings.max_batch
        )

    @property
    def epoch(self) -> str | None:
        return self.log.epoch

    async def open(self) -> str:
        """Create the log if needed and learn its epoch.

        Raises:
            LogUnavailable: Redis is unreachable or the log's layout conflicts with ours.
        """
        try:
            return await self.log.open(create=True)
        except REDIS_ERRORS as exc:
            raise LogUnavailable(f"redis: {exc}") from exc

    async def append(self, command: Command) -> Appended:
        """Decide and append one command.

        Raises:
            CommandRefused: the write-side state forbids the command, or its Idempotency-Key is bound
                to another request; nothing was appended.
            LogUnavailable: the outcome is unknown (Redis failed mid-call) or nothing was appended.
        """
        if command.idempotency_key:
            await self._claim(command)
        partition = self.layout.partition_for(command.conversation_id)
        return await self._batcher.submit(partition, command)

    async def _claim(self, command: Command) -> None:
        """Bind the user's key to this request on every partition at once (a partition's script sees
        only its own records): one more round trip, for keyed commands only."""
        claim_key = self.layout.idempotency_claim_key(command.actor, command.idempotency_key)
        if not await self._claims.submit(slot_group(self.redis, claim_key), command):
            raise CommandRefused("idempotency-key-reused")

    async def close(self) -> None:
        await self._batcher.close()
        await self._claims.close()

    async def _flush_claims(self, _: int, commands: Sequence[Command]) -> list[bool | BaseException]:
        """Concurrent claims ride in one pipeline (one round trip, one fsync), one one-key script each; on a
        cluster, one pipeline per user's slot."""
        ttl_ms = int((self.settings.idempotency_ttl_s + CLAIM_MARGIN_S) * 1000)
        calls = [
            ([self.layout.idempotency_claim_key(c.actor, c.idempotency_key)], [c.fingerprint, ttl_ms])
            for c in commands
        ]
        try:
            replies = await run_script_once(self.redis, self._claim_script, calls)
            raise_first_error(replies)
        except REDIS_ERRORS as exc:
            log.error("claiming %d idempotency keys failed: %s", len(commands), exc)
            raise LogUnavailable(f"redis: {exc}") from exc
        return [bool(reply) for reply in replies]

    async def _flush(self, partition: int, commands: Sequence[Command]) -> list[Appended | BaseException]:
        epoch = self.log.epoch
        if epoch is None:
            epoch = await self.open()
        keys = [self.layout.stream_key(partition), self.layout.partition_meta_key(partition)]
        args: list[str | bytes] = [epoch, str(int(self.settings.idempotency_ttl_s * 1000))]
        for c in commands:
            keys.append(self.layout.conversation_key(partition, c.conversation_id))
            keys.append(
                self.layout.idempotency_key(partition, c.actor, c.idempotency_key)
                if c.idempotency_key
                else self.layout.conversation_key(partition, c.conversation_id)
            )
            own = operation_args(c.operation)
            args += [
                c.op, str(len(own)), c.actor, c.idempotency_key, c.fingerprint,
                "" if c.expected_seq is None else str(c.expected_seq), c.event_tail, c.memo, *own,
            ]  # fmt: skip
        try:
            replies = await self._call(keys, args)
        except REDIS_ERRORS as exc:
            log.error("append to partition %d failed: %s", partition, exc)
            raise LogUnavailable(f"redis: {exc}") from exc
        if replies and _is_log_failure(replies[0]):
            await self._reopen(partition, replies[0])
            reason = _text(replies[0][1])
            return [
                LogUnavailable(f"log {reason}; it has been reopened, retry the command") for _ in commands
            ]
        return [self._result(partition, epoch, r) for r in replies]

    async def _call(self, keys: list[str], args: list[str | bytes]) -> list[list[bytes | int]]:
        """One run of the script (sent once: a re-sent append could append twice), then WAIT if asked."""
        wait = self.settings.wait_replicas
        then = [("WAIT", wait, self.settings.wait_timeout_ms)] if wait > 0 else []
        replies = await run_script_once(self.redis, self._script, [(keys, args)], then)
        raise_first_error(replies)
        if wait <= 0:
            return replies[0]  # type: ignore[no-any-return]
        appended, acknowledged = replies
        if int(acknowledged) < self.settings.wait_replicas:
            raise redis.exceptions.RedisError(
                f"only {acknowledged} of {self.settings.wait_replicas} replicas acknowledged the "
                "append within the timeout; it may still be applied"
            )
        return appended  # type: ignore[no-any-return]

    async def _reopen(self, partition: int, reply: list[bytes | int]) -> None:
        reason = _text(reply[1])
        log.error(
            "log at partition %d reports %s (epoch was %s): reopening", partition, reason,
            self.log.epoch,
        )  # fmt: skip
        self.log.epoch = None
        try:
            await self.log.open(create=True)
        except (*REDIS_ERRORS, LogError) as exc:
            log.error("reopening the log failed: %s", exc)

    def _result(self, partition: int, epoch: str, reply: list[bytes | int]) -> Appended | BaseException:
        status = int(reply[0])
        if status == 1:
            return Appended(
                seq=int(reply[1]),
                position=LogPosition(partition, _text(reply[2]), epoch),
                memo="",
                replayed=False,
            )
        if status == 2:
            seq, stream_id, memo = _text(reply[1]).split("\n", 2)
            return Appended(int(seq), LogPosition(partition, stream_id, epoch), memo, replayed=True)
        return CommandRefused(_text(reply[1]), _text(reply[2]))


def operation_args(operation: Operation) -> list[str | bytes]:
    """The operation's own arguments to the append script, in the order its OPERATIONS table names them."""
    match operation:
        case Create(participants):
            return list(participants)
        case Send(message_id, reply_to):
            reply_field = b"" if reply_to is None else message_field(reply_to)
            return [message_id, message_field(message_id), reply_to or "", reply_field]
        case Edit(message_id) | Delete(message_id):
            return [message_id, message_field(message_id)]
        case Add(user_id) | Remove(user_id):
            return [user_id]
        case Read(up_to_seq):
            return [str(up_to_seq)]
        case Archive() | Unarchive():
            return []
        case _:
            assert_never(operation)


def _is_log_failure(reply: list[bytes | int]) -> bool:
    return int(reply[0]) == 0 and _text(reply[1]) in ("log-missing", "epoch-changed")


def _text(value: bytes | int | str) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
