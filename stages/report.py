"""Stage `report`: one Markdown report with PNG plots putting the variants side by side, every finding decided
by a test (pipeline/analysis/findings.py), and findings.json with every figure behind it.

Inputs:  metrics of the stages; data/pairs.parquet (each pair's edit distance); per variant data/eval/<v>/ (held-out pairs, greedy answers),
         data/train/<v>/ (fixed-set and probe curves), dvclive/train/<v>/ (training batches);
         data/policy/generations.parquet (the starting policy's answers on the same test prompts).
Outputs: reports/main/{report.md, findings.json, *.png}.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import paths
from pipeline.analysis.findings import StatSettings, json_safe
from pipeline.analysis.heldout import bucketise
from pipeline.analysis.report import VariantInputs, build_report, read_live_history
from pipeline.cli import run_stage, stage_parser
from pipeline.settings.pairs import PairsParams
from pipeline.settings.report import ReportParams
from pipeline.settings.train import Training
from pipeline.io import atomic_dir, read_json, read_table, write_json

log = logging.getLogger("pipeline.report")


def _optional_table(path: str, table: str):
    return read_table(path, table) if Path(path).is_file() else None


class Settings(Training):
    """The sections of params.yaml this stage reads."""

    report: ReportParams
    pairs: PairsParams


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    # Inputs and params
    cfg = Settings.load(args.params)
    settings = StatSettings.from_params(cfg.report)
    start_answers = read_table(paths.POLICY_GENERATIONS, "generations")
    variants = {v: VariantInputs(eval=read_json(paths.eval_metrics(v)),
                                 pairs=read_table(paths.eval_table(v), "pair_eval"),
                                 answers=read_table(paths.eval_generations(v), "generations"),
                                 history=read_live_history(paths.live_dir(v)),
                                 fixed=_optional_table(paths.fixed_curves(v), "fixed_curves"),
                                 probe=_optional_table(paths.probe_curves(v), "probe_curves"))
                for v in sorted(cfg.train.variants)}
    distances = read_table(paths.PAIRS, "pairs").select("pair_id", "edit_distance_norm")
    distances = distances.with_columns(bucketise(distances, cfg.pairs.distance_buckets))
    stage_metrics = {s: read_json(paths.metrics_file(s)) for s in ("prepare", "sample", "judge", "pairs")
                     if Path(paths.metrics_file(s)).is_file()}

    # Work and outputs: the folder is written whole, then renamed into place
    with atomic_dir(paths.REPORT_DIR) as tmp:
        text, figures = build_report(cfg.report.title, start_answers, variants, stage_metrics, tmp, settings,
                                     distances)
        (tmp / "report.md").write_text(text, encoding="utf-8")
        write_json(json_safe(figures), tmp / "findings.json")
    fired = [f"{v}: {f['kind']}" for v, r in figures["variants"].items() for f in r["findings"] if f["fired"]]
    log.info("report written to %s/report.md; findings that passed their tests: %s", paths.REPORT_DIR,
             ", ".join(fired) or "none")


if __name__ == "__main__":
    run_stage(main)
