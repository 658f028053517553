"""Typed access to environment settings: one place that casts, defaults and names the bad key."""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping

from servicekit.exceptions import SettingError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Env:
    """Reads settings from a mapping: the process environment, or one that tests inject."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def raw(self, key: builtins.str) -> builtins.str | None:
        return self._environ.get(key)

    def str(self, key: builtins.str, default: builtins.str | None = None) -> builtins.str:
        value = self._environ.get(key)
        if value is None or value == "":
            if default is None:
                raise SettingError(key, "is required but not set")
            return default
        return value

    def optional_str(self, key: builtins.str) -> builtins.str | None:
        value = self._environ.get(key)
        return value if value else None

    def int(
        self, key: builtins.str, default: builtins.int, *, minimum: builtins.int | None = None
    ) -> builtins.int:
        value = self._environ.get(key)
        if value is None or value == "":
            return default
        try:
            parsed = builtins.int(value)
        except ValueError:
            raise SettingError(key, f"expected an integer, got {value!r}") from None
        if minimum is not None and parsed < minimum:
            raise SettingError(key, f"must be at least {minimum}, got {parsed}")
        return parsed

    def float(
        self,
        key: builtins.str,
        default: builtins.float,
        *,
        minimum: builtins.float | None = None,
    ) -> builtins.float:
        value = self._environ.get(key)
        if value is None or value == "":
            return default
        try:
            parsed = builtins.float(value)
        except ValueError:
            raise SettingError(key, f"expected a number, got {value!r}") from None
        if minimum is not None and parsed < minimum:
            raise SettingError(key, f"must be at least {minimum}, got {parsed}")
        return parsed

    def bool(self, key: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._environ.get(key)
        if value is None:
            return default
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingError(key, f"expected a boolean (1/0, true/false), got {value!r}")

    def choice(
        self, key: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]
    ) -> builtins.str:
        value = self.str(key, default)
        if value not in choices:
            raise SettingError(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def csv(self, key: builtins.str, default: tuple[builtins.str, ...] = ()) -> tuple[builtins.str, ...]:
        value = self._environ.get(key)
        if value is None or value.strip() == "":
            return default
        return tuple(part.strip() for part in value.split(",") if part.strip())
