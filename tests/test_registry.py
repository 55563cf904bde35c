"""The registry: a config ``kind`` to its dataclass and its builder (the project's registries: test_kinds.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from progvq.registry import Entry, Registry


@dataclass
class Small:
    size: int = 1


@dataclass
class Large:
    size: int = 10


class Larger(Large):
    """A subclass is another dataclass: it names no kind of its parent's."""


def _registry() -> Registry:
    registry = Registry("thing")
    registry.add("small", Small, lambda cfg, *args, **kwargs: ("small", cfg.size, args, kwargs))
    registry.add("large", Large, lambda cfg: ("large", cfg.size))
    return registry


def test_kinds_keep_their_order_and_entries() -> None:
    registry = _registry()
    assert registry.kinds() == ("small", "large")
    assert "small" in registry and "medium" not in registry
    entry = registry.entry("large")
    assert isinstance(entry, Entry) and (entry.kind, entry.config) == ("large", Large)
    assert entry.builder(Large(3)) == ("large", 3)
    with pytest.raises(KeyError):
        registry.entry("medium")


def test_kind_of_is_the_exact_dataclass() -> None:
    registry = _registry()
    assert registry.kind_of(Small()) == "small" and registry.kind_of(Large(5)) == "large"
    with pytest.raises(TypeError, match="Larger is no registered thing config"):
        registry.kind_of(Larger())
    with pytest.raises(TypeError, match="int is no registered thing config"):
        registry.kind_of(3)


def test_build_calls_the_kinds_builder_with_the_config_and_the_rest() -> None:
    registry = _registry()
    assert registry.build(Small(4), 1, 2, flag=True) == ("small", 4, (1, 2), {"flag": True})
    assert registry.build(Large(7)) == ("large", 7)
    with pytest.raises(TypeError, match="no registered thing config"):
        registry.build(Larger())


def test_a_kind_is_registered_once_and_its_dataclass_names_it_alone() -> None:
    registry = _registry()
    with pytest.raises(ValueError, match="thing kind 'small' is registered twice"):
        registry.add("small", Larger, lambda cfg: cfg)
    with pytest.raises(ValueError, match="Small already configures another thing kind"):
        registry.add("tiny", Small, lambda cfg: cfg)
    assert registry.kinds() == ("small", "large")  # a refused kind is not added


def test_a_shared_config_registry_lets_kinds_share_their_dataclass() -> None:
    sources = Registry("source", shared_config=True)
    sources.add("a", Small, lambda cfg: "a")
    sources.add("b", Small, lambda cfg: "b")
    assert sources.kinds() == ("a", "b") and sources.shared_config
    assert sources.entry("b").builder(Small()) == "b"
    with pytest.raises(ValueError, match="registered twice"):
        sources.add("a", Large, lambda cfg: cfg)
