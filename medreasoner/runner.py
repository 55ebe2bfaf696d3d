"""Run grounding cases (2D images and 3D volumes alike) into an output folder.

The one entry point the MONAI bundle, the MONAI Label app and scripts share: each case is
(image path, query); each gets ``out_dir/<stem>/`` with its mask(s), a JSON record and a picture.
A bad case is reported (status "error") and the others still run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.errors import InputError, MedReasonerError

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
EXIT_CODES = {"ok": 0, "no_target": 4, "error": 2}


def is_volume_path(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES)


def case_stem(path: str | Path) -> str:
    name = Path(path).name
    for suf in sorted(VOLUME_SUFFIXES + (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".npy"),
                      key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)] or "image"
    return name or "image"


def outputs_2d(image, result, query: str, paths: dict[str, Path]) -> dict[Path, bytes]:
    """The bytes of a 2D case's mask PNG, JSON record and overlay PNG (nothing written yet)."""
    from medreasoner.outputs import json_bytes, png_bytes
    from medreasoner.overlay import draw_overlay
    from medreasoner.pipeline import TINY_WARNING

    record = result.to_dict()
    record.update(input=image.path, intensity=image.intensity, input_metadata=image.metadata,
                  outputs={k: str(v) for k, v in paths.items()})
    banner = TINY_WARNING if TINY_WARNING in result.warnings else ""
    title = f"Q: {query}  [{result.status}]" + (f" - {result.message}" if result.message else "")
    overlay = draw_overlay(image.rgb, result.mask, result.answer.box, result.answer.points, title=title,
                           text=result.answer.think or result.completion, banner=banner)
    return {paths["mask"]: png_bytes(result.mask.astype(np.uint8) * 255), paths["result"]: json_bytes(record),
            paths["overlay"]: png_bytes(overlay)}


def run_case(image_path: str, query: str, out_dir: Path, *, crm, asm, prompt: str = "reasoning",
             strategy: str = "keyslice", axis: str = "axial", window=None, slice_range=None,
             key_slice: int | None = None, progress=None, cancel=None) -> dict[str, Any]:
    from medreasoner.outputs import guard_outputs, write_all

    out_dir = Path(out_dir)
    if is_volume_path(image_path):
        from medreasoner.volume_pipeline import VolumeGrounder, write_volume_outputs

        res = VolumeGrounder(crm, asm, prompt).run(image_path, query, strategy=strategy, axis=axis, window=window,
                                                   slice_range=slice_range, key_slice=key_slice,
                                                   progress=progress, cancel=cancel)
        outputs = write_volume_outputs(res, out_dir, stem="seg", inputs=[image_path])
        return {"status": res.status, "message": res.message, "outputs": outputs, "warnings": res.warnings}

    from medreasoner.images import load_image
    from medreasoner.intensity import parse_window
    from medreasoner.pipeline import GroundingPipeline

    image = load_image(image_path, window=None if window is None else parse_window(window))
    res = GroundingPipeline(crm, asm, prompt).run([image.rgb], [query], cancel=cancel)[0]
    paths = {"mask": out_dir / "mask.png", "result": out_dir / "result.json", "overlay": out_dir / "overlay.png"}
    guard_outputs(list(paths.values()), [Path(image_path)])
    write_all(outputs_2d(image, res, query, paths))
    return {"status": res.status, "message": res.message, "outputs": {k: str(v) for k, v in paths.items()},
            "warnings": res.warnings}


def run_cases(cases: list[tuple[str, str]], out_dir: str | Path, *, crm, asm, prompt: str = "reasoning",
              strategy: str = "keyslice", axis: str = "axial", window=None, slice_range=None,
              progress: bool = True, cancel=None) -> list[dict[str, Any]]:
    """Run every (image, query) case; returns one summary dict per case, in order."""
    from tqdm import tqdm

    out = Path(out_dir)
    stems: dict[str, int] = {}
    summaries = []
    for image, query in tqdm(cases, desc="cases", unit="case", disable=not progress or len(cases) < 2):
        stem = case_stem(image)
        k = stems.get(stem, 0)
        stems[stem] = k + 1
        case_dir = out / (stem if k == 0 else f"{stem}_{k}")
        summary: dict[str, Any] = {"image": str(image), "query": query, "output_dir": str(case_dir)}
        try:
            summary.update(run_case(str(image), query, case_dir, crm=crm, asm=asm, prompt=prompt, strategy=strategy,
                                    axis=axis, window=window, slice_range=slice_range, cancel=cancel))
        except (InputError, ValueError) as exc:
            log.error("%s: %s", image, exc)
            summary.update(status="error", message=str(exc), outputs={})
        except MedReasonerError:
            raise  # cancelled, or models failing: stop the whole run
        summaries.append(summary)
        log.info("%s: %s %s", image, summary["status"], summary.get("message", ""))
    return summaries


def exit_code(summaries: list[dict[str, Any]]) -> int:
    """0 all ok; 2 if any case had bad input; else 4 if any case found no target."""
    codes = {EXIT_CODES.get(s["status"], 2) for s in summaries}
    return 2 if 2 in codes else (4 if 4 in codes else 0)
