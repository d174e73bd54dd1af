"""SAM3DSegment: click-based 3D segmentation of CT (Slicer glue: UI, observers, engine pump). The work lives in
SAM3DSegmentLib (slicer: MRML, engine link, Local/Remote panel; inference.engine_process: the model in a child
process, which picks the device for "auto" and talks to remote servers). Slicer imports torch only for Diagnose."""
import logging
import os
import sys
import time

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.util import VTKObservationMixin

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_root, "SAM3DSegmentLib")) and _root not in sys.path:
    sys.path.append(_root)  # running from a checkout ("Additional module paths" = SAM3DSegment/)


@parameterNodeWrapper
class SAM3DSegmentParameterNode:
    volume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    positivePoints: slicer.vtkMRMLMarkupsFiducialNode
    negativePoints: slicer.vtkMRMLMarkupsFiducialNode


class SAM3DSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "SAM3D Segment"
        parent.categories = ["Segmentation"]
        parent.dependencies = ["Markups", "Segmentations"]
        parent.contributors = ["SAM3DSegment developers"]
        parent.helpText = ("Click inside an object (Include) and where the mask leaks (Exclude); a SAM-Med3D-class "
                           "model segments it in 3D. Undo/Redo, Next object, Export. Research use only.")
        parent.acknowledgementText = "Models: SAM-Med3D (uni-medical, Apache-2.0)."


class SAM3DSegmentLogic(ScriptedLoadableModuleLogic):
    """``link`` (SAM3DSegmentLib.slicer.engine_link.EngineLink, GUI thread only) queues the engine's jobs and writes
    their results; the model runs in a child process (docs/slicer.md "How the engine runs")."""

    def __init__(self, engine=None):
        ScriptedLoadableModuleLogic.__init__(self)
        from SAM3DSegmentLib.slicer.engine_link import EngineLink
        self.link = EngineLink(engine)

    def getParameterNode(self):
        return SAM3DSegmentParameterNode(super().getParameterNode())

    def waitIdle(self, pump, timeout=600.0):
        """Process events until the engine is idle, delivering results with ``pump`` (tests, scripts)."""
        self.link.wait_idle(pump, slicer.app.processEvents, timeout)

    def shutdown(self):
        self.link.shutdown()


