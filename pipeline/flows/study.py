"""``study_flow``: training seeds × variants × pair sets as DVC experiments, then a report that tells a
claim from seed noise (``python -m pipeline.flows study``; mean ± sd across seeds, pooled per-pair
statistics, one row per claim of docs/losses.md it can judge: :mod:`pipeline.analysis.study`, reported by
:mod:`pipeline.analysis.study_report`)."""

from __future__ import annotations

import io
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline import paths
from pipeline.flows.experiments import experiments
from pipeline.flows.settings import FlowParams, StudyParams, load_flow_params, parse_flow_params
from pipeline.flows.tasks import Schedule, check_evaluate_targets, flow_run_name, run_experiments
from pipeline.settings.base import merged
from pipeline.settings.params import Params


def study_points(
    seeds: Sequence[int], scenarios: Sequence[int], overrides: dict[str, Any], sample_seed: bool
) -> list[tuple[str, int, dict[str, Any]]]:
    """``(pair set, seed, params)`` of each experiment: the study's overrides, the training seed (and the
    sampling seed with ``sample_seed``), and for a scenario judged pairs of that scenario."""
    pair_sets: list[int | None] = list(scenarios) if scenarios else [None]  # None: the pairs of params.yaml
    out = []
    for scenario in pair_sets:
        for seed in seeds:
            point = {**overrides, "train.seed": seed}
            if sample_seed:
                point["sample.seed"] = seed
            if scenario is not None:  # scenarios are of judged pairs, whatever pairs.source says
                point.update({"pairs.source": "judged", "pairs.scenario": scenario})
            out.append(("default" if scenario is None else f"scenario {scenario}", seed, point))
    return out


def study_command(st: StudyParams, tune: bool) -> str:
    """The command line that runs the same study (``tune``: the same tuning) again."""
    return "python -m pipeline.flows study " + " ".join(
        [f"--seeds {' '.join(map(str, st.seeds))}"]
        + ([] if tune else [f"--variants {' '.join(st.variants)}"])
        + ([f"--scenarios {' '.join(map(str, st.scenarios))}"] if st.scenarios else [])
        + ([f"-S {shlex.quote(f'{k}={v}')}" for k, v in st.overrides.items()] or ["--default-size"])
        + (["--tune", f"--report {shlex.quote(st.tune.report)}"] if tune else [f"--report {shlex.quote(st.report)}"])
    )


def read_experiment_table(
    root: Path, rev: str, path: str, table: str | None, columns: list[str] | None = None
) -> pl.DataFrame:
    """A stage's table as the experiment at ``rev`` produced it (from DVC's cache), checked against its schema
    (``table``), or only ``columns`` of it."""
    import dvc.api

    from pipeline.schema import conform

    with dvc.api.open(path, repo=str(root), rev=rev, mode="rb") as f:
        df = pl.read_parquet(io.BytesIO(f.read()), columns=columns)
    return conform(df, table, where=f"{path}@{rev[:7]}") if table else df


def trained_changes(root: Path, rev: str, variant: str, distances: pl.DataFrame) -> pl.DataFrame | None:
    """The fixed training subset's last Δ chosen of ``variant`` in the experiment at ``rev``; None when its
    training scored no fixed sets (``train.eval_every: 0``)."""
    from dvc.exceptions import FileMissingError, PathMissingError

    from pipeline.analysis.findings import trained_pair_changes

    try:
        fixed = read_experiment_table(root, rev, paths.fixed_curves(variant), "fixed_curves")
    except (FileMissingError, PathMissingError, FileNotFoundError):
        return None
    return trained_pair_changes(fixed, distances)


def loss_roles(cfg: Params, variants: list[str]) -> dict[str, str]:
    """Which of ``variants`` trains with the plain dpo loss and which with dpop (the claims' subjects)."""
    roles: dict[str, str] = {}
    for v in variants:
        terms = cfg.train.variants[v].losses
        if len(terms) == 1 and terms[0].name in ("dpo", "dpop"):
            roles.setdefault(terms[0].name, v)
    return roles


def study_settings(
    root: Path, changes: dict[str, Any], overrides: dict[str, Any] | None
) -> tuple[FlowParams, StudyParams]:
    """``flows`` of params.yaml with the flow's arguments over ``flows.study``, validated together."""
    fp = parse_flow_params(merged(load_flow_params(root).model_dump(), {"study": changes}), source="study_flow")
    st = fp.study if overrides is None else fp.study.model_copy(update={"overrides": dict(overrides)})
    return fp, st


