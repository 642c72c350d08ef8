"""ACECalibration: calibrated segmentation with voxel-wise confidence and uncertain-region review in 3D Slicer.

This file is GUI only. Every decision lives in ``ACECalibrationLib`` (tested headless on slicer-core against a real
server): the widget binds Qt signals to :class:`ACECalibrationLib.controller.Controller` and mirrors its state into
the widgets. The server is reached through the extension's own copy of the client (``ACECalibrationLib.client``,
numpy + requests as Slicer ships them): nothing is installed with pip.
"""

import os
import sys
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _, translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:  # the Lib sits next to this file
    sys.path.insert(0, MODULE_DIR)

POLL_MS = 100
OVERLAY_CHOICES = ("confidence", "uncertainty", "none")  # the overlay combo box's items, in order


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
            "confidence overlay, the uncertain boundary regions as a worklist (go to each, accept or correct it in "
            "the embedded Segment Editor; verdicts are saved with the scene), per-segment volume and confidence, and "
            "fine-tuning from corrected cases. Try it on Sample Data > ACECalibration > ACECalHippocampus."
        )
        self.parent.acknowledgementText = _(
            "Models trained with the marginal L1 average calibration error loss (Barfoot et al., MICCAI 2024). "
            "Built on MONAI and 3D Slicer. Sample case: Medical Segmentation Decathlon Task04 (CC BY-SA 4.0)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The sample hippocampus case, shipped in Resources/SampleData, under Sample Data > ACECalibration."""
    import SampleData

    from ACECalibrationLib.sampledata import sample_data_source

    SampleData.SampleDataLogic.registerCustomSampleDataSource(**sample_data_source(MODULE_DIR))


#
# Parameter node
#
@parameterNodeWrapper
class ACECalibrationParameterNode:
    """The module's settings in the scene (saved with it). The API key is deliberately not a parameter."""

    inputVolume: vtkMRMLScalarVolumeNode
    uncertaintyThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.0  # 0 = the model's own threshold
    confidenceDisplayThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.9
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    newNodes: bool = False
    finetuneEpochs: Annotated[int, WithinRange(1, 1000)] = 20


#
# The controller's view: what it tells the GUI, shown with Slicer's dialogs
#
class _WidgetView:
    def __init__(self, widget):
        self.widget = widget

    def changed(self):
        self.widget.refresh()

    def error(self, title, message, details=""):
        slicer.util.errorDisplay(message, windowTitle=title, detailedText=details)

    def confirm(self, title, question, details=""):
        return slicer.util.confirmYesNoDisplay(question, windowTitle=title, detailedText=details)

    def result_ready(self, result):
        self.widget.showResult(result)

    def region_selected(self, row):
        self.widget.ui.regionsTableView.selectRow(row)

    def evaluation_ready(self, text, png_path):
        self.widget.showEvaluation(text, png_path)


#
# Widget
#
class ACECalibrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self._finetuneLines = 0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ACECalibration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ACECalibrationLogic()

        from ACECalibrationLib import settings
        from ACECalibrationLib.controller import Controller

        self.controller = Controller(slicer.mrmlScene, qt.QSettings(), _WidgetView(self))
        for url in settings.server_history(qt.QSettings()) or [settings.DEFAULT_SERVER_URL]:
            self.ui.serverUrlComboBox.addItem(url)
        self.ui.serverUrlComboBox.setCurrentText(self.controller.server_url)
        self.ui.apiKeyLineEdit.text = self.controller.api_key  # from ACECAL_API_KEY, memory only

        self.segmentEditorWidget = slicer.qMRMLSegmentEditorWidget()
        self.segmentEditorWidget.setMaximumNumberOfUndoStates(10)
        self.segmentEditorWidget.setSegmentationNodeSelectorVisible(False)
        self.segmentEditorWidget.setSourceVolumeNodeSelectorVisible(False)
        self.segmentEditorWidget.setSwitchToSegmentationsButtonVisible(False)
        self._selectSegmentEditorNode()
        self.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorLayout.addWidget(self.segmentEditorWidget)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        c = self.controller
        self.ui.serverUrlComboBox.connect("currentTextChanged(QString)", c.set_server)
        self.ui.apiKeyLineEdit.connect("textChanged(QString)", c.set_api_key)
        self.ui.connectButton.connect("clicked(bool)", lambda: c.connect())
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", c.input_changed)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", lambda: c.cancel())
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", self.onDisplayChanged)
        self.ui.confidenceThresholdSlider.connect("valueChanged(double)", self.onDisplayChanged)
        self.ui.overlayOpacitySlider.connect("valueChanged(double)", self.onDisplayChanged)
        self.ui.regionsTableView.connect("clicked(QModelIndex)", lambda index: c.goto_region(index.row()))
        self.ui.previousRegionButton.connect("clicked(bool)", lambda: c.step_region(False))
        self.ui.nextRegionButton.connect("clicked(bool)", lambda: c.step_region(True))
        self.ui.nextUnreviewedButton.connect("clicked(bool)", lambda: c.next_unreviewed())
        self.ui.markReviewedButton.connect("clicked(bool)", lambda: c.mark_region("reviewed"))
        self.ui.acceptButton.connect("clicked(bool)", lambda: c.mark_region("accepted"))
        self.ui.markCorrectedButton.connect("clicked(bool)", lambda: c.mark_region("corrected"))
        self.ui.updateStatisticsButton.connect("clicked(bool)", lambda: c.update_statistics())
        self.ui.addPairButton.connect(
            "clicked(bool)",
            lambda: c.add_pair(
                self.ui.pairVolumeSelector.currentNode(), self.ui.pairSegmentationSelector.currentNode()
            ),
        )
        self.ui.removePairButton.connect("clicked(bool)", lambda: c.remove_pair(self.ui.pairsListWidget.currentRow))
        self.ui.finetuneButton.connect(
            "clicked(bool)", lambda: c.finetune(self.ui.lossComboBox.currentText, self.ui.epochsSpinBox.value)
        )
        self.ui.finetuneCancelButton.connect("clicked(bool)", lambda: c.cancel_finetune())
        self.ui.evaluateButton.connect(
            "clicked(bool)",
            lambda: c.evaluate(
                self.ui.inputVolumeSelector.currentNode(), self.ui.referenceSegmentationSelector.currentNode()
            ),
        )
        self.ui.evaluateCancelButton.connect("clicked(bool)", lambda: c.cancel_evaluation())

        self.initializeParameterNode()
        self.refresh()

    def _selectSegmentEditorNode(self) -> None:
        # the embedded editor's own parameter node, made as the Segment Editor module makes its one
        node = slicer.mrmlScene.GetSingletonNode("ACECalibration", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("ACECalibration")
            node = slicer.mrmlScene.AddNode(node)
        self.segmentEditorWidget.setMRMLSegmentEditorNode(node)

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        self._timer.stop()
        if self.controller is not None:
            self.controller.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._selectSegmentEditorNode()
        self.segmentEditorWidget.installKeyboardShortcuts()
        self.controller.enter()  # fetches the models when not connected yet
        self.refresh()

    def exit(self) -> None:
        self.segmentEditorWidget.setActiveEffect(None)
        self.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.segmentEditorWidget.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onReload(self) -> None:
        """Reload the Lib as well as this file, so *Reload* and *Reload and Test* run the current code."""
        import ACECalibrationLib

        ACECalibrationLib.unload()
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.controller.scene_closing()
        self.segmentEditorWidget.setSegmentationNode(None)
        self.segmentEditorWidget.removeViewObservations()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            self._selectSegmentEditorNode()
        self.refresh()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.controller.input_changed(self._parameterNode.inputVolume)

    # --- the controller's state into the widgets -----------------------------------------------------------------
    def onPoll(self) -> None:
        if not self.controller.poll():
            self._timer.stop()

    def refresh(self) -> None:
        c = self.controller
        if c.active and not self._timer.isActive():
            self._timer.start()
        self.ui.connectionStatusLabel.text = c.connection_text or _("Not connected.")
        self.ui.connectButton.enabled = c.connection_state != "connecting"
        ids = list(c.models)
        self.ui.modelComboBox.blockSignals(True)  # mirroring the controller is not a user's choice
        if [self.ui.modelComboBox.itemData(i) for i in range(self.ui.modelComboBox.count)] != ids:
            self.ui.modelComboBox.clear()
            for model_id in ids:
                self.ui.modelComboBox.addItem(c.model_label(model_id), model_id)
        self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.findData(c.model_id))
        self.ui.modelComboBox.blockSignals(False)
        self.ui.modelInfoLabel.text = c.model_description()
        segmenting = c.segment_state != "idle"
        self.ui.applyButton.enabled = c.can_segment and self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.cancelButton.enabled = c.segment_state == "running"
        self.ui.progressBar.visible = segmenting
        fraction = c.segment_progress[0]
        self.ui.progressBar.setRange(0, 0 if fraction is None else 100)  # None: busy, amount unknown
        self.ui.progressBar.value = int(100 * (fraction or 0.0))
        self.ui.statusLabel.text = c.segment_progress[1] if c.segment_state == "running" else c.status_text
        reviewing = c.review is not None
        for button in (
            self.ui.previousRegionButton,
            self.ui.nextRegionButton,
            self.ui.nextUnreviewedButton,
            self.ui.markReviewedButton,
            self.ui.acceptButton,
            self.ui.markCorrectedButton,
            self.ui.updateStatisticsButton,
        ):
            button.enabled = reviewing
        self.ui.regionLabel.text = c.status_text if reviewing else ""
        pairs = [f"{volume.GetName()}  +  {segmentation.GetName()}" for volume, segmentation in c.pairs]
        if [self.ui.pairsListWidget.item(i).text() for i in range(self.ui.pairsListWidget.count)] != pairs:
            self.ui.pairsListWidget.clear()
            for text in pairs:
                self.ui.pairsListWidget.addItem(text)
        self.ui.finetuneButton.enabled = c.finetune_state == "idle"
        self.ui.finetuneCancelButton.enabled = c.finetune_state == "running"
        self.ui.finetuneProgressBar.value = int(100 * c.finetune_progress)
        if len(c.finetune_log) < self._finetuneLines:
            self.ui.finetuneLog.clear()
            self._finetuneLines = 0
        for line in c.finetune_log[self._finetuneLines :]:
            self.ui.finetuneLog.appendPlainText(line)
        self._finetuneLines = len(c.finetune_log)
        self.ui.evaluateButton.enabled = c.evaluate_state == "idle"
        self.ui.evaluateCancelButton.enabled = c.evaluate_state == "running"
        self.ui.evaluateResultLabel.text = c.evaluation_text

    def showResult(self, result) -> None:
        self.ui.regionsTableView.setMRMLTableNode(result.regions_table_node)
        self.ui.statisticsTableView.setMRMLTableNode(result.statistics_table_node)
        self._selectSegmentEditorNode()
        self.segmentEditorWidget.setSegmentationNode(result.segmentation_node)
        self.segmentEditorWidget.setSourceVolumeNode(self.ui.inputVolumeSelector.currentNode())

    def showEvaluation(self, text, pngPath) -> None:
        self.ui.evaluateResultLabel.text = text
        if pngPath:
            # a PNG file through QIcon, as Slicer loads module icons (ScriptedLoadableModule) and scales them
            # (ExtensionWizard): no bytes cross into PythonQt
            self.ui.evaluateFigureLabel.setPixmap(qt.QIcon(pngPath).pixmap(qt.QSize(380, 380)))
        else:
            self.ui.evaluateFigureLabel.clear()

    # --- actions that need values from several widgets ----------------------------------------------------------
    def onModelChosen(self, index) -> None:
        self.controller.select_model(self.ui.modelComboBox.itemData(index) or "")

    def onApply(self) -> None:
        p = self._parameterNode
        self.controller.segment(p.inputVolume, p.uncertaintyThreshold, new_nodes=p.newNodes)

    def onDisplayChanged(self, value=None) -> None:
        # the sliders themselves: this slot may run before the parameter node has taken the new value
        self.controller.set_display(
            self.ui.confidenceThresholdSlider.value,
            self.ui.overlayOpacitySlider.value,
            OVERLAY_CHOICES[max(self.ui.overlayComboBox.currentIndex, 0)],
        )


