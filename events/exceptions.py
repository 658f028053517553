"""Errors raised by the event schemas, codec and log layout.

EventsError
├── DecodeError             bytes are not a valid event (bad JSON, wrong shape, unknown type/version)
├── UpcastError             an old event version could not be brought to the current one
└── LogError
    ├── LogNotInitialized   the log's metadata is missing (never created, or Redis lost its data)
    ├── PartitionMismatch   the configured partition count differs from the log's
    ├── TagsMismatch        the configured partition tag scheme differs from the log's
    └── EpochChanged        the log was recreated since a reader's position was taken
"""

from __future__ import annotations


class EventsError(Exception):
    """Base of every error this package raises."""


class DecodeError(EventsError):
    """Raised when bytes cannot be decoded into a current event."""


class UpcastError(DecodeError):
    """Raised when no upcaster chain leads from an event's stored version to the current one."""


class LogError(EventsError):
    """Base of errors about the log's layout and identity."""


class LogNotInitialized(LogError):
    """Raised when the log metadata is absent: the log was never created or its data was lost."""


class PartitionMismatch(LogError):
    """Raised when the configured partition count differs from the count the log was created with."""

    def __init__(self, configured: int, actual: int) -> None:
        super().__init__(
            f"log was created with {actual} partitions, configuration says {configured}; "
            "the partition count is fixed once a log exists"
        )
        self.configured = configured
        self.actual = actual


class TagsMismatch(LogError):
    """Raised when the configured partition tag scheme (PARLEY_PARTITION_TAGS) differs from the log's."""

    def __init__(self, configured: str, actual: str) -> None:
        super().__init__(
            f"log keys use partition tags {actual!r}, configuration says {configured!r}; "
            f"set PARLEY_PARTITION_TAGS={actual} (see README, Redis Cluster)"
        )
        self.configured = configured
        self.actual = actual


class EpochChanged(LogError):
    """Raised when a reader's epoch differs from the log's: the log was lost or recreated."""

    def __init__(self, expected: str, actual: str | None) -> None:
        super().__init__(f"log epoch changed: expected {expected}, log has {actual}")
        self.expected = expected
        self.actual = actual
