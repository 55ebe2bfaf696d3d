"""One registry for every pluggable part (ASMs, CRM backends), selected by name.

Your own parts live in plugin modules that register themselves on import (``@CRMS.register("mine")``);
:func:`load_plugins` imports them by dotted name or file path, so a separate process (the MONAI
Label server, a worker) can select them by name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

from medreasoner.errors import InputError, UnknownComponentError

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


_plugins_lock = threading.Lock()
_plugin_files: dict[Path, ModuleType] = {}


def plugin_specs(spec: str | Sequence[str] | None) -> list[str]:
    """``"a, b.py"`` or ``["a", "b.py"]`` as a clean list (commas split inside items too)."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def load_plugins(spec: str | Sequence[str] | None) -> list[ModuleType]:
    """Import plugin modules (dotted names or ``.py`` paths) that register CRM backends or ASMs.

    Importing the same module or file again returns the module already loaded (registering twice
    would fail). Anything that cannot be imported raises ``InputError`` naming the plugin.
    """
    with _plugins_lock:  # two threads importing one file would register its parts twice
        return [_load_plugin(item) for item in plugin_specs(spec)]


def _load_plugin(item: str) -> ModuleType:
    is_file = item.endswith(".py") or "/" in item or "\\" in item
    try:
        return _load_plugin_file(Path(item)) if is_file else importlib.import_module(item)
    except InputError:
        raise
    except Exception as exc:  # a plugin may fail in any way; the caller needs one clear line
        raise InputError(f"could not import plugin {item!r}: {type(exc).__name__}: {exc}") from exc


def _load_plugin_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise InputError(f"plugin file not found: {path}")
    path = path.resolve()
    if path in _plugin_files:
        return _plugin_files[path]
    # a file already imported under its own name (e.g. a test's conftest importing it) is reused
    name = path.stem
    known = sys.modules.get(name)
    if known is not None and getattr(known, "__file__", None) and Path(known.__file__).resolve() == path:
        _plugin_files[path] = known
        return known
    if not name.isidentifier() or known is not None:
        name = f"medreasoner_plugin_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"could not import plugin {str(path)!r}: not a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _plugin_files[path] = module
    return module
