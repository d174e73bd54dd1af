"""Packaging of the Slicer extension: CMake lists complete, module importable without torch, UI consistent.

An unlisted .py file or resource silently drops out of the packaged extension (works from a checkout, breaks
for every user who installs from the Extensions Manager), so the CMake lists are checked against the tree.
After adding files to SAM3DSegmentLib: ``python Testing/test_module_packaging.py --write-lib-lists``.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SAM3DSegment"
LIB_DIR = ROOT / "SAM3DSegmentLib"
MODULE_FILE = MODULE_DIR / "SAM3DSegment.py"
MAX_MODULE_LINES = 400  # the module stays thin, the work lives in SAM3DSegmentLib


def cmake_lists(path: Path) -> dict:
    """``set(NAME item item ...)`` blocks of a CMake file, ${MODULE_NAME} substituted, comments removed."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    variables = {m.group(1): m.group(2).strip() for m in re.finditer(r"set\(\s*(\w+)\s+([^\s)]+)\s*\)", text)}
    out = {}
    for m in re.finditer(r"set\(\s*(\w+)\s*\n(.*?)\)", text, re.S):
        items = m.group(2).split()
        out[m.group(1)] = [re.sub(r"\$\{(\w+)\}", lambda v: variables.get(v.group(1), v.group(0)), i) for i in items]
    return out


def tree_files(base: Path, rel_to: Path, python: bool):
    found = set()
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        for f in filenames:
            if f.endswith(".pyc") or f.startswith("."):
                continue
            if f.endswith(".py") == python:
                found.add(Path(dirpath, f).relative_to(rel_to).as_posix())
    return found


def packaging_problems(root: Path) -> list:
    """Files of ``root``/SAM3DSegment and ``root``/SAM3DSegmentLib missing from SAM3DSegment/CMakeLists.txt,
    listed files that do not exist, and files listed twice (one message per problem)."""
    module_dir, lib_dir = root / "SAM3DSegment", root / "SAM3DSegmentLib"
    lists = cmake_lists(module_dir / "CMakeLists.txt")
    problems = []
    checks = (
        ("MODULE_PYTHON_SCRIPTS", module_dir, tree_files(module_dir, module_dir, python=True)),
        ("MODULE_PYTHON_RESOURCES", module_dir,
         {p for p in tree_files(module_dir, module_dir, python=False) if p.startswith("Resources/")}),
        ("LIB_PYTHON_SCRIPTS", root, tree_files(lib_dir, root, python=True)),
        ("LIB_PYTHON_RESOURCES", root, tree_files(lib_dir, root, python=False)),
    )
    for var, base, present in checks:
        listed = set(lists.get(var, []))
        problems += [f"{var} lists {p} more than once" for p in sorted(listed) if lists[var].count(p) > 1]
        problems += [f"add {p} to {var} in SAM3DSegment/CMakeLists.txt" for p in sorted(present - listed)]
        problems += [f"{var} lists {p}, which does not exist" for p in sorted(listed) if not (base / p).is_file()]
    return problems


def test_every_module_and_lib_file_is_listed_in_cmake():
    assert packaging_problems(ROOT) == []


