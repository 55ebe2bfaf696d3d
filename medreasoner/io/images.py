"""Read a 2D image from disk (PNG/JPEG/TIFF/BMP, 2D DICOM, .npy) with clear errors.

Always refused: images with more pixels than PIL's decompression-bomb limit (checked from the header,
before any pixel is decoded). Refused with ``check_content=True``, which every input a model answers
about must use (``engine.session.read_image``): all-NaN or constant images (``check_not_blank``, the
same helper and words as for volumes) and images with a side under ``MIN_IMAGE_SIDE`` pixels. Off by
default because the dataset readers load masks and background slices, which may be blank, through here.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import VOLUME_SUFFIXES
from medreasoner.errors import InputError
from medreasoner.imaging.intensity import (
    Window,
    check_not_blank,
    check_window_shows_data,
    nonfinite_warning,
    to_rgb_uint8,
)
from medreasoner.io.files import check_input_path, looks_like_dicom

log = logging.getLogger(__name__)

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
    warnings: list[str] = field(default_factory=list)  # for the result record's ``warnings``

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


# EXIF Orientation values a viewer applies (1 is "as stored"); ImageOps.exif_transpose does the same.
_EXIF_ORIENTATION = 0x0112
_TIFF_PHOTOMETRIC, _TIFF_BITS = 262, 258
_MIN_IS_WHITE = 0


def _pil_inverted(im: Any) -> bool:
    """Whether PIL's decoder already inverts the pixels (rawmodes such as 'L;I', '1;IR', 'L;4I')."""
    for tile in getattr(im, "tile", None) or ():
        raw = tile[3][0] if len(tile) > 3 and tile[3] else None
        if isinstance(raw, str) and ";" in raw and raw.split(";")[-1].rstrip("R").endswith("I"):
            return True
    return False


def _min_is_white(im: Any) -> int | None:
    """For a MinIsWhite TIFF the bits per sample we must invert at (0: PIL's decoder already did, as it
    does for 1-8 bit); None for anything else. Read before decoding: ``tile`` is gone after."""
    tags = getattr(im, "tag_v2", None)
    if im.format != "TIFF" or tags is None or tags.get(_TIFF_PHOTOMETRIC) != _MIN_IS_WHITE:
        return None
    if _pil_inverted(im):
        return 0
    bits = tags.get(_TIFF_BITS, (8,))
    return int(bits[0] if isinstance(bits, (tuple, list)) else bits)


def invert_min_is_white(arr: np.ndarray, bits: int) -> np.ndarray:
    """MinIsWhite pixels as a viewer shows them: integers mirrored within their bit depth, floats
    within their finite range (there is no nominal maximum)."""
    if np.issubdtype(arr.dtype, np.integer):
        top = (1 << bits) - 1 if 0 < bits <= 32 else int(np.iinfo(arr.dtype).max)
        return (top - arr.astype(np.int64)).clip(0, top).astype(arr.dtype)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return arr
    return (float(finite.max()) + float(finite.min()) - arr).astype(arr.dtype)


def _orient(im: Any, orientation: Any) -> tuple[Any, list[str]]:
    """The image on the grid a viewer displays: the EXIF/TIFF Orientation (read before decoding, as
    PIL's TIFF decoder applies and drops it itself) applied, so masks read this way follow it too."""
    from PIL import ImageOps

    if orientation not in range(2, 9):  # absent, 1 (as stored) or invalid: nothing a viewer would do
        return im, []
    # a no-op where the decoder already turned the pixels (it deleted the tag when it did)
    return ImageOps.exif_transpose(im), [f"EXIF orientation {orientation} applied"]


