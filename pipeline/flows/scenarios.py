"""``scenarios_flow``: the four data scenarios of Yan et al., "3D-Properties: Identifying Challenges
in DPO and Charting a Path Forward" (arXiv:2406.07327, Table 4: where chosen and rejected come from)
for one loss, one DVC experiment each, compared side by side in a report (``python -m pipeline.flows
scenarios``; deployment ``gpu-box-scenarios``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline import paths
from pipeline.flows.experiments import experiments
from pipeline.flows.settings import load_flow_params, parse_flow_params
from pipeline.flows.tasks import Schedule, check_evaluate_targets, flow_run_name, run_experiments
from pipeline.settings.base import merged


def scenario_rows(
    exps: list[dict[str, Any]], names: Mapping[int, str], failed: list[str], variant: str
) -> list[dict[str, Any]]:
    """The input of :func:`pipeline.analysis.scenarios.scenario_table`: per scenario its experiment's status and the
    contents of metrics/pairs.json and metrics/eval/<variant>.json (from ``dvc exp show``)."""
    by_name = {e["name"]: e for e in exps}
    rows = []
    for k, exp in names.items():
        files = (by_name.get(exp) or {}).get("metric_files") or {}
        rows.append(
            {
                "scenario": k,
                "status": "failed" if exp in failed else "done",
                "experiment": exp,
                "pairs": files.get(paths.metrics_file("pairs")) or {},
                "eval": files.get(paths.eval_metrics(variant)) or {},
            }
        )
    return rows


@flow(name="dpo-scenarios")
def scenarios_flow(
    scenarios: list[int] | None = None, variant: str | None = None, name: str | None = None, repo: str = "."
) -> dict[str, Any]:
    """The data scenarios side by side for one loss: one DVC experiment per ``pairs.scenario``
    (default ``flows.scenarios.list``), each ``dvc exp run --temp -S pairs.source=judged -S
    pairs.scenario=<k> evaluate@<variant>`` (so only the stages that variant needs run), at most
    ``flows.scenarios.max_parallel`` at once after the first (which runs alone: prepare, policy, sample
    and judge are shared and land in DVC's run-cache once). Then ``flows.scenarios.report`` (and the
    markdown artifact ``dpo-scenarios``) puts the experiments' pair and evaluation metrics side by side,
    one column per scenario. The same experiments as a sweep with
    ``flows.sweep.grid: {pairs.source: [judged], pairs.scenario: [1, 2, 3, 4]}``."""
    from pipeline.analysis.scenarios import scenario_table
    from pipeline.io import write_text

    logger = get_run_logger()
    root = Path(repo).resolve()
    changes: dict[str, Any] = {}
    if scenarios is not None:
        changes["list"] = list(scenarios)
    if variant:
        changes["variant"] = variant
    # the arguments over flows.scenarios of params.yaml, validated together
    fp = parse_flow_params(merged(load_flow_params(root).model_dump(), {"scenarios": changes}), source="scenarios_flow")
    sc = fp.scenarios
    variant = sc.variant
    targets = check_evaluate_targets(root, [variant], "scenarios_flow")
    prefix = name or f"scenarios-{flow_run_name()}"
    names: dict[int, str] = {k: f"{prefix}-s{k}" for k in sc.list}
    # scenarios are of judged pairs, whatever pairs.source says (constructed pairs have none)
    points = [{"pairs.source": "judged", "pairs.scenario": k} for k in sc.list]
    logger.info(
        "scenarios %s: %s with %s, %d at a time", prefix, ", ".join(map(str, sc.list)), variant, sc.max_parallel
    )
    failed = run_experiments(root, fp, dict(zip(names.values(), points)), targets, Schedule.of(sc))
    try:
        exps = experiments(root)
    except RuntimeError as e:
        logger.warning("dvc exp show failed, the report has no metrics: %s", e)
        exps = []
    rows = scenario_rows(exps, names, failed, variant)
    markdown = scenario_table(rows, variant)
    report = root / sc.report
    write_text(markdown, report)  # atomic: a reader sees the old report or the new one
    create_markdown_artifact(
        markdown=markdown,
        key="dpo-scenarios",
        description=f"scenarios {prefix}: {variant} on pairs.scenario {sc.list} ({sc.report})",
    )
    logger.info("scenarios report: %s\n%s", report, markdown)
    if failed:
        raise RuntimeError(
            f"scenarios {prefix}: {len(failed)} of {len(names)} experiments failed: "
            f"{', '.join(failed)} (report: {report})"
        )
    return {
        "name": prefix,
        "variant": variant,
        "experiments": list(names.values()),
        "rows": rows,
        "report": str(report),
        "markdown": markdown,
    }
