"""Preference training over precomputed reference log-probs.

The reference model is never loaded here: ``ref_w``/``ref_l`` come from the reference stage.
:func:`train_preference` is the recipe; one optimiser step reads::

    for step, idx in enumerate(batches[start:], start):
        before = evaluate(step)                          # fixed sets and probe, when due (step 0: the start)
        result = trainer.train_step(examples, idx)      # micro-batches, loss, backward, clip, step
        metrics = trainer.step_metrics(result, buckets)  # diagnostics, gathered over ranks
        log; maybe checkpoint
    evaluate(len(batches))                               # after the last update

Chosen and rejected go through the policy in one forward pass. Per-step diagnostics of the step's
batch (log-probs, the margin Δw − Δl, implicit rewards where the loss has them, accuracy, the share
of pairs pushed below the reference) and of the fixed sets (the same pairs at every evaluation: the
curves the report reads) are handed to a ``log_fn`` callback (dvclive in the train stage). The first
step of a fresh run checks that the policy's log-probs equal the reference's (see
:func:`train_preference`).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import polars as pl
import torch

from pipeline.model.logprobs import autocast, collate_pairs as _collate_pairs
from pipeline.training.batching import step_batches
from pipeline.training import distributed as D
from pipeline.schema import schema_of
from pipeline.training import losses
from pipeline.training.curves import Curves, fixed_set_means

if TYPE_CHECKING:
    from pipeline.config import TrainSettings

log = logging.getLogger("pipeline.training.trainer")

LogFn = Callable[[int, dict[str, float]], None]


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class PairExample:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    ref_w: float
    ref_l: float


def micro_batches(idx: Sequence[int], ctx: D.Context, grad_accum: int) -> list[tuple[list[int], list[bool]]]:
    """This rank's ``grad_accum`` micro-batches of a step, each ``(example indices, real-pair mask)``.

    The rank's share is every ``world``-th pair of ``idx``, split into ``grad_accum`` parts. Every
    rank must run the same number of forwards and backwards, whatever the step's size: DDP's
    gradient all-reduce and FSDP2's all-gathers are collectives. So a part left empty (a short tail
    batch, fewer pairs than ``world * grad_accum``) gets one padding row, a copy of the step's first
    pair (finite when the real pairs are) masked False: trained with weight 0, never in the stats.
    """
    mine = list(idx[ctx.rank::ctx.world])
    parts = [mine[m::grad_accum] for m in range(grad_accum)]
    return [(p, [True] * len(p)) if p else ([idx[0]], [False]) for p in parts]


def collate_pairs(ex: Sequence[PairExample], pad_id: int, settings: TrainSettings):
    """One batch scoring the chosen responses, then the rejected ones (``train.shared_prompt``: one row per pair)."""
    return _collate_pairs([e.prompt_ids for e in ex], [e.chosen_ids for e in ex], [e.rejected_ids for e in ex],
                          pad_id, settings.max_length, shared_prompt=settings.shared_prompt)


# --------------------------------------------------------------------------------------------- diagnostics
def preference_metrics(lp_w, lp_l, ref_w, ref_l, len_w, len_l,
                       beta: tuple[float, float] | None) -> dict[str, float]:
    """Batch means of the per-pair diagnostics. ``delta_margin`` is the unscaled ``Δw − Δl`` whatever the
    loss; ``reward_w``/``reward_l``/``reward_margin`` are the implicit rewards ``β_w·Δw``, ``β_l·Δl`` and
    their difference, logged only when ``beta`` = (β_w, β_l) of the loss (:func:`_implicit_beta`).
    ``ref_gap_max``/``ref_gap_mean``: max/mean ``|lp − ref|`` over both sides (0 up to rounding at the
    first step, where the policy is the reference); ``ref_gap_lp``/``ref_gap_ref``: the sequence with
    the largest gap (for the first-step check's message, not logged)."""
    d_w, d_l = lp_w - ref_w, lp_l - ref_l
    lp, ref = torch.cat([lp_w, lp_l]), torch.cat([ref_w, ref_l])
    gap = (lp - ref).abs()
    worst = int(gap.argmax())
    out = {
        "lp_w": lp_w.mean().item(), "lp_l": lp_l.mean().item(),
        "lp_w_per_token": (lp_w / len_w).mean().item(), "lp_l_per_token": (lp_l / len_l).mean().item(),
        "delta_w": d_w.mean().item(), "delta_l": d_l.mean().item(),
        "delta_margin": (d_w - d_l).mean().item(),
        "accuracy": (d_w > d_l).float().mean().item(),
        # The failure mode DPO-Positive targets: Pal et al. 2024, "Smaug" (arXiv 2402.13228).
        "displaced_share": (lp_w < ref_w).float().mean().item(),
        "ref_gap_max": gap.max().item(), "ref_gap_mean": gap.mean().item(),
        "ref_gap_lp": lp[worst].item(), "ref_gap_ref": ref[worst].item(),
    }
    if beta is not None:
        b_w, b_l = beta
        out.update(reward_w=(b_w * d_w).mean().item(), reward_l=(b_l * d_l).mean().item(),
                   reward_margin=(b_w * d_w - b_l * d_l).mean().item())
    return out


def _log10_abs(t: torch.Tensor) -> torch.Tensor:
    return torch.log10(t.abs().clamp_min(1e-30))


def gradient_diagnostics(g_w: torch.Tensor, g_l: torch.Tensor, lp_w: torch.Tensor, lp_l: torch.Tensor) -> dict:
    """Gradient magnitudes w.r.t. the probabilities: the "drastic drop" of the rejected likelihood in
    Yan et al. 2024, "3D-Properties: Identifying Challenges in DPO" (arXiv 2406.07327).

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


def pair_grad_ratio(terms, lp_w, lp_l, ref_w, ref_l, len_w, len_l) -> torch.Tensor:
    """Per pair, ``log10 |∂ℓ/∂π(y_l)| / |∂ℓ/∂π(y_w)|`` of the pair's own loss ℓ at these log-probs (as in
    :func:`gradient_diagnostics`); NaN where a side's gradient is 0 (e.g. a hinge that no longer binds)."""
    with torch.enable_grad():
        lw, ll = lp_w.detach().clone().requires_grad_(), lp_l.detach().clone().requires_grad_()
        per_pair = losses.combined_loss(terms, lw, ll, ref_w, ref_l, len_w, len_l)
        g_w, g_l = torch.autograd.grad(per_pair.sum(), [lw, ll], allow_unused=True)
    g_w = torch.zeros_like(lw) if g_w is None else g_w
    g_l = torch.zeros_like(ll) if g_l is None else g_l
    ratio = (torch.log10(g_l.abs()) - torch.log10(g_w.abs()) + (lp_w - lp_l) / math.log(10.0)).detach()
    return torch.where((g_w == 0) | (g_l == 0), torch.full_like(ratio, math.nan), ratio)


