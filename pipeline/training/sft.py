"""The SFT warm-up of the starting policy (stage policy): token-level NLL of gold solutions."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pipeline.model.collate import collate
from pipeline.model.logprobs import sequence_logprobs
from pipeline.model.precision import autocast
from pipeline.training.batching import step_batches

if TYPE_CHECKING:
    from pipeline.settings.policy import WarmupParams

SFT_MAX_GRAD_NORM = 1.0


def train_sft(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    warmup: WarmupParams,
    *,
    pad_id: int,
    progress: str | None = "warm-up",
) -> list[float]:
    """Token-level NLL of ``responses`` given ``prompts`` (the SFT warm-up on gold solutions); the losses."""
    from tqdm.auto import tqdm

    random.seed(warmup.seed)
    torch.manual_seed(warmup.seed)
    device = next(model.parameters()).device
    model.train()
    # only lr is a warm-up setting: torch's defaults otherwise; fused (one kernel over all weights), as training
    opt = torch.optim.AdamW(model.parameters(), lr=warmup.lr, fused=True)
    batches = step_batches(len(prompts), warmup.batch_size, warmup.epochs, warmup.seed)
    step_losses = []
    for idx in tqdm(batches, desc=progress, disable=progress is None, unit="step"):
        ids, att, resp = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, warmup.max_length)
        # math: the CPU kernel whose bf16 log-likelihood does not move with the batch's padded length
        with autocast(device, warmup.bf16, "math"):
            lp, n_tok = sequence_logprobs(model, ids.to(device), att.to(device), resp.to(device))
        loss = -lp.sum() / n_tok.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), SFT_MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_losses.append(loss.item())
    model.eval()
    return step_losses
