"""A case's output folder as one unit: who wrote it, who may replace it, and replacing it atomically.

Every output folder ``OUT`` gets a work area ``OUT/.medreasoner/``: ``staging/`` holds sets being
written (complete before they move), ``locks/`` the case names live runs have claimed. A new set
replaces the old one with one atomic exchange of the two folders (Linux ``renameat2``); elsewhere
with two renames, undone by :func:`recover` if a kill falls between them. So after any
interruption ``OUT/<case>/`` holds the complete old set or the complete new set; what a killed run
leaves in the work area is removed by the next run into ``OUT``.

Ownership: a case folder is ours for input X when its ``result.json`` is a result record whose
``input.path`` is X. Anything else is the user's and is never replaced unless asked.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from medreasoner.errors import InputError

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


def swap_into_place(staging: Path, case_dir: Path) -> None:
    """Make the complete set in ``staging`` the case folder in one step; the old set is deleted after."""
    staging, case_dir = Path(staging), Path(case_dir)
    if not case_dir.exists():
        os.rename(staging, case_dir)  # atomic; refuses if another writer created it meanwhile
    elif _exchange(staging, case_dir):
        shutil.rmtree(staging)  # now holds the old set
    else:
        old = staging.with_suffix(".old")
        os.rename(case_dir, old)  # a kill here is undone by recover(): old goes back
        os.rename(staging, case_dir)
        shutil.rmtree(old)
    _tidy(staging.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths atomically; False where unsupported."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
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
    locks = work_area(root) / "locks"
    if locks.is_dir():
        for lock in locks.glob("*.lock"):
            if not _alive(_lock_pid(lock)):
                lock.unlink(missing_ok=True)
    _tidy(staging)


def claim(root: Path, stem: str, source: Any) -> Path | None:
    """Claim a case name for this process (a lock file); None if a live run holds it for another input."""
    locks = work_area(root) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = locks / f"{stem.lower()}.lock"
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
    empty (a hard link of a complete temporary file; link() fails if the name exists)."""
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
    while folder.name in ("staging", "locks", WORK_AREA):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
