"""3D Slicer module "MedReasoner": ask a clinical question about a volume, get the segment that answers it.

Only the Slicer glue lives here: the module's description, its panel and the in-Slicer self-test.
Everything else (settings, checks, the worker process, the MONAI Label client, putting results in the
scene) is in ``MedReasonerLib``, which has no Qt and is tested without the Slicer application.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import sys
import time
from collections.abc import MutableMapping

import ctk  # noqa: F401 - the .ui's CTK widgets, as Slicer's own modules load them
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.4 has no translations

    def _(text):
        return text

    def translate(context, text):
        return text


from MedReasonerLib.errors import MedReasonerSlicerError
from MedReasonerLib.logic import MedReasonerLogic as LibLogic
from MedReasonerLib.parameters import (
    ASMS,
    AXES,
    DEVICES,
    KEY_SLICE_MODES,
    PARAMETER_PREFIX,
    PROMPTS,
    STRATEGIES,
    WINDOW_MODES,
    QuestionHistory,
    RunSettings,
    parse_questions,
)
from MedReasonerLib.scene import AppliedSegment, applied_segments, segment_reasoning

INPUT_VOLUME_REF = "InputVolume"
OUTPUT_SEGMENTATION_REF = "OutputSegmentation"
# settings that belong to this computer, not to a scene: new scenes start from the last ones used
MACHINE_FIELDS = ("compute", "python_path", "crm", "device", "extra_worker_args", "server_url", "server_task",
                  "asm")
DEFAULTS_KEY = "MedReasoner/DefaultSettings"
WARNING_COLOUR = "#d35400"
ERROR_COLOUR = "#c0392b"


#
# MedReasoner
#


class MedReasoner(ScriptedLoadableModule):
    """The module's description for Slicer's module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedReasoner")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedReasoner toolkit contributors"]
        self.parent.helpText = _(
            "Ask a clinical question about a volume (for example <i>Where is the tumour in the left kidney?</i>). "
            "A vision-language model reasons about the image and answers with a box and two key points on a key "
            "slice; a promptable segmentation model turns them into a mask, added as a segment named after the "
            "question, with the box and points as markups and the reasoning kept with the segment.<br><br>"
            "Type one question per line, choose the input volume and press <b>Run</b>. The models run in a "
            "separate Python process on this computer or on a MONAI Label server (<b>Compute</b> section). "
            'See the <a href="https://github.com/medreasoner/medreasoner">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Developed by the MedReasoner toolkit contributors. The module's structure follows Slicer's scripted "
            "module template and the conventions of the SlicerNNUnet and MONAIAuto3DSeg extensions."
        )


#
# Qt settings as the string store QuestionHistory expects
#


class QSettingsStore(MutableMapping):
    """``qt.QSettings`` seen as a mapping of strings (the question history's store)."""

    def __init__(self, settings=None):
        self._settings = settings if settings is not None else qt.QSettings()

    def __getitem__(self, key):
        if not self._settings.contains(key):
            raise KeyError(key)
        value = self._settings.value(key)
        return "" if value is None else str(value)

    def __setitem__(self, key, value):
        self._settings.setValue(key, str(value))

    def __delitem__(self, key):
        if not self._settings.contains(key):
            raise KeyError(key)
        self._settings.remove(key)

    def __iter__(self):
        return iter(list(self._settings.allKeys()))

    def __len__(self):
        return len(list(self._settings.allKeys()))


class _Answer:
    """A row of the results table: one answer and the segmentation node it went into."""

    def __init__(self, item: AppliedSegment, segmentationNodeID: str | None):
        self.item = item
        self.segmentationNodeID = segmentationNodeID


def _choiceLabels() -> dict:
    """What each choice of the option combo boxes is called on screen (item data = the value)."""
    return {
        "strategy": {"keyslice": _("Key slice, then propagate"), "slicewise": _("Every slice")},
        "axis": {"axial": _("Axial"), "coronal": _("Coronal"), "sagittal": _("Sagittal")},
        "window": {"auto": _("Automatic (from the question)"), "abdomen": _("Abdomen"), "lung": _("Lung"),
                   "brain": _("Brain"), "mediastinum": _("Mediastinum"), "bone": _("Bone"),
                   "custom": _("Custom")},
        "key_slice": {"auto": _("Chosen by the model"), "current": _("Slice shown in the Red view"),
                      "number": _("Slice number")},
        "prompt": {"reasoning": _("Reasoning (explains its answer)"), "direct": _("Direct answer")},
        "device": {"auto": _("Automatic"), "cpu": _("CPU"), "cuda": _("CUDA (GPU)")},
    }


class _WaitCursor:
    """The busy cursor while something short blocks the GUI (a dependency check)."""

    def __enter__(self):
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        return self

    def __exit__(self, *exc):
        qt.QApplication.restoreOverrideCursor()
        return False


def _statusText(status: str) -> str:
    return {"ok": _("segmented"), "no_target": _("no target found")}.get(status, status or _("unknown"))


#
# MedReasonerWidget
#


class MedReasonerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel. It reads the settings into the parameter node, starts a job through the logic
    and polls it from a timer, so Slicer stays responsive while the models work."""

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # parameter node and scene observations
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._job = None
        self._cancelRequested = False
        self._answers: list = []
        self._lastProgressMessage = ""
        self._history = None
        self._pollTimer = None

    # -- set-up and life cycle -------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        # the panel comes from the .ui file (Qt Designer); self.ui.<objectName> are its widgets
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedReasoner.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # the .ui connects the top-level qMRMLWidget's mrmlSceneChanged to each node selector
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedReasonerLogic()
        self._history = QuestionHistory(QSettingsStore())
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self.onPollTimer)

        labels = _choiceLabels()
        self._fillCombo(self.ui.strategyComboBox, STRATEGIES, labels["strategy"])
        self._fillCombo(self.ui.axisComboBox, AXES, labels["axis"])
        self._fillCombo(self.ui.windowModeComboBox, WINDOW_MODES, labels["window"])
        self._fillCombo(self.ui.keySliceModeComboBox, KEY_SLICE_MODES, labels["key_slice"])
        self._fillCombo(self.ui.promptComboBox, PROMPTS, labels["prompt"])
        self._fillCombo(self.ui.deviceComboBox, DEVICES, labels["device"])
        self._fillCombo(self.ui.asmComboBox, ASMS, {})
        self.ui.resultsTableWidget.setHorizontalHeaderLabels([_("Question"), _("Status")])
        self.ui.resultsTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.ui.resultsTableWidget.horizontalHeader().setSectionResizeMode(1, qt.QHeaderView.ResizeToContents)

        # scene close: the run and the worker's files belong to the old scene
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # every change on the panel is saved in the parameter node (and so with the scene)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   self.onOutputSegmentationChanged)
        self.ui.questionTextEdit.textChanged.connect(self.updateButtonStates)
        self.ui.historyComboBox.connect("activated(int)", self.onHistoryActivated)
        self.ui.strategyComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.axisComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.windowModeComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.windowCustomLineEdit.textChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.keySliceModeComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.keySliceSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.sliceRangeLineEdit.textChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.asmComboBox.currentTextChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.promptComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.localRadioButton.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.crmPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.extraWorkerArgsLineEdit.textChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.serverUrlLineEdit.textChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.serverTaskLineEdit.textChanged.connect(self.updateParameterNodeFromGUI)

        self.ui.runButton.clicked.connect(self.onRunButton)
        self.ui.cancelButton.clicked.connect(self.onCancelButton)
        self.ui.installButton.clicked.connect(self.onInstallButton)
        self.ui.resultsTableWidget.itemSelectionChanged.connect(self.onAnswerSelectionChanged)
        self.ui.jumpToKeySliceButton.clicked.connect(self.onJumpToKeySliceButton)
        self.ui.removeAnswerButton.clicked.connect(self.onRemoveAnswerButton)

        self.initializeParameterNode()
        self._refreshHistory()
        self._refreshAnswers()
        self._refreshWorkerStatus()

    def cleanup(self):
        """Slicer closes or the module is reloaded: stop polling, stop the worker, remove its files."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self._job = None
        if self.logic is not None:
            self.logic.shutdown()
        self.removeObservers()

    def enter(self):
        """Each time the module is shown."""
        self.initializeParameterNode()
        self._refreshHistory()
        self._refreshWorkerStatus()

    def exit(self):
        """Another module is shown: a run in progress goes on (the timer keeps polling it)."""
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller=None, event=None):
        """The scene is closing: forget the run and its exported volumes; the worker keeps its models."""
        self._stopPolling()
        self.logic.reset()
        self._answers = []
        self._refreshAnswers()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller=None, event=None):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self._refreshWorkerStatus()
        self.updateButtonStates()

    def onReload(self):
        """Developer reload: MedReasonerLib's modules are imported afresh too."""
        for name in [n for n in sys.modules if n == "MedReasonerLib" or n.startswith("MedReasonerLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # -- parameter node --------------------------------------------------------------------------
    def initializeParameterNode(self):
        """The module's parameter node, with this computer's last compute settings when it is new."""
        node = self.logic.getParameterNode()
        if not node.GetParameter(PARAMETER_PREFIX + "strategy"):
            self._defaultSettings().to_parameter_node(node)
        if not node.GetNodeReference(INPUT_VOLUME_REF):
            volume = self._firstScalarVolume()
            if volume is not None:
                node.SetNodeReferenceID(INPUT_VOLUME_REF, volume.GetID())
        self.setParameterNode(node)

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        """Show the parameter node's settings (a script or a loaded scene may have changed them)."""
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            node = self._parameterNode
            settings = RunSettings.from_parameter_node(node)
            self.ui.inputVolumeSelector.setCurrentNode(node.GetNodeReference(INPUT_VOLUME_REF))
            self.ui.outputSegmentationSelector.setCurrentNode(node.GetNodeReference(OUTPUT_SEGMENTATION_REF))
            self._setComboValue(self.ui.strategyComboBox, settings.strategy)
            self._setComboValue(self.ui.axisComboBox, settings.axis)
            self._setComboValue(self.ui.windowModeComboBox, settings.window_mode)
            self._setComboValue(self.ui.keySliceModeComboBox, settings.key_slice_mode)
            self._setComboValue(self.ui.promptComboBox, settings.prompt)
            self._setComboValue(self.ui.deviceComboBox, settings.device)
            if settings.asm and self.ui.asmComboBox.currentText != settings.asm:
                if self.ui.asmComboBox.findText(settings.asm) < 0:
                    self.ui.asmComboBox.addItem(settings.asm, settings.asm)  # a plugin's ASM
                self.ui.asmComboBox.setCurrentIndex(self.ui.asmComboBox.findText(settings.asm))
            self.ui.keySliceSpinBox.setValue(int(settings.key_slice))
            # text fields are only set when they differ, so typing is not disturbed
            if self.ui.windowCustomLineEdit.text != settings.window_custom:
                self.ui.windowCustomLineEdit.setText(settings.window_custom)
            if self.ui.sliceRangeLineEdit.text != settings.slice_range:
                self.ui.sliceRangeLineEdit.setText(settings.slice_range)
            if self.ui.extraWorkerArgsLineEdit.text != settings.extra_worker_args:
                self.ui.extraWorkerArgsLineEdit.setText(settings.extra_worker_args)
            if self.ui.serverUrlLineEdit.text != settings.server_url:
                self.ui.serverUrlLineEdit.setText(settings.server_url)
            if self.ui.serverTaskLineEdit.text != settings.server_task:
                self.ui.serverTaskLineEdit.setText(settings.server_task)
            if self.ui.pythonPathLineEdit.currentPath != settings.python_path:
                self.ui.pythonPathLineEdit.setCurrentPath(settings.python_path)
            if self.ui.crmPathLineEdit.currentPath != settings.crm:
                self.ui.crmPathLineEdit.setCurrentPath(settings.crm)
            self.ui.localRadioButton.setChecked(settings.compute != "remote")
            self.ui.remoteRadioButton.setChecked(settings.compute == "remote")
        finally:
            self._updatingGUIFromParameterNode = False
        self._updateOptionStates()
        self.updateButtonStates()

    def updateParameterNodeFromGUI(self, *args):
        """Save what the panel shows in the parameter node."""
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        node = self._parameterNode
        settings = self._settingsFromGUI()
        volume = self.ui.inputVolumeSelector.currentNode()
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        wasModifying = node.StartModify()
        try:
            settings.to_parameter_node(node)
            node.SetNodeReferenceID(INPUT_VOLUME_REF, volume.GetID() if volume is not None else None)
            node.SetNodeReferenceID(OUTPUT_SEGMENTATION_REF,
                                    segmentation.GetID() if segmentation is not None else None)
        finally:
            node.EndModify(wasModifying)
        self._rememberDefaults(settings)
        self._updateOptionStates()
        self.updateButtonStates()

    def _settingsFromGUI(self) -> RunSettings:
        """The panel's settings; those it does not show (time-out, CRM back end) come from the node."""
        settings = RunSettings.from_parameter_node(self._parameterNode)
        settings.strategy = self._comboValue(self.ui.strategyComboBox, settings.strategy)
        settings.axis = self._comboValue(self.ui.axisComboBox, settings.axis)
        settings.window_mode = self._comboValue(self.ui.windowModeComboBox, settings.window_mode)
        settings.window_custom = self.ui.windowCustomLineEdit.text.strip()
        settings.key_slice_mode = self._comboValue(self.ui.keySliceModeComboBox, settings.key_slice_mode)
        settings.key_slice = int(self.ui.keySliceSpinBox.value)
        settings.slice_range = self.ui.sliceRangeLineEdit.text.strip()
        settings.asm = self.ui.asmComboBox.currentText.strip()
        settings.prompt = self._comboValue(self.ui.promptComboBox, settings.prompt)
        settings.compute = "remote" if self.ui.remoteRadioButton.checked else "local"
        settings.python_path = self.ui.pythonPathLineEdit.currentPath.strip()
        settings.crm = self.ui.crmPathLineEdit.currentPath.strip()
        settings.device = self._comboValue(self.ui.deviceComboBox, settings.device)
        settings.extra_worker_args = self.ui.extraWorkerArgsLineEdit.text.strip()
        settings.server_url = self.ui.serverUrlLineEdit.text.strip()
        settings.server_task = self.ui.serverTaskLineEdit.text.strip()
        return settings

    @staticmethod
    def _defaultSettings() -> RunSettings:
        """Defaults, with the compute settings last used on this computer."""
        settings = RunSettings()
        try:
            saved = json.loads(str(qt.QSettings().value(DEFAULTS_KEY) or "{}"))
        except ValueError:
            saved = {}
        for name in MACHINE_FIELDS:
            if isinstance(saved.get(name), str):
                setattr(settings, name, saved[name])
        return settings

    @staticmethod
    def _rememberDefaults(settings: RunSettings) -> None:
        qt.QSettings().setValue(DEFAULTS_KEY, json.dumps({name: getattr(settings, name) for name in MACHINE_FIELDS}))

    # -- combo boxes -----------------------------------------------------------------------------
    @staticmethod
    def _fillCombo(combo, values, labels: dict) -> None:
        combo.clear()
        for value in values:
            combo.addItem(labels.get(value, value), value)

    @staticmethod
    def _comboValue(combo, default: str) -> str:
        value = combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else None
        return str(value) if value else default

    @staticmethod
    def _setComboValue(combo, value: str) -> None:
        index = combo.findData(value)
        if index >= 0 and index != combo.currentIndex:
            combo.setCurrentIndex(index)

    # -- enabling --------------------------------------------------------------------------------
    def _isRunning(self) -> bool:
        return self._job is not None and not self._job.finished

    def _updateOptionStates(self) -> None:
        """Options that do not apply to the current choices are greyed out."""
        keySlice = self._comboValue(self.ui.strategyComboBox, "keyslice") == "keyslice"
        self.ui.keySliceModeComboBox.setEnabled(keySlice)
        self.ui.keySliceSpinBox.setEnabled(keySlice and self._comboValue(self.ui.keySliceModeComboBox, "") == "number")
        self.ui.windowCustomLineEdit.setEnabled(self._comboValue(self.ui.windowModeComboBox, "") == "custom")
        local = not self.ui.remoteRadioButton.checked
        for widget in (self.ui.pythonPathLineEdit, self.ui.crmPathLineEdit, self.ui.deviceComboBox,
                       self.ui.extraWorkerArgsLineEdit, self.ui.asmComboBox):
            widget.setEnabled(local)
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTaskLineEdit):
            widget.setEnabled(not local)

    def updateButtonStates(self, *args) -> None:
        """Run needs a volume and a question and no run in progress; Cancel only while one runs."""
        running = self._isRunning()
        reasons = []
        if running:
            reasons.append(_("A run is in progress."))
        if self.ui.inputVolumeSelector.currentNode() is None:
            reasons.append(_("Choose an input volume."))
        if not self.ui.questionTextEdit.toPlainText().strip():
            reasons.append(_("Type a question (one per line)."))
        self.ui.runButton.setEnabled(not reasons)
        self.ui.runButton.setToolTip(" ".join(reasons) if reasons else _("Ask the questions about the input volume."))
        self.ui.cancelButton.setEnabled(running and not self._cancelRequested)
        answer = self._selectedAnswer()
        self.ui.jumpToKeySliceButton.setEnabled(answer is not None and answer.item.key_slice_ras is not None)
        self.ui.removeAnswerButton.setEnabled(answer is not None and not running)
        self.ui.installButton.setEnabled(not running and not self.ui.remoteRadioButton.checked)

    # -- inputs ----------------------------------------------------------------------------------
    def onInputVolumeChanged(self, node=None):
        self.updateParameterNodeFromGUI()
        self.updateButtonStates()

    def onOutputSegmentationChanged(self, node=None):
        self.updateParameterNodeFromGUI()
        if node is not None:
            self._addStoredAnswers(node)

    def onHistoryActivated(self, index):
        """A question from the history joins the questions (once)."""
        if index <= 0:
            return
        question = str(self.ui.historyComboBox.itemData(index) or "")
        lines = [line for line in self.ui.questionTextEdit.toPlainText().splitlines() if line.strip()]
        if question and question not in [" ".join(line.split()) for line in lines]:
            self.ui.questionTextEdit.setPlainText("\n".join(lines + [question]))
        self.ui.historyComboBox.setCurrentIndex(0)
        self.ui.questionTextEdit.setFocus()

    def _refreshHistory(self) -> None:
        combo = self.ui.historyComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            items = self._history.items() if self._history is not None else []
            combo.addItem(_("Recent questions ({count})").format(count=len(items)) if items
                          else _("No recent questions"), "")
            for question in items:
                combo.addItem(question if len(question) <= 90 else question[:89] + "…", question)
            combo.setCurrentIndex(0)
        finally:
            combo.blockSignals(wasBlocked)
        combo.setEnabled(combo.count > 1)

    @staticmethod
    def _firstScalarVolume():
        nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        for node in nodes:
            if not node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        return None

    def _keyPointOnScreen(self, volumeNode):
        """The centre of the Red slice view (a point on the slice shown), in world RAS."""
        sliceNode = None
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            sliceWidget = layoutManager.sliceWidget("Red")
            sliceNode = sliceWidget.mrmlSliceNode() if sliceWidget is not None else None
        if sliceNode is None:
            sliceNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        if sliceNode is None:
            raise MedReasonerSlicerError(_("there is no Red slice view to take the key slice from"))
        sliceToRAS = sliceNode.GetSliceToRAS()
        return [sliceToRAS.GetElement(row, 3) for row in range(3)]  # world RAS; the logic makes it the volume's

    # -- running ---------------------------------------------------------------------------------
    def onRunButton(self):
        if self._isRunning():
            return
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        segmentationNode = self.ui.outputSegmentationSelector.currentNode()
        try:
            questions = parse_questions(self.ui.questionTextEdit.toPlainText())
            settings = self._settingsFromGUI()
            keyPoint = None
            if settings.strategy == "keyslice" and settings.key_slice_mode == "current" and volumeNode is not None:
                keyPoint = self._keyPointOnScreen(volumeNode)
            job = self.logic.start(volumeNode, questions, settings, segmentationNode, keyPoint)
        except MedReasonerSlicerError as exc:
            self._showError(exc)
            return
        except Exception as exc:  # a bug: a one-line message here, the traceback in the Python console
            self._showUnexpectedError(exc)
            return
        self._history.add(questions)
        self._refreshHistory()
        self._job = job
        self._cancelRequested = False
        self._lastProgressMessage = ""
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat(_("starting") + " %p%")
        self._log(_("Asking {count} question(s) about {volume} ({where})").format(
            count=len(questions), volume=volumeNode.GetName(),
            where=settings.server_url if settings.compute == "remote" else _("on this computer")))
        self._pollTimer.start()
        self.updateButtonStates()

    def onCancelButton(self):
        if not self._isRunning():
            return
        self._cancelRequested = True
        self._log(_("Cancelling..."))
        try:
            self.logic.cancel()
        except MedReasonerSlicerError as exc:
            self._showError(exc)
        self.updateButtonStates()

    def onPollTimer(self):
        """Every 100 ms while a run is in progress: show what happened, finish when it ends."""
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        try:
            events = job.poll()
        except Exception as exc:
            self._stopPolling()
            self._showUnexpectedError(exc)
            return
        for event in events:
            self._showEvent(event)
        if job.finished:
            self._stopPolling()
            self._onJobFinished(job)

    def _stopPolling(self) -> None:
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self._job = None
        self._cancelRequested = False
        self.updateButtonStates()

    def _showEvent(self, event) -> None:
        if event.fraction is not None:
            self.ui.progressBar.setValue(int(round(100 * min(1.0, max(0.0, float(event.fraction))))))
        if event.kind == "progress":
            self.ui.progressBar.setFormat((event.stage or _("working")) + " %p%")
            if event.message and event.message != self._lastProgressMessage:
                self._lastProgressMessage = event.message
                self._log(event.message)
        elif event.kind == "warning":
            self._log(event.message, "warning")
        elif event.kind == "error":
            self.ui.progressBar.setFormat(_("failed"))
            self._log(event.message, "error")
        elif event.kind == "cancelled":
            self.ui.progressBar.setFormat(_("cancelled"))
            self._log(event.message)
        elif event.kind == "done":
            self.ui.progressBar.setValue(100)
            self.ui.progressBar.setFormat(_("done"))
            self._log(event.message)
        elif event.message:
            self._log(event.message)

    def _onJobFinished(self, job) -> None:
        self._refreshWorkerStatus()
        if job.error is not None:
            if job.error.kind != "cancelled":
                slicer.util.errorDisplay(str(job.error))
            return
        outcome = job.outcome
        if outcome is None:
            return
        first = len(self._answers)
        self._answers += [_Answer(item, outcome.segmentation_node_id) for item in outcome.segments]
        if outcome.segmentation_node_id and self.ui.outputSegmentationSelector.currentNode() is None:
            # the next questions about this volume go into the same segmentation
            self.ui.outputSegmentationSelector.setCurrentNode(slicer.mrmlScene.GetNodeByID(outcome.segmentation_node_id))
        self._refreshAnswers(select=first)
        if outcome.no_target:  # nothing was added for these: say so where the user looks
            slicer.util.warningDisplay(_("No target found for:") + "\n" + "\n".join(
                f"- {item.question}: {item.message or _('the model found none')}" for item in outcome.no_target))
        segmentationNode = slicer.mrmlScene.GetNodeByID(outcome.segmentation_node_id or "")
        for item in outcome.segments:
            if item.status == "ok" and item.key_slice_ras is not None:
                self.logic.jump_to_key_slice(item, segmentationNode)
                break

    # -- results ---------------------------------------------------------------------------------
    def _refreshAnswers(self, select: int | None = None) -> None:
        table = self.ui.resultsTableWidget
        wasBlocked = table.blockSignals(True)
        try:
            table.clearContents()
            table.setRowCount(len(self._answers))
            for row, answer in enumerate(self._answers):
                question = qt.QTableWidgetItem(answer.item.question)
                question.setToolTip(answer.item.question)
                status = qt.QTableWidgetItem(_statusText(answer.item.status))
                status.setToolTip(answer.item.message or _statusText(answer.item.status))
                table.setItem(row, 0, question)
                table.setItem(row, 1, status)
            if select is not None and 0 <= select < len(self._answers):
                table.selectRow(select)
        finally:
            table.blockSignals(wasBlocked)
        self.onAnswerSelectionChanged()

    def _selectedAnswer(self) -> _Answer | None:
        rows = [index.row() for index in self.ui.resultsTableWidget.selectionModel().selectedRows()]
        return self._answers[rows[0]] if rows and 0 <= rows[0] < len(self._answers) else None

    def onAnswerSelectionChanged(self):
        answer = self._selectedAnswer()
        if answer is None:
            self.ui.reasoningTextBrowser.setHtml("")
        else:
            self.ui.reasoningTextBrowser.setHtml(self._answerHtml(answer.item))
        self.updateButtonStates()

    @staticmethod
    def _answerHtml(item: AppliedSegment) -> str:
        def text(value) -> str:
            return html.escape(str(value)).replace("\n", "<br>")

        parts = [f"<p><b>{text(item.question)}</b></p>",
                 f"<p>{text(_statusText(item.status))}" + (f": {text(item.message)}" if item.message else "") + "</p>"]
        if item.segment_name:
            parts.append(f"<p>{text(_('Segment'))}: {text(item.segment_name)}</p>")
        keySlice = item.record.get("key_slice") if isinstance(item.record, dict) else None
        if keySlice is not None:
            parts.append(f"<p>{text(_('Key slice'))}: {text(keySlice)}</p>")
        if item.warnings:
            parts.append(f'<p style="color:{WARNING_COLOUR}"><b>{text(_("Warnings"))}</b></p><ul>'
                         + "".join(f'<li style="color:{WARNING_COLOUR}">{text(w)}</li>' for w in item.warnings)
                         + "</ul>")
        if item.reasoning:
            parts.append(f"<p><i>{text(_('Reasoning'))}</i></p><p>{text(item.reasoning)}</p>")
        return "".join(parts)

    def onJumpToKeySliceButton(self):
        answer = self._selectedAnswer()
        if answer is None:
            return
        segmentationNode = slicer.mrmlScene.GetNodeByID(answer.segmentationNodeID or "")
        if not self.logic.jump_to_key_slice(answer.item, segmentationNode):
            self._log(_("This answer has no key slice to show."))

    def onRemoveAnswerButton(self):
        """Undo the selected answer: its segment, box and key points leave the scene."""
        answer = self._selectedAnswer()
        if answer is None or self._isRunning():
            return
        segmentationNode = (slicer.mrmlScene.GetNodeByID(answer.segmentationNodeID)
                            if answer.segmentationNodeID else None)
        if (segmentationNode is not None and answer.item.segment_id
                and segmentationNode.GetSegmentation().GetSegment(answer.item.segment_id) is None):
            segmentationNode = None  # the segment was already deleted elsewhere; remove the markups only
        try:
            self.logic.remove_result(answer.item, segmentationNode)
        except MedReasonerSlicerError as exc:
            self._showError(exc)
            return
        except Exception as exc:
            self._showUnexpectedError(exc)
            return
        self._answers.remove(answer)
        self._log(_("Removed the answer to: {question}").format(question=answer.item.question))
        self._refreshAnswers()

    def _addStoredAnswers(self, segmentationNode) -> None:
        """Answers kept on the segments of a segmentation (e.g. from a saved scene) join the table."""
        known = {(a.segmentationNodeID, a.item.segment_id) for a in self._answers}
        stored = [_Answer(item, segmentationNode.GetID()) for item in applied_segments(slicer.mrmlScene, segmentationNode)
                  if (segmentationNode.GetID(), item.segment_id) not in known]
        if stored:
            self._answers += stored
            self._refreshAnswers()

    # -- compute ---------------------------------------------------------------------------------
    def _refreshWorkerStatus(self) -> None:
        self.ui.workerStatusLabel.setText("; ".join(self.logic.describe_worker()))

    def onInstallButton(self):
        """Check what the local worker needs; install what Slicer's own Python lacks (it asks first)."""
        try:
            from MedReasonerLib import install
        except ImportError:
            self._showError(MedReasonerSlicerError(_("this version of the module cannot install dependencies")))
            return
        python = self._settingsFromGUI().python_path or None
        try:
            with _WaitCursor():
                missing = install.missing_requirements(python)
            if not missing:
                self._log(_("All the worker's dependencies are installed."))
                slicer.util.infoDisplay(_("All the worker's dependencies are installed."))
                return
            if python:  # another environment: it is the user's to install into
                message = _("The Python at {python} lacks: {missing}. Install them in that environment, or clear "
                            "the Python path to use Slicer's own Python.").format(python=python,
                                                                                  missing=", ".join(missing))
                self._log(message, "warning")
                slicer.util.warningDisplay(message)
                return
            self._log(_("Missing in Slicer's Python: {missing}").format(missing=", ".join(missing)), "warning")
            install.install_in_slicer(confirm=True)
        except MedReasonerSlicerError as exc:
            if exc.kind == "cancelled":  # the user said no
                self._log(str(exc))
            else:
                self._showError(exc)
            return
        except Exception as exc:
            self._showUnexpectedError(exc)
            return
        self.logic.shutdown()  # the next run starts a worker that sees the new packages
        self._refreshWorkerStatus()
        self._log(_("Dependencies installed."))

    # -- messages --------------------------------------------------------------------------------
    def _log(self, message: str, level: str = "info") -> None:
        """One line in the status log; warnings and errors stand out."""
        message = " ".join(str(message).split())
        if level == "warning":
            self.ui.logTextEdit.appendHtml(
                f'<b style="color:{WARNING_COLOUR}">{html.escape(_("Warning"))}: {html.escape(message)}</b>')
            logging.warning("MedReasoner: %s", message)
        elif level == "error":
            self.ui.logTextEdit.appendHtml(
                f'<b style="color:{ERROR_COLOUR}">{html.escape(_("Error"))}: {html.escape(message)}</b>')
            logging.error("MedReasoner: %s", message)
        else:
            self.ui.logTextEdit.appendPlainText(message)
            logging.info("MedReasoner: %s", message)

    def _showError(self, exc: MedReasonerSlicerError) -> None:
        self._log(str(exc), "error")
        slicer.util.errorDisplay(str(exc))

    def _showUnexpectedError(self, exc: Exception) -> None:
        logging.exception("MedReasoner: unexpected error")  # the traceback goes to the Python console
        message = _("Unexpected error: {error}").format(error=" ".join(str(exc).split()) or type(exc).__name__)
        self._log(message, "error")
        slicer.util.errorDisplay(message)


#
# MedReasonerLogic
#


class MedReasonerLogic(ScriptedLoadableModuleLogic):
    """The module's logic for scripts, tests and the widget: a thin wrapper of ``MedReasonerLib.logic``.

    Example (Slicer's Python console)::

        import MedReasoner
        logic = MedReasoner.MedReasonerLogic()
        volume = slicer.util.getNode("CTChest")
        outcome = logic.run(volume, "Where is the largest lung nodule?")
        print([(s.segment_name, s.status) for s in outcome.segments])
    """

    def __init__(self, worker_python: str | None = None, worker_env: dict | None = None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.workerPython, self.workerEnv = worker_python, worker_env
        self._lib = None

    @property
    def lib(self) -> LibLogic:
        """The Qt-free logic; made again after ``shutdown()``."""
        if self._lib is None:
            self._lib = LibLogic(worker_python=self.workerPython, worker_env=self.workerEnv)
        return self._lib

    @property
    def job(self):
        return self._lib.job if self._lib is not None else None

    def settings(self) -> RunSettings:
        """The settings kept in the module's parameter node."""
        return RunSettings.from_parameter_node(self.getParameterNode())

    def setSettings(self, settings: RunSettings) -> None:
        settings.to_parameter_node(self.getParameterNode())

    def start(self, volume_node, questions, settings: RunSettings | None = None, segmentation_node=None,
              key_point_ras=None):
        """Start a run in the background and return its ``Job`` (poll it, or ``wait()`` for it)."""
        return self.lib.start(volume_node, questions, settings if settings is not None else self.settings(),
                              segmentation_node=segmentation_node, key_point_ras=key_point_ras)

    def run(self, volume_node, questions, settings: RunSettings | None = None, segmentation_node=None,
            key_point_ras=None, timeout: float = 3600.0):
        """Run and wait (scripts): the ``Outcome``, or ``MedReasonerSlicerError``."""
        job = self.start(volume_node, questions, settings, segmentation_node, key_point_ras)
        return job.wait(timeout)

    def cancel(self) -> None:
        if self._lib is not None:
            self._lib.cancel()

    def remove_result(self, item: AppliedSegment, segmentation_node) -> None:
        self.lib.remove_result(item, segmentation_node)

    @staticmethod
    def jump_to_key_slice(item: AppliedSegment, segmentation_node=None) -> bool:
        return LibLogic.jump_to_key_slice(item, segmentation_node)

    def describe_worker(self) -> list:
        return self._lib.describe_worker() if self._lib is not None else [_("worker: not started")]

    def reset(self) -> None:
        """The scene is closing: cancel the run, drop exported volumes, keep the worker warm."""
        if self._lib is not None:
            self._lib.reset()

    def shutdown(self) -> None:
        """Stop the worker and remove the temporary files; the next run starts afresh."""
        if self._lib is not None:
            self._lib.shutdown()
            self._lib = None


#
# MedReasonerTest
#


class MedReasonerTest(ScriptedLoadableModuleTest):
    """The in-Slicer self-test (Reload and Test, or ctest).

    The part that runs the models needs a Python with MedReasoner installed: set MEDREASONER_TEST_PYTHON.
    In a source checkout the worker uses the deterministic CRM stand-in of ``tests/doubles.py``; elsewhere
    MEDREASONER_TEST_CRM, MEDREASONER_TEST_DEVICE and MEDREASONER_TEST_WORKER_ARGS choose the models.
    """

    QUESTION = "Which structure in the left kidney stands out?"

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_BadInputIsRefused()
        self.setUp()
        self.test_PanelFollowsInputs()
        self.setUp()
        self.test_QuestionBecomesSegmentAndCancelChangesNothing()
        self.setUp()

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def syntheticVolume(name: str, slices: int = 8, seed: int = 0):
        """An int16 volume with a bright off-centre blob, on an oblique grid (rotated voxel axes)."""
        import math

        import numpy as np

        rng = np.random.default_rng(seed)
        k, j, i = np.ogrid[0:slices, 0:32, 0:32]
        voxels = 60 + 20 * rng.random((slices, 32, 32))
        voxels = voxels + 500 * ((((j - 14) / 7.0) ** 2 + ((i - 19) / 5.0) ** 2) <= 1)
        a, b = 0.35, 0.2
        rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = rz @ rx @ np.diag([0.8, 0.9, 2.5])
        ijkToRAS[:3, 3] = [12.5, -30.0, 7.25]
        return slicer.util.addVolumeFromArray(voxels.astype(np.int16), ijkToRAS, name)

    @staticmethod
    def sceneContents() -> list:
        """Every node's class and name, and each segmentation's segment names: to compare before/after."""
        contents = []
        for node in slicer.util.getNodesByClass("vtkMRMLNode"):
            entry = [node.GetClassName(), node.GetName()]
            if node.IsA("vtkMRMLSegmentationNode"):
                segmentation = node.GetSegmentation()
                entry += [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
            contents.append(tuple(entry))
        return sorted(contents, key=str)

    @staticmethod
    def workerSetUp():
        """(settings, worker environment) for the run part of the test."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        double = os.path.join(root, "tests", "doubles.py")
        narrow = dict(key_slice_mode="number", key_slice=3, slice_range="2:6")  # a few slices: quick on a CPU
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        crm = os.environ.get("MEDREASONER_TEST_CRM")
        if crm is None and os.path.exists(double):  # a source checkout: the deterministic CRM stand-in
            if os.path.isdir(os.path.join(root, "medreasoner")):
                env["PYTHONPATH"] = root
            settings = RunSettings(crm="double", crm_backend="test-brightest", device="cpu",
                                   extra_worker_args=f"--plugins {double} --batch-size 1", **narrow)
            return settings, env
        settings = RunSettings(crm=crm or "", device=os.environ.get("MEDREASONER_TEST_DEVICE", "auto"),
                               extra_worker_args=os.environ.get("MEDREASONER_TEST_WORKER_ARGS", ""), **narrow)
        return settings, env

    # -- tests -----------------------------------------------------------------------------------
    def test_BadInputIsRefused(self):
        self.delayDisplay("Bad input is refused before anything starts")
        logic = MedReasonerLogic()
        try:
            volume = self.syntheticVolume("refused")
            labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
            before = self.sceneContents()
            for node, question in ((None, "Where is the tumour?"), (volume, "   \n  "), (labels, "Where?")):
                with self.assertRaises(MedReasonerSlicerError):
                    logic.start(node, question, RunSettings())
            with self.assertRaises(MedReasonerSlicerError):
                logic.start(volume, "Where?", RunSettings(window_mode="custom", window_custom="wide"))
            self.assertEqual(self.sceneContents(), before)
            self.assertIsNone(logic.job)
        finally:
            logic.shutdown()
        self.delayDisplay("Bad input test passed")

    def test_PanelFollowsInputs(self):
        """Run is enabled only with a volume and a question; Cancel only while running."""
        layoutManager = getattr(slicer.app, "layoutManager", None)
        if layoutManager is None or layoutManager() is None or not hasattr(slicer.util, "getModuleWidget"):
            self.delayDisplay("No Slicer main window: panel test skipped")
            return
        self.delayDisplay("Panel follows its inputs")
        widget = slicer.util.getModuleWidget("MedReasoner")
        volume = self.syntheticVolume("panel")
        widget.ui.inputVolumeSelector.setCurrentNode(volume)
        widget.ui.questionTextEdit.setPlainText("")
        self.assertFalse(widget.ui.runButton.enabled)
        widget.ui.questionTextEdit.setPlainText("Where is the tumour?")
        self.assertTrue(widget.ui.runButton.enabled)
        self.assertFalse(widget.ui.cancelButton.enabled)
        widget.ui.questionTextEdit.setPlainText("")
        self.delayDisplay("Panel test passed")

    def test_QuestionBecomesSegmentAndCancelChangesNothing(self):
        python = os.environ.get("MEDREASONER_TEST_PYTHON")
        if not python:
            self.delayDisplay("MEDREASONER_TEST_PYTHON is not set: the test that runs the models is skipped")
            return
        settings, env = self.workerSetUp()
        logic = MedReasonerLogic(worker_python=python, worker_env=env)
        try:
            self.delayDisplay("A question becomes a segment with its box and key points")
            volume = self.syntheticVolume("oblique")
            outcome = logic.run(volume, self.QUESTION, settings, timeout=900)
            self.assertEqual(len(outcome.segments), 1)
            item = outcome.segments[0]
            self.assertEqual(item.status, "ok", item.message)
            segmentationNode = slicer.mrmlScene.GetNodeByID(outcome.segmentation_node_id)
            self.assertIsNotNone(segmentationNode)
            segment = segmentationNode.GetSegmentation().GetSegment(item.segment_id)
            self.assertIsNotNone(segment)
            self.assertEqual(segment.GetName(), self.QUESTION)
            self.assertEqual(segment_reasoning(segmentationNode, item.segment_id).get("question"), self.QUESTION)
            roi = slicer.mrmlScene.GetNodeByID(item.roi_node_id or "")
            self.assertTrue(roi is not None and roi.IsA("vtkMRMLMarkupsROINode"))
            points = slicer.mrmlScene.GetNodeByID(item.points_node_id or "")
            self.assertTrue(points is not None and points.IsA("vtkMRMLMarkupsFiducialNode"))
            self.assertEqual(points.GetNumberOfControlPoints(), 2)

            self.delayDisplay("Cancel leaves the scene unchanged")
            longVolume = self.syntheticVolume("long", slices=24, seed=5)
            before = self.sceneContents()
            slicewise = dataclasses.replace(settings, strategy="slicewise", slice_range="")
            job = logic.start(longVolume, "Where is the bright blob?", slicewise)
            deadline = time.monotonic() + 300
            while not any(e.kind == "progress" and e.stage != "loading models" for e in job.poll()):
                self.assertFalse(job.finished, "the run ended before it could be cancelled")
                self.assertLess(time.monotonic(), deadline, "no progress within 300 s")
                slicer.app.processEvents()
                time.sleep(0.05)
            job.cancel()
            with self.assertRaises(MedReasonerSlicerError) as raised:
                job.wait(120)
            self.assertEqual(raised.exception.kind, "cancelled")
            self.assertEqual(self.sceneContents(), before)
        finally:
            logic.shutdown()
        self.delayDisplay("Run and cancel test passed")
