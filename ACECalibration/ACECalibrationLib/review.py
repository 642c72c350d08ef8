"""Reviewing a result region by region: the flagged regions are the worklist, each gets a verdict.

A :class:`ReviewSession` binds a result's regions table (the worklist, with its ``Review`` column), its anatomy
segmentation (what the clinician corrects in the embedded Segment Editor) and the navigator. Going to a region makes
it the current one; any edit of the segmentation while a region is current marks that region ``corrected``
(observed on the segmentation's ``SourceRepresentationModified`` event, which every Segment Editor effect fires
when it changes voxels). The verdicts live
in the table, so they are saved with the scene and come back with it.
"""

from __future__ import annotations

from typing import Iterable

from . import regions
from ._mrml import mrml

__all__ = ["ReviewSession"]


class ReviewSession:
    """The review of one result. Call :meth:`close` when done (it removes the segmentation observer)."""

    def __init__(self, scene, table_node, segmentation_node, shown_node_ids: Iterable[str] = ()):
        self.scene = scene
        self.table_node = table_node
        self.segmentation_node = segmentation_node
        self.navigator = regions.RegionNavigator(table_node, segmentation_node, shown_node_ids)
        self._segmentation = segmentation_node.GetSegmentation()
        self._observer = self._segmentation.AddObserver(
            mrml.vtkSegmentation.SourceRepresentationModified, self._on_modified
        )

    # --- the worklist ----------------------------------------------------------------------------------------------
    @property
    def current(self) -> int:
        """The current row (-1 before the first region was visited)."""
        return self.navigator.index

    def __len__(self) -> int:
        return len(self.navigator)

    def goto(self, row: int):
        """Make ``row`` current and centre the relevant slice views on it; returns the world RAS point."""
        return self.navigator.goto(row, self.scene)

    def step(self, forward: bool = True):
        return self.navigator.next(self.scene) if forward else self.navigator.previous(self.scene)

    def next_unreviewed(self):
        """Go to the next unreviewed region and return its row; None (and stay) when all are reviewed."""
        row = self.navigator.next_unreviewed_row()
        if row is not None:
            self.goto(row)
        return row

    def state(self, row: int) -> str:
        return regions.review_state(self.table_node, row)

    def mark(self, state: str, row: int | None = None) -> None:
        """Set the verdict of ``row`` (default: the current region)."""
        row = self.current if row is None else row
        if row < 0:
            raise IndexError("no region selected: go to a region first")
        regions.set_review_state(self.table_node, row, state)

    def counts(self) -> dict:
        """How many regions are in each review state."""
        out = {s: 0 for s in regions.REVIEW_STATES}
        for row in range(len(self)):
            out[self.state(row)] += 1
        return out

    # --- corrections ----------------------------------------------------------------------------------------------
    def _on_modified(self, caller, event) -> None:
        row = self.current
        if row >= 0 and self.table_node.GetScene() is not None and self.state(row) != regions.CORRECTED:
            regions.set_review_state(self.table_node, row, regions.CORRECTED)

    def close(self) -> None:
        if self._observer is not None:
            self._segmentation.RemoveObserver(self._observer)
            self._observer = None
