"""Prefect flows over the DVC stages: scheduled runs, sweeps, on-policy rounds, GPU-cluster deployment.

DVC keeps owning the caching: every stage task is ``dvc repro --single-item <stage>``, so a flow never
recomputes what ``dvc repro`` would skip (a stage whose deps and params are unchanged is skipped, one
DVC has run before with the same inputs is restored from its run-cache). Prefect adds schedules,
per-stage retries and timeouts, the stage logs in the run log, and artifacts.

- :func:`pipeline_flow`: one task per DVC stage in ``dvc dag`` order; parameters are param overrides
  (``{"train.variants.dpo.beta": 0.3}``, the ``dvc exp run -S`` grammar); a run with overrides is
  recorded as a DVC experiment (``dvc exp show``, ``dvc exp apply <name>``).
- :func:`sweep_flow`: a grid of params, one ``dvc exp run --temp`` experiment per point, at most
  ``max_parallel`` at once; ends with a comparison table artifact.
- :func:`scenarios_flow`: seed 001's data scenarios (``pairs.scenario`` 1-4) for one loss, one experiment
  each (the sweep machinery), compared side by side in ``reports/scenarios.md``.
- :func:`rounds_flow`: iterative (on-policy) DPO: round r > 1 starts from round r-1's trained model.
- :func:`cluster_flow`: the pipeline split into CPU and GPU segments, each run by its own deployment.

Settings come from the ``flows:`` section of params.yaml (:class:`FlowParams`). No Prefect server is
needed locally: ``python -m pipeline.flows run`` starts a temporary one. Nothing here is imported by
the stages, so ``dvc repro`` never pays Prefect's start-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# A flow run with no server starts a temporary one. It would send usage data at start-up (no network
# at run time), and its 20 s start-up limit was too short once on a busy 2-core machine. Set before
# Prefect reads its settings; an explicit user setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline.flows import dvc_runner
from pipeline.flows.dvc_runner import (  # noqa: F401  (re-exported: the settings live with the flows)
    FlowParams,
    FlowParamsError,
    RoundsParams,
    ScenariosParams,
    StageFailed,
    StageTaskSettings,
    SweepParams,
    load_flow_params,
    parse_flow_params,
)

__all__ = ["FlowParams", "StageFailed", "pipeline_flow", "sweep_flow", "scenarios_flow", "rounds_flow",
           "cluster_flow", "load_flow_params", "kubernetes_job_template"]


# ============================================================================================ tasks
@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(stage: str, repo: str, timeout_s: float = 0.0, tail_lines: int = 30,
              remote: str | None = None) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``; its output lines go to the Prefect run log. Prefect caching is
    off on purpose: whether the stage reruns is DVC's decision, on every try."""
    logger = get_run_logger()
    run = dvc_runner.repro_stage(repo, stage, logger.info, StageTaskSettings(timeout_s=timeout_s), tail_lines,
                                 pull=bool(remote))
    if remote:
        push = dvc_runner.run_dvc(["push", "-r", remote, "--run-cache", stage], repo, logger.info)
        if push.returncode:
            raise StageFailed(stage, push.returncode, push.tail, what="push of stage")
    status = run.statuses.get(stage, "skipped")
    logger.info("stage %s: %s (%.1f s)", stage, status, run.seconds)
    return {"stage": stage, "status": status, "seconds": round(run.seconds, 2)}


@task(name="dvc-experiment", cache_policy=NO_CACHE, persist_result=False)
def dvc_experiment(name: str, repo: str, overrides: dict[str, Any], targets: list[str],
                   timeout_s: float = 0.0, tail_lines: int = 30) -> dict[str, Any]:
    logger = get_run_logger()
    logger.info("experiment %s: %s", name, " ".join(dvc_runner.override_args(overrides)))
    run = dvc_runner.exp_run_temp(repo, name, overrides, targets, logger.info, timeout_s, tail_lines)
    return {"name": name, "overrides": overrides, "statuses": run.statuses, "seconds": round(run.seconds, 2)}


