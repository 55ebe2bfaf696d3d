"""Read a 2D image from disk (PNG/JPEG/TIFF/BMP, 2D DICOM, .npy) with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import VOLUME_SUFFIXES
from medreasoner.errors import InputError
from medreasoner.imaging.intensity import Window, to_rgb_uint8

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}


@dataclass
class Image2D:
    """A loaded image: the original pixels, the 8-bit RGB the models see, and where it came from."""

    pixels: np.ndarray
    rgb: np.ndarray
    path: str | None = None
    intensity: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise InputError(f"{path} has {im.n_frames} frames; give a single 2D image")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            return np.asarray(im)
    except UnidentifiedImageError as exc:
        raise InputError(f"cannot read {path} as an image: not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {path} as an image: {exc}") from exc


def _first_number(value: Any) -> float:
    """DICOM window tags may hold one value or several (the first is the default)."""
    if hasattr(value, "__len__") and not isinstance(value, str):
        value = value[0]
    return float(value)


def _read_dicom(path: Path) -> tuple[np.ndarray, Window | None, dict]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
        raise InputError(f"cannot read {path} as DICOM: {exc}") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if frames > 1 or (arr.ndim == 3 and photometric.startswith("MONOCHROME")):
        raise InputError(
            f"{path} is a multi-frame DICOM ({arr.shape}); the 2D command takes one frame. "
            "Use the volume workflow for series and multi-frame data."
        )
    meta = {
        "modality": str(getattr(ds, "Modality", "")),
        "photometric": photometric,
        "pixel_spacing": [float(v) for v in getattr(ds, "PixelSpacing", [])] or None,
    }
    window = None
    if photometric.startswith("MONOCHROME"):
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        arr = arr.astype(np.float32) * slope + intercept
        if photometric == "MONOCHROME1":
            arr = arr.max() - arr + arr.min()
        wc, ww = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
        if wc is not None and ww is not None:
            try:
                window = Window(_first_number(wc), _first_number(ww))
            except (TypeError, ValueError):
                window = None
            if window is not None and window.width <= 0:
                window = None
    elif photometric.startswith("YBR"):
        from pydicom.pixel_data_handlers.util import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
    return arr, window, meta


def load_image(path: str | Path, window: Window | None = None) -> Image2D:
    """Load one 2D image. ``window`` overrides any window stored in the file (e.g. DICOM)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"image file not found: {p}")
    if p.is_dir():
        raise InputError(f"{p} is a folder; give one 2D image file (DICOM series go to the volume workflow)")
    if p.stat().st_size == 0:
        raise InputError(f"image file is empty (0 bytes): {p}")
    name = p.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        raise InputError(f"{p} is a 3D volume format; use the volume workflow for it")
    meta: dict[str, Any] = {}
    file_window = None
    if _is_dicom(p):
        pixels, file_window, meta = _read_dicom(p)
    elif p.suffix.lower() == ".npy":
        try:
            pixels = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot read {p} as a NumPy array: {exc}") from exc
    else:
        pixels = _read_pil(p)
    return image_from_array(pixels, window=window or file_window, path=str(p), metadata=meta)


def image_from_array(pixels: Any, window: Window | None = None, path: str | None = None,
                     metadata: dict | None = None) -> Image2D:
    """Wrap an in-memory array (H, W), (H, W, 1/2/3/4) as an Image2D, validating its shape."""
    a = np.asarray(pixels)
    where = path or "image array"
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise InputError(f"{where}: pixel type {a.dtype} is not numeric")
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4):
        raise InputError(
            f"{where}: shape {a.shape} looks like a 3D volume, not a 2D image; use the volume workflow"
        )
    if a.ndim not in (2, 3):
        raise InputError(f"{where}: expected a 2D image, got {a.ndim} dimensions {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"{where}: image has zero size {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise InputError(f"{where}: image is too small to segment {a.shape}")
    rgb, how = to_rgb_uint8(a, window)
    return Image2D(pixels=a, rgb=rgb, path=path, intensity=how, metadata=dict(metadata or {}))
