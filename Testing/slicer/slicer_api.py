"""Every name of the Slicer application's API the module and its Lib use, and where Slicer's sources define it.

The module runs inside 3D Slicer 5.8 to 5.12, where nothing of it can be run here; slicer-core covers MRML only. So
the names it reaches through ``slicer.*``, ``qt.*``, ``ctk.*``, ``SampleData.*``, the Lib's ``mrml.*`` (``slicer``
inside the application), node classes named in strings (``"vtkMRML..."``), the methods and signals of its Slicer and
CTK widgets (classes from the ``.ui`` file, the embedded ``qMRMLSegmentEditorWidget``) are collected from the code's
syntax tree (:func:`collect`) and kept in ``slicer_api.json`` with, for each, the source file and the pattern that
shows it there, checked in Slicer's git tags :data:`VERSIONS` (CTK names in the CTK commit each tag builds).

    python Testing/slicer/slicer_api.py --slicer /path/to/Slicer --ctk /path/to/CTK      # verify, add new names
    python Testing/slicer/slicer_api.py --slicer ... --ctk ... --check                    # verify only

A name the locator cannot place must be added to the JSON by hand, with its source and pattern, after reading the
sources: a new name is verified before it is used (Testing/slicer/test_slicer_api.py fails until then).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "ACECalibration"
REGISTRY = Path(__file__).with_name("slicer_api.json")
#: the Slicer releases every name is checked in: the oldest and the newest supported
VERSIONS = ("v5.8.1", "v5.12.3")
ROOTS = ("slicer", "qt", "ctk", "SampleData", "mrml")
_WIDGET_PREFIXES = ("qMRML", "ctk", "qSlicer")


# ------------------------------------------------------------------------------------------------------ collect
def _chain(node) -> str | None:
    """``a.b().c`` -> ``a.b.c``; None when the chain does not start at a plain name."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            return ".".join(reversed(parts))
        else:
            return None


def _ui_classes(ui_path: Path) -> dict:
    return {w.get("name"): w.get("class") for w in ET.parse(ui_path).iter("widget")}


def collect(files=None, ui_path=None) -> dict:
    """name -> sorted ["file:line", ...] for every Slicer-API name the given files use."""
    files = files or [MODULE_DIR / "ACECalibration.py"] + sorted((MODULE_DIR / "ACECalibrationLib").glob("*.py"))
    widgets = _ui_classes(ui_path or MODULE_DIR / "Resources" / "UI" / "ACECalibration.ui")
    widgets["segmentEditorWidget"] = "qMRMLSegmentEditorWidget"  # made in code: slicer.qMRMLSegmentEditorWidget()
    found: dict = {}

    def add(name: str, where: str) -> None:
        found.setdefault(name, set()).add(where)

    for path in files:
        tree = ast.parse(path.read_text())
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        chains = {}
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "slicer":
                for alias in node.names:
                    add(f"{node.module}.{alias.name}", where)
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"vtkMRML\w+", node.value)
            ):
                add(node.value, where)
            elif isinstance(node, ast.Attribute):
                c = _chain(node)
                if c:
                    chains[c] = where
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "connect"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                target = _chain(node.func.value) or ""
                owner = _widget_class(target, widgets)
                if owner:
                    add(f"{owner}:{node.args[0].value}", where)  # a signal of a Slicer / CTK widget
                elif target == "slicer.app":
                    add(f"slicer.app:{node.args[0].value}", where)
        for c, where in chains.items():
            if any(other.startswith(c + ".") for other in chains):
                continue  # a prefix of a longer chain: the longer one says more
            parts = c.split(".")
            if parts[0] in ROOTS:
                add(("slicer." + ".".join(parts[1:])) if parts[0] == "mrml" else c, where)
                continue
            owner = _widget_class(".".join(parts[:-1]), widgets)
            if owner and parts[-1] != "connect":
                add(f"{owner}.{parts[-1]}", where)
    return {k: sorted(v) for k, v in sorted(found.items())}


def _widget_class(target: str, widgets: dict) -> str | None:
    """The class of ``self.ui.name`` / ``self.widget.ui.name`` / ``self.segmentEditorWidget`` when it is Slicer's or
    CTK's (plain Qt widgets are Qt 5.15's and not listed)."""
    parts = target.split(".")
    if len(parts) >= 2 and parts[0] == "self" and parts[-2] == "ui" or target == "self.segmentEditorWidget":
        cls = widgets.get(parts[-1])
        if cls and cls.startswith(_WIDGET_PREFIXES):
            return cls
    return None