def bucket_displaced_shares(lp_w: torch.Tensor, ref_w: torch.Tensor, order: Sequence[int],
                            buckets: Sequence[str]) -> dict[str, float]:
    """``displaced_share_<bucket>``: the share of the step's pairs of each bucket with ``lp_w < ref_w``."""
    below = (lp_w < ref_w).tolist()
    out = {}
    for b in sorted({buckets[i] for i in order}):
        sel = [below[j] for j, i in enumerate(order) if buckets[i] == b]
        out[f"displaced_share_{b}"] = sum(sel) / len(sel)
    return out


def _implicit_beta(terms) -> tuple[float, float] | None:
    """(β_w, β_l) of the implicit rewards ``β·Δ`` the loss optimises, or None when it has none.

    dpo, cdpo, dpop and dpo_sft reward ``β·Δ`` on both sides, flex_dpo ``β_w·Δw`` and ``β_l·Δl``.
    gamma_dpo and hinge scale ``lp`` and ``ref`` apart (β, γ), ipo has τ, slic and simpo no reference:
    none of them has a ``β·Δ`` reward. A mix of terms has one only if every term has the same.
    """
    keys = {"dpo": ("beta", "beta"), "cdpo": ("beta", "beta"), "dpop": ("beta", "beta"),
            "dpo_sft": ("beta", "beta"), "flex_dpo": ("beta_w", "beta_l")}
    betas = set()
    for t in terms:
        name, hp = (t.name, t.hp) if hasattr(t, "hp") else (t[0], t[2])
        if name not in keys:
            return None
        betas.add(tuple(float(hp[k]) for k in keys[name]))
    return betas.pop() if len(betas) == 1 else None


