"""``pipeline_flow``: the DVC pipeline as one Prefect task per stage (``python -m pipeline.flows run``;
deployments ``gpu-box``, ``k8s``, ``k8s-gpu-stages``, ``k8s-cpu-stages``).

(Not named ``pipeline.py``: Prefect loads a deployment's entrypoint file as a top-level module named
after the file, which would shadow the ``pipeline`` package.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pipeline.flows.dag import stage_order
from pipeline.flows.experiments import apply_overrides, exp_save, override_args
from pipeline.flows.settings import load_flow_params
from pipeline.flows.tasks import (
    flow_run_name,
    publish,
    pull_run_cache,
    push_experiment,
    run_stages,
)
from pipeline.settings.base import DEFAULT_PARAMS


@flow(name="dpo-pipeline")
def pipeline_flow(
    overrides: dict[str, Any] | None = None,
    targets: list[str] | None = None,
    experiment: str | None = None,
    record: bool | None = None,
    remote: str | None = None,
    keep_overrides: bool | None = None,
    repo: str = ".",
) -> dict[str, Any]:
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
    params_path = root / DEFAULT_PARAMS
    original = params_path.read_text(encoding="utf-8")
    apply_overrides(root, overrides)
    keep = False
    try:
        fp = load_flow_params(root)  # after the overrides: a run may change its own retries
        keep = fp.keep_overrides if keep_overrides is None else keep_overrides
        remote = remote if remote is not None else fp.remote
        order = stage_order(root, targets)
        logger.info("stages in dvc dag order: %s", ", ".join(order))
        if overrides:
            logger.info("param overrides: %s", " ".join(override_args(overrides)))
        pull_run_cache(root, fp, remote)
        results = run_stages(root, order, fp, remote)
        do_record = record if record is not None else bool(overrides or experiment)
        exp_name = None
        if do_record:
            exp_name = exp_save(
                root,
                experiment or flow_run_name(),
                order,
                message=f"prefect flow run {flow_run_name()}",
                on_line=logger.info,
                tail_lines=fp.log_tail_lines,
            )
            logger.info("recorded as DVC experiment %s (dvc exp show; dvc exp apply %s)", exp_name, exp_name)
            push_experiment(root, fp, exp_name)
        publish(root, fp, results, exp_name)
    finally:
        if overrides and not keep:
            params_path.write_text(original, encoding="utf-8")
    ran = [s for s, r in results.items() if r["status"] == "ran"]
    logger.info("ran %d of %d stages: %s", len(ran), len(order), ", ".join(ran) or "none")
    return {"order": order, "stages": {s: r["status"] for s, r in results.items()}, "ran": ran, "experiment": exp_name}
