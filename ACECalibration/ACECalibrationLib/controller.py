"""The module's state machine without Qt: what every button does, and what the GUI shows.

The widget (``ACECalibration.py``) only binds Qt signals to the methods here and mirrors the state into its widgets;
tests drive the same object headless on slicer-core against a real server. Rules it keeps:

- **Never block the GUI thread on the network.** Every call to the server (connect, models, inference, uploads, job
  following, evaluation) runs on a :class:`~.worker.Task`; :meth:`Controller.poll` (a ``QTimer`` in the widget)
  collects finished tasks and touches MRML on the GUI thread only. Interactive calls use short timeouts and no
  retries (:data:`.logic.INTERACTIVE`); nothing retries behind the user's back.
- **Cancel stops the work.** A segmentation or evaluation runs on its own :class:`~.transport.AbortableSession`;
  *Cancel* aborts its connections, so the worker unwinds at once and the server sees the client leave (it drops the
  queued inference or stops the running one at its next sliding-window batch). Until the
  worker has really ended the state is ``cancelling`` and no second run starts.
- **The scene can go away at any time.** :meth:`scene_closing` cancels the scene-bound tasks, drops the review,
  the result, the fine-tuning pairs and the task's input; a result that arrives later is discarded. A result whose
  input volume was deleted meanwhile is discarded with a message (and the run is cancelled as soon as the deletion is
  seen).
- **Images leave the computer only with consent** (once per server, remembered), and a key that would travel over
  plain http to another computer is confirmed first (once per server and session).
- **Every failure becomes a message** for a clinician (:func:`.logic.user_message`), with the details behind it.
- **The server's default model is selected** when the models are listed (``/models`` marks it), unless the user chose
  a model before: that choice is remembered in the settings and wins whenever the server offers it.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any

from . import display, logic, regions, settings
from .client.protocol import (
    BACKGROUND_LABEL,
    EVAL_AGGREGATE,
    HEALTH_DEVICE,
    HEALTH_VERSION,
    JOB_SUCCEEDED,
    METRIC_NAMES,
    ModelInfo,
)
from .finetune import evaluate_case, start_finetune, training_pair
from .review import ReviewSession
from .transport import AbortableSession
from .worker import Cancelled, Task

__all__ = ["View", "Controller", "IDLE", "RUNNING", "CANCELLING", "OVERLAYS"]

IDLE, RUNNING, CANCELLING = "idle", "running", "cancelling"
NOT_CONNECTED, CONNECTING, CONNECTED, CONNECTION_FAILED = "not connected", "connecting", "connected", "failed"
#: What the slice views' foreground shows.
OVERLAY_CONFIDENCE, OVERLAY_UNCERTAINTY, OVERLAY_NONE = "confidence", "uncertainty", "none"
OVERLAYS = (OVERLAY_CONFIDENCE, OVERLAY_UNCERTAINTY, OVERLAY_NONE)


class View:
    """What the controller tells the GUI. The widget implements it, tests record it; called on the GUI thread only.

    The defaults do nothing and refuse every question (a headless caller sends nothing it was not allowed to)."""

    def changed(self) -> None:
        """The state changed: re-read the controller's properties (buttons, texts, progress)."""

    def error(self, title: str, message: str, details: str = "") -> None:
        """A failure the user must see (a dialog)."""

    def confirm(self, title: str, question: str, details: str = "") -> bool:
        """A yes/no question (a modal dialog). False = no."""
        return False

    def result_ready(self, result) -> None:
        """A result is displayed (bind the tables, the Segment Editor)."""

    def region_selected(self, row: int) -> None:
        """The current region changed (select its row)."""

    def evaluation_ready(self, text: str, png_path: str) -> None:
        """An evaluation finished: metrics text and the reliability diagram (a PNG file, '' if none)."""


@dataclass
class _Run:
    """One background task and what it needs afterwards."""

    task: Task
    session: AbortableSession | None = None
    volume: Any = None
    url: str = ""
    extra: dict = field(default_factory=dict)


