"""The layout's rules, checked on the import graph of the source (every import, module level or not).

* no import circle anywhere;
* a level (``pipeline/levels/<L>/``, ``models/<L>/``) never imports another level;
* shared modules (everything in ``pipeline/`` but the levels and the few modules above them) never
  import a level: what levels share lives below them;
* ``models/`` never imports ``pipeline/``; ``regions/`` (site data) imports nothing of the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEVELS = ("pixel", "parcel", "patch")
# modules that sit above the levels: they put the levels together
ABOVE = ("cropmap.pipeline.workflow", "cropmap.pipeline.cli", "cropmap.pipeline.production")


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("pipeline", "models", "regions"):
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods["cropmap." + ".".join(parts)] = path
    return mods


MODULES = _modules()


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name: str, path: Path) -> set[str]:
    """Project modules that ``name`` imports (a ``from pkg import sub`` of a module counts as ``pkg.sub``)."""
    out: set[str] = set()
    pkg = _package(name, path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [(mod, a.name) for a in node.names]
        else:
            continue
        for mod, attr in targets:
            if not mod.startswith("cropmap"):
                continue
            if attr and f"{mod}.{attr}" in MODULES:
                out.add(f"{mod}.{attr}")
            elif mod in MODULES:
                out.add(mod)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _level_of(name: str) -> str | None:
    for lv in LEVELS:
        if name.startswith((f"cropmap.pipeline.levels.{lv}", f"cropmap.models.{lv}")) and name.split(".")[3 if "levels" in name else 2] == lv:
            return lv
    return None


def test_the_graph_is_read():
    assert "cropmap.pipeline.levels.pixel.stages" in GRAPH and "cropmap.models.registry" in GRAPH
    assert "cropmap.pipeline.levels.common" in GRAPH["cropmap.pipeline.levels.parcel.stages"]


def test_no_import_circle():
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if colour.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in colour:
                visit(m)
        stack.pop()
        colour[n] = 2

    for n in sorted(GRAPH):
        if n not in colour:
            visit(n)


def test_no_level_imports_another_level():
    bad = [(n, m) for n, deps in GRAPH.items() for m in deps
           if _level_of(n) and _level_of(m) and _level_of(n) != _level_of(m)]
    assert not bad, bad


def test_shared_modules_never_import_a_level():
    bad = [(n, m) for n, deps in GRAPH.items() for m in deps
           if n.startswith("cropmap.pipeline") and not _level_of(n) and not n.startswith(ABOVE)
           and m.startswith("cropmap.pipeline.levels.") and _level_of(m)]
    assert not bad, bad


def test_models_never_import_the_pipeline_and_regions_import_nothing_of_the_project():
    bad = [(n, m) for n, deps in GRAPH.items() for m in deps
           if (n.startswith("cropmap.models") and m.startswith("cropmap.pipeline"))
           or (n.startswith("cropmap.regions") and not m.startswith("cropmap.regions"))]
    assert not bad, bad


def test_the_checker_sees_a_circle_and_a_cross_level_import(tmp_path, monkeypatch):
    """The rules above can fail: a circle and a cross-level edge planted in a copy of the graph are found."""
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["cropmap.pipeline.fsio"].add("cropmap.pipeline.levels.pixel.stages")
    monkeypatch.setattr(__import__(__name__), "GRAPH", planted, raising=False)
    import sys

    mod = sys.modules[__name__]
    monkeypatch.setattr(mod, "GRAPH", planted)
    try:
        test_no_import_circle()
    except AssertionError as exc:
        assert "cropmap.pipeline.fsio" in str(exc)
    else:
        raise AssertionError("a planted circle went unseen")
    planted["cropmap.pipeline.levels.parcel.stages"].add("cropmap.models.pixel.stnet")
    try:
        test_no_level_imports_another_level()
    except AssertionError:
        pass
    else:
        raise AssertionError("a planted cross-level import went unseen")