def _stage_task(stage: str, fp: FlowParams, label: str = ""):
    s = fp.for_stage(stage)
    return dvc_stage.with_options(name=f"{label}{stage}", task_run_name=f"{label}{stage}", retries=s.retries,
                                  retry_delay_seconds=s.retry_delay_s), s


def _run_stages(root: Path, order: list[str], fp: FlowParams, remote: str | None, label: str = "") -> dict[str, dict]:
    """Stages one after the other (DVC locks the workspace anyway); the first failure (after its
    retries) raises and stops the flow, earlier stages' outputs stay committed in the DVC cache."""
    results: dict[str, dict] = {}
    for stage in order:
        t, s = _stage_task(stage, fp, label)
        results[stage] = t(stage, str(root), s.timeout_s, fp.log_tail_lines, remote)
    return results


# ============================================================================================ helpers
def _flow_run_name(default: str = "local") -> str:
    try:
        from prefect.runtime import flow_run

        name = flow_run.name
    except Exception:  # noqa: BLE001  (outside a flow run)
        name = None
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name or default).strip("-") or default


def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "artifact"


def _publish(root: Path, fp: FlowParams, results: Mapping[str, dict], experiment: str | None) -> None:
    """The report and the metrics table as Prefect artifacts."""
    logger = get_run_logger()
    summary = [{"stage": s, "status": r["status"], "seconds": r["seconds"]} for s, r in results.items()]
    report = root / fp.report
    if report.is_file():
        create_markdown_artifact(markdown=report.read_text(encoding="utf-8"), key="dpo-report",
                                 description=f"{fp.report}" + (f" (experiment {experiment})" if experiment else ""))
    try:
        rows = dvc_runner.metrics_rows(root)
    except RuntimeError as e:
        logger.warning("no metrics table: %s", e)
        rows = []
    if rows:
        create_table_artifact(table=rows, key="dpo-metrics", description="dvc metrics show"
                              + (f" (experiment {experiment})" if experiment else ""))
    create_table_artifact(table=summary, key="dpo-stages", description="what each DVC stage did in this run")


def _pull_run_cache(root: Path, remote: str | None) -> None:
    """With a shared remote (other machines ran stages): fetch DVC's run-cache so that stages they ran
    are restored instead of recomputed."""
    if not remote:
        return
    logger = get_run_logger()
    pull = dvc_runner.run_dvc(["pull", "-r", remote, "--run-cache", "--allow-missing"], root, logger.info)
    if pull.returncode:
        logger.warning("dvc pull of the run-cache from %s failed (exit %d); stages may recompute",
                       remote, pull.returncode)


def _push_experiment(root: Path, fp: FlowParams, name: str | None) -> None:
    if name and fp.git_remote:
        dvc_runner.exp_push(root, fp.git_remote, name, get_run_logger().info)