def test_packaging_check_catches_unlisted_and_missing_files(tmp_path):
    """The check above can fail: a copy of the tree with one file added and one listed file deleted."""
    import shutil

    for name in ("SAM3DSegment", "SAM3DSegmentLib"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    before = set(packaging_problems(tmp_path))
    (tmp_path / "SAM3DSegmentLib" / "brand_new.py").write_text("")
    (tmp_path / "SAM3DSegmentLib" / "core" / "geometry.py").unlink()
    (tmp_path / "SAM3DSegment" / "Resources" / "UI" / "Extra.ui").write_text("<ui/>")
    assert set(packaging_problems(tmp_path)) - before == {
        "add Resources/UI/Extra.ui to MODULE_PYTHON_RESOURCES in SAM3DSegment/CMakeLists.txt",
        "add SAM3DSegmentLib/brand_new.py to LIB_PYTHON_SCRIPTS in SAM3DSegment/CMakeLists.txt",
        "LIB_PYTHON_SCRIPTS lists SAM3DSegmentLib/core/geometry.py, which does not exist"}
    write_lib_lists(tmp_path)  # the fixer below lists the Lib's files again
    assert [p for p in packaging_problems(tmp_path) if "LIB_PYTHON" in p] == []


def write_lib_lists(root: Path = ROOT) -> None:
    """Rewrite LIB_PYTHON_SCRIPTS / LIB_PYTHON_RESOURCES in SAM3DSegment/CMakeLists.txt from the tree.
    Run ``python Testing/test_module_packaging.py --write-lib-lists`` after adding files to SAM3DSegmentLib."""
    path = root / "SAM3DSegment" / "CMakeLists.txt"
    text = path.read_text(encoding="utf-8")
    for var, python in (("LIB_PYTHON_SCRIPTS", True), ("LIB_PYTHON_RESOURCES", False)):
        items = "".join(f"  {p}\n" for p in sorted(tree_files(root / "SAM3DSegmentLib", root, python=python)))
        text, n = re.subn(rf"set\({var}\n(?:[ \t]*[^\n)]*\n)*  \)", f"set({var}\n{items}  )", text)
        assert n == 1, f"{var} block not found in {path}"
    path.write_text(text)


def test_module_cmake_ships_the_lib_next_to_the_module_and_registers_the_self_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT \$\{MODULE_NAME\}\.py\s*\)", text)
    block = re.search(r"ctkMacroCompilePythonScript\((.*?)\n\s*\)", text, re.S).group(1)
    assert "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/.." in block  # relative paths SAM3DSegmentLib/... kept
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in block
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in block and "NO_INSTALL_SUBDIR" in block


def test_extension_cmake_metadata():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    values = dict(re.findall(r"set\((EXTENSION_\w+)\s+(.+?)\)\s*(?:#.*)?\n", text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
                "EXTENSION_LICENSE_FILE", "EXTENSION_README_FILE"):
        assert values.get(key), f"{key} missing from CMakeLists.txt"
    assert values["EXTENSION_CATEGORY"].strip('"') == "Segmentation"
    assert "PyTorch" in values["EXTENSION_DEPENDS"]
    for key, name in (("EXTENSION_LICENSE_FILE", "LICENSE"), ("EXTENSION_README_FILE", "README.md")):
        assert values[key] == f"${{CMAKE_CURRENT_SOURCE_DIR}}/{name}"
        assert (ROOT / name).is_file(), f"{name} is missing"
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert re.search(r"add_subdirectory\(SAM3DSegment\)", text)
    assert text.index("find_package(Slicer REQUIRED)") < text.index("add_subdirectory(SAM3DSegment)") \
        < text.index("${Slicer_EXTENSION_CPACK}")


def test_catalog_entry():
    entry = json.loads((ROOT / "SAM3DSegment.json").read_text(encoding="utf-8"))
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-v1")
    assert entry["category"] == "Segmentation" and entry["scm_url"].startswith("https://")
    assert "PyTorch" in entry["build_dependencies"]
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "tier"}
    assert set(entry) <= allowed, f"the catalog schema forbids extra keys: {set(entry) - allowed}"


def test_icon_is_a_128_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources/Icons/SAM3DSegment.png") as im:
        assert im.format == "PNG" and im.size == (128, 128)


