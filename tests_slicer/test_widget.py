"""The Slicer module's own files: MedReasoner.py against its .ui, the CMake files, the catalog entry.

Slicer's GUI (PythonQt, CTK, qMRML widgets) is not available outside the application, so the panel is
checked statically: every widget the code uses exists in the .ui with a class that supports how the
code uses it (PythonQt's rules: Qt properties are attributes, other members are called), the .ui loads
with Qt's own loader, and every connected signal exists on the widget's class. The module's self-test
(``MedReasonerTest``) runs here for real, with small stand-ins for Slicer's GUI modules.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "MedReasonerSlicer"
MODULE_PY = MODULE_DIR / "MedReasoner.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedReasoner.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "MedReasoner.png"
LIB_DIR = MODULE_DIR / "MedReasonerLib"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
ROOT_CMAKE = ROOT / "CMakeLists.txt"
CATALOG_JSON = ROOT / "MedReasoner.json"
# written by others in the same change; the module's CMake list must name them too
LIB_FILES_EXPECTED = {"install.py", "snapshot.py"}

# -- what each member used on ``<x>.ui.<name>`` says about the widget's class ----------------------
# (a class or any of its base classes must be listed; every member the code uses must be here)
GENERIC = {"setEnabled", "enabled", "setToolTip", "toolTip", "setVisible", "visible", "show", "hide", "setFocus",
           "blockSignals", "setStyleSheet"}
EXPECTED = {
    "currentNode": {"qMRMLNodeComboBox"},
    "setCurrentNode": {"qMRMLNodeComboBox"},
    "currentNodeChanged": {"qMRMLNodeComboBox"},
    "currentPath": {"ctkPathLineEdit"},
    "setCurrentPath": {"ctkPathLineEdit"},
    "currentPathChanged": {"ctkPathLineEdit"},
    "toPlainText": {"QPlainTextEdit"},
    "setPlainText": {"QPlainTextEdit"},
    "appendPlainText": {"QPlainTextEdit"},
    "appendHtml": {"QPlainTextEdit"},
    "text": {"QLineEdit"},
    "setText": {"QLineEdit", "QLabel"},
    "textChanged": {"QLineEdit", "QPlainTextEdit"},
    "value": {"QSpinBox"},
    "setValue": {"QSpinBox", "QProgressBar"},
    "valueChanged": {"QSpinBox"},
    "setFormat": {"QProgressBar"},
    "checked": {"QRadioButton", "QCheckBox"},
    "setChecked": {"QRadioButton", "QCheckBox"},
    "toggled": {"QRadioButton", "QCheckBox"},
    "clicked": {"QPushButton"},
    "addItem": {"QComboBox"},
    "clear": {"QComboBox"},
    "count": {"QComboBox"},
    "currentIndex": {"QComboBox"},
    "setCurrentIndex": {"QComboBox"},
    "currentText": {"QComboBox"},
    "currentTextChanged": {"QComboBox"},
    "currentIndexChanged": {"QComboBox"},
    "activated": {"QComboBox"},
    "findData": {"QComboBox"},
    "findText": {"QComboBox"},
    "itemData": {"QComboBox"},
    "setHorizontalHeaderLabels": {"QTableWidget"},
    "horizontalHeader": {"QTableWidget"},
    "clearContents": {"QTableWidget"},
    "setRowCount": {"QTableWidget"},
    "setItem": {"QTableWidget"},
    "selectRow": {"QTableWidget"},
    "selectionModel": {"QTableWidget"},
    "itemSelectionChanged": {"QTableWidget"},
    "setHtml": {"QTextBrowser"},
    "enabled": {"QWidget"},
}
# helpers of the widget class that take a widget: what it must be
HELPER_ARGUMENT = {"_fillCombo": {"QComboBox"}, "_comboValue": {"QComboBox"}, "_setComboValue": {"QComboBox"}}

# Slicer/CTK classes (not in PySide6): their Qt base and the API the code may use (from their headers)
CUSTOM_API = {
    "qMRMLWidget": {"base": "QWidget", "properties": set(), "methods": {"setMRMLScene", "mrmlScene"},
                    "signals": {"mrmlSceneChanged(vtkMRMLScene*)"}},
    "qMRMLNodeComboBox": {
        "base": "QWidget",
        "properties": {"currentNodeID", "nodeTypes", "showHidden", "showChildNodeTypes", "hideChildNodeTypes",
                       "baseName", "noneEnabled", "addEnabled", "removeEnabled", "editEnabled", "renameEnabled",
                       "interactionNodeSingletonTag", "selectNodeUponCreation", "noneDisplay", "sizeAdjustPolicy"},
        "methods": {"currentNode", "setCurrentNode", "setCurrentNodeID", "setCurrentNodeIndex", "setMRMLScene",
                    "mrmlScene", "nodeCount", "nodeFromIndex", "addNode", "addAttribute", "removeAttribute",
                    "nodes", "sortFilterProxyModel", "removeCurrentNode", "renameCurrentNode", "addMenuAction"},
        "signals": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "currentNodeIDChanged(QString)",
                    "nodeActivated(vtkMRMLNode*)", "nodeAdded(vtkMRMLNode*)", "nodeAddedByUser(vtkMRMLNode*)",
                    "nodeAddedByUserAction(vtkMRMLNode*)", "nodeAboutToBeRemoved(vtkMRMLNode*)",
                    "nodeAboutToBeEdited(vtkMRMLNode*)", "currentNodeRenamed(QString)"},
    },
    "ctkPathLineEdit": {
        "base": "QWidget",
        "properties": {"currentPath", "label", "nameFilters", "filters", "options", "settingKey", "showBrowseButton",
                       "showHistoryButton", "sizeAdjustPolicy", "minimumContentsLength"},
        "methods": {"setCurrentPath", "browse", "retrieveHistory", "addCurrentPathToHistory", "comboBox",
                    "setCurrentFileExtension"},
        "signals": {"currentPathChanged(QString)", "validInputChanged(bool)"},
    },
    "ctkCollapsibleButton": {
        "base": "QAbstractButton",
        "properties": {"collapsed", "collapsedHeight", "flat", "contentsFrameShape", "contentsFrameShadow",
                       "contentsLineWidth", "contentsMidLineWidth", "buttonTextAlignment", "indicatorAlignment"},
        "methods": {"setCollapsed"},
        "signals": {"contentsCollapsed(bool)"},
    },
}
SECTIONS = {"inputsCollapsibleButton": "Inputs", "optionsCollapsibleButton": "Options",
            "computeCollapsibleButton": "Compute", "resultsCollapsibleButton": "Results"}
CATALOG_FIELDS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                  "build_subdirectory", "enabled", "tier"}  # slicer-extension-catalog-entry-schema-v1.0.1


# -- parsing -------------------------------------------------------------------------------------------
@dataclass
class UiUse:
    widget: str
    member: str | None  # None: the widget itself is handed on (e.g. to a helper)
    called: bool
    signal: str | None  # "clicked" (attribute form) or "clicked(bool)" (string form)
    slot: ast.expr | None
    helper: str | None
    line: int


def _parents(tree) -> dict:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def ui_uses(source: str) -> list[UiUse]:
    """Every ``<x>.ui.<name>`` of the source and how it is used."""
    tree = ast.parse(source)
    parents = _parents(tree)
    uses = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"):
            continue
        parent = parents.get(node)
        use = UiUse(node.attr, None, False, None, None, None, node.lineno)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            use.member = parent.attr
            grand = parents.get(parent)
            if isinstance(grand, ast.Call) and grand.func is parent:
                use.called = True
                if parent.attr == "connect":
                    assert isinstance(grand.args[0], ast.Constant), f"line {node.lineno}: connect needs a signature"
                    use.signal, use.slot = grand.args[0].value, grand.args[1]
            elif isinstance(grand, ast.Attribute) and grand.attr == "connect":
                call = parents.get(grand)
                assert isinstance(call, ast.Call) and call.func is grand, f"line {node.lineno}: .connect not called"
                use.signal, use.slot = parent.attr, call.args[0]
        elif isinstance(parent, ast.Call) and node in parent.args and isinstance(parent.func, ast.Attribute):
            use.helper = parent.func.attr
        uses.append(use)
    return uses


def ui_tree():
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> dict[str, str]:
    """object name -> class of every widget of the .ui."""
    names: dict[str, str] = {}
    for w in ui_tree().iter("widget"):
        assert w.get("name") not in names, f"two widgets are called {w.get('name')}"
        names[w.get("name")] = w.get("class")
    return names


def ui_custom_widgets() -> dict[str, tuple[str, str]]:
    return {c.findtext("class"): (c.findtext("extends"), c.findtext("header")) for c in ui_tree().iter("customwidget")}


def widget_property(name: str, prop: str):
    for w in ui_tree().iter("widget"):
        if w.get("name") == name:
            for p in w.findall("property"):
                if p.get("name") == prop:
                    return p
    return None


def qt_class(xml_class: str):
    from PySide6 import QtWidgets

    if hasattr(QtWidgets, xml_class):
        return getattr(QtWidgets, xml_class)
    assert xml_class in CUSTOM_API, f"{xml_class}: neither a Qt widget nor a known Slicer/CTK class"
    return getattr(QtWidgets, CUSTOM_API[xml_class]["base"])


def ancestry(xml_class: str) -> set[str]:
    return {xml_class} | {k.__name__ for k in qt_class(xml_class).__mro__}


def qt_signals(cls) -> set[str]:
    from PySide6.QtCore import QMetaMethod

    mo = cls.staticMetaObject
    return {bytes(mo.method(i).methodSignature()).decode() for i in range(mo.methodCount())
            if mo.method(i).methodType() == QMetaMethod.MethodType.Signal}


def signals_of(xml_class: str) -> set[str]:
    custom = CUSTOM_API.get(xml_class, {}).get("signals", set())
    return set(custom) | qt_signals(qt_class(xml_class))


def is_property(xml_class: str, member: str) -> bool:
    if member in CUSTOM_API.get(xml_class, {}).get("properties", set()):
        return True
    return qt_class(xml_class).staticMetaObject.indexOfProperty(member) >= 0


def has_method(xml_class: str, member: str) -> bool:
    return member in CUSTOM_API.get(xml_class, {}).get("methods", set()) or hasattr(qt_class(xml_class), member)


def widget_class_methods() -> set[str]:
    tree = ast.parse(MODULE_PY.read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedReasonerWidget"]
    return {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...)"
    return [item.replace("${MODULE_NAME}", "MedReasoner") for item in match.group(1).split()]


def cmake_without_comments(path: Path) -> str:
    return "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("set(EXTENSION") else line
                     for line in path.read_text().splitlines())


# -- (a) the widgets the code uses exist in the .ui, with a class that fits the use ------------------------
def test_the_parsers_see_the_code():
    uses = ui_uses(MODULE_PY.read_text())
    names = {u.widget for u in uses}
    assert {"inputVolumeSelector", "outputSegmentationSelector", "questionTextEdit", "runButton", "cancelButton",
            "progressBar", "logTextEdit", "resultsTableWidget", "reasoningTextBrowser"} <= names
    assert any(u.signal == "currentNodeChanged(vtkMRMLNode*)" for u in uses)
    assert any(u.signal == "clicked" and u.widget == "runButton" for u in uses)
    # the checker itself: a wrong class and a called property are caught
    assert not ({"QPlainTextEdit"} & ancestry("QLineEdit"))
    assert is_property("QComboBox", "currentIndex") and not is_property("QComboBox", "findData")
    assert is_property("ctkPathLineEdit", "currentPath") and not is_property("qMRMLNodeComboBox", "currentNode")


def test_every_widget_the_code_uses_is_in_the_ui_with_a_fitting_class():
    widgets = ui_widgets()
    problems = []
    for use in ui_uses(MODULE_PY.read_text()):
        where = f"MedReasoner.py:{use.line} {use.widget}"
        if use.widget not in widgets:
            problems.append(f"{where}: no widget of that name in {UI_FILE.name}")
            continue
        xml_class = widgets[use.widget]
        family = ancestry(xml_class)
        if use.member is None:
            if use.helper in HELPER_ARGUMENT and not family & HELPER_ARGUMENT[use.helper]:
                problems.append(f"{where} ({xml_class}) passed to {use.helper}, which needs "
                                f"{sorted(HELPER_ARGUMENT[use.helper])}")
            continue
        member = use.member if use.member != "connect" else use.signal.split("(")[0]
        if member in GENERIC and member not in EXPECTED:
            continue
        if member not in EXPECTED:
            problems.append(f"{where}.{member}: not in this test's EXPECTED map; add what class it needs")
        elif not family & EXPECTED[member]:
            problems.append(f"{where}.{member}: needs {sorted(EXPECTED[member])}, the .ui has {xml_class}")
    assert not problems, "\n".join(problems)


def test_members_are_used_the_way_pythonqt_exposes_them():
    """In Slicer a Qt property is an attribute (``combo.currentIndex``); any other member is called."""
    widgets = ui_widgets()
    problems = []
    for use in ui_uses(MODULE_PY.read_text()):
        if use.member is None or use.signal is not None or use.widget not in widgets:
            continue
        xml_class, where = widgets[use.widget], f"MedReasoner.py:{use.line} {use.widget}.{use.member}"
        if is_property(xml_class, use.member):
            if use.called:
                problems.append(f"{where}(): a property of {xml_class}; PythonQt gives its value, not a method")
        elif not has_method(xml_class, use.member):
            problems.append(f"{where}: {xml_class} has no such member")
        elif not use.called:
            problems.append(f"{where}: a method of {xml_class}, used without calling it")
    assert not problems, "\n".join(problems)


def test_node_selectors_and_sections_are_set_up_in_the_ui():
    widgets = ui_widgets()
    for name, node_type, none_enabled in (("inputVolumeSelector", "vtkMRMLScalarVolumeNode", "false"),
                                          ("outputSegmentationSelector", "vtkMRMLSegmentationNode", "true")):
        assert widgets[name] == "qMRMLNodeComboBox"
        assert [s.text for s in widget_property(name, "nodeTypes").iter("string")] == [node_type]
        assert widget_property(name, "noneEnabled").findtext("bool") == none_enabled
        assert widget_property(name, "addEnabled").findtext("bool") == "false"  # "create new" is the None item
    assert widget_property("inputVolumeSelector", "showChildNodeTypes").findtext("bool") == "false"  # no labelmaps
    # the selectors get the scene from the top-level qMRMLWidget (uiWidget.setMRMLScene)
    root = ui_tree().find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "MedReasoner"
    wired = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
             for c in ui_tree().iter("connection")}
    for name, cls in widgets.items():
        if cls == "qMRMLNodeComboBox":
            assert ("MedReasoner", "mrmlSceneChanged(vtkMRMLScene*)", name, "setMRMLScene(vtkMRMLScene*)") in wired, name
    for name, title in SECTIONS.items():
        assert widgets[name] == "ctkCollapsibleButton"
        assert widget_property(name, "text").findtext("string") == title
    # read-only log and answer view; Run and Cancel start disabled
    assert widget_property("logTextEdit", "readOnly").findtext("bool") == "true"
    assert widgets["reasoningTextBrowser"] == "QTextBrowser"  # read-only by nature
    for name in ("runButton", "cancelButton", "jumpToKeySliceButton", "removeAnswerButton"):
        assert widget_property(name, "enabled").findtext("bool") == "false", name


def test_every_custom_class_is_declared_with_its_header():
    widgets = ui_widgets()
    custom = ui_custom_widgets()
    used = {cls for cls in widgets.values() if cls in CUSTOM_API or not cls.startswith("Q")}
    assert used <= set(custom), f"not declared in <customwidgets>: {sorted(used - set(custom))}"
    for cls, (extends, header) in custom.items():
        assert header == f"{cls}.h", cls
        assert extends and qt_class(extends) is not None, cls


# -- (b) the .ui loads with Qt's loader; every name is found ---------------------------------------------
@pytest.fixture(scope="module")
def loaded_ui():
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    ui_file = QFile(str(UI_FILE))
    assert ui_file.open(QIODevice.OpenModeFlag.ReadOnly)
    loader = QUiLoader()
    widget = loader.load(ui_file)
    ui_file.close()
    assert widget is not None, loader.errorString()
    yield widget
    widget.deleteLater()
    app.processEvents()


def test_the_ui_loads_and_every_widget_is_found(loaded_ui):
    from PySide6.QtWidgets import QWidget

    assert loaded_ui.objectName() == "MedReasoner"
    custom = ui_custom_widgets()
    for name, cls in ui_widgets().items():
        if name == "MedReasoner":
            continue
        child = loaded_ui.findChild(QWidget, name)
        assert child is not None, f"{name} not found in the loaded .ui"
        # Qt classes are made as themselves; Slicer/CTK ones fall back to the class they extend
        want = custom[cls][0] if cls in custom else cls
        assert child.metaObject().className() == want, (name, child.metaObject().className(), want)
    names_in_code = {u.widget for u in ui_uses(MODULE_PY.read_text())}
    assert all(loaded_ui.findChild(QWidget, n) is not None for n in names_in_code)


def test_the_results_table_has_question_and_status_columns(loaded_ui):
    from PySide6.QtWidgets import QTableWidget

    table = loaded_ui.findChild(QTableWidget, "resultsTableWidget")
    assert table.columnCount() == 2
    assert [table.horizontalHeaderItem(i).text() for i in range(2)] == ["Question", "Status"]


# -- (c) connected signals exist; slots are methods of the widget ----------------------------------------
def test_every_connected_signal_exists_on_the_widget_class():
    widgets = ui_widgets()
    problems = []
    connections = [u for u in ui_uses(MODULE_PY.read_text()) if u.signal is not None]
    assert len(connections) >= 20
    for use in connections:
        xml_class = widgets.get(use.widget)
        if xml_class is None:
            problems.append(f"{use.widget}: not in the .ui")
            continue
        signatures = signals_of(xml_class)
        if "(" in use.signal:  # string form: the exact signature
            if use.signal not in signatures:
                problems.append(f"line {use.line}: {xml_class} has no signal {use.signal}")
        elif use.signal not in {s.split("(")[0] for s in signatures}:
            problems.append(f"line {use.line}: {xml_class} has no signal {use.signal}")
    assert not problems, "\n".join(problems)


def test_every_slot_and_observer_callback_is_a_method_of_the_widget():
    methods = widget_class_methods()
    tree = ast.parse(MODULE_PY.read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedReasonerWidget"]
    callbacks = []
    for node in ast.walk(cls):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr == "connect":
            callbacks.append((node.lineno, node.args[-1]))
        elif node.func.attr in ("addObserver", "removeObserver"):
            callbacks.append((node.lineno, node.args[2]))
    assert len(callbacks) >= 25
    problems = []
    for line, slot in callbacks:
        if not (isinstance(slot, ast.Attribute) and isinstance(slot.value, ast.Name) and slot.value.id == "self"):
            problems.append(f"line {line}: the slot is not a method of the widget ({ast.unparse(slot)})")
        elif slot.attr not in methods:
            problems.append(f"line {line}: MedReasonerWidget has no method {slot.attr}")
    assert not problems, "\n".join(problems)


# -- (d) the CMake files ---------------------------------------------------------------------------------
def test_the_module_cmake_lists_every_script_and_resource():
    text = cmake_without_comments(MODULE_CMAKE)
    assert re.search(r"set\(\s*MODULE_NAME\s+MedReasoner\s*\)", text)
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    on_disk = {f"MedReasonerLib/{p.name}" for p in LIB_DIR.glob("*.py")}
    on_disk |= {f"MedReasonerLib/{n}" for n in LIB_FILES_EXPECTED} | {"MedReasoner.py"}
    assert set(scripts) == on_disk, f"missing {sorted(on_disk - set(scripts))}, extra {sorted(set(scripts) - on_disk)}"
    for script in scripts:
        assert (MODULE_DIR / script).is_file(), f"{script} is listed but missing (the build would fail)"
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert set(resources) == on_disk
    assert {"Resources/UI/MedReasoner.ui", "Resources/Icons/MedReasoner.png"} <= set(resources)
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1).split()
    assert macro[:2] == ["NAME", "${MODULE_NAME}"]
    assert "WITH_GENERIC_TESTS" in macro and "${MODULE_PYTHON_SCRIPTS}" in macro and "${MODULE_PYTHON_RESOURCES}" in macro
    assert re.search(r"if\(BUILD_TESTING\)\s*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)\s*endif\(\)",
                     text), "the self-test must be registered with slicer_add_python_unittest"


def test_the_module_file_defines_the_four_classes_slicer_looks_for():
    tree = ast.parse(MODULE_PY.read_text())
    bases = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert bases["MedReasoner"] == ["ScriptedLoadableModule"]
    assert bases["MedReasonerWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["MedReasonerLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["MedReasonerTest"] == ["ScriptedLoadableModuleTest"]
    source = MODULE_PY.read_text()
    assert 'loadUI(self.resourcePath("UI/MedReasoner.ui"))' in source and "childWidgetVariables" in source
    assert "uiWidget.setMRMLScene(slicer.mrmlScene)" in source


def test_the_extension_cmake_has_the_metadata_and_the_module():
    text = ROOT_CMAKE.read_text()
    assert re.search(r"cmake_minimum_required\(VERSION 3\.16\.3", text)
    project = re.search(r"project\((\w+)\)", text).group(1)
    assert project == "MedReasoner" and not project.lower().startswith("slicer")
    meta = dict(re.findall(r'set\((EXTENSION_\w+)\s+"(.*?)"\)', text, re.S))
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert meta.get(f"EXTENSION_{key}"), f"EXTENSION_{key} is not set"
    assert meta["EXTENSION_HOMEPAGE"] == "https://github.com/medreasoner/medreasoner"
    assert meta["EXTENSION_CATEGORY"] == "Segmentation" and meta["EXTENSION_DEPENDS"] == "PyTorch"
    assert meta["EXTENSION_ICONURL"].endswith("/" + str(ICON_FILE.relative_to(ROOT)))
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(MedReasonerSlicer)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(line) for line in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions


def test_the_icon_is_a_128_pixel_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


# -- (e) Python 3.9 and the catalog entry -------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(MODULE_DIR.rglob("*.py")), ids=lambda p: str(p.relative_to(MODULE_DIR)))
def test_module_python_runs_on_slicers_python_39(path):
    source = path.read_text()
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"imp", "cgi"}, f"{path.name} imports a module Python 3.12/3.13 removed"
    # "X | Y" in annotations is only safe on 3.9 when annotations are not evaluated
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and n.returns]
    if any(isinstance(x, ast.BinOp) and isinstance(x.op, ast.BitOr) for a in annotations for x in ast.walk(a)):
        assert future, f"{path.name}: 'X | Y' annotations need 'from __future__ import annotations' on 3.9"
    # isinstance(x, A | B) is evaluated: 3.10+
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance",
                                                                                              "issubclass"):
            assert not (isinstance(node.args[1], ast.BinOp) and isinstance(node.args[1].op, ast.BitOr)), \
                f"{path.name}:{node.lineno}: isinstance with 'A | B' needs Python 3.10"


def test_the_catalog_entry_follows_the_schema():
    entry = json.loads(CATALOG_JSON.read_text())
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert set(entry) <= CATALOG_FIELDS, f"fields the schema does not allow: {sorted(set(entry) - CATALOG_FIELDS)}"
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json")
    text = ROOT_CMAKE.read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+)\s+"(.*?)"\)', text, re.S))
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert entry.get("build_dependencies", []) == meta["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"] == "https://github.com/medreasoner/medreasoner.git" and entry["scm_revision"] == "main"
    assert entry["build_subdirectory"] == "." and entry["tier"] in (1, 3, 5)


# -- the module's code with stand-ins for Slicer's GUI modules -----------------------------------------------
@pytest.fixture(scope="module")
def module():
    """MedReasoner.py imported with tiny stand-ins for qt, ctk and slicer.ScriptedLoadableModule."""
    import slicer

    stand_ins = {"qt": types.ModuleType("qt"), "ctk": types.ModuleType("ctk"),
                 "slicer.ScriptedLoadableModule": types.ModuleType("slicer.ScriptedLoadableModule")}
    slm = stand_ins["slicer.ScriptedLoadableModule"]

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print("delayDisplay:", message)

        def runTest(self):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    saved = {name: sys.modules.get(name) for name in [*stand_ins, "MedReasoner"]}
    sys.modules.update(stand_ins)
    slicer.ScriptedLoadableModule = slm
    try:
        import MedReasoner

        yield MedReasoner
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
        del slicer.ScriptedLoadableModule


def test_the_module_describes_itself(module):
    parent = types.SimpleNamespace()
    module.MedReasoner(parent)
    assert parent.title == "MedReasoner" and parent.categories == ["Segmentation"] and parent.dependencies == []
    assert parent.contributors and "Run" in parent.helpText and parent.acknowledgementText


def test_question_history_keeps_its_questions_in_qt_settings(module):
    class FakeQSettings:  # QSettings' calls the adapter makes
        def __init__(self):
            self.values = {}

        def contains(self, key):
            return key in self.values

        def value(self, key):
            return self.values.get(key)

        def setValue(self, key, value):  # noqa: N802 - Qt's name
            self.values[key] = value

        def remove(self, key):
            self.values.pop(key, None)

        def allKeys(self):  # noqa: N802 - Qt's name
            return list(self.values)

    from MedReasonerLib.parameters import QuestionHistory

    qsettings = FakeQSettings()
    history = QuestionHistory(module.QSettingsStore(qsettings))
    assert history.items() == []
    history.add(["Where is the liver?"])
    history.add(["Where is the spleen?", "Where is the liver?"])
    again = QuestionHistory(module.QSettingsStore(qsettings))
    assert again.items() == ["Where is the spleen?", "Where is the liver?"]
    assert isinstance(qsettings.values[QuestionHistory.KEY], str)


def test_the_answer_view_escapes_text_and_shows_warnings(module):
    from MedReasonerLib.scene import AppliedSegment

    item = AppliedSegment("Is <b>this</b> a tumour?", "ok", "", "Bright & round\nso yes", ["box clipped"],
                          segment_id="s1", segment_name="Is <b>this</b> a tumour?", record={"key_slice": 3})
    text = module.MedReasonerWidget._answerHtml(item)
    assert "<b>this</b>" not in text and "&lt;b&gt;this&lt;/b&gt;" in text
    assert "Bright &amp; round<br>so yes" in text and "box clipped" in text and module.WARNING_COLOUR in text
    assert "Key slice: 3" in text


def test_a_stored_answer_is_read_back_from_its_segment(module, scene):
    import slicer
    from MedReasonerLib.scene import TAG_KEY_SLICE, TAG_NODES, TAG_QUESTION, TAG_REASONING, TAG_RECORD

    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "answers")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    segment = slicer.vtkSegment()
    segment.SetName("Where is the liver?")
    segment.SetTag(TAG_QUESTION, "Where is the liver?")
    segment.SetTag(TAG_REASONING, "the large organ on the right")
    segment.SetTag(TAG_RECORD, json.dumps({"status": "ok", "warnings": ["low contrast"], "key_slice": 4}))
    segment.SetTag(TAG_KEY_SLICE, json.dumps([1.0, 2.0, 3.0]))
    segment.SetTag(TAG_NODES, json.dumps([roi.GetID(), points.GetID()]))
    seg_node.GetSegmentation().AddSegment(segment, "MedReasoner_1")
    [item] = module.applied_segments(scene, seg_node)
    assert (item.question, item.status, item.reasoning, item.warnings) == (
        "Where is the liver?", "ok", "the large organ on the right", ["low contrast"])
    assert (item.roi_node_id, item.points_node_id, item.key_slice_ras) == (roi.GetID(), points.GetID(), [1.0, 2.0, 3.0])
    assert item.segment_id == "MedReasoner_1" and item.segment_name == "Where is the liver?"


def test_self_test_refuses_bad_input_without_a_worker(module, scene):
    case = module.MedReasonerTest()
    case.setUp()
    case.test_BadInputIsRefused()
    case.test_PanelFollowsInputs()  # no main window here: skipped, not failed


@pytest.mark.needs_worker
def test_self_test_runs_a_question_and_a_cancel(module, scene, monkeypatch):
    from conftest import MAIN_PYTHON

    monkeypatch.setenv("MEDREASONER_TEST_PYTHON", MAIN_PYTHON)
    monkeypatch.delenv("MEDREASONER_TEST_CRM", raising=False)
    case = module.MedReasonerTest()
    case.setUp()
    case.test_QuestionBecomesSegmentAndCancelChangesNothing()


def test_self_test_skips_the_run_without_a_worker_python(module, scene, monkeypatch, capsys):
    monkeypatch.delenv("MEDREASONER_TEST_PYTHON", raising=False)
    case = module.MedReasonerTest()
    case.setUp()
    case.test_QuestionBecomesSegmentAndCancelChangesNothing()
    assert "MEDREASONER_TEST_PYTHON is not set" in capsys.readouterr().out
