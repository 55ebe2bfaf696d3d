"""Short, reproducible fingerprints of model weights, recorded in every result sidecar."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

SMALL_FILE = 1 << 20  # files below 1 MiB (configs, tokenizers) are hashed whole


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=32)
def model_fingerprint(path: str) -> str | None:
    """sha256 of a weights file; for a checkpoint folder, sha256 over its small files' contents and
    its large files' names and sizes (hashing 15 GB of shards on every load would take minutes).
    None when ``path`` is not local (a hub id that was never downloaded)."""
    if not str(path or "").strip():
        return None  # no weights named (a test double, a built-in model): never the current folder
    p = Path(path).expanduser()
    if p.is_file():
        return "sha256:" + file_sha256(p)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix()
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size < SMALL_FILE:
            h.update(f.read_bytes())
    return "folder-sha256:" + h.hexdigest()
