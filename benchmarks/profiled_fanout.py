"""`python -m realtime_fanout` under tracemalloc, for `benchmarks.c100k --profile DIR`: each SIGUSR1 dumps
a snapshot (DIR/snapshot-K.tracemalloc) and the sizes of one idle connection's objects (DIR/sizes-K.json).
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from benchmarks.profiling import profile_on_signal, type_counts


def object_sizes() -> dict[str, Any]:
    """sys.getsizeof (shallow) of the objects one subscribed connection holds, and counts per type."""
    from starlette.websockets import WebSocket

    from realtime_fanout.connection import Connection
    from realtime_fanout.edge import StreamEdge

    connections = [o for o in gc.get_objects() if isinstance(o, Connection)]
    if not connections or not hasattr(connections[-1], "__dict__"):
        return {"connections": len(connections), "gc_counts": type_counts()}
    c = connections[-1]
    ws = c.ws
    parts: dict[str, Any] = {
        "Connection": c, "Connection.__dict__": getattr(c, "__dict__", None), "ConnectionProtocol": c.protocol,
        "ConnectionProtocol.__dict__": vars(c.protocol), "Session": c.session,
        "Session.__dict__": getattr(c.session, "__dict__", None),
        "writer wake-up": c._wake, "writer wake-up __dict__": getattr(c._wake, "__dict__", None),
    }  # fmt: skip
    if isinstance(ws, WebSocket):
        parts |= {"starlette WebSocket": ws, "WebSocket.__dict__": vars(ws), "scope": ws.scope}
        uvicorn_protocol = getattr(ws._receive, "__self__", None)
        if uvicorn_protocol is not None:
            parts["uvicorn protocol"] = uvicorn_protocol
            parts["uvicorn protocol.__dict__"] = vars(uvicorn_protocol)
            parts["websockets ServerProtocol"] = uvicorn_protocol.conn
            parts["ServerProtocol.__dict__"] = vars(uvicorn_protocol.conn)
            parts["transport"] = uvicorn_protocol.transport
    elif isinstance(ws, StreamEdge):
        parts |= {"native edge": ws, "websockets ServerProtocol": ws.ws, "ServerProtocol.__dict__": vars(ws.ws),
                  "transport": ws.transport}  # fmt: skip
    sizes = {name: sys.getsizeof(obj) for name, obj in parts.items() if obj is not None}
    top = type_counts()
    tasks = sum(1 for o in gc.get_objects() if type(o).__name__ == "Task")
    return {"connections": len(connections), "shallow_bytes": sizes, "tasks": tasks, "gc_counts": top}


def main() -> None:
    profile_on_signal(object_sizes)
    from realtime_fanout.__main__ import main as fanout_main

    sys.exit(fanout_main([]))


if __name__ == "__main__":
    main()
