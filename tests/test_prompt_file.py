"""Prompt templates that travel with the model: ``--prompt-file``, the checkpoint sidecar's template,
the built-in wordings, their precedence, and the sha256 every result records.

Pure functions where possible; the CLI run uses the CRM test double (tests/doubles.py) and the real
LiteMedSAM on one small image; the session runs use a box-as-mask ASM double.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from doubles import BoxASM

from medreasoner.constants import CRM_SIDECAR, EXIT_INPUT, EXIT_OK
from medreasoner.errors import InputError, ModelLoadError
from medreasoner.models.prompts import (
    MAX_TEMPLATE_BYTES,
    PromptTemplate,
    build_messages,
    build_prompt,
    builtin_template,
    check_template,
    checkpoint_template,
    load_prompt_file,
    prompt_record,
)

ROOT = Path(__file__).resolve().parent.parent
DOUBLES = ROOT / "tests" / "doubles.py"
QUERY = "Which structure would explain this patient's abdominal pain?"
# our own words: the project never ships the reference method's prompt text
TEMPLATE = ("Image question: {question}\nReply as <think>...</think><answer>{{\"bbox\": [x1, y1, x2, y2], "
            "\"points_1\": [x, y], \"points_2\": [x, y]}}</answer>")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    return _write(tmp_path / "prompt.txt", TEMPLATE + "\n")


def _rendered(question: str = QUERY) -> str:
    return TEMPLATE.replace("{question}", question).replace("{{", "{").replace("}}", "}")


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("text,message", [
    ("Where is the lesion?", "no {question} placeholder"),
    ("{question} and again {question}", "2 {question} placeholders"),
    ("a stray { brace {question}", "write literal braces as {{ and }}"),
    ("a stray } brace {question}", "write literal braces as {{ and }}"),
    ("{question} answer as {'bbox': [0, 0, 1, 1]}", "write literal braces"),
    ("{Question}", "{Question}"),
    ("{question} {example}", "the field(s) {example}"),
    ("{} {question}", "the field(s) {}"),
    ("{question!r}", "not {question!r}"),
    ("", "is empty"),
    ("  \n\t ", "is empty"),
    ("{question}\x00", "NUL"),
    ("{question}" + "x" * MAX_TEMPLATE_BYTES, "at most"),
])
def test_template_text_is_refused_in_one_line(text, message):
    with pytest.raises(InputError) as exc:
        check_template(text, "T")
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("data,message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR{question}", "binary"),
    (b"caf\xe9 {question}", "not UTF-8"),
    (b"", "is empty"),
    (b"\n", "is empty"),
    (b"no placeholder here\n", "no {question} placeholder"),
    (b"{question}" + b"y" * MAX_TEMPLATE_BYTES, "at most"),
])
def test_bad_prompt_files_are_input_errors(tmp_path, data, message):
    path = _write(tmp_path / "p.txt", data)
    with pytest.raises(InputError) as exc:
        load_prompt_file(path)
    assert message in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_prompt_file_or_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_prompt_file(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="is a folder"):
        load_prompt_file(tmp_path)
    with pytest.raises(InputError, match="empty"):
        load_prompt_file("  ")


def test_file_text_as_used_and_its_sha256(tmp_path, prompt_file):
    t = load_prompt_file(prompt_file)
    assert t.text == TEMPLATE  # the one final newline an editor adds is dropped
    assert t.sha256 == _sha(TEMPLATE) == hashlib.sha256(prompt_file.read_bytes().rstrip(b"\n")).hexdigest()
    assert t.source == f"file:{prompt_file.resolve()}" and t.name == "file"
    assert t.render(f"  {QUERY} ") == _rendered()  # literal braces come out single, the question stripped
    assert t.render("what about {braces} in a question?").startswith("Image question: what about {braces}")
    # a BOM and Windows line ends are dropped; a second final newline is the prompt's own
    crlf = load_prompt_file(_write(tmp_path / "w.txt", b"\xef\xbb\xbfLine one\r\nQ: {question}\r\n\r\n"))
    assert crlf.text == "Line one\nQ: {question}\n" and crlf.sha256 == _sha("Line one\nQ: {question}\n")
    assert t.record() == {"prompt": "file", "prompt_sha256": _sha(TEMPLATE), "prompt_source": t.source}


def test_builtin_wordings_are_templates_too():
    for kind in ("reasoning", "direct"):
        b = builtin_template(kind)
        assert b.source == f"builtin:{kind}" and b.name == kind and b.text.count("{question}") == 1
        assert build_prompt(QUERY, kind) == b.render(QUERY) and QUERY in b.render(QUERY)
        assert "{'bbox': [xmin, ymin, xmax, ymax]" in b.render(QUERY)  # the example's braces, unescaped
        assert prompt_record(object(), kind) == {"prompt": kind, "prompt_sha256": _sha(b.text),
                                                 "prompt_source": f"builtin:{kind}"}
    assert builtin_template("reasoning").sha256 != builtin_template("direct").sha256
    with pytest.raises(ValueError, match="unknown prompt kind"):
        builtin_template("chatty")


# ------------------------------------------------------------------------- what the CRM is sent


def test_template_replaces_the_wording_for_every_question(prompt_file):
    t = load_prompt_file(prompt_file)
    for kind in ("reasoning", "direct"):  # --prompt no longer matters once a template is in use
        assert build_prompt(QUERY, kind, t) == _rendered()
    assert build_messages(QUERY, "direct", t) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _rendered()}]}]


def test_transformers_backend_chat_text_is_the_template(prompt_file):
    """The chat the processor gets is the image, then exactly the file's text with the question in."""
    from medreasoner.models.crm.qwen_vl import QwenVLCRM

    seen = []

    class Processor:
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            seen.append(messages)
            return "chat:" + messages[0]["content"][1]["text"]

    crm = QwenVLCRM.__new__(QwenVLCRM)  # no weights: only the text building is under test
    crm.processor = Processor()
    assert crm._chat_texts(["Which organ?"], "reasoning") == ["chat:" + build_prompt("Which organ?", "reasoning")]
    crm.prompt_template = load_prompt_file(prompt_file)
    assert crm._chat_texts([QUERY, QUERY], "direct") == ["chat:" + _rendered()] * 2
    assert seen[-1] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _rendered()}]}]
    assert crm.prompt_info("direct")["prompt_sha256"] == _sha(TEMPLATE)


