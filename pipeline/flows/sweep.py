"""``sweep_flow``: a grid over params, one ``dvc exp run --temp`` experiment per point, compared in
a table (``python -m pipeline.flows sweep``; deployments ``gpu-box-sweep``, ``k8s-sweep``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from pipeline.flows.dag import expand_targets, stage_graph
from pipeline.flows.experiments import experiments, grid_points, select_metrics
from pipeline.flows.settings import SweepParams, load_flow_params
from pipeline.flows.tables import markdown_table, short_metric
from pipeline.flows.tasks import Schedule, artifact_key, flow_run_name, run_experiments


@flow(name="dpo-sweep")
def sweep_flow(
    grid: dict[str, list[Any]] | None = None,
    max_parallel: int | None = None,
    targets: list[str] | None = None,
    name: str | None = None,
    repo: str = ".",
) -> dict[str, Any]:
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
    grid = SweepParams(**{**sp.model_dump(), "grid": grid}).grid  # validated: every key has values
    parallel = max_parallel or sp.max_parallel
    targets = list(targets if targets is not None else sp.targets)
    if targets:
        nodes, _ = stage_graph(root)
        expand_targets(targets, nodes)  # fail early on a typo
    prefix = name or f"sweep-{flow_run_name()}"
    points = grid_points(grid)
    names = [f"{prefix}-{i + 1}" for i in range(len(points))]
    logger.info("sweep %s: %d experiments over %s, %d at a time", prefix, len(points), ", ".join(grid), parallel)
    schedule = Schedule(parallel, sp.warm_start, sp.retries, sp.timeout_s)
    failed = run_experiments(root, fp, dict(zip(names, points)), targets, schedule)

    by_name = {e["name"]: e for e in experiments(root)}
    rows = []
    for exp, point in zip(names, points):
        e = by_name.get(exp)
        row: dict[str, Any] = {"experiment": exp, "status": "failed" if exp in failed else "done"}
        row.update({k: (e["params"].get(k.lstrip("+"), v) if e else v) for k, v in point.items()})
        if e:
            row.update({short_metric(m): v for m, v in select_metrics(e["metrics"], sp.metrics).items()})
        rows.append(row)
    table = markdown_table(rows)
    create_table_artifact(
        table=rows,
        key=artifact_key(f"sweep-{prefix}"),
        description=f"sweep {prefix}: params and metrics of each experiment (dvc exp show)",
    )
    logger.info("sweep %s:\n%s", prefix, table)
    if failed:
        # the failing tasks already raised with the experiment's name and log tail
        raise RuntimeError(f"sweep {prefix}: {len(failed)} of {len(points)} experiments failed: {', '.join(failed)}")
    return {"name": prefix, "experiments": names, "table": rows, "markdown": table}
