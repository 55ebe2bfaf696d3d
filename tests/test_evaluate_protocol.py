"""`evaluate --protocol reference|robust`: the reference's strict rules against this project's repairs.

Every answer form the two protocols treat differently is a hand-computed case here. The end-to-end runs
use two test doubles registered below. ``test-scripted`` stands in for the Clinical Reasoning Module
(a Qwen2.5-VL model): it returns, for each question, a completion written in advance. ``test-boxfill``
stands in for the ASM (MedSAM2): its mask is the prompt box filled, and like the stock ASMs it refuses a
box without area, so every Dice is computable by hand. The parsers, the metrics, the engine, the
reports and the CLI all run for real on known answers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from medreasoner.cli import EXIT_INPUT, EXIT_OK, main
from medreasoner.errors import InputError
from medreasoner.imaging.resize import ResizeMap
from medreasoner.models.answer import parse_answer_reference, parse_completion
from medreasoner.models.asm.base import ASM, SegmentResult, check_prompts
from medreasoner.models.crm.base import CRM, CRMAnswer, answer_in_original_pixels
from medreasoner.models.registry import ASMS, CRMS
from medreasoner.science.evaluate import protocol_settings, read_jsonl, rebuild_table
from medreasoner.science.metrics import reference_sample_metrics, sample_metrics

# -- hand-computed forms ----------------------------------------------------------------------------------
# GT box [0, 0, 100, 100]; GT points (25, 50), (75, 50): a disc of radius 25 centred at (50, 50).
# The intended answer: box [0, 0, 50, 100] -> IoU 5000 / (5000 + 10000 - 5000) = 0.5; points (40, 50),
# (60, 50): a disc of radius 10 inside the GT disc -> pDice 2 * 100pi / (100pi + 625pi - 100pi) = 0.32.
GT = {"bbox_2d": [0, 0, 100, 100], "point_2d": [[25, 50], [75, 50]]}
IMAGE = (200, 200)
D = '"bbox": [0, 0, 50, 100], "points_1": [40, 50], "points_2": [60, 50]'
S = "'bbox': [0, 0, 50, 100], 'points_1': [40, 50], 'points_2': [60, 50]"
FAIL = (0.0, 0.0, True)

FORMS = [
    # id, completion, reference (IoU, pDice, failed), robust (IoU, pDice, refused), robust repair
    ("reference format", f"<think>t</think><answer>{{{S}}}</answer>", (0.5, 0.32, False), (0.5, 0.32, False), None),
    ("code fence", f"<answer>```json\n{{{D}}}\n```</answer>", FAIL, (0.5, 0.32, False), None),
    ("bare JSON", f"{{{D}}}", FAIL, (0.5, 0.32, False), "no <answer> tags"),
    ("missing </answer>", f"<think>t</think><answer>{{{S}}}", FAIL, (0.5, 0.32, False), "missing </answer>"),
    ("prose inside the answer", f"<answer>The lesion is here: {{{S}}}</answer>", FAIL, (0.5, 0.32, False), None),
    ("bbox_2d/point_2d keys", '<answer>{"bbox_2d": [0, 0, 50, 100], "point_2d": [[40, 50], [60, 50]]}</answer>',
     FAIL, (0.5, 0.32, False), None),
    ("trailing comma", f"<answer>{{{D},}}</answer>", FAIL, (0.5, 0.32, False), None),
    ("tuples", "<answer>{'bbox': (0, 0, 50, 100), 'points_1': (40, 50), 'points_2': (60, 50)}</answer>",
     FAIL, (0.5, 0.32, False), None),
    ("numbers as strings", "<answer>{'bbox': ['0', '0', '50', '100'], 'points_1': ['40', '50'], "
     "'points_2': ['60', '50']}</answer>", FAIL, (0.5, 0.32, False), None),
    ("uppercase tags", f"<THINK>t</THINK><ANSWER>{{{S}}}</ANSWER>", FAIL, (0.5, 0.32, False), None),
    # inverted: the raw corners intersect nothing -> IoU 0, scored; reordered it is the intended box
    ("inverted corners", "<answer>{'bbox': [50, 100, 0, 0], 'points_1': [40, 50], 'points_2': [60, 50]}</answer>",
     (0.0, 0.32, False), (0.5, 0.32, False), "box corners were inverted"),
    # raw [-50, 0, 50, 100]: intersection 50 x 100, areas 10000 + 10000 -> 5000 / 15000; clipped: the intended box
    ("partly outside, clipped", "<answer>{'bbox': [-50, 0, 50, 100], 'points_1': [40, 50], "
     "'points_2': [60, 50]}</answer>", (0.3333, 0.32, False), (0.5, 0.32, False), "box clipped"),
    # the reference fails the whole sample; the robust protocol segments from the box alone
    ("box without points", "<answer>{'bbox': [0, 0, 50, 100]}</answer>", FAIL, (0.5, 0.0, False), None),
    # each point as [[x, y], [x, y]]: the reference's numpy arithmetic gives centres cx = [50, 50],
    # cy = [50, 55], d = 5 and r = |P1 - P2| / 2 = 5 -> nested: 2 * 25pi / 625pi = 0.08; here: invalid points
    ("points as [[x,y],[x,y]]", "<answer>{'bbox': [0, 0, 50, 100], 'points_1': [[50, 50], [50, 50]], "
     "'points_2': [[50, 50], [50, 60]]}</answer>", (0.5, 0.08, False), (0.5, 0.0, False), None),
    ("zero-area box", "<answer>{'bbox': [0, 0, 0, 100], 'points_1': [40, 50], 'points_2': [60, 50]}</answer>",
     (0.0, 0.32, False), (0.0, 0.32, True), None),
    ("box fully outside the image", "<answer>{'bbox': [300, 300, 400, 400], 'points_1': [40, 50], "
     "'points_2': [60, 50]}</answer>", (0.0, 0.32, False), (0.0, 0.32, True), None),
    # the reference counts a failure as think == "error" and IoU == pDice == 0, even for a scored answer
    ('think text "error"', "<think>error</think><answer>{'bbox': [150, 150, 190, 190], 'points_1': [170, 170], "
     "'points_2': [170, 170]}</answer>", (0.0, 0.0, True), (0.0, 0.0, False), None),
]


@pytest.mark.parametrize("completion,ref,rob,repair", [f[1:] for f in FORMS], ids=[f[0] for f in FORMS])
def test_form_scored_by_both_protocols(completion, ref, rob, repair):
    strict = parse_answer_reference(completion, IMAGE)
    m = reference_sample_metrics(strict, GT)
    assert (m["iou"], m["pdice"], m["failed"]) == ref, (m, strict.failure)
    assert (m["failure"] is not None) == (ref == FAIL and "error" not in completion)
    robust = parse_completion(completion, image_size=IMAGE)
    r = sample_metrics(robust.box, robust.points, GT, None, None)
    assert r["iou"] == pytest.approx(rob[0], abs=1e-4)
    assert r["pdice"] == pytest.approx(rob[1], abs=1e-4)
    assert r["refused"] is rob[2]
    if repair:
        assert any(repair in x for x in robust.repairs), robust.repairs
    assert strict.notes is not None and not hasattr(strict, "repairs")  # the strict reading repairs nothing


def test_strict_prompt_is_the_raw_answer():
    inverted = parse_answer_reference("<answer>{'bbox': [50, 100, 0, 0], 'points_1': [40, 50], "
                                      "'points_2': [60, 50]}</answer>", IMAGE)
    assert inverted.asm_prompt() == ((50.0, 100.0, 0.0, 0.0), [(40.0, 50.0), (60.0, 50.0)])
    assert any("inverted" in n for n in inverted.notes)
    outside = parse_answer_reference("<answer>{'bbox': [-50, 0, 50, 100], 'points_1': [40, 50], "
                                     "'points_2': [60, 50]}</answer>", IMAGE)
    assert outside.asm_prompt()[0] == (-50.0, 0.0, 50.0, 100.0) and any("not clipped" in n for n in outside.notes)
    pairs = parse_answer_reference(FORMS[13][1], IMAGE)
    assert pairs.ok and pairs.asm_prompt() is None  # the reference's SAM2 call raises on them: Dice 0
    missing = parse_answer_reference("<answer>{'bbox': [0, 0, 50, 100]}</answer>")
    assert missing.failure == "no 'points_1' or 'points_2' key" and missing.asm_prompt() is None
    assert parse_answer_reference("<answer>{'bbox': [0, 0, 50, 100]}</answer>", think=False).think == ""
    assert parse_answer_reference(None).failure.startswith("no '<answer>")


# -- nested (reference) vs pooled (robust) categories ------------------------------------------------------


def _hand_record(sup, cat, ref_iou, rob_iou, failed=False, refused=False):
    ref = {"iou": ref_iou, "pdice": 0.0, "dice": 0.0, "failed": failed}
    rob = dict(sample_metrics(None, None, GT, None, None), iou=rob_iou, refused=refused)
    return {"supercategory": sup, "category": cat, "metrics": rob,
            "metrics_by_protocol": {"reference": ref, "robust": rob}}


def test_reference_nests_categories_robust_pools_them():
    records = [_hand_record("Abdomen", "cyst", 0.2, 0.2), _hand_record("Abdomen", "cyst", 0.4, 0.4),
               _hand_record("Kidney", "cyst", 0.0, 0.9, failed=True), _hand_record("kidney2", "Tumour", 0.6, 0.6)]
    ref = rebuild_table(records, "reference")
    assert ref["protocol"] == "reference" and "by_category" not in ref
    assert list(ref["by_supercategory"]) == ["Abdomen", "Kidney", "kidney2"]  # case-insensitive order
    assert ref["by_supercategory"]["Abdomen"]["categories"]["cyst"]["iou"] == pytest.approx(30.0)
    assert ref["by_supercategory"]["Kidney"]["categories"]["cyst"]["iou"] == pytest.approx(0.0)
    assert ref["overall"]["iou"] == pytest.approx(30.0)  # (20 + 40 + 0 + 60) / 4
    assert (ref["overall"]["failures"], ref["overall"]["valid"]) == (1, 3)
    rob = rebuild_table(records, "robust")
    assert rob["by_category"]["cyst"]["iou"] == pytest.approx(50.0)  # pooled: (20 + 40 + 90) / 3
    assert rob["by_category"]["cyst"]["n"] == 3 and rob["overall"]["refusals"] == 0


def test_missing_dice_is_reported_not_averaged():
    a, b = _hand_record("A", "x", 0.5, 0.5), _hand_record("A", "x", 0.5, 0.5)
    b["metrics_by_protocol"]["robust"]["dice"] = None  # its prompt was never segmented
    rob = rebuild_table([a, b], "robust")
    assert rob["overall"]["dice"] is None and rob["overall"]["missing"]["dice"] == 1


def test_rebuild_from_records_written_before_protocols():
    """An older predictions.jsonl (robust metrics only): the reference's IoU/pDice come from its completion."""
    old = {"supercategory": "A", "category": "x", "completion": FORMS[10][1], "ground_truth": GT,
           "metrics": sample_metrics((0, 0, 50, 100), [[40, 50], [60, 50]], GT, None, None)}
    ref = rebuild_table([old], "reference")["overall"]
    assert (ref["iou"], ref["pdice"], ref["dice"]) == (0.0, pytest.approx(32.0), None)  # inverted: IoU 0
    assert rebuild_table([old], "robust")["overall"]["iou"] == pytest.approx(50.0)


