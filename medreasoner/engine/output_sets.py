"""A case's output folder as one unit: who wrote it, who may replace it, and replacing it atomically.

A new set is encoded in memory, written to files that have no name yet (Linux ``O_TMPFILE``) and
only then, in a few system calls, named inside a staging folder of the output folder's work area
``OUT/.medreasoner/staging/`` and swapped with the old set by one atomic exchange of the two folders
(``renameat2``); elsewhere the staging folder is filled with named files and the swap is two renames,
undone by :func:`recover` if a kill falls between them. So after any interruption ``OUT/<case>/``
holds the complete old set or the complete new set, and nothing else is left in ``OUT`` unless the
kill fell inside those few calls (the next run into ``OUT`` removes it).

Live runs claim case names with lock files in a per-user folder outside ``OUT`` (see
:func:`lock_dir`), so a killed run leaves no lock in the user's folder either.

Ownership: a case folder is ours for input X when its ``result.json`` is a result record whose
``input.path`` is X. Anything else is the user's and is never replaced unless asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any

from medreasoner.errors import InputError
from medreasoner.io.files import anonymous_file, link_file, system_libc, write_fd

WORK_AREA = ".medreasoner"
MARKER = "result.json"
NOT_OURS = "<not ours>"  # owner() of a folder this tool did not write


def work_area(root: Path) -> Path:
    return Path(root) / WORK_AREA


def owner(case_dir: Path) -> str | None:
    """The input a case folder holds our results for; None if there is no folder; NOT_OURS otherwise."""
    case_dir = Path(case_dir)
    if not case_dir.exists():
        return None
    try:
        record = json.loads((case_dir / MARKER).read_text())
        path = record["input"]["path"]
        record["schema_version"]  # noqa: B018 - a result record, not any result.json
    except (OSError, ValueError, KeyError, TypeError):
        return NOT_OURS
    return str(path) if path is not None else NOT_OURS


def same_input(recorded: Any, source: Any) -> bool:
    if recorded in (None, NOT_OURS) or source is None:
        return False
    try:
        return Path(str(recorded)).resolve() == Path(str(source)).resolve()
    except OSError:
        return str(recorded) == str(source)


def check_replaceable(case_dir: Path, source: Any, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to replace a folder holding an input, or one this tool did not write for ``source``."""
    case_dir = Path(case_dir)
    if case_dir.is_symlink():  # replacing it would swap the link, and deleting "the old set" would follow it
        raise InputError(f"refusing to replace {case_dir}: it is a symbolic link (to {os.readlink(case_dir)}), "
                         "not a folder this tool wrote; remove the link or choose another --out folder")
    resolved = case_dir.resolve()
    for p in inputs:
        rp = Path(p).resolve()
        if rp == resolved or resolved in rp.parents:
            raise InputError(f"refusing to overwrite the input {p} (it lies in the case folder {case_dir}); "
                             "choose another --out folder")
    if overwrite:
        return
    who = owner(case_dir)
    if who is None or (source is not None and same_input(who, source)) or (source is None and who != NOT_OURS):
        return
    if who == NOT_OURS:
        raise InputError(f"refusing to replace {case_dir}: this tool did not write it; choose another --out "
                         "folder, or pass --overwrite")
    raise InputError(f"refusing to replace {case_dir}: it holds the results for another input ({who}); choose "
                     "another --out folder, or pass --overwrite")


def check_output_root(out: Path, input_dirs: list[Path]) -> None:
    """Refuse an output folder that is, or lies inside, a folder given as input (a dataset, a series)."""
    out = Path(out).resolve()
    for d in input_dirs:
        rd = Path(d).resolve()
        if out == rd or rd in out.parents:
            raise InputError(f"the output folder {out} is inside the input folder {d}: its files could be "
                             "overwritten; choose an --out folder outside it")


def staging_dir(case_dir: Path) -> Path:
    """A new, empty folder in the work area of ``case_dir``'s output folder (same file system)."""
    case_dir = Path(case_dir)
    staging = work_area(case_dir.parent) / "staging" / f"{case_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new"
    staging.mkdir(parents=True)
    return staging


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _tidy(Path(path).parent)


def commit(case_dir: Path, files: dict[str, bytes]) -> None:
    """Make ``files`` ({name: bytes}) the complete content of ``case_dir`` in one step.

    Every file is written before any name appears: a kill during the writing leaves nothing."""
    case_dir = Path(case_dir)
    case_dir.parent.mkdir(parents=True, exist_ok=True)
    fds: dict[str, int] = {}
    try:
        for name, data in files.items():
            fd = anonymous_file(case_dir.parent)
            if fd is None:
                break
            fds[name] = fd
            write_fd(fd, data)
        staging = staging_dir(case_dir)
        try:
            for name, data in files.items():
                if name in fds:
                    link_file(fds[name], staging / name)
                else:  # no anonymous files here: named ones, still inside the staging folder
                    (staging / name).write_bytes(data)
            swap_into_place(staging, case_dir)
        except BaseException:
            discard(staging)
            raise
    finally:
        for fd in fds.values():
            os.close(fd)


