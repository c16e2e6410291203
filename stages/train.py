"""Stage `train@<variant>`: preference training of the starting policy with one variant's loss.

Launched the same way on a laptop and on a GPU node: with `train.runtime.nproc > 1` the stage
re-executes itself under torchrun (DDP, or FSDP2 by `train.runtime.strategy`)."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import polars as pl

from pipeline.training import distributed as D
from pipeline import paths
from pipeline.model import card as model_card
from pipeline.model import loading
from pipeline.data import tagging
from pipeline.cli import run_stage, stage_parser
from pipeline.settings.evaluate import BeforeAndAfter
from pipeline.settings.pairs import PairsParams
from pipeline.settings.train import ReferenceAndTraining
from pipeline.io import atomic_dir, read_table, write_table
from pipeline.schema import schema_of
from pipeline.training.trainer import Checkpointing, Curves, FixedSets, PairExample, Probe, train_preference

log = logging.getLogger("pipeline.train")


class Settings(ReferenceAndTraining, BeforeAndAfter):
    """The sections of params.yaml this stage reads."""

    pairs: PairsParams


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = stage_parser(__doc__)
    parser.add_argument("--variant", required=True, help="a key of train.variants in params.yaml")
    args = parser.parse_args(argv)
    # Params (and, for several processes, the torchrun relaunch)
    cfg = Settings.load(args.params)
    variant, rt = cfg.variant(args.variant), cfg.train.runtime
    s = variant.settings
    if rt.nproc > 1 and not D.under_torchrun():
        sys.exit(D.relaunch_with_torchrun(rt.nproc, "stages.train", argv))
    ctx = D.init(rt)

    # Inputs
    all_pairs = read_table(paths.PAIRS, "pairs")
    pairs = all_pairs.filter(pl.col("split") == "train")
    ref = read_table(paths.REFERENCE, "reference")
    prompts = read_table(paths.PROMPTS, "prompts")
    data = pairs.join(ref.select("pair_id", "ref_w", "ref_l"), on="pair_id", how="left")
    if data["ref_w"].null_count():
        raise ValueError(f"{paths.REFERENCE}: missing reference log-probs for "
                         f"{data['ref_w'].null_count()} training pairs; rerun the reference stage")
    examples = _examples(data)
    # What the model card records the model was trained on
    fingerprint = model_card.data_fingerprint(paths.PAIRS, paths.REFERENCE, n_train=len(examples),
                                              n_heldout=int((all_pairs["split"] == "heldout").sum()),
                                              scenarios=all_pairs["scenario"].unique().to_list())
    buckets = [tagging.bucket_slug(tagging.bucket_of(v, cfg.pairs.distance_buckets)) for v in data["edit_distance_norm"]]
    # The same pairs and prompts at every evaluation, for every variant: all held-out pairs, the first
    # training pairs by id, the first test prompts by id.
    heldout = all_pairs.filter(pl.col("split") == "heldout").join(ref.select("pair_id", "ref_w", "ref_l"),
                                                                   on="pair_id", how="left")
    fixed = FixedSets({name: _fixed_set(rows) for name, rows in (("heldout", heldout.sort("pair_id")),
                                                                 ("train", data.sort("pair_id").head(s.eval_train_pairs)))},
                      s.eval_every, cfg.evaluate.batch_size) if s.eval_every else None
    probe_set = prompts.filter(pl.col("split") == "test").sort("prompt_id").head(s.probe_prompts)
    probe = Probe(tuple(probe_set["prompt"]), s.probe_every, cfg.evaluate.generation.max_new_tokens,
                  tuple(probe_set["prompt_id"])) if s.probe_every else None
    model = loading.load_model(paths.POLICY_DIR, cfg.policy.dtype, ctx.device)
    tokenizer = loading.load_tokenizer(paths.POLICY_DIR)
    checkpoint = None
    if rt.checkpoint_every:
        key = _run_key(variant.model_dump(), [paths.PAIRS, paths.REFERENCE, paths.PROMPTS, paths.POLICY_DIR])
        checkpoint = Checkpointing(str(Path(rt.checkpoint_dir) / f"{args.variant}-{key}.pt"), rt.checkpoint_every, key)

    # Work: metrics go to dvclive step by step (curves in `dvc plots`), from rank 0 only
    from dvclive import Live

    live = Live(dir=paths.live_dir(args.variant), dvcyaml=None, save_dvc_exp=False, report=None) \
        if ctx.is_main else None
    if live is not None:
        live.log_params({"variant": args.variant, "losses": [t.model_dump() for t in variant.losses],
                         **s.model_dump(), "n_pairs": len(examples), "world_size": ctx.world})

    def log_step(step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            live.log_metric(k, v)
        live.next_step()

    curves = Curves()
    history = train_preference(model, examples, variant.losses, s, pad_id=tokenizer.pad_token_id, ctx=ctx,
                               log_fn=log_step if live else None, progress=f"train {args.variant}",
                               buckets=buckets, probe=probe, tokenizer=tokenizer, fixed=fixed, curves=curves,
                               checkpoint=checkpoint)

    # Outputs (the full state dict is gathered on every rank; rank 0 writes)
    state = D.full_state_dict(model, ctx)
    if ctx.is_main:
        check = live.summary["ref_check"] = ref_check(history, s.ref_check_tol)
        live.end()
        out = loading.load_model(paths.POLICY_DIR, cfg.policy.dtype) if ctx.strategy == "fsdp" and ctx.distributed \
            else D.unwrap(model)
        out.load_state_dict(state)
        base_fingerprint = loading.fingerprint(paths.POLICY_DIR)
        loading.save_model(out.to("cpu"), tokenizer, paths.model_dir(args.variant),
                            {"variant": args.variant, "losses": [t.model_dump() for t in variant.losses],
                             "settings": s.model_dump(), "steps": len(history), "world_size": ctx.world,
                             "base_fingerprint": base_fingerprint})
        # The Hub's model card (README.md): what a reader of the folder needs to know it was trained on.
        # The export stage completes it with the evaluation figures.
        card = model_card.training_card(
            variant=args.variant, base_model=cfg.policy.model, base_fingerprint=base_fingerprint,
            losses=[model_card.loss_record(t.name, t.weight, t.hp) for t in variant.losses],
            hyperparameters=s.model_dump(),
            data=fingerprint,
            training={"steps": len(history), "world_size": ctx.world, "last_step": history[-1],
                      "ref_check": check})
        model_card.save(card, Path(paths.model_dir(args.variant)) / model_card.CARD_FILE)
        with atomic_dir(paths.train_dir(args.variant)) as tmp:  # the folder is one DVC output
            write_table(pl.DataFrame(curves.fixed, schema=schema_of("fixed_curves")),
                        tmp / Path(paths.fixed_curves(args.variant)).name, "fixed_curves")
            write_table(pl.DataFrame(curves.probe, schema=schema_of("probe_curves")),
                        tmp / Path(paths.probe_curves(args.variant)).name, "probe_curves")
        if checkpoint is not None:
            Path(checkpoint.path).unlink(missing_ok=True)
        last = history[-1]
        log.info("%s: %d steps on %d process(es), final loss %.4f, lp_w %.2f, lp_l %.2f, accuracy %.2f",
                 args.variant, len(history), ctx.world, last["loss"], last["lp_w"], last["lp_l"], last["accuracy"])
    D.shutdown(ctx)


def _examples(df: pl.DataFrame) -> list[PairExample]:
    return [PairExample(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), r["ref_w"], r["ref_l"])
            for r in df.iter_rows(named=True)]


def _fixed_set(df: pl.DataFrame) -> tuple[list[str], list[PairExample]]:
    if df["ref_w"].null_count():
        raise ValueError(f"{paths.REFERENCE}: missing reference log-probs for {df['ref_w'].null_count()} pairs; rerun "
                         "the reference stage")
    return df["pair_id"].to_list(), _examples(df)


def ref_check(history: list[dict[str, float]], tol: float) -> dict:
    """The first-step check of the policy against the reference (train_preference raises when it
    fails), for the stage's metrics. ``history[0]`` is the first step also after a resume."""
    first = history[0]
    return {"gap_max": first["ref_gap_max"], "gap_mean": first["ref_gap_mean"], "tol": tol,
            "passed": first["ref_gap_mean"] <= tol}


def _run_key(variant: dict, inputs: list[str]) -> str:
    """Ties a checkpoint to the settings and inputs of the run that wrote it."""
    h = hashlib.sha1(json.dumps(variant, sort_keys=True).encode())
    for p in inputs:
        path = Path(p)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


if __name__ == "__main__":
    run_stage(main)
