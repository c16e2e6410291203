"""Per-sequence log-probs of responses given prompts, from the batches of
:mod:`pipeline.model.collate`.

Only response tokens count (prompt tokens and padding are masked out). The language-model head
runs only on the hidden states that predict a response token, so the full ``[B, T, V]`` logits
tensor over prompt and padding positions is never materialised. The batched helpers score under
:func:`pipeline.model.precision.autocast` where training's precision applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from pipeline.model.collate import ScoreBatch, collate, collate_pairs, padded_batch
from pipeline.model.precision import autocast

if TYPE_CHECKING:
    import polars as pl


def _head(model):
    return model.get_output_embeddings()


def _body(model):
    return model.get_decoder()


def _model_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A ``[B, 1, T, T]`` boolean mask in the form the model's attention takes (SDPA: as is; eager: additive)."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"train.shared_prompt needs the model's attention to take a 4D mask (sdpa or eager), not "
        f"{impl!r}; set train.shared_prompt: false"
    )


def _model_inputs(model, batch: ScoreBatch) -> dict:
    att = batch.attention_mask
    kw = {"input_ids": batch.input_ids, "attention_mask": _model_mask(model, att) if att.dim() == 4 else att}
    if batch.position_ids is not None:
        kw["position_ids"] = batch.position_ids
    return kw


# Scored positions per language-model head call: bounds the [N, V] logits alive at once
HEAD_CHUNK = 4096
# ... where the head is checkpointed: each chunk's logits live only while it runs, in the forward and in the
# backward's replay, so a smaller chunk lowers the peak at the cost of more, smaller products
CHECKPOINTED_HEAD_CHUNK = 1024


def score_batch(model, batch: ScoreBatch, *, checkpoint_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the scored tokens of each output of ``batch``, and their number.

    Differentiable (used by training); float32 tensors of shape ``[n_out]``. The language-model head
    runs only on the hidden states that predict a scored token. ``checkpoint_head`` (training under
    ``train.gradient_checkpointing``): the head's logits are not kept for the backward, which computes
    them again chunk by chunk; the same log-probs and gradients.
    """
    hidden = _body(model)(**_model_inputs(model, batch)).last_hidden_state
    return logprobs_from_hidden(model, hidden, batch, checkpoint_head=checkpoint_head)


def sequence_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the response tokens of each row of a :func:`~pipeline.model.collate.collate`
    batch, and their number."""
    return score_batch(model, padded_batch(input_ids, attention_mask, response_mask))


def _chunk_logprobs(head, softcap: float | None, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def _token_logprobs(model, h: torch.Tensor, targets: torch.Tensor, checkpoint_head: bool) -> torch.Tensor:
    head = _head(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    replay = checkpoint_head and torch.is_grad_enabled()
    chunk = CHECKPOINTED_HEAD_CHUNK if replay else HEAD_CHUNK
    token_lp = []
    for s in range(0, h.shape[0], chunk):
        args = (head, softcap, h[s : s + chunk], targets[s : s + chunk])
        if replay:
            # non-reentrant: the replay runs under the forward's autocast, and DDP's hooks fire once
            token_lp.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            token_lp.append(_chunk_logprobs(*args))
    return torch.cat(token_lp) if token_lp else h.new_zeros(0, dtype=torch.float32)


def _sums(batch: ScoreBatch, token_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = batch.input_ids.device
    sums = torch.zeros(batch.n_out, dtype=torch.float32, device=device).index_add(0, batch.rows, token_lp)
    counts = torch.bincount(batch.rows, minlength=batch.n_out).to(torch.float32)
    return sums, counts


def logprobs_from_hidden(
    model, hidden: torch.Tensor, batch: ScoreBatch, *, checkpoint_head: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_batch` from the last-layer hidden states ``[B, T, d]`` of the same batch."""
    h = hidden.reshape(-1, hidden.shape[-1])[batch.predictors]
    return _sums(batch, _token_logprobs(model, h, batch.targets, checkpoint_head))


def _batches(n: int, length, batch_size: int, progress: str | None):
    """Index lists of ``batch_size`` items of similar ``length(i)``, with a progress bar."""
    from tqdm.auto import tqdm

    order = sorted(range(n), key=length)
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    return tqdm(batches, desc=progress, disable=progress is None, unit="batch")


@torch.no_grad()
def batched_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    max_length: int | None = None,
    progress: str | None = None,
) -> tuple[list[float], list[int]]:
    """Summed response log-probs for many (prompt, response) pairs, batched by similar length, in the
    model's own dtype (no autocast: :func:`pair_logprobs` scores as training does)."""
    sums = [0.0] * len(prompts)
    counts = [0] * len(prompts)
    device = next(model.parameters()).device
    for idx in _batches(len(prompts), lambda i: len(prompts[i]) + len(responses[i]), batch_size, progress):
        ids, att, resp = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, max_length)
        s, c = sequence_logprobs(model, ids.to(device), att.to(device), resp.to(device))
        for j, i in enumerate(idx):
            sums[i] = float(s[j])
            counts[i] = int(c[j])
    return sums, counts


