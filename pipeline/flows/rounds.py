"""``rounds_flow``: iterative (on-policy) DPO, each round sampling from the previous round's trained
model (``python -m pipeline.flows rounds``; deployments ``gpu-box-rounds``, ``k8s-rounds``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline import paths
from pipeline.flows.dag import stage_order
from pipeline.flows.experiments import apply_overrides, exp_save
from pipeline.flows.settings import load_flow_params
from pipeline.flows.tables import markdown_table
from pipeline.flows.tasks import (
    flow_run_name,
    pull_run_cache,
    push_experiment,
    run_stages,
)
from pipeline.settings.base import DEFAULT_PARAMS

ROUND_COLUMNS = [
    "round",
    "policy_model",
    "policy_fingerprint",
    "policy_test_accuracy",
    "sample_fingerprint",
    "sample_mean_logprob",
    "candidate_accuracy",
    "n_pairs",
    "train_loss",
    "train_delta_margin",
    "test_accuracy",
    "heldout_delta_w",
    "heldout_delta_l",
    "heldout_displaced_share",
    "trained_fingerprint",
    "experiment",
]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def archive_round(root: Path, rdir: Path, variant: str) -> dict[str, Any]:
    """Copy what a round produced (metrics, candidates, the trained model's record) to ``rdir``; return
    the metrics it read."""
    if rdir.exists():
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True)
    for rel in [
        paths.CANDIDATES,
        paths.PAIRS,
        paths.metrics_file("policy"),
        paths.metrics_file("sample"),
        paths.metrics_file("judge"),
        paths.metrics_file("pairs"),
        paths.metrics_file("reference"),
        paths.eval_metrics(variant),
        f"{paths.live_dir(variant)}/metrics.json",
        f"{paths.POLICY_DIR}/pipeline.json",
        f"{paths.model_dir(variant)}/pipeline.json",
    ]:
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
        "eval": _read_json(root / paths.eval_metrics(variant)),
        "policy_source": _read_json(root / paths.POLICY_DIR / "pipeline.json").get("source"),
        "trained_base": _read_json(root / paths.model_dir(variant) / "pipeline.json").get("base_fingerprint"),
    }


def rounds_report(rows: list[dict[str, Any]], variant: str) -> str:
    return (
        f"# On-policy rounds ({variant})\n\nRound r > 1 samples from round r-1's trained `{variant}` model "
        "(`policy.model`, warm-up off). Δlp_w / Δlp_l: held-out change of the chosen / rejected "
        "log-probs under training (the displacement the rounds are meant to soften).\n\n"
        + markdown_table(rows, ROUND_COLUMNS)
    )


def keep_trained(root: Path, out_dir: Path, variant: str) -> tuple[str, Path]:
    """A copy of the round's trained model under ``<out_dir>/models/<variant>-<fingerprint>`` (the next round's
    ``policy.model``: its path changes whenever the weights do, so DVC's run-cache stays right); its
    fingerprint and path."""
    from pipeline.model import loading  # torch: only when the flow runs

    trained = root / paths.model_dir(variant)
    trained_fp = loading.fingerprint(trained)
    keep = out_dir / "models" / f"{variant}-{trained_fp}"
    if not keep.exists():
        shutil.copytree(trained, keep)
    return trained_fp, keep


def round_row(r: int, info: dict[str, Any], trained_fp: str, next_model: str, exp_name: str | None) -> dict[str, Any]:
    """The report's row of round ``r`` from what :func:`archive_round` read."""
    ev, held = info["eval"], info["eval"].get("heldout", {})
    return {
        "round": r,
        "policy_model": info["policy_source"],
        "policy_fingerprint": info["policy"].get("model_fingerprint"),
        "policy_test_accuracy": info["policy"].get("test_accuracy"),
        "sample_fingerprint": info["sample"].get("model_fingerprint"),
        "sample_mean_logprob": info["sample"].get("mean_logprob"),
        "candidate_accuracy": info["judge"].get("candidate_accuracy"),
        "n_pairs": info["pairs"].get("n_pairs"),
        "train_loss": info["train"].get("loss"),
        "train_delta_margin": info["train"].get("delta_margin"),
        "test_accuracy": ev.get("test_accuracy"),
        "heldout_delta_w": held.get("delta_w"),
        "heldout_delta_l": held.get("delta_l"),
        "heldout_displaced_share": held.get("displaced_share"),
        "trained_fingerprint": trained_fp,
        "trained_from": info["trained_base"],
        "next_policy_model": next_model,
        "experiment": exp_name,
    }


@flow(name="dpo-rounds")
def rounds_flow(
    rounds: int | None = None,
    variant: str | None = None,
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
    repo: str = ".",
) -> dict[str, Any]:
    """Iterative (on-policy) DPO: R rounds of policy -> sample -> judge -> pairs -> reference ->
    train@<variant> -> evaluate@<variant>. Round 1 is the configured pipeline; round r > 1 sets
    ``policy.model`` to round r-1's trained model (copied to ``rounds/models/<variant>-<fingerprint>``,
    so the path changes whenever the weights do and DVC's run-cache stays right) with the warm-up off.
    Each round's outputs are copied to ``rounds/round_<r>/`` and recorded as the DVC experiment
    ``<name>-round-<r>``; ``rounds/report.md`` compares them. params.yaml is restored at the end."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    params_path = root / DEFAULT_PARAMS
    original = params_path.read_text(encoding="utf-8")
    fp = load_flow_params(root)
    rp = fp.rounds
    count = rounds or rp.count
    variant = variant or rp.variant
    prefix = name or f"rounds-{flow_run_name()}"
    out_dir = root / rp.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".gitignore").write_text("# written by pipeline.flows.rounds_flow: per-round copies, not in git\n*\n")
    rows: list[dict[str, Any]] = []
    try:
        apply_overrides(root, overrides)
        fp = load_flow_params(root)
        order = stage_order(root, [f"evaluate@{variant}", f"train@{variant}"])
        logger.info("each round runs: %s", ", ".join(order))
        pull_run_cache(root, fp, fp.remote)
        prev_model: str | None = None
        for r in range(1, count + 1):
            if prev_model is not None:
                apply_overrides(root, {"policy.model": prev_model, "policy.warmup.enabled": False})
            logger.info(
                "round %d/%d: policy.model = %s",
                r,
                count,
                (yaml.safe_load(params_path.read_text()) or {}).get("policy", {}).get("model"),
            )
            results = run_stages(root, order, fp, fp.remote, label=f"r{r}-")
            info = archive_round(root, out_dir / f"round_{r}", variant)
            trained_fp, keep = keep_trained(root, out_dir, variant)
            exp_name = None
            if rp.save_experiments:
                exp_name = exp_save(
                    root,
                    f"{prefix}-round-{r}",
                    order,
                    on_line=logger.info,
                    message=f"on-policy round {r} of {count} ({variant})",
                    tail_lines=fp.log_tail_lines,
                )
                push_experiment(root, fp, exp_name)
            row = round_row(r, info, trained_fp, os.path.relpath(keep, root), exp_name)
            rows.append({**row, "stages": {s: res["status"] for s, res in results.items()}})
            prev_model = os.path.relpath(keep, root)
            (out_dir / "rounds.json").write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        if not fp.keep_overrides:
            params_path.write_text(original, encoding="utf-8")
    report = rounds_report(rows, variant)
    (out_dir / "report.md").write_text(report)
    create_markdown_artifact(markdown=report, key="dpo-rounds", description=f"{count} on-policy rounds ({prefix})")
    create_table_artifact(
        table=[{k: v for k, v in row.items() if k != "stages"} for row in rows],
        key="dpo-rounds-table",
        description=f"{count} on-policy rounds ({prefix})",
    )
    logger.info("rounds report: %s\n%s", out_dir / "report.md", report)
    return {"name": prefix, "rounds": rows, "report": str(out_dir / "report.md")}
