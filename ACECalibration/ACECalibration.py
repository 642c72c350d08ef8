"""ACECalibration: calibrated segmentation with voxel-wise confidence and uncertain-region review in 3D Slicer.

The widget is thin: everything that is not GUI lives in ``ACECalibrationLib`` (tested with pytest on slicer-core)
and talks to the server through the project's one client, ``acecal.client.ACEClient``.
"""

import importlib
import os
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
POLL_MS = 100


#
# Module
#
class ACECalibration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ACECalibration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ACECalibration developers"]
        self.parent.helpText = _(
            "Segment a volume on an ACECalibration server and review it with calibrated voxel-wise confidence: a "
            "confidence overlay, uncertain boundary regions outlined and listed, one click to jump between them, and "
            "fine-tuning from corrected cases. See docs/slicer.md in the project."
        )
        self.parent.acknowledgementText = _(
            "Models trained with the marginal L1 average calibration error loss (Barfoot et al., MICCAI 2024). "
            "Built on MONAI and 3D Slicer."
        )


#
# Dependencies: the light acecal client (requests + numpy; never torch) into Slicer's Python
#
def ensureClient(ask: bool = True) -> bool:
    """Make ``acecal.client`` importable, installing the extension's own copy with pip_ensure if needed."""
    import sys

    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    from ACECalibrationLib import dependencies

    if dependencies.client_available() or dependencies.use_checkout(MODULE_DIR):
        return True
    requirements = dependencies.client_requirements(MODULE_DIR)
    if ask and not slicer.util.confirmOkCancelDisplay(
        _("ACECalibration needs its small Python client (requests, numpy; no deep-learning packages). Install it now?"),
        detailedText="\n".join(requirements),
    ):
        return False
    installer = None
    for name in ("slicer.packaging", "slicer.pydeps"):  # the module was renamed between Slicer releases
        try:
            installer = importlib.import_module(name)
            break
        except ImportError:
            continue
    if installer is not None and hasattr(installer, "pip_ensure"):
        from packaging.requirements import Requirement

        installer.pip_ensure([Requirement(r) for r in requirements], requester="ACECalibration")
    else:  # Slicer < 5.11: a list of pip arguments
        slicer.util.pip_install([r.split(" @ ", 1)[-1] for r in requirements])
    importlib.invalidate_caches()
    return dependencies.client_available()


