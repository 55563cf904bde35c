"""Registries: from a config ``kind`` to its config dataclass and its builder.

Each kind of thing users extend (quantiser, level decoder, prior, data source)
has one :class:`Registry`. A config section names its kind (``quantizer: {kind:
fsq, levels: [8, 5, 5, 5]}``); the config loader reads the section into the
kind's dataclass, and the factories build the model from it. Adding a kind is a
class, its config dataclass and one :meth:`Registry.add` line in
:mod:`progvq.kinds`; nothing else names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One kind: its name, its config dataclass and what builds it from an instance of that dataclass."""

    kind: str
    config: type
    builder: Callable[..., Any]


class Registry:
    """``kind`` -> :class:`Entry`, for one kind of thing (``what``: "quantizer", "decoder", ...)."""

    def __init__(self, what: str, *, shared_config: bool = False) -> None:
        self.what = what
        # data sources share one flat config section; model kinds each have their own dataclass
        self.shared_config = shared_config
        self._entries: dict[str, Entry] = {}

    def add(self, kind: str, config: type, builder: Callable[..., Any]) -> None:
        """Register ``kind``; its config dataclass must belong to no other kind (unless ``shared_config``)."""
        if kind in self._entries:
            raise ValueError(f"{self.what} kind {kind!r} is registered twice")
        if not self.shared_config and any(entry.config is config for entry in self._entries.values()):
            raise ValueError(f"{config.__name__} already configures another {self.what} kind")
        self._entries[kind] = Entry(kind, config, builder)

    def kinds(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries

    def entry(self, kind: str) -> Entry:
        return self._entries[kind]

    def kind_of(self, config: Any) -> str:
        """The kind whose dataclass ``config`` is an instance of."""
        for entry in self._entries.values():
            if type(config) is entry.config:
                return entry.kind
        raise TypeError(f"{type(config).__name__} is no registered {self.what} config")

    def build(self, config: Any, *args: Any, **kwargs: Any) -> Any:
        """The builder of ``config``'s kind, called with ``config`` and the rest."""
        return self._entries[self.kind_of(config)].builder(config, *args, **kwargs)
