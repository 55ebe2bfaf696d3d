"""The session API end to end: volumes and images in memory, strategies, caches, threads, events.

Most tests use the deterministic CRM double (tests/doubles.py: a box around the brightest region)
with the real LiteMedSAM or the real (tiny, random) SAM2 so they can assert ``status == "ok"`` and
the overlap with a phantom organ; the real tiny Qwen2.5-VL CRM is exercised through the CLI below.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import SimpleITK as sitk
from doubles import BACKEND, BrightestRegionCRM

from medreasoner.cli import EXIT_INPUT, EXIT_NO_TARGET, EXIT_OK, main
from medreasoner.engine import (
    CallbackEvents,
    CancelToken,
    ModelOptions,
    RunOptions,
    Session,
    StemAllocator,
    load_models,
    validate_record,
    write_result,
)
from medreasoner.engine.strategies import candidate_slices, largest_component
from medreasoner.errors import CancelledError, InputError

QUERY = "Which organ would explain the patient's jaundice?"


def phantom(path, n_slices=12, size=48, oblique=True, air_slices=2, nan=False, organ_depth=3.0):
    """Air around a soft-tissue body with a brighter 'organ' (returned as a (z, y, x) bool array)."""
    z, y, x = np.mgrid[0:n_slices, 0:size, 0:size]
    a = np.full((n_slices, size, size), -1000, np.int16)
    body = ((x - size / 2) / (size * 0.42)) ** 2 + ((y - size / 2) / (size * 0.35)) ** 2 <= 1
    a[body & (z >= air_slices)] = 40
    organ = (((x - size * 0.62) / 7) ** 2 + ((y - size * 0.45) / 6) ** 2
             + ((z - n_slices * 0.55) / organ_depth) ** 2 <= 1)
    organ &= z >= air_slices
    a[organ] = 160
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
    return path, organ


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def dice(mask: sitk.Image, truth: np.ndarray) -> float:
    m = sitk.GetArrayFromImage(mask) > 0
    return 2.0 * (m & truth).sum() / max(1, m.sum() + truth.sum())


@pytest.fixture(scope="module")
def session(litemedsam):
    return Session(load_models(ModelOptions(asm="litemedsam"), crm=BrightestRegionCRM(), asm=litemedsam))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Phantoms shared by the tests of this module (the shared session's caches make reuse cheap)."""
    root = tmp_path_factory.mktemp("volumes")
    return {"lps": phantom(root / "lps.nii.gz", n_slices=12, size=40, oblique=False),
            "oblique": phantom(root / "oblique.nii.gz", n_slices=12, size=40, oblique=True)}


@pytest.fixture(scope="module")
def sam2_session(tiny_models):
    from medreasoner.models.asm import load_asm

    asm = load_asm("medsam2", checkpoint=tiny_models["sam2"], device="cpu")
    return Session(load_models(ModelOptions(asm="medsam2"), crm=BrightestRegionCRM(), asm=asm))


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_keyslice_box_tracking_segments_the_phantom_organ(session, volumes, kind):
    src, organ = volumes[kind]
    res = session.ground_volume(src, QUERY, RunOptions(n_candidates=3))
    rec = res.record
    assert res.status == "ok", res.message
    assert rec["counts"]["crm_calls"] <= 3 and all(s["slice"] >= 2 for s in rec["slices"])
    assert rec["counts"]["propagation_steps"] >= 2  # LiteMedSAM: box tracking through neighbours
    assert rec["window"]["chosen"] == [40.0, 400.0]  # CT, no keyword -> abdomen preset
    assert same_geometry(res.mask, sitk.ReadImage(str(src)))
    assert dice(res.mask, organ) >= 0.5
    assert rec["key_slice"] in rec["segmented_slices"] and len(rec["box_corners_lps"]) == 2
    validate_record(rec)


def test_keyslice_sam2_video_memory_propagates(sam2_session, tmp_path):
    src, _ = phantom(tmp_path / "ct.mha", n_slices=6, size=32, oblique=False, air_slices=0)
    res = sam2_session.ground_volume(src, QUERY, RunOptions(key_slice=4))
    assert res.record["counts"]["crm_calls"] == 1  # a user-given key slice: one CRM call
    assert res.status == "ok", res.message
    assert res.record["counts"]["propagation_steps"] >= 1
    assert same_geometry(res.mask, sitk.ReadImage(str(src)))
    validate_record(res.record)


