"""The Lib's pure parts: settings on a real parameter node, questions, history, terminology, install checks."""

from __future__ import annotations

import sys

import pytest
import slicer
from conftest import MAIN_PYTHON, WORKER_ENV
from MedReasonerLib import install, terminology
from MedReasonerLib.errors import MedReasonerSlicerError
from MedReasonerLib.parameters import QuestionHistory, RunSettings, parse_questions


def test_settings_round_trip_through_a_parameter_node(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedReasoner")
    s = RunSettings(strategy="slicewise", axis="coronal", window_mode="custom", window_custom="-600, 1500",
                    key_slice_mode="number", key_slice=12, compute="remote", timeout_s=12.5)
    s.to_parameter_node(node)
    back = RunSettings.from_parameter_node(node)
    assert back == s
    assert back.window() == "-600,1500"
    node.SetParameter("MedReasoner.key_slice", "twelve")  # a hand-edited scene: the default is kept
    assert RunSettings.from_parameter_node(node).key_slice == 0
    assert RunSettings.from_parameter_node(slicer.vtkMRMLScriptedModuleNode()) == RunSettings()


def test_run_options_follow_the_key_slice_mode():
    assert RunSettings().run_options() == {"strategy": "keyslice", "axis": "axial", "prompt": "reasoning",
                                           "window": None}
    assert RunSettings(key_slice_mode="number", key_slice=4).run_options()["key_slice"] == 4
    assert RunSettings(key_slice_mode="current").run_options([1.0, 2.0, 3.0])["key_point"] == [1.0, 2.0, 3.0]
    with pytest.raises(MedReasonerSlicerError, match="no slice is on screen"):
        RunSettings(key_slice_mode="current").run_options()
    # every slice: no key slice is sent at all
    assert "key_slice" not in RunSettings(strategy="slicewise", key_slice_mode="number").run_options()
    assert RunSettings(window_mode="lung").run_options()["window"] == "lung"


@pytest.mark.parametrize("text,why", [("", "type a question"), ("\n \n", "type a question"),
                                      ("\n".join(f"q{i}" for i in range(21)), "at most 20"),
                                      ("x" * 2001, "under 2000")])
def test_bad_questions(text, why):
    with pytest.raises(MedReasonerSlicerError, match=why):
        parse_questions(text)


def test_history_keeps_the_last_questions_newest_first():
    store: dict = {}
    h = QuestionHistory(store, length=3)
    h.add(["a", "b"])
    h.add(["c"])
    assert h.add(["a"]) == ["a", "c", "b"]
    h.add(["d", "e"])
    assert h.items() == ["d", "e", "a"]
    store[QuestionHistory.KEY] = "not json"
    assert h.items() == []


def test_terminology_names_colours_and_laterality():
    left = terminology.style_for("Is the LEFT kidney enlarged?", 0, [], [])
    assert left.structure == "Kidney" and "SCT^7771000^Left" in left.terminology
    right = terminology.style_for("Which renal mass is on the right side?", 1, [], [left.colour])
    assert right.structure == "Kidney" and right.colour != left.colour  # same organ, still distinct
    plural = terminology.style_for("Are both lungs clear?", 0, [], [])
    assert plural.structure == "Lung"
    plain = terminology.style_for("What explains the shortness of breath?", 0, [], [])
    assert plain.terminology is None
    colours = []
    for i in range(12):  # more than the palette: every colour still differs
        colours.append(terminology.style_for(f"question {i}", i, [], colours).colour)
    assert len(set(colours)) == 12
    assert terminology.segment_name("q", ["q", "q (2)"]) == "q (3)"
    assert len(terminology.segment_name("x" * 300, [])) == terminology.NAME_CHARS


def test_missing_requirements_in_two_environments():
    """The project's .venv has what the worker needs; this bare slicer-core venv has none of it."""
    if not __import__("os").path.exists(MAIN_PYTHON):
        pytest.skip("project .venv missing")
    assert install.missing_requirements(MAIN_PYTHON, WORKER_ENV) == []
    missing = install.missing_requirements(sys.executable)
    assert "medreasoner" in missing and any(m.startswith("torch") for m in missing)
    with pytest.raises(MedReasonerSlicerError, match="no Python"):
        install.missing_requirements("/nonexistent/python")


def test_protected_constraints_pin_slicers_numpy_and_simpleitk():
    from importlib import metadata

    path = install.protected_constraints()
    with open(path) as f:
        text = f.read()
    assert f"numpy=={metadata.version('numpy')}" in text and f"SimpleITK=={metadata.version('SimpleITK')}" in text
    assert install.package_spec().endswith("[crm,litemedsam]")


def test_exported_volumes_are_reused_and_evicted_without_clashes(tmp_path, scene):
    """One NRRD per volume content (the worker's caches key on the file); old ones leave, none is reused."""
    import numpy as np
    from MedReasonerLib.logic import MAX_EXPORTS, MedReasonerLogic

    logic = MedReasonerLogic(temp_root=str(tmp_path))
    try:
        nodes = [slicer.util.addVolumeFromArray(np.full((3, 4, 5), i, np.int16), name=f"v{i}")
                 for i in range(MAX_EXPORTS + 2)]
        paths = [logic.export_volume(n) for n in nodes]
        assert len(set(paths)) == len(paths)
        assert logic.export_volume(nodes[-1]) == paths[-1]  # same content: the same file
        kept = [p for p in paths if __import__("os").path.exists(p)]
        assert kept == paths[-MAX_EXPORTS:]
        slicer.util.updateVolumeFromArray(nodes[-1], np.zeros((3, 4, 5), np.int16))  # new content: new file
        assert logic.export_volume(nodes[-1]) not in paths
    finally:
        logic.shutdown()
