"""Reading what a stranger may have written: JSON parsed with bounds and checked against a schema.

Every JSON document progvq reads back (a compressed file's header, a data cache's manifest) may
have been written by someone else. ``json.loads`` alone accepts what later code cannot take:
arrays nested thousands deep (``RecursionError`` in the parser or in a later comparison),
``NaN`` and ``Infinity``, ``2.0`` or ``true`` where a count belongs, negative sizes. So a document
is parsed in three steps, each refused with :class:`UntrustedError` naming the key:

1. its size and nesting depth are counted on the raw text, before the parser runs;
2. it is parsed with ``NaN``/``Infinity`` refused;
3. the parsed value is checked against a schema (types, ranges, lengths) before any value is used.

A schema is built from the small classes below: :class:`Int`, :class:`Str`, :class:`List`,
:class:`Dict`, :class:`Map` and :data:`ANY` (any JSON value within the depth already checked).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ProgvqError

#: Deepest nesting of arrays and objects any document progvq reads may have.
MAX_DEPTH = 32


class UntrustedError(ProgvqError):
    """A document does not have the shape its schema asks for (the message names the key)."""


class Schema:
    """A check of one parsed JSON value; ``check`` raises :class:`UntrustedError` naming ``key``."""

    def check(self, value: Any, key: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Schema):
    """An integer in [lo, hi]: not a bool, not a float (``2.0`` is refused where a count belongs)."""

    lo: int
    hi: int

    def check(self, value: Any, key: str) -> None:
        if type(value) is not int:
            raise UntrustedError(f"{key}: expected an integer, got {_show(value)}")
        if not self.lo <= value <= self.hi:
            raise UntrustedError(f"{key}: {value} is out of range {self.lo}..{self.hi}")


@dataclass(frozen=True)
class Str(Schema):
    """A string of at most ``max_len`` characters, matching ``pattern`` (a full match) when given."""

    max_len: int = 4096
    pattern: str | None = None

    def check(self, value: Any, key: str) -> None:
        if not isinstance(value, str):
            raise UntrustedError(f"{key}: expected a string, got {_show(value)}")
        if len(value) > self.max_len:
            raise UntrustedError(f"{key}: a string of {len(value)} characters, at most {self.max_len}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise UntrustedError(f"{key}: {_show(value)} is not of the expected form")


@dataclass(frozen=True)
class List(Schema):
    """An array of ``min_len``..``max_len`` items, each checked by ``item``."""

    item: Schema
    max_len: int
    min_len: int = 0

    def check(self, value: Any, key: str) -> None:
        if not isinstance(value, list):
            raise UntrustedError(f"{key}: expected an array, got {_show(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            size = str(self.min_len) if self.min_len == self.max_len else f"{self.min_len}..{self.max_len}"
            raise UntrustedError(f"{key}: an array of {len(value)} items, expected {size}")
        for i, item in enumerate(value):
            self.item.check(item, f"{key}[{i}]")


@dataclass(frozen=True)
class Dict(Schema):
    """An object with the ``required`` keys and at most the ``optional`` ones besides; no others."""

    required: dict[str, Schema]
    optional: dict[str, Schema] = field(default_factory=dict)

    def check(self, value: Any, key: str) -> None:
        if not isinstance(value, dict):
            raise UntrustedError(f"{_at(key)}expected an object, got {_show(value)}")
        missing = [k for k in self.required if k not in value]
        if missing:
            raise UntrustedError(f"{_at(key)}no key {missing[0]!r}")
        unknown = sorted(k for k in value if k not in self.required and k not in self.optional)
        if unknown:
            raise UntrustedError(f"{_at(key)}unknown key {_show(unknown[0])}")
        for k, schema in (self.required | self.optional).items():
            if k in value:
                schema.check(value[k], f"{key}.{k}" if key else k)


@dataclass(frozen=True)
class Map(Schema):
    """An object of at most ``max_len`` keys (each checked by ``keys``), each value checked by ``values``."""

    keys: Str
    values: Schema
    max_len: int

    def check(self, value: Any, key: str) -> None:
        if not isinstance(value, dict):
            raise UntrustedError(f"{key}: expected an object, got {_show(value)}")
        if len(value) > self.max_len:
            raise UntrustedError(f"{key}: an object of {len(value)} keys, at most {self.max_len}")
        for k, v in value.items():
            self.keys.check(k, f"{key} key")
            self.values.check(v, f"{key}.{k}")


class _Any(Schema):
    """Any JSON value (its depth and size were bounded before parsing)."""

    def check(self, value: Any, key: str) -> None:
        return None


ANY = _Any()


def _at(key: str) -> str:
    """``key: `` before a message, or nothing for the document itself."""
    return f"{key}: " if key else ""


def _show(value: Any) -> str:
    """A short, one-line picture of a parsed value for an error message."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 24 else text[:20] + "..."
    if isinstance(value, str):
        text = json.dumps(value)  # escapes newlines and control characters: the message stays one line
        return text if len(text) <= 40 else text[:36] + '..."'
    return "an array" if isinstance(value, list) else "an object"


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in the JSON ``text`` (brackets inside strings not counted).

    Counted on the raw text with a loop, so a document nested a million deep costs one pass and
    never reaches the recursive parser.
    """
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise UntrustedError(f"{name} is not a number JSON allows")


def parse_json(data: bytes, schema: Schema, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON document ``data``, checked against ``schema`` (see the module docstring).

    Raises :class:`UntrustedError` (a short reason, without the file's name: the caller adds it)
    for a document over ``max_bytes`` bytes, not UTF-8, nested deeper than ``max_depth``, not
    JSON (``NaN`` and ``Infinity`` included), or not of the schema's shape.
    """
    if len(data) > max_bytes:
        raise UntrustedError(f"{len(data)} bytes of JSON, at most {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UntrustedError("not UTF-8 text") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise UntrustedError(f"nested {depth} deep, at most {max_depth}")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except UntrustedError:
        raise
    except (ValueError, RecursionError) as err:
        # ValueError: not JSON, or an integer of more digits than Python converts
        raise UntrustedError(f"not JSON ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    schema.check(value, "")
    return value
