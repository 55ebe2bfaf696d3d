"""Read 3D volumes (NIfTI, NRRD, MHA/MHD, DICOM series) exactly as stored, with clear errors.

Geometry rule: a volume is kept exactly as read (size, spacing, origin, direction untouched); what
was learnt while reading (modality, non-finite voxels, the DICOM series chosen) travels with it.
A volume must be a regular, orthogonal grid: DICOM series with missing slices, uneven spacing, a
gantry tilt or slices of different sizes, sheared NIfTI/NRRD/MetaImage headers and NIfTI files whose
qform and sform disagree are refused (never resampled: that would invent voxels). The only repairs are
for missing geometry (no qform/sform, Analyze files, NRRD/MetaImage headers without directions, zero or
negative voxel sizes); they are listed in ``metadata["repairs"]`` and warned about ("orientation
unknown" makes the writer claim no orientation). Every record's ``input.metadata`` is ``Volume.metadata``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medreasoner.constants import MAX_VOLUME_VOXELS
from medreasoner.constants import VOLUME_SUFFIXES as VOLUME_FILE_SUFFIXES
from medreasoner.errors import InputError
from medreasoner.imaging.intensity import check_not_blank, finite_range, nonfinite_warning
from medreasoner.io.files import DICOM_FILE_SUFFIXES, check_input_path, looks_like_dicom

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK

log = logging.getLogger(__name__)



# SimpleITK pixel ids sitkInt8 .. sitkUInt64 (scalar integers); 8, 9 are float32/64.
_INTEGER_PIXELS = (0, 1, 2, 3, 4, 5, 6, 7)

# Voxel count above which statistics are taken on a strided subsample.
_SAMPLE_VOXELS = 4_000_000

# DICOM slice geometry tolerance: 1% of the slice spacing, at least 0.01 mm (positions are decimal strings).
_GRID_TOL_REL = 0.01
_GRID_TOL_MM = 0.01

_finite_stats = finite_range  # the name imaging.windowing imports

# Smallest angle error (degrees) between voxel axes taken as a shear rather than rounding noise.
_SHEAR_TOL_DEG = 1e-3
# qform and sform corners closer than this fraction of the smallest voxel size (or 0.01 mm) agree.
_FORM_TOL_VOXEL = 0.1
_FORM_TOL_MM = 0.01




@dataclass
class Volume:
    """A scalar 3D image exactly as read from disk, plus what we learnt while reading it."""

    image: SimpleITK.Image
    path: str | None = None
    modality: str = ""
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    value_range: tuple[float, float] | None = None  # finite min and max, found while checking it is not blank

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
    _quiet_itk()
    st = check_input_path(p, "volume")  # symlink loops, FIFOs and devices named as such
    if stat.S_ISDIR(st.st_mode):
        image, modality, meta, notes = _read_dicom_folder(p)
    else:
        image, modality, meta, notes = _read_file(p)
    return volume_from_image(image, path=str(p), modality=modality, metadata=meta, warnings=notes)


def _quiet_itk() -> None:
    """ITK prints multi-line C++ warnings to stderr (breaking ``--progress json``, where every stderr line
    is JSON); what they say (coerced directions, Analyze files) is checked and recorded here instead."""
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)


def volume_from_image(image: SimpleITK.Image, path: str | None = None, modality: str | None = None,
                      metadata: dict[str, Any] | None = None, warnings: list[str] | None = None) -> Volume:
    """Validate an in-memory SimpleITK image as a volume (the checks ``read_volume`` applies).
    ``warnings`` (from the reader) come first in ``Volume.warnings``."""
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
    lo, hi, n_bad = check_not_blank(sitk.GetArrayViewFromImage(image), where, "volume")
    notes = list(warnings or [])
    if n_bad:
        notes.append(nonfinite_warning(n_bad, "voxel"))
        log.warning("%s: %s", where, notes[-1])
    if not modality:
        modality = _guess_modality(image, float(lo))
    return Volume(image=image, path=path, modality=modality, warnings=notes, metadata=dict(metadata or {}),
                  value_range=(float(lo), float(hi)))


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


def check_voxel_count(where: Any, size: tuple[int, ...]) -> None:
    """Refuse a volume larger than MAX_VOLUME_VOXELS before a byte of it is allocated."""
    n = int(np.prod([int(v) for v in size[:3]], dtype=np.int64))
    if n > MAX_VOLUME_VOXELS:
        shape = "x".join(str(int(v)) for v in size[:3])
        raise InputError(f"{where} declares {shape} = {n:,} voxels; at most {MAX_VOLUME_VOXELS:,} (1024^3) are "
                         "read: crop or resample it first (or check its header)")


def _check_declared_size(p: Path, size: tuple[int, ...], pixel_id: int, kind: str | None) -> None:
    """The header's size against limits and, for an uncompressed one-file NIfTI, against the file: a
    short file is refused at once, not after allocating what its header declares."""
    import SimpleITK as sitk

    check_voxel_count(p, size)
    if kind != "NIfTI" or p.name.lower().endswith(".gz"):
        return
    item = sitk.GetArrayViewFromImage(sitk.Image([1] * 3, pixel_id)).itemsize
    try:
        offset = int(float(_raw_nifti_header(p)["vox_offset"]))
    except Exception:  # noqa: BLE001 - ITK will say what is wrong with the header
        return
    need = offset + int(np.prod([int(v) for v in size], dtype=np.int64)) * item
    have = p.stat().st_size
    if have < need:
        raise InputError(f"cannot read {p}: the file is truncated ({have:,} of the {need:,} bytes its header "
                         "declares)")


def _read_file(p: Path) -> tuple[SimpleITK.Image, str, dict[str, Any], list[str]]:
    import SimpleITK as sitk

    if p.stat().st_size == 0:
        raise InputError(f"volume file is empty (0 bytes): {p}")
    kind = _header_kind(p)
    is_nifti = kind == "NIfTI"  # one file: its voxel data is checked too
    text_header = _text_header(p)
    _check_detached_data(p, text_header)
    if text_header is not None:
        _check_text_header_shear(p, *text_header)  # before ITK, which coerces a sheared direction silently
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    hint = f"supported: {', '.join(VOLUME_FILE_SUFFIXES)} files or a DICOM series folder"
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = _nifti_refusal(p) if kind in ("NIfTI", "NIfTI pair") else None  # ITK's message hides it
        raise InputError(reason or f"cannot read {p} as a volume: not a recognised or intact image file "
                         f"({hint})") from exc
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
    _check_declared_size(p, size, reader.GetPixelID(), kind)
    if kind in ("NIfTI", "NIfTI pair"):
        _check_nifti_forms(p)  # from the header alone: before the voxels are read
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read {p}: the file is damaged or truncated ({_first_line(exc)})") from exc
    meta: dict[str, Any] = {"format": kind or _format_name(p, image)}
    notes: list[str] = []
    repairs: list[str] = []
    if is_nifti:
        image = _check_nifti_data(p, image)
    if kind in ("NIfTI", "NIfTI pair", "Analyze"):
        image, repairs, notes = _repair_nifti_geometry(p, image)
    elif text_header is not None:
        image, repairs, notes = _repair_text_header_geometry(p, *text_header, image)
    if repairs:
        meta["repairs"] = repairs
    modality = ""
    if image.HasMetaDataKey("0008|0060"):  # a single (multi-frame) DICOM file
        modality = image.GetMetaData("0008|0060").strip().upper()
    if image.HasMetaDataKey("0028|0004") and image.GetMetaData("0028|0004").strip().upper() == "MONOCHROME1":
        raise InputError(_monochrome1_refusal(str(p)))
    return image, modality, meta, notes


def _header_kind(p: Path) -> str:
    """"NIfTI" (one file), "NIfTI pair" / "Analyze" (.hdr + .img: told apart by the header's magic),
    "NRRD", "MetaImage", or "" (left to ITK)."""
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "NIfTI"
    if name.endswith((".nrrd", ".nhdr")):
        return "NRRD"
    if name.endswith((".mha", ".mhd")):
        return "MetaImage"
    header = _pair_header_path(p)
    if header is None:
        return ""
    raw = _read_start(header, 348)
    if len(raw) < 348:
        return ""
    if raw[344:347] in (b"ni1", b"n+1") or raw[4:7] in (b"ni2", b"n+2"):
        return "NIfTI pair"
    return "Analyze" if 348 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")) else ""


def _pair_header_path(p: Path) -> Path | None:
    """The .hdr of an Analyze / NIfTI pair named by its .hdr or .img (optionally gzipped)."""
    name = p.name.lower()
    for ext in (".hdr", ".hdr.gz", ".img", ".img.gz"):
        if name.endswith(ext):
            base = p.name[: -len(ext)]
            gz = ".gz" if ext.endswith(".gz") else ""
            for candidate in (p.with_name(base + ".hdr" + gz), p.with_name(base + ".HDR" + gz.upper())):
                if candidate.is_file():
                    return candidate
            return None
    return None


def _read_start(p: Path, n: int) -> bytes:
    import gzip

    try:
        with (gzip.open(p, "rb") if p.name.lower().endswith(".gz") else p.open("rb")) as f:
            return f.read(n)
    except (OSError, EOFError):
        return b""


def _identity(image: SimpleITK.Image) -> tuple[float, ...]:
    return tuple(np.eye(image.GetDimension()).ravel())  # a 4D file (t = 1) is still 4D here


def _monochrome1_refusal(where: str) -> str:
    # ITK inverts MONOCHROME1 pixels (and GDCM's inversion depends on BitsStored), so the values it returns
    # are no longer modality values (HU): every window would be wrong. Refused rather than guessed back.
    return (f"{where} is MONOCHROME1 (an inverted grey scale: low values are shown white), which MedReasoner "
            "does not read as a volume (the reader would return inverted values, not modality values); "
            "convert it to MONOCHROME2 or NIfTI first")


# ----------------------------------------------------------------------------- header sanity (NIfTI, NRRD)


def _raw_nifti_header(p: Path) -> Any | None:
    """The NIfTI-1/2 (or Analyze 7.5, for a .hdr/.img pair without the NIfTI magic) header exactly as
    stored: nibabel's loader quietly turns zero pixdims into 1."""
    import nibabel as nib

    kind = _header_kind(p)
    if kind in ("NIfTI pair", "Analyze"):
        p = _pair_header_path(p) or p
    raw = _read_start(p, 540)
    if not raw:
        return None
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    cls = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
    if kind == "Analyze":
        cls, raw = nib.AnalyzeHeader, raw[:348]
    try:
        return cls.from_fileobj(io.BytesIO(raw), check=False)
    except Exception:  # noqa: BLE001 - a damaged header: the caller keeps its own message
        return None


def _axes_angle(matrix: np.ndarray) -> float:
    """The angle (degrees) between two voxel axes (columns) of ``matrix`` that is farthest from 90."""
    m = np.asarray(matrix, float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if not np.all(np.isfinite(m)) or np.any(norms == 0):
        return 90.0  # degenerate, not sheared (zero/NaN scales are judged elsewhere)
    cols = m / norms
    worst = 90.0
    for a, b in ((0, 1), (0, 2), (1, 2)):
        angle = math.degrees(math.acos(float(np.clip(cols[:, a] @ cols[:, b], -1.0, 1.0))))
        if abs(angle - 90.0) > abs(worst - 90.0):
            worst = angle
    return worst


def _nifti_refusal(p: Path) -> str | None:
    """Why ITK refused a NIfTI header that nibabel reads: a sheared sform without a usable qform."""
    import nibabel as nib

    header = _raw_nifti_header(p)
    if not isinstance(header, nib.Nifti1Header) or int(header["sform_code"]) <= 0:
        return None
    angle = _axes_angle(header.get_sform())
    if abs(angle - 90.0) < _SHEAR_TOL_DEG:
        return None
    return (f"the NIfTI affine of {p} is sheared (its axes are not perpendicular: {angle:.1f} deg); "
            "MedReasoner needs an orthogonal grid: resample it first")


def _repair_nifti_geometry(p: Path, image: SimpleITK.Image) -> tuple[SimpleITK.Image, list[str], list[str]]:
    """Make the geometry ITK inferred for a NIfTI (or Analyze) header without one explicit, and say so.

    Chosen behaviour (read with a recorded repair rather than refuse, as the NIfTI standard's
    "method 1" does for Analyze-style files): no qform and no sform (both codes 0) or an Analyze 7.5
    header -> the direction is identity (LPS) and the orientation is unknown; a zero/non-finite pixdim
    where no sform gives the spacing -> 1 mm, a negative one -> its magnitude (as nibabel and ITK read
    it); a sheared sform that ITK skipped for the qform -> said so. Each repair goes to
    ``metadata["repairs"]`` and a warning (the result record's ``warnings``) says what it means.
    """
    import nibabel as nib

    header = _raw_nifti_header(p)
    if header is None:
        return image, [], []
    repairs: list[str] = []
    notes: list[str] = []
    analyze = not isinstance(header, nib.Nifti1Header)  # Nifti2Header is a Nifti1Header
    qcode, scode = (0, 0) if analyze else (int(header["qform_code"]), int(header["sform_code"]))
    if scode > 0 and qcode > 0:
        angle = _axes_angle(header.get_sform())
        if abs(angle - 90.0) >= _SHEAR_TOL_DEG:
            repairs.append(f"sheared sform ({angle:.1f} deg between axes) ignored: the qform was used")
            notes.append(f"{p.name}: the sform is sheared ({angle:.1f} deg), so the qform's geometry was used; "
                         "other tools may place this volume differently")
    if analyze:
        image.SetDirection(_identity(image))
        repairs.append("Analyze header: orientation unknown, identity assumed")
        notes.append(f"{p.name} is an Analyze 7.5 file, which stores no orientation, so its orientation is "
                     "unknown (identity assumed): left/right and the other patient directions in the result "
                     "may be wrong")
    elif qcode <= 0 and scode <= 0:
        image.SetDirection(_identity(image))
        repairs.append("no qform/sform: orientation unknown, identity assumed")
        notes.append(f"{p.name} has no qform/sform, so its orientation is unknown (identity assumed): "
                     "left/right and the other patient directions in the result may be wrong")
    if scode <= 0:
        pixdim = [float(v) for v in header["pixdim"][1:4]]
        spacing = list(image.GetSpacing())
        bad = [i for i, v in enumerate(pixdim) if not (math.isfinite(v) and v != 0)]
        negative = [i for i, v in enumerate(pixdim) if math.isfinite(v) and v < 0]
        if bad:
            for i in bad:
                spacing[i] = 1.0
            values = sorted({f"{pixdim[i]:g}" for i in bad})
            axes = "" if len(bad) == 3 else f" (axis {', '.join('ijk'[i] for i in bad)})"
            repairs.append(f"pixdim {'/'.join(values)} -> 1 mm{axes}")
            notes.append(f"{p.name} has no voxel size (pixdim {'/'.join(values)}{axes}): 1 mm assumed, so "
                         "sizes in millimetres in the result are not physical")
        if negative:
            for i in negative:
                spacing[i] = abs(pixdim[i])
            values = "/".join(f"{pixdim[i]:g}" for i in negative)
            sizes = "/".join(f"{abs(pixdim[i]):g}" for i in negative)
            axes = "" if len(negative) == 3 else f" (axis {', '.join('ijk'[i] for i in negative)})"
            repairs.append(f"pixdim {values} -> {sizes} mm{axes}")
            notes.append(f"{p.name} has a negative voxel size (pixdim {values}{axes}): its magnitude ({sizes} mm) "
                         "is used, as other tools read it")
        if bad or negative:
            image.SetSpacing(spacing)
    for note in notes:
        log.warning("%s", note)
    return image, repairs, notes


_AXIS_NAMES = {"L": "left-right", "R": "left-right", "A": "front-back", "P": "front-back",
               "S": "head-foot", "I": "head-foot"}
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def _check_nifti_forms(p: Path) -> None:
    """Refuse a NIfTI header whose qform and sform (both codes > 0) place the voxels differently: tools
    disagree on which one wins (ITK and nibabel take the sform, others the qform), so a mask written on
    one could show mirrored or shifted in another viewer. A sheared sform is handled by the repair that
    says the qform was used."""
    import nibabel as nib
    from nibabel.orientations import aff2axcodes

    header = _raw_nifti_header(p)
    if not isinstance(header, nib.Nifti1Header) or int(header["qform_code"]) <= 0 \
            or int(header["sform_code"]) <= 0:
        return
    sform, qform = header.get_sform(), header.get_qform()
    if abs(_axes_angle(sform) - 90.0) >= _SHEAR_TOL_DEG or not (np.all(np.isfinite(sform))
                                                               and np.all(np.isfinite(qform))):
        return
    shape = [max(int(n), 1) for n in (tuple(header.get_data_shape()) + (1, 1, 1))[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    apart = float(np.linalg.norm((qform @ corners - sform @ corners)[:3], axis=0).max())
    voxel = float(np.linalg.norm(sform[:3, :3], axis=0).min())
    if apart <= max(_FORM_TOL_MM, _FORM_TOL_VOXEL * voxel):
        return
    qcodes, scodes = aff2axcodes(qform), aff2axcodes(sform)
    flipped = [_AXIS_NAMES[q] for q, s in zip(qcodes, scodes) if _OPPOSITE[q] == s]
    how = []
    if any(q != s and _OPPOSITE[q] != s for q, s in zip(qcodes, scodes)):
        how.append(f"axes differ: qform {''.join(qcodes)}, sform {''.join(scodes)}")
    if flipped:
        how.append(f"{' and '.join(flipped)} flipped")
    how.append(f"up to {_mm(apart)} mm apart")
    raise InputError(f"the qform and sform of {p} disagree ({', '.join(how)}), so viewers that use the other one "
                     f"would show the mask {'mirrored' if flipped else 'misplaced'}; fix the header with one of "
                     "them (copy it into the other, or set the other's code to 0)")


def _text_header(p: Path) -> tuple[str, dict[str, str]] | None:
    """("NRRD" | "MetaImage", fields) of a NRRD / MetaImage header (keys lower-case, values as written);
    None for other files. Both headers are ASCII lines before the (attached or detached) data."""
    if not p.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return None
    try:
        with p.open("rb") as f:
            text = f.read(65536).decode("latin-1")
    except OSError:
        return None
    fields: dict[str, str] = {}
    if text.startswith("NRRD"):
        for line in text.splitlines()[1:]:
            if not line.strip():
                break  # a blank line ends a NRRD header
            key, sep, value = line.partition(":")
            if sep and not line.startswith("#") and not value.startswith("="):  # ":=" lines are key/values
                fields.setdefault(key.strip().lower(), value.strip())
        return "NRRD", fields
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
            if key.strip().lower() == "elementdatafile":
                break  # the last header line: the data may follow
    return "MetaImage", fields


def _floats(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        return None


def _header_axes(kind: str, fields: dict[str, str]) -> np.ndarray | None:
    """The 3x3 matrix whose columns are the voxel axes the header itself gives (NRRD ``space directions``,
    MetaImage ``TransformMatrix``), before ITK orthogonalises it; None when the header gives none."""
    import re

    if kind == "NRRD":
        value = fields.get("space directions")
        if value is None:
            return None
        vectors = []
        for m in re.finditer(r"\(([^)]*)\)|none", value, re.IGNORECASE):
            v = _floats(m.group(1)) if m.group(1) is not None else None
            if v and all(math.isfinite(x) for x in v):  # "none" / NaN vectors are non-spatial axes
                vectors.append(v)
        if len(vectors) < 3 or any(len(v) != len(vectors[0]) or len(v) < 3 for v in vectors[:3]):
            return None
        return np.array(vectors[:3], float).T[:3, :3]
    for key in ("transformmatrix", "rotation", "orientation"):  # MetaIO synonyms
        values = _floats(fields.get(key, ""))
        if values:
            n = math.isqrt(len(values))
            if n >= 3 and n * n == len(values):  # one axis after the other
                return np.array(values, float).reshape(n, n).T[:3, :3]
            return None
    return None


def _check_text_header_shear(p: Path, kind: str, fields: dict[str, str]) -> None:
    """Refuse a sheared NRRD / MetaImage direction, as sheared NIfTI affines are refused: ITK would
    coerce it to the nearest orthogonal one (a warning on stderr only), moving every voxel."""
    axes = _header_axes(kind, fields)
    if axes is None:
        return
    angle = _axes_angle(axes)
    if abs(angle - 90.0) >= _SHEAR_TOL_DEG:
        what = "NRRD space directions of" if kind == "NRRD" else "MetaImage TransformMatrix of"
        raise InputError(f"the {what} {p} {'are' if kind == 'NRRD' else 'is'} sheared (the voxel axes are not "
                         f"perpendicular: {angle:.1f} deg); MedReasoner needs an orthogonal grid: resample it first")


# NRRD spaces with patient directions (ITK maps them to LPS); others (scanner-xyz, 3D-right-handed, ...) do not.
_NRRD_PATIENT_SPACES = {"right-anterior-superior", "left-anterior-superior", "left-posterior-superior",
                        "ras", "las", "lps"}


def _repair_text_header_geometry(p: Path, kind: str, fields: dict[str, str],
                                 image: SimpleITK.Image) -> tuple[SimpleITK.Image, list[str], list[str]]:
    """A NRRD / MetaImage header without directions (or a NRRD without a patient space) has no orientation:
    ITK assumes identity. Recorded as for a NIfTI without qform/sform ("orientation unknown", so outputs
    claim none); a missing voxel size (ITK's 1 mm, made explicit) likewise."""
    repairs: list[str] = []
    notes: list[str] = []
    has_axes = (("space directions" in fields) if kind == "NRRD"
                else any(k in fields for k in ("transformmatrix", "rotation", "orientation")))
    space = fields.get("space", "").strip().lower()
    base = space.removesuffix("-time")
    base = base[:-1] if base[:-1] in ("ras", "las", "lps") and base.endswith("t") else base  # RAST, ...
    if not has_axes:
        what = "space directions" if kind == "NRRD" else "TransformMatrix"
        image.SetDirection(_identity(image))
        repairs.append(f"no {what}: orientation unknown, identity assumed")
        notes.append(f"{p.name} has no {what}, so its orientation is unknown (identity assumed): "
                     "left/right and the other patient directions in the result may be wrong")
    elif kind == "NRRD" and base not in _NRRD_PATIENT_SPACES:
        space = fields.get("space", "").strip()  # as written, for the messages
        named = f"space {space}" if space else "no space"
        repairs.append(f"{named}: orientation unknown, directions read as patient LPS")
        notes.append(f"{p.name} has {'no patient space' if not space else f'a non-patient space ({space})'}, so "
                     "its orientation is unknown (directions read as patient LPS): left/right and the other "
                     "patient directions in the result may be wrong")
    if kind == "MetaImage" and not any(k in fields for k in ("elementspacing", "elementsize")):
        image.SetSpacing((1.0,) * image.GetDimension())
        repairs.append("no ElementSpacing -> 1 mm")
        notes.append(f"{p.name} has no voxel size (no ElementSpacing): 1 mm assumed, so sizes in millimetres "
                     "in the result are not physical")
    if kind == "NRRD" and not has_axes:
        given = _floats(fields.get("spacings", "")) or []
        sizes = [given[i] if i < len(given) else math.nan for i in range(3)]
        bad = [i for i, v in enumerate(sizes) if not (math.isfinite(v) and v > 0)]
        if bad:
            spacing = list(image.GetSpacing())
            for i in bad:
                spacing[i] = 1.0
            image.SetSpacing(spacing)
            axes = "" if len(bad) == 3 else f" (axis {', '.join('ijk'[i] for i in bad)})"
            repairs.append(f"no spacings -> 1 mm{axes}")
            notes.append(f"{p.name} has no voxel size (no spacings{axes}): 1 mm assumed, so sizes in "
                         "millimetres in the result are not physical")
    for note in notes:
        log.warning("%s", note)
    return image, repairs, notes


def _check_detached_data(p: Path, header: tuple[str, dict[str, str]] | None) -> None:
    """A NRRD/MetaImage header whose detached data file is missing: ITK only says "cannot read"."""
    if header is None:
        return
    kind, fields = header
    names = ("data file", "datafile") if kind == "NRRD" else ("elementdatafile",)
    field_name = next((k for k in names if k in fields), "")
    data_file = fields.get(field_name, "")
    if kind != "NRRD":
        field_name = "ElementDataFile"
    # LOCAL: the data follows the header; LIST or a %d pattern: several files, left to ITK.
    if not data_file or data_file.upper() == "LOCAL" or data_file.upper().startswith("LIST") or "%" in data_file:
        return
    target = Path(data_file) if Path(data_file).is_absolute() else p.parent / data_file
    if not target.exists():
        raise InputError(f"cannot read {p}: the data file {data_file} named by the header is missing "
                         f"(looked in {target.parent}); put it next to the header or fix its '{field_name}' line")


def _check_nifti_data(p: Path, image: SimpleITK.Image) -> SimpleITK.Image:
    """Catch what ITK's NIfTI reader lets through: truncated voxel data (read as zeros without an error)
    and NaN/inf voxels (silently set to 0). Non-finite voxels are put back so they are reported."""
    import gzip
    import zlib

    import nibabel as nib

    quiet = nib.imageglobals.logger  # nibabel prints its header fixes (negative pixdim) to stderr itself;
    was_disabled, quiet.disabled = quiet.disabled, True  # the repairs here record them instead
    try:
        proxy = nib.load(str(p)).dataobj  # (image.header has vox_offset reset to 0; the proxy has it)
        dtype = np.dtype(proxy.dtype)
        offset = int(proxy.offset)
        expected = offset + int(np.prod(proxy.shape, dtype=np.int64)) * dtype.itemsize
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds; ITK may accept a cut-off header
        raise InputError(f"cannot read {p}: the NIfTI header is damaged or truncated ({exc})") from exc
    finally:
        quiet.disabled = was_disabled
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


@dataclass
class _DicomFile:
    """One image file of a DICOM series, as its header describes it."""

    path: Path
    series_uid: str
    description: str
    modality: str
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    rows: int = 0
    columns: int = 0
    pixel_spacing: tuple[float, ...] | None = None
    photometric: str = ""
    slope: float = 1.0
    intercept: float = 0.0


def _damaged_member(name: str, folder: Path, reason: str) -> InputError:
    return InputError(f"cannot read {name} in the DICOM folder {folder}: it looks like DICOM but is damaged or "
                      f"truncated ({reason}); remove or replace that file")


def _numbers(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _scalar(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _scan_dicom_folder(folder: Path) -> tuple[dict[str, list[_DicomFile]], list[str], list[str]]:
    """The image files of each series in ``folder`` (sub-folders are not searched), from their headers.

    Only regular, non-hidden files are candidates: folders, FIFOs, devices, sockets, ``.DS_Store`` and
    AppleDouble ``._*`` files never are, so they cannot change which slices are used (GDCM's own scan
    returns one file of a series when the folder holds a FIFO). A file that looks like DICOM (DICM
    preamble or .dcm/.dicom/.ima name) but cannot be read fails the read naming it: skipping it would
    leave a silent gap. Non-image DICOM objects (DICOMDIR, SR, RT structure sets) are skipped and listed;
    so is every other entry not read (the third list), for the record.
    """
    import pydicom
    from pydicom.uid import UID

    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(f"cannot list the DICOM folder {folder}: {exc.strerror or exc}") from exc
    series: dict[str, list[_DicomFile]] = {}
    skipped: list[str] = []
    ignored: list[str] = []
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            ignored.append(name)
            continue
        path = Path(entry.path)
        try:
            regular = entry.is_file()  # follows links; False for folders, FIFOs, devices, loops
        except OSError:
            regular = False
        if not regular:
            if entry.is_symlink() and name.lower().endswith(DICOM_FILE_SUFFIXES):
                raise _damaged_member(name, folder, "a symlink to a missing file")
            ignored.append(name + "/" if entry.is_dir() else name)
            continue
        looks = looks_like_dicom(path)
        if not looks and not _starts_like_raw_dicom(path):
            ignored.append(name)
            continue  # README.txt, thumbnails, ...: not DICOM, never read
        try:  # force: DICOM files without the preamble exist; defer_size: never load big values of junk
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True, defer_size=4096)
            meta = getattr(ds, "file_meta", None)
            sop = str((meta.get("MediaStorageSOPClassUID", "") if meta is not None else "")
                      or ds.get("SOPClassUID", "") or "")
            is_image = "Rows" in ds or (bool(sop) and "Image Storage" in UID(sop).name)
            missing = [k for k in ("SeriesInstanceUID", "Rows", "Columns") if not ds.get(k)]
            found = _DicomFile(path=path, series_uid=str(ds.get("SeriesInstanceUID", "")).strip(),
                               description=str(ds.get("SeriesDescription", "") or "").strip(),
                               modality=str(ds.get("Modality", "") or "").strip().upper(),
                               position=_numbers(ds.get("ImagePositionPatient"), 3),
                               orientation=_numbers(ds.get("ImageOrientationPatient"), 6),
                               rows=int(_scalar(ds.get("Rows"), 0)), columns=int(_scalar(ds.get("Columns"), 0)),
                               pixel_spacing=_numbers(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2),
                               photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
                               slope=_scalar(ds.get("RescaleSlope"), 1.0),
                               intercept=_scalar(ds.get("RescaleIntercept"), 0.0))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged or foreign files
            if looks:
                raise _damaged_member(name, folder, _first_line(exc)) from exc
            ignored.append(name)
            continue
        if not is_image:
            if looks and not sop:
                raise _damaged_member(name, folder, "no SOP class: not a complete DICOM file")
            if looks:
                skipped.append(name)
            continue
        if missing:
            if looks:
                raise _damaged_member(name, folder, f"no {', '.join(missing)}")
            ignored.append(name)
            continue
        series.setdefault(found.series_uid, []).append(found)
    return series, skipped, ignored


def _starts_like_raw_dicom(path: Path) -> bool:
    """A DICOM dataset stored without preamble (old ACR-NEMA style files) starts with a group 0x0002 or
    0x0008 tag, little endian; GDCM reads such files, so they are still series members."""
    try:
        with path.open("rb") as f:
            return f.read(2) in (b"\x02\x00", b"\x08\x00")
    except OSError:
        return False


def _mm(x: float) -> str:
    return f"{x:.1f}" if round(x, 1) == round(x, 2) else f"{x:.2f}"


def _check_one_grid(files: list[_DicomFile], uid: str, folder: Path) -> None:
    """Refuse slices of different sizes or pixel spacings, naming the odd file: ITK stacks every slice on
    the first one's grid (a different PixelSpacing is taken silently), so the volume would be wrong."""
    from collections import Counter

    def rounded(v: tuple | None) -> tuple | None:
        return None if v is None else tuple(round(x, 4) for x in v)

    def same(a: tuple | None, b: tuple | None) -> bool:  # spacings are decimal strings: equal within 1e-4
        return a == b or (a is not None and b is not None and bool(np.allclose(a, b, rtol=1e-4, atol=1e-6)))

    where = f"DICOM series {uid} in {folder}"
    sizes = [(f.columns, f.rows) for f in files]
    spacings = [f.pixel_spacing for f in files]
    for values in (sizes, spacings):
        keys = [rounded(v) for v in values]
        usual = values[keys.index(Counter(keys).most_common(1)[0][0])]  # what most slices have
        i = next((i for i, v in enumerate(values) if not same(v, usual)), None)
        if i is None:
            continue
        odd, ref = files[i].path.name, files[values.index(usual)].path.name
        if values is sizes:
            differ = f"is {values[i][0]} x {values[i][1]} pixels (Columns x Rows) but the other slices (e.g. {ref}) " \
                     f"are {usual[0]} x {usual[1]}"
        else:
            def show(v: tuple | None) -> str:
                return "none" if v is None else f"{_mm(v[0])} x {_mm(v[1])} mm"
            differ = f"has PixelSpacing {show(values[i])} but the other slices (e.g. {ref}) have {show(usual)}"
        raise InputError(f"{where}: {odd} {differ}, so they do not form one grid; remove {odd} or give a folder "
                         "holding one series")


def _regular_slice_order(files: list[_DicomFile], uid: str, folder: Path) -> tuple[list[_DicomFile], float]:
    """The files sorted along the slice normal, and their spacing; refuse anything that is not a regular
    grid (ITK would stack the slices at even steps and place them up to half a gap off, silently).

    Checked on the positions projected on the normal of ImageOrientationPatient: one orientation for all
    slices, no two slices at one position, no in-plane drift from slice to slice (gantry tilt), and equal
    gaps (missing slices) within 1% of the median gap or 0.01 mm, whichever is larger.
    """
    where = f"DICOM series {uid} in {folder}"
    for f in files:
        if f.position is None or f.orientation is None:
            raise InputError(f"{where}: {f.path.name} has no usable ImagePositionPatient/ImageOrientationPatient, "
                             "so its slices cannot be placed in 3D")
    iop = np.array(files[0].orientation)
    for f in files[1:]:
        if np.abs(np.array(f.orientation) - iop).max() > 1e-3:
            raise InputError(f"{where} mixes slice orientations ({files[0].path.name} and {f.path.name} differ); "
                             "give a folder holding one stack of parallel slices")
    normal = np.cross(iop[:3], iop[3:])
    if not np.linalg.norm(normal) > 0.5:
        raise InputError(f"{where}: ImageOrientationPatient {tuple(iop)} is not two perpendicular unit vectors")
    normal /= np.linalg.norm(normal)
    pos = np.array([f.position for f in files])
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    files = [files[i] for i in order]
    pos, depth = pos[order], depth[order]
    gaps = np.diff(depth)
    expected = float(np.median(gaps))
    tol = max(_GRID_TOL_MM, _GRID_TOL_REL * expected)
    names = [f.path.name for f in files]
    dup = np.flatnonzero(gaps < tol)
    if dup.size:
        i = int(dup[0])
        raise InputError(f"{where} has several slices at one position ({names[i]} and {names[i + 1]}, "
                         f"{_mm(float(depth[i]))} mm along the normal): it holds more than one image per position "
                         "(echoes, phases, time points or repeats); give one of them per folder")
    drift = np.linalg.norm(np.diff(pos - np.outer(depth, normal), axis=0), axis=1)  # in-plane shift per step
    if drift.max() > tol:
        tilt = math.degrees(math.atan2(float(np.median(drift)), expected))
        raise InputError(f"{where} is tilted: its slices shift {_mm(float(np.median(drift)))} mm in-plane per "
                         f"{_mm(expected)} mm step (a gantry tilt of {tilt:.1f} deg), so they do not form a regular "
                         "grid; resample it first (e.g. dcm2niix or 3D Slicer's DICOM import correct the tilt)")
    off = np.abs(gaps - expected)
    if off.max() > tol:
        i = int(np.argmax(off))
        raise InputError(f"{where} has irregular slice spacing: a gap of {_mm(float(gaps[i]))} mm between slices "
                         f"{i + 1} and {i + 2} ({names[i]}, {names[i + 1]}; expected {_mm(expected)} mm); missing "
                         "slices? Give the complete series")
    return files, expected


def _describe_series(uid: str, files: list[_DicomFile]) -> str:
    desc = files[0].description
    return f"{uid} ({repr(desc) + ', ' if desc else ''}{len(files)} images)"


def _read_dicom_folder(folder: Path) -> tuple[SimpleITK.Image, str, dict[str, Any], list[str]]:
    """The series with the most image files in ``folder``, checked to be a regular grid.

    Several series: the one with the most images is read (a tie is refused, listing them) and the others
    are named in ``metadata["other_series"]`` and in a warning.
    """
    import SimpleITK as sitk

    series, skipped, ignored = _scan_dicom_folder(folder)
    if not series:
        raise InputError(
            f"{folder} is a folder with no DICOM series in it (sub-folders are not searched); "
            "give a DICOM series folder or a volume file"
        )
    most = max(len(files) for files in series.values())
    top = sorted(uid for uid, files in series.items() if len(files) == most)
    if len(top) > 1:
        listed = "; ".join(_describe_series(uid, series[uid]) for uid in top)
        raise InputError(f"{folder} holds {len(top)} DICOM series with {most} images each: {listed}; "
                         "move the one you want into a folder of its own")
    chosen = top[0]
    files = series[chosen]
    spacing = None
    inverted = next((f for f in files if f.photometric == "MONOCHROME1"), None)
    if inverted is not None:
        raise InputError(_monochrome1_refusal(f"{inverted.path.name} in the DICOM series {chosen} in {folder}"))
    if len(files) > 1:
        _check_one_grid(files, chosen, folder)
        files, spacing = _regular_slice_order(files, chosen, folder)
    notes: list[str] = []
    others = [uid for uid in sorted(series) if uid != chosen]
    if others:
        listed = ", ".join(_describe_series(uid, series[uid]) for uid in others)
        log.info("%s holds %d DICOM series; reading %s (%d files), the one with most files; skipped: %s",
                 folder, len(series), chosen, len(files), listed)
        notes.append(f"{folder.name} holds {len(series)} DICOM series; read {_describe_series(chosen, files)}, "
                     f"the one with the most images; not read: {listed}")
    check_voxel_count(folder, (files[0].columns or 1, files[0].rows or 1, len(files)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f.path) for f in files])
    # ITK takes the pixel type from the first slice: with per-slice (PET-like) fractional or differing
    # rescales, an integer first slice would round every other slice's values. float64 is what ITK itself
    # gives a slice with a fractional slope, and holds integer values exactly.
    scales = {(f.slope, f.intercept) for f in files}
    if len(scales) > 1 or any(not (a.is_integer() and b.is_integer()) for a, b in scales):
        reader.SetOutputPixelType(sitk.sitkFloat64)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        for f in files:  # ITK does not say which file failed (a truncated one, say): find it
            one = sitk.ImageFileReader()
            one.SetFileName(str(f.path))
            try:
                one.Execute()
            except RuntimeError as bad:
                raise _damaged_member(f.path.name, folder, _first_line(bad)) from exc
        raise InputError(f"cannot read the DICOM series {chosen} in {folder}: {_first_line(exc)}") from exc
    meta: dict[str, Any] = {
        "format": "DICOM series",
        "series_uid": chosen,
        "series_description": files[0].description,
        "n_files": len(files),
        "n_slices": len(files),
        "n_series_in_folder": len(series),
    }
    if spacing is not None:
        meta["slice_spacing_mm"] = round(spacing, 6)
    if others:
        meta["other_series"] = [{"series_uid": uid, "series_description": series[uid][0].description,
                                 "n_files": len(series[uid])} for uid in others]
    if skipped:
        meta["skipped_non_image_files"] = skipped[:20]
    if ignored:  # hidden files, sub-folders, non-DICOM files: never read, named so a reader can check
        meta["ignored_files"] = ignored[:20]
        meta["n_ignored_files"] = len(ignored)
    return image, files[0].modality, meta, notes


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "rror" in ln] or lines
    return useful[-1][:300] if useful else type(exc).__name__


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






