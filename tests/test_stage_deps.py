"""dvc.yaml's code deps are exactly the project files each stage's code imports (scripts/stage_deps.py),
so an edit to one module reruns the stages that run it and no others."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("stage_deps", ROOT / "scripts/stage_deps.py")
stage_deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_deps)


def test_dvc_yaml_code_deps_equal_the_import_closure():
    diff = stage_deps.differences()
    assert not diff, "dvc.yaml code deps differ from the imports (run python scripts/stage_deps.py):\n" + \
        "\n".join(f"{s}: missing {d['missing']}, extra {d['extra']}" for s, d in diff.items())


def test_every_project_module_belongs_to_some_stage_or_the_flows():
    used = set()
    for module, _ in stage_deps.stage_modules(ROOT / "dvc.yaml").values():
        used |= stage_deps.closure(module)
    used |= stage_deps.closure("pipeline.flows.cli") | stage_deps.closure("pipeline.pages.__main__")
    files = {p.relative_to(ROOT).as_posix() for pkg in ("pipeline", "stages") for p in (ROOT / pkg).rglob("*.py")}
    assert files - used == {"pipeline/flows/__main__.py"} or files - used == set(), sorted(files - used)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_closure_follows_lazy_relative_and_package_imports_not_type_checking(tmp_path):
    _write(tmp_path, "pipeline/__init__.py", "")
    _write(tmp_path, "pipeline/a/__init__.py", "")
    _write(tmp_path, "pipeline/a/x.py", """
        from typing import TYPE_CHECKING
        from . import y
        if TYPE_CHECKING:
            from pipeline import typed_only
        def f():
            from pipeline.b import z  # lazy: still runs
    """)
    _write(tmp_path, "pipeline/a/y.py", "import os\n")
    _write(tmp_path, "pipeline/b/__init__.py", "from pipeline.b.w import W\n")
    _write(tmp_path, "pipeline/b/w.py", "W = 1\n")
    _write(tmp_path, "pipeline/b/z.py", "")
    _write(tmp_path, "pipeline/typed_only.py", "")
    _write(tmp_path, "stages/__init__.py", "")
    _write(tmp_path, "stages/s.py", "from pipeline.a import x\n")
    assert stage_deps.closure("stages.s", tmp_path) == {
        "stages/__init__.py", "stages/s.py", "pipeline/__init__.py", "pipeline/a/__init__.py", "pipeline/a/x.py",
        "pipeline/a/y.py", "pipeline/b/__init__.py", "pipeline/b/w.py", "pipeline/b/z.py"}


def _import_graph(root: Path, package: str = "pipeline") -> dict[str, set[str]]:
    """module -> the project modules its file imports (lazy imports included; a package's own parents,
    which Python runs first anyway, are not edges)."""
    import ast

    modules = {}
    for p in (root / package).rglob("*.py"):
        rel = p.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = p
    graph = {}
    for mod, path in modules.items():
        names = stage_deps._imported_names(ast.parse(path.read_text()), mod, path.name == "__init__.py")
        graph[mod] = {n for n in names if n in modules and n != mod and not mod.startswith(n + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.append(" -> ".join(trail + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    return sorted(set(found))


def test_no_import_cycles_in_the_package():
    """No module imports (directly or through others, lazy imports included) a module that imports it back."""
    assert not _cycles(_import_graph(ROOT)), "\n".join(_cycles(_import_graph(ROOT)))


def test_cycle_check_sees_a_lazy_cycle(tmp_path):
    _write(tmp_path, "pipeline/__init__.py", "")
    _write(tmp_path, "pipeline/a.py", "from pipeline.b import B\n")
    _write(tmp_path, "pipeline/b.py", "def f():\n    from pipeline import a\n")
    assert _cycles(_import_graph(tmp_path)) == ["pipeline.a -> pipeline.b -> pipeline.a",
                                                 "pipeline.b -> pipeline.a -> pipeline.b"]


def test_shared_types_and_the_ground_floor_are_leaves():
    """The modules every layer shares import nothing of the project; the settings import only settings, the
    model table and the loss hyperparameter table, and no stage imports the flows or their settings."""
    graph = _import_graph(ROOT)
    for leaf in ("pipeline.paths", "pipeline.judging.types", "pipeline.judging.answers",
                 "pipeline.generation.types", "pipeline.model.builtin"):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    allowed = {"pipeline.model.builtin", "pipeline.training.loss_hparams", "pipeline.analysis.toy_settings"}
    for module, imports in graph.items():
        if module.startswith("pipeline.settings."):
            assert all(m.startswith("pipeline.settings") or m in allowed for m in imports), (module, imports)
    for name, (module, _) in stage_deps.stage_modules(ROOT / "dvc.yaml").items():
        assert not [f for f in stage_deps.closure(module) if f.startswith("pipeline/flows/")], name
