"""Inputs that used to be read wrongly or with a misleading message, grouped by class. Each test
builds tiny data (a few 10x12 slices, 8^3 volumes, forged image headers) and uses no model.

1. DICOM series that are not a regular grid (missing slices, gantry tilt, unreadable members, several
   series in one folder); 2. NIfTI headers (sheared affine, no qform/sform, zero pixdim); 3. images a
   model cannot use (blank, tiny); 4. decompression bombs; 5. paths (symlink loops, FIFOs, devices,
   missing detached data files).
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medreasoner.errors import InputError
from medreasoner.io.images import MIN_IMAGE_SIDE, image_from_array, load_image
from medreasoner.io.volumes import read_volume, volume_from_image

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and symlink loops need POSIX")

ROWS, COLS = 10, 12
UID = "1.2.826.0.1.3680043.8.498.7"


# ------------------------------------------------------------------------------------- 1. DICOM series


def _write_series(folder: Path, positions, uid: str = UID + ".1", orientation=(1, 0, 0, 0, 1, 0),
                  description: str = "axial", prefix: str = "IM") -> list[Path]:
    """One CT slice per position (x, y, z) in LPS mm; slice k holds 100 * k + its pixel index."""
    from dicom_helpers import ct_slice_dataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, position in enumerate(positions):
        ds = ct_slice_dataset(UID, uid, UID + ".9", k + 1)
        ds.Modality, ds.PatientID, ds.SeriesDescription = "CT", "p1", description
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing, ds.SliceThickness = [0.6, 0.9], 3.0
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = (np.arange(ROWS * COLS, dtype=np.int16) + 100 * k).tobytes()
        path = folder / f"{prefix}{k:04d}.dcm"
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths


def _axial(zs, x=-30.0, y=-40.0):
    return [(x, y, float(z)) for z in zs]


def test_regular_series_reads_and_records_its_geometry(tmp_path):
    _write_series(tmp_path / "s", _axial([0, 3, 6, 9, 12, 15]))
    vol = read_volume(tmp_path / "s")
    assert vol.shape == (COLS, ROWS, 6) and vol.warnings == []
    np.testing.assert_allclose(vol.image.GetSpacing(), (0.9, 0.6, 3.0), atol=1e-6)
    assert vol.metadata["n_slices"] == 6 and vol.metadata["slice_spacing_mm"] == pytest.approx(3.0)
    assert vol.metadata["series_uid"] == UID + ".1" and vol.metadata["series_description"] == "axial"
    assert "other_series" not in vol.metadata


def test_missing_slice_is_refused_naming_the_gap(tmp_path):
    _write_series(tmp_path / "s", _axial([0, 3, 6, 12, 15]))  # the slice at 9 mm is missing
    with pytest.raises(InputError, match=r"irregular slice spacing: a gap of 6\.0 mm between slices 3 and 4 "
                                         r"\(IM0002\.dcm, IM0003\.dcm; expected 3\.0 mm\); missing slices\?"):
        read_volume(tmp_path / "s")


def test_uneven_spacing_within_tolerance_is_accepted(tmp_path):
    # positions written with rounding noise (< 1% of the spacing) are one regular grid
    _write_series(tmp_path / "s", _axial([0, 3.004, 5.998, 9.003, 12]))
    assert read_volume(tmp_path / "s").shape[2] == 5


def test_two_slices_at_one_position_are_refused(tmp_path):
    _write_series(tmp_path / "s", _axial([0, 3, 3, 6, 9]))
    with pytest.raises(InputError, match="several slices at one position"):
        read_volume(tmp_path / "s")


@pytest.mark.parametrize("form", ["shifted positions", "tilted orientation"])
def test_gantry_tilt_is_refused_with_its_angle(tmp_path, form):
    tilt = math.radians(15.0)
    if form == "shifted positions":  # axial image planes, each slice shifted further in-plane
        positions = [(-30.0, -40.0 + 3 * k * math.tan(tilt), 3.0 * k) for k in range(5)]
        orientation = (1, 0, 0, 0, 1, 0)
    else:  # what a tilted gantry writes: tilted image planes stacked along the table (z)
        positions = [(-30.0, -40.0, 3.0 * k) for k in range(5)]
        orientation = (1, 0, 0, 0, math.cos(tilt), math.sin(tilt))
    _write_series(tmp_path / "s", positions, orientation=orientation)
    with pytest.raises(InputError, match=r"gantry tilt of 15\.0 deg"):
        read_volume(tmp_path / "s")


def test_mixed_orientations_are_refused(tmp_path):
    paths = _write_series(tmp_path / "s", _axial([0, 3, 6]))
    _write_series(tmp_path / "tmp", [(-30.0, -40.0, 9.0)], orientation=(1, 0, 0, 0, 0, -1))
    shutil.move(str(tmp_path / "tmp" / "IM0000.dcm"), str(paths[0].parent / "IM0003.dcm"))
    with pytest.raises(InputError, match="mixes slice orientations"):
        read_volume(tmp_path / "s")


@pytest.mark.parametrize("damage", ["header cut", "pixels cut", "zero bytes"])
def test_unreadable_member_fails_the_read_naming_it(tmp_path, damage):
    paths = _write_series(tmp_path / "s", _axial([0, 3, 6, 9, 12, 15]))
    data = paths[2].read_bytes()
    cut = {"header cut": data[:200], "pixels cut": data[:-50], "zero bytes": b""}[damage]
    paths[2].write_bytes(cut)
    # before: the file was dropped and the 5 others read with a 3.75 mm spacing, status ok
    with pytest.raises(InputError, match=r"cannot read IM0002\.dcm in the DICOM folder .*damaged or truncated"):
        read_volume(tmp_path / "s")


def test_preamble_without_dcm_suffix_counts_as_dicom(tmp_path):
    paths = _write_series(tmp_path / "s", _axial([0, 3, 6, 9]))
    paths[1].rename(paths[1].with_suffix(""))  # "IM0001": still DICOM by its DICM preamble
    assert read_volume(tmp_path / "s").shape[2] == 4
    damaged = paths[1].with_suffix("")
    damaged.write_bytes(damaged.read_bytes()[:300])
    with pytest.raises(InputError, match="IM0001 in the DICOM folder"):
        read_volume(tmp_path / "s")


@posix_only
def test_non_dicom_entries_never_change_the_slices(tmp_path):
    _write_series(tmp_path / "s", _axial([0, 3, 6, 9, 12, 15]))
    clean = read_volume(tmp_path / "s")
    folder = tmp_path / "s"
    (folder / "README.txt").write_text("exported by a PACS")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(200))
    (folder / "._IM0001.dcm").write_bytes(b"\0\5\26\7" + bytes(200))  # macOS AppleDouble next to a slice
    (folder / "thumbs").mkdir()
    _write_series(folder / "thumbs", _axial([0]), uid=UID + ".99")  # sub-folders are not searched
    os.mkfifo(folder / "pipe")  # GDCM's own scan returned a single slice with this present
    os.symlink(folder / "nowhere", folder / "loop")
    vol = read_volume(folder)
    assert vol.image.GetSize() == clean.image.GetSize() == (COLS, ROWS, 6)
    assert vol.image.GetSpacing() == clean.image.GetSpacing()
    np.testing.assert_array_equal(vol.array, clean.array)
    assert vol.warnings == [] and vol.metadata["n_series_in_folder"] == 1
    # and every entry that was not read is named in the record, so a reader can check it
    assert vol.metadata["ignored_files"] == [".DS_Store", "._IM0001.dcm", "README.txt", "loop", "pipe", "thumbs/"]
    assert vol.metadata["n_ignored_files"] == 6


def test_non_image_dicom_objects_are_skipped_and_listed(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    _write_series(tmp_path / "s", _axial([0, 3, 6]))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = Dataset()
    sr.file_meta = meta
    sr.is_little_endian, sr.is_implicit_VR = True, False
    sr.SOPClassUID, sr.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    sr.SeriesInstanceUID, sr.Modality = UID + ".50", "SR"
    sr.save_as(str(tmp_path / "s" / "report.dcm"), write_like_original=False)
    vol = read_volume(tmp_path / "s")
    assert vol.shape[2] == 3 and vol.metadata["skipped_non_image_files"] == ["report.dcm"]


def test_two_series_pick_the_larger_and_record_both(tmp_path):
    folder = tmp_path / "s"
    _write_series(folder, _axial([0, 3, 6, 9, 12, 15]), uid=UID + ".600", description="soft tissue", prefix="A")
    _write_series(folder, _axial([0, 5, 10]), uid=UID + ".300", description="scout", prefix="B")
    vol = read_volume(folder)
    meta = vol.metadata
    assert meta["series_uid"] == UID + ".600" and meta["series_description"] == "soft tissue"
    assert meta["n_slices"] == 6 and meta["n_series_in_folder"] == 2
    assert meta["other_series"] == [{"series_uid": UID + ".300", "series_description": "scout", "n_files": 3}]
    assert len(vol.warnings) == 1 and UID + ".300" in vol.warnings[0] and "'scout'" in vol.warnings[0]
    assert vol.shape[2] == 6


def test_two_series_of_equal_size_are_refused_listing_both(tmp_path):
    folder = tmp_path / "s"
    _write_series(folder, _axial([0, 3, 6, 9]), uid=UID + ".1", description="soft tissue", prefix="A")
    _write_series(folder, _axial([0, 3, 6, 9]), uid=UID + ".2", description="bone kernel", prefix="B")
    with pytest.raises(InputError, match=r"2 DICOM series with 4 images each: .*\.1 \('soft tissue'.*"
                                         r"\.2 \('bone kernel'.*folder of its own"):
        read_volume(folder)


# ----------------------------------------------------------------------------------------- 2. NIfTI


def _nifti_data() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, (8, 9, 10)).astype(np.int16)


def test_sheared_affine_is_refused_naming_the_angle(tmp_path):
    affine = np.eye(4)
    affine[0, 1] = 0.1  # the j axis leans towards i: 84.3 deg between them
    nib.save(nib.Nifti1Image(_nifti_data(), affine), str(tmp_path / "shear.nii.gz"))
    assert nib.load(str(tmp_path / "shear.nii.gz")).shape == (8, 9, 10)  # intact: nibabel reads it
    with pytest.raises(InputError, match=r"affine of .*shear\.nii\.gz is sheared \(its axes are not "
                                         r"perpendicular: 84\.3 deg\).*resample it first"):
        read_volume(tmp_path / "shear.nii.gz")


def test_sheared_sform_with_a_qform_is_read_from_the_qform_and_said(tmp_path):
    img = nib.Nifti1Image(_nifti_data(), None)
    sheared = np.diag([2.0, 2, 2, 1])
    sheared[0, 1] = 0.5
    img.header.set_qform(np.diag([2.0, 2, 2, 1]), code=1)
    img.header.set_sform(sheared, code=2)
    nib.save(img, str(tmp_path / "qs.nii.gz"))
    vol = read_volume(tmp_path / "qs.nii.gz")
    assert vol.metadata["repairs"] == ["sheared sform (76.0 deg between axes) ignored: the qform was used"]
    assert any("sform is sheared" in w for w in vol.warnings)


def _nifti_without_geometry(path: Path, pixdim=(0.0, 0.0, 0.0)) -> None:
    img = nib.Nifti1Image(_nifti_data(), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1..3]; nibabel's writer would "fix" zeros
    path.write_bytes(bytes(raw))


def test_no_qform_no_sform_zero_pixdim_is_read_with_recorded_repairs(tmp_path):
    path = tmp_path / "bare.nii"
    _nifti_without_geometry(path)
    vol = read_volume(path)
    assert vol.metadata["repairs"] == ["no qform/sform: orientation unknown, identity assumed", "pixdim 0 -> 1 mm"]
    assert vol.image.GetSpacing() == (1.0, 1.0, 1.0)
    assert vol.image.GetDirection() == tuple(np.eye(3).ravel())
    assert len(vol.warnings) == 2
    assert "orientation is unknown" in vol.warnings[0] and "1 mm assumed" in vol.warnings[1]


def test_no_qform_no_sform_with_pixdims_repairs_only_the_orientation(tmp_path):
    path = tmp_path / "bare.nii"
    _nifti_without_geometry(path, pixdim=(0.7, 0.8, 0.0))
    vol = read_volume(path)
    assert vol.metadata["repairs"] == ["no qform/sform: orientation unknown, identity assumed",
                                       "pixdim 0 -> 1 mm (axis k)"]
    np.testing.assert_allclose(vol.image.GetSpacing(), (0.7, 0.8, 1.0), rtol=1e-6)


def test_normal_nifti_has_no_repairs(tmp_path):
    nib.save(nib.Nifti1Image(_nifti_data(), np.diag([0.7, 0.8, 2.0, 1.0])), str(tmp_path / "ok.nii.gz"))
    vol = read_volume(tmp_path / "ok.nii.gz")
    assert "repairs" not in vol.metadata and vol.warnings == []


# --------------------------------------------------------------------------- 3. images a model cannot use


def _volume(values: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(values)


@pytest.mark.parametrize("values,what", [
    (np.zeros((16, 16), np.uint8), "every pixel is 0"),
    (np.full((16, 16), 7, np.int16), "every pixel is 7"),
    (np.full((16, 16), np.nan, np.float32), "no finite pixels"),
    (np.dstack([np.full((16, 16), c, np.uint8) for c in (10, 20, 30)]), r"same value \(10, 20, 30\)"),
])
def test_blank_2d_images_are_refused_like_blank_volumes(values, what):
    with pytest.raises(InputError, match=rf"^image array: image is empty/constant \(.*{what}.*\); nothing to segment$"):
        image_from_array(values, check_content=True)
    if values.ndim == 2:  # the same data as a volume: the same helper, the same words
        with pytest.raises(InputError, match=r"^volume: volume is empty/constant \(.*\); nothing to segment$"):
            volume_from_image(_volume(np.stack([values] * 4)))


def test_blank_png_file_is_refused_naming_it(tmp_path):
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(InputError, match=r"black\.png: image is empty/constant \(every pixel is 0\)"):
        load_image(tmp_path / "black.png", check_content=True)
    assert load_image(tmp_path / "black.png").pixels.max() == 0  # masks / dataset slices may be blank


@pytest.mark.parametrize("shape", [(2, 2), (MIN_IMAGE_SIDE - 1, 40), (40, MIN_IMAGE_SIDE - 1, 3)])
def test_tiny_images_are_refused(shape):
    values = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    with pytest.raises(InputError, match=rf"too small to segment .*at least {MIN_IMAGE_SIDE} px"):
        image_from_array(values, check_content=True)


def test_smallest_allowed_image_and_a_varying_alpha_pass():
    values = np.random.default_rng(0).integers(0, 255, (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), dtype=np.uint8)
    assert image_from_array(values, check_content=True).width == MIN_IMAGE_SIDE
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = np.arange(16, dtype=np.uint8)[None, :] * 16  # one colour, varying transparency
    assert image_from_array(rgba, check_content=True).rgb.shape == (16, 16, 3)


# ---------------------------------------------------------------------------------- 4. decompression bombs


def _png_header_only(width: int, height: int) -> bytes:
    """A grey PNG declaring width x height, with almost no data: Image.open reads the header only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side,mpx", [(30000, 900), (10000, 100)])  # above PIL's error / warning thresholds