def named_points(prefix: str, st: StudyParams) -> dict[str, tuple[str, int, dict[str, Any]]]:
    """Experiment name -> (pair set, seed, params) of each experiment of the study."""
    points = study_points(st.seeds, st.scenarios, st.overrides, st.sample_seed)
    return {
        f"{prefix}-{'d' if ps == 'default' else 's' + ps.split()[-1]}-seed{seed}": (ps, seed, point)
        for ps, seed, point in points
    }


# what the study reads of each experiment's pairs: the edit distances, and for the scenario section the
# prompt of each pair and how on-policy its sides are
PAIR_COLUMNS = [
    "pair_id",
    "prompt_id",
    "split",
    "chosen_policy_logprob",
    "rejected_policy_logprob",
    "len_w",
    "len_l",
    "edit_distance_norm",
]


def heldout_prompts(root: Path, rev: str, params: dict[str, Any]) -> int | None:
    """How many train prompts the experiment's pairs hold out (``pairs.heldout_fraction``, ``pairs.seed`` of its
    params), whether a pair was made of them or not; None where its params or prompts do not say."""
    from dvc.exceptions import FileMissingError, PathMissingError

    from pipeline.data.pairs import is_heldout

    fraction, seed = params.get("pairs.heldout_fraction"), params.get("pairs.seed")
    if not isinstance(fraction, (int, float)) or not isinstance(seed, int):
        return None
    try:
        prompts = read_experiment_table(root, rev, paths.PROMPTS, None, ["prompt_id", "split"])
    except (FileMissingError, PathMissingError, FileNotFoundError):
        return None
    return sum(is_heldout(p, fraction, seed) for p in prompts.filter(pl.col("split") == "train")["prompt_id"])


def read_runs(
    root: Path,
    points: dict[str, tuple[str, int, dict[str, Any]]],
    skip: list[str],
    variants: list[str],
    all_commits: bool,
) -> list:
    """Every variant's held-out pairs and answers of each recorded experiment, read back from DVC's cache."""
    from pipeline.analysis.study import StudyRun

    recorded = {e["name"]: e for e in experiments(root, all_commits=all_commits)}
    runs: list[StudyRun] = []
    for exp, (pair_set, seed, _) in points.items():
        if exp in skip or exp not in recorded:
            continue
        rev = recorded[exp]["rev"]
        before = read_experiment_table(root, rev, paths.POLICY_GENERATIONS, "generations")
        pairs = read_experiment_table(root, rev, paths.PAIRS, None, PAIR_COLUMNS)
        distances = pairs.select("pair_id", "edit_distance_norm")
        held = heldout_prompts(root, rev, recorded[exp]["params"])
        for v in variants:
            runs.append(
                StudyRun(
                    exp,
                    pair_set,
                    seed,
                    v,
                    read_experiment_table(root, rev, paths.eval_table(v), "pair_eval"),
                    before,
                    read_experiment_table(root, rev, paths.eval_generations(v), "generations"),
                    trained_changes(root, rev, v, distances),
                    pairs.drop("edit_distance_norm"),
                    held,
                )
            )
    return runs


def run_or_find(
    root: Path,
    fp: FlowParams,
    points: dict[str, dict[str, Any]],
    targets: list[str],
    schedule: Schedule,
    report_only: bool,
) -> list[str]:
    """The experiments that failed: of running ``points`` (:func:`run_experiments`), or with ``report_only``
    those not recorded (on any commit: the study may have run on an earlier one)."""
    if report_only:
        have = {e["name"] for e in experiments(root, all_commits=True)}
        return [n for n in points if n not in have]
    return run_experiments(root, fp, points, targets, schedule)


def run_record(out: Path, seconds: dict[str, float] | None) -> tuple[dict[str, Any] | None, str]:
    """How long the experiments took (``seconds``: phase -> wall-clock seconds, measured by the flow that ran
    them) and on how many CPUs, for ``summary.json``, and its line for the report. A report rebuilt without
    running (``seconds`` None) keeps what its folder's last ``summary.json`` recorded."""
    import json
    import os

    if seconds is None:
        try:
            record = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("run")
        except (OSError, ValueError, AttributeError):
            record = None
    else:
        record = {"seconds": {k: round(v) for k, v in seconds.items()}, "cpus": os.cpu_count()}
    if not isinstance(record, dict) or not isinstance(record.get("seconds"), dict):
        return None, ""
    took = ", ".join(f"{k} {v / 60:.0f} min" for k, v in record["seconds"].items())
    return record, f"\nWall-clock time of the experiments ({record.get('cpus')} CPUs): {took}.\n"