def test_slicewise_range_skips_background(session, tmp_path):
    src, organ = phantom(tmp_path / "ct.nrrd", n_slices=10, size=40, air_slices=3, organ_depth=2)
    res = session.ground_volume(src, QUERY, RunOptions(strategy="slicewise", slice_range="1:7", keep_largest=False))
    asked = [s["slice"] for s in res.record["slices"]]
    assert asked == [3, 4, 5, 6]  # 1 and 2 are air; 7+ are outside the range
    assert res.record["counts"]["crm_calls"] == 4
    assert res.status == "ok" and set(res.record["segmented_slices"]) <= set(asked)
    validate_record(res.record)


def test_second_question_reuses_volume_slices_and_embeddings(litemedsam, volumes):
    s = Session(load_models(ModelOptions(), crm=BrightestRegionCRM(), asm=litemedsam))
    src, _ = volumes["lps"]
    first = s.ground_volume(src, QUERY, RunOptions(n_candidates=3)).record["counts"]
    second = s.ground_volume(src, "Where would a gallstone obstruct bile?", RunOptions(n_candidates=3))
    c2 = second.record["counts"]
    assert second.status == "ok"
    assert c2["volume_cache_hits"] == 1 and c2["crm_calls"] == first["crm_calls"]
    assert first["asm_encodes"] >= 3 and c2["asm_encodes"] <= 0.2 * first["asm_encodes"]
    assert c2["embedding_cache_hits"] >= first["asm_encodes"] - c2["asm_encodes"]


def test_in_memory_image_gives_the_same_mask_as_the_file(session, volumes):
    src, _ = volumes["oblique"]
    from_file = session.ground_volume(src, QUERY, RunOptions(n_candidates=2))
    image = sitk.ReadImage(str(src))
    in_memory = session.ground_volume(image, QUERY, RunOptions(n_candidates=2))
    assert in_memory.status == from_file.status == "ok"
    assert np.array_equal(in_memory.mask_array(), from_file.mask_array())
    assert same_geometry(in_memory.mask, image) and in_memory.record["input"]["path"] is None
    assert in_memory.record["counts"]["asm_encodes"] == 0  # embeddings are keyed by content


def test_concurrent_questions_keep_their_own_answers(session, volumes):
    src, _ = volumes["lps"]
    queries = [f"question number {k}: where is the organ?" for k in range(4)]
    results: dict[int, object] = {}

    def ask(k: int) -> None:
        results[k] = session.ground_volume(src, queries[k], RunOptions(n_candidates=2))

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [0, 1, 2, 3]
    for k, res in results.items():
        assert res.query == queries[k] and res.status == "ok"
        assert queries[k] in res.reasoning  # the double echoes the question it was asked
        assert res.record["counts"]["crm_calls"] == 2  # counts are per call, not shared


def test_events_report_stages_and_cancel_stops(session, volumes):
    src, _ = volumes["lps"]
    seen = []
    session.ground_volume(src, QUERY, RunOptions(n_candidates=2),
                          CallbackEvents(progress=lambda st, d, t: seen.append((str(st), d, t))))
    stages = [s for s, _, _ in seen]
    assert "key_slices" in stages and "propagate" in stages
    assert seen[stages.index("key_slices")][1:] == (2, 2)
    token = CancelToken()
    token.set()
    with pytest.raises(CancelledError):
        session.ground_volume(src, QUERY, RunOptions(n_candidates=2), CallbackEvents(cancel=token))


def test_ground_image_keeps_the_input_grid(session, ct_image):
    res = session.ground_image(ct_image, "Where is the densest structure?")
    assert res.status == "ok" and res.mask.shape == ct_image.rgb.shape[:2] and res.mask.any()
    validate_record(res.to_record())
    again = session.ground_image(ct_image, "A second question about the same slice")
    assert again.counts["asm_encodes"] == 0 and again.counts["embedding_cache_hits"] == 1


def test_writer_layout_and_unique_names(session, ct_image, tmp_path):
    stems = StemAllocator()
    names = [stems.take(p) for p in ("d1/a.png", "d2/a.png", "d3/a_2.png", "x/ct.nii.gz", "dicom_dir/")]
    assert names == ["a", "a_2", "a_2_2", "ct", "dicom_dir"]
    res = session.ground_image(ct_image, "Where is the densest structure?")
    out = write_result(res, tmp_path / "case")
    assert sorted(p.name for p in (tmp_path / "case").iterdir()) == ["mask.png", "overlay.png", "result.json"]
    rec = json.loads((tmp_path / "case" / "result.json").read_text())
    validate_record(rec)
    assert rec["outputs"] == out


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