def test_decompression_bomb_png_is_refused_stating_the_limit(tmp_path, side, mpx):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(InputError, match=rf"bomb\.png: image is {side}x{side} = {mpx} Mpx, above the 89 Mpx limit"):
        load_image(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_applies_to_every_2d_reader(tmp_path, monkeypatch, ct_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    values = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", values)
    for path in (tmp_path / "a.png", tmp_path / "a.npy"):
        with pytest.raises(InputError, match=r"40x40 = 0 Mpx, above the 0 Mpx limit"):
            load_image(path)
    with pytest.raises(InputError, match=r"128x128 = 0 Mpx, above"):  # a 2D DICOM, before decoding
        load_image(ct_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert load_image(tmp_path / "a.png").width == 40


# ------------------------------------------------------------------------------------------------ 5. paths


@posix_only
def test_symlink_loop_is_named(tmp_path):
    os.symlink(tmp_path / "b.nii.gz", tmp_path / "a.nii.gz")
    os.symlink(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    with pytest.raises(InputError, match=r"a\.nii\.gz is a symlink loop"):
        read_volume(tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match=r"a\.nii\.gz is a symlink loop"):
        load_image(tmp_path / "a.nii.gz")


@posix_only
def test_dangling_symlink_says_where_it_points(tmp_path):
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    with pytest.raises(InputError, match=r"not found: .*link\.png is a symlink to .*gone\.png, which does not exist"):
        load_image(tmp_path / "link.png")


@posix_only
@pytest.mark.timeout(20)  # opening a FIFO would block: the check must come first
def test_fifo_and_device_are_not_regular_files(tmp_path):
    os.mkfifo(tmp_path / "pipe.nii.gz")
    with pytest.raises(InputError, match=r"pipe\.nii\.gz is not a regular file \(it is a named pipe"):
        read_volume(tmp_path / "pipe.nii.gz")
    with pytest.raises(InputError, match=r"pipe\.nii\.gz is not a regular file"):
        load_image(tmp_path / "pipe.nii.gz")
    if os.path.exists("/dev/null"):
        with pytest.raises(InputError, match=r"/dev/null is not a regular file \(it is a device\)"):
            load_image("/dev/null")


@pytest.mark.parametrize("header", ["vol.nhdr", "vol.mhd"])
def test_detached_header_without_its_data_file(tmp_path, header):
    values = np.random.default_rng(0).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / header))
    assert read_volume(tmp_path / header).shape == (8, 7, 6)
    data = next(p for p in tmp_path.iterdir() if p.suffix in (".raw", ".zraw", ".gz"))
    data.unlink()
    with pytest.raises(InputError, match=rf"the data file {data.name} named by the header is missing"):
        read_volume(tmp_path / header)


@pytest.mark.parametrize("make", [lambda: np.zeros((16, 16)), lambda: np.full((16, 16), 7.0),
                                  lambda: np.full((16, 16), np.nan), lambda: np.arange(4.0).reshape(2, 2)])
def test_the_session_refuses_images_no_model_can_use(make):
    """What every front end reads through (CLI, bundle, MONAI Label, worker): refused like volumes are."""
    from medreasoner.engine.session import read_image

    with pytest.raises(InputError, match="empty/constant|too small"):
        read_image(make())
