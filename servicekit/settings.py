"""Typed access to environment settings: one place that casts, defaults and names the bad key.

A settings object is a dataclass whose fields are declared with `setting(VARIABLE, default, ...)`: the
variable, its default and its bounds are written once, and `EnvSettings.from_env` reads them all, casting
by each field's annotation. A field whose type is itself an `EnvSettings` (the shared log, token and HTTP
edge settings) is read from the same environment.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Self

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


Check = Callable[[builtins.str, Any], Any]
"""A setting's own validation: `check(variable, value)` returns the value to keep or raises SettingError."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Declaration:
    key: builtins.str
    minimum: builtins.float | None
    check: Check | None


_ENV = "parley.env"


def setting(
    key: builtins.str,
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    minimum: builtins.float | None = None,
    check: Check | None = None,
    repr: builtins.bool = True,
) -> Any:
    """A dataclass field read from the environment variable `key`; `default` (or `default_factory()`)
    when it is unset or empty.

    The value is cast by the field's annotation (str, str | None, int, float, bool, tuple[str, ...] as a
    comma list, a Literal as a choice); `minimum` bounds a number; `check` validates what was read."""
    metadata = {_ENV: _Declaration(key, minimum, check)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, repr=repr, metadata=metadata)
    return dataclasses.field(default=default, repr=repr, metadata=metadata)


def setting_of(cls: type[EnvSettings], name: builtins.str) -> tuple[builtins.str, Any]:
    """The variable and the default declared for field `name` of the settings class `cls`."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    declaration: _Declaration = field.metadata[_ENV]
    return declaration.key, field.default


class EnvSettings:
    """Base of the settings dataclasses: `from_env` reads every field declared with `setting`."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[builtins.str, dataclasses.Field[Any]]]

    @classmethod
    def from_env(cls, env: Env | None = None) -> Self:
        """Read every declared setting from `env` (default: the process environment)."""
        return cls(**read_settings(cls, env or Env()))


def read_settings(cls: type[EnvSettings], env: Env, **given: Any) -> dict[builtins.str, Any]:
    """The keyword arguments of `cls` read from `env`: declared settings and nested settings objects;
    a field named in `given` takes that value instead, and any other field keeps its default."""
    hints = typing.get_type_hints(cls)
    values: dict[builtins.str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in given:
            values[field.name] = given[field.name]
            continue
        hint = hints[field.name]
        declaration: _Declaration | None = field.metadata.get(_ENV)
        if declaration is not None:
            value = _read(env, declaration, hint, _default(field))
            values[field.name] = (
                value if declaration.check is None else declaration.check(declaration.key, value)
            )
        elif (nested := _settings_class(hint)) is not None:
            values[field.name] = nested.from_env(env)
    return values


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _settings_class(hint: Any) -> type[EnvSettings] | None:
    """`hint` (or the non-None member of `hint | None`) when it is a settings class."""
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    classes = [m for m in members if isinstance(m, type) and issubclass(m, EnvSettings)]
    return classes[0] if len(classes) == 1 else None


def _read(env: Env, declaration: _Declaration, hint: Any, default: Any) -> Any:
    key, minimum = declaration.key, declaration.minimum
    if hint is builtins.bool:
        return env.bool(key, default)
    if hint is builtins.int:
        return env.int(key, default, minimum=None if minimum is None else builtins.int(minimum))
    if hint is builtins.float:
        return env.float(key, default, minimum=minimum)
    if hint is builtins.str:
        return env.str(key, default)
    if hint == builtins.str | None:
        return env.optional_str(key) or default
    if hint == tuple[builtins.str, ...]:
        return env.csv(key, default)
    if typing.get_origin(hint) is Literal:
        return env.choice(key, default, tuple(typing.get_args(hint)))
    raise TypeError(f"setting {key}: no reader for a field of type {hint!r}")
