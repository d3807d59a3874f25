"""A nested mapping (YAML, ``key=value`` overrides) -> a dataclass, every value checked.

Shared by the run's config (``cilab.config``) and each method's own settings
(``Method.parse_args``); it imports neither, so both can import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from .errors import ConfigError

INT_LIMIT = 2**63  # integers must fit in 64 bits (torch, numpy)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], name + ".")
        else:
            keys.append(name)
    return keys


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys are listed in the README (Configuration).")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping (key: value), got {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `eval.classifiers=nme` means [nme]
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            # Beyond 64 bits torch, numpy and scikit-learn fail deep inside a
            # run with an overflow that names no key.
            if not -INT_LIMIT <= value < INT_LIMIT:
                raise ConfigError(f"'{key}' is {value}, too large; it must lie within +-2**63")
            return value
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-9 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                value = math.inf
            # NaN passes every comparison check (nan > 0 is False, nan < 0 too)
            # and inf only fails once training has started.
            if not math.isfinite(value):
                raise ConfigError(f"'{key}' must be a finite number, got {value}")
            return value
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {hint} for {key}")


def coerce_key(cls: type, key: str, value: Any) -> Any:
    """``value`` as the dataclass ``cls`` holds its dotted ``key`` (``eval.classifiers``: ``knn`` ->
    ``["knn"]``); ConfigError for a key ``cls`` lacks (or a whole section) and a value it refuses."""
    hint: Any = cls
    for part in key.split("."):
        fields = typing.get_type_hints(hint) if dataclasses.is_dataclass(hint) else {}
        if part not in fields:
            raise _unknown_key(key, _all_keys(cls))
        hint = fields[part]
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"'{key}' is a section, not a key")
    return _coerce(key, value, hint)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", known: list[str] | None = None) -> Any:
    """``data`` (a nested mapping from YAML or overrides) -> an instance of the dataclass ``cls``.

    Every value is checked against its annotation (see ``_coerce``); a key that
    ``cls`` lacks is refused with the closest of ``known`` (default: every dotted
    key of ``cls``, after ``prefix``) as a suggestion, so a typo in a nested
    section can be pointed to a key of another section.
    """
    if known is None:
        known = _all_keys(cls, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            full = prefix + key
            while isinstance(value, dict) and value:  # name the whole dotted key
                sub, value = next(iter(value.items()))
                full += "." + sub
            raise _unknown_key(full, known)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"'{prefix}{name}' is a section; set its keys, e.g. {prefix}{name}.<key>=...")
            kwargs[name] = from_dict(hint, value, prefix + name + ".", known)
        else:
            kwargs[name] = _coerce(prefix + name, value, hint)
    return cls(**kwargs)
