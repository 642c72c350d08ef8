"""Standard codes (DICOM / SNOMED CT terminology) on the segments, as Slicer stores them.

Slicer keeps a segment's terminology in the segment tag ``TerminologyEntry``
(``vtkSegment::GetTerminologyEntryTagName``) as one string:
``context~category~type~type modifier~anatomic context~region~region modifier``, each code written
``scheme^value^meaning`` (``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``, the same in Slicer 5.8.1
and 5.12.3). DICOM SEG export and the Segment Editor's terminology selector read it from there.

The codes below are copied from the terminology files Slicer ships
(``Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json`` and
``...-DICOM-Master.json``, identical in 5.8.1 and 5.12.3). A label named after a known structure gets that structure's
code; a label that is only a part of the structure the model segments (the hippocampus models' ``Anterior`` and
``Posterior``) gets the structure named in the model's id or description; anything else gets Slicer's default,
``Tissue``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Code", "Terminology", "STRUCTURES", "DEFAULT", "terminology_for", "TAG"]

#: ``vtkSegment::GetTerminologyEntryTagName()``
TAG = "TerminologyEntry"

GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


class Code(NamedTuple):
    scheme: str
    value: str
    meaning: str

    def serialized(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"


EMPTY = Code("", "", "")
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
TISSUE = Code("SCT", "85756007", "Tissue")


class Terminology(NamedTuple):
    context: str
    category: Code
    type: Code

    def serialized(self) -> str:
        """The ``TerminologyEntry`` tag value (no modifier, no anatomic region)."""
        return "~".join(
            [
                self.context,
                self.category.serialized(),
                self.type.serialized(),
                EMPTY.serialized(),
                ANATOMIC_CONTEXT,
                EMPTY.serialized(),
                EMPTY.serialized(),
            ]
        )


#: Slicer's default for a new segment (``vtkSegment``'s constructor): General Anatomy, Tissue / Tissue.
DEFAULT = Terminology(GENERAL_ANATOMY, TISSUE, TISSUE)

#: Structure name (lower case) -> terminology, from Slicer's terminology files.
STRUCTURES = {
    "hippocampus": Terminology(DICOM_MASTER, ANATOMICAL_STRUCTURE, Code("SCT", "5366008", "Hippocampus")),
    "liver": Terminology(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, Code("SCT", "10200004", "Liver")),
    "spleen": Terminology(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, Code("SCT", "78961009", "Spleen")),
}


def _words(text: str) -> set:
    return set(re.findall(r"[a-z]+", (text or "").lower()))


def terminology_for(label_name: str, model_text: str = "") -> Terminology:
    """The terminology of a segment named ``label_name`` made by a model described by ``model_text`` (its id and
    description)."""
    for structure, term in STRUCTURES.items():
        if structure in _words(label_name):
            return term
    for structure, term in STRUCTURES.items():
        if structure in _words(model_text):
            return term
    return DEFAULT
