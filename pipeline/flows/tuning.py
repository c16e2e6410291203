"""``tuning_flow`` (``python -m pipeline.flows study --tune``): is a loss merely mistuned? Each variant of
``flows.study.tune.grid`` over its grid on one seed, the setting of each kept on the validation prompts
(``prepare.n_val``), then the kept settings over the study's seeds, compared on the test prompts and held-out
pairs (:mod:`pipeline.analysis.tuning`) and reported as the study reports (:mod:`pipeline.flows.study`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline import paths
from pipeline.flows.experiments import apply_overrides, experiments, grid_points
from pipeline.flows.settings import StudyParams
from pipeline.flows.study import (
    loss_roles,
    named_points,
    read_experiment_table,
    read_runs,
    run_or_find,
    run_record,
    study_command,
    study_settings,
    write_study,
)
from pipeline.flows.tasks import Schedule, check_evaluate_targets, flow_run_name
from pipeline.settings.base import DEFAULT_PARAMS, ConfigError
from pipeline.settings.params import Params

# (variant, its setting, the params the experiment sets) of each grid experiment, by experiment name
Grid = dict[str, tuple[str, dict[str, Any], dict[str, Any]]]


def setting_overrides(variant: str, setting: dict[str, Any]) -> dict[str, Any]:
    """A variant's setting as ``dvc exp run -S`` params: ``++`` adds a key the variant does not set in
    params.yaml (its lr, say) and replaces one it does."""
    return {f"++train.variants.{variant}.{k}": v for k, v in setting.items()}


def tune_points(prefix: str, st: StudyParams) -> Grid:
    """The grid's experiments, ``<prefix>-tune-<variant>-<i>`` in grid order: the study's overrides, the
    validation prompts, the tuning seed (and sampling seed with ``sample_seed``) and the variant's setting."""
    base = {**st.overrides, "prepare.n_val": st.tune.n_val, "train.seed": st.tune.seed}
    if st.sample_seed:
        base["sample.seed"] = st.tune.seed
    out: Grid = {}
    for variant, axes in st.tune.grid.items():
        for i, setting in enumerate(grid_points(axes)):
            out[f"{prefix}-tune-{variant}-{i}"] = (variant, setting, {**base, **setting_overrides(variant, setting)})
    return out


def check_points(root: Path, points: dict[str, dict[str, Any]]) -> None:
    """Each experiment's params.yaml as ``dvc exp run -S`` writes it, validated before any experiment runs: a
    grid key or value the settings refuse fails here, naming the experiment and the key."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in points.items():
            shutil.copy(root / DEFAULT_PARAMS, Path(tmp) / DEFAULT_PARAMS)
            apply_overrides(tmp, overrides)
            try:
                Params.load(Path(tmp) / DEFAULT_PARAMS)
            except ConfigError as e:
                raise ConfigError(f"tuning experiment {name}: {e}") from None


def read_grid(root: Path, grid: Grid, failed: list[str], all_commits: bool) -> tuple[list, float | None]:
    """Each grid experiment's answers on the validation prompts (None where it failed or is missing), and the
    starting policy's validation accuracy (``metrics/policy.json``, the same in every experiment)."""
    from pipeline.analysis.tuning import GridPoint

    recorded = {e["name"]: e for e in experiments(root, all_commits=all_commits)}
    points, policy_val = [], None
    for name, (variant, setting, _) in grid.items():
        e = recorded.get(name)
        answers = None
        if e is not None and name not in failed:
            answers = read_experiment_table(root, e["rev"], paths.eval_val_generations(variant), "generations")
            start = (e["metric_files"].get(paths.metrics_file("policy")) or {}).get("val_accuracy")
            policy_val = start if policy_val is None else policy_val
        points.append(GridPoint(name, variant, setting, answers))
    return points, policy_val


def kept_points(prefix: str, st: StudyParams, selected: dict) -> dict[str, tuple[str, int, dict[str, Any]]]:
    """The experiments of the kept settings (``<prefix>-d-seed<s>``): the study's overrides, the validation
    prompts and every variant's kept setting, one experiment per seed."""
    kept = {k: v for p in selected.values() for k, v in setting_overrides(p.variant, p.setting).items()}
    update = {"variants": list(st.tune.grid), "overrides": {**st.overrides, "prepare.n_val": st.tune.n_val, **kept}}
    return named_points(prefix, st.model_copy(update=update))


