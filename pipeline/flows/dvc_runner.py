"""DVC plumbing for the Prefect flows in :mod:`pipeline.flows`, and their settings (``flows:`` in params.yaml).

Nothing here imports Prefect, so :class:`FlowParams` can be validated with the rest of params.yaml
without adding Prefect's start-up time to every stage. Every DVC call is a subprocess
(``python -m dvc`` of the running interpreter), so DVC alone decides what reruns:

- the stage order is ``dvc dag --dot`` (foreach stages appear expanded: ``train@dpo``);
- one stage is ``dvc repro --single-item <stage>`` (skipped when unchanged, restored when DVC's
  run-cache already holds that run);
- param overrides are applied with the function behind ``dvc exp run -S`` (Hydra override grammar,
  comments in params.yaml kept), and a run is recorded with ``dvc exp save``;
- sweep points are ``dvc exp run --temp`` experiments.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PARAMS_FILE = "params.yaml"


# ============================================================================================ settings
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageTaskSettings(_Strict):
    """How the Prefect task of one DVC stage is run."""
    retries: int = Field(0, ge=0)  # extra tries after a failure (each one is `dvc repro -s <stage>` again)
    retry_delay_s: float = Field(30.0, ge=0)  # pause between tries
    timeout_s: float = Field(0.0, ge=0)  # wall-clock limit of one try, the DVC process group is killed; 0: none


class StageTaskOverride(_Strict):
    """Per-stage (or per foreach group) changes to :class:`StageTaskSettings`; unset keys inherit."""
    retries: int | None = Field(None, ge=0)
    retry_delay_s: float | None = Field(None, ge=0)
    timeout_s: float | None = Field(None, ge=0)


DEFAULT_SWEEP_METRICS = ("metrics/eval/*.json:test_accuracy", "metrics/eval/*.json:heldout.delta_w",
                         "metrics/eval/*.json:heldout.delta_l", "metrics/eval/*.json:heldout.displaced_share",
                         "metrics/eval/*.json:heldout.pair_accuracy")


class SweepParams(_Strict):
    # param -> values; one DVC experiment per combination (the product), e.g.
    # {train.variants.dpo.beta: [0.1, 0.3], pairs.scenario: [1, 2]}
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    max_parallel: int = Field(2, ge=1)  # experiments running at once (`dvc exp run --temp` each)
    targets: list[str] = Field(default_factory=list)  # stages to reproduce per point; []: the whole pipeline
    # Run the first point alone, so that the stages every point shares land in DVC's run-cache once
    # instead of being computed by several points at the same time.
    warm_start: bool = True
    retries: int = Field(0, ge=0)  # per experiment
    timeout_s: float = Field(0.0, ge=0)  # per experiment; 0: none
    # Metric columns of the comparison table, as <file glob>:<dotted key glob>; []: every metric.
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_SWEEP_METRICS))

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
        return v


class RoundsParams(_Strict):
    count: int = Field(2, ge=1)  # R: rounds of sample -> judge -> pairs -> reference -> train -> evaluate
    variant: str = "dpo"  # the train.variants entry whose trained model starts the next round
    dir: str = "rounds"  # per-round copies of the outputs and the comparison report (git-ignored)
    save_experiments: bool = True  # also record each round as a DVC experiment <name>-round-<r>


Scenarios = list[int]  # (an alias: ScenariosParams has a field named `list`)


class ScenariosParams(_Strict):
    """``python -m pipeline.flows scenarios``: one DVC experiment per ``pairs.scenario`` (seed 001's four
    data scenarios), one train variant, compared side by side in a report."""
    list: Scenarios = Field(default_factory=lambda: [1, 2, 3, 4])  # pairs.scenario values, one experiment each
    variant: str = "dpo"  # the train.variants entry (the loss) compared across scenarios: targets evaluate@<variant>
    max_parallel: int = Field(1, ge=1)  # experiments at once (`dvc exp run --temp` each)
    report: str = "reports/scenarios.md"  # the side-by-side report (also a Prefect markdown artifact)
    timeout_s: float = Field(0.0, ge=0)  # per experiment; 0: none
    retries: int = Field(0, ge=0)  # per experiment

    @field_validator("list")
    @classmethod
    def _scenarios(cls, v: Scenarios) -> Scenarios:
        if not v:
            raise ValueError("needs at least one scenario (1, 2, 3 or 4)")
        bad = [k for k in v if k not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"unknown scenario(s) {bad}: each must be 1, 2, 3 or 4")
        dup = sorted({k for k in v if v.count(k) > 1})
        if dup:
            raise ValueError(f"scenario(s) {dup} listed more than once")
        return v

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        if not v or not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"{v!r} is not a train.variants name")
        return v


class FlowParams(_Strict):
    """The ``flows:`` section of params.yaml: how Prefect runs the DVC stages. No stage depends on it."""
    defaults: StageTaskSettings = StageTaskSettings()
    # stage name (train@dpo) or foreach group (train) -> overrides of `defaults`
    stages: dict[str, StageTaskOverride] = Field(default_factory=dict)
    log_tail_lines: int = Field(30, ge=1)  # lines of a failed stage's log quoted in the error
    # After a run with overrides: False restores params.yaml (the run lives on as a DVC experiment, so
    # the next scheduled run starts from the committed params); True leaves them, like `dvc exp run`.
    keep_overrides: bool = False
    # DVC remote shared by machines (e.g. every Kubernetes pod): the run-cache is pulled before the
    # first stage, stages run with `--pull`, and each stage's outputs and run-cache are pushed after it.
    remote: str | None = None
    git_remote: str | None = None  # `dvc exp push <git_remote>` after recording an experiment (e.g. origin)
    report: str = "reports/main/report.md"  # published as a Prefect markdown artifact when present
    # resource class of each stage (name or foreach group); cluster_flow sends each run of consecutive
    # stages of one class to that class's deployment
    resources: dict[str, Literal["cpu", "gpu"]] = Field(default_factory=lambda: {
        "prepare": "cpu", "policy": "gpu", "sample": "gpu", "sample_other": "gpu", "judge": "cpu", "pairs": "cpu",
        "reference": "gpu", "train": "gpu", "evaluate": "gpu", "report": "cpu", "toy": "cpu"})
    deployments: dict[Literal["cpu", "gpu"], str] = Field(default_factory=lambda: {
        "cpu": "dpo-pipeline/k8s-cpu-stages", "gpu": "dpo-pipeline/k8s-gpu-stages"})
    sweep: SweepParams = SweepParams()
    rounds: RoundsParams = RoundsParams()
    scenarios: ScenariosParams = ScenariosParams()

    def for_stage(self, stage: str) -> StageTaskSettings:
        merged = self.defaults.model_dump()
        for key in (group_of(stage), stage):
            if key in self.stages:
                merged.update({k: v for k, v in self.stages[key].model_dump().items() if v is not None})
        return StageTaskSettings(**merged)

    def resource_of(self, stage: str) -> Literal["cpu", "gpu"]:
        return self.resources.get(stage, self.resources.get(group_of(stage), "cpu"))


class FlowParamsError(ValueError):
    """A bad setting under ``flows:`` in params.yaml; the message names the key."""


def parse_flow_params(raw: Any, source: str = PARAMS_FILE) -> FlowParams:
    try:
        return FlowParams(**(raw or {}))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise FlowParamsError(f"{source}: flows.{loc}: {err['msg']}") from None
    except TypeError:
        raise FlowParamsError(f"{source}: flows: must be a mapping") from None


def load_flow_params(repo: str | os.PathLike = ".") -> FlowParams:
    path = Path(repo) / PARAMS_FILE
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return parse_flow_params((raw or {}).get("flows"), str(path))


def group_of(stage: str) -> str:
    """``train@dpo`` -> ``train`` (a foreach group); other names unchanged."""
    return stage.split("@", 1)[0]


# ============================================================================================ running dvc
class StageFailed(RuntimeError):
    """A DVC stage (or experiment) that failed: its name, exit status and the last lines of its log."""

    def __init__(self, stage: str, returncode: int | None, tail: Iterable[str] = (), what: str = "stage",
                 reason: str | None = None):
        self.stage, self.returncode, self.tail, self.what = stage, returncode, list(tail), what
        self.reason = reason or f"exit status {returncode}"
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        super().__init__(f"DVC {what} '{stage}' failed ({self.reason}); last {len(self.tail)} lines of its log:\n"
                         f"{lines}")

    def __reduce__(self):
        return (self.__class__, (self.stage, self.returncode, self.tail, self.what, self.reason))


class StageTimeout(StageFailed):
    pass


@dataclass
class DvcRun:
    returncode: int
    tail: list[str]
    seconds: float
    statuses: dict[str, str] = field(default_factory=dict)  # stage -> ran | skipped | restored


_STATUS_PATTERNS = (
    (re.compile(r"Running stage '([^']+)'"), "ran"),
    (re.compile(r"Stage '([^']+)' didn't change, skipping"), "skipped"),
    (re.compile(r"Stage '([^']+)' is cached - skipping run"), "restored"),
)


def stage_statuses(lines: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        for pattern, status in _STATUS_PATTERNS:
            if m := pattern.search(line):
                out[m.group(1)] = status
    return out


def dvc_env() -> dict[str, str]:
    """The environment of DVC and its stages: this interpreter's bin first on PATH (stage commands say
    ``python``), unbuffered output so that log lines arrive as they are written."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dvc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_dvc(args: list[str], cwd: str | os.PathLike, on_line: Callable[[str], Any] | None = None,
            timeout_s: float | None = None, tail_lines: int = 30) -> DvcRun:
    """Run ``dvc <args>`` in ``cwd``, handing every output line (stdout and stderr) to ``on_line`` as it
    comes. Past ``timeout_s`` the whole process group (DVC and the stage command) is terminated and the
    return code is None-like (-9). The lines are consumed in the calling thread (Prefect's run logger
    is bound to it)."""
    start = time.monotonic()
    proc = subprocess.Popen(dvc_cmd(*args), cwd=cwd, env=dvc_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def _read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=_read, daemon=True).start()
    tail: deque[str] = deque(maxlen=tail_lines)
    statuses: dict[str, str] = {}
    deadline = start + timeout_s if timeout_s else None
    timed_out = False
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            raw = lines.get(timeout=wait)
        except queue.Empty:
            timed_out = True
            _kill_group(proc)
            break
        if raw is None:
            break
        # progress bars redraw with \r: keep what the line finally shows
        line = raw.rstrip("\n").split("\r")[-1].rstrip()
        if not line:
            continue
        tail.append(line)
        statuses.update(stage_statuses([line]))
        if on_line is not None:
            on_line(line)
    rc = proc.wait()
    return DvcRun(returncode=-9 if timed_out else rc, tail=list(tail), seconds=time.monotonic() - start,
                  statuses=statuses)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def dvc_output(args: list[str], cwd: str | os.PathLike) -> str:
    """Run a quick DVC command and return its stdout; raise with its output on failure."""
    proc = subprocess.run(dvc_cmd(*args), cwd=cwd, env=dvc_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-2000:]}")
    return proc.stdout