#
# Parameter node
#
@parameterNodeWrapper
class ACECalibrationParameterNode:
    """The module's state in the scene (saved with it). The API key is deliberately not a parameter."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelId: str = ""
    uncertaintyThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.0  # 0 = the model's own threshold
    confidenceDisplayThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.9
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    segmentationNode: vtkMRMLSegmentationNode
    confidenceVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    regionsTable: vtkMRMLTableNode
    finetuneEpochs: Annotated[int, WithinRange(1, 1000)] = 20


#
# Widget
#
class ACECalibrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._models = {}
        self._task = None
        self._taskVolume = None
        self._finetuneTask = None
        self._evalTask = None
        self._navigator = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ACECalibration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ACECalibrationLogic()

        from ACECalibrationLib import settings

        qsettings = qt.QSettings()
        for url in settings.server_history(qsettings) or [settings.DEFAULT_SERVER_URL]:
            self.ui.serverUrlComboBox.addItem(url)
        self.ui.serverUrlComboBox.setCurrentText(settings.last_server_url(qsettings))
        self.ui.apiKeyLineEdit.text = settings.api_key_from_environment()  # memory only
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.confidenceThresholdSlider.connect("valueChanged(double)", self.onDisplayChanged)
        self.ui.overlayOpacitySlider.connect("valueChanged(double)", self.onDisplayChanged)
        self.ui.regionsTableView.connect("clicked(QModelIndex)", self.onRegionClicked)
        self.ui.nextRegionButton.connect("clicked(bool)", lambda: self.onStepRegion(+1))
        self.ui.previousRegionButton.connect("clicked(bool)", lambda: self.onStepRegion(-1))
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePair)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.finetuneCancelButton.connect("clicked(bool)", self.onFinetuneCancel)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluate)
        self._pairs = []

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        for task in (self._task, self._finetuneTask, self._evalTask):
            if task is not None:
                task.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[ACECalibrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self._task is not None
        self.ui.applyButton.enabled = bool(p and p.inputVolume and self._currentModelId() and not busy)
        self.ui.cancelButton.enabled = busy
        if p and p.regionsTable is not None and self.ui.regionsTableView.mrmlTableNode() is not p.regionsTable:
            self.ui.regionsTableView.setMRMLTableNode(p.regionsTable)

    # --- connection -----------------------------------------------------------------------------------------------
    def _serverUrl(self) -> str:
        from ACECalibrationLib import settings

        return settings.normalize_server_url(self.ui.serverUrlComboBox.currentText)

    def _client(self):
        from ACECalibrationLib.logic import make_client

        return make_client(self._serverUrl(), self.ui.apiKeyLineEdit.text or None)

    def _currentModelId(self) -> str:
        return self.ui.modelComboBox.currentData or ""

    def _showError(self, exc: BaseException, what: str) -> None:
        import traceback

        from ACECalibrationLib.logic import user_message

        try:
            url = self._serverUrl()
        except ValueError:
            url = ""
        message = user_message(exc, url)
        self.ui.statusLabel.text = message
        slicer.util.errorDisplay(f"{what}\n\n{message}",
                                detailedText="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def onTestConnection(self) -> None:
        if not ensureClient():
            self.ui.connectionStatusLabel.text = _("The ACECalibration client is not installed.")
            return
        from ACECalibrationLib import settings
        from ACECalibrationLib.logic import user_message

        try:
            url = settings.remember_server_url(qt.QSettings(), self.ui.serverUrlComboBox.currentText)
        except ValueError as e:
            self.ui.connectionStatusLabel.text = str(e)
            return
        with slicer.util.WaitCursor():
            try:
                client = self._client()
                health = client.health()
                models = client.models()
            except Exception as e:  # noqa: BLE001 - shown to the user
                self.ui.connectionStatusLabel.text = user_message(e, url)
                self.ui.modelComboBox.clear()
                return
        h = health if isinstance(health, dict) else vars(health)
        self.ui.connectionStatusLabel.text = _("Connected to {url}: server {version}, device {device}.").format(
            url=url, version=h.get("version", "?"), device=h.get("device", "?"))
        items = models.get("models", models) if isinstance(models, dict) else models
        self._models = {}
        previous = self._parameterNode.modelId if self._parameterNode else ""
        self.ui.modelComboBox.clear()
        for m in items:
            m = m if isinstance(m, dict) else vars(m)
            self._models[m["id"]] = m
            self.ui.modelComboBox.addItem(m["id"], m["id"])
        if previous in self._models:
            self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.findData(previous))
        self.onModelChanged()

    def onModelChanged(self, index=None) -> None:
        model = self._models.get(self._currentModelId())
        if self._parameterNode and model:
            self._parameterNode.modelId = model["id"]
        if not model:
            self.ui.modelInfoLabel.text = ""
        else:
            metrics = model.get("metrics") or {}
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float)))
            labels = ", ".join(n for v, n in sorted(model.get("labels", {}).items(), key=lambda kv: int(kv[0])) if v != "0")
            self.ui.modelInfoLabel.text = _("Loss: {loss}. Labels: {labels}. Measured: {metrics}").format(
                loss=model.get("loss", "?"), labels=labels, metrics=shown or _("no validation metrics"))
        self._checkCanApply()

    # --- segmentation ----------------------------------------------------------------------------------------------
    def onApply(self) -> None:
        if not ensureClient():
            return
        from ACECalibrationLib.logic import start_segmentation

        p = self._parameterNode
        threshold = p.uncertaintyThreshold if p.uncertaintyThreshold > 0 else None
        try:
            self._task = start_segmentation(p.inputVolume, self._serverUrl(), self._currentModelId(),
                                            self.ui.apiKeyLineEdit.text or None, threshold)
        except Exception as e:  # noqa: BLE001
            self._showError(e, _("Could not start the segmentation."))
            return
        self._taskVolume = p.inputVolume
        self.ui.progressBar.show()
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Segmenting...")
        self._checkCanApply()
        self._timer.start()

    def onCancel(self) -> None:
        if self._task is not None:
            self._task.cancel()  # the UI is free at once; the worker stops at its next progress callback

    def _poll(self) -> None:
        if self._task is not None:
            fraction, message = self._task.progress
            if fraction is None:
                self.ui.progressBar.setRange(0, 0)  # busy indicator
            else:
                self.ui.progressBar.setRange(0, 100)
                self.ui.progressBar.value = int(100 * fraction)
            if message:
                self.ui.statusLabel.text = message
            if self._task.done():
                task, self._task = self._task, None
                self.ui.progressBar.hide()
                self._finishSegmentation(task)
        if self._finetuneTask is not None:
            self._pollFinetune()
        if self._evalTask is not None:
            self._pollEvaluation()
        if self._task is None and self._finetuneTask is None and self._evalTask is None:
            self._timer.stop()
        self._checkCanApply()

    def _finishSegmentation(self, task) -> None:
        from ACECalibrationLib.worker import Cancelled

        try:
            output = task.result(0)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled.")
            return
        except Exception as e:  # noqa: BLE001
            self._showError(e, _("Segmentation failed."))
            return
        p = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                result = self.logic.showResult(self._taskVolume, output, p.confidenceDisplayThreshold, p.overlayOpacity)
        except Exception as e:  # noqa: BLE001
            self._showError(e, _("Could not display the result."))
            return
        p.segmentationNode = result.segmentation_node
        p.confidenceVolume = result.confidence_node
        p.uncertaintyVolume = result.uncertainty_node
        p.regionsTable = result.regions_table_node
        self._navigator = result.navigator()
        s = result.summary or {}
        self.ui.statusLabel.text = _("Done: {n} uncertain region(s), {ml:.1f} ml flagged; mean confidence {c:.3f}.").format(
            n=len(result.regions), ml=float(s.get("uncertain_volume_ml", 0.0)), c=float(s.get("mean_confidence", float("nan"))))

    # --- display and navigation ------------------------------------------------------------------------------------
    def onDisplayChanged(self, value=None) -> None:
        # read the sliders themselves: this slot may run before the parameter node has taken the new value
        p = self._parameterNode
        if p and p.confidenceVolume:
            self.logic.updateDisplay(p.inputVolume, p.confidenceVolume, p.uncertaintyVolume,
                                     self.ui.confidenceThresholdSlider.value, self.ui.overlayOpacitySlider.value)

    def _regionNavigator(self):
        p = self._parameterNode
        if not p or not p.regionsTable:
            return None
        if self._navigator is None or self._navigator.table_node is not p.regionsTable:
            from ACECalibrationLib.regions import RegionNavigator

            self._navigator = RegionNavigator(p.regionsTable, p.segmentationNode)
        return self._navigator

    def _showRegion(self, point) -> None:
        nav = self._regionNavigator()
        if point is None or nav is None:
            self.ui.regionLabel.text = _("No uncertain regions.")
            return
        self.ui.regionsTableView.selectRow(nav.index)
        self.ui.regionLabel.text = _("Region {i} of {n} at R {r:.1f}, A {a:.1f}, S {s:.1f} mm").format(
            i=nav.index + 1, n=len(nav), r=point[0], a=point[1], s=point[2])

    def onRegionClicked(self, index) -> None:
        nav = self._regionNavigator()
        if nav is not None and index.isValid():
            self._showRegion(nav.goto(index.row(), slicer.mrmlScene))

    def onStepRegion(self, step: int) -> None:
        nav = self._regionNavigator()
        if nav is not None:
            self._showRegion(nav.next(slicer.mrmlScene) if step > 0 else nav.previous(slicer.mrmlScene))

    # --- fine-tuning -----------------------------------------------------------------------------------------------
    def onAddPair(self) -> None:
        volume, seg = self.ui.pairVolumeSelector.currentNode(), self.ui.pairSegmentationSelector.currentNode()
        if volume is None or seg is None:
            slicer.util.warningDisplay(_("Choose an image and its corrected segmentation."))
            return
        self._pairs.append((volume, seg))
        self.ui.pairsListWidget.addItem(f"{volume.GetName()}  +  {seg.GetName()}")

    def onRemovePair(self) -> None:
        row = self.ui.pairsListWidget.currentRow
        if 0 <= row < len(self._pairs):
            del self._pairs[row]
            self.ui.pairsListWidget.takeItem(row)

    def onFinetune(self) -> None:
        if not ensureClient():
            return
        from ACECalibrationLib.finetune import start_finetune, training_pair

        model = self._models.get(self._currentModelId())
        if model is None:
            slicer.util.warningDisplay(_("Connect to a server and choose the base model first."))
            return
        try:
            with slicer.util.WaitCursor():
                pairs = [training_pair(v, s, model["labels"]) for v, s in self._pairs]
            self._finetuneTask = start_finetune(self._client(), pairs, model["id"], self.ui.lossComboBox.currentText,
                                                self.ui.epochsSpinBox.value)
        except Exception as e:  # noqa: BLE001
            self._showError(e, _("Could not start fine-tuning."))
            return
        self.ui.finetuneButton.enabled = False
        self.ui.finetuneCancelButton.enabled = True
        self.ui.finetuneLog.clear()
        self._timer.start()

    def onFinetuneCancel(self) -> None:
        if self._finetuneTask is not None:
            self._finetuneTask.cancel()

    def _pollFinetune(self) -> None:
        fraction, message = self._finetuneTask.progress
        self.ui.finetuneProgressBar.value = int(100 * (fraction or 0.0))
        if message and message != getattr(self, "_lastFinetuneMessage", None):
            self.ui.finetuneLog.appendPlainText(message)
            self._lastFinetuneMessage = message
        if not self._finetuneTask.done():
            return
        task, self._finetuneTask = self._finetuneTask, None
        self.ui.finetuneButton.enabled = True
        self.ui.finetuneCancelButton.enabled = False
        try:
            job = task.result(0)
        except Exception as e:  # noqa: BLE001 (Cancelled included)
            self.ui.finetuneLog.appendPlainText(str(e) or _("Cancelled."))
            return
        if job.get("status") == "succeeded" and job.get("model_id"):
            self.ui.finetuneLog.appendPlainText(_("New model: {m}").format(m=job["model_id"]))
            self.onTestConnection()
            index = self.ui.modelComboBox.findData(job["model_id"])
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
        else:
            self.ui.finetuneLog.appendPlainText(_("Job ended: {s}. {e}").format(s=job.get("status"), e=job.get("error") or ""))

    # --- evaluation ------------------------------------------------------------------------------------------------
    def onEvaluate(self) -> None:
        if not ensureClient():
            return
        from ACECalibrationLib.finetune import evaluate_case, training_pair
        from ACECalibrationLib.worker import Task

        p = self._parameterNode
        model = self._models.get(self._currentModelId())
        reference = self.ui.referenceSegmentationSelector.currentNode()
        if model is None or p.inputVolume is None or reference is None:
            slicer.util.warningDisplay(_("Choose a model, an input volume and its reference segmentation."))
            return
        try:
            with slicer.util.WaitCursor():
                pair = training_pair(p.inputVolume, reference, model["labels"])
            client = self._client()
            self._evalTask = Task(lambda ctx: evaluate_case(client, pair, model["id"], ctx=ctx),
                                  name="ACECalibration evaluation").start()
        except Exception as e:  # noqa: BLE001
            self._showError(e, _("Evaluation failed."))
            return
        self.ui.evaluateButton.enabled = False
        self.ui.evaluateResultLabel.text = _("Evaluating...")
        self._timer.start()

    def _pollEvaluation(self) -> None:
        if not self._evalTask.done():
            self.ui.evaluateResultLabel.text = self._evalTask.progress[1] or _("Evaluating...")
            return
        task, self._evalTask = self._evalTask, None
        self.ui.evaluateButton.enabled = True
        try:
            reply, png = task.result(0)
        except Exception as e:  # noqa: BLE001
            self.ui.evaluateResultLabel.text = ""
            self._showError(e, _("Evaluation failed."))
            return
        m = reply.get("aggregate") or {}
        self.ui.evaluateResultLabel.toolTip = _("Dice {d}, ACE {a}, ECE {e}, MCE {c}").format(
            d=m.get("dice"), a=m.get("ace"), e=m.get("ece"), c=m.get("mce"))
        if png:
            pixmap = qt.QPixmap()
            pixmap.loadFromData(qt.QByteArray(png))
            self.ui.evaluateResultLabel.setPixmap(pixmap.scaledToWidth(380, qt.Qt.SmoothTransformation))
        else:
            self.ui.evaluateResultLabel.text = self.ui.evaluateResultLabel.toolTip


#
# Logic: delegates to ACECalibrationLib (the code the pytest suite exercises)
#
class ACECalibrationLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return ACECalibrationParameterNode(super().getParameterNode())

    def process(self, inputVolume, serverUrl: str, modelId: str, apiKey: Optional[str] = None,
                uncertaintyThreshold: Optional[float] = None):
        """Blocking segmentation for scripts and the self-test: ``ACECalibrationLib.logic.run_segmentation``."""
        ensureClient(ask=False)
        from ACECalibrationLib.logic import run_segmentation

        result = run_segmentation(slicer.mrmlScene, inputVolume, serverUrl, modelId, apiKey, uncertaintyThreshold)
        self._decorate(inputVolume, result)
        return result

    def showResult(self, inputVolume, output, confidenceThreshold: float = 0.9, opacity: float = 0.5):
        """GUI thread: build the result nodes from a finished inference and show them."""
        from ACECalibrationLib.logic import create_result_nodes

        result = create_result_nodes(slicer.mrmlScene, inputVolume, output, confidenceThreshold, opacity,
                                     show_in_slice_views=False)
        self._decorate(inputVolume, result, opacity)
        return result

    def _decorate(self, inputVolume, result, opacity: float = 0.5) -> None:
        slicer.util.setSliceViewerLayers(background=inputVolume, foreground=result.confidence_node,
                                         foregroundOpacity=opacity)
        try:
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(result.confidence_node)
        except AttributeError:  # pragma: no cover - Slicer without colour legends
            pass

    def updateDisplay(self, inputVolume, confidenceVolume, uncertaintyVolume, threshold: float, opacity: float) -> None:
        from ACECalibrationLib import display

        display.set_confidence_threshold(confidenceVolume, threshold, uncertaintyVolume)
        slicer.util.setSliceViewerLayers(foregroundOpacity=opacity)


#
# Test (runs inside Slicer: ctest py_ACECalibration, or the Reload & Test button)
#
class ACECalibrationTest(ScriptedLoadableModuleTest):
    """Exercises the Lib path the pytest suite covers, inside the application, without a server.

    With ``ACECAL_TEST_SERVER_URL`` and ``ACECAL_TEST_MODEL`` set, it also segments a synthetic volume on that server.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_result_nodes_on_the_input_grid()
        self.setUp()
        self.test_live_server()

    def _syntheticVolume(self):
        import numpy as np

        self.assertTrue(ensureClient(ask=False), "the acecal client is not available")
        from acecal.geometry import Grid

        from ACECalibrationLib import nodes

        direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
        grid = Grid.from_zyx_shape((20, 24, 28), (0.8, 1.2, 2.5), (-30.0, 40.0, 10.0), direction.ravel())
        kk, jj, ii = np.meshgrid(*[np.arange(s) for s in grid.shape_zyx], indexing="ij")
        label = (((ii - 14) / 6.0) ** 2 + ((jj - 12) / 6.0) ** 2 + ((kk - 10) / 5.0) ** 2 <= 1).astype(np.uint8)
        image = (label * 100 + np.random.default_rng(0).normal(0, 5, label.shape)).astype(np.float32)
        return nodes.add_volume_from_array(slicer.mrmlScene, image, grid, "ACECalSynthetic"), grid, label

    def test_result_nodes_on_the_input_grid(self):
        self.delayDisplay("Result nodes on the input grid")
        import numpy as np

        from ACECalibrationLib import nodes, segmentation
        from ACECalibrationLib.logic import InferenceOutput, create_result_nodes

        volume, grid, label = self._syntheticVolume()
        flags = np.zeros_like(label)
        flags[8:11, 10:14, 12:16] = 1
        output = InferenceOutput(labels=label, confidence=np.where(flags > 0, 0.6, 0.99).astype(np.float32),
                                 uncertainty=np.zeros(label.shape, np.float32), flags=flags, grid=grid,
                                 label_names={"0": "background", "1": "sphere"},
                                 regions=[{"id": 1, "class": 1, "class_name": "sphere", "voxels": int(flags.sum()),
                                           "volume_ml": 0.1, "mean_confidence": 0.6,
                                           "centroid_ras": [0.0, 0.0, 0.0]}])
        result = create_result_nodes(slicer.mrmlScene, volume, output)
        self.assertTrue(nodes.volume_nodes_share_grid(volume, result.confidence_node))
        self.assertEqual(result.segmentation_node.GetSegmentation().GetNumberOfSegments(), 2)
        mask = segmentation.segment_mask(result.segmentation_node, result.segment_ids[1], volume)
        self.assertTrue(np.array_equal(mask, label))
        self.assertEqual(result.regions_table_node.GetNumberOfRows(), 1)
        ACECalibrationLogic()._decorate(volume, result)
        result.navigator().goto(0, slicer.mrmlScene)
        self.delayDisplay("Result nodes OK")

    def test_live_server(self):
        url, model = os.environ.get("ACECAL_TEST_SERVER_URL"), os.environ.get("ACECAL_TEST_MODEL")
        if not url or not model:
            self.delayDisplay("ACECAL_TEST_SERVER_URL / ACECAL_TEST_MODEL not set: live server test skipped")
            return
        import numpy as np

        from ACECalibrationLib import nodes

        volume, grid, label = self._syntheticVolume()
        result = ACECalibrationLogic().process(volume, url, model, os.environ.get("ACECAL_API_KEY"))
        self.assertTrue(nodes.volume_nodes_share_grid(volume, result.confidence_node))
        conf = nodes.array_from_volume_node(result.confidence_node)
        self.assertTrue(np.all((conf >= 0) & (conf <= 1)))
        self.delayDisplay("Live server OK")
