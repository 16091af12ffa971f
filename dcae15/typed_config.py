"""Mappings (YAML, JSON, ``--set``) into config dataclasses: the one place that refuses unknown keys and wrong types.

``from_dict(cls, data, path)`` builds a dataclass from a mapping: an unknown key, a value of the wrong type or a
value the class's own checks refuse raises ``ValueError`` naming the dotted ``path`` of the field and what is
allowed (``diffusion.train.lr: expected a number, got 'fast'``). Nested dataclass fields are built recursively
with a longer path. ``check_fields`` does the same checks for a partial mapping (overrides that are merged into a
full config later) and ``check_kwargs`` for the keyword arguments of a function.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import re
import types
import typing
from typing import Any, Callable, Mapping, TypeVar

__all__ = ["from_dict", "check_fields", "check_kwargs", "check_keys"]

T = TypeVar("T")


def check_keys(data: Mapping[str, Any], allowed: typing.Iterable[str], path: str) -> None:
    """Refuse keys of ``data`` outside ``allowed``, naming them with their dotted path and the allowed names."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of fields, got {data!r}")
    allowed = list(allowed)
    bad = sorted(set(data) - set(allowed))
    if bad:
        where = ", ".join(_join(path, k) for k in bad)
        raise ValueError(f"unknown fields {where}; allowed in {path or 'the config'}: {', '.join(sorted(allowed))}")


def check_fields(cls: type, data: Mapping[str, Any], path: str, *, partial: bool = True) -> dict[str, Any]:
    """Check the names and types of a partial mapping of ``cls``'s fields; returns it with values normalised
    (a YAML ``1e-4`` string as a float; nested dataclass fields as checked mappings, or built when not
    ``partial``)."""
    hints = _hints(cls)
    check_keys(data, hints, path)
    return {k: _check(v, hints[k], _join(path, k), partial=partial) for k, v in data.items()}


def from_dict(cls: type[T], data: Mapping[str, Any] | T | None, path: str | None = None) -> T:
    """``cls(**data)`` after checking every key and value; errors name the field's dotted ``path`` (None: the
    class name; ``""``: a top-level config whose fields are the paths).

    Raises:
        ValueError: unknown keys, wrong types, or values ``cls`` refuses (its message, with ``Class.field``
            rewritten to the dotted path).
    """
    if isinstance(data, cls):
        return data
    path = cls.__name__ if path is None else path
    values = check_fields(cls, data or {}, path, partial=False)
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ValueError(_with_path(str(exc), cls, path)) from None


def check_kwargs(fn: Callable[..., Any], data: Mapping[str, Any], path: str, *,
                 exclude: typing.Iterable[str] = ()) -> dict[str, Any]:
    """Check ``data`` as keyword arguments of ``fn`` (names and annotated types); ``exclude`` are parameters the
    caller fills in itself. Returns the normalised mapping."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    skip = set(exclude)
    names = [n for n, p in sig.parameters.items()
             if n not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    check_keys(data, names, path)
    return {k: _check(v, hints.get(k, Any), _join(path, k), partial=True) for k, v in data.items()}


# ------------------------------------------------------------------------------------------------------- internals
def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _with_path(msg: str, cls: type, path: str) -> str:
    if not path:
        return msg
    named = re.sub(rf"\b{re.escape(cls.__name__)}\.", f"{path}.", msg)
    if named != msg or re.search(rf"(^|[\s'\"]){re.escape(path)}([.\[\s:]|$)", msg):
        return named  # the message names the field already
    return f"{path}: {msg}"


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    if origin is dict or tp is dict or (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, path: str, *, partial: bool = False) -> Any:
    """``value`` checked against annotation ``tp`` (and normalised); ValueError naming ``path`` otherwise."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{path}: expected {_describe(tp)}, got null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, path, partial=partial)
            except ValueError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ValueError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return check_fields(tp, value, path) if partial else from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ValueError(f"{path}: expected a list of {len(args)} values, got {value!r}")
                items = [_check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
            else:
                item = args[0] if args else Any
                items = [_check(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
            return type(value)(items)
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            return value
    else:
        return value  # an annotation this checker does not know: the class's own checks decide
    raise ValueError(f"{path}: expected {_describe(tp)}, got {value!r}")
