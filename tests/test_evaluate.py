"""`medreasoner evaluate` end to end on a U-MRG-format parquet written here with real LiteMedSAM masks."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from medreasoner.cli import EXIT_OK, main
from medreasoner.errors import CancelledError
from medreasoner.science.evaluate import Shard, read_jsonl, run_shard

pytestmark = pytest.mark.slow  # trains or evaluates real tiny models end to end

QUERIES = ["Which structure would explain the pain?", "Where is the abnormality?"]


@pytest.fixture(scope="module")
def umrg_parquet(tmp_path_factory, litemedsam):
    """Six samples from pydicom's CT/MR slices; GT masks are LiteMedSAM's masks for fixed boxes."""
    from pydicom.data import get_testdata_file

    from medreasoner.data import Sample, write_parquet
    from medreasoner.io.images import load_image
    from medreasoner.science.keypoints import ground_truth_from_mask

    ct = load_image(get_testdata_file("CT_small.dcm")).rgb
    mr = load_image(get_testdata_file("MR_small.dcm")).rgb
    samples = []
    for i, (img, box, sup) in enumerate([(ct, (40, 30, 100, 90), "Abdomen"), (mr, (10, 10, 50, 50), "Brain"),
                                         (ct, (20, 60, 80, 120), "Abdomen"), (mr, (20, 5, 60, 40), "Brain"),
                                         (ct[:, ::-1].copy(), (30, 30, 90, 90), "Lung"),
                                         (mr[::-1].copy(), (5, 20, 45, 60), "Brain")]):
        mask = litemedsam.segment(img, box).mask
        samples.append(Sample(id=f"s{i}", image=img, mask=mask, query=QUERIES[i % 2],
                              ground_truth=ground_truth_from_mask(mask), supercategory=sup,
                              category=f"{sup.lower()}-organ"))
    path = tmp_path_factory.mktemp("umrg") / "test.parquet"
    write_parquet(samples, path)
    return path


def _args(tiny, data, out, *extra):
    return ["evaluate", "--data", str(data), "--split", "test", "--crm", tiny["format"], "--asm", "litemedsam",
            "--max-new-tokens", "120", "--device", "cpu", "--batch-size", "2", "--progress", "none",
            "--out", str(out), *extra]


def test_evaluate_writes_table_summary_and_pictures(tiny_models, umrg_parquet, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(_args(tiny_models, umrg_parquet, out)) == EXIT_OK
    records = read_jsonl(out / "predictions.jsonl")
    assert sorted(r["id"] for r in records) == [f"s{i}" for i in range(6)]
    for r in records:
        assert set(r["metrics"]) >= {"iou", "pdice", "disc_dice", "dice", "mask_iou", "refused"}
        if r["box"] is not None:  # the GT and predicted masks live on the same image grid
            assert (out / "masks" / f"{r['id']}.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 6
    assert set(summary["by_supercategory"]) == {"Abdomen", "Brain", "Lung"}
    assert summary["run"]["crm"]["tiny_test_model"] is True
    # the table is computed from the records, not copied from anywhere
    mean_iou = 100 * np.mean([r["metrics"]["iou"] for r in records])
    assert abs(summary["overall"]["iou"] - mean_iou) < 1e-9
    table = (out / "table.md").read_text()
    assert "| **all** |" in table and "| Brain |" in table
    for pic in ("overlays.png", "histograms.png"):
        assert (out / pic).stat().st_size > 1000
    assert "TINY TEST MODEL" in capsys.readouterr().err


def test_evaluate_resumes_after_interruption(tiny_models, umrg_parquet, tmp_path):
    from medreasoner.cli import build_parser, model_options
    from medreasoner.data import load_samples
    from medreasoner.engine import CallbackEvents, CancelToken, Session, load_models

    out = tmp_path / "eval"
    args = build_parser().parse_args(_args(tiny_models, umrg_parquet, out))
    session = Session(load_models(model_options(args)))
    samples = load_samples(umrg_parquet, split="test")
    stop = CancelToken()

    def progress(stage, done, total):  # interrupt after the first batch of 2
        if done >= 2:
            stop.set()

    with pytest.raises(CancelledError, match="rerun to resume"):
        run_shard(samples, session, out, Shard(), events=CallbackEvents(progress=progress, cancel=stop))
    shard = Shard().path(out)
    first = read_jsonl(shard)
    assert len(first) == 2
    with shard.open("a") as f:
        f.write('{"id": "s2", "metr')  # a line cut short by a crash

    calls = []
    original = session.ground_images
    session.ground_images = lambda images, queries, *a, **kw: calls.append(len(images)) or original(images, queries,
                                                                                                   *a, **kw)
    run_shard(samples, session, out, Shard())
    assert sum(calls) == 4  # only the unfinished samples ran again
    final = read_jsonl(shard)
    assert [r["id"] for r in final] == [f"s{i}" for i in range(6)]
    assert final[:2] == first


def test_resume_reuses_only_work_from_the_same_data_models_and_prompt(tiny_models, umrg_parquet, tmp_path):
    from dataclasses import replace

    from medreasoner.cli import build_parser, model_options
    from medreasoner.data import load_samples
    from medreasoner.engine import RunOptions, Session, load_models

    out = tmp_path / "eval"
    session = Session(load_models(model_options(build_parser().parse_args(_args(tiny_models, umrg_parquet, out)))))
    samples = load_samples(umrg_parquet, split="test")
    calls = []
    original = session.ground_images
    session.ground_images = lambda images, queries, *a, **kw: calls.append(len(images)) or original(images, queries,
                                                                                                   *a, **kw)

    def run(data, **options) -> int:
        calls.clear()
        run_shard(data, session, out, Shard(), options=RunOptions(**options))
        return sum(calls)

    assert run(samples) == 6
    assert run(samples) == 0  # the same work: all reused
    changed = list(samples)
    changed[3] = replace(samples[3], query="Which structure is enlarged?")
    changed[4] = replace(samples[4], image=samples[4].image[::-1].copy())
    assert run(changed) == 2  # a new question, new pixels: those two again
    records = {r["id"]: r for r in read_jsonl(Shard().path(out))}
    assert len(records) == 6 and records["s3"]["query"] == "Which structure is enlarged?"
    assert run(changed, prompt="direct") == 6  # another prompt: nothing reused
    session.models.crm.generation.max_new_tokens = 60
    assert run(changed, prompt="direct") == 6  # other generation settings: nothing reused
    assert run(changed, prompt="direct") == 0
    assert len(read_jsonl(Shard().path(out))) == 6


@pytest.mark.multiprocess
def test_two_ranks_under_torchrun_merge(tiny_models, umrg_parquet, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "eval"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "medreasoner",
           *_args(tiny_models, umrg_parquet, out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    shards = sorted((out / "shards").glob("*.jsonl"))
    assert [s.name for s in shards] == ["predictions.rank000-of-002.jsonl", "predictions.rank001-of-002.jsonl"]
    assert [len(read_jsonl(s)) for s in shards] == [3, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 6 and summary["run"]["world_size"] == 2