@pytest.mark.parametrize("options,msg", [
    ({"strategy": "magic"}, "unknown strategy"), ({"axis": "oblique"}, "unknown axis"),
    ({"n_candidates": 9}, "n_candidates"), ({"window": "liver-ish"}, "window"), ({"prompt": "chatty"}, "prompt"),
])
def test_bad_run_options_are_refused(options, msg):
    with pytest.raises(InputError, match=msg):
        RunOptions(**options).checked()


# -- the CLI over the session ---------------------------------------------------------------------


def test_cli_refusal_writes_empty_mask_and_exit_4(tiny_models, tmp_path):
    """The real tiny Qwen2.5-VL CRM (untrained) through the CLI: no usable answer -> exit 4."""
    src, _ = phantom(tmp_path / "ct.nii.gz", n_slices=8, size=32)
    rc = main(["segment-volume", "--volume", str(src), "--query", QUERY, "--crm", tiny_models["random"],
               "--max-new-tokens", "12", "--device", "cpu", "--progress", "none", "--out", str(tmp_path / "o")])
    assert rc == EXIT_NO_TARGET
    rec = json.loads((tmp_path / "o" / "ct" / "result.json").read_text())
    assert rec["status"] == "no_target" and "no usable box" in rec["message"]
    validate_record(rec)
    mask = sitk.ReadImage(str(tmp_path / "o" / "ct" / "seg.nii.gz"))
    assert sitk.GetArrayFromImage(mask).sum() == 0 and same_geometry(mask, sitk.ReadImage(str(src)))


@pytest.mark.slow
def test_cli_segment_volume_json_progress_is_only_json(tmp_path, capsys):
    src, organ = phantom(tmp_path / "ct.nii.gz", n_slices=10, size=40, nan=True, organ_depth=2)
    rc = main(["segment-volume", "--volume", str(src), "--query", QUERY, "--crm-backend", BACKEND,
               "--crm", "double", "--device", "cpu", "--candidates", "2", "--window", "abdomen",
               "--progress", "json", "--out", str(tmp_path / "o")])
    assert rc == EXIT_OK
    rec = json.loads((tmp_path / "o" / "ct" / "result.json").read_text())
    assert rec["status"] == "ok" and rec["window"]["chosen"] == [40.0, 400.0]
    assert any("nan" in w.lower() for w in rec["warnings"])
    assert dice(sitk.ReadImage(rec["outputs"]["mask_nifti"]), organ) >= 0.5
    validate_record(rec)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    events = [json.loads(ln) for ln in lines]  # every stderr line is JSON
    assert {"key_slices", "propagate", "cases"} <= {e.get("stage") for e in events if e["event"] == "progress"}


@pytest.mark.slow
def test_cli_progress_none_draws_no_bar(tmp_path, capfd):
    src, _ = phantom(tmp_path / "ct.nii.gz", n_slices=10, size=40)
    rc = main(["segment-volume", "--volume", str(src), "--query", QUERY, "--crm-backend", BACKEND,
               "--crm", "double", "--device", "cpu", "--progress", "none", "--out", str(tmp_path / "o")])
    err = capfd.readouterr().err
    assert rc == EXIT_OK
    assert "\r" not in err and "%|" not in err and "it/s" not in err


@pytest.mark.parametrize("extra,code,msg", [
    (["--slices", "50:60"], EXIT_INPUT, "outside the volume"),
    (["--key-slice", "5", "--slices", "0:3"], EXIT_INPUT, "outside the slice range"),
    (["--strategy", "magic"], EXIT_INPUT, "unknown strategy"),
    (["--window", "liver-ish"], EXIT_INPUT, "window"),
    (["--axis", "oblique"], EXIT_INPUT, "axis"),
    (["--asm", "nnunet"], EXIT_INPUT, "unknown asm"),
    (["--crm-backend", "magic"], EXIT_INPUT, "unknown crm backend"),
])
def test_cli_bad_options(tmp_path, capsys, extra, code, msg):
    src, _ = phantom(tmp_path / "ct.nii.gz", n_slices=6, size=24)
    rc = main(["segment-volume", "--volume", str(src), "--query", QUERY, "--crm-backend", BACKEND,
               "--crm", "double", "--device", "cpu", "--out", str(tmp_path / "o"), *extra])
    assert rc == code and msg in capsys.readouterr().err.lower()
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_2d_and_4d_inputs_are_refused_clearly(session, tmp_path, capsys, ct_path):
    rc = main(["segment-volume", "--volume", ct_path, "--query", QUERY, "--crm-backend", BACKEND,
               "--crm", "double", "--out", str(tmp_path / "o")])
    assert rc == EXIT_INPUT and "medreasoner ground" in capsys.readouterr().err
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(InputError, match="4D"):
        session.ground_volume(tmp_path / "4d.nii.gz", QUERY)
