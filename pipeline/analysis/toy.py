"""The toy model of the 3D-properties paper (Yan et al. 2024, "3D-Properties: Identifying Challenges in
DPO and Charting a Path Forward", arXiv 2406.07327, §3.2), for every loss in :mod:`pipeline.training.losses`.

Setup (REFERENCE.md, last section). 4 prompts, given to the policy as one-hot vectors; 10
responses; the policy is a 3-layer MLP (``4 → hidden → hidden → 10``, ReLU) whose softmax is a
categorical distribution over the responses. Responses are numbered from 0 here:

- 0–3 are the chosen responses (response ``i`` is the optimal one for prompt ``i``);
- 4–7 are the rejected responses (each pair takes one of them at random, from ``seed``);
- 8–9 are never in the data ("unseen").

Step 1 ("SFT") fits the MLP to a specified initial distribution (cross-entropy towards a target
distribution, i.e. KL(target‖π) up to a constant). Step 2 trains it with a preference loss on the
log-probs of the chosen and rejected responses; the reference is the SFT model, frozen. All
responses have length 1 (for ``dpo_sft`` and ``simpo``).

The four scenarios (the paper's §3.2, §5.2 and Table 4) differ in the initial distribution, i.e. in
where the chosen and rejected mass starts: ``toy.scenario_init`` in params.yaml.

Recorded at every step (before the update; step 0 is the SFT model): the mean probability of the
chosen response, of the rejected response of each pair, the dispersed mass (everything that is
neither the prompt's chosen response nor any rejected response: the two unseen responses plus the
other prompts' chosen ones), and the gradient magnitudes with respect to the PROBABILITIES,
``|∂L/∂π(y_w)|`` and ``|∂L/∂π(y_l)|`` (per pair, by the chain rule ``∂L/∂π = (∂L/∂log π) / π`` on
the autograd gradient w.r.t. the log-probs), and their ratio ``|∂L/∂π(y_l)| / |∂L/∂π(y_w)|``.
``grad_w``/``grad_l`` are means over pairs of the per-pair magnitudes (of the batch-mean loss),
``grad_ratio`` the mean over pairs of the per-pair ratio (NaN where ``∂L/∂π(y_w)`` is 0, e.g. a
satisfied hinge). For DPO the ratio equals ``π(y_w)/π(y_l)`` (the paper's Corollary 1); that mean
ratio is recorded as ``prob_ratio``.

The tests check what the paper reports for its toy setting: DPO in scenario 1 drives π(y_w) up
and then down while π(y_l) → 0 and the dispersed mass grows back (drastic drop, degradation,
dispersion); DPOP, DPO+SFT, IPO, cDPO and SLiC keep π(y_w) high; the gradient ratio explodes as
π(y_l) → 0. Under Adam, flex_dpo (β_l < β_w) does not slow the fall of π(y_l): Adam normalises away
the smaller gradient scale β_l that the paper's argument (|∂L/∂π(y_l)| ∝ β_l) relies on.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import torch

from pipeline.config import TOY_REJECTED, ScenarioInit, ToyParams, validate_loss_hparams
from pipeline.training import losses as L

N_PROMPTS = 4
N_RESPONSES = 10
CHOSEN = tuple(range(0, 4))
REJECTED = tuple(range(4, 4 + TOY_REJECTED))
UNSEEN = (8, 9)

HISTORY_COLUMNS = ("loss", "scenario", "step", "p_chosen", "p_rejected", "p_dispersed", "grad_w",
                   "grad_l", "grad_ratio", "prob_ratio")


# --------------------------------------------------------------------------------------------- model
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """16-wide matrices: extra intra-op threads only add overhead (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_mlp(hidden: int) -> torch.nn.Sequential:
    """The 3-layer MLP policy: one-hot prompt (4) → logits over the 10 responses."""
    return torch.nn.Sequential(
        torch.nn.Linear(N_PROMPTS, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, N_RESPONSES),
    ).double()


def target_distribution(init: ScenarioInit) -> torch.Tensor:
    """``[4, 10]`` SFT target: row ``i`` is the initial distribution for prompt ``i``."""
    others = N_RESPONSES - 1 - len(REJECTED)
    rest = (1.0 - init.p_chosen - len(REJECTED) * init.p_rejected) / others
    t = torch.full((N_PROMPTS, N_RESPONSES), rest, dtype=torch.float64)
    t[:, list(REJECTED)] = init.p_rejected
    for i in range(N_PROMPTS):
        t[i, CHOSEN[i]] = init.p_chosen
    return t


def make_pairs(params: ToyParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs as index tensors (prompt, chosen, rejected); the rejected response is drawn at random."""
    g = torch.Generator().manual_seed(params.seed + 1)
    prompt = torch.arange(N_PROMPTS).repeat_interleave(params.pairs_per_prompt)
    chosen = prompt.clone()
    rejected = torch.randint(REJECTED[0], REJECTED[-1] + 1, (len(prompt),), generator=g)
    return prompt, chosen, rejected


def sft(params: ToyParams, init: ScenarioInit) -> tuple[torch.nn.Module, float]:
    """Step 1: fit a fresh MLP (seeded) to the scenario's initial distribution. Returns (model, KL)."""
    with _one_thread():
        return _sft(params, init)


def _sft(params: ToyParams, init: ScenarioInit) -> tuple[torch.nn.Module, float]:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(params.seed)
        model = make_mlp(params.hidden)
    x = torch.eye(N_PROMPTS, dtype=torch.float64)
    target = target_distribution(init)
    opt = torch.optim.Adam(model.parameters(), lr=params.sft_lr)
    for _ in range(params.sft_steps):
        opt.zero_grad(set_to_none=True)
        logp = torch.log_softmax(model(x), dim=-1)
        loss = -(target * logp).sum(-1).mean()  # cross-entropy = KL(target‖π) + H(target)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logp = torch.log_softmax(model(x), dim=-1)
        kl = (target * (target.log() - logp)).sum(-1).max().item()
    return model, kl


def run_one(params: ToyParams, loss: str, sft_model: torch.nn.Module,
            pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Step 2 for one loss, starting from (a copy of) ``sft_model``. Returns per-step series."""
    hp = validate_loss_hparams(loss, params.hparams[loss])
    fn = L.LOSSES[loss].fn
    prompt, chosen, rejected = pairs
    n = len(prompt)
    x = torch.eye(N_PROMPTS, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.log_softmax(sft_model(x), dim=-1)
    ref_w, ref_l = ref[prompt, chosen], ref[prompt, rejected]
    model = copy.deepcopy(sft_model)
    if params.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=params.lr)
    # the dispersed set of prompt i: neither its chosen response nor any rejected response
    disp_mask = torch.ones(N_PROMPTS, N_RESPONSES, dtype=torch.bool)
    disp_mask[:, list(REJECTED)] = False
    disp_mask[torch.arange(N_PROMPTS), torch.tensor(CHOSEN)] = False

    rec: list[torch.Tensor] = []
    for step in range(params.steps + 1):
        logp = torch.log_softmax(model(x), dim=-1)
        lp_w, lp_l = logp[prompt, chosen], logp[prompt, rejected]
        lp_w.retain_grad()
        lp_l.retain_grad()
        total = fn(lp_w, lp_l, ref_w, ref_l, ones, ones, **hp).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        # ∂L/∂log π from autograd, then the chain rule to the probabilities: ∂L/∂π = (∂L/∂log π) / π
        g_lw, g_ll = lp_w.grad, lp_l.grad
        with torch.no_grad():
            p = logp.exp()
            p_w, p_l = p[prompt, chosen], p[prompt, rejected]
            gw = g_lw.abs() / p_w
            gl = g_ll.abs() / p_l
            ratio = torch.where(gw > 0, gl / gw, torch.full_like(gw, math.nan))
            rec.append(torch.stack([
                p_w.mean(), p_l.mean(), (p * disp_mask).sum(-1).mean(), gw.mean(), gl.mean(),
                ratio.mean(), (p_w / p_l).mean(),
            ]))
        if step < params.steps:
            opt.step()
    out = torch.stack(rec)
    names = ("p_chosen", "p_rejected", "p_dispersed", "grad_w", "grad_l", "grad_ratio", "prob_ratio")
    return {k: out[:, j] for j, k in enumerate(names)}


def run_toy(params: ToyParams) -> pl.DataFrame:
    """Run every loss × scenario; a long table with one row per (loss, scenario, step)."""
    with _one_thread():
        pairs = make_pairs(params)
        frames = []
        for scenario in params.scenarios:
            sft_model, _ = sft(params, params.scenario_init[scenario])
            for loss in params.losses:
                series = run_one(params, loss, sft_model, pairs)
                n = params.steps + 1
                frames.append(pl.DataFrame({
                    "loss": [loss] * n,
                    "scenario": pl.Series([scenario] * n, dtype=pl.Int32),
                    "step": pl.Series(range(n), dtype=pl.Int32),
                    **{k: v.numpy() for k, v in series.items()},
                }))
    return pl.concat(frames).select(HISTORY_COLUMNS)


def final_metrics(df: pl.DataFrame) -> dict[str, Any]:
    """``{loss: {"scenario_<s>": {initial/peak/final probabilities, final grad ratio}}}``."""
    out: dict[str, Any] = {}
    for (loss, scenario), g in df.sort("step").group_by(["loss", "scenario"], maintain_order=True):
        first, last = g.row(0, named=True), g.row(-1, named=True)
        out.setdefault(loss, {})[f"scenario_{scenario}"] = {
            "p_chosen_init": first["p_chosen"],
            "p_chosen_peak": g["p_chosen"].max(),
            "p_chosen": last["p_chosen"],
            "p_rejected_init": first["p_rejected"],
            "p_rejected": last["p_rejected"],
            "p_dispersed_init": first["p_dispersed"],
            "p_dispersed": last["p_dispersed"],
            "grad_ratio": last["grad_ratio"] if math.isfinite(last["grad_ratio"]) else None,
        }
    return out


# --------------------------------------------------------------------------------------------- plots
def plot_toy(df: pl.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per scenario (``scenario_<s>.png``): for each loss a panel with the chosen, rejected
    and dispersed probabilities over steps, and a last panel with the gradient ratio
    ``|∂L/∂π(y_l)| / |∂L/∂π(y_w)|`` of every loss (log scale). Files are written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    losses = list(dict.fromkeys(df["loss"].to_list()))
    for scenario in sorted(set(df["scenario"].to_list())):
        sub = df.filter(pl.col("scenario") == scenario).sort("step")
        n = len(losses) + 1
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        flat = axes.ravel()
        for ax, loss in zip(flat, losses):
            d = sub.filter(pl.col("loss") == loss)
            ax.plot(d["step"], d["p_chosen"], label="chosen", color="tab:green")
            ax.plot(d["step"], d["p_rejected"], label="rejected", color="tab:red")
            ax.plot(d["step"], d["p_dispersed"], label="dispersed", color="tab:blue")
            ax.set_title(loss)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("step")
        flat[0].legend(fontsize=7)
        ax = flat[len(losses)]
        for loss in losses:
            d = sub.filter(pl.col("loss") == loss)
            ax.plot(d["step"], d["grad_ratio"], label=loss)
        ax.set_yscale("log")
        ax.set_title("|dL/dπ(y_l)| / |dL/dπ(y_w)|")
        ax.set_xlabel("step")
        ax.legend(fontsize=6, ncol=2)
        for extra in flat[n:]:
            extra.axis("off")
        fig.suptitle(f"toy model, scenario {scenario}")
        fig.tight_layout()
        path = out_dir / f"scenario_{scenario}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
        written.append(path)
    return written
