"""Hardening of the command line's entry points: everything that can be refused is refused before any
model loads (exit 2 or 3, one line, no traceback, nothing written), argv values that start with '-',
distributed environments that cannot work, and signals (exit 130; the interrupted batch writes nothing).

Most cases run ``main`` in-process with model loading patched to fail the test, so they cost
milliseconds. The signal cases run the real CLI in a subprocess with a slow CRM test double and a box
ASM registered by a plugin file written here (``--plugins``), so no model weights are involved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medreasoner.cli import (
    EXIT_CANCELLED,
    EXIT_INPUT,
    EXIT_MODEL,
    EXIT_OK,
    build_parser,
    check_output_dir,
    join_dash_values,
    main,
)
from medreasoner.errors import CancelledError, InputError

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
BUNDLE = ROOT / "monai_bundle"
QUERY = "Which structure would explain the pain?"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# A slow CRM test double (the brightest-region double of tests/doubles.py, sleeping where a real model
# loads and generates), used with doubles' box-as-mask ASM: a signal can be timed into a model load or
# a batch, and nothing needs weights.
PLUGIN = '''
import logging, os, time
from doubles import BrightestRegionCRM  # also registers the ASM double test-box
from medreasoner.models.registry import CRMS

log = logging.getLogger("slow_plugin")


class SlowCRM(BrightestRegionCRM):
    name = "test-slow"

    def __init__(self, **kwargs):
        if float(os.environ.get("SLOW_CRM_LOAD_S", "0")):
            log.warning("slow CRM: loading")
            time.sleep(float(os.environ["SLOW_CRM_LOAD_S"]))
        super().__init__(**kwargs)

    def answer_batch(self, images, questions, prompt="reasoning"):
        log.warning("slow CRM: batch started")
        time.sleep(float(os.environ.get("SLOW_CRM_BATCH_S", "0")))
        return super().answer_batch(images, questions, prompt)


CRMS.register("test-slow", help="TEST: brightest-region double, slowly")(lambda **kw: SlowCRM(**kw))
'''


# ----------------------------------------------------------------------------------------- helpers


def _png(path: Path, size: int = 48) -> Path:
    img = np.full((size, size), 20, np.uint8)
    img[size // 4: size // 2, size // 5: size // 2] = 230
    Image.fromarray(img).save(path)
    return path


def _volume(path: Path) -> Path:
    import nibabel as nib

    vol = np.full((24, 24, 6), -1000, np.int16)
    vol[4:20, 4:20, :] = 20
    vol[8:14, 6:12, 1:5] = 300
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    return path


def _parquet(path: Path, n: int) -> Path:
    from medreasoner.data import Sample, write_parquet
    from medreasoner.science.keypoints import ground_truth_from_mask

    samples = []
    for i in range(n):
        img = np.full((40, 40), 15, np.uint8)
        img[5 + i: 20 + i, 8:24] = 220
        mask = img > 100
        samples.append(Sample(id=f"s{i}", image=np.stack([img] * 3, axis=2), mask=mask, query=QUERY,
                              ground_truth=ground_truth_from_mask(mask), supercategory="Abdomen", category="organ"))
    return write_parquet(samples, path)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_line_error(err: str, *needles: str) -> str:
    """The stderr of a refused command: exactly one line, no traceback, naming what is wrong."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model fails the test: these cases must be refused before any model loads."""
    import medreasoner.engine
    import medreasoner.models.loading

    def boom(*_a, **_k):
        raise AssertionError("a model was loaded although the command should have been refused first")

    for module, name in ((medreasoner.engine, "load_models"), (medreasoner.models.loading, "load_models"),
                         (medreasoner.models.loading, "load_crm_from"), (medreasoner.models.loading, "load_asm_from")):
        monkeypatch.setattr(module, name, boom)


@pytest.fixture
def inputs(tmp_path):
    """One input of each kind in tmp_path/in (a PNG, a NIfTI volume, U-MRG parquet, 2D folders)."""
    d = tmp_path / "in"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    _png(d / "img.png")
    _png(d / "images" / "a.png")
    Image.fromarray((np.asarray(Image.open(d / "images" / "a.png")) > 100).astype(np.uint8) * 255).save(
        d / "masks" / "a.png")
    (d / "queries.jsonl").write_text(json.dumps({"image": "a.png", "query": QUERY}) + "\n")
    _volume(d / "ct.nii.gz")
    _parquet(d / "test.parquet", 2)
    return d


MODEL = ["--crm-backend", "test-brightest", "--crm", "double", "--asm", "litemedsam", "--device", "cpu",
         "--progress", "none"]


def _command(name: str, d: Path, out: str, model: list[str] = MODEL) -> list[str]:
    return {
        "ground": ["ground", "--image", str(d / "img.png"), "--query", QUERY, "--out", out, *model],
        "segment-volume": ["segment-volume", "--volume", str(d / "ct.nii.gz"), "--query", QUERY, "--out", out,
                           *model],
        "evaluate": ["evaluate", "--data", str(d / "test.parquet"), "--out", out, *model],
        "build-dataset": ["build-dataset", "--images", str(d / "images"), "--masks", str(d / "masks"),
                          "--queries", str(d / "queries.jsonl"), "--out", out],
    }[name]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", **extra}


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medreasoner", *args], capture_output=True, text=True,
                          env=env or _env(), cwd=ROOT, timeout=timeout)


