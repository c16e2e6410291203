"""One configuration of the trainer benchmark (:mod:`pipeline.bench.trainer`), in a process of its own so
that the memory it reports is that configuration's alone:

    python -m pipeline.bench.trainer_child SPEC CONFIG RESULT

``SPEC`` (JSON, written by the benchmark) holds the model (a folder, or an ``architecture`` built with
random weights and the folder's tokenizer), each configuration's train settings and reference log-probs,
which TRL configurations precompute theirs, the pairs and the order of the examples; ``RESULT`` receives
the figures. A configuration whose name starts with ``ours`` runs :func:`train_preference` on the
examples (it shuffles them into the benchmark's step order itself), with a LoRA adapter attached as the
train stage attaches it when its ``train.lora.r`` > 0; any other runs TRL's ``DPOTrainer`` on the same
examples already in that order, with the same adapter as TRL's ``peft_config``. Every step is stamped;
the first is a warm-up outside the timing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from pipeline.bench.architectures import random_model
from pipeline.bench.memory import hwm_mb, reset_hwm, rss_mb
from pipeline.preload import preloaded_libs
from pipeline.settings.train import TrainSettings
from pipeline.training import lora

IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


class StepClock:
    """Wall and process CPU time (all threads: robust to a shared CPU) at the end of every step, and the
    torch profiler's top ``profile`` operators over the steps after the first."""

    def __init__(self, profile: int):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.rows = profile
        self.profiler = None
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            self.profiler = torch_profile(activities=[ProfilerActivity.CPU])

    def stamp(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.wall) == 1 and self.profiler is not None:
            self.profiler.__enter__()

    def profile_table(self) -> str | None:
        if self.profiler is None:
            return None
        self.profiler.__exit__(None, None, None)
        return self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.rows)


@dataclass
class Run:
    """What a configuration's training saw and cost besides its step times."""

    seen: list[dict]  # the examples in step order, as the trainer tokenized them
    init_s: float  # set-up inside the trainer before the first step (TRL: tokenization, reference pass)
    init_peak_mb: float
    peak_reset_supported: bool
    extra: dict = field(default_factory=dict)


def trained(model) -> dict:
    """What the run trained: the parameters that took gradients (a LoRA run: the adapter's), of all, and
    whether the decoder layers were checkpointed."""
    return {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
    }


def step_rows(spec: dict) -> list[dict]:
    return [spec["pairs"][spec["examples"][i]] for i in spec["order"]]


def pairs_reference(pairs: list[dict], model, pad_id: int, settings) -> list[tuple[float, float]]:
    """(ref_w, ref_l) of every pair under ``model`` (the base, before any adapter), by the reference stage's
    code path at training's precision, layout and truncation: for pairs that come without the reference
    stage's log-probs (a random-weight model). Untimed, before training."""
    import polars as pl

    from pipeline.model.logprobs import pair_logprobs

    table = pl.DataFrame({key: [p[key] for p in pairs] for key in IDS})
    ref_w, ref_l, _, _ = pair_logprobs(model.eval(), table, pad_id, settings.batch_size, settings)
    return list(zip(ref_w, ref_l))


def run_ours(spec: dict, config: str, model, tokenizer, clock: StepClock) -> Run:
    from pipeline.settings.train import LossTerm
    from pipeline.training.batching import step_batches
    from pipeline.training.examples import PairExample
    from pipeline.training.trainer import RunOptions

    module, name = spec["ours_fn"].split(":")
    train_preference = getattr(importlib.import_module(module), name)
    settings = TrainSettings(**spec["settings"][config])
    pairs = spec["pairs"]
    start = time.perf_counter()
    reference = spec["reference"][config] or pairs_reference(pairs, model, tokenizer.pad_token_id, settings)
    init_s = time.perf_counter() - start
    model = lora.attach(model, settings.lora, settings.seed)  # as the train stage loads its policy
    examples = [
        PairExample(
            tuple(pairs[p]["prompt_ids"]), tuple(pairs[p]["chosen_ids"]), tuple(pairs[p]["rejected_ids"]), *reference[p]
        )
        for p in spec["examples"]
    ]
    # train_preference shuffles with step_batches: the benchmark laid TRL's rows out in that order
    assert [i for batch in step_batches(len(examples), settings.batch_size, 1, settings.seed) for i in batch] == spec[
        "order"
    ]
    first_step: dict = {}

    def log_fn(step: int, metrics: dict) -> None:
        clock.stamp()
        if step == 0:
            first_step.update({k: metrics[k] for k in ("ref_gap_per_token", "ref_gap_mean", "ref_gap_max")})

    init_peak = hwm_mb()
    can_reset = reset_hwm()
    train_preference(
        model,
        examples,
        [LossTerm(**term) for term in spec["losses"]],
        settings,
        pad_id=tokenizer.pad_token_id,
        run=RunOptions(log_fn=log_fn),
    )
    rows = step_rows(spec)
    return Run(
        rows,
        init_s,
        init_peak,
        can_reset,
        {
            "ids_identical_to_ours": len(rows),
            "ref_check_tol": settings.ref_check_tol,
            **first_step,
            **trained(model),
        },
    )


def _trl_config(spec: dict, config: str, workdir: Path, n_steps: int):
    """TRL's settings equal to ours: params' train settings, DPO's sigmoid loss at the variant's beta,
    the benchmark's precision, no evaluation, logging or saving."""
    from trl import DPOConfig

    from pipeline.model.precision import uses_bf16_autocast

    settings = TrainSettings(**spec["settings"][config])
    return DPOConfig(
        output_dir=str(workdir / f"trl-{config}"),
        max_steps=n_steps,
        per_device_train_batch_size=settings.batch_size // settings.grad_accum,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        beta=spec["trl_beta"],
        loss_type=["sigmoid"],
        max_length=settings.max_length,
        bf16=uses_bf16_autocast("cpu", settings.bf16),
        fp16=False,
        gradient_checkpointing=settings.gradient_checkpointing,  # train.gradient_checkpointing, as ours
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=True,
        seed=settings.seed,
        data_seed=settings.seed,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        precompute_ref_log_probs=spec["precompute"][config],
    )


