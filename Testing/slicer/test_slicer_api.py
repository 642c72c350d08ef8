"""Every Slicer-application name the module and its Lib use is in the verified list (Testing/slicer/slicer_api.json),
and the list holds in Slicer's own sources at v5.8.1 and v5.12.3 (where a Slicer clone is at hand)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import slicer_api

MIRRORS = Path(
    "/work/.mirror"
)  # where this project's machines keep clones; ACECAL_SLICER_GIT / ACECAL_CTK_GIT elsewhere


def test_every_name_the_module_uses_is_verified_and_none_is_stale():
    used = slicer_api.collect()
    registry = slicer_api.load_registry()
    assert tuple(registry["versions"]) == slicer_api.VERSIONS == ("v5.8.1", "v5.12.3")
    missing = sorted(set(used) - set(registry["names"]))
    assert not missing, (
        f"{missing} are used but not verified in Slicer's sources: run "
        "python Testing/slicer/slicer_api.py --slicer <Slicer git dir> --ctk <CTK git dir>"
    )
    stale = sorted(set(registry["names"]) - set(used))
    assert not stale, f"{stale} are listed but no longer used"
    for name, entry in registry["names"].items():
        assert entry["source"] and entry["pattern"] and entry.get("repo", "slicer") in ("slicer", "ctk"), name
    # the names that matter most are there: the embedded Segment Editor, Sample Data, the parameter node wrapper
    for name in (
        "qMRMLSegmentEditorWidget.setSourceVolumeNode",
        "SampleData.SampleDataLogic.registerCustomSampleDataSource",
        "slicer.parameterNodeWrapper.parameterNodeWrapper",
        "slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode",
        "slicer.vtkSegmentation.SourceRepresentationModified",
        "vtkMRMLSegmentEditorNode",
    ):
        assert name in used, name


def test_the_collector_finds_each_kind_of_name(tmp_path):
    ui = tmp_path / "w.ui"
    ui.write_text(
        '<ui><widget class="qMRMLWidget" name="top"><widget class="qMRMLTableView" name="table"/>'
        '<widget class="QComboBox" name="combo"/></widget></ui>'
    )
    code = tmp_path / "m.py"
    code.write_text(
        textwrap.dedent("""
        import qt, slicer
        from slicer.util import newHelper
        from ._mrml import mrml
        def f(self, scene):
            slicer.util.brandNew(1)
            mrml.vtkMRMLSliceNode.NewStaticMethod(scene)
            scene.AddNewNodeByClass("vtkMRMLFancyNode")
            self.ui.table.setSomething(None)
            self.ui.table.connect("rowPicked(int)", f)
            self.ui.combo.addItem("plain Qt: not listed")
            qt.QTimer().singleShot
            slicer.modules.colors.logic().GetThing()
    """)
    )
    found = slicer_api.collect([code], ui)
    assert {
        "slicer.util.newHelper",
        "slicer.util.brandNew",
        "slicer.vtkMRMLSliceNode.NewStaticMethod",
        "vtkMRMLFancyNode",
        "qMRMLTableView.setSomething",
        "qMRMLTableView:rowPicked(int)",
        "qt.QTimer.singleShot",
        "slicer.modules.colors.logic.GetThing",
    } <= set(found), sorted(found)
    assert not [n for n in found if "addItem" in n]


def _git_dir(env: str, name: str):
    path = os.environ.get(env) or (MIRRORS / name / "repo")
    return Path(path) if Path(path).exists() else None


def test_the_list_holds_in_slicers_sources():
    slicer_git = _git_dir("ACECAL_SLICER_GIT", "Slicer+Slicer")
    ctk_git = _git_dir("ACECAL_CTK_GIT", "commontk+CTK")
    if slicer_git is None or ctk_git is None:
        pytest.skip(
            "no Slicer/CTK git clones with their tags here: set ACECAL_SLICER_GIT and ACECAL_CTK_GIT (git "
            "clone https://github.com/Slicer/Slicer and https://github.com/commontk/CTK) to re-verify the list"
        )
    src = slicer_api.Sources(slicer_git, ctk_git)
    if not src.files("slicer", "v5.8.1") or not src.files("slicer", "v5.12.3"):
        pytest.skip(f"{slicer_git} lacks the tags v5.8.1 and v5.12.3")
    assert src.ctk_commit("v5.8.1") and src.ctk_commit("v5.12.3")
    registry = slicer_api.load_registry()
    assert slicer_api.verify(registry, src) == []
    # and the check can fail: a name Slicer never had is not found
    bogus = {
        "versions": registry["versions"],
        "names": {
            "slicer.util.noSuchFunction": {
                "repo": "slicer",
                "source": "Base/Python/slicer/util.py",
                "pattern": r"^def noSuchFunction\b",
            }
        },
    }
    assert len(slicer_api.verify(bogus, src)) == 2
    # a name only newer releases have is caught: slicer.packaging.pip_ensure is in 5.12.3, not in 5.8.1
    ensure = {"repo": "slicer", "source": "Base/Python/slicer/packaging.py", "pattern": r"^def pip_ensure\b"}
    assert src.holds(ensure, "v5.12.3") and not src.holds(ensure, "v5.8.1")
