"""Inference results made from arrays, shaped as the server replies (for Lib tests that need no server).

The JSON goes through the wire protocol's own parser (``InferenceReply.from_json``), so a reply these helpers make is
one the real server could send.
"""

from __future__ import annotations

import numpy as np

from ACECalibrationLib.client import InferenceReply, InferenceResult
from ACECalibrationLib.client.geometry import lps_to_ras


def region_json(rid, cls, name, voxels, volume_ml, conf, centre_lps) -> dict:
    """One region as the server's ``describe_regions`` writes it (every key it sends)."""
    lps = np.asarray(centre_lps, float)
    return {
        "id": rid,
        "class": cls,
        "class_name": name,
        "voxels": voxels,
        "volume_ml": volume_ml,
        "mean_confidence": conf,
        "min_confidence": conf - 0.1,
        "centroid_ijk": [0.0, 0.0, 0.0],
        "centroid_lps": lps.tolist(),
        "centroid_ras": lps_to_ras(lps).tolist(),
        "bbox_ijk": {"min": [0, 0, 0], "max": [1, 1, 1]},
        "bbox_lps": {"min": [0, 0, 0], "max": [1, 1, 1]},
        "bbox_ras": {"min": [0, 0, 0], "max": [1, 1, 1]},
    }


def inference_result(
    grid, label, confidence, uncertainty, flags, label_names, regions=(), model_id="m1", result_id="r1"
) -> InferenceResult:
    """An :class:`InferenceResult` with the four arrays (z, y, x) on ``grid`` and a summary computed from them."""
    voxel_ml = float(grid.voxel_volume_ml)
    flagged = flags > 0
    classes = []
    for value, name in sorted(label_names.items(), key=lambda kv: int(kv[0])):
        mask = label == int(value)
        n, n_unc = int(mask.sum()), int((mask & flagged).sum())
        classes.append(
            {
                "value": int(value),
                "name": name,
                "voxels": n,
                "volume_ml": n * voxel_ml,
                "mean_confidence": float(confidence[mask].mean()) if n else None,
                "uncertain_voxels": n_unc,
                "uncertain_volume_ml": n_unc * voxel_ml,
            }
        )
    summary = {
        "classes": classes,
        "mean_confidence": float(confidence.mean()),
        "uncertain_voxels": int(flagged.sum()),
        "uncertain_volume_ml": float(flagged.sum()) * voxel_ml,
        "voxel_volume_ml": voxel_ml,
        "region_count": len(regions),
        "temperature": None,
        "calibrator": None,
    }
    reply = InferenceReply.from_json(
        {
            "result_id": result_id,
            "model_id": model_id,
            "labels": dict(label_names),
            "grid": grid.to_dict(),
            "summary": summary,
            "regions": list(regions),
            "files": {},
        }
    )
    return InferenceResult(
        reply, arrays={"labels": label, "confidence": confidence, "uncertainty": uncertainty, "flags": flags}
    )
