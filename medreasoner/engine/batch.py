"""Run many (input, question) cases through one session into one output folder.

The CLI and the MONAI bundle both call :func:`run_cases`; the layout is the writer's. 2D cases are
batched through the CRM; a case whose input cannot be used is reported (status "error") and the
others still run; cancelling or a model failure stops the whole run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medreasoner.constants import Status, exit_code_for
from medreasoner.engine.events import NO_EVENTS, Events, Stage
from medreasoner.engine.output_sets import check_output_root, check_replaceable
from medreasoner.engine.session import RunOptions, Session, check_query, is_volume_input
from medreasoner.engine.writer import StemAllocator, write_result
from medreasoner.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Case:
    source: Any  # a path, or an already-read Image2D / Volume (its .path names the case)
    query: str


@dataclass
class CaseSummary:
    input: str | None
    query: str
    status: str
    message: str = ""
    output_dir: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _source_path(source: Any) -> str | None:
    path = getattr(source, "path", source)
    return str(path) if isinstance(path, (str, Path)) else None


def _is_volume(source: Any) -> bool:
    from medreasoner.io.volumes import Volume

    return isinstance(source, Volume) or is_volume_input(source)


def run_cases(session: Session, cases: Sequence[Case], out_dir: str | Path, options: RunOptions | None = None,
              events: Events | None = None, overwrite: bool = False) -> list[CaseSummary]:
    """Ground and write every case; one summary per case, in order.

    Before any model runs: the output folder must not lie in an input folder, and no case folder may
    be one this tool did not write for that input (unless ``overwrite``)."""
    options = (options or RunOptions()).checked()
    events = events or NO_EVENTS
    out = Path(out_dir)
    stems, dirs = _claim_case_dirs(cases, out, overwrite)
    try:
        return _run(session, cases, out, dirs, options, events, overwrite)
    finally:
        stems.release()


def check_case_dirs(cases: Sequence[Case], out_dir: str | Path, overwrite: bool = False) -> None:
    """What :func:`run_cases` refuses about the output folders, checked before any model loads (the CLI)."""
    out = Path(out_dir)
    if not out.exists():  # nothing there to clobber; and a refused run must not leave a folder behind
        check_output_root(out, [Path(p) for p in map(_source_path, (c.source for c in cases)) if p and Path(p).is_dir()])
        return
    stems, _ = _claim_case_dirs(cases, out, overwrite)
    stems.release()


def _claim_case_dirs(cases: Sequence[Case], out: Path, overwrite: bool) -> tuple[StemAllocator, list[Path]]:
    check_output_root(out, [Path(p) for p in map(_source_path, (c.source for c in cases)) if p and Path(p).is_dir()])
    stems = StemAllocator(root=out)  # names no other input's results and no other live run holds
    try:
        dirs = [out / stems.take(c.source) for c in cases]
        for case, case_dir in zip(cases, dirs):
            src = _source_path(case.source)
            check_replaceable(case_dir, src, [Path(src)] if src else [], overwrite)
    except BaseException:
        stems.release()
        raise
    return stems, dirs


def _run(session: Session, cases: Sequence[Case], out: Path, dirs: list[Path], options: RunOptions,
         events: Events, overwrite: bool) -> list[CaseSummary]:
    summaries: list[CaseSummary | None] = [None] * len(cases)
    batch = max(1, int(getattr(session.models.crm, "batch_size", 4)))
    done = 0

    def finish(i: int, summary: CaseSummary) -> None:
        nonlocal done
        summaries[i] = summary
        done += 1
        events.progress(Stage.CASES, done, len(cases))
        (log.info if summary.status == Status.OK else log.warning)(
            "%s: %s %s", summary.input, summary.status, summary.message)

    def error(i: int, exc: Exception) -> CaseSummary:
        src = _source_path(cases[i].source)
        message = str(exc)
        if src and message.startswith(f"{src}: "):  # the summary names the input already
            message = message[len(src) + 2:]
        return CaseSummary(src, cases[i].query, Status.ERROR, message, str(dirs[i]))

    def write(i: int, result) -> None:
        src = _source_path(cases[i].source)
        try:
            outputs = write_result(result, dirs[i], inputs=[src], overwrite=overwrite)
        except InputError as exc:
            finish(i, error(i, exc))
            return
        finish(i, CaseSummary(src, result.query, result.status, result.message, str(dirs[i]), outputs,
                              list(result.warnings)))

    pending_2d: list[tuple[int, Any]] = []

    def flush_2d() -> None:
        if not pending_2d:
            return
        idx, images = [i for i, _ in pending_2d], [im for _, im in pending_2d]
        pending_2d.clear()
        try:
            results = session.ground_images(images, [cases[i].query for i in idx], options, events)
        except (InputError, ValueError) as exc:
            for i in idx:
                finish(i, error(i, exc))
            return
        for i, res in zip(idx, results):
            write(i, res)

    for i, case in enumerate(cases):
        events.check_cancelled("cases")
        try:
            if _is_volume(case.source):
                flush_2d()
                write(i, session.ground_volume(case.source, case.query, options, events))
            else:
                image = session.read_image(case.source, options.window)
                check_query(case.query)
                pending_2d.append((i, image))
                if len(pending_2d) >= batch:
                    flush_2d()
        except (InputError, ValueError) as exc:
            finish(i, error(i, exc))  # logged there, once
    flush_2d()
    return [s for s in summaries if s is not None]


def exit_code(summaries: Sequence[CaseSummary]) -> int:
    """0 all ok; 2 if any case had bad input; else 4 if any case found no target."""
    return exit_code_for(s.status for s in summaries)
