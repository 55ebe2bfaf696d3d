"""The infer task: one free-text question about one image -> a label on the input's grid + the result record."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medreasoner.constants import SEGMENTATION_SUFFIXES, VOLUME_SUFFIXES
from medreasoner.engine import RunOptions, Session, check_query
from medreasoner.engine.session import PROMPTS
from medreasoner.engine.strategies import STRATEGIES
from medreasoner.errors import InputError
from medreasoner.imaging.display import AXES
from medreasoner.io.files import json_bytes

AUTO = ("", "auto", "none")
# sitk pixel type names by the dtype names clients send (the Slicer client sends "uint8")
DTYPES = {"uint8": "sitkUInt8", "int8": "sitkInt8", "uint16": "sitkUInt16", "int16": "sitkInt16",
          "uint32": "sitkUInt32", "int32": "sitkInt32", "uint64": "sitkUInt64", "int64": "sitkInt64",
          "float32": "sitkFloat32", "float": "sitkFloat32", "float64": "sitkFloat64", "double": "sitkFloat64"}
IMAGE_LABEL_SUFFIXES = (".png",)  # 2D inputs only, besides the volume label formats

logger = logging.getLogger(__name__)


def _first_first(values, default: str) -> list[str]:
    """A client-editable choice list with the core's default first (the Slicer client picks item 0)."""
    return [default] + [v for v in values if v != default]


def _scalar(value: Any) -> Any:
    # clients that echo the task config send the whole choice list; its first item is the choice
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _auto(value: Any) -> Any:
    value = _scalar(value)
    return None if value is None or str(value).strip().lower() in AUTO else value


def run_options(params: dict[str, Any]) -> RunOptions:
    """Request params (strings, as clients send them) as checked ``RunOptions``."""
    defaults = RunOptions()
    values: dict[str, Any] = {}
    for key in ("prompt", "strategy", "axis"):
        values[key] = str(_scalar(params.get(key)) or getattr(defaults, key)).strip().lower()
    values["window"] = _auto(params.get("window"))
    values["key_slice"] = _auto(params.get("key_slice"))
    raw_range = params.get("slice_range")  # a [start, stop] pair (JSON params) or "start:stop"
    values["slice_range"] = raw_range if isinstance(raw_range, (list, tuple)) else _auto(raw_range)
    values["key_point"] = _key_point(params.get("key_point"))
    n = _auto(params.get("n_candidates"))
    if n is not None:
        values["n_candidates"] = n  # checked() turns it into a whole number or refuses it
    keep = _auto(params.get("keep_largest"))
    if keep is not None:
        values["keep_largest"] = str(keep).strip().lower() not in ("0", "false", "no", "off")
    return RunOptions(**values).checked()


def _key_point(value: Any) -> Any:
    """A viewer's slice as an LPS point: "x,y,z" (form fields are strings) or a list of three numbers."""
    if isinstance(value, str):
        if value.strip().lower() in AUTO:
            return None
        return [p for p in value.replace(";", ",").split(",") if p.strip()]  # checked() parses the numbers
    return value


def label_format(params: dict[str, Any], image: str, is_2d: bool) -> tuple[str, str]:
    """(suffix, dtype) of the label file: ``result_extension`` / ``result_dtype``, else the input's own."""
    allowed = SEGMENTATION_SUFFIXES + (IMAGE_LABEL_SUFFIXES if is_2d else ())
    ext = str(_scalar(params.get("result_extension")) or "").strip().lower()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if not ext:
        ext = next((s for s in allowed if image.lower().endswith(s)), ".nii.gz")
    if ext not in allowed:
        raise InputError(f"unsupported result_extension {ext!r}; use one of {', '.join(allowed)}")
    dtype = str(_scalar(params.get("result_dtype")) or "uint8").strip().lower()
    if dtype not in DTYPES:
        raise InputError(f"unsupported result_dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if ext == ".png" and dtype not in ("uint8", "uint16"):
        raise InputError(f"a .png label must be uint8 or uint16, not {dtype}")
    return ext, dtype


def write_label(mask, ext: str, dtype: str, name: str) -> str:
    """Write a 0/1 SimpleITK mask to a new temporary file (MONAI Label deletes it after sending)."""
    import SimpleITK as sitk

    from medreasoner.io.segmentation import write_segmentation

    fd, path = tempfile.mkstemp(prefix="medreasoner-label-", suffix=ext)
    os.close(fd)
    if ext == ".seg.nrrd" or (dtype == "uint8" and ext != ".png"):
        write_segmentation(mask, path, name=name)  # .seg.nrrd: Slicer reads the segment name from it
        return path
    labels = sitk.Cast(sitk.NotEqual(mask, 0), getattr(sitk, DTYPES[dtype]))
    labels.CopyInformation(mask)
    sitk.WriteImage(labels, path, True)
    return path


def public_models(description: dict[str, Any]) -> dict[str, Any]:
    """A model description as clients see it: local weights by file or folder name, never the server's
    path (hub ids stay whole; the fingerprint still identifies the weights exactly)."""
    out = dict(description)
    for key in ("model", "checkpoint"):
        value = out.get(key)
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith((".", "~")) or os.path.exists(value)):
            out[key] = Path(value.rstrip("/\\")).name
    return out


