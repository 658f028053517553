"""The web chat page: static files under `web/`, served with their own strict CSP, and the dev token route.

The page talks to the query API and the fanout on their own origins (CORS by PARLEY_ALLOWED_ORIGINS), so
its `connect-src` names exactly those two; scripts and styles come only from this origin (no inline code).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import msgspec
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from command_api.settings import CommandApiSettings
from servicekit.auth import SUBJECT
from servicekit.exceptions import SettingError
from servicekit.problems import problem_response
from servicekit.tokens import mint_token

WEB_DIR = Path(__file__).with_name("web")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip
DEV_TOKEN_TTL_S = 3600.0
_encoder = msgspec.json.Encoder()


class DevTokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    user_id: str


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def page_csp(settings: CommandApiSettings) -> str:
    """The page's policy: its own scripts and styles, connections to the two read-side origins only."""
    connect = " ".join(("'self'", _origin(settings.web_query_url), _origin(settings.web_fanout_url)))
    ancestors = " ".join(_origin(a) for a in settings.web_frame_ancestors) or "'none'"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors {ancestors}"
    )


def _files() -> dict[str, tuple[bytes, str]]:
    """Every page file, read once at start: nothing under `web/` is looked up from a request's path."""
    return {
        path.name: (path.read_bytes(), MEDIA_TYPES[path.suffix])
        for path in sorted(WEB_DIR.iterdir())
        if path.suffix in MEDIA_TYPES
    }


def add_web_routes(app: FastAPI, settings: CommandApiSettings) -> None:
    """`GET /` (the page), `GET /web/<file>`, `GET /web/config.json`, and `POST /dev/token` (dev mode)."""
    files = _files()
    csp = page_csp(settings)
    config = _encoder.encode(
        {"query_url": settings.web_query_url, "fanout_url": settings.web_fanout_url,
         "dev_mode": settings.auth.dev_mode,
         "embed_origins": [_origin(a) for a in settings.web_frame_ancestors]}
    )  # fmt: skip

    def answer(name: str) -> Response:
        found = files.get(name)
        if found is None:
            return problem_response(404, "not-found", "Not found")
        body, media_type = found
        return Response(body, media_type=media_type, headers={"content-security-policy": csp})

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return answer("index.html")

    @app.get("/web/config.json", include_in_schema=False)
    async def web_config() -> Response:
        return Response(config, media_type="application/json")

    @app.get("/web/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        return answer(name)

    @app.post("/dev/token", include_in_schema=False)
    async def dev_token(request: Request) -> Response:
        if not settings.auth.dev_mode:
            return problem_response(404, "not-found", "Not found")
        try:
            body = msgspec.json.decode(await request.body(), type=DevTokenRequest)
        except msgspec.DecodeError as exc:
            return problem_response(422, "invalid-body", "Invalid body", str(exc))
        if SUBJECT.fullmatch(body.user_id) is None:
            return problem_response(422, "invalid-id", "Invalid id", f"user_id must match {SUBJECT.pattern}")
        try:
            token = mint_token(settings.auth, body.user_id, ttl_s=DEV_TOKEN_TTL_S)
        except SettingError as exc:  # dev mode with only a public key: nothing to sign with
            return problem_response(404, "not-found", "Not found", str(exc))
        return Response(
            _encoder.encode({"token": token, "user_id": body.user_id}), media_type="application/json"
        )