# ============================================================================================ pipeline
@flow(name="dpo-pipeline")
def pipeline_flow(overrides: dict[str, Any] | None = None, targets: list[str] | None = None,
                  experiment: str | None = None, record: bool | None = None, remote: str | None = None,
                  keep_overrides: bool | None = None, repo: str = ".") -> dict[str, Any]:
    """Run the DVC pipeline, one Prefect task per stage in ``dvc dag`` order.

    overrides: params to change for this run, ``{"train.variants.dpo.beta": 0.3}`` (``dvc exp run -S``
        grammar; ``+key`` adds a key). Written into params.yaml with DVC's own ``-S`` code.
    targets: stages (or foreach groups) to reproduce with everything upstream; default all.
    experiment: name of the DVC experiment recording this run (default: the Prefect flow run's name).
    record: record the run as a DVC experiment; default: when there are overrides or a name.
    remote: a DVC remote shared between machines (default ``flows.remote``).
    keep_overrides: leave the overrides in params.yaml afterwards (default ``flows.keep_overrides``).
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    params_path = root / dvc_runner.PARAMS_FILE
    original = params_path.read_text(encoding="utf-8")
    dvc_runner.apply_overrides(root, overrides)
    keep = False
    try:
        fp = load_flow_params(root)  # after the overrides: a run may change its own retries
        keep = fp.keep_overrides if keep_overrides is None else keep_overrides
        remote = remote if remote is not None else fp.remote
        order = dvc_runner.stage_order(root, targets)
        logger.info("stages in dvc dag order: %s", ", ".join(order))
        if overrides:
            logger.info("param overrides: %s", " ".join(dvc_runner.override_args(overrides)))
        _pull_run_cache(root, remote)
        results = _run_stages(root, order, fp, remote)
        do_record = record if record is not None else bool(overrides or experiment)
        exp_name = None
        if do_record:
            exp_name = dvc_runner.exp_save(root, experiment or _flow_run_name(), order,
                                           message=f"prefect flow run {_flow_run_name()}", on_line=logger.info)
            logger.info("recorded as DVC experiment %s (dvc exp show; dvc exp apply %s)", exp_name, exp_name)
            _push_experiment(root, fp, exp_name)
        _publish(root, fp, results, exp_name)
    finally:
        if overrides and not keep:
            params_path.write_text(original, encoding="utf-8")
    ran = [s for s, r in results.items() if r["status"] == "ran"]
    logger.info("ran %d of %d stages: %s", len(ran), len(order), ", ".join(ran) or "none")
    return {"order": order, "stages": {s: r["status"] for s, r in results.items()}, "ran": ran,
            "experiment": exp_name}


# ============================================================================================ sweep
def _wait_any(futures: list) -> None:
    while True:
        for f in futures:
            f.wait(timeout=0.5)
            if f.state.is_final():
                return


def _run_experiments(root: Path, fp: FlowParams, names: list[str], points: list[dict[str, Any]],
                     targets: list[str], parallel: int, warm_start: bool, retries: int,
                     timeout_s: float) -> list[str]:
    """One ``dvc exp run --temp`` task per point, at most ``parallel`` at once; with ``warm_start`` the
    first point runs alone, so the stages every point shares land in DVC's run-cache once. Each finished
    experiment is pushed (``flows.git_remote``). Returns the names of the experiments that failed."""
    exp_task = dvc_experiment.with_options(retries=retries)
    futures, pending = [], []
    for i, (exp, point) in enumerate(zip(names, points)):
        if len(pending) >= parallel:
            _wait_any(pending)
            pending = [f for f in pending if not f.state.is_final()]
        fut = exp_task.with_options(task_run_name=exp).submit(exp, str(root), point, targets, timeout_s,
                                                              fp.log_tail_lines)
        futures.append(fut)
        pending.append(fut)
        if i == 0 and warm_start and len(points) > 1:
            fut.wait()  # its stages go to the run-cache before the other points start
    failed = []
    for exp, fut in zip(names, futures):
        fut.wait()
        if not fut.state.is_completed():
            failed.append(exp)
        else:
            _push_experiment(root, fp, exp)
    return failed


@flow(name="dpo-sweep")
def sweep_flow(grid: dict[str, list[Any]] | None = None, max_parallel: int | None = None,
               targets: list[str] | None = None, name: str | None = None, repo: str = ".") -> dict[str, Any]:
    """A grid over params (default ``flows.sweep.grid``), one DVC experiment per point, run with
    ``dvc exp run --temp`` at most ``max_parallel`` at a time; ends with the experiments' params and
    metrics as a table artifact. Stages a point shares with an earlier one come from DVC's run-cache."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    fp = load_flow_params(root)
    sp = fp.sweep
    grid = dict(grid if grid is not None else sp.grid)
    if not grid:
        raise ValueError("sweep_flow: empty grid (pass grid= or set flows.sweep.grid in params.yaml)")
    grid = dvc_runner.SweepParams(grid=grid).grid  # validated: every key has values
    parallel = max_parallel or sp.max_parallel
    targets = list(targets if targets is not None else sp.targets)
    if targets:
        nodes, _ = dvc_runner.stage_graph(root)
        dvc_runner.expand_targets(targets, nodes)  # fail early on a typo
    prefix = name or f"sweep-{_flow_run_name()}"
    points = dvc_runner.grid_points(grid)
    names = [f"{prefix}-{i + 1}" for i in range(len(points))]
    logger.info("sweep %s: %d experiments over %s, %d at a time", prefix, len(points), ", ".join(grid), parallel)
    failed = _run_experiments(root, fp, names, points, targets, parallel, sp.warm_start, sp.retries, sp.timeout_s)

    by_name = {e["name"]: e for e in dvc_runner.experiments(root)}
    rows = []
    for exp, point in zip(names, points):
        e = by_name.get(exp)
        row: dict[str, Any] = {"experiment": exp, "status": "failed" if exp in failed else "done"}
        row.update({k: (e["params"].get(k.lstrip("+"), v) if e else v) for k, v in point.items()})
        if e:
            row.update({dvc_runner.short_metric(m): v
                        for m, v in dvc_runner.select_metrics(e["metrics"], sp.metrics).items()})
        rows.append(row)
    table = dvc_runner.markdown_table(rows)
    create_table_artifact(table=rows, key=_artifact_key(f"sweep-{prefix}"),
                          description=f"sweep {prefix}: params and metrics of each experiment (dvc exp show)")
    logger.info("sweep %s:\n%s", prefix, table)
    if failed:
        # the failing tasks already raised with the experiment's name and log tail
        raise RuntimeError(f"sweep {prefix}: {len(failed)} of {len(points)} experiments failed: {', '.join(failed)}")
    return {"name": prefix, "experiments": names, "table": rows, "markdown": table}


