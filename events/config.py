"""Where the log lives and how it is laid out: one settings object every service reads the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from events.layout import LogLayout, TagScheme
from servicekit.settings import Env


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Where the log lives and how it is laid out; shared by every service that reads it."""

    redis_url: str
    namespace: str
    partitions: int
    redis_cluster: bool = False
    partition_tags: TagScheme = "spread"

    @classmethod
    def from_env(cls, env: Env) -> LogSettings:
        return cls(
            redis_url=env.str("REDIS_URL", "redis://127.0.0.1:6379/0"),
            namespace=env.str("PARLEY_LOG_NAMESPACE", "parley"),
            partitions=env.int("PARLEY_PARTITIONS", 8, minimum=1),
            redis_cluster=env.bool("PARLEY_REDIS_CLUSTER", False),
            partition_tags=cast(
                TagScheme, env.choice("PARLEY_PARTITION_TAGS", "spread", ("spread", "plain"))
            ),
        )

    def layout(self) -> LogLayout:
        return LogLayout(self.namespace, self.partitions, self.partition_tags)
