"""``preprocessing`` and ``postprocessing`` transforms: read a case with the core's reader, write
its result with the core's writer.

MONAI's ``LoadImaged`` + ``SaveImaged`` would resample or reorient through MetaTensor affines; the
core reads with SimpleITK and writes the mask back on exactly the input grid (size, spacing,
origin, direction), also for oblique, flipped or permuted volumes, DICOM series and 2D images. So
these transforms keep the core's objects: ``LoadCased`` puts the read ``Volume`` / ``Image2D``
(which holds the original image and its geometry) in place of the path, ``SaveResultd`` hands the
result to ``medreasoner.engine.write_result``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

logger = logging.getLogger("medreasoner.bundle")


class CaseFailure:
    """Stands in for the image, then the prediction, of a case that could not be used; the case is
    reported with status "error" and the other cases still run (as in the core's ``run_cases``)."""

    def __init__(self, message: str):
        self.message = str(message)

    def __repr__(self) -> str:
        return f"CaseFailure({self.message!r})"


class LoadCased(MapTransform):
    """Read ``data[key]`` (a path) with the medreasoner reader.

    Volumes (NIfTI, NRRD, MHA/MHD, DICOM folder) become a ``Volume``, 2D images an ``Image2D``
    (windowed with ``window``, as the core reads them). ``{key}_meta_dict`` gets the original path
    (``filename_or_obj``) and, for volumes, the grid the output will have.
    """

    def __init__(self, keys: KeysCollection = "image", window: Any = None, meta_key_postfix: str = "meta_dict",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.window = window
        self.meta_key_postfix = meta_key_postfix

    def _read(self, path: str):
        from medreasoner.engine import is_volume_input
        from medreasoner.engine.session import read_image
        from medreasoner.io.volumes import read_volume

        return read_volume(path) if is_volume_input(path) else read_image(path, self.window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medreasoner.errors import InputError

        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            if not isinstance(source, (str, Path)):
                continue  # already read (a Volume / Image2D handed in directly)
            meta: dict[str, Any] = {"filename_or_obj": str(source)}
            try:
                d[key] = self._read(str(source))
            except (InputError, ValueError, OSError) as exc:
                logger.error("%s: %s", source, exc)
                d[key] = CaseFailure(str(exc))
            image = getattr(d[key], "image", None)  # the SimpleITK image of a Volume
            if image is not None:
                meta.update(kind="volume", size=list(image.GetSize()), spacing=list(image.GetSpacing()),
                            origin=list(image.GetOrigin()), direction=list(image.GetDirection()))
            elif not isinstance(d[key], CaseFailure):
                meta.update(kind="image", size=[d[key].width, d[key].height])
            d[f"{key}_{self.meta_key_postfix}"] = meta
        return d


class SaveResultd(MapTransform):
    """Write ``data[key]`` (the inferer's result) into ``output_dir/<case>/`` through the core's
    writer, and put the case's summary (``CaseSummary``) in ``data["summary"]``.

    ``<case>`` is ``data["case"]`` (fixed when the case list was built) or, for data without it, the
    input's file name made unique within this transform's lifetime.
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir: str | Path = "eval", image_key: str = "image",
                 meta_key_postfix: str = "meta_dict", summary_key: str = "summary", allow_missing_keys: bool = False):
        from medreasoner.engine import StemAllocator

        from .inference import output_dir_option

        super().__init__(keys, allow_missing_keys)
        # built when the evaluator is, before SessionLoader loads the models: a bad folder costs no load
        self.output_dir = output_dir_option(output_dir)
        self.image_key, self.meta_key_postfix, self.summary_key = image_key, meta_key_postfix, summary_key
        self._stems = StemAllocator()

    def _source(self, d: Mapping) -> str | None:
        meta = d.get(f"{self.image_key}_{self.meta_key_postfix}") or {}
        path = meta.get("filename_or_obj") or getattr(d.get(self.image_key), "path", None)
        return None if path is None else str(path)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medreasoner.constants import Status
        from medreasoner.engine import CaseSummary, write_result
        from medreasoner.errors import InputError

        d = dict(data)
        for key in self.key_iterator(d):
            result, src, query = d[key], self._source(d), d.get("query") or ""
            case_dir = self.output_dir / (d.get("case") or self._stems.take(src))
            if isinstance(result, CaseFailure):
                summary = CaseSummary(src, query, Status.ERROR, result.message, str(case_dir))
            else:
                try:
                    outputs = write_result(result, case_dir, inputs=[src])
                except InputError as exc:
                    summary = CaseSummary(src, query, Status.ERROR, str(exc), str(case_dir))
                else:
                    summary = CaseSummary(src, result.query, result.status, result.message, str(case_dir), outputs,
                                          list(result.warnings))
            d[self.summary_key] = summary
        return d


def one_case(items: list) -> Any:
    """DataLoader ``collate_fn``: one case per iteration, not collated (a case holds a SimpleITK
    volume or an ``Image2D``, which torch cannot stack; volumes differ in size anyway)."""
    if len(items) != 1:
        raise ValueError(f"the bundle runs one case per iteration (batch_size 1), got {len(items)}")
    return items[0]