def swap_into_place(staging: Path, case_dir: Path) -> None:
    """Make the complete set in ``staging`` the case folder in one step; the old set is deleted after."""
    staging, case_dir = Path(staging), Path(case_dir)
    held: list[int] = []
    try:
        if not case_dir.exists():
            os.rename(staging, case_dir)  # atomic; refuses if another writer created it meanwhile
        elif _exchange(staging, case_dir):
            held = _unlink_all(staging)  # now holds the old set
        else:
            old = staging.with_suffix(".old")
            os.rename(case_dir, old)  # a kill here is undone by recover(): old goes back
            os.rename(staging, case_dir)
            held = _unlink_all(old)
        _tidy(staging.parent)
    finally:
        for fd in held:  # the old files' blocks are freed here, after their names are gone
            os.close(fd)


def _unlink_all(folder: Path) -> list[int]:
    """Remove ``folder`` and its files, keeping each file open: unlinking an open file only drops its
    name, so the names go in microseconds and the slow part (freeing the data) waits for the close."""
    held = []
    if os.path.islink(folder):  # never follow a link into someone else's folder
        os.unlink(folder)
        return held
    try:
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    held.append(os.open(entry.path, os.O_RDONLY))
                os.unlink(entry.path)
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
        os.rmdir(folder)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
    return held


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths atomically; False where unsupported."""
    libc = system_libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def recover(root: Path) -> None:
    """Undo what killed runs left in ``root``'s work area: half-written sets go, a set moved aside comes back."""
    staging = work_area(root) / "staging"
    if staging.is_dir():
        for entry in staging.iterdir():
            name, _, rest = entry.name.partition(".")
            pid = rest.split(".")[0] if rest else ""
            if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
                continue  # another live run is writing it
            original = Path(root) / name
            if entry.suffix == ".old" and not original.exists():
                os.rename(entry, original)  # killed between the two renames: the old set returns
            else:
                shutil.rmtree(entry, ignore_errors=True)
    for locks in (lock_dir(root, create=False), work_area(root) / "locks"):  # the second: older versions'
        if locks is not None and locks.is_dir():
            for lock in locks.glob("*.lock"):
                if not _alive(_lock_pid(lock)):
                    lock.unlink(missing_ok=True)
            _tidy(locks)  # only the work area's folders go: the private lock folder stays for other runs
    _tidy(staging)


def lock_dir(root: Path, create: bool = True) -> Path | None:
    """Where live runs claim case names of the output folder ``root``: a folder private to this user,
    outside ``root`` (``$XDG_RUNTIME_DIR`` or the system's temporary folder), one per output folder.
    Claims name process ids, which only mean something on this machine, so a local folder is enough."""
    key = hashlib.sha256(os.fsencode(str(Path(root).resolve()))).hexdigest()[:20]
    for base in _lock_bases():
        folder = base / key
        if not create:
            if folder.is_dir():
                return folder
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            continue
        if _private(base) and _private(folder):
            return folder
    return None if not create else _fallback_lock_dir(root)


def _lock_bases() -> list[Path]:
    bases = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        bases.append(Path(runtime) / "medreasoner" / "locks")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    bases.append(Path(tempfile.gettempdir()) / f"medreasoner-{uid}" / "locks")
    return bases


def _private(folder: Path) -> bool:
    """A real folder of this user that nobody else may write (a shared /tmp is open to others)."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        return False
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def _fallback_lock_dir(root: Path) -> Path:
    folder = work_area(root) / "locks"  # no private local folder: the locks live with the outputs
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def claim(root: Path, stem: str, source: Any) -> Path | None:
    """Claim a case name for this process (a lock file); None if a live run holds it for another input."""
    lock = lock_dir(root) / f"{stem.lower()}.lock"
    body = json.dumps({"pid": os.getpid(), "input": None if source is None else str(source)})
    for _ in range(2):
        if _create_exclusive(lock, body):
            return lock
        held = _lock_body(lock)
        if held.get("pid") == os.getpid():
            return lock
        if _alive(held.get("pid")):
            # another live run: the same input may share the name (it writes the same set), else not
            return lock if source is not None and same_input(held.get("input"), source) else None
        lock.unlink(missing_ok=True)  # its run died: take the name over
    return None


def _create_exclusive(path: Path, body: str) -> bool:
    """Create ``path`` holding ``body`` only if it does not exist, in one step: a reader never sees it
    empty (a complete file gets the name with link(), which fails if the name exists)."""
    fd = anonymous_file(path.parent)
    if fd is not None:
        try:
            write_fd(fd, body.encode())
            link_file(fd, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.close(fd)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
    tmp.write_text(body)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def release(lock: Path) -> None:
    if _lock_body(lock).get("pid") == os.getpid():
        Path(lock).unlink(missing_ok=True)
        _tidy(Path(lock).parent)


def _lock_body(lock: Path) -> dict:
    try:
        return json.loads(Path(lock).read_text())
    except (OSError, ValueError):
        return {}


def _lock_pid(lock: Path) -> int | None:
    pid = _lock_body(lock).get("pid")
    return pid if isinstance(pid, int) else None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tidy(folder: Path) -> None:
    """Remove empty work-area folders, up to and including ``.medreasoner`` itself."""
    folder = Path(folder)
    while folder.name in ("staging", "locks", WORK_AREA) and WORK_AREA in folder.parts:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