# --------------------------------------------------------------------------------------------- fixed sets and probe
@dataclass(frozen=True)
class Probe:
    """Fixed prompts whose greedy decode is re-scored at step 0, every ``every`` steps and after the last:
    the "squeezing effect" of Ren & Sutherland 2024, "Learning Dynamics of LLM Finetuning" (arXiv 2407.10490).
    ``ids`` name the prompts in the recorded curves."""

    prompts: tuple[str, ...]
    every: int
    max_new_tokens: int
    ids: tuple[str, ...] = ()

    def due(self, step: int, n_steps: int) -> bool:
        """Before the update of ``step`` (the policy after ``step`` updates), and at ``n_steps`` (after the last)."""
        return bool(self.every) and (step % self.every == 0 or step == n_steps)


def probe_scores(model, tokenizer, probe: Probe) -> list[tuple[float, int]]:
    """(summed log-prob, tokens) of the current greedy decode of each probe prompt."""
    from pipeline.generation.transformers_backend import TransformersSampler
    from pipeline.generation.types import GenerationSettings

    sampler = TransformersSampler.from_model(model, tokenizer, "probe", batch_size=len(probe.prompts))
    was_training = model.training
    model.eval()
    outs = sampler.generate(list(probe.prompts), GenerationSettings.greedy(probe.max_new_tokens), progress=None)
    model.train(was_training)
    return [(c[0].logprob_sum, len(c[0].token_ids)) for c in outs]


def probe_metrics(scores: Sequence[tuple[float, int]]) -> dict[str, float]:
    """Mean summed (and per-token) log-prob of the probe prompts' greedy decodes."""
    return {"probe_greedy_lp": sum(lp for lp, _ in scores) / len(scores),
            "probe_greedy_lp_per_token": sum(lp / max(1, n) for lp, n in scores) / len(scores)}


@dataclass(frozen=True)
class FixedSets:
    """Pairs scored at step 0 (before any update), every ``every`` steps and after the last, so that every
    curve is measured on the same pairs, whatever the batches drew: ``sets`` maps a name (``heldout``,
    ``train``) to (pair ids, examples). A set with no pairs (``pairs.heldout_fraction`` 0, or
    ``eval_train_pairs`` 0) is left out: there is nothing to score, and no mean of nothing to log."""

    sets: dict[str, tuple[list[str], list[PairExample]]]
    every: int
    batch_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", {k: v for k, v in self.sets.items() if v[1]})

    def due(self, step: int, n_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == n_steps)


def fixed_set_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """``fixed_<set>_<mean>`` of every fixed set scored at one step (:func:`fixed_set_means`), for the log."""
    means = fixed_set_means(pl.DataFrame(rows, schema=schema_of("fixed_curves")))
    return {f"fixed_{m['set']}_{k}": v for m in means.iter_rows(named=True) for k, v in m.items()
            if k not in ("set", "step") and v is not None}


