"""The HTTP edge of all three services, run as real processes: header limits, handshake refusals,
security headers, origins and CORS, OpenAPI documents, and no token in any log line."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from command_api.bodies import TEXT_PATTERN, clean_text
from command_api.exceptions import CommandInvalid
from devstack import pgadmin
from devstack.ports import free_port
from events.ids import CONVERSATION_ID_PATTERN
from projector.settings import SEARCH_MAX_CHARS, SEARCH_MAX_TERMS
from servicekit.exceptions import SettingError
from servicekit.http_settings import HttpEdgeSettings
from servicekit.httpedge import redact
from servicekit.settings import Env
from tests.fanout_fixtures import ROOT, fanout_env, token

HEADER_TIMEOUT_S = 1.0
ALLOWED = "https://app.example"
FOREIGN = "https://evil.example"
SECRET_QUERY = "sekrit-query-value-4b1d"


@dataclass
class Services:
    command_api: int
    query_api: int
    fanout: int
    logs: list[Path]

    @property
    def http_ports(self) -> dict[str, int]:
        return {"command_api": self.command_api, "query_api": self.query_api, "fanout": self.fanout}


async def _until_up(ports: list[int], procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as http:
        for port in ports:
            while True:
                assert all(p.poll() is None for p in procs), "a service exited at start"
                assert time.monotonic() < deadline, f"no answer on port {port}"
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)


@contextlib.contextmanager
def running_services(
    redis_server_url: str, database_server_url: str, folder: Path, **extra: str
) -> Iterator[Services]:
    """`python -m command_api`, `python -m projector` and `python -m realtime_fanout` on one log
    (`extra`: more PARLEY_* settings), killed and their database dropped on exit."""
    name = f"edge_{uuid.uuid4().hex[:8]}"
    database_url = pgadmin.create_database(database_server_url, name)
    ports = Services(free_port(), free_port(), free_port(), [])
    env = fanout_env(
        redis_server_url, f"edge{uuid.uuid4().hex[:6]}", DATABASE_URL=database_url,
        PARLEY_API_PORT=str(ports.command_api), PARLEY_PROJECTOR_HTTP_PORT=str(ports.query_api),
        PARLEY_FANOUT_PORT=str(ports.fanout), **extra,
    )  # fmt: skip
    procs = []
    for module in ("command_api", "projector", "realtime_fanout"):
        path = folder / f"{module}.log"
        ports.logs.append(path)
        with path.open("ab") as out:
            procs.append(
                subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT, stdout=out, stderr=out)
            )
    try:
        asyncio.run(_until_up(list(ports.http_ports.values()), procs))
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        pgadmin.drop_database(database_server_url, name)


@pytest.fixture(scope="module")
def services(
    redis_server_url: str, database_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    with running_services(
        redis_server_url, database_server_url, tmp_path_factory.mktemp("edge"),
        PARLEY_HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        PARLEY_ALLOWED_ORIGINS=f"{ALLOWED}, https://other.example", PARLEY_HTTP_ACCESS_LOG="1",
    ) as ports:  # fmt: skip
        yield ports


@dataclass
class Answer:
    status: int | None
    head: str
    seconds: float


async def exchange(port: int, chunks: list[bytes], pause_s: float = 0.0, wait_s: float = 5.0) -> Answer:
    """Send `chunks` (pausing between them) on a raw connection; the first answer's status and head."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def trickle() -> None:
        for chunk in chunks:
            writer.write(chunk)
            if pause_s:
                await asyncio.sleep(pause_s)

    sender = asyncio.create_task(trickle())
    data = b""
    try:
        async with asyncio.timeout(wait_s):
            while b"\r\n\r\n" not in data:
                got = await reader.read(65536)
                if not got:
                    break
                data += got
    except (TimeoutError, ConnectionError):
        pass
    finally:
        sender.cancel()
        writer.transport.abort()
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/1.1 ") else None
    return Answer(status, head.lower(), time.monotonic() - started)


def get(path: str, *headers: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *headers]) + "\r\n\r\n").encode()