def test_strict_answer_in_original_pixels():
    """U-MRG's 840 px images reach the CRM unchanged (raw values kept); a resized image's answer is scaled."""
    from medreasoner.science.evaluate import strict_answer

    same = strict_answer(FORMS[0][1], ResizeMap(840, 840, 840, 840))
    assert same.box == [0, 0, 50, 100] and same.points == [[40, 50], [60, 50]]
    half = strict_answer(FORMS[0][1], ResizeMap(400, 200, 200, 100))
    assert half.box == [0.0, 0.0, 100.0, 200.0] and half.points == [[80.0, 100.0], [120.0, 100.0]]


def test_protocol_settings_defaults_and_overrides():
    ref = protocol_settings("reference")
    assert {k: ref[k] for k in ("asm", "asm_image_size", "asm_precision", "max_new_tokens")} == {
        "asm": "medsam2", "asm_image_size": 1024, "asm_precision": "fp32", "max_new_tokens": 2048}
    assert set(ref["chosen_by"].values()) == {"protocol default"} and ref["differs_from_reference"] == []
    mine = protocol_settings("reference", asm="litemedsam", max_new_tokens=512)
    assert mine["asm_image_size"] is None and mine["chosen_by"]["asm"] == "user"
    assert mine["differs_from_reference"] == ["asm litemedsam (the reference: medsam2) at 1024 px in fp32",
                                              "max new tokens 512 (the reference: 2048)"]
    sized = protocol_settings("reference", asm_image_size=512)
    assert sized["differs_from_reference"] == ["asm image size 512 (the reference: 1024)"]
    rob = protocol_settings("robust")
    assert (rob["asm"], rob["asm_image_size"], rob["max_new_tokens"]) == ("litemedsam", None, 1024)
    with pytest.raises(InputError, match="SAM2-based"):
        protocol_settings("reference", asm="litemedsam", asm_image_size=512)
    with pytest.raises(InputError, match="multiple of 32"):
        protocol_settings("reference", asm_image_size=1000)


