"""The house rules a reader can check by eye, checked on every run: no module of ``pipeline/`` over
400 lines, no function of ``pipeline/`` or ``stages/`` over 80 lines (counted from its ``def`` line to
its last line, as formatted). A failure names each module or function that breaks a rule."""

from __future__ import annotations

import ast
from pathlib import Path

from repo_utils import PROJECT

MAX_MODULE_LINES = 400  # pipeline/ only: a stage module is its one stage
MAX_FUNCTION_LINES = 80


def _sources(root: Path, folder: str) -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


def long_modules(root: Path) -> list[str]:
    return [
        f"{p.relative_to(root).as_posix()} ({n} lines)"
        for p in _sources(root, "pipeline")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]


def long_functions(root: Path) -> list[str]:
    out = []
    for p in [*_sources(root, "pipeline"), *_sources(root, "stages")]:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"), filename=str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{p.relative_to(root).as_posix()}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_the_walk_finds_the_package_and_the_stages():
    names = {p.relative_to(PROJECT).as_posix() for f in ("pipeline", "stages") for p in _sources(PROJECT, f)}
    assert {"pipeline/schema.py", "pipeline/training/trainer.py", "stages/train.py"} <= names


def test_no_pipeline_module_is_over_400_lines():
    long = long_modules(PROJECT)
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def test_no_function_is_over_80_lines():
    long = long_functions(PROJECT)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them by job): {long}"


def test_the_checks_name_what_breaks_a_rule_and_only_that(tmp_path):
    """A probe tree: a function of exactly 80 lines and a module of exactly 400 pass; one line more fails,
    named with its file (and line and length)."""

    def function(name: str, lines: int) -> str:
        return f"def {name}():\n" + "".join(f"    x{i} = {i}\n" for i in range(lines - 1))

    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "fits.py").write_text(function("at_limit", 80) + "\n" * (400 - 80))
    (tmp_path / "pipeline" / "too_long.py").write_text("\n" * 3 + function("over", 81) + "\n" * (401 - 84))
    (tmp_path / "stages" / "stage.py").write_text("\n" * 500 + function("main", 81))  # a stage may be long
    assert long_modules(tmp_path) == ["pipeline/too_long.py (401 lines)"]
    assert long_functions(tmp_path) == ["pipeline/too_long.py:4 over (81 lines)", "stages/stage.py:501 main (81 lines)"]
