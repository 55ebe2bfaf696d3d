"""Every kind of 2D image reaches the models as 8-bit RGB; bad files get clear errors."""

import numpy as np
import pytest
from PIL import Image

from medreasoner.errors import InputError
from medreasoner.imaging.intensity import Window, to_rgb_uint8
from medreasoner.io.images import image_from_array, load_image


def _save(tmp_path, name, arr, mode=None):
    p = tmp_path / name
    Image.fromarray(arr, mode=mode).save(p) if mode else Image.fromarray(arr).save(p)
    return p


def test_8bit_grey_png(tmp_path, rng):
    a = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    im = load_image(_save(tmp_path, "g.png", a))
    assert im.rgb.shape == (30, 40, 3) and im.rgb.dtype == np.uint8
    assert (im.rgb[..., 0] == a).all() and (im.rgb[..., 2] == a).all()


def test_16bit_grey_png_uses_full_range(tmp_path):
    a = np.tile(np.linspace(1000, 40000, 64).astype(np.uint16), (16, 1))
    im = load_image(_save(tmp_path, "g16.png", a))
    assert im.pixels.max() > 255  # the original 16-bit values are kept
    assert im.rgb.min() == 0 and im.rgb.max() == 255
    assert np.all(np.diff(im.rgb[0, :, 0].astype(int)) >= 0)  # monotone mapping


def test_rgb_and_rgba(tmp_path, rng):
    rgb = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    assert (load_image(_save(tmp_path, "c.png", rgb)).rgb == rgb).all()
    rgba = np.dstack([rgb, np.full((20, 20), 255, np.uint8)])
    im = load_image(_save(tmp_path, "a.png", rgba))
    assert (im.rgb == rgb).all() and "alpha" in im.intensity
    rgba[..., 3] = 0
    assert load_image(_save(tmp_path, "t.png", rgba)).rgb.max() == 0  # fully transparent -> black


def test_float_images():
    f01 = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    out, _ = to_rgb_uint8(np.dstack([f01] * 3))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    hu = np.linspace(-1000, 1000, 100, dtype=np.float32).reshape(10, 10)
    out, how = to_rgb_uint8(hu, Window(40, 400))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and "window" in how
    nan = hu.copy()
    nan[0, 0] = np.nan
    out, _ = to_rgb_uint8(nan)
    assert out.dtype == np.uint8


def test_dicom_ct_is_read_with_hounsfield_units(ct_path):
    im = load_image(ct_path)
    assert im.metadata["modality"] == "CT"
    assert im.pixels.min() < -500  # rescale slope/intercept applied: air is around -1000 HU
    assert im.rgb.shape == (128, 128, 3)
    windowed = load_image(ct_path, window=Window(40, 400))
    assert "window center 40" in windowed.intensity


def _file(d, name, data):
    (d / name).write_bytes(data)
    return d / name


@pytest.mark.parametrize("maker,expected", [
    (lambda d: d / "missing.png", "not found"),
    (lambda d: d, "is a folder"),
    (lambda d: _file(d, "empty.png", b""), "empty"),
    (lambda d: _file(d, "notes.png", b"not an image at all"), "cannot read"),
    (lambda d: _file(d, "fake.dcm", b"\0" * 128 + b"DICM" + b"junk"), "DICOM"),
    (lambda d: _file(d, "vol.nii.gz", b"x"), "volume"),
])
def test_bad_files(tmp_path, maker, expected):
    with pytest.raises(InputError, match=expected):
        load_image(maker(tmp_path))


@pytest.mark.parametrize("arr,expected", [
    (np.zeros((0, 10)), "zero size"),
    (np.zeros((10, 10, 20)), "3D volume"),
    (np.zeros((2, 3, 4, 5)), "2D image"),
    (np.array([["a"]]), "not numeric"),
])
def test_bad_arrays(arr, expected):
    with pytest.raises(InputError, match=expected):
        image_from_array(arr)
