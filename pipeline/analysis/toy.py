"""The toy model of the 3D-properties paper (Yan et al. 2024, "3D-Properties: Identifying Challenges in
DPO and Charting a Path Forward", arXiv 2406.07327, §3.2), for every loss in :mod:`pipeline.training.losses`.

Setup (the 3D-properties paper, §3.2). 4 prompts, given to the policy as one-hot vectors; 10
responses; the policy is a 3-layer MLP (``4 → hidden → hidden → 10``, ReLU) whose softmax is a
categorical distribution over the responses. Responses are numbered from 0 here:

- 0–3 are the chosen responses (response ``i`` is the optimal one for prompt ``i``);
- 4–7 are the rejected responses (each pair takes one of them at random, drawn from the seed);
- 8–9 are never in the data ("unseen").

Step 1 ("SFT") fits the MLP to a specified initial distribution (cross-entropy towards a target
distribution, i.e. KL(target‖π) up to a constant). Step 2 trains it with a preference loss on the
log-probs of the chosen and rejected responses; the reference is the SFT model, frozen. All
responses have length 1 (for ``dpo_sft`` and ``simpo``).

Each seed of ``toy.seeds`` is its own MLP initialisation and draw of rejected responses; every seed ×
scenario × loss trains at once (:func:`run_toy`, stacked MLPs), and
:func:`pipeline.analysis.toy_report.final_metrics` reports the changes from the initial probabilities
across seeds.

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
from collections.abc import Iterator

import polars as pl
import torch

from pipeline.analysis.toy_settings import TOY_REJECTED, ScenarioInit, ToyParams
from pipeline.training.loss_hparams import validate_loss_hparams
from pipeline.training.losses import LOSSES

N_PROMPTS = 4
N_RESPONSES = 10
CHOSEN = tuple(range(0, 4))
REJECTED = tuple(range(4, 4 + TOY_REJECTED))
UNSEEN = (8, 9)

HISTORY_COLUMNS = (
    "seed",
    "loss",
    "scenario",
    "step",
    "p_chosen",
    "p_rejected",
    "p_dispersed",
    "grad_w",
    "grad_l",
    "grad_ratio",
    "prob_ratio",
)


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
        torch.nn.Linear(N_PROMPTS, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
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


def make_pairs(params: ToyParams, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs as index tensors (prompt, chosen, rejected); the rejected response is drawn at random."""
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.arange(N_PROMPTS).repeat_interleave(params.pairs_per_prompt)
    chosen = prompt.clone()
    rejected = torch.randint(REJECTED[0], REJECTED[-1] + 1, (len(prompt),), generator=g)
    return prompt, chosen, rejected


def _seeded_mlp(params: ToyParams, seed: int) -> torch.nn.Sequential:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        return make_mlp(params.hidden)


def _dispersed_mask() -> torch.Tensor:
    """``[4, 10]``: the dispersed set of prompt i, neither its chosen response nor any rejected one."""
    mask = torch.ones(N_PROMPTS, N_RESPONSES, dtype=torch.bool)
    mask[:, list(REJECTED)] = False
    mask[torch.arange(N_PROMPTS), torch.tensor(CHOSEN)] = False
    return mask


def _optimizer(params: ToyParams, tensors) -> torch.optim.Optimizer:
    if params.optimizer == "adam":
        return torch.optim.Adam(tensors, lr=params.lr)
    return torch.optim.SGD(tensors, lr=params.lr)


RECORDED = ("p_chosen", "p_rejected", "p_dispersed", "grad_w", "grad_l", "grad_ratio", "prob_ratio")


def _record(logp: torch.Tensor, lp_w: torch.Tensor, lp_l: torch.Tensor, disp_mask: torch.Tensor) -> torch.Tensor:
    """The :data:`RECORDED` values, means over pairs (last axis), from ``logp [..., 4, 10]`` and the
    autograd gradients of the loss w.r.t. ``lp_w``/``lp_l [..., pairs]``. ∂L/∂π = (∂L/∂log π) / π."""
    p = logp.exp()
    p_w, p_l = lp_w.detach().exp(), lp_l.detach().exp()
    assert lp_w.grad is not None and lp_l.grad is not None  # the caller ran the loss's backward
    gw = lp_w.grad.abs() / p_w
    gl = lp_l.grad.abs() / p_l
    ratio = torch.where(gw > 0, gl / gw, torch.full_like(gw, math.nan))
    return torch.stack(
        [
            p_w.mean(-1),
            p_l.mean(-1),
            (p * disp_mask).sum(-1).mean(-1),
            gw.mean(-1),
            gl.mean(-1),
            ratio.mean(-1),
            (p_w / p_l).mean(-1),
        ],
        -1,
    )


