"""The sample case shipped with the extension, for Slicer's *Sample Data* module.

``ACECalHippocampus``: one T1 MRI crop of the hippocampus (``hippocampus_011`` of the Medical Segmentation Decathlon
Task04 training set, CC BY-SA 4.0; Antonelli et al., Nature Communications 13, 4128 (2022)), unmodified, plus its
reference segmentation (the dataset's label map as a Slicer segmentation with segments ``Anterior`` and
``Posterior``, named as the shipped hippocampus models name their labels, so *Evaluate* matches them). The case is
in the validation split of the shipped hippocampus models: they were not trained on it.

The files are in ``Resources/SampleData`` and reach Sample Data through ``file://`` URIs (Sample Data copies them
into its cache like any download; nothing is fetched from the network). :func:`sample_data_source` gives the
keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource``; the module calls it at start-up.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["CATEGORY", "SAMPLE_NAME", "FILES", "sample_data_source", "sha256", "write_reference_segmentation"]

CATEGORY = "ACECalibration"
SAMPLE_NAME = "ACECalHippocampus"
THUMBNAIL = "ACECalHippocampus.png"
#: file name -> (node name, Slicer file type, SHA256 of the shipped file)
FILES = {
    "ACECalHippocampus.nii.gz": (
        "ACECalHippocampus",
        "VolumeFile",
        "d1b0ec8ff9ad7a88605a913f5527802aa5c0a93e576836495b8bade25d017d5d",
    ),
    "ACECalHippocampusReference.seg.nrrd": ("ACECalHippocampus reference", "SegmentationFile", None),
}
#: label value -> segment name of the reference segmentation (the shipped hippocampus models' label names)
REFERENCE_LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}


def sample_dir(module_dir) -> Path:
    return Path(module_dir) / "Resources" / "SampleData"


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sample_data_source(module_dir) -> dict:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` (Slicer 5.8-5.12)."""
    folder = sample_dir(module_dir)
    names = list(FILES)
    return {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "thumbnailFileName": str(folder / THUMBNAIL),
        "uris": [(folder / n).resolve().as_uri() for n in names],
        "fileNames": names,
        "nodeNames": [FILES[n][0] for n in names],
        "loadFileTypes": [FILES[n][1] for n in names],
        "checksums": [f"SHA256:{FILES[n][2] or sha256(folder / n)}" for n in names],
    }


def write_reference_segmentation(image_path, label_path, out_path) -> None:
    """Regenerate the reference ``.seg.nrrd`` from the dataset's image and label map (slicer-core or Slicer).

    The label map is read with Slicer's own reader onto the image's grid; segments get the names, colours, label
    tags and terminology of a result of the module (:func:`.segmentation.create_segmentation_node`).
    """
    from . import nodes, segmentation
    from ._mrml import mrml

    scene = nodes.new_scene()
    volumes = []
    for path, cls in ((image_path, "vtkMRMLScalarVolumeNode"), (label_path, "vtkMRMLLabelMapVolumeNode")):
        node = scene.AddNewNodeByClass(cls)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise RuntimeError(f"could not read {path}")
        volumes.append(node)
    image, label = volumes
    if not nodes.volume_nodes_share_grid(image, label):
        raise ValueError("the label map is not on the image's grid")
    seg, _ = segmentation.create_segmentation_node(
        scene, image, nodes.array_from_volume_node(label), REFERENCE_LABELS, "reference", model_text="hippocampus"
    )
    writer = mrml.vtkMRMLSegmentationStorageNode()
    scene.AddNode(writer)
    writer.SetFileName(str(out_path))
    if not writer.WriteData(seg):
        raise RuntimeError(f"could not write {out_path}")
    scene.Clear(1)
