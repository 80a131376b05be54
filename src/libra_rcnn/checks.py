"""Checks shared by the configuration and the public constructors and functions.

* :func:`dataclass_from_dict` / :func:`check_field_types`: every field of a config dataclass
  against its annotation (nested dataclasses, ``Optional``, ``Literal`` choices, containers,
  numbers), for a mapping read from a file or for an instance made in Python.
* Small value checks (``check_positive_int`` ...).

Each raises a one-line ``ValueError`` that names the setting. They are meant for where a value
enters (a config is loaded, a detector is built, a user calls an op), never for the training step.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Sequence, Union

__all__ = [
    "check_field_types",
    "check_finite_non_negative",
    "check_int_between",
    "check_minus_one_or_non_negative",
    "check_non_negative_int",
    "check_one_of",
    "check_positive_int",
    "check_unit_interval",
    "dataclass_from_dict",
    "is_int",
    "is_number",
]


# ----------------------------------------------------------------------------------------------
# field types


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, check_only: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widened to float,
    lists to tuples where declared). Raises ``ValueError("<key>: <problem>")``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dataclass_from_dict(tp, value, prefix=key + ".", check_only=check_only)
    if origin is Literal:
        choices = typing.get_args(tp)
        # bool is an int in Python; keep True from matching a Literal[1]
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise ValueError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{key}: expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, check_only)
            except ValueError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key}: expected a list of {len(args)} items, got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]", check_only)
                         for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", check_only) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, f"{key}.<key>", check_only):
                _convert(v, val_tp, f"{key}.{k}", check_only) for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"{key}: expected null, got {value!r}")
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def dataclass_from_dict(cls: type, data: dict, *, prefix: str = "", check_only: bool = False) -> Any:
    """Build the dataclass ``cls`` from a plain mapping, checking every key and value against the
    field annotations (nested dataclasses, ``Optional``, ``Literal``, ``list``/``tuple``/``dict``,
    ``int``/``float``/``bool``/``str``). Missing keys take the field defaults.

    Raises ``ValueError("<prefix><key>: <problem>")`` for an unknown key, an ill-typed value, or a
    value refused by the dataclass's own ``__post_init__`` checks. ``check_only``: check keys and
    value types only and return None (for a partial mapping, such as one file of an inheritance
    chain, whose cross-field checks only make sense once merged).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ValueError(f"{key}: unknown key")
        kwargs[name] = _convert(value, hints[name], key, check_only)
    if check_only:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        where = prefix.rstrip(".") or cls.__name__
        raise ValueError(f"{where}: {exc}") from None


def check_field_types(obj: Any, prefix: str = "") -> None:
    """``ValueError("<prefix><field>: <problem>")`` unless every field of the dataclass instance
    ``obj`` (nested ones included) holds a value of its annotated type, as a config file's must."""
    dataclass_from_dict(type(obj), dataclasses.asdict(obj), prefix=prefix, check_only=True)


# ----------------------------------------------------------------------------------------------
# values


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(value: Any, name: str) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_non_negative_int(value: Any, name: str) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def check_int_between(value: Any, name: str, low: int, high: int) -> None:
    """``low <= value <= high``."""
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def check_unit_interval(value: Any, name: str) -> None:
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def check_finite_non_negative(value: Any, name: str) -> None:
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_minus_one_or_non_negative(value: Any, name: str, minus_one: str) -> None:
    """``-1`` (which means ``minus_one``, e.g. "no cap") or a number ``>= 0`` (``inf`` included)."""
    if not is_number(value) or math.isnan(value) or (value < 0 and value != -1):
        raise ValueError(f"{name} must be -1 ({minus_one}) or a number >= 0, got {value!r}")


def check_one_of(value: Any, choices: Sequence[Any], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
