"""The MONAI bundle in monai_bundle/: metadata, config, and real `python -m monai.bundle run` calls.

Modelled on model-zoo's bundle unit tests (run the real bundle on small synthetic data): a CT-like
phantom volume with a non-identity affine, a 2D PNG, a two-case dataset folder, and a missing image,
each through the bundle CLI with the tiny test CRM and the real LiteMedSAM weights, offline.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pytest

BUNDLE = Path(__file__).resolve().parent.parent / "monai_bundle"
CONFIG = BUNDLE / "configs" / "inference.json"
META = BUNDLE / "configs" / "metadata.json"
SCHEMA = BUNDLE / "docs" / "meta_schema.json"
TENSOR_FIELDS = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                 "is_patch_data", "channel_def")
QUERY = "Which structure would explain this patient's abdominal pain?"


def _json(path: Path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------- metadata


def test_metadata_validates_against_schema():
    import jsonschema

    schema, meta = _json(SCHEMA), _json(META)
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(meta, schema, cls=jsonschema.Draft7Validator)

    broken = copy.deepcopy(meta)
    del broken["network_data_format"]["outputs"]["pred"]["dtype"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


def test_verify_metadata_offline_with_local_schema(tmp_path):
    """monai.bundle.verify_metadata skips the download when the schema file exists (no network used)."""
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))

    broken = _json(META)
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


def test_metadata_content():
    meta = _json(META)
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "supported_apps", "name", "task", "description", "authors",
                "copyright", "data_source", "data_type", "intended_use", "references", "network_data_format"):
        assert key in meta, key
    assert meta["version"] == "0.2.0" and meta["version"] in meta["changelog"]
    assert "optional_packages_version" not in meta  # monai.bundle would rename it over required_packages_version
    assert "research" in meta["intended_use"].lower() and "clinical" in meta["intended_use"].lower()
    refs = " ".join(meta["references"])
    for name in ("MedReasoner", "MedSAM2", "SAM 2", "Qwen2.5-VL"):
        assert name in refs, name
    for pkg in meta["required_packages_version"]:
        try:
            version(pkg)
        except PackageNotFoundError:
            pytest.fail(f"required package {pkg} is not installed")

    fmt = meta["network_data_format"]
    assert set(fmt["inputs"]) == {"image", "query"} and {"pred", "box", "points"} <= set(fmt["outputs"])
    for kind in ("inputs", "outputs"):
        for name, spec in fmt[kind].items():
            missing = [f for f in TENSOR_FIELDS if f not in spec]
            assert not missing, f"{kind}.{name} lacks {missing}"
            assert isinstance(spec["is_patch_data"], bool) and isinstance(spec["num_channels"], int)
            assert all(k.isdigit() for k in spec["channel_def"])
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == 1 and image["format"] in ("hounsfield", "magnitude")
    assert image["is_patch_data"] is False and image["spatial_shape"] == ["*", "*", "*"]
    assert pred["format"] == "segmentation" and pred["num_channels"] == 1
    assert pred["channel_def"]["0"] == "background" and pred["channel_def"]["1"].startswith("target")
    assert fmt["inputs"]["query"]["type"] == "string"


# ----------------------------------------------------------------------------------------- config


@pytest.fixture
def bundle_scripts():
    """The bundle's `scripts` package importable in this process (as `monai.bundle run` arranges)."""
    sys.path.insert(0, str(BUNDLE))
    import scripts.inference

    yield scripts.inference
    sys.path.remove(str(BUNDLE))
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


