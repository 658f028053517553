"""Settings are declared once (variable, default, bound) and read by one reader that names a bad variable."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import pytest

from command_api.settings import CommandApiSettings
from projector.settings import ProjectorSettings
from realtime_fanout.settings import FanoutSettings
from servicekit.auth_settings import AuthSettings
from servicekit.exceptions import SettingError
from servicekit.http_settings import HttpEdgeSettings
from servicekit.log_settings import LogSettings
from servicekit.settings import Env, EnvSettings, setting_of

SECRET = {"PARLEY_JWT_SECRET": "s" * 40}
CLASSES: tuple[type[EnvSettings], ...] = (
    LogSettings, AuthSettings, HttpEdgeSettings, CommandApiSettings, ProjectorSettings, FanoutSettings,
)  # fmt: skip


def declared(cls: type[EnvSettings]) -> list[tuple[str, str, Any, Any]]:
    """(field, variable, default, type) of every field of `cls` declared with `setting`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if "parley.env" in field.metadata:
            variable, default = setting_of(cls, field.name)
            rows.append((field.name, variable, default, hints[field.name]))
    return rows


def sample(hint: Any, default: Any) -> tuple[str, Any]:
    """A value other than the default, as set in the environment and as read."""
    if hint is bool:
        return ("0", False) if default else ("1", True)
    if hint is int:
        return "4242", 4242
    if hint is float:
        return "4242.5", 4242.5
    if typing.get_origin(hint) is Literal:
        other = next(a for a in typing.get_args(hint) if a != default)
        return other, other
    value = f"{default.split('://')[0]}://sample.example" if "://" in str(default) else "sample"
    return value, value


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unset_variables_give_the_declared_defaults(cls: type[EnvSettings]) -> None:
    settings = cls.from_env(Env(SECRET))
    for name, _variable, default, _hint in declared(cls):
        if name not in ("secret", "worker_id"):
            assert getattr(settings, name) == default, name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_declared_variable_is_read_into_its_field(cls: type[EnvSettings]) -> None:
    for name, variable, default, hint in declared(cls):
        if hint in (str | None, tuple[str, ...]) or name in ("secret",):
            continue  # key material and lists have their own checks (test_auth, test_http_edge, test_web_page)
        raw, parsed = sample(hint, default)
        assert getattr(cls.from_env(Env({**SECRET, variable: raw})), name) == parsed, variable


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_bad_number_is_refused_naming_its_variable(cls: type[EnvSettings]) -> None:
    for _name, variable, _default, hint in declared(cls):
        if hint in (int, float):
            with pytest.raises(SettingError, match=variable):
                cls.from_env(Env({**SECRET, variable: "many"}))


def test_a_number_below_its_minimum_is_refused_naming_its_variable() -> None:
    with pytest.raises(SettingError, match="PARLEY_PARTITIONS: must be at least 1, got 0"):
        LogSettings.from_env(Env({"PARLEY_PARTITIONS": "0"}))


def test_each_variable_is_declared_by_one_field() -> None:
    owners: dict[str, str] = {}
    for cls in CLASSES:
        for name, variable, _default, _hint in declared(cls):
            owner = f"{cls.__name__}.{name}"
            if variable == "DATABASE_URL":  # the fanout's is optional (no archive without it)
                continue
            assert owners.setdefault(variable, owner) == owner, f"{variable}: {owners[variable]} and {owner}"


def test_the_projector_reads_no_token_settings_when_told_not_to() -> None:
    assert ProjectorSettings.from_env(Env({}), auth=False).auth is None
    assert ProjectorSettings.from_env(Env(SECRET)).auth is not None