# ------------------------------------------------------------------------------------ output paths


def _bad_out(tmp_path: Path, case: str, command: str) -> str:
    """An output path that cannot be created or written, of the kind ``case`` names."""
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    if case == "parent_is_file":
        return str(afile / "sub")
    if case == "existing_file":  # build-dataset writes a file: a folder in its place is the mistake
        return str(tmp_path / "in") if command == "build-dataset" else str(afile)
    if case == "name_too_long":
        return str(tmp_path / ("n" * 300) / "out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "out")


OUT_CASES = {"parent_is_file": "is a file", "existing_file": "", "name_too_long": "allows 255",
             "unwritable": "not writable"}


class TestOutputPaths:
    @pytest.mark.parametrize("command", ["ground", "segment-volume", "evaluate", "build-dataset"])
    @pytest.mark.parametrize("case", list(OUT_CASES))
    def test_uncreatable_out_is_refused_before_anything(self, command, case, tmp_path, inputs, no_model_loads,
                                                        capsys):
        if case == "unwritable" and IS_ROOT:
            pytest.skip("root writes into a 0500 folder; see test_unwritable_system_folder")
        out = _bad_out(tmp_path, command=command, case=case)
        before = _files(tmp_path)
        try:
            assert main(_command(command, inputs, out)) == EXIT_INPUT
        finally:
            (tmp_path / "locked").exists() and (tmp_path / "locked").chmod(0o700)
        line = _one_line_error(capsys.readouterr().err, "error: ", "--out", OUT_CASES[case])
        assert len(line) < 400  # a 300-character name is shortened in the message
        assert _files(tmp_path) == before  # nothing was written, not even an empty folder

    @pytest.mark.parametrize("command", ["ground", "evaluate"])
    def test_unwritable_system_folder(self, command, tmp_path, inputs, no_model_loads, capsys):
        """/sys is read-only even for root (the case root cannot test with chmod)."""
        try:
            os.rmdir(__import__("tempfile").mkdtemp(dir="/sys"))
            pytest.skip("/sys is writable here")
        except OSError:
            pass
        assert main(_command(command, inputs, "/sys/medreasoner_out")) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "cannot write --out /sys/medreasoner_out", "not writable")

    def test_evaluate_out_inside_the_dataset_folder_is_refused(self, tmp_path, inputs, no_model_loads, capsys):
        """evaluate writes OUT/masks/<id>.png: --out equal to a folder dataset would overwrite its masks."""
        before = _files(tmp_path)
        for out in (inputs, inputs / "results"):
            args = ["evaluate", "--data", str(inputs), "--out", str(out), *MODEL]
            assert main(args) == EXIT_INPUT
            _one_line_error(capsys.readouterr().err, "inside the input folder")
        assert _files(tmp_path) == before

    def test_existing_file_message(self, tmp_path, inputs, no_model_loads, capsys):
        afile = tmp_path / "afile"
        afile.write_text("x")
        assert main(_command("ground", inputs, str(afile))) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, f"--out {afile} is a file, not a folder")
        assert main(_command("build-dataset", inputs, str(inputs))) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "is a folder; give the path of the file to write")

    def test_build_dataset_never_replaces_a_file_it_did_not_write(self, tmp_path, inputs, capsys):
        out = tmp_path / "mine.parquet"
        out.write_text("precious")
        assert main(_command("build-dataset", inputs, str(out))) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, f"refusing to replace {out}: this tool did not write it")
        assert out.read_text() == "precious"
        assert main([*_command("build-dataset", inputs, str(out)), "--overwrite", "--progress", "none"]) == 0
        from medreasoner.data.parquet import written_by_us

        assert written_by_us(out)
        assert main([*_command("build-dataset", inputs, str(out)), "--progress", "none"]) == 0  # ours: replaced

    def test_build_dataset_refuses_3d_options_for_2d_data(self, tmp_path, inputs, capsys):
        for extra in (["--every", "2"], ["--min-area", "5"]):
            assert main([*_command("build-dataset", inputs, str(tmp_path / "d.parquet")), *extra]) == EXIT_INPUT
            _one_line_error(capsys.readouterr().err, "only apply to 3D data (--volumes)")

    def test_the_check_creates_nothing_and_passes_good_paths(self, tmp_path):
        new = tmp_path / "a" / "b" / "c"
        assert check_output_dir(new) == new and not (tmp_path / "a").exists()
        assert check_output_dir(tmp_path) == tmp_path and _files(tmp_path) == set()
        assert check_output_dir("~/x").is_absolute()
        with pytest.raises(InputError, match="is empty"):
            check_output_dir("  ")
        with pytest.raises(InputError, match="4095"):
            check_output_dir(tmp_path / "/".join(["d" * 200] * 25))

    def test_subprocess_one_line_no_traceback(self, tmp_path, inputs):
        (tmp_path / "afile").write_text("x")
        p = _cli(*_command("ground", inputs, str(tmp_path / "afile" / "sub")))
        assert p.returncode == EXIT_INPUT
        _one_line_error(p.stderr, "cannot create --out", "afile is a file, not a folder")
        p = _cli(*_command("segment-volume", inputs, str(tmp_path / "afile")), "--progress", "json")
        assert p.returncode == EXIT_INPUT
        err = json.loads(_one_line_error(p.stderr))
        assert err["event"] == "error" and err["kind"] == "input" and "is a file" in err["message"]


    def test_overwrite_option_reaches_the_writer(self, tmp_path, inputs):
        """README's overwrite policy: a folder this tool did not write is refused unless --overwrite."""
        out = tmp_path / "out"
        (out / "img").mkdir(parents=True)
        (out / "img" / "notes.txt").write_text("not ours")
        code, last, _ = _Run(_command("ground", inputs, str(out), model=[]), tmp_path).finish()
        assert code == EXIT_INPUT and "this tool did not write it" in last["message"], last
        assert (out / "img" / "notes.txt").is_file()
        code, last, _ = _Run([*_command("ground", inputs, str(out), model=[]), "--overwrite"], tmp_path).finish()
        assert code == EXIT_OK, last
        assert (out / "img" / "result.json").is_file() and not (out / "img" / "notes.txt").exists()


