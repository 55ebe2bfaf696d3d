"""2D inputs are read as a viewer shows them; what that took is recorded, contradictions are refused."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file

from medreasoner.errors import InputError
from medreasoner.imaging.intensity import Window, check_window_shows_data, parse_window, to_rgb_uint8
from medreasoner.io.images import image_from_array, load_image


def _scene(h: int = 24, w: int = 40) -> np.ndarray:
    """Grey noise with a bright block in the top-left corner of the stored pixels."""
    a = (np.random.default_rng(0).random((h, w)) * 30 + 20).astype(np.uint8)
    a[2:8, 3:12] = 230
    return a


def _viewer(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


# -- 1. EXIF / TIFF orientation ---------------------------------------------------------------------


@pytest.mark.parametrize("name,orientation,kwargs", [
    ("o6.jpg", 6, {"quality": 95}),
    ("o8.png", 8, {}),
])
def test_exif_orientation_is_applied_and_recorded(tmp_path, name, orientation, kwargs):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / name
    Image.fromarray(_scene()).convert("RGB").save(path, exif=exif.tobytes(), **kwargs)
    im = load_image(path, check_content=True)
    assert (im.width, im.height) == (24, 40)  # rotated a quarter turn, as a viewer shows it
    assert np.array_equal(im.rgb, _viewer(path))
    assert f"EXIF orientation {orientation} applied" in im.intensity


def test_tiff_orientation_tag_is_applied_to_pixels_too(tmp_path):
    path = tmp_path / "o3.tif"
    Image.fromarray(_scene()).save(path, tiffinfo={274: 3})
    im = load_image(path)
    assert np.array_equal(im.rgb, _viewer(path))
    assert np.array_equal(im.pixels, _scene()[::-1, ::-1])  # a mask read this way is on the displayed grid
    assert "EXIF orientation 3 applied" in im.intensity


# -- 2. content only in the alpha channel -----------------------------------------------------------


def test_black_strokes_on_transparency_are_shown_on_white(tmp_path):
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[4:28, 20:23, 3] = 255
    rgba[10:12, 5:40, 3] = 128
    path = tmp_path / "lineart.png"
    Image.fromarray(rgba, "RGBA").save(path)
    im = load_image(path, check_content=True)
    with Image.open(path) as src:  # a viewer on a light canvas
        on_white = np.asarray(Image.alpha_composite(Image.new("RGBA", src.size, "white"), src).convert("RGB"))
    assert np.abs(im.rgb.astype(int) - on_white).max() <= 1
    assert "alpha composited on white" in im.intensity and "only in the alpha" in im.intensity


def test_a_display_folded_to_one_grey_is_refused():
    f = np.full((16, 16, 3), 0.5, np.float32)
    f[0, 0] = 0.5001  # the pixels vary, their 8-bit display does not
    with pytest.raises(InputError, match="shown as 8-bit the image is one flat grey"):
        image_from_array(f, check_content=True)


def test_varying_colour_with_alpha_is_composited_and_kept(tmp_path):
    rgba = np.dstack([np.stack([_scene()] * 3, -1), np.full((24, 40), 128, np.uint8)])
    im = image_from_array(rgba, check_content=True)
    assert "alpha composited on black" in im.intensity and im.rgb.max() > im.rgb.min()


# -- 3. NaN / inf pixels ----------------------------------------------------------------------------


def _float_scene() -> np.ndarray:
    f = np.tile(np.linspace(0, 100, 40, dtype=np.float32), (24, 1))
    f[0, 0], f[0, 1], f[0, 2] = np.nan, np.inf, -np.inf
    return f


@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_nonfinite_pixels_are_shown_as_a_viewer_would_and_recorded(tmp_path, suffix):
    path = tmp_path / f"f{suffix}"
    if suffix == ".npy":
        np.save(path, _float_scene())
    else:
        Image.fromarray(_float_scene(), "F").save(path)
    im = load_image(path, check_content=True)
    assert im.rgb[0, :3, 0].tolist() == [0, 255, 0]  # NaN -> minimum, +inf -> maximum, -inf -> minimum
    note = "3 pixel(s) are NaN or infinite"
    assert any(note in w for w in im.warnings) and note in im.intensity


def test_reader_warnings_reach_the_result_record(tmp_path, litemedsam):
    """What the reader noticed (NaN/inf pixels) is in the record's warnings, as for volumes."""
    from doubles import BrightestRegionCRM

    from medreasoner.engine import Session
    from medreasoner.models.loading import ModelOptions, load_models

    path = tmp_path / "f.npy"
    scene = _float_scene()
    np.save(path, scene)
    session = Session(load_models(ModelOptions(asm="litemedsam"), crm=BrightestRegionCRM(), asm=litemedsam))
    record = session.ground_image(str(path), "Where is the bright region?").to_record()
    assert any("3 pixel(s) are NaN or infinite" in w for w in record["warnings"])