@torch.no_grad()
def response_logprobs_and_hidden(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    max_length: int | None = None,
    progress: str | None = None,
) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Per (prompt, response), from one forward (batched by similar length): the summed response log-prob
    (as :func:`batched_logprobs` without autocast); the sum over the response's tokens of the last-layer
    hidden state at the position that predicts each token (the LM head's input), ``[N, d]`` float32 on
    the CPU; and the token counts ``[N]``. The hidden sums are the ``h_y`` of CHES (Razin et al. 2025,
    arXiv 2410.08847)."""
    device = next(model.parameters()).device
    lps = [0.0] * len(prompts)
    hidden_sums: dict[int, torch.Tensor] = {}
    counts = torch.zeros(len(prompts), dtype=torch.long)
    for idx in _batches(len(prompts), lambda i: len(prompts[i]) + len(responses[i]), batch_size, progress):
        batch = padded_batch(*collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, max_length)).to(
            device
        )
        hidden = _body(model)(**_model_inputs(model, batch)).last_hidden_state
        lp, n = logprobs_from_hidden(model, hidden, batch)
        picked = hidden.float().reshape(-1, hidden.shape[-1])[batch.predictors]
        h = torch.zeros(len(idx), picked.shape[-1], device=device).index_add(0, batch.rows, picked).cpu()
        for j, i in enumerate(idx):
            lps[i], hidden_sums[i], counts[i] = float(lp[j]), h[j], int(n[j])
    d = model.config.hidden_size
    stacked = torch.stack([hidden_sums[i] for i in range(len(prompts))]) if prompts else torch.zeros(0, d)
    return lps, stacked, counts


def reference_check(model, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """Plain full-logits computation of the same quantity, for tests of :func:`sequence_logprobs`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    lp = functional.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (lp * response_mask[:, 1:]).sum(-1)


class ResponseLogprobs(torch.nn.Module):
    """``forward(*ScoreBatch.args()) -> (sums, counts)`` (:func:`score_batch`) as a module, so DDP can
    wrap the whole computation (its gradient hooks need the work to run inside ``forward``)."""

    def __init__(self, lm, *, checkpoint_head: bool):
        super().__init__()
        self.lm, self.checkpoint_head = lm, checkpoint_head

    def forward(self, *args):
        return score_batch(self.lm, ScoreBatch(*args), checkpoint_head=self.checkpoint_head)


def score_batch_via_forward(model, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_batch` through the model's own ``forward`` (needed by FSDP2, whose all-gathers
    hang on the root module's forward). ``logits_to_keep`` keeps only the positions that predict a
    scored token, so most prompt positions never reach the LM head."""
    batch = ScoreBatch(*args)
    T = batch.input_ids.shape[1]
    keep = torch.unique(batch.predictors % T)  # sorted
    logits = model(**_model_inputs(model, batch), logits_to_keep=keep).logits.float()  # [B, K, V]
    at = torch.searchsorted(keep, batch.predictors % T)
    picked = logits[batch.predictors // T, at]  # the model's forward has applied any logit softcapping
    lp = picked.gather(-1, batch.targets[:, None]).squeeze(-1) - torch.logsumexp(picked, -1)
    return _sums(batch, lp)


class Scoring(Protocol):
    """Training's settings that decide how a pair is scored (a :class:`~pipeline.settings.train.TrainSettings`)."""

    @property
    def max_length(self) -> int: ...  # train.max_length (= reference.max_length, checked)
    @property
    def bf16(self) -> bool: ...
    @property
    def shared_prompt(self) -> bool: ...
    @property
    def cpu_attention(self) -> str: ...


@torch.no_grad()
def pair_logprobs(
    model, pairs: pl.DataFrame, pad_id: int, batch_size: int, scoring: Scoring, progress: str | None = None
) -> tuple[list[float], list[float], list[int], list[int]]:
    """Summed log-probs of chosen and rejected of every pair under ``model`` (the reference stage's and
    evaluation's one code path), and the response lengths in tokens. ``scoring`` is training's settings
    (``train.max_length``, ``bf16``, ``shared_prompt``, ``cpu_attention``), so both sides are laid out,
    truncated and rounded as training scores them; ``batch_size`` counts pairs."""
    prompts, chosen, rejected = (pairs[c].to_list() for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    device = next(model.parameters()).device
    n = len(prompts)
    lw, ll, nw, nl = [0.0] * n, [0.0] * n, [0] * n, [0] * n
    length = lambda i: len(prompts[i]) + len(chosen[i]) + len(rejected[i])  # noqa: E731
    for idx in _batches(n, length, batch_size, progress):
        batch = collate_pairs(
            [prompts[i] for i in idx],
            [chosen[i] for i in idx],
            [rejected[i] for i in idx],
            pad_id,
            scoring.max_length,
            shared_prompt=scoring.shared_prompt,
        ).to(device)
        with autocast(device, scoring.bf16, scoring.cpu_attention):
            s, c = score_batch(model, batch)
        k = len(idx)
        for j, i in enumerate(idx):
            lw[i], ll[i], nw[i], nl[i] = float(s[j]), float(s[k + j]), int(c[j]), int(c[k + j])
    return lw, ll, nw, nl
