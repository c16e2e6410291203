"""dvc.yaml's code deps are exactly the project files each stage's code imports (pipeline.stage_deps),
so an edit to one module reruns the stages that run it and no others."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline import stage_deps

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_code_deps_equal_the_import_closure():
    diff = stage_deps.differences()
    assert not diff, "dvc.yaml code deps differ from the imports (run python -m pipeline.stage_deps):\n" + "\n".join(
        f"{s}: missing {d['missing']}, extra {d['extra']}" for s, d in diff.items()
    )


def _command_modules() -> list[str]:
    """The package's own command-line tools (``python -m pipeline.<tool>``): a package's ``__main__`` and the
    modules with a main block."""
    return [
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "pipeline").rglob("*.py")
        if p.name == "__main__.py" or 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")
    ]


def test_every_project_module_belongs_to_some_stage_the_flows_or_a_tool():
    used = set()
    for module, _ in stage_deps.stage_modules(ROOT / "dvc.yaml").values():
        used |= stage_deps.closure(module)
    for module in _command_modules():
        used |= stage_deps.closure(module)
    files = {p.relative_to(ROOT).as_posix() for pkg in ("pipeline", "stages") for p in (ROOT / pkg).rglob("*.py")}
    assert files - used == set(), sorted(files - used)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_closure_follows_lazy_relative_and_package_imports_not_type_checking(tmp_path):
    _write(tmp_path, "pipeline/__init__.py", "")
    _write(tmp_path, "pipeline/a/__init__.py", "")
    _write(
        tmp_path,
        "pipeline/a/x.py",
        """
        from typing import TYPE_CHECKING
        from . import y
        if TYPE_CHECKING:
            from pipeline import typed_only
        def f():
            from pipeline.b import z  # lazy: still runs
    """,
    )
    _write(tmp_path, "pipeline/a/y.py", "import os\n")
    _write(tmp_path, "pipeline/b/__init__.py", "from pipeline.b.w import W\n")
    _write(tmp_path, "pipeline/b/w.py", "W = 1\n")
    _write(tmp_path, "pipeline/b/z.py", "")
    _write(tmp_path, "pipeline/typed_only.py", "")
    _write(tmp_path, "stages/__init__.py", "")
    _write(tmp_path, "stages/s.py", "from pipeline.a import x\n")
    assert stage_deps.closure("stages.s", tmp_path) == {
        "stages/__init__.py",
        "stages/s.py",
        "pipeline/__init__.py",
        "pipeline/a/__init__.py",
        "pipeline/a/x.py",
        "pipeline/a/y.py",
        "pipeline/b/__init__.py",
        "pipeline/b/w.py",
        "pipeline/b/z.py",
    }


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
    assert _cycles(_import_graph(tmp_path)) == [
        "pipeline.a -> pipeline.b -> pipeline.a",
        "pipeline.b -> pipeline.a -> pipeline.b",
    ]


def test_shared_types_and_the_ground_floor_are_leaves():
    """The modules every layer shares import nothing of the project; the settings import only settings, the
    model table and the loss hyperparameter table, and no stage imports the flows or their settings."""
    graph = _import_graph(ROOT)
    for leaf in (
        "pipeline.paths",
        "pipeline.judging.types",
        "pipeline.judging.answers",
        "pipeline.generation.types",
        "pipeline.model.builtin",
    ):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    allowed = {"pipeline.model.builtin", "pipeline.training.loss_hparams", "pipeline.analysis.toy_settings"}
    for module, imports in graph.items():
        if module.startswith("pipeline.settings."):
            assert all(m.startswith("pipeline.settings") or m in allowed for m in imports), (module, imports)
    for name, (module, _) in stage_deps.stage_modules(ROOT / "dvc.yaml").items():
        assert not [f for f in stage_deps.closure(module) if f.startswith("pipeline/flows/")], name


def test_the_command_prints_every_stage_and_checks_dvc_yaml():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stage_deps", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(" ")[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == set(stage_deps.stage_modules(ROOT / "dvc.yaml"))
    assert "stages/reference.py" in lines["reference"] and "pipeline/model/logprobs.py" in lines["reference"]
    assert "DIFFERS" not in proc.stderr