#
# Logic: the scriptable entry point is ACECalibrationLib.logic.run_segmentation; this class holds the parameter node
#
class ACECalibrationLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return ACECalibrationParameterNode(super().getParameterNode())

    def process(self, inputVolume, serverUrl: str, modelId: str, apiKey=None, uncertaintyThreshold=None):
        """Blocking segmentation for scripts and the self-test (``ACECalibrationLib.logic.run_segmentation``)."""
        from ACECalibrationLib.logic import run_segmentation

        return run_segmentation(slicer.mrmlScene, inputVolume, serverUrl, modelId, apiKey, uncertaintyThreshold)


#
# Test (runs inside Slicer: ctest py_ACECalibration, or the Reload and Test button)
#
class ACECalibrationTest(ScriptedLoadableModuleTest):
    """The Lib on the application's own MRML: result nodes, the sample case, the controller's consent rules; with
    ``ACECAL_TEST_SERVER_URL`` and ``ACECAL_TEST_MODEL`` set, a segmentation through the controller on that server."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_result_nodes_on_the_input_grid()
        self.setUp()
        self.test_sample_data_loads()
        self.setUp()
        self.test_live_server()

    def _syntheticVolume(self):
        import numpy as np

        from ACECalibrationLib import nodes
        from ACECalibrationLib.client import Grid

        direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
        grid = Grid.from_zyx_shape((20, 24, 28), (0.8, 1.2, 2.5), (-30.0, 40.0, 10.0), direction.ravel())
        kk, jj, ii = np.meshgrid(*[np.arange(s) for s in grid.shape_zyx], indexing="ij")
        label = (((ii - 14) / 6.0) ** 2 + ((jj - 12) / 6.0) ** 2 + ((kk - 10) / 5.0) ** 2 <= 1).astype(np.uint8)
        image = (label * 100 + np.random.default_rng(0).normal(0, 5, label.shape)).astype(np.float32)
        return nodes.add_volume_from_array(slicer.mrmlScene, image, grid, "ACECalSynthetic"), grid, label

    def test_result_nodes_on_the_input_grid(self):
        self.delayDisplay("Result nodes on the input grid")
        import numpy as np

        from ACECalibrationLib import display, nodes, segmentation
        from ACECalibrationLib.client import InferenceReply, InferenceResult, Region, Summary
        from ACECalibrationLib.logic import create_result_nodes

        volume, grid, label = self._syntheticVolume()
        flags = np.zeros_like(label)
        flags[8:11, 10:14, 12:16] = 1
        box = {"min": [0.0, 0.0, 0.0], "max": [1.0, 1.0, 1.0]}
        region = Region(
            id=1,
            class_value=1,
            class_name="sphere",
            voxels=int(flags.sum()),
            volume_ml=0.1,
            mean_confidence=0.6,
            centroid_lps=[0.0, 0.0, 0.0],
            centroid_ras=[0.0, 0.0, 0.0],
            bbox_lps=box,
            bbox_ras=box,
        )
        summary = Summary(
            classes=[],
            mean_confidence=0.98,
            uncertain_voxels=int(flags.sum()),
            uncertain_volume_ml=0.1,
            voxel_volume_ml=grid.voxel_volume_ml,
            region_count=1,
        )
        reply = InferenceReply(
            result_id="selftest",
            model_id="synthetic",
            labels={"0": "background", "1": "sphere"},
            grid=grid,
            summary=summary,
            files={},
            regions=[region],
        )
        output = InferenceResult(
            reply,
            arrays={
                "labels": label,
                "confidence": np.where(flags > 0, 0.6, 0.99).astype(np.float32),
                "uncertainty": np.zeros(label.shape, np.float32),
                "flags": flags,
            },
        )
        result = create_result_nodes(slicer.mrmlScene, volume, output)
        self.assertTrue(nodes.volume_nodes_share_grid(volume, result.confidence_node))
        self.assertEqual(result.segmentation_node.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertEqual(
            result.uncertain_node.GetSegmentation().GetNthSegment(0).GetName(), display.UNCERTAIN_SEGMENT_NAME
        )
        mask = segmentation.segment_mask(result.segmentation_node, result.segment_ids[1], volume)
        self.assertTrue(np.array_equal(mask, label))
        self.assertEqual(result.regions_table_node.GetNumberOfRows(), 1)
        if slicer.mrmlScene.GetNodeByID(display.SLICER_VIRIDIS_ID) is not None:  # the application's own table
            self.assertEqual(result.confidence_node.GetDisplayNode().GetColorNodeID(), display.SLICER_VIRIDIS_ID)
        result.navigator().goto(0, slicer.mrmlScene)
        self.delayDisplay("Result nodes OK")

    def test_sample_data_loads(self):
        self.delayDisplay("Sample data")
        import SampleData

        registerSampleData()
        volume, reference = SampleData.SampleDataLogic().downloadSamples("ACECalHippocampus")
        self.assertEqual(volume.GetImageData().GetDimensions(), (36, 50, 31))
        names = [
            reference.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(reference.GetSegmentation().GetNumberOfSegments())
        ]
        self.assertEqual(names, ["Anterior", "Posterior"])
        self.delayDisplay("Sample data OK")

    def test_live_server(self):
        url, model = os.environ.get("ACECAL_TEST_SERVER_URL"), os.environ.get("ACECAL_TEST_MODEL")
        if not url or not model:
            self.delayDisplay("ACECAL_TEST_SERVER_URL / ACECAL_TEST_MODEL not set: live server test skipped")
            return
        import time

        from ACECalibrationLib import nodes, settings
        from ACECalibrationLib.controller import Controller, View

        volume, grid, label = self._syntheticVolume()
        c = Controller(slicer.mrmlScene, settings.MemorySettings(), View(), api_key=os.environ.get("ACECAL_API_KEY"))
        c.set_server(url)
        c.connect()
        deadline = time.monotonic() + 300
        while c.poll() and time.monotonic() < deadline:
            slicer.app.processEvents()
        c.select_model(model)
        self.assertTrue(c.segment(volume), c.status_text)
        while c.poll() and time.monotonic() < deadline:
            slicer.app.processEvents()
        self.assertIsNotNone(c.result, c.status_text)
        self.assertTrue(nodes.volume_nodes_share_grid(volume, c.result.confidence_node))
        c.cleanup()
        self.delayDisplay("Live server OK")
