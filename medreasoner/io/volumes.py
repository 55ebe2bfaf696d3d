"""Read 3D volumes (NIfTI, NRRD, MHA/MHD, DICOM series) exactly as stored, with clear errors.

Geometry rule: a volume is kept exactly as read (size, spacing, origin, direction untouched); what
was learnt while reading (modality, non-finite voxels, the DICOM series chosen) travels with it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medreasoner.constants import VOLUME_SUFFIXES as VOLUME_FILE_SUFFIXES
from medreasoner.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK

log = logging.getLogger(__name__)



# SimpleITK pixel ids sitkInt8 .. sitkUInt64 (scalar integers); 8, 9 are float32/64.
_INTEGER_PIXELS = (0, 1, 2, 3, 4, 5, 6, 7)

# Voxel counts above which statistics are taken on a strided subsample / in slabs.
_SAMPLE_VOXELS = 4_000_000
_SLAB_VOXELS = 8_000_000




@dataclass
class Volume:
    """A scalar 3D image exactly as read from disk, plus what we learnt while reading it."""

    image: SimpleITK.Image
    path: str | None = None
    modality: str = ""
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """SimpleITK size (x, y, z); the numpy array is (z, y, x)."""
        size = self.image.GetSize()
        return int(size[0]), int(size[1]), int(size[2])

    @property
    def nbytes(self) -> int:
        img = self.image
        return int(img.GetNumberOfPixels() * img.GetSizeOfPixelComponent()
                   * img.GetNumberOfComponentsPerPixel())

    @property
    def array(self) -> np.ndarray:
        """Read-only (z, y, x) view of the voxels; valid while ``image`` is alive and unmodified."""
        import SimpleITK as sitk

        return sitk.GetArrayViewFromImage(self.image)


# --------------------------------------------------------------------------------------------- reading


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D volume file (NIfTI, NRRD, MHA/MHD, ...) or a folder holding a DICOM series."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"volume not found: {p}")
    if p.is_dir():
        image, modality, meta = _read_dicom_folder(p)
    else:
        image, modality, meta = _read_file(p)
    return volume_from_image(image, path=str(p), modality=modality, metadata=meta)


def volume_from_image(image: SimpleITK.Image, path: str | None = None, modality: str | None = None,
                      metadata: dict[str, Any] | None = None) -> Volume:
    """Validate an in-memory SimpleITK image as a volume (the checks ``read_volume`` applies)."""
    import SimpleITK as sitk

    where = path or "volume"
    if not isinstance(image, sitk.Image):
        raise InputError(f"{where}: expected a SimpleITK image, got {type(image).__name__}")
    image = _as_3d(image, where)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{where} has {image.GetNumberOfComponentsPerPixel()} values per voxel (vector/RGB pixels); "
            "give a scalar (grey-level) volume"
        )
    if image.GetPixelID() not in _INTEGER_PIXELS + (sitk.sitkFloat32, sitk.sitkFloat64):
        raise InputError(f"{where}: pixel type {image.GetPixelIDTypeAsString()} is not supported")
    if 0 in image.GetSize():
        raise InputError(f"{where}: volume is empty (size {tuple(image.GetSize())})")
    lo, hi, n_bad = _finite_stats(sitk.GetArrayViewFromImage(image))
    if lo is None or hi is None or hi <= lo:
        what = "has no finite voxels" if lo is None else f"every voxel is {lo:g}"
        raise InputError(f"{where}: volume is empty/constant ({what}); nothing to segment")
    warnings: list[str] = []
    if n_bad:
        warnings.append(
            f"{n_bad} voxel(s) are NaN or infinite; they are shown as the window minimum"
        )
        log.warning("%s: %s", where, warnings[-1])
    if not modality:
        modality = _guess_modality(image, lo)
    return Volume(image=image, path=path, modality=modality, warnings=warnings, metadata=dict(metadata or {}))


def _as_3d(image: SimpleITK.Image, where: str) -> SimpleITK.Image:
    import SimpleITK as sitk

    size = tuple(int(s) for s in image.GetSize())
    dim = image.GetDimension()
    if dim == 4:
        if size[3] != 1:
            raise InputError(
                f"{where} is 4D with shape {size} (x, y, z, t); only 3D volumes are supported "
                "(a 4th dimension of size 1 is accepted). Extract one volume first."
            )
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
        size = size[:3]
    elif dim != 3:
        if dim == 2:
            raise InputError(f"{where} is a 2D image; use `medreasoner ground` for 2D images")
        raise InputError(f"{where} has {dim} dimensions {size}; only 3D volumes are supported")
    if 0 not in size and 1 in size:
        raise InputError(
            f"{where} is a 2D image (a single slice, size {size}); use `medreasoner ground` for 2D images"
        )
    return image


def _read_file(p: Path) -> tuple[SimpleITK.Image, str, dict[str, Any]]:
    import SimpleITK as sitk

    if p.stat().st_size == 0:
        raise InputError(f"volume file is empty (0 bytes): {p}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    hint = f"supported: {', '.join(VOLUME_FILE_SUFFIXES)} files or a DICOM series folder"
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read {p} as a volume: not a recognised or intact image file ({hint})") \
            from exc
    # Check the shape before loading the voxels: a large 4D file is refused without reading it.
    dim, size = reader.GetDimension(), tuple(int(s) for s in reader.GetSize())
    if dim == 2 or (dim >= 3 and 1 in size[:3] and 0 not in size):
        hint = ""
        if reader.HasMetaDataKey("0008|0060") or p.suffix.lower() in (".dcm", ".dicom", ".ima"):
            hint = " (for a DICOM series, give the folder that holds its files)"
        raise InputError(f"{p} is a 2D image; use `medreasoner ground` for 2D images{hint}")
    if dim > 4 or (dim == 4 and size[3] != 1):
        raise InputError(
            f"{p} is {dim}D with shape {size}; only 3D volumes are supported "
            "(a 4th dimension of size 1 is accepted). Extract one volume first."
        )
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{p} has {reader.GetNumberOfComponents()} values per voxel (vector/RGB pixels); "
            "give a scalar (grey-level) volume"
        )
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read {p}: the file is damaged or truncated ({_first_line(exc)})") from exc
    if p.name.lower().endswith((".nii", ".nii.gz")):
        image = _check_nifti_data(p, image)
    modality = ""
    if image.HasMetaDataKey("0008|0060"):  # a single (multi-frame) DICOM file
        modality = image.GetMetaData("0008|0060").strip().upper()
    return image, modality, {"format": _format_name(p, image)}


def _check_nifti_data(p: Path, image: SimpleITK.Image) -> SimpleITK.Image:
    """Catch what ITK's NIfTI reader lets through: truncated voxel data (read as zeros without an error)
    and NaN/inf voxels (silently set to 0). Non-finite voxels are put back so they are reported."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        proxy = nib.load(str(p)).dataobj  # (image.header has vox_offset reset to 0; the proxy has it)
        dtype = np.dtype(proxy.dtype)
        offset = int(proxy.offset)
        expected = offset + int(np.prod(proxy.shape, dtype=np.int64)) * dtype.itemsize
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds; ITK may accept a cut-off header
        raise InputError(f"cannot read {p}: the NIfTI header is damaged or truncated ({exc})") from exc
    gz = p.name.lower().endswith(".gz")
    floating = dtype.kind == "f"
    if not floating:
        if not gz:
            got = p.stat().st_size
        else:
            with p.open("rb") as f:  # gzip trailer: uncompressed size mod 2**32
                f.seek(-4, os.SEEK_END)
                isize = int.from_bytes(f.read(4), "little")
            got = expected if isize == expected % 2**32 else None
        if got is not None:
            if got < expected:
                raise InputError(f"cannot read {p}: the file is truncated ({got - offset} of "
                                 f"{expected - offset} bytes of voxel data)")
            return image
    # Stream the voxel data once: count the bytes, and (float data) find the non-finite voxels.
    bad: list[np.ndarray] = []
    bad_values: list[np.ndarray] = []
    got = offset
    chunk = max(dtype.itemsize, (4 << 20) // dtype.itemsize * dtype.itemsize)
    try:
        with (gzip.open(p, "rb") if gz else p.open("rb")) as f:
            f.seek(offset)
            while got < expected:
                block = f.read(min(chunk, expected - got))
                if not block:
                    break
                if floating:
                    values = np.frombuffer(block[: len(block) // dtype.itemsize * dtype.itemsize], dtype)
                    idx = np.flatnonzero(~np.isfinite(values))
                    if idx.size:
                        bad.append(idx + (got - offset) // dtype.itemsize)
                        bad_values.append(values[idx])
                got += len(block)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"cannot read {p}: the file is damaged or truncated ({exc})") from exc
    if got < expected:
        raise InputError(f"cannot read {p}: the file is truncated ({got - offset} of "
                         f"{expected - offset} bytes of voxel data)")
    if not bad:
        return image
    import SimpleITK as sitk

    where = np.concatenate(bad)
    arr = sitk.GetArrayFromImage(image)
    flat = arr.reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating) or where[-1] >= flat.size:
        return image
    flat[where] = np.concatenate(bad_values)  # NaN stays NaN, inf stays inf whatever the scaling
    restored = sitk.GetImageFromArray(arr)
    restored.CopyInformation(image)
    for key in image.GetMetaDataKeys():
        restored.SetMetaData(key, image.GetMetaData(key))
    return restored


def _format_name(p: Path, image: SimpleITK.Image) -> str:
    name = p.name.lower()
    for suffixes, fmt in (((".nii", ".nii.gz"), "NIfTI"), ((".nrrd", ".nhdr"), "NRRD"),
                          ((".mha", ".mhd"), "MetaImage"), ((".dcm", ".dicom", ".ima"), "DICOM")):
        if name.endswith(suffixes):
            return fmt
    if image.HasMetaDataKey("ITK_InputFilterName"):
        return image.GetMetaData("ITK_InputFilterName").replace("ImageIO", "")
    return p.suffix.lstrip(".").upper()


def _read_dicom_folder(folder: Path) -> tuple[SimpleITK.Image, str, dict[str, Any]]:
    import SimpleITK as sitk

    try:
        series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise InputError(f"cannot scan {folder} for DICOM files: {_first_line(exc)}") from exc
    if not series_ids:
        raise InputError(
            f"{folder} is a folder with no DICOM series in it (sub-folders are not searched); "
            "give a DICOM series folder or a volume file"
        )
    files = {sid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in series_ids}
    chosen = max(series_ids, key=lambda s: (len(files[s]), s))
    if len(series_ids) > 1:
        others = ", ".join(f"{s} ({len(files[s])} files)" for s in series_ids if s != chosen)
        log.info("%s holds %d DICOM series; reading %s (%d files), the one with most files; skipped: %s",
                 folder, len(series_ids), chosen, len(files[chosen]), others)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series {chosen} in {folder}: {_first_line(exc)}") from exc

    def tag(key: str) -> str:
        try:
            return reader.GetMetaData(0, key).strip() if reader.HasMetaDataKey(0, key) else ""
        except RuntimeError:
            return ""

    meta = {
        "format": "DICOM series",
        "series_uid": chosen,
        "series_description": tag("0008|103e"),
        "n_files": len(files[chosen]),
        "n_series_in_folder": len(series_ids),
    }
    return image, tag("0008|0060").upper(), meta


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "rror" in ln] or lines
    return useful[-1][:300] if useful else type(exc).__name__


def _slabs(arr: np.ndarray) -> Iterable[np.ndarray]:
    step = max(1, _SLAB_VOXELS // max(1, arr[0].size)) if arr.ndim >= 1 and arr.shape[0] else 1
    for start in range(0, arr.shape[0], step):
        yield arr[start:start + step]


def _finite_stats(arr: np.ndarray) -> tuple[float | None, float | None, int]:
    """(min, max) of the finite voxels (None if there are none) and the count of NaN/inf voxels."""
    lo, hi, bad = math.inf, -math.inf, 0
    floating = np.issubdtype(arr.dtype, np.floating)
    for slab in _slabs(arr):
        if floating:
            finite = np.isfinite(slab)
            n_fin = int(finite.sum())
            bad += slab.size - n_fin
            if n_fin == 0:
                continue
            if n_fin != slab.size:
                slab = slab[finite]
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if lo == math.inf:
        return None, None, bad
    return lo, hi, bad


def _guess_modality(image: SimpleITK.Image, low: float) -> str:
    """CT if the data holds HU-like air values (<= -500), MR if it is non-negative, else unknown."""
    integer = image.GetPixelID() in _INTEGER_PIXELS
    if low <= -500 and (integer or low >= -3100):  # float CT from scaled NIfTI: air -1000, padding -3024
        return "CT"
    if low >= 0:
        return "MR"
    return ""


# --------------------------------------------------------------------------------------------- display








# ------------------------------------------------------------------------------------------- intensity










# ---------------------------------------------------------------------------------------------- writing






