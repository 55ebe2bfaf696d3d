"""Ground truth derived from masks (checked on real brain masks) and U-MRG data reading / writing."""

from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medreasoner.data import (
    Sample,
    iter_samples,
    load_samples,
    samples_from_2d,
    samples_from_volumes,
    write_parquet,
)
from medreasoner.errors import InputError
from medreasoner.science.keypoints import (
    box_from_mask,
    distance_map,
    ground_truth_from_mask,
    keypoints_from_mask,
)


# --- key points -----------------------------------------------------------------------------------
def check_ground_truth(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """Every promise of keypoints.py, checked independently of its implementation."""
    mask = np.asarray(mask, bool)
    (x1, y1), (x2, y2) = keypoints_from_mask(mask)
    assert mask[y1, x1] and mask[y2, x2], "key points must be mask pixels"
    ys, xs = np.nonzero(mask)
    box = box_from_mask(mask)
    assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    bx0, by0, bx1, by1 = (int(v) for v in box)
    assert mask[by0:by1, bx0:bx1].sum() == mask.sum()  # contains the mask
    assert mask[by0].any() and mask[by1 - 1].any() and mask[:, bx0].any() and mask[:, bx1 - 1].any()  # tight
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    assert depth[y1, x1] == depth.max(), "P1 is the deepest point"
    d2 = (xs - x1) ** 2 + (ys - y1) ** 2
    far = d2 > np.median(d2)
    if far.any():
        assert (x2 - x1) ** 2 + (y2 - y1) ** 2 > np.median(d2), "P2 is farther than the median"
        assert depth[y2, x2] == depth[ys[far], xs[far]].max(), "P2 is the deepest of the far pixels"
    if mask.sum() > 1:
        assert (x1, y1) != (x2, y2)
    gt = ground_truth_from_mask(mask)
    assert gt == json.loads(json.dumps(gt))
    assert gt == {"bbox_2d": list(box), "point_2d": [[x1, y1], [x2, y2]]}
    return (x1, y1), (x2, y2)


@pytest.fixture(scope="module")
def mni_masks():
    """Grey matter, white matter and brain masks of the MNI152 template (shipped with nilearn)."""
    from nilearn import datasets

    return {name: np.asarray(getattr(datasets, f"load_mni152_{name}_mask")(resolution=2).dataobj) > 0
            for name in ("gm", "wm", "brain")}


@pytest.mark.parametrize("name", ["gm", "wm", "brain"])
def test_key_points_on_real_brain_masks(mni_masks, name):
    vol = mni_masks[name]
    slices = [vol[:, :, k] for k in (25, 40, 55, 70)] + [vol[:, j, :] for j in (35, 60, 85)]
    checked = 0
    for sl in slices:
        check_ground_truth(sl)  # the whole slice, several components at once
        labels, n = ndimage.label(sl)
        sizes = np.bincount(labels.ravel())
        for c in range(1, n + 1):
            if sizes[c] >= 15:
                check_ground_truth(labels == c)
                checked += 1
    assert checked >= 7


def test_rectangle():
    m = np.zeros((30, 40), bool)
    m[5:15, 3:23] = True
    (x1, y1), (x2, y2) = check_ground_truth(m)
    assert box_from_mask(m) == (3.0, 5.0, 23.0, 15.0)
    assert (x1, y1) == (7, 9)  # depth 5 is reached on a segment; the first in row-major order wins
    assert abs(x2 - x1) > 5  # P2 lies along the long axis, away from P1


def test_l_shape_points_in_the_thick_arm_and_spread():
    m = np.zeros((50, 50), bool)
    m[5:45, 5:11] = True  # thin vertical arm, 6 wide
    m[30:45, 5:45] = True  # thick horizontal arm, 15 high
    (x1, y1), (x2, y2) = check_ground_truth(m)
    assert 30 <= y1 < 45 and x1 > 11


def test_ring_points_on_the_ring_not_in_the_hole():
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(xx - 31.5, yy - 31.5)
    ring = (r >= 12) & (r <= 20)
    (x1, y1), (x2, y2) = check_ground_truth(ring)
    for x, y in ((x1, y1), (x2, y2)):
        assert 12 <= math.hypot(x - 31.5, y - 31.5) <= 20


def test_single_pixel_two_and_three_pixels():
    m = np.zeros((8, 9), bool)
    m[3, 4] = True
    assert keypoints_from_mask(m) == ((4, 3), (4, 3))
    assert box_from_mask(m) == (4.0, 3.0, 5.0, 4.0)
    m[3, 5] = True
    check_ground_truth(m)
    tri = np.zeros((8, 8), bool)
    tri[5, 5] = tri[5, 6] = tri[6, 5] = True  # equal depths; no pixel farther than the median
    assert keypoints_from_mask(tri) == ((5, 5), (6, 5))  # falls back to the farthest, first in row order


def test_mask_touching_the_border():
    m = np.zeros((20, 30), bool)
    m[:10, :] = True  # touches the top, left and right edges
    (x1, y1), _ = check_ground_truth(m)
    assert y1 in (4, 5), "the image border counts as background, so P1 is mid-band, not at the edge"
    assert box_from_mask(m) == (0.0, 0.0, 30.0, 10.0)
    full = np.ones((11, 13), np.uint8) * 255
    assert keypoints_from_mask(full)[0] == (5, 5)  # depth 6 on x = 5..7 of row 5; the first wins
    assert distance_map(full).max() == 6.0


def test_bad_masks():
    with pytest.raises(InputError, match="empty"):
        keypoints_from_mask(np.zeros((5, 5), bool))
    with pytest.raises(InputError, match="empty"):
        box_from_mask(np.zeros((5, 5)))
    with pytest.raises(InputError, match="2D"):
        ground_truth_from_mask(np.ones((2, 5, 5), bool))


# --- U-MRG data -----------------------------------------------------------------------------------
def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return np.hypot(xx - cx, yy - cy) <= r


def make_samples(rng) -> list[Sample]:
    out = []
    for i, (h, w) in enumerate([(40, 48), (33, 30), (50, 50)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = disc(h, w, w / 2, h / 2, 6 + i)
        out.append(Sample(id=f"s{i}", image=image, mask=mask, query=f"Which organ {i}?",
                          ground_truth=ground_truth_from_mask(mask), supercategory="abdomen",
                          category=f"organ{i}", data_source="umrg"))
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)  # no mask, only a ground truth
    out.append(Sample(id="nomask", image=image, mask=None, query="Where is it?",
                      ground_truth={"bbox_2d": [1.5, 2.0, 10.0, 12.0], "point_2d": [[3, 4], [8, 9]]},
                      category="x", data_source="other"))
    return out


def assert_same(a: list[Sample], b: list[Sample]):
    assert [s.id for s in a] == [s.id for s in b]
    for s, t in zip(a, b):
        assert (s.query, s.supercategory, s.category, s.data_source) == (t.query, t.supercategory, t.category,
                                                                          t.data_source)
        assert s.ground_truth == t.ground_truth
        assert t.image.dtype == np.uint8 and t.image.shape == s.image.shape and (t.image == s.image).all()
        if s.mask is None:
            assert t.mask is None
        else:
            assert t.mask.dtype == np.bool_ and (t.mask == s.mask).all()


@pytest.mark.parametrize("bad_id", ["   ", " s1", "s1 ", "a\nb", "../s1", "a/b", ".."])
def test_sample_ids_that_cannot_name_a_result_file_are_refused(tmp_path, rng, bad_id):
    """Results are saved per id (masks/<id>.png): "   .png" or a name with a newline is no file to find."""
    samples = make_samples(rng)
    samples[1].id = bad_id
    path = write_parquet(samples, tmp_path / "test.parquet")
    with pytest.raises(InputError, match="cannot be used as a file name"):
        load_samples(path)


def test_parquet_round_trip_and_datasets_reads_it(tmp_path, rng):
    samples = make_samples(rng)
    path = write_parquet(samples, tmp_path / "out" / "test.parquet")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["test.parquet"]  # no temp left
    back = load_samples(path)
    assert_same(samples, back)
    assert all(s.source == str(path) for s in back)
    assert_same(samples[:2], load_samples(path, limit=2))
    assert_same(samples, load_samples(tmp_path / "out", split="test"))  # folder with {split}*.parquet
    # Loaded, written again, loaded again: nothing drifts.
    assert_same(samples, load_samples(write_parquet(back, tmp_path / "again.parquet")))

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(path), cache_dir=str(tmp_path / "hf"))["train"]
    assert isinstance(ds.features["images"].feature, datasets.Image)
    assert isinstance(ds.features["masks"].feature, datasets.Image)
    row = ds[0]
    assert np.array_equal(np.asarray(row["images"][0]), samples[0].image)
    assert np.array_equal(np.asarray(row["masks"][0]) > 0, samples[0].mask)
    assert row["prompt"] == [{"role": "user", "content": "Which organ 0?"}]
    assert json.loads(row["reward_model"]["ground_truth"]) == samples[0].ground_truth
    assert row["extra_info"] == {"id": "s0", "supercategory": "abdomen", "category": "organ0", "reasoning": None,
                                 "metadata": None}

    # A datasets folder (save_to_disk), as a DatasetDict and as a single Dataset.
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    assert_same(samples, load_samples(tmp_path / "dict", split="test"))
    with pytest.raises(InputError, match="splits are: test"):
        load_samples(tmp_path / "dict", split="validation")
    ds.save_to_disk(str(tmp_path / "single"))
    assert_same(samples, load_samples(tmp_path / "single", split="anything"))
    with pytest.raises(InputError, match="inside the input dataset folder"):
        write_parquet(load_samples(tmp_path / "single"), tmp_path / "single" / "x.parquet")


def test_write_refuses_to_overwrite_its_input(tmp_path, rng):
    path = write_parquet(make_samples(rng), tmp_path / "test.parquet")
    before = path.read_bytes()
    with pytest.raises(InputError, match="overwrite"):
        write_parquet(load_samples(path), path)
    with pytest.raises(InputError, match="overwrite"):
        write_parquet(make_samples(rng), tmp_path / "in.png", inputs=[tmp_path / "in.png"])
    assert path.read_bytes() == before
    with pytest.raises(InputError, match="duplicate"):
        write_parquet(make_samples(rng)[:1] * 2, tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="no samples"):
        write_parquet([], tmp_path / "empty.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.parquet"]


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_table(path, rows, schema=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_column_variants(tmp_path, rng):
    """Raw image bytes, chat parts, <image> placeholders, a flat ground-truth column, GT from the mask."""
    image = rng.integers(0, 256, (30, 30), dtype=np.uint8)  # grey: becomes RGB
    mask = disc(30, 30, 12, 15, 5)
    gt = {"bbox_2d": [1, 2, 20, 25], "point_2d": [[5, 6], [10, 12]]}
    rows = [
        {"images": [png(image)], "masks": [png(mask.astype(np.uint8) * 255)],
         "prompt": [{"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]},
                    {"role": "user", "content": [{"type": "image", "text": None},
                                                 {"type": "text", "text": "<image>Which lesion bleeds?"}]}],
         "reward_model.ground_truth": json.dumps(gt)},
        {"images": [png(image)], "masks": [png(mask.astype(np.uint8) * 255)],
         "prompt": [{"role": "system", "content": [{"type": "text", "text": "sys"}]},
                    {"role": "user", "content": [{"type": "text", "text": "What is swollen?"}]}],
         "reward_model.ground_truth": None},
    ]
    s0, s1 = load_samples(write_table(tmp_path / "data" / "test-00000-of-00001.parquet", rows).parent.parent)
    assert (s0.id, s1.id) == ("test-000000", "test-000001")
    assert s0.query == "Which lesion bleeds?" and s1.query == "What is swollen?"
    assert s0.image.shape == (30, 30, 3) and (s0.image[..., 1] == image).all()
    assert s0.ground_truth == {"bbox_2d": [1.0, 2.0, 20.0, 25.0], "point_2d": [[5, 6], [10, 12]]}
    assert s1.ground_truth == ground_truth_from_mask(mask)  # derived when missing
    assert (s1.mask == mask).all() and s1.data_source == "umrg"


def test_split_selection_in_a_parquet_folder(tmp_path, rng):
    samples = make_samples(rng)
    write_parquet(samples[:2], tmp_path / "data" / "train-00000-of-00001.parquet")
    write_parquet(samples[2:], tmp_path / "data" / "test-00000-of-00001.parquet")
    assert [s.id for s in load_samples(tmp_path, split="train")] == ["s0", "s1"]
    assert [s.id for s in load_samples(tmp_path)] == ["s2", "nomask"]
    with pytest.raises(InputError, match=r"split 'validation'.*splits found: test, train"):
        load_samples(tmp_path, split="validation")


def test_plain_folder(tmp_path, rng):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = disc(32, 40, 20, 16, 7)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / "a.png")
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "masks" / "b_seg.png")  # 0/1 mask, named explicitly
    records = [
        {"image": "a.png", "query": "Which structure is enlarged?", "supercategory": "abd", "category": "liver"},
        {"image": "b.png", "query": "Where is the lesion?", "mask": "b_seg.png", "id": "case-b"},
    ]
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    a, b = load_samples(tmp_path)
    assert (a.id, a.category, a.supercategory, b.id) == ("a", "liver", "abd", "case-b")
    for s in (a, b):
        assert (s.mask == mask).all() and s.ground_truth == ground_truth_from_mask(mask)
        assert s.image.shape == (32, 40, 3)
    # The queries file itself works too, and so does a .json list with an inline ground truth, no mask.
    assert [s.id for s in load_samples(tmp_path / "queries.jsonl")] == ["a", "case-b"]
    (tmp_path / "queries.jsonl").unlink()
    gt = {"bbox_2d": [0, 0, 5, 5], "point_2d": [[1, 1], [3, 3]]}
    (tmp_path / "masks" / "a.png").unlink()
    (tmp_path / "queries.json").write_text(json.dumps([{"image": "a.png", "query": "q", "ground_truth": gt}]))
    (only,) = load_samples(tmp_path)
    assert only.mask is None and only.ground_truth["point_2d"] == [[1, 1], [3, 3]]
    (tmp_path / "queries.json").write_text(json.dumps([{"image": "a.png", "query": "q"}]))
    with pytest.raises(InputError, match="neither a ground truth nor a mask"):
        load_samples(tmp_path)


def test_samples_from_2d(tmp_path, rng):
    images, masks = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    masks.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(images / f"c{i}.png")
        Image.fromarray(disc(24, 24, 8 + i, 12, 4).astype(np.uint8) * 255).save(masks / f"c{i}.png")
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"image": f"c{i}.png", "query": f"q{i}", "category": "k"}) + "\n" for i in range(3)))
    samples = samples_from_2d(images, masks, q)
    assert [s.id for s in samples] == ["c0", "c1", "c2"]
    for s in samples:
        check_ground_truth(s.mask)
        assert s.ground_truth == ground_truth_from_mask(s.mask) and s.category == "k"
    assert_same(samples, load_samples(write_parquet(samples, tmp_path / "out.parquet")))

    (masks / "c1.png").unlink()
    with pytest.raises(InputError, match=r"record 2: no mask for image 'c1.png'"):
        samples_from_2d(images, masks, q)
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(masks / "c1.png")
    with pytest.raises(InputError, match="sample c1: the mask is empty"):
        samples_from_2d(images, masks, q)
    (masks / "c1.png").unlink()
    (images / "c2.png").unlink()
    q.write_text(json.dumps({"image": "c0.png", "query": "q"}) + "\n" + json.dumps({"image": "c2.png", "query": "q"}))
    with pytest.raises(InputError, match=r"record 2: image 'c2.png' not found"):
        samples_from_2d(images, masks, q)