def repro_stage(repo: str | os.PathLike, stage: str, on_line: Callable[[str], Any] | None = None,
                settings: StageTaskSettings | None = None, tail_lines: int = 30, pull: bool = False) -> DvcRun:
    """``dvc repro --single-item <stage>``: DVC reruns it only if its deps, params or command changed
    (or restores it from the run-cache). Raises :class:`StageFailed` naming the stage."""
    settings = settings or StageTaskSettings()
    args = ["repro", "--single-item", *(["--pull"] if pull else []), stage]
    run = run_dvc(args, repo, on_line, settings.timeout_s or None, tail_lines)
    if run.returncode == -9:
        raise StageTimeout(stage, None, run.tail, reason=f"timed out after {settings.timeout_s:g} s")
    if run.returncode:
        exited = [m.group(1) for line in run.tail if (m := re.search(r"exited with (-?\d+)", line))]
        raise StageFailed(stage, run.returncode, run.tail,
                          reason=f"its command exited with {exited[-1]}" if exited else None)
    run.statuses.setdefault(stage, "skipped")
    return run


# ============================================================================================ the DAG
def stage_graph(repo: str | os.PathLike) -> tuple[list[str], dict[str, set[str]]]:
    """The stages (in the order ``dvc dag`` lists them, which is dvc.yaml's) and each one's parents."""
    dot = dvc_output(["dag", "--dot"], repo)
    nodes: list[str] = []
    parents: dict[str, set[str]] = {}
    for line in dot.splitlines():
        line = line.strip().rstrip(";")
        if m := re.fullmatch(r'"([^"]+)"\s*->\s*"([^"]+)"', line):
            parents.setdefault(m.group(2), set()).add(m.group(1))
        elif m := re.fullmatch(r'"([^"]+)"', line):
            nodes.append(m.group(1))
    for n in nodes:
        parents.setdefault(n, set())
    return nodes, parents


