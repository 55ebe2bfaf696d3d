"""3D volume headers that used to be read wrongly or silently, from a QA probe. Each test builds a tiny
volume (8x9x10 voxels, a few 10x12 DICOM slices) in tmp_path and calls the loader only (no model).

1. sheared NRRD / MetaImage directions; 2. NIfTI qform and sform that disagree; 3. Analyze files and
4. NRRD / MetaImage headers without directions (orientation unknown, recorded); 5. DICOM slices of
different sizes or pixel spacings; 6. per-slice (PET-like) rescale slopes; 7. MONOCHROME1 series;
8. no ITK/nibabel chatter on stderr; 9. negative NIfTI pixdim.
"""

from __future__ import annotations

import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medreasoner.errors import InputError
from medreasoner.io.volumes import read_volume

ROWS, COLS = 10, 12
UID = "1.2.826.0.1.3680043.8.498.77"
UNKNOWN = "orientation unknown"  # what makes the writer claim no orientation (engine/writer.py)


def _values() -> np.ndarray:
    """(x, y, z) = (8, 9, 10) int16 voxels."""
    return np.random.default_rng(0).integers(-1000, 1000, (8, 9, 10)).astype(np.int16)


def _zyx(xyz: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(xyz, (2, 1, 0)))


def _write_nrrd(path: Path, fields: dict[str, str]) -> np.ndarray:
    """A raw little-endian int16 NRRD with the given header fields (as a hand-made or foreign tool writes
    them); returns the (x, y, z) voxels."""
    xyz = _values()
    head = ["NRRD0004", "type: int16", "dimension: 3", "sizes: 8 9 10", "endian: little", "encoding: raw"]
    head += [f"{k}: {v}" for k, v in fields.items()]
    path.write_bytes(("\n".join(head) + "\n\n").encode() + _zyx(xyz).astype("<i2").tobytes())
    return xyz


def _write_mha(path: Path, lines: list[str]) -> np.ndarray:
    xyz = _values()
    head = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
            *lines, "DimSize = 8 9 10", "ElementType = MET_SHORT", "ElementDataFile = LOCAL"]
    path.write_bytes(("\n".join(head) + "\n").encode() + _zyx(xyz).astype("<i2").tobytes())
    return xyz


# ---------------------------------------------------------------------- 1. sheared NRRD / MetaImage


def test_sheared_nrrd_is_refused_naming_the_angle(tmp_path):
    path = tmp_path / "sheared.nrrd"
    _write_nrrd(path, {"space": "left-posterior-superior", "space directions": "(4,0,0) (2,4,0) (0,0,4)",
                       "space origin": "(0,0,0)"})
    with pytest.raises(InputError, match=r"the NRRD space directions of .*sheared\.nrrd are sheared \(the voxel "
                                         r"axes are not perpendicular: 63\.4 deg\).*resample it first"):
        read_volume(path)


def test_sheared_metaimage_is_refused_naming_the_angle(tmp_path):
    path = tmp_path / "sheared.mha"
    _write_mha(path, ["TransformMatrix = 1 0 0 0.5 1 0 0 0 1", "Offset = 0 0 0", "ElementSpacing = 4 4 4"])
    with pytest.raises(InputError, match=r"the MetaImage TransformMatrix of .*sheared\.mha is sheared \(the "
                                         r"voxel axes are not perpendicular: 63\.4 deg\)"):
        read_volume(path)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_oblique_orthogonal_nrrd_and_metaimage_are_read_exactly(tmp_path, suffix):
    """The shear check must not refuse a rotated (oblique) grid: it is read as written, nothing recorded."""
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    img = sitk.GetImageFromArray(_zyx(_values()))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(img, str(tmp_path / f"oblique{suffix}"))
    vol = read_volume(tmp_path / f"oblique{suffix}")
    np.testing.assert_allclose(vol.image.GetDirection(), direction.ravel(), atol=1e-6)
    np.testing.assert_array_equal(vol.array, _zyx(_values()))
    assert "repairs" not in vol.metadata and vol.warnings == []


# ------------------------------------------------------------------------- 2. qform / sform disagree


def _nifti_with_forms(path: Path, qform: np.ndarray, sform: np.ndarray) -> None:
    img = nib.Nifti1Image(_values(), None)
    img.header.set_sform(sform, code=2)
    img.header.set_qform(qform, code=1)
    nib.save(img, str(path))


AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])


