"""Mappings (YAML, JSON, ``--set``) into config dataclasses: the one place that refuses unknown keys and wrong types.

``from_dict(cls, data, path)`` builds a dataclass from a mapping: an unknown key, a value of the wrong type or a
value the class's own checks refuse raises ``ValueError`` naming the dotted ``path`` of the field and what is
allowed (``diffusion.train.lr: expected a number, got 'fast'``). Nested dataclass fields are built recursively
with a longer path. ``check_fields`` does the same checks for a partial mapping (overrides that are merged into a
full config later) and ``check_kwargs`` for the keyword arguments of a function.

Ranges and choices are declared with the field, in its metadata, and checked by ``check_declared`` (which the
class's ``__post_init__`` calls first) and by ``check_fields``::

    steps: int = field(default=1000, metadata={**HORIZON, **at_least(1)})
    ema_decay: float = field(default=0.9999, metadata=between(0, 1, hi_open=True))
    schedule: str = field(default="constant", metadata=one_of(*SCHEDULES))

A field whose annotation admits None also takes None. The message names the field as ``Class.field`` (rewritten
to the dotted path by ``from_dict``) with the value and the range: ``DiffusionTrainConfig.lr=-1 must be > 0``,
``AETrainConfig.phase='warmup'; allowed: 'full', ...``. Cross-field rules stay in ``__post_init__``.
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

__all__ = ["from_dict", "check_fields", "check_kwargs", "check_keys", "at_least", "above", "between", "one_of",
           "check_declared"]

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
    out = {k: _check(v, hints[k], _join(path, k), partial=partial) for k, v in data.items()}
    for f in _declared(cls):
        if f.name in out:
            _check_value(f.metadata[_CHECK], out[f.name], _join(path, f.name), _admits_none(hints[f.name]))
    return out


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


# ------------------------------------------------------------------------------------------------------- declared
_CHECK = "check"  # the field-metadata key of a declared range or choice


@dataclasses.dataclass(frozen=True)
class _Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: Any) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        if self.hi is None:
            return f"must be {'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"must be {'<' if self.hi_open else '<='} {self.hi}"
        return f"must be in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


@dataclasses.dataclass(frozen=True)
class _OneOf:
    allowed: tuple

    def ok(self, v: Any) -> bool:
        return v in self.allowed

    def __str__(self) -> str:
        return "; allowed: " + ", ".join(repr(a) for a in self.allowed)


@dataclasses.dataclass(frozen=True)
class _Each:
    """The check applied to every item of a sequence value (``n`` items when set)."""

    check: _Range | _OneOf
    n: int | None = None

    def ok(self, v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and (self.n is None or len(v) == self.n)
                and all(self.check.ok(x) for x in v))

    def __str__(self) -> str:
        if isinstance(self.check, _OneOf):
            return f"; allowed for each of {self.n or 'its'} values: " + str(self.check).removeprefix("; allowed: ")
        return f"must be {self.n or 'a list of'} values, each {str(self.check).removeprefix('must be ')}"


def _declare(check: _Range | _OneOf, each: bool | int) -> dict[str, Any]:
    if each:
        check = _Each(check, None if each is True else int(each))
    return {_CHECK: check}


def at_least(lo: float, *, each: bool | int = False) -> dict[str, Any]:
    """Field metadata: the value must be >= ``lo`` (``each``: every item of a list; an int: exactly that many)."""
    return _declare(_Range(lo=lo), each)


def above(lo: float, *, each: bool | int = False) -> dict[str, Any]:
    """Field metadata: the value must be > ``lo``."""
    return _declare(_Range(lo=lo, lo_open=True), each)


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
            each: bool | int = False) -> dict[str, Any]:
    """Field metadata: the value must lie in [lo, hi] (``lo_open`` / ``hi_open``: that end excluded)."""
    return _declare(_Range(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open), each)


def one_of(*allowed: Any, each: bool | int = False) -> dict[str, Any]:
    """Field metadata: the value must be one of ``allowed``."""
    return _declare(_OneOf(tuple(allowed)), each)


def check_declared(obj: Any) -> None:
    """Check every field of dataclass instance ``obj`` against its declared range or choice (``at_least``,
    ``above``, ``between``, ``one_of``); None passes where the annotation admits it.

    Raises:
        ValueError: ``Class.field=value must be ...`` (``from_dict`` rewrites ``Class.`` into the dotted path).
    """
    cls = type(obj)
    hints = _hints(cls)
    for f in _declared(cls):
        _check_value(f.metadata[_CHECK], getattr(obj, f.name), f"{cls.__name__}.{f.name}",
                     _admits_none(hints.get(f.name, Any)))


@functools.lru_cache(maxsize=None)
def _declared(cls: type) -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(cls) if _CHECK in f.metadata)


def _admits_none(tp: Any) -> bool:
    return tp is Any or (typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp))


def _check_value(check: Any, value: Any, name: str, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    try:
        ok = value is not None and check.ok(value)
    except TypeError:  # a value of another type (the type checks are from_dict's): refused below
        ok = False
    if not ok:
        text = str(check)
        raise ValueError(f"{name}={value!r}{'' if text.startswith(';') else ' '}{text}{' or None' if none_ok else ''}")


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