# --------------------------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class Checkpointing:
    """Where and how often to checkpoint; ``key`` ties a checkpoint to the run that wrote it."""

    path: str
    every: int
    key: str

    def due(self, done: int, n_steps: int) -> bool:
        """After ``done`` steps; never after the last one (the stage's outputs replace the checkpoint)."""
        return bool(self.every) and done % self.every == 0 and done < n_steps

    def load(self) -> dict | None:
        """The saved state if there is one and this run wrote it, else None."""
        if not os.path.isfile(self.path):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("key") != self.key:
            log.warning("ignoring checkpoint %s: written by a run with other inputs or settings", self.path)
            return None
        return state


# --------------------------------------------------------------------------------------------- the trainer
@dataclass
class PairStats:
    """Per-pair tensors of one step on this rank, in the order of ``pairs``: real pairs only (padding
    rows are dropped, so may be empty on a rank that held none)."""

    lp_w: torch.Tensor
    lp_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor
    len_w: torch.Tensor
    len_l: torch.Tensor
    g_w: torch.Tensor  # ∂ℓ/∂log π(y_w) of each pair's own loss
    g_l: torch.Tensor

    @classmethod
    def cat(cls, parts: Sequence[PairStats]) -> PairStats:
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def gather(self, ctx: D.Context) -> PairStats:
        return PairStats(**{f.name: D.gather_tensor(getattr(self, f.name), ctx) for f in fields(self)})


@dataclass
class StepResult:
    stats: PairStats  # this rank's real pairs (no padding)
    pairs: list[int]  # their example indices
    loss: torch.Tensor  # this rank's share of the global mean loss
    grad_norm: float
    lr: float


def build_optimizer(model, settings: TrainSettings, *, fused: bool = True):
    """AdamW and its schedule: the learning rate rises linearly over ``warmup_steps``, then stays.

    ``fused``: torch's single-kernel AdamW (CPU and CUDA; TRL's default too), one pass over the weights
    instead of several; off for FSDP2's sharded parameters."""
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    warmup = settings.warmup_steps
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))


