"""Training data built from volumes shows exactly what inference shows: same slices, orientation, window.

Every volume here has a bright blob on the patient's LEFT (+x in LPS physical space). Radiological
display puts the patient's left on the image's right (axial, coronal), so the blob must land on the
right half both in the built samples and in the slices inference would feed the CRM.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from medreasoner.data import load_samples, samples_from_volumes, write_parquet
from medreasoner.engine.events import CallbackEvents, CancelToken, Stage
from medreasoner.errors import CancelledError, InputError
from medreasoner.imaging.display import AXES, display_stack
from medreasoner.imaging.intensity import WINDOW_PRESETS
from medreasoner.imaging.windowing import choose_window, intensity_range, slice_to_rgb
from medreasoner.io.volumes import read_volume

SIZE = (30, 26, 22)  # (x, y, z): every axis a different length, so a transposed slice cannot pass
SPACING = (1.0, 1.2, 1.5)
BLOB_QUERY = {1: {"query": "Which structure is the bright round lesion?", "category": "blob"}}


def rotation_about_y(degrees: float) -> tuple[float, ...]:
    """Direction cosines (row-major, columns = voxel axes) of a rotation about the LPS y axis."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c)


def physical_grid(image) -> np.ndarray:
    """(z, y, x, 3) LPS millimetres of every voxel centre, from the image's own geometry."""
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in reversed(image.GetSize())), indexing="ij")
    index = np.stack([xx, yy, zz], axis=-1).astype(float) * np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return index @ direction.T + np.asarray(image.GetOrigin())


def write_case(tmp_path, name: str, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), *, ct: bool = False,
               label_suffix: str = ".nii.gz", volume_suffix: str = ".nii.gz"):
    """A volume with a blob 8 mm to the patient's left of its centre (label 1), and its label map.

    ``ct``: HU values (air -1000, soft tissue 40, a lung-like region -800, the blob 300), int16.
    Otherwise MR-like: non-negative noise around 100, the blob 400, float32.
    """
    import SimpleITK as sitk

    ref = sitk.Image(list(SIZE), sitk.sitkUInt8)
    ref.SetSpacing(SPACING)
    ref.SetDirection(direction)
    ref.SetOrigin((-12.0, 7.0, 30.0))
    grid = physical_grid(ref)
    centre = grid[tuple(n // 2 for n in reversed(SIZE))]
    offset = grid - centre
    blob = np.linalg.norm(offset - (8.0, 0.0, 0.0), axis=-1) <= 4.5
    rng = np.random.default_rng(3)
    if ct:
        values = np.full(grid.shape[:3], -1000, np.int16)
        body = np.linalg.norm(offset[..., :2], axis=-1) <= 12.0
        values[body] = 40
        values[body & (offset[..., 0] < -2)] = -800  # a "lung" on the patient's right
        values[blob] = 300
    else:
        values = (rng.normal(100, 5, grid.shape[:3]).clip(0) + 300 * blob).astype(np.float32)
    labels = blob.astype(np.uint8)
    paths = []
    for array, suffix, what in ((values, volume_suffix, ""), (labels, label_suffix, "_seg")):
        img = sitk.GetImageFromArray(array)
        img.CopyInformation(ref)
        path = tmp_path / f"{name}{what}{suffix}"
        sitk.WriteImage(img, str(path))
        paths.append(path)
    return paths[0], paths[1]


def inference_slice(vpath, axis: str, index: int, query: str, window=None):
    """What inference feeds the CRM for this slice: read, display stack, query-chosen window, RGB."""
    vol = read_volume(vpath)
    low, high = intensity_range(vol, choose_window(vol, query, window))
    return slice_to_rgb(display_stack(vol, axis).raw(index), low, high), (low, high)


def column_centroid(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_builder_slices_equal_inference_slices(tmp_path, kind):
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1) if kind == "lps" else rotation_about_y(20.0)
    vpath, lpath = write_case(tmp_path, kind, direction)
    query = BLOB_QUERY[1]["query"]
    for axis in AXES:
        samples = samples_from_volumes([(vpath, lpath)], BLOB_QUERY, axis=axis, min_area=4)
        label_stack = display_stack(read_volume(lpath), axis)
        expected = [i for i in range(len(label_stack)) if (np.asarray(label_stack.raw(i)) == 1).sum() >= 4]
        assert [s.id for s in samples] == [f"{kind}_1_{axis}{i:04d}" for i in expected]
        for s in samples:
            i = s.metadata["slice_index"]
            image, (low, high) = inference_slice(vpath, axis, i, query)
            assert np.array_equal(s.image, image), f"{axis} slice {i} differs from the inference slice"
            assert np.array_equal(s.mask, np.asarray(label_stack.raw(i)) == 1)
            assert (s.metadata["axis"], s.metadata["window_low"], s.metadata["window_high"]) == (axis, low, high)
            assert s.metadata["window"] is None  # MR-like: percentiles, as inference does
            assert s.image[s.mask].mean() > s.image[~s.mask].mean() + 100  # the mask covers the bright blob
            width = s.image.shape[1]
            if axis in ("axial", "coronal"):  # patient's left on the image's right, in both
                assert column_centroid(s.mask) > width / 2
                bright = image[..., 0] > 200
                assert bright.any() and column_centroid(bright) > width / 2
            else:  # sagittal: slices are counted towards the patient's left, so the blob is in the upper half
                assert i > len(label_stack) / 2


def test_other_formats_give_the_same_samples(tmp_path):
    """MHA volume + NRRD label map are read through read_volume too, and slice identically to NIfTI."""
    nii = write_case(tmp_path, "case", rotation_about_y(20.0))
    (tmp_path / "mixed").mkdir()
    other = write_case(tmp_path / "mixed", "case", rotation_about_y(20.0), volume_suffix=".mha",
                       label_suffix=".nrrd")
    for axis in ("axial", "sagittal"):
        a = samples_from_volumes([nii], BLOB_QUERY, axis=axis, min_area=4)
        b = samples_from_volumes([other], BLOB_QUERY, axis=axis, min_area=4)
        assert [s.id for s in a] == [s.id for s in b]
        assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))