class TestBundleOutputDir:
    @pytest.mark.parametrize("case", ["parent_is_file", "existing_file", "name_too_long"])
    def test_bad_output_dir_is_refused_where_options_are(self, case, bundle_scripts, bundle_parser, tmp_path, caplog):
        out = _bad_out(tmp_path, case=case, command="bundle")
        before = _files(tmp_path)
        with pytest.raises(SystemExit) as exc:
            bundle_scripts.output_dir_option(out)
        assert exc.value.code == EXIT_INPUT and "bad output_dir" in caplog.text
        parser = bundle_parser(output_dir=out)
        with pytest.raises(SystemExit) as exc:
            parser.get_parsed_content("postprocessing")  # built with the evaluator, before SessionLoader
        assert exc.value.code == EXIT_INPUT
        assert not parser.get_parsed_content("network_def").loaded and _files(tmp_path) == before

    def test_good_output_dir_is_not_created(self, bundle_scripts, tmp_path):
        assert bundle_scripts.output_dir_option(str(tmp_path / "new" / "out")) == tmp_path / "new" / "out"
        assert not (tmp_path / "new").exists()

    def test_key_slice_with_slicewise_is_refused(self, bundle_scripts, caplog):
        with pytest.raises(SystemExit) as exc:
            bundle_scripts.run_options(strategy="slicewise", key_slice=3)
        assert exc.value.code == EXIT_INPUT and "only applies to the keyslice strategy" in caplog.text

    @pytest.mark.slow  # imports MONAI in a subprocess
    def test_bundle_run_exits_2_before_models_load(self, tmp_path, inputs):
        (tmp_path / "afile").write_text("x")
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "inference.json"),
               "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--image", str(inputs / "img.png"),
               "--query", QUERY, "--output_dir", str(tmp_path / "afile" / "sub"), "--crm", str(tmp_path / "no_crm"),
               "--device", "cpu"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
        # exit 3 would mean the (missing) CRM was loaded first
        assert p.returncode == EXIT_INPUT, p.stderr[-2000:]
        assert "afile is a file, not a folder" in p.stderr + p.stdout and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------------- model options


