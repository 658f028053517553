"""`python -m realtime_fanout` serves the WebSocket fanout (ws://127.0.0.1:8001/v1/stream by default)."""

from __future__ import annotations

import argparse
import sys

from servicekit.exceptions import ServiceKitError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m realtime_fanout",
        description="Serve the WebSocket fanout; settings come from the environment (see README).",
    ).parse_args(argv)
    import uvicorn

    from realtime_fanout.app import create_app
    from realtime_fanout.settings import FanoutSettings
    from realtime_fanout.wsproto import protocol_class
    from servicekit.httpedge import configure_logging, edge_sockets, server_config

    configure_logging()
    try:
        settings = FanoutSettings.from_env()
    except ServiceKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = server_config(
        create_app(settings), settings.http, settings.host, settings.port,
        ws=protocol_class(settings.close_timeout_s), ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s, timeout_graceful_shutdown=5,
        ws_max_size=settings.max_message_bytes,  # refused (1009) from the frame header, never buffered
    )  # fmt: skip
    uvicorn.Server(config).run(sockets=edge_sockets(settings.http, settings.host, settings.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
