"""Stage `train@<variant>`: preference training of the starting policy with one variant's loss."""

from __future__ import annotations

import logging

import polars as pl

from pipeline import modeling, paths
from pipeline.cli import setup_logging, stage_parser
from pipeline.config import ConfigError, load_params
from pipeline.io import read_table
from pipeline.training import PairExample, train_preference

log = logging.getLogger("pipeline.train")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--variant", required=True, help="a key of train.variants in params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    # Inputs and params
    cfg = load_params(args.params)
    if args.variant not in cfg.variants:
        raise ConfigError(f"{args.params}: train.variants.{args.variant}: no such variant "
                          f"(have {sorted(cfg.variants)})")
    variant = cfg.variants[args.variant]
    s = variant.settings
    pairs = read_table(paths.PAIRS, "pairs").filter(pl.col("split") == "train")
    ref = read_table(paths.REFERENCE, "reference")
    data = pairs.join(ref.select("pair_id", "ref_w", "ref_l"), on="pair_id", how="left")
    if data["ref_w"].null_count():
        raise ValueError(f"{paths.REFERENCE}: missing reference log-probs for "
                         f"{data['ref_w'].null_count()} training pairs; rerun the reference stage")
    examples = [PairExample(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]),
                            r["ref_w"], r["ref_l"]) for r in data.iter_rows(named=True)]
    model = modeling.load_model(paths.POLICY_DIR, cfg.policy.dtype, modeling.device_for())
    tokenizer = modeling.load_tokenizer(paths.POLICY_DIR)

    # Work: metrics go to dvclive step by step (curves in `dvc plots`)
    from dvclive import Live

    with Live(dir=paths.live_dir(args.variant), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        live.log_params({"variant": args.variant, "losses": [t.model_dump() for t in variant.losses],
                         **s.model_dump(), "n_pairs": len(examples)})

        def log_step(step: int, metrics: dict[str, float]) -> None:
            for k, v in metrics.items():
                live.log_metric(k, v)
            live.next_step()

        history = train_preference(model, examples, variant.losses, lr=s.lr, epochs=s.epochs,
                                   batch_size=s.batch_size, grad_accum=s.grad_accum, max_length=s.max_length,
                                   seed=s.seed, pad_id=tokenizer.pad_token_id, weight_decay=s.weight_decay,
                                   warmup_steps=s.warmup_steps, max_grad_norm=s.max_grad_norm, log_fn=log_step,
                                   progress=f"train {args.variant}")

    # Outputs
    modeling.save_model(model, tokenizer, paths.model_dir(args.variant),
                        {"variant": args.variant, "losses": [t.model_dump() for t in variant.losses],
                         "settings": s.model_dump(), "steps": len(history),
                         "base_fingerprint": modeling.fingerprint(paths.POLICY_DIR)})
    last = history[-1]
    log.info("%s: %d steps, final loss %.4f, lp_w %.2f, lp_l %.2f, accuracy %.2f", args.variant, len(history),
             last["loss"], last["lp_w"], last["lp_l"], last["accuracy"])


if __name__ == "__main__":
    main()