# ============================================================================================ scenarios
def _scenario_rows(exps: list[dict[str, Any]], names: Mapping[int, str], failed: list[str],
                   variant: str) -> list[dict[str, Any]]:
    """The input of :func:`pipeline.analysis.report.scenario_table`: per scenario its experiment's status and the
    contents of metrics/pairs.json and metrics/eval/<variant>.json (from ``dvc exp show``)."""
    by_name = {e["name"]: e for e in exps}
    rows = []
    for k, exp in names.items():
        files = (by_name.get(exp) or {}).get("metric_files") or {}
        rows.append({"scenario": k, "status": "failed" if exp in failed else "done", "experiment": exp,
                     "pairs": files.get("metrics/pairs.json") or {},
                     "eval": files.get(f"metrics/eval/{variant}.json") or {}})
    return rows


@flow(name="dpo-scenarios")
def scenarios_flow(scenarios: list[int] | None = None, variant: str | None = None, name: str | None = None,
                   repo: str = ".") -> dict[str, Any]:
    """Seed 001's data scenarios side by side for one loss: one DVC experiment per ``pairs.scenario``
    (default ``flows.scenarios.list``), each ``dvc exp run --temp -S pairs.scenario=<k> evaluate@<variant>``
    (so only the stages that variant needs run), at most ``flows.scenarios.max_parallel`` at once after
    the first (which runs alone: prepare, policy, sample and judge are shared and land in DVC's
    run-cache once). Then ``flows.scenarios.report`` (and the markdown artifact ``dpo-scenarios``) puts
    the experiments' pair and evaluation metrics side by side, one column per scenario. The same
    experiments as a sweep with ``flows.sweep.grid: {pairs.scenario: [1, 2, 3, 4]}``."""
    from pipeline.io import write_text
    from pipeline.analysis.report import scenario_table

    logger = get_run_logger()
    root = Path(repo).resolve()
    fp = load_flow_params(root)
    settings = fp.scenarios.model_dump()
    if scenarios is not None:
        settings["list"] = list(scenarios)
    if variant:
        settings["variant"] = variant
    sc = parse_flow_params({"scenarios": settings}, source="scenarios_flow").scenarios  # validated
    variant = sc.variant
    targets = [f"evaluate@{variant}"]
    nodes, _ = dvc_runner.stage_graph(root)
    if targets[0] not in nodes:  # fail early on a typo
        known = sorted(n.split("@", 1)[1] for n in nodes if dvc_runner.group_of(n) == "evaluate" and "@" in n)
        raise ValueError(f"scenarios_flow: no stage {targets[0]!r}: variant {variant!r} is not in train.variants "
                         f"(known: {', '.join(known) or 'none'})")
    prefix = name or f"scenarios-{_flow_run_name()}"
    names = {k: f"{prefix}-s{k}" for k in sc.list}
    points = [{"pairs.scenario": k} for k in sc.list]
    logger.info("scenarios %s: %s with %s, %d at a time", prefix, ", ".join(map(str, sc.list)), variant,
                sc.max_parallel)
    failed = _run_experiments(root, fp, list(names.values()), points, targets, sc.max_parallel, True, sc.retries,
                              sc.timeout_s)
    try:
        exps = dvc_runner.experiments(root)
    except RuntimeError as e:
        logger.warning("dvc exp show failed, the report has no metrics: %s", e)
        exps = []
    rows = _scenario_rows(exps, names, failed, variant)
    markdown = scenario_table(rows, variant)
    report = root / sc.report
    write_text(markdown, report)  # atomic: a reader sees the old report or the new one
    create_markdown_artifact(markdown=markdown, key="dpo-scenarios",
                             description=f"scenarios {prefix}: {variant} on pairs.scenario {sc.list} ({sc.report})")
    logger.info("scenarios report: %s\n%s", report, markdown)
    if failed:
        raise RuntimeError(f"scenarios {prefix}: {len(failed)} of {len(names)} experiments failed: "
                           f"{', '.join(failed)} (report: {report})")
    return {"name": prefix, "variant": variant, "experiments": list(names.values()), "rows": rows,
            "report": str(report), "markdown": markdown}