def _read_pil(path: Path) -> tuple[np.ndarray, list[str]]:
    """Pixels as a viewer shows them, and notes of what that took (orientation, MinIsWhite, ...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            check_pixel_count(im.width, im.height, str(path))  # Image.open read the header only
            if getattr(im, "n_frames", 1) > 1:
                raise InputError(f"{path} has {im.n_frames} frames; give a single 2D image")
            min_is_white = _min_is_white(im)
            orientation = im.getexif().get(_EXIF_ORIENTATION)
            notes = [] if min_is_white is None else ["TIFF MinIsWhite inverted for display"]
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            im, oriented = _orient(im, orientation)
            arr = np.asarray(im)
            if min_is_white:
                arr = invert_min_is_white(arr, min_is_white)
            return arr, oriented + notes
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


@dataclass
class _Read:
    """What a reader hands ``image_from_array``: pixels, the file's window, how they must be shown."""

    pixels: np.ndarray
    window: Window | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    invert_display: bool = False  # MONOCHROME1: inverted after windowing, as a viewer does


def _dicom_window(ds: Any) -> Window | None:
    wc, ww = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if wc is None or ww is None:
        return None
    try:
        window = Window(_first_number(wc), _first_number(ww))
    except (TypeError, ValueError, IndexError):
        return None
    return window if window.width > 0 else None


def _apply_color_lut(arr: np.ndarray, ds: Any) -> np.ndarray:
    try:
        from pydicom.pixels import apply_color_lut  # pydicom >= 3
    except ImportError:  # pragma: no cover - depends on the installed pydicom
        from pydicom.pixel_data_handlers.util import apply_color_lut
    return apply_color_lut(arr, ds)


def palette_to_rgb(arr: np.ndarray, ds: Any, where: str) -> tuple[np.ndarray, str]:
    """PALETTE COLOR indices through the file's lookup table to 8-bit RGB, as a viewer shows them."""
    try:
        rgb = np.asarray(_apply_color_lut(arr, ds))
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a broken LUT
        raise InputError(f"{where}: PALETTE COLOR image with an unusable colour lookup table ({exc})") from exc
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(f"{where}: PALETTE COLOR lookup gave shape {rgb.shape}, not one RGB image")
    note = "PALETTE COLOR mapped through its lookup table"
    if bits > 8 and int(rgb.max(initial=0)) <= 255:  # a known writer quirk: 8-bit entries in 16-bit words
        return rgb.astype(np.uint8), note + " (16-bit entries holding 8-bit values)"
    if bits > 8:
        return (rgb.astype(np.uint32) >> (bits - 8)).astype(np.uint8), note
    return rgb.astype(np.uint8), note


_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
          (b"BM", "BMP"), (b"\x93NUMPY", "NumPy .npy"))