@pytest.fixture
def nifti_pair(tmp_path):
    """A 40x40x10 volume with a labelled sphere (label 1) and a small box (label 2), RAS affine."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    xx, yy, zz = np.mgrid[:40, :40, :10]
    labels = np.zeros((40, 40, 10), np.uint8)
    labels[np.sqrt((xx - 18) ** 2 + (yy - 22) ** 2 + (zz - 5) ** 2 * 4) <= 8] = 1
    labels[30:36, 5:12, 2:4] = 2
    volume = rng.normal(100, 10, labels.shape).astype(np.float32) + 200 * (labels > 0)
    vpath, lpath = tmp_path / "case01.nii.gz", tmp_path / "case01_seg.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), vpath)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), lpath)
    return vpath, lpath, labels


QUERIES = {1: {"query": "Which structure is round?", "supercategory": "s", "category": "sphere"},
           2: {"query": "Which structure is square?", "category": "box"}}


def test_samples_from_volumes(tmp_path, nifti_pair):
    import nibabel as nib

    vpath, lpath, labels = nifti_pair
    samples = samples_from_volumes([(vpath, lpath)], QUERIES, axis="axial", min_area=20)
    expected = [(lab, k) for lab in (1, 2) for k in range(10) if (labels[:, :, k] == lab).sum() >= 20]
    assert 4 <= len(expected) < 12
    # Axial display index grows towards superior, which is RAS voxel k here.
    assert [s.id for s in samples] == [f"case01_{lab}_axial{k:04d}" for lab, k in expected]
    for s, (lab, k) in zip(samples, expected):
        assert s.image.shape == (40, 40, 3) and s.image.dtype == np.uint8
        # Radiological display, as at inference: RAS voxel i grows to the patient's right, so it runs
        # right-to-left across the image; RAS j grows anterior, so anterior is at the top.
        displayed = labels[::-1, ::-1, k].T
        assert np.array_equal(s.mask, displayed == lab)
        assert s.mask.sum() >= 20 and s.query == QUERIES[lab]["query"] and s.category == QUERIES[lab]["category"]
        assert s.metadata["axis"] == "axial" and s.metadata["slice_index"] == k and s.metadata["label"] == lab
        check_ground_truth(s.mask)
        assert s.image[s.mask].mean() > s.image[~s.mask].mean() + 50  # the bright structure is where the mask is
    assert len(samples_from_volumes([(vpath, lpath)], {1: QUERIES[1]}, every=2)) == \
        len([k for k in range(10) if (labels[:, :, k] == 1).sum() >= 20][::2])
    # The old integer axes still work (2 = axial, 0 = sagittal) and give the same samples as the names.
    assert [s.id for s in samples_from_volumes([(vpath, lpath)], QUERIES, axis=2)] == [s.id for s in samples]
    sag = samples_from_volumes([(vpath, lpath)], {2: QUERIES[2]}, axis=0, min_area=1)
    # Sagittal index grows towards the patient's left, i.e. against RAS i: the box at i 30..35 is at 4..9.
    assert [s.id for s in sag] == [f"case01_2_sagittal{i:04d}" for i in range(4, 10)] and sag[0].image.shape == (10, 40, 3)
    for s in sag:  # rows run superior -> inferior, columns anterior -> posterior
        assert (s.mask == (labels[39 - s.metadata["slice_index"], ::-1, ::-1].T == 2)).all()

    # The same data stored flipped (LPS-like affine) gives the same slices: display orientation is physical.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = 39
    vol = np.asarray(nib.load(vpath).dataobj)
    nib.save(nib.Nifti1Image(vol[::-1, ::-1].copy(), flip), tmp_path / "f.nii")
    nib.save(nib.Nifti1Image(labels[::-1, ::-1].copy(), flip), tmp_path / "f_seg.nii")
    flipped = samples_from_volumes([(tmp_path / "f.nii", tmp_path / "f_seg.nii")], QUERIES)
    assert [s.id for s in flipped] == [s.id.replace("case01", "f") for s in samples]
    assert all((a.mask == b.mask).all() and (a.image == b.image).all() for a, b in zip(samples, flipped))

    with pytest.raises(InputError, match="no axial slice"):
        samples_from_volumes([(vpath, lpath)], {7: QUERIES[1]})
    nib.save(nib.Nifti1Image(labels[:, :, :5], np.eye(4)), tmp_path / "short.nii.gz")
    with pytest.raises(InputError, match=r"not on the grid .*: size \(40, 40, 5\) vs \(40, 40, 10\)"):
        samples_from_volumes([(vpath, tmp_path / "short.nii.gz")], QUERIES)
    with pytest.raises(InputError, match="not found"):
        samples_from_volumes([(vpath, tmp_path / "nope.nii.gz")], QUERIES)
    with pytest.raises(InputError, match="query"):
        samples_from_volumes([(vpath, lpath)], {1: {"category": "x"}})
    with pytest.raises(InputError, match="unknown axis"):
        samples_from_volumes([(vpath, lpath)], QUERIES, axis=3)
    with pytest.raises(InputError, match="unknown window"):
        samples_from_volumes([(vpath, lpath)], QUERIES, window="liver-ish")


# --- bad inputs -----------------------------------------------------------------------------------
def good_row(rng, sid="ok"):
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return {"images": [{"bytes": png(image), "path": None}],
            "prompt": [{"role": "user", "content": "Which?"}],
            "reward_model": {"ground_truth": json.dumps({"bbox_2d": [0, 0, 4, 4], "point_2d": [[1, 1], [2, 2]]})},
            "extra_info": {"id": sid, "supercategory": "", "category": ""}}


def test_bad_inputs(tmp_path, rng, monkeypatch):
    with pytest.raises(InputError, match="data not found"):
        load_samples(tmp_path / "missing")
    with pytest.raises(InputError, match="holds no U-MRG data"):
        load_samples(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="neither a .parquet file"):
        load_samples(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="limit"):
        load_samples(tmp_path / "notes.txt", limit=-1)

    bad = good_row(rng, "bad01")
    bad["images"] = [{"bytes": b"\x89PNG this is not really a png", "path": None}]
    path = write_table(tmp_path / "corrupt.parquet", [good_row(rng), bad])
    it = iter_samples(path)
    assert next(it).id == "ok"  # samples before the broken one are usable
    with pytest.raises(InputError, match="sample bad01: cannot decode the image bytes"):
        next(it)

    rows = [good_row(rng)]
    del rows[0]["images"]
    with pytest.raises(InputError, match=r"lacks the U-MRG column\(s\) images"):
        load_samples(write_table(tmp_path / "noimages.parquet", rows))
    rows = [good_row(rng)]
    del rows[0]["reward_model"]
    with pytest.raises(InputError, match=r"reward_model \(or masks\)"):
        load_samples(write_table(tmp_path / "nogt.parquet", rows))

    rows = [good_row(rng), good_row(rng)]
    with pytest.raises(InputError, match="duplicate sample id 'ok'"):
        load_samples(write_table(tmp_path / "dup.parquet", rows))
    rows = [good_row(rng, "a/b")]
    with pytest.raises(InputError, match="file name"):
        load_samples(write_table(tmp_path / "slash.parquet", rows))
    rows = [good_row(rng)]
    rows[0]["masks"] = [{"bytes": png(np.zeros((8, 8), np.uint8)), "path": None}]
    with pytest.raises(InputError, match="sample ok: mask is 8x8 but the image is 16x16"):
        load_samples(write_table(tmp_path / "size.parquet", rows))
    rows = [good_row(rng)]
    rows[0]["reward_model"] = {"ground_truth": '{"bbox_2d": [0, 0, 4]}'}
    with pytest.raises(InputError, match="bbox_2d"):
        load_samples(write_table(tmp_path / "badgt.parquet", rows))

    write_table(tmp_path / "dsdir" / "dataset_dict.json", [good_row(rng)])  # any file: looks like datasets
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(InputError, match="needs the `datasets` package"):
        load_samples(tmp_path / "dsdir")


def test_build_dataset_command_from_volumes(tmp_path, capsys):
    """`medreasoner build-dataset` turns NIfTI volume + label map pairs into a U-MRG parquet."""
    import nibabel as nib

    from medreasoner.cli import EXIT_INPUT, EXIT_OK, main

    vol = np.zeros((24, 24, 6), np.float32)
    lab = np.zeros((24, 24, 6), np.int16)
    vol[4:20, 4:20, :] = 100.0
    lab[8:16, 6:14, 1:5] = 3
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(vol, aff), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "ct_seg.nii.gz")
    (tmp_path / "pairs.csv").write_text(f"volume,labelmap\n{tmp_path / 'ct.nii.gz'},{tmp_path / 'ct_seg.nii.gz'}\n")
    (tmp_path / "labels.json").write_text(json.dumps({"3": {"query": "Which organ stores bile?",
                                                            "supercategory": "Abdomen", "category": "gallbladder"}}))
    out = tmp_path / "built.parquet"
    rc = main(["build-dataset", "--volumes", str(tmp_path / "pairs.csv"), "--labels", str(tmp_path / "labels.json"),
               "--min-area", "10", "--out", str(out)])
    assert rc == EXIT_OK and "wrote 4 samples" in capsys.readouterr().out
    samples = load_samples(out)
    assert len(samples) == 4 and {s.category for s in samples} == {"gallbladder"}
    for s in samples:
        (x1, y1), (x2, y2) = s.ground_truth["point_2d"]
        assert s.mask[y1, x1] and s.mask[y2, x2]
        assert s.metadata["axis"] == "axial" and s.id == f"ct_3_axial{s.metadata['slice_index']:04d}"
    assert main(["build-dataset", "--volumes", str(tmp_path / "pairs.csv"), "--out", str(out)]) == EXIT_INPUT

    # Coronal slices with a fixed window; JSON progress lines on stderr, one per volume.
    out2 = tmp_path / "coronal.parquet"
    rc = main(["build-dataset", "--volumes", str(tmp_path / "pairs.csv"), "--labels", str(tmp_path / "labels.json"),
               "--axis", "coronal", "--window", "abdomen", "--progress", "json", "--min-area", "4", "--out", str(out2)])
    captured = capsys.readouterr()
    assert rc == EXIT_OK and "wrote 8 samples" in captured.out  # RAS j 6..13 -> 8 coronal slices of 8x4 pixels
    events = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    assert [(e["stage"], e["done"], e["total"]) for e in events if e["event"] == "progress"] == [("read", 0, 1),
                                                                                               ("read", 1, 1)]
    coronal = load_samples(out2)
    assert {s.metadata["axis"] for s in coronal} == {"coronal"}
    assert {(s.metadata["window_low"], s.metadata["window_high"]) for s in coronal} == {(-160.0, 240.0)}
    assert main(["build-dataset", "--volumes", str(tmp_path / "pairs.csv"), "--labels", str(tmp_path / "labels.json"),
                 "--axis", "oblique", "--out", str(tmp_path / "x.parquet")]) == EXIT_INPUT


def test_reasoning_traces_round_trip_and_feed_sft_targets(tmp_path):
    """A sample's reasoning trace survives parquet and becomes the SFT target's <think> when asked."""
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))
    from training.common import TrainConfig, target_text

    img = np.zeros((20, 20, 3), np.uint8)
    m = np.zeros((20, 20), bool)
    m[4:12, 5:15] = True
    s = Sample(id="r0", image=img, mask=m, query="Where?", ground_truth=ground_truth_from_mask(m),
               reasoning="The bright band sits in the upper half.")
    back = load_samples(write_parquet([s], tmp_path / "r.parquet"))[0]
    assert back.reasoning == s.reasoning
    with_trace = target_text(back.ground_truth, TrainConfig(sft_targets="reasoning"), back)
    assert with_trace.startswith("<think>The bright band sits in the upper half.</think><answer>")
    assert "bright band" not in target_text(back.ground_truth, TrainConfig(sft_targets="answer"), back)