# ============================================================================================ rounds
def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _archive_round(root: Path, rdir: Path, variant: str) -> dict[str, Any]:
    """Copy what a round produced (metrics, candidates, the trained model's record) under rounds/."""
    from pipeline import paths

    if rdir.exists():
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True)
    for rel in [paths.CANDIDATES, paths.PAIRS, paths.metrics_file("policy"), paths.metrics_file("sample"),
                paths.metrics_file("judge"), paths.metrics_file("pairs"), paths.metrics_file("reference"),
                f"metrics/eval/{variant}.json", f"{paths.live_dir(variant)}/metrics.json",
                f"{paths.POLICY_DIR}/pipeline.json", f"{paths.model_dir(variant)}/pipeline.json"]:
        src = root / rel
        if src.is_file():
            dst = rdir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return {
        "policy": _read_json(root / paths.metrics_file("policy")),
        "sample": _read_json(root / paths.metrics_file("sample")),
        "judge": _read_json(root / paths.metrics_file("judge")),
        "pairs": _read_json(root / paths.metrics_file("pairs")),
        "train": _read_json(root / paths.live_dir(variant) / "metrics.json"),
        "eval": _read_json(root / f"metrics/eval/{variant}.json"),
        "policy_source": _read_json(root / paths.POLICY_DIR / "pipeline.json").get("source"),
        "trained_base": _read_json(root / paths.model_dir(variant) / "pipeline.json").get("base_fingerprint"),
    }


def _rounds_report(rows: list[dict[str, Any]], variant: str) -> str:
    cols = ["round", "policy_model", "policy_fingerprint", "policy_test_accuracy", "sample_fingerprint",
            "sample_mean_logprob", "candidate_accuracy", "n_pairs", "train_loss", "train_margin",
            "test_accuracy", "heldout_delta_w", "heldout_delta_l", "heldout_displaced_share",
            "trained_fingerprint", "experiment"]
    return (f"# On-policy rounds ({variant})\n\nRound r > 1 samples from round r-1's trained `{variant}` model "
            "(`policy.model`, warm-up off). Δlp_w / Δlp_l: held-out change of the chosen / rejected "
            "log-probs under training (the displacement the rounds are meant to soften).\n\n"
            + dvc_runner.markdown_table(rows, cols))


