"""Claims the README makes that the code can check."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from test_fanout_e2e import ROOT, Log, appender, make_fanout, token  # noqa: F401 (fixtures)

from command_api.append import Appender
from events.catalog import markdown
from realtime_fanout import client

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_event_catalogue_matches_the_schemas() -> None:
    begin, end = "<!-- event-catalog:begin -->\n", "<!-- event-catalog:end -->"
    text = README[README.index(begin) + len(begin) : README.index(end)]
    assert text == markdown(), "run `python -m events.catalog` and paste it into the README"


def block(name: str) -> str:
    """The fenced code between `<!-- name:begin -->` and `<!-- name:end -->`."""
    begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
    text = README[README.index(begin) + len(begin) : README.index(end)].strip()
    assert text.startswith("```") and text.endswith("```"), f"{name} is not one fenced block"
    return text.split("\n", 1)[1].rsplit("\n", 1)[0] + "\n"


async def run_example(
    fanout_url: str, user: str, cursor: str | None, lines: int, on_line: Callable[[str], Awaitable[None]]
) -> list[str]:
    """Run the README's client example as a process until it printed `lines` lines (then kill it);
    `on_line` is awaited after each line."""
    env = {**os.environ, "FANOUT_URL": fanout_url, "TOKEN": token(user), "PYTHONPATH": str(ROOT)}
    env.pop("CURSOR", None)
    if cursor is not None:
        env["CURSOR"] = cursor
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", block("client-example"), env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(30):
            while len(printed) < lines:
                printed.append((await proc.stdout.readline()).decode().strip())
                assert printed[-1], f"the example ended early: {printed}"
                await on_line(printed[-1])
    finally:
        proc.kill()
        await proc.wait()
    return printed


async def test_the_client_example_follows_live_and_resumes_from_a_cursor(
    appender: Appender,  # noqa: F811
    make_fanout: Any,  # noqa: F811
) -> None:
    log = Log(appender)
    await log.create("readme", "alice", "bob")
    fanout = await make_fanout()

    async def send_once_live(line: str) -> None:
        if line.startswith("live"):
            await log.send("readme", "bob", "hello alice")

    first = await run_example(fanout.url, "alice", None, 2, send_once_live)
    assert first[0].startswith("live; resume with CURSOR=") and first[1] == "readme 2 message_sent"

    async def nothing(line: str) -> None:
        pass

    cursor = first[0].removeprefix("live; resume with CURSOR=")
    again = await run_example(fanout.url, "alice", cursor, 2, nothing)
    assert again[0] == "readme 2 message_sent" and again[1].startswith("live; resume with CURSOR=")


def test_the_client_library_section_names_each_public_name_and_each_is_documented() -> None:
    section = README[README.index("### Client library") : README.index("## Analysts")]
    for name in client.__all__:
        assert f"`{name}`" in section, f"README: Client library does not name {name}"
        value = getattr(client, name)
        if inspect.isfunction(value):
            assert value.__doc__, f"{name} has no docstring"
        elif inspect.isclass(
            value
        ):  # its own docstring, not its base's (not the aliases Item, TokenProvider)
            assert value.__dict__.get("__doc__"), f"{name} has no docstring"
