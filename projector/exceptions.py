"""Errors raised by the projector.

ProjectorError
├── FoldError             an event cannot be applied to the current read-model state (poison event)
├── MigrationError        a migration file is malformed or the recorded history disagrees with the files
└── ProjectionStopped     a partition's projection must stop rather than skip events
    ├── EpochMismatch     the log's epoch differs from the checkpoint's: the log was recreated or lost
    ├── CheckpointMoved   the checkpoint is not where this worker's state was built (another writer moved it)
    └── LogGap            the stream was trimmed past the checkpoint: entries were lost before projection
RebuildError              a rebuild cannot start or finish (another rebuild runs, the log is unreadable)
"""

from __future__ import annotations


class ProjectorError(Exception):
    """Base of every error this package raises."""


class FoldError(ProjectorError):
    """Raised by the fold when an event contradicts the state it is applied to."""


class MigrationError(ProjectorError):
    """Raised when migrations cannot be applied safely."""


class ProjectionStopped(ProjectorError):
    """Base of the reasons a partition's projection stops instead of applying a batch."""


class EpochMismatch(ProjectionStopped):
    """Raised when the log's epoch is not the epoch the checkpoint was taken in."""

    def __init__(self, partition: int, checkpoint_epoch: str, log_epoch: str | None) -> None:
        super().__init__(
            f"partition {partition}: checkpoint epoch {checkpoint_epoch} but the log has epoch {log_epoch}; "
            "the log was recreated or lost: projection stopped (rebuild or investigate; nothing is skipped)"
        )
        self.partition = partition
        self.checkpoint_epoch = checkpoint_epoch
        self.log_epoch = log_epoch


class CheckpointMoved(ProjectionStopped):
    """Raised when the stored checkpoint differs from the position the batch was folded from."""

    def __init__(self, partition: int, expected: str, actual: str) -> None:
        super().__init__(
            f"partition {partition}: checkpoint is at {actual}, batch was built after {expected}"
        )
        self.partition = partition
        self.expected = expected
        self.actual = actual


class LogGap(ProjectionStopped):
    """Raised when the stream's first entry is after a non-zero checkpoint: trimmed before projection."""

    def __init__(self, partition: int, checkpoint: str, first_id: str) -> None:
        super().__init__(
            f"partition {partition}: checkpoint is at {checkpoint} but the stream now starts at {first_id}; "
            "entries were trimmed before they were projected: projection stopped (nothing is skipped)"
        )
        self.partition = partition
        self.checkpoint = checkpoint
        self.first_id = first_id


class RebuildError(ProjectorError):
    """Raised when a rebuild cannot run (another one holds the lock) or cannot complete."""