def test_qform_and_sform_mirrored_are_refused(tmp_path):
    flipped = AFFINE.copy()
    flipped[0, :] *= -1  # the qform puts patient left where the sform puts right
    _nifti_with_forms(tmp_path / "qs.nii.gz", flipped, AFFINE)
    # corner (7, 8, 9): x = -2 * 7 + 90 = 76 vs -76; corner 0: 90 vs -90: up to 180 mm apart
    with pytest.raises(InputError, match=r"the qform and sform of .*qs\.nii\.gz disagree \(left-right flipped, "
                                         r"up to 180\.0 mm apart\), so viewers that use the other one would show "
                                         r"the mask mirrored; fix the header with one of them"):
        read_volume(tmp_path / "qs.nii.gz")


def test_qform_and_sform_shifted_are_refused(tmp_path):
    shifted = AFFINE.copy()
    shifted[:3, 3] += (3.0, 4.0, 0.0)
    _nifti_with_forms(tmp_path / "qs.nii", shifted, AFFINE)
    with pytest.raises(InputError, match=r"disagree \(up to 5\.0 mm apart\).*show the mask misplaced"):
        read_volume(tmp_path / "qs.nii")


def test_qform_and_sform_that_agree_are_read(tmp_path):
    nearly = AFFINE.copy()
    nearly[:3, 3] += 0.05  # a rounding-size difference (< 0.1 voxel) is agreement
    _nifti_with_forms(tmp_path / "qs.nii.gz", nearly, AFFINE)
    vol = read_volume(tmp_path / "qs.nii.gz")
    assert "repairs" not in vol.metadata and vol.warnings == []
    np.testing.assert_allclose(vol.image.GetSpacing(), (2, 2, 2))
    np.testing.assert_array_equal(vol.array, _zyx(_values()))


# ------------------------------------------------------------------ 3. Analyze, 4. no NRRD directions


@pytest.mark.parametrize("name", ["brain.hdr", "brain.img"])
def test_analyze_is_read_with_orientation_unknown_recorded(tmp_path, name):
    nib.save(nib.AnalyzeImage(_values(), np.diag([0.7, 0.8, 2.5, 1.0])), str(tmp_path / "brain.hdr"))
    vol = read_volume(tmp_path / name)
    assert vol.metadata["repairs"] == ["Analyze header: orientation unknown, identity assumed"]
    assert vol.metadata["format"] == "Analyze"
    assert len(vol.warnings) == 1 and "Analyze 7.5" in vol.warnings[0] and "orientation is unknown" in vol.warnings[0]
    assert vol.image.GetDirection() == tuple(np.eye(3).ravel())
    np.testing.assert_allclose(vol.image.GetSpacing(), (0.7, 0.8, 2.5), rtol=1e-6)
    np.testing.assert_array_equal(vol.array, _zyx(np.asarray(nib.load(str(tmp_path / "brain.hdr")).dataobj)))


def test_nifti_pair_keeps_its_orientation(tmp_path):
    """A .hdr/.img pair with the NIfTI magic is NIfTI, not Analyze: its qform/sform are used."""
    nib.save(nib.Nifti1Pair(_values(), AFFINE), str(tmp_path / "pair.hdr"))
    vol = read_volume(tmp_path / "pair.hdr")
    assert "repairs" not in vol.metadata and vol.metadata["format"] == "NIfTI pair"
    np.testing.assert_allclose(vol.image.GetDirection(), np.diag([1.0, -1, 1]).ravel())  # RAS -> LPS


def test_nrrd_without_space_directions_records_orientation_unknown(tmp_path):
    path = tmp_path / "nospace.nrrd"
    xyz = _write_nrrd(path, {"spacings": "0.7 0.8 2.5"})
    vol = read_volume(path)
    assert vol.metadata["repairs"] == [f"no space directions: {UNKNOWN}, identity assumed"]
    assert len(vol.warnings) == 1 and "orientation is unknown" in vol.warnings[0]
    assert vol.image.GetDirection() == tuple(np.eye(3).ravel())
    np.testing.assert_allclose(vol.image.GetSpacing(), (0.7, 0.8, 2.5))
    np.testing.assert_array_equal(vol.array, _zyx(xyz))


def test_nrrd_without_any_geometry_records_both_repairs(tmp_path):
    _write_nrrd(tmp_path / "bare.nrrd", {})
    vol = read_volume(tmp_path / "bare.nrrd")
    assert vol.metadata["repairs"] == [f"no space directions: {UNKNOWN}, identity assumed", "no spacings -> 1 mm"]
    assert vol.image.GetSpacing() == (1.0, 1.0, 1.0)


def test_nrrd_directions_without_a_patient_space_record_orientation_unknown(tmp_path):
    _write_nrrd(tmp_path / "nopatient.nrrd", {"space dimension": "3",
                                              "space directions": "(0.7,0,0) (0,0.8,0) (0,0,2.5)"})
    vol = read_volume(tmp_path / "nopatient.nrrd")
    assert vol.metadata["repairs"] == [f"no space: {UNKNOWN}, directions read as patient LPS"]
    np.testing.assert_allclose(vol.image.GetSpacing(), (0.7, 0.8, 2.5))


