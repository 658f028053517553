"""`python -m projector` runs the worker and the query API; `redrive` re-applies dead letters; `rebuild`
rebuilds the read models beside the live ones and swaps them in; `trim` trims the streams once; `audit` checks
the deployment's guarantees (exit 0 all good, 1 a violation, 2 a bad request, 3 unreachable)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from projector.exceptions import AuditError
from servicekit.exceptions import ServiceKitError


async def serve() -> int:
    import uvicorn

    from projector.app import create_app
    from projector.reads import Reads
    from projector.settings import ProjectorSettings
    from projector.worker import Worker
    from servicekit.httpedge import edge_sockets, server_config

    settings = ProjectorSettings.from_env()
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(_signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(stop.set)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    await worker.start()
    reads = Reads(settings)
    await reads.open()
    app = create_app(settings, worker, reads)
    config = server_config(app, settings.http, settings.http_host, settings.http_port, lifespan="off")
    server = uvicorn.Server(config)
    sockets = edge_sockets(settings.http, settings.http_host, settings.http_port)
    http = asyncio.create_task(server.serve(sockets=sockets), name="http")
    http.add_done_callback(lambda _t: stop.set())
    try:
        await worker.run(stop)
    finally:
        server.should_exit = True
        await asyncio.gather(http, return_exceptions=True)
        await reads.close()
        await worker.close()
    return 0


async def redrive_main() -> int:
    import psycopg

    from projector.migrate import migrate
    from projector.redrive import redrive
    from projector.settings import ProjectorSettings
    from projector.store import Store

    settings = ProjectorSettings.from_env(auth=False)
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        await migrate(conn)
        applied, failed = await redrive(conn, Store())
    print(f"re-applied {applied} dead letters; {failed} still fail")
    return 1 if failed else 0


async def rebuild_main() -> int:
    from projector.rebuild import rebuild
    from projector.settings import ProjectorSettings

    report = await rebuild(ProjectorSettings.from_env(auth=False))
    print(
        f"rebuilt {report.schema} and swapped it in as parley: {report.from_archive} events from the "
        f"archive, {report.from_log} entries from the log, writers paused {report.swap_ms:.0f} ms, "
        f"{report.seconds:.1f} s in all"
    )
    return 0


async def rebuild_archive_main(schema: str, partitions: list[int]) -> int:
    from projector.rebuild import fold_archive_into
    from projector.settings import ProjectorSettings

    folded = await fold_archive_into(ProjectorSettings.from_env(auth=False), schema, partitions)
    print(f"folded {folded} archived events of partitions {partitions} into {schema}")
    return 0


async def trim_main(*, dry_run: bool) -> int:
    from psycopg_pool import AsyncConnectionPool

    from events.redisclient import redis_client
    from projector.retention import Retention
    from projector.settings import ProjectorSettings

    settings = ProjectorSettings.from_env(auth=False)
    redis = redis_client(settings.log.redis_url, 30, cluster=settings.log.redis_cluster)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url, min_size=1, max_size=1, open=False
    )
    try:
        await pool.open(wait=True, timeout=10)
        statuses = await Retention.of(settings, redis, pool).trim_once(dry_run=dry_run)
    finally:
        await pool.close()
        await redis.aclose()
    verb = "would trim" if dry_run else "trimmed"
    for s in statuses:
        where = f" below {s.minid}" if s.trimmed else ""
        held = " [held back by the archive]" if s.blocked else ""
        print(f"partition {s.partition}: {verb} {s.trimmed} entries{where}; {s.reason}{held}")
    return 1 if any(s.error for s in statuses) else 0


async def audit_main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from projector.audit import run_checks
    from projector.auditsource import gather, parse_window
    from projector.settings import ProjectorSettings

    audit = await gather(
        ProjectorSettings.from_env(auth=False),
        sample=args.sample,
        seed=args.seed,
        window=parse_window(args.since, args.until),
        received=None if args.received is None else Path(args.received),
    )
    report = run_checks(audit)
    if args.json:
        sys.stdout.buffer.write(report.json() + b"\n")
    else:
        print(report.text())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projector")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the worker and the query API (the default)")
    sub.add_parser("redrive", help="re-apply pending dead letters to the live read models")
    sub.add_parser("rebuild", help="rebuild the read models from the archive and the log, swap them in")
    trim = sub.add_parser("trim", help="trim every partition's stream once to the retention window")
    trim.add_argument("--dry-run", action="store_true", help="say what would be trimmed, trim nothing")
    part = sub.add_parser("rebuild-archive", help="(internal) one process of a rebuild's archive phase")
    part.add_argument("--schema", required=True)
    part.add_argument("--partitions", required=True, help="comma-separated partition numbers")
    audit = sub.add_parser("audit", help="check the log, archive, read models; exit 1 on a violation")
    audit.add_argument("--sample", type=int, metavar="N", help="fold-check N random conversations, not all")
    audit.add_argument("--seed", type=int, default=0, help="which sample (default 0)")
    audit.add_argument("--since", help="window start, unix ms or ISO 8601 (archive and seq checks)")
    audit.add_argument("--until", help="window end (exclusive), unix ms or ISO 8601")
    audit.add_argument("--received", metavar="FILE", help="JSONL of what clients received (README: Audit)")
    audit.add_argument("--json", action="store_true", help="the report as JSON")
    from projector.history import cli as history_cli

    history_cli.add_parser(sub)
    history_cli.add_snapshot_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("replay", "snapshot"):
        return history_cli.main(args)
    from servicekit.httpedge import configure_logging

    configure_logging()
    try:
        if args.command == "audit":
            return asyncio.run(audit_main(args))
        if args.command == "redrive":
            return asyncio.run(redrive_main())
        if args.command == "rebuild":
            return asyncio.run(rebuild_main())
        if args.command == "trim":
            return asyncio.run(trim_main(dry_run=args.dry_run))
        if args.command == "rebuild-archive":
            partitions = [int(p) for p in args.partitions.split(",")]
            return asyncio.run(rebuild_archive_main(args.schema, partitions))
        return asyncio.run(serve())
    except ServiceKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AuditError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