def _optimise(steps: int, log_probs, pick, loss_of, opt: torch.optim.Optimizer) -> torch.Tensor:
    """Step 2's loop: ``steps`` updates, recording :data:`RECORDED` before each and after the last
    (``[steps + 1, ..., len(RECORDED)]``). ``log_probs()`` is ``[..., 4, 10]``, ``pick(logp)`` the
    pairs' ``(lp_w, lp_l)``, ``loss_of(lp_w, lp_l)`` the scalar to minimise."""
    disp_mask = _dispersed_mask()
    rec: list[torch.Tensor] = []
    for step in range(steps + 1):
        logp = log_probs()
        lp_w, lp_l = pick(logp)
        lp_w.retain_grad()
        lp_l.retain_grad()
        total = loss_of(lp_w, lp_l)
        opt.zero_grad(set_to_none=True)
        total.backward()
        with torch.no_grad():
            rec.append(_record(logp, lp_w, lp_l, disp_mask))
        if step < steps:
            opt.step()
    return torch.stack(rec)


# ---------------------------------------------------------------- one run at a time (the readable reference)
def sft(params: ToyParams, init: ScenarioInit, seed: int) -> tuple[torch.nn.Module, float]:
    """Step 1: fit a fresh MLP (seeded) to the scenario's initial distribution. Returns (model, KL)."""
    with _one_thread():
        model = _seeded_mlp(params, seed)
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


