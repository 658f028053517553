"""How each refusal of the append script is answered over HTTP: status and title per stable slug."""

from __future__ import annotations

REFUSALS: dict[str, tuple[int, str]] = {
    "conversation-not-found": (404, "No such conversation among yours"),
    "conversation-exists": (409, "A conversation with this id already exists"),
    "already-a-participant": (409, "That user is already a participant"),
    "participant-not-found": (404, "That user is not a participant"),
    "creator-cannot-leave": (409, "The creator of a conversation always remains a participant"),
    "removal-forbidden": (403, "Only the creator may remove other participants"),
    "message-id-taken": (409, "A message with this id already exists in the conversation"),
    "reply-target-not-found": (422, "The message replied to does not exist in this conversation"),
    "message-not-found": (404, "No such message in this conversation"),
    "message-deleted": (410, "The message was deleted"),
    "not-the-author": (403, "Only the author may edit or delete a message"),
    "read-beyond-end": (422, "Cannot mark read beyond the conversation's last sequence"),
    "read-marker-not-advanced": (409, "Your read marker is already at or past that sequence"),
    "already-archived": (409, "The conversation is already archived for you"),
    "not-archived": (409, "The conversation is not archived for you"),
    "sequence-mismatch": (409, "The conversation's sequence is not the expected one"),
    "idempotency-key-reused": (422, "This Idempotency-Key was used with a different request"),
}

UNKNOWN_REFUSAL = (409, "The command was refused")


def refusal_status(reason: str) -> tuple[int, str]:
    return REFUSALS.get(reason, UNKNOWN_REFUSAL)
