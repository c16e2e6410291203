"""Stage `train@<variant>`: preference training of the starting policy with one variant's loss.

Launched the same way on a laptop and on a GPU node: with `train.runtime.nproc > 1` the stage
re-executes itself under torchrun (DDP, or FSDP2 by `train.runtime.strategy`). With `train.runtime.nnodes > 1`
this machine leads a run across machines: the others join with `python -m pipeline.training.follow`, each
takes its share of every step, and only this one writes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import polars as pl

from pipeline import paths
from pipeline.cli import run_stage, stage_parser
from pipeline.data import tagging
from pipeline.io import read_table
from pipeline.model import card as model_card
from pipeline.model import quantised
from pipeline.preload import visible_gpus
from pipeline.settings.evaluate import BeforeAndAfter
from pipeline.settings.pairs import PairsParams
from pipeline.settings.train import ReferenceAndTraining, RuntimeParams
from pipeline.training import allocator, distributed, multinode, node_check, node_watch, outputs, sharded_loading
from pipeline.training.checkpoints import Checkpointing
from pipeline.training.evaluation import Evaluation, fixed_sets_of, probe_of
from pipeline.training.examples import join_reference, pair_examples
from pipeline.training.trainer import RunOptions, first_step_check, train_preference

log = logging.getLogger("pipeline.train")


class Settings(ReferenceAndTraining, BeforeAndAfter):
    """The sections of params.yaml this stage reads."""

    pairs: PairsParams


def main(argv: list[str] | None = None, *, as_program: bool = False) -> None:
    """The stage; ``as_program`` (``python -m stages.train``): this process is the stage's own, so it may
    re-execute itself on another allocator; called in another program's process (a test), it does not."""
    argv = sys.argv[1:] if argv is None else argv
    parser = stage_parser(__doc__)
    parser.add_argument("--variant", required=True, help="a key of train.variants in params.yaml")
    args = parser.parse_args(argv)
    # Params (and, for several processes or machines, the torchrun relaunch: this machine leads)
    cfg = Settings.load(args.params)
    cfg.variant(args.variant)  # an unknown variant fails here, before any relaunch
    rt = multinode.node_runtime(cfg.train.runtime)
    # On a CPU, before torchrun's relaunch (its workers inherit the allocator)
    if as_program:
        allocator.reexec_with_allocator(rt.cpu_allocator, "stages.train", argv, on_gpu=bool(visible_gpus()))
    if multinode.needs_torchrun(rt) and not distributed.under_torchrun():
        sys.exit(multinode.relaunch(rt, multinode.LEADER, "stages.train", argv))
    ctx = distributed.init(rt)
    # Across machines: all run the leader's code, params and inputs, and a lost one is named
    try:
        with node_watch.watching(ctx):
            if ctx.nodes is not None:
                shared = rt.model_dump(include=set(node_check.SHARED_RUNTIME))
                settings = {**cfg.model_dump(exclude={"train": {"runtime"}}), "runtime": shared}
                node_check.verify(ctx, "train", settings)
            train_variant(cfg, args.variant, rt, ctx)
    finally:
        distributed.shutdown(ctx)


def train_variant(cfg: Settings, name: str, rt: RuntimeParams, ctx: distributed.Context) -> None:
    """Train variant ``name`` on this process's share and, on rank 0, write the stage's outputs."""
    variant = cfg.variant(name)
    s = variant.settings
    quantised.check_support(s.lora, ctx.device, cfg.source)  # before any model loads

    # Inputs: the starting policy, with a fresh LoRA adapter when train.lora.r > 0
    pairs = read_table(paths.PAIRS, "pairs")
    reference = read_table(paths.REFERENCE, "reference")
    prompts = read_table(paths.PROMPTS, "prompts")
    train = join_reference(pairs.filter(pl.col("split") == "train"), reference)
    # Under FSDP2 sharded as it loads: no GPU holds the whole model
    model, tokenizer = sharded_loading.load_for_training(paths.POLICY_DIR, cfg.policy.dtype, ctx, s)
    # What the model card records the model was trained on
    fingerprint = model_card.data_fingerprint(
        paths.PAIRS,
        paths.REFERENCE,
        n_train=len(train),
        n_heldout=int((pairs["split"] == "heldout").sum()),
        scenarios=pairs["scenario"].unique().to_list(),
    )

    # Work: metrics go to dvclive step by step; the fixed sets and probe are the same for every variant
    live = outputs.LiveLog(variant, len(train), ctx)
    evaluation = Evaluation(
        fixed_sets_of(pairs, reference, s, cfg.evaluate.batch_size),
        probe_of(prompts, s, cfg.evaluate.generation.max_new_tokens),
        tokenizer,
    )
    checkpoint = Checkpointing.for_run(rt, variant, [paths.PAIRS, paths.REFERENCE, paths.PROMPTS, paths.POLICY_DIR])
    buckets = [
        tagging.bucket_slug(tagging.bucket_of(v, cfg.pairs.distance_buckets)) for v in train["edit_distance_norm"]
    ]
    run = RunOptions(
        log_fn=live.log_fn,
        progress=f"train {name}",
        buckets=buckets,
        evaluation=evaluation,
        checkpoint=checkpoint,
    )
    history = train_preference(
        model, pair_examples(train), variant.losses, s, pad_id=tokenizer.pad_token_id, ctx=ctx, run=run
    )

    # Outputs: the trained policy with its card, the curves, the first-step check (rank 0 writes)
    policy = outputs.gathered_policy(model, ctx, paths.POLICY_DIR, cfg.policy.dtype, s.lora)
    if ctx.is_main:
        check = first_step_check(history, s.ref_check_tol)
        live.end({"ref_check": check})
        trained = outputs.TrainedRun(
            variant, cfg.policy.model, paths.POLICY_DIR, fingerprint, history, ctx.world, check
        )
        outputs.save_policy(policy, tokenizer, trained, paths.model_dir(name))
        outputs.write_curves(evaluation.curves, name)
        if checkpoint is not None:
            Path(checkpoint.path).unlink(missing_ok=True)
        last = history[-1]
        log.info(
            "%s: %d steps on %d process(es), final loss %.4f, lp_w %.2f, lp_l %.2f, accuracy %.2f",
            name,
            len(history),
            ctx.world,
            last["loss"],
            last["lp_w"],
            last["lp_l"],
            last["accuracy"],
        )


if __name__ == "__main__":
    run_stage(lambda: main(as_program=True))
