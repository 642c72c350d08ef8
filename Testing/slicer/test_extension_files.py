"""Static checks of the extension's files (the parts only the Slicer application can run): CMake lists every script
and resource, the UI binds only existing parameter-node fields, the module file compiles and never stores the key."""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MOD = ROOT / "ACECalibration"


def _cmake_list(name: str) -> list[str]:
    text = (MOD / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({name}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "ACECalibration") for line in block.splitlines() if line.strip()]


def test_cmake_lists_every_script_and_resource():
    scripts = set(_cmake_list("MODULE_PYTHON_SCRIPTS"))
    on_disk = {str(p.relative_to(MOD)) for p in MOD.glob("*.py")} | {
        str(p.relative_to(MOD)) for p in (MOD / "ACECalibrationLib").glob("*.py")}
    assert scripts == on_disk
    resources = _cmake_list("MODULE_PYTHON_RESOURCES")
    assert all((MOD / r).is_file() for r in resources)
    on_disk_resources = {str(p.relative_to(MOD)) for p in (MOD / "Resources").rglob("*") if p.is_file()}
    assert set(resources) == on_disk_resources  # every resource is installed, nothing stale is listed
    cm = (MOD / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in cm and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cm
    top = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_DEPENDS "NA")' in top and "add_subdirectory(ACECalibration)" in top
    for script in re.findall(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", (MOD / "Testing/Python/CMakeLists.txt").read_text()):
        assert (MOD / "Testing/Python" / script).is_file()


def _parameter_fields() -> dict[str, str]:
    tree = ast.parse((MOD / "ACECalibration.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ACECalibrationParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_ui_binds_only_parameter_node_fields():
    fields = _parameter_fields()
    ui = ET.parse(MOD / "Resources/UI/ACECalibration.ui")
    bound = {}
    for w in ui.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[w.get("name")] = p.find("string").text
    assert set(bound.values()) <= set(fields), set(bound.values()) - set(fields)
    assert {"inputVolume", "uncertaintyThreshold", "confidenceDisplayThreshold"} <= set(bound.values())
    assert not any("key" in f.lower() for f in fields)  # the API key is never a (saved) parameter
    names = {w.get("name") for w in ui.iter("widget")}
    source = (MOD / "ACECalibration.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used <= names, used - names  # every widget the code touches exists in the .ui
    api_key = next(w for w in ui.iter("widget") if w.get("name") == "apiKeyLineEdit")
    assert any(p.get("name") == "echoMode" and p.find("enum").text == "QLineEdit::Password" for p in api_key.findall("property"))


def test_module_classes_and_icon():
    tree = ast.parse((MOD / "ACECalibration.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"ACECalibration", "ACECalibrationWidget", "ACECalibrationLogic", "ACECalibrationTest"} <= set(classes)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "runTest" for n in classes["ACECalibrationTest"].body)
    png = (MOD / "Resources/Icons/ACECalibration.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (128, 128)
    entry = json.loads((ROOT / "ACECalibration.json").read_text())
    assert {"category", "scm_url"} <= set(entry)