class TestModelOptions:
    @pytest.mark.parametrize("extra,message", [
        (["--max-new-tokens", "0"], "max_new_tokens must be at least 1, got 0"),
        (["--max-new-tokens", "-5"], "max_new_tokens must be at least 1, got -5"),
        (["--max-new-tokens", "99999999999999999999"], "max_new_tokens must be at most 32768"),
        (["--batch-size", "0"], "batch_size must be at least 1"),
        (["--device", "bogus"], "unknown device 'bogus'; use auto, cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["--device", "cpu:1"], "unknown device 'cpu:1'"),
        (["--image-size", "0"], "image_size must be between 28 and 3584 pixels, got 0"),
        (["--image-size", "1"], "image_size must be between 28 and 3584 pixels, got 1"),
        (["--image-size", "20000"], "image_size must be between 28 and 3584 pixels, got 20000"),
        (["--asm", "nnunet"], "unknown ASM 'nnunet'"),
        (["--crm-backend", "magic"], "unknown CRM backend 'magic'"),
    ])
    def test_bad_model_option_exits_2_before_reading_or_loading(self, extra, message, tmp_path, no_model_loads,
                                                                 capsys):
        out = tmp_path / "out"
        argv = ["ground", "--image", str(tmp_path / "missing.png"), "--query", QUERY, "--out", str(out),
                "--crm-backend", "test-brightest", "--crm", "double", "--progress", "none", *extra]
        assert main(argv) == EXIT_INPUT  # the image does not exist: the option was checked first
        _one_line_error(capsys.readouterr().err, message)
        assert not out.exists()

    def test_a_file_as_crm(self, tmp_path, no_model_loads, capsys):
        pt = tmp_path / "MedSAM2_latest.pt"
        pt.write_bytes(b"not a CRM")
        assert main(["ground", "--image", str(tmp_path / "x.png"), "--query", QUERY, "--out", str(tmp_path / "o"),
                     "--crm", str(pt)]) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err,
                        f"a CRM is a folder (config.json + weights) or a hub id; {pt} is a file")

    def test_cuda_on_a_machine_without_gpu(self, tmp_path, no_model_loads, monkeypatch, capsys):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        for device in ("cuda", "cuda:1"):
            assert main(["ground", "--image", str(tmp_path / "x.png"), "--query", QUERY, "--out",
                         str(tmp_path / "o"), "--device", device]) == EXIT_INPUT
            _one_line_error(capsys.readouterr().err, "CUDA was asked for but torch sees no GPU", "use cpu or auto")

    def test_cuda_index_beyond_the_gpus(self, tmp_path, no_model_loads, monkeypatch, capsys):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        assert main(["ground", "--image", str(tmp_path / "x.png"), "--query", QUERY, "--out",
                     str(tmp_path / "o"), "--device", "cuda:3"]) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "torch sees 1 GPU(s), cuda:0 to cuda:0")

    def test_image_size_limits(self):
        from medreasoner.models.loading import MAX_CRM_IMAGE_SIZE, MIN_CRM_IMAGE_SIZE, ModelOptions

        assert (MIN_CRM_IMAGE_SIZE, MAX_CRM_IMAGE_SIZE) == (28, 3584)
        for ok in (28, 840, 1000, 3584):
            assert ModelOptions(crm="x/y", image_size=ok).checked().image_size == ok
        for bad in (27, 3585, 20000, True, 840.5, "big"):
            with pytest.raises(InputError, match="image_size"):
                ModelOptions(crm="x/y", image_size=bad).checked()

    @pytest.mark.parametrize("extra,message", [
        (["--strategy", "slicewise", "--key-slice", "3"], "key slice only applies to the keyslice strategy"),
        (["--strategy", "slicewise", "--candidates", "2"], "--candidates only applies to --strategy keyslice"),
        (["--key-slice", "3", "--candidates", "2"], "--candidates has no effect with --key-slice"),
        (["--strategy", "magic"], "unknown strategy 'magic'"),
        (["--axis", "oblique"], "unknown axis 'oblique'"),
        (["--candidates", "9"], "n_candidates must be between 1 and 5"),
        (["--window", "nonsense"], "unknown window 'nonsense'"),
    ])
    def test_volume_options_are_checked_before_the_volume_is_read(self, extra, message, tmp_path, no_model_loads,
                                                                  capsys):
        argv = ["segment-volume", "--volume", str(tmp_path / "missing.nii.gz"), "--query", QUERY,
                "--out", str(tmp_path / "o"), "--crm-backend", "test-brightest", "--crm", "double", *extra]
        assert main(argv) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, message)

    @pytest.mark.parametrize("extra,message", [
        (["--slices", "44"], "slice range must look like 'start:stop' (stop exclusive; 44:45 is the one slice 44)"),
        (["--slices", "4:5:6"], "slice range must look like 'start:stop'"),
        (["--slices", "a:b"], "slice range bounds must be whole numbers"),
        (["--window", "1.2.3,400"], "unknown window '1.2.3,400'"),
    ])
    def test_slice_and_window_syntax_is_checked_before_the_volume_is_read(self, extra, message, tmp_path,
                                                                         no_model_loads, capsys):
        argv = ["segment-volume", "--volume", str(tmp_path / "missing.nii.gz"), "--query", QUERY,
                "--out", str(tmp_path / "o"), "--crm-backend", "test-brightest", "--crm", "double", *extra]
        assert main(argv) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, message)

    def test_model_files_named_on_the_command_line_are_checked_before_any_model_loads(self, tmp_path,
                                                                                      no_model_loads, capsys):
        """A missing or FIFO ASM checkpoint / prompt file: exit 2 in one line (a FIFO would block the read);
        a base URL that is not http(s): an option error (2), not a model error."""
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        base = ["ground", "--image", str(_png(tmp_path / "x.png")), "--query", QUERY, "--out", str(tmp_path / "o"),
                "--progress", "none"]
        for extra, message in ((["--asm-checkpoint", str(tmp_path / "nope.pth")], "ASM checkpoint not found"),
                               (["--asm-checkpoint", str(fifo)], "is not a regular file (it is a named pipe"),
                               (["--asm-checkpoint", str(tmp_path)], "is a folder; give the weights file"),
                               (["--prompt-file", str(fifo)], "is not a regular file (it is a named pipe"),
                               (["--crm-backend", "openai", "--crm", "m", "--base-url", "file:///etc/passwd"],
                                "base_url must be an http(s) URL")):
            assert main([*base, *extra]) == EXIT_INPUT, extra
            _one_line_error(capsys.readouterr().err, message)
        assert not (tmp_path / "o").exists()

    @pytest.mark.parametrize("option", ["--image", "--prompt-file", "--crm"])
    def test_a_path_too_long_for_the_file_system_is_one_line(self, option, tmp_path, no_model_loads, capsys):
        long = str(tmp_path / ("A" * 5000))
        argv = ["ground", "--image", str(_png(tmp_path / "x.png")), "--query", QUERY, "--out", str(tmp_path / "o"),
                "--progress", "none", option, long]
        assert main(argv) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "path is too long for this file system", "characters)")

    def test_a_tilde_means_home_in_every_path_option(self, tmp_path, monkeypatch, no_model_loads, capsys):
        monkeypatch.setenv("HOME", str(tmp_path))
        _png(tmp_path / "x.png")
        assert main(["ground", "--image", "~/missing.png", "--query", QUERY, "--out", "~/o", "--progress",
                     "none"]) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, f"image file not found: {tmp_path / 'missing.png'}")

    def test_base_url_with_the_local_backend_is_refused(self, tmp_path, no_model_loads, capsys):
        assert main(["ground", "--image", str(_png(tmp_path / "x.png")), "--query", QUERY, "--out",
                     str(tmp_path / "o"), "--base-url", "http://127.0.0.1:9/v1"]) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "--base-url only applies to a served CRM (--crm-backend openai)")

    def test_an_output_folder_too_long_for_its_results_is_refused_up_front(self, tmp_path, no_model_loads, capsys):
        deep = tmp_path
        while len(str(deep)) < 3900:
            deep = deep / ("d" * 200)
        assert main(["ground", "--image", str(_png(tmp_path / "x.png")), "--query", QUERY, "--out", str(deep),
                     "--crm-backend", "test-brightest", "--crm", "double"]) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "passes the 4095 the system allows")

    def test_the_worker_checks_the_same_options(self, tmp_path):
        p = _cli("worker", "--crm-backend", "test-brightest", "--crm", "double", "--device", "bogus",
                 "--plugins", str(TESTS / "doubles.py"))
        assert p.returncode == EXIT_INPUT and "Traceback" not in p.stderr
        fatal = json.loads(p.stdout.strip().splitlines()[-1])
        assert fatal["type"] == "fatal" and fatal["exit_code"] == EXIT_INPUT and "unknown device" in fatal["message"]


