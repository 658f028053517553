"""`python -m command_api` serves the API; `python -m command_api token USER` mints a dev token."""

from __future__ import annotations

import argparse
import sys

from servicekit.auth_settings import AuthSettings
from servicekit.exceptions import ServiceKitError
from servicekit.settings import Env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m command_api")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the command API (the default)")
    token = sub.add_parser("token", help="mint a JWT for a local user (dev mode only)")
    token.add_argument("user")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    args = parser.parse_args(argv)

    if args.command == "token":
        from servicekit.tokens import mint_token

        try:
            print(mint_token(AuthSettings.from_env(Env()), args.user, ttl_s=args.ttl))
        except ServiceKitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    import uvicorn

    from command_api.app import create_app
    from command_api.settings import CommandApiSettings
    from servicekit.httpedge import configure_logging, edge_sockets, server_config

    configure_logging()
    try:
        settings = CommandApiSettings.from_env()
    except ServiceKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = server_config(create_app(settings), settings.http, settings.host, settings.port)
    uvicorn.Server(config).run(sockets=edge_sockets(settings.http, settings.host, settings.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
