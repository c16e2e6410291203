"""Param overrides and DVC experiments.

- overrides are applied with the function behind ``dvc exp run -S`` (Hydra override grammar,
  comments in params.yaml kept);
- a run in the workspace is recorded with ``dvc exp save`` (and sent with ``dvc exp push``);
- sweep and scenario points are ``dvc exp run --temp`` experiments;
- :func:`experiments` reads them back from ``dvc exp show --json``, flattened for tables.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from pipeline.flows.dvc_process import (
    TIMED_OUT,
    DvcRun,
    StageFailed,
    StageTimeout,
    dvc_output,
    run_dvc,
)
from pipeline.settings.base import DEFAULT_PARAMS as PARAMS_FILE


# ============================================================================================ overrides
def format_value(value: Any) -> str:
    """A Python value in the Hydra override grammar that ``dvc exp run -S`` parses."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    s = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{s}'"


def override_args(overrides: Mapping[str, Any] | None) -> list[str]:
    """``{"train.variants.dpo.beta": 0.3}`` -> ``["train.variants.dpo.beta=0.3"]`` (the ``-S`` form). A
    key may start with ``+`` (add a new key) or ``~`` (delete), as with ``dvc exp run -S``."""
    return [f"{k}={format_value(v)}" for k, v in (overrides or {}).items()]


def apply_overrides(
    repo: str | os.PathLike, overrides: Mapping[str, Any] | None, params_file: str = PARAMS_FILE
) -> None:
    """Write overrides into params.yaml exactly as ``dvc exp run -S key=value`` does (it is the same DVC
    function; comments and key order are kept; an unknown key fails unless written ``+key``)."""
    args = override_args(overrides)
    if not args:
        return
    from dvc.utils.hydra import (
        apply_overrides as dvc_apply_overrides,  # DVC's own -S implementation
    )

    dvc_apply_overrides(str(Path(repo) / params_file), args)


# ============================================================================================ experiments
def uncached_outputs(repo: str | os.PathLike) -> list[str]:
    """Existing outputs with ``cache: false`` (metrics, plots): git files that an experiment commit must
    include (``dvc exp run`` stages them itself; ``dvc exp save`` needs them named)."""
    from dvc.repo import Repo

    root = Path(repo).resolve()
    with Repo(str(root)) as r:
        paths = {os.path.relpath(o.fs_path, root) for o in r.index.outs if not o.use_cache}
    return sorted(p for p in paths if (root / p).exists())


def exp_save(
    repo: str | os.PathLike,
    name: str,
    stages: Iterable[str],
    message: str | None = None,
    on_line: Callable[[str], Any] | None = None,
    *,
    tail_lines: int,
) -> str:
    """Record the workspace (params, dvc.lock, metrics) as the DVC experiment ``name``; it then shows in
    ``dvc exp show`` and comes back with ``dvc exp apply <name>``. Returns the name used (a suffix is
    added if the name is taken)."""
    include = [a for p in uncached_outputs(repo) for a in ("-I", p)]
    for attempt in range(3):
        exp = name if attempt == 0 else f"{name}-{os.urandom(2).hex()}"
        args = ["exp", "save", "-n", exp, *include, *(["-m", message] if message else []), *stages]
        run = run_dvc(args, repo, on_line, tail_lines=tail_lines)
        if run.returncode == 0:
            return exp
        if not any("conflicts with existing experiment" in line for line in run.tail):
            raise StageFailed(exp, run.returncode, run.tail, what="experiment save")
    raise StageFailed(name, 1, run.tail, what="experiment save")


def exp_push(
    repo: str | os.PathLike, git_remote: str, name: str, on_line: Callable[[str], Any] | None = None, *, tail_lines: int
) -> None:
    run = run_dvc(["exp", "push", git_remote, name], repo, on_line, tail_lines=tail_lines)
    if run.returncode:
        raise StageFailed(name, run.returncode, run.tail, what="experiment push")


# Points started side by side each take the main repository's DVC lock while DVC sets up their
# temporary copy or collects their result; on a loaded machine one can give up waiting ("Unable to
# acquire lock"). Such a failure is tried again, a few times, with growing pauses. A refused attempt
# may already have recorded the experiment's name, so a retry first removes it (the flows check up
# front that their names are new: the one removed is the refused attempt's own).
DVC_LOCK_MESSAGE = "Unable to acquire lock"
LOCK_TRIES = 5
_pause = time.sleep  # tenacity's pause between tries (tests replace it)


def _lock_busy(e: BaseException) -> bool:
    return (
        isinstance(e, StageFailed)
        and not isinstance(e, StageTimeout)
        and any(DVC_LOCK_MESSAGE in line for line in e.tail)
    )