def test_reference_asm_segments_raw_prompts_in_fp32():
    """The reference's SAM2 setting (random weights, 256 px to stay fast): an inverted box, which the
    stock ASMs refuse, is segmented; the config written records the size."""
    from medreasoner.science.evaluate import build_protocol_asm

    settings = protocol_settings("reference", asm_image_size=256)
    asm = build_protocol_asm(settings, device="cpu", random_init=True)
    assert asm.describe()["image_size"] == 256 and asm.describe()["precision"] == "fp32"
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (emb,) = asm.encode([rgb])
    seg = asm.decode(emb, (40.0, 40.0, 10.0, 10.0), [(20.0, 20.0), (30.0, 30.0)])
    assert seg.mask.shape == (64, 64) and seg.prompt == "box+points"


# -- end to end: a scripted CRM on a tiny U-MRG parquet -------------------------------------------------------

SCRIPTED = "test-scripted"


class ScriptedCRM(CRM):
    """TEST DOUBLE for the CRM: answers each question with the completion written for it (a JSON file
    {question: completion} named by --crm), in the pixels of the image it is given."""

    name = SCRIPTED
    last_generation = None

    def __init__(self, model: str, batch_size: int = 4, generation=None, **_):
        self.model_id, self.batch_size = "scripted", batch_size
        self.script = json.loads(Path(model).read_text())
        ScriptedCRM.last_generation = generation

    def answer_batch(self, images, questions, prompt="reasoning"):
        out = []
        for image, q in zip(images, questions):
            h, w = np.asarray(image).shape[:2]
            rmap, text = ResizeMap(w, h, w, h), self.script[q]
            out.append(CRMAnswer(text, answer_in_original_pixels(text, rmap), rmap, 0.0, 1.0))
        return out


