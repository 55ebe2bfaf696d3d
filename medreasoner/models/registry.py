"""One registry for every pluggable part (ASMs, CRM backends), selected by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from medreasoner.errors import UnknownComponentError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            key = name.lower()
            if key in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[key] = factory
            doc = (factory.__doc__ or "").strip().splitlines()
            self._help[key] = help or (doc[0] if doc else "")
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._factories)

    def describe(self) -> dict[str, str]:
        return {n: self._help[n] for n in self.names()}

    def create(self, name: str, **kwargs: Any) -> T:
        factory = self._factories.get(str(name).lower())
        if factory is None:
            raise UnknownComponentError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return factory(**kwargs)

    def check(self, name: str) -> str:
        """The registered key for ``name``, or a clear error (used before any model loads)."""
        key = str(name).lower()
        if key not in self._factories:
            raise UnknownComponentError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return key


ASMS: Registry = Registry("ASM")
CRMS: Registry = Registry("CRM backend")