def exp_run_temp(
    repo: str | os.PathLike,
    name: str,
    overrides: Mapping[str, Any],
    targets: Iterable[str] = (),
    on_line: Callable[[str], Any] | None = None,
    *,
    timeout_s: float,
    tail_lines: int,
) -> DvcRun:
    """One sweep point: ``dvc exp run --temp -n <name> -S k=v ... [targets]`` (a temporary copy of the
    repository, so points can run side by side; the cache and run-cache are shared). ``timeout_s``:
    wall-clock limit, 0 for none. A start refused by DVC's repository lock is tried again. A failed run
    whose own experiment DVC recorded is a success (:func:`_recorded`); the returned run's exit status and
    tail are then the other experiment's."""
    args = ["exp", "run", "--temp", "-n", name]
    for a in override_args(overrides):
        args += ["-S", a]
    for attempt in Retrying(
        retry=retry_if_exception(_lock_busy),
        stop=stop_after_attempt(LOCK_TRIES),
        wait=wait_exponential(multiplier=2, max=30),
        sleep=lambda s: _pause(s),
        reraise=True,
    ):
        with attempt:
            if attempt.retry_state.attempt_number > 1:
                run_dvc(["exp", "remove", name], repo, on_line, tail_lines=tail_lines)  # absent: fails, fine
            run = run_dvc([*args, *targets], repo, on_line, timeout_s or None, tail_lines=tail_lines)
            if run.returncode == TIMED_OUT:
                raise StageTimeout(name, None, run.tail, what="experiment", reason=f"timed out after {timeout_s:g} s")
            if run.returncode:
                if not any(DVC_LOCK_MESSAGE in line for line in run.tail) and _recorded(repo, name):
                    if on_line is not None:
                        on_line(
                            f"experiment {name} was recorded; the failure above is another queued experiment's, "
                            "which this `dvc exp run --temp` also ran (DVC's queue of temporary experiments)"
                        )
                    return run
                raise StageFailed(name, run.returncode, run.tail, what="experiment")
    return run


def _recorded(repo: str | os.PathLike, name: str) -> bool:
    """Whether DVC recorded the experiment ``name`` (it records one only after its pipeline succeeded).

    Points side by side share DVC's one queue of temporary experiments, and a ``dvc exp run --temp`` that
    has finished its own experiment goes on to run whatever is still queued there (``TempDirQueue.reproduce``
    loops until the queue is empty; two processes can take the same entry). Its exit status is then
    another point's: the point whose experiment was recorded succeeded, and the owner of the failed one
    reports that failure itself."""
    try:
        return bool(taken_names(repo, [name]))
    except Exception:  # noqa: BLE001 - no answer from DVC: count the failure as the point's own
        return False


def taken_names(repo: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that already name an experiment of the repository."""
    have = {e["name"] for e in experiments(repo)}
    return [n for n in names if n in have]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def experiments(repo: str | os.PathLike, all_commits: bool = False) -> list[dict[str, Any]]:
    """Every experiment of ``dvc exp show --json``: {name, rev, baseline, params, metrics, metric_files},
    with params flattened to dotted keys (of params.yaml), metrics to ``<file>:<dotted key>``, and
    metric_files each metrics file's content as it was written (``{"metrics/pairs.json": {...}}``). Those
    based on the current commit, or on any commit with ``all_commits``."""
    data = json.loads(dvc_output(["exp", "show", "--json", *(["--all-commits"] if all_commits else [])], repo) or "[]")
    out: list[dict[str, Any]] = []
    for base in data:
        for group in base.get("experiments") or []:
            for rev in group.get("revs") or []:
                d = rev.get("data") or {}
                params = {}
                for file, content in (d.get("params") or {}).items():
                    for k, v in flatten(content.get("data") or {}).items():
                        params[k if file == PARAMS_FILE else f"{file}:{k}"] = v
                metric_files = {
                    file: (content or {}).get("data") or {} for file, content in (d.get("metrics") or {}).items()
                }
                metrics = {
                    f"{file}:{k}": v for file, content in metric_files.items() for k, v in flatten(content).items()
                }
                out.append(
                    {
                        "name": rev.get("name"),
                        "rev": rev.get("rev"),
                        "baseline": base.get("name"),
                        "params": params,
                        "metrics": metrics,
                        "metric_files": metric_files,
                    }
                )
    return out


def select_metrics(metrics: Mapping[str, Any], patterns: Iterable[str]) -> dict[str, Any]:
    """Metrics matching ``<file glob>:<key glob>`` patterns (all numeric ones when there are none)."""
    patterns = list(patterns)
    out = {}
    for name, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            out[name] = value
    return out


def grid_points(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values (the product), one mapping param -> value each."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
