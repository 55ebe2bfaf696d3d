"""Read 3D volumes (NIfTI, NRRD, MHA/MHD, DICOM series) exactly as stored, with clear errors.

Geometry rule: a volume is kept exactly as read (size, spacing, origin, direction untouched); what
was learnt while reading (modality, non-finite voxels, the DICOM series chosen) travels with it.
A volume must be a regular, orthogonal grid: DICOM series with missing slices, uneven spacing or a
gantry tilt and sheared NIfTI affines are refused (never resampled: that would invent voxels). The
only repairs are for missing NIfTI geometry (no qform/sform, zero pixdim); they are listed in
``metadata["repairs"]`` and warned about. Every record's ``input.metadata`` is ``Volume.metadata``.
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

from medreasoner.constants import VOLUME_SUFFIXES as VOLUME_FILE_SUFFIXES
from medreasoner.errors import InputError
from medreasoner.imaging.intensity import check_not_blank, finite_range
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
    st = check_input_path(p, "volume")  # symlink loops, FIFOs and devices named as such
    if stat.S_ISDIR(st.st_mode):
        image, modality, meta, notes = _read_dicom_folder(p)
    else:
        image, modality, meta, notes = _read_file(p)
    return volume_from_image(image, path=str(p), modality=modality, metadata=meta, warnings=notes)


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
    lo, _, n_bad = check_not_blank(sitk.GetArrayViewFromImage(image), where, "volume")
    notes = list(warnings or [])
    if n_bad:
        notes.append(
            f"{n_bad} voxel(s) are NaN or infinite; they are shown as the window minimum"
        )
        log.warning("%s: %s", where, notes[-1])
    if not modality:
        modality = _guess_modality(image, float(lo))
    return Volume(image=image, path=path, modality=modality, warnings=notes, metadata=dict(metadata or {}))


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


def _read_file(p: Path) -> tuple[SimpleITK.Image, str, dict[str, Any], list[str]]:
    import SimpleITK as sitk

    if p.stat().st_size == 0:
        raise InputError(f"volume file is empty (0 bytes): {p}")
    is_nifti = p.name.lower().endswith((".nii", ".nii.gz"))
    _check_detached_data(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    hint = f"supported: {', '.join(VOLUME_FILE_SUFFIXES)} files or a DICOM series folder"
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = _nifti_refusal(p) if is_nifti else None  # ITK's own message hides the real reason
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
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read {p}: the file is damaged or truncated ({_first_line(exc)})") from exc
    meta: dict[str, Any] = {"format": _format_name(p, image)}
    notes: list[str] = []
    if is_nifti:
        image = _check_nifti_data(p, image)
        image, repairs, notes = _repair_nifti_geometry(p, image)
        if repairs:
            meta["repairs"] = repairs
    modality = ""
    if image.HasMetaDataKey("0008|0060"):  # a single (multi-frame) DICOM file
        modality = image.GetMetaData("0008|0060").strip().upper()
    return image, modality, meta, notes


# ----------------------------------------------------------------------------- header sanity (NIfTI, NRRD)


def _raw_nifti_header(p: Path) -> Any | None:
    """The NIfTI-1/2 header exactly as stored: nibabel's loader quietly turns zero pixdims into 1."""
    import gzip

    import nibabel as nib

    try:
        with (gzip.open(p, "rb") if p.name.lower().endswith(".gz") else p.open("rb")) as f:
            raw = f.read(540)
    except (OSError, EOFError):
        return None
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    cls = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
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
    header = _raw_nifti_header(p)
    if header is None or int(header["sform_code"]) <= 0:
        return None
    angle = _axes_angle(header.get_sform())
    if abs(angle - 90.0) < 1e-3:
        return None
    return (f"the NIfTI affine of {p} is sheared (its axes are not perpendicular: {angle:.1f} deg); "
            "MedReasoner needs an orthogonal grid: resample it first")


