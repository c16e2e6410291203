"""Preference training over precomputed reference log-probs.

The reference model is never loaded here: ``ref_w``/``ref_l`` come with the examples
(:mod:`pipeline.training.examples`). :func:`train_preference` is the recipe; one optimiser step reads::

    for step, idx in enumerate(batches[start:], start):
        before = evaluate(trainer, step, n_steps)       # fixed sets and probe, when due (step 0: the start)
        result = trainer.train_step(examples, idx)      # micro-batches, loss, backward, clip, step
        metrics = trainer.step_metrics(result, buckets)  # diagnostics, gathered over ranks
        check; log; maybe checkpoint
    evaluate(trainer, n_steps, n_steps)                 # after the last update

Chosen and rejected go through the policy in one forward pass. The step's diagnostics
(:mod:`pipeline.training.diagnostics`) and the scores of the fixed sets and probe
(:mod:`pipeline.training.evaluation`) are handed to a ``log_fn`` callback (dvclive in the train stage).
The first step of a fresh run checks that the policy's log-probs equal the reference's
(:func:`check_step`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from pipeline.model import collate, precision
from pipeline.training import checkpoints, distributed, losses
from pipeline.training.batching import step_batches
from pipeline.training.checkpoints import Checkpointing
from pipeline.training.diagnostics import (
    bucket_displaced_shares,
    gradient_diagnostics,
    implicit_beta,
    preference_metrics,
)
from pipeline.training.evaluation import Evaluation
from pipeline.training.examples import PairExample

if TYPE_CHECKING:
    from pipeline.settings.train import TrainSettings

log = logging.getLogger("pipeline.training.trainer")

LogFn = Callable[[int, dict[str, float]], object]  # (step, metrics); what it returns is ignored


@dataclass
class RunOptions:
    """What a run does besides training; the defaults do none of it."""

    log_fn: LogFn | None = None  # log_fn(step, metrics), on rank 0 only
    progress: str | None = None  # the progress bar's label (None: no bar)
    buckets: Sequence[str] | None = None  # one label per example: adds each bucket's displaced share
    evaluation: Evaluation | None = None  # fixed sets and probe, and the curves they fill
    checkpoint: Checkpointing | None = None  # saves every K steps; a rerun resumes from a matching one


# --------------------------------------------------------------------------------------------- batches
def micro_batches(idx: Sequence[int], ctx: distributed.Context, grad_accum: int) -> list[tuple[list[int], list[bool]]]:
    """This rank's ``grad_accum`` micro-batches of a step, each ``(example indices, real-pair mask)``.

    The rank's share is every ``world``-th pair of ``idx``, split into ``grad_accum`` parts. Every
    rank must run the same number of forwards and backwards, whatever the step's size: DDP's
    gradient all-reduce and FSDP2's all-gathers are collectives. So a part left empty (a short tail
    batch, fewer pairs than ``world * grad_accum``) gets one padding row, a copy of the step's first
    pair (finite when the real pairs are) masked False: trained with weight 0, never in the stats.
    """
    mine = list(idx[ctx.rank :: ctx.world])
    parts = [mine[m::grad_accum] for m in range(grad_accum)]
    return [(p, [True] * len(p)) if p else ([idx[0]], [False]) for p in parts]


def collate_examples(ex: Sequence[PairExample], pad_id: int, settings: TrainSettings):
    """One batch scoring the chosen responses, then the rejected ones (``train.shared_prompt``: one row per pair)."""
    return collate.collate_pairs(
        [e.prompt_ids for e in ex],
        [e.chosen_ids for e in ex],
        [e.rejected_ids for e in ex],
        pad_id,
        settings.max_length,
        shared_prompt=settings.shared_prompt,
    )


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

    def gather(self, ctx: distributed.Context) -> PairStats:
        return PairStats(**{f.name: distributed.gather_tensor(getattr(self, f.name), ctx) for f in fields(self)})


@dataclass
class StepResult:
    stats: PairStats  # this rank's real pairs (no padding)
    pairs: list[int]  # their example indices
    loss: torch.Tensor  # this rank's share of the global mean loss
    grad_norm: float
    lr: float


# --------------------------------------------------------------------------------------------- the trainer
def build_optimizer(model, settings: TrainSettings, *, fused: bool = True):
    """AdamW and its schedule: the learning rate rises linearly over ``warmup_steps``, then stays.

    ``fused``: torch's single-kernel AdamW (CPU and CUDA; TRL's default too), one pass over the weights
    instead of several; off for FSDP2's sharded parameters. Only the parameters that train (a LoRA run: the
    adapter's) get optimiser state."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
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

    def __init__(self, model, terms, settings: TrainSettings, *, pad_id: int, ctx: distributed.Context):
        self.model, self.terms, self.settings, self.pad_id, self.ctx = model, terms, settings, pad_id, ctx
        self.device = torch.device(ctx.device)
        self.beta = implicit_beta(terms)  # (β_w, β_l) of the logged implicit rewards; None: the loss has none
        model.train()
        self.forward, self.sync_module = distributed.wrap_policy(model, ctx, settings)
        # After wrapping: FSDP2 replaces the parameters with sharded ones.
        self.opt, self.sched = build_optimizer(model, settings, fused=not (ctx.distributed and ctx.strategy == "fsdp"))

    def _autocast(self):
        # The reference stage and evaluation compute under the same choice (their ref_w/ref_l).
        return precision.autocast(self.device, self.settings.bf16, self.settings.cpu_attention)

    def train_step(self, examples: Sequence[PairExample], idx: Sequence[int]) -> StepResult:
        """Forward and backward every micro-batch of this rank's share of ``idx``, then one optimiser step."""
        micro = micro_batches(idx, self.ctx, self.settings.grad_accum)
        parts: list[PairStats] = []
        pairs: list[int] = []
        loss = torch.zeros((), device=self.device)
        for m, (mb, real) in enumerate(micro):
            # Gradients are all-reduced once per step, on the last micro-batch (the same one on every rank).
            with distributed.no_grad_sync(self.sync_module, self.ctx, skip=m < len(micro) - 1):
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

    def _forward_backward(
        self, ex: Sequence[PairExample], real: Sequence[bool], global_batch: int
    ) -> tuple[torch.Tensor, PairStats]:
        """Loss of one micro-batch via the loss registry, backpropagated: its share of the mean over the
        step's ``global_batch`` real pairs, and the per-pair tensors of its real rows (``real`` False:
        padding, weight 0)."""
        batch = collate_examples(ex, self.pad_id, self.settings).to(self.device)
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
    def score(self, ex: Sequence[PairExample], batch_size: int) -> tuple[torch.Tensor, ...]:
        """lp_w, lp_l, len_w, len_l of ``ex`` under the current policy, as training computes them (no update)."""
        out: list[list[torch.Tensor]] = [[], [], [], []]
        for s in range(0, len(ex), batch_size):
            chunk = ex[s : s + batch_size]
            batch = collate_examples(chunk, self.pad_id, self.settings).to(self.device)
            with self._autocast():
                lp, n_tok = self.forward(*batch.args())
            k = len(chunk)
            for i, t in enumerate((lp[:k], lp[k:], n_tok[:k], n_tok[k:])):
                out[i].append(t.detach().float().cpu())
        return tuple(torch.cat(t) for t in out)

    def step_metrics(self, result: StepResult, buckets: Sequence[str] | None = None) -> dict[str, float]:
        """The step's loss and diagnostics over the whole global batch (a collective under torchrun)."""
        s = result.stats.gather(self.ctx)
        order = distributed.gather_tensor(torch.tensor(result.pairs, dtype=torch.long), self.ctx).tolist()
        loss = result.loss
        if self.ctx.distributed:
            torch.distributed.all_reduce(loss)
        metrics = {
            "loss": loss.item(),
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            **preference_metrics(s.lp_w, s.lp_l, s.ref_w, s.ref_l, s.len_w, s.len_l, self.beta),
            **gradient_diagnostics(s.g_w, s.g_l, s.lp_w, s.lp_l),
        }
        if buckets is not None:
            metrics.update(bucket_displaced_shares(s.lp_w, s.ref_w, order, buckets))
        return metrics


