"""3D volume I/O: geometry kept exactly, radiological display orientation, DICOM series, windowing,
Slicer .seg.nrrd output and clear errors for bad input. All volumes are tiny and built in the test."""

from __future__ import annotations

import logging
import math
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medreasoner.errors import InputError
from medreasoner.imaging.display import AXES, display_stack
from medreasoner.imaging.intensity import WINDOW_PRESETS, Window
from medreasoner.imaging.windowing import choose_window, intensity_range, slice_to_rgb
from medreasoner.io.segmentation import write_segmentation
from medreasoner.io.volumes import Volume, read_volume, volume_from_image

SIZE = (20, 16, 12)  # SimpleITK (x, y, z)
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-12.5, 30.25, 101.0)


def _rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


# Direction matrices (columns = physical LPS direction of voxel axes i, j, k).
DIRECTIONS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    # coronal acquisition: i -> patient left, j -> inferior, k -> posterior
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),
    # sagittal acquisition: i -> posterior, j -> inferior, k -> patient right
    "sagittal": np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]]),
    "oblique": _rot_x(20) @ _rot_y(20),
}


def _image(values_zyx: np.ndarray, direction: np.ndarray, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    img = sitk.GetImageFromArray(values_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    return img


def _coded_volume(direction: np.ndarray) -> sitk.Image:
    """int16 CT-like volume whose voxel (i, j, k) holds i + nx * (j + ny * k) - 1000."""
    nx, ny, nz = SIZE
    codes = np.arange(nx * ny * nz, dtype=np.int32).reshape(nz, ny, nx)
    return _image((codes - 1000).astype(np.int16), direction)


def _decode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nx, ny, _ = SIZE
    code = values.astype(np.int64) + 1000
    return code % nx, (code // nx) % ny, code // (nx * ny)


def _assert_same_grid(a: sitk.Image, b: sitk.Image, atol: float = 0.0) -> None:
    assert a.GetSize() == b.GetSize()
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        if atol == 0.0:
            assert get(a) == get(b), get.__name__
        else:
            np.testing.assert_allclose(get(a), get(b), atol=atol, rtol=0, err_msg=get.__name__)


# ------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dname", ["lps", "ras", "coronal", "oblique"])
def test_geometry_round_trip_and_masks_hit_the_right_voxels(tmp_path, suffix, dname):
    original = _coded_volume(DIRECTIONS[dname])
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(original, str(path))
    vol = read_volume(path)
    assert vol.modality == "CT" and vol.warnings == []
    assert vol.shape == SIZE and vol.nbytes == int(np.prod(SIZE)) * 2
    # NIfTI stores geometry as float32; the other formats keep it to full precision.
    _assert_same_grid(vol.image, original, atol=1e-5 if suffix == ".nii.gz" else 1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(vol.image), sitk.GetArrayViewFromImage(original))

    rng = np.random.default_rng(len(dname) * 7 + len(suffix))
    picked = rng.choice(int(np.prod(SIZE)), size=40, replace=False)
    wanted = {(int(c % SIZE[0]), int(c // SIZE[0] % SIZE[1]), int(c // (SIZE[0] * SIZE[1]))) for c in picked}
    wanted_values = picked - 1000

    for axis in AXES:
        stack = display_stack(vol, axis)
        rows, cols = stack.slice_shape
        assert len(stack) * rows * cols == int(np.prod(SIZE))
        # slices are views of the volume buffer, not copies
        assert np.shares_memory(stack.raw(0), vol.array)
        assert stack.raw(0).dtype == np.int16 and stack.raw(0).shape == (rows, cols)

        masks = np.stack([np.isin(stack.raw(i), wanted_values) for i in range(len(stack))])
        assert masks.sum() == len(wanted)  # every voxel shows up exactly once
        out = stack.to_volume_mask(masks)
        _assert_same_grid(out, vol.image)  # exactly the input volume's grid
        assert out.GetPixelID() == sitk.sitkUInt8
        k, j, i = np.nonzero(sitk.GetArrayViewFromImage(out))
        assert set(zip(i.tolist(), j.tolist(), k.tolist())) == wanted
        assert set(np.unique(sitk.GetArrayViewFromImage(out)).tolist()) == {0, 1}

        # dict form: only some slices
        some = {s: masks[s] for s in range(0, len(stack), 2)}
        part = sitk.GetArrayFromImage(stack.to_volume_mask(some))
        expected_part = {w for w in wanted if stack_slice_of(stack, w) % 2 == 0}
        k, j, i = np.nonzero(part)
        assert set(zip(i.tolist(), j.tolist(), k.tolist())) == expected_part

        # index_in_volume: every voxel of display slice s lies at that index along the sliced grid axis
        for s in (0, len(stack) // 2, len(stack) - 1):
            along = _decode(stack.raw(s))[stack.volume_axis]
            assert np.all(along == stack.index_in_volume(s))
        # the pixel spacing is that of the grid axes along rows / columns
        pixel_axes = _grid_axes_of_rows_cols(stack)
        assert stack.pixel_spacing == tuple(vol.image.GetSpacing()[a] for a in pixel_axes)


def stack_slice_of(stack, voxel) -> int:
    """Display slice index holding voxel (i, j, k), found by search (independent of the implementation)."""
    value = voxel[0] + SIZE[0] * (voxel[1] + SIZE[1] * voxel[2]) - 1000
    hits = [s for s in range(len(stack)) if (stack.raw(s) == value).any()]
    assert len(hits) == 1
    return hits[0]


def _grid_axes_of_rows_cols(stack) -> tuple[int, int]:
    raw = stack.raw(0)
    idx = _decode(raw)
    row_axis = next(a for a in range(3) if raw.shape[0] > 1 and idx[a][1, 0] != idx[a][0, 0])
    col_axis = next(a for a in range(3) if raw.shape[1] > 1 and idx[a][0, 1] != idx[a][0, 0])
    return row_axis, col_axis


def test_geometry_preserved_for_float_volume_with_nan_free_values(tmp_path):
    """A float MR-like volume keeps dtype and grid; the mask has the grid of the input, not of the display."""
    rng = np.random.default_rng(3)
    img = _image(rng.uniform(0, 500, SIZE[::-1]).astype(np.float32), DIRECTIONS["sagittal"])
    sitk.WriteImage(img, str(tmp_path / "mr.nrrd"))
    vol = read_volume(tmp_path / "mr.nrrd")
    assert vol.modality == "MR"
    stack = display_stack(vol, "coronal")
    assert stack.raw(0).dtype == np.float32
    mask = stack.to_volume_mask(np.ones((len(stack), *stack.slice_shape), bool))
    _assert_same_grid(mask, img)
    assert sitk.GetArrayViewFromImage(mask).all()


# -------------------------------------------------------------------------------------- orientation


def _blob_volume(direction: np.ndarray) -> Volume:
    """Bright ball at the patient's left, anterior, superior (LPS +x, -y, +z) of a volume centred on 0."""
    size = np.array([20, 18, 16])
    spacing = np.array([1.0, 1.1, 1.2])
    d = np.asarray(direction, float)
    origin = -d @ (spacing * (size - 1) / 2.0)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(float)  # (z, y, x, 3) voxel indices (i, j, k)
    phys = origin + (idx * spacing) @ d.T
    target = np.array([5.0, -5.0, 4.0])
    values = np.where(np.linalg.norm(phys - target, axis=-1) < 2.6, 1000, -1000).astype(np.int16)
    return volume_from_image(_image(values, d, spacing=tuple(spacing), origin=tuple(origin)))


def _blob_position(stack) -> tuple[float, float, float]:
    """(slice fraction, row fraction, col fraction) of the blob's centre in the display stack."""
    counts = [(stack.raw(s) > 0).sum() for s in range(len(stack))]
    s = int(np.argmax(counts))
    rows, cols = np.nonzero(stack.raw(s) > 0)
    n_rows, n_cols = stack.slice_shape
    return (s + 0.5) / len(stack), (rows.mean() + 0.5) / n_rows, (cols.mean() + 0.5) / n_cols


@pytest.mark.parametrize("dname", list(DIRECTIONS))
def test_radiological_display_orientation(dname):
    vol = _blob_volume(DIRECTIONS[dname])
    sl, row, col = _blob_position(display_stack(vol, "axial"))
    assert col > 0.5 and row < 0.5 and sl > 0.5  # patient left on image right, anterior up; superior slices last
    sl, row, col = _blob_position(display_stack(vol, "coronal"))
    assert col > 0.5 and row < 0.5 and sl < 0.5  # left on the right, superior up; anterior slices first
    sl, row, col = _blob_position(display_stack(vol, "sagittal"))
    assert col < 0.5 and row < 0.5 and sl > 0.5  # anterior on the left, superior up; left slices last


def test_orientation_survives_nifti_round_trip(tmp_path):
    vol = _blob_volume(DIRECTIONS["ras"])
    sitk.WriteImage(vol.image, str(tmp_path / "blob.nii.gz"))
    back = read_volume(tmp_path / "blob.nii.gz")
    _, row, col = _blob_position(display_stack(back, "axial"))
    assert col > 0.5 and row < 0.5


# ----------------------------------------------------------------------------------------------- DICOM


def _write_ct_series(folder, n_slices, series_uid, rows=10, cols=12, slope=2.0, intercept=-1024.0):
    from dicom_helpers import ct_slice_dataset

    study = "1.2.826.0.1.3680043.8.498.1"
    stored = []
    order = list(range(n_slices))[::-1]  # file names in reverse anatomical order
    for n, k in enumerate(order):
        pixels = (np.arange(rows * cols, dtype=np.int16).reshape(rows, cols) + 100 * k).astype(np.int16)
        stored.append((k, pixels))
        ds = ct_slice_dataset(study, series_uid, study + ".9", k + 1)
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Volume", "vol001"
        ds.SeriesDescription = f"series {n_slices}"
        ds.ImagePositionPatient = [-30.0, -40.0, 100.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.6, 0.9]  # row spacing (y), column spacing (x)
        ds.SliceThickness = 2.5
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = pixels.tobytes()
        ds.save_as(str(folder / f"IM{n:04d}_{series_uid[-3:]}.dcm"), write_like_original=False)
    return dict(stored)


def test_dicom_series_folder(tmp_path, caplog):
    folder = tmp_path / "series"
    folder.mkdir()
    stored = _write_ct_series(folder, 6, "1.2.826.0.1.3680043.8.498.2.600")
    _write_ct_series(folder, 3, "1.2.826.0.1.3680043.8.498.2.300")  # a smaller second series
    (folder / "notes.txt").write_text("not DICOM")
    with caplog.at_level(logging.INFO, logger="medreasoner.io.volumes"):
        vol = read_volume(folder)
    assert vol.modality == "CT"
    assert vol.metadata["series_uid"].endswith(".600") and vol.metadata["n_series_in_folder"] == 2
    assert any(".600" in r.getMessage() and "most files" in r.getMessage() for r in caplog.records)
    img = vol.image
    assert img.GetSize() == (12, 10, 6)
    np.testing.assert_allclose(img.GetSpacing(), (0.9, 0.6, 2.5), atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), (-30.0, -40.0, 100.0), atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    arr = sitk.GetArrayViewFromImage(img)
    for k in range(6):  # HU = stored * slope + intercept, slices sorted by position
        np.testing.assert_array_equal(arr[k], stored[k].astype(np.float64) * 2.0 - 1024.0)
    assert choose_window(vol) == WINDOW_PRESETS["abdomen"]
    stack = display_stack(vol, "axial")
    assert len(stack) == 6 and stack.slice_shape == (10, 12) and stack.pixel_spacing == pytest.approx((0.6, 0.9))


# -------------------------------------------------------------------------------------------- real data


def test_mni152_template_reads_as_mr(tmp_path):
    from nilearn import datasets

    nii = datasets.load_mni152_template(resolution=2)
    path = tmp_path / "mni152.nii.gz"
    nib.save(nii, str(path))
    vol = read_volume(path)
    assert vol.modality == "MR"
    assert vol.shape == tuple(nii.shape)
    assert choose_window(vol, "enhancing lesion in the brain") is None
    data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    nz = data[(data != 0) & np.isfinite(data)]
    lo, hi = intensity_range(vol, None)
    np.testing.assert_allclose((lo, hi), np.percentile(nz, [0.5, 99.5]), rtol=1e-5, atol=1e-6)
    assert 0 < lo < hi
    axial = display_stack(vol, "axial")
    x, y, z = vol.shape
    assert len(axial) == z and axial.slice_shape == (y, x)
    assert display_stack(vol, "coronal").slice_shape == (z, x)
    assert display_stack(vol, "sagittal").slice_shape == (z, y)
    rgb = slice_to_rgb(axial.raw(len(axial) // 2), lo, hi)
    assert rgb.shape == (y, x, 3) and rgb.dtype == np.uint8 and rgb.max() == 255
    # superior up in the coronal view: the top rows above the head are empty, the middle is brain
    cor = display_stack(vol, "coronal").raw(len(display_stack(vol, "coronal")) // 2)
    assert cor[:3].max() == 0 and cor[z // 2].max() > 0


# -------------------------------------------------------------------------------------------- windowing


def test_window_choice():
    ct = volume_from_image(_coded_volume(np.eye(3)))
    assert ct.modality == "CT"
    assert choose_window(ct) == Window(40, 400)
    assert choose_window(ct, "Which region explains the shortness of breath?") == WINDOW_PRESETS["lung"]
    assert choose_window(ct, "Where is the pulmonary nodule?") == WINDOW_PRESETS["lung"]
    assert choose_window(ct, "Find the fracture") == WINDOW_PRESETS["bone"]
    assert choose_window(ct, "The patient had a stroke") == WINDOW_PRESETS["brain"]
    assert choose_window(ct, "Dilated aorta?") == WINDOW_PRESETS["mediastinum"]
    assert choose_window(ct, "Describe the liver lesion") == WINDOW_PRESETS["abdomen"]  # 'describe' is no rib
    assert choose_window(ct, "fracture", window="lung") == WINDOW_PRESETS["lung"]  # override wins
    assert choose_window(ct, window=(50, 350)) == Window(50, 350)
    assert choose_window(ct, window=Window(1, 2)) == Window(1, 2)
    assert choose_window(ct, window="Bone") == WINDOW_PRESETS["bone"]
    assert choose_window(ct, window="40,400") == Window(40, 400)
    with pytest.raises(InputError, match="abdomen.*lung.*brain"):
        choose_window(ct, window="liver")
    with pytest.raises(InputError, match="width"):
        choose_window(ct, window=(40, 0))
    assert intensity_range(ct, WINDOW_PRESETS["lung"]) == (-1350.0, 150.0)

    mr = volume_from_image(_image(np.arange(960, dtype=np.float32).reshape(6, 10, 16), np.eye(3)))
    assert mr.modality == "MR"
    assert choose_window(mr, "shortness of breath") is None
    assert choose_window(mr, window="brain") == WINDOW_PRESETS["brain"]


def test_slice_to_rgb():
    raw = np.array([[-1000, 40, 240], [np.nan, np.inf, -np.inf]], dtype=np.float32)
    rgb = slice_to_rgb(raw, -160.0, 240.0)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [0, 128, 255]
    assert rgb[1, :, 0].tolist() == [0, 255, 0]  # NaN, -inf -> window minimum; +inf -> maximum (as in 2D)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_intensity_range_subsamples_large_volumes(monkeypatch):
    import medreasoner.io.volumes as volumes

    rng = np.random.default_rng(1)
    values = rng.normal(100, 20, (40, 50, 60)).astype(np.float32)
    values[:, :5] = 0  # zeros are ignored
    vol = volume_from_image(_image(values, np.eye(3)))
    exact = intensity_range(vol, None)
    nz = values[values != 0]
    np.testing.assert_allclose(exact, np.percentile(nz, [0.5, 99.5]), rtol=1e-6)
    monkeypatch.setattr(volumes, "_SAMPLE_VOXELS", 10_000)
    approx = intensity_range(vol, None)
    np.testing.assert_allclose(approx, exact, rtol=0.05)


# ----------------------------------------------------------------------------------------- segmentation


def _header_fields(path) -> dict[str, str]:
    data = path.read_bytes()
    header = data[: data.index(b"\n\n")].decode("latin-1")
    return dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)


def _some_mask(vol: Volume) -> sitk.Image:
    stack = display_stack(vol, "axial")
    masks = np.zeros((len(stack), *stack.slice_shape), bool)
    masks[3:6, 4:9, 2:7] = True
    return stack.to_volume_mask(masks)


def test_seg_nrrd_for_slicer(tmp_path):
    original = _coded_volume(DIRECTIONS["oblique"])
    sitk.WriteImage(original, str(tmp_path / "ct.nrrd"))
    vol = read_volume(tmp_path / "ct.nrrd")
    mask = _some_mask(vol)
    out = write_segmentation(mask, tmp_path / "out" / "lesion.seg.nrrd", name="liver lesion",
                             color=(0.2, 0.5, 1.0), inputs=[tmp_path / "ct.nrrd"])
    assert out == tmp_path / "out" / "lesion.seg.nrrd"
    assert sorted(os.listdir(out.parent)) == ["lesion.seg.nrrd"]  # no temporary files left

    fields = _header_fields(out)
    assert fields["Segment0_ID"] == "Segment_1"
    assert fields["Segment0_Name"] == "liver lesion"
    assert [float(v) for v in fields["Segment0_Color"].split()] == [0.2, 0.5, 1.0]
    assert fields["Segment0_LabelValue"] == "1" and fields["Segment0_Layer"] == "0"
    assert "Segment0_Tags" in fields
    assert fields["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert fields["Segmentation_ContainedRepresentationNames"].startswith("Binary labelmap")
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(mask))
    assert [int(v) for v in fields["Segment0_Extent"].split()] == [
        i.min(), i.max(), j.min(), j.max(), k.min(), k.max()]

    back = sitk.ReadImage(str(out))
    assert back.GetMetaData("Segment0_Name") == "liver lesion"
    assert back.GetPixelID() == sitk.sitkUInt8
    _assert_same_grid(back, vol.image, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(mask))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_plain_labelmaps(tmp_path, suffix):
    vol = volume_from_image(_coded_volume(DIRECTIONS["ras"]))
    mask = _some_mask(vol)
    out = write_segmentation(mask, tmp_path / f"mask{suffix}")
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt8
    _assert_same_grid(back, vol.image, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(mask))
    assert os.listdir(tmp_path) == [out.name]


def test_segmentation_refuses_to_overwrite_input_and_bad_names(tmp_path):
    src = tmp_path / "ct.nrrd"
    sitk.WriteImage(_coded_volume(np.eye(3)), str(src))
    before = src.read_bytes()
    vol = read_volume(src)
    with pytest.raises(InputError, match="overwrite"):
        write_segmentation(_some_mask(vol), src, inputs=[vol.path])
    assert src.read_bytes() == before
    with pytest.raises(InputError, match="format"):
        write_segmentation(_some_mask(vol), tmp_path / "mask.png")
    with pytest.raises(InputError, match="color"):
        write_segmentation(_some_mask(vol), tmp_path / "mask.nrrd", color=(255, 0, 0))


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    vol = volume_from_image(_coded_volume(np.eye(3)))
    mask = _some_mask(vol)
    target = tmp_path / "mask.seg.nrrd"
    target.write_bytes(b"previous result")

    def broken_write(image, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"NRRD0004\nhalf a hea")
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_segmentation(mask, target)
    assert os.listdir(tmp_path) == ["mask.seg.nrrd"]
    assert target.read_bytes() == b"previous result"
    with pytest.raises(OSError):
        write_segmentation(mask, tmp_path / "new.nii.gz")
    assert os.listdir(tmp_path) == ["mask.seg.nrrd"]


# -------------------------------------------------------------------------------------------- bad input


def test_missing_corrupt_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="cannot read"):
        read_volume(bad)
    (tmp_path / "zero.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_volume(tmp_path / "zero.nrrd")
    # a NIfTI whose voxel data is cut off
    good = tmp_path / "good.nii"
    sitk.WriteImage(_coded_volume(np.eye(3)), str(good))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated"):
        read_volume(cut)
    # ITK reads cut-off NIfTI voxel data as zeros without complaint: it must be caught
    for name, keep in (("cut_data.nii", 0.8), ("cut_data.nii.gz", 0.7)):
        whole = tmp_path / name.replace("cut_data", "whole")
        values = np.random.default_rng(1).integers(-1000, 1000, (30, 40, 50)).astype(np.int16)
        sitk.WriteImage(_image(values, np.eye(3)), str(whole))
        data = whole.read_bytes()
        (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
        assert read_volume(whole).shape == (50, 40, 30)
        with pytest.raises(InputError, match="truncated"):
            read_volume(tmp_path / name)


def test_2d_inputs_point_to_ground(tmp_path, ct_path):
    from PIL import Image

    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(InputError, match="2D image; use `medreasoner ground`"):
        read_volume(tmp_path / "photo.png")
    nib.save(nib.Nifti1Image(np.arange(20 * 16, dtype=np.int16).reshape(20, 16), np.eye(4)),
             str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="medreasoner ground"):
        read_volume(tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match="2D image; use `medreasoner ground`.*DICOM series, give the folder"):
        read_volume(ct_path)  # a single-slice DICOM file
    one = np.arange(20 * 16, dtype=np.int16).reshape(1, 16, 20)
    with pytest.raises(InputError, match="2D image"):
        volume_from_image(_image(one, np.eye(3)))


def test_4d_inputs(tmp_path):
    data = np.random.default_rng(0).integers(-1000, 1000, (8, 7, 6, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.6, 2.0, 1.0])), str(tmp_path / "four.nii.gz"))
    with pytest.raises(InputError, match=r"\(8, 7, 6, 3\)"):
        read_volume(tmp_path / "four.nii.gz")
    nib.save(nib.Nifti1Image(data[..., :1], np.diag([0.5, 0.6, 2.0, 1.0])), str(tmp_path / "one.nii.gz"))
    vol = read_volume(tmp_path / "one.nii.gz")
    assert vol.shape == (8, 7, 6)
    np.testing.assert_array_equal(vol.array, data[..., 0].transpose(2, 1, 0))
    # an in-memory 4D image with a size-1 4th axis is squeezed, keeping the 3D geometry
    three = _coded_volume(DIRECTIONS["coronal"])
    squeezed = volume_from_image(sitk.JoinSeries(three))
    _assert_same_grid(squeezed.image, three)
    sitk.WriteImage(sitk.JoinSeries([three, three]), str(tmp_path / "two.mha"))
    with pytest.raises(InputError, match=r"\(20, 16, 12, 2\)"):
        read_volume(tmp_path / "two.mha")


def test_constant_vector_and_nan_volumes(tmp_path):
    flat = _image(np.full((4, 5, 6), 7, np.int16), np.eye(3))
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="empty/constant"):
        read_volume(tmp_path / "flat.nrrd")
    with pytest.raises(InputError, match="empty"):
        volume_from_image(sitk.Image([0, 5, 5], sitk.sitkInt16))
    nan_only = _image(np.full((4, 5, 6), np.nan, np.float32), np.eye(3))
    with pytest.raises(InputError, match="empty/constant"):
        volume_from_image(nan_only)
    comp = sitk.Compose([_coded_volume(np.eye(3))] * 3)
    sitk.WriteImage(comp, str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match="vector/RGB"):
        read_volume(tmp_path / "rgb.mha")



@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nan_voxels_are_kept_and_reported(tmp_path, suffix):
    values = np.random.default_rng(0).uniform(0, 100, (6, 7, 8)).astype(np.float32)
    values[2, 3, 4] = np.nan
    values[1, 1, 1] = np.inf
    sitk.WriteImage(_image(values, np.eye(3)), str(tmp_path / f"nan{suffix}"))
    vol = read_volume(tmp_path / f"nan{suffix}")  # ITK's NIfTI reader zeroes them; they are put back
    assert len(vol.warnings) == 1 and "2 voxel(s)" in vol.warnings[0]
    np.testing.assert_array_equal(vol.array, values)
    lo, hi = intensity_range(vol, None)
    assert np.isfinite([lo, hi]).all() and lo < hi
    stack = display_stack(vol, "axial")
    assert stack.index_in_volume(2) == 2 and np.isnan(stack.raw(2)[3, 4])
    rgb = slice_to_rgb(stack.raw(2), lo, hi)
    assert rgb[3, 4].tolist() == [0, 0, 0]  # NaN -> window minimum
    assert slice_to_rgb(stack.raw(1), lo, hi)[1, 1, 0] == 255  # +inf -> window maximum


def test_unknown_axis_and_folder_without_dicom(tmp_path):
    vol = volume_from_image(_coded_volume(np.eye(3)))
    with pytest.raises(InputError, match="axial, coronal, sagittal"):
        display_stack(vol, "transverse")
    assert display_stack(vol, "Axial").axis == "axial"
    stack = display_stack(vol, "axial")
    with pytest.raises(IndexError):
        stack.raw(len(stack))
    with pytest.raises(InputError, match="shape"):
        stack.to_volume_mask(np.zeros((2, 3, 4), bool))
    with pytest.raises(InputError, match="shape"):
        stack.to_volume_mask({0: np.zeros((3, 4), bool)})
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path / "empty_dir")


@pytest.mark.parametrize("dname", list(DIRECTIONS))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slice_at_inverts_physical_point(dname, axis):
    """A viewer's slice given as a physical point maps back to the same display slice (any grid)."""
    stack = display_stack(_blob_volume(DIRECTIONS[dname]), axis)
    rows, cols = stack.slice_shape
    for s in (0, len(stack) // 3, len(stack) - 1):
        assert stack.slice_at(stack.physical_point(s, rows / 2, cols / 3)) == s
    with pytest.raises(InputError, match="outside"):
        stack.slice_at((500.0, 500.0, 500.0))