class Controller:
    """The ACECalibration module's state. ``scene``: the MRML scene; ``store``: QSettings (or
    :class:`.settings.MemorySettings`); ``view``: a :class:`View`."""

    def __init__(self, scene, store, view: View | None = None, api_key: str | None = None):
        self.scene = scene
        self.store = store
        self.view = view or View()
        self.server_url = settings.last_server_url(store)
        self.api_key = api_key if api_key is not None else settings.api_key_from_environment()
        self.connection_state = NOT_CONNECTED
        self.connection_text = ""
        self.models: dict = {}  # model id -> the server's description of it (a ModelInfo)
        self.model_id = ""
        self.status_text = ""
        self.segment_state = IDLE
        self.segment_progress: tuple = (0.0, "")
        self.result: logic.SegmentationResult | None = None
        self.review: ReviewSession | None = None
        self.pairs: list = []  # (volume node, segmentation node)
        self.finetune_state = IDLE
        self.finetune_progress = 0.0
        self.finetune_log: list = []
        self.evaluate_state = IDLE
        self.evaluation_text = ""
        self._connect: _Run | None = None
        self._segment: _Run | None = None
        self._finetune: _Run | None = None
        self._evaluate: _Run | None = None
        self._clear_key_ok: set = set()
        self._select_after_connect = ""
        self._figures: list = []

    # ============================================================================================== state for the GUI
    @property
    def active(self) -> bool:
        """True while a task runs (the widget keeps polling)."""
        return any(r is not None for r in (self._connect, self._segment, self._finetune, self._evaluate))

    @property
    def can_segment(self) -> bool:
        return self.segment_state == IDLE and bool(self.model_id) and self.connection_state == CONNECTED

    @property
    def model(self) -> ModelInfo | None:
        """The selected model's description (None when none is selected)."""
        return self.models.get(self.model_id)

    @property
    def model_labels(self) -> dict:
        """The selected model's labels (value as a string -> name); empty when none is selected."""
        return dict(self.model.labels) if self.model is not None else {}

    def model_label(self, model_id: str) -> str:
        """How a model is listed: its id, marked when it is the server's default."""
        m = self.models.get(model_id)
        return f"{model_id} (default)" if m is not None and m.default else model_id

    def model_description(self, model_id: str | None = None) -> str:
        """One line about a model: its loss, labels and measured validation metrics."""
        m = self.models.get(model_id or self.model_id)
        if m is None:
            return ""
        names = ", ".join(m.labels[k] for k in sorted(m.labels, key=int) if k != BACKGROUND_LABEL)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in m.metrics.items() if isinstance(v, (int, float)))
        default = " The server's default model." if m.default else ""
        return (
            f"Loss: {m.loss or '?'}. Labels: {names or '?'}. Measured on validation: {shown or 'no metrics'}.{default}"
        )

    def _changed(self) -> None:
        self.view.changed()

    def _status(self, text: str) -> None:
        self.status_text = text
        self._changed()

    def _fail(self, title: str, exc: BaseException, url: str = "") -> str:
        message = logic.user_message(exc, url or self.server_url)
        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.status_text = message
        self.view.error(title, message, details)
        self._changed()
        return message

    # ============================================================================================== server and models
    def set_server(self, url: str) -> None:
        """The user typed or chose a server address (checked when used)."""
        text = (url or "").strip()
        try:
            text = settings.normalize_server_url(text)
        except ValueError:
            pass
        if text != self.server_url:
            self.server_url = text
            self.connection_state, self.connection_text, self.models, self.model_id = NOT_CONNECTED, "", {}, ""
            self._changed()

    def set_api_key(self, key: str) -> None:
        """The key lives here, in memory, and nowhere else."""
        if (key or "") != (self.api_key or ""):
            self.api_key = key or ""
            if self.connection_state == CONNECTED:
                self.connection_state, self.connection_text = NOT_CONNECTED, ""
            self._changed()

    def _checked_url(self) -> str | None:
        try:
            return settings.normalize_server_url(self.server_url)
        except ValueError as e:
            self.connection_state, self.connection_text = CONNECTION_FAILED, str(e)
            self._status(str(e))
            return None

    def _may_send_key(self, url: str, ask: bool = True) -> bool:
        """A key about to travel in clear text to another computer is confirmed first (once per server)."""
        if not settings.key_sent_in_clear(url, self.api_key) or url in self._clear_key_ok:
            return True
        if ask and self.view.confirm(
            "API key sent unencrypted",
            f"The API key would be sent unencrypted (plain http) to {url}, another computer: anyone on the "
            "network path could read it. Use an https address if the server has one. Send it anyway?",
        ):
            self._clear_key_ok.add(url)
            return True
        self._status("Not sent: the API key would have travelled unencrypted.")
        return False

    def _may_upload(self, url: str, what: str) -> bool:
        """Images leave this computer only with the user's consent, asked once per server and remembered."""
        if settings.has_upload_consent(self.store, url):
            return True
        if self.view.confirm(
            "Send images to another computer?",
            f"{what} sends image data to the server at {url}, which is not this computer. Only send images "
            "there if it is allowed for these data (e.g. the server is inside your institution). Node names and "
            "patient information are not sent. Send images to this server (remembered for this server)?",
        ):
            settings.remember_upload_consent(self.store, url)
            return True
        self._status("Not sent: no consent to send images to this server.")
        return False

    def connect(self, quiet: bool = False) -> bool:
        """*Connect*: health and models of the server, on a worker thread. ``quiet`` (entering the module)
        asks nothing: it skips a connection that would need a question. Returns True when a connection started."""
        if self._connect is not None:
            return False
        url = self._checked_url()
        if url is None or not self._may_send_key(url, ask=not quiet):
            return False
        if not quiet:
            try:
                settings.remember_server_url(self.store, url)
            except ValueError as e:  # pragma: no cover - the URL was normalised above
                self._status(str(e))
                return False
        client = logic.make_client(url, self.api_key, **logic.INTERACTIVE)

        def work(ctx):
            health = client.health()
            ctx.check()
            return health, client.models()

        self._connect = _Run(Task(work, name="ACECalibration connect").start(), url=url)
        self.connection_state, self.connection_text = CONNECTING, f"Connecting to {url}..."
        self._changed()
        return True

    def _finish_connect(self, run: _Run) -> None:
        try:
            health, models = run.task.result(0)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            self.connection_state = CONNECTION_FAILED
            self.connection_text = logic.user_message(e, run.url)
            self.models, self.model_id = {}, ""
            self._changed()
            return
        if run.url != settings.normalize_server_url(self.server_url):
            return  # the user moved to another server meanwhile
        self.models = {m.id: m for m in models}
        self.model_id = self._model_to_select()
        self.connection_state = CONNECTED
        default = self.default_model_id
        self.connection_text = (
            f"Connected to {run.url}: server {health.get(HEALTH_VERSION, '?')}, "
            f"{health.get(HEALTH_DEVICE, '?')}; {len(self.models)} model(s)"
            + (f", default {default}." if default else ".")
        )
        if not self.models:
            self.connection_text += " The server has no models."
        self._changed()

    @property
    def default_model_id(self) -> str:
        """The server's default model (``""`` when it names none: no models, or a server older than defaults)."""
        return next((m.id for m in self.models.values() if m.default), "")

    def _model_to_select(self) -> str:
        """After listing the models: a model just fine-tuned, else the one selected now, else the one the user chose
        last time (remembered), else the server's default, else the first; ``""`` when the server has none."""
        wanted = self._select_after_connect
        self._select_after_connect = ""
        for model_id in (wanted, self.model_id, settings.last_model(self.store), self.default_model_id):
            if model_id and model_id in self.models:
                return model_id
        return next(iter(self.models), "")

    def enter(self) -> None:
        """The module was opened: fetch the models if they are not there yet (asks nothing)."""
        if self.connection_state != CONNECTED and self._connect is None:
            self.connect(quiet=True)

    def select_model(self, model_id: str) -> None:
        """The user chose a model: selected now and remembered (it wins over the server's default next time)."""
        if model_id in self.models and model_id != self.model_id:
            self.model_id = model_id
            settings.remember_model(self.store, model_id)
            self._changed()

    # ============================================================================================== segmentation
    def _node_present(self, node) -> bool:
        return node is not None and node.GetScene() is self.scene and bool(self.scene.IsNodePresent(node))

    def previous_result_reviewed(self, volume) -> bool:
        """Does the last result of ``volume`` carry review verdicts (which a refill would discard)?"""
        table = logic.find_result_nodes(self.scene, volume).get(logic.ROLE_REGIONS)
        if table is None or table.GetTable() is None:
            return False
        return any(r.review != regions.UNREVIEWED for r in regions.regions_from_table(table))

    def segment(self, volume, threshold: float | None = None, new_nodes: bool = False) -> bool:
        """*Segment*: send ``volume`` to the selected model (``threshold`` > 0 overrides the model's threshold for
        flagging uncertain voxels). The previous result of the same volume is refilled unless ``new_nodes`` (or
        the user keeps a reviewed one). Returns True when the run started."""
        if self.segment_state != IDLE:
            self._status("A segmentation is still running or being cancelled: wait for it to end.")
            return False
        if volume is None or not self._node_present(volume):
            self._status("Choose the volume to segment.")
            return False
        if self.connection_state != CONNECTED or not self.model_id:
            self._status("Connect to a server and choose a model first.")
            return False
        url = self._checked_url()
        if url is None or not self._may_send_key(url) or not self._may_upload(url, "Segmenting"):
            return False
        reuse = not new_nodes
        if (
            reuse
            and self.previous_result_reviewed(volume)
            and not self.view.confirm(
                "Replace the reviewed result?",
                f"The last result of '{volume.GetName()}' has review marks or corrections. Replace it (No keeps it "
                "and puts the new result in new nodes)?",
            )
        ):
            reuse = False
        try:
            array, grid = logic.prepare_input(volume)  # GUI thread: a copy the worker can own
        except Exception as e:  # noqa: BLE001
            self._fail("Cannot segment this volume.", e)
            return False
        session = AbortableSession()
        client = logic.make_client(url, self.api_key, session=session)
        model_id = self.model_id
        params = threshold if threshold and threshold > 0 else None

        def work(ctx):
            return logic.infer(client, model_id, array, grid, params, ctx)

        task = Task(work, name=f"ACECalibration inference {model_id}").start()
        model = self.models.get(model_id)
        self._segment = _Run(
            task,
            session,
            volume,
            url,
            {"reuse": reuse, "model_text": f"{model_id} {model.description if model is not None else ''}"},
        )
        self.segment_state, self.segment_progress = RUNNING, (0.0, "Uploading")
        self._status(f"Segmenting '{volume.GetName()}' with {model_id}...")
        return True

    def cancel(self) -> None:
        """*Cancel*: stop the segmentation now (its connection is broken; the server sees the client leave)."""
        self._cancel_segment("Cancelled.")

    def _cancel_segment(self, message: str) -> None:
        run = self._segment
        if run is None or self.segment_state != RUNNING:
            return
        run.task.cancel()
        run.session.abort()
        self.segment_state = CANCELLING
        self._status(message)

    def _poll_segment(self) -> None:
        run = self._segment
        if run is None:
            return
        if self.segment_state == CANCELLING:
            if run.task.worker_finished(0):
                self._segment = None
                self.segment_state, self.segment_progress = IDLE, (0.0, "")
                self._changed()
            return
        if not self._node_present(run.volume):
            self._cancel_segment("The input volume was deleted: the segmentation was cancelled.")
            return
        self.segment_progress = run.task.progress
        if not run.task.done():
            self._changed()
            return
        self._segment = None
        self.segment_state, self.segment_progress = IDLE, (0.0, "")
        try:
            output = run.task.result(0)
        except Cancelled:
            self._status("Cancelled.")
            return
        except Exception as e:  # noqa: BLE001
            self._fail("Segmentation failed.", e, run.url)
            return
        self._show_output(run, output)

    def _show_output(self, run: _Run, output) -> None:
        volume = run.volume
        if not self._node_present(volume):
            self._status("The input volume was deleted while it was being segmented: the result was discarded.")
            return
        self._close_review()
        try:
            result = logic.create_result_nodes(
                self.scene,
                volume,
                output,
                self.display_threshold,
                self.overlay_opacity,
                show_in_slice_views=True,
                reuse=run.extra["reuse"],
                model_text=run.extra["model_text"],
            )
        except Exception as e:  # noqa: BLE001
            self._fail("Could not display the result.", e)
            return
        self._attach(result)
        s = result.summary
        self._status(
            f"Done: {len(result.regions)} uncertain region(s), "
            f"{s.uncertain_volume_ml if s else 0.0:.2f} ml flagged; mean confidence "
            f"{s.mean_confidence if s else float('nan'):.3f}."
        )
        self.view.result_ready(result)

    # ============================================================================================== result and review
    display_threshold = 0.9
    overlay_opacity = 0.5
    overlay = OVERLAY_CONFIDENCE

    def _attach(self, result) -> None:
        self.result = result
        self.review = ReviewSession(
            self.scene, result.regions_table_node, result.segmentation_node, result.shown_node_ids()
        )
        self.apply_display()

    def _close_review(self) -> None:
        if self.review is not None:
            self.review.close()
        self.review, self.result = None, None

    def input_changed(self, volume) -> None:
        """The input volume selection changed: show the result the scene holds for it (a saved scene, say)."""
        if (
            volume is not None
            and self.result is not None
            and self.result.confidence_node.GetAttribute(display.INPUT_VOLUME_ATTRIBUTE) == volume.GetID()
        ):
            return
        self._close_review()
        found = logic.result_from_nodes(self.scene, volume) if volume is not None else None
        if found is not None:
            self._attach(found)
            self.view.result_ready(found)
        self._changed()

    def _result_alive(self) -> bool:
        r = self.result
        return r is not None and all(
            self._node_present(n)
            for n in (
                r.segmentation_node,
                r.uncertain_node,
                r.confidence_node,
                r.uncertainty_node,
                r.regions_table_node,
            )
        )

    def set_display(
        self, threshold: float | None = None, opacity: float | None = None, overlay: str | None = None
    ) -> None:
        """The display controls: hide confidence above ``threshold``, overlay opacity, what the overlay shows."""
        if threshold is not None:
            self.display_threshold = float(threshold)
        if opacity is not None:
            self.overlay_opacity = float(opacity)
        if overlay is not None:
            if overlay not in OVERLAYS:
                raise ValueError(f"overlay must be one of {OVERLAYS}")
            self.overlay = overlay
        self.apply_display()

    def apply_display(self) -> None:
        """Restyle the current result's own volumes (never any other volume) and the relevant slice views."""
        if not self._result_alive():
            return
        r = self.result
        display.set_confidence_threshold(r.confidence_node, self.display_threshold, r.uncertainty_node)
        shown = {OVERLAY_CONFIDENCE: r.confidence_node, OVERLAY_UNCERTAINTY: r.uncertainty_node}.get(self.overlay)
        if shown is r.uncertainty_node:
            display.add_color_legend(r.uncertainty_node, "Uncertainty")
        display.show_color_legend(r.confidence_node, shown is r.confidence_node)
        display.show_color_legend(r.uncertainty_node, shown is r.uncertainty_node)
        volume = self.scene.GetNodeByID(r.confidence_node.GetAttribute(display.INPUT_VOLUME_ATTRIBUTE) or "")
        display.set_overlay(self.scene, volume, shown, self.overlay_opacity)

    def goto_region(self, row: int) -> None:
        if self.review is None or not self._result_alive():
            return
        try:
            point = self.review.goto(row)
        except IndexError:
            return
        self.status_text = (
            f"Region {row + 1} of {len(self.review)} ({self.review.state(row)}) at "
            f"R {point[0]:.1f}, A {point[1]:.1f}, S {point[2]:.1f} mm"
        )
        self.view.region_selected(row)
        self._changed()

    def step_region(self, forward: bool = True) -> None:
        if self.review is None or not len(self.review):
            self._status("No uncertain regions.")
            return
        n = len(self.review)
        row = (
            (self.review.current + (1 if forward else -1)) % n
            if self.review.current >= 0
            else (0 if forward else n - 1)
        )
        self.goto_region(row)

    def next_unreviewed(self) -> None:
        if self.review is None:
            return
        row = self.review.navigator.next_unreviewed_row()
        if row is None:
            self._status(f"All {len(self.review)} regions are reviewed.")
            return
        self.goto_region(row)

    def mark_region(self, state: str) -> None:
        """Set the current region's verdict (reviewed / accepted / corrected)."""
        if self.review is None or self.review.current < 0:
            self._status("Go to a region first.")
            return
        self.review.mark(state)
        counts = self.review.counts()
        self._status(
            f"Region {self.review.current + 1}: {state}. "
            f"{len(self.review) - counts[regions.UNREVIEWED]} of {len(self.review)} reviewed."
        )

    def update_statistics(self) -> None:
        """Recompute the per-segment volume and mean confidence from the segments as they are now."""
        from . import stats

        if not self._result_alive():
            return
        r = self.result
        volume = self.scene.GetNodeByID(r.confidence_node.GetAttribute(display.INPUT_VOLUME_ATTRIBUTE) or "")
        if volume is None:
            self._status("The input volume of this result is gone.")
            return
        stats.update_statistics_table(
            r.statistics_table_node,
            stats.segment_statistics(r.segmentation_node, volume, r.confidence_node, r.uncertain_node),
        )
        self._status("Segment statistics updated.")

    # ============================================================================================== fine-tuning
    def add_pair(self, volume, segmentation_node) -> None:
        if volume is None or segmentation_node is None:
            self._status("Choose an image and its corrected segmentation.")
            return
        self.pairs.append((volume, segmentation_node))
        self._changed()

    def remove_pair(self, index: int) -> None:
        if 0 <= index < len(self.pairs):
            del self.pairs[index]
            self._changed()

    def finetune(self, loss: str, epochs: int, **options: Any) -> bool:
        """*Fine-tune*: upload the pairs as a dataset and fine-tune the selected model on the server."""
        if self.finetune_state != IDLE:
            self._status("A fine-tuning job is still being followed.")
            return False
        if self.connection_state != CONNECTED or not self.model_id:
            self._status("Connect to a server and choose the base model first.")
            return False
        pairs = [(v, s) for v, s in self.pairs if self._node_present(v) and self._node_present(s)]
        if not pairs:
            self._status("Add at least one (image, corrected segmentation) pair first.")
            return False
        url = self._checked_url()
        if url is None or not self._may_send_key(url) or not self._may_upload(url, "Fine-tuning"):
            return False
        labels = self.model_labels
        try:
            data = [training_pair(v, s, labels) for v, s in pairs]
            client = logic.make_client(url, self.api_key)
            task = start_finetune(client, data, self.model_id, loss, int(epochs), **options)
        except Exception as e:  # noqa: BLE001
            self._fail("Could not start fine-tuning.", e, url)
            return False
        self._finetune = _Run(task, url=url)
        self.finetune_state, self.finetune_progress, self.finetune_log = RUNNING, 0.0, []
        self._status(f"Fine-tuning {self.model_id} on {len(data)} case(s)...")
        return True

    def cancel_finetune(self) -> None:
        """Cancel the job: the follower stops and cancels the job on the server (within one long-poll)."""
        if self._finetune is not None and self.finetune_state == RUNNING:
            self._finetune.task.cancel()
            self.finetune_state = CANCELLING
            self._status("Cancelling the fine-tuning job...")

    def _poll_finetune(self) -> None:
        run = self._finetune
        if run is None:
            return
        for message in run.task.messages[len(self.finetune_log) :]:
            self.finetune_log.append(message)
        self.finetune_progress = run.task.progress[0] or 0.0
        if self.finetune_state == CANCELLING:
            if run.task.worker_finished(0):
                self._finetune = None
                self.finetune_state = IDLE
                self.finetune_log.append("Cancelled; the job was cancelled on the server.")
                self._changed()
            return
        if not run.task.done():
            self._changed()
            return
        self._finetune = None
        self.finetune_state = IDLE
        try:
            job = run.task.result(0)
        except Exception as e:  # noqa: BLE001
            self.finetune_log.append(logic.user_message(e, run.url))
            self._fail("Fine-tuning failed.", e, run.url)
            return
        if job.status == JOB_SUCCEEDED and job.model_id:
            new = job.model_id
            self.finetune_log.append(f"New model: {new}")
            self._select_after_connect = new
            self.connection_state = NOT_CONNECTED
            self.connect(quiet=True)  # the model list, now with the new model, selected
            self._status(f"Fine-tuning finished: new model {new}.")
        else:
            self.finetune_log.append(f"Job ended: {job.status}. {job.error or ''}".strip())
            self._status(self.finetune_log[-1])

    # ============================================================================================== evaluation
    def evaluate(self, volume, reference) -> bool:
        """*Evaluate*: the selected model's calibration on ``volume`` against its reference segmentation."""
        if self.evaluate_state != IDLE:
            self._status("An evaluation is still running.")
            return False
        if self.connection_state != CONNECTED or not self.model_id:
            self._status("Connect to a server and choose a model first.")
            return False
        if volume is None or reference is None:
            self._status("Choose an input volume and its reference segmentation.")
            return False
        url = self._checked_url()
        if url is None or not self._may_send_key(url) or not self._may_upload(url, "Evaluating"):
            return False
        try:
            pair = training_pair(volume, reference, self.model_labels)
        except Exception as e:  # noqa: BLE001
            self._fail("Cannot evaluate this pair.", e, url)
            return False
        session = AbortableSession()
        client = logic.make_client(url, self.api_key, session=session)
        cleanup = logic.make_client(url, self.api_key, **logic.INTERACTIVE)
        model_id = self.model_id

        def work(ctx):
            return evaluate_case(client, pair, model_id, ctx=ctx, cleanup_client=cleanup)

        self._evaluate = _Run(Task(work, name="ACECalibration evaluation").start(), session, volume, url)
        self.evaluate_state, self.evaluation_text = RUNNING, "Evaluating..."
        self._changed()
        return True

    def cancel_evaluation(self) -> None:
        run = self._evaluate
        if run is not None and self.evaluate_state == RUNNING:
            run.task.cancel()
            run.session.abort()
            self.evaluate_state, self.evaluation_text = CANCELLING, "Cancelled."
            self._changed()

    def _poll_evaluate(self) -> None:
        run = self._evaluate
        if run is None:
            return
        if self.evaluate_state == CANCELLING:
            if run.task.worker_finished(0):
                self._evaluate = None
                self.evaluate_state = IDLE
                self._changed()
            return
        if not run.task.done():
            self.evaluation_text = run.task.progress[1] or "Evaluating..."
            self._changed()
            return
        self._evaluate = None
        self.evaluate_state = IDLE
        try:
            reply, png = run.task.result(0)
        except Cancelled:
            self.evaluation_text = "Cancelled."
            self._changed()
            return
        except Exception as e:  # noqa: BLE001
            self.evaluation_text = ""
            self._fail("Evaluation failed.", e, run.url)
            return
        m = reply.get(EVAL_AGGREGATE) or {}
        self.evaluation_text = ", ".join(
            f"{k.upper() if k != 'dice' else 'Dice'} {m[k]:.3f}" for k in METRIC_NAMES if m.get(k) is not None
        )
        path = ""
        if png:
            fd, path = tempfile.mkstemp(prefix="acecal-reliability-", suffix=".png")
            with os.fdopen(fd, "wb") as fh:
                fh.write(png)
            self._figures.append(path)
        self.view.evaluation_ready(self.evaluation_text, path)
        self._changed()

    # ============================================================================================== lifecycle
    def poll(self) -> bool:
        """Collect finished tasks and refresh progress (GUI thread, every ~100 ms). True while work remains."""
        run = self._connect
        if run is not None and run.task.done():
            self._connect = None
            self._finish_connect(run)
        self._poll_segment()
        self._poll_finetune()
        self._poll_evaluate()
        return self.active

    def scene_closing(self) -> None:
        """The scene is about to be closed: nothing may touch its nodes afterwards."""
        run = self._segment
        if run is not None:
            if self.segment_state == RUNNING and run.task.done():  # finished but not collected: drop the result
                self._segment, self.segment_state = None, IDLE
            else:
                self._cancel_segment("The scene was closed: the segmentation was cancelled.")
        if self._evaluate is not None:
            self.cancel_evaluation()
        self._close_review()
        self.pairs = []
        self._changed()

    def cleanup(self) -> None:
        """The module is going away (application exit, Reload): stop everything, remove temporary files."""
        self.scene_closing()  # a fine-tuning job goes on on the server: its model appears there when it succeeds
        for path in self._figures:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._figures = []