if SCRIPTED not in CRMS.names():
    CRMS.register(SCRIPTED, help="TEST DOUBLE: canned completions per question (tests only)")(ScriptedCRM)

BOXFILL = "test-boxfill"


class BoxFillASM(ASM):
    """TEST DOUBLE for the ASM: the mask is the prompt box, filled (whole pixels inside the image)."""

    name = BOXFILL

    def encode(self, images):
        return [np.asarray(im).shape[:2] for im in images]

    def decode(self, embedding, box, points=None) -> SegmentResult:
        h, w = embedding
        check_prompts(np.empty((h, w, 0)), box)  # as the stock ASMs: no area or outside -> ValueError
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        mask = np.zeros((h, w), bool)
        mask[max(0, y1):max(0, y2), max(0, x1):max(0, x2)] = True
        return SegmentResult(mask, 1.0, "box+points" if points else "box")


if BOXFILL not in ASMS.names():
    ASMS.register(BOXFILL, help="TEST DOUBLE: the box, filled (tests only)")(lambda **_: BoxFillASM())

# 96x96 images, each with a bright square = the GT mask; GT box [20, 20, 60, 60], points (30, 40), (50, 40).
E2E_GT = {"bbox_2d": [20, 20, 60, 60], "point_2d": [[30, 40], [50, 40]]}
E2E = [  # id, supercategory, category, completion, hand (IoU, pDice, Dice, failed) by the reference's rules
    # the GT box exactly: IoU 1; identical discs: 2A / (A + 1e-5) -> 2.0; the filled box is the mask: Dice 1
    ("a0", "Abdomen", "liver", "<think>t</think><answer>{'bbox': [20, 20, 60, 60], 'points_1': [30, 40], "
     "'points_2': [50, 40]}</answer>", (1.0, 2.0, 1.0, False)),
    ("a1", "Abdomen", "liver", "<think>t</think><answer>```json\n{\"bbox\": [20, 20, 60, 60]}\n```</answer>",
     (0.0, 0.0, 0.0, True)),
    # inverted: scored with IoU 0; the ASM refuses the box -> Dice 0 (MedSAM2 would have segmented it)
    ("a2", "Abdomen", "cyst", "<answer>{'bbox': [60, 60, 20, 20], 'points_1': [30, 40], 'points_2': [50, 40]}"
     "</answer>", (0.0, 2.0, 0.0, False)),
    # half the GT box: 800 / 1600; coincident points inside pairs: r = 0 -> pDice 0; no SAM2 call -> Dice 0
    ("k0", "Kidney", "cyst", "<answer>{'bbox': [20, 20, 40, 60], 'points_1': [[40, 40], [40, 40]], "
     "'points_2': [[40, 40], [40, 40]]}</answer>", (0.5, 0.0, 0.0, False)),
    ("k1", "Kidney", "cyst", "<answer>{'bbox': [20, 20, 60, 60], 'points_1': [30, 40]}</answer>",
     (0.0, 0.0, 0.0, True)),
    # overlap 20 x 40 = 800 over 1600 + 1600 - 800; mask 1600 px, 800 of them in the GT: Dice 1600 / 3200
    ("k2", "Kidney", "Stone", "<answer>{'bbox': [0, 20, 40, 60], 'points_1': [30, 40], 'points_2': [50, 40]}"
     "</answer>", (round(800 / 2400, 4), 2.0, 0.5, False)),
]