def topo_order(nodes: list[str], parents: Mapping[str, set[str]]) -> list[str]:
    """Kahn's algorithm; among ready stages, the one listed first by ``dvc dag`` goes first."""
    rank = {n: i for i, n in enumerate(nodes)}
    remaining = {n: set(parents.get(n, ())) & set(nodes) for n in nodes}
    order: list[str] = []
    while remaining:
        ready = sorted((n for n, ps in remaining.items() if not ps), key=rank.__getitem__)
        if not ready:
            raise ValueError(f"dvc dag has a cycle among {sorted(remaining)}")
        n = ready[0]
        order.append(n)
        del remaining[n]
        for ps in remaining.values():
            ps.discard(n)
    return order


def expand_targets(targets: Iterable[str], nodes: list[str]) -> list[str]:
    """Stage names, or foreach groups (``train`` = every ``train@...``); unknown names fail."""
    out: list[str] = []
    for t in targets:
        matched = [n for n in nodes if n == t or group_of(n) == t]
        if not matched:
            raise ValueError(f"unknown stage {t!r}; the stages are: {', '.join(nodes)}")
        out += [m for m in matched if m not in out]
    return out


def with_ancestors(targets: Iterable[str], parents: Mapping[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(targets)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += parents.get(n, ())
    return seen


def stage_order(repo: str | os.PathLike, targets: Iterable[str] | None = None) -> list[str]:
    """The stages to run, in ``dvc dag`` order: all of them, or the targets and everything upstream of
    them (what ``dvc repro <targets>`` would consider)."""
    nodes, parents = stage_graph(repo)
    order = topo_order(nodes, parents)
    if not targets:
        return order
    keep = with_ancestors(expand_targets(targets, nodes), parents)
    return [n for n in order if n in keep]


def segments(order: list[str], resource_of: Callable[[str], str]) -> list[tuple[str, list[str]]]:
    """Consecutive stages of one resource class: [("cpu", [prepare]), ("gpu", [policy, sample]), ...]."""
    out: list[tuple[str, list[str]]] = []
    for stage, cls in ((s, resource_of(s)) for s in order):
        if out and out[-1][0] == cls:
            out[-1][1].append(stage)
        else:
            out.append((cls, [stage]))
    return out


# ============================================================================================ params
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


def apply_overrides(repo: str | os.PathLike, overrides: Mapping[str, Any] | None,
                    params_file: str = PARAMS_FILE) -> None:
    """Write overrides into params.yaml exactly as ``dvc exp run -S key=value`` does (it is the same DVC
    function; comments and key order are kept; an unknown key fails unless written ``+key``)."""
    args = override_args(overrides)
    if not args:
        return
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides  # DVC's own -S implementation

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


def exp_save(repo: str | os.PathLike, name: str, stages: Iterable[str], message: str | None = None,
             on_line: Callable[[str], Any] | None = None) -> str:
    """Record the workspace (params, dvc.lock, metrics) as the DVC experiment ``name``; it then shows in
    ``dvc exp show`` and comes back with ``dvc exp apply <name>``. Returns the name used (a suffix is
    added if the name is taken)."""
    include = [a for p in uncached_outputs(repo) for a in ("-I", p)]
    for attempt in range(3):
        exp = name if attempt == 0 else f"{name}-{os.urandom(2).hex()}"
        args = ["exp", "save", "-n", exp, *include, *(["-m", message] if message else []), *stages]
        run = run_dvc(args, repo, on_line)
        if run.returncode == 0:
            return exp
        if not any("conflicts with existing experiment" in line for line in run.tail):
            raise StageFailed(exp, run.returncode, run.tail, what="experiment save")
    raise StageFailed(name, 1, run.tail, what="experiment save")


def exp_push(repo: str | os.PathLike, git_remote: str, name: str, on_line: Callable[[str], Any] | None = None) -> None:
    run = run_dvc(["exp", "push", git_remote, name], repo, on_line)
    if run.returncode:
        raise StageFailed(name, run.returncode, run.tail, what="experiment push")


def exp_run_temp(repo: str | os.PathLike, name: str, overrides: Mapping[str, Any], targets: Iterable[str] = (),
                 on_line: Callable[[str], Any] | None = None, timeout_s: float = 0, tail_lines: int = 30) -> DvcRun:
    """One sweep point: ``dvc exp run --temp -n <name> -S k=v ... [targets]`` (a temporary copy of the
    repository, so points can run side by side; the cache and run-cache are shared)."""
    args = ["exp", "run", "--temp", "-n", name]
    for a in override_args(overrides):
        args += ["-S", a]
    run = run_dvc([*args, *targets], repo, on_line, timeout_s or None, tail_lines)
    if run.returncode == -9:
        raise StageTimeout(name, None, run.tail, what="experiment", reason=f"timed out after {timeout_s:g} s")
    if run.returncode:
        raise StageFailed(name, run.returncode, run.tail, what="experiment")
    return run


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def experiments(repo: str | os.PathLike) -> list[dict[str, Any]]:
    """Every experiment of ``dvc exp show --json``: {name, rev, baseline, params, metrics, metric_files},
    with params flattened to dotted keys (of params.yaml), metrics to ``<file>:<dotted key>``, and
    metric_files each metrics file's content as it was written (``{"metrics/pairs.json": {...}}``)."""
    data = json.loads(dvc_output(["exp", "show", "--json"], repo) or "[]")
    out: list[dict[str, Any]] = []
    for base in data:
        for group in base.get("experiments") or []:
            for rev in group.get("revs") or []:
                d = rev.get("data") or {}
                params = {}
                for file, content in (d.get("params") or {}).items():
                    for k, v in flatten(content.get("data") or {}).items():
                        params[k if file == PARAMS_FILE else f"{file}:{k}"] = v
                metric_files = {file: (content or {}).get("data") or {}
                                for file, content in (d.get("metrics") or {}).items()}
                metrics = {f"{file}:{k}": v for file, content in metric_files.items() for k, v in flatten(content).items()}
                out.append({"name": rev.get("name"), "rev": rev.get("rev"), "baseline": base.get("name"),
                            "params": params, "metrics": metrics, "metric_files": metric_files})
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


def short_metric(name: str) -> str:
    """``metrics/eval/dpo.json:heldout.delta_w`` -> ``eval/dpo:heldout.delta_w``."""
    file, _, key = name.partition(":")
    file = re.sub(r"^metrics/", "", re.sub(r"\.json$", "", file))
    return f"{file}:{key}"


def grid_points(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def metrics_rows(repo: str | os.PathLike) -> list[dict[str, Any]]:
    """``dvc metrics show --json`` as rows {file, metric, value} (numbers and strings only)."""
    data = json.loads(dvc_output(["metrics", "show", "--json"], repo) or "{}")
    rows = []
    for _, content in data.items():
        for file, m in ((content or {}).get("data") or {}).items():
            for k, v in flatten((m or {}).get("data") or {}).items():
                if isinstance(v, (int, float, str)):
                    rows.append({"file": file, "metric": k, "value": v})
    return rows


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