class PreferenceTrainer:
    """The policy wrapped for data parallelism, AdamW and a linear warm-up: one optimiser step at a time.

    ``settings.batch_size`` pairs make one step whatever the number of processes: each rank takes
    every ``world``-th pair of the step and the loss is scaled so that the averaged gradient equals
    the single-process one; each rank's share is split into ``settings.grad_accum`` micro-batches.
    Every rank runs exactly ``grad_accum`` of them, each of at least one row, so that all take part in
    every collective: a step with fewer pairs than ``world * grad_accum`` (a short tail batch) fills
    the empty ones with padding rows of weight 0 (:func:`micro_batches`), which add nothing to the
    loss, the gradient or the diagnostics; the loss stays the mean over the step's real pairs.
    """

    def __init__(self, model, terms, settings: TrainSettings, *, pad_id: int, ctx: D.Context):
        self.model, self.terms, self.settings, self.pad_id, self.ctx = model, terms, settings, pad_id, ctx
        self.device = torch.device(ctx.device)
        self.beta = _implicit_beta(terms)  # (β_w, β_l) of the logged implicit rewards; None: the loss has none
        model.train()
        self.forward, self.sync_module = D.wrap_policy(model, ctx)
        # After wrapping: FSDP2 replaces the parameters with sharded ones.
        self.opt, self.sched = build_optimizer(model, settings, fused=not (ctx.distributed and ctx.strategy == "fsdp"))

    def _autocast(self):
        # The reference stage and evaluation compute under the same choice (their ref_w/ref_l).
        return autocast(self.device, self.settings.bf16)

    def train_step(self, examples: Sequence[PairExample], idx: Sequence[int]) -> StepResult:
        """Forward and backward every micro-batch of this rank's share of ``idx``, then one optimiser step."""
        micro = micro_batches(idx, self.ctx, self.settings.grad_accum)
        parts: list[PairStats] = []
        pairs: list[int] = []
        loss = torch.zeros((), device=self.device)
        for m, (mb, real) in enumerate(micro):
            # Gradients are all-reduced once per step, on the last micro-batch (the same one on every rank).
            with D.no_grad_sync(self.sync_module, self.ctx, skip=m < len(micro) - 1):
                share, stats = self._forward_backward([examples[i] for i in mb], real, len(idx))
            loss += share
            parts.append(stats)
            pairs += [i for i, r in zip(mb, real) if r]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return StepResult(PairStats.cat(parts), pairs, loss, float(grad_norm), self.sched.get_last_lr()[0])

    def _forward_backward(self, ex: Sequence[PairExample], real: Sequence[bool],
                          global_batch: int) -> tuple[torch.Tensor, PairStats]:
        """Loss of one micro-batch via the loss registry, backpropagated: its share of the mean over the
        step's ``global_batch`` real pairs, and the per-pair tensors of its real rows (``real`` False:
        padding, weight 0)."""
        batch = collate_pairs(ex, self.pad_id, self.settings).to(self.device)
        with self._autocast():
            lp, n_tok = self.forward(*batch.args())
        lp.retain_grad()
        k = len(ex)
        lp_w, lp_l, len_w, len_l = lp[:k], lp[k:], n_tok[:k], n_tok[k:]
        ref_w = torch.tensor([e.ref_w for e in ex], device=self.device)
        ref_l = torch.tensor([e.ref_l for e in ex], device=self.device)
        per_pair = losses.combined_loss(self.terms, lp_w, lp_l, ref_w, ref_l, len_w, len_l)
        # Weight 0 zeroes the loss and gradient of padding rows exactly: they copy a real pair, so are finite.
        keep = torch.tensor(real, device=self.device)
        share = (per_pair * keep).sum() / global_batch
        # Mean over the step's real pairs: ranks average gradients, hence the world factor.
        (share * self.ctx.world).backward()
        g = lp.grad * global_batch / self.ctx.world  # per-pair ∂ℓ/∂log π, undoing the batch scaling
        stats = PairStats(*(t.detach().float()[keep] for t in (lp_w, lp_l, ref_w, ref_l, len_w, len_l, g[:k], g[k:])))
        return share.detach(), stats

    @torch.no_grad()
    def _score(self, ex: Sequence[PairExample], batch_size: int) -> tuple[torch.Tensor, ...]:
        """lp_w, lp_l, len_w, len_l of ``ex`` under the current policy, as training computes them (no update)."""
        out: list[list[torch.Tensor]] = [[], [], [], []]
        for s in range(0, len(ex), batch_size):
            chunk = ex[s: s + batch_size]
            batch = collate_pairs(chunk, self.pad_id, self.settings).to(self.device)
            with self._autocast():
                lp, n_tok = self.forward(*batch.args())
            k = len(chunk)
            for i, t in enumerate((lp[:k], lp[k:], n_tok[:k], n_tok[k:])):
                out[i].append(t.detach().float().cpu())
        return tuple(torch.cat(t) for t in out)

    def score_fixed(self, fixed: FixedSets, step: int) -> list[dict]:
        """Per-pair rows of every fixed set under the current policy (every rank computes them all, so that
        FSDP2's all-gathers match), with each pair's gradient ratio of the 3D-properties' drastic drop."""
        was_training = self.model.training
        self.model.eval()
        rows = []
        for name, (ids, ex) in fixed.sets.items():
            lp_w, lp_l, len_w, len_l = self._score(ex, fixed.batch_size)
            ref_w = torch.tensor([e.ref_w for e in ex])
            ref_l = torch.tensor([e.ref_l for e in ex])
            ratio = pair_grad_ratio(self.terms, lp_w, lp_l, ref_w, ref_l, len_w, len_l)
            for i, pid in enumerate(ids):
                r = ratio[i].item()
                rows.append({"step": step, "set": name, "pair_id": pid, "lp_w": lp_w[i].item(),
                             "lp_l": lp_l[i].item(), "ref_w": ref_w[i].item(), "ref_l": ref_l[i].item(),
                             "len_w": int(len_w[i]), "len_l": int(len_l[i]),
                             "log10_grad_ratio": r if math.isfinite(r) else None})
        self.model.train(was_training)
        return rows

    def step_metrics(self, result: StepResult, buckets: Sequence[str] | None = None) -> dict[str, float]:
        """The step's loss and diagnostics over the whole global batch (a collective under torchrun)."""
        s = result.stats.gather(self.ctx)
        order = D.gather_tensor(torch.tensor(result.pairs, dtype=torch.long), self.ctx).tolist()
        loss = result.loss
        if self.ctx.distributed:
            torch.distributed.all_reduce(loss)
        metrics = {"loss": loss.item(), "grad_norm": result.grad_norm, "lr": result.lr,
                   **preference_metrics(s.lp_w, s.lp_l, s.ref_w, s.ref_l, s.len_w, s.len_l, self.beta),
                   **gradient_diagnostics(s.g_w, s.g_l, s.lp_w, s.lp_l)}
        if buckets is not None:
            metrics.update(bucket_displaced_shares(s.lp_w, s.ref_w, order, buckets))
        return metrics

    def save_checkpoint(self, ck: Checkpointing, done: int, history: list[dict[str, float]], curves: Curves) -> None:
        from pipeline.io import atomic_path

        # Every rank takes part in gathering the full states; rank 0 writes.
        state = {"key": ck.key, "step": done, "model": D.full_state_dict(self.model, self.ctx),
                 "optim": D.optimizer_state(self.model, self.opt, self.ctx), "sched": self.sched.state_dict(),
                 "history": history, "curves": {"fixed": curves.fixed, "probe": curves.probe}}
        if self.ctx.is_main:
            with atomic_path(ck.path) as tmp:
                torch.save(state, tmp)
        D.barrier(self.ctx)

    def resume(self, ck: Checkpointing | None, curves: Curves) -> tuple[list[dict[str, float]], int]:
        """Restore model, optimiser, schedule and ``curves`` from a matching checkpoint: (its history, steps done)."""
        state = ck.load() if ck is not None else None
        if state is None:
            return [], 0
        D.load_states(self.model, self.opt, state["model"], state["optim"], self.ctx)
        self.sched.load_state_dict(state["sched"])
        curves.fixed[:], curves.probe[:] = state["curves"]["fixed"], state["curves"]["probe"]
        return list(state["history"]), state["step"]


