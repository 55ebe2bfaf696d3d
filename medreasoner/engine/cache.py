"""Bounded, thread-safe caches the session keeps between questions (volumes, slices, embeddings)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Least-recently-used cache bounded by total bytes and by entry count."""

    def __init__(self, max_bytes: int, max_items: int | None = None, sizeof: Callable[[Any], int] | None = None):
        self.max_bytes, self.max_items = int(max_bytes), max_items
        self._sizeof = sizeof or (lambda v: int(getattr(v, "nbytes", 0)))
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self._sizeof(value)
        if size > self.max_bytes:
            return  # would evict everything else for one entry
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._items and (self._bytes > self.max_bytes
                                   or (self.max_items is not None and len(self._items) > self.max_items)):
                _, (_, s) = self._items.popitem(last=False)
                self._bytes -= s

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def array_digest(arr: np.ndarray) -> str:
    """Content digest of an array (shape and dtype included)."""
    a = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}|{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def file_key(path: str | os.PathLike) -> tuple:
    """Identity of a file or DICOM folder as it is now (path, size, modification time)."""
    p = Path(path).resolve()
    if p.is_dir():
        stats = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
        return ("dir", str(p), hash(tuple(stats)))
    st = p.stat()
    return ("file", str(p), st.st_size, st.st_mtime_ns)


def image_key(image: Any) -> tuple:
    """Identity of an in-memory SimpleITK image by its geometry and voxel content."""
    import SimpleITK as sitk

    return ("sitk", tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
            tuple(image.GetDirection()), array_digest(sitk.GetArrayViewFromImage(image)))
