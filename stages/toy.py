"""DVC stage ``toy``: the 3D-properties toy model (seed 001 §3.2) for every loss × scenario.

Reads the ``toy:`` section of ``params.yaml`` (:class:`pipeline.analysis.toy.ToyParams`) and writes, each
atomically:

- ``data/toy/history.parquet``: the long per-step table of :func:`pipeline.analysis.toy.run_toy`;
- ``reports/toy/scenario_<s>.png``: one figure per scenario (the folder is replaced as a whole);
- ``metrics/toy.json``: initial, peak and final probabilities per loss and scenario.

Run as ``python -m stages.toy`` from the repository root.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.cli import setup_logging, stage_parser
from pipeline.config import load_params
from pipeline.io import atomic_dir, atomic_path, write_json
from pipeline.analysis.toy import final_metrics, plot_toy, run_toy

log = logging.getLogger("pipeline.analysis.toy")
HISTORY = Path("data/toy/history.parquet")
REPORTS = Path("reports/toy")
METRICS = Path("metrics/toy.json")


def main(argv: list[str] | None = None, root: str | Path = ".") -> dict:
    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    setup_logging()
    # Params
    root = Path(root)
    params = load_params(args.params).toy

    # Work
    t0 = time.perf_counter()
    df = run_toy(params)
    elapsed = time.perf_counter() - t0

    # Outputs
    with atomic_path(root / HISTORY) as tmp:
        df.write_parquet(tmp)
    with atomic_dir(root / REPORTS) as tmp_dir:
        plot_toy(df, tmp_dir)
    metrics = final_metrics(df)
    write_json(metrics, root / METRICS)
    log.info("%d losses x %d scenarios x %d steps in %.1fs -> %s, %s/, %s", len(params.losses),
             len(params.scenarios), params.steps, elapsed, root / HISTORY, root / REPORTS, root / METRICS)
    return metrics


if __name__ == "__main__":
    main()
