"""The package's shape, checked from its source: no import cycle between modules, and the heavy or
environment-bound libraries imported only where they belong (Slicer/VTK only in ``slicer/``; torch only in
``models/``, ``inference/backends`` and ``train/``), so the library stays importable without Slicer and
without torch."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "SAM3DSegmentLib"
MAX_LINES = 400

TORCH_ALLOWED = ("SAM3DSegmentLib.models", "SAM3DSegmentLib.inference.backends", "SAM3DSegmentLib.train")
SLICER_ALLOWED = ("SAM3DSegmentLib.slicer",)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path):
    """Every module imported anywhere in the file (top level or inside functions): (absolute name, line)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            out.extend((f"{mod}.{a.name}", node.lineno) for a in node.names)
    return out


def _graph():
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for target, _ in _imports(m, p):
            if target in mods and target != m:
                graph[m].add(target)
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            # importing a package's submodule also runs the package's __init__: a module importing its own
            # package's __init__ (the parent) is not a cycle of ours to report
            if n.startswith(t + "."):
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if state.get(t) is None:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if state.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("lib,allowed", [("torch", TORCH_ALLOWED), ("slicer", SLICER_ALLOWED),
                                         ("vtk", SLICER_ALLOWED), ("qt", SLICER_ALLOWED)])
def test_heavy_libraries_are_imported_only_where_they_belong(lib, allowed):
    offenders = []
    for m, p in _modules().items():
        if m.startswith(allowed):
            continue
        for target, line in _imports(m, p):
            if target == lib or target.startswith(lib + "."):
                offenders.append(f"{p.relative_to(ROOT)}:{line} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_no_module_is_longer_than_one_sitting():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, "split these modules:\n" + "\n".join(long)
