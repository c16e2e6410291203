"""The GPU checks' ``nccl`` check (:mod:`pipeline.bench.gpu_check`): DDP and FSDP2 through ``torchrun`` on every
visible GPU train the same steps as one process, and the loss curves are compared. :func:`dist_worker` is
what each torchrun process runs (``python -m pipeline.bench.gpu_check --dist-worker SPEC RESULT``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.bench.gpu_policy import PolicySpec, check_settings, examples_with_reference, load_policy, synth_pairs
from pipeline.bench.process import child_env
from pipeline.settings.train import Variant


def nccl_check(variant: Variant, policy: PolicySpec, *, quick: bool, loss_tol: float) -> dict:
    """The largest difference of each strategy's loss curve from one process's; passed when every one is
    under ``loss_tol``. Needs 2 GPUs; ``quick`` on a CPU runs 2 processes with gloo instead."""
    from pipeline.training.trainer import train_preference

    n_gpu = torch.cuda.device_count()
    world = n_gpu if n_gpu >= 2 else (2 if quick else 0)
    if not world:
        return {"skipped": f"{n_gpu} GPU(s) visible: NCCL needs one GPU per process, so at least 2"}
    backend = "nccl" if n_gpu >= 2 else "gloo"  # a quick run on a CPU: the same launch with gloo
    model, pad_id, source = load_policy(policy)
    settings = check_settings(variant.settings, batch_size=max(8, world), epochs=2, ref_check_tol=1e9, bf16=n_gpu >= 2)
    pairs = synth_pairs(settings.batch_size * 2 + 2, 64, 16, model.config.vocab_size, seed=3)  # a 2-pair tail
    examples = examples_with_reference(model.eval(), pairs, pad_id, settings, settings.bf16)
    single = [h["loss"] for h in train_preference(model, examples, variant.losses, settings, pad_id=pad_id)]
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.pt", Path(tmp) / "losses.pt"
        torch.save(
            {
                "examples": examples,
                "terms": variant.losses,
                "settings": settings,
                "backend": backend,
                "policy": policy,
            },
            spec,
        )
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={world}",
                "-m",
                "pipeline.bench.gpu_check",
                "--dist-worker",
                str(spec),
                str(result),
            ],
            env=child_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            return {"backend": backend, "world": world, "failed": proc.stderr[-3000:]}
        losses = torch.load(result)
    diffs = {k: max(abs(a - b) for a, b in zip(v, single)) for k, v in losses.items()}
    return {
        "backend": backend,
        "world": world,
        "model_source": source,
        "steps": len(single),
        "single": single,
        **{f"{k}_losses": v for k, v in losses.items()},
        "max_abs_loss_diff": diffs,
        "wall_s": time.perf_counter() - start,
        "passed": all(d < loss_tol for d in diffs.values()),
    }


def dist_worker(spec_path: str, out_path: str) -> None:
    """Under torchrun: train the spec's pairs with DDP, then FSDP2; rank 0 writes the loss curves."""
    import dataclasses

    from pipeline.settings.train import RuntimeParams
    from pipeline.training import distributed
    from pipeline.training.trainer import train_preference

    spec = torch.load(spec_path, weights_only=False)
    ctx = distributed.init(
        RuntimeParams(
            nproc=int(os.environ["WORLD_SIZE"]),
            backend=spec["backend"],
            strategy="ddp",
            offload=False,
            cpu_allocator="system",  # a worker: the allocator is its launcher's
            checkpoint_every=0,
            checkpoint_dir=".",
            nnodes=1,  # one machine: torchrun's --standalone rendezvous, the fields below unused
            rdzv_endpoint="localhost:29400",
            rdzv_id="gpu-check",
            rdzv_timeout=600,
        )
    )
    losses = {}
    for strategy in ("ddp", "fsdp"):
        model, pad_id, _ = load_policy(spec["policy"])
        history = train_preference(
            model.to(ctx.device),
            spec["examples"],
            spec["terms"],
            spec["settings"],
            pad_id=pad_id,
            ctx=dataclasses.replace(ctx, strategy=strategy),
        )
        losses[strategy] = [h["loss"] for h in history]
    if ctx.is_main:
        torch.save(losses, out_path)
    distributed.shutdown(ctx)