async def test_every_service_refuses_a_large_header_at_once_and_serves_the_next_request(
    services: Services,
) -> None:
    for name, port in services.http_ports.items():
        huge = [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 1_048_576, b"\r\n\r\n"]
        refused = await exchange(port, huge)
        assert refused.status == 431, (name, refused.head)
        assert refused.seconds < 2, name
        assert "application/problem+json" in refused.head and "connection: close" in refused.head
        fine = await exchange(port, [get("/healthz", "X-Big: " + "a" * 12_000)])
        assert fine.status == 200, (name, fine.head)
    body = b"x" * 60_000  # a body past the head limit, in the same write as the head, is no head
    post = f"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    assert (await exchange(services.command_api, [post])).status == 405


async def test_a_trickled_header_is_cut_after_the_header_timeout(services: Services) -> None:
    async def trickled(port: int) -> Answer:
        lines = [b"GET /healthz HTTP/1.1\r\n"] + [b"X-Slow: %d\r\n" % n for n in range(40)]
        return await exchange(port, lines, pause_s=0.1, wait_s=HEADER_TIMEOUT_S + 3)

    answers = await asyncio.gather(*(trickled(port) for port in services.http_ports.values()))
    for answer in answers:
        assert answer.status == 408, answer.head
        assert HEADER_TIMEOUT_S - 0.1 <= answer.seconds < HEADER_TIMEOUT_S + 1.5
    silent = await exchange(services.fanout, [], wait_s=HEADER_TIMEOUT_S + 3)
    assert silent.status is None and silent.seconds < HEADER_TIMEOUT_S + 1.5  # closed, nothing to answer


def upgrade(path: str, *headers: str) -> bytes:
    return get(
        path, "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13", *headers,
    )  # fmt: skip


async def test_a_handshake_with_a_token_over_8_kib_is_answered_at_once(services: Services) -> None:
    big = "a" * 9_000
    in_query = await exchange(services.fanout, [upgrade(f"/v1/stream?token={big}")], wait_s=3)
    assert in_query.status == 414, in_query.head
    in_protocol = await exchange(
        services.fanout, [upgrade("/v1/stream", f"Sec-WebSocket-Protocol: parley, {big}")], wait_s=3
    )
    assert in_protocol.status == 431, in_protocol.head
    assert max(in_query.seconds, in_protocol.seconds) < 2


SECURITY = ("x-content-type-options: nosniff", "cache-control: no-store", "content-security-policy: ")


async def test_every_answer_carries_the_security_headers_and_no_banner(services: Services) -> None:
    auth = f"Authorization: Bearer {token('alice')}"
    paths = {
        "command_api": ["/healthz", "/metrics", "/openapi.json", "/nope", "/v1/conversations"],
        "query_api": ["/healthz", "/openapi.json", "/nope", "/v1/unread"],
        "fanout": ["/healthz", "/openapi.json", "/nope"],
    }
    for name, port in services.http_ports.items():
        for path in paths[name]:
            answer = await exchange(port, [get(path, auth)])
            assert answer.status is not None, (name, path)
            for header in SECURITY:
                assert header in answer.head, (name, path, header)
            assert "\r\nserver:" not in answer.head, (name, path)
        assert (await exchange(port, [get("/docs")])).status == 404, name  # no page loading a CDN's scripts
    created = await exchange(services.command_api, [_post("/v1/conversations", auth, b'{"title": "t"}')])
    assert created.status == 202, created.head
    for header in SECURITY:
        assert header in created.head


