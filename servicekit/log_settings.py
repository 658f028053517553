"""Where the log lives and how it is laid out: one settings object every service reads the same way."""

from __future__ import annotations

from dataclasses import dataclass

from events.layout import LogLayout, TagScheme
from servicekit.settings import EnvSettings, setting


@dataclass(frozen=True, slots=True)
class LogSettings(EnvSettings):
    """Where the log lives and how it is laid out; shared by every service that reads it."""

    redis_url: str = setting("REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace: str = setting("PARLEY_LOG_NAMESPACE", "parley")
    partitions: int = setting("PARLEY_PARTITIONS", 8, minimum=1)
    redis_cluster: bool = setting("PARLEY_REDIS_CLUSTER", False)
    partition_tags: TagScheme = setting("PARLEY_PARTITION_TAGS", "spread")
    read_replicas: bool = setting("PARLEY_READ_REPLICAS", False)

    def layout(self) -> LogLayout:
        return LogLayout(self.namespace, self.partitions, self.partition_tags)
