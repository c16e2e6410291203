"""Stage `report`: one Markdown report with PNG plots putting the variants side by side."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import paths
from pipeline.cli import run_stage, stage_parser
from pipeline.config import load_params
from pipeline.io import atomic_dir, read_json
from pipeline.analysis.report import build_report, read_live_history

log = logging.getLogger("pipeline.report")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    # Inputs and params
    cfg = load_params(args.params)
    variants = sorted(cfg.variants)
    policy = read_json(paths.metrics_file("policy"))
    evals = {v: read_json(paths.eval_metrics(v)) for v in variants}
    histories = {v: read_live_history(paths.live_dir(v)) for v in variants}
    stage_metrics = {s: read_json(paths.metrics_file(s)) for s in ("prepare", "sample", "judge", "pairs")
                     if Path(paths.metrics_file(s)).is_file()}

    # Work and outputs: the folder is written whole, then renamed into place
    with atomic_dir(paths.REPORT_DIR) as tmp:
        text = build_report(cfg.report.title, policy, evals, histories, stage_metrics, tmp)
        (tmp / "report.md").write_text(text, encoding="utf-8")
    log.info("report written to %s/report.md", paths.REPORT_DIR)


if __name__ == "__main__":
    run_stage(main)