# ------------------------------------------------------------------------------- checkpoint folder


@pytest.fixture
def fake_crm(tmp_path) -> Path:
    """A folder with every file a Qwen2.5-VL checkpoint needs (contents too small to be a model)."""
    from safetensors.numpy import save_file

    d = tmp_path / "crm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    save_file({"w": np.zeros((8, 8), np.float32), "b": np.ones(8, np.float32)}, str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "processor_config.json").write_text("{}")
    (d / "chat_template.jinja").write_text("{{ messages }}")
    return d


def _break(d: Path, how: str) -> str:
    """Damage the checkpoint folder ``d``; returns the file the message must name."""
    if how.startswith("no "):
        name = how[3:]
        (d / name).unlink()
        return {"model.safetensors": "no weights", "tokenizer.json": "no tokenizer",
                "processor_config.json": "no image processor config", "chat_template.jinja": "no chat template",
                "config.json": "no config.json"}[name]
    if how == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) - 100])
        return "model.safetensors are truncated or damaged"
    if how == "lfs pointer":
        (d / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
        return "model.safetensors are not a safetensors file"
    if how == "missing shard":
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        return "lacks weight shard(s) listed in model.safetensors.index.json: model-00002-of-00002.safetensors"
    if how == "config not json":
        (d / "config.json").write_text("{not json")
        return "config.json is unreadable or not JSON"
    raise AssertionError(how)


class TestCheckpointFolder:
    @pytest.mark.parametrize("how", ["no config.json", "no model.safetensors", "no tokenizer.json",
                                     "no processor_config.json", "no chat_template.jinja", "truncated",
                                     "lfs pointer", "missing shard", "config not json"])
    def test_broken_folder_is_a_model_error_naming_the_file(self, how, fake_crm, tmp_path, monkeypatch, capsys):
        import medreasoner.models.loading as loading

        def no_asm(*_a, **_k):
            raise AssertionError("the ASM was loaded although the CRM folder is broken")

        monkeypatch.setattr(loading, "load_asm_from", no_asm)
        message = _break(fake_crm, how)
        out = tmp_path / "out"
        assert main(["ground", "--image", str(_png(tmp_path / "x.png")), "--query", QUERY, "--crm", str(fake_crm),
                     "--device", "cpu", "--progress", "none", "--out", str(out)]) == EXIT_MODEL
        _one_line_error(capsys.readouterr().err, "error: ", message, str(fake_crm))
        assert not out.exists()

    def test_check_passes_a_complete_folder(self, fake_crm):
        from medreasoner.models.crm.qwen_vl import check_checkpoint_files

        check_checkpoint_files(fake_crm)
        (fake_crm / "chat_template.jinja").unlink()
        (fake_crm / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
        check_checkpoint_files(fake_crm)  # a template inside tokenizer_config.json counts

    @pytest.mark.slow  # imports transformers, loads the tiny CRM once
    def test_real_checkpoint_truncated_or_unloadable(self, fake_crm, tmp_path, caplog):
        """The real tiny CRM cut short, and a folder that passes the file check but transformers cannot
        load: both one line, exit 3, never a traceback, never a run. (Intact, an image size above its
        processor's cap loads with a warning: the processor shrinks the image back.)"""
        from medreasoner.models.loading import ModelOptions, load_crm_from
        from medreasoner.models.tiny import build_tiny_crm

        real = build_tiny_crm(tmp_path / "tiny", format_steps=0)
        assert load_crm_from(ModelOptions(crm=str(real), image_size=448, device="cpu").checked()).image_size == 448
        assert "above this checkpoint's processor limit (max_pixels 50176, about 224x224)" in caplog.text
        weights = Path(real) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        image = str(_png(tmp_path / "x.png"))
        for crm, needle in ((real, "truncated or damaged"), (fake_crm, "could not load CRM")):
            p = _cli("ground", "--image", image, "--query", QUERY, "--crm", str(crm), "--device", "cpu",
                     "--progress", "none", "--out", str(tmp_path / "out"), timeout=300)
            assert p.returncode == EXIT_MODEL, p.stderr[-2000:]
            lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
            assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
            assert not (tmp_path / "out").exists()


    @pytest.mark.slow  # imports transformers
    @pytest.mark.parametrize("damage", ["chat template", "template without the image", "sidecar not JSON",
                                        "sidecar a list"])
    def test_a_broken_template_or_sidecar_is_a_model_error_before_the_weights_load(self, damage, tmp_path):
        """Never a Jinja traceback at the first question, never a run with other settings than the
        checkpoint was trained with (the sidecar names its prompt and image size)."""
        from medreasoner.models.tiny import build_tiny_crm

        real = Path(build_tiny_crm(tmp_path / "tiny", format_steps=0))
        needle = {"chat template": "chat template of CRM", "template without the image": "renders no image placeholder",
                  "sidecar not JSON": "not JSON", "sidecar a list": "must hold a JSON object"}[damage]
        if damage == "chat template":
            (real / "chat_template.jinja").write_text("{% if %}")
        elif damage == "template without the image":
            (real / "chat_template.jinja").write_text("{{ messages[0]['content'] | map(attribute='type') | join }}")
        else:
            (real / "medreasoner_crm.json").write_text("not json" if damage == "sidecar not JSON" else "[1, 2]")
        p = _cli("ground", "--image", str(_png(tmp_path / "x.png")), "--query", QUERY, "--crm", str(real),
                 "--device", "cpu", "--progress", "none", "--out", str(tmp_path / "out"), timeout=300)
        assert p.returncode == EXIT_MODEL, p.stderr[-2000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- argv


class TestArgv:
    def test_values_starting_with_a_dash_are_joined(self):
        parser = build_parser()
        argv = ["segment-volume", "--volume", "v.nii.gz", "--query", "-is there free air?", "--out", "o",
                "--window", "-600,1500", "--slices", "-3:2", "--key-slice", "-1"]
        joined = join_dash_values(argv, parser)
        assert "--window=-600,1500" in joined and "--slices=-3:2" in joined
        assert "--query=-is there free air?" in joined
        args = parser.parse_args(joined)
        assert (args.window, args.slices, args.query, args.key_slice) == ("-600,1500", "-3:2",
                                                                          "-is there free air?", -1)
        # an unambiguous prefix, as argparse allows; `-v` before the command is the top-level flag
        assert parser.parse_args(join_dash_values(["-v", "ground", "--image", "a", "--query", "q", "--out", "o",
                                                   "--win", "-1000,400"], parser)).window == "-1000,400"
        assert "--image=-scan.png" in join_dash_values(["ground", "--image", "-scan.png"], parser)
        # a missing value still fails as before, it does not swallow the next option (nor -h)
        assert join_dash_values(["ground", "--out", "--crm", "x"], parser) == ["ground", "--out", "--crm", "x"]
        assert join_dash_values(["ground", "--out", "-h"], parser) == ["ground", "--out", "-h"]

    def test_readme_window_and_slices_reach_the_core(self, tmp_path, inputs, no_model_loads, capsys):
        vol = str(inputs / "ct.nii.gz")
        base = ["segment-volume", "--volume", vol, "--query", QUERY, "--out", str(tmp_path / "o"),
                "--crm-backend", "test-brightest", "--crm", "double", "--progress", "none"]
        assert main([*base, "--window", "-600,1500", "--slices", "-3:2"]) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "slice range -3:2 is outside the volume")  # the core's own check

    def test_subprocess_parses_negative_window(self, tmp_path):
        p = _cli("ground", "--image", str(tmp_path / "missing.png"), "--query", QUERY, "--out", str(tmp_path / "o"),
                 "--window", "-600,1500", "--progress", "none", "--crm-backend", "test-brightest", "--crm", "d",
                 "--plugins", str(TESTS / "doubles.py"))
        assert p.returncode == EXIT_INPUT and "expected one argument" not in p.stderr
        _one_line_error(p.stderr, "missing.png")


# ------------------------------------------------------------------------------------- distributed


class TestDistributed:
    @pytest.mark.parametrize("env,message", [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 must be between 0 and WORLD_SIZE-1 = 1"),
        ({"RANK": "1"}, "RANK=1 must be between 0 and WORLD_SIZE-1 = 0"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ])
    def test_environments_that_cannot_work(self, env, message):
        from medreasoner.science.evaluate import Shard

        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Shard.from_env(env)

    def test_environments_that_work(self):
        from medreasoner.science.evaluate import Shard

        assert Shard.from_env({}) == Shard(0, 1)
        assert Shard.from_env({"WORLD_SIZE": "1"}) == Shard(0, 1)
        assert Shard.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}) == Shard(3, 4)

    def test_stray_world_size_is_refused_at_once(self, tmp_path, inputs):
        out = tmp_path / "eval"
        t0 = time.monotonic()
        p = _cli(*_command("evaluate", inputs, str(out)), env=_env(WORLD_SIZE="2"))
        assert p.returncode == EXIT_INPUT and time.monotonic() - t0 < 60
        _one_line_error(p.stderr, "WORLD_SIZE=2 is set but RANK is not", "torchrun --nproc_per_node 2")
        assert not out.exists()

    def test_bad_local_rank_and_merge_timeout(self, tmp_path, inputs, no_model_loads, monkeypatch, capsys):
        monkeypatch.setenv("LOCAL_RANK", "gpu0")
        argv = _command("evaluate", inputs, str(tmp_path / "eval"))
        assert main([a if a != "cpu" else "auto" for a in argv]) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "LOCAL_RANK='gpu0' is not a GPU number")
        monkeypatch.delenv("LOCAL_RANK")
        assert main([*argv, "--merge-timeout", "0"]) == EXIT_INPUT
        _one_line_error(capsys.readouterr().err, "--merge-timeout must be more than 0 seconds")

    def test_every_merge_wait_is_bounded_and_cancellable(self, tmp_path):
        from medreasoner.engine.events import CallbackEvents, CancelToken
        from medreasoner.science.evaluate import Shard, merge

        (tmp_path / "shards").mkdir()
        Shard(0, 2).path(tmp_path).with_suffix(".done").write_text("0")
        t0 = time.monotonic()
        with pytest.raises(InputError, match=r"rank\(s\) \[1\] never started"):
            merge(tmp_path, 2, timeout_s=60, poll_s=0.05, absent_s=0.2)
        Shard(1, 2).path(tmp_path).write_text("")  # rank 1 started, never finishes
        with pytest.raises(InputError, match="did not finish their shards within --merge-timeout"):
            merge(tmp_path, 2, timeout_s=0.3, poll_s=0.05)
        logs, stop = [], CancelToken()
        stop.set()
        with pytest.raises(CancelledError, match="stopped while rank 0 waited for rank"):
            merge(tmp_path, 2, timeout_s=60, poll_s=0.05, events=CallbackEvents(cancel=stop))
        with pytest.raises(InputError):
            merge(tmp_path, 2, timeout_s=0.2, poll_s=0.05, events=CallbackEvents(log=lambda m, lv: logs.append(m)))
        assert logs and "waiting for the shards of rank(s) [1]" in logs[0]
        assert time.monotonic() - t0 < 20