# ---------------------------------------------------------------------------------------------------- locate and verify
class Sources:
    """Read files of Slicer's (and CTK's) git repositories at a tag without checking anything out."""

    def __init__(self, slicer_repo, ctk_repo=None):
        self.slicer, self.ctk = Path(slicer_repo), (Path(ctk_repo) if ctk_repo else None)
        self._files: dict = {}
        self._cache: dict = {}

    def _git(self, repo, *args) -> str:
        r = subprocess.run(["git", f"--git-dir={repo}", *args], capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else ""

    def ctk_commit(self, tag: str) -> str:
        text = self.show("slicer", tag, "SuperBuild/External_CTK.cmake")
        m = re.search(r"Slicer_\$\{proj\}_GIT_TAG\s*\"([0-9a-f]{40})\"", text)
        return m.group(1) if m else ""

    def files(self, repo: str, tag: str) -> list:
        key = (repo, tag)
        if key not in self._files:
            where, rev = self._where(repo, tag)
            self._files[key] = self._git(where, "ls-tree", "-r", "--name-only", rev).splitlines() if rev else []
        return self._files[key]

    def _where(self, repo: str, tag: str):
        if repo == "ctk":
            return self.ctk, (self.ctk_commit(tag) if self.ctk else "")
        return self.slicer, tag

    def show(self, repo: str, tag: str, path: str) -> str:
        key = (repo, tag, path)
        if key not in self._cache:
            where, rev = self._where(repo, tag)
            self._cache[key] = self._git(where, "show", f"{rev}:{path}") if rev and where else ""
        return self._cache[key]

    def grep_python(self, tag: str, literal: str) -> str | None:
        out = self._git(self.slicer, "grep", "-l", "-F", literal, tag, "--", "*.py")
        hits = sorted(line.split(":", 1)[1] for line in out.splitlines() if ":" in line)
        base = [h for h in hits if h.startswith("Base/Python/")]
        return (base or hits or [None])[0]

    def header(self, repo: str, tag: str, cls: str) -> str | None:
        hits = sorted(f for f in self.files(repo, tag) if f.endswith(f"/{cls}.h"))
        return hits[0] if hits else None

    def holds(self, entry: dict, tag: str) -> bool:
        text = self.show(entry.get("repo", "slicer"), tag, entry["source"])
        return bool(text) and re.search(entry["pattern"], text, re.M) is not None


def locate(name: str, src: Sources, tag: str) -> dict | None:
    """Where Slicer's sources at ``tag`` define (or, for Qt names, use) ``name``: {"repo", "source", "pattern"}."""

    def entry(source, pattern, repo="slicer"):
        return {"repo": repo, "source": source, "pattern": pattern} if source else None

    if ":" in name:  # a signal
        owner, signal = name.split(":", 1)
        sig_name, args = signal.split("(", 1)
        arg = re.escape(args.rstrip(")").replace("*", "").strip())
        pattern = rf"void\s+{sig_name}\s*\(\s*(const\s+)?{arg}" if arg else rf"void\s+{sig_name}\s*\(\s*\)"
        if owner == "slicer.app":
            return entry(src.grep_python(tag, f'slicer.app.connect("{signal}"'), re.escape(f'"{signal}"'))
        repo = "ctk" if owner.startswith("ctk") else "slicer"
        header = src.header(repo, tag, owner)
        if header and re.search(pattern, src.show(repo, tag, header)):
            return entry(header, pattern, repo)
        # a Qt signal the widget inherits (QAbstractItemView::clicked, ...): Slicer's own Python connects to it
        return entry(src.grep_python(tag, f'"{signal}"'), re.escape(f'"{signal}"'))
    parts = name.split(".")
    if parts[0] == "slicer" and len(parts) >= 3 and parts[1] in ("util", "ScriptedLoadableModule", "i18n"):
        path = {
            "util": "Base/Python/slicer/util.py",
            "ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py",
            "i18n": "Base/Python/slicer/i18n.py",
        }[parts[1]]
        return entry(path, rf"^(def|class) {parts[2]}\b")
    if parts[0] == "slicer" and len(parts) == 3 and parts[1] == "parameterNodeWrapper":
        for f in src.files("slicer", tag):
            if (
                f.startswith("Base/Python/slicer/parameterNodeWrapper/")
                and f.endswith(".py")
                and re.search(rf"^(def|class) {parts[2]}\b", src.show("slicer", tag, f), re.M)
            ):
                return entry(f, rf"^(def|class) {parts[2]}\b")
        return None
    if parts[0] == "slicer" and len(parts) >= 2 and parts[1] == "mrmlScene":
        return entry(
            "Libs/MRML/Core/vtkMRMLScene.h", rf"\b{parts[2]}\b" if len(parts) > 2 else r"class.*vtkMRMLScene\b"
        )
    if parts[0] == "slicer" and len(parts) >= 2 and re.match(r"(vtk|q)\w+$", parts[1]):
        header = src.header("slicer", tag, parts[1])
        return entry(header, rf"\b{parts[2]}\b" if len(parts) > 2 else rf"class\s+(\w+\s+)?{parts[1]}\b")
    if parts[0] == "SampleData":
        return entry(
            "Modules/Scripted/SampleData/SampleData.py",
            rf"def {parts[-1]}\b" if len(parts) > 2 else rf"^class {parts[1]}\b",
        )
    if re.fullmatch(r"vtkMRML\w+", name):
        return entry(src.header("slicer", tag, name), rf"class\s+(\w+\s+)?{name}\b")
    if parts[0].startswith(_WIDGET_PREFIXES) and len(parts) == 2:
        repo = "ctk" if parts[0].startswith("ctk") else "slicer"
        header = src.header(repo, tag, parts[0])
        if header and re.search(rf"\b{parts[1]}\b", src.show(repo, tag, header)):
            return entry(header, rf"\b{parts[1]}\b", repo)
        # inherited from Qt (QTableView::selectRow, ...): Slicer's own Python calls it on its widgets
        return entry(src.grep_python(tag, f".{parts[1]}("), re.escape(f".{parts[1]}("))
    if parts[0] in ("qt", "ctk", "slicer"):  # Qt / CTK classes and application members: Slicer's own Python uses them
        hit = src.grep_python(tag, name)
        if hit:
            return entry(hit, re.escape(name))
        if len(parts) > 2:  # qt.QIcon.pixmap: the class is used, and the member is called on such objects
            literal = ".".join(parts[:2])
            if src.grep_python(tag, literal) and src.grep_python(tag, f".{parts[-1]}("):
                return entry(src.grep_python(tag, f".{parts[-1]}("), re.escape(f".{parts[-1]}("))
        return None
    return None


def load_registry() -> dict:
    return json.loads(REGISTRY.read_text()) if REGISTRY.is_file() else {"versions": list(VERSIONS), "names": {}}


def verify(registry: dict, src: Sources) -> list:
    """Problems: every entry's pattern must be found in its source at every version."""
    problems = []
    for name, e in registry["names"].items():
        for tag in registry["versions"]:
            if not src.holds(e, tag):
                problems.append(f"{name}: /{e['pattern']}/ not in {e.get('repo', 'slicer')}:{e['source']} at {tag}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slicer", required=True, help="Slicer's git directory (with tags)")
    ap.add_argument("--ctk", help="CTK's git directory (for ctk* widgets)")
    ap.add_argument("--check", action="store_true", help="verify only; do not add names")
    args = ap.parse_args(argv)
    src = Sources(args.slicer, args.ctk)
    registry = load_registry()
    used = collect()
    if not args.check:
        for name in used:
            if name in registry["names"]:
                continue
            found = [f for f in (locate(name, src, tag) for tag in VERSIONS) if f]
            both = [f for f in found if all(src.holds(f, t) for t in VERSIONS)]  # one source that holds in every tag
            if both:
                registry["names"][name] = both[0]
            else:
                print(f"cannot place {name}: add it by hand after reading Slicer's sources", file=sys.stderr)
        registry["names"] = {k: registry["names"][k] for k in sorted(registry["names"]) if k in used}
        REGISTRY.write_text(json.dumps(registry, indent=1) + "\n")
    problems = verify(registry, src)
    for p in problems:
        print(p, file=sys.stderr)
    missing = sorted(set(used) - set(registry["names"]))
    for m in missing:
        print(f"not verified: {m}", file=sys.stderr)
    print(f"{len(registry['names'])} names verified in {', '.join(registry['versions'])}")
    return 1 if problems or missing else 0


if __name__ == "__main__":
    sys.exit(main())
