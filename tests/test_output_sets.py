"""Output folders lose nothing: ownership, name collisions, concurrent writers, and kill -9 at any moment.

Results here are real ``ImageResult`` records built by hand (no model needed): what is tested is the
writer, which is the same for every front end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from medreasoner.engine.output_sets import WORK_AREA, check_output_root, recover
from medreasoner.engine.results import ImageResult
from medreasoner.engine.writer import IMAGE_FILES, StemAllocator, write_result
from medreasoner.errors import InputError
from medreasoner.models.answer import AnswerStatus, ParsedAnswer

ROOT = Path(__file__).resolve().parent.parent


def result_for(src: Path, status: str = "ok", tag: str = "") -> ImageResult:
    mask = np.zeros((16, 16), bool)
    if status == "ok":
        mask[4:9, 5:11] = True
    answer = ParsedAnswer(AnswerStatus.OK, think=f"because {tag}", box=(5, 4, 11, 9), points=[(7, 6), (8, 7)])
    return ImageResult(query=f"q {tag}", status=status, answer=answer, mask=mask, mask_score=0.9,
                       completion="<answer>{}</answer>", image_size=(16, 16), model_input_size=(16, 16),
                       crm={"tiny_test_model": False}, asm={"tiny_test_model": False}, prompt="reasoning",
                       input={"path": str(src)}, rgb=np.zeros((16, 16, 3), np.uint8))


def complete_set(case: Path) -> dict:
    """The set in ``case`` is whole: every file its record names exists, nothing else is there."""
    record = json.loads((case / "result.json").read_text())
    named = {Path(p).name for p in record["outputs"].values()}
    assert named == {p.name for p in case.iterdir()}, (named, list(case.iterdir()))
    assert all(Path(p).parent == case for p in record["outputs"].values())
    from PIL import Image

    mask = np.asarray(Image.open(case / "mask.png"))  # written by the same run as the record?
    assert (mask > 0).any() == (record["status"] == "ok") and int((mask > 0).sum()) == record["mask_area_px"]
    return record


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    (d / "d1").mkdir(parents=True)
    (d / "d2").mkdir()
    for p in (d / "d1" / "a.png", d / "d2" / "a.png", d / "a_1.png"):
        p.write_bytes(b"not read here")
    return d


def test_a_folder_the_tool_did_not_write_is_never_replaced(tmp_path, inputs):
    out = tmp_path / "out"
    user = out / "a"
    user.mkdir(parents=True)
    (user / "liver_mask.png").write_bytes(b"the user's own mask")
    with pytest.raises(InputError, match="did not write it.*--overwrite"):
        write_result(result_for(inputs / "d1" / "a.png"), user, inputs=[inputs / "d1" / "a.png"])
    assert (user / "liver_mask.png").read_bytes() == b"the user's own mask"
    assert not (out / WORK_AREA).exists()
    write_result(result_for(inputs / "d1" / "a.png"), user, inputs=[inputs / "d1" / "a.png"], overwrite=True)
    assert not (user / "liver_mask.png").exists() and complete_set(user)["status"] == "ok"


def test_outputs_get_the_mode_any_new_file_gets(tmp_path, inputs):
    """Not the 0600 of a private temporary file: colleagues on a shared workstation can read results."""
    old = os.umask(0o022)
    try:
        write_result(result_for(inputs / "d1" / "a.png"), tmp_path / "out" / "a", inputs=[inputs / "d1" / "a.png"])
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out" / "a").iterdir()} == {oct(0o644)}


@pytest.mark.parametrize("target", ["user-folder", "our-results", "dangling"])
def test_a_case_folder_that_is_a_symlink_is_never_followed(tmp_path, inputs, target):
    """Even with ``--overwrite``: replacing a link would delete the files it points to."""
    src, out = inputs / "d1" / "a.png", tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    if target == "user-folder":
        elsewhere.mkdir()
        (elsewhere / "keep.txt").write_text("mine")
    elif target == "our-results":
        write_result(result_for(src, tag="old"), elsewhere, inputs=[src])
    out.mkdir()
    (out / "a").symlink_to(elsewhere)
    before = _tree(elsewhere) if elsewhere.exists() else {}
    for overwrite in (False, True):
        with pytest.raises(InputError, match="symbolic link"):
            write_result(result_for(src), out / "a", inputs=[src], overwrite=overwrite)
    assert (out / "a").is_symlink() and sorted(p.name for p in out.iterdir()) == ["a"]
    assert (_tree(elsewhere) if elsewhere.exists() else {}) == before


def test_rerun_replaces_the_whole_set_and_a_no_target_leaves_nothing_stale(tmp_path, inputs):
    src, case = inputs / "d1" / "a.png", tmp_path / "out" / "a"
    write_result(result_for(src, tag="first"), case, inputs=[src])
    (case / "montage.png").write_bytes(b"from an older layout")  # an extra file in our own folder
    write_result(result_for(src, status="no_target", tag="second"), case, inputs=[src])
    record = complete_set(case)
    assert record["status"] == "no_target" and record["query"] == "q second"
    assert not (tmp_path / "out" / WORK_AREA).exists()  # nothing left in the work area


def test_results_of_another_input_are_kept_and_names_stay_unique(tmp_path, inputs):
    out = tmp_path / "out"
    first = StemAllocator(root=out)
    stems = [first.take(p) for p in (inputs / "d1" / "a.png", inputs / "d2" / "a.png", inputs / "a_1.png")]
    assert len({s.lower() for s in stems}) == 3  # d1/a, d2/a and a_1 never share a folder
    for stem, p in zip(stems, (inputs / "d1" / "a.png", inputs / "d2" / "a.png", inputs / "a_1.png")):
        write_result(result_for(p, tag=stem), out / stem, inputs=[p])
    first.release()
    # a later run: the same input finds its own folder again; a new input never takes another's
    later = StemAllocator(root=out)
    assert later.take(inputs / "d2" / "a.png") == stems[1]
    newcomer = inputs / "a.png"
    newcomer.write_bytes(b"x")
    assert later.take(newcomer) not in stems
    later.release()
    with pytest.raises(InputError, match="another input"):
        write_result(result_for(newcomer), out / stems[0], inputs=[newcomer])
    assert json.loads((out / stems[0] / "result.json").read_text())["input"]["path"] == str(inputs / "d1" / "a.png")


def test_output_folder_inside_an_input_folder_is_refused(tmp_path, inputs):
    for out in (inputs, inputs / "d1" / "results"):
        with pytest.raises(InputError, match="inside the input folder"):
            check_output_root(out, [inputs])
    check_output_root(tmp_path / "elsewhere", [inputs])
    with pytest.raises(InputError, match="refusing to overwrite the input"):
        write_result(result_for(inputs / "d1" / "a.png"), inputs / "d1", inputs=[inputs / "d1" / "a.png"])


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import medreasoner.engine.output_sets as sets
    from test_output_sets import result_for
    from medreasoner.engine.writer import StemAllocator, write_result
    real = sets.write_fd
    pause = []
    def slow(fd, data):  # widen every window between files; or stop in the middle of writing them
        real(fd, data)
        if pause:
            print("WRITING", flush=True)
            time.sleep(60)
        time.sleep(0.05)
    sets.write_fd = slow
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    stems = StemAllocator(root=out)
    stem = stems.take(src)
    print("STEM", stem, flush=True)
    pause += sys.argv[3:]
    for k in range(1000):
        write_result(result_for(src, status="ok" if k % 2 else "no_target", tag=str(k)), out / stem, inputs=[src])
        print("WROTE", k, flush=True)
""")


