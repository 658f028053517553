"""A seeded, mostly valid stream of real commands appended through the real log (tests, benchmarks).

Commands go through `command_api` builders and the append script, so the log holds exactly what
production would; refusals (the write side saying no) are counted and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from command_api import bodies, commands
from command_api.append import Appended, Appender, Command
from command_api.exceptions import CommandRefused
from events.ids import new_object_id

WORDS = ("hello", "lunch", "deploy", "meeting", "coffee", "release", "bug", "friday", "budget", "pizza")


@dataclass(slots=True)
class Workload:
    """Tracks what it believes each conversation holds so most commands it makes are valid."""

    seed: int = 0
    users: int = 20
    read_anywhere: bool = False  # a read marker set to a random seq, not the conversation's last
    members: dict[str, list[str]] = field(default_factory=dict)
    creators: dict[str, str] = field(default_factory=dict)
    messages: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    appended: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def user(self) -> str:
        return f"u{self.rng.randrange(self.users)}"

    def text(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 8)))

    def create(self) -> Command:
        creator = self.user()
        others = sorted({self.user() for _ in range(self.rng.randint(1, 4))} - {creator})
        cid = new_object_id()
        self.members[cid], self.creators[cid], self.messages[cid] = [creator, *others], creator, []
        self.seqs[cid] = 0
        return commands.create_conversation_with_id(
            commands.Context(creator), bodies.CreateConversation(self.text(), others), cid
        )

    def next(self) -> Command:
        """A random command on a random known conversation (or a new conversation, sometimes)."""
        rng = self.rng
        if not self.members or rng.random() < 0.02:
            return self.create()
        cid = rng.choice(list(self.members))
        members, msgs = self.members[cid], self.messages[cid]
        actor = rng.choice(members)
        roll = rng.random()
        if roll < 0.6 or not msgs:
            mid = new_object_id()
            msgs.append((mid, actor))
            return commands.send_message(
                commands.Context(actor), cid, bodies.SendMessage(self.text(), None, mid)
            )
        if roll < 0.7:
            mid, author = rng.choice(msgs)
            return commands.edit_message(commands.Context(author), cid, mid, bodies.EditMessage(self.text()))
        if roll < 0.75:
            mid, author = msgs.pop(rng.randrange(len(msgs)))
            return commands.delete_message(commands.Context(author), cid, mid)
        if roll < 0.85:
            up_to = rng.randint(1, max(1, self.seqs[cid])) if self.read_anywhere else max(1, self.seqs[cid])
            return commands.mark_read(commands.Context(actor), cid, bodies.MarkRead(up_to))
        if roll < 0.9:
            user = self.user()
            if user not in members:
                members.append(user)
            return commands.add_participant(commands.Context(actor), cid, bodies.AddParticipant(user))
        if roll < 0.94 and len(members) > 1:
            user = rng.choice([m for m in members if m != self.creators[cid]])
            members.remove(user)
            return commands.remove_participant(commands.Context(user), cid, user)
        op = commands.archive if roll < 0.97 else commands.unarchive
        return op(commands.Context(actor), cid)

    async def append(self, appender: Appender, count: int, concurrency: int = 64) -> None:
        """Append `count` commands, `concurrency` at a time (so the appender batches them)."""
        done = 0
        while done < count:
            chunk = [self.next() for _ in range(min(concurrency, count - done))]
            results = await asyncio.gather(*(appender.append(c) for c in chunk), return_exceptions=True)
            for command, result in zip(chunk, results, strict=True):
                if isinstance(result, Appended):
                    self.appended += 1
                    self.seqs[command.conversation_id] = max(self.seqs[command.conversation_id], result.seq)
                elif isinstance(result, CommandRefused):
                    self.refused += 1
                else:
                    raise result
            done += len(chunk)