def test_ui_file_is_designer_xml_with_every_widget_the_module_uses():
    tree = ET.parse(MODULE_DIR / "Resources/UI/SAM3DSegment.ui")
    top = tree.getroot().find("widget")
    assert top.get("class") == "qMRMLWidget"
    names = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"\bui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used - names == set(), "the module uses widgets missing from SAM3DSegment.ui"
    classes = {w.get("class") for w in tree.iter("widget")}
    assert {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "ctkCollapsibleButton"} <= classes
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    assert {c for c in classes if c.startswith(("qMRML", "ctk"))} <= declared
    bound = {p.findtext("string") for w in tree.iter("widget")
             for p in w.findall("property") if p.get("name") == "SlicerParameterName"}
    module_fields = set(re.findall(r"^\s{4}(\w+): slicer\.", MODULE_FILE.read_text(encoding="utf-8"), re.M))
    assert bound and bound <= module_fields, "SlicerParameterName must name a parameter node field"


def test_module_stays_thin():
    n = len(MODULE_FILE.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_MODULE_LINES, f"SAM3DSegment.py has {n} lines; move logic into SAM3DSegmentLib"


def test_module_top_level_imports_are_light():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    allowed = {"logging", "os", "sys", "time", "qt", "slicer", "vtk", "ctk", "slicer.ScriptedLoadableModule",
               "slicer.util", "slicer.parameterNodeWrapper"}
    top_level = []
    for node in tree.body:
        for sub in ast.walk(node) if isinstance(node, ast.Try) else [node]:
            if isinstance(sub, ast.Import):
                top_level += [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom):
                top_level.append(sub.module)
    assert set(top_level) <= allowed, f"heavy or unexpected top-level imports: {set(top_level) - allowed}"
    for cls in ("SAM3DSegment", "SAM3DSegmentWidget", "SAM3DSegmentLogic", "SAM3DSegmentTest"):
        assert any(isinstance(n, ast.ClassDef) and n.name == cls for n in tree.body), f"class {cls} missing"
    assert not re.search(r"^\s*(import|from)\s+torch\b", MODULE_FILE.read_text(encoding="utf-8"), re.M)


STUBS = textwrap.dedent('''
    import sys, types
    sys.modules["torch"] = None            # "import torch" raises ImportError
    def mod(name, **attrs):
        m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m; return m
    class Base:
        def __init__(self, *a, **k): pass
        def getParameterNode(self): return None
    slicer = mod("slicer")
    mod("slicer.ScriptedLoadableModule", ScriptedLoadableModule=Base, ScriptedLoadableModuleLogic=Base,
        ScriptedLoadableModuleWidget=Base, ScriptedLoadableModuleTest=Base)
    slicer.util = mod("slicer.util", VTKObservationMixin=type("VTKObservationMixin", (), {{}}))
    for n in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLMarkupsFiducialNode"):
        setattr(slicer, n, type(n, (), {{}}))
    mod("slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls)
    mod("qt"); mod("vtk"); mod("ctk")
    import importlib.util
    spec = importlib.util.spec_from_file_location("SAM3DSegment", {path!r})
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    heavy = sorted(k for k in sys.modules if k.startswith("SAM3DSegmentLib.") or k == "torch" and sys.modules[k])
    logic = m.SAM3DSegmentLogic()          # creates the engine client (no process yet); no torch, no model code
    after = sorted(k for k in sys.modules if k.startswith("SAM3DSegmentLib.models") or k in ("SAM3DSegmentLib.inference.session",))
    logic.shutdown()
    print("HEAVY", heavy, "AFTER", after, "ROOT_ON_PATH", {root!r} in sys.path)
''')


def test_module_imports_without_torch_or_slicer(tmp_path):
    """Run from a checkout (the Lib not installed): the module finds the Lib, and importing it (and creating
    its logic) loads neither torch nor the model/session code."""
    code = STUBS.format(path=str(MODULE_FILE), root=str(ROOT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("HEAVY [] AFTER []"), line
    assert line.endswith("ROOT_ON_PATH True"), line


if __name__ == "__main__":
    if "--write-lib-lists" in sys.argv[1:]:
        write_lib_lists()
        print("\n".join(packaging_problems(ROOT)) or "SAM3DSegment/CMakeLists.txt lists every file")