class MedReasonerInfer(InferTask):
    """Free-text question -> CRM box + key points -> ASM mask, for 3D volumes and 2D images."""

    def __init__(self, session: Session):
        crm = public_models(session.models.crm.describe())
        tiny = " TINY TEST MODEL: answers have no medical meaning." if session.models.is_tiny else ""
        super().__init__(
            type=InferType.SEGMENTATION, labels=["target"], dimension=3,
            description=f"MedReasoner: type a clinical question in 'query'; CRM {crm.get('model', '?')} "
                        f"+ ASM {session.models.asm.describe().get('name', '?')}.{tiny}",
            config={
                # strings show as editable fields in the Slicer client, lists as drop-downs
                "query": "",
                "strategy": _first_first(STRATEGIES, RunOptions.strategy),
                "axis": _first_first(AXES, RunOptions.axis),
                "window": "auto",
                "key_slice": "auto",
                "prompt": _first_first(PROMPTS, RunOptions.prompt),
            },
        )
        self.session = session

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        params = {**self.config(), **request}  # the request overrides the task's defaults
        query = check_query(params.get("query"))  # text only: a list is not "its first item" here
        options = run_options(params)
        image = str(request["image"])
        shown_as = str(request.get("image_name") or Path(image).name)  # never a server path in answers
        t0 = time.perf_counter()
        logger.info("medreasoner: start %s %r", shown_as, query[:80])
        info = _image_information(image)
        is_volume_file = image.lower().endswith(VOLUME_SUFFIXES) or os.path.isdir(image)
        # single-slice volume files (what 3D Slicer uploads for a 2D image) are 2D images
        flat_file = is_volume_file and info is not None and _is_flat(info.GetSize())
        try:
            ext, dtype = label_format(params, image, not is_volume_file or flat_file)  # before any model work
            if flat_file:
                mask, record = self._ground_flat_file(image, info, query, options)
            elif is_volume_file:
                result = self.session.ground_volume(image, query, options)
                mask, record = result.mask, result.to_record()
            else:
                mask, record = self._ground_image(image, info, query, options)
        except InputError as exc:
            raise InputError(str(exc).replace(image, shown_as)) from exc
        if ext == ".seg.nrrd" and mask.GetDimension() == 2:
            mask = _as_single_slice(mask)
        label = write_label(mask, ext, dtype, query[:60])
        record["input"] = {**record.get("input", {}), "path": shown_as}
        for key in ("crm", "asm"):
            if isinstance(record.get(key), dict):
                record[key] = public_models(record[key])
        record["image"] = shown_as
        record["label_names"] = {query[:60]: 1}  # the Slicer client names the segment after this
        logger.info("medreasoner: done %s %r: %s in %.2f s, counts %s", shown_as, query[:80], record["status"],
                    time.perf_counter() - t0, record.get("counts"))
        return label, json.loads(json_bytes(record))

    def _ground_flat_file(self, image: str, info, query: str, options: RunOptions):
        """A 2D image stored in a volume format: grounded as 2D, answered on the same one-slice grid."""
        import SimpleITK as sitk

        pixels = sitk.GetArrayFromImage(sitk.ReadImage(image))
        result = self.session.ground_image(_squeeze_flat(pixels, info.GetNumberOfComponents()), query, options)
        mask = sitk.GetImageFromArray(result.mask.astype(np.uint8).reshape(pixels.shape[:info.GetDimension()]))
        _copy_geometry(mask, info)
        return mask, result.to_record()

    def _ground_image(self, image: str, info, query: str, options: RunOptions):
        """A 2D image file; the mask takes its geometry when SimpleITK can read it (DICOM spacing, ...)."""
        import SimpleITK as sitk

        result = self.session.ground_image(image, query, options)
        h, w = result.mask.shape
        arr = result.mask.astype(np.uint8)
        size = tuple(info.GetSize()) if info is not None else ()
        if size[:2] == (w, h) and all(n == 1 for n in size[2:]):
            mask = sitk.GetImageFromArray(arr.reshape((1,) * (len(size) - 2) + arr.shape))
            _copy_geometry(mask, info)
        else:
            mask = sitk.GetImageFromArray(arr)  # formats SimpleITK cannot read (.npy): plain pixel grid
        return mask, result.to_record()


def _image_information(path: str):
    import SimpleITK as sitk

    if os.path.isdir(path):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _is_flat(size) -> bool:
    """At most two axes longer than one voxel (a 2D image, possibly stored as one slice)."""
    return sum(int(s) > 1 for s in size) <= 2


def _squeeze_flat(pixels: np.ndarray, components: int) -> np.ndarray:
    spatial = pixels.shape[:pixels.ndim - (1 if components > 1 else 0)]
    keep = [n for n in spatial if n > 1]
    return pixels.reshape(tuple(keep) + ((components,) if components > 1 else ()))


def _copy_geometry(mask, info) -> None:
    mask.SetSpacing(info.GetSpacing())
    mask.SetOrigin(info.GetOrigin())
    mask.SetDirection(info.GetDirection())


def _as_single_slice(mask):
    """A 2D mask as a one-slice 3D image (``.seg.nrrd`` is 3D only); in-plane geometry kept."""
    import SimpleITK as sitk

    return sitk.JoinSeries(mask)
