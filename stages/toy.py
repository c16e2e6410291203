"""Stage `toy`: the toy model of the 3D-properties paper (Yan et al. 2024, arXiv 2406.07327, §3.2)
for every loss × scenario.

Reads the ``toy:`` section of ``params.yaml`` (:class:`pipeline.analysis.toy_settings.ToyParams`) and writes, each
atomically:

- ``data/toy/history.parquet``: the long per-step table of :func:`pipeline.analysis.toy.run_toy`;
- ``reports/toy/scenario_<s>.png``: one figure per scenario, the mean over seeds and their range
  (the folder is replaced as a whole);
- ``metrics/toy.json``: per loss and scenario, over the seeds: initial, peak and final probabilities
  and their changes from the initial values, with t intervals.

Run as ``python -m stages.toy`` from the repository root.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline import paths
from pipeline.analysis.toy import run_toy
from pipeline.analysis.toy_report import final_metrics, plot_toy
from pipeline.analysis.toy_settings import ToyParams
from pipeline.cli import run_stage, stage_parser
from pipeline.io import atomic_dir, atomic_path, write_json
from pipeline.settings.base import StageParams

log = logging.getLogger("pipeline.toy")


class Settings(StageParams):
    """The sections of params.yaml this stage reads."""

    toy: ToyParams


def main(argv: list[str] | None = None, root: str | Path = ".") -> dict:
    args = stage_parser(__doc__).parse_args(argv)
    # Params
    root = Path(root)
    history, reports, metrics_path = (
        root / paths.TOY_HISTORY,
        root / paths.TOY_REPORTS,
        root / paths.metrics_file("toy"),
    )
    params = Settings.load(args.params).toy

    # Work
    t0 = time.perf_counter()
    df = run_toy(params)
    elapsed = time.perf_counter() - t0

    # Outputs
    with atomic_path(history) as tmp:
        df.write_parquet(tmp)
    with atomic_dir(reports) as tmp_dir:
        plot_toy(df, tmp_dir)
    metrics = final_metrics(df, params.confidence)
    write_json(metrics, metrics_path)
    log.info(
        "%d seeds x %d losses x %d scenarios x %d steps in %.1fs -> %s, %s/, %s",
        len(params.seeds),
        len(params.losses),
        len(params.scenarios),
        params.steps,
        elapsed,
        history,
        reports,
        metrics_path,
    )
    return metrics


if __name__ == "__main__":
    run_stage(main)