@flow(name="dpo-rounds")
def rounds_flow(rounds: int | None = None, variant: str | None = None, overrides: dict[str, Any] | None = None,
                name: str | None = None, repo: str = ".") -> dict[str, Any]:
    """Iterative (on-policy) DPO: R rounds of policy -> sample -> judge -> pairs -> reference ->
    train@<variant> -> evaluate@<variant>. Round 1 is the configured pipeline; round r > 1 sets
    ``policy.model`` to round r-1's trained model (copied to ``rounds/models/<variant>-<fingerprint>``,
    so the path changes whenever the weights do and DVC's run-cache stays right) with the warm-up off.
    Each round's outputs are copied to ``rounds/round_<r>/`` and recorded as the DVC experiment
    ``<name>-round-<r>``; ``rounds/report.md`` compares them. params.yaml is restored at the end."""
    from pipeline import paths
    from pipeline.model import loading

    logger = get_run_logger()
    root = Path(repo).resolve()
    params_path = root / dvc_runner.PARAMS_FILE
    original = params_path.read_text(encoding="utf-8")
    fp = load_flow_params(root)
    rp = fp.rounds
    count = rounds or rp.count
    variant = variant or rp.variant
    prefix = name or f"rounds-{_flow_run_name()}"
    out_dir = root / rp.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".gitignore").write_text("# written by pipeline.flows.rounds_flow: per-round copies, not in git\n*\n")
    rows: list[dict[str, Any]] = []
    try:
        dvc_runner.apply_overrides(root, overrides)
        fp = load_flow_params(root)
        order = dvc_runner.stage_order(root, [f"evaluate@{variant}", f"train@{variant}"])
        logger.info("each round runs: %s", ", ".join(order))
        _pull_run_cache(root, fp.remote)
        prev_model: str | None = None
        for r in range(1, count + 1):
            if prev_model is not None:
                dvc_runner.apply_overrides(root, {"policy.model": prev_model, "policy.warmup.enabled": False})
            logger.info("round %d/%d: policy.model = %s", r, count,
                        (yaml.safe_load(params_path.read_text()) or {}).get("policy", {}).get("model"))
            results = _run_stages(root, order, fp, fp.remote, label=f"r{r}-")
            info = _archive_round(root, out_dir / f"round_{r}", variant)
            trained = root / paths.model_dir(variant)
            trained_fp = loading.fingerprint(trained)
            keep = out_dir / "models" / f"{variant}-{trained_fp}"
            if not keep.exists():
                shutil.copytree(trained, keep)
            exp_name = None
            if rp.save_experiments:
                exp_name = dvc_runner.exp_save(root, f"{prefix}-round-{r}", order, on_line=logger.info,
                                               message=f"on-policy round {r} of {count} ({variant})")
                _push_experiment(root, fp, exp_name)
            ev, held = info["eval"], info["eval"].get("heldout", {})
            rows.append({
                "round": r, "policy_model": info["policy_source"],
                "policy_fingerprint": info["policy"].get("model_fingerprint"),
                "policy_test_accuracy": info["policy"].get("test_accuracy"),
                "sample_fingerprint": info["sample"].get("model_fingerprint"),
                "sample_mean_logprob": info["sample"].get("mean_logprob"),
                "candidate_accuracy": info["judge"].get("candidate_accuracy"),
                "n_pairs": info["pairs"].get("n_pairs"),
                "train_loss": info["train"].get("loss"), "train_margin": info["train"].get("margin"),
                "test_accuracy": ev.get("test_accuracy"), "heldout_delta_w": held.get("delta_w"),
                "heldout_delta_l": held.get("delta_l"), "heldout_displaced_share": held.get("displaced_share"),
                "trained_fingerprint": trained_fp, "trained_from": info["trained_base"],
                "next_policy_model": os.path.relpath(keep, root), "experiment": exp_name,
                "stages": {s: res["status"] for s, res in results.items()},
            })
            prev_model = os.path.relpath(keep, root)
            (out_dir / "rounds.json").write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        if not fp.keep_overrides:
            params_path.write_text(original, encoding="utf-8")
    report = _rounds_report(rows, variant)
    (out_dir / "report.md").write_text(report)
    create_markdown_artifact(markdown=report, key="dpo-rounds", description=f"{count} on-policy rounds ({prefix})")
    create_table_artifact(table=[{k: v for k, v in row.items() if k != "stages"} for row in rows],
                          key="dpo-rounds-table", description=f"{count} on-policy rounds ({prefix})")
    logger.info("rounds report: %s\n%s", out_dir / "report.md", report)
    return {"name": prefix, "rounds": rows, "report": str(out_dir / "report.md")}


