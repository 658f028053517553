"""Claims the README makes that the code can check."""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from command_api.append import Appender
from events.catalog import markdown
from realtime_fanout import client
from tests.fanout_fixtures import ROOT, Log, token

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
    appender: Appender,
    make_fanout: Any,
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


def slug_table(heading: str) -> dict[int, set[str]]:
    """{status: slugs} of the first `| status | slugs |` table after `heading` (each backticked word)."""
    text = README[README.index(heading) :]
    text = text[text.index("| status | slugs |") :]
    rows: dict[int, set[str]] = {}
    for line in text.splitlines()[2:]:
        if not line.startswith("|"):
            break
        statuses, slugs = line.split("|")[1:3]
        for status in re.findall(r"\d{3}", statuses):
            rows[int(status)] = set(re.findall(r"`([a-z][a-z-]*)`", slugs))
    return rows


def slugs_raised(path: Path, callees: set[str]) -> dict[int, set[str]]:
    """{status: slugs} of every `callee(<int>, "<slug>", ...)` call in the module at `path`."""
    found: dict[int, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and len(node.args) >= 2):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        status, slug = node.args[0], node.args[1]
        if name in callees and isinstance(status, ast.Constant) and isinstance(slug, ast.Constant):
            assert isinstance(status.value, int) and isinstance(slug.value, str), ast.unparse(node)
            found.setdefault(status.value, set()).add(slug.value)
    return found


def merged(*tables: dict[int, set[str]]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for table in tables:
        for status, slugs in table.items():
            out.setdefault(status, set()).update(slugs)
    return out


def test_the_query_api_error_table_lists_exactly_the_slugs_the_code_answers() -> None:
    """Every slug of the query API's routes (projector/*.py, history aside), by status; 401 is the shared
    token check's (the command API's table lists those)."""
    from projector.params import Problem, parse_seq

    raised = [
        slugs_raised(p, {"Problem", "problem_response"}) for p in sorted((ROOT / "projector").glob("*.py"))
    ]
    computed: dict[int, set[str]] = {}
    for name in ("after_seq", "before_seq"):  # parse_seq makes its slug from the parameter's name
        try:
            parse_seq(name, "x")
        except Problem as problem:
            computed.setdefault(problem.status, set()).add(problem.slug)
    framework = {
        404: {"not-found"},
        405: {"method-not-allowed"},
        500: {"internal-error"},
    }  # servicekit.problems
    code = merged(*raised, computed, framework)
    readme = slug_table("### Query API")
    code.pop(401, None)
    readme.pop(401, None)
    assert readme == code


def test_the_history_route_lists_exactly_the_slugs_the_code_answers() -> None:
    history = ROOT / "projector" / "history"
    code = slugs_raised(history / "http.py", {"problem"})
    for node in ast.walk(ast.parse((history / "selection.py").read_text())):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "") == "SelectionError"
            and len(node.args) == 2
        ):
            reason = node.args[1]
            assert isinstance(reason, ast.Constant) and isinstance(reason.value, str), ast.unparse(node)
            code.setdefault(409 if reason.value == "position-from-another-log" else 400, set()).add(
                reason.value
            )
    section = README[README.index("### Over HTTP: `GET /v1/history`") :]
    line = section[section.index("- Errors (problem+json):") :].split("\n\n")[0]
    readme = {
        int(status): set(re.findall(r"`([a-z][a-z-]*)`", slugs))
        for status, slugs in re.findall(r"(\d{3}) ((?:`[a-z-]+`(?:,\s*)?)+)", line)
    }
    assert readme == code


def test_the_refusals_said_to_carry_current_seq_are_the_ones_that_do() -> None:
    from command_api.problems import _SEQ_DETAIL

    sentence = README[README.index("Three refusals carry an integer `current_seq`") :].split(".\n")[0]
    said = {slug for slug in re.findall(r"`([a-z][a-z-]*)`", sentence) if slug != "current_seq"}
    assert said == set(_SEQ_DETAIL)
    assert f"{['', 'One', 'Two', 'Three', 'Four'][len(said)]} refusals" in sentence


def test_the_idempotency_key_rule_is_the_one_the_readme_states() -> None:
    from command_api.bodies import check_idempotency_key
    from command_api.exceptions import CommandInvalid

    assert "the key 1\u2013255 visible ASCII characters (`!` to `~`)" in README

    def accepted(key: str) -> bool:
        try:
            return check_idempotency_key(key) == key
        except CommandInvalid:
            return False

    assert [c for c in map(chr, range(256)) if accepted(c)] == [chr(c) for c in range(0x21, 0x7F)]
    assert accepted("k" * 255) and not accepted("k" * 256) and not accepted("") and not accepted("a b")


def documented_defaults() -> dict[str, list[str]]:
    """What the README gives as each variable's default: the first word of its cell in a `| variable |
    default |` row (`A` / `_B` rows name A and A with its last words replaced, one value each side of
    ` / `), or the first word in the parentheses after it in prose (`` `A` (default: why) ``)."""
    found: dict[str, list[str]] = {}
    for line in README.splitlines():
        row = re.match(r"^\| ((?:`[A-Z_][A-Z0-9_]*`[^|`]*)+)\| ([^|]*) \|", line)
        if not row:
            continue
        names: list[str] = []
        for name in re.findall(r"`([A-Z_][A-Z0-9_]*)`", row.group(1)):
            if name.startswith("_") and names:  # `PARLEY_X_HOST` / `_PORT`
                name = "_".join(names[-1].split("_")[: -name.count("_")]) + name
            names.append(name)
        values = row.group(2).split(" / ")
        if len(values) == len(names):
            for name, value in zip(names, values, strict=True):
                found.setdefault(name, []).append(value)
    for prose in re.finditer(r"`([A-Z_][A-Z0-9_]*)` \((?=([^)]*))", README):  # nested: `A` (1, `B` (2))
        found.setdefault(prose.group(1), []).append(prose.group(2))
    return found


def as_default(text: str, like: object) -> object:
    """The README's words read as a value of the type of `like`, or None when they are not one."""
    word = text.strip().strip("`").split("`")[0].split()[0].rstrip(":;,") if text.strip() else ""
    if isinstance(like, bool):
        return {"1": True, "0": False}.get(word)
    if isinstance(like, int | float):
        unit = {"KiB": 1024, "MiB": 1024**2}.get(text.split()[1] if len(text.split()) > 1 else "", 1)
        return float(word) * unit if re.fullmatch(r"\d+(\.\d+)?", word) else None
    return word or None


def test_the_readme_gives_each_setting_its_declared_default() -> None:
    from tests.test_settings import CLASSES, declared

    documented = documented_defaults()
    for cls in CLASSES:
        for _name, variable, default, _hint in declared(cls):
            assert variable in README or variable in documented, f"README does not mention {variable}"
            if default is None or default == () or not isinstance(default, bool | int | float | str):
                continue  # unset by default, or computed (the worker id)
            said = [as_default(text, default) for text in documented.get(variable, [])]
            assert default in said, f"{variable}: the code's default is {default!r}, README says {said}"
