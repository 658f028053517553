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
    from realtime_fanout.edge import ws_options
    from realtime_fanout.settings import FanoutSettings
    from servicekit.httpedge import configure_logging, edge_sockets, server_config

    configure_logging()
    try:
        settings = FanoutSettings.from_env()
    except ServiceKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    config = server_config(
        app,
        settings.http,
        settings.host,
        settings.port,
        timeout_graceful_shutdown=5,
        **ws_options(settings, app),
    )
    uvicorn.Server(config).run(sockets=edge_sockets(settings.http, settings.host, settings.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