def run_one(
    params: ToyParams, loss: str, sft_model: torch.nn.Module, pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Step 2 for one loss, starting from (a copy of) ``sft_model``. Returns per-step series.

    :func:`run_toy` computes the same for every seed × scenario × loss at once; this is the
    one-at-a-time form it is tested against."""
    hp = validate_loss_hparams(loss, params.hparams[loss])
    fn = LOSSES[loss].fn
    prompt, chosen, rejected = pairs
    x = torch.eye(N_PROMPTS, dtype=torch.float64)
    ones = torch.ones(len(prompt), dtype=torch.float64)
    with torch.no_grad():
        ref = torch.log_softmax(sft_model(x), dim=-1)
    ref_w, ref_l = ref[prompt, chosen], ref[prompt, rejected]
    model = copy.deepcopy(sft_model)
    opt = _optimizer(params, model.parameters())
    with _one_thread():
        out = _optimise(
            params.steps,
            lambda: torch.log_softmax(model(x), dim=-1),
            lambda logp: (logp[prompt, chosen], logp[prompt, rejected]),
            lambda lp_w, lp_l: fn(lp_w, lp_l, ref_w, ref_l, ones, ones, **hp).mean(),
            opt,
        )
    return {k: out[:, j] for j, k in enumerate(RECORDED)}


# ---------------------------------------------------------------- every run at once (the stage)
class _StackedMLPs:
    """``B`` copies of :func:`make_mlp`'s MLP with their own weights, as stacked tensors: one batched
    forward over all of them. The toy's 16-wide layers are tiny, so one run at a time is bound by
    per-operation overhead; with the runs stacked that overhead is paid once per step for all of
    them. The runs stay independent: each one's loss depends only on its own slice of the weights,
    and Adam and SGD update each element on its own, so every run follows the trajectory it would
    alone (checked against :func:`run_one`)."""

    def __init__(self, models: list[torch.nn.Sequential]):
        # per layer (make_mlp's three Linear layers), that layer of every model
        layers = list(zip(*([lin for lin in m if isinstance(lin, torch.nn.Linear)] for m in models)))
        self.weights = [torch.stack([lin.weight.detach() for lin in ls]).clone() for ls in layers]
        self.biases = [torch.stack([lin.bias.detach() for lin in ls]).clone() for ls in layers]

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.weights, self.biases) for t in pair]

    def requires_grad_(self) -> _StackedMLPs:
        for t in self.parameters():
            t.requires_grad_(True)
        return self

    def repeat(self, n: int) -> _StackedMLPs:
        """Each run ``n`` times in a row (run b becomes runs b*n ... b*n + n-1)."""
        out = object.__new__(_StackedMLPs)
        out.weights = [w.detach().repeat_interleave(n, 0) for w in self.weights]
        out.biases = [b.detach().repeat_interleave(n, 0) for b in self.biases]
        return out

    def log_probs(self) -> torch.Tensor:
        """``[B, 4, 10]``: each run's log π(response | prompt) for the one-hot prompts."""
        h = self.weights[0].transpose(1, 2) + self.biases[0][:, None]  # one-hot inputs pick the columns
        h = torch.relu(h)
        h = torch.relu(torch.baddbmm(self.biases[1][:, None], h, self.weights[1].transpose(1, 2)))
        logits = torch.baddbmm(self.biases[2][:, None], h, self.weights[2].transpose(1, 2))
        return torch.log_softmax(logits, dim=-1)


def _sft_all(params: ToyParams, seeds: list[int], scenarios: list[int]) -> _StackedMLPs:
    """Step 1 for every (seed, scenario), seed-major: one Adam over the stacked MLPs."""
    mlps = _StackedMLPs([_seeded_mlp(params, s) for s in seeds for _ in scenarios]).requires_grad_()
    target = torch.stack([target_distribution(params.scenario_init[c]) for _ in seeds for c in scenarios])
    opt = torch.optim.Adam(mlps.parameters(), lr=params.sft_lr)
    for _ in range(params.sft_steps):
        opt.zero_grad(set_to_none=True)
        # each run's cross-entropy averaged over prompts, summed over runs (their gradients stay apart)
        (-(target * mlps.log_probs()).sum(-1).mean(-1).sum()).backward()
        opt.step()
    return mlps


def run_toy(params: ToyParams) -> pl.DataFrame:
    """Every seed × scenario × loss; a long table with one row per (seed, loss, scenario, step)."""
    seeds, scenarios, losses = list(params.seeds), list(params.scenarios), list(params.losses)
    with _one_thread():
        sft_models = _sft_all(params, seeds, scenarios)
        # run r = ((seed_i * n_scenarios) + scenario_j) * n_losses + loss_k
        mlps = sft_models.repeat(len(losses)).requires_grad_()
        n_runs = len(seeds) * len(scenarios) * len(losses)
        pair_sets = [make_pairs(params, s) for s in seeds]
        prompt, chosen = pair_sets[0][0], pair_sets[0][1]  # the same for every seed
        rejected = torch.stack([p[2] for p in pair_sets]).repeat_interleave(len(scenarios) * len(losses), 0)
        runs = torch.arange(n_runs)[:, None]
        with torch.no_grad():
            ref = mlps.log_probs()
        ref_w, ref_l = ref[runs, prompt, chosen], ref[runs, prompt, rejected]
        ones = torch.ones_like(ref_w)
        loss_of_run = torch.arange(n_runs) % len(losses)
        groups = [
            (
                torch.nonzero(loss_of_run == k).squeeze(1),
                LOSSES[name].fn,
                validate_loss_hparams(name, params.hparams[name]),
            )
            for k, name in enumerate(losses)
        ]
        # each run's loss is its loss function's mean over its pairs; the sum keeps them apart
        out = _optimise(
            params.steps,
            mlps.log_probs,
            lambda logp: (logp[runs, prompt, chosen], logp[runs, prompt, rejected]),
            lambda lp_w, lp_l: sum(
                fn(lp_w[i], lp_l[i], ref_w[i], ref_l[i], ones[i], ones[i], **hp).mean(-1).sum() for i, fn, hp in groups
            ),
            _optimizer(params, mlps.parameters()),
        ).numpy()  # [steps + 1, runs, recorded]
    n = params.steps + 1
    keys = [(s, c, name) for s in seeds for c in scenarios for name in losses]
    return pl.DataFrame(
        {
            "seed": pl.Series([s for s, _, _ in keys for _ in range(n)], dtype=pl.Int32),
            "loss": [name for _, _, name in keys for _ in range(n)],
            "scenario": pl.Series([c for _, c, _ in keys for _ in range(n)], dtype=pl.Int32),
            "step": pl.Series(list(range(n)) * n_runs, dtype=pl.Int32),
            **{k: out[:, :, j].T.reshape(-1) for j, k in enumerate(RECORDED)},
        }
    ).select(HISTORY_COLUMNS)