def _parser(**override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.read_meta(str(META))
    parser.update(override)
    parser.parse()
    return parser


def test_config_ids_resolve_without_loading_models(bundle_scripts, tmp_path):
    import functools
    from pydoc import locate

    from monai.bundle import ConfigComponent

    image = tmp_path / "x.png"
    image.write_bytes(b"not read here")
    parser = _parser(image=str(image), query=QUERY, output_dir=str(tmp_path / "out"))
    assert parser.get_parsed_content("_meta_#version") == "0.2.0"
    assert isinstance(parser["run"], list) and parser["run"]
    assert Path(parser.get_parsed_content("bundle_root")) == BUNDLE
    assert parser.get_parsed_content("crm") == bundle_scripts.default_crm(BUNDLE)
    assert parser.get_parsed_content("asm") == "litemedsam"
    assert parser.get_parsed_content("asm_checkpoint") is None
    assert parser.get_parsed_content("cases") == [(str(image), QUERY)]
    for key in ("image", "query", "dataset_dir", "output_dir", "strategy", "axis", "window", "slice_range",
                "key_slice", "n_candidates", "keep_largest", "crm_backend", "device", "max_new_tokens", "bundle_root"):
        assert key in parser, key
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, functools.partial) and inferer.func is bundle_scripts.run
    from medreasoner.engine import ModelOptions, RunOptions

    # the options are the core's own objects, checked without loading anything
    assert isinstance(parser.get_parsed_content("model_options"), ModelOptions)
    assert parser.get_parsed_content("run_options") == RunOptions()
    comp = _parser().get_parsed_content("model_options", instantiate=False)
    assert isinstance(comp, ConfigComponent) and callable(locate(parser["model_options"]["_target_"]))
    assert parser["session"].startswith("$scripts.inference.load_session(")  # the only place models load

    default = _parser()
    assert default.get_parsed_content("output_dir") == str(BUNDLE / "eval")
    assert default.get_parsed_content("strategy") == "keyslice" and default["device"] == "auto"


@pytest.mark.parametrize("override,expected", [
    ({"strategy": "slicewise", "axis": "coronal"}, {"strategy": "slicewise", "axis": "coronal"}),
    ({"key_slice": 7, "n_candidates": 2, "keep_largest": False}, {"key_slice": 7, "n_candidates": 2,
                                                                  "keep_largest": False}),
    ({"window": "40,400", "slice_range": "2:9", "prompt": "direct"}, {"window": (40.0, 400.0),
                                                                      "slice_range": "2:9", "prompt": "direct"}),
])
def test_override_dicts_reach_the_run_options(bundle_scripts, override, expected):
    """As model-zoo's vista3d tests do: each override dict lands in the options the core runs with."""
    options = _parser(**override).get_parsed_content("run_options")
    for key, value in expected.items():
        assert getattr(options, key) == value, key


@pytest.mark.parametrize("override,msg", [
    ({"strategy": "magic"}, "unknown strategy"), ({"axis": "oblique"}, "unknown axis"),
    ({"n_candidates": 0}, "n_candidates"), ({"window": "nonsense"}, "window"),
])
def test_bad_override_is_refused_before_models_load(bundle_scripts, override, msg, caplog):
    with pytest.raises(SystemExit) as exc:
        _parser(**override).get_parsed_content("run_options")
    assert exc.value.code == 2 and msg in caplog.text.lower()


def test_bad_model_override_is_refused_before_models_load(bundle_scripts, caplog):
    with pytest.raises(SystemExit) as exc:
        _parser(asm="nnunet").get_parsed_content("model_options")
    assert exc.value.code == 2 and "unknown asm" in caplog.text.lower()


def test_case_list_building(bundle_scripts, tmp_path):
    build = bundle_scripts.build_cases
    (tmp_path / "sub").mkdir()
    for name in ("sub/a.png", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "query"], ["sub/a.png", "first?"], [str(tmp_path / "b.nii.gz"), ""]])
    assert build(dataset_dir=str(tmp_path), query="default?") == [
        (str(tmp_path / "sub/a.png"), "first?"), (str(tmp_path / "b.nii.gz"), "default?")]
    with pytest.raises(SystemExit) as exc:  # second row has no query and there is no default
        build(dataset_dir=str(tmp_path))
    assert exc.value.code == 2

    js = tmp_path / "js"
    js.mkdir()
    (js / "cases.json").write_text(json.dumps([{"image": "../sub/a.png", "query": "q"}]))
    assert build(dataset_dir=str(js)) == [(str(js / "../sub/a.png"), "q")]
    # python-fire turns `--query "a, b"` into a tuple and `--slice_range null` into the string 'null'
    assert build(image=str(tmp_path / "b.nii.gz"), query=("liver", "spleen"), dataset_dir="null") == [
        (str(tmp_path / "b.nii.gz"), "liver, spleen")]
    for bad in ({"image": str(tmp_path / "nope.png"), "query": "q"}, {"image": None, "query": "q"},
                {"image": str(tmp_path / "b.nii.gz"), "query": "q", "dataset_dir": str(tmp_path)},
                {"dataset_dir": str(tmp_path / "sub")}):
        with pytest.raises(SystemExit) as exc:
            build(**bad)
        assert exc.value.code == 2, bad
    assert bundle_scripts.window_option((40, 400)) == (40.0, 400.0)
    assert bundle_scripts.window_option("40,400") == (40.0, 400.0)
    assert bundle_scripts.window_option("lung") == "lung" and bundle_scripts.window_option("null") is None
    assert bundle_scripts.slice_range_option("null") is None and bundle_scripts.slice_range_option("2:5") == "2:5"


