"""Write results atomically, next to nothing the user gave us as input; check input paths before reading."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from medreasoner.errors import InputError


def anonymous_file(folder: str | os.PathLike) -> int | None:
    """A file with no name yet in ``folder`` (Linux ``O_TMPFILE``): it takes a name only when published
    with :func:`link_file`, and a kill before that leaves nothing on disk. None where unsupported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        return os.open(folder, flag | os.O_RDWR, 0o666)  # the umask decides, as for any new file
    except OSError:  # a file system or kernel without O_TMPFILE
        return None


def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def link_file(fd: int, path: str | os.PathLike) -> None:
    """Give the anonymous file ``fd`` the name ``path`` in one step; FileExistsError if the name is taken."""
    libc = system_libc()
    if libc is None:
        raise OSError(errno.ENOSYS, "linkat is not available", str(path))
    at_fdcwd, at_empty_path = -100, 0x1000
    if libc.linkat(fd, b"", at_fdcwd, os.fsencode(str(path)), at_empty_path) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EPERM, errno.ENOENT, errno.EINVAL):
        raise _os_error(err, path)
    link_file_via_proc(fd, path)  # AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH: an ordinary user goes here


def link_file_via_proc(fd: int, path: str | os.PathLike) -> None:
    """``link_file`` for an ordinary user: linkat of ``/proc/self/fd/N`` with AT_SYMLINK_FOLLOW (what
    Python's os.link does not do: it hard-links the /proc symlink itself and fails with EXDEV)."""
    libc = system_libc()
    at_fdcwd, at_symlink_follow = -100, 0x400
    if libc.linkat(at_fdcwd, os.fsencode(f"/proc/self/fd/{fd}"), at_fdcwd, os.fsencode(str(path)),
                   at_symlink_follow) != 0:
        raise _os_error(ctypes.get_errno(), path)


def _os_error(err: int, path: Any) -> OSError:
    if err == errno.EEXIST:
        return FileExistsError(err, os.strerror(err), str(path))
    return OSError(err, os.strerror(err), str(path))


_SYSTEM_LIBC: list = []


def system_libc():
    """The C library (for linkat/renameat2, which Python does not wrap), or None off Linux."""
    if not _SYSTEM_LIBC:
        try:
            _SYSTEM_LIBC.append(ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None)
        except OSError:
            _SYSTEM_LIBC.append(None)
    return _SYSTEM_LIBC[0]


def publish(fd: int, path: Path) -> None:
    """Name the complete anonymous file ``fd`` ``path``, replacing any file there atomically. A name
    that exists only for the two calls of a replacement is the only trace a kill can leave."""
    try:
        link_file(fd, path)
        return
    except FileExistsError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    link_file(fd, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_with(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Let ``write(file)`` fill a new file, then give it the name ``path`` (replacing the old one):
    readers never see half a file, and a failed or killed write leaves nothing behind (the file has no
    name until it is complete, where the system allows; elsewhere a temporary ``.NAME.*.tmp`` beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = anonymous_file(path.parent)
    if fd is not None:
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                write(f)
            os.fsync(fd)
            publish(fd, path)
            return path
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
        finally:
            os.close(fd)
    tmp_fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: outputs get the mode any new file would
        with os.fdopen(tmp_fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda f: f.write(data))


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
    shown = _shown(p)
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise InputError(f"{what} path is too long for this file system: {shown}") from exc
        if exc.errno == errno.ELOOP:
            raise InputError(f"{what} {shown} is a symlink loop (links that point back to each other); "
                             "fix the link or give the real file") from exc
        if p.is_symlink():
            raise InputError(f"{what} not found: {shown} is a symlink to {os.readlink(p)}, which does not exist") \
                from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise InputError(f"cannot open {what} {shown}: permission denied") from exc
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"{what} not found: {shown}") from exc
        raise InputError(f"cannot open {what} {shown}: {exc.strerror or exc}") from exc
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InputError(f"{what} {shown} is not a regular file (it is a {_file_kind(st.st_mode)}); "
                         "give a file saved on disk")
    return st


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int,
                   error: type[Exception] = InputError) -> str:
    """A small UTF-8 text file a user named (a question, a template): checked like any input path
    (a FIFO would block forever), at most ``max_bytes``, no NUL bytes; a leading BOM dropped and
    Windows line ends read as ``\n``. ``error`` (InputError unless the caller's failure is another
    kind, a checkpoint's file say) naming the problem otherwise."""
    p = Path(path).expanduser()
    try:
        st = check_input_path(p, what)
    except InputError as exc:
        raise error(str(exc)) from exc
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {p} is a folder; give the file")
    if st.st_size > max_bytes:
        raise error(f"{what} {p} is {st.st_size} bytes; at most {max_bytes} are accepted")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from exc
    if b"\x00" in data:
        raise error(f"{what} {p} is binary (it holds NUL bytes), not a text file")
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc


def _shown(path: Path, n: int = 160) -> str:
    """A path as messages show it: a 20 MB path would make the one-line message unreadable."""
    text = str(path)
    return text if len(text) <= n else f"{text[:n // 2]}...{text[-n // 4:]} ({len(text)} characters)"


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
