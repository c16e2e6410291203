"""Stage `export@<variant>`: the trained model as a Hugging Face folder to share, ``export/models/<variant>``.

The files of ``models/<variant>`` and its model card (README.md) completed with the evaluation figures of
``metrics/eval/<variant>.json``: ``AutoModelForCausalLM.from_pretrained`` loads the folder and
``huggingface_hub.ModelCard.load`` reads its card. A DVC output belongs to one stage, so the card with the
evaluation lives here rather than in ``models/<variant>``, which the train stage writes before evaluation runs.

DVC's cache holds the weights once (the same content as ``models/<variant>``); the workspace holds a second
copy unless the cache links files (``dvc config cache.type hardlink,symlink``), since DVC replaces an
output's files by its cache's link type after the stage."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline import paths
from pipeline.cli import run_stage, stage_parser
from pipeline.io import atomic_dir, read_json
from pipeline.model import card as model_card
from pipeline.settings.train import Training

log = logging.getLogger("pipeline.export")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--variant", required=True, help="a key of train.variants in params.yaml")
    args = parser.parse_args(argv)
    # Params and inputs
    cfg = Training.load(args.params)
    cfg.variant(args.variant)  # an unknown name fails here, naming the key
    model_dir, metrics_file = Path(paths.model_dir(args.variant)), paths.eval_metrics(args.variant)
    card = model_card.load(model_dir / model_card.CARD_FILE)
    metrics = read_json(metrics_file)

    # Work: the card with the evaluation figures
    card = model_card.with_evaluation(card, metrics, source=metrics_file)

    # Output: the model's files, then the completed card, renamed into place together
    with atomic_dir(paths.export_dir(args.variant)) as tmp:
        shutil.copytree(
            model_dir,
            tmp,
            dirs_exist_ok=True,
            copy_function=link_or_copy,
            ignore=shutil.ignore_patterns(model_card.CARD_FILE),
        )
        model_card.save(card, tmp / model_card.CARD_FILE)
    log.info(
        "%s: %s with its model card (test accuracy %.3f)",
        args.variant,
        paths.export_dir(args.variant),
        metrics["test_accuracy"],
    )


def link_or_copy(src: str, dst: str) -> None:
    """A hard link (the stage writes no second copy of the weights), or a copy where the filesystem refuses
    one. Safe because no stage writes a model file in place: each writes a new file and renames it, so a
    linked file never changes under the other name."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


if __name__ == "__main__":
    run_stage(main)
