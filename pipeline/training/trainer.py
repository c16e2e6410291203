"""Preference training over precomputed reference log-probs, and the SFT warm-up.

The reference model is never loaded here: ``ref_w``/``ref_l`` come from the reference stage.
Chosen and rejected go through the policy in one forward pass. Per-step diagnostics (log-probs,
implicit rewards, margin, accuracy, the share of pairs pushed below the reference) are handed
to a ``log`` callback (dvclive in the train stage).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.training import losses
from pipeline.model.logprobs import ResponseLogprobs, collate, sequence_logprobs, sequence_logprobs_via_forward

log = logging.getLogger("pipeline.training.trainer")


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


@dataclass(frozen=True)
class Probe:
    """A fixed set of prompts whose greedy decode is re-scored every ``every`` steps (squeezing)."""

    prompts: tuple[str, ...]
    every: int
    max_new_tokens: int = 32


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often to checkpoint; ``key`` ties a checkpoint to the run that wrote it."""

    path: str
    every: int
    key: str


def _log10_abs(t: torch.Tensor) -> torch.Tensor:
    return torch.log10(t.abs().clamp_min(1e-30))


def gradient_diagnostics(g_w: torch.Tensor, g_l: torch.Tensor, lp_w: torch.Tensor, lp_l: torch.Tensor) -> dict:
    """3D-properties, drastic drop (seed 001): gradient magnitudes w.r.t. the probabilities.

    With ``g = ∂L/∂log π``, ``∂L/∂π = g / π``; so
    ``log10 |∂L/∂π(y_l)| / |∂L/∂π(y_w)| = log10|g_l| − log10|g_w| + (lp_w − lp_l) / ln 10``.
    For DPO ``|g_l| = |g_w|`` and the ratio is ``π(y_w)/π(y_l)``. Computed in log space: the
    probabilities of whole sequences underflow.
    """
    ln10 = math.log(10.0)
    log_gw_prob = _log10_abs(g_w) - lp_w / ln10
    log_gl_prob = _log10_abs(g_l) - lp_l / ln10
    return {
        "grad_logp_w": g_w.abs().mean().item(), "grad_logp_l": g_l.abs().mean().item(),
        "log10_grad_prob_w": log_gw_prob.mean().item(), "log10_grad_prob_l": log_gl_prob.mean().item(),
        "log10_grad_ratio": (log_gl_prob - log_gw_prob).median().item(),
    }


def _probe_logprob(model, tokenizer, probe: Probe) -> tuple[float, float]:
    """Mean summed (and per-token) log-prob of the current greedy decode of the probe prompts."""
    from pipeline.generation.sampling import GenerationSettings, TransformersSampler

    sampler = TransformersSampler.from_model(model, tokenizer, "probe", batch_size=len(probe.prompts))
    was_training = model.training
    model.eval()
    outs = sampler.generate(list(probe.prompts), GenerationSettings(n=1, temperature=0.0,
                                                                    max_new_tokens=probe.max_new_tokens), progress=None)
    model.train(was_training)
    lps = [c[0].logprob_sum for c in outs]
    toks = [max(1, len(c[0].token_ids)) for c in outs]
    return sum(lps) / len(lps), sum(lp / n for lp, n in zip(lps, toks)) / len(lps)


def _save_checkpoint(ck: Checkpointing, step: int, model, opt, sched, history, ctx) -> None:
    from pipeline.training import distributed as D
    from pipeline.io import atomic_path

    state = {"key": ck.key, "step": step, "model": D.full_state_dict(model, ctx),
             "optim": D.optimizer_state(model, opt, ctx), "sched": sched.state_dict(), "history": history}
    if ctx.is_main:
        with atomic_path(ck.path) as tmp:
            torch.save(state, tmp)
    D.barrier(ctx)


def _load_checkpoint(ck: Checkpointing | None) -> dict | None:
    import os

    if ck is None or not os.path.isfile(ck.path):
        return None
    state = torch.load(ck.path, map_location="cpu", weights_only=False)
    if state.get("key") != ck.key:
        log.warning("ignoring checkpoint %s: written by a run with other inputs or settings", ck.path)
        return None
    return state