def test_openai_backend_request_text_is_the_template(prompt_file):
    from medreasoner.models.crm.openai_compat import OpenAICompatCRM

    crm = OpenAICompatCRM("served-model", base_url="http://127.0.0.1:9/v1")  # nothing is sent
    text = crm._payload("data:image/png;base64,", QUERY, "direct")["messages"][0]["content"][1]["text"]
    assert text == build_prompt(QUERY, "direct")
    crm.prompt_template = load_prompt_file(prompt_file)
    payload = crm._payload("data:image/png;base64,", QUERY, "direct")
    assert payload["messages"][0]["content"][1] == {"type": "text", "text": _rendered()}


# ---------------------------------------------------------------------------- checkpoint sidecar


def _sidecar(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CRM_SIDECAR).write_text(json.dumps({"image_size": 840, **values}))
    return folder


def test_sidecar_inline_text_or_file_in_the_folder(tmp_path):
    from medreasoner.models.crm.qwen_vl import sidecar_prompt_template

    inline = _sidecar(tmp_path / "a", prompt_template=TEMPLATE)
    t = sidecar_prompt_template(inline)
    assert t.text == TEMPLATE and t.source == f"checkpoint:{(inline / CRM_SIDECAR).resolve()}"
    named = _sidecar(tmp_path / "b", prompt_file="prompts/train.txt")
    (named / "prompts").mkdir()
    _write(named / "prompts" / "train.txt", TEMPLATE + "\n")
    t = sidecar_prompt_template(named)
    assert t.text == TEMPLATE and t.sha256 == _sha(TEMPLATE)
    assert t.source == f"checkpoint:{named.resolve() / 'prompts' / 'train.txt'}" and t.name == "file"
    assert sidecar_prompt_template(_sidecar(tmp_path / "c")) is None  # no key: the built-in wording
    assert sidecar_prompt_template(tmp_path / "no-such-folder") is None  # a hub id: no sidecar read


