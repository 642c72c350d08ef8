"""Static checks of the extension (the parts only the Slicer application runs): CMake installs every script and
resource, the UI binds only existing parameter-node fields, nothing pip-installs anything, the widget holds no logic,
*Reload* reloads the Lib, the sample case is what it says, and the Extensions Index entry is complete."""

from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MOD = ROOT / "ACECalibration"
WIDGET = MOD / "ACECalibration.py"


def _cmake_list(name: str) -> list:
    text = (MOD / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({name}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "ACECalibration") for line in block.splitlines() if line.strip()]


def _lib_sources() -> list:
    return [WIDGET] + sorted((MOD / "ACECalibrationLib").glob("*.py"))


def test_cmake_installs_every_script_resource_and_the_generated_client():
    scripts = set(_cmake_list("MODULE_PYTHON_SCRIPTS"))
    on_disk = {"ACECalibration.py"} | {str(p.relative_to(MOD)) for p in (MOD / "ACECalibrationLib").glob("*.py")}
    assert scripts == on_disk
    resources = set(_cmake_list("MODULE_PYTHON_RESOURCES"))
    assert resources == {str(p.relative_to(MOD)) for p in (MOD / "Resources").rglob("*") if p.is_file()}
    cm = (MOD / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in cm and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cm
    assert "CMake/generate_light_client.py" in cm and 'DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}' in cm
    assert not re.search(r"-m pip|pip (wheel|install)", cm)  # no wheel, no pip step
    for script in re.findall(
        r"slicer_add_python_unittest\(SCRIPT (\S+)\)", (MOD / "Testing/Python/CMakeLists.txt").read_text()
    ):
        assert (MOD / "Testing/Python" / script).is_file()


#: what the module, its Lib and its self-tests may import besides the standard library: the Lib itself (with its
#: generated client copy), numpy and requests (+ urllib3, requests' own) as Slicer ships them, and Slicer's modules
#: (slicer-core stands in for the application in these tests)
LIB_IMPORTS = {"ACECalibrationLib", "numpy", "requests", "urllib3", "slicer", "qt", "ctk", "vtk", "vtkmodules"}
LIB_IMPORTS |= {"SampleData", "slicer_core"}


def _absolute_imports(tree: ast.AST) -> list:
    """(line, top-level name) of every absolute import; relative ones stay inside the Lib by construction."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.lineno, (node.module or "").split(".")[0]))
    return out


def test_nothing_is_pip_installed_and_the_lib_imports_only_itself_numpy_requests_and_slicer():
    allowed = set(sys.stdlib_module_names) | LIB_IMPORTS
    sources = _lib_sources() + sorted((MOD / "Testing" / "Python").glob("*.py"))
    assert len(sources) > 15
    for path in sources:
        text = path.read_text()
        for word in ("pip_install", "pip_ensure", "slicer.packaging", "slicer.pydeps", "ensureClient"):
            assert word not in text, f"{path.name} uses {word}"
        imports = _absolute_imports(ast.parse(text))
        outside = [f"{path.name}:{line}: {name}" for line, name in imports if name not in allowed]
        assert not outside, outside
    # and the check can fail: the server package, torch or a library Slicer does not ship are caught
    bad = "import torch\nfrom acecal.client import ACEClient\nfrom scipy import ndimage\nfrom . import nodes\n"
    assert [name for _, name in _absolute_imports(ast.parse(bad)) if name not in allowed] == [
        "torch",
        "acecal",
        "scipy",
    ]


def _parameter_fields() -> dict:
    tree = ast.parse(WIDGET.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ACECalibrationParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def _ui_widgets() -> dict:
    return {w.get("name"): w for w in ET.parse(MOD / "Resources/UI/ACECalibration.ui").iter("widget")}


def test_ui_binds_only_parameter_node_fields_and_every_widget_the_code_uses_exists():
    fields = _parameter_fields()
    widgets = _ui_widgets()
    bound = {}
    for name, w in widgets.items():
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[name] = p.find("string").text
    assert set(bound.values()) == set(fields), set(bound.values()) ^ set(fields)
    assert not any("key" in f.lower() for f in fields)  # the API key is never a (saved) parameter
    used = set(re.findall(r"self\.(?:widget\.)?ui\.(\w+)", WIDGET.read_text()))
    assert used <= set(widgets) | {"segmentEditorLayout"}, used - set(widgets)
    layouts = {lay.get("name") for lay in ET.parse(MOD / "Resources/UI/ACECalibration.ui").iter("layout")}
    assert "segmentEditorLayout" in layouts  # where the embedded Segment Editor goes
    api_key = widgets["apiKeyLineEdit"]
    assert any(
        p.get("name") == "echoMode" and p.find("enum").text == "QLineEdit::Password"
        for p in api_key.findall("property")
    )
    # no free "confidence volume" selector: the display controls act on the module's own result volumes only
    assert not [n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox" and "onfidence" in n]
    overlay_items = [i.find("property/string").text for i in widgets["overlayComboBox"].findall("item")]
    tree = ast.parse(WIDGET.read_text())
    choices = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "OVERLAY_CHOICES")
    from ACECalibrationLib import controller

    assert [c.value for c in choices.elts] == [i.lower() for i in overlay_items] == list(controller.OVERLAYS)


def test_the_widget_holds_no_logic():
    tree = ast.parse(WIDGET.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ACECalibrationWidget")
    imported = {
        a.name for n in ast.walk(widget) for a in getattr(n, "names", []) if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    modules = {n.module for n in ast.walk(widget) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"ACECalibrationLib", "ACECalibrationLib.controller"}, modules
    assert imported <= {"settings", "Controller", "ACECalibrationLib"}, imported
    assert not [n for n in ast.walk(widget) if isinstance(n, ast.Try)]  # failures become messages in the controller
    text = ast.unparse(widget)
    for word in ("requests", "Task(", "threading", "client", "infer(", "create_result_nodes"):
        assert word not in text, word
    for fn in (n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name not in ("setup", "refresh")):
        assert fn.end_lineno - fn.lineno < 20, (
            f"{fn.name} is {fn.end_lineno - fn.lineno} lines: logic belongs in the Lib"
        )


def test_reload_reloads_the_lib(tmp_path):
    tree = ast.parse(WIDGET.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ACECalibrationWidget")
    reload = next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "onReload")
    assert "ACECalibrationLib.unload()" in ast.unparse(
        reload
    ) and "ScriptedLoadableModuleWidget.onReload" in ast.unparse(reload)
    # unload() makes the next import read the files again: an edited Lib file takes effect
    import shutil

    lib = tmp_path / "ACECalibrationLib"
    shutil.copytree(MOD / "ACECalibrationLib", lib, ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(f"""
        import sys, pathlib
        sys.path.insert(0, {str(tmp_path)!r})
        import ACECalibrationLib.regions as regions
        before = regions.COL_VOXELS
        path = pathlib.Path({str(lib / "regions.py")!r})
        path.write_text(path.read_text().replace('COL_VOXELS = "Voxels"', 'COL_VOXELS = "Edited"'))
        import ACECalibrationLib
        removed = ACECalibrationLib.unload()
        import ACECalibrationLib.regions as regions2
        print(before, regions2.COL_VOXELS, "ACECalibrationLib.regions" in removed, regions2 is not regions)
    """)
    r = subprocess.run([sys.executable, "-B", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Voxels", "Edited", "True", "True"]


def test_module_classes_icon_and_sample_data(tmp_path):
    tree = ast.parse(WIDGET.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"ACECalibration", "ACECalibrationWidget", "ACECalibrationLogic", "ACECalibrationTest"} <= set(classes)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "runTest" for n in classes["ACECalibrationTest"].body)
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in WIDGET.read_text()
    png = (MOD / "Resources/Icons/ACECalibration.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (128, 128)

    from ACECalibrationLib import sampledata

    src = sampledata.sample_data_source(MOD)
    assert src["category"] == "ACECalibration" and src["sampleName"] == "ACECalHippocampus"
    assert src["loadFileTypes"] == ["VolumeFile", "SegmentationFile"] and Path(src["thumbnailFileName"]).is_file()
    for uri, checksum in zip(src["uris"], src["checksums"], strict=True):
        path = Path(uri[len("file://") :])
        assert path.is_file() and checksum == f"SHA256:{sampledata.sha256(path)}"
    # the image is the fixture, unmodified; the reference segmentation regenerates byte for byte from its label map
    fixture = ROOT / "Testing/fixtures/hippocampus"
    shipped = sampledata.sample_dir(MOD)
    assert (shipped / "ACECalHippocampus.nii.gz").read_bytes() == (
        fixture / "images/hippocampus_011.nii.gz"
    ).read_bytes()
    out = tmp_path / "reference.seg.nrrd"
    sampledata.write_reference_segmentation(
        fixture / "images/hippocampus_011.nii.gz", fixture / "labels/hippocampus_011.nii.gz", out
    )
    assert out.read_bytes() == (shipped / "ACECalHippocampusReference.seg.nrrd").read_bytes()
    # named as the shipped models name their labels, so Evaluate matches the segments
    for bundle in sorted((ROOT / "models").glob("hippocampus-*/bundle.json")):
        assert json.loads(bundle.read_text())["labels"] == sampledata.REFERENCE_LABELS


def test_extensions_index_entry_and_metadata():
    entry = json.loads((ROOT / "ACECalibration.json").read_text())
    # Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: required keys, no others
    allowed = {
        "$schema",
        "category",
        "scm_url",
        "scm_revision",
        "scm_type",
        "build_dependencies",
        "build_subdirectory",
        "enabled",
        "tier",
    }
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == [] and 1 <= entry["tier"] <= 5
    top = (ROOT / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "(.*?)"\)', top, re.S))
    assert meta["EXTENSION_CATEGORY"] == entry["category"] and meta["EXTENSION_DEPENDS"] == "NA"
    assert len(meta["EXTENSION_DESCRIPTION"]) > 200 and "hippocampus" in meta["EXTENSION_DESCRIPTION"].lower()
    assert meta["EXTENSION_ICONURL"].endswith("ACECalibration/Resources/Icons/ACECalibration.png")
    for url in meta["EXTENSION_SCREENSHOTURLS"].split():
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url  # every screenshot is in the repository
    assert "add_subdirectory(ACECalibration)" in top
