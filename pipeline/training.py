"""Preference training over precomputed reference log-probs, and the SFT warm-up.

The reference model is never loaded here: ``ref_w``/``ref_l`` come from the reference stage.
Chosen and rejected go through the policy in one forward pass. Per-step diagnostics (log-probs,
implicit rewards, margin, accuracy, the share of pairs pushed below the reference) are handed
to a ``log`` callback (dvclive in the train stage).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline import losses
from pipeline.logprobs import collate, sequence_logprobs

log = logging.getLogger("pipeline.training")


@dataclass(frozen=True)
class PairExample:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    ref_w: float
    ref_l: float


def _implicit_beta(terms) -> float:
    """β of the first term that has one: the scale of the logged implicit rewards (1 if none)."""
    for t in terms:
        hp = t.hp if hasattr(t, "hp") else t[2]
        for k in ("beta", "beta_w"):
            if k in hp:
                return float(hp[k])
    return 1.0


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def step_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Index lists of each optimiser step: a fresh seeded shuffle per epoch; a short tail batch kept."""
    out = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out += [order[s: s + batch_size] for s in range(0, n, batch_size)]
    return out


def preference_metrics(lp_w, lp_l, ref_w, ref_l, len_w, len_l, beta: float) -> dict[str, float]:
    d_w, d_l = lp_w - ref_w, lp_l - ref_l
    return {
        "lp_w": lp_w.mean().item(), "lp_l": lp_l.mean().item(),
        "lp_w_per_token": (lp_w / len_w).mean().item(), "lp_l_per_token": (lp_l / len_l).mean().item(),
        "delta_w": d_w.mean().item(), "delta_l": d_l.mean().item(),
        "reward_w": (beta * d_w).mean().item(), "reward_l": (beta * d_l).mean().item(),
        "margin": (beta * (d_w - d_l)).mean().item(),
        "accuracy": (d_w > d_l).float().mean().item(),
        "displaced_share": (lp_w < ref_w).float().mean().item(),
    }


def train_preference(model, examples: Sequence[PairExample], terms, *, lr: float, epochs: int,
                     batch_size: int, grad_accum: int, max_length: int, seed: int, pad_id: int,
                     weight_decay: float = 0.0, warmup_steps: int = 0, max_grad_norm: float = 10.0,
                     log_fn: Callable[[int, dict[str, float]], None] | None = None,
                     progress: str | None = "train") -> list[dict[str, float]]:
    """Train ``model`` in place on ``examples`` with the weighted loss ``terms``; return the history.

    ``batch_size`` pairs make one optimiser step; they are split into ``grad_accum`` micro-batches.
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no training pairs: check the pairs stage's counts (all groups tied?)")
    _set_seed(seed)
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = step_batches(len(examples), batch_size, epochs, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
    beta = _implicit_beta(terms)
    history = []
    for step, idx in enumerate(tqdm(steps, desc=progress, disable=progress is None, unit="step")):
        micro = [idx[i::grad_accum] for i in range(grad_accum) if idx[i::grad_accum]]
        collected = {k: [] for k in ("lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l")}
        loss_sum = 0.0
        for mb in micro:
            ex = [examples[i] for i in mb]
            prompts = [e.prompt_ids for e in ex] * 2
            responses = [e.chosen_ids for e in ex] + [e.rejected_ids for e in ex]
            ids, att, resp = collate(prompts, responses, pad_id, max_length)
            lp, n_tok = sequence_logprobs(model, ids.to(device), att.to(device), resp.to(device))
            k = len(ex)
            lp_w, lp_l, len_w, len_l = lp[:k], lp[k:], n_tok[:k], n_tok[k:]
            ref_w = torch.tensor([e.ref_w for e in ex], device=device)
            ref_l = torch.tensor([e.ref_l for e in ex], device=device)
            per_pair = losses.combined_loss(terms, lp_w, lp_l, ref_w, ref_l, len_w, len_l)
            # Mean over the whole optimiser batch, however it is split into micro-batches.
            loss = per_pair.sum() / len(idx)
            loss.backward()
            loss_sum += loss.item()
            for name, t in (("lp_w", lp_w), ("lp_l", lp_l), ("ref_w", ref_w), ("ref_l", ref_l),
                            ("len_w", len_w), ("len_l", len_l)):
                collected[name].append(t.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        cat = {k: torch.cat(v).float() for k, v in collected.items()}
        metrics = {"loss": loss_sum, "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                   **preference_metrics(cat["lp_w"], cat["lp_l"], cat["ref_w"], cat["ref_l"],
                                        cat["len_w"], cat["len_l"], beta)}
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss became {metrics['loss']} at step {step}; lower train.lr")
        history.append(metrics)
        if log_fn is not None:
            log_fn(step, metrics)
    model.eval()
    return history


def train_sft(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, lr: float,
              epochs: int, batch_size: int, max_length: int, seed: int, pad_id: int,
              progress: str | None = "warm-up") -> list[float]:
    """Token-level NLL of ``responses`` given ``prompts`` (the SFT warm-up on gold solutions)."""
    from tqdm.auto import tqdm

    _set_seed(seed)
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses_ = []
    for idx in tqdm(step_batches(len(prompts), batch_size, epochs, seed), desc=progress,
                    disable=progress is None, unit="step"):
        ids, att, resp = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, max_length)
        lp, n_tok = sequence_logprobs(model, ids.to(device), att.to(device), resp.to(device))
        loss = -lp.sum() / n_tok.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses_.append(loss.item())
    model.eval()
    return losses_