def test_ct_gets_the_query_window_not_percentiles(tmp_path):
    vpath, lpath = write_case(tmp_path, "ct", ct=True)
    assert read_volume(vpath).modality == "CT"
    lung = WINDOW_PRESETS["lung"]
    queries = {1: {"query": "Which lesion sits next to the lung?", "category": "blob"}}
    samples = samples_from_volumes([(vpath, lpath)], queries, axis="axial", min_area=4)
    percentiles = intensity_range(read_volume(vpath), None)
    assert percentiles != (lung.low, lung.high)
    for s in samples:
        assert (s.metadata["window_low"], s.metadata["window_high"]) == (lung.low, lung.high)
        assert s.metadata["window"] == [lung.center, lung.width]
        image, _ = inference_slice(vpath, "axial", s.metadata["slice_index"], queries[1]["query"])
        assert np.array_equal(s.image, image)
        assert np.array_equal(s.image, slice_to_rgb(display_stack(read_volume(vpath), "axial")
                                                    .raw(s.metadata["slice_index"]), lung.low, lung.high))
    # A window given to the builder applies to every label, as --window does at inference.
    bone = samples_from_volumes([(vpath, lpath)], queries, window="bone", min_area=4)
    assert {(s.metadata["window_low"], s.metadata["window_high"]) for s in bone} == {
        (WINDOW_PRESETS["bone"].low, WINDOW_PRESETS["bone"].high)}
    custom = samples_from_volumes([(vpath, lpath)], queries, window="50,400", min_area=4)
    image, _ = inference_slice(vpath, "axial", custom[0].metadata["slice_index"], queries[1]["query"], "50,400")
    assert np.array_equal(custom[0].image, image) and custom[0].metadata["window_policy"] == "user"
    # No query keyword: the abdomen preset, still a HU window.
    plain = samples_from_volumes([(vpath, lpath)], BLOB_QUERY, min_area=4)
    assert plain[0].metadata["window"] == [WINDOW_PRESETS["abdomen"].center, WINDOW_PRESETS["abdomen"].width]


def test_metadata_survives_parquet(tmp_path):
    vpath, lpath = write_case(tmp_path, "rt")
    samples = samples_from_volumes([(vpath, lpath)], BLOB_QUERY, axis="coronal", min_area=4)
    back = load_samples(write_parquet(samples, tmp_path / "out.parquet"))
    assert [s.id for s in back] == [s.id for s in samples]
    for s, t in zip(samples, back):
        assert t.metadata == s.metadata and np.array_equal(t.image, s.image) and np.array_equal(t.mask, s.mask)


def test_label_map_on_another_grid_is_refused(tmp_path):
    import SimpleITK as sitk

    vpath, lpath = write_case(tmp_path, "grid")
    for name, change, match in (("shifted", lambda im: im.SetOrigin((-10.0, 7.0, 30.0)), "origin"),
                                ("spacing", lambda im: im.SetSpacing((1.0, 1.2, 1.6)), "spacing"),
                                ("rotated", lambda im: im.SetDirection(rotation_about_y(5.0)), "direction")):
        label = sitk.ReadImage(str(lpath))
        change(label)
        bad = tmp_path / f"{name}_seg.nii.gz"
        sitk.WriteImage(label, str(bad))
        with pytest.raises(InputError, match=f"label map .*{name}_seg.nii.gz is not on the grid .*: {match}"):
            samples_from_volumes([(vpath, bad)], BLOB_QUERY)
    small = sitk.ReadImage(str(lpath))[:, :, :10]
    sitk.WriteImage(small, str(tmp_path / "small_seg.nii.gz"))
    with pytest.raises(InputError, match="size"):
        samples_from_volumes([(vpath, tmp_path / "small_seg.nii.gz")], BLOB_QUERY)
    # Header round-off far below a voxel is the same grid.
    label = sitk.ReadImage(str(lpath))
    label.SetOrigin(tuple(v + 1e-5 for v in label.GetOrigin()))
    sitk.WriteImage(label, str(tmp_path / "close_seg.nii.gz"))
    assert samples_from_volumes([(vpath, tmp_path / "close_seg.nii.gz")], BLOB_QUERY, min_area=4)


def test_progress_and_cancel_through_events(tmp_path):
    pairs = [write_case(tmp_path, f"p{k}") for k in range(2)]
    seen = []
    samples = samples_from_volumes(pairs, BLOB_QUERY, min_area=4,
                                   events=CallbackEvents(progress=lambda *a: seen.append(a)))
    assert seen == [(Stage.READ, 0, 2), (Stage.READ, 1, 2), (Stage.READ, 2, 2)]
    assert {s.id.split("_")[0] for s in samples} == {"p0", "p1"}
    token = CancelToken()
    token.set()
    with pytest.raises(CancelledError):
        samples_from_volumes(pairs, BLOB_QUERY, events=CallbackEvents(cancel=token))