@pytest.fixture(scope="module")
def scripted_parquet(tmp_path_factory):
    from medreasoner.data import Sample, write_parquet

    root = tmp_path_factory.mktemp("protocol")
    samples, script = [], {}
    rng = np.random.default_rng(1)
    for i, (sid, sup, cat, completion, _) in enumerate(E2E):
        img = rng.integers(20, 60, (96, 96, 3), dtype=np.uint8)
        img[20:60, 20:60] = 220
        mask = np.zeros((96, 96), bool)
        mask[20:60, 20:60] = True
        query = f"Which structure is abnormal in case {i}?"
        script[query] = completion
        samples.append(Sample(id=sid, image=img, mask=mask, query=query, ground_truth=E2E_GT,
                              supercategory=sup, category=cat))
    path = root / "test.parquet"
    write_parquet(samples, path)
    (root / "script.json").write_text(json.dumps(script))
    return path, root / "script.json"


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "group":
            rows[cells[0]] = cells[1:]
    return rows


def test_reference_protocol_table_equals_hand_computation(scripted_parquet, tmp_path, capsys):
    data, script = scripted_parquet
    out = tmp_path / "eval"
    rc = main(["evaluate", "--data", str(data), "--crm-backend", SCRIPTED, "--crm", str(script), "--asm",
               BOXFILL, "--protocol", "reference", "--device", "cpu", "--batch-size", "4",
               "--progress", "none", "--out", str(out)])
    assert rc == EXIT_OK
    err = capsys.readouterr().err
    assert "protocol reference:" in err and "max new tokens 2048 (protocol default)" in err
    assert ScriptedCRM.last_generation.max_new_tokens == 2048  # the protocol's default reached the CRM

    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "reference" and summary["run"]["protocol"] == "reference"
    st = summary["protocol_settings"]
    assert (st["asm"], st["max_new_tokens"], st["asm_image_size"]) == (BOXFILL, 2048, None)
    assert st["chosen_by"]["asm"] == "user" and st["chosen_by"]["max_new_tokens"] == "protocol default"
    assert any("medsam2" in d for d in st["differs_from_reference"])

    records = {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")}
    assert sorted(records) == sorted(e[0] for e in E2E)
    for sid, *_, hand in E2E:  # the per-sample numbers are the hand-computed ones
        r = records[sid]
        ref = r["metrics_by_protocol"]["reference"]
        assert (ref["iou"], ref["pdice"], ref["dice"], ref["failed"]) == hand, sid
        assert r["completion"] and r["protocol"] == "reference"
        assert set(r["parse"]) == {"robust", "reference"} and "repairs" in r["parse"]["robust"]
        assert ("failure" in r["parse"]["reference"]) and r["metrics"] == ref
    assert records["a1"]["parse"]["reference"]["failure"] and records["a1"]["metrics"]["dice"] == 0.0
    assert "refused the raw prompt" in records["a2"]["mask_prompt"]["asm_error"]
    assert records["a2"]["metrics"]["dice"] == 0.0
    assert records["a0"]["metrics_by_protocol"]["robust"]["dice"] is not None  # same prompt: same mask
    assert records["a2"]["metrics_by_protocol"]["robust"]["dice"] is None  # reordered box never segmented

    # the table from predictions.jsonl by hand: means x 100 over every sample, failures counted as 0
    def hand(rs):
        m = [r["metrics_by_protocol"]["reference"] for r in rs]
        return [f"{100 * np.mean([x[k] for x in m]):.2f}" for k in ("iou", "pdice", "dice")] + [
            f"{sum(x['failed'] for x in m)} ({100 * sum(x['failed'] for x in m) / len(m):.1f}%)", str(len(m))]

    rows = _table_rows((out / "table.md").read_text())
    everything = list(records.values())
    assert rows["**all**"] == hand(everything)
    for sup in ("Abdomen", "Kidney"):
        assert rows[sup] == hand([r for r in everything if r["supercategory"] == sup])
    for sup, cat in (("Abdomen", "liver"), ("Abdomen", "cyst"), ("Kidney", "cyst"), ("Kidney", "Stone")):
        assert rows[f"{sup} / {cat}"] == hand([r for r in everything if (r["supercategory"], r["category"])
                                               == (sup, cat)])
    assert rows["**all**"][0] == f"{100 * (1.0 + 0 + 0 + 0.5 + 0 + round(800 / 2400, 4)) / 6:.2f}"
    assert rows["**all**"][2] == "25.00"  # Dice (1 + 0.5) / 6
    assert rows["**all**"][3] == "2 (33.3%)"
    assert "Protocol: **reference**" in (out / "table.md").read_text()
    assert math.isclose(summary["overall"]["iou"], float(rows["**all**"][0]), abs_tol=0.005)

    # the robust table rebuilt from the same file, without the models
    rob = rebuild_table(out / "predictions.jsonl", "robust")
    rob_iou = [r["metrics_by_protocol"]["robust"]["iou"] for r in everything]
    assert rob["overall"]["iou"] == pytest.approx(100 * np.mean(rob_iou))
    assert rob["overall"]["dice"] is None and rob["overall"]["missing"]["dice"] >= 1
    assert summary["other_protocol"]["protocol"] == "robust"


def test_robust_protocol_records_the_strict_reading_too(scripted_parquet, tmp_path):
    data, script = scripted_parquet
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--crm-backend", SCRIPTED, "--crm", str(script), "--asm",
                 BOXFILL, "--device", "cpu", "--progress", "none", "--out", str(out)]) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "robust" and summary["protocol_settings"]["max_new_tokens"] == 1024
    assert re.search(r"Protocol: \*\*robust\*\*", (out / "table.md").read_text())
    records = {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")}
    for sid, *_, (iou, pdice, _, failed) in E2E:
        ref = records[sid]["metrics_by_protocol"]["reference"]
        assert (ref["iou"], ref["pdice"], ref["failed"]) == (iou, pdice, failed), sid
    assert records["a2"]["parse"]["robust"]["repairs"] == ["box corners were inverted: reordered"]
    assert records["a0"]["metrics_by_protocol"]["reference"]["dice_source"] == "same prompt as the robust mask"
    assert records["a1"]["metrics_by_protocol"]["reference"]["dice"] == 0.0  # a failure: 0 without the ASM
    ref_table = rebuild_table(out / "predictions.jsonl", "reference")
    assert ref_table["overall"]["failures"] == 2 and ref_table["overall"]["dice"] is None
    assert summary["other_protocol"]["overall"]["iou"] == pytest.approx(ref_table["overall"]["iou"])
    # resuming this folder under the other protocol would mix the two: refused
    assert main(["evaluate", "--data", str(data), "--crm-backend", SCRIPTED, "--crm", str(script), "--asm",
                 BOXFILL, "--protocol", "reference", "--device", "cpu", "--progress", "none",
                 "--out", str(out)]) == EXIT_INPUT


def test_asm_options_refused_for_asms_they_do_not_fit(scripted_parquet, tmp_path):
    data, script = scripted_parquet
    assert main(["evaluate", "--data", str(data), "--crm-backend", SCRIPTED, "--crm", str(script), "--asm",
                 "litemedsam", "--asm-image-size", "512", "--protocol", "reference", "--device", "cpu",
                 "--progress", "none", "--out", str(tmp_path / "e")]) == EXIT_INPUT
