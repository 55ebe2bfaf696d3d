"""Read a 2D image from disk (PNG/JPEG/TIFF/BMP, 2D DICOM, .npy) with clear errors.

Always refused: images with more pixels than PIL's decompression-bomb limit (checked from the header,
before any pixel is decoded). Refused with ``check_content=True``, which every input a model answers
about must use (``engine.session.read_image``): all-NaN or constant images (``check_not_blank``, the
same helper and words as for volumes) and images with a side under ``MIN_IMAGE_SIDE`` pixels. Off by
default because the dataset readers load masks and background slices, which may be blank, through here.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import VOLUME_SUFFIXES
from medreasoner.errors import InputError
from medreasoner.imaging.intensity import Window, check_not_blank, to_rgb_uint8
from medreasoner.io.files import check_input_path, looks_like_dicom

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}

# Smallest side (pixels) an image may have: the models see it resized to a large square, and a
# couple of pixels carry nothing to point at or segment.
MIN_IMAGE_SIDE = 8


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
    return looks_like_dicom(path)


def max_image_pixels() -> int | None:
    """The pixel-count limit for 2D inputs: PIL's decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``,
    89.5 Mpx by default, read live so raising PIL's setting raises ours; None: no limit). PIL only
    warns between 1x and 2x of it; we refuse from 1x, so no input gets near a multi-GB allocation."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def _too_many_pixels(width: int, height: int, where: str, frames: int = 1) -> str | None:
    limit = max_image_pixels()
    n = int(width) * int(height) * max(1, int(frames))
    if limit is None or n <= limit:
        return None
    size = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
    return (f"{where}: image is {size} = {n / 1e6:.0f} Mpx, above the {limit / 1e6:.0f} Mpx limit "
            "(a guard against decompression bombs); downsample it first")


def check_pixel_count(width: int, height: int, where: str, frames: int = 1) -> None:
    """Refuse an image whose header declares more pixels than ``max_image_pixels()``, before decoding."""
    message = _too_many_pixels(width, height, where, frames)
    if message:
        raise InputError(message)


def _declared_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image header without PIL's bomb check (which hides the size)."""
    from PIL import Image

    Image.init()
    try:
        with path.open("rb") as fp:
            prefix = fp.read(16)
            for fmt in Image.ID:
                factory, accept = Image.OPEN[fmt]
                ok = accept(prefix) if accept else True
                if not ok or isinstance(ok, str):
                    continue
                fp.seek(0)
                try:
                    w, h = factory(fp, str(path)).size
                    return int(w), int(h)
                except Exception:  # noqa: BLE001 - plugins raise many kinds on a foreign header
                    fp.seek(0)
    except OSError:
        return None
    return None


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            check_pixel_count(im.width, im.height, str(path))  # Image.open read the header only
            if getattr(im, "n_frames", 1) > 1:
                raise InputError(f"{path} has {im.n_frames} frames; give a single 2D image")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            return np.asarray(im)
    except InputError:  # ours (an InputError is a ValueError): not to be wrapped below
        raise
    except Image.DecompressionBombError as exc:  # above 2x the limit PIL refuses in Image.open itself
        size = _declared_size(path)
        message = _too_many_pixels(*size, str(path)) if size else None
        raise InputError(message or f"{path}: image has more pixels than the {max_image_pixels() / 1e6:.0f} "
                         "Mpx limit (a guard against decompression bombs); downsample it first") from exc
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
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
        raise InputError(f"cannot read {path} as DICOM: {exc}") from exc
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    check_pixel_count(cols, rows, str(path), int(getattr(ds, "NumberOfFrames", 1) or 1))  # before decoding
    try:
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


def load_image(path: str | Path, window: Window | None = None, check_content: bool = False) -> Image2D:
    """Load one 2D image. ``window`` overrides any window stored in the file (e.g. DICOM);
    ``check_content`` as for ``image_from_array`` (True for model inputs)."""
    p = Path(path)
    st = check_input_path(p, "image file")  # symlink loops, FIFOs and devices named as such
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p} is a folder; give one 2D image file (DICOM series go to the volume workflow)")
    if st.st_size == 0:
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
            mapped = np.load(p, allow_pickle=False, mmap_mode="r")  # the shape, before reading the data
            if mapped.ndim >= 2:
                check_pixel_count(mapped.shape[1], mapped.shape[0], str(p))
            pixels = np.array(mapped)
            del mapped
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot read {p} as a NumPy array: {exc}") from exc
    else:
        pixels = _read_pil(p)
    return image_from_array(pixels, window=window or file_window, path=str(p), metadata=meta,
                            check_content=check_content)


def image_from_array(pixels: Any, window: Window | None = None, path: str | None = None,
                     metadata: dict | None = None, check_content: bool = False) -> Image2D:
    """Wrap an in-memory array (H, W), (H, W, 1/2/3/4) as an Image2D, validating its shape.

    ``check_content=True`` (for anything a model answers about) also refuses blank (constant/all-NaN)
    images and sides under ``MIN_IMAGE_SIDE``, as ``read_volume`` refuses blank volumes; masks and
    dataset slices, which may be blank, are read with the default False."""
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
    if check_content:
        if a.shape[0] < MIN_IMAGE_SIDE or a.shape[1] < MIN_IMAGE_SIDE:
            raise InputError(f"{where}: image is too small to segment ({a.shape[1]}x{a.shape[0]} px; "
                             f"each side needs at least {MIN_IMAGE_SIDE} px)")
        check_not_blank(a, where, "image", channels_last=a.ndim == 3)
    rgb, how = to_rgb_uint8(a, window)
    return Image2D(pixels=a, rgb=rgb, path=path, intensity=how, metadata=dict(metadata or {}))