class SAM3DSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._markupsObserver = self.history = self._progress = self._placeObserver = None
        self._shortcuts = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from SAM3DSegmentLib import slicer as sb
        self._target = sb.TargetSegment()  # the segment the points belong to; tells user choices from the module's own
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAM3DSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAM3DSegmentLogic()
        self.link = self.logic.link
        from SAM3DSegmentLib import weights
        names = list(weights.known_names())
        ui.modelComboBox.addItems(names)
        ui.modelComboBox.setCurrentText(weights.DEFAULT_MODEL if weights.DEFAULT_MODEL in names else names[0])
        self.remote = sb.RemotePanel(ui, qt.QSettings(), self.link, self.startPump)  # Local/Remote, kept in QSettings
        self.findAll = sb.FindAllPanel(ui, self.link, self.startPump, lambda: self.currentNodes()[:2], lambda seg: setattr(self, "history", None), self._target)
        self.timer = qt.QTimer()
        self.timer.setInterval(30)
        self.timer.connect("timeout()", self.pump)
        ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        ui.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda n: self.updateButtons())
        ui.includeButton.connect("toggled(bool)", lambda on: self.onPlace(True, on))
        ui.excludeButton.connect("toggled(bool)", lambda on: self.onPlace(False, on))
        ui.deviceComboBox.connect("currentTextChanged(QString)", lambda d: self.showDeviceWarning(None if d == "auto" else d))
        for button, slot in ((ui.newSegmentButton, self.onNextObject), (ui.nextObjectButton, self.onNextObject),
                             (ui.undoButton, lambda: self.onEdit("undo")), (ui.redoButton, lambda: self.onEdit("redo")),
                             (ui.resetButton, lambda: self.onEdit("reset")), (ui.loadModelButton, self.onLoadModel),
                             (ui.installDependenciesButton, self.onInstallDependencies), (ui.diagnoseButton, self.onDiagnose),
                             (ui.exportSegNrrdButton, lambda: self.onExport("seg.nrrd")),
                             (ui.exportNiftiButton, lambda: self.onExport("nifti")), (ui.refineButton, self.onRefine),
                             (ui.exportDicomSegButton, lambda: self.onExport("dicom"))):
            button.connect("clicked()", slot)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent,
                         lambda caller, event: self.parent.isEntered and self.initializeParameterNode())
        self.initializeParameterNode()
        self.updateButtons()
        appLogic = slicer.app.applicationLogic()  # the buttons show what the scene does (Esc / right-click end placing)
        self._placeObserver = sb.PlaceModeObserver(
            appLogic.GetInteractionNode(), appLogic.GetSelectionNode(), lambda: (self.positivePoints, self.negativePoints),
            lambda include, exclude: (ui.includeButton.setChecked(include), ui.excludeButton.setChecked(exclude)))

    def cleanup(self):
        self.exit()
        self.removeObservers()
        self.timer.stop()
        self._setMarkupsObserver(None)
        self._placeObserver = self._placeObserver and self._placeObserver.remove()
        if self.logic:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()
        for key, slot in (("A", lambda: self.ui.includeButton.setChecked(True)),
                          ("S", lambda: self.ui.excludeButton.setChecked(self.ui.excludeButton.enabled)), ("N", self.onNextObject),
                          ("Ctrl+Alt+Z", lambda: self.onEdit("undo")), ("Ctrl+Alt+Y", lambda: self.onEdit("redo"))):
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def exit(self):
        for shortcut in self._shortcuts:
            shortcut.enabled = False
            shortcut.deleteLater()
        self._shortcuts = []
        self.ui.includeButton.setChecked(False)
        self.ui.excludeButton.setChecked(False)

    def onSceneStartClose(self, caller, event):
        self.link.close_scene()
        self.findAll.reset()
        self._setMarkupsObserver(None)
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiTag)
        self._parameterNode, self.history = None, None
        self._target.reset()

    def initializeParameterNode(self):
        from SAM3DSegmentLib import slicer as sb
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiTag)
        p = self._parameterNode = self.logic.getParameterNode()
        self._guiTag = p.connectGui(self.ui)
        if p.volume is None:
            p.volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.positivePoints, self.negativePoints = sb.prompt_nodes(slicer.mrmlScene, p.positivePoints, p.negativePoints)
        p.positivePoints, p.negativePoints = self.positivePoints, self.negativePoints
        self._setMarkupsObserver(self.onPointsChanged)

    def _setMarkupsObserver(self, callback):
        from SAM3DSegmentLib import slicer as sb
        if self._markupsObserver is not None:
            self._markupsObserver.remove()
        self._markupsObserver = sb.MarkupsObserver([self.positivePoints, self.negativePoints], callback) if callback else None

    def currentNodes(self):
        seg = self.ui.segmentationSelector.currentNode()
        return self.ui.volumeSelector.currentNode(), seg, self.ui.segmentSelector.currentSegmentID() if seg else None

    def updateButtons(self):
        volume, seg, segId = self.currentNodes()
        self.ui.includeButton.enabled = volume is not None
        self.ui.excludeButton.enabled = volume is not None and self.link.exclude_allowed  # not with a 3DSAM-adapter
        self.ui.refineButton.enabled = volume is not None and self.link.refine_allowed  # nor refinement
        self.ui.exportSegNrrdButton.enabled = self.ui.exportNiftiButton.enabled = bool(seg and volume)
        self.ui.exportDicomSegButton.enabled = bool(volume and seg and volume.GetAttribute("DICOM.instanceUIDs"))

    def ensureSegment(self, newSegment=False):
        """Segmentation and target segment, created when missing (never moving a user's); Next object: no points."""
        from SAM3DSegmentLib import slicer as sb
        volume, seg, segId = self.currentNodes()
        with self._target.module_change():
            seg, segId = sb.prepare_target(slicer.mrmlScene, volume, seg, None if newSegment else segId)
            self.ui.segmentationSelector.setCurrentNode(seg)
            self.ui.segmentSelector.setCurrentSegmentID(segId)
        switched = self._target.module_selected(segId)
        if self.history is None or self.history.node is not seg or switched:  # the engine's undo stack is per segment
            self.history = sb.SegmentHistory(seg)
        if newSegment:
            self.rewritePoints([])
        return volume, seg, segId

    def onPlace(self, positive, on):
        """Include/Exclude pressed: place into that list. Released by the user (not by PlaceModeObserver): stop placing."""
        if not on:
            if self._placeObserver is not None and self._placeObserver.current()[0 if positive else 1]:
                slicer.app.applicationLogic().GetInteractionNode().SwitchToViewTransformMode()
            return
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(self.positivePoints if positive else self.negativePoints)
        markupsLogic.StartPlaceMode(True)

    def onPointsChanged(self, reason, node, index):
        """A point was placed, moved or removed (never on hover previews): re-run the model."""
        volume = self.ui.volumeSelector.currentNode()
        if volume is None:
            self.ui.statusLabel.text = "Select a volume first."
            return
        with slicer.util.tryWithErrorDisplay("SAM3DSegment: could not use the click", waitCursor=False):
            from SAM3DSegmentLib import slicer as sb
            unused = sb.reject_points_outside(volume, [self.positivePoints, self.negativePoints], self._markupsObserver)
            if reason == "defined" and index is not None and not node.GetNthControlPointSelected(index):
                self.ui.statusLabel.text = unused[-1]  # nothing changed for the model
                return
            if self.link.model_name is None and not self.link.engine.busy:
                self.onLoadModel()
            volume, seg, segId = self.ensureSegment()
            clicks = sb.clicks_from_markups(self.positivePoints, self.negativePoints, volume)
            self.link.sync_clicks(volume, seg, segId, clicks)
            self.ui.statusLabel.text = " ".join(
                [f"{len(clicks)} click(s) on {seg.GetSegmentation().GetSegment(segId).GetName()}."] + unused)
            self.startPump()

    def rewritePoints(self, clicks):
        from SAM3DSegmentLib import slicer as sb
        sb.show_clicks(self.positivePoints, self.negativePoints, clicks, self._markupsObserver)

    def onEdit(self, kind):
        volume, seg, segId = self.currentNodes()
        if volume is not None and seg is not None and segId:
            self.link.edit(kind, seg, segId, volume)
            self.startPump()

    def onRefine(self):
        """Refine selected segment: the engine's object starts from the segment's voxels; clicks then edit it."""
        with slicer.util.tryWithErrorDisplay("SAM3DSegment: could not refine the segment", waitCursor=False):
            if not all(self.currentNodes()[::2]):  # the volume and a segment
                raise ValueError("select a volume and the segment to refine")
            if self.link.model_name is None and not self.link.engine.busy:
                self.onLoadModel()
            self.link.refine(*self.ensureSegment())
            self.rewritePoints([])  # the object starts over: no clicks
            self.startPump()

    def onNextObject(self):
        if self.ui.volumeSelector.currentNode() is not None:
            with slicer.util.tryWithErrorDisplay("SAM3DSegment: could not start a new object", waitCursor=False):
                self.ensureSegment(newSegment=True)

    def onSegmentationChanged(self, node):
        self.ui.segmentSelector.setCurrentNode(node)
        self.history = None
        self.updateButtons()

    def onSegmentChanged(self, segId):
        """The USER chose another target segment (SAM3DSegmentLib.slicer.TargetSegment): show its clicks, new history."""
        if self._markupsObserver is None or not self._target.selector_changed(segId or None):
            return
        if self.history is not None:
            self.history.clear()
        self.rewritePoints([])
        if segId and self.link.request_clicks(segId) is not None:
            self.startPump()

    def startPump(self):
        """Pump at the next event-loop turn (a fast reply is picked up at once), then every 30 ms while busy."""
        self.timer.start()
        qt.QTimer.singleShot(0, self.pump)

    def pump(self):
        engine = self.link.engine
        for job in self.link.poll():
            try:
                self.onJobFinished(job)
            except Exception:  # already shown to the user (tryWithErrorDisplay re-raises); keep pumping
                logging.exception("SAM3DSegment: handling a finished job failed")
        job = engine.current
        if job is not None and self._progress is None and time.perf_counter() - (job.started or time.perf_counter()) > 0.4:
            self._progress = slicer.util.createProgressDialog(labelText=self.link.PROGRESS_TEXT.get((job.context or {}).get("kind"), "Working..."), maximum=0)
            self._progress.connect("canceled()", engine.cancel_all)
        if self._progress is not None and engine.download:
            done, total = engine.download
            self._progress.labelText = f"Downloading the checkpoint: {done / 1e6:.0f} / {(total or 0) / 1e6:.0f} MB"
        if not engine.busy:
            self.timer.stop()
            if self._progress is not None:
                self._progress.close()
            self._progress = engine.download = None

    def onJobFinished(self, job):
        ctx, kind = job.context or {}, (job.context or {}).get("kind")
        if job.state == "failed":
            from SAM3DSegmentLib import slicer as sb
            logging.error(job.traceback)
            (self.ui.modelStatusLabel if kind == "load" else self.ui.statusLabel).text = sb.failure_text(job)
            slicer.util.errorDisplay(f"SAM3DSegment: {job.error}", detailedText=job.traceback)
        elif job.state != "done":
            self.ui.statusLabel.text = "Cancelled: the segment is unchanged."
        elif kind == "load":
            self.ui.modelStatusLabel.text = f"Loaded: {job.result['name']}"
            self.showDeviceWarning(None, job.result["warning"])
            self.ui.statusLabel.text = job.result.get("notice") or self.ui.statusLabel.text  # its limits, said once
            self.ui.excludeButton.setChecked(self.ui.excludeButton.checked and self.link.exclude_allowed)
            self.updateButtons()
        elif kind == "servers":
            self.remote.show_reports(job.result)
        elif kind == "find_all":
            with slicer.util.tryWithErrorDisplay("SAM3DSegment: could not add the segments", waitCursor=False):
                self.findAll.show_result(job)
        elif kind == "points" and ctx["segment"] == self._target.segment_id:
            self.rewritePoints(job.result)
        elif kind == "refine" and ctx["segment"] == self._target.segment_id:
            self.history is None or self.history.clear()  # the segment's undo restarts here, as the engine's
            self.ui.statusLabel.text = f"Refining the segment ({ctx['voxels']} voxels): click Include / Exclude."
        elif kind in ("clicks", "reset", "undo", "redo"):
            with slicer.util.tryWithErrorDisplay("SAM3DSegment: could not write the segment", waitCursor=False):
                # undo/redo restore every segment exactly from the history when it holds that step
                update, clicks = self.link.write_result(job, self.history)
            if clicks is not None and ctx["segment"] == self._target.segment_id:
                self.rewritePoints(clicks)
            if update is not None and kind == "clicks":
                from SAM3DSegmentLib.inference.worker import describe_update
                self.ui.latencyLabel.text = describe_update(update, job.wall_s)

    def onLoadModel(self):
        with slicer.util.tryWithErrorDisplay("SAM3DSegment: could not load the model", waitCursor=False):
            self.remote.load(self.ui.modelComboBox.currentText, self.ui.checkpointPathLineEdit.currentPath.strip(),
                             self.ui.deviceComboBox.currentText)  # local, or on the remote servers
            self.ui.modelStatusLabel.text = "Loading..."
            self.startPump()

    def showDeviceWarning(self, device, warning=None):
        from SAM3DSegmentLib.models.device import device_warning
        warning = warning or (device_warning(device) if device else None)
        self.ui.deviceWarningLabel.text = warning or ""
        self.ui.deviceWarningLabel.visible = bool(warning)

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay("Installing dependencies failed.", waitCursor=True):
            from SAM3DSegmentLib import slicer as sb
            sb.ensure_dependencies()
            self.ui.modelStatusLabel.text = "Dependencies are installed."

    def onDiagnose(self):
        from SAM3DSegmentLib.cli.diagnose import diagnose_report
        text = diagnose_report({"loaded model": self.link.model_name or "none", "module": __file__})
        slicer.util.infoDisplay("SAM3DSegment diagnostics (details: copy into bug reports).", detailedText=text)

    def onExport(self, kind):
        from SAM3DSegmentLib import slicer as sb
        volume, seg, segId = self.currentNodes()
        path = sb.ask_export_path(kind, seg.GetName())
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.ui.statusLabel.text = f"Exported {sb.export_segmentation(kind, seg, volume, path)}"