def _repair_nifti_geometry(p: Path, image: SimpleITK.Image) -> tuple[SimpleITK.Image, list[str], list[str]]:
    """Make the geometry ITK inferred for a NIfTI header without one explicit, and say so.

    Chosen behaviour (read with a recorded repair rather than refuse, as the NIfTI standard's
    "method 1" does for Analyze-style files): no qform and no sform (both codes 0) -> the direction is
    identity (LPS) and the orientation is unknown; a zero/negative/non-finite pixdim where no sform
    gives the spacing -> 1 mm; a sheared sform that ITK skipped for the qform -> said so. Each repair
    goes to ``metadata["repairs"]`` and a warning (the result record's ``warnings``) says what it means.
    """
    header = _raw_nifti_header(p)
    if header is None:
        return image, [], []
    repairs: list[str] = []
    notes: list[str] = []
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if scode > 0 and qcode > 0:
        angle = _axes_angle(header.get_sform())
        if abs(angle - 90.0) >= 1e-3:
            repairs.append(f"sheared sform ({angle:.1f} deg between axes) ignored: the qform was used")
            notes.append(f"{p.name}: the sform is sheared ({angle:.1f} deg), so the qform's geometry was used; "
                         "other tools may place this volume differently")
    if qcode <= 0 and scode <= 0:
        image.SetDirection(tuple(np.eye(3).ravel()))
        repairs.append("no qform/sform: orientation unknown, identity assumed")
        notes.append(f"{p.name} has no qform/sform, so its orientation is unknown (identity assumed): "
                     "left/right and the other patient directions in the result may be wrong")
    if scode <= 0:
        pixdim = [float(v) for v in header["pixdim"][1:4]]
        bad = [i for i, v in enumerate(pixdim) if not (math.isfinite(v) and v > 0)]
        if bad:
            spacing = list(image.GetSpacing())
            for i in bad:
                spacing[i] = 1.0
            image.SetSpacing(spacing)
            values = sorted({f"{pixdim[i]:g}" for i in bad})
            axes = "" if len(bad) == 3 else f" (axis {', '.join('ijk'[i] for i in bad)})"
            repairs.append(f"pixdim {'/'.join(values)} -> 1 mm{axes}")
            notes.append(f"{p.name} has no voxel size (pixdim {'/'.join(values)}{axes}): 1 mm assumed, so "
                         "sizes in millimetres in the result are not physical")
    for note in notes:
        log.warning("%s", note)
    return image, repairs, notes


def _check_detached_data(p: Path) -> None:
    """A NRRD/MetaImage header whose detached data file is missing: ITK only says "cannot read"."""
    if not p.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return
    try:
        with p.open("rb") as f:
            text = f.read(65536).decode("latin-1")
    except OSError:
        return
    data_file, field_name = None, ""
    if text.startswith("NRRD"):
        for line in text.splitlines()[1:]:
            if not line.strip():
                break  # a blank line ends a NRRD header
            key, sep, value = line.partition(":")
            if sep and not value.startswith("=") and key.strip().lower() in ("data file", "datafile"):
                data_file, field_name = value.strip(), key.strip()
                break
    else:
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "ElementDataFile":
                data_file, field_name = value.strip(), "ElementDataFile"
                break
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


@dataclass
class _DicomFile:
    """One image file of a DICOM series, as its header describes it."""

    path: Path
    series_uid: str
    description: str
    modality: str
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None


def _damaged_member(name: str, folder: Path, reason: str) -> InputError:
    return InputError(f"cannot read {name} in the DICOM folder {folder}: it looks like DICOM but is damaged or "
                      f"truncated ({reason}); remove or replace that file")


def _numbers(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _scan_dicom_folder(folder: Path) -> tuple[dict[str, list[_DicomFile]], list[str]]:
    """The image files of each series in ``folder`` (sub-folders are not searched), from their headers.

    Only regular, non-hidden files are candidates: folders, FIFOs, devices, sockets, ``.DS_Store`` and
    AppleDouble ``._*`` files never are, so they cannot change which slices are used (GDCM's own scan
    returns one file of a series when the folder holds a FIFO). A file that looks like DICOM (DICM
    preamble or .dcm/.dicom/.ima name) but cannot be read fails the read naming it: skipping it would
    leave a silent gap. Non-image DICOM objects (DICOMDIR, SR, RT structure sets) are skipped and listed.
    """
    import pydicom
    from pydicom.uid import UID

    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(f"cannot list the DICOM folder {folder}: {exc.strerror or exc}") from exc
    series: dict[str, list[_DicomFile]] = {}
    skipped: list[str] = []
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            regular = entry.is_file()  # follows links; False for folders, FIFOs, devices, loops
        except OSError:
            regular = False
        if not regular:
            if entry.is_symlink() and name.lower().endswith(DICOM_FILE_SUFFIXES):
                raise _damaged_member(name, folder, "a symlink to a missing file")
            continue
        looks = looks_like_dicom(path)
        if not looks and not _starts_like_raw_dicom(path):
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
                               orientation=_numbers(ds.get("ImageOrientationPatient"), 6))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged or foreign files
            if looks:
                raise _damaged_member(name, folder, _first_line(exc)) from exc
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
            continue
        series.setdefault(found.series_uid, []).append(found)
    return series, skipped


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

    series, skipped = _scan_dicom_folder(folder)
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
    if len(files) > 1:
        files, spacing = _regular_slice_order(files, chosen, folder)
    notes: list[str] = []
    others = [uid for uid in sorted(series) if uid != chosen]
    if others:
        listed = ", ".join(_describe_series(uid, series[uid]) for uid in others)
        log.info("%s holds %d DICOM series; reading %s (%d files), the one with most files; skipped: %s",
                 folder, len(series), chosen, len(files), listed)
        notes.append(f"{folder.name} holds {len(series)} DICOM series; read {_describe_series(chosen, files)}, "
                     f"the one with the most images; not read: {listed}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f.path) for f in files])
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






