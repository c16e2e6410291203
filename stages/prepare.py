"""prepare: train / test / warmup prompt sets with gold answers.

    python -m stages.prepare [--params params.yaml]

Inputs:  params.yaml (``prepare``), and ``prepare.file.path`` when ``prepare.source`` is ``file``.
Outputs: data/prompts.parquet (table ``prompts``), data/quarantine.jsonl (bad input rows, always
         written, possibly empty), metrics/prepare.json (counts).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.data import prompts
from pipeline.config import DEFAULT_PARAMS, load_params
from pipeline.io import atomic_path, write_json, write_table

PROMPTS_OUT = "data/prompts.parquet"
QUARANTINE_OUT = "data/quarantine.jsonl"
METRICS_OUT = "metrics/prepare.json"

log = logging.getLogger("pipeline.prepare")


def main(argv: list[str] | None = None) -> int:
    # ---------------------------------------------------------------- inputs
    ap = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    args = ap.parse_args(argv)

    # ---------------------------------------------------------------- params
    prep = load_params(args.params).prepare

    # ---------------------------------------------------------------- work
    rows, quarantine, counts = prompts.collect_prompts(prep)
    split_rows = prompts.split_prompts(rows, prep.n_train, prep.n_test, prep.n_warmup, prep.split_seed)
    df = prompts.build_prompts_frame(split_rows, prep.instruction)
    metrics = prompts.prepare_metrics(counts, quarantine, split_rows, len(rows))

    # ---------------------------------------------------------------- outputs
    write_table(df, PROMPTS_OUT, "prompts")
    with atomic_path(QUARANTINE_OUT) as tmp:
        tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine), encoding="utf-8")
    write_json(metrics, METRICS_OUT)

    s = metrics["splits"]
    log.info("prepare: source=%s read=%d quarantined=%d duplicates_removed=%d -> train=%d test=%d warmup=%d "
             "(%s)", prep.source, metrics["rows_read"], metrics["quarantined"]["total"],
             metrics["duplicates_removed"], s["train"], s["test"], s["warmup"], PROMPTS_OUT)
    if quarantine:
        log.warning("prepare: %d bad input row(s) quarantined (%s), see %s", len(quarantine),
                    ", ".join(f"{k}: {v}" for k, v in metrics["quarantined"]["by_reason"].items()), QUARANTINE_OUT)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main())
    except ValueError as e:  # ConfigError, PromptFileError and bad settings: a clear one-line message
        log.error("%s", e)
        sys.exit(1)
