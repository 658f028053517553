"""Errors raised by the shared service edge.

ServiceKitError
├── SettingError        a setting is missing or cannot be parsed
├── DevModeRequired     a development-only operation was called outside PARLEY_DEV_MODE
├── TaskStopped         a supervised task crashed under the STOP policy
└── AuthError           a bearer token was refused
    ├── MissingToken
    └── InvalidToken    expired, badly signed, wrong audience/issuer, ... (see `reason`)
"""

from __future__ import annotations


class ServiceKitError(Exception):
    """Base of every error this package raises."""


class SettingError(ServiceKitError):
    """Raised when an environment setting is missing or malformed; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"setting {key}: {problem}")
        self.key = key


class DevModeRequired(ServiceKitError):
    """Raised when a development-only operation (such as minting tokens) runs without dev mode."""


class TaskStopped(ServiceKitError):
    """Raised by `Supervisor.check` when a task stopped after a crash; the message names each task."""


class AuthError(ServiceKitError):
    """Raised when a request cannot be authenticated; `reason` is a stable machine-readable slug."""

    reason = "invalid-token"

    def __init__(self, detail: str, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class MissingToken(AuthError):
    """Raised when a request carries no bearer token."""

    reason = "missing-token"


class InvalidToken(AuthError):
    """Raised when a token is malformed, expired, not yet valid, badly signed or not for us."""
