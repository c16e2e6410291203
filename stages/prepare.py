"""Stage `prepare`: train / test / warm-up prompt sets with gold answers.

Inputs:  params.yaml (``prepare``), and ``prepare.file.path`` when ``prepare.source`` is ``file``.
Outputs: data/prompts.parquet (table ``prompts``), data/quarantine.jsonl (bad input rows, always
         written, possibly empty), metrics/prepare.json (counts).
"""

from __future__ import annotations

import json
import logging

from pipeline import paths
from pipeline.cli import run_stage, stage_parser
from pipeline.data import prompts
from pipeline.io import atomic_path, write_json, write_table
from pipeline.settings.params import Params

log = logging.getLogger("pipeline.prepare")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    # Params
    prep = Params.load(args.params).prepare

    # Work
    rows, quarantine, counts = prompts.collect_prompts(prep)
    split_rows = prompts.split_prompts(rows, prep.n_train, prep.n_test, prep.n_warmup, prep.n_val, prep.split_seed)
    df = prompts.build_prompts_frame(split_rows, prep.instruction)
    metrics = prompts.prepare_metrics(counts, quarantine, split_rows, len(rows))

    # Outputs
    write_table(df, paths.PROMPTS, "prompts")
    with atomic_path(paths.QUARANTINE) as tmp:
        tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine), encoding="utf-8")
    write_json(metrics, paths.metrics_file("prepare"))

    s = metrics["splits"]
    log.info(
        "prepare: source=%s read=%d quarantined=%d duplicates_removed=%d -> train=%d test=%d warmup=%d val=%d (%s)",
        prep.source,
        metrics["rows_read"],
        metrics["quarantined"]["total"],
        metrics["duplicates_removed"],
        s["train"],
        s["test"],
        s["warmup"],
        s["val"],
        paths.PROMPTS,
    )
    if quarantine:
        log.warning(
            "prepare: %d bad input row(s) quarantined (%s), see %s",
            len(quarantine),
            ", ".join(f"{k}: {v}" for k, v in metrics["quarantined"]["by_reason"].items()),
            paths.QUARANTINE,
        )


if __name__ == "__main__":
    run_stage(main)
