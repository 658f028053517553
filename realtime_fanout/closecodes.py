"""WebSocket close codes the fanout uses; each is documented in README.md (Close codes)."""

from __future__ import annotations

NORMAL = 1000
MESSAGE_TOO_BIG = 1009  # sent by the server (uvicorn) for a frame over PARLEY_FANOUT_MAX_MESSAGE_BYTES
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012  # graceful shutdown: reconnect (to any instance) with your last cursor
SLOW_CONSUMER = 4008  # the send buffer exceeded PARLEY_FANOUT_MAX_BUFFER_BYTES: reconnect with your cursor
PROTOCOL_ERROR = 4400  # a message was malformed, unknown, or out of order
UNAUTHORIZED = 4401  # no valid token within the auth timeout, or the token expired without a refresh
FORBIDDEN = 4403  # a refresh token named another user
TOO_MANY_CONNECTIONS = 4429  # the user holds PARLEY_FANOUT_MAX_CONNECTIONS_PER_USER here: retry with backoff
UNAVAILABLE = 4503  # the log is not readable yet: retry with backoff
