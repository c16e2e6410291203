"""Stage `report`: one Markdown report with PNG plots putting the variants side by side, every finding decided
by a test (pipeline/analysis/findings.py), and reports/findings.json with the figures behind the findings.

Inputs:  metrics of the stages; data/pairs.parquet (each pair's edit distance); per variant data/eval/<v>/
         (held-out pairs, greedy answers), data/train/<v>/ (fixed-set and probe curves), dvclive/train/<v>/
         (training batches); data/policy/generations.parquet (the starting policy's answers on the same test
         prompts).
Work:    every figure and finding (pipeline/analysis/report.py), then the Markdown and plots of them
         (pipeline/analysis/report_render.py).
Outputs: reports/main/{report.md, *.png}; reports/findings.json, tracked by git (a fresh clone's docs/results.md
         is generated from it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import paths
from pipeline.analysis.findings import StatSettings, json_safe
from pipeline.analysis.heldout import bucketise
from pipeline.analysis.report import VariantInputs, compute_report, findings_record, read_live_history
from pipeline.analysis.report_render import render_report
from pipeline.cli import run_stage, stage_parser
from pipeline.io import atomic_dir, read_json, read_table, write_json
from pipeline.settings.pairs import PairsParams
from pipeline.settings.report import ReportParams
from pipeline.settings.train import Training

log = logging.getLogger("pipeline.report")


def _optional_table(path: str, table: str):
    return read_table(path, table) if Path(path).is_file() else None


def _read_variant(variant: str) -> VariantInputs:
    return VariantInputs(
        eval=read_json(paths.eval_metrics(variant)),
        pairs=read_table(paths.eval_table(variant), "pair_eval"),
        answers=read_table(paths.eval_generations(variant), "generations"),
        history=read_live_history(paths.live_dir(variant)),
        fixed=_optional_table(paths.fixed_curves(variant), "fixed_curves"),
        probe=_optional_table(paths.probe_curves(variant), "probe_curves"),
    )


class Settings(Training):
    """The sections of params.yaml this stage reads."""

    report: ReportParams
    pairs: PairsParams


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    # Params
    cfg = Settings.load(args.params)
    settings = StatSettings.from_params(cfg.report)

    # Inputs
    start_answers = read_table(paths.POLICY_GENERATIONS, "generations")
    variants = {v: _read_variant(v) for v in sorted(cfg.train.variants)}
    distances = read_table(paths.PAIRS, "pairs").select("pair_id", "edit_distance_norm")
    distances = distances.with_columns(bucketise(distances, cfg.pairs.distance_buckets))
    stage_metrics = {
        s: read_json(paths.metrics_file(s))
        for s in ("prepare", "sample", "judge", "pairs")
        if Path(paths.metrics_file(s)).is_file()
    }

    # Compute
    figures = compute_report(start_answers, variants, stage_metrics, settings, distances)

    # Render and outputs: the folder is written whole, then renamed into place
    with atomic_dir(paths.REPORT_DIR) as tmp:
        (tmp / "report.md").write_text(render_report(cfg.report.title, figures, tmp), encoding="utf-8")
    write_json(json_safe(findings_record(figures)), paths.FINDINGS)
    fired = [f"{v}: {f['kind']}" for v, fs in figures["findings"].items() for f in fs if f["fired"]]
    log.info(
        "report written to %s/report.md; findings that passed their tests: %s",
        paths.REPORT_DIR,
        ", ".join(fired) or "none",
    )


if __name__ == "__main__":
    run_stage(main)
