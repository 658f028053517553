"""Where the bytes of the connections added between two `benchmarks.c100k --profile` snapshots went:
`python -m benchmarks.snapshot_diff DIR CONNECTIONS_ADDED [A B]` prints the top lines, bytes per connection.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path


def main(folder: Path, added: int, a: int = 1, b: int = 2, top: int = 30) -> None:
    old = tracemalloc.Snapshot.load(str(folder / f"snapshot-{a}.tracemalloc"))
    new = tracemalloc.Snapshot.load(str(folder / f"snapshot-{b}.tracemalloc"))
    stats = new.compare_to(old, "lineno")
    grown = sum(s.size_diff for s in stats)
    print(f"traced growth {grown / added:,.0f} bytes per connection over {added:,} connections")
    for s in stats[:top]:
        frame = s.traceback[0]
        print(
            f"{s.size_diff / added:8,.0f} B {s.count_diff / added:6.2f} blocks  {frame.filename}:{frame.lineno}"
        )
    print(json.dumps(json.loads((folder / f"sizes-{b}.json").read_text()), indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), *(int(x) for x in sys.argv[3:5]))
