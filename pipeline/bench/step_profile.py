"""Where a train step's time goes (:mod:`pipeline.bench.gpu_check`'s ``profile`` check): the larger policy's
full fine-tune step under ``torch.profiler``, after one warm-up step.

It records the profiled steps' wall time, the time the device was busy with kernels in them (on a GPU: the
rest is the device waiting on the host, launches and synchronisations) and the operators of most self device
time (on a CPU: self CPU time), each with its share of the busy time. An MFU far below the matrix products'
share is time spent outside them.
"""

from __future__ import annotations

import time

import torch

from pipeline.bench.gpu_policy import PolicySpec, check_settings, examples_with_reference, load_policy, synth_pairs
from pipeline.settings.train import Variant

TOP = 15  # entries listed


def _rows(events, attr: str, total_us: float) -> list[dict]:
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:TOP]
    return [
        {"name": e.key, "calls": e.count, "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total_us}
        for e in top
    ]


def profile_step(
    policy: PolicySpec, variant: Variant, *, batch: int, steps: int, lengths: tuple[int, int, int]
) -> dict:
    """Profile ``steps`` train steps of ``batch`` pairs (prompt, response and max lengths ``lengths``) of
    ``policy`` after one warm-up step: wall time, device-busy time, the top operators by their self device
    time (the kernels they launch themselves; on a CPU, self CPU time) and, on a GPU, the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from pipeline.bench.gpu_train import sync
    from pipeline.training.trainer import RunOptions, train_preference

    on_gpu = torch.cuda.is_available()
    prompt_len, response_len, max_length = lengths
    model, pad_id, source = load_policy(policy)
    settings = check_settings(variant.settings, batch_size=batch, epochs=1, max_length=max_length, ref_check_tol=1e9)
    pairs = synth_pairs(batch * (steps + 1), prompt_len, response_len, model.config.vocab_size, seed=3)
    examples = examples_with_reference(model, pairs, pad_id, settings, None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    prof = profile(activities=activities)
    stamps: list[float] = []

    def log_fn(step, metrics):
        sync()
        stamps.append(time.perf_counter())
        if step == 0:  # after the warm-up step: its allocations and first launches are not the steady state
            prof.start()
        elif step == steps:
            prof.stop()

    train_preference(model, examples, variant.losses, settings, pad_id=pad_id, run=RunOptions(log_fn=log_fn))
    averages = prof.key_averages()
    ops = [e for e in averages if e.device_type == DeviceType.CPU]
    attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    busy_us = sum(getattr(e, attr) for e in (kernels if on_gpu else ops))
    wall_s = stamps[steps] - stamps[0]
    out = {
        "model_source": source,
        "batch_pairs": batch,
        "profiled_steps": steps,
        "wall_s": wall_s,
        "busy_s": busy_us / 1e6,
        "busy_share": busy_us / 1e6 / wall_s,
        "ops_by": "self device time" if on_gpu else "self CPU time",
        "top_ops": _rows([e for e in ops if getattr(e, attr) > 0], attr, busy_us),
    }
    if on_gpu:
        out["top_kernels"] = _rows(kernels, attr, busy_us)
    return out