def _writer(tmp_path, *args) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(ROOT / "tests")))
    runtime = tmp_path / "runtime"  # the private lock folder: outside the output folder
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(runtime)}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, text=True, env=env)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("first", [True, False], ids=["first-write", "rewrite"])
def test_kill_9_while_files_are_written_leaves_no_file_at_all(tmp_path, inputs, first, monkeypatch):
    """Killed while the new set's files are being written: the output folder is byte for byte what it was
    (nothing new, no temporary file, no work area, no lock), on a first write as on a rewrite."""
    src, out = inputs / "d1" / "a.png", tmp_path / "out"
    out.mkdir()
    if not first:
        write_result(result_for(src, tag="old"), out / "a", inputs=[src])
    before = _tree(out)
    proc = _writer(tmp_path, src, out, "pause")
    assert proc.stdout.readline().startswith("STEM")
    assert proc.stdout.readline().startswith("WRITING")  # one file of the new set written, more to come
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == ([] if first else ["a"])
    assert [p.name for p in (tmp_path / "runtime").rglob("*.lock")] == ["a.lock"]  # the dead run's claim...
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    recover(out)
    assert not list((tmp_path / "runtime").rglob("*.lock"))  # ...is cleared by the next run


def test_kill_9_at_any_moment_leaves_the_old_or_the_new_set(tmp_path, inputs):
    """A writer rewrites one case over and over; SIGKILL at random moments; every time, the folder holds
    one complete set, and the next run clears what the killed one left in the work area."""
    src, out = inputs / "d1" / "a.png", tmp_path / "out"
    rng = np.random.default_rng(0)
    seen_sets = 0
    for _ in range(6):
        proc = _writer(tmp_path, src, out)
        assert proc.stdout.readline().startswith("STEM")
        time.sleep(0.3 + float(rng.random()) * 0.6)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        case = out / "a"
        if case.exists():
            complete_set(case)
            seen_sets += 1
        recover(out)  # what the next run into this folder does first
        assert not (out / WORK_AREA / "staging").exists() or not any((out / WORK_AREA / "staging").iterdir())
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert seen_sets >= 4