def _looks_like(path: Path) -> str:
    """' (its bytes are a PNG image)' when the content is a known image format, else ''."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return ""
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    return f" (its bytes are a {kind} image; rename it)" if kind else ""


def _read_dicom(path: Path) -> _Read:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except pydicom.errors.InvalidDicomError as exc:  # its own text suggests force=True, a library option
        raise InputError(f"{path} is not a DICOM file{_looks_like(path)}: it has no DICOM header") from exc
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
    read = _Read(arr, metadata={
        "modality": str(getattr(ds, "Modality", "")),
        "photometric": photometric,
        "pixel_spacing": [float(v) for v in getattr(ds, "PixelSpacing", [])] or None,
    })
    if photometric.startswith("MONOCHROME"):
        # modality values (e.g. HU) stay the pixels; the window is in those units. MONOCHROME1 is
        # inverted only after windowing, so a stored or user window keeps its meaning.
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        read.pixels = arr.astype(np.float32) * slope + intercept
        read.window = _dicom_window(ds)
        if photometric == "MONOCHROME1":
            read.invert_display = True
            read.notes.append("MONOCHROME1 inverted for display")
    elif photometric == "PALETTE COLOR":
        read.pixels, note = palette_to_rgb(arr, ds, str(path))
        read.notes.append(note)
    elif photometric.startswith("YBR"):
        from pydicom.pixel_data_handlers.util import convert_color_space

        read.pixels = convert_color_space(arr, photometric, "RGB")
    return read


def _read_npy(p: Path) -> np.ndarray:
    try:
        mapped = np.load(p, allow_pickle=False, mmap_mode="r")  # the shape, before reading the data
        if mapped.ndim >= 2:
            check_pixel_count(mapped.shape[1], mapped.shape[0], str(p))
        pixels = np.array(mapped)
        del mapped
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot read {p} as a NumPy array: {exc}") from exc
    return pixels


def load_image(path: str | Path, window: Window | None = None, check_content: bool = False) -> Image2D:
    """Load one 2D image as a viewer shows it. ``window`` overrides any window stored in the file
    (e.g. DICOM); ``check_content`` as for ``image_from_array`` (True for model inputs)."""
    p = Path(path)
    st = check_input_path(p, "image file")  # symlink loops, FIFOs and devices named as such
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p} is a folder; give one 2D image file (DICOM series go to the volume workflow)")
    if st.st_size == 0:
        raise InputError(f"image file is empty (0 bytes): {p}")
    name = p.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        raise InputError(f"{p} is a 3D volume format; use the volume workflow for it")
    if _is_dicom(p):
        read = _read_dicom(p)
    elif p.suffix.lower() == ".npy":
        read = _Read(_read_npy(p))
    else:
        pixels, notes = _read_pil(p)
        read = _Read(pixels, notes=notes)
    return image_from_array(read.pixels, window=window or read.window, path=str(p), metadata=read.metadata,
                            check_content=check_content, notes=read.notes, invert_display=read.invert_display)


def _nonfinite_count(a: np.ndarray) -> int:
    return int(a.size - np.count_nonzero(np.isfinite(a))) if np.issubdtype(a.dtype, np.floating) else 0


def check_display_not_blank(rgb: np.ndarray, where: str) -> None:
    """Refuse an image whose 8-bit display (what the model gets) is one flat colour although its
    pixels vary (e.g. a window or a bit depth that folds them all to one grey)."""
    if (rgb == rgb.flat[0]).all():
        raise InputError(f"{where}: shown as 8-bit the image is one flat grey ({int(rgb.flat[0])}); "
                         "nothing to segment")


def image_from_array(pixels: Any, window: Window | None = None, path: str | None = None,
                     metadata: dict | None = None, check_content: bool = False,
                     notes: list[str] | tuple[str, ...] = (), invert_display: bool = False) -> Image2D:
    """Wrap an in-memory array (H, W), (H, W, 1/2/3/4) as an Image2D, validating its shape.

    ``check_content=True`` (for anything a model answers about) also refuses blank (constant/all-NaN)
    images, sides under ``MIN_IMAGE_SIDE``, windows that leave the image one grey level and images
    whose 8-bit display is blank although the pixels vary, as ``read_volume`` refuses blank volumes;
    masks and dataset slices, which may be blank, are read with the default False. ``notes`` (what the
    reader did to show the file as a viewer does) lead ``Image2D.intensity``; ``invert_display``
    inverts the 8-bit display after windowing (DICOM MONOCHROME1). NaN/inf pixels are counted in
    ``Image2D.warnings``."""
    a = np.asarray(pixels)
    where = path or "image array"
    if np.iscomplexobj(a):  # before any arithmetic: numpy would drop the imaginary part with a warning
        raise InputError(f"{where}: complex pixels ({a.dtype}); save the magnitude (np.abs) as a real image")
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
        lo, hi, _ = check_not_blank(a, where, "image", channels_last=a.ndim == 3)
        if window is not None and a.dtype != np.bool_ and (a.ndim == 2 or a.shape[-1] == 1):
            # grey only: colour ignores most windows; its blank displays are refused below
            check_window_shows_data(window, lo, hi, where)
    rgb, how = to_rgb_uint8(a, window, where)
    if invert_display:
        rgb = 255 - rgb
    if check_content:
        check_display_not_blank(rgb, where)
    warnings = []
    n_bad = _nonfinite_count(a)
    if n_bad:
        warnings.append(nonfinite_warning(n_bad))
        log.warning("%s: %s", where, warnings[-1])
    meta = dict(metadata or {})
    return Image2D(pixels=a, rgb=rgb, path=path, intensity="; ".join([*notes, how, *warnings]),
                   metadata=meta, warnings=warnings)