# ---------------------------------------------------------------------------------------- signals


class _Run:
    """The CLI in a subprocess whose stderr is JSON lines (``--progress json``), read as they come."""

    def __init__(self, args: list[str], tmp_path: Path, **env: str):
        plugin = tmp_path / "slow_plugin.py"
        plugin.write_text(PLUGIN)
        cmd = [sys.executable, "-m", "medreasoner", *args, "--plugins", str(plugin), "--crm-backend", "test-slow",
               "--crm", "double", "--asm", "test-box", "--device", "cpu", "--progress", "json"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=_env(**env))
        self.lines: list[dict] = []

    def wait_for(self, match, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            event = json.loads(line)  # every stderr line is JSON in this mode
            self.lines.append(event)
            if match(event):
                return event
        self.proc.kill()
        raise AssertionError(f"never saw the line; got {self.lines}")

    def finish(self, timeout: float = 60) -> tuple[int, dict, float]:
        """(exit code, last stderr event, seconds it took after this call)."""
        t0 = time.monotonic()
        out, err = self.proc.communicate(timeout=timeout)
        assert "Traceback" not in err, err
        self.lines += [json.loads(line) for line in err.splitlines() if line.strip()]
        return self.proc.returncode, self.lines[-1], time.monotonic() - t0


def _log(text: str):
    return lambda e: e.get("event") == "log" and text in e.get("message", "")


def _cancelled(code: int, last: dict, *needles: str) -> None:
    assert code == EXIT_CANCELLED, last
    assert last["event"] == "error" and last["kind"] == "cancelled" and last["exit_code"] == EXIT_CANCELLED
    for needle in needles:
        assert needle in last["message"], last["message"]


class TestSignals:
    @pytest.mark.parametrize("command,sig", [("ground", signal.SIGINT), ("ground", signal.SIGTERM),
                                             ("segment-volume", signal.SIGINT)])
    def test_signal_during_the_only_batch_writes_nothing(self, command, sig, tmp_path, inputs):
        out = tmp_path / "out"
        run = _Run(_command(command, inputs, str(out), model=[]), tmp_path, SLOW_CRM_BATCH_S="2")
        run.wait_for(_log("slow CRM: batch started"))
        run.proc.send_signal(sig)
        code, last, _ = run.finish()
        _cancelled(code, last, f"{sig.name} during", "0 of 1 case(s) had finished", "unfinished cases wrote nothing")
        assert not list(out.rglob("result.json")) and not list(out.rglob("*.png"))
        assert not any(e.get("stage") == "cases" for e in run.lines)  # no case was reported finished

    def test_evaluate_signal_during_the_only_batch(self, tmp_path, inputs):
        out = tmp_path / "eval"
        run = _Run(_command("evaluate", inputs, str(out), model=[]), tmp_path, SLOW_CRM_BATCH_S="2")
        run.wait_for(lambda e: e.get("event") == "progress" and e.get("stage") == "evaluate")  # 0 of 2
        run.wait_for(_log("slow CRM: batch started"))
        run.proc.send_signal(signal.SIGINT)
        code, last, _ = run.finish()
        _cancelled(code, last, "SIGINT", "0 of 2 samples are done and kept", "rerun to resume")
        from medreasoner.science.evaluate import Shard, read_jsonl

        assert read_jsonl(Shard().path(out)) == [] and not (out / "masks").exists()
        assert not (out / "predictions.jsonl").exists() and not (out / "summary.json").exists()

    def test_interrupted_evaluate_says_what_it_kept_and_resumes(self, tmp_path):
        from medreasoner.science.evaluate import Shard, read_jsonl

        data, out = _parquet(tmp_path / "test.parquet", 5), tmp_path / "eval"
        args = ["evaluate", "--data", str(data), "--out", str(out), "--batch-size", "1"]
        run = _Run(args, tmp_path, SLOW_CRM_BATCH_S="1")
        run.wait_for(lambda e: e.get("stage") == "evaluate" and e.get("done") == 3)
        run.proc.send_signal(signal.SIGINT)  # during the 4th batch: it is dropped
        code, last, _ = run.finish()
        _cancelled(code, last, "3 of 5 samples are done and kept in", "rerun to resume")
        assert [r["id"] for r in read_jsonl(Shard().path(out))] == ["s0", "s1", "s2"]
        rerun = _Run(args, tmp_path)
        code, last, _ = rerun.finish(timeout=120)
        assert code == EXIT_OK, last
        assert [r["id"] for r in read_jsonl(out / "predictions.jsonl")] == [f"s{i}" for i in range(5)]
        assert [e["done"] for e in rerun.lines if e.get("stage") == "evaluate"] == [3, 4, 5]  # resumed

    def test_signal_while_models_load(self, tmp_path, inputs):
        out = tmp_path / "out"
        run = _Run(_command("ground", inputs, str(out), model=[]), tmp_path, SLOW_CRM_LOAD_S="120")
        run.wait_for(_log("slow CRM: loading"))
        run.proc.send_signal(signal.SIGINT)
        code, last, took = run.finish()
        _cancelled(code, last, "stopped at once by SIGINT while loading the models", "nothing was written")
        assert took < 20 and not out.exists()

    def test_second_signal_stops_a_long_batch_at_once(self, tmp_path, inputs):
        run = _Run(_command("ground", inputs, str(tmp_path / "out"), model=[]), tmp_path, SLOW_CRM_BATCH_S="120")
        run.wait_for(_log("slow CRM: batch started"))
        run.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        run.proc.send_signal(signal.SIGINT)
        code, last, took = run.finish()
        _cancelled(code, last, "stopped at once by a second SIGINT", "0 of 1 case(s) had finished")
        assert took < 20 and not list((tmp_path / "out").rglob("result.json"))

    def test_sigterm_while_rank_0_waits_for_the_others(self, tmp_path, inputs):
        out = tmp_path / "eval"
        run = _Run(_command("evaluate", inputs, str(out), model=[]), tmp_path, WORLD_SIZE="2", RANK="0",
                   MASTER_ADDR="127.0.0.1")
        run.wait_for(_log("rank 0 is waiting for the shards of rank(s) [1]"))
        run.proc.send_signal(signal.SIGTERM)
        code, last, took = run.finish()
        _cancelled(code, last, "SIGTERM", "stopped while rank 0 waited for rank(s) [1]", "rerun to resume")
        assert took < 20 and not (out / "summary.json").exists()
        from medreasoner.science.evaluate import Shard, read_jsonl

        assert [r["id"] for r in read_jsonl(Shard(0, 2).path(out))] == ["s0"]  # rank 0's own share is kept


def test_main_restores_signal_handlers(tmp_path, capsys):
    """`main` runs inside tests, the demo and notebooks: its handlers must not outlive it."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    main(["ground", "--image", "x.png", "--query", QUERY, "--out", str(tmp_path / "afile" / "x")])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    capsys.readouterr()