def train_preference(model, examples: Sequence[PairExample], terms, settings: TrainSettings, *, pad_id: int,
                     ctx: D.Context | None = None, log_fn: LogFn | None = None, progress: str | None = "train",
                     buckets: Sequence[str] | None = None, probe: Probe | None = None, tokenizer=None,
                     fixed: FixedSets | None = None, curves: Curves | None = None,
                     checkpoint: Checkpointing | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place on ``examples`` with the weighted loss ``terms``; return the history.

    ``settings`` is the variant's :class:`~pipeline.config.TrainSettings` (``tail: drop`` drops each
    epoch's short last batch). ``buckets`` (one label per example) adds the per-bucket share of the
    step's pairs pushed below the reference. ``fixed`` (fixed sets of pairs) and ``probe`` (probe prompts,
    with ``tokenizer``) are scored before the first update, every K steps and after the last step, into
    ``curves`` (per pair / prompt) and the logged metrics (``fixed_<set>_*``, ``probe_greedy_lp``);
    the metrics of step s are those of the policy after s updates, the last ones logged as step
    ``len(batches)``. ``checkpoint`` saves every K steps and resumes from a matching checkpoint.
    ``log_fn(step, metrics)`` is called on rank 0 only.

    Before the first update the policy is the reference, so on the first step of a fresh run the
    batch's ``lp`` must equal ``ref`` up to rounding: a ``ref_gap_mean`` above ``settings.ref_check_tol``
    raises ValueError (reference computed at another precision, truncation or model).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no training pairs: check the pairs stage's counts (all groups tied?)")
    ctx = ctx or D.Context(device=str(next(model.parameters()).device))
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    trainer = PreferenceTrainer(model, terms, settings, pad_id=pad_id, ctx=ctx)
    batches = step_batches(len(examples), settings.batch_size, settings.epochs, settings.seed,
                           drop_tail=settings.tail == "drop")
    if len(examples) < settings.batch_size:
        log.warning("train.batch_size = %d is more than the %d training pairs: every step takes all of them",
                    settings.batch_size, len(examples))
    n_steps = len(batches)
    log_fn = log_fn if ctx.is_main else None
    curves = curves if curves is not None else Curves()
    probe = probe if probe is not None and tokenizer is not None else None

    def evaluate(step: int) -> dict[str, float]:
        """The fixed sets and the probe under the policy after ``step`` updates, when due."""
        out: dict[str, float] = {}
        if fixed is not None and fixed.due(step, n_steps):
            rows = trainer.score_fixed(fixed, step)
            out.update(fixed_set_metrics(rows))
            curves.fixed += rows
        if probe is not None and probe.due(step, n_steps):
            scores = probe_scores(model, tokenizer, probe)
            out.update(probe_metrics(scores))
            ids = probe.ids or tuple(str(i) for i in range(len(scores)))
            curves.probe += [{"step": step, "probe": pid, "greedy_lp": lp, "n_tokens": n}
                             for pid, (lp, n) in zip(ids, scores)]
        return out

    history, start = trainer.resume(checkpoint, curves)
    if start:
        log.info("resuming from checkpoint %s at step %d of %d", checkpoint.path, start, n_steps)
        if log_fn is not None:
            for i, m in enumerate(history):  # a restarted stage re-logs what its outputs lost
                log_fn(i, m)

    bar = tqdm(total=n_steps, initial=start, desc=progress, disable=progress is None or not ctx.is_main, unit="step")
    for step, idx in enumerate(batches[start:], start):
        before = evaluate(step)
        metrics = trainer.step_metrics(trainer.train_step(examples, idx), buckets)
        worst_lp, worst_ref = metrics.pop("ref_gap_lp"), metrics.pop("ref_gap_ref")
        # Its log-probs come from the forward before the optimiser step: the policy was the reference.
        # The mean, not the max: a wrong precision moves every sequence (fp32 reference vs bf16: mean 0.195),
        # while attention kernels that round bf16 by batch shape (CPU flash attention, before logprobs.autocast
        # chose the math kernel: mean up to 0.067, max 0.67) move a few; GPU kernels are unmeasured here.
        if step == 0 and metrics["ref_gap_mean"] > settings.ref_check_tol:
            raise ValueError(
                f"first step: the policy's log-probs differ from the reference's by "
                f"{metrics['ref_gap_mean']:.4g} nats per sequence on average (max {metrics['ref_gap_max']:.4g}), "
                f"above train.ref_check_tol = {settings.ref_check_tol:g} (worst sequence: lp {worst_lp:.4f}, ref "
                f"{worst_ref:.4f}). Before any update they must agree: the reference was computed with another "
                "precision (train.bf16), max_length or model; rerun the reference stage")
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss became {metrics['loss']} at step {step}; lower train.lr")
        metrics.update(before)
        history.append(metrics)
        if log_fn is not None:
            log_fn(step, metrics)
        if checkpoint is not None and checkpoint.due(step + 1, n_steps):
            trainer.save_checkpoint(checkpoint, step + 1, history, curves)
        bar.update(1)
    bar.close()
    final = evaluate(n_steps)  # after the last update
    if final and log_fn is not None:
        log_fn(n_steps, final)
    model.eval()
    return history


# --------------------------------------------------------------------------------------------- SFT warm-up