def test_two_live_runs_never_share_a_case_folder_for_different_inputs(tmp_path, inputs):
    out = tmp_path / "out"
    code = ("import sys, time\nfrom medreasoner.engine.writer import StemAllocator\n"
            "s = StemAllocator(root=sys.argv[2]); print(s.take(sys.argv[1]), flush=True); time.sleep(3)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
             for p in (inputs / "d1" / "a.png", inputs / "d2" / "a.png")]
    names = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.wait(20)
    assert sorted(names) == ["a", "a_2"]
    assert set(IMAGE_FILES)  # the layout the writer documents


def test_an_input_without_orientation_gets_an_output_that_claims_none(tmp_path_factory):
    """A NIfTI read with "no qform/sform: identity assumed" writes seg.nii.gz with qform/sform codes 0.

    (A partial record by hand: tmp_path_factory keeps it out of the every-record-validates fixture.)"""
    import nibabel as nib
    import SimpleITK as sitk

    from medreasoner.engine.results import VolumeResult

    tmp_path = tmp_path_factory.mktemp("orientation")
    mask = sitk.GetImageFromArray(np.pad(np.ones((2, 3, 3), np.uint8), 2))
    for repairs, want in (([], 1), (["no qform/sform: orientation unknown, identity assumed"], 0)):
        record = {"schema_version": "1.0", "kind": "volume", "input": {"path": str(tmp_path / "v.nii"),
                                                                         "metadata": {"repairs": repairs}}}
        case = tmp_path / f"case{want}"
        write_result(VolumeResult("q", "ok", "", mask, record), case, inputs=[tmp_path / "v.nii"])
        header = nib.load(case / "seg.nii.gz").header
        assert int(header["qform_code"]) == want and int(header["sform_code"]) == want
        assert np.asarray(nib.load(case / "seg.nii.gz").dataobj).sum() == 18  # voxels unchanged


def test_the_cli_refuses_a_foreign_case_folder_before_models_load(tmp_path, inputs):
    from medreasoner.engine.batch import Case, check_case_dirs

    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "notes.txt").write_text("mine")
    cases = [Case(str(inputs / "d1" / "a.png"), "q")]
    with pytest.raises(InputError, match="did not write it"):
        check_case_dirs(cases, out)
    check_case_dirs(cases, out, overwrite=True)
    check_case_dirs(cases, tmp_path / "new")  # a folder that does not exist yet is not created by the check
    assert not (tmp_path / "new").exists() and not (out / WORK_AREA).exists()


def test_a_key_slice_with_every_slice_is_refused_for_every_front_end():
    from medreasoner.engine.session import RunOptions

    for change in ({"key_slice": 3}, {"key_point": [0.0, 0.0, 0.0]}):
        with pytest.raises(InputError, match="only applies to the keyslice strategy"):
            RunOptions(strategy="slicewise", **change).checked()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_TMPFILE and /proc are Linux")
def test_anonymous_files_get_their_name_in_one_step_for_root_and_ordinary_users(tmp_path):
    """Both ways of naming a file written without a name (root's AT_EMPTY_PATH, an ordinary user's
    /proc/self/fd): the name appears complete, and a taken name is never replaced."""
    from medreasoner.io.files import anonymous_file, link_file, link_file_via_proc, write_fd

    for link in (link_file, link_file_via_proc):
        folder = tmp_path / link.__name__
        folder.mkdir()
        fd = anonymous_file(folder)
        assert fd is not None
        try:
            write_fd(fd, b"complete")
            assert not list(folder.iterdir())  # written, and still no name
            link(fd, folder / "f.bin")
            assert (folder / "f.bin").read_bytes() == b"complete"
            with pytest.raises(FileExistsError):
                link(fd, folder / "f.bin")
        finally:
            os.close(fd)