# ============================================================================================ cluster
@flow(name="dpo-cluster")
def cluster_flow(overrides: dict[str, Any] | None = None, targets: list[str] | None = None,
                 experiment: str | None = None, repo: str = ".") -> dict[str, Any]:
    """The pipeline across machines: consecutive stages of one resource class (``flows.resources``) run
    as one flow run of that class's deployment (``flows.deployments``: CPU pods for prepare, judge,
    pairs, report; GPU pods for policy, sample, reference, train, evaluate). The pods share
    ``flows.remote``: each segment restores upstream stages from the pushed run-cache, and the last
    segment records the experiment."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    root = Path(repo).resolve()
    fp = load_flow_params(root)
    if not fp.remote:
        raise ValueError("cluster_flow needs flows.remote: the DVC remote the pods share")
    order = dvc_runner.stage_order(root, targets)
    segs = dvc_runner.segments(order, fp.resource_of)
    name = experiment or _flow_run_name()
    runs = []
    for i, (cls, stages) in enumerate(segs):
        last = i == len(segs) - 1
        deployment = fp.deployments[cls]
        logger.info("segment %d/%d on %s (%s): %s", i + 1, len(segs), deployment, cls, ", ".join(stages))
        fr = run_deployment(deployment, parameters={"overrides": overrides, "targets": stages, "record": last and bool(
            overrides or experiment), "experiment": name if last else None}, flow_run_name=f"{name}-{i + 1}-{cls}")
        runs.append({"segment": i + 1, "class": cls, "stages": stages, "flow_run": str(fr.id),
                     "state": fr.state.name if fr.state else None})
        if not (fr.state and fr.state.is_completed()):
            raise RuntimeError(f"segment {i + 1} ({cls}: {', '.join(stages)}) ended {runs[-1]['state']}; "
                               f"see flow run {fr.id}")
    return {"segments": runs}


# ============================================================================================ kubernetes
def kubernetes_job_template(gpus: int = 1) -> dict[str, Any]:
    """Prefect's default Kubernetes base job template (bundled with Prefect) plus GPU requests: the
    variables ``gpu_count`` (``nvidia.com/gpu`` limit; 0 for CPU stages), ``node_selector``,
    ``tolerations`` and ``secret_name`` (a Secret whose keys become env vars: DVC remote and git
    credentials). ``prefect work-pool create <pool> --type kubernetes --base-job-template <file>``."""
    import prefect

    meta = (Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
            / "aggregate-worker-metadata.json")
    tpl = copy.deepcopy(json.loads(meta.read_text())["prefect-kubernetes"]["kubernetes"]
                        ["default_base_job_configuration"])
    pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["envFrom"] = [{"secretRef": {"name": "{{ secret_name }}", "optional": True}}]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    props = tpl["variables"]["properties"]
    props["gpu_count"] = {"title": "GPUs", "type": "integer", "default": gpus, "minimum": 0,
                          "description": "nvidia.com/gpu limit of the pod (0 for CPU-only stages)"}
    props["node_selector"] = {"title": "Node selector", "type": "object", "default": {},
                              "description": "e.g. {\"nvidia.com/gpu.product\": \"NVIDIA-H100-80GB-HBM3\"}"}
    props["tolerations"] = {"title": "Tolerations", "type": "array", "items": {"type": "object"},
                            "default": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    props["secret_name"] = {"title": "Secret with env vars", "type": "string", "default": "dpo-pipeline",
                            "description": "Kubernetes Secret: DVC remote credentials (e.g. AWS_*), GIT token"}
    return tpl


# ============================================================================================ CLI
def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {item!r}")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def main(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(prog="python -m pipeline.flows", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the pipeline flow (one task per DVC stage)")
    r.add_argument("-S", "--set-param", action="append", metavar="KEY=VALUE", help="param override (repeatable)")
    r.add_argument("targets", nargs="*", help="stages to reproduce with their upstream (default: all)")
    r.add_argument("-n", "--name", help="DVC experiment name")
    s = sub.add_parser("sweep", help="a grid of DVC experiments")
    s.add_argument("-G", "--grid", action="append", metavar="KEY=[V1,V2]", help="a grid axis (default: flows.sweep.grid)")
    s.add_argument("-j", "--max-parallel", type=int)
    s.add_argument("-n", "--name")
    s.add_argument("targets", nargs="*")
    c = sub.add_parser("scenarios", help="one DVC experiment per pairs.scenario for one loss, side by side")
    c.add_argument("--variant", help="the train variant (loss) compared (default: flows.scenarios.variant)")
    c.add_argument("--list", dest="scenarios", type=int, nargs="+", choices=(1, 2, 3, 4), metavar="K",
                   help="scenarios to run, e.g. --list 1 3 (default: flows.scenarios.list)")
    c.add_argument("-n", "--name", help="experiment name prefix (experiments <name>-s<k>)")
    o = sub.add_parser("rounds", help="on-policy rounds (iterative DPO)")
    o.add_argument("-R", "--rounds", type=int)
    o.add_argument("--variant")
    o.add_argument("-S", "--set-param", action="append", metavar="KEY=VALUE")
    o.add_argument("-n", "--name")
    sub.add_parser("order", help="print the stages in dvc dag order")
    k = sub.add_parser("k8s-template", help="print a Kubernetes base job template with GPU requests")
    k.add_argument("--gpus", type=int, default=1)
    a = p.parse_args(argv)
    if a.cmd == "run":
        res = pipeline_flow(overrides=_parse_sets(a.set_param) or None, targets=a.targets or None,
                            experiment=a.name, repo=a.repo)
    elif a.cmd == "sweep":
        grid = _parse_sets(a.grid) or None
        if grid and not all(isinstance(v, list) for v in grid.values()):
            raise SystemExit("each --grid value must be a list, e.g. train.variants.dpo.beta=[0.1,0.3]")
        res = sweep_flow(grid=grid, max_parallel=a.max_parallel, targets=a.targets or None, name=a.name,
                         repo=a.repo)
        print(res["markdown"])
        return res
    elif a.cmd == "scenarios":
        res = scenarios_flow(scenarios=a.scenarios, variant=a.variant, name=a.name, repo=a.repo)
        print(res["markdown"])
        return res
    elif a.cmd == "rounds":
        res = rounds_flow(rounds=a.rounds, variant=a.variant, overrides=_parse_sets(a.set_param) or None,
                          name=a.name, repo=a.repo)
        print(Path(res["report"]).read_text())
        return res
    elif a.cmd == "order":
        print("\n".join(dvc_runner.stage_order(a.repo)))
        return None
    else:
        print(json.dumps(kubernetes_job_template(a.gpus), indent=2))
        return None
    print(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