def train_preference(model, examples: Sequence[PairExample], terms, *, lr: float, epochs: int,
                     batch_size: int, grad_accum: int, max_length: int, seed: int, pad_id: int,
                     weight_decay: float = 0.0, warmup_steps: int = 0, max_grad_norm: float = 10.0,
                     log_fn: Callable[[int, dict[str, float]], None] | None = None,
                     progress: str | None = "train", ctx=None, bf16: bool = False,
                     buckets: Sequence[str] | None = None, probe: Probe | None = None, tokenizer=None,
                     checkpoint: Checkpointing | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place on ``examples`` with the weighted loss ``terms``; return the history.

    ``batch_size`` pairs make one optimiser step whatever the number of processes: under
    ``torchrun`` each rank takes every ``world``-th pair of the step and the loss is scaled so that
    the averaged gradient equals the single-process one; each rank's share is split into
    ``grad_accum`` micro-batches. ``buckets`` (one label per example) adds the per-bucket share of
    pairs pushed below the reference; ``probe`` logs the log-prob of a fixed greedy decode every
    K steps; ``checkpoint`` saves every K steps and resumes from a matching checkpoint.
    """
    from tqdm.auto import tqdm

    from pipeline.training import distributed as D

    ctx = ctx or D.Context(device=str(next(model.parameters()).device))
    if not examples:
        raise ValueError("no training pairs: check the pairs stage's counts (all groups tied?)")
    _set_seed(seed)
    device = torch.device(ctx.device)
    model.train()
    if ctx.distributed and ctx.strategy == "fsdp":
        D.wrap(model, ctx)  # shards in place; generation and saving go through the same module

        def forward(ids, att, resp):
            return sequence_logprobs_via_forward(model, ids, att, resp)
    else:
        forward = D.wrap(ResponseLogprobs(model), ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = step_batches(len(examples), batch_size, epochs, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
    beta = _implicit_beta(terms)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda"
                else contextlib.nullcontext())
    history: list[dict[str, float]] = []
    start = 0
    state = _load_checkpoint(checkpoint)
    if state is not None:
        D.load_states(model, opt, state["model"], state["optim"], ctx)
        sched.load_state_dict(state["sched"])
        history, start = list(state["history"]), state["step"]
        log.info("resuming from checkpoint %s at step %d of %d", checkpoint.path, start, len(steps))
        if log_fn is not None and ctx.is_main:
            for i, m in enumerate(history):  # a restarted stage re-logs what its outputs lost
                log_fn(i, m)
    bar = tqdm(total=len(steps), initial=start, desc=progress, disable=progress is None or not ctx.is_main,
               unit="step")
    for step in range(start, len(steps)):
        idx = steps[step]
        mine = idx[ctx.rank::ctx.world]
        micro = [mine[i::grad_accum] for i in range(grad_accum) if mine[i::grad_accum]]
        collected: dict[str, list[torch.Tensor]] = {k: [] for k in
                                                    ("lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l", "g_w", "g_l")}
        mine_order: list[int] = []
        loss_sum = torch.zeros((), device=device)
        for m, mb in enumerate(micro):
            ex = [examples[i] for i in mb]
            prompts = [e.prompt_ids for e in ex] * 2
            responses = [e.chosen_ids for e in ex] + [e.rejected_ids for e in ex]
            ids, att, resp = collate(prompts, responses, pad_id, max_length)
            with D.no_grad_sync(model if ctx.strategy == "fsdp" else forward, ctx, skip=m < len(micro) - 1):
                with autocast:
                    lp, n_tok = forward(ids.to(device), att.to(device), resp.to(device))
                lp.retain_grad()
                k = len(ex)
                lp_w, lp_l, len_w, len_l = lp[:k], lp[k:], n_tok[:k], n_tok[k:]
                ref_w = torch.tensor([e.ref_w for e in ex], device=device)
                ref_l = torch.tensor([e.ref_l for e in ex], device=device)
                per_pair = losses.combined_loss(terms, lp_w, lp_l, ref_w, ref_l, len_w, len_l)
                # Mean over the whole global batch: ranks average gradients, hence the world factor.
                loss = per_pair.sum() * ctx.world / len(idx)
                loss.backward()
            loss_sum += per_pair.detach().sum() / len(idx)
            g = lp.grad * len(idx) / ctx.world  # per-pair ∂ℓ/∂log π, undoing the batch scaling
            for name, t in (("lp_w", lp_w), ("lp_l", lp_l), ("ref_w", ref_w), ("ref_l", ref_l),
                            ("len_w", len_w), ("len_l", len_l), ("g_w", g[:k]), ("g_l", g[k:])):
                collected[name].append(t.detach().float())
            mine_order += mb
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        cat = {k: D.gather_tensor(torch.cat(v), ctx) for k, v in collected.items()}
        order = D.gather_tensor(torch.tensor(mine_order, dtype=torch.float32), ctx).long().tolist()
        if ctx.distributed:
            torch.distributed.all_reduce(loss_sum)
        metrics = {"loss": loss_sum.item(), "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                   **preference_metrics(cat["lp_w"], cat["lp_l"], cat["ref_w"], cat["ref_l"],
                                        cat["len_w"], cat["len_l"], beta),
                   **gradient_diagnostics(cat["g_w"], cat["g_l"], cat["lp_w"], cat["lp_l"])}
        if buckets is not None:
            below = (cat["lp_w"] < cat["ref_w"]).tolist()
            for b in sorted({buckets[i] for i in order}):
                sel = [below[j] for j, i in enumerate(order) if buckets[i] == b]
                metrics[f"displaced_share_{b}"] = sum(sel) / len(sel)
        if probe is not None and tokenizer is not None and (step % probe.every == 0 or step == len(steps) - 1):
            metrics["probe_greedy_lp"], metrics["probe_greedy_lp_per_token"] = _probe_logprob(model, tokenizer, probe)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss became {metrics['loss']} at step {step}; lower train.lr")
        history.append(metrics)
        if log_fn is not None and ctx.is_main:
            log_fn(step, metrics)
        if checkpoint is not None and checkpoint.every and (step + 1) % checkpoint.every == 0 and step + 1 < len(steps):
            _save_checkpoint(checkpoint, step + 1, model, opt, sched, history, ctx)
        bar.update(1)
    bar.close()
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
