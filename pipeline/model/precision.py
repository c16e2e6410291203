"""The precision log-probs are computed in: bf16 autocast where ``train.bf16`` asks for it and the
device runs bf16 natively, else the model's own dtype.

Training, the reference stage and evaluation's held-out log-probs all compute under
:func:`autocast`, so ``lp − ref`` measures learning, not a difference of precision.
"""

from __future__ import annotations

import contextlib

import torch

# train.cpu_attention: the SDPA kernel a CPU runs under bf16 autocast (GPUs take their fused kernels either way)
CPU_ATTENTION = ("math", "flash")

# Devices on which ``train.bf16`` always turns bf16 autocast on; CPUs only with native bf16
# (:func:`cpu_has_native_bf16`). Tests add "cpu" to run the bf16 path on any CPU.
BF16_AUTOCAST_DEVICES = frozenset({"cuda"})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): there bf16 autocast is
    faster than fp32; elsewhere bf16 is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def uses_bf16_autocast(device, bf16: bool | None) -> bool:
    """Whether log-probs on ``device`` are computed under bf16 autocast with ``train.bf16 = bf16`` (None:
    no autocast)."""
    kind = torch.device(device).type
    return bool(bf16) and (kind in BF16_AUTOCAST_DEVICES or (kind == "cpu" and cpu_has_native_bf16()))


@contextlib.contextmanager
def autocast(device, bf16: bool | None, cpu_attention: str):
    """The precision of the policy's and the reference's log-probs: bf16 autocast when
    :func:`uses_bf16_autocast`, else none (the model's own dtype, fp32 by default). One choice for
    training, the reference stage and evaluation, because bf16 and fp32 log-probs differ by enough to
    read as learning before any step.

    Under bf16 on a CPU it also selects the attention kernel (``train.cpu_attention``). ``math``: the
    CPU flash kernel splits the keys into blocks that depend on the batch's padded length, so bf16
    log-probs would depend on which pairs share a batch; the math kernel keeps a sequence's log-probs
    the same in most batches (not all), at a cost in speed and memory (docs/caveats.md). ``flash``: the
    fused kernel, faster and without the ``[T, T]`` score matrices, its log-probs moved by rounding
    with the batch."""
    if cpu_attention not in CPU_ATTENTION:
        raise ValueError(f"train.cpu_attention: one of {', '.join(CPU_ATTENTION)}, got {cpu_attention!r}")
    with contextlib.ExitStack() as stack:
        if uses_bf16_autocast(device, bf16):
            kind = torch.device(device).type
            stack.enter_context(torch.autocast(kind, dtype=torch.bfloat16))
            if kind == "cpu":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                kernel = SDPBackend.MATH if cpu_attention == "math" else SDPBackend.FLASH_ATTENTION
                stack.enter_context(sdpa_kernel(kernel))
        yield