@pytest.mark.parametrize("values,message", [
    ({"prompt_template": TEMPLATE, "prompt_file": "p.txt"}, "keep one"),
    ({"prompt_template": "no placeholder"}, "no {question} placeholder"),
    ({"prompt_template": 42}, "must be text"),
    ({"prompt_file": "../outside.txt"}, "inside the checkpoint folder"),
    ({"prompt_file": "/etc/hostname"}, "inside the checkpoint folder"),
    ({"prompt_file": "missing.txt"}, "not found"),
    ({"prompt_file": ""}, "must be a file name"),
])
def test_bad_sidecar_template_is_a_model_error(tmp_path, values, message):
    from medreasoner.models.crm.qwen_vl import sidecar_prompt_template

    folder = _sidecar(tmp_path / "ckpt", **values)
    with pytest.raises(ModelLoadError) as exc:
        sidecar_prompt_template(folder)
    assert message in str(exc.value) and str(folder) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(InputError):
        checkpoint_template(folder, json.loads((folder / CRM_SIDECAR).read_text()))


def _fake_checkpoint(folder: Path) -> Path:
    """Files enough for check_checkpoint_files (weights a valid, empty safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    header = b'{"__metadata__": {}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        (folder / name).write_text("{}")
    return folder


def test_qwen_crm_refuses_a_bad_sidecar_template_before_loading_weights(tmp_path):
    from medreasoner.models.crm.qwen_vl import QwenVLCRM

    folder = _sidecar(_fake_checkpoint(tmp_path / "ckpt"), prompt_file="gone.txt")
    with pytest.raises(ModelLoadError, match="prompt file not found"):
        QwenVLCRM(str(folder), device="cpu")


# -------------------------------------------------------------------------------------- precedence


    def describe(self):
        return {"name": self.name, "tiny_test_model": False}


def _double():
    """The brightest-region CRM double, registered as the backend test-brightest (tests/doubles.py)."""
    from medreasoner.models.registry import load_plugins

    (doubles,) = load_plugins(str(DOUBLES))
    return doubles.BrightestRegionCRM()


def test_precedence_explicit_file_then_sidecar_then_builtin(tmp_path, prompt_file):
    from medreasoner.engine import ModelOptions, load_models

    sidecar = PromptTemplate("From the checkpoint: {question}", "checkpoint:/ckpt/medreasoner_crm.json")
    options = ModelOptions(crm="double", crm_backend="test-brightest", asm="litemedsam")
    crm = _double()
    assert prompt_record(load_models(options, crm=crm, asm=BoxASM()).crm, "direct")["prompt_source"] == \
        "builtin:direct"
    crm.prompt_template = sidecar  # what QwenVLCRM reads from its sidecar while loading
    assert load_models(options, crm=crm, asm=BoxASM()).crm.prompt_template is sidecar
    options.prompt_file = str(prompt_file)
    models = load_models(options, crm=crm, asm=BoxASM())
    assert models.crm.prompt_template.source == f"file:{prompt_file.resolve()}"
    assert models.crm.prompt_text(QUERY, "reasoning") == _rendered()


def test_a_bad_prompt_file_is_refused_by_the_options_check(tmp_path):
    from medreasoner.engine import ModelOptions

    with pytest.raises(InputError, match="no {question} placeholder"):
        ModelOptions(crm="double", prompt_file=str(_write(tmp_path / "p.txt", "nothing\n"))).checked()
    assert ModelOptions(crm="double").checked().prompt_template() is None


# ---------------------------------------------------------------------------------------- records


def _png(path: Path, size: int = 48) -> Path:
    from PIL import Image

    img = np.full((size, size), 20, np.uint8)
    img[size // 4: size // 2, size // 5: size // 2] = 230
    Image.fromarray(img).save(path)
    return path


def test_image_and_volume_records_carry_the_prompt_sha(tmp_path, prompt_file):
    import SimpleITK as sitk

    from medreasoner.engine import Session, validate_record
    from medreasoner.models.loading import Models

    crm = _double()
    session = Session(Models(crm=crm, asm=BoxASM()))
    rec = session.ground_image(_png(tmp_path / "x.png"), QUERY).to_record()
    validate_record(rec)
    assert (rec["prompt"], rec["prompt_source"]) == ("reasoning", "builtin:reasoning")
    assert rec["prompt_sha256"] == builtin_template("reasoning").sha256

    crm.prompt_template = load_prompt_file(prompt_file)
    rec = session.ground_image(_png(tmp_path / "x.png"), QUERY).to_record()
    validate_record(rec)
    assert rec["prompt"] == "file" and rec["prompt_sha256"] == _sha(TEMPLATE) == hashlib.sha256(
        TEMPLATE.encode()).hexdigest()
    assert rec["prompt_source"] == f"file:{prompt_file.resolve()}"

    vol = np.full((6, 32, 32), -100, np.int16)
    vol[1:5, 8:20, 10:22] = 300
    image = sitk.GetImageFromArray(vol)
    record = session.ground_volume(image, QUERY).record
    validate_record(record)
    assert record["prompt"] == "file" and record["prompt_sha256"] == _sha(TEMPLATE)
    assert record["prompt_source"] == f"file:{prompt_file.resolve()}"


def test_schema_allows_records_without_the_new_fields_but_checks_them():
    import jsonschema

    from medreasoner.engine import result_schema

    props = result_schema()["properties"]
    assert "file" in props["prompt"]["enum"]
    assert "prompt_sha256" not in result_schema()["required"]
    jsonschema.validate("a" * 64, props["prompt_sha256"])
    for bad in ("A" * 64, "abc"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, props["prompt_sha256"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("somewhere", props["prompt_source"])


# ------------------------------------------------------------------------------------ entry points


def test_every_model_command_takes_prompt_file():
    from medreasoner.cli import build_parser

    parser = build_parser()
    common = ["--prompt-file", "p.txt"]
    for argv in (["ground", "--image", "x.png", "--query", "q", "--out", "o"],
                 ["segment-volume", "--volume", "v.nii.gz", "--query", "q", "--out", "o"],
                 ["evaluate", "--data", "d", "--out", "o"], ["worker"]):
        assert parser.parse_args([*argv, *common]).prompt_file == "p.txt", argv[0]
        assert parser.parse_args(argv).prompt_file is None


def test_cli_ground_records_the_prompt_files_sha(tmp_path, prompt_file, capsys):
    from medreasoner.cli import main

    out = tmp_path / "out"
    argv = ["ground", "--image", str(_png(tmp_path / "img.png")), "--query", QUERY, "--out", str(out),
            "--prompt-file", str(prompt_file), "--plugins", str(DOUBLES), "--crm-backend", "test-brightest",
            "--crm", "double", "--asm", "litemedsam", "--device", "cpu", "--progress", "none"]
    assert main(argv) == EXIT_OK
    record = json.loads((out / "img" / "result.json").read_text())
    assert record["prompt"] == "file" and record["prompt_sha256"] == _sha(TEMPLATE)
    assert record["prompt_source"] == f"file:{prompt_file.resolve()}"
    capsys.readouterr()


def test_cli_bad_prompt_file_exits_2_before_reading_inputs(tmp_path, capsys):
    from medreasoner.cli import main

    bad = _write(tmp_path / "p.txt", "two {question} {question}")
    argv = ["ground", "--image", str(tmp_path / "missing.png"), "--query", QUERY, "--out", str(tmp_path / "o"),
            "--prompt-file", str(bad), "--plugins", str(DOUBLES), "--crm-backend", "test-brightest",
            "--crm", "double", "--progress", "none"]
    assert main(argv) == EXIT_INPUT  # the image is missing too: the prompt file was checked first
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: prompt template") and "2 {question} placeholders" in err and "\n" not in err


def test_worker_with_a_bad_prompt_file_says_fatal_exit_2(tmp_path, capsys):
    from medreasoner.cli import main

    code = main(["worker", "--prompt-file", str(tmp_path / "gone.txt"), "--plugins", str(DOUBLES),
                 "--crm-backend", "test-brightest", "--crm", "double", "--device", "cpu"])
    assert code == EXIT_INPUT
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["type"] == "fatal" and line["exit_code"] == EXIT_INPUT and "prompt file not found" in line["message"]


def test_bundle_prompt_file_override(bundle_parser, prompt_file, tmp_path, caplog):
    options = bundle_parser(prompt_file=str(prompt_file)).get_parsed_content("network_def").model_options
    assert options.prompt_file == str(prompt_file) and options.prompt_template().text == TEMPLATE
    for unset in (None, "null"):  # the default, and `--prompt_file null` on a command line
        assert bundle_parser(prompt_file=unset).get_parsed_content("model_options").prompt_file is None
    with pytest.raises(SystemExit) as exc:
        bundle_parser(prompt_file=str(tmp_path / "gone.txt")).get_parsed_content("network_def")
    assert exc.value.code == EXIT_INPUT and "prompt file not found" in caplog.text


@pytest.fixture
def monailabel_config():
    """monailabel_app/lib/configs/medreasoner.py, imported as the app's main.py does (no server)."""
    pytest.importorskip("monailabel")
    app = str(ROOT / "monailabel_app")
    sys.path.insert(0, app)
    try:
        yield importlib.import_module("lib.configs.medreasoner")
    finally:
        sys.path.remove(app)
        for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
            del sys.modules[name]


