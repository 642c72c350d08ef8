# Generated from server/acecal/client/results.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""What the client returns: the wire records of :mod:`acecal.protocol`, and an inference's reply with its volumes.

The records (:class:`~acecal.protocol.ModelInfo`, :class:`~acecal.protocol.Region`, :class:`~acecal.protocol.Summary`,
:class:`~acecal.protocol.InferenceReply`, ...) are the protocol's own: the client defines no second copy of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .geometry import Grid
from .protocol import VOLUMES, ClassSummary, InferenceReply, JobInfo, ModelInfo, Region, Summary

__all__ = ["InferenceResult", "InferenceReply", "ModelInfo", "Region", "Summary", "ClassSummary", "JobInfo"]


@dataclass
class InferenceResult:
    """What ``infer`` returns: the server's reply plus the volumes, as arrays and/or files.

    ``arrays[name]`` is a numpy array (z, y, x) on :attr:`grid` (the input's grid); ``paths[name]`` the NRRD written
    when an output folder was given. The reply's parts are attributes: ``result_id``, ``model_id``, ``labels``,
    ``grid``, ``summary``, ``regions``, ``files``, ``params``; :attr:`raw` is its JSON (also written as
    ``summary.json``).
    """

    reply: InferenceReply
    arrays: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    paths: Dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, data: Any) -> InferenceResult:
        """From the server's JSON reply (:class:`~acecal.errors.ProtocolError` when it is not one)."""
        return cls(InferenceReply.from_json(data))

    # --- the reply ----------------------------------------------------------------------------------------------
    @property
    def result_id(self) -> Optional[str]:
        return self.reply.result_id

    @property
    def model_id(self) -> str:
        return self.reply.model_id

    @property
    def labels(self) -> Dict[str, str]:
        """Label value as a string -> class name."""
        return self.reply.labels

    @property
    def grid(self) -> Grid:
        return self.reply.grid

    @property
    def summary(self) -> Summary:
        return self.reply.summary

    @property
    def regions(self) -> List[Region]:
        return self.reply.regions

    @property
    def files(self) -> Dict[str, str]:
        """Volume name -> URL path on the server."""
        return self.reply.files

    @property
    def params(self) -> Dict[str, Any]:
        return self.reply.params

    @property
    def raw(self) -> Dict[str, Any]:
        """The reply as JSON."""
        return self.reply.to_json()

    # --- the volumes --------------------------------------------------------------------------------------------
    @property
    def label_map(self) -> Optional[np.ndarray]:
        return self.arrays.get("labels")

    @property
    def confidence(self) -> Optional[np.ndarray]:
        return self.arrays.get("confidence")

    @property
    def uncertainty(self) -> Optional[np.ndarray]:
        return self.arrays.get("uncertainty")

    @property
    def flags(self) -> Optional[np.ndarray]:
        return self.arrays.get("flags")

    def missing_volumes(self) -> List[str]:
        """The volumes of :data:`~acecal.protocol.VOLUMES` not (yet) in :attr:`arrays`."""
        return [name for name in VOLUMES if self.arrays.get(name) is None]