def test_metaimage_without_transform_records_orientation_unknown(tmp_path):
    xyz = _write_mha(tmp_path / "plain.mha", ["ElementSpacing = 0.7 0.8 2.5"])
    vol = read_volume(tmp_path / "plain.mha")
    assert vol.metadata["repairs"] == [f"no TransformMatrix: {UNKNOWN}, identity assumed"]
    np.testing.assert_allclose(vol.image.GetSpacing(), (0.7, 0.8, 2.5))
    np.testing.assert_array_equal(vol.array, _zyx(xyz))
    _write_mha(tmp_path / "bare.mha", [])
    assert read_volume(tmp_path / "bare.mha").metadata["repairs"] == [
        f"no TransformMatrix: {UNKNOWN}, identity assumed", "no ElementSpacing -> 1 mm"]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nhdr", ".mhd"])
def test_simpleitk_written_headers_need_no_repair(tmp_path, suffix):
    img = sitk.GetImageFromArray(_zyx(_values()))
    img.SetDirection((-1.0, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    vol = read_volume(tmp_path / f"v{suffix}")
    assert "repairs" not in vol.metadata and vol.warnings == []
    assert vol.image.GetDirection() == (-1.0, 0, 0, 0, -1, 0, 0, 0, 1)


# ---------------------------------------------------------------------------------- 5-7. DICOM series


def _write_series(folder: Path, n: int = 5, edit=None) -> list[Path]:
    """n axial CT slices 3 mm apart; ``edit(k, ds, pixels)`` may change slice k and return new pixels."""
    from dicom_helpers import ct_slice_dataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = ct_slice_dataset(UID, UID + ".1", UID + ".9", k + 1)
        ds.Modality, ds.PatientID = "CT", "p1"
        ds.ImagePositionPatient = [-30.0, -40.0, 3.0 * k]
        ds.ImageOrientationPatient = [1.0, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.6, 0.9], 3.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        pixels = (np.arange(ROWS * COLS, dtype=np.int16) + 100 * k).reshape(ROWS, COLS)
        if edit is not None:
            pixels = edit(k, ds, pixels)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.astype(np.int16).tobytes()
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths


def _pydicom_modality_values(paths: list[Path]) -> np.ndarray:
    """What a viewer's modality LUT gives: each slice's stored values * its slope + its intercept."""
    import pydicom

    out = []
    for p in paths:
        ds = pydicom.dcmread(str(p))
        out.append(ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(out)


def test_slice_with_a_different_pixel_spacing_is_refused_naming_it(tmp_path):
    def edit(k, ds, pixels):
        if k == 2:
            ds.PixelSpacing = [2.0, 2.0]
        return pixels

    _write_series(tmp_path / "s", edit=edit)
    with pytest.raises(InputError, match=r"IM0002\.dcm has PixelSpacing 2\.0 x 2\.0 mm but the other slices "
                                         r"\(e\.g\. IM0000\.dcm\) have 0\.6 x 0\.9 mm, so they do not form one "
                                         r"grid; remove IM0002\.dcm"):
        read_volume(tmp_path / "s")


@pytest.mark.parametrize("shape", [(ROWS + 1, COLS), (ROWS, COLS - 2)])
def test_slice_with_different_rows_or_columns_is_refused_naming_it(tmp_path, shape):
    def edit(k, ds, pixels):
        return np.zeros(shape, np.int16) if k == 3 else pixels

    _write_series(tmp_path / "s", edit=edit)
    with pytest.raises(InputError, match=rf"IM0003\.dcm is {shape[1]} x {shape[0]} pixels \(Columns x Rows\) but "
                                         rf"the other slices \(e\.g\. IM0000\.dcm\) are {COLS} x {ROWS}"):
        read_volume(tmp_path / "s")


def test_per_slice_fractional_slopes_keep_every_value(tmp_path):
    """PET-like: slice 0 has slope 1 (an integer pixel type for ITK), the others fractional slopes; every
    slice must keep its own rescaled values, as pydicom gives them."""
    rng = np.random.default_rng(1)

    def edit(k, ds, pixels):
        ds.Modality = "PT"
        ds.RescaleSlope, ds.RescaleIntercept = (1.0 if k == 0 else f"{0.000347 * (k + 1):.6g}"), 0
        return rng.integers(0, 32767, (ROWS, COLS)).astype(np.int16)

    paths = _write_series(tmp_path / "pet", edit=edit)
    vol = read_volume(tmp_path / "pet")
    ref = _pydicom_modality_values(paths)
    assert vol.array.dtype == np.float64
    np.testing.assert_allclose(vol.array, ref, rtol=1e-12, atol=0)
    assert len(np.unique(vol.array)) == len(np.unique(ref))
    assert "repairs" not in vol.metadata and vol.warnings == []


def test_per_slice_integer_intercepts_are_exact(tmp_path):
    """Unsigned stored values, the first slice without an offset: ITK alone gives uint16 (the first slice's
    type) and wraps every other slice's negative values by 65536."""
    def edit(k, ds, pixels):
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024.0 if k else 0.0
        return pixels

    paths = _write_series(tmp_path / "s", edit=edit)
    vol = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, _pydicom_modality_values(paths))


def test_uniform_integer_rescale_keeps_an_integer_pixel_type(tmp_path):
    paths = _write_series(tmp_path / "s")
    vol = read_volume(tmp_path / "s")
    assert np.issubdtype(vol.array.dtype, np.integer)
    np.testing.assert_array_equal(vol.array, _pydicom_modality_values(paths))


def test_monochrome1_series_is_refused(tmp_path):
    def edit(k, ds, pixels):
        ds.PhotometricInterpretation = "MONOCHROME1"
        return pixels

    _write_series(tmp_path / "s", edit=edit)
    with pytest.raises(InputError, match=r"IM0000\.dcm in the DICOM series .* is MONOCHROME1 \(an inverted grey "
                                         r"scale.*convert it to MONOCHROME2 or NIfTI first"):
        read_volume(tmp_path / "s")


# ------------------------------------------------------------------------------ 8. stderr stays clean


def test_no_itk_or_nibabel_chatter_on_stderr(tmp_path, capfd):
    """``--progress json`` promises JSON-only stderr lines: ITK's C++ warnings (here NiftiImageIO's Analyze
    deprecation) and nibabel's own header messages must not reach stderr; the repairs record them."""
    nib.save(nib.AnalyzeImage(_values(), np.eye(4)), str(tmp_path / "old.hdr"))
    _negative_pixdim_nifti(tmp_path / "neg.nii")
    capfd.readouterr()
    assert read_volume(tmp_path / "old.hdr").metadata["repairs"]
    assert read_volume(tmp_path / "neg.nii").metadata["repairs"]
    err = capfd.readouterr().err
    assert "WARNING: In" not in err and "deprecated" not in err and "should be positive" not in err, err


# --------------------------------------------------------------------------------- 9. negative pixdim


def _negative_pixdim_nifti(path: Path) -> None:
    img = nib.Nifti1Image(_values(), None)
    img.header.set_qform(np.diag([4.0, 4, 4, 1]), code=1)
    img.header.set_sform(None, code=0)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[80:84] = struct.pack("<f", -4.0)  # pixdim[1]; nibabel's writer would fix it
    path.write_bytes(bytes(raw))


def test_negative_pixdim_uses_its_magnitude(tmp_path):
    path = tmp_path / "neg.nii"
    _negative_pixdim_nifti(path)
    vol = read_volume(path)
    assert vol.metadata["repairs"] == ["pixdim -4 -> 4 mm (axis i)"]
    assert len(vol.warnings) == 1 and "negative voxel size" in vol.warnings[0] and "(4 mm)" in vol.warnings[0]
    np.testing.assert_allclose(vol.image.GetSpacing(), nib.load(str(path)).header.get_zooms()[:3])
    np.testing.assert_allclose(vol.image.GetSpacing(), (4.0, 4.0, 4.0))


def _declared(tmp_path, name: str, dims: tuple[int, int, int]) -> Path:
    """A 4x4x4 int16 NIfTI whose header then claims ``dims``: a few hundred bytes on disk."""
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, *dims, 1, 1, 1, 1)
    path.write_bytes(bytes(raw))
    return path


def test_a_header_declaring_a_huge_volume_is_refused_before_anything_is_allocated(tmp_path):
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(InputError, match=r"declares 512x512x30000 = 7,864,320,000 voxels; at most 1,073,741,824"):
        read_volume(_declared(tmp_path, "huge.nii", (512, 512, 30000)))
    assert tracemalloc.get_traced_memory()[1] < 50 << 20  # nothing like the 15 GB the header asks for
    tracemalloc.stop()


def test_a_short_uncompressed_nifti_is_refused_from_its_size(tmp_path):
    with pytest.raises(InputError, match=r"truncated \(480 of the 157,286,752 bytes its header declares\)"):
        read_volume(_declared(tmp_path, "short.nii", (512, 512, 300)))