# --------------------------------------------------------------------------------------------- the recipe
def check_step(metrics: dict[str, float], step: int, tol: float) -> None:
    """Raise when the step went wrong: a loss that is not finite, or on the first step a policy whose
    log-probs are not the reference's (``ref_gap_per_token`` above ``tol``, ``train.ref_check_tol``). Takes
    the worst sequence's numbers (``ref_gap_lp``, ``ref_gap_ref``) out of ``metrics``: they are for the message."""
    worst_lp, worst_ref = metrics.pop("ref_gap_lp"), metrics.pop("ref_gap_ref")
    # The step's log-probs come from the forward before the optimiser step, where the policy is the
    # reference. Per token, summed over the batch: under bf16 a batch's shape moves every token's
    # log-prob by rounding, so a sequence's gap grows with its length while another model, truncation
    # or prompt layout moves every token by far more.
    if step == 0 and metrics["ref_gap_per_token"] > tol:
        raise ValueError(
            f"first step: the policy's log-probs differ from the reference's by "
            f"{metrics['ref_gap_per_token']:.4g} nats per token, above train.ref_check_tol = {tol:g} "
            f"({metrics['ref_gap_mean']:.4g} nats per sequence on average, max {metrics['ref_gap_max']:.4g}; "
            f"worst sequence: lp {worst_lp:.4f}, ref {worst_ref:.4f}). Before any update they must agree: "
            "the reference was computed with another model, max_length, prompt layout or precision "
            "(train.bf16); rerun the reference stage"
        )
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"loss became {metrics['loss']} at step {step}; lower train.lr")


