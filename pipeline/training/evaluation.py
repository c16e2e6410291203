"""What training scores between updates: fixed sets of pairs and fixed probe prompts.

Both are scored before the first update, every ``every`` steps and after the last (:func:`due`), so
that every curve is measured on the same pairs and prompts, whatever the batches drew. The rows go
to :class:`~pipeline.training.curves.Curves`, their means to the logged metrics (``fixed_<set>_*``,
``probe_greedy_lp``); the metrics of step s are those of the policy after s updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl
import torch

from pipeline.schema import schema_of
from pipeline.training.curves import Curves, fixed_set_means
from pipeline.training.diagnostics import pair_grad_ratio
from pipeline.training.examples import PairExample, join_reference, pair_examples

if TYPE_CHECKING:
    from pipeline.settings.train import TrainSettings
    from pipeline.training.trainer import PreferenceTrainer


def due(every: int, step: int, n_steps: int) -> bool:
    """Whether to score before the update of ``step`` (the policy after ``step`` updates), or at
    ``n_steps`` (after the last): at step 0, every ``every`` steps and at the end; never when ``every`` is 0."""
    return bool(every) and (step % every == 0 or step == n_steps)


# --------------------------------------------------------------------------------------------- probe
@dataclass(frozen=True)
class Probe:
    """Fixed prompts whose greedy decode is re-scored when :func:`due`: the "squeezing effect" of Ren &
    Sutherland 2024, "Learning Dynamics of LLM Finetuning" (arXiv 2407.10490). ``ids`` name the
    prompts in the recorded curves."""

    prompts: tuple[str, ...]
    every: int
    max_new_tokens: int
    ids: tuple[str, ...] = ()


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
    return {
        "probe_greedy_lp": sum(lp for lp, _ in scores) / len(scores),
        "probe_greedy_lp_per_token": sum(lp / max(1, n) for lp, n in scores) / len(scores),
    }


def probe_of(prompts: pl.DataFrame, settings: TrainSettings, max_new_tokens: int) -> Probe | None:
    """The first ``settings.probe_prompts`` test prompts by id, the same for every variant (None when
    ``probe_every`` is 0)."""
    if not settings.probe_every:
        return None
    chosen = prompts.filter(pl.col("split") == "test").sort("prompt_id").head(settings.probe_prompts)
    return Probe(tuple(chosen["prompt"]), settings.probe_every, max_new_tokens, tuple(chosen["prompt_id"]))


# --------------------------------------------------------------------------------------------- fixed sets
@dataclass(frozen=True)
class FixedSets:
    """Pairs scored when :func:`due`: ``sets`` maps a name (``heldout``, ``train``) to (pair ids,
    examples). A set with no pairs (``pairs.heldout_fraction`` 0, or ``eval_train_pairs`` 0) is left
    out: there is nothing to score, and no mean of nothing to log."""

    sets: dict[str, tuple[list[str], list[PairExample]]]
    every: int
    batch_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", {k: v for k, v in self.sets.items() if v[1]})


def fixed_sets_of(
    pairs: pl.DataFrame, reference: pl.DataFrame, settings: TrainSettings, batch_size: int
) -> FixedSets | None:
    """All held-out pairs and the first ``settings.eval_train_pairs`` training pairs by id, the same
    for every variant (None when ``eval_every`` is 0)."""
    if not settings.eval_every:
        return None
    held = join_reference(pairs.filter(pl.col("split") == "heldout"), reference).sort("pair_id")
    train = join_reference(pairs.filter(pl.col("split") == "train"), reference).sort("pair_id")
    sets = {"heldout": held, "train": train.head(settings.eval_train_pairs)}
    return FixedSets(
        {name: (d["pair_id"].to_list(), pair_examples(d)) for name, d in sets.items()}, settings.eval_every, batch_size
    )


def score_fixed(trainer: PreferenceTrainer, fixed: FixedSets, step: int) -> list[dict]:
    """Per-pair rows of every fixed set under the current policy (every rank computes them all, so that
    FSDP2's all-gathers match), with each pair's gradient ratio of the 3D-properties' drastic drop."""
    was_training = trainer.model.training
    trainer.model.eval()
    rows = []
    for name, (ids, ex) in fixed.sets.items():
        lp_w, lp_l, len_w, len_l = trainer.score(ex, fixed.batch_size)
        ref_w = torch.tensor([e.ref_w for e in ex])
        ref_l = torch.tensor([e.ref_l for e in ex])
        ratio = pair_grad_ratio(trainer.terms, lp_w, lp_l, ref_w, ref_l, len_w, len_l)
        for i, pid in enumerate(ids):
            r = ratio[i].item()
            rows.append(
                {
                    "step": step,
                    "set": name,
                    "pair_id": pid,
                    "lp_w": lp_w[i].item(),
                    "lp_l": lp_l[i].item(),
                    "ref_w": ref_w[i].item(),
                    "ref_l": ref_l[i].item(),
                    "len_w": int(len_w[i]),
                    "len_l": int(len_l[i]),
                    "log10_grad_ratio": r if math.isfinite(r) else None,
                }
            )
    trainer.model.train(was_training)
    return rows


def fixed_set_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """``fixed_<set>_<mean>`` of every fixed set scored at one step (:func:`fixed_set_means`), for the log."""
    means = fixed_set_means(pl.DataFrame(rows, schema=schema_of("fixed_curves")))
    return {
        f"fixed_{m['set']}_{k}": v
        for m in means.iter_rows(named=True)
        for k, v in m.items()
        if k not in ("set", "step") and v is not None
    }


# --------------------------------------------------------------------------------------------- both
@dataclass
class Evaluation:
    """The fixed sets and the probe of a run (either may be None; the probe decodes with ``tokenizer``)
    and the curves their scores fill, step after step."""

    fixed: FixedSets | None = None
    probe: Probe | None = None
    tokenizer: Any = None
    curves: Curves = field(default_factory=Curves)

    def __post_init__(self) -> None:
        if self.probe is not None and self.tokenizer is None:
            raise ValueError("a probe needs the tokenizer to decode its prompts")

    def __call__(self, trainer: PreferenceTrainer, step: int, n_steps: int) -> dict[str, float]:
        """Score what is due under the policy after ``step`` updates: the metrics to log."""
        out: dict[str, float] = {}
        if self.fixed is not None and due(self.fixed.every, step, n_steps):
            rows = score_fixed(trainer, self.fixed, step)
            out.update(fixed_set_metrics(rows))
            self.curves.fixed += rows
        if self.probe is not None and due(self.probe.every, step, n_steps):
            scores = probe_scores(trainer.model, self.tokenizer, self.probe)
            out.update(probe_metrics(scores))
            ids = self.probe.ids or tuple(str(i) for i in range(len(scores)))
            self.curves.probe += [
                {"step": step, "probe": pid, "greedy_lp": lp, "n_tokens": n} for pid, (lp, n) in zip(ids, scores)
            ]
        return out