def run_trl(spec: dict, config: str, model, tokenizer, clock: StepClock, workdir: Path) -> Run:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.stamp()

    rows = step_rows(spec)
    data = Dataset.from_dict({key: [row[key] for row in rows] for key in ("prompt", "chosen", "rejected")})
    trl_config = _trl_config(spec, config, workdir, spec["steps"] + 1)
    can_reset = reset_hwm()
    start = time.perf_counter()
    settings = TrainSettings(**spec["settings"][config])
    trainer = DPOTrainer(
        model=model,
        args=trl_config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Stamp()],
        # train.lora as TRL takes it: TRL attaches the adapter itself and disables it for the reference
        peft_config=lora.peft_config(settings.lora) if settings.lora.r else None,
    )
    init_s = time.perf_counter() - start  # tokenization, the reference model's load or the precompute pass
    init_peak = hwm_mb()
    # TRL types train_dataset for every trainer (or None); DPOTrainer holds the tokenized Dataset it was given
    dataset = cast(Dataset, trainer.train_dataset)
    seen = [{key: dataset[i][key] for key in IDS} for i in range(len(dataset))]
    identical = sum(all(s[key] == r[key] for key in IDS) for s, r in zip(seen, rows))
    can_reset = reset_hwm() and can_reset
    trainer.train()
    extra = {"ids_identical_to_ours": identical, "trl_optimizer": str(trl_config.optim), **trained(trainer.model)}
    if trl_config.precompute_ref_log_probs:
        extra["precompute_s"] = init_s
    return Run(seen, init_s, init_peak, can_reset, extra)


def token_counts(rows: list[dict], max_length: int) -> tuple[int, int, int]:
    """(prompt + chosen + rejected tokens, non-pad positions the policy sees with a prompt copy per
    response, positions cut by ``max_length``)."""
    pair = seq = full = 0
    for row in rows:
        p, c, r = (len(row[key]) for key in IDS)
        pair += p + c + r
        full += 2 * p + c + r
        seq += min(p + c, max_length) + min(p + r, max_length)
    return pair, seq, full - seq


def summarize(spec: dict, config: str, run: Run, clock: StepClock, memory: dict) -> dict:
    """The configuration's figures: tokens/s and tokens per CPU-second over the timed steps (every step
    after the warm-up), their step times, and peak memory."""
    total_steps, batch_size = spec["steps"] + 1, spec["settings"][config]["batch_size"]
    if len(clock.wall) != total_steps:
        raise RuntimeError(f"{config}: {len(clock.wall)} step stamps for {total_steps} steps")
    seconds = clock.wall[-1] - clock.wall[0]  # the warm-up step 0 ends at the first stamp
    cpu_s = clock.cpu[-1] - clock.cpu[0]
    max_length = spec["settings"][config]["max_length"]
    tokens, seq_tokens, truncated = token_counts(run.seen[batch_size : total_steps * batch_size], max_length)
    train_peak = hwm_mb()
    out = {
        "config": config,
        "steps": spec["steps"],
        "rss_loaded_mb": memory["loaded"],
        **run.extra,
        "tokens": tokens,
        "seq_tokens": seq_tokens,
        "truncated_tokens": truncated,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_s": cpu_s,
        "tokens_per_cpu_s": tokens / cpu_s,
        "step_s": [b - a for a, b in zip(clock.wall, clock.wall[1:])],
        "train_peak_mb": train_peak - memory["loaded"] if run.peak_reset_supported else None,
        "abs_peak_mb": max(memory["load_peak"], run.init_peak_mb, train_peak),
        "init_s": run.init_s,
        "init_peak_mb": run.init_peak_mb,
        "peak_reset_supported": run.peak_reset_supported,
        "threads": torch.get_num_threads(),
        "ld_preload": preloaded_libs(),  # the allocator it ran on (tcmalloc) or none (the system's)
    }
    table = clock.profile_table()
    if table is not None:
        out["profile"] = table
    return out


def run_configuration(spec: dict, config: str, workdir: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(spec["threads"])
    seed = spec["settings"][config]["seed"]
    torch.manual_seed(seed)
    ours = config.startswith("ours")
    if not ours:  # TRL's imports (datasets, pandas) count in the loaded baseline, as torch's do for ours
        import trl  # noqa: F401
    from pipeline.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(spec["model_path"])
    if spec["architecture"]:  # random weights: the model folder gives the tokenizer alone
        model = random_model(spec["architecture"], spec["dtype"], seed=seed)  # the same weights in every configuration
    else:
        model = load_model(spec["model_path"], spec["dtype"])
    memory = {"loaded": rss_mb(), "load_peak": hwm_mb()}
    clock = StepClock(spec["profile"])
    run = (
        run_ours(spec, config, model, tokenizer, clock)
        if ours
        else run_trl(spec, config, model, tokenizer, clock, workdir)
    )
    return summarize(spec, config, run, clock, memory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the benchmark's spec (JSON)")
    parser.add_argument("config", help="the configuration to run")
    parser.add_argument("result", help="where the figures go (JSON)")
    args = parser.parse_args(argv)
    spec_path = Path(args.spec)
    result = run_configuration(json.loads(spec_path.read_text()), args.config, spec_path.parent)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
