"""The hub's verdicts on the log entries it reads: which are events (`events.admission`), which were refused.

The hub judges every entry once, in log order per partition: at bootstrap for what the streams hold, live
after. A refused entry is never dispatched, and replay (which reads the same entries again) skips it too:
`replayable` admits only entries the hub has judged and admitted. What the streams trimmed was judged by
the projector with the same rule: the archive the fanout reads (`parley_store.archived_events`) leaves
out its dead letters.
"""

from __future__ import annotations

import logging

from events.admission import MAX_MESSAGES, MESSAGE_WINDOW, Ledger
from events.schema import Envelope
from realtime_fanout.cursor import StreamKey
from realtime_fanout.item import Item
from realtime_fanout.metrics import ENTRIES_REFUSED

log = logging.getLogger(__name__)


class Verdicts:
    """The ledger of every conversation the hub has read, and the positions of the entries it refused.

    Memory: the ledger's per-conversation state (see `events.admission.Ledger`) and one key per refused
    entry (a dead letter in the projector too).
    """

    def __init__(self, window: int = MESSAGE_WINDOW, max_messages: int = MAX_MESSAGES) -> None:
        self.ledger = Ledger(window, max_messages)
        self.refused: set[tuple[int, str]] = set()

    def admit(self, partition: int, stream_id: str, envelope: Envelope) -> bool:
        """Judge the decoded entry at (partition, stream_id), the next one of its partition."""
        reason = self.ledger.admit(envelope)
        if reason is None:
            return True
        self.refused.add((partition, stream_id))
        ENTRIES_REFUSED.inc()
        log.error("skipping entry %s of partition %d, not an event: %s", stream_id, partition, reason)
        return False

    def replayable(self, item: Item, judged_up_to: StreamKey) -> bool:
        """True when replay may deliver `item`: judged (at or before `judged_up_to`, the hub's position in
        its partition) and not refused. A later item reaches the session live."""
        return item.key <= judged_up_to and (item.partition, item.stream_id) not in self.refused