class SAM3DSegmentTest(ScriptedLoadableModuleTest):
    """Whole click loop in Slicer on a synthetic volume with the small bundled "demo" model (CPU)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ClickLoop()

    def test_ClickLoop(self):
        import importlib.util
        if importlib.util.find_spec("torch") is None:  # e.g. the extension build machines
            self.skipTest("torch is not installed (press 'Install dependencies' in the module to run this test)")
        import numpy as np
        from SAM3DSegmentLib import slicer as sb
        k, j, i = np.indices((40, 64, 64))
        ijkToRas = np.diag([0.9, 0.9, 2.0, 1.0])
        phantom = np.where((k - 20) ** 2 / 4 + (j - 32) ** 2 + (i - 30) ** 2 < 144, 300, -100).astype(np.int16)
        volume = slicer.util.addVolumeFromArray(phantom, ijkToRAS=ijkToRas, name="phantom")
        slicer.util.selectModule("SAM3DSegment")
        widget = slicer.modules.sam3dsegment.widgetRepresentation().self()
        widget.ui.volumeSelector.setCurrentNode(volume)
        widget.ui.deviceComboBox.setCurrentText("cpu")
        widget.ui.modelComboBox.setCurrentText("demo")

        def step(action, *args):
            action(*args)
            widget.logic.waitIdle(widget.pump)
        step(widget.onLoadModel)
        self.assertIsNotNone(widget.link.model_name, widget.ui.modelStatusLabel.text)
        # the new point fires PointPositionDefined -> one decode in the engine process -> write-back on the GUI thread
        step(widget.positivePoints.AddControlPointWorld, vtk.vtkVector3d(*(ijkToRas @ [30, 32, 20, 1])[:3]))
        _, seg, segId = widget.currentNodes()
        engineMask = np.array(widget.link.engine.call("mask", segId))
        self.assertEqual(len(widget.link.engine.call("clicks", segId)), 1)
        self.assertTrue(np.array_equal(sb.read_segment(seg, segId, volume), engineMask))
        step(widget.onEdit, "undo")
        self.assertFalse(sb.read_segment(seg, segId, volume).any())
        self.assertEqual(widget.positivePoints.GetNumberOfControlPoints(), 0)
        step(widget.onEdit, "redo")
        self.assertTrue(np.array_equal(sb.read_segment(seg, segId, volume), engineMask))
        self.assertEqual(widget.positivePoints.GetNumberOfControlPoints(), 1)
        self.delayDisplay("SAM3DSegment click loop passed")
