"""Where the log lives and how it is laid out: one settings object every service reads the same way."""

from __future__ import annotations

from dataclasses import dataclass

from events.layout import LogLayout
from servicekit.settings import Env


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Where the log lives and how it is laid out; shared by every service that reads it."""

    redis_url: str
    namespace: str
    partitions: int

    @classmethod
    def from_env(cls, env: Env) -> LogSettings:
        return cls(
            redis_url=env.str("REDIS_URL", "redis://127.0.0.1:6379/0"),
            namespace=env.str("PARLEY_LOG_NAMESPACE", "parley"),
            partitions=env.int("PARLEY_PARTITIONS", 8, minimum=1),
        )

    def layout(self) -> LogLayout:
        return LogLayout(self.namespace, self.partitions)
