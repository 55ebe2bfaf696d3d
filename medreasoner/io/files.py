"""Write results atomically, next to nothing the user gave us as input."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.errors import InputError


def atomic_write_with(path: Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Let ``write(tmp_path)`` fill a temporary file in the same folder, then rename it over ``path``:
    readers never see half a file, and a failed write leaves nothing behind. ``suffix`` lets writers
    that choose a format by extension (SimpleITK) see the real one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def png_bytes(image) -> bytes:
    import io

    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n").encode()


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def guard_outputs(outputs: list[Path], inputs: list[Path]) -> None:
    """Refuse to write any output over an input file."""
    ins = {p.resolve() for p in inputs}
    for o in outputs:
        if o.resolve() in ins:
            raise InputError(f"refusing to overwrite the input file {o}; choose another --out folder")


def write_all(files: dict[Path, bytes]) -> None:
    """Write several files; all bytes are prepared before the first write, each write is atomic."""
    for path, data in files.items():
        atomic_write_bytes(path, data)