def write_study(out: Path, runs: list, markdown: str, summary: dict[str, Any]) -> None:
    """``per_pair.parquet``, ``summary.json`` and, last, ``report.md``: a reader finds a report only with its
    figures beside it."""
    from pipeline.io import write_json, write_table, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_table(
        pl.concat(
            [
                r.pairs.with_columns(
                    pl.lit(r.experiment).alias("experiment"),
                    pl.lit(r.seed).alias("seed"),
                    pl.lit(r.scenario).alias("pair_set"),
                )
                for r in runs
            ]
        ),
        out / "per_pair.parquet",
        "study_pairs",
    )
    write_json(summary, out / "summary.json")
    write_text(markdown, out / "report.md")


@flow(name="dpo-study")
def study_flow(
    seeds: list[int] | None = None,
    variants: list[str] | None = None,
    scenarios: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
    repo: str = ".",
    report_only: bool = False,
    report: str | None = None,
) -> dict[str, Any]:
    """One ``dvc exp run --temp`` per training seed and pair set (default ``flows.study``), each reproducing
    ``evaluate@<v>`` of every study variant with ``flows.study.overrides`` set (``overrides=`` replaces them),
    at most ``max_parallel`` at once after the first (prepare, policy, sample and pairs are shared and come
    from DVC's run-cache after it). Then ``flows.study.report``: ``report.md`` (also the markdown artifact
    ``dpo-study``), ``summary.json`` with every figure, and ``per_pair.parquet`` (each run's held-out
    pairs, with its seed and variant) from which every pooled number can be recomputed. ``report_only``:
    no experiment runs; the report is rebuilt from the experiments a study of that ``name`` left (those
    missing are reported as such). ``report``: the report folder instead of ``flows.study.report`` (the
    scenario study's ``reports/scenarios``)."""
    from pipeline.analysis.findings import StatSettings
    from pipeline.analysis.study_report import study_report

    logger = get_run_logger()
    root = Path(repo).resolve()
    changes: dict[str, Any] = {
        k: list(v) for k, v in (("seeds", seeds), ("variants", variants), ("scenarios", scenarios)) if v is not None
    }
    if report is not None:
        changes["report"] = report
    fp, st = study_settings(root, changes, overrides)
    targets = check_evaluate_targets(root, st.variants, "study_flow")
    prefix = name or f"study-{flow_run_name()}"
    points = named_points(prefix, st)
    names = list(points)
    logger.info(
        "study %s: %d experiments (seeds %s, pair sets %s), variants %s, overrides %s, %d at a time",
        prefix,
        len(points),
        st.seeds,
        st.scenarios or ["default"],
        st.variants,
        st.overrides,
        st.max_parallel,
    )
    start = time.monotonic()
    failed = run_or_find(root, fp, {n: p for n, (_, _, p) in points.items()}, targets, Schedule.of(st), report_only)
    out = root / st.report
    timing, took = run_record(out, None if report_only else {"experiments": time.monotonic() - start})
    runs = read_runs(root, points, failed, st.variants, all_commits=report_only)
    if not runs:
        raise RuntimeError(f"study {prefix}: all {len(names)} experiments failed: {', '.join(failed)}")
    cfg = Params.load(root / "params.yaml")
    command = study_command(st, tune=False)
    markdown, record = study_report(
        runs, loss_roles(cfg, st.variants), StatSettings.from_params(cfg.report), f"Study `{prefix}`", command
    )
    markdown += took
    if failed:
        markdown += (
            f"\n**{len(failed)} of {len(names)} experiments failed or are missing** and are left out: "
            f"{', '.join(failed)}.\n"
        )
    ran = {n: p for n, (_, _, p) in points.items()}
    write_study(
        out, runs, markdown, {**record, "experiments": ran, "failed": failed, "command": command, "run": timing}
    )
    create_markdown_artifact(markdown=markdown, key="dpo-study", description=f"study {prefix} ({st.report})")
    logger.info("study report: %s\n%s", out / "report.md", markdown)
    if failed:
        raise RuntimeError(
            f"study {prefix}: {len(failed)} of {len(names)} experiments failed: {', '.join(failed)} "
            f"(report without them: {out / 'report.md'})"
        )
    return {
        "name": prefix,
        "experiments": names,
        "report": str(out / "report.md"),
        "markdown": markdown,
        "claims": record["claims"],
    }
