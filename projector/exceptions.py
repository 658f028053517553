"""Errors raised by the projector.

ProjectorError
├── FoldError             an event cannot be applied to the current read-model state (poison event)
├── FoldCrashed           applying an event raised something else (a bug): the batch is retried entry by entry
├── MigrationError        a migration file is malformed or the recorded history disagrees with the files
├── SelectionError        a replay request is malformed (position, time, type, empty range, foreign epoch)
├── ExportError           a replay's output cannot be written (the file, the directory, the writer process)
└── ProjectionStopped     a partition's projection must stop rather than skip events
    ├── EpochMismatch     the log's epoch differs from the checkpoint's: the log was recreated or lost
    ├── CheckpointMoved   the checkpoint is not where this worker's state was built (another writer moved it)
    ├── LeaseLost         the worker's lease on the partition expired; it stops until it wins the lease back
    └── LogGap            the stream was trimmed past the checkpoint: entries were lost before projection
RebuildError              a rebuild cannot start or finish (another rebuild runs, the log is unreadable)
AuditError                the audit cannot run (exit 2 or 3; a violation it finds is its report, exit 1)
├── AuditRequestError     bad arguments: a malformed time window, an unreadable received-events file
└── AuditUnreachable      Redis, Postgres or the log cannot be read
ReadError                 the query API cannot answer a read (translated from the driver at reads.py)
├── ReadsUnavailable      Postgres unreachable, or no pooled connection free within the pool timeout
├── QueryTimeout          a query ran past the statement timeout
└── PositionFromAnotherEpoch  a client's log position belongs to another epoch than the read models
"""

from __future__ import annotations


class ProjectorError(Exception):
    """Base of every error this package raises."""


class FoldError(ProjectorError):
    """Raised by the fold when an event contradicts the state it is applied to."""


class FoldCrashed(ProjectorError):
    """Applying an entry raised something other than FoldError: a bug, and the state may be half-changed,
    so the batch is dropped and its entries are applied one by one (the culprit becomes a dead letter)."""

    def __init__(self, partition: int, stream_id: str, error: Exception) -> None:
        super().__init__(f"partition {partition} entry {stream_id}: {type(error).__name__}: {error}")
        self.error = error


class MigrationError(ProjectorError):
    """Raised when migrations cannot be applied safely."""


class ExportError(ProjectorError):
    """Raised when a replay cannot write its output: the message says what failed and why."""


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


class LeaseLost(ProjectionStopped):
    """The worker's lease on the partition expired (it could not renew it in time): another worker may
    own it now. The partition's task ends; the worker projects it again only if it wins the lease back."""

    def __init__(self, partition: int, owner: str) -> None:
        super().__init__(f"partition {partition}: lease lost by {owner}")
        self.partition = partition


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


class AuditError(ProjectorError):
    """The audit could not run; `exit_code` is what `python -m projector audit` exits with."""

    exit_code = 2


class AuditRequestError(AuditError):
    """The audit was asked something malformed."""


class AuditUnreachable(AuditError):
    """The deployment to audit cannot be read."""

    exit_code = 3


class SelectionError(ProjectorError):
    """Raised when a replay or snapshot request cannot be understood: a malformed position or time, an
    unknown event type, a range that ends before it starts, a position from another log epoch.

    `reason` is the stable slug the HTTP API answers with.
    """

    def __init__(self, message: str, reason: str = "invalid-selection") -> None:
        super().__init__(message)
        self.reason = reason


class ReadError(ProjectorError):
    """Base of the errors of the query API's reads."""


class ReadsUnavailable(ReadError):
    """Raised when Postgres cannot be reached or no query connection frees up within the pool timeout."""


class QueryTimeout(ReadError):
    """Raised when a read ran past the query connections' statement timeout (Postgres cancelled it)."""


class PositionFromAnotherEpoch(ReadError):
    """Raised when a client waits for a position of another log epoch than the checkpoint's."""

    def __init__(self, checkpoint_epoch: str) -> None:
        super().__init__(f"the read models follow epoch {checkpoint_epoch}")
        self.checkpoint_epoch = checkpoint_epoch


class ReadModelsFromAnotherEpoch(ReadError):
    """Raised when a partition's read models follow another epoch than the log's: no position of this log
    is one they are exact at (the log was recreated; the projector stops that partition)."""

    def __init__(self, partition: int, checkpoint_epoch: str, log_epoch: str) -> None:
        super().__init__(f"partition {partition}'s read models follow epoch {checkpoint_epoch}, "
                         f"the log is at {log_epoch}")  # fmt: skip
        self.partition, self.checkpoint_epoch, self.log_epoch = partition, checkpoint_epoch, log_epoch


class SchemaSwapped(ReadError):
    """Raised when a rebuild swapped the read models in between the statements of one snapshot: the rows may
    come from another schema than the checkpoints, so the read is done again."""
