"""Per-user caps on something held (connections, reads in flight), refused beyond rather than queued."""

from __future__ import annotations


class UserSlots:
    """How many of `limit` slots each user holds in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def take(self, user_id: str) -> bool:
        """Take one of the user's slots; False (nothing taken) when all `limit` are held."""
        held = self._held.get(user_id, 0)
        if held >= self.limit:
            return False
        self._held[user_id] = held + 1
        return True

    def give_back(self, user_id: str) -> None:
        held = self._held.pop(user_id, 0) - 1
        if held > 0:
            self._held[user_id] = held