# ------------------------------------------------------------------------------------- real runs


def _phantom(path: Path) -> Path:
    """48x48x12 int16 CT-like volume (air -1000, body ~0 HU, bright ellipsoid) with a rotated affine."""
    import nibabel as nib

    i, j, k = np.mgrid[0:48, 0:48, 0:12].astype(np.float32)
    vol = np.full((48, 48, 12), -1000, np.int16)
    vol[((i - 24) / 20) ** 2 + ((j - 24) / 18) ** 2 <= 1] = 20
    vol[((i - 28) / 8) ** 2 + ((j - 22) / 6) ** 2 + ((k - 6) / 4) ** 2 <= 1] = 250
    affine = np.array([[0.0, -0.8, 0.0, 30.0], [0.7, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return path


def _png(path: Path, size=(56, 40)) -> Path:
    from PIL import Image

    w, h = size
    img = np.full((h, w), 30, np.uint8)
    img[h // 4: h // 2, w // 3: 2 * w // 3] = 220
    Image.fromarray(img).save(path)
    return path


def _bundle(tmp_path: Path, tiny_models, *args: str, timeout: int = 300, crm: str = "random"):
    """A real `python -m monai.bundle run` in a subprocess with a real tiny Qwen2.5-VL CRM."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG), "--meta_file", str(META),
           *args, "--crm", tiny_models[crm], "--asm", "litemedsam", "--max_new_tokens", "16",
           "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    m = re.search(r"^\[\s*$.*^\]\s*$", proc.stdout, re.M | re.S)  # the summary (monai also logs to stdout)
    return proc, (json.loads(m.group(0)) if m else None)


def _bundle_in_process(bundle_scripts, capsys, **override):
    """`monai.bundle.run` in this process with the CRM test double (backend test-brightest, see
    tests/doubles.py) so a run has a known answer; returns (exit code, summary)."""
    from monai.bundle import run

    try:
        run(config_file=str(CONFIG), meta_file=str(META), crm_backend="test-brightest", crm="double",
            asm="litemedsam", device="cpu", **override)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr().out
    m = re.search(r"^\[\s*$.*^\]\s*$", out, re.M | re.S)
    return code, (json.loads(m.group(0)) if m else None)


def _check_volume_outputs(case_dir: Path, image: Path, status: str):
    import nibabel as nib
    from PIL import Image

    from medreasoner.engine import validate_record

    src, seg = nib.load(str(image)), nib.load(str(case_dir / "seg.nii.gz"))
    assert seg.shape == src.shape
    assert np.allclose(seg.affine, src.affine, atol=1e-5), (seg.affine, src.affine)
    mask = np.asarray(seg.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    assert (case_dir / "seg.seg.nrrd").is_file()
    record = _json(case_dir / "result.json")
    validate_record(record)
    assert record["status"] == status and record["query"]
    assert int(mask.sum()) == record["voxels"]
    if status == "no_target":
        assert not mask.any() and record["message"]
    else:
        assert mask.any()
        with Image.open(case_dir / "montage.png") as im:
            assert im.size[0] > 0
    return record


def _check_2d_outputs(case_dir: Path, image: Path, status: str):
    from PIL import Image

    from medreasoner.engine import validate_record

    with Image.open(image) as src, Image.open(case_dir / "mask.png") as mask:
        assert mask.size == src.size
        values = set(np.unique(np.asarray(mask)))
    assert values == ({0} if status == "no_target" else {0, 255})
    record = _json(case_dir / "result.json")
    validate_record(record)
    assert record["status"] == status
    assert (case_dir / "overlay.png").is_file()


@pytest.mark.slow
def test_bundle_run_volume(tmp_path, bundle_scripts, capsys):
    image = _phantom(tmp_path / "phantom.nii.gz")
    out = tmp_path / "out"
    # `--window null` reaches the config as the string 'null', which means unset (a CT preset from the query)
    code, summary = _bundle_in_process(bundle_scripts, capsys, image=str(image), query=QUERY, output_dir=str(out),
                                       slice_range="3:10", window="null", n_candidates=2)
    assert code == 0 and [s["status"] for s in summary] == ["ok"]
    (case,) = summary
    assert Path(case["outputs"]["mask_nifti"]) == out / "phantom" / "seg.nii.gz"
    record = _check_volume_outputs(out / "phantom", image, "ok")
    assert record["strategy"] == "keyslice" and record["slice_range"] == [3, 10]
    assert record["window"]["requested"] is None and record["counts"]["crm_calls"] == 2
    assert record["counts"]["propagation_steps"] >= 1


@pytest.mark.slow
def test_bundle_run_2d(tmp_path, bundle_scripts, capsys):
    image = _png(tmp_path / "slice.png")
    out = tmp_path / "out"
    code, summary = _bundle_in_process(bundle_scripts, capsys, image=str(image), query=QUERY, output_dir=str(out))
    assert code == 0 and summary[0]["status"] == "ok"
    _check_2d_outputs(out / "slice", image, "ok")


@pytest.mark.slow
def test_bundle_run_dataset_dir(tmp_path, bundle_scripts, capsys):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    png = _png(data / "imgs" / "xray.png", size=(48, 64))
    vol = _phantom(data / "ct.nii.gz")
    with open(data / "cases.csv", "w", newline="") as f:  # relative paths; the 2nd row takes --query
        csv.writer(f).writerows([["image", "query"], ["imgs/xray.png", "Where is the bright region?"],
                                 ["ct.nii.gz", ""]])
    out = tmp_path / "out"
    code, summary = _bundle_in_process(bundle_scripts, capsys, dataset_dir=str(data), query=QUERY,
                                       output_dir=str(out), strategy="slicewise", slice_range="6:7")
    assert code == 0 and [s["status"] for s in summary] == ["ok", "ok"]
    assert [s["input"] for s in summary] == [str(png), str(vol)]
    assert summary[1]["query"] == QUERY
    _check_2d_outputs(out / "xray", png, "ok")
    assert _check_volume_outputs(out / "ct", vol, "ok")["slice_range"] == [6, 7]


@pytest.mark.slow
def test_bundle_cli_and_core_cli_write_the_same_layout(tmp_path, bundle_scripts, capsys):
    from medreasoner.cli import main

    image = _phantom(tmp_path / "phantom.nii.gz")
    code, _ = _bundle_in_process(bundle_scripts, capsys, image=str(image), query=QUERY,
                                 output_dir=str(tmp_path / "bundle"), slice_range="5:8", n_candidates=1)
    rc = main(["segment-volume", "--volume", str(image), "--query", QUERY, "--crm-backend", "test-brightest",
               "--crm", "double", "--device", "cpu", "--slices", "5:8", "--candidates", "1", "--progress", "none",
               "--out", str(tmp_path / "cli")])
    assert code == rc == 0
    files = [sorted(str(p.relative_to(tmp_path / side)) for p in (tmp_path / side).rglob("*"))
             for side in ("bundle", "cli")]
    assert files[0] == files[1] and "phantom/seg.nii.gz" in files[0]
    masks = [nib_mask(tmp_path / side / "phantom" / "seg.nii.gz") for side in ("bundle", "cli")]
    assert np.array_equal(*masks) and masks[0].any()


def nib_mask(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.slow
def test_bundle_subprocess_with_the_real_tiny_crm(tmp_path, tiny_models):
    """The real bundle command and the real (untrained) Qwen2.5-VL CRM: no usable answer -> exit 4,
    an empty mask on the input grid and the reason, in the same layout."""
    image = _phantom(tmp_path / "phantom.nii.gz")
    out = tmp_path / "out"
    proc, summary = _bundle(tmp_path, tiny_models, "--image", str(image), "--query", QUERY, "--output_dir", str(out),
                            "--slice_range", "5:7", "--n_candidates", "1")
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert [s["status"] for s in summary] == ["no_target"]
    record = _check_volume_outputs(out / "phantom", image, "no_target")
    assert any("TINY TEST MODEL" in w for w in record["warnings"])


@pytest.mark.slow
def test_bundle_run_missing_image(tmp_path, tiny_models):
    out = tmp_path / "out"
    missing = tmp_path / "no_such_volume.nii.gz"
    proc, summary = _bundle(tmp_path, tiny_models, "--image", str(missing), "--query", QUERY,
                            "--output_dir", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"image not found: {missing}" in proc.stderr
    assert "loading CRM" not in proc.stderr  # checked before any model is loaded
    assert summary is None and not out.exists()