def first_step_check(history: list[dict[str, float]], tol: float) -> dict:
    """The first-step check of the policy against the reference (:func:`check_step` raises when it
    fails), for the stage's metrics. ``history[0]`` is the first step also after a resume."""
    first = history[0]
    return {
        "gap_per_token": first["ref_gap_per_token"],
        "gap_max": first["ref_gap_max"],
        "gap_mean": first["ref_gap_mean"],
        "tol": tol,
        "passed": first["ref_gap_per_token"] <= tol,
    }


def train_preference(
    model,
    examples: Sequence[PairExample],
    terms,
    settings: TrainSettings,
    *,
    pad_id: int,
    ctx: distributed.Context | None = None,
    run: RunOptions | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``examples`` with the weighted loss ``terms``; return the history.

    ``settings`` is the variant's :class:`~pipeline.settings.train.TrainSettings` (``tail: drop`` drops each
    epoch's short last batch). ``run`` adds the log, the evaluations between updates (the last ones
    logged as step ``len(batches)``), the per-bucket shares and checkpoints (:class:`RunOptions`).
    Before the first update the policy is the reference, so the first step of a fresh run raises
    ValueError when the batch's ``lp`` differ from ``ref`` by more than rounding (:func:`check_step`).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no training pairs: check the pairs stage's counts (all groups tied?)")
    ctx = ctx or distributed.Context(device=str(next(model.parameters()).device))
    run = run or RunOptions()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    trainer = PreferenceTrainer(model, terms, settings, pad_id=pad_id, ctx=ctx)
    batches = step_batches(
        len(examples), settings.batch_size, settings.epochs, settings.seed, drop_tail=settings.tail == "drop"
    )
    if len(examples) < settings.batch_size:
        log.warning(
            "train.batch_size = %d is more than the %d training pairs: every step takes all of them",
            settings.batch_size,
            len(examples),
        )
    n_steps = len(batches)
    log_fn = run.log_fn if ctx.is_main else None
    evaluate = run.evaluation if run.evaluation is not None else Evaluation()

    history, start = checkpoints.resume(run.checkpoint, trainer, evaluate.curves)
    if start:
        assert run.checkpoint is not None  # steps are restored only from a checkpoint
        log.info("resuming from checkpoint %s at step %d of %d", run.checkpoint.path, start, n_steps)
        if log_fn is not None:
            for i, m in enumerate(history):  # a restarted stage re-logs what its outputs lost
                log_fn(i, m)

    bar = tqdm(
        total=n_steps, initial=start, desc=run.progress, disable=run.progress is None or not ctx.is_main, unit="step"
    )
    for step, idx in enumerate(batches[start:], start):
        before = evaluate(trainer, step, n_steps)
        metrics = trainer.step_metrics(trainer.train_step(examples, idx), run.buckets)
        check_step(metrics, step, settings.ref_check_tol)
        metrics.update(before)
        history.append(metrics)
        if log_fn is not None:
            log_fn(step, metrics)
        if run.checkpoint is not None and run.checkpoint.due(step + 1, n_steps):
            checkpoints.save(run.checkpoint, trainer, step + 1, history, evaluate.curves)
        bar.update(1)
    bar.close()
    final = evaluate(trainer, n_steps, n_steps)  # after the last update
    if final and log_fn is not None:
        log_fn(n_steps, final)
    model.eval()
    return history