def test_nonfinite_pixels_under_a_window():
    out, _ = to_rgb_uint8(_float_scene(), Window(50, 20))
    assert out[0, :3, 0].tolist() == [0, 255, 0]


# -- 4. complex pixels ------------------------------------------------------------------------------


def test_complex_npy_is_refused_without_numpy_warnings(tmp_path):
    path = tmp_path / "c.npy"
    g = _scene().astype(np.float32)
    np.save(path, (g + 1j * g[::-1]).astype(np.complex64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ComplexWarning would fail the test
        with pytest.raises(InputError, match="complex pixels.*save the magnitude"):
            load_image(path, check_content=True)


# -- 5. integer colour outside 0..255 ---------------------------------------------------------------


def test_signed_colour_with_negatives_is_refused_not_wrapped(tmp_path):
    path = tmp_path / "neg.npy"
    np.save(path, np.stack([_scene().astype(np.int16) - 100] * 3, -1))
    with pytest.raises(InputError, match=r"colour pixels are negative \(min -80\)"):
        load_image(path, check_content=True)


def test_colour_wider_than_16_bits_is_refused():
    a = np.stack([_scene().astype(np.int32) * 1000] * 3, -1)
    with pytest.raises(InputError, match="exceed 16 bits"):
        image_from_array(a)


def test_integer_colour_scaling_is_explicit_and_recorded():
    small = np.stack([_scene().astype(np.int16)] * 3, -1)
    im = image_from_array(small)
    assert np.array_equal(im.rgb[..., 0], _scene()) and "int16 colour in 0..255 taken as 8-bit" in im.intensity
    wide = np.stack([_scene().astype(np.uint16) * 257] * 3, -1)
    im = image_from_array(wide)
    assert np.array_equal(im.rgb[..., 0], _scene()) and "16-bit colour to 8-bit" in im.intensity


# -- 6. TIFF MinIsWhite -----------------------------------------------------------------------------


def test_16bit_min_is_white_tiff_is_inverted(tmp_path):
    stored = _scene().astype(np.uint16) * 200
    path = tmp_path / "mw16.tif"
    Image.fromarray(stored).save(path, tiffinfo={262: 0})
    im = load_image(path, check_content=True)
    assert np.array_equal(im.pixels, 65535 - stored)  # 0 is white: the bright block is dark
    assert im.rgb[4, 5, 0] < im.rgb[20, 30, 0]
    assert "TIFF MinIsWhite inverted for display" in im.intensity


def test_8bit_min_is_white_tiff_is_inverted_once(tmp_path):
    path = tmp_path / "mw8.tif"
    Image.fromarray(_scene()).save(path, tiffinfo={262: 0})
    with Image.open(path) as raw:
        shown = np.asarray(raw)  # PIL's decoder inverts 8-bit MinIsWhite itself
    im = load_image(path)
    assert np.array_equal(im.rgb[..., 0], shown) and "TIFF MinIsWhite inverted for display" in im.intensity


# -- 7. DICOM MONOCHROME1 with a window -------------------------------------------------------------


def _mono1(tmp_path, **tags):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds = copy.deepcopy(ds)
    ds.PhotometricInterpretation = "MONOCHROME1"
    for key, value in tags.items():
        setattr(ds, key, value)
    path = tmp_path / "m1.dcm"
    ds.save_as(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return path, hu


def _viewer_mono1(hu: np.ndarray, window: Window) -> np.ndarray:
    shown = np.rint(np.clip((hu - window.low) / window.width, 0, 1) * 255)
    return (255 - shown).astype(np.uint8)  # modality values -> window -> invert


def test_monochrome1_stored_window_is_applied_before_inverting(tmp_path):
    path, hu = _mono1(tmp_path, WindowCenter=40, WindowWidth=400)
    im = load_image(path, check_content=True)
    assert np.abs(im.rgb[..., 0].astype(int) - _viewer_mono1(hu, Window(40, 400))).max() <= 1
    assert "MONOCHROME1 inverted for display" in im.intensity
    assert np.allclose(im.pixels, hu)  # the pixels keep their modality values (HU)


def test_monochrome1_user_window_is_in_modality_units(tmp_path):
    path, hu = _mono1(tmp_path)
    im = load_image(path, window=Window(100, 600), check_content=True)
    assert np.abs(im.rgb[..., 0].astype(int) - _viewer_mono1(hu, Window(100, 600))).max() <= 1


# -- 8. DICOM PALETTE COLOR -------------------------------------------------------------------------


def _palette(tmp_path, lut: np.ndarray | None = None):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    arr = ds.pixel_array.astype(np.float32)
    arr = ((arr - arr.min()) / (arr.max() - arr.min()) * 255).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation, ds.PixelData = "PALETTE COLOR", arr.tobytes()
    lut = (255 - np.arange(256)).astype(np.uint16) * 257 if lut is None else lut
    for c in ("Red", "Green", "Blue"):
        setattr(ds, f"{c}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds[f"{c}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{c}PaletteColorLookupTableData", lut.tobytes())
        ds[f"{c}PaletteColorLookupTableData"].VR = "OW"
    for tag in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if tag in ds:
            delattr(ds, tag)
    path = tmp_path / "palette.dcm"
    ds.save_as(path)
    return path, arr


def test_palette_colour_dicom_goes_through_its_lookup_table(tmp_path):
    path, indices = _palette(tmp_path)
    im = load_image(path, check_content=True)
    assert np.array_equal(im.rgb, np.stack([255 - indices] * 3, -1))  # the LUT inverts: index i -> 255 - i
    assert "PALETTE COLOR mapped through its lookup table" in im.intensity


def test_palette_colour_dicom_with_a_broken_lut_is_refused(tmp_path):
    path, _ = _palette(tmp_path, lut=np.arange(7, dtype=np.uint16))  # 7 entries, 256 declared
    with pytest.raises(InputError, match="PALETTE COLOR"):
        load_image(path)


# -- 9. parse_window --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1.2.3,400", ".,400", "40,.", "40,", "abc"])
def test_malformed_windows_are_input_errors(text):
    with pytest.raises(InputError, match="unknown window"):
        parse_window(text)


def test_negative_window_width_says_it_must_be_positive():
    with pytest.raises(InputError, match="width must be a positive number"):
        parse_window("40,-400")


@pytest.mark.parametrize("text,expected", [("40,400", Window(40, 400)), ("-600/1500", Window(-600, 1500)),
                                           (".5,1e3", Window(0.5, 1000)), ("+40 400", Window(40, 400))])
def test_well_formed_windows(text, expected):
    assert parse_window(text) == expected


# -- 10. a window that leaves the picture one grey ---------------------------------------------------


def test_check_window_shows_data_pure():
    check_window_shows_data(Window(40, 400), -1000.0, 1000.0)
    with pytest.raises(InputError, match=r"window -100000±0.5 lies outside the data range -1000..-48; "
                                         "every pixel would be the same"):
        check_window_shows_data(Window(-1e5, 1), -1000.0, -48.0)
    with pytest.raises(InputError, match="lies outside"):
        check_window_shows_data(Window(5000, 100), -1000.0, -48.0, "ct.dcm")
    with pytest.raises(InputError, match="too wide"):
        check_window_shows_data(Window(0, 1e9), 0.0, 1.0)
    check_window_shows_data(Window(0, 10), None, None)  # no finite data: left to the blank check


def test_window_outside_the_data_is_refused_for_a_2d_input(ct_path):
    with pytest.raises(InputError, match=r"window -100000±0.5 lies outside the data range .*every pixel"):
        load_image(ct_path, window=parse_window("-1e5,1"), check_content=True)
    load_image(ct_path, window=parse_window("-1e5,1"))  # masks/dataset slices are not judged


def test_check_volume_window_for_the_3d_caller():
    import SimpleITK as sitk

    from medreasoner.imaging.windowing import check_volume_window
    from medreasoner.io.volumes import volume_from_image

    values = np.linspace(-1000, -48, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    vol = volume_from_image(sitk.GetImageFromArray(values), path="ct.nii.gz", modality="CT")
    check_volume_window(vol, Window(-500, 400))
    check_volume_window(vol, None)
    with pytest.raises(InputError, match=r"ct.nii.gz: window -100000±0.5 lies outside the data range -1000..-48"):
        check_volume_window(vol, parse_window("-1e5,1"))


def test_a_user_window_that_shows_nothing_of_a_volume_is_refused(tmp_path, litemedsam):
    import nibabel as nib
    from doubles import BrightestRegionCRM

    from medreasoner.engine import RunOptions, Session
    from medreasoner.models.loading import ModelOptions, load_models

    vol = np.full((24, 24, 6), -1000, np.int16)
    vol[6:18, 6:18, :] = 40
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    session = Session(load_models(ModelOptions(asm="litemedsam"), crm=BrightestRegionCRM(), asm=litemedsam))
    with pytest.raises(InputError, match="lies outside the data range"):
        session.ground_volume(str(path), "Where is the lesion?", RunOptions(window="-100000,1"))


def test_an_image_named_dcm_says_what_it_is(tmp_path):
    path = tmp_path / "scan.dcm"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(path, format="PNG")
    with pytest.raises(InputError, match=r"is not a DICOM file \(its bytes are a PNG image; rename it\)") as exc:
        load_image(path)
    assert "force=True" not in str(exc.value)
