"""The project files each DVC stage's code imports, against the code deps dvc.yaml lists.

    python -m pipeline.stage_deps            # prints each stage's expected code deps and any difference
    python -m pipeline.stage_deps --check    # exit status 1 when dvc.yaml differs (what the test asserts)

A stage's code is its ``python -m stages.<name>`` module and every project module it imports,
transitively: every ``import``/``from ... import`` anywhere in a file (inside functions too: a lazy
import still runs), and for ``a.b.c`` the package files ``a/__init__.py`` and ``a/b/__init__.py``
that Python runs first. Imports under ``if TYPE_CHECKING:`` never run and are not counted.
DVC reruns a stage when one of its deps changes, so listing exactly this closure makes an edit to
one module rerun the stages that run its code and no others.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
# Project files that cannot change a stage's outputs, left out of its deps. Empty: every file a
# stage imports can (even pipeline/__init__.py runs on every import).
NOT_DEPS: frozenset[str] = frozenset()


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a project module (``pipeline.io`` -> pipeline/io.py), or None if it is not one."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names of the modules a file's imports run (candidates; non-project ones drop out later)."""
    names: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return names


def closure(module: str, root: Path = ROOT) -> set[str]:
    """Repository-relative paths of the project files that importing ``module`` runs."""
    seen: set[str] = set()
    todo = [module]
    files: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = module_file(mod, root)
        if path is None:
            continue
        files.add(path.relative_to(root).as_posix())
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        todo.extend(_imported_names(tree, mod, path.name == "__init__.py"))
    return files


def stage_modules(dvc_yaml: Path) -> dict[str, tuple[str, list[str]]]:
    """stage (or foreach group) -> (its ``stages.*`` module, the deps dvc.yaml lists)."""
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    out = {}
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        m = re.search(r"python -m (stages\.[A-Za-z_]+)", body["cmd"])
        if not m:
            raise ValueError(f"{dvc_yaml}: stage {name}: cmd {body['cmd']!r} does not run a stages.* module")
        out[name] = (m.group(1), list(body.get("deps", [])))
    return out


def expected_code_deps(module: str, root: Path = ROOT) -> list[str]:
    return sorted(closure(module, root) - NOT_DEPS)


def differences(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """stage -> {"missing": [...], "extra": [...]} for every stage whose code deps differ."""
    out = {}
    for name, (module, deps) in stage_modules(root / "dvc.yaml").items():
        listed = {d for d in deps if d.split("/")[0] in PACKAGES}
        want = set(expected_code_deps(module, root))
        if listed != want:
            out[name] = {"missing": sorted(want - listed), "extra": sorted(listed - want)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml's code deps differ")
    args = parser.parse_args(argv)
    for name, (module, _) in stage_modules(ROOT / "dvc.yaml").items():
        deps = expected_code_deps(module)
        print(f"{name} ({module}, {len(deps)} files): [{', '.join(deps)}]")
    diff = differences()
    for name, d in diff.items():
        print(f"DIFFERS {name}: missing {d['missing']}, extra {d['extra']}", file=sys.stderr)
    return 1 if (diff and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