def tuning_settings(st: StudyParams, report: str | None) -> StudyParams:
    """``flows.study`` for the tuning: its report folder ``report`` where given; no scenarios (the tuning runs
    on the pairs of params.yaml)."""
    if st.scenarios:
        raise ConfigError(
            f"tuning_flow: flows.study.scenarios is {st.scenarios}; the tuning runs on the pairs of params.yaml "
            "(set pairs.source and pairs.scenario with -S)"
        )
    return st if report is None else st.model_copy(update={"tune": st.tune.model_copy(update={"report": report})})


@flow(name="dpo-study-tune")
def tuning_flow(
    seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
    repo: str = ".",
    report_only: bool = False,
    report: str | None = None,
) -> dict[str, Any]:
    """The grid's experiments (``flows.study.tune``; each reproduces ``evaluate@<variant>`` of its variant alone,
    ``flows.study.overrides`` or ``overrides=`` set, with ``prepare.n_val`` validation prompts), each variant's
    setting of highest validation accuracy kept, then one experiment per seed (default ``flows.study.seeds``)
    training every variant at its kept setting. ``flows.study.tune.report`` (or ``report``): ``report.md``
    (artifact ``dpo-study-tune``), ``summary.json`` and ``per_pair.parquet`` of the kept settings' runs.
    ``report_only``: no experiment runs; the selection and report are rebuilt from the experiments named
    ``name``."""
    from pipeline.analysis import tuning
    from pipeline.analysis.findings import StatSettings
    from pipeline.analysis.study_report import study_report

    logger = get_run_logger()
    root = Path(repo).resolve()
    fp, st = study_settings(root, {} if seeds is None else {"seeds": list(seeds)}, overrides)
    st = tuning_settings(st, report)
    variants = list(st.tune.grid)
    targets = check_evaluate_targets(root, variants, "tuning_flow")
    prefix = name or f"tune-{flow_run_name()}"
    grid = tune_points(prefix, st)
    check_points(root, {n: p for n, (_, _, p) in grid.items()})
    logger.info("tuning %s: %d grid experiments on seed %d, then seeds %s", prefix, len(grid), st.tune.seed, st.seeds)
    start = time.monotonic()
    failed = [
        n
        for v in variants
        for n in run_or_find(
            root, fp, {n: p for n, (w, _, p) in grid.items() if w == v}, [f"evaluate@{v}"], Schedule.of(st), report_only
        )
    ]
    grid_s = time.monotonic() - start
    points, policy_val = read_grid(root, grid, failed, all_commits=report_only)
    selected = tuning.select(points)
    if set(selected) != set(variants):
        raise RuntimeError(f"tuning {prefix}: every grid experiment of {sorted(set(variants) - set(selected))} failed")
    logger.info("tuning %s kept %s", prefix, {v: p.setting for v, p in selected.items()})
    final_points = kept_points(prefix, st, selected)
    flat = {n: p for n, (_, _, p) in final_points.items()}
    check_points(root, flat)
    failed += run_or_find(root, fp, flat, targets, Schedule.of(st), report_only)
    seconds = {"grid": grid_s, "kept settings": time.monotonic() - start - grid_s}
    out = root / st.tune.report
    timing, took = run_record(out, None if report_only else seconds)
    runs = read_runs(root, final_points, failed, variants, all_commits=report_only)
    if not runs:
        raise RuntimeError(f"tuning {prefix}: every experiment of the kept settings failed: {', '.join(failed)}")
    cfg = Params.load(root / DEFAULT_PARAMS)
    s = StatSettings.from_params(cfg.report)
    rows = tuning.grid_rows(points, selected, s)
    compared = tuning.comparisons(runs, variants, s)
    sections = tuning.tuning_lines(st.tune.grid, st.tune.seed, rows, policy_val, compared, s)
    command = study_command(st, tune=True)
    markdown, record = study_report(
        runs, loss_roles(cfg, variants), s, f"Tuned comparison `{prefix}`", command, sections
    )
    markdown += took
    if failed:
        markdown += f"\n**{len(failed)} experiments failed or are missing** and are left out: {', '.join(failed)}.\n"
    tuned = tuning.tuning_record(st.tune.grid, st.tune.seed, rows, policy_val, selected, compared)
    ran = {n: p for n, (_, _, p) in grid.items()} | flat
    summary = {**record, "tuning": tuned, "experiments": ran, "failed": failed, "command": command, "run": timing}
    write_study(out, runs, markdown, summary)
    create_markdown_artifact(markdown=markdown, key="dpo-study-tune", description=f"tuning {prefix} ({out})")
    logger.info("tuning report: %s\n%s", out / "report.md", markdown)
    if failed:
        raise RuntimeError(f"tuning {prefix}: {len(failed)} experiments failed: {', '.join(failed)} ({out})")
    return {"name": prefix, "report": str(out / "report.md"), "markdown": markdown, "selected": tuned["selected"]}
