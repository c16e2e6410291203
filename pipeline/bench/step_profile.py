"""Where a train step's time goes (:mod:`pipeline.bench.gpu_check`'s ``profile`` check): the larger policy's
full fine-tune step under ``torch.profiler``, after one warm-up step.

It records the profiled steps' wall time, the time the device was busy with kernels in them (on a GPU: the
rest is the device waiting on the host, launches and synchronisations) and the operators of most self device
time (on a CPU: self CPU time), each with its share of the busy time. An MFU far below the matrix products'
share is time spent outside them.
"""

from __future__ import annotations

import torch

from pipeline.bench.gpu_policy import PolicySpec
from pipeline.bench.gpu_train import StepSizes, train_steps
from pipeline.settings.train import Variant

TOP = 15  # entries listed


def _rows(events, attr: str, total_us: float) -> list[dict]:
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:TOP]
    return [
        {"name": e.key, "calls": e.count, "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total_us}
        for e in top
    ]


def profile_step(policy: PolicySpec, variant: Variant, sizes: StepSizes) -> dict:
    """Profile the ``sizes.steps`` train steps of ``policy`` after one warm-up step (:func:`train_steps`): wall
    time, device-busy time, the top operators by their self device time (the kernels they launch themselves;
    on a CPU, self CPU time) and, on a GPU, the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []))

    def on_step(step: int) -> None:
        if step == 0:  # after the warm-up step: its allocations and first launches are not the steady state
            prof.start()
        elif step == sizes.steps:
            prof.stop()

    run = train_steps(policy, variant, sizes, on_step)
    averages = prof.key_averages()
    ops = [e for e in averages if e.device_type == DeviceType.CPU]
    attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    busy_us = sum(getattr(e, attr) for e in (kernels if on_gpu else ops))
    wall_s = run.stamps[sizes.steps] - run.stamps[0]
    out = {
        "model_source": run.source,
        "batch_pairs": sizes.batch,
        "profiled_steps": sizes.steps,
        "wall_s": wall_s,
        "busy_s": busy_us / 1e6,
        "busy_share": busy_us / 1e6 / wall_s,
        "ops_by": "self device time" if on_gpu else "self CPU time",
        "top_ops": _rows([e for e in ops if getattr(e, attr) > 0], attr, busy_us),
    }
    if on_gpu:
        out["top_kernels"] = _rows(kernels, attr, busy_us)
    return out
