"""training/sft.py and training/export_bundle.py end to end, through their real command lines.

A six-sample U-MRG parquet is written from pydicom's CT/MR slices (GT masks: the brighter half of a
fixed box, so no segmentation model is needed), the tiny random Qwen2.5-VL CRM (the same model as
conftest's ``tiny_models["random"]``, built here so that this file does not pay for the format-trained
one) is fine-tuned for 2 steps with LoRA and with full fine-tuning, a full run is resumed, and the LoRA
run is exported into a copy of the MONAI bundle that is then run with ``python -m monai.bundle run``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow  # trains or evaluates real tiny models end to end

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "monai_bundle"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
QUERIES = ["Which structure would explain the pain?", "Where is the abnormality?"]


def _run(cmd: list[str], timeout: int = 180, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def tiny_crm(tmp_path_factory) -> Path:
    from medreasoner.models.tiny import build_tiny_crm

    return build_tiny_crm(tmp_path_factory.mktemp("tiny") / "crm_random", format_steps=0)


@pytest.fixture(scope="module")
def umrg_parquet(tmp_path_factory) -> Path:
    from pydicom.data import get_testdata_file

    from medreasoner.data import Sample, write_parquet
    from medreasoner.io.images import load_image
    from medreasoner.science.keypoints import ground_truth_from_mask

    ct = load_image(get_testdata_file("CT_small.dcm")).rgb
    mr = load_image(get_testdata_file("MR_small.dcm")).rgb
    samples = []
    for i, (img, (x1, y1, x2, y2), sup) in enumerate([
            (ct, (40, 30, 100, 90), "Abdomen"), (mr, (10, 10, 50, 50), "Brain"),
            (ct, (20, 60, 80, 120), "Abdomen"), (mr, (20, 5, 60, 40), "Brain"),
            (ct[:, ::-1].copy(), (30, 30, 90, 90), "Lung"), (mr[::-1].copy(), (5, 20, 45, 60), "Brain")]):
        mask = np.zeros(img.shape[:2], bool)
        box = img[y1:y2, x1:x2, 0]
        mask[y1:y2, x1:x2] = box > np.median(box)  # the brighter half of the box
        samples.append(Sample(id=f"s{i}", image=img, mask=mask, query=QUERIES[i % 2],
                              ground_truth=ground_truth_from_mask(mask), supercategory=sup,
                              category=f"{sup.lower()}-organ"))
    return write_parquet(samples, tmp_path_factory.mktemp("umrg") / "train.parquet")


def _config(tmp: Path, tiny_crm: Path, data: Path, **extra) -> Path:
    cfg = {"model_name_or_path": str(tiny_crm), "data": str(data), "split": "train", "per_device_train_batch_size": 2,
           "learning_rate": 1.0e-3, "lora_r": 4, "lora_alpha": 8, "save_steps": 1, "save_total_limit": 5,
           "logging_steps": 1, "report_to": [], **extra}
    path = tmp / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sft(config: Path, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    """``key=value`` overrides become TRL-style ``--key value`` flags on the command line."""
    flags = [a for o in overrides for a in (f"--{o.partition('=')[0]}", o.partition("=")[2])]
    return _run([sys.executable, "training/sft.py", "--config", config, *flags, *(["--resume"] if resume else [])])


def _check_run(out: Path, steps: int) -> list[dict]:
    for n in range(1, steps + 1):
        assert (out / f"checkpoint-{n}" / "trainer_state.json").is_file(), n
        assert (out / f"checkpoint-{n}" / "medreasoner_crm.json").is_file(), n  # sidecar travels along
    final = out / "final"
    assert (final / "medreasoner_crm.json").is_file()
    assert (final / "tokenizer.json").is_file() and (final / "processor_config.json").is_file()
    history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [h for h in history if "loss" in h]
    assert [h["step"] for h in losses] == list(range(1, steps + 1))
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in losses)
    assert (out / "loss.png").stat().st_size > 1000
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "sft" and run["global_step"] == steps
    assert run["config"]["trainer"]["max_steps"] == steps and run["resolved"]["samples"] == 6
    assert Path(run["config"]["model"]["model_name_or_path"]).resolve() == Path(run["resolved"]["model"])
    return history


def _two_step_run(tmp_path_factory, tiny_crm, umrg_parquet, lora: bool) -> Path:
    tmp = tmp_path_factory.mktemp("lora" if lora else "full")
    out = tmp / "run"
    _ok(_sft(_config(tmp, tiny_crm, umrg_parquet, use_peft=lora, output_dir=str(out)), "max_steps=2"))
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_crm, umrg_parquet) -> Path:
    return _two_step_run(tmp_path_factory, tiny_crm, umrg_parquet, lora=True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_crm, umrg_parquet) -> Path:
    return _two_step_run(tmp_path_factory, tiny_crm, umrg_parquet, lora=False)


def test_sft_lora_two_steps(lora_run, tiny_crm):
    _check_run(lora_run, 2)
    final = lora_run / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == tiny_crm.resolve()
    assert not (final / "model.safetensors").exists()  # the adapter only
    weights = _tensors(final / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(np.abs(v).max() > 0 for v in lora_b)  # peft starts lora_B at zero: it was trained
    assert all("language_model" in k or "layers" in k for k in weights)  # q/k/v/o_proj of the LM only


def test_sft_full_two_steps(full_run, tiny_crm):
    _check_run(full_run, 2)
    before, after = _tensors(tiny_crm / "model.safetensors"), _tensors(full_run / "final" / "model.safetensors")
    assert set(before) == set(after)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed  # full fine-tuning moves (nearly) every tensor
    assert any(k.startswith(("visual.", "model.visual.")) for k in changed)  # the vision tower too


def test_sft_resume_continues_from_last_checkpoint(full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    config = tmp_path / "sft.yaml"
    cfg = yaml.safe_load((full_run.parent / "sft.yaml").read_text())
    config.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))

    refused = _sft(config, "max_steps=3")  # an existing run is never trained over by accident
    assert refused.returncode != 0 and "--resume" in refused.stderr

    before = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    _ok(_sft(config, "max_steps=3", resume=True))
    history = _check_run(out, 3)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    run = json.loads((out / "run.json").read_text())
    assert Path(run["resumed_from"]).name == "checkpoint-2"
    # the log history continues the first run's: steps 1-2 carried over unchanged, then step 3
    old = [h for h in before if "loss" in h]
    new = [h for h in history if "loss" in h]
    assert new[:2] == old and new[2]["step"] == 3


def test_export_lora_run_to_bundle_and_run_it(lora_run, tiny_crm, tmp_path):
    from PIL import Image

    from medreasoner.models.crm import load_crm

    dest = tmp_path / "bundle"
    for bad in (BUNDLE, ROOT):  # the source bundle itself, or a folder that is not empty
        proc = _run([sys.executable, "training/export_bundle.py", lora_run / "final", "--bundle", BUNDLE,
                     "--out", bad], timeout=60)
        assert proc.returncode == 2 and "--out" in proc.stderr

    proc = _ok(_run([sys.executable, "training/export_bundle.py", lora_run / "final", "--bundle", BUNDLE,
                     "--out", dest, "--run-name", "sft-lora-test"]))
    assert str(dest) in proc.stdout
    command = next(line for line in proc.stdout.splitlines() if line.startswith("python -m monai.bundle run"))
    assert f"--config_file {dest}/configs/inference.json" in command
    assert not list(tmp_path.glob(".bundle.*"))  # no staging folder left behind

    # metadata: patch version bumped, the changelog names the run and the checkpoint
    old_meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    meta = json.loads((dest / "configs" / "metadata.json").read_text())
    major, minor, patch = (int(v) for v in old_meta["version"].split("."))
    assert meta["version"] == f"{major}.{minor}.{patch + 1}"
    entry = meta["changelog"][meta["version"]]
    assert "sft-lora-test" in entry and str((lora_run / "final").resolve()) in entry
    assert list(meta["changelog"])[0] == meta["version"] and old_meta["version"] in meta["changelog"]

    # the CRM: merged (no adapter left), marked tiny, weights differ from the base where LoRA was applied
    crm = dest / "models" / "crm"
    assert not (crm / "adapter_config.json").exists()
    assert json.loads((crm / "medreasoner_crm.json").read_text())["tiny_test_model"] is True
    base, merged = _tensors(tiny_crm / "model.safetensors"), _tensors(crm / "model.safetensors")
    assert set(base) == set(merged)
    changed = {k for k in base if not np.array_equal(base[k], merged[k])}
    assert changed and all(re.search(r"\.(q|k|v|o)_proj\.weight$", k) for k in changed)
    model = load_crm(str(crm), device="cpu", image_size="auto")
    assert model.is_tiny and model.image_size == 112

    # the exported bundle runs as is: its crm default is models/crm
    image = tmp_path / "slice.png"
    img = np.full((40, 56), 30, np.uint8)
    img[10:20, 18:37] = 220
    Image.fromarray(img).save(image)
    outputs = tmp_path / "out"
    proc = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", dest / "configs" / "inference.json",
                 "--meta_file", dest / "configs" / "metadata.json", "--image", image, "--query", QUERIES[0],
                 "--output_dir", outputs, "--max_new_tokens", "40", "--device", "cpu"], cwd=tmp_path)
    assert (outputs / "slice" / "mask.png").is_file() and (outputs / "slice" / "result.json").is_file(), proc.stderr[-3000:]
    result = json.loads((outputs / "slice" / "result.json").read_text())
    # the SFT'd tiny CRM's answer is not predictable; the exit code must match what it answered
    assert proc.returncode == {"ok": 0, "no_target": 4}[result["status"]], proc.stderr[-3000:]
    assert Path(result["crm"]["model"]).resolve() == crm.resolve()
