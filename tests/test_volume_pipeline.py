"""3D strategies end to end on CT-like phantoms with oblique geometry, and their bad-input cases."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medreasoner.cli import EXIT_INPUT, EXIT_MODEL, EXIT_NO_TARGET, EXIT_OK, main
from medreasoner.errors import InputError
from medreasoner.volume_pipeline import (
    VolumeGrounder,
    candidate_slices,
    largest_component,
    write_volume_outputs,
)

QUERY = "Which organ would explain the patient's jaundice?"


def phantom(path, n_slices=12, size=48, oblique=True, air_slices=2, nan=False):
    """Air around a soft-tissue body with a brighter 'organ'; the first slices are air only."""
    z, y, x = np.mgrid[0:n_slices, 0:size, 0:size]
    a = np.full((n_slices, size, size), -1000, np.int16)
    body = ((x - size / 2) / (size * 0.42)) ** 2 + ((y - size / 2) / (size * 0.35)) ** 2 <= 1
    a[body & (z >= air_slices)] = 40
    organ = ((x - size * 0.62) / 7) ** 2 + ((y - size * 0.45) / 6) ** 2 + ((z - n_slices * 0.55) / 4) ** 2 <= 1
    a[organ & (z >= air_slices)] = 160
    img = sitk.GetImageFromArray(a.astype(np.float32) if nan else a)
    if nan:
        arr = sitk.GetArrayFromImage(img)
        arr[-1, 0, 0] = np.nan
        img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    img.SetOrigin((-12.5, 30.0, 101.0))
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)],
                                                                      [0, np.sin(0.2), np.cos(0.2)]])
        img.SetDirection(tuple(rot.ravel()))
    sitk.WriteImage(img, str(path))
    return path


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


@pytest.fixture(scope="module")
def crm(tiny_models):
    from medreasoner.models.crm import load_crm

    c = load_crm(tiny_models["format"], device="cpu")
    c.generation.max_new_tokens = 120
    return c


def test_keyslice_litemedsam_keeps_geometry_and_reports(crm, litemedsam, tmp_path):
    src = phantom(tmp_path / "ct.nii.gz", n_slices=9, size=40)
    res = VolumeGrounder(crm, litemedsam).run(src, QUERY, strategy="keyslice", n_candidates=3)
    rec = res.record
    assert rec["strategy"] == "keyslice" and rec["counts"]["crm_calls"] <= 3
    assert all(s["slice"] >= 2 for s in rec["slices"])  # air-only slices are never candidates
    assert rec["window"]["chosen"] == [40.0, 400.0]  # CT, no keyword -> abdomen preset
    outs = write_volume_outputs(res, tmp_path / "out", inputs=[src])
    for key in ("mask_nifti", "mask_seg_nrrd"):
        assert same_geometry(sitk.ReadImage(outs[key]), sitk.ReadImage(str(src)))
    saved = json.loads(Path(outs["result"]).read_text())
    assert saved["status"] == res.status and saved["timings_s"]["total"] > 0
    if res.ok:
        assert rec["key_slice"] in [s["slice"] for s in rec["slices"]]
        assert sitk.GetArrayFromImage(sitk.ReadImage(outs["mask_nifti"])).sum() == rec["voxels"] > 0
        assert (tmp_path / "out" / "seg_montage.png").is_file()


def test_keyslice_medsam2_propagates_with_sam2_video_memory(crm, tiny_models, tmp_path):
    from medreasoner.models.asm import load_asm

    asm = load_asm("medsam2", checkpoint=tiny_models["sam2"], device="cpu")
    src = phantom(tmp_path / "ct.mha", n_slices=6, size=40, oblique=False, air_slices=0)
    res = VolumeGrounder(crm, asm).run(src, QUERY, key_slice=3)
    assert res.record["counts"]["crm_calls"] == 1  # a user-given key slice: one CRM call
    if res.ok:
        assert res.record["counts"]["propagation_steps"] >= 1
        assert same_geometry(res.mask, sitk.ReadImage(str(src)))


def test_slicewise_range_skips_background(crm, litemedsam, tmp_path):
    src = phantom(tmp_path / "ct.nrrd", n_slices=10, size=40, air_slices=3)
    res = VolumeGrounder(crm, litemedsam, batch_size=4).run(src, QUERY, strategy="slicewise", slice_range="1:7")
    asked = [s["slice"] for s in res.record["slices"]]
    assert asked == [3, 4, 5, 6]  # 1 and 2 are air; 7+ are outside the range
    assert res.record["counts"]["crm_calls"] == 4
    assert set(res.record["segmented_slices"]) <= set(asked)


def test_candidates_do_not_grow_with_slices():
    for n in (64, 256):
        fractions = {i: (0.5 if 5 <= i < n - 5 else 0.0) for i in range(n)}
        c = candidate_slices(fractions, 5)
        assert len(c) == 5 and all(5 <= i < n - 5 for i in c)
    assert candidate_slices({i: 0.0 for i in range(10)}, 5) == []


def test_largest_component_keeps_the_biggest_blob():
    m = {i: np.zeros((10, 10), bool) for i in range(5)}
    for i in range(3):
        m[i][2:6, 2:6] = True
    m[4][8:10, 8:10] = True
    kept = largest_component(m)
    assert sorted(kept) == [0, 1, 2] and kept[0].sum() == 16


def test_refusal_writes_empty_mask_and_exit_4(tiny_models, tmp_path, capsys):
    src = phantom(tmp_path / "ct.nii.gz", n_slices=8, size=32)
    rc = main(["segment-volume", "--volume", str(src), "--query", QUERY, "--crm", tiny_models["random"],
               "--max-new-tokens", "12", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert rc == EXIT_NO_TARGET
    rec = json.loads((tmp_path / "o" / "seg.json").read_text())
    assert rec["status"] == "no_target" and "no usable box" in rec["message"]
    mask = sitk.ReadImage(str(tmp_path / "o" / "seg.nii.gz"))
    assert sitk.GetArrayFromImage(mask).sum() == 0 and same_geometry(mask, sitk.ReadImage(str(src)))


def test_cli_segment_volume_ok(tiny_models, tmp_path, capsys):
    src = phantom(tmp_path / "ct.nii.gz", n_slices=8, size=32, nan=True)
    rc = main(["segment-volume", "--volume", str(src), "--query", QUERY, "--crm", tiny_models["format"],
               "--max-new-tokens", "120", "--device", "cpu", "--strategy", "slicewise", "--window", "lung",
               "--progress", "json", "--out", str(tmp_path / "o")])
    assert rc in (EXIT_OK, EXIT_NO_TARGET)
    rec = json.loads((tmp_path / "o" / "seg.json").read_text())
    assert rec["window"]["chosen"] == [-600.0, 1500.0]
    assert any("NaN" in w or "nan" in w.lower() for w in rec["warnings"])
    assert '"stage": "slices"' in capsys.readouterr().err


@pytest.mark.parametrize("extra,code,msg", [
    (["--slices", "50:60"], EXIT_INPUT, "outside the volume"),
    (["--strategy", "magic"], EXIT_INPUT, "unknown strategy"),
    (["--window", "liver-ish"], EXIT_INPUT, "window"),
    (["--axis", "oblique"], EXIT_INPUT, "axis"),
    (["--asm", "nnunet"], EXIT_MODEL, "available"),
])
def test_bad_options(tiny_models, tmp_path, capsys, extra, code, msg):
    src = phantom(tmp_path / "ct.nii.gz", n_slices=6, size=24)
    rc = main(["segment-volume", "--volume", str(src), "--query", QUERY, "--crm", tiny_models["format"],
               "--device", "cpu", "--out", str(tmp_path / "o"), *extra])
    assert rc == code and msg in capsys.readouterr().err.lower()


def test_2d_and_4d_inputs_are_refused_clearly(tiny_models, tmp_path, capsys, ct_path):
    rc = main(["segment-volume", "--volume", ct_path, "--query", QUERY, "--crm", tiny_models["format"],
               "--out", str(tmp_path / "o")])
    assert rc == EXIT_INPUT and "medreasoner ground" in capsys.readouterr().err
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(InputError):
        VolumeGrounder(None, None).run(tmp_path / "4d.nii.gz", QUERY)