def _post(path: str, auth: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", auth, "Content-Type: application/json", *headers]
    return ("\r\n".join([*head, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode() + body


async def test_cors_on_the_http_apis_follows_the_allow_list(services: Services) -> None:
    for port, path in ((services.command_api, "/v1/conversations"), (services.query_api, "/v1/unread")):
        preflight = [
            f"OPTIONS {path} HTTP/1.1", "Host: x", "Access-Control-Request-Method: POST",
            "Access-Control-Request-Headers: authorization, idempotency-key",
        ]  # fmt: skip
        allowed = await exchange(
            port, [("\r\n".join([*preflight, f"Origin: {ALLOWED}"]) + "\r\n\r\n").encode()]
        )
        assert allowed.status == 204, allowed.head
        assert f"access-control-allow-origin: {ALLOWED}" in allowed.head
        for name in ("authorization", "content-type", "idempotency-key", "x-parley-position"):
            assert name in allowed.head.split("access-control-allow-headers:")[1].split("\r\n")[0]
        foreign = await exchange(
            port, [("\r\n".join([*preflight, f"Origin: {FOREIGN}"]) + "\r\n\r\n").encode()]
        )
        assert foreign.status == 403 and "access-control-allow-origin" not in foreign.head
        read = await exchange(port, [get("/healthz", f"Origin: {ALLOWED}")])
        assert f"access-control-allow-origin: {ALLOWED}" in read.head
        assert "idempotent-replayed" in read.head and "retry-after" in read.head
        assert (
            "access-control-allow-origin"
            not in (await exchange(port, [get("/healthz", f"Origin: {FOREIGN}")])).head
        )


async def test_a_foreign_origin_is_refused_on_the_websocket_handshake(services: Services) -> None:
    url = f"ws://127.0.0.1:{services.fanout}/v1/stream?token={token('alice')}"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, origin=FOREIGN):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    for origin in (ALLOWED, None):
        async with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
            assert ws.response is not None and ws.response.status_code == 101


async def test_the_openapi_documents_declare_parameters_security_errors_and_limits(
    services: Services,
) -> None:
    async with httpx.AsyncClient() as http:
        query = (await http.get(f"http://127.0.0.1:{services.query_api}/openapi.json")).json()
        command = (await http.get(f"http://127.0.0.1:{services.command_api}/openapi.json")).json()
    assert query["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
    }  # fmt: skip
    declared = {
        "/v1/conversations": {"limit", "cursor", "archived", "position", "X-Parley-Position"},
        "/v1/conversations/{conversation_id}/messages": {"limit", "after_seq", "before_seq", "position"},
        "/v1/unread": {"position"},
        "/v1/search": {"q", "limit", "position"},
    }
    for path, names in declared.items():
        operation = query["paths"][path]["get"]
        assert operation["security"] == [{"bearer": []}], path
        assert names <= {p["name"] for p in operation["parameters"]}, path
        for status in ("400", "401", "503"):
            assert "application/problem+json" in operation["responses"][status]["content"], (path, status)
    limit = next(p for p in query["paths"]["/v1/search"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] >= 1 and limit["schema"]["minimum"] == 1
    for path in declared:  # every read may be refused for the user's reads in flight, or fail as a bug
        responses = query["paths"][path]["get"]["responses"]
        assert "too-many-reads" in responses["429"]["description"], path
        assert {"429", "503"} <= {s for s, r in responses.items() if "Retry-After" in r.get("headers", {})}
        assert "internal-error" in responses["500"]["description"], path
    assert "422" not in query["paths"]["/v1/conversations/{conversation_id}/messages"]["get"]["responses"]
    search = query["paths"]["/v1/search"]["get"]
    assert "query-too-expensive" in search["responses"]["422"]["description"]
    q = next(p for p in search["parameters"] if p["name"] == "q")
    assert (q["required"], q["schema"]["maxLength"], q["schema"]["x-max-terms"]) == (
        True, SEARCH_MAX_CHARS, SEARCH_MAX_TERMS,
    )  # fmt: skip
    history = query["paths"]["/v1/history"]["get"]
    assert history["security"] == [{"bearer": []}]
    assert "analyst-role-required" in history["responses"]["403"]["description"]
    params = {p["name"]: p for p in history["parameters"]}
    assert {"from", "to", "since", "until", "conversation", "type", "actor", "limit", "format"} <= set(params)
    assert (
        params["limit"]["schema"]["maximum"] == 1000
        and "message_sent" in params["type"]["schema"]["items"]["enum"]
    )
    assert set(history["responses"]["200"]["content"]) == {"application/json", "application/x-ndjson"}
    for status in ("400", "401", "409", "500", "503"):
        assert "application/problem+json" in history["responses"][status]["content"], status
    schemas = command["components"]["schemas"]
    assert schemas["Id"]["pattern"] and schemas["Id"]["maxLength"] == 64
    assert schemas["CreateConversation"]["properties"]["title"]["maxLength"] == 200
    assert schemas["SendMessage"]["properties"]["body"]["maxLength"] == 4000
    assert schemas["CreateConversation"]["properties"]["participants"]["maxItems"] == 1000
    send = command["paths"]["/v1/conversations/{conversation_id}/messages"]["post"]
    path_id = next(p for p in send["parameters"] if p["name"] == "conversation_id")
    assert path_id["schema"]["pattern"] == CONVERSATION_ID_PATTERN  # `<creator>:<id>` or generated
    edit = command["paths"]["/v1/conversations/{conversation_id}/messages/{message_id}"]["patch"]
    message_id = next(p for p in edit["parameters"] if p["name"] == "message_id")
    assert message_id["schema"] == {"$ref": "#/components/schemas/Id"}
    key = next(p for p in send["parameters"] if p["name"] == "Idempotency-Key")
    assert key["schema"]["pattern"]


async def test_no_service_writes_a_token_or_a_query_value_to_its_log(services: Services) -> None:
    jwt = token("carol")
    async with connect(f"ws://127.0.0.1:{services.fanout}/v1/stream?token={jwt}&x={SECRET_QUERY}"):
        pass
    async with connect(f"ws://127.0.0.1:{services.fanout}/v1/stream?token={jwt[:-3]}xyz") as refused:
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await refused.recv()
    assert refused.close_code == 4401
    async with httpx.AsyncClient() as http:
        for port in (services.command_api, services.query_api):
            base = f"http://127.0.0.1:{port}"
            await http.get(f"{base}/healthz?token={jwt}&access_token={SECRET_QUERY}")
            await http.get(f"{base}/v1/unread?token={jwt}", headers={"Authorization": f"Bearer {jwt}"})
            await http.get(f"{base}/v1/unread", headers={"Authorization": f"Bearer {jwt[:20]}"})
            await http.post(f"{base}/v1/conversations?q={SECRET_QUERY}", headers={"Authorization": f"Bearer {jwt}"},
                            json={"title": "t"})  # fmt: skip
    await asyncio.sleep(0.3)
    logs = {path.stem: path.read_text() for path in services.logs}
    for name, text in logs.items():
        for secret in (jwt, jwt[:20], jwt.split(".")[1], jwt.split(".")[2], SECRET_QUERY):
            assert secret not in text, name
    assert "/healthz?token=…&access_token=…" in logs["command_api"]  # the lines are there, redacted
    assert "/healthz?token=…&access_token=…" in logs["projector"]
    assert "/v1/stream?token=…&x=…" in logs["realtime_fanout"]


def test_redaction_keeps_names_and_drops_values_and_credentials() -> None:
    line = '127.0.0.1:5 - "WebSocket /v1/stream?token=abc.def&cursor=c1" [accepted] Bearer s3cret eyJhbGciOi.eyJzdWIi.sig'
    assert (
        redact(line)
        == '127.0.0.1:5 - "WebSocket /v1/stream?token=…&cursor=…" [accepted] Bearer [redacted] [jwt]'
    )
    assert redact("partition 3 acquired") == "partition 3 acquired"


def test_allowed_origins_are_origins() -> None:
    settings = HttpEdgeSettings.from_env(
        Env({"PARLEY_ALLOWED_ORIGINS": "https://App.example/, http://localhost:3000"})
    )
    assert settings.allowed_origins == ("https://app.example", "http://localhost:3000")
    with pytest.raises(SettingError, match="PARLEY_ALLOWED_ORIGINS"):
        HttpEdgeSettings.from_env(Env({"PARLEY_ALLOWED_ORIGINS": "app.example"}))


@given(st.text(max_size=20))
def test_the_declared_text_pattern_is_what_the_command_api_accepts(text: str) -> None:
    try:
        clean_text(text, "body", 100)
        accepted = True
    except CommandInvalid as refused:
        accepted = refused.reason == "text-too-long"
    assert accepted == (re.fullmatch(TEXT_PATTERN, unicodedata.normalize("NFC", text)) is not None)
