"""Write results atomically, next to nothing the user gave us as input; check input paths before reading."""

from __future__ import annotations

import errno
import json
import os
import stat
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


# ------------------------------------------------------------------------------------------ input paths


def check_input_path(path: str | os.PathLike, what: str) -> os.stat_result:
    """``os.stat`` of an input path (links followed), or an InputError naming the real problem.

    Only folders and regular files pass: ``Path.exists()`` says False for a symlink loop (reported as
    "not found") and a FIFO/device stats as 0 bytes (reported as "empty"), and opening a FIFO would
    block. ``what`` starts the message: "volume", "image file".
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{what} {p} is a symlink loop (links that point back to each other); "
                             "fix the link or give the real file") from exc
        if p.is_symlink():
            raise InputError(f"{what} not found: {p} is a symlink to {os.readlink(p)}, which does not exist") \
                from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise InputError(f"cannot open {what} {p}: permission denied") from exc
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"{what} not found: {p}") from exc
        raise InputError(f"cannot open {what} {p}: {exc.strerror or exc}") from exc
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InputError(f"{what} {p} is not a regular file (it is a {_file_kind(st.st_mode)}); "
                         "give a file saved on disk")
    return st


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


DICOM_FILE_SUFFIXES = (".dcm", ".dicom", ".ima")


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """A DICOM file name (.dcm/.dicom/.ima) or the "DICM" marker after the 128-byte preamble."""
    p = Path(path)
    if p.name.lower().endswith(DICOM_FILE_SUFFIXES):
        return True
    try:
        with p.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"