def test_monailabel_conf_prompt_file(monailabel_config, prompt_file, tmp_path):
    crm = _sidecar(tmp_path / "crm")  # a local folder, as the app requires for the transformers backend
    options = monailabel_config.model_options({"crm": str(crm), "prompt_file": str(prompt_file)})
    assert options.prompt_file == str(prompt_file) and options.prompt_template().sha256 == _sha(TEMPLATE)
    assert monailabel_config.model_options({"crm": str(crm), "prompt_file": " "}).prompt_file is None
    with pytest.raises(InputError, match="no {question} placeholder"):
        monailabel_config.model_options({"crm": str(crm), "prompt_file": str(_write(tmp_path / "b.txt", "x"))})


# -------------------------------------------------------------------------------- the real tiny CRM


@pytest.mark.slow
def test_tiny_crm_reads_its_sidecar_template_and_the_file_wins(tmp_path, tiny_models, prompt_file):
    from medreasoner.engine import ModelOptions, load_models

    crm_dir = tmp_path / "crm"
    shutil.copytree(tiny_models["format"], crm_dir)
    sidecar = json.loads((crm_dir / CRM_SIDECAR).read_text())
    (crm_dir / CRM_SIDECAR).write_text(json.dumps({**sidecar, "prompt_file": "prompt.txt"}))
    _write(crm_dir / "prompt.txt", "Trained with: {question}\n")
    options = ModelOptions(crm=str(crm_dir), asm="litemedsam", device="cpu", max_new_tokens=8)
    crm = load_models(options, asm=BoxASM()).crm
    assert crm.prompt_info("reasoning") == {"prompt": "file", "prompt_sha256": _sha("Trained with: {question}"),
                                            "prompt_source": f"checkpoint:{crm_dir.resolve() / 'prompt.txt'}"}
    (text,) = crm._chat_texts([QUERY], "reasoning")
    assert f"Trained with: {QUERY}<|im_end|>" in text  # exactly the template, in the real chat template
    options.prompt_file = str(prompt_file)
    crm = load_models(options, asm=BoxASM()).crm
    assert crm.prompt_info("reasoning")["prompt_source"] == f"file:{prompt_file.resolve()}"
    assert _rendered() in crm._chat_texts([QUERY], "direct")[0]
